"""python -m blip2 index / search: ITC embeddings of every query in Parquet + faiss, exact max-over-queries search
equal to a brute-force scan, ITM re-ranking, incremental updates."""

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from world_files import GEN, ITM, write_scenes

from blip2.__main__ import main
from blip2.bulk import load_runner
from blip2.config import read_json
from blip2.index import ImageIndex, best_query_scores, index_job, recall, rerank, text_embedding, top_k

N = 200

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runner():
    return load_runner(GEN, ITM)


@pytest.fixture(scope="module")
def built(tmp_path_factory, runner):
    """N scenes, indexed with captions."""
    d = tmp_path_factory.mktemp("scenes")
    paths, scenes = write_scenes(d, N)
    out = str(d / "index")
    summary = index_job(runner, [d], out, ITM, batch_size=32, captions=True, progress=False)
    assert (summary.done, summary.failed) == (N, 0)
    return out, paths, scenes


def scene_of(path, paths, scenes):
    return scenes[paths.index(path)]


def test_rows_and_files(built, runner):
    out, paths, _ = built
    table = pq.read_table(os.path.join(out, "images.parquet")).to_pylist()
    assert [r["path"] for r in table] == sorted(paths)
    r = table[0]
    assert len(r["hash"]) == 32 and r["bytes"] == os.path.getsize(r["path"]) and (r["width"], r["height"]) == (96, 96)
    assert r["caption"] == runner.caption(r["path"]).text
    expected = runner.itc_images([r["path"]])[0].numpy()  # (Q, E), the one-by-one path
    assert np.array_equal(np.asarray(r["embedding"], np.float32).reshape(expected.shape), expected)
    assert read_json(os.path.join(out, "meta.json")) == {"model": os.path.abspath(ITM), "num_query_tokens": 32,
                                                               "dim": 64}


def test_search_finds_each_scene_by_its_caption(built, runner):
    out, paths, scenes = built
    index = ImageIndex.load(out)
    hits, reranked, approx = 0, 0, []
    for i, s in enumerate(scenes):
        text = text_embedding(runner, s.caption())
        ids, itc = index.search(text, 10)
        found = [scene_of(index.paths[j], paths, scenes).caption() for j in ids]
        hits += found[0] == s.caption()  # a scene with the same objects is as good a hit
        if i % 10 == 0:  # ITM re-ranking of the top 5 on a sample (it reads the image files)
            top = rerank(runner, index, ids, itc, s.caption(), 5)
            reranked += scene_of(top[0].path, paths, scenes).caption() == s.caption()
            assert all(h.score is not None for h in top[:5]) and all(h.score is None for h in top[5:])
        approx.append(recall(index.search_approx(text, 10, candidates=20, nprobe=2)[0], ids))
    # measured: 200 of 200 by ITC, 20 of 20 re-ranked, mean approximate recall@10 0.86 (20 candidates, 2 of 5 lists)
    assert hits >= 0.95 * N
    assert reranked >= 18
    assert np.mean(approx) >= 0.75


def brute_force(embeddings, text, k):
    """The reference ranking: every image's best-query score, fully sorted (ties by id)."""
    scores = best_query_scores(embeddings, text)
    ids = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return ids, scores[ids]


