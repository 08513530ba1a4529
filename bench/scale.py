"""Collections at scale on this machine: caption and index throughput, one by one vs batched vs Ray, and search
latency over large indexes.

    python -m bench.scale                      # everything (a few minutes on 2 cores)
    python -m bench.scale --skip mid ray       # parts: embedded, mid, ray, search
    python -m bench.scale --images 256 --sizes 10000

Throughput (images/s, wall time of the whole job, files read from disk):
* one by one: Blip2Runner.caption / itc_images per image (what a loop over the CLI's path does);
* batched: bulk.caption_job / index.index_job (one vision pass and one generation per batch of 16), Parquet out;
* Ray: the same jobs with --ray on a local Ray of 2 CPUs (2 actors, one model and one thread each); Ray's start
  is timed apart, the actors' model loading is inside the job.
Models: the embedded tiny ones (96 px scenes) and the mid-size random ones of bench.speed (ViT-B/16-like vision,
12-layer Q-Former, OPT-125m-like LM; 224 px), greedy captions of at most 20 new tokens.

Search: synthetic indexes of N images x 32 query vectors x 256 (BLIP-2's ITC size), calibrated to the embedded
model's statistics over its world: mean cosine 0.78 between two queries of one image, and a text's best-query
scores over all images correlate with its pooled-embedding scores (0.96 measured on the embedded model, ~0.98 here:
images come in topics of ~100, a text is drawn near one image). On unstructured data (random images) the exact
ranking past the first hit is noise that no approximate index recalls. Exact search (ImageIndex.search) p50 / p95 over
random queries with the floor it cannot beat: reading N * 32 * 256 float32 once at the memory bandwidth measured
here. Approximate (ImageIndex.search_approx: IVF over pooled embeddings, candidates re-scored exactly): p50 / p95
and recall@10 against exact.
"""

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "out", "scale")
sys.path.insert(0, ROOT)

from blip2.bulk import caption_job, find_images, load_runner  # noqa: E402
from blip2.catalogue import EMBEDDED_MODELS, GENERATION, RETRIEVAL  # noqa: E402
from blip2.distributed import RaySettings  # noqa: E402
from blip2.index import ImageIndex, index_job, recall  # noqa: E402

EMBEDDED = (str(EMBEDDED_MODELS[GENERATION]), str(EMBEDDED_MODELS[RETRIEVAL]))


def scenes(n: int) -> str:
    """A folder of n world scenes (96 px PNG), written once."""
    from blip2.train import world

    folder = os.path.join(OUT, f"scenes-{n}")
    if not os.path.isdir(folder) or len(os.listdir(folder)) != n:
        os.makedirs(folder, exist_ok=True)
        for i, s in enumerate(world.make_split("test", n, seed=99)):
            s.render(96).save(os.path.join(folder, f"s{i:05d}.png"))
    return folder


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def throughput(label, gen, itm, folder, ray: bool, batch_size: int) -> list[dict]:
    """images/s of caption and index, one by one, batched and (with `ray`) on Ray; checks that they agree."""
    import pyarrow.parquet as pq

    paths = find_images([folder])
    n, work = len(paths), os.path.join(OUT, "work")
    shutil.rmtree(work, ignore_errors=True)
    results = []

    def report(task, mode, seconds, same=None, summary=None):
        row = {"model": label, "task": task, "mode": mode, "images": n, "seconds": round(seconds, 2),
               "images_per_s": round(n / seconds, 2)}
        if same is not None:
            row["same_as_one_by_one" if mode == "batched" else "same_parquet_as_local"] = same
        after = ""
        if summary is not None:  # after the first batch: without the start-up (model loading, Ray's actors)
            rows, first = summary.first_batch
            row["after_first_batch_images_per_s"] = round((n - rows) / max(summary.seconds - first, 1e-9), 2)
            after = f", {row['after_first_batch_images_per_s']:.1f} images/s after the first batch ({first:.1f} s)"
        results.append(row)
        print(f"  {label:9} {task:8} {mode:11} {n / seconds:8.1f} images/s  ({n} in {seconds:.1f} s{after})"
              + ("" if same is None else f"  identical: {same}"), flush=True)

    one = load_runner(gen, itm)
    captions, seconds = timed(lambda: [one.caption(p).text for p in paths])
    report("caption", "one-by-one", seconds)
    batched = load_runner(gen, itm)
    summary, seconds = timed(lambda: caption_job(batched, [folder], f"{work}/local.parquet", batch_size,
                                                 progress=False))
    local = pq.read_table(f"{work}/local.parquet")
    report("caption", "batched", seconds, local["caption"].to_pylist() == captions, summary)
    _, seconds = timed(lambda: [one.itc_images([p]) for p in paths])
    report("index", "one-by-one", seconds)
    summary, seconds = timed(lambda: index_job(batched, [folder], f"{work}/local.index", itm, batch_size,
                                               progress=False))
    report("index", "batched", seconds, summary=summary)
    if ray:
        settings = RaySettings(concurrency=2, cpus_per_actor=1, model=gen, itm_model=itm)
        summary, seconds = timed(lambda: caption_job(None, [folder], f"{work}/ray.parquet", batch_size,
                                                     progress=False, ray=settings))
        report("caption", "ray 2x1", seconds, pq.read_table(f"{work}/ray.parquet").equals(local), summary)
        summary, seconds = timed(lambda: index_job(None, [folder], f"{work}/ray.index", itm, batch_size,
                                                   progress=False, ray=settings))
        same = pq.read_table(f"{work}/ray.index/images.parquet").drop_columns(["mtime_ns"]).equals(
            pq.read_table(f"{work}/local.index/images.parquet").drop_columns(["mtime_ns"]))
        report("index", "ray 2x1", seconds, same, summary)
    shutil.rmtree(work, ignore_errors=True)
    return results


