"""The BLIP-2 models: the reference's public classes with its argument and output names.

Data flow: pixels -> vision (B, 1+N, D_v) -> Q-Former queries (B, Q, D_q) -> language_projection
(B, Q, D_t) -> language-model input embeddings at the image-token positions (or in front of the text for
checkpoints without `image_token_index`). Retrieval: ITM head on the joint [queries; text] pass, or ITC
cosine between projected query outputs and the projected text [CLS].
"""

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import Blip2Config, OPTConfig, T5Config
from .generation import GenerationConfig, generate
from .io.hub import MODEL_FILES, resolve_checkpoint
from .ops import BaseModelOutputWithPooling, BaseModelOutputWithPoolingAndCrossAttentions, ModelOutput, resolve
from .opt import OPTForCausalLM, causal_lm_loss
from .pretrained import PretrainedMixin
from .qformer import Blip2QFormerModel, Blip2TextEmbeddings
from .t5 import T5ForConditionalGeneration
from .vision import Blip2VisionModel

QFormerOutput = BaseModelOutputWithPoolingAndCrossAttentions


@dataclass
class Blip2ForConditionalGenerationModelOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor = None
    vision_outputs: object = None
    qformer_outputs: object = None
    language_model_outputs: object = None


@dataclass
class BaseModelOutputWithVisionQformerOutputs(ModelOutput):
    last_hidden_state: torch.Tensor = None
    pooler_output: torch.Tensor = None  # the projected query outputs (B, Q, D_t)
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    vision_outputs: object = None
    qformer_outputs: object = None


@dataclass
class Blip2ImageTextMatchingModelOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor = None
    logits_per_text: torch.Tensor = None
    text_embeds: torch.Tensor = None
    image_embeds: torch.Tensor = None
    text_model_output: object = None
    vision_model_output: object = None


@dataclass
class Blip2TextModelOutput(ModelOutput):
    text_embeds: torch.Tensor = None
    last_hidden_state: torch.Tensor = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class Blip2VisionModelOutput(ModelOutput):
    image_embeds: torch.Tensor = None
    last_hidden_state: torch.Tensor = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


def language_model_for(text_config: OPTConfig | T5Config) -> OPTForCausalLM | T5ForConditionalGeneration:
    return (OPTForCausalLM if text_config.model_type == "opt" else T5ForConditionalGeneration)(text_config)


