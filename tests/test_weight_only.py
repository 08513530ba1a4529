"""Weight-only int8 / int4 (blip2/weight_only.py, blip2/native.py): the layers against a float matmul on both int4
kernels (blip2's, PyTorch's) and both builds of blip2's (AVX-512 VNNI, AVX2), the fallback for widths int4 cannot
group or a machine that cannot build the kernel, quantize -> save -> load, a checkpoint packed for another kernel,
and the app serving int4."""

import contextlib
import copy
import functools
import io
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
from blip2 import Blip2ForConditionalGeneration, QuantizationError, native
from blip2.io.errors import CheckpointError
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
# int4 on blip2's kernel: activations quantized per row and group of the weight's group size, vs the dequantized
# weight 0.0069 (bf16) / 0.0065 (float32) worst over 20 random shapes (16-1024 x 32-1536, 1-300 rows, groups
# 32-128); vs the float weight 0.106.
INT4_NATIVE_TOL = 0.014
needs_native = pytest.mark.skipif(not native.available(), reason="blip2's int4 kernel cannot be built here "
                                  "(a C++ compiler with OpenMP and an x86 CPU with AVX2)")


@pytest.fixture(params=["blip2", "aten"])
def kernels(request):
    """Each set of kernels in turn: blip2's (where they build) and PyTorch's (blip2's switched off)."""
    if request.param == "blip2" and not native.available():
        pytest.skip("blip2's kernels cannot be built here")
    with native.disabled() if request.param == "aten" else contextlib.nullcontext():
        yield request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits,group", [(8, 64), (4, 32), (4, 64), (4, 128)])
def test_layer_matches_a_float_matmul(bits, group, dtype, kernels):
    for n, k, m in [(48, 128, 1), (160, 256, 7), (1024, 384, 33), (256, 128, 100), (37, 100, 1)]:  # 2 x 1 rows:
        if bits == 4 and k % group:  # int8's decoding kernel (an odd width: vector chunks and a scalar tail)
            continue
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
        quantized_rows = kernels == "blip2" or 2 * m >= INT8_MATMUL_ROWS or k % 32  # int8 activations
        tol = INT8_MATMUL_TOL if bits == 8 and quantized_rows else KERNEL_TOL[dtype]
        tol = INT4_NATIVE_TOL if bits == 4 and kernels == "blip2" else tol
        assert lin.layout == (None if bits == 8 else 0 if kernels == "blip2" else int4_layout())
        assert ((y - ref_kernel).norm() / ref_kernel.norm()).item() < tol
        assert ((y - ref_float).norm() / ref_float.norm()).item() < QUANT_TOL[bits]


@needs_native
def test_the_avx2_build_gives_the_same_bits_as_this_one(tmp_path):
    """blip2's kernels built for AVX2 only (vpmaddubsw + vpmaddwd, no VNNI) run the same integer dot products and
    the same float steps per output as the build for this CPU: bit for bit the same output, at every row count."""
    avx2 = native.load(native.build(os.environ.get("CXX", "c++"), ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared",
                                                                   "-fPIC", "-std=c++17"), tmp_path))
    assert avx2.blip2_isa() == 1
    torch.manual_seed(0)
    int4 = WeightOnlyLinear(256, 96, False, 4, 64, torch.bfloat16, device="cpu")
    int4.load("weight", torch.randn(96, 256).bfloat16())
    int8 = WeightOnlyLinear(300, 37, False, 8, 64, torch.bfloat16, device="cpu")  # 300: 9 chunks of 32 + a tail
    int8.load("weight", torch.randn(37, 300).bfloat16())
    for m in (1, 2, 3, 9, 33):
        x = torch.randn(m, 256).bfloat16()
        here = native.int4_mm(x, int4.weight, int4.scales_and_zeros, 64)
        assert torch.equal(native.int4_mm(x, int4.weight, int4.scales_and_zeros, 64, lib=avx2), here)
        ref = x.float() @ int4.dequantize().t()
        assert ((here - ref).norm() / ref.norm()).item() < INT4_NATIVE_TOL
        x = torch.randn(m, 300).bfloat16()
        here = native.int8_mm(x, int8.weight, int8.scales)
        assert torch.equal(native.int8_mm(x, int8.weight, int8.scales, lib=avx2), here)
        ref = x.float() @ int8.dequantize().t()
        assert ((here - ref).norm() / ref.norm()).item() < INT8_MATMUL_TOL


