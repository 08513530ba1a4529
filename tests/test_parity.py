"""blip2 against the reference transformers implementation on tiny random checkpoints it wrote."""

import pytest
import torch
from tiny_models import IMAGE_TOKEN, NUM_QUERY, OPT, QFORMER, T5, config, itm_config, reference_model

import blip2

TOL = 1e-4


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


def checkpoint(tmp_path_factory, cls_name, cfg, name, **save_kw):
    ref = reference_model(cls_name, cfg)
    path = tmp_path_factory.mktemp(name)
    ref.save_pretrained(path, **save_kw)
    return ref, path


def prompt_batch(image_tokens=True, pad_left=True):
    """Two rows: [img x Q] [pad..] [text], the second left-padded by two tokens (processor layout)."""
    g = torch.Generator().manual_seed(1)
    text = torch.randint(3, 90, (2, 6), generator=g)
    mask = torch.ones_like(text)
    if pad_left:
        text[1, :2], mask[1, :2] = 1, 0
    if image_tokens:
        text = torch.cat([torch.full((2, NUM_QUERY), IMAGE_TOKEN), text], 1)
        mask = torch.cat([torch.ones(2, NUM_QUERY, dtype=torch.long), mask], 1)
    return text, mask


def pixels(b=2, h=16, w=16, seed=2):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


LM_CASES = {
    "opt": dict(text=OPT),
    "opt-cross-every-layer": dict(text=OPT, qformer=dict(QFORMER, cross_attention_frequency=1)),
    "opt-proj-dim": dict(text=dict(OPT, word_embed_proj_dim=16)),
    "t5": dict(text=T5),
    "t5-scaled-tied": dict(text={k: v for k, v in T5.items() if k != "tie_word_embeddings"}),
}


@pytest.fixture(scope="module", params=list(LM_CASES))
def lm_pair(request, tmp_path_factory):
    ref, path = checkpoint(tmp_path_factory, "Blip2ForConditionalGeneration", config(**LM_CASES[request.param]),
                           request.param)
    return request.param, ref, blip2.Blip2ForConditionalGeneration.from_pretrained(path), path


def test_forward_logits_loss_and_hidden_states(lm_pair):
    name, ref, ours, _ = lm_pair
    ids, mask = prompt_batch()
    kw = dict(pixel_values=pixels(), input_ids=ids, attention_mask=mask, output_hidden_states=True)
    if name.startswith("t5"):
        kw.update(labels=torch.randint(3, 90, (2, 5)))
    else:
        kw.update(labels=ids.masked_fill(mask == 0, -100))
    with torch.no_grad():
        a, b = ref(**kw), ours(**kw)
    rows = mask.bool() if not name.startswith("t5") else torch.ones(a.logits.shape[:2], dtype=torch.bool)
    assert maxdiff(a.logits[rows], b.logits[rows]) <= TOL
    assert abs(a.loss.item() - b.loss.item()) <= TOL
    va, vb = a.vision_outputs, b.vision_outputs
    assert maxdiff(va.last_hidden_state, vb.last_hidden_state) <= TOL
    assert maxdiff(va.pooler_output, vb.pooler_output) <= TOL
    assert len(vb.hidden_states) == 3  # embeddings + each of the 2 layers
    with torch.no_grad():  # the reference drops output_hidden_states on this path: ask its vision model
        ha = ref.vision_model(kw["pixel_values"], output_hidden_states=True).hidden_states
    for x, y in zip(ha, vb.hidden_states, strict=True):
        assert maxdiff(x, y) <= TOL
    assert maxdiff(a.qformer_outputs.last_hidden_state, b.qformer_outputs.last_hidden_state) <= TOL


def test_outputs_read_by_attribute_key_and_index_as_the_reference(lm_pair):
    """out.logits, out["logits"] and out[i]: the same fields in the same order as the reference's outputs, nested
    outputs (vision_outputs, qformer_outputs) too."""
    name, ref, ours, _ = lm_pair
    ids, mask = prompt_batch()
    kw = dict(pixel_values=pixels(), input_ids=ids, attention_mask=mask)
    kw["labels"] = torch.randint(3, 90, (2, 5)) if name.startswith("t5") else ids.masked_fill(mask == 0, -100)
    with torch.no_grad():  # use_cache=False: the reference's forward would also return a KV cache, ours keeps none
        a, b = ref(**kw, use_cache=False), ours(**kw)

    def same(x, y, where):
        if torch.is_tensor(x):
            assert torch.is_tensor(y) and x.shape == y.shape, where
            if x.dtype.is_floating_point and x.dim() >= 1 and x.shape[-1] == a.logits.shape[-1] and \
                    not name.startswith("t5"):  # OPT logits: padded rows are not compared
                x, y = x[mask.bool()], y[mask.bool()]
            assert maxdiff(x, y) <= TOL, where
        elif isinstance(x, (tuple, list)):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                same(u, v, f"{where}[{i}]")
        else:  # a nested output
            assert list(x.keys()) == list(y.keys()), where
            for i, k in enumerate(x.keys()):
                assert y[k] is getattr(y, k) and y[i] is y[k], (where, k)
                same(x[k], y[i], f"{where}.{k}")

    same(a, b, "out")
    assert b["loss"] is b.loss is b[0] and "logits" in b and "attentions" not in b


