"""One snapshot per pane not covered by its own test file (Model, Data, Sessions), at 100x30
with no backend: what the pane looks like before anything is loaded, with nothing from the clock
or the host on screen. The other panes' snapshots live in their test files."""

from __future__ import annotations

import pytest

from tests.functional.helpers import make_app, without_backend

SIZE = (100, 30)


@pytest.mark.parametrize("key", ["2", "3", "8"], ids=["model", "data", "sessions"])
def test_pane_snapshot(snap_compare, qlw_home, key, monkeypatch):
    # The Data pane shows where the shipped sample lies: the same text wherever the checkout is.
    monkeypatch.setattr("tui.widgets.data.data_pane.sample_dataset_path",
                        lambda: "/opt/qlw/backend/samples/dolly_sample.jsonl")
    async def settle(pilot):
        await without_backend(pilot)
        await pilot.press(key)
        await pilot.pause(0.3)

    assert snap_compare(make_app(qlw_home), terminal_size=SIZE, run_before=settle)
