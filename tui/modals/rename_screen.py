"""RenameScreen: asks for a new name (of a run); dismisses with the name, or None (escape)."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Static


class RenameScreen(ModalScreen[str | None]):
    """``title`` and a field holding ``name``; enter renames (an empty or unchanged name closes
    without renaming), escape cancels."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel", id="rename.cancel", tooltip="Close without renaming."),
    ]

    def __init__(self, title: str, name: str = "") -> None:
        super().__init__()
        self.title_text, self.old_name = title, name

    def compose(self) -> ComposeResult:
        with Vertical(id="rename-dialog", classes="dialog"):
            yield Static(self.title_text, id="rename-title", markup=False)
            yield Input(self.old_name, placeholder="the new name", id="rename-name", max_length=200,
                        tooltip="The run's new name (1 to 200 characters); enter renames.")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Rename (enter)", id="rename-ok", variant="primary")
                yield Button("Cancel (esc)", id="rename-cancel")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    @on(Input.Submitted)
    @on(Button.Pressed, "#rename-ok")
    def _ok(self) -> None:
        name = self.query_one(Input).value.strip()
        self.dismiss(name if name and name != self.old_name else None)

    @on(Button.Pressed, "#rename-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
