"""Refresh the README's screenshots: `make screenshots` (SVG, saved by Textual).

Starts a backend on a temporary data home and runs the loop on the embedded default through the
protocol (the tiny model loaded, a 20-step run, a chat answered by base and tuned side by side),
then opens the workbench at 100x30 and saves each pane, opening the sample data and walking the
Merge wizard to a verified folder with the keys a user would press.
"""

from __future__ import annotations

import asyncio
import html
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend import protocol as P  # noqa: E402
from tests.conftest import start_backend, stop_backend  # noqa: E402
from tui.app import QlwApp  # noqa: E402
from tui.client import Connection  # noqa: E402

OUT = ROOT / "docs" / "img"
SIZE = (100, 30)
RUN = {"version": 1, "name": "tour", "model": {"source": ""},
       "training": {"max_steps": 20, "logging_steps": 2, "eval_steps": 10, "save_steps": 10,
                    "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 0.002}}


async def run_job(conn: Connection, finished: dict, request) -> dict:
    """Send a job request and wait for its job.finished."""
    reply = await conn.call(request)
    job_id = reply["job_id"]
    while job_id not in finished:
        await asyncio.sleep(0.1)
    result = finished[job_id]
    if result["status"] != "done":
        raise RuntimeError(f"{request.METHOD} ended {result['status']}: {result.get('error')}")
    return result["result"]


async def prepare(home: Path) -> None:
    finished: dict[str, dict] = {}

    def on_event(ev) -> None:
        if ev.kind == "job.finished":
            finished[ev.payload["job_id"]] = ev.payload

    conn = await Connection.open(P.socket_path(home), "screenshots", on_event)
    await conn.call(P.Attach())
    tiny = await run_job(conn, finished, P.PrepareTiny())
    await run_job(conn, finished, P.LoadModel(source=tiny["path"]))
    await run_job(conn, finished, P.StartTraining(config=RUN))
    targets = (await conn.call(P.ChatTargets()))["targets"]
    tuned = next(t["id"] for t in targets if t["kind"] == "tuned")
    await run_job(conn, finished, P.ChatLoad(target="base"))
    await run_job(conn, finished, P.ChatSend(
        target="base", compare_with=tuned, settings={"max_new_tokens": 40, "do_sample": False},
        messages=[{"role": "user", "content": "Name the capital city of Norway."}]))
    await conn.close()


def screen_text(app) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", app.export_screenshot())).replace("\xa0", " ")


async def until(pilot, app, text: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in screen_text(app):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{text!r} never appeared")
        await pilot.pause(0.2)


async def shoot(home: Path) -> None:
    app = QlwApp(home=home, start_backend=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, app, "connected", 30)
        await pilot.pause(2.0)  # a GPU sample or two, the replay drawn

        def save(name: str) -> None:
            app.save_screenshot(f"{name}.svg", str(OUT))
            print("saved", OUT / f"{name}.svg")

        for key, name in (("1", "gpu"), ("2", "model"), ("4", "lora"), ("5", "train"), ("6", "chat"),
                          ("8", "sessions")):
            await pilot.press(key)
            await pilot.pause(1.0)
            save(name)
        await pilot.press("3")
        await pilot.pause(0.5)
        await pilot.press("enter")  # Open: the shipped sample
        await until(pilot, app, "585 rows")
        await pilot.pause(0.5)
        save("data")
        await pilot.press("7")
        await until(pilot, app, "Final loss")
        await pilot.press("enter")
        await until(pilot, app, "fits")
        await pilot.press("ctrl+n")
        await until(pilot, app, "Merge ▶")
        await pilot.press("f5")
        await until(pilot, app, "noise floor", 240)
        await pilot.pause(0.5)
        save("merge")


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="qlws-", dir="/tmp"))
    os.environ["QLW_HOME"] = str(home)
    proc = start_backend(home)
    try:
        asyncio.run(prepare(home))
        asyncio.run(shoot(home))
    finally:
        stop_backend(proc)
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
