"""Training data from the procedural world: rendered images (cached as uint8 arrays), per-patch labels for the
vision pre-training, and the texts of every stage in the prompt formats the app uses.

Images go through the inference preprocessing: PIL bicubic resize to the model size (cached), then rescale by
1/255 and CLIP mean/std normalisation (`pixels`), exactly as BlipImageProcessor does.
"""

import os
import random
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blip2.image_processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from blip2.train import world

CACHE = Path(os.environ.get("BLIP2_WORLD_CACHE", "/tmp/blip2-world-cache"))
RENDER_SIZES = (96, 128, 160, 224)  # scenes are drawn at several sizes, so the model sees several resamplings
MEAN = torch.tensor(OPENAI_CLIP_MEAN, dtype=torch.float32)[:, None, None]
STD = torch.tensor(OPENAI_CLIP_STD, dtype=torch.float32)[:, None, None]


def render(scenes, size):
    """(N, size, size, 3) uint8: each scene rendered, then resized with PIL bicubic like the image processor."""
    out = np.empty((len(scenes), size, size, 3), np.uint8)
    for i, s in enumerate(scenes):
        image = s.render(RENDER_SIZES[s.seed % len(RENDER_SIZES)])
        out[i] = np.asarray(image.resize((size, size), Image.BICUBIC))
    return out


def load_split(split, n, size, seed=0):
    """(scenes, uint8 images) of a world split, rendered once and cached under CACHE."""
    scenes = world.make_split(split, n, seed)
    path = CACHE / f"{split}-{n}-{seed}-{size}.npy"
    if path.exists():
        return scenes, np.load(path)
    images = render(scenes, size)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, images)
    return scenes, images


def pixels(images):
    """uint8 (B, H, W, 3) -> normalised float32 (B, 3, H, W): BlipImageProcessor's rescale and normalise."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).double().mul(1 / 255).float()
    return (x - MEAN) / STD


# --- vision pre-training targets: what each cell of the 3x3 layout holds

CELL_CLASSES = ("empty",) + world.SHAPES  # what occupies a cell


def cell_labels(scenes):
    """Per-cell targets (N, 9, 3): shape class (0 = empty), colour and size of the object in each 3x3 cell
    (-100 where the cell is empty)."""
    out = np.full((len(scenes), 9, 3), -100, np.int64)
    out[..., 0] = 0
    for n, s in enumerate(scenes):
        for o in s.objects:
            out[n, world.POSITIONS.index(o.position)] = (CELL_CLASSES.index(o.shape), world.COLORS.index(o.color),
                                                         world.SIZES.index(o.size))
    return torch.from_numpy(out)


def patch_cells(grid):
    """(grid*grid,) the 3x3 cell (0..8, reading order) of each patch, by the patch centre."""
    cell_of = [min(2, int((i + 0.5) * 3 / grid)) for i in range(grid)]
    return torch.tensor([cell_of[r] * 3 + cell_of[c] for r in range(grid) for c in range(grid)])


def patch_labels(scenes, grid):
    """Per-patch targets (N, grid*grid, 4): the cell_labels of the patch's cell, then the cell index itself,
    so that every patch token has to carry what is drawn on it AND where it is."""
    cells = patch_cells(grid)
    labels = cell_labels(scenes)[:, cells]  # (N, P, 3)
    return torch.cat([labels, cells.expand(len(scenes), -1)[..., None]], -1)


def cell_pooling(grid):
    """(9, grid*grid) averaging matrix: each cell's mean over the patches whose centre lies in it."""
    cell_of = [min(2, int((i + 0.5) * 3 / grid)) for i in range(grid)]
    member = torch.tensor([[float(cell_of[r] * 3 + cell_of[c] == k) for r in range(grid) for c in range(grid)]
                           for k in range(9)])
    return member / member.sum(1, keepdim=True)


# --- texts in the app's prompt formats: (prompt, target); the target is generated after the prompt

def caption_pairs(scene):
    c = scene.caption()
    return [("", c), ("a photo of", " " + c)]


def vqa_pair(qa):
    return f"Question: {qa.question} Answer:", " " + qa.answer


def two_turn_pair(first, second):
    prompt = f"Question: {first.question} Answer: {first.answer}. Question: {second.question} Answer:"
    return prompt, " " + second.answer


