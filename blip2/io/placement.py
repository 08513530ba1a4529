"""Device maps: which device (or "disk") holds each module, accelerate's automatic maps and its dispatch hooks
(accelerate is imported where it is used: only multi-device, offloaded and "auto" loads need it)."""

import warnings

import torch
import torch.nn as nn

from ..quantization import QuantizationConfig, is_quantized
from .errors import DeviceMapError

AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


Device = str | int | torch.device  # "cpu", "cuda:0", 0, torch.device(...) or "disk"


def norm_device(d: Device) -> str:
    if d == "disk":
        return "disk"
    if isinstance(d, int):
        return f"cuda:{d}"
    d = torch.device(d)
    return str(d) if d.type == "cpu" or d.index is not None else f"{d.type}:0"


def main_device(device_map: dict[str, Device]) -> str:
    """Where activations live by default: the first accelerator of the map, else the CPU."""
    devices = [norm_device(d) for d in device_map.values()]
    return next((d for d in devices if d not in ("cpu", "disk")), "cpu")


def module_device(name: str, device_map: dict[str, str]) -> str:
    """The device_map entry that holds parameter or module `name` (the longest matching prefix)."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        key = ".".join(parts[:i])
        if key in device_map:
            return device_map[key]
    raise DeviceMapError(f"device_map gives no device for {name}: add an entry for it (or for a module holding it, "
                         f"\"\" for the whole model)")


def quant_sizes(model: nn.Module, q: QuantizationConfig | None) -> dict | None:
    """special_dtypes for accelerate's size estimates: the bytes per element a quantized weight really takes."""
    if q is None:
        return None
    from accelerate.utils import CustomDtype

    small = torch.int8 if q.bits == 8 else CustomDtype.INT4
    return {f"{n}.weight": small for n, m in model.named_modules() if is_quantized(m)}


def plan_device_map(model: nn.Module, device: Device | None = None, device_map: str | Device | dict | None = None,
                    max_memory: dict | None = None, q: QuantizationConfig | None = None) -> dict[str, str]:
    """module name -> "cpu" / "cuda:i" / "disk" for the meta model (final dtypes already set)."""
    if device_map is None:
        dm = {"": norm_device(device or "cpu")}
    elif isinstance(device_map, dict):
        dm = flat_device_map(model, {k: norm_device(v) for k, v in device_map.items()})
    elif isinstance(device_map, (int, torch.device)) or device_map not in AUTO_MAPS:
        dm = {"": norm_device(device_map)}
    else:
        from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

        no_split = [c for c in model._no_split_modules]
        special = quant_sizes(model, q)
        if device_map == "sequential":
            budget = get_max_memory(max_memory)
        else:
            budget = get_balanced_memory(model, max_memory, no_split_module_classes=no_split,
                                         special_dtypes=special, low_zero=device_map == "balanced_low_0")
        dm = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split,
                                   special_dtypes=special)
        dm = {k: norm_device(v) for k, v in dm.items()}
        if dm.get("query_tokens") == "disk":  # a bare parameter of the root: kept where the code runs
            dm["query_tokens"] = main_device(dm)
    check_device_map(model, dm)
    return dm


def flat_device_map(model: nn.Module, dm: dict[str, str]) -> dict[str, str]:
    """accelerate wants no entry inside another: a module whose descendants have entries of their own is split
    into its children (and its own parameters), which keep its device unless they have an entry."""
    dm = dict(dm)
    while True:
        parent = next((k for k in dm if any(o != k and (k == "" or o.startswith(k + ".")) for o in dm)), None)
        if parent is None:
            return dm
        device = dm.pop(parent)
        try:
            module = model.get_submodule(parent)
        except AttributeError:
            raise DeviceMapError(f"device_map entry {parent!r} is not a module of {type(model).__name__}") from None
        pre = parent + "." if parent else ""
        for n, _ in list(module.named_children()) + list(module.named_parameters(recurse=False)):
            dm.setdefault(pre + n, device)


def check_device_map(model: nn.Module, dm: dict[str, str]) -> None:
    for d in sorted(set(dm.values()) - {"cpu", "disk"}):
        kind, index = torch.device(d).type, torch.device(d).index or 0
        backend = getattr(torch, kind, None)
        if backend is None or not backend.is_available() or index >= backend.device_count():
            raise DeviceMapError(f"device {d} is not available here (torch {torch.__version__} sees "
                                 f"{backend.device_count() if backend and backend.is_available() else 0} {kind} "
                                 f"device(s)): use device='cpu' or a device that exists")
    groups = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        module_device(n, dm)  # every parameter has a device
        groups.setdefault(id(p), []).append(n)
    for group in groups.values():
        devices = {module_device(n, dm) for n in group}
        if len(devices) > 1:
            raise DeviceMapError(f"tied parameters {', '.join(group)} are shared but the device_map puts them on "
                                 f"{', '.join(sorted(devices))}: map them to one device")


def unquantize_offloaded(model: nn.Module, dm: dict[str, str], dtype: torch.dtype) -> None:
    """bitsandbytes layers cannot be offloaded: those mapped to disk (or to the CPU next to a GPU, as the
    reference's llm_int8_enable_fp32_cpu_offload) become plain Linear layers again."""
    gpu = main_device(dm) != "cpu"
    for n, m in list(model.named_modules()):
        if is_quantized(m) and module_device(n, dm) in (("disk", "cpu") if gpu else ("disk",)):
            with torch.device("meta"):
                lin = nn.Linear(m.in_features, m.out_features, m.bias is not None, dtype=dtype)
            model.set_submodule(n, lin)


def dispatch(model: nn.Module, dm: dict[str, str], offload_folder: str | None, index: dict) -> None:
    """accelerate hooks: each mapped module runs on its device; disk modules load their weights per call."""
    from accelerate import dispatch_model
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

    main = main_device(dm)
    # T5's relative position table is read by its stack, outside the forward of the block holding it: it gets a
    # hook of its own, so that it is loaded (when offloaded) and fed on its device
    tables, cpu_weights = {}, {}
    for name, m in model.named_modules():
        if name.endswith("relative_attention_bias"):
            where = module_device(name, dm)
            tables[name] = (m, where == "disk" or (where == "cpu" and main != "cpu"), where)
            if where == "cpu" and main != "cpu":
                cpu_weights[name + ".weight"] = m.weight.data
    with warnings.catch_warnings():  # accelerate warns about entries naming a parameter (query_tokens)
        warnings.filterwarnings("ignore", message="The following device_map keys do not match any submodules")
        dispatch_model(model, dm, main_device=main, offload_dir=offload_folder if index else None,
                       offload_index=index or None)
    weights = OffloadedWeightsLoader(state_dict=cpu_weights, save_folder=offload_folder, index=index, device=main)
    for name, (m, offload, where) in tables.items():
        hook = AlignDevicesHook(execution_device=main if offload else where, offload=offload, io_same_device=True,
                                weights_map=PrefixedDataset(weights, name + ".") if offload else None)
        add_hook_to_module(m, hook, append=True)
