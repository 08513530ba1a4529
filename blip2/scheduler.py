"""The batching loop under the captioner (continuous batching): every decoding of one language model puts its rows
into one running batch, and one forward pass a turn steps that batch.

A request's Decoding (blip2.generation) runs in its caller's thread as when it runs alone: processors, sampling with
its own generator, beam search, its `stop` callback, its stream. Only its stepper is the scheduler's (`stepper`, the
factory Decoding takes): `start()` hands the prompt to the loop, `step(tokens)` hands the next tokens, and each
waits for its rows' logits. Once every row in the batch has handed its tokens, one of the waiting threads runs the
turn (the loop has no thread of its own: a lone request runs in its thread as alone): one forward pass for all of
them, then one prompt pass for the requests that arrived meanwhile, whose rows it merges into the batch; an image
encode waits for the same moment (one image a turn, so a running batch never stalls for more than one). A request
leaves when its decoding ends, fails or is stopped (`close()`): its rows go at the next turn.

Layout: padding. The rows are aligned on their last position: a shorter row is padded in front and the attention
mask hides the padding; OPT's positions come from the mask and T5's relative position bias depends only on the
distance between positions, so each row sees what it sees alone (float32: the same ids, tests/test_scheduler.py).
In a prompt pass, a row's reused chat prefix and its new positions are each padded in front, so the masked holes
sit between them. Padding that no row needs any more is dropped when rows leave. A ragged layout (one cache per
request) would need one attention call per request and layer on every step, and changes to the models; padding
costs attention over a few masked positions, small beside the weights a step reads.
Beam search and several samples per request are rows of the same batch: the Decoding reorders its own rows.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import native
from .cache import KVCache

GATHER_S = 0.01  # an idle loop waits this long after a first arrival, so that a burst's prompts run in one pass


class Closed(Exception):
    """The request left the batch (its decoding was closed)."""


class _Request:
    """One decoding's place in the batch: its rows, what it handed to the loop, and what came back."""

    def __init__(self, scheduler: Scheduler, embeds, mask, prefix: KVCache | None, start_id: int | None):
        self.scheduler, self.prompt = scheduler, (embeds, mask, prefix, start_id)
        self.rows = embeds.shape[0]
        self.tokens = None  # handed to the loop for the next step, (rows,)
        self.index = None  # rows to take before the next step (beam search's reorder), (rows',)
        self.result = None  # logits (rows, V) or an exception, from the loop
        self.joined = self.left = False

    # the stepper protocol (blip2.generation.own_stepper)

    def start(self) -> torch.Tensor:
        return self.scheduler.submit(self, None)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.scheduler.submit(self, tokens)

    def reorder(self, index: torch.Tensor) -> None:
        self.index = index if self.index is None else self.index[index]

    @property
    def cache(self) -> KVCache | None:
        """A copy of this request's rows of the batch's cache (a chat prefix to keep); None when it has none."""
        return self.scheduler.rows_of(self)

    def close(self) -> None:
        self.scheduler.leave(self)


class _Batch:
    """The rows being decoded: one KV cache and attention mask (rows, T), for T5 also the encoder outputs."""

    def __init__(self, cache: KVCache, mask: torch.Tensor, encoded: torch.Tensor | None = None,
                 encoded_mask: torch.Tensor | None = None):
        self.cache, self.mask, self.encoded, self.encoded_mask = cache, mask, encoded, encoded_mask

    def take(self, index: torch.Tensor) -> None:
        """Keep the rows `index`, then drop the front positions that every row pads."""
        self.cache.reorder(index)
        self.mask = self.mask.index_select(0, index)
        if self.encoded is not None:
            self.encoded = self.encoded.index_select(0, index)
            self.encoded_mask = self.encoded_mask.index_select(0, index)
        first = int(self.mask.any(0).long().argmax()) if self.mask.numel() else 0
        if first:
            self.cache.drop_front(first)
            self.mask = self.mask[:, first:]

    def join(self, other: _Batch) -> None:
        """Put `other`'s rows after these, both aligned on their last position."""
        n, m = self.cache.length, other.cache.length
        for batch, pad in ((self, m - n), (other, n - m)):
            if pad > 0:
                batch.cache.pad_front(pad)
                batch.mask = F.pad(batch.mask, (pad, 0))
        self.cache = KVCache.cat([self.cache, other.cache])
        self.mask = torch.cat([self.mask, other.mask])
        if self.encoded is not None:
            s = max(self.encoded.shape[1], other.encoded.shape[1])
            self.encoded = torch.cat([F.pad(e, (0, 0, 0, s - e.shape[1])) for e in (self.encoded, other.encoded)])
            self.encoded_mask = torch.cat([F.pad(e, (0, s - e.shape[1])) for e in (self.encoded_mask,
                                                                                  other.encoded_mask)])


