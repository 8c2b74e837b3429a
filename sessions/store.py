"""The sessions store: every run's config, events, artifacts and errors, and what the user typed
and chose in each pane (``ui_state``, one row per key: it outlives sessions), in SQLite (WAL).

One backend writes (it holds the data home's lock); any number of readers (tools, a replay in a
worker thread) open their own connections. Each event is its own committed transaction, so a
``kill -9`` loses at most the event being written; on the next start the backend marks sessions
that were still ``running`` as ``interrupted``.

Payloads and configs are stored as JSON text: plain data, never pickled objects.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

SCHEMA_VERSION = 1

#: Session statuses. ``running`` means a job of this session was running when it was written.
STATUSES = ("idle", "running", "finished", "failed", "cancelled", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id       TEXT PRIMARY KEY,
    name     TEXT NOT NULL,
    created  REAL NOT NULL,
    updated  REAL NOT NULL,
    status   TEXT NOT NULL,
    config   TEXT NOT NULL DEFAULT '{}',
    last_seq INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_created ON sessions(created);
CREATE TABLE IF NOT EXISTS events (
    session_id TEXT NOT NULL REFERENCES sessions(id),
    seq        INTEGER NOT NULL,
    time       REAL NOT NULL,
    kind       TEXT NOT NULL,
    payload    TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS artifacts (
    id         INTEGER PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions(id),
    kind       TEXT NOT NULL,
    path       TEXT NOT NULL,
    size       INTEGER,
    created    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS errors (
    id         INTEGER PRIMARY KEY,
    session_id TEXT REFERENCES sessions(id),
    time       REAL NOT NULL,
    message    TEXT NOT NULL,
    location   TEXT NOT NULL DEFAULT '',
    hint       TEXT NOT NULL DEFAULT '',
    detail     TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS ui_state (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL,
    rev    INTEGER NOT NULL,
    time   REAL NOT NULL,
    origin TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
"""


@dataclass
class SessionInfo:
    """One row of the sessions table, as plain data."""

    id: str
    name: str
    created: float
    updated: float
    status: str
    config: dict[str, Any] = field(default_factory=dict)
    last_seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class UiValue:
    """One key of the front end's state (what a user typed or chose in a pane): the newest
    value, its revision (one counter over all keys), when and by which client it was set."""

    key: str
    value: Any
    rev: int
    time: float
    origin: str = ""


@dataclass
class StoredEvent:
    """One recorded event."""

    session: str
    seq: int
    time: float
    kind: str
    payload: dict[str, Any]


