"""blip2.scheduler: requests that share the batching loop get what they get alone (float32 ids: greedy and seeded
sampling; beam search as rows of the batch), whatever arrives, leaves or is cancelled meanwhile."""

import threading

import numpy as np
import pytest
import torch
from PIL import Image
from threads import in_threads
from tiny_checkpoints import checkpoint, shared_checkpoint

import blip2
from blip2.catalogue import EMBEDDED_MODELS, GENERATION
from blip2.processing import Blip2Processor
from blip2.runner import Blip2Runner


@pytest.fixture(scope="module", params=["embedded", "opt", "t5"])
def lm(request):
    path = EMBEDDED_MODELS[GENERATION] if request.param == "embedded" else shared_checkpoint(request.param)
    model = blip2.Blip2ForConditionalGeneration.from_pretrained(path)
    return request.param, model, Blip2Processor.from_pretrained(path)


def image(seed, size=(40, 50)):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8))


HISTORY = [("what is in the picture?", "a red circle"), ("where is it?", "on the left of the picture"),
           ("how many are there?", "two")]
# (image seed, question or None for a caption, chat history, decoding): mixed prompt lengths, max_new_tokens,
# histories, greedy and seeded sampling
REQUESTS = [
    (0, None, [], dict(max_new_tokens=9, min_new_tokens=9)),
    (1, "what colour is it?", HISTORY, dict(max_new_tokens=4)),
    (2, "is there a square?", HISTORY[:1], dict(max_new_tokens=12, min_new_tokens=6)),
    (0, "what is it?", [], dict(max_new_tokens=7, do_sample=True, seed=5, temperature=1.5)),
    (3, None, [], dict(max_new_tokens=6, repetition_penalty=1.3, no_repeat_ngram_size=2)),
    (1, "and now?", HISTORY[:2], dict(max_new_tokens=10, do_sample=True, seed=11, top_k=20, top_p=0.9)),
]


def call(runner, request, stop=None):
    seed, question, history, decoding = request
    decoding = decoding | ({"stop": stop} if stop else {})
    if question is None:
        return runner.caption(image(seed), **decoding)
    return runner.ask(image(seed), question, history, **decoding)


def alone(model, proc, request):
    """The request on a runner of its own, nothing else running."""
    return call(Blip2Runner(model, proc), request)


def staggered(runner, requests, after=2):
    """Run the requests in threads, each one starting once the previous one has decoded `after` tokens (so that
    each arrives in the middle of the others' decoding). Returns their results in order."""
    results = [None] * len(requests)
    started = [threading.Event() for _ in requests]

    def worker(i):
        if i:
            started[i - 1].wait(30)
        calls = []

        def stop():
            calls.append(1)
            if len(calls) == after:
                started[i].set()

        try:
            results[i] = call(runner, requests[i], stop)
        finally:
            started[i].set()

    errors = in_threads(worker, len(requests))
    assert not errors, errors
    return results


def test_requests_in_the_batch_get_what_they_get_alone(lm):
    """Greedy ids and seeded samples, mixed prompt lengths, max_new_tokens and chat histories, each request arriving
    while the others decode: every text equals the request's text alone (float32)."""
    _, model, proc = lm
    runner = Blip2Runner(model, proc)
    got = staggered(runner, REQUESTS)
    assert [g.text for g in got] == [alone(model, proc, r).text for r in REQUESTS]
    stats = runner.captioner.scheduler.stats
    assert stats["rows_stepped"] > stats["steps"]  # rows really shared steps
    assert not runner.captioner.scheduler.running and runner.captioner.scheduler.batch is None  # all freed


def test_many_at_once_and_beam_search_as_rows(lm):
    """Six requests at once (one prompt pass for those that arrive together) beside a beam search and several
    samples of one request, all equal to alone."""
    _, model, proc = lm
    runner = Blip2Runner(model, proc)
    requests = REQUESTS + [(4, None, [], dict(max_new_tokens=6, num_beams=3, num_return_sequences=2)),
                           (5, "what is it?", [], dict(max_new_tokens=5, do_sample=True, seed=2,
                                                       num_return_sequences=3))]
    results = [None] * len(requests)
    go = threading.Barrier(len(requests))

    def worker(i):
        go.wait()
        results[i] = call(runner, requests[i])

    assert not in_threads(worker, len(requests))
    assert [g.texts for g in results] == [alone(model, proc, r).texts for r in requests]
    assert runner.captioner.scheduler.stats["prompts"] > runner.captioner.scheduler.stats["prompt_passes"]


