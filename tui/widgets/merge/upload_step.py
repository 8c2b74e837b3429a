"""UploadStep: step 5 of the merge wizard: the Hub's status (never a token), the repository id,
private (on by default), adapter only, a dry run that lists the files, and the upload."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Checkbox, DataTable, Input, Label, Static

from tui.widgets.chat.chat_format import size


class UploadStep(Vertical):
    """The upload form and the list of files (of the dry run or the upload)."""

    def compose(self) -> ComposeResult:
        yield Static("Hub: …", id="hub-status", markup=False)
        with Horizontal(classes="merge-row"):
            yield Label("repo id", classes="merge-label")
            yield Input("", placeholder="user/model-name", id="hub-repo", compact=True,
                        tooltip="The Hub repository (user/name or org/name); created if missing.")
        with Horizontal(classes="merge-row"):
            yield Checkbox("private", True, id="hub-private", compact=True,
                           tooltip="Create the repository as private (on by default).")
            yield Checkbox("adapter only", False, id="hub-adapter-only", compact=True,
                           tooltip="Upload the adapter (a few MB) instead of the merged model.")
            yield Button("Dry run (f5)", id="hub-dry-run", compact=True,
                         tooltip="List exactly what would be uploaded; sends nothing.")
            yield Button("Upload (f6)", id="hub-upload", variant="warning", compact=True,
                         tooltip="Upload to the Hub (a backend job).")
        yield Static("", id="hub-result", markup=False)
        yield DataTable(id="hub-files", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        self.files.add_columns("File", "Size")

    @property
    def files(self) -> DataTable:
        return self.query_one("#hub-files", DataTable)

    @property
    def repo_id(self) -> str:
        return self.query_one("#hub-repo", Input).value.strip()

    @property
    def private(self) -> bool:
        return self.query_one("#hub-private", Checkbox).value

    @property
    def adapter_only(self) -> bool:
        return self.query_one("#hub-adapter-only", Checkbox).value

    def show_files(self, files: list[dict[str, Any]]) -> None:
        self.files.clear()
        for f in files:
            self.files.add_row(str(f.get("path") or f.get("name") or "?"), size(f.get("size_bytes")))

    def result(self, text: str, bad: bool = False) -> None:
        line = self.query_one("#hub-result", Static)
        line.update(text)
        line.set_class(bad, "-error")
