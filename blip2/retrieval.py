"""Image-text matching tasks over a Blip2ForImageTextRetrieval: ITM / ITC scores of many texts, gallery ranking with
an ITM re-rank of the top hits, and Grad-CAM heat maps; image features and text embeddings cached by content in one
bytes-bounded LRU. `Blip2Runner` (blip2/runner.py) adds generation on top; the app and the CLI call these methods.

Special-token strings in user text (a literal "<image>", "[CLS]") are plain text in every path.
"""

from __future__ import annotations

import math
import sys
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .cache import KVCache
from .explain import relevance_grid
from .images import ImageLike, Keyed, keyed

if TYPE_CHECKING:
    from .modeling import Blip2ForImageTextRetrieval
    from .processing import Blip2Processor, Blip2Tokenizer

VISION_BATCH = 8  # images per vision pass when many miss the cache (a stop check runs between passes)


class ByteLRU:
    """Least-recently-used map bounded by the bytes of its values (tensors, tuples of them, KVCaches, or plain
    Python values)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.items = OrderedDict()  # key -> (value, bytes)
        self.lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self.lock:
            if key not in self.items:
                return None
            self.items.move_to_end(key)
            return self.items[key][0]

    def pop(self, key: Any) -> Any:
        with self.lock:
            value, size = self.items.pop(key, (None, 0))
            self.bytes -= size
            return value

    def put(self, key: Any, value: Any) -> None:
        size = nbytes(value)
        with self.lock:
            self.bytes -= self.items.pop(key, (None, 0))[1]
            if size > self.max_bytes:
                return
            self.items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                self.bytes -= self.items.popitem(last=False)[1][1]


def nbytes(value: torch.Tensor | KVCache | Sequence | str | float | None) -> int:
    """Bytes held by a tensor, a KVCache, a sequence of them, or a plain Python value (str, number, bool)."""
    if value is None or isinstance(value, (str, bytes, int, float)):
        return sys.getsizeof(value)
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, KVCache):
        return sum(nbytes(t) for t in value.k + value.v + [x for c in value.cross if c for x in c] if t is not None)
    return sum(nbytes(v) for v in value)


def encode_plain(tokenizer: Blip2Tokenizer, text: str) -> list[int]:
    """Token ids of user text with the tokenizer's own special tokens around it. Special-token strings inside the
    text stay plain text, so a literal "<image>" cannot change the image-token count nor "</s>" end the prompt."""
    backend = tokenizer.backend
    with getattr(tokenizer, "_lock", nullcontext()):
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = True
        try:
            return backend.encode(text).ids
        finally:
            backend.encode_special_tokens = False


def match_score(itm_prob: float, itc: float) -> float:
    """The ranking score of an image-text pair: ITM log-odds + ITC cosine (as LAVIS re-ranks retrieval)."""
    p = min(max(float(itm_prob), 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p)) + float(itc)


@dataclass
class Match:
    text: str
    itm: float  # image-text matching probability (ITM head)
    itc: float  # image-text contrastive cosine similarity (best query)
    truncated: bool  # the text was cut to the Q-Former's positions


@dataclass
class Ranked:
    index: int  # position of the image in the list ranked
    itc: float  # best-query cosine with the text
    itm: float | None  # ITM match probability (re-ranked images only)


def rerank_order(itc: Sequence[float], itm: dict[int, float]) -> list[int]:
    """Image indices best first: those with an ITM probability by ITM log-odds + ITC cosine, then the rest by ITC."""
    by_itc = sorted(range(len(itc)), key=lambda i: -itc[i])
    top = sorted(itm, key=lambda i: -match_score(itm[i], itc[i]))
    return top + [i for i in by_itc if i not in itm]


class Retriever:
    """`itm_model`: a Blip2ForImageTextRetrieval with its `itm_processor` (None: matching is refused). `features`:
    the content-keyed cache of image features and text embeddings; `stats` counts its hits and misses."""

    def __init__(self, itm_model: Blip2ForImageTextRetrieval | None = None, itm_processor: Blip2Processor | None = None,
                 features: ByteLRU | None = None,
                 stats: Counter | None = None):
        self.itm_model, self.itm_processor = itm_model, itm_processor
        self.features = features if features is not None else ByteLRU(256 * 2**20)
        self.stats = stats if stats is not None else Counter()

    def _cached(self, key, compute: Callable[[], object]):
        value = self.features.get(key)
        self.stats["feature_hits" if value is not None else "feature_misses"] += 1
        if value is None:
            with torch.inference_mode():
                value = compute()
            self.features.put(key, value)
        return value

    def _pixels(self, model, processor, images) -> torch.Tensor:
        device = next(model.parameters()).device
        return processor.image_processor(images, return_tensors="pt")["pixel_values"].to(device)

    def _retrieval(self):
        if self.itm_model is None:
            raise ValueError("this runner has no image-text matching model")
        return self.itm_model

    # ---- features, cached by content ---------------------------------------------------------------------

    def _many(self, kind: str, images: Sequence[Keyed], compute, stop: Callable[[], None] | None = None) -> list:
        """Cached per-image values of `kind` ((1, ...) each); the misses computed VISION_BATCH images at a time
        by `compute(keyed images) -> (B, ...)`, `stop()` called before each batch."""
        out = [self.features.get((kind, k.key)) for k in images]
        missing = [i for i, v in enumerate(out) if v is None]
        self.stats["feature_hits"] += len(images) - len(missing)
        self.stats["feature_misses"] += len(missing)
        for start in range(0, len(missing), VISION_BATCH):
            if stop is not None:
                stop()
            chunk = missing[start:start + VISION_BATCH]
            with torch.inference_mode():
                values = compute([images[i] for i in chunk])
            for j, i in enumerate(chunk):
                out[i] = values[j:j + 1]
                self.features.put((kind, images[i].key), out[i])
        return out

    def _vision_states(self, images: Sequence[Keyed], stop=None) -> list[torch.Tensor]:
        m = self._retrieval()
        return self._many("vision", images, lambda ks: m.vision_model(
            self._pixels(m, self.itm_processor, [k.load() for k in ks])).last_hidden_state, stop)

    def vision_states(self, image: ImageLike) -> torch.Tensor:
        """(1, 1+N, D_v) patch embeddings of the retrieval model for an image, cached (a heat map after a match
        reuses the match's vision pass)."""
        return self._vision_states([keyed(image)])[0]

    def itc_images(self, images: Sequence[ImageLike], stop: Callable[[], None] | None = None) -> torch.Tensor:
        """(I, Q, E) normalised ITC embeddings of images, each cached by content (the vision pass too)."""
        m, images = self._retrieval(), [keyed(i) for i in images]
        if not images:
            return torch.empty(0, m.config.num_query_tokens, m.config.image_text_hidden_size)
        embeds = self._many("itc", images, lambda ks: m.itc_image_embeds(torch.cat(self._vision_states(ks, stop))),
                            stop)
        return torch.cat(embeds)

    def itc_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(T, E) normalised ITC embeddings of texts, each cached."""
        m = self._retrieval()
        if not texts:
            return torch.empty(0, m.config.image_text_hidden_size)
        return torch.cat([self._cached(("text", t), lambda t=t: m.itc_text_embeds(*self.text_batch([t])[:2])[0])
                          for t in texts])

    def image_text_embeddings(self, images: Sequence[ImageLike] = (),
                              texts: Sequence[str] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ITC embeddings for search: images (I, Q, E) and texts (T, E), each cached by content.
        The similarity of image i and text t is max over q of images[i, q] . texts[t]."""
        return self.itc_images(list(images)), self.itc_texts(list(texts))

    def itc_image_batch(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """(B, Q, E) normalised ITC embeddings of images in one vision pass (not cached: for collections)."""
        m = self._retrieval()
        images = [keyed(i).load() for i in images]
        with torch.inference_mode():
            return m.itc_image_embeds(m.vision_model(self._pixels(m, self.itm_processor, images)).last_hidden_state)

    # ---- texts -------------------------------------------------------------------------------------------

    def text_batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """Plain-text ids of the retrieval tokenizer (special-token strings a user typed stay text), cut to the
        Q-Former's positions, right-padded -> (ids (T, L), mask (T, L), truncated per text)."""
        tok, qcfg = self.itm_processor.tokenizer, self._retrieval().config.qformer_config
        limit = qcfg.max_position_embeddings
        rows = [encode_plain(tok, t) for t in texts]
        truncated = [len(r) > limit for r in rows]
        rows = [r[:limit - 1] + r[-1:] if cut else r for r, cut in zip(rows, truncated)]  # keep [SEP]
        width = max(map(len, rows))
        device = next(self.itm_model.parameters()).device
        pad = tok.pad_token_id or 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        return ids, mask, truncated

    # ---- tasks -------------------------------------------------------------------------------------------

    def match(self, image: ImageLike, texts: Sequence[str]) -> list[Match]:
        """ITM probability and ITC cosine of one image against each text; the image is encoded once (cached)."""
        m, texts = self._retrieval(), list(texts)
        if not texts:
            return []
        image = keyed(image)
        vision = self._vision_states([image])[0]
        ids, mask, truncated = self.text_batch(texts)
        with torch.inference_mode():
            itm = m.itm_logits(vision, ids, mask)[0].float().softmax(-1)[:, 1]  # (T,)
            img = self._cached(("itc", image.key), lambda: m.itc_image_embeds(vision))  # (1, Q, E)
            txt = m.itc_text_embeds(ids, mask)[0]  # (T, E)
            itc = (img[0].float() @ txt.float().t()).amax(0)  # (T,): best query per text
        return [Match(t, float(a), float(c), cut) for t, a, c, cut in zip(texts, itm, itc, truncated)]

    def itm_probs(self, images: Sequence[ImageLike], text: str, stop: Callable[[], None] | None = None) -> list[float]:
        """ITM match probability of each image with one text (vision passes cached)."""
        m, images = self._retrieval(), [keyed(i) for i in images]
        if not images:
            return []
        states = torch.cat(self._vision_states(images, stop))  # (I, 1+N, D_v)
        ids, mask, _ = self.text_batch([text])
        with torch.inference_mode():
            logits = m.itm_logits(states, ids.expand(len(images), -1), mask.expand(len(images), -1))[0]
        return logits.float().softmax(-1)[:, 1].tolist()

    def rerank(self, images: Sequence[ImageLike], text: str, itc: Sequence[float], k: int,
               stop: Callable[[], None] | None = None) -> list[Ranked]:
        """Images with their ITC cosines for `text`, best first: the `k` best by ITC re-ranked by ITM log-odds +
        ITC cosine (as LAVIS re-ranks), the rest in ITC order. The app's search and `python -m blip2 search`
        rank here."""
        itc = [float(c) for c in itc]
        top = sorted(range(len(itc)), key=lambda i: -itc[i])[:max(k, 0)]
        itm = dict(zip(top, self.itm_probs([images[i] for i in top], text, stop)))
        return [Ranked(i, itc[i], itm.get(i)) for i in rerank_order(itc, itm)]

    def rank(self, images: Sequence[ImageLike], text: str, rerank_k: int = 0,
             stop: Callable[[], None] | None = None) -> list[Ranked]:
        """Rank a gallery for a text: ITC over every image (embeddings cached by content, so a new query over the
        same gallery embeds only the text), then `rerank`. `stop()` runs between vision passes (a deadline)."""
        images = [keyed(i) for i in images]
        embeds, text_embed = self.itc_images(images, stop), self.itc_texts([text])[0]  # (I, Q, E), (E,)
        itc = (embeds.float() @ text_embed.float()).amax(1)  # (I,): best query per image
        return self.rerank(images, text, itc.tolist(), rerank_k, stop)

    def heatmap(self, image: ImageLike, text: str) -> tuple[torch.Tensor, str]:
        """Where the Q-Former looks for `text` in the image: blip2.explain.relevance_grid over the cached vision
        states -> ((side, side) relevance, method)."""
        states = self.vision_states(image)
        ids, mask, _ = self.text_batch([text])
        return relevance_grid(self._retrieval(), states, ids, mask)
