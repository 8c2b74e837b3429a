"""One GPU job at a time, off the event loop.

A job is a plain function ``fn(ctx) -> dict`` that runs in the runner's single worker thread.
It reports through its :class:`JobContext` (events, progress) and polls ``ctx.cancelled`` at safe
points; the runner turns its return value, a :class:`JobCancelled` or any exception into one
``job.finished`` event (and an ``error`` event for a failure), so the backend never dies of a job.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("qlw.jobs")

#: publish(session, kind, payload): called on the event loop thread.
Publish = Callable[[str | None, str, dict[str, Any]], Any]


class JobCancelled(Exception):
    """Raised inside a job (by :meth:`JobContext.check_cancelled`) when it was asked to stop."""


class JobBusy(RuntimeError):
    """A job is already running; the message says which, and since when."""


class JobError(Exception):
    """A failure worth telling as it is: ``where`` (file and line, field and value) and ``hint``
    (what to do next) are shown beside the message."""

    def __init__(self, message: str, where: str = "", hint: str = ""):
        super().__init__(message)
        self.where = where
        self.hint = hint


def print_job_error(command: str, exc: JobError) -> None:
    """``exc`` on stderr for a ``qlw <command>`` run: the message, then where and what to do next."""
    print(f"qlw {command}: error: {exc}", file=sys.stderr)
    if exc.where:
        print(f"  where: {exc.where}", file=sys.stderr)
    if exc.hint:
        print(f"  hint:  {exc.hint}", file=sys.stderr)


@dataclass
class JobInfo:
    """What the status request and the UI show about a job."""

    job_id: str
    kind: str
    session: str
    started: float
    params: dict[str, Any] = field(default_factory=dict)
    stage: str = ""
    done: float = 0
    total: float = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class JobContext:
    """The job's handle on the outside world; safe to use from the worker thread."""

    #: Progress events are coalesced to at most this many per second (first and last always go).
    PROGRESS_HZ = 10.0

    def __init__(self, runner: "JobRunner", info: JobInfo):
        self._runner = runner
        self.info = info
        self.job_id = info.job_id
        self.session = info.session
        self._cancel = threading.Event()
        self._last_progress = 0.0
        self._last_call: tuple[str, float, str] = ("", -1.0, "")

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled()

    def emit(self, kind: str, payload: dict[str, Any]) -> None:
        """Record and broadcast an event of this job's session (thread-safe)."""
        self._runner._publish_threadsafe(self.session, kind, payload)

    def progress(self, stage: str, done: float, total: float = 0, unit: str = "", message: str = "") -> None:
        """Report progress; calls faster than ``PROGRESS_HZ`` are coalesced."""
        now = time.monotonic()
        self.info.stage, self.info.done, self.info.total = stage, done, total
        last = total and done >= total
        # A second call for the step just shown with news (a training step's loss, logged after
        # the step ended) is not coalesced away: the line would show the step before's loss.
        completes = (stage, done) == self._last_call[:2] and message != self._last_call[2]
        self._last_call = (stage, done, message)
        if not last and not completes and done and now - self._last_progress < 1.0 / self.PROGRESS_HZ:
            return
        self._last_progress = now
        self.emit(
            "job.progress",
            {"job_id": self.job_id, "stage": stage, "done": done, "total": total, "unit": unit, "message": message},
        )


JobFn = Callable[[JobContext], dict[str, Any] | None]


