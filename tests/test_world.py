import itertools
import random
import re
from collections import Counter

import numpy as np
import pytest
from tokenizers import Tokenizer

from blip2.train import world
from blip2.train.tokenizer_training import train_bert_tokenizer, train_opt_tokenizer
from blip2.train.world import (
    COLORS,
    KINDS,
    NUMBERS,
    PLURALS,
    POSITION_PHRASES,
    POSITIONS,
    RGB,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    caption_matches,
    hard_negative_caption,
    make_split,
    parse_caption,
)

SCENES = make_split("train", 300) + make_split("val", 100) + make_split("test", 100)


def as_tuple(o):
    return (o.size, o.color, o.shape, o.position)


# --- scenes and splits

def test_scenes_are_well_formed():
    for s in SCENES:
        assert 1 <= len(s.objects) <= 3 and s.background in world.BACKGROUNDS
        assert len({o.position for o in s.objects}) == len(s.objects)
        for o in s.objects:
            assert o.shape in SHAPES and o.color in COLORS and o.size in SIZES and o.position in POSITIONS
    assert Counter(len(s.objects) for s in SCENES).keys() == {1, 2, 3}


def test_deterministic_by_seed():
    assert make_split("val", 50, seed=3) == make_split("val", 50, seed=3)
    s = SCENES[7]
    assert s.questions() == s.questions()
    assert np.array_equal(np.asarray(s.render(96)), np.asarray(s.render(96)))
    same_spec = Scene(s.objects, s.background, s.seed + 3)  # another image of the same scene
    assert not np.array_equal(np.asarray(s.render(96)), np.asarray(same_spec.render(96)))
    assert world.sample_scene(random.Random(1)) == world.sample_scene(random.Random(1))


def test_splits_are_disjoint():
    seeds = {name: {s.seed for s in make_split(name, 2000)} for name in world.SPLITS}
    assert all(len(v) == 2000 for v in seeds.values())
    for a, b in itertools.combinations(world.SPLITS, 2):
        assert not seeds[a] & seeds[b]
    assert not seeds["train"] & {s.seed for s in make_split("train", 2000, seed=1)}
    assert make_split("train", 20) != make_split("val", 20)


# --- questions: an independent reader of the question language

def resolve(ref, scene):
    """The objects a reference like "the small red circle" or "the object on the left" denotes."""
    for pos, phrase in POSITION_PHRASES.items():
        if ref == f"the object {phrase}":
            return [o for o in scene.objects if o.position == pos]
    words = ref.split()
    assert words[0] == "the" and words[-1] in SHAPES + ("object",), ref
    attrs = {"shape": words[-1]} if words[-1] != "object" else {}
    for w in words[1:-1]:
        attrs["size" if w in SIZES else "color"] = w
    assert all(v in COLORS for k, v in attrs.items() if k == "color"), ref
    return [o for o in scene.objects if all(getattr(o, k) == v for k, v in attrs.items())]


def the_one(ref, scene):
    found = resolve(ref, scene)
    assert len(found) == 1, f"{ref!r} is ambiguous or empty in {scene.caption()!r}"
    return found[0]


def answer(question, scene):
    objs = scene.objects
    def yes_no(b):
        return "yes" if b else "no"
    if question == "how many shapes are there?":
        return NUMBERS[len(objs)]
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return NUMBERS[sum(o.color == m[1] for o in objs)]
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        return NUMBERS[sum(PLURALS[o.shape] == m[1] for o in objs)]
    if m := re.fullmatch(r"what (color|shape|size) is (.+)\?", question):
        return getattr(the_one(m[2], scene), m[1])
    if m := re.fullmatch(r"where is (.+)\?", question):
        return the_one(m[1], scene).position
    if m := re.fullmatch(r"is there an? (.+)\?", question):
        *words, shape = m[1].split()
        attrs = {"shape": shape, **{("size" if w in SIZES else "color"): w for w in words}}
        return yes_no(any(all(getattr(o, k) == v for k, v in attrs.items()) for o in objs))
    if m := re.fullmatch(r"is (the .+)\?", question):  # "is the circle red?": try every possible claim
        claims = [("color", c, c) for c in COLORS] + [("size", s, s) for s in SIZES]
        claims += [("shape", s, f"a {s}") for s in SHAPES] + [("position", p, ph) for p, ph in POSITION_PHRASES.items()]
        readings = [(attr, value, m[1][:-len(text) - 1]) for attr, value, text in claims
                    if m[1].endswith(" " + text) and resolve(m[1][:-len(text) - 1], scene)]
        assert len(readings) == 1, question
        attr, value, ref = readings[0]
        return yes_no(getattr(the_one(ref, scene), attr) == value)
    raise AssertionError(f"unknown question form {question!r}")


