"""Speed: blip2 against transformers on mid-size random BLIP-2 models, the same work side by side on this CPU.

    python -m bench.speed                # checkpoints written once to bench/out/speed/, then best of 5 runs each
    python -m bench.speed --repeat 3 --threads 2
    python -m bench.speed --repeat 1 --profile  # and where blip2's caption spends its time (torch.profiler)

The models: ViT-B/16-like vision (768 wide, 12 layers, 224 px), the full Q-Former (12 x 768, 32 queries), an
OPT-125m-like LM (768 wide, 12 layers, ffn 3072, vocab 50272) and a matching retrieval model; random weights, the
embedding rows past the (small, genuine) tokenizer's vocabulary zeroed so that generated text decodes. Tasks:
load, caption (greedy, 20 new tokens), beam search (5 beams, 20 new tokens), a 3-turn chat on one image
(transformers: a fresh generate per turn with the whole history as prompt, as its user would write it; blip2: the
runner with its caches), and one image matched against 64 texts (ITM; transformers repeats the image 64 times).
Prints the best times, ratios (transformers / blip2), peak memory per call, whether the outputs are identical, and
the caption's floor on this machine: LM weight bytes per new token / measured memory bandwidth + encoder and
prompt FLOPs / measured matmul throughput.
"""

import argparse
import json
import os
import sys
import threading
import time

import torch

from bench.machine import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "out", "speed")
VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
              patch_size=16)
QFORMER = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
               cross_attention_frequency=2, encoder_hidden_size=768)
OPT = dict(model_type="opt", vocab_size=50272, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
           ffn_dim=3072, max_position_embeddings=2048, word_embed_proj_dim=768, bos_token_id=2, eos_token_id=50118,
           pad_token_id=1)
QUESTIONS = ["what is in the picture?", "what colour is it?", "where was the photo taken?"]
TARGETS = {"load": 1.0, "caption": 1.5, "beam search 5": 2.0, "3-turn chat": 3.0, "match 1x64": 10.0}


def make_checkpoints():
    """The captioning and the retrieval checkpoint, each with tokenizer and processor files (transformers')."""
    lm, itm = os.path.join(OUT, "lm"), os.path.join(OUT, "itm")
    if os.path.isfile(os.path.join(lm, "config.json")) and os.path.isfile(os.path.join(itm, "config.json")):
        return lm, itm
    import transformers

    from bench.tiny_tokenizers import bert_tokenizer_dir, opt_tokenizer_dir

    torch.manual_seed(0)
    for path, tokenizer in ((lm, opt_tokenizer_dir), (itm, bert_tokenizer_dir)):
        tokenizer(path)
        with open(os.path.join(path, "processor_config.json"), "w") as f:
            json.dump({"num_query_tokens": 32, "processor_class": "Blip2Processor"}, f)
        with open(os.path.join(path, "preprocessor_config.json")) as f:
            pre = json.load(f)
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump(pre | {"size": {"height": 224, "width": 224}}, f)
    proc = transformers.Blip2Processor.from_pretrained(lm)
    vocab = len(proc.tokenizer)
    cfg = transformers.Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=OPT, num_query_tokens=32,
                                   image_token_index=proc.tokenizer.convert_tokens_to_ids(str(proc.image_token)))
    itm_cfg = transformers.Blip2Config(vision_config=VISION, qformer_config=QFORMER | dict(use_qformer_text_input=True),
                                       num_query_tokens=32, image_text_hidden_size=256)
    for path, model in ((lm, transformers.Blip2ForConditionalGeneration(cfg)),
                        (itm, transformers.Blip2ForImageTextRetrieval(itm_cfg))):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not ("norm" in name.lower() and name.endswith("weight")):
                    p.normal_(0, 0.02)
            if hasattr(model, "language_model"):
                model.language_model.get_input_embeddings().weight[vocab:] = 0  # generate decodable tokens only
        model.eval().save_pretrained(path)
    return lm, itm


class PeakMemory:
    """Peak resident memory above the start of the block, sampled every millisecond from /proc."""

    def __enter__(self):
        self.base = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())
        self.extra = self.peak - self.base


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fns, repeat):
    """Run each of `fns` once to warm up, then `repeat` times interleaved (so that load from other processes hits
    them alike) -> per fn (best seconds, peak extra memory of its first timed run, its result)."""
    results = [fn() for fn in fns]
    times, peaks = [[] for _ in fns], [0] * len(fns)
    for r in range(repeat):
        for i, fn in enumerate(fns):
            with PeakMemory() as mem:
                t = time.perf_counter()
                results[i] = fn()
                times[i].append(time.perf_counter() - t)
            peaks[i] = mem.extra if r == 0 else peaks[i]
    return [(min(t), p, res) for t, p, res in zip(times, peaks, results)]


def floor_seconds(model, new_tokens, prompt_len):
    """The caption's lower bound on this machine: every LM weight read once per new token at the measured
    bandwidth, plus the image encoding and prompt FLOPs (counted by FlopCounterMode) at the measured matmul
    throughput."""
    from bench.flops import encode_flops, meta_model, prompt_flops

    x = torch.empty(64 * 2**20, dtype=torch.float32).normal_()  # 256 MiB, far beyond the caches
    bandwidth = max(x.numel() * 4 / min(_time(lambda: x.sum()) for _ in range(5)), 1.0)
    a, b = torch.randn(256, 768), torch.randn(768, 3072)
    flops = 2 * 256 * 768 * 3072 / min(_time(lambda: a @ b) for _ in range(20))
    lm = model.language_model
    weights = sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if "embed_positions" not in n)
    meta = meta_model(model.config)
    compute = encode_flops(meta) + prompt_flops(meta, prompt_len)
    return weights * new_tokens / bandwidth + compute / flops, bandwidth, flops, weights, compute


