"""Whole collections: find the image files, caption them in batches, keep the rows in a resumable output.

  python -m blip2 caption photos/ more/*.jpg list.txt --out captions.parquet --batch-size 16

Output rows are keyed by path. A run appends each finished batch to a journal (a .jsonl output is its own
journal; a .parquet output gets `<out>.parts/`, one Parquet file per batch) and a .parquet output is written
whole from it at the end, so a run that stops keeps what it finished and the next run does only the rest.
Crash safety: a run holds `<out>.lock` (an OS lock, gone with its process): a second run on the same output is
refused. Every write is atomic (a part or the output is written under a temporary name, synced and renamed; a JSON
line is one write), and what a killed write leaves (a temporary file, a partial last JSON line) is removed by the
next run, which redoes those images. A file that cannot be read or captioned (unreadable, not an image, over the
pixel limit, a broken link, a FIFO or device) is a row with its `error` (the run goes on); the next run tries it
again. Parquet needs pyarrow (`pip install -r requirements-scale.txt`); JSON lines need nothing more.
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
import shutil
import socket
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
from .images import MAX_PIXELS, SUFFIXES, image_pixels, load_image
from .io.hub import resolve_checkpoint
from .modeling import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval
from .processing import Blip2Processor
from .runner import Blip2Runner
from .weight_only import quantization_flag

IMAGE_SUFFIXES = SUFFIXES  # the formats the loader takes, no other
LIST_SUFFIXES = (".txt", ".lst")
BATCH_PIXELS = 256_000_000  # decoded pixels per batch at most (3 bytes each), unless one image alone has more
log = logging.getLogger(__name__)


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
        elif os.path.lexists(p):  # a file (a broken link, a FIFO: an error row)
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


class OutputBusyError(OSError):
    """Another run holds the output's lock."""


def hold_lock(path: str, what: str):  # -> the open lock file; closing it (or the process ending) releases it
    """An exclusive OS lock (flock) on the file `path`, or OutputBusyError naming its holder; `what` is guarded."""
    f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise OutputBusyError(f"{what} is being written by another run ({holder}, holding {path}): wait for it to "
                              f"finish, or write to another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """`write(tmp)` then fsync and rename to `path`: `path` holds the old or the new content whole, never a part."""
    tmp = f"{path}.tmp"
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Rows:
    """A job's output: rows keyed by `path` in a .parquet or .jsonl file, resumable (see the module doc).
    `schema`: a pyarrow schema for Parquet output (None for JSON lines). Used as a context manager, which holds
    the output's lock (OutputBusyError if another run holds it) and clears what a killed run left half-written."""

    def __init__(self, out: str, schema: Any = None):  # a pyarrow.Schema
        if not out.endswith((".parquet", ".jsonl")):
            raise ValueError(f"the output must end in .parquet or .jsonl, got {out!r}")
        self.out, self.schema, self.parquet = out, schema, out.endswith(".parquet")
        self.parts, self.lock = out + ".parts", None
        if self.parquet:
            need("pyarrow")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def __enter__(self) -> Rows:
        self.lock = hold_lock(self.out + ".lock", self.out)
        try:
            self.recover()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.lock.close()
        self.lock = None

    def recover(self) -> None:
        """Remove what a killed write left: temporary files, a partial last JSON line (its images are redone)."""
        if os.path.exists(self.out + ".tmp"):
            os.remove(self.out + ".tmp")
        if os.path.isdir(self.parts):
            for f in os.listdir(self.parts):
                if not (f.startswith("part-") and f.endswith(".parquet")):
                    os.remove(os.path.join(self.parts, f))
        if not self.parquet and os.path.exists(self.out):
            with open(self.out, "rb+") as f:
                size = end = f.seek(0, os.SEEK_END)
                while end:  # back to the end of the last complete line (a partial one is a batch's bytes at most)
                    f.seek(end - 1)
                    if f.read(1) == b"\n":
                        break
                    end -= 1
                if end < size:
                    f.truncate(end)
                    log.warning("%s: removed a partial last line of %d bytes (a run stopped while writing it); its "
                                "image is done again", self.out, size - end)

    def journal(self) -> list[str]:
        """The parts of unfinished runs, oldest first (Parquet)."""
        if not os.path.isdir(self.parts):
            return []
        return sorted(os.path.join(self.parts, f) for f in os.listdir(self.parts)
                      if f.startswith("part-") and f.endswith(".parquet"))

    def read_lines(self) -> dict[str, dict]:
        rows = {}
        if not os.path.exists(self.out):
            return rows
        with open(self.out, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.out}, line {n}: not a JSON row ({e.msg}): delete or fix that line, then "
                                     f"run again (its image is done again)") from None
                if not isinstance(row, dict) or not isinstance(row.get("path"), str):
                    raise ValueError(f"{self.out}, line {n}: a row must be a JSON object with a \"path\": delete or "
                                     f"fix that line, then run again")
                rows[row["path"]] = row
        return rows

    def read_parquet(self, file: str, columns: list[str] | None) -> Any:  # a pyarrow.Table
        pq = need("pyarrow.parquet")
        try:
            return pq.read_table(file, columns=columns)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            fix = "delete it, then run again (its images are done again)" if file != self.out else \
                "move it aside, then run again (every image is done again)"
            raise ValueError(f"{file} is not a readable Parquet file ({e}): {fix}") from None

    def table(self, columns: list[str] | None = None) -> Any:  # a pyarrow.Table, or a list of dicts
        """Every row so far (the output and any journal of an unfinished run), the last row of a path winning,
        sorted by path: a pyarrow Table (Parquet; only `columns`, "path" among them, if given) or a list of dicts
        (JSON lines)."""
        if not self.parquet:
            rows = self.read_lines()
            return [rows[p] for p in sorted(rows)]
        pa = need("pyarrow")
        files = ([self.out] if os.path.exists(self.out) else []) + self.journal()
        tables = [self.read_parquet(f, columns) for f in files]
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
        """Journal one batch's rows: a whole part (Parquet), or whole lines in one write (JSON lines)."""
        if self.lock is None:
            raise RuntimeError("Rows.add outside `with Rows(...)`: the output's lock is not held")
        if not rows:
            return
        if not self.parquet:
            with open(self.out, "ab") as f:
                f.write(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows))
                f.flush()
                os.fsync(f.fileno())
            return
        pa, pq = need("pyarrow"), need("pyarrow.parquet")
        os.makedirs(self.parts, exist_ok=True)
        table = pa.Table.from_pylist(rows, schema=self.schema)
        write_atomic(os.path.join(self.parts, f"part-{time.time_ns():020d}.parquet"), partial(pq.write_table, table))

    def finish(self, keep: Callable[[str], bool] | None = None, metadata: dict | None = None) -> Any:
        """Write the output whole (sorted by path, one row per path, only paths `keep` keeps; Parquet: `metadata`
        in its schema) and drop the journal."""
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
            if metadata:
                table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
            write_atomic(self.out, partial(pq.write_table, table))
            shutil.rmtree(self.parts, ignore_errors=True)
        else:
            def write(tmp):
                with open(tmp, "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in table)
            write_atomic(self.out, write)
        return table


# ---- running a job in batches --------------------------------------------------------------------------------


def open_images(paths: list[str], max_pixels: int | None = MAX_PIXELS) -> tuple[list, list[dict]]:
    """Load each file -> (loaded [(path, PIL image)], failed rows [{"path", "error"}]); an image over
    `max_pixels` fails without being decoded."""
    loaded, failed = [], []
    for p in paths:
        try:
            loaded.append((p, load_image(p, max_pixels)))
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
                 opened: tuple[list, list[dict]] | None = None, max_pixels: int | None = MAX_PIXELS) -> list[dict]:
    """Caption rows of a batch of files: one vision pass and one batched generation (Blip2Runner.caption_batch).
    `opened`: open_images(paths, max_pixels), if already done."""
    loaded, failed = opened or open_images(paths, max_pixels)

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


