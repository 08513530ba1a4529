"""blip2's kernels for the small ops of a decoding step (blip2/kernels/rms_norm.cpp, attention.cpp, through
blip2/native.py): T5's RMSNorm gives the bits of its eight torch ops, one query's attention matches
scaled_dot_product_attention, each serves only where it may (inference on the CPU, not under torch.compile, not
where a gradient is wanted), and the weight-only layers' one-call path keeps the activations' leading dimensions."""

import os

import pytest
import torch
import torch.nn.functional as F

from blip2 import native, ops, t5
from blip2.weight_only import WeightOnlyLinear

pytestmark = pytest.mark.skipif(not native.available(), reason="blip2's kernels cannot be built here (a C++ "
                                "compiler with OpenMP and an x86 CPU with AVX2)")
SIZES = (1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 255, 512, 1000, 2048, 4096, 5120, 20000)


@pytest.mark.parametrize("build", ["here", "avx2"])
def test_t5_rms_norm_gives_the_bits_of_its_torch_ops(build, tmp_path):
    """Every width from scalars to past whole vectors, bfloat16 / float32 activations and weights, 1-33 rows (33 x
    20000: the rows split between threads), tiny to large values, inf and NaN rows: bit for bit t5.rms_norm."""
    lib = None
    if build == "avx2":
        flags = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
        lib = native.load(native.build(os.environ.get("CXX", "c++"), flags, tmp_path))
    lanes = t5.norm_lanes()
    g = torch.Generator().manual_seed(0)
    for d in SIZES:
        for rows in (1, 3, 33):
            x = torch.randn(rows, d, generator=g) * torch.logspace(-3, 2, rows)[:, None]
            if rows == 3 and d > 4:
                x[1, 2], x[2, 3] = float("inf"), float("nan")
            w = torch.randn(d, generator=g) * 0.5 + 1
            for xd in (torch.bfloat16, torch.float32):
                for wd in (torch.bfloat16, torch.float32):
                    a, b = x.to(xd), w.to(wd)
                    ref, out = t5.rms_norm(a, b, 1e-6), native.rms_norm(a, b, 1e-6, lanes, lib)
                    assert out.dtype == ref.dtype
                    assert torch.equal(out.isnan(), ref.isnan())
                    assert torch.equal(out.nan_to_num(), ref.nan_to_num()), (d, rows, xd, wd)


def test_the_sum_order_is_found_and_matters():
    """norm_lanes finds the width torch's float sum runs at here; the other width gives other bits (so the probe
    can tell them apart), and a norm runs torch's ops where the kernel may not serve."""
    lanes = t5.norm_lanes()
    assert lanes in (8, 16)
    x, w = torch.randn(64, 2048, generator=torch.Generator().manual_seed(1)), torch.randn(2048)
    other = native.rms_norm(x, w, 1e-6, 24 - lanes)
    assert not torch.equal(other, t5.rms_norm(x, w, 1e-6))
    norm = t5.T5LayerNorm(2048, 1e-6)
    calls = []
    real = native.rms_norm
    try:
        native.rms_norm = lambda *a: calls.append(a) or real(*a)
        with torch.no_grad():
            fused = norm(x)
        assert len(calls) == 1
        with native.disabled():
            assert t5.norm_lanes() is None
            assert torch.equal(norm(x), fused)
        y = norm(x.requires_grad_())  # a gradient is wanted: torch's ops, differentiable
        y.sum().backward()
        assert x.grad is not None and norm.weight.grad is not None
        assert norm(x.detach().half()).dtype == torch.float32  # fp16 activations, float32 weight: torch's ops
        assert len(calls) == 1
    finally:
        native.rms_norm = real


