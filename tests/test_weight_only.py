"""Weight-only int8 / int4 (blip2/weight_only.py): the layers against a float matmul, the fallback for widths
int4 cannot group, quantize -> save -> load, a checkpoint packed on another CPU, and the app serving int4."""

import json
import os
import subprocess
import sys
import types

import pytest
import tiny_checkpoints
import tiny_models
import torch

from bench import tiny_tokenizers
from blip2 import Blip2ForConditionalGeneration, QuantizationError
from blip2.weight_only import INT8_MATMUL_ROWS, WeightOnlyConfig, WeightOnlyLinear, int4_layout, quantization_flag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tolerances, relative (Frobenius) error of the output, measured over 20 random shapes each (/tmp script, worst):
# kernel vs the dequantized weight: bf16 activations 0.0030 (bf16 rounding of the output), float32 0.0000;
# vs the float weight: int8 0.0087, int4 0.107 (groups of 32-128, Gaussian weights). Margins ~2x / ~1.4x.
KERNEL_TOL = {torch.bfloat16: 6e-3, torch.float32: 1e-5}
QUANT_TOL = {8: 0.02, 4: 0.15}
# int8 from INT8_MATMUL_ROWS rows: activations quantized per row too (torch._int_mm), vs the dequantized weight
# 0.0084 (bf16) / 0.0082 (float32) worst over 20 random shapes (16-1008 x 64-1472, 4-300 rows); vs the float
# weight 0.0117.
INT8_MATMUL_TOL = 0.017


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits,group", [(8, 64), (4, 32), (4, 64), (4, 128)])
def test_layer_matches_a_float_matmul(bits, group, dtype):
    for n, k, m in [(48, 128, 1), (160, 256, 7), (1024, 384, 33), (256, 128, 100)]:  # 2 x 1 rows: int8's kernel
        w, b, x = torch.randn(n, k) * 0.05, torch.randn(n) * 0.1, torch.randn(2, m, k).to(dtype)
        x_before = x.clone()
        lin = WeightOnlyLinear(k, n, True, bits, group, dtype, device="cpu")
        lin.load("weight", w.to(dtype))
        lin.load("bias", b.to(dtype))
        y = lin(x).float()
        assert y.shape == (2, m, n) and lin(x).dtype == dtype
        bias = b.to(dtype).float()
        ref_kernel = x.float() @ lin.dequantize().t() + bias
        ref_float = x.float() @ w.to(dtype).float().t() + bias
        assert torch.equal(x, x_before)  # the input is left as it was
        tol = INT8_MATMUL_TOL if bits == 8 and 2 * m >= INT8_MATMUL_ROWS else KERNEL_TOL[dtype]
        assert ((y - ref_kernel).norm() / ref_kernel.norm()).item() < tol
        assert ((y - ref_float).norm() / ref_float.norm()).item() < QUANT_TOL[bits]


def test_int4_widths_that_do_not_group_fall_back_to_int8():
    from blip2.ops import Linear
    from blip2.weight_only import replace_linears

    model = torch.nn.Module()
    model.config = types.SimpleNamespace()
    model.language_model = torch.nn.Module()
    with torch.device("meta"):
        model.language_model.a = Linear(128, 64)  # fits groups of 64
        model.language_model.b = Linear(96, 64)  # 96 inputs: not a multiple of 64
        model.language_model.c = Linear(128, 40)  # 40 outputs: the kernel packs multiples of 16
    q = WeightOnlyConfig(bits=4, group_size=64)
    assert replace_linears(model, q) == ["language_model.a", "language_model.b", "language_model.c"]
    lm = model.language_model
    assert (lm.a.bits, lm.b.bits, lm.c.bits) == (4, 8, 8)
    assert q.fallbacks == ["language_model.b (64x96)", "language_model.c (40x128)"]
    with pytest.raises(QuantizationError, match="group_size=48"):
        WeightOnlyConfig(bits=4, group_size=48)