def test_questions_are_answerable_and_unambiguous():
    kinds = Counter()
    for s in SCENES:
        qas = s.questions()
        assert len({qa.question for qa in qas}) == len(qas)  # no question twice
        for qa in qas:
            assert qa.kind in KINDS and qa.question == qa.question.lower() and qa.question.endswith("?")
            assert answer(qa.question, s) == qa.answer, (s.caption(), qa)
        answers = Counter(qa.answer for qa in qas if qa.kind == "yesno")
        assert answers["yes"] == answers["no"] > 0 and answers.keys() == {"yes", "no"}
        kinds.update(qa.kind for qa in qas)
    assert kinds.keys() == set(KINDS)


# --- captions

def best_diff(a, b):
    """Number of differing attributes between two object lists under the best pairing."""
    assert len(a) == len(b)
    return min(sum(x != y for p, q in zip(a, perm) for x, y in zip(p, q)) for perm in itertools.permutations(b))


def test_caption_round_trip():
    s = Scene((Obj("circle", "red", "large", "left"), Obj("square", "blue", "small", "top")), "plain", 0)
    assert s.caption() == "a small blue square at the top and a large red circle on the left"
    rng = random.Random(0)
    for s in SCENES:
        truth = [as_tuple(o) for o in s.objects]
        assert parse_caption(s.caption()) == truth
        assert parse_caption("a photo of " + s.caption()) == truth
        assert caption_matches(s, s.caption())["exact"]
        negative = hard_negative_caption(s, rng)
        assert best_diff(truth, parse_caption(negative)) == 1, (s.caption(), negative)
        assert not caption_matches(s, negative)["exact"]


def test_caption_matches_scores_attributes():
    s = Scene((Obj("circle", "red", "large", "left"), Obj("star", "blue", "small", "center")), "plain", 0)
    result = caption_matches(s, "a large red circle on the left and a small green star")
    assert result["count"] and not result["exact"]
    assert result["objects"][0] == dict(size=True, color=True, shape=True, position=True)
    assert result["objects"][1] == dict(size=True, color=False, shape=True, position=False)
    assert caption_matches(s, "nothing here")["objects"][0] == dict.fromkeys(world.ATTRIBUTES, False)


# --- rendering

