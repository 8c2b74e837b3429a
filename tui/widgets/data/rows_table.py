"""RowsTable: one page of a dataset's rows; moving past either end asks for the next page.

The table never holds more than a page (the backend slices its memory-mapped Arrow table), so a
million-row file scrolls like a hundred-row one. Row labels are the rows' indices in the split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.cells import cell_len
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable


#: Columns are as wide as their widest cell on the first page (up to this many cells).
MAX_COLUMN_WIDTH = 48
PAGE_SAMPLE = 100


def cell_text(value: Any) -> Text:
    """A cell as plain text on one line (never markup: the data is the user's)."""
    if value is None:
        return Text("null", style="dim italic")
    if isinstance(value, bool):
        return Text(str(value).lower())
    if isinstance(value, (int, float)):
        return Text(f"{value:g}" if isinstance(value, float) else str(value), justify="right")
    text = str(value).replace("\r\n", "\n").replace("\n", " ⏎ ").replace("\t", " ")
    return Text(text, no_wrap=True, overflow="ellipsis")


class RowsTable(DataTable):
    """A page of rows: ``page_start`` .. ``page_start + row_count`` of ``total``."""

    BINDINGS = [
        Binding("ctrl+home", "first_page", "First rows", id="data.rows.first", show=False,
                tooltip="Go to the first row of the dataset (or of the filter's matches)."),
        Binding("ctrl+end", "last_page", "Last rows", id="data.rows.last", show=False,
                tooltip="Go to the last row of the dataset (or of the filter's matches)."),
    ]

    @dataclass
    class PageWanted(Message):
        """The table needs the page starting at ``start``; put the cursor on its ``cursor``
        row ("first" or "last") when it comes."""

        table: "RowsTable"
        start: int
        cursor: str = "first"

        @property
        def control(self) -> "RowsTable":
            return self.table

    def __init__(self, page_size: int = 100, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.page_size = page_size
        self.page_start = 0
        self.total = 0
        self.columns_shown: list[str] = []
        self.indices: list[int] = []
        self._waiting = False  # a page was asked for and has not come yet

    # Pages --------------------------------------------------------------------------------------

    def show_page(self, page: dict[str, Any], cursor: str = "first") -> None:
        """Fill the table with a ``data.page`` result."""
        columns = list(page.get("columns", []))
        cells = [[cell_text(v) for v in row["cells"]] for row in page.get("rows", [])]
        if columns != self.columns_shown:
            # Widths from the first page, then kept: the table measures no cell afterwards (the
            # slow part of drawing a page), and columns do not jump while paging.
            self.clear(columns=True)
            for i, name in enumerate(columns):
                width = max([cell_len(name)] + [cell_len(row[i].plain) for row in cells[:PAGE_SAMPLE]])
                self.add_column(Text(name, style="bold"), key=name, width=max(4, min(width, MAX_COLUMN_WIDTH)))
            self.columns_shown = columns
        else:
            self.clear()
        self.page_start = int(page.get("start", 0))
        self.total = int(page.get("total", 0))
        self.indices = []
        for row, row_cells in zip(page.get("rows", []), cells):
            index = int(row["index"])
            self.indices.append(index)
            self.add_row(*row_cells, key=str(index), label=Text(str(index), style="dim"))
        self._waiting = False
        if self.row_count:
            self.move_cursor(row=self.row_count - 1 if cursor == "last" else 0, animate=False)

    def clear_rows(self) -> None:
        self.clear(columns=True)
        self.columns_shown, self.indices = [], []
        self.page_start = self.total = 0

    @property
    def page_end(self) -> int:
        return self.page_start + self.row_count

    @property
    def highlighted_index(self) -> int | None:
        """The dataset index of the row under the cursor."""
        if not self.row_count:
            return None
        row = self.cursor_coordinate.row
        return self.indices[row] if 0 <= row < len(self.indices) else None

    def _want(self, start: int, cursor: str) -> bool:
        if self._waiting or start == self.page_start or not 0 <= start < max(self.total, 1):
            return False
        self._waiting = True
        self.post_message(self.PageWanted(self, start, cursor))
        return True

    def _next(self, cursor: str = "first") -> bool:
        return self.page_end < self.total and self._want(self.page_end, cursor)

    def _previous(self, cursor: str = "last") -> bool:
        return self.page_start > 0 and self._want(max(0, self.page_start - self.page_size), cursor)

    def _last_start(self) -> int:
        return max(0, (self.total - 1) // self.page_size * self.page_size)

    # Keys and the mouse ----------------------------------------------------------------------

    def action_cursor_down(self) -> None:
        if self.cursor_coordinate.row >= self.row_count - 1 and self._next("first"):
            return
        super().action_cursor_down()

    def action_cursor_up(self) -> None:
        if self.cursor_coordinate.row <= 0 and self._previous("last"):
            return
        super().action_cursor_up()

    def action_page_down(self) -> None:
        visible = max(1, self.scrollable_content_region.height - 1)
        if self.cursor_coordinate.row + visible >= self.row_count - 1 and self._next("first"):
            return
        super().action_page_down()

    def action_page_up(self) -> None:
        visible = max(1, self.scrollable_content_region.height - 1)
        if self.cursor_coordinate.row - visible <= 0 and self._previous("last"):
            return
        super().action_page_up()

    def action_first_page(self) -> None:
        if not self._want(0, "first"):
            self.move_cursor(row=0)

    def action_last_page(self) -> None:
        if not self._want(self._last_start(), "last"):
            self.move_cursor(row=max(0, self.row_count - 1))

    def on_mouse_scroll_down(self, event: events.MouseScrollDown) -> None:
        # After the table's own scrolling: at the bottom, the wheel brings the next page.
        if self.scroll_y >= self.max_scroll_y:
            self._next("first")

    def on_mouse_scroll_up(self, event: events.MouseScrollUp) -> None:
        if self.scroll_y <= 0:
            self._previous("last")

    def page_failed(self) -> None:
        """The page asked for did not come: allow asking again."""
        self._waiting = False
