"""A procedural world of simple scenes: shapes on backgrounds, with captions and questions.

Every scene is a pure function of its specification (objects, background kind, seed): the seed drives the
render jitter, the background tones, the pixel noise and the random choices in `questions()`.
The layout is a 3x3 grid; each object sits in its own cell and always fits inside it, so objects never
overlap and "where is X" has one answer.
"""

import itertools
import math
import random
import re
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from blip2.world_check import RGB

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
ATTRIBUTES = ("size", "color", "shape", "position")
VALUES = {"size": SIZES, "color": COLORS, "shape": SHAPES, "position": POSITIONS}
BACKGROUNDS = ("plain", "gradient", "stripes", "clouds")
KINDS = ("color", "shape", "count", "position", "yesno", "size")
SPLITS = ("train", "val", "test")
NUMBERS = ("zero", "one", "two", "three")

# how a position reads inside a sentence: "a small red circle on the left"
POSITION_PHRASES = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}
PLURALS = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}

# Backgrounds are desaturated mid-tones, so they never look like any object colour (black and white included).
BG_LEVELS = (100, 170)  # range of background grey levels
BG_TINT = 14  # max per-channel tint added to the grey
RADIUS = {"small": 0.085, "large": 0.145}  # circumradius, as a fraction of the image side
JITTER = 0.014  # max centre offset; large radius * 1.05 + JITTER < 1/6 keeps every object inside its cell
NOISE = 4.0  # std of the per-pixel noise, in grey levels


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str


@dataclass(frozen=True)
class Placement:
    """Where and how an object is drawn, in image fractions (x to the right, y down)."""
    x: float
    y: float
    radius: float
    angle: float  # degrees
    rgb: tuple[int, int, int]


def _star(points, inner):
    return [((1.0 if i % 2 == 0 else inner), 360 * i / (2 * points) - 90) for i in range(2 * points)]


def _polar(xy):
    return [(math.hypot(x, y), math.degrees(math.atan2(y, x))) for x, y in xy]


# unit outlines as (radius, angle in degrees) pairs, y pointing down, fitting inside the unit circle
OUTLINES = {
    "square": [(1.0, a) for a in (45, 135, 225, 315)],
    "triangle": [(1.0, a) for a in (-90, 30, 150)],
    "diamond": [(1.0, -90), (0.68, 0), (1.0, 90), (0.68, 180)],
    "star": _star(5, 0.45),
    "cross": _polar([(0.3, -0.95), (0.3, -0.3), (0.95, -0.3), (0.95, 0.3), (0.3, 0.3), (0.3, 0.95),
                     (-0.3, 0.95), (-0.3, 0.3), (-0.95, 0.3), (-0.95, -0.3), (-0.3, -0.3), (-0.3, -0.95)]),
}
CIRCLE_SCALE = 0.85  # a circle of the full circumradius looks bigger than the other shapes


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def _claim(attr, value):
    """How a value is stated after "is the circle ...": "red", "large", "a star", "on the left"."""
    if attr == "shape":
        return f"{_article(value)} {value}"
    return POSITION_PHRASES[value] if attr == "position" else value


def _exists(attrs):
    words = [attrs[k] for k in ("size", "color", "shape") if k in attrs]
    return f"is there {_article(words[0])} {' '.join(words)}?"


def _matches(obj, attrs):
    return all(getattr(obj, k) == v for k, v in attrs.items())


