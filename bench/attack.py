"""Misbehaving clients: does the backend stay responsive, and does a running job keep its pace?

    python bench/attack.py [--seconds 10] [--clients 20] [--rate 0] [--smoke]

Starts a real backend on a temporary data home and runs two phases of ``--seconds`` each, each
with its own session and a ``diag.ticker`` job (``--rate`` events per second, 0 = as fast as the
backend can record and broadcast them, the loop's worst case):
  1. baseline: one client pings every 10 ms (not attached, so it measures the loop, not the
     broadcast);
  2. attack: the same, while
     - a client attaches, keeps sending requests for 256 KiB replies and never reads (the backend
       must drop it once its queue holds --queue-bytes, not block on it nor keep it all),
     - a client sends garbage at ``--garbage-rate`` lines per second (random bytes, truncated and
       mistyped JSON, unknown methods, wrong field types, huge numbers, unicode) and one 5 MiB
       line, reading the error replies,
     - ``--clients`` more clients connect at once, attach (replaying the session) and ping every
       50 ms while receiving every event.
The job's rate is read from the store (events recorded per second of the phase, first 0.5 s left
out), not from a client, so it counts what the backend did whoever was listening.
Prints a table and writes bench/results/attack.json (not with --smoke, which is short and is
what tests/backend/test_faults.py runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import socket
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from backend import protocol as P  # noqa: E402
from tui.client import Connection  # noqa: E402


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def _pinger(conn: Connection, stop: asyncio.Event, every: float, out: list[float]) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await conn.call(P.Ping("x"), timeout=30)
        out.append((time.perf_counter() - t) * 1000)
        await asyncio.sleep(every)


def _garbage_lines(rng: random.Random):
    """An endless mix of what a broken or hostile client might send."""
    methods = sorted(P.REQUESTS)
    while True:
        pick = rng.randrange(9)
        if pick == 0:
            yield bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))).replace(b"\n", b"") + b"\n"
        elif pick == 1:
            yield b'{"type": "request", "id": "g", "method": "ping", "par' + b"\n"  # truncated
        elif pick == 2:
            yield json.dumps({"type": "request", "id": rng.random(), "method": rng.choice(methods),
                              "params": {"x": [1] * 50}}).encode() + b"\n"
        elif pick == 3:
            yield json.dumps({"type": "request", "id": "n", "method": "diag.ticker",
                              "params": {"count": 10 ** 30, "rate": -1e308}}).encode() + b"\n"
        elif pick == 4:
            yield json.dumps({"type": "request", "id": "u", "method": "sessions.list",
                              "params": {"limit": "ünï\u202e\ud7ff" * 20}}, ensure_ascii=False).encode() + b"\n"
        elif pick == 5:
            yield json.dumps({"type": "event", "kind": "job.finished", "payload": {}}).encode() + b"\n"
        elif pick == 6:
            yield b"[" * 5000 + b"\n"  # deep nesting
        elif pick == 7:
            yield json.dumps({"type": "request", "id": "m", "method": "no.such", "params": None}).encode() + b"\n"
        else:
            yield json.dumps({"type": "request", "id": "p", "method": "ping", "params": {"payload": 12}}).encode() + b"\n"


async def _garbage(path: Path, stop: asyncio.Event, rate: float, stats: dict) -> None:
    reader, writer = await asyncio.open_unix_connection(str(path), limit=P.MAX_MESSAGE_BYTES + 1)

    async def read_replies():
        while True:
            line = await reader.readline()
            if not line:
                return
            stats["garbage_replies"] += 1

    task = asyncio.create_task(read_replies())
    rng = random.Random(9)
    lines = _garbage_lines(rng)
    writer.write(b"x" * (5 * 1024 * 1024) + b"\n")  # one line over the 4 MiB limit
    writer.write(P.encode(P.Hello(P.PROTOCOL_VERSION, "garbage")))
    interval = 1.0 / rate if rate > 0 else 0.0
    try:
        while not stop.is_set():
            writer.write(next(lines))
            stats["garbage_sent"] += 1
            await writer.drain()
            await asyncio.sleep(interval)
    except (ConnectionError, OSError):
        stats["garbage_disconnected"] = True
    writer.close()
    await asyncio.sleep(0.2)
    task.cancel()


def _slow_client(path: Path, session: str, stop: asyncio.Event, stats: dict) -> None:
    """A client that attaches (so it is sent every event), keeps asking for 256 KiB pings, and
    never reads a byte: the backend must drop it once its queue is full, not hold it all."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(str(path))
    s.settimeout(1.0)
    big = P.encode(P.make_request("big", P.Ping("z" * (256 * 1024))))
    try:
        s.sendall(P.encode(P.Hello(P.PROTOCOL_VERSION, "slow")))
        s.sendall(P.encode(P.make_request("a", P.Attach(session=session, since=0))))
        while not stop.is_set():
            s.sendall(big)
            stats["slow_sent"] += 1
            time.sleep(0.02)
    except (socket.timeout, OSError):
        pass  # dropped (reset), or the backend stopped reading from it
    # Was it dropped? Read what is buffered until the end of the stream.
    s.settimeout(5.0)
    deadline = time.monotonic() + 5.0
    try:
        while time.monotonic() < deadline:
            if not s.recv(1 << 20):
                stats["slow_client_dropped"] = True
                break
    except ConnectionResetError:
        stats["slow_client_dropped"] = True
    except (socket.timeout, OSError):
        pass
    finally:
        s.close()


