"""The backend's asyncio server: clients, dispatch, broadcast, replay on attach.

The event loop only moves messages; work runs in :mod:`backend.jobs`. Every event of a session
is written to the store before it is broadcast. A client that attaches gets the replay of a
session from the store and then the live stream; live events that arrive during the replay are
held back and sent after it, skipping any the replay already carried (no gap, no duplicate).
Each client has a bounded queue: a client that falls too far behind is dropped (it can
re-attach), so one slow terminal never blocks the others or the loop.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import re
import signal
import stat
import time
from collections import deque
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from backend import __version__, protocol as P
from backend.jobs import JobBusy, JobRunner
from sessions.store import Store

log = logging.getLogger("qlw.server")

#: Lines a client may have waiting before it is dropped as too slow (QLW_CLIENT_QUEUE_LIMIT).
CLIENT_QUEUE_LIMIT = int(os.environ.get("QLW_CLIENT_QUEUE_LIMIT", "20000"))
#: Bytes a client may have waiting (QLW_CLIENT_QUEUE_BYTES): a client that sends large requests
#: and never reads the replies would otherwise make the backend hold up to LIMIT x 4 MiB.
CLIENT_QUEUE_BYTES = int(os.environ.get("QLW_CLIENT_QUEUE_BYTES", str(64 * 1024 * 1024)))
_READ_CHUNK = 256 * 1024


class AlreadyRunning(RuntimeError):
    """Another backend holds this data home."""


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` as a 0700 folder owned by us, or refuse one that isn't safe to use."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise RuntimeError(f"{path} is not a folder (a symlink?): refusing to put the socket there")
    if st.st_uid != os.getuid():
        raise RuntimeError(f"{path} belongs to uid {st.st_uid}, not to you: refusing to use it")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


def encode(msg: Any) -> bytes:
    """:func:`backend.protocol.encode`, or, for text that is no valid Unicode (a lone surrogate,
    as from a file name that is not UTF-8), the same JSON with every non-ASCII character escaped:
    a message is always sent, never the connection dropped for it."""
    try:
        return P.encode(msg)
    except UnicodeEncodeError:
        data = {"type": msg.TYPE, **P.to_dict(msg)}
        return json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=True).encode("ascii") + b"\n"


#: A \uXXXX escape of a UTF-16 surrogate: the message may hold a lone one (checked further).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class _TooLarge:
    def __init__(self, size: int):
        self.size = size


async def read_lines(reader: asyncio.StreamReader, limit: int) -> AsyncIterator[bytes | _TooLarge]:
    """Yield each line (without ``\\n``); a line over ``limit`` bytes is skipped and reported as
    :class:`_TooLarge` once, without ever holding more than ``limit`` bytes of it."""
    buf = bytearray()
    skipping = 0  # bytes of an oversized line skipped so far
    while True:
        chunk = await reader.read(_READ_CHUNK)
        if not chunk:
            if buf and not skipping:
                yield bytes(buf)
            return
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                piece = chunk[start:]
                if skipping:
                    skipping += len(piece)
                elif len(buf) + len(piece) > limit:
                    skipping = len(buf) + len(piece)
                    buf.clear()
                else:
                    buf += piece
                break
            piece = chunk[start:nl]
            start = nl + 1
            if skipping:
                yield _TooLarge(skipping + len(piece))
                skipping = 0
            elif len(buf) + len(piece) > limit:
                buf.clear()
                yield _TooLarge(len(buf) + len(piece))
            else:
                buf += piece
                yield bytes(buf)
                buf.clear()


class Client:
    """One connected client: its bounded send queue, its writer task and its replay state."""

    def __init__(self, server: "BackendServer", writer: asyncio.StreamWriter, cid: int):
        self.server = server
        self.writer = writer
        self.cid = cid
        self.name = f"client-{cid}"
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(server.queue_limit)
        self.queued_bytes = 0
        self.hello = False
        self.attached = False
        self.replaying = False
        self.pending: list[tuple[P.Event, bytes]] = []
        self.sent: dict[str, int] = {}  # session -> last seq sent to this client
        self.closed = False
        self.connected_at = time.time()
        self.task = asyncio.get_running_loop().create_task(self._write_loop())

    def send(self, msg: Any) -> None:
        self.offer(encode(msg))

    def offer(self, line: bytes) -> None:
        if self.closed:
            return
        size = len(line) if line is not None else 0
        if size and self.queued_bytes + size > CLIENT_QUEUE_BYTES:
            self.drop(f"fell more than {CLIENT_QUEUE_BYTES:,} bytes behind")
            return
        try:
            self.queue.put_nowait(line)
        except asyncio.QueueFull:
            self.drop(f"fell more than {self.server.queue_limit} messages behind")
            return
        self.queued_bytes += size

    def offer_event(self, ev: P.Event, line: bytes) -> None:
        if self.closed or not self.attached:
            return
        if self.replaying:
            if len(self.pending) >= self.server.queue_limit:
                self.drop("fell behind during its replay")
            else:
                self.pending.append((ev, line))
            return
        if self._fresh(ev):
            self.offer(line)

    def _fresh(self, ev: P.Event) -> bool:
        """True (and remembered) if ``ev`` was not sent to this client yet."""
        if ev.seq is None or ev.session is None:
            return True
        if ev.seq <= self.sent.get(ev.session, 0):
            return False
        self.sent[ev.session] = ev.seq
        return True

    async def put_event(self, ev: P.Event, line: bytes) -> None:
        """Queue an event, waiting for room (used by this client's own replay)."""
        if self._fresh(ev) and not self.closed:
            await self.queue.put(line)
            self.queued_bytes += len(line)

    def drop(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        log.warning("dropping %s: %s", self.name, why)
        transport = self.writer.transport
        if transport is not None:
            transport.abort()
        self.task.cancel()

    async def _write_loop(self) -> None:
        try:
            while True:
                line = await self.queue.get()
                if line is None:  # close after what was queued before
                    self.writer.close()
                    break
                self.writer.write(line)
                self.queued_bytes -= len(line)
                # Write what is already queued in one go, then wait for the socket once.
                for _ in range(min(self.queue.qsize(), 512)):
                    more = self.queue.get_nowait()
                    if more is None:
                        await self.writer.drain()
                        self.writer.close()
                        return
                    self.writer.write(more)
                    self.queued_bytes -= len(more)
                await self.writer.drain()
        except (ConnectionError, OSError):
            self.closed = True
        except asyncio.CancelledError:
            pass


def _after_hooks(hooks: tuple[Callable[[], None], ...], fn: Callable) -> Callable:
    """``fn`` with ``hooks`` run first, in the same (job) thread."""
    def run(ctx):
        for hook in hooks:
            hook()
        return fn(ctx)

    return run


class BackendServer:
    """The backend of one data home."""

    def __init__(self, home: Path, queue_limit: int = CLIENT_QUEUE_LIMIT):
        self.home = Path(home)
        self.socket = P.socket_path(self.home)
        self.queue_limit = queue_limit
        self.started = time.time()
        self.clients: set[Client] = set()
        self.current_session: str | None = None
        self.store: Store | None = None
        self.jobs: JobRunner | None = None
        self._server: asyncio.base_events.Server | None = None
        self._lock_fd: int | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self._next_cid = 0
        self.restart_requested = False
        # GPU monitoring: sampled off the loop while someone is attached; 5 minutes kept.
        self.gpu_interval = min(10.0, max(0.25, float(os.environ.get("QLW_GPU_INTERVAL", "1"))))
        self.gpu_history: deque[dict] = deque()
        self._sampler = None
        self._sample_task: asyncio.Task | None = None
        self.handlers: dict[str, Callable[[Client, Any], Awaitable[P.Reply]]] = {
            "ping": self._ping,
            "status": self._status,
            "attach": self._attach,
            "sessions.list": self._list_sessions,
            "sessions.new": self._new_session,
            "job.cancel": self._cancel_job,
            "shutdown": self._shutdown,
            "gpu.history": self._gpu_history,
            "gpu.interval": self._gpu_interval,
            "gpu.free": self._gpu_free,
            "backend.restart": self._restart,
        }
        # Models (backend/models/): answered off the loop, in the module's own handlers.
        from backend import models

        self.handlers.update({
            "model.options": lambda client, params: models.handle_options(self.home, params),
            "model.estimate": lambda client, params: models.handle_estimate(params),
            "model.inspect": lambda client, params: models.handle_inspect(params),
        })
        # Job requests: method -> function that builds the job callable from the typed params.
        from backend import diag

        self.job_factories: dict[str, Callable[[Any], Callable]] = {
            "diag.ticker": diag.ticker_job,
            "diag.burn": diag.burn_job,
            "tiny.prepare": lambda params: self._prepare_tiny,
            "model.load": models.load_job,
        }
        # Hooks run in a job's thread before the job of that method starts (see before_job).
        self.before_job_hooks: dict[str, list[Callable[[], None]]] = {}
        # Functions giving the events a client gets after its session's replay on attach (the
        # front end's state, backend/ui_state.py): they come after the replay, before live events.
        self.attach_snapshots: list[Callable[[], list[P.Event]]] = []
        # Data: the dataset browser (backend/data/): data.open (a job when the first read builds
        # the Arrow cache), quick pages, rows and previews in a thread, the data.stats job.
        from backend import data as data_room

        data_room.register(self)
        # Training (backend/train/, backend/train_config.py): checks, listings and files are
        # answered off the loop; train.start is a job, refused with the field errors when invalid.
        from backend import train as train_room

        train_room.register(self)
        # Merge and upload (backend/merge/, backend/hub.py): merge.*, hub.* requests and jobs.
        from backend import merge as merge_room

        merge_room.register(self)
        from backend import export as export_room

        export_room.register(self)
        # Chat and evaluation (backend/chat/, backend/evaluate.py): chat.*, eval.* requests and jobs.
        from backend import chat as chat_room

        chat_room.register(self)
        from backend import evaluate as eval_room

        eval_room.register(self)
        # The front end's state (backend/ui_state.py): ui.set, ui.get, and ui.changed on attach.
        from backend import ui_state

        ui_state.register(self)
        # The runs ledger (backend/ledger.py, issue 18): runs.list/show/rename/delete/diff/curves/export.
        from backend import ledger

        ledger.register(self)

    # Life cycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Take the data home's lock, open the store, listen. Raises :class:`AlreadyRunning`."""
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new home is private (an existing one kept)
        self._take_lock()
        ensure_private_dir(self.socket.parent)
        if self.socket.exists() or self.socket.is_symlink():
            # We hold the lock, so no live backend owns it: a killed server left it behind.
            log.info("removing stale socket %s", self.socket)
            self.socket.unlink()
        self.store = Store(self.home / "sessions.db")
        interrupted = self.store.mark_interrupted()
        for sid in interrupted:
            log.warning("session %s was running when the last backend died: marked interrupted", sid)
            try:
                self._report_interrupted(sid)
            except Exception:  # telling is best effort: the session is marked either way
                log.exception("could not record the interruption of session %s", sid)
        loop = asyncio.get_running_loop()
        self.jobs = JobRunner(loop, self.publish, self._set_session_status)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=str(self.socket), limit=_READ_CHUNK)
        finally:
            os.umask(old_umask)
        os.chmod(self.socket, 0o600)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: loop.create_task(self.shutdown(graceful=True)))
        self._sample_task = loop.create_task(self._sample_loop())
        loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP ignored: the backend outlives terminals"))
        log.info("qlw backend %s (protocol %d) pid %d listening on %s, data home %s",
                 __version__, P.PROTOCOL_VERSION, os.getpid(), self.socket, self.home)

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    async def shutdown(self, graceful: bool = True, timeout: float = 60.0) -> None:
        """Stop: ask the job to stop and save (graceful), close clients, remove the socket."""
        if self._stopping:
            return
        self._stopping = True
        log.info("shutting down (graceful=%s)", graceful)
        if self._sample_task is not None:
            self._sample_task.cancel()
        job = self.jobs.current if self.jobs else None
        if job is not None:
            self.jobs.cancel()
            if not await self.jobs.wait(timeout if graceful else 0.5):
                log.warning("job %s did not stop within %.0f s; leaving it interrupted", job.job_id, timeout)
                self._set_session_status(job.session, "interrupted")
        if self._server is not None:
            self._server.close()
        # Let each client's queue (replies included) flush, then close; abort the stragglers.
        for c in list(self.clients):
            c.offer(None)
        tasks = [c.task for c in self.clients if not c.task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        for c in list(self.clients):
            c.drop("backend shutting down")
        try:
            self.socket.unlink()
        except FileNotFoundError:
            pass
        if self.jobs:
            self.jobs.shutdown()
        if self.store:
            self.store.close()
        self._release_lock()
        self._stopped.set()

    def _report_interrupted(self, session: str) -> None:
        """Close the job a dead backend left open in ``session`` with what happened, so a client
        that replays the session is told (an error, a failed job.finished, the session status)
        instead of showing it running forever; for training, where to resume from."""
        started = self.store.last_event(session, "job.started")
        ended = self.store.last_event(session, "job.finished")
        if started is not None and (ended is None or ended.seq < started.seq):
            job_id, kind = started.payload.get("job_id", ""), started.payload.get("kind", "job")
            hint, removed = "start it again", ""
            if kind == "train.start":
                import shutil

                from backend import train

                try:
                    # A save the kill cut off: no trainer_state.json, never listed; take it away.
                    partial = train.partial_checkpoints(train.run_dir(self.home, session) / "checkpoints")
                    for folder in partial:
                        shutil.rmtree(folder, ignore_errors=True)
                        log.warning("removed %s: a checkpoint the stopped backend had not finished saving", folder)
                    removed = "; its half-written " + ", ".join(f.name for f in partial) + " was removed" if partial else ""
                    newest = train.list_checkpoints(self.home, session)
                except Exception:
                    newest = []
                hint = (f"resume from its last checkpoint, {newest[0]['path']} (step {newest[0]['step']})"
                        if newest else "no checkpoint was saved: start the run again")
            error = {"message": f"the backend stopped while this {kind} job ran (killed or crashed); "
                                f"the events up to then are kept{removed}",
                     "where": f"backend pid {getattr(self, '_previous_pid', '') or '?'}", "hint": hint, "detail": ""}
            self.publish(session, "error", {"job_id": job_id, **error})
            self.publish(session, "job.finished", {
                "job_id": job_id, "kind": kind, "status": "failed", "result": {}, "error": error,
                "elapsed_s": round(max(0.0, time.time() - started.time), 3)})
        self.publish(session, "session.status", {"session": session, "status": "interrupted"})

    def _take_lock(self) -> None:
        path = self.home / "backend.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise AlreadyRunning(f"a qlw backend (pid {pid or '?'}) already serves {self.home}") from None
        self._previous_pid = os.pread(fd, 32, 0).decode(errors="replace").strip()  # for _report_interrupted
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # Events -------------------------------------------------------------------------------------

    def publish(self, session: str | None, kind: str, payload: dict[str, Any]) -> P.Event:
        """Record (unless ephemeral) and broadcast one event. Event loop thread only."""
        now = time.time()
        seq = None
        if session is not None and kind not in P.EPHEMERAL and self.store is not None:
            try:
                seq = self.store.append_event(session, kind, payload, now)
            except Exception as exc:  # disk full, I/O error: still tell who is listening
                self._store_failed(exc)
        ev = P.Event(kind=kind, payload=payload, time=now, session=session, seq=seq)
        line = encode(ev)
        for c in list(self.clients):
            c.offer_event(ev, line)
        return ev

    def _store_failed(self, exc: Exception) -> None:
        """An event could not be recorded: say so to the log and to every client (at most every
        30 s); the events still go out live, unsaved."""
        now = time.monotonic()
        if now - getattr(self, "_store_failed_at", -1e9) < 30:
            return
        self._store_failed_at = now
        path = self.store.path if self.store else self.home / "sessions.db"
        full = "full" in str(exc).lower() or getattr(exc, "errno", None) == errno.ENOSPC
        log.error("cannot record events in %s: %s", path, exc)
        payload = {"message": f"cannot record events in {path}: {exc}", "where": str(path),
                   "hint": ("free space on that disk" if full else "check the disk and the file") +
                           ": until then events are shown live but not saved, and a terminal that attaches "
                           "later will not see them", "detail": f"{type(exc).__name__}: {exc}", "job_id": ""}
        line = encode(P.Event(kind="error", payload=payload, time=time.time(), session=None, seq=None))
        for c in list(self.clients):
            if c.attached:
                c.offer(line)

    def _set_session_status(self, session: str, status: str) -> None:
        if self.store is None:
            return
        try:
            self.store.set_status(session, status)
        except Exception as exc:  # disk full: the job still ends and says so
            self._store_failed(exc)
        self.publish(session, "session.status", {"session": session, "status": status})

    def ensure_session(self, name: str = "") -> str:
        if self.current_session is None:
            self._create_session(name)
        return self.current_session

    def _create_session(self, name: str, config: dict | None = None):
        info = self.store.create_session(name, config)
        self.current_session = info.id
        self.publish(info.id, "session.created", {"session": info.id, "name": info.name, "created": info.created})
        return info

    # Connections --------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._next_cid += 1
        client = Client(self, writer, self._next_cid)
        self.clients.add(client)
        try:
            async for item in read_lines(reader, P.MAX_MESSAGE_BYTES):
                if client.closed:
                    break
                if isinstance(item, _TooLarge):
                    log.warning("%s sent a message of %d bytes (limit %d): skipped", client.name, item.size, P.MAX_MESSAGE_BYTES)
                    client.send(P.Reply("", "error", reason=f"message of {item.size} bytes exceeds the limit of {P.MAX_MESSAGE_BYTES}", code=P.TOO_LARGE))
                    continue
                if item.strip():
                    await self._dispatch(client, item)
        except (ConnectionError, OSError):
            pass
        except Exception:  # the server never dies of a message: log it and drop this client
            log.exception("error while serving %s", client.name)
        finally:
            self.clients.discard(client)
            if not client.closed:
                client.closed = True
                client.task.cancel()
                writer.close()

    async def _dispatch(self, client: Client, line: bytes) -> None:
        try:
            msg = P.decode(line)
            if _SURROGATE_ESCAPE.search(line):
                try:  # a pair is one character once decoded; a lone half cannot be stored or sent
                    P.encode(msg)
                except UnicodeEncodeError:
                    raise P.ProtocolError(P.BAD_JSON, "message holds a lone UTF-16 surrogate (\\ud800-\\udfff "
                                                      "escape): not valid Unicode",
                                          getattr(msg, "id", None)) from None
        except P.ProtocolError as exc:
            log.warning("%s: %s (%s)", client.name, exc.message, exc.code)
            client.send(P.Reply(exc.request_id or "", "error", reason=exc.message, code=exc.code))
            return
        if isinstance(msg, P.Hello):
            if msg.protocol != P.PROTOCOL_VERSION:
                reason = (f"protocol mismatch: this backend speaks version {P.PROTOCOL_VERSION}, the client "
                          f"{msg.client or ''} speaks {msg.protocol}; run `qlw stop` and start qlw again so "
                          "that both sides come from the same installation")
                log.warning("%s: %s", client.name, reason)
                client.send(P.Reply("", "error", reason=reason, code=P.VERSION_MISMATCH))
                await asyncio.sleep(0)
                client.offer(None)  # close after the reply is written
                return
            client.hello = True
            client.name = f"{msg.client or 'client'}#{client.cid}"
            client.send(P.Welcome(P.PROTOCOL_VERSION, __version__, os.getpid(), self.started, str(self.home)))
            return
        if not isinstance(msg, P.Request):
            client.send(P.Reply("", "error", reason=f"clients may not send {msg.TYPE!r} messages", code=P.BAD_MESSAGE))
            return
        if not client.hello:
            client.send(P.Reply(msg.id, "error", reason="send a hello message with the protocol version first", code=P.NOT_READY))
            return
        try:
            params = P.request_params(msg)
        except P.ProtocolError as exc:
            log.warning("%s: %s", client.name, exc.message)
            client.send(P.Reply(msg.id, "error", reason=exc.message, code=exc.code))
            return
        try:
            if msg.method in self.job_factories:
                reply = self._start_job(msg.method, params)
            else:
                reply = await self.handlers[msg.method](client, params)
        except Exception as exc:  # a handler bug must not take the server down
            log.exception("%s failed", msg.method)
            reply = P.Reply("", "error", reason=f"{msg.method} failed: {type(exc).__name__}: {exc}", code=P.FAILED)
        reply.id = msg.id
        client.send(reply)

    # Handlers -----------------------------------------------------------------------------------

    def before_job(self, methods: tuple[str, ...] | list[str], hook: Callable[[], None]) -> None:
        """Run ``hook()`` in the job's thread before a job of any of ``methods`` starts its work
        (after it was accepted, so a refused request changes nothing): how a room lets go of what
        it holds when another room's job needs it (chat's decode copy before training)."""
        for method in methods:
            self.before_job_hooks.setdefault(method, []).append(hook)

    def _start_job(self, method: str, params: Any, fn: Callable | None = None) -> P.Reply:
        if self._stopping:
            return P.Reply("", "refused", reason="the backend is shutting down")
        fn = fn or self.job_factories[method](params)
        hooks = tuple(self.before_job_hooks.get(method, ()))
        if hooks:
            fn = _after_hooks(hooks, fn)
        session = self.ensure_session()
        try:
            info = self.jobs.start(method, fn, session, P.to_dict(params))
        except JobBusy as exc:
            return P.Reply("", "refused", reason=str(exc))
        return P.Reply("", "accepted", {"job_id": info.job_id, "session": session})

    def _prepare_tiny(self, ctx) -> dict:
        from backend import tiny
        from backend.jobs import JobCancelled

        try:
            path = tiny.ensure_tiny_model(
                self.home,
                progress=lambda stage, done, total: ctx.progress(stage, done, total),
                cancelled=lambda: ctx.cancelled,
            )
        except tiny.TinyBuildCancelled:
            raise JobCancelled() from None
        return {"path": str(path)}

    # GPU --------------------------------------------------------------------------------------

    async def _sample_loop(self) -> None:
        from backend.gpu import GpuSampler

        while True:
            if any(c.attached for c in self.clients):
                try:
                    if self._sampler is None:
                        self._sampler = await asyncio.to_thread(GpuSampler)
                    snap = await asyncio.to_thread(self._sampler.sample)
                    snap["interval"] = self.gpu_interval
                except Exception:  # monitoring must never take the backend down
                    log.exception("GPU sampling failed; retrying in 10 s")
                    await asyncio.sleep(10)
                    continue
                self.gpu_history.append(snap)
                while self.gpu_history and snap["time"] - self.gpu_history[0]["time"] > 300:
                    self.gpu_history.popleft()
                self.publish(None, "gpu.sample", snap)
            await asyncio.sleep(self.gpu_interval)

    async def _gpu_history(self, client: Client, params: P.GpuHistory) -> P.Reply:
        return P.Reply("", "ok", {"samples": list(self.gpu_history), "interval": self.gpu_interval})

    async def _gpu_interval(self, client: Client, params: P.GpuInterval) -> P.Reply:
        if not 0.25 <= params.seconds <= 10:
            return P.Reply("", "error", code=P.BAD_MESSAGE,
                           reason=f"gpu.interval: seconds must be between 0.25 and 10, got {params.seconds:g}")
        self.gpu_interval = params.seconds
        return P.Reply("", "ok", {"interval": self.gpu_interval})

    async def _stop_running_job(self, confirmed: bool, action: str) -> P.Reply | None:
        """None when no job runs (any more); otherwise a refusal to send back."""
        job = self.jobs.current
        if job is None:
            return None
        if not confirmed:
            return P.Reply("", "refused", code=P.CONFIRM,
                           reason=f"a {job.kind} job ({job.job_id}) is running: confirm to stop it "
                                  f"(it saves what it can) and {action}")
        self.jobs.cancel()
        if not await self.jobs.wait(120):
            return P.Reply("", "refused", reason=f"the {job.kind} job did not stop within 120 s; try again")
        return None

    async def _gpu_free(self, client: Client, params: P.FreeMemory) -> P.Reply:
        refusal = await self._stop_running_job(params.stop_job, "free the memory")
        if refusal is not None:
            return refusal
        return self._start_job("gpu.free", params, self._free_job)

    def _free_job(self, ctx) -> dict:
        from backend.gpu import GpuSampler, free_memory
        from backend.holdings import HOLDINGS

        ctx.progress("freeing memory", 0, 1)
        result = free_memory(HOLDINGS, self._sampler or GpuSampler())
        ctx.progress("freeing memory", 1, 1)
        return result

    async def _restart(self, client: Client, params: P.RestartBackend) -> P.Reply:
        refusal = await self._stop_running_job(params.stop_job, "restart the backend")
        if refusal is not None:
            return refusal
        self.restart_requested = True
        asyncio.get_running_loop().create_task(self.shutdown(graceful=True))
        return P.Reply("", "ok", {"pid": os.getpid()})

    async def _ping(self, client: Client, params: P.Ping) -> P.Reply:
        return P.Reply("", "ok", {"payload": params.payload, "time": time.time()})

    async def _status(self, client: Client, params: P.Status) -> P.Reply:
        job = self.jobs.current if self.jobs else None
        return P.Reply("", "ok", {
            "pid": os.getpid(),
            "started": self.started,
            "uptime_s": round(time.time() - self.started, 3),
            "protocol": P.PROTOCOL_VERSION,
            "server_version": __version__,
            "data_home": str(self.home),
            "socket": str(self.socket),
            "session": self.current_session,
            "job": job.to_dict() if job else None,
            "clients": len(self.clients),
        })

    async def _attach(self, client: Client, params: P.Attach) -> P.Reply:
        session = params.session
        if session is None:
            session = self.current_session
            if session is None:
                latest = self.store.latest_session()
                session = latest.id if latest else None
        elif self.store.get_session(session) is None:
            return P.Reply("", "error", reason=f"no session {session!r} in {self.home}", code=P.BAD_MESSAGE)
        client.attached = True
        client.replaying = True
        try:
            if session is not None:
                since = max(0, params.since)
                # Read in a worker thread (its own connection; WAL gives a consistent snapshot):
                # the loop keeps moving, and live events queue in client.pending meanwhile.
                batch = 2000
                while not client.closed:
                    rows = await asyncio.to_thread(self.store.read_events, session, since, batch)
                    for row in rows:
                        ev = P.Event(row.kind, row.payload, row.time, row.session, row.seq)
                        await client.put_event(ev, encode(ev))
                    if len(rows) < batch:
                        break
                    since = rows[-1].seq
            for snapshot in self.attach_snapshots:
                for ev in snapshot():
                    await client.put_event(ev, encode(ev))
            while client.pending and not client.closed:
                ev, line = client.pending.pop(0)
                if client._fresh(ev):
                    await client.queue.put(line)
                    client.queued_bytes += len(line)
        finally:
            client.replaying = False
        last = client.sent.get(session, 0) if session else 0
        return P.Reply("", "ok", {"session": session, "last_seq": last, "current_session": self.current_session})

    async def _list_sessions(self, client: Client, params: P.ListSessions) -> P.Reply:
        rows = await asyncio.to_thread(self.store.read_sessions, params.limit)
        return P.Reply("", "ok", {"sessions": [r.to_dict() for r in rows]})

    async def _new_session(self, client: Client, params: P.NewSession) -> P.Reply:
        info = self._create_session(params.name, params.config)
        return P.Reply("", "ok", {"session": info.to_dict()})

    async def _cancel_job(self, client: Client, params: P.CancelJob) -> P.Reply:
        job = self.jobs.current
        if job is None:
            return P.Reply("", "refused", reason="no job is running")
        if not self.jobs.cancel(params.job_id):
            return P.Reply("", "refused", reason=f"job {params.job_id} is not the running job ({job.job_id})")
        return P.Reply("", "ok", {"job_id": job.job_id, "kind": job.kind})

    async def _shutdown(self, client: Client, params: P.Shutdown) -> P.Reply:
        asyncio.get_running_loop().create_task(self.shutdown(params.graceful, params.timeout))
        job = self.jobs.current
        return P.Reply("", "ok", {"stopping_job": job.job_id if job else None})


async def serve(home: Path) -> bool:
    """Serve ``home`` until shut down; True when a restart was asked for."""
    server = BackendServer(home)
    await server.start()
    try:
        await server.serve_forever()
    finally:
        await server.shutdown(graceful=False)
    return server.restart_requested
