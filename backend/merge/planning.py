"""Step 1, :func:`plan`: what a merge will take, from files alone (no model load): the adapter
and its base, the device, memory and disk needed against what is free, the output folder.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from backend import protocol as P
from backend.jobs import JobError
from backend.merge.paths import (
    DTYPE_BYTES, GIB, MIB, MODEL_WEIGHTS, replace_refusal, resolve_out, write_refusal,
)


#: Room left on the disk beyond the estimated bytes (tokenizer, card, filesystem overhead).
DISK_MARGIN = 64 * MIB


def _disk_free(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return int(shutil.disk_usage(probe).free)


# The plan ----------------------------------------------------------------------------------------------


def check_params(dtype: str, into: str, max_shard_size: str = "5GB") -> None:
    if dtype not in P.MERGE_DTYPES:
        raise JobError(f"dtype must be one of {', '.join(P.MERGE_DTYPES)}, got {dtype!r}", where="dtype",
                       hint="never 4-bit: a merge into 4-bit weights would round the adapter away")
    if into not in P.MERGE_INTO:
        raise JobError(f"into must be one of {', '.join(P.MERGE_INTO)}, got {into!r}", where="into")
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*([KMGT]i?B)\s*", max_shard_size or "", re.IGNORECASE):
        raise JobError(f"max_shard_size must look like 5GB, 500MB or 2GiB, got {max_shard_size!r}",
                       where="max_shard_size")


def _side_files_bytes(folder: Path | str | None) -> int:
    """The bytes of a local base folder's files other than its weights (tokenizer, configs),
    which the merged folder gets too; 0 for a Hub model (not downloaded here)."""
    if not folder or not Path(folder).is_dir():
        return 0
    total = 0
    for f in Path(folder).iterdir():
        if f.is_file() and not any(f.match(g) for g in MODEL_WEIGHTS):
            total += f.stat().st_size
    return total


def _base_info(adapter: str | Path, home: Path):
    """(adapter info, base settings as trained, resolved source)."""
    from backend import adapters, models

    info = adapters.inspect_adapter(adapter)
    settings = adapters.base_settings_for(adapter, home)
    try:
        src = models.resolve_source(settings)
    except JobError as exc:
        raise JobError(f"the base model this adapter was trained on is not available: {exc}",
                       where=exc.where or f"base = {settings.source}",
                       hint=exc.hint or "put the base model's folder back, or pick another adapter") from None
    return info, settings, src


def plan(adapter: str, out: str, home: Path, dtype: str = "bf16", into: str = "dequantized",
         max_shard_size: str = "5GB", device: str = "auto") -> dict[str, Any]:
    """What a merge will take (``merge.plan``): quick, no model is loaded."""
    from backend import models

    check_params(dtype, into, max_shard_size)
    info, trained, src = _base_info(adapter, home)
    target = resolve_out(out, home)
    quantized = trained.precision == "4bit"
    warnings: list[str] = []
    if into == "dequantized" and not quantized:
        warnings.append(f"the adapter was trained on a {trained.precision} base, not a 4-bit one: "
                        "'dequantized' is the same as 'original' here")
    if trained.precision == "8bit" and into == "dequantized":
        warnings.append("8-bit bases are merged from their original weights")
    full = P.ModelSettings(source=trained.source, revision=trained.revision,
                           trust_remote_code=trained.trust_remote_code, precision=dtype, device=device)
    est = models.estimate(full, src)
    need = int(est["total_bytes"])
    if into == "dequantized" and quantized:
        # The 4-bit weights stay until each layer is replaced: at worst both copies of one layer.
        need += int(est["total_bytes"] * 0.05)
    need += int(info["size_bytes"] * 2)  # the adapter, upcast to fp32 by peft
    chosen = est["device"]
    free = int(est["free_bytes"])
    if chosen.startswith("cuda") and need > free and device == "auto":
        cpu = models.cpu_memory()
        warnings.append(f"the merge needs about {need / GIB:.1f} GiB and {chosen} has {free / GIB:.1f} GiB free: "
                        "merging on the CPU (slower)")
        chosen, free = "cpu", int(cpu["free_bytes"])
    verdict = models.verdict(need, free)
    if verdict == "will not fit":
        warnings.append(f"not enough memory on {chosen}: about {need / GIB:.1f} GiB needed, {free / GIB:.1f} GiB free")
    if trained.precision == "bf16" and dtype == "fp16" or trained.compute_dtype == "bf16" and dtype == "fp16":
        warnings.append("the adapter was trained in bf16: fp16 has a smaller range (values over 65,504 overflow)")
    # What the folder will hold (weights in the merge dtype, plus the base's tokenizer and config
    # files), and what the free-space check asks for: that plus a margin for the writes' slack.
    disk_size = int(est["parameters"]) * DTYPE_BYTES[dtype] + _side_files_bytes(src.folder)
    disk_need = disk_size + DISK_MARGIN
    disk_free = _disk_free(target.parent)
    if disk_need > disk_free:
        warnings.append(f"not enough disk space at {target.parent}: about {disk_need / GIB:.1f} GiB needed, "
                        f"{disk_free / GIB:.1f} GiB free")
    out_exists = target.exists()
    out_unwritable = write_refusal(target)
    if out_unwritable:
        warnings.append(f"the merged model cannot be written to {target}: {out_unwritable}; pick another output folder")
    out_blocked = replace_refusal(target) if out_exists else None
    if out_blocked:
        warnings.append(f"{target} exists and cannot be replaced: {out_blocked}; pick another output folder")
    elif out_exists:
        warnings.append(f"{target} exists: merging replaces it (confirm to overwrite)")
    return {
        "adapter": info,
        "base": {"source": trained.source, "precision": trained.precision,
                 "precision_label": models.describe_precision(trained), "path": str(src.folder or ""),
                 "parameters": est["parameters"]},
        "into_default": "dequantized" if quantized else "original",
        "dtype": dtype, "into": into, "max_shard_size": max_shard_size,
        "device": chosen,
        "memory": {"need_bytes": need, "free_bytes": free, "verdict": verdict,
                   "reclaimed_bytes": int(est.get("reclaimed_bytes") or 0) if chosen == est["device"] else 0},
        "disk": {"size_bytes": disk_size, "need_bytes": disk_need, "free_bytes": disk_free},
        "out": str(target),
        "out_exists": out_exists,
        "out_blocked": out_blocked,
        "out_unwritable": out_unwritable,
        "warnings": warnings,
    }