async def _crowd_member(path: Path, session: str, stop: asyncio.Event, stats: dict) -> None:
    conn = await Connection.open(path, "crowd", lambda ev: None, timeout=30)
    await conn.call(P.Attach(session=session, since=0), timeout=60)
    lat: list[float] = []
    await _pinger(conn, stop, 0.05, lat)
    stats["crowd_pings"] += len(lat)
    stats["crowd_lat"].extend(lat)
    await conn.close()


def _job_rate(home: Path, session: str, job: str, t0: float, t1: float) -> float:
    """The ticker's recorded events per second, or the burner's loops per second."""
    conn = sqlite3.connect(f"file:{home / 'sessions.db'}?mode=ro", uri=True, timeout=10)
    try:
        if job == "burn":
            row = conn.execute("SELECT payload FROM events WHERE session_id=? AND kind='job.finished'",
                               (session,)).fetchone()
            end = json.loads(row[0]) if row else {}
            loops, elapsed = (end.get("result") or {}).get("loops"), end.get("elapsed_s")
            return round(loops / elapsed, 1) if loops and elapsed else 0.0
        n, first, last = conn.execute(
            "SELECT COUNT(*), MIN(time), MAX(time) FROM events WHERE session_id=? AND kind='diag.tick' "
            "AND time BETWEEN ? AND ?", (session, t0 + 0.5, t1)).fetchone()
    finally:
        conn.close()
    return round((n - 1) / (last - first), 1) if n and n > 1 and last > first else 0.0


async def _phase(home: Path, seconds: float, attack: bool, clients: int, job_kind: str, rate: float,
                 garbage_rate: float) -> dict:
    path = P.socket_path(home)
    control = await Connection.open(path, "control")
    session = (await control.call(P.NewSession(name=f"{job_kind} {'attack' if attack else 'baseline'}")))["session"]["id"]
    request = P.DiagBurn(seconds=3600) if job_kind == "burn" else P.DiagTicker(count=10_000_000, rate=rate)
    job = await control.call(request)
    pinger = await Connection.open(path, "pinger")
    stop = asyncio.Event()
    stats = {"garbage_sent": 0, "garbage_replies": 0, "garbage_disconnected": False, "crowd_pings": 0,
             "crowd_lat": [], "slow_sent": 0, "slow_client_dropped": False}
    lat: list[float] = []
    tasks = [asyncio.create_task(_pinger(pinger, stop, 0.01, lat))]
    t0 = time.time()
    if attack:
        tasks.append(asyncio.create_task(asyncio.to_thread(_slow_client, path, session, stop, stats)))
        tasks.append(asyncio.create_task(_garbage(path, stop, garbage_rate, stats)))
        tasks += [asyncio.create_task(_crowd_member(path, session, stop, stats)) for _ in range(clients)]
    await asyncio.sleep(seconds)
    t1 = time.time()
    stop.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    await control.call(P.CancelJob(job_id=job["job_id"]))
    for _ in range(200):
        if (await control.call(P.Status()))["job"] is None:
            break
        await asyncio.sleep(0.05)
    out = {
        "job": job_kind, "seconds": seconds, "pings": len(lat), "ping_p50_ms": round(_pct(lat, 0.5), 3),
        "ping_p99_ms": round(_pct(lat, 0.99), 3), "ping_max_ms": round(max(lat), 3) if lat else None,
        "job_rate": _job_rate(home, session, job_kind, t0, t1), "errors": errors,
    }
    if attack:
        crowd = stats.pop("crowd_lat")
        out.update(stats, crowd_clients=clients, crowd_p50_ms=round(_pct(crowd, 0.5), 3),
                   crowd_p99_ms=round(_pct(crowd, 0.99), 3))
    await pinger.close()
    await control.close()
    return out


