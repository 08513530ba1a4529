"""The app under bad requests through gradio_client and raw HTTP: bad files, settings, prompts and lists, NaN and
wrong types in raw JSON, the upload limit, file access, a client that leaves mid-stream, the bounded queue and
per-session chat histories (the checks themselves: test_app_validation.py).

Every refused request must say why, and a normal request must succeed right after it.
"""

import json
import threading
import time

import app_support as S
import httpx
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


run_caption, refused, normal_ok, NORMAL, BAD_IMAGES = S.run_caption, S.refused, S.normal_ok, S.NORMAL, S.BAD_IMAGES


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
    slow = S.generation_model(svc).language_model.register_forward_pre_hook(slow_step)
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

    slow = S.generation_model(svc).language_model.register_forward_pre_hook(lambda m, a: time.sleep(0.2))
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
