"""End-to-end tests start detached backends (as `qlw` does for a user): stop each one at the end
of its test, passed or failed, so that none outlives the test and its data home."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.e2e.tmux import ROOT


@pytest.fixture(autouse=True)
def _stop_the_backend(qlw_home):
    yield
    subprocess.run([sys.executable, "-m", "tui.cli", "stop", "--force"], capture_output=True, text=True, timeout=60,
                   env=dict(os.environ, QLW_HOME=str(qlw_home), PYTHONPATH=str(ROOT)))


@pytest.fixture
def tiny_seeded(qlw_home, tiny_folder):
    """The data home with the embedded tiny model already in it (a copy of the session's build):
    `f4` then finds it instead of building it again. The build itself, on a fresh home, is what
    test_newcomer.py and test_tmux.py drive."""
    from backend import tiny

    shutil.copytree(tiny_folder, tiny.tiny_model_path(qlw_home))
    return qlw_home