class JobRunner:
    """Runs at most one job at a time in a dedicated worker thread."""

    #: Events a job may have handed to the loop and not yet published before its emit waits.
    MAX_IN_FLIGHT = 64

    def __init__(self, loop: asyncio.AbstractEventLoop, publish: Publish,
                 on_status: Callable[[str, str], Any] | None = None):
        self._loop = loop
        self._publish = publish
        self._on_status = on_status or (lambda session, status: None)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qlw-job")
        self._ctx: JobContext | None = None
        self._task: asyncio.Task | None = None
        self._loop_thread = threading.get_ident()  # constructed on the loop's thread
        self._in_flight = threading.BoundedSemaphore(self.MAX_IN_FLIGHT)

    @property
    def current(self) -> JobInfo | None:
        return self._ctx.info if self._ctx else None

    def start(self, kind: str, fn: JobFn, session: str, params: dict[str, Any] | None = None) -> JobInfo:
        """Start ``fn`` now, or raise :class:`JobBusy`. Call on the event loop thread."""
        if self._ctx is not None:
            cur = self._ctx.info
            raise JobBusy(
                f"a {cur.kind} job ({cur.job_id}) is running since "
                f"{time.strftime('%H:%M:%S', time.localtime(cur.started))}; "
                "wait for it to finish or cancel it first"
            )
        info = JobInfo(secrets.token_hex(4), kind, session, time.time(), dict(params or {}))
        ctx = JobContext(self, info)
        self._ctx = ctx
        try:
            self._on_status(session, "running")
            self._publish(session, "job.started", {"job_id": info.job_id, "kind": kind, "params": info.params})
            self._task = self._loop.create_task(self._run(ctx, fn))
        except BaseException:
            self._ctx = None  # never left "running" with nothing that runs: that would refuse every later job
            raise
        return info

    def cancel(self, job_id: str = "") -> bool:
        """Ask the running job to stop; False if none (or not the one named)."""
        ctx = self._ctx
        if ctx is None or (job_id and job_id != ctx.job_id):
            return False
        ctx._cancel.set()
        return True

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait for the running job to end; True if none runs afterwards."""
        task = self._task
        if task is None or task.done():
            return True
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _publish_threadsafe(self, session: str | None, kind: str, payload: dict[str, Any]) -> None:
        if threading.get_ident() == self._loop_thread:
            self._publish(session, kind, payload)
            return
        # Backpressure: a job that emits faster than the loop records and broadcasts would
        # otherwise grow the loop's ready queue without bound, and every request (ping, hello)
        # would wait behind it. The job thread waits instead, once MAX_IN_FLIGHT are queued.
        while not self._in_flight.acquire(timeout=0.5):
            if self._loop.is_closed() or not self._loop.is_running():
                log.warning("dropped %s event: the loop is not running", kind)
                return

        def publish() -> None:
            try:
                self._publish(session, kind, payload)
            finally:
                self._in_flight.release()

        try:
            self._loop.call_soon_threadsafe(publish)
        except RuntimeError:  # loop closed during shutdown: nobody left to tell
            self._in_flight.release()
            log.warning("dropped %s event after the loop closed", kind)

    async def _run(self, ctx: JobContext, fn: JobFn) -> None:
        info = ctx.info
        t0 = time.monotonic()
        status, result, error = "done", {}, None
        try:
            result = await self._loop.run_in_executor(self._executor, fn, ctx) or {}
        except JobCancelled:
            status = "cancelled"
        except Exception as exc:  # a job failure is reported, never fatal to the backend
            status = "failed"
            error = describe_exception(exc)
            log.error("job %s (%s) failed: %s", info.job_id, info.kind, error["detail"])
            self._publish(info.session, "error", {"job_id": info.job_id, **error})
        finally:
            self._ctx = None
            self._task = None
        if status == "done" and ctx.cancelled:
            status = "cancelled"  # the job saved and returned early after a stop request
        self._on_status(info.session, {"done": "finished", "cancelled": "cancelled", "failed": "failed"}[status])
        self._publish(
            info.session,
            "job.finished",
            {"job_id": info.job_id, "kind": info.kind, "status": status,
             "elapsed_s": round(time.monotonic() - t0, 3), "result": result, "error": error},
        )


def describe_exception(exc: BaseException) -> dict[str, str]:
    """An exception as the fields of an ``error`` event: message, where, hint, detail."""
    where = getattr(exc, "where", "")
    hint = getattr(exc, "hint", "")
    message = str(exc) or type(exc).__name__
    if not isinstance(exc, JobError):
        message = f"{type(exc).__name__}: {message}"
        if not where:
            tb = traceback.extract_tb(exc.__traceback__)
            if tb:
                frame = tb[-1]
                where = f"{frame.filename}:{frame.lineno} in {frame.name}"
    detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]
    return {"message": message, "where": where, "hint": hint, "detail": detail}
