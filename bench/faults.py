"""Collections under kill -9: caption and index runs over a folder of small images, each killed N times at random
points (a random moment, or inside a chosen write), then resumed; every image must end up in the output exactly
once, without an error, and every output must read back (Parquet, JSON lines, the faiss index and its search).

    python -m bench.faults                          # 300 images, 6 kills per job (a few minutes on 2 cores)
    python -m bench.faults --images 100 --kills 3 --seed 1

A killed run is a child process `python -m bench.faults --child FAULT -- ARGS` (ARGS: python -m blip2's), which
runs blip2's CLI with a fault armed (tests/test_faults.py uses the same children):
* `none`: no fault; the parent SIGKILLs it at a random moment (1.5-5 s after its start, which takes ~3 s);
* `write:N`: SIGKILL itself inside its N-th atomic write (os.replace of a temporary file): the temporary file is
  cut to half its size first, as a kill midway through writing it leaves it;
* `after:N:NAME`: SIGKILL itself just after its N-th rename onto a file named NAME (index: images.parquet replaced,
  index.faiss not yet);
* `line:N`: SIGKILL itself inside its N-th JSON-lines batch, half of the batch's bytes written (a full disk
  leaves the same partial line).
"""

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.machine import machine  # noqa: E402
from blip2 import bulk  # noqa: E402
from blip2.__main__ import main as blip2_main  # noqa: E402
from blip2.index import ImageIndex  # noqa: E402
from blip2.train import world  # noqa: E402


