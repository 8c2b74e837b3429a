"""Security (issue 9): only the owner reaches the backend, no TCP port, the Hugging Face token
never lands on disk or on the wire, paths from the protocol stay where they belong, and a
model's own Python code never runs unless trust_remote_code is set.

One backend serves the whole module (imports cost ~15 s per process here): it trains two steps
of the tiny model with ``HF_TOKEN`` set to a random secret and exports the run config; the
tests then look at what it left behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import stat
import sys
import tempfile
import time
from pathlib import Path

import pytest

from backend import protocol as P
from tests.backend.test_train import make_home, small_config
from tests.conftest import start_backend, stop_backend

pytestmark = pytest.mark.slow

TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


async def _wait(cond, timeout=150.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def served(tiny_folder):
    """(home, backend pid, token, everything the client received, replies of the path probes)."""
    from tui.client import Connection

    home = make_home(tiny_folder)
    token = "hf_" + secrets.token_hex(20)
    user_data = Path(home.parent / f"{home.name}-userdata")  # a folder the user named, outside the home
    user_data.mkdir()
    victim = Path(home.parent / f"{home.name}-victim")
    shutil.copy(Path(__file__).resolve().parents[2] / "backend" / "samples" / "dolly_sample.jsonl",
                user_data / "rows.jsonl")
    old = {k: os.environ.get(k) for k in TOKEN_VARS}
    os.environ.update({k: token for k in TOKEN_VARS})
    try:
        proc = start_backend(home)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    received: list[bytes] = []
    probes: dict[str, P.Reply] = {}

    async def flow():
        events: list = []
        conn = await Connection.open(P.socket_path(home), "security", events.append)
        await conn.call(P.Attach())
        config = small_config(max_steps=2)
        config["name"] = "../../escape-" + home.name  # a label: never a path
        config["data"]["source"]["path"] = str(user_data / "rows.jsonl")
        job = await conn.call(P.StartTraining(config=config))
        await _wait(lambda: any(e.kind == "job.finished" for e in events), what="the training run")
        end = next(e.payload for e in events if e.kind == "job.finished")
        assert end["status"] == "done", end
        probes["session"] = job["session"]
        adapter = end["result"]["adapter_path"]
        if "merge.start" in P.REQUESTS:  # merge and upload (backend/merge.py, backend/hub.py)
            StartMerge, n = P.REQUESTS["merge.start"], len(events)
            merged = await conn.call(StartMerge(adapter=adapter, out="merged-ok", dtype="fp32", verify=False))
            await _wait(lambda: any(e.kind == "job.finished" for e in events[n:]), what="the merge")
            probes["merge"] = next(e.payload for e in events[n:] if e.kind == "job.finished")
            probes["merge_job"] = merged
            probes["hub_status"] = await conn.request(P.REQUESTS["hub.status"]())
            probes["hub_push"] = await conn.request(P.REQUESTS["hub.push"](
                folder=str(home / "merged" / "merged-ok"), repo_id="someone/model", dry_run=True))
            if probes["hub_push"].status == "accepted":
                n = len(events)
                await _wait(lambda: any(e.kind == "job.finished" for e in events[n:]), what="the dry run")
            # A folder the user keeps other things in is not a merged model to replace.
            victim.mkdir()
            (victim / "notes.txt").write_text("mine")
            n = len(events)
            probes["merge_victim"] = reply = await conn.request(StartMerge(adapter=adapter, out=str(victim),
                                                                           dtype="fp32", verify=False, overwrite=True))
            if reply.status == "accepted":
                await _wait(lambda: any(e.kind == "job.finished" for e in events[n:]), what="the second merge")
        probes["export"] = await conn.request(P.ExportRunConfig(config=config, path=str(home / "configs" / "run.toml")))
        probes["export_up"] = await conn.request(P.ExportRunConfig(config=config, path="../../escape.toml"))
        probes["export_db"] = await conn.request(P.ExportRunConfig(config=config, path=str(home / "sessions.db"),
                                                                   overwrite=True))
        probes["import_up"] = await conn.request(P.ImportRunConfig(path="../../../etc/passwd"))
        probes["checkpoints_up"] = await conn.request(P.ListCheckpoints(session="../../.."))
        probes["attach_up"] = await conn.request(P.Attach(session="../x"))
        probes["status"] = await conn.request(P.Status())
        if "chat.export" in P.REQUESTS:  # a relative export path is under <home>/exports
            probes["chat_export_up"] = await conn.request(P.REQUESTS["chat.export"](
                path=f"../../chat-escape-{home.name}.md"))
        for e in events:
            received.append(P.encode(e))
        for r in probes.values():
            if isinstance(r, P.Reply):
                received.append(P.encode(r))
        await conn.close()

    try:
        asyncio.run(asyncio.wait_for(flow(), 240))
        yield home, proc.pid, token, received, probes, user_data
    finally:
        stop_backend(proc)
        for folder in (home, user_data, victim):
            shutil.rmtree(folder, ignore_errors=True)


def test_the_hf_token_is_never_written_nor_sent(served):
    home, _pid, token, received, probes, _ = served
    assert probes["export"].status == "ok"
    needle = token.encode()
    files = [p for p in home.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(files) > 20  # the store, the log, the run's checkpoint, adapter, config, the export
    assert (home / "backend-test.log").is_file()  # the backend's log (stdout and stderr)
    leaks = [str(p) for p in files if needle in p.read_bytes()]
    assert leaks == [], f"the token is in {leaks}"
    assert not any(needle in line for line in received), "the token went over the socket"


@pytest.mark.skipif("merge.start" not in P.REQUESTS, reason="backend/merge.py has not landed")
def test_merge_and_hub_keep_the_token_out_of_the_model_card_and_replies(served):
    home, _pid, token, received, probes, _ = served
    assert probes["merge"]["status"] == "done", probes["merge"]
    card = home / "merged" / "merged-ok" / "README.md"
    assert card.is_file() and token not in card.read_text(encoding="utf-8")
    status = probes["hub_status"]
    assert status.status == "ok" and status.result["token_source"] == "HF_TOKEN"
    assert token not in json.dumps(status.result) and probes["hub_push"].status in ("accepted", "refused")


@pytest.mark.skipif("merge.start" not in P.REQUESTS, reason="backend/merge.py has not landed")
def test_merge_overwrite_never_replaces_a_folder_that_is_not_a_model(served):
    home, _pid, _token, _received, probes, _ = served
    victim = Path(home.parent / f"{home.name}-victim")
    reply = probes["merge_victim"]
    assert (victim / "notes.txt").is_file(), f"merge.start replaced {victim} and the user's file in it ({reply})"
    assert reply.status == "refused"


@pytest.mark.skipif("chat.export" not in P.REQUESTS, reason="backend/chat.py has not landed")
def test_chat_export_cannot_leave_the_exports_folder(served):
    home, _pid, _token, _received, probes, _ = served
    escaped = home.parent / f"chat-escape-{home.name}.md"  # <home>/exports/../../
    try:
        assert not escaped.exists(), f"chat.export wrote {escaped}, outside {home / 'exports'}"
        assert probes["chat_export_up"].status == "refused"
    finally:
        escaped.unlink(missing_ok=True)


def test_only_the_owner_can_open_the_socket(served):
    home = served[0]
    sock = P.socket_path(home)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700
    assert os.stat(sock).st_uid == os.getuid()
    if os.geteuid() != 0:
        pytest.skip("needs root to try the socket as another user (uid 65534)")
    pid = os.fork()
    if pid == 0:  # the child: become nobody, then try to connect
        code = 3
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(sock))
                code = 1  # connected: the test fails
            except PermissionError:
                code = 0
            except OSError:
                code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "another user could reach the backend's socket"


def test_the_store_and_a_new_data_home_are_private(served, tmp_path):
    home = served[0]
    for name in ("sessions.db", "sessions.db-wal", "sessions.db-shm"):
        if (home / name).exists():
            assert stat.S_IMODE(os.stat(home / name).st_mode) == 0o600, name  # the WAL holds the newest events
    from backend.server import BackendServer

    fresh = Path(tempfile.mkdtemp(prefix="qlw-n-", dir="/tmp")) / "home"

    async def start_and_stop():
        server = BackendServer(fresh)
        await server.start()
        await server.shutdown(graceful=True)

    try:
        asyncio.run(asyncio.wait_for(start_and_stop(), 30))
        assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700
        modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in fresh.iterdir() if p.name.startswith("sessions.db")}
        assert modes and set(modes.values()) == {0o600}, modes
    finally:
        shutil.rmtree(fresh.parent, ignore_errors=True)


def test_a_socket_folder_prepared_by_someone_else_is_refused(tmp_path):
    """The socket's folder may be a short one under /tmp (long data home paths): another user could
    create it first, or plant a symlink there; the backend refuses both rather than listen in it."""
    from backend.server import ensure_private_dir

    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    with pytest.raises(RuntimeError, match="not a folder"):
        ensure_private_dir(link)
    if os.geteuid() != 0:
        pytest.skip("needs root to make a folder owned by another user")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o777)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(RuntimeError, match="belongs to uid 65534"):
        ensure_private_dir(theirs)
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    ensure_private_dir(mine)
    assert stat.S_IMODE(os.stat(mine).st_mode) == 0o700  # tightened


def test_the_backend_opens_no_network_port(served):
    psutil = pytest.importorskip("psutil")
    pid = served[1]
    proc = psutil.Process(pid)
    inet = [c for p in [proc, *proc.children(recursive=True)] for c in p.net_connections(kind="inet")]
    assert inet == [], f"the backend has network sockets: {inet}"
    unix = [c for c in proc.net_connections(kind="unix") if c.laddr]
    assert any(c.laddr == str(P.socket_path(served[0])) for c in unix)


def test_paths_from_the_protocol_stay_in_the_data_home_or_where_the_user_said(served):
    home, _pid, _token, _received, probes, user_data = served
    assert probes["export_up"].status == "refused" and "leads outside" in probes["export_up"].reason
    assert not (home.parent / "escape.toml").exists() and not (home / "escape.toml").exists()
    assert probes["export_db"].status == "refused" and "not a .toml file" in probes["export_db"].reason
    from sessions.store import Store

    store = Store(home / "sessions.db")  # still the store, not a TOML file
    assert store.integrity_check() == "ok"
    assert probes["import_up"].status == "refused"
    assert probes["checkpoints_up"].status == "refused" and "not a session id" in probes["checkpoints_up"].reason
    assert probes["attach_up"].status == "error"
    # The run's name is a label: its files are under runs/<session id>, nothing named after it.
    session = probes["session"]
    assert (home / "runs" / session / "adapter").is_dir()
    assert sorted(p.name for p in (home / "runs").iterdir()) == [session]
    assert not list(home.parent.glob("escape-*")) and not list(home.glob("escape-*"))
    assert store.get_session(session).config["name"].startswith("../../escape-")
    store.close()
    # The data source was read, never written beside (its caches live in the data home).
    assert sorted(p.name for p in user_data.iterdir()) == ["rows.jsonl"]


def test_session_ids_from_outside_cannot_name_a_folder_outside_runs(tmp_path):
    from backend import train
    from backend.jobs import JobError

    for bad in ("..", "../x", "a/b", "/etc", "", ".hidden", "x\x00y", "a/../../b"):
        with pytest.raises(JobError, match="not a session id"):
            train.run_dir(tmp_path, bad)
    assert train.run_dir(tmp_path, "20261123-140000-abcdef") == tmp_path / "runs" / "20261123-140000-abcdef"


def test_a_models_own_code_never_runs_without_trust_remote_code(tiny_folder, tmp_path):
    """A model folder whose config.json maps the auto classes to a .py file beside it: with
    trust_remote_code off (the default) the estimate and the load refuse it, and the file's
    code never runs (it would leave a marker)."""
    from backend import models
    from backend.jobs import JobError

    folder = tmp_path / "custom-model"
    shutil.copytree(tiny_folder, folder)
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('the model code ran')\n"
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (folder / name).write_text(code + "from transformers import LlamaConfig as EvilConfig, "
                                   "LlamaForCausalLM as EvilForCausalLM\n")
    raw = json.loads((folder / "config.json").read_text())
    raw.update(model_type="evil-llama", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                  "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (folder / "config.json").write_text(json.dumps(raw))
    settings = P.LoadModel(source=str(folder), precision="fp32", device="cpu")
    assert settings.trust_remote_code is False
    with pytest.raises(JobError, match="trust_remote_code is off"):
        models.estimate(settings)
    with pytest.raises(JobError, match="trust_remote_code is off"):
        models.load_base_model(settings)
    # A known model type with an auto_map is refused the same way (its code would replace the class).
    raw["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(JobError, match="trust_remote_code is off"):
        models.estimate(settings)
    assert not marker.exists(), "the model folder's own code ran without trust_remote_code"
    assert not any(m.endswith("_evil") for m in sys.modules)
