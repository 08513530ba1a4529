"""The real sizes on a small CPU: each Salesforce BLIP-2 checkpoint's exact architecture with random weights.

    python -m bench.realsize --model opt-2.7b     # blip2 int4 (quantized while loading), its saved copy, transformers
    python -m bench.realsize --model opt-2.7b,opt-6.7b,flan-t5-xl,flan-t5-xxl      # the README's table
    python -m bench.realsize --model opt-2.7b --runs blip2-int4-noamx,blip2-int4-noamx-vision-bf16   # no AMX
    python -m bench.realsize --cache DIR          # where the checkpoints (7.5-24 GB each) are written once
    python -m bench.realsize --kernels            # only the int8 / int4 kernels against bf16, per row count

The checkpoints: bench/checkpoints.py (the Hub config.json of Salesforce/blip2-{model}, random N(0, 0.02) weights,
bf16 safetensors shards written one at a time) into the cache folder (default ~/.cache/blip2-bench/realsize, or
$BLIP2_BENCH_CACHE).

Each setting runs in a fresh process (its peak resident memory, VmHWM, is its own), one at a time, the settings
interleaved A B C A B C so that the neighbours' load hits them alike: load (and VmHWM right after it: the peak while
quantizing), first caption, warm caption (greedy, `--tokens` new tokens, forced with min_new_tokens), a VQA answer
(a 12-token question, `--vqa-tokens` new tokens), encode (vision + Q-Former + projection), decode seconds per token
(the median time between two new tokens of the captions, timed by a streamer: a burst of load on a shared machine
moves the median little; beside it this process's CPU seconds per token / threads, what a quiet machine
would take with both threads busy), the last prompt position's logits relative to blip2 bf16's (when
that ran). "blip2-int4-saved" reloads the int4 copy that the blip2-int4 run saved; "-aten" runs int4 on PyTorch's
kernel; "-noamx" keeps oneDNN off AMX (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16: AVX-512 with bf16 dot products, as on
an AMD EPYC), so that the vision tower's precision is decided as on such a CPU; "-wo-bf16" keeps T5's feed-forward
output `wo` in bf16. transformers bf16 runs only where the checkpoint fits in 16 GB with 1 GB to spare.
A floors process measures in the same run the read bandwidth (sum of a 1 GiB float32 tensor) and the bf16 matmul
throughput; the floors: encode FLOPs / matmul rate, the prompt's FLOPs / matmul rate, a decoding step's weight
bytes / bandwidth. The CPUs may be shared: the load average and free memory are printed beside every figure (on a
busy machine, run with `--omp-wait passive`: WAIT_POLICIES below).
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

from bench.checkpoints import MODELS, hub_config, write_checkpoint
from bench.machine import cpus, load_average, machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("BLIP2_BENCH_CACHE") or os.path.expanduser("~/.cache/blip2-bench/realsize")
NO_AMX = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
RUNS = {  # name -> (library, quantization, environment)
    "blip2-bf16": ("blip2", None, {}), "blip2-int8": ("blip2", "int8_weight_only", {}),
    "blip2-int4": ("blip2", "int4_weight_only", {}), "blip2-int4-saved": ("blip2-saved", None, {}),
    "blip2-int4-aten": ("blip2", "int4_weight_only", {"BLIP2_KERNELS": "aten"}),
    "blip2-int4-wo-bf16": ("blip2", {"bits": 4, "modules_to_not_convert": ["wo"]}, {}),
    "blip2-int4-noamx": ("blip2", "int4_weight_only", NO_AMX),
    "blip2-int4-noamx-vision-bf16": ("blip2", {"bits": 4, "include_vision": False}, NO_AMX),
    "hf-bf16": ("hf", None, {}), "hf-8bit": ("hf", "8bit", {})}
DEFAULT_RUNS = "blip2-int4,blip2-int4-saved,hf-bf16"
# How the children's OpenMP threads wait between parallel regions (--omp-wait). "library": as blip2's users run
# (libgomp's default: spin a while, then sleep), for a quiet machine. "passive" (OMP_WAIT_POLICY=PASSIVE: sleep at
# once), for a machine whose other processes keep its cores busy: there a spinning thread spends its time slice
# waiting for a descheduled peer at every parallel region (200+ per decoding step), and a 2-thread decoding step ran
# ~10x slower (64 int4 2560 x 2560 matmuls at 1 row, load 7-10 on 2 cores: 81-214 ms spinning, 20.6 passive, 24.9
# on 1 thread); on a quiet machine passive waiting costs a wake-up per region instead (Flan-T5-XL int4 decoding
# step: 51 ms library, 82 ms passive). $OMP_WAIT_POLICY, where set, wins over both.
WAIT_POLICIES = {"library": None, "passive": "PASSIVE"}
FITS = 16e9 - 1e9  # a bf16 checkpoint transformers runs here: its bytes plus 1 GB of activations and runtime
QUESTION = list(range(1000, 1012))  # 12 token ids: "Question: what is in the picture? Answer:"-sized
GENERATION_ONLY = "the bench times image-to-text checkpoints; {} has no language model (its vision tower and " \
                  "Q-Former are those of the others, timed in their encode column)"


def status(field: str) -> int:
    """VmRSS / VmHWM of this process, bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def read_each_step(lm):
    """-> predicate on lm's parameter names: those a decoding step reads. OPT: every parameter but the position
    table and (unless lm_head shares it) the token table, of which one row is gathered; T5: the decoder's and
    lm_head's, less the cross-attention's keys and values (computed once from the encoder's output, then cached)."""
    tied = lm.lm_head.weight is lm.get_input_embeddings().weight
    t5 = hasattr(lm, "encoder")

    def read(n: str) -> bool:
        if t5:
            return n.startswith(("decoder.", "lm_head.")) and ".EncDecAttention.k." not in n and \
                ".EncDecAttention.v." not in n and "embed_tokens" not in n
        return "embed_positions" not in n and ("embed_tokens" not in n or tied)

    return read


