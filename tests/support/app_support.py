"""Shared by the app tests: one Service (the embedded model) and one launched server per test process, and
builders for the awkward files the robustness tests upload."""

import atexit
import hashlib
import io
import os
import socket
import struct
import sys
import threading
import zlib

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
sys.path.insert(0, ROOT)

# Limits the tests rely on (the server-wide ones, set before the service is built)
TEST_LIMITS = dict(max_upload_mb=2.0, queue_size=8, time_limit_s=30.0)

_lock = threading.Lock()
_service = None
_server = None
# a text over the retrieval model's 64 text positions, within the app's 300 characters per candidate
LONG_TEXT = ("a small red circle in the top left and a large blue square in the center " * 4)[:299].strip()


def get_service():
    """The app's service on the embedded model (built once per process)."""
    global _service
    with _lock:
        if _service is None:
            from app.config import Limits
            from app.service import Service

            # development override only: APP_TEST_MODEL / APP_TEST_ITM_MODEL point at other checkpoints
            _service = Service(generation=os.environ.get("APP_TEST_MODEL"),
                               retrieval=os.environ.get("APP_TEST_ITM_MODEL"), limits=Limits(**TEST_LIMITS))
            _service.registry.warm_up()
        return _service


def app():
    """The app's handlers (app.ui.App) over the shared service, as build_demo wires them."""
    from app.ui import App

    return App(get_service())


def last(outputs):
    """The last of a handler's (or the service's) outputs: a generator's final yield, or a plain return value."""
    if not hasattr(outputs, "__next__"):
        return outputs
    out = None
    for out in outputs:
        pass
    return out


def refused(fn, *args, match=None, **kwargs) -> str:
    """fn (a handler, or a function of the service) refuses the request with a message containing `match`;
    returns the message."""
    import gradio as gr
    import pytest

    from app.errors import RequestError

    with pytest.raises((gr.Error, RequestError)) as info:
        last(fn(*args, **kwargs))
    message = getattr(info.value, "message", None) or str(info.value)
    if match:
        assert match.lower() in message.lower(), message
    return message


def run_caption(image, prompt="", **decoding):
    """The Caption tab's (caption, notice) for an image: 3 new tokens unless `decoding` says otherwise."""
    return last(app().caption.caption(image, prompt, **{"max_new_tokens": 3, **decoding}))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, demo, url):
        self.demo, self.url = demo, url

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False, download_files=False)


def get_server():
    """The app launched in this process on a free localhost port (once per process)."""
    global _server
    svc = get_service()
    with _lock:
        if _server is None:
            from app.ui import build_demo, launch_kwargs

            demo = build_demo(svc)
            port = free_port()
            demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        **launch_kwargs(svc))
            _server = Server(demo, f"http://127.0.0.1:{port}/")
            atexit.register(demo.close)
        return _server


# ----------------------------------------------------------------------------------------------------
# scenes of the embedded model's world


def scene(index, split="test", seed=11, size=224):
    """(Scene, PIL image) of the world the embedded model was trained on."""
    from blip2.train.world import make_split

    s = make_split(split, index + 1, seed=seed)[index]
    return s, s.render(size)


def one_object_scenes(n, seed=11):
    """n one-object scenes with pairwise different colours and shapes (easy to tell apart)."""
    from blip2.train.world import make_split

    out, colors, shapes = [], set(), set()
    for s in make_split("test", 400, seed=seed):
        o = s.objects[0]
        if len(s.objects) == 1 and o.color not in colors and o.shape not in shapes and o.color not in ("white",):
            out.append(s)
            colors.add(o.color)
            shapes.add(o.shape)
        if len(out) == n:
            break
    return out


# ----------------------------------------------------------------------------------------------------
# awkward files


