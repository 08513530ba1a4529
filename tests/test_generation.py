"""generate() against transformers 5.24 on tiny random checkpoints: token ids identical for every decoding mode;
sampling, validation, streaming and prompt-prefix reuse."""

import types

import pytest
import torch
from tiny_models import IMAGE_TOKEN, NUM_QUERY, OPT, T5, config, reference_model

import blip2
from blip2 import generation
from blip2.cache import KVCache

# eos ids that these tiny models really produce, so that rows and beams finish at different steps
EOS = {"opt": [21, [7, 30], [67, 84, 13]], "t5": [46, [13, 95], [45, 6]]}
CASES = [
    dict(),
    dict(num_beams=2),
    dict(num_beams=3, num_return_sequences=3),
    dict(num_beams=4, length_penalty=0.0),
    dict(num_beams=3, length_penalty=-1.5, early_stopping=True),
    dict(num_beams=3, length_penalty=2.0, early_stopping="never"),
    dict(num_beams=4, early_stopping=True, num_return_sequences=2),
    dict(num_beams=2, length_penalty=-1.0, early_stopping="never"),
    dict(num_beams=2, repetition_penalty=1.5),
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.7, no_repeat_ngram_size=2),
    dict(num_beams=3, no_repeat_ngram_size=3),
    dict(min_new_tokens=5),
    dict(num_beams=3, min_new_tokens=4),
    dict(num_beams=2, min_length=12),
    dict(pad_token_id=77),
    dict(max_length=14, max_new_tokens=None),
    dict(num_beams=2, max_new_tokens=None),  # the default length: 20 new tokens
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["opt", "t5"])
def pair(request, tmp_path_factory):
    ref = reference_model("Blip2ForConditionalGeneration", config(text=OPT if request.param == "opt" else T5))
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    return request.param, ref, blip2.Blip2ForConditionalGeneration.from_pretrained(path)


def inputs(padded_batch):
    """No prompt (the default one) for two images, or two prompts with the second left-padded by two tokens."""
    px = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    if not padded_batch:
        return dict(pixel_values=px)
    text = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(text)
    text[1, :2], mask[1, :2] = 1, 0
    ids = torch.cat([torch.full((2, NUM_QUERY), IMAGE_TOKEN), text], 1)
    return dict(pixel_values=px, input_ids=ids, attention_mask=torch.cat([torch.ones(2, NUM_QUERY, dtype=torch.long),
                                                                          mask], 1))


def assert_same(a, b):
    assert a.shape == b.shape and torch.equal(a, b), f"\nreference\n{a}\nours\n{b}"


@pytest.mark.parametrize("padded_batch", [False, True], ids=["default-prompt", "left-padded"])
def test_ids_identical_to_reference(pair, padded_batch):
    name, ref, ours = pair
    inp = inputs(padded_batch)
    for i, case in enumerate(CASES):
        for eos in (EOS[name][i % 3], EOS[name][(i + 1) % 3]):
            kw = {k: v for k, v in (dict(max_new_tokens=12, eos_token_id=eos) | case).items() if v is not None}
            assert_same(ref.generate(**inp, **kw), ours.generate(**inp, **kw))


@pytest.mark.parametrize("kw", [dict(), dict(temperature=2.5, top_k=5), dict(temperature=3.0, top_p=0.8),
                                dict(temperature=2.0, top_k=0, num_return_sequences=3),
                                dict(num_beams=3, num_return_sequences=2, temperature=3.0, top_p=0.9,
                                     repetition_penalty=1.2)])
def test_sampling_identical_to_reference_with_the_same_global_seed(pair, kw):
    _, ref, ours = pair
    inp = inputs(True)
    torch.manual_seed(5)
    a = ref.generate(**inp, do_sample=True, max_new_tokens=12, **kw)
    torch.manual_seed(5)
    assert_same(a, ours.generate(**inp, do_sample=True, max_new_tokens=12, **kw))


