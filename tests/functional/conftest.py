"""Fixtures of the functional tests that run a real backend on the embedded tiny model (the
helpers that go with them are in helpers.py)."""

from __future__ import annotations

import shutil

import pytest

from backend import tiny
from tests.conftest import start_backend, stop_backend


@pytest.fixture
def backend_with_tiny(qlw_home, tiny_folder):
    """A backend on a data home holding a copy of the tiny model; stopped after the test."""
    shutil.copytree(tiny_folder, tiny.tiny_model_path(qlw_home))
    proc = start_backend(qlw_home)
    yield qlw_home
    stop_backend(proc)
