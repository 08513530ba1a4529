"""An image index for text search: the ITC embeddings of every query of every image, held in a faiss index.

  python -m blip2 index photos/ --out photos.index [--captions]
  python -m blip2 search photos.index "a red circle on the left" -k 10 --rerank 20

INDEX_DIR holds
* images.parquet: path, content hash (blake2b of the file), bytes, mtime_ns, width, height, caption (with
  --captions), error, embedding (Q * E float32: the normalised ITC embedding of each of the image's Q queries);
* index.faiss: a flat inner-product index over all N * Q query vectors (vector v belongs to image v // Q);
* meta.json: the retrieval model (a checkpoint of the embedded blip2/assets/ folder by its name there, "embedded:NAME",
  so the index survives a move of the checkout), Q, E and the generation of images.parquet index.faiss was built
  from; approx.faiss: the approximate index, built by the first search that asks for it.
A run holds the lock of images.parquet and writes images.parquet, index.faiss, then meta.json, each atomically;
the generation (a random id in images.parquet's schema metadata and in meta.json) ties them: a search refuses a
pair from different runs (a run killed between its writes), and indexing again repairs it.
BLIP-2 scores an image against a text by its best query: score(i, t) = max_q e[i, q] . t. The exact search
computes it for every image (ImageIndex.search); `--approx` re-scores only the candidates of an IVF index over
pooled embeddings and prints its recall against exact. Indexing again adds new files, skips unchanged ones (same
size and mtime, or same content hash; a copy of an indexed file reuses its row) and drops files that are gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import numpy as np

from .bulk import Rows, Summary, drive, each_or_alone, find_images, load_runner, open_images, prefetched, write_atomic
from .catalogue import EMBEDDED_MODELS, RETRIEVAL
from .config import Blip2Config, read_json
from .distributed import RaySettings, ray_rows
from .extras import need
from .images import MAX_PIXELS, open_regular
from .io.hub import resolve_checkpoint
from .retrieval import match_score
from .runner import Blip2Runner

ROWS, FLAT, APPROX, META = "images.parquet", "index.faiss", "approx.faiss", "meta.json"
GENERATION = b"blip2.generation"  # images.parquet's schema metadata key
ASSETS = os.path.dirname(EMBEDDED_MODELS[RETRIEVAL])  # the embedded models
EMBEDDED = "embedded:"


def model_id(name: str) -> str:
    """How meta.json records a retrieval model: a checkpoint in the embedded assets/ folder as "embedded:NAME",
    another local checkpoint by its absolute path, a hub id as it is."""
    if not os.path.isdir(name):
        return name
    path = os.path.realpath(name)
    return EMBEDDED + os.path.basename(path) if os.path.dirname(path) == os.path.realpath(ASSETS) else path


def model_path(model: str) -> str:
    """The checkpoint (directory or hub id) of a model_id."""
    return os.path.join(ASSETS, model[len(EMBEDDED):]) if model.startswith(EMBEDDED) else model


def read_meta(directory: str) -> dict:
    """meta.json of an index folder, checked: model, num_query_tokens, dim (and the generation, if any)."""
    path = os.path.join(directory, META)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} is not an index (no {META}): build it with python -m blip2 index")
    meta = read_json(path)
    expected = {"model": (str, "a model name"), "num_query_tokens": (int, "a positive integer"),
                "dim": (int, "a positive integer"), "generation": (str, "an id")}
    for key, (kind, what) in expected.items():
        v = meta.get(key)
        if key == "generation" and v is None:
            continue
        if type(v) is not kind or not v or (kind is int and v < 1):
            raise ValueError(f"{path}: {key!r} is {'missing' if key not in meta else repr(v)}, expected {what}. This "
                             f"file is written by python -m blip2 index: index the images again into a new --out "
                             f"folder")
    return meta


def write_meta(directory: str, meta: dict) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f)
    write_atomic(os.path.join(directory, META), write)


def check_model(directory: str, meta: dict, name: str) -> None:
    """Refuse searching (or indexing) the folder with another model than the one its vectors are from."""
    if model_id(model_path(name)) != model_id(model_path(meta["model"])):
        raise ValueError(f"{directory} was indexed with {meta['model']} (Q={meta['num_query_tokens']}, "
                         f"E={meta['dim']}); its vectors mean nothing to {name}: use that model (search: drop "
                         f"--itm-model), or index the images with {name} into a new --out folder")


def file_hash(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def index_schema(q: int, e: int):
    pa = need("pyarrow")
    return pa.schema([("path", pa.string()), ("hash", pa.string()), ("bytes", pa.int64()), ("mtime_ns", pa.int64()),
                      ("width", pa.int32()), ("height", pa.int32()), ("caption", pa.string()),
                      ("error", pa.string()), ("embedding", pa.list_(pa.float32(), q * e))])


def _file_facts(path: str) -> dict:
    st = os.stat(path)
    return {"path": path, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_files(paths: list[str], max_pixels: int | None = MAX_PIXELS) -> tuple[dict, list, list[dict]]:
    """File facts with content hash {path: facts}, and open_images(paths, max_pixels)."""
    facts = {}
    for p in paths:
        try:
            facts[p] = {**_file_facts(p), "hash": file_hash(p)}
        except OSError:  # gone, a broken link, a FIFO: open_images records why
            facts[p] = {"path": p}
    return (facts, *open_images(paths, max_pixels))


def index_rows(runner: Blip2Runner, paths: list[str], captions=False, prompt: str = "", decoding: dict | None = None,
               opened=None, max_pixels: int | None = MAX_PIXELS) -> list[dict]:
    """Index rows of a batch of files: file facts and hash, ITC embeddings in one vision pass
    (Blip2Runner.itc_image_batch) and, with `captions`, captions in one batched generation. `opened`:
    read_files(paths, max_pixels), if already done."""
    facts, loaded, failed = opened or read_files(paths, max_pixels)

    def work(items):
        images = [im for _, im in items]
        emb = runner.itc_image_batch(images).float().cpu().numpy()  # (B, Q, E)
        texts = runner.caption_batch(images, prompt, **(decoding or {})) if captions else [None] * len(items)
        return [{**facts[p], "width": im.width, "height": im.height, "caption": t and t.text, "error": None,
                 "embedding": e.reshape(-1)} for (p, im), e, t in zip(items, emb, texts)]

    return (each_or_alone(loaded, work) if loaded else []) + [{**facts[r["path"]], **r} for r in failed]


def _dims(runner: Blip2Runner | None, model_name: str) -> dict:
    """Q and E of the retrieval model (from its config when no runner holds it, as for Ray)."""
    if runner is not None:
        cfg = runner.itm_model.config
    else:
        cfg = Blip2Config.from_pretrained(resolve_checkpoint(model_name))
    return {"num_query_tokens": cfg.num_query_tokens, "dim": cfg.image_text_hidden_size}


def index_job(runner: Blip2Runner | None, paths: Iterable[str], out: str, model_name: str, batch_size: int = 16,
              captions=False, prompt: str = "", decoding: dict | None = None, progress=True,
              ray: RaySettings | None = None, max_pixels: int | None = MAX_PIXELS) -> Summary:
    """Index every image `paths` name into the folder `out` (see the module doc). `runner` holds the retrieval
    model (and the captioning model with `captions`); `model_name` is recorded, and a later run must use the same.
    An image that cannot be read (over `max_pixels`, a broken link, gone, a FIFO) is an error row.
    `ray`: a distributed.RaySettings to compute on Ray actors (then `runner` may be None)."""
    need("faiss")
    os.makedirs(out, exist_ok=True)
    meta = {"model": model_id(model_name), **_dims(runner, model_name)}
    with Rows(os.path.join(out, ROWS), index_schema(meta["num_query_tokens"], meta["dim"])) as rows:
        if os.path.exists(os.path.join(out, META)):
            old = read_meta(out)
            check_model(out, old, model_name)
            if (old["num_query_tokens"], old["dim"]) != (meta["num_query_tokens"], meta["dim"]):
                raise ValueError(f"{out} was indexed with {old['model']} of Q={old['num_query_tokens']}, "
                                 f"E={old['dim']}; it now has Q={meta['num_query_tokens']}, E={meta['dim']}: index "
                                 f"the images into a new --out folder")
        else:  # before any row: a stopped first run still names its model
            write_meta(out, meta)
        if os.path.exists(os.path.join(out, APPROX)):  # built from the rows this run changes
            os.remove(os.path.join(out, APPROX))
        summary, generation = update(rows, runner, paths, captions, prompt, decoding, progress, ray, batch_size,
                                     max_pixels)
        write_flat(out, meta["dim"])
        write_meta(out, {**meta, "generation": generation})
    return summary


def update(rows: Rows, runner: Blip2Runner | None, paths: Iterable[str], captions: bool, prompt: str,
           decoding: dict | None, progress: bool, ray: RaySettings | None, batch_size: int,
           max_pixels: int | None) -> tuple[Summary, str]:
    """index_job's rows: new and changed files computed, copies reused, gone files dropped, images.parquet written
    with a new generation -> (summary, generation)."""
    indexed = rows.table([n for n in rows.schema.names if n != "embedding"]).to_pylist()  # sorted by path
    known = {r["path"]: r for r in indexed}
    by_hash = {r["hash"]: i for i, r in enumerate(indexed) if r["error"] is None}  # row number by content

    def current(r, facts):  # an indexed row still right for this file
        return r["error"] is None and (r["caption"] is not None or not captions) and \
            (r["bytes"], r["mtime_ns"]) == (facts["bytes"], facts["mtime_ns"])

    files = find_images(paths)
    todo, copies = [], []  # copies: (row index of the same content, facts of the new file)
    for f in files:
        try:
            facts = _file_facts(f)
            if f in known and current(known[f], facts):
                continue
            h = file_hash(f)
        except OSError:  # a broken link, a link loop, gone since the scan, a FIFO: its batch records why
            todo.append(f)
            continue
        i = by_hash.get(h)
        if i is not None and (indexed[i]["caption"] is not None or not captions):
            copies.append((i, {**facts, "hash": h}))
        else:
            todo.append(f)
    if copies:  # same content (touched, moved or copied): the indexed row with the new file facts
        table = rows.table()
        rows.add([{**table.slice(i, 1).to_pylist()[0], **facts} for i, facts in copies])
    if ray is not None:
        load = partial(load_runner, ray.model if captions else None, ray.itm_model, ray.dtype, ray.quantize)
        results = ray_rows(ray, index_rows, todo, batch_size, load, captions=captions, prompt=prompt,
                           decoding=decoding or {}, max_pixels=max_pixels)
    else:
        read = partial(read_files, max_pixels=max_pixels)
        results = (index_rows(runner, b, captions, prompt, decoding, opened)
                   for b, opened in prefetched(todo, batch_size, read, max_pixels))
    gone = {p for p in known if not os.path.exists(p)}
    generation = uuid.uuid4().hex
    summary = drive(results, rows, len(todo), len(files) - len(todo), "index", progress,
                    keep=lambda p: p not in gone, metadata={GENERATION: generation.encode()})
    return summary, generation


def write_flat(out: str, dim: int):
    """index.faiss from images.parquet: a flat inner-product index over every query vector of every image."""
    faiss = need("faiss")
    pq = need("pyarrow.parquet")
    table = pq.read_table(os.path.join(out, ROWS), columns=["error", "embedding"])
    good = table.filter(table["error"].is_null())
    flat = faiss.IndexFlatIP(dim)
    if good.num_rows:
        vectors = good["embedding"].combine_chunks().values.to_numpy(zero_copy_only=False)
        flat.add(vectors.reshape(-1, dim))  # (N * Q, E)
    write_atomic(os.path.join(out, FLAT), partial(faiss.write_index, flat))


# ---- search --------------------------------------------------------------------------------------------------


def best_query_scores(embeddings: np.ndarray, text: np.ndarray) -> np.ndarray:
    """(N, Q, E) image embeddings, (E,) text -> (N,) max over queries of the inner product. A large scan is one
    BLAS matrix-vector product on all cores (memory-bound); a small one (candidates) runs on one thread, where
    the BLAS threads cost more than they save (and, on a busy machine, many times more)."""
    n, q, e = embeddings.shape
    if n * q * e < 1 << 22:
        return np.einsum("nqe,e->nq", embeddings, text).max(1)
    return (embeddings.reshape(n * q, e) @ text).reshape(n, q).max(1)


def top_k(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (ids, scores), best first, ties by id (whatever their order in the input)."""
    if len(scores) > k > 0:  # everything scoring at least the k-th best score, ties at the boundary included
        keep = scores >= np.partition(scores, len(scores) - k)[len(scores) - k]
        ids, scores = ids[keep], scores[keep]
    order = np.lexsort((ids, -scores))[:k]
    return ids[order], scores[order]