def test_sampling_valid_and_reproducible(pair):
    name, _, ours = pair
    inp = inputs(True)
    kw = dict(do_sample=True, temperature=5.0, top_k=0, max_new_tokens=15, num_return_sequences=4)
    a = ours.generate(**inp, seed=7, **kw)
    assert_same(a, ours.generate(**inp, generator=torch.Generator().manual_seed(7), **kw))
    assert not torch.equal(a, ours.generate(**inp, seed=8, **kw))
    assert a.shape[0] == 8 and int(a.min()) >= 0 and int(a.max()) < ours.config.text_config.vocab_size
    assert len(set(a[:, -15:].flatten().tolist())) > 10  # a hot temperature really samples
    greedy = ours.generate(**inp, max_new_tokens=15)
    assert_same(greedy.repeat_interleave(2, 0), ours.generate(**inp, do_sample=True, top_k=1, seed=3,
                                                               num_return_sequences=2, max_new_tokens=15))
    # top_p keeps the smallest set of tokens over the mass: a tiny top_p is greedy too
    assert_same(greedy, ours.generate(**inp, do_sample=True, top_p=1e-6, seed=3, max_new_tokens=15))
    # top_k=3: every sampled token is among the 3 most likely after its prefix
    seq = ours.generate(**inp, do_sample=True, temperature=5.0, top_k=3, seed=1, max_new_tokens=8, eos_token_id=[])
    with torch.no_grad():
        if name == "t5":
            logits = ours(**inp, decoder_input_ids=seq[:, :-1]).logits  # (B, 8, V)
        else:
            n = inp["input_ids"].shape[1]
            logits = ours(**inp | dict(input_ids=seq[:, :-1], attention_mask=torch.cat(
                [inp["attention_mask"], torch.ones(2, 7, dtype=torch.long)], 1))).logits[:, n - 1:]
    assert bool((logits.topk(3).indices == seq[:, -8:, None]).any(-1).all())


@pytest.mark.parametrize("kw, match", [
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(length_penalty=float("inf")), "length_penalty"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(eos_token_id="x"), "eos_token_id"),
    (dict(seed=1, generator=torch.Generator()), "seed"),
    (dict(max_length=1), "max_length"),
])
def test_invalid_settings_name_the_setting(pair, kw, match):
    _, _, ours = pair
    with pytest.raises(ValueError, match=match):
        ours.generate(**inputs(False), **kw)


def test_unknown_keyword_and_beam_streamer(pair):
    _, _, ours = pair
    with pytest.raises(TypeError, match="num_beam"):
        ours.generate(**inputs(False), num_beam=2)
    with pytest.raises(ValueError, match="beam"):
        ours.generate(**inputs(False), num_beams=2, streamer=Recorder())


def test_prompt_too_long_and_generation_capped_at_the_positions():
    ours = blip2.Blip2ForConditionalGeneration(blip2.Blip2Config.from_dict(config().to_dict())).eval()
    max_pos = OPT["max_position_embeddings"]
    px = torch.randn(1, 3, 16, 16)
    ids = torch.cat([torch.full((1, NUM_QUERY), IMAGE_TOKEN), torch.randint(3, 90, (1, max_pos))], 1)
    with pytest.raises(ValueError, match="positions"):
        ours.generate(pixel_values=px, input_ids=ids)
    out = ours.generate(pixel_values=px, input_ids=ids[:, :max_pos - 3], max_new_tokens=50, eos_token_id=[])
    assert out.shape[1] == max_pos  # stopped where the positions run out instead of failing
    assert_same(ours.generate(pixel_values=px, input_ids=ids[:, :10], max_new_tokens=0), ids[:, :10])


class Recorder:
    def __init__(self):
        self.calls = []

    def put(self, ids):
        self.calls.append(ids.clone())

    def end(self):
        self.calls.append("end")


def test_streamer_protocol_as_reference(pair):
    _, ref, ours = pair
    inp = inputs(True)
    a, b = Recorder(), Recorder()
    out_ref = ref.generate(**inp, max_new_tokens=6, eos_token_id=EOS[pair[0]][0], streamer=a)
    out = ours.generate(**inp, max_new_tokens=6, eos_token_id=EOS[pair[0]][0], streamer=b)
    assert_same(out_ref, out)
    assert len(a.calls) == len(b.calls) and b.calls[-1] == "end"
    for x, y in zip(a.calls[:-1], b.calls[:-1]):
        assert_same(x, y)
    assert_same(torch.cat([b.calls[0]] + [t[:, None] for t in b.calls[1:-1]], 1), out)


class ScriptedLM(torch.nn.Module):
    """A decoder-only 'language model' that emits `script` whatever its input: for streaming tests."""

    def __init__(self, script, vocab):
        super().__init__()
        self.script, self.vocab, self.num_layers = script, vocab, 1
        self.config = types.SimpleNamespace(is_encoder_decoder=False, eos_token_id=script[-1], pad_token_id=1,
                                            bos_token_id=None, decoder_start_token_id=None)
        self.prompt_len = None

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, past_key_values=None, **_):
        b, t = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        self.prompt_len = self.prompt_len if input_ids is not None else t
        past_key_values.advance(t)
        step = past_key_values.length - self.prompt_len
        logits = torch.full((b, 1, self.vocab), -1e4)
        logits[:, 0, self.script[min(step, len(self.script) - 1)]] = 0
        return types.SimpleNamespace(logits=logits)


