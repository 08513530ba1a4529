"""How many bytes each part of a BLIP-2 model takes, per device.

memory_report(path_or_id, dtype=..., quantization=..., device_map=...): BEFORE loading, from the safetensors
headers (shapes) and the loading plan (dtypes kept in fp32, quantized layers, device map); no tensor is read.
model_memory(model): AFTER loading, from the model's parameters (quantization scales included; disk-offloaded
weights counted under "disk"). Both return a MemoryReport: `.as_dict()`, `.table()` (also `str(report)`).
"""

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .dtypes import dtype_name
from .io.hub import local_or_remote
from .io.load import plan_load
from .io.placement import module_device
from .io.safetensors import checkpoint_tensors
from .modeling import Blip2ForConditionalGeneration
from .quantization import is_quantized, quantized_param_bytes, weight_bytes
from .units import human

PARTS = ("vision_model", "qformer", "language_projection", "language_model.embeddings", "language_model.layers",
         "language_model.lm_head", "language_model.other", "other")


def part_of(name: str) -> str:
    """The report row of a parameter name."""
    if name.startswith("vision_model."):
        return "vision_model"
    if name.startswith("qformer.") or name == "query_tokens":
        return "qformer"  # with the query tokens
    if name.startswith("language_projection."):
        return "language_projection"
    if name.startswith("language_model."):
        if ".lm_head." in name:
            return "language_model.lm_head"
        if any(k in name for k in (".embed_tokens.", ".embed_positions.", ".shared.")):
            return "language_model.embeddings"
        if ".layers." in name or ".block." in name:
            return "language_model.layers"
        return "language_model.other"  # final norms, project_in / project_out
    return "other"  # retrieval models: text embeddings, projections, ITM head


@dataclass
class Row:
    params: int = 0
    bytes: int = 0
    dtypes: set = field(default_factory=set)
    devices: dict = field(default_factory=dict)  # device -> bytes
    tied_to: str = ""


@dataclass
class MemoryReport:
    title: str
    rows: dict  # part -> Row

    @property
    def total(self) -> int:
        return sum(r.bytes for r in self.rows.values())

    @property
    def devices(self) -> dict:
        out = {}
        for r in self.rows.values():
            for d, b in r.devices.items():
                out[d] = out.get(d, 0) + b
        return out

    def as_dict(self) -> dict:
        parts = {p: {"params": r.params, "bytes": r.bytes, "dtypes": sorted(r.dtypes), "devices": dict(r.devices),
                     **({"tied_to": r.tied_to} if r.tied_to else {})} for p, r in self.rows.items()}
        return {"title": self.title, "parts": parts, "total_bytes": self.total, "devices": self.devices}

    def table(self) -> str:
        lines = [self.title, f"{'part':<28}{'params':>10}{'bytes':>13}  {'dtype':<22}devices"]
        for p, r in self.rows.items():
            if r.tied_to and not r.bytes:
                lines.append(f"{p:<28}{'':>10}{'0 B':>13}  tied to {r.tied_to}")
                continue
            devices = ", ".join(f"{d} {human(b)}" for d, b in r.devices.items())
            lines.append(f"{p:<28}{r.params / 1e6:>9.2f}M{human(r.bytes):>13}  {'+'.join(sorted(r.dtypes)):<22}"
                         f"{devices}")
        params = sum(r.params for r in self.rows.values())
        lines.append(f"{'total':<28}{params / 1e6:>9.2f}M{human(self.total):>13}  "
                     f"{'':<22}{', '.join(f'{d} {human(b)}' for d, b in self.devices.items())}")
        return "\n".join(lines)

    __str__ = table


def build(title: str, entries: list[tuple]) -> MemoryReport:
    """entries: (name, numel, bytes, dtype name, device, tied_to or "")."""
    rows = {}
    for name, numel, nbytes, dtype, device, tied_to in entries:
        r = rows.setdefault(part_of(name), Row())
        if tied_to:
            r.tied_to = r.tied_to or part_of(tied_to)
            continue
        r.params += numel
        r.bytes += nbytes
        r.dtypes.add(dtype)
        r.devices[device] = r.devices.get(device, 0) + nbytes
    return MemoryReport(title, {p: rows[p] for p in PARTS if p in rows})


def memory_report(path_or_id: str | os.PathLike, model_class: type[nn.Module] | None = None,
                  dtype: str | torch.dtype | None = None, quantization: Any = None, device: str | None = None,
                  device_map: str | dict | None = None, max_memory: dict | None = None, revision: str | None = None,
                  cache_dir: str | None = None, token: str | bool | None = None,
                  local_files_only: bool | None = None) -> MemoryReport:
    """The bytes each part of the model will take once loaded with these settings, per device, from the
    safetensors headers (a hub id that is not cached is read remotely: headers only, no weights)."""
    cls = model_class or Blip2ForConditionalGeneration
    path, tensors = local_or_remote(path_or_id, revision, cache_dir, token, local_files_only)
    if tensors is None:
        tensors = checkpoint_tensors(path)
    plan = plan_load(cls, path, dtype, device, device_map, max_memory, quantization, tensors=tensors)
    entries = []
    for name, p in plan.model.named_parameters(remove_duplicate=False):
        dev = module_device(name, plan.device_map)
        if name in plan.ties:
            entries.append((name, p.numel(), 0, "", dev, plan.ties[name]))
            continue
        mod_name, _, attr = name.rpartition(".")
        if name not in plan.sources or p.dtype in (torch.int8, torch.uint8):  # weight-only: the meta tensor's size
            entries.append((name, p.numel() * (2 if p.dtype == torch.uint8 else 1), p.numel() * p.element_size(),
                            dtype_name(p.dtype), dev, ""))
            continue
        info = plan.sources[name]
        if is_quantized(plan.model.get_submodule(mod_name)) and attr == "weight":
            q = plan.quantization
            entries.append((name, info.numel, weight_bytes(info.shape, q), "int8" if q.bits == 8 else q.quant_type,
                            dev, ""))
        else:
            entries.append((name, info.numel, info.numel * p.element_size(), dtype_name(p.dtype), dev, ""))
    quant = plan.quantization or plan.weight_only
    what = dtype_name(plan.dtype) + (f", {quant.name}" if quant else "")
    return build(f"{path_or_id} ({what}), before loading, from the safetensors headers", entries)


def model_memory(model: nn.Module) -> MemoryReport:
    """The bytes the loaded model's parameters take, per part and per device ("disk" for offloaded weights)."""
    device_map = getattr(model, "hf_device_map", None)
    owner = {id(m.weight): m for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}
    first, entries = {}, []
    for name, p in model.named_parameters(remove_duplicate=False):
        dev = module_device(name, device_map) if device_map else str(p.device)
        if id(p) in first:
            entries.append((name, p.numel(), 0, "", dev, first[id(p)]))
            continue
        first[id(p)] = name
        quantized = p.dtype in (torch.int8, torch.uint8)
        nbytes = quantized_param_bytes(p, owner.get(id(p))) if quantized else p.numel() * p.element_size()
        numel = p.numel() * (2 if p.dtype == torch.uint8 and getattr(p, "quant_state", None) is not None else 1)
        entries.append((name, numel, nbytes, dtype_name(p.dtype), dev, ""))
    return build(f"{type(model).__name__}, after loading", entries)
