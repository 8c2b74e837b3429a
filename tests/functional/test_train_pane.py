"""The Train tab: the live line, the loss table (training and evaluation logs merged by step), the
loss curve, alerts, the result and Stop.

The pane is drawn from the run's events, so these tests feed synthetic ``train.*`` events the
way the app delivers the backend's (a ``BackendEvent`` posted to the app, fanned out through
``app.backend_events``), with no backend: they check the protocol's contract, not a particular
run. Waits poll a condition with a timeout, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import math
import time

from textual.notifications import Notify

from backend import protocol as P
from tests.functional.helpers import make_app, until, without_backend
from tui.app import QlwApp
from tui.messages import BackendEvent
from tui.widgets.train.loss_curve import LossCurve
from tui.widgets.train.loss_table import LossTable
from tui.widgets.train.train_format import duration, finished_text, live_line
from tui.widgets.train.train_pane import TrainPane

SIZE = (100, 30)
T0 = 1_700_000_000.0


# Helpers ------------------------------------------------------------------------------------


class Run:
    """Synthetic events of one session, numbered as the backend numbers them; each payload is
    checked against the protocol's dataclass."""

    def __init__(self, session: str = "s1", t0: float = T0):
        self.session, self.seq, self.t0 = session, 0, t0

    def event(self, kind: str, /, **payload) -> P.Event:
        P.build(P.EVENTS[kind], payload, kind)  # the payload is what the protocol says
        self.seq += 1
        return P.Event(kind, payload, self.t0 + self.seq, session=self.session, seq=self.seq)

    def start(self, job_id: str = "j1", total_steps: int = 100, **extra) -> list[P.Event]:
        return [self.event("job.started", job_id=job_id, kind="train.start", params={}),
                self.event("train.started", job_id=job_id, config={"name": "demo run"}, total_steps=total_steps,
                           trainable_params=1_179_648, total_params=688_768 + 1_179_648,
                           output_dir="/data/qlw/runs/s1", **extra)]

    def log(self, step: int, total: int = 100, job_id: str = "j1", **fields) -> P.Event:
        return self.event("train.log", job_id=job_id, step=step, total_steps=total, epoch=step / total,
                          elapsed_s=step * 1.5, eta_s=(total - step) * 1.5, **fields)


def curve_loss(step: int) -> float:
    return round(2.0 * math.exp(-step / 40) + 0.5, 6)


def send(app: QlwApp, events: list[P.Event]) -> None:
    for ev in events:
        app.post_message(BackendEvent(ev))


def pane(app: QlwApp) -> TrainPane:
    return app.screen_stack[0].query_one(TrainPane)


def rows(table: LossTable) -> list[list[str]]:
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def text_of(app: QlwApp, selector: str) -> str:
    return str(pane(app).query_one(selector).render())


async def show_train_tab(pilot) -> None:
    app = pilot.app
    await without_backend(pilot)
    app.screen.action_show_tab("train")  # as its number key does (numbers follow the tab order)
    await pilot.pause()


# Tests --------------------------------------------------------------------------------------


