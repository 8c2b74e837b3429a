"""The front end's state: what a user typed or chose in each pane, kept by the backend.

A terminal is only a view: the LoRA form's values, the open dataset and its mapping, the chat
targets and settings, the merge wizard's step, the tab last shown belong to the backend, so that
a second terminal, a terminal that re-attaches after a dropped SSH connection and one started
after a backend restart all show the same work. Each pane keeps its state under one key as plain
data (see the protocol's ``ui.set`` / ``ui.changed``); this room stores each key in the sessions
store's ``ui_state`` table (the last writer wins, one revision counter over all keys), broadcasts
every change to the attached clients, and sends every key to a client when it attaches, after
the replay of its session.

Clients coalesce their edits (a pane sends its state at most a few times a second while the user
types); a write here is one small SQLite transaction on the event loop, like an event's.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from backend import protocol as P
from sessions.store import UiValue

log = logging.getLogger("qlw.ui_state")

_KEY = re.compile(P.UI_KEY_PATTERN)


class UiStateRoom:
    """The state of the front end, in memory (a copy of the store's table) and in the store."""

    def __init__(self, server) -> None:
        self.server = server
        #: key -> its newest value, loaded from the store when first needed.
        self._values: dict[str, UiValue] | None = None

    @property
    def values(self) -> dict[str, UiValue]:
        if self._values is None:
            store = self.server.store
            self._values = {v.key: v for v in store.ui_state()} if store is not None else {}
        return self._values

    def check(self, key: str, value: Any) -> str:
        """Why ``key``/``value`` cannot be stored ("" when they can)."""
        if not _KEY.match(key):
            return f"ui.set: key {key!r:.70} must match {P.UI_KEY_PATTERN} (e.g. \"lora\", \"shell.tab\")"
        try:
            size = len(json.dumps(value, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass"))
        except (TypeError, ValueError) as exc:
            return f"ui.set: the value of {key!r} is not plain JSON data: {exc}"
        if size > P.UI_MAX_VALUE_BYTES:
            return (f"ui.set: the value of {key!r} has {size:,} bytes, more than the {P.UI_MAX_VALUE_BYTES:,} "
                    "a key may hold")
        if key not in self.values and len(self.values) >= P.UI_MAX_KEYS:
            return f"ui.set: {len(self.values)} keys are kept already, the most there may be; {key!r} is new"
        return ""

    def set(self, key: str, value: Any, origin: str = "") -> P.Reply:
        """Store and broadcast one change (event loop thread)."""
        why = self.check(key, value)
        if why:
            return P.Reply("", "refused", reason=why, code=P.BAD_MESSAGE)
        try:
            stored = self.server.store.set_ui(key, value, origin)
        except Exception as exc:  # disk full: the change still reaches the terminals attached now
            self.server._store_failed(exc)
            rev = max((v.rev for v in self.values.values()), default=0) + 1
            stored = UiValue(key, value, rev, time.time(), origin)
        self.values[key] = stored
        self.server.publish(None, "ui.changed", P.to_dict(self._event(stored, replay=False)))
        return P.Reply("", "ok", {"rev": stored.rev})

    def snapshot(self) -> list[P.Event]:
        """Every key as a ``ui.changed`` event with ``replay`` set, oldest revision first: what a
        client gets when it attaches."""
        out = []
        for stored in sorted(self.values.values(), key=lambda v: v.rev):
            payload = P.to_dict(self._event(stored, replay=True))
            out.append(P.Event(kind="ui.changed", payload=payload, time=stored.time))
        return out

    @staticmethod
    def _event(stored: UiValue, replay: bool) -> P.UiChanged:
        return P.UiChanged(key=stored.key, value=stored.value, rev=stored.rev, time=stored.time,
                           origin=stored.origin, replay=replay)


def register(server) -> UiStateRoom:
    """Add ``ui.set`` and ``ui.get`` to a :class:`backend.server.BackendServer`, and the state's
    snapshot to what a client gets when it attaches."""
    room = UiStateRoom(server)

    async def ui_set(client, params: P.SetUiState) -> P.Reply:
        return room.set(params.key, params.value, params.origin)

    async def ui_get(client, params: P.GetUiState) -> P.Reply:
        return P.Reply("", "ok", {"state": {k: {"value": v.value, "rev": v.rev, "time": v.time, "origin": v.origin}
                                            for k, v in room.values.items()}})

    server.handlers.update({"ui.set": ui_set, "ui.get": ui_get})
    server.attach_snapshots.append(room.snapshot)
    server.ui_state = room
    return room
