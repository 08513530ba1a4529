"""GPU check at full size: blip2-opt-2.7b's architecture with random weights, blip2 next to transformers.

    python -m bench.gpu_check                 # on a CUDA machine: fp16, 8-bit, 4-bit for both libraries
    python -m bench.gpu_check --tiny          # the same script end to end on a tiny model (CPU when no GPU)

The checkpoint (config of Salesforce/blip2-opt-2.7b, reference.md section 1.2: ViT-g 39 x 1408, Q-Former 12 x 768
with 32 queries, OPT-2.7b 32 x 2560, vocab 50304) is written once to bench/out/ as fp16 safetensors shards,
straight from blip2's meta-device model (no 15 GB fp32 model is ever built). Each run is a fresh subprocess:
load time, GPU memory after loading (torch.cuda.max_memory_allocated), peak during generation, new tokens per
second for one image (greedy, a fixed number of new tokens), and blip2's memory_report estimate made before loading.
"""

import argparse
import json
import os
import subprocess
import sys
import time

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
FULL = {  # Salesforce/blip2-opt-2.7b config.json (sparse: everything else is the defaults)
    "architectures": ["Blip2ForConditionalGeneration"], "model_type": "blip-2", "num_query_tokens": 32,
    "image_token_index": 50265, "qformer_config": {"model_type": "blip_2_qformer"},
    "vision_config": {"model_type": "blip_2_vision_model"},
    "text_config": {"model_type": "opt", "eos_token_id": 50118, "ffn_dim": 10240, "hidden_size": 2560,
                    "num_attention_heads": 32, "num_hidden_layers": 32, "vocab_size": 50304,
                    "word_embed_proj_dim": 2560}}
TINY = {
    "architectures": ["Blip2ForConditionalGeneration"], "model_type": "blip-2", "num_query_tokens": 4,
    "image_token_index": 98,
    "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "image_size": 32, "patch_size": 8},
    "qformer_config": {"vocab_size": 99, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "intermediate_size": 128},
    "text_config": {"model_type": "opt", "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "ffn_dim": 256, "eos_token_id": 50, "word_embed_proj_dim": 64}}
SETTINGS = {"fp16": None, "8bit": "8bit", "4bit": "4bit"}


def make_checkpoint(path, config, shard_bytes=2 * 2**30, seed=0):
    """Random fp16 weights in the Hugging Face layout, written tensor by tensor from the meta model's shapes."""
    if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        return path
    import torch
    from safetensors.torch import save_file

    from blip2 import Blip2Config, Blip2ForConditionalGeneration
    from blip2.io.load import empty_init

    cfg = Blip2Config.from_dict(config)
    with empty_init():
        model = Blip2ForConditionalGeneration(cfg)
    os.makedirs(path, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device).manual_seed(seed)
    shards, current, size = [], {}, 0
    for name, p in model.named_parameters():  # tied lm_head appears once (as embed_tokens), as the Hub stores it
        if "norm" in name.lower() and name.endswith("weight"):
            t = torch.ones(p.shape, dtype=torch.float16)
        else:
            t = (torch.randn(p.shape, generator=g, device=device) * 0.02).half().cpu()
        current[name] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            shards, current, size = shards + [current], {}, 0
    shards += [current] if current else []
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config, "dtype": "float16"}, f)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 2, "eos_token_id": cfg.text_config.eos_token_id, "pad_token_id": 1}, f)
    return path


def child(lib, setting, path, new_tokens, image_size):
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda:0" if cuda else "cpu"
    quant = SETTINGS[setting]

    def gpu_bytes():
        return torch.cuda.max_memory_allocated() if cuda else 0

    estimate = None
    if lib == "blip2":
        import blip2
        from blip2.memory import memory_report

        estimate = memory_report(path, dtype="float16", quantization=quant, device=device).total
        t = time.perf_counter()
        model = blip2.Blip2ForConditionalGeneration.from_pretrained(path, dtype="float16", device=device,
                                                                    quantization=quant)
    else:
        import transformers

        kw = {}
        if quant:
            kw["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_8bit=quant == "8bit", load_in_4bit=quant == "4bit", bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float16)
        t = time.perf_counter()
        model = transformers.Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.float16,
                                                                           device_map=device, **kw)
    if cuda:
        torch.cuda.synchronize()
    load_s, after_load = time.perf_counter() - t, gpu_bytes()
    pixels = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    pixels = pixels.to(device, torch.float16 if cuda else torch.float32)
    with torch.no_grad():
        model.generate(pixel_values=pixels, max_new_tokens=2, min_new_tokens=2)  # warm-up
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        ids = model.generate(pixel_values=pixels, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        if cuda:
            torch.cuda.synchronize()
    gen_s = time.perf_counter() - t
    from blip2.memory import model_memory

    print(json.dumps(dict(lib=lib, setting=setting, load_s=load_s, after_load=after_load, peak=gpu_bytes(),
                          weights=model_memory(model).total, estimate=estimate, tokens=int(ids.shape[1]),
                          tok_s=new_tokens / gen_s, device=torch.cuda.get_device_name() if cuda else "cpu")))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="a tiny model: the script end to end, CPU if no GPU")
    ap.add_argument("--dir")
    ap.add_argument("--settings", default="fp16,8bit,4bit")
    ap.add_argument("--libs", default="blip2,hf")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    config = TINY if args.tiny else FULL
    image_size = config["vision_config"].get("image_size", 224)
    path = args.dir or os.path.join(OUT, "blip2-tiny-random" if args.tiny else "blip2-opt-2.7b-random")
    if args.child:
        return child(*args.child, path, args.new_tokens, image_size)
    t = time.perf_counter()
    make_checkpoint(path, config)
    print(f"checkpoint {path} ready in {time.perf_counter() - t:.0f}s", flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    rows = []
    for setting in args.settings.split(","):
        for lib in args.libs.split(","):
            out = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--child", lib, setting, "--dir", path,
                                  "--new-tokens", str(args.new_tokens)] + (["--tiny"] if args.tiny else []),
                                 env=env, capture_output=True, text=True,
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            line = next((ln for ln in reversed(out.stdout.splitlines()) if ln.startswith("{")), None)
            if out.returncode or not line:
                rows.append(dict(lib=lib, setting=setting, error=(out.stderr.strip().splitlines() or ["?"])[-1]))
            else:
                rows.append(json.loads(line))
            print(rows[-1], flush=True)
    gib = 2**30
    print(f"\n{'setting':<8}{'lib':<7}{'load s':>8}{'GPU GiB load':>13}{'peak GiB':>10}{'weights GiB':>12}"
          f"{'estimate':>10}{'tok/s':>8}  device")
    for r in rows:
        if "error" in r:
            print(f"{r['setting']:<8}{r['lib']:<7} error: {r['error']}")
            continue
        est = f"{r['estimate'] / gib:>10.2f}" if r["estimate"] else f"{'':>10}"
        print(f"{r['setting']:<8}{r['lib']:<7}{r['load_s']:>8.1f}{r['after_load'] / gib:>13.2f}{r['peak'] / gib:>10.2f}"
              f"{r['weights'] / gib:>12.2f}{est}{r['tok_s']:>8.1f}  {r['device']}")


if __name__ == "__main__":
    main()
