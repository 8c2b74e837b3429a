"""TargetModulesPicker: peft's ``target_modules``: "all-linear", or the linear modules picked from
the loaded model's inspection (``model.inspect``'s ``linear_groups``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Checkbox, Label, SelectionList, Static

ALL_LINEAR = "all-linear"


class TargetModulesPicker(Vertical):
    """All linear layers (the output head left out, as peft does), or a list of module names."""

    @dataclass
    class Changed(Message):
        """The choice changed."""

        picker: "TargetModulesPicker"

        @property
        def control(self) -> "TargetModulesPicker":
            return self.picker

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        #: The linear groups offered (``{"name", "count", "in_all_linear", ...}``), by name.
        self.groups: dict[str, dict[str, Any]] = {}
        self.error = ""

    def compose(self) -> ComposeResult:
        with Horizontal(classes="setting-line"):
            yield Label("target_modules", classes="setting-label")
            yield Checkbox(ALL_LINEAR, True, id="target-all-linear", compact=True,
                           tooltip="target_modules: every linear layer but the output head (peft's "
                                   "all-linear); untick to pick modules by name.")
            yield Static("", id="target-hint", markup=False)
        yield SelectionList[str](id="target-list", compact=True)
        yield Static("", classes="setting-error", markup=False)

    def on_mount(self) -> None:
        self.query_one(".setting-error").display = False
        self._sync()

    @property
    def all_linear(self) -> bool:
        return self.query_one("#target-all-linear", Checkbox).value

    @property
    def value(self) -> str | list[str]:
        """``"all-linear"`` or the picked names, in the model's order."""
        if self.all_linear:
            return ALL_LINEAR
        return list(self.query_one("#target-list", SelectionList).selected)

    def set_groups(self, groups: list[dict[str, Any]]) -> None:
        """Offer the loaded model's linear groups; picked names stay picked."""
        picked = set(self.query_one("#target-list", SelectionList).selected)
        self.groups = {g["name"]: g for g in groups if g.get("name")}
        if not picked and not self.all_linear:
            picked = {n for n, g in self.groups.items() if g.get("in_all_linear")}
        self._fill(picked)

    def set_value(self, value: str | list[str]) -> None:
        """Show a config's ``target_modules`` (names the model lacks are offered anyway: the
        backend's check says if they match nothing)."""
        with self.prevent(Checkbox.Changed, SelectionList.SelectedChanged):
            self.query_one("#target-all-linear", Checkbox).value = value == ALL_LINEAR
            if isinstance(value, list):
                for name in value:
                    self.groups.setdefault(name, {"name": name})
                self._fill(set(value))
        self._sync()

    def _fill(self, picked: set[str]) -> None:
        selection = self.query_one("#target-list", SelectionList)
        with self.prevent(SelectionList.SelectedChanged):
            selection.clear_options()
            for name, group in self.groups.items():
                label = f"{name} ×{group['count']}" if group.get("count") else name
                selection.add_option((label, name, name in picked))
        self._sync()

    def _sync(self) -> None:
        selection = self.query_one("#target-list", SelectionList)
        selection.display = not self.all_linear and bool(self.groups)
        hint = ""
        if not self.all_linear and not self.groups:
            hint = "load a model (Model tab) to pick its modules"
        elif self.all_linear and self.groups:
            hint = f"{sum(1 for g in self.groups.values() if g.get('in_all_linear'))} module kinds"
        self.query_one("#target-hint", Static).update(hint)

    def show_error(self, message: str) -> None:
        if message == self.error:
            return
        self.error = message
        line = self.query_one(".setting-error", Static)
        line.update(f"✖ {message}" if message else "")
        line.display = bool(message)
        self.set_class(bool(message), "-invalid")

    @on(Checkbox.Changed, "#target-all-linear")
    def _all_linear_changed(self, event: Checkbox.Changed) -> None:
        event.stop()
        if not event.value and not self.query_one("#target-list", SelectionList).selected:
            self._fill({n for n, g in self.groups.items() if g.get("in_all_linear")})
        self._sync()
        self.post_message(self.Changed(self))

    @on(SelectionList.SelectedChanged)
    def _picked(self, event: SelectionList.SelectedChanged) -> None:
        event.stop()
        self.post_message(self.Changed(self))
