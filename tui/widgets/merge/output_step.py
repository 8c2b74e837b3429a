"""OutputStep: step 3 of the merge wizard: the output folder and shard size, the merge (f5) and
its progress (the job's stage and a bar)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Checkbox, Input, Label, ProgressBar, Static

from tui.widgets.chat.chat_format import size


class OutputStep(Vertical):
    """Where the merged model goes, how it is cut into files, and the merge's progress."""

    def compose(self) -> ComposeResult:
        with Horizontal(classes="merge-row"):
            yield Label("output folder", classes="merge-label")
            yield Input("", id="merge-out", compact=True,
                        tooltip="Where to save the merged model; a relative path is under the data home's merged/.")
        with Horizontal(classes="merge-row"):
            yield Label("max shard size", classes="merge-label")
            yield Input("5GB", id="merge-shard", compact=True,
                        tooltip="The largest safetensors file (e.g. 5GB, 500MB).")
            yield Checkbox("verify after", True, id="merge-verify-after", compact=True,
                           tooltip="Check the merged model against the model as trained (step 4).")
        yield Static("", id="merge-out-line", markup=False)
        yield Button("Merge ▶ (f5)", id="merge-start", variant="success", compact=True,
                     tooltip="Merge the adapter into its base and save the folder (a backend job).")
        yield Static("", id="merge-stage", markup=False)
        yield ProgressBar(id="merge-progress", show_eta=False)
        yield Static("", id="merge-saved", markup=False)

    def on_mount(self) -> None:
        self.query_one(ProgressBar).display = False

    @property
    def out(self) -> str:
        return self.query_one("#merge-out", Input).value.strip()

    @property
    def shard(self) -> str:
        return self.query_one("#merge-shard", Input).value.strip()

    @property
    def verify(self) -> bool:
        return self.query_one("#merge-verify-after", Checkbox).value

    def progress(self, stage: str, done: float, total: float, unit: str = "", message: str = "") -> None:
        bar = self.query_one(ProgressBar)
        bar.display = True
        if total:
            bar.update(total=total, progress=done)
        else:
            bar.update(total=None)
        if total and unit == "bytes":
            amount = f" {size(done)} of {size(total)}"
        else:
            amount = f" {done:,.0f}/{total:,.0f} {unit}".rstrip() if total else ""
        self.query_one("#merge-stage", Static).update(
            f"▶ {stage}{amount}{' · ' + message if message else ''} · ctrl+g stops")

    def finished(self, text: str) -> None:
        self.query_one("#merge-stage", Static).update(text)
        bar = self.query_one(ProgressBar)
        if bar.total:
            bar.update(progress=bar.total)
