"""A request reads only what a visitor uploaded (or the app's examples); nothing goes public by accident.

Attacks as an outsider would send them, against the launched app on loopback, through gradio_client and raw HTTP,
on every endpoint that takes a file: a real PNG in a private folder outside Gradio's upload folder named by path
(with and without FileData meta), a symlink inside the upload folder pointing at it, `..` and URL-encoded
variants, and missing paths. Each is refused with one message that does not depend on what is on disk, the file's
content never comes back, nothing new becomes downloadable, and a normal request works right after.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import app_support as S
import httpx
import pytest
from PIL import PngImagePlugin

from app.files import NOT_UPLOADED, NotUploaded, request_file, upload_folder

ENDPOINTS = {  # api name -> the data list after the image (None: the image is a gallery item)
    "caption": [],
    "chat": [],
    "match": ["a red circle"],
    "heatmap": ["a red circle"],
    "search": None,
}


@pytest.fixture(scope="module")
def secret():
    """A real PNG (a scene the embedded model captions well) with a marker in a text chunk, in a private folder
    outside Gradio's upload folder; removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="blip2-private-"))
    assert not str(folder.resolve()).startswith(str(Path(upload_folder()).resolve()))
    marker = f"SECRET-{uuid.uuid4().hex}"
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", marker)
    path = folder / "private.png"
    S.scene(0)[1].save(path, "PNG", pnginfo=info)
    yield path, marker
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def scene_path(tmp_path_factory):
    return S.write(tmp_path_factory.mktemp("security"), "scene.png", S.png_bytes(S.scene(1)[1]))


def attack_paths(secret_path: Path):
    """(name, path) of every way of naming the private file, or a missing one, that the app must refuse."""
    uploads = Path(upload_folder())
    link_dir = uploads / "blip2-tests" / "links"
    link_dir.mkdir(parents=True, exist_ok=True)
    link, dangling = link_dir / f"{uuid.uuid4().hex}.png", link_dir / f"{uuid.uuid4().hex}.png"
    link.symlink_to(secret_path)
    dangling.symlink_to(secret_path.parent / "missing.png")
    up = os.path.relpath(secret_path, uploads)  # ../blip2-private-xxx/private.png
    return [
        ("absolute path", str(secret_path)),
        ("symlink inside the upload folder", str(link)),
        ("dangling symlink inside the upload folder", str(dangling)),
        ("dot-dot out of the upload folder", str(uploads / up)),
        ("URL-encoded dot-dot", str(uploads) + "/" + up.replace("../", "..%2F")),
        ("percent-encoded dots", str(uploads) + "/" + up.replace("..", "%2e%2e")),
        ("file URL", "file://" + str(secret_path)),
        ("missing, outside", str(secret_path.parent / "missing.png")),
        ("missing, inside the upload folder", str(uploads / "blip2-tests" / "missing.png")),
        ("relative path", os.path.relpath(secret_path)),
    ]


def payload(path, meta):
    return {"path": path, "meta": {"_type": "gradio.FileData"}} if meta else {"path": path}


def data_for(api_name, image):
    rest = ENDPOINTS[api_name]
    if rest is None:
        return [[{"image": image, "caption": None}], "a red circle"]
    return [image, *rest]


def raw_call(server, client, api_name, data):
    """POST /gradio_api/call/<api_name> (the parameters not given: their API defaults, as a browser sends every
    value), then read the event stream: the reply's whole text."""
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"][f"/{api_name}"]["parameters"]
    data = data + [p["parameter_default"] for p in params[len(data):]]
    r = httpx.post(server.url + f"gradio_api/call/{api_name}", json={"data": data}, timeout=30)
    if r.status_code != 200:
        return r.text
    event_id = r.json()["event_id"]
    with httpx.stream("GET", server.url + f"gradio_api/call/{api_name}/{event_id}", timeout=60) as s:
        return "".join(s.iter_text())


def stored_copies(content: bytes):
    """Files under Gradio's upload folder with exactly these bytes."""
    found = []
    for root, _, files in os.walk(upload_folder()):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p) and os.path.getsize(p) == len(content) and Path(p).read_bytes() == content:
                found.append(p)
    return found