def test_names_flags_and_torchao_configs():
    assert WeightOnlyConfig.coerce("int4_weight_only") == WeightOnlyConfig(bits=4)
    assert WeightOnlyConfig.coerce("int8") is None  # "int8" alone stays bitsandbytes' 8-bit
    assert quantization_flag("int4") == "int4_weight_only" and quantization_flag("8bit") == "8bit"
    with pytest.raises(QuantizationError, match="--quantize 'int2'"):
        quantization_flag("int2")
    ao = types.SimpleNamespace(quant_method="torchao", quant_type="int4_weight_only",
                               quant_type_kwargs={"group_size": 128}, include_input_output_embeddings=False,
                               modules_to_not_convert=None)
    assert WeightOnlyConfig.coerce(ao) == WeightOnlyConfig(bits=4, group_size=128, include_lm_head=False)

    class Int8WeightOnlyConfig:  # torchao's config object, read by its class name
        pass

    ao.quant_type = Int8WeightOnlyConfig()
    assert WeightOnlyConfig.coerce(ao).bits == 8
    ao.quant_type = "int8_dynamic_activation_int8_weight"
    with pytest.raises(QuantizationError, match="int8_weight_only and int4_weight_only"):
        WeightOnlyConfig.coerce(ao)


@pytest.fixture(scope="module")
def opt64(tmp_path_factory):
    """A tiny OPT checkpoint whose language model is 64 wide (int4 groups fit; lm_head's vocabulary does not)."""
    d = str(tmp_path_factory.mktemp("opt64"))
    tiny_tokenizers.opt_tokenizer_dir(d)
    size, image_id = tiny_checkpoints.vocabulary(d)
    text = dict(tiny_models.OPT, vocab_size=size, eos_token_id=2, max_position_embeddings=128, hidden_size=64,
                ffn_dim=128, word_embed_proj_dim=64)
    cfg = tiny_models.config(text=text, vision=dict(tiny_models.VISION, image_size=tiny_checkpoints.IMAGE_SIZE),
                             image_token_index=image_id)
    tiny_models.reference_model("Blip2ForConditionalGeneration", cfg, 0).save_pretrained(d)
    return d, image_id


def generate(model, image_id):
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, tiny_checkpoints.IMAGE_SIZE, tiny_checkpoints.IMAGE_SIZE)
    ids = torch.tensor([[image_id] * tiny_models.NUM_QUERY + [2, 10, 11]] * 2)
    return model.generate(pixel_values=pixels.to(model.dtype), input_ids=ids, max_new_tokens=10).tolist()


@pytest.mark.parametrize("name", ["int8_weight_only", "int4_weight_only"])
def test_quantize_save_load_keeps_the_ids(opt64, tmp_path, name):
    path, image_id = opt64
    model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, quantization=name)
    lm = model.language_model
    bits = 8 if name.startswith("int8") else 4
    assert lm.model.decoder.layers[0].fc1.bits == bits and lm.lm_head.bits == 8  # vocabulary 421: int8 fallback
    assert lm.lm_head.weight.data_ptr() != lm.model.decoder.embed_tokens.weight.data_ptr()  # its own copy
    ids = generate(model, image_id)
    model.save_pretrained(tmp_path)
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["quantization_config"]["quant_method"] == "blip2_weight_only"
    assert saved["quantization_config"]["bits"] == bits and saved["text_config"]["tie_word_embeddings"] is False
    again = Blip2ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert type(again.language_model.lm_head) is WeightOnlyLinear
    assert generate(again, image_id) == ids
    other = "int4_weight_only" if bits == 8 else "int8_weight_only"
    with pytest.raises(QuantizationError, match="saved quantized"):
        Blip2ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16, quantization=other)


