"""app/service.py and the registry it holds: model failures and time limits, loading, eviction and the memory
check, what the service does for every tab (context fitting, caches by content, plain text for special-token
strings, the truncation notice) and the chat the CLI answers alike."""

import time

import app_support as S
import gradio as gr
import pytest
import torch
from tiny_checkpoints import fake_hub_cache, shared_checkpoint

import blip2
from app.config import Limits
from app.registry import EMBEDDED, GENERATION, RETRIEVAL, Checkpoint
from app.service import Service
from app.validation import load_image, parse_decoding
from blip2.decoding import ANSWER

pytestmark = pytest.mark.usefixtures("one_thread")
last, refused, run_caption, normal_ok = S.last, S.refused, S.run_caption, S.normal_ok


@pytest.fixture(scope="module")
def scenes(svc, tmp_path_factory):
    """One-object scenes with different colours and shapes, saved as PNG uploads."""
    d = tmp_path_factory.mktemp("service-scenes")
    return [(s, S.write(d, f"s{i}.png", S.png_bytes(s.render(224)))) for i, s in enumerate(S.one_object_scenes(6))]


# ----------------------------------------------------------------------------------------------------
# checkpoints that cannot load, failures inside the model, time limits

def test_broken_checkpoint_gives_a_message_and_the_app_keeps_serving(svc, scene_path, tmp_path):
    import shutil

    from app.registry import GENERATION, Checkpoint
    from app.ui import App

    source = svc.registry.get(svc.registry.default[GENERATION], GENERATION).source
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut off mid-download
    svc.registry.catalogue["broken (local)"] = Checkpoint("broken (local)", ((GENERATION, str(broken)),))
    try:
        message = refused(App(svc).load_model, "broken (local)", svc.registry.session_defaults(),
                          match="could not load broken")
        assert "truncated" in message or "safetensors" in message
    finally:
        del svc.registry.catalogue["broken (local)"]
    assert svc.registry.loaded("broken (local)", GENERATION) is None
    normal_ok(scene_path)


def test_unknown_model_is_refused(svc):
    from app.ui import App

    load_model = App(svc).load_model
    refused(load_model, "/etc", match="unknown model")
    refused(load_model, "../assets", match="unknown model")
    refused(load_model, None, match="unknown model")



