"""Image-text matching tasks over a Blip2ForImageTextRetrieval: ITM / ITC scores of many texts, gallery ranking with
an ITM re-rank of the top hits, and Grad-CAM heat maps; image features and text embeddings cached by content in the
FeatureCache the Retriever shares with the Captioner (both held by blip2.runner.Blip2Runner).

Special-token strings in user text (a literal "<image>", "[CLS]") are plain text in every path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .cache import FeatureCache
from .explain import relevance_grid
from .images import ImageLike, Keyed, keyed, unkeyed

if TYPE_CHECKING:
    from .modeling import Blip2ForImageTextRetrieval
    from .processing import Blip2Processor

VISION_BATCH = 8  # images per vision pass when many miss the cache (a stop check runs between passes)


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


def pixel_values(model, processor: Blip2Processor, images) -> torch.Tensor:
    """(B, 3, H, W) pixel values of PIL images for `model`, on its device."""
    device = next(model.parameters()).device
    return processor.image_processor(images, return_tensors="pt")["pixel_values"].to(device)


class Retriever:
    """ITM / ITC matching, ranking and heat maps over `model` (a Blip2ForImageTextRetrieval) with its `processor`;
    image features and text embeddings kept in `features` (shared with the captioner)."""

    def __init__(self, model: Blip2ForImageTextRetrieval, processor: Blip2Processor, features: FeatureCache):
        self.model, self.processor, self.features = model, processor, features

    # ---- features, cached by content ---------------------------------------------------------------------

    def _vision_states(self, images: Sequence[Keyed], stop=None) -> list[torch.Tensor]:
        m = self.model
        return self.features.many("vision", [k.key for k in images], lambda chunk: m.vision_model(
            pixel_values(m, self.processor, [images[i].load() for i in chunk])).last_hidden_state, VISION_BATCH, stop)

    def vision_states(self, image: ImageLike) -> torch.Tensor:
        """(1, 1+N, D_v) patch embeddings of the retrieval model for an image, cached (a heat map after a match
        reuses the match's vision pass)."""
        return self._vision_states([keyed(image)])[0]

    def itc_images(self, images: Sequence[ImageLike], stop: Callable[[], None] | None = None) -> torch.Tensor:
        """(I, Q, E) normalised ITC embeddings of images, each cached by content (the vision pass too)."""
        m, images = self.model, [keyed(i) for i in images]
        if not images:
            return torch.empty(0, m.config.num_query_tokens, m.config.image_text_hidden_size)
        embeds = self.features.many("itc", [k.key for k in images], lambda chunk: m.itc_image_embeds(
            torch.cat(self._vision_states([images[i] for i in chunk], stop))), VISION_BATCH, stop)
        return torch.cat(embeds)

    def itc_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(T, E) normalised ITC embeddings of texts, each cached."""
        m = self.model
        if not texts:
            return torch.empty(0, m.config.image_text_hidden_size)
        return torch.cat([self.features.get(("text", t), lambda t=t: m.itc_text_embeds(*self.text_batch([t])[:2])[0])
                          for t in texts])

    def itc_image_batch(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """(B, Q, E) normalised ITC embeddings of images in one vision pass (not cached, not hashed: for
        collections)."""
        m, images = self.model, [unkeyed(i) for i in images]
        with torch.inference_mode():
            return m.itc_image_embeds(m.vision_model(pixel_values(m, self.processor, images)).last_hidden_state)

    # ---- texts -------------------------------------------------------------------------------------------

    def text_batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """Plain-text ids of the retrieval tokenizer (special-token strings a user typed stay text), cut to the
        Q-Former's positions, right-padded -> (ids (T, L), mask (T, L), truncated per text)."""
        tok, limit = self.processor.tokenizer, self.model.config.qformer_config.max_position_embeddings
        rows = [tok.encode_plain(t) for t in texts]
        truncated = [len(r) > limit for r in rows]
        rows = [r[:limit - 1] + r[-1:] if cut else r for r, cut in zip(rows, truncated)]  # keep [SEP]
        width = max(map(len, rows))
        device = next(self.model.parameters()).device
        pad = tok.pad_token_id or 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        return ids, mask, truncated

    # ---- tasks -------------------------------------------------------------------------------------------

    def match(self, image: ImageLike, texts: Sequence[str]) -> list[Match]:
        """ITM probability and ITC cosine of one image against each text; the image is encoded once (cached)."""
        m, texts = self.model, list(texts)
        if not texts:
            return []
        image = keyed(image)
        vision = self._vision_states([image])[0]
        ids, mask, truncated = self.text_batch(texts)
        with torch.inference_mode():
            itm = m.itm_logits(vision, ids, mask)[0].float().softmax(-1)[:, 1]  # (T,)
            img = self.features.get(("itc", image.key), lambda: m.itc_image_embeds(vision))  # (1, Q, E)
            txt = m.itc_text_embeds(ids, mask)[0]  # (T, E)
            itc = (img[0].float() @ txt.float().t()).amax(0)  # (T,): best query per text
        return [Match(t, float(a), float(c), cut) for t, a, c, cut in zip(texts, itm, itc, truncated)]

    def itm_probs(self, images: Sequence[ImageLike], text: str, stop: Callable[[], None] | None = None) -> list[float]:
        """ITM match probability of each image with one text (vision passes cached)."""
        m, images = self.model, [keyed(i) for i in images]
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
        return relevance_grid(self.model, states, ids, mask)
