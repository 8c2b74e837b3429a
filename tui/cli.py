"""The `qlw` command: the workbench, and the headless verbs that share its backend.

`qlw` opens the app (starting a detached backend if none serves the data home); `qlw serve`,
`qlw status`, `qlw stop` manage the backend. Nothing here imports the ML stack.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from backend import protocol as P
from tui import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlw", description="qlw, the QLoRA workbench: fine-tune causal LMs with LoRA/QLoRA in the terminal.")
    parser.add_argument("--version", action="version",
                        version=f"qlw {__version__} (protocol {P.PROTOCOL_VERSION})")
    parser.add_argument("--home", type=Path, default=None,
                        help="data home (default: $QLW_HOME or the platform's user data folder)")
    sub = parser.add_subparsers(dest="cmd")
    serve = sub.add_parser("serve", help="start the backend (detached unless --foreground)")
    serve.add_argument("--foreground", action="store_true", help="run in this terminal; logs to stderr")
    sub.add_parser("status", help="show the running backend: pid, uptime, protocol, job, data home")
    stop = sub.add_parser("stop", help="stop the backend; a running job is asked to stop and save first")
    stop.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the job to save")
    stop.add_argument("--force", action="store_true", help="do not wait for the job")
    # Headless verbs run the backend's own code in this process's place (no daemon is started),
    # so a script gets exactly what the panes show. `qlw VERB --help` lists their options.
    for verb, text in HEADLESS.items():
        p = sub.add_parser(verb, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


#: Headless verbs, run by `python -m backend VERB ...`.
HEADLESS = {
    "data": "inspect a dataset as the Data pane would: shape, mapping, columns, token lengths",
    "train": "train a run config (TOML) headless, printing the loss table",
    "merge": "merge a LoRA adapter into its base model and save it (verify, upload): ADAPTER OUT",
    "export": "write a merged model or an adapter as a GGUF file (Ollama Modelfile, verify): MODEL OUT",
    "eval": "evaluate base, tuned and merged models on the same inputs, printing the table",
    "runs": "the runs ledger: list | show RUN | diff RUN RUN... (Markdown) | export RUN... (CSV)",  # issue 18
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb_at = _verb_index(argv)
    if verb_at is not None and argv[verb_at] in HEADLESS:
        # Everything after the verb belongs to it, --help included.
        args = _parser().parse_args(argv[:verb_at + 1])
        home = (args.home.expanduser().resolve() if args.home else P.data_home())
        _exec_backend(argv[verb_at:], home)
    args = _parser().parse_args(argv)
    home = (args.home.expanduser().resolve() if args.home else P.data_home())
    if args.cmd is None:
        from tui.app import QlwApp

        app = QlwApp(home=home)
        app.run()
        if app.farewell:
            print(app.farewell)
        return 0
    if args.cmd == "serve":
        return _serve(home, args.foreground)
    if args.cmd == "status":
        return asyncio.run(_status(home))
    if args.cmd == "stop":
        return asyncio.run(_stop(home, args.timeout, args.force))
    return 2


def _verb_index(argv: list[str]) -> int | None:
    """Where the sub-command is in ``argv`` (skipping global options and their values)."""
    i = 0
    while i < len(argv):
        if argv[i] == "--home":
            i += 2
            continue
        if argv[i].startswith("-"):
            i += 1
            continue
        return i
    return None


def _exec_backend(argv: list[str], home: Path) -> None:
    """Replace this process with `python -m backend ARGV` (same interpreter, same packages)."""
    root = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    os.environ["QLW_HOME"] = str(home)
    os.environ["QLW_PROG"] = "qlw"
    os.execv(sys.executable, [sys.executable, "-m", "backend", *argv])


def _serve(home: Path, foreground: bool) -> int:
    if foreground:
        _exec_backend(["serve", "--home", str(home)], home)

    async def start() -> int:
        from tui.client import BackendUnavailable, connect

        try:
            conn = await connect(home, "qlw-serve", start=True)
        except BackendUnavailable as exc:
            print(f"qlw: {exc}", file=sys.stderr)
            return 1
        status = await conn.call(P.Status())
        await conn.close()
        print(f"qlw backend running: pid {status['pid']}, socket {status['socket']}, data home {status['data_home']}")
        return 0

    return asyncio.run(start())


async def _status(home: Path) -> int:
    from tui.client import BackendUnavailable, Connection, VersionMismatch

    try:
        conn = await Connection.open(P.socket_path(home), "qlw-status")
    except VersionMismatch as exc:
        print(f"qlw: {exc}", file=sys.stderr)
        return 1
    except BackendUnavailable:
        print(f"no qlw backend is running for {home} (start one with `qlw` or `qlw serve`)")
        return 1
    s = await conn.call(P.Status())
    await conn.close()
    job = s["job"]
    if job:
        progress = f" {job['stage']} {job['done']:g}/{job['total']:g}" if job.get("total") else ""
        job_text = f"{job['kind']} ({job['job_id']}) since {time.strftime('%H:%M:%S', time.localtime(job['started']))}{progress}"
    else:
        job_text = "none"
    rows = [
        ("pid", s["pid"]),
        ("uptime", _duration(s["uptime_s"])),
        ("version", f"{s['server_version']} (protocol {s['protocol']})"),
        ("job", job_text),
        ("session", s["session"] or "none"),
        ("clients", s["clients"] - 1),
        ("data home", s["data_home"]),
        ("socket", s["socket"]),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


async def _stop(home: Path, timeout: float, force: bool) -> int:
    from tui.client import BackendUnavailable, Connection

    try:
        conn = await Connection.open(P.socket_path(home), "qlw-stop")
    except BackendUnavailable:
        print(f"no qlw backend is running for {home}")
        return 0
    pid = conn.welcome.pid
    result = await conn.call(P.Shutdown(graceful=not force, timeout=timeout))
    if result.get("stopping_job"):
        print(f"asking job {result['stopping_job']} to stop and save (up to {timeout:.0f} s)...")
    await conn.closed.wait()  # the backend closes the connection when it has stopped serving
    deadline = time.monotonic() + timeout + 5
    while _alive(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if _alive(pid):
        print(f"the backend (pid {pid}) is still running", file=sys.stderr)
        return 1
    print(f"qlw backend (pid {pid}) stopped")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child (only when we started it ourselves) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


if __name__ == "__main__":
    sys.exit(main())
