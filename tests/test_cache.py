"""blip2.cache: the bytes-bounded LRU the feature and prefix caches keep their tensors in."""

import torch

from blip2.cache import ByteLRU


def test_byte_lru():
    lru = ByteLRU(100)
    lru.put("a", torch.zeros(10))  # 40 bytes
    lru.put("b", torch.zeros(10))
    lru.get("a")
    lru.put("c", torch.zeros(10))  # evicts b, the least recently used
    assert lru.get("b") is None and lru.get("a") is not None and lru.bytes == 80
    lru.put("big", torch.zeros(100))  # larger than the budget: not kept
    assert lru.get("big") is None and lru.bytes == 80
