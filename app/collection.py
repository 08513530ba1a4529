"""A prebuilt image index in the app: `python app.py --index INDEX_DIR` (built with `python -m blip2 index`).

The Search tab then searches the index (exact ITC over every image's queries, the top-k re-ranked by ITM
log-odds + ITC cosine, through blip2.index) beside its upload-a-gallery mode. The index's images are files the
operator chose on the server: visitors only send a query text and never name a path; results come back as
small thumbnails made here, so no image folder is served. The retrieval model is the one the index was built
with (from its meta.json), loaded through the registry like any other checkpoint; the service checks the query
and holds the model's lock (`Service.search_index`).
"""

from __future__ import annotations

import json
import os
import time

from PIL import Image

from blip2.catalogue import EMBEDDED_MODELS
from blip2.index import META, ImageIndex, rerank, text_embedding
from blip2.retrieval import Retriever

from .errors import RequestError
from .registry import EMBEDDED, RETRIEVAL, Registry

THUMBNAIL = 256  # pixels, longest side


class Collection:
    """An index built with `python -m blip2 index`, and the checkpoint key of the retrieval model it was built
    with (added to the registry unless it is the embedded one)."""

    def __init__(self, registry: Registry, directory: str):
        self.directory = directory
        self.index = ImageIndex.load(directory)  # a missing faiss names its install command
        with open(os.path.join(directory, META)) as f:
            model = json.load(f)["model"]
        same = os.path.isdir(model) and os.path.realpath(model) == os.path.realpath(EMBEDDED_MODELS[RETRIEVAL])
        self.key = EMBEDDED if same else registry.add_source(model, RETRIEVAL)

    def __len__(self):
        return len(self.index)

    def search(self, runner: Retriever, query: str, k: int, rerank_k: int) -> tuple[list, str]:
        """The k best images for a (checked) text with the index's retrieval model -> ([(thumbnail, Hit)], notice).
        The caller holds the model's lock."""
        start = time.perf_counter()
        ids, itc = self.index.search(text_embedding(runner, query), max(k, rerank_k))
        searched = time.perf_counter() - start
        hits = rerank(runner, self.index, ids, itc, query, rerank_k)[:k]
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