def describe(objects):
    """The canonical caption of a list of objects, in reading order of their positions."""
    objects = sorted(objects, key=lambda o: POSITIONS.index(o.position))
    parts = [f"a {o.size} {o.color} {o.shape} {POSITION_PHRASES[o.position]}" for o in objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    seed: int

    def caption(self):
        return describe(self.objects)

    # --- questions

    def _refs(self, obj, exclude):
        """Every phrase that picks out `obj` uniquely without naming its `exclude` attribute."""
        refs = []
        for keys in (("shape",), ("color",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"),
                     ("position",)):
            attrs = {k: getattr(obj, k) for k in keys}
            if exclude in keys or sum(_matches(o, attrs) for o in self.objects) != 1:
                continue
            if keys == ("position",):
                refs.append(f"the object {POSITION_PHRASES[obj.position]}")
            else:
                words = [attrs[k] for k in ("size", "color") if k in attrs]
                refs.append(" ".join(["the", *words, attrs.get("shape", "object")]))
        return refs

    def questions(self):
        """All questions about the scene; each is unambiguous, and yes and no answers are equally many."""
        rng = random.Random(self.seed)
        objs = self.objects
        qas = [QA("how many shapes are there?", NUMBERS[len(objs)], "count")]
        for color in sorted({o.color for o in objs}, key=COLORS.index):
            n = sum(o.color == color for o in objs)
            qas.append(QA(f"how many {color} shapes are there?", NUMBERS[n], "count"))
        for shape in sorted({o.shape for o in objs}, key=SHAPES.index):
            n = sum(o.shape == shape for o in objs)
            qas.append(QA(f"how many {PLURALS[shape]} are there?", NUMBERS[n], "count"))
        wh = {"color": "what color is {}?", "shape": "what shape is {}?", "size": "what size is {}?",
              "position": "where is {}?"}
        for o in objs:
            for attr, template in wh.items():
                qas += [QA(template.format(ref), getattr(o, attr), attr) for ref in self._refs(o, attr)]
        pairs = []  # (yes question, no question)
        for o in objs:
            # existence: "is there a red circle?" and the same with one attribute changed so nothing matches
            keys = rng.choice([("color", "shape"), ("size", "color", "shape")])
            yes = {k: getattr(o, k) for k in keys}
            nos = [{**yes, k: v} for k in keys for v in VALUES[k]
                   if not any(_matches(p, {**yes, k: v}) for p in objs)]
            pairs.append((_exists(yes), _exists(rng.choice(nos))))
            # verification: "is the circle red?", with the true value and with another one
            for attr in ATTRIBUTES:
                refs = self._refs(o, attr)
                if refs:
                    ref = rng.choice(refs)
                    other = rng.choice([v for v in VALUES[attr] if v != getattr(o, attr)])
                    pairs.append(tuple(f"is {ref} {_claim(attr, v)}?" for v in (getattr(o, attr), other)))
        asked = set()
        for pair in pairs:  # identical objects ask the same existence question: keep each pair once
            if asked.isdisjoint(pair):
                asked.update(pair)
                qas += [QA(pair[0], "yes", "yesno"), QA(pair[1], "no", "yesno")]
        return qas

    # --- rendering

    def _placements(self, rng):
        places = []
        for o in self.objects:
            row, col = divmod(POSITIONS.index(o.position), 3)
            rgb = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in RGB[o.color])
            places.append(Placement(x=(col + 0.5) / 3 + rng.uniform(-JITTER, JITTER),
                                    y=(row + 0.5) / 3 + rng.uniform(-JITTER, JITTER),
                                    radius=RADIUS[o.size] * rng.uniform(0.92, 1.05),
                                    angle=rng.uniform(-15, 15), rgb=rgb))
        return places

    def placements(self):
        return self._placements(random.Random(self.seed))

    def render(self, size=224):
        rng = random.Random(self.seed)
        places = self._placements(rng)  # drawn first, so they are what placements() returns
        background = _background(self.background, size, rng)
        # Shapes are drawn at twice the size on black, with a coverage mask, then 2x2 blocks are averaged:
        # that gives antialiased, premultiplied colours to blend over the background.
        big = 2 * size
        color, cover = Image.new("RGB", (big, big)), Image.new("L", (big, big))
        draws = ImageDraw.Draw(color), ImageDraw.Draw(cover)
        for o, p in zip(self.objects, places):
            cx, cy, r = p.x * big, p.y * big, p.radius * big
            for draw, fill in zip(draws, (p.rgb, 255)):
                if o.shape == "circle":
                    rc = r * CIRCLE_SCALE
                    draw.ellipse((cx - rc, cy - rc, cx + rc, cy + rc), fill=fill)
                else:
                    draw.polygon([(cx + r * k * math.cos(math.radians(a + p.angle)),
                                   cy + r * k * math.sin(math.radians(a + p.angle))) for k, a in OUTLINES[o.shape]],
                                 fill=fill)
        alpha = np.asarray(cover.reduce(2), np.float32)[..., None] / 255
        pixels = background * (1 - alpha) + np.asarray(color.reduce(2), np.float32)
        ox, oy = rng.randrange(size), rng.randrange(size)
        pixels += _noise_bank(size)[oy:oy + size, ox:ox + size]
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _tone(rng, level=None):
    level = rng.uniform(*BG_LEVELS) if level is None else level
    return [level + rng.uniform(-BG_TINT, BG_TINT) for _ in range(3)]


def _background(kind, size, rng):
    """A (size, size, 3) float32 array."""
    base = np.array(_tone(rng), np.float32)
    t = np.linspace(0, 1, size, dtype=np.float32)
    if kind == "plain":
        return np.broadcast_to(base, (size, size, 3))
    if kind == "gradient":  # bilinear blend of four corner tones
        c = np.array([_tone(rng) for _ in range(4)], np.float32)
        top, bottom = c[0] + t[:, None] * (c[1] - c[0]), c[2] + t[:, None] * (c[3] - c[2])
        return top + t[:, None, None] * (bottom - top)
    if kind == "clouds":  # smooth random blotches
        n = rng.randint(3, 6)
        small = Image.new("RGB", (n, n))
        small.putdata([tuple(int(v) for v in _tone(rng, base.mean() + rng.uniform(-18, 18))) for _ in range(n * n)])
        return np.asarray(small.resize((size, size), Image.BICUBIC), np.float32)
    if kind == "stripes":  # soft stripes at a random angle: amp * sin(u x + v y), expanded into 1-D factors
        angle, periods = rng.uniform(0, math.pi), rng.uniform(4, 10)
        u, v = 2 * math.pi * periods * math.cos(angle), 2 * math.pi * periods * math.sin(angle)
        shade = rng.uniform(6, 12) * (np.sin(v * t)[:, None] * np.cos(u * t) + np.cos(v * t)[:, None] * np.sin(u * t))
        return base + shade[..., None]
    raise ValueError(f"unknown background {kind!r}")


@lru_cache(maxsize=4)
def _noise_bank(size):
    """Fixed gaussian noise, twice the image side; each render takes a random window of it."""
    return np.random.default_rng(0).normal(0, NOISE, (2 * size, 2 * size, 3)).astype(np.float32)


# --- sampling and splits

def sample_scene(rng, seed=None):
    """A random scene drawn with `rng` (a random.Random); `seed` is its render seed (drawn from rng if None)."""
    positions = rng.sample(POSITIONS, rng.randint(1, 3))
    objects = tuple(Obj(rng.choice(SHAPES), rng.choice(COLORS), rng.choice(SIZES), p)
                    for p in sorted(positions, key=POSITIONS.index))
    background = rng.choice(BACKGROUNDS)
    return Scene(objects, background, rng.getrandbits(62) if seed is None else seed)


def make_split(name, n, seed=0):
    """n scenes of split `name`. Render seeds are 3 * k + split index, so splits never share one."""
    split = SPLITS.index(name)
    rng = random.Random(f"{name}/{seed}")
    return [sample_scene(rng, seed=3 * (seed * 2**40 + i) + split) for i in range(n)]


# --- evaluation helpers

_CAPTION_RE = re.compile(
    rf"\b(?:({'|'.join(SIZES)}) )?(?:({'|'.join(COLORS)}) )?({'|'.join(SHAPES)})\b"
    rf"(?: ({'|'.join(POSITION_PHRASES.values())})\b)?")
_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()}


