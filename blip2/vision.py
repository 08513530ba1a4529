"""The ViT image encoder (EVA-CLIP ViT-g/14 in the real checkpoints): Blip2VisionModel."""

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import Blip2VisionConfig
from .ops import BaseModelOutputWithPooling, CheckpointedLayers, activation, attention, resolve
from .pretrained import PretrainedMixin


class Blip2VisionEmbeddings(nn.Module):
    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        d, p = config.hidden_size, config.patch_size
        self.patch_size = p
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=p, stride=p)
        self.position_embedding = nn.Parameter(torch.zeros(1, (config.image_size // p) ** 2 + 1, d))

    def interpolated_positions(self, h: int, w: int) -> torch.Tensor:
        """Bicubic resize of the patch-position table to an (h // p, w // p) grid; CLS row kept."""
        table = self.position_embedding
        n = table.shape[1] - 1
        gh, gw = h // self.patch_size, w // self.patch_size
        if gh * gw == n and h == w:
            return table
        side = int(n**0.5)
        grid = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        b, _, h, w = pixel_values.shape
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.class_embedding.expand(b, 1, -1).to(dtype), x], dim=1)  # (B, N+1, D)
        pos = self.interpolated_positions(h, w) if interpolate_pos_encoding else self.position_embedding
        if pos.shape[1] < x.shape[1]:
            raise ValueError(
                f"pixel_values of size {h}x{w} give {x.shape[1] - 1} patches but the position table holds "
                f"{pos.shape[1] - 1}; pass interpolate_pos_encoding=True for larger images")
        return x + pos[:, : x.shape[1]].to(dtype)


class Blip2Attention(nn.Module):
    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(d, 3 * d, bias=config.qkv_bias)  # rows [q | k | v]; bias = [q_bias, 0, v_bias]
        self.projection = nn.Linear(d, d)
        self.eager = False  # attn_implementation="eager" (PretrainedMixin.set_attn_implementation)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out, w = attention(q, k, v, need_weights=need_weights, eager=self.eager)
        return self.projection(out), w


class Blip2MLP(nn.Module):
    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        self.act = activation(config.hidden_act)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Blip2EncoderLayer(nn.Module):
    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        self.self_attn = Blip2Attention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Blip2MLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        a, w = self.self_attn(self.layer_norm1(x), need_weights)
        x = x + a
        return x + self.mlp(self.layer_norm2(x)), w


class Blip2Encoder(CheckpointedLayers, nn.Module):
    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(Blip2EncoderLayer(config) for _ in range(config.num_hidden_layers))


class Blip2VisionModel(PretrainedMixin, nn.Module):
    config_class = Blip2VisionConfig
    checkpoint_prefix = "vision_model."

    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = Blip2VisionEmbeddings(config)
        self.encoder = Blip2Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.init_switches()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings

    def forward(self, pixel_values: Tensor | None = None, interpolate_pos_encoding: bool = False,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **_: Any) -> BaseModelOutputWithPooling | tuple:
        """output_attentions / output_hidden_states / return_dict: None takes the config's setting."""
        check_pixel_values(pixel_values, self.config)
        output_attentions = resolve(output_attentions, self.config, "output_attentions")
        output_hidden_states = resolve(output_hidden_states, self.config, "output_hidden_states")
        return_dict = resolve(return_dict, self.config, "return_dict")
        x = self.embeddings(pixel_values, interpolate_pos_encoding)  # (B, 1 + N, D)
        hidden, attns = [], []
        for layer in self.encoder.layers:
            if output_hidden_states:
                hidden.append(x)
            x, w = self.encoder.run(layer, x, output_attentions)
            attns.append(w)
        if output_hidden_states:
            hidden.append(x)
        x = self.post_layernorm(x)
        out = BaseModelOutputWithPooling(
            last_hidden_state=x,
            pooler_output=self.post_layernorm(x[:, 0]),  # LN twice on CLS: the reference's quirk
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(attns) if output_attentions else None,
        )
        return out if return_dict else out.to_tuple()


def check_pixel_values(pixel_values: Any, config: Blip2VisionConfig) -> None:
    if pixel_values is None:
        raise ValueError("pixel_values is required")
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values must be a (batch, 3, height, width) tensor, got {shape}")
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be a floating-point tensor, got {pixel_values.dtype}")
    if min(pixel_values.shape[2:]) < config.patch_size:
        raise ValueError(f"pixel_values of size {tuple(pixel_values.shape[2:])} are smaller than one "
                         f"{config.patch_size}x{config.patch_size} patch")
