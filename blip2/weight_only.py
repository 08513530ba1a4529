"""Weight-only int8 / int4 linears for the CPU, quantized while loading.

int8: one symmetric scale per output channel. A decoding step (under INT8_MATMUL_ROWS rows) runs blip2's own kernel
(blip2/native.py: each row quantized to int8, int8 x int8 by VNNI), or
`torch.ops.aten._weight_int8pack_mm` where that kernel cannot be built; from INT8_MATMUL_ROWS rows the activations
are quantized per row and `torch._int_mm` multiplies int8 by int8 (faster than the packed kernel from there: the
README's kernel table, `python -m bench.realsize --kernels`).
int4: asymmetric groups of `group_size` inputs (scale and zero per group and output channel, torchao's
"float zero point" scheme: w = (q - 8) * scale + zero), blip2's own kernel (blip2/native.py: activations to int8
per row and group, int8 x int4 by VNNI; 1.8x PyTorch's kernel at a decoding step, 4x at a prompt pass), or
`torch.ops.aten._weight_int4pack_mm_for_cpu` where that kernel cannot be built (activations in the model's dtype).
A decoding step, which streams every weight once, reads 2x (int8) or ~3.5x (int4) fewer bytes than bf16.

Which layers: every linear of the language model, lm_head included (its 50304 x 2560 matrix is 5% of a
decoding step's bytes: it pays like any other; an OPT lm_head tied to the input embeddings gets a quantized copy,
the embedding table stays as it is), T5's feed-forward output `wo` included: bitsandbytes and the reference keep
`wo` unquantized because Flan-T5's activations there overflow float16, and nothing here is float16 (the
activations are bf16 / float32, quantized per row and group with float32 scales, summed in int32;
tests/test_t5_int4.py feeds it activations beyond float16's range). `modules_to_not_convert` keeps layers by name
(a name component such as "wo", or a module path), as transformers' option of that name does.
The vision tower, the Q-Former and language_projection (include_vision): by default (None) decided at load for this
CPU by timing the vision tower's own MLP matrix at its rows (ViT-g: 6144 x 1408, 257 rows) in the model's dtype
against these kernels (vision_prefers_int): a CPU with AMX runs bf16 faster and keeps it, one without (AVX-512 /
AVX2 only) runs the kernels faster; the log says which and the times. True / False force it. A saved copy records
what was done.
A layer int4 cannot take (out_features not a multiple of 16, in_features not a multiple of the group size)
falls back to int8 per channel: `WeightOnlyConfig.fallbacks` lists them.

The int4 packed layout depends on the kernel: 0 for blip2's (blocks of 16 output rows by 8 inputs, scales and
zeros block by block: (N/16, K/group, 16, 2) bfloat16), and PyTorch's by the CPU's instruction set (1: blocks of 64
output rows on AVX-512, 2: 32 on AVX2, 3: row pairs; scales and zeros (K/group, N, 2)). A saved checkpoint
records the layout it was packed in; loading it where another kernel runs repacks it (slower, same values), else
the packed bytes are used as they are on disk.
"""

import functools
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn

from . import native
from .ops import Linear
from .quantization import QuantizationError

log = logging.getLogger(__name__)
METHOD = "blip2_weight_only"  # config.json's quantization_config.quant_method for checkpoints saved quantized
NAMES = {"int8_weight_only": 8, "int4_weight_only": 4}  # torchao's names ("int8" alone means bitsandbytes' 8bit)
FLAGS = {"int8": "int8_weight_only", "int4": "int4_weight_only", "8bit": "8bit", "4bit": "4bit"}  # --quantize
GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
# int8 from this many rows up (a prompt pass, the vision tower): the activations too are quantized, per row, to
# int8 and one torch._int_mm runs int8 x int8 -> int32 (oneDNN: AMX / VNNI), both scales applied to the output;
# decoding steps (1-3 rows) stay weight-only. Where _int_mm overtakes the packed kernel: the README's kernel table
# (`python -m bench.realsize --kernels`). The per-row activation scale's error is bounded in
# tests/test_weight_only.py, as torchao's int8 dynamic-activation scheme has it.
INT8_MATMUL_ROWS = 4
CHUNK_ROWS = 2048  # rows quantized at a time: bounds the float temporaries (a multiple of every packing block)