def test_model_exception_returns_an_error_and_the_next_request_works(svc, scene_path):
    calls = []

    def boom(module, args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated failure inside the model")

    handle = S.generation_model(svc).language_model.register_forward_pre_hook(boom)
    try:
        message = refused(run_caption, scene_path, num_beams=2, match="failed on this request")
        assert "simulated failure" in message
        normal_ok(scene_path)
    finally:
        handle.remove()


def test_time_limit_stops_generation_between_tokens(svc, scene_path, monkeypatch):
    monkeypatch.setattr(svc.limits, "time_limit_s", 0.6)
    steps = []

    def slow_step(module, args):
        steps.append(1)
        time.sleep(0.1)  # a slow model: 100 tokens would take 10 s

    slow = S.generation_model(svc).language_model.register_forward_pre_hook(slow_step)
    try:
        text, notice = run_caption(scene_path, max_new_tokens=100, min_new_tokens=100)
        assert notice == "Stopped at the time limit of 0.6 s." and len(steps) < 100  # stopped between tokens
        refused(run_caption, scene_path, num_beams=2, max_new_tokens=100, min_new_tokens=100, match="time limit")
    finally:
        slow.remove()
    normal_ok(scene_path)


# ----------------------------------------------------------------------------------------------------
# the model registry


def test_least_recently_used_model_is_evicted_and_the_startup_model_stays(own_service):
    a = Checkpoint("a (local)", ((GENERATION, shared_checkpoint("opt")),))
    b = Checkpoint("b (local)", ((GENERATION, shared_checkpoint("t5")),))
    svc = Service(limits=Limits(max_loaded_models=2), extra_checkpoints=[a, b])
    svc.registry.warm_up()

    def held():
        return [k for k in (EMBEDDED, "a (local)", "b (local)") if svc.registry.loaded(k, GENERATION)]

    svc.registry.get("a (local)", GENERATION)
    assert held() == [EMBEDDED, "a (local)"]
    svc.registry.get("b (local)", GENERATION)  # over the limit of 2: a, the least recently used, goes; the startup
    # one stays
    assert held() == [EMBEDDED, "b (local)"]
    svc.registry.get("a (local)", GENERATION)
    assert held() == [EMBEDDED, "a (local)"] and svc.registry.loaded(EMBEDDED, RETRIEVAL) is not None


def test_a_model_too_large_for_memory_is_refused_and_the_session_keeps_its_model(own_service, monkeypatch):
    """The check reads blip2.memory_report's bytes for the load's settings, before loading anything."""
    import app.registry
    from app.ui import App

    path = shared_checkpoint("opt")
    need = blip2.memory_report(path, blip2.Blip2ForConditionalGeneration, dtype="float32").total
    big = Checkpoint("org/big", ((GENERATION, path),))
    svc = Service(limits=Limits(), extra_checkpoints=[big])
    svc.registry.warm_up()
    monkeypatch.setattr(app.registry, "available_memory_bytes", lambda device: need // 2)
    loads = []
    monkeypatch.setattr(blip2.Blip2ForConditionalGeneration, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a)))
    session = svc.registry.session_defaults()
    with pytest.raises(gr.Error) as e:
        App(svc).load_model("org/big", session)
    assert e.value.message == (f"Org/big needs about {need / 2**30:.1f} GB of memory (float32), but only "
                               f"{need // 2 / 2**30:.1f} GB is free; still serving the model loaded before (try "
                               "--quantize int4 on a CPU, or --dtype float16 / --quantize 8bit on a GPU)")
    assert not loads and svc.registry.loaded("org/big", GENERATION) is None and session[GENERATION] == EMBEDDED
    monkeypatch.undo()
    App(svc).load_model("org/big", session)  # with room, the same model loads
    assert svc.registry.loaded("org/big", GENERATION) is not None


