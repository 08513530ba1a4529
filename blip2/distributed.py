"""Caption and index jobs on Ray Data: `map_batches` over the file paths with a pool of actors, each holding one
model (Blip2Runner), computing the same rows as the local job (bulk.caption_rows, index.index_rows), which the
driver writes to the same resumable output.

  ray start --head                      # on the head node; `ray start --address HEAD:6379` on the others
  python -m blip2 caption photos/ --out captions.parquet --ray auto --concurrency 8

Without an address a local Ray is started (and stopped at the end). The blip2 package travels to the workers
(`py_modules`); the model paths must be readable on every node (or be hub ids). Ray is an optional extra:
`pip install -r requirements-scale.txt`.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from .extras import need

if TYPE_CHECKING:
    from .runner import Blip2Runner

PACKAGE = os.path.dirname(os.path.abspath(__file__))  # blip2/ itself, shipped to the workers


@dataclass
class RaySettings:
    address: str | None = None  # None: a local Ray; "auto": the running cluster; "ray://host:10001": a remote one
    concurrency: int = 1  # actors, each with its own model
    cpus_per_actor: float = 1.0  # also its torch threads
    model: str | None = None  # captioning checkpoint (caption jobs, index --captions)
    itm_model: str | None = None  # retrieval checkpoint (index jobs)
    dtype: str | None = None
    quantize: str | None = None
    init: dict = field(default_factory=dict)  # more ray.init arguments (e.g. num_cpus for a local Ray)


class _Worker:
    """One Ray actor: builds its runner once with `load()`, then turns batches of paths into pickled rows."""

    def __init__(self, load: Callable[[], Blip2Runner], rows: Callable[..., list[dict]], threads: int,
                 kwargs: dict):
        torch.set_num_threads(max(1, threads))
        self.runner, self.rows, self.kwargs = load(), rows, kwargs

    def __call__(self, batch: dict) -> dict:
        rows = self.rows(self.runner, [str(p) for p in batch["path"]], **self.kwargs)
        return {"row": np.array([pickle.dumps(r) for r in rows], dtype=object)}


def ray_rows(settings: RaySettings, rows: Callable[..., list[dict]], paths: list[str], batch_size: int,
             load: Callable[[], Blip2Runner] | None = None, **kwargs) -> Iterator[list[dict]]:
    """`rows(runner, batch_of_paths, **kwargs)` (bulk.caption_rows, index.index_rows) for `paths`, computed by Ray
    actors that each build their runner once with `load()` (a picklable callable, e.g. a functools.partial of
    bulk.load_runner), yielded as batches arrive."""
    if not paths:
        return
    ray = need("ray")
    need("ray.data")
    started = not ray.is_initialized()
    if started:
        ray.init(address=settings.address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"py_modules": [PACKAGE]}, **settings.init)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the job's own bar counts the rows
        ds = ray.data.from_items([{"path": p} for p in paths])
        ds = ds.map_batches(_Worker, fn_constructor_kwargs={"load": load, "rows": rows,
                                                            "threads": int(settings.cpus_per_actor),
                                                            "kwargs": kwargs},
                            batch_size=batch_size, concurrency=settings.concurrency,
                            num_cpus=settings.cpus_per_actor, batch_format="numpy")
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            yield [pickle.loads(r) for r in batch["row"]]
    finally:
        if started:
            ray.shutdown()
