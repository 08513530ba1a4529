"""Beam search as the reference vectorises it: a BeamState and a step function over it (blip2.generation's Decoding
drives it, one language-model step at a time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .generation import GenerationConfig


@dataclass
class BeamState:
    """The reference's vectorised beam search for B prompts of n ids, k beams each, rows up to max_length."""

    running: torch.Tensor  # (B, k, max_length) the running beams' ids
    running_scores: torch.Tensor  # (B, k) their summed log-probabilities
    running_src: torch.Tensor  # (B, k, new) flat source row of each new token
    sequences: torch.Tensor  # (B, k, max_length) the best finished hypotheses
    scores_done: torch.Tensor  # (B, k) their length-normalised scores
    src_done: torch.Tensor  # (B, k, new)
    finished: torch.Tensor  # (B, k) bool: a hypothesis slot is filled
    improvable: torch.Tensor  # (B, 1) bool: a running beam can still beat the worst finished one

    @classmethod
    def start(cls, prompt: torch.Tensor, k: int, max_length: int, fill: int) -> "BeamState":
        (b, n), device = prompt.shape, prompt.device
        running = prompt.new_full((b, k, max_length), fill)
        running[:, :, :n] = prompt[:, None]
        running_scores = torch.zeros(b, k, device=device)
        running_scores[:, 1:] = -1e9  # only the first beam's continuations count at the first step
        src = torch.full((b, k, max_length - n), -1, dtype=torch.int32, device=device)
        finished = torch.zeros(b, k, dtype=torch.bool, device=device)
        return cls(running, running_scores, src, running.clone(), torch.full((b, k), -1e9, device=device), src.clone(),
                   finished, torch.ones(b, 1, dtype=torch.bool, device=device))


def beam_step(state: BeamState, log_probs: torch.Tensor, cur: int, n: int, max_length: int, cfg: GenerationConfig,
              eos: torch.Tensor | None, generator: torch.Generator | None) -> tuple[BeamState, torch.Tensor, bool]:
    """One step: keep the best `keep` continuations of all beams (log_probs (B*k, V), processed), run the best k
    unfinished ones on, and merge finished ones (score / new_length ** length_penalty) into the k best hypotheses.
    Returns the new state, the rows (B*k,) the stepper's cache must take, and whether the search is over."""
    s, k = state, cfg.num_beams
    b, v = s.running.shape[0], log_probs.shape[-1]
    keep = max(2, 1 + (0 if eos is None else len(eos))) * k
    log_probs = (log_probs.view(b, k, v) + s.running_scores[:, :, None]).view(b, k * v)
    if cfg.do_sample:
        pick = torch.multinomial(F.softmax(log_probs, dim=-1), keep, generator=generator)
        top_scores, order = log_probs.gather(1, pick).sort(dim=-1, descending=True)
        pick = pick.gather(1, order)
    else:
        top_scores, pick = torch.topk(log_probs, keep)  # (B, keep)
    beam = pick // v
    top_seq = _gather(s.running, beam)  # (B, keep, max_length)
    top_seq[:, :, cur] = pick % v
    top_src = _gather(s.running_src, beam)
    top_src[:, :, cur - n] = (beam + torch.arange(b, device=beam.device)[:, None] * k).int()
    hits = torch.full((b, keep), cur + 1 >= max_length, dtype=torch.bool, device=beam.device)
    if eos is not None:
        hits |= torch.isin(top_seq[:, :, cur], eos)
    # the best unfinished continuations run on
    run_scores = top_scores + hits.to(torch.float32) * -1.0e9
    nxt = torch.topk(run_scores, k)[1]
    running, running_scores, running_src = _gather(top_seq, nxt), _gather(run_scores, nxt), _gather(top_src, nxt)
    # finished continuations among the top k join the hypotheses if they score better
    just_done = hits & (torch.arange(keep, device=beam.device) < k)[None, :]
    done_scores = top_scores / ((cur + 1 - n) ** cfg.length_penalty)
    full = torch.all(s.finished, dim=-1, keepdim=True) & (cfg.early_stopping is True)
    done_scores += full.to(torch.float32) * -1.0e9
    done_scores += (~s.improvable).to(torch.float32) * -1.0e9
    done_scores += (~just_done) * -1.0e9
    merged = torch.topk(torch.cat((s.scores_done, done_scores), 1), k)[1]
    sequences = _gather(torch.cat((s.sequences, top_seq), 1), merged)
    scores_done = _gather(torch.cat((s.scores_done, done_scores), 1), merged)
    src_done = _gather(torch.cat((s.src_done, top_src), 1), merged)
    finished = _gather(torch.cat((s.finished, just_done), 1), merged)
    # can a running beam still beat the worst finished hypothesis?
    if cfg.early_stopping == "never" and cfg.length_penalty > 0.0:
        best_len = max_length - n
    else:
        best_len = cur + 1 - n
    best_running = running_scores[:, :1] / (best_len ** cfg.length_penalty)
    worst_done = torch.where(finished, torch.min(scores_done, dim=1, keepdim=True)[0], -1.0e9)
    improvable = s.improvable & torch.any(best_running > worst_done, dim=-1, keepdim=True)
    open_beams = ~(torch.all(finished) & (cfg.early_stopping is True))
    over = not bool(torch.any(improvable) & open_beams & ~torch.all(hits))
    state = BeamState(running, running_scores, running_src, sequences, scores_done, src_done, finished, improvable)
    return state, running_src[:, :, cur - n].flatten().long(), over


def beam_result(state: BeamState, n: int, r: int) -> torch.Tensor:
    """The r best hypotheses per prompt (B*r, n + longest new), as the reference returns them."""
    sequences, src = state.sequences[:, :r].flatten(0, 1), state.src_done[:, :r].flatten(0, 1)
    return sequences[:, :n + int((src + 1).bool().sum(1).max())]


def _gather(t, index):
    """Select along dim 1 (beams) per batch row: t (B, K, ...), index (B, J) -> (B, J, ...)."""
    return torch.take_along_dim(t, index.view(*index.shape, *[1] * (t.dim() - 2)), dim=1)
