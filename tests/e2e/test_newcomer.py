"""End to end: a newcomer's first run on the defaults (issue 15).

A fresh data home, `qlw` at 80x24, and only the keys a newcomer presses: `ctrl+t` (build the
embedded tiny model), `4` (the LoRA tab), `f5` (Start on the defaults: the tiny model and the
shipped sample). The run must give a loss table of at least 10 training-loss rows and a curve,
not the one row and one dot that 2 optimizer steps with logging_steps 10 gave. Waits wait for
progress (tests/e2e/tmux.py), so a loaded machine makes this slower, not red.
"""

from __future__ import annotations

import re
import shutil

import pytest

from sessions.store import Store
from tests.e2e.tmux import Tmux, qlw_command

pytestmark = [pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
              pytest.mark.slow]


@pytest.fixture
def tmux(qlw_home):
    t = Tmux(qlw_home)
    yield t
    t.close()


def test_ctrl_t_4_f5_on_a_fresh_home_gives_a_curve(tmux, qlw_home):
    assert not (qlw_home / "sessions.db").exists()  # a fresh data home
    tmux.open("n", qlw_command(qlw_home), (80, 24))
    tmux.wait_for("n", "connected")
    tmux.keys("n", "C-t")
    tmux.wait_for("n", "tiny.prepare done")
    tmux.keys("n", "4")
    tmux.wait_for("n", "trainable params: ")  # the LoRA tab's check of the defaults
    tmux.keys("n", "F5")
    screen, m = tmux.wait_match("n", r"finished at step (\d+)/(\d+)")
    assert m.group(1) == m.group(2) and int(m.group(2)) >= 10, screen
    # The curve: braille dots of a line, not one mark.
    assert len(re.findall("[\u2801-\u28ff]", screen)) >= 10, screen

    store = Store(qlw_home / "sessions.db")
    try:
        rows = {e.payload["step"] for session in store.list_sessions() for e in store.read_events(session.id)
                if e.kind == "train.log" and e.payload.get("loss") is not None}
    finally:
        store.close()
    assert len(rows) >= 10, sorted(rows)
