"""load_model: a checkpoint directory or hub id -> a model of the given class, planned on the meta device first
(checked against the safetensors headers, quantized, mapped), then read tensor by tensor into place."""

import ctypes
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn as nn

from .. import weight_only
from ..config import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, ConfigError, read_json
from ..dtypes import dtype_name, resolve_dtype
from ..quantization import QuantizationConfig, check_backend, is_quantized, replace_linears, set_quantized_weight
from ..units import human
from ..weight_only import WeightOnlyConfig
from .errors import CheckpointError, DeviceMapError
from .hub import resolve_checkpoint
from .placement import Device, dispatch, main_device, module_device, plan_device_map, unquantize_offloaded
from .safetensors import TensorInfo, checkpoint_tensors, mapped_tensor, read_tensor

M = TypeVar("M", bound=nn.Module)


def keep_fp32(name: str, model: nn.Module) -> bool:
    keep = model._keep_in_fp32_modules
    if any(k == "" or name == k or name.startswith(k + ".") for k in keep):
        return True
    # T5's feed-forward output overflows in fp16: kept in fp32 as the reference does
    return getattr(model.config, "model_type", "") == "blip-2" and model.config.is_encoder_decoder and ".wo." in name


def param_dtype(name: str, model: nn.Module, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float16 and keep_fp32(name, model) else dtype


def load_config(cls: type[nn.Module], path: str) -> tuple[Any, dict]:
    """(the config `cls` is built from, the raw config.json): a part of a full checkpoint reads its sub-config."""
    raw = read_json(os.path.join(path, "config.json"))
    if cls.config_class is Blip2Config:
        return Blip2Config.from_dict(raw), raw
    sub = {Blip2VisionConfig: "vision_config", Blip2QFormerConfig: "qformer_config"}[cls.config_class]
    if raw.get("model_type") == "blip-2":  # a part of a full checkpoint
        full = Blip2Config.from_dict(raw)
        return getattr(full, sub), raw
    if raw.get("model_type") != cls.config_class.model_type:
        raise ConfigError(f"{os.path.join(path, 'config.json')}: model_type {raw.get('model_type')!r} cannot "
                          f"build {cls.__name__}")
    return cls.config_class.from_dict(raw), raw


@dataclass
class Plan:
    """Everything decided before a byte of weight data is read."""

    model: nn.Module  # on the meta device, parameters in their final dtypes, bitsandbytes layers swapped in
    dtype: torch.dtype
    sources: dict  # parameter name -> TensorInfo (tied parameters excluded)
    ties: dict  # tied parameter name -> the parameter it shares
    device_map: dict  # module name -> device string, or "disk"
    quantization: QuantizationConfig | None
    path: str
    weight_only: WeightOnlyConfig | None = None  # int8 / int4 weight-only (CPU), see weight_only.py
    int4_layout: int | None = None  # the packing of a checkpoint saved in int4 (None: quantized while loading)


def tied_names(model: nn.Module, files: dict[str, TensorInfo], prefix: str) -> set[str]:
    """Parameters taken from another by tying: OPT's lm_head (tie_word_embeddings), T5's lm_head when the
    file has none (a separate lm_head in the file, as Flan-T5 has, is kept)."""
    names = {n for n in dict(model.named_parameters(remove_duplicate=False)) if n.endswith("lm_head.weight")}
    text = getattr(model.config, "text_config", None)
    if text is not None and text.model_type == "opt" and text.tie_word_embeddings:
        return names
    return {n for n in names if prefix + n not in files}


@contextmanager
def empty_init() -> Iterator[None]:
    """Build modules on the meta device without running torch.nn.init (wasted on meta tensors; and normal_ on a
    meta tensor imports torch._dynamo, seconds of a load)."""
    saved = {n: f for n, f in vars(torch.nn.init).items() if n.endswith("_") and not n.startswith("_")}
    for n in saved:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        with torch.device("meta"):
            yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def plan_load(cls: type[nn.Module], path: str, dtype: str | torch.dtype | None = None, device: Device | None = None,
              device_map: str | Device | dict | None = None, max_memory: dict | None = None, quantization: Any = None,
              config: Any = None, tensors: dict[str, TensorInfo] | None = None) -> Plan:
    """Build the meta model, check the checkpoint against it, quantize and map it. `tensors` (the checkpoint's
    TensorInfo) defaults to the headers in `path`."""
    config, raw = load_config(cls, path) if config is None else (config, {})
    dtype = resolve_dtype(dtype, raw)
    files = checkpoint_tensors(path) if tensors is None else tensors
    prefix = cls.checkpoint_prefix if raw.get("model_type") == "blip-2" and cls.checkpoint_prefix else ""
    with empty_init():
        model = cls(config)
    tied = tied_names(model, files, prefix)
    if tied:
        model.tie_weights()
    for name, p in model.named_parameters():  # final dtypes on meta: the device map sees the real sizes
        p.data = p.data.to(param_dtype(name, model, dtype))
    wq, saved, layout = weight_only.plan_config(quantization, raw)
    if saved:  # the checkpoint holds the quantized tensors themselves
        weight_only.replace_linears(model, wq, layout)
    params = dict(model.named_parameters(remove_duplicate=False))
    first = {}
    for name, p in params.items():
        first.setdefault(id(p), name)
    ties = {n: first[id(p)] for n, p in params.items() if first[id(p)] != n}
    sources, missing = {}, []
    for n, p in params.items():
        if n in ties:
            continue
        info = files.get(prefix + n)
        if info is None:
            missing.append(n)
        elif tuple(info.shape) != tuple(p.shape):
            raise CheckpointError(f"{info.file}: tensor {info.key} has shape {tuple(info.shape)}, the model expects "
                                  f"{tuple(p.shape)}")
        elif info.dtype != p.dtype and not (info.dtype.is_floating_point and p.dtype.is_floating_point):
            raise CheckpointError(f"{info.file}: tensor {info.key} is {dtype_name(info.dtype)}, the model expects "
                                  f"{dtype_name(p.dtype)} (integer data is never converted: the file was written by "
                                  f"another tool or damaged)")
        else:
            sources[n] = info
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        where = sorted({i.file for i in files.values()})[0] if files else path
        raise CheckpointError(f"checkpoint {where} lacks {len(missing)} tensor(s): {shown}")

    q = None if wq else QuantizationConfig.coerce(quantization)
    if device is not None and device_map is not None:
        raise ValueError("pass device or device_map, not both")
    if wq and not saved:
        for n in weight_only.replace_linears(model, wq):  # each reads its float weight (a tied lm_head: the table)
            if n + ".weight" in ties:
                sources[n + ".weight"] = sources[ties.pop(n + ".weight")]
    if q is not None and not replace_linears(model, q, dtype):
        warnings.warn(f"quantization={q.name}: {cls.__name__} has no language-model linear layers, nothing is "
                      f"quantized (QuantizationConfig(include_vision=True) quantizes the vision tower)")
    dm = plan_device_map(model, device, device_map, max_memory, q)
    if q is not None:
        check_backend(q, main_device(dm))
        unquantize_offloaded(model, dm, dtype)
    if wq:
        weight_only.check_device(dm)
        weight_only.mark_config(model, wq)
    return Plan(model, dtype, sources, ties, dm, q, path, wq, layout)


def load_model(cls: type[M], path_or_id: str | os.PathLike, dtype: str | torch.dtype | None = None,
               device: Device | None = None, device_map: str | Device | dict | None = None,
               max_memory: dict | None = None, offload_folder: str | None = None, quantization: Any = None,
               revision: str | None = None, cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
               local_files_only: bool | None = None, config: Any = None, torch_dtype: str | torch.dtype | None = None,
               quantization_config: Any = None, **kwargs: Any) -> M:
    """A model of class `cls` (its config_class, checkpoint_prefix and _keep_in_fp32_modules say how) loaded from
    a checkpoint directory or hub id; the arguments are from_pretrained's (see blip2/pretrained.py)."""
    if kwargs:
        raise TypeError(f"from_pretrained got unsupported arguments: {', '.join(kwargs)}")
    path = resolve_checkpoint(path_or_id, revision, cache_dir, token, local_files_only)
    from_hub = os.path.abspath(path) != os.path.abspath(os.path.expanduser(os.fspath(path_or_id)))
    try:
        plan = plan_load(cls, path, dtype if dtype is not None else torch_dtype, device, device_map, max_memory,
                         quantization if quantization is not None else quantization_config, config)
    except CheckpointError as e:
        if not from_hub:
            raise
        raise type(e)(f"{e}. The cached copy of {path_or_id} is damaged: fetch it again with "
                      f"`hf download {path_or_id} --force-download`") from None
    disk = {k for k, v in plan.device_map.items() if v == "disk"}
    if disk and offload_folder is None:
        raise DeviceMapError(offload_message(plan, disk, max_memory))
    written, planned = [], {n: p.dtype for n, p in plan.model.named_parameters()}
    try:
        index = place_weights(plan, offload_folder, written)
        model = plan.model
        if plan.ties:
            model.tie_weights()
        if len(set(plan.device_map.values())) > 1 or disk:
            dispatch(model, plan.device_map, offload_folder, index)
        check_loaded(plan, planned)
    except BaseException:
        for f in written:  # nothing half-loaded stays behind
            if os.path.exists(f):
                os.remove(f)
        raise
    model.hf_device_map = dict(plan.device_map)
    model.eval()
    return model


def check_loaded(plan: Plan, planned: dict[str, torch.dtype]) -> None:
    """The end of every load: each parameter read, on its device, in the dtype its kernel needs (`planned`: the
    dtypes of the meta model; a weight-only layer says its own; bitsandbytes' are its own). A parameter left on
    the meta device would crash a kernel, one of the wrong dtype would compute garbage."""
    wrong = []
    for name, p in plan.model.named_parameters():
        mod_name, _, attr = name.rpartition(".")
        module = plan.model.get_submodule(mod_name)
        where = module_device(name, plan.device_map)
        if where == "disk" or getattr(getattr(module, "_hf_hook", None), "offload", False):
            continue  # read on each call by accelerate's hook
        if p.is_meta:
            wrong.append(f"{name} was never read")
            continue
        want = torch.device(where)
        if p.device.type != want.type or (want.index is not None and p.device.index != want.index):
            wrong.append(f"{name} is on {p.device}, mapped to {where}")
        need = module.kernel_dtype(attr) if weight_only.is_weight_only(module) else \
            None if is_quantized(module) else planned.get(name)
        if need is not None and p.dtype != need:
            wrong.append(f"{name} is {dtype_name(p.dtype)}, its kernel needs {dtype_name(need)}")
    if wrong:
        shown = "; ".join(wrong[:5]) + (f"; and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        raise CheckpointError(f"checkpoint {plan.path} did not load whole: {shown}. Its config.json does not describe "
                              f"its tensors (edited, or written by another tool): restore it, or save the model "
                              f"again from the original checkpoint")


def offload_message(plan: Plan, disk: set[str], max_memory: dict | None) -> str:
    sizes = {}
    for n, p in plan.model.named_parameters():
        d = module_device(n, plan.device_map)
        if d == "disk":
            key = next(k for k in sorted(disk, key=len, reverse=True) if n == k or n.startswith(k + ".") or k == "")
            sizes[key] = sizes.get(key, 0) + p.numel() * p.element_size()
    shown = ", ".join(f"{k or 'the whole model'} ({human(v)})" for k, v in list(sizes.items())[:6])
    more = f" and {len(sizes) - 6} more" if len(sizes) > 6 else ""
    why = f"max_memory={max_memory}" if max_memory is not None else "the available memory"
    return (f"the model does not fit in {why}: {human(sum(sizes.values()))} would go to disk ({shown}{more}) but "
            f"no offload_folder was given. Fix: pass offload_folder='some/dir' to offload it, raise max_memory, "
            f"or shrink the model (dtype='bfloat16', quantization='8bit' or '4bit')")


def place_weights(plan: Plan, offload_folder: str | None, written: list[str]) -> dict:
    """Read every parameter once, in file order, into its final dtype and device. Returns the disk-offload index
    (accelerate's format): weights on disk point into the checkpoint itself when the dtype matches, otherwise
    they are converted and written to offload_folder."""
    from accelerate.utils import offload_weight, save_offload_index  # only offloading loads need accelerate

    model, index, maps = plan.model, {}, {}
    handles, buffer = {}, torch.empty(1 << 22, dtype=torch.uint8)  # one conversion buffer for the whole load
    try:
        for name, info in sorted(plan.sources.items(), key=lambda kv: (kv[1].file, kv[1].start)):
            mod_name, _, attr = name.rpartition(".")
            module = model.get_submodule(mod_name)
            target = module._parameters[attr]
            quant = is_quantized(module) and attr == "weight"
            if weight_only.is_weight_only(module):  # a float weight quantized here, or saved tensors read as they are
                fh = handles.get(info.file) or handles.setdefault(info.file, open(info.file, "rb", buffering=0))
                module.load(attr, read_tensor(info, module.dtype, fh, buffer), plan.int4_layout)
                trim_heap()
                continue
            dtype = target.dtype
            if quant:  # LLM.int8() quantizes from fp16: read straight into it; 4-bit keeps the model's dtype
                dtype = torch.float16 if plan.quantization.bits == 8 else plan.dtype
            device = module_device(name, plan.device_map)
            if device == "disk":
                if info.dtype == dtype:
                    index[name] = {"safetensors_file": info.file, "weight_name": info.key, "dtype": dtype_name(dtype)}
                else:
                    os.makedirs(offload_folder, exist_ok=True)
                    written.append(os.path.join(offload_folder, f"{name}.dat"))
                    offload_weight(read_tensor(info, dtype, buffer=buffer), name, offload_folder, index)
                continue
            if device == "cpu" and info.dtype == dtype and not quant:  # no copy: a view of the mapped file
                t = mapped_tensor(info, maps)
                module._parameters[attr] = nn.Parameter(t, requires_grad=t.is_floating_point())
                continue
            fh = handles.get(info.file) or handles.setdefault(info.file, open(info.file, "rb", buffering=0))
            t = read_tensor(info, dtype, fh, buffer)
            if quant:
                set_quantized_weight(module, t, device)
                del t
                trim_heap()  # quantizing frees temporaries between kept tensors: give those holes back
            else:
                t = t.to(device)
                module._parameters[attr] = nn.Parameter(t, requires_grad=t.is_floating_point())
    finally:
        for fh in handles.values():
            fh.close()
    for alias, src in plan.ties.items():
        if src in index:
            index[alias] = index[src]
    if index:  # for people and tools that look in the folder; the load itself passes `index` on
        os.makedirs(offload_folder, exist_ok=True)
        if not os.path.exists(os.path.join(offload_folder, "index.json")):
            written.append(os.path.join(offload_folder, "index.json"))
        save_offload_index(index, offload_folder)
    return index


def trim_heap() -> None:
    """glibc's malloc_trim(0): return freed heap memory to the OS (else freed temporaries between live tensors
    keep the resident size up). A no-op elsewhere."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None
