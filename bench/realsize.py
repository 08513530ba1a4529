"""The real size on a small CPU: blip2-opt-2.7b's exact architecture with random weights, bf16 / int8 / int4.

    python -m bench.realsize                      # every setting, 2 rounds (about 17 min on 2 cores)
    python -m bench.realsize --runs blip2-int4,hf-bf16 --repeat 1 --tokens 10   # a quick look
    python -m bench.realsize --cache DIR          # where the 7.5 GB checkpoint is written once
    python -m bench.realsize --kernels            # only the int8 / int4 kernels against bf16, per row count

The checkpoint: the Hub config.json of Salesforce/blip2-opt-2.7b (ViT-g/14 39 x 1408, Q-Former 12 x 768 with 32
queries, OPT-2.7b 32 x 2560, vocabulary 50304; 3.745 B parameters), random N(0, 0.02) weights (layer norms 1,
biases 0), bf16 safetensors shards in the Hugging Face layout, written once to the cache folder (default
~/.cache/blip2-bench/realsize, or $BLIP2_BENCH_CACHE) without ever holding the model: one shard at a time.
Loadable by blip2 and by transformers alike.

Each setting runs in a fresh process (its peak resident memory, VmHWM, is its own), one at a time, the settings
interleaved A B C A B C so that the neighbours' load hits them alike: load, first caption, warm caption (greedy,
`--tokens` new tokens, forced with min_new_tokens), encode (vision + Q-Former + projection), decode seconds per
token ((caption - a 1-token caption) / (tokens - 1)), the last prompt position's logits relative to blip2 bf16's.
"blip2-int4-saved" reloads the int4 model that the blip2-int4 run saved (load s, RSS); "blip2-int4-aten" runs int4
on PyTorch's kernel (BLIP2_KERNELS=aten) instead of blip2's. A floors process measures
in the same run the read bandwidth (sum of a 1 GiB float32 tensor) and the bf16 matmul throughput; the floors: encode
FLOPs / matmul rate, the 33-token prompt's FLOPs / matmul rate, a decoding step's weight bytes / bandwidth.
The CPUs are shared with other engineers: the load average (`uptime`) is printed beside the table.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("BLIP2_BENCH_CACHE") or os.path.expanduser("~/.cache/blip2-bench/realsize")
# Salesforce/blip2-opt-2.7b's config.json (Hub), stored in bf16
CONFIG = {
    "architectures": ["Blip2ForConditionalGeneration"], "image_text_hidden_size": 256, "image_token_index": 50265,
    "initializer_factor": 1.0, "initializer_range": 0.02, "model_type": "blip-2", "num_query_tokens": 32,
    "qformer_config": {"classifier_dropout": None, "model_type": "blip_2_qformer"},
    "text_config": {"_name_or_path": "facebook/opt-2.7b", "activation_dropout": 0.0,
                    "architectures": ["OPTForCausalLM"], "eos_token_id": 50118, "ffn_dim": 10240, "hidden_size": 2560,
                    "model_type": "opt", "num_attention_heads": 32, "num_hidden_layers": 32, "prefix": "</s>",
                    "torch_dtype": "float16", "vocab_size": 50304, "word_embed_proj_dim": 2560},
    "torch_dtype": "bfloat16", "use_decoder_only_language_model": True,
    "vision_config": {"dropout": 0.0, "initializer_factor": 1.0, "model_type": "blip_2_vision_model",
                      "num_channels": 3, "projection_dim": 512}}
RUNS = {  # name -> (library, quantization); "-aten": PyTorch's int4 kernel (blip2's switched off)
    "blip2-bf16": ("blip2", None), "blip2-int8": ("blip2", "int8_weight_only"),
    "blip2-int4": ("blip2", "int4_weight_only"), "blip2-int4-aten": ("blip2", "int4_weight_only"),
    "hf-bf16": ("hf", None), "hf-8bit": ("hf", "8bit"), "blip2-int4-saved": ("blip2-saved", None)}
PROMPT = 33  # 32 image tokens + BOS: a caption without a prompt
SHARD = 2 * 10**9


def make_checkpoint(path: str) -> str:
    """Write the random checkpoint once (into path.tmp, renamed when complete)."""
    if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        return path
    import torch
    from safetensors.torch import save_file
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    with torch.device("meta"):
        meta = Blip2ForConditionalGeneration(Blip2Config.from_dict(CONFIG))
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items() if k != "language_model.lm_head.weight"}  # tied
    tmp = path + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    groups, size = [[]], 0
    for key, shape in shapes.items():
        n = 2 * torch.Size(shape).numel()
        if groups[-1] and size + n > SHARD:
            groups, size = groups + [[]], 0
        groups[-1].append(key)
        size += n
    weight_map, total = {}, 0
    for i, keys in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for key in keys:
            t = torch.empty(shapes[key], dtype=torch.bfloat16)
            if key.endswith("bias"):
                t.zero_()
            elif "norm" in key.lower() and key.endswith("weight"):
                t.fill_(1.0)
            else:
                t.normal_(0, 0.02, generator=gen)
            tensors[key] = t
            weight_map[key] = name
            total += t.numel() * 2
        save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
        print(f"  wrote {name}", flush=True)
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=1)
    os.rename(tmp, path)
    return path


def status(field: str) -> int:
    """VmRSS / VmHWM of this process, bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def stream_bytes(lm) -> int:
    """Weight bytes a decoding step reads: every language-model parameter but the position table and (unless
    lm_head shares it) the token table, of which one row is gathered."""
    tied = lm.lm_head.weight is lm.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for n, p in lm.named_parameters()
               if "embed_positions" not in n and ("embed_tokens" not in n or tied))


