"""The GPU tab, the header's GPU line and the one-key cleanup.

The no-GPU path, freeing and restarting run against a real backend (this machine has no NVIDIA
GPU, so the backend says why); the multi-GPU view is a recorded sample fed to the app with no
backend, which also gives the one deterministic snapshot. Waits poll with a timeout.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import psutil
import pytest
from textual import events
from textual.notifications import Notify

from backend import protocol as P
from tests.functional.helpers import make_app, until, without_backend
from tui.app import QlwApp
from tui.client import Connection
from tui.messages import BackendEvent, ConnectionChanged
from tui.modals.confirm_screen import ConfirmScreen
from tui.modals.free_memory_result_screen import FreeMemoryResultScreen
from tui.screens.main_screen import MainScreen
from tui.widgets.gpu.gpu_card import GpuCard
from tui.widgets.gpu.gpu_pane import GpuPane
from tui.widgets.gpu.gpu_process_table import OWN_MARK, GpuProcessTable
from tui.widgets.gpu.host_card import HostCard
from tui.widgets.gpu.usage_sparkline import UsageSparkline
from tui.widgets.shell.connection_indicator import ConnectionIndicator
from tui.widgets.shell.gpu_indicator import GpuIndicator

SIZE = (100, 30)
BACKEND_PID = 4242


# A recorded sample: two H100s; GPU1 cannot report power, temperature or clock and is at 95 %
# memory (warning); the backend's own process on GPU0, a foreign one with no name or size on GPU1.
def recorded_sample(t: float = 0.0, mem0: float = 46_080.0, util0: int = 71,
                    mem1: float = 77_481.0, util1: int = 40) -> dict:
    return {
        "time": 1_700_000_000.0 + t, "driver": "580.65.06", "nvml_error": None,
        "gpus": [
            {"index": 0, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-0", "util_gpu": util0,
             "util_mem": 31, "mem_used_mib": mem0, "mem_total_mib": 81_559.0, "temp_c": 61,
             "power_w": 312.4, "power_limit_w": 700.0, "sm_clock_mhz": 1980,
             "processes": [{"pid": BACKEND_PID, "name": "python3", "used_mib": mem0 - 600, "own": True},
                           {"pid": 777, "name": "Xorg", "used_mib": 310.0, "own": False}]},
            {"index": 1, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-1", "util_gpu": util1,
             "util_mem": None, "mem_used_mib": mem1, "mem_total_mib": 81_559.0, "temp_c": None,
             "power_w": None, "power_limit_w": 700.0, "sm_clock_mhz": None,
             "processes": [{"pid": 9001, "name": None, "used_mib": None, "own": False}]},
        ],
        "host": {"cpu_percent": 12.5, "cpu_count": 16, "ram_used_mib": 5_222.4, "ram_total_mib": 23_961.6},
        "backend": {"pid": BACKEND_PID, "rss_mib": 812.3, "cpu_percent": 3.0,
                    "torch": [{"device": 0, "allocated_mib": 1_228.8, "reserved_mib": 2_048.0,
                               "peak_mib": 3_174.4}]},
    }


#: A minute of history, GPU0 filling up while its utilisation saw-tooths.
HISTORY = [recorded_sample(t, mem0=30_000.0 + 800 * t, util0=(9 * int(t)) % 100) for t in range(0, 60, 3)]


@pytest.fixture(autouse=True)
def _fast_sampling(monkeypatch):
    """A backend started by these tests samples 4 times a second: no test waits a second for one."""
    monkeypatch.setenv("QLW_GPU_INTERVAL", "0.25")


# Helpers ------------------------------------------------------------------------------------


async def press_while_busy(pilot, key: str) -> None:
    """Press ``key`` without ``pilot.press``'s wait for an idle process, which a job streaming
    50 events a second never gives (each press would cost its 2 s cap). Callers wait with
    :func:`until` for what the key should do."""
    pilot.app.post_message(events.Key(key, key if len(key) == 1 else None))
    await pilot.pause(0.01)  # a delay, not the idle wait of pause()


def text_of(widget) -> str:
    return str(widget.render())


def pane(app: QlwApp) -> GpuPane:
    return app.screen_stack[0].query_one(GpuPane)


def gpu_line(app: QlwApp) -> str:
    indicator = app.screen_stack[0].query_one(GpuIndicator)
    return text_of(indicator) if indicator.display else ""


def connection_line(app: QlwApp) -> str:
    return str(app.screen_stack[0].query_one(ConnectionIndicator).content)


def gib(mib: float) -> str:
    return f"{mib / 1024:.1f}"


def showing(app: QlwApp, screen_type: type) -> bool:
    """``screen_type`` is on top and composed (its buttons are there)."""
    return isinstance(app.screen, screen_type) and bool(app.screen.query("Button"))


def dialog_text(screen) -> str:
    return "\n".join(text_of(w) for w in screen.query("Static") if w.display)


def gpu_event(sample: dict) -> BackendEvent:
    return BackendEvent(P.Event("gpu.sample", sample, sample["time"]))


async def open_other(home: Path, events: list) -> Connection:
    """Another client (a second terminal), attached to the stream."""
    conn = await Connection.open(P.socket_path(home), "test-other", on_event=events.append)
    await conn.call(P.Attach())
    return conn


def finished(events: list, job_id: str) -> dict | None:
    return next((e.payload for e in events if e.kind == "job.finished" and e.payload["job_id"] == job_id), None)


# Tests --------------------------------------------------------------------------------------


def test_no_gpu_pane_and_header_show_the_reason_and_the_host(backend):
    ram_total = gib(psutil.virtual_memory().total / 2**20)

    async def body():
        app = make_app(backend, start_backend=True)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.connection.state == "connected", "connected")
            gp = pane(app)
            await until(pilot, lambda: gp.latest is not None and gp.query_one(HostCard).display,
                        "the first sample drawn")
            sample = gp.latest
            assert sample["gpus"] == [] and sample["nvml_error"]

            notice = text_of(gp.query_one("#gpu-notice"))
            assert notice.startswith("no NVIDIA GPU visible\n")
            reason = sample["nvml_error"].split("no NVIDIA GPU visible", 1)[-1].lstrip(" :")
            assert reason and reason in notice
            assert not gp.query(GpuCard) and not gp.query_one(GpuProcessTable).display

            host = text_of(gp.query_one(HostCard))
            assert re.search(rf"CPU \d+% of {psutil.cpu_count()} cores", host), host
            assert re.search(rf"RAM \d+\.\d/{ram_total} GiB \(\d+%\)", host), host
            assert re.search(rf"backend pid {sample['backend']['pid']} · RSS \d+(\.\d)? [MG]iB", host), host
            await until(pilot, lambda: "sampling every 0.25 s" in text_of(gp.query_one("#gpu-status")),
                        "the interval on the status line (after gpu.history's reply)")

            # Free VRAM is a palette command; focus in the pane adds its interval keys.
            await pilot.press("1")
            titles = {c.title for c in app.get_system_commands(app.screen)}
            assert {"Free VRAM", "Sample less often", "Sample more often"} <= titles

            # The header says the same in brief, on every tab.
            await pilot.press("8")
            await until(pilot, lambda: gpu_line(app).startswith("no GPU"), "the header's GPU line")
            assert re.fullmatch(rf"no GPU · CPU \d+% · RAM \d+\.\d/{ram_total} GiB", gpu_line(app)), gpu_line(app)

            # + and - step the backend's sampling interval.
            await pilot.press("1")
            await pilot.press("plus")
            await until(pilot, lambda: gp.interval == 0.5, "the interval at 0.5 s")
            await pilot.press("minus", "minus")
            await until(pilot, lambda: gp.interval == 0.25, "the interval back at 0.25 s")
            other = await Connection.open(P.socket_path(backend), "test-other")
            assert (await other.call(P.GpuHistory()))["interval"] == 0.25  # and not below
            await other.close()

    asyncio.run(body())


def test_recorded_multi_gpu_sample(qlw_home):
    async def body():
        app = make_app(qlw_home, start_backend=False)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.connection.state == "gone", "gone")
            gp = pane(app)
            gp.seed(HISTORY, interval=1.0)
            app.post_message(gpu_event(recorded_sample(60)))  # live, through the app's signal
            await until(pilot, lambda: len(gp.query(GpuCard)) == 2 and gpu_line(app), "two cards")
            await pilot.pause()
            card0, card1 = gp.query(GpuCard)
            assert card0.border_title == "GPU0 · NVIDIA H100 80GB HBM3"
            assert text_of(card0.query_one("#mem-text")) == "45.0/79.6 GiB  56%"
            assert text_of(card0.query_one("#util-text")) == "71% · mem bus 31%"
            assert text_of(card0.query_one("#gpu-extras")) == "temp 61 °C · power 312/700 W · SM clock 1980 MHz"
            assert text_of(card1.query_one("#mem-text")) == "75.7/79.6 GiB  95%"
            assert text_of(card1.query_one("#gpu-extras")) == "temp n/a · power n/a (limit 700 W) · SM clock n/a"
            assert card1.has_class("-warning") and not card1.has_class("-alert")
            assert not card0.has_class("-warning") and not card0.has_class("-alert")
            # The sparklines hold the window: 20 recorded samples and the live one.
            assert len(card0.query_one("#mem-spark", UsageSparkline).values) == 21
            assert card0.query_one("#util-spark", UsageSparkline).values[-1] == 71

            table = gp.query_one(GpuProcessTable)
            rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
            assert rows == [["GPU0", "4242", "python3", "44.4 GiB", OWN_MARK],
                            ["GPU0", "777", "Xorg", "310 MiB", ""],
                            ["GPU1", "9001", "n/a", "n/a", ""]]
            host = text_of(gp.query_one(HostCard))
            assert "torch cuda:0 · allocated 1.2 GiB · reserved 2.0 GiB · peak 3.1 GiB" in host
            assert not gp.query_one("#gpu-notice").display

            header = app.screen.query_one(GpuIndicator)
            assert gpu_line(app) == "GPU0 45.0/79.6 GiB 71% · GPU1 75.7/79.6 GiB 40%"
            assert header.has_class("-warning")

            # Past 97 %: alert, on the card and in the header; a card that says nothing is n/a.
            hot = recorded_sample(61, mem0=80_000.0)
            hot["gpus"][1].update(mem_used_mib=None, mem_total_mib=None, util_gpu=None)
            app.post_message(gpu_event(hot))
            await until(pilot, lambda: card0.has_class("-alert"), "the alert state")
            assert gpu_line(app) == "GPU0 78.1/79.6 GiB 71% · GPU1 n/a"
            assert header.has_class("-alert")
            assert text_of(card1.query_one("#mem-text")) == "n/a" and not card1.has_class("-warning")
            assert text_of(card1.query_one("#util-text")) == "n/a"

            # A sample that says almost nothing still draws, as n/a.
            bare = {"time": 1_700_000_062.0, "gpus": [{"index": 0}, {"index": 1, "processes": None}],
                    "host": {}, "backend": {"torch": [{"device": 0}]}, "nvml_error": None}
            app.post_message(gpu_event(bare))
            await until(pilot, lambda: gpu_line(app) == "GPU0 n/a · GPU1 n/a", "the bare sample")
            assert card0.border_title == "GPU0 · unnamed GPU" and not card0.has_class("-alert")
            assert text_of(card0.query_one("#gpu-extras")) == "temp n/a · power n/a · SM clock n/a"
            assert table.row_count == 0
            assert text_of(gp.query_one(HostCard)) == (
                "CPU n/a · RAM n/a\nbackend pid n/a · RSS n/a · CPU n/a\n"
                "torch cuda:0 · allocated n/a · reserved n/a · peak n/a")

            # Every binding of the feature has an id and a tooltip; with no backend, nothing to free.
            bindings = [*GpuPane.BINDINGS, *MainScreen.BINDINGS, *ConfirmScreen.BINDINGS,
                        *FreeMemoryResultScreen.BINDINGS]
            assert all(b.id and b.tooltip for b in bindings)
            assert "Free VRAM" not in {c.title for c in app.get_system_commands(app.screen)}

    asyncio.run(body())


def test_gpu_pane_snapshot(snap_compare, qlw_home):
    """Two recorded GPUs at 100x30, no backend (no pid, no clock on screen)."""

    async def settle(pilot):
        app = pilot.app
        app.animation_level = "none"
        await without_backend(pilot)
        pane(app).seed(HISTORY, interval=1.0)
        app.post_message(gpu_event(recorded_sample(60)))
        await until(pilot, lambda: len(pane(app).query(GpuCard)) == 2 and gpu_line(app), "two cards")
        await pilot.pause()

    assert snap_compare(QlwApp(home=qlw_home, start_backend=False), terminal_size=SIZE,
                        run_before=settle)


def test_free_vram_result_and_confirmation_while_a_job_runs(backend):
    notes: list[str] = []

    def hook(message):
        if isinstance(message, Notify):
            notes.append(message.notification.message)

    async def body():
        events: list[P.Event] = []
        other = await open_other(backend, events)
        app = make_app(backend, start_backend=True)
        async with app.run_test(size=(80, 24), message_hook=hook) as pilot:
            await until(pilot, lambda: app.connection.state == "connected", "connected")

            # No job: one key frees, and the result says what it did.
            await pilot.press("ctrl+f")
            await until(pilot, lambda: showing(app, FreeMemoryResultScreen), "the result")
            report = dialog_text(app.screen)
            # Nothing loaded: at most the LoRA tab's check of its config opened the sample dataset.
            assert re.search(r"Dropped: (nothing|dataset dolly_sample\.jsonl \()", report), report
            assert "data.dataset:" not in report  # names, not the backend's keys (issue 15)
            assert "(model:" not in report
            assert "No CUDA memory in use" in report
            assert "torch reserved" in report and "none (CUDA not in use)" in report
            assert "GPU memory (NVML)" in report
            assert re.search(r"backend RSS\s+\d+ MiB → \d+ MiB", report), report
            assert "Still held: nothing on the GPU." in report
            assert app.screen.query_one("#free-restart").region.bottom <= 24  # readable at 80x24
            await pilot.press("escape")
            await until(pilot, lambda: isinstance(app.screen, MainScreen), "the report closed")

            # A job runs: the backend asks first; "no" leaves it running.
            ticker = (await other.call(P.DiagTicker(count=100_000, rate=50)))["job_id"]
            await press_while_busy(pilot, "ctrl+f")
            await until(pilot, lambda: showing(app, ConfirmScreen), "the question")
            question = dialog_text(app.screen)
            assert "Stop the running job" in question and "diag.ticker" in question and ticker in question
            await press_while_busy(pilot, "n")
            await until(pilot, lambda: any("Nothing freed" in n for n in notes), "nothing freed")
            assert isinstance(app.screen, MainScreen)
            assert (await other.call(P.Status()))["job"]["job_id"] == ticker
            assert finished(events, ticker) is None

            # "yes" stops the job, then frees.
            await press_while_busy(pilot, "ctrl+f")
            await until(pilot, lambda: showing(app, ConfirmScreen), "the question again")
            await press_while_busy(pilot, "y")
            await until(pilot, lambda: showing(app, FreeMemoryResultScreen), "the result", 20)
            assert finished(events, ticker)["status"] == "cancelled"
            assert "No CUDA memory in use" in dialog_text(app.screen)
            await pilot.press("escape")
        await other.close()

    asyncio.run(body())


def test_restart_from_the_result_reattaches_to_the_same_pid(backend):
    states: list[str] = []

    def hook(message):
        if isinstance(message, ConnectionChanged):
            states.append(message.state)

    async def body():
        app = make_app(backend, start_backend=True)
        async with app.run_test(size=SIZE, message_hook=hook) as pilot:
            await until(pilot, lambda: app.connection.state == "connected", "connected")
            pid = app.backend.conn.welcome.pid
            await pilot.press("ctrl+f")
            await until(pilot, lambda: showing(app, FreeMemoryResultScreen), "the result")
            del states[:]
            await pilot.press("r")
            await until(pilot, lambda: "reconnecting" in states, "re-connecting")
            await until(pilot, lambda: app.connection.state == "connected", "connected again", 20)
            assert states[states.index("reconnecting"):][-1] == "connected"
            assert connection_line(app) == f"● connected · backend pid {pid}"  # exec'd in place
            assert isinstance(app.screen, MainScreen)
            # The new process samples again, and the pane follows it.
            gp = pane(app)
            seen = gp.latest["time"] if gp.latest else 0
            await until(pilot, lambda: gp.latest is not None and gp.latest["time"] > seen, "a new sample")

    asyncio.run(body())


def test_dropped_names_what_people_loaded():
    """Issue 15: Free VRAM's "Dropped:" line listed internal keys."""
    from tui.modals.free_memory_result_screen import describe_dropped

    text = describe_dropped([
        {"name": "base", "kind": "model", "note": "tiny-llama · 4-bit nf4 on cpu"},
        {"name": "tokenizer", "kind": "tokenizer", "note": "/h/models/qlw-tiny-llama"},
        {"name": "data.dataset:/h/cache/ab12:train", "kind": "cache", "note": "dataset dolly_sample.jsonl (585 rows)"},
        {"name": "chat.peft", "kind": "adapter", "note": ""},
    ])
    assert text == ("model tiny-llama · 4-bit nf4 on cpu, tokenizer /h/models/qlw-tiny-llama, "
                    "dataset dolly_sample.jsonl (585 rows), adapter")