@pytest.mark.parametrize("size", [224, 64])
def test_render_puts_each_colour_at_its_object(size):
    palette = np.array([RGB[c] for c in COLORS], np.float32)
    for s in SCENES[:60]:
        img = s.render(size)
        assert img.size == (size, size) and img.mode == "RGB"
        pixels = np.asarray(img, np.float32)
        for o, p in zip(s.objects, s.placements()):
            x, y = int(p.x * size), int(p.y * size)
            patch = pixels[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(0) if size > 64 else pixels[y, x]
            assert COLORS[np.abs(palette - patch).sum(1).argmin()] == o.color, (s, o)


def test_objects_stay_in_their_cells():
    for s in SCENES:
        for o, p in zip(s.objects, s.placements()):
            row, col = divmod(POSITIONS.index(o.position), 3)
            assert col / 3 <= p.x - p.radius and p.x + p.radius <= (col + 1) / 3
            assert row / 3 <= p.y - p.radius and p.y + p.radius <= (row + 1) / 3


# --- tokenizers

CORPUS = list(world.corpus(n_scenes=100))


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    train_opt_tokenizer(CORPUS, root / "opt")
    train_bert_tokenizer(CORPUS, root / "bert")
    return root / "opt", root / "bert"


def test_corpus_has_every_prompt_format():
    assert "a photo of a large red circle on the left" in CORPUS
    assert any(re.fullmatch(r"Question: [^?]+\? Answer: [\w ]+", t) for t in CORPUS)
    assert any(re.fullmatch(r"Question: [^?]+\? Answer: [\w ]+\. Question: [^?]+\? Answer: [\w ]+", t) for t in CORPUS)


def test_tokenizers_are_deterministic(tokenizer_dirs, tmp_path):
    train_opt_tokenizer(iter(CORPUS), tmp_path / "opt")
    train_bert_tokenizer(iter(CORPUS), tmp_path / "bert")
    for d in tokenizer_dirs:
        files = sorted(f.name for f in d.iterdir())
        assert files == sorted(f.name for f in (tmp_path / d.name).iterdir())
        for f in files:
            assert (d / f).read_bytes() == (tmp_path / d.name / f).read_bytes(), f


def test_opt_tokenizer(tokenizer_dirs):
    tok = Tokenizer.from_file(str(tokenizer_dirs[0] / "tokenizer.json"))
    n = tok.get_vocab_size()
    assert [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<image>")] == [0, 1, 2, 3, n - 1]
    assert 300 < n < 1100
    newline = tok.encode("\n", add_special_tokens=False).ids
    assert len(newline) == 1
    assert tok.encode("a large red circle on the left\n").ids[-1] == newline[0]
    for text in CORPUS[::50] + ["Any user text: Ünïcode ✓ 123!", "<image><image>Question: hi"]:
        ids = tok.encode(text).ids
        assert ids[0] == 2 and ids[1:] == tok.encode(text, add_special_tokens=False).ids  # BOS </s>, no EOS
        assert tok.decode(ids) == text.replace("<image>", "")
    assert tok.encode("<image>", add_special_tokens=False).ids == [n - 1]


def test_bert_tokenizer(tokenizer_dirs):
    tok = Tokenizer.from_file(str(tokenizer_dirs[1] / "tokenizer.json"))
    n = tok.get_vocab_size()
    specials = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
    assert [tok.token_to_id(t) for t in specials] == [0, 1, 2, 3, 4, n - 1]
    assert n < 1100
    for text in CORPUS[::50] + ["Zebras JUMP over 42 fences"]:
        ids = tok.encode(text).ids
        assert ids[0] == 2 and ids[-1] == 3 and 1 not in ids
        assert tok.decode(ids).replace(" ", "") == text.lower().replace(" ", "")
    assert len(tok.encode("a large red circle on the left").ids) == 2 + 7  # world words are whole tokens


def test_transformers_loads_the_same_tokenizers(tokenizer_dirs):
    import transformers

    texts = CORPUS[::40] + ["", "\n", "Héllo wörld 🙂", "<image><image>Question: what is it? Answer:"]
    texts += ["[DEC] a [MASK]"]
    for d in tokenizer_dirs:
        hf = transformers.AutoTokenizer.from_pretrained(str(d))
        raw = Tokenizer.from_file(str(d / "tokenizer.json"))
        assert len(hf) == raw.get_vocab_size()
        for text in texts:
            assert hf(text)["input_ids"] == raw.encode(text).ids, (d.name, text)
    opt = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dirs[0]))
    assert (opt.bos_token_id, opt.eos_token_id, opt.pad_token_id) == (2, 2, 1)
    assert opt("a photo of")["input_ids"][0] == 2 and opt.convert_tokens_to_ids("<image>") == len(opt) - 1
    bert = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dirs[1]))
    assert (bert.bos_token, bert.cls_token_id, bert.sep_token_id, bert.pad_token_id) == ("[DEC]", 2, 3, 0)
    assert bert.bos_token_id == len(bert) - 1
