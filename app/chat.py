"""VQA chat tab: questions about one image, answered over the conversation so far (streamed).

The history lives in a per-session gr.State ({"digest": image hash, "turns": [[q, a], ...]}), never shared
between users; it starts over when the image changes. The prompt is "Question: q Answer: a." over past turns
("Short answer:" for Flan-T5), with the oldest turns dropped to fit the model's context (a notice says so).
"""

from __future__ import annotations

import gradio as gr

from blip2.decoding import ANSWER

from . import examples
from .common import decoding_controls, model_event, progress_callback, session_models, takes_decoding, user_errors
from .registry import GENERATION
from .service import Service

DEFAULT_QUESTION = "what is in this picture?"  # asked when an API call leaves the question out


def new_history():
    return {"digest": None, "turns": []}


def messages(turns, pending=None):
    """Chat turns -> gr.Chatbot messages (Gradio 6: role/content dicts)."""
    out = []
    for q, a in turns:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if pending is not None:
        q, a = pending
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a or "…"}]
    return out


def _history(state):
    if not isinstance(state, dict) or not isinstance(state.get("turns"), list):
        return new_history()
    return {"digest": state.get("digest"), "turns": [list(t) for t in state["turns"]]}


class ChatTab:
    """The Chat tab's handler over `service` (Gradio reads its signature for the API)."""

    def __init__(self, service: Service):
        self.service = service

    @user_errors
    @takes_decoding(ANSWER)
    def chat(self, image, question=None, decoding=None, history=None, session=None,
             progress=gr.Progress(track_tqdm=True)):
        """Ask a question about the image (DEFAULT_QUESTION when left out). Yields (chat messages, notice, history
        state) while the answer streams. The decoding settings (mode, num_beams, ..., length_penalty) come between
        `question` and `history`."""
        svc, state = self.service, _history(history)
        question = DEFAULT_QUESTION if question is None else question
        reply = None
        for reply in svc.chat(session_models(svc, session)[GENERATION], image, question, state["turns"], decoding,
                              stream=True, progress=progress_callback(progress), about=state["digest"]):
            yield messages(reply.history, (reply.question, reply.answer)), reply.notice, state
        turns = [*reply.history, (reply.question, reply.answer or "(no answer)")][-svc.limits.max_chat_turns:]
        state = {"digest": reply.digest, "turns": [list(t) for t in turns]}
        yield messages(state["turns"]), reply.notice, state


def clear(history=None):
    """Forget the conversation (the image stays)."""
    return [], "", new_history()


NO_IMAGE, READY = "Upload an image (or pick an example), then ask about it.", "Ask a question about this image below."


def new_image(image, history=None):
    """A new (or removed) image: the conversation starts over, and the placeholder says what to do next."""
    return gr.update(value=[], placeholder=NO_IMAGE if image is None else READY), "", new_history()


def build(tab: ChatTab, session: gr.State):
    limits = tab.service.limits
    history = gr.State(new_history())
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            image = gr.Image(type="filepath", label="Image", height=340, sources=["upload", "clipboard"],
                             elem_id="chat-image")
            gr.Markdown("Changing the image starts a new conversation.", elem_classes=["help"])
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(label="Conversation", height=340, elem_id="chat-bot", buttons=["copy"],
                                 placeholder=NO_IMAGE)
            with gr.Row(equal_height=True):
                question = gr.Textbox(label="Question", show_label=False, scale=5, container=False,
                                      placeholder="Ask a question about the image", elem_id="chat-question",
                                      max_length=limits.max_prompt_chars)
                ask = gr.Button("Ask", variant="primary", scale=1, elem_id="chat-ask", min_width=80)
                clear_btn = gr.Button("Clear", scale=1, elem_id="chat-clear", min_width=80)
            notice = gr.Markdown(elem_id="chat-notice", label="Notice")
            controls = decoding_controls(limits, ANSWER)
            scenes, photos = examples.chat_examples()
            gr.Examples(scenes, inputs=[image, question], label=examples.SCENES_LABEL, examples_per_page=4)
            gr.Examples(photos, inputs=[image, question], label=examples.PHOTOS_LABEL, examples_per_page=4)
    event = model_event(limits, [ask.click, question.submit], tab.chat, [image, question, *controls, history, session],
                        [chatbot, notice, history], api_name="chat", notice=notice, session=session,
                        api_description="Ask a question about the image; the session's earlier turns are part of "
                                        "the prompt. Streams (conversation, notice).")
    event.success(lambda: "", None, question, api_visibility="private", queue=False)
    clear_btn.click(clear, [history], [chatbot, notice, history], api_name="clear_chat",
                    api_description="Forget this session's conversation.")
    image.change(new_image, [image, history], [chatbot, notice, history], api_visibility="private", queue=False)
    return image
