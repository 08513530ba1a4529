"""The one table of dtype names: what --dtype, from_pretrained(dtype=...), the bench and the app accept."""

import torch

# every accepted spelling -> the torch dtype; the models run in these three only
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, config_dict: dict | None = None) -> torch.dtype:
    """None -> float32; "auto" -> the checkpoint's own (`dtype` / `torch_dtype` of its config.json, else float32);
    a name of DTYPES (with or without "torch."), or a torch dtype among them. Anything else: a ValueError."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        dtype = (config_dict or {}).get("dtype") or (config_dict or {}).get("torch_dtype") or "float32"
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported (float32, float16, bfloat16)")
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported (choose from {', '.join(DTYPES)} or auto)")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (any torch dtype, int8 and uint8 included)."""
    return str(dtype).removeprefix("torch.")
