"""AdapterStep: step 1 of the merge wizard: the adapters and checkpoints (``merge.adapters``),
and the LoRA config, base, step and final loss of the one under the cursor."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from tui.widgets.merge.merge_format import ADAPTER_COLUMNS, adapter_cells, adapter_details


class AdapterStep(Vertical):
    """The table of adapters (enter picks one) and the details of the highlighted one."""

    EMPTY = "No adapter yet: train one in the LoRA and Train tabs (f5 reads the list again)."

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.adapters: list[dict[str, Any]] = []

    def compose(self) -> ComposeResult:
        yield DataTable(id="merge-adapters", cursor_type="row", zebra_stripes=True)
        yield Static(self.EMPTY, id="merge-adapter-info", markup=False)

    def on_mount(self) -> None:
        self.table.add_columns(*ADAPTER_COLUMNS)

    @property
    def table(self) -> DataTable:
        return self.query_one("#merge-adapters", DataTable)

    def show(self, adapters: list[dict[str, Any]], keep: str = "") -> None:
        self.adapters = [a for a in adapters if a.get("path")]
        table = self.table
        table.clear()
        for a in self.adapters:
            table.add_row(*adapter_cells(a), key=str(a["path"]))
        paths = [a["path"] for a in self.adapters]
        if keep in paths:
            table.move_cursor(row=paths.index(keep))
        self.describe(self.highlighted)

    @property
    def highlighted(self) -> dict[str, Any] | None:
        if not self.adapters:
            return None
        row = self.table.cursor_row
        return self.adapters[row] if 0 <= row < len(self.adapters) else None

    def describe(self, adapter: dict[str, Any] | None) -> None:
        self.query_one("#merge-adapter-info", Static).update(adapter_details(adapter) if adapter else self.EMPTY)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.describe(self.highlighted)
