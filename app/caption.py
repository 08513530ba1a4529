"""Caption tab: image in, caption(s) out, streamed token by token when the decoding allows it."""

from __future__ import annotations

import gradio as gr

from blip2.decoding import CAPTION

from . import examples
from .common import decoding_controls, model_event, progress_callback, session_models, takes_decoding, user_errors
from .registry import GENERATION
from .service import Service


def format_captions(captions):
    if len(captions) == 1:
        return captions[0]
    return "\n".join(f"{i}. {c}" for i, c in enumerate(captions, 1))


class CaptionTab:
    """The Caption tab's handlers over `service` (Gradio reads their signatures for the API) and its layout."""

    def __init__(self, service: Service):
        self.service = service

    @user_errors
    @takes_decoding(CAPTION, captions=True)
    def caption(self, image, prompt="", decoding=None, session=None, progress=gr.Progress(track_tqdm=True)):
        """Caption an image. Yields (caption text, notice); several captions come numbered, one per line. The
        decoding settings (mode, num_beams, ..., num_captions) come between `prompt` and `session`."""
        models = session_models(self.service, session)
        for result in self.service.caption(models[GENERATION], image, prompt, decoding, stream=True,
                                           progress=progress_callback(progress)):
            yield format_captions(result.captions), result.notice


def build(tab: CaptionTab, session: gr.State):
    limits = tab.service.limits
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            image = gr.Image(type="filepath", label="Image", height=340, sources=["upload", "clipboard"],
                             elem_id="caption-image")
            prompt = gr.Textbox("", label="Prompt prefix (optional)", placeholder="e.g. a photo of",
                                max_length=limits.max_prompt_chars, elem_id="caption-prompt",
                                info="The caption continues this text.")
            run = gr.Button("Caption", variant="primary", elem_id="caption-run")
            controls = decoding_controls(limits, CAPTION, captions=True)
        with gr.Column(scale=1):
            output = gr.Textbox(label="Caption", lines=4, interactive=False, elem_id="caption-output",
                                buttons=["copy"])
            notice = gr.Markdown(elem_id="caption-notice", label="Notice")
            gr.Markdown("Beam search with 1 beam is greedy decoding and streams the caption as it is written. "
                        "With more beams or several captions the result comes at the end.",
                        elem_classes=["help"])
            scenes, photos = examples.caption_examples()
            gr.Examples(scenes, inputs=[image, prompt], label=examples.SCENES_LABEL, examples_per_page=4)
            gr.Examples(photos, inputs=[image, prompt], label=examples.PHOTOS_LABEL, examples_per_page=4)
    inputs = [image, prompt, *controls, session]
    model_event(limits, [run.click, prompt.submit], tab.caption, inputs, [output, notice], api_name="caption",
                notice=notice, session=session,
                api_description="Caption an image (streamed). Returns the caption (numbered lines when several) "
                                "and a notice.")
    image.change(lambda: ("", ""), None, [output, notice], api_visibility="private", queue=False)  # no stale caption
    return image