def test_table_merges_evaluation_rows_and_the_line_follows(qlw_home):
    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=SIZE) as pilot:
            await show_train_tab(pilot)
            tp = pane(app)
            assert text_of(app, "#train-live") == TrainPane.IDLE
            assert tp.query_one("#train-stop").disabled

            run = Run()
            send(app, run.start(total_steps=100))
            await until(pilot, lambda: tp.state == "running", "the run's start")
            assert "trainable 1,179,648 of 1,868,416 (63.14%)" in text_of(app, "#train-info")
            assert not tp.query_one("#train-stop").disabled

            send(app, [run.log(10, loss=2.5, learning_rate=2e-4, grad_norm=1.25, tokens_per_s=1234.4),
                       run.log(20, loss=2.25, learning_rate=1.8e-4, grad_norm=0.9, tokens_per_s=1300.0),
                       # The evaluation of step 20 completes its row; it does not add one.
                       run.log(20, eval_loss=2.4)])
            await until(pilot, lambda: tp.table.row_count == 2 and "2.4000" in str(rows(tp.table)), "two rows")
            assert [str(c.label) for c in tp.table.columns.values()] == [
                "Step", "Training Loss", "Validation Loss", "Learning rate", "Grad norm", "Tokens/s"]
            assert rows(tp.table) == [["10", "2.5000", "—", "2.000e-04", "1.2500", "1,234"],
                                      ["20", "2.2500", "2.4000", "1.800e-04", "0.9000", "1,300"]]
            # An evaluation-only step (eval_steps off the logging grid) is a row of its own.
            send(app, [run.log(25, eval_loss=2.3), run.log(30, loss=2.0, tokens_per_s=1250.0)])
            await until(pilot, lambda: tp.table.row_count == 4, "four rows")
            assert rows(tp.table)[2] == ["25", "—", "2.3000", "—", "—", "—"]
            assert tp.table.cursor_row == 3  # it follows the newest row
            assert text_of(app, "#train-live") == (
                "▶ step 30/100 (30%) · epoch 0.30 · elapsed 45s · ETA 1:45 · 1,250 tokens/s")
            assert tp.curve.train == [(10, 2.5), (20, 2.25), (30, 2.0)]
            assert tp.curve.eval == [(20, 2.4), (25, 2.3)]

            # A new run replaces the table; a resumed one keeps the rows up to where it resumed.
            send(app, run.start(job_id="j2", total_steps=100, resumed_from="/data/qlw/runs/s1/checkpoint-20",
                                start_step=20))
            await until(pilot, lambda: tp.job_id == "j2" and tp.table.row_count == 2, "the resumed run")
            assert [r[0] for r in rows(tp.table)] == ["10", "20"]
            assert "resumed from step 20" in text_of(app, "#train-info")
            send(app, [run.log(30, job_id="j2", loss=1.9)])
            await until(pilot, lambda: tp.table.row_count == 3, "the resumed run's first row")
            send(app, run.start(job_id="j3"))
            await until(pilot, lambda: tp.job_id == "j3" and tp.table.row_count == 0, "a fresh run")
            assert tp.curve.train == [] and LossCurve.EMPTY in str(tp.curve.render())
            assert "processes" not in text_of(app, "#train-info")
            # Issue 19: a run in several processes says so, with its global batch.
            send(app, run.start(job_id="j4", processes=2, global_batch=8))
            await until(pilot, lambda: tp.job_id == "j4", "a run in two processes")
            assert "2 processes (ddp) · global batch 8" in text_of(app, "#train-info")

    asyncio.run(body())


def test_the_columns_follow_the_method_and_the_curve_shows_the_margin(qlw_home):
    """A DPO run's table has its rewards, margin and accuracy beside the losses (from each row's
    ``metrics``, evaluation values completing the row); an SFT run after it has SFT's columns."""

    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=(160, 30)) as pilot:
            await show_train_tab(pilot)
            tp = pane(app)
            run = Run()
            events = run.start(total_steps=10)
            events[1].payload["config"] = {"name": "dpo run", "method": "dpo"}
            send(app, events)
            await until(pilot, lambda: tp.state == "running", "the run's start")
            send(app, [run.log(1, total=10, loss=0.6931, learning_rate=5e-6, grad_norm=0.5, tokens_per_s=900.0,
                               metrics={"rewards/chosen": 0.0125, "rewards/rejected": -0.0031,
                                        "rewards/margins": 0.0156, "rewards/accuracies": 0.75}),
                       run.log(1, total=10, eval_loss=0.69, metrics={"eval_rewards/margins": 0.01})])
            await until(pilot, lambda: tp.table.row_count == 1 and "0.6900" in str(rows(tp.table)), "the DPO row")
            assert [str(c.label) for c in tp.table.columns.values()] == [
                "Step", "Training Loss", "Validation Loss", "Rewards/chosen", "Rewards/rejected", "Margin",
                "Accuracy", "Learning rate", "Grad norm", "Tokens/s"]
            assert rows(tp.table) == [["1", "0.6931", "0.6900", "0.0125", "-0.0031", "0.0156", "0.75", "5.000e-06",
                                       "0.5000", "900"]]
            await until(pilot, lambda: tp.curve.margin == [(1, 0.0156)], "the margin on the curve")

            send(app, run.start(job_id="j2", total_steps=10))  # an SFT run (no method: sft)
            await until(pilot, lambda: tp.job_id == "j2" and tp.table.row_count == 0, "the SFT run")
            assert [str(c.label) for c in tp.table.columns.values()] == [
                "Step", "Training Loss", "Validation Loss", "Learning rate", "Grad norm", "Tokens/s"]
            send(app, [run.log(1, job_id="j2", total=10, loss=2.5)])
            await until(pilot, lambda: tp.table.row_count == 1, "the SFT row")
            assert rows(tp.table)[0][:2] == ["1", "2.5000"] and tp.curve.margin == []

    asyncio.run(body())


