"""The Data room: open datasets, page through them, detect their shape, and format training rows.

One module serves the Data pane (through the server), the headless ``qlw data`` command and,
later, training: all of them go through the same functions here, so what the pane previews is
what ``qlw data`` prints and what trl's ``SFTTrainer`` trains on.

- **Sources** (:func:`resolve_source`, :func:`open_source`): local JSON, JSONL, CSV/TSV, Parquet,
  Arrow and plain-text files or folders, ``save_to_disk`` folders, and Hub ids (with config and
  split), all read by ``datasets``. The first read builds an Arrow cache under
  ``<home>/datasets`` (never the current folder); after that a ``Dataset`` is memory-mapped and
  gives random access by index, so a page of a 1,000,000-row file is a slice, not a scan.
- **Browsing** (:class:`Opened`): pages of rows with cells cut to a width, a filter computed with
  Arrow kernels over every string (nested ones too), one row in full, and a column summary with
  types, null counts and examples.
- **Shape and mapping** (:func:`detect_shape`): dolly, Alpaca, prompt/completion,
  instruction/response, prompt-only, ``messages`` (role/content), ShareGPT (from/value) and plain
  text, as a role -> column mapping the user may correct.
- **The one formatter** (:func:`format_row`): a row, the mapping and the template make one trl
  row: ``{"messages": [...]}`` for the chat template, ``{"prompt", "completion"}`` for Mistral,
  Alpaca and raw text with a response, ``{"text"}`` otherwise.
  :func:`load_prepared` maps it over the source's train/validation split for training;
  :func:`sft_config_kwargs` gives the matching ``SFTConfig`` settings.
- **Tokens** (:func:`tokenize_like_trl`, :func:`preview_row`, :func:`token_stats`): the token ids
  and loss mask exactly as trl 1.16's ``SFTTrainer._prepare_dataset`` computes them (EOS added to
  non-conversational rows, prompt masked by the common-prefix rule, assistant masks from
  ``{% generation %}``, truncation keeping the start, fully masked rows dropped).

Bad input is reported, never fatal: every failure is a :class:`DataError` saying what is wrong,
where (file and line, row and column, mapping role) and what to do next.

Nothing heavy is imported at module level: the server imports this module at start.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import re
import sys
import threading
import time
from collections import OrderedDict
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
ROLES = P.DATA_ROLES
TEMPLATES = P.DATA_TEMPLATES

#: Shapes we recognise, with the words the pane and ``qlw data`` use for them.
SHAPES = {
    "dolly": "instruction/context/response (databricks-dolly)",
    "alpaca": "instruction/input/output (Alpaca)",
    "prompt_completion": "prompt/completion",
    "instruction_response": "instruction/response",
    "prompt_only": "prompts only, no response",
    "messages": "conversations: messages with role/content",
    "sharegpt": "ShareGPT conversations with from/value",
    "text": "plain text",
    "preference": "prompt/chosen/rejected preference pairs (DPO, ORPO)",
    "preference_messages": "chosen/rejected conversations (HH-RLHF, UltraFeedback)",
    "unpaired_preference": "prompt/completion/label rows (KTO)",
    "unknown": "not recognised: map the roles by hand",
}
#: Shapes that train a preference method (DPO, ORPO, KTO), not SFT.
PREFERENCE_SHAPES = ("preference", "preference_messages", "unpaired_preference")

#: Column names that suggest a role (lower case), best first.
ROLE_NAMES = {
    "instruction": ("instruction", "instructions", "prompt", "question", "query", "user", "human", "input_text"),
    "context": ("context", "input", "passage", "background", "document"),
    "response": ("response", "output", "completion", "answer", "target", "assistant", "reply", "output_text"),
    "system": ("system", "system_prompt", "system_message"),
    "text": ("text", "content", "body", "document_text", "raw_text", "sentence"),
    "chosen": ("chosen", "preferred", "chosen_response", "response_chosen", "winner"),
    "rejected": ("rejected", "dispreferred", "rejected_response", "response_rejected", "loser"),
    "label": ("label", "desirable", "is_desirable", "kto_label"),
}
#: Speaker names of conversation datasets -> the chat roles of a template.
SPEAKERS = {
    "user": "user", "human": "user", "prompter": "user", "usr": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "chatgpt": "assistant", "bard": "assistant", "gpt4": "assistant",
    "system": "system", "tool": "tool", "function": "tool", "ipython": "tool",
}

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
#: Mistral's end of an assistant turn inside the prompt of a multi-turn row. trl adds the
#: tokenizer's own EOS after the completion, as for every prompt/completion row.
MISTRAL_EOS = "</s>"

#: Rows formatted and tokenized per batch in the statistics job.
STATS_BATCH = 1000
#: A formatted row longer than this is not tokenized for the live preview (stats still count it).
PREVIEW_MAX_CHARS = 1_000_000
#: Characters of text beyond ``max_length`` shown in a preview (the rest is summarised).
PREVIEW_CUT_CHARS = 4000
#: The row view's budget over all values of one row (the wire carries at most 4 MiB).
ROW_BUDGET_CHARS = 800_000
#: Opened datasets kept at once; the oldest is let go first.
MAX_OPEN = 4
#: Filters remembered per dataset.
MAX_FILTERS = 8


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


# Shape detection ------------------------------------------------------------------------------


def _conversation_keys(value: Any) -> str | None:
    """``"messages"`` for a list of role/content dicts, ``"sharegpt"`` for from/value."""
    if not isinstance(value, list) or not value or not isinstance(value[0], dict):
        return None
    keys = {k for k, v in value[0].items() if v is not None}
    if {"role", "content"} <= keys:
        return "messages"
    if {"from", "value"} <= keys:
        return "sharegpt"
    return None


def empty_mapping() -> dict[str, str]:
    return {role: "" for role in ROLES}


def detect_shape(columns: list[str], sample: list[dict[str, Any]],
                 types: dict[str, str] | None = None) -> tuple[str, dict[str, str], list[str]]:
    """Recognise the dataset's shape from its column names (and, for conversations, the first
    rows' values): ``(shape, mapping role -> column, notes)``."""
    types = types or {}
    mapping = empty_mapping()
    notes: list[str] = []
    lower = {c.lower(): c for c in columns}

    def pick(role: str, exclude: tuple[str, ...] = ()) -> str:
        for name in ROLE_NAMES[role]:
            if name in lower and lower[name] not in exclude and lower[name] not in mapping.values():
                return lower[name]
        return ""

    chosen, rejected = pick("chosen"), pick("rejected")
    if chosen and rejected:  # preference pairs (before conversations: their sides may be message lists)
        mapping.update(chosen=chosen, rejected=rejected)
        conversational = any(_conversation_keys(r.get(chosen)) for r in sample)
        mapping["instruction"] = pick("instruction")
        mapping["system"] = pick("system")
        if conversational:
            notes.append("chosen/rejected conversations: the messages both sides share are the prompt")
        return ("preference_messages" if conversational else "preference"), mapping, notes
    label = pick("label")
    if label and "completion" in lower and "prompt" in lower:
        mapping.update(instruction=lower["prompt"], response=lower["completion"], label=label)
        mapping["system"] = pick("system")
        return "unpaired_preference", mapping, notes

    for column in columns:  # a conversation column wins over everything else
        kind = next((k for k in (_conversation_keys(r.get(column)) for r in sample) if k), None)
        if kind:
            mapping["messages"] = column
            mapping["system"] = pick("system")
            return kind, mapping, notes

    has = lambda *names: all(n in lower for n in names)  # noqa: E731
    if has("instruction", "context", "response"):
        shape = "dolly"
        mapping.update(instruction=lower["instruction"], context=lower["context"], response=lower["response"])
    elif has("instruction", "output"):
        shape = "alpaca"
        mapping.update(instruction=lower["instruction"], response=lower["output"],
                       context=lower.get("input", ""))
    elif has("prompt", "completion"):
        shape = "prompt_completion"
        mapping.update(instruction=lower["prompt"], response=lower["completion"])
    else:
        instruction = pick("instruction")
        response = pick("response")
        if not instruction and response and "input" in lower:
            instruction = lower["input"]
        if instruction and response:
            shape = "instruction_response"
            mapping.update(instruction=instruction, response=response)
            mapping["context"] = pick("context")
        elif instruction:
            shape = "prompt_only"
            mapping["instruction"] = instruction
            notes.append(f"no response column: rows are prompts ({instruction!r}); training learns the prompt text")
        else:
            text = pick("text")
            strings = [c for c in columns if types.get(c, "string") == "string"]
            if not text and len(strings) == 1:
                text = strings[0]
                notes.append(f"one text column, {text!r}: taken as plain text")
            if text:
                shape = "text"
                mapping["text"] = text
            else:
                shape = "unknown"
                notes.append(f"no column looks like an instruction, a response, a conversation or text "
                             f"(columns: {', '.join(columns) or 'none'}): map the roles by hand")
    mapping["system"] = mapping["system"] or pick("system")
    return shape, mapping, notes


