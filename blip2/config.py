"""Configs as dataclasses, read from and written to the Hugging Face `config.json` layout.

Defaults are the reference's (transformers 5.24): ViT-g vision tower, BERT-base Q-Former, OPT or T5 text
model. Hub configs are sparse (only non-default keys), so every absent field takes the default here.
Keys we do not use are kept in `extra` and written back unchanged.
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, TypeVar


class ConfigError(ValueError):
    pass


C = TypeVar("C", bound="_Config")


@dataclass
class _Config:
    extra: dict = field(default_factory=dict, repr=False)  # unknown keys, preserved on save

    model_type = ""

    @classmethod
    def from_dict(cls: type[C], d: dict, **overrides: Any) -> C:
        d = {**d, **overrides}
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k != "model_type"}
        try:
            cfg = cls(**known, extra=extra)
        except TypeError as e:
            raise ConfigError(f"{cls.__name__}: {e}") from None
        cfg._post_init(d)
        return cfg

    def _post_init(self, raw: dict):
        pass

    def to_dict(self) -> dict:
        out = {**self.extra, "model_type": self.model_type}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, _Config) else v
        return dict(sorted(out.items()))

    def __getattr__(self, name):  # unknown keys (e.g. `projection_dim`) stay readable
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


@dataclass
class Blip2VisionConfig(_Config):
    model_type = "blip_2_vision_model"
    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 1e-10
    qkv_bias: bool = True


@dataclass
class Blip2QFormerConfig(_Config):
    model_type = "blip_2_qformer"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    use_qformer_text_input: bool = False


@dataclass
class OPTConfig(_Config):
    model_type = "opt"
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    _remove_final_layer_norm: bool = False
    word_embed_proj_dim: int | None = None
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    dropout: float = 0.1
    attention_dropout: float = 0.0
    layerdrop: float = 0.0
    init_std: float = 0.02
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int | list = 2
    tie_word_embeddings: bool = True
    use_cache: bool = True

    is_encoder_decoder = False

    def _post_init(self, raw):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size


@dataclass
class T5Config(_Config):
    model_type = "t5"
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"
    dense_act_fn: str | None = None
    is_gated_act: bool | None = None
    pad_token_id: int = 0
    eos_token_id: int | list = 1
    bos_token_id: int | None = None
    decoder_start_token_id: int = 0
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None
    classifier_dropout: float = 0.0
    use_cache: bool = True

    is_encoder_decoder = True

    def _post_init(self, raw):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        act = self.feed_forward_proj.split("-")
        if len(act) > 2 or (len(act) == 2 and act[0] != "gated"):
            raise ConfigError(f"T5 feed_forward_proj {self.feed_forward_proj!r} is not 'ACT' or 'gated-ACT'")
        self.is_gated_act = act[0] == "gated"
        if "dense_act_fn" not in raw:  # an explicit key wins (BLIP-2 Flan-T5 sets exact "gelu")
            self.dense_act_fn = "gelu_new" if self.feed_forward_proj == "gated-gelu" else act[-1]
        if self.scale_decoder_outputs is None:  # T5 v1.0 scales by d_model**-0.5, v1.1 / Flan-T5 do not
            self.scale_decoder_outputs = raw.get("tie_word_embeddings", True) is not False

    @property
    def hidden_size(self) -> int:
        return self.d_model


TEXT_CONFIGS = {"opt": OPTConfig, "t5": T5Config}


@dataclass
class Blip2Config(_Config):
    model_type = "blip-2"
    vision_config: Blip2VisionConfig = field(default_factory=Blip2VisionConfig)
    qformer_config: Blip2QFormerConfig = field(default_factory=Blip2QFormerConfig)
    text_config: Any = field(default_factory=OPTConfig)
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256
    image_token_index: int | None = None
    initializer_factor: float = 1.0
    initializer_range: float = 0.02

    @classmethod
    def from_dict(cls, d: dict, **overrides: Any) -> "Blip2Config":
        d = {**d, **overrides}
        if d.get("model_type", "blip-2") != "blip-2":
            raise ConfigError(f"config model_type is {d['model_type']!r}, expected 'blip-2'")
        sub = {}
        for name, sub_cls in (("vision_config", Blip2VisionConfig), ("qformer_config", Blip2QFormerConfig)):
            v = d.get(name) or {}
            sub[name] = v if isinstance(v, _Config) else sub_cls.from_dict(v)
        text = d.get("text_config") or {"model_type": "opt"}
        if not isinstance(text, _Config):
            kind = text.get("model_type", "opt")
            if kind not in TEXT_CONFIGS:
                raise ConfigError(
                    f"text_config.model_type {kind!r} is not supported (supported: {', '.join(TEXT_CONFIGS)})")
            text = TEXT_CONFIGS[kind].from_dict(text)
        sub["text_config"] = text
        # derived in the reference's post-init: recomputed here, never read from the file
        d = {k: v for k, v in d.items() if k not in ("use_decoder_only_language_model", "is_encoder_decoder")}
        return super().from_dict({**d, **sub})

    def _post_init(self, raw):
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        self.extra.pop("torch_dtype", None)
        if "dtype" in self.extra and not isinstance(self.extra["dtype"], str):
            self.extra.pop("dtype")

    @property
    def use_decoder_only_language_model(self) -> bool:
        return not self.text_config.is_encoder_decoder

    @property
    def is_encoder_decoder(self) -> bool:
        return self.text_config.is_encoder_decoder

    @property
    def image_token_id(self) -> int | None:
        return self.image_token_index

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["use_decoder_only_language_model"] = self.use_decoder_only_language_model
        if self.is_encoder_decoder:
            d["is_encoder_decoder"] = True
        return dict(sorted(d.items()))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "Blip2Config":
        return cls.from_dict(read_json(os.path.join(path, "config.json")), **overrides)

    def save_pretrained(self, path: str | os.PathLike, architecture: str | None = None,
                        dtype: str = "float32") -> None:
        os.makedirs(path, exist_ok=True)
        d = self.to_dict()
        if architecture:
            d["architectures"] = [architecture]
        d["dtype"] = dtype
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(d, f, indent=2, sort_keys=True)
            f.write("\n")


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(d).__name__}")
    return d
