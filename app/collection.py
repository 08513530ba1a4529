"""A prebuilt image index in the app: `python app.py --index INDEX_DIR` (built with `python -m blip2 index`).

The Search tab then searches the index (exact ITC over every image's queries, the top-k re-ranked by ITM
log-odds + ITC cosine, through blip2.index) beside its upload-a-gallery mode. The index's images are files the
operator chose on the server: visitors only send a query text and never name a path; results come back as
small thumbnails made here, so no image folder is served. The retrieval model is the one the index was built
with (from its meta.json), loaded through the service like any other checkpoint.
"""

from __future__ import annotations

import os
import time

from PIL import Image

from blip2.index import ImageIndex, rerank, text_embedding

from .errors import RequestError
from .paths import EMBEDDED_RETRIEVAL
from .registry import EMBEDDED, RETRIEVAL
from .service import Service
from .validation import clean_text, parse_number

THUMBNAIL = 256  # pixels, longest side


class Collection:
    def __init__(self, svc: Service, directory: str):
        self.svc, self.directory = svc, directory
        self.index = ImageIndex.load(directory)  # a missing faiss names its install command
        model = self.index.model  # the checkpoint meta.json names (checked by ImageIndex.load)
        same = os.path.isdir(model) and os.path.realpath(model) == os.path.realpath(EMBEDDED_RETRIEVAL)
        self.key = EMBEDDED if same else svc.add_source(model, RETRIEVAL)

    def __len__(self):
        return len(self.index)

    def search(self, query, k: int, rerank_k: int) -> tuple[list, str]:
        """The k best images for a text -> ([(thumbnail, Hit)], notice)."""
        query = clean_text(query, "the search text", self.svc.limits.max_prompt_chars)
        rerank_k = parse_number(rerank_k, "re-rank top-k", 0, 100, integer=True)
        loaded = self.svc.get(self.key, RETRIEVAL)
        with self.svc.request(loaded):
            start = time.perf_counter()
            ids, itc = self.index.search(text_embedding(loaded.runner, query), max(k, rerank_k))
            searched = time.perf_counter() - start
            hits = rerank(loaded.runner, self.index, ids, itc, query, rerank_k)[:k]
        shown = []
        for h in hits:
            try:
                with Image.open(h.path) as im:
                    im = im.convert("RGB")
                    im.thumbnail((THUMBNAIL, THUMBNAIL))
            except OSError as e:
                raise RequestError(f"an indexed image cannot be read any more ({os.path.basename(h.path)}: {e}); "
                                   "the index needs updating") from None
            shown.append((im, h))
        notice = (f"Searched the index of {len(self.index)} images (exact ITC, {1000 * searched:.0f} ms)"
                  + (f", the top {min(rerank_k, len(hits))} re-ranked by ITM." if rerank_k else "."))
        return shown, notice


def attach(svc: Service, directory: str) -> Collection:
    svc.collection = Collection(svc, directory)
    return svc.collection


def attached(svc: Service) -> Collection | None:
    return getattr(svc, "collection", None)
