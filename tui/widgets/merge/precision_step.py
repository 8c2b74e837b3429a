"""PrecisionStep: step 2 of the merge wizard: the estimate first (``merge.plan``: memory verdict,
disk needed against free, warnings), then the merge dtype and what the adapter is merged into."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, Select, Static

from backend import protocol as P

INTO_HELP = {
    "dequantized": "dequantized: the 4-bit base as the adapter saw it in training, in the merge dtype",
    "original": "original: the base's full-precision weights from its folder",
}


class PrecisionStep(Vertical):
    """The plan and the two choices (dtype, into)."""

    def compose(self) -> ComposeResult:
        yield Static("Reading the plan …", id="merge-plan", markup=False)
        with Horizontal(classes="merge-row"):
            yield Label("dtype", classes="merge-label")
            yield Select([(d, d) for d in P.MERGE_DTYPES], value="bf16", allow_blank=False, id="merge-dtype",
                         compact=True, tooltip="The merged model's precision (never 4-bit).")
        with Horizontal(classes="merge-row"):
            yield Label("into", classes="merge-label")
            yield Select([(INTO_HELP[i], i) for i in P.MERGE_INTO], value="dequantized", allow_blank=False,
                         id="merge-into", compact=True,
                         tooltip="What the adapter is merged into: the dequantized 4-bit base (as trained) "
                                 "or the original weights.")

    @property
    def dtype(self) -> str:
        return str(self.query_one("#merge-dtype", Select).value)

    @property
    def into(self) -> str:
        return str(self.query_one("#merge-into", Select).value)

    def show_plan(self, text: str, bad: bool = False) -> None:
        plan = self.query_one("#merge-plan", Static)
        plan.update(text)
        plan.set_class(bad, "-error")
