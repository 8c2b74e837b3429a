"""error_notice: the notification for a backend ``error`` event that no job owns.

A job's errors are shown by the pane that follows the job (Train, Chat, Merge, ...). An error
with no ``job_id`` (the backend cannot record events because the disk is full, ...) belongs to
no pane, so the shell shows it as a notification: what failed, where, what to do next.
"""

from __future__ import annotations

import time

from backend import protocol as P

TITLE = "Backend error"
#: A recorded error older than this (the replay of a session) is not notified again.
NOTIFY_RECENT_S = 60.0


def error_notice(ev: P.Event, now: float | None = None) -> str | None:
    """The notification's text for ``ev``, or None: not an ``error``, a job's own error, or an
    old one replayed from the session's history."""
    if ev.kind != "error" or ev.payload.get("job_id"):
        return None
    now = time.time() if now is None else now
    if ev.seq is not None and now - ev.time > NOTIFY_RECENT_S:
        return None
    return error_text("", ev.payload, "\n", default="the backend reported an error; see its log")


def error_text(head: str, error: dict, sep: str = " · ", default: str = "see the backend log") -> str:
    """An error (a JobError's ``message``, ``where``, ``hint``) for people, as every pane shows
    one: ``✖ <head><message>``, then where it happened and what to do, joined by ``sep``."""
    parts = [f"✖ {head}{error.get('message') or default}"]
    if error.get("where"):
        parts.append(f"where: {error['where']}")
    if error.get("hint"):
        parts.append(f"what to do: {error['hint']}")
    return sep.join(parts)
