"""Scores of the trained models on held-out scenes of the world.

python -m blip2.train.evaluate --n 500   # the embedded blip2/assets/blip2-tiny and blip2-tiny-itm

- captions (empty prompt): exact match of every object and attribute (world.caption_matches), per-attribute rate
- VQA: one question of each kind per scene ("Question: q Answer:") plus a second-turn question, accuracy per kind
- ITM: true caption vs the world's one-attribute hard negative: accuracy and AUC
- ITC: recall@1 image->text and text->image in galleries of 100 images
- with --detail, VQA accuracy per question form ("what color is the SHAPE?") and per number of objects: which
  references the answers resolve
- with --quantize int8 / int4 (--group-size), the captioning model's language model runs weight-only quantized
  (blip2/weight_only.py), and with --vision int its vision tower and Q-Former too; the retrieval model is unchanged
"""

import argparse
import random
import re

import numpy as np
import torch

from blip2 import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval
from blip2.catalogue import EMBEDDED_MODELS, GENERATION, RETRIEVAL
from blip2.processing import Blip2Processor
from blip2.train import data, world
from blip2.weight_only import WeightOnlyConfig

_FORM_WORDS = [(re.compile(r"\b(" + "|".join(values) + r")\b"), name) for values, name in (
    (world.COLORS, "COLOR"), ((*world.SHAPES, *world.PLURALS.values()), "SHAPE"), (world.SIZES, "SIZE"),
    (sorted(world.POSITION_PHRASES.values(), key=len, reverse=True), "POSITION"))]


def question_form(question):
    """The question with its values abstracted: "is the small circle in the top left?" -> "is the SIZE SHAPE
    POSITION?" (articles dropped)."""
    for pattern, name in _FORM_WORDS:
        question = pattern.sub(name, question)
    return re.sub(r"\b(a|an) ", "", question)


def batched(fn, n, size):
    return [x for i in range(0, n, size) for x in fn(slice(i, min(n, i + size)))]


@torch.no_grad()
def generation_scores(model, processor, scenes, images, batch=100, detail=False):
    text = data.OptText(processor.tokenizer)
    q = model.config.num_query_tokens
    embeds = torch.cat([model.get_image_features(data.pixels(images[i:i + batch])).pooler_output
                        for i in range(0, len(images), batch)])  # (N, Q, D_t): the image side, once

    def answer(rows):  # rows: (scene index, prompt) -> generated text
        def run(s):
            ids, mask = text.generation_batch([p for _, p in rows[s]], q)
            out = model.generate(image_embeds=embeds[[i for i, _ in rows[s]]], input_ids=ids, attention_mask=mask,
                                 max_new_tokens=48)
            return processor.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        return [t.strip() for t in batched(run, len(rows), batch)]

    captions = answer([(i, "") for i in range(len(scenes))])
    matches = [world.caption_matches(s, c) for s, c in zip(scenes, captions)]
    scores = {"caption exact": np.mean([m["exact"] for m in matches]),
              "caption count": np.mean([m["count"] for m in matches])}
    for attr in world.ATTRIBUTES:
        scores[f"caption {attr}"] = np.mean([o[attr] for m in matches for o in m["objects"]])
    rows = [row for row in data.check_rows(scenes, random.Random("evaluate")) if row[2] != "caption"]
    answers = answer([(i, prompt) for i, (prompt, _), _ in rows])
    right = np.array([a == target.strip() for a, (_, (_, target), _) in zip(answers, rows)])
    kinds = np.array([kind for _, _, kind in rows])
    for kind in (*world.KINDS, "second turn"):
        scores[f"vqa {kind}"] = right[kinds == kind].mean()
    scores["vqa overall"] = right.mean()
    if detail:
        groups = {}
        for (i, (prompt, _), kind), ok in zip(rows, right):
            n = len(scenes[i].objects)
            groups.setdefault(f"vqa {kind}, {n} object{'s' * (n > 1)}", []).append(ok)
            if kind != "second turn":
                groups.setdefault(f"vqa {question_form(prompt[len('Question: '):-len(' Answer:')])}", []).append(ok)
        scores |= {key: np.mean(oks) for key, oks in sorted(groups.items())}
    return scores, captions


