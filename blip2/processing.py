"""BLIP-2 input processing: a drop-in for transformers' Blip2Processor (5.24).

BlipImageProcessor  images -> pixel_values (B, 3, H, W), the reference's PIL/NumPy pipeline
Blip2Tokenizer      a `tokenizers.Tokenizer` that behaves like transformers' AutoTokenizer on the
                    same files (OPT/GPT-2 byte-level BPE, T5 Unigram, BERT WordPiece)
TextStreamDecoder   incremental detokenizer for streaming generation
Blip2Processor      both of the above, with the "<image>" placeholders BLIP-2 expects
"""

import base64
import json
import os
import threading

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VERY_LARGE_INTEGER = int(1e30)  # model_max_length of a tokenizer without a limit
LARGE_INTEGER = int(1e20)


def _read_json(path, default=None):
    if not os.path.isfile(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


class BatchFeature(dict):
    """A dict with attribute access (enc.input_ids) and .to(device or dtype), like transformers' BatchFeature."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def convert(self, return_tensors):
        """Turn list values into "pt" tensors or "np" arrays in place (None: leave them)."""
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
        for key, value in self.items():
            if return_tensors is None or isinstance(value, (torch.Tensor, np.ndarray)):
                continue
            try:
                array = np.array(value) if isinstance(value[0], np.ndarray) else np.array(value, dtype=np.int64)
            except ValueError as e:
                raise ValueError(
                    f"cannot stack '{key}' into one tensor: its items differ in length or shape; "
                    "pad the text (padding=True) or pass return_tensors=None"
                ) from e
            self[key] = torch.from_numpy(array) if return_tensors == "pt" else array
        return self

    def to(self, *args, **kwargs):
        """Move every tensor to a device; a dtype casts only the floating-point tensors (pixel_values)."""
        device = kwargs.get("device")
        if device is None and args and not isinstance(args[0], torch.dtype):
            if not isinstance(args[0], (str, int, torch.device)):
                raise ValueError(f"cannot move a BatchFeature to {args[0]!r}: give a device or a torch dtype")
            device = args[0]
        for key, value in self.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                self[key] = value.to(*args, **kwargs)
            elif isinstance(value, torch.Tensor) and device is not None:
                self[key] = value.to(device=device, non_blocking=kwargs.get("non_blocking", False))
        return self


# ----------------------------------------------------------------------------------------------------
# images


def convert_to_rgb(image):
    """PIL image of any mode -> (H, W, 3) uint8, compositing transparency onto white (transformers 5.24)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.array(image.convert("RGB"))


def _channels_first(array, do_convert_rgb):
    """(H, W), (H, W, C) or (C, H, W) array -> (C, H, W); C is found like the reference does (first axis wins)."""
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"an image array must have 2 or 3 dimensions, got shape {array.shape}")
    if array.shape[0] not in (1, 3, 4):
        if array.shape[-1] not in (1, 3, 4):
            raise ValueError(f"cannot find the channel axis of an image of shape {array.shape} (1, 3 or 4 channels)")
        array = np.moveaxis(array, -1, 0)
    if do_convert_rgb and array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    elif do_convert_rgb and array.shape[0] == 4:  # blend onto white, rounding integer images
        if np.issubdtype(array.dtype, np.floating) and (array.min() < 0.0 or array.max() > 1.0):
            raise ValueError(f"an RGBA float image must lie in [0, 1], got [{array.min()}, {array.max()}]")
        white = 255 if np.issubdtype(array.dtype, np.integer) else 1.0
        alpha = array[3:4] / white
        rgb = alpha * array[:3] + (1 - alpha) * white
        array = (np.round(rgb) if white == 255 else rgb).astype(array.dtype)
    return array


def _rescale(array, factor):
    return (array.astype(np.float64) * factor).astype(np.float32)


