"""The contract between the qlw front end and the backend.

Everything the two processes share lives here: where the socket is, the protocol version, the
envelope types, the typed request parameters and event payloads, and their wire encoding. It is
pure Python (stdlib + platformdirs) and cheap to import: the front end imports nothing else from
the backend.

Wire format: one JSON object per line (UTF-8, ``\\n``-terminated, at most ``MAX_MESSAGE_BYTES``).
Every object has ``"type"``, one of ``hello``, ``welcome``, ``request``, ``reply``, ``event``.

- The client opens with :class:`Hello`; the server answers :class:`Welcome` or, on a protocol
  version mismatch, a :class:`Reply` with status ``error`` and code ``version_mismatch``, then
  closes.
- A :class:`Request` names a ``method`` (see ``REQUESTS``) and carries an ``id``; it gets exactly
  one :class:`Reply` with that id: ``ok`` (done, with a result), ``accepted`` (a job started; its
  progress follows as events), ``refused`` (valid, but not possible now: ``reason`` says why) or
  ``error`` (malformed, unknown, or failed: ``code`` and ``reason``).
- An :class:`Event` reports anything that happens later. Events of a session carry that session's
  id and a sequence number (1, 2, ... per session); they are written to the store before they are
  sent, so a client that re-attaches with ``attach(session, since=N)`` gets every event after N,
  then the live stream, with no gap and no duplicate. Telemetry events (``ephemeral``, e.g. GPU
  samples) have no session and no sequence number and are never replayed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

PROTOCOL_VERSION = 1
#: The largest line either side accepts; a longer one gets a ``too_large`` error and is skipped.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: AF_UNIX paths longer than this fail to bind on Linux.
MAX_SOCKET_PATH_BYTES = 107

# Error codes carried by ``Reply(status="error")``.
BAD_JSON = "bad_json"
BAD_MESSAGE = "bad_message"
UNKNOWN_TYPE = "unknown_type"
UNKNOWN_METHOD = "unknown_method"
TOO_LARGE = "too_large"
VERSION_MISMATCH = "version_mismatch"
NOT_READY = "not_ready"
FAILED = "failed"
#: Carried by a ``refused`` reply that the user may overrule (e.g. stop the running job first).
CONFIRM = "confirm"

REPLY_STATUSES = ("ok", "accepted", "refused", "error")


class ProtocolError(ValueError):
    """A message that cannot be accepted: ``code`` is one of the error codes above."""

    def __init__(self, code: str, message: str, request_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


# --------------------------------------------------------------------------------------------
# Rendezvous: the data home and the socket.


def data_home() -> Path:
    """The one folder qlw writes to: ``$QLW_HOME`` or the platform's user data dir."""
    env = os.environ.get("QLW_HOME")
    if env:
        return Path(env).expanduser().resolve()
    import platformdirs

    return Path(platformdirs.user_data_dir("qlw", appauthor=False))


def socket_path(home: Path | None = None) -> Path:
    """Where the backend of ``home`` listens: ``<home>/run/backend.sock``.

    When that path is too long for AF_UNIX (deep test or home folders), a short private folder
    under ``$XDG_RUNTIME_DIR`` (or the temp dir) named after a hash of the home is used instead.
    """
    home = Path(home) if home is not None else data_home()
    path = home / "run" / "backend.sock"
    if len(os.fsencode(str(path))) <= MAX_SOCKET_PATH_BYTES:
        return path
    digest = hashlib.sha256(os.fsencode(str(home.resolve()))).hexdigest()[:16]
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"qlw-{os.getuid()}-{digest}" / "backend.sock"


# --------------------------------------------------------------------------------------------
# Envelopes.


@dataclass
class Hello:
    """First line a client sends: the protocol it speaks and who it is (for logs and status)."""

    TYPE: ClassVar[str] = "hello"
    protocol: int
    client: str = ""


@dataclass
class Welcome:
    """The server's answer to a matching :class:`Hello`."""

    TYPE: ClassVar[str] = "welcome"
    protocol: int
    server_version: str
    pid: int
    started: float
    data_home: str


@dataclass
class Request:
    """A call from a client. ``params`` are checked against ``REQUESTS[method]``."""

    TYPE: ClassVar[str] = "request"
    id: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reply:
    """The one answer to a :class:`Request` (``id`` is empty when the request had none)."""

    TYPE: ClassVar[str] = "reply"
    id: str
    status: str
    result: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    code: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "accepted")


@dataclass
class Event:
    """Something that happened. ``payload`` is checked against ``EVENTS[kind]`` when known.

    ``session``/``seq`` are set for recorded events and ``None`` for ephemeral telemetry.
    """

    TYPE: ClassVar[str] = "event"
    kind: str
    payload: dict[str, Any]
    time: float
    session: str | None = None
    seq: int | None = None


ENVELOPES: dict[str, type] = {c.TYPE: c for c in (Hello, Welcome, Request, Reply, Event)}


# --------------------------------------------------------------------------------------------
# Typed request parameters and event payloads.

REQUESTS: dict[str, type] = {}
EVENTS: dict[str, type] = {}
#: Event kinds that are broadcast but neither stored nor replayed.
EPHEMERAL: set[str] = set()


def request(method: str):
    """Register a dataclass as the parameters of request ``method``."""

    def wrap(cls):
        cls = dataclass(cls)
        cls.METHOD = method
        REQUESTS[method] = cls
        return cls

    return wrap


def event(kind: str, *, ephemeral: bool = False):
    """Register a dataclass as the payload of event ``kind``."""

    def wrap(cls):
        cls = dataclass(cls)
        cls.KIND = kind
        EVENTS[kind] = cls
        if ephemeral:
            EPHEMERAL.add(kind)
        return cls

    return wrap


# Requests -------------------------------------------------------------------------------------


@request("ping")
class Ping:
    """Liveness check; the reply echoes ``payload`` with the server's clock."""

    payload: str = ""


@request("status")
class Status:
    """Server facts: pid, uptime, protocol, data home, current session and job, clients."""


@request("attach")
class Attach:
    """Follow the backend: replay ``session``'s events after ``since``, then stream live.

    ``session=None`` means the current session (the latest one if none is active). The reply
    comes after the replay, with ``{"session": id or None, "last_seq": int}``. After the
    session's events and before the reply, every key of the front end's state comes as a
    ``ui.changed`` event with ``replay`` set. Live events of every session follow, whichever
    session was replayed.
    """

    session: str | None = None
    since: int = 0


@request("sessions.list")
class ListSessions:
    """Past and present sessions, newest first: ``{"sessions": [SessionInfo, ...]}``."""

    limit: int = 200


@request("sessions.new")
class NewSession:
    """Start a new session and make it current: ``{"session": SessionInfo}``."""

    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)


@request("job.cancel")
class CancelJob:
    """Ask the running job to stop (it saves what it can first). ``job_id`` guards against
    cancelling a newer job than the one the user saw; empty means whatever runs."""

    job_id: str = ""


@request("tiny.prepare")
class PrepareTiny:
    """Job: build (once) the embedded tiny model in the data home; progress as job events."""


@request("diag.ticker")
class DiagTicker:
    """Job: emit ``count`` ``diag.tick`` events at ``rate`` per second (0 = as fast as
    possible). A diagnostic for the channel: used by ``qlw doctor``, tests and bench/."""

    count: int = 100
    rate: float = 100.0


@request("diag.burn")
class DiagBurn:
    """Job: keep one core busy in pure Python (holding the GIL) for ``seconds``, the worst case
    for the event loop. A diagnostic: proves that ``ping`` stays fast while a job computes."""

    seconds: float = 1.0


@request("gpu.history")
class GpuHistory:
    """The recent ``gpu.sample`` payloads (up to 5 minutes), oldest first: ``{"samples": [...]}``,
    so a pane that attaches late can draw its sparklines at once."""


@request("gpu.interval")
class GpuInterval:
    """Set the GPU sampling interval, 0.25 to 10 seconds (default 1)."""

    seconds: float = 1.0


