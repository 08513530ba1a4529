"""Text generation over the language models, as transformers 5.24 generates: greedy, multinomial sampling and
beam search (with or without sampling), the reference's logits processors in the reference's order, one KV cache
(extra rows are the prompt's cache repeated, beams are rows reordered in place), HF-style streamers and a
text-streaming generator.

Return value (as the reference): decoder-only -> prompt ids + new ids; encoder-decoder -> decoder_start + new ids.
Rows that finished early are padded with pad_token_id (beam search: with pad_token_id or, when that is 0 or unset,
eos_token_id[0], as the reference fills its beams).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .cache import KVCache
from .tokenizer import TextStreamDecoder

DEFAULT_NEW_TOKENS = 20  # the reference's default max_length, counted on top of the prompt


@dataclass
class GenerationConfig:
    """The reference's decoding settings with its global defaults; token ids default to the language model's."""

    max_new_tokens: int | None = None
    max_length: int | None = None  # counts the whole decoder-only prompt, image tokens included
    min_new_tokens: int | None = None
    min_length: int | None = None
    do_sample: bool = False
    num_beams: int = 1
    num_return_sequences: int = 1
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    generator: torch.Generator | None = None  # sampling RNG (default: torch's global one, as the reference)
    seed: int | None = None  # shorthand for a fresh generator seeded with this

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
        def integer(name, low):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")

        def number(name, ok, rule):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise ValueError(f"{name} must be {rule}, got {v!r}")

        for name, low in (("max_new_tokens", 0), ("max_length", 1), ("min_new_tokens", 0), ("min_length", 0),
                          ("num_beams", 1), ("num_return_sequences", 1), ("top_k", 0), ("no_repeat_ngram_size", 0),
                          ("seed", 0)):
            integer(name, low)
        if self.do_sample:
            number("temperature", lambda v: v > 0, "a number > 0 when sampling (for greedy decoding use "
                                                   "do_sample=False)")
        number("top_p", lambda v: 0 < v <= 1, "in (0, 1]")
        number("repetition_penalty", lambda v: v > 0, "a number > 0 (1.0 = no penalty)")
        number("length_penalty", lambda v: True, "a finite number")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be True or False, got {self.do_sample!r}")
        if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in self.eos_ids):
            raise ValueError(f"eos_token_id must be a token id or a list of them, got {self.eos_token_id!r}")
        n = self.num_return_sequences
        if self.num_beams == 1 and not self.do_sample and n > 1:
            raise ValueError(f"num_return_sequences={n} needs beam search (num_beams >= {n}) or sampling "
                             "(do_sample=True); greedy decoding returns one sequence per prompt")
        if self.num_beams > 1 and n > self.num_beams:
            raise ValueError(f"num_return_sequences ({n}) must be <= num_beams ({self.num_beams})")
        if self.seed is not None and self.generator is not None:
            raise ValueError("pass either seed or generator, not both")


class _DecoderOnly:
    """OPT: the prompt's embeddings in one pass (after any prefix already in `cache`), then one token a step."""

    def __init__(self, lm, inputs_embeds, attention_mask, cache):
        self.lm, self.embeds, self.mask = lm, inputs_embeds, attention_mask
        self.cache = cache if cache is not None else KVCache(lm.num_layers)

    def start(self):
        new = self.embeds[:, self.cache.length:]
        out = self.lm(inputs_embeds=new, attention_mask=self.mask, past_key_values=self.cache, logits_to_keep=1)
        return out.logits[:, -1]  # (B, V)

    def step(self, tokens):  # tokens (N,)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        return self.lm(input_ids=tokens[:, None], attention_mask=self.mask, past_key_values=self.cache).logits[:, -1]

    def reorder(self, index):
        self.cache.reorder(index)
        self.mask = self.mask.index_select(0, index)


class _EncoderDecoder:
    """T5: the encoder once, then the decoder one token a step (cross-attention keys/values cached)."""

    def __init__(self, lm, inputs_embeds, attention_mask, start_id):
        self.lm, self.mask, self.start_id = lm, attention_mask, start_id
        self.encoded = lm.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        self.cache = KVCache(lm.num_layers)

    def start(self):
        return self.step(torch.full(self.encoded.shape[:1], self.start_id, device=self.encoded.device))

    def step(self, tokens):
        logits, _ = self.lm.decode(tokens[:, None], self.encoded, self.mask, past_key_values=self.cache)
        return logits[:, -1]

    def reorder(self, index):
        self.cache.reorder(index)
        self.mask = self.mask.index_select(0, index)
        self.encoded = self.encoded.index_select(0, index)