def test_greedy_generation_identical(lm_pair):
    name, ref, ours, _ = lm_pair
    px = pixels()
    assert torch.equal(ref.generate(pixel_values=px, max_new_tokens=12),
                       ours.generate(pixel_values=px, max_new_tokens=12))
    ids, mask = prompt_batch()
    a = ref.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=9)
    b = ours.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=9)
    assert torch.equal(a, b)
    # default length (20 new tokens) and an explicit eos that stops rows at different steps
    eos = int(a[0, ids.shape[1] + 2]) if not name.startswith("t5") else int(a[0, 3])
    a = ref.generate(pixel_values=px, eos_token_id=eos)
    b = ours.generate(pixel_values=px, eos_token_id=eos)
    assert torch.equal(a, b)


def test_round_trip_reference_loads_our_save(lm_pair, tmp_path):
    import transformers

    name, ref, ours, _ = lm_pair
    ours.save_pretrained(tmp_path)
    back = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, mask = prompt_batch()
    kw = dict(pixel_values=pixels(), input_ids=ids, attention_mask=mask)
    if name.startswith("t5"):
        kw["decoder_input_ids"] = torch.randint(3, 90, (2, 5))
    with torch.no_grad():
        assert maxdiff(back(**kw).logits, ours(**kw).logits) <= TOL
    reloaded = blip2.Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    with torch.no_grad():
        assert maxdiff(reloaded(**kw).logits, ours(**kw).logits) == 0.0


def test_blip2_model_features(lm_pair):
    import transformers

    name, _, _, path = lm_pair
    ref = transformers.Blip2Model.from_pretrained(path).eval()
    ours = blip2.Blip2Model.from_pretrained(path)
    ids, mask = prompt_batch()
    px = pixels()
    with torch.no_grad():
        text_ids = ids[:, NUM_QUERY:]
        text_mask = mask[:, NUM_QUERY:]
        a = ref.get_text_features(input_ids=text_ids, attention_mask=text_mask).last_hidden_state
        b = ours.get_text_features(input_ids=text_ids, attention_mask=text_mask).last_hidden_state
        assert maxdiff(a[text_mask.bool()], b[text_mask.bool()]) <= TOL
        assert maxdiff(ref.get_image_features(pixel_values=px).last_hidden_state,
                       ours.get_image_features(pixel_values=px).last_hidden_state) <= TOL
        assert maxdiff(ref.get_qformer_features(pixel_values=px), ours.get_qformer_features(pixel_values=px)) <= TOL
        kw = dict(pixel_values=px, input_ids=ids, attention_mask=mask)
        if name.startswith("t5"):
            kw["decoder_input_ids"] = torch.randint(3, 90, (2, 5))
        rows = mask.bool() if not name.startswith("t5") else torch.ones(2, 5, dtype=torch.bool)
        assert maxdiff(ref(**kw).logits[rows], ours(**kw).logits[rows]) <= TOL


def test_legacy_layout_equals_image_token_layout(lm_pair):
    """Checkpoints without image_token_index get the queries in front of the text."""
    name, _, ours, path = lm_pair
    legacy = blip2.Blip2ForConditionalGeneration.from_pretrained(
        path, config=blip2.Blip2Config.from_pretrained(path, image_token_index=None))
    if name == "opt-proj-dim":  # queries (width 24) cannot go in front of 16-wide word embeddings
        with pytest.raises(ValueError, match="cannot precede"):
            legacy(pixel_values=pixels(), input_ids=torch.randint(3, 90, (2, 5)))
        return
    ids, mask = prompt_batch()
    px = pixels()
    kw = {"decoder_input_ids": torch.randint(3, 90, (2, 5))} if name.startswith("t5") else {}
    with torch.no_grad():
        a = ours(pixel_values=px, input_ids=ids, attention_mask=mask, **kw).logits
        b = legacy(pixel_values=px, input_ids=ids[:, NUM_QUERY:], attention_mask=mask[:, NUM_QUERY:], **kw).logits
    assert a.shape == b.shape and maxdiff(a, b) <= 1e-5
    ga = ours.generate(pixel_values=px, max_new_tokens=6)
    gb = legacy.generate(pixel_values=px, max_new_tokens=6)
    start = NUM_QUERY if not name.startswith("t5") else 0
    assert torch.equal(ga[:, start:], gb)


