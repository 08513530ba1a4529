"""BLIP-2 Studio: `python app.py [--model ID_OR_DIR] [--itm-model ID_OR_DIR] [--dtype ...] [--quantize ...]`.

Starts on the embedded tiny model, offline, in seconds. Every flag has an environment variable (for a
Hugging Face Space, set them in the Space's settings): `python app.py --help`, the About tab and the README list
them, all from one table (app/config.py, FLAGS). Limits: BLIP2_MAX_UPLOAD_MB, BLIP2_TIME_LIMIT_S, ... (app/config.py,
Limits).
"""

import argparse
import logging
import os
import sys
import time

from app.config import flag_parser


def parse_args(argv=None) -> argparse.Namespace:
    return flag_parser().parse_args(argv)


def set_threads(svc, threads):
    """Tiny models run fastest on one CPU thread (OpenMP threads waiting on each other cost more than they
    save); real checkpoints keep torch's default unless --threads says otherwise."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
        return
    models = svc.registry.loaded_models()
    params = sum(p.numel() for m in models for p in m.model.parameters())
    if models and params < 50_000_000 and svc.registry.device == "cpu":
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
        svc = Service(generation=args.model, retrieval=args.itm_model, settings=settings, index=args.index)
        if not args.no_warm_up:
            svc.registry.warm_up()
            if svc.collection is not None:
                svc.registry.get(svc.collection.key, RETRIEVAL)
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
