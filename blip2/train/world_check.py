"""How often the world rule (blip2.world_check) errs: world scenes of the test split flagged, photographs that
scikit-image ships passed. A development report: `python -m blip2.train.world_check [--n 1000]` (the README has the
figures)."""

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from blip2.train.world import make_split
from blip2.world_check import GREY_AREA, GREY_SPREAD, THRESHOLD, coverage_of, parts_of, score_of

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
    parts = parts_of(image)
    score = score_of(parts)
    return (f"{kind:13s} {name:44s} {'x'.join(map(str, image.size)):>9s} {coverage_of(parts):8.3f} "
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
            parts = [parts_of(im) for im in images]
            scores = np.array([score_of(p) for p in parts])
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
    parts = [parts_of(im) for im in faces.values()]
    scores = [score_of(p) for p in parts]
    print(f"{'photo':13s} {f'lfw_subset ({len(faces)} face crops)':44s} {'25x25':>9s} "
          f"{max(map(coverage_of, parts)):8.3f} {max(p['coloured'] for p in parts):8.3f} {max(scores):6.3f}  "
          f"flagged {sum(s < THRESHOLD for s in scores)}/{len(faces)} (maxima shown)")
    for name, image in skimage_images(SKIMAGE_OTHERS).items():
        print(_row("not a photo", f"{name} ({SKIMAGE_OTHERS[name]})", image))
    gif = Image.open(Path(data.data_dir) / "no_time_for_that_tiny.gif")  # frame 0 of a 14 x 25 px video
    print(_row("left out", "no_time_for_that_tiny.gif (I/O test video)", gif))
    for name, image in example_images("scene_*.png").items():
        print(_row("world example", name, image))


if __name__ == "__main__":
    main()
