"""Real checkpoints at real size: hub ids through the Hugging Face cache, damaged files, device maps with CPU and
disk offload, 8/4-bit quantization (bitsandbytes, CPU backend) and the memory report. Tiny random reference
checkpoints written by transformers."""

import json
import os
import shutil
import sys
import types

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tiny_checkpoints import fake_hub_cache
from tiny_models import IMAGE_TOKEN, NUM_QUERY, OPT, T5, config, randomize, reference_model

import blip2
from blip2.io.errors import CheckpointError, CheckpointNotFoundError, DeviceMapError
from blip2.io.hub import resolve_checkpoint
from blip2.memory import memory_report, model_memory
from blip2.ops import Linear
from blip2.quantization import QuantizationConfig, QuantizationError

Model = blip2.Blip2ForConditionalGeneration
LAYER1 = "language_model.model.decoder.layers.1"
# a wider LM (and realistic 0.02 weights), where quantization noise averages out as in real models
WIDE = dict(OPT, hidden_size=256, ffn_dim=1024, word_embed_proj_dim=256, vocab_size=512)


def inputs(name="opt", b=2):
    g = torch.Generator().manual_seed(3)
    ids = torch.cat([torch.full((b, NUM_QUERY), IMAGE_TOKEN), torch.randint(3, 90, (b, 6), generator=g)], 1)
    kw = dict(pixel_values=torch.randn(b, 3, 16, 16, generator=g), input_ids=ids)
    if name == "t5":
        kw["decoder_input_ids"] = torch.randint(3, 90, (b, 4), generator=g)
    return kw


def logits(model, name="opt"):
    with torch.no_grad():
        return model(**inputs(name)).logits.float()


def greedy(model):
    return model.generate(pixel_values=inputs()["pixel_values"], max_new_tokens=6)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """opt: sharded into several files; t5: one file; wide: OPT 256 wide with 0.02-scale weights."""
    import transformers

    root = tmp_path_factory.mktemp("ckpts")
    reference_model("Blip2ForConditionalGeneration", config(OPT)).save_pretrained(root / "opt", max_shard_size="40KB")
    reference_model("Blip2ForConditionalGeneration", config(T5)).save_pretrained(root / "t5")
    wide = randomize(transformers.Blip2ForConditionalGeneration(config(WIDE)), std=0.02).eval()
    wide.save_pretrained(root / "wide")
    return root


@pytest.fixture(scope="module")
def plain(ckpts):
    return {name: Model.from_pretrained(ckpts / name) for name in ("opt", "t5", "wide")}


def test_sharded_checkpoint(ckpts, plain, tmp_path):
    assert len(list((ckpts / "opt").glob("model-*-of-*.safetensors"))) >= 3
    plain["opt"].save_pretrained(tmp_path)  # one file
    assert torch.equal(logits(Model.from_pretrained(tmp_path)), logits(plain["opt"]))


# --- hub ids through the Hugging Face cache -------------------------------------------------------------------


@pytest.fixture
def hub(tmp_path, ckpts, monkeypatch):
    """HF_HOME with tiny-org/blip2-opt cached; offline."""
    home = tmp_path / "hf_home"
    snap = fake_hub_cache(home / "hub", "tiny-org/blip2-opt", ckpts / "opt")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home, snap


def no_chain(error):
    return error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_hub_id_from_the_cache_offline(hub, plain, monkeypatch):
    home, snap = hub
    model = Model.from_pretrained("tiny-org/blip2-opt")
    assert torch.equal(logits(model), logits(plain["opt"]))
    assert resolve_checkpoint("tiny-org/blip2-opt") == snap
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    assert resolve_checkpoint("tiny-org/blip2-opt") == snap
    monkeypatch.delenv("HF_HUB_CACHE")
    assert resolve_checkpoint("tiny-org/blip2-opt", cache_dir=home / "hub") == snap


def test_offline_without_a_cached_copy(hub):
    with pytest.raises(CheckpointNotFoundError) as e:
        Model.from_pretrained("Salesforce/blip2-opt-2.7b")
    msg = str(e.value)
    assert "Salesforce/blip2-opt-2.7b is not in the Hugging Face cache" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "hf download Salesforce/blip2-opt-2.7b" in msg and "local checkpoint directory" in msg
    assert no_chain(e.value)  # one message, not a stack of hub / HTTP errors
    with pytest.raises(CheckpointNotFoundError, match="checkpoint directory ./nowhere/at-all not found"):
        Model.from_pretrained("./nowhere/at-all")