class StoreError(RuntimeError):
    """The store cannot be used (unreadable file, newer schema)."""


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10, check_same_thread=False)
    else:
        conn = sqlite3.connect(str(path), timeout=10, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


class Store:
    """The store of one data home. Writes are serialised by a lock, so a job thread may record
    artifacts while the event loop records events."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Born 0600: SQLite gives the -wal and -shm files the database file's mode, and they
            # hold the newest events (chat text, configs) until a checkpoint.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError:
            pass  # unwritable: the connect below says why
        try:
            self._db = _connect(self.path)
            # WAL: readers never block the writer; NORMAL: a commit survives a process crash
            # (only an OS crash or power loss can drop the last commits).
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open the sessions store {self.path}: {exc}") from exc
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer qlw (schema {row[0]} > {SCHEMA_VERSION}); "
                "upgrade qlw or set QLW_HOME to another folder"
            )
        for f in (self.path, self.path.with_name(self.path.name + "-wal"), self.path.with_name(self.path.name + "-shm")):
            try:
                os.chmod(f, 0o600)  # a store created by an older qlw
            except OSError:
                pass
        self._lock = threading.Lock()
        self._last_seq: dict[str, int] = dict(self._db.execute("SELECT id, last_seq FROM sessions"))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # Sessions ---------------------------------------------------------------------------------

    def create_session(self, name: str = "", config: dict[str, Any] | None = None) -> SessionInfo:
        """A new session, status ``idle``. Its id sorts by creation time."""
        now = time.time()
        sid = time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + "-" + secrets.token_hex(3)
        info = SessionInfo(sid, name or sid, now, now, "idle", dict(config or {}), 0)
        with self._lock:
            self._db.execute(
                "INSERT INTO sessions (id, name, created, updated, status, config) VALUES (?,?,?,?,?,?)",
                (sid, info.name, now, now, "idle", json.dumps(info.config)),
            )
            self._last_seq[sid] = 0
        return info

    def set_status(self, session: str, status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown session status {status!r}")
        with self._lock:
            self._db.execute(
                "UPDATE sessions SET status=?, updated=? WHERE id=?", (status, time.time(), session)
            )

    def set_name(self, session: str, name: str) -> None:
        """Name a session (a run's name, given when the run starts in a session made earlier)."""
        with self._lock:
            self._db.execute("UPDATE sessions SET name=?, updated=? WHERE id=?", (name, time.time(), session))

    def set_config(self, session: str, config: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE sessions SET config=?, updated=? WHERE id=?",
                (json.dumps(config), time.time(), session),
            )

    def delete_session(self, session: str) -> bool:
        """Remove a session and everything recorded for it (events, artifacts, errors), in one
        transaction; False if there was none. Files are the caller's (backend/ledger.py)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for table, column in (("events", "session_id"), ("artifacts", "session_id"),
                                      ("errors", "session_id"), ("sessions", "id")):
                    cur = self._db.execute(f"DELETE FROM {table} WHERE {column}=?", (session,))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._last_seq.pop(session, None)
        return cur.rowcount > 0

    def mark_interrupted(self) -> list[str]:
        """Sessions left ``running`` by a backend that died: mark them ``interrupted``."""
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT id FROM sessions WHERE status='running'")]
            if ids:
                self._db.execute(
                    "UPDATE sessions SET status='interrupted', updated=? WHERE status='running'",
                    (time.time(),),
                )
        return ids

    def get_session(self, session: str) -> SessionInfo | None:
        row = self._db.execute(
            "SELECT id, name, created, updated, status, config, last_seq FROM sessions WHERE id=?",
            (session,),
        ).fetchone()
        return _session(row) if row else None

    def list_sessions(self, limit: int = 200) -> list[SessionInfo]:
        """Sessions, newest first."""
        return list_sessions(self._db, limit)

    def read_sessions(self, limit: int = 200) -> list[SessionInfo]:
        """Like :meth:`list_sessions`, on a fresh read-only connection: safe from any thread."""
        conn = _connect(self.path, readonly=True)
        try:
            return list_sessions(conn, limit)
        finally:
            conn.close()

    def latest_session(self) -> SessionInfo | None:
        found = self.list_sessions(1)
        return found[0] if found else None

    # Events -----------------------------------------------------------------------------------

    def append_event(self, session: str, kind: str, payload: dict[str, Any], when: float | None = None) -> int:
        """Record one event and return its sequence number (1, 2, ... per session)."""
        when = time.time() if when is None else when
        text = json.dumps(payload, ensure_ascii=False, allow_nan=True)  # a NaN loss must still be reported
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (a file name that is not UTF-8): escape, keep the event
            text = json.dumps(payload, ensure_ascii=True, allow_nan=True)
        with self._lock:
            seq = self._last_seq.get(session)
            if seq is None:
                raise KeyError(f"unknown session {session!r}")
            seq += 1
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO events (session_id, seq, time, kind, payload) VALUES (?,?,?,?,?)",
                    (session, seq, when, kind, text),
                )
                self._db.execute(
                    "UPDATE sessions SET last_seq=?, updated=? WHERE id=?", (seq, when, session)
                )
                self._db.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (disk full) may have rolled back already: keep its error, not ours.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._last_seq[session] = seq
        return seq

    def last_event(self, session: str, kind: str) -> StoredEvent | None:
        """The newest event of ``kind`` in ``session``, if any."""
        row = self._db.execute(
            "SELECT seq, time, kind, payload FROM events WHERE session_id=? AND kind=? ORDER BY seq DESC LIMIT 1",
            (session, kind),
        ).fetchone()
        return StoredEvent(session, row[0], row[1], row[2], json.loads(row[3])) if row else None

    def last_seq(self, session: str) -> int:
        return self._last_seq.get(session, 0)

    def events(self, session: str, since: int = 0, limit: int | None = None) -> list[StoredEvent]:
        """The events of ``session`` with ``seq > since``, in order."""
        return read_events(self._db, session, since, limit)

    def read_events(self, session: str, since: int = 0, limit: int | None = None) -> list[StoredEvent]:
        """Like :meth:`events`, on a fresh read-only connection: safe from any thread."""
        conn = _connect(self.path, readonly=True)
        try:
            return read_events(conn, session, since, limit)
        finally:
            conn.close()

    # The front end's state -------------------------------------------------------------------

    def set_ui(self, key: str, value: Any, origin: str = "", when: float | None = None) -> UiValue:
        """Record ``value`` as the newest of ``key`` (the last writer wins) with the next revision."""
        when = time.time() if when is None else when
        text = json.dumps(value, ensure_ascii=False, allow_nan=True)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (a file name that is not UTF-8): escape it
            text = json.dumps(value, ensure_ascii=True, allow_nan=True)
        with self._lock:
            rev = (self._db.execute("SELECT MAX(rev) FROM ui_state").fetchone()[0] or 0) + 1
            self._db.execute(
                "INSERT INTO ui_state (key, value, rev, time, origin) VALUES (?,?,?,?,?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value, rev=excluded.rev, "
                "time=excluded.time, origin=excluded.origin",
                (key, text, rev, when, origin),
            )
        return UiValue(key, value, rev, when, origin)

    def ui_state(self) -> list[UiValue]:
        """Every key of the front end's state, oldest revision first."""
        rows = self._db.execute("SELECT key, value, rev, time, origin FROM ui_state ORDER BY rev")
        return [UiValue(k, json.loads(v), r, t, o) for k, v, r, t, o in rows]

    # Artifacts and errors ---------------------------------------------------------------------

    def add_artifact(self, session: str, kind: str, path: str | Path, size: int | None = None) -> None:
        p = Path(path)
        if size is None:
            size = _size_of(p)
        with self._lock:
            self._db.execute(
                "INSERT INTO artifacts (session_id, kind, path, size, created) VALUES (?,?,?,?,?)",
                (session, kind, str(p), size, time.time()),
            )

    def artifacts(self, session: str) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT kind, path, size, created FROM artifacts WHERE session_id=? ORDER BY id", (session,)
        )
        return [dict(zip(("kind", "path", "size", "created"), r)) for r in rows]

    def add_error(
        self, session: str | None, message: str, location: str = "", hint: str = "", detail: str = ""
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO errors (session_id, time, message, location, hint, detail) VALUES (?,?,?,?,?,?)",
                (session, time.time(), message, location, hint, detail),
            )

    def errors(self, session: str | None = None) -> list[dict[str, Any]]:
        if session is None:
            rows = self._db.execute("SELECT session_id, time, message, location, hint, detail FROM errors ORDER BY id")
        else:
            rows = self._db.execute(
                "SELECT session_id, time, message, location, hint, detail FROM errors WHERE session_id=? ORDER BY id",
                (session,),
            )
        keys = ("session", "time", "message", "location", "hint", "detail")
        return [dict(zip(keys, r)) for r in rows]

    def integrity_check(self) -> str:
        return self._db.execute("PRAGMA integrity_check").fetchone()[0]


def read_events(conn: sqlite3.Connection, session: str, since: int = 0, limit: int | None = None) -> list[StoredEvent]:
    sql = "SELECT seq, time, kind, payload FROM events WHERE session_id=? AND seq>? ORDER BY seq"
    args: tuple = (session, int(since))
    if limit is not None:
        sql += " LIMIT ?"
        args += (int(limit),)
    return [StoredEvent(session, s, t, k, json.loads(p)) for s, t, k, p in conn.execute(sql, args)]


def list_sessions(conn: sqlite3.Connection, limit: int = 200) -> list[SessionInfo]:
    rows = conn.execute(
        "SELECT id, name, created, updated, status, config, last_seq FROM sessions "
        "ORDER BY created DESC, id DESC LIMIT ?",
        (max(0, int(limit)),),
    )
    return [_session(r) for r in rows]


def _session(row: Iterable) -> SessionInfo:
    sid, name, created, updated, status, config, last_seq = row
    return SessionInfo(sid, name, created, updated, status, json.loads(config), last_seq)


def _size_of(p: Path) -> int | None:
    try:
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        return p.stat().st_size
    except OSError:
        return None
