"""The footer: Textual's Footer, rebuilt once per frame at most.

Textual 8.2's Footer rebuilds itself (about 20 FooterKey widgets) after the next refresh for every
``refresh_bindings`` of the screen, one rebuild per call: qlw's start-up asked 42 of them (each
pane mounting, each focus change), and a pane that refreshes its bindings on several state
changes in one frame asked several. Only the last one shows. This footer keeps at most one
rebuild pending: every change before it runs is in it.
"""

from __future__ import annotations

from textual.screen import Screen
from textual.widgets import Footer


class QlwFooter(Footer):
    """Footer whose rebuilds on binding changes are coalesced, one per frame."""

    _rebuild_pending = False

    def bindings_changed(self, screen: Screen) -> None:
        # As Footer.bindings_changed, with the rebuild asked once until it has run.
        self._bindings_ready = True
        if not screen.app.app_focus or not (self.is_attached and screen is self.screen):
            return
        if not self._rebuild_pending:
            self._rebuild_pending = True
            self.call_after_refresh(self._rebuild)

    async def _rebuild(self) -> None:
        self._rebuild_pending = False
        await self.recompose()
