"""Dataset browser benchmark: a 1,000,000-row JSONL through the real backend channel.

    python bench/browse.py [--rows 1000000] [--pages 200] [--stats] [--keep]

Generates a dolly-shaped JSONL (fixed seed; English, Korean and Japanese text of varied length)
in a temporary folder, starts a real backend on a temporary data home and, through
``tui.client`` over its Unix socket, exactly as the Data pane asks:
  1. ``data.open``: the job that builds the Arrow cache (indexing), with its progress events;
  2. the first page after indexing (100 rows, cells cut to 60 characters, as the pane asks);
     target < 2 s;
  3. page-to-page latency: the next page, N times from the start, and N random pages;
     target < 100 ms each;
  4. a filter over every column (the first page computes the match, the next pages reuse it);
  5. a fresh backend on the same data home: ``data.open`` again (the Arrow cache is reused) and
     its first page;
  6. the Data pane itself (headless, 80x24, against that backend): from the key that moves past
     the end of a page to the next page drawn in its table;
  7. with ``--stats``: the ``data.stats`` job over every row (chat template, the tiny model's
     tokenizer, built first in the data home), with its progress events.
Prints a table and writes bench/results/browse.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend import protocol as P  # noqa: E402
from tests.conftest import start_backend as _start_backend, stop_backend  # noqa: E402
from tui.client import Connection  # noqa: E402

SEED = 20261123
PAGE = 100
CELL_CHARS = 60

EN = ("the river model data train answer question capital city number small large because every "
      "where when which country language history science music water light time people world").split()
KO = "한국 서울 데이터 모델 질문 답변 수도 도시 언어 역사 과학 음악 물 빛 시간 사람 세계".split()
JA = "日本 東京 データ モデル 質問 答え 首都 都市 言語 歴史 科学 音楽 水 光 時間 人 世界".split()
CATEGORIES = ("open_qa", "closed_qa", "summarization", "brainstorming", "classification", "creative_writing")


def generate(path: Path, rows: int) -> dict:
    """A dolly-shaped JSONL of ``rows`` rows from a fixed seed."""
    rng = random.Random(SEED)
    t = time.perf_counter()
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            words = rng.choice((EN, EN, KO, JA))
            sep = "" if words is JA else " "
            instruction = sep.join(rng.choices(words, k=rng.randint(4, 16))) + f" #{i}"
            context = sep.join(rng.choices(words, k=rng.randint(0, 60))) if rng.random() < 0.4 else ""
            response = sep.join(rng.choices(words, k=rng.randint(3, 80)))
            f.write(json.dumps({"instruction": instruction, "context": context, "response": response,
                                "category": rng.choice(CATEGORIES)}, ensure_ascii=False) + "\n")
    return {"rows": rows, "bytes": path.stat().st_size, "seconds": round(time.perf_counter() - t, 2)}


def start_backend(home: Path) -> subprocess.Popen:
    """The tests' backend launcher, offline and with the Hub cache inside the data home."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_HOME=str(home / "hf"))
    return _start_backend(home, timeout=30)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def ms(x: float) -> float:
    return round(x * 1000, 2)


def summary(lat: list[float]) -> dict:
    return {"n": len(lat), "p50_ms": ms(pct(lat, 50)), "p95_ms": ms(pct(lat, 95)), "max_ms": ms(max(lat))}


class Client:
    def __init__(self, conn: Connection, events: list[P.Event]):
        self.conn, self.events = conn, events

    @classmethod
    async def open(cls, home: Path) -> "Client":
        events: list[P.Event] = []
        conn = await Connection.open(P.socket_path(home), "bench-browse", events.append)
        await conn.call(P.Attach())
        return cls(conn, events)

    async def open_dataset(self, source: dict) -> tuple[dict, float, int]:
        """``data.open``: (summary, seconds from request to result, progress events)."""
        t = time.perf_counter()
        reply = await self.conn.request(P.OpenData(source=source), timeout=60)
        if reply.status == "ok":
            return reply.result["dataset"], time.perf_counter() - t, 0
        assert reply.status == "accepted", reply
        job_id = reply.result["job_id"]
        while True:
            done = [e for e in self.events if e.kind == "job.finished" and e.payload["job_id"] == job_id]
            if done:
                break
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - t
        payload = done[0].payload
        assert payload["status"] == "done", payload
        progress = sum(1 for e in self.events if e.kind == "job.progress" and e.payload["job_id"] == job_id)
        return payload["result"]["dataset"], elapsed, progress

    async def page(self, source: dict, start: int, filter: str = "") -> tuple[dict, float]:
        t = time.perf_counter()
        page = await self.conn.call(P.DataPage(source=source, start=start, count=PAGE, filter=filter,
                                               cell_chars=CELL_CHARS))
        return page, time.perf_counter() - t


