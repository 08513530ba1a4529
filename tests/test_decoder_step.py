"""A decoder's decoding step in one kernel call (blip2/decoder_step.py, kernels/decoder_step.cpp), Flan-T5's and OPT's:
the bits of the layers' own forward, its KV cache the same, and the layers' forward wherever one piece of the step is
not blip2's kernel; blip2's LayerNorm with torch's bits (kernels/layer_norm.cpp)."""

import contextlib
import copy
import gc
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from blip2 import decoder_step, native, opt, t5
from blip2.cache import KVCache
from blip2.config import OPTConfig, T5Config
from blip2.weight_only import WeightOnlyLinear

pytestmark = pytest.mark.skipif(not native.available(), reason="blip2's kernels cannot be built here (a C++ "
                                "compiler with OpenMP and an x86 CPU with AVX2)")


def t5_model(bits: int = 4, proj: str = "gated-gelu", act: str | None = "gelu", d_ff: int = 96, seed: int = 0,
             dtype: torch.dtype = torch.bfloat16) -> t5.T5ForConditionalGeneration:
    """A random T5 in `dtype` whose linear layers are weight-only (`bits`; 0: left in bfloat16), d_ff below d_model
    included (the kernel's scratch must not assume d_ff >= d_model)."""
    torch.manual_seed(seed)
    extra = {} if act is None else {"dense_act_fn": act}
    config = T5Config(vocab_size=200, d_model=128, d_kv=16, d_ff=d_ff, num_layers=2, num_decoder_layers=3,
                      num_heads=6, feed_forward_proj=proj, tie_word_embeddings=False, **extra)
    model = t5.T5ForConditionalGeneration(config)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.data.normal_(0, 0.3)
        elif isinstance(m, t5.T5LayerNorm):
            m.weight.data.uniform_(0.5, 1.5)
    model = model.to(dtype).eval()
    for name, lin in list(model.named_modules()):
        if bits and isinstance(lin, nn.Linear) and name != "lm_head":
            q = WeightOnlyLinear(lin.in_features, lin.out_features, False, bits, 32, dtype, device="cpu")
            q.load("weight", lin.weight.data)
            model.set_submodule(name, q)
    return model


@contextlib.contextmanager
def counting():
    """Within: [how many steps ran in one call]."""
    runs, real = [0], decoder_step.run

    def counted(*args):
        y = real(*args)
        runs[0] += y is not None
        return y

    with pytest.MonkeyPatch.context() as m:
        m.setattr(decoder_step, "run", counted)
        yield runs


def decode(model, steps: int, rows: int = 2, mask: bool = False) -> tuple[torch.Tensor, KVCache, int]:
    """Fixed tokens through the decoder, one a step: the logits (rows, steps, V), the cache after, and how many
    steps ran in one call."""
    g = torch.Generator().manual_seed(1)
    enc = torch.randn(rows, 7, model.config.d_model, generator=g).bfloat16()
    enc_mask = torch.ones(rows, 7, dtype=torch.long)
    if mask:
        enc_mask[0, 5:] = 0
    tokens = torch.randint(0, 200, (rows, steps), generator=g)
    cache, outs = KVCache(model.num_layers), []
    with torch.no_grad(), native.decoding_step(), counting() as runs:
        for i in range(steps):
            logits, _ = model.decode(tokens[:, i:i + 1], enc, enc_mask, past_key_values=cache)
            outs.append(logits)
    return torch.cat(outs, 1), cache, runs[0]


@pytest.mark.parametrize("bits,proj,act,d_ff,mask", [(4, "gated-gelu", "gelu", 96, False),
                                                     (4, "gated-gelu", None, 320, True),
                                                     (8, "relu", None, 160, True)])
