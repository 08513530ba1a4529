"""A room of visitors: N requests one after another against the same N at once, through the captioner's batching
loop (blip2.scheduler), on the runner and on the live app (gradio_client).

    python -m bench.concurrency                  # real-size random blip2-opt-2.7b in int4, 2 threads, runner + app
    python -m bench.concurrency --only runner    # or app
    python -m bench.concurrency --tiny           # the embedded model: a quick look (not the targets' model)

The model: bench.realsize's random blip2-opt-2.7b checkpoint quantized to int4 (written by its writer and saved
once in its cache, ~/.cache/blip2-bench/realsize), beside a word-level tokenizer of the model's 50304 ids (random
weights pick any id; a word per id makes every token a streamed piece of text) and the processor's files, linked
into ~/.cache/blip2-bench/concurrency. Each request forces 20 new tokens (min = max). Scenarios: 4 captions of 4
distinct images (nothing cached), 8 chat questions on one image whose features are cached, and a lone caption
through the loop against the same decoding without it (`generate`, as before the loop). For each: the wall time
one after another and at once, the throughput ratio, p50 / p95 latency and time to the first streamed piece, and
whether the texts are identical. The load average, free memory and CPU flags are printed beside the figures.

Targets (one run, 2 cores): captions at once >= 1.25x, chat at once >= 2.5x, first piece p95 <= 3 s for the 8
concurrent chat requests, the lone caption within 5% of generate's, identical texts.
"""

import argparse
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from PIL import Image

import bench.machine
from bench import load_test, realsize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(os.path.dirname(realsize.CACHE), "concurrency")
QUESTIONS = ["what is in the picture?", "what colour is it?", "where is it?", "how many are there?",
             "is it big?", "what is on the left?", "what is it made of?", "who took it?"]
TARGETS = {"captions": 1.25, "chat": 2.5}


def machine() -> str:
    return f"{bench.machine.machine()}; torch {torch.get_num_threads()} threads"


def word_tokenizer(directory: str, size: int, image_id: int) -> None:
    """A word-level tokenizer with one word per model id (the questions' words first) and the processor files."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from bench.tiny_tokenizers import _write_processor_files

    words = sorted({w for q in QUESTIONS + ["Question: Answer:"] for w in q.replace("?", " ?").split()})
    vocab = {w: i for i, w in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + words)}
    vocab |= {f"w{i}": i for i in range(len(vocab), size) if i != image_id} | {"<image>": image_id}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "</s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "pad_token": "<pad>", "image_token": "<image>", "model_max_length": 2048},
                  f, indent=1)
    _write_processor_files(directory, size=224, num_query_tokens=32)


def real_size_checkpoint() -> str:
    """bench.realsize's random blip2-opt-2.7b, int4 (saved once), with a tokenizer and processor files."""
    saved = os.path.join(realsize.CACHE, "blip2-opt-2.7b-int4")
    if not os.path.isfile(os.path.join(saved, "config.json")):
        import blip2

        path = realsize.make_checkpoint(os.path.join(realsize.CACHE, "blip2-opt-2.7b-random"))
        model = blip2.Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16,
                                                                    quantization="int4_weight_only")
        model.save_pretrained(saved + ".tmp", max_shard_size="2GB")
        os.rename(saved + ".tmp", saved)
        del model
    out = os.path.join(CACHE, "blip2-opt-2.7b-int4")
    if not os.path.isfile(os.path.join(out, "tokenizer.json")):
        os.makedirs(CACHE, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=CACHE)
        for name in os.listdir(saved):
            os.symlink(os.path.join(saved, name), os.path.join(tmp, name))
        cfg = realsize.CONFIG
        word_tokenizer(tmp, cfg["text_config"]["vocab_size"], cfg["image_token_index"])
        os.rename(tmp, out)
    return out


def images(n: int, side: int = 224) -> list[Image.Image]:
    return [Image.fromarray(np.random.RandomState(i).randint(0, 256, (side, side, 3), dtype=np.uint8))
            for i in range(n)]


class Timed:
    """One request's figures: time to the first streamed piece and to the end, from `t0`, and its text."""

    def __init__(self, t0: float, pieces):
        self.first = None
        text = ""
        for piece in pieces:
            self.first = self.first or time.perf_counter() - t0
            text += piece
        self.done, self.text = time.perf_counter() - t0, text


