"""A fuzz test of the protocol (issue 9): random and mutated messages against a real backend.

For a bounded time (``QLW_FUZZ_SECONDS``, 20 s by default) hypothesis sends batches of lines on
one connection: JSON objects with random fields and wrong types, valid requests with mutated
parameters (huge numbers, NaN, unicode, lone surrogates, deep nesting), truncated lines, random
bytes, envelopes a client may not send. After every batch a second connection must get its ping
answered; at the end the backend still runs, the store passes ``PRAGMA integrity_check`` and
every session replays with gap-free sequence numbers.

Requests that would do real work, write where a message says (``train.export``) or stop the
backend are left out: their parameters are covered by the typed decoding that every request
goes through before any handler runs, which the fuzz exercises with the other methods' names.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from backend import protocol as P
from sessions.store import Store
from tests.conftest import start_backend, stop_backend

SECONDS = float(os.environ.get("QLW_FUZZ_SECONDS", "20"))

#: Methods the fuzz may call with random parameters: quick, and writing only into the store.
SAFE_METHODS = sorted(m for m in P.REQUESTS if m in {
    "ping", "status", "attach", "sessions.list", "sessions.new", "job.cancel", "gpu.history", "gpu.interval",
    "data.page", "data.row", "data.preview", "model.options", "model.inspect", "train.presets",
    "train.checkpoints", "train.import", "chat.targets", "merge.adapters", "hub.status",
})
FIELDS = sorted({f for m in SAFE_METHODS for f in P._hints(P.REQUESTS[m])} | {"id", "type", "method", "params"})

EDGE = st.sampled_from([10 ** 400, -(10 ** 400), 2 ** 63, -1, 0, 1e308, -1e308, float("inf"), float("nan"),
                        "", "\ud800", "\x00", "\u202e", "𝕏" * 300, "../../..", "/etc/passwd", True, None])
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40) | EDGE
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5)
                      | st.dictionaries(st.text(max_size=10) | st.sampled_from(FIELDS), inner, max_size=5),
                      max_leaves=20)


def _dumps(obj, ascii_only: bool) -> bytes:
    text = json.dumps(obj, ensure_ascii=ascii_only, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def requests(draw) -> bytes:
    """A request envelope: a safe method (or a random name), parameters with real and random
    field names, values of any type."""
    method = draw(st.sampled_from(SAFE_METHODS) | st.text(max_size=20))
    known = sorted(P._hints(P.REQUESTS[method])) if method in P.REQUESTS else []
    params = draw(st.dictionaries(st.sampled_from(known) if known else st.text(max_size=8), VALUES, max_size=4)
                  | VALUES)
    msg = {"type": draw(st.sampled_from(["request", "request", "hello", "event", "reply", "welcome"]) | st.text()),
           "id": draw(st.text(max_size=12) | VALUES), "method": method, "params": params}
    for key in draw(st.lists(st.sampled_from(list(msg)), max_size=2)):
        msg.pop(key, None)
    return _dumps(msg, draw(st.booleans()))


@st.composite
def mutated(draw) -> bytes:
    """A valid request's line, cut, with bytes flipped or inserted."""
    line = bytearray(draw(requests()))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["cut", "flip", "insert"]))
        if not line:
            break
        i = draw(st.integers(0, len(line) - 1))
        if op == "cut":
            del line[i:]
        elif op == "flip":
            line[i] = draw(st.integers(0, 255))
        else:
            line[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(line)


LINES = st.one_of(
    requests(), mutated(), st.binary(max_size=300), VALUES.map(lambda v: _dumps(v, True)),
    st.integers(1, 200).map(lambda n: b"[" * (n * 50)), st.just(b""),
)
BATCHES = st.lists(st.tuples(LINES, st.booleans()), min_size=1, max_size=6)  # (line, ends with a newline?)


class Raw:
    """A plain socket that speaks lines; reconnects when the backend drops it."""

    def __init__(self, path, name: str):
        self.path, self.name = path, name
        self.sock: socket.socket | None = None
        self.buf = b""
        self.reconnects = -1

    def connect(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(self.path))
        self.buf = b""
        self.reconnects += 1
        self.send(P.encode(P.Hello(P.PROTOCOL_VERSION, self.name)))

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def drain(self) -> bool:
        """Read what has arrived; False if the backend closed this connection."""
        self.sock.setblocking(False)
        try:
            while True:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    return False
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            self.sock.settimeout(10)

    def call(self, request_id: str, params) -> dict:
        """Send one request and wait for its reply (events and other replies are skipped)."""
        self.sock.sendall(P.encode(P.make_request(request_id, params)))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                msg = json.loads(line)
                if msg.get("type") == "reply" and msg.get("id") == request_id:
                    return msg
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise AssertionError("the backend closed the control connection")
            self.buf += chunk
        raise AssertionError(f"no reply to {request_id} within 10 s")


@pytest.fixture
def fuzzed(qlw_home):
    proc = start_backend(qlw_home)
    yield qlw_home, proc
    stop_backend(proc)


def test_random_and_mutated_messages_never_stop_the_backend(fuzzed):
    home, proc = fuzzed
    path = P.socket_path(home)
    fuzz, control = Raw(path, "fuzz"), Raw(path, "control")
    fuzz.connect()
    control.connect()
    control.call("s0", P.NewSession(name="fuzz"))
    # Lines found to hurt once (a lone surrogate dropped the client, and in a job's parameters would
    # have left the job runner "busy" for good): each gets its error reply, the connection stays.
    nasty = [b'{"type":"request","id":"n1","method":"ping","params":{"payload":"\\ud800"}}',
             b'{"type":"request","id":"n2","method":"sessions.new","params":{"name":"a\\udfffb"}}',
             b'{"type":"request","id":"n3","method":"data.open","params":{"source":{"path":"\\udc80"}}}',
             b'{"type":"request","id":"n4","method":"ping","params":{"payload":"\\ud83d\\ude00"}}',
             b"[" * 100_000, b"x" * (P.MAX_MESSAGE_BYTES + 10), b"\xff\xfe{}"]
    for line in nasty:
        probe = Raw(path, "nasty")
        probe.connect()
        probe.call("w", P.Ping("hello first"))
        probe.send(line + b"\n")
        reply = probe.call("after", P.Ping("still"))  # the connection stays, and answers
        assert reply["status"] == "ok", (line[:80], reply)
        probe.sock.close()
    stats = {"batches": 0, "lines": 0, "pings": 0, "slowest_ping_ms": 0.0}
    deadline = time.monotonic() + SECONDS

    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(batch=BATCHES)
    def round_(batch):
        if time.monotonic() > deadline:
            return
        data = b"".join(line + (b"\n" if nl else b"") for line, nl in batch) + b"\n"
        if not fuzz.send(data) or not fuzz.drain():
            # Only a hello with another protocol version closes a connection (after its error reply);
            # anything else is answered with an error and the connection stays.
            assert b"hello" in data, f"the backend dropped a client for: {data[:300]!r}"
            fuzz.connect()
        stats["batches"] += 1
        stats["lines"] += len(batch)
        t = time.perf_counter()
        reply = control.call(f"p{stats['pings']}", P.Ping(str(stats["pings"])))
        stats["slowest_ping_ms"] = max(stats["slowest_ping_ms"], (time.perf_counter() - t) * 1000)
        assert reply["status"] == "ok" and reply["result"]["payload"] == str(stats["pings"])
        stats["pings"] += 1
        assert proc.poll() is None, "the backend died"

    while time.monotonic() < deadline:
        round_()
    assert stats["batches"] > 20, stats
    # A job may have been started by a fuzzed line (none of the safe methods starts one; check).
    status = control.call("st", P.Status())
    assert status["status"] == "ok" and status["result"]["pid"] == proc.pid
    print(f"\nfuzz: {stats['batches']} batches, {stats['lines']} lines in {SECONDS:g} s; "
          f"{fuzz.reconnects} reconnects; slowest ping {stats['slowest_ping_ms']:.1f} ms")

    # The store is sound and every session replays whole.
    store = Store(home / "sessions.db")
    assert store.integrity_check() == "ok"
    sessions = store.list_sessions(10_000)
    store.close()
    assert sessions
    rng = random.Random(0)
    for info in rng.sample(sessions, min(20, len(sessions))):
        reply = control.call(f"a-{info.id}", P.Attach(session=info.id, since=0))
        assert reply["status"] == "ok", reply
        assert reply["result"]["last_seq"] == info.last_seq
    assert proc.poll() is None