# Settings -------------------------------------------------------------------------------------


def settings_from(data: dict[str, Any] | P.PreparedData) -> P.PreparedData:
    """A checked :class:`~backend.protocol.PreparedData` (every role in ``mapping``, "" when
    unmapped). Raises :class:`DataError` naming the bad setting."""
    if isinstance(data, P.PreparedData):
        data = P.to_dict(data)
    try:
        s = P.build(P.PreparedData, data, "settings")
    except P.ProtocolError as exc:
        raise DataError(exc.message, where="settings") from None
    source = source_dict(s.source)
    unknown = sorted(set(s.mapping) - set(ROLES))
    if unknown:
        raise DataError(f"unknown role(s) in the mapping: {', '.join(unknown)}", where="settings.mapping",
                        hint=f"roles are {', '.join(ROLES)}")
    mapping = {}
    for role in ROLES:
        value = s.mapping.get(role) or ""
        if not isinstance(value, str):
            raise DataError(f"the {role} role must name a column, got {value!r:.40}", where=f"settings.mapping.{role}")
        mapping[role] = value
    for name, value, allowed in (("template", s.template, TEMPLATES), ("loss", s.loss, P.DATA_LOSSES),
                                 ("split_mode", s.split_mode, P.DATA_SPLIT_MODES)):
        if value not in allowed:
            raise DataError(f"{name} must be one of {', '.join(allowed)}, got {value!r:.40}", where=f"settings.{name}")
    if s.split_mode == "ratio" and not 0 < s.validation_ratio < 1:
        raise DataError(f"validation_ratio must be between 0 and 1, got {s.validation_ratio:g}",
                        where="settings.validation_ratio", hint="e.g. 0.1 for 10% validation rows")
    if s.split_mode == "split" and not s.validation_split:
        raise DataError("split_mode 'split' needs validation_split (the name of a split of the source)",
                        where="settings.validation_split")
    if s.max_length < 1:
        raise DataError(f"max_length must be at least 1, got {s.max_length}", where="settings.max_length")
    return dataclasses.replace(s, source=source, mapping=mapping)


def default_settings(summary: dict[str, Any], template: str = "chat") -> P.PreparedData:
    """The settings the pane starts from for an opened source: its detected mapping."""
    src = summary["source"]
    return P.PreparedData(source={"path": src["path"], "config": src.get("config", ""), "split": src.get("split", "")},
                          mapping=dict(summary["mapping"]), template=template)


def check_mapping(s: P.PreparedData, columns: list[str]) -> None:
    """Every mapped column exists, and the mapping says where the text is. Raises DataError."""
    m = s.mapping
    for role in ROLES:
        column = m.get(role)
        if column and column not in columns:
            raise DataError(f"the {role} role is mapped to column {column!r}, which this dataset does not have",
                            where=f"mapping.{role}", hint=f"its columns are: {', '.join(columns)}")
    if not (m["messages"] or m["instruction"] or m["text"]):
        raise DataError("nothing is mapped: no instruction, conversation (messages) or text column",
                        where="mapping", hint="map a column to instruction (and response), messages, or text")


def training_form(s: P.PreparedData) -> str:
    """Which trl dataset type the settings make: ``messages``, ``prompt_completion`` or ``text``."""
    m = s.mapping
    if m["text"] and not (m["messages"] or m["instruction"]):
        return "text"
    if s.template == "chat":
        return "messages"
    if m["messages"] or m["response"]:
        return "prompt_completion"
    return "text"


def effective_loss(s: P.PreparedData) -> str:
    """The loss the settings mean: ``assistant_only``, ``completion_only`` or ``all``."""
    form = training_form(s)
    answered = bool(s.mapping["messages"] or s.mapping["response"])
    if s.loss == "auto":
        if form == "messages":
            return "assistant_only" if answered else "all"
        return "completion_only" if form == "prompt_completion" else "all"
    if s.loss == "assistant_only" and form != "messages":
        raise DataError("assistant-only loss needs conversational rows: choose the chat template",
                        where="settings.loss", hint="or use completion-only loss with the Mistral, Alpaca or raw template")
    if s.loss == "assistant_only" and not answered:
        raise DataError("assistant-only loss needs a response or conversation column: these rows have no answer",
                        where="settings.loss", hint="map a response column, or train on all tokens")
    if s.loss == "completion_only" and form != "prompt_completion":
        raise DataError("completion-only loss needs prompt/completion rows: the Mistral, Alpaca or raw template "
                        "with a response column", where="settings.loss",
                        hint="with the chat template, use assistant-only loss")
    return s.loss


def sft_config_kwargs(settings: dict[str, Any] | P.PreparedData) -> dict[str, Any]:
    """The ``trl.SFTConfig`` settings that go with the prepared dataset's rows."""
    s = settings_from(settings)
    loss = effective_loss(s)
    return {
        "max_length": s.max_length,
        "truncation_mode": "keep_start",
        "assistant_only_loss": loss == "assistant_only",
        "completion_only_loss": loss == "completion_only",
        "dataset_text_field": "text",
    }


