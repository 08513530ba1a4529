"""A language model's decoding step, all its decoder layers in one call of blip2's kernel (kernels/decoder_step.cpp),
with the bits of the layers' own forward: every layer's weight-only matmuls, norms and attention, with no Python
between them. For Flan-T5's decoder (T5Block: self-attention, cross-attention, gated feed-forward, RMSNorm) and OPT's
(OPTDecoderLayer: self-attention, feed-forward, LayerNorm before each).

In Python a Flan-T5-XL step runs ~850 torch ops and ~700 module calls around its 217 matmuls, each slowed by the
megabytes of weights the matmul before it streamed through the core's caches (`python -m bench.step --model
flan-t5-xl --ab`: the step with its layers' forward and in one call). It serves where every piece of the step is
one of blip2's kernels: an int4 / int8 model in bfloat16 on the CPU, one new token, no gradient, hook, attention
weights or hidden states wanted, and (T5) the cross-attention's keys and values cached; elsewhere `run` returns None
and the layers run.
"""

import ctypes
from collections.abc import Callable
from ctypes import c_float, c_int, c_int64, c_void_p
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules import module as torch_module

from . import native
from .cache import KVCache
from .weight_only import WeightOnlyLinear

LINEARS = ("q", "k", "v", "o", "cq", "co", "wi0", "wi1", "wo")  # kernels/decoder_step.cpp's Layer


class Linear(ctypes.Structure):
    _fields_ = [("bits", c_int), ("k", c_int), ("n", c_int), ("extra", c_int), ("w", c_void_p), ("scales", c_void_p),
                ("bias", c_void_p)]


class Norm(ctypes.Structure):
    _fields_ = [("w", c_void_p), ("b", c_void_p)]


class Layer(ctypes.Structure):
    _fields_ = [("norm", Norm * 3)] + [(name, Linear) for name in LINEARS]


class Caches(ctypes.Structure):
    _fields_ = [("k", c_void_p), ("v", c_void_p), ("ks", c_int64 * 3), ("vs", c_int64 * 3), ("ck", c_void_p),
                ("cv", c_void_p), ("cks", c_int64 * 3), ("cvs", c_int64 * 3), ("ct", c_int64)]


class Step(ctypes.Structure):
    _fields_ = [("B", c_int), ("D", c_int), ("H", c_int), ("hd", c_int), ("F", c_int), ("layers", c_int),
                ("pos", c_int), ("eps", c_float), ("norm_form", c_int), ("threads", c_int), ("q_scale", c_float),
                ("attn_scale", c_float), ("mask", c_void_p), ("ms", c_int64 * 3), ("cmask", c_void_p),
                ("cms", c_int64 * 3), ("act", c_void_p)]


class Plans:
    """Mixed into a decoder stack: its `plans` (rows -> Plan) for run(), left out of a copy (deepcopy, pickling),
    which plans again: a plan points into this process's memory."""

    plans: dict

    def __getstate__(self) -> dict:
        return {**self.__dict__, "plans": {}}


@dataclass(frozen=True)
class Pieces:
    """One decoder layer's modules in the kernel's order, and what else its forward depends on."""

    linears: tuple[nn.Module | None, ...]  # LINEARS (None: the layer has none)
    norms: tuple[nn.Module | None, ...]  # before self-attention, cross-attention (None: none), feed-forward
    attentions: tuple[nn.Module, ...]
    act: Callable[[Tensor], Tensor]
    settings: tuple  # the other attributes its forward reads (eager attention, eps, the query's scaling)


def pieces(layer: nn.Module) -> Pieces | None:
    """A T5Block's or an OPTDecoderLayer's pieces, or None (another layer, or OPT's norms after the sublayers)."""
    if hasattr(layer, "self_attn"):  # OPTDecoderLayer
        sa, ln = layer.self_attn, (layer.self_attn_layer_norm, None, layer.final_layer_norm)
        if not layer.pre_ln:
            return None
        return Pieces((sa.q_proj, sa.k_proj, sa.v_proj, sa.out_proj, None, None, None, layer.fc1, layer.fc2), ln,
                      (sa,), layer.act, (sa.eager, sa.scaling, ln[0].eps, ln[2].eps))
    if not hasattr(layer, "layer") or len(layer.layer) != 3:  # T5Block, a decoder's
        return None
    sa, ca, ff = layer.layer[0].SelfAttention, layer.layer[1].EncDecAttention, layer.layer[2].DenseReluDense
    ln = tuple(layer.layer[i].layer_norm for i in range(3))
    return Pieces((sa.q, sa.k, sa.v, sa.o, ca.q, ca.o, ff.wi_0 if ff.gated else None, ff.wi_1 if ff.gated else ff.wi,
                   ff.wo), ln, (sa, ca), ff.act, (sa.eager, ca.eager, *(n.eps for n in ln)))


