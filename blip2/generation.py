"""Text generation over the language models, as transformers 5.24 generates: greedy, multinomial sampling and
beam search (with or without sampling), the reference's logits processors in the reference's order, one KV cache
(extra rows are the prompt's cache repeated, beams are rows reordered in place), HF-style streamers and a
text-streaming generator. Pieces: the logits processors (blip2/logits.py, built once per call), the steppers
(the language model's prompt pass and one step), beam search (blip2/beam.py, a step function over a BeamState),
and Decoding, whose `steps()` drives them.

Return value (as the reference): decoder-only -> prompt ids + new ids; encoder-decoder -> decoder_start + new ids.
Rows that finished early are padded with pad_token_id (beam search: with pad_token_id or, when that is 0 or unset,
eos_token_id[0], as the reference fills its beams).
"""

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, make_dataclass

import torch
import torch.nn.functional as F

from . import decoding, native
from .beam import BeamState, beam_result, beam_step
from .cache import KVCache
from .logits import logits_processors
from .ops import ModelOutput
from .tokenizer import TextStreamDecoder

DEFAULT_NEW_TOKENS = 20  # the reference's default max_length, counted on top of the prompt


@dataclass
class ReferenceSettings:
    """generate()'s settings beyond blip2.decoding's FIELDS (which GenerationConfig adds): lengths counted as the
    reference counts them, early stopping, token ids (defaulting to the language model's) and the sampling RNG."""

    max_length: int | None = None  # counts the whole decoder-only prompt, image tokens included
    min_length: int | None = None
    early_stopping: bool | str = False
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    generator: torch.Generator | None = None  # sampling RNG (default: torch's global one, as the reference)
    bad_words_ids: list | None = None  # token sequences never to generate (a list of lists of ids)
    remove_invalid_values: bool = False  # nan -> 0 and +-inf -> the dtype's extremes in the scores
    use_cache: bool = True  # accepted for the reference's signature: blip2 always decodes over its KV cache
    # what generate returns: the ids, or (return_dict_in_generate) a Generate*Output holding also what these ask for
    return_dict_in_generate: bool = False
    output_scores: bool = False
    output_logits: bool = False
    output_attentions: bool = False
    output_hidden_states: bool = False

    @classmethod
    def build(cls, lm_config, **kwargs):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"generate() got unexpected keyword argument(s): {', '.join(unknown)}")
        cfg = cls(**{k: v for k, v in kwargs.items() if v is not None})
        for name in ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id"):
            if getattr(cfg, name) is None:
                setattr(cfg, name, getattr(lm_config, name, None))
        if cfg.decoder_start_token_id is None:
            cfg.decoder_start_token_id = cfg.bos_token_id
        if cfg.pad_token_id is None and cfg.eos_ids:
            cfg.pad_token_id = cfg.eos_ids[0]
        cfg.validate()
        return cfg

    @property
    def eos_ids(self) -> list:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)

    def validate(self):
        """blip2.decoding.check over the FIELDS, then the reference's other settings; ValueError names the setting."""
        decoding.check({name: getattr(self, name) for name in decoding.BY_NAME})
        for name, low in (("max_length", 1), ("min_length", 0)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in self.eos_ids):
            raise ValueError(f"eos_token_id must be a token id or a list of them, got {self.eos_token_id!r}")
        if self.seed is not None and self.generator is not None:
            raise ValueError("pass either seed or generator, not both")
        words = self.bad_words_ids
        if words is not None and (not isinstance(words, (list, tuple)) or not words or not all(
                isinstance(w, (list, tuple)) and w and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                           for i in w) for w in words)):
            raise ValueError(f"bad_words_ids must be a non-empty list of non-empty lists of token ids, got {words!r}")


# The reference's decoding settings with its global defaults: blip2.decoding's FIELDS, then ReferenceSettings'.
GenerationConfig = make_dataclass(
    "GenerationConfig", [(f.name, f.type | None, field(default=f.default)) for f in decoding.FIELDS],
    bases=(ReferenceSettings,), namespace={"__doc__": "generate()'s settings: blip2.decoding's FIELDS (do_sample, "
                                           "num_beams, ..., seed) and ReferenceSettings' (max_length, ...)."})


# ---- steppers: the prompt pass, then one token a step, over one KV cache