def same_weights(a, b) -> bool:
    """Two loads of one checkpoint hold the same tensors under the same names."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _time(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per task (the best is reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--profile", action="store_true", help="then profile blip2's caption: where its time goes")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import numpy as np
    import transformers
    from PIL import Image

    import blip2
    from blip2.processing import Blip2Processor
    from blip2.prompts import chat_prompt
    from blip2.runner import Blip2Runner

    transformers.logging.set_verbosity_error()
    lm_path, itm_path = make_checkpoints()
    rows, checks = [], []

    def compare(name, ref_fn, our_fn, same):
        (t_ref, m_ref, a), (t_our, m_our, b) = timed([ref_fn, our_fn], args.repeat)
        rows.append((name, t_ref, t_our, m_ref, m_our))
        checks.append((name, same(a, b)))
        return b

    compare("load", lambda: transformers.Blip2ForConditionalGeneration.from_pretrained(lm_path).eval(),
            lambda: blip2.Blip2ForConditionalGeneration.from_pretrained(lm_path), same_weights)
    ref = transformers.Blip2ForConditionalGeneration.from_pretrained(lm_path).eval()
    ours = blip2.Blip2ForConditionalGeneration.from_pretrained(lm_path)
    hf_proc, proc = transformers.Blip2Processor.from_pretrained(lm_path), Blip2Processor.from_pretrained(lm_path)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (256, 320, 3), dtype=np.uint8))
    px = hf_proc(images=image, return_tensors="pt")["pixel_values"]

    with torch.inference_mode():
        for name, kw in (("caption", dict(max_new_tokens=20)), ("beam search 5", dict(max_new_tokens=20, num_beams=5))):
            out = compare(name, lambda: ref.generate(pixel_values=px, **kw),
                          lambda: ours.generate(pixel_values=px, **kw), torch.equal)
            if name == "caption":
                new_tokens, prompt_len = out.shape[1] - 33, 33

        def chat_ref():
            history = []
            for q in QUESTIONS:
                enc = hf_proc(images=image, text=chat_prompt(q, history), return_tensors="pt")
                ids = ref.generate(**enc, max_new_tokens=10)
                history.append((q, hf_proc.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)[0]
                                .strip()))
            return history

        def chat_ours():
            runner, history = Blip2Runner(ours, proc), []
            for q in QUESTIONS:
                history.append((q, runner.ask(image, q, history, max_new_tokens=10).text))
            return history

        compare("3-turn chat", chat_ref, chat_ours, lambda a, b: a == b)

        itm_ref = transformers.Blip2ForImageTextRetrieval.from_pretrained(itm_path).eval()
        itm = blip2.Blip2ForImageTextRetrieval.from_pretrained(itm_path)
        itm_proc = Blip2Processor.from_pretrained(itm_path)
        texts = [f"a photo of {i} cats sitting on a red sofa next to a coffee cup" for i in range(64)]
        enc = itm_proc.tokenizer(texts, padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]

        def match_ref():
            out = itm_ref(pixel_values=px.expand(len(texts), -1, -1, -1), input_ids=ids, attention_mask=mask,
                          use_image_text_matching_head=True)
            return out.logits_per_image.softmax(-1)[:, 1]

        def match_ours():  # what Blip2Runner.match computes: the image once, broadcast against every text
            return itm.itm_logits(itm.vision_model(px).last_hidden_state, ids, mask)[0].softmax(-1)[:, 1]

        compare("match 1x64", match_ref, match_ours, lambda a, b: torch.allclose(a, b, atol=1e-5))
        floor, bandwidth, flops, weights, compute = floor_seconds(ours, new_tokens, prompt_len)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                ours.generate(pixel_values=px, max_new_tokens=20)
            print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20))

    print(f"\nblip2 vs transformers {transformers.__version__}, torch {torch.__version__}, {args.threads} threads, "
          f"best of {args.repeat} interleaved runs (peak = extra resident memory of a call); {machine()}")
    print(f"{'task':<15}{'transformers':>14}{'blip2':>10}{'ratio':>8}{'target':>8}{'peak MiB hf/ours':>20}"
          "  same output")
    same = dict(checks)
    for name, t_ref, t_our, m_ref, m_our in rows:
        print(f"{name:<15}{t_ref:>13.3f}s{t_our:>9.3f}s{t_ref / t_our:>7.2f}x{TARGETS[name]:>7.1f}x"
              f"{m_ref / 2**20:>10.0f} /{m_our / 2**20:>6.0f}  {'yes' if same[name] else 'NO'}")
    caption = next(r[2] for r in rows if r[0] == "caption")
    print(f"\ncaption floor: {new_tokens} tokens x {weights / 2**20:.0f} MiB LM weights / {bandwidth / 2**30:.1f} GiB/s"
          f" + {compute / 1e9:.1f} GFLOP / {flops / 1e9:.0f} GFLOP/s = {floor:.3f}s; blip2 = {caption / floor:.2f}x "
          "the floor (target <= 1.3x)")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