class Blip2PreTrainedModel(PretrainedMixin, nn.Module):
    config_class = Blip2Config
    _keep_in_fp32_modules = ("query_tokens", "qformer")  # under fp16 only, as the reference

    def tie_weights(self) -> None:
        if hasattr(self, "language_model") and hasattr(self.language_model, "tie_weights"):
            self.language_model.tie_weights()

    def query_features(self, image_embeds: Tensor, output_attentions: bool | None = None,
                       output_hidden_states: bool | None = None) -> QFormerOutput:
        """Q-Former pass of the learned queries over image patches (B, 1+N, D_v) -> its output."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(queries, encoder_hidden_states=image_embeds, output_attentions=output_attentions,
                            output_hidden_states=output_hidden_states)


class _Blip2WithLanguageModel(Blip2PreTrainedModel):
    """Shared by Blip2Model and Blip2ForConditionalGeneration (same weights and keys)."""

    def __init__(self, config: Blip2Config):
        super().__init__()
        self.config = config
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel(config.qformer_config)
        self.language_projection = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
        self.language_model = language_model_for(config.text_config)
        self.init_switches()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        lm = self.language_model
        if isinstance(lm, T5ForConditionalGeneration):
            lm.shared = lm.encoder._embed[0] = lm.decoder._embed[0] = value
        else:
            lm.model.decoder.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.language_model.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.language_model.lm_head = value

    def image_features(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False,
                       output_attentions: bool | None = None,
                       output_hidden_states: bool | None = None) -> BaseModelOutputWithVisionQformerOutputs:
        """pixels -> BaseModelOutputWithVisionQformerOutputs whose pooler_output holds the language-model-ready
        query embeddings (B, Q, D_t)."""
        vision = self.vision_model(pixel_values, interpolate_pos_encoding, output_attentions, output_hidden_states)
        image_embeds = vision.last_hidden_state  # (B, 1+N, D_v)
        qformer = self.query_features(image_embeds, output_attentions, output_hidden_states)
        q = qformer.last_hidden_state.to(image_embeds.dtype)  # the fp32 Q-Former back to the vision dtype
        return BaseModelOutputWithVisionQformerOutputs(
            last_hidden_state=image_embeds, pooler_output=self.language_projection(q),
            hidden_states=vision.hidden_states, attentions=vision.attentions,
            vision_outputs=vision, qformer_outputs=qformer)

    def merge_image_tokens(self, query_embeds: Tensor, input_ids: Tensor | None, attention_mask: Tensor | None,
                           inputs_embeds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Put the projected queries (B_i, Q, D) into the text embeddings (B, T, D) as the reference does: in
        order, into whatever image-token positions the ids hold (a row with fewer than Q image tokens takes the
        next queries, a text without image tokens gets no image); more image tokens than B_i x Q is an error. One
        image (B_i = 1) with Q image tokens in each of several rows serves every row. Checkpoints without
        image_token_index (older ones) get the queries in front of the text. Returns (embeds, attention_mask)."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("input_ids (or inputs_embeds) are required")
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, T, D)
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        query_embeds = query_embeds.to(inputs_embeds.device, inputs_embeds.dtype)
        b, q = query_embeds.shape[:2]
        rows = inputs_embeds.shape[0]
        token = self.config.image_token_index
        if token is None:  # legacy layout: [queries; text]
            if b == 1 and rows > 1:
                query_embeds = query_embeds.expand(rows, -1, -1)
            elif b != rows:
                raise ValueError(f"{b} images but {rows} text rows: batch sizes must match")
            if query_embeds.shape[-1] != inputs_embeds.shape[-1]:
                raise ValueError(f"query embeddings of width {query_embeds.shape[-1]} cannot precede text "
                                 f"embeddings of width {inputs_embeds.shape[-1]}")
            ones = torch.ones(rows, q, dtype=attention_mask.dtype, device=attention_mask.device)
            return torch.cat([query_embeds, inputs_embeds], 1), torch.cat([ones, attention_mask], 1)
        if input_ids is not None:
            mask = input_ids.to(inputs_embeds.device) == token  # (B, T)
        else:  # the reference finds the image token's embedding among the given embeddings
            image_row = self.get_input_embeddings()(torch.tensor(token, device=inputs_embeds.device))
            mask = (inputs_embeds == image_row).all(-1)
        n = int(mask.sum())
        if b == 1 and rows > 1 and n > q:
            query_embeds, b = query_embeds.expand(rows, -1, -1), rows
        if n > b * q:
            raise ValueError(f"the text holds {n} image tokens (id {token}) but {b} image(s) give {b * q} query "
                             f"embeddings ({q} each): use Blip2Processor with images and text, which puts {q} "
                             f"image tokens in each row")
        return inputs_embeds.masked_scatter(mask[..., None], query_embeds), attention_mask

    def language_forward(self, inputs_embeds: Tensor, attention_mask: Tensor, decoder_input_ids: Tensor | None,
                         decoder_attention_mask: Tensor | None, labels: Tensor | None,
                         **kwargs: Any) -> tuple[Tensor | None, Tensor, ModelOutput]:
        """Run the language model; returns (loss, logits, outputs)."""
        if self.config.use_decoder_only_language_model:
            out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
            logits, loss = out.logits, None
            if labels is not None:
                logits = logits[:, -labels.shape[1]:]
                loss = causal_lm_loss(logits, labels)
            return loss, logits, out
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                                  labels=labels, **kwargs)
        return out.loss, out.logits, out

    def forward(self, pixel_values: Tensor | None = None, input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, decoder_input_ids: Tensor | None = None,
                decoder_attention_mask: Tensor | None = None, labels: Tensor | None = None,
                interpolate_pos_encoding: bool = False, inputs_embeds: Tensor | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **_: Any) -> Blip2ForConditionalGenerationModelOutput | tuple:
        """output_attentions / output_hidden_states: None leaves each part to its own config's setting (the
        vision, Q-Former and text configs), as the reference; return_dict: None takes this config's."""
        return_dict = resolve(return_dict, self.config, "return_dict")
        feats = self.image_features(pixel_values, interpolate_pos_encoding, output_attentions, output_hidden_states)
        embeds, mask = self.merge_image_tokens(feats.pooler_output, input_ids, attention_mask, inputs_embeds)
        loss, logits, out = self.language_forward(embeds, mask, decoder_input_ids, decoder_attention_mask, labels,
                                                  output_attentions=output_attentions,
                                                  output_hidden_states=output_hidden_states)
        res = Blip2ForConditionalGenerationModelOutput(loss=loss, logits=logits, vision_outputs=feats.vision_outputs,
                                                       qformer_outputs=feats.qformer_outputs,
                                                       language_model_outputs=out)
        return res if return_dict else res.to_tuple()


