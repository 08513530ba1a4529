"""The app's settings: resource limits (each one a BLIP2_* environment variable)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass


def _env(name, default, cast):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return cast(raw)
    except ValueError:
        raise SystemExit(f"environment variable {name}={raw!r} is not a valid {cast.__name__}") from None


@dataclass
class Limits:
    """Resource limits. Each field can be set with the environment variable BLIP2_<FIELD NAME IN CAPITALS>."""

    max_upload_mb: float = 20.0  # launch(max_file_size=...): larger uploads are refused by the server
    max_image_pixels: int = 40_000_000  # width x height; larger images (and decompression bombs) are refused
    max_aspect_ratio: float = 20.0  # long side / short side; more extreme images are refused
    work_side: int = 1024  # images are downsized to this long side once checked (the model sees 224-364 px)
    max_prompt_chars: int = 1000  # caption prefix, chat question, search query
    max_candidates: int = 20  # candidate texts in image-text matching
    max_candidate_chars: int = 300  # per candidate text
    max_gallery: int = 48  # images searched in one request
    max_new_tokens: int = 128
    max_beams: int = 8
    max_captions: int = 5  # captions returned at once
    max_beam_tokens: int = 800  # (beams or sampled captions) x max_new_tokens
    time_limit_s: float = 60.0  # per request; generation stops at the next token once it has passed
    queue_size: int = 16  # requests waiting; more are refused with "queue full"
    concurrency: int = 1  # model requests running at once (all model events share one concurrency group)
    max_chat_turns: int = 20  # turns kept in a session's chat history
    max_loaded_models: int = 2  # per role (generation / retrieval), the startup models included
    search_rerank_k: int = 5  # default number of top ITC hits re-ranked with the ITM head

    @classmethod
    def from_env(cls, **overrides):
        values = {}
        for f in dataclasses.fields(cls):
            cast = float if isinstance(f.default, float) else int
            values[f.name] = _env(f"BLIP2_{f.name.upper()}", f.default, cast)
        values.update({k: v for k, v in overrides.items() if v is not None})
        limits = cls(**values)
        limits.check()
        return limits

    def check(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"limit {f.name} must be a positive number, got {v!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def as_dict(self):
        return dataclasses.asdict(self)
