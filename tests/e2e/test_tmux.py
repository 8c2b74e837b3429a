"""End to end: the real `qlw` in tmux, as a user over SSH would run it.

Opens the workbench at 80x24, starts the embedded tiny model's build (a real job), closes the
terminal in the middle of it, checks that the detached backend carried on, and opens a new `qlw`
at 200x50 that re-attaches and shows what happened meanwhile. Asserts on the screen only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.e2e.tmux import ROOT, Tmux, qlw_command

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


@pytest.fixture
def tmux(qlw_home):
    t = Tmux(qlw_home)
    yield t
    t.close()


def test_whole_backbone_in_a_real_terminal(tmux, qlw_home):
    qlw = qlw_command(qlw_home)

    # 1. A first terminal, 80x24: connects (starting the backend), Sessions tab, start a job.
    tmux.open("first", qlw, (80, 24))
    tmux.wait_for("first", "connected", timeout=60)
    tmux.keys("first", "8")
    tmux.wait_for("first", "Status")
    tmux.keys("first", "v")  # the runs ledger's other view: every session, jobs that are no training run too
    tmux.wait_for("first", "Events")
    tmux.keys("first", "C-t")
    tmux.wait_for("first", "tiny.prepare", timeout=30)
    screen = tmux.wait_for("first", "running", timeout=30)
    assert "Session" in screen and "Events" in screen

    # 2. The terminal goes away mid-job (as an SSH hang-up would take it).
    tmux.kill("first")
    time.sleep(0.5)
    status = subprocess.run([sys.executable, "-m", "tui.cli", "status"], capture_output=True, text=True,
                            env=dict(os.environ, QLW_HOME=str(qlw_home), PYTHONPATH=str(ROOT)))
    assert status.returncode == 0, status.stdout + status.stderr
    assert "tiny.prepare" in status.stdout or "job        none" in status.stdout  # running or already done

    # 3. A new terminal, 200x50: re-attaches and shows the job through to its end.
    tmux.open("second", qlw, (200, 50))
    tmux.wait_for("second", "connected", timeout=30)
    tmux.wait_for("second", "tiny.prepare done", timeout=120)
    tmux.keys("second", "8")
    tmux.wait_for("second", "Status")
    if "Events" not in tmux.screen("second"):
        tmux.keys("second", "v")
    screen = tmux.wait_for("second", "finished", timeout=30)
    assert screen.count("finished") >= 1
    assert (qlw_home / "models" / "qlw-tiny-llama" / "config.json").exists()

    # 4. Quitting the app leaves the backend running; `qlw stop` ends it.
    tmux.keys("second", "q")
    time.sleep(1)
    stop = subprocess.run([sys.executable, "-m", "tui.cli", "stop"], capture_output=True, text=True,
                          env=dict(os.environ, QLW_HOME=str(qlw_home), PYTHONPATH=str(ROOT)), timeout=60)
    assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stdout + stop.stderr
