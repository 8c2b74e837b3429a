"""UiState: the app's side of the front end's state that the backend keeps (backend/ui_state.py).

Each pane keeps what the user typed or chose under one key as plain data (``"lora"``, ``"data"``,
``"chat"``, ...). It calls :meth:`UiState.set` whenever that changes (on every keystroke, if it
likes: edits are coalesced here and sent as ``ui.set`` at most every ``FLUSH_DELAY_S``), and it
subscribes to :attr:`UiState.changed` to show a value that comes from the backend: the stored
state after attaching (``replay``), or a change made in another terminal (live).

The rules, so that no terminal undoes another's work or its own:

- A change this app made comes back as ``ui.changed`` with this app's ``origin``: it is not
  applied again (the pane may have moved on since it was sent).
- A revision older than the newest one seen for a key is stale and dropped.
- Until the first attach has brought the stored state, values set by panes (their defaults while
  they mount) are held; a key the backend has wins over them. After a re-attach (a dropped
  connection, a restarted backend), edits made meanwhile are newer and are sent.
- A live change from another terminal wins over an edit of the same key not yet sent here.
- :meth:`flush` sends what is held at once: the app awaits it before quitting.

Import-light: no backend module but the protocol.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from textual.signal import Signal

from backend import protocol as P

if TYPE_CHECKING:
    from textual.app import App

log = logging.getLogger("qlw.ui_state")

#: Edits of one key within this many seconds are sent as one ``ui.set``.
FLUSH_DELAY_S = 0.25


@dataclass(frozen=True)
class UiChange:
    """A value for a pane to show: ``replay`` when it is the stored state sent on attach, else a
    change another terminal made just now."""

    key: str
    value: Any
    replay: bool = False


def plain(value: Any) -> Any:
    """``value`` as the JSON data it will be after a round trip (tuples become lists, keys
    strings), so that comparing with what the backend sends back is exact."""
    return json.loads(json.dumps(value, ensure_ascii=False, allow_nan=True))


class UiState:
    """The state of every pane, as this app knows it; see the module docstring for the rules."""

    def __init__(self, app: "App") -> None:
        self.app = app
        #: Names this app instance in ``ui.set``, so that its own changes are known when they return.
        self.origin = secrets.token_hex(8)
        #: The newest value of each key, this app's or the backend's.
        self.values: dict[str, Any] = {}
        #: The newest revision seen of each key.
        self.revs: dict[str, int] = {}
        #: Keys set here and not yet sent (their values are in :attr:`values`).
        self.pending: set[str] = set()
        #: Every value a pane should show (``UiChange``); panes subscribe in ``on_mount``.
        self.changed: Signal[UiChange] = Signal(app, "ui-state-changed")
        #: True once the stored state came with an attach (the first time) and while connected.
        self.ready = False
        self._attached_once = False
        self._timer = None
        self._sending: asyncio.Task | None = None

    # Reading ----------------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The newest value of ``key`` known here (``default`` when none)."""
        return self.values.get(key, default)

    # From the backend -------------------------------------------------------------------------------

    def on_event(self, ev: P.Event) -> None:
        """Take a ``ui.changed`` event (other kinds are ignored)."""
        if ev.kind != "ui.changed":
            return
        p = ev.payload
        key, rev = str(p.get("key", "")), p.get("rev")
        if not key or not isinstance(rev, int) or rev <= self.revs.get(key, 0):
            return  # stale: a newer revision was seen (a live change queued during a replay)
        self.revs[key] = rev
        if p.get("origin") == self.origin:
            return  # our own change coming back: the pane has it (or something newer)
        if key in self.pending:
            if self._attached_once and p.get("replay"):
                return  # edited here while away: ours is newer and is on its way
            # A pane's default while mounting (the stored state wins), or another terminal's edit
            # made just now: it is the newer one; ours is dropped rather than sent over it.
            self.pending.discard(key)
        value = p.get("value")
        self.values[key] = value
        self.changed.publish(UiChange(key, value, bool(p.get("replay"))))

    def on_connection(self, connected: bool) -> None:
        """The connection changed: once connected (after the attach brought the stored state),
        send what was held."""
        self.ready = connected
        if connected:
            self._attached_once = True
            if self.pending:
                self._timed_flush()

    # From the panes ---------------------------------------------------------------------------------

    def set(self, key: str, value: Any) -> None:
        """A pane's state under ``key`` is now ``value``: sent soon (coalesced with later edits)."""
        value = plain(value)
        if key in self.values and self.values[key] == value:
            return  # nothing new (a value just shown from the backend, echoed by the widgets)
        self.values[key] = value
        self.pending.add(key)
        if self.ready:
            self._schedule(FLUSH_DELAY_S)

    def _schedule(self, delay: float) -> None:
        if self._timer is None:
            self._timer = self.app.set_timer(delay, self._timed_flush, name="send the ui state")

    def _timed_flush(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        if self._sending is None or self._sending.done():
            self._sending = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        client = getattr(self.app, "backend", None)
        while self.pending and self.ready and client is not None:
            key = min(self.pending)
            self.pending.discard(key)
            value = self.values[key]
            try:
                reply = await client.request(P.SetUiState(key=key, value=value, origin=self.origin), timeout=10)
            except Exception as exc:  # not connected (any more): sent after the next attach
                log.info("ui.set %s not sent (%s): kept for the next attach", key, exc)
                if self.values.get(key) == value:
                    self.pending.add(key)
                return
            if not reply.ok:
                log.warning("the backend refused ui.set %s: %s", key, reply.reason)
            elif isinstance(reply.result.get("rev"), int):
                self.revs[key] = max(self.revs.get(key, 0), reply.result["rev"])

    async def flush(self, timeout: float = 3.0) -> None:
        """Send what is held now, and wait (at most ``timeout`` seconds) until it is sent."""
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        if not self.pending or not self.ready:
            return
        if self._sending is not None and not self._sending.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._sending), timeout)
            except (asyncio.TimeoutError, Exception):
                pass
        try:
            await asyncio.wait_for(self._send(), timeout)
        except (asyncio.TimeoutError, Exception) as exc:
            log.warning("the ui state was not all sent before quitting: %s", exc)