def stream_bytes(lm) -> int:
    """Weight bytes a decoding step reads (read_each_step)."""
    read = read_each_step(lm)
    return sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if read(n))


def best_time(fn, repeat=2):
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def prompts(config: dict) -> tuple[list[int], list[int]]:
    """The caption's and the VQA question's input ids: the 32 image tokens, then BOS (OPT) or the question, then
    EOS (T5's encoder input ends with it)."""
    image = [config["image_token_index"]] * config["num_query_tokens"]
    if config["text_config"]["model_type"] == "t5":
        return image + [1], image + QUESTION + [1]
    return image + [2], image + [2] + QUESTION


def child(name: str, model_name: str, path: str, saved: str, tokens: int, vqa_tokens: int, threads: int,
          out: str, best_of: int = 2) -> dict:
    """One setting in this (fresh) process."""
    import torch

    torch.set_num_threads(threads)
    lib, quant, _ = RUNS[name]
    if quant == "8bit":
        __import__("bitsandbytes")
    config = hub_config(model_name)
    t = time.perf_counter()
    if lib == "hf":
        import transformers

        kw = {}
        if quant:
            kw = dict(quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True), device_map="cpu")
        model = transformers.Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, **kw).eval()
    else:
        import logging

        import blip2

        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # the load's decisions, in stderr
        source = saved if lib == "blip2-saved" else path
        model = blip2.Blip2ForConditionalGeneration.from_pretrained(source, dtype=torch.bfloat16, quantization=quant)
    load_s, load_rss, load_hwm = time.perf_counter() - t, status("VmRSS"), status("VmHWM")
    side = config["vision_config"].get("image_size", 224)
    pixels = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0)).bfloat16()
    caption_ids, vqa_ids = (torch.tensor([ids]) for ids in prompts(config))

    clocks = []

    def generate(ids, n):
        clocks.append(Clock())
        with torch.no_grad():
            return model.generate(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clocks[-1])

    t = time.perf_counter()
    first_ids = generate(caption_ids, tokens)
    first = time.perf_counter() - t
    cpu = time.process_time()
    warm = best_time(lambda: generate(caption_ids, tokens), best_of)
    warm_cpu = (time.process_time() - cpu) / best_of / threads
    steps = [b - a for c in clocks for a, b in zip(c.times[1:], c.times[2:])]  # each new token after the first
    steps_cpu = [b - a for c in clocks for a, b in zip(c.cpu[1:], c.cpu[2:])]
    vqa = best_time(lambda: generate(vqa_ids, vqa_tokens), best_of)
    with torch.no_grad():
        encode = best_time(lambda: model.get_image_features(pixels), best_of)
        kw = {"decoder_input_ids": torch.zeros(1, 1, dtype=torch.long)} if model.config.is_encoder_decoder else {}
        logits = model(pixel_values=pixels, input_ids=caption_ids, **kw).logits[0, -1].float()
    torch.save(logits, os.path.join(out, f"logits-{model_name}-{name}.pt"))
    qc = (model.config.extra if lib != "hf" else {}).get("quantization_config") or {}
    with torch.no_grad():  # the 32 query outputs the language model reads, for the vision tower's precision
        features = model.get_image_features(pixels)
    features = getattr(features, "pooler_output", features)
    torch.save({"features": features.float(), "vision": bool(qc.get("include_vision"))},
               os.path.join(out, f"features-{model_name}-{name}.pt"))
    if name == "blip2-int4" and saved_layout(saved) != qc["int4_layout"]:
        shutil.rmtree(saved, ignore_errors=True)  # none yet, or packed for the other kernel
        model.save_pretrained(saved + ".tmp", max_shard_size="2GB")
        os.rename(saved + ".tmp", saved)
    prompt = caption_ids.shape[1] if not model.config.is_encoder_decoder else 0
    return dict(name=name, load_s=load_s, load_rss=load_rss, load_hwm=load_hwm, first=first, warm=warm,
                vqa=vqa, encode=encode, decode=statistics.median(steps), warm_cpu=warm_cpu,
                decode_cpu=statistics.median(steps_cpu) / threads, hwm=status("VmHWM"),
                rss=status("VmRSS"), stream=stream_bytes(model.language_model), vision=qc.get("include_vision"),
                ids=first_ids[0, prompt:].tolist())


