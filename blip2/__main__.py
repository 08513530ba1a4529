"""Command line: python -m blip2 caption IMAGE... | ask IMAGE QUESTION | match IMAGE TEXT... | index | search

  python -m blip2 caption photo.jpg --num-beams 5 --max-new-tokens 30
  python -m blip2 ask photo.jpg "what is on the table?" --model Salesforce/blip2-opt-2.7b --dtype bfloat16
  python -m blip2 match photo.jpg "a cat" "a dog" --itm-model Salesforce/blip2-itm-vit-g --json
  python -m blip2 caption photos/ "more/*.jpg" list.txt --out captions.parquet [--ray [ADDRESS]]
  python -m blip2 index photos/ --out photos.index [--captions] [--ray [ADDRESS]]
  python -m blip2 search photos.index "a red circle on the left" -k 10 --rerank 20
"""

import argparse
import json
import os
import sys
from typing import Any

import torch.nn as nn

from .bulk import caption_job, pretrained
from .catalogue import EMBEDDED_MODELS, GENERATION, RETRIEVAL
from .config import read_json
from .decoding import ANSWER, CAPTION, FIELDS, Field
from .distributed import RaySettings
from .index import META, index_job, search_command
from .modeling import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval
from .processing import Blip2Processor
from .runner import Blip2Runner

DEFAULT_MODEL, DEFAULT_ITM_MODEL = str(EMBEDDED_MODELS[GENERATION]), str(EMBEDDED_MODELS[RETRIEVAL])


