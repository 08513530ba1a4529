"""The app's service layer: model registry and cache, feature caches, request validation, limits.

Everything the tabs and the API share lives here, so that a request from the browser and the same request
from `gradio_client` go through the same checks:

* `Limits`: every resource limit, configurable from the command line or BLIP2_* environment variables.
* validation: `load_image` (any file or PIL image -> checked RGB image + content hash), `clean_text`,
  `parse_decoding`, `parse_texts`; each raises `RequestError` with a message meant for the user.
* `Service`: one model instance per (checkpoint, dtype, quantization, device map), shared by every session
  (never stored in gr.State), plus LRU caches keyed by image content hash; caption / chat / match / heat map /
  search operations with a per-request time limit that stops generation between tokens.

No Gradio import here: the tab modules turn `RequestError` into `gr.Error`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import math
import os
import threading
import time
import unicodedata
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from blip2.catalogue import CHECKPOINTS, GENERATION, RETRIEVAL
from blip2.dtypes import dtype_name, resolve_dtype
from blip2.explain import relevance_grid
from blip2.runner import chat_prompt, match_score  # the chat template and the ranking score, as the CLI's

from .errors import RequestError
from .files import request_file
from .paths import EMBEDDED_GENERATION, EMBEDDED_RETRIEVAL, EXAMPLES_DIR, ROOT  # noqa: F401 (re-exported)
from .zerogpu import gpu

log = logging.getLogger("blip2.app")

EMBEDDED = "blip2-tiny (embedded)"


class TimeLimitReached(RuntimeError):
    """Raised between tokens (generation's `stop`) or between image batches once the request's time limit passed."""


# ----------------------------------------------------------------------------------------------------
# limits


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
    concurrency: int = 1  # model requests running at once (all model events share one concurrency group)
    max_chat_turns: int = 20  # turns kept in a session's chat history
    max_loaded_models: int = 2  # per role (generation / retrieval), the startup models included
    search_rerank_k: int = 5  # default number of top ITC hits re-ranked with the ITM head

    @classmethod
    def from_env(cls, **overrides):
        values = {}
        for f in dataclasses.fields(cls):
            cast = float if isinstance(f.default, float) else int
            values[f.name] = _env(f"BLIP2_{f.name.upper()}", f.default, cast)
        values.update({k: v for k, v in overrides.items() if v is not None})
        limits = cls(**values)
        limits.check()
        return limits

    def check(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"limit {f.name} must be a positive number, got {v!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def as_dict(self):
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------
# text validation

_KEEP_SPACE = {"\t", "\n", "\r", "\v", "\f", "\x85", "\u2028", "\u2029"}


def clean_text(text, what="text", max_chars=1000, allow_empty=False, single_line=True) -> str:
    """A user's text, checked and normalised: NFC, control characters and unpaired surrogates removed,
    whitespace collapsed (newlines too when single_line). Emoji, mixed scripts and combining marks stay."""
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise RequestError(f"{what} must be text, got {type(text).__name__}")
    if len(text) > 4 * max_chars + 1000:  # cheap early refusal of huge payloads
        raise RequestError(f"{what} is {len(text):,} characters long; the limit is {max_chars:,}")
    text = unicodedata.normalize("NFC", text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
                                 if any(0xD800 <= ord(c) <= 0xDFFF for c in text) else text)
    out = []
    for c in text:
        if c in _KEEP_SPACE:
            out.append(" " if single_line or c not in "\n\r" else "\n")
        elif unicodedata.category(c) in ("Cc", "Cs", "Cn") or c == "\ufffd":
            continue  # controls, lone surrogates, unassigned code points
        else:
            out.append(c)
    text = "".join(out)
    if single_line:
        text = " ".join(text.split())
    else:
        text = "\n".join(" ".join(line.split()) for line in text.split("\n"))
        text = text.strip("\n")
    if len(text) > max_chars:
        raise RequestError(f"{what} is {len(text):,} characters long; the limit is {max_chars:,}")
    if not text and not allow_empty:
        raise RequestError(f"{what} is empty: type something first")
    return text


def parse_texts(value, limits: Limits, what="candidate texts") -> list[str]:
    """Candidate texts, one per line (a str) or a list of str; blank lines dropped, duplicates kept once."""
    if value is None:
        value = ""
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, str) for v in value):
            raise RequestError(f"{what} must be text, one per line")
        lines = list(value)
    elif isinstance(value, str):
        if len(value) > (limits.max_candidate_chars + 1) * limits.max_candidates * 4 + 1000:
            raise RequestError(f"{what}: {len(value):,} characters is far too long "
                               f"(at most {limits.max_candidates} lines of {limits.max_candidate_chars} characters)")
        lines = value.splitlines()
    else:
        raise RequestError(f"{what} must be text, one per line; got {type(value).__name__}")
    texts = []
    for i, line in enumerate(lines, 1):
        t = clean_text(line, f"line {i} of the {what}", limits.max_candidate_chars, allow_empty=True)
        if t and t not in texts:
            texts.append(t)
    if not texts:
        raise RequestError(f"{what}: type at least one text (one per line)")
    if len(texts) > limits.max_candidates:
        raise RequestError(f"{what}: {len(texts)} texts given; the limit is {limits.max_candidates}")
    return texts


# ----------------------------------------------------------------------------------------------------
# images

IMAGE_FORMATS = "JPEG, PNG, WebP, GIF, BMP or TIFF"


@dataclass
class CheckedImage:
    """An image that passed validation: RGB, EXIF-upright, at most `work_side` px, and its content hash."""

    image: Image.Image
    digest: str
    original_size: tuple[int, int]
    source: object = None  # what the caller gave (a path stays a path, for galleries)
    notes: list = field(default_factory=list)


def _payload_path(value):
    """A Gradio FileData / ImageData payload (dict) or GalleryImage dict -> file path, or None."""
    if isinstance(value, dict):
        if "image" in value and isinstance(value["image"], dict):  # a gallery item
            value = value["image"]
        path = value.get("path")
        if path:
            return str(path)
        url = value.get("url") or ""
        if url.startswith("data:"):
            return None
        raise RequestError("the image payload holds no file path: upload the file (gradio_client: handle_file)")
    return None


def image_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: transparency composited onto white; 16-bit and float images rescaled to 8 bits."""
    mode = im.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64)
        if a.ndim == 3:
            a = a[..., 0]
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode == "F" and lo >= 0 and hi <= 1:
            a = a * 255
        elif mode.startswith("I;16") or (lo >= 0 and 255 < hi <= 65535):
            a = a / 257  # 16-bit grey levels
        elif not (lo >= 0 and hi <= 255):
            a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
        mode = "L"
    has_alpha = "A" in im.getbands() or "a" in im.getbands() or im.info.get("transparency") is not None
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return im
    try:
        return im.convert("RGB")
    except (ValueError, OSError):  # modes PIL cannot convert directly (LAB, HSV...): through their raw bands
        return Image.merge("RGB", [b.convert("L") for b in im.split()[:3]]) if len(im.getbands()) >= 3 \
            else im.getchannel(0).convert("RGB")


