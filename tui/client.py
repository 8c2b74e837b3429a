"""The channel's client: connect (starting the backend if none), requests, events, re-attach.

Used by the Textual app and by the headless commands (``qlw status``, ``qlw stop``, ...). It
imports only :mod:`backend.protocol` from the backend, so it stays cheap.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from backend import protocol as P

log = logging.getLogger("qlw.client")

EventHandler = Callable[[P.Event], Any]


class BackendUnavailable(ConnectionError):
    """No backend answers on the socket (and none could be started)."""


class VersionMismatch(ConnectionError):
    """The backend speaks another protocol version; the message says what to do."""


class RequestFailed(RuntimeError):
    """A request got an ``error`` or ``refused`` reply (see ``reply``)."""

    def __init__(self, reply: P.Reply):
        super().__init__(reply.reason or reply.code or reply.status)
        self.reply = reply


class Connection:
    """One open connection: the hello exchange, requests matched to replies by id, events
    handed to ``on_event`` in order."""

    _ids = itertools.count(1)

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_event: EventHandler | None = None):
        self._reader = reader
        self._writer = writer
        self._on_event = on_event or (lambda ev: None)
        self._pending: dict[str, asyncio.Future] = {}
        self._welcome: asyncio.Future = asyncio.get_running_loop().create_future()
        self.welcome: P.Welcome | None = None
        self.closed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def open(cls, path: Path, client: str = "qlw", on_event: EventHandler | None = None,
                   timeout: float = 5.0) -> "Connection":
        """Connect to the socket at ``path`` and say hello; raises :class:`BackendUnavailable`
        or :class:`VersionMismatch`."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(path), limit=P.MAX_MESSAGE_BYTES + 1), timeout)
        except (FileNotFoundError, ConnectionRefusedError, asyncio.TimeoutError, OSError) as exc:
            raise BackendUnavailable(f"no backend at {path}: {exc.__class__.__name__}: {exc}") from None
        conn = cls(reader, writer, on_event)
        writer.write(P.encode(P.Hello(P.PROTOCOL_VERSION, client)))
        try:
            await asyncio.wait_for(asyncio.shield(conn._welcome), timeout)
        except asyncio.TimeoutError:
            await conn.close()
            raise BackendUnavailable(f"the backend at {path} did not answer hello within {timeout:.0f} s") from None
        except BaseException:
            await conn.close()
            raise
        return conn

    async def request(self, params: Any, timeout: float | None = 30.0) -> P.Reply:
        """Send a typed request (e.g. ``P.Ping()``) and wait for its reply (any status)."""
        rid = f"r{next(self._ids)}"
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            self._writer.write(P.encode(P.make_request(rid, params)))
            await self._writer.drain()
            return await asyncio.wait_for(fut, timeout)
        except (ConnectionError, OSError) as exc:
            raise BackendUnavailable(f"connection lost: {exc}") from None
        finally:
            self._pending.pop(rid, None)

    async def call(self, params: Any, timeout: float | None = 30.0) -> dict[str, Any]:
        """Like :meth:`request`, but returns the result and raises :class:`RequestFailed` unless
        the reply is ``ok`` or ``accepted``."""
        reply = await self.request(params, timeout)
        if not reply.ok:
            raise RequestFailed(reply)
        return reply.result

    async def close(self) -> None:
        self._task.cancel()
        try:
            self._writer.close()
        except Exception:
            pass
        self.closed.set()

    async def _read_loop(self) -> None:
        error: BaseException = BackendUnavailable("the backend closed the connection")
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                try:
                    msg = P.decode(line)
                except P.ProtocolError as exc:
                    log.warning("ignoring a bad message from the backend: %s", exc)
                    continue
                if isinstance(msg, P.Event):
                    try:
                        self._on_event(msg)
                    except Exception:
                        log.exception("event handler failed on %s", msg.kind)
                elif isinstance(msg, P.Reply):
                    if msg.code == P.VERSION_MISMATCH and not self._welcome.done():
                        error = VersionMismatch(msg.reason)
                        self._welcome.set_exception(error)
                        break
                    fut = self._pending.get(msg.id)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                    elif msg.status == "error":
                        log.warning("backend error: %s (%s)", msg.reason, msg.code)
                elif isinstance(msg, P.Welcome) and not self._welcome.done():
                    self.welcome = msg
                    self._welcome.set_result(msg)
        except (ConnectionError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            error = BackendUnavailable(f"connection lost: {exc}")
        except asyncio.CancelledError:
            error = BackendUnavailable("connection closed")
        finally:
            if not self._welcome.done():
                self._welcome.set_exception(error)
                self._welcome.exception()  # mark retrieved
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(error)
            self.closed.set()


# ------------------------------------------------------------------------------------------------
# Starting a backend.


def backend_log_path(home: Path) -> Path:
    return home / "logs" / "backend.log"


def spawn_backend(home: Path) -> subprocess.Popen:
    """Start ``python -m backend serve`` detached from this terminal: its own session (no
    SIGHUP when the terminal goes), stdin from /dev/null, output appended to the log file."""
    home.mkdir(parents=True, exist_ok=True)
    logfile = backend_log_path(home)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # Running from a source checkout: let the child find the same packages as this process.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["QLW_HOME"] = str(home)
    with open(logfile, "ab", buffering=0) as out:
        return subprocess.Popen(
            [sys.executable, "-m", "backend", "serve", "--home", str(home)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=str(home), env=env, start_new_session=True, close_fds=True,
        )


async def connect(home: Path | None = None, client: str = "qlw", on_event: EventHandler | None = None,
                  start: bool = True, timeout: float = 30.0) -> Connection:
    """Connect to the backend of ``home``, starting one if none runs (``start``)."""
    home = Path(home) if home is not None else P.data_home()
    path = P.socket_path(home)
    try:
        return await Connection.open(path, client, on_event)
    except BackendUnavailable:
        if not start:
            raise
    proc = spawn_backend(home)
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        try:
            return await Connection.open(path, client, on_event)
        except BackendUnavailable:
            code = proc.poll()
            if code is not None:
                # Exit 3: another backend won the race for the lock; it will be listening soon.
                if code != 3:
                    raise BackendUnavailable(
                        f"the backend exited with code {code} while starting; see {backend_log_path(home)}"
                    ) from None
            if time.monotonic() > deadline:
                raise BackendUnavailable(
                    f"the backend did not start within {timeout:.0f} s; see {backend_log_path(home)}"
                ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.25)


# ------------------------------------------------------------------------------------------------
# The long-lived client of the app: follows one session, re-attaches after a drop.

CONNECTING, CONNECTED, RECONNECTING, GONE = "connecting", "connected", "reconnecting", "gone"


class BackendClient:
    """Keeps the app attached: connects (starting the backend if needed), attaches to the
    current session, replays what it missed after a drop, and reports the connection state.

    ``on_event`` sees every event exactly once, in order; ``on_state(state, detail)`` sees
    connecting / connected / reconnecting / gone.

    With ``listening=False`` the client connects (starting a backend if needed) but attaches,
    which is when the backend starts sending events and replays the session's history, only
    once :meth:`listen` is called: the app calls it when its screen's widgets have subscribed,
    so none of them misses the replay.
    """

    RECONNECT_FOR_S = 10.0

    def __init__(self, home: Path | None, on_event: EventHandler, on_state: Callable[[str, str], Any],
                 client: str = "qlw-tui", start_backend: bool = True, listening: bool = True):
        self.home = Path(home) if home is not None else P.data_home()
        self._on_event = on_event
        self._on_state = on_state
        self.client = client
        self.start_backend = start_backend
        self.conn: Connection | None = None
        self.session: str | None = None
        self.last_seq: dict[str, int] = {}
        self.state = CONNECTING
        self._stop = False
        self._wake = asyncio.Event()
        self._listening = asyncio.Event()
        if listening:
            self._listening.set()

    def _deliver(self, ev: P.Event) -> None:
        if ev.session is not None and ev.seq is not None:
            if ev.seq <= self.last_seq.get(ev.session, 0):
                return  # already seen before a re-attach
            self.last_seq[ev.session] = ev.seq
        if ev.kind == "session.created":
            self.session = ev.payload.get("session", self.session)
        self._on_event(ev)

    def _set_state(self, state: str, detail: str = "") -> None:
        if (state, detail) == (self.state, getattr(self, "_detail", None)):
            return
        self.state, self._detail = state, detail
        self._on_state(state, detail)

    async def request(self, params: Any, timeout: float | None = 30.0) -> P.Reply:
        if self.conn is None:
            raise BackendUnavailable("not connected to the backend")
        return await self.conn.request(params, timeout)

    def listen(self) -> None:
        """Whoever handles ``on_event`` is ready: attach (now, or as soon as connected)."""
        self._listening.set()

    async def _wait_listening(self, conn: Connection) -> None:
        """Until :meth:`listen` (raises :class:`BackendUnavailable` if ``conn`` closes first)."""
        if self._listening.is_set():
            return
        waits = [asyncio.ensure_future(self._listening.wait()), asyncio.ensure_future(conn.closed.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if not self._listening.is_set() or conn.closed.is_set():
            raise BackendUnavailable("connection closed before attaching")

    async def _attach(self, conn: Connection) -> None:
        since = self.last_seq.get(self.session, 0) if self.session else 0
        result = await conn.call(P.Attach(session=self.session, since=since), timeout=None)
        self.session = result.get("session")
        current = result.get("current_session")
        if current and current != self.session:
            # A new session began while we were away: follow it from its start.
            self.session = current
            await conn.call(P.Attach(session=current, since=self.last_seq.get(current, 0)), timeout=None)

    async def run(self) -> None:
        """Connect and stay attached until :meth:`stop`."""
        start, state, lost_at = self.start_backend, CONNECTING, None
        while not self._stop:
            self._set_state(state, "" if state == CONNECTING else "connection lost; re-attaching")
            try:
                conn = await connect(self.home, self.client, self._deliver, start=start)
            except VersionMismatch as exc:
                self._set_state(GONE, str(exc))
                return
            except BackendUnavailable as exc:
                if lost_at is not None and time.monotonic() - lost_at < self.RECONNECT_FOR_S:
                    await asyncio.sleep(0.2)  # a restarting backend comes back within seconds
                    continue
                self._set_state(GONE, f"{exc}. Press ctrl+r to start a backend, or run `qlw serve`.")
                await self._wait_wake()
                start, state, lost_at = True, CONNECTING, None
                continue
            self.conn = conn
            try:
                await self._wait_listening(conn)
                await self._attach(conn)
                self._set_state(CONNECTED, f"backend pid {conn.welcome.pid}")
                await conn.closed.wait()
            except (BackendUnavailable, RequestFailed) as exc:
                log.warning("attach failed: %s", exc)
            finally:
                self.conn = None
                await conn.close()
            start, state, lost_at = False, RECONNECTING, time.monotonic()

    async def _wait_wake(self) -> None:
        self._wake.clear()
        await self._wake.wait()

    def restart(self) -> None:
        """Leave the ``gone`` state: start a backend (if none) and attach again."""
        self.start_backend = True
        self._wake.set()

    async def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self.conn is not None:
            await self.conn.close()
