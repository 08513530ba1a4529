"""One int4 decoding step of a real-size checkpoint, taken apart: what `bench.realsize`'s "decode / token" is made of.

    python -m bench.step --model flan-t5-xl            # the bare step (no generate loop) and its kernels' share
    python -m bench.step --model flan-t5-xl --parts    # + the norms, attentions and KV-cache appends inside it (timed
                                                       #   in its layers' forward, not the one-call step)
    python -m bench.step --model opt-2.7b --compile    # + the step compiled (torch.compile of the decoder stack)
    THP_MEM_ALLOC_ENABLE=1 python -m bench.step ...    # torch's huge-page allocations (env: GOMP_SPINCOUNT etc. too)
    python -m bench.step --model flan-t5-xl --cold     # + small ops warm and right after 16 MB streamed through cache
    python -m bench.step --model flan-t5-xl --ab       # + the step with and without blip2's decoding pool and its
                                                       #   one-call step (decoder_step), rounds interleaved

It reads the int4 copy `python -m bench.realsize --model M` saved (its cache folder, or --cache). Reported, median of
`--steps` steps after a prompt of 33 positions, in `--rounds` rounds: the step; the time inside blip2's kernels
called from Python (timed around each call, inside the step: the one-call step calls them itself, all but the
lm_head's); the same kernels called back to back over the step's weights, alone, on the decoding pool;
with --parts, each kind of small op as the step runs it and how many torch ops a step dispatches; with --compile,
the compiled step (its compile time too); with --cold, a few of the step's small ops at its shapes, warm and right
after a kernel-sized read (16 MB) has gone through the caches, as each runs in the step.
"""

import argparse
import collections
import contextlib
import os
import statistics
import sys
import time

import torch

from bench.machine import machine
from bench.realsize import CACHE, read_each_step


def timed(owner, name: str, acc: collections.Counter, label: str) -> None:
    """Wrap owner.name so that its calls add their seconds to acc[label] (and their count to acc[label, "n"])."""
    f = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            acc[label] += time.perf_counter() - t
            acc[label, "n"] += 1

    setattr(owner, name, wrapper)


def stepper(lm, d: int):
    """A fresh 33-position prompt, then -> one decoding step (a callable), run as the decoding loops run it
    (inside native.decoding_step())."""
    from blip2 import native
    from blip2.cache import KVCache

    ids = torch.zeros(1, 1, dtype=torch.long)
    if hasattr(lm, "encoder"):
        context, cache = torch.randn(1, 33, d).bfloat16(), KVCache(lm.num_layers)
        lm.decode(ids, context, past_key_values=cache)
        run = lambda: lm.decode(ids, context, past_key_values=cache)  # noqa: E731
    else:
        cache = lm(inputs_embeds=torch.randn(1, 33, d).bfloat16(), use_cache=True).past_key_values
        run = lambda: lm(input_ids=ids, past_key_values=cache, use_cache=True)  # noqa: E731

    def step():
        with native.decoding_step():
            return run()
    return step


VARIANTS = {  # --ab: (blip2's decoding pool, the step in one call)
    "layers' forward, OpenMP": (False, False),
    "layers' forward, decoding pool": (True, False),
    "step in one call, decoding pool": (True, True),
}


@contextlib.contextmanager
def variant(pool: bool, one_call: bool):
    """Within: blip2's decoding pool on or off (BLIP2_POOL=0), the decoding step in one call (decoder_step) or its
    layers' forward."""
    from blip2 import decoder_step

    before, run = os.environ.get("BLIP2_POOL"), decoder_step.run
    os.environ["BLIP2_POOL"] = "1" if pool else "0"
    if not one_call:
        decoder_step.run = lambda *args: None
    try:
        yield
    finally:
        decoder_step.run = run
        if before is None:
            del os.environ["BLIP2_POOL"]
        else:
            os.environ["BLIP2_POOL"] = before


def measure(lm, d: int, steps: int, rounds: int, acc: collections.Counter) -> float:
    """Median seconds of a step over `rounds` fresh prompts of `steps` steps each; acc holds the last round's
    sums."""
    medians = []
    for _ in range(rounds):
        step = stepper(lm, d)
        step()
        acc.clear()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        medians.append(statistics.median(times))
    return statistics.median(medians)


