"""The estimate (:func:`estimate`): what a model will cost, from ``config.json`` alone (the model
built on the meta device, bytes counted module by module as bitsandbytes would store them), against
the chosen device's free memory: "fits", "tight" or "will not fit".
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from backend import protocol as P
from backend.jobs import JobError
from backend.models.sources import (
    DTYPE_BYTES, DTYPE_NAMES, INT8_DTYPE, MIB, Source, check_config, describe_precision,
    import_ml_stack, read_config_json, resolve_source, shard_plan, validate_settings,
)
from backend.models.devices import (
    _cuda_context_exists, _held_bytes_on, bitsandbytes_devices, device_memory, list_gpus,
    resolve_device,
)


#: bitsandbytes' 4-bit block size (one absmax per 64 weights) and, with double quantization,
#: the block size of the second level (one fp32 absmax per 256 first-level absmax values).
BNB_4BIT_BLOCKSIZE = 64
BNB_NESTED_BLOCKSIZE = 256
#: Bytes of a 4-bit weight's quantization state besides its absmax values: the fp32 code of the
#: 4-bit type (16 entries), and with double quantization the fp32 offset and the 256-entry fp32
#: code of the second level.
BNB_4BIT_CODE_BYTES = 16 * 4
BNB_NESTED_FIXED_BYTES = 4 + 256 * 4

#: "fits" when the model needs at most this share of the free memory (the rest is for
#: activations, LoRA weights and optimizer states); "tight" up to all of it.
FITS_SHARE = 0.85
#: What creating a CUDA context costs on the card (measured 0.5 GiB on an H100), counted when
#: this process has none yet.
CUDA_CONTEXT_BYTES = 512 * MIB


# The estimate -----------------------------------------------------------------------------------


def _build_meta_model(raw: dict[str, Any], config_path: str, src: Source, trust_remote_code: bool):
    """The model of ``raw`` on the meta device (no memory, no weights), with its ties applied."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_kwargs = dict(trust_remote_code=trust_remote_code)
    if src.folder is None and raw.get("auto_map"):
        # The config's own code lives beside it in the repository: let transformers fetch it.
        config = AutoConfig.from_pretrained(src.name, revision=src.revision, **config_kwargs)
    else:
        config = AutoConfig.from_pretrained(str(Path(config_path).parent), **config_kwargs)
    # torch's device context is thread-local. accelerate's init_empty_weights patches
    # nn.Module for the whole process, so a load running in the job thread meanwhile got meta
    # tensors ("Cannot copy out of meta tensor"; seen when train.validate overlapped a load).
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    # Tie weights (embeddings <-> lm_head) explicitly, or a tied model counts its embedding twice.
    model.tie_weights()
    return model


def _bnb_skip_modules(model) -> list[str]:
    """Modules bitsandbytes leaves unquantized: tied weights, the output embedding, the last
    module, and modules the model keeps in fp32 (as transformers' quantizer decides)."""
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        skip = list(get_keys_to_not_convert(model))
    except Exception:  # another transformers version: the same rule, written out
        skip = []
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        skip += [k.removesuffix(".weight") for k in (*tied.keys(), *tied.values())]
        names = [n for n, _ in model.named_parameters()]
        if names:
            skip.append(names[-1].removesuffix(".weight"))
        out = model.get_output_embeddings()
        skip += [n for n, m in model.named_modules() if out is not None and m is out]
    skip += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return sorted(set(skip))


def _should_convert(name: str, skip: list[str]) -> bool:
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module

        return should_convert_module(name, skip)
    except ImportError:
        return not any(name == k or name.startswith(k + ".") or name.endswith(k) for k in skip)


def _keep_fp32(model) -> list[str]:
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return sorted(keep)


def quant_state_bytes_4bit(n: int, double_quant: bool) -> int:
    """Bytes of the quantization state of one 4-bit weight of ``n`` parameters."""
    blocks = math.ceil(n / BNB_4BIT_BLOCKSIZE)
    if double_quant:
        return blocks + 4 * math.ceil(blocks / BNB_NESTED_BLOCKSIZE) + BNB_NESTED_FIXED_BYTES + BNB_4BIT_CODE_BYTES
    return 4 * blocks + BNB_4BIT_CODE_BYTES


