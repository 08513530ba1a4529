"""safetensors files read by hand: headers (no tensor data), one tensor at a time into its final dtype through a
small reusable buffer, or a copy-on-write memory map of the file."""

import json
import os
from dataclasses import dataclass
from typing import BinaryIO

import torch

from ..config import ConfigError, read_json
from .errors import CheckpointError

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file: absolute byte range [start, end)."""

    file: str
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(file: str) -> dict[str, TensorInfo]:
    """key -> TensorInfo from a safetensors header (8-byte length + JSON); no tensor data is read. The file
    must be complete: every tensor's bytes must lie inside it."""
    bad = f"{file} is not a readable safetensors file"
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(f"{bad}: the header length field says {n} bytes but the file has {size} "
                                      f"(corrupt, or cut off while downloading or copying)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{bad}: {e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{bad}: its JSON header is corrupt ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad}: the header is not a JSON object")
    header.pop("__metadata__", None)
    base, infos = 8 + n, {}
    for key, h in header.items():
        try:
            dtype, shape, (start, end) = ST_DTYPES[h["dtype"]], tuple(h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{bad}: tensor {key} has a malformed header entry {h!r}") from None
        info = TensorInfo(file, key, dtype, shape, base + start, base + end)
        if end - start != info.numel * dtype.itemsize or start < 0:
            raise CheckpointError(f"{bad}: tensor {key} spans {end - start} bytes, its shape {shape} and dtype "
                                  f"{h['dtype']} need {info.numel * dtype.itemsize}")
        if info.end > size:
            raise CheckpointError(f"{file} is truncated: {size} bytes, but tensor {key} ends at byte {info.end} "
                                  f"(an interrupted download or copy)")
        infos[key] = info
    return infos


def checkpoint_tensors(path: str) -> dict[str, TensorInfo]:
    """key -> TensorInfo for the whole checkpoint (model.safetensors, or the shards of the index)."""
    single, index = os.path.join(path, SINGLE), os.path.join(path, INDEX)
    if os.path.isfile(index):
        try:
            weight_map = read_json(index)["weight_map"]
        except KeyError:
            raise CheckpointError(f"{index} has no 'weight_map'") from None
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        infos = {}
        for shard in sorted(set(weight_map.values())):
            file = os.path.join(path, shard)
            if not os.path.isfile(file):
                raise CheckpointError(f"shard {file} listed in {index} is missing")
            infos.update(read_header(file))
        for key, shard in weight_map.items():
            if key not in infos or infos[key].file != os.path.join(path, shard):
                raise CheckpointError(f"{index} maps tensor {key} to {shard}, which does not hold it")
        return infos
    if os.path.isfile(single):
        return read_header(single)
    pickles = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")))
    hint = (f" (found {', '.join(pickles)}: pickle checkpoints are never loaded; convert them to safetensors, e.g. "
            f"by loading with transformers and calling save_pretrained)" if pickles else "")
    raise CheckpointError(f"no {SINGLE} or {INDEX} in {path}{hint}")


def read_tensor(info: TensorInfo, dtype: torch.dtype | None = None, fh: BinaryIO | None = None,
                buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor into a new CPU tensor of `dtype` (floating tensors only are converted). A conversion goes
    through `buffer` (a reusable uint8 tensor; 4 MiB by default) a slice at a time, so no full-size copy in the
    file's dtype is ever made."""
    dtype = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
    out = torch.empty(info.shape, dtype=dtype)
    flat, n, size = out.view(-1), info.numel, info.dtype.itemsize
    own = fh is None
    fh = open(info.file, "rb", buffering=0) if own else fh
    try:
        if dtype == info.dtype:
            read_exact(fh, info, info.start, flat.view(torch.uint8))
        else:
            buffer = torch.empty(1 << 22, dtype=torch.uint8) if buffer is None else buffer
            step = len(buffer) // size
            for i in range(0, n, step):
                k = min(step, n - i)
                chunk = buffer[:k * size]
                read_exact(fh, info, info.start + i * size, chunk)
                flat[i:i + k].copy_(chunk.view(info.dtype))
    finally:
        if own:
            fh.close()
    return out


def mapped_tensor(info: TensorInfo, maps: dict[str, torch.UntypedStorage]) -> torch.Tensor:
    """The tensor as a view of its file mapped copy-on-write (`maps`: file -> storage, filled on first use), as
    transformers loads with safetensors: loading costs no copy, pages are read from the page cache when first
    used, and writes (training) go to private copies, never to the file."""
    storage = maps.get(info.file)
    if storage is None:
        storage = maps[info.file] = torch.UntypedStorage.from_file(info.file, shared=False,
                                                                   nbytes=os.path.getsize(info.file))
    return torch.empty(0, dtype=info.dtype).set_(storage[info.start:info.end]).view(info.shape)


def read_exact(fh: BinaryIO, info: TensorInfo, offset: int, dst: torch.Tensor) -> None:
    view, got = memoryview(dst.numpy()), 0
    fh.seek(offset)
    while got < len(view):
        k = fh.readinto(view[got:])
        if not k:
            raise CheckpointError(f"{info.file} is truncated: tensor {info.key} ends before byte {info.end}")
        got += k