# Reading and setting a pane's controls ----------------------------------------------------------

#: The controls whose values make up a pane's state, read and set by their ids.
CONTROLS = "Input, Select, Checkbox, Switch, SelectionList, TextArea"


def read_fields(root: Any, ids: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The values of the controls under ``root`` (those in ``ids``, or every one with an id), by
    id: an Input's text, a Select's value (None when blank), a Checkbox's or Switch's bool, a
    SelectionList's picked values, a TextArea's text."""
    from textual.widgets import Checkbox, Input, Select, SelectionList, Switch, TextArea

    out: dict[str, Any] = {}
    for widget in root.query(CONTROLS):
        if not widget.id or (ids is not None and widget.id not in ids):
            continue
        if isinstance(widget, Select):
            out[widget.id] = None if widget.value is Select.NULL else widget.value
        elif isinstance(widget, SelectionList):
            out[widget.id] = list(widget.selected)
        elif isinstance(widget, TextArea):
            out[widget.id] = widget.text
        elif isinstance(widget, (Input, Checkbox, Switch)):
            out[widget.id] = widget.value
    return out


def set_control(widget: Any, value: Any) -> bool:
    """Show ``value`` (as :func:`read_fields` gives it) in one control, posting its Changed only
    when the value differs; False when it cannot be shown (a Select that does not offer it yet)."""
    from textual.widgets import Checkbox, Input, Select, SelectionList, Switch, TextArea
    from textual.widgets.select import InvalidSelectValueError

    try:
        if isinstance(widget, Select):
            wanted = Select.NULL if value is None else value
            if widget.value != wanted:
                widget.value = wanted
        elif isinstance(widget, SelectionList):
            picked = set(value or [])
            if set(widget.selected) != picked:
                widget.deselect_all()
                for option in range(widget.option_count):
                    candidate = widget.get_option_at_index(option).value
                    if candidate in picked:
                        widget.select(candidate)
            return set(widget.selected) == picked
        elif isinstance(widget, TextArea):
            if widget.text != value:
                widget.text = str(value)
        elif isinstance(widget, Input):
            if widget.value != value:
                widget.value = "" if value is None else str(value)
        elif isinstance(widget, (Checkbox, Switch)):
            if widget.value != bool(value):
                widget.value = bool(value)
        else:
            return False
    except (InvalidSelectValueError, ValueError, TypeError):
        return False
    return True


def write_fields(root: Any, values: dict[str, Any]) -> list[str]:
    """Set the controls under ``root`` by id (as :func:`read_fields` gave them); the ids that
    could not be set (a Select that does not offer the value yet, a control that is gone)."""
    from textual.css.query import NoMatches

    missed = []
    for wid, value in values.items():
        try:
            widget = root.query_one(f"#{wid}")
        except NoMatches:
            missed.append(wid)
            continue
        if not set_control(widget, value):
            missed.append(wid)
    return missed
