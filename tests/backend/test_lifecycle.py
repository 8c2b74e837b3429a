"""The backend outlives its terminal, dies cleanly, and never loads the wrong libraries."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.waits import Budget

from backend import protocol as P
from sessions.store import Store
from tests.conftest import ROOT, start_backend, stop_backend
from tui.client import Connection, connect


def run(coro, timeout: float = 90):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _env(home):
    return dict(os.environ, QLW_HOME=str(home), PYTHONPATH=str(ROOT))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_detached_backend_keeps_the_job_running_when_its_terminal_dies(qlw_home):
    starter = textwrap.dedent("""
        import asyncio, sys
        from backend import protocol as P
        from tui.client import connect
        async def main():
            conn = await connect(None, "starter", start=True)
            await conn.call(P.Attach())
            job = await conn.call(P.DiagTicker(count=300, rate=100))
            print(job["job_id"], job["session"], conn.welcome.pid, flush=True)
            await asyncio.sleep(3600)
        asyncio.run(main())
    """)
    # Its own session and process group, like a shell in a terminal; then the "terminal" dies.
    proc = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True,
                            env=_env(qlw_home), start_new_session=True, cwd=str(qlw_home))
    job_id, session, backend_pid = proc.stdout.readline().split()
    backend_pid = int(backend_pid)
    assert os.getsid(backend_pid) == backend_pid  # the backend leads a session of its own
    assert os.getsid(backend_pid) != os.getsid(proc.pid)
    os.killpg(proc.pid, signal.SIGHUP)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.3)
    assert _alive(backend_pid)

    async def reattach():
        events = []
        conn = await Connection.open(P.socket_path(qlw_home), "later", events.append)
        status = await conn.call(P.Status())
        assert status["job"] and status["job"]["job_id"] == job_id  # still running
        await conn.call(P.Attach(session=session, since=0))
        budget = Budget(30)  # load-adjusted hang guard
        while not any(e.kind == "job.finished" for e in events):
            assert not budget.spent()
            await asyncio.sleep(0.05)
        ticks = [e.payload["n"] for e in events if e.kind == "diag.tick"]
        assert ticks == list(range(1, 301))
        seqs = [e.seq for e in events if e.session == session]
        assert seqs == list(range(1, len(seqs) + 1))
        assert [e.payload["status"] for e in events if e.kind == "job.finished"] == ["done"]
        await conn.call(P.Shutdown())
        await conn.closed.wait()
    try:
        run(reattach())
    except BaseException:
        os.kill(backend_pid, signal.SIGKILL)  # never leave a detached backend behind
        raise
    deadline = time.monotonic() + 10
    while _alive(backend_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(backend_pid)
    assert not P.socket_path(qlw_home).exists()
    assert "listening on" in (qlw_home / "logs" / "backend.log").read_text()


def test_kill_9_mid_job_leaves_a_readable_store_marked_interrupted(qlw_home):
    proc = start_backend(qlw_home)

    async def start_job():
        events = []
        conn = await Connection.open(P.socket_path(qlw_home), "t", events.append)
        await conn.call(P.Attach())
        job = await conn.call(P.DiagTicker(count=100000, rate=500))
        while sum(e.kind == "diag.tick" for e in events) < 200:
            await asyncio.sleep(0.01)
        await conn.close()
        return job["session"], max(e.seq for e in events)

    session, seen = run(start_job())
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    store = Store(qlw_home / "sessions.db")
    assert store.integrity_check() == "ok"
    events = store.events(session)
    assert len(events) >= seen and [e.seq for e in events] == list(range(1, len(events) + 1))
    assert store.get_session(session).status == "running"  # as the dead backend left it
    store.close()

    proc = start_backend(qlw_home)  # a new backend (stale socket and all) takes over
    try:
        async def check():
            conn = await Connection.open(P.socket_path(qlw_home), "t")
            listed = (await conn.call(P.ListSessions()))["sessions"]
            assert listed[0]["id"] == session and listed[0]["status"] == "interrupted"
            await conn.close()
        run(check())
    finally:
        stop_backend(proc)


def test_qlw_stop_asks_the_job_to_stop_first(qlw_home):
    proc = start_backend(qlw_home)
    try:
        async def start_job():
            conn = await Connection.open(P.socket_path(qlw_home), "t")
            job = await conn.call(P.DiagTicker(count=100000, rate=50))
            await conn.close()
            return job
        job = run(start_job())
        out = subprocess.run([sys.executable, "-m", "tui.cli", "stop"], capture_output=True, text=True,
                             env=_env(qlw_home), timeout=60)
        assert out.returncode == 0, out.stderr
        assert f"asking job {job['job_id']} to stop" in out.stdout and "stopped" in out.stdout
        proc.wait(10)
        store = Store(qlw_home / "sessions.db")
        kinds = [(e.kind, e.payload.get("status")) for e in store.events(job["session"])]
        assert ("job.finished", "cancelled") in kinds
        assert store.get_session(job["session"]).status == "cancelled"
    finally:
        stop_backend(proc)


def test_cli_status_and_version(backend):
    env = _env(backend)
    out = subprocess.run([sys.executable, "-m", "tui.cli", "status"], capture_output=True, text=True, env=env)
    assert out.returncode == 0
    for key in ("pid", "uptime", "protocol 1", "job", "data home", str(backend)):
        assert key in out.stdout
    out = subprocess.run([sys.executable, "-m", "tui.cli", "--version"], capture_output=True, text=True, env=env)
    assert out.stdout.startswith("qlw ") and "protocol" in out.stdout


@pytest.mark.parametrize("module, forbidden", [
    ("tui.app", ["torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate"]),
    ("tui.cli", ["torch", "transformers", "peft", "trl", "bitsandbytes", "datasets"]),
    ("backend.protocol", ["textual", "rich", "torch"]),
    ("backend", ["textual", "rich"]),
    ("sessions", ["textual", "rich", "torch"]),
    # The server starts fast: the ML stack is imported by jobs, not at start-up.
    ("backend.server", ["textual", "rich", "torch", "transformers"]),
])
def test_import_hygiene(module, forbidden):
    code = f"import sys, {module}; print(' '.join(m for m in {forbidden!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {module} loaded {out.stdout.strip()}"


def test_tiny_prepare_job_builds_once_and_can_be_cancelled(backend):
    async def body():
        events = []
        conn = await Connection.open(P.socket_path(backend), "t", events.append)
        await conn.call(P.Attach())

        async def finished(job_id):
            budget = Budget(300)  # load-adjusted hang guard
            while True:
                for e in events:
                    if e.kind == "job.finished" and e.payload["job_id"] == job_id:
                        return e.payload
                assert not budget.spent()
                await asyncio.sleep(0.05)

        first = await conn.call(P.PrepareTiny())
        while not any(e.kind == "job.progress" and e.payload["stage"] == "pretrain" for e in events):
            await asyncio.sleep(0.05)
        await conn.call(P.CancelJob(job_id=first["job_id"]))
        assert (await finished(first["job_id"]))["status"] == "cancelled"
        assert not (backend / "models" / "qlw-tiny-llama").exists()  # nothing half-built left

        second = await conn.call(P.PrepareTiny())
        done = await finished(second["job_id"])
        assert done["status"] == "done" and done["result"]["path"].endswith("qlw-tiny-llama")
        stages = {e.payload["stage"] for e in events if e.kind == "job.progress" and e.payload["job_id"] == second["job_id"]}
        assert {"tokenizer", "pretrain", "save"} <= stages
        third = await conn.call(P.PrepareTiny())  # cached: at once
        assert (await finished(third["job_id"]))["status"] == "done"
        rebuilt = {e.payload["stage"] for e in events if e.kind == "job.progress" and e.payload["job_id"] == third["job_id"]}
        assert not {"tokenizer", "pretrain", "save"} & rebuilt  # the cached model, not built again
        await conn.close()
    run(body(), timeout=400)  # two builds' worth of CPU time on a busy 2-core machine
