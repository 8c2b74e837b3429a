"""TrainPane: the Train tab, a training run followed live: the progress line, the loss table, the
loss curve, alerts, the result; Stop.

Everything comes from the run's events (``train.started``, ``train.log``, ``train.checkpoint``,
``train.alert``, ``train.finished``, and the job's ``job.*``), which the backend stores with the
session: a terminal that attaches late gets them all again as a replay and draws the same table
and curve, then goes on live. Rows are merged by step (a step's evaluation log completes its
training row). Drawing is coalesced: events only update the data, and the table, the curve and
the line are redrawn at most every ``FLUSH_INTERVAL_S``, so a replay of thousands of rows costs a
handful of draws. Alerts (NaN/inf loss, out of memory) are shown at once.
"""

from __future__ import annotations

import time
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Static

from backend import protocol as P
from tui.client import GONE
from tui.messages import ConnectionChanged
from tui.widgets.backend_requests import BackendRequests
from tui.widgets.train.loss_curve import LossCurve
from tui.widgets.train.loss_table import LossTable
from tui.widgets.train.train_format import MARGIN, ROW_FIELDS, alert_text, failed_text, finished_text, live_line

#: The most often the table, the curve and the line are redrawn (4 times a second).
FLUSH_INTERVAL_S = 0.25
#: The job kind of ``train.start``.
TRAIN_JOB = P.StartTraining.METHOD
#: Alerts older than this (a replay) are shown in the pane but not notified again.
NOTIFY_RECENT_S = 30.0


