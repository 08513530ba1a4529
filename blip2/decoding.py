"""The decoding settings, written once: each field generate() decodes with, its default, the values it may take
and what a person calls it. `GenerationConfig` (blip2.generation), the command line's flags (blip2.__main__) and
the app's controls and request checks (app.common, app.validation) all read FIELDS; `check` is the one validation.

Two ranges per field: the valid one (`low`..`high`, what generate() accepts, as the reference) and the offered
one (`offer`, what the app lets a request ask; the app's Limits set the upper ends of the four resource-bound
fields). `slider` is the app control's range and step, `start` its first value where it is not generate()'s default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

Number = int | float


@dataclass(frozen=True)
class Field:
    """One decoding setting."""

    name: str  # generate()'s keyword; the command line's flag is --name-with-dashes
    type: type  # bool, int or float
    default: bool | Number | None  # generate()'s default, the reference's (None: worked out from the model)
    label: str  # what a person calls it: messages and the app's control
    help: str  # one line: the command line's --help and the app control's info
    low: Number | None = None  # the smallest valid value (None: unbounded)
    high: Number | None = None  # the largest valid value (None: unbounded)
    low_open: bool = False  # `low` itself is not valid (a number > 0)
    only: str | None = None  # "nucleus sampling" or "beam search": the only decoding it matters to (choices)
    choices: tuple[str, str] | None = None  # a switch's two values in words (off, on)
    offer: tuple[Number, Number | None] | None = None  # the app's range (None high: a resource limit sets it)
    slider: tuple[Number, Number | None, Number] | None = None  # the app control's (low, high, step)
    start: Number | None = None  # the app control's first value, where it is not `default`

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def valid_range(self) -> str:
        """The valid values in words: "an integer >= 1", "a number in (0, 1]", "a finite number"."""
        kind = "an integer" if self.type is int else "a number"
        if self.low is None:
            return "a finite number"
        if self.high is None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        return f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


FIELDS: tuple[Field, ...] = (  # in the order of the app's controls and API parameters
    Field("do_sample", bool, False, "decoding", "nucleus sampling (varied texts) instead of beam search (the most "
          "likely text; 1 beam = greedy)", choices=("beam search", "nucleus sampling")),
    Field("num_beams", int, 1, "beams", "beam search with this many beams (1: greedy)", low=1, only="beam search",
          offer=(1, None), slider=(1, None, 1)),
    Field("temperature", float, 1.0, "temperature", "sampling temperature", low=0, low_open=True,
          only="nucleus sampling", offer=(0.01, 5.0), slider=(0.1, 2.0, 0.05)),
    Field("top_p", float, 1.0, "top-p", "sample within this probability mass", low=0, high=1, low_open=True,
          only="nucleus sampling", offer=(0.01, 1.0), slider=(0.05, 1.0, 0.05), start=0.9),
    Field("top_k", int, 50, "top-k", "sample among the k most likely tokens (0: all)", low=0,
          only="nucleus sampling", offer=(0, 1000), slider=(0, 200, 1)),
    Field("max_new_tokens", int, None, "max new tokens", "new tokens at most", low=0, offer=(1, None),
          slider=(1, None, 1)),
    Field("min_new_tokens", int, None, "min new tokens", "new tokens at least", low=0, offer=(0, None),
          slider=(0, 50, 1)),
    Field("repetition_penalty", float, 1.0, "repetition penalty", "> 1 discourages repeated tokens", low=0,
          low_open=True, offer=(0.5, 5.0), slider=(0.5, 3.0, 0.05)),
    Field("length_penalty", float, 1.0, "length penalty", "beam score = log-prob / length ** this (> 0 favours "
          "longer texts)", only="beam search", offer=(-5.0, 5.0), slider=(-2.0, 3.0, 0.1)),
    Field("num_return_sequences", int, 1, "number of captions", "sequences per image (beam search: at most one "
          "per beam)", low=1, offer=(1, None), slider=(1, None, 1)),
    Field("no_repeat_ngram_size", int, 0, "no-repeat n-gram size", "never repeat an n-gram of this size", low=0),
    Field("seed", int, None, "seed", "seed for sampling", low=0),
)
BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}
OFFERED: tuple[Field, ...] = tuple(f for f in FIELDS if f.offer is not None or f.choices)  # the app's, in order

# the defaults of a caption and of a chat answer (the app's and the command line's; generate()'s are the reference's)
CAPTION: dict[str, Number] = {"max_new_tokens": 30, "min_new_tokens": 1}
ANSWER: dict[str, Number] = {"max_new_tokens": 20, "min_new_tokens": 1}


def number(field: Field, value: object, low: Number | None = None, high: Number | None = None,
           what: str | None = None, parse: bool = False) -> Number:
    """`value` as the field's type within [low, high] (default: the field's valid range), or ValueError naming the
    field (`what`, default its keyword). `parse`: also a numeric string, and a whole float for an integer (what a
    form or a script sends); else an integer field takes only an int, as generate() does."""
    what = what or field.name
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{what} must be a number, got {value!r}")
    if isinstance(value, str) and parse:
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{what} must be a number, got the text {value[:40]!r}") from None
    if isinstance(value, str) or not (hasattr(value, "__index__") or hasattr(value, "__float__")):
        raise ValueError(f"{what} must be a number, got {type(value).__name__}")
    value = int(value) if hasattr(value, "__index__") else float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value}")
    if field.type is int:
        if value != int(value) or (isinstance(value, float) and not parse):
            raise ValueError(f"{what} must be a whole number, got {value}")
        value = int(value)
    if low is None and high is None:  # the valid range
        below = field.low is not None and (value <= field.low if field.low_open else value < field.low)
        if below or (field.high is not None and value > field.high):
            raise ValueError(f"{what} must be {field.valid_range()}, got {value!r}")
    elif not low <= value <= high:
        raise ValueError(f"{what} must be between {low:g} and {high:g}, got {value:g}")
    return value


def check(settings: Mapping[str, object], highs: Mapping[str, Number] | None = None) -> dict:
    """Decoding settings checked field by field (the keywords of FIELDS; those left out or None keep generate()'s
    defaults), then together. ValueError names the first problem.

    Without `highs` each field must lie in its valid range (generate()); with `highs` (the app's resource limits
    for the fields whose offer has no upper end) in its offered range, named by its label, and a minimum may not
    exceed its maximum."""
    unknown = sorted(set(settings) - set(BY_NAME))
    if unknown:
        raise ValueError(f"unknown decoding setting(s): {', '.join(unknown)}")
    sampling = settings.get("do_sample") or False
    if not isinstance(sampling, bool):
        raise ValueError(f"do_sample must be True or False, got {sampling!r}")
    out: dict = {"do_sample": sampling} if "do_sample" in settings else {}
    for f in FIELDS[1:]:  # do_sample: above
        if f.name not in settings or (settings[f.name] is None and highs is None):
            continue  # generate()'s default; a request (with highs) sends every field it sends as a value
        value = settings[f.name]
        if highs is None:
            if f.name == "temperature" and not sampling:
                continue  # the reference ignores it without sampling
            out[f.name] = number(f, value)
        elif f.offer is not None:
            low, high = f.offer
            out[f.name] = number(f, value, low, highs[f.name] if high is None else high, f.label, parse=True)
        else:
            out[f.name] = number(f, value)
    beams, n = out.get("num_beams", 1), out.get("num_return_sequences", 1)
    name = (lambda f: f) if highs is None else (lambda f: BY_NAME[f].label)
    if n > beams and (beams > 1 or not sampling):
        raise ValueError(f"{name('num_return_sequences')} ({n}) needs sampling or at least {n} beams "
                         f"({name('num_beams')}: {beams}): beam search returns one sequence per beam")
    if highs is not None and out.get("min_new_tokens", 0) > out.get("max_new_tokens", math.inf):
        raise ValueError(f"min new tokens ({out['min_new_tokens']}) cannot exceed max new tokens "
                         f"({out['max_new_tokens']})")
    return out