def auc(pos, neg):
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


@torch.no_grad()
def retrieval_scores(model, processor, scenes, images, gallery=100, batch=100):
    tok = processor.tokenizer
    rng = random.Random("evaluate/itm")
    captions = [s.caption() for s in scenes]
    negatives = [world.hard_negative_caption(s, rng) for s in scenes]
    feats = torch.cat([model.vision_model(data.pixels(images[i:i + batch])).last_hidden_state
                       for i in range(0, len(images), batch)])

    def itm(texts):
        def run(s):
            ids, mask = data.bert_batch(tok, texts[s])
            return model.itm_logits(feats[s], ids, mask)[0].softmax(1)[:, 1].tolist()
        return np.array(batched(run, len(texts), batch))

    pos, neg = itm(captions), itm(negatives)
    scores = {"itm accuracy": (np.mean(pos > 0.5) + np.mean(neg < 0.5)) / 2, "itm auc": auc(pos, neg)}
    image_embeds = torch.stack(batched(lambda s: list(model.itc_image_embeds(feats[s])), len(scenes), batch))
    text_embeds = torch.stack(batched(lambda s: list(model.itc_text_embeds(*data.bert_batch(tok, captions[s]))[0]),
                                      len(scenes), batch))
    i2t, t2i = [], []
    for start in range(0, len(scenes) - gallery + 1, gallery):
        g = slice(start, start + gallery)
        sim = torch.einsum("iqe,te->iqt", image_embeds[g], text_embeds[g]).amax(1)  # (images, texts)
        names = captions[g]
        i2t += [names[j] == names[k] for k, j in enumerate(sim.argmax(1).tolist())]
        t2i += [names[j] == names[k] for k, j in enumerate(sim.argmax(0).tolist())]
    scores["itc r@1 image->text"], scores["itc r@1 text->image"] = np.mean(i2t), np.mean(t2i)
    return scores


def evaluate(model_dir, itm_dir, n, split="test", show=0, detail=False, quantization=None):
    scores = {}
    if model_dir:
        model = Blip2ForConditionalGeneration.from_pretrained(model_dir, quantization=quantization).eval()
        processor = Blip2Processor.from_pretrained(model_dir)
        scenes, images = data.load_split(split, n, model.config.vision_config.image_size)
        gen, captions = generation_scores(model, processor, scenes, images, detail=detail)
        scores |= gen
        for s, c in list(zip(scenes, captions))[:show]:
            print(f"  truth: {s.caption()}\n  model: {c}")
    if itm_dir:
        model = Blip2ForImageTextRetrieval.from_pretrained(itm_dir).eval()
        processor = Blip2Processor.from_pretrained(itm_dir)
        scenes, images = data.load_split(split, n, model.config.vision_config.image_size)
        scores |= retrieval_scores(model, processor, scenes, images)
    return scores


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(EMBEDDED_MODELS[GENERATION]))
    parser.add_argument("--itm-model", default=str(EMBEDDED_MODELS[RETRIEVAL]))
    parser.add_argument("--n", type=int, default=500, help="held-out scenes")
    parser.add_argument("--split", default="test", choices=world.SPLITS)
    parser.add_argument("--show", type=int, default=3, help="print this many captions")
    parser.add_argument("--detail", action="store_true", help="VQA accuracy per question form and scene size too")
    parser.add_argument("--quantize", choices=("int8", "int4"), help="weight-only quantized language model")
    parser.add_argument("--group-size", type=int, default=WeightOnlyConfig.group_size, help="int4 group size")
    parser.add_argument("--vision", choices=("auto", "int", "float"), default="auto",
                        help="with --quantize: the vision tower and Q-Former quantized too (int), kept (float), or "
                             "as decided for this CPU at load (auto)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    vision = {"auto": None, "int": True, "float": False}[args.vision]
    quant = args.quantize and WeightOnlyConfig(bits=int(args.quantize[3:]), group_size=args.group_size,
                                               include_vision=vision)
    for name, value in evaluate(args.model, args.itm_model, args.n, args.split, args.show, args.detail,
                                quant or None).items():
        print(f"{name:24s} {100 * value:6.2f}%")


if __name__ == "__main__":
    main()
