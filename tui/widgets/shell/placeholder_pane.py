"""PlaceholderPane: a capability's tab before it is built, saying in one line what goes there."""

from __future__ import annotations

from typing import ClassVar

from textual.widgets import Static


class PlaceholderPane(Static):
    """Base of the not-yet-built panes; subclasses set ``DESCRIPTION``."""

    DESCRIPTION: ClassVar[str] = ""

    def __init__(self, **kwargs) -> None:
        super().__init__(self.DESCRIPTION, markup=False, **kwargs)
