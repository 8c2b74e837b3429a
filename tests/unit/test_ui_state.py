"""The front end's state kept by the backend: the store's table, the room (ui.set, ui.changed on
attach and live), and the app-side rules of tui/ui_state.py (no Textual app needed)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest

from backend import protocol as P
from sessions.store import Store


def test_store_keeps_the_newest_value_of_each_key_across_reopening(tmp_path):
    store = Store(tmp_path / "sessions.db")
    a = store.set_ui("lora", {"lora.r": "8"}, origin="t1")
    b = store.set_ui("data", {"path": "/data/ünï.jsonl"}, origin="t1")
    c = store.set_ui("lora", {"lora.r": "32", "run-name": "mine"}, origin="t2")
    assert (a.rev, b.rev, c.rev) == (1, 2, 3)  # one counter over all keys
    store.close()

    again = Store(tmp_path / "sessions.db")
    state = {v.key: v for v in again.ui_state()}
    assert state["lora"].value == {"lora.r": "32", "run-name": "mine"}  # the last writer won
    assert state["lora"].origin == "t2" and state["lora"].rev == 3
    assert state["data"].value == {"path": "/data/ünï.jsonl"}
    assert [v.key for v in again.ui_state()] == ["data", "lora"]  # oldest revision first
    assert again.set_ui("tab", "chat").rev == 4


@pytest.fixture
def home():
    path = Path(tempfile.mkdtemp(prefix="qlw-ui-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _server(home: Path):
    from backend.server import BackendServer

    server = BackendServer(home)
    await server.start()
    return server


async def _client(home: Path, name: str, events: list):
    from tui.client import Connection

    return await Connection.open(P.socket_path(home), name, on_event=events.append)


async def _until(cond, what: str):
    # Waits for the other side's message; fails only if nothing at all arrives for a long time.
    for _ in range(2000):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


def test_room_broadcasts_live_replays_on_attach_and_survives_a_restart(home):
    async def body():
        server = await _server(home)
        try:
            seen_a, seen_b = [], []
            a, b = await _client(home, "a", seen_a), await _client(home, "b", seen_b)
            await a.call(P.Attach())
            await b.call(P.Attach())
            # Another session's events come first on attach; the state after them.
            server.publish(server.ensure_session("s"), "log", {"level": "info", "message": "hello"})

            result = await a.call(P.SetUiState(key="lora", value={"lora.r": "8"}, origin="app-a"))
            assert isinstance(result["rev"], int)
            await _until(lambda: any(e.kind == "ui.changed" for e in seen_b), "b sees a's change live")
            live = next(e for e in seen_b if e.kind == "ui.changed")
            change = P.event_payload(live)
            assert (change.key, change.value, change.origin, change.replay) == ("lora", {"lora.r": "8"}, "app-a",
                                                                                 False)
            assert live.seq is None  # not a session event: it is kept in its own table

            await b.call(P.SetUiState(key="lora", value={"lora.r": "64"}, origin="app-b"))
            await b.call(P.SetUiState(key="shell.tab", value="chat", origin="app-b"))

            seen_c = []
            c = await _client(home, "c", seen_c)
            await c.call(P.Attach())
            kinds = [e.kind for e in seen_c]
            assert "log" in kinds and kinds.index("log") < kinds.index("ui.changed")
            replayed = {e.payload["key"]: e.payload for e in seen_c if e.kind == "ui.changed"}
            assert replayed["lora"]["value"] == {"lora.r": "64"} and replayed["lora"]["replay"] is True
            assert replayed["shell.tab"]["value"] == "chat"
            got = await c.call(P.GetUiState())
            assert got["state"]["lora"]["value"] == {"lora.r": "64"}
            for conn in (a, b, c):
                await conn.close()
        finally:
            await server.shutdown(graceful=False)

        # `qlw stop`, then `qlw`: a new backend on the same home has the same state.
        server = await _server(home)
        try:
            seen = []
            d = await _client(home, "d", seen)
            await d.call(P.Attach())
            replayed = {e.payload["key"]: e.payload["value"] for e in seen if e.kind == "ui.changed"}
            assert replayed == {"lora": {"lora.r": "64"}, "shell.tab": "chat"}
            await d.close()
        finally:
            await server.shutdown(graceful=False)

    asyncio.run(body())


def test_room_refuses_bad_keys_huge_values_and_too_many_keys(home):
    async def body():
        server = await _server(home)
        try:
            conn = await _client(home, "x", [])
            bad = await conn.request(P.SetUiState(key="Bad Key!", value=1))
            assert bad.status == "refused" and "must match" in bad.reason
            huge = await conn.request(P.SetUiState(key="big", value="x" * (P.UI_MAX_VALUE_BYTES + 1)))
            assert huge.status == "refused" and "bytes" in huge.reason
            for i in range(P.UI_MAX_KEYS):
                assert (await conn.request(P.SetUiState(key=f"k{i}", value=i))).ok
            assert (await conn.request(P.SetUiState(key="k0", value="again"))).ok  # an existing key: fine
            more = await conn.request(P.SetUiState(key="one-more", value=1))
            assert more.status == "refused" and "keys" in more.reason
            await conn.close()
        finally:
            await server.shutdown(graceful=False)

    asyncio.run(body())
