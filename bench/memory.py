"""Load memory and time: blip2 against transformers on a mid-size random BLIP-2 (CPU).

    python -m bench.memory            # all runs; the checkpoint is written once to bench/out/blip2-mid
    python -m bench.memory --runs blip2-bf16,hf-bf16 --repeat 3   # cheapest of 3 loads per setting

The model: ViT-B/16-like vision (768 wide, 12 layers, 224 px), the full Q-Former (12 x 768, 32 queries) and an
OPT-125m-like LM (768 wide, 12 layers, ffn 3072, vocab 50272), random weights, fp32 safetensors in 5 shards.
Each run is a fresh subprocess, so its peak resident memory (ru_maxrss) is its own: peak during load minus
the interpreter after `import torch` and the library (and bitsandbytes for 8/4-bit), load time, then one
caption (10 new tokens).
Targets: peak during load <= 1.2 x the loaded weights' bytes; 8-bit LM layers <= 55% and 4-bit <= 35% of their
bf16 bytes; blip2's load time <= transformers' for the same setting, compared in CPU seconds (process_time, all
threads) since wall time on a shared machine mostly measures the neighbours; wall seconds are printed too.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from bench.machine import machine

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
CKPT = os.path.join(OUT, "blip2-mid")
RUNS = {  # name -> (library, dtype, quantization)
    "blip2-fp32": ("blip2", "float32", None), "hf-fp32": ("hf", "float32", None),
    "blip2-bf16": ("blip2", "bfloat16", None), "hf-bf16": ("hf", "bfloat16", None),
    "blip2-8bit": ("blip2", "bfloat16", "8bit"), "hf-8bit": ("hf", "bfloat16", "8bit"),
    "blip2-4bit": ("blip2", "bfloat16", "4bit"), "hf-4bit": ("hf", "bfloat16", "4bit"),
}
MID = dict(vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=16),
           qformer_config=dict(), text_config=dict(model_type="opt", eos_token_id=50118),  # OPT-125m defaults
           num_query_tokens=32, image_token_index=50265)


def make_checkpoint(path=CKPT, config=MID, shard="300MB"):
    """A random reference model saved by transformers (the layout the Hub checkpoints have)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(Blip2Config(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not ("norm" in name.lower() and name.endswith("weight")):
                p.normal_(0, 0.02)
    model.save_pretrained(path, max_shard_size=shard)
    return path


def maxrss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)


def child(name, path, threads):
    """One run, in its own process: prints a JSON line."""
    lib, dtype, quant = RUNS[name]
    import torch

    torch.set_num_threads(threads)
    base_torch = maxrss()
    if quant:  # its import (~120 MiB, torch.compile machinery) is not load memory: both libraries pay it
        __import__("bitsandbytes")
    if lib == "blip2":
        import blip2
        from blip2.memory import model_memory

        base = maxrss()
        t, c = time.perf_counter(), time.process_time()
        model = blip2.Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype, quantization=quant)
    else:
        import transformers

        base = maxrss()
        t, c = time.perf_counter(), time.process_time()
        kw = {}
        if quant:
            kw = dict(quantization_config=transformers.BitsAndBytesConfig(
                load_in_8bit=quant == "8bit", load_in_4bit=quant == "4bit", bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16), device_map="cpu")
        model = transformers.Blip2ForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype), **kw)
        from blip2.memory import model_memory
    load_s, load_cpu = time.perf_counter() - t, time.process_time() - c
    peak_load = maxrss() - base
    report = model_memory(model).as_dict()
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    with torch.no_grad():
        ids = model.generate(pixel_values=pixels, max_new_tokens=10, min_new_tokens=10)
    gen_s = time.perf_counter() - t
    parts = report["parts"]
    print(json.dumps(dict(
        name=name, load_s=load_s, load_cpu=load_cpu, peak_load=peak_load, peak_total=maxrss() - base,
        import_rss=base - base_torch,
        weights=report["total_bytes"], lm_layers=parts["language_model.layers"]["bytes"],
        lm=sum(v["bytes"] for k, v in parts.items() if k.startswith("language_model")),
        gen_s=gen_s, new_tokens=int(ids.shape[1]) - 33)))


