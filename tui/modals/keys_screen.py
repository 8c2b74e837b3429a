"""KeysScreen: every key of the pane shown, with what it does (``?``, as lazygit and k9s have it),
then the keys that work everywhere. The command palette (ctrl+p) finds the same by name."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Static

from rich.table import Table
from rich.text import Text


def widget_keys(widget: Widget) -> list[Binding]:
    """The bindings (with an id) a widget class declares, in order."""
    return [b for b in getattr(type(widget), "BINDINGS", []) if isinstance(b, Binding) and b.id]


def pane_keys(pane: Widget) -> list[Binding]:
    """The keys of a pane and of the widgets in it (each binding id once)."""
    seen: set[str] = set()
    out: list[Binding] = []
    for widget in (pane, *pane.query("*")):
        for b in widget_keys(widget):
            if b.id not in seen:
                seen.add(b.id)
                out.append(b)
    return out


class KeysScreen(ModalScreen[None]):
    """The keys of ``pane`` (titled ``title``) and the global ones; any of esc, q, ? closes it."""

    BINDINGS = [
        Binding("escape,q,question_mark", "close", "Close", id="keys.close", tooltip="Close the list of keys."),
    ]

    def __init__(self, title: str, pane: list[Binding], everywhere: list[Binding]) -> None:
        super().__init__()
        self.title_text, self.pane, self.everywhere = title, pane, everywhere

    def _table(self, bindings: list[Binding]) -> Table:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold", no_wrap=True)
        table.add_column(no_wrap=True)
        table.add_column(style="dim")
        for b in bindings:
            table.add_row(Text(self.app.get_key_display(b)), Text(b.description), Text(b.tooltip or ""))
        return table

    def compose(self) -> ComposeResult:
        with Vertical(id="keys-dialog", classes="dialog") as dialog:
            dialog.border_title = f"Keys: {self.title_text}"
            with VerticalScroll(id="keys-scroll"):
                yield Static(self._table(self.pane) if self.pane else Text("This pane has no keys of its own."),
                             id="keys-pane")
                yield Static(Text("Everywhere", style="bold"), id="keys-everywhere-title")
                yield Static(self._table(self.everywhere), id="keys-everywhere")
            yield Static(Text("esc closes · ctrl+p finds any action by name", style="dim"), id="keys-hint")

    def action_close(self) -> None:
        self.dismiss(None)
