"""Tiny random BLIP-2 checkpoints written by the reference `transformers` (the test oracle)."""

import torch

VISION = dict(hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4, image_size=16,
              patch_size=4, qkv_bias=True, layer_norm_eps=1e-6, hidden_act="gelu")
QFORMER = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
               max_position_embeddings=32, cross_attention_frequency=2, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
OPT = dict(model_type="opt", vocab_size=99, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
           max_position_embeddings=64, pad_token_id=1, bos_token_id=2, eos_token_id=50, dropout=0.0,
           attention_dropout=0.0, word_embed_proj_dim=24)
T5 = dict(model_type="t5", vocab_size=99, d_model=24, d_kv=6, d_ff=40, num_layers=2, num_decoder_layers=2,
          num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
          feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False, pad_token_id=0,
          eos_token_id=1, bos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0)
IMAGE_TOKEN = 98
NUM_QUERY = 4


def randomize(model, seed=0, std=0.2):
    """Re-randomise every parameter (zero-initialised query tokens and biases would hide errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1.0 + noise if "norm" in name.lower() and name.endswith("weight") else noise)
    return model


def config(text=OPT, vision=VISION, qformer=QFORMER, **kw):
    from transformers import Blip2Config

    kw.setdefault("num_query_tokens", NUM_QUERY)
    kw.setdefault("image_token_index", IMAGE_TOKEN)
    return Blip2Config(vision_config=dict(vision), qformer_config=dict(qformer), text_config=dict(text), **kw)


def itm_config(**kw):
    from transformers import Blip2Config

    kw.setdefault("num_query_tokens", NUM_QUERY)
    kw.setdefault("image_text_hidden_size", 8)
    return Blip2Config(vision_config=dict(VISION), qformer_config=dict(QFORMER, use_qformer_text_input=True), **kw)


def reference_model(cls_name, cfg, seed=0):
    import transformers

    model = getattr(transformers, cls_name)(cfg)
    return randomize(model, seed).eval()


def save_reference(model, path, **kw):
    model.save_pretrained(path, **kw)
    return path
