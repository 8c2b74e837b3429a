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


class _FakeApp:
    """Enough of an app for tui.ui_state.UiState: timers are noted, never run."""

    def __init__(self):
        self.timers = []

    def set_timer(self, delay, callback, name=""):
        self.timers.append((delay, callback))

        class _T:
            def stop(self_inner):
                pass

        return _T()


def _changed(key, value, rev, origin, replay=False):
    return P.Event("ui.changed", P.to_dict(P.UiChanged(key=key, value=value, rev=rev, time=0.0, origin=origin,
                                                       replay=replay)), 0.0)


def test_the_app_side_rules_own_changes_stale_revisions_and_unsent_edits():
    from tui.ui_state import UiState

    state = UiState(_FakeApp())
    shown = []
    state.changed.publish = shown.append  # what the panes would be told

    state.set("lora", {"r": "16"})  # a pane's default while mounting, before the first attach
    assert state.pending == {"lora"} and state.app.timers == []  # held: not connected yet
    state.on_event(_changed("lora", {"r": "8"}, 5, "other", replay=True))
    assert [c.value for c in shown] == [{"r": "8"}] and state.pending == set()  # the stored state won
    state.on_event(_changed("lora", {"r": "4"}, 4, "other"))  # older than what was seen: dropped
    assert len(shown) == 1

    state.on_connection(True)
    state.set("lora", {"r": "8"})  # what is shown already: nothing to send
    assert state.pending == set()
    state.set("lora", {"r": "32"})
    assert state.pending == {"lora"} and state.app.timers  # sent after the coalescing delay
    state.on_event(_changed("lora", {"r": "32"}, 6, state.origin))  # our own change coming back
    assert len(shown) == 1
    state.on_event(_changed("lora", {"r": "64"}, 7, "other"))  # another terminal's edit, live: it wins
    assert shown[-1].value == {"r": "64"} and "lora" not in state.pending

    state.on_connection(False)  # the connection drops; the user edits meanwhile
    state.set("lora", {"r": "2"})
    state.on_event(_changed("lora", {"r": "64"}, 8, "other", replay=True))  # the re-attach's replay
    assert shown[-1].value == {"r": "64"} and state.pending == {"lora"} and state.get("lora") == {"r": "2"}
