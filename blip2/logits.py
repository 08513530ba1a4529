"""The reference's logits processors, in the reference's order (warpers last, only when sampling): each is
(ids (N, T) every token so far, scores (N, V) fp32) -> scores; `logits_processors` builds a generate call's list once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .generation import GenerationConfig


@dataclass
class RepetitionPenalty:
    penalty: float
    skip: torch.Tensor | None  # (N,) leading ids not penalised (a decoder-only prompt's left padding), or None

    def __call__(self, ids, scores):
        (n, t), v = ids.shape, scores.shape[-1]
        ids_in = ids.clamp(max=v)  # column v collects what the penalty must not touch
        if self.skip is not None:
            ids_in = ids_in.masked_fill(torch.arange(t, device=ids.device) < self.skip[:, None], v)
        seen = torch.zeros(n, v + 1, dtype=torch.bool, device=ids.device).scatter_(1, ids_in, True)[:, :v]
        p = self.penalty
        return torch.where(seen, torch.where(scores < 0, scores * p, scores / p), scores)


@dataclass
class NoRepeatNGram:
    size: int

    def __call__(self, ids, scores):  # ban the tokens that would complete an n-gram seen before
        (n, t), v = ids.shape, scores.shape[-1]
        if t < self.size:
            return scores
        windows = ids.unfold(1, self.size, 1)  # (N, W, size)
        matches = (windows[..., :-1] == ids[:, t + 1 - self.size:][:, None]).all(-1)
        banned = torch.zeros(n, v + 1, dtype=torch.bool, device=ids.device)
        banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=v), v), True)
        return scores.masked_fill(banned[:, :v], -math.inf)


@dataclass
class BadWords:
    """The reference's NoBadWordsLogitsProcessor: a word's last id is banned where the ids so far end with the rest
    of it (always, for one-id words). EOS alone is never banned."""

    words: list  # lists of ids

    def __call__(self, ids, scores):
        banned = torch.zeros_like(scores, dtype=torch.bool)
        for word in self.words:
            *prefix, last = word
            if last >= scores.shape[-1] or len(prefix) > ids.shape[1]:
                continue
            hit = (ids[:, ids.shape[1] - len(prefix):] == ids.new_tensor(prefix)).all(1) if prefix else True
            banned[:, last] |= hit
        return scores.masked_fill(banned, -math.inf)


@dataclass
class RemoveInvalid:
    """The reference's InfNanRemoveLogitsProcessor."""

    def __call__(self, ids, scores):
        out = torch.where(scores != scores, 0.0, scores)
        out = torch.where(scores == math.inf, torch.finfo(scores.dtype).max, out)
        return torch.where(scores == -math.inf, torch.finfo(scores.dtype).min, out)


@dataclass
class MinLength:
    min_length: int  # EOS is banned while the rows hold fewer ids
    eos: torch.Tensor  # (E,)

    def __call__(self, ids, scores):
        if ids.shape[1] >= self.min_length:
            return scores
        return scores.masked_fill(torch.isin(torch.arange(scores.shape[-1], device=ids.device), self.eos), -math.inf)


@dataclass
class Temperature:
    temperature: float

    def __call__(self, ids, scores):
        return scores / self.temperature


@dataclass
class TopK:
    k: int
    keep: int  # the fewest tokens left

    def __call__(self, ids, scores):
        k = min(max(self.k, self.keep), scores.shape[-1])
        return scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1:], -math.inf)


@dataclass
class TopP:
    p: float
    keep: int

    def __call__(self, ids, scores):
        sorted_scores, order = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(-1).cumsum(-1) <= (1 - self.p)
        remove[..., -self.keep:] = False
        return scores.masked_fill(remove.scatter(1, order, remove), -math.inf)


def logits_processors(cfg: GenerationConfig, min_length: int, eos: torch.Tensor | None,
                      skip: torch.Tensor | None) -> list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The processors `cfg` asks for, in the reference's order (warpers last, only when sampling)."""
    out = []
    if cfg.repetition_penalty != 1.0:
        out.append(RepetitionPenalty(cfg.repetition_penalty, skip))
    if cfg.no_repeat_ngram_size:
        out.append(NoRepeatNGram(cfg.no_repeat_ngram_size))
    if cfg.bad_words_ids:
        eos_ids = set(eos.tolist()) if eos is not None else set()
        out.append(BadWords([list(w) for w in cfg.bad_words_ids if not (len(w) == 1 and w[0] in eos_ids)]))
    if eos is not None:
        out.append(MinLength(min_length, eos))
    if cfg.remove_invalid_values:
        out.append(RemoveInvalid())
    if cfg.do_sample:
        keep = (len(eos) + 1 if eos is not None else 2) if cfg.num_beams > 1 else 1  # beams keep room for EOS
        if cfg.temperature != 1.0:
            out.append(Temperature(cfg.temperature))
        if cfg.top_k:
            out.append(TopK(cfg.top_k, keep))
        if cfg.top_p < 1.0:
            out.append(TopP(cfg.top_p, keep))
    return out
