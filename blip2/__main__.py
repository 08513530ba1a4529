"""Command line: python -m blip2 caption IMAGE... | ask IMAGE QUESTION | match IMAGE TEXT...

  python -m blip2 caption photo.jpg --num-beams 5 --max-new-tokens 30
  python -m blip2 ask photo.jpg "what is on the table?" --model Salesforce/blip2-opt-2.7b --dtype bfloat16
  python -m blip2 match photo.jpg "a cat" "a dog" --itm-model Salesforce/blip2-itm-vit-g --json
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, "assets", "blip2-tiny")
DEFAULT_ITM_MODEL = os.path.join(ROOT, "assets", "blip2-tiny-itm")
DECODING = (  # (flag, type, help): generate() settings
    ("--max-new-tokens", int, "new tokens at most (default 20)"),
    ("--min-new-tokens", int, "new tokens at least"),
    ("--num-beams", int, "beam search with this many beams"),
    ("--num-return-sequences", int, "sequences per image (beam search or sampling)"),
    ("--temperature", float, "sampling temperature"),
    ("--top-k", int, "sample among the k most likely tokens (0: all; default 50)"),
    ("--top-p", float, "sample within this probability mass"),
    ("--repetition-penalty", float, "> 1 discourages repeated tokens"),
    ("--length-penalty", float, "beam score = log-prob / length ** this"),
    ("--no-repeat-ngram-size", int, "never repeat an n-gram of this size"),
    ("--seed", int, "seed for sampling"),
)


def parser():
    p = argparse.ArgumentParser(prog="python -m blip2", description="BLIP-2 captions, questions and image-text "
                                "matching from the command line.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(cmd, itm=False):
        if itm:
            cmd.add_argument("--itm-model", default=DEFAULT_ITM_MODEL,
                             help="retrieval checkpoint (directory or hub id; default: the embedded tiny one)")
        else:
            cmd.add_argument("--model", default=DEFAULT_MODEL,
                             help="captioning checkpoint (directory or hub id; default: the embedded tiny one)")
        cmd.add_argument("--dtype", default=None, help="float32 (default), float16, bfloat16 or auto")
        cmd.add_argument("--quantize", choices=("int8", "int4", "8bit", "4bit"),
                         help="quantize the language model: int8 / int4 weight-only (CPU kernels; use with --dtype "
                              "bfloat16), 8bit / 4bit (bitsandbytes)")
        cmd.add_argument("--json", action="store_true", help="print JSON")
        if not itm:
            for flag, kind, help_ in DECODING:
                cmd.add_argument(flag, type=kind, help=help_)
            cmd.add_argument("--do-sample", action="store_true", help="sample instead of greedy / beam search")

    caption = sub.add_parser("caption", help="describe images")
    caption.add_argument("images", nargs="+", metavar="IMAGE")
    caption.add_argument("--prompt", default="", help="text the caption continues")
    common(caption)
    ask = sub.add_parser("ask", help="answer a question about an image")
    ask.add_argument("image", metavar="IMAGE")
    ask.add_argument("question")
    common(ask)
    match = sub.add_parser("match", help="image-text matching scores (ITM probability, ITC cosine)")
    match.add_argument("image", metavar="IMAGE")
    match.add_argument("texts", nargs="+", metavar="TEXT")
    common(match, itm=True)
    return p


def load(cls, path, args, flag):
    from .loading import resolve_checkpoint
    from .processing import Blip2Processor
    from .weight_only import quantization_flag

    if path in (DEFAULT_MODEL, DEFAULT_ITM_MODEL) and not os.path.isdir(path):
        raise FileNotFoundError(f"the embedded model {path} is not there; pass {flag} DIRECTORY_OR_HUB_ID")
    path = resolve_checkpoint(path)
    model = cls.from_pretrained(path, dtype=args.dtype, quantization=quantization_flag(args.quantize))
    return model, Blip2Processor.from_pretrained(path)


def run(args):
    import blip2

    from .runner import Blip2Runner

    if args.command == "match":
        model, processor = load(blip2.Blip2ForImageTextRetrieval, args.itm_model, args, "--itm-model")
        matches = Blip2Runner(itm_model=model, itm_processor=processor).match(args.image, args.texts)
        return [vars(m) for m in matches], "\n".join(f"itm {m.itm:.4f}  itc {m.itc:+.4f}  {m.text}" for m in matches)
    model, processor = load(blip2.Blip2ForConditionalGeneration, args.model, args, "--model")
    runner = Blip2Runner(model, processor)
    names = [flag[2:].replace("-", "_") for flag, _, _ in DECODING]
    decoding = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.do_sample:
        decoding["do_sample"] = True
    if args.command == "ask":
        images, results = [args.image], [runner.ask(args.image, args.question, **decoding)]
    else:
        images, results = args.images, [runner.caption(image, args.prompt, **decoding) for image in args.images]
    records = [{"image": i, "text": g.text, "texts": g.texts, "prompt": g.prompt, "truncated": g.truncated}
               for i, g in zip(images, results)]
    lines = []
    for r in records:
        lines += [(f"{r['image']}: " if len(records) > 1 else "") + t for t in r["texts"]]
        if r["truncated"]:
            lines.append(f"(the prompt was too long for the model and lost its beginning: {r['prompt']!r})")
    return records[0] if args.command == "ask" else records, "\n".join(lines)


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        records, text = run(args)
    except (ValueError, TypeError, OSError, ImportError) as e:  # bad settings, images, checkpoints: what and why
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(records, ensure_ascii=False, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
