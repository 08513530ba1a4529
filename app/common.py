"""Gradio-side pieces shared by the tabs: error conversion, session models, decoding controls, model events.
Nothing here holds the service: each tab's handlers close over the one they are given."""

from __future__ import annotations

import functools
import inspect
import logging
import traceback
from collections.abc import Mapping

import gradio as gr

from blip2.decoding import OFFERED

from .config import Limits
from .errors import RequestError, TimeLimitReached
from .service import Service
from .validation import api_name, decoding_defaults, resource_highs

log = logging.getLogger("blip2.app")

MODEL_CONCURRENCY_ID = "model"  # every event that runs a model shares this concurrency group


def session_models(service: Service, session) -> dict:
    """The models a session uses: its gr.State dict, or the startup defaults."""
    defaults = service.registry.session_defaults()
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


def progress_callback(progress):
    if progress is None:
        return None

    def say(fraction, desc):
        try:
            progress(fraction, desc=desc)
        except Exception:  # progress is cosmetic: never fail a request on it
            pass
    return say


def takes_decoding(preset: Mapping[str, int | float], captions: bool = False):
    """A handler `fn(self, ..., decoding, ...)` whose `decoding` parameter stands for the decoding settings: Gradio
    (its API) and a direct caller see one parameter per blip2.decoding field in its place (`mode`, `num_beams`,
    ..., `num_captions` only when `captions`), starting at `decoding_defaults(preset)`; `fn` gets them as one
    mapping, which the service checks."""
    defaults = decoding_defaults(preset)
    names = [name for name in defaults if captions or name != "num_captions"]

    def wrap(fn):
        signature = inspect.signature(fn)
        params = list(signature.parameters.values())
        at = [p.name for p in params].index("decoding")
        ours = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=defaults[n]) for n in names]
        signature = signature.replace(parameters=params[:at] + ours + params[at + 1:])

        def split(args, kwargs) -> dict:
            bound = signature.bind(*args, **kwargs)
            values = bound.arguments
            values["decoding"] = {n: values.pop(n) for n in names if n in values}
            return values

        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def handler(*args, **kwargs):
                return (yield from fn(**split(args, kwargs)))
        else:
            @functools.wraps(fn)
            def handler(*args, **kwargs):
                return fn(**split(args, kwargs))
        handler.__signature__ = signature
        return handler
    return wrap


def decoding_controls(limits: Limits, preset: Mapping[str, int | float], captions: bool = False) -> list:
    """The decoding settings the best BLIP-2 demos offer (blip2.decoding's fields), in an accordion, starting at
    `decoding_defaults(preset)`. Returns the components in the order the handlers take them."""
    defaults, highs = decoding_defaults(preset), resource_highs(limits)
    groups = {}  # by decoding (the mode; beam search only; sampling only; both), in blip2.decoding's order
    for f in OFFERED:
        groups.setdefault("mode" if f.choices else f.only, []).append(f)
    rows = [g[i:i + 2] for g in groups.values() for i in range(0, len(g), 2)]  # two a row: room for their help
    controls = {}
    with gr.Accordion("Decoding settings", open=False):
        for row in rows:
            with gr.Row():
                for f in row:
                    name, info = api_name(f), f.help + (f"; {f.only} only" if f.only else "")
                    if f.choices:
                        controls[name] = gr.Radio(list(f.choices), value=defaults[name], label=f.label.capitalize(),
                                                  info=info)
                        continue
                    low, high, step = f.slider
                    high = highs[f.name] if high is None else min(high, highs.get(f.name, high))
                    controls[name] = gr.Slider(low, high, value=defaults[name], step=step, label=f.label.capitalize(),
                                               info=info, visible=captions or name != "num_captions")
    return [controls[name] for name in defaults if captions or name != "num_captions"]


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


__all__ = ["user_errors", "decoding_controls", "takes_decoding",
           "model_event", "error_notice", "session_models", "progress_callback", "MODEL_CONCURRENCY_ID"]
