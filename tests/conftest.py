"""Shared fixtures: an isolated data home per test and a real backend process on it."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Several pytest-xdist workers (`make test` runs two): one torch thread per process, so that two
# tiny trainings on two cores do not each spin two threads (set before any test imports torch;
# the backends and CLIs the tests start inherit it).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """For ``--dist loadgroup``: a test module's tests stay on one worker (its module fixtures,
    such as a trained tiny run, are made once), and the tmux end-to-end tests run one after the
    other on one worker (each drives a whole qlw and backend)."""
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group("e2e" if path.startswith("tests/e2e/") else path))


@pytest.fixture(autouse=True, scope="session")
def _offline_env():
    """No test may reach the Hub or write to the user's caches."""
    cache = tempfile.mkdtemp(prefix="qlw-hf-")
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=cache)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_folder(pytestconfig, tmp_path_factory) -> Path:
    """The embedded tiny model, built once into pytest's cache (reused across runs; without the
    cache plugin, once per session). Tests that change it work on a copy."""
    from backend import tiny

    cache = getattr(pytestconfig, "cache", None)
    home = cache.mkdir("qlw-tiny") if cache is not None else tmp_path_factory.mktemp("qlw-tiny")
    return tiny.ensure_tiny_model(home)


@pytest.fixture
def qlw_home(monkeypatch):
    """A fresh data home under a short path (AF_UNIX paths are limited to 107 bytes)."""
    home = Path(tempfile.mkdtemp(prefix="qlw-", dir="/tmp"))
    monkeypatch.setenv("QLW_HOME", str(home))
    yield home
    shutil.rmtree(home, ignore_errors=True)


def start_backend(home: Path, timeout: float = 20.0) -> subprocess.Popen:
    """Start `python -m backend serve` on ``home`` (foreground child of the test) and wait until
    its socket answers."""
    from backend import protocol as P
    from tui.client import Connection

    env = dict(os.environ, QLW_HOME=str(home), PYTHONPATH=str(ROOT))
    log = open(home / "backend-test.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--home", str(home)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(home))
    deadline = time.monotonic() + timeout

    async def probe():
        conn = await Connection.open(P.socket_path(home), "probe", timeout=1)
        await conn.close()

    while True:
        try:
            asyncio.run(probe())
            return proc
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"backend did not start: {(home / 'backend-test.log').read_text()[-2000:]}")
            time.sleep(0.05)


def stop_backend(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def backend(qlw_home):
    """A real backend process serving ``qlw_home``; yields the home."""
    proc = start_backend(qlw_home)
    yield qlw_home
    stop_backend(proc)


@pytest.fixture
def backend_with_tiny(qlw_home, tiny_folder):
    """A real backend on a data home holding a copy of the tiny model (copied, not rebuilt);
    stopped after the test."""
    from backend import tiny

    shutil.copytree(tiny_folder, tiny.tiny_model_path(qlw_home))
    proc = start_backend(qlw_home)
    yield qlw_home
    stop_backend(proc)