@dataclass(frozen=True)
class Plan:
    """A decoder's layers as the kernel reads them, for `rows` rows, made from its modules as they were: current()
    says whether they still are."""

    rows: int
    modules: tuple[nn.Module, ...]  # every module of the layers (one replaced: a new plan; their hooks: the layers')
    pieces: tuple[Pieces, ...]
    calls: tuple[native.Call | None, ...]  # the linears' kernels (kept alive: `layers` points into their tensors)
    params: tuple[Tensor, ...]  # the norms' weights and biases (kept alive: `layers` points into them)
    table: Tensor  # (65536,) int16: the activation's bits for each bfloat16's
    layers: ctypes.Array  # of Layer
    cross: bool  # the layers attend to an encoder's output
    layer_norm: bool  # LayerNorms (OPT), else RMSNorms (T5)
    d_model: int
    heads: int
    d_kv: int
    d_ff: int
    eps: float
    q_scale: float  # 0: none

    def current(self, layers: nn.ModuleList) -> bool:
        """Whether `layers` still have these modules, kernels, norm parameters, activation and settings."""
        if tree(layers) != self.modules:
            return False
        now = [pieces(layer) for layer in layers]
        return all(n is not None and n.settings == p.settings and n.act is p.act for n, p in zip(now, self.pieces)) \
            and all(lin is None or lin.kernel(self.rows) is c
                    for lin, c in zip((lin for p in now for lin in p.linears), self.calls)) \
            and [t.data_ptr() for t in norm_params(now)] == [t.data_ptr() for t in self.params]


def run(layers: nn.ModuleList, x: Tensor, mask: Tensor | None, cross_mask: Tensor | None, cache: KVCache,
        norm_form: Callable[[], int | None], plans: dict) -> Tensor | None:
    """x (B, 1, D) through the decoder layers `layers` (self.training off) at position cache.length, their keys and
    values appended to `cache` (not advanced) -> (B, 1, D); None where the kernel does not serve (see the module's
    doc): then nothing is done. mask: the self-attention's additive (B|1, H|1, 1, pos + 1) (T5: with the position
    bias), or None; cross_mask: T5's cross-attention's (B|1, 1|H, 1, T_enc), or None; norm_form: what finds the
    norms' form (T5's t5.norm_lanes, OPT's opt.layer_norm_form: None where no kernel has torch's bits here), called
    only for a step the kernel may serve; plans: the caller's, kept between steps."""
    b = x.shape[0]
    if not (x.dtype == torch.bfloat16 and x.shape[1] == 1 and len(cache.k) == len(layers)
            and all(t is None or t.dtype == x.dtype for t in (mask, cross_mask))
            and native.serves(x, mask, cross_mask)
            and not (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)):
        return None
    form = norm_form()
    if form is None:
        return None
    plan = plans.get(b)
    if plan is None or not plan.current(layers):
        plan = plans[b] = make_plan(layers, b)
    if plan is None or any(m._forward_hooks or m._forward_pre_hooks for m in plan.modules) or \
            plan.layer_norm and plan.d_model % (32 if form & 1 else 16):  # (the kernel's rows: whole vectors)
        return None
    pos, h, hd = cache.length, plan.heads, plan.d_kv
    ct = cache.cross[0][0].shape[2] if plan.cross and cache.cross[0] is not None else 0
    if x.shape[2] != plan.d_model or plan.cross and not all(
            c is not None and c[0].shape == c[1].shape == (b, h, ct, hd) and c[0].dtype == c[1].dtype == x.dtype
            and c[0].stride(-1) == c[1].stride(-1) == 1 for c in cache.cross):
        return None  # (the layers' forward computes the cross-attention's keys and values, or says what does not fit)
    like = x.new_empty(b, h, 0, hd)
    caches = []
    for i in range(len(layers)):
        cache.reserve(i, pos + 1, like)
        k, v = cache.k[i], cache.v[i]
        if k.shape[:2] != (b, h) or k.shape[3] != hd or k.dtype != x.dtype or not (k.is_contiguous()
                                                                                  and v.is_contiguous()):
            return None
        ck, cv = cache.cross[i] if plan.cross else (like, like)
        caches.append(Caches(k.data_ptr(), v.data_ptr(), k.stride()[:3], v.stride()[:3], ck.data_ptr(), cv.data_ptr(),
                             ck.stride()[:3], cv.stride()[:3], ct))
    mask = None if mask is None else mask.expand(b, h, 1, pos + 1)
    cross_mask = None if cross_mask is None else cross_mask.expand(b, h, 1, ct)
    y = x.reshape(b, -1).clone()  # (B, D): the kernel's input and output
    step = Step(b, plan.d_model, h, hd, plan.d_ff, len(layers), pos, plan.eps, form, native.threads(),
                plan.q_scale, 1.0, *pointer_and_strides(mask), *pointer_and_strides(cross_mask),
                plan.table.data_ptr())
    if native.library().blip2_decoder_step(y.data_ptr(), plan.layers, (Caches * len(caches))(*caches),
                                           ctypes.byref(step)):
        raise MemoryError("decoding step: no memory for the step's activations")
    return y[:, None]


