"""AppHeader: one line with the app's title, the GPUs in brief, and the connection indicator."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label

from tui.widgets.shell.connection_indicator import ConnectionIndicator
from tui.widgets.shell.gpu_indicator import GpuIndicator


class AppHeader(Horizontal):
    """The top line: title on the left, then the GPUs' memory, then the connection state.

    The title gives way first when the line is short."""

    def compose(self) -> ComposeResult:
        title = self.app.title
        if self.app.sub_title:
            title = f"{title} · {self.app.sub_title}"
        yield Label(title, id="app-title")
        yield GpuIndicator(id="gpu-indicator")
        yield ConnectionIndicator(id="connection")
