"""GpuIndicator: the GPUs' memory in one line of the header, visible from every tab.

``GPU0 71.2/80.0 GiB 97% · GPU1 n/a`` (memory used/total, then utilisation), or with no GPU
``no GPU · CPU 12% · RAM 5.1/23.4 GiB``. A GPU past 90 % memory is drawn in the warning colour,
past 97 % in the alert colour; the widget carries the worst level as a class.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import Static

from backend import protocol as P
from tui.client import CONNECTED
from tui.messages import ConnectionChanged
from tui.widgets.gpu.gpu_format import (
    LEVELS, NA, gpu_index, gpu_memory_fraction, level, number, ram_fraction, used_of_total_gib, worst,
)

#: Level -> the theme colour that draws it.
LEVEL_COLOURS = {"-warning": "warning", "-alert": "error"}


def compact_parts(sample: dict[str, Any]) -> list[tuple[str, str]]:
    """The header's segments as (text, level)."""
    gpus = [g for g in sample.get("gpus") or [] if isinstance(g, dict)]
    if not gpus:
        host = sample.get("host") or {}
        ram = used_of_total_gib(host.get("ram_used_mib"), host.get("ram_total_mib"))
        return [("no GPU", ""),
                (f"CPU {number(host.get('cpu_percent'), '{:.0f}%')}", ""),
                (f"RAM {ram}", level(ram_fraction(host)))]
    parts = []
    for i, gpu in enumerate(gpus):
        name = f"GPU{gpu_index(gpu, i)}"
        mem = used_of_total_gib(gpu.get("mem_used_mib"), gpu.get("mem_total_mib"))
        util = gpu.get("util_gpu")
        if mem == NA and util is None:
            parts.append((f"{name} {NA}", ""))
            continue
        text = f"{name} {mem}" if mem != NA else f"{name} mem {NA}"
        if util is not None:
            text += f" {number(util, '{:.0f}%')}"
        parts.append((text, level(gpu_memory_fraction(gpu))))
    return parts


class GpuIndicator(Static):
    """The last ``gpu.sample`` in a line; empty until the first one, and when not connected."""

    def __init__(self, **kwargs) -> None:
        super().__init__("", markup=False, **kwargs)

    def on_mount(self) -> None:
        self.display = False
        self.app.backend_events.subscribe(self, self.on_backend)  # type: ignore[attr-defined]
        self.app.connection_changed.subscribe(self, self.on_connection)  # type: ignore[attr-defined]

    def on_backend(self, ev: P.Event) -> None:
        if ev.kind == "gpu.sample":
            self.show_sample(ev.payload)

    def on_connection(self, change: ConnectionChanged) -> None:
        if change.state != CONNECTED:
            # Figures from a backend we no longer hear would look live here; the GPU tab keeps them.
            self.display = False

    def show_sample(self, sample: dict[str, Any]) -> None:
        parts = compact_parts(sample)
        text = Text(no_wrap=True, overflow="ellipsis")
        for n, (part, state) in enumerate(parts):
            if n:
                text.append(" · ")
            colour = self.app.theme_variables.get(LEVEL_COLOURS.get(state, ""), "")
            text.append(part, style=f"bold {colour}" if state else "")
        self.update(text)
        self.tooltip = text.plain
        state = worst([s for _, s in parts])
        for name in LEVELS:
            self.set_class(name == state, name)
        self.display = True
