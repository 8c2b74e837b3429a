"""How a training run reads on screen: durations, the loss table's cells, the live line, alerts
and the final summary. Plain functions over the plain data of the ``train.*`` events; no widget
here."""

from __future__ import annotations

import math
from typing import Any

from backend import protocol as P
from tui.widgets.shell.error_notice import error_text

#: The loss table's columns, as the notebooks' Trainer table names them: (key, title, train.log field).
COLUMNS = (
    ("step", "Step", "step"),
    ("loss", "Training Loss", "loss"),
    ("eval_loss", "Validation Loss", "eval_loss"),
    ("learning_rate", "Learning rate", "learning_rate"),
    ("grad_norm", "Grad norm", "grad_norm"),
    ("tokens_per_s", "Tokens/s", "tokens_per_s"),
)
#: Titles of the preference methods' columns (trl's log names, ``protocol.METHOD_LOG_COLUMNS``).
METRIC_TITLES = {
    "rewards/chosen": "Rewards/chosen", "rewards/rejected": "Rewards/rejected", "rewards/margins": "Margin",
    "rewards/accuracies": "Accuracy", "nll_loss": "NLL loss", "log_odds_ratio": "Log odds ratio", "kl": "KL",
}


#: The preference methods' reward margin, drawn on the curve beside the losses.
MARGIN = "rewards/margins"


def columns_for(method: str) -> tuple[tuple[str, str, str], ...]:
    """The loss table's columns for a run of ``method``: SFT's, or for a preference method the
    training and validation loss, its own columns (rewards, margin, ...), then learning rate,
    grad norm and tokens/s."""
    extra = P.METHOD_LOG_COLUMNS.get(method or "sft", ())
    if not extra:
        return COLUMNS
    own = tuple((name, METRIC_TITLES.get(name, name), name) for name in extra)
    return COLUMNS[:3] + own + COLUMNS[3:]


#: The fields of a train.log that a later log of the same step may complete.
ROW_FIELDS = ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s", "epoch", "elapsed_s",
              "eta_s", "total_steps")
MISSING = "—"


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def duration(seconds: Any) -> str:
    """``42s``, ``3:07``, ``1:02:03``; "n/a" when unknown."""
    if not is_number(seconds) or not math.isfinite(seconds) or seconds < 0:
        return "n/a"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def loss(x: Any) -> str:
    if not is_number(x):
        return MISSING
    return f"{x:.4f}" if math.isfinite(x) else str(x)  # nan / inf, as they are


def cell(key: str, value: Any) -> str:
    """One cell of the loss table."""
    if key == "step":
        return str(value)
    if not is_number(value):
        return MISSING
    if key in ("loss", "eval_loss"):
        return loss(value)
    if key == "learning_rate":
        return f"{value:.3e}"
    if key == "grad_norm":
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    if key == "tokens_per_s":
        return f"{value:,.0f}"
    if key == "rewards/accuracies":
        return f"{value:.2f}"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def live_line(row: dict[str, Any] | None, total_steps: int, state: str = "") -> str:
    """The live line: step/total, epoch, elapsed, ETA, tokens/s."""
    if row is None:
        return f"▶ starting: {total_steps:,} steps" if total_steps else "▶ starting"
    step, total = row.get("step", 0), row.get("total_steps") or total_steps
    parts = [f"step {step:,}/{total:,} ({min(100, int(100 * step / total))}%)" if total else f"step {step:,}"]
    if is_number(row.get("epoch")):
        parts.append(f"epoch {row['epoch']:.2f}")
    parts.append(f"elapsed {duration(row.get('elapsed_s'))}")
    if state == "running":
        parts.append(f"ETA {duration(row.get('eta_s'))}")
    if is_number(row.get("tokens_per_s")):
        parts.append(f"{row['tokens_per_s']:,.0f} tokens/s")
    return " · ".join(parts)


def alert_text(p: dict[str, Any]) -> str:
    """A ``train.alert``: what happened, at which step, and what to change."""
    kind = str(p.get("kind", "")).upper()
    title = {"NAN": "NaN loss", "INF": "infinite loss", "OOM": "CUDA out of memory"}.get(kind, kind or "alert")
    text = f"⚠ {title} at step {p.get('step', '?')}: {p.get('message', '')}".rstrip(": ")
    if p.get("hint"):
        text += f"\nwhat to do: {p['hint']}"
    memory = p.get("memory") or {}
    if memory:
        figures = ", ".join(f"{k} {_size(v)}" for k, v in memory.items() if is_number(v))
        if figures:
            text += f"\nmemory: {figures}"
    return text


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def finished_text(p: dict[str, Any]) -> str:
    """A ``train.finished``: how it ended, the final losses, where the adapter is."""
    status = p.get("status", "done")
    mark = {"done": "✔ finished", "stopped": "■ stopped", "failed": "✖ failed"}.get(status, status)
    parts = [f"{mark} at step {p.get('step', 0):,}/{p.get('total_steps', 0):,} after {duration(p.get('elapsed_s'))}",
             f"loss {loss(p.get('final_loss'))}", f"eval_loss {loss(p.get('final_eval_loss'))}"]
    if is_number(p.get("tokens_per_s")):
        parts.append(f"{p['tokens_per_s']:,.0f} tokens/s")
    peak = p.get("peak_memory") or {}
    peak_figure = next((v for k, v in peak.items() if is_number(v) and "peak" in k), None)
    if peak_figure is None:
        peak_figure = next((v for v in peak.values() if is_number(v)), None)
    if peak_figure is not None:
        parts.append(f"peak {_size(peak_figure)}")
    lines = [" · ".join(parts)]
    # The adapter is what the run made; its last checkpoint is offered by the LoRA tab's resume.
    if p.get("adapter_path"):
        lines.append(f"adapter: {p['adapter_path']}")
    elif p.get("checkpoint_path"):
        lines.append(f"checkpoint: {p['checkpoint_path']}")
    return "\n".join(lines)


def failed_text(error: dict[str, Any]) -> str:
    """A job that failed before or without a ``train.finished``."""
    return error_text("training failed: ", error, "\n")
