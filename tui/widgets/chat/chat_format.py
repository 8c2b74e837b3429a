"""Text for the Chat tab: an answer's figures, a target's label, the evaluation table's cells."""

from __future__ import annotations

import math
import re
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
    """A ``chat.targets`` item as a short option of the target list (● when it is loaded):
    ``base · tiny-llama``, ``tuned b14576/adapter · step 30``, ``merged b14576-adapter-merged``;
    a tuned target of a named run goes by the run's name: ``tuned dolly-r16/adapter · step 30``."""
    target = str(t.get("id") or "?")
    if target == "base":
        source = str(t.get("base_source") or t.get("path") or "").rstrip("/")
        label = f"base · {source.rsplit('/', 1)[-1]}" if source else "base"
    else:
        label = short_target(target)
        if t.get("kind") == "tuned" and t.get("name"):
            label = f"tuned {t['name']}/{label.rsplit('/', 1)[-1]}"
        if t.get("kind") == "tuned" and t.get("step") is not None and "checkpoint-" not in label:
            label += f" · step {t['step']}"
    return label + (" ●" if t.get("loaded") else "")


_SESSION = re.compile(r"^\d{8}-\d{6}-(\w+)$")


def short_session(session: str) -> str:
    """A session id as people tell sessions apart: ``20261123-142436-b14576`` -> ``b14576``."""
    match = _SESSION.match(session)
    return match.group(1) if match else session[:8]


def short_target(target: str) -> str:
    """A target id short enough for a column's title: ``tuned:/…/runs/<session>/adapter`` ->
    ``tuned b14576/adapter``, ``…/checkpoints/checkpoint-4`` -> ``tuned b14576/checkpoint-4``."""
    if ":" not in target:
        return target
    kind, _, path = target.partition(":")
    parts = [p for p in path.rstrip("/").split("/") if p]
    if "runs" in parts and parts.index("runs") + 1 < len(parts):
        session = parts[parts.index("runs") + 1]
        return f"{kind} {short_session(session)}/{parts[-1]}"
    return f"{kind} {parts[-1] if parts else path}"


def short_size(n: Any) -> str:
    """Bytes in three significant digits (a narrow table column)."""
    text = size(n)
    if text == "—" or text.endswith(" B"):
        return text
    value, unit = text.split()
    v = float(value)
    return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"


EVAL_COLUMNS = ("Target", "Size", "Load s", "Gen s ±sd", "Tok/s", "Peak", "PPL")


def eval_cells(row: dict[str, Any]) -> tuple[str, ...]:
    """One ``eval.row`` as the table's cells."""
    def f(x: Any, spec: str) -> str:
        v = _num(x)
        return format(v, spec) if v is not None else "—"

    mean, std = _num(row.get("gen_mean_s")), _num(row.get("gen_std_s"))
    gen = f"{mean:.2f}±{std:.2f}" if mean is not None and std is not None else f(mean, ".2f")
    return (short_target(str(row.get("target", ""))), short_size(row.get("size_bytes")),
            f(row.get("load_s"), ".2f"), gen, f(row.get("tokens_per_s"), ".1f"), short_size(row.get("peak_bytes")),
            f(row.get("perplexity"), ".2f"))