def sample_text(scene, rng, captions=0.3, photo=0.4, turns=4):
    """A training text about a scene as (prompt, target) segments: a caption (share `captions`; plain or, share
    `photo`, after "a photo of") or a chat of 1..`turns` questions in the app's multi-turn format
    "Question: q1 Answer: a1. Question: q2 Answer: a2", every answer a target. Questions are drawn kind first, so
    that every kind is asked alike however many questions of it a scene has."""
    if rng.random() < captions:
        return [caption_pairs(scene)[rng.random() < photo]]
    by_kind = {}
    for qa in scene.questions():
        by_kind.setdefault(qa.kind, []).append(qa)
    chat = [rng.choice(by_kind[rng.choice(sorted(by_kind))]) for _ in range(rng.randint(1, turns))]
    return [(("" if k == 0 else ". ") + vqa_pair(qa)[0], " " + qa.answer) for k, qa in enumerate(chat)]


def check_rows(scenes, rng):
    """Held-out checks: per scene a caption and one question of each kind (and a second-turn one):
    (scene index, (prompt, target), kind) rows."""
    rows = []
    for i, s in enumerate(scenes):
        rows.append((i, caption_pairs(s)[0], "caption"))
        qas = s.questions()
        for kind in world.KINDS:
            of_kind = [qa for qa in qas if qa.kind == kind]
            if of_kind:
                rows.append((i, vqa_pair(rng.choice(of_kind)), kind))
        rows.append((i, two_turn_pair(*rng.sample(qas, 2)), "second turn"))
    return rows


def lm_text(scene, rng, captions=0.3, photo=0.4, turns=4):
    """A language-model pre-training text: (context, segments), the segments of `sample_text` after the scene's
    description written in front of BOS, the slot that the image's query tokens take later (the LM learns to read
    a context there). The description is the caption, objects in reading order."""
    segments = sample_text(scene, rng, captions, photo, turns)
    if segments[0][0].startswith("Question"):
        # an order is drawn but not kept (describe() writes reading order); the draw stays so that the recipe
        # reproduces the shipped model's data
        return world.describe(rng.sample(scene.objects, len(scene.objects))), segments
    return scene.caption(), segments


# --- deep supervision of the language model: where the objects are bound, what a question states

_ALTERNATIVES = {"size": world.SIZES, "color": world.COLORS, "shape": world.SHAPES,
                 "plural": world.PLURALS.values(), "position": world.POSITION_PHRASES.values()}
_ALT = {k: "|".join(v) for k, v in _ALTERNATIVES.items()}
# the object (or objects) a question is about: "the small circle", "the object in the top left", "is there a red
# star", "how many crosses"; and what a yes/no question claims about it, at its end: "... red?", "... a star?"
_SUBJECT = re.compile(rf"(?:\bthe|is there an?|how many) (?:(?P<size>{_ALT['size']}) )?(?:(?P<color>{_ALT['color']}) )?"
                      rf"(?:(?P<shape>{_ALT['shape']})|(?P<plural>{_ALT['plural']})|shapes|"
                      rf"object(?: (?P<position>{_ALT['position']}))?)\b")
_CLAIM = re.compile(rf"^is the .* (?:(?P<size>{_ALT['size']})|(?P<color>{_ALT['color']})|"
                    rf"an? (?P<shape>{_ALT['shape']})|(?P<position>{_ALT['position']}))\?$")
_PHRASE_TO_POSITION = {v: k for k, v in world.POSITION_PHRASES.items()}
_PLURAL_TO_SHAPE = {v: k for k, v in world.PLURALS.items()}


def question_attributes(question):
    """{attribute: value} that a question states about the object it asks after: what picks the object out
    ("what color is the small circle?" -> size, shape; "how many crosses are there?" -> shape; "... the object in
    the top left?" -> position) and, in a yes/no question, what it claims ("is the circle red?" -> shape, color).
    Every reference in the world is unique, so a yes/no question is "yes" exactly when an object has them all."""
    stated = {}
    for pattern in (_SUBJECT, _CLAIM):
        m = pattern.search(question)
        if m:
            stated |= {k: v for k, v in m.groupdict().items() if v is not None}
    if "plural" in stated:
        stated["shape"] = _PLURAL_TO_SHAPE[stated.pop("plural")]
    if "position" in stated:
        stated["position"] = _PHRASE_TO_POSITION[stated["position"]]
    return stated


def object_ends(tokenizer, scene):
    """[(token index, object)]: the last token of each object's phrase in the tokenized caption."""
    caption = scene.caption()
    ids = tokenizer.encode(caption, add_special_tokens=False)
    out, end = [], 0
    for o in sorted(scene.objects, key=lambda o: world.POSITIONS.index(o.position)):
        phrase = world.describe([o])
        end = caption.index(phrase, end) + len(phrase)
        prefix = tokenizer.encode(caption[:end], add_special_tokens=False)
        if ids[:len(prefix)] != prefix:
            raise ValueError(f"{caption[:end]!r} does not tokenize as a prefix of {caption!r}")
        out.append((len(prefix) - 1, o))
    return out


