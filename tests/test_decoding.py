"""blip2.decoding: the decoding fields written once, and their one check (generate()'s ranges and the app's)."""

import math

import pytest

from blip2.decoding import ANSWER, BY_NAME, CAPTION, FIELDS, OFFERED, check
from blip2.generation import GenerationConfig

HIGHS = dict(num_beams=8, num_return_sequences=5, max_new_tokens=128, min_new_tokens=128)  # the app's default Limits


def test_the_fields_are_generates_keywords_with_its_defaults():
    generation = GenerationConfig()
    for f in FIELDS:
        assert getattr(generation, f.name) == f.default or f.default is None, f.name
        assert f.flag == "--" + f.name.replace("_", "-")
    assert [f.name for f in OFFERED] == ["do_sample", "num_beams", "temperature", "top_p", "top_k", "max_new_tokens",
                                         "min_new_tokens", "repetition_penalty", "length_penalty",
                                         "num_return_sequences"]  # the app's API order
    assert CAPTION == {"max_new_tokens": 30, "min_new_tokens": 1} and ANSWER["max_new_tokens"] == 20
    assert BY_NAME["top_p"].start == 0.9  # the app starts sampling at top-p 0.9, generate() at the reference's 1.0


@pytest.mark.parametrize("settings, message", [
    (dict(do_sample=True, temperature=0.0), "temperature must be a number > 0, got 0.0"),
    (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(repetition_penalty=0), "repetition_penalty must be a number > 0"),
    (dict(num_beams=0), "num_beams must be an integer >= 1"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be a whole number"),
    (dict(max_new_tokens="5"), "max_new_tokens must be a number, got str"),
    (dict(length_penalty=math.inf), "length_penalty must be a finite number"),
    (dict(num_return_sequences=2), r"num_return_sequences \(2\) needs sampling or at least 2 beams"),
    (dict(num_beams=2, num_return_sequences=3), r"at least 3 beams \(num_beams: 2\)"),
    (dict(do_sample=1), "do_sample must be True or False"),
    (dict(num_beam=2), "unknown decoding setting"),
])
def test_generate_ranges_name_the_keyword(settings, message):
    with pytest.raises(ValueError, match=message):
        check(settings)


def test_generate_ranges_accept_the_references_values():
    assert check(dict(temperature=0.0)) == {}  # ignored without sampling, as the reference ignores it
    assert check(dict(do_sample=True, temperature=9.0, top_k=5000, max_new_tokens=0, num_return_sequences=3)) == \
        dict(do_sample=True, temperature=9.0, top_k=5000, max_new_tokens=0, num_return_sequences=3)


@pytest.mark.parametrize("settings, message", [
    (dict(num_beams=-1), "beams must be between 1 and 8, got -1"),
    (dict(num_beams="many"), "beams must be a number, got the text 'many'"),
    (dict(num_beams=2.5), "beams must be a whole number"),
    (dict(temperature=math.nan), "temperature must be a finite number"),
    (dict(temperature=9.0), "temperature must be between 0.01 and 5"),
    (dict(top_k=[5]), "top-k must be a number, got list"),
    (dict(max_new_tokens=10**9), "max new tokens must be between 1 and 128"),
    (dict(min_new_tokens=20, max_new_tokens=10), r"min new tokens \(20\) cannot exceed max new tokens \(10\)"),
    (dict(num_return_sequences=3, num_beams=2), r"number of captions \(3\) needs sampling or at least 3 beams"),
])
def test_offered_ranges_name_the_label(settings, message):
    with pytest.raises(ValueError, match=message):
        check(settings, HIGHS)


def test_offered_values_from_a_form_are_parsed():
    assert check(dict(num_beams="3", temperature="0.7", max_new_tokens=12.0, length_penalty="-1"), HIGHS) == \
        dict(num_beams=3, temperature=0.7, max_new_tokens=12, length_penalty=-1.0)
