"""End-to-end tests start detached backends (as `qlw` does for a user): stop each one at the end
of its test, passed or failed, so that none outlives the test and its data home."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.e2e.tmux import ROOT


@pytest.fixture(autouse=True)
def _stop_the_backend(qlw_home):
    yield
    subprocess.run([sys.executable, "-m", "tui.cli", "stop", "--force"], capture_output=True, text=True, timeout=60,
                   env=dict(os.environ, QLW_HOME=str(qlw_home), PYTHONPATH=str(ROOT)))
