"""The app's service: validate a request, call the model's engine (a blip2 Captioner or Retriever), return results.
Every request from the browser and from `gradio_client` goes through here, under the model's lock and the request's
time limit.

No Gradio import here: the tab modules turn `RequestError` into `gr.Error`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blip2.cache import ByteLRU
from blip2.catalogue import GENERATION, RETRIEVAL
from blip2.decoding import ANSWER, CAPTION
from blip2.retrieval import match_score
from blip2.runner import Generated, TextStream
from blip2.world_check import in_world

from .collection import Collection
from .config import Limits
from .errors import RequestError, TimeLimitReached
from .files import request_file
from .registry import EMBEDDED, Checkpoint, Loaded, ModelSettings, Progress, Registry
from .render import overlay_heatmap
from .validation import (
    CheckedImage,
    DecodingSettings,
    ImageInput,
    LazyImage,
    clean_text,
    gallery_item_name,
    load_image,
    parse_decoding,
    parse_number,
    parse_texts,
    payload_path,
)
from .zerogpu import gpu


def _stop_after(deadline: float) -> None:
    """Generation's `stop` callback (checked between tokens) and the check between image batches: the time limit."""
    if time.monotonic() > deadline:
        raise TimeLimitReached()


def clean_answer(text: str) -> str:
    """Cut a generated answer at the first line break or at a new "Question:" the model starts by itself."""
    text = text.replace("\r", "\n").split("\n")[0]
    for stop in ("Question:", "Answer:", "Short answer:"):
        i = text.find(stop)
        if i > 0:
            text = text[:i]
    return text.strip()


@dataclass
class CaptionResult:
    captions: list[str]
    notice: str = ""


@dataclass
class ChatReply:
    """A chat turn as it grows: the question as asked (cleaned), the answer so far, the notice, and the
    conversation it answers (the turns kept, [] when the image changed) about the image `digest`."""

    question: str
    answer: str
    notice: str
    history: list[tuple[str, str]]
    digest: str


@dataclass
class MatchRow:
    text: str
    itm: float  # probability that the text matches the image
    itc: float  # cosine similarity (best query)
    truncated: bool = False  # cut to the retrieval model's text positions

    @property
    def score(self) -> float:
        """The ranking score: ITM log-odds + ITC cosine, as LAVIS re-ranks retrieval (ITM logit + ITC)."""
        return match_score(self.itm, self.itc)


@dataclass
class Matching:
    """Candidate texts ranked for one image, best first, and the heat map of the best one (if asked)."""

    rows: list[MatchRow]
    notice: str = ""
    heatmap: Image.Image | None = None
    method: str = ""


Hit = tuple[CheckedImage, float, float | None]  # a ranked gallery image: (image, ITC cosine, ITM probability or None)


@dataclass
class Searched:
    """A gallery ranked for a text: hits best first, the images skipped [(name, reason)], and the notice."""

    hits: list[Hit]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notice: str = ""


def truncation_notice(texts: Sequence[str], positions: int) -> str:
    """The notice for texts cut to the retrieval model's text positions ("" when none was)."""
    if not texts:
        return ""
    which = f"“{texts[0][:60]}”" if len(texts) == 1 else f"{len(texts)} texts"
    return (f"⚠️ {which} {'was' if len(texts) == 1 else 'were'} cut to the retrieval model's {positions} text "
            "tokens: only the beginning was scored.")


def _join(*notes: str) -> str:
    return " ".join(n for n in notes if n)


