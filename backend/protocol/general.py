"""The server's own requests and events: ping, status, attach, sessions, jobs, the tiny model,
diagnostics, GPU samples, restart and shutdown.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from backend.protocol.core import event, request


# Requests -------------------------------------------------------------------------------------


@request("ping")
class Ping:
    """Liveness check; the reply echoes ``payload`` with the server's clock."""

    payload: str = ""


@request("status")
class Status:
    """Server facts: pid, uptime, protocol, data home, current session and job, clients."""


@request("attach")
class Attach:
    """Follow the backend: replay ``session``'s events after ``since``, then stream live.

    ``session=None`` means the current session (the latest one if none is active). The reply
    comes after the replay, with ``{"session": id or None, "last_seq": int}``. After the
    session's events and before the reply, every key of the front end's state comes as a
    ``ui.changed`` event with ``replay`` set. Live events of every session follow, whichever
    session was replayed.
    """

    session: str | None = None
    since: int = 0


@request("sessions.list")
class ListSessions:
    """Past and present sessions, newest first: ``{"sessions": [SessionInfo, ...]}``."""

    limit: int = 200


@request("sessions.new")
class NewSession:
    """Start a new session and make it current: ``{"session": SessionInfo}``."""

    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)


@request("job.cancel")
class CancelJob:
    """Ask the running job to stop (it saves what it can first). ``job_id`` guards against
    cancelling a newer job than the one the user saw; empty means whatever runs."""

    job_id: str = ""


@request("tiny.prepare")
class PrepareTiny:
    """Job: build (once) the embedded tiny model in the data home; progress as job events."""


@request("diag.ticker")
class DiagTicker:
    """Job: emit ``count`` ``diag.tick`` events at ``rate`` per second (0 = as fast as
    possible). A diagnostic for the channel: used by ``qlw doctor``, tests and bench/."""

    count: int = 100
    rate: float = 100.0


@request("diag.burn")
class DiagBurn:
    """Job: keep one core busy in pure Python (holding the GIL) for ``seconds``, the worst case
    for the event loop. A diagnostic: proves that ``ping`` stays fast while a job computes."""

    seconds: float = 1.0


@request("gpu.history")
class GpuHistory:
    """The recent ``gpu.sample`` payloads (up to 5 minutes), oldest first: ``{"samples": [...]}``,
    so a pane that attaches late can draw its sparklines at once."""


@request("gpu.interval")
class GpuInterval:
    """Set the GPU sampling interval, 0.25 to 10 seconds (default 1)."""

    seconds: float = 1.0


@request("gpu.free")
class FreeMemory:
    """Job: drop every model, trainer, optimizer, pipeline, streamer and cache the backend holds,
    collect garbage and empty torch's CUDA cache; the result has before/after figures and what is
    still held and why. Refused while a job runs unless ``stop_job`` (the user confirmed): then
    the job is asked to stop and save first."""

    stop_job: bool = False


@request("backend.restart")
class RestartBackend:
    """Restart the backend process in place (same socket and data home): the heavier way to free
    the GPU, since only the end of a process releases its CUDA context. Refused with code
    ``confirm`` while a job runs unless ``stop_job``: then the job is asked to stop and save
    first. Clients re-attach by themselves."""

    stop_job: bool = False


@request("shutdown")
class Shutdown:
    """Stop the backend. With ``graceful``, a running job is asked to stop and save first and
    the server waits up to ``timeout`` seconds for it."""

    graceful: bool = True
    timeout: float = 60.0


# Events ---------------------------------------------------------------------------------------


@event("session.created")
class SessionCreated:
    """A new session became current."""

    session: str
    name: str
    created: float


@event("session.status")
class SessionStatus:
    """A session's status changed: idle, running, finished, failed, cancelled, interrupted."""

    session: str
    status: str


@event("job.started")
class JobStarted:
    """A job began running."""

    job_id: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)


@event("job.progress")
class JobProgress:
    """Progress of the running job: ``done`` of ``total`` (``total`` 0 when unknown)."""

    job_id: str
    stage: str = ""
    done: float = 0
    total: float = 0
    unit: str = ""
    message: str = ""


@event("job.finished")
class JobFinished:
    """A job ended. ``status``: done, cancelled or failed (then ``error`` is set)."""

    job_id: str
    kind: str
    status: str
    elapsed_s: float
    result: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None


@event("error")
class ErrorEvent:
    """Something failed, said for people: what, where, and what to do next."""

    message: str
    where: str = ""
    hint: str = ""
    detail: str = ""
    job_id: str = ""


@event("log")
class LogEvent:
    """A line worth showing to the user (not debug noise)."""

    level: str
    message: str


@event("gpu.sample", ephemeral=True)
class GpuSample:
    """One monitoring tick: every visible GPU (``None`` for a metric the card does not report),
    the host's CPU and RAM, and the backend process (RSS, torch memory per device).
    ``nvml_error`` says why no GPU is visible, when none is."""

    time: float
    gpus: list[dict[str, Any]]
    host: dict[str, Any]
    backend: dict[str, Any]
    nvml_error: str | None = None
    driver: str | None = None
    #: The sampling interval in force, so every client sees a change made by another.
    interval: float = 1.0


@event("diag.tick")
class DiagTick:
    """One event of the ``diag.ticker`` job."""

    job_id: str
    n: int
    total: int
    sent: float

