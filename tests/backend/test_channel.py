"""The channel against a real backend process: hello, requests, events, replay, robustness."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import time

import pytest

from backend import protocol as P
from tests.conftest import start_backend, stop_backend
from tui.client import Connection, RequestFailed, VersionMismatch


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def open_conn(home, events=None, name="test"):
    return await Connection.open(P.socket_path(home), name, events.append if events is not None else None)


async def wait_for(cond, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def finished(events, job_id):
    return any(e.kind == "job.finished" and e.payload["job_id"] == job_id for e in events)


def raw_exchange(home, lines: list[bytes], expect: int, timeout=10.0) -> list[dict]:
    """Send raw bytes on a plain socket; return the first ``expect`` JSON lines received."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(P.socket_path(home)))
    for line in lines:
        s.sendall(line)
    buf = b""
    out = []
    while len(out) < expect:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf and len(out) < expect:
            line, buf = buf.split(b"\n", 1)
            out.append(json.loads(line))
    s.close()
    return out


HELLO = P.encode(P.Hello(P.PROTOCOL_VERSION, "raw"))


def test_hello_ping_status(backend):
    async def body():
        conn = await open_conn(backend)
        assert conn.welcome.protocol == P.PROTOCOL_VERSION and conn.welcome.data_home == str(backend)
        assert (await conn.call(P.Ping("abc")))["payload"] == "abc"
        status = await conn.call(P.Status())
        assert status["protocol"] == P.PROTOCOL_VERSION and status["job"] is None
        assert status["pid"] == conn.welcome.pid and status["uptime_s"] >= 0
        await conn.close()
    run(body())


def test_socket_and_folder_are_private(backend):
    sock = P.socket_path(backend)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(sock).st_mode)


def test_version_mismatch_is_a_clear_error(backend):
    out = raw_exchange(backend, [P.encode(P.Hello(P.PROTOCOL_VERSION + 41, "old-qlw"))], 1)
    assert out[0]["type"] == "reply" and out[0]["code"] == P.VERSION_MISMATCH
    assert "qlw stop" in out[0]["reason"]

    async def body():
        import tui.client as client
        old = P.PROTOCOL_VERSION
        try:
            P.PROTOCOL_VERSION = old + 1  # the client now speaks a newer version
            with pytest.raises(VersionMismatch, match="protocol mismatch"):
                await open_conn(backend)
        finally:
            P.PROTOCOL_VERSION = old
        conn = await open_conn(backend)  # the server is fine
        assert (await conn.call(P.Ping()))["payload"] == ""
        await conn.close()
    run(body())


def test_bad_and_oversized_messages_get_error_replies(backend):
    big = b'{"type":"request","id":"big","method":"ping","params":{"payload":"' + b"x" * (P.MAX_MESSAGE_BYTES + 10) + b'"}}\n'
    lines = [
        P.encode(P.Request("early", "ping", {})),  # before hello
        HELLO,
        b"this is not json\n",
        b"\xff\xfe\xfd\n",
        b'{"type":"teleport"}\n',
        b'{"type":"request","id":"u1","method":"no.such.method","params":{}}\n',
        b'{"type":"request","id":"u2","method":"attach","params":{"since":"yesterday"}}\n',
        b'{"type":"welcome","protocol":1,"server_version":"x","pid":1,"started":0,"data_home":"/"}\n',
        big,
        P.encode(P.Request("after", "ping", {"payload": "still here"})),
    ]
    out = raw_exchange(backend, lines, 10)
    codes = [(m.get("id"), m.get("code") or m["type"]) for m in out]
    assert codes == [
        ("early", P.NOT_READY),
        (None, "welcome"),
        ("", P.BAD_JSON),
        ("", P.BAD_JSON),
        ("", P.UNKNOWN_TYPE),
        ("u1", P.UNKNOWN_METHOD),
        ("u2", P.BAD_MESSAGE),
        ("", P.BAD_MESSAGE),
        ("", P.TOO_LARGE),
        ("after", "reply"),
    ]
    assert out[-1]["status"] == "ok" and out[-1]["result"]["payload"] == "still here"
    assert "'since' must be int" in out[6]["reason"]
    log = (backend / "backend-test.log").read_text()
    assert "unknown method 'no.such.method'" in log
    assert f"bytes (limit {P.MAX_MESSAGE_BYTES}): skipped" in log


def test_job_events_and_second_job_refused(backend):
    async def body():
        events = []
        conn = await open_conn(backend, events)
        await conn.call(P.Attach())
        started = await conn.call(P.DiagTicker(count=200, rate=200))
        reply = await conn.request(P.DiagBurn(seconds=0.1))
        assert reply.status == "refused" and "diag.ticker" in reply.reason and "cancel" in reply.reason
        await wait_for(lambda: finished(events, started["job_id"]), what="job end")
        ticks = [e.payload["n"] for e in events if e.kind == "diag.tick"]
        assert ticks == list(range(1, 201))
        fin = [e for e in events if e.kind == "job.finished"][-1]
        assert fin.payload["status"] == "done" and fin.payload["result"]["sent"] == 200
        assert fin.session == started["session"]
        seqs = [e.seq for e in events if e.session == started["session"]]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        await conn.close()
    run(body())


