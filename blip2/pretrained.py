"""The one door from the models to the checkpoint I/O: from_pretrained / save_pretrained / dtype / device, mixed
into every public model class (Blip2VisionModel, Blip2QFormerModel, the Blip2* models of modeling.py)."""

import os
from typing import Any

import torch

from .config import Blip2Config
from .io.load import load_model
from .io.placement import main_device
from .io.save import save_model


class PretrainedMixin:
    """from_pretrained / save_pretrained / dtype / device for every public model class."""

    config_class = Blip2Config
    checkpoint_prefix = ""  # where this model's keys live inside a full BLIP-2 checkpoint
    _keep_in_fp32_modules = ()
    _no_split_modules = ("Blip2EncoderLayer", "Blip2QFormerLayer", "OPTDecoderLayer", "T5Block",
                         "Blip2TextEmbeddings", "Blip2VisionEmbeddings")

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, **kwargs: Any) -> Any:
        """Load a local directory or a hub id (Hugging Face format, safetensors). Keyword arguments:
        dtype ("float32" default, "float16", "bfloat16", "auto", or a torch.dtype; torch_dtype is an alias),
        device ("cpu", "cuda:0", ...) or device_map ("auto", "balanced", "balanced_low_0", "sequential", or
        {module name: device | "cpu" | "disk"}) with max_memory ({0: "10GiB", "cpu": "30GiB"}) and
        offload_folder (for what goes to disk), quantization ("8bit", "4bit", "fp4", QuantizationConfig),
        revision, cache_dir, token, local_files_only (hub ids)."""
        return load_model(cls, path_or_id, **kwargs)

    def save_pretrained(self, path: str | os.PathLike, **kwargs: Any) -> None:
        """config.json (+ generation_config.json) and safetensors; max_shard_size="200MB" shards them."""
        save_model(self, path, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @property
    def device(self) -> torch.device:
        """Where inputs go: the main device of a dispatched model (its parameters may sit on disk), else the
        parameters' device."""
        dm = getattr(self, "hf_device_map", None)
        if dm and (len(set(dm.values())) > 1 or "disk" in dm.values()):
            return torch.device(main_device(dm))
        return next(self.parameters()).device
