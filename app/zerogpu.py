"""ZeroGPU: on a Hugging Face Space with ZeroGPU hardware (the `spaces` package installed, SPACES_ZERO_GPU set by
the platform), the service's model calls run under `spaces.GPU`, which attaches a GPU for the duration of a call.
Anywhere else `gpu` returns the function unchanged."""

import functools
import importlib.util
import os


def on_zero_gpu() -> bool:
    return (os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")
            and importlib.util.find_spec("spaces") is not None)


def gpu(fn):
    """@gpu on a method that calls the model (generators too)."""
    if not on_zero_gpu():
        return fn
    import spaces

    return functools.wraps(fn)(spaces.GPU(fn))
