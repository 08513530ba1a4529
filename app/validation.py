"""Request validation: texts, images and decoding settings, each refused with a RequestError naming the problem.

* `clean_text`, `parse_texts`: a user's text, normalised and bounded;
* `load_image` (any file, payload or PIL image -> checked RGB image + content hash): blip2.images opens the file
  (accepted formats only, EXIF-upright, RGB); this module adds the app's limits and the upload gate;
* `parse_decoding` (API names -> DecodingSettings, checked by blip2.decoding) and `generate_kwargs()`: the one
  form that goes down to the runner.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from blip2 import decoding
from blip2.images import FORMAT_NAMES, Keyed, open_image, upright_rgb

from .config import Limits
from .errors import RequestError
from .files import request_file

# ----------------------------------------------------------------------------------------------------
# text validation

_KEEP_SPACE = {"\t", "\n", "\r", "\v", "\f", "\x85", "\u2028", "\u2029"}


def clean_text(text: object, what: str = "text", max_chars: int = 1000, allow_empty: bool = False,
               single_line: bool = True) -> str:
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


def parse_texts(value: object, limits: Limits, what: str = "candidate texts") -> list[str]:
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

@dataclass
class CheckedImage:
    """An image that passed validation: RGB, EXIF-upright, at most `work_side` px, and its content hash."""

    image: Image.Image
    digest: str
    original_size: tuple[int, int]
    source: object = None  # what the caller gave (a path stays a path, for galleries)
    notes: list = field(default_factory=list)

    def keyed(self) -> Keyed:
        """For the runner: keyed by this content hash, decoded (a LazyImage) only on a cache miss."""
        return Keyed(self.digest, lambda: self.image)


# what a request may send as an image: a Gradio payload dict, a path, bytes, a PIL image, an array (None: refused)
ImageInput = CheckedImage | dict | str | Path | bytes | Image.Image | np.ndarray | None


def payload_path(value):
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


def decode_image(data: bytes, limits: Limits, name: str = "the image", source: object = None) -> CheckedImage:
    """Bytes of an image file -> CheckedImage, or RequestError saying what is wrong with the file."""
    if len(data) == 0:
        raise RequestError(f"{name} is an empty file (0 bytes): upload it again")
    if len(data) > limits.max_upload_bytes:
        raise RequestError(f"{name} is {len(data) / 2**20:.1f} MB; the limit is {limits.max_upload_mb:g} MB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_image measures it
        try:
            im = open_image(data)
        except Image.DecompressionBombError:
            raise RequestError(f"{name} declares more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:g} million pixels, "
                               f"over the limit of {limits.max_image_pixels / 1e6:g} megapixels (a decompression "
                               "bomb?): refused") from None
        except UnidentifiedImageError:
            raise RequestError(f"{name} is not a file this app can read as an image (expected {FORMAT_NAMES}; "
                               "renaming a file to .jpg does not change what it holds)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise RequestError(f"{name} is truncated or corrupt and cannot be read ({e})") from None
    return check_image(im, limits, name, image_digest(data), source)


def check_image(im: Image.Image, limits: Limits, name: str = "the image", digest: str | None = None,
                source: object = None) -> CheckedImage:
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
        rgb, exif_readable = upright_rgb(im)
    except Exception as e:
        raise RequestError(f"{name} has an unsupported pixel format ({im.mode}): {e}") from None
    if not exif_readable:
        notes.append(f"{name} has an unreadable EXIF orientation: used as stored")
    if max(rgb.size) > limits.work_side:
        rgb = rgb.copy()
        rgb.thumbnail((limits.work_side, limits.work_side), Image.Resampling.BICUBIC)
    if digest is None:
        digest = image_digest(rgb.tobytes() + repr(rgb.size).encode())
    return CheckedImage(rgb, digest, (w, h), source, notes)


def load_image(value: ImageInput, limits: Limits, name: str = "the image") -> CheckedImage:
    """Whatever an event or a direct caller passes as an image -> CheckedImage (RequestError if unusable).

    Accepts a Gradio payload dict (preprocess=False), a file path, bytes, a PIL image or a numpy array. A path
    (or a payload's path) is read only when `app.files.request_file` allows it: an upload or an example file."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RequestError(f"no image given: upload {'an image' if name == 'the image' else name} first "
                           "(or pick an example)")
    if isinstance(value, CheckedImage):
        return value
    if isinstance(value, dict):
        path = payload_path(value)
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


class LazyImage(CheckedImage):
    """A gallery image whose digest is known: decoded only if a model needs its pixels (cache miss)."""

    def __init__(self, path: str | Path, digest: str, limits: Limits, name: str):
        self._path, self._limits, self._name, self._image = path, limits, name, None
        self.digest, self.source, self.notes, self.original_size = digest, str(path), [], None

    @property
    def image(self) -> Image.Image:
        if self._image is None:
            self._image = load_image(self._path, self._limits, self._name).image
        return self._image

    @image.setter
    def image(self, value: Image.Image) -> None:
        self._image = value