class DecoderStepper:
    """OPT: the prompt's embeddings in one pass (after any prefix already in `cache`), then one token a step."""

    def __init__(self, lm, inputs_embeds, attention_mask, cache, want: dict | None = None):
        self.lm, self.embeds, self.mask = lm, inputs_embeds, attention_mask
        self.cache = cache if cache is not None else KVCache(lm.num_layers)
        self.want = want or {}  # output_attentions / output_hidden_states for return_dict_in_generate
        self.last = None  # the last pass's output (its attentions and hidden states when wanted)

    def start(self):
        new = self.embeds[:, self.cache.length:]
        self.last = self.lm(inputs_embeds=new, attention_mask=self.mask, past_key_values=self.cache, logits_to_keep=1,
                            **self.want)
        return self.last.logits[:, -1]  # (B, V)

    def step(self, tokens):  # tokens (N,)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        with native.decoding_step():
            self.last = self.lm(input_ids=tokens[:, None], attention_mask=self.mask, past_key_values=self.cache,
                                **self.want)
        return self.last.logits[:, -1]

    def reorder(self, index):
        self.cache.reorder(index)
        self.mask = self.mask.index_select(0, index)

    def close(self):
        pass


class EncoderDecoderStepper:
    """T5: the encoder once, then the decoder one token a step (cross-attention keys/values cached)."""

    def __init__(self, lm, inputs_embeds, attention_mask, start_id, want: dict | None = None):
        self.lm, self.mask, self.start_id = lm, attention_mask, start_id
        self.want = want or {}  # output_attentions / output_hidden_states for return_dict_in_generate
        self.encoder_out = lm.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **self.want)
        self.encoded = self.encoder_out.last_hidden_state
        self.cache = KVCache(lm.num_layers)
        self.last = None  # the last decoder pass's output

    def start(self):
        return self.step(torch.full(self.encoded.shape[:1], self.start_id, device=self.encoded.device))

    def step(self, tokens):
        with native.decoding_step():
            logits, self.last = self.lm.decode(tokens[:, None], self.encoded, self.mask, past_key_values=self.cache,
                                               **self.want)
        return logits[:, -1]

    def reorder(self, index):
        self.cache.reorder(index)
        self.mask = self.mask.index_select(0, index)
        self.encoded = self.encoded.index_select(0, index)

    def close(self):
        pass


def own_stepper(lm, inputs_embeds, attention_mask, past_key_values, start_id, want: dict | None = None):
    """The stepper of a decoding that runs alone: its own KV cache (blip2.scheduler's steppers share a batch).
    Every stepper has start() -> logits (B, V), step(tokens (N,)) -> logits (N, V), reorder(rows), `cache` (its
    rows' KVCache) and close(); these also keep their `last` output, with what `want` asks the model for
    (output_attentions / output_hidden_states, for return_dict_in_generate)."""
    if lm.config.is_encoder_decoder:
        return EncoderDecoderStepper(lm, inputs_embeds, attention_mask, start_id, want)
    return DecoderStepper(lm, inputs_embeds, attention_mask, past_key_values, want)


