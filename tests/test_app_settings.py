"""What the README promises about configuring the app: every BLIP2_<LIMIT> variable takes effect, and the command
line (HOST / PORT, --threads, --no-warm-up, a local --model directory in the picker, --dtype auto)."""

import dataclasses
import time

import app_support as S
import gradio as gr
import pytest
import torch
from PIL import Image
from tiny_checkpoints import shared_checkpoint

import app.common
import app.ui
from app.config import Limits
from app.errors import RequestError
from app.registry import EMBEDDED, GENERATION, KNOWN_CHECKPOINTS, RETRIEVAL, Checkpoint, ModelSettings
from app.render import NOT_RERANKED
from app.service import Service
from app.validation import load_image

pytestmark = pytest.mark.usefixtures("one_thread")


last, refused, run_caption = S.last, S.refused, S.run_caption


# ----------------------------------------------------------------------------------------------------
# every limit variable


def _upload(svc, limits, scene_path, tmp_path):
    noise = S.png_bytes(Image.effect_noise((64, 64), 60))  # about 4 KB, over the 0.002 MB limit
    with pytest.raises(RequestError, match="the limit is 0.002 MB"):
        load_image(noise, limits)
    from app.ui import launch_kwargs

    assert launch_kwargs(svc)["max_file_size"] == "0.002mb"  # what the server refuses before the app sees it


def _pixels(svc, limits, scene_path, tmp_path):
    with pytest.raises(RequestError, match="the limit is 0.0001 megapixels"):
        load_image(S.png_bytes(S.colour_image((11, 10))), limits)
    assert load_image(S.png_bytes(S.colour_image((10, 10))), limits).image.size == (10, 10)


def _aspect(svc, limits, scene_path, tmp_path):
    refused(S.app().caption.caption, S.write(tmp_path, "wide.png", S.png_bytes(S.colour_image((30, 10)))),
            match="an aspect ratio of 3:1; the limit is 2:1")


def _work_side(svc, limits, scene_path, tmp_path):
    assert load_image(S.png_bytes(S.colour_image((64, 48))), limits).image.size == (32, 24)


def _prompt_chars(svc, limits, scene_path, tmp_path):
    app = S.app()
    refused(app.chat.chat, scene_path, "what is it now?", match="the question is 15 characters long; the limit is 10")
    refused(app.caption.caption, scene_path, "a photo of a", match="the prompt is 12 characters long; the limit is 10")


def _candidates(svc, limits, scene_path, tmp_path):
    refused(S.app().matching.match, scene_path, "a\nb\nc", match="3 texts given; the limit is 2")


def _candidate_chars(svc, limits, scene_path, tmp_path):
    refused(S.app().matching.match, scene_path, "abcdef", match="characters long; the limit is 5")


def _gallery(svc, limits, scene_path, tmp_path):
    refused(S.app().search.search, [scene_path, scene_path], "a", match="2 images given; the limit is 1 per search")


def _new_tokens(svc, limits, scene_path, tmp_path):
    refused(run_caption, scene_path, max_new_tokens=6, match="max new tokens must be between 1 and 5")


def _beams(svc, limits, scene_path, tmp_path):
    refused(run_caption, scene_path, num_beams=3, match="beams must be between 1 and 2")


def _captions(svc, limits, scene_path, tmp_path):
    refused(run_caption, scene_path, mode="nucleus sampling", num_captions=2,
            match="number of captions must be between 1 and 1")


def _beam_tokens(svc, limits, scene_path, tmp_path):
    refused(run_caption, scene_path, num_beams=2, max_new_tokens=6, match="= 12 is over the limit of 10")


def _time_limit(svc, limits, scene_path, tmp_path):
    steps = []

    def slow(module, args):
        steps.append(1)
        time.sleep(0.1)  # a slow model

    lm = svc.registry.get(svc.registry.default[GENERATION], GENERATION).model.language_model
    handle = lm.register_forward_pre_hook(slow)
    try:
        text, notice = run_caption(scene_path, max_new_tokens=100, min_new_tokens=100)
    finally:
        handle.remove()
    assert notice == "Stopped at the time limit of 0.5 s." and len(steps) < 100


