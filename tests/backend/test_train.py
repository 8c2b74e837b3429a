"""Training (backend/train.py, backend/train_config.py): the run config, a real run on the tiny
model on the CPU, stop and resume, failures, the backend's train.* requests, and `qlw train`.

The tiny model comes from pytest's cache (built once, ~10 s); every data home gets a copy of it
as its embedded model, so ``model.source = ""`` means it without a build.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from backend import protocol as P, tiny, train, train_config as TC
from sessions.store import Store
from tests.conftest import ROOT, start_backend, stop_backend

pytestmark = pytest.mark.slow


def make_home(tiny_folder: Path) -> Path:
    """A short data home holding the tiny model as its embedded default."""
    home = Path(tempfile.mkdtemp(prefix="qlw-t-", dir="/tmp"))
    shutil.copytree(tiny_folder, tiny.tiny_model_path(home))
    return home


@pytest.fixture
def home(tiny_folder):
    h = make_home(tiny_folder)
    yield h
    shutil.rmtree(h, ignore_errors=True)


@pytest.fixture(autouse=True)
def _release_models():
    yield
    from backend import models

    models.release_base_model()


def small_config(**training) -> dict:
    """The tiny model in fp32 on the CPU, the sample dataset (mapping detected), short rows."""
    cfg = TC.defaults()
    cfg["name"] = "test run"
    cfg["model"].update(precision="fp32", device="cpu")
    cfg["data"]["max_length"] = 128
    cfg["lora"].update(r=8, lora_alpha=16)
    cfg["training"].update(dict(max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                                learning_rate=2e-3, logging_steps=1, eval_steps=0, save_steps=0,
                                gradient_checkpointing=False, optim="adamw_torch"), **training)
    return cfg


class Run(train.LocalRun):
    """A job context in this process that keeps every event; stops itself at ``stop_at``."""

    def __init__(self, home: Path, stop_at: int | None = None):
        self.events: list[tuple[str, dict]] = []
        self.step = 0
        self.stop_at = stop_at
        store = Store(home / "sessions.db")
        super().__init__(store, store.create_session("test").id, lambda kind, payload: self.events.append((kind, payload)))

    def progress(self, stage, done, total=0, unit="", message=""):
        if stage == "training":
            self.step = done
        super().progress(stage, done, total, unit, message)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set() or (self.stop_at is not None and self.step >= self.stop_at)

    def of(self, kind: str) -> list[dict]:
        return [p for k, p in self.events if k == kind]

    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.of("train.log") if r["loss"] is not None}


def train_here(home: Path, config: dict, stop_at: int | None = None, **kw) -> tuple[Run, dict | Exception]:
    run = Run(home, stop_at)
    try:
        result = train.run_training(config, home, run,
                                    record_artifact=lambda kind, path: run.store.add_artifact(run.session, kind, path),
                                    set_config=lambda cfg: run.store.set_config(run.session, cfg), **kw)
    except Exception as exc:  # noqa: BLE001 - the tests look at it
        result = exc
    return run, result


# The run config ----------------------------------------------------------------------------------------------


def test_config_errors_are_keyed_by_field_and_the_defaults_round_trip_through_toml(tmp_path):
    config, errors = TC.normalise({"lora": {"r": 0, "rank": 8}, "training": {"learning_rate": "fast", "optim": "adamw"},
                                   "trainer": {}, "version": 9})
    assert errors["lora.r"] == "must be a positive integer, got 0"
    assert errors["lora.rank"] == "unknown field: here it is called r"
    assert errors["training.learning_rate"].startswith("must be a positive number below 1")
    assert "did you mean 'adamw_8bit'" in errors["training.optim"]
    assert "unknown section (did you mean training?)" in errors["trainer"]
    assert "newer qlw" in errors["version"]
    assert config["lora"]["lora_alpha"] == 16 and config["lora"]["r"] == 0  # full shape, bad value kept

    text = TC.dumps_toml(TC.defaults())
    back, errs = TC.loads_toml(text)
    assert errs == {} and back == TC.defaults()
    broken = text.replace("r = 16", "r = 0").replace("max_grad_norm = 0.3", "max_grad_norm = -1")
    _, errs = TC.loads_toml(broken)
    line_r = 1 + text.splitlines().index("r = 16")
    assert errs["lora.r"] == f"must be a positive integer, got 0 (line {line_r})"
    assert "(line " in errs["training.max_grad_norm"]
    _, errs = TC.loads_toml("[lora]\nr = \n")
    assert "line 2" in errs["toml"]
    # Without tomli_w (a bare GPU image), the built-in writer says the same.
    assert TC.loads_toml(TC._plain_toml(TC._strip_none(TC.defaults())))[0] == TC.defaults()

    env = {"QLW_TRAINING__LEARNING_RATE": "1e-4", "QLW_LORA__TARGET_MODULES": '["q_proj", "v_proj"]',
           "QLW_DATA__SOURCE__PATH": "/data/x.jsonl", "QLW_MODEL__SOURCE": "org/model", "QLW_HOME": "/elsewhere"}
    config, errs = TC.loads_toml(text, env)
    assert errs == {}
    assert config["training"]["learning_rate"] == 1e-4 and config["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert config["data"]["source"]["path"] == "/data/x.jsonl" and config["model"]["source"] == "org/model"
    _, errs = TC.loads_toml(text, {"QLW_LORA__RANK": "8", "QLW_TRAINNG__SEED": "1"})
    assert "QLW_LORA__RANK" in errs["lora.rank"] and "no section 'trainng'" in errs["QLW_TRAINNG__SEED"]


def test_logging_eval_and_save_steps_take_a_fraction_of_the_run(home):
    """logging/eval/save steps: whole steps, or below 1 a fraction of the run (transformers'
    reading), so that the defaults follow the run's length; a whole number that leaves the
    loss table one row is a warning at logging_steps (issue 15: 2 steps with logging_steps 10
    gave one row and a one-dot curve)."""
    config, errors = TC.normalise({"training": {"logging_steps": 0.05, "eval_steps": 0, "save_steps": 10.0}})
    assert errors == {}
    assert (config["training"]["logging_steps"], config["training"]["eval_steps"],
            config["training"]["save_steps"]) == (0.05, 0, 10)
    _, errors = TC.normalise({"training": {"logging_steps": 0, "eval_steps": 1.5, "save_steps": -1}})
    assert set(errors) == {"training.logging_steps", "training.eval_steps", "training.save_steps"}
    assert "fraction of the run below 1" in errors["training.logging_steps"]
    assert errors["training.eval_steps"].startswith("must be 0 (only at the end), a whole number of steps")
    # The defaults follow the run: fractions, not fixed step counts.
    t = TC.defaults()["training"]
    assert all(0 < t[k] < 1 for k in ("logging_steps", "eval_steps", "save_steps"))
    assert t["gradient_accumulation_steps"] == 1 and t["num_train_epochs"] == 3

    too_sparse = small_config(max_steps=6, logging_steps=50)
    result = train.validate_run(too_sparse, home)
    assert result["total_steps"] == 6
    assert result["warnings"]["training.logging_steps"].startswith(
        "logging_steps 50 with 6 step(s): the loss table gets only the last step and no curve")
    assert "training.logging_steps" not in train.validate_run(small_config(max_steps=6), home)["warnings"]

    # A real run: fractions become steps; the last step always has its row, evaluation and checkpoint.
    run, result = train_here(home, small_config(max_steps=6, logging_steps=0.5, eval_steps=0.5, save_steps=0.5))
    assert isinstance(result, dict) and result["status"] == "done", result
    assert sorted(run.losses()) == [3, 6]
    assert [r["step"] for r in run.of("train.log") if r["eval_loss"] is not None] == [3, 6]
    assert [c["step"] for c in run.of("train.checkpoint")] == [3, 6]
    run, result = train_here(home, small_config(max_steps=6, logging_steps=4))
    assert sorted(run.losses()) == [4, 6]


def test_presets_and_what_a_cpu_run_changes():
    presets = TC.presets()
    paper = presets["presets"]["qlora-paper"]
    assert paper["model"] == {"precision": "4bit", "quant_type": "nf4", "double_quant": True, "compute_dtype": "bf16"}
    assert (paper["lora"]["r"], paper["lora"]["lora_alpha"], paper["lora"]["lora_dropout"]) == (16, 16, 0.05)
    assert (paper["training"]["learning_rate"], paper["training"]["optim"]) == (2e-4, "paged_adamw_8bit")
    assert set(presets["presets"]) == set(P.TRAIN_PRESETS)
    assert TC.normalise(TC.apply_preset(TC.defaults(), "small-gpu"))[1] == {}

    # The defaults users get run on the CPU: the CUDA-only choices are replaced, with a warning each.
    eff, errors, warnings = TC.for_device(TC.defaults(), "cpu")
    assert errors == {} and eff["training"]["optim"] == "adamw_torch"
    assert (eff["training"]["bf16"], eff["training"]["fp16"], eff["model"]["compute_dtype"]) == (False, False, "fp32")
    assert set(warnings) == {"training.optim", "model.compute_dtype"}
    cfg = TC.defaults()
    cfg["training"]["bf16"] = True
    assert "needs a GPU" in TC.for_device(cfg, "cpu")[1]["training.bf16"]
    # On a GPU, unset bf16/fp16 follow the compute dtype and what the card can do.
    assert TC.for_device(TC.defaults(), "cuda:0", True)[0]["training"]["bf16"] is True
    eff, _, warnings = TC.for_device(TC.defaults(), "cuda:0", False)
    assert (eff["training"]["fp16"], eff["model"]["compute_dtype"]) == (True, "fp16") and warnings


def test_training_modules_import_nothing_heavy():
    code = ("import sys, backend.train, backend.train_config, backend.server; "
            "print(' '.join(m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets', 'rich') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == ""


# Runs in this process ---------------------------------------------------------------------------------------------


def test_it_learns_on_the_sample_dataset(home):
    """24 steps on the CPU: the validation loss falls; rows, checkpoint, adapter and store records.

    The loss counts every token of the chat-formatted rows: the tiny model was pre-trained on
    these very responses (never on the chat format), so a response-only loss moves by a few
    hundredths in 24 steps, while the whole text falls clearly (5.1 -> 4.65 measured)."""
    config = small_config(max_steps=24, eval_steps=8, learning_rate=3e-3)
    config["data"]["loss"] = "all"
    run, result = train_here(home, config)
    assert isinstance(result, dict), result
    assert result["status"] == "done" and result["step"] == 24
    evals = [(r["step"], r["eval_loss"]) for r in run.of("train.log") if r["eval_loss"] is not None]
    assert [s for s, _ in evals] == [8, 16, 24]
    assert evals[2][1] < evals[1][1] < evals[0][1] and evals[2][1] < evals[0][1] - 0.2, evals
    losses = run.losses()
    assert sorted(losses) == list(range(1, 25))
    assert sum(losses[s] for s in range(19, 25)) < sum(losses[s] for s in range(1, 7))
    started = run.of("train.started")[0]
    assert (started["total_steps"], started["trainable_params"]) == (24, 32768)  # r=8 on 10 linears of 2 layers
    row = run.of("train.log")[-1]
    assert row["tokens_per_s"] > 0 and row["elapsed_s"] > 0 and row["eta_s"] == 0 and row["learning_rate"] == 3e-3
    # The eval log of a step completes the row emitted for its training log: same step, twice.
    steps = [r["step"] for r in run.of("train.log")]
    assert steps.count(8) == 2 and steps.count(7) == 1
    assert any(p["stage"] == "training" and p["done"] == 24 and p["total"] == 24 for p in run.of("job.progress"))
    folder = train.run_dir(home, run.session)
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    assert (folder / "checkpoints" / "checkpoint-24" / "optimizer.pt").is_file()
    assert [c["step"] for c in train.list_checkpoints(home, run.session)] == [24]
    # Adapters and checkpoints carry the run's name, for every list that offers them (issue 15).
    from backend import adapters

    assert train.list_checkpoints(home, run.session)[0]["name"] == "test run"
    assert {a["name"] for a in adapters.list_adapters(home)} == {"test run"}
    assert {a["kind"] for a in run.store.artifacts(run.session)} == {"config", "checkpoint", "adapter"}
    assert run.store.get_session(run.session).config["lora"]["r"] == 8
    # The held base model is given back as loaded: no adapter inside, no checkpointing left on.
    from backend.holdings import HOLDINGS
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = HOLDINGS.get("base")
    assert base is not None and HOLDINGS.get("trainer") is None
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules()) and not base.training


def test_stop_saves_a_checkpoint_and_resume_continues_the_same_curve(home):
    """An uninterrupted 8-step run against one stopped after step 4 and resumed from its
    checkpoint: the resumed steps are 5..8 and their losses equal the uninterrupted ones. The
    checkpoint restores adapter, optimizer, scheduler, RNG states (LoRA dropout) and the data
    order, and the CPU kernels are deterministic: the curves are bit-identical here (measured).
    The tolerance, 1e-5, is the equality test's; on a GPU, non-deterministic kernels would need
    a relative one (~1e-3)."""
    config = small_config(max_steps=8)
    config["data"]["split_mode"] = "none"  # no validation: only the training curve matters here
    full, result = train_here(home, config)
    assert isinstance(result, dict), result
    stopped, result = train_here(home, config, stop_at=4)
    assert isinstance(result, dict), result
    assert result["status"] == "stopped" and result["step"] == 4
    checkpoint = train.run_dir(home, stopped.session) / "checkpoints" / "checkpoint-4"
    assert [p["path"] for p in stopped.of("train.checkpoint")] == [str(checkpoint)]
    assert result["adapter_path"]  # what was learnt so far is saved too
    assert sorted(stopped.losses()) == [1, 2, 3, 4]

    resumed, result = train_here(home, config, resume_from=str(checkpoint))
    assert isinstance(result, dict), result
    started = resumed.of("train.started")[0]
    assert (started["start_step"], started["resumed_from"]) == (4, str(checkpoint))
    assert sorted(resumed.losses()) == [5, 6, 7, 8]
    for step in range(1, 9):
        other = stopped.losses() if step <= 4 else resumed.losses()
        assert other[step] == pytest.approx(full.losses()[step], abs=1e-5), step


def test_out_of_memory_ends_cleanly_and_a_nan_loss_is_flagged_at_once(home):
    config = small_config(max_steps=6)
    config["data"]["split_mode"] = "none"
    run, result = train_here(home, config, fault=("oom", 3))
    from backend.holdings import HOLDINGS
    from backend.jobs import JobError

    assert isinstance(result, JobError) and "out of memory at step 3" in str(result)
    assert "per_device_train_batch_size" in result.hint and "max_length" in result.hint
    assert sorted(run.losses()) == [1, 2]  # the logged rows stay
    alert = run.of("train.alert")[0]
    assert (alert["kind"], alert["step"]) == ("oom", 3) and alert["memory"]["at_failure"]["device"] == "cpu"
    finished = run.of("train.finished")[0]
    assert (finished["status"], finished["step"], finished["adapter_path"]) == ("failed", 2, "")
    assert HOLDINGS.get("trainer") is None and HOLDINGS.get("base") is not None  # the base model is kept

    config["training"].update(max_steps=3, stop_on_divergence=False)  # on by default (tests/backend/test_watch.py)
    run, result = train_here(home, config, fault=("nan", 2))
    assert isinstance(result, dict) and result["status"] == "done"  # flagged, not stopped: the user decides
    alerts = run.of("train.alert")
    assert [(a["kind"], a["step"]) for a in alerts] == [("nan", 2)]
    kinds = [k for k, _ in run.events if k in ("train.alert", "train.log")]
    assert kinds.index("train.alert") < kinds.index("train.log", kinds.index("train.log") + 1)  # before step 2's row


def test_a_data_error_stops_before_the_first_step(home):
    config = small_config()
    config["data"]["mapping"] = {"instruction": "question", "response": "response"}
    run, result = train_here(home, config)
    from backend.data import DataError

    assert isinstance(result, DataError) and result.where == "mapping.instruction"
    assert "question" in str(result) and not run.of("train.started") and not run.of("model.loaded")


# Through a real backend ----------------------------------------------------------------------------------------


def arun(coro):
    return asyncio.run(asyncio.wait_for(coro, 180))


async def wait_for(cond, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_train_through_the_backend_with_a_reattaching_client(tiny_folder, monkeypatch):
    """train.* requests on a real backend: a refused invalid config; a first run that hits the
    injected out-of-memory error (the backend stays up); a second run in a new session, followed
    by a client that disconnects mid-run and re-attaches: every train.log row once."""
    from tui.client import Connection

    home = make_home(tiny_folder)
    monkeypatch.setenv(train.FAULT_ENV, "oom@2")
    proc = start_backend(home)
    try:
        async def body():
            first: list = []
            conn = await Connection.open(P.socket_path(home), "t1", first.append)
            await conn.call(P.Attach())
            presets = await conn.call(P.TrainPresets())
            assert set(presets["presets"]) == {"qlora-paper", "small-gpu"}

            bad = small_config()
            bad["lora"]["r"] = 0
            reply = await conn.request(P.StartTraining(config=bad))
            assert reply.status == "refused" and reply.result["errors"] == {"lora.r": "must be a positive integer, got 0"}
            missing = small_config()
            missing["model"]["source"] = str(home / "no-such-model")
            reply = await conn.request(P.StartTraining(config=missing))
            assert reply.status == "refused" and "no model folder" in reply.result["errors"]["model.source"]

            # A session made before the run (as ctrl+t's job makes one) takes the run's name (issue 15:
            # the first run of a backend, named in the form, was "(unnamed)" in Sessions).
            made = (await conn.call(P.NewSession()))["session"]
            job = await conn.call(P.StartTraining(config=small_config(max_steps=3)))
            assert job["session"] == made["id"]
            listed = {s["id"]: s for s in (await conn.call(P.ListSessions()))["sessions"]}
            assert listed[made["id"]]["name"] == "test run"
            assert any(e.kind == "session.renamed" and e.payload["name"] == "test run" for e in first)
            await wait_for(lambda: any(e.kind == "job.finished" for e in first), what="the OOM run's end")
            kinds = [e.kind for e in first if e.session == job["session"]]
            assert "train.alert" in kinds and kinds.index("train.alert") < kinds.index("train.finished")
            end = next(e.payload for e in first if e.kind == "job.finished")
            assert end["status"] == "failed" and "out of memory" in end["error"]["message"]
            assert (await conn.call(P.Ping("still here")))["payload"] == "still here"

            checked = await conn.call(P.ValidateRun(config=small_config()))
            assert checked["ok"] and checked["trainable_params"] == 32768 and checked["total_params"] == 688768 + 32768
            assert checked["total_steps"] == 6 and checked["memory"]["verdict"] in ("fits", "tight")

            job = await conn.call(P.StartTraining(config=small_config(max_steps=10, eval_steps=5)))
            session = job["session"]
            rows = lambda evs: [e for e in evs if e.kind == "train.log" and e.session == session]  # noqa: E731
            await wait_for(lambda: len(rows(first)) >= 2, what="the first rows")
            await conn.close()
            seen = [e.seq for e in first if e.session == session]
            await asyncio.sleep(1.0)  # rows keep coming while nobody listens

            again: list = []
            conn = await Connection.open(P.socket_path(home), "t1-again", again.append)
            await conn.call(P.Attach(session=session, since=seen[-1]))
            await wait_for(lambda: any(e.kind == "train.finished" for e in again), what="the run's end")
            got = rows(first) + rows(again)
            seqs = [e.seq for e in got]
            assert seqs == sorted(set(seqs))  # none twice, in order
            assert sorted({e.payload["step"] for e in got}) == list(range(1, 11))
            assert [e.payload["step"] for e in got if e.payload["eval_loss"] is not None] == [5, 10]
            finished = next(e.payload for e in again if e.kind == "train.finished")
            assert finished["status"] == "done" and finished["adapter_path"]

            listed = await conn.call(P.ListCheckpoints(session=session))
            assert [c["step"] for c in listed["checkpoints"]] == [10]
            assert listed["checkpoints"][0]["name"] == "test run"  # the resume list names the run
            path = str(home / "exported.toml")
            assert (await conn.call(P.ExportRunConfig(config=small_config(), path=path)))["path"] == path
            assert (await conn.request(P.ExportRunConfig(config=small_config(), path=path))).status == "refused"
            imported = await conn.call(P.ImportRunConfig(path=path))
            assert imported["errors"] == {} and imported["config"] == TC.checked(small_config())
            await conn.close()

        arun(body())
    finally:
        stop_backend(proc)
        shutil.rmtree(home, ignore_errors=True)


# qlw train --------------------------------------------------------------------------------------------------------


def qlw(home: Path, *args: str) -> subprocess.CompletedProcess:
    code = "import sys; from tui.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "--home", str(home), *args], cwd=str(home),
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "QLW_TRAINING__SEED": "7"})


def test_qlw_train_runs_headless_and_refuses_an_invalid_config(home):
    path = home / "run.toml"
    path.write_text(TC.dumps_toml(small_config(max_steps=4, eval_steps=2)), encoding="utf-8")
    out = qlw(home, "train", str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    header = lines.index(train.ROW_HEADER)
    assert [line.split()[0] for line in lines[header + 1:header + 7]] == ["1/4", "2/4", "2/4", "3/4", "4/4", "4/4"]
    assert any(line.startswith("done at step 4/4") for line in lines)
    store = Store(home / "sessions.db")
    session = store.latest_session()
    assert session.status == "finished" and session.config["training"]["seed"] == 7  # QLW_TRAINING__SEED
    kinds = [e.kind for e in store.events(session.id)]
    assert kinds.count("train.log") == 6 and kinds[-1] == "job.finished"
    assert {a["kind"] for a in store.artifacts(session.id)} == {"config", "checkpoint", "adapter"}
    store.close()

    path.write_text(TC.dumps_toml(small_config()).replace("r = 8", "r = 0"), encoding="utf-8")
    out = qlw(home, "train", str(path))
    assert out.returncode == 2
    assert "lora.r: must be a positive integer, got 0 (line" in out.stderr


def test_the_examples_are_valid_and_tiny_cpu_runs_offline(home, tmp_path):
    """examples/: every config reads without an error; `qlw train examples/tiny-cpu.toml` runs to
    the end offline (exit 0) on a data home with nothing but the embedded model; `qlw train
    --print-config` writes the defaults, which read back as they are (issue 15)."""
    examples = sorted((ROOT / "examples").glob("*.toml"))
    assert {p.name for p in examples} >= {"tiny-cpu.toml", "mistral-7b-qlora-16gb.toml", "llama3-8b-qlora-24gb.toml"}
    for path in examples:
        config, errors = TC.read_toml(path, {})
        assert errors == {}, (path.name, errors)
        assert config["name"] and path.read_text(encoding="utf-8").count("#") >= 10  # commented
    printed = qlw(home, "train", "--print-config")
    assert printed.returncode == 0, printed.stderr
    assert TC.loads_toml(printed.stdout)[0] == TC.defaults()
    missing = qlw(home, "train")
    assert missing.returncode == 2 and "--print-config" in missing.stderr

    out = subprocess.run([sys.executable, "-m", "tui.cli", "--home", str(home), "train",
                          str(ROOT / "examples" / "tiny-cpu.toml")], cwd=str(tmp_path), capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "done at step 15/15" in out.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written into the current folder