def gallery_item_name(item: object, i: int) -> str:
    """"image i (file name)" for a gallery item, for messages about it."""
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


# ----------------------------------------------------------------------------------------------------
# decoding settings: blip2.decoding's fields, named in the app's API as they always were

BEAM, SAMPLING = decoding.BY_NAME["do_sample"].choices
MODES = (BEAM, SAMPLING)
_MODE_ALIASES = {"beam search": BEAM, "beam": BEAM, "greedy": BEAM, "beam_search": BEAM,
                 "nucleus sampling": SAMPLING, "nucleus": SAMPLING, "sampling": SAMPLING, "sample": SAMPLING,
                 "nucleus_sampling": SAMPLING, "top-p": SAMPLING}
API_NAMES = {"do_sample": "mode", "num_return_sequences": "num_captions"}  # the rest keep generate()'s keywords


def api_name(field: decoding.Field) -> str:
    return API_NAMES.get(field.name, field.name)


def decoding_defaults(preset: Mapping[str, int | float]) -> dict:
    """The first value of each decoding control (API name -> value): blip2.decoding's, over it `preset`
    (decoding.CAPTION or decoding.ANSWER)."""
    def first(f):
        value = preset.get(f.name, f.default if f.start is None else f.start)
        return f.choices[value] if f.choices else value
    return {api_name(f): first(f) for f in decoding.OFFERED}


def resource_highs(limits: Limits) -> dict:
    """The upper ends blip2.decoding leaves to the app's resource limits."""
    return dict(num_beams=limits.max_beams, num_return_sequences=limits.max_captions,
                max_new_tokens=limits.max_new_tokens, min_new_tokens=limits.max_new_tokens)


@dataclass(frozen=True)
class DecodingSettings:
    """A request's decoding settings, checked (`parse_decoding`): generate()'s keywords for every field the app
    offers. Not blip2.generation.Decoding, the decoding run."""

    settings: Mapping[str, bool | int | float]

    @property
    def sampling(self) -> bool:
        return self.settings["do_sample"]

    @property
    def max_new_tokens(self) -> int:
        return self.settings["max_new_tokens"]

    @property
    def rows(self) -> int:
        """Sequences decoded side by side."""
        return self.settings["num_return_sequences" if self.sampling else "num_beams"]

    @property
    def streams(self) -> bool:
        """Whether the text can be streamed token by token (one sequence, no beam search)."""
        return self.settings["num_return_sequences"] == 1 and (self.sampling or self.settings["num_beams"] == 1)

    def generate_kwargs(self) -> dict:
        """generate()'s keywords, without those the chosen decoding ignores."""
        mode = SAMPLING if self.sampling else BEAM
        return {k: v for k, v in self.settings.items() if decoding.BY_NAME[k].only in (None, mode)}


def parse_decoding(limits: Limits, values: Mapping | None = None,
                   preset: Mapping[str, int | float] = decoding.CAPTION) -> DecodingSettings:
    """A request's decoding settings (API names -> what a browser or a script sent; those left out take
    `decoding_defaults(preset)`), each checked by blip2.decoding within the app's offered ranges, then the
    (beams or sampled captions) x max new tokens budget."""
    values = decoding_defaults(preset) | dict(values or {})
    unknown = sorted(set(values) - {api_name(f) for f in decoding.OFFERED})
    if unknown:
        raise RequestError(f"unknown decoding setting(s): {', '.join(unknown)}")
    mode = values.pop("mode")
    if not isinstance(mode, str) or mode.strip().lower() not in _MODE_ALIASES:
        raise RequestError(f"decoding mode must be {BEAM!r} or {SAMPLING!r}, got {mode!r}")
    raw = {f.name: values[api_name(f)] for f in decoding.OFFERED if f.name != "do_sample"}
    raw["do_sample"] = _MODE_ALIASES[mode.strip().lower()] == SAMPLING
    try:
        d = DecodingSettings(decoding.check(raw, resource_highs(limits)))
    except ValueError as e:
        raise RequestError(str(e)) from None
    if d.rows * d.max_new_tokens > limits.max_beam_tokens:
        what = "sampled captions" if d.sampling else "beams"
        raise RequestError(f"{d.rows} {what} x {d.max_new_tokens} new tokens = {d.rows * d.max_new_tokens} is over "
                           f"the limit of {limits.max_beam_tokens}: lower one of them")
    return d


def parse_number(value: object, name: str, lo: float, hi: float, integer: bool = False) -> int | float:
    """A setting sent by a browser or a script: a number (or numeric string) within [lo, hi]."""
    field = decoding.Field(name, int if integer else float, None, name, "")
    try:
        return decoding.number(field, value, lo, hi, parse=True)
    except ValueError as e:
        raise RequestError(str(e)) from None