def png_bytes(im, **kw):
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def jpeg_bytes(im, **kw):
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", **kw)
    return buf.getvalue()


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width=100_000, height=100_000):
    """A PNG whose header declares width x height pixels with almost no data (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def colour_image(size=(64, 64), color=(200, 30, 30)):
    return Image.new("RGB", size, color)


def animated(fmt="GIF"):
    """Two frames: red then blue."""
    frames = [colour_image((48, 48), (220, 20, 20)), colour_image((48, 48), (20, 20, 220))]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def exif_rotated_jpeg():
    """A 60x20 JPEG (left half red, right half blue) with EXIF orientation 6: shown upright it is 20x60."""
    im = Image.new("RGB", (60, 20), (220, 20, 20))
    im.paste((20, 20, 220), (30, 0, 60, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def mode_images():
    """One image of every PIL mode the app must accept, as (name, bytes, suffix, expected): `expected` maps (x, y)
    to the RGB the app must see there, worked out from how the image was made. The base picture is red
    (200, 0, 0) with a green (20, 200, 20) square at [10, 30) x [10, 30); grey levels of it are
    0.299 R + 0.587 G + 0.114 B (PIL's "L"): 60 and 126."""
    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[10:30, 10:30] = (20, 200, 20)
    base = Image.fromarray(rgb)
    red, green, grey_red, grey_green = (200, 0, 0), (20, 200, 20), (60,) * 3, (126,) * 3
    out = []
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((40, 40)))  # transparent at the top, opaque at the bottom
    a = np.asarray(rgba)[..., 3] / 255

    def on_white(c, x, y):  # the colour composited onto white at alpha a[y, x]
        return tuple(int(round(v * a[y, x] + 255 * (1 - a[y, x]))) for v in c)

    out.append(("RGBA", png_bytes(rgba), ".png", {(2, 0): on_white(red, 2, 0), (2, 38): on_white(red, 2, 38),
                                                  (20, 20): on_white(green, 20, 20)}))
    out.append(("LA", png_bytes(base.convert("LA")), ".png", {(2, 2): grey_red, (20, 20): grey_green}))
    p = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette = p.getpalette()
    transparent = p.getpixel((2, 2))  # the background's palette entry is the transparent one: white
    out.append(("P-transparency", png_bytes(p, transparency=transparent), ".png",
                {(2, 2): (255, 255, 255), (20, 20): tuple(palette[3 * p.getpixel((20, 20)):][:3])}))
    out.append(("CMYK", _cmyk_jpeg(base), ".jpg", {(2, 2): red, (20, 20): green}))
    i16 = Image.fromarray((np.linspace(0, 65535, 40 * 40).reshape(40, 40)).astype(np.uint16))
    # 16-bit grey v -> v / 257; I and F images span other ranges and are stretched to 0..255 (lowest..highest)
    ramp = {(0, 0): (0,) * 3, (20, 20): (131,) * 3, (39, 39): (255,) * 3}  # pixel 820 of 1600: 820/1599*255
    out.append(("I;16 (16-bit PNG)", png_bytes(i16), ".png", ramp))
    out.append(("I", _tiff(Image.fromarray(np.arange(1600, dtype=np.int32).reshape(40, 40) * 1000, "I")), ".tif",
                ramp))
    out.append(("F", _tiff(Image.fromarray(np.linspace(-3, 7, 1600, dtype=np.float32).reshape(40, 40), "F")), ".tif",
                ramp))
    out.append(("1", png_bytes(Image.fromarray(np.asarray(base.convert("L")) > 100)), ".png",
                {(2, 2): (0, 0, 0), (20, 20): (255, 255, 255)}))
    out.append(("L", png_bytes(base.convert("L")), ".png", {(2, 2): grey_red, (20, 20): grey_green}))
    rgb16 = np.zeros((40, 40, 3), np.uint16)
    rgb16[..., 2] = 60000
    out.append(("RGB 16-bit PNG", _png16_rgb(rgb16), ".png", {(3, 3): (0, 0, 233)}))  # 60000 / 257
    out.append(("WebP", _webp(base), ".webp", {(2, 2): red, (20, 20): green}))
    return out


def _cmyk_jpeg(im):
    buf = io.BytesIO()
    im.convert("CMYK").save(buf, "JPEG")
    return buf.getvalue()


def _tiff(im):
    buf = io.BytesIO()
    im.save(buf, "TIFF")
    return buf.getvalue()


def _webp(im):
    buf = io.BytesIO()
    im.save(buf, "WEBP")
    return buf.getvalue()


def _png16_rgb(array):
    """An RGB PNG with 16 bits per channel, written by hand (PIL cannot write it)."""
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def write(tmp_path, name, data):
    """Store a test file where Gradio stores a visitor's upload (its upload folder, in a sub-folder named after
    `tmp_path`): the app reads no other files (app/files.py). Returns its path."""
    from app.files import upload_folder

    folder = os.path.join(upload_folder(), "blip2-tests", hashlib.sha256(str(tmp_path).encode()).hexdigest()[:16])
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def generation_model(svc):
    """The shared service's captioning model (the embedded one)."""
    return svc.registry.get(svc.registry.default["generation"], "generation").model


def normal_ok(scene_path):
    """After a refused request, the next one runs normally: scene 0's caption, 3 new tokens, no notice."""
    assert run_caption(scene_path) == (NORMAL, "")


NORMAL = " ".join(scene(0)[0].caption().split()[:3])  # 3 new tokens of the true caption: "a small blue"
# files every tab refuses: (name, bytes, suffix, what the message says)
BAD_IMAGES = [
    ("zero bytes", lambda: b"", ".jpg", "empty file"),
    ("text renamed .jpg", lambda: b"this is not an image, just text\n" * 20, ".jpg", "not a file this app can read"),
    ("html renamed .png", lambda: b"<html><body>hello</body></html>", ".png", "not a file this app can read"),
    ("truncated PNG", lambda: png_bytes(colour_image((300, 300)))[:300], ".png", "truncated or corrupt"),
    ("truncated JPEG", lambda: jpeg_bytes(Image.effect_noise((300, 300), 50))[:2000], ".jpg", "truncated"),
    ("decompression bomb", lambda: bomb_png(), ".png", "limit"),
    ("over the pixel limit", lambda: bomb_png(8000, 8000), ".png", "megapixels"),
    ("extreme aspect ratio", lambda: png_bytes(colour_image((2000, 20))), ".png", "aspect ratio"),
]