def batches(paths: list[str], size: int, max_pixels: int | None = None,
            budget: int = BATCH_PIXELS) -> Iterator[list[str]]:
    """Batches of `size` paths; with `max_pixels` also of at most `budget` decoded pixels, by each file's header
    (a file over `max_pixels` counts 0: it is refused undecoded), so a batch of huge images stays bounded."""
    if size < 1:
        raise ValueError(f"the batch size must be >= 1, got {size}")
    batch, pixels = [], 0
    for p in paths:
        n = 0 if max_pixels is None else image_pixels(p)
        n = n if max_pixels is None or n <= max_pixels else 0
        if batch and (len(batch) == size or pixels + n > budget):
            yield batch
            batch, pixels = [], 0
        batch.append(p)
        pixels += n
    if batch:
        yield batch


def prefetched(paths: list[str], size: int, read: Callable[[list[str]], object],
               max_pixels: int | None = None) -> Iterator[tuple[list, object]]:
    """(batch, read(batch)) for each of batches(paths, size, max_pixels), the next batch read on a thread
    meanwhile: decoding and hashing files (which release the GIL) overlap the model's work on the batch before."""
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for batch in batches(paths, size, max_pixels):
            ahead = pool.submit(read, batch)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = batch, ahead
        if pending is not None:
            yield pending[0], pending[1].result()


def drive(results: Iterable[list[dict]], rows: Rows, total: int, skipped: int, desc: str, progress: bool = True,
          keep: Callable[[str], bool] | None = None, metadata: dict | None = None) -> Summary:
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
    rows.finish(keep, metadata)
    return Summary(done, failed, skipped, time.perf_counter() - start, first)


def caption_job(runner: Blip2Runner | None, paths: Iterable[str], out: str, batch_size: int = 16, prompt: str = "",
                decoding: dict | None = None, progress: bool = True, ray: RaySettings | None = None,
                max_pixels: int | None = MAX_PIXELS) -> Summary:
    """Caption every image `paths` name into `out` (.parquet or .jsonl), skipping what `out` holds; an image over
    `max_pixels` is an error row. `ray`: a distributed.RaySettings to run the batches on Ray actors instead of
    `runner`."""
    GenerationConfig.build(None, **(decoding or {}))  # bad settings fail here, not as an error on every row
    files = find_images(paths)
    with Rows(out, caption_schema() if out.endswith(".parquet") else None) as rows:
        done = rows.done()
        todo = [f for f in files if f not in done]
        if ray is not None:
            load = partial(load_runner, ray.model, None, ray.dtype, ray.quantize)
            results = ray_rows(ray, caption_rows, todo, batch_size, load, prompt=prompt, decoding=decoding or {},
                               max_pixels=max_pixels)
        else:
            read = partial(open_images, max_pixels=max_pixels)
            results = (caption_rows(runner, b, prompt, decoding, opened)
                       for b, opened in prefetched(todo, batch_size, read, max_pixels))
        return drive(results, rows, len(todo), len(files) - len(todo), "caption", progress)