def dispatches(lm, d: int) -> int:
    """torch ops one decoding step dispatches (views and allocations included; blip2's kernels are not torch ops)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    step = stepper(lm, d)
    step()
    with Count() as count:
        step()
    return count.n


def kernels_alone(lm, repeat: int = 15) -> float:
    """The step's kernels (the layers' bound native.Call) back to back, one input row each: seconds, median of
    `repeat`."""
    from blip2 import native
    from blip2.weight_only import WeightOnlyLinear

    read = read_each_step(lm)
    calls = [m.kernel(1) for n, m in lm.named_modules() if isinstance(m, WeightOnlyLinear) and read(n + ".weight")]
    inputs = {c.k: torch.randn(1, c.k).bfloat16() for c in calls}
    times = []
    for _ in range(repeat + 1):
        t = time.perf_counter()
        with native.decoding_step():  # on the decoding pool, as in the step
            for c in calls:
                c(inputs[c.k])
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def compiled(lm) -> float:
    """Compile the decoder stack (the int4 kernel as a torch.library custom op, opaque to the compiler); the
    seconds its first steps took (compiling)."""
    from blip2 import native
    from blip2.weight_only import WeightOnlyLinear

    @torch.library.custom_op("blip2_bench::int4", mutates_args=())
    def int4(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor, bias: torch.Tensor | None, group: int) -> torch.Tensor:
        return native.int4_mm(x, w, sz, group, bias=bias, dtype=torch.bfloat16)

    @int4.register_fake
    def _(x, w, sz, bias, group):
        return x.new_empty(x.shape[0], w.shape[0], dtype=torch.bfloat16)

    def forward(self, x):
        return int4(x.reshape(-1, x.shape[-1]), self.weight, self.scales_and_zeros, self.bias,
                    self.group_size).reshape(*x.shape[:-1], self.out_features)

    WeightOnlyLinear.forward = forward
    torch._dynamo.config.cache_size_limit = 64  # the KV cache's capacity doubles: a few recompiles
    stack = lm.decoder if hasattr(lm, "encoder") else lm.model.decoder
    stack.forward = torch.compile(stack.forward, dynamic=True)
    t = time.perf_counter()
    step = stepper(lm, lm.config.d_model if hasattr(lm, "encoder") else lm.config.hidden_size)
    for _ in range(40):  # past the cache's growth (16, 32, 64 positions)
        step()
    return time.perf_counter() - t


def cold(lm, d: int) -> dict[str, tuple[float, float]]:
    """Microseconds (median of 200) of small ops at a decoding step's shapes, warm and right after 16 MB of weights'
    worth has been summed by both threads."""
    import torch.nn.functional as F

    from blip2 import native, t5

    cfg = lm.config
    heads = getattr(cfg, "num_heads", None) or cfg.num_attention_heads
    big, x, w = torch.randn(8 << 20).bfloat16(), torch.randn(1, 1, d).bfloat16(), torch.ones(d).bfloat16()
    q, k = torch.randn(1, heads, 1, d // heads).bfloat16(), torch.randn(1, heads, 35, d // heads).bfloat16()
    ops = {f"add ({d} bf16)": lambda: x + x, "torch.empty": lambda: torch.empty(1, 1, d, dtype=torch.bfloat16),
           "RMSNorm, torch's 8 ops": lambda: t5.rms_norm(x, w, 1e-6),
           "RMSNorm, blip2's kernel": lambda: native.rms_norm(x, w, 1e-6, t5.norm_lanes() or 8),
           "attention over 35 keys, SDPA": lambda: F.scaled_dot_product_attention(q, k, k),
           "attention over 35 keys, blip2's kernel": lambda: native.attend(q, k, k, None)}
    out = {}
    for name, f in ops.items():
        warm, after = [], []
        for _ in range(200):
            f()
            t = time.perf_counter()
            f()
            warm.append(time.perf_counter() - t)
            big.sum()
            t = time.perf_counter()
            f()
            after.append(time.perf_counter() - t)
        out[name] = statistics.median(warm) * 1e6, statistics.median(after) * 1e6
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.step")
    ap.add_argument("--model", default="flan-t5-xl", help="a checkpoint bench.realsize saved in int4")
    ap.add_argument("--cache", default=CACHE)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parts", action="store_true", help="also time the small ops inside the step")
    ap.add_argument("--compile", action="store_true", help="also time the step compiled")
    ap.add_argument("--cold", action="store_true", help="also time small ops warm and after 16 MB streamed")
    ap.add_argument("--ab", action="store_true", help="also the step with and without blip2's decoding pool and "
                    "its one-call step, rounds interleaved")
    args = ap.parse_args(argv)
    path = os.path.join(args.cache, f"blip2-{args.model}-int4")
    if not os.path.isdir(path):
        ap.error(f"{path} is missing: `python -m bench.realsize --model {args.model} --runs blip2-int4` writes it")
    torch.set_num_threads(args.threads)

    import blip2
    from blip2 import native, opt, t5
    from blip2.cache import KVCache

    lm = blip2.Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).language_model
    d = lm.config.d_model if hasattr(lm, "encoder") else lm.config.hidden_size
    acc = collections.Counter()
    timed(native.Call, "__call__", acc, "blip2's kernels called from Python")
    if args.parts:
        for owner, name, label in ((t5.T5LayerNorm, "forward", "T5 RMSNorm"), (torch.nn.LayerNorm, "forward",
                                   "LayerNorm"), (t5, "attention", "attention"), (opt, "attention", "attention"),
                                   (KVCache, "update", "KV cache append")):
            timed(owner, name, acc, label)
    # the one-call step runs its norms and attentions in C, out of the timers' sight: --parts times the layers' forward
    pool = os.environ.get("BLIP2_POOL") != "0"
    with torch.no_grad(), variant(pool, not args.parts):
        step = measure(lm, d, args.steps, args.rounds, acc)
        inside = dict(acc)
        alone = kernels_alone(lm)
    print(f"{args.model} int4, {args.threads} threads, {machine()}; OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}, THP_MEM_ALLOC_ENABLE="
          f"{os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}")
    print(f"decoding step{' (its layers forward, parts timed)' if args.parts else ''}: {step * 1e3:.2f} ms "
          f"(median of {args.rounds} x {args.steps} steps; timing the parts adds a little)")
    for label in dict.fromkeys(k for k in inside if isinstance(k, str)):
        n = inside[label, "n"] / args.steps
        print(f"  {label}: {inside[label] / args.steps * 1e3:.2f} ms a step, {n:.0f} calls, "
              f"{inside[label] / inside[label, 'n'] * 1e6:.1f} us each")
    print(f"the step's kernels back to back, alone: {alone * 1e3:.2f} ms")
    if args.parts:
        counts = []
        for label, one_call in (("in its layers' forward", False), ("in one call", True)):
            with torch.no_grad(), variant(pool, one_call):
                counts.append(f"{dispatches(lm, d)} {label}")
        print(f"torch ops the step dispatches: {', '.join(counts)}")
    if args.ab:
        with torch.no_grad():
            runs = {name: [] for name in VARIANTS}
            for _ in range(args.rounds * 2):
                for name in runs:
                    with variant(*VARIANTS[name]):
                        runs[name].append(measure(lm, d, args.steps, 1, acc))
            for name, times in runs.items():
                print(f"  {name}: {statistics.median(times) * 1e3:.2f} ms "
                      f"({' '.join(f'{t * 1e3:.1f}' for t in times)})")
    if args.cold:
        with torch.no_grad():
            for name, (warm, after) in cold(lm, d).items():
                print(f"  {name}: {warm:.1f} us warm, {after:.1f} us right after 16 MB streamed")
    if args.compile:
        with torch.no_grad():
            compile_s = compiled(lm)
            print(f"compiled step: {measure(lm, d, args.steps, args.rounds, acc) * 1e3:.2f} ms (first 40 steps, "
                  f"compiling: {compile_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