def test_t5s_one_call_step_gives_the_layers_bits(bits, proj, act, d_ff, mask, monkeypatch):
    """Flan-T5's gated GELU (erf, and gelu_new), T5's ReLU, int4 and int8, a masked encoder row, 1-2 rows, over 20
    steps (the cache's buffers grow past 16): logits and KV cache bit for bit the layers' own forward's."""
    model = t5_model(bits, proj, act, d_ff)
    for rows in (1, 2):
        fast, fast_cache, runs = decode(model, 20, rows, mask)
        assert runs == 19  # every step but the first, which computes the cross-attention's keys and values
        with monkeypatch.context() as m:
            m.setattr(decoder_step, "run", lambda *a: None)
            slow, slow_cache, runs = decode(model, 20, rows, mask)
        assert runs == 0
        assert torch.equal(fast, slow)
        assert fast_cache.length == slow_cache.length == 20
        for a, b in zip(fast_cache.k + fast_cache.v, slow_cache.k + slow_cache.v):
            assert torch.equal(a[:, :, :20], b[:, :, :20])


def step_once(model, rows: int = 1, **kwargs) -> tuple[torch.Tensor, int]:
    """Two decoding steps (the first fills the cross-attention's cache); the second's logits and whether it ran
    in one call."""
    g = torch.Generator().manual_seed(2)
    enc = torch.randn(rows, 5, model.config.d_model, generator=g).to(model.shared.weight.dtype)
    cache = KVCache(model.num_layers)
    model.decode(torch.zeros(rows, 1, dtype=torch.long), enc, past_key_values=cache)
    with counting() as runs:
        logits, _ = model.decode(torch.ones(rows, 1, dtype=torch.long), enc, past_key_values=cache, **kwargs)
    return logits, runs[0]


def test_the_layers_run_where_one_piece_is_not_the_kernels():
    """Unquantized, float32, attention weights or hidden states wanted, eager attention, a gradient wanted, a hook on
    any module (it runs), blip2's kernels off: the layers' forward, every time; back to one call after."""
    model = t5_model()
    with torch.no_grad():
        assert step_once(model)[1] == 1
        assert step_once(t5_model(bits=0))[1] == 0
        assert step_once(t5_model(dtype=torch.float32))[1] == 0
        assert step_once(model, output_attentions=True)[1] == 0
        assert step_once(model, output_hidden_states=True)[1] == 0
        model.decoder.block[1].layer[1].EncDecAttention.eager = True
        assert step_once(model)[1] == 0
        model.decoder.block[1].layer[1].EncDecAttention.eager = False
        seen = []
        handle = model.decoder.block[2].layer[2].DenseReluDense.wo.register_forward_hook(lambda *a: seen.append(1))
        assert step_once(model)[1] == 0 and seen
        handle.remove()
        handle = nn.modules.module.register_module_forward_pre_hook(lambda *a: seen.append(2))
        assert step_once(model)[1] == 0 and 2 in seen
        handle.remove()
        with native.disabled():
            assert step_once(model)[1] == 0
        assert step_once(model)[1] == 1
    model.decoder.block[0].layer[0].layer_norm.weight.requires_grad_(True)
    assert step_once(model)[1] == 0  # grad enabled, a parameter wants it


def test_a_changed_layer_is_planned_again():
    """A weight loaded anew, a module swapped, a norm's weight replaced, the activation changed: the next step reads
    the new ones (the same bits as the layers' forward), and a copy of the model plans its own."""
    model, other = t5_model(), t5_model(seed=5)
    with torch.no_grad():
        step_once(model)
        sa = model.decoder.block[1].layer[0].SelfAttention
        sa.v.load("weight", other.decoder.block[1].layer[0].SelfAttention.v.dequantize().bfloat16())
        model.decoder.block[2].layer[2].DenseReluDense.wo = other.decoder.block[2].layer[2].DenseReluDense.wo
        model.decoder.block[0].layer[1].layer_norm.weight = nn.Parameter(torch.full((128,), 0.7).bfloat16())
        model.decoder.block[0].layer[2].DenseReluDense.act = torch.nn.functional.silu
        for ff in (b.layer[2].DenseReluDense for b in model.decoder.block):
            ff.act = torch.nn.functional.silu
        fast, runs = step_once(model)
        assert runs == 1
        with pytest.MonkeyPatch.context() as m:
            m.setattr(decoder_step, "run", lambda *a: None)
            slow, _ = step_once(model)
        assert torch.equal(fast, slow)
        twin = copy.deepcopy(model)
        assert twin.decoder.plans == {}
        assert torch.equal(step_once(twin)[0], fast)


