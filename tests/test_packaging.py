"""`pip install .` (not editable) and a built wheel: the `blip2` command and the app's registry find the embedded
models inside the installed package, from any working directory (blip2.catalogue.EMBEDDED_MODELS, package data)."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import app_support as S

from blip2 import native

ROOT = Path(S.ROOT)
SOURCES = ["pyproject.toml", "README.md", "requirements.txt", "requirements-scale.txt", "blip2", "app"]


def run(*command, cwd):
    done = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_a_wheel_installed_in_a_fresh_environment_runs_the_embedded_model(tmp_path):
    source = tmp_path / "source"  # a copy of the checkout: the build writes build/ and *.egg-info beside it
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    venv = tmp_path / "venv"  # torch, gradio, ... come from this interpreter's site-packages
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv, cwd=tmp_path)  # their pip too
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source,
        cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("blip2_studio-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for model in ("blip2-tiny", "blip2-tiny-itm"):
        assert {f"blip2/assets/{model}/{f}" for f in ("config.json", "model.safetensors", "tokenizer.json")} <= names
    assert {f"blip2/kernels/{f.name}" for f in native.SOURCES + native.HEADERS} <= names  # built on first use
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", wheel, cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"  # neither the checkout nor the source copy is on the path here
    elsewhere.mkdir()
    image, scene = elsewhere / "scene.png", S.one_object_scenes(1)[0]
    image.write_bytes(S.png_bytes(scene.render(224)))
    where = run(python, "-c", "import blip2, app; print(blip2.__file__); print(app.__file__)", cwd=elsewhere)
    assert all(line.startswith(str(venv)) for line in where.split()), where  # the installed copy, not the checkout
    installed = json.loads(run(venv / "bin" / "blip2", "caption", image, "--json", cwd=elsewhere))
    checkout = json.loads(run(sys.executable, "-m", "blip2", "caption", image, "--json", cwd=ROOT))
    assert installed == checkout and installed[0]["text"] == scene.caption()  # the embedded model, found and run
    registry = ("from app.registry import EMBEDDED, Registry; from app.config import Limits; "
                "import os; r = Registry(limits=Limits()); "
                "print(all(os.path.isdir(p) for _, p in r.catalogue[EMBEDDED].sources))")
    assert run(python, "-c", registry, cwd=elsewhere).strip() == "True"  # python app.py's default models
