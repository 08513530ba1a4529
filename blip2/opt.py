"""OPT decoder-only language model (blip2-opt-2.7b / 6.7b): OPTForCausalLM."""

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import decoder_step, native
from .cache import KVCache
from .config import OPTConfig
from .ops import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    CheckpointedLayers,
    Linear,
    activation,
    attention,
    causal_mask,
    resolve,
)


def layer_norm_form() -> int | None:
    """The form (native.layer_norm's) in which blip2's LayerNorm kernel gives the bits of torch's F.layer_norm on
    bfloat16 rows here, found once per process (native.probe); None where no form does or blip2's kernels are not
    built (native.disabled() included): OPT's decoding steps then run its layers' forward."""
    return native.probe("LayerNorm", LAYER_NORM_FORMS, layer_norm_matches)


LAYER_NORM_FORMS = {f: f"moments {16 if f & 1 else 8} floats wide, y = "
                    f"{'(x - mean) * rstd' if f & 2 else '(x * rstd - mean * rstd)'} * w + b" for f in range(4)}


def layer_norm_matches(form: int, lib) -> bool:
    """Whether blip2's LayerNorm kernel in `form` gives the bits of F.layer_norm on bfloat16 rows of every scale and
    offset, at OPT-6.7B's and OPT-2.7B's widths and two narrower ones."""
    g = torch.Generator().manual_seed(0)
    for d in (4096, 2560, 512, 32):
        x = torch.randn(64, d, generator=g) * torch.logspace(-3, 3, 64)[:, None] + torch.randn(64, 1, generator=g)
        w, b = torch.randn(2, d, generator=g).bfloat16()
        x = x.bfloat16()
        if not torch.equal(native.layer_norm(x, w, b, 1e-5, form, lib), F.layer_norm(x, (d,), w, b, 1e-5)):
            return False
    return True


