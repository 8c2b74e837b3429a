"""RunCompareScreen: 2 to 6 runs of the ledger side by side (issue 18): their training and
validation loss curves overlaid on one plot (by step, or by tokens seen), the settings that
differ between their configs (``runs.diff``), and their evaluations step by step.

Everything is read from the backend when the screen opens (``runs.curves``, ``runs.diff``,
``runs.show`` of each run); ``r`` reads it again, ``t`` switches the x axis, escape goes back.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from backend import protocol_runs as R
from tui.widgets.backend_requests import BackendRequests
from tui.widgets.sessions.compare_curve import CompareCurve, legend
from tui.widgets.sessions.runs_format import named, setting_value, short
from tui.widgets.train.train_format import loss


class RunCompareScreen(BackendRequests, Screen):
    """The compare view of ``records`` (``runs.list`` records, in the order marked)."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", id="compare.back", tooltip="Back to the runs."),
        Binding("t", "toggle_x", "By tokens", id="compare.by-tokens",
                tooltip="Plot the curves against tokens seen instead of the step (and back)."),
        Binding("r", "reload", "Refresh", id="compare.refresh", tooltip="Read the runs' curves and settings again."),
    ]

    def __init__(self, records: list[dict[str, Any]]) -> None:
        super().__init__()
        self.records = list(records)
        self.ids = [r["id"] for r in self.records]
        #: The answers read: runs.diff's, and each run's evaluations (runs.show), by id.
        self.diff: dict[str, Any] | None = None
        self.evaluations: dict[str, list[dict[str, Any]]] = {}
        #: Set once everything was read and shown (tests wait for it).
        self.loaded = False

    def compose(self) -> ComposeResult:
        yield Static(f"Compare {len(self.records)} runs", id="compare-head", markup=False)
        yield Static(legend(self._names()), id="compare-legend")
        yield CompareCurve(id="compare-curve")
        with Horizontal(id="compare-tables"):
            with Vertical(id="compare-diff-box"):
                yield Static("Settings that differ", classes="compare-title")
                yield DataTable(id="compare-diff", cursor_type="row", zebra_stripes=True)
            with Vertical(id="compare-evals-box"):
                yield Static("Validation loss by step", classes="compare-title")
                yield DataTable(id="compare-evals", cursor_type="row", zebra_stripes=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.load()

    @property
    def curve(self) -> CompareCurve:
        return self.query_one(CompareCurve)

    def _names(self) -> list[str]:
        names = [str(r["name"]) if named(r) else str(r["id"]) for r in self.records]
        # Runs of the same name are told apart by their id.
        return [f"{n} ({r['id'][:6]})" if names.count(n) > 1 else n for n, r in zip(names, self.records)]

    def _titles(self) -> list[str]:
        return [short(n, 18) for n in self._names()]

    @work(name="compare the runs", group="runs.compare", exclusive=True, exit_on_error=False)
    async def load(self) -> None:
        self.loaded = False
        curves = await self.call(R.RunCurves(runs=self.ids))
        diff = await self.call(R.DiffRuns(runs=self.ids))
        evaluations = {}
        for rid in self.ids:
            detail = (await self.call(R.ShowRun(run=rid))).get("run") or {}
            evaluations[rid] = detail.get("evaluations") or []
        self.show(curves.get("curves") or [], diff, evaluations)

    def show(self, curves: list[dict[str, Any]], diff: dict[str, Any], evaluations: dict[str, list[dict[str, Any]]]
             ) -> None:
        """Show what was read: ``runs.curves``' curves, ``runs.diff``'s answer, the runs'
        evaluations by id."""
        by_id = {c.get("id"): c for c in curves}
        # The curves in the compared order, named as the legend names them.
        self.curve.set_curves([{**by_id.get(rid, {"id": rid}), "name": name}
                               for rid, name in zip(self.ids, self._names())])
        self.diff, self.evaluations = diff, evaluations
        self._show_diff()
        self._show_evaluations()
        self.loaded = True

    def _show_diff(self) -> None:
        table = self.query_one("#compare-diff", DataTable)
        table.clear(columns=True)
        table.add_column("Setting", key="setting")
        for i, title in enumerate(self._titles()):
            table.add_column(title, key=f"run{i}")
        rows = (self.diff or {}).get("rows") or []
        if not rows:
            table.add_row(Text("(no setting differs)", style="dim"), *[""] * len(self.ids))
        for row in rows:
            table.add_row(Text(str(row.get("setting", ""))),
                          *(Text(setting_value(v)) for v in row.get("values") or []), key=row.get("setting"))

    def _show_evaluations(self) -> None:
        table = self.query_one("#compare-evals", DataTable)
        table.clear(columns=True)
        table.add_column(Text("Step", justify="right"), key="step")
        for i, title in enumerate(self._titles()):
            table.add_column(Text(title, justify="right"), key=f"run{i}")
        by_step: dict[int, dict[int, float]] = {}
        for i, rid in enumerate(self.ids):
            for e in self.evaluations.get(rid) or []:
                if isinstance(e.get("step"), int) and isinstance(e.get("eval_loss"), (int, float)):
                    by_step.setdefault(e["step"], {})[i] = e["eval_loss"]
        if not by_step:
            table.add_row(Text("none", style="dim"), *[""] * len(self.ids))
        best_style = f"bold {self.app.theme_variables.get('success', '')}".strip()
        for step in sorted(by_step):
            values = by_step[step]
            best = min(values.values()) if len(values) > 1 else None
            table.add_row(Text(str(step), justify="right"),
                          *(Text(loss(values.get(i)), justify="right",
                                 style=best_style if best is not None and values.get(i) == best else "")
                            for i in range(len(self.ids))), key=str(step))

    def action_toggle_x(self) -> None:
        by_tokens = not self.curve.by_tokens
        self.curve.set_by_tokens(by_tokens)
        self.query_one("#compare-legend", Static).update(legend(self._names(), by_tokens))

    def action_reload(self) -> None:
        self.load()
