"""LoraPane: the LoRA tab, where a training run is set up, checked, saved and started.

The form (:class:`RunForm`) holds peft's ``LoraConfig`` and trl's ``SFTConfig`` settings; the base
model and its quantization come from the Model tab (``ModelForm.settings()``, or the settings of
the model the backend holds when no Model tab is mounted) and the prepared dataset from the Data
tab (``DataPane.settings``), whose ``max_length`` and loss are shown and edited here. Together
they make the run config, plain data (``protocol.RunConfig``).

Each change is checked at once for types and ranges, then (debounced) by the backend's
``train.validate``, whose errors are shown at their fields and whose trainable-parameter count and
memory estimate fill the line under the form. Start is enabled only for a config the backend
found valid, while no job runs, and never while the Data tab is still opening again the dataset
the user had chosen (the config would otherwise name another dataset than the one shown).

What the user typed and chose here (every field as typed, the name, the file path, the resume
choice, a preset's or a file's model and data sections) is the pane's state ``"lora"``, kept by
the backend (:mod:`tui.ui_state`): it comes back after a re-attach or a backend restart, and a
second terminal shows the same values. Presets come from ``train.presets``; a config is exported to and
imported from TOML by the backend; a run can resume from a checkpoint of ``train.checkpoints``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, Checkbox, Input, Label, Select, Static

from backend import protocol as P
from tui.client import CONNECTED, BackendUnavailable, RequestFailed
from tui.messages import ConnectionChanged
from tui.modals.confirm_screen import ConfirmScreen
from tui.ui_state import UiChange, set_control, write_fields
from tui.widgets.backend_requests import BackendRequests
from tui.widgets.lora.run_config import FIELDS, TARGET_MODULES, build_config, cross_errors, flatten
from tui.widgets.lora.run_form import RunForm
from tui.widgets.lora.target_modules_picker import TargetModulesPicker
from tui.widgets.lora.validation_line import ValidationLine

#: Typing pauses this long before the backend checks the run.
VALIDATE_DELAY_S = 0.4
#: The precision fields a preset may set on the model section.
PRECISION_FIELDS = ("precision", "quant_type", "double_quant", "compute_dtype")
FRESH_START = "fresh"
#: The key of this pane's state in the backend (tui/ui_state.py).
STATE_KEY = "lora"


def checkpoint_label(c: dict[str, Any]) -> str:
    """A checkpoint as the resume list offers it, on one line: the run's name (its session's short
    id when it has none), the step, the loss and when it was saved: ``resume dolly-r16 · step 40 ·
    loss 1.2345 · 12-07 14:02``."""
    import time

    from tui.widgets.chat.chat_format import short_session

    run = str(c.get("name") or "") or short_session(str(c.get("session") or "?"))
    when = time.strftime("%m-%d %H:%M", time.localtime(c["created"])) if isinstance(c.get("created"), (int, float)) else ""
    loss = f" · loss {c['loss']:.4f}" if isinstance(c.get("loss"), (int, float)) else ""
    return f"resume {run} · step {c.get('step', '?')}{loss}{f' · {when}' if when else ''}"


def expand_path(text: str, cwd: str | None = None) -> str:
    """A file path as the backend should see it: ``~`` expanded, relative paths made absolute
    against this terminal's folder (the backend runs in its own)."""
    text = text.strip()
    if not text:
        return ""
    path = Path(os.path.expanduser(text))
    return str(path if path.is_absolute() else (Path(cwd or os.getcwd()) / path).resolve())


