"""One snapshot per pane not covered by its own test file (Model, Data, Sessions), at 100x30
with no backend: what the pane looks like before anything is loaded, with nothing from the clock
or the host on screen. The other panes' snapshots live in their test files."""

from __future__ import annotations

import time

import pytest

from tui.app import QlwApp

SIZE = (100, 30)


async def _until(pilot, condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await pilot.pause(0.02)


@pytest.mark.parametrize("key", ["2", "3", "8"], ids=["model", "data", "sessions"])
def test_pane_snapshot(snap_compare, qlw_home, key, monkeypatch):
    # The Data pane shows where the shipped sample lies: the same text wherever the checkout is.
    monkeypatch.setattr("tui.widgets.data.data_pane.sample_dataset_path",
                        lambda: "/opt/qlw/backend/samples/dolly_sample.jsonl")
    async def settle(pilot):
        app = pilot.app
        await _until(pilot, lambda: app.connection.state == "gone", "no backend")
        app.clear_notifications()  # the notice names the temporary socket path
        await pilot.press(key)
        await pilot.pause(0.3)

    app = QlwApp(home=qlw_home, start_backend=False)
    app.animation_level = "none"
    assert snap_compare(app, terminal_size=SIZE, run_before=settle)
