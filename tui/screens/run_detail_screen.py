"""RunDetailScreen: one run of the ledger in full (issue 18), from ``runs.show``: the loss table
and curve of every logged row, the config as stored, checkpoints (enter or ``u`` resumes from
one: the LoRA tab takes the run's config and that checkpoint), evaluations, errors and notices,
and the files it made, with their paths. ``n`` renames the run, ``d`` deletes it (asking first,
with what would go); escape goes back to the runs.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static, TabbedContent, TabPane

from backend import protocol_runs as R
from tui.widgets.sessions import runs_format as F
from tui.widgets.sessions.run_actions import RunActions
from tui.widgets.train.loss_curve import LossCurve
from tui.widgets.train.loss_table import LossTable
from tui.widgets.train.train_format import MARGIN, loss

#: The sub-tabs, in the order of their keys 1..6: (id, title).
TABS = (("run-rows", "Rows"), ("run-config", "Config"), ("run-checkpoints", "Checkpoints"),
        ("run-evaluations", "Evaluations"), ("run-errors", "Errors"), ("run-artifacts", "Files"))


def resume_hint(path: str) -> str:
    return f"qlw train RUN.toml --resume-from {path}"


class RunDetailScreen(RunActions, Screen):
    """The detail of the run ``record`` (a ``runs.list`` record; the rest is read on mount)."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", id="run.back", tooltip="Back to the runs."),
        Binding("u", "resume", "Resume from here", id="run.resume",
                tooltip="Resume from the highlighted checkpoint (Checkpoints tab; else the newest): "
                        "the LoRA tab takes this run's config and the checkpoint, f5 there starts."),
        Binding("n", "rename", "Rename", id="run.rename", tooltip="Give this run a new name."),
        Binding("d,delete", "delete", "Delete", id="run.delete",
                tooltip="Delete this run, its records and its files (asks first, saying what goes)."),
        Binding("r", "reload", "Refresh", id="run.refresh", tooltip="Read this run from the backend again."),
        *(Binding(str(n), f"show_tab('{tab}')", title, id=f"run.tab.{tab}", show=False,
                  tooltip=f"Show the {title} of this run.") for n, (tab, title) in enumerate(TABS, 1)),
    ]

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__()
        self.record = dict(record)
        self.run_id = str(record["id"])
        #: ``runs.show``'s detail, once read.
        self.detail: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        yield Static(F.summary_line(self.record), id="run-head", markup=False)
        with TabbedContent(id="run-tabs"):
            with TabPane("1 Rows", id="run-rows"):
                yield LossTable(id="run-loss-table")
                yield LossCurve(id="run-loss-curve")
            with TabPane("2 Config", id="run-config"):
                with VerticalScroll():
                    yield Static("", id="run-config-text", markup=False)
            with TabPane("3 Checkpoints", id="run-checkpoints"):
                yield DataTable(id="run-checkpoint-table", cursor_type="row", zebra_stripes=True)
                yield Static("", id="run-resume-hint", markup=False)
            with TabPane("4 Evaluations", id="run-evaluations"):
                yield DataTable(id="run-evaluation-table", cursor_type="row", zebra_stripes=True)
            with TabPane("5 Errors", id="run-errors"):
                with VerticalScroll():
                    yield Static("", id="run-errors-text", markup=False)
            with TabPane("6 Files", id="run-artifacts"):
                yield DataTable(id="run-artifact-table", cursor_type="row", zebra_stripes=True)
                yield Static("", id="run-logs", markup=False)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        checkpoints = self.query_one("#run-checkpoint-table", DataTable)
        checkpoints.add_column(Text("Step", justify="right"), key="step")
        checkpoints.add_column("On disk", key="exists")
        checkpoints.add_column("Path", key="path")
        artifacts = self.query_one("#run-artifact-table", DataTable)
        artifacts.add_column("Kind", key="kind")
        artifacts.add_column(Text("Size", justify="right"), key="size")
        artifacts.add_column("On disk", key="exists")
        artifacts.add_column("Path", key="path")
        self.load()

    @work(name="show the run", group="runs.show", exclusive=True, exit_on_error=False)
    async def load(self) -> None:
        result = await self.call(R.ShowRun(run=self.run_id))
        self.show(result.get("run") or {})

    def show(self, detail: dict[str, Any]) -> None:
        """Show ``runs.show``'s detail of this run."""
        self.detail = detail
        self.record = dict(detail.get("record") or self.record)
        self.query_one("#run-head", Static).update(F.summary_line(self.record))
        self._show_rows(detail.get("rows") or [])
        self.query_one("#run-config-text", Static).update(F.config_text(detail.get("config") or {}))
        self._show_checkpoints(detail.get("checkpoints") or [])
        self._show_evaluations(detail.get("evaluations") or [])
        self._show_errors(detail)
        self._show_files(detail)

    def _show_rows(self, rows: list[dict[str, Any]]) -> None:
        table = self.query_one(LossTable)
        table.set_columns(str(self.record.get("method") or "sft"))
        by_step = {}
        for r in rows:
            if isinstance(r.get("step"), int):
                by_step[r["step"]] = {**r, **(r.get("metrics") or {})}
        table.reset_rows(by_step)
        finite = [(s, r) for s, r in sorted(by_step.items())]
        self.query_one(LossCurve).set_points(
            [(s, r["loss"]) for s, r in finite if isinstance(r.get("loss"), (int, float))],
            [(s, r["eval_loss"]) for s, r in finite if isinstance(r.get("eval_loss"), (int, float))],
            [(s, r[MARGIN]) for s, r in finite if isinstance(r.get(MARGIN), (int, float))])

    def _show_checkpoints(self, checkpoints: list[dict[str, Any]]) -> None:
        table = self.query_one("#run-checkpoint-table", DataTable)
        table.clear()
        for i, c in enumerate(checkpoints):
            table.add_row(Text(str(c.get("step", "?")), justify="right"),
                          Text("yes" if c.get("exists") else "gone", style="" if c.get("exists") else "dim"),
                          Text(str(c.get("path", ""))), key=str(i))
        if checkpoints:
            table.move_cursor(row=len(checkpoints) - 1, animate=False)
        hint = self.query_one("#run-resume-hint", Static)
        if not checkpoints:
            hint.update("No checkpoints: this run saved none (training.save_steps).")
        else:
            hint.update(f"enter or u: resume from the highlighted checkpoint (the LoRA tab takes this run's config; "
                        f"f5 there starts) · headless: {resume_hint(str(checkpoints[-1].get('path', '')))}")

    def _show_evaluations(self, evaluations: list[dict[str, Any]]) -> None:
        table = self.query_one("#run-evaluation-table", DataTable)
        table.clear(columns=True)
        metrics = sorted({k for e in evaluations for k in (e.get("metrics") or {}) if k != "eval_loss"})
        table.add_column(Text("Step", justify="right"), key="step")
        table.add_column(Text("eval_loss", justify="right"), key="eval_loss")
        for name in metrics:
            table.add_column(Text(name, justify="right"), key=name)
        best = min((e["eval_loss"] for e in evaluations if isinstance(e.get("eval_loss"), (int, float))), default=None)
        best_style = f"bold {self.app.theme_variables.get('success', '')}".strip()
        for e in evaluations:
            m = e.get("metrics") or {}
            table.add_row(Text(str(e.get("step", "?")), justify="right"),
                          Text(loss(e.get("eval_loss")), justify="right",
                               style=best_style if best is not None and e.get("eval_loss") == best else ""),
                          *(Text(F.setting_value(m.get(name)), justify="right") for name in metrics))

    def _show_errors(self, detail: dict[str, Any]) -> None:
        text = F.error_lines(detail.get("errors") or [])
        notices = detail.get("notices") or []
        if notices:
            text += "\n\nNotices:\n" + "\n".join(f"  {n.get('status', '')}: {n.get('text', '')}" for n in notices)
        self.query_one("#run-errors-text", Static).update(text)

    def _show_files(self, detail: dict[str, Any]) -> None:
        table = self.query_one("#run-artifact-table", DataTable)
        table.clear()
        for i, a in enumerate(detail.get("artifacts") or []):
            table.add_row(Text(str(a.get("kind", ""))), Text(F.size(a.get("size")), justify="right"),
                          Text("yes" if a.get("exists") else "gone", style="" if a.get("exists") else "dim"),
                          Text(str(a.get("path", ""))), key=str(i))
        lines = [f"run folder: {self.record.get('run_dir') or F.MISSING}"]
        tensorboard = (detail.get("logs") or {}).get("tensorboard")
        if tensorboard:
            lines.append(f"TensorBoard: tensorboard --logdir {tensorboard}")
        for link in detail.get("links") or []:
            lines.append(f"{link.get('kind', '')}: {link.get('path', '')}")
        self.query_one("#run-logs", Static).update("\n".join(lines))

    # Actions -------------------------------------------------------------------------------------

    def action_show_tab(self, tab: str) -> None:
        self.query_one("#run-tabs", TabbedContent).active = tab

    def action_reload(self) -> None:
        self.load()

    def action_rename(self) -> None:
        self.rename_run(self.record)

    def action_delete(self) -> None:
        self.delete_run(self.record)

    def run_renamed(self, record: dict[str, Any]) -> None:
        self.load()

    def run_deleted(self, run_id: str) -> None:
        self.dismiss()

    @on(DataTable.RowSelected, "#run-checkpoint-table")
    def _checkpoint_chosen(self, event: DataTable.RowSelected) -> None:
        self.action_resume()

    def action_resume(self) -> None:
        checkpoints = (self.detail or {}).get("checkpoints") or []
        if not checkpoints:
            self.app.notify("This run saved no checkpoint to resume from.", severity="warning", markup=False)
            return
        table = self.query_one("#run-checkpoint-table", DataTable)
        shown = self.query_one("#run-tabs", TabbedContent).active == "run-checkpoints"
        index = table.cursor_row if shown and 0 <= table.cursor_row < len(checkpoints) else len(checkpoints) - 1
        self.resume_from(checkpoints[index])

    def resume_from(self, checkpoint: dict[str, Any]) -> None:
        """Hand this run's config and ``checkpoint`` to the LoRA tab and show it there."""
        path = str(checkpoint.get("path", ""))
        if not checkpoint.get("exists"):
            self.app.notify(f"{path} is gone: it cannot be resumed from.", severity="warning", markup=False)
            return
        from tui.widgets.lora.lora_pane import LoraPane

        main = self.app.screen_stack[0]
        panes = list(main.query(LoraPane))
        if not panes:
            self.app.notify(f"Resume it headless: {resume_hint(path)}", markup=False, timeout=10)
            return
        panes[0].resume_run((self.detail or {}).get("config") or {}, path, f"run {F.run_name(self.record)}")
        self.dismiss()
        main.action_show_tab("lora")  # type: ignore[attr-defined]
        self.app.notify(f"The LoRA tab resumes from {path} with the run's settings: f5 starts. "
                        f"Headless: {resume_hint(path)}", markup=False, timeout=8)
