"""SplitForm: the train/validation split (none, a seeded ratio, or another split of the source)
and trl's ``max_length``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Input, Label, Select, Static

SPLIT_MODES = {
    "ratio": "a random fraction (seeded)",
    "split": "another split of the source",
    "none": "no validation rows",
}


class SplitForm(Vertical):
    """Validation rows and ``max_length``; :attr:`values` are the prepared dataset's fields."""

    @dataclass
    class Changed(Message):
        """The split or max_length changed."""

        form: "SplitForm"

        @property
        def control(self) -> "SplitForm":
            return self.form

    def compose(self) -> ComposeResult:
        with Horizontal(classes="data-form-row"):
            yield Label("validation", classes="data-form-label")
            yield Select([(label, value) for value, label in SPLIT_MODES.items()], value="ratio",
                         allow_blank=False, id="data-split-mode", compact=True,
                         tooltip="Which rows are held out for evaluation.")
        with Horizontal(classes="data-form-row"):
            yield Label("ratio", classes="data-form-label")
            yield Input("0.1", type="number", id="data-validation-ratio", compact=True,
                        tooltip="Fraction of the rows held out for validation, e.g. 0.1.")
        with Horizontal(classes="data-form-row"):
            yield Label("seed", classes="data-form-label")
            yield Input("42", type="integer", id="data-seed", compact=True,
                        tooltip="Seed of the random split: the same seed gives the same rows.")
        with Horizontal(classes="data-form-row"):
            yield Label("split", classes="data-form-label")
            yield Select([], prompt="(choose a split)", id="data-validation-split", compact=True,
                         tooltip="The source's split used for validation.")
        with Horizontal(classes="data-form-row"):
            yield Label("max_length", classes="data-form-label")
            yield Input("1024", type="integer", id="data-max-length", compact=True,
                        tooltip="trl's max_length: longer rows are cut (keeping the start).")
        yield Static("", id="data-split-counts", markup=False)

    def fill(self, splits: dict[str, int], browsed: str) -> None:
        """Offer the source's other splits for validation."""
        others = [name for name in splits if name != browsed]
        with self.prevent(Select.Changed):
            select = self.query_one("#data-validation-split", Select)
            select.set_options([(f"{name} ({splits[name]:,} rows)", name) for name in others])
            preferred = next((n for n in ("validation", "valid", "val", "test", "dev") if n in others), None)
            if preferred:
                select.value = preferred

    def show_counts(self, counts: dict[str, int] | None) -> None:
        text = "" if not counts else f"train {counts['train']:,} rows · validation {counts['validation']:,} rows"
        self.query_one("#data-split-counts", Static).update(text)

    @staticmethod
    def _number(widget: Input, default: float, cast=float) -> Any:
        try:
            return cast(widget.value)
        except ValueError:
            return default

    @property
    def values(self) -> dict[str, Any]:
        mode = self.query_one("#data-split-mode", Select).value
        split = self.query_one("#data-validation-split", Select).value
        return {
            "split_mode": mode if isinstance(mode, str) else "ratio",
            "validation_ratio": self._number(self.query_one("#data-validation-ratio", Input), 0.1),
            "validation_split": split if isinstance(split, str) else "",
            "seed": self._number(self.query_one("#data-seed", Input), 42, int),
            "max_length": self._number(self.query_one("#data-max-length", Input), 1024, int),
        }

    @on(Select.Changed)
    def _select_changed(self, event: Select.Changed) -> None:
        event.stop()
        self.post_message(self.Changed(self))

    @on(Input.Submitted)
    def _input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.post_message(self.Changed(self))

    @on(Input.Blurred)
    def _input_blurred(self, event: Input.Blurred) -> None:
        self.post_message(self.Changed(self))