# The formatter --------------------------------------------------------------------------------


def _text_of(row: dict[str, Any], column: str, role: str, required: bool) -> str:
    if not column:
        return ""
    value = row.get(column)
    if value is None:
        if required:
            raise RowError(f"the {role} column {column!r} is empty (null)", where=f"column {column}",
                           hint="fix the row, or map another column; training skips such rows")
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(_jsonable(value), ensure_ascii=False)
    return str(value)


def _turns(row: dict[str, Any], s: P.PreparedData) -> tuple[str, list[dict[str, str]], dict[str, str]]:
    """``(system, turns, parts)``: the row as a conversation in the standard roles, plus the
    instruction/context/response parts of non-conversational rows (for Alpaca)."""
    m = s.mapping
    system = _text_of(row, m["system"], "system", False) if m["system"] else ""
    system = system or s.system_prompt
    if m["messages"]:
        column = m["messages"]
        conv = row.get(column)
        if conv is None:
            raise RowError(f"the conversation column {column!r} is empty (null)", where=f"column {column}",
                           hint="training skips such rows")
        if isinstance(conv, str):
            try:
                conv = json.loads(conv)
            except ValueError:
                conv = None
        if not isinstance(conv, list) or not conv:
            raise RowError(f"the conversation column {column!r} does not hold a list of messages",
                           where=f"column {column}", hint="map the messages role to a column of role/content lists")
        turns = []
        for i, msg in enumerate(conv):
            if not isinstance(msg, dict):
                raise RowError(f"message {i} of {column!r} is not an object: {_excerpt(str(msg), 40)}",
                               where=f"column {column}[{i}]")
            speaker = msg.get("role") if msg.get("role") is not None else msg.get("from")
            content = msg.get("content") if "content" in msg else msg.get("value")
            role = SPEAKERS.get(str(speaker).strip().lower()) if speaker is not None else None
            if role is None:
                raise RowError(f"message {i} of {column!r} has an unknown speaker {speaker!r}",
                               where=f"column {column}[{i}]",
                               hint="speakers are user/human, assistant/gpt, system or tool")
            if content is None:
                raise RowError(f"message {i} of {column!r} ({role}) has no content (null)", where=f"column {column}[{i}]",
                               hint="training skips such rows")
            if not isinstance(content, str):
                content = json.dumps(_jsonable(content), ensure_ascii=False)
            turns.append({"role": role, "content": content})
        if turns[0]["role"] == "system":
            system = turns.pop(0)["content"]
            if not turns:
                raise RowError(f"the conversation in {column!r} holds only a system message", where=f"column {column}")
        return system, turns, {}
    instruction = _text_of(row, m["instruction"], "instruction", True)
    context = _text_of(row, m["context"], "context", False)
    user = instruction + ("\n\n" + context if context else "") if instruction else context
    turns = [{"role": "user", "content": user}]
    parts = {"instruction": instruction, "context": context}
    if m["response"]:
        response = _text_of(row, m["response"], "response", True)
        turns.append({"role": "assistant", "content": response})
        parts["response"] = response
    return system, turns, parts


def format_row(row: dict[str, Any], settings: dict[str, Any] | P.PreparedData) -> dict[str, Any]:
    """THE formatter: one source row as the trl row training will use.

    - ``chat``: ``{"messages": [{"role", "content"}, ...]}`` (a system message first when there
      is one); trl applies the tokenizer's chat template.
    - ``mistral``: ``{"prompt": "[INST] ... [/INST]", "completion": " answer"}``; earlier turns of
      a conversation stay in the prompt (``[INST] q [/INST] a</s>[INST] q2 [/INST]``).
    - ``alpaca``: the Alpaca prompt (with or without its Input section) and the response.
    - ``raw``: the columns' text joined by blank lines, the response as the completion.
    - plain text, and rows without a response under the non-chat templates: ``{"text": ...}``.

    trl adds the tokenizer's BOS (when it adds one) and EOS to non-conversational rows itself.
    Raises :class:`RowError` for a row that cannot be formatted.
    """
    s = _checked(settings)
    m = s.mapping
    form = training_form(s)
    if form == "text" and m["text"] and not (m["messages"] or m["instruction"]):
        return {"text": _text_of(row, m["text"], "text", True)}
    system, turns, parts = _turns(row, s)
    loss = effective_loss(s)
    answered = turns[-1]["role"] == "assistant"
    if loss in ("assistant_only", "completion_only") and not any(t["role"] == "assistant" for t in turns):
        raise RowError("this conversation has no assistant message: nothing for the loss to learn",
                       where=f"column {m['messages'] or m['response']}", hint="training skips such rows")
    if s.template == "chat":
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        return {"messages": messages}
    if form == "prompt_completion" and not answered:
        raise RowError("the conversation does not end with an assistant message: there is no completion",
                       where=f"column {m['messages']}", hint="use the chat template for such conversations")
    head, last = (turns[:-1], turns[-1]["content"]) if answered and form == "prompt_completion" else (turns, None)
    if s.template == "mistral":
        prompt = _mistral(system, head)
        return {"prompt": prompt, "completion": " " + last} if last is not None else {"text": prompt}
    if s.template == "alpaca":
        if m["messages"]:
            if len(head) != 1 or head[0]["role"] != "user":
                raise RowError(f"Alpaca has one instruction and one response; this conversation has {len(turns)} messages",
                               where=f"column {m['messages']}", hint="use the chat or Mistral template for conversations")
            instruction, context = head[0]["content"], ""
        else:
            instruction, context = parts["instruction"], parts["context"]
        prompt = (ALPACA_PROMPT_INPUT.format(instruction=instruction, input=context) if context
                  else ALPACA_PROMPT.format(instruction=instruction))
        if system:
            prompt = system + "\n\n" + prompt.split("\n\n", 1)[1]  # the system prompt replaces the preamble
        return {"prompt": prompt, "completion": last} if last is not None else {"text": prompt}
    # raw
    pieces = ([system] if system else []) + [t["content"] for t in head if t["content"]]
    prompt = "\n\n".join(pieces)
    if last is None:
        return {"text": prompt}
    return {"prompt": prompt + "\n\n" if prompt else "", "completion": last}


def _checked(settings: dict[str, Any] | P.PreparedData) -> P.PreparedData:
    """Settings checked once: a PreparedData that came out of :func:`settings_from` (every role
    present in its mapping) is used as it is, so formatting a million rows does not re-check."""
    if isinstance(settings, P.PreparedData) and set(settings.mapping) == set(ROLES) \
            and all(isinstance(v, str) for v in settings.mapping.values()):
        return settings
    return settings_from(settings)


