"""Compose the tabs into one gr.Blocks; queue, concurrency and launch settings."""

from __future__ import annotations

import gradio as gr

from . import caption, chat, matching, search
from .caption import CaptionTab
from .chat import ChatTab
from .common import error_notice, model_event, progress_callback, session_models, user_errors
from .config import flags_table
from .matching import MatchingTab
from .paths import EXAMPLES_DIR
from .registry import EMBEDDED, GENERATION, RETRIEVAL
from .search import SearchTab
from .service import Service

TITLE = "BLIP-2 Studio"

CSS = """
.help, .help p { font-size: 0.85em !important; color: var(--body-text-color-subdued) !important; }
#header h1 { margin-bottom: 0.1em; }
#header p { margin-top: 0; }
#model-status p { margin: 0.2em 0; }
#model-row { align-items: center; }
#model-load { max-height: 3.2em; }
"""


def status_text(svc: Service, models: dict) -> str:
    gen, ret = models[GENERATION], models[RETRIEVAL]
    lines = [f"**Serving:** {gen} (all tabs)", ""] if gen == ret else \
        [f"**Caption & chat:** {gen}", f"**Matching & search:** {ret}"]
    for role, key in ((GENERATION, gen), (RETRIEVAL, ret)):
        if svc.registry.loaded(key, role) is None:
            lines.append(f"_{key} is loaded on first use._")
    return " · ".join(x for x in lines[:2] if x) + ("  \n" + " ".join(lines[2:]) if lines[2:] else "")


class App:
    """Every event handler of the app, closing over one service: the tabs' and the model picker's."""

    def __init__(self, service: Service):
        self.service = service
        self.caption, self.chat = CaptionTab(service), ChatTab(service)
        self.matching, self.search = MatchingTab(service), SearchTab(service)

    @user_errors
    def load_model(self, choice, session=None, progress=gr.Progress(track_tqdm=True)):
        """Switch this session to a listed checkpoint (loading it once for everyone; downloads show progress).
        On failure the session keeps the model it had. Returns (session, status)."""
        svc = self.service
        checkpoint = svc.registry.checkpoint(choice)
        models = session_models(svc, session)
        for role in checkpoint.roles:
            svc.registry.get(checkpoint.key, role, progress_callback(progress))
        for role in checkpoint.roles:
            models[role] = checkpoint.key
        return models, status_text(svc, models)

    def load_failed(self, session):
        """After a failed load: the picker goes back to the model this session is served by, and the reason stays
        under it."""
        models = session_models(self.service, session)
        return models[GENERATION], status_text(self.service, models) + "  \n" + error_notice(session)

    def model_info(self, session=None):
        """The checkpoints on offer, the loaded models, this session's choice and the server's limits."""
        return self.service.registry.info(session_models(self.service, session))


def build_demo(svc: Service) -> gr.Blocks:
    """The app's page over `svc`: the model picker, the tabs and the About tab, wired to one App's handlers."""
    app = App(svc)
    with gr.Blocks(title=TITLE) as demo:
        session = gr.State(svc.registry.session_defaults())
        gr.Markdown(f"# {TITLE}\nCaption images, chat about them, match them against texts and search a gallery "
                    "with BLIP-2. The default model is a tiny one trained on a world of coloured shapes: try the "
                    "scene examples, or pick a real checkpoint below.", elem_id="header")
        with gr.Row(equal_height=False, elem_id="model-row"):  # wraps onto separate lines on a phone
            with gr.Column(scale=3, min_width=280):
                picker = gr.Dropdown(svc.registry.choices(), value=svc.registry.default[GENERATION], label="Model",
                                     elem_id="model-picker", info="Image-to-text checkpoints serve Caption and Chat; "
                                                                  "ITM checkpoints serve Matching and Search.")
            with gr.Column(scale=1, min_width=140):
                load = gr.Button("Load model", elem_id="model-load")
            with gr.Column(scale=3, min_width=280):
                status = gr.Markdown(status_text(svc, svc.registry.session_defaults()), elem_id="model-status")
        with gr.Tabs(elem_id="tabs", overflow_behavior="wrap"):  # every tab in sight on a phone too
            with gr.Tab("Caption", id="caption", elem_id="tab-caption"):
                caption.build(app.caption, session)
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                chat.build(app.chat, session)
            with gr.Tab("Matching", id="matching", elem_id="tab-matching"):
                matching.build(app.matching, session)
            with gr.Tab("Search", id="search", elem_id="tab-search"):
                search.build(app.search, session)
            with gr.Tab("About", id="about", elem_id="tab-about"):
                about(app, session, demo)
        load_event = model_event(svc.limits, load.click, app.load_model, [picker, session], [session, status],
                                 api_name="load_model",
                                 api_description="Switch this session to a listed checkpoint (see /model_info).")
        load_event.failure(app.load_failed, [session], [picker, status], api_visibility="private", queue=False)
    demo.queue(max_size=svc.limits.queue_size, default_concurrency_limit=svc.limits.concurrency)
    return demo


