"""ChatPane: the Chat tab (a placeholder until the feature is built)."""

from __future__ import annotations

from tui.widgets.shell.placeholder_pane import PlaceholderPane


class ChatPane(PlaceholderPane):
    """Chat tab."""

    DESCRIPTION = "Chat: talk to the base model or a trained adapter, streamed as it writes."
