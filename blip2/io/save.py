"""save_model: config.json (+ generation_config.json) and safetensors, sharded above a size."""

import json
import os
import re

import torch.nn as nn
from safetensors.torch import save_file

from ..config import Blip2Config
from ..dtypes import dtype_name
from ..units import parse_size
from .safetensors import INDEX, SINGLE


def save_model(model: nn.Module, path: str | os.PathLike, max_shard_size: int | str | None = None,
               safe_serialization: bool = True) -> None:
    """Write config.json (+ generation_config.json) and safetensors (sharded above max_shard_size bytes, an int
    or a string such as "200MB"); tied tensors are written once, as the reference does."""
    if not safe_serialization:
        raise ValueError("only safetensors serialization is supported")
    if isinstance(max_shard_size, str):
        max_shard_size = parse_size(max_shard_size)
    os.makedirs(path, exist_ok=True)
    write_config(model, path)
    tensors, seen = {}, set()
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = t.detach().to("cpu").contiguous()
    shards = [tensors]
    if max_shard_size:
        shards, size = [{}], 0
        for name, t in tensors.items():
            n = t.numel() * t.element_size()
            if shards[-1] and size + n > max_shard_size:
                shards, size = shards + [{}], 0
            shards[-1][name] = t
            size += n
    for old in [SINGLE, INDEX] + [f for f in os.listdir(path) if re.fullmatch(r"model-\d+-of-\d+\.safetensors", f)]:
        if os.path.exists(os.path.join(path, old)):
            os.remove(os.path.join(path, old))
    if len(shards) == 1:
        save_file(tensors, os.path.join(path, SINGLE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


def write_config(model: nn.Module, path: str | os.PathLike) -> None:
    config = model.config
    dtype = dtype_name(model.dtype)
    if isinstance(config, Blip2Config):
        config.save_pretrained(path, architecture=type(model).__name__, dtype=dtype)
        if hasattr(model, "language_model"):
            tc = config.text_config
            gen = {"bos_token_id": tc.bos_token_id, "eos_token_id": tc.eos_token_id, "pad_token_id": tc.pad_token_id}
            if config.is_encoder_decoder:
                gen["decoder_start_token_id"] = tc.decoder_start_token_id
            with open(os.path.join(path, "generation_config.json"), "w") as f:
                json.dump(gen, f, indent=2, sort_keys=True)
        return
    d = {**config.to_dict(), "architectures": [type(model).__name__], "dtype": dtype}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