AVX2_FLAGS = {"avx2": ("-O3", "-mavx2", "-mfma"), "avx2-vnni": ("-O3", "-march=native", "-mno-avx512f")}


@needs_native
@pytest.mark.parametrize("build", ["here", "avx2"])
def test_the_kernels_add_the_bias_and_round_as_torch_does(build, tmp_path):
    """The kernels write the model's dtype with the bias added (a decoding step's linears no longer run two torch
    ops after each kernel): bit for bit what the float32 product, .to(dtype) and + bias gave, for bfloat16 (rounded
    to nearest even, then the sum rounded again) and float32, at every row count, inf and NaN rows included."""
    lib = None
    if build != "here":
        flags = (*AVX2_FLAGS[build], "-fopenmp", "-shared", "-fPIC", "-std=c++17")
        lib = native.load(native.build(os.environ.get("CXX", "c++"), flags, tmp_path))
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        int4 = WeightOnlyLinear(256, 96, True, 4, 64, dtype, device="cpu")
        int4.load("weight", torch.randn(96, 256).to(dtype))
        int8 = WeightOnlyLinear(300, 37, True, 8, 64, dtype, device="cpu")
        int8.load("weight", torch.randn(37, 300).to(dtype))
        bias4, bias8 = torch.randn(96).to(dtype) * 10, torch.randn(37).to(dtype) * 10
        for m in (1, 2, 3, 9, 33):
            for k, layer, bias in ((256, int4, bias4), (300, int8, bias8)):
                x = torch.randn(m, k).to(dtype) * 3
                x[0, 0] = float("inf") if m > 2 else x[0, 0]
                x[-1, 1] = float("nan") if m > 1 else x[-1, 1]
                if layer.bits == 4:
                    run = functools.partial(native.int4_mm, x, layer.weight, layer.scales_and_zeros, 64, lib=lib)
                else:
                    run = functools.partial(native.int8_mm, x, layer.weight, layer.scales, lib=lib)
                product = run()  # float32
                assert product.dtype == torch.float32
                for b in (None, bias):
                    fused = run(bias=b, dtype=dtype)
                    ref = product.to(dtype) if b is None else product.to(dtype) + b
                    assert fused.dtype == dtype
                    assert torch.equal(fused.isnan(), ref.isnan())
                    assert torch.equal(fused.nan_to_num(), ref.nan_to_num()), (dtype, m, k, b is None)
    with pytest.raises(TypeError, match="bias"):
        native.int4_mm(x[:, :256], int4.weight, int4.scales_and_zeros, 64, bias=bias4, dtype=torch.bfloat16)


@needs_native
@pytest.mark.parametrize("build", ["here", *AVX2_FLAGS])
def test_int8_takes_a_weight_of_minus_128(build, tmp_path):
    """A weight of -128 (blip2's quantizer never writes it, a foreign checkpoint may) times a negative activation:
    exactly the integer dot product of the quantized row, as for every other weight (the kernel once negated the
    weight, and -(-128) wraps to -128 in a signed byte: the wrong sign, 14% relative error on random weights)."""
    lib = None
    if build != "here":
        flags = (*AVX2_FLAGS[build], "-fopenmp", "-shared", "-fPIC", "-std=c++17")
        lib = native.load(native.build(os.environ.get("CXX", "c++"), flags, tmp_path))
        assert lib.blip2_isa() == 1
    torch.manual_seed(0)
    w = torch.randint(-128, 128, (37, 300), dtype=torch.int8)
    w[:, :40] = -128  # in the vector chunks and, for column 299, in the scalar tail
    w[:, 299] = -128
    for m in (1, 2, 3, 5):
        x = torch.randn(m, 300)
        xs = x.abs().amax(1, keepdim=True) / 127
        ref = ((x / xs).round().double() @ w.double().t() * xs.double()).float()  # the kernel's own arithmetic
        y = native.int8_mm(x, w, torch.ones(37), lib=lib)
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-3), ((y - ref).norm() / ref.norm()).item()


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
def test_an_inf_or_nan_input_spoils_only_its_own_row(bits):
    """As in float arithmetic, not as an int8 cast of NaN (undefined): NaN out for that row, the others intact."""
    lin = WeightOnlyLinear(128, 32, False, bits, 64, torch.float32, device="cpu")
    lin.load("weight", torch.randn(32, 128))
    x = torch.randn(3, 128)
    x[0, 5], x[2, 100] = float("inf"), float("nan")
    y = lin(x)
    assert y[0].isnan().all() and y[2].isnan().all() and y[1].isfinite().all()
    assert torch.equal(y[1], lin(x[1:2])[0])