def _mistral(system: str, turns: list[dict[str, str]]) -> str:
    out = []
    prefix = system + "\n\n" if system else ""
    for t in turns:
        if t["role"] == "assistant":
            out.append(f" {t['content']}{MISTRAL_EOS}")
        else:  # user (and tool results) are instructions
            out.append(f"[INST] {prefix}{t['content']} [/INST]")
            prefix = ""
    return "".join(out)


# Tokens, the way trl counts them ----------------------------------------------------------------


_tokenizer_locks: dict[int, threading.Lock] = {}


def load_tokenizer(name: str, home: Path, build: bool = False, progress: Progress | None = None,
                   cancelled: Callable[[], bool] | None = None):
    """The tokenizer of a model folder or Hub id; empty ``name``: the embedded tiny model's
    (built first when ``build``, else a DataError says how to build it). Kept in HOLDINGS."""
    from backend import tiny
    from backend.holdings import HOLDINGS

    if not name:
        folder = tiny.tiny_model_path(home)
        if not (folder / tiny.MARKER_NAME).exists():
            if not build:
                raise DataError("the embedded tiny model (the default tokenizer) is not built yet",
                                where="tokenizer", hint="press ctrl+t to build it (about 10 s), or name a tokenizer")
            report = progress or (lambda stage, done, total: None)
            try:
                folder = tiny.ensure_tiny_model(home, progress=lambda st, d, t: report(f"tiny model: {st}", d, t),
                                                cancelled=cancelled)
            except tiny.TinyBuildCancelled:
                raise JobCancelled() from None
        name_or_path = str(folder)
    else:
        local = Path(name).expanduser()
        name_or_path = str(local.resolve()) if local.exists() else name
    key = "data.tokenizer:" + name_or_path
    tok = HOLDINGS.get(key)
    if tok is None:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(name_or_path)
        except Exception as exc:
            raise DataError(f"could not load the tokenizer {name or 'qlw-tiny-llama'}: {_root_message(exc)}",
                            where="tokenizer", hint="give a model folder or a Hub id that has a tokenizer") from None
        HOLDINGS.put(key, tok, "tokenizer", note=f"tokenizer {Path(name_or_path).name} (data preview and stats)")
    return tok


def _lock_for(tokenizer) -> threading.Lock:
    with _registry_lock:
        return _tokenizer_locks.setdefault(id(tokenizer), threading.Lock())


def common_prefix_length(ids: list[int], other: list[int]) -> int:
    """trl's rule: the completion starts where the prompt's and the full row's tokens diverge."""
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n


def tokenize_like_trl(example: dict[str, Any], tokenizer, loss: str) -> tuple[list[int], list[int]]:
    """``(input_ids, mask)`` of one trl row as ``SFTTrainer._prepare_dataset`` (trl 1.16) makes
    them before truncation; ``mask[i]`` is 1 where token i counts in the loss.

    - text rows: the tokenizer's EOS appended unless present, then ``tokenizer(text=...)``;
    - prompt/completion rows: EOS appended to the completion, prompt and prompt+completion
      tokenized separately, the completion starting at their common prefix; only the completion
      counts with completion-only loss;
    - conversational rows: ``apply_chat_template(tokenize=True, return_dict=True)``; with
      assistant-only loss, the ``{% generation %}`` spans (``assistant_masks``) count.
    """
    eos = tokenizer.eos_token
    if "messages" in example:
        out = tokenizer.apply_chat_template(example["messages"], tools=None, chat_template=None, tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=loss == "assistant_only")
        ids = list(out["input_ids"])
        mask = list(out["assistant_masks"]) if loss == "assistant_only" else [1] * len(ids)
        return ids, mask
    if "prompt" in example:
        completion = example["completion"]
        if eos and not completion.endswith(eos):
            completion += eos
        prompt_ids = list(tokenizer(text=example["prompt"])["input_ids"])
        ids = list(tokenizer(text=example["prompt"] + completion)["input_ids"])
        start = common_prefix_length(prompt_ids, ids)
        mask = [0] * start + [1] * (len(ids) - start) if loss == "completion_only" else [1] * len(ids)
        return ids, mask
    text = example["text"]
    if eos and not text.endswith(eos):
        text += eos
    ids = list(tokenizer(text=text)["input_ids"])
    return ids, [1] * len(ids)


def labels_like_trl(ids: list[int], mask: list[int], max_length: int | None) -> tuple[list[int], list[int], bool]:
    """``(input_ids, labels, dropped)`` after trl's label building and ``keep_start``
    truncation; ``dropped``: no label is left, so trl drops the row."""
    labels = [t if m else -100 for t, m in zip(ids, mask)]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels, all(label == -100 for label in labels)


