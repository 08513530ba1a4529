"""blip2's kernel cache (blip2/native.py) under faults: a shared or foreign folder is not trusted (a library planted
there never runs), a corrupt or foreign cached library is built again, and a build killed midway leaves no
temporary file behind."""

import os
import signal
import subprocess
import sys
import time

import pytest

from blip2 import native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = os.environ.get("CXX", "c++")
PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    FILE* f = fopen(getenv("PLANTED_MARKER"), "w");
    if (f) fputs("ran", f), fclose(f);
}
int blip2_isa(void) { return 2; }
int blip2_int4_mm(void) { return 0; }
int blip2_int8_mm(void) { return 0; }
"""
pytestmark = pytest.mark.skipif(not native.available(), reason="blip2's kernels cannot be built here")


def shared_object(tmp_path, source: str, name: str) -> str:
    c = tmp_path / f"{name}.c"
    c.write_text(source)
    out = tmp_path / f"{name}.so"
    subprocess.run([CXX, "-x", "c", "-shared", "-fPIC", str(c), "-o", str(out)], check=True)
    return str(out)


def kernels_in(cache, **env) -> subprocess.CompletedProcess:
    """A fresh process asking for blip2's kernels with BLIP2_KERNEL_CACHE=cache: its stdout is native.isa()."""
    code = "import logging; logging.basicConfig(); from blip2 import native; print(native.isa())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT, "BLIP2_KERNEL_CACHE": str(cache), **env})


def expected_name(tmp_path) -> str:
    return native.build(CXX, out_dir=tmp_path / "private").name


FOREIGN = ["another user's folder", "another user's library"] if os.getuid() == 0 else []  # chown needs root


@pytest.mark.parametrize("how", ["world-writable", "group-writable", *FOREIGN])
def test_a_library_planted_in_an_untrusted_cache_never_runs(tmp_path, how):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    lib = cache / expected_name(tmp_path)
    os.replace(shared_object(tmp_path, PLANTED, "planted"), lib)
    if how == "world-writable":
        os.chmod(cache, 0o1777)  # as /tmp: anyone may add files
    elif how == "group-writable":
        os.chmod(cache, 0o770)
    elif how == "another user's folder":
        os.chown(cache, 4242, -1)
    else:
        os.chown(lib, 4242, -1)
    marker = tmp_path / "marker"
    r = kernels_in(cache, PLANTED_MARKER=str(marker))
    assert r.returncode == 0, r.stderr
    assert not marker.exists()  # the planted code never ran
    assert r.stdout.strip() == ""  # PyTorch's kernels serve
    assert "could run its code here" in r.stderr and "BLIP2_KERNEL_CACHE" in r.stderr
    assert str(cache) in r.stderr or str(lib) in r.stderr


@pytest.mark.parametrize("damage", ["corrupt", "cut short", "missing symbols"])
def test_a_damaged_cached_library_is_built_again(tmp_path, damage):
    cache = tmp_path / "cache"
    lib = native.build(CXX, out_dir=cache)
    good = lib.read_bytes()
    if damage == "corrupt":
        lib.write_bytes(b"\x7fELF" + os.urandom(4000))
    elif damage == "cut short":
        lib.write_bytes(good[: len(good) // 3])
    else:
        os.replace(shared_object(tmp_path, "int something_else(void) { return 1; }", "other"), lib)
        os.chmod(lib, 0o755)
    r = kernels_in(cache)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == native.isa()  # blip2's kernels, not PyTorch's fallback
    assert "building it again" in r.stderr and str(lib) in r.stderr
    assert native.load(lib).blip2_isa() > 0


def test_a_build_killed_midway_leaves_no_temporary_file(tmp_path):
    """A compiler that is killed (with the process that ran it) while writing its output: the next build removes
    the temporary file, and the cache holds only the library."""
    cache = tmp_path / "cache"
    slow = tmp_path / "slow-c++"
    slow.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo slow 1.0; exit 0; }\n"
                    "for a; do out=$a; done\necho partial > \"$out\"\nexec sleep 600\n")
    slow.chmod(0o755)
    child = subprocess.Popen([sys.executable, "-c", "import sys, pathlib; from blip2 import native; "
                              "native.build(sys.argv[1], out_dir=pathlib.Path(sys.argv[2]))", str(slow), str(cache)],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (cache.is_dir() and any(p.name.endswith(".tmp") for p in cache.iterdir())):
        assert time.monotonic() < deadline and child.poll() is None
        time.sleep(0.1)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert [p for p in cache.iterdir() if not p.name.endswith(".so") or p.name.startswith(".")]  # left behind
    lib = native.build(CXX, out_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted([lib.name, lib.with_suffix(".sha256").name])


def test_a_library_without_the_kernels_symbols_is_named(tmp_path):
    """load() on a shared object that is not a build of blip2's kernels: an OSError naming the file, not an
    AttributeError."""
    other = shared_object(tmp_path, "int something_else(void) { return 1; }", "other")
    with pytest.raises(OSError, match="other.so is not a loadable build of blip2's kernels"):
        native.load(other)