def test_hub_errors_become_one_clear_message(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    with pytest.raises(CheckpointNotFoundError, match="neither a local directory nor a valid Hugging Face hub id"):
        resolve_checkpoint("not a repo id!", local_files_only=True)
    response = types.SimpleNamespace(headers={}, status_code=401, request=None)
    cases = [(RepositoryNotFoundError("401 Client Error", response=response),
              "org/missing: no such repository on the Hugging Face Hub, or it is private"),
             (GatedRepoError("403 Client Error", response=response), "org/missing is a gated repository.*HF_TOKEN"),
             (LocalEntryNotFoundError("connection error"), "could not be fetched.*hf download org/missing")]
    for error, message in cases:
        def fail(*args, error=error, **kwargs):
            raise error
        monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
        with pytest.raises(CheckpointError, match=message) as e:
            Model.from_pretrained("org/missing", local_files_only=False)
        assert no_chain(e.value)


def test_cut_off_download_in_the_cache(hub):
    _, snap = hub
    shard = sorted(f for f in os.listdir(snap) if f.endswith(".safetensors"))[1]
    blob = os.path.realpath(os.path.join(snap, shard))
    os.truncate(blob, os.path.getsize(blob) - 100)
    with pytest.raises(CheckpointError, match=rf"{shard} is truncated: .* but tensor .* ends at byte .*"
                                              r"hf download tiny-org/blip2-opt --force-download"):
        Model.from_pretrained("tiny-org/blip2-opt")


# --- damaged local checkpoints ---------------------------------------------------------------------------------


def damaged(ckpts, tmp_path, how):
    path = tmp_path / "ckpt"
    shutil.copytree(ckpts / "opt", path)
    shards = sorted(path.glob("model-*.safetensors"))
    index = path / "model.safetensors.index.json"
    if how == "truncated":
        os.truncate(shards[0], os.path.getsize(shards[0]) // 2)
    elif how == "corrupt header":
        data = bytearray(shards[1].read_bytes())
        data[8:20] = b"#not json!#!"
        shards[1].write_bytes(bytes(data))
    elif how == "missing shard":
        shards[-1].unlink()
    elif how == "index mismatch":
        index.write_text(index.read_text().replace('"language_projection.bias"', '"renamed.bias"'))
    elif how in ("missing tensor", "misshapen tensor"):
        key = "language_projection.bias"
        weight_map = json.loads(index.read_text())["weight_map"]
        shard = path / weight_map[key]
        t = load_file(shard)
        if how == "missing tensor":
            del t[key], weight_map[key]
            index.write_text(json.dumps({"weight_map": weight_map}))
        else:
            t[key] = torch.zeros(3, 3)
        save_file(t, shard, metadata={"format": "pt"})
    elif how == ".bin only":
        for f in shards + [index]:
            f.unlink()
        (path / "pytorch_model.bin").write_bytes(b"pickle")
    return path, shards


@pytest.mark.parametrize("how, message", [
    ("truncated", r"model-00001-of-\d+\.safetensors is truncated: \d+ bytes, but tensor \S+ ends at byte"),
    ("corrupt header", r"model-00002-of-\d+\.safetensors is not a readable safetensors file: its JSON header is "
                       r"corrupt"),
    ("missing shard", r"shard .*model-0000(\d)-of-0000\1\.safetensors listed in .*index.json is missing"),
    ("index mismatch", r"index.json maps tensor renamed.bias to model-0000\d-of-0000\d.safetensors, which does not "
                       r"hold it"),
    ("missing tensor", r"checkpoint .*model-00001-of-\d+.safetensors lacks 1 tensor\(s\): language_projection.bias"),
    ("misshapen tensor", r"model-0000\d-of-\d+\.safetensors: tensor language_projection.bias has shape \(3, 3\), the "
                         r"model expects \(24,\)"),
    (".bin only", r"no model.safetensors or model.safetensors.index.json in .*pytorch_model.bin: pickle "
                  r"checkpoints are never loaded"),
])
def test_damaged_checkpoint_names_file_and_key(ckpts, tmp_path, how, message):
    path, _ = damaged(ckpts, tmp_path, how)
    with pytest.raises(CheckpointError, match=message):
        Model.from_pretrained(path)


# --- device maps: CPU and disk offload -------------------------------------------------------------------------


def cpu_map(**extra):
    return {"vision_model": "cpu", "query_tokens": "cpu", "qformer": "cpu", "language_projection": "cpu",
            "language_model": "cpu", **extra}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_disk_offload_same_logits_and_ids(ckpts, plain, tmp_path, dtype):
    ref = plain["opt"] if dtype == "float32" else Model.from_pretrained(ckpts / "opt", dtype=dtype)
    model = Model.from_pretrained(ckpts / "opt", dtype=dtype, device_map=cpu_map(**{LAYER1: "disk"}),
                                  offload_folder=tmp_path)
    assert model.get_submodule(LAYER1).fc1.weight.is_meta  # really on disk between calls
    assert model.device == torch.device("cpu")  # where inputs go
    assert model.hf_device_map[LAYER1] == "disk"
    assert torch.equal(logits(model), logits(ref))
    assert torch.equal(greedy(model), greedy(ref))
    lm = model.language_model
    assert lm.lm_head.weight is lm.model.decoder.embed_tokens.weight and not lm.lm_head.weight.is_meta
    # fp32 = the checkpoint's dtype: its safetensors are the offload source, nothing is copied; bf16: converted
    layer = [f"{LAYER1}.{n}.dat" for n, _ in ref.get_submodule(LAYER1).named_parameters()]
    assert sorted(os.listdir(tmp_path)) == sorted(["index.json"] + (layer if dtype == "bfloat16" else []))


def test_t5_block_with_position_table_on_disk(ckpts, plain, tmp_path):
    block = "language_model.encoder.block.0"  # holds relative_attention_bias, read outside the block's forward
    model = Model.from_pretrained(ckpts / "t5", device_map=cpu_map(**{block: "disk"}), offload_folder=tmp_path)
    assert torch.equal(logits(model, "t5"), logits(plain["t5"], "t5"))


def test_auto_device_map_with_max_memory(ckpts, plain, tmp_path):
    size = model_memory(plain["opt"]).total
    kw = dict(device_map="auto", max_memory={"cpu": int(size * 0.6)})
    model = Model.from_pretrained(ckpts / "opt", offload_folder=tmp_path, **kw)
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    lm = model.language_model
    assert lm.lm_head.weight is lm.model.decoder.embed_tokens.weight  # the tie survives dispatch
    assert torch.equal(logits(model), logits(plain["opt"]))
    assert torch.equal(greedy(model), greedy(plain["opt"]))
    with pytest.raises(DeviceMapError, match=r"does not fit in max_memory=.*would go to disk \(.*language_model.*"
                                             r"no offload_folder was given. Fix: pass offload_folder="):
        Model.from_pretrained(ckpts / "opt", **kw)


def test_tied_weights_must_share_a_device(ckpts):
    with pytest.raises(DeviceMapError, match="tied parameters .*embed_tokens.weight.*lm_head.weight.* on cpu, disk"):
        Model.from_pretrained(ckpts / "opt", device_map=cpu_map(**{"language_model.lm_head": "disk"}),
                              offload_folder="unused")
    with pytest.raises(DeviceMapError, match="device_map gives no device for query_tokens: add an entry for it"):
        Model.from_pretrained(ckpts / "opt", device_map={"vision_model": "cpu"})


def test_nothing_half_loaded_stays_behind(ckpts, plain, tmp_path, monkeypatch):
    import blip2.io.load as loading

    calls, seen = [], []
    last = len(dict(plain["opt"].named_parameters()))  # tensors read by a load
    real = loading.read_tensor

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == last:
            seen.extend(os.listdir(tmp_path))
            raise OSError("disk went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "read_tensor", flaky)
    with pytest.raises(OSError, match="disk went away"):
        Model.from_pretrained(ckpts / "opt", dtype="bfloat16", device_map=cpu_map(**{LAYER1: "disk"}),
                              offload_folder=tmp_path)
    assert seen and os.listdir(tmp_path) == []  # offloaded files were written, then removed


# --- dtypes and 8/4-bit quantization ---------------------------------------------------------------------------


def bnb_modules(model):
    import bitsandbytes as bnb

    return {n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))}


@pytest.mark.parametrize("name", ["opt", "t5"])
def test_quantized_modules_are_the_language_model_linears(ckpts, name):
    import transformers

    model = Model.from_pretrained(ckpts / name, quantization="8bit", dtype="float16")
    lm_linears = {n for n, m in plain_linears(ckpts / name) if n.startswith("language_model.")}
    expected = {n for n in lm_linears if not n.endswith((".lm_head", ".wo"))}
    assert bnb_modules(model) == expected and expected
    for n, m in model.named_modules():  # vision, Q-Former, projection, lm_head, T5 wo: untouched
        if type(m) in (nn.Linear, Linear):
            fp32 = n.startswith("qformer.") or n.endswith(".wo")  # kept in fp32 under fp16, as the reference
            assert m.weight.dtype == (torch.float32 if fp32 else torch.float16), n
    assert model.query_tokens.dtype == torch.float32
    # include_vision: exactly the layers the reference's bitsandbytes integration quantizes
    ours = Model.from_pretrained(ckpts / name, quantization=QuantizationConfig(bits=4, include_vision=True))
    ref = transformers.Blip2ForConditionalGeneration.from_pretrained(
        ckpts / name, quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True), device_map="cpu")
    assert bnb_modules(ours) == bnb_modules(ref)
    # the reference's argument names work too
    bnb8 = transformers.BitsAndBytesConfig(load_in_8bit=True)
    same = Model.from_pretrained(ckpts / name, quantization_config=bnb8, torch_dtype=torch.float16)
    assert bnb_modules(same) == expected and same.vision_model.post_layernorm.weight.dtype == torch.float16