def arm(fault: str) -> None:
    """Arm `fault` (see the module doc) in this process."""
    kind, _, rest = fault.partition(":")
    if kind == "none":
        return
    n, _, name = rest.partition(":")
    count, target = [0], int(n)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if kind in ("write", "after"):
        real = os.replace

        def replace(src, dst, *a, **kw):
            hit = str(src).endswith(".tmp") if kind == "write" else os.path.basename(str(dst)) == name
            if hit:
                count[0] += 1
            if hit and count[0] == target and kind == "write":
                with open(src, "rb+") as f:
                    f.truncate(os.path.getsize(src) // 2)
                die()
            real(src, dst, *a, **kw)
            if hit and count[0] == target:
                die()

        os.replace = replace
    elif kind == "line":
        real_add = bulk.Rows.add

        def add(self, rows):
            count[0] += 1
            if count[0] == target and not self.parquet and rows:
                data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
                with open(self.out, "ab") as f:
                    f.write(data[:len(data) // 2])
                die()
            real_add(self, rows)

        bulk.Rows.add = add
    else:
        raise SystemExit(f"unknown fault {fault!r}")


def child_command(fault: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "bench.faults", "--child", fault, "--", *args]


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def write_images(folder: str, n: int, seed: int) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, s in enumerate(world.make_split("test", n, seed=seed)):
        paths.append(os.path.join(folder, f"s{i:04d}.png"))
        s.render(64).save(paths[-1])
    return sorted(paths)


def read_rows(out: str) -> list[dict]:
    if out.endswith(".jsonl"):
        with open(out, encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    import pyarrow.parquet as pq
    return pq.read_table(out, columns=["path", "error"]).to_pylist()


def job(name: str, args: list[str], out: str, paths: list[str], kills: int, rng: random.Random) -> dict:
    """Run `args` (python -m blip2's) killed `kills` times, then to the end -> the figures of the run."""
    kinds = ["none", "line"] if out.endswith(".jsonl") else ["none", "write"]  # a .jsonl's batches are lines
    record = {"job": name, "kills": [], "seconds": 0.0}
    start = time.perf_counter()
    for k in range(kills):  # mid-run kills (a run gets at most 3 batches further), the last one after the output
        kind = rng.choice(kinds) if k < kills - 1 else "after"
        fault = {"none": "none", "write": f"write:{rng.randint(1, 4)}", "line": f"line:{rng.randint(1, 4)}",
                 "after": f"after:1:{'images.parquet' if name == 'index' else os.path.basename(out)}"}[kind]
        child = subprocess.Popen(child_command(fault, args), cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
        if kind == "none":
            try:
                child.wait(timeout=rng.uniform(1.5, 5))  # start-up takes ~3 s: some land in it, most mid-run
            except subprocess.TimeoutExpired:
                child.kill()
        err = child.communicate()[1]
        if child.returncode not in (0, -signal.SIGKILL):
            raise SystemExit(f"{name}: a run under fault {fault} failed ({child.returncode}): {err[-2000:]}")
        record["kills"].append((fault, "killed" if child.returncode else "finished first",
                                done_so_far(os.path.join(out, "images.parquet") if name == "index" else out)))
    final = subprocess.run([sys.executable, "-m", "blip2", *args], cwd=ROOT, env=child_env(), capture_output=True,
                           text=True)
    record["seconds"] = time.perf_counter() - start
    if final.returncode:
        raise SystemExit(f"{name}: the resumed run failed: {final.stderr[-2000:]}")
    rows = read_rows(os.path.join(out, "images.parquet") if name == "index" else out)
    seen = [r["path"] for r in rows]
    record.update(rows=len(rows), distinct=len(set(seen)), expected=len(paths), errors=sum(bool(r["error"])
                  for r in rows), exactly_once=sorted(seen) == paths, leftovers=leftovers(out))
    if name == "index":
        index = ImageIndex.load(out)
        record["searchable"] = len(index)
        record["vectors"] = index.flat.ntotal
        search = subprocess.run([sys.executable, "-m", "blip2", "search", out, "a red circle", "-k", "3"], cwd=ROOT,
                                env=child_env(), capture_output=True, text=True)
        record["search_exit"] = search.returncode
    return record


def done_so_far(out: str) -> int:
    """Images a rerun would skip, read from a copy of the output and its journal (opening them clears what a
    killed write left: that is the next run's work, not this count's)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, os.path.basename(out))
        for src, dst in ((out, copy), (out + ".parts", copy + ".parts")):
            if os.path.isdir(src):
                shutil.copytree(src, dst)
            elif os.path.exists(src):
                shutil.copy(src, dst)
        with bulk.Rows(copy) as rows:
            return len(rows.done())


def leftovers(out: str) -> list[str]:
    """Temporary files or journals still there after the resumed run finished (none expected)."""
    folder = out if os.path.isdir(out) else os.path.dirname(out)
    return sorted(f for f in os.listdir(folder) if f.endswith((".tmp", ".parts")))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        fault, args = argv[1], argv[3:]
        arm(fault)
        return blip2_main(args)
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--kills", type=int, default=6, help="kills per job")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    logging.getLogger("blip2.bulk").setLevel(logging.ERROR)  # done_so_far's copies: what the next run will warn of
    print(machine())
    with tempfile.TemporaryDirectory(prefix="blip2-faults-") as tmp:
        paths = write_images(os.path.join(tmp, "images"), a.images, a.seed)
        jobs = [("caption", os.path.join(tmp, "captions.parquet")), ("caption", os.path.join(tmp, "captions.jsonl")),
                ("index", os.path.join(tmp, "photos.index"))]
        ok = True
        for name, out in jobs:
            args = [name, os.path.join(tmp, "images"), "--out", out, "--batch-size", "8", "--no-progress"]
            args += ["--captions"] if name == "index" else []  # (as long a run as a caption run's)
            r = job(name, args, out, paths, a.kills, rng)
            killed = sum(1 for _, how, _ in r["kills"] if how == "killed")
            good = r["exactly_once"] and r["rows"] == r["expected"] and not r["errors"] and not r["leftovers"]
            if name == "index":
                good = good and r["searchable"] == a.images and r["search_exit"] == 0
            ok &= good
            print(f"\n{name} -> {os.path.basename(out)}: {killed} of {len(r['kills'])} runs killed, then resumed; "
                  f"{r['seconds']:.1f} s in all")
            print("  fault -> images done after it: " + ", ".join(f"{f} -> {n}" + ("" if how == "killed" else
                                                                                     " (finished first)")
                                                                 for f, how, n in r["kills"]))
            print(f"  rows {r['rows']} for {r['expected']} images, {r['distinct']} distinct paths, every image "
                  f"exactly once: {r['exactly_once']}, error rows {r['errors']}, leftover temporary files "
                  f"{len(r['leftovers'])}")
            if name == "index":
                print(f"  index readable: {r['searchable']} images searchable, {r['vectors']} vectors; search exit "
                      f"{r['search_exit']}")
        print(f"\n{'PASS' if ok else 'FAIL'}; {machine()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
