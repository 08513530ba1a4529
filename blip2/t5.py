"""T5 encoder-decoder language model (Flan-T5 in blip2-flan-t5-xl / -xxl): T5ForConditionalGeneration."""

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import decoder_step, native
from .cache import KVCache
from .config import T5Config
from .ops import (
    BaseModelOutput,
    CheckpointedLayers,
    Linear,
    Seq2SeqLMOutput,
    activation,
    attention,
    causal_mask,
    padding_mask,
    resolve,
)


class T5LayerNorm(nn.Module):
    """RMSNorm without bias; the variance is computed in fp32. Inference on the CPU in bfloat16 / float32 runs in one
    call of blip2's kernel (native.rms_norm: the bits of rms_norm's torch ops, which serve everything else: training,
    fp16, other devices, torch.compile)."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] < FUSED_NORM_MAX and native.serves(x, self.weight) and (lanes := norm_lanes()):
            return native.rms_norm(x, self.weight, self.eps, lanes)
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' T5LayerNorm, op for op."""
    x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        x = x.to(weight.dtype)
    return weight * x


FUSED_NORM_MAX = 32768  # torch splits the sum of one longer row between its threads: not a row's order


def norm_lanes() -> int | None:
    """The width (8 or 16 floats) at which torch's CPU sum adds a row here, found once per process (native.probe);
    None where no width gives torch's bits or blip2's kernels are not built (native.disabled() included):
    T5LayerNorm then runs torch's ops."""
    return native.probe("T5 RMSNorm", LANES, rms_norm_matches)


LANES = {n: f"torch's float sums run {n} lanes wide here" for n in (8, 16)}