def test_a_planned_model_is_freed_without_the_garbage_collector():
    """A plan points at the decoder's blocks, never back at what holds it: a model let go is freed at once (its GBs
    of weights do not wait for a garbage collection)."""
    model = t5_model()
    with torch.no_grad():
        assert step_once(model)[1] == 1
    assert model.decoder.plans
    gc.disable()
    try:
        ref = weakref.ref(model)
        del model
        assert ref() is None
    finally:
        gc.enable()


def opt_model(bits: int = 4, act: str = "relu", ffn: int = 192, heads: int = 5, seed: int = 0) -> opt.OPTForCausalLM:
    """A random OPT in bfloat16 whose decoder's linear layers are weight-only (`bits`; 0: left in bfloat16), with
    biases, 5 heads of 32 (the query's scaling not a power of two)."""
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=200, hidden_size=160, num_hidden_layers=3, ffn_dim=ffn, num_attention_heads=heads,
                       max_position_embeddings=64, word_embed_proj_dim=160, activation_function=act)
    model = opt.OPTForCausalLM(config)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.data.normal_(0, 0.3)
            if getattr(m, "bias", None) is not None:
                m.bias.data.normal_(0, 0.5)
        elif isinstance(m, nn.LayerNorm):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.5)
    model = model.bfloat16().eval()
    for name, lin in list(model.named_modules()):
        if bits and isinstance(lin, nn.Linear) and name != "lm_head":
            q = WeightOnlyLinear(lin.in_features, lin.out_features, True, bits, 32, torch.bfloat16, device="cpu")
            q.load("weight", lin.weight.data)
            q.load("bias", lin.bias.data)
            model.set_submodule(name, q)
    return model


def opt_decode(model, steps: int, rows: int, pad: bool) -> tuple[torch.Tensor, KVCache, int]:
    """A prompt of 6 tokens (the first row's first 2 padded when `pad`), then fixed tokens one a step: the steps'
    logits (rows, steps, V), the cache after, and how many steps ran in one call."""
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 200, (rows, 6), generator=g)
    mask = torch.ones(rows, 6, dtype=torch.long)
    if pad:
        mask[0, :2] = 0
    tokens = torch.randint(3, 200, (rows, steps), generator=g)
    cache, outs = KVCache(model.num_layers), []
    with torch.no_grad(), native.decoding_step(), counting() as runs:
        model(input_ids=prompt, attention_mask=mask, past_key_values=cache, use_cache=True)
        for i in range(steps):
            mask = torch.cat([mask, mask.new_ones(rows, 1)], 1)
            outs.append(model(input_ids=tokens[:, i:i + 1], attention_mask=mask, past_key_values=cache,
                              use_cache=True).logits)
    return torch.cat(outs, 1), cache, runs[0]


@pytest.mark.parametrize("bits,act,ffn,pad", [(4, "relu", 192, False), (8, "relu", 96, True),
                                              (4, "gelu", 320, True)])