def has_generation_markers(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = template.get("default", "")
    return bool(re.search(r"\{%-?\s*generation\s*-?%\}", template))


def preview_row(opened: Opened, settings: dict[str, Any] | P.PreparedData, index: int, tokenizer,
                tokenizer_name: str = "") -> dict[str, Any]:
    """What training makes of row ``index``: the trl row, the exact text, its tokens as
    segments in and out of the loss (and cut by ``max_length``). Row and mapping problems come
    back as ``error`` (message, where, hint), never raised."""
    result: dict[str, Any] = {"index": int(index), "tokenizer": tokenizer_name or "qlw-tiny-llama", "warnings": [],
                              "error": None, "example": None, "segments": [], "text": "", "tokens": 0,
                              "loss_tokens": 0, "truncated": False, "dropped": False}
    try:
        s = settings_from(settings)
        from backend.methods import preference

        if preference.is_preference_mapping(s.mapping):  # DPO/ORPO/KTO rows: both sides, answers in the loss
            return preference.preview_pair(opened, s, index, tokenizer, result)
        check_mapping(s, opened.columns)
        loss = effective_loss(s)
        result.update(form=training_form(s), loss=loss, max_length=s.max_length, template=s.template)
        result["split"] = split_counts(opened, s)
        row = opened.raw_row(index)
        example = format_row(row, s)
    except DataError as exc:
        where = exc.where
        if isinstance(exc, RowError):
            where = f"row {index}, {exc.where}" if exc.where else f"row {index}"
        result["error"] = {"message": str(exc), "where": where, "hint": exc.hint}
        return result
    result["example"] = _cap(example, 200_000, [ROW_BUDGET_CHARS], {}, "example")
    size = sum(len(v) if isinstance(v, str) else sum(len(m.get("content") or "") for m in v) for v in example.values())
    if size > PREVIEW_MAX_CHARS:
        result["error"] = {"message": f"row {index} is {size:,} characters long: too long for a live preview",
                           "where": f"row {index}", "hint": "token statistics still measure it; max_length cuts it in training"}
        return result
    if result["form"] == "messages" and not getattr(tokenizer, "chat_template", None):
        result["error"] = {"message": f"the tokenizer {result['tokenizer']} has no chat template",
                           "where": "settings.template", "hint": "choose the Mistral, Alpaca or raw template, "
                           "or a tokenizer that has a chat template"}
        return result
    if loss == "assistant_only" and not has_generation_markers(tokenizer):
        result["warnings"].append("the tokenizer's chat template has no {% generation %} markers: trl swaps in a "
                                  "training template for known model families, else it cannot mask; the mask below is empty")
    try:
        with _lock_for(tokenizer):
            ids, mask = tokenize_like_trl(example, tokenizer, loss)
    except Exception as exc:  # e.g. a chat template that raises on a role it does not know
        result["error"] = {"message": f"the tokenizer's chat template fails on row {index}: {_root_message(exc)}",
                           "where": f"row {index}", "hint": "choose another template, or fix the row's roles"}
        return result
    kept_ids, labels, dropped = labels_like_trl(ids, mask, s.max_length)
    result.update(
        tokens=len(ids),
        loss_tokens=sum(1 for label in labels if label != -100),
        truncated=len(ids) > s.max_length,
        dropped=dropped,
        segments=_segments(tokenizer, ids, mask, s.max_length),
    )
    result["text"] = "".join(seg["text"] for seg in result["segments"])
    if dropped:
        result["warnings"].append(f"no loss token is left within max_length {s.max_length}: trl drops this row")
    elif result["truncated"]:
        result["warnings"].append(f"{len(ids) - s.max_length:,} of {len(ids):,} tokens lie beyond max_length "
                                  f"{s.max_length} and are cut")
    if loss == "all" and training_form(s) != "text" and not (s.mapping["response"] or s.mapping["messages"]):
        result["warnings"].append("no response column: training learns the whole text, prompts included")
    return result


def _segments(tokenizer, ids: list[int], mask: list[int], max_length: int) -> list[dict[str, Any]]:
    """Consecutive tokens with the same (in loss, cut) state, decoded together."""
    segments: list[dict[str, Any]] = []
    start = 0
    n = len(ids)
    while start < n:
        state = (bool(mask[start]), start >= max_length)
        stop = start + 1
        while stop < n and (bool(mask[stop]), stop >= max_length) == state:
            stop += 1
        text = tokenizer.decode(ids[start:stop], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if state[1] and len(text) > PREVIEW_CUT_CHARS:
            text = text[:PREVIEW_CUT_CHARS] + f"… ({len(text) - PREVIEW_CUT_CHARS:,} more characters)"
        segments.append({"text": text, "loss": state[0], "cut": state[1], "tokens": stop - start})
        start = stop
    return segments


# Token statistics -----------------------------------------------------------------------------


def split_counts(opened: Opened, s: P.PreparedData) -> dict[str, int]:
    """Rows of the train and validation parts that ``s`` makes (before formatting)."""
    n = opened.num_rows
    if s.split_mode == "ratio":
        n_val = math.ceil(s.validation_ratio * n)
        return {"train": n - n_val, "validation": n_val}
    if s.split_mode == "split":
        if s.validation_split not in opened.splits:
            raise DataError(f"the source has no split {s.validation_split!r} for validation",
                            where="settings.validation_split", hint=f"its splits are: {', '.join(opened.splits)}")
        return {"train": n, "validation": len(opened.splits[s.validation_split])}
    return {"train": n, "validation": 0}


def token_stats(opened: Opened, settings: dict[str, Any] | P.PreparedData, tokenizer, bins: int = 40, limit: int = 0,
                progress: Progress | None = None, cancelled: Callable[[], bool] | None = None,
                tokenizer_name: str = "") -> dict[str, Any]:
    """Token lengths of the rows as trl will see them (before truncation): percentiles, a
    histogram, how many rows ``max_length`` cuts and how many trl drops (no loss token left).
    Rows that cannot be formatted are counted and the first few named."""
    import numpy as np

    report = progress or (lambda stage, done, total: None)
    is_cancelled = cancelled or (lambda: False)
    s = settings_from(settings)
    from backend.methods.preference import is_preference_mapping

    if is_preference_mapping(s.mapping):
        # SFT's statistics would measure the prompts alone: say so rather than show them.
        raise DataError("token statistics measure SFT rows; these are preference pairs", where="mapping",
                        hint="the preview shows each pair's chosen and rejected tokens and what max_length cuts")
    check_mapping(s, opened.columns)
    loss = effective_loss(s)
    form = training_form(s)
    if form == "messages" and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"the tokenizer {tokenizer_name or 'qlw-tiny-llama'} has no chat template",
                        where="settings.template", hint="choose the Mistral, Alpaca or raw template")
    total = opened.num_rows if limit <= 0 else min(limit, opened.num_rows)
    lengths = np.zeros(total, dtype=np.int64)
    no_loss_before = np.zeros(total, dtype=np.int64)  # tokens before the first loss token
    ok = np.zeros(total, dtype=bool)
    errors: list[dict[str, Any]] = []
    skipped = 0
    eos = tokenizer.eos_token or ""
    report("tokenizing", 0, total)
    for start in range(0, total, STATS_BATCH):
        if is_cancelled():
            raise JobCancelled()
        stop = min(total, start + STATS_BATCH)
        examples, where = [], []
        for offset, row in enumerate(_rows(opened.dataset[start:stop])):
            try:
                examples.append(format_row(row, s))
                where.append(start + offset)
            except RowError as exc:
                skipped += 1
                if len(errors) < 5:
                    errors.append({"index": start + offset, "message": str(exc), "where": exc.where})
        if examples:
            with _lock_for(tokenizer):
                try:
                    measured = [(where, *_batch_lengths(examples, form, loss, tokenizer, eos, s.max_length))]
                except Exception:  # one row the chat template rejects: measure row by row
                    measured = []
                    for index, example in zip(where, examples):
                        try:
                            measured.append(([index], *_batch_lengths([example], form, loss, tokenizer, eos, s.max_length)))
                        except Exception as exc:
                            skipped += 1
                            if len(errors) < 5:
                                errors.append({"index": index, "where": "chat template",
                                               "message": f"the tokenizer's chat template fails: {_root_message(exc)}"})
            for indices, full, before in measured:
                idx = np.asarray(indices)
                lengths[idx] = full
                no_loss_before[idx] = before
                ok[idx] = True
        report("tokenizing", stop, total)
    counted = lengths[ok]
    result: dict[str, Any] = {
        "rows": int(ok.sum()), "skipped": skipped, "errors": errors, "num_rows": opened.num_rows,
        "limit": limit, "max_length": s.max_length, "loss": loss, "form": form, "template": s.template,
        "tokenizer": tokenizer_name or "qlw-tiny-llama", "split": split_counts(opened, s),
    }
    if counted.size == 0:
        result.update(min=0, p50=0, p95=0, p99=0, max=0, mean=0.0, total_tokens=0, truncated=0, dropped=0,
                      histogram={"edges": [0, 1], "counts": [0]})
        return result
    p50, p95, p99 = (int(np.percentile(counted, q, method="nearest")) for q in (50, 95, 99))
    top = int(counted.max())
    nbins = max(1, min(int(bins), 200, top))
    width = max(1, math.ceil(top / nbins))
    edges = [i * width for i in range(nbins + 1)]
    counts, _ = np.histogram(counted, bins=edges)
    dropped = int((no_loss_before[ok] >= s.max_length).sum()) if loss != "all" else 0
    result.update(
        min=int(counted.min()), p50=p50, p95=p95, p99=p99, max=top, mean=round(float(counted.mean()), 1),
        total_tokens=int(counted.sum()),
        truncated=int((counted > s.max_length).sum()),
        tokens_cut=int(np.clip(counted - s.max_length, 0, None).sum()),
        dropped=dropped,
        histogram={"edges": edges, "counts": [int(c) for c in counts]},
    )
    return result


def _batch_lengths(examples: list[dict[str, Any]], form: str, loss: str, tokenizer, eos: str,
                   max_length: int | None = None):
    """Token lengths of a batch of trl rows (as :func:`tokenize_like_trl` counts them, batched),
    and the number of tokens before the first one in the loss. That second count matters only
    for rows longer than ``max_length`` (only they can lose every loss token), so it is measured
    for those alone; other rows get 0."""

    def lengths(texts: list[str], special: bool = True) -> list[int]:
        enc = tokenizer(texts, add_special_tokens=special, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]
        return [len(ids) for ids in enc]

    def long(full: list[int]) -> list[int]:
        return [i for i, n in enumerate(full) if max_length is None or n > max_length]

    if form == "messages":
        convs = [ex["messages"] for ex in examples]
        full = lengths(tokenizer.apply_chat_template(convs, tokenize=False), special=False)
        before = [0] * len(convs)
        if loss != "assistant_only":
            return full, before
        heads, at = [], []
        for i in long(full):  # everything up to the first answer, with the assistant header
            conv = convs[i]
            k = next((j for j, msg in enumerate(conv) if msg["role"] == "assistant"), len(conv))
            if k:
                heads.append(conv[:k])
                at.append(i)
        if heads:
            rendered = tokenizer.apply_chat_template(heads, tokenize=False, add_generation_prompt=True)
            for i, n in zip(at, lengths(rendered, special=False)):
                before[i] = n
        return full, before
    if form == "prompt_completion":
        full = lengths([ex["prompt"] + (ex["completion"] if ex["completion"].endswith(eos) else ex["completion"] + eos)
                        for ex in examples])
        before = [0] * len(full)
        if loss != "completion_only":
            return full, before
        at = long(full)
        if at:
            for i, n in zip(at, lengths([examples[i]["prompt"] for i in at])):
                before[i] = min(n, full[i])
        return full, before
    full = lengths([ex["text"] if ex["text"].endswith(eos) else ex["text"] + eos for ex in examples])
    return full, [0] * len(full)


# The prepared dataset, for training ----------------------------------------------------------


@dataclass
class Prepared:
    """What training consumes: trl rows for train (and validation), the SFTConfig settings."""

    train: "datasets.Dataset"
    validation: "datasets.Dataset | None"
    sft_config: dict[str, Any]
    settings: dict[str, Any]
    report: dict[str, Any]


def _format_batch(batch: dict[str, list], settings: dict[str, Any]) -> dict[str, list]:
    s = settings_from(settings)
    out: dict[str, list] = {}
    keys = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}[training_form(s)]
    for key in keys:
        out[key] = []
    for row in _rows(batch):
        try:
            example = format_row(row, s)
        except RowError:
            continue  # counted by the caller: formatted rows vs source rows
        if set(example) != set(keys):  # e.g. an unanswered row under a prompt/completion template
            continue
        for key in keys:
            out[key].append(example[key])
    return out


