"""The launched app driven through gradio_client: every public endpoint, by name."""

import os
import time

import app_support as S
import pytest
from PIL import Image

from app import examples
from blip2.retrieval import match_score

pytestmark = pytest.mark.usefixtures("one_thread")

ENDPOINTS = ["/caption", "/chat", "/clear_chat", "/match", "/heatmap", "/search", "/load_model", "/model_info"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    d = tmp_path_factory.mktemp("scenes")
    out = []
    for i, s in enumerate(S.one_object_scenes(4)):
        out.append((s, S.write(d, f"scene{i}.png", S.png_bytes(s.render(224)))))
    return out


def img(path):
    from gradio_client import handle_file

    return handle_file(path)


def text_of(message):
    content = message["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


def test_every_endpoint_is_named(client):
    api = client.view_api(print_info=False, return_format="dict")
    named = set(api["named_endpoints"])
    assert set(ENDPOINTS) <= named, named
    params = [p["parameter_name"] for p in api["named_endpoints"]["/caption"]["parameters"]]
    assert params == ["image", "prompt", "mode", "num_beams", "temperature", "top_p", "top_k", "max_new_tokens",
                      "min_new_tokens", "repetition_penalty", "length_penalty", "num_captions"]
    assert "/load_example" not in named and not any("lambda" in n for n in named)


def test_caption_streams_and_matches_the_handler(client, scenes):
    scene, path = scenes[0]
    job = client.submit(img(path), "", "beam search", 1, 1.0, 0.9, 50, 20, 1, 1.0, 1.0, 1, api_name="/caption")
    final = job.result(timeout=120)
    outputs = [o[0] for o in job.outputs()]
    assert len(set(outputs)) >= 2, "the caption arrives in pieces"
    assert all(outputs[-1].startswith(o.strip()) or not o for o in outputs[:-1])
    direct = None
    for direct in S.app().caption.caption(path, "", "beam search", 1, 1.0, 0.9, 50, 20, 1, 1.0, 1.0, 1):
        pass
    assert final[0] == direct[0] == scene.caption()


def test_caption_with_prefix_beams_and_several_captions(client, scenes):
    scene, path = scenes[1]
    text, notice = client.predict(img(path), "a photo of", "beam search", 3, 1.0, 0.9, 50, 20, 1, 1.0, 1.0, 3,
                                  api_name="/caption")
    lines = text.splitlines()
    assert len(lines) == 3 and all(line.split(". ", 1)[1].startswith("a photo of ") for line in lines)
    assert lines[0] == f"1. a photo of {scene.caption()}"
    text, _ = client.predict(img(path), "", "nucleus sampling", 1, 0.8, 0.9, 20, 10, 1, 1.2, 1.0, 2,
                             api_name="/caption")
    assert [line[:3] for line in text.splitlines()] == ["1. ", "2. "]


def test_chat_keeps_a_per_session_history(server, scenes):
    a, b = server.client(), server.client()
    (s0, p0), (s1, p1) = scenes[0], scenes[1]
    conv, notice = a.predict(img(p0), f"what color is the {s0.objects[0].shape}?", api_name="/chat")
    assert [m["role"] for m in conv] == ["user", "assistant"] and text_of(conv[1]) == s0.objects[0].color
    conv, notice = a.predict(img(p0), "what shape is it?", api_name="/chat")
    assert len(conv) == 4 and text_of(conv[2]) == "what shape is it?"
    other, _ = b.predict(img(p0), "how many shapes are there?", api_name="/chat")
    assert len(other) == 2, "another session starts with its own, empty history"
    conv, notice = a.predict(img(p1), "what color is the shape?", api_name="/chat")
    assert len(conv) == 2 and "new image" in notice.lower()
    conv, notice = a.predict(api_name="/clear_chat")
    assert conv == []
    conv, _ = a.predict(img(p1), f"what color is the {s1.objects[0].shape}?", api_name="/chat")
    assert len(conv) == 2 and text_of(conv[1]) == s1.objects[0].color


def test_match_and_heatmap(client, scenes):
    scene, path = scenes[2]
    texts = [scene.caption(), "a large white star in the bottom right", "two black crosses"]
    table, itm_chart, itc_chart, heat, notice = client.predict(img(path), "\n".join(texts), api_name="/match")
    assert table["headers"] == ["rank", "text", "ITM probability", "ITC cosine"]
    assert sorted(row[1] for row in table["data"]) == sorted(texts)
    assert all(0 <= row[2] <= 1 and -1 <= row[3] <= 1 for row in table["data"])
    scores = [match_score(row[2], row[3]) for row in table["data"]]
    assert scores == sorted(scores, reverse=True)  # ranked by ITM log-odds + ITC (to table precision)
    assert table["data"][0][1] == scene.caption()
    assert len(itm_chart["data"]) == len(itc_chart["data"]) == len(texts)
    assert notice.startswith(f"Best match: **{scene.caption()}**")
    heat2, notice2 = client.predict(img(path), texts[1], api_name="/heatmap")
    assert notice2 == f"Heat map (Grad-CAM) for: **{texts[1]}**"
    for h in (heat, heat2):
        with Image.open(h["path"] if isinstance(h, dict) else h) as im:
            assert im.size == (224, 224)  # the overlay over the whole 224 px scene


def test_search_ranks_a_gallery(client, scenes):
    gallery = [{"image": img(p), "caption": None} for _, p in scenes]
    target, _ = scenes[3]
    results, table, notice = client.predict(gallery, target.caption(), 2, api_name="/search")
    assert len(results) == len(scenes) and len(table["data"]) == len(scenes)
    assert [row[0] for row in table["data"]] == list(range(1, len(scenes) + 1))
    assert [r["caption"].split(" · ")[0] for r in results] == [f"#{i}" for i in range(1, len(scenes) + 1)]
    assert table["data"][0][1] == "scene3.png"  # the target scene first
    assert sum(isinstance(row[2], float) for row in table["data"]) == 2  # the top 2 re-ranked by ITM
    assert [row[2] for row in table["data"][2:]] == ["not re-ranked"] * (len(scenes) - 2)
    assert all(r["caption"].split(" · ")[1] == "not re-ranked" for r in results[2:])


def test_example_gallery_is_searchable(client):
    gallery = [{"image": img(p), "caption": None} for p in examples.gallery()]
    results, table, notice = client.predict(gallery, "a cat", 3, api_name="/search")
    assert sorted(row[1] for row in table["data"]) == sorted(os.path.basename(p) for p in examples.gallery())
    photos = sum(p.endswith(".jpg") for p in examples.gallery())  # the 4 photographs, outside the world
    assert notice.startswith(f"Ranked {len(gallery)} images. ⚠️ {photos} of these {len(gallery)} images look like "
                             "a photograph, outside the embedded model's world")


def test_load_model_and_model_info(server, scenes):
    from gradio_client.exceptions import AppError

    c = server.client()
    info = c.predict(api_name="/model_info")
    names = [ck["name"] for ck in info["checkpoints"]]
    assert "blip2-tiny (embedded)" in names and "Salesforce/blip2-opt-2.7b" in names
    assert "Salesforce/blip2-itm-vit-g" in names and info["limits"]["queue_size"] == S.TEST_LIMITS["queue_size"]
    status = c.predict("blip2-tiny (embedded)", api_name="/load_model")
    assert status.startswith("**Serving:** blip2-tiny (embedded) (all tabs)")
    with pytest.raises(AppError) as e:  # offline (HF_HUB_OFFLINE=1 in the tests): a readable refusal
        c.predict("Salesforce/blip2-flan-t5-xl", api_name="/load_model")
    assert "Salesforce/blip2-flan-t5-xl" in str(e.value) and ("cache" in str(e.value) or "memory" in str(e.value))
    text, _ = c.predict(img(scenes[0][1]), "", api_name="/caption")  # still serving the model it had
    assert text == scenes[0][0].caption()
    assert c.predict(api_name="/model_info")["session"]["generation"] == "blip2-tiny (embedded)"


def test_cli_starts_offline_on_the_embedded_model(tmp_path):
    """`python app.py` serves the embedded model offline within seconds; a bad --model stops with a message."""
    import os
    import subprocess
    import sys

    import httpx

    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    port = S.free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=S.ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready = None
        while time.monotonic() - t0 < 120 and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/gradio_api/info", timeout=2).status_code == 200:
                    ready = time.monotonic() - t0
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert ready is not None, proc.stdout.read() if proc.poll() is not None else "not ready in 120 s"
        info = httpx.get(f"http://127.0.0.1:{port}/gradio_api/info", timeout=5).json()
        assert "/caption" in info["named_endpoints"]
        print(f"app.py answered after {ready:.1f} s")
    finally:
        proc.terminate()
        proc.wait(20)
    bad = subprocess.run([sys.executable, "app.py", "--model", str(tmp_path / "missing"), "--port", "1"],
                         cwd=S.ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "missing" in bad.stderr and "not found" in bad.stderr


def test_cli_flags_and_environment(monkeypatch):
    import importlib.util  # app.py by path: the name `app` is the package

    spec = importlib.util.spec_from_file_location("app_main", S.ROOT + "/app.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    args = main.parse_args(["--model", "Salesforce/blip2-opt-2.7b", "--itm-model", "Salesforce/blip2-itm-vit-g",
                            "--dtype", "float16", "--quantize", "8bit", "--device-map", "auto", "--port", "7000"])
    assert (args.model, args.itm_model, args.dtype, args.quantize, args.device_map, args.port) == (
        "Salesforce/blip2-opt-2.7b", "Salesforce/blip2-itm-vit-g", "float16", "8bit", "auto", 7000)
    for k, v in {"BLIP2_MODEL": "m", "BLIP2_ITM_MODEL": "i", "BLIP2_DTYPE": "bfloat16", "BLIP2_QUANTIZE": "4bit",
                 "BLIP2_DEVICE_MAP": "auto", "GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861"}.items():
        monkeypatch.setenv(k, v)
    args = main.parse_args([])
    assert (args.model, args.itm_model, args.dtype, args.quantize, args.device_map, args.host, args.port) == (
        "m", "i", "bfloat16", "4bit", "auto", "0.0.0.0", 7861)
    monkeypatch.setenv("BLIP2_TIME_LIMIT_S", "12.5")
    monkeypatch.setenv("BLIP2_MAX_GALLERY", "7")
    from app.config import Limits

    limits = Limits.from_env()
    assert (limits.time_limit_s, limits.max_gallery) == (12.5, 7)
