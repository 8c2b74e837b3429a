"""How the runs ledger reads on screen: the runs table's columns and cells, sorting, the filter,
and the texts of a run's detail. Plain functions over the plain records of ``runs.list`` and
``runs.show`` (backend/protocol_runs.py); no widget here."""

from __future__ import annotations

import math
import time
from typing import Any

from tui.widgets.train.train_format import MISSING, duration, is_number, loss

#: The runs table's columns: (key, title). The figures a user scans first come right after the
#: name, so that 80 columns show them; method, base model, dataset and id follow.
COLUMNS = (
    ("mark", " "),
    ("name", "Run"),
    ("status", "Status"),
    ("steps", "Steps"),
    ("best_eval_loss", "Best val"),
    ("last_eval_loss", "Last val"),
    ("tokens_per_s", "Tok/s"),
    ("duration_s", "Time"),
    ("adapter_bytes", "Adapter"),
    ("flags", "MEU"),
    ("method", "Method"),
    ("base_model", "Base model"),
    ("dataset", "Dataset"),
    ("id", "ID"),
)
COLUMN_KEYS = tuple(k for k, _ in COLUMNS)
#: Columns a sort can take (the mark is the user's, not the run's).
SORTABLE = COLUMN_KEYS[1:]
#: Figures, right-aligned.
NUMERIC = frozenset({"steps", "best_eval_loss", "last_eval_loss", "tokens_per_s", "duration_s", "adapter_bytes"})
#: What ``column:value`` in the filter may call a column, besides its key and title.
ALIASES = {
    "run": "name", "best": "best_eval_loss", "val": "best_eval_loss", "eval": "best_eval_loss",
    "last": "last_eval_loss", "tok": "tokens_per_s", "tokens": "tokens_per_s", "speed": "tokens_per_s",
    "time": "duration_s", "duration": "duration_s", "adapter": "adapter_bytes", "size": "adapter_bytes",
    "base": "base_model", "model": "base_model", "data": "dataset", "step": "steps",
}
#: Yes/no columns the filter knows (``merged:yes``), from the record's flags.
FLAGS = ("merged", "exported", "uploaded")
#: How many runs the compare view overlays at most (backend/protocol_runs.py: MAX_COMPARED).
MAX_COMPARED = 6
MARK = "◆"


def size(n: Any) -> str:
    """Bytes as ``812 KiB``, ``1.5 MiB``, ``3.92 GiB``; ``—`` when unknown."""
    if not is_number(n) or n < 0:
        return MISSING
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value >= 100 else f"{value:.1f} {unit}"
    return f"{int(n)} B"


def short(text: Any, width: int = 28) -> str:
    """A long path or Hub id kept to ``width`` characters, its end kept (the part that differs)."""
    text = str(text or "")
    return text if len(text) <= width else "…" + text[-(width - 1):]


def named(record: dict[str, Any]) -> bool:
    # The store names an unnamed session after its id; don't show the id twice.
    return bool(record.get("name")) and record.get("name") != record.get("id")


def run_name(record: dict[str, Any]) -> str:
    return str(record["name"]) if named(record) else "(unnamed)"


def steps(record: dict[str, Any]) -> str:
    step, total = record.get("step"), record.get("total_steps")
    if not is_number(step):
        return MISSING
    return f"{step}/{total}" if is_number(total) and total else str(step)


def flags(record: dict[str, Any]) -> str:
    """``M``, ``E``, ``U`` for merged, exported, uploaded; ``·`` where not."""
    return "".join(letter if record.get(flag) else "·" for letter, flag in zip("MEU", FLAGS))


def tokens_per_s(x: Any) -> str:
    return f"{x:,.0f}" if is_number(x) and math.isfinite(x) else MISSING


