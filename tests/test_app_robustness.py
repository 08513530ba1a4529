"""The app's validation and resource limits, through the handlers and through gradio_client.

Every refused request must say why, and a normal request must succeed right after it.
"""

import json
import math
import threading
import time

import app_support as S
import httpx
import pytest
from PIL import Image

from app.config import Limits
from app.errors import RequestError
from app.validation import clean_text, load_image, parse_decoding

pytestmark = pytest.mark.usefixtures("one_thread")


run_caption, refused = S.run_caption, S.refused
NORMAL = " ".join(S.scene(0)[0].caption().split()[:3])  # 3 new tokens of the true caption: "a small blue"


def normal_ok(scene_path):
    assert run_caption(scene_path) == (NORMAL, "")


# ----------------------------------------------------------------------------------------------------
# images, through the handlers

BAD_IMAGES = [
    ("zero bytes", lambda: b"", ".jpg", "empty file"),
    ("text renamed .jpg", lambda: b"this is not an image, just text\n" * 20, ".jpg", "not a file this app can read"),
    ("html renamed .png", lambda: b"<html><body>hello</body></html>", ".png", "not a file this app can read"),
    ("truncated PNG", lambda: S.png_bytes(S.colour_image((300, 300)))[:300], ".png", "truncated or corrupt"),
    ("truncated JPEG", lambda: S.jpeg_bytes(Image.effect_noise((300, 300), 50))[:2000], ".jpg", "truncated"),
    ("decompression bomb", lambda: S.bomb_png(), ".png", "limit"),
    ("over the pixel limit", lambda: S.bomb_png(8000, 8000), ".png", "megapixels"),
    ("extreme aspect ratio", lambda: S.png_bytes(S.colour_image((2000, 20))), ".png", "aspect ratio"),
]


