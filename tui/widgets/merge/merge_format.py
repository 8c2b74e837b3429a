"""Text for the Merge tab: an adapter's summary, the plan's lines, the verification's cells."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tui.widgets.chat.chat_format import short_session, size

STEPS = ("Adapter", "Precision", "Output", "Verify", "Upload", "Export")


def _num(x: Any) -> float | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
        return float(x)
    return None


def adapter_name(a: dict[str, Any]) -> str:
    """``dolly-r16 adapter`` or ``dolly-r16 checkpoint-4`` (the run's name; its session's short id,
    ``ab12cd34 adapter``, when the run has none)."""
    run = str(a.get("name") or "") or short_session(str(a.get("session") or "?"))
    return f"{run} {a.get('kind') == 'checkpoint' and Path(str(a.get('path', ''))).name or 'adapter'}"


def adapter_cells(a: dict[str, Any]) -> tuple[str, ...]:
    loss = _num(a.get("final_loss"))
    return (adapter_name(a), str(a.get("step") if a.get("step") is not None else "—"),
            Path(str(a.get("base_model") or "?")).name or "?", f"{a.get('r', '?')}/{a.get('lora_alpha', '?')}",
            f"{loss:.4f}" if loss is not None else "—", size(a.get("size_bytes")))


ADAPTER_COLUMNS = ("Adapter", "Step", "Base", "r/alpha", "Final loss", "Size")


def adapter_details(a: dict[str, Any]) -> str:
    """The LoRA config of an adapter, its base, step and final loss, in two or three lines."""
    modules = a.get("target_modules") or []
    if isinstance(modules, (list, tuple)):
        modules = ", ".join(sorted(str(m) for m in modules))
    loss = _num(a.get("final_loss"))
    return (f"LoRA r={a.get('r', '?')} lora_alpha={a.get('lora_alpha', '?')} on {modules or '?'}\n"
            f"base {a.get('base_model') or '?'} · step {a.get('step') if a.get('step') is not None else '?'} · "
            f"final loss {f'{loss:.4f}' if loss is not None else '—'}\n"
            f"{a.get('path', '')}")


def plan_text(p: dict[str, Any]) -> str:
    """merge.plan's estimate: the base as trained, memory verdict, disk, the folder, warnings."""
    base, memory, disk = p.get("base") or {}, p.get("memory") or {}, p.get("disk") or {}
    verdict = memory.get("verdict") or "?"
    mark = {"fits": "✔", "tight": "⚠", "will not fit": "✖"}.get(verdict, "·")
    lines = [
        f"base {Path(str(base.get('source') or base.get('path') or '?')).name or 'embedded tiny model'}, trained "
        f"{base.get('precision_label') or base.get('precision') or '?'} · default into: {p.get('into_default', '?')}",
        f"{mark} memory on {p.get('device', '?')}: {size(memory.get('need_bytes'))} needed, "
        f"{size(memory.get('free_bytes'))} free → {verdict}",
        f"{'✔' if (disk.get('need_bytes') or 0) <= (disk.get('free_bytes') or 0) else '✖'} disk: "
        f"about {size(disk.get('size_bytes', disk.get('need_bytes')))} written, {size(disk.get('free_bytes'))} free",
    ]
    lines += [f"⚠ {w}" for w in p.get("warnings") or []]
    return "\n".join(lines)


VERIFY_COLUMNS = ("Model", "max |Δ logit|", "Perplexity", "Size", "Load s")


def _sci(x: Any) -> str:
    v = _num(x)
    if v is None:
        return "—"
    return "0" if v == 0 else f"{v:.2e}"


def verify_cells(row: dict[str, Any]) -> tuple[str, ...]:
    ppl, load = _num(row.get("perplexity")), _num(row.get("load_s"))
    return (str(row.get("model") or "?"), _sci(row.get("max_abs_logit_diff")),
            f"{ppl:.3f}" if ppl is not None else "—", size(row.get("size_bytes")),
            f"{load:.2f}" if load is not None else "—")


def verify_summary(p: dict[str, Any]) -> str:
    """The line beside the table: the noise floor, and where the merged model stands against it."""
    floor = _num(p.get("noise_floor"))
    merged = next((r for r in p.get("rows") or [] if r.get("model") == "merged"), None)
    diff = _num((merged or {}).get("max_abs_logit_diff"))
    text = (f"max |Δ logit| vs the model as trained · noise floor {_sci(floor)} (the base in "
            f"{p.get('merge_dtype') or p.get('dtype', '?')} vs fp32) · {p.get('prompts', '?')} prompts")
    if diff is not None and floor is not None:
        text += ("\n✔ the merged model is within the noise floor" if diff <= max(floor, 1e-5) * 1.5
                 else f"\n⚠ the merged model differs by {diff / max(floor, 1e-12):.1f}× the noise floor")
    return text


def hub_line(s: dict[str, Any]) -> str:
    """hub.status for people, never a token: offline, or where the token comes from and whose."""
    if s.get("offline"):
        return "Hub: offline (HF_HUB_OFFLINE=1): local export only · a dry run still lists the files"
    source = s.get("token_source")
    if not source:
        return (f"Hub {s.get('endpoint', '')}: no token · set HF_TOKEN or run `hf auth login` to upload "
                "(a dry run needs none)")
    who = f" as {s['user']}" if s.get("user") else ""
    return f"Hub {s.get('endpoint', '')}: token from {source}{who}"


def files_text(files: list[dict[str, Any]], limit: int = 8) -> str:
    names = [f"{f.get('path') or f.get('name')} ({size(f.get('size_bytes'))})" for f in files[:limit]]
    more = f" … and {len(files) - limit} more" if len(files) > limit else ""
    return ", ".join(names) + more
