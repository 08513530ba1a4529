"""BLIP-2 Studio: `python app.py [--model ID_OR_DIR] [--itm-model ID_OR_DIR] [--dtype ...] [--quantize ...]`.

Starts on the embedded tiny model, offline, in seconds. Every flag has an environment variable (for a
Hugging Face Space, set them in the Space's settings):

    --model        BLIP2_MODEL         image-to-text checkpoint (hub id or local directory)
    --itm-model    BLIP2_ITM_MODEL     image-text matching checkpoint (hub id or local directory)
    --dtype        BLIP2_DTYPE         auto | float32 | float16 | bfloat16
    --quantize     BLIP2_QUANTIZE      int8 | int4 (weight-only, CPU) | 8bit | 4bit (bitsandbytes)
    --device-map   BLIP2_DEVICE_MAP    e.g. auto
    --host         HOST or GRADIO_SERVER_NAME (default 127.0.0.1; 0.0.0.0 inside a Space)
    --port         PORT or GRADIO_SERVER_PORT (default 7860)
    --share        BLIP2_SHARE=true    a public gradio.live link (true/false, yes/no, on/off, 1/0; anything else
                                       stops the startup)
    --threads      BLIP2_THREADS       torch CPU threads (default: 1 for tiny models, else torch's choice)
    --no-warm-up   BLIP2_NO_WARM_UP    load the models on first use instead of at startup
    --index        BLIP2_INDEX         an image index (python -m blip2 index) the Search tab searches
Limits: BLIP2_MAX_UPLOAD_MB, BLIP2_TIME_LIMIT_S, BLIP2_QUEUE_SIZE, ... (see app/service.py, Limits).
"""

import argparse
import logging
import os
import sys
import time

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_flag(parser: argparse.ArgumentParser, name: str) -> bool:
    """A boolean environment variable: true/yes/on/1 or false/no/off/0 in any case (unset or empty: false).
    Anything else stops the startup with a message: a host who writes `BLIP2_SHARE=nope` must not be guessed."""
    raw = os.environ.get(name, "").strip().lower()
    if raw in TRUE:
        return True
    if raw in FALSE + ("",):
        return False
    parser.error(f"environment variable {name}={os.environ[name]!r} is not a boolean: use one of "
                 f"{'/'.join(TRUE)} or {'/'.join(FALSE)}")


def parse_args(argv=None):
    env = os.environ.get
    p = argparse.ArgumentParser(prog="app.py", description="BLIP-2 Studio, a Gradio app for BLIP-2.")
    p.add_argument("--model", default=env("BLIP2_MODEL"),
                   help="image-to-text checkpoint: a Salesforce/blip2-* hub id or a local directory "
                        "(default: the embedded tiny model)")
    p.add_argument("--itm-model", default=env("BLIP2_ITM_MODEL"),
                   help="image-text matching checkpoint, e.g. Salesforce/blip2-itm-vit-g (default: embedded)")
    p.add_argument("--dtype", default=env("BLIP2_DTYPE", "auto"),
                   choices=["auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16"])
    p.add_argument("--quantize", default=env("BLIP2_QUANTIZE") or None, choices=[None, "int8", "int4", "8bit", "4bit"])
    p.add_argument("--device-map", default=env("BLIP2_DEVICE_MAP") or None)
    p.add_argument("--host", default=env("HOST") or env("GRADIO_SERVER_NAME") or "127.0.0.1")
    p.add_argument("--port", type=int, default=int(env("PORT") or env("GRADIO_SERVER_PORT") or 7860))
    p.add_argument("--share", action="store_true", default=env_flag(p, "BLIP2_SHARE"),
                   help="a public gradio.live link (BLIP2_SHARE: true/false, yes/no, on/off, 1/0; default false)")
    p.add_argument("--threads", type=int, default=int(env("BLIP2_THREADS") or 0),
                   help="CPU threads for torch (default: 1 for the tiny embedded models, which many threads only "
                        "slow down; torch's default otherwise)")
    p.add_argument("--no-warm-up", action="store_true", default=env_flag(p, "BLIP2_NO_WARM_UP"),
                   help="load the models on first use instead of at startup (BLIP2_NO_WARM_UP)")
    p.add_argument("--index", default=env("BLIP2_INDEX") or None, metavar="INDEX_DIR",
                   help="an image index built with python -m blip2 index: the Search tab searches it (with the "
                        "retrieval model it was built with) beside its upload-a-gallery mode")
    return p.parse_args(argv)


def set_threads(svc, threads):
    """Tiny models run fastest on one CPU thread (OpenMP threads waiting on each other cost more than they
    save); real checkpoints keep torch's default unless --threads says otherwise."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
        return
    models = svc.loaded_models()
    params = sum(p.numel() for m in models for p in m.model.parameters())
    if models and params < 50_000_000 and svc.device == "cpu":
        torch.set_num_threads(1)


def tune_malloc():
    """glibc gives each of Gradio's many worker threads its own malloc arena, and raises its mmap threshold
    after large frees so later tensors land in heaps it keeps: two arenas and a fixed 256 KiB threshold
    (freed tensors go back to the system) hold the server's resident memory steady under many users."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if "MALLOC_ARENA_MAX" not in os.environ:
            libc.mallopt(-8, 2)  # M_ARENA_MAX
        if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def main(argv=None):
    tune_malloc()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from app.registry import RETRIEVAL, ModelSettings
    from app.service import Service

    t0 = time.perf_counter()
    settings = ModelSettings(dtype=None if args.dtype == "auto" else args.dtype, quantize=args.quantize,
                             device_map=args.device_map)
    try:
        svc = Service(generation=args.model, retrieval=args.itm_model, settings=settings)
        if args.index:
            from app.collection import attach

            collection = attach(svc, args.index)
        if not args.no_warm_up:
            svc.warm_up()
            if args.index:
                svc.get(collection.key, RETRIEVAL)
    except Exception as e:  # a startup model that cannot load: say why and stop
        print(f"error: {e}", file=sys.stderr)
        return 2
    set_threads(svc, args.threads)
    from app.ui import build_demo, launch_kwargs  # gradio is imported once the models are known to load

    demo = build_demo(svc)
    logging.getLogger("blip2.app").info("ready in %.1f s", time.perf_counter() - t0)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_kwargs(svc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
