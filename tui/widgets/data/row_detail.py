"""RowDetail: one row in full, every column, long and multilingual text wrapped, never cut short
(only a value beyond the backend's limit for one reply is, and then it says so)."""

from __future__ import annotations

import json
from typing import Any

from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static


def value_text(value: Any) -> Text:
    """A value as wrapped text: strings as they are, nested values as indented JSON."""
    if value is None:
        return Text("null", style="dim italic")
    if isinstance(value, str):
        return Text(value if value else "(empty)", style="" if value else "dim italic")
    if isinstance(value, (dict, list)):
        return Text(json.dumps(value, ensure_ascii=False, indent=2))
    return Text(str(value))


class RowDetail(VerticalScroll, can_focus=True):
    """The ``data.row`` result: a heading per column and its full value."""

    def compose(self):
        yield Static("Highlight a row in the Rows tab to see it here in full.", id="row-detail-text", markup=False)

    def show_row(self, row: dict[str, Any]) -> None:
        """Show a ``data.row`` result."""
        out = Text(overflow="fold")
        out.append(f"row {row['index']:,} of {row.get('num_rows', 0):,}\n", style="dim")
        cut = row.get("cut", {})
        for name in row.get("columns", list(row["values"])):
            out.append("\n")
            out.append(name, style="bold underline")
            value = row["values"].get(name)
            if isinstance(value, str):
                out.append(f"  {len(value):,} characters", style="dim")
            out.append("\n")
            out.append_text(value_text(value))
            out.append("\n")
            for path, full in cut.items():
                if path == name or path.startswith(name + ".") or path.startswith(name + "["):
                    out.append(f"(cut: {path} has {full:,} characters; the rest is not shown)\n", style="bold")
        self.query_one("#row-detail-text", Static).update(out)
        self.scroll_home(animate=False)

    def show_message(self, message: str) -> None:
        self.query_one("#row-detail-text", Static).update(Text(message, style="dim"))

    @property
    def text(self) -> str:
        """What is shown, as plain text (for tests and copy)."""
        return str(self.query_one("#row-detail-text", Static).content)