def faiss_flat(index, text, k):
    """faiss' own flat search: the k best images are the first k distinct images among its top k * Q vectors."""
    q = index.embeddings.shape[1]
    scores, vectors = index.flat.search(text[None], k * q)
    _, first = np.unique(vectors[0] // q, return_index=True)
    first = np.sort(first)[:k]
    return vectors[0][first] // q, scores[0][first]


def test_flat_search_equals_brute_force(built, runner):
    out, _, scenes = built
    index = ImageIndex.load(out)
    rng = np.random.default_rng(0)
    random = rng.normal(size=(20, index.embeddings.shape[2])).astype(np.float32)
    texts = [text_embedding(runner, s.caption()) for s in scenes[:50]] + list(random / np.linalg.norm(random, axis=1,
                                                                                                        keepdims=True))
    for text in texts:
        for k in (1, 10, N):
            ids, scores = index.search(text, k)
            ref_ids, ref_scores = brute_force(index.embeddings, text, k)
            assert ids.tolist() == ref_ids.tolist() and scores.tolist() == ref_scores.tolist()
            flat_ids, flat_scores = faiss_flat(index, text, k)
            assert flat_ids.tolist() == ref_ids.tolist()
            np.testing.assert_allclose(flat_scores, ref_scores, rtol=0, atol=1e-6)  # other float32 sums of 64 terms
    tied = np.array([0.5, 0.9, 0.5, 0.5, 0.1], np.float32)  # ties at the k-th place: the lower ids win
    assert top_k(np.arange(5), tied, 3)[0].tolist() == [1, 0, 2]
    assert top_k(np.array([3, 2, 1, 0, 4]), tied, 3)[0].tolist() == [2, 0, 1]


def test_incremental(tmp_path, built, runner):
    _, paths, _ = built
    d, out = tmp_path / "photos", str(tmp_path / "index")
    d.mkdir()
    for p in paths[:30]:
        shutil.copy(p, d)
    files = sorted(d.iterdir())
    listed = tmp_path / "first.txt"
    listed.write_text("\n".join(str(f) for f in files[:20]))
    assert index_job(runner, [listed], out, ITM, progress=False).done == 20
    before = {r["path"]: r for r in pq.read_table(os.path.join(out, "images.parquet")).to_pylist()}
    summary = index_job(runner, [d], out, ITM, progress=False)
    assert (summary.done, summary.skipped) == (10, 20)
    os.utime(files[0], ns=(1, 1))  # touched: same content, nothing to compute
    shutil.copy(files[1], d / "copy.png")  # a copy: its row is reused
    shutil.copy(paths[100], files[2])  # new content under an old name: computed again
    os.remove(files[3])  # gone: dropped
    (d / "broken.png").write_bytes(b"\x89PNG broken")
    summary = index_job(runner, [d], out, ITM, progress=False)
    assert (summary.done, summary.failed) == (2, 1)  # files[2] and the broken file
    rows = {r["path"]: r for r in pq.read_table(os.path.join(out, "images.parquet")).to_pylist()}
    assert str(files[3]) not in rows and rows[str(d / "broken.png")]["error"]
    assert rows[str(d / "copy.png")]["embedding"] == before[str(files[1])]["embedding"]
    assert rows[str(files[0])]["embedding"] == before[str(files[0])]["embedding"]
    assert rows[str(files[0])]["mtime_ns"] == 1
    assert rows[str(files[2])]["hash"] != before[str(files[2])]["hash"]
    index = ImageIndex.load(out)
    assert len(index) == 30 and index.flat.ntotal == 30 * 32 and str(d / "broken.png") not in index.paths
    with pytest.raises(ValueError, match="indexed with"):
        index_job(runner, [d], out, "another/model", progress=False)


def test_cli(built, tmp_path, capsys):
    _, paths, scenes = built
    out = str(tmp_path / "index")
    assert main(["index", *paths[:12], "--out", out, "--no-progress"]) == 0
    assert "12 images" in capsys.readouterr().out
    text = scenes[5].caption()
    assert main(["search", out, text, "-k", "3", "--rerank", "4", "--json"]) == 0
    captured = capsys.readouterr()
    hits = json.loads(captured.out)
    assert len(hits) == 3 and hits[0]["path"] == paths[5] and hits[0]["itm"] is not None
    assert "12 images; exact search" in captured.err
    assert main(["search", out, text, "-k", "2", "--approx"]) == 0
    captured = capsys.readouterr()
    assert "recall@2" in captured.err and paths[5] in captured.out.splitlines()[0]
    assert main(["search", str(tmp_path), text]) == 2 and "not an index" in capsys.readouterr().err
