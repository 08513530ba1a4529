"""The app's handler functions called directly on the embedded model: real outputs, checked against the truth
of generated scenes of the model's world."""

import inspect
import os

import app_support as S
import numpy as np
import pytest

from app import chat
from app.registry import GENERATION, RETRIEVAL
from app.render import NOT_RERANKED
from app.validation import parse_decoding
from blip2.decoding import ANSWER, CAPTION
from blip2.retrieval import match_score

pytestmark = pytest.mark.usefixtures("one_thread")

SCENES = 6


@pytest.fixture(scope="module")
def scenes(svc, tmp_path_factory):
    """One-object scenes with different colours and shapes, saved as PNG uploads."""
    d = tmp_path_factory.mktemp("handler-scenes")
    return [(s, S.write(d, f"s{i}.png", S.png_bytes(s.render(224)))) for i, s in
            enumerate(S.one_object_scenes(SCENES))]


last = S.last


def test_uses_the_embedded_model(svc):
    assert svc.registry.default == {GENERATION: "blip2-tiny (embedded)", RETRIEVAL: "blip2-tiny (embedded)"}


def test_caption_is_exact(svc, scenes):
    """The embedded model's captions are exact on 96% of held-out scenes and right on 99% of colours, shapes and
    positions (blip2/assets/blip2-tiny/README.md): every one-object caption must be exact (a flipped, rotated or
    recoloured image pipeline names another position or colour), and on scenes of one to three objects every
    object's size, colour and position (its shapes are 98.7% right: one of these six names a cross for a square)."""
    from blip2.train.world import caption_matches

    for scene, path in scenes:
        text, notice = last(S.app().caption.caption(path))
        assert (text, notice) == (scene.caption(), "")
    for i in range(6):  # scenes of one to three objects
        scene, im = S.scene(i)
        text, _ = last(S.app().caption.caption(im))
        m = caption_matches(scene, text)
        assert m["count"] and all(o["size"] and o["color"] and o["position"] for o in m["objects"]), (text, scene)


def test_caption_streams_token_by_token(svc, scenes):
    scene, path = scenes[0]
    outputs = [text for text, _ in S.app().caption.caption(path, "", max_new_tokens=20)]
    assert outputs[-1] == scene.caption() and len(set(outputs)) >= 3  # it grew in pieces
    assert all(outputs[-1].startswith(o) for o in outputs)


def test_caption_prefix_and_several_beams(svc, scenes):
    scene, path = scenes[1]
    text, _ = last(S.app().caption.caption(path, "a photo of", "beam search", 4, 1.0, 0.9, 50, 30, 1, 1.0, 1.0, 3))
    lines = text.splitlines()
    assert len(lines) == 3 and len(set(lines)) == 3
    assert [line.split(". ", 1)[0] for line in lines] == ["1", "2", "3"]
    assert all(line.split(". ", 1)[1].startswith("a photo of ") for line in lines)
    assert lines[0] == f"1. a photo of {scene.caption()}"  # the best beam is the true caption


def test_chat_answers_colour_shape_and_position(svc, scenes):
    """VQA on one-object scenes: colour 99.7%, shape 99.3% right (model card); every answer must be right."""
    for scene, path in scenes:
        o = scene.objects[0]
        conv, notice, state = last(S.app().chat.chat(path, f"what color is the {o.shape}?"))
        assert conv[-1]["content"] == o.color and notice == ""
        assert state["turns"][-1] == [f"what color is the {o.shape}?", o.color]
        conv, notice, state = last(S.app().chat.chat(path, f"what shape is the {o.color} object?"))
        assert conv[-1]["content"] == o.shape
        conv, notice, state = last(S.app().chat.chat(path, f"where is the {o.color} {o.shape}?"))
        assert conv[-1]["content"] == o.position


def test_chat_follows_a_conversation_and_resets_on_a_new_image(svc, scenes):
    (s0, p0), (s1, p1) = scenes[0], scenes[1]
    conv, notice, state = last(S.app().chat.chat(p0, f"what color is the {s0.objects[0].shape}?"))
    conv, notice, state = last(S.app().chat.chat(p0, f"what shape is the {s0.objects[0].color} object?", history=state))
    assert [m["content"] for m in conv] == [f"what color is the {s0.objects[0].shape}?", s0.objects[0].color,
                                            f"what shape is the {s0.objects[0].color} object?", s0.objects[0].shape]
    conv, notice, state = last(S.app().chat.chat(p1, f"what color is the {s1.objects[0].shape}?", history=state))
    assert len(conv) == 2 and "new image" in notice.lower()
    assert conv[-1]["content"] == s1.objects[0].color
    assert chat.clear(state)[2]["turns"] == []


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


def test_chat_shows_the_truncation_notice(svc, scenes):
    scene, path = scenes[2]
    loaded = svc.registry.get(svc.registry.default[GENERATION], GENERATION)
    n = loaded.runner.context_size // 8
    history = {"digest": None, "turns": []}
    conv, notice, history = last(S.app().chat.chat(path, "how many shapes are there?", history=history))
    history["turns"] = [["what color is the large circle in the top left corner of the picture?", "red"]] * n
    conv, notice, history = last(S.app().chat.chat(path, "how many shapes are there?", history=history))
    assert "left out of the prompt" in notice


