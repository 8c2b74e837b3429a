"""ConnectionIndicator: the channel's state in the header, and what to do when it is down."""

from __future__ import annotations

from textual.widgets import Static

from tui.client import CONNECTED, CONNECTING, GONE, RECONNECTING
from tui.messages import ConnectionChanged

_LABELS = {
    CONNECTING: "◌ connecting…",
    RECONNECTING: "◌ re-connecting…",
    GONE: "✖ backend gone: press ctrl+r to start a backend",
}


class ConnectionIndicator(Static):
    """Connected (with the backend's pid), re-connecting, or gone (with the key that helps).

    The full detail (why it is gone, which socket) is the tooltip, so the header stays one line.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(markup=False, **kwargs)

    def on_mount(self) -> None:
        self.show(self.app.connection)  # type: ignore[attr-defined]
        self.app.connection_changed.subscribe(self, self.show)  # type: ignore[attr-defined]

    def show(self, change: ConnectionChanged) -> None:
        if change.state == CONNECTED:
            # BackendClient says "backend pid N" when connected.
            label = f"● connected · {change.detail}" if change.detail else "● connected"
        else:
            label = _LABELS.get(change.state, change.state)
        self.update(label)
        self.tooltip = change.detail or None
        for state in (CONNECTING, CONNECTED, RECONNECTING, GONE):
            self.set_class(change.state == state, f"-{state}")
