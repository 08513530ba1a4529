"""The one image loader of the library and the app: accepted formats only, EXIF-upright, RGB; and content keys.

The app adds its limits (file size, pixels, aspect ratio, upload gate) around `open_image` / `upright_rgb`; the CLI
and the runner call `load_image`.
"""

import hashlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG opens a camera's multi-picture (MPO) too
FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"


def open_image(source: str | os.PathLike | bytes) -> Image.Image:
    """A lazily opened image file (a path or its bytes) of an accepted format: only its header is read, so its
    size can be checked before any pixel is decoded. Raises PIL's UnidentifiedImageError for anything else."""
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    return Image.open(fp, formats=ACCEPTED_FORMATS)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: transparency composited onto white; 16-bit and float images rescaled to 8 bits."""
    mode = im.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64)
        if a.ndim == 3:
            a = a[..., 0]
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode == "F" and lo >= 0 and hi <= 1:
            a = a * 255
        elif mode.startswith("I;16") or (lo >= 0 and 255 < hi <= 65535):
            a = a / 257  # 16-bit grey levels
        elif not (lo >= 0 and hi <= 255):
            a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
        mode = "L"
    has_alpha = "A" in im.getbands() or "a" in im.getbands() or im.info.get("transparency") is not None
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return im
    try:
        return im.convert("RGB")
    except (ValueError, OSError):  # modes PIL cannot convert directly (LAB, HSV...): through their raw bands
        return Image.merge("RGB", [b.convert("L") for b in im.split()[:3]]) if len(im.getbands()) >= 3 \
            else im.getchannel(0).convert("RGB")


def upright_rgb(im: Image.Image) -> tuple[Image.Image, bool]:
    """A loaded image turned upright by its EXIF orientation, in RGB -> (image, whether the EXIF block was
    readable: a broken one leaves the image as stored)."""
    try:
        im, readable = ImageOps.exif_transpose(im), True
    except Exception:  # a broken EXIF block
        readable = False
    return to_rgb(im), readable


def load_image(image: "Image.Image | str | os.PathLike | np.ndarray") -> Image.Image:
    """An RGB PIL image from a PIL image, an image file's path or an (H, W[, C]) uint8 array; files are
    EXIF-upright and their first frame is used."""
    if isinstance(image, (str, os.PathLike)):
        with open_image(image) as im:
            im.load()
            return upright_rgb(im)[0]
    if isinstance(image, np.ndarray):
        return to_rgb(Image.fromarray(image))
    if isinstance(image, Image.Image):
        return to_rgb(image)
    raise TypeError(f"an image must be a PIL image, a file path or an array, got {type(image).__name__}")


def image_key(image: Image.Image) -> str:
    """Content hash of a PIL image (pixels, size and mode)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Keyed:
    """An image whose content key is known (e.g. its file's digest): `load` runs only on a cache miss."""

    key: str
    load: Callable[[], Image.Image]


ImageLike = Keyed | Image.Image | str | os.PathLike | np.ndarray  # what the runner's methods take as an image


def keyed(image: ImageLike) -> Keyed:
    """Any image the runner accepts -> Keyed (a loaded one is hashed by its pixels)."""
    if isinstance(image, Keyed):
        return image
    im = load_image(image)
    return Keyed(image_key(im), lambda: im)


def unkeyed(image: ImageLike) -> Image.Image:
    """The RGB pixels of any image the runner accepts, without hashing them (for work that caches nothing)."""
    return image.load() if isinstance(image, Keyed) else load_image(image)