class Clock:
    """A streamer (the Hugging Face protocol both libraries call) that notes the time of each put: the prompt's ids,
    then every new token."""

    def __init__(self):
        self.times, self.cpu = [], []  # wall-clock and this process's CPU seconds

    def put(self, _ids) -> None:
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def end(self) -> None:
        pass


def saved_layout(saved: str) -> int | None:
    try:
        with open(os.path.join(saved, "config.json")) as f:
            return json.load(f)["quantization_config"]["int4_layout"]
    except (OSError, KeyError):
        return None


def floors(threads: int) -> dict:
    """Read bandwidth (bytes/s: sum of a 1 GiB float32 tensor, median and best of 9) and bf16 matmul FLOP/s
    (an encoder-sized 1024 x 2560 @ 2560 x 10240, best of 10)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.empty(2**28, dtype=torch.float32).normal_()  # float32: a bf16 sum is bound by its conversions
    x.sum()
    reads = [x.numel() * 4 / best_time(lambda: x.sum(), 1) for _ in range(9)]
    a, b = torch.randn(1024, 2560).bfloat16(), torch.randn(2560, 10240).bfloat16()
    a @ b
    flops = 2 * 1024 * 2560 * 10240 / best_time(lambda: a @ b, 10)
    return dict(name="floors", bandwidth=statistics.median(reads), bandwidth_best=max(reads), flops=flops)


def kernels(threads: int, repeat: int = 15):
    """Per row count M: one OPT-2.7b FFN matrix (10240 x 2560) in bf16 (F.linear), int8 and int4 (groups of 32, 64,
    128) through the layers blip2 runs (int8 from INT8_MATMUL_ROWS rows: torch._int_mm on per-row int8 activations,
    below on blip2's kernel; int4 on blip2's kernel), and int8 / int4 g64 on PyTorch's kernels, best of `repeat`,
    interleaved."""
    import torch

    from blip2 import native
    from blip2.weight_only import WeightOnlyLinear

    torch.set_num_threads(threads)
    w = torch.empty(10240, 2560, dtype=torch.bfloat16).normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    layers, modules = {"bf16": lambda x: torch.nn.functional.linear(x, w)}, {}
    def on_aten(lin):  # PyTorch's kernels at every call (int8 picks its kernel per call, int4 by its packing)
        def call(x):
            with native.disabled():
                return lin(x)
        return call

    for bits, group, aten in ((8, 64, False), (8, 64, True), (4, 32, False), (4, 64, False), (4, 128, False),
                              (4, 64, True)):
        with native.disabled() if aten else contextlib.nullcontext():
            lin = WeightOnlyLinear(2560, 10240, False, bits, group, torch.bfloat16, device="cpu")
            lin.load("weight", w)
        name = f"int{bits}" + (f" g{group}" if bits == 4 else "") + (" PyTorch" if aten else "")
        layers[name], modules[name] = (on_aten(lin) if aten else lin), lin
    print(f"one 10240 x 2560 matrix, {threads} threads, best of {repeat} (ms); int4 on blip2's kernel "
          f"({native.isa() or 'not built'}) unless marked PyTorch; load average {load_average()}")
    print("| rows M | " + " | ".join(layers) + " |\n|---|" + "---|" * len(layers))
    for m in (1, 2, 4, 8, 16, 33, 64, 128, 257):
        x = torch.randn(m, 2560, dtype=torch.bfloat16)
        times = {k: [] for k in layers}
        with torch.no_grad():
            for _ in range(repeat):
                for k, f in layers.items():
                    t = time.perf_counter()
                    f(x)
                    times[k].append(time.perf_counter() - t)
        print(f"| {m} | " + " | ".join(f"{min(v) * 1e3:.2f}" for v in times.values()) + " |", flush=True)
    # a real pass reads each matrix once, from memory: 48 distinct copies (~1.3 GB in int8) streamed in turn
    print(f"\nstreaming 48 distinct copies, ms per matrix and GB/s of weights read (threads: {threads}, then 1)")
    print("| layer, rows | ms | GB/s | ms, 1 thread | GB/s, 1 thread |\n|---|---|---|---|---|")
    for name, m in (("int4 g64", 1), ("int4 g64 PyTorch", 1), ("int4 g64", 33), ("int8", 1), ("int8 PyTorch", 1),
                    ("int8", 33)):
        lin, call = modules[name], layers[name]
        copies = [(lin.weight.clone(), (lin.scales if lin.bits == 8 else lin.scales_and_zeros).clone())
                  for _ in range(48)]
        nbytes = sum(t.numel() * t.element_size() for t in copies[0])
        x, row = torch.randn(m, 2560, dtype=torch.bfloat16), []
        for n in (threads, 1):
            torch.set_num_threads(n)
            best = math.inf
            for _ in range(3):
                t = time.perf_counter()
                for w, sc in copies:
                    lin.load("weight", w)  # packed as it is (no copy)
                    lin.load("scales" if lin.bits == 8 else "scales_and_zeros", sc)
                    call(x)
                best = min(best, (time.perf_counter() - t) / len(copies))
            row += [f"{best * 1e3:.2f}", f"{nbytes / best / 1e9:.1f}"]
        torch.set_num_threads(threads)
        print(f"| {name}, {m} | " + " | ".join(row) + " |", flush=True)


def run(env: dict, wait: str, *args) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1", **env)
    if WAIT_POLICIES[wait]:
        env.setdefault("OMP_WAIT_POLICY", WAIT_POLICIES[wait])
    p = subprocess.run([sys.executable, "-m", "bench.realsize", *args], env=env, capture_output=True, text=True,
                       cwd=ROOT)
    line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("{")), None)
    if p.returncode or line is None:
        return dict(error=(p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1])
    result = json.loads(line)
    result["log"] = [ln for ln in p.stderr.splitlines() if ln.startswith("blip2.")]
    return result


def bf16_bytes(path: str) -> int:
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        return json.load(f)["metadata"]["total_size"]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.realsize")
    ap.add_argument("--model", default="opt-2.7b", help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma-separated, of {', '.join(RUNS)}")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over the settings (the best of each is shown)")
    ap.add_argument("--tokens", type=int, default=20, help="new tokens per caption")
    ap.add_argument("--vqa-tokens", type=int, default=5, help="new tokens per VQA answer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--best-of", type=int, default=2, help="timings within a process: the best of this many")
    ap.add_argument("--cache", default=CACHE, help="where the checkpoints (and the saved int4 copies) live")
    ap.add_argument("--omp-wait", choices=WAIT_POLICIES, default="library",
                    help="how the OpenMP threads wait: library (quiet machine) or passive (shared, busy machine)")
    ap.add_argument("--kernels", action="store_true", help="only time the packed kernels against bf16 per row count")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.kernels:
        kernels(args.threads)
        return 0
    models, names = args.model.split(","), args.runs.split(",")
    unknown = [m for m in models if m not in MODELS] + [n for n in names if n not in RUNS]
    if unknown:
        ap.error(f"unknown model(s) or run(s) {', '.join(unknown)}: models {', '.join(MODELS)}; runs "
                 f"{', '.join(RUNS)}")
    retrieval = [m for m in models if m.startswith("itm-")]
    if retrieval:
        ap.error(GENERATION_ONLY.format(", ".join(retrieval)))
    if args.child:
        model = models[0]
        path, saved = (os.path.join(args.cache, f"blip2-{model}-{kind}") for kind in ("random", "int4"))
        result = floors(args.threads) if args.child == "floors" else \
            child(args.child, model, path, saved, args.tokens, args.vqa_tokens, args.threads, args.cache,
                  args.best_of)
        print(json.dumps(result))
        return 0
    for model in models:
        bench_model(model, list(names), args)
    return 0


def bench_model(model: str, names: list[str], args) -> None:
    path, saved = (os.path.join(args.cache, f"blip2-{model}-{kind}") for kind in ("random", "int4"))
    wait = os.environ.get("OMP_WAIT_POLICY") or WAIT_POLICIES[args.omp_wait] or "unset (libgomp's default)"
    print(f"\n## {model}: checkpoint {write_checkpoint(model, path)} ({machine()}; OMP_WAIT_POLICY={wait})",
          flush=True)
    if "blip2-int4-saved" in names and not os.path.isdir(saved) and "blip2-int4" not in names:
        names.insert(0, "blip2-int4")  # it writes the saved copy
    too_big = bf16_bytes(path) > FITS
    skipped = [n for n in names if n.startswith("hf-bf16") and too_big]
    common = ["--model", model, "--tokens", str(args.tokens), "--vqa-tokens", str(args.vqa_tokens), "--threads",
              str(args.threads), "--cache", args.cache, "--best-of", str(args.best_of)]
    results = {n: [] for n in names + ["floors"]}
    for i in range(args.repeat):
        for name in [n for n in names if n not in skipped] + ["floors"]:
            r = run(RUNS[name][2] if name in RUNS else {}, args.omp_wait, "--child", name, *common)
            r["machine"] = machine(cpu=False)
            results[name].append(r)
            print(f"round {i + 1} {name}: " + (r["error"] if "error" in r else ", ".join(
                f"{k} {v:.3g}" for k, v in r.items() if isinstance(v, float))) + f"  ({r['machine']})", flush=True)
            for line in r.get("log", []):
                print(f"    {line}")
    for n in skipped:
        results[n] = [dict(error=f"does not fit in 16 GB ({bf16_bytes(path) / 1e9:.1f} GB of bf16 weights)")]
    report(model, results, names, args)


def report(model_name, results, names, args):
    import torch

    from bench.flops import encode_flops, meta_model, prompt_flops
    from blip2 import Blip2Config

    config = hub_config(model_name)
    caption_ids, _ = prompts(config)
    model = meta_model(Blip2Config.from_dict(config))  # FLOPs counted on the meta device
    encode_gflop, prompt_gflop = encode_flops(model) / 1e9, prompt_flops(model, len(caption_ids)) / 1e9
    fl = [r for r in results["floors"] if "error" not in r]
    bandwidth = statistics.median(r["bandwidth"] for r in fl)
    flops = max(r["flops"] for r in fl)
    enc_floor, prompt_floor = encode_gflop * 1e9 / flops, prompt_gflop * 1e9 / flops
    best = {}
    for name in names:
        ok = [r for r in results[name] if "error" not in r]
        best[name] = results[name][0] if not ok else {
            k: (min(r[k] for r in ok) if k not in ("hwm", "load_hwm") else max(r[k] for r in ok))
            if isinstance(ok[0][k], float) or k in ("hwm", "load_hwm") else ok[0][k] for k in ok[0]}
    ref_path = os.path.join(args.cache, f"logits-{model_name}-blip2-bf16.pt")
    ref = torch.load(ref_path) if os.path.exists(ref_path) else None
    gib = 2**30
    print(f"\n### {model_name}: {args.tokens}-token caption, {args.vqa_tokens}-token VQA answer, {args.threads} "
          f"threads, {cpus()}, best of {args.repeat} interleaved round(s) x {args.best_of} in each process; machine "
          "during the runs: "
          + "; ".join(dict.fromkeys(r["machine"] for rs in results.values() for r in rs if "machine" in r)))
    print(f"floors (same run): read bandwidth {bandwidth / 1e9:.1f} GB/s (median; best "
          f"{max(r['bandwidth_best'] for r in fl) / 1e9:.1f}), bf16 matmul {flops / 1e9:.0f} GFLOP/s; encode "
          f"{encode_gflop:.1f} GFLOP -> {enc_floor:.2f} s, {len(caption_ids)}-token prompt {prompt_gflop:.0f} "
          f"GFLOP -> {prompt_floor:.2f} s")
    print(f"| setting | load s | peak RSS while loading | first caption | {args.tokens}-token caption (CPU s / "
          f"threads) | VQA answer | encode | decode / token (CPU s / threads) | decode floor | x floor | caption floor "
          f"| peak RSS (VmHWM) | logits rel. err. vs blip2 bf16 | vision |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        r = best[name]
        if "error" in r:
            print(f"| {name} | {r['error']} |")
            continue
        floor = r["stream"] / bandwidth
        cap_floor = enc_floor + prompt_floor + (args.tokens - 1) * floor
        err = "-"
        path = os.path.join(args.cache, f"logits-{model_name}-{name}.pt")
        if ref is not None and os.path.exists(path):
            lg = torch.load(path)
            err = f"{((lg - ref).norm() / ref.norm()).item():.4f}"
        vision = {True: "int (blip2's kernels)", False: "bf16", None: "bf16"}[r["vision"]] if \
            RUNS[name][0] != "hf" else "bf16"
        cpu = (f" ({r['warm_cpu']:.2f} s)", f" ({r['decode_cpu']:.3f} s)") if "warm_cpu" in r else ("", "")
        print(f"| {name} | {r['load_s']:.1f} s | {r['load_hwm'] / gib:.2f} GiB | {r['first']:.2f} s | "
              f"{r['warm']:.2f} s{cpu[0]} | {r['vqa']:.2f} s | {r['encode']:.2f} s | {r['decode']:.3f} s{cpu[1]} | "
              f"{floor:.3f} s "
              f"({r['stream'] / 1e9:.2f} GB) | {r['decode'] / floor:.2f}x | {cap_floor:.2f} s | "
              f"{r['hwm'] / gib:.2f} GiB | {err} | {vision} |")
    a, b = best.get("blip2-int4", {}), best.get("blip2-int4-saved", {})
    if "ids" in a and "ids" in b:
        same = "yes" if a["ids"] == b["ids"] else "NO"
        print(f"\nthe saved int4 copy generates the same ids as the int4 model: {same}")
    features_report(model_name, args.cache)
    hf = best.get("hf-bf16")
    if hf and "error" not in hf:
        print("\ncaption speed-up over transformers bf16: " + ", ".join(
            f"{n} {hf['warm'] / best[n]['warm']:.2f}x" for n in names if "error" not in best[n]))


def features_report(model_name: str, cache: str) -> None:
    """The query features (what the language model reads of the image) of every run so far, for this checkpoint,
    whose vision tower was quantized, against those of every run whose vision tower stayed bf16."""
    import glob

    import torch

    runs = {os.path.basename(f)[len(f"features-{model_name}-"):-3]: torch.load(f)
            for f in sorted(glob.glob(os.path.join(cache, f"features-{model_name}-*.pt")))}
    for name, r in runs.items():
        if r["vision"]:
            for ref_name, ref in runs.items():
                if not ref["vision"]:
                    a, b = r["features"].flatten(), ref["features"].flatten()
                    print(f"\nquery features, {name} (vision tower quantized) vs {ref_name} (bf16): relative error "
                          f"{((a - b).norm() / b.norm()).item():.4f}, cosine "
                          f"{torch.nn.functional.cosine_similarity(a, b, 0).item():.4f}")


if __name__ == "__main__":
    sys.exit(main())