async def measure(home: Path, seconds: float = 10.0, clients: int = 20, rate: float = 200.0,
                  garbage_rate: float = 1000.0, jobs: tuple[str, ...] = ("ticker", "burn")) -> dict:
    """For each job kind, a baseline phase and an attack phase against the backend serving ``home``."""
    out: dict = {"rate_requested": rate, "garbage_rate": garbage_rate, "clients": clients}
    for kind in jobs:
        base = await _phase(home, seconds, False, clients, kind, rate, garbage_rate)
        hit = await _phase(home, seconds, True, clients, kind, rate, garbage_rate)
        out[kind] = {"baseline": base, "attack": hit}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--rate", type=float, default=200.0, help="ticker events per second (0: as fast as possible)")
    ap.add_argument("--jobs", nargs="+", default=["ticker", "burn"], choices=["ticker", "burn"])
    ap.add_argument("--garbage-rate", type=float, default=1000.0, help="garbage lines per second (0: flat out)")
    ap.add_argument("--queue-bytes", type=int, default=16 * 1024 * 1024,
                    help="QLW_CLIENT_QUEUE_BYTES for the backend (its default, 64 MiB, takes longer than a phase to fill)")
    ap.add_argument("--smoke", action="store_true", help="2 s phases, nothing written")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "attack.json")
    args = ap.parse_args()
    if args.smoke:
        args.seconds = 2.0
    from tests.conftest import start_backend, stop_backend

    home = Path(tempfile.mkdtemp(prefix="qlwa-", dir="/tmp"))
    os.environ["QLW_CLIENT_QUEUE_BYTES"] = str(args.queue_bytes)
    proc = start_backend(home)
    try:
        results = asyncio.run(measure(home, args.seconds, args.clients, args.rate, args.garbage_rate, tuple(args.jobs)))
    finally:
        stop_backend(proc)
        shutil.rmtree(home, ignore_errors=True)
    results["machine"] = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M"),
                          "loadavg_after": os.getloadavg()}
    print(f"{'':<44} {'ping p50':>10} {'ping p99':>10} {'ping max':>10} {'job rate':>14}")
    for kind in args.jobs:
        unit = "loops/s" if kind == "burn" else "events/s"
        job = f"burn (a core in Python)" if kind == "burn" else f"ticker at {args.rate:g}/s"
        for phase in ("baseline", "attack"):
            r = results[kind][phase]
            name = f"{job}, {'alone' if phase == 'baseline' else 'under attack'}"
            print(f"{name:<44} {r['ping_p50_ms']:>8.2f}ms {r['ping_p99_ms']:>8.2f}ms {r['ping_max_ms']:>8.2f}ms "
                  f"{r['job_rate']:>8,.0f} {unit}")
        a = results[kind]["attack"]
        print(f"    attack: {a['crowd_pings']} crowd pings (p50 {a['crowd_p50_ms']:.2f} ms, p99 {a['crowd_p99_ms']:.2f} ms); "
              f"{a['garbage_sent']} garbage lines, {a['garbage_replies']} error replies; "
              f"slow client dropped: {a['slow_client_dropped']}; client errors: {len(a['errors'])}")
    if not args.smoke:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
