"""The protocol's core: version and limits, error codes, the rendezvous (data home and socket),
the envelopes (:class:`Hello`, :class:`Welcome`, :class:`Request`, :class:`Reply`, :class:`Event`),
the request/event registries that the room modules fill with their decorators, and the
:func:`setting` helpers that carry a setting's catalogue entry as field metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
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


# --------------------------------------------------------------------------------------------
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

