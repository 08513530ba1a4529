"""Bad input names its cause; fp16/bf16 loads match the reference's dtypes and numbers."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import IMAGE_TOKEN, NUM_QUERY, OPT, T5, config, reference_model

import blip2


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("opt")
    reference_model("Blip2ForConditionalGeneration", config(OPT)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5")
    reference_model("Blip2ForConditionalGeneration", config(T5)).save_pretrained(path)
    return path


def copy_checkpoint(src, dst, edit_config=None, edit_tensors=None):
    os.makedirs(dst, exist_ok=True)
    cfg = json.load(open(os.path.join(src, "config.json")))
    if edit_config:
        edit_config(cfg)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_unknown_text_model_type(opt_dir, tmp_path):
    path = copy_checkpoint(opt_dir, tmp_path, edit_config=lambda c: c["text_config"].update(model_type="llama"))
    with pytest.raises(blip2.ConfigError, match="text_config.model_type 'llama'"):
        blip2.Blip2ForConditionalGeneration.from_pretrained(path)


def test_missing_and_invalid_config(opt_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        blip2.Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(blip2.ConfigError, match="config.json is not valid JSON"):
        blip2.Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        blip2.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "nowhere")


def test_missing_and_misshapen_tensors(opt_dir, tmp_path):
    key = "qformer.encoder.layer.1.output_query.dense.weight"
    path = copy_checkpoint(opt_dir, tmp_path / "a", edit_tensors=lambda t: t.pop(key))
    with pytest.raises(blip2.CheckpointError, match=key):
        blip2.Blip2ForConditionalGeneration.from_pretrained(path)
    key2 = "language_projection.weight"
    path = copy_checkpoint(opt_dir, tmp_path / "b", edit_tensors=lambda t: t.update({key2: torch.zeros(3, 3)}))
    with pytest.raises(blip2.CheckpointError, match=rf"{key2} has shape \(3, 3\), the model expects \(24, 32\)"):
        blip2.Blip2ForConditionalGeneration.from_pretrained(path)


def test_corrupt_safetensors_header(opt_dir, tmp_path):
    copy_checkpoint(opt_dir, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + b"garbage")
    with pytest.raises(blip2.CheckpointError, match="model.safetensors is not a readable safetensors file"):
        blip2.Blip2ForConditionalGeneration.from_pretrained(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path, opt_dir):
    (tmp_path / "config.json").write_text((opt_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(blip2.CheckpointError, match="pytorch_model.bin: pickle checkpoints are never loaded"):
        blip2.Blip2ForConditionalGeneration.from_pretrained(tmp_path)


def test_pixel_values_of_wrong_shape(opt_dir):
    model = blip2.Blip2ForConditionalGeneration.from_pretrained(opt_dir)
    ids = torch.cat([torch.full((1, NUM_QUERY), IMAGE_TOKEN), torch.tensor([[2, 5, 6]])], 1)
    for bad, msg in ((torch.randn(1, 1, 16, 16), r"pixel_values must be a \(batch, 3, height, width\) tensor, got "
                      r"\(1, 1, 16, 16\)"),
                     (torch.randn(3, 16, 16), r"got \(3, 16, 16\)"),
                     (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "floating-point"),
                     (torch.randn(1, 3, 2, 2), "smaller than one 4x4 patch"),
                     (torch.randn(1, 3, 32, 32), "interpolate_pos_encoding=True"),
                     (None, "pixel_values is required")):
        with pytest.raises(ValueError, match=msg):
            model(pixel_values=bad, input_ids=ids)


def test_more_image_tokens_than_queries_is_an_error(opt_dir):
    """Fewer image tokens than num_query_tokens take the first queries, as the reference (tests/test_dropin.py);
    more than the images' queries cannot be filled."""
    model = blip2.Blip2ForConditionalGeneration.from_pretrained(opt_dir)
    ids = torch.cat([torch.full((2, NUM_QUERY + 1), IMAGE_TOKEN), torch.tensor([[2, 5, 6]] * 2)], 1)
    with pytest.raises(ValueError, match=r"the text holds 10 image tokens \(id 98\) but 2 image\(s\) give 8 query "
                                         r"embeddings \(4 each\)"):
        model(pixel_values=torch.randn(2, 3, 16, 16), input_ids=ids)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["opt", "t5"])
def test_half_precision_dtypes_and_logits(family, dtype, opt_dir, t5_dir):
    import transformers

    path = opt_dir if family == "opt" else t5_dir
    ref = transformers.Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
    ours = blip2.Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype)
    ref_dtypes = {n: p.dtype for n, p in ref.named_parameters()}
    ours_dtypes = {n: p.dtype for n, p in ours.named_parameters()}
    assert {n: d for n, d in ours_dtypes.items() if n in ref_dtypes} == ref_dtypes
    if dtype == torch.float16:
        assert ours.qformer.layernorm.weight.dtype == torch.float32 and ours.query_tokens.dtype == torch.float32
    ids = torch.cat([torch.full((1, NUM_QUERY), IMAGE_TOKEN), torch.tensor([[2, 5, 6, 7]])], 1)
    kw = dict(pixel_values=torch.randn(1, 3, 16, 16), input_ids=ids)
    if family == "t5":
        kw["decoder_input_ids"] = torch.tensor([[0, 5, 9]])
    with torch.no_grad():
        a, b = ref(**kw).logits, ours(**kw).logits
    assert a.dtype == b.dtype
    assert (a.float() - b.float()).abs().max().item() <= 0.05 * max(1.0, a.float().abs().max().item())