@dataclass
class Hit:
    path: str
    itc: float  # best-query cosine
    itm: float | None = None  # ITM match probability (re-ranked hits only)
    score: float | None = None  # ITM log-odds + ITC cosine (re-ranked hits only)
    caption: str | None = None


class ImageIndex:
    """Search over N images of Q query vectors each, held once in a flat faiss index (`embeddings` (N, Q, E) is
    a view of its vectors). The exact search is one BLAS matrix-vector product over all N * Q vectors, then the
    max per image: memory-bound, it reads every vector once (faiss' own single-query flat search, heap per
    vector, measured 2-3x slower on 2 cores; it returns the same ranking from its top (k + 1) * Q vectors)."""

    def __init__(self, flat, num_query_tokens: int, paths: list[str], captions=None, directory: str | None = None,
                 model: str | None = None):
        n, q, e = len(paths), num_query_tokens, flat.d
        if flat.ntotal != n * q:
            raise ValueError(f"the flat index holds {flat.ntotal} vectors for {n} images of {q} queries"
                             + (f": run python -m blip2 index on {directory} again" if directory else ""))
        faiss = need("faiss")
        self.flat, self.paths, self.directory, self.model = flat, paths, directory, model  # model: its checkpoint
        self.captions = captions if captions is not None else [None] * n
        self.embeddings = faiss.rev_swig_ptr(flat.get_xb(), n * q * e).reshape(n, q, e) if n else \
            np.zeros((0, q, e), np.float32)
        self.approx = None

    @classmethod
    def load(cls, directory: str) -> ImageIndex:
        """The index in `directory`, checked: meta.json readable, index.faiss built from this images.parquet (the
        same generation) with E-dimensional vectors."""
        faiss = need("faiss")
        pq = need("pyarrow.parquet")
        meta = read_meta(directory)
        if not os.path.exists(os.path.join(directory, FLAT)):
            raise FileNotFoundError(f"{directory} is not an index (no {FLAT}): build it with python -m blip2 index")
        rows = pq.ParquetFile(os.path.join(directory, ROWS))
        generation = (rows.schema_arrow.metadata or {}).get(GENERATION)
        if (generation and generation.decode()) != meta.get("generation"):
            raise ValueError(f"{directory}: {ROWS} and {FLAT} are from different runs (an index run stopped between "
                             f"writing them). Fix: run python -m blip2 index on the same images with --out "
                             f"{directory} again; it rebuilds {FLAT} without computing any image again")
        table = rows.read(columns=["path", "caption", "error"])
        table = table.filter(table["error"].is_null())
        flat = faiss.read_index(os.path.join(directory, FLAT))
        if flat.d != meta["dim"]:
            raise ValueError(f"{directory}: {FLAT} holds vectors of {flat.d} dimensions, {META} says {meta['dim']}: "
                             f"run python -m blip2 index with --out {directory} again")
        return cls(flat, meta["num_query_tokens"], table["path"].to_pylist(), table["caption"].to_pylist(),
                   directory, model_path(meta["model"]))

    def __len__(self):
        return len(self.paths)

    def search(self, text: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact: the k best images for a normalised (E,) text embedding -> (ids, best-query cosines)."""
        scores = best_query_scores(self.embeddings, np.asarray(text, np.float32))
        return top_k(np.arange(len(scores)), scores, k)

    def build_approx(self, nlist: int | None = None):
        """An IVF index over each image's pooled embedding (the mean of its queries, normalised); its candidates
        are re-scored exactly. Kept in the index folder as approx.faiss (indexing again removes it)."""
        faiss = need("faiss")
        path = os.path.join(self.directory, APPROX) if self.directory else None
        if path and os.path.exists(path):
            self.approx = faiss.read_index(path)
            return self.approx
        self.approx = ivf_pooled(self.embeddings, nlist)
        if path:
            faiss.write_index(self.approx, path)
        return self.approx

    def search_approx(self, text: np.ndarray, k: int, candidates: int = 200, nprobe: int = 16):
        """Approximate: the `candidates` best images by pooled embedding (IVF, `nprobe` lists), re-scored exactly."""
        if self.approx is None:
            self.build_approx()
        faiss = need("faiss")
        self.approx.nprobe = nprobe
        text = np.asarray(text, np.float32)
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # one query: a team of threads only adds waiting
        try:
            _, ids = self.approx.search(text[None], max(candidates, k))
        finally:
            faiss.omp_set_num_threads(threads)
        ids = np.unique(ids[0][ids[0] >= 0])
        return top_k(ids, best_query_scores(self.embeddings[ids], text), k)


def pooled(embeddings: np.ndarray) -> np.ndarray:
    """(N, Q, E) -> (N, E): each image's mean query embedding, normalised."""
    m = embeddings.mean(1)
    return np.ascontiguousarray(m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12), np.float32)


