"""BLIP-2 tasks for the CLI and the app: captions, visual question answering over a chat, image-text matching and
embeddings, reusing work across calls.

Reuse (the results equal a fresh computation):
* image features, keyed by a hash of the image content, in an LRU bounded in bytes: the language-model-ready query
  embeddings (the vision tower and Q-Former run once per image), the retrieval model's patch embeddings and ITC
  embeddings, and the ITC embeddings of texts;
* for a decoder-only (OPT) language model, the KV cache of the last prompt (and answer) computed on an image: a new
  prompt that starts with the same token ids only computes its new tokens (a chat's next turn).
Over-long prompts lose their oldest text (whole chat turns first) and say so in `truncated`; special-token strings
in user text (a literal "<image>", "</s>") are plain text.
"""

import hashlib
import math
import os
import threading
from collections import Counter, OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .cache import KVCache
from .generation import DEFAULT_NEW_TOKENS, Decoding, text_pieces

# The demo's decoding defaults, shared by the app and the CLI: a caption gets room to finish its phrase, an answer
# is short; at least one new token, so an image never gets an empty text.
CAPTION_DECODING = {"max_new_tokens": 30, "min_new_tokens": 1}
ANSWER_DECODING = {"max_new_tokens": 20, "min_new_tokens": 1}


class ByteLRU:
    """Least-recently-used map bounded by the bytes of its values (tensors, tuples of them, or KVCaches)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.items = OrderedDict()  # key -> (value, bytes)
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            if key not in self.items:
                return None
            self.items.move_to_end(key)
            return self.items[key][0]

    def pop(self, key):
        with self.lock:
            value, size = self.items.pop(key, (None, 0))
            self.bytes -= size
            return value

    def put(self, key, value):
        size = nbytes(value)
        with self.lock:
            self.bytes -= self.items.pop(key, (None, 0))[1]
            if size > self.max_bytes:
                return
            self.items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                self.bytes -= self.items.popitem(last=False)[1][1]


def nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, KVCache):
        return sum(nbytes(t) for t in value.k + value.v + [x for c in value.cross if c for x in c] if t is not None)
    return sum(nbytes(v) for v in value)


def load_image(image):
    """A PIL image from a PIL image, a path or an (H, W[, C]) uint8 array."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            im.load()
            return im
    if not isinstance(image, Image.Image):
        return Image.fromarray(image)
    return image


