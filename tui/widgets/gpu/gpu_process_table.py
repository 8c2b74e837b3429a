"""GpuProcessTable: the processes on the GPUs, the backend's own marked."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import DataTable

from tui.widgets.gpu.gpu_format import NA, gpu_index, mib

OWN_MARK = "◀ qlw backend"


def process_rows(gpus: list[dict[str, Any]]) -> list[tuple]:
    """(gpu, pid, name, used_mib, own) for every process, by GPU, largest first."""
    rows = []
    for i, gpu in enumerate(gpus):
        for p in gpu.get("processes") or []:
            if isinstance(p, dict):
                rows.append((gpu_index(gpu, i), p.get("pid"), p.get("name"), p.get("used_mib"),
                             bool(p.get("own"))))
    rows.sort(key=lambda r: (r[0], -(r[3] if isinstance(r[3], (int, float)) else 0),
                             r[1] if isinstance(r[1], int) else 0))
    return rows


class GpuProcessTable(DataTable):
    """GPU, PID, process name, GPU memory; the backend's own process in bold with a mark.

    Rebuilt only when the processes change, so the cursor does not jump every second."""

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self._rows: list[tuple] | None = None

    def on_mount(self) -> None:
        self.add_column("GPU", key="gpu")
        self.add_column("PID", key="pid")
        self.add_column("Process", key="name")
        self.add_column("GPU memory", key="used")
        self.add_column("", key="own")

    def show_gpus(self, gpus: list[dict[str, Any]]) -> None:
        rows = process_rows(gpus)
        if rows == self._rows:
            return
        self._rows = rows
        self.clear()
        for gpu, pid, name, used, own in rows:
            style = "bold" if own else ""
            # Text, not str: DataTable parses str cells as markup, and process names are anyone's.
            self.add_row(
                Text(f"GPU{gpu}", style=style),
                Text(str(pid) if pid is not None else NA, style=style, justify="right"),
                Text(name or NA, style=style),
                Text(mib(used), style=style, justify="right"),
                Text(OWN_MARK if own else "", style=style),
                key=f"{gpu}:{pid}",
            )
