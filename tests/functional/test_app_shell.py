"""The app shell against a real backend: connection states, the Sessions tab, the job line.

Each test drives ``QlwApp`` with ``run_test`` and Pilot; other clients (the "other terminal")
are plain :class:`tui.client.Connection` objects on the same loop. Waits poll a condition with a
timeout, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from textual.notifications import Notify
from textual.widgets import DataTable, TabbedContent

from backend import protocol as P
from tests.conftest import ROOT, start_backend, stop_backend
from tests.functional.helpers import make_app, until, without_backend
from tests.waits import Budget
from tui.app import QlwApp
from tui.client import Connection
from tui.screens.main_screen import TABS, MainScreen
from tui.widgets.sessions.runs_pane import RunsPane
from tui.widgets.sessions.sessions_pane import SessionsPane
from tui.widgets.shell.connection_indicator import ConnectionIndicator
from tui.widgets.shell.job_indicator import JobIndicator

SIZE = (100, 30)


# Helpers ------------------------------------------------------------------------------------


def header(app: QlwApp) -> str:
    return str(app.screen.query_one(ConnectionIndicator).content)


def job_line(app: QlwApp) -> str:
    return str(app.screen.query_one(JobIndicator).content)


def table_rows(app: QlwApp) -> list[list[str]]:
    table = app.screen.query_one("#sessions-table", DataTable)
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


def detail_line(app: QlwApp) -> str:
    return str(app.screen.query_one("#session-detail").content)


class Other:
    """Another client of the backend (as a second terminal would be), attached to the stream."""

    def __init__(self, conn: Connection, events: list[P.Event]):
        self.conn, self.events = conn, events

    @classmethod
    async def open(cls, home: Path) -> "Other":
        events: list[P.Event] = []
        conn = await Connection.open(P.socket_path(home), "test-other", on_event=events.append)
        await conn.call(P.Attach())
        return cls(conn, events)

    async def run_job(self, params, timeout: float = 10.0) -> str:
        """Start a job and wait for its ``job.finished``."""
        job_id = (await self.conn.call(params))["job_id"]
        budget = Budget(timeout)  # load-adjusted: a busy machine slows the job, it does not fail it
        while not any(e.kind == "job.finished" and e.payload["job_id"] == job_id for e in self.events):
            assert not budget.spent(), f"job {job_id} did not finish"
            await asyncio.sleep(0.02)
        return job_id


# Tests --------------------------------------------------------------------------------------


def test_import_is_light():
    """``import tui.app`` loads no ML library (nor numpy, nor the store). How long it takes is a
    benchmark's to say (bench/README.md), not a test's: a loaded machine would fail it."""
    code = (
        "import sys; import tui.app\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft', "
        "'trl', 'bitsandbytes', 'accelerate', 'datasets', 'numpy', 'safetensors', 'huggingface_hub', "
        "'tokenizers', 'sessions'})\n"
        "print(repr(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True)
    assert eval(out.stdout.strip().splitlines()[-1]) == []


def test_every_binding_has_id_and_tooltip_and_a_palette_command(qlw_home):
    bindings = [*QlwApp.BINDINGS, *MainScreen.BINDINGS, *RunsPane.BINDINGS, *SessionsPane.BINDINGS]
    assert all(b.id and b.tooltip for b in bindings), [b for b in bindings if not (b.id and b.tooltip)]
    assert len({b.id for b in bindings}) == len(bindings)

    async def body():
        app = make_app(qlw_home, start_backend=False)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.connection.state == "gone", "the gone state")
            titles = {c.title for c in app.get_system_commands(app.screen)}
            assert {f"{title} tab" for _, title, _, _ in TABS} <= titles
            assert {"Tiny model", "Cancel job", "Start backend", "Quit"} <= titles
            # Number keys switch tabs.
            tabs = app.screen.query_one(TabbedContent)
            for n, (tab, *_rest) in reversed(list(enumerate(TABS, 1))):
                await pilot.press(str(n))
                assert tabs.active == tab

    asyncio.run(body())


def test_sessions_tab_and_job_line_follow_the_backend(backend):
    home = backend
    notes: list[str] = []

    def hook(message):
        if isinstance(message, Notify):
            notes.append(message.notification.message)

    async def body():
        # Past runs, made by another client before the app starts.
        other = await Other.open(home)
        await other.conn.call(P.NewSession(name="alpha"))
        await other.run_job(P.DiagTicker(count=5, rate=0))
        await other.conn.call(P.NewSession(name="beta"))
        await other.run_job(P.DiagTicker(count=3, rate=0))
        await other.conn.call(P.NewSession(name="gamma"))
        pid = (await other.conn.call(P.Status()))["pid"]

        app = make_app(home, start_backend=True)
        async with app.run_test(size=SIZE, message_hook=hook) as pilot:
            await until(pilot, lambda: app.connection.state == "connected", "connected")
            assert header(app) == f"● connected · backend pid {pid}"

            await pilot.press("8")
            assert app.screen.query_one(TabbedContent).active == "sessions"
            # The tab shows the runs ledger (none here: no training ran); v shows every session.
            await pilot.press("v")
            await until(pilot, lambda: len(table_rows(app)) == 3, "three sessions")
            rows = table_rows(app)
            assert [r[0] for r in rows] == ["gamma", "beta", "alpha"]  # newest first
            assert [r[2] for r in rows] == ["idle", "finished", "finished"]
            assert int(rows[2][3]) > 5  # created, status, job.started, 5 ticks, ...
            gamma_id = rows[0][4]
            assert gamma_id in detail_line(app) and "gamma" in detail_line(app)
            await pilot.press("down")
            assert rows[1][4] in detail_line(app)

            # A session made elsewhere shows up live, on top; the cursor stays on its row.
            await other.conn.call(P.NewSession(name="delta"))
            await until(pilot, lambda: table_rows(app)[0][0] == "delta", "delta on top")
            assert rows[1][4] in detail_line(app)

            # A job started from the other client shows in the job line, with its progress.
            await other.run_job(P.DiagTicker(count=10, rate=50))
            await until(pilot, lambda: job_line(app).startswith("✔ diag.ticker done"), "job done")
            await until(pilot, lambda: table_rows(app)[0][2] == "finished", "delta finished")

            await other.conn.call(P.DiagTicker(count=10_000, rate=20))
            await until(pilot, lambda: "diag.ticker" in job_line(app) and "ticks" in job_line(app),
                        "the running job's progress")
            assert job_line(app).startswith("▶ diag.ticker · ")
            await until(pilot, lambda: table_rows(app)[0][2] == "running", "delta running")

            # Only one job at a time: the tiny model is refused, and the user is told why.
            await pilot.press("ctrl+t")
            await until(pilot, lambda: any("Could not prepare the tiny model" in n for n in notes),
                        "the refusal notice")
            assert any("diag.ticker" in n for n in notes if "tiny model" in n)  # says what blocks it

            # Cancel from the app.
            await pilot.press("ctrl+g")
            await until(pilot, lambda: job_line(app).startswith("■ diag.ticker cancelled"), "cancelled")
            assert any("Asked the diag.ticker job to stop" in n for n in notes)
            await until(pilot, lambda: table_rows(app)[0][2] == "cancelled", "delta cancelled")

            # Refresh by key; then quit while a job runs: the backend keeps running, and the shell
            # is told so, with how to come back (issue 15).
            await pilot.press("r")
            await other.conn.call(P.DiagTicker(count=10_000, rate=20))
            await until(pilot, lambda: job_line(app).startswith("▶ diag.ticker"), "a job running")
            await pilot.press("q")
            await until(pilot, lambda: not app.is_running, "the app to exit")
        assert app.farewell.startswith(f"qlw: the backend (pid {pid}) keeps running with its diag.ticker job")
        assert "`qlw` attaches again" in app.farewell and "`qlw stop` ends it" in app.farewell
        assert (await other.conn.call(P.Ping(payload="still here")))["payload"] == "still here"
        await other.conn.close()

    asyncio.run(body())


def test_connection_states_gone_reconnecting_restart(qlw_home):
    procs: list[subprocess.Popen] = []  # start_backend probes with asyncio.run: call it in a thread

    async def body():
        app = make_app(qlw_home, start_backend=False)
        async with app.run_test(size=SIZE) as pilot:
            # No backend, and not allowed to start one: gone, with what to do.
            await until(pilot, lambda: app.connection.state == "gone", "gone")
            assert header(app) == "✖ backend gone: press ctrl+r to start a backend"
            assert "ctrl+r" in app.connection.detail
            assert job_line(app) == "no backend: job state unknown"

            # A backend appears; ctrl+r attaches to it.
            procs.append(await asyncio.to_thread(start_backend, qlw_home))
            await pilot.press("ctrl+r")
            await until(pilot, lambda: app.connection.state == "connected", "connected after ctrl+r")
            assert header(app) == f"● connected · backend pid {procs[-1].pid}"
            await until(pilot, lambda: job_line(app).startswith("no job running"), "job line reset")

            # The backend dies: re-connecting; one comes back within the window: connected again.
            procs[-1].kill()
            procs[-1].wait()
            await until(pilot, lambda: app.connection.state == "reconnecting", "reconnecting")
            assert header(app).startswith("◌ re-connecting")
            procs.append(await asyncio.to_thread(start_backend, qlw_home))
            await until(pilot, lambda: app.connection.state == "connected", "re-attached")
            assert header(app) == f"● connected · backend pid {procs[-1].pid}"

            # It dies for good: gone once the re-connect window is over.
            app.backend.RECONNECT_FOR_S = 0.3
            procs[-1].kill()
            procs[-1].wait()
            await until(pilot, lambda: app.connection.state == "gone", "gone after the window")
            assert header(app) == "✖ backend gone: press ctrl+r to start a backend"

    try:
        asyncio.run(body())
    finally:
        for proc in procs:
            stop_backend(proc)


def test_shell_snapshot(snap_compare, qlw_home):
    """The shell at 100x30 with no backend (no pid, no time on screen)."""

    async def settle(pilot):
        await without_backend(pilot)
        await pilot.pause()

    assert snap_compare(QlwApp(home=qlw_home, start_backend=False), terminal_size=SIZE,
                        run_before=settle)


def test_keys_after_esc_and_dialogs_and_the_keys_of_a_pane(qlw_home):
    """Issue 15: after esc the pane's keys stopped working; a closed dialog left the focus in a
    text field (a tab's number became text); ctrl+o in Data only focused the path; the Data
    sub-tab keys were not in the footer; `?` shows every key of the tab shown."""
    from textual.widgets import Input

    from tui.modals.confirm_screen import ConfirmScreen
    from tui.modals.keys_screen import KeysScreen
    from tui.widgets.data.data_pane import DataPane

    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=(160, 40)) as pilot:
            await without_backend(pilot)
            await pilot.press("3")
            pane = app.screen.query_one(DataPane)
            tabs = pane.query_one("#data-tabs", TabbedContent)
            await pilot.pause()
            assert pane in app.focused.ancestors
            footer = {k.key for k in app.screen.query("FooterKey")}
            assert {"r", "d", "c", "m", "v", "s", "q"} <= footer, footer
            assert "tabs" in {str(label.render()) for label in app.screen.query("FooterLabel")}

            # esc leaves the path field for the pane's controls: its keys work at once.
            pane.query_one("#data-path", Input).focus()
            await pilot.press("escape")
            assert app.focused is not None and not isinstance(app.focused, Input)
            assert pane in app.focused.ancestors
            await pilot.press("s")
            assert tabs.active == "data-stats-tab"

            # A dialog opened from a text field gives the focus back to the pane, not the field.
            pane.query_one("#data-path", Input).focus()
            await pilot.pause()
            app.push_screen(ConfirmScreen("Really?"))
            await pilot.pause()
            await pilot.press("n")
            await until(pilot, lambda: app.screen is not None and not isinstance(app.screen, ConfirmScreen), "closed")
            await pilot.pause()
            assert not isinstance(app.focused, Input)
            path_before = pane.query_one("#data-path", Input).value
            await pilot.press("v")
            assert pane.query_one("#data-path", Input).value == path_before and tabs.active == "data-preview-tab"

            # ctrl+o opens what the path box names (no backend: the attempt, not only a focus).
            opened = []
            pane.open_dataset = lambda reload=False: opened.append(pane._requested_source()["path"])  # type: ignore
            await pilot.press("ctrl+o")
            assert opened == [path_before]

            # ? lists the tab's keys, then the global ones; esc closes.
            await pilot.press("question_mark")
            await until(pilot, lambda: isinstance(app.screen, KeysScreen), "the keys")
            keys = {app.get_key_display(b): b.description for b in app.screen.pane}
            assert keys["^o"] == "Open" and keys["t"] == "Count tokens" and keys["s"] == "Stats", keys
            assert "Tiny model" in {b.description for b in app.screen.everywhere}
            shot = app.export_screenshot().replace("&#160;", " ")
            assert "Keys: the Data tab" in shot and "Count tokens" in shot
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, KeysScreen), "closed keys")

    asyncio.run(body())


def test_quit_stays_in_the_footer_at_80x24(qlw_home):
    """Issue 15: at 80x24 `q Quit` fell off the footer's right end."""

    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=(80, 24)) as pilot:
            await without_backend(pilot)
            for n, (tab, *_) in enumerate(TABS, 1):
                await pilot.press(str(n))
                await pilot.pause()
                await pilot.pause()

                def laid_out() -> bool:
                    keys = [k for k in app.screen.query("FooterKey") if k.key == "q" or k.has_class("-command-palette")]
                    return len(keys) == 2 and all(k.region.width for k in keys)

                await until(pilot, laid_out, f"the footer of {tab}")
                keys = {k.key: k for k in app.screen.query("FooterKey")}
                palette = next(k for k in app.screen.query("FooterKey") if k.has_class("-command-palette"))
                assert "q" in keys, tab
                assert keys["q"].region.right <= palette.region.x and keys["q"].region.width > 0, (tab, keys["q"].region)

    asyncio.run(body())