@request("gpu.free")
class FreeMemory:
    """Job: drop every model, trainer, optimizer, pipeline, streamer and cache the backend holds,
    collect garbage and empty torch's CUDA cache; the result has before/after figures and what is
    still held and why. Refused while a job runs unless ``stop_job`` (the user confirmed): then
    the job is asked to stop and save first."""

    stop_job: bool = False


@request("backend.restart")
class RestartBackend:
    """Restart the backend process in place (same socket and data home): the heavier way to free
    the GPU, since only the end of a process releases its CUDA context. Refused with code
    ``confirm`` while a job runs unless ``stop_job``: then the job is asked to stop and save
    first. Clients re-attach by themselves."""

    stop_job: bool = False


@request("shutdown")
class Shutdown:
    """Stop the backend. With ``graceful``, a running job is asked to stop and save first and
    the server waits up to ``timeout`` seconds for it."""

    graceful: bool = True
    timeout: float = 60.0


# Events ---------------------------------------------------------------------------------------


@event("session.created")
class SessionCreated:
    """A new session became current."""

    session: str
    name: str
    created: float


@event("session.status")
class SessionStatus:
    """A session's status changed: idle, running, finished, failed, cancelled, interrupted."""

    session: str
    status: str


@event("job.started")
class JobStarted:
    """A job began running."""

    job_id: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)


@event("job.progress")
class JobProgress:
    """Progress of the running job: ``done`` of ``total`` (``total`` 0 when unknown)."""

    job_id: str
    stage: str = ""
    done: float = 0
    total: float = 0
    unit: str = ""
    message: str = ""


@event("job.finished")
class JobFinished:
    """A job ended. ``status``: done, cancelled or failed (then ``error`` is set)."""

    job_id: str
    kind: str
    status: str
    elapsed_s: float
    result: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None


@event("error")
class ErrorEvent:
    """Something failed, said for people: what, where, and what to do next."""

    message: str
    where: str = ""
    hint: str = ""
    detail: str = ""
    job_id: str = ""


@event("log")
class LogEvent:
    """A line worth showing to the user (not debug noise)."""

    level: str
    message: str


@event("gpu.sample", ephemeral=True)
class GpuSample:
    """One monitoring tick: every visible GPU (``None`` for a metric the card does not report),
    the host's CPU and RAM, and the backend process (RSS, torch memory per device).
    ``nvml_error`` says why no GPU is visible, when none is."""

    time: float
    gpus: list[dict[str, Any]]
    host: dict[str, Any]
    backend: dict[str, Any]
    nvml_error: str | None = None
    driver: str | None = None
    #: The sampling interval in force, so every client sees a change made by another.
    interval: float = 1.0


@event("diag.tick")
class DiagTick:
    """One event of the ``diag.ticker`` job."""

    job_id: str
    n: int
    total: int
    sent: float


# --------------------------------------------------------------------------------------------
# Data: the dataset browser and the prepared dataset (backend/data.py, tui/widgets/data/).
#
# A dataset is named by a *source*, plain data: ``{"path": ..., "config": ..., "split": ...}``
# (see :class:`DataSource`). What training will use is a *prepared dataset*, also plain data (see
# :class:`PreparedData`): the Data pane builds it, the LoRA/Train panes send it back unchanged,
# and ``backend.data.load_prepared`` turns it into the rows trl's ``SFTTrainer`` consumes. The
# preview, the token statistics and training all go through the one formatter in backend/data.py.
#
# Settings of a run config carry their catalogue entry (help, range, choices) as field metadata,
# made by :func:`setting`: the LoRA form, backend/train_config.py's checks and the TOML export
# read it from there.


def setting(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
            minimum: float | None = None, maximum: float | None = None, low_open: bool = False,
            open_max: bool = False, also: float | None = None, choices: tuple[str, ...] = (),
            what: str = "", kind: str = "") -> Any:
    """A setting of a run config: a dataclass field whose metadata is the one catalogue entry the
    LoRA form's field, the backend's check and the TOML export are made from (as trl's configs
    carry their help). ``minimum``/``maximum`` bound a number (``low_open``/``open_max``: the bound
    itself is out); ``also`` is one more allowed value outside the range (max_steps' -1);
    ``choices`` the allowed texts; ``what`` how the backend's error names the allowed values;
    ``kind`` overrides the kind read from the type (see :func:`setting_kind`)."""
    meta = {"help": help, "minimum": minimum, "maximum": maximum, "low_open": low_open, "open_max": open_max,
            "also": also, "choices": tuple(choices), "what": what, "kind": kind}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def setting_kind(f: dataclasses.Field) -> str:
    """A setting's kind: int, float, bool, tristate (``bool | None``), choice, names (a list of
    module names), text, or the kind its metadata names (``steps``: a whole number of steps, or
    below 1 a fraction of the run)."""
    if f.metadata.get("kind"):
        return f.metadata["kind"]
    if f.metadata.get("choices"):
        return "choice"
    tp = str(f.type).replace(" ", "")
    return {"int": "int", "float": "float", "bool": "bool", "bool|None": "tristate", "str": "text",
            "list[str]": "names"}.get(tp, "text")


