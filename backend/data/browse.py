"""Browsing opened datasets (:class:`Opened`): pages of rows with cells cut to a width, a filter
computed with Arrow kernels, one row in full, a column summary; and the few datasets kept open at once
(:func:`open_source`, :func:`find_open`, :func:`require_open`).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from backend.data.sources import DataError, NotOpen, Progress, Resolved, load_splits, resolve_source
from backend.data.shape import SHAPES, detect_shape

if TYPE_CHECKING:  # pragma: no cover - annotations only
    import datasets


#: The row view's budget over all values of one row (the wire carries at most 4 MiB).
ROW_BUDGET_CHARS = 800_000
#: Opened datasets kept at once; the oldest is let go first.
MAX_OPEN = 4
#: Filters remembered per dataset.
MAX_FILTERS = 8


# Opened datasets ------------------------------------------------------------------------------

_registry_lock = threading.Lock()
_open_order: list[str] = []  # holding names, oldest first


def _holding_name(key: str) -> str:
    return "data.dataset:" + key


class Opened:
    """A source opened for browsing: its splits, the browsed split, its summary and filters."""

    def __init__(self, res: Resolved, splits: dict[str, "datasets.Dataset"], signature: tuple):
        self.resolved = res
        self.splits = splits
        self.signature = signature
        split = res.split
        if not split:
            split = "train" if "train" in splits else next(iter(splits))
        if split not in splits:
            raise DataError(f"{res.path} has no split {split!r}", where=f"{res.path} split {split}",
                            hint=f"its splits are: {', '.join(splits)}")
        self.split = split
        self.dataset = splits[split]
        self.columns: list[str] = list(self.dataset.column_names)
        self._filters: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.summary = self._summarise()

    @property
    def num_rows(self) -> int:
        return len(self.dataset)

    # Summary ---------------------------------------------------------------------------------

    def _summarise(self) -> dict[str, Any]:
        res = self.resolved
        sample = _rows(self.dataset[: min(100, self.num_rows)]) if self.num_rows else []
        columns = []
        for name in self.columns:
            feature = self.dataset.features.get(name)
            examples = []
            for row in sample:
                value = row.get(name)
                if value is None or value == "" or value == []:
                    continue
                examples.append(_cell(value, 80))
                if len(examples) == 3:
                    break
            columns.append({"name": name, "type": feature_type(feature), "nulls": self.null_count(name),
                            "examples": examples})
        shape, mapping, notes = detect_shape(self.columns, sample, {c["name"]: c["type"] for c in columns})
        if res.format_name == "JSON" and self.num_rows == 1 and shape == "unknown":
            nested = [c for c in self.columns if isinstance(sample[0].get(c), list) and sample[0][c]
                      and isinstance(sample[0][c][0], dict)]
            if nested:
                notes.insert(0, f"this JSON file holds one object; the rows seem to be the list under {nested[0]!r}: "
                                "save that list as JSON Lines (one row per line) and open that")
        return {
            "source": {"path": res.path, "config": res.config, "split": self.split},
            "kind": res.kind,
            "description": res.describe(),
            "format": res.format_name,
            "files": [str(f) for f in res.files[:20]],
            "file_count": len(res.files),
            "splits": {k: len(v) for k, v in self.splits.items()},
            "split": self.split,
            "num_rows": self.num_rows,
            "columns": columns,
            "shape": shape,
            "shape_label": SHAPES[shape],
            "mapping": mapping,
            "notes": notes,
        }

    def null_count(self, column: str) -> int:
        try:
            return int(self.dataset.data.column(column).null_count)
        except Exception:  # an exotic table type: count the slow way rather than fail
            return sum(v is None for v in self.dataset[column])

    # Pages, filters, rows ----------------------------------------------------------------------

    def page(self, start: int = 0, count: int = 100, filter: str = "", cell_chars: int = 200) -> dict[str, Any]:
        """Rows ``start`` .. ``start+count`` (of those matching ``filter``), cells cut to
        ``cell_chars``."""
        count = max(1, min(int(count), 1000))
        cell_chars = max(8, min(int(cell_chars), 10_000))
        indices = self.filter_indices(filter) if filter.strip() else None
        total = self.num_rows if indices is None else len(indices)
        start = max(0, min(int(start), max(0, total - 1)))
        stop = min(total, start + count)
        if stop <= start:
            picked: list[int] = []
            batch: dict[str, list] = {c: [] for c in self.columns}
        elif indices is None:
            picked = list(range(start, stop))
            batch = self.dataset[start:stop]
        else:
            picked = [int(i) for i in indices[start:stop]]
            batch = self.dataset[picked]
        rows = []
        for j, index in enumerate(picked):
            rows.append({"index": index, "cells": [_cell(batch[c][j], cell_chars) for c in self.columns]})
        return {"rows": rows, "columns": self.columns, "start": start, "total": total,
                "num_rows": self.num_rows, "filter": filter}

    def filter_indices(self, text: str):
        """Indices (a numpy array) of the rows where ``text`` occurs, case-insensitively, in any
        column, or in one column with ``column:text``. Computed with Arrow kernels, remembered."""
        import numpy as np

        text = text.strip()
        with self._lock:
            hit = self._filters.get(text)
            if hit is not None:
                self._filters.move_to_end(text)
                return hit
        columns, needle = self.columns, text
        name, sep, rest = text.partition(":")
        if sep and rest.strip():
            match = {c.lower(): c for c in self.columns}.get(name.strip().lower())
            if match is not None:
                columns, needle = [match], rest.strip()
        table = self.dataset.data
        mask = np.zeros(self.num_rows, dtype=bool)
        for column in columns:
            offset = 0
            for chunk in table.column(column).chunks:
                n = len(chunk)
                mask[offset:offset + n] |= _match(chunk, needle)
                offset += n
        found = np.flatnonzero(mask)
        with self._lock:
            self._filters[text] = found
            while len(self._filters) > MAX_FILTERS:
                self._filters.popitem(last=False)
        return found

    def row(self, index: int, max_chars: int = 200_000) -> dict[str, Any]:
        """Row ``index`` in full (strings longer than ``max_chars`` cut, ``cut`` says so)."""
        index = self._check_index(index)
        row = self.dataset[index]
        budget = [min(max(1000, int(max_chars)) * max(1, len(self.columns)), ROW_BUDGET_CHARS)]
        cut: dict[str, int] = {}
        values = {}
        for name in self.columns:
            values[name] = _cap(row.get(name), max(1000, int(max_chars)), budget, cut, name)
        return {"index": index, "values": values, "columns": self.columns, "cut": cut,
                "num_rows": self.num_rows}

    def raw_row(self, index: int) -> dict[str, Any]:
        return self.dataset[self._check_index(index)]

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < self.num_rows:
            raise DataError(f"there is no row {index}: the split {self.split!r} has {self.num_rows:,} rows",
                            where=f"row {index}", hint=f"rows are numbered 0 to {self.num_rows - 1:,}")
        return index


def _match(chunk, needle: str):
    """A boolean numpy mask over ``chunk``'s rows: does ``needle`` occur in the value (or any
    string nested in it)?"""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(chunk)
    t = chunk.type
    if n == 0:
        return np.zeros(0, dtype=bool)
    if pa.types.is_dictionary(t):
        chunk = chunk.dictionary_decode()
        t = chunk.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        hits = pc.match_substring(chunk, needle, ignore_case=True)
        return hits.fill_null(False).to_numpy(zero_copy_only=False)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        flat = pc.list_flatten(chunk)
        parents = pc.list_parent_indices(chunk).to_numpy(zero_copy_only=False)
        inner = _match(flat, needle)
        mask = np.zeros(n, dtype=bool)
        mask[parents[inner]] = True
        return mask
    if pa.types.is_struct(t):
        mask = np.zeros(n, dtype=bool)
        for child in chunk.flatten():
            mask |= _match(child, needle)
        return mask
    if pa.types.is_null(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return np.zeros(n, dtype=bool)
    try:
        as_text = pc.cast(chunk, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return np.zeros(n, dtype=bool)
    return pc.match_substring(as_text, needle, ignore_case=True).fill_null(False).to_numpy(zero_copy_only=False)


def _rows(batch: dict[str, list]) -> list[dict[str, Any]]:
    """A column batch (``ds[a:b]``) as a list of row dicts."""
    names = list(batch)
    n = len(batch[names[0]]) if names else 0
    return [{k: batch[k][i] for k in names} for i in range(n)]


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value):,} bytes>"
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return _jsonable(value.tolist())
    return str(value)


def _cell(value: Any, width: int) -> Any:
    """A value for one table cell: scalars as they are, text cut to ``width``, nested values as
    compact JSON."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = value if isinstance(value, str) else json.dumps(_jsonable(value), ensure_ascii=False, separators=(", ", ": "))
    return text if len(text) <= width else text[: width - 1] + "…"


