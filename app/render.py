"""Rendering of results: the heat map's colours and overlay."""

from __future__ import annotations

import numpy as np
from PIL import Image

_INFERNO = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                     [250, 193, 39], [252, 255, 164]], dtype=np.float64)


def colorize(values: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 with an inferno-like colour map."""
    x = np.clip(values, 0, 1) * (len(_INFERNO) - 1)
    i = np.clip(np.floor(x).astype(int), 0, len(_INFERNO) - 2)
    t = (x - i)[..., None]
    return np.round(_INFERNO[i] * (1 - t) + _INFERNO[i + 1] * t).astype(np.uint8)


def overlay_heatmap(image: Image.Image, grid: np.ndarray, alpha=0.55, max_side=512) -> Image.Image:
    """Blend a (h, w) relevance grid, stretched over the whole image as the model saw it, onto the image."""
    im = image.copy()
    im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    g = grid.astype(np.float64)
    g = g - g.min()
    g = g / g.max() if g.max() > 0 else g
    heat = Image.fromarray((g * 255).astype(np.uint8), "L").resize(im.size, Image.Resampling.BICUBIC)
    colored = Image.fromarray(colorize(np.asarray(heat, dtype=np.float64) / 255))
    weight = Image.fromarray((np.asarray(heat, dtype=np.float64) * alpha).astype(np.uint8), "L")
    return Image.composite(colored, im, weight)