def decoding_flag(cmd: argparse.ArgumentParser, field: Field) -> None:
    """One decoding setting of blip2.decoding as a flag; left out, generate() (or a caption's / an answer's
    defaults) decides."""
    if field.type is bool:
        cmd.add_argument(field.flag, action="store_true", default=None, help=field.help)
        return
    default = (f"{CAPTION[field.name]} for a caption, {ANSWER[field.name]} for an answer" if field.name in CAPTION
               else field.default)
    cmd.add_argument(field.flag, type=field.type, metavar=field.name.split("_")[-1].upper(),
                     help=field.help + ("" if default is None else f" (default: {default})"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m blip2", description="BLIP-2 captions, questions and image-text "
                                "matching from the command line.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(cmd, itm=False, gen=True):
        if itm:
            cmd.add_argument("--itm-model", default=DEFAULT_ITM_MODEL,
                             help="retrieval checkpoint (directory or hub id; default: the embedded tiny one)")
        if gen:
            cmd.add_argument("--model", default=DEFAULT_MODEL,
                             help="captioning checkpoint (directory or hub id; default: the embedded tiny one)")
        cmd.add_argument("--dtype", default=None, help="float32 (default), float16, bfloat16 or auto")
        cmd.add_argument("--quantize", choices=("int8", "int4", "8bit", "4bit"),
                         help="quantize the language model: int8 / int4 weight-only (CPU kernels; use with --dtype "
                              "bfloat16), 8bit / 4bit (bitsandbytes)")
        cmd.add_argument("--json", action="store_true", help="print JSON")
        if gen:
            for field in FIELDS:
                decoding_flag(cmd, field)

    def bulk(cmd):
        cmd.add_argument("--batch-size", type=int, default=16, help="images per model pass (default 16)")
        cmd.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                         help="run on Ray: a local Ray, or ADDRESS of a running cluster ('auto' after ray start)")
        cmd.add_argument("--concurrency", type=int, default=1, help="Ray actors, one model each (default 1)")
        cmd.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs (and threads) per Ray actor")
        cmd.add_argument("--no-progress", action="store_true", help="no progress bar")

    caption = sub.add_parser("caption", help="describe images (a whole collection with --out)")
    caption.add_argument("images", nargs="+", metavar="IMAGE",
                         help="image files; with --out also folders, glob patterns and .txt lists of paths")
    caption.add_argument("--prompt", default="", help="text the caption continues")
    caption.add_argument("--out", help="write rows to this .parquet or .jsonl (resumable: a rerun skips what it "
                                       "holds) instead of printing")
    common(caption)
    caption.set_defaults(**CAPTION)
    bulk(caption)
    ask = sub.add_parser("ask", help="answer a question about an image")
    ask.add_argument("image", metavar="IMAGE")
    ask.add_argument("question")
    common(ask)
    ask.set_defaults(**ANSWER)
    match = sub.add_parser("match", help="image-text matching scores (ITM probability, ITC cosine)")
    match.add_argument("image", metavar="IMAGE")
    match.add_argument("texts", nargs="+", metavar="TEXT")
    common(match, itm=True, gen=False)
    index = sub.add_parser("index", help="index a collection for text search (ITC embeddings, faiss)")
    index.add_argument("images", nargs="+", metavar="PATH", help="image files, folders, glob patterns, .txt lists")
    index.add_argument("--out", required=True, metavar="INDEX_DIR", help="index folder (updated incrementally)")
    index.add_argument("--captions", action="store_true", help="also caption every image (--model)")
    index.add_argument("--prompt", default="", help="text the captions continue")
    common(index, itm=True)
    bulk(index)
    search = sub.add_parser("search", help="search an index by text: ITC through faiss, then ITM re-ranking")
    search.add_argument("index", metavar="INDEX_DIR")
    search.add_argument("text")
    search.add_argument("-k", type=int, default=10, help="results (default 10)")
    search.add_argument("--rerank", type=int, default=0, metavar="N",
                        help="re-rank the N best by ITM log-odds + ITC cosine, as the app ranks (default 0: ITC)")
    search.add_argument("--approx", action="store_true",
                        help="approximate search (IVF over pooled embeddings, exact re-score); prints its recall")
    search.add_argument("--candidates", type=int, default=200, help="--approx: images re-scored exactly")
    search.add_argument("--nprobe", type=int, default=16, help="--approx: IVF lists searched")
    search.add_argument("--itm-model", help="retrieval checkpoint (default: the one the index was built with)")
    search.add_argument("--dtype", default=None, help="float32 (default), float16, bfloat16 or auto")
    search.add_argument("--json", action="store_true", help="print JSON")
    return p


def load(cls: type[nn.Module], path: str, args: argparse.Namespace, flag: str) -> tuple[nn.Module, Blip2Processor]:
    if path in (DEFAULT_MODEL, DEFAULT_ITM_MODEL) and not os.path.isdir(path):
        raise FileNotFoundError(f"the embedded model {path} is not there; pass {flag} DIRECTORY_OR_HUB_ID")
    return pretrained(cls, path, args.dtype, getattr(args, "quantize", None))


def decoding_of(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in FIELDS if getattr(args, f.name) is not None}


def run_collection(args: argparse.Namespace) -> tuple[Any, str]:
    """caption --out, index and search."""
    if args.command == "search":
        meta_path = os.path.join(args.index, META)
        if args.itm_model is None and not os.path.exists(meta_path):
            raise FileNotFoundError(f"{args.index} is not an index (no {META}): build it with python -m blip2 index")
        args.itm_model = args.itm_model or read_json(meta_path)["model"]
        runner = Blip2Runner(None, None, *load(Blip2ForImageTextRetrieval, args.itm_model, args, "--itm-model"))
        hits, note = search_command(runner, args.index, args.text, args.k, args.rerank, args.approx, args.candidates,
                                    args.nprobe)
        lines = [f"{i:>3}  itc {h.itc:+.4f}" + (f"  itm {h.itm:.4f}  score {h.score:+.3f}" if h.itm is not None else "")
                 + f"  {h.path}" + (f"  ({h.caption})" if h.caption else "") for i, h in enumerate(hits, 1)]
        print(note, file=sys.stderr)
        return [vars(h) for h in hits], "\n".join(lines)
    ray = None
    captions = args.command == "caption" or args.captions
    if args.ray is not None:
        ray = RaySettings(None if args.ray == "local" else args.ray, args.concurrency, args.cpus_per_actor,
                          args.model if captions else None, args.itm_model if args.command == "index" else None,
                          args.dtype, args.quantize)
        runner = None
    else:
        gen = load(Blip2ForConditionalGeneration, args.model, args, "--model") if captions else (None, None)
        itm = load(Blip2ForImageTextRetrieval, args.itm_model, args, "--itm-model") \
            if args.command == "index" else (None, None)
        runner = Blip2Runner(*gen, *itm)
    common = {"batch_size": args.batch_size, "prompt": args.prompt, "decoding": decoding_of(args),
              "progress": not args.no_progress, "ray": ray}
    if args.command == "caption":
        summary = caption_job(runner, args.images, args.out, **common)
    else:
        summary = index_job(runner, args.images, args.out, args.itm_model, captions=args.captions, **common)
    return vars(summary), f"{args.out}: {summary}"


def run(args: argparse.Namespace) -> tuple[Any, str]:
    """(the records --json prints, the text printed otherwise) of one command."""
    if args.command in ("index", "search") or (args.command == "caption" and args.out):
        return run_collection(args)
    folders = [p for p in getattr(args, "images", []) if os.path.isdir(p)]
    if folders:
        raise ValueError(f"{folders[0]} is a folder: caption a whole collection with --out FILE.parquet")
    if args.command == "match":
        model, processor = load(Blip2ForImageTextRetrieval, args.itm_model, args, "--itm-model")
        matches = Blip2Runner(itm_model=model, itm_processor=processor).match(args.image, args.texts)
        return [vars(m) for m in matches], "\n".join(f"itm {m.itm:.4f}  itc {m.itc:+.4f}  {m.text}" for m in matches)
    model, processor = load(Blip2ForConditionalGeneration, args.model, args, "--model")
    runner = Blip2Runner(model, processor)
    decoding = decoding_of(args)
    if args.command == "ask":
        images, results = [args.image], [runner.ask(args.image, args.question, **decoding)]
    else:
        images, results = args.images, [runner.caption(image, args.prompt, **decoding) for image in args.images]
    records = [{"image": i, "text": g.text, "texts": g.texts, "prompt": g.prompt, "truncated": g.truncated,
                "max_new_tokens": g.max_new_tokens} for i, g in zip(images, results)]
    lines = []
    for r in records:
        lines += [(f"{r['image']}: " if len(records) > 1 else "") + t for t in r["texts"]]
        if r["truncated"]:
            lines.append(f"(the prompt was too long for the model and lost its beginning: {r['prompt']!r})")
        if r["max_new_tokens"] < decoding["max_new_tokens"]:
            lines.append(f"(max new tokens lowered to {r['max_new_tokens']}: the image and prompt take the rest of "
                         "the model's positions)")
    return records[0] if args.command == "ask" else records, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
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