def _cap(value: Any, max_chars: int, budget: list[int], cut: dict[str, int], path: str) -> Any:
    """``value`` with every string cut to ``max_chars`` and the row's total kept in budget."""
    if isinstance(value, str):
        allowed = max(0, min(max_chars, budget[0]))
        budget[0] -= min(len(value), allowed)
        if len(value) > allowed:
            cut[path] = len(value)
            return value[:allowed]
        return value
    if isinstance(value, dict):
        return {str(k): _cap(v, max_chars, budget, cut, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_cap(v, max_chars, budget, cut, f"{path}[{i}]") for i, v in enumerate(value)]
    return _jsonable(value)


def feature_type(feature: Any) -> str:
    """A ``datasets`` feature as a short type name: ``string``, ``int64``,
    ``list<{role, content}>``, ``json``, ..."""
    if feature is None:
        return "?"
    if isinstance(feature, dict):
        return "{" + ", ".join(feature) + "}"
    cls = type(feature).__name__
    if cls == "Value":
        dtype = str(getattr(feature, "dtype", "?"))
        return {"large_string": "string", "string_view": "string"}.get(dtype, dtype)
    if cls in ("List", "LargeList", "Sequence"):
        inner = getattr(feature, "feature", None)
        return f"list<{feature_type(inner)}>"
    if cls == "ClassLabel":
        return "class label"
    return cls.lower()


class _Loaded:
    """Every split of one source as read, and the browsing view of each split asked for."""

    def __init__(self, res: Resolved, splits: dict[str, "datasets.Dataset"], signature: tuple):
        self.resolved, self.splits, self.signature = res, splits, signature
        self.views: dict[str, Opened] = {}
        self.lock = threading.Lock()

    def view(self, split: str) -> Opened:
        if not split:
            split = "train" if "train" in self.splits else next(iter(self.splits))
        with self.lock:
            opened = self.views.get(split)
            if opened is None:
                opened = Opened(dataclasses.replace(self.resolved, split=split), self.splits, self.signature)
                self.views[split] = opened
        return opened


def open_source(source: dict[str, Any] | str, home: Path, progress: Progress | None = None,
                cancelled: Callable[[], bool] | None = None, reload: bool = False) -> Opened:
    """The source opened for browsing: from memory if this process has it open and its files did
    not change, else read (the Arrow cache makes a second read fast). Raises :class:`DataError`."""
    from backend.holdings import HOLDINGS

    res = resolve_source(source)
    name = _holding_name(res.key)
    signature = res.signature()
    loaded = HOLDINGS.get(name)
    if loaded is None or reload or loaded.signature != signature:
        loaded = _Loaded(res, load_splits(res, home, progress, cancelled), signature)
        opened = loaded.view(res.split)  # a missing split fails here, before anything is kept
        rows = sum(len(d) for d in loaded.splits.values())
        with _registry_lock:
            HOLDINGS.put(name, loaded, "cache", note=f"dataset {Path(res.path).name} ({rows:,} rows, memory-mapped)")
            if name in _open_order:
                _open_order.remove(name)
            _open_order.append(name)
            while len(_open_order) > MAX_OPEN:
                HOLDINGS.drop(_open_order.pop(0))
        return opened
    return loaded.view(res.split)


def find_open(source: dict[str, Any] | str, check_files: bool = False) -> Opened | None:
    """The source if this process has it open (and, with ``check_files``, unchanged)."""
    from backend.holdings import HOLDINGS

    res = resolve_source(source)
    loaded = HOLDINGS.get(_holding_name(res.key))
    if loaded is None or (check_files and loaded.signature != res.signature()):
        return None
    return loaded.view(res.split)


def require_open(source: dict[str, Any] | str) -> Opened:
    """The open source, or :class:`NotOpen`."""
    try:
        opened = find_open(source)
    except DataError as exc:
        raise NotOpen(str(exc)) from None
    if opened is None:
        path = source if isinstance(source, str) else source.get("path", "?")
        raise NotOpen(f"{path} is not open in this backend: open it (data.open) first")
    return opened

