"""Small pieces shared by every module: output containers, activations, attention, masks."""

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from . import native


class Linear(nn.Linear):
    """nn.Linear for the language models. One row (a decoding step of one sequence) in float32 on a CPU runs as
    two half-height matrix-vector products, one per thread: the library's float32 GEMV runs on one thread,
    this reads the weights about 1.7x faster (`python -m bench.speed`), and every output is the same dot
    product, so the result is bit-identical to F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.numel() != x.shape[-1] or w.dtype != torch.float32 or w.device.type != "cpu" or w.shape[0] % 2
                or not w.is_contiguous() or torch.get_num_threads() < 2):
            return F.linear(x, w, self.bias)
        y = torch.matmul(x.reshape(1, 1, -1), w.view(2, -1, w.shape[1]).mT)  # (2, 1, out/2)
        y = y.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class ModelOutput:
    """A dataclass whose fields read as attributes, as keys (`out["logits"]`) and by position among the
    fields that are set (`out[0]`), like the reference's outputs."""

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return [getattr(self, k) for k in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_tuple(self) -> tuple:
        return tuple(self.values())

    def __getitem__(self, k):
        return getattr(self, k) if isinstance(k, str) else self.to_tuple()[k]

    def __contains__(self, k):
        return k in self.keys()

    def __iter__(self):
        return iter(self.keys())


@dataclass
class BaseModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class BaseModelOutputWithPooling(ModelOutput):
    last_hidden_state: torch.Tensor = None
    pooler_output: torch.Tensor = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class BaseModelOutputWithPoolingAndCrossAttentions(ModelOutput):
    last_hidden_state: torch.Tensor = None
    pooler_output: torch.Tensor = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    cross_attentions: tuple | None = None


@dataclass
class BaseModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.Tensor = None
    past_key_values: object = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class CausalLMOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor = None
    past_key_values: object = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class Seq2SeqLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor = None
    past_key_values: object = None
    decoder_hidden_states: tuple | None = None
    decoder_attentions: tuple | None = None
    cross_attentions: tuple | None = None
    encoder_last_hidden_state: torch.Tensor = None
    encoder_hidden_states: tuple | None = None
    encoder_attentions: tuple | None = None


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACT2FN = {
    "gelu": F.gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACT2FN:
        raise ValueError(f"activation {name!r} is not supported (supported: {', '.join(ACT2FN)})")
    return ACT2FN[name]


ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              scale: float | None = None, need_weights: bool = False,
              eager: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q (B, H, Tq, hd), k/v (B, H, Tk, hd), additive float mask broadcastable to (B, H, Tq, Tk).
    Returns (B, Tq, H*hd) and the attention weights when asked. The eager path (matmul + softmax, as the
    reference's eager attention) serves attn_implementation="eager" and every call that wants the weights;
    otherwise torch's scaled_dot_product_attention, or for one query on the CPU, blip2's kernel (native.attend)."""
    if not (need_weights or eager) and native.attends(q, k, v, mask):  # a decoding step's
        return native.attend(q, k, v, mask, scale), None
    w = None
    if need_weights or eager:
        w = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
        if mask is not None:
            w = w + mask
        w = w.softmax(-1)
        out = w @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).flatten(2), w if need_weights else None


class CheckpointedLayers:
    """Mixed into a stack of transformer layers: `run(layer, *args)` recomputes the layer in the backward pass
    when gradient checkpointing is on (PretrainedMixin.gradient_checkpointing_enable) and the stack trains."""

    gradient_checkpointing = False
    checkpoint_kwargs: dict = {}

    def run(self, layer: nn.Module, *args: Any) -> Any:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(layer, *args, **self.checkpoint_kwargs)
        return layer(*args)


def resolve(value: bool | None, config: Any, name: str) -> bool:
    """A forward argument, or the config's setting of the same name when it is None (as the reference)."""
    return getattr(config, name) if value is None else value


def padding_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, T) of 1 = keep / 0 = pad -> additive (B, 1, 1, T), or None when nothing is masked."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def causal_mask(attention_mask: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, Tk) key mask -> additive (B, 1, Tq, Tk) mask for the last Tq positions: query i sees key j when j <= i
    and the key mask keeps j (0), else the dtype's minimum."""
    b, k_len = attention_mask.shape
    i = torch.arange(k_len - q_len, k_len, device=attention_mask.device)[:, None]
    j = torch.arange(k_len, device=attention_mask.device)[None, :]
    keep = (j <= i)[None] & attention_mask[:, None, :].bool()  # (B, Tq, Tk)
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, torch.finfo(dtype).min)[:, None]