def test_opts_one_call_step_gives_the_layers_bits(bits, act, ffn, pad, monkeypatch):
    """OPT's layers (LayerNorm with biases, the query scaled by 32^-1/2, ReLU or GELU), int4 and int8, padded rows,
    1-2 rows, 20 steps: logits and KV cache bit for bit its layers' forward's."""
    assert opt.layer_norm_form() is not None  # blip2's LayerNorm gives torch's bits here
    model = opt_model(bits, act, ffn)
    for rows in (1, 2):
        fast, fast_cache, runs = opt_decode(model, 20, rows, pad)
        assert runs == 20
        with monkeypatch.context() as m:
            m.setattr(decoder_step, "run", lambda *a: None)
            slow, slow_cache, runs = opt_decode(model, 20, rows, pad)
        assert runs == 0
        assert torch.equal(fast, slow)
        for a, b in zip(fast_cache.k + fast_cache.v, slow_cache.k + slow_cache.v):
            assert torch.equal(a[:, :, :26], b[:, :, :26])


def test_the_layer_norm_kernel_gives_torchs_bits():
    """Every width the kernel takes from 16 to past OPT-6.7B's, 1-33 rows, rows of every scale and offset, inf and
    NaN: bit for bit F.layer_norm, in the form layer_norm_form found; another width gives other bits."""
    form = opt.layer_norm_form()
    g = torch.Generator().manual_seed(4)
    for d in (16, 32, 48, 160, 1024, 2560, 4096, 5120, 7168):
        if d % (32 if form & 1 else 16):
            continue
        for rows in (1, 3, 33):
            x = torch.randn(rows, d, generator=g) * torch.logspace(-4, 4, rows)[:, None] + \
                torch.randn(rows, 1, generator=g) * 100
            if rows == 3:
                x[1, 2], x[2, 3] = float("inf"), float("nan")
            x, w, b = x.bfloat16(), torch.randn(d, generator=g).bfloat16(), torch.randn(d, generator=g).bfloat16()
            out, ref = native.layer_norm(x, w, b, 1e-5, form), F.layer_norm(x, (d,), w, b, 1e-5)
            assert torch.equal(out.isnan(), ref.isnan())
            assert torch.equal(out.nan_to_num(), ref.nan_to_num()), (d, rows)
    x = (torch.randn(64, 4096, generator=g) * 3 + torch.randn(64, 1, generator=g) * 10).bfloat16()
    w, b = torch.randn(2, 4096, generator=g).bfloat16()
    for other in (form ^ 1, form ^ 2):  # the other width, the other last line
        assert not torch.equal(native.layer_norm(x, w, b, 1e-5, other), F.layer_norm(x, (4096,), w, b, 1e-5))
    with pytest.raises(ValueError, match="does not divide"):
        native.layer_norm(x[:, :40], w[:40], b[:40], 1e-5, form)


def test_opts_layers_run_where_a_norm_is_not_the_kernels():
    """A LayerNorm without its bias, in float32, or an OPT 24 wide (not whole vectors of the LayerNorm kernel): the
    layers' forward; the model as built: one call."""
    assert opt_decode(opt_model(), 2, 1, False)[2] == 2
    model = opt_model()
    model.model.decoder.layers[1].final_layer_norm.bias = None
    assert opt_decode(model, 2, 1, False)[2] == 0
    model = opt_model()
    model.model.decoder.layers[0].self_attn_layer_norm.float()
    assert opt_decode(model, 2, 1, False)[2] == 0
    torch.manual_seed(0)
    narrow = opt.OPTForCausalLM(OPTConfig(vocab_size=200, hidden_size=24, num_hidden_layers=1, ffn_dim=64,
                                          num_attention_heads=2, word_embed_proj_dim=24)).bfloat16().eval()
    for name, lin in list(narrow.model.decoder.named_modules()):
        if isinstance(lin, nn.Linear):
            q = WeightOnlyLinear(lin.in_features, lin.out_features, True, 8, 32, torch.bfloat16, device="cpu")
            q.load("weight", lin.weight.data)
            q.load("bias", lin.bias.data)
            narrow.model.decoder.set_submodule(name, q)
    assert decoder_step.make_plan(narrow.model.decoder.layers, 1) is not None  # every piece is blip2's kernel's ...
    assert opt_decode(narrow, 2, 1, False)[2] == 0  # ... but 24 is not whole vectors of 16
