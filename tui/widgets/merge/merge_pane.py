"""MergePane: the Merge tab, a six-step wizard from an adapter to a verified merged folder, its
upload to the Hub and its export as a GGUF file.

1 Adapter: the adapters and checkpoints (``merge.adapters``) with their LoRA config, base, step
  and final loss; enter picks one.
2 Precision: ``merge.plan``'s estimate first (memory verdict, disk needed against free,
  warnings), then the dtype (bf16/fp16/fp32) and what to merge into (dequantized/original).
3 Output: the folder and the shard size; f5 merges (``merge.start``; when the folder exists the
  backend refuses with code ``confirm`` and the pane asks before sending ``overwrite=True``),
  with the job's stage and a progress bar.
4 Verify: ``merge.verified``'s table (max |logit diff| against the model as trained, perplexity,
  size) with the noise floor beside it; f5 verifies again (``merge.verify``).
5 Upload: ``hub.status`` (offline: local export only; the token's source, never the token), repo
  id, private (on by default), adapter only; f5 dry run lists the files, f6 uploads (``hub.push``).
6 Export: ``export.plan`` (the file, its size against the free disk, a refusal such as a k-quant
  without llama-cpp-python with the command that adds it), the level (f16/bf16/q8_0/q4_k_m/q5_k_m),
  the file, an Ollama Modelfile; f5 exports (``export.start``, asking before replacing a file) and
  the file is always read back against the merged model (``export.verified``).

ctrl+n / ctrl+b go to the next / previous step. Everything shown comes from replies and events,
so a terminal that attaches later sees the saved folder and the verification again. The step, the
adapter picked, the merged folder and every choice typed or ticked are the pane's state
``"merge"``, kept by the backend (tui/ui_state.py): they come back after a re-attach, and a second
terminal shows them.
"""

from __future__ import annotations

from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Button, Checkbox, ContentSwitcher, DataTable, Input, Select, Static

from backend import protocol as P
from tui.client import CONNECTED, RequestFailed
from tui.messages import ConnectionChanged
from tui.modals.confirm_screen import ConfirmScreen
from tui.ui_state import UiChange, read_fields, write_fields
from tui.widgets.backend_requests import BackendRequests
from tui.widgets.chat.backend_call import by_method
from tui.widgets.chat.chat_format import size
from tui.widgets.chat.chat_pane import failure_text
from tui.widgets.lora.lora_pane import expand_path
from tui.widgets.merge.adapter_step import AdapterStep
from tui.widgets.merge.export_step import ExportStep, plan_line
from tui.widgets.merge.merge_format import adapter_name, files_text, hub_line, plan_text
from tui.widgets.merge.output_step import OutputStep
from tui.widgets.merge.precision_step import PrecisionStep
from tui.widgets.merge.step_bar import StepBar
from tui.widgets.merge.upload_step import UploadStep
from tui.widgets.merge.verify_step import VerifyStep

STEP_IDS = ("merge-step-adapter", "merge-step-precision", "merge-step-output", "merge-step-verify",
            "merge-step-upload", "merge-step-export")
ADAPTER, PRECISION, OUTPUT, VERIFY, UPLOAD, EXPORT = range(6)
#: Typing pauses this long before the plan is read again.
PLAN_DELAY_S = 0.3
#: Jobs after which the list of adapters may have changed.
ADAPTER_JOBS = {"train.start", "merge.start"}
#: The key of this pane's state in the backend (tui/ui_state.py).
STATE_KEY = "merge"


def default_out(adapter: dict[str, Any]) -> str:
    """A folder name for the merged model (relative: the backend puts it under its merged/)."""
    return adapter_name(adapter).replace(" ", "-") + "-merged"


