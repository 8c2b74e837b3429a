"""The sessions store: sessions, events, artifacts, errors, and surviving kill -9."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from sessions.store import Store, StoreError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sessions_events_artifacts_errors(tmp_path):
    store = Store(tmp_path / "sessions.db")
    a = store.create_session("first", {"lora": {"r": 16, "lora_alpha": 16}})
    time.sleep(0.01)
    b = store.create_session("second")
    assert [s.id for s in store.list_sessions()] == [b.id, a.id]  # newest first
    assert store.get_session(a.id).config == {"lora": {"r": 16, "lora_alpha": 16}}

    seqs = [store.append_event(a.id, "log", {"level": "info", "message": f"m{i}"}) for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    assert store.append_event(b.id, "log", {"level": "info", "message": "b"}) == 1  # per session
    assert [e.seq for e in store.events(a.id, since=2)] == [3, 4, 5]
    assert [e.payload["message"] for e in store.read_events(a.id, since=3)] == ["m3", "m4"]
    assert [e.seq for e in store.events(a.id, since=0, limit=2)] == [1, 2]

    store.set_status(a.id, "running")
    with pytest.raises(ValueError):
        store.set_status(a.id, "bogus")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "w.safetensors").write_bytes(b"x" * 100)
    store.add_artifact(a.id, "adapter", tmp_path / "adapter")
    assert store.artifacts(a.id)[0]["size"] == 100
    store.add_error(a.id, "CUDA out of memory", location="step 12", hint="lower the batch size")
    assert store.errors(a.id)[0]["hint"] == "lower the batch size"
    store.close()

    again = Store(tmp_path / "sessions.db")
    assert again.get_session(a.id).last_seq == 5
    assert again.append_event(a.id, "log", {"level": "info", "message": "m5"}) == 6
    assert again.mark_interrupted() == [a.id]
    assert again.get_session(a.id).status == "interrupted"
    assert again.mark_interrupted() == []
    assert oct(os.stat(tmp_path / "sessions.db").st_mode & 0o777) == "0o600"
    again.close()


def test_wal_mode_and_unknown_session(tmp_path):
    store = Store(tmp_path / "s.db")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(KeyError):
        store.append_event("nope", "log", {})


def test_newer_schema_is_refused(tmp_path):
    Store(tmp_path / "s.db").close()
    db = sqlite3.connect(tmp_path / "s.db")
    db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer qlw"):
        Store(tmp_path / "s.db")


def test_not_a_database_is_a_clear_error(tmp_path):
    (tmp_path / "s.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open the sessions store"):
        Store(tmp_path / "s.db")


def test_kill_9_while_writing_loses_at_most_one_event(tmp_path):
    db = tmp_path / "sessions.db"
    writer = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {ROOT!r})
        from sessions.store import Store
        s = Store({str(db)!r}); sid = s.create_session("victim").id
        s.set_status(sid, "running")
        print(sid, flush=True)
        n = 0
        while True:
            n += 1
            s.append_event(sid, "log", {{"level": "info", "message": "x" * 200, "n": n}})
            if n % 50 == 0:
                print(n, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    sid = proc.stdout.readline().strip()
    acknowledged = 0
    while acknowledged < 500:
        acknowledged = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    store = Store(db)
    assert store.integrity_check() == "ok"
    events = store.events(sid)
    # Every event reported as written is there, in order, with no hole.
    assert len(events) >= acknowledged
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.payload["n"] for e in events] == list(range(1, len(events) + 1))
    assert store.get_session(sid).last_seq == len(events)
    assert store.mark_interrupted() == [sid]
    assert store.get_session(sid).status == "interrupted"
