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
import re
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
            assert column(table, "name") == ["lr 0.003", "lr 0.002", "lr 0.001", "(unnamed)"]
            first = rows(table)[0]
            assert first[1:10] == ["lr 0.003", "finished", "40/40", "1.6000", "1.6000", "1,300", "1:35",
                                   "793 KiB", "ME·"]
            assert column(table, "flags") == ["ME·", "···", "··U", "···"]
            assert column(table, "best_eval_loss")[3] == "—"
            assert app.screen.focused is table

            # s: the next column (Run, then Status, ... ); S reverses; a header click sorts by it.
            await pilot.press("s")
            assert rp.sort_key == "name" and column(table, "name")[0] == "(unnamed)"
            rp.sort_by("best_eval_loss")
            await pilot.pause()
            assert column(table, "name") == ["lr 0.001", "lr 0.002", "lr 0.003", "(unnamed)"]
            assert str(table.columns[next(k for k in table.columns if k.value == "best_eval_loss")].label) == "Best val ▲"
            await pilot.press("S")
            # A run without the figure stays last either way.
            assert column(table, "name") == ["lr 0.003", "lr 0.002", "lr 0.001", "(unnamed)"]
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
            for query, names in (("status:failed", ["(unnamed)"]),
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


# Against a real backend: three tiny runs that differ only in learning_rate ------------------------

LRS = (1e-3, 2e-3, 3e-3)


async def train_runs(home) -> list[str]:
    """Train one tiny run per learning rate through train.start, one after the other; their
    session ids, in order."""
    from tests.functional.helpers import tiny_run_config
    from tests.waits import Budget
    from tui.client import Connection

    events: list[P.Event] = []
    conn = await Connection.open(P.socket_path(home), "test-runs", events.append)
    ids = []
    try:
        await conn.call(P.Attach())
        for lr in LRS:
            config = tiny_run_config(steps=4)
            config["name"] = f"lr {lr:g}"
            config["training"].update(learning_rate=lr, eval_steps=2, seed=3)
            job = (await conn.call(P.StartTraining(config=config)))["job_id"]
            budget = Budget(180)
            while not any(e.kind == "job.finished" and e.payload.get("job_id") == job for e in events):
                assert not budget.spent(), (home / "backend-test.log").read_text()[-2000:]
                await asyncio.sleep(0.1)
            done = next(e for e in events if e.kind == "job.finished" and e.payload.get("job_id") == job)
            assert done.payload["status"] == "done", done.payload
            ids.append(next(e.session for e in events if e.kind == "job.started" and e.payload.get("job_id") == job))
    finally:
        await conn.close()
    return ids


@pytest.fixture(scope="module")
def three_runs(tiny_folder):
    """A backend on a data home holding three finished tiny runs (lr 0.001, 0.002, 0.003): the
    home and the runs' ids. Trained once for the module's tests."""
    import shutil
    import tempfile
    from pathlib import Path

    from backend import tiny
    from tests.conftest import start_backend, stop_backend

    home = Path(tempfile.mkdtemp(prefix="qlw-", dir="/tmp"))
    shutil.copytree(tiny_folder, tiny.tiny_model_path(home))
    proc = start_backend(home)
    try:
        ids = asyncio.run(train_runs(home))
        yield home, ids
    finally:
        stop_backend(proc)
        shutil.rmtree(home, ignore_errors=True)


async def connected_runs_tab(pilot, count: int) -> RunsPane:
    app = pilot.app
    await until(pilot, lambda: app.connection.state == "connected", "connected", timeout=20)
    await pilot.press("8")
    rp = pane(app)
    await until(pilot, lambda: len(rp.records) == count, f"{count} runs listed", timeout=20)
    await pilot.pause()
    return rp


@pytest.mark.slow
def test_three_tiny_runs_listed_compared_and_opened(three_runs):
    home, ids = three_runs

    async def body():
        app = make_app(home)
        async with app.run_test(size=LARGE) as pilot:
            rp = await connected_runs_tab(pilot, 3)
            table = rp.table
            assert column(table, "name") == ["lr 0.003", "lr 0.002", "lr 0.001"]  # newest first
            assert column(table, "id") == ids[::-1]
            assert column(table, "status") == ["finished"] * 3 and column(table, "steps") == ["4/4"] * 3
            for r in rp.records:
                cells = dict(zip(table.columns, rows(table)[rp.shown.index(r["id"])]))
                assert str(cells["best_eval_loss"]) == f"{r['best_eval_loss']:.4f}"
                assert str(cells["last_eval_loss"]) == f"{r['last_eval_loss']:.4f}"
                assert r["tokens_per_s"] > 0 and str(cells["tokens_per_s"]) != "—"
                assert r["adapter_bytes"] > 0 and str(cells["adapter_bytes"]).endswith("iB")
                assert r["method"] == "sft" and str(cells["flags"]) == "···"

            # Compare: the three curves on one plot, and only learning_rate differs.
            await mark(pilot, rp, ["lr 0.001", "lr 0.002", "lr 0.003"])
            await pilot.press("c")
            await until(pilot, lambda: isinstance(app.screen, RunCompareScreen) and app.screen.loaded,
                        "the compare view", timeout=20)
            screen = app.screen
            series = screen.curve.series()
            assert [name for name, _, _ in series] == ["lr 0.001", "lr 0.002", "lr 0.003"]
            assert [[s for s, _ in train] for _, train, _ in series] == [[1, 2, 3, 4]] * 3
            assert [[s for s, _ in evals] for _, _, evals in series] == [[2, 4]] * 3
            assert len({tuple(train) for _, train, _ in series}) == 3  # three different curves
            assert rows(screen.query_one("#compare-diff", DataTable)) == [
                ["training.learning_rate", "0.001", "0.002", "0.003"]]
            assert [r[0] for r in rows(screen.query_one("#compare-evals", DataTable))] == ["2", "4"]
            await pilot.press("t")
            assert all(train for _, train, _ in screen.curve.series())  # the rows counted their tokens
            await pilot.press("escape")

            # Enter on a run: its rows.
            rp.table.move_cursor(row=rp.shown.index(ids[1]))
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, RunDetailScreen) and app.screen.detail is not None,
                        "the run's detail", timeout=20)
            detail = app.screen
            assert detail.run_id == ids[1]
            assert [r[0] for r in rows(detail.query_one(LossTable))] == ["1", "2", "3", "4"]
            assert rows(detail.query_one(LossTable))[1][2] != "—"  # step 2's validation loss
            assert re.search(r"^training\.learning_rate +=\s0\.002$", str(detail.query_one("#run-config-text").content),
                             re.M)
            assert column(detail.query_one("#run-checkpoint-table", DataTable), "step") == ["4"]
            kinds = column(detail.query_one("#run-artifact-table", DataTable), "kind")
            assert {"adapter", "checkpoint"} <= set(kinds)

    asyncio.run(body())


