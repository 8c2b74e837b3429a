"""Encoding, decoding, validation: envelopes to wire lines and back, typed request parameters and
event payloads built from plain data with their names and types checked.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from backend.protocol.core import (
    BAD_JSON, BAD_MESSAGE, ENVELOPES, EVENTS, Event, MAX_MESSAGE_BYTES, ProtocolError, REQUESTS,
    Request, TOO_LARGE, UNKNOWN_METHOD, UNKNOWN_TYPE,
)


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

