"""Key/value cache for incremental decoding: one growable buffer per layer and per attention kind."""

import torch


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
        buf_k = self.k[layer]
        if buf_k is None or buf_k.shape[2] < end:
            cap = max(end, 2 * (0 if buf_k is None else buf_k.shape[2]), 16)
            new_k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            new_v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
            if buf_k is not None:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = self.v[layer][:, :, :start]
            self.k[layer], self.v[layer] = new_k, new_v
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

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

    def copy(self) -> "KVCache":
        c = KVCache(len(self.k))
        c.length = self.length
        c.k = [None if t is None else t[:, :, : self.length].clone() for t in self.k]
        c.v = [None if t is None else t[:, :, : self.length].clone() for t in self.v]
        c.cross = list(self.cross)
        return c