class MergePane(BackendRequests, Vertical):
    """The merge wizard."""

    BINDINGS = [
        Binding("ctrl+n", "next", "Next", id="merge.next",
                tooltip="Go to the next step of the wizard (when this one is complete)."),
        Binding("ctrl+b", "back", "Back", id="merge.back", tooltip="Go back one step."),
        Binding("f5", "refresh", "Refresh", id="merge.refresh",
                tooltip="Read the list of adapters and checkpoints again (merge.adapters)."),
        Binding("f5", "plan", "Plan", id="merge.plan",
                tooltip="Read the estimate again (merge.plan): memory, disk, warnings."),
        Binding("f5", "merge", "Merge", id="merge.start",
                tooltip="Merge the adapter into its base and save the folder; asks before replacing one."),
        Binding("f5", "verify", "Verify", id="merge.verify",
                tooltip="Verify the merged folder again against the model as trained (merge.verify)."),
        Binding("f5", "dry_run", "Dry run", id="hub.dry-run",
                tooltip="List exactly what the upload would send (hub.push with dry_run); sends nothing."),
        Binding("f6", "upload", "Upload", id="hub.push",
                tooltip="Upload the merged folder (or the adapter only) to the Hub repository."),
        Binding("f5", "export", "Export", id="export.start",
                tooltip="Write the merged model as a GGUF file (and a Modelfile), then read it back against it."),
    ]

    #: The step's action of each f5 binding.
    STEP_ACTIONS = {"refresh": ADAPTER, "plan": PRECISION, "merge": OUTPUT, "verify": VERIFY, "dry_run": UPLOAD,
                    "upload": UPLOAD, "export": EXPORT}

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.connected = False
        self.step = ADAPTER
        #: The furthest step reached.
        self.reached = ADAPTER
        #: The adapter picked in step 1 (a merge.adapters item).
        self.adapter: dict[str, Any] | None = None
        #: merge.plan's last answer, and its refusal ("" when none).
        self.plan: dict[str, Any] | None = None
        self.plan_error = ""
        self._plan_timer = None
        self._plan_adapter = ""
        self.merge_job = ""
        self.verify_job = ""
        self.push_job = ""
        self.export_job = ""
        #: export.plan's last answer; export.saved's and export.verified's payloads.
        self.export_plan: dict[str, Any] | None = None
        self.exported: dict[str, Any] | None = None
        self.export_verified: dict[str, Any] | None = None
        self._export_timer = None
        #: merge.saved's payload (the merged folder), merge.verified's, hub.pushed's.
        self.saved: dict[str, Any] | None = None
        self.verified: dict[str, Any] | None = None
        self.pushed: dict[str, Any] | None = None
        self.hub: dict[str, Any] | None = None
        self.status_text = ""

    def compose(self) -> ComposeResult:
        yield StepBar(id="merge-steps")
        with ContentSwitcher(initial=STEP_IDS[ADAPTER], id="merge-wizard"):
            yield AdapterStep(id=STEP_IDS[ADAPTER])
            yield PrecisionStep(id=STEP_IDS[PRECISION])
            yield OutputStep(id=STEP_IDS[OUTPUT])
            yield VerifyStep(id=STEP_IDS[VERIFY])
            yield UploadStep(id=STEP_IDS[UPLOAD])
            yield ExportStep(id=STEP_IDS[EXPORT])
        yield Static("", id="merge-status", markup=False)

    def on_mount(self) -> None:
        self.query_one(StepBar).show(self.step, self.reached)
        self.query_one("#merge-status").display = False
        self.app.backend_events.subscribe(self, self.on_backend)  # type: ignore[attr-defined]
        self.app.connection_changed.subscribe(self, self.on_connection)  # type: ignore[attr-defined]
        ui_state = getattr(self.app, "ui_state", None)
        if ui_state is not None:
            ui_state.changed.subscribe(self, self.on_ui_state)
        self.on_connection(self.app.connection)  # type: ignore[attr-defined]

    # The pane's state, kept by the backend (tui/ui_state.py) ----------------------------------------

    def state(self) -> dict[str, Any]:
        """The step, the adapter, the merged folder and the choices (the pane's ``"merge"`` state)."""
        return {"step": self.step, "reached": self.reached, "adapter": self.adapter, "saved": self.saved,
                "fields": read_fields(self)}

    def save_state(self) -> None:
        ui_state = getattr(self.app, "ui_state", None)
        if ui_state is not None and self.is_mounted:
            ui_state.set(STATE_KEY, self.state())

    def on_ui_state(self, change: UiChange) -> None:
        if change.key != STATE_KEY or not isinstance(change.value, dict):
            return
        state = change.value
        adapter = state.get("adapter")
        if isinstance(adapter, dict) and adapter != self.adapter:
            self.adapter = dict(adapter)
            self.plan, self.plan_error = None, ""
        if isinstance(state.get("saved"), dict):
            self.saved = dict(state["saved"])
        with self.prevent(Input.Changed, Select.Changed, Checkbox.Changed):
            write_fields(self, state.get("fields") or {})
        step = state.get("step") if isinstance(state.get("step"), int) else ADAPTER
        if self.adapter is None:
            step = ADAPTER
        elif self.saved is None:
            step = min(step, OUTPUT)
        last = len(STEP_IDS) - 1
        step = max(ADAPTER, min(step, last))
        self.reached = max(self.reached, min(int(state.get("reached") or step), last), step)
        # No focus: the Merge tab may be hidden, and focus there would bring it forward.
        self.go(step, focus=False)

    @on(Input.Changed)
    @on(Select.Changed)
    @on(Checkbox.Changed)
    def _chosen(self, event) -> None:
        self.save_state()

    # Parts ----------------------------------------------------------------------------------------

    @property
    def adapter_step(self) -> AdapterStep:
        return self.query_one(AdapterStep)

    @property
    def precision_step(self) -> PrecisionStep:
        return self.query_one(PrecisionStep)

    @property
    def output_step(self) -> OutputStep:
        return self.query_one(OutputStep)

    @property
    def verify_step(self) -> VerifyStep:
        return self.query_one(VerifyStep)

    @property
    def upload_step(self) -> UploadStep:
        return self.query_one(UploadStep)

    @property
    def export_step(self) -> ExportStep:
        return self.query_one(ExportStep)

    @property
    def merged_out(self) -> str:
        return str((self.saved or {}).get("out") or "")

    def status(self, text: str, bad: bool = False) -> None:
        """The line under the wizard: refusals and failures, said plainly."""
        self.status_text = text
        line = self.query_one("#merge-status", Static)
        line.update(text)
        line.display = bool(text)
        line.set_class(bad, "-error")

    # Steps ------------------------------------------------------------------------------------------

    def go(self, step: int, focus: bool = True) -> None:
        """Show ``step`` (what it needs is read from the backend) and put the focus in it."""
        self.step = step
        self.reached = max(self.reached, step)
        self.query_one(ContentSwitcher).current = STEP_IDS[step]
        self.query_one(StepBar).show(step, self.reached)
        self.status("")
        if step in (PRECISION, OUTPUT) and self.adapter is not None:
            if step == OUTPUT and not self.output_step.out:
                self.output_step.query_one("#merge-out", Input).value = default_out(self.adapter)
            self.read_plan()
        if step == UPLOAD:
            self.read_hub()
            if self.upload_step.query_one("#hub-repo", Input).value == "" and self.adapter is not None:
                self.upload_step.query_one("#hub-repo", Input).placeholder = (
                    f"user/{default_out(self.adapter).removesuffix('-merged')}")
        if step == EXPORT:
            self.read_export_plan()
        target = {ADAPTER: "#merge-adapters", PRECISION: "#merge-dtype", OUTPUT: "#merge-out",
                  VERIFY: "#merge-verify-table", UPLOAD: "#hub-repo", EXPORT: "#export-quant"}[step]
        if focus:
            self.query_one(target).focus()
        self.save_state()
        self.refresh_bindings()

    def can_leave(self, step: int) -> str:
        """Why the wizard cannot go on from ``step`` ("" when it can)."""
        if step == ADAPTER and self.adapter is None:
            return "pick an adapter first (enter on its row)"
        if step == PRECISION and self.plan is None:
            return f"no plan yet: {self.plan_error}" if self.plan_error else "wait for the plan (f5 reads it again)"
        if step == OUTPUT and self.saved is None:
            return "merge first (f5): steps 4 and 5 need the merged folder"
        return ""

    def action_next(self) -> None:
        if self.step == ADAPTER:
            picked = self.adapter_step.highlighted
            if picked is not None:
                self.pick(picked)
        reason = self.can_leave(self.step)
        if reason:
            self.status(f"✖ {reason}", bad=True)
            return
        if self.step < EXPORT:
            self.go(self.step + 1)

    def action_back(self) -> None:
        if self.step > ADAPTER:
            self.go(self.step - 1)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in self.STEP_ACTIONS:
            if self.STEP_ACTIONS[action] != self.step:
                return False
            if action == "merge" and self.merge_job:
                return None
            if action in ("dry_run", "upload") and self.push_job:
                return None
            if action == "export" and self.export_job:
                return None
            return True if self.connected else None
        if action == "back":
            return self.step > ADAPTER
        if action == "next":
            return self.step < EXPORT
        return True

    # The backend ------------------------------------------------------------------------------------

    def on_connection(self, change: ConnectionChanged) -> None:
        self.connected = change.state == CONNECTED
        if self.connected:
            self.read_adapters()
            if self.step == UPLOAD:
                self.read_hub()
        self.refresh_bindings()

    def on_backend(self, ev: P.Event) -> None:
        p, kind = ev.payload, ev.kind
        if kind == "job.progress":
            job_id = p.get("job_id")
            if job_id and job_id == self.merge_job:
                self.output_step.progress(p.get("stage", ""), p.get("done") or 0, p.get("total") or 0,
                                          p.get("unit", ""), p.get("message", ""))
            elif job_id and job_id == self.verify_job:
                self.verify_step.status(f"▶ {p.get('stage', 'verifying')} …")
            elif job_id and job_id == self.push_job:
                done, total = p.get("done") or 0, p.get("total") or 0
                self.upload_step.result(f"▶ {p.get('stage') or 'uploading'} {size(done)} of {size(total)}")
            elif job_id and job_id == self.export_job:
                self.export_step.progress(p.get("stage", ""), p.get("done") or 0, p.get("total") or 0,
                                          p.get("unit", ""), p.get("message", ""))
        elif kind == "merge.saved":
            self.saved = dict(p)
            self.save_state()
            self.reached = max(self.reached, OUTPUT)
            self.output_step.query_one("#merge-saved", Static).update(
                f"✔ saved {len(p.get('files') or [])} files, {size(p.get('size_bytes'))} in {p.get('out')} · "
                f"{p.get('dtype')} into {p.get('into')} · merge {p.get('merge_s', 0):.1f} s, save "
                f"{p.get('save_s', 0):.1f} s")
            self.query_one(StepBar).show(self.step, self.reached)
        elif kind == "merge.verified":
            self.verified = dict(p)
            self.verify_step.show(p)
        elif kind == "hub.pushed":
            self.pushed = dict(p)
            self.upload_step.show_files(p.get("files") or [])
        elif kind == "export.saved":
            self.exported = dict(p)
            self.export_step.saved(p)
        elif kind == "export.verified":
            self.export_verified = dict(p)
            self.export_step.show(p)
        elif kind == "job.finished":
            self._on_job_finished(p)

    def _on_job_finished(self, p: dict[str, Any]) -> None:
        job_id, status = p.get("job_id", ""), p.get("status", "")
        result = p.get("result") or {}
        if job_id and job_id == self.merge_job:
            self.merge_job = ""
            if status == "done":
                if self.saved is None and result.get("out"):
                    self.saved = {"out": result["out"], "files": result.get("files") or [],
                                  "size_bytes": result.get("size_bytes")}
                if result.get("verify") and self.verified is None:
                    self.verified = dict(result["verify"])
                    self.verify_step.show(self.verified)
                self.output_step.finished(f"✔ merged in {p.get('elapsed_s', 0):.1f} s: {result.get('out', '')}")
                self.go(VERIFY if self.verified is not None else OUTPUT)
            else:
                text = failure_text("the merge", p)
                self.output_step.finished(text)
                self.status(text, bad=status == "failed")
        elif job_id and job_id == self.verify_job:
            self.verify_job = ""
            if status != "done":
                self.verify_step.status(failure_text("the verification", p))
        elif job_id and job_id == self.push_job:
            self.push_job = ""
            if status == "done":
                files = result.get("files") or []
                self.upload_step.show_files(files)
                total = sum(int(f.get("size_bytes") or 0) for f in files)
                where = f"{result.get('repo_id', '')} ({'private' if result.get('private') else 'public'})"
                if result.get("dry_run"):
                    self.upload_step.result(f"dry run: {len(files)} files, {size(total)} would go to {where}; "
                                            "nothing was sent")
                else:
                    self.upload_step.result(f"✔ uploaded {len(files)} files, {size(total)} to {where}: "
                                            f"{result.get('url', '')}")
            else:
                self.upload_step.result(failure_text("the upload", p), bad=True)
        elif job_id and job_id == self.export_job:
            self.export_job = ""
            if status == "done":
                if result.get("verify") and self.export_verified is None:
                    self.export_verified = dict(result["verify"])
                    self.export_step.show(self.export_verified)
                self.export_step.finished(f"✔ exported in {p.get('elapsed_s', 0):.1f} s: {result.get('path', '')}")
            else:
                text = failure_text("the export", p)
                self.export_step.finished(text)
                self.status(text, bad=status == "failed")
        if p.get("kind") in ADAPTER_JOBS and self.connected:
            self.read_adapters()
        self.refresh_bindings()

    # Step 1 -----------------------------------------------------------------------------------------

    @work(name="list the adapters", group="merge.adapters", exclusive=True, exit_on_error=False)
    async def read_adapters(self) -> None:
        try:
            result = await self.call(by_method("merge.adapters"))
        except RequestFailed as exc:
            self.status(f"✖ no adapters: {exc.reply.reason or exc.reply.code}", bad=True)
            return
        self.adapter_step.show(result.get("adapters") or [], keep=str((self.adapter or {}).get("path", "")))

    def action_refresh(self) -> None:
        self.read_adapters()

    @on(DataTable.RowSelected, "#merge-adapters")
    def _adapter_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        picked = self.adapter_step.highlighted
        if picked is not None:
            self.pick(picked)
            self.go(PRECISION)

    def pick(self, adapter: dict[str, Any]) -> None:
        """Merge ``adapter``: a new adapter starts the later steps afresh."""
        if self.adapter is not None and self.adapter.get("path") == adapter.get("path"):
            return
        if self.adapter is not None:
            # Another adapter: the merged folder and its verification were the old one's.
            self.saved = self.verified = None
            self.output_step.query_one("#merge-saved", Static).update("")
            self.output_step.finished("")
            self.verify_step.clear()
        self.adapter = dict(adapter)
        self.plan, self.plan_error = None, ""
        self.reached = PRECISION
        self.output_step.query_one("#merge-out", Input).value = default_out(adapter)
        self.save_state()

    # Steps 2 and 3: the plan and the merge ----------------------------------------------------------

    def plan_params(self) -> dict[str, Any]:
        assert self.adapter is not None
        out = self.output_step.out or default_out(self.adapter)
        return {"adapter": str(self.adapter["path"]), "out": expand_path(out) if out.startswith(("~", "/", "."))
                else out, "dtype": self.precision_step.dtype, "into": self.precision_step.into,
                "max_shard_size": self.output_step.shard or "5GB"}

    def action_plan(self) -> None:
        self.read_plan()

    @on(Select.Changed, "#merge-dtype")
    @on(Select.Changed, "#merge-into")
    @on(Input.Changed, "#merge-out")
    @on(Input.Changed, "#merge-shard")
    def _plan_changed(self, event) -> None:
        if self.adapter is None or self.step not in (PRECISION, OUTPUT):
            return
        if self._plan_timer is not None:
            self._plan_timer.stop()
        self._plan_timer = self.set_timer(PLAN_DELAY_S, self.read_plan)

    @work(name="read the merge plan", group="merge.plan", exclusive=True, exit_on_error=False)
    async def read_plan(self) -> None:
        if self.adapter is None:
            return
        params = self.plan_params()
        try:
            plan = await self.call(by_method("merge.plan", **params))
        except RequestFailed as exc:
            self.plan, self.plan_error = None, exc.reply.reason or exc.reply.code
            self.precision_step.show_plan(f"✖ {self.plan_error}", bad=True)
            self.output_step.query_one("#merge-out-line", Static).update(f"✖ {self.plan_error}")
            return
        self.plan, self.plan_error = plan, ""
        if self._plan_adapter != params["adapter"]:
            # The first plan of this adapter says what it is best merged into.
            self._plan_adapter = params["adapter"]
            default = plan.get("into_default")
            if default in P.MERGE_INTO and default != self.precision_step.into:
                with self.prevent(Select.Changed):
                    self.precision_step.query_one("#merge-into", Select).value = default
                self.read_plan()
                return
        self.precision_step.show_plan(plan_text(plan), bad=(plan.get("memory") or {}).get("verdict") == "will not fit")
        exists = " (exists: merging asks before replacing it)" if plan.get("out_exists") else ""
        self.output_step.query_one("#merge-out-line", Static).update(
            f"→ {plan.get('out', '')}{exists} · {size((plan.get('disk') or {}).get('need_bytes'))} on disk")

    @on(Button.Pressed, "#merge-start")
    def _merge_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_merge()

    def action_merge(self) -> None:
        if self.adapter is None:
            self.status("✖ pick an adapter first (step 1)", bad=True)
            return
        if not self.merge_job:
            self.start_merge(overwrite=False)

    @work(name="start the merge", group="merge.start", exclusive=True, exit_on_error=False)
    async def start_merge(self, overwrite: bool) -> None:
        params = {**self.plan_params(), "verify": self.output_step.verify, "overwrite": overwrite, "prompts": []}
        before = self.saved, self.verified
        self.saved = self.verified = None  # this merge's events may come before its reply
        try:
            result = await self.call(by_method("merge.start", **params))
        except RequestFailed as exc:
            self.saved, self.verified = before
            if exc.reply.code == "confirm" and not overwrite:
                out = (exc.reply.result or {}).get("out") or params["out"]

                def answered(yes: bool | None) -> None:
                    if yes:
                        self.start_merge(overwrite=True)
                    else:
                        self.status(f"left {out} as it is: pick another output folder, or merge again to replace it")

                self.app.push_screen(ConfirmScreen(f"Replace {out}?", exc.reply.reason, yes="Replace",
                                                   no="Keep it"), answered)
                return
            self.status(f"✖ not merged: {exc.reply.reason or exc.reply.code}", bad=True)
            return
        self.merge_job = str(result.get("job_id") or "")
        if self.saved is None:
            self.output_step.query_one("#merge-saved", Static).update("")
        self.output_step.progress("starting", 0, 0)
        self.status("")
        self.refresh_bindings()

    # Step 4 -----------------------------------------------------------------------------------------

    def action_verify(self) -> None:
        if not self.merged_out or self.adapter is None:
            self.verify_step.status("✖ nothing to verify: merge first (step 3)")
            return
        self.start_verify()

    @work(name="verify the merged folder", group="merge.verify", exclusive=True, exit_on_error=False)
    async def start_verify(self) -> None:
        assert self.adapter is not None
        try:
            result = await self.call(by_method("merge.verify", out=self.merged_out, adapter=str(self.adapter["path"]),
                                               dtype="fp32", prompts=[]))
        except RequestFailed as exc:
            self.verify_step.status(f"✖ not verified: {exc.reply.reason or exc.reply.code}")
            return
        self.verify_job = str(result.get("job_id") or "")
        self.verify_step.status("▶ verifying …")

    # Step 5 -----------------------------------------------------------------------------------------

    @work(name="read the Hub's status", group="hub.status", exclusive=True, exit_on_error=False)
    async def read_hub(self) -> None:
        try:
            self.hub = await self.call(by_method("hub.status"), timeout=30)
        except RequestFailed as exc:
            self.upload_step.query_one("#hub-status", Static).update(f"Hub: {exc.reply.reason or exc.reply.code}")
            return
        self.upload_step.query_one("#hub-status", Static).update(hub_line(self.hub))

    @on(Button.Pressed, "#hub-dry-run")
    def _dry_run_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_dry_run()

    @on(Button.Pressed, "#hub-upload")
    def _upload_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_upload()

    @on(Checkbox.Changed, "#hub-adapter-only")
    def _adapter_only_changed(self, event: Checkbox.Changed) -> None:
        self.upload_step.result(f"uploads {self.push_folder() or '(merge first)'}")

    def push_folder(self) -> str:
        if self.upload_step.adapter_only:
            return str((self.adapter or {}).get("path") or "")
        return self.merged_out

    def action_dry_run(self) -> None:
        self._push(dry_run=True)

    def action_upload(self) -> None:
        self._push(dry_run=False)

    def _push(self, dry_run: bool) -> None:
        folder, repo = self.push_folder(), self.upload_step.repo_id
        if not folder:
            self.upload_step.result("✖ nothing to upload: merge first (step 3), or tick 'adapter only'", bad=True)
            return
        # The dry run checks the name as the upload will: the placeholder is no repository.
        placeholder = self.upload_step.query_one("#hub-repo", Input).placeholder
        if not repo or "/" not in repo or repo == placeholder:
            self.upload_step.result("✖ name the repository as user/name (or org/name): "
                                    f"{'the dry run checks it as the upload will' if dry_run else 'where to upload'}",
                                    bad=True)
            return
        if not self.push_job:
            self.push(folder, repo, dry_run)

    @work(name="upload to the Hub", group="hub.push", exclusive=True, exit_on_error=False)
    async def push(self, folder: str, repo_id: str, dry_run: bool) -> None:
        try:
            result = await self.call(by_method("hub.push", folder=folder, repo_id=repo_id,
                                               private=self.upload_step.private,
                                               adapter_only=self.upload_step.adapter_only, dry_run=dry_run,
                                               commit_message=""))
        except RequestFailed as exc:
            self.upload_step.result(f"✖ not uploaded: {exc.reply.reason or exc.reply.code}", bad=True)
            return
        self.push_job = str(result.get("job_id") or "")
        self.upload_step.result("▶ listing the files …" if dry_run else "▶ uploading …")
        self.refresh_bindings()

    def files_summary(self) -> str:
        return files_text((self.pushed or {}).get("files") or [])

    # Step 6 -----------------------------------------------------------------------------------------

    def export_model(self) -> str:
        """The merged folder (an adapter without one is merged first by the backend)."""
        return self.merged_out or str((self.adapter or {}).get("path") or "")

    def export_params(self) -> dict[str, Any]:
        out = self.export_step.out
        return {"model": self.export_model(), "out": expand_path(out) if out.startswith(("~", "/", ".")) else out,
                "quant": self.export_step.quant, "ollama": self.export_step.ollama}

    @on(Select.Changed, "#export-quant")
    @on(Input.Changed, "#export-out")
    @on(Checkbox.Changed, "#export-ollama")
    def _export_changed(self, event) -> None:
        if self.step != EXPORT:
            return
        if self._export_timer is not None:
            self._export_timer.stop()
        self._export_timer = self.set_timer(PLAN_DELAY_S, self.read_export_plan)

    @work(name="read the export plan", group="export.plan", exclusive=True, exit_on_error=False)
    async def read_export_plan(self) -> None:
        if not self.export_model():
            self.export_step.show_plan("✖ nothing to export: merge first (step 3)", bad=True)
            return
        try:
            plan = await self.call(by_method("export.plan", **self.export_params()))
        except RequestFailed as exc:
            self.export_plan = None
            self.export_step.show_plan(f"✖ {exc.reply.reason or exc.reply.code}", bad=True)
            return
        self.export_plan = plan
        text = plan_line(plan)
        if plan.get("refusal"):
            text = f"✖ {plan['refusal']}\n{text}"
        self.export_step.show_plan(text, bad=bool(plan.get("refusal")))

    @on(Button.Pressed, "#export-start")
    def _export_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_export()

    def action_export(self) -> None:
        if not self.export_model():
            self.status("✖ nothing to export: merge first (step 3)", bad=True)
            return
        if not self.export_job:
            self.start_export(overwrite=False)

    @work(name="start the export", group="export.start", exclusive=True, exit_on_error=False)
    async def start_export(self, overwrite: bool) -> None:
        # Verification is always on here: the table is the point of this step.
        params = {**self.export_params(), "verify": True, "overwrite": overwrite, "prompts": []}
        before = self.exported, self.export_verified
        self.exported = self.export_verified = None
        try:
            result = await self.call(by_method("export.start", **params))
        except RequestFailed as exc:
            self.exported, self.export_verified = before
            if exc.reply.code == "confirm" and not overwrite:
                out = (exc.reply.result or {}).get("out") or params["out"]

                def answered(yes: bool | None) -> None:
                    if yes:
                        self.start_export(overwrite=True)
                    else:
                        self.status(f"left {out} as it is: name another file, or export again to replace it")

                self.app.push_screen(ConfirmScreen(f"Replace {out}?", exc.reply.reason, yes="Replace",
                                                   no="Keep it"), answered)
                return
            self.status(f"✖ not exported: {exc.reply.reason or exc.reply.code}", bad=True)
            return
        self.export_job = str(result.get("job_id") or "")
        self.export_step.table.clear()
        self.export_step.status("")
        self.export_step.progress("starting", 0, 0)
        self.status("")
        self.refresh_bindings()