class OPTAttention(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        d, bias = config.hidden_size, config.enable_bias
        self.num_heads = config.num_attention_heads
        self.scaling = (d // self.num_heads) ** -0.5
        self.q_proj = Linear(d, d, bias=bias)
        self.k_proj = Linear(d, d, bias=bias)
        self.v_proj = Linear(d, d, bias=bias)
        self.out_proj = Linear(d, d, bias=bias)
        self.eager = False  # attn_implementation="eager" (PretrainedMixin.set_attn_implementation)

    def forward(self, x: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        h = self.num_heads
        heads = (*x.shape[:-1], h, -1)  # (reshape, not unflatten: a Python function, at 3 calls a layer a step)
        q = (self.q_proj(x) * self.scaling).reshape(heads).transpose(1, 2)  # (B, H, T, hd), pre-scaled
        k = self.k_proj(x).reshape(heads).transpose(1, 2)
        v = self.v_proj(x).reshape(heads).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, past + T, hd)
        out, w = attention(q, k, v, mask, scale=1.0, need_weights=need_weights, eager=self.eager)
        return self.out_proj(out), w


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        d, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.pre_ln = config.do_layer_norm_before
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)
        self.act = activation(config.activation_function)
        self.fc1 = Linear(d, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = Linear(config.ffn_dim, d, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)

    def forward(self, x: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        a, w = self.self_attn(self.self_attn_layer_norm(x) if self.pre_ln else x, mask, cache, layer, need_weights)
        x = x + a
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        f = self.fc2(self.act(self.fc1(self.final_layer_norm(x) if self.pre_ln else x)))
        x = x + f
        if not self.pre_ln:
            x = self.final_layer_norm(x)
        return x, w


class OPTDecoder(CheckpointedLayers, decoder_step.Plans, nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        d, p = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(config.vocab_size, p, padding_idx=config.pad_token_id)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + 2, d)  # rows 0, 1: OPT's offset
        self.project_in = Linear(p, d, bias=False) if p != d else None
        self.project_out = Linear(d, p, bias=False) if p != d else None
        keep_final = config.do_layer_norm_before and not config._remove_final_layer_norm
        self.final_layer_norm = (nn.LayerNorm(d, elementwise_affine=config.layer_norm_elementwise_affine)
                                 if keep_final else None)
        self.layers = nn.ModuleList(OPTDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.plans = {}  # decoding steps in one kernel call (decoder_step.run): rows -> its Plan

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None, past_key_values: KVCache | None = None, use_cache: bool = False,
                position_ids: Tensor | None = None, output_attentions: bool = False,
                output_hidden_states: bool = False, return_dict: bool = True,
                **_: Any) -> BaseModelOutputWithPast | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        b, t = inputs_embeds.shape[:2]
        cache = past_key_values if past_key_values is not None else (KVCache(len(self.layers)) if use_cache else None)
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, past + t, dtype=torch.long, device=inputs_embeds.device)
        if attention_mask.shape != (b, past + t):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, past + t)} "
                             f"(past {past} + new {t} tokens)")
        if position_ids is None:  # padding does not move the positions of real tokens
            position_ids = (attention_mask.long().cumsum(1) * attention_mask.long() - 1)[:, past:]
        if int(position_ids.max()) + 2 >= self.embed_positions.num_embeddings:
            raise ValueError(f"sequence of {past + t} tokens exceeds the language model's "
                             f"{self.embed_positions.num_embeddings - 2} positions")
        if self.project_in is not None:
            inputs_embeds = self.project_in(inputs_embeds)
        x = inputs_embeds + self.embed_positions(position_ids + 2).to(inputs_embeds.dtype)  # (B, T, D)

        padded = not bool(attention_mask.all())
        mask = causal_mask(attention_mask, t, x.dtype) if (t > 1 or padded) else None
        hidden, attns = [], []
        y = None
        if cache is not None and t == 1 and not (output_attentions or output_hidden_states or self.training):
            y = decoder_step.run(self.layers, x, mask, None, cache, layer_norm_form, self.plans)
        for i, layer in enumerate(self.layers if y is None else ()):
            if output_hidden_states:
                hidden.append(x)
            x, w = layer(x, mask, cache, i, output_attentions) if cache is not None else \
                self.run(layer, x, mask, cache, i, output_attentions)
            attns.append(w)
        if cache is not None:
            cache.advance(t)
        x = x if y is None else y
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        if output_hidden_states:
            hidden.append(x)
        out = BaseModelOutputWithPast(
            last_hidden_state=x, past_key_values=cache,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(attns) if output_attentions else None)
        return out if return_dict else out.to_tuple()


class OPTModel(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        self.decoder = OPTDecoder(config)

    def forward(self, *args: Any, **kwargs: Any) -> BaseModelOutputWithPast | tuple:
        return self.decoder(*args, **kwargs)


class OPTForCausalLM(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        self.lm_head = Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.decoder.embed_tokens

    @property
    def base_model(self) -> OPTModel:
        return self.model

    @property
    def num_layers(self) -> int:
        return len(self.model.decoder.layers)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None, past_key_values: KVCache | None = None, use_cache: bool = False,
                labels: Tensor | None = None, position_ids: Tensor | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, logits_to_keep: int = 0, **_: Any) -> CausalLMOutputWithPast | tuple:
        """output_attentions / output_hidden_states / return_dict: None takes the config's setting."""
        output_attentions = resolve(output_attentions, self.config, "output_attentions")
        output_hidden_states = resolve(output_hidden_states, self.config, "output_hidden_states")
        return_dict = resolve(return_dict, self.config, "return_dict")
        out = self.model.decoder(input_ids, attention_mask, inputs_embeds, past_key_values, use_cache,
                                 position_ids, output_attentions, output_hidden_states)
        h = out.last_hidden_state
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)  # (B, T, V)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        res = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                     hidden_states=out.hidden_states, attentions=out.attentions)
        return res if return_dict else res.to_tuple()


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Token t predicts label t+1; -100 is ignored; mean over the counted tokens (fp32, as the reference)."""
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:].to(logits.device)
    return F.cross_entropy(logits.float().flatten(0, 1), shift.flatten(), ignore_index=-100)