def test_replay_of_2000_rows_is_drawn_in_a_few_batches(qlw_home):
    """A terminal attaching to a long run gets every row again (the replay) and then the live
    ones: one table row and one curve point per logging step, drawn a few times, not per event."""

    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=SIZE) as pilot:
            await show_train_tab(pilot)
            tp = pane(app)
            run = Run()
            total = 2000
            replay = run.start(total_steps=total)
            for step in range(1, total + 1):
                replay.append(run.log(step, total, loss=curve_loss(step), learning_rate=2e-4, grad_norm=0.5,
                                      tokens_per_s=1000.0 + step))
                if step % 50 == 0:
                    replay.append(run.log(step, total, eval_loss=curve_loss(step) + 0.1))
            started = time.perf_counter()
            send(app, replay)
            await until(pilot, lambda: tp.table.row_count == total and tp.drawn, "2,000 rows", timeout=20)
            elapsed = time.perf_counter() - started  # not asserted: a loaded machine is slower (bench/ times it)
            assert tp.flushes <= 4 * elapsed + 3, (tp.flushes, elapsed)  # coalesced: ~4 draws a second
            assert len(tp.curve.train) == total and len(tp.curve.eval) == total // 50
            assert tp.curve.train[-1] == (total, curve_loss(total))
            assert rows(tp.table)[-1][:3] == [str(total), f"{curve_loss(total):.4f}", f"{curve_loss(total) + 0.1:.4f}"]
            await pilot.pause()
            assert "eval_loss" in str(tp.curve.render())  # the legend of a drawn plot

            # Live rows go on after the replay, one at a time.
            send(app, [run.log(total, total, eval_loss=0.4)])
            await until(pilot, lambda: rows(tp.table)[-1][2] == "0.4000", "the live update of the last row")
            assert tp.table.row_count == total

    asyncio.run(body())


