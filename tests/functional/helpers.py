"""Helpers shared by the functional tests: the app with no animations, a wait that polls a
condition with a timeout (never a fixed sleep), the no-backend start of a pane test, and, against
a real backend, a probe of what it handles and a tiny adapter trained through ``train.start``.

The fixtures that go with them (the tiny model built once, a backend on a copy of it) are in
tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from backend import protocol as P
from tests.waits import Budget
from tui.app import QlwApp


def make_app(home: Path, start_backend: bool = False) -> QlwApp:
    """The shell on ``home`` (no backend started unless asked), with animations off: pilot.press
    waits for the tab underline's animation."""
    app = QlwApp(home=home, start_backend=start_backend)
    app.animation_level = "none"
    return app


async def until(pilot, condition, what: str, timeout: float = 10.0) -> None:
    """Let the app run until ``condition()`` holds; fail after ``timeout`` seconds of a quiet
    machine's time (stretched by the load: tests/waits.py)."""
    budget = Budget(timeout)
    while not condition():
        if budget.spent():
            raise AssertionError(f"timed out after {timeout:.0f} s (load-adjusted) waiting for {what}")
        await pilot.pause(0.02)


async def without_backend(pilot) -> None:
    """Wait for the app to say no backend runs, then clear that notice (it names the temporary
    socket path, so it would differ between runs)."""
    app = pilot.app
    await until(pilot, lambda: app.connection.state == "gone", "no backend")
    app.clear_notifications()


# With a real backend ------------------------------------------------------------------------


def skip_unless_backend_has(home: Path, method: str) -> None:
    """Skip (saying why) while the running backend does not handle ``method`` yet."""
    from tui.client import Connection

    async def probe() -> P.Reply:
        conn = await Connection.open(P.socket_path(home), "probe")
        try:
            return await conn.request(P.REQUESTS[method]() if method in P.REQUESTS else P.Ping())
        finally:
            await conn.close()

    if method not in P.REQUESTS:
        pytest.skip(f"the protocol has no {method} yet")
    reply = asyncio.run(probe())
    # A method in the protocol but with no handler in the server fails with a KeyError.
    if reply.code == P.UNKNOWN_METHOD or f"KeyError: '{method}'" in reply.reason:
        pytest.skip(f"the backend does not handle {method} yet")


def tiny_run_config(steps: int = 3) -> dict[str, Any]:
    """The tiny model in fp32 on the CPU, the shipped sample, a few steps: an adapter in seconds."""
    from backend import train_config as TC

    cfg = TC.defaults()
    cfg["name"] = "tiny adapter"
    cfg["model"].update(precision="fp32", device="cpu")
    cfg["data"]["max_length"] = 128
    cfg["lora"].update(r=8, lora_alpha=16)
    cfg["training"].update(max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                           learning_rate=2e-3, logging_steps=1, eval_steps=0, save_steps=0,
                           gradient_checkpointing=False, optim="adamw_torch")
    return cfg


async def train_tiny_adapter(home: Path, timeout: float = 120.0) -> dict[str, Any]:
    """Train a tiny adapter through the backend's train.start; the job's result (adapter_path, ...)."""
    from tui.client import Connection

    events: list[P.Event] = []
    conn = await Connection.open(P.socket_path(home), "test-train", events.append)
    try:
        await conn.call(P.Attach())
        job = await conn.call(P.StartTraining(config=tiny_run_config()))
        budget = Budget(timeout)
        while True:
            done = [e for e in events if e.kind == "job.finished" and e.payload.get("job_id") == job["job_id"]]
            if done:
                break
            if budget.spent():
                raise AssertionError(f"no end of the training run: {(home / 'backend-test.log').read_text()[-2000:]}")
            await asyncio.sleep(0.1)
        assert done[0].payload["status"] == "done", done[0].payload
        finished = [e.payload for e in events if e.kind == "train.finished"]
        return {**done[0].payload.get("result", {}), **(finished[-1] if finished else {})}
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def tab_after_tiny_training(home: Path, tab: str, size: tuple[int, int]) -> AsyncIterator[tuple[Any, str]]:
    """Train a tiny adapter through the backend on ``home``, then run the app connected to it
    with ``tab`` shown: (the pilot, the adapter's path)."""
    trained = await train_tiny_adapter(home)
    app = make_app(home)
    async with app.run_test(size=size) as pilot:
        await until(pilot, lambda: app.connection.state == "connected", "connected", timeout=20)
        app.screen.action_show_tab(tab)
        yield pilot, trained.get("adapter_path", "")
