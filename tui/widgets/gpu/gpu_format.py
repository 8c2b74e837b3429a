"""How GPU figures read on screen: "n/a" for a metric the card does not report, MiB/GiB,
and the memory levels (warning past 90 %, alert past 97 %) shared by the GPU pane and the header.

Plain functions over the plain data of a ``gpu.sample`` payload; no widget here.
"""

from __future__ import annotations

from typing import Any

NA = "n/a"

#: Memory used / total past which a card (and the header) turn to the warning, then alert colour.
WARN_AT = 0.90
ALERT_AT = 0.97

#: The levels as CSS classes, in increasing order of concern.
LEVELS = ("-warning", "-alert")

#: The backend keeps (and GpuHistory returns) this much; the sparklines show the same window.
WINDOW_S = 300.0


def number(x: Any, fmt: str = "{:.0f}", unit: str = "") -> str:
    """``x`` formatted, with ``unit`` after it; "n/a" for None (or anything not a number)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return NA
    return fmt.format(x) + (f" {unit}" if unit else "")


def mib(x: Any) -> str:
    """A size in MiB as people read it: ``812 MiB``, ``1.2 GiB``; "n/a" for None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return NA
    if abs(x) >= 1024:
        return f"{x / 1024:.1f} GiB"
    return f"{x:.0f} MiB"


def used_of_total_gib(used: Any, total: Any) -> str:
    """``71.2/80.0 GiB``; "n/a" when either is unknown."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (used, total)):
        return NA
    return f"{used / 1024:.1f}/{total / 1024:.1f} GiB"


def fraction(used: Any, total: Any) -> float | None:
    """used/total in 0..1, or None when unknown (or total is 0)."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (used, total)):
        return None
    if total <= 0:
        return None
    return max(0.0, min(1.0, used / total))


def level(frac: float | None) -> str:
    """The CSS class for a memory fraction: ``-alert``, ``-warning`` or ``""``."""
    if frac is None:
        return ""
    if frac > ALERT_AT:
        return "-alert"
    if frac > WARN_AT:
        return "-warning"
    return ""


def worst(levels: list[str]) -> str:
    """The most worrying of ``levels`` (``""`` when all are fine)."""
    for name in reversed(LEVELS):
        if name in levels:
            return name
    return ""


def gpu_index(gpu: dict[str, Any], position: int) -> int:
    """The GPU's NVML index, or its position in the sample when the backend did not say."""
    index = gpu.get("index")
    return index if isinstance(index, int) and not isinstance(index, bool) else position


def gpu_memory_fraction(gpu: dict[str, Any]) -> float | None:
    return fraction(gpu.get("mem_used_mib"), gpu.get("mem_total_mib"))


def ram_fraction(host: dict[str, Any]) -> float | None:
    return fraction(host.get("ram_used_mib"), host.get("ram_total_mib"))


def no_gpu_reason(nvml_error: str) -> str:
    """The reason part of the backend's ``nvml_error`` ("no NVIDIA GPU visible: <reason>")."""
    head = "no NVIDIA GPU visible"
    if nvml_error.startswith(head):
        reason = nvml_error[len(head):].lstrip(" :")
        return reason or nvml_error
    return nvml_error
