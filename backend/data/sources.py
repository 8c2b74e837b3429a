"""Data sources: resolve a path or Hub id (:func:`resolve_source`), read it with ``datasets``
into an Arrow cache under ``<home>/datasets`` (:func:`load_splits`), and explain a failed read for
people (:func:`diagnose_file`). The errors of the whole Data room live here too.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from backend import protocol as P
from backend.jobs import JobCancelled, JobError

if TYPE_CHECKING:  # pragma: no cover - annotations only
    import datasets


# Constants ------------------------------------------------------------------------------------

#: File extension -> (datasets builder, builder kwargs, name for people).
FORMATS: dict[str, tuple[str, dict[str, Any], str]] = {
    ".jsonl": ("json", {}, "JSON Lines"),
    ".ndjson": ("json", {}, "JSON Lines"),
    ".json": ("json", {}, "JSON"),
    ".csv": ("csv", {}, "CSV"),
    ".tsv": ("csv", {"sep": "\t"}, "TSV"),
    ".parquet": ("parquet", {}, "Parquet"),
    ".arrow": ("arrow", {}, "Arrow"),
    ".txt": ("text", {}, "plain text"),
    ".text": ("text", {}, "plain text"),
}


class DataError(JobError):
    """Bad input, said for people: ``where`` (file and line, row and column, setting) and
    ``hint`` (what to do next) go with the message."""


class RowError(DataError):
    """One row cannot be formatted (a null value, a conversation without an answer, ...)."""


class NotOpen(Exception):
    """A page/row/preview request for a source this backend has not open (any more)."""


# Sources --------------------------------------------------------------------------------------


@dataclass
class Resolved:
    """A source, resolved: what kind it is and how ``datasets`` will read it."""

    kind: str  # "file", "folder", "disk" (save_to_disk), "hub"
    path: str  # absolute path, or the Hub id
    config: str
    split: str
    builder: str = ""
    builder_kwargs: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    format_name: str = ""

    @property
    def key(self) -> str:
        """The source without its split: every split is read at once and shared."""
        return json.dumps([self.kind, self.path, self.config])

    def signature(self) -> tuple:
        """What changes when the files change (size and mtime); empty for Hub sources."""
        sig = []
        for f in self.files:
            try:
                st = f.stat()
            except OSError:
                return ("gone", str(f))
            sig.append((str(f), st.st_size, st.st_mtime_ns))
        return tuple(sig)

    def describe(self) -> str:
        if self.kind == "hub":
            extra = f", config {self.config}" if self.config else ""
            return f"Hub dataset {self.path}{extra}"
        if self.kind == "disk":
            return f"datasets folder (save_to_disk) {self.path}"
        if self.kind == "folder":
            n = len(self.files)
            return f"folder of {self.format_name} files ({n} file{'s' if n != 1 else ''}) {self.path}"
        return f"{self.format_name} file {self.path}"


def source_dict(source: dict[str, Any] | P.DataSource | str) -> dict[str, Any]:
    """A source as the plain dict the protocol carries, checked (``DataError`` if malformed)."""
    if isinstance(source, str):
        source = {"path": source}
    if isinstance(source, P.DataSource):
        source = P.to_dict(source)
    try:
        src = P.build(P.DataSource, source, "source")
    except P.ProtocolError as exc:
        raise DataError(exc.message, where="source", hint="a source is {\"path\": ..., \"config\": ..., \"split\": ...}") from None
    if not src.path.strip():
        raise DataError("no dataset given", where="source.path", hint="type a file, a folder or a Hub id")
    return P.to_dict(src)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_source(source: dict[str, Any] | str) -> Resolved:
    """Work out what ``source`` is: a local file or folder (which format), or a Hub id."""
    src = source_dict(source)
    raw, config, split = src["path"].strip(), src["config"].strip(), src["split"].strip()
    path = Path(raw).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir():
            return _resolve_folder(path, config, split)
        return _resolve_file(path, config, split)
    looks_local = raw.startswith(("/", "./", "../", "~")) or Path(raw).suffix.lower() in FORMATS
    if looks_local or not _HUB_ID.match(raw):
        raise DataError(f"no such file or folder: {raw}", where=raw,
                        hint="check the path; a Hub dataset is named owner/name")
    return Resolved("hub", raw, config, split, format_name="Hub dataset")


def _resolve_file(path: Path, config: str, split: str) -> Resolved:
    ext = path.suffix.lower()
    if ext not in FORMATS:
        known = ", ".join(sorted(FORMATS))
        raise DataError(f"{path.name}: unknown file type {ext or '(no extension)'}", where=str(path),
                        hint=f"qlw reads {known}; rename the file if it is one of these")
    builder, kwargs, name = FORMATS[ext]
    if not os.access(path, os.R_OK):
        raise DataError(f"{path.name} cannot be read (permission denied)", where=str(path),
                        hint="check the file's permissions")
    return Resolved("file", str(path), config, split, builder, dict(kwargs), [path], name)


def _resolve_folder(path: Path, config: str, split: str) -> Resolved:
    if (path / "dataset_info.json").exists() and (path / "state.json").exists() or (path / "dataset_dict.json").exists():
        files = sorted(p for p in path.rglob("*.arrow"))
        return Resolved("disk", str(path), config, split, files=files, format_name="datasets (save_to_disk)")
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and p.suffix.lower() in FORMATS
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"no data files in {path}", where=str(path),
                        hint=f"a folder needs files ending in {', '.join(sorted(FORMATS))}")
    builders = {FORMATS[p.suffix.lower()][0] for p in files}
    seps = {FORMATS[p.suffix.lower()][1].get("sep", ",") for p in files if FORMATS[p.suffix.lower()][0] == "csv"}
    if len(builders) > 1 or len(seps) > 1:
        kinds = sorted({FORMATS[p.suffix.lower()][2] for p in files})
        raise DataError(f"{path} mixes file types ({', '.join(kinds)})", where=str(path),
                        hint="open one file, or keep one type of file per folder")
    ext = files[0].suffix.lower()
    builder, kwargs, name = FORMATS[ext]
    return Resolved("folder", str(path), config, split, builder, dict(kwargs), files, name)


# Reading --------------------------------------------------------------------------------------


def cache_dir(home: Path) -> Path:
    """Where the Arrow caches of datasets live: ``<home>/datasets``."""
    return Path(home) / "datasets"


Progress = Callable[[str, float, float], None]


@contextlib.contextmanager
def _datasets_progress(report: Progress, cancelled: Callable[[], bool], stage: str, total: float) -> Iterator[None]:
    """Route the row counts of ``datasets``' "Generating split" bars to ``report`` (nothing is
    printed), and stop the build when ``cancelled()``: ``datasets`` then drops its unfinished
    cache folder."""
    try:
        import datasets.builder as builder_module
        from datasets.utils.tqdm import tqdm as hf_tqdm
    except ImportError:  # pragma: no cover - a datasets without this layout: no progress
        yield
        return
    saved = getattr(builder_module, "hf_tqdm", None)
    if saved is None:  # pragma: no cover
        yield
        return

    class _Report(hf_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True  # the job reports progress; nothing goes to the log
            super().__init__(*args, **kwargs)
            self.rows = 0

        def update(self, n=1):
            self.rows += n or 0
            if cancelled():
                raise JobCancelled()
            report(stage, self.rows, max(total, self.rows))

    builder_module.hf_tqdm = _Report
    try:
        yield
    finally:
        builder_module.hf_tqdm = saved


def _estimate_rows(files: list[Path]) -> int:
    """Rows in line-based files, estimated from the first 256 KiB (for progress only)."""
    total_bytes = 0
    sample_lines = sample_bytes = 0
    for f in files:
        try:
            size = f.stat().st_size
        except OSError:
            continue
        total_bytes += size
        if sample_bytes < 256 * 1024:
            with open(f, "rb") as fh:
                chunk = fh.read(256 * 1024)
            sample_lines += chunk.count(b"\n") or 1
            sample_bytes += len(chunk)
    if not sample_bytes:
        return 0
    return max(1, int(total_bytes * sample_lines / sample_bytes))


def _has_bom(files: list[Path]) -> bool:
    for f in files:
        with open(f, "rb") as fh:
            if fh.read(3) == codecs.BOM_UTF8:
                return True
    return False


def load_splits(res: Resolved, home: Path, progress: Progress | None = None,
                cancelled: Callable[[], bool] | None = None) -> dict[str, "datasets.Dataset"]:
    """Read a resolved source with ``datasets``: every split, memory-mapped from the Arrow cache
    under ``<home>/datasets`` (built on first use). Raises :class:`DataError` for bad input,
    naming the file and line."""
    report = progress or (lambda stage, done, total: None)
    is_cancelled = cancelled or (lambda: False)
    for f in res.files if res.kind in ("file", "folder") else []:
        if f.stat().st_size == 0:
            raise DataError(f"{f.name} is empty (0 bytes)", where=str(f), hint="choose a file with rows in it")
    import datasets

    datasets.disable_progress_bars()  # progress goes to the job, not to the backend's log
    cache = str(cache_dir(home))
    kwargs = dict(res.builder_kwargs)
    if res.builder in ("csv", "text") and _has_bom(res.files):
        kwargs["encoding"] = "utf-8-sig"  # the byte-order mark must not end up in a column name or row
    estimate = _estimate_rows(res.files) if res.builder in ("json", "csv", "text") else 0
    name = Path(res.path).name
    try:
        with _datasets_progress(report, is_cancelled, f"indexing {name}", estimate):
            if res.kind == "disk":
                loaded = datasets.load_from_disk(res.path)
            elif res.kind == "hub":
                loaded = datasets.load_dataset(res.path, name=res.config or None, cache_dir=cache)
            elif res.kind == "folder":
                loaded = datasets.load_dataset(res.builder, data_dir=res.path, cache_dir=cache, **kwargs)
            else:
                loaded = datasets.load_dataset(res.builder, data_files=res.path, cache_dir=cache, **kwargs)
    except JobCancelled:
        raise
    except DataError:
        raise
    except Exception as exc:  # datasets' errors name neither the line nor the fix: find both
        if is_cancelled():
            raise JobCancelled() from None
        raise _explain_load_failure(res, exc, is_cancelled) from exc
    if isinstance(loaded, datasets.Dataset):
        loaded = {res.split or "train": loaded}
    splits = {str(k): v for k, v in dict(loaded).items()}
    if res.builder in ("json", "csv", "text"):
        # pyarrow's JSON reader takes bytes that are not UTF-8 into string columns; reading the
        # row would fail later. A full validation (~0.2 s per million rows) finds it now.
        for ds in splits.values():
            try:
                ds.data.table.validate(full=True)
            except Exception as exc:
                raise _explain_load_failure(res, exc, is_cancelled) from exc
    if not splits or all(len(d) == 0 for d in splits.values()):
        raise DataError(f"{name} has no rows", where=res.path, hint="the file holds only blank lines or a header")
    return splits


def _explain_load_failure(res: Resolved, exc: Exception, cancelled: Callable[[], bool]) -> DataError:
    if res.kind == "hub":
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = ("the Hub is off (HF_HUB_OFFLINE=1) and this dataset is not in the cache"
                if offline else "check the id, the config name and your network / token (huggingface-cli login)")
        return DataError(f"could not load {res.path}: {_root_message(exc)}", where=res.path, hint=hint)
    if res.builder in ("json", "csv", "text"):
        for f in res.files:
            found = diagnose_file(f, res.builder, res.builder_kwargs.get("sep", ","), cancelled)
            if found is not None:
                return found
    where = str(res.files[0]) if len(res.files) == 1 else res.path
    return DataError(f"could not read {Path(res.path).name} as {res.format_name}: {_root_message(exc)}",
                     where=where, hint=f"is it really {res.format_name}? open it in a viewer to check")


def _root_message(exc: BaseException) -> str:
    """The innermost cause's message (datasets wraps the useful one)."""
    seen = set()
    while exc.__cause__ is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def diagnose_file(path: Path, builder: str, sep: str = ",",
                  cancelled: Callable[[], bool] | None = None) -> DataError | None:
    """Find the first problem in a text-based data file (the line that is not UTF-8, not JSON,
    or has the wrong number of fields); ``None`` if none is found."""
    is_cancelled = cancelled or (lambda: False)
    try:
        size = path.stat().st_size
    except OSError as exc:
        return DataError(f"cannot read {path.name}: {exc.strerror}", where=str(path))
    if size == 0:
        return DataError(f"{path.name} is empty (0 bytes)", where=str(path), hint="choose a file with rows in it")
    with open(path, "rb") as fh:
        head = fh.read(4096)
    binary = _binary_error(path, head)
    if binary is not None:
        return binary
    body = head[3:] if head.startswith(codecs.BOM_UTF8) else head
    first = body.lstrip()[:1]
    if builder == "json" and first in (b"[", b"{") and not _first_line_is_json(path):
        return _diagnose_json_document(path, size)
    blank = True
    header_fields = None
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno % 50_000 == 0 and is_cancelled():
                raise JobCancelled()
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                col = len(raw[:err.start].decode("utf-8", errors="replace")) + 1
                return DataError(
                    f"line {lineno} of {path.name} is not UTF-8: byte 0x{raw[err.start]:02x} at column {col}",
                    where=f"{path}:{lineno}",
                    hint="re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`)")
            stripped = line.strip()
            if not stripped:
                continue
            blank = False
            if builder == "json":
                try:
                    json.loads(stripped)
                except ValueError as err:
                    msg = getattr(err, "msg", str(err))
                    col = getattr(err, "colno", 0)
                    return DataError(
                        f"line {lineno} of {path.name} is not valid JSON: {msg} (column {col}): {_excerpt(stripped)}",
                        where=f"{path}:{lineno}",
                        hint="fix or remove that line; JSON Lines holds one JSON object per line")
            elif builder == "csv":
                fields = _csv_fields(line, sep)
                if fields is None:
                    continue  # a quoted value spanning lines: leave it to the CSV reader
                if header_fields is None:
                    header_fields = fields
                elif fields != header_fields:
                    return DataError(
                        f"line {lineno} of {path.name} has {fields} fields; the header has {header_fields}: {_excerpt(stripped)}",
                        where=f"{path}:{lineno}",
                        hint="quote values that contain the separator, or fix that line")
    if blank:
        return DataError(f"{path.name} has no rows (only blank lines)", where=str(path), hint="choose a file with rows in it")
    return None


