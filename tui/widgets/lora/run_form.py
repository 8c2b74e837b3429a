"""RunForm: every setting of a LoRA/QLoRA run, named as peft, trl and transformers name them.

Sections: the training method (SFT, DPO, ORPO or KTO, with the chosen method's own settings: beta,
its loss, the adapter of an earlier run to start from, what to do with malformed pairs), the base
model and the prepared dataset (from the Model and Data tabs, one line each, with the dataset's
``max_length`` and loss shown here and sent back in the run config's data section), peft's
``LoraConfig``, then trl's ``SFTConfig`` (length, batch, optimizer, schedule, logging, saving,
precision). Each value is checked as it is typed (:meth:`local_errors`), and
errors from the backend's ``train.validate`` are shown at their field by dotted path
(:meth:`show_errors`). Every change posts :class:`RunForm.Changed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, VerticalScroll
from textual.message import Message
from textual.suggester import SuggestFromList
from textual.widgets import Checkbox, Input, Label, Select, Static

from backend.protocol import METHOD_SETTINGS as METHOD_SECTIONS, settings_catalogue
from tui.widgets.lora.run_config import (FIELD_BY_PATH, FIELDS, METHOD, TARGET_MODULES, data_line, model_line,
                                         shown_for)
from tui.widgets.lora.setting_row import SettingRow
from tui.widgets.lora.target_modules_picker import TargetModulesPicker

#: Errors said by the model and data lines themselves (nothing chosen yet).
SECTION_SOURCES = ("model.source", "data.source")
#: A method's settings wide (a folder path) rather than in the two-column grid.
WIDE_METHOD_SETTINGS = ("start_adapter",)


def _method_rows(method: str) -> tuple[Any, ...]:
    """The form rows of a method's own settings, from the protocol's catalogue: two a row, the
    wide ones (start_adapter) a row of their own, so a new method needs no change here."""
    names = [n for n in settings_catalogue(METHOD_SECTIONS[method]) if n not in WIDE_METHOD_SETTINGS]
    paths = [f"{method}.{n}" for n in names]
    if len(paths) % 2:
        *paired, last = paths
        rows: list[Any] = [tuple(paired[i:i + 2]) for i in range(0, len(paired), 2)] + [last]
    else:
        rows = [tuple(paths[i:i + 2]) for i in range(0, len(paths), 2)]
    return (*rows, *(f"{method}.{n}" for n in WIDE_METHOD_SETTINGS))


#: (section title, rows); a row is one path (a full-width row) or a pair (two columns).
LAYOUT: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("Method · SFT, or preference tuning with trl's DPOTrainer, ORPOTrainer, KTOTrainer", (
        ("method", None), *(row for method in METHOD_SECTIONS for row in _method_rows(method)))),
    ("Data · the prepared dataset's length and loss, and packing", (
        ("data.max_length", "data.loss"), ("training.packing", None))),
    ("LoRA · peft LoraConfig", (
        ("lora.r", "lora.lora_alpha"), ("lora.lora_dropout", "lora.bias"),
        ("lora.use_rslora", "lora.use_dora"), TARGET_MODULES, "lora.modules_to_save")),
    ("Length and batch · SFTConfig", (
        ("training.num_train_epochs", "training.max_steps"),
        ("training.per_device_train_batch_size", "training.gradient_accumulation_steps"),
        ("training.auto_find_batch_size", "training.gradient_checkpointing"),
        ("training.speed", "training.memory_budget"))),
    ("Optimizer and schedule", (
        ("training.learning_rate", "training.lr_scheduler_type"),
        ("training.warmup_ratio", "training.warmup_steps"),
        ("training.optim", "training.weight_decay"), ("training.max_grad_norm", "training.seed"))),
    ("Logging, evaluation, saving, precision", (
        ("training.logging_steps", "training.eval_steps"),
        ("training.save_steps", "training.save_total_limit"), ("training.bf16", "training.fp16"))),
)
_LAID_OUT = {p for _, rows in LAYOUT for row in rows for p in (row if isinstance(row, tuple) else (row,)) if p}
assert _LAID_OUT == set(FIELD_BY_PATH) | {TARGET_MODULES}, "every field has a place in the form"


class RunForm(VerticalScroll):
    """The run's settings; :meth:`values` are parsed values by dotted path."""

    @dataclass
    class Changed(Message):
        """A setting changed (typed, picked, or set from a preset or a file)."""

        form: "RunForm"

        @property
        def control(self) -> "RunForm":
            return self.form

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        #: Errors shown, by dotted path (local and the backend's).
        self.errors: dict[str, str] = {}
        self._sections: tuple[dict[str, Any], str, dict[str, Any], str] = ({}, "", {}, "")
        #: Finished runs' adapter folders offered as a preference run's start (SFT runs first).
        self.adapters: list[str] = []

    def compose(self) -> ComposeResult:
        yield Static("", id="run-other-errors", classes="setting-error", markup=False)
        with Horizontal(id="run-name-line", classes="setting-line"):
            yield Label("name", classes="setting-label")
            yield Input(placeholder="run name (optional; shown in Sessions)", id="run-name", compact=True,
                        tooltip="The run's name, kept with its session.")
        yield Static("", id="run-model-line", classes="section-line", markup=False)
        yield Static("", id="run-model-error", classes="setting-error", markup=False)
        yield Static("", id="run-data-line", classes="section-line", markup=False)
        yield Static("", id="run-data-error", classes="setting-error", markup=False)
        for title, rows in LAYOUT:
            yield Static(title, classes="form-section", markup=False)
            with Grid(classes="form-grid"):
                for row in rows:
                    if isinstance(row, tuple):
                        for path in row:
                            yield SettingRow(FIELD_BY_PATH[path]) if path else Static(classes="setting-row")
                    elif row == TARGET_MODULES:
                        yield TargetModulesPicker(id="f-lora-target-modules", classes="-wide")
                    else:
                        yield SettingRow(FIELD_BY_PATH[row], classes="-wide")

    def on_mount(self) -> None:
        for error in self.query(".setting-error"):
            if error.parent is self:
                error.display = False
        self._show_method_fields()

    @property
    def method(self) -> str:
        """The training method chosen."""
        value = self.row(METHOD).raw
        return value if isinstance(value, str) else "sft"

    def _show_method_fields(self) -> None:
        """Show the chosen method's own settings and hide the others' (and SFT's packing and loss
        mask for a preference method)."""
        method = self.method
        for f in FIELDS:
            self.row(f.path).display = shown_for(f.path, method)

    # Reading ------------------------------------------------------------------------------------

    def row(self, path: str) -> SettingRow:
        return self.query_one(f"#{FIELD_BY_PATH[path].dom_id}", SettingRow)

    @property
    def picker(self) -> TargetModulesPicker:
        return self.query_one(TargetModulesPicker)

    @property
    def run_name(self) -> str:
        return self.query_one("#run-name", Input).value.strip()

    def values(self) -> dict[str, Any]:
        """Every setting's parsed value by dotted path (None where a number does not parse)."""
        out = {f.path: self.row(f.path).parsed()[0] for f in FIELDS}
        out[TARGET_MODULES] = self.picker.value
        return out

    def local_errors(self) -> dict[str, str]:
        """Type and range errors of what is typed now, by dotted path."""
        errors = {}
        for f in FIELDS:
            if not shown_for(f.path, self.method):
                continue  # another method's setting: not sent as typed, not checked
            _, error = self.row(f.path).parsed()
            if error:
                errors[f.path] = error
        return errors

    # Writing ------------------------------------------------------------------------------------

    def set_values(self, values: dict[str, Any], name: str | None = None, announce: bool = True) -> None:
        """Show config values by dotted path (a preset or an imported file); one Changed follows,
        unless ``announce`` is false (values the pane derived, not an edit of the user's)."""
        with self.prevent(Input.Changed, Select.Changed, Checkbox.Changed, TargetModulesPicker.Changed):
            for path, value in values.items():
                if path == TARGET_MODULES:
                    self.picker.set_value(value)
                elif path in FIELD_BY_PATH:
                    self.row(path).set_value(value)
            if name is not None:
                self.query_one("#run-name", Input).value = name
        self._show_method_fields()
        if announce:
            self.post_message(self.Changed(self))

    def offer_adapters(self, adapters: list[dict[str, Any]]) -> None:
        """Finished runs' adapters (``merge.adapters``, newest first) as the start adapter's
        completions, SFT runs' first; the newest SFT adapter is named in the placeholder."""
        def is_sft(a: dict[str, Any]) -> bool:
            # merge.adapters names the run's config.toml by its path; its method is "method".
            config = a.get("run_config")
            method = config.get("method") if isinstance(config, dict) else a.get("method")
            return (method or "sft") == "sft"

        ordered = [a for a in adapters if is_sft(a)] + [a for a in adapters if not is_sft(a)]
        paths = [str(a["path"]) for a in ordered if a.get("path")]
        self.adapters = paths
        for method in METHOD_SECTIONS:
            control = self.row(f"{method}.start_adapter").control
            if isinstance(control, Input):
                control.suggester = SuggestFromList(paths, case_sensitive=True) if paths else None
                control.placeholder = (f"empty: a fresh adapter; type / for e.g. {paths[0]}" if paths
                                       else "empty: a fresh adapter (no finished run yet)")

    def set_groups(self, groups: list[dict[str, Any]]) -> None:
        """The loaded model's linear groups, for ``target_modules``."""
        self.picker.set_groups(groups)

    def show_sections(self, model: dict[str, Any], model_origin: str, data: dict[str, Any],
                      data_origin: str) -> None:
        """The base model and dataset lines."""
        self._sections = (model, model_origin, data, data_origin)
        self._show_lines()

    def _show_lines(self) -> None:
        model, model_origin, data, data_origin = self._sections
        for path, selector, text in (("model.source", "#run-model-line", model_line(model, model_origin)),
                                     ("data.source", "#run-data-line", data_line(data, data_origin))):
            line = self.query_one(selector, Static)
            error = self.errors.get(path)
            line.update(f"{path.split('.')[0]:<7} ✖ {error}" if error else text)
            line.set_class(bool(error), "-invalid")

    def show_errors(self, errors: dict[str, str]) -> None:
        """Show each error at its field; model.* and data.* paths without a field go under the
        model and data lines, anything else at the top of the form."""
        self.errors = dict(errors)
        placed: dict[str, list[str]] = {"model": [], "data": [], "other": []}
        for f in FIELDS:
            self.row(f.path).show_error(errors.get(f.path, ""))
        self.picker.show_error(errors.get(TARGET_MODULES, ""))
        for path, message in sorted(errors.items()):
            if path in FIELD_BY_PATH or path == TARGET_MODULES or path in SECTION_SOURCES:
                continue  # at its field, or said by the section's own line
            section = path.split(".", 1)[0]
            placed[section if section in ("model", "data") else "other"].append(f"{path}: {message}")
        for where, selector in (("model", "#run-model-error"), ("data", "#run-data-error"),
                                ("other", "#run-other-errors")):
            line = self.query_one(selector, Static)
            line.update("\n".join(f"✖ {m}" for m in placed[where]))
            line.display = bool(placed[where])
        self._show_lines()

    def show_warnings(self, warnings: dict[str, str]) -> None:
        """Show the backend's warnings at their fields (under any error they yield to)."""
        for f in FIELDS:
            self.row(f.path).show_warning(warnings.get(f.path, ""))

    def focus_error(self) -> bool:
        """Focus the first field with an error (False when none has one)."""
        for f in FIELDS:
            row = self.row(f.path)
            if row.error and row.display:
                row.control.focus()
                return True
        return False

    # Changes ------------------------------------------------------------------------------------

    @on(Input.Changed)
    @on(Select.Changed)
    @on(Checkbox.Changed)
    @on(TargetModulesPicker.Changed)
    def _on_control_changed(self, event: Message) -> None:
        event.stop()
        self._show_method_fields()
        self.post_message(self.Changed(self))
