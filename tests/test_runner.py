"""Blip2Runner: its caches hit and change nothing (results equal fresh computations), chat prefix reuse,
streaming, prompt truncation, matching."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_checkpoints import shared_checkpoint

import blip2
from blip2.processing import Blip2Processor
from blip2.prompts import Limits, chat_prompt, fit, truncate_left
from blip2.runner import Blip2Runner

DECODINGS = [dict(max_new_tokens=6), dict(max_new_tokens=5, num_beams=3),
             dict(max_new_tokens=6, do_sample=True, temperature=2.0, seed=4)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["opt", "t5"])
def lm(request):
    path = shared_checkpoint(request.param)
    model = blip2.Blip2ForConditionalGeneration.from_pretrained(path)
    return request.param, model, Blip2Processor.from_pretrained(path)


def image(seed=0, size=(40, 50)):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8))


ANSWER = {"opt": "Answer:", "t5": "Short answer:"}  # the chat template's last words: Flan-T5 asks for a short one


def generated(model, proc, img, prompt, **decoding):
    """The oracle: model.generate on the processor's inputs for `prompt`, new tokens decoded (first sequence)."""
    enc = proc(images=img, text=prompt, return_tensors="pt")
    ids = model.generate(**enc, **decoding)
    new = ids[:, 1:] if model.config.is_encoder_decoder else ids[:, enc["input_ids"].shape[1]:]
    return proc.batch_decode(new, skip_special_tokens=True)[0].strip()


def test_caption_and_answer_equal_processor_plus_generate(lm):
    name, model, proc = lm
    img, runner = image(), Blip2Runner(model, proc)
    for prompt in ("", f"Question: what is in the picture? {ANSWER[name]}"):
        enc = proc(images=img, text=prompt, return_tensors="pt")
        ids = model.generate(**enc, max_new_tokens=8)
        new = ids[:, 1:] if name == "t5" else ids[:, enc["input_ids"].shape[1]:]
        expected = proc.batch_decode(new, skip_special_tokens=True)[0].strip()
        assert runner.caption(img, prompt, max_new_tokens=8).text == expected
    assert runner.ask(img, "what is in the picture?", max_new_tokens=8).text == expected
    assert runner.stats["feature_misses"] == 1 and runner.stats["feature_hits"] == 2
    assert runner.stats["prefix_hits"] == (2 if name == "opt" else 0)


@pytest.mark.parametrize("decoding", DECODINGS, ids=["greedy", "beams", "sampling"])
def test_chat_with_caches_equals_fresh_computation(lm, decoding):
    name, model, proc = lm
    img, runner, history = image(1), Blip2Runner(model, proc), []
    for question in ("what is it?", "what colour is it?", "where is it?"):
        answer = runner.ask(img, question, history, **decoding)
        turns = "".join(f"Question: {q} Answer: {a}{'' if a.endswith(('.', '!', '?')) else '.'} " for q, a in history)
        prompt = turns + f"Question: {question} {ANSWER[name]}"
        assert answer.prompt == prompt and not answer.truncated
        assert answer.text == generated(model, proc, img, prompt, **decoding)  # caches change nothing
        assert answer == Blip2Runner(model, proc).ask(img, question, history, **decoding)
        history.append((question, answer.text))
    assert runner.stats["feature_misses"] == 1 and runner.stats["feature_hits"] == 2
    if name == "opt":  # turns 2 and 3 computed only what follows the previous turn's prompt (and answer)
        assert runner.stats["prefix_hits"] == 2 and runner.stats["prefix_tokens_reused"] > 2 * 10
        sizes = [len(proc.tokenizer.encode_plain(chat_prompt(q, history[:i]))) for i, (q, _) in enumerate(history)]
        assert runner.stats["prefix_tokens_reused"] >= sum(sizes[:2])


@pytest.mark.parametrize("decoding", DECODINGS[:2], ids=["greedy", "beams"])
def test_stream_equals_answer_and_may_stop_early(lm, decoding):
    _, model, proc = lm
    img, runner = image(2), Blip2Runner(model, proc)
    stream = runner.ask_stream(img, "what is it?", **decoding)
    pieces = list(stream)
    expected = Blip2Runner(model, proc).ask(img, "what is it?", **decoding).text
    assert "".join(pieces) == stream.text == expected and not stream.truncated
    assert decoding.get("num_beams") or len(pieces) > 1
    stream = iter(runner.ask_stream(img, "and this?", [("what is it?", expected)], **decoding))
    next(stream, None)
    stream.close()  # the consumer went away: the cache stays usable
    again = runner.ask(img, "and this?", [("what is it?", expected)], **decoding)
    assert again == Blip2Runner(model, proc).ask(img, "and this?", [("what is it?", expected)], **decoding)


def test_over_long_prompts_are_cut_from_the_left(lm):
    name, model, proc = lm
    img, runner = image(3), Blip2Runner(model, proc)
    # the positions the image tokens leave / the tokenizer's model_max_length
    limit = model.config.text_config.max_position_embeddings - 4 if name == "opt" else 512
    history = [(f"question number {i} about the thing", f"answer {i}") for i in range(40)]
    got = runner.ask(img, "which one?", history, max_new_tokens=4)
    assert got.truncated and got.prompt.startswith("Question: question number") and got.prompt.endswith(
        f"Question: which one? {ANSWER[name]}")
    assert got.prompt.count("Question:") < 41 and "number 39" in got.prompt  # the oldest turns went first
    assert got == Blip2Runner(model, proc).ask(img, "which one?", history, max_new_tokens=4)
    words = " ".join(f"w{i}" for i in range(limit * 2))
    got = runner.caption(img, words, max_new_tokens=4)
    assert got.truncated and got.prompt.endswith(f"w{limit * 2 - 1}") and len(got.prompt) < len(words)
    assert not runner.caption(img, "", max_new_tokens=4).truncated
    if name == "opt":  # more new tokens than the positions leave: lowered to what they leave (the app's and CLI's)
        got = runner.caption(img, max_new_tokens=limit)
        assert got.max_new_tokens == limit - len(proc.tokenizer.encode_plain("")) and not got.truncated


