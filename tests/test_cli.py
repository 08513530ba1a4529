"""python -m blip2 caption | ask | match on tiny checkpoint directories with tokenizers."""

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tiny_checkpoints import shared_checkpoint

import blip2
from blip2.__main__ import main
from blip2.processing import Blip2Processor
from blip2.runner import Blip2Runner

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (30, 40, 3), dtype=np.uint8)).save(path)
    return str(path)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def runner(family):
    path = shared_checkpoint(family)
    return Blip2Runner(blip2.Blip2ForConditionalGeneration.from_pretrained(path), Blip2Processor.from_pretrained(path))


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_caption_and_ask(capsys, photo, family):
    model = shared_checkpoint(family)
    code, out, _ = run(capsys, "caption", photo, photo, "--model", model, "--max-new-tokens", 5, "--json")
    records = json.loads(out)
    expected = runner(family).caption(photo, max_new_tokens=5, min_new_tokens=1).text  # the CLI's (the app's) min
    assert code == 0 and [r["text"] for r in records] == [expected] * 2 and records[0]["image"] == photo
    code, out, _ = run(capsys, "ask", photo, "what is it?", "--model", model, "--num-beams", 3,
                       "--num-return-sequences", 2, "--max-new-tokens", 4, "--length-penalty", 0.5, "--json")
    record = json.loads(out)
    expected = runner(family).ask(photo, "what is it?", num_beams=3, num_return_sequences=2, max_new_tokens=4,
                                  length_penalty=0.5, min_new_tokens=1)
    answer = "Short answer:" if family == "t5" else "Answer:"  # Flan-T5 is asked for a short answer, as in the app
    assert code == 0 and record["texts"] == expected.texts and record["prompt"] == f"Question: what is it? {answer}"
    code, out, _ = run(capsys, "caption", photo, "--model", model, "--do-sample", "--seed", 3, "--top-k", 5,
                       "--temperature", 1.5, "--top-p", 0.9, "--repetition-penalty", 1.2, "--no-repeat-ngram-size", 2,
                       "--min-new-tokens", 2, "--max-new-tokens", 6)
    again = run(capsys, "caption", photo, "--model", model, "--do-sample", "--seed", 3, "--top-k", 5,
                "--temperature", 1.5, "--top-p", 0.9, "--repetition-penalty", 1.2, "--no-repeat-ngram-size", 2,
                "--min-new-tokens", 2, "--max-new-tokens", 6)
    assert code == 0 and (code, out) == again[:2]


def test_match(capsys, photo):
    code, out, _ = run(capsys, "match", photo, "a cat", "a dog", "--itm-model", shared_checkpoint("itm"), "--json")
    records = json.loads(out)
    assert code == 0 and [r["text"] for r in records] == ["a cat", "a dog"]
    assert all(0 <= r["itm"] <= 1 and -1 <= r["itc"] <= 1 for r in records)
    code, out, _ = run(capsys, "match", photo, "a cat", "--itm-model", shared_checkpoint("itm"))
    assert code == 0 and out.startswith("itm ") and out.rstrip().endswith("a cat")


def test_errors_say_what_to_fix(capsys, photo):
    model = shared_checkpoint("opt")
    code, _, err = run(capsys, "caption", photo, "--model", model, "--do-sample", "--temperature", 0)
    assert code == 2 and "temperature" in err
    code, _, err = run(capsys, "caption", photo, "--model", model, "--num-beams", 2, "--num-return-sequences", 3)
    assert code == 2 and "num_return_sequences" in err
    code, _, err = run(capsys, "caption", str(photo) + ".missing", "--model", model)
    assert code == 2 and "missing" in err
    code, _, err = run(capsys, "caption", photo, "--model", str(photo) + ".nodir")
    assert code == 2 and "nodir" in err



def test_default_is_the_embedded_model(capsys, tmp_path, monkeypatch):
    from blip2.train.world import make_split

    scene = make_split("test", 1, seed=11)[0]
    path = tmp_path / "scene.png"
    scene.render(224).save(path)
    code, out, _ = run(capsys, "caption", path, "--max-new-tokens", 30)
    assert (code, out) == (0, scene.caption() + "\n")  # its captions of its world are exact
    import blip2.__main__ as cli

    monkeypatch.setattr(cli, "DEFAULT_MODEL", str(tmp_path / "gone"))
    code, _, err = run(capsys, "caption", path)
    assert code == 2 and "the embedded model" in err and "pass --model" in err


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "blip2", "caption", "--help"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert out.returncode == 0 and "--num-beams" in out.stdout and "--quantize" in out.stdout


def test_decoding_defaults_are_the_apps():
    """A caption from `python -m blip2 caption` and from the app's Caption tab get the same settings (30 new
    tokens, at least 1); an answer those of the Chat tab (20)."""
    from app import caption, chat
    from blip2.__main__ import parser

    for command, handler in ((["caption", "x.png"], caption.CaptionTab.caption), (["ask", "x.png", "what?"],
                                                                                 chat.ChatTab.chat)):
        args = parser().parse_args(command)
        defaults = inspect.signature(handler).parameters  # the app's API and its controls start here
        assert (args.max_new_tokens, args.min_new_tokens) == (defaults["max_new_tokens"].default,
                                                              defaults["min_new_tokens"].default)
    assert parser().parse_args(["caption", "x.png"]).max_new_tokens == 30


def test_more_new_tokens_than_positions_are_lowered_as_in_the_app(capsys, photo):
    """The runner fits the context once for the CLI and the app: an OPT asked for more new tokens than its positions
    leave gets what they leave, and the CLI says so."""
    model = shared_checkpoint("opt")
    r = runner("opt")
    room = r.context_size - r.model.config.num_query_tokens - len(r.processor.tokenizer.encode_plain(""))
    code, out, _ = run(capsys, "caption", photo, "--model", model, "--max-new-tokens", room + 50, "--json")
    record = json.loads(out)[0]
    assert code == 0 and record["max_new_tokens"] == room and not record["truncated"]
    assert record["text"] == r.caption(photo, max_new_tokens=room, min_new_tokens=1).text
    code, out, _ = run(capsys, "caption", photo, "--model", model, "--max-new-tokens", room + 50)
    assert f"(max new tokens lowered to {room}:" in out