class Blip2Model(_Blip2WithLanguageModel):
    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                          decoder_input_ids: Tensor | None = None, decoder_attention_mask: Tensor | None = None,
                          labels: Tensor | None = None, output_attentions: bool | None = None,
                          output_hidden_states: bool | None = None, **_: Any) -> BaseModelOutputWithPooling:
        """Text-only hidden states: OPT decoder output, or the T5 encoder output."""
        output_attentions = resolve(output_attentions, self.config.text_config, "output_attentions")
        output_hidden_states = resolve(output_hidden_states, self.config.text_config, "output_hidden_states")
        if self.config.use_decoder_only_language_model:
            out = self.language_model.model(input_ids, attention_mask, output_attentions=output_attentions,
                                            output_hidden_states=output_hidden_states)
        else:
            out = self.language_model.encoder(input_ids, attention_mask, output_attentions=output_attentions,
                                              output_hidden_states=output_hidden_states)
        return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states,
                                          attentions=out.attentions)

    def get_image_features(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False,
                           output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                           **_: Any) -> BaseModelOutputWithPooling:
        return self.vision_model(pixel_values, interpolate_pos_encoding, output_attentions, output_hidden_states)

    def get_qformer_features(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False,
                             **_: Any) -> Tensor:
        image_embeds = self.vision_model(pixel_values, interpolate_pos_encoding).last_hidden_state
        return self.query_features(image_embeds).last_hidden_state  # (B, Q, D_q)