def count_bytes(model, s: P.ModelSettings) -> dict[str, Any]:
    """Parameter count and bytes of ``model`` (on the meta device) in the precision of ``s``."""
    from torch import nn

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()
    quantized = s.precision in ("4bit", "8bit")
    rest = INT8_DTYPE if s.precision == "8bit" else (s.compute_dtype if s.precision == "4bit" else s.precision)
    rest_bytes = DTYPE_BYTES[rest]
    skip = _bnb_skip_modules(model) if quantized else []
    keep = _keep_fp32(model)
    seen: set[int] = set()
    totals = dict(parameters=0, quantized_parameters=0, weight_bytes=0, quant_state_bytes=0, buffer_bytes=0,
                  quantized_modules=0)
    kept_linear: list[str] = []
    for name, module in model.named_modules():
        linear = type(module) is nn.Linear or bool(Conv1D and isinstance(module, Conv1D))
        convert = quantized and linear and _should_convert(name, skip)
        if quantized and linear and not convert:
            kept_linear.append(name)
        in_fp32 = any(k in name for k in keep) if keep else False
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue  # tied
            seen.add(id(param))
            n = param.numel()
            totals["parameters"] += n
            if convert and pname == "weight":
                totals["quantized_parameters"] += n
                totals["quantized_modules"] += 1
                if s.precision == "4bit":
                    totals["weight_bytes"] += math.ceil(n / 2)
                    totals["quant_state_bytes"] += quant_state_bytes_4bit(n, s.double_quant)
                else:
                    out_features = module.weight.shape[1] if isinstance(module, Conv1D) else module.out_features
                    totals["weight_bytes"] += n
                    totals["quant_state_bytes"] += 4 * out_features  # fp32 scale per row (SCB)
            else:
                totals["weight_bytes"] += n * (4 if in_fp32 else rest_bytes)
        for _bname, buf in module.named_buffers(recurse=False):
            if buf is not None and id(buf) not in seen:
                seen.add(id(buf))
                # Buffers (rotary frequencies) keep their own dtype when the model is cast.
                totals["buffer_bytes"] += buf.numel() * buf.element_size()
    totals["footprint_bytes"] = totals["weight_bytes"] + totals["buffer_bytes"]
    totals["total_bytes"] = totals["footprint_bytes"] + totals["quant_state_bytes"]
    totals["kept_linear"] = kept_linear
    totals["dtype"] = DTYPE_NAMES[rest]
    return totals


def verdict(need: int, free: int) -> str:
    """``fits`` (room to spare for training), ``tight`` or ``will not fit``."""
    if need <= FITS_SHARE * free:
        return "fits"
    if need <= free:
        return "tight"
    return "will not fit"


def estimate(s: P.ModelSettings, src: Source | None = None) -> dict[str, Any]:
    """What loading with ``s`` will take, from ``config.json`` alone, against the free memory of
    the chosen device. Plain data; raises :class:`JobError` for a bad source or config."""
    validate_settings(s)
    t0 = time.perf_counter()
    src = src or resolve_source(s)
    import_ml_stack()
    raw, where = read_config_json(src)
    check_config(raw, where, s.trust_remote_code)
    model = _build_meta_model(raw, where, src, s.trust_remote_code)
    counts = count_bytes(model, s)
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    gpus = list_gpus()
    device = resolve_device(s.device, gpus)
    mem = device_memory(device, gpus)
    need = counts["total_bytes"]
    overhead = CUDA_CONTEXT_BYTES if device.startswith("cuda") and not _cuda_context_exists() else 0
    # A load replaces the model the backend holds: its memory counts as free.
    reclaim = _held_bytes_on(device)
    free = mem["free_bytes"] + reclaim
    if s.precision in ("4bit", "8bit") and device.split(":")[0] not in bitsandbytes_devices():
        raise JobError(f"bitsandbytes cannot quantize on {device} here", where=f"precision = {s.precision}",
                       hint="choose bf16/fp16/fp32, or another device")
    plan = shard_plan(src.folder)
    return {
        "source": src.describe(),
        "source_kind": src.kind,
        "config_path": where,
        "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
        "model_type": getattr(config, "model_type", ""),
        "layers": getattr(text, "num_hidden_layers", None),
        "hidden_size": getattr(text, "hidden_size", None),
        "vocab_size": getattr(text, "vocab_size", None),
        "tie_word_embeddings": bool(getattr(text, "tie_word_embeddings", False)),
        "parameters": counts["parameters"],
        "quantized_parameters": counts["quantized_parameters"],
        "quantized_modules": counts["quantized_modules"],
        "unquantized_parameters": counts["parameters"] - counts["quantized_parameters"],
        # Linear layers bitsandbytes leaves in 16 bits (the output head, tied weights); the
        # embeddings and norms are never quantized.
        "unquantized_linear": counts["kept_linear"],
        "precision": s.precision,
        "precision_label": describe_precision(s),
        "dtype": counts["dtype"],
        "weight_bytes": counts["weight_bytes"],
        "buffer_bytes": counts["buffer_bytes"],
        "quant_state_bytes": counts["quant_state_bytes"],
        "footprint_bytes": counts["footprint_bytes"],
        "total_bytes": need,
        "device": device,
        "device_name": mem.get("name", device),
        "free_bytes": free,
        "reclaimed_bytes": reclaim,
        "device_total_bytes": mem["total_bytes"],
        "context_bytes": overhead,
        "verdict": verdict(need + overhead, free),
        "shards": len(plan["files"]),
        "disk_bytes": plan["disk_bytes"],
        "seconds": round(time.perf_counter() - t0, 3),
    }