def test_alerts_at_once_and_the_result(qlw_home):
    notes: list[tuple[str, str]] = []

    def hook(message):
        if isinstance(message, Notify):
            notes.append((message.notification.severity, message.notification.message))

    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=(80, 24), message_hook=hook) as pilot:
            await show_train_tab(pilot)
            tp = pane(app)
            run = Run(t0=time.time())
            send(app, [*run.start(total_steps=60), run.log(10, 60, loss=2.0)])
            await until(pilot, lambda: tp.table.row_count == 1, "a row")
            send(app, [run.log(20, 60, loss=float("nan"), grad_norm=float("nan")),
                       run.event("train.alert", job_id="j1", kind="nan", step=20,
                                 message="the training loss is NaN",
                                 hint="lower learning_rate (e.g. 1e-4) or set max_grad_norm=0.3; use bf16, not fp16")])
            alert = tp.query_one("#train-alert")
            await until(pilot, lambda: alert.display, "the alert")
            text = text_of(app, "#train-alert")
            assert text.startswith("⚠ NaN loss at step 20: the training loss is NaN\nwhat to do: lower learning_rate")
            assert alert.region.height >= 3 and alert.region.bottom <= 24  # prominent, on screen at 80x24
            assert any(sev == "error" and "NaN loss at step 20" in msg for sev, msg in notes), notes
            await until(pilot, lambda: tp.table.row_count == 2, "the NaN row")
            assert rows(tp.table)[1][1:3] == ["nan", "—"] and rows(tp.table)[1][4] == "nan"
            assert tp.curve.train == [(10, 2.0)]  # a NaN is no point of the curve

            send(app, [run.event("train.alert", job_id="j1", kind="oom", step=30,
                                 message="CUDA out of memory; the run stopped cleanly",
                                 hint="lower per_device_train_batch_size or max_length",
                                 memory={"allocated_bytes": 6 * 1024**3})])
            await until(pilot, lambda: "CUDA out of memory at step 30" in text_of(app, "#train-alert"), "the OOM")
            assert "memory: allocated_bytes 6.00 GiB" in text_of(app, "#train-alert")

            send(app, [run.event("train.finished", job_id="j1", status="stopped", step=30, total_steps=60,
                                 final_loss=1.875, final_eval_loss=1.9512, adapter_path="/data/qlw/runs/s1/adapter",
                                 checkpoint_path="/data/qlw/runs/s1/checkpoint-30", elapsed_s=125.0,
                                 tokens_per_s=1500.0, peak_memory={"peak_bytes": 3 * 1024**3}),
                       run.event("job.finished", job_id="j1", kind="train.start", status="done", elapsed_s=126.0)])
            result = tp.query_one("#train-result")
            await until(pilot, lambda: result.display, "the result")
            assert text_of(app, "#train-result") == (
                "■ stopped at step 30/60 after 2:05 · loss 1.8750 · eval_loss 1.9512 · 1,500 tokens/s · peak 3.00 GiB\n"
                "adapter: /data/qlw/runs/s1/adapter")
            assert result.has_class("-stopped") and tp.query_one("#train-stop").disabled
            assert not tp.running

            # A run that fails before it trains says why, where the alert goes.
            send(app, [run.event("job.started", job_id="j2", kind="train.start", params={}),
                       run.event("job.finished", job_id="j2", kind="train.start", status="failed", elapsed_s=1.0,
                                 error={"message": "no dataset at /x.jsonl", "where": "data.source",
                                        "hint": "open a dataset in the Data tab"})])
            await until(pilot, lambda: "training failed" in text_of(app, "#train-alert"), "the failure")
            assert text_of(app, "#train-alert") == ("✖ training failed: no dataset at /x.jsonl\nwhere: data.source\n"
                                                    "what to do: open a dataset in the Data tab")
            assert not tp.query_one("#train-result").display

    asyncio.run(body())


def test_stop_key_and_palette(qlw_home):
    """s stops the run followed (job.cancel with its id, a graceful stop); the keys have ids and
    tooltips and are in the command palette."""
    sent: list = []

    async def fake_call(params, timeout=30.0):
        sent.append(params)
        return {"job_id": params.job_id, "kind": "train.start"}

    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=(80, 24)) as pilot:
            await show_train_tab(pilot)
            tp = pane(app)
            tp.call = fake_call  # the one door to the backend
            assert all(b.id and b.tooltip for b in TrainPane.BINDINGS)
            run = Run()
            send(app, [*run.start(job_id="job-7"), run.log(10, job_id="job-7", loss=2.0)])
            await until(pilot, lambda: tp.table.row_count == 1, "a row")
            tp.table.focus()
            await pilot.pause()
            titles = {c.title for c in app.get_system_commands(app.screen)}
            assert {"Stop run", "Follow", "Curve"} <= titles
            assert tp.table.region.height >= 4 and tp.curve.region.height >= 8  # both usable at 80x24
            await pilot.press("s")
            await until(pilot, lambda: tp.state == "stopping", "stopping")
            assert sent == [P.CancelJob(job_id="job-7")]
            assert text_of(app, "#train-live").endswith("stopping: saving a checkpoint …")
            assert tp.query_one("#train-stop").disabled
            await pilot.press("c")
            assert not tp.curve.display
            await pilot.press("c")
            assert tp.curve.display

    asyncio.run(body())