class Blip2ForConditionalGeneration(_Blip2WithLanguageModel):
    def __init__(self, config: Blip2Config):
        super().__init__(config)
        tc = config.text_config  # the reference's generation config of a model config: its token ids
        ids = {k: getattr(tc, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                 "decoder_start_token_id")}
        self.generation_config = GenerationConfig(**{k: v for k, v in ids.items() if v is not None})

    @classmethod
    def can_generate(cls) -> bool:
        return True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None = None,
                        **kwargs: Any) -> "Blip2ForConditionalGeneration":
        """PretrainedMixin.from_pretrained, then the checkpoint's generation_config.json (when it has one) as
        model.generation_config: generate()'s defaults, as the reference."""
        out = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        model = out[0] if isinstance(out, tuple) else out
        if pretrained_model_name_or_path is not None:
            hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
            path = resolve_checkpoint(pretrained_model_name_or_path, allow_patterns=MODEL_FILES, **hub)
            model.generation_config = read_generation_config(path, model.generation_config)
        return out

    def generation_defaults(self) -> dict[str, Any]:
        """The settings of model.generation_config that differ from GenerationConfig()'s (generate()'s defaults)."""
        gc, default = self.generation_config, GenerationConfig()
        return {f.name: getattr(gc, f.name) for f in dataclasses.fields(gc)
                if getattr(gc, f.name) != getattr(default, f.name)}

    def get_image_features(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False,
                           output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                           **_: Any) -> BaseModelOutputWithVisionQformerOutputs:
        return self.image_features(pixel_values, interpolate_pos_encoding, output_attentions, output_hidden_states)

    def prompt_ids(self, batch_size: int, device: str | torch.device) -> Tensor:
        """The default prompt: Q image tokens then BOS ([BOS] alone for checkpoints without image tokens)."""
        tc = self.config.text_config
        bos = tc.bos_token_id if tc.bos_token_id is not None else tc.decoder_start_token_id
        ids = [bos] if self.config.image_token_index is None else \
            [self.config.image_token_index] * self.config.num_query_tokens + [bos]
        return torch.tensor([ids], dtype=torch.long, device=device).repeat(batch_size, 1)

    def generation_inputs(self, pixel_values: Tensor | None = None, input_ids: Tensor | None = None,
                          attention_mask: Tensor | None = None, inputs_embeds: Tensor | None = None,
                          interpolate_pos_encoding: bool = False,
                          image_embeds: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """The language model's prompt: (inputs_embeds (B, T, D), attention_mask (B, T), input_ids or None).
        `image_embeds` (B, Q, D_t), from get_image_features(...).pooler_output, skips the image encoders."""
        if image_embeds is None:
            image_embeds = self.image_features(pixel_values, interpolate_pos_encoding).pooler_output
        if input_ids is None and inputs_embeds is None:
            input_ids = self.prompt_ids(image_embeds.shape[0], image_embeds.device)
            attention_mask = None
        embeds, mask = self.merge_image_tokens(image_embeds, input_ids, attention_mask, inputs_embeds)
        if input_ids is not None and embeds.shape[1] != input_ids.shape[1]:  # legacy layout: queries in front
            input_ids = None if self.config.is_encoder_decoder else input_ids
        return embeds, mask, input_ids

    @torch.no_grad()
    def generate(self, pixel_values: Tensor | None = None, input_ids: Tensor | None = None,
                 attention_mask: Tensor | None = None, inputs_embeds: Tensor | None = None,
                 interpolate_pos_encoding: bool = False, image_embeds: Tensor | None = None, streamer: Any = None,
                 **generate_kwargs: Any) -> Tensor:
        """Generate text about images. Returns token ids as the reference does: for OPT the whole sequence
        (prompt included), for T5 the decoder sequence starting with decoder_start_token_id. Decoding settings:
        see generation.GenerationConfig."""
        inputs = self.generation_inputs(pixel_values, input_ids, attention_mask, inputs_embeds,
                                        interpolate_pos_encoding, image_embeds)
        if "generation_config" in generate_kwargs:  # the reference's generate(generation_config=...): blip2's or
            config = generate_kwargs.pop("generation_config")  # transformers' GenerationConfig, its set values
            given = config.to_dict() if hasattr(config, "to_dict") else vars(config)
            names = {f.name for f in dataclasses.fields(GenerationConfig)}
            generate_kwargs = {k: v for k, v in given.items() if k in names and v is not None} | generate_kwargs
        return generate(self.language_model, *inputs, streamer=streamer,
                        **(self.generation_defaults() | generate_kwargs))


class _Blip2Retrieval(Blip2PreTrainedModel):
    def strip_image_tokens(self, input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Drop the Q image tokens that the processor puts in front of the text (when images come too)."""
        q, token = self.config.num_query_tokens, self.config.image_token_index
        if token is not None and input_ids.shape[1] >= q and bool((input_ids[:, :q] == token).all()):
            input_ids = input_ids[:, q:]
            attention_mask = None if attention_mask is None else attention_mask[:, q:]
        return input_ids, attention_mask

    def text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      position_ids: Tensor | None = None, output_attentions: bool | None = None,
                      output_hidden_states: bool | None = None) -> QFormerOutput:
        """Q-Former text path (no queries, no image): (B, T, D_q)."""
        embeds = self.embeddings(input_ids, position_ids)
        return self.qformer(embeds, query_length=0, attention_mask=attention_mask,
                            output_attentions=output_attentions, output_hidden_states=output_hidden_states)


class Blip2ForImageTextRetrieval(_Blip2Retrieval):
    def __init__(self, config: Blip2Config):
        super().__init__()
        self.config = config
        d = config.qformer_config.hidden_size
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, d))
        self.embeddings = Blip2TextEmbeddings(config.qformer_config)
        self.qformer = Blip2QFormerModel(config.qformer_config)
        self.vision_projection = nn.Linear(d, config.image_text_hidden_size)
        self.text_projection = nn.Linear(d, config.image_text_hidden_size)
        self.itm_head = nn.Linear(d, 2)
        self.init_switches()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def itm_logits(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                   output_attentions: bool | None = None) -> tuple[Tensor, QFormerOutput]:
        """ITM on paired rows, or one image (batch 1) against every text row. input_ids hold text only.
        image_embeds (B|1, 1+N, D_v) -> logits (B, 2) and the Q-Former output over [queries; text]."""
        b = input_ids.shape[0]
        if image_embeds.shape[0] not in (1, b):
            raise ValueError(f"image-text matching pairs rows: {image_embeds.shape[0]} images but {b} texts")
        q = self.config.num_query_tokens
        queries = self.query_tokens.expand(b, -1, -1)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ones = torch.ones(b, q, dtype=attention_mask.dtype, device=attention_mask.device)
        x = self.embeddings(input_ids, query_embeds=queries)  # (B, Q + T, D)
        out = self.qformer(x, query_length=q, attention_mask=torch.cat([ones, attention_mask], 1),
                           encoder_hidden_states=image_embeds, output_attentions=output_attentions)
        h = out.last_hidden_state.to(self.itm_head.weight.dtype)
        return self.itm_head(h[:, :q]).mean(1), out  # (B, 2)

    def itc_image_embeds(self, image_embeds: Tensor) -> Tensor:
        """(B, 1+N, D_v) -> normalised projected queries (B, Q, E)."""
        q = self.query_features(image_embeds).last_hidden_state.to(self.vision_projection.weight.dtype)
        return F.normalize(self.vision_projection(q), dim=-1)

    def itc_text_embeds(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, QFormerOutput]:
        """text -> normalised projected [CLS] (B, E), and the Q-Former text output."""
        out = self.text_features(input_ids, attention_mask)
        h = out.last_hidden_state.to(self.text_projection.weight.dtype)
        return F.normalize(self.text_projection(h[:, 0]), dim=-1), out

    def forward(self, pixel_values: Tensor | None = None, input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, use_image_text_matching_head: bool = False,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **_: Any) -> Blip2ImageTextMatchingModelOutput | tuple:
        return_dict = resolve(return_dict, self.config, "return_dict")
        if input_ids is None:
            raise ValueError("input_ids are required")
        rows = pixel_values.shape[0]
        once = rows > 1 and repeated_rows(pixel_values)  # one image against many texts: its tower runs once
        vision = self.vision_model(pixel_values[:1] if once else pixel_values, output_attentions=output_attentions,
                                   output_hidden_states=output_hidden_states)
        image_embeds = vision.last_hidden_state  # (1 if once else B_i, 1+N, D_v)
        if once:
            vision = expand_rows(vision, rows)
        if use_image_text_matching_head:
            input_ids, attention_mask = self.strip_image_tokens(input_ids, attention_mask)
            if rows not in (1, input_ids.shape[0]):
                raise ValueError(f"image-text matching pairs rows: {rows} images but {input_ids.shape[0]} texts")
            logits, text_out = self.itm_logits(image_embeds, input_ids, attention_mask, output_attentions)
            text_embeds, img = text_out.last_hidden_state, vision.last_hidden_state
        else:
            input_ids, attention_mask = self.strip_image_tokens(input_ids, attention_mask)
            img = self.itc_image_embeds(image_embeds)  # (B_i, Q, E)
            img = img.expand(rows, -1, -1) if once else img
            text_embeds, text_out = self.itc_text_embeds(input_ids, attention_mask)  # (B_t, E)
            logits = torch.einsum("iqe,te->iqt", img, text_embeds).amax(1)  # (B_i, B_t): best query per pair
        res = Blip2ImageTextMatchingModelOutput(logits_per_image=logits, logits_per_text=logits.t(),
                                                text_embeds=text_embeds, image_embeds=img,
                                                text_model_output=text_out, vision_model_output=vision)
        return res if return_dict else res.to_tuple()


def repeated_rows(x: torch.Tensor) -> bool:
    """Whether every row of a batch is the first one (an image expanded or repeated against several texts)."""
    return x.stride(0) == 0 or bool((x == x[:1]).all())


def expand_rows(out: ModelOutput, rows: int) -> ModelOutput:
    """A batch-1 output's tensors (and tuples of them) seen as `rows` identical rows (views, no copies)."""
    for k, v in out.items():
        if isinstance(v, torch.Tensor):
            setattr(out, k, v.expand(rows, *v.shape[1:]))
        elif isinstance(v, tuple):
            setattr(out, k, tuple(t.expand(rows, *t.shape[1:]) for t in v))
    return out


class Blip2TextModelWithProjection(_Blip2Retrieval):
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False  # as the reference
    def __init__(self, config: Blip2Config):
        super().__init__()
        self.config = config
        d = config.qformer_config.hidden_size
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, d))  # unused, as the reference
        self.embeddings = Blip2TextEmbeddings(config.qformer_config)
        self.qformer = Blip2QFormerModel(config.qformer_config)
        self.text_projection = nn.Linear(d, config.image_text_hidden_size)
        self.init_switches()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **_: Any) -> Blip2TextModelOutput | tuple:
        return_dict = resolve(return_dict, self.config, "return_dict")
        if input_ids is None:
            raise ValueError("input_ids are required")
        out = self.text_features(input_ids, attention_mask, position_ids, output_attentions, output_hidden_states)
        h = out.last_hidden_state.to(self.text_projection.weight.dtype)
        res = Blip2TextModelOutput(text_embeds=F.normalize(self.text_projection(h), dim=-1),  # (B, T, E)
                                   last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states,
                                   attentions=out.attentions)
        return res if return_dict else res.to_tuple()


