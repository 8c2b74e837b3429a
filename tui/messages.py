"""Typed Textual messages of the front end.

The backend's stream enters the app as :class:`BackendEvent` and :class:`ConnectionChanged`,
posted by the :class:`~tui.client.BackendClient` callbacks on the app's own loop. The app fans
them out to the widgets that subscribed (see ``QlwApp.backend_events``/``connection_changed``).
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from backend import protocol as P

#: Event kinds that may arrive many times a second; a queued one is superseded by a newer one
#: of the same kind, so the UI draws the latest state instead of every step (toolong's pattern).
COALESCED_KINDS = frozenset({"job.progress", "diag.tick", "gpu.sample"})


@dataclass
class BackendEvent(Message, bubble=False):
    """An event from the backend, exactly once and in order (replays included)."""

    event: P.Event

    def can_replace(self, message: Message) -> bool:
        # Textual asks the queued (older) message whether ``message`` (the next one) may
        # supersede it. Only consecutive events of one high-rate kind and session collapse;
        # everything else (job.started, job.finished, session.*) is delivered one by one.
        return (
            isinstance(message, BackendEvent)
            and self.event.kind in COALESCED_KINDS
            and message.event.kind == self.event.kind
            and message.event.session == self.event.session
        )


@dataclass
class ConnectionChanged(Message, bubble=False):
    """The channel's state: ``connecting``, ``connected``, ``reconnecting`` or ``gone``.

    ``detail`` says more for people: the backend's pid when connected, why and what to do when
    gone.
    """

    state: str
    detail: str = ""