@needs_native
def test_an_outlier_channel_coarsens_only_its_group():
    """Rows with 3 channels 20x the others (as OPT's LayerNorm outputs have a few): int4's activations, one scale per
    group of 64, stay as close to the dequantized weight's product as without outliers (measured 0.012), where one
    scale per row (int8's prompt pass) errs 5x more (0.058; bf16 activations)."""
    torch.manual_seed(0)
    int4 = WeightOnlyLinear(2560, 256, False, 4, 64, torch.bfloat16, device="cpu")
    int8 = WeightOnlyLinear(2560, 256, False, 8, 64, torch.bfloat16, device="cpu")
    w = torch.randn(256, 2560).bfloat16()
    int4.load("weight", w)
    int8.load("weight", w)
    x = torch.randn(8, 2560)
    x[:, [7, 300, 1200]] *= 20
    x = x.bfloat16()

    def err(lin):
        ref = x.float() @ lin.dequantize().t()
        return ((lin(x).float() - ref).norm() / ref.norm()).item()

    assert err(int4) < INT4_NATIVE_TOL < err(int8)


@needs_native
def test_the_kernel_names_what_it_cannot_take():
    w, sz = torch.zeros(32, 64, dtype=torch.uint8), torch.zeros(2, 2, 16, 2, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="float16"):
        native.int4_mm(torch.zeros(1, 128, dtype=torch.float16), w, sz, 64)
    with pytest.raises(ValueError, match="does not fit 100 inputs in groups of 64"):
        native.int4_mm(torch.zeros(1, 100), w, sz, 64)
    with pytest.raises(ValueError, match=r"scales_and_zeros \(2, 2, 16, 2\), expected \(2, 4, 16, 2\)"):
        native.int4_mm(torch.zeros(1, 128), w, sz, 32)
    with pytest.raises(ValueError, match="contiguous"):
        native.int4_mm(torch.zeros(1, 128), w, sz.transpose(0, 1), 64)
    assert native.int4_mm(torch.zeros(0, 128), w, sz, 64).shape == (0, 32)
    with pytest.raises(ValueError, match=r"weight \(32, 64\) torch.uint8 and scales \(32,\) do not fit 64 inputs"):
        native.int8_mm(torch.zeros(1, 64), w, torch.ones(32))


def test_without_a_compiler_pytorchs_kernels_serve(monkeypatch, tmp_path, caplog):
    """No C++ compiler (or one that fails): a warning that names why, and PyTorch's kernels serve."""
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("BLIP2_KERNEL_CACHE", str(tmp_path / "cache"))
    with caplog.at_level("WARNING", logger="blip2.native"):
        assert not native.available() and int4_layout() != 0
    assert "could not be built" in caplog.text and "PyTorch's kernels are used" in caplog.text
    lin = WeightOnlyLinear(128, 32, False, 4, 64, torch.float32, device="cpu")
    lin.load("weight", torch.randn(32, 128))
    x = torch.randn(3, 128)
    ref = x @ lin.dequantize().t()
    assert ((lin(x) - ref).norm() / ref.norm()).item() < KERNEL_TOL[torch.float32]


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


SAVE_INT4 = ("import sys, torch, blip2; m = blip2.Blip2ForConditionalGeneration.from_pretrained(sys.argv[1], "
             "dtype=torch.bfloat16, quantization='int4_weight_only'); m.save_pretrained(sys.argv[2])")