class Blip2VisionModelWithProjection(Blip2PreTrainedModel):
    def __init__(self, config: Blip2Config):
        super().__init__()
        self.config = config
        d = config.qformer_config.hidden_size
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, d))
        self.qformer = Blip2QFormerModel(config.qformer_config)
        self.vision_projection = nn.Linear(d, config.image_text_hidden_size)
        self.init_switches()

    def get_input_embeddings(self) -> nn.Conv2d:
        return self.vision_model.embeddings.patch_embedding

    def forward(self, pixel_values: Tensor | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **_: Any) -> Blip2VisionModelOutput | tuple:
        return_dict = resolve(return_dict, self.config, "return_dict")
        vision = self.vision_model(pixel_values, output_attentions=output_attentions,
                                   output_hidden_states=output_hidden_states)
        q = self.query_features(vision.last_hidden_state).last_hidden_state.to(self.vision_projection.weight.dtype)
        res = Blip2VisionModelOutput(image_embeds=F.normalize(self.vision_projection(q), dim=-1),  # (B, Q, E)
                                     last_hidden_state=vision.last_hidden_state, hidden_states=vision.hidden_states,
                                     attentions=vision.attentions)
        return res if return_dict else res.to_tuple()


def read_generation_config(path: str, base: GenerationConfig) -> GenerationConfig:
    """`base` with the settings of path/generation_config.json that GenerationConfig knows (others, such as
    transformers_version, are left out)."""
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return base
    with open(file, encoding="utf-8") as f:
        d = json.load(f)
    names = {f.name for f in dataclasses.fields(base)}
    return dataclasses.replace(base, **{k: v for k, v in d.items() if k in names})