def test_int4_stays_close_to_bf16(opt64):
    """The logits of one forward stay close to bf16's (relative error measured over 3 inputs on this random model,
    whose Gaussian weights are int4's worst case: int8 1.6-1.7%, int4 (groups of 64) 18-19%; bounds ~2x / ~1.6x)."""
    path, image_id = opt64
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, tiny_checkpoints.IMAGE_SIZE, tiny_checkpoints.IMAGE_SIZE).bfloat16()
    ids = torch.tensor([[image_id] * tiny_models.NUM_QUERY + [2, 10, 11, 12]])
    logits = {}
    for name in (None, "int8_weight_only", "int4_weight_only"):
        m = Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, quantization=name)
        logits[name] = m(pixel_values=pixels, input_ids=ids).logits.float()
    ref = logits[None]
    for name, bound in (("int8_weight_only", 0.035), ("int4_weight_only", 0.3)):
        assert ((logits[name] - ref).norm() / ref.norm()).item() < bound


def test_a_checkpoint_packed_on_another_cpu_is_repacked(opt64, tmp_path):
    """Saved where torch packs int4 for AVX2 (or with no vector unit), loaded here: same ids as a model quantized
    here (the packing differs, the values do not)."""
    path, image_id = opt64
    here = Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, quantization="int4_weight_only")
    other = "avx2" if int4_layout() != 2 else "default"
    code = ("import sys, torch, blip2; m = blip2.Blip2ForConditionalGeneration.from_pretrained(sys.argv[1], "
            "dtype=torch.bfloat16, quantization='int4_weight_only'); m.save_pretrained(sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, path, str(tmp_path)], check=True, cwd=ROOT,
                   env={**os.environ, "ATEN_CPU_CAPABILITY": other, "PYTHONPATH": ROOT})
    layout = json.load(open(tmp_path / "config.json"))["quantization_config"]["int4_layout"]
    assert layout != int4_layout()
    loaded = Blip2ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    fc1 = loaded.language_model.model.decoder.layers[0].fc1
    assert torch.equal(fc1.weight, here.language_model.model.decoder.layers[0].fc1.weight)
    assert generate(loaded, image_id) == generate(here, image_id)


def test_weight_only_is_a_cpu_path(opt64, tmp_path):
    path, _ = opt64
    with pytest.raises(QuantizationError, match="runs on the CPU"):
        Blip2ForConditionalGeneration.from_pretrained(path, quantization="int8_weight_only",
                                                      device_map={"": "disk"}, offload_folder=str(tmp_path))


def test_the_app_serves_an_int4_model(tmp_path):
    """A Service with ModelSettings(quantize="int4") captions scenes of the embedded model's world and names their
    colours as the float model does (test_app_handlers: all but one of 6). The embedded model's lm_head (423 words)
    does not fit int4's blocks of 16: it runs int8, its other language-model linears int4."""
    import app_support as S

    from app.config import Limits
    from app.registry import GENERATION, ModelSettings
    from app.service import Service
    from blip2.train.world import caption_matches

    svc = Service(settings=ModelSettings(quantize="int4"), limits=Limits(**S.TEST_LIMITS))
    loaded = svc.get(svc.default[GENERATION], GENERATION)
    lm = loaded.model.language_model
    assert lm.model.decoder.layers[0].fc1.bits == 4 and lm.lm_head.bits == 8
    right, scenes = 0, S.one_object_scenes(6)
    with S.one_thread():
        for i, scene in enumerate(scenes):
            path = S.write(tmp_path, f"s{i}.png", S.png_bytes(scene.render(224)))
            result = list(svc.caption(svc.default[GENERATION], path, stream=False))[-1]
            right += caption_matches(scene, result.captions[0])["objects"][0]["color"]
    assert right >= len(scenes) - 1, f"{right}/{len(scenes)} captions named the right colour"


def test_memory_report_before_loading_matches_the_loaded_model(opt64):
    from blip2 import memory_report, model_memory

    path, _ = opt64
    for name in ("int8_weight_only", "int4_weight_only"):
        before = memory_report(path, dtype="bfloat16", quantization=name).total
        model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, quantization=name)
        assert before == model_memory(model).total
