"""How fast a language model of the recipe's size learns to look an object up by what a question names.

python -m blip2.train.probe --form "what color is the SHAPE?" --steps 3000
python -m blip2.train.probe --form "what color is the SHAPE?" --steps 3000 --reference   # transformers' OPT
python -m blip2.train.probe --form "what color is the SHAPE?" --steps 500 --deep-supervision   # as stage 0 trains

Trains a fresh language model (stage 0's configuration and schedule) on ONE question form only, written as
`evaluate.question_form` abstracts it, each question after its scene's description as in stage 0, and prints the
held-out teacher-forced accuracy by number of objects every --every steps. With one object every answer is in
the description; with two or three, scoring near the chance of picking any object present means the lookup has
not formed. --context pairs gives the smallest context that still needs it ("circle red, square blue");
--reference trains the reference `transformers.OPTForCausalLM` instead (the test oracle), to tell the learning
dynamics from a fault of ours. --deep-supervision adds stage 0's attribute heads (`losses.attribute_loss`: each
object's attributes at the end of its phrase, what the question names at its ":"), which is what makes the lookup
form.
"""

import argparse
from pathlib import Path

import torch

from blip2 import OPTConfig
from blip2.opt import OPTForCausalLM
from blip2.train import data, evaluate, losses, stages, world

CONTEXTS = {
    "caption": lambda scene: scene.caption(),
    "pairs": lambda scene: ", ".join(f"{o.shape} {o.color}" for o in scene.objects),
}


def probe(form, steps, context="caption", reference=False, work=Path("/tmp/blip2-train"), every=500, r=None,
          n_val=600, deep_supervision=False):
    """Train on `form` alone (recipe `r`, default the shipped one); returns [(step, {"n=1": accuracy, ...,
    "all": ...})] at every check."""
    r = r or stages.Recipe()
    if deep_supervision and context != "caption":
        raise ValueError("--deep-supervision marks the objects of the caption: use --context caption")
    torch.manual_seed(r.seed)
    tok = stages.processors(work, r)[0].tokenizer
    text = data.OptText(tok)
    config = stages.text_config(r, tok)
    if reference:
        import transformers  # the reference, for this dev comparison only (a test dependency)
        lm = transformers.OPTForCausalLM(transformers.OPTConfig(**config))
    else:
        lm = OPTForCausalLM(OPTConfig.from_dict(config))
    stages.init_weights(lm)
    lm.tie_weights()
    heads = stages.init_weights(losses.attribute_heads(r.text_hidden)) if deep_supervision else None

    def questions(scene):
        return [qa for qa in scene.questions() if evaluate.question_form(qa.question) == form]

    scenes = [s for s in world.make_split("train", r.n_train, r.seed) if questions(s)]
    val = [s for s in world.make_split("val", n_val, r.seed) if questions(s)]
    if not scenes or not val:
        raise ValueError(f"no question of the world has the form {form!r} (see evaluate.question_form)")
    vrng = data.rng_for(r.seed, "val")
    val_rows = [(i, data.vqa_pair(vrng.choice(questions(s))), f"n={len(s.objects)}") for i, s in enumerate(val)]
    describe = CONTEXTS[context]

    def batch(pairs):  # (scene, (prompt, target)) -> the description in front of BOS, the loss on the answer
        return text.lm_batch([(describe(s), [pair]) for s, pair in pairs])

    draw = stages.batches(len(scenes), r.batch, r.seed + 1)
    history, done = [], []  # checks; steps taken

    def check():
        def right(rows):
            input_ids, mask, labels = batch([(val[i], pair) for i, pair, _ in rows])
            return stages.exact(lm(input_ids=input_ids, attention_mask=mask).logits, labels)
        scores = dict(sorted(stages.per_kind(right, val_rows).items()))
        history.append((len(done), scores))
        return scores

    def loss_fn(step):
        done.append(step)
        rng = data.rng_for(r.seed, step)
        pairs = [(scenes[i], data.vqa_pair(rng.choice(questions(scenes[i])))) for i in draw().tolist()]
        input_ids, mask, labels = batch(pairs)
        out = lm(input_ids=input_ids, attention_mask=mask, labels=labels, output_hidden_states=deep_supervision)
        if not deep_supervision:
            return out.loss, {}
        targets = text.attribute_targets([(describe(s), [pair]) for s, pair in pairs], [s for s, _ in pairs])
        return out.loss + losses.attribute_loss(heads, out.hidden_states[r.lm_aux_layer], targets), {}

    trainable = torch.nn.ModuleDict({"lm": lm, "heads": heads}) if deep_supervision else lm
    stages.train(trainable, loss_fn, steps, r.lm_lr, f"probe: {form}", every=every, check=check)
    return history


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--form", default="what color is the SHAPE?")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--context", choices=sorted(CONTEXTS), default="caption")
    parser.add_argument("--reference", action="store_true", help="train transformers.OPTForCausalLM instead")
    parser.add_argument("--deep-supervision", action="store_true", help="with stage 0's attribute heads")
    parser.add_argument("--work", type=Path, default=Path("/tmp/blip2-train"), help="where the tokenizers are")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    probe(args.form, args.steps, args.context, args.reference, args.work, args.every,
          deep_supervision=args.deep_supervision)


if __name__ == "__main__":
    main()