def eager(ref):
    """The reference returns attention weights only from its eager attention."""
    import copy

    ref = copy.deepcopy(ref)
    ref.set_attn_implementation("eager")
    return ref


def test_vision_attention_outputs_and_interpolation(lm_pair):
    _, ref, ours, _ = lm_pair
    ref = eager(ref)
    for h, w in ((16, 16), (24, 24), (24, 16)):
        px = pixels(1, h, w)
        kw = dict(interpolate_pos_encoding=True, output_attentions=True, output_hidden_states=True)
        with torch.no_grad():
            a, b = ref.vision_model(px, **kw), ours.vision_model(px, **kw)
        assert maxdiff(a.last_hidden_state, b.last_hidden_state) <= TOL
        for x, y in zip(a.attentions, b.attentions, strict=True):
            assert maxdiff(x, y) <= TOL
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        ours.vision_model(pixels(1, 24, 24))


def test_qformer_attention_outputs(lm_pair):
    _, ref, ours, _ = lm_pair
    ref = eager(ref)
    img = torch.randn(2, 17, 40)
    q = torch.randn(2, NUM_QUERY, 32)
    with torch.no_grad():
        a = ref.qformer(query_embeds=q, encoder_hidden_states=img, output_attentions=True, output_hidden_states=True)
        b = ours.qformer(query_embeds=q, encoder_hidden_states=img, output_attentions=True, output_hidden_states=True)
    assert maxdiff(a.last_hidden_state, b.last_hidden_state) <= TOL
    # the reference's recorder also files cross-attention maps under `attentions`; ours keeps them apart
    self_maps = [x for x in a.attentions if x.shape[-1] == NUM_QUERY]
    for x, y in zip(self_maps, b.attentions, strict=True):
        assert maxdiff(x, y) <= TOL
    for x, y in zip(a.cross_attentions, b.cross_attentions, strict=True):
        assert maxdiff(x, y) <= TOL
    for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
        assert maxdiff(x, y) <= TOL


# ---- retrieval -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[None, IMAGE_TOKEN], ids=["no-image-token", "image-token"])
def itm_pair(request, tmp_path_factory):
    ref, path = checkpoint(tmp_path_factory, "Blip2ForImageTextRetrieval",
                           itm_config(image_token_index=request.param), f"itm{request.param}")
    return request.param, ref, blip2.Blip2ForImageTextRetrieval.from_pretrained(path), path


def itm_text(image_token):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 90, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    ids[1, -2:], mask[1, -2:] = 0, 0  # right padding, as BERT tokenizers pad
    if image_token is not None:
        ids = torch.cat([torch.full((2, NUM_QUERY), image_token), ids], 1)
        mask = torch.cat([torch.ones(2, NUM_QUERY, dtype=torch.long), mask], 1)
    return ids, mask


def test_itm_and_itc(itm_pair):
    token, ref, ours, _ = itm_pair
    ids, mask = itm_text(token)
    px = pixels()
    for itm in (True, False):
        kw = dict(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=itm)
        with torch.no_grad():
            a, b = ref(**kw), ours(**kw)
        assert a.logits_per_image.shape == b.logits_per_image.shape
        assert maxdiff(a.logits_per_image, b.logits_per_image) <= TOL
        assert maxdiff(a.logits_per_text, b.logits_per_text) <= TOL
        assert maxdiff(a.image_embeds, b.image_embeds) <= TOL
        if itm:
            assert maxdiff(a.text_embeds, b.text_embeds) <= TOL
        else:
            assert maxdiff(a.text_embeds, b.text_embeds) <= TOL
    # ITC over 1 image x 2 texts: (1, 2)
    with torch.no_grad():
        a = ref(pixel_values=px[:1], input_ids=ids, attention_mask=mask)
        b = ours(pixel_values=px[:1], input_ids=ids, attention_mask=mask)
    assert b.logits_per_image.shape == (1, 2) and maxdiff(a.logits_per_image, b.logits_per_image) <= TOL


def test_itm_one_image_broadcast_equals_repeated(itm_pair):
    _, _, ours, _ = itm_pair
    ids, mask = itm_text(None)
    px = pixels(1)
    with torch.no_grad():
        img = ours.vision_model(px).last_hidden_state
        once, _ = ours.itm_logits(img, ids, mask)
        repeated, _ = ours.itm_logits(img.expand(2, -1, -1), ids, mask)
    assert maxdiff(once, repeated) <= 1e-6