def test_loading_from_the_hub_cache_reports_progress(tmp_path, monkeypatch, own_service):
    """A hub id resolved offline from the Hugging Face cache (HF_HUB_OFFLINE=1); the load reports each step."""
    from app.ui import App

    fake_hub_cache(tmp_path / "hub", "tiny-org/blip2-opt", shared_checkpoint("opt"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = Checkpoint("tiny-org/blip2-opt", ((GENERATION, "tiny-org/blip2-opt"),))
    svc = Service(limits=Limits(), extra_checkpoints=[hub])
    calls = []
    session, status = App(svc).load_model("tiny-org/blip2-opt", svc.registry.session_defaults(),
                                 progress=lambda fraction, desc: calls.append((fraction, desc)))
    assert calls == [(0.0, "Preparing tiny-org/blip2-opt"),
                     (0.1, "Fetching tiny-org/blip2-opt (downloads show their progress here)"),
                     (0.5, "Loading the weights of tiny-org/blip2-opt"),
                     (0.9, "Loading the processor of tiny-org/blip2-opt"), (1.0, "tiny-org/blip2-opt is ready")]
    assert session[GENERATION] == "tiny-org/blip2-opt" and status.startswith("**Caption & chat:** tiny-org/blip2-opt")
    loaded = svc.registry.loaded("tiny-org/blip2-opt", GENERATION)
    direct = __import__("blip2").Blip2ForConditionalGeneration.from_pretrained(shared_checkpoint("opt"))
    assert all(torch.equal(p, q) for p, q in zip(loaded.model.parameters(), direct.parameters()))


# ----------------------------------------------------------------------------------------------------
# Flan-T5's chat prompt


def test_flan_t5_chat_asks_for_a_short_answer(scene_path, own_service):
    from app.service import clean_answer

    directory = shared_checkpoint("t5")
    svc = Service(generation=directory, limits=Limits())
    loaded = svc.registry.get(svc.registry.default[GENERATION], GENERATION)
    assert loaded.is_t5
    captioner = loaded.runner
    prompt = captioner.prompt(captioner.chat_texts("and now?", [("what is it?", "a cat")]), 8).text
    assert prompt == "Question: what is it? Answer: a cat. Question: and now? Short answer:"
    answer = last(svc.chat(svc.registry.default[GENERATION], scene_path, "and now?", [("what is it?", "a cat")],
                           stream=False)).answer
    image = load_image(scene_path, svc.limits).image
    enc = loaded.processor(images=image, text=prompt, return_tensors="pt")
    ids = loaded.model.generate(**enc, **parse_decoding(svc.limits, {}, ANSWER).generate_kwargs())  # the default
    expected = clean_answer(loaded.processor.batch_decode(ids[:, 1:], skip_special_tokens=True)[0].strip())
    assert answer == expected  # what generate answers to the Short answer prompt


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_the_app_and_the_cli_answer_a_chat_alike(scene_path, own_service, family):
    """One chat template (blip2.prompts.chat_prompt): the app's Chat tab and `python -m blip2 ask` (Blip2Runner.ask)
    build the same prompt for the same history, "?" and "!" answers included, and answer alike."""
    from app.service import clean_answer
    from blip2.runner import Blip2Runner

    svc = Service(generation=shared_checkpoint(family), limits=Limits())
    loaded = svc.registry.get(svc.registry.default[GENERATION], GENERATION)
    history = [("is it red?", "yes!"), ("what is it", "a cat?"), ("where", "on the left")]
    prompt = loaded.runner.prompt(loaded.runner.chat_texts("and now?", history), 8).text
    tail = "Short answer:" if family == "t5" else "Answer:"
    assert prompt == ("Question: is it red? Answer: yes! Question: what is it Answer: a cat? Question: where Answer: "
                      f"on the left. Question: and now? {tail}")
    runner = Blip2Runner(loaded.model, loaded.processor)
    image = load_image(scene_path, svc.limits).image
    cli = runner.ask(image, "and now?", history, **parse_decoding(svc.limits, {"max_new_tokens": 8}).generate_kwargs())
    assert cli.prompt == prompt
    app = last(svc.chat(svc.registry.default[GENERATION], scene_path, "and now?", history, {"max_new_tokens": 8},
                        stream=False)).answer
    assert app == clean_answer(cli.text)


# ----------------------------------------------------------------------------------------------------
# what the service does for every tab


def test_chat_prompt_drops_the_oldest_turns_to_fit(svc):
    loaded = svc.registry.get(svc.registry.default[GENERATION], GENERATION)
    context = loaded.runner.context_size
    turn = ("what color is the large circle in the top left corner of the picture?", "red")
    history = [turn] * (context // 8)
    captioner = loaded.runner
    prompt = captioner.prompt(captioner.chat_texts("what shape is it?", history), 20)
    assert prompt.dropped_turns > 0 and prompt.text.startswith("Question: ")
    assert prompt.text.endswith("Question: what shape is it? Answer:")
    assert loaded.model.config.num_query_tokens + len(prompt.ids) + prompt.max_new_tokens <= context
    kept = prompt.text.count("Question:") - 1
    assert kept + prompt.dropped_turns == len(history)
    assert "Question: {q} Answer: {a}.".format(q=turn[0], a=turn[1]) in prompt.text


def test_search_reuses_cached_image_embeddings(svc, scenes, monkeypatch):
    """A second query over the same gallery embeds only the text: no vision pass, and no image is decoded again
    for the world caveat's verdict (cached by content hash)."""
    from app import service as service_module

    paths = [p for _, p in scenes]
    S.app().search.search(paths, "a red circle", 0)
    model = svc.registry.get(svc.registry.default[RETRIEVAL], RETRIEVAL).model
    calls, verdicts = [], []
    monkeypatch.setattr(service_module, "in_world", lambda im: verdicts.append(1) or True)
    handle = model.vision_model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        items, table, notice = S.app().search.search(paths, "a blue star in the center", 0)
    finally:
        handle.remove()
    assert calls == [] and verdicts == [] and len(items) == len(paths)


def test_special_token_strings_are_plain_text_in_match_search_and_heatmap(svc, scenes, monkeypatch):
    """What a user types is text: "<image>", "[CLS]", "</s>" reach the Q-Former as the reference tokenizer reads
    them with split_special_tokens=True (plain text), in matching, search and the heat map alike."""
    import transformers

    loaded = svc.registry.get(svc.registry.default[RETRIEVAL], RETRIEVAL)
    reference = transformers.AutoTokenizer.from_pretrained(loaded.source)
    seen = []  # (op, token ids of each text row the ITM / ITC heads received)

    def recording(name, ids_at):
        real = getattr(loaded.model, name)

        def record(*args, **kwargs):
            ids, mask = args[ids_at], args[ids_at + 1]
            seen.extend(ids[i][mask[i].bool()].tolist() for i in range(ids.shape[0]))
            return real(*args, **kwargs)
        return record

    monkeypatch.setattr(loaded.model, "itm_logits", recording("itm_logits", 1))
    monkeypatch.setattr(loaded.model, "itc_text_embeds", recording("itc_text_embeds", 0))
    _, path = scenes[0]
    texts = {"match": "a <image> circle [CLS] here", "search": "a </s> star [CLS] <image>",
             "heatmap": "[CLS] a </s> cross"}
    for op, text in texts.items():
        seen.clear()
        if op == "match":
            S.app().matching.match(path, text)
        elif op == "search":
            S.app().search.search([path], text, 1)
        else:
            svc.heatmap(svc.registry.default[RETRIEVAL], path, text)
        plain = reference(text, split_special_tokens=True)["input_ids"]
        special = set(reference.all_special_ids)
        assert len(seen) >= 2 and all(ids == plain for ids in seen), (op, seen, plain)  # ITM and ITC both
        special |= {reference.cls_token_id, reference.sep_token_id}
        assert not special & set(plain[1:-1]) and special & set(reference(text)["input_ids"][1:-1]), op  # raw: not


def test_the_first_match_runs_the_vision_tower_once(svc):
    """The ranking and the heat map of a new image share one vision pass (the runner's cache)."""
    scene, im = S.scene(7, seed=23)  # an image no other test has shown the model
    model = svc.registry.get(svc.registry.default[RETRIEVAL], RETRIEVAL).model
    calls = []
    handle = model.vision_model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        table, _, _, heat, _ = S.app().matching.match(im, f"{scene.caption()}\na large white cross in the top right")
    finally:
        handle.remove()
    assert calls == [1] and table["text"][0] == scene.caption() and heat.size == (224, 224)


def test_a_text_cut_to_the_retrieval_positions_gets_a_notice(svc, scenes):
    """Candidate texts and search queries longer than the retrieval model's 64 text positions are scored on their
    beginning (blip2.retrieval.Match.truncated): the notice says so, and only then."""
    scene, path = scenes[0]
    positions = svc.registry.get(svc.registry.default[RETRIEVAL], RETRIEVAL).model.config.qformer_config
    assert positions.max_position_embeddings == 64 and len(S.LONG_TEXT) < svc.limits.max_candidate_chars
    *_, notice = S.app().matching.match(path, scene.caption())
    assert "cut to the retrieval model" not in notice
    table, *_, notice = S.app().matching.match(path, f"{scene.caption()}\n{S.LONG_TEXT}")
    assert f"“{S.LONG_TEXT[:60]}” was cut to the retrieval model's 64 text tokens" in notice
    assert len(table) == 2
    result = svc.match(svc.registry.default[RETRIEVAL], path, [scene.caption(), S.LONG_TEXT])
    assert [r.truncated for r in result.rows if r.text == S.LONG_TEXT] == [True]
    assert not any(r.truncated for r in result.rows if r.text == scene.caption())
    _, _, notice = S.app().search.search([path], scene.caption(), 0)
    assert "cut to the retrieval model" not in notice
    _, _, notice = S.app().search.search([path], S.LONG_TEXT, 0)
    assert "was cut to the retrieval model's 64 text tokens" in notice
