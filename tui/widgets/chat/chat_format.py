"""Text for the Chat tab: an answer's figures, a target's label, the evaluation table's cells."""

from __future__ import annotations

import math
from typing import Any


def size(n: Any) -> str:
    """Bytes for people (binary units), "—" when unknown."""
    if not isinstance(n, (int, float)) or isinstance(n, bool) or n < 0:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return "—"


def _num(x: Any) -> float | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
        return float(x)
    return None


def answer_stats(p: dict[str, Any]) -> str:
    """``chat.answer``'s figures on one line: tokens, time to first token, tokens/s, path, why it
    ended (when not at the end-of-sequence token)."""
    parts = [f"{int(p.get('tokens') or 0)} tokens"]
    ttft, rate, elapsed = _num(p.get("ttft_s")), _num(p.get("tokens_per_s")), _num(p.get("elapsed_s"))
    parts.append(f"first token {ttft:.2f} s" if ttft is not None else "first token —")
    parts.append(f"{rate:.1f} tokens/s" if rate is not None else "— tokens/s")
    if elapsed is not None:
        parts.append(f"{elapsed:.2f} s")
    parts.append(f"{p.get('path') or '?'} path")
    reason = p.get("finish_reason") or ""
    if p.get("stopped") or reason == "stopped":
        parts.append("■ stopped")
    elif reason == "length":
        parts.append("max_new_tokens reached")
    elif reason == "error":
        parts.append(f"✖ {p.get('error') or 'error'}")
    return " · ".join(parts)


def target_label(t: dict[str, Any]) -> str:
    """A ``chat.targets`` item as an option of the target list."""
    label = str(t.get("label") or t.get("id") or "?")
    return label + (" ●" if t.get("loaded") else "")


def short_target(target: str) -> str:
    """A target id short enough for a column's title: ``tuned:/…/runs/ab12/adapter`` -> ``tuned ab12/adapter``."""
    if ":" not in target:
        return target
    kind, _, path = target.partition(":")
    tail = "/".join(p for p in path.rstrip("/").split("/")[-3:] if p)
    tail = tail.replace("runs/", "").replace("checkpoints/", "")
    return f"{kind} {tail}"


EVAL_COLUMNS = ("Target", "Size", "Load s", "Gen s (mean±std)", "Tokens/s", "Peak mem", "Perplexity")


def eval_cells(row: dict[str, Any]) -> tuple[str, ...]:
    """One ``eval.row`` as the table's cells."""
    def f(x: Any, spec: str) -> str:
        v = _num(x)
        return format(v, spec) if v is not None else "—"

    mean, std = _num(row.get("gen_mean_s")), _num(row.get("gen_std_s"))
    gen = f"{mean:.2f}±{std:.2f}" if mean is not None and std is not None else f(mean, ".2f")
    return (str(row.get("label") or short_target(str(row.get("target", "")))), size(row.get("size_bytes")),
            f(row.get("load_s"), ".2f"), gen, f(row.get("tokens_per_s"), ".1f"), size(row.get("peak_bytes")),
            f(row.get("perplexity"), ".3f"))