def cell(key: str, record: dict[str, Any]) -> str:
    """One cell of the runs table, as text (the mark column is the pane's)."""
    if key == "name":
        return run_name(record)
    if key == "steps":
        return steps(record)
    if key in ("best_eval_loss", "last_eval_loss"):
        return loss(record.get(key))
    if key == "tokens_per_s":
        return tokens_per_s(record.get(key))
    if key == "duration_s":
        value = record.get(key)
        return duration(value) if is_number(value) else MISSING
    if key == "adapter_bytes":
        return size(record.get(key))
    if key == "flags":
        return flags(record)
    if key in ("base_model", "dataset"):
        return short(record.get(key)) or MISSING
    if key == "id":
        return str(record.get("id", ""))
    value = record.get(key)
    return MISSING if value is None or value == "" else str(value)


def sort_value(key: str, record: dict[str, Any]) -> tuple:
    """What a column sorts by: numbers as numbers, text case-blind; a run without the figure
    sorts after every run with it (either direction: see :func:`sort_records`)."""
    if key == "steps":
        value: Any = record.get("step")
    elif key == "flags":
        value = sum(2 ** i for i, f in enumerate(FLAGS[::-1]) if record.get(f))
    elif key == "name":
        value = run_name(record).lower()
    else:
        value = record.get(key)
    if is_number(value):
        return (0, float(value)) if math.isfinite(value) else (1, 0.0)
    if value is None or value == "":
        return (1, 0.0)
    return (0, str(value).lower())


def sort_records(records: list[dict[str, Any]], key: str | None, reverse: bool = False) -> list[dict[str, Any]]:
    """``records`` sorted by column ``key`` (None: as the backend sent them, newest first); runs
    without a value stay last whichever way the sort goes."""
    if key is None:
        return list(records)
    having = [r for r in records if sort_value(key, r)[0] == 0]
    lacking = [r for r in records if sort_value(key, r)[0] != 0]
    return sorted(having, key=lambda r: sort_value(key, r)[1], reverse=reverse) + lacking


def column_named(name: str) -> str | None:
    """The column (or flag) a filter term's ``name:`` means: a key, a title, an alias, or the
    start of exactly one of them."""
    name = name.lower().replace(" ", "").replace("_", "")
    names: dict[str, str] = {}
    for key, title in COLUMNS[1:]:
        names[key.replace("_", "")] = key
        names[title.lower().replace(" ", "").replace("/", "")] = key
    for alias, key in ALIASES.items():
        names[alias] = key
    for flag in FLAGS:
        names[flag] = flag
    if name in names:
        return names[name]
    starts = {key for n, key in names.items() if n.startswith(name)}
    return starts.pop() if len(starts) == 1 else None


def _compare(value: Any, op: str, target: float) -> bool:
    if not is_number(value) or not math.isfinite(value):
        return False
    return {"<": value < target, "<=": value <= target, ">": value > target,
            ">=": value >= target, "=": value == target}[op]


def term_matches(term: str, record: dict[str, Any]) -> bool:
    """One filter term: ``text`` (in any column), ``column:text``, ``column:<0.5`` (numbers),
    ``merged:yes``. A term whose column is unknown matches as plain text."""
    head, sep, value = term.partition(":")
    column = column_named(head) if sep and head else None
    if column is None:
        needle = term.lower()
        return any(needle in cell(key, record).lower() for key in COLUMN_KEYS[1:]) or needle in str(
            record.get("id", "")).lower()
    value = value.strip().lower()
    if column in FLAGS:
        want = value in ("", "y", "yes", "true", "1")
        return bool(record.get(column)) == want
    for op in ("<=", ">=", "<", ">", "="):
        if value.startswith(op) and column in NUMERIC:
            try:
                target = float(value[len(op):])
            except ValueError:
                return False
            raw = record.get("step") if column == "steps" else record.get(column)
            return _compare(raw, op, target)
    if column == "id":
        return value in str(record.get("id", "")).lower()
    return value in cell(column, record).lower() or (
        column in ("base_model", "dataset") and value in str(record.get(column) or "").lower())