def _built(svc, monkeypatch):
    """The demo build_demo makes, with the arguments it gave demo.queue."""
    from app.ui import build_demo

    queued = {}
    real = gr.Blocks.queue

    def queue(self, *args, **kwargs):
        queued.update(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(gr.Blocks, "queue", queue)
    return build_demo(svc), queued


def _queue_size(svc, limits, scene_path, tmp_path, monkeypatch):
    _, queued = _built(svc, monkeypatch)
    assert queued["max_size"] == 3  # and test_app_robustness shows a full queue refusing requests


def _concurrency(svc, limits, scene_path, tmp_path, monkeypatch):
    demo, queued = _built(svc, monkeypatch)
    model_events = [f for f in demo.fns.values() if f.concurrency_id == app.common.MODEL_CONCURRENCY_ID]
    assert len(model_events) >= 6 and {f.concurrency_limit for f in model_events} == {3}
    assert queued["default_concurrency_limit"] == 3


def _chat_turns(svc, limits, scene_path, tmp_path, monkeypatch):
    histories = []
    runner = svc.registry.get(svc.registry.default[GENERATION], GENERATION).runner
    real = runner.ask_stream
    monkeypatch.setattr(runner, "ask_stream", lambda image, question, history, **kw: histories.append(list(history))
                        or real(image, question, history, **kw))
    state = None
    for q in ("what color is the square?", "what shape is the blue object?", "how many shapes are there?"):
        conv, _, state = last(S.app().chat.chat(scene_path, q, max_new_tokens=4, history=state))
    assert [len(h) for h in histories] == [0, 1, 1]  # the prompt holds the one turn kept
    assert len(state["turns"]) == 1 and state["turns"][0][0] == "how many shapes are there?" and len(conv) == 2


def _loaded_models(svc, limits, scene_path, tmp_path):
    extra = Checkpoint("opt (local)", ((GENERATION, shared_checkpoint("opt")),))
    own = Service(limits=limits, extra_checkpoints=[extra])
    own.registry.warm_up()
    assert own.registry.get("opt (local)", GENERATION).key == "opt (local)"  # served, then unloaded: one model per role
    assert own.registry.loaded("opt (local)", GENERATION) is None
    assert own.registry.loaded(EMBEDDED, GENERATION) is not None


def _rerank(svc, limits, scene_path, tmp_path):
    items, table, notice = S.app().search.search([scene_path] * 1 + [S.write(tmp_path, "b.png", S.png_bytes(
        S.colour_image((50, 50))))], "a small blue square on the left")
    assert (table["ITM probability"] != NOT_RERANKED).tolist() == [True, False]  # the default re-ranks the top 1


LIMIT_CASES = {  # field: (BLIP2_<FIELD> value, check that it took effect)
    "max_upload_mb": ("0.002", _upload), "max_image_pixels": ("100", _pixels), "max_aspect_ratio": ("2", _aspect),
    "work_side": ("32", _work_side), "max_prompt_chars": ("10", _prompt_chars), "max_candidates": ("2", _candidates),
    "max_candidate_chars": ("5", _candidate_chars), "max_gallery": ("1", _gallery),
    "max_new_tokens": ("5", _new_tokens),
    "max_beams": ("2", _beams), "max_captions": ("1", _captions), "max_beam_tokens": ("10", _beam_tokens),
    "time_limit_s": ("0.5", _time_limit), "queue_size": ("3", _queue_size), "concurrency": ("3", _concurrency),
    "max_chat_turns": ("1", _chat_turns), "max_loaded_models": ("1", _loaded_models),
    "search_rerank_k": ("1", _rerank),
}


def test_every_limit_has_a_case():
    assert set(LIMIT_CASES) == {f.name for f in dataclasses.fields(Limits)}


@pytest.mark.parametrize("field", list(LIMIT_CASES))
def test_limit_variable_takes_effect(field, svc, scene_path, tmp_path, monkeypatch, own_service):
    value, check = LIMIT_CASES[field]
    monkeypatch.setenv(f"BLIP2_{field.upper()}", value)
    limits = Limits.from_env()
    default = getattr(Limits(), field)
    assert limits == dataclasses.replace(Limits(), **{field: type(default)(float(value))})  # this field only
    monkeypatch.setattr(svc, "limits", limits)  # the handlers' service, with the limits the variable gave
    extra = {"monkeypatch": monkeypatch} if "monkeypatch" in check.__code__.co_varnames[:5] else {}
    check(svc, limits, scene_path, tmp_path, **extra)


def test_a_bad_limit_variable_stops_with_a_message(monkeypatch):
    monkeypatch.setenv("BLIP2_MAX_GALLERY", "lots")
    with pytest.raises(SystemExit, match="environment variable BLIP2_MAX_GALLERY='lots' is not a valid int"):
        Limits.from_env()
    monkeypatch.setenv("BLIP2_MAX_GALLERY", "-1")
    with pytest.raises(ValueError, match="limit max_gallery must be a positive number, got -1"):
        Limits.from_env()


# ----------------------------------------------------------------------------------------------------
# app.py: HOST / PORT, --threads, --no-warm-up, a local --model, --dtype auto


def run_main(monkeypatch, argv, env=()):
    """app.py's main with `argv` and environment `env`; demo.launch records its arguments instead of serving.
    Returns (launch kwargs, the demo, the service, what was loaded when the server would start, torch threads)."""
    import importlib.util

    for k in ("HOST", "PORT", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "BLIP2_THREADS", "BLIP2_MODEL",
              "BLIP2_ITM_MODEL", "BLIP2_DTYPE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in dict(env).items():
        monkeypatch.setenv(k, v)
    seen, built = {}, []
    real_build = app.ui.build_demo
    monkeypatch.setattr(app.ui, "build_demo", lambda svc: built.append(svc) or real_build(svc))

    def launch(self, **kwargs):
        svc = built[-1]  # the service main built the demo over
        seen.update(kwargs=kwargs, demo=self, svc=svc, threads=torch.get_num_threads(),
                    loaded=[(k, r) for k in svc.registry.choices() for r in (GENERATION, RETRIEVAL)
                            if svc.registry.loaded(k, r)])

    monkeypatch.setattr(gr.Blocks, "launch", launch)
    spec = importlib.util.spec_from_file_location("app_main", S.ROOT + "/app.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    assert main.main(argv) == 0
    return seen


def test_the_flags_are_defined_once():
    """app.py's argparse, the About tab and the README's table all come from app.config.FLAGS."""
    from app.config import FLAGS, flag_parser, flags_table

    with open(S.ROOT + "/README.md") as f:
        assert flags_table() in f.read()
    parsed = {a.option_strings[0] for a in flag_parser()._actions if a.option_strings and a.dest != "help"}
    assert parsed == {f.flag for f in FLAGS} and len(FLAGS) == 11


def test_host_and_port_from_the_environment(monkeypatch, own_service):
    seen = run_main(monkeypatch, ["--no-warm-up"], {"HOST": "0.0.0.0", "PORT": "7999",
                                                     "GRADIO_SERVER_NAME": "10.0.0.1", "GRADIO_SERVER_PORT": "7001"})
    assert (seen["kwargs"]["server_name"], seen["kwargs"]["server_port"]) == ("0.0.0.0", 7999)  # HOST/PORT first
    seen = run_main(monkeypatch, ["--no-warm-up"], {"GRADIO_SERVER_NAME": "10.0.0.1", "GRADIO_SERVER_PORT": "7001"})
    assert (seen["kwargs"]["server_name"], seen["kwargs"]["server_port"]) == ("10.0.0.1", 7001)  # a Space's
    seen = run_main(monkeypatch, ["--no-warm-up", "--host", "127.0.0.2", "--port", "7002"], {"PORT": "7999"})
    assert (seen["kwargs"]["server_name"], seen["kwargs"]["server_port"]) == ("127.0.0.2", 7002)  # flags win


def test_warm_up_and_threads(monkeypatch, own_service):
    seen = run_main(monkeypatch, [])
    assert seen["loaded"] == [(EMBEDDED, GENERATION), (EMBEDDED, RETRIEVAL)]  # loaded before the server starts
    assert seen["threads"] == 1  # tiny models: one thread
    assert (seen["kwargs"]["server_name"], seen["kwargs"]["server_port"]) == ("127.0.0.1", 7860)
    seen = run_main(monkeypatch, ["--no-warm-up", "--threads", "3"])
    assert seen["loaded"] == [] and seen["threads"] == 3
    seen = run_main(monkeypatch, [], {"BLIP2_THREADS": "2"})
    assert seen["threads"] == 2


def test_a_local_model_directory_joins_the_picker(monkeypatch, own_service):
    import os

    directory = shared_checkpoint("t5")
    key = os.path.basename(directory) + " (local)"
    seen = run_main(monkeypatch, ["--model", directory, "--no-warm-up"])
    svc = seen["svc"]
    assert svc.registry.default[GENERATION] == key and svc.registry.catalogue[key].source(GENERATION) == directory
    assert svc.registry.catalogue[key].note == "given on the command line (generation)"
    picker = next(b for b in seen["demo"].blocks.values() if getattr(b, "elem_id", None) == "model-picker")
    values = [value for _, value in picker.choices]
    assert values == [EMBEDDED] + [c.key for c in KNOWN_CHECKPOINTS] + [key] and picker.value == key
    assert svc.registry.get(key, GENERATION).source == directory


def test_dtype_auto_rules(monkeypatch, own_service):
    auto = ModelSettings()
    assert [auto.resolved_dtype(t5, device) for t5 in (False, True) for device in ("cpu", "cuda")] == [
        "float32", "float16", "float32", "bfloat16"]  # float32 on CPU; float16 on GPU, bfloat16 for Flan-T5
    assert ModelSettings("float16").resolved_dtype(True, "cuda") == "bfloat16"  # T5 overflows in float16
    assert ModelSettings("fp16").resolved_dtype(False, "cpu") == "float16"
    assert ModelSettings("bf16").resolved_dtype(False, "cuda") == "bfloat16"
    with pytest.raises(RequestError, match="dtype 'int8' is not supported"):
        ModelSettings("int8").resolved_dtype(False, "cpu")
    seen = run_main(monkeypatch, ["--no-warm-up", "--dtype", "auto", "--model", shared_checkpoint("t5")])
    svc = seen["svc"]
    assert svc.registry.settings.dtype is None
    loaded = svc.registry.get(svc.registry.default[GENERATION], GENERATION)  # Flan-T5-style on this CPU: float32
    assert loaded.dtype == "float32" and loaded.model.language_model.shared.weight.dtype == torch.float32
    seen = run_main(monkeypatch, ["--no-warm-up", "--dtype", "bf16"])
    loaded = seen["svc"].registry.get(EMBEDDED, GENERATION)
    assert loaded.dtype == "bfloat16" and loaded.model.language_projection.weight.dtype == torch.bfloat16