def test_matching_ranks_the_true_caption_first(svc):
    """The true caption against the captions of other scenes of the world (ITC recall@1 99.3%, model card)."""
    from blip2.train.world import make_split

    others = [s.caption() for s in make_split("val", 30, seed=5)]
    for i in range(6):
        scene, im = S.scene(i)
        texts = [t for t in others[3 * i:3 * i + 3] if t != scene.caption()] + [scene.caption()]
        table, itm_chart, itc_chart, heat, notice = S.app().matching.match(im, "\n".join(texts))
        assert table["text"][0] == scene.caption() and sorted(table["text"]) == sorted(texts)
        assert list(table["rank"]) == list(range(1, len(texts) + 1))
        scores = [match_score(p, c) for p, c in zip(itm_chart["ITM probability"], itc_chart["ITC cosine"])]
        assert scores == sorted(scores, reverse=True)
        assert heat.size == (224, 224) and notice.startswith(f"Best match: **{scene.caption()}**")


def object_cell(scene):
    """(row, column) of the scene's one object in the world's 3x3 layout."""
    p = scene.placements()[0]
    return int(p.y * 3), int(p.x * 3)


def hottest_cell(grid):
    """(row, column) of the 3x3 layout cell holding the most relevance of an (h, w) patch grid."""
    h, w = grid.shape
    cells = grid.reshape(3, h // 3, 3, w // 3).sum((1, 3))
    return tuple(int(i) for i in np.unravel_index(np.argmax(cells), cells.shape))


def test_heatmap_looks_at_the_object(svc, scenes):
    """The heat map's hottest cell of the 3x3 layout is the object's own cell, in every scene (chance: 1 in 9)."""
    for scene, path in scenes:
        o = scene.objects[0]
        overlay, grid, method, _ = svc.heatmap(svc.registry.default[RETRIEVAL], path, f"a {o.size} {o.color} {o.shape}")
        assert grid.shape == (6, 6) and method == "Grad-CAM" and overlay.size == (224, 224)
        assert hottest_cell(grid) == object_cell(scene), (scene.caption(), np.round(grid, 3))


def test_heatmap_handler(svc, scenes):
    scene, path = scenes[0]
    heat, notice = S.app().matching.heatmap(path, scene.caption())
    assert notice == f"Heat map (Grad-CAM) for: **{scene.caption()}**" and heat.size == (224, 224)
    _, grid, _, _ = svc.heatmap(svc.registry.default[RETRIEVAL], path, scene.caption())
    from app.render import overlay_heatmap
    from app.validation import load_image

    expected = overlay_heatmap(load_image(path, svc.limits).image, grid)
    assert np.array_equal(np.asarray(heat), np.asarray(expected))


def test_search_ranks_the_right_scene_first(svc, scenes):
    """Text-to-image recall@1 is 99.3% in 100-image galleries (model card): the right scene first, every time."""
    paths = [p for _, p in scenes]
    for scene, path in scenes:
        items, table, notice = S.app().search.search(paths, scene.caption(), 3)
        assert items[0][0] == path and notice == f"Ranked {len(paths)} images."
        assert sorted(table["image"]) == sorted(os.path.basename(p) for p in paths)
        assert (table["ITM probability"] != NOT_RERANKED).sum() == 3  # the top 3 re-ranked by ITM


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


def test_decoding_defaults(svc):
    assert parse_decoding(svc.limits, {}, CAPTION).generate_kwargs() == dict(
        max_new_tokens=30, min_new_tokens=1, repetition_penalty=1.0, num_return_sequences=1, do_sample=False,
        num_beams=1, length_penalty=1.0)
    sampled = parse_decoding(svc.limits, dict(mode="nucleus sampling", num_captions=2, temperature=0.7), CAPTION)
    assert sampled.generate_kwargs() == dict(max_new_tokens=30, min_new_tokens=1, repetition_penalty=1.0,
                                             num_return_sequences=2, do_sample=True, temperature=0.7, top_p=0.9,
                                             top_k=50)
    answer = parse_decoding(svc.limits, {}, ANSWER)
    assert answer.streams and answer.max_new_tokens == 20
    params = inspect.signature(S.app().caption.caption).parameters  # what Gradio shows as the /caption API
    assert list(params)[:12] == ["image", "prompt", "mode", "num_beams", "temperature", "top_p", "top_k",
                                 "max_new_tokens", "min_new_tokens", "repetition_penalty", "length_penalty",
                                 "num_captions"]
    assert params["max_new_tokens"].default == 30 and params["top_p"].default == 0.9
    params = inspect.signature(S.app().chat.chat).parameters
    assert "num_captions" not in params and params["max_new_tokens"].default == 20 and list(params)[-3] == "history"


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


def test_the_chat_placeholder_follows_the_image(scenes):
    """No image: say to upload one; an image: say to ask. Either way the conversation starts over."""
    empty, notice, history = chat.new_image(None, {"digest": "x", "turns": [["q", "a"]]})
    assert empty["placeholder"] == chat.NO_IMAGE and empty["value"] == [] and history == chat.new_history()
    loaded, _, _ = chat.new_image(scenes[0][1])
    assert loaded["placeholder"] == chat.READY != chat.NO_IMAGE


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
