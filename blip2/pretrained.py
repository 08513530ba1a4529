"""The one door from the models to the checkpoint I/O: from_pretrained / save_pretrained / dtype / device, and the
model-level switches of the reference's PreTrainedModel that fine-tuning code calls (attention implementation,
gradient checkpointing, input gradients, embedding resizing, parameter counts), mixed into every public model
class (Blip2VisionModel, Blip2QFormerModel, the Blip2* models of modeling.py)."""

import os
from typing import Any

import torch
import torch.nn as nn

from .config import Blip2Config
from .io.errors import CheckpointError
from .io.hub import MODEL_FILES, resolve_checkpoint
from .io.load import load_model, param_dtype
from .io.placement import main_device
from .io.safetensors import checkpoint_tensors
from .io.save import save_model
from .ops import ATTN_IMPLEMENTATIONS, CheckpointedLayers

HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only")


class PretrainedMixin:
    """from_pretrained / save_pretrained / dtype / device and the reference's model-level switches."""

    config_class = Blip2Config
    checkpoint_prefix = ""  # where this model's keys live inside a full BLIP-2 checkpoint
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _keep_in_fp32_modules = ()
    _no_split_modules = ("Blip2EncoderLayer", "Blip2QFormerLayer", "OPTDecoderLayer", "T5Block",
                         "Blip2TextEmbeddings", "Blip2VisionEmbeddings")

    def init_switches(self) -> None:
        """Call at the end of __init__: applies config._attn_implementation ("sdpa" when unset)."""
        self.name_or_path = ""
        self.set_attn_implementation(getattr(self.config, "_attn_implementation", None) or "sdpa")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None = None,
                        **kwargs: Any) -> Any:
        """Load a local directory or a hub id (Hugging Face format, safetensors). Keyword arguments:
        dtype ("float32" default, "float16", "bfloat16", "auto", or a torch.dtype; torch_dtype is an alias),
        device ("cpu", "cuda:0", ...) or device_map ("auto", "balanced", "balanced_low_0", "sequential", or
        {module name: device | "cpu" | "disk"}) with max_memory ({0: "10GiB", "cpu": "30GiB"}) and
        offload_folder (for what goes to disk), quantization ("8bit", "4bit", "fp4", QuantizationConfig;
        load_in_8bit=True / load_in_4bit=True say the same),
        revision, cache_dir, token, local_files_only (hub ids); attn_implementation ("sdpa" or "eager");
        output_loading_info (also return {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"}).
        from_pretrained(None, config=config, state_dict=weights) builds the model from a state dict, as the
        reference does."""
        attn = kwargs.pop("attn_implementation", None)
        check_attn_implementation(attn)
        for bits in ("8bit", "4bit"):  # the model cards' load_in_8bit=True / load_in_4bit=True
            if kwargs.pop(f"load_in_{bits}", False):
                if kwargs.get("quantization") is not None:
                    raise ValueError(f"pass load_in_{bits} or quantization, not both")
                kwargs["quantization"] = bits
        info_wanted = kwargs.pop("output_loading_info", False)
        state_dict = kwargs.pop("state_dict", None)
        if state_dict is not None:  # as the reference: from_pretrained(None, config=config, state_dict=weights)
            if pretrained_model_name_or_path is not None:
                raise ValueError("state_dict cannot be passed together with a checkpoint; pass "
                                 "from_pretrained(None, config=config, state_dict=state_dict)")
            model = cls.from_state_dict(state_dict, **kwargs)
        elif pretrained_model_name_or_path is None:
            raise TypeError("from_pretrained needs a checkpoint directory or hub id (pretrained_model_name_or_path), "
                            "or config= and state_dict=")
        else:
            model = load_model(cls, pretrained_model_name_or_path, **kwargs)
            model.name_or_path = model.config._name_or_path = os.fspath(pretrained_model_name_or_path)
        model.set_attn_implementation(attn or model.config._attn_implementation or "sdpa")
        if not info_wanted:
            return model
        if state_dict is not None:
            return model, loading_info(model, state_dict)
        hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        path = resolve_checkpoint(pretrained_model_name_or_path, allow_patterns=MODEL_FILES, **hub)
        return model, loading_info(model, checkpoint_tensors(path))

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], config: Any = None,
                        dtype: str | torch.dtype | None = None, torch_dtype: str | torch.dtype | None = None) -> Any:
        """The model of `config` with the weights of `state_dict` (keys as the model's own, or with this class's
        prefix inside a full checkpoint)."""
        if config is None:
            raise TypeError("state_dict= needs config= (the reference's from_pretrained(None, config=..., "
                            "state_dict=...))")
        model = cls(config)
        missing, _ = model.load_state_dict(own_keys(model, state_dict), strict=False)
        tied = {n for n in missing if n.endswith("lm_head.weight")}
        if set(missing) - tied:
            shown = sorted(set(missing) - tied)
            raise CheckpointError(f"state_dict lacks {len(shown)} tensor(s) of {cls.__name__}: "
                                  f"{', '.join(shown[:5])}{' ...' if len(shown) > 5 else ''}")
        if tied:
            model.tie_weights()
        dtype = dtype if dtype is not None else torch_dtype
        if dtype is not None and dtype != "auto":
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            for name, p in model.named_parameters():
                p.data = p.data.to(param_dtype(name, model, dtype))
        return model.eval()

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

    # ---- the reference's model-level switches -------------------------------------------------------------

    @classmethod
    def can_generate(cls) -> bool:
        return False

    def set_attn_implementation(self, attn_implementation: str) -> None:
        """"sdpa" (torch's scaled_dot_product_attention) or "eager" (matmul + softmax, as the reference's eager
        attention): for every attention layer, recorded in config._attn_implementation (and the sub-configs')."""
        check_attn_implementation(attn_implementation)
        for config in configs_of(self.config):
            config._attn_implementation = attn_implementation
        for m in self.modules():
            if hasattr(m, "eager"):
                m.eager = attn_implementation == "eager"

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(m.gradient_checkpointing for m in self.modules() if isinstance(m, CheckpointedLayers))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each transformer layer's activations in the backward pass (torch.utils.checkpoint), in
        training mode. kwargs default to the reference's {"use_reentrant": False}; a reentrant checkpoint needs an
        input that requires grad to pass gradients to adapters behind frozen embeddings: call
        enable_input_require_grads() (done here for text models, whose main input is input_ids, as the reference)."""
        if not self.supports_gradient_checkpointing:
            raise ValueError(f"{type(self).__name__} does not support gradient checkpointing")
        kwargs = dict(gradient_checkpointing_kwargs or {"use_reentrant": False})
        for m in self.modules():
            if isinstance(m, CheckpointedLayers):
                m.gradient_checkpointing, m.checkpoint_kwargs = True, kwargs
        if self.main_input_name == "input_ids":
            self.enable_input_require_grads()

    activation_checkpointing_enable = gradient_checkpointing_enable

    def gradient_checkpointing_disable(self) -> None:
        for m in self.modules():
            if isinstance(m, CheckpointedLayers):
                m.gradient_checkpointing = False

    activation_checkpointing_disable = gradient_checkpointing_disable

    def enable_input_require_grads(self) -> None:
        """Make the output of every input-embedding layer require grad (hooks), so that gradients reach adapters
        behind frozen embeddings through reentrant checkpointing."""
        self.disable_input_require_grads()
        seen = set()
        self._require_grads_hooks = []
        for m in self.modules():
            get = getattr(m, "get_input_embeddings", None) if isinstance(m, PretrainedMixin) else None
            emb = get() if get is not None else None
            if emb is None or id(emb) in seen:
                continue
            seen.add(id(emb))
            self._require_grads_hooks.append(
                emb.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True)))

    def disable_input_require_grads(self) -> None:
        for h in getattr(self, "_require_grads_hooks", []):
            h.remove()
        self._require_grads_hooks = []

    def get_input_embeddings(self) -> nn.Module | None:
        return None

    def get_output_embeddings(self) -> nn.Module | None:
        return None

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Resize the token table (and an untied output layer) to new_num_tokens rows (rounded up to a multiple of
        pad_to_multiple_of), as the reference does: old rows kept, new rows drawn around the old rows' mean
        (mean_resizing, with the reference's covariance x 1e-9) or from N(0, initializer_range); the text config's
        vocab_size follows. Returns the token table."""
        emb = self.get_input_embeddings()
        if not isinstance(emb, nn.Embedding):
            raise ValueError(f"{type(self).__name__} has no token embedding table to resize")
        if pad_to_multiple_of is not None:
            check_positive("pad_to_multiple_of", pad_to_multiple_of)
            n = emb.num_embeddings if new_num_tokens is None else new_num_tokens
            new_num_tokens = -(-n // pad_to_multiple_of) * pad_to_multiple_of
        if new_num_tokens is None:
            return emb
        check_positive("new_num_tokens", new_num_tokens)
        std = getattr(self.config, "initializer_range", 0.02)
        resize_rows(emb, new_num_tokens, mean_resizing, std)
        emb.num_embeddings = new_num_tokens
        if emb.padding_idx is not None and emb.padding_idx >= new_num_tokens:
            emb.padding_idx = None
        head = self.get_output_embeddings()
        if head is not None and head.weight.shape[0] != new_num_tokens:  # an untied output layer
            resize_rows(head, new_num_tokens, mean_resizing, std)
            head.out_features = new_num_tokens
        self.config.get_text_config().vocab_size = new_num_tokens
        if hasattr(self, "tie_weights"):
            self.tie_weights()
        return emb

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters (each shared one once), optionally only the trainable ones or without embedding tables."""
        skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in skip and (p.requires_grad or not only_trainable))


def check_attn_implementation(name: str | None) -> None:
    if name is not None and name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation {name!r} is not supported (supported: "
                         f"{', '.join(ATTN_IMPLEMENTATIONS)}; flash and flex attention are not offered)")


def check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@torch.no_grad()
def resize_rows(module: nn.Module, n: int, mean_resizing: bool, std: float) -> None:
    """module.weight (V, D) -> (n, D) in place (tied modules see it): the first rows kept, new rows from the
    reference's initialisation. The new table is built as the reference builds it (a fresh nn.Embedding or
    nn.Linear, whose init draws from torch's generator), so a seeded resize gives the reference's rows."""
    old = module.weight.data
    v, d = old.shape
    fresh = nn.Embedding(n, d) if isinstance(module, nn.Embedding) else nn.Linear(d, n, bias=False)
    new = fresh.weight.data.to(old.device, old.dtype)
    if n > v and mean_resizing:
        w = old.float()
        mean = w.mean(0)
        centered = w - mean
        covariance = centered.T @ centered / v
        if torch.distributions.constraints.positive_definite.check(1e-9 * covariance).all():
            dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=1e-9 * covariance)
            new[v:] = dist.sample(sample_shape=(n - v,)).to(old.dtype)
        else:
            new[v:] = mean[None].repeat(n - v, 1).to(old.dtype)
    elif n > v:
        new[v:].normal_(0.0, std)
    new[:min(v, n)] = old[:min(v, n)]
    module.weight.data = new


def configs_of(config: Any) -> list:
    """A config and its sub-configs."""
    return [config] + [getattr(config, k) for k in getattr(config, "sub_configs", {})]


def own_keys(model: nn.Module, tensors: Any) -> Any:
    """A checkpoint's keys (a dict keeps its values) with this model's prefix inside a full checkpoint removed."""
    prefix = getattr(model, "checkpoint_prefix", "")
    if not prefix or not any(k.startswith(prefix) for k in tensors):
        return tensors
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def loading_info(model: nn.Module, tensors: dict) -> dict[str, list]:
    """The reference's output_loading_info: what the checkpoint (or state_dict) had that the model has not.
    A load that would miss a tensor or mismatch a shape raises instead, so those lists are empty."""
    unexpected = set(own_keys(model, tensors)) - set(model.state_dict())
    return {"missing_keys": [], "unexpected_keys": sorted(unexpected), "mismatched_keys": [], "error_msgs": []}