@dataclass
class WeightOnlyConfig:
    bits: int = 4  # 8 (per output channel) or 4 (per group)
    group_size: int = 64  # int4: inputs sharing a scale and zero (32, 64, 128 or 256)
    include_lm_head: bool = True
    include_vision: bool | None = None  # the vision tower, the Q-Former, language_projection; None: per CPU at load
    modules_to_not_convert: tuple[str, ...] = ()  # layers kept as they are: name components ("wo") or module paths
    fallbacks: list = field(default_factory=list, compare=False)  # int4 layers kept in int8 (shape), filled on load

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise QuantizationError(f"weight-only bits={self.bits!r}: choose 8 (int8_weight_only) or 4 "
                                    f"(int4_weight_only)")
        if self.group_size not in GROUP_SIZES:
            raise QuantizationError(f"group_size={self.group_size!r}: the int4 CPU kernel takes "
                                    f"{', '.join(map(str, GROUP_SIZES))}")
        self.modules_to_not_convert = tuple(self.modules_to_not_convert or ())

    @property
    def name(self) -> str:
        return f"int{self.bits}_weight_only"

    def to_dict(self, layout: int) -> dict:
        d = asdict(self)
        d.pop("fallbacks")
        return {"quant_method": METHOD, **d, "modules_to_not_convert": list(self.modules_to_not_convert),
                "int4_layout": layout}

    @classmethod
    def coerce(cls, q: Any) -> "WeightOnlyConfig | None":
        """A weight-only config from "int8_weight_only" / "int4_weight_only", a dict, a
        WeightOnlyConfig, or the reference's TorchAoConfig (read by attribute: quant_type, a name or an
        Int4WeightOnlyConfig-like object with group_size; include_input_output_embeddings quantizes lm_head, as
        there). None for anything else (bitsandbytes' names)."""
        if q is None or isinstance(q, cls):
            return q
        if isinstance(q, dict):
            if q.get("quant_method") not in (None, METHOD):
                return None
            keys = {"bits", "group_size", "include_lm_head", "include_vision", "modules_to_not_convert"}
            return cls(**{k: v for k, v in q.items() if k in keys})
        if str(getattr(q, "quant_method", "")).lower().endswith("torchao"):  # transformers.TorchAoConfig
            kind, kwargs = q.quant_type, dict(getattr(q, "quant_type_kwargs", None) or {})
            if not isinstance(kind, str):  # torchao's Int4WeightOnlyConfig / Int8WeightOnlyConfig object
                kwargs.setdefault("group_size", getattr(kind, "group_size", None))
                kind = {"Int4WeightOnlyConfig": "int4", "Int8WeightOnlyConfig": "int8"}.get(type(kind).__name__, kind)
            kind = FLAGS.get(kind, kind)
            if kind not in NAMES:
                raise QuantizationError(f"TorchAoConfig quant_type={q.quant_type!r}: blip2 runs int8_weight_only "
                                        f"and int4_weight_only")
            skip = set(getattr(q, "modules_to_not_convert", None) or ())
            head = bool(getattr(q, "include_input_output_embeddings", False)) and "lm_head" not in skip
            return cls(bits=NAMES[kind], include_lm_head=head, modules_to_not_convert=tuple(sorted(skip)),
                       **({"group_size": kwargs["group_size"]} if kwargs.get("group_size") else {}))
        key = str(q).lower()
        return cls(bits=NAMES[key]) if key in NAMES else None


def quantization_flag(flag: str | None) -> str | None:
    """The `quantization=` of a --quantize flag: int8 / int4 (weight-only, CPU), 8bit / 4bit (bitsandbytes)."""
    if flag is None:
        return None
    if flag not in FLAGS:
        raise QuantizationError(f"--quantize {flag!r}: choose {', '.join(FLAGS)}")
    return FLAGS[flag]


