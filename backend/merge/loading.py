"""Loading the base for a merge, never merging into 4-bit weights: dequantized as trained
(:func:`dequantize_model`) or the original full-precision weights (:func:`load_for_merge`), then
peft's merge layer by layer (:func:`merge_adapter`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

from backend import protocol as P
from backend.jobs import JobCancelled
from backend.merge.paths import _dtype


# Loading and dequantizing ----------------------------------------------------------------------------


def dequantize_model(model, dtype) -> int:
    """Replace every bitsandbytes ``Linear4bit`` of ``model`` by an ``nn.Linear`` holding its
    dequantized weight in ``dtype`` (one layer at a time), drop the model's quantization config,
    and cast the rest of the model to ``dtype``. Returns how many layers were replaced.

    transformers (5.17 and 5.23 alike) has ``model.dequantize(dtype)`` for bitsandbytes models
    (``integrations.bitsandbytes.dequantize_and_replace``), but it dequantizes every weight twice,
    in the dtype the layer was quantized from (bf16 for a bf16-compute run), then casts: an fp32
    merge would carry bf16 rounding that the 4-bit layer computing in fp32 never sees. Here each
    weight is dequantized once, in fp32, and rounded once to ``dtype``."""
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit

    n = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear4bit):
            continue
        weight = module.weight
        # Dequantized in fp32 (absmax x code exactly), then rounded once to ``dtype``: the 4-bit
        # layer computing in fp32 sees these fp32 values, not ones rounded to its load dtype.
        state = copy.copy(weight.quant_state)
        state.dtype = torch.float32
        with torch.no_grad():
            dense = dequantize_4bit(weight.data, state).to(dtype)
        with torch.device("meta"):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight = torch.nn.Parameter(dense, requires_grad=False)
        if module.bias is not None:
            linear.bias = torch.nn.Parameter(module.bias.data.to(dtype), requires_grad=False)
        model.set_submodule(name, linear)
        del module, weight
        n += 1
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    else:
        for attr in ("hf_quantizer", "quantization_method"):
            if hasattr(model, attr):
                delattr(model, attr)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    model.to(dtype)
    model.config.dtype = dtype
    return n


def compute_4bit_in(model, dtype) -> None:
    """Make a 4-bit model compute in ``dtype`` without touching its quantized weights: its
    ``Linear4bit`` layers compute in ``dtype`` (they dequantize to the dtype they were quantized
    from, then cast) and its unquantized parameters are cast (buffers such as rotary frequencies
    keep their dtype). The model as trained, only computed more precisely."""
    from bitsandbytes.nn import Linear4bit, Params4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.compute_dtype = dtype
        for name, param in module.named_parameters(recurse=False):
            if isinstance(param, Params4bit) or not param.is_floating_point():
                continue
            param.data = param.data.to(dtype)


def load_for_merge(src, trained: P.ModelSettings, dtype: str, into: str, device: str,
                   report: Callable[..., None], cancelled: Callable[[], bool]):
    """The base to merge into, in ``dtype`` on ``device``: (model, tokenizer, how it was loaded)."""
    from backend import models

    quantized = trained.precision == "4bit"
    if into == "dequantized" and quantized:
        # Loaded exactly as in training (the compute dtype decides which tensors bitsandbytes
        # quantizes: the checkpoint's, cast to it), so the 4-bit weights and the unquantized
        # modules are those the adapter was trained against; then dequantized to the merge dtype.
        settings = P.ModelSettings(source=trained.source, revision=trained.revision,
                                   trust_remote_code=trained.trust_remote_code, precision="4bit",
                                   quant_type=trained.quant_type, double_quant=trained.double_quant,
                                   compute_dtype=trained.compute_dtype, attn_implementation="sdpa", device=device)
        how = f"{models.describe_precision(settings)} as trained, dequantized to {dtype}"
    else:
        settings = P.ModelSettings(source=trained.source, revision=trained.revision,
                                   trust_remote_code=trained.trust_remote_code, precision=dtype,
                                   attn_implementation="sdpa", device=device)
        how = f"original weights in {dtype}"
    loaded = models.load_base_model(
        settings, progress=lambda stage, done, total, unit="", message="": report("loading base", done, total, unit,
                                                                                     f"{stage} {message}".strip()),
        cancelled=cancelled)
    model = loaded.model
    if settings.precision == "4bit":
        dequantize_model(model, _dtype(dtype))
    return model, loaded.tokenizer, how


def merge_adapter(model, adapter: str | Path, report: Callable[..., None], cancelled: Callable[[], bool]):
    """peft's merge, layer by layer with progress: the plain model with the adapter folded in."""
    from peft.tuners.lora import LoraLayer

    from backend import adapters

    report("attaching adapter", 0, 1, "", str(adapter))
    peft_model = adapters.attach_adapter(model, adapter, name="merge")
    report("attaching adapter", 1, 1, "", "")
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    import torch

    with torch.no_grad():
        for i, layer in enumerate(layers):
            if cancelled():
                raise JobCancelled()
            layer.merge(adapter_names=["merge"])
            report("merging", i + 1, len(layers), "layers", "")
    merged = peft_model.unload()  # the base layers, which now hold the merged weights
    return merged


def _empty_cuda() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()