def best_time(fn, repeat=2):
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def child(name: str, path: str, saved: str, tokens: int, threads: int, out: str) -> dict:
    """One setting in this (fresh) process."""
    import torch

    torch.set_num_threads(threads)
    lib, quant = RUNS[name]
    if name.endswith("-aten"):
        os.environ["BLIP2_KERNELS"] = "aten"
    if quant == "8bit":
        __import__("bitsandbytes")
    t = time.perf_counter()
    if lib == "hf":
        import transformers

        kw = {}
        if quant:
            kw = dict(quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True), device_map="cpu")
        model = transformers.Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, **kw).eval()
    else:
        import blip2

        source = saved if lib == "blip2-saved" else path
        model = blip2.Blip2ForConditionalGeneration.from_pretrained(source, dtype=torch.bfloat16, quantization=quant)
    load_s, load_rss = time.perf_counter() - t, status("VmRSS")
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)).bfloat16()
    ids = torch.tensor([[CONFIG["image_token_index"]] * (PROMPT - 1) + [2]])
    mask = torch.ones_like(ids)

    def caption(n):
        with torch.no_grad():
            return model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False)

    t = time.perf_counter()
    first_ids = caption(tokens)
    first = time.perf_counter() - t
    warm = best_time(lambda: caption(tokens))
    one = best_time(lambda: caption(1))
    with torch.no_grad():
        encode = best_time(lambda: model.get_image_features(pixels))
        logits = model(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits[0, -1].float()
    torch.save(logits, os.path.join(out, f"logits-{name}.pt"))
    if name == "blip2-int4" and saved_layout(saved) != model.config.extra["quantization_config"]["int4_layout"]:
        shutil.rmtree(saved, ignore_errors=True)  # none yet, or packed for the other kernel
        model.save_pretrained(saved + ".tmp", max_shard_size="2GB")
        os.rename(saved + ".tmp", saved)
    return dict(name=name, load_s=load_s, load_rss=load_rss, first=first, warm=warm, one=one, encode=encode,
                decode=(warm - one) / max(tokens - 1, 1), hwm=status("VmHWM"),
                stream=stream_bytes(model.language_model),
                ids=first_ids[0, PROMPT:].tolist())


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


def run(*args) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")
    p = subprocess.run([sys.executable, "-m", "bench.realsize", *args], env=env, capture_output=True, text=True,
                       cwd=ROOT)
    line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("{")), None)
    if p.returncode or line is None:
        return dict(error=(p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1])
    return json.loads(line)


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.realsize")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    ap.add_argument("--repeat", type=int, default=2, help="rounds over the settings (the best of each is shown)")
    ap.add_argument("--tokens", type=int, default=20, help="new tokens per caption")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=CACHE, help="where the checkpoint (and the saved int4 copy) live")
    ap.add_argument("--kernels", action="store_true", help="only time the packed kernels against bf16 per row count")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.kernels:
        kernels(args.threads)
        return 0
    path, saved = os.path.join(args.cache, "blip2-opt-2.7b-random"), os.path.join(args.cache, "blip2-opt-2.7b-int4")
    if args.child:
        result = floors(args.threads) if args.child == "floors" else \
            child(args.child, path, saved, args.tokens, args.threads, args.cache)
        print(json.dumps(result))
        return 0
    names = args.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        ap.error(f"unknown run(s) {', '.join(unknown)}: choose from {', '.join(RUNS)}")
    print(f"checkpoint: {make_checkpoint(path)}", flush=True)
    if "blip2-int4-saved" in names and not os.path.isdir(saved) and "blip2-int4" not in names:
        names.insert(0, "blip2-int4")  # it writes the saved copy
    common = ["--tokens", str(args.tokens), "--threads", str(args.threads), "--cache", args.cache]
    results, loads = {n: [] for n in names + ["floors"]}, []
    for i in range(args.repeat):
        for name in names + ["floors"]:
            r = run("--child", name, *common)
            loads.append(load_average())
            results[name].append(r)
            print(f"round {i + 1} {name}: " + (r["error"] if "error" in r else ", ".join(
                f"{k} {v:.3g}" for k, v in r.items() if isinstance(v, float))) + f"  (load avg {loads[-1]})",
                flush=True)
    report(results, names, args, loads)
    return 0


