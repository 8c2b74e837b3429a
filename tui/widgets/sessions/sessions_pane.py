"""SessionsPane: the past and present runs of the store, newest first.

The list comes from the backend (``sessions.list``); it is read again when a session is created,
changes status or finishes a job, after every (re)connect, and on ``r``.
"""

from __future__ import annotations

import time
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from backend import protocol as P
from tui.client import CONNECTED
from tui.messages import ConnectionChanged
from tui.widgets.backend_requests import BackendRequests

#: Events after which the list is out of date.
REFRESH_KINDS = frozenset({"session.created", "session.renamed", "session.status", "job.finished"})
#: Events arrive in bursts (a replay, a job ending); one read covers a burst.
REFRESH_DELAY_S = 0.1

#: status -> (theme colour, rich style): statuses follow the theme's warning/success/error.
STATUS_STYLES = {
    "running": ("warning", "bold"),
    "finished": ("success", ""),
    "failed": ("error", "bold"),
    "interrupted": ("error", ""),
    "cancelled": (None, "dim"),
    "stopped": ("warning", ""),
}


def format_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


class SessionsPane(BackendRequests, Vertical):
    """A table of sessions (name, created, status, events, id) and a line about the
    highlighted one."""

    BINDINGS = [
        Binding("r", "refresh", "Refresh", id="sessions.refresh",
                tooltip="Read the list of sessions from the backend again."),
    ]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # The backend's last answer, by id: what the detail line shows. Re-read on every refresh.
        self.sessions: dict[str, dict[str, Any]] = {}
        self._refresh_timer = None

    def compose(self) -> ComposeResult:
        yield DataTable(id="sessions-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="session-detail", markup=False)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_column("Session", key="name")
        table.add_column("Created", key="created")
        table.add_column("Status", key="status")
        table.add_column("Events", key="events")
        table.add_column("ID", key="id")
        self._show_detail()
        self.app.backend_events.subscribe(self, self.on_backend)  # type: ignore[attr-defined]
        self.app.connection_changed.subscribe(self, self.on_connection)  # type: ignore[attr-defined]
        if self.app.connection.state == CONNECTED:  # type: ignore[attr-defined]
            self.refresh_sessions()

    def on_backend(self, ev: P.Event) -> None:
        if ev.kind in REFRESH_KINDS and self._refresh_timer is None:
            self._refresh_timer = self.set_timer(REFRESH_DELAY_S, self._timed_refresh)

    def _timed_refresh(self) -> None:
        self._refresh_timer = None
        self.refresh_sessions()

    def on_connection(self, change: ConnectionChanged) -> None:
        if change.state == CONNECTED:
            self.refresh_sessions()

    def action_refresh(self) -> None:
        self.refresh_sessions()

    @work(name="list the sessions", group="sessions.list", exclusive=True, exit_on_error=False)
    async def refresh_sessions(self) -> None:
        result = await self.call(P.ListSessions())
        self.show_sessions(result.get("sessions", []))

    def show_sessions(self, sessions: list[dict[str, Any]]) -> None:
        """Fill the table with ``sessions`` (newest first, as the backend sends them), keeping
        the cursor on the session it was on."""
        table = self.query_one(DataTable)
        keep = self.highlighted
        self.sessions = {s["id"]: s for s in sessions}
        table.clear()
        for s in sessions:
            status = s.get("status", "")
            # Text, not str: DataTable parses str cells as markup, and names are the user's.
            table.add_row(
                Text(s["name"]) if self._named(s) else Text("(unnamed)", style="dim"),
                format_time(s.get("created", 0)),
                Text(status, style=self._status_style(status)),
                Text(str(s.get("last_seq", 0)), justify="right"),
                Text(s["id"]),
                key=s["id"],
            )
        if keep in self.sessions:
            table.move_cursor(row=table.get_row_index(keep), scroll=False)
        self._show_detail()

    def _status_style(self, status: str) -> str:
        colour, style = STATUS_STYLES.get(status, (None, ""))
        value = self.app.theme_variables.get(colour, "") if colour else ""
        return f"{style} {value}".strip()

    @staticmethod
    def _named(session: dict[str, Any]) -> bool:
        # The store names an unnamed session after its id; don't show the id twice.
        return bool(session.get("name")) and session.get("name") != session["id"]

    @property
    def highlighted(self) -> str | None:
        """The id of the session under the cursor, if any."""
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        row_key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        return row_key.value

    @on(DataTable.RowHighlighted)
    def _on_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_detail()

    def _show_detail(self) -> None:
        detail = self.query_one("#session-detail", Static)
        sid = self.highlighted
        s = self.sessions.get(sid) if sid else None
        if s is None:
            detail.update("No sessions yet: a job (ctrl+t prepares the tiny model) starts one.")
            return
        events = s.get("last_seq", 0)
        parts = [f"session {s['id']}"]
        if self._named(s):
            parts.append(s["name"])
        parts += [s.get("status", ""), f"{events} event{'s' if events != 1 else ''}"]
        detail.update(" · ".join(parts))
