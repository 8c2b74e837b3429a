"""Devices and free memory: the GPUs NVML sees, the CPU's memory, the device a setting names
(:func:`resolve_device`), where bitsandbytes runs, the Model pane's options (:func:`options`), and
the one base model the backend holds (:func:`release_base_model`).
"""

from __future__ import annotations

import gc
import importlib.util
import os
from pathlib import Path
from typing import Any

from backend import protocol as P
from backend.holdings import HOLDINGS
from backend.jobs import JobError
from backend.models.sources import hub_offline


# Devices and free memory ---------------------------------------------------------------------


def _visible_nvml_indices(count: int) -> list[int]:
    """NVML indices of the GPUs torch sees, in torch's order (CUDA_VISIBLE_DEVICES)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return list(range(count))
    out = []
    for part in env.split(","):
        part = part.strip()
        if not part.isdigit():
            return list(range(count))  # UUIDs or MIG names: assume the natural order
        if int(part) < count:
            out.append(int(part))
    return out


def list_gpus() -> list[dict[str, Any]]:
    """Every GPU this process may use, as ``{"device": "cuda:N", "name", "free_bytes",
    "total_bytes"}``: from torch when it already holds a CUDA context, else from NVML (so that
    asking creates no context). Empty without a GPU."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out.append({"device": f"cuda:{i}", "name": torch.cuda.get_device_name(i),
                        "free_bytes": int(free), "total_bytes": int(total)})
        return out
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception:  # no driver, no library, no GPU
        return []
    out = []
    for i, index in enumerate(_visible_nvml_indices(count)):
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
        except Exception:
            continue
        out.append({"device": f"cuda:{i}", "name": name.decode() if isinstance(name, bytes) else name,
                    "free_bytes": int(mem.free), "total_bytes": int(mem.total)})
    return out


def cpu_memory() -> dict[str, Any]:
    """The host's memory as a device: available and total RAM."""
    import psutil

    vm = psutil.virtual_memory()
    return {"device": "cpu", "name": "CPU RAM", "free_bytes": int(vm.available), "total_bytes": int(vm.total)}


def resolve_device(device: str, gpus: list[dict[str, Any]] | None = None) -> str:
    """``auto`` is the first GPU, else the CPU; ``cuda`` is ``cuda:0``. Refuses a GPU that is
    not there."""
    gpus = list_gpus() if gpus is None else gpus
    if device == "auto":
        return gpus[0]["device"] if gpus else "cpu"
    if device == "cuda":
        device = "cuda:0"
    if device.startswith("cuda") and device not in {g["device"] for g in gpus}:
        have = ", ".join(g["device"] for g in gpus) or "none"
        raise JobError(f"there is no {device} on this machine (GPUs: {have})", where=f"device = {device}",
                       hint="choose auto or cpu, or another GPU")
    return device


def device_memory(device: str, gpus: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Free and total memory of a resolved device (``cpu`` or ``cuda:N``)."""
    if device == "cpu":
        return cpu_memory()
    gpus = list_gpus() if gpus is None else gpus
    for g in gpus:
        if g["device"] == device:
            return dict(g)
    raise JobError(f"there is no {device} on this machine", where=f"device = {device}")


def _cuda_context_exists() -> bool:
    import sys

    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized())


def bitsandbytes_devices() -> set[str]:
    """Device types bitsandbytes can quantize on here (empty when it is not installed)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return set()
    import bitsandbytes as bnb

    return set(getattr(bnb, "supported_torch_devices", {"cuda", "cpu"}))


def options(home: Path) -> dict[str, Any]:
    """What the Model pane offers: precisions, attention implementations that are installed,
    devices with their free memory, whether the Hub is offline, and the tiny model's folder.
    Cheap: imports neither torch nor bitsandbytes."""
    from backend import tiny

    gpus = list_gpus()
    attn = [a for a in P.MODEL_ATTN_IMPLEMENTATIONS
            if a != "flash_attention_2" or importlib.util.find_spec("flash_attn") is not None]
    tiny_path = tiny.tiny_model_path(home)
    return {
        "precisions": list(P.MODEL_PRECISIONS),
        "quant_types": list(P.MODEL_QUANT_TYPES),
        "compute_dtypes": list(P.MODEL_COMPUTE_DTYPES),
        "attn_implementations": attn,
        "devices": [{"device": "auto", "name": f"auto ({gpus[0]['device'] if gpus else 'cpu'})"},
                    *gpus, cpu_memory()],
        "bitsandbytes": importlib.util.find_spec("bitsandbytes") is not None,
        "offline": hub_offline(),
        "tiny_path": str(tiny_path),
        "tiny_ready": (tiny_path / "config.json").is_file(),
    }


# What the backend holds ---------------------------------------------------------------------------

#: Plain facts about the model in HOLDINGS["base"] (settings, device, measured bytes), so that
#: an estimate can count a model that a load would replace as free. Not the model itself.
_LOADED: dict[str, Any] = {}


def _held_bytes_on(device: str) -> int:
    if HOLDINGS.get("base") is None or not _LOADED or _LOADED.get("device") != device:
        return 0
    return int(_LOADED.get("measured", {}).get("tensor_bytes") or 0)


def release_base_model() -> bool:
    """Drop the held base model and tokenizer (before loading another); True if one was held."""
    had = HOLDINGS.drop("base")
    HOLDINGS.drop("tokenizer")
    _LOADED.clear()
    if had:
        gc.collect()
        import sys

        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    return had