class Decoding:
    """One generate call. `steps()` runs the decoding loop and yields each step's chosen tokens (N,): final ones for
    greedy decoding and sampling; with beam search each running beam's newest token (beams are still reordered
    later). Once it is exhausted `sequences` holds what generate returns.

    `past_key_values`: a KVCache (decoder-only) already holding the first `length` positions of this prompt (a
    reused prefix); only the rest is computed. It is extended (and reordered) in place.
    `stop`: called between tokens (before each step of the language model); it ends the decoding by raising (the
    app's time limit, a client that went away). The exception reaches the caller; nothing half-done is returned.
    `stepper`: what builds the stepper (own_stepper's signature): by default the decoding's own; a
    blip2.scheduler.Scheduler's puts its rows into a shared batch (then `close()` it once done)."""

    def __init__(self, lm, inputs_embeds, attention_mask=None, input_ids=None, past_key_values=None,
                 stop: Callable[[], None] | None = None, stepper: Callable = None, **kwargs):
        self.stop = stop or (lambda: None)
        cfg = self.cfg = GenerationConfig.build(lm.config, **kwargs)
        b, t, device = inputs_embeds.shape[0], inputs_embeds.shape[1], inputs_embeds.device
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long, device=device)
        self.encdec = encdec = lm.config.is_encoder_decoder
        # return_dict_in_generate: what each step keeps (Record), and what the language model must return for it
        self.record = Record() if cfg.return_dict_in_generate else None
        want = {k: True for k in ("output_attentions", "output_hidden_states") if self.record and getattr(cfg, k)}
        if encdec:
            if past_key_values is not None:
                raise ValueError("past_key_values (a reused prompt prefix) needs a decoder-only language model")
            prompt = torch.full((b, 1), cfg.decoder_start_token_id, dtype=torch.long, device=device)
        else:
            if past_key_values is not None and not 0 <= past_key_values.length < t:
                raise ValueError(f"the reused prefix holds {past_key_values.length} positions; it must be shorter "
                                 f"than the prompt ({t})")
            prompt = input_ids if input_ids is not None else torch.zeros(b, 0, dtype=torch.long, device=device)
        self.prompt = prompt.to(device)  # (B, L)
        n = self.prompt.shape[1]
        extra = 0 if encdec else t - n  # prompt positions without ids (the reference subtracts them)
        max_pos = None if encdec else getattr(lm.config, "max_position_embeddings", None)
        self.max_length, min_length = _lengths(cfg, n, extra, max_pos, attention_mask)
        # decoding rows per prompt: the beams, or the samples
        self.expand = cfg.num_beams if cfg.num_beams > 1 else cfg.num_return_sequences
        self.rows = b * cfg.num_return_sequences  # rows returned
        self.eos = torch.tensor(cfg.eos_ids, dtype=torch.long, device=device) if cfg.eos_ids else None
        self.generator = cfg.generator if cfg.seed is None else torch.Generator(device).manual_seed(cfg.seed)
        # repetition penalty: the reference skips a decoder-only prompt's leading padding
        skip = None
        if not encdec and cfg.repetition_penalty != 1.0 and n:
            skip = (attention_mask[:, -n:] != 0).int().argmax(1).repeat_interleave(self.expand)
        self.processors = logits_processors(cfg, min_length, self.eos, skip)
        self.sequences = None
        if want and stepper is not None:
            raise ValueError("output_attentions / output_hidden_states in generate need the decoding's own stepper")
        self.stepper = (stepper or own_stepper)(lm, inputs_embeds, attention_mask, past_key_values,
                                                cfg.decoder_start_token_id, **({"want": want} if want else {}))

    def steps(self) -> Iterator[torch.Tensor]:
        if self.max_length <= self.prompt.shape[1]:  # max_new_tokens=0
            self.sequences = self.prompt.repeat_interleave(self.cfg.num_return_sequences, 0)
            return iter(())
        return self._beam_steps() if self.cfg.num_beams > 1 else self._sample_steps()

    __iter__ = steps

    def run(self):
        for _ in self.steps():
            pass
        return self.sequences

    def scores(self, ids: torch.Tensor, logits: torch.Tensor, raw: torch.Tensor | None = None) -> torch.Tensor:
        """A step's scores (N, V) fp32: the processors over `logits` (N, V) given every token so far (N, T). Every
        step of either search comes through here (beam search hands its log-probabilities, and the model's `raw`
        logits), and so does the record of return_dict_in_generate."""
        scores = logits.float()
        for process in self.processors:
            scores = process(ids, scores)
        if self.record is not None:
            self.record.step(self.cfg, logits.float() if raw is None else raw.float(), scores,
                             getattr(self.stepper, "last", None))
        return scores

    def output(self) -> "ModelOutput":
        """What generate returns with return_dict_in_generate, as the reference's Generate*Output classes."""
        cfg, rec, beams = self.cfg, self.record, self.cfg.num_beams > 1
        kw = dict(sequences=self.sequences, scores=rec.get(cfg.output_scores, rec.scores),
                  logits=rec.get(cfg.output_logits, rec.logits), past_key_values=self.stepper.cache)
        if beams:
            r = cfg.num_return_sequences
            kw["sequences_scores"] = self.beam.scores_done[:, :r].flatten() if cfg.output_scores else None
            kw["beam_indices"] = self.beam.src_done[:, :r].flatten(0, 1)[:, :self.sequences.shape[1]
                                                                             - self.prompt.shape[1]].long()
        attn, hidden = rec.get(cfg.output_attentions, rec.attentions), rec.get(cfg.output_hidden_states, rec.hidden)
        if self.encdec:
            enc = getattr(self.stepper, "encoder_out", None)  # (a scheduler's stepper keeps none)
            return (GenerateBeamEncoderDecoderOutput if beams else GenerateEncoderDecoderOutput)(
                **kw, encoder_attentions=getattr(enc, "attentions", None),
                encoder_hidden_states=getattr(enc, "hidden_states", None),
                decoder_attentions=attn, cross_attentions=rec.get(cfg.output_attentions, rec.cross),
                decoder_hidden_states=hidden)
        return (GenerateBeamDecoderOnlyOutput if beams else GenerateDecoderOnlyOutput)(
            **kw, attentions=attn, hidden_states=hidden)

    def reusable(self) -> tuple[torch.Tensor, KVCache] | None:
        """For a decoder-only model, (ids (T,), cache) to reuse as the prefix of a later prompt: with one decoding
        row the prompt and the answer so far, otherwise (beams, samples, or stopped early) the prompt only."""
        if self.encdec:
            return None
        cache, n = self.stepper.cache, self.prompt.shape[1]
        if cache is None or cache.length < n:  # nothing computed (a failed or batched-out decoding)
            return None
        if cache.k[0].shape[0] == 1 and self.sequences is not None:
            return self.sequences[0, :cache.length].clone(), cache
        cache.crop(n)
        if cache.k[0].shape[0] > 1:
            cache.reorder(torch.zeros(1, dtype=torch.long, device=self.prompt.device))
        return self.prompt[0].clone(), cache

    def close(self) -> None:
        """Release what the stepper holds (a batch's rows); the decoding cannot go on after."""
        self.stepper.close()

    def _expanded_start(self):
        """The prompt pass for B rows, then its cache and logits repeated for every beam / sample."""
        logits = self.stepper.start()
        if self.expand > 1:
            index = torch.arange(logits.shape[0], device=logits.device).repeat_interleave(self.expand)
            self.stepper.reorder(index)
            logits = logits.index_select(0, index)
            if getattr(self.stepper, "last", None) is not None:  # the reference's prompt pass runs on these rows
                self.stepper.last = select_rows(self.stepper.last, index)
                if self.encdec:
                    self.stepper.encoder_out = select_rows(self.stepper.encoder_out, index)
        return logits

    def _sample_steps(self):
        """Greedy decoding or multinomial sampling; yields each step's tokens (N,)."""
        cfg, stepper = self.cfg, self.stepper
        n = self.prompt.shape[1]
        prompt = self.prompt.repeat_interleave(self.expand, 0)
        seq = prompt.new_empty(prompt.shape[0], self.max_length)  # (N, max_length), filled up to `cur`
        seq[:, :n] = prompt
        logits = self._expanded_start()
        unfinished = torch.ones(prompt.shape[0], dtype=torch.bool, device=seq.device)
        cur = n
        while True:
            scores = self.scores(seq[:, :cur], logits)
            if cfg.do_sample:
                token = torch.multinomial(F.softmax(scores, dim=-1), 1, generator=self.generator)[:, 0]
            else:
                token = scores.argmax(-1)
            if self.eos is not None:
                token = torch.where(unfinished, token, cfg.pad_token_id)
            seq[:, cur] = token
            cur += 1
            yield token
            if self.eos is not None:
                unfinished &= ~torch.isin(token, self.eos)
            if cur >= self.max_length or not bool(unfinished.any()):
                break
            self.stop()
            logits = stepper.step(token)
        self.sequences = seq[:, :cur]

    def _beam_steps(self):
        """Beam search (beam_step over a BeamState); yields each step's running beams' newest tokens (B*k,)."""
        cfg, n = self.cfg, self.prompt.shape[1]
        fill = -1 if self.eos is None else (cfg.pad_token_id or cfg.eos_ids[0])
        state = BeamState.start(self.prompt, cfg.num_beams, self.max_length, fill)
        logits = self._expanded_start()
        cur = n
        while True:
            if cur > n:
                self.stop()
                logits = self.stepper.step(state.running[:, :, cur - 1].flatten())
            log_probs = self.scores(state.running[:, :, :cur].flatten(0, 1), F.log_softmax(logits.float(), dim=-1),
                                    raw=logits)
            state, rows, over = beam_step(state, log_probs, cur, n, self.max_length, cfg, self.eos, self.generator)
            self.stepper.reorder(rows)
            yield state.running[:, :, cur].flatten()
            cur += 1
            if over:
                break
        self.sequences = beam_result(state, n, cfg.num_return_sequences)
        self.beam = state