def plain_linears(path):
    return [(n, m) for n, m in Model.from_pretrained(path).named_modules() if type(m) in (nn.Linear, Linear)]


def bnb_config(quant):
    """The same BitsAndBytesConfig for both loaders; transformers is told to skip what blip2 keeps in full
    precision (it would also quantize the vision tower and language_projection)."""
    import transformers

    skip = ["vision_model", "qformer", "language_projection", "lm_head"]
    if quant == "8bit":
        return transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, llm_int8_skip_modules=skip)


def quant_types(model):
    """Module name -> "int8" or the 4-bit data type bitsandbytes holds in the weight."""
    return {n: "int8" if not hasattr(model.get_submodule(n).weight, "quant_type") else
            model.get_submodule(n).weight.quant_type for n in bnb_modules(model)}


@pytest.mark.parametrize("quant", ["8bit", "nf4", "fp4"])
def test_quantized_model_equals_the_reference_with_the_same_bitsandbytes_config(ckpts, quant):
    """blip2 and transformers load the 256-wide model with one BitsAndBytesConfig: the same layers with the same
    data type, and logits and newly generated ids equal. Measured: logits bit-identical (relative difference 0.0)
    for all three; an nf4 model against the fp4 reference (a mixed-up data type) differs by 0.25, so equality
    is asserted."""
    import transformers

    config = bnb_config(quant)
    ours = Model.from_pretrained(ckpts / "wide", quantization_config=config)
    ref = transformers.Blip2ForConditionalGeneration.from_pretrained(ckpts / "wide", quantization_config=config,
                                                                      device_map="cpu")
    types = quant_types(ours)
    assert types == quant_types(ref) and set(types.values()) == {"int8" if quant == "8bit" else quant}
    assert torch.equal(logits(ours), logits(ref))
    kw = {k: v for k, v in inputs().items() if k != "decoder_input_ids"}
    new, ref_new = (m.generate(**kw, max_new_tokens=8)[:, -8:] for m in (ours, ref))
    assert torch.equal(new, ref_new)


