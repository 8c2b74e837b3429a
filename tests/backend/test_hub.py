"""Uploading (backend/hub.py) against a local stand-in for the Hub (tests/hubstub.py) on
127.0.0.1: what arrives (files, bytes, private flag), the dry run, adapter-only uploads, errors
for people (token refused, bad name, network, offline, no token), and that the token never
appears in any file under the data home (store, logs) nor in any event.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.waits import Budget

from backend import hub, protocol as P
from backend.jobs import JobError
from tests.conftest import ROOT
from tests.hubstub import HubStub

# The merge fixtures (tiny base, adapter with its run) for the end-to-end `qlw merge --push`.
from tests.backend.test_merge import setup  # noqa: F401 - a fixture

TOKEN = "hf_qlwTestTokenDoNotLeak_7f3a9c"


class Ctx:
    cancelled = False

    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    def check_cancelled(self) -> None:
        pass

    def emit(self, kind, payload) -> None:
        self.events.append((kind, payload))

    def progress(self, stage, done, total=0, unit="", message="") -> None:
        self.events.append(("job.progress", {"stage": stage, "done": done, "total": total, "unit": unit}))


@pytest.fixture
def stub(monkeypatch):
    """The stand-in Hub, online, with HF_TOKEN set and uploads through LFS (not Xet)."""
    from huggingface_hub import constants

    with HubStub(TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


@pytest.fixture
def model_folder(tmp_path) -> Path:
    """A folder shaped like a merged model (contents do not matter to an upload)."""
    folder = tmp_path / "merged-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}\n')
    (folder / "model-00001-of-00002.safetensors").write_bytes(os.urandom(200_000))
    (folder / "model-00002-of-00002.safetensors").write_bytes(os.urandom(50_000))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}\n')
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n# merged\n")
    (folder / ".hidden").write_text("not for upload")
    return folder


@pytest.fixture
def adapter_folder(tmp_path) -> Path:
    """A checkpoint: adapter files plus training state that an adapter-only upload leaves out."""
    folder = tmp_path / "checkpoint-6"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "base_model_name_or_path": "/home/me/models/my-base"}))
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(30_000))
    (folder / "optimizer.pt").write_bytes(os.urandom(60_000))
    (folder / "trainer_state.json").write_text('{"global_step": 6}')
    return folder


def test_push_sends_every_file_privately_with_progress_by_bytes(stub, model_folder):
    ctx = Ctx()
    result = hub.push(str(model_folder), "tester/tiny-merged", ctx)
    assert stub.repos["tester/tiny-merged"]["private"] is True
    local = {p.name: p.read_bytes() for p in model_folder.iterdir() if not p.name.startswith(".")}
    assert stub.files["tester/tiny-merged"] == local  # every file, byte for byte; not the hidden one
    assert {oid for oid in stub.lfs} and len(stub.lfs) == 2  # the safetensors went through LFS
    assert result["private"] and not result["dry_run"] and result["url"].endswith("/tester/tiny-merged")
    assert sorted((f["path"], f["size_bytes"]) for f in result["files"]) == sorted((k, len(v)) for k, v in local.items())
    progress = [p for k, p in ctx.events if k == "job.progress"]
    assert progress[-1]["done"] == progress[-1]["total"] == sum(len(v) for v in local.values())
    assert all(p["unit"] == "bytes" for p in progress)
    pushed = next(p for k, p in ctx.events if k == "hub.pushed")
    P.build(P.HubPushed, pushed, "hub.pushed")
    assert TOKEN not in json.dumps(ctx.events)


def test_public_adapter_only_upload_leaves_training_state_and_local_paths_out(stub, adapter_folder):
    hub.push(str(adapter_folder), "tester/tiny-adapter", Ctx(), private=False, adapter_only=True)
    assert stub.repos["tester/tiny-adapter"]["private"] is False
    files = stub.files["tester/tiny-adapter"]
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "my-base"
    assert files["adapter_model.safetensors"] == (adapter_folder / "adapter_model.safetensors").read_bytes()


def test_dry_run_lists_exactly_what_would_go_and_sends_nothing(stub, model_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a dry run needs neither the network nor a token
    monkeypatch.delenv("HF_TOKEN")
    ctx = Ctx()
    result = hub.push(str(model_folder), "tester/tiny-merged", ctx, dry_run=True)
    assert stub.requests == []
    assert result["dry_run"] and result["offline"] and result["token_source"] is None
    listed = {f["path"]: f["size_bytes"] for f in result["files"]}
    assert listed == {p.name: p.stat().st_size for p in model_folder.iterdir() if p.name != ".hidden"}
    assert listed["model-00001-of-00002.safetensors"] == 200_000
    assert result["size_bytes"] == sum(f["size_bytes"] for f in result["files"])


def test_errors_say_what_failed_and_what_to_do(stub, model_folder, monkeypatch):
    with pytest.raises(JobError, match="not a valid repository name") as bad:
        hub.push(str(model_folder), "bad name!", Ctx())
    assert "alice/my-model" in bad.value.hint
    assert stub.requests == []  # refused before the network
    with pytest.raises(JobError, match=r"refused the token \(403\)"):
        hub.push(str(model_folder), "someone-else/tiny", Ctx())
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(JobError, match=r"refused the token \(401\)") as refused:
        hub.push(str(model_folder), "tester/tiny", Ctx())
    assert "hf auth login" in refused.value.hint and "hf_wrong" not in str(refused.value)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(JobError, match="no Hugging Face token") as none:
        hub.push(str(model_folder), "tester/tiny", Ctx())
    assert "HF_TOKEN" in none.value.hint
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(JobError, match="cannot reach the Hub"):
        hub.push(str(model_folder), "tester/tiny", Ctx())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(JobError, match="local export only"):
        hub.push(str(model_folder), "tester/tiny", Ctx())
    with pytest.raises(JobError, match="no adapter"):
        hub.upload_list(model_folder, adapter_only=True)


def test_status_names_the_token_source_never_the_token(stub, monkeypatch):
    status = hub.status()
    assert status == {"offline": False, "endpoint": stub.url, "token_source": "HF_TOKEN", "user": "tester"}
    monkeypatch.delenv("HF_TOKEN")
    assert hub.status()["token_source"] is None  # HF_HOME is the tests' own: no stored login


def test_qlw_merge_adapter_only_push_and_the_token_is_nowhere(setup, stub):  # noqa: F811
    """`qlw merge ADAPTER OUT --adapter-only --push` in a subprocess (HF_ENDPOINT set before
    huggingface_hub is imported there; no model is loaded); then every file under the data home
    is searched for the token, and what the command recorded reads back as the protocol says."""
    home, base, adapter = setup
    env = dict(os.environ, PYTHONPATH=str(ROOT), QLW_HOME=str(home), HF_ENDPOINT=stub.url, HF_TOKEN=TOKEN,
               HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1", QLW_LOG_LEVEL="DEBUG")
    log = home / "logs" / "qlw-merge-push.log"
    log.parent.mkdir(exist_ok=True)
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, "-m", "backend", "merge", str(adapter), "--adapter-only",
                               "--push", "tester/tiny-adapter", "--public", "--home", str(home)],
                              env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=120)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert stub.repos["tester/tiny-adapter"]["private"] is False
    files = stub.files["tester/tiny-adapter"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert files["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == base.name
    assert "uploaded" in text and "tester/tiny-adapter (public)" in text
    leaks = [str(p) for p in home.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert leaks == []
    assert TOKEN not in text
    from sessions.store import Store

    store = Store(home / "sessions.db")
    try:
        session = store.latest_session().id
        events = store.read_events(session)
    finally:
        store.close()
    for e in events:  # what `qlw merge` recorded reads back as the protocol says
        P.event_payload(P.Event(e.kind, e.payload, e.time, e.session, e.seq))
    assert [e.kind for e in events if e.kind in ("hub.pushed", "job.finished")] == ["hub.pushed", "job.finished"]


def test_merge_start_and_push_through_a_real_backend(setup, stub):  # noqa: F811
    """merge.start (a job: progress, merge.saved, merge.verified decoded by the client's
    protocol), the confirm refusal for an existing folder, hub.status, hub.push to the stand-in."""
    import asyncio
    import time

    from tests.conftest import start_backend, stop_backend
    from tui.client import Connection

    home, base, adapter = setup
    env_before = dict(os.environ)
    os.environ.update(HF_HUB_DISABLE_XET="1")  # the backend process inherits the stub's settings
    try:
        proc = start_backend(home)
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    try:
        async def body():
            events: list = []
            conn = await Connection.open(P.socket_path(home), "merge-test", events.append)
            await conn.call(P.Attach())

            async def finished(job_id):
                budget = Budget(240)  # load-adjusted hang guard
                while not any(e.kind == "job.finished" and e.payload["job_id"] == job_id for e in events):
                    assert not budget.spent(), "the job did not finish"
                    await asyncio.sleep(0.05)
                return next(e.payload for e in events if e.kind == "job.finished" and e.payload["job_id"] == job_id)

            job = await conn.call(P.StartMerge(adapter=str(adapter), out="tiny-served", dtype="bf16",
                                               prompts=["Hello there, how"]))
            end = await finished(job["job_id"])
            assert end["status"] == "done", end["error"]
            for e in events:  # every event decodes with the client's protocol
                P.event_payload(e)
            stages = [e.payload["stage"] for e in events if e.kind == "job.progress"]
            assert {"loading base", "attaching adapter", "merging", "saving", "model card", "verifying"} <= set(stages)
            verified = next(e.payload for e in events if e.kind == "merge.verified")
            assert verified["prompts"] == 1 and len(verified["rows"]) == 3 and verified["noise_floor"] > 0
            again = await conn.request(P.StartMerge(adapter=str(adapter), out="tiny-served"))
            assert again.status == "refused" and again.code == P.CONFIRM
            status = await conn.call(P.HubStatus())
            assert status["token_source"] == "HF_TOKEN" and status["user"] == "tester"
            job = await conn.call(P.HubPush(folder="tiny-served", repo_id="tester/tiny-served"))
            end = await finished(job["job_id"])
            assert end["status"] == "done", end["error"]
            local = {p.name: p.read_bytes() for p in (home / "merged" / "tiny-served").iterdir()}
            assert stub.files["tester/tiny-served"] == local
            assert sorted(f["path"] for f in end["result"]["files"]) == sorted(local)
            assert stub.repos["tester/tiny-served"]["private"] is True
            await conn.close()

        asyncio.run(asyncio.wait_for(body(), 300))
    finally:
        stop_backend(proc)
    leaks = [str(p) for p in home.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert leaks == []