def matches(query: str, record: dict[str, Any]) -> bool:
    """Every whitespace-separated term of ``query`` matches ``record`` (an empty query: all)."""
    return all(term_matches(term, record) for term in query.split())


def record_line(record: dict[str, Any]) -> str:
    """The line under the table about the highlighted run."""
    parts = [f"run {record.get('id', '')}", run_name(record), str(record.get("status") or "")]
    if is_number(record.get("loss")):
        parts.append(f"loss {loss(record['loss'])}")
    if is_number(record.get("best_eval_loss")):
        best = f"best val {loss(record['best_eval_loss'])}"
        if is_number(record.get("best_eval_step")):
            best += f" @ step {record['best_eval_step']}"
        parts.append(best)
    made = [f for f in FLAGS if record.get(f)]
    if made:
        parts.append(" · ".join(made))
    if record.get("adapter_path"):
        parts.append(str(record["adapter_path"]))
    return " · ".join(p for p in parts if p)


def when(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if is_number(t) else MISSING


def setting_value(value: Any) -> str:
    """A setting as the config and diff views show it (as ``qlw runs diff`` writes it)."""
    import json

    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, str):
        return value if value else '""'
    return format(value, "g") if isinstance(value, float) else str(value)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"training": {"learning_rate": 1e-4}}`` -> ``{"training.learning_rate": 1e-4}``."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def config_text(config: dict[str, Any]) -> str:
    """A run's config as ``section.setting = value`` lines, in the order stored."""
    flat = flatten(config or {})
    if not flat:
        return "(no config stored)"
    width = min(max(len(k) for k in flat), 40)
    return "\n".join(f"{k:<{width}} = {setting_value(v)}" for k, v in flat.items())


def error_lines(errors: list[dict[str, Any]]) -> str:
    if not errors:
        return "No errors."
    lines = []
    for e in errors:
        where = f" ({e['where']})" if e.get("where") else ""
        lines.append(f"{when(e.get('time'))} {e.get('source', 'error')}{where}: {e.get('message', '')}")
        if e.get("hint"):
            lines.append(f"    {e['hint']}")
    return "\n".join(lines)


def summary_line(record: dict[str, Any]) -> str:
    """The detail view's head: what the run is and how it ended."""
    parts = [run_name(record), f"run {record.get('id', '')}", str(record.get("status") or ""),
             f"{record.get('method') or 'sft'} on {record.get('base_model') or MISSING}",
             f"data {record.get('dataset') or MISSING}", f"steps {steps(record)}"]
    if is_number(record.get("loss")):
        parts.append(f"loss {loss(record['loss'])}")
    if is_number(record.get("best_eval_loss")):
        parts.append(f"best val {loss(record['best_eval_loss'])}")
    if is_number(record.get("tokens_per_s")):
        parts.append(f"{tokens_per_s(record['tokens_per_s'])} tok/s")
    if is_number(record.get("duration_s")):
        parts.append(duration(record["duration_s"]))
    return " · ".join(parts)


def delete_question(plan: dict[str, Any]) -> tuple[str, str]:
    """The confirm dialog of a delete, from the backend's refusal (code ``confirm``):
    (question, detail listing each path and the size)."""
    name = plan.get("name") or plan.get("run", "")
    paths = plan.get("paths") or []
    question = f"Delete run {name!r} ({plan.get('run', '')})? Its records and files go; this cannot be undone."
    lines = [f"{len(paths)} path(s), {size(plan.get('bytes') or 0) if plan.get('bytes') else 'no files'}:"]
    lines += [f"  {p}" for p in paths[:12]]
    if len(paths) > 12:
        lines.append(f"  … and {len(paths) - 12} more")
    if plan.get("kept"):
        lines.append(f"Kept (outside the data home): {', '.join(plan['kept'][:4])}")
    return question, "\n".join(lines)
