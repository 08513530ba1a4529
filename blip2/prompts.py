"""Prompts: the BLIP-2 paper's chat template, and fitting a prompt to a language model's context (a pure function
over token ids and limits): over-long prompts lose their oldest chat turns first, then max_new_tokens is lowered to
what a decoder's positions leave, and last the text is cut from the left."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .generation import DEFAULT_NEW_TOKENS

History = Sequence[tuple[str, str]]  # a chat's past turns: (question, answer), oldest first
MIN_ANSWER_TOKENS = 8  # the fewest new tokens an over-long prompt leaves a decoder before the prompt is cut


def chat_turn(question: str, answer: str) -> str:
    """One past turn: "Question: q Answer: a." (an answer that already ends in . ! or ? keeps its own stop)."""
    answer = answer.strip()
    return f"Question: {question} Answer: {answer}{'' if answer.endswith(('.', '!', '?')) else '.'}"


def chat_prompt(question: str, history: History = (), short_answer: bool = False) -> str:
    """The BLIP-2 paper's VQA template over a chat: a `chat_turn` per past (q, a), then "Question: q Answer:", or
    "Question: q Short answer:" for Flan-T5 (`short_answer`) as the paper prompts it. The app and the CLI both
    build their prompts here."""
    turns = [chat_turn(q, a) for q, a in history]
    return " ".join(turns + [f"Question: {question} {'Short answer' if short_answer else 'Answer'}:"])


def chat_texts(question: str, history: History, short_answer: bool = False) -> list[str]:
    """The chat prompt with all past turns, then without the oldest ones (candidates for `fit`, first first)."""
    history = list(history)
    return [chat_prompt(question, history[i:], short_answer) for i in range(len(history) + 1)]


@dataclass
class Prompt:
    """A prompt fitted to the language model's context (`fit`)."""

    text: str  # the prompt text used
    ids: list  # its plain-text token ids
    dropped_turns: int  # oldest chat turns left out to fit
    cut: bool  # the text was cut from the left to fit
    max_new_tokens: int  # new tokens allowed (lowered to what a decoder's positions leave)

    @property
    def truncated(self) -> bool:
        return self.dropped_turns > 0 or self.cut


@dataclass(frozen=True)
class Limits:
    """What a language model leaves a prompt: at most `text` ids (the tokenizer's model_max_length) and, for a
    decoder, `positions` for the prompt's ids and the new tokens together (its positions less the image's query
    tokens); None for an encoder-decoder, whose new tokens take no prompt positions."""

    text: int
    positions: int | None = None

    def text_limit(self, new_tokens: int) -> int:
        """Prompt ids that leave `new_tokens` positions."""
        return self.text if self.positions is None else min(self.text, self.positions - new_tokens)


@dataclass(frozen=True)
class Fitted:
    index: int  # the candidate used (= the oldest chat turns dropped)
    ids: list  # its ids, cut from the left when `cut`
    cut: bool
    max_new_tokens: int


def fit(candidates: Iterable[list[int]], special: list[int], limits: Limits, max_new_tokens: int) -> Fitted:
    """The first of `candidates` (prompt ids, oldest chat turns dropped a step at a time) that fits with
    `max_new_tokens`; else, for a decoder, the last one with max_new_tokens lowered to what it leaves (at least
    MIN_ANSWER_TOKENS); else the last one cut from the left (`special`: the ids of the empty text, kept). ValueError
    when max_new_tokens leaves no room for a prompt at all."""
    for index, ids in enumerate(candidates):
        if len(ids) <= limits.text_limit(max_new_tokens):
            return Fitted(index, ids, False, max_new_tokens)
    keep = max_new_tokens if limits.positions is None else min(max_new_tokens, MIN_ANSWER_TOKENS)
    limit = limits.text_limit(keep)
    if limit < 1:
        raise ValueError(f"max_new_tokens={keep} leaves no room for a prompt in the language model's "
                         f"{limits.positions} positions after the image tokens")
    cut = len(ids) > limit
    ids = truncate_left(ids, special, limit) if cut else ids
    new_tokens = max_new_tokens if limits.positions is None else min(max_new_tokens, limits.positions - len(ids))
    return Fitted(index, ids, cut, new_tokens)


def truncate_left(ids: list[int], special: list[int], limit: int) -> list[int]:
    """Keep the special tokens the template added (`special` = ids of the empty text, in front of the text or
    after it) and the last text tokens, `limit` ids in all."""
    if len(ids) <= limit:
        return ids
    head = len(special) if ids[:len(special)] == special else 0
    tail = len(special) - head
    keep = max(limit - len(special), 0)
    return ids[:head] + ids[len(ids) - tail - keep:len(ids) - tail] + ids[len(ids) - tail:]


def lowered(decoding: dict, max_new_tokens: int) -> dict:
    """`decoding` with max_new_tokens (and min_new_tokens) at most `max_new_tokens`."""
    if max_new_tokens >= (decoding.get("max_new_tokens") or DEFAULT_NEW_TOKENS):
        return decoding
    decoding = decoding | {"max_new_tokens": max_new_tokens}
    if decoding.get("min_new_tokens") is not None:
        decoding["min_new_tokens"] = min(decoding["min_new_tokens"], max_new_tokens)
    return decoding