class TrainPane(BackendRequests, Vertical):
    """The run this terminal follows: the newest training job of the attached session(s)."""

    BINDINGS = [
        Binding("s", "stop", "Stop run", id="train.stop",
                tooltip="Stop the run gracefully: the backend saves a checkpoint first, then the adapter."),
        Binding("f", "follow", "Follow", id="train.follow",
                tooltip="Jump to the newest row of the loss table and follow new rows again."),
        Binding("c", "toggle_curve", "Curve", id="train.toggle-curve",
                tooltip="Show or hide the loss curve (hidden, the table gets its rows)."),
        Binding("f5", "start", "Start", id="train.start",
                tooltip="Start a run with the LoRA tab's settings (as f5 there does; it says why not if it cannot)."),
    ]

    IDLE = "No run yet: set one up in the LoRA tab and press Start (f5)."

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        #: The training job followed, and its state: starting, running, stopping, done, stopped,
        #: failed, cancelled ("" before any).
        self.job_id = ""
        self.state = ""
        #: ``train.started``'s payload, or None.
        self.started: dict[str, Any] | None = None
        self.total_steps = 0
        #: The loss table's rows by step (train.log fields merged), and whose job they are.
        self.rows: dict[int, dict[str, Any]] = {}
        self.rows_job = ""
        #: The newest row (the live line's figures).
        self.latest: dict[str, Any] | None = None
        self.alerts: list[dict[str, Any]] = []
        self.finished: dict[str, Any] | None = None
        self.checkpoint: dict[str, Any] | None = None
        self._dirty: set[int] = set()
        self._reset_table = False
        self._curve_dirty = False
        self._flush_timer = None
        self._last_flush = 0.0
        #: How many times the table and curve were redrawn (a replay must cost few).
        self.flushes = 0
        #: What the line says of a run cancelled before its first step ("" otherwise).
        self._stopped_early = ""

    def compose(self) -> ComposeResult:
        with Horizontal(id="train-head"):
            yield Button("Stop ■", id="train-stop", variant="error", compact=True, disabled=True,
                         tooltip="Stop the run (s): a checkpoint is saved first.")
            yield Static(self.IDLE, id="train-live", markup=False)
        yield Static("", id="train-info", markup=False)
        yield Static("", id="train-alert", markup=False)
        yield Static("", id="train-result", markup=False)
        yield LossTable(id="loss-table")
        yield LossCurve(id="loss-curve")

    def on_mount(self) -> None:
        for selector in ("#train-info", "#train-alert", "#train-result"):
            self.query_one(selector).display = False
        self.app.backend_events.subscribe(self, self.on_backend)  # type: ignore[attr-defined]
        self.app.connection_changed.subscribe(self, self.on_connection)  # type: ignore[attr-defined]

    @property
    def table(self) -> LossTable:
        return self.query_one(LossTable)

    @property
    def curve(self) -> LossCurve:
        return self.query_one(LossCurve)

    @property
    def drawn(self) -> bool:
        """Every row received is in the table (none waits for the next draw)."""
        return not self._dirty and not self._reset_table

    @property
    def running(self) -> bool:
        return self.state in ("starting", "running", "stopping")

    # Events -------------------------------------------------------------------------------------

    def on_connection(self, change: ConnectionChanged) -> None:
        if change.state == GONE and self.running:
            self._show_line("no backend: the run goes on there (if it still runs); ctrl+r re-attaches")

    def on_backend(self, ev: P.Event) -> None:
        p, kind = ev.payload, ev.kind
        if kind == "job.started" and p.get("kind") == TRAIN_JOB:
            self._begin_job(p.get("job_id", ""))
        elif kind == "train.started":
            self._on_started(p)
        elif kind == "train.log":
            self._on_log(p)
        elif kind == "train.checkpoint":
            if p.get("job_id") == self.job_id:
                self.checkpoint = dict(p)
                self._show_info()
        elif kind == "train.alert":
            self._on_alert(ev)
        elif kind == "train.finished":
            self._on_finished(p)
        elif kind == "job.finished" and p.get("job_id") and p.get("job_id") == self.job_id:
            self._on_job_finished(p)

    def _begin_job(self, job_id: str) -> None:
        """A training job began: follow it (its rows replace the table's at ``train.started``)."""
        self.job_id, self.state = job_id, "starting"
        self.started, self.finished, self.checkpoint, self.alerts = None, None, None, []
        self.total_steps = 0
        self.query_one("#train-alert", Static).display = False
        self.query_one("#train-result", Static).display = False
        self._show_info()
        self._show_line()
        self._update_stop()

    def _on_started(self, p: dict[str, Any]) -> None:
        if p.get("job_id") != self.job_id or self.state not in ("starting", "running"):
            self._begin_job(p.get("job_id", ""))
        self.state = "running"
        self.started = dict(p)
        self.total_steps = int(p.get("total_steps") or 0)
        if self.table.set_columns(str((p.get("config") or {}).get("method") or "sft")):
            self._reset_table = True  # the rows are drawn again in the method's columns
            self._curve_dirty = True
            self._schedule_flush()
        self._new_rows(p.get("job_id", ""), int(p.get("start_step") or 0) if p.get("resumed_from") else None)
        self._show_info()
        self._show_line()
        self._update_stop()

    def _new_rows(self, job_id: str, keep_until: int | None) -> None:
        """The table's rows become ``job_id``'s; a resumed run keeps the rows up to its start."""
        if self.rows_job == job_id:
            return
        self.rows_job = job_id
        kept = {s: r for s, r in self.rows.items() if keep_until is not None and s <= keep_until}
        if kept != self.rows:
            self.rows = kept
            self.latest = self.rows[max(self.rows)] if self.rows else None
            self._reset_table = True
            self._curve_dirty = True
            self._schedule_flush()

    def _on_log(self, p: dict[str, Any]) -> None:
        job_id = p.get("job_id", "")
        if job_id != self.job_id:
            self._begin_job(job_id)  # a run we did not see start (its start was before our replay)
            self.state = "running"
        if job_id != self.rows_job:
            self._new_rows(job_id, None)
        step = p.get("step")
        if not isinstance(step, int):
            return
        row = self.rows.get(step)
        if row is None:
            row = self.rows[step] = {"step": step}
        for field in ROW_FIELDS:
            value = p.get(field)
            if value is not None:
                row[field] = value
        for name, value in (p.get("metrics") or {}).items():  # a preference method's own columns
            if value is not None:
                row[name] = value
        if p.get("total_steps"):
            self.total_steps = int(p["total_steps"])
        if self.latest is None or step >= self.latest["step"]:
            self.latest = row
        self._dirty.add(step)
        self._curve_dirty = True
        self._schedule_flush()

    def _on_alert(self, ev: P.Event) -> None:
        p = ev.payload
        self.alerts.append(dict(p))
        alert = self.query_one("#train-alert", Static)
        self._show_block(alert, alert_text(p))
        if time.time() - ev.time < NOTIFY_RECENT_S:
            self.notify(alert_text(p), title="Training alert", severity="error", timeout=15, markup=False)

    def _on_finished(self, p: dict[str, Any]) -> None:
        if p.get("job_id") != self.job_id:
            self.job_id = p.get("job_id", "")
        self.finished = dict(p)
        self.state = p.get("status") or "done"
        result = self.query_one("#train-result", Static)
        self._flush()
        self._show_block(result, finished_text(p))
        for cls, on in (("-done", self.state == "done"), ("-stopped", self.state == "stopped"),
                        ("-failed", self.state == "failed")):
            result.set_class(on, cls)
        self._update_stop()

    def _on_job_finished(self, p: dict[str, Any]) -> None:
        if self.finished is not None:
            return  # train.finished said it all
        status = p.get("status", "")
        self.state = {"done": "done", "cancelled": "cancelled"}.get(status, "failed")
        alert = self.query_one("#train-alert", Static)
        if status == "failed":
            self._show_block(alert, failed_text(p.get("error") or {}))
        elif status == "cancelled":
            self._stopped_early = f"■ stopped after {p.get('elapsed_s', 0):.1f} s, before training began"
        self._flush()
        self._update_stop()

    # Drawing ------------------------------------------------------------------------------------

    def _show_block(self, block: Static, text: str) -> None:
        """Show the alert or the result above the table; the table, shorter now, still shows
        its newest row if it did."""
        table = self.table
        following = table.row_count == 0 or table.cursor_row >= table.row_count - 1
        block.update(text)
        block.display = True
        if following:
            self.call_after_refresh(table.follow)

    def _schedule_flush(self) -> None:
        if self._flush_timer is None:
            delay = max(0.01, self._last_flush + FLUSH_INTERVAL_S - time.monotonic())
            self._flush_timer = self.set_timer(delay, self._flush)

    def _flush(self) -> None:
        """Draw what changed: table rows, curve, the live line."""
        if self._flush_timer is not None:
            self._flush_timer.stop()
            self._flush_timer = None
        if not self.is_attached:
            return
        self._last_flush = time.monotonic()
        if self._reset_table:
            self.table.reset_rows(self.rows)
            self._reset_table = False
            self._dirty.clear()
        elif self._dirty:
            self.table.show_rows(self.rows, self._dirty)
            self._dirty.clear()
        if self._curve_dirty:
            self._curve_dirty = False
            steps = sorted(self.rows)
            rows = [self.rows[s] for s in steps]
            self.curve.set_points([(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))],
                                  [(r["step"], r["eval_loss"]) for r in rows
                                   if isinstance(r.get("eval_loss"), (int, float))],
                                  [(r["step"], r[MARGIN]) for r in rows if isinstance(r.get(MARGIN), (int, float))])
        self.flushes += 1
        self._show_line()

    def _show_line(self, note: str = "") -> None:
        line = self.query_one("#train-live", Static)
        if not note and self.state == "cancelled" and self.latest is None:
            note = self._stopped_early or "■ stopped before training began"
        if note:
            line.update(note)
        elif not self.state:
            line.update(self.IDLE)
        else:
            text = live_line(self.latest, self.total_steps, self.state)
            if self.state == "starting":
                text = "▶ starting: loading the model and the dataset …" if self.latest is None else text
            elif self.state == "stopping":
                text += " · stopping: saving a checkpoint …"
            elif self.state == "cancelled":
                text += " · cancelled"
            line.update(("▶ " if self.state == "running" and not text.startswith("▶") else "") + text)
        for cls in ("-running", "-done", "-stopped", "-failed"):
            line.set_class(cls == f"-{self.state}" or (cls == "-running" and self.state in ("starting", "stopping")),
                           cls)

    def _show_info(self) -> None:
        info = self.query_one("#train-info", Static)
        parts = []
        if self.started:
            config = self.started.get("config") or {}
            if config.get("name"):
                parts.append(str(config["name"]))
            trainable, total = self.started.get("trainable_params"), self.started.get("total_params")
            if isinstance(trainable, int) and isinstance(total, int) and total:
                parts.append(f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
            processes = self.started.get("processes") or 1
            if isinstance(processes, int) and processes > 1:  # issue 19: a launched run
                strategy = (config.get("launch") or {}).get("strategy") or "ddp"
                parts.append(f"{processes} processes ({strategy}) · global batch {self.started.get('global_batch') or '?'}")
            if self.started.get("resumed_from"):
                parts.append(f"resumed from step {self.started.get('start_step', 0):,}")
            if self.started.get("output_dir"):
                parts.append(f"output {self.started['output_dir']}")
        if self.checkpoint:
            parts.append(f"checkpoint at step {self.checkpoint.get('step', 0):,}")
        info.update(" · ".join(parts))
        info.display = bool(parts)

    def _update_stop(self) -> None:
        self.query_one("#train-stop", Button).disabled = not (self.running and self.state != "stopping")
        self.refresh_bindings()

    # Actions ------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return True if self.running and self.state != "stopping" else None
        return True

    @on(Button.Pressed, "#train-stop")
    def _stop_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_stop()

    def action_stop(self) -> None:
        if self.running and self.state != "stopping":
            self.stop_run()

    @work(name="stop the run", group="train.stop", exclusive=True, exit_on_error=False)
    async def stop_run(self) -> None:
        """Ask the backend to stop the run gracefully (it saves a checkpoint first)."""
        await self.call(P.CancelJob(job_id=self.job_id))
        if self.running:
            self.state = "stopping"
            self._show_line()
            self._update_stop()

    def action_start(self) -> None:
        """f5 here is the LoRA tab's Start: the run set up there starts (or it says why not)."""
        from tui.widgets.lora.lora_pane import LoraPane

        for pane in self.screen.query(LoraPane):
            pane.sync_sections()
            pane.action_start()
            return
        self.notify("No LoRA tab to start a run from.", severity="warning", timeout=4)

    def action_follow(self) -> None:
        self.table.follow()
        self.table.focus()

    def action_toggle_curve(self) -> None:
        self.curve.display = not self.curve.display
