"""Gradio-side pieces shared by the tabs: error conversion, session models, decoding controls, model events.
Nothing here holds the service: each tab's handlers close over the one they are given."""

from __future__ import annotations

import functools
import inspect
import logging
import traceback

import gradio as gr

from .config import Limits
from .errors import RequestError, TimeLimitReached
from .service import Service
from .validation import BEAM, MODES, SAMPLING, DecodingSettings, parse_decoding

log = logging.getLogger("blip2.app")

MODEL_CONCURRENCY_ID = "model"  # every event that runs a model shares this concurrency group


def session_models(service: Service, session) -> dict:
    """The models a session uses: its gr.State dict, or the startup defaults."""
    defaults = service.session_defaults()
    if isinstance(session, dict):
        return {k: session.get(k) or v for k, v in defaults.items()}
    return defaults


def _to_gr_error(e: Exception) -> gr.Error:
    if isinstance(e, gr.Error):
        return e
    if isinstance(e, RequestError):
        return gr.Error(_capital(str(e)), print_exception=False)
    if isinstance(e, TimeLimitReached):
        return gr.Error("The request passed its time limit.", print_exception=False)
    log.error("request failed:\n%s", traceback.format_exc())
    return gr.Error(f"The model failed on this request ({type(e).__name__}: {str(e)[:300]}). "
                    "Nothing was changed: the next request will run normally.")


def _capital(s):
    return s[:1].upper() + s[1:] if s else s


def user_errors(fn):
    """Turn service errors into gr.Error (a readable message in the UI and the API); works for generators too.
    The message is also kept in the handler's `session` state (key "error") until the next action, so the tab's
    notice area can show it after the toast is gone (see `model_event`)."""
    signature = inspect.signature(fn)

    def session_of(args, kwargs) -> dict:
        session = signature.bind_partial(*args, **kwargs).arguments.get("session")
        if isinstance(session, dict):  # the session's own gr.State object: changes outlive a failed event
            session.pop("error", None)  # a new action: the last error is stale
            return session
        return {}

    def fail(e, session):
        error = _to_gr_error(e)
        session["error"] = error.message
        return error

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            session = session_of(args, kwargs)
            try:
                yield from fn(*args, **kwargs)
            except GeneratorExit:
                raise
            except Exception as e:
                raise fail(e, session) from None
        return gen

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        session = session_of(args, kwargs)
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise fail(e, session) from None
    return wrapper


def error_notice(session) -> str:
    """The last error of this session, for a tab's notice area (where it stays until the next action)."""
    message = session.get("error") if isinstance(session, dict) else None
    return f"⚠️ **Not done:** {message}" if message else ""


def decoding_from(limits: Limits, mode, num_beams, temperature, top_p, top_k, max_new_tokens, min_new_tokens,
                  repetition_penalty, length_penalty, num_captions=1) -> DecodingSettings:
    return parse_decoding(limits, mode, num_beams, temperature, top_p, top_k, max_new_tokens,
                          min_new_tokens, repetition_penalty, length_penalty, num_captions)


def progress_callback(progress):
    if progress is None:
        return None

    def say(fraction, desc):
        try:
            progress(fraction, desc=desc)
        except Exception:  # progress is cosmetic: never fail a request on it
            pass
    return say


def decoding_controls(limits: Limits, defaults: DecodingSettings, captions=False) -> list:
    """The decoding settings the best BLIP-2 demos offer, in an accordion. Returns the components in the order
    the handlers take them."""
    with gr.Accordion("Decoding settings", open=False):
        mode = gr.Radio(list(MODES), value=defaults.mode, label="Decoding",
                        info="Beam search: the most likely text (1 beam = greedy, streamed). "
                             "Nucleus sampling: varied texts.")
        with gr.Row():
            beams = gr.Slider(1, limits.max_beams, value=defaults.num_beams, step=1, label="Beams",
                              info="beam search only; more beams are not streamed")
            n = gr.Slider(1, limits.max_captions, value=defaults.num_captions, step=1, label="Number of captions",
                          visible=captions, info="beam search: at most one per beam")
        with gr.Row():
            temperature = gr.Slider(0.1, 2.0, value=defaults.temperature, step=0.05, label="Temperature",
                                    info="sampling only")
            top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p", info="sampling only")
            top_k = gr.Slider(0, 200, value=defaults.top_k, step=1, label="Top-k", info="sampling only; 0 = off")
        with gr.Row():
            max_new = gr.Slider(1, limits.max_new_tokens, value=defaults.max_new_tokens, step=1,
                                label="Max new tokens")
            min_new = gr.Slider(0, min(limits.max_new_tokens, 50), value=defaults.min_new_tokens, step=1,
                                label="Min new tokens")
        with gr.Row():
            rep = gr.Slider(0.5, 3.0, value=defaults.repetition_penalty, step=0.05, label="Repetition penalty",
                            info="> 1 discourages repeats")
            length = gr.Slider(-2.0, 3.0, value=defaults.length_penalty, step=0.1, label="Length penalty",
                               info="beam search: > 0 favours longer texts")
    controls = [mode, beams, temperature, top_p, top_k, max_new, min_new, rep, length]
    return controls + ([n] if captions else [])


def model_event(limits: Limits, triggers, fn, inputs, outputs, api_name, notice=None, session=None, **kwargs):
    """Wire an event that runs a model: shared concurrency group, raw payloads (validation is the service's:
    a script sending a wrong type gets the same message as the browser). When it fails, `notice` (a Markdown of
    the tab) shows the reason kept in `session` (the session's gr.State) until the next action, and the other
    outputs keep their values."""
    triggers = triggers if isinstance(triggers, (list, tuple)) else [triggers]
    event = gr.on(triggers, fn, inputs, outputs, api_name=api_name, concurrency_id=MODEL_CONCURRENCY_ID,
                  concurrency_limit=limits.concurrency, preprocess=False, **kwargs)
    if notice is not None:
        others = [o for o in outputs if o is not notice]
        event.failure(lambda state: (error_notice(state), *[gr.update() for _ in others]), [session],
                      [notice, *others], api_visibility="private", queue=False)
    return event


__all__ = ["BEAM", "SAMPLING", "user_errors", "decoding_controls", "decoding_from",
           "model_event", "error_notice", "session_models", "progress_callback", "MODEL_CONCURRENCY_ID"]
