"""GpuCard: one GPU as the last sample saw it, with memory and utilisation over 5 minutes."""

from __future__ import annotations

from typing import Any, Sequence

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, ProgressBar, Static

from tui.widgets.gpu.gpu_format import (
    LEVELS, NA, gpu_memory_fraction, level, number, used_of_total_gib,
)
from tui.widgets.gpu.usage_sparkline import UsageSparkline


def describe_gpu_extras(gpu: dict[str, Any]) -> str:
    """Temperature, power draw/limit and SM clock on one line; "n/a" for what the card hides."""
    power, limit = gpu.get("power_w"), gpu.get("power_limit_w")
    if power is None and limit is None:
        watts = f"power {NA}"
    elif limit is None:
        watts = f"power {number(power, unit='W')}"
    elif power is None:
        watts = f"power {NA} (limit {number(limit, unit='W')})"
    else:
        watts = f"power {number(power)}/{number(limit, unit='W')}"
    return " · ".join([
        f"temp {number(gpu.get('temp_c'), unit='°C')}",
        watts,
        f"SM clock {number(gpu.get('sm_clock_mhz'), unit='MHz')}",
    ])


class GpuCard(Vertical):
    """Name, memory bar (used/total, %), utilisation bar, temperature, power, SM clock, and
    sparklines of memory and utilisation. ``-warning`` past 90 % memory, ``-alert`` past 97 %."""

    def __init__(self, index: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.index = index
        self.gpu: dict[str, Any] = {"index": index}
        self.mem_history: Sequence[float] = ()
        self.util_history: Sequence[float] = ()
        self._composed = False

    def compose(self) -> ComposeResult:
        with Horizontal(classes="gpu-row"):
            yield Label("mem", classes="gpu-label")
            yield ProgressBar(total=100, show_percentage=False, show_eta=False, id="mem-bar")
            yield Static("", id="mem-text", markup=False)
            yield UsageSparkline(id="mem-spark")
        with Horizontal(classes="gpu-row"):
            yield Label("util", classes="gpu-label")
            yield ProgressBar(total=100, show_percentage=False, show_eta=False, id="util-bar")
            yield Static("", id="util-text", markup=False)
            yield UsageSparkline(id="util-spark")
        yield Static("", id="gpu-extras", markup=False)

    def on_mount(self) -> None:
        self._composed = True
        self.query_one("#mem-spark").tooltip = "memory used, last 5 minutes (0-100 %)"
        self.query_one("#util-spark").tooltip = "GPU utilisation, last 5 minutes (0-100 %)"
        self._apply()

    def update_card(self, gpu: dict[str, Any], mem_history: Sequence[float],
                    util_history: Sequence[float]) -> None:
        """Show ``gpu`` (one entry of a sample's ``gpus``) and the percentages of the window."""
        self.gpu, self.mem_history, self.util_history = gpu, mem_history, util_history
        if self._composed:
            self._apply()

    def _apply(self) -> None:
        gpu = self.gpu
        name = gpu.get("name") or "unnamed GPU"
        self.border_title = f"GPU{self.index} · {name}"

        frac = gpu_memory_fraction(gpu)
        mem = used_of_total_gib(gpu.get("mem_used_mib"), gpu.get("mem_total_mib"))
        self.query_one("#mem-bar", ProgressBar).update(progress=100 * frac if frac is not None else 0)
        self.query_one("#mem-text", Static).update(
            f"{mem} {100 * frac:3.0f}%" if frac is not None else f"{NA}")
        self.query_one("#mem-spark", UsageSparkline).set_values(self.mem_history)

        util = gpu.get("util_gpu")
        self.query_one("#util-bar", ProgressBar).update(progress=util if isinstance(util, (int, float)) else 0)
        util_text = number(util, "{:.0f}%")
        if gpu.get("util_mem") is not None:
            util_text += f" · mem bus {number(gpu.get('util_mem'), '{:.0f}%')}"
        self.query_one("#util-text", Static).update(util_text)
        self.query_one("#util-spark", UsageSparkline).set_values(self.util_history)

        self.query_one("#gpu-extras", Static).update(describe_gpu_extras(gpu))

        state = level(frac)
        for name in LEVELS:
            self.set_class(name == state, name)