def test_the_screen_is_repainted_once_a_notice_has_gone(qlw_home):
    """Textual can take an expired toast out of the DOM and leave its cells on the terminal: a
    "Run finished" notice (10 s) stood over the chat's compare columns for minutes in the e2e
    preference test. Once a toast has gone, the app repaints every cell of the screen."""

    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=(100, 30), notifications=True) as pilot:
            await without_backend(pilot)
            await until(pilot, lambda: not app.screen.query("Toast"), "the start-up notices gone")
            repaints: list[tuple] = []
            refresh = app.screen.refresh

            def spy(*regions, **kwargs):
                repaints.append((regions, kwargs, len(app.screen.query("Toast"))))
                return refresh(*regions, **kwargs)

            app.screen.refresh = spy  # type: ignore[method-assign]
            app.notify("Run finished", title="Run finished", timeout=0.5)
            await until(pilot, lambda: len(app.screen.query("Toast")) == 1, "the toast shown")
            await until(pilot, lambda: not app.screen.query("Toast"), "the toast gone")
            # A whole-screen repaint (no regions) asked after the toast left the DOM.
            await until(pilot, lambda: any(not r and n == 0 for r, _, n in repaints), "a full repaint after the toast")

    asyncio.run(body())


def test_the_footer_is_rebuilt_once_for_many_binding_changes_in_a_frame(qlw_home):
    """Textual's Footer rebuilds itself once per refresh_bindings(): 42 rebuilds of ~20 keys as
    the app started. qlw's footer keeps one rebuild pending; the keys shown still follow the
    focused pane."""
    from tui.widgets.shell.footer import QlwFooter

    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=(100, 30)) as pilot:
            await without_backend(pilot)
            footer = app.screen.query_one(QlwFooter)
            rebuilds = []
            recompose = footer.recompose

            async def counted():
                rebuilds.append(1)
                await recompose()

            footer.recompose = counted  # type: ignore[method-assign]
            for _ in range(10):
                app.screen.refresh_bindings()
            await until(pilot, lambda: rebuilds and not footer._rebuild_pending, "the footer rebuilt")
            await pilot.pause()
            assert len(rebuilds) == 1
            await pilot.press("4")  # the LoRA tab: its Start key (f5) is in the footer
            await until(pilot, lambda: "f5" in [k.key for k in footer.query("FooterKey")], "the LoRA tab's keys")

    asyncio.run(body())
