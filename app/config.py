"""The app's settings, each defined once: the startup flags of app.py with their environment variables (FLAGS:
argparse, the About tab and the README's table are made from it), and the resource limits (Limits, each one a
BLIP2_* environment variable)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Flag:
    """A startup flag of app.py and the environment variables that set it (the first one set wins; the flag
    itself wins over them)."""

    flag: str
    env: tuple[str, ...]
    help: str
    default: str | int | bool | None = None
    type: type = str  # str, int, or bool: a switch
    choices: tuple[str, ...] | None = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def from_env(self, parser: argparse.ArgumentParser) -> str | int | bool | None:
        """The default this flag takes from the environment; a value that does not parse stops the startup."""
        name = next((n for n in self.env if os.environ.get(n, "").strip()), None)
        raw = os.environ.get(name, "").strip() if name else ""
        if self.type is bool:  # true/yes/on/1 or false/no/off/0 in any case: anything else is not guessed
            if raw.lower() in TRUE + FALSE + ("",):
                return raw.lower() in TRUE
            parser.error(f"environment variable {name}={os.environ[name]!r} is not a boolean: use one of "
                         f"{'/'.join(TRUE)} or {'/'.join(FALSE)}")
        if not raw:
            return self.default
        if self.type is int:
            try:
                return int(raw)
            except ValueError:
                parser.error(f"environment variable {name}={raw!r} is not a whole number")
        return raw


FLAGS = (
    Flag("--model", ("BLIP2_MODEL",), "image-to-text checkpoint for Caption and Chat: a Salesforce/blip2-* hub id "
         "or a local directory (default: the embedded blip2-tiny)"),
    Flag("--itm-model", ("BLIP2_ITM_MODEL",), "image-text matching checkpoint for Matching and Search, e.g. "
         "Salesforce/blip2-itm-vit-g (default: the embedded blip2-tiny-itm)"),
    Flag("--dtype", ("BLIP2_DTYPE",), "auto (CPU: bfloat16 for real checkpoints where the CPU runs it natively, "
         "float32 for the embedded model, said in the startup log; GPU: float16, bfloat16 for Flan-T5, which "
         "overflows in float16), float32, float16 or bfloat16", "auto",
         choices=("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16")),
    Flag("--quantize", ("BLIP2_QUANTIZE",), "the language model's weights: int4 / int8 (weight-only, CPU: blip2's "
         "VNNI kernels), 8bit / 4bit (bitsandbytes, for CUDA)", choices=("int8", "int4", "8bit", "4bit")),
    Flag("--device-map", ("BLIP2_DEVICE_MAP",), "e.g. auto, to spread a large model over GPUs and the CPU"),
    Flag("--host", ("HOST", "GRADIO_SERVER_NAME"), "the address to listen on (127.0.0.1; 0.0.0.0 inside a Space)",
         "127.0.0.1"),
    Flag("--port", ("PORT", "GRADIO_SERVER_PORT"), "the port to listen on (7860)", 7860, int),
    Flag("--share", ("BLIP2_SHARE",), "a public gradio.live link (off); booleans take true/false, yes/no, on/off, "
         "1/0 in any case, and any other value stops the startup with a message", False, bool),
    Flag("--threads", ("BLIP2_THREADS",), "torch CPU threads (0: 1 for the tiny embedded models, which more "
         "threads only slow down, else torch's default)", 0, int),
    Flag("--no-warm-up", ("BLIP2_NO_WARM_UP",), "load the models on first use instead of at startup (off)", False,
         bool),
    Flag("--index", ("BLIP2_INDEX",), "an image index built with python -m blip2 index: the Search tab searches it "
         "(with the retrieval model it was built with) beside its upload-a-gallery mode", metavar="INDEX_DIR"),
)


def flag_parser() -> argparse.ArgumentParser:
    """app.py's argument parser: every flag of FLAGS, its default read from its environment variables now."""
    parser = argparse.ArgumentParser(prog="app.py", description="BLIP-2 Studio, a Gradio app for BLIP-2. Every flag "
                                     "can also be set by the environment variable in brackets.")
    for f in FLAGS:
        default, env = f.from_env(parser), " or ".join(f.env)
        if f.type is bool:
            parser.add_argument(f.flag, action="store_true", default=default, help=f"{f.help} [{env}]")
        else:
            parser.add_argument(f.flag, type=f.type, default=default, choices=f.choices, metavar=f.metavar,
                                help=f"{f.help} [{env}]")
    return parser


def flags_table() -> str:
    """FLAGS as a Markdown table (the About tab and the README show it)."""
    rows = [f"| `{f.flag}` | {' or '.join(f'`{e}`' for e in f.env)} | {f.help} |" for f in FLAGS]
    return "\n".join(["| flag | environment variable | meaning |", "| --- | --- | --- |", *rows])


def _env(name, default, cast):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return cast(raw)
    except ValueError:
        raise SystemExit(f"environment variable {name}={raw!r} is not a valid {cast.__name__}") from None


@dataclass
class Limits:
    """Resource limits. Each field can be set with the environment variable BLIP2_<FIELD NAME IN CAPITALS>."""

    max_upload_mb: float = 20.0  # launch(max_file_size=...): larger uploads are refused by the server
    max_image_pixels: int = 40_000_000  # width x height; larger images (and decompression bombs) are refused
    max_aspect_ratio: float = 20.0  # long side / short side; more extreme images are refused
    work_side: int = 1024  # images are downsized to this long side once checked (the model sees 224-364 px)
    max_prompt_chars: int = 1000  # caption prefix, chat question, search query
    max_candidates: int = 20  # candidate texts in image-text matching
    max_candidate_chars: int = 300  # per candidate text
    max_gallery: int = 48  # images searched in one request
    max_new_tokens: int = 128
    max_beams: int = 8
    max_captions: int = 5  # captions returned at once
    max_beam_tokens: int = 800  # (beams or sampled captions) x max_new_tokens
    time_limit_s: float = 60.0  # per request; generation stops at the next token once it has passed
    queue_size: int = 16  # requests waiting; more are refused with "queue full"
    concurrency: int = 8  # model requests running at once (one concurrency group): captions and chat answers share
    # the captioner's batching loop (blip2.scheduler), the others take their model's lock
    max_chat_turns: int = 20  # turns kept in a session's chat history
    max_loaded_models: int = 2  # per role (generation / retrieval), the startup models included
    search_rerank_k: int = 5  # default number of top ITC hits re-ranked with the ITM head

    @classmethod
    def from_env(cls, **overrides) -> Limits:
        values = {}
        for f in dataclasses.fields(cls):
            cast = float if isinstance(f.default, float) else int
            values[f.name] = _env(f"BLIP2_{f.name.upper()}", f.default, cast)
        values.update({k: v for k, v in overrides.items() if v is not None})
        limits = cls(**values)
        limits.check()
        return limits

    def check(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"limit {f.name} must be a positive number, got {v!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