def _first_line_is_json(path: Path) -> bool:
    with open(path, "rb") as fh:
        line = fh.readline()
    if line.startswith(codecs.BOM_UTF8):
        line = line[3:]
    try:
        return isinstance(json.loads(line.decode("utf-8")), (dict, list))
    except ValueError:
        return False


def _diagnose_json_document(path: Path, size: int) -> DataError | None:
    if size > 512 * 1024 * 1024:
        return None
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        lineno = raw[:err.start].count(b"\n") + 1
        return DataError(f"line {lineno} of {path.name} is not UTF-8 (byte 0x{raw[err.start]:02x})",
                         where=f"{path}:{lineno}", hint="re-save the file as UTF-8")
    try:
        doc = json.loads(text)
    except ValueError as err:
        lineno = getattr(err, "lineno", 0)
        return DataError(f"{path.name} is not valid JSON: {getattr(err, 'msg', err)} at line {lineno}, column {getattr(err, 'colno', 0)}",
                         where=f"{path}:{lineno}", hint="fix the JSON there (a missing comma or quote?)")
    if isinstance(doc, dict):
        lists = [k for k, v in doc.items() if isinstance(v, list)]
        hint = (f"the rows seem to be under the key {lists[0]!r}: save that list as JSON Lines"
                if lists else "save the rows as a JSON list or as JSON Lines")
        return DataError(f"{path.name} holds one JSON object, not a list of rows", where=str(path), hint=hint)
    return None


def _csv_fields(line: str, sep: str) -> int | None:
    if line.count('"') % 2:
        return None
    try:
        return len(next(csv.reader([line], delimiter=sep)))
    except (csv.Error, StopIteration):
        return None


def _excerpt(text: str, n: int = 80) -> str:
    """A piece of a line for a message: control characters escaped (a file's bytes are never
    echoed raw to a terminal)."""
    text = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)
    return text if len(text) <= n else text[:n] + "…"


def _binary_error(path: Path, head: bytes) -> DataError | None:
    """A file with NUL bytes in its first 4 KiB is binary, not text: say so (never its bytes)."""
    at = head.find(b"\0")
    if at < 0:
        return None
    return DataError(f"{path.name} is a binary file (a NUL byte at offset {at}), not text: qlw reads JSON, JSON Lines, "
                     "CSV, TSV and text files as text, and Parquet and Arrow by their extension",
                     where=str(path), hint="name the data file itself (e.g. .jsonl, .csv, .parquet), not a binary")

