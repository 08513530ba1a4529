"""blip2.processing against transformers 5.24 (the oracle): image pixels, token ids, decoding, save/load."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from bench import tiny_tokenizers as tiny
from blip2.features import BatchFeature
from blip2.image_processing import BlipImageProcessor
from blip2.processing import Blip2Processor
from blip2.tokenizer import Blip2Tokenizer, TextStreamDecoder

transformers.logging.set_verbosity_error()

PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "camera.png", "rocket.jpg", "logo.png"]  # ship in the wheel
TEXTS = ["Question: what is in the photo? Answer:", "a cat 🙂 on the sofa.", "", "  leading  spaces\tand\nnew lines ",
         "東京の猫 Привет café crème brûlée",
         "special [CLS] <pad> </s> <extra_id_0> [DEC] <image> new_word inside",
         "don't stop , ok ? yes !"]
FAMILIES = ["opt", "opt_vocab_merges", "t5", "bert", "bert_vocab_txt", "opt_left_clean", "bert_clean", "opt_hub_like",
            "bert_vocab_added", "t5_no_extras"]


def _variant(src, dst, drop=(), **config):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    with open(path, "w") as f:
        json.dump({k: v for k, v in (cfg | config).items() if k not in drop}, f)
    return str(dst)


@pytest.fixture(scope="session")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    d = {
        "opt": tiny.opt_tokenizer_dir(root / "opt"),
        "opt_vocab_merges": tiny.opt_vocab_merges_dir(root / "opt_vocab_merges"),
        "t5": tiny.t5_tokenizer_dir(root / "t5"),
        "bert": tiny.bert_tokenizer_dir(root / "bert"),
        "bert_vocab_txt": tiny.bert_vocab_txt_dir(root / "bert_vocab_txt"),
    }
    # tokenizer_config settings the checkpoints use: left padding, clean-up of tokenization spaces; transformers
    # ignores add_bos_token / add_eos_token when there is a tokenizer.json (its template decides)
    d["opt_left_clean"] = _variant(d["opt"], root / "opt_left", padding_side="left", truncation_side="left",
                                   clean_up_tokenization_spaces=True, add_bos_token=False, add_eos_token=True)
    d["bert_clean"] = _variant(d["bert"], root / "bert_clean", clean_up_tokenization_spaces=True)
    # as the Hub checkpoints are: <image> already in the tokenizer, saved by transformers' processor
    transformers.Blip2Processor.from_pretrained(d["opt"]).save_pretrained(root / "opt_hub_like")
    shutil.copy(os.path.join(d["opt"], "preprocessor_config.json"), root / "opt_hub_like")
    d["opt_hub_like"] = str(root / "opt_hub_like")
    # without extra_special_tokens / extra_ids a T5Tokenizer adds <extra_id_0..99> itself
    d["t5_no_extras"] = _variant(d["t5"], root / "t5_no_extras", drop=("extra_special_tokens", "extra_ids"))
    # legacy vocab.txt checkpoint with special_tokens_map.json and added_tokens.json (an added bos [DEC])
    d["bert_vocab_added"] = _variant(d["bert_vocab_txt"], root / "bert_vocab_added")
    with open(os.path.join(d["bert_vocab_txt"], "vocab.txt")) as f:
        size = len(f.read().splitlines())
    with open(root / "bert_vocab_added" / "added_tokens.json", "w") as f:
        json.dump({"[DEC]": size, "new_word": size + 1}, f)
    with open(root / "bert_vocab_added" / "special_tokens_map.json", "w") as f:
        json.dump({"bos_token": "[DEC]", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                   "unk_token": "[UNK]", "mask_token": "[MASK]"}, f)
    return d


_cache = {}


def ref_processor(path):
    if ("ref", path) not in _cache:
        _cache["ref", path] = transformers.Blip2Processor.from_pretrained(path)
    return _cache["ref", path]


def our_processor(path):
    if ("ours", path) not in _cache:
        _cache["ours", path] = Blip2Processor.from_pretrained(path)
    return _cache["ours", path]


def as_lists(enc):
    return {k: (v.tolist() if isinstance(v, (torch.Tensor, np.ndarray)) else v) for k, v in dict(enc).items()
            if k != "pixel_values"}


def max_diff(a, b):
    a, b = (x if isinstance(x, torch.Tensor) else torch.as_tensor(np.array(x)) for x in (a, b))
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def photo(name):
    import skimage.data
    return Image.open(os.path.join(os.path.dirname(skimage.data.__file__), name))


def random_image(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").convert(mode)


# ---------------------------------------------------------------------------------------------------- images


def test_image_processor_resolves_to_pil_backend():
    # the parity below is against the PIL backend; with torchvision installed the reference would differ
    assert type(transformers.BlipImageProcessor()).__name__ == "BlipImageProcessorPil"


@pytest.mark.parametrize("name", PHOTOS)
def test_photographs_match_reference(name):
    image = photo(name)
    ref = transformers.BlipImageProcessor(size={"height": 224, "width": 224})(image, return_tensors="pt").pixel_values
    ours = BlipImageProcessor(size=224)(image, return_tensors="pt").pixel_values
    assert ours.shape == (1, 3, 224, 224) and ours.dtype == torch.float32
    assert torch.equal(ours, ref)  # bit-identical: same PIL resize, float64 rescale, float32 normalise


def _pil_cases():
    modes = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F"]
    cases = {m: random_image(13, 17, m) for m in modes}
    cases["P_transparency"] = random_image(13, 17, "RGB").convert("P")
    cases["P_transparency"].info["transparency"] = 5
    rng = np.random.default_rng(1)
    cases["I;16_full_range"] = Image.fromarray(rng.integers(0, 65535, (13, 17), dtype=np.uint16))
    cases["F_wide"] = Image.fromarray(rng.normal(0, 300, (13, 17)).astype(np.float32))
    for h, w in [(1, 1), (3, 500), (500, 3), (17, 31)]:
        cases[f"{h}x{w}"] = random_image(h, w, seed=h * w)
    return cases


@pytest.mark.parametrize("case", sorted(_pil_cases()))
def test_pil_modes_and_sizes_match_reference(case):
    image = _pil_cases()[case]
    ref = transformers.BlipImageProcessor(size={"height": 24, "width": 20})(image, return_tensors="pt").pixel_values
    ours = BlipImageProcessor(size=(24, 20))(image, return_tensors="pt").pixel_values
    assert max_diff(ours, ref) <= 1e-6


def test_alpha_is_composited_on_white_not_dropped():
    image = random_image(13, 17, "RGBA")
    p = BlipImageProcessor(size=16)
    composited = p(image, return_tensors="pt").pixel_values
    dropped = p(image.convert("RGB"), return_tensors="pt").pixel_values
    assert (composited - dropped).abs().max() > 0.5
    fully_transparent = Image.new("RGBA", (5, 5), (10, 20, 30, 0))  # -> pure white
    white = p(fully_transparent, do_normalize=False, return_tensors="pt").pixel_values
    assert torch.all(white == 1.0)


def _array_cases():
    rng = np.random.default_rng(2)
    return {
        "hwc_uint8": rng.integers(0, 256, (40, 30, 3), dtype=np.uint8),
        "chw_uint8": rng.integers(0, 256, (3, 40, 30), dtype=np.uint8),
        "hwc_rgba": rng.integers(0, 256, (40, 30, 4), dtype=np.uint8),
        "hw1_gray": rng.integers(0, 256, (40, 30, 1), dtype=np.uint8),
        "float32_01": rng.random((40, 30, 3)).astype(np.float32),
        "float64_01_chw": rng.random((3, 40, 30)),
        "float_rgba_01": rng.random((40, 30, 4)).astype(np.float32),
        "float_integer_valued": rng.integers(0, 256, (40, 30, 3)).astype(np.float32),
        "batch_4d": rng.integers(0, 256, (2, 40, 30, 3), dtype=np.uint8),
        "torch_chw_uint8": torch.from_numpy(rng.integers(0, 256, (3, 40, 30), dtype=np.uint8)),
        "torch_float_01": torch.from_numpy(rng.random((3, 40, 30), dtype=np.float32)),
        "mixed_list": [random_image(9, 11), rng.integers(0, 256, (12, 8, 3), dtype=np.uint8), torch.rand(3, 9, 9)],
        "nested_list": [[random_image(9, 11)], [random_image(9, 11, "L"), random_image(9, 11, "RGBA")]],
    }


@pytest.mark.parametrize("case", sorted(_array_cases()))
def test_arrays_tensors_and_batches_match_reference(case):
    images = _array_cases()[case]
    ref = transformers.BlipImageProcessor(size={"height": 24, "width": 20})(images, return_tensors="pt").pixel_values
    ours = BlipImageProcessor(size=(24, 20))(images, return_tensors="pt").pixel_values
    assert max_diff(ours, ref) <= 1e-6


def test_2d_gray_array_is_accepted_as_one_channel():  # the reference rejects 2-D arrays; we take them as (H, W, 1)
    gray = np.random.default_rng(3).integers(0, 256, (40, 30), dtype=np.uint8)
    ref = transformers.BlipImageProcessor(size={"height": 16, "width": 16})(gray[..., None], return_tensors="pt")
    assert max_diff(BlipImageProcessor(size=16)(gray, return_tensors="pt").pixel_values, ref.pixel_values) <= 1e-6


@pytest.mark.parametrize("overrides", [
    {"do_resize": False}, {"do_normalize": False}, {"do_rescale": False}, {"size": 50},
    {"size": {"shortest_edge": 16}}, {"resample": 0}, {"image_mean": 0.5, "image_std": 0.5},
    {"do_convert_rgb": False}, {"rescale_factor": 0.5},
])
def test_call_overrides_match_reference(overrides):
    image = random_image(13, 17)
    ref = transformers.BlipImageProcessor(size={"height": 24, "width": 20})(image, return_tensors="pt", **overrides)
    ours = BlipImageProcessor(size=(24, 20))(image, return_tensors="pt", **overrides)
    assert max_diff(ours.pixel_values, ref.pixel_values) <= 1e-6


def test_return_tensors_none_gives_list_of_float32_chw_arrays():
    out = BlipImageProcessor(size=8)([random_image(5, 6), random_image(7, 3)])
    ref = transformers.BlipImageProcessor(size={"height": 8, "width": 8})([random_image(5, 6), random_image(7, 3)])
    assert isinstance(out.pixel_values, list) and len(out.pixel_values) == 2
    assert all(a.dtype == np.float32 and a.shape == (3, 8, 8) for a in out.pixel_values)
    assert max(max_diff(a, b) for a, b in zip(out.pixel_values, ref.pixel_values)) <= 1e-6


def test_image_processor_config_round_trip(tmp_path):
    ours = BlipImageProcessor(size=(48, 40), resample=2, image_mean=[0.5, 0.4, 0.3], do_convert_rgb=False)
    ours.save_pretrained(tmp_path)
    with open(tmp_path / "preprocessor_config.json") as f:
        saved = json.load(f)
    assert saved["image_processor_type"] == "BlipImageProcessor" and saved["size"] == {"height": 48, "width": 40}
    ref = transformers.BlipImageProcessor.from_pretrained(tmp_path)
    assert json.loads(ref.to_json_string()) == saved  # the reference reads back exactly what we wrote
    image = random_image(30, 20, "RGB")
    assert max_diff(ours(image, return_tensors="pt").pixel_values, ref(image, return_tensors="pt").pixel_values) <= 1e-6
    ref_default = tmp_path / "ref"
    transformers.BlipImageProcessor().save_pretrained(ref_default)
    assert BlipImageProcessor.from_pretrained(ref_default).to_dict() == BlipImageProcessor().to_dict()
    assert BlipImageProcessor().size == {"height": 384, "width": 384}


# ---------------------------------------------------------------------------------------------------- tokenizers


TOKENIZER_KWARGS = [
    {}, {"padding": True}, {"padding": "longest", "padding_side": "left"}, {"padding": "max_length", "max_length": 30},
    {"truncation": True, "max_length": 6}, {"max_length": 5}, {"add_special_tokens": False},
    {"padding": True, "truncation": True, "max_length": 8, "return_tensors": "pt"},
    {"padding": True, "return_attention_mask": False, "return_token_type_ids": True},
    {"padding": True, "pad_to_multiple_of": 8, "return_tensors": "np"},
    {"truncation": True}, {"padding": "max_length"},  # no max_length: model_max_length, unless it is unlimited
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kwargs", TOKENIZER_KWARGS, ids=str)
def test_tokenizer_matches_autotokenizer(dirs, family, kwargs):
    ref = ref_processor(dirs[family]).tokenizer
    ours = our_processor(dirs[family]).tokenizer
    assert as_lists(ours(TEXTS, **kwargs)) == as_lists(ref(TEXTS, **kwargs))
    for text in TEXTS[:3]:
        assert as_lists(ours(text, **kwargs)) == as_lists(ref(text, **kwargs))


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_attributes_match(dirs, family):
    ref = transformers.AutoTokenizer.from_pretrained(dirs[family])
    ours = Blip2Tokenizer.from_pretrained(dirs[family])
    for name in ["bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                 "bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id", "model_max_length", "padding_side",
                 "truncation_side", "clean_up_tokenization_spaces", "vocab_size"]:
        assert getattr(ours, name) == getattr(ref, name), name
    assert len(ours) == len(ref) and ours.get_vocab() == ref.get_vocab()
    assert sorted(ours.all_special_ids) == sorted(ref.all_special_ids)
    assert [ours.encode(t) for t in TEXTS] == [ref.encode(t) for t in TEXTS]
    assert ours.convert_tokens_to_ids(["a", "</s>", "[SEP]", "no-such-token"]) == ref.convert_tokens_to_ids(
        ["a", "</s>", "[SEP]", "no-such-token"])
    def flags(tokens):
        return {i: (t.content, t.special, t.normalized, t.lstrip, t.rstrip) for i, t in tokens.items()}
    assert flags(ours.backend.get_added_tokens_decoder()) == flags(ref.added_tokens_decoder)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_matches(dirs, family):
    ref = ref_processor(dirs[family])
    ours = our_processor(dirs[family])
    ids = ref(images=random_image(8, 8), text=TEXTS, padding=True, return_tensors="pt").input_ids
    for skip in (False, True):
        for clean in (None, True, False):
            kw = {"skip_special_tokens": skip, "clean_up_tokenization_spaces": clean}
            assert ours.batch_decode(ids, **kw) == ref.batch_decode(ids, **kw)
            assert ours.decode(ids[1], **kw) == ref.decode(ids[1], **kw)
            assert ours.decode(ids[1].tolist(), **kw) == ref.decode(ids[1].tolist(), **kw)
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)  # batch via decode
    assert ours.decode(int(ids[0, -1])) == ref.decode(int(ids[0, -1]))
    assert ours.batch_decode(ids[0].tolist()) == ref.batch_decode(ids[0].tolist())  # one sequence -> [text]


def test_family_special_token_layouts(dirs):
    """What the BLIP-2 checkpoints rely on, stated outright (not only 'same as the reference')."""
    opt = Blip2Tokenizer.from_pretrained(dirs["opt"])
    ids = opt("a cat").input_ids
    assert ids[0] == 2 and ids.count(2) == 1 and opt.bos_token == opt.eos_token == "</s>"  # BOS </s>, no EOS
    assert opt.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3] and opt.pad_token_id == 1
    assert opt.convert_tokens_to_ids("Ċ") != opt.unk_token_id  # the byte-level "\n" token exists
    vm = Blip2Tokenizer.from_pretrained(dirs["opt_vocab_merges"])  # add_bos_token in the config does it here
    assert vm("a cat").input_ids[0] == 2 and vm("a cat", add_special_tokens=False).input_ids[0] != 2
    t5 = Blip2Tokenizer.from_pretrained(dirs["t5"])
    ids = t5("a cat").input_ids
    assert ids[-1] == 1 and ids.count(1) == 1 and t5.bos_token is None and [t5.pad_token_id, t5.unk_token_id] == [0, 2]
    assert t5.convert_tokens_to_ids("<extra_id_0>") == len(t5) - 1
    for name in ("bert", "bert_vocab_txt"):
        bert = Blip2Tokenizer.from_pretrained(dirs[name])
        enc = bert("A Cat")
        assert enc.input_ids[0] == bert.cls_token_id == 2 and enc.input_ids[-1] == bert.sep_token_id == 3
        assert enc.token_type_ids == [0] * len(enc.input_ids)  # BERT returns them by default
        assert bert("A Cat").input_ids == bert("a cat").input_ids  # uncased
    assert Blip2Tokenizer.from_pretrained(dirs["bert"]).bos_token_id == 400  # the added [DEC], like the ITM checkpoint


def test_clean_up_is_skipped_for_bpe_but_applied_to_wordpiece_and_unigram(dirs):
    opt = Blip2Tokenizer.from_pretrained(dirs["opt"])
    ids = opt("ok , yes !", add_special_tokens=False).input_ids
    assert opt.decode(ids, clean_up_tokenization_spaces=True) == "ok , yes !"
    t5 = Blip2Tokenizer.from_pretrained(dirs["t5"])
    ids = t5("ok , yes !").input_ids
    assert t5.decode(ids, skip_special_tokens=True) == "ok , yes !"  # default: no clean-up
    assert t5.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True) == "ok, yes!"


def test_tokenizer_save_round_trip_loads_in_transformers(dirs, tmp_path):
    for family in ["opt", "opt_vocab_merges", "t5", "bert", "bert_vocab_txt", "opt_left_clean"]:
        ours = Blip2Tokenizer.from_pretrained(dirs[family])
        ours.save_pretrained(tmp_path / family)
        files = set(os.listdir(tmp_path / family))
        assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= files
        ref = transformers.AutoTokenizer.from_pretrained(tmp_path / family)
        again = Blip2Tokenizer.from_pretrained(tmp_path / family)
        for kwargs in [{"padding": True}, {"truncation": True, "max_length": 6, "padding": "max_length"}]:
            assert as_lists(ref(TEXTS, **kwargs)) == as_lists(ours(TEXTS, **kwargs)) == as_lists(again(TEXTS, **kwargs))
        ids = ours(TEXTS, padding=True).input_ids
        assert ref.batch_decode(ids, skip_special_tokens=True) == ours.batch_decode(ids, skip_special_tokens=True)
        assert (ref.padding_side, len(ref), ref.clean_up_tokenization_spaces) == (
            ours.padding_side, len(ours), ours.clean_up_tokenization_spaces)


def test_stream_decoder_holds_back_split_characters(dirs):
    tok = Blip2Tokenizer.from_pretrained(dirs["opt"])
    emoji = tok("🙂", add_special_tokens=False).input_ids
    assert len(emoji) > 1 and tok.decode(emoji[:1]).endswith("\ufffd")  # the character really is split
    text = "a cat 🙂 in 東京 🎉!"
    ids = tok(text).input_ids
    stream = TextStreamDecoder(tok)
    pieces = [stream.put(i) for i in ids]
    pieces.append(stream.end())
    assert "".join(pieces) == text == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)
    assert " 🙂" in pieces and "" in pieces[1:]  # the emoji came out whole, after pieces that were held back
    chunked = TextStreamDecoder(tok, skip_special_tokens=False)
    out = chunked.put(torch.tensor([ids[:3]])) + chunked.put(ids[3:]) + chunked.end()
    assert out == "</s>" + text
    cut = TextStreamDecoder(tok)
    assert cut.put(emoji[:1]) == "" and cut.end() == "\ufffd"  # an unfinished character is flushed as U+FFFD


# ---------------------------------------------------------------------------------------------------- processor


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", ["images+text", "images+one_text", "text_only", "images_only", "left+pt",
                                  "max_length", "max_length+padding", "np", "text_kwargs"])
def test_processor_matches_reference(dirs, family, case):
    ref, ours = ref_processor(dirs[family]), our_processor(dirs[family])
    images = [random_image(40, 30, seed=1), random_image(20, 50, "RGBA", seed=2)]
    kwargs = {
        "images+text": dict(images=images, text=TEXTS[:2], padding=True),
        "images+one_text": dict(images=images[0], text=TEXTS[1], return_tensors="pt"),
        "text_only": dict(text=TEXTS, padding=True, return_tensors="pt"),
        "images_only": dict(images=images, return_tensors="pt"),
        "left+pt": dict(images=images, text=TEXTS[:2], padding=True, padding_side="left", return_tensors="pt"),
        "max_length": dict(images=images, text=TEXTS[:2], max_length=9),
        "max_length+padding": dict(images=images, text=TEXTS[:2], max_length=12, truncation=True,
                                   padding="max_length", return_tensors="pt"),
        "np": dict(images=images, text=[TEXTS[2], TEXTS[2]], return_tensors="np"),
        "text_kwargs": dict(images=images, text=TEXTS[:2], text_kwargs={"padding": True}, return_tensors="pt",
                            images_kwargs={"size": {"height": 10, "width": 12}}),
    }[case]
    r, o = ref(**kwargs), ours(**kwargs)
    assert set(o) == set(r)
    assert as_lists(o) == as_lists(r)
    if "pixel_values" in r:
        assert type(o.pixel_values) is type(r.pixel_values) and max_diff(o.pixel_values, r.pixel_values) <= 1e-6
    if "input_ids" in r and kwargs.get("return_tensors") == "pt":
        assert o.input_ids.dtype == torch.int64 and o.attention_mask.dtype == torch.int64


def test_image_tokens_are_prepended_before_bos_and_padding(dirs):
    proc = Blip2Processor.from_pretrained(dirs["opt"])
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == proc.tokenizer.vocab_size == len(proc.tokenizer) - 1  # the next free id
    enc = proc(images=[random_image(8, 8)] * 2, text=["a cat sitting", "a"], padding=True, padding_side="left",
               return_tensors="pt")
    n = proc.num_query_tokens
    assert n == 4 and enc.pixel_values.shape == (2, 3, tiny.SIZE, tiny.SIZE)
    assert enc.input_ids[:, :n].eq(image_id).all() and enc.attention_mask[:, :n].eq(1).all()
    short = enc.input_ids[1, n:].tolist()
    pads = short.count(1)
    assert pads > 0 and short[:pads] == [1] * pads and short[pads] == 2  # <image>*n, <pad>..., </s>, text
    assert enc.attention_mask[1, n:n + pads].eq(0).all()
    assert proc.batch_decode(enc.input_ids, skip_special_tokens=True) == ["a cat sitting", "a"]
    assert set(proc(text="a cat")) == {"input_ids", "attention_mask"}  # no placeholders, no token_type_ids
    assert proc(text="a cat").input_ids == [proc.tokenizer("a cat").input_ids]  # text is always batched
    assert set(proc(images=random_image(8, 8))) == {"pixel_values"}
    bert = Blip2Processor.from_pretrained(dirs["bert"])
    assert "token_type_ids" not in bert(images=random_image(8, 8), text="a cat")


def test_batch_feature_to_casts_only_floating_tensors(dirs):
    enc = our_processor(dirs["opt"])(images=random_image(8, 8), text="a cat", return_tensors="pt")
    enc = enc.to(torch.float16)
    assert enc.pixel_values.dtype == torch.float16 and enc.input_ids.dtype == torch.int64
    enc = enc.to("cpu")
    assert enc["input_ids"].device.type == "cpu" and isinstance(enc, BatchFeature)
    with pytest.raises(ValueError, match="device or a torch dtype"):
        enc.to(3.5)


def test_processor_save_round_trip(dirs, tmp_path):
    for family in ["opt", "t5", "bert"]:
        ours = Blip2Processor.from_pretrained(dirs[family])
        ours.image_processor.size = {"height": 20, "width": 28}
        ours.num_query_tokens = 3
        ours.save_pretrained(tmp_path / family)
        ref = transformers.Blip2Processor.from_pretrained(tmp_path / family)
        again = Blip2Processor.from_pretrained(tmp_path / family)
        assert ref.num_query_tokens == again.num_query_tokens == 3
        kwargs = dict(images=[random_image(30, 40)] * 2, text=TEXTS[:2], padding=True, return_tensors="pt")
        r, o, a = ref(**kwargs), ours(**kwargs), again(**kwargs)
        assert as_lists(r) == as_lists(o) == as_lists(a)
        assert r.pixel_values.shape == (2, 3, 20, 28)
        assert max_diff(r.pixel_values, o.pixel_values) <= 1e-6 and max_diff(a.pixel_values, o.pixel_values) <= 1e-6
        assert len(ref.tokenizer) == len(ours.tokenizer) == len(again.tokenizer)  # <image> not added twice


def test_reads_transformers_5_nested_processor_config(dirs, tmp_path):
    transformers.Blip2Processor.from_pretrained(dirs["t5"], num_query_tokens=2).save_pretrained(tmp_path)
    with open(tmp_path / "processor_config.json") as f:
        assert "image_processor" in json.load(f)  # 5.x writes no preprocessor_config.json
    ours = Blip2Processor.from_pretrained(tmp_path)
    assert ours.num_query_tokens == 2 and ours.image_processor.size == {"height": tiny.SIZE, "width": tiny.SIZE}


# ---------------------------------------------------------------------------------------------------- errors


def test_processor_errors_name_the_problem(dirs):
    proc = our_processor(dirs["opt"])
    with pytest.raises(ValueError, match="either images or text"):
        proc()
    with pytest.raises(ValueError, match="Invalid input text"):
        proc(text=123)
    with pytest.raises(ValueError, match="Invalid input text"):
        proc(text=["ok", 5])
    with pytest.raises(TypeError, match=r"images\[1\].*str"):
        proc(images=[random_image(8, 8), "photo.jpg"], text="a")
    with pytest.raises(ValueError, match=r"images\[0\].*channel"):
        proc(images=np.zeros((10, 12, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"images\[1\].*\[0, 1\]"):
        proc(images=[random_image(8, 8), np.full((10, 12, 4), 2.5, dtype=np.float32)])
    with pytest.raises(ValueError, match="empty"):
        proc(images=[])
    with pytest.raises(ValueError, match="padding=True"):
        proc(text=["a", "a much longer text"], return_tensors="pt")
    with pytest.raises(TypeError, match="unknown image processor argument"):
        proc.image_processor(random_image(8, 8), do_crop=True)


def test_tokenizer_errors_name_the_problem(dirs, tmp_path):
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "spiece.model").write_bytes(b"\x00")
    with pytest.raises(ValueError, match=r"spiece\.model.*tokenizer\.json"):
        Blip2Tokenizer.from_pretrained(tmp_path / "spm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Blip2Tokenizer.from_pretrained(tmp_path / "empty")
    tok = Blip2Tokenizer.from_pretrained(dirs["opt"])
    with pytest.raises(ValueError, match="padding must be"):
        tok("a", padding="sideways")
    with pytest.raises(ValueError, match="text must be a str"):
        tok(["a", None])
    no_pad = Blip2Tokenizer(tok.backend, tokenizer_class="GPT2Tokenizer")
    with pytest.raises(ValueError, match="no pad_token"):
        no_pad(["a", "b c"], padding=True)
