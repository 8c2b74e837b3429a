"""The inspector (:func:`inspect_model`): a loaded model and its tokenizer as plain data:
architecture, layers, parameters, linear modules grouped by name, special tokens and chat template.
"""

from __future__ import annotations

from typing import Any

from backend.models.sources import DTYPE_NAMES


# The inspector -----------------------------------------------------------------------------------


def _linear_kind(module) -> tuple[bool, bool]:
    """(is a linear layer, is quantized) for torch, bitsandbytes and transformers' Conv1D."""
    from torch import nn

    try:
        import bitsandbytes as bnb

        quant_types: tuple = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        quant_types = ()
    if quant_types and isinstance(module, quant_types):
        return True, True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()
    return isinstance(module, nn.Linear) or bool(Conv1D and isinstance(module, Conv1D)), False


def linear_groups(model) -> list[dict[str, Any]]:
    """The linear modules grouped by their last name (``q_proj``, ``k_proj``, ...), in model
    order: count, distinct ``[out_features, in_features]`` shapes, whether quantized, and whether
    peft's ``"all-linear"`` includes them (it leaves out the output head)."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    groups: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        is_linear, quantized = _linear_kind(module)
        if not is_linear or not name:
            continue
        if hasattr(module, "in_features"):
            shape = [int(module.out_features), int(module.in_features)]
        else:  # Conv1D stores (in, out)
            shape = [int(module.weight.shape[1]), int(module.weight.shape[0])]
        leaf = name.rsplit(".", 1)[-1]
        g = groups.setdefault(leaf, {"name": leaf, "count": 0, "shapes": [], "quantized": quantized,
                                     "in_all_linear": True, "example": name})
        g["count"] += 1
        if shape not in g["shapes"]:
            g["shapes"].append(shape)
        g["quantized"] = g["quantized"] and quantized
        if module is out_emb:
            g["in_all_linear"] = False
    return list(groups.values())


def tokenizer_facts(tokenizer) -> dict[str, Any]:
    """Vocabulary size, special tokens, whether a pad token exists (and the usual fix), and
    whether a chat template exists."""
    if tokenizer is None:
        return {"loaded": False}
    special = {name.removesuffix("_token"): value for name, value in tokenizer.special_tokens_map.items()
               if isinstance(value, str)}
    extra = list(getattr(tokenizer, "extra_special_tokens", None) or
                 getattr(tokenizer, "additional_special_tokens", None) or [])
    has_pad = tokenizer.pad_token is not None
    pad_fix = ""
    if not has_pad:
        if tokenizer.eos_token is not None:
            pad_fix = f"tokenizer.pad_token = tokenizer.eos_token ({tokenizer.eos_token!r})"
        elif tokenizer.unk_token is not None:
            pad_fix = f"tokenizer.pad_token = tokenizer.unk_token ({tokenizer.unk_token!r})"
        else:
            pad_fix = "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the embeddings"
    max_len = getattr(tokenizer, "model_max_length", None)
    return {
        "loaded": True,
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "base_vocab_size": getattr(tokenizer, "vocab_size", None),
        "model_max_length": int(max_len) if isinstance(max_len, int) and max_len < 10**9 else None,
        "special_tokens": special,
        "extra_special_tokens": [str(t) for t in extra][:50],
        "has_pad": has_pad,
        "pad_token_id": tokenizer.pad_token_id if has_pad else None,
        "pad_fix": pad_fix,
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "padding_side": getattr(tokenizer, "padding_side", None),
    }


def inspect_model(model, tokenizer=None) -> dict[str, Any]:
    """A loaded model and its tokenizer as plain data, for the Model pane and the LoRA form."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    quant = getattr(config, "quantization_config", None)
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict()
    if isinstance(quant, dict):
        if quant.get("load_in_4bit"):
            compute = str(quant.get("bnb_4bit_compute_dtype", "")).replace("torch.", "")
            compute = {v: k for k, v in DTYPE_NAMES.items()}.get(compute, compute)
            label = (f"4-bit {quant.get('bnb_4bit_quant_type')}"
                     f"{' + double quant' if quant.get('bnb_4bit_use_double_quant') else ''}, compute {compute}")
        elif quant.get("load_in_8bit"):
            label = "8-bit (LLM.int8)"
        else:
            label = str(quant.get("quant_method", "quantized"))
    else:
        label = ""
    first = next(model.parameters(), None)
    dtype = getattr(model, "dtype", None) or (first.dtype if first is not None else None)
    return {
        "loaded": True,
        "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", ""),
        "name_or_path": getattr(config, "_name_or_path", ""),
        "layers": getattr(text, "num_hidden_layers", None),
        "hidden_size": getattr(text, "hidden_size", None),
        "intermediate_size": getattr(text, "intermediate_size", None),
        "attention_heads": getattr(text, "num_attention_heads", None),
        "kv_heads": getattr(text, "num_key_value_heads", None),
        "vocab_size": getattr(text, "vocab_size", None),
        "max_position_embeddings": getattr(text, "max_position_embeddings", None),
        "parameters": int(model.num_parameters()),
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else "",
        "quantization": label,
        "device": str(first.device) if first is not None else "",
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "linear_groups": linear_groups(model),
        "tokenizer": tokenizer_facts(tokenizer),
    }

