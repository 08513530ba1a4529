"""BLIP-2 tasks for the CLI and the app: captions, visual question answering over a chat, image-text matching and
embeddings (blip2/retrieval.py), reusing work across calls.

Reuse (the results equal a fresh computation):
* image features, keyed by a hash of the image content, in an LRU bounded in bytes: the language-model-ready query
  embeddings (the vision tower and Q-Former run once per image), the retrieval model's patch embeddings and ITC
  embeddings, and the ITC embeddings of texts;
* for a decoder-only (OPT) language model, the KV cache of the last prompt (and answer) computed on an image: a new
  prompt that starts with the same token ids only computes its new tokens (a chat's next turn).
Context fitting happens here only (`fit`): over-long prompts lose their oldest chat turns first, then
max_new_tokens is lowered to what the positions leave, and last the text is cut from the left; the
result says what was done (`dropped_turns`, `truncated`, `max_new_tokens`). Special-token strings in user text (a
literal "<image>", "</s>") are plain text. Generation stops between tokens when a `stop` callback raises.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .generation import DEFAULT_NEW_TOKENS, Decoding, text_pieces
from .images import ImageLike, keyed
from .retrieval import ByteLRU, Retriever, encode_plain

if TYPE_CHECKING:
    from .modeling import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval
    from .processing import Blip2Processor

# The demo's decoding defaults, shared by the app and the CLI: a caption gets room to finish its phrase, an answer
# is short; at least one new token, so an image never gets an empty text.
CAPTION_DECODING = {"max_new_tokens": 30, "min_new_tokens": 1}
ANSWER_DECODING = {"max_new_tokens": 20, "min_new_tokens": 1}
History = Sequence[tuple[str, str]]  # a chat's past turns: (question, answer), oldest first
MIN_ANSWER_TOKENS = 8  # the fewest new tokens an over-long prompt leaves a decoder before the prompt is cut


def truncate_left(ids: list[int], special: list[int], limit: int) -> list[int]:
    """Keep the special tokens the template added (`special` = ids of the empty text, in front of the text or
    after it) and the last text tokens, `limit` ids in all."""
    if len(ids) <= limit:
        return ids
    head = len(special) if ids[:len(special)] == special else 0
    tail = len(special) - head
    keep = max(limit - len(special), 0)
    return ids[:head] + ids[len(ids) - tail - keep:len(ids) - tail] + ids[len(ids) - tail:]


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


@dataclass
class Prompt:
    """A prompt fitted to the language model's context (`Blip2Runner.fit`)."""

    text: str  # the prompt text used
    ids: list  # its plain-text token ids
    dropped_turns: int  # oldest chat turns left out to fit
    cut: bool  # the text was cut from the left to fit
    max_new_tokens: int  # new tokens allowed (lowered to what a decoder's positions leave)

    @property
    def truncated(self) -> bool:
        return self.dropped_turns > 0 or self.cut


@dataclass
class Generated:
    text: str  # the first (best) sequence
    texts: list  # every returned sequence (num_return_sequences)
    prompt: str  # the prompt text used (after fitting)
    truncated: bool  # the prompt lost its oldest text (turns, or words cut from the left) to fit the model
    dropped_turns: int = 0  # oldest chat turns left out
    max_new_tokens: int | None = None  # the new tokens allowed after fitting


class TextStream:
    """Iterating yields the answer's text pieces as they are generated (and runs the decoding); the fitting
    (`prompt`, `truncated`, `dropped_turns`, `max_new_tokens`) is known before, `text` holds what has come so far.
    `close()` stops the decoding (a client that went away)."""

    def __init__(self, pieces: Iterator[str], fit: Prompt):
        self.pieces, self.text = pieces, ""
        self.prompt, self.truncated = fit.text, fit.truncated
        self.dropped_turns, self.max_new_tokens = fit.dropped_turns, fit.max_new_tokens

    def __iter__(self) -> Iterator[str]:
        for piece in self.pieces:
            self.text += piece
            yield piece

    def close(self) -> None:
        self.pieces.close()