class Decoding:
    """One generate call. Iterating runs the decoding loop and yields each step's new tokens (N,) (beam search
    yields nothing until it is done); `sequences` then holds what generate returns.

    `past_key_values`: a KVCache (decoder-only) already holding the first `length` positions of this prompt (a
    reused prefix); only the rest is computed. It is extended (and reordered) in place.
    `stop`: called between tokens (before each step of the language model); it ends the decoding by raising (the
    app's time limit, a client that went away). The exception reaches the caller; nothing half-done is returned."""

    def __init__(self, lm, inputs_embeds, attention_mask=None, input_ids=None, past_key_values=None,
                 stop: Callable[[], None] | None = None, **kwargs):
        self.stop = stop or (lambda: None)
        cfg = self.cfg = GenerationConfig.build(lm.config, **kwargs)
        b, t, device = inputs_embeds.shape[0], inputs_embeds.shape[1], inputs_embeds.device
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long, device=device)
        encdec = lm.config.is_encoder_decoder
        if encdec:
            if past_key_values is not None:
                raise ValueError("past_key_values (a reused prompt prefix) needs a decoder-only language model")
            self.model = _EncoderDecoder(lm, inputs_embeds, attention_mask, cfg.decoder_start_token_id)
            prompt = torch.full((b, 1), cfg.decoder_start_token_id, dtype=torch.long, device=device)
        else:
            if past_key_values is not None and not 0 <= past_key_values.length < t:
                raise ValueError(f"the reused prefix holds {past_key_values.length} positions; it must be shorter "
                                 f"than the prompt ({t})")
            self.model = _DecoderOnly(lm, inputs_embeds, attention_mask, past_key_values)
            prompt = input_ids if input_ids is not None else torch.zeros(b, 0, dtype=torch.long, device=device)
        self.prompt = prompt.to(device)  # (B, L)
        n = self.prompt.shape[1]
        extra = 0 if encdec else t - n  # prompt positions without ids (the reference subtracts them)
        max_pos = None if encdec else getattr(lm.config, "max_position_embeddings", None)
        self.max_length, self.min_length = _lengths(cfg, n, extra, max_pos, attention_mask)
        self.beams = cfg.num_beams > 1
        self.expand = cfg.num_beams if self.beams else cfg.num_return_sequences  # decoding rows per prompt
        self.rows = b * cfg.num_return_sequences  # rows returned
        self.eos = torch.tensor(cfg.eos_ids, dtype=torch.long, device=device) if cfg.eos_ids else None
        self.generator = cfg.generator if cfg.seed is None else torch.Generator(device).manual_seed(cfg.seed)
        # repetition penalty: the reference skips a decoder-only prompt's leading padding
        self.skip = None
        if not encdec and cfg.repetition_penalty != 1.0 and n:
            self.skip = (attention_mask[:, -n:] != 0).int().argmax(1).repeat_interleave(self.expand)
        self.sequences = None

    def __iter__(self):
        if self.max_length <= self.prompt.shape[1]:  # max_new_tokens=0
            self.sequences = self.prompt.repeat_interleave(self.cfg.num_return_sequences, 0)
            return iter(())
        if self.beams:
            self._beam_search()
            return iter(())
        return self._sample()

    def run(self):
        for _ in self:
            pass
        return self.sequences

    def _expanded_start(self):
        """The prompt pass for B rows, then its cache and logits repeated for every beam / sample."""
        logits = self.model.start()
        if self.expand > 1:
            index = torch.arange(logits.shape[0], device=logits.device).repeat_interleave(self.expand)
            self.model.reorder(index)
            logits = logits.index_select(0, index)
        return logits

    def _process(self, ids, scores):
        """The reference's logits processors in its order. ids (N, T): every token so far; scores (N, V) fp32."""
        cfg = self.cfg
        (n, t), v = ids.shape, scores.shape[-1]
        if cfg.repetition_penalty != 1.0:
            ids_in = ids.clamp(max=v)  # column v collects what the penalty must not touch
            if self.skip is not None:
                ids_in = ids_in.masked_fill(torch.arange(t, device=ids.device) < self.skip[:, None], v)
            seen = torch.zeros(n, v + 1, dtype=torch.bool, device=ids.device).scatter_(1, ids_in, True)[:, :v]
            p = cfg.repetition_penalty
            scores = torch.where(seen, torch.where(scores < 0, scores * p, scores / p), scores)
        size = cfg.no_repeat_ngram_size
        if size and t >= size:  # ban the tokens that would complete an n-gram seen before
            windows = ids.unfold(1, size, 1)  # (N, W, size)
            matches = (windows[..., :-1] == ids[:, t + 1 - size:][:, None]).all(-1)
            banned = torch.zeros(n, v + 1, dtype=torch.bool, device=ids.device)
            banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=v), v), True)
            scores = scores.masked_fill(banned[:, :v], -math.inf)
        if t < self.min_length and self.eos is not None:
            scores = scores.masked_fill(torch.isin(torch.arange(v, device=ids.device), self.eos), -math.inf)
        if cfg.do_sample:
            keep = (len(self.eos) + 1 if self.eos is not None else 2) if self.beams else 1
            if cfg.temperature != 1.0:
                scores = scores / cfg.temperature
            if cfg.top_k:
                k = min(max(cfg.top_k, keep), v)
                scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1:], -math.inf)
            if cfg.top_p < 1.0:
                sorted_scores, order = torch.sort(scores, descending=False)
                remove = sorted_scores.softmax(-1).cumsum(-1) <= (1 - cfg.top_p)
                remove[..., -keep:] = False
                scores = scores.masked_fill(remove.scatter(1, order, remove), -math.inf)
        return scores

    def _sample(self):
        """Greedy or multinomial sampling; yields each step's tokens (N,)."""
        cfg, model = self.cfg, self.model
        n = self.prompt.shape[1]
        prompt = self.prompt.repeat_interleave(self.expand, 0)
        seq = prompt.new_empty(prompt.shape[0], self.max_length)  # (N, max_length), filled up to `cur`
        seq[:, :n] = prompt
        logits = self._expanded_start()
        unfinished = torch.ones(prompt.shape[0], dtype=torch.bool, device=seq.device)
        cur = n
        while True:
            scores = self._process(seq[:, :cur], logits.float())
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
            logits = model.step(token)
        self.sequences = seq[:, :cur]

    def _beam_search(self):
        """The reference's vectorised beam search: keep the best `keep` continuations of all beams, run the best
        `num_beams` unfinished ones, and merge finished ones (score / new_length ** length_penalty) into the
        `num_beams` best hypotheses."""
        cfg, model = self.cfg, self.model
        b, n, k = self.prompt.shape[0], self.prompt.shape[1], cfg.num_beams
        n_eos = 0 if self.eos is None else len(self.eos)
        keep = max(2, 1 + n_eos) * k
        top_k_mask = torch.arange(keep, device=self.prompt.device) < k
        fill = -1 if self.eos is None else (cfg.pad_token_id or cfg.eos_ids[0])
        running = self.prompt.new_full((b, k, self.max_length), fill)  # (B, k, max_length)
        running[:, :, :n] = self.prompt[:, None]
        sequences = running.clone()  # the best finished hypotheses
        running_scores = torch.zeros(b, k, device=running.device)
        running_scores[:, 1:] = -1e9  # only the first beam's continuations count at the first step
        scores_done = torch.full((b, k), -1e9, device=running.device)
        finished = torch.zeros(b, k, dtype=torch.bool, device=running.device)
        improvable = torch.ones(b, 1, dtype=torch.bool, device=running.device)
        running_src = torch.full((b, k, self.max_length - n), -1, dtype=torch.int32, device=running.device)
        src_done = running_src.clone()  # (B, k, new) flat source row of each new token
        offset = torch.arange(b, device=running.device)[:, None] * k
        logits = self._expanded_start()
        cur = n
        while True:
            if cur > n:
                self.stop()
                logits = model.step(running[:, :, cur - 1].flatten())
            log_probs = self._process(running[:, :, :cur].flatten(0, 1), F.log_softmax(logits.float(), dim=-1))
            v = log_probs.shape[-1]
            log_probs = (log_probs.view(b, k, v) + running_scores[:, :, None]).view(b, k * v)
            if cfg.do_sample:
                pick = torch.multinomial(F.softmax(log_probs, dim=-1), keep, generator=self.generator)
                top_scores, order = log_probs.gather(1, pick).sort(dim=-1, descending=True)
                pick = pick.gather(1, order)
            else:
                top_scores, pick = torch.topk(log_probs, keep)  # (B, keep)
            beam = pick // v
            top_seq = _gather(running, beam)  # (B, keep, max_length)
            top_seq[:, :, cur] = pick % v
            top_src = _gather(running_src, beam)
            top_src[:, :, cur - n] = (beam + offset).int()
            hits = torch.full((b, keep), cur + 1 >= self.max_length, dtype=torch.bool, device=running.device)
            if self.eos is not None:
                hits |= torch.isin(top_seq[:, :, cur], self.eos)
            # the best unfinished continuations run on
            run_scores = top_scores + hits.to(torch.float32) * -1.0e9
            nxt = torch.topk(run_scores, k)[1]
            running, running_scores = _gather(top_seq, nxt), _gather(run_scores, nxt)
            running_src = _gather(top_src, nxt)
            # finished continuations among the top k join the hypotheses if they score better
            just_done = hits & top_k_mask[None, :]
            done_scores = top_scores / ((cur + 1 - n) ** cfg.length_penalty)
            full = torch.all(finished, dim=-1, keepdim=True) & (cfg.early_stopping is True)
            done_scores += full.to(torch.float32) * -1.0e9
            done_scores += (~improvable).to(torch.float32) * -1.0e9
            done_scores += (~just_done) * -1.0e9
            merged = torch.topk(torch.cat((scores_done, done_scores), 1), k)[1]
            sequences = _gather(torch.cat((sequences, top_seq), 1), merged)
            scores_done = _gather(torch.cat((scores_done, done_scores), 1), merged)
            src_done = _gather(torch.cat((src_done, top_src), 1), merged)
            finished = _gather(torch.cat((finished, just_done), 1), merged)
            model.reorder(running_src[:, :, cur - n].flatten().long())
            cur += 1
            # can a running beam still beat the worst finished hypothesis?
            if cfg.early_stopping == "never" and cfg.length_penalty > 0.0:
                best_len = self.max_length - n
            else:
                best_len = cur - n
            best_running = running_scores[:, :1] / (best_len ** cfg.length_penalty)
            worst_done = torch.where(finished, torch.min(scores_done, dim=1, keepdim=True)[0], -1.0e9)
            improvable = improvable & torch.any(best_running > worst_done, dim=-1, keepdim=True)
            open_beams = ~(torch.all(finished) & (cfg.early_stopping is True))
            if not bool(torch.any(improvable) & open_beams & ~torch.all(hits)):
                break
        r = cfg.num_return_sequences
        sequences, src_done = sequences[:, :r].flatten(0, 1), src_done[:, :r].flatten(0, 1)
        self.sequences = sequences[:, :n + int((src_done + 1).bool().sum(1).max())]


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