def _prepared_cache(home: Path, opened: Opened, s: P.PreparedData, part: str) -> str | None:
    """Where ``datasets`` writes a derived table (formatted rows, split indices). It writes them
    beside the source's Arrow files, which for files and Hub ids are in the data home already;
    a ``save_to_disk`` folder is the user's, so its derived tables go to the data home instead."""
    if opened.resolved.kind != "disk":
        return None
    import hashlib

    key = json.dumps([opened.resolved.key, opened.signature, P.to_dict(s), part], default=str)
    folder = cache_dir(home) / "prepared"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}-{part}.arrow")


def load_prepared(settings: dict[str, Any] | P.PreparedData, home: Path, progress: Progress | None = None,
                  cancelled: Callable[[], bool] | None = None) -> Prepared:
    """The prepared dataset for trl's ``SFTTrainer``: the source's rows split into train and
    validation (seeded), each formatted by :func:`format_row`. Rows that cannot be formatted are
    left out and counted in ``report``; ``sft_config`` holds the matching ``SFTConfig`` settings."""
    s = settings_from(settings)
    opened = open_source(s.source, home, progress, cancelled)
    check_mapping(s, opened.columns)
    base = opened.dataset
    validation = None
    counts = split_counts(opened, s)
    if s.split_mode == "ratio":
        if counts["train"] < 1 or counts["validation"] < 1:
            raise DataError(f"a validation ratio of {s.validation_ratio:g} leaves {counts['train']} train and "
                            f"{counts['validation']} validation rows of {opened.num_rows}",
                            where="settings.validation_ratio", hint="choose another ratio, or no validation")
        parts = base.train_test_split(test_size=counts["validation"], seed=s.seed, shuffle=True,
                                      train_indices_cache_file_name=_prepared_cache(home, opened, s, "train-indices"),
                                      test_indices_cache_file_name=_prepared_cache(home, opened, s, "validation-indices"))
        base, validation = parts["train"], parts["test"]
    elif s.split_mode == "split":
        validation = opened.splits[s.validation_split]
        check_mapping(s, list(validation.column_names))
    kwargs = {"batched": True, "batch_size": 1000, "fn_kwargs": {"settings": P.to_dict(s)}}
    train = base.map(_format_batch, remove_columns=base.column_names, desc="Formatting train rows",
                     cache_file_name=_prepared_cache(home, opened, s, "train"), **kwargs)
    val = None
    if validation is not None:
        val = validation.map(_format_batch, remove_columns=validation.column_names, desc="Formatting validation rows",
                             cache_file_name=_prepared_cache(home, opened, s, "validation"), **kwargs)
    report = {
        "train_rows": len(train), "train_skipped": len(base) - len(train),
        "validation_rows": len(val) if val is not None else 0,
        "validation_skipped": (len(validation) - len(val)) if val is not None else 0,
        "form": training_form(s), "loss": effective_loss(s),
    }
    return Prepared(train, val, sft_config_kwargs(s), P.to_dict(s), report)


# The server's side ----------------------------------------------------------------------------


