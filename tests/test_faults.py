"""The collection tools under faults (python -m blip2 caption --out / index / search): two runs on one output, kills
inside a write (child processes that SIGKILL themselves there: bench.faults), a partial or bad JSON line, a kill
between the index's renames, symlink loops, broken links, vanished files and FIFOs, Ctrl-C, the wrong model or a
damaged meta.json at search, formats the loader refuses, huge images."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from world_files import GEN, ITM, write_scenes

from bench.faults import child_command, child_env
from blip2 import index as index_module
from blip2.__main__ import main
from blip2.bulk import IMAGE_SUFFIXES, batches, caption_job, load_runner
from blip2.images import ACCEPTED_FORMATS
from blip2.index import ImageIndex, index_job

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 40


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    d = tmp_path_factory.mktemp("scenes")
    paths, _ = write_scenes(d, N, size=64)
    return d, sorted(paths)


@pytest.fixture(scope="module")
def runner():
    return load_runner(GEN, ITM)


def out_rows(out):
    if out.endswith(".jsonl"):
        return [json.loads(line) for line in open(out)]
    return pq.read_table(out).to_pylist()


def exactly_once(rows, paths):
    seen = [r["path"] for r in rows]
    return sorted(seen) == sorted(paths) and all(r["error"] is None for r in rows)


def child(fault, *args, **kw):
    return subprocess.Popen(child_command(fault, [*args, "--no-progress"]), cwd=ROOT, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for(cond, proc, seconds=240):
    deadline = time.monotonic() + seconds
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("command", ["caption", "index"])
def test_a_second_run_on_the_same_output_is_refused(scenes, tmp_path, capsys, command):
    """Run A is stopped (SIGSTOP) after its first journaled batch; run B on the same output is refused with a
    message naming the holder; A then finishes with every image exactly once (B once deleted A's journal)."""
    d, paths = scenes
    out = str(tmp_path / ("c.parquet" if command == "caption" else "photos.index"))
    parts = out + ".parts" if command == "caption" else os.path.join(out, "images.parquet.parts")
    a = child("none", command, str(d), "--out", out, "--batch-size", "2")
    try:
        wait_for(lambda: os.path.isdir(parts) and os.listdir(parts), a)
        a.send_signal(signal.SIGSTOP)
        assert main([command, str(d), "--out", out, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "is being written by another run (pid" in err and "write to another --out" in err
    finally:
        a.send_signal(signal.SIGCONT)
    assert a.wait(timeout=300) == 0, a.communicate()
    rows = out_rows(out if command == "caption" else os.path.join(out, "images.parquet"))
    assert exactly_once(rows, paths)


@pytest.mark.parametrize("suffix,fault", [(".parquet", "write:3"), (".jsonl", "line:3"), (".parquet", "after:1:c"),
                                          (".jsonl", "after:1:c")])
def test_a_run_killed_inside_a_write_resumes(scenes, tmp_path, caplog, suffix, fault):
    """SIGKILL inside the 3rd batch's write (a half-written part / half a JSON batch: once, every rerun failed
    with "Parquet magic bytes not found" or a JSON error), or just after the output was written whole (its journal
    still there): the rerun finishes, every image exactly once, nothing temporary left."""
    d, paths = scenes
    out = str(tmp_path / f"c{suffix}")
    fault = fault.replace(":c", f":c{suffix}")
    a = child(fault, "caption", str(d), "--out", out, "--batch-size", "4")
    assert a.wait(timeout=300) == -signal.SIGKILL, a.communicate()
    assert main(["caption", str(d), "--out", out, "--no-progress"]) == 0
    if fault.startswith("line"):
        assert f"{out}: removed a partial last line" in caplog.text
    assert exactly_once(out_rows(out), paths)
    assert sorted(os.listdir(tmp_path)) == [f"c{suffix}", f"c{suffix}.lock"]


def test_a_bad_json_line_is_named_by_file_and_line(scenes, tmp_path, capsys):
    d, paths = scenes
    out = str(tmp_path / "c.jsonl")
    assert main(["caption", *paths[:3], "--out", out, "--no-progress"]) == 0
    lines = open(out).read().splitlines()
    lines.insert(1, '{"path": "x", "capt')
    open(out, "w").write("\n".join(lines) + "\n")
    assert main(["caption", str(d), "--out", out, "--no-progress"]) == 2
    assert f"error: {out}, line 2: not a JSON row" in capsys.readouterr().err


def test_an_index_killed_between_its_renames_is_refused_then_repaired(scenes, runner, tmp_path, capsys):
    """images.parquet replaced, index.faiss not yet, the image count unchanged: search refuses the pair (it once
    served the old vectors under the new paths), and indexing again repairs it."""
    _, paths = scenes
    d, out = tmp_path / "photos", str(tmp_path / "photos.index")
    d.mkdir()
    for p in paths[:12]:
        shutil.copy(p, d)
    index_job(runner, [d], out, ITM, progress=False)
    for i, p in enumerate(sorted(d.iterdir())[:6]):  # new content under old names: the same count
        shutil.copy(paths[20 + i], p)
    a = child("after:1:images.parquet", "index", str(d), "--out", out)
    assert a.wait(timeout=300) == -signal.SIGKILL, a.communicate()
    assert main(["search", out, "a red circle"]) == 2
    assert "images.parquet and index.faiss are from different runs" in capsys.readouterr().err
    assert main(["index", str(d), "--out", out, "--no-progress"]) == 0
    index = ImageIndex.load(out)
    table = pq.read_table(os.path.join(out, "images.parquet"))
    vectors = np.asarray(table["embedding"].to_pylist(), np.float32).reshape(index.embeddings.shape)
    assert np.array_equal(index.embeddings, vectors)
    assert main(["search", out, "a red circle"]) == 0


def odd_folder(scenes, tmp_path):
    """Five scenes, a symlink loop, a dangling link and a FIFO, all named .png."""
    _, paths = scenes
    d = tmp_path / "odd"
    d.mkdir()
    for p in paths[:5]:
        shutil.copy(p, d)
    os.symlink("loop.png", d / "loop.png")
    os.symlink(tmp_path / "nowhere.png", d / "dangling.png")
    os.mkfifo(d / "fifo.png")
    return d


@pytest.mark.parametrize("command", ["caption", "index"])
def test_links_loops_and_fifos_are_error_rows(scenes, tmp_path, command):
    """In a child with a time limit (a FIFO once hung both commands forever; index aborted on a link)."""
    d = odd_folder(scenes, tmp_path)
    out = str(tmp_path / ("c.parquet" if command == "caption" else "photos.index"))
    r = subprocess.run([sys.executable, "-m", "blip2", command, str(d), "--out", out, "--no-progress"], cwd=ROOT,
                       env=child_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = {os.path.basename(r["path"]): r for r in out_rows(out if command == "caption" else
                                                                os.path.join(out, "images.parquet"))}
    assert len(rows) == 8 and sum(r["error"] is None for r in rows.values()) == 5
    assert "Too many levels of symbolic links" in rows["loop.png"]["error"]
    assert "No such file" in rows["dangling.png"]["error"]
    assert "is a FIFO (named pipe), not a regular file" in rows["fifo.png"]["error"]


def test_a_file_gone_between_the_scan_and_the_read_is_an_index_error_row(scenes, runner, tmp_path, monkeypatch):
    _, paths = scenes
    d = tmp_path / "photos"
    d.mkdir()
    for p in paths[:4]:
        shutil.copy(p, d)
    scan = index_module.find_images

    def scan_then_delete(args):
        found = scan(args)
        os.remove(found[1])
        return found

    monkeypatch.setattr(index_module, "find_images", scan_then_delete)
    summary = index_job(runner, [d], str(tmp_path / "photos.index"), ITM, progress=False)
    assert (summary.done, summary.failed) == (4, 1)


def test_ctrl_c_ends_with_one_line_and_130(scenes, tmp_path):
    d, paths = scenes
    out = str(tmp_path / "c.parquet")
    a = child("none", "caption", str(d), "--out", out, "--batch-size", "2")
    wait_for(lambda: os.path.isdir(out + ".parts") and os.listdir(out + ".parts"), a)
    a.send_signal(signal.SIGINT)
    _, err = a.communicate(timeout=120)
    assert a.returncode == 130
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"interrupted: {out} keeps every finished batch; run the same command "
                                            "again to resume")
    assert main(["caption", str(d), "--out", out, "--no-progress"]) == 0
    assert exactly_once(out_rows(out), paths)


@pytest.fixture(scope="module")
def small_index(scenes, runner, tmp_path_factory):
    _, paths = scenes
    out = str(tmp_path_factory.mktemp("idx") / "photos.index")
    index_job(runner, paths[:8], out, ITM, progress=False)
    return out


def test_search_refuses_another_model_than_the_indexed_one(small_index, tmp_path, capsys):
    """A copy of the retrieval model elsewhere (same dimensions: once ranked silently with it)."""
    other = tmp_path / "other-itm"
    shutil.copytree(os.path.join(ROOT, ITM), other)
    assert main(["search", small_index, "a red circle", "--itm-model", str(other)]) == 2
    err = capsys.readouterr().err
    assert "was indexed with embedded:blip2-tiny-itm" in err and "drop --itm-model" in err
    assert main(["search", small_index, "a red circle", "--itm-model", ITM]) == 0  # the same model, named so


def test_meta_json_is_checked_and_relocatable(small_index, tmp_path, capsys):
    meta = json.load(open(os.path.join(small_index, "meta.json")))
    assert meta["model"] == "embedded:blip2-tiny-itm"  # not this checkout's absolute path
    moved = str(tmp_path / "moved.index")
    shutil.copytree(small_index, moved)
    assert main(["search", moved, "a red circle"]) == 0
    capsys.readouterr()
    for key in ("dim", "model", "num_query_tokens"):
        broken = {k: v for k, v in meta.items() if k != key}
        json.dump(broken, open(os.path.join(moved, "meta.json"), "w"))
        assert main(["search", moved, "a red circle"]) == 2
        assert f"meta.json: '{key}' is missing" in capsys.readouterr().err


def test_only_formats_the_loader_takes_are_collected(scenes, tmp_path):
    """.ppm was collected and then refused by the loader: an error row for every one."""
    assert all(Image.registered_extensions()[e] in ACCEPTED_FORMATS for e in IMAGE_SUFFIXES)
    _, paths = scenes
    Image.open(paths[0]).save(tmp_path / "a.ppm")
    shutil.copy(paths[0], tmp_path / "b.png")
    assert main(["caption", str(tmp_path), "--out", str(tmp_path / "c.jsonl"), "--no-progress"]) == 0
    assert [os.path.basename(r["path"]) for r in out_rows(str(tmp_path / "c.jsonl"))] == ["b.png"]


def test_huge_images_are_error_rows_and_batches_are_bounded(scenes, tmp_path):
    """The CLI's pixel limit (the app's default, 40 megapixels): a 7000 x 7000 PNG (a few hundred KB, 147 MB
    decoded) is an error row, never decoded; a batch holds at most BATCH_PIXELS decoded pixels."""
    _, paths = scenes
    d = tmp_path / "photos"
    d.mkdir()
    Image.new("RGB", (7000, 7000), (200, 30, 30)).save(d / "huge.png")
    shutil.copy(paths[0], d / "small.png")
    out = str(tmp_path / "c.jsonl")
    assert main(["caption", str(d), "--out", out, "--no-progress"]) == 0
    rows = {os.path.basename(r["path"]): r for r in out_rows(out)}
    assert "7000x7000 = 49.0 megapixels, over the limit of 40 megapixels" in rows["huge.png"]["error"]
    assert rows["small.png"]["error"] is None
    out = str(tmp_path / "limited.jsonl")
    assert main(["caption", str(d), "--out", out, "--no-progress", "--max-pixels", "1000"]) == 0
    assert all("over the limit of 0.001 megapixels" in r["error"] for r in out_rows(out))
    # 64 x 64 scenes (4096 pixels): a budget of 10000 decoded pixels takes two a batch
    assert [len(b) for b in batches(paths[:7], 16, max_pixels=10**6, budget=10_000)] == [2, 2, 2, 1]
    assert [len(b) for b in batches(paths[:7], 3, max_pixels=10**6)] == [3, 3, 1]


def test_caption_job_takes_a_pixel_limit(scenes, tmp_path):
    _, paths = scenes
    summary = caption_job(load_runner(GEN), paths[:3], str(tmp_path / "c.jsonl"), progress=False, max_pixels=100)
    assert (summary.done, summary.failed) == (3, 3)