def _resize(array, height, width, resample):
    """Resize a (C, H, W) array with PIL. Floats in [0, 1] go through uint8 and come back /255, as in the reference."""
    hwc = np.moveaxis(array, 0, -1)
    hwc = hwc[..., 0] if hwc.shape[-1] == 1 else hwc
    if array.dtype == np.uint8:
        scaled = False
    elif np.allclose(hwc, hwc.astype(int)):
        if hwc.min() < 0 or hwc.max() > 255:
            raise ValueError(f"cannot resize an integer-valued image outside [0, 255]: [{hwc.min()}, {hwc.max()}]")
        scaled = False
    elif hwc.min() >= 0 and hwc.max() <= 1:
        scaled = True
        hwc = _rescale(hwc, 255)
    else:
        raise ValueError(f"a float image must lie in [0, 1] (or hold integers in [0, 255]), "
                         f"got [{hwc.min()}, {hwc.max()}]")
    out = np.array(Image.fromarray(hwc.astype(np.uint8)).resize((width, height), resample=resample))
    out = np.moveaxis(out[..., None] if out.ndim == 2 else out, -1, 0)
    return _rescale(out, 1 / 255) if scaled else out


def _size_dict(size):
    if isinstance(size, int):
        return {"height": size, "width": size}
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return {"height": size[0], "width": size[1]}
    if isinstance(size, dict) and (set(size) == {"height", "width"} or set(size) == {"shortest_edge"}):
        return dict(size)
    raise ValueError(f"size must be an int, (height, width), {{'height', 'width'}} or {{'shortest_edge'}}, "
                     f"got {size!r}")


def _output_size(height, width, size):
    if "height" in size:
        return size["height"], size["width"]
    short, long = sorted((height, width))
    other = int(size["shortest_edge"] * long / short)
    return (other, size["shortest_edge"]) if width <= height else (size["shortest_edge"], other)


def _flat_images(images):
    """One image, a 4-D batch, or a (nested) list of those -> a flat list of single images."""
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim == 4:
            return list(images)
        if images.ndim not in (2, 3):
            raise ValueError(f"an image array must have 2, 3 (one image) or 4 (a batch) dimensions, "
                             f"got shape {tuple(images.shape)}")
        return [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is an empty list")
        flat = []
        for i, image in enumerate(images):
            try:
                flat += _flat_images(image)
            except (TypeError, ValueError) as e:
                raise type(e)(f"images[{i}]: {e}") from None
        return flat
    raise TypeError(f"expected a PIL.Image.Image, numpy.ndarray, torch.Tensor or a list of them, "
                    f"got {type(images).__name__}")


class BlipImageProcessor:
    """convert_to_rgb -> resize to `size` with PIL -> rescale -> normalise -> (3, H, W) float32, like
    transformers' BlipImageProcessorPil (what BlipImageProcessor resolves to without torchvision)."""

    KEYS = ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
            "image_std", "do_convert_rgb")

    def __init__(self, do_resize=True, size=None, resample=3, do_rescale=True, rescale_factor=1 / 255,
                 do_normalize=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_convert_rgb=True):
        self.do_resize = do_resize
        self.size = _size_dict(384 if size is None else size)
        self.resample = int(resample)
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean) if isinstance(image_mean, (list, tuple)) else image_mean
        self.image_std = list(image_std) if isinstance(image_std, (list, tuple)) else image_std
        self.do_convert_rgb = do_convert_rgb

    @classmethod
    def from_dict(cls, config):
        """From a preprocessor_config.json dict, ignoring keys the pipeline does not use (image_processor_type...)."""
        return cls(**{k: v for k, v in config.items() if k in cls.KEYS and v is not None})

    @classmethod
    def from_pretrained(cls, directory):
        path = os.path.join(directory, "preprocessor_config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found")
        return cls.from_dict(_read_json(path))

    def to_dict(self):
        return {k: getattr(self, k) for k in self.KEYS} | {"image_processor_type": "BlipImageProcessor"}

    def save_pretrained(self, directory):
        os.makedirs(directory, exist_ok=True)
        _write_json(os.path.join(directory, "preprocessor_config.json"), self.to_dict())

    def __call__(self, images, return_tensors=None, **overrides):
        unknown = set(overrides) - set(self.KEYS)
        if unknown:
            raise TypeError(f"unknown image processor argument(s): {sorted(unknown)}; valid: {list(self.KEYS)}")
        p = self.to_dict() | overrides
        size = _size_dict(p["size"])
        pixel_values = []
        for i, image in enumerate(_flat_images(images)):
            try:
                pixel_values.append(self._process(image, p, size))
            except ValueError as e:
                raise ValueError(f"images[{i}]: {e}") from e
        return BatchFeature(pixel_values=pixel_values).convert(return_tensors)

    def _process(self, image, p, size):
        if isinstance(image, Image.Image):
            array = convert_to_rgb(image) if p["do_convert_rgb"] else np.array(image)
            array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
        else:
            array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
            array = _channels_first(array, p["do_convert_rgb"])
        if p["do_resize"]:
            array = _resize(array, *_output_size(*array.shape[1:], size), p["resample"])
        if p["do_rescale"]:
            array = _rescale(array, p["rescale_factor"])
        if p["do_normalize"]:
            array = array if np.issubdtype(array.dtype, np.floating) else array.astype(np.float32)
            mean, std = (np.array(p[k], dtype=array.dtype).reshape(-1, 1, 1) for k in ("image_mean", "image_std"))
            if mean.size not in (1, len(array)) or std.size not in (1, len(array)):
                raise ValueError(f"image_mean and image_std need 1 or {len(array)} values (one per channel)")
            array = (array - mean) / std
        return array


