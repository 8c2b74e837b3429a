"""ExportScreen: asks where to write an export, and in which format; dismisses with
``(path, format)`` or None (escape)."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Select, Static


class ExportScreen(ModalScreen[tuple[str, str] | None]):
    """``title``; a path field (enter writes) and the ``formats`` to choose from."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel", id="export.cancel", tooltip="Close without writing anything."),
    ]

    def __init__(self, title: str, formats: tuple[str, ...], path: str = "", suffixes: dict[str, str] | None = None
                 ) -> None:
        super().__init__()
        self.title_text, self.formats, self.path = title, formats, path
        self.suffixes = suffixes or {}

    def compose(self) -> ComposeResult:
        with Vertical(id="export-dialog", classes="dialog"):
            yield Static(self.title_text, id="export-title", markup=False)
            yield Input(self.path, placeholder="file name (under the data home's exports/) or an absolute path",
                        id="export-path",
                        tooltip="Where to write the file: a relative name goes under the data home's exports/; "
                                "enter writes it (asks before replacing a file).")
            yield Select([(f, f) for f in self.formats], value=self.formats[0], allow_blank=False,
                         id="export-format", tooltip="The file's format.")
            yield Static("", id="export-error", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Write (enter)", id="export-ok", variant="primary")
                yield Button("Cancel (esc)", id="export-cancel")

    def on_mount(self) -> None:
        self.query_one("#export-path", Input).focus()

    @on(Select.Changed, "#export-format")
    def _format_changed(self, event: Select.Changed) -> None:
        # Follow the format with the file's suffix, when the path has one of ours.
        field = self.query_one("#export-path", Input)
        new = self.suffixes.get(str(event.value))
        for suffix in self.suffixes.values():
            if new and field.value.endswith(suffix) and suffix != new:
                field.value = field.value[: -len(suffix)] + new
                break

    @on(Input.Submitted, "#export-path")
    @on(Button.Pressed, "#export-ok")
    def _ok(self, event) -> None:
        event.stop()
        path = self.query_one("#export-path", Input).value.strip()
        if not path:
            self.query_one("#export-error", Static).update("✖ name a file to write")
            return
        self.dismiss((path, str(self.query_one("#export-format", Select).value)))

    @on(Button.Pressed, "#export-cancel")
    def _cancel_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)
