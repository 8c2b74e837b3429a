"""LossTable: the table users know from the notebooks' Trainer output, one row per logging step:
Step | Training Loss | Validation Loss | Learning rate | Grad norm | Tokens/s; a preference run
(DPO, ORPO, KTO) adds its own columns after the losses (rewards/chosen, rewards/rejected, margin,
accuracy, ...): :meth:`LossTable.set_columns`.

Rows are keyed by step, so a later log of a step (its evaluation) completes that row in place.
The pane hands it a batch of changed rows at a time (a replay of thousands comes as a few
batches); the cursor follows the newest row unless the user moved it up.
"""

from __future__ import annotations

from typing import Any, Iterable

from rich.text import Text
from textual.widgets import DataTable

from tui.widgets.train.train_format import COLUMNS, cell, columns_for


class LossTable(DataTable):
    """The loss table of the run followed by the Train pane."""

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        #: The steps shown, in table order.
        self.steps: list[int] = []
        #: The columns shown: (key, title, row field).
        self.columns_shown: tuple[tuple[str, str, str], ...] = COLUMNS
        self.method = "sft"

    def on_mount(self) -> None:
        for key, title, _ in self.columns_shown:
            self.add_column(title, key=key)

    def set_columns(self, method: str) -> bool:
        """Show the columns of a ``method`` run (rows are cleared when they change); True when
        they changed."""
        columns = columns_for(method)
        self.method = method or "sft"
        if columns == self.columns_shown:
            return False
        self.columns_shown = columns
        self.clear(columns=True)
        self.steps = []
        for key, title, _ in columns:
            self.add_column(title, key=key)
        return True

    def _cells(self, row: dict[str, Any]) -> list[Text]:
        return [Text(cell(key, row.get(field)), justify="right") for key, _, field in self.columns_shown]

    def show_rows(self, rows: dict[int, dict[str, Any]], changed: Iterable[int]) -> None:
        """Add or update the rows of ``changed`` steps (``rows``: every row, by step)."""
        changed = sorted(set(changed))
        if not changed:
            return
        following = self.row_count == 0 or self.cursor_row >= self.row_count - 1
        shown = set(self.steps)
        if self.steps and changed[0] < self.steps[-1] and any(s not in shown for s in changed):
            # A step before the last one shown is new (a resumed run): rebuild in order.
            self.reset_rows(rows)
        else:
            for step in changed:
                row = rows.get(step)
                if row is None:
                    continue
                if step in shown:
                    for (key, _, _), value in zip(self.columns_shown, self._cells(row)):
                        self.update_cell(str(step), key, value)
                else:
                    self.add_row(*self._cells(row), key=str(step))
                    self.steps.append(step)
        if following and self.row_count:
            self.move_cursor(row=self.row_count - 1, animate=False)
            # New rows count in the scroll range only after the next layout: scroll again then.
            self.call_after_refresh(self.follow)

    def reset_rows(self, rows: dict[int, dict[str, Any]]) -> None:
        """Show exactly ``rows``, in step order."""
        self.clear()
        self.steps = sorted(rows)
        for step in self.steps:
            self.add_row(*self._cells(rows[step]), key=str(step))

    def follow(self) -> None:
        """Put the cursor on the newest row (it then follows new rows again)."""
        if self.row_count:
            self.move_cursor(row=self.row_count - 1, animate=False)
            # The cursor may already be on the last row while the table just got shorter (a
            # result block above it): moving it then scrolls nothing, so scroll to the end too.
            self.scroll_end(animate=False)
