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
    """The language model's first generation step over a prompt of `tokens` embeddings. OPT: every decoder layer,
    then the logits of the last position (the layers run one by one because OPTDecoder.forward checks the
    positions' values, which a meta tensor does not hold; the position embedding it adds costs no FLOPs). T5: the
    encoder over the prompt, then one decoder step (with the cross-attention's keys and values) and its logits."""
    lm = model.language_model
    if model.config.is_encoder_decoder:
        x = torch.empty(1, tokens, lm.config.d_model, device=model.device, dtype=model.dtype)
        start = torch.zeros(1, 1, dtype=torch.long, device=x.device)

        def stack(blocks, h, context):  # block by block: T5Stack.forward checks the mask's values
            bias = blocks.block[0].layer[0].SelfAttention.position_bias(h.shape[1], h.shape[1], h.device)
            for i, block in enumerate(blocks.block):
                h = block(h, bias, context, None, None, i, False)[0]
            return blocks.final_layer_norm(h)

        def run():
            context = stack(lm.encoder, x, None)
            lm.lm_head(stack(lm.decoder, lm.shared(start), context))

        return counted(run)
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
