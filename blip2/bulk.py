"""Whole collections: find the image files, caption them in batches, keep the rows in a resumable output.

  python -m blip2 caption photos/ more/*.jpg list.txt --out captions.parquet --batch-size 16

Output rows are keyed by path. A run appends each finished batch to a journal (a .jsonl output is its own
journal; a .parquet output gets `<out>.parts/`, one Parquet file per batch) and a .parquet output is written
whole from it at the end, so a run that stops keeps what it finished and the next run does only the rest.
A file that cannot be read or captioned is a row with its `error` (the run goes on); the next run tries it again.
Parquet needs pyarrow (`pip install -r requirements-scale.txt`); JSON lines need nothing more.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch.nn as nn
from tqdm.auto import tqdm

from .distributed import RaySettings, ray_rows
from .extras import need
from .generation import GenerationConfig
from .images import load_image
from .io.hub import resolve_checkpoint
from .modeling import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval
from .processing import Blip2Processor
from .runner import Blip2Runner
from .weight_only import quantization_flag

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
LIST_SUFFIXES = (".txt", ".lst")


def pretrained(cls: type[nn.Module], path: str, dtype: str | None = None,
               quantize: str | None = None) -> tuple[nn.Module, Blip2Processor]:
    """(model, processor) of a checkpoint directory or hub id; `quantize` a --quantize flag (int8 / int4
    weight-only, 8bit / 4bit bitsandbytes)."""
    path = resolve_checkpoint(path)
    model = cls.from_pretrained(path, dtype=dtype, quantization=quantization_flag(quantize))
    return model, Blip2Processor.from_pretrained(path)


def load_runner(model: str | None = None, itm_model: str | None = None, dtype: str | None = None,
                quantize: str | None = None) -> Blip2Runner:
    """A Blip2Runner holding the captioning checkpoint `model` and / or the retrieval checkpoint `itm_model`."""
    gen = pretrained(Blip2ForConditionalGeneration, model, dtype, quantize) if model else (None, None)
    itm = pretrained(Blip2ForImageTextRetrieval, itm_model, dtype, quantize) if itm_model else (None, None)
    return Blip2Runner(*gen, *itm)


def find_images(paths: Iterable[str]) -> list[str]:
    """Absolute paths of the image files that `paths` name, sorted and unique. Each path is an image file, a
    folder (searched recursively for image suffixes), a glob pattern, or a text file (.txt / .lst) listing one
    path per line (relative to the list's folder; blank lines and # comments skipped)."""
    found = set()
    for p in paths:
        p = os.path.expanduser(str(p))
        if os.path.isdir(p):
            for root, _, files in os.walk(p):
                found.update(os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES))
        elif os.path.isfile(p) and p.lower().endswith(LIST_SUFFIXES):
            with open(p, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
            base = os.path.dirname(os.path.abspath(p))
            found.update(os.path.join(base, line) for line in lines if line and not line.startswith("#"))
        elif os.path.isfile(p):
            found.add(p)
        elif glob.has_magic(p):
            matches = [m for m in glob.glob(p, recursive=True) if os.path.isfile(m)]
            if not matches:
                raise FileNotFoundError(f"the pattern {p!r} matches no file")
            found.update(matches)
        else:
            raise FileNotFoundError(f"no such file, folder or pattern: {p!r}")
    return sorted({os.path.abspath(f) for f in found})


# ---- the output ----------------------------------------------------------------------------------------------


class Rows:
    """A job's output: rows keyed by `path` in a .parquet or .jsonl file, resumable (see the module doc).
    `schema`: a pyarrow schema for Parquet output (None for JSON lines)."""

    def __init__(self, out: str, schema: Any = None):  # a pyarrow.Schema
        if not out.endswith((".parquet", ".jsonl")):
            raise ValueError(f"the output must end in .parquet or .jsonl, got {out!r}")
        self.out, self.schema, self.parquet = out, schema, out.endswith(".parquet")
        self.parts = out + ".parts"
        if self.parquet:
            need("pyarrow")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def table(self, columns: list[str] | None = None) -> Any:  # a pyarrow.Table, or a list of dicts
        """Every row so far (the output and any journal of an unfinished run), the last row of a path winning,
        sorted by path: a pyarrow Table (Parquet; only `columns`, "path" among them, if given) or a list of dicts
        (JSON lines)."""
        if not self.parquet:
            rows = {}
            if os.path.exists(self.out):
                with open(self.out, encoding="utf-8") as f:
                    for line in f:
                        if line.strip():
                            row = json.loads(line)
                            rows[row["path"]] = row
            return [rows[p] for p in sorted(rows)]
        pa, pq = need("pyarrow"), need("pyarrow.parquet")

        files = ([self.out] if os.path.exists(self.out) else []) + \
            (sorted(os.path.join(self.parts, f) for f in os.listdir(self.parts)) if os.path.isdir(self.parts) else [])
        tables = [pq.read_table(f, columns=columns) for f in files]
        if self.schema is not None:
            schema = pa.schema([self.schema.field(n) for n in columns or self.schema.names])
            tables = [t.select(schema.names).cast(schema) for t in tables] or [schema.empty_table()]
        table = pa.concat_tables(tables) if tables else None
        if table is None:
            return None
        last = {p: i for i, p in enumerate(table.column("path").to_pylist())}
        return table.take(pa.array([last[p] for p in sorted(last)], pa.int64()))

    def done(self) -> set[str]:
        """Paths whose row has no error (a rerun skips them)."""
        t = self.table(["path", "error"]) if self.parquet else self.table()
        if t is None:
            return set()
        if self.parquet:
            t = t.to_pydict()
            return {p for p, e in zip(t["path"], t["error"]) if e is None}
        return {r["path"] for r in t if r.get("error") is None}

    def add(self, rows: list[dict]) -> None:
        if not rows:
            return
        if not self.parquet:
            with open(self.out, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            return
        pa, pq = need("pyarrow"), need("pyarrow.parquet")

        os.makedirs(self.parts, exist_ok=True)
        name = os.path.join(self.parts, f"part-{time.time_ns():020d}.parquet")
        pq.write_table(pa.Table.from_pylist(rows, schema=self.schema), name + ".tmp")
        os.replace(name + ".tmp", name)  # a part is there whole or not at all

    def finish(self, keep: Callable[[str], bool] | None = None) -> Any:
        """Write the output whole (sorted by path, one row per path, only paths `keep` keeps) and drop the
        journal."""
        table = self.table()
        if keep is not None and table is not None:
            if self.parquet:
                pa = need("pyarrow")
                table = table.filter(pa.array([keep(p) for p in table["path"].to_pylist()], pa.bool_()))
            else:
                table = [r for r in table if keep(r["path"])]
        if self.parquet:
            pq = need("pyarrow.parquet")
            if table is None:
                table = self.schema.empty_table()
            pq.write_table(table, self.out + ".tmp")
            os.replace(self.out + ".tmp", self.out)
            shutil.rmtree(self.parts, ignore_errors=True)
        else:
            with open(self.out + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in table)
            os.replace(self.out + ".tmp", self.out)
        return table


# ---- running a job in batches --------------------------------------------------------------------------------


def open_images(paths: list[str]) -> tuple[list, list[dict]]:
    """Load each file -> (loaded [(path, PIL image)], failed rows [{"path", "error"}])."""
    loaded, failed = [], []
    for p in paths:
        try:
            loaded.append((p, load_image(p)))
        except Exception as e:  # unreadable, truncated, not an image, too large: recorded, the run goes on
            failed.append({"path": p, "error": f"{type(e).__name__}: {e}"})
    return loaded, failed


def each_or_alone(items: list, work: Callable[[list], list[dict]]) -> list[dict]:
    """`work` on the whole batch; if that fails, on each item alone, so one bad image only fails its own row."""
    try:
        return work(items)
    except Exception as e:
        if len(items) == 1:
            return [{"path": items[0][0], "error": f"{type(e).__name__}: {e}"}]
        return [row for item in items for row in each_or_alone([item], work)]


def caption_rows(runner: Blip2Runner, paths: list[str], prompt: str = "", decoding: dict | None = None,
                 opened: tuple[list, list[dict]] | None = None) -> list[dict]:
    """Caption rows of a batch of files: one vision pass and one batched generation (Blip2Runner.caption_batch).
    `opened`: open_images(paths), if already done."""
    loaded, failed = opened or open_images(paths)

    def work(items):
        out = runner.caption_batch([im for _, im in items], prompt, **(decoding or {}))
        return [{"path": p, "caption": g.text, "captions": g.texts, "width": im.width, "height": im.height,
                 "error": None} for (p, im), g in zip(items, out)]

    return (each_or_alone(loaded, work) if loaded else []) + failed


def caption_schema() -> Any:  # a pyarrow.Schema
    pa = need("pyarrow")
    return pa.schema([("path", pa.string()), ("caption", pa.string()), ("captions", pa.list_(pa.string())),
                      ("width", pa.int32()), ("height", pa.int32()), ("error", pa.string())])


@dataclass
class Summary:
    done: int  # rows written by this run
    failed: int  # of which errors
    skipped: int  # already in the output
    seconds: float
    first_batch: tuple[int, float] = (0, 0.0)  # (rows, seconds) of the first batch: start-up costs show there

    def __str__(self):
        rate = self.done / self.seconds if self.seconds else 0.0
        return (f"{self.done} images in {self.seconds:.1f} s ({rate:.1f} images/s), {self.failed} failed, "
                f"{self.skipped} already done")


def batches(paths: list[str], size: int) -> Iterator[list[str]]:
    if size < 1:
        raise ValueError(f"the batch size must be >= 1, got {size}")
    for i in range(0, len(paths), size):
        yield paths[i:i + size]


def prefetched(paths: list[str], size: int, read: Callable[[list[str]], object]) -> Iterator[tuple[list, object]]:
    """(batch, read(batch)) for each batch of `paths`, the next batch read on a thread meanwhile: decoding and
    hashing files (which release the GIL) overlap the model's work on the batch before."""
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for batch in batches(paths, size):
            ahead = pool.submit(read, batch)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = batch, ahead
        if pending is not None:
            yield pending[0], pending[1].result()


def drive(results: Iterable[list[dict]], rows: Rows, total: int, skipped: int, desc: str, progress: bool = True,
          keep: Callable[[str], bool] | None = None) -> Summary:
    """Write each batch of result rows as it comes, with a progress bar (images/s and ETA); then finish."""
    start, done, failed, first = time.perf_counter(), 0, 0, (0, 0.0)
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for batch in results:
            if not done:
                first = len(batch), time.perf_counter() - start
            rows.add(batch)
            done += len(batch)
            failed += sum(r.get("error") is not None for r in batch)
            bar.update(len(batch))
            bar.set_postfix(failed=failed, refresh=False)
    rows.finish(keep)
    return Summary(done, failed, skipped, time.perf_counter() - start, first)


def caption_job(runner: Blip2Runner | None, paths: Iterable[str], out: str, batch_size: int = 16, prompt: str = "",
                decoding: dict | None = None, progress: bool = True, ray: RaySettings | None = None) -> Summary:
    """Caption every image `paths` name into `out` (.parquet or .jsonl), skipping what `out` holds.
    `ray`: a distributed.RaySettings to run the batches on Ray actors instead of `runner`."""
    GenerationConfig.build(None, **(decoding or {}))  # bad settings fail here, not as an error on every row
    files = find_images(paths)
    rows = Rows(out, caption_schema() if out.endswith(".parquet") else None)
    done = rows.done()
    todo = [f for f in files if f not in done]
    if ray is not None:
        load = partial(load_runner, ray.model, None, ray.dtype, ray.quantize)
        results = ray_rows(ray, caption_rows, todo, batch_size, load, prompt=prompt, decoding=decoding or {})
    else:
        results = (caption_rows(runner, b, prompt, decoding, opened)
                   for b, opened in prefetched(todo, batch_size, open_images))
    return drive(results, rows, len(todo), len(files) - len(todo), "caption", progress)
