"""Configs as dataclasses, read from and written to the Hugging Face `config.json` layout.

Defaults are the reference's (transformers 5.24): ViT-g vision tower, BERT-base Q-Former, OPT or T5 text
model. Hub configs are sparse (only non-default keys), so every absent field takes the default here.
Keys we do not use are kept in `extra` and written back unchanged.
"""

import json
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar


class ConfigError(ValueError):
    pass


C = TypeVar("C", bound="_Config")
COMMON = ("architectures", "output_hidden_states", "output_attentions", "return_dict", "dtype", "_name_or_path")


@dataclass(init=False)
class _Config:
    """Keyword constructor as the reference's: known keys set fields, unknown keys are kept (readable as attributes,
    written back by to_dict); `torch_dtype` is read as `dtype`. The settings every reference config carries and the
    models honour come first."""

    extra: dict = field(default_factory=dict, repr=False)  # unknown keys, preserved on save
    architectures: list | None = None
    output_hidden_states: bool = False
    output_attentions: bool = False
    return_dict: bool = True
    dtype: str | None = None
    _name_or_path: str = ""

    model_type = ""
    base_config_key = ""  # where this config sits inside a Blip2Config
    is_encoder_decoder = False
    sub_configs: ClassVar[dict] = {}

    def __init__(self, *args: Any, **kwargs: Any):
        own = [f.name for f in fields(self) if f.name != "extra" and f.name not in COMMON]
        if len(args) > len(own):
            raise TypeError(f"{type(self).__name__} takes at most {len(own)} positional arguments")
        for name, value in zip(own, args):
            if name in kwargs:
                raise TypeError(f"{type(self).__name__} got {name!r} twice")
            kwargs[name] = value
        raw = dict(kwargs)
        if "torch_dtype" in kwargs:
            dtype = kwargs.pop("torch_dtype")
            kwargs.setdefault("dtype", dtype)
        kind = kwargs.pop("model_type", self.model_type)
        if kind != self.model_type:
            raise ConfigError(f"{type(self).__name__} needs model_type {self.model_type!r}, got {kind!r}")
        attn = kwargs.pop("attn_implementation", None)
        for derived in ("is_encoder_decoder", "use_decoder_only_language_model", "transformers_version"):
            kwargs.pop(derived, None)  # recomputed here, never read from a file
        extra = dict(kwargs.pop("extra", None) or {})
        for f in fields(self):
            if f.name == "extra":
                continue
            default = f.default if f.default is not MISSING else f.default_factory()
            object.__setattr__(self, f.name, kwargs.pop(f.name, default))
        object.__setattr__(self, "extra", {**extra, **kwargs})
        if self.dtype is not None and not isinstance(self.dtype, str):  # a torch.dtype
            self.dtype = str(self.dtype).removeprefix("torch.")
        object.__setattr__(self, "_attn_implementation", attn)
        self._post_init(raw)

    @classmethod
    def from_dict(cls: type[C], d: dict, **overrides: Any) -> C:
        return cls(**{**d, **overrides})

    def _post_init(self, raw: dict):
        pass

    @classmethod
    def from_pretrained(cls: type[C], path: str | os.PathLike, **overrides: Any) -> C:
        """config.json of a directory; a sub-config reads its part of a full Blip2Config directory."""
        d = read_json(os.path.join(path, "config.json"))
        if cls.base_config_key and d.get("model_type") == "blip-2":
            d = d.get(cls.base_config_key) or {}
        return cls.from_dict(d, **overrides)

    @property
    def name_or_path(self) -> str:
        return self._name_or_path

    def to_dict(self) -> dict:
        out = {**self.extra, "model_type": self.model_type, "is_encoder_decoder": self.is_encoder_decoder}
        for f in fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, _Config) else v
        return dict(sorted(out.items()))

    def to_diff_dict(self) -> dict:
        """to_dict without the common settings at their defaults (what save_pretrained writes)."""
        defaults = {f.name: f.default for f in fields(_Config) if f.name in COMMON}
        defaults["is_encoder_decoder"] = False
        out = {}
        for k, v in self.to_dict().items():
            if k in defaults and v == defaults[k] and not (k == "dtype" and self.model_type == "blip-2"):
                continue
            sub = getattr(self, k, None) if k.endswith("_config") else None
            out[k] = sub.to_diff_dict() if isinstance(sub, _Config) else v
        return out

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_diff_dict() if use_diff else self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike, use_diff: bool = True) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string(use_diff))

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> "_Config":
        return self

    def __setattr__(self, name, value):  # a new public attribute is a kept key, as the reference's
        if name.startswith("_") or name in self.__dataclass_fields__ or hasattr(type(self), name):
            object.__setattr__(self, name, value)
        else:
            self.__dict__.setdefault("extra", {})[name] = value

    def __getattr__(self, name):  # unknown keys (e.g. `projection_dim`) stay readable
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


