"""The Querying Transformer (a BERT-base encoder whose query positions cross-attend to image patches)
and its text embeddings."""

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .config import Blip2QFormerConfig
from .ops import (
    BaseModelOutputWithPoolingAndCrossAttentions,
    CheckpointedLayers,
    activation,
    attention,
    padding_mask,
    resolve,
)
from .pretrained import PretrainedMixin


class Blip2QFormerMultiHeadAttention(nn.Module):
    def __init__(self, config: Blip2QFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        d, kv = config.hidden_size, config.encoder_hidden_size if is_cross_attention else config.hidden_size
        if d % config.num_attention_heads:
            raise ValueError(f"qformer hidden_size {d} is not a multiple of num_attention_heads "
                             f"{config.num_attention_heads}")
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(kv, d)
        self.value = nn.Linear(kv, d)
        self.eager = False  # attn_implementation="eager" (PretrainedMixin.set_attn_implementation)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """x (B, T, D) attends to context (B', S, D_kv); B' may be 1 and broadcast over B."""
        h = self.num_heads
        q = self.query(x).unflatten(-1, (h, -1)).transpose(1, 2)  # (B, H, T, hd)
        k = self.key(context).unflatten(-1, (h, -1)).transpose(1, 2)  # (B', H, S, hd)
        v = self.value(context).unflatten(-1, (h, -1)).transpose(1, 2)
        if k.shape[0] != q.shape[0]:
            k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
        return attention(q, k, v, mask, need_weights=need_weights, eager=self.eager)


class Blip2QFormerSelfOutput(nn.Module):
    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, a: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(a) + residual)


class Blip2QFormerAttention(nn.Module):
    def __init__(self, config: Blip2QFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        self.attention = Blip2QFormerMultiHeadAttention(config, is_cross_attention)
        self.output = Blip2QFormerSelfOutput(config)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        a, w = self.attention(x, x if context is None else context, mask, need_weights)
        return self.output(a, x), w


class Blip2QFormerIntermediate(nn.Module):
    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class Blip2QFormerOutput(nn.Module):
    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class Blip2QFormerLayer(nn.Module):
    """Self-attention over [queries; text], cross-attention (queries only, every
    `cross_attention_frequency` layers), then separate feed-forwards for query and text positions."""

    def __init__(self, config: Blip2QFormerConfig, layer_idx: int):
        super().__init__()
        self.attention = Blip2QFormerAttention(config)
        self.has_cross_attention = layer_idx % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = Blip2QFormerAttention(config, is_cross_attention=True)
        self.has_text_ffn = config.use_qformer_text_input
        if self.has_text_ffn:
            self.intermediate = Blip2QFormerIntermediate(config)
            self.output = Blip2QFormerOutput(config)
        self.intermediate_query = Blip2QFormerIntermediate(config)
        self.output_query = Blip2QFormerOutput(config)

    def text_ffn(self, x: Tensor) -> Tensor:
        if not self.has_text_ffn:
            raise ValueError("this Q-Former has no text feed-forward (use_qformer_text_input=False): "
                             "text input needs a retrieval (ITM) checkpoint")
        return self.output(self.intermediate(x), x)

    def forward(self, x: Tensor, mask: Tensor | None, image_embeds: Tensor | None, query_length: int,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
        x, self_w = self.attention(x, mask=mask, need_weights=need_weights)
        cross_w = None
        if query_length == 0:
            return self.text_ffn(x), self_w, cross_w
        q = x[:, :query_length]
        if self.has_cross_attention:
            if image_embeds is None:
                raise ValueError("encoder_hidden_states (image embeddings) are required by the query positions")
            q, cross_w = self.crossattention(q, context=image_embeds, need_weights=need_weights)
        q = self.output_query(self.intermediate_query(q), q)
        if x.shape[1] > query_length:
            q = torch.cat([q, self.text_ffn(x[:, query_length:])], dim=1)
        return q, self_w, cross_w


class Blip2QFormerEncoder(CheckpointedLayers, nn.Module):
    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(Blip2QFormerLayer(config, i) for i in range(config.num_hidden_layers))


class Blip2QFormerModel(PretrainedMixin, nn.Module):
    config_class = Blip2QFormerConfig
    checkpoint_prefix = "qformer."
    main_input_name = "input_ids"  # as the reference's, although its input is query_embeds
    _keep_in_fp32_modules = ("",)  # the whole Q-Former stays fp32 under fp16

    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.config = config
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Blip2QFormerEncoder(config)
        self.init_switches()

    def forward(self, query_embeds: Tensor, query_length: int | None = None, attention_mask: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **_: Any) -> BaseModelOutputWithPoolingAndCrossAttentions | tuple:
        """query_embeds (B, L, D): the first `query_length` positions are queries (default: all L), the rest
        text. attention_mask: (B, L) keys to keep, or (B, L, L) which key each position may see (training's
        image-grounded generation uses a causal text part). encoder_attention_mask is accepted for compatibility;
        BLIP-2 never masks image tokens."""
        output_attentions = resolve(output_attentions, self.config, "output_attentions")
        output_hidden_states = resolve(output_hidden_states, self.config, "output_hidden_states")
        return_dict = resolve(return_dict, self.config, "return_dict")
        if query_length is None:
            query_length = query_embeds.shape[1]
        mask_dtype = query_embeds.dtype  # the reference takes the mask's min value from the incoming dtype
        dtype = self.layernorm.weight.dtype  # the Q-Former stays fp32 when the rest is fp16
        x = self.layernorm(query_embeds.to(dtype))
        if attention_mask is not None and attention_mask.dim() == 3:  # (B, L, L) keep-matrix, e.g. causal text
            mask = (1.0 - attention_mask[:, None].to(mask_dtype)) * torch.finfo(mask_dtype).min
        else:
            mask = padding_mask(attention_mask, mask_dtype)  # (B, L) keys to keep
        if mask is not None:
            mask = mask.to(dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.to(dtype)
        hidden, attns, cross = [], [], []
        for layer in self.encoder.layer:
            if output_hidden_states:
                hidden.append(x)
            x, w, cw = self.encoder.run(layer, x, mask, encoder_hidden_states, query_length, output_attentions)
            attns.append(w)
            if cw is not None:
                cross.append(cw)
        if output_hidden_states:
            hidden.append(x)
        out = BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=x,
            pooler_output=x[:, 0],
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(attns) if output_attentions else None,
            cross_attentions=tuple(cross) if output_attentions else None,
        )
        return out if return_dict else out.to_tuple()


class Blip2TextEmbeddings(nn.Module):
    """word + absolute position embeddings (no LayerNorm here: it is `qformer.layernorm`)."""

    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None,
                query_embeds: Tensor | None = None) -> Tensor:
        t = input_ids.shape[1]
        if position_ids is None:
            if t > self.position_embeddings.num_embeddings:
                raise ValueError(f"input_ids has {t} tokens, more than the Q-Former's "
                                 f"{self.position_embeddings.num_embeddings} positions")
            position_ids = torch.arange(t, device=input_ids.device)[None]
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)  # (B, T, D)
        if query_embeds is not None:
            x = torch.cat([query_embeds.to(x.dtype), x], dim=1)  # (B, Q + T, D)
        return x
