"""What the processors return (BatchFeature) and the JSON files they read and write."""

import json
import os
from typing import Any

import numpy as np
import torch


def load_json(path: str, default: Any = None) -> Any:
    if not os.path.isfile(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def dump_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


class BatchFeature(dict):
    """A dict with attribute access (enc.input_ids) and .to(device or dtype), like transformers' BatchFeature."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def convert(self, return_tensors: str | None) -> "BatchFeature":
        """Turn list values into "pt" tensors or "np" arrays in place (None: leave them)."""
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
        for key, value in self.items():
            if return_tensors is None or isinstance(value, (torch.Tensor, np.ndarray)):
                continue
            try:
                array = np.array(value) if isinstance(value[0], np.ndarray) else np.array(value, dtype=np.int64)
            except ValueError as e:
                raise ValueError(
                    f"cannot stack '{key}' into one tensor: its items differ in length or shape; "
                    "pad the text (padding=True) or pass return_tensors=None"
                ) from e
            self[key] = torch.from_numpy(array) if return_tensors == "pt" else array
        return self

    def to(self, *args: Any, **kwargs: Any) -> "BatchFeature":
        """Move every tensor to a device; a dtype casts only the floating-point tensors (pixel_values)."""
        device = kwargs.get("device")
        if device is None and args and not isinstance(args[0], torch.dtype):
            if not isinstance(args[0], (str, int, torch.device)):
                raise ValueError(f"cannot move a BatchFeature to {args[0]!r}: give a device or a torch dtype")
            device = args[0]
        for key, value in self.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                self[key] = value.to(*args, **kwargs)
            elif isinstance(value, torch.Tensor) and device is not None:
                self[key] = value.to(device=device, non_blocking=kwargs.get("non_blocking", False))
        return self