def pointer_and_strides(mask: Tensor | None) -> tuple[int | None, tuple[int, int, int]]:
    """A (B, H, 1, T) mask's memory and strides over (B, H, T); None and zeros for no mask."""
    return (None, (0, 0, 0)) if mask is None else (mask.data_ptr(), (mask.stride(0), mask.stride(1), mask.stride(3)))


def make_plan(layers: nn.ModuleList, rows: int) -> Plan | None:
    """The plan of decoder layers `layers` for `rows` rows, or None where one of their pieces is not blip2's kernel's:
    a linear layer not weight-only in bfloat16 with blip2's kernel bound, a norm not in bfloat16 (or a LayerNorm
    without weight and bias), attention asked to run eagerly, or layers that differ in their norms' epsilon, their
    activation or their query's scaling."""
    parts = [pieces(layer) for layer in layers]
    if not parts or None in parts:
        return None
    calls, structs = [], []
    for p in parts:
        bound = [None if lin is None else bind(lin, rows) for lin in p.linears]
        if any(lin is not None and c is None for lin, c in zip(p.linears, bound)) or any(
                a.eager for a in p.attentions) or not all(n is None or norm_served(n) for n in p.norms):
            return None
        calls += [None if c is None else c[0] for c in bound]
        structs.append(Layer((Norm * 3)(*(Norm() if n is None else Norm(n.weight.data_ptr(), None if getattr(
            n, "bias", None) is None else n.bias.data_ptr()) for n in p.norms)),
            *(Linear() if c is None else c[1] for c in bound)))
    norms = [n for p in parts for n in p.norms if n is not None]
    if len({n.eps for n in norms}) != 1 or len({p.act for p in parts}) != 1 or len({type(n) for n in norms}) != 1 \
            or len({getattr(p.attentions[0], "scaling", 0.0) for p in parts}) != 1:
        return None
    first = parts[0]
    sa, q, wo = first.attentions[0], first.linears[0], first.linears[8]
    return Plan(rows, tree(layers), tuple(parts), tuple(calls), tuple(t.detach() for t in norm_params(parts)),
                act_table(first.act), (Layer * len(structs))(*structs), first.linears[4] is not None,
                isinstance(norms[0], nn.LayerNorm), q.in_features, sa.num_heads, q.out_features // sa.num_heads,
                wo.in_features, norms[0].eps, getattr(sa, "scaling", 0.0))


def norm_served(norm: nn.Module) -> bool:
    """A LayerNorm with a weight and a bias over one dimension, or T5's RMSNorm (a weight, no bias), in bfloat16."""
    if isinstance(norm, nn.LayerNorm):
        params = [norm.weight, norm.bias] if len(norm.normalized_shape) == 1 else [None]
    else:
        params = [None] if hasattr(norm, "bias") else [norm.weight]
    return all(t is not None and t.dtype == torch.bfloat16 and t.dim() == 1 and t.is_contiguous() for t in params)


def norm_params(parts: list[Pieces]) -> list[Tensor]:
    """The layers' norms' weights and biases, in order."""
    return [t for p in parts for n in p.norms if n is not None for t in (n.weight, getattr(n, "bias", None))
            if t is not None]


def tree(module: nn.Module) -> tuple[nn.Module, ...]:
    """module and all its submodules (Module.modules(), a fifth of its time: it is checked at every step)."""
    out = [module]
    for m in out:
        out += (c for c in m._modules.values() if c is not None)
    return tuple(out)


def bind(lin: nn.Module, rows: int) -> tuple[native.Call, Linear] | None:
    """`lin`'s kernel for `rows` rows and its Linear, or None where it is not a weight-only layer writing bfloat16
    with blip2's kernel."""
    call = lin.kernel(rows) if isinstance(lin, WeightOnlyLinear) else None
    if call is None or call.dtype != torch.bfloat16 or lin.dtype != torch.bfloat16:
        return None
    w, scales, extra, bias = call.args
    return call, Linear(lin.bits, call.k, call.n, extra, w, scales, bias)


def act_table(act: Callable[[Tensor], Tensor]) -> Tensor:
    """(65536,) int16: act's bfloat16 bits for each bfloat16 input's bits, computed by act itself (torch's ops, so
    the step's activation has their bits)."""
    bits = torch.arange(-32768, 32768, dtype=torch.int16).roll(32768)  # element i holds the bits i
    return act(bits.view(torch.bfloat16)).view(torch.int16).contiguous()