def one_after_another(calls) -> tuple[float, list[Timed]]:
    t0, out = time.perf_counter(), []
    for call in calls:
        out.append(call(time.perf_counter()))
    return time.perf_counter() - t0, out


def at_once(calls) -> tuple[float, list[Timed]]:
    out, go = [None] * len(calls), threading.Barrier(len(calls) + 1)

    def worker(i):
        go.wait()
        out[i] = calls[i](t0)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    go.wait()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, out


def pct(values, q):
    return float(np.percentile(values, q))


def report(where: str, name: str, seq: tuple, conc: tuple, check: list | None = None) -> dict:
    """`check`: the texts of the requests run at once, one after another (when `seq` ran other requests)."""
    (t_seq, r_seq), (t_conc, r_conc) = seq, conc
    r_seq = r_seq if check is None else check
    n = len(r_seq)
    ratio = t_seq / t_conc
    same = [a.text for a in r_seq] == [b.text for b in r_conc]
    words = [(a.text.split(), b.text.split()) for a, b in zip(r_seq, r_conc)]
    agree = np.mean([sum(x == y for x, y in zip(a, b)) / max(len(a), len(b), 1) for a, b in words])
    lat, first = [r.done for r in r_conc], [r.first or r.done for r in r_conc]
    target = TARGETS.get(name)
    print(f"{where:6} {name:9} N={n}  one after another {t_seq:6.2f} s ({n / t_seq:.2f}/s)  at once {t_conc:6.2f} s "
          f"({n / t_conc:.2f}/s)  ratio {ratio:4.2f}x" + (f" (target >= {target}x)" if target else "")
          + f"  at once: latency p50 {pct(lat, 50):.2f} / p95 {pct(lat, 95):.2f} s, first piece p50 "
          f"{pct(first, 50):.2f} / p95 {pct(first, 95):.2f} s; one after another: first piece p95 "
          f"{pct([r.first or r.done for r in seq[1]], 95):.2f} s  identical texts: {same} (tokens in place: "
          f"{100 * agree:.0f}%)", flush=True)
    print(f"       {machine()}", flush=True)
    return dict(where=where, name=name, ratio=ratio, same=same, first_p95=pct(first, 95))


# ---- through the runner

def runner_part(path: str, tokens: int, dtype) -> list[dict]:
    import blip2
    from blip2.processing import Blip2Processor
    from blip2.runner import Blip2Runner

    model = blip2.Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype)
    processor = Blip2Processor.from_pretrained(path)
    forced = dict(max_new_tokens=tokens, min_new_tokens=tokens)
    out = []

    pictures = images(4)
    warm = Blip2Runner(model, processor)
    warm.caption(images(1, 64)[0], **forced)  # kernels built, memory touched
    results = []
    for phase in (one_after_another, at_once):
        runner = Blip2Runner(model, processor)  # nothing cached: each image is encoded
        results.append(phase([lambda t0, im=im: Timed(t0, runner.caption_stream(im, **forced)) for im in pictures]))
    out.append(report("runner", "captions", *results))

    photo, results = images(5)[4], []
    for phase in (one_after_another, at_once):
        runner = Blip2Runner(model, processor)
        first = runner.ask(photo, "what is it?", **forced).text  # the image's features cached, a first turn
        history = [("what is it?", first)]
        results.append(phase([lambda t0, q=q: Timed(t0, runner.ask_stream(photo, q, history, **forced))
                              for q in QUESTIONS]))
    out.append(report("runner", "chat", *results))

    runner = Blip2Runner(model, processor)
    embeds, _ = runner.image_embeds(photo)
    ids = runner.captioner.prompt_ids(runner.captioner.prompt([""], tokens))
    loop, alone = [], []

    def in_a_thread(fn):  # both off the main thread, as the app's requests run (OpenMP teams alike)
        out = []
        t = threading.Thread(target=lambda: out.append(fn()))
        t.start()
        t.join()
        return out[0]

    def generate():
        with torch.no_grad():
            return model.generate(image_embeds=embeds, input_ids=ids, **forced)

    for _ in range(3):  # interleaved, best of 3
        t = time.perf_counter()
        a = in_a_thread(lambda: runner.caption(photo, **forced).text)
        loop.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = in_a_thread(generate)
        alone.append(time.perf_counter() - t)
    same = a == processor.tokenizer.decode(b[0, ids.shape[1]:], skip_special_tokens=True).strip()
    print(f"runner lone caption through the loop {min(loop):.3f} s, generate without it {min(alone):.3f} s: "
          f"{min(loop) / min(alone):.3f}x (target <= 1.05x)  identical: {same}", flush=True)
    print(f"       {machine()}", flush=True)
    out.append(dict(where="runner", name="lone", ratio=min(alone) / min(loop), same=same))
    return out