def parse_caption(text):
    """The objects a caption names, as (size, color, shape, position) tuples; None where a part is missing."""
    return [(size, color, shape, _PHRASE_TO_POSITION.get(pos))
            for size, color, shape, pos in _CAPTION_RE.findall(text.lower())]


def caption_matches(scene, text):
    """Which attributes of each scene object `text` names correctly, under the best object matching.

    Returns {"objects": [{attr: bool} per scene object], "count": same number of objects named,
    "exact": count right and every attribute of every object right}.
    """
    named = parse_caption(text)[:6]
    truth = [(o.size, o.color, o.shape, o.position) for o in scene.objects]
    pool = named + [(None,) * 4] * len(truth)  # an object may be matched to nothing
    best = max(itertools.permutations(pool, len(truth)),
               key=lambda m: sum(a == b for t, n in zip(truth, m) for a, b in zip(t, n)))
    objects = [{k: a == b for k, a, b in zip(ATTRIBUTES, t, n)} for t, n in zip(truth, best)]
    count = len(named) == len(truth)
    return {"objects": objects, "count": count, "exact": count and all(all(o.values()) for o in objects)}


def hard_negative_caption(scene, rng):
    """The caption of the scene with exactly one attribute of one object changed (to a free cell for positions)."""
    i = rng.randrange(len(scene.objects))
    obj, attr = scene.objects[i], rng.choice(ATTRIBUTES)
    taken = {o.position for o in scene.objects}
    choices = [v for v in VALUES[attr] if v != getattr(obj, attr) and not (attr == "position" and v in taken)]
    objects = list(scene.objects)
    objects[i] = replace(obj, **{attr: rng.choice(choices)})
    return describe(objects)


# --- text for tokenizer training

def corpus(n_scenes=500, seed=0):
    """Texts of this world in the formats the models see: every one-object caption, then captions,
    "a photo of" captions, VQA prompts and two-turn VQA prompts of sampled scenes."""
    for shape, color, size, position in itertools.product(SHAPES, COLORS, SIZES, POSITIONS):
        caption = describe([Obj(shape, color, size, position)])
        yield caption
        yield "a photo of " + caption
    rng = random.Random(f"corpus/{seed}")
    for _ in range(n_scenes):
        scene = sample_scene(rng)
        yield scene.caption()
        yield "a photo of " + scene.caption()
        qas = scene.questions()
        yield from (f"Question: {qa.question} Answer: {qa.answer}" for qa in qas)
        a, b = rng.sample(qas, 2)
        yield f"Question: {a.question} Answer: {a.answer}. Question: {b.question} Answer: {b.answer}"