def decode_image(data: bytes, limits: Limits, name="the image", source=None) -> CheckedImage:
    """Bytes of an image file -> CheckedImage, or RequestError saying what is wrong with the file."""
    if len(data) == 0:
        raise RequestError(f"{name} is an empty file (0 bytes): upload it again")
    if len(data) > limits.max_upload_bytes:
        raise RequestError(f"{name} is {len(data) / 2**20:.1f} MB; the limit is {limits.max_upload_mb:g} MB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_image measures it
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise RequestError(f"{name} declares more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:g} million pixels, "
                               f"over the limit of {limits.max_image_pixels / 1e6:g} megapixels (a decompression "
                               "bomb?): refused") from None
        except UnidentifiedImageError:
            raise RequestError(f"{name} is not a file this app can read as an image (expected {IMAGE_FORMATS}; "
                               "renaming a file to .jpg does not change what it holds)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise RequestError(f"{name} is truncated or corrupt and cannot be read ({e})") from None
    return check_image(im, limits, name, image_digest(data), source)


def check_image(im: Image.Image, limits: Limits, name="the image", digest=None, source=None) -> CheckedImage:
    """An opened (possibly lazy) PIL image -> CheckedImage: size limits, first frame, EXIF, mode, downsizing."""
    w, h = im.size
    if w < 1 or h < 1:
        raise RequestError(f"{name} has no pixels ({w}x{h})")
    if w * h > limits.max_image_pixels:
        raise RequestError(f"{name} is {w}x{h} = {w * h / 1e6:.1f} megapixels; the limit is "
                           f"{limits.max_image_pixels / 1e6:g} megapixels: downsize it first")
    ratio = max(w, h) / min(w, h)
    if ratio > limits.max_aspect_ratio:
        raise RequestError(f"{name} is {w}x{h} pixels, an aspect ratio of {ratio:.0f}:1; the limit is "
                           f"{limits.max_aspect_ratio:g}:1 (the model squeezes every image into a square): "
                           "crop it first")
    notes = []
    if getattr(im, "n_frames", 1) > 1:
        notes.append(f"{name} has {im.n_frames} frames: the first one is used")
        im.seek(0)
    try:
        if im.format == "JPEG" and max(w, h) > 2 * limits.work_side:
            im.draft("RGB", (limits.work_side, limits.work_side))  # decode JPEGs at a reduced scale
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise RequestError(f"{name} is truncated or corrupt and cannot be decoded ({e})") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block: keep the image as stored
        notes.append(f"{name} has an unreadable EXIF orientation: used as stored")
    try:
        rgb = _to_rgb(im)
    except Exception as e:
        raise RequestError(f"{name} has an unsupported pixel format ({im.mode}): {e}") from None
    if max(rgb.size) > limits.work_side:
        rgb = rgb.copy()
        rgb.thumbnail((limits.work_side, limits.work_side), Image.Resampling.BICUBIC)
    if digest is None:
        digest = image_digest(rgb.tobytes() + repr(rgb.size).encode())
    return CheckedImage(rgb, digest, (w, h), source, notes)


def load_image(value, limits: Limits, name="the image") -> CheckedImage:
    """Whatever an event or a direct caller passes as an image -> CheckedImage (RequestError if unusable).

    Accepts a Gradio payload dict (preprocess=False), a file path, bytes, a PIL image or a numpy array. A path
    (or a payload's path) is read only when `app.files.request_file` allows it: an upload or an example file."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RequestError(f"no image given: upload {'an image' if name == 'the image' else name} first "
                           "(or pick an example)")
    if isinstance(value, CheckedImage):
        return value
    if isinstance(value, dict):
        path = _payload_path(value)
        if path is None:
            raise RequestError(f"{name}: inline (base64) images are not accepted; upload the file")
        value = path
    if isinstance(value, (str, Path)):
        path = request_file(value)  # only uploads and the example files, whoever asks
        size = path.stat().st_size
        if size > limits.max_upload_bytes:
            raise RequestError(f"{name} is {size / 2**20:.1f} MB; the limit is {limits.max_upload_mb:g} MB")
        return decode_image(path.read_bytes(), limits, name, source=str(path))
    if isinstance(value, (bytes, bytearray)):
        return decode_image(bytes(value), limits, name)
    if isinstance(value, np.ndarray):
        try:
            array = value
            if array.dtype == bool:
                array = array.astype(np.uint8) * 255
            if np.issubdtype(array.dtype, np.floating):
                array = np.nan_to_num(array)
                array = array * 255 if array.size and array.max() <= 1 and array.min() >= 0 else array
                array = np.clip(array, 0, 255).astype(np.uint8)
            value = Image.fromarray(array)
        except (TypeError, ValueError) as e:
            raise RequestError(f"{name}: an array of shape {value.shape} and type {value.dtype} is not an image "
                               f"({e})") from None
    if isinstance(value, Image.Image):
        return check_image(value, limits, name, source=value)
    raise RequestError(f"{name} must be an image file, got {type(value).__name__}")


# ----------------------------------------------------------------------------------------------------
# decoding settings

BEAM, SAMPLING = "beam search", "nucleus sampling"
MODES = (BEAM, SAMPLING)
_MODE_ALIASES = {"beam search": BEAM, "beam": BEAM, "greedy": BEAM, "beam_search": BEAM,
                 "nucleus sampling": SAMPLING, "nucleus": SAMPLING, "sampling": SAMPLING, "sample": SAMPLING,
                 "nucleus_sampling": SAMPLING, "top-p": SAMPLING}


@dataclass
class DecodingSettings:
    """A request's decoding settings as the app offers them (not blip2.generation.Decoding, the decoding run):
    `generate_kwargs()` turns them into generate's keywords."""

    mode: str = BEAM
    num_beams: int = 1
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 50
    max_new_tokens: int = 30
    min_new_tokens: int = 1
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    num_captions: int = 1

    @property
    def sampling(self):
        return self.mode == SAMPLING

    @property
    def rows(self):
        """Sequences decoded side by side."""
        return self.num_captions if self.sampling else self.num_beams

    @property
    def streams(self):
        """Whether the text can be streamed token by token (one sequence, no beam search)."""
        return self.num_captions == 1 and (self.sampling or self.num_beams == 1)

    def generate_kwargs(self):
        kw = dict(max_new_tokens=self.max_new_tokens, min_new_tokens=min(self.min_new_tokens, self.max_new_tokens),
                  repetition_penalty=self.repetition_penalty, num_return_sequences=self.num_captions)
        if self.sampling:
            kw.update(do_sample=True, num_beams=1, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            kw.update(do_sample=False, num_beams=self.num_beams)
            if self.num_beams > 1:
                kw["length_penalty"] = self.length_penalty
        return kw


def _number(value, name, lo, hi, integer=False):
    """A setting sent by a browser or a script: a number (or numeric string) within [lo, hi]."""
    if isinstance(value, bool) or value is None:
        raise RequestError(f"{name} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise RequestError(f"{name} must be a number, got the text {value[:40]!r}") from None
    if not isinstance(value, (int, float, np.integer, np.floating)):
        raise RequestError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value) if not isinstance(value, (int, np.integer)) else int(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {value}")
    if integer:
        if float(value) != int(value):
            raise RequestError(f"{name} must be a whole number, got {value}")
        value = int(value)
    if not lo <= value <= hi:
        raise RequestError(f"{name} must be between {lo:g} and {hi:g}, got {value:g}")
    return value


def parse_decoding(limits: Limits, mode=BEAM, num_beams=1, temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=30,
                   min_new_tokens=1, repetition_penalty=1.0, length_penalty=1.0, num_captions=1) -> DecodingSettings:
    """Decoding settings from a request, each checked: type, range, and the beams x tokens budget."""
    if not isinstance(mode, str) or mode.strip().lower() not in _MODE_ALIASES:
        raise RequestError(f"decoding mode must be {BEAM!r} or {SAMPLING!r}, got {mode!r}")
    d = DecodingSettings(
        mode=_MODE_ALIASES[mode.strip().lower()],
        num_beams=_number(num_beams, "beams", 1, limits.max_beams, integer=True),
        temperature=_number(temperature, "temperature", 0.01, 5.0),
        top_p=_number(top_p, "top-p", 0.01, 1.0),
        top_k=_number(top_k, "top-k", 0, 1000, integer=True),
        max_new_tokens=_number(max_new_tokens, "max new tokens", 1, limits.max_new_tokens, integer=True),
        min_new_tokens=_number(min_new_tokens, "min new tokens", 0, limits.max_new_tokens, integer=True),
        repetition_penalty=_number(repetition_penalty, "repetition penalty", 0.5, 5.0),
        length_penalty=_number(length_penalty, "length penalty", -5.0, 5.0),
        num_captions=_number(num_captions, "number of captions", 1, limits.max_captions, integer=True),
    )
    if d.min_new_tokens > d.max_new_tokens:
        raise RequestError(f"min new tokens ({d.min_new_tokens}) cannot exceed max new tokens ({d.max_new_tokens})")
    if not d.sampling and d.num_captions > d.num_beams:
        raise RequestError(f"beam search returns at most one caption per beam: {d.num_captions} captions need "
                           f"at least {d.num_captions} beams (or use {SAMPLING})")
    if d.rows * d.max_new_tokens > limits.max_beam_tokens:
        what = "sampled captions" if d.sampling else "beams"
        raise RequestError(f"{d.rows} {what} x {d.max_new_tokens} new tokens = {d.rows * d.max_new_tokens} is over "
                           f"the limit of {limits.max_beam_tokens}: lower one of them")
    return d


# ----------------------------------------------------------------------------------------------------
# checkpoints

@dataclass(frozen=True)
class Checkpoint:
    """An entry of the model picker. `sources` maps a role to a hub id or a local directory."""

    key: str
    sources: tuple  # ((role, source), ...)
    params_b: float | None = None  # billions of parameters, for the memory check (None: unknown)
    note: str = ""

    def source(self, role):
        return dict(self.sources).get(role)

    @property
    def roles(self):
        return tuple(r for r, _ in self.sources)


KNOWN_CHECKPOINTS = [Checkpoint(k.repo_id, ((k.task, k.repo_id),), k.params_b, k.note) for k in CHECKPOINTS]


@dataclass
class ModelSettings:
    dtype: str | None = None  # None/auto: CPU: bfloat16 for real checkpoints where it runs natively, else float32;
    # GPU: float16 (bfloat16 for Flan-T5)
    quantize: str | None = None  # "int8" | "int4" (weight-only, CPU) | "8bit" | "4bit" (bitsandbytes)
    device_map: str | None = None  # e.g. "auto", "cpu", "cuda:0"

    def resolved_dtype(self, is_t5: bool, device: str, large: bool = False) -> str:
        """`large`: a real checkpoint (not the embedded model), which runs in bfloat16 on a CPU that supports it."""
        dtype = (self.dtype or "auto").lower()
        if dtype == "auto" and device == "cpu":
            from blip2.weight_only import cpu_supports_bf16

            dtype = "bfloat16" if large and cpu_supports_bf16() else "float32"
            log.info("--dtype auto on the CPU: %s (%s)", dtype, "the embedded model" if not large else
                     "this CPU runs bfloat16 natively" if dtype == "bfloat16" else "this CPU has no native bfloat16")
        elif dtype == "auto":
            dtype = "bfloat16" if is_t5 else "float16"
        try:  # the library's one table of names (fp16, bf16, half, ...)
            dtype = dtype_name(resolve_dtype(dtype))
        except ValueError:
            raise RequestError(f"dtype {self.dtype!r} is not supported: float32, float16, bfloat16 or auto") from None
        if is_t5 and dtype == "float16":
            dtype = "bfloat16"  # Flan-T5 overflows in float16
        return dtype


@dataclass
class Loaded:
    """A loaded model with its processor; shared by every session."""

    key: str
    role: str
    source: str
    model: torch.nn.Module
    processor: object
    dtype: str
    device: torch.device
    load_s: float
    runner: object = None  # blip2.runner.Blip2Runner over this model: generation, matching, feature caches
    lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def is_t5(self):
        cfg = self.model.config
        return bool(getattr(cfg, "is_encoder_decoder", False))

    @property
    def name(self):
        return f"{self.key} [{self.dtype}{', ' + str(self.device) if self.device.type != 'cpu' else ''}]"


def _available_memory_bytes(device: str):
    try:
        if device.startswith("cuda") and torch.cuda.is_available():
            return torch.cuda.mem_get_info()[0]
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except Exception:
        pass
    return None


# ----------------------------------------------------------------------------------------------------
# time limits: generation's `stop` callback between tokens; a deadline in scope for loops over many images

_request = threading.local()


def _stop_after(deadline: float):
    """Generation's `stop` callback (checked between tokens): the request's time limit."""
    if time.monotonic() > deadline:
        raise TimeLimitReached()


@contextlib.contextmanager
def deadline_scope(deadline):
    """Within this block (in this thread), loops over many images (`itc_image`) stop with TimeLimitReached after
    `deadline`."""
    old = getattr(_request, "deadline", None)
    _request.deadline = deadline
    try:
        yield
    finally:
        _request.deadline = old


class LRU:
    """A small thread-safe LRU cache."""

    def __init__(self, capacity):
        self.capacity, self.data, self.lock = capacity, OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.data:
                self.data.move_to_end(key)
                return self.data[key]
        return None

    def put(self, key, value):
        with self.lock:
            self.data[key] = value
            self.data.move_to_end(key)
            while len(self.data) > self.capacity:
                self.data.popitem(last=False)

    def __len__(self):
        return len(self.data)

    def clear(self):
        with self.lock:
            self.data.clear()


# ----------------------------------------------------------------------------------------------------
# chat


@dataclass
class ChatPrompt:
    text: str
    dropped: int  # oldest turns left out to fit the context
    max_new_tokens: int


def clean_answer(text: str) -> str:
    """Cut a generated answer at the first line break or at a new "Question:" the model starts by itself."""
    text = text.replace("\r", "\n").split("\n")[0]
    for stop in ("Question:", "Answer:", "Short answer:"):
        i = text.find(stop)
        if i > 0:
            text = text[:i]
    return text.strip()


# ----------------------------------------------------------------------------------------------------
# heat maps

_INFERNO = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                     [250, 193, 39], [252, 255, 164]], dtype=np.float64)


def colorize(values: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 with an inferno-like colour map."""
    x = np.clip(values, 0, 1) * (len(_INFERNO) - 1)
    i = np.clip(np.floor(x).astype(int), 0, len(_INFERNO) - 2)
    t = (x - i)[..., None]
    return np.round(_INFERNO[i] * (1 - t) + _INFERNO[i + 1] * t).astype(np.uint8)


def overlay_heatmap(image: Image.Image, grid: np.ndarray, alpha=0.55, max_side=512) -> Image.Image:
    """Blend a (h, w) relevance grid, stretched over the whole image as the model saw it, onto the image."""
    im = image.copy()
    im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    g = grid.astype(np.float64)
    g = g - g.min()
    g = g / g.max() if g.max() > 0 else g
    heat = Image.fromarray((g * 255).astype(np.uint8), "L").resize(im.size, Image.Resampling.BICUBIC)
    colored = Image.fromarray(colorize(np.asarray(heat, dtype=np.float64) / 255))
    weight = Image.fromarray((np.asarray(heat, dtype=np.float64) * alpha).astype(np.uint8), "L")
    return Image.composite(colored, im, weight)


# ----------------------------------------------------------------------------------------------------
# the service


@dataclass
class CaptionResult:
    captions: list[str]
    notice: str = ""


@dataclass
class MatchRow:
    text: str
    itm: float  # probability that the text matches the image
    itc: float  # cosine similarity (best query)

    @property
    def score(self):
        """The ranking score: ITM log-odds + ITC cosine, as LAVIS re-ranks retrieval (ITM logit + ITC)."""
        return match_score(self.itm, self.itc)


class Service:
    """Models, caches and operations, shared by every session of the app."""

    def __init__(self, generation=None, retrieval=None, settings: ModelSettings | None = None,
                 limits: Limits | None = None, extra_checkpoints=()):
        self.limits = limits or Limits.from_env()
        self.settings = settings or ModelSettings()
        Image.MAX_IMAGE_PIXELS = self.limits.max_image_pixels  # PIL's own bomb check, at the same limit
        self.catalogue: OrderedDict[str, Checkpoint] = OrderedDict()
        self.catalogue[EMBEDDED] = Checkpoint(EMBEDDED, ((GENERATION, str(EMBEDDED_GENERATION)),
                                                         (RETRIEVAL, str(EMBEDDED_RETRIEVAL))), 0.01,
                                              "tiny model trained on a world of coloured shapes (offline)")
        for c in extra_checkpoints:
            self.catalogue[c.key] = c
        for c in KNOWN_CHECKPOINTS:
            self.catalogue.setdefault(c.key, c)
        self.default = {GENERATION: self._add_source(generation, GENERATION) if generation else EMBEDDED,
                        RETRIEVAL: self._add_source(retrieval, RETRIEVAL) if retrieval else EMBEDDED}
        self.device = self._device()
        self._loaded: OrderedDict[tuple, Loaded] = OrderedDict()
        self._load_lock = threading.Lock()  # one load at a time
        self._registry_lock = threading.Lock()  # guards _loaded (short critical sections only)
        self._vision = LRU(64)  # (model, image hash) -> vision hidden states (ITM / heat maps)
        self._itc_images = LRU(2048)  # (model, image hash) -> normalised ITC query embeddings (Q, E)
        self._itc_texts = LRU(2048)  # (model, text) -> normalised ITC text embedding (E,)
        self._file_digests = LRU(4096)  # (path, size, mtime) -> content hash, so a gallery is not re-read
        self._in_world = LRU(4096)  # image content hash -> the embedded model's world rule's verdict

    # --- catalogue

    def _add_source(self, source, role) -> str:
        """A --model / --itm-model value: a known key, a hub id, or a local directory (added to the picker)."""
        source = str(source)
        for c in self.catalogue.values():
            if c.key == source and role in c.roles:
                return c.key
        if source in self.catalogue:
            raise ValueError(f"{source} is a {'/'.join(self.catalogue[source].roles)} checkpoint, not a {role} one")
        key = source if not os.path.isdir(source) else f"{os.path.basename(os.path.normpath(source))} (local)"
        self.catalogue[key] = Checkpoint(key, ((role, source),), None, f"given on the command line ({role})")
        return key

    def choices(self):
        return list(self.catalogue)

    def checkpoint(self, key) -> Checkpoint:
        if not isinstance(key, str) or key not in self.catalogue:
            raise RequestError(f"unknown model {str(key)[:200]!r}: choose one of the listed checkpoints "
                               f"({', '.join(self.catalogue)})")
        return self.catalogue[key]

    def session_defaults(self):
        return dict(self.default)

    @staticmethod
    def _device():
        return "cuda" if torch.cuda.is_available() else "cpu"

    # --- loading

    def _cache_key(self, source, role):
        s = self.settings
        return (source, role, s.dtype, s.quantize, s.device_map)

    def loaded_models(self) -> list[Loaded]:
        """Every model loaded now, for every role."""
        with self._registry_lock:
            return list(self._loaded.values())

    def loaded(self, key, role) -> Loaded | None:
        c = self.catalogue.get(key)
        source = c.source(role) if c else None
        return self._loaded.get(self._cache_key(source, role)) if source else None

    def get(self, key, role, progress=None) -> Loaded:
        """The shared model of checkpoint `key` for `role`, loading it (once) if needed."""
        c = self.checkpoint(key)
        source = c.source(role)
        if source is None:
            raise RequestError(f"{key} is a {'/'.join(c.roles)} model; this needs a {role} model")
        ck = self._cache_key(source, role)
        with self._registry_lock:
            hit = self._loaded.get(ck)
            if hit is not None:
                self._loaded.move_to_end(ck)
                return hit
        with self._load_lock:
            with self._registry_lock:
                hit = self._loaded.get(ck)
            if hit is not None:
                return hit
            loaded = self._load(c, role, source, progress)
            with self._registry_lock:
                self._loaded[ck] = loaded
                self._evict(role)
            return loaded

    def _evict(self, role):
        pinned = {self._cache_key(self.catalogue[self.default[r]].source(r), r) for r in (GENERATION, RETRIEVAL)}
        mine = [k for k in self._loaded if k[1] == role]
        while len(mine) > self.limits.max_loaded_models:
            victim = next((k for k in mine if k not in pinned), None)
            if victim is None:
                break
            mine.remove(victim)
            old = self._loaded.pop(victim)
            log.info("unloading %s to make room", old.name)
            del old
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def _load(self, c: Checkpoint, role, source, progress=None) -> Loaded:
        from blip2 import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval
        from blip2.processing import Blip2Processor

        say = progress or (lambda frac, desc: None)
        t0 = time.perf_counter()
        say(0.0, f"Preparing {c.key}")
        self._check_memory(c, role)
        cls = Blip2ForConditionalGeneration if role == GENERATION else Blip2ForImageTextRetrieval
        try:
            directory = self._resolve(source, say)
            say(0.5, f"Loading the weights of {c.key}")
            is_t5 = _config_is_t5(directory)
            dtype = self.settings.resolved_dtype(is_t5, self.device, _checkpoint_bytes(directory) > 2**30)
            kwargs = {"dtype": getattr(torch, dtype)}
            if self.settings.device_map:
                kwargs["device_map"] = self.settings.device_map
            elif self.device != "cpu":
                kwargs["device"] = self.device
            if self.settings.quantize:
                from blip2.weight_only import quantization_flag

                kwargs["quantization"] = quantization_flag(self.settings.quantize)
            model = cls.from_pretrained(directory, **kwargs)
            say(0.9, f"Loading the processor of {c.key}")
            processor = Blip2Processor.from_pretrained(directory)
        except RequestError:
            raise
        except (torch.OutOfMemoryError, MemoryError) as e:
            raise RequestError(f"not enough memory to load {c.key} ({type(e).__name__}); still serving the "
                               "model loaded before") from None
        except Exception as e:  # offline hub id, broken files, unsupported config...
            log.warning("loading %s failed: %s: %s", c.key, type(e).__name__, e)
            raise RequestError(f"could not load {c.key}: {_short_error(e)}") from None
        if role == GENERATION and not hasattr(model, "language_model"):
            raise RequestError(f"{c.key} is not an image-to-text checkpoint")
        model.eval()
        device = model.device
        from blip2.runner import Blip2Runner

        runner = (Blip2Runner(model=model, processor=processor) if role == GENERATION
                  else Blip2Runner(itm_model=model, itm_processor=processor))
        loaded = Loaded(c.key, role, source, model, processor, dtype, device, time.perf_counter() - t0, runner)
        say(1.0, f"{c.key} is ready")
        log.info("loaded %s (%s) in %.1f s", loaded.name, role, loaded.load_s)
        return loaded

    def _resolve(self, source, say):
        """A local checkpoint directory for `source`: itself, or a hub id's snapshot (downloaded when allowed;
        tqdm bars of the download reach gr.Progress)."""
        if os.path.isdir(source):
            return source
        from blip2.io.hub import resolve_checkpoint

        say(0.1, f"Fetching {source} (downloads show their progress here)")
        try:
            return resolve_checkpoint(source)
        except Exception as e:
            raise RequestError(_short_error(e)) from None

    def _check_memory(self, c: Checkpoint, role):
        if c.params_b is None or self.settings.quantize:
            return
        bytes_per = 4 if (self.settings.dtype or "auto") in ("float32", "fp32") or \
            (self.device == "cpu" and (self.settings.dtype or "auto") == "auto") else 2
        need = c.params_b * 1e9 * bytes_per
        free = _available_memory_bytes(self.device)
        if free is not None and need > free:
            raise RequestError(f"{c.key} needs about {need / 2**30:.1f} GB of {'GPU ' if self.device != 'cpu' else ''}"
                               f"memory at {bytes_per * 8}-bit precision, but only {free / 2**30:.1f} GB is free; "
                               "still serving the model loaded before (try --dtype float16 or --quantize 8bit)")

    def warm_up(self):
        """Load the startup models (called before the server starts)."""
        for role in (GENERATION, RETRIEVAL):
            self.get(self.default[role], role)

    # --- request plumbing

    @contextlib.contextmanager
    def request(self, loaded: Loaded | None = None, deadline=None):
        """One model request: the model's lock, the time limit, no autograd."""
        deadline = deadline if deadline is not None else time.monotonic() + self.limits.time_limit_s
        lock = loaded.lock if loaded is not None else contextlib.nullcontext()
        with lock, deadline_scope(deadline), torch.no_grad():
            yield deadline

    # --- features

    def _pixels(self, loaded: Loaded, images: list[Image.Image]):
        pv = loaded.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return pv.to(loaded.device, _vision_dtype(loaded.model))

    def vision_states(self, loaded: Loaded, imgs: list[CheckedImage]):
        """(B, 1+N, D_v) vision hidden states of the retrieval model, cached per image."""
        out, missing = [None] * len(imgs), []
        for i, img in enumerate(imgs):
            out[i] = self._vision.get((loaded.key, loaded.dtype, img.digest))
            if out[i] is None:
                missing.append(i)
        for start in range(0, len(missing), 8):
            chunk = missing[start:start + 8]
            states = loaded.model.vision_model(self._pixels(loaded, [imgs[i].image for i in chunk])).last_hidden_state
            for j, i in enumerate(chunk):
                out[i] = states[j:j + 1]
                self._vision.put((loaded.key, loaded.dtype, imgs[i].digest), out[i])
        return torch.cat(out, 0)

    def itc_image(self, loaded: Loaded, imgs: list[CheckedImage]):
        """(B, Q, E) normalised ITC embeddings, cached per image content."""
        out, missing = [None] * len(imgs), []
        for i, img in enumerate(imgs):
            out[i] = self._itc_images.get((loaded.key, loaded.dtype, img.digest))
            if out[i] is None:
                missing.append(i)
        for start in range(0, len(missing), 8):
            chunk = missing[start:start + 8]
            if time.monotonic() > getattr(_request, "deadline", math.inf):
                raise TimeLimitReached()
            states = self.vision_states(loaded, [imgs[i] for i in chunk])
            emb = loaded.model.itc_image_embeds(states)
            for j, i in enumerate(chunk):
                out[i] = emb[j:j + 1]
                self._itc_images.put((loaded.key, loaded.dtype, imgs[i].digest), out[i])
        return torch.cat(out, 0)

    def _text_inputs(self, loaded: Loaded, texts):
        """(ids, mask) of user texts for the ITC / ITM heads: matching's plain-text encoding (Blip2Runner.text_batch),
        so a typed "<image>" or "[CLS]" is text in match, search and heat map alike."""
        ids, mask, _ = loaded.runner.text_batch(texts)
        return ids, mask

    def itc_text(self, loaded: Loaded, texts):
        out, missing = [None] * len(texts), []
        for i, t in enumerate(texts):
            out[i] = self._itc_texts.get((loaded.key, loaded.dtype, t))
            if out[i] is None:
                missing.append(i)
        if missing:
            ids, mask = self._text_inputs(loaded, [texts[i] for i in missing])
            emb, _ = loaded.model.itc_text_embeds(ids, mask)
            for j, i in enumerate(missing):
                out[i] = emb[j]
                self._itc_texts.put((loaded.key, loaded.dtype, texts[i]), out[i])
        return torch.stack(out, 0)

    def itm_probs(self, loaded: Loaded, states, texts):
        """ITM match probability of each (image, text) pair; states (1|B, 1+N, D_v)."""
        ids, mask = self._text_inputs(loaded, texts)
        probs = []
        for start in range(0, len(texts), 16):
            s = states if states.shape[0] == 1 else states[start:start + 16]
            logits, _ = loaded.model.itm_logits(s, ids[start:start + 16], mask[start:start + 16])
            probs.append(logits.float().softmax(-1)[:, 1])
        return torch.cat(probs).cpu()

    # --- generation

    def context_size(self, loaded: Loaded) -> int:
        cfg = loaded.model.config.text_config
        n = getattr(cfg, "max_position_embeddings", None)
        if not n or loaded.is_t5:
            tok = loaded.processor.tokenizer
            n = tok.model_max_length if tok.model_max_length < 100_000 else 512
        return int(n)

    def prompt_length(self, loaded: Loaded, prompt: str) -> int:
        """Positions the prompt takes in the language model, the image's query tokens included."""
        from blip2.runner import encode_plain

        return len(encode_plain(loaded.processor.tokenizer, prompt)) + loaded.model.config.num_query_tokens

    def generate(self, loaded: Loaded, img: CheckedImage, prompt: str, decoding: DecodingSettings, stream: bool):
        """Yield (texts, notice) as generation goes, through the model's Blip2Runner (cached image features, a
        chat's KV-cache prefix reused): the text grows token by token when `stream` and the settings allow it;
        otherwise one final yield. At the time limit a stream stops cleanly, keeping what was generated."""
        deadline = time.monotonic() + self.limits.time_limit_s
        decoding, capped = self.fit_new_tokens(loaded, prompt, decoding)
        runner, kwargs = loaded.runner, decoding.generate_kwargs() | {"stop": partial(_stop_after, deadline)}
        shortened = "The prompt was shortened from the left to fit the model's context."
        if capped:
            shortened = capped
        if stream and decoding.streams:
            text, notice, pieces, out = "", "", None, None
            try:
                with self.request(loaded, deadline):
                    out = runner.caption_stream(img.image, prompt, **kwargs)
                    pieces = iter(out)
                while True:  # generation's `stop` ends it between tokens at the deadline
                    with self.request(loaded, deadline):
                        piece = next(pieces, None)
                    if piece is None:
                        break
                    text += piece
                    yield [text.strip()], shortened if out.truncated else ""
            except TimeLimitReached:
                notice = f"Stopped at the time limit of {self.limits.time_limit_s:g} s."
            finally:
                if pieces is not None:  # a client that went away: stop decoding now, not at the next step
                    with self.request(loaded, deadline):
                        pieces.close()
                        out.pieces.close()
            yield [text.strip()], " ".join(x for x in (shortened if out and out.truncated else "", notice) if x)
            return
        try:
            with self.request(loaded, deadline):
                out = runner.caption(img.image, prompt, **kwargs)
        except TimeLimitReached:
            raise RequestError(f"generation passed the time limit of {self.limits.time_limit_s:g} s: use fewer "
                               "beams, fewer captions or fewer new tokens") from None
        yield out.texts, shortened if out.truncated else ""

    def fit_new_tokens(self, loaded: Loaded, prompt: str, decoding: DecodingSettings):
        """A decoder-only model has a fixed number of positions: max_new_tokens is lowered to what the prompt
        leaves (with a note), or the request is refused when nothing is left."""
        if loaded.is_t5:
            return decoding, ""
        room = self.context_size(loaded) - self.prompt_length(loaded, prompt)
        if room < 1:
            raise RequestError(f"the prompt takes all of this model's {self.context_size(loaded)} positions "
                               "(image tokens included): shorten it")
        if decoding.max_new_tokens <= room:
            return decoding, ""
        capped = dataclasses.replace(decoding, max_new_tokens=room, min_new_tokens=min(decoding.min_new_tokens, room))
        return capped, (f"Max new tokens lowered to {room}: the model has {self.context_size(loaded)} positions and "
                        "the image and prompt take the rest.")

    def world_caveat(self, key: str, images: list[CheckedImage]) -> str:
        """For the embedded model: a caveat when images lie outside its world of shapes (the measured rule of
        blip2.train.world_check: every photograph scikit-image ships is flagged, no world scene of the test split
        is), else ""."""
        if key != EMBEDDED:
            return ""
        from blip2.train.world_check import in_world

        outside = 0
        for img in images:  # by content hash: a cached gallery image is not decoded again for its verdict
            verdict = self._in_world.get(img.digest)
            if verdict is None:
                verdict = in_world(img.image)
                self._in_world.put(img.digest, verdict)
            outside += not verdict
        if not outside:
            return ""
        what = "This image looks" if len(images) == 1 else f"{outside} of these {len(images)} images look"
        return (f"⚠️ {what} like a photograph, outside the embedded model's world: {EMBEDDED} knows only coloured "
                "shapes on plain backgrounds, so its results are about shapes. For photographs, pick a Salesforce "
                "checkpoint in the Model picker (e.g. Salesforce/blip2-opt-2.7b) and press Load model.")

    @gpu
    def caption(self, gen_key, image, prompt="", decoding: DecodingSettings | None = None, stream=True, progress=None):
        """Yield CaptionResult(captions, notice) as the caption(s) grow."""
        loaded = self.get(gen_key, GENERATION, progress)
        img = image if isinstance(image, CheckedImage) else load_image(image, self.limits)
        prefix = clean_text(prompt, "the prompt", self.limits.max_prompt_chars, allow_empty=True)
        decoding = decoding or DecodingSettings()
        notes = " ".join(img.notes + [self.world_caveat(gen_key, [img])])
        for texts, notice in self.generate(loaded, img, prefix, decoding, stream):
            if prefix and not loaded.is_t5:
                texts = [f"{prefix} {t}".strip() if t else prefix for t in texts]
            yield CaptionResult(texts, " ".join(x for x in (notes, notice) if x))

    def chat_prompt(self, loaded: Loaded, history, question, max_new_tokens) -> ChatPrompt:
        """The prompt over past turns ("Question: q Answer: a." ...), dropping the oldest turns (and, as a last
        resort, lowering max_new_tokens) to fit the model's context."""
        context, history = self.context_size(loaded), list(history)
        last = chat_prompt(question, (), loaded.is_t5)
        for dropped in range(len(history) + 1):
            text = chat_prompt(question, history[dropped:], loaded.is_t5)  # blip2's one template (the CLI's too)
            used = self.prompt_length(loaded, text)
            room = context - used
            if room >= max_new_tokens or (dropped == len(history) and room >= min(8, max_new_tokens)):
                return ChatPrompt(text, dropped, min(max_new_tokens, room))
        raise RequestError(f"the question is too long for this model's context of {context} tokens "
                           f"({self.prompt_length(loaded, last)} tokens with the image); shorten it")

    @gpu
    def chat(self, gen_key, image, question, history, decoding: DecodingSettings | None = None, stream=True,
             progress=None):
        """One chat turn. Yields (answer so far, notice); history is [(q, a), ...] of earlier turns."""
        loaded = self.get(gen_key, GENERATION, progress)
        img = image if isinstance(image, CheckedImage) else load_image(image, self.limits)
        question = clean_text(question, "the question", self.limits.max_prompt_chars)
        decoding = dataclasses.replace(decoding or DecodingSettings(), num_captions=1)
        prompt = self.chat_prompt(loaded, history, question, decoding.max_new_tokens)
        decoding = dataclasses.replace(decoding, max_new_tokens=prompt.max_new_tokens,
                                       min_new_tokens=min(decoding.min_new_tokens, prompt.max_new_tokens))
        notes = list(img.notes) + [self.world_caveat(gen_key, [img])]
        if prompt.dropped:
            turns = "the oldest turn was" if prompt.dropped == 1 else f"the {prompt.dropped} oldest turns were"
            notes.append(f"Note: {turns} left out of the prompt to fit the model's context of "
                         f"{self.context_size(loaded)} tokens.")
        for texts, notice in self.generate(loaded, img, prompt.text, decoding, stream):
            yield clean_answer(texts[0]), " ".join(notes + ([notice] if notice else []))

    @gpu
    def match(self, ret_key, image, texts, progress=None) -> list[MatchRow]:
        """ITM probability and ITC cosine of every text against one image (encoded once), best first."""
        loaded = self.get(ret_key, RETRIEVAL, progress)
        img = image if isinstance(image, CheckedImage) else load_image(image, self.limits)
        texts = parse_texts(texts, self.limits)
        with self.request(loaded):
            rows = [MatchRow(m.text, m.itm, m.itc) for m in loaded.runner.match(img.image, texts)]
        return sorted(rows, key=lambda r: -r.score)

    @gpu
    def heatmap(self, ret_key, image, text, progress=None):
        """Where the Q-Former looks for `text` (blip2.explain: Grad-CAM of the ITM and ITC scores over the queries'
        cross-attention maps), drawn over the image. Returns (overlay image, (h, w) relevance grid, method)."""
        loaded = self.get(ret_key, RETRIEVAL, progress)
        img = image if isinstance(image, CheckedImage) else load_image(image, self.limits)
        text = clean_text(text, "the text", self.limits.max_candidate_chars)
        with self.request(loaded):
            states = loaded.runner.vision_states(img.image)  # the runner's cache, filled by a match before
            ids, mask = self._text_inputs(loaded, [text])
        with loaded.lock:  # one backward pass: nothing to stop in between
            try:
                relevance, method = relevance_grid(loaded.model, states, ids, mask)
            except ValueError as e:
                raise RequestError(str(e)) from None
        grid = relevance.cpu().numpy()
        return overlay_heatmap(img.image, grid), grid, method

    @gpu
    def search(self, ret_key, images, query, rerank_k=None, progress=None):
        """Rank a gallery for a text: ITC over every image (embeddings cached by content), then the top `rerank_k`
        are re-ranked by ITM log-odds + ITC cosine (as LAVIS re-ranks).
        Returns (ranked [(CheckedImage, itc, itm or None)], skipped [(name, reason)])."""
        loaded = self.get(ret_key, RETRIEVAL, progress)
        query = clean_text(query, "the search text", self.limits.max_prompt_chars)
        if images is None or (isinstance(images, (list, tuple)) and not images):
            raise RequestError("the gallery is empty: upload images or load the example gallery")
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) > self.limits.max_gallery:
            raise RequestError(f"{len(images)} images given; the limit is {self.limits.max_gallery} per search")
        k = _number(self.limits.search_rerank_k if rerank_k is None else rerank_k, "re-rank top-k", 0, 100,
                    integer=True)
        checked, skipped = [], []
        for i, item in enumerate(images, 1):
            name = _item_name(item, i)
            try:
                checked.append(self._gallery_image(item, name))
            except RequestError as e:
                skipped.append((name, str(e)))
        if not checked:
            raise RequestError("no usable image in the gallery: " + "; ".join(r for _, r in skipped[:3]))
        try:
            with self.request(loaded):
                img_emb = self.itc_image(loaded, checked)  # (B, Q, E)
                txt = self.itc_text(loaded, [query])[0]
                itc = (img_emb @ txt).amax(1).float().cpu()
                order = torch.argsort(itc, descending=True).tolist()
                top = order[:k]
                itm = {}
                if top:
                    states = self.vision_states(loaded, [checked[i] for i in top])
                    probs = self.itm_probs(loaded, states, [query] * len(top))
                    itm = {i: float(p) for i, p in zip(top, probs)}
        except TimeLimitReached:
            raise RequestError(f"the search passed the time limit of {self.limits.time_limit_s:g} s: search fewer "
                               "images at once (their embeddings are cached, so trying again goes further)") from None
        ranked = sorted(top, key=lambda i: -match_score(itm[i], itc[i])) + order[len(top):]
        return [(checked[i], float(itc[i]), itm.get(i)) for i in ranked], skipped

    def _gallery_image(self, item, name) -> CheckedImage:
        """Gallery items are re-checked only when their file changed: the digest is cached by path and mtime."""
        if isinstance(item, (tuple, list)) and item:
            item = item[0]
        path = _payload_path(item) if isinstance(item, dict) else item if isinstance(item, (str, Path)) else None
        if path is not None:
            path = request_file(path)
            st = os.stat(path)
            fkey = (str(path), st.st_size, st.st_mtime_ns)
            digest = self._file_digests.get(fkey)
            if digest is not None:
                return _LazyImage(path, digest, self.limits, name)
            img = load_image(path, self.limits, name)
            self._file_digests.put(fkey, img.digest)
            return img
        return load_image(item, self.limits, name)

    def info(self, session=None):
        session = session or self.session_defaults()
        models = []
        with self._registry_lock:
            loaded = list(self._loaded.items())
        for (source, role, *_), m in loaded:
            models.append({"checkpoint": m.key, "role": role, "dtype": m.dtype, "device": str(m.device),
                           "load_seconds": round(m.load_s, 2)})
        return {"session": session, "checkpoints": [
            {"name": c.key, "roles": list(c.roles), "note": c.note} for c in self.catalogue.values()],
            "loaded": models, "limits": self.limits.as_dict(),
            "settings": dataclasses.asdict(self.settings), "device": self.device}


class _LazyImage(CheckedImage):
    """A gallery image whose digest is known: decoded only if a model needs its pixels (cache miss)."""

    def __init__(self, path, digest, limits, name):
        self._path, self._limits, self._name, self._image = path, limits, name, None
        self.digest, self.source, self.notes, self.original_size = digest, str(path), [], None

    @property
    def image(self):
        if self._image is None:
            self._image = load_image(self._path, self._limits, self._name).image
        return self._image

    @image.setter
    def image(self, value):
        self._image = value


# ----------------------------------------------------------------------------------------------------
# helpers


def _checkpoint_bytes(directory) -> int:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors"))


def _vision_dtype(model):
    return model.vision_model.embeddings.patch_embedding.weight.dtype


def _config_is_t5(directory):
    import json

    try:
        with open(os.path.join(directory, "config.json")) as f:
            cfg = json.load(f)
        return (cfg.get("text_config") or {}).get("model_type") == "t5"
    except (OSError, ValueError):
        return False


def _item_name(item, i):
    path = None
    try:
        if isinstance(item, dict):
            inner = item.get("image", item) if isinstance(item.get("image"), dict) else item
            path = inner.get("orig_name") or inner.get("path")
        elif isinstance(item, (str, Path)):
            path = str(item)
    except Exception:
        path = None
    return f"image {i}" + (f" ({os.path.basename(str(path))})" if path else "")


def _short_error(e: Exception, limit=400) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg if len(msg) <= limit else msg[:limit] + "..."
