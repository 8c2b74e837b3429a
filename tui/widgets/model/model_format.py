"""How base-model figures read on screen: sizes, parameter counts, the estimate line, the
measured footprint beside the estimate, and the inspector's summary and tokenizer lines.

Plain functions over the plain data of ``model.estimate``, ``model.loaded`` and ``model.inspect``;
no widget here.
"""

from __future__ import annotations

from typing import Any

NA = "n/a"

SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}

#: The estimate's verdict -> the CSS class of the estimate line.
VERDICT_CLASSES = {"fits": "-fits", "tight": "-tight", "will not fit": "-wont-fit"}
VERDICT_MARKS = {"fits": "✔ fits", "tight": "⚠ tight", "will not fit": "✖ will not fit"}


def size(n: Any) -> str:
    """Bytes as people read them: ``913.5 KiB``, ``3.85 GiB``; "n/a" for None."""
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        return NA
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}"
    return f"{n:.0f} B"


def count(n: Any) -> str:
    """A parameter count in short: ``688.8k``, ``7.25B``."""
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        return NA
    for suffix, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


def ratio(x: Any) -> str:
    return f"×{x:.3f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else NA


def estimate_text(est: dict[str, Any]) -> str:
    """The estimate in two lines at 80 columns: the model, the precision, what it needs, what
    the device has free, and the verdict."""
    needs = f"needs {size(est.get('total_bytes'))}"
    if est.get("quant_state_bytes"):
        needs += f" (incl. {size(est.get('quant_state_bytes'))} quant state)"
    free = f"{est.get('device', '?')}: {size(est.get('free_bytes'))} free"
    if est.get("reclaimed_bytes"):
        free += f" (incl. {size(est['reclaimed_bytes'])} of the loaded model)"
    if est.get("context_bytes"):
        free += f", {size(est['context_bytes'])} for the CUDA context"
    verdict = est.get("verdict", "")
    parts = [f"{est.get('architecture', '?')} · {count(est.get('parameters'))} params",
             est.get("precision_label", est.get("precision", "")), needs, free]
    return " · ".join(p for p in parts if p) + f" → {VERDICT_MARKS.get(verdict, verdict)}"


def estimate_detail(est: dict[str, Any]) -> str:
    """The estimate's exact figures (the estimate line's tooltip)."""
    lines = [
        f"{est.get('parameters', 0):,} parameters, {est.get('quantized_parameters', 0):,} of them quantized",
        f"weights {est.get('weight_bytes', 0):,} B + buffers {est.get('buffer_bytes', 0):,} B"
        f" = {est.get('footprint_bytes', 0):,} B (what get_memory_footprint will say)",
    ]
    if est.get("quant_state_bytes"):
        lines.append(f"+ quantization state {est['quant_state_bytes']:,} B = {est.get('total_bytes', 0):,} B")
    if est.get("unquantized_linear"):
        lines.append(f"linear layers kept in {est.get('dtype', '16 bits')}: {', '.join(est['unquantized_linear'])}")
    lines.append(f"{est.get('device_name', est.get('device', ''))}: {est.get('free_bytes', 0):,} B free")
    if est.get("shards"):
        lines.append(f"{est['shards']} shard(s), {size(est.get('disk_bytes'))} on disk")
    return "\n".join(lines)


def error_text(error: dict[str, Any]) -> str:
    """A failed estimate or load, for people: what, where, and what to do next."""
    text = f"✖ {error.get('message') or 'failed'}"
    if error.get("where"):
        text += f" ({error['where']})"
    if error.get("hint"):
        text += f" — {error['hint']}"
    return text


def loaded_status(load: dict[str, Any]) -> str:
    """The status line after a load: where and how fast."""
    seconds = load.get("load_seconds") or 0
    return f"✔ loaded on {load.get('device', '?')} in {seconds:.2f} s" if seconds < 10 else \
        f"✔ loaded on {load.get('device', '?')} in {seconds:.0f} s"


def measured_text(load: dict[str, Any]) -> str:
    """The real footprint of a loaded model beside its estimate (measured / estimated)."""
    est, measured, comp = load.get("estimate") or {}, load.get("measured") or {}, load.get("comparison") or {}
    if not measured:
        return ""
    text = f"measured {size(measured.get('footprint_bytes'))}"
    if measured.get("quant_state_bytes"):
        text += (f" + {size(measured['quant_state_bytes'])} quant state = {size(measured.get('tensor_bytes'))}"
                 f" ({ratio(comp.get('tensors_vs_estimate'))} the estimate)")
    else:
        text += f" ({ratio(comp.get('footprint_vs_estimate'))} the estimate)"
    if measured.get("torch_allocated_bytes") is not None:
        text += (f" · torch allocated {size(measured['torch_allocated_bytes'])} "
                 f"({ratio(comp.get('allocated_vs_estimate'))})")
    return text


def summary_text(info: dict[str, Any]) -> str:
    """The inspector's head in two lines: the architecture and its widths, then precision,
    device and attention."""
    heads = info.get("attention_heads")
    kv = info.get("kv_heads")
    attention = f"{heads} heads" + (f", {kv} kv" if kv and kv != heads else "") if heads else ""
    first = " · ".join(p for p in (
        info.get("architecture", "?"),
        f"{info.get('layers', '?')} layers",
        f"hidden {info.get('hidden_size', '?')}",
        attention,
        f"{count(info.get('parameters'))} params",
    ) if p)
    dtype = SHORT_DTYPES.get(info.get("dtype", ""), info.get("dtype", ""))
    second = " · ".join(p for p in (
        info.get("quantization") or dtype,
        f"rest {dtype}" if info.get("quantization") and dtype else "",
        info.get("device", ""),
        f"{info['attn_implementation']} attention" if info.get("attn_implementation") else "",
    ) if p)
    return f"{first}\n{second}"


def tokenizer_text(tok: dict[str, Any]) -> str:
    """The tokenizer's facts: vocabulary, special tokens, pad token (or the usual fix), chat
    template; one line when there is a pad token."""
    if not tok or not tok.get("loaded"):
        reason = tok.get("error") if tok else ""
        return "tokenizer: none found with the model" + (f" ({reason})" if reason else "")
    special = " ".join(v for k, v in (tok.get("special_tokens") or {}).items() if k != "pad")
    if tok.get("extra_special_tokens"):
        special += f" +{len(tok['extra_special_tokens'])}"
    vocab = f"{tok.get('vocab_size', 0):,} tokens"
    if tok.get("model_max_length"):
        vocab += f", max {tok['model_max_length']:,}"
    line = " · ".join(p for p in (
        vocab,
        special.strip(),
        f"pad {(tok.get('special_tokens') or {}).get('pad', '')} ✔" if tok.get("has_pad") else "no pad token",
        "chat template ✔" if tok.get("has_chat_template") else "no chat template",
    ) if p)
    if not tok.get("has_pad"):
        line += f"\nusual fix for the missing pad token: {tok.get('pad_fix', '')}"
    return line


def group_rows(info: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """The linear-module groups as table rows: name, count, shapes (out×in), 4/8-bit, LoRA."""
    rows = []
    for g in info.get("linear_groups") or []:
        shapes = ", ".join(f"{o}×{i}" for o, i in g.get("shapes") or [])
        rows.append((g["name"], str(g.get("count", 0)), shapes,
                     "yes" if g.get("quantized") else "no",
                     "all-linear" if g.get("in_all_linear") else "output head"))
    return rows
