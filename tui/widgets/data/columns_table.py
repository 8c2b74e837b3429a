"""ColumnsTable: the columns of the open dataset with their types, null counts and examples."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import DataTable

from tui.widgets.data.rows_table import cell_text


class ColumnsTable(DataTable):
    """One row per column: name, type, nulls, up to three examples."""

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)

    def on_mount(self) -> None:
        self.add_column("Column", key="name")
        self.add_column("Type", key="type")
        self.add_column("Nulls", key="nulls")
        self.add_column("Examples", key="examples")

    def show_columns(self, columns: list[dict[str, Any]], mapping: dict[str, str] | None = None) -> None:
        """Fill with a summary's ``columns``; a mapped column says which role it plays."""
        roles = {col: role for role, col in (mapping or {}).items() if col}
        self.clear()
        for c in columns:
            name = Text(c["name"], style="bold")
            if c["name"] in roles:
                name.append(f" → {roles[c['name']]}", style="dim")
            nulls = Text(f"{c['nulls']:,}", justify="right", style="bold" if c["nulls"] else "dim")
            examples = Text(" · ").join(cell_text(e) for e in c.get("examples", [])[:3])
            examples.truncate(120, overflow="ellipsis")
            self.add_row(name, Text(c["type"]), nulls, examples, key=c["name"])
