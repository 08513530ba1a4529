"""The app's handler functions called directly on the embedded model: real outputs, checked against the truth
of generated scenes of the model's world."""

import numpy as np
import pytest

import app_support as S
from app import caption, chat, matching, search
from app.service import GENERATION, RETRIEVAL, Decoding, match_score


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with S.one_thread():
        yield

SCENES = 6


@pytest.fixture(scope="module")
def svc():
    return S.get_service()


@pytest.fixture(scope="module")
def scenes(svc, tmp_path_factory):
    """One-object scenes with different colours and shapes, saved as PNG uploads."""
    d = tmp_path_factory.mktemp("handler-scenes")
    return [(s, S.write(d, f"s{i}.png", S.png_bytes(s.render(224)))) for i, s in
            enumerate(S.one_object_scenes(SCENES))]


def last(gen):
    out = None
    for out in gen:
        pass
    return out


def test_uses_the_embedded_model(svc):
    assert svc.default == {GENERATION: "blip2-tiny (embedded)", RETRIEVAL: "blip2-tiny (embedded)"}


def test_caption_names_the_colours_and_the_objects(svc, scenes):
    """The embedded model names colours and sizes well and always the right number of objects; its shapes and
    positions are near chance (assets/blip2-tiny/README.md), so they are only required to be named."""
    from blip2.train.world import SHAPES, caption_matches, parse_caption

    right = 0
    for scene, path in scenes:
        text, notice = last(caption.caption(path))
        m = caption_matches(scene, text)
        right += m["objects"][0]["color"]
        named = parse_caption(text)
        assert len(named) == 1 and named[0][2] in SHAPES, text  # one object, with a shape
        assert notice == ""
    assert right >= SCENES - 1, f"{right}/{SCENES} captions named the right colour"
    counts = 0
    for i in range(6):  # scenes of one to three objects
        scene, im = S.scene(i)
        text, _ = last(caption.caption(im))
        counts += caption_matches(scene, text)["count"]
    assert counts >= 5, f"the right number of objects in {counts}/6 captions"


def test_caption_streams_token_by_token(svc, scenes):
    _, path = scenes[0]
    outputs = [text for text, _ in caption.caption(path, "", max_new_tokens=20)]
    assert len(outputs) >= 3 and outputs[-1].startswith(outputs[1].strip())


def test_caption_prefix_and_several_beams(svc, scenes):
    scene, path = scenes[1]
    text, _ = last(caption.caption(path, "a photo of", "beam search", 4, 1.0, 0.9, 50, 30, 1, 1.0, 1.0, 3))
    lines = text.splitlines()
    assert len(lines) == 3 and len(set(lines)) == 3
    assert all(line.split(". ", 1)[1].startswith("a photo of") for line in lines)
    assert scene.objects[0].color in lines[0]


def test_chat_answers_colour_questions(svc, scenes):
    right = 0
    for scene, path in scenes:
        o = scene.objects[0]
        conv, notice, state = last(chat.chat(path, f"what color is the {o.shape}?"))
        answer = conv[-1]["content"]
        right += answer.strip(" .").lower() == o.color
        assert state["turns"][-1] == [f"what color is the {o.shape}?", answer]
    assert right >= SCENES - 1, f"{right}/{SCENES} colour answers right"


def test_chat_follows_a_conversation_and_resets_on_a_new_image(svc, scenes):
    from blip2.train.world import SHAPES

    (s0, p0), (s1, p1) = scenes[0], scenes[1]
    conv, notice, state = last(chat.chat(p0, f"what color is the {s0.objects[0].shape}?"))
    conv, notice, state = last(chat.chat(p0, f"what shape is the {s0.objects[0].color} object?", history=state))
    assert len(conv) == 4 and conv[-1]["content"].strip(" .") in SHAPES  # an answer of the right kind
    assert [m["content"] for m in conv[:3:2]] == [f"what color is the {s0.objects[0].shape}?",
                                                  f"what shape is the {s0.objects[0].color} object?"]
    conv, notice, state = last(chat.chat(p1, f"what color is the {s1.objects[0].shape}?", history=state))
    assert len(conv) == 2 and "new image" in notice.lower()
    assert conv[-1]["content"].strip(" .") == s1.objects[0].color
    assert chat.clear(state)[2]["turns"] == []