def settings_catalogue(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of a settings dataclass that carry catalogue metadata, by name, in order."""
    return {f.name: f for f in dataclasses.fields(cls) if "help" in f.metadata}


#: Templates of a prepared dataset: the tokenizer's chat template, Mistral's ``[INST]`` format,
#: the Alpaca prompt, or the columns' text as it is.
DATA_TEMPLATES = ("chat", "mistral", "alpaca", "raw")
#: Roles a column can be mapped to; ``messages`` is a conversation column (role/content or
#: ShareGPT's from/value), ``text`` a plain-text column.
DATA_ROLES = ("instruction", "context", "response", "system", "messages", "text", "chosen", "rejected", "label")
#: The roles of preference rows: ``instruction`` is the prompt; ``chosen``/``rejected`` the two
#: answers (text, or message lists as in HH-RLHF and UltraFeedback); KTO's rows are ``instruction``
#: (prompt), ``response`` (completion) and ``label`` (true: desirable).
PREFERENCE_ROLES = ("chosen", "rejected", "label")
#: ``auto``: assistant-only for chat rows, completion-only for prompt/completion rows, else all.
DATA_LOSSES = ("auto", "assistant_only", "completion_only", "all")
#: Validation rows: none, a seeded random fraction, or another split of the source.
DATA_SPLIT_MODES = ("none", "ratio", "split")
#: Code of a ``refused`` reply to a data request whose dataset this backend has not open (any
#: more, e.g. after a restart or "free memory"): send ``data.open`` again, then retry.
NOT_OPEN = "not_open"


@dataclass
class DataSource:
    """Where rows come from: a local file or folder (JSON, JSONL, CSV, TSV, Parquet, Arrow, plain
    text, or a ``save_to_disk`` folder) or a Hub dataset id, with its ``config`` and the ``split``
    to browse and train on (empty: ``train``, or the only split there is)."""

    path: str
    config: str = ""
    split: str = ""


@dataclass
class PreparedData:
    """A prepared dataset, as plain data: what training will use, exactly.

    ``source`` is a :class:`DataSource` as a dict. ``mapping`` maps each role of ``DATA_ROLES``
    to a column ("" or absent: unmapped). ``template`` is one of ``DATA_TEMPLATES``; ``loss`` one
    of ``DATA_LOSSES``; ``system_prompt`` is used when no column is mapped to ``system``.
    Validation rows: ``split_mode`` (``DATA_SPLIT_MODES``) with ``validation_ratio`` and ``seed``,
    or ``validation_split``. ``max_length`` is trl's ``SFTConfig.max_length`` (tokens; longer rows
    are cut, keeping the start).
    """

    source: dict[str, Any]
    mapping: dict[str, Any] = field(default_factory=dict)
    template: str = "chat"
    loss: str = setting("auto", help="Which tokens count in the loss: auto, assistant_only (chat rows), "
                        "completion_only (prompt/completion rows) or all (SFT only).", choices=DATA_LOSSES)
    system_prompt: str = ""
    split_mode: str = "ratio"
    validation_ratio: float = 0.1
    validation_split: str = ""
    seed: int = 42
    max_length: int = setting(1024, help="trl's max_length in tokens: longer rows are cut (keeping the start).",
                              minimum=1)


@request("data.open")
class OpenData:
    """Open ``source`` (a :class:`DataSource` dict) for browsing. If this backend has it open
    already (and the file did not change), the reply is ``ok`` with ``{"dataset": summary}``;
    otherwise a ``data.open`` job reads it (building the Arrow cache in the data home on first
    use, with progress) and its ``job.finished`` result is ``{"dataset": summary}``. The summary:
    source, kind, files, splits and their row counts, ``num_rows``, ``columns`` (name, type,
    nulls, examples), the detected ``shape`` and ``mapping``, and notes. ``reload`` reads the
    source again even if open."""

    source: dict[str, Any]
    reload: bool = False


@request("data.page")
class DataPage:
    """Rows ``start`` .. ``start + count`` of an open source, of those matching ``filter`` (a
    case-insensitive substring of any column, or ``column:text`` for one column): ``{"rows":
    [{"index": i, "cells": [...]}, ...], "columns": [...], "start", "total" (rows matching),
    "num_rows"}``. Cells are cut to ``cell_chars`` characters; nested values are compact JSON.
    Refused with code ``not_open`` when the source is not open."""

    source: dict[str, Any]
    start: int = 0
    count: int = 100
    filter: str = ""
    cell_chars: int = 200


@request("data.row")
class DataRow:
    """Row ``index`` of an open source in full: ``{"index", "values": {column: value}, "cut":
    {column: full length}}``; nested values stay structured, and a string longer than
    ``max_chars`` is cut there (``cut`` says so)."""

    source: dict[str, Any]
    index: int
    max_chars: int = 200_000


@request("data.preview")
class DataPreview:
    """The training example that ``settings`` (a :class:`PreparedData` dict) makes of row
    ``index``, tokenized exactly as trl's ``SFTTrainer`` will: ``{"example": the trl row,
    "form", "loss", "text", "segments": [{"text", "loss", "cut"}, ...], "tokens", "loss_tokens",
    "truncated", "dropped", "warnings", "error"}``. ``tokenizer``: a model folder or Hub id; empty
    for the embedded tiny model. A row that cannot be formatted gives ``error`` (message, where,
    hint), not a failed request."""

    settings: dict[str, Any]
    index: int = 0
    tokenizer: str = ""


@request("data.stats")
class DataStats:
    """Job: token lengths of every row (the first ``limit`` rows when ``limit`` > 0) as
    ``settings`` formats them, with progress. The ``job.finished`` result: ``{"stats": {"rows",
    "skipped", "errors", "min", "p50", "p95", "p99", "max", "mean", "histogram": {"edges",
    "counts"}, "max_length", "truncated", "dropped", "split"}}``."""

    settings: dict[str, Any]
    tokenizer: str = ""
    bins: int = 40
    limit: int = 0


# --------------------------------------------------------------------------------------------
# Models: the base model (backend/models.py, tui/widgets/model/).
#
# How to load a base model is plain data, :class:`ModelSettings`: the same fields are the
# parameters of ``model.estimate`` (what it will cost, from config.json alone) and of ``model.load``
# (the job), and they are recorded with the session (``job.started`` and ``model.loaded``).

#: bitsandbytes 4-bit or 8-bit, or unquantized.
MODEL_PRECISIONS = ("4bit", "8bit", "bf16", "fp16", "fp32")
#: bitsandbytes' 4-bit data types.
MODEL_QUANT_TYPES = ("nf4", "fp4")
#: The dtype 4-bit layers compute in (and the unquantized modules are stored in).
MODEL_COMPUTE_DTYPES = ("bf16", "fp16", "fp32")
#: transformers' ``attn_implementation``; flash_attention_2 only where flash-attn is installed.
MODEL_ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
#: The estimate's verdicts: the model plus room to train, the model alone, or not even that.
MODEL_VERDICTS = ("fits", "tight", "will not fit")


@dataclass
class ModelSettings:
    """How to load a base model, as plain data.

    ``source``: a local folder (holding config.json and the weights) or a Hub id, at ``revision``
    (a branch, tag or commit; empty: main). ``trust_remote_code`` lets a model run its own Python
    code from its repository (off unless the user turns it on). ``precision``: one of
    ``MODEL_PRECISIONS``; for 4-bit, ``quant_type`` (nf4/fp4), ``double_quant`` and
    ``compute_dtype`` (``MODEL_COMPUTE_DTYPES``); 8-bit keeps the other modules in fp16.
    ``attn_implementation``: one of ``MODEL_ATTN_IMPLEMENTATIONS``. ``device``: ``auto`` (the first
    GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; the whole model goes there.
    """

    source: str
    revision: str = ""
    trust_remote_code: bool = False
    precision: str = "4bit"
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bf16"
    attn_implementation: str = "sdpa"
    device: str = "auto"


@request("model.options")
class ModelOptions:
    """What this backend can load with: ``{"precisions", "quant_types", "compute_dtypes",
    "attn_implementations" (installed ones only), "devices": [{"device", "name", "free_bytes",
    "total_bytes"}, ...] (auto first, then each GPU, then the CPU), "bitsandbytes", "offline"
    (the Hub is off), "tiny_path", "tiny_ready"}``. Creates no CUDA context."""


@request("model.estimate")
class EstimateModel(ModelSettings):
    """What loading with these settings takes, from config.json alone (no weights are read): the
    exact parameter count, the bytes of weights, buffers and quantization state, the free memory
    of the device, and ``verdict`` (one of ``MODEL_VERDICTS``). Result keys: ``source``,
    ``architecture``, ``model_type``, ``layers``, ``parameters``, ``quantized_parameters``,
    ``unquantized_parameters``, ``unquantized_linear`` (linear layers bitsandbytes keeps in 16
    bits: the output head, tied weights), ``precision_label``, ``dtype``, ``weight_bytes``, ``buffer_bytes``,
    ``quant_state_bytes``, ``footprint_bytes`` (what ``get_memory_footprint`` will say),
    ``total_bytes`` (with the quantization state), ``device``, ``free_bytes``, ``reclaimed_bytes``
    (a loaded model that the load would replace), ``context_bytes`` (a CUDA context still to be
    created), ``verdict``, ``shards``, ``disk_bytes``. A bad source or config is an ``error``
    reply whose result is ``{"error": {"message", "where", "hint"}}``; offline, an uncached Hub id
    fails at once."""


@request("model.load")
class LoadModel(ModelSettings):
    """Job: release the held base model, then load this one (and its tokenizer) with progress by
    shard (``job.progress``: stage ``loading weights``, ``done``/``total`` in shards); cancellable
    between tensors. Ends with a ``model.loaded`` event; the ``job.finished`` result has the
    estimate beside the measured footprint (``estimate``, ``measured``, ``comparison``)."""


@request("model.inspect")
class InspectModel:
    """The held base model: ``{"loaded": false}``, or what ``model.loaded``'s ``inspect`` holds
    (architecture, layers, parameters, dtype, quantization, device, ``linear_groups``:
    ``[{"name", "count", "shapes": [[out, in], ...], "quantized", "in_all_linear"}]`` and
    ``tokenizer``: vocab size, special tokens, ``has_pad`` and ``pad_fix``,
    ``has_chat_template``) plus ``load``: how it was loaded and what it measured (``settings``,
    ``source``, ``device``, ``estimate``, ``measured``, ``comparison``, ``load_seconds``, as in
    ``model.loaded``)."""


@event("model.loaded")
class ModelLoaded:
    """A base model was loaded and is held by the backend (replacing any earlier one).

    ``settings``: the :class:`ModelSettings` used, as a dict. ``estimate``: the answer
    ``model.estimate`` gives. ``measured``: ``footprint_bytes`` (``get_memory_footprint``),
    ``quant_state_bytes``, ``tensor_bytes`` (their sum), ``torch_allocated_bytes`` and
    ``torch_peak_bytes`` (CUDA; null on the CPU), ``rss_delta_bytes``. ``comparison``: measured
    over estimated. ``inspect``: as ``model.inspect``."""

    settings: dict[str, Any]
    source: str
    source_path: str
    device: str
    estimate: dict[str, Any]
    measured: dict[str, Any]
    comparison: dict[str, Any] = field(default_factory=dict)
    inspect: dict[str, Any] = field(default_factory=dict)
    load_seconds: float = 0.0
    tokenizer_error: str = ""


# --------------------------------------------------------------------------------------------
# Training: the LoRA form, the run and its loss table (backend/train.py, tui/widgets/lora/,
# tui/widgets/train/).
#
# A run is configured by a *run config*, plain data (:class:`RunConfig`, as a dict):
# ``{"version": 1, "name": ..., "model": ModelSettings, "data": PreparedData, "lora":
# LoraSettings, "training": TrainingSettings}`` (each section a dict). It is what ``train.validate``
# checks, ``train.start`` runs, the session records, and ``qlw train CONFIG.toml`` reads; field
# names are those of peft's ``LoraConfig``, trl's ``SFTConfig`` and bitsandbytes' config. Errors
# are keyed by dotted field path (``"lora.r"``, ``"training.learning_rate"``).

RUN_CONFIG_VERSION = 1
#: transformers' ``lr_scheduler_type`` values offered by the form.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                 "constant_with_warmup")
#: transformers' ``optim`` values offered by the form (bitsandbytes ones need it installed).
OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_torch",
              "adamw_torch_fused", "adafactor", "sgd")
#: ``training.speed``: how the run picks its speed levers (backend/speed.py).
SPEEDS = ("fast", "lean", "manual")
#: peft's ``bias``.
LORA_BIASES = ("none", "all", "lora_only")
#: Presets of ``train.presets``.
TRAIN_PRESETS = ("qlora-paper", "small-gpu")
#: Training methods (``RunConfig.method``), one module each in ``backend/methods/``: supervised
#: fine-tuning, and the preference methods DPO, ORPO and KTO (trl's trainers of those names).
TRAINING_METHODS = ("sft", "dpo", "orpo", "kto")
#: What a preference run does with a malformed pair (an empty side, identical sides, no prompt):
#: leave it out (each is reported by line) or refuse to train.
MALFORMED_PAIRS = ("skip", "refuse")
#: trl's ``DPOConfig.loss_type`` values offered (sigmoid: the DPO paper's loss).
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "bco_pair", "sppo_hard", "nca_pair",
                  "apo_zero", "apo_down", "sigmoid_norm")
#: trl's ``KTOConfig.loss_type`` values.
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass
class LoraSettings:
    """peft ``LoraConfig`` fields. ``target_modules``: ``"all-linear"`` or a list of module names
    (from ``model.inspect``'s ``linear_groups``)."""

    r: int = setting(16, help="LoRA rank: the width of the low-rank update (8-64 typical).", minimum=1)
    lora_alpha: int = setting(16, help="LoRA scaling numerator: the update is scaled by lora_alpha/r "
                              "(by lora_alpha/sqrt(r) with use_rslora).", minimum=1)
    lora_dropout: float = setting(0.05, help="Dropout on the LoRA input, 0 to below 1 (0.05 in QLoRA).",
                                  minimum=0, maximum=1, open_max=True,
                                  what="a probability from 0 up to (not including) 1")
    target_modules: list[str] | str = "all-linear"
    bias: str = setting("none", help="Which biases train: none, all, or those of the LoRA layers.",
                        choices=LORA_BIASES)
    use_rslora: bool = setting(False, help="Rank-stabilised LoRA: scale by lora_alpha/sqrt(r).")
    use_dora: bool = setting(False, help="DoRA: weight-decomposed LoRA (slower, sometimes better).")
    modules_to_save: list[str] = setting(help="Modules trained in full and saved with the adapter, "
                                         "comma-separated (e.g. lm_head, embed_tokens after adding tokens).",
                                         default_factory=list)


@dataclass
class TrainingSettings:
    """trl ``SFTConfig`` / transformers ``TrainingArguments`` fields (``max_length``, packing and
    the loss mask live in the prepared dataset: ``PreparedData.max_length`` / ``loss``).
    ``max_steps`` > 0 overrides ``num_train_epochs``. ``logging_steps``, ``eval_steps`` and
    ``save_steps`` are whole numbers of steps, or, below 1, a fraction of the run's steps as
    transformers reads them (0.05: every 5% of the run, rounded up to a whole step), so that
    by default they follow the run's length: a short run logs every step, a long one about 100
    rows. ``eval_steps``/``save_steps`` 0: only at the end (the last step is always logged,
    evaluated and saved). ``bf16``/``fp16`` ``None``: chosen from the model's compute dtype and
    the device. The run's length defaults are transformers' (3 epochs, no accumulation), so
    that the shipped sample gives a curve of about 20 steps on the embedded tiny model.
    The preference methods (DPO, ORPO, KTO) take these too (their trl configs are
    ``TrainingArguments``); ``packing`` is SFT's only.

    Speed and memory (bench/train_speed.py measures them against the plain trl recipe):
    ``packing`` puts several rows into one ``max_length`` sequence (trl's best-fit-decreasing
    packing, padding-free: no pad tokens are computed); rows never attend to each other, since
    transformers builds a block-diagonal mask from the position ids for sdpa and eager (and
    flash-attention reads the boundaries); ``per_device_train_batch_size`` then counts packed
    sequences. ``use_liger_kernel``: Liger's fused RMSNorm/SwiGLU/RoPE kernels (needs the
    liger-kernel package and a CUDA GPU; off otherwise, with a warning). ``activation_offloading``:
    the activations kept for the backward pass wait in CPU memory (less GPU memory, some speed).
    ``speed`` (backend/speed.py): ``fast`` takes the fastest levers whose memory estimate fits
    ``memory_budget`` (GiB; 0: 90% of what the device has for the run): compiled decoder layers,
    checkpointing off, a bf16 copy of 4-bit weights; ``lean`` the smallest footprint (compiled,
    checkpointing, one sequence per micro-step); ``manual`` the switches as set. None changes the
    math; on the CPU the switches are taken as set."""

    num_train_epochs: float = setting(3.0, help="Passes over the training rows (used when max_steps is -1).",
                                      minimum=0, low_open=True, what="a positive number of epochs")
    max_steps: int = setting(-1, help="Optimizer steps in all; -1: run num_train_epochs instead.",
                             minimum=1, also=-1, what="-1 (train num_train_epochs) or a positive number of steps")
    learning_rate: float = setting(2e-4, help="Peak learning rate (2e-4 in QLoRA; DPO usually 5e-7 to 5e-6 "
                                   "for a full model, 5e-6 to 5e-5 with LoRA).", minimum=0, low_open=True,
                                   maximum=1, open_max=True, what="a positive number below 1 (e.g. 2e-4)")
    lr_scheduler_type: str = setting("constant", help="How the learning rate moves after warmup.",
                                     choices=LR_SCHEDULERS)
    warmup_ratio: float = setting(0.03, help="Fraction of the steps spent warming up, 0 to below 1.",
                                  minimum=0, maximum=1, open_max=True,
                                  what="a fraction from 0 up to (not including) 1")
    warmup_steps: int = setting(0, help="Warmup in steps; overrides warmup_ratio when above 0.", minimum=0)
    per_device_train_batch_size: int = setting(4, help="Rows per forward pass (preference methods: pairs).",
                                               minimum=1)
    gradient_accumulation_steps: int = setting(1, help="Forward passes per optimizer step "
                                               "(effective batch = batch size × this).", minimum=1)
    auto_find_batch_size: bool = setting(False, help="Halve the batch size and retry on CUDA out-of-memory.")
    packing: bool = setting(True, help="Pack several short rows into one max_length sequence (SFT only).")
    gradient_checkpointing: bool = setting(True, help="Recompute activations in the backward pass: "
                                           "much less memory, about 30% slower (speed fast/lean decide it on a GPU).")
    optim: str = setting("paged_adamw_8bit", help="Optimizer; paged_adamw_8bit is QLoRA's (needs bitsandbytes).",
                         choices=OPTIMIZERS)
    weight_decay: float = setting(0.0, help="Decoupled weight decay (0 in QLoRA).", minimum=0, what="a number >= 0")
    max_grad_norm: float = setting(0.3, help="Gradient clipping norm (0.3 in QLoRA); 0: no clipping.", minimum=0,
                                   what="a number >= 0 (0: no clipping)")
    logging_steps: int | float = setting(0.01, help="A row of the loss table every this many steps; below 1: a "
                                         "fraction of the run (0.01: every 1% of the steps, every step on a short "
                                         "run).", minimum=1, kind="steps")
    eval_steps: int | float = setting(0.2, help="Validation loss every this many steps; below 1: a fraction of "
                                      "the run (0.2: five times); 0: only at the end.", minimum=0, kind="steps")
    save_steps: int | float = setting(0.25, help="A checkpoint every this many steps; below 1: a fraction of the "
                                      "run (0.25: four times); 0: only at the end.", minimum=0, kind="steps")
    save_total_limit: int = setting(3, help="Checkpoints kept (older ones are deleted); 0: keep every one.",
                                    minimum=0, what="0 (keep every checkpoint) or how many to keep")
    seed: int = setting(42, help="Seed of the run (shuffling, dropout, LoRA init).", minimum=0)
    bf16: bool | None = setting(None, help="bf16 mixed precision; auto: from the model's compute dtype "
                                "and the device.")
    fp16: bool | None = setting(None, help="fp16 mixed precision; auto: from the model's compute dtype "
                                "and the device.")
    use_liger_kernel: bool = setting(False, help="Liger's fused kernels (CUDA and the liger-kernel package).")
    activation_offloading: bool = setting(False, help="Keep the activations for the backward pass in CPU memory.")
    speed: str = setting("fast", help="fast: the fastest levers that fit memory_budget (compiled layers, "
                         "checkpointing off, a bf16 weight copy); lean: the smallest footprint; manual: the switches "
                         "as set. The same math either way; the CPU takes the switches as set.", choices=SPEEDS)
    memory_budget: float = setting(0.0, help="GiB the run may take on the GPU, for speed fast; 0: 90% of what the "
                                   "device has.", minimum=0, what="GiB for the run (0: 90% of what the device has)")
    # Issue 18: standard logs and the watch on unattended runs (backend/watch.py, backend/notify.py).
    report_to: list[str] = setting(default_factory=lambda: ["tensorboard"], kind="names",
                                   help="Where the run's logs also go, as transformers' report_to: tensorboard (event "
                                   "files in the run folder), wandb, mlflow; empty: none. W&B takes its key from "
                                   "WANDB_API_KEY or its login and honours WANDB_MODE=offline; no key is written.")
    stop_on_divergence: bool = setting(True, help="Stop the run when the training loss becomes NaN or infinite, or "
                                       "explodes (divergence_factor), before that step's update; checkpoints are kept.")
    divergence_factor: float = setting(4.0, help="An exploding loss: a step's loss above this many times the run's "
                                       "first step's; 0: only NaN/inf stop the run.", minimum=0,
                                       what="0 (only NaN/inf) or a factor such as 4")
    early_stopping_patience: int = setting(0, help="Stop when eval_loss has not improved for this many evaluations "
                                           "(0: off); needs validation rows and eval_steps; the best checkpoint "
                                           "becomes the adapter.", minimum=0)
    early_stopping_threshold: float = setting(0.0, help="How much eval_loss must fall to count as an improvement.",
                                              minimum=0, what="a number >= 0")
    stall_minutes: float = setting(30.0, help="A notice when the run makes no step for this many minutes; 0: off.",
                                   minimum=0, what="0 (off) or minutes")
    notify_url: str = setting("", help="Webhook told when the run finishes, fails or stalls (JSON POST with text and "
                              "content: Slack, Discord, ntfy); empty: $QLW_NOTIFY_URL. Stored with the run's "
                              "config: for a secret URL use the variable.")


@dataclass
class PreferenceSettings:
    """What every preference method shares: where it starts and what it does with bad pairs.
    ``start_adapter``: the adapter folder of an earlier (SFT) run to continue training (empty: a
    fresh LoRA adapter from the ``lora`` section); with ``ref_model=None`` trl then takes a frozen
    copy of that adapter as the reference (DPO, KTO), never a second copy of the model."""

    LOG_COLUMNS: ClassVar[tuple[str, ...]] = ()

    beta: float = setting(0.1, help="trl's beta: how far the tuned model may move from the reference "
                          "(higher: less).", minimum=0, low_open=True, what="a positive number (e.g. 0.1)")
    start_adapter: str = setting("", help="An SFT run's adapter folder to start from (empty: a fresh "
                                 "adapter); it is also the reference.")
    malformed: str = setting("skip", help="Pairs with an empty side, identical sides or no prompt: skip "
                             "them (each reported by line) or refuse to train.", choices=MALFORMED_PAIRS)


@dataclass
class DPOSettings(PreferenceSettings):
    """trl ``DPOConfig`` fields (the rest comes from ``TrainingSettings``; ``max_length`` is the
    prepared dataset's)."""

    LOG_COLUMNS: ClassVar[tuple[str, ...]] = ("rewards/chosen", "rewards/rejected", "rewards/margins",
                                              "rewards/accuracies")

    loss_type: str = setting("sigmoid", help="trl's DPO loss (sigmoid: the DPO paper's; ipo, hinge, robust, ...).",
                             choices=DPO_LOSS_TYPES)
    label_smoothing: float = setting(0.0, help="Robust DPO's flip probability, 0 to below 0.5 (0: plain DPO).",
                                     minimum=0, maximum=0.5, open_max=True,
                                     what="a probability from 0 up to (not including) 0.5")


@dataclass
class ORPOSettings(PreferenceSettings):
    """trl ``ORPOConfig`` fields (``trl.experimental.orpo``): ``beta`` is the paper's lambda, the
    weight of the odds-ratio term beside the chosen side's NLL. ORPO has no reference model."""

    LOG_COLUMNS: ClassVar[tuple[str, ...]] = ("rewards/chosen", "rewards/rejected", "rewards/margins",
                                              "rewards/accuracies", "nll_loss", "log_odds_ratio")


@dataclass
class KTOSettings(PreferenceSettings):
    """trl ``KTOConfig`` fields: unpaired rows (prompt, completion, label true/false)."""

    LOG_COLUMNS: ClassVar[tuple[str, ...]] = ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl")

    loss_type: str = setting("kto", help="trl's KTO loss (kto, or apo_zero_unpaired).", choices=KTO_LOSS_TYPES)
    desirable_weight: float = setting(1.0, help="Weight of desirable (label true) rows' losses.", minimum=0,
                                      low_open=True, what="a positive number")
    undesirable_weight: float = setting(1.0, help="Weight of undesirable (label false) rows' losses.", minimum=0,
                                        low_open=True, what="a positive number")


#: The settings section of each method (SFT has none beyond ``training``); its name in the run
#: config is the method's.
METHOD_SETTINGS: dict[str, type] = {"dpo": DPOSettings, "orpo": ORPOSettings, "kto": KTOSettings}
#: What each method's ``train.log`` rows carry beside loss, eval_loss, learning_rate, grad_norm
#: and tokens_per_s (trl's log names, in ``TrainLog.metrics``).
METHOD_LOG_COLUMNS: dict[str, tuple[str, ...]] = {"sft": (), **{m: c.LOG_COLUMNS for m, c in METHOD_SETTINGS.items()}}


@dataclass
class RunConfig:
    """A whole run, as plain data (sections are dicts of the classes above). ``method``: one of
    ``TRAINING_METHODS``; the preference methods' settings are in the section of their name
    (``dpo``: :class:`DPOSettings`, ``orpo``, ``kto``)."""

    model: dict[str, Any]
    data: dict[str, Any]
    lora: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    version: int = RUN_CONFIG_VERSION
    method: str = "sft"
    dpo: dict[str, Any] = field(default_factory=dict)
    orpo: dict[str, Any] = field(default_factory=dict)
    kto: dict[str, Any] = field(default_factory=dict)


@request("train.presets")
class TrainPresets:
    """``{"presets": {name: {"lora": ..., "training": ..., "model": {precision fields}}, ...},
    "defaults": RunConfig-like dict}``: the QLoRA paper's recipe (nf4, double quant, bf16
    compute, r=16, lora_alpha=16, dropout 0.05, lr 2e-4, paged_adamw_8bit) and a fast
    small-GPU preset."""


@request("train.validate")
class ValidateRun:
    """Check a run config without starting it: ``{"ok": bool, "errors": {"lora.r": "...", ...},
    "warnings": {...}, "config": normalised config, "trainable_params", "total_params",
    "trainable_percent" (as peft counts them, for the held base model or from config.json),
    "memory": {"total_bytes", "free_bytes", "verdict", "parts": {...}}, "total_steps"}``."""

    config: dict[str, Any]


@request("train.start")
class StartTraining:
    """Job: train ``config`` (a :class:`RunConfig` dict) with its method's trl trainer (``SFTTrainer``,
    ``DPOTrainer``, ``ORPOTrainer`` or ``KTOTrainer``: ``backend/methods/``) and peft on
    the held base model (loaded first if it is not the one the config names) and the prepared
    dataset. ``resume_from``: a checkpoint folder of this or an earlier session. Refused with
    the field errors (result ``{"errors": {...}}``) when the config is invalid. The job's
    cancel is a graceful stop: a checkpoint is saved first."""

    config: dict[str, Any]
    resume_from: str = ""


@request("train.checkpoints")
class ListCheckpoints:
    """Checkpoints to resume from: ``{"checkpoints": [{"session", "step", "path", "created",
    "loss"}, ...]}``, newest first (all sessions when ``session`` is empty)."""

    session: str = ""


@request("train.export")
class ExportRunConfig:
    """Write ``config`` as TOML to ``path`` (a file the user named; an existing one only with
    ``overwrite``): ``{"path": ...}``."""

    config: dict[str, Any]
    path: str
    overwrite: bool = False


@request("train.import")
class ImportRunConfig:
    """Read a TOML run config: ``{"config": ..., "errors": {...}}`` (errors keyed by field,
    with the file's line where known)."""

    path: str


@event("train.started")
class TrainStarted:
    """A run began: its config, the step count, and the trainable parameters as peft counts."""

    job_id: str
    config: dict[str, Any]
    total_steps: int
    trainable_params: int
    total_params: int
    output_dir: str
    resumed_from: str = ""
    start_step: int = 0


@event("train.log")
class TrainLog:
    """One row of the loss table: one per logging step, training and evaluation logs of the same
    step merged (a later ``train.log`` of the same step completes the row). ``tokens_per_s``
    counts non-padding tokens."""

    job_id: str
    step: int
    total_steps: int
    epoch: float
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None
    #: Non-padding training tokens seen so far in this run (issue 18: curves by tokens).
    tokens_seen: float | None = None
    #: The method's own columns (``METHOD_LOG_COLUMNS``, trl's names: ``rewards/margins``), and
    #: their validation values as ``eval_<name>``.
    metrics: dict[str, Any] = field(default_factory=dict)


@event("train.checkpoint")
class TrainCheckpoint:
    """A checkpoint was saved (adapter, optimizer, scheduler, trainer state)."""

    job_id: str
    step: int
    path: str


@event("train.alert")
class TrainAlert:
    """Something the user must see at once: ``kind`` ``nan``/``inf`` (the loss), ``oom`` (CUDA out
    of memory: the run stopped cleanly), with what happened, at which step, and what to change."""

    job_id: str
    kind: str
    step: int
    message: str
    hint: str = ""
    memory: dict[str, Any] = field(default_factory=dict)


@event("train.finished")
class TrainFinished:
    """A run ended: ``status`` done/stopped/failed, the final losses, the adapter folder
    (safetensors), the last checkpoint, peak memory and throughput."""

    job_id: str
    status: str
    step: int
    total_steps: int
    final_loss: float | None = None
    final_eval_loss: float | None = None
    adapter_path: str = ""
    checkpoint_path: str = ""
    elapsed_s: float = 0.0
    tokens_per_s: float | None = None
    peak_memory: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Encoding, decoding, validation.

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        names = {f.name for f in dataclasses.fields(cls)}  # excludes ClassVars
        hints = {k: v for k, v in typing.get_type_hints(cls).items() if k in names}
        _HINTS[cls] = hints
    return hints


def _matches(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        tp = origin
    if tp is dict:
        return isinstance(value, dict)
    if tp is list:
        return isinstance(value, list)
    return isinstance(value, tp)


def build(cls: type, data: Any, what: str):
    """Construct dataclass ``cls`` from a JSON object, checking names and types.

    Raises :class:`ProtocolError` (``bad_message``) saying which field is wrong and why.
    """
    if not isinstance(data, dict):
        raise ProtocolError(BAD_MESSAGE, f"{what}: expected an object, got {type(data).__name__}")
    hints = _hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ProtocolError(BAD_MESSAGE, f"{what}: unknown field(s) {', '.join(unknown)}")
    for f in dataclasses.fields(cls):
        name = f.name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(BAD_MESSAGE, f"{what}: missing field {name!r}")
            continue
        if not _matches(data[name], hints[name]):
            raise ProtocolError(
                BAD_MESSAGE,
                f"{what}: field {name!r} must be {_type_name(hints[name])}, got {data[name]!r:.60}",
            )
    return cls(**data)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass instance as plain JSON-able data (shallow: fields are already JSON data)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def encode(msg: Any) -> bytes:
    """One envelope as a wire line."""
    data = {"type": msg.TYPE, **to_dict(msg)}
    line = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=True)  # a NaN loss must still be reported
    return line.encode("utf-8") + b"\n"


def decode(line: bytes | str):
    """A wire line as an envelope; :class:`ProtocolError` if it is not a valid one.

    Requests keep ``params`` as a dict (check them with :func:`request_params`), so that a bad
    parameter can be answered with the request's own id.
    """
    if isinstance(line, bytes):
        if len(line) > MAX_MESSAGE_BYTES:
            raise ProtocolError(TOO_LARGE, f"message of {len(line)} bytes exceeds {MAX_MESSAGE_BYTES}")
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(BAD_JSON, f"message is not UTF-8: {exc}") from None
    try:
        data = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(BAD_JSON, f"message is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(BAD_MESSAGE, "message must be a JSON object")
    kind = data.pop("type", None)
    cls = ENVELOPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(UNKNOWN_TYPE, f"unknown message type {kind!r:.40}", _id_of(data))
    try:
        return build(cls, data, kind)
    except ProtocolError as exc:
        exc.request_id = _id_of(data)
        raise


def _id_of(data: dict) -> str | None:
    rid = data.get("id")
    return rid if isinstance(rid, str) else None


def request_params(req: Request):
    """The typed parameters of ``req``; :class:`ProtocolError` for an unknown method or bad
    parameters (with the request's id, so the error reply can name it)."""
    cls = REQUESTS.get(req.method)
    if cls is None:
        raise ProtocolError(UNKNOWN_METHOD, f"unknown method {req.method!r:.60}", req.id)
    try:
        return build(cls, req.params, req.method)
    except ProtocolError as exc:
        exc.request_id = req.id
        raise


def make_request(request_id: str, params: Any) -> Request:
    """A :class:`Request` from a typed parameters object such as ``Ping()``."""
    return Request(id=request_id, method=params.METHOD, params=to_dict(params))


def event_payload(ev: Event):
    """The typed payload of ``ev``, or ``None`` for a kind this side does not know (newer peers
    may send kinds an older client ignores)."""
    cls = EVENTS.get(ev.kind)
    if cls is None:
        return None
    return build(cls, ev.payload, ev.kind)


# --------------------------------------------------------------------------------------------
# Chat and evaluation (backend/chat.py, backend/evaluate.py, tui/widgets/chat/).
#
# A *target* is a string id: ``"base"`` (the held base model, adapter switched off),
# ``"tuned:<adapter folder>"`` (the held base with that adapter switched on: a session's adapter
# or a checkpoint) or ``"merged:<folder>"`` (a merged model folder, loaded on its own). Base and
# tuned share ONE loaded base: the adapter is switched on and off, never a second copy.

#: What a target id starts with.
CHAT_TARGET_KINDS = ("base", "tuned", "merged")
#: Why an answer ended.
CHAT_FINISH_REASONS = ("eos", "length", "stopped", "error")
#: Formats of ``chat.export`` and ``eval.export``.
CHAT_EXPORT_FORMATS = ("markdown", "jsonl")
EVAL_EXPORT_FORMATS = ("markdown", "csv")


@dataclass
class ChatSettings:
    """How an answer is generated (transformers' ``generate`` names). ``template``: ``auto`` (the
    run's data template when the adapter's session has one, else the tokenizer's chat template),
    or one of ``DATA_TEMPLATES``. ``system_prompt`` empty: the run's own system prompt, if any."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    do_sample: bool = True
    seed: int = 0
    system_prompt: str = ""
    template: str = "auto"


@request("chat.targets")
class ChatTargets:
    """What can be talked to: ``{"targets": [{"id", "label", "kind", "path", "session", "step",
    "base_source", "loaded"}], "base_loaded", "base_source", "fast_path"}`` (the base, every
    adapter and checkpoint of the data home, and merged folders)."""


@request("chat.load")
class ChatLoad:
    """Job: make ``target`` ready (load the base if needed, from the adapter's run config; attach
    the adapter; or load the merged folder, in the dtype it was saved in when it fits beside the
    base); result ``{"target", "load_s", "fast_path", "path"}`` plus ``steps`` (seconds: base,
    adapter, fast path) for base and tuned, ``precision`` and ``note`` for a merged folder."""

    target: str


@request("chat.send")
class ChatSend:
    """Job: answer ``messages`` (the whole conversation, ending with the new user turn) with
    ``target`` (and then ``compare_with``, when given) under ``settings`` (:class:`ChatSettings`
    fields). Accepted with ``{"job_id", "session", "answer_ids"}``; refused while another job
    (e.g. training) holds the GPU. Stop with ``job.cancel``. Events: ``chat.started``, several
    ``chat.delta``, ``chat.answer`` per target."""

    target: str
    messages: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    compare_with: str = ""
    conversation: str = ""


@request("chat.clear")
class ChatClear:
    """Start a new conversation: ``{"conversation": new id}``."""

    conversation: str = ""


@request("chat.export")
class ChatExport:
    """Write a conversation's transcript (``conversation`` empty: the current one) as Markdown or
    JSONL (``CHAT_EXPORT_FORMATS``): ``{"path", "answers": n}``. A relative ``path`` is under
    ``<home>/exports`` (and may not leave it); an existing file is refused with code ``confirm``
    unless ``overwrite``."""

    path: str
    format: str = "markdown"
    conversation: str = ""
    overwrite: bool = False


@request("eval.run")
class EvalRun:
    """Job: evaluate ``targets`` on the same inputs: size on disk, load time, generation time
    (mean and std over ``runs`` runs of ``prompts``; empty: a built-in set), peak memory, and
    perplexity on ``text_path`` (empty: the validation split of the target's run). One
    ``eval.row`` per target; result ``{"rows": [...], "markdown"}``."""

    targets: list[str]
    prompts: list[str] = field(default_factory=list)
    runs: int = 3
    max_new_tokens: int = 64
    text_path: str = ""


@request("eval.export")
class EvalExport:
    """Write the last evaluation's rows as Markdown or CSV (``EVAL_EXPORT_FORMATS``): ``{"path"}``.
    The path rules of ``chat.export`` apply (under ``<home>/exports``; ``overwrite`` to replace)."""

    path: str
    format: str = "markdown"
    overwrite: bool = False


@event("chat.started")
class ChatStarted:
    """An answer began: the prompt's token count and the settings in force."""

    answer_id: str
    conversation: str
    target: str
    prompt_tokens: int
    settings: dict[str, Any]
    time: float
    #: The conversation sent (so a transcript can be redrawn from events alone).
    messages: list[dict[str, Any]] = field(default_factory=list)
    template: str = ""


@event("chat.delta", ephemeral=True)
class ChatDelta:
    """New text of an answer since the last delta, coalesced (at least ~50 ms apart)."""

    answer_id: str
    text: str


@event("chat.answer")
class ChatAnswer:
    """An answer ended: its whole (cleaned) text, tokens, time to first token, tokens/s,
    ``finish_reason`` (``CHAT_FINISH_REASONS``) and ``path``: ``fast`` (the bf16 decode copy,
    compiled with a static cache) or ``plain`` (the loaded model, with peft for an adapter)."""

    answer_id: str
    conversation: str
    target: str
    prompt: str
    text: str
    tokens: int
    ttft_s: float
    tokens_per_s: float
    elapsed_s: float
    stopped: bool
    finish_reason: str
    path: str
    error: str = ""


@event("eval.row")
class EvalRow:
    """One target's evaluation figures (``None`` where not measured)."""

    target: str
    label: str
    size_bytes: int | None
    load_s: float | None
    gen_mean_s: float | None
    gen_std_s: float | None
    tokens_per_s: float | None
    peak_bytes: int | None
    perplexity: float | None
    ppl_tokens: int
    runs: int
    device: str
    path: str = ""
    note: str = ""


# --------------------------------------------------------------------------------------------
# Merge and upload (backend/merge.py, backend/hub.py, tui/widgets/merge/).
#
# An adapter (a session's final adapter or a checkpoint, see backend/adapters.py) is merged into
# its base model in a precision (never 4-bit) and saved as a plain transformers folder; the folder
# can be checked against the model as trained and uploaded to the Hugging Face Hub. The Hub token
# is read where huggingface_hub keeps it and never appears in any message.

MERGE_DTYPES = ("bf16", "fp16", "fp32")
#: "dequantized": the base as the adapter saw it in QLoRA training (its 4-bit weights dequantised
#: to the merge dtype), the default for an adapter trained on a 4-bit base; "original": the base's
#: full-precision weights from its folder.
MERGE_INTO = ("dequantized", "original")


@request("merge.adapters")
class MergeAdapters:
    """Adapters to merge: ``{"adapters": [...]}``, each as ``backend.adapters.list_adapters``
    gives it (``path``, ``session``, ``kind`` adapter/checkpoint, ``step``, ``base_model``, ``r``,
    ``lora_alpha``, ``target_modules``, ``size_bytes``, ``mtime``, ``run_config`` (the run's
    config.toml path), ``method`` (its training method; "sft" when unknown), ``final_loss``), newest first."""


@request("merge.plan")
class MergePlan:
    """What a merge will take, without loading anything: ``{"adapter": inspect_adapter dict,
    "base": {"source", "precision" (as trained), "precision_label", "path", "parameters"},
    "into_default", "device" ("cuda:0" or "cpu": the GPU when the merged model fits), "memory":
    {"need_bytes", "free_bytes", "verdict"}, "disk": {"need_bytes", "free_bytes"}, "out" (absolute:
    a relative ``out`` is under the data home's merged/), "out_exists", "warnings": [str]}``."""

    adapter: str
    out: str
    dtype: str = "bf16"
    into: str = "dequantized"
    max_shard_size: str = "5GB"


@request("merge.start")
class StartMerge:
    """Job: load the base again (``into``, ``dtype``), merge the adapter, save to ``out`` through a
    temporary folder renamed into place when complete (safetensors in shards of
    ``max_shard_size``, tokenizer and chat template, generation config, README.md model card),
    then verify (``verify``) on ``prompts`` (built-in ones when empty). Refused with code
    ``confirm`` when ``out`` exists and ``overwrite`` is false. Progress stages: ``loading base``,
    ``attaching adapter``, ``merging`` (layers), ``saving`` (bytes), ``model card``,
    ``verifying``. Result: ``{"out", "files": [{"name", "size_bytes"}], "size_bytes", "merge_s",
    "save_s", "verify": merge.verified payload or None}``."""

    adapter: str
    out: str
    dtype: str = "bf16"
    into: str = "dequantized"
    max_shard_size: str = "5GB"
    verify: bool = True
    overwrite: bool = False
    prompts: list[str] = field(default_factory=list)


@request("merge.verify")
class VerifyMerge:
    """Job: the verification table of a merged folder ``out`` against ``adapter`` (its base as
    trained + adapter, and the full-precision base + adapter), computed in ``dtype``; ends with
    ``merge.verified``."""

    out: str
    adapter: str
    dtype: str = "fp32"
    prompts: list[str] = field(default_factory=list)


@request("hub.status")
class HubStatus:
    """``{"offline", "endpoint", "token_source": "HF_TOKEN" | "login" | None, "user": str | None}``;
    never the token itself."""


@request("hub.push")
class HubPush:
    """Job: upload ``folder`` (a merged model; with ``adapter_only``, an adapter folder or the
    adapter files only) to the Hub repository ``repo_id`` (created if missing, private unless
    ``private`` is false); ``dry_run`` lists exactly what would be uploaded, sending nothing.
    Progress by bytes. Result: ``{"repo_id", "url", "private", "files": [{"path", "size_bytes"}],
    "dry_run"}``. Refused offline (HF_HUB_OFFLINE=1: local export only) and without a token (how
    to log in)."""

    folder: str
    repo_id: str
    private: bool = True
    adapter_only: bool = False
    dry_run: bool = False
    commit_message: str = ""


@event("merge.saved")
class MergeSaved:
    """The merged model is complete in ``out``: its files, total size, and the merge and save
    times."""

    out: str
    files: list[dict[str, Any]]
    size_bytes: int
    merge_s: float
    save_s: float
    dtype: str
    into: str
    device: str = ""
    how: str = ""


@event("merge.verified")
class MergeVerified:
    """The verification table: ``rows`` of ``{"model": "merged" | "trained (4-bit base + adapter)"
    | "full-precision base + adapter", "max_abs_logit_diff" (vs the model as trained; None for it),
    "max_abs_logit_diff_vs_full", "perplexity", "size_bytes", "load_s"}``; ``noise_floor``: max
    |logit diff| of the same base in the merge dtype vs fp32; ``prompts``: how many."""

    out: str
    dtype: str
    rows: list[dict[str, Any]]
    noise_floor: float
    prompts: int
    merge_dtype: str = ""
    device: str = ""


@event("hub.pushed")
class HubPushed:
    """An upload finished (or, with ``dry_run``, what it would have sent)."""

    repo_id: str
    url: str
    private: bool
    files: list[dict[str, Any]]
    dry_run: bool = False
    size_bytes: int = 0
    commit_url: str = ""
    offline: bool = False
    token_source: str | None = None


# --------------------------------------------------------------------------------------------
# The front end's state (backend/ui_state.py, tui/ui_state.py).
#
# What a user typed or chose in a pane (the LoRA form, the open dataset and its mapping, the chat
# targets and settings, the merge wizard's step, the tab last shown, ...) belongs to the backend,
# not to one terminal: each pane keeps its state under one key (``"lora"``, ``"data"``, ...) as
# plain data, sends it with ``ui.set`` when it changes (coalesced: at most a few a second while
# typing), and the backend stores it in the data home's store and broadcasts it as ``ui.changed``.
# On ``attach`` the backend sends every key as ``ui.changed`` with ``replay`` set (after the
# session's events, so that the state wins over what the replay drew), then the live changes of
# every client: a second terminal, a terminal that re-attaches after a dropped connection and one
# started after a backend restart all show the same values. The last writer wins, per key.

#: A key: lower-case words joined by ``.``, ``-`` or ``_`` (``"lora"``, ``"chat"``, ``"shell.tab"``).
UI_KEY_PATTERN = r"^[a-z][a-z0-9_.-]{0,63}$"
#: The most keys the backend keeps, and the largest value (as JSON) one key may hold.
UI_MAX_KEYS = 64
UI_MAX_VALUE_BYTES = 256 * 1024


@request("ui.set")
class SetUiState:
    """Set the front end's state under ``key`` to ``value`` (plain JSON data; the last writer
    wins). ``origin`` names the client instance that set it, so that it can tell its own changes
    from another terminal's. The reply: ``{"rev": n}``, the revision the value got (one counter
    over all keys). Refused for a key that does not match ``UI_KEY_PATTERN``, a value over
    ``UI_MAX_VALUE_BYTES`` or a new key beyond ``UI_MAX_KEYS``."""

    key: str
    value: Any
    origin: str = ""


@request("ui.get")
class GetUiState:
    """Every key of the front end's state: ``{"state": {key: {"value", "rev", "time",
    "origin"}}}`` (for tools and tests; an attached client gets them as ``ui.changed``)."""


@event("ui.changed")
class UiChanged:
    """The front end's state under ``key`` is ``value`` (revision ``rev``, set by client
    ``origin`` at ``time``). Sent live to every attached client when a client sets it, and for
    every key after the replay of ``attach`` (``replay`` true). Kept in the store's own table,
    never among a session's events: the state outlives sessions."""

    key: str
    value: Any
    rev: int
    time: float
    origin: str = ""
    replay: bool = False


# --------------------------------------------------------------------------------------------
# GGUF and Ollama export (backend/export.py, backend/gguf_convert.py, backend/ollama.py; the
# Merge wizard's Export step). A merged folder (or an adapter, merged first) becomes one GGUF file
# with its tokenizer, chat template and stop tokens, optionally an Ollama Modelfile beside it, and
# is checked against the merged model it came from.

#: f16/bf16/q8_0 are written in Python (gguf); q4_k_m/q5_k_m need llama-cpp-python (``qlw[gguf]``).
EXPORT_LEVELS = ("f16", "bf16", "q8_0", "q4_k_m", "q5_k_m")


@request("export.plan")
class ExportPlan:
    """What an export will take, without loading a model: ``{"model": {"kind": "merged" |
    "adapter", "path", "merged_folder", "architecture", "gguf_architecture", "parameters"},
    "quant", "out" (the .gguf path), "out_exists", "modelfile" (path or ""), "disk": {"need_bytes",
    "free_bytes"}, "size_bytes" (the file's estimated size), "llama_cpp" (the extra installed),
    "refusal" (why it cannot run, "" when it can), "warnings": [str]}``. ``out``: a .gguf path, or
    a folder (the file is named after the model and level); relative paths are under the data
    home's exports/; empty: exports/<model>-<level>.gguf."""

    model: str
    out: str = ""
    quant: str = "q8_0"
    ollama: bool = True


@request("export.start")
class StartExport:
    """Job: (an adapter is merged first, as ``merge.start`` does, into merged/) write the GGUF at
    ``quant`` through a temporary file renamed into place, the Modelfile beside it with
    ``ollama``, then verify with ``verify`` (``export.verified``). Refused with code ``confirm``
    when the file exists and ``overwrite`` is false, and with the command that adds the extra for
    a k-quant without llama-cpp-python. Progress stages: the merge's, ``writing`` (tensors),
    ``quantizing``, ``modelfile``, ``verifying``. Result: ``{"path", "size_bytes", "quant",
    "modelfile", "merged_folder", "verify": export.verified payload or None}``."""

    model: str
    out: str = ""
    quant: str = "q8_0"
    ollama: bool = True
    verify: bool = True
    overwrite: bool = False
    prompts: list[str] = field(default_factory=list)


@event("export.saved")
class ExportSaved:
    """The GGUF is complete at ``path`` (and the Modelfile, when asked): size, time, notes (e.g.
    tensors kept in f16)."""

    path: str
    size_bytes: int
    quant: str
    write_s: float
    tensors: int = 0
    modelfile: str = ""
    merged_folder: str = ""
    notes: list[str] = field(default_factory=list)


@event("export.verified")
class ExportVerified:
    """The GGUF read back (transformers' ``gguf_file=`` path, dequantised) against the merged
    model: ``rows`` of ``{"model": "merged" | "gguf <level>", "perplexity", "max_abs_logit_diff",
    "top1_agreement", "greedy_same", "size_bytes"}``; ``noise_floor``: max |logit diff| of the
    merged model with its matrices rounded to ``noise_dtype`` (what a 16-bit file costs at best);
    ``checks``: ``{"chat_template", "eos", "conversation_tokens", "modelfile_template"}`` each
    true/false (or None when not applicable); ``texts``: where the perplexity rows came from."""

    path: str
    quant: str
    rows: list[dict[str, Any]]
    noise_floor: float
    noise_dtype: str
    checks: dict[str, Any]
    texts: str = ""
    prompts: int = 0
    dtype: str = "fp32"


# Issue 18: the runs ledger (runs.*) and run notices register themselves from their own module.
from backend import protocol_runs as _protocol_runs  # noqa: E402,F401
