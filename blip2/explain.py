"""Where the Q-Former looks for a text: Grad-CAM heat maps over the image patches of a retrieval model.

LAVIS' recipe: attention x positive gradient, averaged over heads, summed over layers and queries, of a match score
with respect to the queries' cross-attention maps. Two scores are explained, each normalised, then added: the ITM
logit (the joint pass of queries and text) and the ITC similarity (the queries alone, best query). Where no gradient
reaches the maps (a quantized model), the plain cross-attention is used instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .modeling import Blip2ForImageTextRetrieval


def match_targets(model: Blip2ForImageTextRetrieval, states: torch.Tensor, ids: torch.Tensor,
                  mask: torch.Tensor) -> Iterator[tuple]:
    """The two match scores of one image and one text, each with the cross-attention maps it came through:
    (ITM match logit, maps of the joint pass), (ITC best-query cosine, maps of the queries-only pass).
    states (1, 1+N, D_v) vision hidden states; ids, mask (1, L) the text."""
    logits, joint = model.itm_logits(states, ids, mask, output_attentions=True)
    yield logits[0, 1], [m for m in joint.cross_attentions if m is not None]
    q = model.query_features(states, output_attentions=True)
    image = F.normalize(model.vision_projection(q.last_hidden_state.to(model.vision_projection.weight.dtype)), dim=-1)
    text, _ = model.itc_text_embeds(ids, mask)
    yield (image[0] @ text[0]).max(), [m for m in q.cross_attentions if m is not None]


def relevance_grid(model: Blip2ForImageTextRetrieval, states: torch.Tensor, ids: torch.Tensor,
                   mask: torch.Tensor) -> tuple[torch.Tensor, str]:
    """(side, side) relevance of each image patch for the text ([CLS] dropped), and the method: "Grad-CAM", or
    "cross-attention" where no gradient reaches the maps. Runs with autograd on whatever the caller's mode."""
    states = states.detach().clone()  # a tensor autograd may use (a cached one was made without autograd)
    cams, plain = [], []
    with torch.enable_grad():
        for target, maps in match_targets(model, states, ids, mask):
            plain.append(sum(m.detach().float().mean(1)[0] for m in maps))  # (Q, 1+N) per pass
            try:
                grads = torch.autograd.grad(target, maps, allow_unused=True)
            except RuntimeError:  # no graph to the maps
                continue
            cam = sum((m * g.clamp(min=0)).detach().float().mean(1)[0] for m, g in zip(maps, grads) if g is not None)
            if torch.is_tensor(cam) and float(cam[:, 1:].sum()) > 0:
                cams.append(cam[:, 1:].sum(0) / cam[:, 1:].sum())  # (N,) patches, normalised
    if cams:
        relevance, method = sum(cams), "Grad-CAM"
    else:
        relevance, method = sum(p[:, 1:].sum(0) for p in plain), "cross-attention"
    side = int(round(math.sqrt(relevance.numel())))
    if side * side != relevance.numel():
        raise ValueError(f"cannot lay {relevance.numel()} image patches out on a square grid")
    return relevance.reshape(side, side), method
