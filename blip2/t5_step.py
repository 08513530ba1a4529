"""A T5 decoder's decoding step in one call of blip2's kernel (kernels/t5_decoder.cpp), with the bits of the
layers' own forward: every layer's weight-only matmuls, RMSNorms and attention, with no Python between them.

In Python a Flan-T5-XL step runs ~850 torch ops and ~700 module calls around its 217 matmuls, each slowed by the
megabytes of weights the matmul before it streamed through the core's caches (`python -m bench.step --model
flan-t5-xl --ab`: the step with its layers' forward and in one call). It serves where every piece of the step is
one of blip2's kernels: an int4 / int8 model in bfloat16 on the CPU, one new token, no gradient, hook, attention
weights or hidden states wanted, and the cross-attention's keys and values cached; elsewhere `run` returns None and
the layers run.
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

LINEARS = ("q", "k", "v", "o", "cq", "co", "wi0", "wi1", "wo")  # kernels/t5_decoder.cpp's Layer


class Linear(ctypes.Structure):
    _fields_ = [("bits", c_int), ("k", c_int), ("n", c_int), ("extra", c_int), ("w", c_void_p), ("scales", c_void_p),
                ("bias", c_void_p)]


class Layer(ctypes.Structure):
    _fields_ = [("norm", c_void_p * 3)] + [(name, Linear) for name in LINEARS]


class Caches(ctypes.Structure):
    _fields_ = [("k", c_void_p), ("v", c_void_p), ("ks", c_int64 * 3), ("vs", c_int64 * 3), ("ck", c_void_p),
                ("cv", c_void_p), ("cks", c_int64 * 3), ("cvs", c_int64 * 3), ("ct", c_int64)]


class Step(ctypes.Structure):
    _fields_ = [("B", c_int), ("D", c_int), ("H", c_int), ("hd", c_int), ("F", c_int), ("layers", c_int),
                ("pos", c_int), ("eps", c_float), ("lanes", c_int), ("threads", c_int), ("bias", c_void_p),
                ("bs", c_int64 * 3), ("cmask", c_void_p), ("cms", c_int64 * 3), ("act", c_void_p)]


@dataclass(frozen=True)
class Plan:
    """A decoder's layers as the kernel reads them, for `rows` rows, made from its modules as they were: current()
    says whether they still are."""

    rows: int
    modules: tuple[nn.Module, ...]  # every module of the blocks (one replaced: a new plan; their hooks: the layers')
    linears: tuple[WeightOnlyLinear | None, ...]  # LINEARS per layer (wi0 None where the feed-forward is not gated)
    calls: tuple[native.Call | None, ...]  # their kernels (kept alive: `layers` points into their tensors)
    norms: tuple[nn.Module, ...]  # 3 per layer
    weights: tuple[Tensor, ...]  # the norms' weights (kept alive: `layers` points into them)
    attentions: tuple[nn.Module, ...]
    ffs: tuple[nn.Module, ...]
    act: Callable[[Tensor], Tensor]  # the feed-forwards' activation
    table: Tensor  # (65536,) int16: act's bits for each bfloat16's
    layers: ctypes.Array  # of Layer
    d_model: int
    heads: int
    d_kv: int
    d_ff: int
    eps: float

    def current(self, blocks: nn.ModuleList) -> bool:
        """Whether `blocks` still have these modules, kernels, norm weights, activation, and no eager attention."""
        return tree(blocks) == self.modules \
            and all(lin is None or lin.kernel(self.rows) is c for lin, c in zip(self.linears, self.calls)) \
            and all(n.weight.data_ptr() == w.data_ptr() and n.weight.dtype == w.dtype and n.eps == self.eps
                    for n, w in zip(self.norms, self.weights)) \
            and not any(a.eager for a in self.attentions) and all(f.act is self.act for f in self.ffs)


def run(blocks: nn.ModuleList, x: Tensor, bias: Tensor, context_mask: Tensor | None, cache: KVCache,
        lanes: int, plans: dict) -> Tensor | None:
    """x (B, 1, D) through the T5Blocks `blocks` (a decoder's, self.training off) at position cache.length, the keys
    and values appended to `cache` (not advanced) -> (B, 1, D); None where the kernel does not serve (see the module's
    doc): then nothing is done. bias: the self-attention's (B|1, H, 1, pos + 1); context_mask: the cross-attention's
    (B|1, 1|H, 1, T_enc) or None; lanes: t5.norm_lanes(); plans: the caller's, kept between steps."""
    b = x.shape[0]
    if not (lanes and x.dtype == torch.bfloat16 and x.shape[1] == 1 and bias.dtype == x.dtype
            and (context_mask is None or context_mask.dtype == x.dtype) and native.serves(x, bias, context_mask)
            and all(c is not None for c in cache.cross) and len(cache.cross) == len(blocks)
            and not (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)):
        return None
    plan = plans.get(b)
    if plan is None or not plan.current(blocks):
        plan = plans[b] = make_plan(blocks, b)
    if plan is None or any(m._forward_hooks or m._forward_pre_hooks for m in plan.modules):
        return None
    pos, h, hd = cache.length, plan.heads, plan.d_kv
    ct = cache.cross[0][0].shape[2]
    if x.shape[2] != plan.d_model or not all(k.shape == v.shape == (b, h, ct, hd) and k.dtype == v.dtype == x.dtype
                                             and k.stride(-1) == v.stride(-1) == 1 for k, v in cache.cross):
        return None  # (the layers' forward says what does not fit)
    like = x.new_empty(b, h, 0, hd)
    caches = []
    for i in range(len(blocks)):
        cache.reserve(i, pos + 1, like)
        k, v = cache.k[i], cache.v[i]
        if k.shape[:2] != (b, h) or k.shape[3] != hd or k.dtype != x.dtype or not (k.is_contiguous()
                                                                                  and v.is_contiguous()):
            return None
        ck, cv = cache.cross[i]
        caches.append(Caches(k.data_ptr(), v.data_ptr(), k.stride()[:3], v.stride()[:3], ck.data_ptr(), cv.data_ptr(),
                             ck.stride()[:3], cv.stride()[:3], ct))
    bias = bias.expand(b, h, 1, pos + 1)
    cmask = None if context_mask is None else context_mask.expand(b, h, 1, ct)
    y = x.reshape(b, -1).clone()  # (B, D): the kernel's input and output
    step = Step(b, plan.d_model, h, hd, plan.d_ff, len(blocks), pos, plan.eps, lanes, native.threads(),
                bias.data_ptr(), mask_strides(bias), None if cmask is None else cmask.data_ptr(),
                (0, 0, 0) if cmask is None else mask_strides(cmask), plan.table.data_ptr())
    if native.library().blip2_t5_decoder_step(y.data_ptr(), plan.layers, (Caches * len(caches))(*caches),
                                              ctypes.byref(step)):
        raise MemoryError("T5 decoding step: no memory for the step's activations")
    return y[:, None]


def mask_strides(mask: Tensor) -> tuple[int, int, int]:
    """A (B, H, 1, T) mask's strides over (B, H, T)."""
    return mask.stride(0), mask.stride(1), mask.stride(3)


def make_plan(blocks: nn.ModuleList, rows: int) -> Plan | None:
    """The plan of T5Blocks `blocks` (a decoder's) for `rows` rows, or None where one of its pieces is not blip2's
    kernel's: a linear layer not weight-only in bfloat16 with blip2's kernel bound, a norm not in bfloat16, attention
    asked to run eagerly, or norms of different epsilons or feed-forwards of different activations."""
    linears, calls, layers, norms, attentions, ffs = [], [], [], [], [], []
    for block in blocks:
        sa, ca, ff = block.layer[0].SelfAttention, block.layer[1].EncDecAttention, block.layer[2].DenseReluDense
        mine = (sa.q, sa.k, sa.v, sa.o, ca.q, ca.o, ff.wi_0 if ff.gated else None, ff.wi_1 if ff.gated else ff.wi,
                ff.wo)
        bound = [None if lin is None else bind(lin, rows) for lin in mine]
        block_norms = [block.layer[i].layer_norm for i in range(3)]
        if sa.eager or ca.eager or any(lin is not None and c is None for lin, c in zip(mine, bound)) or any(
                n.weight.dtype != torch.bfloat16 or not n.weight.is_contiguous() for n in block_norms):
            return None
        linears += mine
        calls += [None if c is None else c[0] for c in bound]
        norms += block_norms
        attentions += (sa, ca)
        ffs.append(ff)
        layers.append(Layer((c_void_p * 3)(*(n.weight.data_ptr() for n in block_norms)),
                            *(Linear() if c is None else c[1] for c in bound)))
    if len({n.eps for n in norms}) != 1 or len({f.act for f in ffs}) != 1:
        return None
    sa, ff = blocks[0].layer[0].SelfAttention, ffs[0]
    return Plan(rows, tree(blocks), tuple(linears), tuple(calls), tuple(norms),
                tuple(n.weight.detach() for n in norms), tuple(attentions), tuple(ffs), ff.act, act_table(ff.act),
                (Layer * len(layers))(*layers), sa.q.in_features, sa.num_heads, sa.q.out_features // sa.num_heads,
                ff.wo.in_features, norms[0].eps)


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
