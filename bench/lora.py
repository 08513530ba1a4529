"""LoRA fine-tuning of a blip2 model with PEFT, as the BLIP-2 fine-tuning tutorials do it: adapters on the Q-Former's
and the language model's attention projections, gradient checkpointing, AdamW on the adapters only; then the adapter
is saved, loaded back onto a fresh model and merged.

    python -m bench.lora                        # the embedded model, 30 steps of batch 8
    python -m bench.lora --steps 100 --batch 16 --model blip2/assets/blip2-tiny --out /tmp/blip2-lora

The task: the embedded model's scenes (blip2/train/world.py) captioned after a prompt it never saw ("Describe the
picture:"), with the answer in a new form ("it shows " + the caption), so the loss starts high. Prints the loss
before and after, steps/s, peak memory (resident set, VmHWM, and its growth over the loaded model), whether the
reloaded adapter and the merged weights give the same logits, with the load average, free memory and CPU flags.
"""

import argparse
import os
import tempfile
import time

import torch

import bench.machine
import blip2
from blip2.catalogue import EMBEDDED_MODELS, GENERATION

PROMPT, ANSWER = "Describe the picture:", " it shows "
EMBEDDED = str(EMBEDDED_MODELS[GENERATION])
# the Q-Former's self- and cross-attention query/value and OPT's q_proj/v_proj (T5: q and v)
TARGETS = r".*(qformer\.encoder\.layer\.\d+\.(attention|crossattention)\.attention\.(query|value)" \
          r"|language_model\..*\.(q_proj|v_proj|SelfAttention\.q|SelfAttention\.v))"


def lora_config(r: int = 8):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS, bias="none")


def batches(processor: blip2.Blip2Processor, n: int, batch: int, seed: int = 0) -> list[dict]:
    """Training batches of the task: pixel_values, input_ids, attention_mask, labels (-100 outside the answer)."""
    from blip2.train import data

    scenes, images = data.load_split("train", n, processor.image_processor.size["height"], seed)
    out = []
    for i in range(0, n - batch + 1, batch):
        texts = [PROMPT + ANSWER + s.caption() + "\n" for s in scenes[i:i + batch]]
        enc = processor(images=list(images[i:i + batch]), text=texts, padding=True, return_tensors="pt")
        prompt_len = len(processor(images=images[i], text=PROMPT)["input_ids"][0])
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        labels[:, :prompt_len] = -100  # image tokens, BOS and the prompt are not predicted
        out.append({**enc, "labels": labels})
    return out


def peak_rss() -> int:
    """This process's peak resident set (VmHWM), bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def machine() -> str:
    return f"{bench.machine.machine()}, torch threads {torch.get_num_threads()}"


def logits(model, b: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in b.items() if k != "labels"}).logits


def finetune(model_path: str, steps: int, batch: int, lr: float, out: str, r: int = 8) -> dict:
    """Train, save, reload, merge; returns the figures."""
    from peft import PeftModel, get_peft_model

    processor = blip2.Blip2Processor.from_pretrained(model_path)
    train = batches(processor, max(steps, 1) * batch, batch)
    torch.manual_seed(0)
    model = blip2.Blip2ForConditionalGeneration.from_pretrained(model_path)
    base_rss = peak_rss()
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(r))
    trainable = model.num_parameters(only_trainable=True) if hasattr(model, "num_parameters") else \
        sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    probe = train[0]
    model.eval()
    before = model(**probe).loss.item()
    model.train()
    start = time.perf_counter()
    for b in train[:steps]:
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    seconds = time.perf_counter() - start
    model.eval()
    after = model(**probe).loss.item()
    trained = logits(model, probe)
    model.save_pretrained(out)
    fresh = blip2.Blip2ForConditionalGeneration.from_pretrained(model_path)
    reloaded = PeftModel.from_pretrained(fresh, out).eval()
    reloaded_logits = logits(reloaded, probe)
    merged = reloaded.merge_and_unload()  # folds B @ A into the base weights, in place
    return {"loss_before": before, "loss_after": after, "steps": steps, "batch": batch,
            "steps_per_s": steps / seconds, "peak_rss": peak_rss(), "peak_over_model": peak_rss() - base_rss,
            "trainable": trainable, "total": sum(p.numel() for p in fresh.parameters()),
            "reloaded_max_diff": (reloaded_logits - trained).abs().max().item(),
            "merged_max_diff": (logits(merged, probe) - trained).abs().max().item(),
            "merged_type": type(merged).__name__, "adapter_files": sorted(os.listdir(out))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=EMBEDDED)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="adapter directory (default: a temporary one)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or tempfile.mkdtemp(prefix="blip2-lora-")
    print(machine(), flush=True)
    f = finetune(args.model, args.steps, args.batch, args.lr, out, args.rank)
    print(f"LoRA r={args.rank} on {args.model}: {f['trainable']:,} trainable of {f['total']:,} parameters "
          f"({100 * f['trainable'] / f['total']:.2f}%), gradient checkpointing on")
    print(f"loss {f['loss_before']:.3f} -> {f['loss_after']:.3f} after {f['steps']} steps of batch {f['batch']}")
    print(f"{f['steps_per_s']:.2f} steps/s; peak resident memory {f['peak_rss'] / 2**20:.0f} MiB "
          f"({f['peak_over_model'] / 2**20:.0f} MiB over the loaded model)")
    print(f"adapter saved to {out}: {', '.join(f['adapter_files'])}")
    print(f"logits against the trained model's: reloaded adapter max |diff| {f['reloaded_max_diff']:.2e}; merged "
          f"weights ({f['merged_type']}) {f['merged_max_diff']:.2e} (float32 round-off of W + B @ A)")
    print(machine())


if __name__ == "__main__":
    main()
