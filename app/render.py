"""Rendering of results: the heat map's colours and overlay, the Matching and Search tabs' tables and charts."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

_INFERNO = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                     [250, 193, 39], [252, 255, 164]], dtype=np.float64)


def colorize(values: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 with an inferno-like colour map."""
    x = np.clip(values, 0, 1) * (len(_INFERNO) - 1)
    i = np.clip(np.floor(x).astype(int), 0, len(_INFERNO) - 2)
    t = (x - i)[..., None]
    return np.round(_INFERNO[i] * (1 - t) + _INFERNO[i + 1] * t).astype(np.uint8)


def overlay_heatmap(image: Image.Image, grid: np.ndarray, alpha: float = 0.55, max_side: int = 512) -> Image.Image:
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


# ----------------------------------------------------------------------------------------------------
# tables and charts

MATCH_COLUMNS = ["rank", "text", "ITM probability", "ITC cosine"]


def match_table(rows: list) -> pd.DataFrame:
    """The Matching tab's ranking table."""
    return pd.DataFrame([[i, r.text, round(r.itm, 4), round(r.itc, 4)] for i, r in enumerate(rows, 1)],
                        columns=MATCH_COLUMNS)


def match_chart(rows: list) -> pd.DataFrame:
    """Bar chart data of both measures, one bar per text labelled by its rank ("# 1", "# 2", ... padded so the
    chart's alphabetical order is the ranking); the full text shows on hover and in the table."""
    width = len(str(len(rows)))
    return pd.DataFrame({"rank": [f"#{i:>{width}}" for i in range(1, len(rows) + 1)],
                         "text": [r.text for r in rows], "ITM probability": [r.itm for r in rows],
                         "ITC cosine": [r.itc for r in rows]})


SEARCH_COLUMNS = ["rank", "image", "ITM probability", "ITC cosine"]
NOT_RERANKED = "not re-ranked"  # the ITM cell of an image below the re-rank depth (ranked by ITC alone)


def ranked_results(hits: list[tuple]) -> tuple[list, pd.DataFrame]:
    """(image, name, ITC, ITM or None[, caption]) best first -> gallery items captioned with rank, ITM (or "not
    re-ranked") and ITC, and the score table."""
    items, rows = [], []
    for rank, (image, name, itc, itm, *caption) in enumerate(hits, 1):
        itm_text = NOT_RERANKED if itm is None else f"ITM {itm:.2f}"
        items.append((image, " · ".join([f"#{rank}", itm_text, f"ITC {itc:.2f}", *[c for c in caption if c]])))
        rows.append([rank, name, NOT_RERANKED if itm is None else round(itm, 4), round(itc, 4)])
    return items, pd.DataFrame(rows, columns=SEARCH_COLUMNS)