def test_one_image_against_many_texts_runs_its_tower_once(itm_pair):
    """The reference's way to match one image against N texts (the image repeated N times) gives the reference's
    outputs, with one vision forward of batch 1."""
    token, ref, ours, _ = itm_pair
    ids, mask = itm_text(token)
    ids, mask = ids.repeat(2, 1), mask.repeat(2, 1)  # 4 texts
    px = pixels(1).expand(4, -1, -1, -1)
    calls = []
    hook = ours.vision_model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        for itm in (True, False):
            kw = dict(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=itm)
            with torch.no_grad():
                a, b = ref(**kw), ours(**kw)
            for name in ("logits_per_image", "logits_per_text", "image_embeds", "text_embeds"):
                assert getattr(a, name).shape == getattr(b, name).shape, name
                assert maxdiff(getattr(a, name), getattr(b, name)) <= TOL, name
            va, vb = a.vision_model_output, b.vision_model_output
            assert maxdiff(va.last_hidden_state, vb.last_hidden_state) <= TOL
            assert maxdiff(va.pooler_output, vb.pooler_output) <= TOL
    finally:
        hook.remove()
    assert calls == [1, 1]


def test_projection_models(itm_pair):
    import transformers

    token, _, _, path = itm_pair
    ids, mask = itm_text(None)
    px = pixels()
    ref_t = transformers.Blip2TextModelWithProjection.from_pretrained(path).eval()
    ours_t = blip2.Blip2TextModelWithProjection.from_pretrained(path)
    ref_v = transformers.Blip2VisionModelWithProjection.from_pretrained(path).eval()
    ours_v = blip2.Blip2VisionModelWithProjection.from_pretrained(path)
    with torch.no_grad():
        a, b = ref_t(input_ids=ids, attention_mask=mask), ours_t(input_ids=ids, attention_mask=mask)
        assert b.text_embeds.shape == (2, 7, 8) and maxdiff(a.text_embeds, b.text_embeds) <= TOL
        a, b = ref_v(pixel_values=px), ours_v(pixel_values=px)
        assert b.image_embeds.shape == (2, NUM_QUERY, 8) and maxdiff(a.image_embeds, b.image_embeds) <= TOL
        assert maxdiff(a.last_hidden_state, b.last_hidden_state) <= TOL


def test_retrieval_round_trip(itm_pair, tmp_path):
    import transformers

    token, _, ours, _ = itm_pair
    ours.save_pretrained(tmp_path)
    back = transformers.Blip2ForImageTextRetrieval.from_pretrained(tmp_path).eval()
    ids, mask = itm_text(token)
    kw = dict(pixel_values=pixels(), input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    with torch.no_grad():
        assert maxdiff(back(**kw).logits_per_image, ours(**kw).logits_per_image) <= TOL


def test_parts_load_from_full_checkpoint(itm_pair, tmp_path):
    _, _, ours, path = itm_pair
    vision = blip2.Blip2VisionModel.from_pretrained(path)
    qformer = blip2.Blip2QFormerModel.from_pretrained(path)
    px = pixels()
    with torch.no_grad():
        img = ours.vision_model(px).last_hidden_state
        assert maxdiff(vision(px).last_hidden_state, img) == 0.0
        q = ours.query_tokens.expand(2, -1, -1)
        assert maxdiff(qformer(q, encoder_hidden_states=img).last_hidden_state,
                       ours.qformer(q, encoder_hidden_states=img).last_hidden_state) == 0.0
    vision.save_pretrained(tmp_path / "v")
    again = blip2.Blip2VisionModel.from_pretrained(tmp_path / "v")
    with torch.no_grad():
        assert maxdiff(again(px).last_hidden_state, img) == 0.0


@pytest.mark.parametrize("shape", [(768, 768), (3072, 768), (768, 3072), (50272, 768)])
def test_decoding_linear_is_bit_identical(shape):
    """The one-row fast path of the language models' Linear (two half-height products, one per thread) gives
    exactly F.linear's result, with and without bias; other inputs take F.linear itself."""
    from blip2.ops import Linear

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for bias in (True, False):
            layer = Linear(shape[1], shape[0], bias=bias)
            torch.nn.init.normal_(layer.weight, std=0.02)
            if bias:
                torch.nn.init.normal_(layer.bias)
            for x in (torch.randn(1, 1, shape[1]), torch.randn(shape[1]), torch.randn(5, 1, shape[1])):
                with torch.no_grad():
                    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    finally:
        torch.set_num_threads(threads)
