"""Is an image inside the embedded model's world? A cheap image statistic of the world's renderer
(blip2/train/world.py); the app puts a caveat beside results on images outside it.

Every scene of the world, seen at the model's 224 px, is a smooth, low-saturation, mid-tone background
(plain, gradient, stripes or clouds, plus pixel noise) covering most of the image, with 1-3 flat objects of
the palette (RGB) covering at most ~16% of it, and it is in colour (the backgrounds carry a random
per-channel tint and per-channel noise). `world_likeness` is the fraction of the 224 px image explained by
that: pixels that are flat (within FLAT_TOL of their 5x5 mean in every channel) and either background-like
(channel spread < BG_SPREAD, mean in BG_LEVELS) or within PALETTE_TOL of a palette colour, the palette part
counted up to MAX_OBJECT_AREA of the image. Only shape edges stay unexplained, so world scenes score ~0.97.
A greyscale image (under GREY_AREA of its pixels with a channel spread over GREY_SPREAD) scores 0: the world is
never grey, and smooth grey photographs (the moon, a cell, a blurred clock) would otherwise look like its backgrounds.

What the rule means for mixed images: a photo with a world shape drawn on it stays flagged (the photo's
textured or coloured pixels are unexplained); a world scene pasted into a photo is in-world only when it covers
nearly all of it. Known blind spots: a blank world-like background (no shapes) and a smooth low-saturation colour
photo (fog, a plain tinted wall) count as in-world, the statistic sees the background, not the objects; a
colour-tinted copy of a smooth grey photo would too; and so does a thumbnail-sized photo, blown up into smooth
blobs.

How often it errs (scenes flagged, photographs passed): `python -m blip2.train.world_check --n 1000`; the
figures are in the README.
"""

import numpy as np
from PIL import Image

# the embedded model's world palette: colour name -> RGB (its renderer, blip2.train.world, draws with it)
RGB = {
    "red": (220, 35, 35), "orange": (250, 135, 15), "yellow": (250, 225, 30), "green": (30, 165, 55),
    "blue": (35, 80, 225), "purple": (135, 50, 190), "white": (248, 248, 248), "black": (20, 20, 20),
}
SIZE = 224  # the side the model sees (the processor resizes every image to 224 x 224, bicubic)
FLAT_WINDOW = 5  # side of the box whose mean a flat pixel is close to
FLAT_TOL = 12.0  # max |pixel - box mean| over channels; the renderer's noise (std 4) stays under it
BG_SPREAD = 45.0  # background channel spread: per-channel tint (+-14) and noise, with margin
BG_LEVELS = (45.0, 230.0)  # background mean level: grey 100..170, tint, clouds +-18, stripes +-12, with margin
PALETTE = np.array(list(RGB.values()), np.float32)  # (8, 3)
PALETTE_TOL = 32.0  # max channel distance to a palette colour: jitter +-12 and noise, with margin
MAX_OBJECT_AREA = 0.2  # 3 large circles cover at most ~0.16 of the image
GREY_SPREAD = 2.0  # channel spread of a greyscale pixel, JPEG rounding included
GREY_AREA = 0.01  # an image with fewer pixels than this over GREY_SPREAD is greyscale
THRESHOLD = 0.9


def _at_model_size(image: Image.Image) -> np.ndarray:
    """(SIZE, SIZE, 3) float32 RGB, squashed like the processor; big images are first box-reduced (fast)."""
    image = image.convert("RGB")
    factor = min(image.size) // (2 * SIZE)
    if factor >= 2:
        image = image.reduce(factor)
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.BICUBIC)
    return np.asarray(image, np.float32)


def _box_mean(x: np.ndarray, k: int) -> np.ndarray:
    """Mean over the k x k window around every pixel of x (H, W, C), edges replicated."""
    h, w = x.shape[:2]
    c = np.pad(x, ((k // 2, k // 2), (k // 2, k // 2), (0, 0)), mode="edge").cumsum(0).cumsum(1)
    c = np.pad(c, ((1, 0), (1, 0), (0, 0)))  # c[i, j] = sum of the first i rows and j columns
    return (c[k:k + h, k:k + w] - c[:h, k:k + w] - c[k:k + h, :w] + c[:h, :w]) / (k * k)


def parts_of(image: Image.Image) -> dict[str, float]:
    """Fractions of the 224 px image: background-like, palette-like (flat, not background), coloured pixels."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    x = _at_model_size(image)  # (224, 224, 3)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)  # (224, 224)
    flat = (np.abs(x - _box_mean(x, FLAT_WINDOW)) < FLAT_TOL).all(-1)
    level = (r + g + b) / 3
    background = flat & (spread < BG_SPREAD) & (level > BG_LEVELS[0]) & (level < BG_LEVELS[1])
    rest = x[flat & ~background]  # (N, 3)
    palette = np.zeros(len(rest), bool)
    for rgb in PALETTE:
        palette |= (np.abs(rest - rgb) < PALETTE_TOL).all(-1)
    return {"background": float(background.mean()), "palette": float(palette.sum() / spread.size),
            "coloured": float((spread > GREY_SPREAD).mean())}


def score_of(parts: dict[str, float]) -> float:
    if parts["coloured"] < GREY_AREA:
        return 0.0
    return coverage_of(parts)


def coverage_of(parts: dict[str, float]) -> float:
    return parts["background"] + min(parts["palette"], MAX_OBJECT_AREA)


def world_likeness(image: Image.Image) -> float:
    """Fraction in [0, 1] of the image (at 224 px) that looks like the world's renders; 0 for a greyscale image."""
    return score_of(parts_of(image))


def in_world(image: Image.Image) -> bool:
    """Whether the embedded model's world could have rendered the image (world_likeness >= THRESHOLD)."""
    return world_likeness(image) >= THRESHOLD