def test_chat_prompt_drops_the_oldest_turns_to_fit(svc):
    loaded = svc.get(svc.default[GENERATION], GENERATION)
    context = svc.context_size(loaded)
    turn = ("what color is the large circle in the top left corner of the picture?", "red")
    history = [turn] * (context // 8)
    prompt = svc.chat_prompt(loaded, history, "what shape is it?", 20)
    assert prompt.dropped > 0 and prompt.text.startswith("Question: ")
    assert prompt.text.endswith("Question: what shape is it? Answer:")
    assert svc.prompt_length(loaded, prompt.text) + prompt.max_new_tokens <= context
    kept = prompt.text.count("Question:") - 1
    assert kept + prompt.dropped == len(history)
    assert "Question: {q} Answer: {a}.".format(q=turn[0], a=turn[1]) in prompt.text


def test_chat_shows_the_truncation_notice(svc, scenes):
    scene, path = scenes[2]
    loaded = svc.get(svc.default[GENERATION], GENERATION)
    n = svc.context_size(loaded) // 8
    history = {"digest": None, "turns": []}
    conv, notice, history = last(chat.chat(path, "how many shapes are there?", history=history))
    history["turns"] = [["what color is the large circle in the top left corner of the picture?", "red"]] * n
    conv, notice, history = last(chat.chat(path, "how many shapes are there?", history=history))
    assert "left out of the prompt" in notice


def test_matching_ranks_the_true_caption_first(svc):
    """The true caption against the captions of other scenes of the world."""
    from blip2.train.world import make_split

    others = [s.caption() for s in make_split("val", 30, seed=5)]
    right, total = 0, 6
    for i in range(total):
        scene, im = S.scene(i)
        texts = [t for t in others[3 * i:3 * i + 3] if t != scene.caption()] + [scene.caption()]
        table, itm_chart, itc_chart, heat, notice = matching.match(im, "\n".join(texts))
        right += table["text"][0] == scene.caption()
        assert list(table["rank"]) == list(range(1, len(texts) + 1))
        scores = [match_score(p, c) for p, c in zip(itm_chart["ITM probability"], itc_chart["ITC cosine"])]
        assert scores == sorted(scores, reverse=True)
        assert heat.size[0] > 0 and "Best match" in notice
    assert right >= total - 1, f"the true caption ranked first {right}/{total} times"


def test_heatmap_looks_at_the_object(svc, scenes):
    hits = 0
    for scene, path in scenes:
        o = scene.objects[0]
        overlay, grid, method = svc.heatmap(svc.default[RETRIEVAL], path, f"a {o.size} {o.color} {o.shape}")
        p = scene.placements()[0]
        h, w = grid.shape
        y, x = np.unravel_index(np.argmax(grid), grid.shape)
        # the hottest patch lies within the object's cell of the 3x3 layout
        hits += abs((x + 0.5) / w - p.x) < 1 / 3 and abs((y + 0.5) / h - p.y) < 1 / 3
        assert method in ("Grad-CAM", "cross-attention") and overlay.mode == "RGB"
    assert hits >= SCENES // 2, f"the heat map peaked on the object in {hits}/{SCENES} scenes"


def test_heatmap_handler(svc, scenes):
    _, path = scenes[0]
    heat, notice = matching.heatmap(path, "a red circle")
    assert heat.size[0] > 0 and "a red circle" in notice


def test_search_ranks_the_right_scene_first(svc, scenes):
    paths = [p for _, p in scenes]
    right = 0
    for scene, path in scenes:
        items, table, notice = search.search(paths, scene.caption(), 3)
        right += items[0][0] == path
    assert right >= SCENES - 1, f"the right scene came first {right}/{SCENES} times"


def test_search_reuses_cached_image_embeddings(svc, scenes):
    paths = [p for _, p in scenes]
    search.search(paths, "a red circle", 0)
    model = svc.get(svc.default[RETRIEVAL], RETRIEVAL).model
    calls = []
    handle = model.vision_model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        items, table, notice = search.search(paths, "a blue star in the center", 0)
    finally:
        handle.remove()
    assert calls == [] and len(items) == len(paths)


def test_decoding_defaults_are_valid(svc):
    assert caption.DEFAULTS.streams and chat.DEFAULTS.streams
    assert isinstance(Decoding().generate_kwargs(), dict)
