"""SettingRow: one setting of the LoRA form: its library name, its control, and its error.

The control fits the field's kind: an Input for numbers and names, a Checkbox for booleans, a
Select for choices (``bf16``/``fp16`` as auto/true/false). The error line under it shows what is
wrong with the value, whether the form found it as the user typed or the backend's
``train.validate`` did.
"""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widget import Widget
from textual.widgets import Checkbox, Input, Label, Select, Static

from tui.widgets.lora.run_config import TRISTATE, Field, default_text, parse, to_control


class SettingRow(Vertical):
    """A :class:`~tui.widgets.lora.run_config.Field` with its control and error line."""

    def __init__(self, field: Field, classes: str = "") -> None:
        super().__init__(id=field.dom_id, classes=f"setting-row {classes}".strip())
        self.field = field
        #: The error shown ("" when none) and whether it came from the local checks.
        self.error = ""
        #: The backend's warning for this setting ("" when none), shown when there is no error.
        self.warning = ""
        #: The control compose made: read on every change of any field of the form (a query per
        #: read made the LoRA form's 38 mount-time checks take ~1 s of a start).
        self._control_widget: Widget | None = None

    def compose(self) -> ComposeResult:
        field = self.field
        with Horizontal(classes="setting-line"):
            yield Label(field.name, classes="setting-label")
            self._control_widget = self._control(field)
            yield self._control_widget
        yield Static("", classes="setting-error", markup=False)

    def _control(self, field: Field) -> Widget:
        value = default_text(field.path)
        tip = f"{field.name}: {field.help}"
        if field.kind == "bool":
            return Checkbox("", value, compact=True, classes="setting-control", tooltip=tip)
        if field.kind == "choice":
            return Select([(c, c) for c in field.choices], value=value, allow_blank=False, compact=True,
                          classes="setting-control", tooltip=tip)
        if field.kind == "tristate":
            return Select([(k, k) for k in TRISTATE], value=value, allow_blank=False, compact=True,
                          classes="setting-control", tooltip=tip)
        kind = {"int": "integer", "float": "number", "steps": "number"}.get(field.kind, "text")
        # Our own checks (with ranges) say what is wrong; Textual's type validators would only
        # repeat "must be a number".
        placeholder = "none (e.g. lm_head, embed_tokens)" if field.kind == "names" else ""
        return Input(value, type=kind, placeholder=placeholder, compact=True, classes="setting-control", tooltip=tip,
                     validate_on=[], select_on_focus=False)

    def on_mount(self) -> None:
        self.query_one(".setting-error").display = False

    @property
    def control(self) -> Widget:
        if self._control_widget is None:
            self._control_widget = self.query_one(".setting-control")
        return self._control_widget

    @property
    def raw(self) -> Any:
        """What the control holds."""
        return self.control.value  # type: ignore[attr-defined]

    def parsed(self) -> tuple[Any, str]:
        """(value, local error) of what the control holds."""
        return parse(self.field, self.raw)

    def set_value(self, value: Any) -> None:
        """Show a config value (from a preset or an imported file)."""
        control = self.control
        shown = to_control(self.field, value)
        offered = self.field.choices or (tuple(TRISTATE) if self.field.kind == "tristate" else None)
        if isinstance(control, Select) and offered is not None and shown not in offered:
            return  # a value this form does not offer: the backend's check will say so
        control.value = shown  # type: ignore[attr-defined]

    def show_error(self, message: str) -> None:
        """Show ``message`` under the control ("" clears)."""
        if message == self.error:
            return
        self.error = message
        self._show_line()

    def show_warning(self, message: str) -> None:
        """Show a warning (allowed, but probably not meant) under the control, where no error
        is shown ("" clears)."""
        if message == self.warning:
            return
        self.warning = message
        self._show_line()

    def _show_line(self) -> None:
        line = self.query_one(".setting-error", Static)
        text = f"✖ {self.error}" if self.error else (f"⚠ {self.warning}" if self.warning else "")
        line.update(text)
        line.display = bool(text)
        self.set_class(bool(self.error), "-invalid")
        self.set_class(bool(self.warning) and not self.error, "-warning")