class OptText:
    """Token ids for the OPT side: [context or image tokens] BOS (prompt target)... "\\n", labels on the targets."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.bos, self.pad = tokenizer.bos_token_id, tokenizer.pad_token_id
        self.image = tokenizer.convert_tokens_to_ids("<image>")

    def encode(self, segments):
        """BOS, then the (prompt, target) segments, then "\\n": (ids, labelled), a flag per id, set on the targets'
        ids and the final "\\n". The text is tokenized whole, as at inference, and each segment must end on a
        token boundary."""
        pieces = [x for prompt, target in segments for x in ((prompt, False), (target, True))] + [("\n", True)]
        text, ids, labelled = "", [], []
        for piece, label in pieces:
            text += piece
            new = self.tok.encode(text)
            if new[:len(ids)] != ids:
                raise ValueError(f"{text[:len(text) - len(piece)]!r} does not tokenize as a prefix of {text!r}")
            labelled += [label] * (len(new) - len(ids))
            ids = new
        return ids, labelled

    def batch(self, rows):
        """rows: (prefix ids, ids, labelled) -> input_ids, attention_mask, labels (right padded; the prefix and
        unlabelled ids are -100)."""
        seqs = [prefix + ids for prefix, ids, _ in rows]
        t = max(map(len, seqs))
        input_ids = torch.full((len(rows), t), self.pad)
        mask = torch.zeros(len(rows), t, dtype=torch.long)
        labels = torch.full((len(rows), t), -100)
        for i, ((prefix, _, labelled), seq) in enumerate(zip(rows, seqs)):
            input_ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
            keep = torch.tensor([False] * len(prefix) + labelled)
            labels[i, :len(seq)] = torch.tensor(seq).masked_fill(~keep, -100)
        return input_ids, mask, labels

    def lm_batch(self, texts):
        """(context, segments) texts: the context written in front of BOS, the loss on the targets only."""
        return self.batch([(self.tok.encode(c, add_special_tokens=False), *self.encode(segs)) for c, segs in texts])

    def attribute_targets(self, texts, scenes):
        """Targets of the language model's deep supervision for lm_batch(texts) about `scenes`, as {attribute:
        (n, 3) tensor of (row, position, value index)}: at the last token of each object's phrase in the context
        (the caption), all four attributes of that object; at the last prompt token of each question (the ":" the
        answer follows), what the question states about its object (`question_attributes`)."""
        rows = {k: [] for k in world.ATTRIBUTES}
        for b, ((context, segments), scene) in enumerate(zip(texts, scenes)):
            if context != scene.caption():
                raise ValueError(f"the context {context!r} is not the caption of its scene")
            marks = [(t, vars(o)) for t, o in object_ends(self.tok, scene)]
            _, labelled = self.encode(segments)
            offset = len(self.tok.encode(context, add_special_tokens=False))
            starts = [t for t, flag in enumerate(labelled) if flag and (t == 0 or not labelled[t - 1])]
            for start, (prompt, _) in zip(starts, segments):
                question = re.search(r"Question: (.*) Answer:$", prompt)
                if question:
                    marks.append((offset + start - 1, question_attributes(question[1])))
            for t, attrs in marks:
                for k, v in attrs.items():
                    rows[k].append((b, t, world.VALUES[k].index(v)))
        return {k: torch.tensor(v, dtype=torch.long).reshape(-1, 3) for k, v in rows.items()}

    def vlm_batch(self, texts, num_query_tokens):
        """The processor's layout: Q image tokens, BOS, then the segments (targets labelled) and "\\n"."""
        return self.batch([([self.image] * num_query_tokens, *self.encode(segs)) for segs in texts])

    def generation_batch(self, prompts, num_query_tokens):
        """Left-padded prompts for generation: Q image tokens, pads, BOS, prompt (as the reference lays them out)."""
        ids = [self.tok.encode(p) for p in prompts]
        t = max(map(len, ids))
        input_ids = torch.tensor([[self.image] * num_query_tokens + [self.pad] * (t - len(r)) + r for r in ids])
        mask = torch.tensor([[1] * num_query_tokens + [0] * (t - len(r)) + [1] * len(r) for r in ids])
        return input_ids, mask


def bert_batch(tokenizer, texts):
    """[CLS] text [SEP], right padded: input_ids, attention_mask."""
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def rng_for(seed, step):
    return random.Random(f"{seed}/{step}")