@pytest.mark.slow
def test_rename_and_delete_a_tiny_run(three_runs):
    home, ids = three_runs

    async def body():
        app = make_app(home)
        async with app.run_test(size=LARGE) as pilot:
            rp = await connected_runs_tab(pilot, 3)
            rp.table.move_cursor(row=rp.shown.index(ids[0]))
            await pilot.press("n")
            await until(pilot, lambda: isinstance(app.screen, RenameScreen), "the rename dialog")
            app.screen.query_one(Input).value = "baseline"
            await pilot.press("enter")
            # The backend's session.renamed event refreshes the list.
            await until(pilot, lambda: "baseline" in column(rp.table, "name"), "the new name", timeout=20)
            assert rp.highlighted == ids[0]

            folder = home / "runs" / ids[0]
            assert folder.is_dir()
            await pilot.press("d")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirm dialog", timeout=20)
            text = str(app.screen.query_one("#confirm-detail").content)
            assert str(folder.resolve()) in text and "1 path(s)" in text and "iB" in text
            assert "'baseline'" in str(app.screen.query_one("#confirm-question").content)
            await pilot.press("y")
            await until(pilot, lambda: len(rp.records) == 2, "the run gone", timeout=20)
            assert not folder.exists() and (home / "runs" / ids[1]).is_dir()
            assert column(rp.table, "name") == ["lr 0.003", "lr 0.002"]

    asyncio.run(body())


@pytest.mark.parametrize("tab", ["1", "3"], ids=["rows", "checkpoints"])
def test_detail_snapshot(snap_compare, qlw_home, ledger, tab):
    async def settle(pilot):
        app = pilot.app
        await show_runs(pilot)
        await pilot.press("down", "enter")
        await until(pilot, lambda: isinstance(app.screen, RunDetailScreen) and app.screen.detail is not None,
                    "the run's detail")
        await pilot.press(tab)
        await pilot.pause(0.2)

    assert snap_compare(make_app(qlw_home), terminal_size=SMALL, run_before=settle)