# ----------------------------------------------------------------------------------------------------
# tokenizer

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# the transformers 5.24 classes the BLIP-2 checkpoints name, with their default special tokens
FAMILIES = {
    "GPT2Tokenizer": {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
    "T5Tokenizer": {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
    "BertTokenizer": {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                      "mask_token": "[MASK]"},
}
_NOT_SAVED = {"added_tokens_decoder", "name_or_path", "is_local", "local_files_only", "add_bos_token", "add_eos_token",
              "additional_special_tokens", "max_len", "vocab_file", "merges_file", "tokenizer_file"}


def _added_token(value, special=True):
    """A special token from a config: "text" or a serialized AddedToken dict."""
    if isinstance(value, str):
        return AddedToken(value, special=special)
    fields = {k: v for k, v in value.items() if k in ("content", "single_word", "lstrip", "rstrip", "normalized")}
    return AddedToken(**fields, special=special or value.get("special", False))


def _token_text(value):
    return value if value is None or isinstance(value, str) else value["content"]


def _to_list(ids):
    return ids.tolist() if isinstance(ids, (torch.Tensor, np.ndarray)) else ids


def _clean_up_tokenization(text):
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _set_pipeline(backend, family, config):
    """Normaliser, pre-tokeniser and decoder exactly as transformers' GPT2/T5/BertTokenizer classes set them
    (they rebuild these rather than take them from tokenizer.json)."""
    if family == "GPT2Tokenizer":
        backend.normalizer = None
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=config.get("add_prefix_space", False))
        backend.decoder = decoders.ByteLevel()
    elif family == "T5Tokenizer":  # of the file's normaliser only a SentencePiece charsmap is kept
        norm = json.loads(backend.to_str()).get("normalizer") or {}
        charsmap = [n["precompiled_charsmap"] for n in norm.get("normalizers", [norm])
                    if n.get("type") == "Precompiled"]
        backend.normalizer = normalizers.Precompiled(base64.b64decode(charsmap[0])) if charsmap else None
        metaspace = dict(replacement="▁", prepend_scheme="always", split=True)
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)])
        backend.decoder = decoders.Metaspace(**metaspace)
    elif family == "BertTokenizer":
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
            strip_accents=config.get("strip_accents"), lowercase=config.get("do_lower_case", True))
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")


