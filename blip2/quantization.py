"""8-bit and 4-bit weights with bitsandbytes, quantized while loading (see io/load.py).

Which layers: every nn.Linear of the language model except its output head (lm_head) and, for T5, the
feed-forward output layers `wo` (they overflow in low precision; the reference keeps them unquantized too).
The vision tower, the Q-Former, the query tokens and language_projection stay in the model's dtype.
(transformers also quantizes the vision tower's linears and language_projection; `include_vision=True` does
the same here.) Works on CUDA and, with bitsandbytes >= 0.47, on CPU.
"""

import logging
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn as nn

from .dtypes import resolve_dtype
from .ops import Linear


class QuantizationError(ValueError):
    """A quantization that cannot be done here: the message names the cause and the fix."""


@dataclass
class QuantizationConfig:
    bits: int = 4  # 8 (LLM.int8()) or 4
    quant_type: str = "nf4"  # 4-bit data type: "nf4" or "fp4"
    compute_dtype: torch.dtype | str | None = None  # 4-bit matmul dtype; None: the model's dtype
    double_quant: bool = True  # 4-bit: quantize the per-block scales as well (~0.4 bit/weight saved)
    threshold: float = 6.0  # 8-bit: outlier threshold of LLM.int8() (0 turns the fp16 outlier path off)
    include_vision: bool = False  # also quantize the vision tower and language_projection, as transformers does

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise QuantizationError(f"bits={self.bits!r}: bitsandbytes quantizes to 8 or 4 bits")
        if self.quant_type not in ("nf4", "fp4"):
            raise QuantizationError(f"quant_type={self.quant_type!r}: choose 'nf4' or 'fp4'")
        if self.compute_dtype is not None:
            try:
                self.compute_dtype = resolve_dtype(self.compute_dtype)
            except ValueError:
                raise QuantizationError(f"compute_dtype={self.compute_dtype!r}: choose float32, float16 or "
                                        f"bfloat16") from None

    @property
    def name(self) -> str:
        return "8bit" if self.bits == 8 else f"4bit-{self.quant_type}"

    @classmethod
    def coerce(cls, q: Any) -> "QuantizationConfig | None":
        """None, "8bit", "4bit" ("nf4", "fp4", "int8", 8, 4), a dict, a QuantizationConfig, or the reference's
        BitsAndBytesConfig (read by attribute) -> QuantizationConfig or None."""
        if q is None or isinstance(q, cls):
            return q
        if isinstance(q, dict):
            return cls(**q)
        if hasattr(q, "load_in_8bit") or hasattr(q, "load_in_4bit"):  # transformers.BitsAndBytesConfig
            if getattr(q, "load_in_8bit", False):
                return cls(bits=8, threshold=getattr(q, "llm_int8_threshold", 6.0))
            if getattr(q, "load_in_4bit", False):
                return cls(bits=4, quant_type=getattr(q, "bnb_4bit_quant_type", "nf4"),
                           compute_dtype=getattr(q, "bnb_4bit_compute_dtype", None),
                           double_quant=getattr(q, "bnb_4bit_use_double_quant", False))
            return None
        names = {"8bit": dict(bits=8), "int8": dict(bits=8), "8": dict(bits=8), "4bit": dict(bits=4),
                 "4": dict(bits=4), "nf4": dict(bits=4), "fp4": dict(bits=4, quant_type="fp4")}
        key = str(q).lower()
        if key not in names:
            raise QuantizationError(f"quantization={q!r}: use '8bit', '4bit' ('nf4'), 'fp4' or a QuantizationConfig")
        return cls(**names[key])


def quiet_cast_warning(record: logging.LogRecord) -> bool:
    """LLM.int8() logs "inputs will be cast from ... to float16" on every forward whose inputs are not fp16:
    expected here, and noise."""
    return "inputs will be cast from" not in record.getMessage()


def import_bnb() -> ModuleType:
    try:
        import bitsandbytes as bnb  # only 8/4-bit loads pay for its import (seconds)

        log = logging.getLogger("bitsandbytes.autograd._functions")
        if quiet_cast_warning not in log.filters:
            log.addFilter(quiet_cast_warning)
    except ImportError as e:
        raise QuantizationError(f"8/4-bit loading needs bitsandbytes, which cannot be imported here ({e}). "
                                f"Fix: pip install 'bitsandbytes>=0.47' (CPU and CUDA), or load without "
                                f"quantization (dtype='bfloat16' halves the memory of float32)") from None
    return bnb


