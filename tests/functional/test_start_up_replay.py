"""A terminal starting while the backend has history: every pane gets the session's replay.

The app's client attaches (which is when the backend replays the session) only once the first
screen's panes have subscribed to ``app.backend_events``, so a pane mounting after the client
connected misses nothing and sees each event once. Also: an ``error`` event that no job owns
(disk full under the store, ...) is shown as a notification by the shell. Waits poll a
condition with a timeout, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import time

from textual.notifications import Notify

from backend import protocol as P
from sessions.store import Store
from tests.conftest import start_backend, stop_backend
from tests.functional.helpers import make_app, until
from tests.functional.test_train_pane import Run, curve_loss, rows
from tui.messages import BackendEvent
from tui.widgets.chat.chat_pane import ChatPane
from tui.widgets.shell.error_notice import TITLE, error_notice
from tui.widgets.train.train_pane import TrainPane

SIZE = (100, 30)
STEPS = 40


def record_session(home) -> str:
    """A finished run of ``STEPS`` logged steps and one chat turn, written to the store the way
    the backend records them (before any backend runs on ``home``)."""
    store = Store(home / "sessions.db")
    try:
        sid = store.create_session("demo").id
        run = Run(session=sid, t0=time.time() - 600)
        events = run.start(total_steps=STEPS)
        events += [run.log(s, STEPS, loss=curve_loss(s), learning_rate=2e-4) for s in range(1, STEPS + 1)]
        events += [run.event("train.finished", job_id="j1", status="done", step=STEPS, total_steps=STEPS,
                             final_loss=curve_loss(STEPS), adapter_path="/data/qlw/runs/s1/adapter"),
                   run.event("job.finished", job_id="j1", kind="train.start", status="done", elapsed_s=60.0),
                   run.event("job.started", job_id="j2", kind="chat.send", params={}),
                   run.event("chat.started", answer_id="a1", conversation="c1", target="base",
                             prompt_tokens=5, settings={}, time=run.t0 + 100),
                   run.event("chat.answer", answer_id="a1", conversation="c1", target="base",
                             prompt="recorded question", text="recorded answer", tokens=2, ttft_s=0.1,
                             tokens_per_s=20.0, elapsed_s=0.2, stopped=False, finish_reason="eos",
                             path="plain"),
                   run.event("job.finished", job_id="j2", kind="chat.send", status="done", elapsed_s=0.2)]
        for ev in events:
            store.append_event(sid, ev.kind, ev.payload, ev.time)
    finally:
        store.close()
    return sid


def test_a_fresh_terminal_draws_the_recorded_session(qlw_home):
    sid = record_session(qlw_home)
    logs: list[int] = []

    def hook(message):
        if isinstance(message, BackendEvent) and message.event.kind == "train.log":
            logs.append(message.event.seq)

    proc = start_backend(qlw_home)
    try:
        async def body():
            app = make_app(qlw_home)
            async with app.run_test(size=SIZE, message_hook=hook) as pilot:
                await until(pilot, lambda: app.connection.state == "connected", "connected", timeout=20)
                assert app.backend.session == sid
                app.screen.action_show_tab("train")
                tp = app.screen.query_one(TrainPane)
                await until(pilot, lambda: tp.table.row_count == STEPS and tp.drawn, f"{STEPS} rows")
                await pilot.pause(0.3)  # a late duplicate would have arrived by now
                assert [r[0] for r in rows(tp.table)] == [str(s) for s in range(1, STEPS + 1)]
                assert len(logs) == len(set(logs)) == STEPS
                assert [step for step, _ in tp.curve.train] == list(range(1, STEPS + 1))

                app.screen.action_show_tab("chat")
                cp = app.screen.query_one(ChatPane)
                await until(pilot, lambda: cp.turns and cp.turns[0].views
                            and cp.turns[0].views[0].answer is not None, "the recorded turn")
                assert len(cp.turns) == 1 and cp.turns[0].prompt == "recorded question"
                assert [v.text for v in cp.turns[0].views] == ["recorded answer"]
            await app.backend.stop()

        asyncio.run(asyncio.wait_for(body(), 60))
    finally:
        stop_backend(proc)


def test_an_error_no_job_owns_is_notified(qlw_home):
    notes: list[tuple[str, str, str]] = []

    def hook(message):
        if isinstance(message, Notify):
            n = message.notification
            notes.append((n.title, n.severity, n.message))

    disk_full = P.Event("error", {"message": "cannot record events in /h/sessions.db: database or disk is full",
                                  "where": "/h/sessions.db", "hint": "free space on that disk",
                                  "detail": "", "job_id": ""}, time.time())
    job_error = P.Event("error", {"message": "training failed", "hint": "lower the batch size", "job_id": "j1"},
                        time.time(), session="s1", seq=1)
    old = P.Event("error", {"message": "an old problem", "job_id": ""}, time.time() - 3600, session="s1", seq=2)

    async def body():
        app = make_app(qlw_home)  # no backend: the events are posted as the client posts them
        async with app.run_test(size=SIZE, message_hook=hook) as pilot:
            await until(pilot, lambda: app.connection.state == "gone", "no backend")
            app.clear_notifications()
            notes.clear()
            for ev in (job_error, old, disk_full):
                app.post_message(BackendEvent(ev))
            await until(pilot, lambda: any(t == TITLE for t, _, _ in notes), "the notification")
            await pilot.pause(0.1)
            mine = [(s, m) for t, s, m in notes if t == TITLE]
            assert mine == [("error", "✖ cannot record events in /h/sessions.db: database or disk is full\n"
                                      "where: /h/sessions.db\nwhat to do: free space on that disk")]

    asyncio.run(body())
    assert error_notice(job_error) is None and error_notice(old) is None
    assert error_notice(P.Event("log", {"level": "error", "message": "x"}, time.time())) is None
