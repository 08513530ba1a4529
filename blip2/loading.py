"""from_pretrained / save_pretrained in the Hugging Face checkpoint format, safetensors only.

Loading, in order (nothing is allocated before the checkpoint is known to be complete and to fit):
1. resolve: a local directory, or a hub id fetched into the Hugging Face cache (huggingface_hub);
2. read every safetensors header and check it against the model built on the meta device
   (missing / misshapen tensors, truncated files: a CheckpointError naming the file and key);
3. quantization: swap the language model's nn.Linear for bitsandbytes layers (still on meta);
4. device map: accelerate's infer_auto_device_map for "auto"/"balanced"/"sequential", or the given one;
5. read each tensor from disk straight into its final dtype, then place it: on its device (quantized there
   when asked), or on disk (the offload folder, or the checkpoint itself when the dtype already matches);
6. several devices or disk: accelerate's dispatch_model moves activations (and offloaded weights) at run time.
"""

import ctypes
import json
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
from safetensors.torch import save_file

from . import weight_only
from .config import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, ConfigError, read_json
from .quantization import QuantizationConfig, check_backend, is_quantized, replace_linears, set_quantized_weight
from .weight_only import WeightOnlyConfig

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
# what a hub download fetches: the model, and what Blip2Processor reads (never *.bin / *.pt / *.h5 / *.msgpack)
MODEL_FILES = ["config.json", "generation_config.json", SINGLE, INDEX, "model-*-of-*.safetensors"]
PROCESSOR_FILES = ["preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.json", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model"]
AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the checkpoint (file and key), cause and fix."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No such local directory, no such (accessible) hub repo, or not cached while offline."""


class DeviceMapError(ValueError):
    """A device map that cannot hold the model: the message names what does not fit and the fix."""


class PretrainedMixin:
    """from_pretrained / save_pretrained / dtype / device for every public model class."""

    config_class = Blip2Config
    checkpoint_prefix = ""  # where this model's keys live inside a full BLIP-2 checkpoint
    _keep_in_fp32_modules = ()
    _no_split_modules = ("Blip2EncoderLayer", "Blip2QFormerLayer", "OPTDecoderLayer", "T5Block",
                         "Blip2TextEmbeddings", "Blip2VisionEmbeddings")

    @classmethod
    def from_pretrained(cls, path_or_id, **kwargs):
        """Load a local directory or a hub id (Hugging Face format, safetensors). Keyword arguments:
        dtype ("float32" default, "float16", "bfloat16", "auto", or a torch.dtype; torch_dtype is an alias),
        device ("cpu", "cuda:0", ...) or device_map ("auto", "balanced", "balanced_low_0", "sequential", or
        {module name: device | "cpu" | "disk"}) with max_memory ({0: "10GiB", "cpu": "30GiB"}) and
        offload_folder (for what goes to disk), quantization ("8bit", "4bit", "fp4", QuantizationConfig),
        revision, cache_dir, token, local_files_only (hub ids)."""
        return load_model(cls, path_or_id, **kwargs)

    def save_pretrained(self, path, **kwargs):
        save_model(self, path, **kwargs)

    @property
    def dtype(self):
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @property
    def device(self):
        """Where inputs go: the main device of a dispatched model (its parameters may sit on disk), else the
        parameters' device."""
        dm = getattr(self, "hf_device_map", None)
        if dm and (len(set(dm.values())) > 1 or "disk" in dm.values()):
            return torch.device(main_device(dm))
        return next(self.parameters()).device


def resolve_dtype(dtype, config_dict=None):
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        dtype = (config_dict or {}).get("dtype") or (config_dict or {}).get("torch_dtype") or "float32"
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype {dtype} is not supported (float32, float16, bfloat16)")
        return dtype
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported (choose from {', '.join(DTYPES)})")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------------------------------------------
# 1. local directory or hub id


def is_offline() -> bool:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or constants.HF_HUB_OFFLINE


def hub_cache_dir(cache_dir=None):
    """cache_dir, else HF_HUB_CACHE, else HF_HOME/hub, read now (huggingface_hub reads them once, at import)."""
    if cache_dir is not None:
        return os.fspath(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def download_hint(repo_id):
    return f"`hf download {repo_id}` (or `huggingface-cli download {repo_id}`)"


def looks_local(path: str) -> bool:
    """A path rather than a hub id (org/name)."""
    return path.startswith((".", "/", "~", os.sep)) or path.count("/") > 1 or "\\" in path


def resolve_checkpoint(path_or_id, revision=None, cache_dir=None, token=None, local_files_only=None,
                       allow_patterns=None) -> str:
    """A local checkpoint directory for `path_or_id`: the directory itself, or the Hugging Face cache snapshot of
    a hub id (downloaded if needed; only `allow_patterns`, by default the model and processor files).
    Honours HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE=1 and HF_TOKEN. Raises CheckpointError subclasses that name
    the id, the cause and the fix."""
    path = os.path.expanduser(os.fspath(path_or_id))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointNotFoundError(f"{path} is a file; pass the checkpoint directory (config.json and "
                                      f"*.safetensors) or a hub id")
    if looks_local(path):
        raise CheckpointNotFoundError(f"checkpoint directory {path} not found")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = is_offline() if local_files_only is None else bool(local_files_only)
    cache = hub_cache_dir(cache_dir)
    at = f" at revision {revision!r}" if revision else ""
    try:
        return snapshot_download(path, revision=revision, cache_dir=cache, token=token, local_files_only=offline,
                                 allow_patterns=allow_patterns or MODEL_FILES + PROCESSOR_FILES)
    except HFValidationError:
        msg = f"{path!r} is neither a local directory nor a valid Hugging Face hub id (org/name)"
    except GatedRepoError:
        raise CheckpointNotFoundError(
            f"{path} is a gated repository on the Hugging Face Hub and this request has no access. Fix: accept its "
            f"terms at https://huggingface.co/{path}, then pass token=... or set HF_TOKEN (or run `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        msg = (f"{path}: no such repository on the Hugging Face Hub, or it is private (then pass token=... or set "
               f"HF_TOKEN), and no local directory of that name exists")
    except RevisionNotFoundError:
        msg = f"{path} has no revision {revision!r} on the Hugging Face Hub (use a branch, tag or commit hash)"
    except LocalEntryNotFoundError:
        if offline:
            why = "HF_HUB_OFFLINE=1" if local_files_only is None else "local_files_only=True"
            msg = (f"{path}{at} is not in the Hugging Face cache ({cache}) and downloads are off ({why}). "
                   f"Fix: download it once while online with {download_hint(path)}, point HF_HUB_CACHE / "
                   f"cache_dir at the cache that holds it, or pass a local checkpoint directory")
        else:
            msg = (f"{path}{at} could not be fetched from the Hugging Face Hub (no connection?) and is not in the "
                   f"cache ({cache}). Fix: check the network and retry, download it with {download_hint(path)}, "
                   f"or pass a local checkpoint directory")
    except (HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}{at}: download from the Hugging Face Hub failed ({first}). Fix: retry, or "
                              f"download it with {download_hint(path)}") from None
    raise CheckpointNotFoundError(msg)


# ---------------------------------------------------------------------------------------------------------------
# 2. safetensors headers

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file: absolute byte range [start, end)."""

    file: str
    key: str
    dtype: torch.dtype
    shape: tuple
    start: int
    end: int

    @property
    def numel(self):
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(file: str) -> dict:
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


def checkpoint_tensors(path: str) -> dict:
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


def read_tensor(info: TensorInfo, dtype=None, fh=None, buffer=None) -> torch.Tensor:
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


def mapped_tensor(info: TensorInfo, maps: dict) -> torch.Tensor:
    """The tensor as a view of its file mapped copy-on-write (`maps`: file -> storage, filled on first use), as
    transformers loads with safetensors: loading costs no copy, pages are read from the page cache when first
    used, and writes (training) go to private copies, never to the file."""
    storage = maps.get(info.file)
    if storage is None:
        storage = maps[info.file] = torch.UntypedStorage.from_file(info.file, shared=False,
                                                                   nbytes=os.path.getsize(info.file))
    return torch.empty(0, dtype=info.dtype).set_(storage[info.start:info.end]).view(info.shape)


def read_exact(fh, info, offset, dst: torch.Tensor):
    view, got = memoryview(dst.numpy()), 0
    fh.seek(offset)
    while got < len(view):
        k = fh.readinto(view[got:])
        if not k:
            raise CheckpointError(f"{info.file} is truncated: tensor {info.key} ends before byte {info.end}")
        got += k


# ---------------------------------------------------------------------------------------------------------------
# 3-4. the model on the meta device, checked against the checkpoint, quantized and mapped to devices


def keep_fp32(name: str, model) -> bool:
    keep = model._keep_in_fp32_modules
    if any(k == "" or name == k or name.startswith(k + ".") for k in keep):
        return True
    # T5's feed-forward output overflows in fp16: kept in fp32 as the reference does
    return getattr(model.config, "model_type", "") == "blip-2" and model.config.is_encoder_decoder and ".wo." in name


def param_dtype(name, model, dtype):
    return torch.float32 if dtype == torch.float16 and keep_fp32(name, model) else dtype


def load_config(cls, path):
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


def tied_names(model, files, prefix) -> set:
    """Parameters taken from another by tying: OPT's lm_head (tie_word_embeddings), T5's lm_head when the
    file has none (a separate lm_head in the file, as Flan-T5 has, is kept)."""
    names = {n for n in dict(model.named_parameters(remove_duplicate=False)) if n.endswith("lm_head.weight")}
    text = getattr(model.config, "text_config", None)
    if text is not None and text.model_type == "opt" and text.tie_word_embeddings:
        return names
    return {n for n in names if prefix + n not in files}


@contextmanager
def empty_init():
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


def plan_load(cls, path, dtype=None, device=None, device_map=None, max_memory=None, quantization=None,
              config=None, tensors=None) -> Plan:
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
    wq, layout = weight_only.plan_config(quantization, raw)
    if layout is not None:  # saved quantized: the checkpoint holds the quantized tensors themselves
        weight_only.replace_linears(model, wq)
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
        else:
            sources[n] = info
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        where = sorted({i.file for i in files.values()})[0] if files else path
        raise CheckpointError(f"checkpoint {where} lacks {len(missing)} tensor(s): {shown}")

    q = None if wq else QuantizationConfig.coerce(quantization)
    if device is not None and device_map is not None:
        raise ValueError("pass device or device_map, not both")
    if wq and layout is None:
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


def norm_device(d) -> str:
    if d == "disk":
        return "disk"
    if isinstance(d, int):
        return f"cuda:{d}"
    d = torch.device(d)
    return str(d) if d.type == "cpu" or d.index is not None else f"{d.type}:0"


def main_device(device_map) -> str:
    """Where activations live by default: the first accelerator of the map, else the CPU."""
    devices = [norm_device(d) for d in device_map.values()]
    return next((d for d in devices if d not in ("cpu", "disk")), "cpu")


def module_device(name, device_map):
    """The device_map entry that holds parameter or module `name` (the longest matching prefix)."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        key = ".".join(parts[:i])
        if key in device_map:
            return device_map[key]
    raise DeviceMapError(f"device_map gives no device for {name}: add an entry for it (or for a module holding it, "
                         f"\"\" for the whole model)")


def quant_sizes(model, q):
    """special_dtypes for accelerate's size estimates: the bytes per element a quantized weight really takes."""
    if q is None:
        return None
    from accelerate.utils import CustomDtype

    small = torch.int8 if q.bits == 8 else CustomDtype.INT4
    return {f"{n}.weight": small for n, m in model.named_modules() if is_quantized(m)}


def plan_device_map(model, device=None, device_map=None, max_memory=None, q=None) -> dict:
    """module name -> "cpu" / "cuda:i" / "disk" for the meta model (final dtypes already set)."""
    if device_map is None:
        dm = {"": norm_device(device or "cpu")}
    elif isinstance(device_map, dict):
        dm = flat_device_map(model, {k: norm_device(v) for k, v in device_map.items()})
    elif isinstance(device_map, (int, torch.device)) or device_map not in AUTO_MAPS:
        dm = {"": norm_device(device_map)}
    else:
        from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

        no_split = [c for c in model._no_split_modules]
        special = quant_sizes(model, q)
        if device_map == "sequential":
            budget = get_max_memory(max_memory)
        else:
            budget = get_balanced_memory(model, max_memory, no_split_module_classes=no_split,
                                         special_dtypes=special, low_zero=device_map == "balanced_low_0")
        dm = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split,
                                   special_dtypes=special)
        dm = {k: norm_device(v) for k, v in dm.items()}
        if dm.get("query_tokens") == "disk":  # a bare parameter of the root: kept where the code runs
            dm["query_tokens"] = main_device(dm)
    check_device_map(model, dm)
    return dm


def flat_device_map(model, dm):
    """accelerate wants no entry inside another: a module whose descendants have entries of their own is split
    into its children (and its own parameters), which keep its device unless they have an entry."""
    dm = dict(dm)
    while True:
        parent = next((k for k in dm if any(o != k and (k == "" or o.startswith(k + ".")) for o in dm)), None)
        if parent is None:
            return dm
        device = dm.pop(parent)
        try:
            module = model.get_submodule(parent)
        except AttributeError:
            raise DeviceMapError(f"device_map entry {parent!r} is not a module of {type(model).__name__}") from None
        pre = parent + "." if parent else ""
        for n, _ in list(module.named_children()) + list(module.named_parameters(recurse=False)):
            dm.setdefault(pre + n, device)


def check_device_map(model, dm):
    for d in sorted(set(dm.values()) - {"cpu", "disk"}):
        kind, index = torch.device(d).type, torch.device(d).index or 0
        backend = getattr(torch, kind, None)
        if backend is None or not backend.is_available() or index >= backend.device_count():
            raise DeviceMapError(f"device {d} is not available here (torch {torch.__version__} sees "
                                 f"{backend.device_count() if backend and backend.is_available() else 0} {kind} "
                                 f"device(s)): use device='cpu' or a device that exists")
    groups = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        module_device(n, dm)  # every parameter has a device
        groups.setdefault(id(p), []).append(n)
    for group in groups.values():
        devices = {module_device(n, dm) for n in group}
        if len(devices) > 1:
            raise DeviceMapError(f"tied parameters {', '.join(group)} are shared but the device_map puts them on "
                                 f"{', '.join(sorted(devices))}: map them to one device")


def unquantize_offloaded(model, dm, dtype):
    """bitsandbytes layers cannot be offloaded: those mapped to disk (or to the CPU next to a GPU, as the
    reference's llm_int8_enable_fp32_cpu_offload) become plain Linear layers again."""
    gpu = main_device(dm) != "cpu"
    for n, m in list(model.named_modules()):
        if is_quantized(m) and module_device(n, dm) in (("disk", "cpu") if gpu else ("disk",)):
            with torch.device("meta"):
                lin = nn.Linear(m.in_features, m.out_features, m.bias is not None, dtype=dtype)
            model.set_submodule(n, lin)


# ---------------------------------------------------------------------------------------------------------------
# 5-6. read, place, dispatch


def load_model(cls, path_or_id, dtype=None, device=None, device_map=None, max_memory=None, offload_folder=None,
               quantization=None, revision=None, cache_dir=None, token=None, local_files_only=None, config=None,
               torch_dtype=None, quantization_config=None, **kwargs):
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
    written = []
    try:
        index = place_weights(plan, offload_folder, written)
        model = plan.model
        if plan.ties:
            model.tie_weights()
        if len(set(plan.device_map.values())) > 1 or disk:
            dispatch(plan, offload_folder, index)
    except BaseException:
        for f in written:  # nothing half-loaded stays behind
            if os.path.exists(f):
                os.remove(f)
        raise
    model.hf_device_map = dict(plan.device_map)
    model.eval()
    return model


def offload_message(plan, disk, max_memory):
    from .memory import human

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


def place_weights(plan, offload_folder, written) -> dict:
    """Read every parameter once, in file order, into its final dtype and device. Returns the disk-offload index
    (accelerate's format): weights on disk point into the checkpoint itself when the dtype matches, otherwise
    they are converted and written to offload_folder."""
    from accelerate.utils import offload_weight, save_offload_index

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


def trim_heap():
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


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def dispatch(plan, offload_folder, index):
    """accelerate hooks: each mapped module runs on its device; disk modules load their weights per call."""
    from accelerate import dispatch_model
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

    model, dm = plan.model, plan.device_map
    main = main_device(dm)
    # T5's relative position table is read by its stack, outside the forward of the block holding it: it gets a
    # hook of its own, so that it is loaded (when offloaded) and fed on its device
    tables, cpu_weights = {}, {}
    for name, m in model.named_modules():
        if name.endswith("relative_attention_bias"):
            where = module_device(name, dm)
            tables[name] = (m, where == "disk" or (where == "cpu" and main != "cpu"), where)
            if where == "cpu" and main != "cpu":
                cpu_weights[name + ".weight"] = m.weight.data
    with warnings.catch_warnings():  # accelerate warns about entries naming a parameter (query_tokens)
        warnings.filterwarnings("ignore", message="The following device_map keys do not match any submodules")
        dispatch_model(model, dm, main_device=main, offload_dir=offload_folder if index else None,
                       offload_index=index or None)
    weights = OffloadedWeightsLoader(state_dict=cpu_weights, save_folder=offload_folder, index=index, device=main)
    for name, (m, offload, where) in tables.items():
        hook = AlignDevicesHook(execution_device=main if offload else where, offload=offload, io_same_device=True,
                                weights_map=PrefixedDataset(weights, name + ".") if offload else None)
        add_hook_to_module(m, hook, append=True)


# ---------------------------------------------------------------------------------------------------------------
# saving


def save_model(model, path, max_shard_size=None, safe_serialization=True):
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


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", s.upper())
    if not m:
        raise ValueError(f"size {s!r}: use e.g. 200MB, 5GB, 1GiB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


def write_config(model, path):
    config = model.config
    dtype = str(model.dtype).removeprefix("torch.")
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