def image_key(image) -> str:
    """Content hash of a PIL image (pixels, size and mode)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def encode_plain(tokenizer, text):
    """Token ids of user text with the tokenizer's own special tokens around it. Special-token strings inside the
    text stay plain text, so a literal "<image>" cannot change the image-token count nor "</s>" end the prompt."""
    backend = tokenizer.backend
    with getattr(tokenizer, "_lock", nullcontext()):
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = True
        try:
            return backend.encode(text).ids
        finally:
            backend.encode_special_tokens = False


def truncate_left(ids, special, limit):
    """Keep the special tokens the template added (`special` = ids of the empty text, in front of the text or
    after it) and the last text tokens, `limit` ids in all."""
    if len(ids) <= limit:
        return ids
    head = len(special) if ids[:len(special)] == special else 0
    tail = len(special) - head
    keep = max(limit - len(special), 0)
    return ids[:head] + ids[len(ids) - tail - keep:len(ids) - tail] + ids[len(ids) - tail:]


def chat_turn(question: str, answer: str) -> str:
    """One past turn: "Question: q Answer: a." (an answer that already ends in . ! or ? keeps its own stop)."""
    answer = answer.strip()
    return f"Question: {question} Answer: {answer}{'' if answer.endswith(('.', '!', '?')) else '.'}"


def chat_prompt(question: str, history=(), short_answer: bool = False) -> str:
    """The BLIP-2 paper's VQA template over a chat: a `chat_turn` per past (q, a), then "Question: q Answer:", or
    "Question: q Short answer:" for Flan-T5 (`short_answer`) as the paper prompts it. The app and the CLI both
    build their prompts here."""
    turns = [chat_turn(q, a) for q, a in history]
    return " ".join(turns + [f"Question: {question} {'Short answer' if short_answer else 'Answer'}:"])


@dataclass
class Generated:
    text: str  # the first (best) sequence
    texts: list  # every returned sequence (num_return_sequences)
    prompt: str  # the prompt text used (after truncation)
    truncated: bool  # the prompt lost its oldest text to fit the model


class TextStream:
    """Iterating yields the answer's text pieces as they are generated (and runs the decoding); `prompt` and
    `truncated` are known before, `text` holds what has come so far."""

    def __init__(self, pieces, prompt, truncated):
        self.pieces, self.prompt, self.truncated, self.text = pieces, prompt, truncated, ""

    def __iter__(self):
        for piece in self.pieces:
            self.text += piece
            yield piece


@dataclass
class Match:
    text: str
    itm: float  # image-text matching probability (ITM head)
    itc: float  # image-text contrastive cosine similarity (best query)
    truncated: bool  # the text was cut to the Q-Former's positions


def match_score(itm_prob: float, itc: float) -> float:
    """The ranking score of an image-text pair: ITM log-odds + ITC cosine (as LAVIS re-ranks retrieval)."""
    p = min(max(float(itm_prob), 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p)) + float(itc)


class Blip2Runner:
    """`model`: a Blip2ForConditionalGeneration with its `processor`; `itm_model`: a Blip2ForImageTextRetrieval
    with its `itm_processor` (for match and embeddings). Either pair may be None. `stats` counts cache hits."""

    def __init__(self, model=None, processor=None, itm_model=None, itm_processor=None,
                 image_cache_bytes=256 * 2**20, prefix_cache_bytes=256 * 2**20):
        self.model, self.processor = model, processor
        self.itm_model, self.itm_processor = itm_model, itm_processor
        self.features = ByteLRU(image_cache_bytes)
        self.prefixes = ByteLRU(prefix_cache_bytes)  # image key -> (token ids (T,) held, KVCache)
        self.stats = Counter()

    # ---- cached features ---------------------------------------------------------------------------------

    def _cached(self, key, compute):
        value = self.features.get(key)
        self.stats["feature_hits" if value is not None else "feature_misses"] += 1
        if value is None:
            with torch.inference_mode():
                value = compute()
            self.features.put(key, value)
        return value

    def _pixels(self, model, processor, image):
        device = next(model.parameters()).device
        return processor.image_processor(image, return_tensors="pt")["pixel_values"].to(device)

    def image_embeds(self, image):
        """(1, Q, D_t) language-model-ready query embeddings of an image, cached by content; and the key."""
        image = load_image(image)
        key = image_key(image)
        m = self.model
        embeds = self._cached(("lm", key),
                              lambda: m.get_image_features(self._pixels(m, self.processor, image)).pooler_output)
        return embeds, key

    def _vision(self, image):
        """(1, 1+N, D_v) patch embeddings of the retrieval model, cached; and the key."""
        image = load_image(image)
        key = image_key(image)
        m = self.itm_model
        return self._cached(("vision", key), lambda: m.vision_model(self._pixels(m, self.itm_processor, image))
                            .last_hidden_state), key

    def vision_states(self, image) -> torch.Tensor:
        """(1, 1+N, D_v) patch embeddings of the retrieval model for an image, from the cache `match` fills (a heat
        map after a match reuses them)."""
        return self._vision(image)[0]

    # ---- generation --------------------------------------------------------------------------------------

    def _prompt_ids(self, texts, new_tokens):
        """The first of `texts` (candidate prompts, oldest context dropped a step at a time) that fits, else the
        last one cut from the left -> (ids (1, T), text, truncated)."""
        cfg, tok = self.model.config, self.processor.tokenizer
        q = cfg.num_query_tokens
        limit = tok.model_max_length
        max_pos = getattr(cfg.text_config, "max_position_embeddings", None)
        if not cfg.is_encoder_decoder and max_pos is not None:
            limit = min(limit, max_pos - q - new_tokens)
        if limit < 1:
            raise ValueError(f"max_new_tokens={new_tokens} leaves no room for a prompt in the language model's "
                             f"{max_pos} positions")
        for i, text in enumerate(texts):
            ids = encode_plain(tok, text)
            if len(ids) <= limit:
                break
        truncated = i > 0 or len(ids) > limit
        if len(ids) > limit:
            ids = truncate_left(ids, encode_plain(tok, ""), limit)
            text = tok.decode(ids, skip_special_tokens=True)
        device = next(self.model.parameters()).device
        placeholders = [cfg.image_token_index] * q if cfg.image_token_index is not None else []  # else: legacy layout
        return torch.tensor([placeholders + ids], device=device), text, truncated

    def _start(self, image, texts, decoding):
        """Everything before decoding: cached image embeddings, prompt ids, the reusable KV cache prefix."""
        if self.model is None:
            raise ValueError("this runner has no captioning model")
        image_embeds, key = self.image_embeds(image)
        ids, text, truncated = self._prompt_ids(texts, decoding.get("max_new_tokens") or DEFAULT_NEW_TOKENS)
        cache = self._reuse_prefix(key, ids[0]) if self._reuses_prefix else None
        with torch.no_grad():
            embeds, mask, input_ids = self.model.generation_inputs(input_ids=ids, image_embeds=image_embeds)
            run = Decoding(self.model.language_model, embeds, mask, input_ids, cache, **decoding)
        return run, key, text, truncated

    @property
    def _reuses_prefix(self):
        """Only a decoder-only model whose prompt ids hold the image tokens has a KV cache per prompt id."""
        cfg = self.model.config
        return not cfg.is_encoder_decoder and cfg.image_token_index is not None

    def _reuse_prefix(self, key, ids):
        """A KV cache holding the longest common prefix of `ids` with what was last computed on this image (at
        least one prompt token is left to compute), or None."""
        held = self.prefixes.pop(key)
        if held is None:
            return None
        old, cache = held
        n = min(len(old), len(ids) - 1)
        same = (old[:n] == ids[:n]).long().cumprod(0).sum().item()
        if same == 0:
            return None
        cache.crop(same)
        self.stats["prefix_hits"] += 1
        self.stats["prefix_tokens_reused"] += same
        return cache

    def _keep_prefix(self, key, run):
        """Keep the cache for the next prompt on this image: with one decoding row it holds the prompt and the
        answer so far, otherwise (beams, samples) the prompt only."""
        cache, n = run.model.cache, run.prompt.shape[1]
        if not self._reuses_prefix or cache.length < n:
            return
        if cache.k[0].shape[0] == 1 and run.sequences is not None:
            held = run.sequences[0, :cache.length]
        else:
            cache.crop(n)
            if cache.k[0].shape[0] > 1:
                cache.reorder(torch.zeros(1, dtype=torch.long, device=run.prompt.device))
            held = run.prompt[0]
        self.prefixes.put(key, (held.clone(), cache))

    def _decode_texts(self, run):
        new = run.sequences[:, run.prompt.shape[1]:]
        return self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)

    def _generate(self, image, texts, decoding):
        run, key, text, truncated = self._start(image, texts, decoding)
        with torch.no_grad():
            run.run()
        self._keep_prefix(key, run)
        out = [t.strip() for t in self._decode_texts(run)]
        return Generated(text=out[0], texts=out, prompt=text, truncated=truncated)

    def _stream(self, image, texts, decoding):
        run, key, text, truncated = self._start(image, texts, decoding)
        raw = text_pieces(run, self.processor.tokenizer)

        def pieces():  # "".join(pieces) == the stripped text that `ask` returns
            pending, started = "", False
            try:
                for piece in raw:
                    piece = pending + piece if started else piece.lstrip()
                    body = piece.rstrip()
                    pending = piece[len(body):]
                    if body:
                        started = True
                        yield body
            finally:  # also when the consumer stops early
                raw.close()
                self._keep_prefix(key, run)

        return TextStream(pieces(), text, truncated)

    def caption(self, image, prompt="", **decoding) -> Generated:
        """Describe an image (optionally continuing `prompt`). `decoding`: generate's settings."""
        return self._generate(image, [prompt], decoding)

    def caption_batch(self, images, prompt: str | list = "", **decoding) -> list:
        """Describe several images at once: one vision pass for the batch, then the language model over every
        prompt left-padded to the longest. Greedy decoding and beam search give what `caption` gives each image
        alone; sampling draws the whole batch from one generator. Returns one Generated per image."""
        if self.model is None:
            raise ValueError("this runner has no captioning model")
        images = [load_image(i) for i in images]
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not images:
            return []
        m, new_tokens = self.model, decoding.get("max_new_tokens") or DEFAULT_NEW_TOKENS
        rows = [self._prompt_ids([p], new_tokens) for p in prompts]  # [(ids (1, T_i), text, truncated)]
        width = max(ids.shape[1] for ids, _, _ in rows)
        pad = self.processor.tokenizer.pad_token_id or 0
        ids = torch.cat([torch.nn.functional.pad(r, (width - r.shape[1], 0), value=pad) for r, _, _ in rows])
        mask = torch.stack([torch.arange(width, device=ids.device) >= width - r.shape[1] for r, _, _ in rows]).long()
        with torch.inference_mode():
            pixels = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
            embeds = m.get_image_features(pixels.to(ids.device)).pooler_output  # (B, Q, D_t)
            run = Decoding(m.language_model, *m.generation_inputs(input_ids=ids, attention_mask=mask,
                                                                  image_embeds=embeds), **decoding)
            run.run()
        texts, n = [t.strip() for t in self._decode_texts(run)], run.cfg.num_return_sequences  # (B * n,)
        return [Generated(texts[i * n], texts[i * n:(i + 1) * n], text, truncated)
                for i, (_, text, truncated) in enumerate(rows)]

    def caption_stream(self, image, prompt="", **decoding) -> TextStream:
        return self._stream(image, [prompt], decoding)

    def ask(self, image, question, history=(), **decoding) -> Generated:
        """Answer a question about an image, given the chat so far (a list of (question, answer))."""
        return self._generate(image, self._chat_texts(question, history), decoding)

    def ask_stream(self, image, question, history=(), **decoding) -> TextStream:
        return self._stream(image, self._chat_texts(question, history), decoding)

    def _chat_texts(self, question, history):
        """The chat prompt with all past turns, then without the oldest ones (to fit the context, first first)."""
        history, short = list(history), bool(getattr(self.model.config, "is_encoder_decoder", False))
        return [chat_prompt(question, history[i:], short) for i in range(len(history) + 1)]

    # ---- matching ----------------------------------------------------------------------------------------

    def text_batch(self, texts):
        """Plain-text ids of the retrieval tokenizer (special-token strings a user typed stay text), cut to the
        Q-Former's positions, right-padded -> (ids (T, L), mask (T, L), truncated per text)."""
        tok, qcfg = self.itm_processor.tokenizer, self.itm_model.config.qformer_config
        limit = qcfg.max_position_embeddings
        rows = [encode_plain(tok, t) for t in texts]
        truncated = [len(r) > limit for r in rows]
        rows = [r[:limit - 1] + r[-1:] if cut else r for r, cut in zip(rows, truncated)]  # keep [SEP]
        width = max(map(len, rows))
        device = next(self.itm_model.parameters()).device
        pad = tok.pad_token_id or 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        return ids, mask, truncated

    def match(self, image, texts) -> list:
        """ITM probability and ITC cosine of one image against each text; the image is encoded once (cached)."""
        if self.itm_model is None:
            raise ValueError("this runner has no image-text matching model")
        texts = list(texts)
        if not texts:
            return []
        m = self.itm_model
        vision, key = self._vision(image)
        ids, mask, truncated = self.text_batch(texts)
        with torch.inference_mode():
            itm = m.itm_logits(vision, ids, mask)[0].float().softmax(-1)[:, 1]  # (T,)
            img = self._cached(("itc", key), lambda: m.itc_image_embeds(vision))  # (1, Q, E)
            txt = m.itc_text_embeds(ids, mask)[0]  # (T, E)
            itc = (img[0].float() @ txt.float().t()).amax(0)  # (T,): best query per text
        return [Match(t, float(a), float(c), cut) for t, a, c, cut in zip(texts, itm, itc, truncated)]

    def itc_image_batch(self, images):
        """(B, Q, E) normalised ITC embeddings of images in one vision pass (not cached: for collections)."""
        if self.itm_model is None:
            raise ValueError("this runner has no image-text matching model")
        m = self.itm_model
        images = [load_image(i) for i in images]
        with torch.inference_mode():
            return m.itc_image_embeds(m.vision_model(self._pixels(m, self.itm_processor, images)).last_hidden_state)

    def image_text_embeddings(self, images=(), texts=()):
        """Normalised ITC embeddings for search: images (I, Q, E) and texts (T, E), each cached by content.
        The similarity of image i and text t is max over q of images[i, q] . texts[t]."""
        m = self.itm_model
        if m is None:
            raise ValueError("this runner has no image-text matching model")
        imgs = [self._cached(("itc", key), lambda v=v: m.itc_image_embeds(v)) for v, key in map(self._vision, images)]
        txts = []
        for t in texts:
            txts.append(self._cached(("text", t), lambda t=t: m.itc_text_embeds(*self.text_batch([t])[:2])[0]))
        e = m.config.image_text_hidden_size
        return (torch.cat(imgs) if imgs else torch.empty(0, m.config.num_query_tokens, e),
                torch.cat(txts) if txts else torch.empty(0, e))
