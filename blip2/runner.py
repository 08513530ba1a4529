"""BLIP-2 tasks for the CLI and the app: a Captioner (captions, visual question answering over a chat, streams,
batches) and a Retriever (image-text matching and embeddings, blip2/retrieval.py) over one content-keyed
FeatureCache; `Blip2Runner` holds the two.

Reuse (the results equal a fresh computation):
* image features, keyed by a hash of the image content, in an LRU bounded in bytes: the language-model-ready query
  embeddings (the vision tower and Q-Former run once per image), the retrieval model's patch embeddings and ITC
  embeddings, and the ITC embeddings of texts;
* for a decoder-only (OPT) language model, the KV cache of the last prompt (and answer) computed on an image
  (PrefixCache): a new prompt that starts with the same token ids only computes its new tokens (a chat's next turn).
Prompts are fitted to the context by blip2.prompts.fit; the result says what was done (`dropped_turns`, `truncated`,
`max_new_tokens`). Special-token strings in user text (a literal "<image>", "</s>") are plain text. Generation stops
between tokens when a `stop` callback raises.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .cache import ByteLRU, FeatureCache, KVCache
from .generation import DEFAULT_NEW_TOKENS, Decoding, text_pieces
from .images import ImageLike, keyed, unkeyed
from .prompts import History, Limits, Prompt, chat_texts, fit, lowered
from .retrieval import Match, Ranked, Retriever, pixel_values
from .scheduler import Closed, Scheduler

if TYPE_CHECKING:
    from .modeling import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval
    from .processing import Blip2Processor

@dataclass
class Generated:
    text: str  # the first (best) sequence
    texts: list  # every returned sequence (num_return_sequences)
    fitted: Prompt  # the prompt used, as fitted to the context

    @property
    def prompt(self) -> str:  # the prompt text used (after fitting)
        return self.fitted.text

    @property
    def truncated(self) -> bool:  # the prompt lost its oldest text (turns, or words cut from the left) to fit
        return self.fitted.truncated

    @property
    def dropped_turns(self) -> int:  # oldest chat turns left out
        return self.fitted.dropped_turns

    @property
    def max_new_tokens(self) -> int:  # the new tokens allowed after fitting
        return self.fitted.max_new_tokens


class TextStream(Generated):
    """A Generated that comes piece by piece: iterating yields the answer's text pieces as they are generated (and
    runs the decoding); the fitting (`prompt`, `truncated`, `dropped_turns`, `max_new_tokens`) is known before,
    `text` holds what has come so far (`texts` the whole text once done). `close()` stops the decoding (a client that
    went away)."""

    def __init__(self, pieces: Iterator[str], fitted: Prompt):
        super().__init__("", [], fitted)
        self.pieces = pieces

    def __iter__(self) -> Iterator[str]:
        for piece in self.pieces:
            self.text += piece
            yield piece
        self.texts = [self.text]

    def close(self) -> None:
        self.pieces.close()


def in_thread(items: Iterator[str], closed: threading.Event) -> Iterator[str]:
    """`items`, produced in a thread of their own from the first `next()` on, so that a slow consumer never holds up
    the batch; closing this iterator sets `closed` (the producer stops at its next check). The producer's error is
    raised here."""
    handed: queue.Queue = queue.Queue()
    done = object()

    def produce():
        try:
            for item in items:
                handed.put(item)
            handed.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            handed.put(e)

    threading.Thread(target=produce, name="blip2-stream", daemon=True).start()
    try:
        while (item := handed.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        closed.set()


class PrefixCache:
    """Per image, the KV cache of the last prompt (and answer) a decoder computed on it, with the ids it holds; a
    later prompt on the image that starts with the same ids takes it and computes only the rest."""

    def __init__(self, max_bytes: int, stats: Counter):
        self.held = ByteLRU(max_bytes)  # image key -> (ids (T,), KVCache)
        self.stats = stats

    def take(self, key: str, ids: torch.Tensor) -> KVCache | None:
        """A copy of the KV cache holding the longest common prefix of `ids` (T,) with what was kept for this image
        (at least one id is left to compute), or None. What is kept stays for other prompts on the image (several
        visitors asking about one image at once)."""
        held = self.held.get(key)
        if held is None:
            return None
        old, cache = held
        n = min(len(old), len(ids) - 1, cache.length)
        same = (old[:n] == ids[:n]).long().cumprod(0).sum().item()
        if same == 0:
            return None
        self.stats["prefix_hits"] += 1
        self.stats["prefix_tokens_reused"] += same
        return cache.prefix(same)

    def keep(self, key: str, run: Decoding) -> None:
        """Keep what `run` leaves reusable (Decoding.reusable) for the next prompt on this image."""
        reusable = run.reusable()
        if reusable is not None:
            self.held.put(key, reusable)


class Captioner:
    """Captions and chat answers over `model` (a Blip2ForConditionalGeneration) with its `processor`; the image's
    query embeddings kept in `features`, a decoder's prompt caches in `prefixes`."""

    def __init__(self, model: Blip2ForConditionalGeneration, processor: Blip2Processor, features: FeatureCache,
                 prefixes: PrefixCache):
        self.model, self.processor, self.features, self.prefixes = model, processor, features, prefixes
        self.scheduler = Scheduler(model.language_model, lambda pixels: model.get_image_features(pixels).pooler_output)
        cfg = model.config
        # only a decoder-only model whose prompt ids hold the image tokens has a KV cache per prompt id
        self.reuses_prefix = not cfg.is_encoder_decoder and cfg.image_token_index is not None

    def image_embeds(self, image: ImageLike) -> tuple[torch.Tensor, str]:
        """(1, Q, D_t) language-model-ready query embeddings of an image, cached by content; and the key."""
        image, m = keyed(image), self.model
        embeds = self.features.get(("lm", image.key), lambda: self.scheduler.encode(
            pixel_values(m, self.processor, image.load())))
        return embeds, image.key

    # ---- context fitting ---------------------------------------------------------------------------------

    @property
    def context_size(self) -> int:
        """Tokens the language model takes: a decoder's positions (image tokens, prompt and answer together), or
        an encoder-decoder's prompt length (the tokenizer's model_max_length, 512 when unset)."""
        cfg, tok = self.model.config, self.processor.tokenizer
        if not cfg.is_encoder_decoder and getattr(cfg.text_config, "max_position_embeddings", None):
            return int(cfg.text_config.max_position_embeddings)
        return int(tok.model_max_length) if tok.model_max_length < 100_000 else 512

    def prompt(self, texts: Sequence[str], max_new_tokens: int) -> Prompt:
        """The first of `texts` (candidate prompts, oldest chat turns dropped a step at a time) fitted to the
        context with `max_new_tokens` (blip2.prompts.fit)."""
        cfg, tok = self.model.config, self.processor.tokenizer
        positions = None if cfg.is_encoder_decoder else self.context_size - cfg.num_query_tokens
        limits = Limits(tok.model_max_length, positions)
        done = fit((tok.encode_plain(t) for t in texts), tok.encode_plain(""), limits, max_new_tokens)
        text = tok.decode(done.ids, skip_special_tokens=True) if done.cut else texts[done.index]
        return Prompt(text, done.ids, done.index, done.cut, done.max_new_tokens)

    def chat_texts(self, question: str, history: History) -> list[str]:
        """The chat prompt candidates for a question (Flan-T5 is asked for a short answer, as in the paper)."""
        return chat_texts(question, history, bool(self.model.config.is_encoder_decoder))

    # ---- generation --------------------------------------------------------------------------------------

    def prompt_ids(self, prompt: Prompt) -> torch.Tensor:
        """(1, T) ids: the image placeholders (absent in the legacy layout) and the prompt's."""
        cfg = self.model.config
        placeholders = [cfg.image_token_index] * cfg.num_query_tokens if cfg.image_token_index is not None else []
        return torch.tensor([placeholders + prompt.ids], device=next(self.model.parameters()).device)

    def _start(self, image_embeds: torch.Tensor, fitted: Prompt, decoding: dict, key: str | None) -> Decoding:
        """A decoding of the fitted prompt on the image in the scheduler's batch, from the reusable KV cache prefix
        kept for the image `key` (None: none)."""
        ids = self.prompt_ids(fitted)
        cache = self.prefixes.take(key, ids[0]) if key is not None and self.reuses_prefix else None
        with torch.no_grad():
            embeds, mask, input_ids = self.model.generation_inputs(input_ids=ids, image_embeds=image_embeds)
            return Decoding(self.model.language_model, embeds, mask, input_ids, cache,
                            stepper=self.scheduler.stepper, **lowered(decoding, fitted.max_new_tokens))

    def _fitted(self, texts: Sequence[str], decoding: dict) -> Prompt:
        return self.prompt(texts, decoding.get("max_new_tokens") or DEFAULT_NEW_TOKENS)

    def _texts(self, run: Decoding) -> list[str]:
        new = run.sequences[:, run.prompt.shape[1]:]
        return [t.strip() for t in self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def _finish(self, run: Decoding, key: str | None) -> None:
        """Keep the prefix for the image's next prompt, and leave the batch."""
        try:
            if key is not None and self.reuses_prefix:
                self.prefixes.keep(key, run)
        finally:
            run.close()

    def _generate(self, image_embeds: torch.Tensor, fitted: Prompt, decoding: dict, key: str | None) -> Generated:
        run = self._start(image_embeds, fitted, decoding, key)
        try:
            with torch.no_grad():
                run.run()
        finally:
            self._finish(run, key)
        out = self._texts(run)
        return Generated(out[0], out, fitted)

    def _stream(self, image, texts, decoding: dict) -> TextStream:
        image_embeds, key = self.image_embeds(image)
        fitted = self._fitted(texts, decoding)
        closed, stop = threading.Event(), decoding.get("stop")

        def stop_or_closed():  # between tokens: the consumer went away, or the caller's own stop
            if closed.is_set():
                raise Closed("the text stream was closed")
            if stop is not None:
                stop()

        run = self._start(image_embeds, fitted, decoding | {"stop": stop_or_closed}, key)

        def pieces():  # "".join(pieces) == the stripped text that `ask` returns; runs in its own thread
            raw, pending, started = text_pieces(run, self.processor.tokenizer), "", False
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
                self._finish(run, key)

        return TextStream(in_thread(pieces(), closed), fitted)

    def caption(self, image: ImageLike, prompt: str = "", **decoding) -> Generated:
        """Describe an image (optionally continuing `prompt`). `decoding`: generate's settings (`stop`: a callback
        run between tokens that ends the decoding by raising)."""
        image_embeds, key = self.image_embeds(image)
        return self._generate(image_embeds, self._fitted([prompt], decoding), decoding, key)

    def caption_stream(self, image: ImageLike, prompt: str = "", **decoding) -> TextStream:
        """`caption`, its text yielded piece by piece as it is generated."""
        return self._stream(image, [prompt], decoding)

    def ask(self, image: ImageLike, question: str, history: History = (), **decoding) -> Generated:
        """Answer a question about an image, given the chat so far (a list of (question, answer)); the oldest
        turns are left out when the prompt does not fit (`dropped_turns`)."""
        image_embeds, key = self.image_embeds(image)
        return self._generate(image_embeds, self._fitted(self.chat_texts(question, history), decoding), decoding, key)

    def ask_stream(self, image: ImageLike, question: str, history: History = (), **decoding) -> TextStream:
        """`ask`, its answer yielded piece by piece as it is generated."""
        return self._stream(image, self.chat_texts(question, history), decoding)

    def caption_batch(self, images: Sequence[ImageLike], prompt: str | list[str] = "", **decoding) -> list[Generated]:
        """Describe several images at once: each a request of the scheduler's batch (the images encoded in its
        turns, one a turn; nothing cached, nothing hashed), so each gets what `caption` gives it alone (sampling:
        with `seed`, the caption `caption` draws with that seed). Returns one Generated per image."""
        images = [unkeyed(i) for i in images]
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        fits = [self._fitted([p], decoding) for p in prompts]

        def one(image, fitted):
            embeds = self.scheduler.encode(pixel_values(self.model, self.processor, [image]))
            return self._generate(embeds, fitted, decoding, None)

        with ThreadPoolExecutor(max(len(images), 1), thread_name_prefix="blip2-caption") as pool:
            return list(pool.map(one, images, fits))


class Blip2Runner:
    """The captioner (`model` with its `processor`) and the retriever (`itm_model` with its `itm_processor`) over
    one FeatureCache; either pair may be None (its methods then refuse). `stats` counts cache hits."""

    def __init__(self, model: Blip2ForConditionalGeneration | None = None, processor: Blip2Processor | None = None,
                 itm_model: Blip2ForImageTextRetrieval | None = None, itm_processor: Blip2Processor | None = None,
                 image_cache_bytes: int = 256 * 2**20, prefix_cache_bytes: int = 256 * 2**20):
        self.stats = Counter()
        self.features = FeatureCache(image_cache_bytes, self.stats)
        self.model, self.processor, self.itm_model, self.itm_processor = model, processor, itm_model, itm_processor
        self._captioner = None if model is None else Captioner(model, processor, self.features,
                                                               PrefixCache(prefix_cache_bytes, self.stats))
        self._retriever = None if itm_model is None else Retriever(itm_model, itm_processor, self.features)

    @property
    def captioner(self) -> Captioner:
        if self._captioner is None:
            raise ValueError("this runner has no captioning model")
        return self._captioner

    @property
    def retriever(self) -> Retriever:
        if self._retriever is None:
            raise ValueError("this runner has no image-text matching model")
        return self._retriever

    # the captioner's and the retriever's tasks, under the names the app, the CLI and the bench call

    @property
    def context_size(self) -> int:
        return self.captioner.context_size

    def image_embeds(self, image: ImageLike) -> tuple[torch.Tensor, str]:
        return self.captioner.image_embeds(image)

    def caption(self, image: ImageLike, prompt: str = "", **decoding) -> Generated:
        return self.captioner.caption(image, prompt, **decoding)

    def caption_stream(self, image: ImageLike, prompt: str = "", **decoding) -> TextStream:
        return self.captioner.caption_stream(image, prompt, **decoding)

    def caption_batch(self, images: Sequence[ImageLike], prompt: str | list[str] = "", **decoding) -> list[Generated]:
        return self.captioner.caption_batch(images, prompt, **decoding)

    def ask(self, image: ImageLike, question: str, history: History = (), **decoding) -> Generated:
        return self.captioner.ask(image, question, history, **decoding)

    def ask_stream(self, image: ImageLike, question: str, history: History = (), **decoding) -> TextStream:
        return self.captioner.ask_stream(image, question, history, **decoding)

    def match(self, image: ImageLike, texts: Sequence[str]) -> list[Match]:
        return self.retriever.match(image, texts)

    def rank(self, images: Sequence[ImageLike], text: str, rerank_k: int = 0, stop=None) -> list[Ranked]:
        return self.retriever.rank(images, text, rerank_k, stop)

    def rerank(self, images: Sequence[ImageLike], text: str, itc: Sequence[float], k: int, stop=None) -> list[Ranked]:
        return self.retriever.rerank(images, text, itc, k, stop)

    def heatmap(self, image: ImageLike, text: str) -> tuple[torch.Tensor, str]:
        return self.retriever.heatmap(image, text)

    def itc_images(self, images: Sequence[ImageLike], stop=None) -> torch.Tensor:
        return self.retriever.itc_images(images, stop)

    def itc_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.retriever.itc_texts(texts)

    def itc_image_batch(self, images: Sequence[ImageLike]) -> torch.Tensor:
        return self.retriever.itc_image_batch(images)
