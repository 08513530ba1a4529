"""The launched app serves a room at once: 8 clients stream answers from the captioner's batching loop together, one
goes away mid-answer, the others get what they get alone; loading another checkpoint waits for running requests."""

import threading

import app_support as S
import pytest
from gradio_client import handle_file
from threads import in_threads
from tiny_checkpoints import shared_checkpoint

from app.errors import RequestError
from blip2.catalogue import GENERATION

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["what color is the shape?", "how many shapes are there?", "what shape is it?", "where is it?",
             "is it big?", "what is on the left?", "what color is the background?", "is there a circle?"]
LONG = dict(max_new_tokens=60, min_new_tokens=50)  # answers long enough to leave in the middle of


def test_eight_clients_stream_at_once_and_one_goes_away(svc, server, scene_path):
    scheduler = svc.registry.get(svc.registry.default[GENERATION], GENERATION).runner.scheduler
    key = svc.registry.default[GENERATION]
    alone = [S.last(svc.chat(key, scene_path, q, [], LONG)).answer for q in QUESTIONS]
    steps_before = scheduler.stats["steps"]
    clients = [server.client() for _ in QUESTIONS]
    results, received = [None] * len(QUESTIONS), [0] * len(QUESTIONS)
    go = threading.Barrier(len(QUESTIONS))

    def visitor(i):
        go.wait()
        job = clients[i].submit(handle_file(scene_path), QUESTIONS[i], **LONG, api_name="/chat")
        for _ in job:
            received[i] += 1
            if i == 0 and received[i] == 2:  # the visitor closes the tab mid-answer
                job.cancel()
                return
        content = job.outputs()[-1][0][-1]["content"]  # the last chat message: the answer
        results[i] = content if isinstance(content, str) else "".join(part["text"] for part in content)

    errors = in_threads(visitor, len(QUESTIONS))
    assert not errors, errors
    assert results[1:] == alone[1:]  # the others: as alone, streamed to the end
    assert all(n > 2 for n in received[1:])
    assert scheduler.stats["rows_stepped"] - steps_before > scheduler.stats["steps"] - steps_before  # shared steps
    for _ in range(100):  # the gone visitor's rows leave the batch: nothing is left running
        with scheduler.lock:
            if not scheduler.running and not scheduler.arriving:
                break
        threading.Event().wait(0.05)
    assert not scheduler.running and not scheduler.arriving


def test_a_load_waits_for_running_requests_and_refuses_new_ones(svc):
    """Loading another checkpoint waits until the requests running end, and refuses new ones meanwhile."""
    registry = svc.registry
    key = registry.add_source(shared_checkpoint("opt"), GENERATION)
    started, release, loaded = threading.Event(), threading.Event(), []

    def running_request():
        with registry.serving():
            started.set()
            release.wait(60)

    request = threading.Thread(target=running_request)
    request.start()
    started.wait(10)
    loader = threading.Thread(target=lambda: loaded.append(registry.get(key, GENERATION)))
    loader.start()
    refusal = None
    for _ in range(200):  # once the load has begun, a new request is refused with a message
        try:
            with registry.serving():
                pass
        except RequestError as e:
            refusal = str(e)
            break
        threading.Event().wait(0.05)
    assert refusal is not None and "is loading" in refusal and "try again" in refusal.lower()
    assert not loaded and loader.is_alive()  # the load waits for the running request
    release.set()
    request.join(10)
    loader.join(120)
    assert loaded and loaded[0].key == key
    with registry.serving():  # served again once loaded
        pass
