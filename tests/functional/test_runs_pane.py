"""The Runs tab (issue 18): the runs ledger as a table (sort, filter, marks), a run's detail,
the compare view, rename, delete, and the bell of ``run.notice``.

Two kinds of test: most feed the pane fixed answers of the ``runs.*`` requests (a stand-in for
``BackendRequests.call``: fixed names, times and paths, so snapshots are the same everywhere);
the last ones train three tiny runs that differ only in learning_rate against a real backend
and drive the tab on them. Waits poll a condition with a timeout, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import copy
import math
import time
from typing import Any

import pytest
from textual.notifications import Notify
from textual.widgets import DataTable, Input

from backend import protocol as P, protocol_runs as R
from tests.functional.helpers import make_app, until, without_backend
from tui.app import QlwApp
from tui.client import RequestFailed
from tui.messages import BackendEvent
from tui.modals.confirm_screen import ConfirmScreen
from tui.modals.rename_screen import RenameScreen
from tui.screens.run_compare_screen import RunCompareScreen
from tui.screens.run_detail_screen import RunDetailScreen
from tui.widgets.sessions import runs_format as F
from tui.widgets.sessions.runs_pane import RunsPane
from tui.widgets.train.loss_table import LossTable

SMALL, LARGE = (80, 24), (200, 50)
T0 = 1_700_000_000.0
HOME = "/data/qlw"


# Fixed answers ---------------------------------------------------------------------------------


def record(rid: str, name: str, lr: float, status: str = "finished", **extra) -> dict[str, Any]:
    base = {"id": rid, "name": name, "method": "sft", "base_model": "(embedded tiny model)",
            "dataset": "(shipped sample)", "status": status, "created": T0, "updated": T0 + 60, "step": 40,
            "total_steps": 40, "loss": 1.2 + lr * 100, "best_eval_loss": 1.3 + lr * 100, "best_eval_step": 40,
            "last_eval_loss": 1.3 + lr * 100, "tokens_per_s": 1000 + lr * 1e5, "duration_s": 95.0,
            "adapter_path": f"{HOME}/runs/{rid}/adapter", "adapter_bytes": 812_000, "merged": False,
            "exported": False, "uploaded": False, "run_dir": f"{HOME}/runs/{rid}"}
    return {**base, **extra}


RUNS = [
    record("20261207-1405-c3", "lr 0.003", 3e-3, merged=True, exported=True),
    record("20261207-1402-b2", "lr 0.002", 2e-3, tokens_per_s=2500.0),
    record("20261207-1400-a1", "lr 0.001", 1e-3, uploaded=True),
    record("20261207-1358-f0", "20261207-1358-f0", 1e-3, status="failed", step=3, best_eval_loss=None,
           best_eval_step=None, last_eval_loss=None, tokens_per_s=None, duration_s=4.0, adapter_path="",
           adapter_bytes=None),
]


def curve_of(rid: str, lr: float) -> dict[str, Any]:
    train = [[s, round(2.0 * math.exp(-s * lr * 30) + 0.5, 4)] for s in range(2, 41, 2)]
    evals = [[s, round(2.1 * math.exp(-s * lr * 30) + 0.55, 4)] for s in (10, 20, 30, 40)]
    return {"id": rid, "name": "", "train": train, "eval": evals,
            "train_by_tokens": [[s * 512, v] for s, v in train], "eval_by_tokens": [[s * 512, v] for s, v in evals]}


RATES = {r["id"]: lr for r, lr in zip(RUNS, (3e-3, 2e-3, 1e-3, 1e-3))}


def detail_of(rid: str) -> dict[str, Any]:
    rec = next(r for r in RUNS if r["id"] == rid)
    curve = curve_of(rid, RATES[rid])
    evals = dict(curve["eval"])
    rows = [{"step": s, "loss": v, "eval_loss": evals.get(s), "learning_rate": RATES[rid], "grad_norm": 0.5,
             "tokens_per_s": 1500.0, "metrics": {}} for s, v in curve["train"]]
    config = {"name": rec["name"], "method": "sft", "model": {"source": "(embedded tiny model)", "precision": "fp32"},
              "lora": {"r": 8, "lora_alpha": 16}, "training": {"learning_rate": RATES[rid], "max_steps": 40}}
    return {"record": rec, "config": config, "rows": rows,
            "checkpoints": [{"step": 20, "path": f"{HOME}/runs/{rid}/checkpoint-20", "exists": True},
                            {"step": 40, "path": f"{HOME}/runs/{rid}/checkpoint-40", "exists": True}],
            "evaluations": [{"step": s, "eval_loss": v, "metrics": {}} for s, v in curve["eval"]],
            "errors": [], "notices": [{"status": "finished", "text": f"run {rec['name']} finished"}],
            "artifacts": [{"kind": "adapter", "path": f"{HOME}/runs/{rid}/adapter", "size": 812_000,
                           "created": T0, "exists": True}],
            "logs": {"tensorboard": ""}, "summary": {}, "links": []}


class FakeLedger:
    """Answers the runs.* requests from the fixed runs (rename and delete change them)."""

    def __init__(self) -> None:
        self.runs = copy.deepcopy(RUNS)
        self.requests: list[Any] = []

    async def call(self, pane, params, timeout=30.0) -> dict[str, Any]:
        self.requests.append(params)
        if isinstance(params, R.ListRuns):
            return {"runs": copy.deepcopy(self.runs)}
        if isinstance(params, R.RunCurves):
            return {"curves": [{**curve_of(r, RATES[r]), "name": self._name(r)} for r in params.runs]}
        if isinstance(params, R.DiffRuns):
            rows = [{"setting": "training.learning_rate", "values": [RATES[r] for r in params.runs]}]
            return {"runs": [{"id": r, "name": self._name(r)} for r in params.runs], "rows": rows, "markdown": ""}
        if isinstance(params, R.ShowRun):
            return {"run": detail_of(params.run)}
        if isinstance(params, R.RenameRun):
            rec = next(r for r in self.runs if r["id"] == params.run)
            rec["name"] = params.name
            return {"run": dict(rec)}
        if isinstance(params, R.DeleteRun):
            plan = {"run": params.run, "name": self._name(params.run), "paths": [f"{HOME}/runs/{params.run}"],
                    "bytes": 3 * 2**20, "kept": []}
            if not params.confirm:
                raise RequestFailed(P.Reply("", "refused", plan, reason="confirm", code=P.CONFIRM))
            self.runs = [r for r in self.runs if r["id"] != params.run]
            return {"deleted": params.run, "paths": plan["paths"], "bytes": plan["bytes"], "kept": []}
        if isinstance(params, P.ListSessions):
            return {"sessions": []}
        raise AssertionError(f"unexpected request {params!r}")

    def _name(self, rid: str) -> str:
        return next(r["name"] for r in self.runs if r["id"] == rid)


@pytest.fixture
def ledger(monkeypatch) -> FakeLedger:
    fake = FakeLedger()

    async def call(self, params, timeout=30.0):
        return await fake.call(self, params, timeout)

    monkeypatch.setattr("tui.widgets.backend_requests.BackendRequests.call", call)
    return fake


# Helpers ------------------------------------------------------------------------------------------


def pane(app: QlwApp) -> RunsPane:
    return app.screen_stack[0].query_one(RunsPane)


def rows(table: DataTable) -> list[list[str]]:
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def column(table: DataTable, key: str) -> list[str]:
    index = list(table.columns).index(key)
    return [r[index] for r in rows(table)]


async def show_runs(pilot) -> RunsPane:
    """The Runs tab with the fixed runs read (no backend: the pane is asked to read them)."""
    app = pilot.app
    await without_backend(pilot)
    await pilot.press("8")
    rp = pane(app)
    rp.refresh_runs()
    await until(pilot, lambda: rp.reads >= 1, "the runs read")
    await pilot.pause()
    return rp


async def mark(pilot, rp: RunsPane, names: list[str]) -> None:
    for name in names:
        rid = next(r["id"] for r in rp.records if r["name"] == name)
        rp.table.move_cursor(row=rp.shown.index(rid))
        await pilot.press("space")


# Tests with fixed answers ---------------------------------------------------------------------------


def test_table_sorts_filters_and_marks(qlw_home, ledger):
    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=LARGE) as pilot:
            rp = await show_runs(pilot)
            table = rp.table
            assert column(table, "name") == ["lr 0.003", "lr 0.002", "lr 0.001", "(unnamed 20261207)"]
            first = rows(table)[0]
            assert first[1:10] == ["lr 0.003", "finished", "40/40", "1.6000", "1.6000", "1,300", "1:35",
                                   "793 KiB", "ME·"]
            assert column(table, "flags") == ["ME·", "···", "··U", "···"]
            assert column(table, "best_eval_loss")[3] == "—"
            assert app.screen.focused is table

            # s: the next column (Run, then Status, ... ); S reverses; a header click sorts by it.
            await pilot.press("s")
            assert rp.sort_key == "name" and column(table, "name")[0] == "(unnamed 20261207)"
            rp.sort_by("best_eval_loss")
            await pilot.pause()
            assert column(table, "name") == ["lr 0.001", "lr 0.002", "lr 0.003", "(unnamed 20261207)"]
            assert str(table.columns[next(k for k in table.columns if k.value == "best_eval_loss")].label) == "Best val ▲"
            await pilot.press("S")
            # A run without the figure stays last either way.
            assert column(table, "name") == ["lr 0.003", "lr 0.002", "lr 0.001", "(unnamed 20261207)"]
            rp.sort_by("tokens_per_s", reverse=True)
            await pilot.pause()
            assert column(table, "name")[0] == "lr 0.002"
            table.post_message(DataTable.HeaderSelected(table, next(k for k in table.columns if k.value == "status"),
                                                        2, table.columns[next(k for k in table.columns
                                                                              if k.value == "status")].label))
            await until(pilot, lambda: rp.sort_key == "status", "the header's sort")
            assert column(table, "status")[0] == "failed"

            # The filter: words in any column, column:value, numbers compared.
            await pilot.press("slash")
            assert isinstance(app.screen.focused, Input)
            for query, names in (("status:failed", ["(unnamed 20261207)"]),
                                 ("best:<1.45", ["lr 0.001"]),
                                 ("merged:yes", ["lr 0.003"]),
                                 ("0.00 tok:>1500", ["lr 0.002"]),
                                 ("a1", ["lr 0.001"]),
                                 ("nothing-like-this", [])):
                rp.query_one("#runs-filter", Input).value = query
                await until(pilot, lambda: sorted(column(table, "name")) == sorted(names), f"the filter {query!r}")
            assert "No run matches the filter (4 runs in all)" in str(rp.query_one("#run-line").content)
            rp.query_one("#runs-filter", Input).value = ""
            await pilot.press("enter")  # back to the table
            assert app.screen.focused is table
            rp.sort_by(None)
            await pilot.pause()

            # Marks: space marks and unmarks; at most six; c needs two.
            await pilot.press("c")
            assert not isinstance(app.screen, RunCompareScreen)
            await mark(pilot, rp, ["lr 0.001", "lr 0.002"])
            assert column(table, "mark")[1:3] == [F.MARK, F.MARK]
            await pilot.press("space")  # unmark lr 0.002
            assert rp.marked == ["20261207-1400-a1"]
            assert "1 marked" in str(rp.query_one("#run-line").content)
            # Marks survive a refresh.
            rp.refresh_runs()
            await until(pilot, lambda: rp.reads >= 2, "a second read")
            assert column(table, "mark")[2] == F.MARK

    asyncio.run(body())


def test_compare_overlays_the_curves_and_shows_the_diff(qlw_home, ledger):
    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=LARGE) as pilot:
            rp = await show_runs(pilot)
            await mark(pilot, rp, ["lr 0.001", "lr 0.002", "lr 0.003"])
            await pilot.press("c")
            await until(pilot, lambda: isinstance(app.screen, RunCompareScreen) and app.screen.loaded, "the compare view")
            screen = app.screen
            series = screen.curve.series()
            assert [name for name, _, _ in series] == ["lr 0.001", "lr 0.002", "lr 0.003"]
            assert all(len(train) == 20 and len(evals) == 4 for _, train, evals in series)
            assert series[0][1][0][0] == 2  # by step
            diff = screen.query_one("#compare-diff", DataTable)
            assert rows(diff) == [["training.learning_rate", "0.001", "0.002", "0.003"]]
            evals = screen.query_one("#compare-evals", DataTable)
            assert [r[0] for r in rows(evals)] == ["10", "20", "30", "40"]
            assert [str(c.label) for c in evals.columns.values()] == ["Step", "lr 0.001", "lr 0.002", "lr 0.003"]
            await pilot.press("t")
            assert screen.curve.by_tokens and screen.curve.series()[0][1][0][0] == 1024
            assert "tokens seen" in str(screen.query_one("#compare-legend").content)
            await pilot.press("escape")
            assert isinstance(app.screen.query_one(RunsPane), RunsPane)

    asyncio.run(body())


def test_detail_shows_rows_config_checkpoints_and_resumes(qlw_home, ledger):
    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=LARGE) as pilot:
            rp = await show_runs(pilot)
            await pilot.press("down", "enter")
            await until(pilot, lambda: isinstance(app.screen, RunDetailScreen) and app.screen.detail is not None,
                        "the run's detail")
            screen = app.screen
            assert screen.run_id == "20261207-1402-b2"
            table = screen.query_one(LossTable)
            assert table.row_count == 20 and rows(table)[4][:3] == ["10", "1.5976", "1.7025"]
            assert "training.learning_rate = 0.002" in str(screen.query_one("#run-config-text").content)
            await pilot.press("3")
            checkpoints = screen.query_one("#run-checkpoint-table", DataTable)
            assert column(checkpoints, "step") == ["20", "40"]
            assert "--resume-from /data/qlw/runs/20261207-1402-b2/checkpoint-40" in str(
                screen.query_one("#run-resume-hint").content)
            await pilot.press("6")
            assert rows(screen.query_one("#run-artifact-table", DataTable))[0] == [
                "adapter", "793 KiB", "yes", "/data/qlw/runs/20261207-1402-b2/adapter"]
            await pilot.press("3")
            checkpoints.focus()
            checkpoints.move_cursor(row=0)
            await pilot.press("enter")  # resume from checkpoint-20
            await until(pilot, lambda: not isinstance(app.screen, RunDetailScreen), "back to the shell")
            from textual.widgets import TabbedContent

            from tui.widgets.lora.lora_pane import LoraPane

            assert app.screen.query_one("#tabs", TabbedContent).active == "lora"
            lora = app.screen.query_one(LoraPane)
            assert lora._wanted_resume == "/data/qlw/runs/20261207-1402-b2/checkpoint-20"
            assert lora.state()["resume"] == "/data/qlw/runs/20261207-1402-b2/checkpoint-20"

    asyncio.run(body())


def test_rename_and_delete_with_fixed_answers(qlw_home, ledger):
    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=LARGE) as pilot:
            rp = await show_runs(pilot)
            await pilot.press("n")
            await until(pilot, lambda: isinstance(app.screen, RenameScreen), "the rename dialog")
            field = app.screen.query_one(Input)
            assert field.value == "lr 0.003"
            field.value = "best so far"
            await pilot.press("enter")
            await until(pilot, lambda: "best so far" in column(rp.table, "name"), "the new name")
            assert R.RenameRun(run="20261207-1405-c3", name="best so far") in ledger.requests

            await pilot.press("down", "d")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirm dialog")
            detail = str(app.screen.query_one("#confirm-detail").content)
            assert "1 path(s), 3.0 MiB" in detail and "/data/qlw/runs/20261207-1402-b2" in detail
            await pilot.press("n")  # keep it
            await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), "the dialog closed")
            assert not any(isinstance(r, R.DeleteRun) and r.confirm for r in ledger.requests)
            await pilot.press("d")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirm dialog again")
            await pilot.press("y")
            await until(pilot, lambda: "lr 0.002" not in column(rp.table, "name"), "the run gone")
            assert R.DeleteRun(run="20261207-1402-b2", confirm=True) in ledger.requests

    asyncio.run(body())


def test_run_notice_rings_the_bell_and_shows_its_text(qlw_home, ledger):
    notes: list[tuple[str, str]] = []

    def hook(message):
        if isinstance(message, Notify):
            notes.append((message.notification.title, message.notification.message))

    async def body():
        app = make_app(qlw_home)
        bells: list[int] = []
        app.bell = lambda: bells.append(1)  # type: ignore[method-assign]
        async with app.run_test(size=SMALL, message_hook=hook) as pilot:
            await without_backend(pilot)
            now = time.time()
            for status, seq in (("finished", 1), ("stalled", 2), ("failed", 3)):
                payload = {"session": "s1", "run": "s1", "status": status, "text": f"run demo {status} at step 7"}
                P.build(P.EVENTS["run.notice"], payload, "run.notice")
                app.post_message(BackendEvent(P.Event("run.notice", payload, now, session="s1", seq=seq)))
            # A notice replayed from long ago only refreshes the list.
            app.post_message(BackendEvent(P.Event("run.notice", {**payload, "text": "old"}, now - 3600,
                                                  session="s1", seq=4)))
            await until(pilot, lambda: len(bells) == 3 and len(notes) >= 3, "three bells")
            assert ("Run finished", "run demo finished at step 7") in notes
            assert ("Run stalled", "run demo stalled at step 7") in notes
            assert ("Run failed", "run demo failed at step 7") in notes
            assert not any(text == "old" for _, text in notes)

    asyncio.run(body())


# Snapshots: the ledger and the compare view at 80x24 and 200x50 -------------------------------------


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["80x24", "200x50"])
def test_ledger_snapshot(snap_compare, qlw_home, ledger, size):
    async def settle(pilot):
        rp = await show_runs(pilot)
        await mark(pilot, rp, ["lr 0.001", "lr 0.003"])
        await pilot.press("up")
        await pilot.pause(0.2)

    assert snap_compare(make_app(qlw_home), terminal_size=size, run_before=settle)


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["80x24", "200x50"])
def test_compare_snapshot(snap_compare, qlw_home, ledger, size):
    async def settle(pilot):
        app = pilot.app
        rp = await show_runs(pilot)
        await mark(pilot, rp, ["lr 0.001", "lr 0.002", "lr 0.003"])
        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, RunCompareScreen) and app.screen.loaded, "the compare view")
        await pilot.pause(0.2)

    assert snap_compare(make_app(qlw_home), terminal_size=size, run_before=settle)