def rms_norm_matches(lanes: int, lib) -> bool:
    """Whether blip2's RMSNorm kernel, summing `lanes` floats wide, gives the bits of rms_norm's torch ops on float32
    rows (whose sums of squares change in the last bit with the order) of every scale and several widths, with
    float32 and bfloat16 weights."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4099, generator=g) * torch.logspace(-3, 3, 64)[:, None]  # the widths differ in 1/4 rows
    weight = torch.randn(4099, generator=g)
    return all(torch.equal(native.rms_norm(x[:, :d], w, 1e-6, lanes, lib), rms_norm(x[:, :d], w, 1e-6))
               for d in (4099, 2048, 13, 5) for w in (weight[:d], weight[:d].bfloat16()))


def relative_position_bucket(rel: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """rel = key_pos - query_pos -> bucket index (T5's log-spaced buckets)."""
    bucket = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        bucket += (rel > 0).long() * num_buckets
        n = rel.abs()
    else:
        n = (-rel).clamp(min=0)
    exact = num_buckets // 2
    large = exact + (torch.log(n.float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return bucket + torch.where(n < exact, n, large)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool = False, is_decoder: bool = False):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads = config.num_heads
        self.is_decoder = is_decoder
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.q = Linear(config.d_model, inner, bias=False)
        self.k = Linear(config.d_model, inner, bias=False)
        self.v = Linear(config.d_model, inner, bias=False)
        self.o = Linear(inner, config.d_model, bias=False)
        self.eager = False  # attn_implementation="eager" (PretrainedMixin.set_attn_implementation)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, config.num_heads)

    def position_bias(self, q_len: int, k_len: int, device: torch.device) -> Tensor:
        """(1, H, q_len, k_len) bias for the last q_len queries against k_len keys."""
        ctx = torch.arange(k_len - q_len, k_len, device=device)[:, None]
        mem = torch.arange(k_len, device=device)[None, :]
        buckets = relative_position_bucket(mem - ctx, not self.is_decoder, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def heads(self, x: Tensor) -> Tensor:
        return x.reshape(*x.shape[:-1], self.num_heads, -1).transpose(1, 2)  # (B, H, T, d_kv); unflatten is Python

    def forward(self, x: Tensor, bias: Tensor | None, cache: KVCache | None = None, layer: int = 0,
                context: Tensor | None = None, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        q = self.heads(self.q(x))
        if context is None:  # self-attention
            k, v = self.heads(self.k(x)), self.heads(self.v(x))
            if cache is not None:
                k, v = cache.update(layer, k, v)
        elif cache is not None and cache.cross[layer] is not None:
            k, v = cache.cross[layer]
        else:  # cross-attention to the encoder output, computed once per prompt
            k, v = self.heads(self.k(context)), self.heads(self.v(context))
            if cache is not None:
                cache.cross[layer] = (k, v)
        out, w = attention(q, k, v, bias, scale=1.0, need_weights=need_weights, eager=self.eager)  # T5: no scale
        return self.o(out), w


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool, is_decoder: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias, is_decoder)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: Tensor, bias: Tensor | None, cache: KVCache | None, layer: int,
                need_weights: bool) -> tuple[Tensor, Tensor | None]:
        a, w = self.SelfAttention(self.layer_norm(x), bias, cache, layer, need_weights=need_weights)
        return x + a, w


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(config, is_decoder=True)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int,
                need_weights: bool) -> tuple[Tensor, Tensor | None]:
        a, w = self.EncDecAttention(self.layer_norm(x), mask, cache, layer, context, need_weights)
        return x + a, w


class T5DenseReluDense(nn.Module):
    """wo(act(wi(x))) or, gated, wo(act(wi_0(x)) * wi_1(x)); wo's input follows wo's dtype (fp32 in fp16 loads)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.gated = config.is_gated_act
        if self.gated:
            self.wi_0 = Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = Linear(config.d_model, config.d_ff, bias=False)
        self.wo = Linear(config.d_ff, config.d_model, bias=False)
        self.act = activation(config.dense_act_fn)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        if self.wo.weight.dtype != h.dtype and self.wo.weight.dtype not in (torch.int8, torch.uint8):
            h = h.to(self.wo.weight.dtype)
        return self.wo(h)


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseReluDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


def clamp_fp16(x: Tensor) -> Tensor:
    """The reference keeps fp16 activations finite after every sub-layer."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = big - 1000 if torch.isinf(x).any() else big
    return x.clamp(-limit, limit)


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        layers = [T5LayerSelfAttention(config, has_relative_attention_bias, is_decoder)]
        if is_decoder:
            layers.append(T5LayerCrossAttention(config))
        layers.append(T5LayerFF(config))
        self.layer = nn.ModuleList(layers)

    def forward(self, x: Tensor, bias: Tensor | None, context: Tensor | None, context_mask: Tensor | None,
                cache: KVCache | None, layer: int,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
        x, w = self.layer[0](x, bias, cache, layer, need_weights)
        x = clamp_fp16(x)
        cw = None
        if self.is_decoder:
            x, cw = self.layer[1](x, context, context_mask, cache, layer, need_weights)
            x = clamp_fp16(x)
        return clamp_fp16(self.layer[-1](x)), w, cw


class T5Stack(CheckpointedLayers, decoder_step.Plans, nn.Module):
    def __init__(self, config: T5Config, embed_tokens: nn.Embedding, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        self._embed = [embed_tokens]  # shared with the parent (a list keeps it out of this module's keys)
        n = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList(T5Block(config, i == 0, is_decoder) for i in range(n))
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.plans = {}  # a decoder's decoding steps in one kernel call (decoder_step.run): rows -> its Plan

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None, encoder_hidden_states: Tensor | None = None,
                encoder_attention_mask: Tensor | None = None, past_key_values: KVCache | None = None,
                output_attentions: bool = False, output_hidden_states: bool = False, return_dict: bool = True,
                **_: Any) -> BaseModelOutput | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self._embed[0](input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        b, t = x.shape[:2]
        cache = past_key_values
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, past + t, dtype=torch.long, device=x.device)
        bias = self.block[0].layer[0].SelfAttention.position_bias(t, past + t, x.device).to(x.dtype)
        if self.is_decoder:
            mask = causal_mask(attention_mask, t, x.dtype)
        else:
            mask = padding_mask(attention_mask, x.dtype)
        bias = bias if mask is None else bias + mask  # (B|1, H, T, past + T)
        context_mask = None
        if self.is_decoder and encoder_attention_mask is not None:
            context_mask = padding_mask(encoder_attention_mask, x.dtype)
        hidden, attns, cross = [], [], []
        y = None
        if cache is not None and t == 1 and self.is_decoder and not (output_attentions or output_hidden_states
                                                                    or self.training):
            y = decoder_step.run(self.block, x, bias, context_mask, cache, norm_lanes, self.plans)
        for i, block in enumerate(self.block if y is None else ()):
            if output_hidden_states:
                hidden.append(x)
            x, w, cw = block(x, bias, encoder_hidden_states, context_mask, cache, i, output_attentions) \
                if cache is not None else \
                self.run(block, x, bias, encoder_hidden_states, context_mask, cache, i, output_attentions)
            attns.append(w)
            cross.append(cw)
        if cache is not None:
            cache.advance(t)
        x = self.final_layer_norm(x if y is None else y)
        if output_hidden_states:
            hidden.append(x)
        out = BaseModelOutput(last_hidden_state=x, hidden_states=tuple(hidden) if output_hidden_states else None,
                              attentions=tuple(attns) if output_attentions else None)
        out.cross_attentions = tuple(cross) if output_attentions and self.is_decoder else None
        return out if return_dict else out.to_tuple()


class T5ForConditionalGeneration(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, self.shared, is_decoder=False)
        self.decoder = T5Stack(config, self.shared, is_decoder=True)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)

    def tie_weights(self) -> None:
        """The loader ties lm_head to `shared` when the checkpoint has no separate lm_head."""
        self.lm_head.weight = self.shared.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def get_encoder(self) -> T5Stack:
        return self.encoder

    @property
    def num_layers(self) -> int:
        return len(self.decoder.block)

    def shift_right(self, labels: Tensor) -> Tensor:
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        ids = torch.cat([start, labels[:, :-1]], dim=1)
        return ids.masked_fill(ids == -100, self.config.pad_token_id)

    def decode(self, decoder_input_ids: Tensor, encoder_hidden_states: Tensor, attention_mask: Tensor | None = None,
               decoder_attention_mask: Tensor | None = None, past_key_values: KVCache | None = None,
               output_attentions: bool = False, output_hidden_states: bool = False) -> tuple[Tensor, BaseModelOutput]:
        """Decoder pass -> (logits (B, T, V), decoder output)."""
        dec = self.decoder(decoder_input_ids, decoder_attention_mask, None, encoder_hidden_states,
                           attention_mask, past_key_values, output_attentions, output_hidden_states)
        h = dec.last_hidden_state
        if self.config.scale_decoder_outputs:
            h = h * self.config.d_model**-0.5
        return self.lm_head(h), dec

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                decoder_input_ids: Tensor | None = None, decoder_attention_mask: Tensor | None = None,
                encoder_outputs: BaseModelOutput | tuple | None = None, inputs_embeds: Tensor | None = None,
                labels: Tensor | None = None, past_key_values: KVCache | None = None, use_cache: bool = False,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **_: Any) -> Seq2SeqLMOutput | tuple:
        """output_attentions / output_hidden_states / return_dict: None takes the config's setting."""
        output_attentions = resolve(output_attentions, self.config, "output_attentions")
        output_hidden_states = resolve(output_hidden_states, self.config, "output_hidden_states")
        return_dict = resolve(return_dict, self.config, "return_dict")
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids, attention_mask, inputs_embeds,
                                           output_attentions=output_attentions,
                                           output_hidden_states=output_hidden_states)
        elif isinstance(encoder_outputs, (tuple, list)):
            encoder_outputs = BaseModelOutput(*encoder_outputs)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5 needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        if use_cache and past_key_values is None:
            past_key_values = KVCache(self.num_layers)
        logits, dec = self.decode(decoder_input_ids, encoder_outputs.last_hidden_state, attention_mask,
                                  decoder_attention_mask, past_key_values, output_attentions, output_hidden_states)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.to(logits.device).flatten(),
                                   ignore_index=-100)
        out = Seq2SeqLMOutput(
            loss=loss, logits=logits, past_key_values=past_key_values,
            decoder_hidden_states=dec.hidden_states, decoder_attentions=dec.attentions,
            cross_attentions=dec.cross_attentions, encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states, encoder_attentions=encoder_outputs.attentions)
        return out if return_dict else out.to_tuple()
