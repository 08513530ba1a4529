"""app/validation.py through the handlers: every image, text, list and decoding setting a request can send is
checked (once, in the service) and a bad one refused with a message saying what is wrong; a normal request succeeds
right after it."""

import inspect
import math

import app_support as S
import pytest
from PIL import Image

from app.config import Limits
from app.errors import RequestError
from app.validation import clean_text, load_image, parse_decoding
from blip2.decoding import ANSWER, CAPTION

pytestmark = pytest.mark.usefixtures("one_thread")
run_caption, refused, normal_ok, BAD_IMAGES = S.run_caption, S.refused, S.normal_ok, S.BAD_IMAGES


# ----------------------------------------------------------------------------------------------------
# images, through the handlers

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
# decoding settings sent straight to the handlers (blip2.decoding's fields, the app's ranges)


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


def test_decoding_defaults(svc):
    assert parse_decoding(svc.limits, {}, CAPTION).generate_kwargs() == dict(
        max_new_tokens=30, min_new_tokens=1, repetition_penalty=1.0, num_return_sequences=1, do_sample=False,
        num_beams=1, length_penalty=1.0)
    sampled = parse_decoding(svc.limits, dict(mode="nucleus sampling", num_captions=2, temperature=0.7), CAPTION)
    assert sampled.generate_kwargs() == dict(max_new_tokens=30, min_new_tokens=1, repetition_penalty=1.0,
                                             num_return_sequences=2, do_sample=True, temperature=0.7, top_p=0.9,
                                             top_k=50)
    answer = parse_decoding(svc.limits, {}, ANSWER)
    assert answer.streams and answer.max_new_tokens == 20
    params = inspect.signature(S.app().caption.caption).parameters  # what Gradio shows as the /caption API
    assert list(params)[:12] == ["image", "prompt", "mode", "num_beams", "temperature", "top_p", "top_k",
                                 "max_new_tokens", "min_new_tokens", "repetition_penalty", "length_penalty",
                                 "num_captions"]
    assert params["max_new_tokens"].default == 30 and params["top_p"].default == 0.9
    params = inspect.signature(S.app().chat.chat).parameters
    assert "num_captions" not in params and params["max_new_tokens"].default == 20 and list(params)[-3] == "history"
