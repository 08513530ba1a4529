"""FLOPs of BLIP-2 model passes, counted by torch.utils.flop_counter.FlopCounterMode (every matmul, convolution and
attention product the pass runs) on a model built on the meta device: no weights, no time."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from blip2 import Blip2Config, Blip2ForConditionalGeneration
from blip2.io.load import empty_init
from blip2.ops import causal_mask


def meta_model(config: Blip2Config) -> Blip2ForConditionalGeneration:
    with empty_init():
        model = Blip2ForConditionalGeneration(config)
    return model.eval().requires_grad_(False)


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def encode_flops(model: Blip2ForConditionalGeneration) -> int:
    """One image through the vision tower, the Q-Former and the language projection (model.image_features)."""
    side = model.config.vision_config.image_size
    pixels = torch.empty(1, 3, side, side, device=model.device, dtype=model.dtype)
    return counted(lambda: model.image_features(pixels))


def prompt_flops(model: Blip2ForConditionalGeneration, tokens: int) -> int:
    """The OPT language model's first generation step over a prompt of `tokens` embeddings: every decoder layer,
    then the logits of the last position. The layers are run one by one because OPTDecoder.forward checks the
    positions' values, which a meta tensor does not hold (the position embedding it adds costs no FLOPs)."""
    lm = model.language_model
    decoder = lm.model.decoder
    x = torch.empty(1, tokens, lm.config.word_embed_proj_dim, device=model.device, dtype=model.dtype)
    mask = causal_mask(torch.ones(1, tokens, dtype=torch.long, device=x.device), tokens, x.dtype)

    def run():
        h = x if decoder.project_in is None else decoder.project_in(x)
        for i, layer in enumerate(decoder.layers):
            h = layer(h, mask, None, i)[0]
        h = h if decoder.project_out is None else decoder.project_out(h)
        lm.lm_head(h[:, -1:])

    return counted(run)