def test_cancel_reaches_the_job(backend):
    async def body():
        events = []
        conn = await open_conn(backend, events)
        await conn.call(P.Attach())
        job = await conn.call(P.DiagTicker(count=100000, rate=100))
        await wait_for(lambda: sum(e.kind == "diag.tick" for e in events) >= 5, what="ticks")
        assert (await conn.call(P.CancelJob(job_id=job["job_id"])))["job_id"] == job["job_id"]
        await wait_for(lambda: finished(events, job["job_id"]), what="cancel")
        fin = [e for e in events if e.kind == "job.finished"][-1]
        assert fin.payload["status"] == "cancelled"
        status = [e.payload["status"] for e in events if e.kind == "session.status"]
        assert status[-1] == "cancelled"
        assert (await conn.request(P.CancelJob())).status == "refused"
        await conn.close()
    run(body())


def test_replay_while_events_keep_coming_has_no_gap_or_duplicate(backend):
    """Clients attach (and re-attach from a midpoint) while a job emits as fast as it can."""
    async def body():
        live = []
        producer = await open_conn(backend, live)
        await producer.call(P.Attach())
        job = await producer.call(P.DiagTicker(count=3000, rate=0))
        session = job["session"]
        late, mid = [], []
        await wait_for(lambda: sum(e.kind == "diag.tick" for e in live) > 300, what="first ticks")
        c1 = await open_conn(backend, late)
        r1 = await c1.call(P.Attach(session=session, since=0))
        c2 = await open_conn(backend, mid)
        r2 = await c2.call(P.Attach(session=session, since=150))
        assert r1["session"] == r2["session"] == session
        for evs in (live, late, mid):
            await wait_for(lambda evs=evs: finished(evs, job["job_id"]), what="job end everywhere")
        full = [e.seq for e in late if e.session == session]
        assert full == list(range(1, full[-1] + 1))
        assert [e.seq for e in mid if e.session == session] == list(range(151, full[-1] + 1))
        assert [e.seq for e in live if e.session == session] == full  # the live client saw all too
        for c in (producer, c1, c2):
            await c.close()
    run(body())


def test_two_clients_see_the_same_live_stream(backend):
    async def body():
        a, b = [], []
        ca, cb = await open_conn(backend, a, "a"), await open_conn(backend, b, "b")
        await ca.call(P.Attach())
        await cb.call(P.Attach())
        job = await ca.call(P.DiagTicker(count=500, rate=0))
        await wait_for(lambda: finished(a, job["job_id"]) and finished(b, job["job_id"]), what="both")
        # Session events; telemetry (gpu.sample) depends on when each client attached.
        key = lambda evs: [(e.session, e.seq, e.kind) for e in evs if e.seq is not None]
        assert key(a) == key(b) and len(a) >= 500
        assert (await cb.call(P.Status()))["clients"] == 2
        await ca.close()
        await cb.close()
    run(body())


def test_slow_client_is_dropped_and_others_are_unaffected(qlw_home, monkeypatch):
    monkeypatch.setenv("QLW_CLIENT_QUEUE_LIMIT", "300")
    proc = start_backend(qlw_home)
    try:
        async def body():
            # A client that attaches and then never reads.
            r, w = await asyncio.open_unix_connection(str(P.socket_path(qlw_home)))
            w.write(HELLO + P.encode(P.Request("a", "attach", {})))
            await w.drain()
            events = []
            good = await open_conn(qlw_home, events)
            await good.call(P.Attach())
            job = await good.call(P.DiagTicker(count=6000, rate=2000))
            t0 = time.monotonic()
            pings = []
            while not finished(events, job["job_id"]):
                t = time.perf_counter()
                await good.call(P.Ping())
                pings.append(time.perf_counter() - t)
                await asyncio.sleep(0.01)
            assert sum(e.kind == "diag.tick" for e in events) == 6000
            # The stuck client never held the loop: no ping waited for the job's end (a share of
            # the job's own time, so that a loaded machine slows both alike).
            assert len(pings) > 3 and max(pings) < (time.monotonic() - t0) / 3, (max(pings), len(pings))
            assert (await good.call(P.Status()))["clients"] == 1  # the stuck one is gone
            w.close()
            await good.close()
        run(body())
        assert "fell more than 300 messages behind" in (qlw_home / "backend-test.log").read_text()
    finally:
        stop_backend(proc)


def test_ping_answers_while_a_cpu_bound_job_runs(backend):
    async def body():
        events = []
        conn = await open_conn(backend, events)
        await conn.call(P.Attach())
        job = await conn.call(P.DiagBurn(seconds=2.0))
        lat = []
        while not finished(events, job["job_id"]):
            t = time.perf_counter()
            await conn.call(P.Ping())
            lat.append(time.perf_counter() - t)
            await asyncio.sleep(0.005)
        assert len(lat) > 20  # the loop kept answering all through the job
        assert max(lat) < 1.0  # (the p99 target lives in bench/channel.py)
        await conn.close()
    run(body())


def test_sessions_list_and_new(backend):
    async def body():
        conn = await open_conn(backend)
        first = (await conn.call(P.NewSession(name="one", config={"r": 8})))["session"]
        await asyncio.sleep(0.01)
        second = (await conn.call(P.NewSession(name="two")))["session"]
        listed = (await conn.call(P.ListSessions()))["sessions"]
        assert [s["name"] for s in listed[:2]] == ["two", "one"]
        assert listed[1]["config"] == {"r": 8}
        assert (await conn.call(P.Status()))["session"] == second["id"]
        with pytest.raises(RequestFailed, match="no session"):
            await conn.call(P.Attach(session="missing"))
        await conn.close()
    run(body())


def test_one_backend_per_home(backend):
    import subprocess, sys
    out = subprocess.run([sys.executable, "-m", "backend", "serve", "--home", str(backend)],
                         capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert out.returncode == 3 and "already serves" in out.stderr
    run(_ping(backend))


async def _ping(home):
    conn = await open_conn(home)
    await conn.call(P.Ping())
    await conn.close()