def _gather(t, index):
    """Select along dim 1 (beams) per batch row: t (B, K, ...), index (B, J) -> (B, J, ...)."""
    return torch.take_along_dim(t, index.view(*index.shape, *[1] * (t.dim() - 2)), dim=1)


@torch.no_grad()
def generate(lm, inputs_embeds, attention_mask=None, input_ids=None, streamer=None, past_key_values=None, **kwargs):
    """Decode from prompt embeddings. `streamer` (HF protocol): put(prompt ids), then put(new tokens (N,)) each
    step, then end(); not with beam search (as the reference)."""
    run = Decoding(lm, inputs_embeds, attention_mask, input_ids, past_key_values, **kwargs)
    if streamer is None:
        return run.run()
    if run.beams:
        raise ValueError("streamer cannot be used with beam search (num_beams > 1), as in the reference")
    streamer.put(run.prompt.repeat_interleave(run.expand, 0).cpu())
    for token in run:
        streamer.put(token.cpu())
    streamer.end()
    return run.sequences


def stream(lm, tokenizer, inputs_embeds, attention_mask=None, input_ids=None, past_key_values=None,
           skip_special_tokens=True, **kwargs):
    """An iterator over the new text, piece by piece as tokens arrive, for one sequence (batch 1, one return
    sequence); see text_pieces. Settings are checked (and a T5 prompt encoded) before it is returned."""
    with torch.no_grad():
        run = Decoding(lm, inputs_embeds, attention_mask, input_ids, past_key_values, **kwargs)
    return text_pieces(run, tokenizer, skip_special_tokens)


def text_pieces(run: Decoding, tokenizer, skip_special_tokens=True):
    """Drive `run` and yield its new text as it completes: characters split across tokens come out whole, beam
    search yields its finished text at the end. Closing the iterator stops the decoding."""
    if run.rows != 1:
        raise ValueError(f"text streaming needs one sequence, got {run.rows} (batch x num_return_sequences)")

    @torch.no_grad()
    def pieces():
        text = TextStreamDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
        for token in run:
            piece = text.put(token)
            if piece:
                yield piece
        tail = (text.put(run.sequences[0, run.prompt.shape[1]:]) if run.beams else "") + text.end()
        if tail:
            yield tail

    return pieces()