class Scheduler:
    """The batching loop over one language model `lm`. `encode` (pixel values (B, 3, H, W) -> (B, ...) image
    features) runs image encodes in the loop, one a turn (a burst of uploads does not hold up the batch's steps);
    `max_rows` bounds the rows that join (a request's beams or samples may take it past). The loop has no thread of
    its own: each turn runs in the thread of a request that waits for it. `stats` counts steps, rows stepped, prompt
    passes and image encodes."""

    def __init__(self, lm, encode: Callable[[torch.Tensor], torch.Tensor] | None = None, max_rows: int = 16):
        self.lm, self.encode_fn, self.max_rows = lm, encode, max_rows
        self.encdec = bool(lm.config.is_encoder_decoder)
        self.lock = threading.Condition()
        self.running: list[_Request] = []  # in the batch's row order
        self.arriving: list[_Request] = []
        self.encodes: list[list] = []  # [pixels, result]
        self.batch: _Batch | None = None
        self.leading = False  # a thread is running a turn
        self.stats = Counter()

    # ---- called from the requests' threads

    def stepper(self, lm, inputs_embeds, attention_mask, past_key_values, start_id) -> _Request:
        """The stepper factory for blip2.generation.Decoding (own_stepper's signature)."""
        if lm is not self.lm:
            raise ValueError("this scheduler batches another language model")
        return _Request(self, inputs_embeds, attention_mask, past_key_values, start_id)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image features of pixels (B, 3, H, W), computed in a turn of the loop between decoding steps."""
        job = [pixels, None]
        with self.lock:
            self.encodes.append(job)
            self._wait(lambda: job[1] is not None)
        if isinstance(job[1], BaseException):
            raise job[1]
        return job[1]

    def submit(self, request: _Request, tokens: torch.Tensor | None) -> torch.Tensor:
        """Hand the prompt (tokens None) or the next tokens to the loop; wait for the rows' logits."""
        with self.lock:
            if request.left:
                raise Closed("the request left the batch")
            request.result = None
            if tokens is None:
                self.arriving.append(request)
            else:
                request.tokens = tokens
            self._wait(lambda: request.result is not None)
            result, request.result = request.result, None
        if isinstance(result, BaseException):
            raise result
        return result

    def leave(self, request: _Request) -> None:
        """Take the request out of the batch (its rows go at the next turn); a waiting request may lead it now."""
        with self.lock:
            request.left = True
            if request in self.arriving:
                self.arriving.remove(request)
            if not self.leading and all(r.left for r in self.running):  # the last one: free the batch now
                self.running, self.batch = [], None
            self.lock.notify_all()

    def rows_of(self, request: _Request) -> KVCache | None:
        with self.lock:
            if request not in self.running or request.left:  # never joined, or its batch was lost
                return None
            start = sum(r.rows for r in self.running[:self.running.index(request)])
            positions = self.batch.mask[start, :self.batch.cache.length].nonzero()[:, 0]  # the row's own positions
            return self.batch.cache.rows(start, start + request.rows, positions)

    # ---- the loop: its turns run in the requests' own threads

    def _ready(self) -> bool:
        """Every request in the batch has handed its tokens (or left), and there is something to do."""
        waiting = any(not r.left and r.tokens is None for r in self.running)
        return not waiting and bool(self.encodes or self.arriving or self.running)

    def _wait(self, done: Callable[[], bool]) -> None:
        """(the lock held) Until done(): whenever the batch is ready and no thread is running a turn, run it here.
        So a lone request decodes in its own thread, as alone, and no thread outlives the work."""
        while not done():
            if not self.leading and self._ready():
                self._turn()
            else:
                self.lock.wait()

    def _turn(self) -> None:
        """(the lock held, released while the model runs) One turn: drop the rows that left, then the image encodes,
        the batch's step and the arrivals' prompt passes; hand every result to its waiter."""
        self.leading = True
        try:
            if not self.running and self.arriving and not self.encodes:  # a burst: let the rest arrive
                self.lock.wait(GATHER_S)
            self._drop_left()
            stepping, room = list(self.running), self.max_rows - sum(r.rows for r in self.running)
            arriving = []
            while self.arriving and (self.arriving[0].rows <= room or not (stepping or arriving)):
                room -= self.arriving[0].rows
                arriving.append(self.arriving.pop(0))
            encode = self.encodes.pop(0) if self.encodes else None
            self.lock.release()
            try:
                with torch.inference_mode():  # whatever mode the leading thread is in: the batch's tensors alike
                    results = self._run(stepping, arriving, encode)
                lost = False
            except Exception as e:  # the batch is lost: every request in this turn gets the error
                results, lost = [(target, e) for target in stepping + arriving + [encode] if target is not None], True
            finally:
                self.lock.acquire()
            if lost:
                for r in self.running:
                    r.left = True
                self.running, self.batch = [], None
            for target, result in results:
                if isinstance(target, _Request):
                    target.result = result
                else:
                    target[1] = result
        finally:
            self.leading = False
            self.lock.notify_all()

    def _drop_left(self) -> None:
        """Take the rows of requests that left out of the batch, and apply the reorders the others asked for."""
        index, start, keep = [], 0, []
        for r in self.running:
            if not r.left:
                index.append(start + (torch.arange(r.rows) if r.index is None else r.index.cpu()))
                keep.append(r)
            start += r.rows
        for r, rows in zip(keep, index):
            r.rows, r.index = len(rows), None
        index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
        if not keep:
            self.batch = None
        elif not torch.equal(index, torch.arange(start)):
            self.batch.take(index.to(self.batch.mask.device))
        self.running = keep

    def _run(self, stepping: list[_Request], arriving: list[_Request], encode: list | None) -> list:
        """One turn: an image encode, the batch's step, the arrivals' prompt passes (merged into the batch).
        Returns (request or encode job, logits / features / exception) pairs."""
        out = []
        if encode is not None:
            try:
                features = self.encode_fn(encode[0])
                out.append((encode, features))
                self.stats["image_encodes"] += len(features)
            except Exception as e:  # the job's images get the error
                out.append((encode, e))
        if stepping:
            logits = self._step(stepping)
            out += list(zip(stepping, logits.split([r.rows for r in stepping])))
        if arriving:
            try:
                batch, logits = self._prompt_pass(arriving)
            except Exception as e:  # the arrivals' prompt pass failed: they get the error, the batch runs on
                return out + [(r, e) for r in arriving]
            if self.batch is None:
                self.batch = batch
            else:
                self.batch.join(batch)
            self.running += arriving
            out += list(zip(arriving, logits.split([r.rows for r in arriving])))
        return out

    def _step(self, stepping: list[_Request]) -> torch.Tensor:
        """One token for every row: (rows, V) logits."""
        tokens = torch.cat([r.tokens for r in stepping])
        b = self.batch
        b.mask = torch.cat([b.mask, b.mask.new_ones(b.mask.shape[0], 1)], 1)
        with native.decoding_step():
            if self.encdec:
                logits = self.lm.decode(tokens[:, None], b.encoded, b.encoded_mask, b.mask, past_key_values=b.cache)[0]
            else:
                logits = self.lm(input_ids=tokens[:, None], attention_mask=b.mask, past_key_values=b.cache).logits
        for r in stepping:
            r.tokens = None
        self.stats["steps"] += 1
        self.stats["rows_stepped"] += len(tokens)
        return logits[:, -1]

    def _prompt_pass(self, group: list[_Request]) -> tuple[_Batch, torch.Tensor]:
        """The group's prompts in one pass -> (their batch, logits (rows, V)). OPT: each row's reused prefix (if
        any) padded in front to the longest, its new positions padded in front to the longest, so every row ends
        on its last prompt position; the mask hides the padding. T5: the encoder over the prompts, then the
        decoder's first step."""
        self.stats["prompt_passes"] += 1
        self.stats["prompts"] += len(group)
        embeds, masks, pasts = zip(*[r.prompt[:3] for r in group])
        if self.encdec:
            width = max(e.shape[1] for e in embeds)
            embeds = torch.cat([F.pad(e, (0, 0, width - e.shape[1], 0)) for e in embeds])
            mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in masks])
            encoded = self.lm.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            start = torch.tensor([r.prompt[3] for r in group for _ in range(r.rows)], device=embeds.device)
            cache = KVCache(self.lm.num_layers)
            logits = self.lm.decode(start[:, None], encoded, mask, past_key_values=cache)[0][:, -1]
            return _Batch(cache, mask.new_ones(len(start), 1), encoded, mask), logits
        held = [0 if c is None else c.length for c in pasts]
        p, n = max(held), max(e.shape[1] - h for e, h in zip(embeds, held))
        new = torch.cat([F.pad(e[:, h:], (0, 0, n - e.shape[1] + h, 0)) for e, h in zip(embeds, held)])
        mask = torch.cat([torch.cat([m.new_zeros(m.shape[0], p - h), m[:, :h],
                                     m.new_zeros(m.shape[0], n - m.shape[1] + h), m[:, h:]], 1)
                          for m, h in zip(masks, held)])
        cache = KVCache(self.lm.num_layers)
        if p:
            like = next(c for c in pasts if c is not None)
            pasts = [KVCache.blank(like, e.shape[0]) if c is None else c for c, e in zip(pasts, embeds)]
            for c in pasts:
                c.pad_front(p - c.length)
            cache = KVCache.cat(list(pasts))
        logits = self.lm(inputs_embeds=new, attention_mask=mask, past_key_values=cache, logits_to_keep=1).logits
        return _Batch(cache, mask), logits[:, -1]