class Blip2Tokenizer:
    """A `tokenizers.Tokenizer` plus the tokenizer_config.json settings, behaving like transformers 5.24's
    AutoTokenizer: for the GPT2Tokenizer / T5Tokenizer / BertTokenizer classes it sets the normaliser,
    pre-tokeniser, decoder and template exactly as those classes do; any other class uses tokenizer.json as is."""

    def __init__(self, tokenizer_object, **config):
        self.backend = tokenizer_object
        self.config = config
        self.tokenizer_class = (config.get("tokenizer_class") or "TokenizersBackend").removesuffix("Fast")
        family = self.tokenizer_class if self.tokenizer_class in FAMILIES else None
        defaults = FAMILIES.get(family, {})
        self.model_max_length = config.get("model_max_length") or config.get("max_len") or VERY_LARGE_INTEGER
        self.padding_side = config.get("padding_side", "right")
        self.truncation_side = config.get("truncation_side", "right")
        if self.padding_side not in ("left", "right") or self.truncation_side not in ("left", "right"):
            raise ValueError(f"padding_side and truncation_side must be 'left' or 'right', got "
                             f"{self.padding_side!r}, {self.truncation_side!r}")
        self.clean_up_tokenization_spaces = config.get("clean_up_tokenization_spaces", False)
        inputs = ["input_ids", "attention_mask"]
        if family == "BertTokenizer":
            inputs.insert(1, "token_type_ids")
        self.model_input_names = list(config.get("model_input_names", inputs))
        self._lock = threading.Lock()  # padding/truncation are settings of the shared backend: one call at a time

        # named special tokens, plus model-specific ones such as image_token
        raw = {name: config.get(name, defaults.get(name)) for name in SPECIAL_TOKENS}
        raw |= {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, (str, dict))}
        extras = config.get("extra_special_tokens") or config.get("additional_special_tokens")
        if extras is None and family == "T5Tokenizer":
            extras = [f"<extra_id_{i}>" for i in range(config.get("extra_ids", 100))]
        if isinstance(extras, dict):
            raw |= extras
            extras = []
        self.special_tokens = {name: _token_text(v) for name, v in raw.items()}
        self.extra_special_tokens = [_token_text(t) for t in extras or []]

        _set_pipeline(self.backend, family, config)

        # added tokens the config declares, then special tokens that are not added tokens yet (in that order)
        present = {t.content for t in self.backend.get_added_tokens_decoder().values()}
        declared = sorted((int(i), t) for i, t in (config.get("added_tokens_decoder") or {}).items())
        new = [_added_token(t, special=False) for _, t in declared if _token_text(t) not in present]
        new += [_added_token(v) for v in list(raw.values()) + list(extras or []) if v is not None]
        for token in new:
            if token.content not in present:
                present.add(token.content)
                self.backend.add_tokens([token])

        self._set_template(family)

    def _set_template(self, family):
        """The special tokens around a text: T5 appends </s>, BERT wraps in [CLS] .. [SEP]; for other classes
        an explicit add_bos_token / add_eos_token builds the template, else the file's template stays."""
        if family == "T5Tokenizer":
            template = dict(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                            special_tokens=[("</s>", self.eos_token_id)])
        elif family == "BertTokenizer":
            cls, sep = self.cls_token, self.sep_token
            template = dict(single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
                            special_tokens=[(cls, self.cls_token_id if self.cls_token_id is not None else 2),
                                            (sep, self.sep_token_id if self.sep_token_id is not None else 3)])
        elif "add_bos_token" in self.config or "add_eos_token" in self.config:
            bos = self.bos_token if self.config.get("add_bos_token") else None
            eos = self.eos_token if self.config.get("add_eos_token") else None
            single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
            pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
            template = dict(single=single, pair=pair,
                            special_tokens=[(t, self.convert_tokens_to_ids(t)) for t in {bos, eos} - {None}])
        else:
            return
        self.backend.post_processor = processors.TemplateProcessing(**template)

    @classmethod
    def from_pretrained(cls, directory):
        """Read tokenizer.json (or vocab.json + merges.txt, or vocab.txt) and tokenizer_config.json,
        special_tokens_map.json and added_tokens.json the way transformers 5.24 does."""
        def path(name):
            return os.path.join(directory, name)
        config = _read_json(path("tokenizer_config.json"), {})
        has_json = os.path.isfile(path("tokenizer.json"))
        if has_json:  # transformers ignores these when tokenizer.json exists: its template decides
            config.pop("add_bos_token", None)
            config.pop("add_eos_token", None)
        if "added_tokens_decoder" not in config:  # legacy files
            config |= _read_json(path("special_tokens_map.json"), {})
            specials = {_token_text(config.get(k)) for k in SPECIAL_TOKENS}
            added = _read_json(path("added_tokens.json"), {})
            config["added_tokens_decoder"] = {
                i: {"content": t, "special": t in specials, "normalized": t not in specials} for t, i in added.items()}
        if has_json:
            backend = Tokenizer.from_file(path("tokenizer.json"))
        elif os.path.isfile(path("vocab.json")) and os.path.isfile(path("merges.txt")):
            config.setdefault("tokenizer_class", "GPT2Tokenizer")
            backend = Tokenizer(models.BPE(vocab=path("vocab.json"), merges=path("merges.txt"), dropout=None,
                                           continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
        elif os.path.isfile(path("vocab.txt")):
            config.setdefault("tokenizer_class", "BertTokenizer")
            unk = _token_text(config.get("unk_token", "[UNK]"))
            backend = Tokenizer(models.WordPiece(vocab=path("vocab.txt"), unk_token=unk))
        elif os.path.isfile(path("spiece.model")):
            raise ValueError(f"{path('spiece.model')} is a SentencePiece model, which blip2 cannot read: it needs "
                             "tokenizer.json (save the tokenizer once with transformers' save_pretrained to write it)")
        else:
            raise FileNotFoundError(
                f"no tokenizer in {directory}: expected tokenizer.json, vocab.json + merges.txt, or vocab.txt")
        if not has_json and config["tokenizer_class"].removesuffix("Fast") not in ("GPT2Tokenizer", "BertTokenizer"):
            raise ValueError(f"tokenizer_class {config['tokenizer_class']} needs tokenizer.json in {directory}")
        return cls(backend, **config)

    def save_pretrained(self, directory):
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (transformers can load them)."""
        os.makedirs(directory, exist_ok=True)
        with self._lock:
            self.backend.no_padding()
            self.backend.no_truncation()
            self.backend.save(os.path.join(directory, "tokenizer.json"))
        named = {k: v for k, v in self.special_tokens.items() if v is not None}
        config = {k: v for k, v in self.config.items() if k not in _NOT_SAVED and not k.endswith("_token")}
        config |= named | {
            "tokenizer_class": self.tokenizer_class, "model_max_length": self.model_max_length,
            "padding_side": self.padding_side, "truncation_side": self.truncation_side,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "extra_special_tokens": self.extra_special_tokens,
        }
        _write_json(os.path.join(directory, "tokenizer_config.json"), config)
        _write_json(os.path.join(directory, "special_tokens_map.json"),
                    {k: v for k, v in named.items() if k in SPECIAL_TOKENS})

    def __getattr__(self, name):  # bos_token, bos_token_id, image_token, ...
        key = name.removesuffix("_id")
        tokens = self.__dict__.get("special_tokens", {})
        if key not in tokens:
            raise AttributeError(f"{type(self).__name__} has no attribute {name}")
        token = tokens[key]
        return token if key == name or token is None else self.convert_tokens_to_ids(token)

    def __len__(self):
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self):
        return self.backend.get_vocab_size(with_added_tokens=False)

    def get_vocab(self):
        return self.backend.get_vocab(with_added_tokens=True)

    @property
    def all_special_tokens(self):
        named = [t for k, t in self.special_tokens.items() if t is not None]
        return list(dict.fromkeys(named + self.extra_special_tokens))

    @property
    def all_special_ids(self):
        return self.convert_tokens_to_ids(self.all_special_tokens)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            index = self.backend.token_to_id(tokens)
            return self.unk_token_id if index is None else index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def add_tokens(self, tokens, special_tokens=False):
        """Add tokens (str or AddedToken) not yet in the vocabulary; returns how many were added."""
        tokens = tokens if isinstance(tokens, (list, tuple)) else [tokens]
        return self.backend.add_special_tokens(tokens) if special_tokens else self.backend.add_tokens(tokens)

    def __call__(self, text, add_special_tokens=True, padding=False, truncation=None, max_length=None,
                 pad_to_multiple_of=None, padding_side=None, return_tensors=None, return_token_type_ids=None,
                 return_attention_mask=None):
        batched = isinstance(text, (list, tuple))
        texts = list(text) if batched else [text]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"text must be a str or a non-empty list of str, got {type(text).__name__}"
                             + (f" of {sorted({type(t).__name__ for t in texts})}" if batched and texts else ""))
        if max_length is not None and padding is False and truncation is None:
            truncation = True  # a bare max_length truncates, as in transformers
        if padding in (True, False, None):
            padding = "longest" if padding else "do_not_pad"
        if truncation in (True, False, None):
            truncation = "longest_first" if truncation else "do_not_truncate"
        if padding not in ("longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if truncation not in ("longest_first", "only_first", "only_second", "do_not_truncate"):
            raise ValueError(f"truncation must be True, False, 'longest_first', 'only_first' or 'only_second', "
                             f"got {truncation!r}")
        if max_length is None:  # fall back on model_max_length, unless it is "unlimited"
            unlimited = self.model_max_length > LARGE_INTEGER
            if padding == "max_length" and unlimited:
                padding = "do_not_pad"
            if truncation != "do_not_truncate" and unlimited:
                truncation = "do_not_truncate"
            if padding == "max_length" or truncation != "do_not_truncate":
                max_length = self.model_max_length
        if padding != "do_not_pad" and self.pad_token is None:
            raise ValueError("padding was asked for but the tokenizer has no pad_token")
        if (padding_side or self.padding_side) not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        with self._lock:
            if truncation == "do_not_truncate":
                self.backend.no_truncation()
            else:
                self.backend.enable_truncation(max_length, stride=0, strategy=truncation,
                                               direction=self.truncation_side)
            if padding == "do_not_pad":
                self.backend.no_padding()
            else:
                self.backend.enable_padding(
                    direction=padding_side or self.padding_side, pad_id=self.pad_token_id, pad_type_id=0,
                    pad_token=self.pad_token, length=max_length if padding == "max_length" else None,
                    pad_to_multiple_of=pad_to_multiple_of)
            encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        out = BatchFeature(input_ids=[e.ids for e in encodings])
        if return_token_type_ids if return_token_type_ids is not None else "token_type_ids" in self.model_input_names:
            out["token_type_ids"] = [e.type_ids for e in encodings]
        if return_attention_mask if return_attention_mask is not None else "attention_mask" in self.model_input_names:
            out["attention_mask"] = [e.attention_mask for e in encodings]
        if not batched and return_tensors is None:
            out = BatchFeature({k: v[0] for k, v in out.items()})
        return out.convert(return_tensors)

    def encode(self, text, add_special_tokens=True):
        return self(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        """ids -> text; a batch of sequences gives a list of texts."""
        ids = _to_list(token_ids)
        ids = [ids] if isinstance(ids, int) else ids
        if ids and isinstance(ids[0], (list, tuple)):
            return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in ids]
        with self._lock:
            text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = clean_up_tokenization_spaces
        clean = self.clean_up_tokenization_spaces if clean is None else clean
        # transformers 5.24 skips the clean-up for BPE models: it would eat real spaces before punctuation
        if clean and (type(self.backend.model).__name__ != "BPE"
                      or self.config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")):
            text = _clean_up_tokenization(text)
        return text

    def batch_decode(self, sequences, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        sequences = _to_list(sequences)
        if len(sequences) and isinstance(sequences[0], int):  # one sequence
            sequences = [sequences]
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in sequences]


class TextStreamDecoder:
    """Incremental detokenizer: put(new_ids) returns only the newly completed text, holding back a tail
    that is an incomplete UTF-8 character (decoded as U+FFFD) until later tokens complete it."""

    def __init__(self, tokenizer, skip_special_tokens=True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids, self.emitted = [], 0

    def put(self, token_ids):
        self.ids += torch.as_tensor(token_ids).reshape(-1).tolist()
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new

    def end(self):
        """Flush what is left (an incomplete character stays U+FFFD) and start over."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)[self.emitted:]
        self.ids, self.emitted = [], 0
        return text


# ----------------------------------------------------------------------------------------------------
# processor


class Blip2Processor:
    """Images -> pixel_values and text -> input_ids / attention_mask, with num_query_tokens "<image>"
    placeholders prepended to every text row when images come with the text (transformers 5.24)."""

    def __init__(self, image_processor, tokenizer, num_query_tokens=None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.num_query_tokens = num_query_tokens
        if hasattr(tokenizer, "image_token"):
            self.image_token = tokenizer.image_token
        else:  # like the reference: a special added token taking the next free id (or its existing id)
            self.image_token = "<image>"
            tokenizer.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)

    @classmethod
    def from_pretrained(cls, directory, **hub_kwargs):
        """A local directory or a hub id (revision=, cache_dir=, token=, local_files_only=): only the processor
        and tokenizer files are fetched."""
        from .io.hub import PROCESSOR_FILES, resolve_checkpoint

        directory = resolve_checkpoint(directory, allow_patterns=PROCESSOR_FILES + ["config.json"], **hub_kwargs)
        config = _read_json(os.path.join(directory, "processor_config.json"), {})
        if "image_processor" in config:  # transformers 5.x nests the image processor config here
            image_processor = BlipImageProcessor.from_dict(config["image_processor"])
        else:
            image_processor = BlipImageProcessor.from_pretrained(directory)
        return cls(image_processor, Blip2Tokenizer.from_pretrained(directory), config.get("num_query_tokens"))

    def save_pretrained(self, directory):
        """Hub layout: preprocessor_config.json, processor_config.json and the tokenizer files."""
        os.makedirs(directory, exist_ok=True)
        _write_json(os.path.join(directory, "preprocessor_config.json"),
                    self.image_processor.to_dict() | {"processor_class": "Blip2Processor"})
        _write_json(os.path.join(directory, "processor_config.json"),
                    {"num_query_tokens": self.num_query_tokens, "processor_class": "Blip2Processor"})
        self.tokenizer.config["processor_class"] = "Blip2Processor"
        self.tokenizer.save_pretrained(directory)

    def __call__(self, images=None, text=None, return_tensors=None, **kwargs):
        if images is None and text is None:
            raise ValueError("You have to specify either images or text.")
        kwargs |= kwargs.pop("text_kwargs", {}) | kwargs.pop("images_kwargs", {})
        image_kwargs = {k: kwargs.pop(k) for k in BlipImageProcessor.KEYS if k in kwargs}
        text_kwargs = {"return_token_type_ids": False, **kwargs}
        if text_kwargs.get("max_length") is not None:  # the placeholders are not counted by the tokenizer
            text_kwargs["max_length"] -= self.num_query_tokens or 0
        out = BatchFeature()
        if text is not None:
            if isinstance(text, str):
                text = [text]
            elif not isinstance(text, list) or not text or not all(isinstance(t, str) for t in text):
                raise ValueError("Invalid input text: expected a string or a non-empty list of strings, "
                                 f"got {type(text).__name__}")
            out |= self.tokenizer(text, **text_kwargs)
            if images is not None and self.num_query_tokens is not None:
                placeholder = self.tokenizer(self.image_token * self.num_query_tokens, **text_kwargs | {
                    "add_special_tokens": False, "padding": False, "truncation": False})
                for key in out:
                    out[key] = [placeholder[key] + row for row in out[key]]
        if images is not None:
            out |= self.image_processor(images, **image_kwargs)
        return out.convert(return_tensors)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)
