"""The app's model registry: the checkpoints on offer, one shared model (and its engine: a blip2 Captioner or
Retriever) per checkpoint, role
and settings, loaded once under a lock, the least recently used evicted, a memory check before loading."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import psutil
import torch

from blip2 import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Processor, memory_report
from blip2.cache import FeatureCache
from blip2.catalogue import CHECKPOINTS, EMBEDDED_MODELS, GENERATION, RETRIEVAL
from blip2.dtypes import dtype_name, resolve_dtype
from blip2.io.hub import resolve_checkpoint
from blip2.retrieval import Retriever
from blip2.runner import Captioner, PrefixCache
from blip2.weight_only import cpu_supports_bf16, quantization_flag

from .config import Limits
from .errors import RequestError

log = logging.getLogger("blip2.app")

EMBEDDED = "blip2-tiny (embedded)"
Progress = Callable[[float, str], None]  # (fraction done, what is happening)


LARGE_FLOAT32_BYTES = 2**30  # a real checkpoint (> 268 M parameters), not the embedded model: bfloat16 on a CPU
CACHE_BYTES = 256 * 2**20  # a model's image-feature cache, and a captioner's prompt (KV prefix) cache


@dataclass(frozen=True)
class Checkpoint:
    """An entry of the model picker. `sources` maps a role to a hub id or a local directory."""

    key: str
    sources: tuple  # ((role, source), ...)
    note: str = ""

    def source(self, role: str) -> str | None:
        return dict(self.sources).get(role)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(r for r, _ in self.sources)


KNOWN_CHECKPOINTS = [Checkpoint(k.repo_id, ((k.task, k.repo_id),), k.note) for k in CHECKPOINTS]


@dataclass
class ModelSettings:
    dtype: str | None = None  # None/auto: CPU: bfloat16 for real checkpoints where it runs natively, else float32;
    # GPU: float16 (bfloat16 for Flan-T5)
    quantize: str | None = None  # "int8" | "int4" (weight-only, CPU) | "8bit" | "4bit" (bitsandbytes)
    device_map: str | None = None  # e.g. "auto", "cpu", "cuda:0"

    def resolved_dtype(self, is_t5: bool, device: str, large: bool = False, quiet: bool = False) -> str:
        """`large`: a real checkpoint (not the embedded model), which runs in bfloat16 on a CPU that supports it.
        The choice of --dtype auto is logged unless `quiet`."""
        dtype = (self.dtype or "auto").lower()
        if dtype == "auto" and device == "cpu":
            dtype = "bfloat16" if large and cpu_supports_bf16() else "float32"
            if not quiet:
                why = ("the embedded model" if not large else "this CPU runs bfloat16 natively"
                       if dtype == "bfloat16" else "this CPU has no native bfloat16")
                log.info("--dtype auto on the CPU: %s (%s)", dtype, why)
        elif dtype == "auto":
            dtype = "bfloat16" if is_t5 else "float16"
        try:  # the library's one table of names (fp16, bf16, half, ...)
            dtype = dtype_name(resolve_dtype(dtype))
        except ValueError:
            raise RequestError(f"dtype {self.dtype!r} is not supported: float32, float16, bfloat16 or auto") from None
        if is_t5 and dtype == "float16":
            dtype = "bfloat16"  # Flan-T5 overflows in float16
        return dtype


@dataclass
class Loaded:
    """A loaded model with its processor; shared by every session."""

    key: str
    role: str
    source: str
    model: torch.nn.Module
    processor: object
    dtype: str
    device: torch.device
    load_s: float
    runner: Captioner | Retriever  # the engine over this model (by role): captions and chat, or matching and search
    lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def is_t5(self) -> bool:
        cfg = self.model.config
        return bool(getattr(cfg, "is_encoder_decoder", False))

    @property
    def name(self) -> str:
        return f"{self.key} [{self.dtype}{', ' + str(self.device) if self.device.type != 'cpu' else ''}]"


def available_memory_bytes(device: str) -> int:
    """Memory free for a model: the GPU's free memory, or the system's available memory (psutil)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    return psutil.virtual_memory().available