@pytest.mark.parametrize("name,make,suffix,message", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_bad_image_files_are_refused_by_every_tab(tmp_path, svc, scene_path, name, make, suffix, message):
    path = S.write(tmp_path, "upload" + suffix, make())
    refused(S.app().caption.caption, path, "", match=message)
    refused(S.app().chat.chat, path, "what color is it?", match=message)
    refused(S.app().matching.match, path, "a red circle", match=message)
    normal_ok(scene_path)


def test_missing_image(svc, scene_path):
    refused(S.app().caption.caption, None, match="no image")
    refused(S.app().chat.chat, None, "what is it?", match="no image")
    refused(S.app().matching.match, {"path": "/nonexistent/upload.png"}, "a", match="upload it again")
    normal_ok(scene_path)


def test_pixel_limit_is_configurable(svc):
    limits = Limits(max_image_pixels=10_000)
    with pytest.raises(RequestError, match="megapixels"):
        load_image(S.png_bytes(S.colour_image((200, 200))), limits)
    assert load_image(S.png_bytes(S.colour_image((100, 100))), limits).image.size == (100, 100)


# Levels off at the checked pixels, measured: WebP (lossy) 2, RGB 16-bit PNG 1 (PIL keeps the high byte: 234 for
# 60000 / 257 = 233.5), all others 0. Allowed: 2x, at least 2 (a JPEG decoder may round a level differently).
TOLERANCE = {"WebP": 4}


@pytest.mark.parametrize("name,data,suffix,expected", S.mode_images(), ids=[m[0] for m in S.mode_images()])
def test_every_pil_mode_is_accepted(tmp_path, svc, name, data, suffix, expected):
    path = S.write(tmp_path, "mode" + suffix, data)
    checked = load_image(path, svc.limits)
    assert checked.image.mode == "RGB" and checked.image.size == (40, 40)
    tol = TOLERANCE.get(name, 2)
    for xy, rgb in expected.items():
        got = checked.image.getpixel(xy)
        assert max(abs(a - b) for a, b in zip(got, rgb)) <= tol, (xy, got, rgb)


def test_a_mode_image_is_captioned_as_its_rgb_twin(tmp_path, svc):
    """A grey+alpha file through the whole caption path gives the caption of the RGB file with its pixels."""
    _, im = S.scene(0)
    la = S.write(tmp_path, "la.png", S.png_bytes(im.convert("LA")))
    rgb = S.write(tmp_path, "rgb.png", S.png_bytes(im.convert("L").convert("RGB")))
    assert run_caption(la, max_new_tokens=20) == run_caption(rgb, max_new_tokens=20)


def test_transparency_is_composited_onto_white(svc):
    im = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent red
    assert load_image(S.png_bytes(im), svc.limits).image.getpixel((5, 5)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_images_use_their_first_frame(tmp_path, svc, scene_path, fmt):
    path = S.write(tmp_path, "anim." + fmt.lower(), S.animated(fmt))
    checked = load_image(path, svc.limits)
    r, g, b = checked.image.getpixel((24, 24))
    assert r > 150 and b < 100, "the first frame is red"
    assert any("first" in n for n in checked.notes)
    text, notice = run_caption(path)
    first = S.write(tmp_path, "first.png", S.png_bytes(S.colour_image((48, 48), checked.image.getpixel((24, 24)))))
    assert text == run_caption(first)[0]  # the caption of the first frame alone
    assert notice == f"{checked.notes[0]} {svc.world_caveat(svc.registry.default['generation'], [checked])}".strip()
    normal_ok(scene_path)


def test_exif_orientation_is_applied(svc):
    checked = load_image(S.exif_rotated_jpeg(), svc.limits)
    assert checked.image.size == (20, 60)
    top, bottom = checked.image.getpixel((10, 5)), checked.image.getpixel((10, 55))
    assert top[0] > 150 and bottom[2] > 150  # rotated 90 degrees clockwise: red on top, blue below


@pytest.mark.parametrize("size", [(1, 1), (2, 30), (400, 20)])
def test_tiny_and_elongated_images_are_handled(tmp_path, svc, size):
    """A one-colour image of any size is resized to the same one-colour square: the same caption and scores."""
    path = S.write(tmp_path, "small.png", S.png_bytes(S.colour_image(size)))
    square = S.write(tmp_path, "square.png", S.png_bytes(S.colour_image((224, 224))))
    assert run_caption(path) == run_caption(square)
    rows, same = (svc.match(svc.registry.default["retrieval"], p, ["a red square"]).rows[0] for p in (path, square))
    assert abs(rows.itm - same.itm) < 1e-6 and abs(rows.itc - same.itc) < 1e-6


def test_huge_image_is_downsized_once_checked(svc):
    im = Image.effect_noise((3000, 2000), 40).convert("RGB")
    checked = load_image(S.jpeg_bytes(im), Limits())
    assert max(checked.image.size) <= svc.limits.work_side and checked.original_size == (3000, 2000)


# ----------------------------------------------------------------------------------------------------
# prompts


def test_prompt_validation(svc, scene_path):
    refused(S.app().chat.chat, scene_path, "", match="empty")
    refused(S.app().chat.chat, scene_path, "   \n\t  ", match="empty")
    refused(S.app().chat.chat, scene_path, "why? " * 20_000, match="limit is 1,000")
    refused(S.app().caption.caption, scene_path, "x" * 100_000, match="limit")
    normal_ok(scene_path)  # an empty caption prefix is fine


@pytest.mark.parametrize("text", [
    "what\x00 color\x07 is\x1b[31m it?\u200b",  # control characters and escape sequences
    "what colour is it? 这是什么颜色 что это 🙂🚀 é",  # mixed scripts and emoji
    "what color is <image><image> it? </s> [CLS]",  # special-token strings typed by a user
    "\ud800 lone surrogate",
])
def test_odd_prompts_are_cleaned_and_answered(svc, scene_path, text):
    out = None
    for out in S.app().chat.chat(scene_path, text, max_new_tokens=4):
        pass
    conversation, notice, state = out
    question = clean_text(text)
    assert conversation[-2] == {"role": "user", "content": question} and conversation[-1]["role"] == "assistant"
    assert "\x00" not in question and "\x1b" not in question and "\ud800" not in question
    assert run_caption(scene_path, text)[0].startswith(question + " ")  # the prefix, then the model's words


def test_clean_text_rules():
    assert clean_text("  a\tb\n\nc\x00d  ") == "a b cd"
    assert clean_text("e\u0301") == "\u00e9"  # NFC
    with pytest.raises(RequestError, match="empty"):
        clean_text("\x00\x01")


# ----------------------------------------------------------------------------------------------------
# decoding settings sent straight to the handlers


@pytest.mark.parametrize("settings,message", [
    (dict(num_beams=-1), "between 1 and"),
    (dict(num_beams=99), "between 1 and"),
    (dict(num_beams="many"), "must be a number"),
    (dict(num_beams=2.5), "whole number"),
    (dict(num_beams=True), "must be a number"),
    (dict(temperature=math.nan), "finite"),
    (dict(temperature=math.inf), "finite"),
    (dict(temperature=-1), "between"),
    (dict(top_p=0), "between"),
    (dict(top_k=[5]), "must be a number"),
    (dict(max_new_tokens=10**9), "between 1 and 128"),
    (dict(max_new_tokens=0), "between 1 and"),
    (dict(min_new_tokens=20, max_new_tokens=10), "cannot exceed"),
    (dict(repetition_penalty=None), "must be a number"),
    (dict(length_penalty="1e400"), "finite"),
    (dict(mode="greedy-ish"), "decoding mode"),
    (dict(mode=3), "decoding mode"),
    (dict(num_captions=3, num_beams=2), "at least 3 beams"),
    (dict(num_beams=8, max_new_tokens=128, num_captions=1), "over the limit"),
])
def test_bad_decoding_settings(svc, scene_path, settings, message):
    refused(run_caption, scene_path, match=message, **settings)
    normal_ok(scene_path)


def test_numeric_strings_are_accepted(svc):
    names = ["mode", "num_beams", "temperature", "top_p", "top_k", "max_new_tokens", "min_new_tokens",
             "repetition_penalty", "length_penalty", "num_captions"]
    sent = ["Beam Search", "3", "0.7", "0.9", "40", "12", "0", "1.2", "1", "2"]
    d = parse_decoding(svc.limits, dict(zip(names, sent)))
    assert d.settings == dict(do_sample=False, num_beams=3, temperature=0.7, top_p=0.9, top_k=40, max_new_tokens=12,
                              min_new_tokens=0, repetition_penalty=1.2, length_penalty=1.0, num_return_sequences=2)


# ----------------------------------------------------------------------------------------------------
# lists


def test_candidate_text_limits(svc, scene_path):
    n = svc.limits.max_candidates
    refused(S.app().matching.match, scene_path, "\n".join(f"text {i}" for i in range(n + 1)), match=f"limit is {n}")
    refused(S.app().matching.match, scene_path, "\n\n  \n", match="at least one")
    refused(S.app().matching.match, scene_path, "a" * 400, match="limit is 300")
    refused(S.app().matching.match, scene_path, 42, match="must be text")
    table, _, _, heat, notice = S.app().matching.match(scene_path, "a red circle\na red circle\na blue star")
    assert len(table) == 2  # duplicates are scored once


def test_gallery_limits(svc, scene_path, tmp_path):
    n = svc.limits.max_gallery
    refused(S.app().search.search, [scene_path] * (n + 1), "a red circle", match=f"limit is {n}")
    refused(S.app().search.search, [], "a red circle", match="empty")
    refused(S.app().search.search, None, "a red circle", match="empty")
    refused(S.app().search.search, [scene_path], "", match="empty")
    refused(S.app().search.search, [scene_path], "a", rerank_k=-2, match="between")
    bad = S.write(tmp_path, "bad.jpg", b"not an image")
    refused(S.app().search.search, [bad], "a red circle", match="no usable image")
    items, table, notice = S.app().search.search([bad, scene_path], "a red circle", 1)
    assert len(items) == 1 and "Skipped" in notice and "bad.jpg" in notice


def test_broken_checkpoint_gives_a_message_and_the_app_keeps_serving(svc, scene_path, tmp_path):
    import shutil

    from app.registry import GENERATION, Checkpoint
    from app.ui import App

    source = svc.registry.get(svc.registry.default[GENERATION], GENERATION).source
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut off mid-download
    svc.registry.catalogue["broken (local)"] = Checkpoint("broken (local)", ((GENERATION, str(broken)),))
    try:
        message = refused(App(svc).load_model, "broken (local)", svc.registry.session_defaults(),
                          match="could not load broken")
        assert "truncated" in message or "safetensors" in message
    finally:
        del svc.registry.catalogue["broken (local)"]
    assert svc.registry.loaded("broken (local)", GENERATION) is None
    normal_ok(scene_path)


def test_unknown_model_is_refused(svc):
    from app.ui import App

    load_model = App(svc).load_model
    refused(load_model, "/etc", match="unknown model")
    refused(load_model, "../assets", match="unknown model")
    refused(load_model, None, match="unknown model")


# ----------------------------------------------------------------------------------------------------
# failures inside the model, time limits


def _generation_model(svc):
    return svc.registry.get(svc.registry.default["generation"], "generation").model


def test_model_exception_returns_an_error_and_the_next_request_works(svc, scene_path):
    calls = []

    def boom(module, args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated failure inside the model")

    handle = _generation_model(svc).language_model.register_forward_pre_hook(boom)
    try:
        message = refused(run_caption, scene_path, num_beams=2, match="failed on this request")
        assert "simulated failure" in message
        normal_ok(scene_path)
    finally:
        handle.remove()


def test_time_limit_stops_generation_between_tokens(svc, scene_path, monkeypatch):
    monkeypatch.setattr(svc.limits, "time_limit_s", 0.6)
    steps = []

    def slow_step(module, args):
        steps.append(1)
        time.sleep(0.1)  # a slow model: 100 tokens would take 10 s

    slow = _generation_model(svc).language_model.register_forward_pre_hook(slow_step)
    try:
        text, notice = run_caption(scene_path, max_new_tokens=100, min_new_tokens=100)
        assert notice == "Stopped at the time limit of 0.6 s." and len(steps) < 100  # stopped between tokens
        refused(run_caption, scene_path, num_beams=2, max_new_tokens=100, min_new_tokens=100, match="time limit")
    finally:
        slow.remove()
    normal_ok(scene_path)


# ----------------------------------------------------------------------------------------------------
# through gradio_client and raw HTTP


def _call(client, *args, api_name):
    return client.predict(*args, api_name=api_name)


def _client_refused(client, *args, api_name, match):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        _call(client, *args, api_name=api_name)
    assert match.lower() in str(info.value).lower(), str(info.value)


def _client_ok(client, scene_path):
    from gradio_client import handle_file

    assert client.predict(handle_file(scene_path), "", "beam search", 1, 1.0, 0.9, 50, 3, 1, 1.0, 1.0, 1,
                          api_name="/caption") == (NORMAL, "")


@pytest.mark.parametrize("name,make,suffix,message", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_bad_image_files_through_the_api(tmp_path, client, scene_path, name, make, suffix, message):
    from gradio_client import handle_file

    path = S.write(tmp_path, "upload" + suffix, make())
    _client_refused(client, handle_file(path), "", api_name="/caption", match=message)
    _client_refused(client, handle_file(path), "a\nb", api_name="/match", match=message)
    _client_ok(client, scene_path)


def test_odd_files_through_the_api(tmp_path, svc, client, scene_path):
    from gradio_client import handle_file

    for name, data, suffix in [m[:3] for m in S.mode_images()[:4]] + [("gif", S.animated("GIF"), ".gif")]:
        path = S.write(tmp_path, "odd" + suffix, data)
        text, notice = client.predict(handle_file(path), "", "beam search", 1, 1.0, 0.9, 50, 3, 1, 1.0, 1.0, 1,
                                      api_name="/caption")
        assert [text, notice] == list(run_caption(path)), name  # as the handler captions the same file
    path = S.write(tmp_path, "tiny.png", S.png_bytes(S.colour_image((1, 1))))
    row = client.predict(handle_file(path), "a red square", api_name="/match")[0]["data"][0]
    direct = svc.match(svc.registry.default["retrieval"], path, ["a red square"]).rows[0]
    assert row == [1, "a red square", round(direct.itm, 4), round(direct.itc, 4)]  # the table rounds to 4 places
    _client_refused(client, "/etc/passwd", "", api_name="/caption", match="valid dictionary")  # not an upload
    _client_refused(client, None, "", api_name="/caption", match="no image")
    _client_ok(client, scene_path)


@pytest.mark.parametrize("args,message", [
    (("beam search", "abc"), "must be a number"),
    (("beam search", -3), "between 1 and"),
    (("beam search", True), "must be a number"),
    (("beam search", 1, 1.0, 0.9, 50, 10**9), "between 1 and 128"),
    (("beam search", 99), "between 1 and"),
    (("sampling?",), "decoding mode"),
    (("beam search", 1, "hot"), "must be a number"),
    (("beam search", 4, 1.0, 0.9, 50, 30, 1, 1.0, 1.0, 5), "at least 5 beams"),
])
def test_bad_settings_through_the_api(client, scene_path, args, message):
    from gradio_client import handle_file

    _client_refused(client, handle_file(scene_path), "", *args, api_name="/caption", match=message)
    _client_ok(client, scene_path)


def test_bad_prompts_and_lists_through_the_api(svc, client, scene_path, monkeypatch):
    from gradio_client import handle_file

    img = handle_file(scene_path)
    _client_refused(client, img, "x" * 100_000, api_name="/caption", match="limit")
    _client_refused(client, img, "   ", api_name="/chat", match="empty")
    _client_refused(client, img, "\n".join(map(str, range(50))), api_name="/match", match="limit is 20")
    monkeypatch.setattr(svc.limits, "max_gallery", 3)  # limits apply per request: no need to upload 49 images
    _client_refused(client, [{"image": img, "caption": None}] * 4, "a", api_name="/search", match="limit is 3")
    _client_refused(client, "/etc/passwd", api_name="/load_model", match="unknown model")
    conv = client.predict(img, "what color \x00\x1b is it? 🙂 что", api_name="/chat")[0]
    assert [m["role"] for m in conv] == ["user", "assistant"]
    assert conv[0]["content"] in ("what color is it? 🙂 что", [{"type": "text", "text": "what color is it? 🙂 что"}])
    _client_ok(client, scene_path)


def _raw_call(server, api_name, payload_text):
    """POST a hand-written JSON body (NaN included) and return the SSE reply's text."""
    r = httpx.post(server.url + f"gradio_api/call/{api_name}", content=payload_text,
                   headers={"content-type": "application/json"}, timeout=30)
    if r.status_code != 200:
        return r.text
    event_id = r.json()["event_id"]
    with httpx.stream("GET", server.url + f"gradio_api/call/{api_name}/{event_id}", timeout=60) as s:
        return "".join(s.iter_text())


def test_nan_and_wrong_types_in_raw_json(server, client, scene_path):
    from gradio_client import handle_file

    path = client.predict(handle_file(scene_path), "a", api_name="/match")[3]  # a file the server knows
    path = path["path"] if isinstance(path, dict) else path
    image = json.dumps({"path": path, "meta": {"_type": "gradio.FileData"}})
    for value, message in (("NaN", "finite"), ("Infinity", "finite"), ('"7 beams"', "must be a number"),
                           ("null", "must be a number"), ("[1, 2]", "must be a number")):
        body = f'{{"data": [{image}, "", "beam search", {value}, 1, 0.9, 50, 3, 1, 1, 1, 1]}}'
        reply = _raw_call(server, "caption", body)
        assert "error" in reply and message in reply, reply
    _client_ok(client, scene_path)


def test_upload_size_limit(server, client, scene_path, tmp_path):
    big = S.write(tmp_path, "big.png", b"\x89PNG" + bytes(3 * 2**20))
    with open(big, "rb") as f:
        r = httpx.post(server.url + "gradio_api/upload", files={"files": ("big.png", f, "image/png")}, timeout=30)
    assert r.status_code == 413, r.text
    _client_ok(client, scene_path)


def test_file_access_is_limited_to_examples_and_uploads(server):
    from app.paths import EXAMPLES_DIR, ROOT

    def status(path):
        return httpx.get(server.url + "gradio_api/file=" + str(path), timeout=10).status_code

    assert status(EXAMPLES_DIR / "scene_1.png") == 200
    for path in ("/etc/passwd", ROOT / "app.py", ROOT / "app" / "service.py", EXAMPLES_DIR / ".." / ".." / "app.py",
                 ROOT / "blip2" / "assets" / "blip2-tiny" / "config.json"):
        assert status(path) in (403, 404), path
    for path in ("/etc/passwd", ROOT / "app.py"):  # a server path sent as an "upload" is not read either
        image = json.dumps({"path": str(path), "meta": {"_type": "gradio.FileData"}})
        reply = _raw_call(server, "caption", f'{{"data": [{image}, "", "beam search", 1, 1, 0.9, 50, 3, 1, 1, 1, 1]}}')
        assert "error" in reply and "not uploaded by a user" in reply and "root:" not in reply


def test_disconnect_mid_stream_frees_the_slot(svc, server, scene_path, monkeypatch):
    """A client that goes away mid-stream stops its generation at the next token (the service's stream is closed,
    not run to its end) and the next request is served."""
    from gradio_client import handle_file

    steps, ended, how = [], threading.Event(), []
    real = svc.generate

    def watched(*args, **kwargs):  # the service's token stream, and how it ended
        try:
            yield from real(*args, **kwargs)
            how.append("ran to its end")
        except GeneratorExit:
            how.append(f"closed after {len(steps)} steps")
            raise
        finally:
            ended.set()

    def slow_step(module, args):
        steps.append(1)
        time.sleep(0.15)

    monkeypatch.setattr(svc, "generate", watched)
    slow = _generation_model(svc).language_model.register_forward_pre_hook(slow_step)
    try:
        leaving = server.client()
        job = leaving.submit(handle_file(scene_path), "", "beam search", 1, 1.0, 0.9, 50, 120, 120, 1.0, 1.0, 1,
                             api_name="/caption")  # 95 tokens (what the context leaves): 14 s at this pace
        deadline = time.monotonic() + 20
        while len(steps) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(steps) >= 3, "the stream started"
        job.cancel()
        leaving.close() if hasattr(leaving, "close") else None
        assert ended.wait(30), "the stream neither stopped nor finished"
        assert how[0].startswith("closed") and int(how[0].split()[2]) < 95 // 2, how
    finally:
        slow.remove()
    _client_ok(server.client(), scene_path)


def test_queue_is_bounded(svc, server, scene_path):
    from gradio_client import handle_file

    slow = _generation_model(svc).language_model.register_forward_pre_hook(lambda m, a: time.sleep(0.2))
    client = server.client()
    jobs = []
    try:
        for _ in range(svc.limits.queue_size + svc.limits.concurrency + 3):  # those running, then the queue
            jobs.append(client.submit(handle_file(scene_path), "", "beam search", 1, 1.0, 0.9, 50, 40, 40, 1.0, 1.0,
                                      1, api_name="/caption"))
        full = []
        deadline = time.monotonic() + 20
        while not full and time.monotonic() < deadline:
            time.sleep(0.2)
            for j in jobs:
                if j.done():
                    try:
                        j.result()
                    except Exception as e:
                        full.append(str(e))
        assert any("queue" in m.lower() and "full" in m.lower() for m in full), full
    finally:
        for j in jobs:
            j.cancel()
        slow.remove()
    _client_ok(server.client(), scene_path)


def test_parallel_sessions_do_not_share_chat_history(server, scene_path):
    from gradio_client import handle_file

    img = handle_file(scene_path)
    results = {}

    def talk(name):
        c = server.client()
        c.predict(img, f"question from {name}?", api_name="/chat")
        results[name] = c.predict(img, "second question?", api_name="/chat")[0]

    threads = [threading.Thread(target=talk, args=(n,)) for n in ("alice", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for name, other in (("alice", "bob"), ("bob", "alice")):
        texts = [m["content"][0]["text"] if isinstance(m["content"], list) else m["content"] for m in results[name]]
        assert len(texts) == 4 and f"question from {name}?" in texts[0]
        assert not any(other in t for t in texts)
