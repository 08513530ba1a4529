"""Train the embedded tiny BLIP-2 by the paper's two-stage recipe, on the procedural world, on a CPU.

python -m blip2.train --threads 2           # every stage, then the evaluation (~95 minutes, 2 cores)
python -m blip2.train --stage qformer --steps 20         # one stage, few steps (smoke run)

Writes OUT/blip2-tiny-itm (stage 1) and OUT/blip2-tiny (stage 2); the stage-0 parts (vision.safetensors, lm.safetensors)
and the tokenizers go to --work.
"""

import argparse
from dataclasses import fields, replace
from pathlib import Path

import torch

from blip2.catalogue import EMBEDDED_MODELS, GENERATION
from blip2.train import evaluate
from blip2.train.stages import STAGES, Recipe, run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=EMBEDDED_MODELS[GENERATION].parent)
    parser.add_argument("--work", type=Path, default=Path("/tmp/blip2-train"))
    parser.add_argument("--stage", choices=("all", *STAGES), default="all")
    parser.add_argument("--steps", type=int, help="steps of every stage run (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    parser.add_argument("--eval-n", type=int, default=300, help="validation scenes of the final evaluation")
    for f in fields(Recipe):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = parser.parse_args()
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in fields(Recipe)})
    if args.steps is not None:
        recipe = replace(recipe, **{f"{s}_steps": args.steps for s in STAGES})
    torch.set_num_threads(args.threads)
    run(STAGES if args.stage == "all" else (args.stage,), args.work, args.out, recipe)
    if args.stage in ("all", "bridge") and args.eval_n:
        scores = evaluate.evaluate(args.out / "blip2-tiny", args.out / "blip2-tiny-itm", args.eval_n, "val", show=3)
        for name, value in scores.items():
            print(f"{name:24s} {100 * value:6.2f}%")


if __name__ == "__main__":
    main()