def check_backend(q: QuantizationConfig, device: str | torch.device) -> None:
    """Quantize and run one small layer on `device`; raise QuantizationError naming the cause if that fails."""
    bnb = import_bnb()
    device = torch.device(device)
    supported = getattr(bnb, "supported_torch_devices", {"cuda"})
    if device.type not in supported or (device.type == "cuda" and not torch.cuda.is_available()):
        raise QuantizationError(f"bitsandbytes {bnb.__version__} cannot quantize on {device} (it supports "
                                f"{', '.join(sorted(supported))}). Fix: load on a supported device or without "
                                f"quantization")
    try:
        layer = quantized_linear(nn.Linear(64, 64, device="meta"), q, torch.float32)
        set_quantized_weight(layer, torch.randn(64, 64), device)
        layer.bias = nn.Parameter(torch.zeros(64, device=device), requires_grad=False)
        layer(torch.randn(2, 64, device=device))
    except Exception as e:  # noqa: BLE001 -- any backend failure becomes one clear message
        raise QuantizationError(f"bitsandbytes {bnb.__version__} has no working {q.bits}-bit backend for {device} "
                                f"({type(e).__name__}: {e}). Fix: pip install -U 'bitsandbytes>=0.47' (its CPU "
                                f"backend needs 0.47+), use a CUDA GPU, or load without quantization") from None


def skipped(name: str, q: QuantizationConfig) -> bool:
    """Linear layers (by module name) that keep full precision."""
    if name.endswith("lm_head") or name.split(".")[-1] == "wo":
        return True
    if name.startswith("language_model."):
        return False
    return not (q.include_vision and (name.startswith("vision_model.") or name == "language_projection"))


def quantized_linear(linear: nn.Linear, q: QuantizationConfig, dtype: torch.dtype) -> nn.Module:
    bnb = import_bnb()
    with torch.device("meta"):
        if q.bits == 8:
            new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, linear.bias is not None,
                                      has_fp16_weights=False, threshold=q.threshold)
        else:
            new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                                    compute_dtype=q.compute_dtype or dtype, compress_statistics=q.double_quant,
                                    quant_type=q.quant_type, quant_storage=torch.uint8)
            if linear.out_features % 32 or linear.in_features % 64:  # shapes bitsandbytes' fused AVX512-BF16
                new.support_avx512bf16_for_cpu = False  # CPU kernel cannot take: its generic path instead
        if new.bias is not None:  # the bias keeps the model's dtype
            new.bias = nn.Parameter(torch.empty(linear.out_features, dtype=dtype), requires_grad=False)
    new.requires_grad_(False)
    return new


def replace_linears(model: nn.Module, q: QuantizationConfig, dtype: torch.dtype) -> list[str]:
    """Swap the eligible nn.Linear modules of a meta-device model for bitsandbytes ones; returns their names."""
    names = [n for n, m in model.named_modules() if type(m) in (nn.Linear, Linear) and not skipped(n, q)]
    for n in names:
        model.set_submodule(n, quantized_linear(model.get_submodule(n), q, dtype))
    return names


def is_quantized(module: nn.Module) -> bool:
    bnb = sys.modules.get("bitsandbytes")  # never imported: nothing is quantized (and its import is slow)
    return bnb is not None and isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


def set_quantized_weight(module: nn.Module, tensor: torch.Tensor, device: str | torch.device) -> None:
    """Quantize `tensor` (out, in) into `module.weight` on `device` (bitsandbytes quantizes on .to(device))."""
    bnb = import_bnb()
    old = module._parameters["weight"]
    kwargs = {k: v for k, v in old.__dict__.items() if k not in ("SCB", "CB", "data")}
    cls = bnb.nn.Int8Params if isinstance(module, bnb.nn.Linear8bitLt) else bnb.nn.Params4bit
    module._parameters["weight"] = cls(tensor.to("cpu"), requires_grad=False, **kwargs).to(device)


def weight_bytes(shape: tuple[int, ...], q: QuantizationConfig) -> int:
    """Bytes a quantized (out, in) weight takes, scales included (what bitsandbytes allocates)."""
    out_features, n = shape[0], shape[0] * shape[1]
    if q.bits == 8:
        return n + 4 * out_features  # int8 values + one fp32 scale per row (SCB)
    blocks = -(-n // 64)  # bitsandbytes' default block size for 4-bit
    packed = -(-n // 2)
    if not q.double_quant:
        return packed + 4 * blocks + 4 * 16  # fp32 absmax per block + the 16-entry code
    groups = -(-blocks // 256)
    return packed + blocks + 4 * groups + 4 * 256 + 4 * 16 + 4  # uint8 absmax, fp32 scales, codes, offset


def quantized_param_bytes(param: torch.Tensor, module: nn.Module | None = None) -> int:
    """Bytes held by a loaded bitsandbytes weight, its scales and quantization state included (after the first
    forward, an 8-bit layer keeps its scales in module.state)."""
    total = param.numel() * param.element_size()
    scb = getattr(param, "SCB", None)
    if scb is None and module is not None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is not None:
        total += scb.numel() * scb.element_size()
    state = getattr(param, "quant_state", None)
    if state is not None:
        for t in (state.absmax, state.code, getattr(state, "offset", None)):
            total += 0 if t is None else t.numel() * t.element_size()
        if getattr(state, "state2", None) is not None:
            total += sum(t.numel() * t.element_size() for t in (state.state2.absmax, state.state2.code))
    return total
