"""Merging (backend/merge.py): the tiny model (saved in fp32; its "4-bit as trained" base is the
same folder loaded in 4-bit NF4 on the CPU) with a LoRA adapter that changes its outputs.

Merged logits equal base + adapter within 1e-5 in fp32 for both merge targets; the saved folder
loads and generates with the base folder renamed away and names no base path; the model card
names base, data and settings; a merge killed while saving leaves no target folder; an existing
target is replaced only when asked; the server's merge.* requests; bench/merge.py --smoke.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from backend import adapters, merge, protocol as P, train_config as TC  # noqa: E402
from backend.jobs import JobError  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is Paris, and to make tea you"


class Ctx:
    """A job context in this process that keeps every event."""

    cancelled = False

    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    def check_cancelled(self) -> None:
        pass

    def emit(self, kind: str, payload: dict) -> None:
        self.events.append((kind, payload))

    def progress(self, stage, done, total=0, unit="", message="") -> None:
        self.events.append(("job.progress", {"stage": stage, "done": done, "total": total, "unit": unit}))

    def stages(self) -> list[str]:
        seen: list[str] = []
        for kind, p in self.events:
            if kind == "job.progress" and p["stage"] not in seen:
                seen.append(p["stage"])
        return seen


@pytest.fixture(scope="module")
def setup(tiny_folder):
    """A data home with the base folder, one session's run (config.toml saying 4-bit NF4, the
    adapter, a checkpoint's trainer state with the losses)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    home = Path(tempfile.mkdtemp(prefix="qlw-m-", dir="/tmp"))
    base = home / "base-model"
    shutil.copytree(tiny_folder, base)
    run = home / "runs" / "20261123-120000-merge01"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(str(run / "adapter"))
    cfg = TC.defaults()
    cfg["name"] = "merge test"
    cfg["model"].update(source=str(base), precision="4bit", quant_type="nf4", double_quant=True,
                        compute_dtype="fp32", device="cpu")
    cfg["data"]["source"]["path"] = "/data/dolly-sample.jsonl"
    cfg["lora"].update(r=8, lora_alpha=16)
    cfg["training"].update(learning_rate=2e-4, max_steps=6)
    (run / "config.toml").write_text(TC.dumps_toml(cfg), encoding="utf-8")
    ckpt = run / "checkpoints" / "checkpoint-6"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps(
        {"global_step": 6, "log_history": [{"loss": 2.5, "step": 3}, {"loss": 1.875, "step": 6},
                                           {"eval_loss": 2.125, "step": 6}]}))
    yield home, base, run / "adapter"
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def verified(setup):
    """One merge (way a, fp32) with its verification table."""
    home, base, adapter = setup
    ctx = Ctx()
    result = merge.run_merge({"adapter": str(adapter), "out": "tiny-merged", "dtype": "fp32", "into": "dequantized",
                              "max_shard_size": "1MB", "verify": True, "prompts": [PROMPT]}, home, ctx)
    return result, ctx


def logits_of(model, tokenizer) -> "torch.Tensor":
    with torch.no_grad():
        return model(**tokenizer(PROMPT, return_tensors="pt")).logits.float()


def reference(home: Path, adapter: Path, into: str):
    """The unmerged model: base (dequantized 4-bit as trained, or the original weights) + adapter."""
    from transformers import AutoModelForCausalLM

    _info, trained, src = merge._base_info(adapter, home)
    if into == "dequantized":
        model, _tok, _how = merge.load_for_merge(src, trained, "fp32", "dequantized", "cpu",
                                                 lambda *a, **k: None, lambda: False)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(src.folder), dtype=torch.float32)
    return adapters.attach_adapter(model, adapter, name="ref")


@pytest.mark.parametrize("into", ["dequantized", "original"])
def test_merged_logits_equal_base_plus_adapter_in_fp32(setup, verified, into):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    home, base, adapter = setup
    if into == "dequantized":
        result, ctx = verified
    else:
        ctx = Ctx()
        result = merge.run_merge({"adapter": str(adapter), "out": "tiny-original", "dtype": "fp32", "into": into,
                                  "verify": False}, home, ctx)
    assert ctx.stages()[:5] == ["loading base", "attaching adapter", "merging", "saving", "model card"]
    out = Path(result["out"])
    assert out.parent == home / "merged"
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert all(isinstance(m, torch.nn.Linear) for m in merged.modules() if "proj" in type(m).__name__.lower())
    got = logits_of(merged, tokenizer)
    ref_model = reference(home, adapter, into)
    want = logits_of(ref_model, tokenizer)
    assert (got - want).abs().max().item() < 1e-5
    with ref_model.disable_adapter():  # the adapter matters: without it the logits move
        assert (logits_of(ref_model, tokenizer) - want).abs().max().item() > 1e-3
    if into == "dequantized":  # way (a) is not the original weights: the 4-bit rounding shows
        original = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        assert (logits_of(adapters.attach_adapter(original, adapter), tokenizer) - got).abs().max().item() > 1e-3


