"""Parity at the real checkpoints' widths (ViT-g 1408/16 heads at 224 px, Q-Former 768 with 32 queries,
OPT-2.7B 2560/32 heads/ffn 10240) with one or two layers each, so real dimensions run on a CPU."""

import pytest
import torch
from tiny_models import randomize

import blip2

VISION = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=1, num_attention_heads=16, image_size=224,
              patch_size=14)
QFORMER = dict(num_hidden_layers=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # 768, 12 heads
OPT_27B = dict(model_type="opt", hidden_size=2560, num_hidden_layers=1, num_attention_heads=32, ffn_dim=10240,
               vocab_size=512, word_embed_proj_dim=2560, eos_token_id=50, dropout=0.0)


@pytest.fixture(scope="module")
def real_width_pair(tmp_path_factory):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    cfg = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=OPT_27B, num_query_tokens=32,
                      image_token_index=511)
    ref = randomize(Blip2ForConditionalGeneration(cfg), std=0.02).eval()
    path = tmp_path_factory.mktemp("real-widths")
    ref.save_pretrained(path, max_shard_size="200MB")  # sharded, as the real checkpoints are
    return ref, blip2.Blip2ForConditionalGeneration.from_pretrained(path)


def test_real_widths_logits_and_greedy_ids(real_width_pair):
    ref, ours = real_width_pair
    assert ours.query_tokens.shape == (1, 32, 768)
    assert ours.vision_model.embeddings.position_embedding.shape == (1, 257, 1408)
    assert ours.qformer.encoder.layer[0].crossattention.attention.key.weight.shape == (768, 1408)
    g = torch.Generator().manual_seed(0)
    px = torch.randn(1, 3, 224, 224, generator=g)
    ids = torch.cat([torch.full((1, 32), 511), torch.tensor([[2, 17, 99, 301, 7]])], 1)
    with torch.no_grad():
        a = ref(pixel_values=px, input_ids=ids)
        b = ours(pixel_values=px, input_ids=ids)
    assert (a.logits - b.logits).abs().max().item() <= 1e-4
    assert (a.vision_outputs.last_hidden_state - b.vision_outputs.last_hidden_state).abs().max().item() <= 1e-4
    assert torch.equal(ref.generate(pixel_values=px, max_new_tokens=5), ours.generate(pixel_values=px,
                                                                                      max_new_tokens=5))