def run_with(env: dict, code: str, *args: str) -> None:
    subprocess.run([sys.executable, "-c", code, *args], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": ROOT, **env})


def test_a_checkpoint_packed_for_another_kernel_is_repacked(opt64, tmp_path):
    """Saved where PyTorch's int4 kernel serves (blip2's switched off, and torch packing for another instruction
    set than here where it can), loaded here: the same weights and ids as a model quantized here (the packing
    differs, the values do not)."""
    path, image_id = opt64
    here = Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, quantization="int4_weight_only")
    other = "avx2" if int4_layout() != 2 else "default"
    run_with({"ATEN_CPU_CAPABILITY": other, "BLIP2_KERNELS": "aten"}, SAVE_INT4, path, str(tmp_path))
    layout = json.load(open(tmp_path / "config.json"))["quantization_config"]["int4_layout"]
    assert layout != int4_layout()
    loaded = Blip2ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    fc1, fc1_here = loaded.language_model.model.decoder.layers[0].fc1, here.language_model.model.decoder.layers[0].fc1
    assert torch.equal(fc1.weight, fc1_here.weight) and torch.equal(fc1.scales_and_zeros, fc1_here.scales_and_zeros)
    assert generate(loaded, image_id) == generate(here, image_id)


@needs_native
def test_a_checkpoint_saved_by_blip2s_kernel_loads_where_pytorchs_serves(opt64, tmp_path):
    """The reverse: saved here in layout 0, loaded with blip2's kernel switched off: repacked for PyTorch's, with
    the weights and ids of a model quantized there."""
    path, image_id = opt64
    Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16,
                                                  quantization="int4_weight_only").save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "config.json"))["quantization_config"]["int4_layout"] == 0
    code = ("import sys, torch, blip2, test_weight_only as t\n"
            "a = blip2.Blip2ForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.bfloat16)\n"
            "b = blip2.Blip2ForConditionalGeneration.from_pretrained(sys.argv[2], dtype=torch.bfloat16, "
            "quantization='int4_weight_only')\n"
            "fa, fb = (m.language_model.model.decoder.layers[0].fc1 for m in (a, b))\n"
            "assert fa.layout == fb.layout != 0, (fa.layout, fb.layout)\n"
            "assert torch.equal(fa.weight, fb.weight) and torch.equal(fa.scales_and_zeros, fb.scales_and_zeros)\n"
            "assert t.generate(a, int(sys.argv[3])) == t.generate(b, int(sys.argv[3]))\n")
    paths = f"{ROOT}:{ROOT}/tests:{ROOT}/tests/support"  # test_weight_only imports the helpers in tests/support
    run_with({"BLIP2_KERNELS": "aten", "PYTHONPATH": paths}, code, str(tmp_path), path, str(image_id))


def test_weight_only_is_a_cpu_path(opt64, tmp_path):
    path, _ = opt64
    with pytest.raises(QuantizationError, match="runs on the CPU"):
        Blip2ForConditionalGeneration.from_pretrained(path, quantization="int8_weight_only",
                                                      device_map={"": "disk"}, offload_folder=str(tmp_path))


def test_the_app_serves_an_int4_model(tmp_path, one_thread):
    """A Service with ModelSettings(quantize="int4") captions scenes of the embedded model's world and names their
    colours as the float model does (test_app_handlers: all but one of 6). The embedded model's lm_head (423 words)
    does not fit int4's blocks of 16: it runs int8, its other language-model linears int4."""
    import app_support as S

    from app.config import Limits
    from app.registry import GENERATION, ModelSettings
    from app.service import Service
    from blip2.train.world import caption_matches

    svc = Service(settings=ModelSettings(quantize="int4"), limits=Limits(**S.TEST_LIMITS))
    loaded = svc.registry.get(svc.registry.default[GENERATION], GENERATION)
    lm = loaded.model.language_model
    assert lm.model.decoder.layers[0].fc1.bits == 4 and lm.lm_head.bits == 8
    right, scenes = 0, S.one_object_scenes(6)
    for i, scene in enumerate(scenes):
        path = S.write(tmp_path, f"s{i}.png", S.png_bytes(scene.render(224)))
        result = list(svc.caption(svc.registry.default[GENERATION], path, stream=False))[-1]
        right += caption_matches(scene, result.captions[0])["objects"][0]["color"]
    assert right >= len(scenes) - 1, f"{right}/{len(scenes)} captions named the right colour"


def test_memory_report_before_loading_matches_the_loaded_model(opt64):
    from blip2 import memory_report, model_memory

    path, _ = opt64
    for name in ("int8_weight_only", "int4_weight_only"):
        before = memory_report(path, dtype="bfloat16", quantization=name).total
        model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, quantization=name)
        assert before == model_memory(model).total


@pytest.fixture(scope="module")
def saved_quantized(opt64, tmp_path_factory):
    """{bits: a checkpoint saved quantized (int8, int4) from opt64}."""
    path, _ = opt64
    out = {}
    for bits in (8, 4):
        out[bits] = str(tmp_path_factory.mktemp(f"int{bits}"))
        Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16,
                                                      quantization=f"int{bits}_weight_only").save_pretrained(out[bits])
    return out