def test_fitting_reports_dropped_turns_and_lowers_new_tokens(lm):
    """What the app's notes come from: how many turns were left out, and (a decoder's positions)
    the max_new_tokens the prompt leaves, generated without error."""
    name, model, proc = lm
    img, runner = image(3), Blip2Runner(model, proc)
    history = [(f"question number {i} about the thing", f"answer {i}") for i in range(40)]
    got = runner.ask(img, "which one?", history, max_new_tokens=4)
    assert got.dropped_turns > 0 and got.prompt.count("Question:") - 1 + got.dropped_turns == len(history)
    assert got.max_new_tokens == 4
    if name == "opt":
        positions = runner.context_size - model.config.num_query_tokens  # prompt + new tokens
        got = runner.ask(img, "which one?", [], max_new_tokens=positions)
        assert not got.truncated and got.max_new_tokens == positions - len(got.fitted.ids)
        got = runner.caption(img, max_new_tokens=positions, min_new_tokens=positions)
        assert got.max_new_tokens == positions - len(proc.tokenizer.encode_plain("")) and not got.truncated


def test_special_token_strings_in_user_text_stay_text(lm):
    """"<image>" and "</s>" typed by a user are tokenized as plain text (the reference tokenizer with
    split_special_tokens=True is the oracle), and the answer is generate's on those ids."""
    import transformers

    name, model, proc = lm
    img, runner = image(4), Blip2Runner(model, proc)
    image_id = model.config.image_token_index
    assert image_id in proc.tokenizer("a <image> b")["input_ids"]  # what the raw tokenizer would do
    prompt = f"Question: what is <image> and </s> here? {ANSWER[name]}"
    ref_tok = transformers.AutoTokenizer.from_pretrained(shared_checkpoint(name))
    plain = ref_tok(prompt, split_special_tokens=True)["input_ids"]
    assert proc.tokenizer.encode_plain(prompt) == plain and image_id not in plain
    got = runner.ask(img, "what is <image> and </s> here?", max_new_tokens=5)
    n = model.config.num_query_tokens if image_id is not None else 0
    ids = torch.tensor([[image_id] * n + plain])
    out = model.generate(pixel_values=proc.image_processor(img, return_tensors="pt")["pixel_values"], input_ids=ids,
                         attention_mask=torch.ones_like(ids), max_new_tokens=5)
    new = out[:, 1:] if name == "t5" else out[:, ids.shape[1]:]
    assert got.text == proc.batch_decode(new, skip_special_tokens=True)[0].strip()


def test_image_cache_is_keyed_by_content_and_bounded_in_bytes(lm, tmp_path):
    _, model, proc = lm
    one = Blip2Runner(model, proc).image_embeds(image(5))[0]
    size = one.numel() * one.element_size()
    runner = Blip2Runner(model, proc, image_cache_bytes=int(size * 1.5))
    img = image(5)
    path = tmp_path / "x.png"
    img.save(path)
    for source in (img, image(5), path, np.asarray(img)):  # the same pixels four ways: computed once
        assert torch.equal(runner.image_embeds(source)[0], one)
    assert runner.stats["feature_misses"] == 1 and runner.stats["feature_hits"] == 3
    runner.image_embeds(image(6))  # evicts the first (the budget holds one image)
    runner.image_embeds(img)
    assert runner.stats["feature_misses"] == 3 and runner.features.bytes <= size * 1.5


def test_fit_is_a_pure_function_of_ids_and_limits():
    """Candidates are tried oldest-turns-dropped-first; a decoder's new tokens are lowered to what its positions
    leave (at least 8 before the text is cut); the cut keeps the template's special ids and the last text ids."""
    special = [2]
    candidates = [[2] + list(range(10, 40)), [2] + list(range(10, 25)), [2] + list(range(10, 18))]
    assert fit(candidates, special, Limits(100, 40), 20).index == 1  # 16 ids + 20 new <= 40
    done = fit(candidates, special, Limits(100, 20), 20)  # none fits: the last, new tokens lowered
    assert (done.index, done.cut, done.max_new_tokens) == (2, False, 11)
    done = fit([[2] + list(range(10, 40))], special, Limits(100, 20), 20)  # cut to leave 8 new tokens
    assert done.cut and done.ids == [2] + list(range(29, 40)) and done.max_new_tokens == 8
    done = fit([[2] + list(range(10, 40))], special, Limits(12), 50)  # an encoder-decoder: the text limit only
    assert done.cut and len(done.ids) == 12 and done.max_new_tokens == 50
    assert truncate_left([5, 6, 7, 1], [1], 3) == [6, 7, 1]  # a special id after the text stays too
    with pytest.raises(ValueError, match="no room"):
        fit([[2, 3]], special, Limits(100, 5), 20)