class DataRoom:
    """The Data requests of one backend: quick ones (pages, rows, previews) run in a thread on
    an open dataset; opening and statistics are jobs with progress."""

    def __init__(self, home: Path):
        self.home = Path(home)

    def summary_if_open(self, params: P.OpenData) -> dict[str, Any] | None:
        """The summary when ``params.source`` is open and unchanged (and no reload is asked)."""
        if params.reload:
            return None
        try:
            opened = find_open(params.source, check_files=True)
        except DataError:
            return None  # the job reports it, with its where and hint
        return opened.summary if opened is not None else None

    def open_job(self, params: P.OpenData):
        def run(ctx) -> dict[str, Any]:
            ctx.progress("opening", 0, 0)
            opened = open_source(params.source, self.home, progress=lambda st, d, t: ctx.progress(st, d, t, "rows"),
                                 cancelled=lambda: ctx.cancelled, reload=params.reload)
            # The preview comes next: load the default tokenizer now (transformers' import and
            # the load take ~2.5 s once per backend), so the first preview is not the slow one.
            try:
                ctx.progress("loading the tokenizer", 0, 0)
                load_tokenizer("", self.home)
            except DataError:
                pass  # the tiny model is not built yet: the preview says how to build it
            return {"dataset": opened.summary}

        return run

    def stats_job(self, params: P.DataStats):
        def run(ctx) -> dict[str, Any]:
            s = settings_from(params.settings)
            opened = open_source(s.source, self.home, progress=lambda st, d, t: ctx.progress(st, d, t, "rows"),
                                 cancelled=lambda: ctx.cancelled)
            tokenizer = load_tokenizer(params.tokenizer, self.home, build=True,
                                       progress=lambda st, d, t: ctx.progress(st, d, t),
                                       cancelled=lambda: ctx.cancelled)
            stats = token_stats(opened, s, tokenizer, params.bins, params.limit,
                                progress=lambda st, d, t: ctx.progress(st, d, t, "rows"),
                                cancelled=lambda: ctx.cancelled, tokenizer_name=params.tokenizer)
            return {"stats": stats, "settings": P.to_dict(s)}

        return run

    def handle(self, params: Any) -> dict[str, Any]:
        """Answer a quick request (page, row, preview). Raises NotOpen or DataError."""
        if isinstance(params, P.DataPage):
            return require_open(params.source).page(params.start, params.count, params.filter, params.cell_chars)
        if isinstance(params, P.DataRow):
            return require_open(params.source).row(params.index, params.max_chars)
        if isinstance(params, P.DataPreview):
            s = params.settings
            opened = require_open(s.get("source", {}) if isinstance(s, dict) else {})
            tokenizer = load_tokenizer(params.tokenizer, self.home)
            return preview_row(opened, s, params.index, tokenizer, params.tokenizer)
        raise TypeError(f"not a quick data request: {type(params).__name__}")


def error_result(exc: JobError) -> dict[str, Any]:
    """A DataError as the ``error`` object of a reply's result."""
    return {"error": {"message": str(exc), "where": exc.where, "hint": exc.hint}}


# `qlw data`: the headless view ----------------------------------------------------------------


def add_cli_arguments(parser) -> None:
    """The options of ``python -m backend data`` (and so of ``qlw data``)."""
    parser.add_argument("path", help="a data file or folder (JSON, JSONL, CSV, TSV, Parquet, Arrow, text) or a Hub id")
    parser.add_argument("--config", default="", help="the Hub dataset's config name")
    parser.add_argument("--split", default="", help="the split to inspect (default: train, or the only one)")
    parser.add_argument("--template", choices=TEMPLATES, default="chat",
                        help="training format: the tokenizer's chat template, Mistral [INST], Alpaca, or raw text")
    parser.add_argument("--tokenizer", default="",
                        help="model folder or Hub id whose tokenizer counts tokens (default: the embedded tiny model)")
    parser.add_argument("--map", action="append", default=[], metavar="ROLE=COLUMN",
                        help=f"correct the detected mapping (roles: {', '.join(ROLES)}; empty COLUMN unmaps)")
    parser.add_argument("--loss", choices=P.DATA_LOSSES, default="auto", help="which tokens count in the loss")
    parser.add_argument("--system-prompt", default="", help="system prompt for rows without a system column")
    parser.add_argument("--max-length", type=int, default=1024, help="trl's max_length in tokens (default 1024)")
    parser.add_argument("--validation-ratio", type=float, default=0.1, help="fraction of rows for validation (0: none)")
    parser.add_argument("--validation-split", default="", help="use this split of the source for validation instead")
    parser.add_argument("--seed", type=int, default=42, help="seed of the train/validation split")
    parser.add_argument("--row", type=int, default=0, help="the row whose training example is shown (default 0)")
    parser.add_argument("--stats-rows", type=int, default=0, help="count tokens of the first N rows only (0: all)")
    parser.add_argument("--no-stats", action="store_true", help="skip the token-length statistics")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--home", type=Path, default=None, help="data home (default: $QLW_HOME or the user data dir)")


def cli(args) -> int:
    """``qlw data``: print what the Data pane shows; 0 when a training example could be made."""
    home = (args.home or P.data_home()).expanduser().resolve()
    out: dict[str, Any] = {}
    import logging

    # The libraries' own complaints (datasets' "Failed to load JSON", the tokenizer's "sequence
    # longer than the model's maximum") are said better below, with the file and line.
    import datasets

    datasets.utils.logging.set_verbosity(logging.CRITICAL)  # datasets resets its level on import
    logging.getLogger("transformers").setLevel(logging.CRITICAL)
    tty = sys.stderr.isatty()

    def progress(stage: str, done: float, total: float) -> None:
        if tty:
            amount = f"{done:,.0f}/{total:,.0f}" if total else f"{done:,.0f}"
            print(f"\r{stage}: {amount}\033[K", end="", file=sys.stderr, flush=True)

    try:
        opened = open_source({"path": args.path, "config": args.config, "split": args.split}, home, progress)
        if tty:
            print("\r\033[K", end="", file=sys.stderr)
        summary = opened.summary
        out["dataset"] = summary
        _file_lines(summary)
        mapping = dict(summary["mapping"])
        for item in args.map:
            role, sep, column = item.partition("=")
            if not sep or role.strip() not in ROLES:
                raise DataError(f"--map {item!r}: expected ROLE=COLUMN with a role of {', '.join(ROLES)}", where="--map")
            mapping[role.strip()] = column.strip()
        split_mode = "split" if args.validation_split else ("ratio" if args.validation_ratio > 0 else "none")
        settings = settings_from({
            "source": summary["source"], "mapping": mapping, "template": args.template, "loss": args.loss,
            "system_prompt": args.system_prompt, "split_mode": split_mode,
            "validation_ratio": args.validation_ratio if split_mode == "ratio" else 0.1,
            "validation_split": args.validation_split, "seed": args.seed, "max_length": args.max_length})
        out["settings"] = P.to_dict(settings)
        if not args.json:
            _print_summary(summary, settings)
        check_mapping(settings, opened.columns)
        out["split"] = split_counts(opened, settings)
        tokenizer = load_tokenizer(args.tokenizer, home, build=True, progress=progress)
        if tty:
            print("\r\033[K", end="", file=sys.stderr)
        if not args.no_stats:
            out["stats"] = token_stats(opened, settings, tokenizer, limit=args.stats_rows, progress=progress,
                                       tokenizer_name=args.tokenizer)
            if tty:
                print("\r\033[K", end="", file=sys.stderr)
        preview = preview_row(opened, settings, args.row, tokenizer, args.tokenizer)
        out["preview"] = preview
    except DataError as exc:
        if tty:
            print("\r\033[K", end="", file=sys.stderr)
        out.update(error_result(exc))
        if args.json:
            print(json.dumps(out, ensure_ascii=False, default=str))
        _print_error(out["error"])
        return 1
    if args.json:
        print(json.dumps(out, ensure_ascii=False, default=str))
    else:
        if "stats" in out:
            _print_stats(out["stats"])
        _print_preview(preview, out["split"], settings)
    # The exit status describes the file, not the row shown: with the statistics, 1 when any row
    # cannot be formatted (training skips it); the preview row's own trouble is then a note.
    stats = out.get("stats")
    if stats is not None:
        if preview["error"]:
            _print_error(preview["error"], "note")
        if stats.get("skipped"):
            print(f"qlw data: error: {stats['skipped']:,} of {stats['rows'] + stats['skipped']:,} rows cannot be "
                  f"formatted (training skips them); first: {_line_of(stats['errors'][0]['index'])}: "
                  f"{stats['errors'][0]['message']}" if stats.get("errors") else
                  f"qlw data: error: {stats['skipped']:,} rows cannot be formatted (training skips them)", file=sys.stderr)
            return 1
        return 0
    if preview["error"]:
        _print_error(preview["error"])
        return 1
    return 0


