"""Text generation over the language models with a KV cache."""

from dataclasses import dataclass, fields

import torch

from .cache import KVCache


@dataclass
class GenerationConfig:
    max_new_tokens: int | None = None
    max_length: int | None = None
    min_new_tokens: int = 0
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    decoder_start_token_id: int | None = None

    @classmethod
    def build(cls, lm_config, **kwargs):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"generate got unsupported arguments: {', '.join(unknown)}")
        cfg = cls(**{k: v for k, v in kwargs.items() if v is not None})
        for name in ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id"):
            if getattr(cfg, name) is None:
                setattr(cfg, name, getattr(lm_config, name, None))
        return cfg

    @property
    def eos_ids(self) -> list:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)


class DecoderOnlyState:
    """Incremental decoding of an OPT-style model: the prompt's embeddings once, then one token a step."""

    def __init__(self, lm, inputs_embeds, attention_mask):
        self.lm, self.mask = lm, attention_mask
        self.cache = KVCache(lm.num_layers)
        self.first_embeds = inputs_embeds

    def start(self):
        out = self.lm(inputs_embeds=self.first_embeds, attention_mask=self.mask, past_key_values=self.cache,
                      logits_to_keep=1)
        return out.logits[:, -1]  # (B, V)

    def step(self, tokens):  # tokens (B,)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        out = self.lm(input_ids=tokens[:, None], attention_mask=self.mask, past_key_values=self.cache)
        return out.logits[:, -1]


class EncoderDecoderState:
    """Incremental decoding of a T5-style model: the encoder once, then the decoder one token a step."""

    def __init__(self, lm, inputs_embeds, attention_mask, start_id):
        self.lm, self.mask, self.start_id = lm, attention_mask, start_id
        self.encoded = lm.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        self.cache = KVCache(lm.num_layers)

    def start(self):
        b = self.encoded.shape[0]
        start = torch.full((b, 1), self.start_id, dtype=torch.long, device=self.encoded.device)
        return self.step(start[:, 0])

    def step(self, tokens):
        logits, _ = self.lm.decode(tokens[:, None], self.encoded, self.mask, past_key_values=self.cache)
        return logits[:, -1]


@torch.no_grad()
def generate(lm, inputs_embeds, attention_mask, input_ids=None, streamer=None, **kwargs):
    """Greedy decoding. Returns, like the reference: decoder-only -> prompt ids + new ids; encoder-decoder ->
    decoder_start + new ids. Finished rows are padded with pad_token_id."""
    cfg = GenerationConfig.build(lm.config, **kwargs)
    encdec = lm.config.is_encoder_decoder
    b = inputs_embeds.shape[0]
    if encdec:
        state = EncoderDecoderState(lm, inputs_embeds, attention_mask, cfg.decoder_start_token_id)
        prefix = torch.full((b, 1), cfg.decoder_start_token_id, dtype=torch.long, device=inputs_embeds.device)
    else:
        state = DecoderOnlyState(lm, inputs_embeds, attention_mask)
        prefix = input_ids if input_ids is not None else inputs_embeds.new_zeros((b, 0), dtype=torch.long)
    prompt_len = prefix.shape[1] if not encdec else inputs_embeds.shape[1]
    if cfg.max_new_tokens is not None:
        budget = cfg.max_new_tokens
    elif cfg.max_length is not None:
        budget = cfg.max_length - (prefix.shape[1] if encdec else prompt_len)
    else:
        budget = 20
    eos = torch.tensor(cfg.eos_ids, dtype=torch.long, device=inputs_embeds.device)
    done = torch.zeros(b, dtype=torch.bool, device=inputs_embeds.device)
    out = [prefix]
    logits = state.start() if budget > 0 else None
    for step in range(max(budget, 0)):
        logits = logits.float()
        if step < cfg.min_new_tokens and len(eos):
            logits[:, eos] = -float("inf")
        token = logits.argmax(-1)
        if cfg.pad_token_id is not None:
            token = torch.where(done, torch.full_like(token, cfg.pad_token_id), token)
        out.append(token[:, None])
        if streamer is not None:
            streamer.put(token)
        if len(eos):
            done |= torch.isin(token, eos)
        if bool(done.all()) or step == budget - 1:
            break
        logits = state.step(token)
    if streamer is not None:
        streamer.end()
    return torch.cat(out, dim=1)