def edited(src: str, dst, tensors=None, **config) -> str:
    """A copy of checkpoint `src` with quantization_config entries set (None: removed) and tensors changed."""
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    cfg = json.load(open(dst / "config.json"))
    for k, v in config.items():
        cfg["quantization_config"].pop(k) if v is None else cfg["quantization_config"].__setitem__(k, v)
    json.dump(cfg, open(dst / "config.json", "w"))
    if tensors:
        state = load_file(dst / "model.safetensors")
        state.update(tensors(state))
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return str(dst)


def test_a_saved_int8_checkpoint_without_int4_layout_loads_whole(opt64, saved_quantized, tmp_path):
    """int8 has no packing: a config without int4_layout loads every scale (they were once left on the meta device
    and the first caption died with a segmentation fault)."""
    path, image_id = opt64
    src = saved_quantized[8]
    loaded = Blip2ForConditionalGeneration.from_pretrained(edited(src, tmp_path / "c", int4_layout=None),
                                                           dtype=torch.bfloat16)
    assert not any(p.is_meta for p in loaded.parameters())
    assert generate(loaded, image_id) == generate(Blip2ForConditionalGeneration.from_pretrained(src), image_id)


@pytest.mark.parametrize("layout", [7, -1, "0", None, True])
def test_an_unknown_int4_layout_is_refused(saved_quantized, tmp_path, layout):
    with pytest.raises(QuantizationError, match=r"int4_layout is .*not one of the packings blip2 writes"):
        Blip2ForConditionalGeneration.from_pretrained(edited(saved_quantized[4], tmp_path / "c", int4_layout=layout))


def test_a_packed_weight_of_another_dtype_is_refused(saved_quantized, tmp_path):
    """A packed int4 weight stored as int32 in the right shape (it once loaded and captioned garbage)."""
    key = "language_model.model.decoder.layers.0.fc1.weight"
    path = edited(saved_quantized[4], tmp_path / "c", tensors=lambda s: {key: s[key].int()})
    with pytest.raises(CheckpointError, match=rf"{key} is int32, the model expects uint8"):
        Blip2ForConditionalGeneration.from_pretrained(path)


@pytest.mark.parametrize("group_size", [0, -8, 12, 512])
def test_a_group_size_the_kernels_cannot_take_is_named(group_size):
    with pytest.raises(QuantizationError, match=f"group_size={group_size}"):
        WeightOnlyConfig(bits=4, group_size=group_size)
    if native.available():
        with pytest.raises(ValueError, match="does not fit"):
            native.int4_mm(torch.randn(1, 64), torch.zeros(16, 32, dtype=torch.uint8),
                           torch.zeros(1, 1, 16, 2, dtype=torch.bfloat16), group_size)


@needs_native
def test_the_kernels_refuse_tensors_that_were_never_loaded():
    """A weight or scales on the meta device (data pointer 0): a clear error, not a segmentation fault."""
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match="never loaded"):
        native.int8_mm(x, torch.zeros(16, 64, dtype=torch.int8), torch.empty(16, device="meta"))
    with pytest.raises(ValueError, match="never loaded"):
        native.int4_mm(x, torch.empty(16, 32, dtype=torch.uint8, device="meta"),
                       torch.zeros(1, 1, 16, 2, dtype=torch.bfloat16), 64)


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
def test_a_layer_checks_its_weight_once_and_again_when_it_changes(bits, monkeypatch):
    """A layer binds blip2's kernel to its weight at its first call (native.int4_call / int8_call check it) and keeps
    the binding across decoding steps; a parameter whose memory is replaced (.data =) is checked and bound again:
    the new weight's output, never the freed memory's, and a weight moved to the meta device is refused."""
    torch.manual_seed(0)
    layers = []
    for _ in range(2):
        lin = WeightOnlyLinear(128, 32, True, bits, 64, torch.bfloat16, device="cpu")
        lin.load("weight", torch.randn(32, 128).bfloat16())
        lin.load("bias", torch.randn(32).bfloat16())
        layers.append(lin)
    a, b = layers
    x = torch.randn(1, 128).bfloat16()
    binds = []
    bind = native.int4_call if bits == 4 else native.int8_call
    monkeypatch.setattr(native, bind.__name__, lambda *args, **kw: binds.append(1) or bind(*args, **kw))
    first = a(x)
    assert torch.equal(a(x), first) and len(binds) == 1  # bound once
    scales = "scales_and_zeros" if bits == 4 else "scales"
    for name in ("weight", scales, "bias"):
        getattr(a, name).data = getattr(b, name).data.clone()
    assert torch.equal(a(x), b(x)) and len(binds) == 3  # bound again (a, then b's first call)
    copied = copy.deepcopy(a)  # a copy binds its own memory (a binding holds ctypes pointers: not copyable)
    assert torch.equal(copied(x), b(x)) and copied.call[0] != a.call[0]
    buffer = io.BytesIO()
    torch.save(a, buffer)
    assert torch.equal(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)(x), b(x))
    a.weight = torch.nn.Parameter(torch.empty_like(a.weight, device="meta"), requires_grad=False)
    with pytest.raises(ValueError, match="never loaded"):
        a(x)


