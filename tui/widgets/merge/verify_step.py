"""VerifyStep: step 4 of the merge wizard: the verification table of ``merge.verified`` (model,
max |logit diff| against the model as trained, perplexity, size) with the noise floor beside it."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from tui.widgets.merge.merge_format import VERIFY_COLUMNS, verify_cells, verify_summary


class VerifyStep(Vertical):
    """The table and its summary line."""

    EMPTY = "No verification yet: merge with 'verify after' ticked (step 3), or press f5 to verify the folder."

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.verified: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        yield Static(self.EMPTY, id="merge-verify-line", markup=False)
        yield DataTable(id="merge-verify-table", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        self.table.add_columns(*VERIFY_COLUMNS)

    @property
    def table(self) -> DataTable:
        return self.query_one("#merge-verify-table", DataTable)

    def show(self, p: dict[str, Any]) -> None:
        self.verified = dict(p)
        self.table.clear()
        for row in p.get("rows") or []:
            self.table.add_row(*verify_cells(row))
        self.query_one("#merge-verify-line", Static).update(f"{p.get('out', '')}\n{verify_summary(p)}")

    def clear(self) -> None:
        self.verified = None
        self.table.clear()
        self.status(self.EMPTY)

    def status(self, text: str) -> None:
        self.query_one("#merge-verify-line", Static).update(text)