def assert_refused(reply: str, path: str, marker: str):
    assert "event: error" in reply or "error" in reply.lower(), reply
    assert "event: complete" not in reply, reply
    assert marker not in reply
    assert "not uploaded" in reply, reply


def normalised(reply: str) -> str:
    """The reply with the path that Gradio's own refusal quotes back (the caller's, made absolute) replaced."""
    return re.sub(r"Cannot move (.+?) to the gradio cache dir", "Cannot move <path> to the gradio cache dir", reply)


@pytest.mark.parametrize("api_name", list(ENDPOINTS))
def test_server_files_are_refused_over_raw_http(server, client, secret, scene_path, api_name):
    secret_path, marker = secret
    content = secret_path.read_bytes()
    before = stored_copies(content)
    assert before == []
    replies = {}
    for name, path in attack_paths(secret_path):
        for meta in (False, True):
            reply = raw_call(server, client, api_name, data_for(api_name, payload(path, meta)))
            assert_refused(reply, path, marker)
            replies[(name, meta)] = normalised(reply)
    # Without meta, the app's gate answers every path with one message. With meta, Gradio's own check refuses a
    # path that resolves outside its upload folder first, with its message naming the caller's own path (compared
    # here with that path replaced); what passes it meets the app's gate. Either way the reply never tells an
    # existing file from a missing one.
    assert len({replies[(name, False)] for name, _ in attack_paths(secret_path)}) == 1
    for meta in (False, True):
        assert replies[("absolute path", meta)] == replies[("missing, outside", meta)]
        assert replies[("symlink inside the upload folder", meta)] == \
            replies[("dangling symlink inside the upload folder", meta)]
    assert len(set(replies.values())) <= 2
    assert stored_copies(content) == []  # nothing of the private file was copied where Gradio serves files
    status = httpx.get(server.url + "gradio_api/file=" + str(secret_path), timeout=10).status_code
    assert status in (403, 404)
    _normal_request_works(client, scene_path, api_name)


@pytest.mark.parametrize("api_name", list(ENDPOINTS))
def test_server_files_are_refused_through_gradio_client(client, secret, scene_path, api_name):
    from gradio_client.exceptions import AppError

    secret_path, marker = secret
    messages = {}
    for name, path in attack_paths(secret_path):  # without meta: with it the client uploads its own copy
        with pytest.raises(AppError) as info:
            client.predict(*data_for(api_name, payload(path, False)), api_name=f"/{api_name}")
        message = str(info.value)
        assert marker not in message and NOT_UPLOADED in message.lower(), (name, message)
        messages[name] = message
    assert len(set(messages.values())) == 1, messages  # one message, whatever the path and whatever is there
    _normal_request_works(client, scene_path, api_name)


