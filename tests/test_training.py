"""Smoke runs of the training recipe (every stage, a few steps, tiny sizes): losses, files, reload, determinism."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from blip2 import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval
from blip2.image_processing import BlipImageProcessor
from blip2.processing import Blip2Processor
from blip2.train import data, evaluate, losses, probe, stages, world

TINY = stages.Recipe(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, qformer_hidden=32,
                     qformer_layers=1, num_query_tokens=4, text_hidden=32, text_layers=1, lm_aux_layer=1, heads=2,
                     embed_dim=16, n_train=32, batch=8, vision_steps=4, lm_steps=4, qformer_steps=4, bridge_steps=4,
                     n_val=6, seed=1)


def run_all(root, tokenizers=None):
    work, out = root / "work", root / "out"
    if tokenizers:  # trained once per test session: tokenizer determinism is tested in test_world
        shutil.copytree(tokenizers, work / "tokenizers")
    return stages.run(stages.STAGES, work, out, TINY), work, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    data.CACHE = cache
    a = run_all(tmp_path_factory.mktemp("a"))
    b = run_all(tmp_path_factory.mktemp("b"), tokenizers=a[1] / "tokenizers")
    return a, b


def test_every_stage_trains(runs):
    (report, _, _), _ = runs
    assert list(report) == list(stages.STAGES)
    for stage, (_, history) in report.items():
        # 4 steps lower every stage's loss (measured: vision 6.86 -> 6.59, lm 12.85 -> 12.49, qformer 8.08 ->
        # 7.98, bridge 5.90 -> 5.87); a stage whose optimizer does not step, or that diverges, fails here
        assert len(history) == 4 and history[-1] < history[0], (stage, history)


def test_files_and_reload(runs):
    (_, work, out), _ = runs
    assert (work / "vision.safetensors").exists() and (work / "lm.safetensors").exists()
    gen, itm = out / "blip2-tiny", out / "blip2-tiny-itm"
    for d in (gen, itm):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "preprocessor_config.json", "processor_config.json"):
            assert (d / name).is_file(), d / name
    assert (gen / "generation_config.json").is_file()
    model = Blip2ForConditionalGeneration.from_pretrained(gen)
    processor = Blip2Processor.from_pretrained(gen)
    assert model.config.image_token_index == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.text_config.eos_token_id == processor.tokenizer.convert_tokens_to_ids("\u010a")  # "\n"
    scene = world.make_split("test", 1)[0]
    inputs = processor(images=scene.render(64), text="a photo of", return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=5)
    assert ids.shape[0] == 1 and ids.shape[1] > inputs["input_ids"].shape[1]
    retrieval = Blip2ForImageTextRetrieval.from_pretrained(itm)
    keys = load_file(itm / "model.safetensors").keys()
    assert any(".intermediate." in k for k in keys) and "itm_head.weight" in keys
    position = model.vision_model.embeddings.position_embedding
    assert torch.equal(retrieval.vision_model.embeddings.position_embedding, position)


def test_deterministic(runs):
    (_, _, out_a), (_, _, out_b) = runs
    for name in ("blip2-tiny", "blip2-tiny-itm"):
        a, b = load_file(out_a / name / "model.safetensors"), load_file(out_b / name / "model.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_recipe_checks_the_supervised_layer():
    with pytest.raises(ValueError, match="lm_aux_layer must be a layer of the language model"):
        stages.Recipe(text_layers=4, lm_aux_layer=5)


def test_pixels_match_the_image_processor():
    scene = world.make_split("val", 1)[0]
    image = scene.render(128)
    expected = BlipImageProcessor(size=32)(image, return_tensors="pt")["pixel_values"]
    resized = np.array(image.resize((32, 32), Image.BICUBIC))[None]
    assert torch.allclose(data.pixels(resized), expected, atol=1e-6)


def test_itg_mask_and_itc_targets():
    keep = losses.itg_mask(torch.tensor([[1, 1, 0]]), 2)[0]
    assert keep[:2].tolist() == [[1, 1, 0, 0, 0]] * 2  # queries never see the text
    assert keep[2:].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]  # text: causal, no padding
    feats = torch.nn.functional.normalize(torch.randn(3, 2, 4), dim=-1)
    same = torch.eye(3, dtype=torch.bool)
    loss, sim = losses.itc_loss(feats, feats[:, 0], 0.1, same)
    f = feats.double().numpy()
    best = np.array([[max(f[i, q] @ f[t, 0] for q in range(2)) for t in range(3)] for i in range(3)])  # best query
    assert np.allclose(sim.numpy(), best, atol=1e-6)

    def cross_entropy(logits):  # one positive per row, on the diagonal
        return np.mean([np.log(np.exp(row).sum()) - row[i] for i, row in enumerate(logits)])

    expected = (cross_entropy(best / 0.1) + cross_entropy(best.T / 0.1)) / 2  # image->text and text->image
    assert abs(loss.item() - expected) < 1e-5


def test_answer_targets_follow_the_prompt(runs):
    (_, _, out), _ = runs
    text = data.OptText(Blip2Processor.from_pretrained(out / "blip2-tiny").tokenizer)
    chat = [("Question: what color is the circle? Answer:", " red"), (". Question: is it large? Answer:", " yes")]
    ids, mask, labels = text.vlm_batch([chat[:1], chat], 3)
    kept = [[i for i, y in zip(row.tolist(), lab.tolist()) if y != -100] for row, lab in zip(ids, labels)]
    assert [text.tok.decode(k) for k in kept] == [" red\n", " red yes\n"]  # the answers, never the questions
    assert ids[0, :3].tolist() == [text.image] * 3 and ids[0, 3] == text.bos
    assert text.tok.decode(ids[1, 3:][mask[1, 3:] == 1].tolist()) == "</s>" + "".join(p + t for p, t in chat) + "\n"
    context_ids, _, context_labels = text.lm_batch([("a large red circle in the center", chat[:1])])
    assert (context_labels != -100).sum() == len(kept[0])  # the context in front of BOS is never a target


def test_question_forms():
    assert evaluate.question_form("is the small circle in the top left?") == "is the SIZE SHAPE POSITION?"
    assert evaluate.question_form("how many crosses are there?") == "how many SHAPE are there?"
    assert evaluate.question_form("is there a large red star?") == "is there SIZE COLOR SHAPE?"
    assert evaluate.question_form("what shape is the object at the top?") == "what shape is the object POSITION?"


def test_question_attributes_state_what_the_answer_depends_on():
    for scene in world.make_split("val", 60):
        for qa in scene.questions():
            stated = data.question_attributes(qa.question)
            found = [o for o in scene.objects if all(getattr(o, k) == v for k, v in stated.items())]
            if qa.kind == "yesno":  # every reference is unique: "is the circle red?" = "is there a red circle?"
                assert (qa.answer == "yes") == bool(found), (qa, stated)
            elif qa.kind == "count":
                assert qa.answer == world.NUMBERS[len(found)], (qa, stated)
            else:
                assert len(found) == 1 and getattr(found[0], qa.kind) == qa.answer, (qa, stated)
    assert data.question_attributes("is the red object a star?") == {"color": "red", "shape": "star"}
    assert data.question_attributes("is the circle in the top left?") == {"shape": "circle", "position": "top left"}
    assert data.question_attributes("what size is the object in the top left?") == {"position": "top left"}
    assert data.question_attributes("is there a small blue cross?") == {"size": "small", "color": "blue",
                                                                         "shape": "cross"}
    assert data.question_attributes("how many crosses are there?") == {"shape": "cross"}
    assert data.question_attributes("how many shapes are there?") == {}


def test_attribute_targets_mark_object_ends_and_question_colons(runs):
    (_, _, out), _ = runs
    text = data.OptText(Blip2Processor.from_pretrained(out / "blip2-tiny").tokenizer)
    scene = world.Scene((world.Obj("circle", "red", "small", "top left"), world.Obj("star", "blue", "large", "bottom")),
                        "plain", 0)
    chat = [("Question: what color is the star? Answer:", " blue"),
            (". Question: is the object in the top left large? Answer:", " no")]
    texts = [(scene.caption(), [("a photo of", " " + scene.caption())]), (scene.caption(), chat)]
    ids, _, _ = text.lm_batch(texts)
    targets = text.attribute_targets(texts, [scene, scene])
    marks = {}
    for attr, rows in targets.items():
        for b, t, v in rows.tolist():
            marks.setdefault((b, text.tok.decode(ids[b, :t + 1].tolist())), {})[attr] = world.VALUES[attr][v]
    ends = {"a small red circle in the top left": vars(scene.objects[0]),
            "a small red circle in the top left and a large blue star at the bottom": vars(scene.objects[1])}
    assert marks == {**{(b, k): v for b in (0, 1) for k, v in ends.items()},
                     (1, scene.caption() + "</s>" + chat[0][0]): {"shape": "star"},
                     (1, scene.caption() + "</s>" + "".join(chat[0]) + chat[1][0]): {"position": "top left",
                                                                                     "size": "large"}}
    with pytest.raises(ValueError, match="is not the caption of its scene"):
        text.attribute_targets([("a large star", chat)], [scene])


def test_evaluation_details(runs):
    (_, _, out), _ = runs
    model = Blip2ForConditionalGeneration.from_pretrained(out / "blip2-tiny").eval()
    processor = Blip2Processor.from_pretrained(out / "blip2-tiny")
    scenes, images = data.load_split("val", 6, TINY.image_size, TINY.seed)
    plain, _ = evaluate.generation_scores(model, processor, scenes, images)
    scores, _ = evaluate.generation_scores(model, processor, scenes, images, detail=True)
    assert {k: scores[k] for k in plain} == plain  # the detail only adds rows
    forms = [k for k in scores if k.startswith("vqa what color is the ") and k.endswith("?")]
    sizes = [k for k in scores if k.startswith("vqa color, ") and k.endswith(("object", "objects"))]
    assert forms and sizes and all(0 <= v <= 1 for v in scores.values())


@pytest.mark.parametrize("reference, context, deep", [(False, "pairs", False), (True, "pairs", False),
                                                     (False, "caption", True)])
def test_probe_reports_accuracy_by_object_count(runs, reference, context, deep):
    (_, work, _), _ = runs
    history = probe.probe("what color is the SHAPE?", 4, context, reference, work, every=2, r=TINY, n_val=30,
                          deep_supervision=deep)
    assert [step for step, _ in history] == [2, 4]
    for _, scores in history:
        assert "all" in scores and {"n=1", "n=2"} <= set(scores) and all(0 <= v <= 1 for v in scores.values())
    with pytest.raises(ValueError, match="no question of the world has the form"):
        probe.probe("what is the meaning of life?", 1, work=work, r=TINY)
    with pytest.raises(ValueError, match="use --context caption"):
        probe.probe("what color is the SHAPE?", 1, "pairs", work=work, r=TINY, deep_supervision=True)