def test_verification_table_and_saved_event(verified):
    result, ctx = verified
    saved = next(p for k, p in ctx.events if k == "merge.saved")
    table = next(p for k, p in ctx.events if k == "merge.verified")
    P.build(P.MergeSaved, saved, "merge.saved")
    P.build(P.MergeVerified, table, "merge.verified")
    assert result["verify"] == table
    shards = [f["name"] for f in saved["files"] if f["name"].endswith(".safetensors")]
    assert len(shards) >= 2  # max_shard_size 1MB on a 2.8 MB model
    rows = {r["model"]: r for r in table["rows"]}
    assert set(rows) == {"merged", "trained (4-bit base + adapter)", "full-precision base + adapter"}
    assert rows["merged"]["max_abs_logit_diff"] < 1e-4  # against the model as trained
    assert rows["full-precision base + adapter"]["max_abs_logit_diff"] > 1e-3  # 4-bit rounding
    assert table["noise_floor"] == 0.0 and table["prompts"] == 1  # fp32 against fp32
    assert all(r["perplexity"] > 1 for r in table["rows"])
    assert rows["merged"]["size_bytes"] == saved["size_bytes"]
    text = merge.format_table(table)
    assert "noise floor of fp32" in text and "merged" in text


def test_saved_folder_stands_alone_and_names_no_base_path(setup, verified):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    home, base, adapter = setup
    out = Path(verified[0]["out"])
    names = {f["name"] for f in merge.list_files(out)}
    assert {"config.json", "generation_config.json", "README.md", "tokenizer.json", "chat_template.jinja",
            "model.safetensors.index.json"} <= names
    for f in out.iterdir():
        text = f.read_bytes().decode("utf-8", errors="ignore")
        assert str(base) not in text and str(home) not in text, f.name
    config = json.loads((out / "config.json").read_text())
    assert not str(config.get("_name_or_path", "")).startswith("/")
    assert "quantization_config" not in config
    away = base.with_name("base-model-away")
    base.rename(away)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(out))
        model = AutoModelForCausalLM.from_pretrained(str(out))
        ids = tokenizer(PROMPT, return_tensors="pt")
        generated = model.generate(**ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert generated.shape[1] == ids["input_ids"].shape[1] + 5
        assert tokenizer.chat_template
    finally:
        away.rename(base)


def test_model_card_names_base_data_and_settings(verified):
    card = (Path(verified[0]["out"]) / "README.md").read_text()
    for needle in ("base-model", "4-bit nf4", "/data/dolly-sample.jsonl", "| r | 8 |", "| lora_alpha | 16 |",
                   "| learning_rate | 0.0002 |", "| max_steps | 6 |", "1.875", "2.125", "dequantized",
                   "AutoModelForCausalLM.from_pretrained", "q_proj"):
        assert needle in card, needle


def test_plan_paths_and_refusals(setup, verified):
    home, base, adapter = setup
    p = merge.plan(str(adapter), "tiny-merged", home, "bf16", "dequantized", device="cpu")
    assert p["out"] == str(home / "merged" / "tiny-merged") and p["out_exists"]
    assert p["into_default"] == "dequantized" and p["device"] == "cpu"
    assert p["base"]["precision"] == "4bit" and p["memory"]["verdict"] == "fits"
    assert p["disk"]["need_bytes"] > 0 and p["disk"]["free_bytes"] > p["disk"]["need_bytes"]
    assert any("exists" in w for w in p["warnings"])
    assert merge.resolve_out("/abs/where", home) == Path("/abs/where")
    for bad in ("", "../outside", "a/../../x"):
        with pytest.raises(JobError):
            merge.resolve_out(bad, home)
    with pytest.raises(JobError, match="never 4-bit|one of"):
        merge.plan(str(adapter), "x", home, "4bit", "dequantized")
    with pytest.raises(JobError):
        merge.plan(str(home / "nowhere"), "x", home)


def test_only_an_empty_or_model_folder_may_be_replaced(tmp_path):
    assert merge.replace_refusal(tmp_path / "new") is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert merge.replace_refusal(empty) is None
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model-00001-of-00002.safetensors").write_bytes(b"")
    (model / "notes.txt").write_text("kept with the model")
    assert merge.replace_refusal(model) is None
    card = tmp_path / "card"
    card.mkdir()
    (card / "README.md").write_text(merge.model_card(name="card", base="b", base_is_hub=True, info={}, run={},
                                                     losses=(None, None), dtype="bf16", into="original", how=""))
    assert merge.replace_refusal(card) is None
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    (mine / "config.json").write_text("{}")  # a config alone is not a model
    why = merge.replace_refusal(mine)
    assert "not a model folder" in why and "config.json, notes.txt, sub/" in why
    with pytest.raises(JobError, match="notes.txt") as exc:
        merge.check_replaceable(mine, "mine")
    assert "another output folder" in exc.value.hint
    (tmp_path / "link").symlink_to(model)
    assert "link" in merge.replace_refusal(tmp_path / "link")
    (tmp_path / "file").write_text("x")
    assert "file" in merge.replace_refusal(tmp_path / "file")


def test_existing_target_is_replaced_only_when_asked_and_atomically(setup):
    home, base, adapter = setup
    params = {"adapter": str(adapter), "out": "tiny-twice", "dtype": "bf16", "into": "original", "verify": False}
    first = merge.run_merge(params, home, Ctx())
    out = Path(first["out"])
    (out / "marker").write_text("old")
    with pytest.raises(JobError, match="exists"):
        merge.run_merge(params, home, Ctx())
    assert (out / "marker").exists()
    merge.run_merge({**params, "overwrite": True}, home, Ctx())
    assert not (out / "marker").exists() and (out / "config.json").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert [e.name for e in out.parent.iterdir() if e.name.startswith(".tiny-twice")] == []


def test_failed_save_leaves_nothing(setup):
    home, base, adapter = setup
    params = {"adapter": str(adapter), "out": "tiny-fail", "dtype": "fp32", "into": "original", "verify": False}
    with pytest.raises(RuntimeError, match="injected"):
        merge.run_merge(params, home, Ctx(), fault=merge.parse_fault("fail@saving"))
    merged = home / "merged"
    assert not (merged / "tiny-fail").exists()
    assert [e.name for e in merged.iterdir() if e.name.startswith(".tiny-fail")] == []


def test_merge_killed_while_saving_leaves_no_target(setup):
    """`qlw merge` in a subprocess, SIGKILLed by the fault seam once the weights are written."""
    home, base, adapter = setup
    env = dict(os.environ, QLW_MERGE_FAULT="kill@saving", PYTHONPATH=str(ROOT), QLW_HOME=str(home))
    proc = subprocess.run([sys.executable, "-m", "backend", "merge", str(adapter), "tiny-killed", "--dtype", "fp32",
                           "--into", "original", "--home", str(home)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert "out: " + str(home / "merged" / "tiny-killed") in proc.stdout
    target = home / "merged" / "tiny-killed"
    assert not target.exists()
    left = [e for e in target.parent.iterdir() if e.name.startswith(".tiny-killed" + merge.TMP_MARK)]
    assert left and any(f.name.endswith(".safetensors") for f in left[0].iterdir())  # killed mid-save
    assert merge.clean_stale(target) == [left[0].name]  # the next merge removes it
    assert not left[0].exists()


def test_the_disk_estimate_is_the_merged_folders_size(setup, verified):
    """Issue 15: the plan said 65 MiB for a 1.5 MiB output (the free-space margin counted as
    the size). The estimate is the folder's size; the margin stays in the free-space check."""
    home, base, adapter = setup
    result, _ctx = verified
    p = merge.plan(str(adapter), "tiny-other", home, "fp32", "dequantized")
    written = merge.folder_bytes(Path(result["out"]))
    assert 0.7 * written < p["disk"]["size_bytes"] < 1.3 * written, (p["disk"], written)
    assert p["disk"]["need_bytes"] == p["disk"]["size_bytes"] + merge.DISK_MARGIN


def test_qlw_merge_to_a_place_it_cannot_write_refuses_before_any_work(setup, tmp_path):
    """Issue 15: `qlw merge ADAPTER /read-only/place` ended in a traceback (OSError 30) after
    loading and merging. The target is probed first; the refusal says where and what to do."""
    home, base, adapter = setup
    try:
        tempfile.mkdtemp(dir="/sys")
    except OSError:
        pass
    else:
        pytest.skip("/sys is writable here: no read-only place to try")
    env = dict(os.environ, PYTHONPATH=str(ROOT), QLW_HOME=str(home))
    proc = subprocess.run([sys.executable, "-m", "tui.cli", "--home", str(home), "merge", str(adapter),
                           "/sys/qlw-merged/tiny", "--dtype", "fp32"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "qlw merge: cannot write /sys/qlw-merged/tiny: /sys is not writable (Operation not permitted)" in proc.stderr
    assert "loading" not in proc.stdout  # refused before any model was loaded
    p = merge.plan(str(adapter), "/sys/qlw-merged/tiny", home, "fp32", "original")
    assert p["out_unwritable"] and any("cannot be written" in w for w in p["warnings"])


def test_server_requests(setup, verified, monkeypatch):
    """merge.adapters, merge.plan, merge.start's confirm refusal, hub.push offline: the handlers
    register() adds, on a stand-in server."""
    home, base, adapter = setup

    class Server:
        def __init__(self):
            self.home = home
            self.handlers = {}
            self.store = None
            self.started = []

        def _start_job(self, method, params, fn):
            self.started.append(method)
            return P.Reply("", "accepted", {"job_id": "j"})

    server = Server()
    merge.register(server)
    assert set(server.handlers) == {"merge.adapters", "merge.plan", "merge.start", "merge.verify", "hub.status", "hub.push"}
    assert set(server.handlers) <= set(P.REQUESTS)

    def call(method, **params):
        return asyncio.run(server.handlers[method](None, P.build(P.REQUESTS[method], params, method)))

    found = call("merge.adapters").result["adapters"]
    assert [a["path"] for a in found] == [str(adapter.resolve())]
    plan = call("merge.plan", adapter=str(adapter), out="tiny-merged", dtype="fp32")
    assert plan.status == "ok" and plan.result["out_exists"]
    refused = call("merge.start", adapter=str(adapter), out="tiny-merged")
    assert refused.status == "refused" and refused.code == P.CONFIRM
    bad = call("merge.start", adapter=str(adapter), out="x", dtype="int4")
    assert bad.status == "refused" and "dtype" in bad.reason
    assert call("merge.start", adapter=str(adapter), out="tiny-merged", overwrite=True).status == "accepted"
    assert call("merge.verify", adapter=str(adapter), out="tiny-merged").status == "accepted"
    assert server.started == ["merge.start", "merge.verify"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = call("hub.push", folder=verified[0]["out"], repo_id="me/tiny")
    assert offline.status == "refused" and "offline" in offline.reason and "local export only" in offline.reason
    assert call("hub.push", folder=verified[0]["out"], repo_id="me/tiny", dry_run=True).status == "accepted"
    status = call("hub.status").result
    assert status["offline"] is True and "token" not in {k for k in status if k != "token_source"}


def test_bench_smoke(tiny_folder, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_merge", ROOT / "bench" / "merge.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "merge.json"
    assert bench.main(["--smoke", "--model", str(tiny_folder), "--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mode"] == "smoke" and result["merge_device"] == "cpu"
    assert result["merge_s"] > 0 and result["save_s"] > 0 and result["versions"]["peft"]
    rows = {r["model"]: r for r in result["verify"]["rows"]}
    # A bf16 merge into the dequantized base: off the model as trained by less than bf16's own
    # noise (the base in bf16 vs fp32); the original weights are further away (the 4-bit rounding).
    assert 0 < rows["merged"]["max_abs_logit_diff"] < 2 * result["verify"]["noise_floor"]
    assert rows["merged"]["max_abs_logit_diff"] < rows["full-precision base + adapter"]["max_abs_logit_diff"]
    assert result["model_card_names_base"] and not result["config_names_base_path"]


def test_cancel_and_full_disk_leave_nothing(setup, monkeypatch):
    from backend.jobs import JobCancelled

    home, base, adapter = setup
    merged = home / "merged"

    class CancelWhileSaving(Ctx):
        @property
        def cancelled(self):
            return any(p.get("stage") == "saving" for _k, p in self.events)

        def check_cancelled(self):
            if self.cancelled:
                raise JobCancelled()

    params = {"adapter": str(adapter), "out": "tiny-cancelled", "dtype": "fp32", "into": "original", "verify": False}
    with pytest.raises(JobCancelled):
        merge.run_merge(params, home, CancelWhileSaving())
    assert not (merged / "tiny-cancelled").exists()
    assert [e.name for e in merged.iterdir() if e.name.startswith(".tiny-cancelled")] == []
    monkeypatch.setattr(merge.planning, "_disk_free", lambda path: 1000)
    assert any("disk space" in w for w in merge.plan(str(adapter), "tiny-full", home, "fp32", device="cpu")["warnings"])
    with pytest.raises(JobError, match="not enough disk space") as full:
        merge.run_merge({**params, "out": "tiny-full"}, home, Ctx())
    assert "free disk space" in full.value.hint
    assert not (merged / "tiny-full").exists()