def sdpa_cases():
    g = torch.Generator().manual_seed(0)
    for b, h, t, hd in ((1, 32, 1, 64), (1, 32, 20, 64), (3, 8, 35, 64), (2, 4, 7, 16), (8, 32, 70, 64)):
        cache = torch.randn(b, h, t + 5, hd, generator=g).narrow(2, 0, t)  # the KV cache's layout: (B, H, cap, hd)
        cross = torch.randn(b, t, h, hd, generator=g).transpose(1, 2)  # a linear's output as heads: (B, T, H, hd)
        q = torch.randn(b, 1, h, hd, generator=g).transpose(1, 2)
        for mask in (None, torch.randn(1, h, 1, t, generator=g),
                     (torch.rand(b, 1, 1, t, generator=g) < 0.3) * torch.finfo(torch.float32).min):
            for scale in (None, 1.0):
                yield q, cache, cross, mask, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_querys_attention_matches_sdpa(dtype):
    """Against float64: as close as torch's scaled_dot_product_attention in the same dtype (float32 sums in
    another order: within 2e-5), for the KV cache's and a cross-attention's layouts, broadcast and padding masks,
    batches of rows, and keys long enough to split the heads between threads."""
    for q, cache, cross, mask, scale in sdpa_cases():
        for k, v in ((cache, cache.flip(2)), (cross, cross), (cache, cross)):
            m = None if mask is None else mask.to(dtype)
            args = [x.to(dtype) for x in (q, k, v)]
            ref = F.scaled_dot_product_attention(*(x.double() for x in args), attn_mask=None if m is None else
                                                 m.double(), scale=scale).transpose(1, 2).flatten(2)
            torch_out = F.scaled_dot_product_attention(*args, attn_mask=m, scale=scale).transpose(1, 2).flatten(2)
            out = native.attend(*args, m, scale)
            assert out.dtype == dtype and out.shape == ref.shape
            err, torch_err = ((o.double() - ref).abs().max().item() for o in (out, torch_out))
            assert err <= max(2 * torch_err, 2e-5), (tuple(k.shape), mask is None, scale, err, torch_err)


def test_attention_takes_the_kernel_only_where_it_serves(monkeypatch):
    """ops.attention: one query on the CPU -> native.attend; more queries, the weights asked for, a bool mask or
    a gradient wanted -> torch's attention (and the gradient flows)."""
    calls = []
    real = native.attend
    monkeypatch.setattr(native, "attend", lambda *a: calls.append(a) or real(*a))
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    with torch.no_grad():
        out, _ = ops.attention(q, k, v)
        assert len(calls) == 1
        ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        ops.attention(torch.randn(2, 4, 2, 16), k, v)
        ops.attention(q, k, v, need_weights=True)
        ops.attention(q, k, v, torch.rand(2, 1, 1, 9) > 0.5)
    q.requires_grad_()
    out, _ = ops.attention(q, k, v)
    out.sum().backward()
    assert q.grad is not None and len(calls) == 1


def test_attend_names_what_it_cannot_take():
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 4, 9, 16)
    with pytest.raises(ValueError, match="one query"):
        native.attend(torch.randn(1, 4, 2, 16), k, k, None)
    with pytest.raises(ValueError, match="one query"):
        native.attend(q, k, torch.randn(1, 4, 8, 16), None)
    with pytest.raises(TypeError, match="one dtype"):
        native.attend(q, k, k.bfloat16(), None)
    with pytest.raises(ValueError, match="do not fit"):
        native.rms_norm(torch.randn(2, 8), torch.randn(9), 1e-6, t5.norm_lanes())


@pytest.mark.parametrize("bits", [4, 8])
def test_a_weight_only_layer_keeps_the_leading_dimensions(bits):
    """A decoding step's (B, T, K) bfloat16 activations go to the kernel as they are, in one call: the same bits
    as the 2-D call, shaped (B, T, N)."""
    torch.manual_seed(0)
    layer = WeightOnlyLinear(256, 96, True, bits, 64, torch.bfloat16, device="cpu")
    layer.load("weight", torch.randn(96, 256).bfloat16())
    layer.load("bias", torch.randn(96).bfloat16())
    x = torch.randn(2, 1, 256).bfloat16()  # (B, 1, K): fewer rows than int8's prompt-pass kernel takes
    with torch.no_grad():
        y = layer(x)
        assert y.shape == (2, 1, 96) and y.dtype == torch.bfloat16
        assert torch.equal(y, layer(x.reshape(2, 256)).reshape(2, 1, 96))
        assert torch.equal(layer.kernel(2)(x), y)


@pytest.fixture
def two_threads():
    """The pool serves from two threads (CI's machine has two cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def pool_and_openmp(f):
    """f() with blip2's decoding pool (BLIP2_POOL, read at each call) on, then off: both results."""
    before = os.environ.get("BLIP2_POOL")
    try:
        out = []
        for flag in ("1", "0"):
            os.environ["BLIP2_POOL"] = flag
            out.append(f())
        return out
    finally:
        os.environ.pop("BLIP2_POOL") if before is None else os.environ.update(BLIP2_POOL=before)


