"""Blip2Tokenizer: a `tokenizers.Tokenizer` that behaves like transformers' AutoTokenizer (5.24) on the same files
(OPT/GPT-2 byte-level BPE, T5 Unigram, BERT WordPiece); TextStreamDecoder: incremental detokenizing for streaming."""

import base64
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .features import BatchFeature, dump_json, load_json
from .io.hub import PROCESSOR_FILES, resolve_checkpoint

VERY_LARGE_INTEGER = int(1e30)  # model_max_length of a tokenizer without a limit
LARGE_INTEGER = int(1e20)
TokenIds = list[int] | torch.Tensor | np.ndarray  # one sequence of token ids

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
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


def _byte_level(backend, config):
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=config.get("add_prefix_space", False))
    backend.decoder = decoders.ByteLevel()


def _unigram(backend, config):  # of the file's normaliser only a SentencePiece charsmap is kept
    norm = json.loads(backend.to_str()).get("normalizer") or {}
    charsmap = [n["precompiled_charsmap"] for n in norm.get("normalizers", [norm]) if n.get("type") == "Precompiled"]
    backend.normalizer = normalizers.Precompiled(base64.b64decode(charsmap[0])) if charsmap else None
    metaspace = dict(replacement="▁", prepend_scheme="always", split=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Metaspace(**metaspace)])
    backend.decoder = decoders.Metaspace(**metaspace)


def _word_piece(backend, config):
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"), lowercase=config.get("do_lower_case", True))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")


