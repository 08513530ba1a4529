"""Drop-in for real (issue 29): what code written for the reference's BLIP-2 classes asks of them beyond the
numbers, each compared with the reference (transformers, the oracle) where it has an answer: configs built from
keywords, image-token scattering, attention implementations, loading options, fine-tuning switches, processor
and config surface."""

import json
import os
import sys

import pytest
import torch
from tiny_checkpoints import shared_checkpoint
from tiny_models import IMAGE_TOKEN, NUM_QUERY, OPT, T5, config, itm_config, reference_model

import blip2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pair(tmp_path_factory, text_config):
    """(reference model, blip2's loaded from what the reference saved, the directory)."""
    path = tmp_path_factory.mktemp(text_config["model_type"])
    ref = reference_model("Blip2ForConditionalGeneration", config(text_config))
    ref.save_pretrained(path)
    return ref, blip2.Blip2ForConditionalGeneration.from_pretrained(path), path


@pytest.fixture(scope="module")
def opt_pair(tmp_path_factory):
    return pair(tmp_path_factory, OPT)


@pytest.fixture(scope="module")
def t5_pair(tmp_path_factory):
    return pair(tmp_path_factory, T5)


def pixels(b=2, seed=1):
    return torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def text(b=2, t=3, seed=2):
    return torch.randint(3, 90, (b, t), generator=torch.Generator().manual_seed(seed))


# --- the behaviour differences ---------------------------------------------------------------------------------


def test_default_configs_build_models_as_the_reference():
    """The doc's first example: Blip2Config() (OPTConfig resolves word_embed_proj_dim to hidden_size)."""
    import transformers

    assert blip2.OPTConfig().word_embed_proj_dim == transformers.OPTConfig().word_embed_proj_dim == 768
    assert blip2.OPTConfig(hidden_size=64).word_embed_proj_dim == 64
    cfg = blip2.Blip2Config(vision_config=blip2.Blip2VisionConfig(num_hidden_layers=1),
                            qformer_config=blip2.Blip2QFormerConfig(num_hidden_layers=1),
                            text_config=blip2.OPTConfig(num_hidden_layers=1))
    with torch.device("meta"):
        ours = blip2.Blip2ForConditionalGeneration(cfg)
        ref = transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(
            vision_config=dict(num_hidden_layers=1), qformer_config=dict(num_hidden_layers=1),
            text_config=dict(num_hidden_layers=1)))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert blip2.Blip2Config().text_config.model_type == "opt"


@pytest.mark.parametrize("counts", [(2, 2), (0, 4), (3, 4), (4, 3), (1, 0), (8, 0)])
def test_image_tokens_scattered_as_the_reference(opt_pair, counts):
    """Any number of image tokens per row: the first queries fill them in order (rows share the B x Q queries),
    as the reference's masked_scatter."""
    ref, ours, _ = opt_pair
    rows = [torch.cat([torch.full((1, n), IMAGE_TOKEN), text(1, 3, seed=i)], 1) for i, n in enumerate(counts)]
    width = max(r.shape[1] for r in rows)
    ids = torch.stack([torch.cat([torch.full((width - r.shape[1],), 1), r[0]]) for r in rows])
    mask = (ids != 1).long()
    with torch.no_grad():
        a = ref(pixel_values=pixels(), input_ids=ids, attention_mask=mask).logits
        b = ours(pixel_values=pixels(), input_ids=ids, attention_mask=mask).logits
    assert a.shape == b.shape
    assert (a - b)[mask.bool()].abs().max() <= 1e-4


def test_no_image_tokens_gives_text_only_logits(opt_pair, t5_pair):
    for ref, ours, _ in (opt_pair, t5_pair):
        kw = dict(pixel_values=pixels(), input_ids=text())
        if ours.config.is_encoder_decoder:
            kw["decoder_input_ids"] = text(2, 2, seed=5)
        with torch.no_grad():
            a, b = ref(**kw).logits, ours(**kw).logits
        assert a.shape == b.shape == (2, kw.get("decoder_input_ids", kw["input_ids"]).shape[1], 99)
        assert (a - b).abs().max() <= 1e-4