def ivf_pooled(embeddings: np.ndarray, nlist: int | None = None):
    faiss = need("faiss")
    vectors = pooled(embeddings)
    n, e = vectors.shape
    nlist = nlist or max(1, min(int(np.sqrt(n)), n // 39))  # faiss wants >= 39 training points per list
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(e), e, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(vectors)
    ivf.add(vectors)
    return ivf


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return len(set(found.tolist()) & set(exact.tolist())) / max(len(exact), 1)


def text_embedding(runner: Blip2Runner, text: str) -> np.ndarray:
    """The normalised (E,) ITC embedding of a text (the runner's retrieval model)."""
    return runner.itc_texts([text])[0].float().cpu().numpy()


def rerank(runner: Blip2Runner, index: ImageIndex, ids, itc, text: str, top: int) -> list[Hit]:
    """Hits for ranked ids: the first `top` re-ranked by ITM log-odds + ITC cosine on the image files (the app's
    ranking: Blip2Runner.rerank), the rest in ITC order."""
    paths = [index.paths[i] for i in ids]
    hits = []
    for r in runner.rerank(paths, text, itc, top):
        i = ids[r.index]
        score = None if r.itm is None else match_score(r.itm, r.itc)
        hits.append(Hit(index.paths[i], r.itc, r.itm, score, index.captions[i]))
    return hits


def search_command(runner: Blip2Runner, directory: str, text: str, k: int = 10, top: int = 0, approx=False,
                   candidates: int = 200, nprobe: int = 16) -> tuple[list[Hit], str]:
    """What `python -m blip2 search` does -> (hits, a note on timing and, with `approx`, recall)."""
    if k < 1 or top < 0:
        raise ValueError(f"-k must be >= 1 and --rerank >= 0, got {k} and {top}")
    index = ImageIndex.load(directory)
    if not len(index):
        raise ValueError(f"{directory} holds no image that could be indexed")
    cfg = runner.itm_model.config
    if (cfg.num_query_tokens, cfg.image_text_hidden_size) != index.embeddings.shape[1:]:
        raise ValueError(f"{directory} holds vectors of {index.embeddings.shape[1:]} (queries, dimensions); the "
                         f"retrieval model's are {(cfg.num_query_tokens, cfg.image_text_hidden_size)}: search with "
                         f"the model the folder was indexed with ({index.model})")
    t = text_embedding(runner, text)
    start = time.perf_counter()
    ids, scores = index.search(t, max(k, top))
    exact_ms = 1000 * (time.perf_counter() - start)
    note = f"{len(index)} images; exact search {exact_ms:.1f} ms"
    if approx:
        index.build_approx()
        start = time.perf_counter()
        found, found_scores = index.search_approx(t, max(k, top), candidates, nprobe)
        note += (f"; approximate {1000 * (time.perf_counter() - start):.1f} ms, recall@{len(ids)} "
                 f"{recall(found, ids):.2f} against exact")
        ids, scores = found, found_scores
    return rerank(runner, index, ids, scores, text, top)[:k], note
