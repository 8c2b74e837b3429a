"""AppHeader: one line with the app's title and the connection indicator."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label

from tui.widgets.shell.connection_indicator import ConnectionIndicator


class AppHeader(Horizontal):
    """The top line: title on the left, connection state on the right."""

    def compose(self) -> ComposeResult:
        title = self.app.title
        if self.app.sub_title:
            title = f"{title} · {self.app.sub_title}"
        yield Label(title, id="app-title")
        yield ConnectionIndicator(id="connection")