def report(results, names, args, loads):
    import torch

    from bench.flops import encode_flops, meta_model, prompt_flops
    from blip2 import Blip2Config

    model = meta_model(Blip2Config.from_dict(CONFIG))  # FLOPs counted on the meta device
    encode_gflop, prompt_gflop = encode_flops(model) / 1e9, prompt_flops(model, PROMPT) / 1e9

    fl = [r for r in results["floors"] if "error" not in r]
    bandwidth = statistics.median(r["bandwidth"] for r in fl)
    flops = max(r["flops"] for r in fl)
    enc_floor, prompt_floor = encode_gflop * 1e9 / flops, prompt_gflop * 1e9 / flops
    best = {}
    for name in names:
        ok = [r for r in results[name] if "error" not in r]
        if not ok:
            best[name] = results[name][0]
            continue
        best[name] = {k: (min(r[k] for r in ok) if k != "hwm" else max(r[k] for r in ok)) if isinstance(ok[0][k], float)
                      or k == "hwm" else ok[0][k] for k in ok[0]}
    ref_path = os.path.join(args.cache, "logits-blip2-bf16.pt")
    ref = torch.load(ref_path) if os.path.exists(ref_path) else None
    gib = 2**30
    print(f"\n{args.tokens}-token caption, {args.threads} threads, best of {args.repeat} interleaved rounds; "
          f"load average during the runs: {loads[0]} .. {loads[-1]} (1, 5, 15 min)")
    print(f"floors (same run): read bandwidth {bandwidth / 1e9:.1f} GB/s (median; best "
          f"{max(r['bandwidth_best'] for r in fl) / 1e9:.1f}), bf16 matmul {flops / 1e9:.0f} GFLOP/s; encode "
          f"{encode_gflop:.1f} GFLOP -> {enc_floor:.2f} s, {PROMPT}-token prompt {prompt_gflop:.0f} "
          f"GFLOP -> {prompt_floor:.2f} s")
    print(f"| setting | load s | first caption | {args.tokens}-token caption | encode | decode / token | "
          f"decode floor | x floor | caption floor | peak RSS (VmHWM) | logits rel. err. vs blip2 bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        r = best[name]
        if "error" in r:
            print(f"| {name} | error: {r['error']} |")
            continue
        floor = r["stream"] / bandwidth
        cap_floor = enc_floor + prompt_floor + (args.tokens - 1) * floor
        err = "-"
        path = os.path.join(args.cache, f"logits-{name}.pt")
        if ref is not None and os.path.exists(path):
            lg = torch.load(path)
            err = f"{((lg - ref).norm() / ref.norm()).item():.4f}"
        print(f"| {name} | {r['load_s']:.1f} s | {r['first']:.2f} s | {r['warm']:.2f} s | {r['encode']:.2f} s | "
              f"{r['decode']:.3f} s | {floor:.3f} s ({r['stream'] / 1e9:.2f} GB) | {r['decode'] / floor:.1f}x | "
              f"{cap_floor:.2f} s | {r['hwm'] / gib:.2f} GiB | {err} |")
    a, b = best.get("blip2-int4", {}), best.get("blip2-int4-saved", {})
    if "ids" in a and "ids" in b:
        same = "yes" if a["ids"] == b["ids"] else "NO"
        print(f"\nthe saved int4 copy generates the same ids as the int4 model: {same}")
    hf = best.get("hf-bf16")
    if hf and "error" not in hf:
        print("\ncaption speed-up over transformers bf16: " + ", ".join(
            f"{n} {hf['warm'] / best[n]['warm']:.2f}x" for n in names if "error" not in best[n]))


if __name__ == "__main__":
    sys.exit(main())
