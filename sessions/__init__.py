"""Durable records of qlw runs: a SQLite store (WAL) in the data home."""

from sessions.store import SessionInfo, Store, StoredEvent

__all__ = ["SessionInfo", "Store", "StoredEvent"]