def test_more_image_tokens_than_queries_errs_where_the_reference_does(opt_pair):
    ref, ours, _ = opt_pair
    ids = torch.cat([torch.full((2, NUM_QUERY * 2 + 1), IMAGE_TOKEN), text()], 1)  # 18 > 2 x 4
    with pytest.raises(RuntimeError):
        ref(pixel_values=pixels(), input_ids=ids)
    with pytest.raises(ValueError, match="holds 18 image tokens"):
        ours(pixel_values=pixels(), input_ids=ids)


def test_image_tokens_found_in_inputs_embeds(opt_pair):
    """Without input_ids the reference finds the image token's embedding among inputs_embeds; so does blip2."""
    ref, ours, _ = opt_pair
    ids = torch.cat([torch.full((2, NUM_QUERY), IMAGE_TOKEN), text()], 1)
    kw = dict(pixel_values=pixels(), attention_mask=torch.ones_like(ids), max_new_tokens=4)
    with torch.no_grad():
        a = ref.generate(inputs_embeds=ref.get_input_embeddings()(ids), **kw)
        b = ours.generate(inputs_embeds=ours.get_input_embeddings()(ids), **kw)
    assert torch.equal(a, b)


def test_tokenizer_resolves_hub_ids_as_the_processor(tmp_path, monkeypatch):
    from tiny_checkpoints import fake_hub_cache

    fake_hub_cache(tmp_path / "hub", "Salesforce/blip2-opt-2.7b", shared_checkpoint("opt"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    tok = blip2.Blip2Tokenizer.from_pretrained("Salesforce/blip2-opt-2.7b")
    proc = blip2.Blip2Processor.from_pretrained("Salesforce/blip2-opt-2.7b")
    assert tok("a photo of a cat")["input_ids"] == proc.tokenizer("a photo of a cat")["input_ids"]
    with pytest.raises(blip2.CheckpointNotFoundError, match="not in the Hugging Face cache"):
        blip2.Blip2Tokenizer.from_pretrained("Salesforce/blip2-opt-6.7b")


# --- 1. loading options and attention implementations -----------------------------------------------------------


def test_attn_implementation_eager_and_sdpa(opt_pair):
    """from_pretrained(attn_implementation=...), set_attn_implementation, config._attn_implementation; the
    eager and sdpa logits agree within 1e-5 (measured on these float32 tiny models, logits up to 3.3: 1.7e-6 for
    OPT, 2.5e-6 for T5), and the attention weights equal the reference's eager ones (measured: 0 difference)."""
    ref, _, path = opt_pair
    eager = blip2.Blip2ForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    sdpa = blip2.Blip2ForConditionalGeneration.from_pretrained(pretrained_model_name_or_path=path)
    assert eager.config._attn_implementation == eager.config.text_config._attn_implementation == "eager"
    assert sdpa.config._attn_implementation == sdpa.config.vision_config._attn_implementation == "sdpa"
    ids = torch.cat([torch.full((2, NUM_QUERY), IMAGE_TOKEN), text()], 1)
    with torch.no_grad():
        a = eager(pixel_values=pixels(), input_ids=ids)
        b = sdpa(pixel_values=pixels(), input_ids=ids)
        assert (a.logits - b.logits).abs().max() <= 1e-5
        ref.set_attn_implementation("eager")  # the reference gives attention weights only from its eager path
        r = ref(pixel_values=pixels(), input_ids=ids, output_attentions=True)
        rv = ref.vision_model(pixels(), output_attentions=True)  # (its top-level call leaves the parts' out)
        ref.set_attn_implementation("sdpa")
        for model in (eager, sdpa):
            o = model(pixel_values=pixels(), input_ids=ids, output_attentions=True)
            for x, y in ((rv.attentions, o.vision_outputs.attentions),
                         (r.language_model_outputs.attentions, o.language_model_outputs.attentions)):
                assert len(x) == len(y) and all((p - q).abs().max() <= 1e-5 for p, q in zip(x, y))
    sdpa.set_attn_implementation("eager")
    assert sdpa.language_model.model.decoder.layers[0].self_attn.eager and sdpa.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="flash_attention_2' is not supported"):
        blip2.Blip2ForConditionalGeneration.from_pretrained(path, attn_implementation="flash_attention_2")


def test_attn_implementation_t5(t5_pair):
    _, _, path = t5_pair
    eager = blip2.Blip2ForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    sdpa = blip2.Blip2ForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa")
    assert eager.language_model.decoder.block[0].layer[0].SelfAttention.eager
    kw = dict(pixel_values=pixels(), input_ids=text(), decoder_input_ids=text(2, 3, seed=4))
    with torch.no_grad():
        assert (eager(**kw).logits - sdpa(**kw).logits).abs().max() <= 1e-5


def test_output_loading_info_and_state_dict(opt_pair, tmp_path):
    ref, ours, path = opt_pair
    model, info = blip2.Blip2ForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    _, ref_info = type(ref).from_pretrained(path, output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert sorted(ref_info["missing_keys"]) == sorted(ref_info["unexpected_keys"]) == []
    vision, info = blip2.Blip2VisionModel.from_pretrained(path, output_loading_info=True)
    assert info["unexpected_keys"] == [] and vision.name_or_path == str(path)
    # state_dict=: as the reference, with config= and no checkpoint
    sd = {k: v + 1.0 for k, v in ours.state_dict().items()}
    other = blip2.Blip2ForConditionalGeneration.from_pretrained(None, config=ours.config, state_dict=sd)
    ref_other = type(ref).from_pretrained(None, config=ref.config,
                                          state_dict={k: v + 1.0 for k, v in ref.state_dict().items()})
    ids = torch.cat([torch.full((1, NUM_QUERY), IMAGE_TOKEN), text(1)], 1)
    with torch.no_grad():
        a = ref_other(pixel_values=pixels(1), input_ids=ids).logits
        b = other(pixel_values=pixels(1), input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-3 * a.abs().max()
    _, info = blip2.Blip2VisionModel.from_pretrained(None, config=ours.config.vision_config, state_dict=sd,
                                                     output_loading_info=True)
    assert info["unexpected_keys"] == []
    with pytest.raises(blip2.CheckpointError, match="state_dict lacks 1 tensor"):
        blip2.Blip2ForConditionalGeneration.from_pretrained(
            None, config=ours.config, state_dict={k: v for k, v in sd.items() if k != "query_tokens"})
    with pytest.raises(ValueError, match="state_dict cannot be passed together with a checkpoint"):
        blip2.Blip2ForConditionalGeneration.from_pretrained(path, state_dict=sd)


# --- 3. fine-tuning switches --------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients(opt_pair, t5_pair):
    for _, loaded, path in (opt_pair, t5_pair):
        grads = []
        for on in (False, True):
            model = type(loaded).from_pretrained(path).train()
            if on:
                model.gradient_checkpointing_enable()
                assert model.is_gradient_checkpointing
            ids = torch.cat([torch.full((2, NUM_QUERY), IMAGE_TOKEN), text()], 1)
            kw = dict(pixel_values=pixels(), input_ids=ids, labels=ids.masked_fill(ids == IMAGE_TOKEN, -100))
            if model.config.is_encoder_decoder:
                kw["labels"] = text(2, 3, seed=7)
            model(**kw).loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            model.gradient_checkpointing_disable()
            assert not model.is_gradient_checkpointing
        assert grads[0].keys() == grads[1].keys()
        assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_enable_input_require_grads_with_reentrant_checkpointing(opt_pair):
    """Frozen model, reentrant checkpointing: without input grads nothing trains through the layers; with
    enable_input_require_grads() (what PEFT calls) the gradient reaches a parameter inside a checkpointed layer."""
    _, _, path = opt_pair
    model = blip2.Blip2ForConditionalGeneration.from_pretrained(path).train()
    for p in model.parameters():
        p.requires_grad_(False)
    q = model.language_model.model.decoder.layers[0].self_attn.q_proj.weight
    q.requires_grad_(True)
    model.gradient_checkpointing_enable({"use_reentrant": True})
    ids = torch.cat([torch.full((2, NUM_QUERY), IMAGE_TOKEN), text()], 1)
    model.enable_input_require_grads()
    model(pixel_values=pixels(), input_ids=ids, labels=ids).loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    model.disable_input_require_grads()
    assert model._require_grads_hooks == []


def test_resize_token_embeddings_equals_the_reference(opt_pair, t5_pair):
    for ref, ours, _ in (opt_pair, t5_pair):
        import copy

        ref, ours = copy.deepcopy(ref), copy.deepcopy(ours)
        torch.manual_seed(5)
        a = ref.resize_token_embeddings(103, pad_to_multiple_of=8)
        torch.manual_seed(5)
        b = ours.resize_token_embeddings(103, pad_to_multiple_of=8)
        assert a.weight.shape == b.weight.shape == (104, 24)
        assert torch.equal(a.weight, b.weight)
        assert torch.equal(ref.get_output_embeddings().weight, ours.get_output_embeddings().weight)
        assert ours.config.text_config.vocab_size == ref.config.text_config.vocab_size == 104
        tied = ref.get_output_embeddings().weight is ref.get_input_embeddings().weight
        assert (ours.get_output_embeddings().weight is ours.get_input_embeddings().weight) == tied
        ours.resize_token_embeddings(90, mean_resizing=False)  # shrinking keeps the first rows
        assert torch.equal(ours.get_input_embeddings().weight, a.weight[:90])
    with pytest.raises(ValueError, match="new_num_tokens must be a positive integer"):
        ours.resize_token_embeddings(0)


def test_num_parameters_and_embeddings_accessors(opt_pair):
    import transformers

    ref, ours, _ = opt_pair
    for kw in ({}, {"exclude_embeddings": True}):
        assert ours.num_parameters(**kw) == ref.num_parameters(**kw)
    ours.vision_model.requires_grad_(False)
    ref.vision_model.requires_grad_(False)
    assert ours.num_parameters(only_trainable=True) == ref.num_parameters(only_trainable=True)
    ours.vision_model.requires_grad_(True)
    ref.vision_model.requires_grad_(True)
    cfg = itm_config()
    ref_itm = {c: getattr(transformers, c)(cfg) for c in
               ("Blip2ForImageTextRetrieval", "Blip2TextModelWithProjection", "Blip2VisionModelWithProjection")}
    ours_cfg = blip2.Blip2Config.from_dict(cfg.to_dict())
    for name, r in ref_itm.items():
        o = getattr(blip2, name)(ours_cfg)
        assert o.main_input_name == r.main_input_name, name
        assert o.get_output_embeddings() is None and r.get_output_embeddings() is None
        assert type(o.get_input_embeddings()).__name__ == type(r.get_input_embeddings()).__name__, name
        assert o.num_parameters() == r.num_parameters(), name
    assert ours.main_input_name == ref.main_input_name == "pixel_values"
    assert type(ours.vision_model.get_input_embeddings()).__name__ == "Blip2VisionEmbeddings"
    assert ours.qformer.get_input_embeddings() is None and ours.qformer.main_input_name == "input_ids"
    assert ours.get_output_embeddings() is ours.language_model.lm_head


# --- 4. processor ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["opt", "itm"])
def test_processor_surface_equals_the_reference(family):
    import transformers

    path = shared_checkpoint(family)
    ref, ours = transformers.Blip2Processor.from_pretrained(path), blip2.Blip2Processor.from_pretrained(path)
    assert json.loads(json.dumps(ref.to_dict())) == ours.to_dict()
    assert json.loads(ref.to_json_string()) == json.loads(ours.to_json_string())
    assert ours.model_input_names == ref.model_input_names
    assert ours.get_attributes() == type(ref).get_attributes() == ["image_processor", "tokenizer"]


def test_processor_overrides_and_a_foreign_tokenizer():
    import transformers
    from PIL import Image

    path = shared_checkpoint("opt")
    image_processor = blip2.BlipImageProcessor.from_pretrained(path)
    image_processor.size = {"height": 48, "width": 48}
    tok = transformers.AutoTokenizer.from_pretrained(path)  # not ours
    ours = blip2.Blip2Processor.from_pretrained(path, image_processor=image_processor, tokenizer=tok)
    ref = transformers.Blip2Processor.from_pretrained(path, tokenizer=transformers.AutoTokenizer.from_pretrained(path))
    assert ours.tokenizer is tok and ours.image_processor is image_processor
    img = Image.new("RGB", (40, 30), "red")
    a = ref(images=img, text=["a red square", "hi"], padding=True, return_tensors="pt")
    b = ours(images=img, text=["a red square", "hi"], padding=True, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    assert b["pixel_values"].shape == (1, 3, 48, 48)
    assert ours.batch_decode(b["input_ids"], skip_special_tokens=True) == \
        ref.batch_decode(a["input_ids"], skip_special_tokens=True)


# --- 5. configs -----------------------------------------------------------------------------------------------

sys.path.insert(0, ROOT)
from bench.checkpoints import hub_config  # noqa: E402  (Salesforce/blip2-*'s Hub config.json)

OPT_27B = {**hub_config("opt-2.7b"), "torch_dtype": "float32"}  # the Hub file names its dtype

# Salesforce/blip2-flan-t5-xl's Hub config.json
FLAN_T5_XL = {
    "architectures": ["Blip2ForConditionalGeneration"], "initializer_factor": 1.0, "initializer_range": 0.02,
    "model_type": "blip-2", "num_query_tokens": 32, "image_token_index": 32100,
    "qformer_config": {"model_type": "blip_2_qformer", "classifier_dropout": None},
    "text_config": {"_name_or_path": "google/flan-t5-xl", "architectures": ["T5ForConditionalGeneration"],
                    "d_ff": 5120, "d_kv": 64, "d_model": 2048, "dense_act_fn": "gelu", "dropout_rate": 0.1,
                    "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
                    "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06,
                    "model_type": "t5", "n_positions": 512, "num_decoder_layers": 24, "num_heads": 32,
                    "num_layers": 24, "output_past": True, "pad_token_id": 0, "relative_attention_max_distance": 128,
                    "relative_attention_num_buckets": 32, "task_specific_params": {}, "tie_word_embeddings": False,
                    "torch_dtype": "bfloat16", "vocab_size": 32128},
    "torch_dtype": "float32", "use_decoder_only_language_model": False,
    "vision_config": {"dropout": 0.0, "initializer_factor": 1.0, "model_type": "blip_2_vision_model",
                      "num_channels": 3, "projection_dim": 512}}
# keys of the reference's base class that blip2 does not carry (classification-head labels, chunked feed-forward,
# the library version): the README lists them under "Not offered"
REFERENCE_ONLY = {"transformers_version", "id2label", "label2id", "problem_type", "chunk_size_feed_forward"}


def without(d, keys):
    return {k: without(v, keys) if isinstance(v, dict) and k.endswith("_config") else v
            for k, v in d.items() if k not in keys}


@pytest.mark.parametrize("name", ["opt-2.7b", "flan-t5-xl", "tiny", "tiny-itm"])
def test_config_to_dict_equals_the_reference_for_hub_configs(name):
    import transformers

    raw = {"opt-2.7b": OPT_27B, "flan-t5-xl": FLAN_T5_XL}.get(name) or \
        json.load(open(os.path.join(ROOT, "blip2", "assets", name.replace("tiny", "blip2-tiny"), "config.json")))
    ref, ours = transformers.Blip2Config.from_dict(raw), blip2.Blip2Config.from_dict(raw)
    a = without(json.loads(json.dumps(ref.to_dict())), REFERENCE_ONLY)
    b = json.loads(json.dumps(ours.to_dict()))
    if name == "flan-t5-xl":  # T5: blip2 keeps the file's tie_word_embeddings (False) and the start/bos ids
        assert a["text_config"].pop("tie_word_embeddings") is True and a["text_config"].pop("is_decoder") is False
        assert b["text_config"].pop("tie_word_embeddings") is False
        assert b["text_config"].pop("decoder_start_token_id") == 0 and b["text_config"].pop("bos_token_id") is None
        b_json = json.loads(ours.to_json_string())
        assert b_json["text_config"]["tie_word_embeddings"] is False
    else:
        assert without(json.loads(ref.to_json_string()), REFERENCE_ONLY) == json.loads(ours.to_json_string())
    assert a == b


def test_configs_take_the_reference_keywords():
    import transformers

    kw = dict(num_channels=3, projection_dim=512, dropout=0.0, bos_token_id=4, hidden_size=32)
    ref, ours = transformers.Blip2VisionConfig(**kw), blip2.Blip2VisionConfig(**kw)
    assert ours.num_channels == 3 and ours.projection_dim == 512 and ours.bos_token_id == 4
    assert without(ref.to_dict(), REFERENCE_ONLY) == ours.to_dict()
    ours.my_setting = 7  # a new attribute is kept, as the reference's
    assert ours.to_dict()["my_setting"] == 7
    q = blip2.Blip2QFormerConfig(classifier_dropout=None, position_embedding_type="absolute", hidden_size=64)
    assert q.hidden_size == 64 and q.position_embedding_type == "absolute"
    full = blip2.Blip2Config(vision_config=ours, qformer_config=q, text_config=blip2.T5Config(d_model=16),
                             image_token_id=5, torch_dtype=torch.bfloat16)
    assert full.image_token_index == 5 and full.dtype == "bfloat16" and full.is_encoder_decoder
    assert full.qformer_config.encoder_hidden_size == 32
    assert full.get_text_config() is full.text_config and blip2.OPTConfig().get_text_config().model_type == "opt"
    assert set(full.sub_configs) == set(transformers.Blip2Config.sub_configs) == \
        {"vision_config", "qformer_config", "text_config"}
    with pytest.raises(blip2.ConfigError, match="needs model_type 'opt', got 't5'"):
        blip2.OPTConfig(model_type="t5")


def test_sub_config_from_pretrained_of_a_full_directory(opt_pair):
    import transformers

    _, _, path = opt_pair
    for name in ("Blip2VisionConfig", "Blip2QFormerConfig"):
        ref, ours = getattr(transformers, name).from_pretrained(path), getattr(blip2, name).from_pretrained(path)
        assert without(ref.to_dict(), REFERENCE_ONLY | {"_name_or_path", "architectures", "dtype"}) == \
            without(ours.to_dict(), {"_name_or_path", "architectures", "dtype"})


def test_config_output_settings_are_honoured_as_the_reference(opt_pair):
    """Each part reads its own config (a top-level output_hidden_states does not reach the parts, as in the
    reference); return_dict=False on the top config gives the tuple."""
    import copy

    ref, ours, _ = opt_pair
    ref, ours = copy.deepcopy(ref), copy.deepcopy(ours)
    ids = torch.cat([torch.full((1, NUM_QUERY), IMAGE_TOKEN), text(1)], 1)
    kw = dict(pixel_values=pixels(1), input_ids=ids)
    for m in (ref, ours):
        m.set_attn_implementation("eager")  # the reference allows config.output_attentions only under eager
        m.vision_model.config.output_hidden_states = True
        m.config.text_config.output_attentions = True
    with torch.no_grad():
        a, b = ref(**kw), ours(**kw)
    assert len(a.vision_outputs.hidden_states) == len(b.vision_outputs.hidden_states) == 3
    assert b.qformer_outputs.hidden_states is None and a.qformer_outputs.hidden_states is None
    assert len(b.language_model_outputs.attentions) == len(a.language_model_outputs.attentions) == 2
    for m in (ref, ours):
        m.config.return_dict = False
    with torch.no_grad():
        a, b = ref(**kw), ours(**kw)
    assert isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) == 4
    assert (a[0] - b[0]).abs().max() <= 1e-4


# --- 2. generation ------------------------------------------------------------------------------------------------


def close(a, b, tol=1e-4):
    """Same shape, same infinities, finite values within tol (tuples compared element by element)."""
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    if a is None or b is None:  # an output that should be there
        return False
    a, b = a.float(), b.float()
    fin = torch.isfinite(a)
    return a.shape == b.shape and torch.equal(fin, torch.isfinite(b)) and torch.equal(a[~fin], b[~fin]) and \
        bool(((a - b)[fin].abs() <= tol).all())


def prompt(b=2):
    ids = torch.cat([torch.full((b, NUM_QUERY), IMAGE_TOKEN), text(b)], 1)
    return dict(pixel_values=pixels(b), input_ids=ids, attention_mask=torch.ones_like(ids))


ALL = dict(return_dict_in_generate=True, output_scores=True, output_logits=True, output_hidden_states=True,
           output_attentions=True)


@pytest.mark.parametrize("decoding", [dict(max_new_tokens=5), dict(max_new_tokens=5, num_beams=3,
                                                                      num_return_sequences=2, length_penalty=0.5)])
def test_generate_dict_outputs_equal_the_reference(opt_pair, decoding):
    """Scores (a caption's confidence), raw logits, per-step hidden states and attentions, beam scores and
    indices: each equal to the reference's (its attention weights from its eager attention)."""
    import copy

    ref, ours, _ = opt_pair
    ref = copy.deepcopy(ref)
    ref.set_attn_implementation("eager")
    assert ours.can_generate() and ref.can_generate()
    with torch.no_grad():
        a = ref.generate(**prompt(), **decoding, **ALL)
        b = ours.generate(**prompt(), **decoding, **ALL)
    assert type(a).__name__ == type(b).__name__
    assert torch.equal(a.sequences, b.sequences)
    assert close(a.scores, b.scores) and close(a.logits, b.logits)
    assert close(a.hidden_states, b.hidden_states) and close(a.attentions, b.attentions)
    if "num_beams" in decoding:
        assert close(a.sequences_scores, b.sequences_scores) and torch.equal(a.beam_indices, b.beam_indices)
    # a caption's confidence, as users compute it
    conf = torch.stack(b.scores, 1).softmax(-1).gather(2, b.sequences[:, -len(b.scores):, None]).squeeze(2)
    assert conf.shape == (b.sequences.shape[0], len(b.scores))


def test_generate_dict_outputs_t5(t5_pair):
    import copy

    ref, ours, _ = t5_pair
    ref = copy.deepcopy(ref)
    ref.set_attn_implementation("eager")
    kw = dict(pixel_values=pixels(), input_ids=text(), max_new_tokens=4, **ALL)
    with torch.no_grad():
        a, b = ref.generate(**kw), ours.generate(**kw)
    assert type(a).__name__ == type(b).__name__ == "GenerateEncoderDecoderOutput"
    assert torch.equal(a.sequences, b.sequences)
    for name in ("scores", "logits", "encoder_hidden_states", "encoder_attentions", "decoder_hidden_states",
                 "decoder_attentions", "cross_attentions"):
        assert close(getattr(a, name), getattr(b, name)), name


def test_generate_bad_words_invalid_values_use_cache_and_generation_config(opt_pair):
    ref, ours, path = opt_pair
    with torch.no_grad():
        plain = ours.generate(**prompt(), max_new_tokens=6)
        new = plain[:, -6:]
        banned = [[int(new[0, 0])], [int(new[1, 1]), int(new[1, 2])]]  # one id, and a two-id sequence
        for kw in (dict(bad_words_ids=banned), dict(remove_invalid_values=True), dict(use_cache=False),
                   dict(bad_words_ids=banned, num_beams=2)):
            a = ref.generate(**prompt(), max_new_tokens=6, **kw)
            b = ours.generate(**prompt(), max_new_tokens=6, **kw)
            assert torch.equal(a, b), kw
        assert int(b.shape[1]) and not torch.equal(ours.generate(**prompt(), max_new_tokens=6, bad_words_ids=banned),
                                                   plain)
        # remove_invalid_values turns infinities into the dtype's extremes in the scores
        out = ours.generate(**prompt(), max_new_tokens=3, bad_words_ids=banned, remove_invalid_values=True,
                            return_dict_in_generate=True, output_scores=True)
        assert all(torch.isfinite(s).all() for s in out.scores)
        assert float(out.scores[0][0, banned[0][0]]) == torch.finfo(torch.float32).min
    with pytest.raises(ValueError, match="bad_words_ids must be a non-empty list"):
        ours.generate(**prompt(), bad_words_ids=[3, 4])
    # generation_config: read from the checkpoint, generate()'s defaults
    assert ours.generation_config.eos_token_id == ref.generation_config.eos_token_id == 50
    tuned = blip2.Blip2ForConditionalGeneration.from_pretrained(path)
    tuned.generation_config.max_new_tokens = 3
    assert tuned.generate(**prompt()).shape[1] == prompt()["input_ids"].shape[1] + 3
    import transformers  # generate(generation_config=...) with the reference's class, as code written for it does

    gc = transformers.GenerationConfig(max_new_tokens=4, num_beams=2, eos_token_id=50, pad_token_id=1)
    with torch.no_grad():
        a, b = ref.generate(**prompt(), generation_config=gc), ours.generate(**prompt(), generation_config=gc)
    assert torch.equal(a, b) and b.shape[1] == prompt()["input_ids"].shape[1] + 4
