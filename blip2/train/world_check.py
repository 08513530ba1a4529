"""Is an image inside the embedded model's world? A cheap image statistic of the world's renderer (world.py).

Every scene of the world, seen at the model's 224 px, is a smooth, low-saturation, mid-tone background
(plain, gradient, stripes or clouds, plus pixel noise) covering most of the image, with 1-3 flat objects of
the palette (world.RGB) covering at most ~16% of it, and it is in colour (the backgrounds carry a random
per-channel tint and per-channel noise). `world_likeness` is the fraction of the 224 px image explained by
that: pixels that are flat (within FLAT_TOL of their 5x5 mean in every channel) and either background-like
(channel spread < BG_SPREAD, mean in BG_LEVELS) or within PALETTE_TOL of a palette colour, the palette part
counted up to MAX_OBJECT_AREA of the image. Only shape edges stay unexplained, so world scenes score ~0.97.
A greyscale image (under GREY_AREA of its pixels with a channel spread over GREY_SPREAD) scores 0: the world is
never grey, and smooth grey photographs (the moon, a cell, a blurred clock) would otherwise look like its backgrounds.

What the rule means for mixed images: a photo with a world shape drawn on it stays flagged (the photo's
textured or coloured pixels are unexplained; chelsea with a big red disc scores 0.40); a world scene pasted
into a photo is in-world only when it covers nearly all of it (scenes centred on chelsea, astronaut and coffee:
88% of the area scores 0.83-0.89, flagged; 94% scores 0.89-0.93). Known blind spots: a blank world-like
background (no shapes) and a smooth low-saturation colour photo (fog, a plain tinted wall) count as in-world,
the statistic sees the background, not the objects; a colour-tinted copy of a smooth grey photo would too; and
so does a thumbnail-sized photo, blown up into smooth blobs (world scenes rendered at 32 px still score >= 0.94).

Measured with `python -m blip2.train.world_check --n 1000` (test split, seed 0), threshold 0.9:
- world scenes, 1000 each at 224 px PNG, 224 px JPEG q85, 512 px PNG, 512 px JPEG q85: 0 flagged in every set;
  lowest scores 0.938 / 0.937 / 0.948 / 0.945, 1st percentiles 0.946-0.955, medians 0.971-0.979; the least
  coloured scene still has 20% of its pixels over GREY_SPREAD (greyscale is under 1%). The six example scenes
  of assets/examples score 0.950-0.986.
- photographs, every one flagged: scikit-image's astronaut 0.444, chelsea 0.228, coffee 0.137, rocket 0.309,
  hubble_deep_field 0.203, immunohistochemistry 0.338, retina 0.200, stereo_motorcycle left/right 0.376/0.359,
  and the greyscale brick, camera, cell, clock, coins, grass, gravel, microaneurysms, moon, page (a scan),
  text and the 200 lfw_subset faces at 0 (by the greyscale rule: without it cell 0.994, clock 0.994,
  microaneurysms 1.000, moon 0.983 and some lfw faces 1.000 would pass); assets/examples astronaut.jpg 0.448,
  chelsea_cat.jpg 0.225, coffee.jpg 0.137, rocket.jpg 0.339. Not photographs, scored for information (all
  flagged): checkerboard, colorwheel, horse, logo, shepp_logan_phantom. Left out of the target: scikit-image's
  I/O test files multipage.tif (10x15 px, grey, flagged) and no_time_for_that_tiny.gif (24 frames of a video,
  14x25 px: the one photo-derived image NOT flagged, frame 0 scores 0.951, all frames 0.951-0.965), and the data
  sets it downloads on demand (not shipped, not available offline).
- speed: 3-4 ms per scene, 6 ms median and 12 ms at most per photo (retina 1411 px), min of 7 runs on a
  loaded 2-core CPU.
"""

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from blip2.train.world import RGB, make_split

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


def _parts(image: Image.Image) -> dict[str, float]:
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


def _score(parts: dict[str, float]) -> float:
    if parts["coloured"] < GREY_AREA:
        return 0.0
    return _coverage(parts)


def _coverage(parts: dict[str, float]) -> float:
    return parts["background"] + min(parts["palette"], MAX_OBJECT_AREA)


def world_likeness(image: Image.Image) -> float:
    """Fraction in [0, 1] of the image (at 224 px) that looks like the world's renders; 0 for a greyscale image."""
    return _score(_parts(image))


def in_world(image: Image.Image) -> bool:
    """Whether the embedded model's world could have rendered the image (world_likeness >= THRESHOLD)."""
    return world_likeness(image) >= THRESHOLD


# --- measurement: python -m blip2.train.world_check [--n 1000]

# scikit-image's shipped photographs (camera, microscope, telescope, scanner), by skimage.data function name
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
                  "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon", "page", "retina", "rocket",
                  "stereo_motorcycle", "text", "lfw_subset")