def synthetic(n: int, q=32, e=256, seed=0, chunk=5000):
    """A flat faiss index of n synthetic images (see the module doc), built in chunks; and a function that makes
    a query text near image i."""
    import faiss

    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((max(1, n // 100), e), dtype=np.float32)  # 100 images a topic on average
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    spread = np.sqrt(1 / 0.78 - 1)  # queries = base + spread * noise: cos(query, query') = 1 / (1 + spread^2)
    flat, bases = faiss.IndexFlatIP(e), np.empty((n, e), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        b = topics[rng.integers(0, len(topics), m)] + rng.standard_normal((m, e), dtype=np.float32) / np.sqrt(e)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        bases[start:start + m] = b
        x = b[:, None] + spread * rng.standard_normal((m, q, e), dtype=np.float32) / np.sqrt(e)
        x /= np.linalg.norm(x, axis=2, keepdims=True)
        flat.add(x.reshape(m * q, e))

    def text(i):
        t = bases[i] + 0.6 * rng.standard_normal(e, dtype=np.float32) / np.sqrt(e)
        return t / np.linalg.norm(t)

    return ImageIndex(flat, q, [f"synthetic/{i}" for i in range(n)]), text


def bandwidth() -> float:
    """Bytes/s of one read over 1 GiB (a torch sum on every core, as the search's BLAS product runs): best of 3."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # the local jobs' --threads does not bound numpy's BLAS
    try:
        x = torch.ones(2**28)
        best = min(timed(lambda: x.sum())[1] for _ in range(3))
    finally:
        torch.set_num_threads(threads)
    return x.numel() * 4 / best


def search_one(n: int, queries: int, candidates: int, nprobe: int, bw: float) -> dict:
    index, text = synthetic(n)
    rng = np.random.default_rng(1)
    texts = [text(i) for i in rng.integers(0, n, queries)]
    exact = [timed(lambda t=t: index.search(t, 10)) for t in texts]
    _, build = timed(index.build_approx)
    approx = [timed(lambda t=t: index.search_approx(t, 10, candidates, nprobe)) for t in texts]
    ms, ams = (np.array([s for _, s in runs]) * 1000 for runs in (exact, approx))
    row = {"images": n, "exact_p50_ms": round(float(np.percentile(ms, 50)), 1),
           "exact_p95_ms": round(float(np.percentile(ms, 95)), 1), "floor_ms": round(n * 32 * 256 * 4 / bw * 1000, 1),
           "approx_p50_ms": round(float(np.percentile(ams, 50)), 2),
           "approx_p95_ms": round(float(np.percentile(ams, 95)), 2),
           "approx_recall_at_10": round(float(np.mean([recall(a[0], e[0])
                                                       for (a, _), (e, _) in zip(approx, exact)])), 4),
           "approx_build_s": round(build, 1), "nlist": index.approx.nlist, "nprobe": nprobe, "candidates": candidates,
           "queries": queries}
    print(f"  {n:>7} images: exact p50 {row['exact_p50_ms']} ms p95 {row['exact_p95_ms']} ms (floor {row['floor_ms']} "
          f"ms); approximate p50 {row['approx_p50_ms']} ms p95 {row['approx_p95_ms']} ms, recall@10 "
          f"{row['approx_recall_at_10']} (IVF {row['nlist']} lists, nprobe {nprobe}, {candidates} candidates, built in "
          f"{row['approx_build_s']} s)", flush=True)
    return row


def search(sizes, queries: int, candidates: int, nprobe: int) -> list[dict]:
    bw = bandwidth()
    print(f"  memory read bandwidth {bw / 1e9:.1f} GB/s", flush=True)
    return [search_one(n, queries, candidates, nprobe, bw) for n in sizes]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2048, help="scenes for the embedded model (default 2048)")
    p.add_argument("--mid-images", type=int, default=32, help="scenes for the mid-size model (default 32)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the local runs (default 1, as each "
                   "Ray actor; the tiny models run fastest on one)")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="search index sizes")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--skip", nargs="*", default=[], choices=["embedded", "mid", "ray", "search"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(OUT, exist_ok=True)
    load = os.getloadavg()
    print(f"python -m bench.scale {' '.join(sys.argv[1:] if argv is None else argv)}  (threads {args.threads}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})", flush=True)
    report = {"threads": args.threads, "load_average_start": load}
    ray = "ray" not in args.skip
    if ray and not {"embedded", "mid"} <= set(args.skip):
        import ray as ray_module

        _, seconds = timed(lambda: ray_module.init(num_cpus=2, include_dashboard=False, log_to_driver=False))
        print(f"  local Ray started in {seconds:.1f} s", flush=True)
        report["ray_start_s"] = round(seconds, 1)
    rows = []
    if "embedded" not in args.skip:
        rows += throughput("embedded", *EMBEDDED, scenes(args.images), ray, args.batch_size)
    if "mid" not in args.skip:
        from bench.speed import make_checkpoints

        lm, itm = make_checkpoints()
        rows += throughput("mid-size", lm, itm, scenes(args.mid_images), ray, args.batch_size)
    report["throughput"] = rows
    if "search" not in args.skip:
        report["search"] = search(args.sizes, args.queries, args.candidates, args.nprobe)
    report["load_average_end"] = os.getloadavg()
    print(f"  load average at the end {' '.join(f'{x:.2f}' for x in report['load_average_end'])}")
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