class LoraPane(BackendRequests, Vertical):
    """The LoRA tab: the run's settings, checked live; presets, TOML files, Start and resume."""

    BINDINGS = [
        Binding("f5", "start", "Start", id="lora.start",
                tooltip="Start training with these settings (a backend job); the Train tab follows it."),
        Binding("ctrl+s", "export", "Export", id="lora.export",
                tooltip="Write the run config to the TOML file named in the path box (asks before overwriting)."),
        Binding("ctrl+o", "import", "Import", id="lora.import",
                tooltip="Read a run config from the TOML file named in the path box into the form."),
        Binding("f2", "preset('qlora-paper')", "QLoRA preset", id="lora.preset-qlora-paper", show=False,
                tooltip="Apply the QLoRA paper's recipe: nf4 with double quant, bf16 compute, r=16, "
                        "lora_alpha=16, dropout 0.05, lr 2e-4, paged_adamw_8bit."),
        Binding("f3", "preset('small-gpu')", "Small-GPU preset", id="lora.preset-small-gpu", show=False,
                tooltip="Apply the small-GPU preset: a fast run that fits a small card."),
        Binding("f6", "resume", "Resume from", id="lora.resume", show=False,
                tooltip="Read the checkpoints again and choose one to resume from (or a fresh start)."),
        Binding("f8", "next_error", "Next error", id="lora.next-error", show=False,
                tooltip="Go to the first setting with an error."),
    ]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.connected = False
        self._pane_cache: dict[type, list] = {}
        #: Whether ``status`` has said, since the last connect, which job runs (if any).
        self.job_known = False
        #: The running job (``job.started`` payload) or None: Start waits for it to end.
        self.job: dict[str, Any] | None = None
        #: ``train.presets``' presets and defaults.
        self.presets: dict[str, Any] = {}
        self.preset_defaults: dict[str, Any] = {}
        #: ``train.checkpoints``' checkpoints offered to resume from, newest first.
        self.checkpoints: list[dict[str, Any]] = []
        #: The model and dataset sections of the run config, and where they come from.
        self.model: dict[str, Any] = {}
        self.model_origin = ""
        self.data: dict[str, Any] = {}
        self.data_origin = ""
        #: The settings of the model the backend holds (``model.loaded``/``model.inspect``).
        self.loaded_model: dict[str, Any] = {}
        #: Sections set by a preset or a file, kept until the Model/Data tab changes.
        self._model_override: dict[str, Any] | None = None
        self._model_override_origin = ""
        self._model_seen: Any = None
        self._data_override: dict[str, Any] | None = None
        self._data_override_origin = ""
        self._data_seen: Any = None
        self._data_adopted: Any = None
        #: An imported file's ``[launch]`` section (issue 19: processes, strategy): the form has no
        #: fields for it yet, so it is carried as imported into the run config.
        self._launch: dict[str, Any] = {}
        #: The config the backend last found valid, its errors and result.
        self.validated: dict[str, Any] | None = None
        self.validated_result: dict[str, Any] = {}
        self.server_errors: dict[str, str] = {}
        self._server_errors_for: dict[str, Any] | None = None
        #: An imported file's errors (by field, with its line), shown while the config is as read.
        self.file_errors: dict[str, str] = {}
        self._file_errors_for: dict[str, Any] | None = None
        self._validate_timer = None
        self._message = ""
        #: The train.start job this pane started ("" when none runs).
        self._started_job = ""
        #: A restored resume choice that train.checkpoints has not offered yet.
        self._wanted_resume: str | None = None

    def compose(self) -> ComposeResult:
        with Horizontal(id="lora-bar"):
            yield Label("preset", classes="lora-bar-label")
            # Always focusable: the first stop of the tab is a button, so the number keys still
            # switch tabs (an Input would take them as text).
            for name in P.TRAIN_PRESETS:
                yield Button(name, id=f"preset-{name}", compact=True,
                             tooltip=f"Apply the {name} preset (train.presets) to the form.")
            yield Input(placeholder="run config file (.toml)", id="lora-path", compact=True,
                        tooltip="A TOML run config to export to or import from (~ and relative paths "
                                "are this terminal's).")
            yield Button("Export", id="lora-export", compact=True, tooltip="Write the run config (ctrl+s).")
            yield Button("Import", id="lora-import", compact=True, tooltip="Read a run config (ctrl+o).")
        yield RunForm(id="run-form")
        yield ValidationLine(id="lora-validation")
        with Horizontal(id="lora-start-row"):
            yield Button("Start ▶", id="lora-start", variant="success", compact=True, disabled=True,
                         tooltip="Start training (f5): enabled when the backend has checked the settings "
                                 "and no job runs.")
            yield Select([("fresh start (no checkpoint)", FRESH_START)], value=FRESH_START, allow_blank=False,
                         id="lora-resume", compact=True,
                         tooltip="Resume from a checkpoint (train.checkpoints), or start fresh (f6 reads again).")
            yield Static("", id="lora-status", markup=False)

    @property
    def form(self) -> RunForm:
        return self.query_one(RunForm)

    @property
    def line(self) -> ValidationLine:
        return self.query_one(ValidationLine)

    def on_mount(self) -> None:
        self.app.backend_events.subscribe(self, self.on_backend)  # type: ignore[attr-defined]
        self.app.connection_changed.subscribe(self, self.on_connection)  # type: ignore[attr-defined]
        ui_state = getattr(self.app, "ui_state", None)
        if ui_state is not None:
            ui_state.changed.subscribe(self, self.on_ui_state)
        self.sync_sections()
        self.on_connection(self.app.connection)  # type: ignore[attr-defined]

    # The pane's state, kept by the backend -----------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What the user typed and chose here, as plain data (the pane's ``"lora"`` state)."""
        resume = self._wanted_resume or self.query_one("#lora-resume", Select).value
        return {
            "fields": {f.path: self.form.row(f.path).raw for f in FIELDS},
            "target_modules": self.form.picker.value,
            "name": self.query_one("#run-name", Input).value,
            "path": self.query_one("#lora-path", Input).value,
            "resume": resume if isinstance(resume, str) else FRESH_START,
            "model_override": self._model_override,
            "model_override_origin": self._model_override_origin,
            "data_override": self._data_override,
            "data_override_origin": self._data_override_origin,
            # The Data tab's settings last taken into the form: the same settings coming back
            # with the Data tab's own state then leave the form's max_length and loss as typed.
            "data_adopted": self._data_adopted,
        }

    def save_state(self) -> None:
        """Hand the pane's state to the backend (coalesced; see tui/ui_state.py)."""
        ui_state = getattr(self.app, "ui_state", None)
        if ui_state is not None and self.is_mounted:
            ui_state.set(STATE_KEY, self.state())

    def on_ui_state(self, change: UiChange) -> None:
        if change.key == STATE_KEY and isinstance(change.value, dict):
            self.restore(change.value)

    def restore(self, state: dict[str, Any]) -> None:
        """Show a state of this pane (stored by the backend, or set in another terminal)."""
        fields = state.get("fields") or {}
        with self.form.prevent(Input.Changed, Select.Changed, Checkbox.Changed, TargetModulesPicker.Changed):
            for f in FIELDS:
                if f.path in fields:
                    set_control(self.form.row(f.path).control, fields[f.path])
            self.form.picker.set_value(state.get("target_modules") or "all-linear")
            write_fields(self, {"run-name": state.get("name") or "", "lora-path": state.get("path") or ""})
        self._wanted_resume = str(state.get("resume") or FRESH_START)
        self._offer_resume()
        model, data = state.get("model_override"), state.get("data_override")
        if isinstance(model, dict):
            self._set_model_override(model, str(state.get("model_override_origin") or ""))
        else:
            self._model_override = None
        if isinstance(data, dict):
            self._data_override, self._data_override_origin = dict(data), str(state.get("data_override_origin") or "")
            self._data_seen = self._data_pane_settings()
        else:
            self._data_override = None
        if "data_adopted" in state:
            self._data_adopted = state["data_adopted"]
        self.sync_sections()
        self.check()

    def data_changed(self) -> None:
        """The Data tab's prepared dataset changed (opened, restored, mapped): show and check it."""
        self.sync_sections()
        self.check()

    def _data_reopening(self) -> str:
        """The dataset the Data tab is opening again after a re-attach ("" when none): until it
        is open, the config would name another dataset than the user chose."""
        from tui.widgets.data.data_pane import DataPane

        for pane in self._panes(DataPane):
            if pane.restoring is not None:
                return str((pane.restoring.get("open") or {}).get("path") or "the dataset")
        return ""

    def _offer_resume(self) -> None:
        """Choose the restored resume checkpoint once train.checkpoints offers it."""
        if self._wanted_resume is None:
            return
        with self.prevent(Select.Changed):
            if not write_fields(self, {"lora-resume": self._wanted_resume}):
                self._wanted_resume = None

    def on_show(self) -> None:
        # The Model and Data tabs may have changed while this one was hidden.
        if self.sync_sections():
            self.check()

    # The backend ------------------------------------------------------------------------------------

    def on_connection(self, change: ConnectionChanged) -> None:
        self.connected = change.state == CONNECTED
        self.job_known = False
        if self.connected:
            self.read_presets()
            self.read_job()
            self.read_inspection()
            self.read_checkpoints()
            self.read_adapters()
        self.check()

    def on_backend(self, ev: P.Event) -> None:
        p = ev.payload
        if ev.kind == "job.started":
            self.job = dict(p)
            self.check()
        elif ev.kind == "job.finished":
            if p.get("job_id") and p.get("job_id") == self._started_job:
                self._started_job = ""
                self._status(f"last run: {p.get('status', 'ended')} after {p.get('elapsed_s', 0):.1f} s "
                             "(the Train tab has its table)")
            if self.job is None or p.get("job_id") == self.job.get("job_id"):
                self.job = None
                self.check()
            if p.get("kind") in ("gpu.free", "backend.restart"):
                self.read_inspection()  # the model may be gone
        elif ev.kind == "model.loaded":
            self.loaded_model = dict(p.get("settings") or {})
            self.form.set_groups((p.get("inspect") or {}).get("linear_groups") or [])
            if self.sync_sections():
                self.check()
        elif ev.kind in ("train.checkpoint", "train.finished"):
            self.read_checkpoints()
            if ev.kind == "train.finished":
                self.read_adapters()

    @work(name="read the training presets", group="train.presets", exclusive=True, exit_on_error=False)
    async def read_presets(self) -> None:
        try:
            result = await self.call(P.TrainPresets())
        except RequestFailed as exc:  # a backend without training: say so once, at the status
            self._status(f"no presets: {exc.reply.reason or exc.reply.code}")
            return
        self.show_presets(result)

    def show_presets(self, result: dict[str, Any]) -> None:
        """Offer ``train.presets``' presets (their buttons are enabled)."""
        self.presets = dict(result.get("presets") or {})
        self.preset_defaults = dict(result.get("defaults") or {})
        for name, preset in self.presets.items():
            if name in P.TRAIN_PRESETS and preset.get("description"):
                self.query_one(f"#preset-{name}", Button).tooltip = f"{name}: {preset['description']}"
        self.refresh_bindings()

    @work(name="read the backend's job", group="lora.job", exclusive=True, exit_on_error=False)
    async def read_job(self) -> None:
        self.job = (await self.call(P.Status())).get("job") or None
        self.job_known = True
        self.check()

    @work(name="inspect the loaded model", group="lora.inspect", exclusive=True, exit_on_error=False)
    async def read_inspection(self) -> None:
        info = await self.call(P.InspectModel(), timeout=60)
        if info.get("loaded"):
            self.loaded_model = dict((info.get("load") or {}).get("settings") or {})
            self.form.set_groups(info.get("linear_groups") or [])
        else:
            self.loaded_model = {}
        if self.sync_sections():
            self.check()

    @work(name="list the checkpoints", group="train.checkpoints", exclusive=True, exit_on_error=False)
    async def read_checkpoints(self) -> None:
        try:
            result = await self.call(P.ListCheckpoints())
        except RequestFailed:
            return  # nothing to resume from; Start still works
        self.show_checkpoints(result.get("checkpoints") or [])

    @work(name="list the adapters", group="merge.adapters", exclusive=True, exit_on_error=False)
    async def read_adapters(self) -> None:
        """Finished runs' adapters, offered to a preference method as the adapter to start from."""
        try:
            result = await self.call(P.MergeAdapters())
        except RequestFailed:
            return
        self.form.offer_adapters([a for a in result.get("adapters") or [] if a.get("kind") == "adapter"])

    def show_checkpoints(self, checkpoints: list[dict[str, Any]]) -> None:
        """Offer ``train.checkpoints``' checkpoints to resume from (newest first)."""
        self.checkpoints = list(checkpoints)
        select = self.query_one("#lora-resume", Select)
        keep = select.value
        options: list[tuple[str, str]] = [("fresh start (no checkpoint)", FRESH_START)]
        for c in checkpoints:
            options.append((checkpoint_label(c), c["path"]))
        with self.prevent(Select.Changed):
            select.set_options(options)
            select.value = keep if keep in {v for _, v in options} else FRESH_START
        self._offer_resume()

    # The model and dataset sections -------------------------------------------------------------------

    def _model_pane_settings(self) -> dict[str, Any] | None:
        """The Model tab's settings (``ModelForm.settings()``), None without a Model tab."""
        from tui.widgets.model.model_pane import ModelPane

        for pane in self._panes(ModelPane):
            return pane.form.settings()
        return None

    def _data_pane_settings(self) -> dict[str, Any] | None:
        from tui.widgets.data.data_pane import DataPane

        for pane in self._panes(DataPane):
            return pane.settings
        return None

    def _panes(self, kind: type) -> list:
        """The screen's panes of ``kind``, found once (a screen query walks every widget: it made
        each of the form's checks cost ~20 ms); found again when one has gone."""
        found = self._pane_cache.get(kind)
        if not found or not all(p.is_attached and p.screen is self.screen for p in found):
            found = list(self.screen.query(kind))
            self._pane_cache[kind] = found
        return found

    def sync_sections(self) -> bool:
        """Read the Model and Data tabs (what they show now) into the model and data sections;
        a preset's or a file's section stands until that tab changes. The dataset's max_length and
        loss are taken into the form when the Data tab changes them. True if anything changed."""
        before = (self.model, self.data)
        model, origin = self._base_model()
        if self._model_override is not None and self._covered(model) != self._model_seen:
            self._model_override = None  # the Model tab changed what the override set: it wins
        if self._model_override is not None:
            model = {**model, **self._model_override}
            whole = "source" in self._model_override  # a file's model, not a preset's precision
            origin = (f"{origin}, {self._model_override_origin}" if origin and not whole
                      else self._model_override_origin)
        self.model, self.model_origin = model, origin

        pane_data = self._data_pane_settings()
        if self._data_override is not None and pane_data != self._data_seen:
            self._data_override = None
        if self._data_override is not None:
            data, d_origin = self._data_override, self._data_override_origin
        else:
            data, d_origin = (pane_data or {}), ("Data tab" if pane_data else "")
        adopted = False
        if pane_data is not None and pane_data != self._data_adopted:
            self._data_adopted = pane_data
            if self._data_override is None:
                # Derived from the Data tab, not typed here: no Changed, hence no save of this
                # pane's state. Saved, it would carry every other field as this terminal shows
                # it, and a second terminal whose Data tab follows the first's would send its
                # stale fields over the edits the first made meanwhile (lost LoRA values, seen
                # once in test_ui_state, in a quiet suite run). A restore takes these values again from the
                # Data tab; the user's next edit here saves them.
                self.form.set_values({"data.max_length": pane_data.get("max_length"),
                                      "data.loss": pane_data.get("loss")}, announce=False)
                adopted = True
        self.data, self.data_origin = data, d_origin
        self.form.show_sections(self.model, self.model_origin, self.data, self.data_origin)
        return adopted or (self.model, self.data) != before

    def _base_model(self) -> tuple[dict[str, Any], str]:
        """The model section before any override, and where it comes from: the Model tab; the
        model the backend holds when the tab names none; else nothing (an empty source: the
        backend's embedded tiny model)."""
        pane_model = self._model_pane_settings()
        if pane_model is not None and (pane_model.get("source") or not self.loaded_model):
            return pane_model, "Model tab"
        if self.loaded_model:
            return self.loaded_model, "loaded in the backend"
        return {}, ""

    def _covered(self, base: dict[str, Any]) -> dict[str, Any]:
        """The base's fields that the model override sets."""
        return {k: base.get(k) for k in self._model_override or {}}

    def _set_model_override(self, fields: dict[str, Any], origin: str) -> None:
        """Set model fields (a preset's precision, a file's model) until the Model tab changes
        one of them."""
        self._model_override, self._model_override_origin = dict(fields), origin
        self._model_seen = self._covered(self._base_model()[0])

    def _set_data_override(self, data: dict[str, Any], origin: str) -> None:
        self._data_override, self._data_override_origin = dict(data), origin
        self._data_seen = self._data_pane_settings()
        self.form.set_values({"data.max_length": data.get("max_length"), "data.loss": data.get("loss")})

    # The config and its checks --------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The run config as set up now (``protocol.RunConfig`` as a dict)."""
        config = build_config(self.form.values(), self.model, self.data, self.form.run_name)
        if self._launch:
            config["launch"] = dict(self._launch)
        return config

    def local_errors(self, config: dict[str, Any] | None = None) -> dict[str, str]:
        """Type, range and cross-field errors found without the backend."""
        config = config if config is not None else self.config()
        return {**cross_errors(config), **self.form.local_errors()}

    @on(RunForm.Changed)
    def _form_changed(self, event: RunForm.Changed) -> None:
        event.stop()
        self.sync_sections()
        self.check()
        self.save_state()

    @on(Input.Changed, "#lora-path")
    @on(Select.Changed, "#lora-resume")
    def _choice_changed(self, event: Message) -> None:
        if isinstance(event, Select.Changed):
            self._wanted_resume = None
        self.save_state()

    def check(self) -> None:
        """Check the config now (locally) and soon (the backend): errors at their fields."""
        config = self.config()
        local = self.local_errors(config)
        server = self.server_errors if self._server_errors_for == config else {}
        self.form.show_errors({**self._file_errors(config), **server, **local})
        self.form.show_warnings(dict(self.validated_result.get("warnings") or {}) if self.validated == config else {})
        if self._validate_timer is not None:
            self._validate_timer.stop()
            self._validate_timer = None
        reopening = self._data_reopening()
        if local:
            self.line.show_invalid(local)
        elif reopening:
            self.line.show_waiting(f"the Data tab is opening {reopening} again: the run is checked once it is open")
        elif self.validated == config:
            # Checked already (e.g. a field cleared and typed again): the backend's answer again,
            # not the error summary the cleared field left.
            self.line.show_result(self.validated_result)
        elif not self.connected:
            self.line.show_failure("not connected to the backend: the run cannot be checked or started "
                                   "(ctrl+r starts one)")
        elif not self.job_known:
            self.line.show_pending()  # asked for once status says no job runs (read_job)
        elif self.job is not None:
            # train.validate builds the model on the meta device; not while a job loads or trains
            # one (and Start waits for the job anyway). Checked when it ends.
            self.line.show_waiting(f"the backend checks the run when the {self.job.get('kind') or ''} job ends")
        else:
            self.line.show_pending()
            self._validate_timer = self.set_timer(VALIDATE_DELAY_S, self._timed_validate)
        self._update_start()

    def _file_errors(self, config: dict[str, Any]) -> dict[str, str]:
        return self.file_errors if self._file_errors_for == config else {}

    def _timed_validate(self) -> None:
        self._validate_timer = None
        if self.is_attached:
            self.validate()

    @work(name="check the run", group="train.validate", exclusive=True, exit_on_error=False)
    async def validate(self) -> None:
        config = self.config()
        if self.local_errors(config) or self.job is not None or not self.job_known:
            return
        try:
            result = await self.call(P.ValidateRun(config=config), timeout=120)
        except RequestFailed as exc:
            self.line.show_failure(f"✖ could not check the run: {exc.reply.reason or exc.reply.code}")
            return
        except BackendUnavailable:
            self.line.show_failure("not connected to the backend: the run cannot be checked")
            return
        self.show_validation(config, result)

    def show_validation(self, config: dict[str, Any], result: dict[str, Any]) -> None:
        """Show a ``train.validate`` result for ``config`` (ignored if the form moved on)."""
        if config != self.config():
            return  # a newer check is on its way
        errors = {str(k): str(v) for k, v in (result.get("errors") or {}).items()}
        self.server_errors, self._server_errors_for = errors, config
        self.form.show_errors({**self._file_errors(config), **errors})
        if result.get("ok") and not errors:
            self.validated, self.validated_result = config, dict(result)
            self.form.show_warnings(dict(result.get("warnings") or {}))
            self.line.show_result(result)
        else:
            self.validated = None
            self.line.result = result if isinstance(result.get("trainable_params"), int) else None
            self.line.show_invalid(errors or {"config": "the backend found it invalid"})
        self._update_start()

    # Start ------------------------------------------------------------------------------------------

    @property
    def can_start(self) -> bool:
        config = self.config()
        # Any message at a field keeps Start off, an imported file's included.
        return (self.connected and self.job is None and self.validated is not None
                and self.validated == config and not self._file_errors(config) and not self._data_reopening())

    def _update_start(self) -> None:
        if not self.is_mounted:
            return
        self.query_one("#lora-start", Button).disabled = not self.can_start
        self._show_status()
        self.refresh_bindings()

    def _status(self, text: str) -> None:
        self._message = text
        self._show_status()

    def _show_status(self) -> None:
        if not self.is_mounted:
            return
        job = f"a {self.job.get('kind') or 'job'} job runs: Start waits for it" if self.job else ""
        self.query_one("#lora-status", Static).update(job or self._message)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "preset":
            return parameters[0] in self.presets
        # Start stays a live key while the button is off: it then says why, or goes to the error.
        return True

    @on(Button.Pressed, "#lora-start")
    def _start_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_start()

    def action_start(self) -> None:
        if self.can_start:
            self.start()
        elif self.form.focus_error():
            self.notify("This setting needs attention first.", severity="warning", timeout=4)
        else:
            self.notify(self._why_not(), severity="warning", timeout=5, markup=False)

    def _why_not(self) -> str:
        """Why Start is off, for people."""
        if not self.connected:
            return "Cannot start: not connected to the backend (ctrl+r starts one)."
        if self.job is not None:
            return f"Cannot start yet: a {self.job.get('kind') or ''} job runs (ctrl+g stops it)."
        if self._data_reopening():
            return f"Cannot start yet: the Data tab is opening {self._data_reopening()} again."
        if self.local_errors():
            return "Cannot start: " + "; ".join(f"{k}: {v}" for k, v in sorted(self.local_errors().items()))
        if self._file_errors(self.config()):
            return "Cannot start: the imported file has settings marked ✖; correct them first."
        if self.server_errors and self._server_errors_for == self.config():
            return "Cannot start: the backend found problems (marked ✖)."
        return "Cannot start yet: the settings are being checked."

    @work(name="start training", group="train.start", exclusive=True, exit_on_error=False)
    async def start(self) -> None:
        self.sync_sections()
        config = self.config()
        if self.local_errors(config):
            self.check()
            return
        resume = self.query_one("#lora-resume", Select).value
        resume_from = resume if isinstance(resume, str) and resume != FRESH_START else ""
        try:
            result = await self.call(P.StartTraining(config=config, resume_from=resume_from))
        except RequestFailed as exc:
            errors = (exc.reply.result or {}).get("errors")
            if errors:
                self.show_validation(config, {"ok": False, "errors": errors})
                self.notify("The backend refused the run: see the settings marked ✖.", severity="warning",
                            timeout=6)
                return
            raise
        self._started_job = result.get("job_id", "")
        self._status(f"▶ started {self._started_job}" + (f" from {resume_from}" if resume_from else ""))
        show_tab = getattr(self.screen, "action_show_tab", None)
        if show_tab is not None:
            show_tab("train")

    # Presets, files, resume -----------------------------------------------------------------------

    @on(Button.Pressed, "#lora-bar Button")
    def _bar_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        button = event.button.id or ""
        if button.startswith("preset-"):
            self.apply_preset(button.removeprefix("preset-"))
        elif button == "lora-export":
            self.action_export()
        elif button == "lora-import":
            self.action_import()

    def action_preset(self, name: str) -> None:
        self.apply_preset(name)

    def apply_preset(self, name: str) -> None:
        """The defaults, then the preset's LoRA and training settings; its precision goes on the
        model section (until the Model tab changes)."""
        preset = self.presets.get(name)
        if preset is None:
            self.notify(f"No preset {name!r} yet: the backend has not sent its presets (train.presets).",
                        severity="warning", timeout=5, markup=False)
            return
        defaults = self.preset_defaults
        values = flatten({"lora": {**(defaults.get("lora") or {}), **(preset.get("lora") or {})},
                          "training": {**(defaults.get("training") or {}), **(preset.get("training") or {})},
                          "data": {k: v for k, v in (preset.get("data") or {}).items()
                                   if k in ("max_length", "loss")}})
        model = {k: v for k, v in (preset.get("model") or {}).items() if k in PRECISION_FIELDS}
        if model:
            self._set_model_override(model, f"precision from {name}")
        self.form.set_values(values)
        self._status(f"preset {name} applied")

    def action_export(self) -> None:
        self.export_config()

    def action_import(self) -> None:
        self.import_config()

    def _path(self) -> str:
        path = expand_path(self.query_one("#lora-path", Input).value)
        if not path:
            self.query_one("#lora-path", Input).focus()
            self._status("type a .toml path first")
        return path

    @work(name="export the run config", group="train.export", exclusive=True, exit_on_error=False)
    async def export_config(self) -> None:
        path = self._path()
        if not path:
            return
        self.sync_sections()
        config = self.config()
        overwrite = False
        if Path(path).exists():
            if not await self._confirm_overwrite(path):
                return
            overwrite = True
        try:
            result = await self.call(P.ExportRunConfig(config=config, path=path, overwrite=overwrite))
        except RequestFailed as exc:
            if overwrite or exc.reply.code != P.CONFIRM or not await self._confirm_overwrite(path):
                raise
            result = await self.call(P.ExportRunConfig(config=config, path=path, overwrite=True))
        self._status(f"exported to {result.get('path', path)}")
        self.notify(f"Run config written to {result.get('path', path)}", timeout=5, markup=False)
        if result.get("errors"):  # written as it is; the file says what still needs attention
            self.notify(f"It has {len(result['errors'])} setting(s) marked ✖: "
                        + "; ".join(f"{k}: {v}" for k, v in sorted(result["errors"].items())),
                        severity="warning", timeout=8, markup=False)

    async def _confirm_overwrite(self, path: str) -> bool:
        return bool(await self.app.push_screen_wait(ConfirmScreen(
            f"Overwrite {path}?", "A file of that name exists; its content will be replaced by this run config.",
            yes="Overwrite", no="Keep it")))

    @work(name="import the run config", group="train.import", exclusive=True, exit_on_error=False)
    async def import_config(self) -> None:
        path = self._path()
        if not path:
            return
        result = await self.call(P.ImportRunConfig(path=path))
        self.apply_config(result.get("config") or {}, origin=Path(path).name)
        errors = {str(k): str(v) for k, v in (result.get("errors") or {}).items()}
        self.file_errors, self._file_errors_for = errors, self.config()
        if errors:
            self.check()
            self.notify(f"{Path(path).name}: {len(errors)} setting(s) need attention (marked ✖).",
                        severity="warning", timeout=6, markup=False)
        self._status(f"imported {Path(path).name}")

    def apply_config(self, config: dict[str, Any], origin: str) -> None:
        """Show a whole run config (an imported file): its model and dataset sections stand
        until the Model or Data tab changes."""
        if (config.get("model") or {}).get("source"):
            self._set_model_override(config["model"], f"from {origin}")
        if ((config.get("data") or {}).get("source") or {}).get("path"):
            self._set_data_override(config["data"], f"from {origin}")
        self.form.set_values(flatten(config), name=str(config.get("name") or ""))
        launch = dict(config.get("launch") or {})
        self._launch = launch if (launch.get("processes") or 1) > 1 else {}
        self.sync_sections()

    def resume_run(self, config: dict[str, Any], checkpoint: str, origin: str) -> None:
        """The Runs tab's "resume from here": the form takes the run's ``config`` and the resume
        choice becomes its ``checkpoint`` (chosen once train.checkpoints offers it); Start (f5)
        then continues that run."""
        if config:
            self.apply_config(config, origin)
        self._wanted_resume = checkpoint
        self._offer_resume()
        self.read_checkpoints()
        self.save_state()

    def action_resume(self) -> None:
        self.read_checkpoints()
        self.query_one("#lora-resume", Select).focus()

    def action_next_error(self) -> None:
        if not self.form.focus_error():
            self.notify("No setting has an error.", timeout=3)
