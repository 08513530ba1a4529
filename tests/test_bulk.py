"""python -m blip2 caption PATH... --out: file discovery, batched captions equal to the one-by-one path, resumable
output, broken files recorded."""

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tiny_checkpoints import shared_checkpoint
from world_files import GEN, ITM, write_scenes

import blip2
from blip2.__main__ import main
from blip2.bulk import Rows, caption_job, caption_rows, caption_schema, each_or_alone, find_images, load_runner
from blip2.processing import Blip2Processor
from blip2.runner import Blip2Runner

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runner():
    return load_runner(GEN)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """120 scenes and two broken files: text named .jpg, a PNG cut in half."""
    d = tmp_path_factory.mktemp("scenes")
    paths, scenes = write_scenes(d, 120)
    (d / "broken.jpg").write_bytes(b"not an image")
    data = Path(paths[1]).read_bytes()
    (d / "truncated.png").write_bytes(data[:len(data) // 2])
    return d, paths, scenes


def rows_of(out):
    if out.endswith(".parquet"):
        return pq.read_table(out).to_pylist()
    return [json.loads(line) for line in open(out)]


def test_find_images(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/x.png", "a/y.JPG", "a/notes.md", "z.png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "list.txt").write_text("# two files\na/x.png\n\nz.png\n")

    def abs_(*names):
        return [str(tmp_path / x) for x in names]

    assert find_images([tmp_path / "a"]) == abs_("a/x.png", "a/y.JPG")
    assert find_images([str(tmp_path / "*.png"), tmp_path / "a" / "x.png"]) == abs_("a/x.png", "z.png")
    assert find_images([tmp_path / "list.txt"]) == abs_("a/x.png", "z.png")
    with pytest.raises(FileNotFoundError, match="missing"):
        find_images([tmp_path / "missing"])
    with pytest.raises(FileNotFoundError, match="matches no file"):
        find_images([str(tmp_path / "*.gif")])


def test_captions_equal_one_by_one_and_broken_files_are_recorded(runner, collection, tmp_path):
    d, paths, _ = collection
    out = str(tmp_path / "captions.parquet")
    summary = caption_job(runner, [d], out, batch_size=16, progress=False)
    rows = {r["path"]: r for r in rows_of(out)}
    assert (summary.done, summary.failed, summary.skipped) == (122, 2, 0)
    assert not os.path.exists(out + ".parts")
    broken, truncated = rows[str(d / "broken.jpg")], rows[str(d / "truncated.png")]
    assert "cannot identify image" in broken["error"] and broken["caption"] is None
    assert truncated["error"] and truncated["caption"] is None
    fresh = load_runner(GEN)  # one by one, a runner that has seen none of them
    one = [fresh.caption(p).text for p in paths]
    assert [rows[p]["caption"] for p in paths] == one
    assert all(rows[p]["error"] is None and (rows[p]["width"], rows[p]["height"]) == (96, 96) for p in paths)


def test_a_failing_batch_fails_only_its_bad_items():
    def work(items):
        if any(name == "bad" for name, _ in items):
            raise RuntimeError("the model cannot take this one")
        return [{"path": name, "error": None} for name, _ in items]

    rows = each_or_alone([("a", None), ("bad", None), ("c", None)], work)
    assert rows == [{"path": "a", "error": None},
                    {"path": "bad", "error": "RuntimeError: the model cannot take this one"},
                    {"path": "c", "error": None}]


@pytest.mark.parametrize("family", ["embedded", "opt", "t5"])
def test_left_padded_batches_equal_one_by_one(collection, family):
    """Prompts of different lengths in one batch (left padding), greedy with penalties and beam search."""
    path = GEN if family == "embedded" else shared_checkpoint(family)

    def make():
        model = blip2.Blip2ForConditionalGeneration.from_pretrained(path)
        return Blip2Runner(model, Blip2Processor.from_pretrained(path))

    batched, images = make(), collection[1][:12]
    prompts = ["", "a photo of", "Question: how many shapes are there? Answer:"] * 4
    for decoding in ({"max_new_tokens": 12, "repetition_penalty": 1.3, "no_repeat_ngram_size": 3},
                     {"max_new_tokens": 8, "num_beams": 3, "num_return_sequences": 2, "length_penalty": 0.5}):
        one = make()
        expected = [one.caption(i, p, **decoding) for i, p in zip(images, prompts)]
        got = batched.caption_batch(images, prompts, **decoding)
        assert [g.texts for g in got] == [e.texts for e in expected]
        assert [(g.prompt, g.truncated) for g in got] == [(e.prompt, e.truncated) for e in expected]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_resume_does_only_what_is_new(runner, collection, tmp_path, suffix):
    d, paths, _ = collection
    out = str(tmp_path / ("captions" + suffix))
    first = tmp_path / "first.txt"
    first.write_text("\n".join(paths[:40]))
    assert caption_job(runner, [first], out, batch_size=16, progress=False).done == 40
    # a run that stopped after journaling one batch: its rows count, the output is written whole at the end
    rows = Rows(out, caption_schema() if suffix == ".parquet" else None)
    rows.add(caption_rows(runner, paths[40:50]))
    summary = caption_job(runner, [d], out, batch_size=16, progress=False)
    assert (summary.done, summary.skipped) == (72, 50)  # the other 70 scenes and the 2 broken files
    fresh = str(tmp_path / ("fresh" + suffix))
    caption_job(runner, [d], fresh, batch_size=32, progress=False)
    assert rows_of(out) == rows_of(fresh)
    assert caption_job(runner, [d], out, progress=False).done == 2  # only the broken files are tried again


def test_cli(collection, tmp_path, capsys):
    _, paths, _ = collection
    subset = tmp_path / "subset"
    subset.mkdir()
    for p in paths[:6]:
        shutil.copy(p, subset)
    out = str(tmp_path / "c.jsonl")
    code = main(["caption", str(subset), "--out", out, "--batch-size", "4", "--max-new-tokens", "30", "--no-progress"])
    stdout = capsys.readouterr().out
    assert code == 0 and "6 images" in stdout and "0 failed" in stdout
    expected = load_runner(GEN).caption_batch(sorted(str(p) for p in subset.iterdir()), max_new_tokens=30)
    assert [r["caption"] for r in rows_of(out)] == [g.text for g in expected]
    code = main(["caption", str(subset)])
    assert code == 2 and "--out" in capsys.readouterr().err
    code = main(["caption", str(subset), "--out", str(tmp_path / "c.csv")])
    assert code == 2 and ".parquet or .jsonl" in capsys.readouterr().err
    code = main(["caption", str(subset), "--out", out, "--do-sample", "--temperature", "0"])
    assert code == 2 and "temperature" in capsys.readouterr().err


def test_missing_extras_name_the_install_command(monkeypatch, tmp_path, capsys):
    for module in ("pyarrow", "faiss", "ray"):
        monkeypatch.setitem(__import__("sys").modules, module, None)  # as if not installed
    code = main(["caption", str(tmp_path), "--out", str(tmp_path / "c.parquet")])
    assert code == 2 and "pip install -r requirements-scale.txt" in capsys.readouterr().err
    code = main(["search", str(tmp_path), "a cat", "--itm-model", ITM])
    assert code == 2 and "faiss" in capsys.readouterr().err
    from blip2.distributed import ray_rows

    with pytest.raises(ImportError, match="requirements-scale.txt"):
        next(ray_rows(None, caption_rows, ["x.png"], 1))