def test_every_load_ends_with_every_parameter_in_place(opt64, monkeypatch):
    """io.load.check_loaded, the last step of every load: a parameter a layer's loader skipped (left on the meta
    device) or stored in another dtype than its kernel needs is named, never handed to a kernel."""
    path, _ = opt64
    skip = WeightOnlyLinear.load

    def loses_biases(self, attr, t, layout=None):
        if attr != "bias":
            skip(self, attr, t, layout)

    monkeypatch.setattr(WeightOnlyLinear, "load", loses_biases)
    with pytest.raises(CheckpointError, match=r"did not load whole: .*bias was never read"):
        Blip2ForConditionalGeneration.from_pretrained(path, quantization="int8_weight_only")

    def wrong_dtype(self, attr, t, layout=None):
        skip(self, attr, t, layout)
        if attr == "weight":
            self.weight = torch.nn.Parameter(self.weight.int(), requires_grad=False)

    monkeypatch.setattr(WeightOnlyLinear, "load", wrong_dtype)
    with pytest.raises(CheckpointError, match=r"weight is int32, its kernel needs int8"):
        Blip2ForConditionalGeneration.from_pretrained(path, quantization="int8_weight_only")


@pytest.mark.parametrize("faster", [True, False])
def test_the_vision_tower_is_quantized_where_this_cpu_runs_the_kernels_faster(opt64, tmp_path, monkeypatch, faster):
    """include_vision=None (the default): decided at load by timing the model's own vision MLP matrix at its rows
    (weight_only.vision_prefers_int, here replaced by its answer); a saved copy records what was done and loads so."""
    from blip2 import weight_only

    path, image_id = opt64
    asked = []
    monkeypatch.setattr(weight_only, "vision_prefers_int", lambda *a: asked.append(a) or faster)
    model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, quantization="int4_weight_only")
    fc1 = model.vision_model.encoder.layers[0].mlp.fc1
    side, patch = (getattr(model.config.vision_config, k) for k in ("image_size", "patch_size"))
    assert asked[0] == (fc1.out_features, fc1.in_features, (side // patch) ** 2 + 1, 4, 64, torch.bfloat16)
    vision = [type(m) is WeightOnlyLinear for n, m in model.named_modules()
              if n.startswith(("vision_model.", "qformer.", "language_projection")) and hasattr(m, "in_features")]
    assert vision and all(v == faster for v in vision)
    ids = generate(model, image_id)
    model.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "config.json"))["quantization_config"]["include_vision"] is faster
    monkeypatch.setattr(weight_only, "vision_prefers_int", lambda *a: not faster)  # another CPU: loads as saved
    again = Blip2ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert (type(again.vision_model.encoder.layers[0].mlp.fc1) is WeightOnlyLinear) == faster
    assert generate(again, image_id) == ids


def test_vision_prefers_int_times_both_and_says_so(caplog):
    from blip2 import weight_only

    weight_only.vision_prefers_int.cache_clear()
    with caplog.at_level("INFO", logger="blip2.weight_only"):
        answer = weight_only.vision_prefers_int(256, 128, 65, 4, 64, torch.bfloat16)
    assert isinstance(answer, bool)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "vision tower and Q-Former: " in said and "256 x 128 MLP matrix at 65 rows" in said and "AMX" in said
    weight_only.vision_prefers_int.cache_clear()