def text_of(message) -> str:
    """A Chatbot message's text (Gradio 6 sends a list of parts)."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def _normal_request_works(client, scene_path, api_name):
    from gradio_client import handle_file

    out = client.predict(*data_for(api_name, handle_file(scene_path)), api_name=f"/{api_name}")
    if api_name == "caption":
        assert out[0].strip()
    elif api_name == "chat":
        assert out[0][-1]["role"] == "assistant" and text_of(out[0][-1]).strip()
    elif api_name == "match":
        assert out[0]["data"][0][1] == "a red circle"
    elif api_name == "heatmap":
        assert Path(out[0]["path"] if isinstance(out[0], dict) else out[0]).is_file()
    else:
        assert len(out[0]) == 1


def test_the_gate_refuses_outside_paths_without_touching_them(monkeypatch, secret):
    """A path outside the readable folders is refused on its text alone: never opened, stat'ed or resolved (only
    the readable folders themselves are resolved)."""
    from app.files import readable_roots

    secret_path, _ = secret
    roots = {str(p) for p in (upload_folder(), Path(upload_folder()), *readable_roots(), S.ROOT)} | \
        {str(Path(S.ROOT) / "assets" / "examples")}
    touched = []
    for name in ("realpath", "isfile", "exists", "lexists", "islink"):
        real = getattr(os.path, name)
        monkeypatch.setattr(os.path, name, lambda p, *a, _real=real, **k: touched.append(str(p)) or _real(p, *a, **k))
    monkeypatch.setattr(os, "stat", lambda *a, **k: touched.append(str(a[0])) or _stat(*a, **k))
    for path in (secret_path, "/etc/passwd", str(Path(upload_folder()) / ".." / "x.png"), "", "a\x00b", 3):
        with pytest.raises(NotUploaded):
            request_file(path)
    monkeypatch.undo()
    assert [p for p in touched if p not in roots] == []


_stat = os.stat


def test_uploads_and_examples_are_readable(scene_path):
    from app.paths import EXAMPLES_DIR

    assert request_file(scene_path) == Path(scene_path).resolve()
    assert request_file(EXAMPLES_DIR / "scene_1.png") == (EXAMPLES_DIR / "scene_1.png").resolve()
    with pytest.raises(NotUploaded):
        request_file(EXAMPLES_DIR / ".." / ".." / "blip2" / "assets" / "blip2-tiny" / "config.json")


# ----------------------------------------------------------------------------------------------------
# the API's defaults: a call with the required arguments alone works


def test_the_api_schema_carries_the_readme_defaults(client):
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    params = {name: {p["parameter_name"]: p for p in ep["parameters"]} for name, ep in api.items()}
    assert params["/caption"]["prompt"]["parameter_has_default"] and params["/caption"]["prompt"][
        "parameter_default"] == ""
    assert params["/chat"]["question"]["parameter_has_default"]
    for name in ("/caption", "/chat"):
        required = [p for p, info in params[name].items() if not info["parameter_has_default"]]
        assert required == ["image"], (name, required)
        assert params[name]["max_new_tokens"]["parameter_default"] == (30 if name == "/caption" else 20)
    assert params["/search"]["rerank_k"]["parameter_default"] == 5


def test_caption_and_chat_answer_with_the_image_alone(client, scene_path):
    from gradio_client import handle_file

    from app.chat import DEFAULT_QUESTION

    img = handle_file(scene_path)
    alone = client.predict(img, api_name="/caption")
    assert alone[0].strip()
    assert alone[0] == client.predict(img, "", "beam search", 1, 1.0, 0.9, 50, 30, 1, 1.0, 1.0, 1,
                                      api_name="/caption")[0]
    chat = S.get_server().client().predict(img, api_name="/chat")[0]  # a new session each: no earlier turns
    assert [m["role"] for m in chat] == ["user", "assistant"] and text_of(chat[0]) == DEFAULT_QUESTION
    explicit = S.get_server().client().predict(img, DEFAULT_QUESTION, api_name="/chat")[0]
    assert text_of(chat[1]) == text_of(explicit[1]) and text_of(chat[1]).strip()


# ----------------------------------------------------------------------------------------------------
# boolean environment variables


def _parse(monkeypatch, **env):
    import importlib.util

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    spec = importlib.util.spec_from_file_location("app_main", str(Path(S.ROOT) / "app.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args([])


@pytest.mark.parametrize("variable,attr", [("BLIP2_SHARE", "share"), ("BLIP2_NO_WARM_UP", "no_warm_up")])
@pytest.mark.parametrize("spelling,value", [
    ("true", True), ("TRUE", True), ("True", True), ("yes", True), ("YES", True), ("on", True), ("On", True),
    ("1", True), ("false", False), ("FALSE", False), ("False", False), ("no", False), ("No", False),
    ("off", False), ("OFF", False), ("0", False), ("", False), (" yes ", True)])
def test_boolean_environment_variables(monkeypatch, variable, attr, spelling, value):
    assert getattr(_parse(monkeypatch, **{variable: spelling}), attr) is value


@pytest.mark.parametrize("junk", ["maybe", "2", "tru", "y e s", "enabled"])
def test_a_junk_boolean_stops_the_startup(monkeypatch, capsys, junk):
    with pytest.raises(SystemExit) as info:
        _parse(monkeypatch, BLIP2_SHARE=junk)
    assert info.value.code == 2
    assert f"BLIP2_SHARE={junk!r} is not a boolean" in capsys.readouterr().err


def test_the_share_link_stays_off_when_a_host_writes_false():
    """Through the real entry point: BLIP2_SHARE=False must not publish; a junk value stops before any load."""
    env = dict(os.environ, BLIP2_SHARE="nope")
    bad = subprocess.run([sys.executable, "app.py", "--port", "1"], cwd=S.ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "BLIP2_SHARE='nope' is not a boolean" in bad.stderr