#: Row index -> the file's line number, for a JSON Lines file (set by :func:`cli`): people look a
#: row up in their file by its line, not by a 0-based index.
_FILE_LINES: list[int] = []
_FILE_NAME = ""


def _file_lines(summary: dict[str, Any]) -> None:
    """Number the rows of a single JSON Lines file by line (blank lines are no rows)."""
    global _FILE_NAME
    _FILE_LINES.clear()
    files = summary.get("files") or []
    if summary.get("kind") != "file" or len(files) != 1 or not str(files[0]).endswith((".jsonl", ".ndjson")):
        return
    with open(files[0], "rb") as fh:
        _FILE_LINES.extend(n for n, raw in enumerate(fh, 1) if raw.strip())
    _FILE_NAME = Path(files[0]).name


def _line_of(index: int) -> str:
    """``line 2 of data.jsonl (row 1)`` where the file's lines are known, else ``row 1``."""
    if 0 <= index < len(_FILE_LINES):
        return f"line {_FILE_LINES[index]} of {_FILE_NAME} (row {index})"
    return f"row {index}"


def _with_lines(text: str) -> str:
    return re.sub(r"\brow (\d+)\b", lambda m: _line_of(int(m.group(1))), text) if _FILE_LINES else text


def _print_error(error: dict[str, Any], label: str = "error") -> None:
    print(f"qlw data: {label}: {_with_lines(error['message'])}", file=sys.stderr)
    if error.get("where"):
        print(f"  where: {_with_lines(error['where'])}", file=sys.stderr)
    if error.get("hint"):
        print(f"  hint:  {error['hint']}", file=sys.stderr)


def _print_summary(summary: dict[str, Any], s: P.PreparedData) -> None:
    splits = ", ".join(f"{k} {v:,}" for k, v in summary["splits"].items())
    mapped = ", ".join(f"{role} <- {col}" for role, col in s.mapping.items() if col) or "nothing"
    print(f"source    {summary['description']}")
    print(f"rows      {summary['num_rows']:,} in split {summary['split']} (splits: {splits})")
    print(f"shape     {summary['shape']}: {summary['shape_label']}")
    print(f"mapping   {mapped}")
    for note in summary["notes"]:
        print(f"note      {note}")
    print()
    cols = summary["columns"]
    wname = max([4] + [len(c["name"]) for c in cols])
    wtype = max([4] + [len(c["type"]) for c in cols])
    print(f"{'column':<{wname}}  {'type':<{wtype}}  {'nulls':>7}  example")
    for c in cols:
        example = str(c["examples"][0]) if c["examples"] else ""
        example = example.replace("\n", " ⏎ ")
        print(f"{c['name']:<{wname}}  {c['type']:<{wtype}}  {c['nulls']:>7,}  {_excerpt(example, 60)}")
    print()


def _print_stats(st: dict[str, Any]) -> None:
    print(f"token lengths ({st['tokenizer']}, {st['rows']:,} rows{', ' + str(st['skipped']) + ' skipped' if st['skipped'] else ''})")
    if not st["rows"]:
        print("  no row could be formatted")
    else:
        print(f"  min {st['min']:,}  p50 {st['p50']:,}  p95 {st['p95']:,}  p99 {st['p99']:,}  max {st['max']:,}  "
              f"mean {st['mean']:,}")
        print(f"  max_length {st['max_length']:,}: {st['truncated']:,} rows cut ({st['tokens_cut']:,} tokens), "
              f"{st['dropped']:,} dropped by trl (no loss token left)")
        counts, edges = st["histogram"]["counts"], st["histogram"]["edges"]
        peak = max(counts) or 1
        # Merge into at most 12 lines for a terminal.
        step = max(1, math.ceil(len(counts) / 12))
        for i in range(0, len(counts), step):
            c = sum(counts[i:i + step])
            lo, hi = edges[i], edges[min(i + step, len(edges) - 1)]
            bar = "█" * max(1 if c else 0, round(30 * c / (peak * step)))
            print(f"  {lo:>7,}-{hi:<7,} {bar} {c:,}")
    for e in st["errors"]:
        print(f"  skipped {_line_of(e['index'])}: {e['message']}")
    print()


def _print_preview(pv: dict[str, Any], split: dict[str, int], s: P.PreparedData) -> None:
    print(f"split     train {split['train']:,}, validation {split['validation']:,}"
          + (f" (seed {s.seed})" if s.split_mode == "ratio" else ""))
    if pv.get("error"):
        return
    print(f"template  {s.template}; trl rows are {pv['form']}; loss: {pv['loss']}")
    print()
    print(f"first training example ({_line_of(pv['index'])}): the trl row")
    print(json.dumps(pv["example"], ensure_ascii=False, indent=2))
    print()
    print(f"training text ({pv['tokens']:,} tokens, {pv['loss_tokens']:,} in the loss between ⟦ ⟧; cut after "
          f"max_length between ✂ ✂):")
    parts = []
    for seg in pv["segments"]:
        text = seg["text"]
        if seg["cut"]:
            text = f"✂{text}✂"
        elif seg["loss"] and pv["loss"] != "all":
            text = f"⟦{text}⟧"
        parts.append(text)
    print("".join(parts))
    for w in pv["warnings"]:
        print(f"warning: {w}")