def lowered(decoding: dict, max_new_tokens: int) -> dict:
    """`decoding` with max_new_tokens (and min_new_tokens) at most `max_new_tokens`."""
    if max_new_tokens >= (decoding.get("max_new_tokens") or DEFAULT_NEW_TOKENS):
        return decoding
    decoding = decoding | {"max_new_tokens": max_new_tokens}
    if decoding.get("min_new_tokens") is not None:
        decoding["min_new_tokens"] = min(decoding["min_new_tokens"], max_new_tokens)
    return decoding


class Blip2Runner(Retriever):
    """`model`: a Blip2ForConditionalGeneration with its `processor`; `itm_model`: a Blip2ForImageTextRetrieval
    with its `itm_processor` (matching, search, heat maps: blip2.retrieval.Retriever). Either pair may be None.
    `stats` counts cache hits."""

    def __init__(self, model: Blip2ForConditionalGeneration | None = None, processor: Blip2Processor | None = None,
                 itm_model: Blip2ForImageTextRetrieval | None = None, itm_processor: Blip2Processor | None = None,
                 image_cache_bytes: int = 256 * 2**20, prefix_cache_bytes: int = 256 * 2**20):
        super().__init__(itm_model, itm_processor, ByteLRU(image_cache_bytes), Counter())
        self.model, self.processor = model, processor
        self.prefixes = ByteLRU(prefix_cache_bytes)  # image key -> (token ids (T,) held, KVCache)

    def image_embeds(self, image: ImageLike) -> tuple[torch.Tensor, str]:
        """(1, Q, D_t) language-model-ready query embeddings of an image, cached by content; and the key."""
        image, m = keyed(image), self._generator()
        embeds = self._cached(("lm", image.key), lambda: m.get_image_features(
            self._pixels(m, self.processor, image.load())).pooler_output)
        return embeds, image.key

    def _generator(self):
        if self.model is None:
            raise ValueError("this runner has no captioning model")
        return self.model

    # ---- context fitting ---------------------------------------------------------------------------------

    @property
    def context_size(self) -> int:
        """Tokens the language model takes: a decoder's positions (image tokens, prompt and answer together), or
        an encoder-decoder's prompt length (the tokenizer's model_max_length, 512 when unset)."""
        cfg, tok = self._generator().config, self.processor.tokenizer
        if not cfg.is_encoder_decoder and getattr(cfg.text_config, "max_position_embeddings", None):
            return int(cfg.text_config.max_position_embeddings)
        return int(tok.model_max_length) if tok.model_max_length < 100_000 else 512

    def prompt_length(self, text: str) -> int:
        """Positions `text` takes in the language model, the image's query tokens included."""
        return len(encode_plain(self.processor.tokenizer, text)) + self._generator().config.num_query_tokens

    def fit(self, texts: Sequence[str], max_new_tokens: int) -> Prompt:
        """The first of `texts` (candidate prompts, oldest chat turns dropped a step at a time) that fits with
        `max_new_tokens`; else, for a decoder, the last one with max_new_tokens lowered to what it leaves
        (at least MIN_ANSWER_TOKENS); else the last one cut from the left. ValueError when max_new_tokens leaves
        no room for a prompt at all."""
        cfg, tok = self._generator().config, self.processor.tokenizer
        decoder = not cfg.is_encoder_decoder
        positions = self.context_size - cfg.num_query_tokens if decoder else None  # for prompt + new tokens

        def text_limit(new_tokens):  # prompt ids that leave `new_tokens` positions
            return min(tok.model_max_length, positions - new_tokens) if decoder else tok.model_max_length

        for dropped, text in enumerate(texts):
            ids = encode_plain(tok, text)
            if len(ids) <= text_limit(max_new_tokens):
                return Prompt(text, ids, dropped, False, max_new_tokens)
        keep = min(max_new_tokens, MIN_ANSWER_TOKENS) if decoder else max_new_tokens
        limit = text_limit(keep)
        if limit < 1:
            raise ValueError(f"max_new_tokens={keep} leaves no room for a prompt in the language model's "
                             f"{self.context_size} positions")
        cut = len(ids) > limit
        if cut:
            ids = truncate_left(ids, encode_plain(tok, ""), limit)
            text = tok.decode(ids, skip_special_tokens=True)
        new_tokens = min(max_new_tokens, positions - len(ids)) if decoder else max_new_tokens
        return Prompt(text, ids, dropped, cut, new_tokens)

    def _chat_texts(self, question: str, history: History) -> list[str]:
        """The chat prompt with all past turns, then without the oldest ones (to fit the context, first first)."""
        history, short = list(history), bool(self._generator().config.is_encoder_decoder)
        return [chat_prompt(question, history[i:], short) for i in range(len(history) + 1)]

    def fit_chat(self, question: str, history: History, max_new_tokens: int) -> Prompt:
        """The chat prompt `ask` uses for this question and history, fitted to the context (see `fit`)."""
        return self.fit(self._chat_texts(question, history), max_new_tokens)

    # ---- generation --------------------------------------------------------------------------------------

    def _prompt_tensor(self, fit: Prompt) -> torch.Tensor:
        """(1, T) ids: the image placeholders (absent in the legacy layout) and the prompt's."""
        cfg = self.model.config
        placeholders = [cfg.image_token_index] * cfg.num_query_tokens if cfg.image_token_index is not None else []
        return torch.tensor([placeholders + fit.ids], device=next(self.model.parameters()).device)

    def _fit_decoding(self, texts: Sequence[str], decoding: dict) -> tuple[Prompt, dict]:
        """The fitted prompt, and the decoding settings with max_new_tokens (and min_new_tokens) lowered to it."""
        fit = self.fit(texts, decoding.get("max_new_tokens") or DEFAULT_NEW_TOKENS)
        return fit, lowered(decoding, fit.max_new_tokens)

    def _start(self, image, texts, decoding: dict):
        """Everything before decoding: cached image embeddings, the fitted prompt, the reusable KV cache prefix."""
        image_embeds, key = self.image_embeds(image)
        fit, decoding = self._fit_decoding(texts, decoding)
        ids = self._prompt_tensor(fit)
        cache = self._reuse_prefix(key, ids[0]) if self._reuses_prefix else None
        with torch.no_grad():
            embeds, mask, input_ids = self.model.generation_inputs(input_ids=ids, image_embeds=image_embeds)
            run = Decoding(self.model.language_model, embeds, mask, input_ids, cache, **decoding)
        return run, key, fit

    @property
    def _reuses_prefix(self):
        """Only a decoder-only model whose prompt ids hold the image tokens has a KV cache per prompt id."""
        cfg = self.model.config
        return not cfg.is_encoder_decoder and cfg.image_token_index is not None

    def _reuse_prefix(self, key, ids):
        """A KV cache holding the longest common prefix of `ids` with what was last computed on this image (at
        least one prompt token is left to compute), or None."""
        held = self.prefixes.pop(key)
        if held is None:
            return None
        old, cache = held
        n = min(len(old), len(ids) - 1)
        same = (old[:n] == ids[:n]).long().cumprod(0).sum().item()
        if same == 0:
            return None
        cache.crop(same)
        self.stats["prefix_hits"] += 1
        self.stats["prefix_tokens_reused"] += same
        return cache

    def _keep_prefix(self, key, run):
        """Keep the cache for the next prompt on this image: with one decoding row it holds the prompt and the
        answer so far, otherwise (beams, samples) the prompt only."""
        cache, n = run.model.cache, run.prompt.shape[1]
        if not self._reuses_prefix or cache.length < n:
            return
        if cache.k[0].shape[0] == 1 and run.sequences is not None:
            held = run.sequences[0, :cache.length]
        else:
            cache.crop(n)
            if cache.k[0].shape[0] > 1:
                cache.reorder(torch.zeros(1, dtype=torch.long, device=run.prompt.device))
            held = run.prompt[0]
        self.prefixes.put(key, (held.clone(), cache))

    def _decode_texts(self, run):
        new = run.sequences[:, run.prompt.shape[1]:]
        return self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)

    def _generate(self, image, texts, decoding: dict) -> Generated:
        run, key, fit = self._start(image, texts, decoding)
        with torch.no_grad():
            run.run()
        self._keep_prefix(key, run)
        out = [t.strip() for t in self._decode_texts(run)]
        return Generated(out[0], out, fit.text, fit.truncated, fit.dropped_turns, fit.max_new_tokens)

    def _stream(self, image, texts, decoding: dict) -> TextStream:
        run, key, fit = self._start(image, texts, decoding)
        raw = text_pieces(run, self.processor.tokenizer)

        def pieces():  # "".join(pieces) == the stripped text that `ask` returns
            pending, started = "", False
            try:
                for piece in raw:
                    piece = pending + piece if started else piece.lstrip()
                    body = piece.rstrip()
                    pending = piece[len(body):]
                    if body:
                        started = True
                        yield body
            finally:  # also when the consumer stops early
                raw.close()
                self._keep_prefix(key, run)

        return TextStream(pieces(), fit)

    def caption(self, image: ImageLike, prompt: str = "", **decoding) -> Generated:
        """Describe an image (optionally continuing `prompt`). `decoding`: generate's settings (`stop`: a callback
        run between tokens that ends the decoding by raising)."""
        return self._generate(image, [prompt], decoding)

    def caption_batch(self, images: Sequence[ImageLike], prompt: str | list[str] = "", **decoding) -> list[Generated]:
        """Describe several images at once: one vision pass for the batch, then the language model over every
        prompt left-padded to the longest. Greedy decoding and beam search give what `caption` gives each image
        alone; sampling draws the whole batch from one generator. Returns one Generated per image."""
        self._generator()
        images = [keyed(i).load() for i in images]
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not images:
            return []
        m, new_tokens = self.model, decoding.get("max_new_tokens") or DEFAULT_NEW_TOKENS
        fits = [self.fit([p], new_tokens) for p in prompts]
        decoding = lowered(decoding, min(f.max_new_tokens for f in fits))  # the batch shares one length
        rows = [self._prompt_tensor(f) for f in fits]  # (1, T_i) each
        width = max(r.shape[1] for r in rows)
        pad = self.processor.tokenizer.pad_token_id or 0
        ids = torch.cat([torch.nn.functional.pad(r, (width - r.shape[1], 0), value=pad) for r in rows])
        mask = torch.stack([torch.arange(width, device=ids.device) >= width - r.shape[1] for r in rows]).long()
        with torch.inference_mode():
            pixels = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
            embeds = m.get_image_features(pixels.to(ids.device)).pooler_output  # (B, Q, D_t)
            run = Decoding(m.language_model, *m.generation_inputs(input_ids=ids, attention_mask=mask,
                                                                  image_embeds=embeds), **decoding)
            run.run()
        texts, n = [t.strip() for t in self._decode_texts(run)], run.cfg.num_return_sequences  # (B * n,)
        return [Generated(texts[i * n], texts[i * n:(i + 1) * n], f.text, f.truncated, 0, f.max_new_tokens)
                for i, f in enumerate(fits)]

    def caption_stream(self, image: ImageLike, prompt: str = "", **decoding) -> TextStream:
        """`caption`, its text yielded piece by piece as it is generated."""
        return self._stream(image, [prompt], decoding)

    def ask(self, image: ImageLike, question: str, history: History = (), **decoding) -> Generated:
        """Answer a question about an image, given the chat so far (a list of (question, answer)); the oldest
        turns are left out when the prompt does not fit (`dropped_turns`)."""
        return self._generate(image, self._chat_texts(question, history), decoding)

    def ask_stream(self, image: ImageLike, question: str, history: History = (), **decoding) -> TextStream:
        """`ask`, its answer yielded piece by piece as it is generated."""
        return self._stream(image, self._chat_texts(question, history), decoding)
