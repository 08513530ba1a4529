"""Caches: the KV cache of incremental decoding, and the content-keyed feature cache (an LRU bounded in bytes) that
the captioner and the retriever share."""

from __future__ import annotations

import sys
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F


class KVCache:
    """Per layer, keys and values (B, H, T, hd) held in buffers that grow by doubling, so appending a token
    costs no copy of the past. `cross` holds an encoder-decoder model's cross-attention keys/values,
    computed once per prompt."""

    def __init__(self, num_layers: int):
        self.k = [None] * num_layers
        self.v = [None] * num_layers
        self.length = 0  # tokens stored (same for every layer once a forward pass is through)
        self.cross = [None] * num_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k/v (B, H, t, hd) to `layer`; return all keys/values so far."""
        start = self.length
        end = start + k.shape[2]
        self.reserve(layer, end, k)
        self.k[layer].narrow(2, start, end - start).copy_(k)  # narrow: a decoding step's cheapest slice
        self.v[layer].narrow(2, start, end - start).copy_(v)
        return self.k[layer].narrow(2, 0, end), self.v[layer].narrow(2, 0, end)

    def reserve(self, layer: int, end: int, like: torch.Tensor) -> None:
        """Room for `end` positions in `layer`'s buffers ((B, H, *, hd) in the dtype of `like`, (B, H, t, hd)),
        the positions stored kept."""
        buf_k, start = self.k[layer], self.length
        if buf_k is None or buf_k.shape[2] < end:
            cap = max(end, 2 * (0 if buf_k is None else buf_k.shape[2]), 16)
            new_k = like.new_empty(like.shape[0], like.shape[1], cap, like.shape[3])
            new_v = like.new_empty(like.shape[0], like.shape[1], cap, like.shape[3])
            if buf_k is not None:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = self.v[layer][:, :, :start]
            self.k[layer], self.v[layer] = new_k, new_v

    def advance(self, n: int) -> None:
        """Called by the model once every layer has appended n tokens."""
        self.length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search, or repeating a prompt's cache for several samples)."""
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = t.index_select(0, index)
        self.cross = [None if c is None else (c[0].index_select(0, index), c[1].index_select(0, index))
                      for c in self.cross]

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` tokens (reuse of a shared prompt prefix)."""
        self.length = min(self.length, length)

    # ---- a batch of sequences that join and leave (blip2.scheduler): rows aligned on their last position

    def pad_front(self, n: int) -> None:
        """Put n empty (zero) positions in front of every row, as left padding that a mask hides."""
        if n == 0:
            return
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = torch.cat([t.new_zeros(*t.shape[:2], n, t.shape[3]), t[:, :, :self.length]], 2)
        self.length += n

    def drop_front(self, n: int) -> None:
        """Forget the first n positions of every row (padding no row needs any more)."""
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = t[:, :, n:self.length].clone()
        self.length -= n

    def rows(self, start: int, stop: int, positions: torch.Tensor) -> "KVCache":
        """A copy of rows start..stop holding only `positions` (one sequence's cache taken out of a batch, its
        padding left behind); the cross-attention keys/values are left out."""
        out = KVCache(len(self.k))
        out.k = [None if t is None else t[start:stop].index_select(2, positions) for t in self.k]
        out.v = [None if t is None else t[start:stop].index_select(2, positions) for t in self.v]
        out.length = len(positions)
        return out

    def prefix(self, length: int) -> "KVCache":
        """A copy holding the first `length` positions (a prompt prefix that several requests reuse)."""
        out = KVCache(len(self.k))
        out.k = [None if t is None else t[:, :, :length].clone() for t in self.k]
        out.v = [None if t is None else t[:, :, :length].clone() for t in self.v]
        out.length = length
        return out

    @staticmethod
    def blank(like: "KVCache", rows: int) -> "KVCache":
        """An empty cache of `rows` rows shaped as `like` (to pad in front of)."""
        out = KVCache(len(like.k))
        out.k = [None if t is None else t.new_zeros(rows, t.shape[1], 0, t.shape[3]) for t in like.k]
        out.v = [None if t is None else t.new_zeros(rows, t.shape[1], 0, t.shape[3]) for t in like.v]
        return out

    @staticmethod
    def cat(caches: "list[KVCache]") -> "KVCache":
        """The rows of caches of one length, one after another; cross-attention keys/values padded with zeros
        to the longest encoder output (a mask hides the padding)."""
        length = caches[0].length
        if any(c.length != length for c in caches):
            raise ValueError(f"caches of lengths {[c.length for c in caches]} cannot be stacked: pad them first")
        out = KVCache(len(caches[0].k))
        out.length = length
        for name in ("k", "v"):
            setattr(out, name, [None if c0 is None else torch.cat([getattr(c, name)[i][:, :, :length] for c in caches])
                                for i, c0 in enumerate(getattr(caches[0], name))])
        for i, c0 in enumerate(caches[0].cross):
            if c0 is not None:
                s = max(c.cross[i][0].shape[2] for c in caches)
                out.cross[i] = tuple(torch.cat([F.pad(c.cross[i][j], (0, 0, 0, s - c.cross[i][j].shape[2]))
                                                for c in caches]) for j in (0, 1))
        return out


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


class FeatureCache:
    """Values computed from image or text content, keyed by (kind, content key), in one ByteLRU; `stats` counts
    `feature_hits` and `feature_misses`."""

    def __init__(self, max_bytes: int = 256 * 2**20, stats: Counter | None = None):
        self.lru = ByteLRU(max_bytes)
        self.stats = stats if stats is not None else Counter()

    @property
    def bytes(self) -> int:
        return self.lru.bytes

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        """The value under `key`, computed (without autograd) and kept on a miss."""
        value = self.lru.get(key)
        self.stats["feature_hits" if value is not None else "feature_misses"] += 1
        if value is None:
            with torch.inference_mode():
                value = compute()
            self.lru.put(key, value)
        return value

    def many(self, kind: str, keys: Sequence[str], compute: Callable[[list[int]], torch.Tensor], batch: int,
             stop: Callable[[], None] | None = None) -> list[torch.Tensor]:
        """The values (1, ...) of `kind` for content `keys`; the misses computed `batch` at a time by
        `compute(indices into keys) -> (b, ...)`, `stop()` called before each batch."""
        out = [self.lru.get((kind, k)) for k in keys]
        missing = [i for i, v in enumerate(out) if v is None]
        self.stats["feature_hits"] += len(keys) - len(missing)
        self.stats["feature_misses"] += len(missing)
        for start in range(0, len(missing), batch):
            if stop is not None:
                stop()
            chunk = missing[start:start + batch]
            with torch.inference_mode():
                values = compute(chunk)
            for j, i in enumerate(chunk):
                out[i] = values[j:j + 1]
                self.lru.put((kind, keys[i]), out[i])
        return out