async def run(home: Path, data: Path, n_pages: int) -> dict:
    out: dict = {}
    source = {"path": str(data)}
    c = await Client.open(home)
    summary_, seconds, progress = await c.open_dataset(source)
    rows = summary_["num_rows"]
    out["indexing"] = {"seconds": round(seconds, 2), "rows": rows, "progress_events": progress,
                       "shape": summary_["shape"]}
    page, first = await c.page(source, 0)
    assert len(page["rows"]) == PAGE and page["total"] == rows
    out["first_page_ms"] = ms(first)
    reply_bytes = len(P.encode(P.Reply("x", "ok", page)))

    seq = []
    for i in range(1, n_pages + 1):
        page, dt = await c.page(source, i * PAGE)
        assert page["rows"][0]["index"] == i * PAGE
        seq.append(dt)
    rng = random.Random(SEED)
    rand = []
    for _ in range(n_pages):
        start = rng.randrange(0, rows - PAGE)
        page, dt = await c.page(source, start)
        assert page["rows"][0]["index"] == start
        rand.append(dt)
    out["next_page"] = summary(seq)
    out["random_page"] = summary(rand)
    out["page_reply_bytes"] = reply_bytes

    page, dt = await c.page(source, 0, filter="東京")
    filtered_first = dt
    matches = page["total"]
    filt = []
    for i in range(1, min(n_pages, max(1, matches // PAGE))):
        page, dt = await c.page(source, i * PAGE, filter="東京")
        filt.append(dt)
    out["filter"] = {"text": "東京", "matches": matches, "first_page_ms": ms(filtered_first),
                     **({"next_page": summary(filt)} if filt else {})}
    t = time.perf_counter()
    await c.conn.call(P.DataRow(source=source, index=rows // 2))
    out["row_detail_ms"] = ms(time.perf_counter() - t)
    await c.conn.close()
    return out


async def reopen(home: Path, data: Path) -> dict:
    c = await Client.open(home)
    source = {"path": str(data)}
    _, seconds, _ = await c.open_dataset(source)
    page, first = await c.page(source, 0)
    await c.conn.close()
    return {"open_seconds": round(seconds, 2), "first_page_ms": ms(first)}


async def pane(home: Path, data: Path, n: int) -> dict:
    """Key press past a page's end -> the next page drawn, in the real Data pane (headless)."""
    from textual.widgets import Input

    from tui.app import QlwApp
    from tui.widgets.data.data_pane import DataPane
    from tui.widgets.data.rows_table import RowsTable

    async def until(pilot, condition, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            await pilot.pause(0.001)

    app = QlwApp(home=home)
    app.animation_level = "none"
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.connection.state == "connected")
        await pilot.press("2")
        data_pane = app.screen.query_one(DataPane)
        data_pane.query_one("#data-path", Input).value = str(data)
        t = time.perf_counter()
        data_pane.open_dataset()
        table = data_pane.query_one(RowsTable)
        await until(pilot, lambda: table.row_count == PAGE)
        first = time.perf_counter() - t
        table.focus()
        # Baseline: a key that only moves the cursor inside the page (no request, no redraw of
        # the rows): what Pilot and one frame cost by themselves.
        base = []
        table.move_cursor(row=10)
        await pilot.pause()
        for _ in range(min(n, 40)):
            row = table.cursor_coordinate.row
            t = time.perf_counter()
            await pilot.press("down")
            await until(pilot, lambda: table.cursor_coordinate.row == row + 1)
            base.append(time.perf_counter() - t)
        lat = []
        for _ in range(n):
            target = table.page_end
            table.move_cursor(row=table.row_count - 1)
            await pilot.pause()
            t = time.perf_counter()
            await pilot.press("down")
            await until(pilot, lambda: table.page_start == target and table.row_count == PAGE)
            lat.append(time.perf_counter() - t)
    return {"open_to_first_page_ms": ms(first), "next_page": summary(lat), "cursor_key_baseline": summary(base)}


async def stats(home: Path, data: Path) -> dict:
    """The token-length statistics job over every row, through the channel."""
    c = await Client.open(home)
    source = {"path": str(data)}
    summary_, _, _ = await c.open_dataset(source)
    settings = {"source": summary_["source"], "mapping": summary_["mapping"], "template": "chat"}
    t = time.perf_counter()
    job = await c.conn.call(P.DataStats(settings=settings), timeout=600)
    while True:
        done = [e for e in c.events if e.kind == "job.finished" and e.payload["job_id"] == job["job_id"]]
        if done:
            break
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - t
    payload = done[0].payload
    assert payload["status"] == "done", payload
    progress = sum(1 for e in c.events if e.kind == "job.progress" and e.payload["job_id"] == job["job_id"])
    st = payload["result"]["stats"]
    await c.conn.close()
    return {"seconds": round(elapsed, 1), "rows": st["rows"], "progress_events": progress,
            "p50": st["p50"], "p95": st["p95"], "max": st["max"], "truncated": st["truncated"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--pages", type=int, default=200, help="pages per latency series")
    parser.add_argument("--stats", action="store_true", help="also time the token statistics job over every row")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="qlw-browse-", dir="/tmp"))
    home = tmp / "home"
    home.mkdir()
    data = tmp / "big.jsonl"
    result: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} ({os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
                   f"Linux {platform.release()})",
    }
    try:
        print(f"generating {args.rows:,} rows ...", flush=True)
        result["file"] = generate(data, args.rows)
        proc = start_backend(home)
        try:
            result.update(asyncio.run(run(home, data, args.pages)))
        finally:
            stop_backend(proc)
        proc = start_backend(home)  # a fresh backend: the Arrow cache in the data home is reused
        try:
            result["fresh_backend"] = asyncio.run(reopen(home, data))
            result["pane"] = asyncio.run(pane(home, data, min(args.pages, 50)))
            if args.stats:
                result["stats_job"] = asyncio.run(stats(home, data))
        finally:
            stop_backend(proc)
        cache = home / "datasets"
        result["arrow_cache_bytes"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    f = result["file"]
    rows = [
        ("file", f"{f['rows']:,} rows, {f['bytes'] / 1e6:,.0f} MB JSONL (generated in {f['seconds']} s)", ""),
        ("indexing (data.open job: Arrow cache built)", f"{result['indexing']['seconds']} s, "
         f"{result['indexing']['progress_events']} progress events", ""),
        ("first page after indexing (100 rows)", f"{result['first_page_ms']} ms", "< 2 s"),
        ("next page, x{n}".format(n=result["next_page"]["n"]),
         f"p50 {result['next_page']['p50_ms']} ms, p95 {result['next_page']['p95_ms']} ms, max {result['next_page']['max_ms']} ms",
         "< 100 ms"),
        ("random page, x{n}".format(n=result["random_page"]["n"]),
         f"p50 {result['random_page']['p50_ms']} ms, p95 {result['random_page']['p95_ms']} ms, max {result['random_page']['max_ms']} ms",
         "< 100 ms"),
        ("filter '東京' (all columns): first page / next", f"{result['filter']['first_page_ms']} ms / "
         + (f"p50 {result['filter']['next_page']['p50_ms']} ms" if "next_page" in result["filter"] else "-")
         + f" ({result['filter']['matches']:,} matches)", ""),
        ("row in full", f"{result['row_detail_ms']} ms", ""),
        ("fresh backend: data.open (cache reused) + first page",
         f"{result['fresh_backend']['open_seconds']} s + {result['fresh_backend']['first_page_ms']} ms", ""),
        ("Data pane (headless, 80x24): open (cached) to first page drawn",
         f"{result['pane']['open_to_first_page_ms']} ms", ""),
        ("Data pane: key past a page's end to next page drawn, x{n}".format(n=result["pane"]["next_page"]["n"]),
         f"p50 {result['pane']['next_page']['p50_ms']} ms, p95 {result['pane']['next_page']['p95_ms']} ms, "
         f"max {result['pane']['next_page']['max_ms']} ms", ""),
        ("Data pane: key moving the cursor within a page (baseline), x{n}".format(n=result["pane"]["cursor_key_baseline"]["n"]),
         f"p50 {result['pane']['cursor_key_baseline']['p50_ms']} ms, p95 {result['pane']['cursor_key_baseline']['p95_ms']} ms", ""),
        ("Arrow cache in the data home", f"{result['arrow_cache_bytes'] / 1e6:,.0f} MB", ""),
    ]
    if "stats_job" in result:
        sj = result["stats_job"]
        rows.append(("data.stats job, every row (chat template, tiny tokenizer, incl. its build)",
                     f"{sj['seconds']} s, {sj['progress_events']} progress events; p50 {sj['p50']}, "
                     f"p95 {sj['p95']}, max {sj['max']} tokens", ""))
    width = max(len(r[0]) for r in rows)
    print(f"\n{result['machine']}, {result['date']}")
    for what, figure, target in rows:
        print(f"{what:<{width}}  {figure}{'   target ' + target if target else ''}")
    out = ROOT / "bench" / "results" / "browse.json"
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\nwritten {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
