"""PEFT LoRA fine-tuning on the embedded model (bench/lora.py, the README's "Fine-tune with LoRA"): adapters on the
Q-Former's and the language model's attention projections, with gradient checkpointing; a few steps lower the
loss, the adapter saves and loads back onto a fresh model, and the merged weights give the same logits."""

from peft import get_peft_model

import blip2
from bench import lora


def test_lora_finetuning_trains_saves_loads_and_merges(tmp_path):
    f = lora.finetune(lora.EMBEDDED, steps=6, batch=4, lr=2e-3, out=str(tmp_path))
    assert f["loss_after"] < 0.8 * f["loss_before"]
    assert 0 < f["trainable"] < 0.05 * f["total"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(f["adapter_files"])
    assert f["reloaded_max_diff"] == 0.0  # the saved adapter on a fresh model: the trained model's logits
    assert f["merged_max_diff"] <= 1e-4  # W + B @ A folded into one weight: float32 round-off only
    assert f["merged_type"] == "Blip2ForConditionalGeneration"


def test_lora_targets_the_qformer_and_language_model_attention():
    model = blip2.Blip2ForConditionalGeneration.from_pretrained(lora.EMBEDDED)
    peft_model = get_peft_model(model, lora.lora_config())
    wrapped = {n.split(".lora_A")[0] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert any("qformer" in n and "crossattention" in n for n in wrapped)
    assert any("language_model" in n and n.endswith("q_proj") for n in wrapped)
    assert not any("vision_model" in n for n in wrapped)
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)