class Registry:
    """The checkpoints on offer and the models loaded, shared by every session."""

    def __init__(self, generation: str | None = None, retrieval: str | None = None,
                 settings: ModelSettings | None = None, limits: Limits | None = None,
                 extra_checkpoints: Sequence[Checkpoint] = ()):
        self.limits = limits or Limits.from_env()
        self.settings = settings or ModelSettings()
        self.catalogue: OrderedDict[str, Checkpoint] = OrderedDict()
        embedded = tuple((role, str(path)) for role, path in EMBEDDED_MODELS.items())
        self.catalogue[EMBEDDED] = Checkpoint(EMBEDDED, embedded, "tiny model trained on a world of coloured shapes "
                                              "(offline)")
        for c in extra_checkpoints:
            self.catalogue[c.key] = c
        for c in KNOWN_CHECKPOINTS:
            self.catalogue.setdefault(c.key, c)
        self.default = {GENERATION: self.add_source(generation, GENERATION) if generation else EMBEDDED,
                        RETRIEVAL: self.add_source(retrieval, RETRIEVAL) if retrieval else EMBEDDED}
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._loaded: OrderedDict[tuple, Loaded] = OrderedDict()
        self._load_lock = threading.Lock()  # one load at a time
        self._gate = threading.Condition()  # requests running on loaded models, and a load waiting for them
        self._serving, self._loading = 0, None
        self._registry_lock = threading.Lock()  # guards _loaded (short critical sections only)


    def add_source(self, source: str, role: str) -> str:
        """A --model / --itm-model value: a known key, a hub id, or a local directory (added to the picker)."""
        source = str(source)
        for c in self.catalogue.values():
            if c.key == source and role in c.roles:
                return c.key
        if source in self.catalogue:
            raise ValueError(f"{source} is a {'/'.join(self.catalogue[source].roles)} checkpoint, not a {role} one")
        key = source if not os.path.isdir(source) else f"{os.path.basename(os.path.normpath(source))} (local)"
        self.catalogue[key] = Checkpoint(key, ((role, source),), f"given on the command line ({role})")
        return key

    def choices(self) -> list[str]:
        return list(self.catalogue)

    def checkpoint(self, key: object) -> Checkpoint:
        if not isinstance(key, str) or key not in self.catalogue:
            raise RequestError(f"unknown model {str(key)[:200]!r}: choose one of the listed checkpoints "
                               f"({', '.join(self.catalogue)})")
        return self.catalogue[key]

    def session_defaults(self) -> dict[str, str]:
        return dict(self.default)

    # --- loading

    def _cache_key(self, source, role):
        s = self.settings
        return (source, role, s.dtype, s.quantize, s.device_map)

    def loaded_models(self) -> list[Loaded]:
        """Every model loaded now, for every role."""
        with self._registry_lock:
            return list(self._loaded.values())

    def loaded(self, key: str, role: str) -> Loaded | None:
        """The model of checkpoint `key` for `role` if it is loaded now (nothing is loaded)."""
        c = self.catalogue.get(key)
        source = c.source(role) if c else None
        if source is None:
            return None
        with self._registry_lock:
            return self._loaded.get(self._cache_key(source, role))

    def get(self, key: str, role: str, progress: Progress | None = None) -> Loaded:
        """The shared model of checkpoint `key` for `role`, loading it (once) if needed."""
        c = self.checkpoint(key)
        source = c.source(role)
        if source is None:
            raise RequestError(f"{key} is a {'/'.join(c.roles)} model; this needs a {role} model")
        ck = self._cache_key(source, role)
        with self._registry_lock:
            hit = self._loaded.get(ck)
            if hit is not None:
                self._loaded.move_to_end(ck)
                return hit
        with self._load_lock:
            with self._registry_lock:
                hit = self._loaded.get(ck)
            if hit is not None:
                return hit
            with self._gate:  # new requests are refused from now; the running ones finish first
                self._loading = key
                self._gate.wait_for(lambda: self._serving == 0)
            try:
                loaded = self._load(c, role, source, progress)
            finally:
                with self._gate:
                    self._loading = None
            with self._registry_lock:
                self._loaded[ck] = loaded
                self._evict(role)
            return loaded

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Around a request on a loaded model: refused while another checkpoint loads (the load waits for the
        requests running)."""
        with self._gate:
            if self._loading is not None:
                raise RequestError(f"{self._loading} is loading: new requests wait until it is ready. Try again in "
                                   "a moment.")
            self._serving += 1
        try:
            yield
        finally:
            with self._gate:
                self._serving -= 1
                self._gate.notify_all()

    def _evict(self, role):
        pinned = {self._cache_key(self.catalogue[self.default[r]].source(r), r) for r in (GENERATION, RETRIEVAL)}
        mine = [k for k in self._loaded if k[1] == role]
        while len(mine) > self.limits.max_loaded_models:
            victim = next((k for k in mine if k not in pinned), None)
            if victim is None:
                break
            mine.remove(victim)
            old = self._loaded.pop(victim)
            log.info("unloading %s to make room", old.name)
            del old
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def _load(self, c: Checkpoint, role, source, progress=None) -> Loaded:
        say = progress or (lambda frac, desc: None)
        t0 = time.perf_counter()
        say(0.0, f"Preparing {c.key}")
        cls = Blip2ForConditionalGeneration if role == GENERATION else Blip2ForImageTextRetrieval
        float32_bytes = self._float32_bytes(c, cls, source)
        self._check_memory(c, cls, source, float32_bytes)
        try:
            directory = self._resolve(source, say)
            say(0.5, f"Loading the weights of {c.key}")
            is_t5 = _config_is_t5(directory)
            if float32_bytes is None:  # known only now that the checkpoint is here
                float32_bytes = memory_report(directory, cls, dtype="float32").total
            dtype = self.settings.resolved_dtype(is_t5, self.device, float32_bytes > LARGE_FLOAT32_BYTES)
            kwargs = {"dtype": resolve_dtype(dtype)}
            if self.settings.device_map:
                kwargs["device_map"] = self.settings.device_map
            elif self.device != "cpu":
                kwargs["device"] = self.device
            if self.settings.quantize:
                kwargs["quantization"] = quantization_flag(self.settings.quantize)
            model = cls.from_pretrained(directory, **kwargs)
            say(0.9, f"Loading the processor of {c.key}")
            processor = Blip2Processor.from_pretrained(directory)
        except RequestError:
            raise
        except (torch.OutOfMemoryError, MemoryError) as e:
            raise RequestError(f"not enough memory to load {c.key} ({type(e).__name__}); still serving the "
                               "model loaded before") from None
        except Exception as e:  # offline hub id, broken files, unsupported config...
            log.warning("loading %s failed: %s: %s", c.key, type(e).__name__, e)
            raise RequestError(f"could not load {c.key}: {_short_error(e)}") from None
        if role == GENERATION and not hasattr(model, "language_model"):
            raise RequestError(f"{c.key} is not an image-to-text checkpoint")
        model.eval()
        device = model.device
        features = FeatureCache(CACHE_BYTES)  # image features by content, per model
        runner = (Captioner(model, processor, features, PrefixCache(CACHE_BYTES, features.stats))
                  if role == GENERATION else Retriever(model, processor, features))
        loaded = Loaded(c.key, role, source, model, processor, dtype, device, time.perf_counter() - t0, runner)
        say(1.0, f"{c.key} is ready")
        log.info("loaded %s (%s) in %.1f s", loaded.name, role, loaded.load_s)
        return loaded

    def _resolve(self, source, say):
        """A local checkpoint directory for `source`: itself, or a hub id's snapshot (downloaded when allowed;
        tqdm bars of the download reach gr.Progress)."""
        if os.path.isdir(source):
            return source
        say(0.1, f"Fetching {source} (downloads show their progress here)")
        try:
            return resolve_checkpoint(source)
        except Exception as e:
            raise RequestError(_short_error(e)) from None

    def _float32_bytes(self, c: Checkpoint, cls: type, source: str) -> int | None:
        """The model's bytes in float32 from its safetensors headers (a hub id not cached has them read remotely,
        no weights downloaded); None when that cannot be known before loading (offline and not cached)."""
        try:
            return memory_report(source, cls, dtype="float32").total
        except Exception as e:  # the load itself reports what is wrong
            log.info("no size for %s before loading: %s: %s", c.key, type(e).__name__, e)
            return None

    def _check_memory(self, c: Checkpoint, cls: type, source: str, float32_bytes: int | None):
        """Refuse, before any download, a model the memory free here cannot hold: blip2.memory_report's bytes at
        the dtype and quantization the load will use, against the free memory. Nothing is refused when the size
        is not known or when a device map spreads the model (accelerate places it)."""
        if self.settings.device_map or float32_bytes is None:
            return
        dtype = self.settings.resolved_dtype(False, self.device, float32_bytes > LARGE_FLOAT32_BYTES, quiet=True)
        need = float32_bytes
        if dtype != "float32" or self.settings.quantize:
            try:
                need = memory_report(source, cls, dtype=dtype, device=self.device,
                                     quantization=quantization_flag(self.settings.quantize)).total
            except Exception as e:  # settings the load itself refuses, with its own message
                log.info("no memory estimate for %s: %s: %s", c.key, type(e).__name__, e)
                return
        free = available_memory_bytes(self.device)
        if need > free:
            where = "GPU " if self.device != "cpu" else ""
            how = self.settings.quantize or dtype
            said = (f"{c.key} needs about {need / 2**30:.1f} GB of {where}memory ({how}), but only "
                    f"{free / 2**30:.1f} GB is free; still serving the model loaded before")
            int4 = self._int4_bytes(cls, source) if self.device == "cpu" and how != "int4" else None
            if int4 is not None and int4 <= free:
                raise RequestError(f"{said}. In int4 it needs about {int4 / 2**30:.1f} GB, which fits: start the "
                                   "app with --quantize int4 (BLIP2_QUANTIZE=int4)")
            raise RequestError(f"{said} (try --quantize int4 on a CPU, or --dtype float16 / --quantize 8bit on a "
                               "GPU)")

    def _int4_bytes(self, cls: type, source: str) -> int | None:
        """The model's bytes in bfloat16 with weight-only int4 (--quantize int4), None when that cannot be known."""
        try:
            return memory_report(source, cls, dtype="bfloat16", device="cpu", quantization="int4_weight_only").total
        except Exception as e:  # noqa: BLE001 -- only the advice is lost
            log.info("no int4 estimate for %s: %s: %s", source, type(e).__name__, e)
            return None

    def warm_up(self) -> None:
        """Load the startup models (called before the server starts)."""
        for role in (GENERATION, RETRIEVAL):
            self.get(self.default[role], role)

    def info(self, session: dict | None = None) -> dict:
        """The checkpoints on offer, the loaded models, a session's choice and the server's limits."""
        session = session or self.session_defaults()
        models = []
        with self._registry_lock:
            loaded = list(self._loaded.items())
        for (source, role, *_), m in loaded:
            models.append({"checkpoint": m.key, "role": role, "dtype": m.dtype, "device": str(m.device),
                           "load_seconds": round(m.load_s, 2)})
        return {"session": session, "checkpoints": [
            {"name": c.key, "roles": list(c.roles), "note": c.note} for c in self.catalogue.values()],
            "loaded": models, "limits": self.limits.as_dict(),
            "settings": dataclasses.asdict(self.settings), "device": self.device}


def _config_is_t5(directory):
    try:
        with open(os.path.join(directory, "config.json")) as f:
            cfg = json.load(f)
        return (cfg.get("text_config") or {}).get("model_type") == "t5"
    except (OSError, ValueError):
        return False


def _short_error(e: Exception, limit=400) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg if len(msg) <= limit else msg[:limit] + "..."
