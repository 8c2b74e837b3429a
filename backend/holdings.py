"""What the backend holds in memory: models, trainers, optimizers, pipelines, streamers, caches.

Every room that keeps a heavy object between requests puts it here, and nowhere else keeps a
strong reference between jobs, so "free VRAM" can drop all of them at once and say what it
dropped. Thread-safe: jobs put and take from their worker thread, the loop reads descriptions.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

KINDS = ("model", "adapter", "trainer", "optimizer", "pipeline", "streamer", "cache", "tokenizer", "other")


@dataclass
class Held:
    name: str
    kind: str
    obj: Any
    note: str
    since: float


class Holdings:
    """A named registry of held objects."""

    def __init__(self) -> None:
        self._items: dict[str, Held] = {}
        self._lock = threading.Lock()

    def put(self, name: str, obj: Any, kind: str = "other", note: str = "") -> None:
        """Hold ``obj`` under ``name`` (replacing, and so releasing, what was there)."""
        if kind not in KINDS:
            raise ValueError(f"unknown holding kind {kind!r}")
        with self._lock:
            self._items[name] = Held(name, kind, obj, note, time.time())

    def get(self, name: str, default: Any = None) -> Any:
        with self._lock:
            held = self._items.get(name)
        return held.obj if held else default

    def drop(self, name: str) -> bool:
        with self._lock:
            return self._items.pop(name, None) is not None

    def release_all(self) -> list[dict[str, str]]:
        """Drop every reference; returns what was dropped (name, kind, note)."""
        with self._lock:
            items, self._items = self._items, {}
        dropped = [{"name": h.name, "kind": h.kind, "note": h.note} for h in items.values()]
        items.clear()
        return dropped

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"name": h.name, "kind": h.kind, "note": h.note, "since": h.since} for h in self._items.values()]

    def __len__(self) -> int:
        return len(self._items)


#: The backend's one registry.
HOLDINGS = Holdings()
