"""ModelInspector: what the loaded base model is made of.

A summary (architecture, layers, widths, parameters, precision, device), the measured memory
beside the estimate, the linear modules
grouped by name with their counts and shapes (the LoRA form's ``target_modules`` choices), and
the tokenizer's facts (vocabulary, special tokens, pad token or its usual fix, chat template).
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from tui.widgets.model.model_format import group_rows, measured_text, summary_text, tokenizer_text


class ModelInspector(Vertical):
    """Shows ``model.inspect`` (or a ``model.loaded`` event's ``inspect``)."""

    EMPTY = "No base model loaded. Choose a source and press Load."

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        #: The inspection shown (plain data), or None when no model is loaded.
        self.info: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        yield Static(self.EMPTY, id="inspect-summary", markup=False)
        yield Static("", id="inspect-measured", markup=False)
        yield DataTable(id="linear-groups", cursor_type="row", zebra_stripes=True)
        yield Static("", id="inspect-tokenizer", markup=False)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_column("Linear module", key="name")
        table.add_column("Count", key="count")
        table.add_column("Shape out×in", key="shapes")
        table.add_column("Quantized", key="quantized")
        table.add_column("LoRA", key="lora")
        table.display = False
        self.query_one("#inspect-measured", Static).display = False

    @property
    def target_modules(self) -> list[str]:
        """The group names peft's ``all-linear`` covers (the output head left out)."""
        if not self.info:
            return []
        return [g["name"] for g in self.info.get("linear_groups") or [] if g.get("in_all_linear")]

    def show(self, info: dict[str, Any]) -> None:
        """Show an inspection (with ``load``: how it was loaded and what it measured);
        ``{"loaded": false}`` clears."""
        if not info or not info.get("loaded"):
            self.clear()
            return
        self.info = info
        self.query_one("#inspect-summary", Static).update(summary_text(info))
        measured = self.query_one("#inspect-measured", Static)
        measured.update(measured_text(info.get("load") or {}))
        measured.display = bool(info.get("load"))
        table = self.query_one(DataTable)
        table.clear()
        for name, count, shapes, quantized, lora in group_rows(info):
            # Text, not str: DataTable would read str cells as markup, and names come from models.
            table.add_row(Text(name), Text(count, justify="right"), Text(shapes), Text(quantized),
                          Text(lora, style="" if lora == "all-linear" else "dim"), key=name)
        table.display = True
        self.query_one("#inspect-tokenizer", Static).update(tokenizer_text(info.get("tokenizer") or {}))

    def clear(self) -> None:
        self.info = None
        self.query_one("#inspect-summary", Static).update(self.EMPTY)
        self.query_one("#inspect-measured", Static).display = False
        table = self.query_one(DataTable)
        table.clear()
        table.display = False
        self.query_one("#inspect-tokenizer", Static).update("")