def test_4bit_computes_with_its_dequantized_weights(ckpts):
    """The 4-bit model equals the fp32 model holding the dequantized weights (up to its bf16 CPU kernel)."""
    import bitsandbytes.functional as F

    for quant in ("nf4", "fp4"):
        model = Model.from_pretrained(ckpts / "wide", quantization=quant)
        ref = Model.from_pretrained(ckpts / "wide")
        for n in bnb_modules(model):
            w = model.get_submodule(n).weight
            ref.get_submodule(n).weight.data = F.dequantize_4bit(w.data, w.quant_state).float()
        a, b = logits(model), logits(ref)
        assert ((a - b).norm() / b.norm()).item() < 0.01


def test_quantization_that_cannot_run_here(ckpts, monkeypatch):
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"})
    with pytest.raises(QuantizationError, match=r"bitsandbytes .* cannot quantize on cpu .*Fix:"):
        Model.from_pretrained(ckpts / "opt", quantization="4bit")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(QuantizationError, match=r"needs bitsandbytes.*pip install 'bitsandbytes>=0.47'"):
        Model.from_pretrained(ckpts / "opt", quantization="8bit")
    with pytest.raises(QuantizationError, match="use '8bit', '4bit'"):
        Model.from_pretrained(ckpts / "opt", quantization="3bit")


