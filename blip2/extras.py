"""The optional extras (pyarrow, faiss, ray: requirements-scale.txt), imported when a job needs them."""

import importlib
from types import ModuleType

SCALE_INSTALL = "pip install -r requirements-scale.txt"


def need(module: str) -> ModuleType:
    """Import an optional extra (faiss, pyarrow, ray) or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is needed for this (an optional extra): {SCALE_INSTALL}") from e
