"""ModelPane: choose, estimate, load and inspect the base model.

The form's settings go to ``model.estimate`` as they change (debounced; the backend reads
config.json off its loop), and the estimate line says whether the model fits the device. Load
starts a ``model.load`` job: its progress (by shard) fills the bar, Cancel stops it between
tensors, and the ``model.loaded`` event fills the inspector and puts the measured footprint
beside the estimate. "tiny" fills in the embedded tiny model, building it first (``tiny.prepare``)
when the data home has none. What is shown comes from the backend: after a (re)connect the pane
asks ``model.inspect`` what is loaded. The form as typed is the pane's state ``"model"``, kept by
the backend (tui/ui_state.py): it comes back after a re-attach, and a second terminal shows it.
"""

from __future__ import annotations

from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Input, ProgressBar, Static

from backend import protocol as P
from tui.client import CONNECTED, RequestFailed
from tui.messages import ConnectionChanged
from tui.ui_state import UiChange, read_fields, write_fields
from tui.widgets.backend_requests import BackendRequests
from tui.widgets.model.estimate_line import EstimateLine
from tui.widgets.model.model_form import ModelForm
from tui.widgets.model.model_format import error_text, loaded_status
from tui.widgets.model.model_inspector import ModelInspector

#: The key of this pane's state in the backend (tui/ui_state.py).
STATE_KEY = "model"


