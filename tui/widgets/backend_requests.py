"""BackendRequests: how a widget (or the app) sends requests and reports their failures.

A node that talks to the backend inherits this mixin and runs each request in an async
``@work(exclusive=True, group=..., exit_on_error=False)`` worker that awaits :meth:`call`
(``BackendClient.request`` is a coroutine on the app's own loop, so no thread is needed). A
failed worker is reported to the user by the one ``Worker.StateChanged`` handler below: what
could not be done, why, and what to do next.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from textual import on
from textual.message_pump import MessagePump
from textual.worker import Worker, WorkerState

from tui.client import BackendUnavailable, RequestFailed

if TYPE_CHECKING:
    from tui.client import BackendClient


def describe_failure(what: str, error: BaseException) -> tuple[str, str]:
    """A failed request as (message for people, notification severity)."""
    if isinstance(error, RequestFailed):
        reply = error.reply
        reason = reply.reason or reply.code or reply.status
        if reply.status == "refused":
            return f"Could not {what}: {reason}", "warning"
        return f"Could not {what}: the backend answered {reply.code or 'error'}: {reason}", "error"
    if isinstance(error, BackendUnavailable):
        return (f"Could not {what}: not connected to the backend ({error}). "
                "Press ctrl+r to start one, or run `qlw serve`."), "error"
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
        return f"Could not {what}: the backend did not answer in time; see `qlw status`.", "error"
    return f"Could not {what}: {type(error).__name__}: {error}", "error"


class BackendRequests(MessagePump):
    """Mixin for nodes that send backend requests from async workers.

    It derives from ``MessagePump`` only so that Textual collects its ``@on`` handler; put it
    first in the bases: ``class SessionsPane(BackendRequests, Vertical)``. Name each worker
    after what it does in words (``@work(name="list the sessions", ...)``): that name is what
    the failure notice says could not be done.
    """

    async def call(self, params: Any, timeout: float | None = 30.0) -> dict[str, Any]:
        """Send a typed request (``P.ListSessions()``) and return its result; raises
        :class:`RequestFailed` for a refused or failed request, :class:`BackendUnavailable`
        when not connected. Uses the app's one client, ``app.backend``."""
        client: BackendClient = self.app.backend  # type: ignore[attr-defined]
        reply = await client.request(params, timeout)
        if not reply.ok:
            raise RequestFailed(reply)
        return reply.result

    @on(Worker.StateChanged)
    def _report_failed_request(self, event: Worker.StateChanged) -> None:
        if event.state is not WorkerState.ERROR or event.worker.error is None:
            return
        message, severity = describe_failure(event.worker.name or "do that", event.worker.error)
        self.app.notify(message, severity=severity, markup=False, timeout=8)