# ---- return_dict_in_generate: the reference's output classes and the record each step adds to

@dataclass
class Record:
    """Per step: raw logits and processed scores (N, V); the language model's attentions and hidden states (tuples
    over layers); T5's cross-attentions."""

    scores: list = field(default_factory=list)
    logits: list = field(default_factory=list)
    attentions: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    cross: list = field(default_factory=list)

    def step(self, cfg, logits, scores, out) -> None:
        if cfg.output_scores:
            self.scores.append(scores)
        if cfg.output_logits:
            self.logits.append(logits)
        if cfg.output_attentions:
            self.attentions.append(out.attentions)
            self.cross.append(getattr(out, "cross_attentions", None))
        if cfg.output_hidden_states:
            self.hidden.append(out.hidden_states)

    @staticmethod
    def get(wanted: bool, steps: list) -> tuple | None:
        return tuple(steps) if wanted else None


def select_rows(out, index: torch.Tensor):
    """A model output with the rows of its tensors (and tuples of them) taken at `index`."""
    for k, v in list(vars(out).items()):
        if isinstance(v, torch.Tensor):
            setattr(out, k, v.index_select(0, index))
        elif isinstance(v, tuple) and v and all(isinstance(t, torch.Tensor) for t in v):
            setattr(out, k, tuple(t.index_select(0, index) for t in v))
    return out