class ModelPane(BackendRequests, Vertical):
    """The Model tab."""

    BINDINGS = [
        Binding("f5", "load", "Load", id="model.load",
                tooltip="Load the model with these settings (a backend job; replaces the loaded one)."),
        Binding("f4", "tiny", "Tiny model", id="model.tiny",
                tooltip="Fill in the embedded tiny model (built first when the data home has none)."),
    ]

    #: Typing pauses this long before the estimate is asked for.
    ESTIMATE_DELAY_S = 0.35

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        #: Restored form values that the form does not offer yet (a device the backend names
        #: once model.options has answered).
        self._wanted: dict[str, Any] = {}
        #: The model.load job this pane follows ("" when none runs).
        self.job_id = ""
        #: The tiny.prepare job started by the "tiny" shortcut, and where it puts the model.
        self.tiny_job_id = ""
        self.tiny_path = ""
        self._estimate_timer = None
        #: Jobs whose job.finished came, possibly before the reply that started them.
        self._ended: set[str] = set()

    def compose(self) -> ComposeResult:
        yield ModelForm(id="model-form")
        yield EstimateLine(id="model-estimate")
        with Horizontal(id="model-load-row"):
            yield Button("Load", id="model-load", variant="primary", compact=True,
                         tooltip="Load the model with these settings (a backend job; replaces the loaded one)")
            yield Button("Cancel", id="model-cancel", compact=True, disabled=True,
                         tooltip="Stop the load (between tensors); nothing is kept")
            yield ProgressBar(id="model-progress", show_eta=False)
            yield Static("", id="model-status", markup=False)
        yield ModelInspector(id="model-inspector")

    @property
    def form(self) -> ModelForm:
        return self.query_one(ModelForm)

    @property
    def inspector(self) -> ModelInspector:
        return self.query_one(ModelInspector)

    def on_mount(self) -> None:
        self.query_one(ProgressBar).display = False
        self.app.backend_events.subscribe(self, self.on_backend)  # type: ignore[attr-defined]
        self.app.connection_changed.subscribe(self, self.on_connection)  # type: ignore[attr-defined]
        ui_state = getattr(self.app, "ui_state", None)
        if ui_state is not None:
            ui_state.changed.subscribe(self, self.on_ui_state)
        if self.app.connection.state == CONNECTED:  # type: ignore[attr-defined]
            self.read_backend()

    # The pane's state, kept by the backend (tui/ui_state.py) ----------------------------------------

    def state(self) -> dict[str, Any]:
        """The form as typed and chosen (the pane's ``"model"`` state)."""
        return {"fields": {**read_fields(self.form), **self._wanted}}

    def on_ui_state(self, change: UiChange) -> None:
        if change.key == STATE_KEY and isinstance(change.value, dict):
            fields = change.value.get("fields") or {}
            missed = write_fields(self.form, fields)
            self._wanted = {k: fields[k] for k in missed}

    def on_connection(self, change: ConnectionChanged) -> None:
        if change.state == CONNECTED:
            self.read_backend()

    def read_backend(self) -> None:
        """Ask what the backend offers and holds (after every (re)connect)."""
        self.read_options()
        self.read_inspection()

    # Status -------------------------------------------------------------------------------------

    def _show_status(self, text: str, state: str = "") -> None:
        status = self.query_one("#model-status", Static)
        status.update(text)
        for cls in ("-running", "-done", "-failed", "-cancelled"):
            status.set_class(cls == state, cls)

    def _set_running(self, running: bool) -> None:
        self.query_one("#model-cancel", Button).disabled = not running
        self.query_one("#model-load", Button).disabled = running
        self.query_one(ProgressBar).display = running

    # The estimate -------------------------------------------------------------------------------

    @on(ModelForm.Changed)
    def _on_settings_changed(self, event: ModelForm.Changed) -> None:
        ui_state = getattr(self.app, "ui_state", None)
        if ui_state is not None:
            ui_state.set(STATE_KEY, self.state())
        if self._estimate_timer is not None:
            self._estimate_timer.stop()
        self._estimate_timer = self.set_timer(self.ESTIMATE_DELAY_S, self._timed_estimate)

    def _timed_estimate(self) -> None:
        self._estimate_timer = None
        self.estimate()

    @on(Input.Submitted)
    def _on_submitted(self, event: Input.Submitted) -> None:
        if self._estimate_timer is not None:
            self._estimate_timer.stop()
            self._estimate_timer = None
        self.estimate()

    @work(name="estimate the model's memory", group="model.estimate", exclusive=True, exit_on_error=False)
    async def estimate(self) -> None:
        settings = self.form.settings()
        line = self.query_one(EstimateLine)
        if not settings["source"]:
            line.show_hint()
            return
        line.show_pending()
        try:
            # The first estimate in a fresh backend imports torch and transformers: seconds.
            result = await self.call(P.EstimateModel(**settings), timeout=120)
        except RequestFailed as exc:
            line.show_error(exc.reply.result.get("error") or {"message": exc.reply.reason})
            return
        line.show_estimate(result)

    # Options and the loaded model -----------------------------------------------------------------

    @work(name="read the model options", group="model.options", exclusive=True, exit_on_error=False)
    async def read_options(self) -> None:
        self.form.set_options(await self.call(P.ModelOptions()))
        if self._wanted:
            missed = write_fields(self.form, self._wanted)
            self._wanted = {k: v for k, v in self._wanted.items() if k in missed}

    @work(name="inspect the loaded model", group="model.inspect", exclusive=True, exit_on_error=False)
    async def read_inspection(self) -> None:
        info = await self.call(P.InspectModel(), timeout=60)
        self.inspector.show(info)
        if not info.get("loaded") and str(self.query_one("#model-status", Static).content).startswith("✔ loaded"):
            # Freed (ctrl+f) or a restarted backend: the line must not say loaded beside "No base model loaded".
            self._show_status("no base model loaded (freed); f5 loads one again", "")

    # Loading ------------------------------------------------------------------------------------

    @on(Button.Pressed, "#model-load")
    def _on_load(self, event: Button.Pressed) -> None:
        event.stop()
        self.load()

    def action_load(self) -> None:
        self.load()

    def action_tiny(self) -> None:
        self.use_tiny()

    @on(Button.Pressed, "#model-cancel")
    def _on_cancel(self, event: Button.Pressed) -> None:
        event.stop()
        self.cancel_load()

    @on(Button.Pressed, "#model-tiny")
    def _on_tiny(self, event: Button.Pressed) -> None:
        event.stop()
        self.use_tiny()

    @work(name="load the model", group="model.load", exclusive=True, exit_on_error=False)
    async def load(self) -> None:
        """Start a ``model.load`` job with the form's settings."""
        settings = self.form.settings()
        if not settings["source"]:
            self.query_one(EstimateLine).show_hint()
            self.form.query_one("#model-source", Input).focus()
            self._show_status("name a model first: a local folder or a Hub id (f4 takes the embedded tiny model)",
                              "-failed")
            self.notify("No model source: type a folder or a Hub id, or press f4 for the embedded tiny model.",
                        severity="warning", timeout=5, markup=False)
            return
        result = await self.call(P.LoadModel(**settings))
        if result["job_id"] in self._ended:
            return  # it failed at once: its job.finished came before this reply
        self.job_id = result["job_id"]
        self._set_running(True)
        self._show_status(f"loading {settings['source']} …", "-running")

    @work(name="cancel the load", group="model.cancel", exclusive=True, exit_on_error=False)
    async def cancel_load(self) -> None:
        if self.job_id:
            await self.call(P.CancelJob(job_id=self.job_id))
            self._show_status("stopping the load …", "-running")

    @work(name="use the tiny model", group="model.tiny", exclusive=True, exit_on_error=False)
    async def use_tiny(self) -> None:
        """Fill in the embedded tiny model, building it first when the data home has none."""
        options = await self.call(P.ModelOptions())
        if options.get("tiny_ready"):
            self.form.set_source(options["tiny_path"])
            return
        self.tiny_path = options["tiny_path"]
        result = await self.call(P.PrepareTiny())
        if result["job_id"] in self._ended:  # it ended before this reply came
            options = await self.call(P.ModelOptions())
            if options.get("tiny_ready"):
                self.form.set_source(options["tiny_path"])
            return
        self.tiny_job_id = result["job_id"]
        self._show_status("building the tiny model (once) …", "-running")

    # Events -------------------------------------------------------------------------------------

    def on_backend(self, ev: P.Event) -> None:
        p = ev.payload
        if ev.kind == "job.finished" and p.get("job_id"):
            self._ended.add(p["job_id"])
        if ev.kind == "job.started" and p.get("kind") == "model.load":
            # Ours, or another terminal's: follow it either way.
            self.job_id = p.get("job_id", "")
            self._set_running(True)
            self.query_one(ProgressBar).update(total=None, progress=0)
        elif ev.kind == "job.progress" and p.get("job_id") and p.get("job_id") == self.job_id:
            self._on_progress(p)
        elif ev.kind == "job.progress" and p.get("job_id") and p.get("job_id") == self.tiny_job_id:
            total = p.get("total") or 0
            self._show_status(f"building the tiny model · {p.get('stage', '')}"
                         + (f" {p.get('done', 0):g}/{total:g}" if total else ""), "-running")
        elif ev.kind == "job.finished" and p.get("job_id") and p.get("job_id") == self.job_id:
            self._on_finished(p)
        elif ev.kind == "job.finished" and p.get("job_id") and p.get("job_id") == self.tiny_job_id:
            self.tiny_job_id = ""
            if p.get("status") == "done":
                self._show_status("tiny model ready", "-done")
                self.form.set_source((p.get("result") or {}).get("path") or self.tiny_path)
            else:
                self._show_status(error_text(p.get("error") or {"message": f"tiny model {p.get('status')}"}), "-failed")
        elif ev.kind == "model.loaded":
            load = {k: p.get(k) for k in ("settings", "source", "device", "estimate", "measured", "comparison",
                                          "load_seconds")}
            self.inspector.show({**(p.get("inspect") or {}), "load": load})
            self._show_status(loaded_status(load), "-done")
        elif ev.kind == "job.finished" and p.get("kind") in ("gpu.free", "backend.restart"):
            self.read_inspection()  # the model may be gone

    def _on_progress(self, p: dict[str, Any]) -> None:
        bar = self.query_one(ProgressBar)
        total = p.get("total") or 0
        if total:
            bar.update(total=total, progress=p.get("done") or 0)
        else:
            bar.update(total=None)
        parts = [p.get("stage", "")]
        if total and p.get("unit"):
            parts.append(f"{p.get('done', 0):g}/{total:g} {p['unit']}")
        if p.get("message"):
            parts.append(p["message"])
        self._show_status(" · ".join(x for x in parts if x), "-running")

    def _on_finished(self, p: dict[str, Any]) -> None:
        self.job_id = ""
        self._set_running(False)
        status = p.get("status")
        if status != "done":
            self.read_inspection()  # a load first releases the model held before it
        if status == "cancelled":
            self._show_status(f"■ load cancelled after {p.get('elapsed_s', 0):.1f} s; nothing kept", "-cancelled")
        elif status == "failed":
            error = p.get("error") or {}
            self._show_status(error_text(error), "-failed")
            self.notify(error_text(error), title="Model not loaded", severity="error", markup=False, timeout=10)
        # "done": the model.loaded event (just before) has said it all.