def run(*args):
    """`python -m bench.memory ARGS` in a fresh interpreter (Linux keeps a process's peak RSS across exec, so the
    parent stays small: it never imports torch) -> its last JSON line."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1",
               TQDM_DISABLE="1")
    out = subprocess.run([sys.executable, "-m", "bench.memory", *args], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(OUT)))
    line = next((ln for ln in reversed(out.stdout.splitlines()) if ln.startswith("{")), None)
    if out.returncode or line is None:
        return dict(error=(out.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(line)


def best(names, path, repeat, threads):
    """Per run name: the run whose load took the least CPU time (process_time: the work done, which a shared
    machine's load hardly changes, unlike wall time) of `repeat` runs that go round all the settings in turn,
    and the highest peaks."""
    runs = {name: [] for name in names}
    for i in range(repeat):
        for name in names:
            r = run("--child", name, "--dir", path, "--threads", str(threads))
            runs[name].append(r)
            print(f"{name} #{i + 1}: " + (r["error"] if "error" in r else
                                          f"load {r['load_s']:.2f}s, {r['load_cpu']:.2f} CPU s"), flush=True)
    out = {}
    for name, rs in runs.items():
        if any("error" in r for r in rs):
            out[name] = dict(name=name, error=next(r["error"] for r in rs if "error" in r))
            continue
        r = min(rs, key=lambda r: r["load_cpu"])
        out[name] = dict(r, peak_load=max(x["peak_load"] for x in rs), peak_total=max(x["peak_total"] for x in rs))
    return out


def mb(n):
    return f"{n / 2**20:8.0f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--dir", default=CKPT)
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting: the cheapest load is reported")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (1: CPU time = the work, even "
                    "on a shared machine, where spinning OpenMP threads inflate it)")
    ap.add_argument("--child")
    ap.add_argument("--make", action="store_true")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.dir, args.threads)
    if args.make:
        return print(json.dumps({"path": make_checkpoint(args.dir)}))
    made = run("--make", "--dir", args.dir)
    if "error" in made:
        sys.exit(f"could not write the checkpoint: {made['error']}")
    path = made["path"]
    results = best(args.runs.split(","), path, args.repeat, args.threads)
    print(f"\ncheckpoint {path} (fp32 safetensors), torch threads {args.threads}, repeats {args.repeat}; {machine()}; "
          "MiB")
    print(f"{'run':<12}{'load s':>8}{'CPU s':>7}{'peak load':>10}{'weights':>9}{'peak/w':>8}{'LM layers':>10}{'LM':>9}"
          f"{'caption s':>10}{'+caption':>9}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<12} error: {r['error']}")
            continue
        print(f"{name:<12}{r['load_s']:>8.2f}{r['load_cpu']:>7.2f}{mb(r['peak_load']):>10}{mb(r['weights']):>9}"
              f"{r['peak_load'] / r['weights']:>8.2f}{mb(r['lm_layers']):>10}{mb(r['lm']):>9}{r['gen_s']:>10.2f}"
              f"{mb(r['peak_total']):>9}")
    print("\ntargets")
    ok = True
    for name, r in results.items():
        if name.startswith("blip2") and "error" not in r:
            good = r["peak_load"] <= 1.2 * r["weights"]
            ok &= good
            print(f"  {name}: peak during load {r['peak_load'] / r['weights']:.2f} x weights (<= 1.2): "
                  f"{'ok' if good else 'MISSED'}")
            ref = results.get(name.replace("blip2", "hf"))
            if ref and "error" not in ref:
                good = r["load_cpu"] <= ref["load_cpu"]
                ok &= good
                print(f"  {name}: load {r['load_cpu']:.2f} CPU s ({r['load_s']:.2f}s wall) vs transformers "
                      f"{ref['load_cpu']:.2f} CPU s ({ref['load_s']:.2f}s wall): {'ok' if good else 'MISSED'}")
    bf16 = results.get("blip2-bf16")
    for name, limit in (("blip2-8bit", 0.55), ("blip2-4bit", 0.35)):
        r = results.get(name)
        if bf16 and r and "error" not in r and "error" not in bf16:
            ratio = r["lm_layers"] / bf16["lm_layers"]
            good = ratio <= limit
            ok &= good
            print(f"  {name}: LM layers {ratio:.1%} of bf16 (<= {limit:.0%}): {'ok' if good else 'MISSED'}; "
                  f"whole LM incl. unquantized embeddings {r['lm'] / bf16['lm']:.1%}")
    print("all targets met" if ok else "some targets MISSED")


if __name__ == "__main__":
    main()