# shipped images that are not photographs (drawn or computed); scored for information only
SKIMAGE_OTHERS = {"checkerboard": "synthetic checkerboard", "colorwheel": "computed colour wheel",
                  "horse": "binary silhouette", "logo": "scikit-image logo (drawing)",
                  "shepp_logan_phantom": "computed CT phantom"}
EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"


def _to_image(array: np.ndarray) -> Image.Image:
    if array.dtype == bool or array.dtype.kind == "f":  # horse (bool), lfw and the phantom (floats in [0, 1])
        array = np.round(array.astype(np.float64) * 255)
    return Image.fromarray(array.astype(np.uint8)).convert("RGB")


def skimage_images(names) -> dict[str, Image.Image]:
    """name -> image for scikit-image's shipped data (a dev dependency); stereo_motorcycle gives its left and right
    views, lfw_subset its 200 face crops (25 x 25 px) as lfw_subset/0..199."""
    from skimage import data  # scikit-image: a dev dependency, needed by this report only (the app never calls it)

    images = {}
    for name in names:
        out = getattr(data, name)()
        if name == "stereo_motorcycle":
            images.update({"stereo_motorcycle/left": _to_image(out[0]), "stereo_motorcycle/right": _to_image(out[1])})
        elif name == "lfw_subset":
            images.update({f"lfw_subset/{i}": _to_image(face) for i, face in enumerate(out)})
        else:
            images[name] = _to_image(out)
    return images


def example_images(pattern: str) -> dict[str, Image.Image]:
    return {path.name: Image.open(path) for path in sorted(EXAMPLES.glob(pattern))}


def jpeg(image: Image.Image, quality: int = 85) -> Image.Image:
    """The image after a JPEG round trip (uploads are often JPEG)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _row(kind: str, name: str, image: Image.Image) -> str:
    parts = _parts(image)
    score = _score(parts)
    return (f"{kind:13s} {name:44s} {'x'.join(map(str, image.size)):>9s} {_coverage(parts):8.3f} "
            f"{parts['coloured']:8.3f} {score:6.3f}  {'in world' if score >= THRESHOLD else 'flagged'}")


def main():
    from skimage import data  # scikit-image: a dev dependency, needed by this report only

    parser = argparse.ArgumentParser(description="How often world_check flags world scenes and photographs.")
    parser.add_argument("--n", type=int, default=1000, help="test-split scenes")
    parser.add_argument("--seed", type=int, default=0, help="make_split seed")
    args = parser.parse_args()
    scenes = make_split("test", args.n, seed=args.seed)
    print(f"threshold {THRESHOLD}; world scenes: test split, n={args.n}, seed={args.seed} (target: <= 2% flagged)")
    print(f"{'render':16s} {'flagged':>12s} {'min score':>9s} {'1st pct':>8s} {'median':>7s} {'min coloured':>12s}")
    for size in (224, 512):
        renders = [scene.render(size) for scene in scenes]
        for kind, images in (("PNG", renders), ("JPEG q85", [jpeg(im) for im in renders])):
            parts = [_parts(im) for im in images]
            scores = np.array([_score(p) for p in parts])
            flagged = int((scores < THRESHOLD).sum())
            print(f"{f'{size} px {kind}':16s} {flagged:5d} ({100 * flagged / len(scores):4.1f}%) "
                  f"{scores.min():9.3f} {np.quantile(scores, 0.01):8.3f} {np.median(scores):7.3f} "
                  f"{min(p['coloured'] for p in parts):12.3f}")

    photos = {**skimage_images(SKIMAGE_PHOTOS), **example_images("*.jpg")}
    faces = {name: photos.pop(name) for name in list(photos) if name.startswith("lfw_subset/")}
    print("\nimages (target: every photo flagged)")
    print("(coverage: the score without the greyscale rule; coloured: fraction of pixels with a channel spread "
          f"over {GREY_SPREAD:g}, greyscale under {GREY_AREA:g})")
    print(f"{'kind':13s} {'image':44s} {'size':>9s} {'coverage':>8s} {'coloured':>8s} {'score':>6s}  verdict")
    for name, image in photos.items():
        print(_row("photo", name, image))
    parts = [_parts(im) for im in faces.values()]
    scores = [_score(p) for p in parts]
    print(f"{'photo':13s} {f'lfw_subset ({len(faces)} face crops)':44s} {'25x25':>9s} "
          f"{max(map(_coverage, parts)):8.3f} {max(p['coloured'] for p in parts):8.3f} {max(scores):6.3f}  "
          f"flagged {sum(s < THRESHOLD for s in scores)}/{len(faces)} (maxima shown)")
    for name, image in skimage_images(SKIMAGE_OTHERS).items():
        print(_row("not a photo", f"{name} ({SKIMAGE_OTHERS[name]})", image))
    gif = Image.open(Path(data.data_dir) / "no_time_for_that_tiny.gif")  # frame 0 of a 14 x 25 px video
    print(_row("left out", "no_time_for_that_tiny.gif (I/O test video)", gif))
    for name, image in example_images("scene_*.png").items():
        print(_row("world example", name, image))


if __name__ == "__main__":
    main()