# --- memory report ---------------------------------------------------------------------------------------------


def bnb_state_bytes(model):
    """Bytes of the bitsandbytes scales and codes (get_memory_footprint counts only the packed weights)."""
    total = 0
    for n in bnb_modules(model):
        w = model.get_submodule(n).weight
        qs = getattr(w, "quant_state", None)
        parts = [getattr(w, "SCB", None)] + ([] if qs is None else [qs.absmax, qs.code, qs.offset] + (
            [] if qs.state2 is None else [qs.state2.absmax, qs.state2.code]))
        total += sum(t.numel() * t.element_size() for t in parts if t is not None)
    return total


@pytest.mark.parametrize("kw", [dict(dtype="float32"), dict(dtype="bfloat16"), dict(dtype="float16"),
                                dict(dtype="bfloat16", quantization="8bit"), dict(quantization="4bit")])
def test_memory_report_before_equals_after(ckpts, kw):
    """memory_report (read from the headers) = model_memory (the loaded model) = the reference loaded the same
    way: its get_memory_footprint() plus the bitsandbytes states it holds (measured equal to the byte)."""
    import transformers

    before = memory_report(ckpts / "opt", **kw)
    after = model_memory(Model.from_pretrained(ckpts / "opt", **kw))
    ref_kw = {"dtype": getattr(torch, kw.get("dtype", "float32"))}
    if "quantization" in kw:
        skip = ["vision_model", "qformer", "language_projection", "lm_head"]  # what blip2 keeps in full precision
        ref_kw["quantization_config"] = transformers.BitsAndBytesConfig(
            llm_int8_skip_modules=skip, **({"load_in_8bit": True} if kw["quantization"] == "8bit" else
                                           {"load_in_4bit": True, "bnb_4bit_use_double_quant": True}))
    ref = transformers.Blip2ForConditionalGeneration.from_pretrained(ckpts / "opt", device_map="cpu", **ref_kw)
    assert before.total == after.total == ref.get_memory_footprint() + bnb_state_bytes(ref)
    for part, row in before.as_dict()["parts"].items():
        assert row["bytes"] == after.as_dict()["parts"][part]["bytes"], part
    table = before.table()
    assert "vision_model" in table and "language_model.layers" in table and "tied to language_model.embed" in table


def test_memory_report_per_device(ckpts, tmp_path):
    dm = cpu_map(**{LAYER1: "disk"})
    before = memory_report(ckpts / "opt", dtype="bfloat16", device_map=dm)
    model = Model.from_pretrained(ckpts / "opt", dtype="bfloat16", device_map=dm, offload_folder=tmp_path)
    after = model_memory(model)
    assert before.devices == after.devices and set(after.devices) == {"cpu", "disk"}
    layer1 = sum(p.numel() * 2 for p in model.get_submodule(LAYER1).parameters())
    assert after.devices["disk"] == layer1
    assert before.as_dict()["parts"]["qformer"]["dtypes"] == ["bfloat16"]


def test_memory_report_of_a_hub_id_reads_remote_headers_only(ckpts, tmp_path, monkeypatch):
    """A hub id that is not cached: config.json and the safetensors headers (huggingface_hub's
    get_safetensors_metadata, HTTP range requests) -- no weights are downloaded."""
    import huggingface_hub

    from blip2.io.safetensors import read_header

    def headers(repo, **kw):
        files = {}
        for f in sorted((ckpts / "opt").glob("*.safetensors")):
            files[f.name] = types.SimpleNamespace(tensors={k: types.SimpleNamespace(
                dtype="F32", shape=list(i.shape), data_offsets=(i.start, i.end)) for k, i in read_header(f).items()})
        return types.SimpleNamespace(files_metadata=files)

    def config(repo, filename, **kw):
        os.makedirs(tmp_path / "cfg", exist_ok=True)
        return shutil.copy(ckpts / "opt" / filename, tmp_path / "cfg" / filename)

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", headers)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", config)
    remote = memory_report("org/remote", dtype="bfloat16", local_files_only=False, cache_dir=tmp_path / "cache")
    assert remote.total == memory_report(ckpts / "opt", dtype="bfloat16").total
