"""from_pretrained / save_pretrained in the Hugging Face checkpoint format, safetensors only.

The model is built on the meta device and each tensor is read from its (memory-mapped) safetensors file
straight into its final dtype and device, so a checkpoint is never held twice in memory.
"""

import json
import os

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, ConfigError, read_json

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and key at fault."""


class PretrainedMixin:
    """from_pretrained / save_pretrained / dtype / device for every public model class."""

    config_class = Blip2Config
    checkpoint_prefix = ""  # where this model's keys live inside a full BLIP-2 checkpoint
    _keep_in_fp32_modules = ()
    _no_split_modules = ("Blip2EncoderLayer", "Blip2QFormerLayer", "OPTDecoderLayer", "T5Block",
                         "Blip2TextEmbeddings", "Blip2VisionEmbeddings")

    @classmethod
    def from_pretrained(cls, path_or_id, **kwargs):
        """Load from a local directory in the Hugging Face format. kwargs: dtype, device."""
        return load_model(cls, path_or_id, **kwargs)

    def save_pretrained(self, path, **kwargs):
        save_model(self, path, **kwargs)

    @property
    def dtype(self):
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @property
    def device(self):
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
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported (choose from {', '.join(DTYPES)})")
    return DTYPES[dtype]


def resolve_checkpoint(path_or_id) -> str:
    """A local checkpoint directory."""
    path = os.fspath(path_or_id)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} not found")
    return path


def weight_files(path: str) -> dict:
    """key -> safetensors file, from model.safetensors or the sharded index."""
    single, index = os.path.join(path, SINGLE), os.path.join(path, INDEX)
    if os.path.isfile(index):
        try:
            weight_map = read_json(index)["weight_map"]
        except KeyError:
            raise CheckpointError(f"{index} has no 'weight_map'") from None
        files = {k: os.path.join(path, f) for k, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not os.path.isfile(f):
                raise CheckpointError(f"shard {f} listed in {index} is missing")
        return files
    if os.path.isfile(single):
        return {k: single for k in read_header(single)}
    pickles = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    hint = f" (found {', '.join(sorted(pickles))}: pickle checkpoints are never loaded)" if pickles else ""
    raise CheckpointError(f"no {SINGLE} or {INDEX} in {path}{hint}")


def read_header(file: str) -> list:
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None


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


def load_model(cls, path_or_id, dtype=None, device="cpu", config=None, **kwargs):
    if kwargs:
        raise TypeError(f"from_pretrained got unsupported arguments: {', '.join(kwargs)}")
    path = resolve_checkpoint(path_or_id)
    config, raw = load_config(cls, path) if config is None else (config, {})
    dtype = resolve_dtype(dtype, raw)
    files = weight_files(path)
    prefix = cls.checkpoint_prefix if raw.get("model_type") == "blip-2" and cls.checkpoint_prefix else ""
    with torch.device("meta"):
        model = cls(config)
    load_weights(model, files, prefix, dtype, torch.device(device))
    model.eval()
    return model


def load_weights(model: nn.Module, files: dict, prefix: str, dtype, device):
    """Read every parameter of `model` from `files` (key -> file), ties included; errors name the key."""
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = tied_names(model, files, prefix)
    wanted = set(params) - tied
    missing = sorted(n for n in wanted if prefix + n not in files)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {sorted(set(files.values()))[0]} lacks {len(missing)} tensor(s): {shown}")
    by_file = {}
    for n in wanted:
        by_file.setdefault(files[prefix + n], []).append(n)
    for file, names in sorted(by_file.items()):
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for n in names:
                    set_param(model, n, read_tensor(f, file, prefix + n, params[n].shape,
                                                    param_dtype(n, model, dtype)))
        except SafetensorError as e:
            raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None
    if tied:
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"tensors never loaded: {', '.join(left[:5])}")


def tied_names(model, files, prefix) -> set:
    """Parameters taken from another by tying: OPT's lm_head (tie_word_embeddings), T5's lm_head when the
    file has none (a separate lm_head in the file, as Flan-T5 has, is kept)."""
    names = {n for n in dict(model.named_parameters(remove_duplicate=False)) if n.endswith("lm_head.weight")}
    text = getattr(model.config, "text_config", None)
    if text is not None and text.model_type == "opt" and text.tie_word_embeddings:
        return names
    return {n for n in names if prefix + n not in files}


def read_tensor(f, file, key, shape, dtype):
    try:
        sl = f.get_slice(key)
    except SafetensorError as e:
        raise CheckpointError(f"{file}: tensor {key} cannot be read: {e}") from None
    if tuple(sl.get_shape()) != tuple(shape):
        raise CheckpointError(f"{file}: tensor {key} has shape {tuple(sl.get_shape())}, "
                              f"the model expects {tuple(shape)}")
    t = f.get_tensor(key)
    return t.to(dtype) if t.is_floating_point() else t


def set_param(model, name, tensor):
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    mod._parameters[attr] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())


def save_model(model, path, max_shard_size=None, safe_serialization=True):
    """Write config.json (+ generation_config.json) and safetensors (sharded above max_shard_size bytes);
    tied tensors are written once, as the reference does."""
    if not safe_serialization:
        raise ValueError("only safetensors serialization is supported")
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
    for old in (SINGLE, INDEX):
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