@dataclass(init=False)
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


@dataclass(init=False)
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


@dataclass(init=False)
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


@dataclass(init=False)
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
Blip2VisionConfig.base_config_key = "vision_config"
Blip2QFormerConfig.base_config_key = "qformer_config"


def text_config_from(value: "dict | _Config | None") -> OPTConfig | T5Config:
    """A language-model config from a dict (by its model_type, OPT by default) or a config object."""
    if isinstance(value, _Config):
        return value
    value = value or {"model_type": "opt"}
    kind = value.get("model_type", "opt")
    if kind not in TEXT_CONFIGS:
        raise ConfigError(f"text_config.model_type {kind!r} is not supported (supported: {', '.join(TEXT_CONFIGS)})")
    return TEXT_CONFIGS[kind].from_dict(value)


@dataclass(init=False)
class Blip2Config(_Config):
    """vision_config / qformer_config / text_config take dicts or config objects (None: the defaults, an OPT
    text model)."""

    model_type = "blip-2"
    sub_configs = {"vision_config": Blip2VisionConfig, "qformer_config": Blip2QFormerConfig,
                   "text_config": OPTConfig}  # text_config: OPTConfig or T5Config by its model_type
    vision_config: Blip2VisionConfig | None = None
    qformer_config: Blip2QFormerConfig | None = None
    text_config: OPTConfig | T5Config | None = None
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256
    image_token_index: int | None = None
    initializer_factor: float = 1.0
    initializer_range: float = 0.02

    def _post_init(self, raw):
        if "image_token_id" in self.extra:  # the reference's alias
            self.image_token_index = self.extra.pop("image_token_id")
        for name, sub_cls in (("vision_config", Blip2VisionConfig), ("qformer_config", Blip2QFormerConfig)):
            v = getattr(self, name)
            if not isinstance(v, _Config):
                object.__setattr__(self, name, sub_cls.from_dict(v or {}))
        object.__setattr__(self, "text_config", text_config_from(self.text_config))
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size

    @classmethod
    def from_vision_qformer_text_configs(cls, vision_config: Blip2VisionConfig, qformer_config: Blip2QFormerConfig,
                                         text_config: OPTConfig | T5Config | None = None,
                                         **kwargs: Any) -> "Blip2Config":
        return cls(vision_config=vision_config, qformer_config=qformer_config, text_config=text_config, **kwargs)

    @property
    def use_decoder_only_language_model(self) -> bool:
        return not self.text_config.is_encoder_decoder

    @property
    def is_encoder_decoder(self) -> bool:
        return self.text_config.is_encoder_decoder

    @property
    def image_token_id(self) -> int | None:
        return self.image_token_index

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> OPTConfig | T5Config:
        return self.text_config

    def to_dict(self) -> dict:
        return dict(sorted({**super().to_dict(),
                            "use_decoder_only_language_model": self.use_decoder_only_language_model}.items()))

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