def test_text_stream_holds_back_split_characters(tmp_path):
    from bench.tiny_tokenizers import opt_tokenizer_dir
    from blip2.processing import Blip2Processor

    tok = Blip2Processor.from_pretrained(opt_tokenizer_dir(tmp_path)).tokenizer
    text = " a café in 東京 🙂🚀 done"
    script = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert any("\ufffd" in tok.decode([i]) for i in script)  # characters really are split across tokens
    lm = ScriptedLM(script, len(tok))
    def stream(**kw):
        return generation.text_pieces(generation.Decoding(lm, torch.zeros(1, 3, 4), input_ids=torch.tensor([[5, 6, 7]]),
                                                          max_new_tokens=40, **kw), tok)

    pieces = list(stream())
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert len(pieces) > 5
    lm.prompt_len = None  # a beam search streams its finished text at the end
    assert "".join(stream(num_beams=2)) == text


def test_text_pieces_match_generate(pair, tmp_path):
    name, _, ours = pair
    vocab = {i: chr(0x41 + i % 26) + ("é" if i % 3 == 0 else "") for i in range(ours.config.text_config.vocab_size)}
    tok = types.SimpleNamespace(decode=lambda ids, skip_special_tokens=True: "".join(vocab[i] for i in ids))
    px = inputs(False)["pixel_values"][:1]
    out = ours.generate(pixel_values=px, max_new_tokens=8)

    def stream(**kw):
        with torch.no_grad():
            run = generation.Decoding(ours.language_model, *ours.generation_inputs(pixel_values=px), **kw)
        return generation.text_pieces(run, tok)

    pieces = list(stream(max_new_tokens=8))
    new = out[0, 1:] if name == "t5" else out[0, NUM_QUERY + 1:]
    assert "".join(pieces) == tok.decode(new.tolist()) and len(pieces) == len(new)
    with pytest.raises(ValueError, match="one sequence"):
        list(stream(do_sample=True, num_return_sequences=2))


def test_reused_prompt_prefix_equals_fresh(pair):
    name, _, ours = pair
    px = inputs(False)["pixel_values"][:1]
    ids = torch.cat([torch.full((1, NUM_QUERY), IMAGE_TOKEN), torch.randint(3, 90, (1, 9))], 1)
    if name == "t5":
        with pytest.raises(ValueError, match="decoder-only"):
            ours.generate(pixel_values=px, input_ids=ids, past_key_values=KVCache(2))
        return
    embeds = ours.get_image_features(px).pooler_output
    for kw in (dict(), dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, seed=3)):
        fresh = ours.generate(image_embeds=embeds, input_ids=ids, max_new_tokens=8, **kw)
        cache = KVCache(ours.language_model.num_layers)
        ours.generate(image_embeds=embeds, input_ids=ids[:, :NUM_QUERY + 4], max_new_tokens=3, past_key_values=cache)
        cache.crop(NUM_QUERY + 4)  # the shorter prompt's positions: a prefix of the longer prompt
        assert_same(fresh, ours.generate(image_embeds=embeds, input_ids=ids, max_new_tokens=8, past_key_values=cache,
                                         **kw))


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3)], ids=["greedy", "beams"])
def test_stop_ends_decoding_between_tokens(pair, kw):
    """`stop` runs between tokens (before each step after the first token); what it raises ends the decoding."""
    _, _, ours = pair
    settings = dict(max_new_tokens=12, min_new_tokens=12) | kw
    full = ours.generate(**inputs(False), **settings)
    calls = []
    assert torch.equal(ours.generate(**inputs(False), stop=lambda: calls.append(1), **settings), full)
    assert len(calls) == 11  # a stop that never fires changes nothing; it ran before each of the 11 later steps

    def stop():
        calls.append(1)
        if len(calls) == 3:
            raise TimeoutError("time is up")

    calls.clear()
    with pytest.raises(TimeoutError, match="time is up"):
        ours.generate(**inputs(False), stop=stop, **settings)
    assert len(calls) == 3


def test_beam_search_steps_one_step_at_a_time(pair):
    """`steps()` drives a beam search step by step (nothing runs before the first item is asked for) and its
    result equals generate's."""
    _, _, ours = pair
    with torch.no_grad():
        run = generation.Decoding(ours.language_model, *ours.generation_inputs(**inputs(False)), num_beams=3,
                                  max_new_tokens=6, min_new_tokens=6)
        steps = run.steps()
        assert run.sequences is None
        first = next(steps)
        assert first.shape == (2 * 3,) and run.sequences is None
        assert 1 + sum(1 for _ in steps) == 6
    assert_same(run.sequences, ours.generate(**inputs(False), num_beams=3, max_new_tokens=6, min_new_tokens=6))