class Service:
    """The operations of the app over the models of its `registry`, shared by every session; with `index`, also
    a prebuilt image index (`collection`) for the Search tab."""

    def __init__(self, generation: str | None = None, retrieval: str | None = None,
                 settings: ModelSettings | None = None, limits: Limits | None = None,
                 extra_checkpoints: Sequence[Checkpoint] = (), index: str | None = None):
        self.registry = Registry(generation, retrieval, settings, limits, extra_checkpoints)
        self.limits = self.registry.limits
        Image.MAX_IMAGE_PIXELS = self.limits.max_image_pixels  # PIL's own bomb check, at the same limit
        self._file_digests = ByteLRU(2**20)  # (path, size, mtime) -> content hash, so a gallery is not re-read
        self._in_world = ByteLRU(2**20)  # image content hash -> the embedded model's world rule's verdict
        self.collection = Collection(self.registry, index) if index else None

    @contextlib.contextmanager
    def request(self, loaded: Loaded, deadline: float | None = None) -> Iterator[float]:
        """One model request: the model's lock, no autograd; yields its deadline."""
        deadline = deadline if deadline is not None else time.monotonic() + self.limits.time_limit_s
        with self.registry.serving(), loaded.lock, torch.no_grad():
            yield deadline

    def _image(self, image: ImageInput) -> CheckedImage:
        return image if isinstance(image, CheckedImage) else load_image(image, self.limits)

    # --- generation

    def _fit_notes(self, loaded: Loaded, out: Generated | TextStream, decoding: DecodingSettings,
                   ended_early: bool = False) -> str:
        """What the runner's context fitting did, for the user (a lowered max_new_tokens only matters when the
        answer did not end early, at the time limit)."""
        context = loaded.runner.context_size
        notes = []
        if out.dropped_turns:
            turns = "the oldest turn was" if out.dropped_turns == 1 else f"the {out.dropped_turns} oldest turns were"
            notes.append(f"Note: {turns} left out of the prompt to fit the model's context of {context} tokens.")
        elif out.truncated:
            notes.append("The prompt was shortened from the left to fit the model's context.")
        if out.max_new_tokens < decoding.max_new_tokens and not ended_early:
            notes.append(f"Max new tokens lowered to {out.max_new_tokens}: the model has {context} positions and "
                         "the image and prompt take the rest.")
        return _join(*notes)

    def generate(self, loaded: Loaded, img: CheckedImage, decoding: DecodingSettings, stream: bool,
                 prompt: str = "", question: str | None = None,
                 history: Sequence[tuple[str, str]] = ()) -> Iterator[tuple[list[str], str]]:
        """Yield (texts, notice) as the runner generates a caption (continuing `prompt`) or, given a `question`,
        a chat answer: token by token when `stream` and the settings allow it, else one final yield. The runner
        fits the prompt to the context (the notice says how); at the time limit a stream stops between tokens,
        keeping what was generated."""
        deadline = time.monotonic() + self.limits.time_limit_s
        runner, image = loaded.runner, img.keyed()
        kwargs = decoding.generate_kwargs() | {"stop": partial(_stop_after, deadline)}
        # no model lock: the captioner's batching loop (blip2.scheduler) takes every request into its running batch
        with self.registry.serving():
            if not (stream and decoding.streams):
                try:
                    out = (runner.ask(image, question, history, **kwargs) if question is not None
                           else runner.caption(image, prompt, **kwargs))
                except TimeLimitReached:
                    raise RequestError(f"generation passed the time limit of {self.limits.time_limit_s:g} s: use "
                                       "fewer beams, fewer captions or fewer new tokens") from None
                yield out.texts, self._fit_notes(loaded, out, decoding)
                return
            out = (runner.ask_stream(image, question, history, **kwargs) if question is not None
                   else runner.caption_stream(image, prompt, **kwargs))
            pieces, text, stopped = iter(out), "", False
            try:
                for piece in pieces:
                    text += piece
                    yield [text.strip()], self._fit_notes(loaded, out, decoding)
            except TimeLimitReached:
                stopped = True
            finally:  # a client that went away: its rows leave the batch at the next step
                pieces.close()
                out.close()
            stop = f"Stopped at the time limit of {self.limits.time_limit_s:g} s." if stopped else ""
            yield [text.strip()], _join(self._fit_notes(loaded, out, decoding, ended_early=stopped), stop)

    def world_caveat(self, key: str, images: list[CheckedImage]) -> str:
        """For the embedded model: a caveat when images lie outside its world of shapes (the measured rule of
        blip2.world_check: every photograph scikit-image ships is flagged, no world scene of the test split
        is), else ""."""
        if key != EMBEDDED:
            return ""
        outside = 0
        for img in images:  # by content hash: a cached gallery image is not decoded again for its verdict
            verdict = self._in_world.get(img.digest)
            if verdict is None:
                verdict = in_world(img.image)
                self._in_world.put(img.digest, verdict)
            outside += not verdict
        if not outside:
            return ""
        what = "This image looks" if len(images) == 1 else f"{outside} of these {len(images)} images look"
        return (f"⚠️ {what} like a photograph, outside the embedded model's world: {EMBEDDED} knows only coloured "
                "shapes on plain backgrounds, so its results are about shapes. For photographs, pick a Salesforce "
                "checkpoint in the Model picker (e.g. Salesforce/blip2-opt-2.7b) and press Load model.")

    @gpu
    def caption(self, gen_key: str, image: ImageInput, prompt: str = "", decoding: Mapping | None = None,
                stream: bool = True, progress: Progress | None = None) -> Iterator[CaptionResult]:
        """Yield CaptionResult(captions, notice) as the caption(s) grow. `decoding`: the settings a request sent
        (API names, see validation.parse_decoding), the rest at a caption's defaults."""
        settings = parse_decoding(self.limits, decoding, CAPTION)
        loaded = self.registry.get(gen_key, GENERATION, progress)
        img = self._image(image)
        prefix = clean_text(prompt, "the prompt", self.limits.max_prompt_chars, allow_empty=True)
        notes = _join(*img.notes, self.world_caveat(gen_key, [img]))
        for texts, notice in self.generate(loaded, img, settings, stream, prompt=prefix):
            if prefix and not loaded.is_t5:
                texts = [f"{prefix} {t}".strip() if t else prefix for t in texts]
            yield CaptionResult(texts, _join(notes, notice))

    @gpu
    def chat(self, gen_key: str, image: ImageInput, question: str, history: Sequence[tuple[str, str]] = (),
             decoding: Mapping | None = None, stream: bool = True, progress: Progress | None = None,
             about: str | None = None) -> Iterator[ChatReply]:
        """One chat turn over the conversation `history` ([(q, a), ...], oldest first; the oldest left out by the
        runner when they do not fit, and all of it when `about`, the image it was about, is not this image).
        Yields ChatReply as the answer grows. `decoding`: as in `caption`, at an answer's defaults."""
        settings = parse_decoding(self.limits, {**(decoding or {}), "num_captions": 1}, ANSWER)
        loaded = self.registry.get(gen_key, GENERATION, progress)
        img = self._image(image)
        question = clean_text(question, "the question", self.limits.max_prompt_chars)
        history, restart = [tuple(t) for t in history][-self.limits.max_chat_turns:], ""
        if history and about is not None and about != img.digest:
            history, restart = [], "New image: the conversation starts over."
        notes = _join(restart, *img.notes, self.world_caveat(gen_key, [img]))
        for texts, notice in self.generate(loaded, img, settings, stream, question=question, history=history):
            yield ChatReply(question, clean_answer(texts[0]), _join(notes, notice), history, img.digest)

    # --- matching and search

    @gpu
    def match(self, ret_key: str, image: ImageInput, texts: str | Sequence[str], heatmap: bool = False,
              progress: Progress | None = None) -> Matching:
        """ITM probability and ITC cosine of every text against one image (encoded once), best first; with
        `heatmap`, also where the Q-Former looks for the best text. The notice says which texts were cut to the
        retrieval model's text positions."""
        loaded = self.registry.get(ret_key, RETRIEVAL, progress)
        img = self._image(image)
        texts = parse_texts(texts, self.limits)
        with self.request(loaded):
            matches = loaded.runner.match(img.keyed(), texts)
        rows = sorted((MatchRow(m.text, m.itm, m.itc, m.truncated) for m in matches), key=lambda r: -r.score)
        cut = truncation_notice([r.text for r in rows if r.truncated], self._text_positions(loaded))
        result = Matching(rows, _join(*img.notes, cut, self.world_caveat(ret_key, [img])))
        if heatmap:
            result.heatmap, _, result.method = self._heatmap(loaded, img, rows[0].text)
        return result

    @gpu
    def heatmap(self, ret_key: str, image: ImageInput, text: str,
                progress: Progress | None = None) -> tuple[Image.Image, np.ndarray, str, str]:
        """Where the Q-Former looks for `text` (blip2.explain's Grad-CAM, over the vision pass a match cached),
        drawn over the image. Returns (overlay image, (h, w) relevance grid, method, notice)."""
        loaded = self.registry.get(ret_key, RETRIEVAL, progress)
        img = self._image(image)
        text = clean_text(text, "the text", self.limits.max_candidate_chars)
        return *self._heatmap(loaded, img, text), self.world_caveat(ret_key, [img])

    def _heatmap(self, loaded: Loaded, img: CheckedImage, text: str) -> tuple[Image.Image, np.ndarray, str]:
        with loaded.lock:  # one backward pass: nothing to stop in between
            try:
                relevance, method = loaded.runner.heatmap(img.keyed(), text)
            except ValueError as e:
                raise RequestError(str(e)) from None
        grid = relevance.cpu().numpy()
        return overlay_heatmap(img.image, grid), grid, method

    @staticmethod
    def _text_positions(loaded: Loaded) -> int:
        return loaded.model.config.qformer_config.max_position_embeddings

    def _query_notice(self, loaded: Loaded, query: str) -> str:
        """The notice for a search text cut to the retrieval model's text positions ("" when it fits)."""
        with self.request(loaded):
            cut = loaded.runner.text_batch([query])[2][0]
        return truncation_notice([query] if cut else [], self._text_positions(loaded))

    @gpu
    def search(self, ret_key: str, images: ImageInput | Sequence[ImageInput], query: str, rerank_k: int | None = None,
               progress: Progress | None = None) -> Searched:
        """Rank a gallery for a text (Retriever.rank: ITC over every image, embeddings cached by content, then
        the top `rerank_k` re-ranked by ITM log-odds + ITC cosine, as LAVIS re-ranks) -> Searched."""
        loaded = self.registry.get(ret_key, RETRIEVAL, progress)
        query = clean_text(query, "the search text", self.limits.max_prompt_chars)
        if images is None or (isinstance(images, (list, tuple)) and not images):
            raise RequestError("the gallery is empty: upload images or load the example gallery")
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) > self.limits.max_gallery:
            raise RequestError(f"{len(images)} images given; the limit is {self.limits.max_gallery} per search")
        k = self._rerank_k(rerank_k)
        checked, skipped = [], []
        for i, item in enumerate(images, 1):
            name = gallery_item_name(item, i)
            try:
                checked.append(self._gallery_image(item, name))
            except RequestError as e:
                skipped.append((name, str(e)))
        if not checked:
            raise RequestError("no usable image in the gallery: " + "; ".join(r for _, r in skipped[:3]))
        try:
            with self.request(loaded) as deadline:
                ranked = loaded.runner.rank([c.keyed() for c in checked], query, k, stop=partial(_stop_after, deadline))
        except TimeLimitReached:
            raise RequestError(f"the search passed the time limit of {self.limits.time_limit_s:g} s: search fewer "
                               "images at once (their embeddings are cached, so trying again goes further)") from None
        hits = [(checked[r.index], r.itc, r.itm) for r in ranked]
        notice = _join(self._query_notice(loaded, query), self.world_caveat(ret_key, [c for c, _, _ in hits]))
        return Searched(hits, skipped, notice)

    @gpu
    def search_index(self, query: str, k: int, rerank_k: int | None = None) -> tuple[list, str]:
        """The k best images of the prebuilt index (`collection`) for a text -> ([(thumbnail, blip2.index.Hit)],
        notice)."""
        if self.collection is None:
            raise RequestError("this server has no image index (python app.py --index INDEX_DIR)")
        query = clean_text(query, "the search text", self.limits.max_prompt_chars)
        rerank_k = self._rerank_k(rerank_k)
        loaded = self.registry.get(self.collection.key, RETRIEVAL)
        with self.request(loaded):
            shown, notice = self.collection.search(loaded.runner, query, k, rerank_k)
        return shown, _join(notice, self._query_notice(loaded, query))

    def _rerank_k(self, rerank_k: int | None) -> int:
        return parse_number(self.limits.search_rerank_k if rerank_k is None else rerank_k, "re-rank top-k", 0, 100,
                            integer=True)

    def _gallery_image(self, item, name) -> CheckedImage:
        """Gallery items are re-checked only when their file changed: the digest is cached by path and mtime."""
        if isinstance(item, (tuple, list)) and item:
            item = item[0]
        path = payload_path(item) if isinstance(item, dict) else item if isinstance(item, (str, Path)) else None
        if path is not None:
            path = request_file(path)
            st = os.stat(path)
            fkey = (str(path), st.st_size, st.st_mtime_ns)
            digest = self._file_digests.get(fkey)
            if digest is not None:
                return LazyImage(path, digest, self.limits, name)
            img = load_image(path, self.limits, name)
            self._file_digests.put(fkey, img.digest)
            return img
        return load_image(item, self.limits, name)