def _output_class(name: str, *names: str) -> type:
    """One of the reference's Generate*Output classes: its fields in its order, all None by default."""
    return make_dataclass(name, [(n, object, field(default=None)) for n in names], bases=(ModelOutput,))


_DECODER_ONLY = ("attentions", "hidden_states", "past_key_values")
_ENCODER_DECODER = ("encoder_attentions", "encoder_hidden_states", "decoder_attentions", "cross_attentions",
                    "decoder_hidden_states", "past_key_values")
GenerateDecoderOnlyOutput = _output_class("GenerateDecoderOnlyOutput", "sequences", "scores", "logits",
                                          *_DECODER_ONLY)
GenerateEncoderDecoderOutput = _output_class("GenerateEncoderDecoderOutput", "sequences", "scores", "logits",
                                             *_ENCODER_DECODER)
GenerateBeamDecoderOnlyOutput = _output_class("GenerateBeamDecoderOnlyOutput", "sequences", "sequences_scores",
                                              "scores", "logits", "beam_indices", *_DECODER_ONLY)
GenerateBeamEncoderDecoderOutput = _output_class("GenerateBeamEncoderDecoderOutput", "sequences", "sequences_scores",
                                                 "scores", "logits", "beam_indices", *_ENCODER_DECODER)


def _lengths(cfg, n, extra, max_pos, attention_mask):
    """(max_length, min_length) of the returned rows for a prompt of n ids (+ `extra` positions without ids), as
    the reference counts them; generation also stops where a decoder's `max_pos` positions run out."""
    real = 0 if max_pos is None else int(attention_mask.sum(1).max())  # positions the longest row takes
    if max_pos is not None and real >= max_pos:
        raise ValueError(f"the prompt has {real} tokens (image tokens included) but the language model has "
                         f"{max_pos} positions: shorten the prompt")
    if cfg.max_new_tokens is not None:
        max_length = n + cfg.max_new_tokens
    elif cfg.max_length is not None:
        max_length = cfg.max_length - extra
    else:  # 20 new tokens, within the positions counted as the reference counts them (padding included)
        max_length = min(n + DEFAULT_NEW_TOKENS, max_pos or math.inf)
    if max_length <= n and cfg.max_new_tokens is None:
        raise ValueError(f"max_length ({cfg.max_length or max_length}) must exceed the prompt length ({n + extra}); "
                         "set max_new_tokens instead")
    if max_pos is not None:
        max_length = min(max_length, n + max_pos - real)
    min_length = n + cfg.min_new_tokens if cfg.min_new_tokens is not None else max((cfg.min_length or 0) - extra, 0)
    return max_length, min_length


@torch.no_grad()
def generate(lm, inputs_embeds, attention_mask=None, input_ids=None, streamer=None, past_key_values=None, **kwargs):
    """Decode from prompt embeddings. `streamer` (HF protocol): put(prompt ids), then put(new tokens (N,)) each
    step, then end(); not with beam search (as the reference)."""
    run = Decoding(lm, inputs_embeds, attention_mask, input_ids, past_key_values, **kwargs)
    if streamer is None:
        run.run()
        return run.output() if run.cfg.return_dict_in_generate else run.sequences
    if run.cfg.num_beams > 1:
        raise ValueError("streamer cannot be used with beam search (num_beams > 1), as in the reference")
    streamer.put(run.prompt.repeat_interleave(run.expand, 0).cpu())
    for token in run.steps():
        streamer.put(token.cpu())
    streamer.end()
    return run.output() if run.cfg.return_dict_in_generate else run.sequences


def text_pieces(run: Decoding, tokenizer, skip_special_tokens=True):
    """Drive `run` and yield its new text as it completes: characters split across tokens come out whole, beam
    search yields its finished text at the end. Closing the iterator stops the decoding."""
    if run.rows != 1:
        raise ValueError(f"text streaming needs one sequence, got {run.rows} (batch x num_return_sequences)")
    beams = run.cfg.num_beams > 1  # a beam's tokens are not final until the search ends

    @torch.no_grad()
    def pieces():
        text = TextStreamDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
        for token in run.steps():
            piece = "" if beams else text.put(token)
            if piece:
                yield piece
        tail = (text.put(run.sequences[0, run.prompt.shape[1]:]) if beams else "") + text.end()
        if tail:
            yield tail

    return pieces()