def test_formatting():
    assert duration(42) == "42s" and duration(187) == "3:07" and duration(3723) == "1:02:03"
    assert duration(None) == "n/a" and duration(float("inf")) == "n/a"
    assert live_line(None, 500) == "▶ starting: 500 steps"
    assert live_line({"step": 5, "epoch": 0.01, "elapsed_s": 3}, 500, "done") == (
        "step 5/500 (1%) · epoch 0.01 · elapsed 3s")
    assert finished_text({"status": "done", "step": 10, "total_steps": 10, "final_loss": None}).startswith(
        "✔ finished at step 10/10 after n/a · loss — · eval_loss —")


def test_train_pane_snapshot(snap_compare, qlw_home):
    """A run half-way at 100x30, with evaluation rows, no backend (no clock on screen)."""

    async def settle(pilot):
        app = pilot.app
        app.animation_level = "none"
        await show_train_tab(pilot)
        run = Run()
        events = run.start(total_steps=200)
        for step in range(10, 70, 10):  # rows that fit: no scrollbar, whose thumb may lag a frame
            events.append(run.log(step, 200, loss=curve_loss(step), learning_rate=2e-4 * (1 - step / 200),
                                  grad_norm=round(0.8 - step / 500, 4), tokens_per_s=1480.0 + step))
            if step % 50 == 0:
                events.append(run.log(step, 200, eval_loss=curve_loss(step) + 0.12))
        send(app, events)
        table = pane(app).table
        await until(pilot, lambda: table.row_count == 6 and pane(app).drawn, "the rows")
        table.focus()
        await pilot.pause()

    assert snap_compare(make_app(qlw_home), terminal_size=SIZE, run_before=settle)


def test_a_run_cancelled_before_its_first_step_does_not_say_starting(qlw_home):
    """Issue 15: "▶ starting" stayed on the line after a cancel."""

    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=(80, 24)) as pilot:
            await show_train_tab(pilot)
            tp = pane(app)
            run = Run(t0=time.time())
            send(app, [run.event("job.started", job_id="j9", kind="train.start")])
            await until(pilot, lambda: text_of(app, "#train-live").startswith("▶ starting"), "starting")
            send(app, [run.event("job.finished", job_id="j9", kind="train.start", status="cancelled", elapsed_s=2.5)])
            await until(pilot, lambda: "stopped after 2.5 s, before training began" in text_of(app, "#train-live"),
                        "the stop")
            await pilot.pause(0.5)  # a later redraw keeps it
            assert text_of(app, "#train-live") == "■ stopped after 2.5 s, before training began"
            assert tp.state == "cancelled"

    asyncio.run(body())


def test_at_200x50_the_curve_takes_the_room_and_its_legend_is_above_it(qlw_home):
    """Issue 15: at 200x50 the Train tab left ~25 empty table rows above a 10-row curve, and the
    legend overlapped the line."""

    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=(200, 50)) as pilot:
            await show_train_tab(pilot)
            tp = pane(app)
            run = Run(t0=time.time())
            send(app, [*run.start(total_steps=30), *(run.log(s, 30, loss=curve_loss(s)) for s in range(1, 31)),
                       run.log(30, 30, eval_loss=1.0)])
            await until(pilot, lambda: tp.table.row_count == 30 and tp.drawn, "the rows")
            await pilot.pause()
            assert tp.curve.region.height > 2 * 10 and tp.curve.region.height > tp.table.region.height
            assert tp.table.region.height >= 8  # still a good part of the table in view
            first_line = app.export_screenshot().replace("&#160;", " ")
            assert "loss (cyan) · eval_loss (orange)" in first_line  # the legend is the title, above

    asyncio.run(body())
