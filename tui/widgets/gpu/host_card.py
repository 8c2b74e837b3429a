"""HostCard: the host's CPU and RAM, the backend process, and torch's memory per device."""

from __future__ import annotations

from typing import Any

from textual.widgets import Static

from tui.widgets.gpu.gpu_format import LEVELS, level, mib, number, ram_fraction, used_of_total_gib


def describe_host(sample: dict[str, Any]) -> str:
    """The lines of the card: host, backend, then one per CUDA device torch uses."""
    host = sample.get("host") or {}
    backend = sample.get("backend") or {}
    cores = host.get("cpu_count")
    frac = ram_fraction(host)
    lines = [
        " · ".join([
            f"CPU {number(host.get('cpu_percent'), '{:.0f}%')}"
            + (f" of {cores} cores" if isinstance(cores, int) else ""),
            f"RAM {used_of_total_gib(host.get('ram_used_mib'), host.get('ram_total_mib'))}"
            + (f" ({100 * frac:.0f}%)" if frac is not None else ""),
        ]),
        " · ".join([
            f"backend pid {backend.get('pid') or 'n/a'}",
            f"RSS {mib(backend.get('rss_mib'))}",
            f"CPU {number(backend.get('cpu_percent'), '{:.0f}%')}",
        ]),
    ]
    for dev in backend.get("torch") or []:
        lines.append(" · ".join([
            f"torch cuda:{dev.get('device', '?')}",
            f"allocated {mib(dev.get('allocated_mib'))}",
            f"reserved {mib(dev.get('reserved_mib'))}",
            f"peak {mib(dev.get('peak_mib'))}",
        ]))
    return "\n".join(lines)


class HostCard(Static):
    """What the machine and the backend use, GPU or not (``-warning``/``-alert`` for RAM)."""

    def __init__(self, **kwargs) -> None:
        super().__init__("", markup=False, **kwargs)

    def on_mount(self) -> None:
        self.border_title = "host and backend"

    def show_sample(self, sample: dict[str, Any]) -> None:
        self.update(describe_host(sample))
        state = level(ram_fraction(sample.get("host") or {}))
        for name in LEVELS:
            self.set_class(name == state, name)