def _t5_template(tok):  # T5 appends </s>
    return dict(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", tok.eos_token_id)])


def _bert_template(tok):  # BERT wraps in [CLS] .. [SEP]
    cls, sep = tok.cls_token, tok.sep_token
    return dict(single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
                special_tokens=[(cls, tok.cls_token_id if tok.cls_token_id is not None else 2),
                                (sep, tok.sep_token_id if tok.sep_token_id is not None else 3)])


def _bos_eos_template(tok):
    """An explicit add_bos_token / add_eos_token builds the template; else the file's template stays (None)."""
    if "add_bos_token" not in tok.config and "add_eos_token" not in tok.config:
        return None
    bos = tok.bos_token if tok.config.get("add_bos_token") else None
    eos = tok.eos_token if tok.config.get("add_eos_token") else None
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    specials = [(t, tok.convert_tokens_to_ids(t)) for t in {bos, eos} - {None}]
    return dict(single=single, pair=pair, special_tokens=specials)


@dataclass(frozen=True)
class Family:
    """What one transformers tokenizer class sets: its default special tokens, the normaliser / pre-tokeniser /
    decoder it rebuilds rather than take from tokenizer.json, the template around a text, its model inputs and its
    default extra special tokens (from the config)."""

    defaults: dict = field(default_factory=dict)
    pipeline: Callable[[Tokenizer, dict], None] = lambda backend, config: None
    template: Callable[["Blip2Tokenizer"], dict | None] = _bos_eos_template
    inputs: tuple = ("input_ids", "attention_mask")
    extras: Callable[[dict], list | None] = lambda config: None


# the transformers 5.24 classes the BLIP-2 checkpoints name; any other class uses tokenizer.json as is (OTHER)
FAMILIES = {
    "GPT2Tokenizer": Family({"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
                            _byte_level),
    "T5Tokenizer": Family({"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}, _unigram, _t5_template,
                          extras=lambda config: [f"<extra_id_{i}>" for i in range(config.get("extra_ids", 100))]),
    "BertTokenizer": Family({"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                             "mask_token": "[MASK]"}, _word_piece, _bert_template,
                            ("input_ids", "token_type_ids", "attention_mask")),
}
OTHER = Family()


class Blip2Tokenizer:
    """A `tokenizers.Tokenizer` plus the tokenizer_config.json settings, behaving like transformers 5.24's
    AutoTokenizer: for the GPT2Tokenizer / T5Tokenizer / BertTokenizer classes it sets the normaliser,
    pre-tokeniser, decoder and template exactly as those classes do; any other class uses tokenizer.json as is."""

    def __init__(self, tokenizer_object: Tokenizer, **config: Any):
        self.backend = tokenizer_object
        self.config = config
        self.tokenizer_class = (config.get("tokenizer_class") or "TokenizersBackend").removesuffix("Fast")
        family = FAMILIES.get(self.tokenizer_class, OTHER)
        self.model_max_length = config.get("model_max_length") or config.get("max_len") or VERY_LARGE_INTEGER
        self.padding_side = config.get("padding_side", "right")
        self.truncation_side = config.get("truncation_side", "right")
        if self.padding_side not in ("left", "right") or self.truncation_side not in ("left", "right"):
            raise ValueError(f"padding_side and truncation_side must be 'left' or 'right', got "
                             f"{self.padding_side!r}, {self.truncation_side!r}")
        self.clean_up_tokenization_spaces = config.get("clean_up_tokenization_spaces", False)
        self.model_input_names = list(config.get("model_input_names", family.inputs))
        self._lock = threading.Lock()  # padding/truncation are settings of the shared backend: one call at a time

        # named special tokens, plus model-specific ones such as image_token
        raw = {name: config.get(name, family.defaults.get(name)) for name in SPECIAL_TOKENS}
        raw |= {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, (str, dict))}
        extras = config.get("extra_special_tokens") or config.get("additional_special_tokens")
        if extras is None:
            extras = family.extras(config)
        if isinstance(extras, dict):
            raw |= extras
            extras = []
        self.special_tokens = {name: _token_text(v) for name, v in raw.items()}
        self.extra_special_tokens = [_token_text(t) for t in extras or []]

        family.pipeline(self.backend, config)

        # added tokens the config declares, then special tokens that are not added tokens yet (in that order)
        present = {t.content for t in self.backend.get_added_tokens_decoder().values()}
        declared = sorted((int(i), t) for i, t in (config.get("added_tokens_decoder") or {}).items())
        new = [_added_token(t, special=False) for _, t in declared if _token_text(t) not in present]
        new += [_added_token(v) for v in list(raw.values()) + list(extras or []) if v is not None]
        for token in new:
            if token.content not in present:
                present.add(token.content)
                self.backend.add_tokens([token])

        template = family.template(self)
        if template is not None:
            self.backend.post_processor = processors.TemplateProcessing(**template)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **hub_kwargs: Any) -> "Blip2Tokenizer":
        """Read tokenizer.json (or vocab.json + merges.txt, or vocab.txt) and tokenizer_config.json,
        special_tokens_map.json and added_tokens.json the way transformers 5.24 does, from a directory or a hub id
        (revision=, cache_dir=, token=, local_files_only=; only the tokenizer files are fetched)."""
        directory = resolve_checkpoint(directory, allow_patterns=PROCESSOR_FILES, **hub_kwargs)

        def path(name):
            return os.path.join(directory, name)
        config = load_json(path("tokenizer_config.json"), {})
        has_json = os.path.isfile(path("tokenizer.json"))
        if has_json:  # transformers ignores these when tokenizer.json exists: its template decides
            config.pop("add_bos_token", None)
            config.pop("add_eos_token", None)
        if "added_tokens_decoder" not in config:  # legacy files
            config |= load_json(path("special_tokens_map.json"), {})
            specials = {_token_text(config.get(k)) for k in SPECIAL_TOKENS}
            added = load_json(path("added_tokens.json"), {})
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

    def save_pretrained(self, directory: str | os.PathLike) -> None:
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
        dump_json(os.path.join(directory, "tokenizer_config.json"), config)
        dump_json(os.path.join(directory, "special_tokens_map.json"),
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
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=False)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    @property
    def all_special_tokens(self) -> list[str]:
        named = [t for k, t in self.special_tokens.items() if t is not None]
        return list(dict.fromkeys(named + self.extra_special_tokens))

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            index = self.backend.token_to_id(tokens)
            return self.unk_token_id if index is None else index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def add_tokens(self, tokens: str | AddedToken | list[str | AddedToken], special_tokens: bool = False) -> int:
        """Add tokens (str or AddedToken) not yet in the vocabulary; returns how many were added."""
        tokens = tokens if isinstance(tokens, (list, tuple)) else [tokens]
        return self.backend.add_special_tokens(tokens) if special_tokens else self.backend.add_tokens(tokens)

    def __call__(self, text: str | list[str], add_special_tokens: bool = True, padding: bool | str = False,
                 truncation: bool | str | None = None, max_length: int | None = None,
                 pad_to_multiple_of: int | None = None, padding_side: str | None = None,
                 return_tensors: str | None = None, return_token_type_ids: bool | None = None,
                 return_attention_mask: bool | None = None) -> BatchFeature:
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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self(text, add_special_tokens=add_special_tokens)["input_ids"]

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of user text with the template's special tokens around it; special-token strings inside the
        text stay plain text, so a literal "<image>" cannot change the image-token count nor "</s>" end a prompt."""
        with self._lock:
            self.backend.no_truncation()
            self.backend.no_padding()
            self.backend.encode_special_tokens = True
            try:
                return self.backend.encode(text).ids
            finally:
                self.backend.encode_special_tokens = False

    def decode(self, token_ids: TokenIds, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
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

    def batch_decode(self, sequences: TokenIds | list[TokenIds], skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        sequences = _to_list(sequences)
        if len(sequences) and isinstance(sequences[0], int):  # one sequence
            sequences = [sequences]
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in sequences]


class TextStreamDecoder:
    """Incremental detokenizer: put(new_ids) returns only the newly completed text, holding back a tail
    that is an incomplete UTF-8 character (decoded as U+FFFD) until later tokens complete it."""

    def __init__(self, tokenizer: Blip2Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids, self.emitted = [], 0

    def put(self, token_ids: TokenIds) -> str:
        self.ids += torch.as_tensor(token_ids).reshape(-1).tolist()
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new

    def end(self) -> str:
        """Flush what is left (an incomplete character stays U+FFFD) and start over."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)[self.emitted:]
        self.ids, self.emitted = [], 0
        return text