def api_snippet(address: str) -> str:
    """The About tab's gradio_client example, for the address the page was served from."""
    return f"""```python
from gradio_client import Client, handle_file
client = Client("{address}")
client.predict(handle_file("cat.jpg"), api_name="/caption")
client.predict(handle_file("cat.jpg"), "what animal is this?", api_name="/chat")
client.predict(handle_file("cat.jpg"), "a cat\\na dog", api_name="/match")
```"""


def served_address(request: gr.Request) -> str:
    """The address this page was served from, as the browser reached it (behind a proxy too: a Space)."""
    headers = request.headers
    host = headers.get("x-forwarded-host") or headers.get("host") or "127.0.0.1:7860"
    scheme = headers.get("x-forwarded-proto") or request.request.url.scheme
    return api_snippet(f"{scheme}://{host.split(',')[0].strip()}/")


def about(app: App, session, demo: gr.Blocks):
    limits = app.service.limits
    gr.Markdown("""**Endpoints** (`gradio_client`): `/caption`, `/chat`, `/clear_chat`, `/match`, `/heatmap`,
`/search`, `/load_model`, `/model_info`. Every request is checked the same way in the browser and through the API;
"Use via API" at the foot of the page lists every parameter.""")
    snippet = gr.Markdown(api_snippet("http://127.0.0.1:7860/"), elem_id="about-snippet")
    demo.load(served_address, None, snippet, api_visibility="private", queue=False)
    gr.Markdown(f"""**Limits of this server**: uploads up to {limits.max_upload_mb:g} MB and
{limits.max_image_pixels / 1e6:g} megapixels (aspect ratio up to {limits.max_aspect_ratio:g}:1; animated images use
their first frame),
prompts up to {limits.max_prompt_chars} characters, {limits.max_candidates} candidate texts,
{limits.max_gallery} images per search, {limits.max_new_tokens} new tokens, {limits.max_beams} beams,
beams x tokens up to {limits.max_beam_tokens}, {limits.time_limit_s:g} s per request,
{limits.queue_size} requests waiting.

**Models.** {EMBEDDED}: a tiny BLIP-2 (OPT-style decoder + ITM model) trained in this repository on
procedurally drawn scenes of coloured shapes; it knows nothing else. The Salesforce checkpoints are the
real BLIP-2 models (they need several GB of memory and a download).

**Example photographs**: public-domain / CC0 pictures from scikit-image (NASA, SpaceX, Rachel Michetti,
Stefan van der Walt); see `assets/examples/README.md`.
""")
    with gr.Accordion("Startup flags and their environment variables", open=False):
        gr.Markdown(flags_table())
    info = gr.JSON(label="Server information", elem_id="about-info", open=False)
    refresh = gr.Button("Show server information", size="sm")
    refresh.click(app.model_info, [session], info, api_name="model_info",
                  api_description="The checkpoints on offer, the loaded models, this session's models, the limits.")


def launch_kwargs(svc: Service, **overrides):
    """demo.launch settings: upload size, file access (only the example images besides uploads), look."""
    kwargs = dict(max_file_size=f"{svc.limits.max_upload_mb:g}mb", allowed_paths=[str(EXAMPLES_DIR)],
                  theme=gr.themes.Soft(primary_hue="indigo", secondary_hue="slate"), css=CSS,
                  show_error=True, footer_links=["api"])  # payloads Gradio itself refuses: say why
    kwargs.update(overrides)
    return kwargs
