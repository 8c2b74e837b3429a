"""The protocol module alone: encoding, decoding, validation, rendezvous paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend import protocol as P


@pytest.mark.parametrize("msg", [
    P.Hello(P.PROTOCOL_VERSION, "test"),
    P.Welcome(1, "0.1.0", 123, 1.5, "/tmp/h"),
    P.Request("r1", "ping", {"payload": "x"}),
    P.Reply("r1", "ok", {"a": [1, 2]}),
    P.Reply("r2", "refused", reason="busy"),
    P.Event("diag.tick", {"job_id": "j", "n": 1, "total": 2, "sent": 0.5}, 1.0, "s1", 7),
    P.Event("log", {"level": "info", "message": "한국어 / 日本語"}, 2.0),
])
def test_round_trip(msg):
    line = P.encode(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert P.decode(line) == msg


def test_text_is_utf8_not_escaped():
    line = P.encode(P.Event("log", {"level": "info", "message": "日本語"}, 0.0))
    assert "日本語".encode() in line


def test_nan_loss_survives_the_wire():
    ev = P.decode(P.encode(P.Event("log", {"level": "info", "message": "x", "loss": float("nan")}, 0.0)))
    assert ev.payload["loss"] != ev.payload["loss"]


def test_typed_request_params():
    req = P.make_request("r9", P.Attach(session="s", since=4))
    assert req.method == "attach" and req.params == {"session": "s", "since": 4}
    params = P.request_params(P.decode(P.encode(req)))
    assert isinstance(params, P.Attach) and params.since == 4


@pytest.mark.parametrize("line, code", [
    (b"not json", P.BAD_JSON),
    (b"\xff\xfe{}", P.BAD_JSON),
    (b"[1, 2]", P.BAD_MESSAGE),
    (b'{"type": "nope"}', P.UNKNOWN_TYPE),
    (b'{"id": "r1", "method": "ping"}', P.UNKNOWN_TYPE),
    (b'{"type": "request", "method": "ping"}', P.BAD_MESSAGE),
    (b'{"type": "request", "id": 5, "method": "ping"}', P.BAD_MESSAGE),
    (b'{"type": "request", "id": "r", "method": "ping", "extra": 1}', P.BAD_MESSAGE),
    (b'{"type": "hello", "protocol": "1"}', P.BAD_MESSAGE),
])
def test_bad_lines(line, code):
    with pytest.raises(P.ProtocolError) as err:
        P.decode(line)
    assert err.value.code == code
    assert err.value.message


def test_oversized_line():
    with pytest.raises(P.ProtocolError) as err:
        P.decode(b"x" * (P.MAX_MESSAGE_BYTES + 1))
    assert err.value.code == P.TOO_LARGE


@pytest.mark.parametrize("method, params, fragment", [
    ("no.such", {}, "unknown method"),
    ("attach", {"since": "3"}, "'since' must be int"),
    ("attach", {"since": True}, "'since' must be int"),
    ("attach", {"sinse": 3}, "unknown field(s) sinse"),
    ("diag.burn", {"seconds": None}, "'seconds' must be float"),
])
def test_bad_params_name_the_field(method, params, fragment):
    with pytest.raises(P.ProtocolError) as err:
        P.request_params(P.Request("r5", method, params))
    assert fragment in err.value.message
    assert err.value.request_id == "r5"


def test_int_accepted_for_float_and_optional_none():
    assert P.request_params(P.Request("r", "diag.burn", {"seconds": 2})).seconds == 2
    assert P.request_params(P.Request("r", "attach", {"session": None})).session is None


def test_every_message_type_is_documented():
    for registry in (P.REQUESTS, P.EVENTS):
        for name, cls in registry.items():
            assert cls.__doc__ and "dataclass" not in cls.__doc__.split("(")[0], name


def test_unknown_event_kinds_are_tolerated():
    ev = P.decode(json.dumps({"type": "event", "kind": "future.kind", "payload": {}, "time": 0}))
    assert P.event_payload(ev) is None


def test_socket_path_short_home(tmp_path, monkeypatch):
    home = Path("/tmp/qlw-short")
    assert P.socket_path(home) == home / "run" / "backend.sock"


def test_socket_path_long_home_falls_back(monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    home = Path("/tmp/" + "deep/" * 30)
    path = P.socket_path(home)
    assert len(str(path).encode()) <= P.MAX_SOCKET_PATH_BYTES
    assert path != home / "run" / "backend.sock"
    assert P.socket_path(home) == path  # stable: client and server agree
    assert P.socket_path(Path("/tmp/" + "other/" * 30)) != path


def test_data_home_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QLW_HOME", str(tmp_path))
    assert P.data_home() == tmp_path.resolve()
