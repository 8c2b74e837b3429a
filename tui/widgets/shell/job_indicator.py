"""JobIndicator: the backend's one job (kind, stage, done/total) on a line above the footer.

It also sends the job-control requests of the shell (prepare the tiny model, cancel the job), so
that a cancel names the job the user is looking at.
"""

from __future__ import annotations

from typing import Any

from textual import work
from textual.widgets import Static

from backend import protocol as P
from tui.client import CONNECTED, GONE
from tui.messages import ConnectionChanged
from tui.widgets.backend_requests import BackendRequests


def _number(x: float) -> str:
    if float(x).is_integer():
        return f"{int(x):,}"
    return f"{x:,.3g}" if abs(x) < 100 else f"{x:,.0f}"


def describe_job(job: dict[str, Any]) -> str:
    """One line for a running job: ``▶ kind · stage · done/total unit (pct)``."""
    parts = [f"▶ {job.get('kind') or 'job'}"]
    if job.get("stage"):
        parts.append(str(job["stage"]))
    done, total, unit = job.get("done") or 0, job.get("total") or 0, job.get("unit") or ""
    if total:
        pct = min(100, max(0, int(100 * done / total)))
        parts.append(f"{_number(done)}/{_number(total)}{' ' + unit if unit else ''} ({pct}%)")
    elif done:
        parts.append(f"{_number(done)}{' ' + unit if unit else ''}")
    if job.get("message"):
        parts.append(str(job["message"]))
    return " · ".join(parts)


def describe_finished(payload: dict[str, Any]) -> str:
    """One line for a job that ended: done, cancelled or failed (with the error's message)."""
    kind, status = payload.get("kind") or "job", payload.get("status")
    elapsed = f"{payload.get('elapsed_s', 0):.1f} s"
    if status == "done":
        return f"✔ {kind} done in {elapsed}"
    if status == "cancelled":
        return f"■ {kind} cancelled after {elapsed}"
    error = (payload.get("error") or {}).get("message") or "see the backend log"
    return f"✖ {kind} failed after {elapsed}: {error}"


class JobIndicator(BackendRequests, Static):
    """What the backend's job is doing, from ``job.*`` events and, on (re)connect, ``status``."""

    IDLE = "no job running · ctrl+t prepares the tiny model"

    def __init__(self, **kwargs) -> None:
        super().__init__(self.IDLE, markup=False, **kwargs)
        #: The running job as the backend last described it (kind, stage, done, total, ...),
        #: or None. Everything here is re-read with ``status`` after a re-connect.
        self.job: dict[str, Any] | None = None

    @property
    def job_id(self) -> str:
        return self.job["job_id"] if self.job else ""

    def on_mount(self) -> None:
        self.app.backend_events.subscribe(self, self.on_backend)  # type: ignore[attr-defined]
        self.app.connection_changed.subscribe(self, self.on_connection)  # type: ignore[attr-defined]
        if self.app.connection.state == CONNECTED:  # type: ignore[attr-defined]
            self.read_status()

    def on_backend(self, ev: P.Event) -> None:
        p = ev.payload
        if ev.kind == "job.started":
            self.job = {"job_id": p.get("job_id", ""), "kind": p.get("kind", "")}
            self._show(describe_job(self.job), "-running")
        elif ev.kind == "job.progress" and self.job and p.get("job_id") == self.job_id:
            self.job.update({k: p.get(k) for k in ("stage", "done", "total", "unit", "message")})
            self._show(describe_job(self.job), "-running")
        elif ev.kind == "diag.tick" and self.job and p.get("job_id") == self.job_id:
            # The channel diagnostic reports ticks, not job.progress: show them the same way.
            self.job.update(done=p.get("n", 0), total=p.get("total", 0), unit="ticks")
            self._show(describe_job(self.job), "-running")
        elif ev.kind == "job.finished":
            if self.job is None or p.get("job_id") == self.job_id:
                self.job = None
                self._show(describe_finished(p), f"-{p.get('status', 'done')}")

    def on_connection(self, change: ConnectionChanged) -> None:
        if change.state == CONNECTED:
            self.read_status()
        elif change.state == GONE:
            self.job = None
            self._show("no backend: job state unknown", "-unknown")

    def _show(self, text: str, state: str) -> None:
        self.update(text)
        for cls in ("-running", "-done", "-cancelled", "-failed", "-unknown"):
            self.set_class(cls == state, cls)

    @work(name="read the backend's status", group="job.status", exclusive=True, exit_on_error=False)
    async def read_status(self) -> None:
        result = await self.call(P.Status())
        job = result.get("job")
        if job:
            self.job = {k: job.get(k) for k in ("job_id", "kind", "stage", "done", "total")}
            self._show(describe_job(self.job), "-running")
        elif self.job is not None:
            # It ended while we were away, in a session we do not follow.
            self.job = None
            self._show(self.IDLE, "")
        elif self.has_class("-unknown"):
            self._show(self.IDLE, "")

    @work(name="prepare the tiny model", group="job.start", exclusive=True, exit_on_error=False)
    async def prepare_tiny(self) -> None:
        """Ask the backend to build the embedded tiny model (a job; progress follows as events)."""
        await self.call(P.PrepareTiny())

    @work(name="cancel the job", group="job.cancel", exclusive=True, exit_on_error=False)
    async def cancel_job(self) -> None:
        """Ask the running job to stop; it saves what it can first."""
        result = await self.call(P.CancelJob(job_id=self.job_id))
        self.notify(f"Asked the {result.get('kind', 'running')} job to stop.", timeout=4)