# ---- through the live app

def app_part(path: str, tokens: int, work: str) -> list[dict]:
    from gradio_client import handle_file

    server = load_test.ServerProcess(load_test.free_port(), 64, os.path.join(work, "app.log"),
                                     args=["--model", path], env={"BLIP2_TIME_LIMIT_S": "600"})
    out = []
    try:
        server.wait_ready(time.monotonic() + 900)
        pictures = []
        for i, im in enumerate(images(6)):
            pictures.append(os.path.join(work, f"image{i}.png"))
            im.save(pictures[-1])
        forced = dict(max_new_tokens=tokens, min_new_tokens=tokens)

        def caption(client, picture):
            return lambda t0: Timed(t0, pieces(client.submit(image=handle_file(picture), **forced,
                                                             api_name="/caption")))

        def chat(client, picture, question):
            return lambda t0: Timed(t0, pieces(client.submit(image=handle_file(picture), question=question,
                                                             **forced, api_name="/chat")))

        clients = [load_test.make_client(server.url) for _ in range(len(QUESTIONS))]
        Timed(time.perf_counter(), pieces(clients[0].submit(image=handle_file(pictures[5]), **forced,
                                                            api_name="/caption")))  # the model loaded, warm
        # the app keeps image features: the images captioned at once are others (nothing cached), their texts
        # compared with theirs one after another afterwards (untimed)
        seq = one_after_another([caption(c, p) for c, p in zip(clients, pictures[:4])])
        conc = at_once([caption(c, p) for c, p in zip(clients, pictures[4:] + pictures[:2])])
        check = one_after_another([caption(c, p) for c, p in zip(clients, pictures[4:] + pictures[:2])])[1]
        out.append(report("app", "captions", seq, conc, check))
        seq = one_after_another([chat(c, pictures[5], q) for c, q in zip(clients, QUESTIONS)])
        fresh = [load_test.make_client(server.url) for _ in QUESTIONS]  # new sessions: no chat history yet
        out.append(report("app", "chat", seq, at_once([chat(c, pictures[5], q) for c, q in zip(fresh, QUESTIONS)])))
    finally:
        server.stop()
    return out


def pieces(job):
    """The growing caption / answer of a streaming gradio_client job, as pieces of new text."""
    seen = ""
    for output in job:
        text = output[0] if isinstance(output[0], str) else (output[0][-1]["content"] if output[0] else "")
        if not isinstance(text, str):  # a chat message's content: parts of text
            text = "".join(part.get("text", "") for part in text)
        text = text.split("\n")[0].removeprefix("1. ")
        if len(text) > len(seen):
            yield text[len(seen):]
            seen = text
    final = job.outputs()[-1] if job.outputs() else None
    if final is None:
        raise RuntimeError(f"the request failed: {job.status()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.concurrency", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("runner", "app"), help="one part only")
    ap.add_argument("--tiny", action="store_true", help="the embedded model instead of the real size")
    ap.add_argument("--tokens", type=int, default=20, help="new tokens per request (forced)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the app: BLIP2 picks all cores)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from blip2.catalogue import EMBEDDED_MODELS, GENERATION

    path = str(EMBEDDED_MODELS[GENERATION]) if args.tiny else real_size_checkpoint()
    print(f"model {path} ({'embedded' if args.tiny else 'real-size random blip2-opt-2.7b, int4'}); {args.tokens} "
          f"new tokens forced per request\n{machine()}", flush=True)
    results = []
    if args.only != "app":
        results += runner_part(path, args.tokens, torch.float32 if args.tiny else torch.bfloat16)
    if args.only != "runner":
        with tempfile.TemporaryDirectory() as work:
            results += app_part(path, args.tokens, work)
    ok = all(r["same"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