def test_a_closed_stream_frees_its_rows_at_the_next_step(lm):
    """A visitor who goes away: closing the stream ends its decoding between tokens; the others finish as alone."""
    _, model, proc = lm
    runner = Blip2Runner(model, proc)
    scheduler = runner.captioner.scheduler
    stream = runner.ask_stream(image(6), "what is it?", max_new_tokens=40, min_new_tokens=40)
    pieces = iter(stream)
    next(pieces)
    others = staggered(runner, REQUESTS[:3], after=1)
    stream.close()
    for _ in range(200):  # the loop drops the closed request's rows at its next turn
        with scheduler.lock:
            if all(r.left or r not in scheduler.running for r in scheduler.running):
                break
        threading.Event().wait(0.01)
    assert [g.text for g in others] == [alone(model, proc, r).text for r in REQUESTS[:3]]
    again = runner.ask(image(6), "what is it?", max_new_tokens=5)  # the image's prefix cache still works
    assert again.text == alone(model, proc, (6, "what is it?", [], dict(max_new_tokens=5))).text


def test_a_stop_that_raises_fails_its_request_only(lm):
    _, model, proc = lm
    runner = Blip2Runner(model, proc)
    calls = []

    def stop():
        calls.append(1)
        if len(calls) == 3:
            raise TimeoutError("time is up")

    results = [None]

    def other():
        results[0] = call(runner, REQUESTS[0])

    t = threading.Thread(target=other)
    t.start()
    with pytest.raises(TimeoutError, match="time is up"):
        runner.caption(image(7), max_new_tokens=20, min_new_tokens=20, stop=stop)
    t.join(60)
    assert results[0].text == alone(model, proc, REQUESTS[0]).text


def test_caption_batch_is_requests_of_the_loop(lm):
    _, model, proc = lm
    runner = Blip2Runner(model, proc)
    images = [image(i, (30 + 7 * i, 40)) for i in range(5)]
    got = runner.caption_batch(images, ["", "a photo of", "", "this is", ""], max_new_tokens=6)
    expected = [Blip2Runner(model, proc).caption(im, p, max_new_tokens=6).text
                for im, p in zip(images, ["", "a photo of", "", "this is", ""])]
    assert [g.text for g in got] == expected
    assert runner.captioner.scheduler.stats["image_encodes"] == 5
    with torch.no_grad():
        assert runner.caption_batch([]) == []


@pytest.mark.parametrize("family", ["t5", "opt"])
def test_int4_rows_share_one_call_steps(family, monkeypatch, tmp_path):
    """A weight-only model in bfloat16: the batching loop's steps run in one call of blip2's kernel (decoder_step),
    its rows joining and leaving, and each request still gets what it gets alone (OPT 32 wide: blip2's LayerNorm
    takes whole vectors of 16)."""
    from blip2 import decoder_step, native

    if not native.available():
        pytest.fail("blip2's kernels cannot be built here (a C++ compiler with OpenMP and an x86 CPU with AVX2)")
    path = checkpoint(tmp_path, family, text={"hidden_size": 32} if family == "opt" else None)
    model = blip2.Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16,
                                                                quantization="int4_weight_only")
    proc = Blip2Processor.from_pretrained(path)
    rows, real = [], decoder_step.run

    def counted(layers, x, *args):
        y = real(layers, x, *args)
        if y is not None:
            rows.append(x.shape[0])
        return y

    monkeypatch.setattr(decoder_step, "run", counted)
    runner = Blip2Runner(model, proc)
    got = staggered(runner, REQUESTS)
    assert max(rows) > 1  # steps of several rows ran in one call
    assert [g.text for g in got] == [alone(model, proc, r).text for r in REQUESTS]
