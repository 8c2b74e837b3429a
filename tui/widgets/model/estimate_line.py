"""EstimateLine: what loading the model as set up will take, against the device's free memory.

One or two lines: parameters, precision, bytes needed, free memory, and the verdict ("fits",
"tight", "will not fit") in its colour; or why there is no estimate (a bad source or config).
"""

from __future__ import annotations

from typing import Any

from textual.widgets import Static

from tui.widgets.model.model_format import VERDICT_CLASSES, error_text, estimate_detail, estimate_text

STATES = ("-fits", "-tight", "-wont-fit", "-error", "-pending")


class EstimateLine(Static):
    """The estimate of ``model.estimate``, kept up to date by the Model pane."""

    HINT = "Type a model folder or Hub id (or press tiny) to see what it needs and whether it fits."

    def __init__(self, **kwargs) -> None:
        super().__init__(self.HINT, markup=False, **kwargs)
        #: The last estimate shown (plain data), or None.
        self.estimate: dict[str, Any] | None = None

    def _state(self, state: str) -> None:
        for cls in STATES:
            self.set_class(cls == state, cls)

    def show_hint(self) -> None:
        self.estimate = None
        self.tooltip = None
        self.update(self.HINT)
        self._state("")

    def show_pending(self) -> None:
        self.update("estimating from config.json …")
        self._state("-pending")

    def show_estimate(self, estimate: dict[str, Any]) -> None:
        self.estimate = estimate
        self.update(estimate_text(estimate))
        self.tooltip = estimate_detail(estimate)
        self._state(VERDICT_CLASSES.get(estimate.get("verdict", ""), ""))

    def show_error(self, error: dict[str, Any]) -> None:
        self.estimate = None
        self.tooltip = None
        self.update(error_text(error))
        self._state("-error")