def test_the_decoding_pool_gives_openmps_bits(two_threads):
    """The pool changes who computes which block, not how: an int4 layer's output at 1-9 rows (9: OpenMP's path
    anyway) and one query's attention (heads split between the threads) are bit for bit the same with it on and off,
    called twice in a row (the second call's workers read ahead what followed last time)."""
    torch.manual_seed(0)
    layers = []
    for n, k in ((96, 256), (4096, 2048), (2048, 5120)):
        layer = WeightOnlyLinear(k, n, True, 4, 64, torch.bfloat16, device="cpu")
        layer.load("weight", torch.randn(n, k).bfloat16())
        layer.load("bias", torch.randn(n).bfloat16())
        layers.append(layer)
    q, kv = torch.randn(2, 32, 1, 64).bfloat16(), torch.randn(2, 32, 40, 64).bfloat16()
    for m in (1, 2, 3, 8, 9):
        xs = [torch.randn(m, layer.in_features).bfloat16() for layer in layers]

        def run():
            with torch.no_grad(), native.decoding_step():
                return [layer(x) for _ in range(2) for layer, x in zip(layers, xs)] + [native.attend(q, kv, kv, None)]
        runs = native.library().blip2_pool_runs
        before = runs()
        pooled, openmp = pool_and_openmp(run)
        assert all(torch.equal(a, b) for a, b in zip(pooled, openmp)), m
        # on: every matmul of up to 8 rows and the attention ran on the pool; off: none
        assert runs() - before == (2 * len(layers) if m <= 8 else 0) + 1, m


def test_the_pool_takes_one_caller_at_a_time(two_threads):
    """Decoding steps in several threads at once: one at a time runs on the pool, the others on OpenMP; every output
    is what one caller alone gets, and torch has its threads back at the end."""
    import threading

    torch.manual_seed(0)
    layer = WeightOnlyLinear(2048, 1024, False, 4, 64, torch.bfloat16, device="cpu")
    layer.load("weight", torch.randn(1024, 2048).bfloat16())
    xs = [torch.randn(1, 2048).bfloat16() for _ in range(4)]
    with torch.no_grad():
        want = [layer(x) for x in xs]
    bad = []

    def caller(i):
        with torch.no_grad():
            for _ in range(100):
                with native.decoding_step():
                    if not torch.equal(layer(xs[i]), want[i]):
                        bad.append(i)
    before = native.library().blip2_pool_runs()
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not bad and torch.get_num_threads() == 2
    assert native.library().blip2_pool_runs() > before  # the pool served (which caller, when, is up to the threads)


def fork_child(layer, x, queue):
    with torch.no_grad(), native.decoding_step():
        queue.put(layer(x).float().tolist())  # plain floats (a tensor would go by a file descriptor)


def test_a_forked_child_makes_its_own_pool(two_threads):
    """The parent's workers are not in a forked child (Ray's and multiprocessing's fork): the child's first call
    makes a pool of its own, and gets the parent's output."""
    import multiprocessing

    torch.manual_seed(0)
    layer = WeightOnlyLinear(2048, 1024, False, 4, 64, torch.bfloat16, device="cpu")
    layer.load("weight", torch.randn(1024, 2048).bfloat16())
    x = torch.randn(1, 2048).bfloat16()
    with torch.no_grad(), native.decoding_step():
        want = layer(x)  # the pool exists in this process now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=fork_child, args=(layer, x, queue))
    child.start()
    got = queue.get(timeout=120)
    child.join(timeout=120)
    assert child.exitcode == 0 and got == want.float().tolist()


def test_a_decoding_step_keeps_torch_on_one_thread_and_gives_the_threads_back(two_threads):
    with native.decoding_step():
        assert torch.get_num_threads() == 1 and native.threads() == 2
        with native.decoding_step():  # nested: the outer one's setting stands
            assert torch.get_num_threads() == 1 and native.threads() == 2
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2 and native.threads() == 2
    with pytest.raises(RuntimeError, match="inside"):
        with native.decoding_step():
            raise RuntimeError("inside")
    assert torch.get_num_threads() == 2 and native.threads() == 2
