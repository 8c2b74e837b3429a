"""Refresh the README's screenshots: `make screenshots` (SVG, saved by Textual).

Starts a backend on a temporary data home, runs a short diagnostic job so that the Sessions
pane has something to show, and saves each main pane at 100x30.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend import protocol as P  # noqa: E402
from tests.conftest import start_backend, stop_backend  # noqa: E402
from tui.app import QlwApp  # noqa: E402
from tui.client import Connection  # noqa: E402

OUT = ROOT / "docs" / "img"
PANES = {"1": "gpu", "2": "model", "3": "data", "4": "lora", "5": "train", "8": "sessions"}


async def shoot(home: Path) -> None:
    conn = await Connection.open(P.socket_path(home), "screenshots")
    await conn.call(P.NewSession(name="warm-up"))
    job = await conn.call(P.DiagTicker(count=20, rate=0))
    await conn.close()
    app = QlwApp(home=home, start_backend=False)
    async with app.run_test(size=(100, 30)) as pilot:
        for _ in range(100):
            if app.connection.state == "connected":
                break
            await pilot.pause(0.05)
        await pilot.pause(1.5)  # a GPU sample or two
        for key, name in PANES.items():
            await pilot.press(key)
            await pilot.pause(0.5)
            app.save_screenshot(f"{name}.svg", str(OUT))
            print("saved", OUT / f"{name}.svg")
    del job


def main() -> int:
    home = Path(tempfile.mkdtemp(prefix="qlws-", dir="/tmp"))
    os.environ["QLW_HOME"] = str(home)
    proc = start_backend(home)
    try:
        asyncio.run(shoot(home))
    finally:
        stop_backend(proc)
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
