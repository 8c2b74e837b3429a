"""The front end's state (backend/ui_state.py, tui/ui_state.py).
"""

from __future__ import annotations

from typing import Any

from backend.protocol.core import event, request


# --------------------------------------------------------------------------------------------
# The front end's state (backend/ui_state.py, tui/ui_state.py).
#
# What a user typed or chose in a pane (the LoRA form, the open dataset and its mapping, the chat
# targets and settings, the merge wizard's step, the tab last shown, ...) belongs to the backend,
# not to one terminal: each pane keeps its state under one key (``"lora"``, ``"data"``, ...) as
# plain data, sends it with ``ui.set`` when it changes (coalesced: at most a few a second while
# typing), and the backend stores it in the data home's store and broadcasts it as ``ui.changed``.
# On ``attach`` the backend sends every key as ``ui.changed`` with ``replay`` set (after the
# session's events, so that the state wins over what the replay drew), then the live changes of
# every client: a second terminal, a terminal that re-attaches after a dropped connection and one
# started after a backend restart all show the same values. The last writer wins, per key.

#: A key: lower-case words joined by ``.``, ``-`` or ``_`` (``"lora"``, ``"chat"``, ``"shell.tab"``).
UI_KEY_PATTERN = r"^[a-z][a-z0-9_.-]{0,63}$"
#: The most keys the backend keeps, and the largest value (as JSON) one key may hold.
UI_MAX_KEYS = 64
UI_MAX_VALUE_BYTES = 256 * 1024


@request("ui.set")
class SetUiState:
    """Set the front end's state under ``key`` to ``value`` (plain JSON data; the last writer
    wins). ``origin`` names the client instance that set it, so that it can tell its own changes
    from another terminal's. The reply: ``{"rev": n}``, the revision the value got (one counter
    over all keys). Refused for a key that does not match ``UI_KEY_PATTERN``, a value over
    ``UI_MAX_VALUE_BYTES`` or a new key beyond ``UI_MAX_KEYS``."""

    key: str
    value: Any
    origin: str = ""


@request("ui.get")
class GetUiState:
    """Every key of the front end's state: ``{"state": {key: {"value", "rev", "time",
    "origin"}}}`` (for tools and tests; an attached client gets them as ``ui.changed``)."""


@event("ui.changed")
class UiChanged:
    """The front end's state under ``key`` is ``value`` (revision ``rev``, set by client
    ``origin`` at ``time``). Sent live to every attached client when a client sets it, and for
    every key after the replay of ``attach`` (``replay`` true). Kept in the store's own table,
    never among a session's events: the state outlives sessions."""

    key: str
    value: Any
    rev: int
    time: float
    origin: str = ""
    replay: bool = False