def cpu_supports_bf16() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively in oneDNN (AVX-512 BF16 / AMX, or AVX-512 with conversion):
    then bf16 halves the bytes a decoding step streams at no loss of speed elsewhere."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


# ---------------------------------------------------------------------------------------------------------------
# the int4 kernel's packed layout


def int4_layout() -> int:
    """The packing of the kernel in use: 0 = blip2's (native.available()); else PyTorch's for this CPU, 1 = blocks
    of 64 rows, low nibbles rows 0-31, high 32-63 (AVX-512); 2 = blocks of 32, halves of 16 (AVX2); 3 = row pairs
    (no vector unit), found by packing a probe, so never out of step with the kernel torch dispatches to."""
    return 0 if native.available() else aten_layout()


def aten_layout() -> int:
    global _layout
    if _layout is None:
        probe = torch.zeros(64, 2, dtype=torch.int32)
        probe[32], probe[16], probe[1] = 1, 2, 3  # the row whose value lands in byte 0's high nibble says which
        _layout = int(torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)[0, 0]) >> 4
    return _layout


_layout = None
BLOCKS = {1: (64, True), 2: (32, True), 3: (32, False)}  # layout -> (rows per block, halves (True) or pairs)


def pack_int4(q: torch.Tensor, layout: int) -> torch.Tensor:
    """(N, K) integer values 0..15 -> (N, K/2) uint8 in `layout`. Layout 0: 64 bytes per 16 rows x 8 inputs, byte
    4j + t = q[16b + j][8c + t] | q[16b + j][8c + 4 + t] << 4 (see blip2/kernels/weight_only.cpp)."""
    if layout != 0:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1)
    n, k = q.shape
    b = q.to(torch.uint8).reshape(n // 16, 16, k // 8, 2, 4).permute(0, 2, 1, 4, 3)  # (block, chunk, row, t, half)
    return (b[..., 0] | (b[..., 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor, layout: int) -> torch.Tensor:
    """(N, K/2) uint8 in `layout` -> (N, K) int32 values 0..15 (the inverse of pack_int4)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    if layout == 0:
        b = packed.reshape(n // 16, k // 8, 16, 4).int()
        q = torch.stack([b & 15, b >> 4], -1)  # (block, chunk, row, t, half)
        return q.permute(0, 2, 1, 4, 3).reshape(n, k)
    block, halves = BLOCKS[layout]
    full = n // block * block
    out = torch.empty(n, k, dtype=torch.int32)
    if full:  # blocks of (K, block/2) bytes
        b = packed[:full].reshape(full // block, k, block // 2).int()
        nibbles = [b & 15, b >> 4]  # halves: low nibble = row d, high = row d + block/2; else rows 2i and 2i + 1
        b = torch.cat(nibbles, -1) if halves else torch.stack(nibbles, -1).reshape(full // block, k, block)
        out[:full] = b.transpose(1, 2).reshape(full, k)
    if full < n:  # the last, partial block: row pairs
        b = packed[full:].reshape(k, (n - full) // 2).int()
        out[full:] = torch.stack([b & 15, b >> 4], -1).reshape(k, n - full).t()
    return out


# ---------------------------------------------------------------------------------------------------------------
# quantizing


def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> int8 (N, K), scales (N,) in `dtype` (the scale is rounded first, the values from it)."""
    n = w.shape[0]
    q, scales = torch.empty(w.shape, dtype=torch.int8), torch.empty(n, dtype=dtype)
    for i in range(0, n, CHUNK_ROWS):
        c = w[i:i + CHUNK_ROWS].float()
        s = (c.abs().amax(1) / 127).clamp(min=1e-12).to(dtype)
        scales[i:i + CHUNK_ROWS] = s
        q[i:i + CHUNK_ROWS] = (c / s.float()[:, None]).round_().clamp_(-128, 127)
    return q, scales


def scales_shape(out_features: int, in_features: int, group_size: int, layout: int) -> tuple[int, ...]:
    g = in_features // group_size
    return (out_features // 16, g, 16, 2) if layout == 0 else (g, out_features, 2)


def arrange_scales(sz: torch.Tensor, layout: int) -> torch.Tensor:
    """(K/group, N, 2) scales and zeros -> the order of `layout` (layout 0: (N/16, K/group, 16, 2) bfloat16)."""
    if layout != 0:
        return sz
    g, n, _ = sz.shape
    return sz.reshape(g, n // 16, 16, 2).transpose(0, 1).to(torch.bfloat16).contiguous()


def canonical_scales(sz: torch.Tensor, layout: int) -> torch.Tensor:
    """The inverse of arrange_scales: (K/group, N, 2)."""
    if layout != 0:
        return sz
    b, g = sz.shape[:2]
    return sz.transpose(0, 1).reshape(g, b * 16, 2)


def quantize_int4(w: torch.Tensor, group_size: int, dtype: torch.dtype,
                  layout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> packed uint8 (N, K/2), scales_and_zeros in `dtype` (layout 0: bfloat16), both in `layout`."""
    n, k = w.shape
    dtype = torch.bfloat16 if layout == 0 else dtype
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    sz = torch.empty(k // group_size, n, 2, dtype=dtype)
    for i in range(0, n, CHUNK_ROWS):
        c = w[i:i + CHUNK_ROWS].float().reshape(-1, k // group_size, group_size)  # (rows, groups, group)
        lo, hi = c.amin(-1), c.amax(-1)
        scale = ((hi - lo) / 15).clamp_(min=1e-6).to(dtype)
        zero = (lo + 8 * scale.float()).to(dtype)  # the value of code 8
        q = ((c - zero.float()[..., None]) / scale.float()[..., None]).add_(8).round_().clamp_(0, 15)
        packed[i:i + CHUNK_ROWS] = pack_int4(q.reshape(-1, k), layout)
        sz[:, i:i + CHUNK_ROWS] = torch.stack([scale, zero], -1).transpose(0, 1)
    return packed, arrange_scales(sz, layout)


def fits_int4(out_features: int, in_features: int, group_size: int) -> bool:
    return out_features % 16 == 0 and in_features % group_size == 0


# ---------------------------------------------------------------------------------------------------------------
# the layers


class WeightOnlyLinear(nn.Module):
    """y = x W^T + b with W in int8 (per output channel) or int4 (per group). Parameters, as saved:
    weight (int8 (N, K) | packed uint8 (N, K/2)), scales (N,) | scales_and_zeros (in the int4 `layout`'s order:
    see scales_shape), bias (N,). `dtype` is the model's: the bias, int8's scales, the output."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int,
                 dtype: torch.dtype, device: str | torch.device = "meta", layout: int | None = None):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.dtype, self.layout = dtype, (int4_layout() if layout is None else layout) if bits == 4 else None
        if bits == 8:
            self.weight = frozen(torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.scales = frozen(torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.weight = frozen(torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
            shape = scales_shape(out_features, in_features, group_size, self.layout)
            self.scales_and_zeros = frozen(torch.empty(shape, dtype=torch.bfloat16 if self.layout == 0 else dtype,
                                                       device=device))
        self.bias = frozen(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.call: tuple[tuple, native.Call] | None = None  # (the parameters' memory, blip2's kernel bound to it)

    def kernel_dtype(self, attr: str) -> torch.dtype:
        """The dtype the kernels need for parameter `attr` (in the current layout)."""
        if attr == "weight":
            return torch.int8 if self.bits == 8 else torch.uint8
        return torch.bfloat16 if attr == "scales_and_zeros" and self.layout == 0 else self.dtype

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}{group}"

    def load(self, attr: str, t: torch.Tensor, layout: int | None = None) -> None:
        """Set parameter `attr` from a freshly read tensor (the kernels want their own 64-byte aligned memory, never
        a view into a mapped file). A float (N, K) weight is quantized; a saved int8 / packed int4 weight is taken
        as it is (an int4 one packed in another `layout`, and its scales, are rearranged for the kernel in use)."""
        here = int4_layout() if self.bits == 4 else None
        repack = self.bits == 4 and layout not in (None, here)
        if attr == "weight" and t.is_floating_point():
            if self.bits == 8:
                self.weight, self.scales = map(frozen, quantize_int8(t, self.dtype))
            else:
                self.layout = here
                self.weight, self.scales_and_zeros = map(frozen, quantize_int4(t, self.group_size, self.dtype, here))
        elif attr == "weight" and repack:
            self.weight = frozen(pack_int4(unpack_int4(t, layout), here).contiguous())
        elif attr == "scales_and_zeros" and repack:
            sz = canonical_scales(t, layout).to(self.dtype)
            self.scales_and_zeros = frozen(arrange_scales(sz, here).contiguous())
        else:  # as saved (the loader read floats in the model's dtype; layout 0's scales are bfloat16)
            setattr(self, attr, frozen(t.to(getattr(self, attr).dtype) if t.is_floating_point() else t))
        if self.bits == 4 and layout is not None:
            self.layout = here

    def dequantize(self) -> torch.Tensor:
        """The weight as the kernels see it, (N, K) float32."""
        if self.bits == 8:
            return self.weight.float() * self.scales.float()[:, None]
        sz = canonical_scales(self.scales_and_zeros, self.layout).float()  # (G, N, 2)
        q = unpack_int4(self.weight, self.layout).float().reshape(self.out_features, -1, self.group_size)
        w = (q - 8) * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = self.kernel(x.numel() // self.in_features)
        if call is not None and x.dtype == call.dtype == self.dtype:  # a decoding step's: one kernel call, no other op
            return call(x)
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        if call is not None:
            y = call(kernel_input(x2))
        elif self.bits == 4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(self.dtype).contiguous(), self.weight,
                                                           self.group_size, self.scales_and_zeros)
        elif x2.shape[0] >= INT8_MATMUL_ROWS or self.in_features % 32:  # (PyTorch's packed int8 kernel reads
            y = int8_matmul(x2.to(self.dtype).contiguous(), self.weight, self.scales)  # past a bf16 row of 32k+r)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(self.dtype).contiguous(), self.weight, self.scales)
        y = y.reshape(*x.shape[:-1], self.out_features)
        if call is None or call.dtype != self.dtype:
            y = y.to(self.dtype) if self.bias is None else y.to(self.dtype) + self.bias
        return y.to(x.dtype)

    def __getstate__(self) -> dict:
        """A copy (deepcopy, pickling) binds blip2's kernel again: a binding points into this process's memory."""
        return {**self.__dict__, "call": None}

    def kernel(self, rows: int) -> native.Call | None:
        """blip2's kernel for `rows` rows bound to this layer's weight, or None where PyTorch's kernels serve (int4
        packed in their layout; int8 from INT8_MATMUL_ROWS rows; no kernel built). It adds the bias and rounds to
        the model's dtype itself (in bfloat16 / float32: two torch ops less after each of the 193 linears of an
        OPT-2.7B decoding step). Checked once, and again when a parameter's memory changes."""
        if not (self.bits == 4 and self.layout == 0 or self.bits == 8 and rows < INT8_MATMUL_ROWS and
                native.available()):
            return None
        scales = self.scales_and_zeros if self.bits == 4 else self.scales
        memory = (self.weight.data_ptr(), scales.data_ptr(), None if self.bias is None else self.bias.data_ptr())
        if self.call is None or self.call[0] != memory:
            out = {"bias": self.bias, "dtype": self.dtype} if self.dtype in native.OUT_DTYPES else {}
            self.call = memory, (native.int4_call(self.weight, scales, self.group_size, self.in_features, **out)
                                 if self.bits == 4 else native.int8_call(self.weight, scales, **out))
        return self.call[1]


def kernel_input(x: torch.Tensor) -> torch.Tensor:
    """Activations as blip2's kernels take them: bfloat16 or float32."""
    return x if x.dtype in (torch.bfloat16, torch.float32) else x.float()


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(M, K) float @ int8 (N, K)^T with per-channel `scales` (N,): x quantized per row (symmetric, its own scale),
    torch._int_mm accumulates in int32, then both scales. -> (M, N) in x's dtype."""
    xf = x.float()
    xs = xf.abs().amax(1, keepdim=True).div_(127).clamp_(min=1e-12)  # (M, 1)
    xq = (xf / xs).round_().to(torch.int8)  # (not in place: x.float() of a float32 x is x itself)
    return torch._int_mm(xq, q.t()).float().mul_(xs).mul_(scales.float()).to(x.dtype)


def frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def is_weight_only(module: nn.Module) -> bool:
    return isinstance(module, WeightOnlyLinear)


FASTER = 0.8  # the kernels replace the float matmul in the vision tower where they take at most this share of its time


def eligible(name: str, q: WeightOnlyConfig, vision: bool) -> bool:
    """Linear layers (by module name) this config quantizes; `vision`: the vision tower, Q-Former and projection."""
    if any(f".{m}." in f".{name}." for m in q.modules_to_not_convert):
        return False
    if name.endswith("lm_head"):
        return q.include_lm_head
    if name.startswith("language_model."):
        return True
    return vision and name.startswith(("vision_model.", "qformer.", "language_projection"))


@functools.cache
def vision_prefers_int(n: int, k: int, m: int, bits: int, group_size: int, dtype: torch.dtype) -> bool:
    """Whether this CPU runs the vision tower's matmuls faster on these kernels than in `dtype`: its (n, k) MLP
    matrix (ViT-g's fc1: 6144 x 1408) at its m rows (257 at 224 px), best of 3 interleaved after a warm-up, each
    way (about 0.1-0.5 s for ViT-g, once per process and shape). Logged with the times and the CPU's AMX flag
    (AMX makes bf16 win)."""
    if bits == 4 and not native.available():
        log.info("vision tower and Q-Former: kept in %s (PyTorch's int4 kernel is slower than a float matmul at "
                 "%d rows)", str(dtype).removeprefix("torch."), m)
        return False
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(n, k, generator=g).mul_(0.02).to(dtype), torch.randn(m, k, generator=g).to(dtype)
    bits = 4 if bits == 4 and fits_int4(n, k, group_size) else 8
    lin = WeightOnlyLinear(k, n, False, bits, group_size, dtype, device="cpu")
    lin.load("weight", w)
    times = {"float": [], "int": []}
    with torch.no_grad():
        for _ in range(4):
            for kind, f in (("float", lambda: nn.functional.linear(x, w)), ("int", lambda: lin(x))):
                t = time.perf_counter()
                f()
                times[kind].append(time.perf_counter() - t)
    fp, qt = (min(v[1:]) * 1e3 for v in times.values())
    wins = qt <= FASTER * fp
    try:
        with open("/proc/cpuinfo") as f:
            amx = any(ln.startswith("flags") and " amx_bf16" in ln for ln in f)
    except OSError:
        amx = False
    cpu = ("AMX" if amx else "no AMX") + (f", ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}"
                                                          if os.environ.get("ONEDNN_MAX_CPU_ISA") else "")
    log.info("vision tower and Q-Former: %s (its %d x %d MLP matrix at %d rows: %s %.1f ms, int%d %.1f ms; %s)",
             f"int{bits} on blip2's kernels" if wins else f"kept in {str(dtype).removeprefix('torch.')}", n, k, m,
             str(dtype).removeprefix("torch."), fp, bits, qt, cpu)
    return wins


def replace_linears(model: nn.Module, q: WeightOnlyConfig, layout: int | None = None) -> list[str]:
    """Swap the eligible linears of a meta-device model for WeightOnlyLinear (scales in the dtype each weight
    had; int4 in `layout`, a saved checkpoint's, default the kernel in use's). An lm_head tied to the input
    embeddings is untied (it gets its own quantized weight). The vision tower's precision: q.include_vision, or
    where None, vision_prefers_int for the model's dtype. Returns the names."""
    vision = q.include_vision
    if vision is None:
        mlp = next((m for n, m in model.named_modules() if n.startswith("vision_model.") and n.endswith(".fc1")), None)
        vc = getattr(model.config, "vision_config", None)
        rows = (vc.image_size // vc.patch_size) ** 2 + 1 if vc else 0
        vision = mlp is not None and vision_prefers_int(mlp.out_features, mlp.in_features, rows, q.bits,
                                                        q.group_size, mlp.weight.dtype)
    names = [n for n, m in model.named_modules() if type(m) in (nn.Linear, Linear) and eligible(n, q, vision)]
    for n in names:
        lin = model.get_submodule(n)
        bits = 4 if q.bits == 4 and fits_int4(lin.out_features, lin.in_features, q.group_size) else 8
        if bits != q.bits:
            q.fallbacks.append(f"{n} ({lin.out_features}x{lin.in_features})")
        dtype = lin.weight.dtype if lin.weight.is_floating_point() else torch.float32
        model.set_submodule(n, WeightOnlyLinear(lin.in_features, lin.out_features, lin.bias is not None, bits,
                                                q.group_size, dtype, layout=layout))
        if n.endswith("lm_head"):
            text = getattr(model.config, "text_config", model.config)
            text.tie_word_embeddings = False  # from now on its own tensor, also in a saved checkpoint
    if names:  # (builds blip2's kernels now, at load, rather than in the first request)
        log.info("weight-only int%d on %s", q.bits, f"blip2's kernels ({native.isa()})" if native.available() else
                 "PyTorch's kernels")
    if q.fallbacks:
        log.info("int4 weight-only: %d layer(s) do not fit groups of %d, kept in int8: %s", len(q.fallbacks),
                 q.group_size, ", ".join(q.fallbacks[:4]) + (" ..." if len(q.fallbacks) > 4 else ""))
    return names


def check_device(device_map: dict) -> None:
    """The kernels here are CPU kernels."""
    devices = set(device_map.values()) - {"cpu"}
    if devices:
        raise QuantizationError(f"weight-only int8/int4 runs on the CPU, and this load puts the model on "
                                f"{', '.join(sorted(devices))}. Fix: device='cpu', or quantization='8bit'/'4bit' "
                                f"(bitsandbytes) on a GPU")


LAYOUTS = (0, 1, 2, 3)  # int4 packings (see int4_layout)


def plan_config(quantization: Any, raw: dict) -> tuple["WeightOnlyConfig | None", bool, int | None]:
    """(config, whether the checkpoint holds quantized tensors, the int4 layout they were packed in) when a load is
    weight-only: asked for with `quantization`, or the checkpoint was saved quantized (its config.json `raw` says
    so: then its int4_layout is checked, as a packing blip2 writes)."""
    qc = (raw or {}).get("quantization_config")
    saved = WeightOnlyConfig.coerce(qc) if isinstance(qc, dict) and qc.get("quant_method") == METHOD else None
    if saved and "modules_to_not_convert" not in qc:  # saved before T5's wo was quantized: it is float in the file
        saved = replace(saved, modules_to_not_convert=("wo",))
    asked = WeightOnlyConfig.coerce(quantization)
    if saved and asked and replace(asked, include_vision=saved.include_vision) != saved:
        raise QuantizationError(f"this checkpoint was saved quantized {saved.name} (group size {saved.group_size}); "
                                f"it loads as it is: drop quantization={quantization!r}, or quantize the original "
                                f"float checkpoint instead")
    layout = qc.get("int4_layout") if saved else None
    if saved and saved.bits == 4 and (type(layout) is not int or layout not in LAYOUTS):
        raise QuantizationError(f"config.json's quantization_config.int4_layout is {layout!r}, not one of the "
                                f"packings blip2 writes ({', '.join(map(str, LAYOUTS))}): the config was edited or "
                                f"written by another tool. Fix: restore it, or quantize the float checkpoint again")
    q = saved or asked
    return (replace(q, fallbacks=[]) if q else None), saved is not None, layout


def mark_config(model: nn.Module, q: WeightOnlyConfig) -> None:
    """Record the quantization in model.config, so that save_pretrained writes it to config.json; include_vision
    as done (a saved copy holds the vision tower as it is now)."""
    vision = any(is_weight_only(m) for n, m in model.named_modules() if n.startswith("vision_model."))
    model.config.extra["quantization_config"] = replace(q, include_vision=vision).to_dict(int4_layout())
