"""Base models (backend/models.py): the estimate from config.json, loading in every precision on
the CPU, the AVX512-BF16 trap, clear errors, the inspector, cancellation, and the protocol
through a real backend.

The tiny model is built once into pytest's cache folder (about 10 s the first time, then
reused across runs; its build marker makes a changed recipe rebuild)."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import time
import warnings
import weakref
from pathlib import Path

import pytest

from backend import models, protocol as P, tiny
from backend.holdings import HOLDINGS
from backend.jobs import JobCancelled, JobError
from tui.client import Connection

GROUPS = {  # the tiny Llama: hidden 128, intermediate 256, 4 heads of 32, 2 kv heads
    "q_proj": [128, 128], "k_proj": [64, 128], "v_proj": [64, 128], "o_proj": [128, 128],
    "gate_proj": [256, 128], "up_proj": [256, 128], "down_proj": [128, 256],
}
TINY_PARAMETERS = 688_768


def has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.fixture(autouse=True)
def _no_held_model():
    yield
    models.release_base_model()


def settings(source, **kw) -> P.ModelSettings:
    return P.ModelSettings(source=str(source), **{"device": "cpu", **kw})


def sample_ids(folder: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in tiny.sample_dataset_path().read_text(encoding="utf-8").splitlines()[:20]]
    text = "\n".join(r["response"] for r in rows if r["response"].isascii())
    return tok(text, return_tensors="pt")["input_ids"][:, :96].reshape(2, 48)  # real text, no padding


def lora_grads(model, ids) -> dict:
    """One LoRA forward + backward on ``model`` (a fixed-seed adapter on every projection, with
    B != 0 so that both A and B get gradients); the adapter's gradients by name."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(GROUPS),
                                                  init_lora_weights=False))
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    return {n: (p.grad.detach().float().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32))
            for n, p in peft_model.named_parameters() if p.requires_grad}


def relative_error(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).norm()) ** 2 for k in b) ** 0.5
    den = sum(float(b[k].norm()) ** 2 for k in b) ** 0.5
    return num / den


def eval_pass(model, ids) -> None:
    import torch

    model.eval()
    with torch.no_grad():
        model(input_ids=ids)


# The estimate -----------------------------------------------------------------------------------


def test_estimate_counts_parameters_exactly_and_matches_the_loaded_footprint(tiny_folder):
    """For each precision: the parameter count from config.json equals the instantiated model's
    ``num_parameters()``, and the estimate equals what the loaded model measures on the CPU."""
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tiny_folder).num_parameters() == TINY_PARAMETERS
    cases = [dict(precision="4bit", quant_type="nf4", double_quant=True, compute_dtype="bf16"),
             dict(precision="4bit", quant_type="fp4", double_quant=False, compute_dtype="fp32"),
             dict(precision="8bit"), dict(precision="bf16"), dict(precision="fp16"), dict(precision="fp32")]
    for case in cases:
        s = settings(tiny_folder, **case)
        est = models.estimate(s)
        assert est["parameters"] == TINY_PARAMETERS, case
        assert est["verdict"] == "fits" and est["device"] == "cpu" and est["shards"] == 1
        loaded = models.load_base_model(s)
        measured = loaded.info["measured"]
        assert loaded.model.num_parameters() == TINY_PARAMETERS
        # Exact on the tiny model; the target on real models is 10 %.
        assert measured["footprint_bytes"] == est["footprint_bytes"], (case, measured, est)
        assert measured["tensor_bytes"] == est["total_bytes"], (case, measured, est)
        assert loaded.info["comparison"]["footprint_vs_estimate"] == 1.0
        if case["precision"] == "4bit":
            assert measured["quant_state_bytes"] == est["quant_state_bytes"] > 0
            assert est["unquantized_linear"] == ["lm_head"]  # tied to the embeddings: kept
            assert est["unquantized_parameters"] == TINY_PARAMETERS - 294_912
        del loaded


def test_estimate_of_a_7b_config_without_weights(tmp_path):
    """A Mistral-7B-v0.3-shaped config.json alone: the known parameter count, and the bytes each
    precision needs (4-bit: packed weights + absmax/double-quant state; lm_head stays bf16)."""
    from transformers import MistralConfig

    MistralConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=14336, vocab_size=32768, head_dim=128).save_pretrained(tmp_path)
    params = 7_248_023_552
    lm_head = 32768 * 4096
    linear = params - 2 * lm_head - (2 * 32 + 1) * 4096  # minus embeddings, lm_head, norms
    bf16 = models.estimate(settings(tmp_path, precision="bf16"))
    assert bf16["parameters"] == params and bf16["shards"] == 0
    assert bf16["weight_bytes"] == 2 * params and bf16["quant_state_bytes"] == 0
    nf4 = models.estimate(settings(tmp_path, precision="4bit"))
    assert nf4["quantized_parameters"] == linear
    assert nf4["weight_bytes"] == linear // 2 + 2 * (params - linear)
    blocks = linear / 64
    assert nf4["quant_state_bytes"] == pytest.approx(blocks + 4 * blocks / 256, rel=0.01)  # uint8 + fp32 nested
    no_dq = models.estimate(settings(tmp_path, precision="4bit", double_quant=False))
    assert no_dq["quant_state_bytes"] == pytest.approx(4 * blocks, rel=0.01)
    assert 3.8 < nf4["total_bytes"] / 2**30 < 3.9  # 3.85 GiB; bf16 13.5 GiB
    int8 = models.estimate(settings(tmp_path, precision="8bit"))
    assert int8["weight_bytes"] == linear + 2 * (params - linear)


def test_verdicts():
    assert models.verdict(80, 100) == "fits"
    assert models.verdict(95, 100) == "tight"
    assert models.verdict(101, 100) == "will not fit"


# Loading on the CPU ------------------------------------------------------------------------------


def test_load_each_precision_on_cpu_runs_and_stays_close_to_fp32(tiny_folder):
    import torch

    ids = sample_ids(tiny_folder)
    losses, kinds = {}, {}
    for precision in ("fp32", "bf16", "4bit", "8bit"):
        loaded = models.load_base_model(settings(tiny_folder, precision=precision))
        with torch.no_grad():
            losses[precision] = float(loaded.model(input_ids=ids, labels=ids).loss)
        info = models.inspect_model(loaded.model, loaded.tokenizer)
        kinds[precision] = (info["dtype"], info["quantization"], {g["name"]: g["quantized"] for g in info["linear_groups"]})
        if precision == "4bit":
            assert loaded.info["avx512bf16_layout_disabled"] == 14  # 7 projections x 2 layers
        del loaded
    assert kinds["fp32"][0] == "float32" and kinds["bf16"][0] == "bfloat16"
    assert kinds["4bit"][1] == "4-bit nf4 + double quant, compute bf16"
    assert kinds["8bit"][1] == "8-bit (LLM.int8)"
    for precision in ("4bit", "8bit"):
        quantized = kinds[precision][2]
        assert all(quantized[name] for name in GROUPS) and not quantized["lm_head"], precision
    for precision in ("bf16", "4bit", "8bit"):
        assert abs(losses[precision] - losses["fp32"]) / losses["fp32"] < 0.02, losses


def test_8bit_refused_clearly_where_bitsandbytes_cannot(tiny_folder, monkeypatch):
    """bitsandbytes 0.50 runs 8-bit on the CPU (loaded above); where it cannot (an older build,
    another device), the estimate and the load say so before loading anything."""
    monkeypatch.setattr(models.costs, "bitsandbytes_devices", lambda: {"cuda"})
    for precision in ("8bit", "4bit"):
        with pytest.raises(JobError, match="bitsandbytes cannot quantize on cpu") as err:
            models.load_base_model(settings(tiny_folder, precision=precision))
        assert "bf16/fp16/fp32" in err.value.hint
    assert models.estimate(settings(tiny_folder, precision="bf16"))["verdict"] == "fits"


def test_avx512_bf16_layout_is_off_so_lora_gradients_survive_an_eval_pass(tiny_folder):
    """The trap: on a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights during a no-grad
    eval forward into a layout whose op has no backward, and LoRA gradients go silently wrong.
    With the loader's fix the ``gemv_4bit`` warning never comes (it is an error here), and the
    gradients after an eval pass equal those of a fresh model that had none."""
    ids = sample_ids(tiny_folder)
    s = settings(tiny_folder, precision="4bit")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gemv_4bit.*")
        model = models.load_base_model(s).model
        eval_pass(model, ids)
        after_eval = lora_grads(model, ids)
    fresh = lora_grads(models.load_base_model(s).model, ids)
    assert all(float(g.abs().sum()) > 0 for g in fresh.values())
    assert relative_error(after_eval, fresh) < 1e-5


@pytest.mark.skipif(not has_avx512_bf16(), reason="the trap needs a CPU with AVX512-BF16")
def test_the_trap_is_live_on_this_cpu_without_the_fix(tiny_folder):
    """The control: with bitsandbytes' CPU layout switched back on, the same steps warn about
    ``gemv_4bit`` and the gradients are wrong. This is what the test above guards against."""
    import bitsandbytes as bnb

    ids = sample_ids(tiny_folder)
    s = settings(tiny_folder, precision="4bit")
    model = models.load_base_model(s).model
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True
    eval_pass(model, ids)
    with pytest.warns(UserWarning, match="gemv_4bit"):
        broken = lora_grads(model, ids)
    fresh = lora_grads(models.load_base_model(s).model, ids)
    assert relative_error(broken, fresh) > 0.1


# Errors --------------------------------------------------------------------------------------------


def test_offline_hub_id_fails_at_once_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(JobError) as err:  # offline: the cache is read, the network is not (how fast: bench/)
        models.load_base_model(P.ModelSettings(source="mistralai/Mistral-7B-v0.3", revision="main"))
    assert "not in the Hugging Face cache" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)
    assert err.value.where == "source = mistralai/Mistral-7B-v0.3, revision = main"
    assert "hf download mistralai/Mistral-7B-v0.3" in err.value.hint


def test_an_online_hub_id_is_estimated_then_downloaded_and_loaded_by_shard(tiny_folder, monkeypatch):
    """Online (the Hub stubbed with the tiny model's files): the estimate reads config.json
    alone; the load fetches config, safetensors and tokenizer files (not other formats), then
    loads the cached snapshot with progress by shard."""
    import huggingface_hub

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # anything that slips through fails at once
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, filename, revision=None: calls.append(("config", repo, revision))
                        or str(tiny_folder / filename))
    monkeypatch.setattr(huggingface_hub, "list_repo_files",
                        lambda repo, revision=None: ["config.json", "model.safetensors", "tokenizer.json", "x.gguf"])

    def snapshot_download(repo, revision=None, allow_patterns=None):
        calls.append(("snapshot", repo, revision, tuple(allow_patterns)))
        return str(tiny_folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    s = P.ModelSettings(source="qlw/tiny-llama", revision="v1", precision="4bit", device="cpu")
    est = models.estimate(s)
    assert est["parameters"] == TINY_PARAMETERS and est["source"] == "qlw/tiny-llama@v1" and est["shards"] == 0
    stages = []
    loaded = models.load_base_model(s, progress=lambda *a: stages.append(a))
    assert loaded.info["measured"]["footprint_bytes"] == est["footprint_bytes"]
    snapshot = [c for c in calls if c[0] == "snapshot"]
    assert snapshot == [("snapshot", "qlw/tiny-llama", "v1", tuple(models.HUB_PATTERNS))]  # no *.bin, no *.py
    assert ("downloading", 0, 0, "") == stages[2][:4]
    assert [a[1:4] for a in stages if a[0] == "loading weights"][-1] == (1.0, 1, "shards")


def write_config(folder: Path, tiny_folder: Path, drop=(), **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    raw = json.loads((tiny_folder / "config.json").read_text())
    for key in drop:
        raw.pop(key)
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def test_bad_sources_and_configs_get_clear_errors(tiny_folder, tmp_path):
    cases = [
        (settings(tmp_path / "nowhere"), "no model folder at", "source = "),
        (settings(tmp_path), "has no config.json", "source = "),
        (settings(write_config(tmp_path / "a", tiny_folder, drop=("hidden_size", "num_hidden_layers"))),
         "config.json lacks hidden_size, num_hidden_layers", "config.json"),
        (settings(write_config(tmp_path / "b", tiny_folder, drop=("model_type",))), "has no model_type", "config.json"),
        (settings(write_config(tmp_path / "c", tiny_folder, model_type="qlw-custom",
                               auto_map={"AutoConfig": "configuration_x.XConfig",
                                         "AutoModelForCausalLM": "modeling_x.XForCausalLM"})),
         "trust_remote_code is off", "config.json"),
        (settings(write_config(tmp_path / "d", tiny_folder, model_type="distilbert")),
         "not a causal language model", "config.json"),
        (settings(write_config(tmp_path / "e", tiny_folder, model_type="no-such-model")),
         "does not know the model type 'no-such-model'", "config.json"),
        (settings(tiny_folder, precision="3bit"), "precision must be one of 4bit, 8bit", "precision = '3bit'"),
        (settings(tiny_folder, attn_implementation="flash_attention_2"), "needs the flash-attn package",
         "attn_implementation"),
        (settings(tiny_folder, device="cuda:3"), "no cuda:3", "device = cuda:3"),
        (settings("not a valid id!"), "no model folder at", "source = "),
    ]
    for s, message, where in cases:
        with pytest.raises(JobError) as err:
            models.estimate(s)
        assert message in str(err.value), (s, str(err.value))
        assert where in err.value.where, (s, err.value.where)
    with pytest.raises(JobError) as err:
        models.estimate(settings(tmp_path / "c"))
    assert "only if you trust the source" in err.value.hint


def test_a_folder_without_weights_fails_clearly(tiny_folder, tmp_path):
    folder = write_config(tmp_path / "noweights", tiny_folder)
    with pytest.raises(JobError) as err:
        models.load_base_model(settings(folder, precision="bf16"))
    assert "could not load" in str(err.value) and err.value.where == f"source = {folder}"


# The inspector and cancellation ----------------------------------------------------------------


def test_inspector_groups_the_linear_modules_and_describes_the_tokenizer(tiny_folder):
    loaded = models.load_base_model(settings(tiny_folder, precision="4bit"))
    info = models.inspect_model(loaded.model, loaded.tokenizer)
    assert (info["architecture"], info["layers"], info["parameters"]) == ("LlamaForCausalLM", 2, TINY_PARAMETERS)
    groups = {g["name"]: g for g in info["linear_groups"]}
    assert [g["name"] for g in info["linear_groups"]] == [*GROUPS, "lm_head"]
    for name, shape in GROUPS.items():
        assert groups[name]["count"] == 2 and groups[name]["shapes"] == [shape], groups[name]
        assert groups[name]["quantized"] and groups[name]["in_all_linear"]
    assert groups["lm_head"]["in_all_linear"] is False and groups["lm_head"]["quantized"] is False
    tok = info["tokenizer"]
    assert tok["vocab_size"] == 3072 and tok["has_pad"] and tok["pad_fix"] == "" and tok["has_chat_template"]
    assert tok["special_tokens"] == {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": "<pad>"}
    assert tok["extra_special_tokens"] == ["<|system|>", "<|user|>", "<|assistant|>"]
    # Without a pad token: the usual fix is named.
    loaded.tokenizer.pad_token = None
    facts = models.tokenizer_facts(loaded.tokenizer)
    assert not facts["has_pad"] and facts["pad_fix"] == "tokenizer.pad_token = tokenizer.eos_token ('</s>')"
    json.dumps(info)  # plain data


def test_a_load_can_be_cancelled_between_tensors(tiny_folder):
    seen = []

    def progress(stage, done, total, unit="", message=""):
        seen.append((stage, done))

    def cancelled() -> bool:  # once the weights are half loaded
        return any(stage == "loading weights" and done >= 0.5 for stage, done in seen)

    with pytest.raises(JobCancelled):
        models.load_base_model(settings(tiny_folder, precision="4bit"), progress, cancelled)
    weights = [done for stage, done in seen if stage == "loading weights"]
    assert weights[0] == 0 and 0.5 <= weights[-1] < 1
    assert "tokenizer" not in {stage for stage, _ in seen}


def referrers(obj, depth: int = 3) -> list[str]:
    """Who keeps ``obj`` alive, for the failure message (frames say where)."""
    import types

    out, seen, layer = [], {id(obj)}, [obj]
    for level in range(depth):
        nxt = []
        for item in layer:
            for ref in gc.get_referrers(item):
                if id(ref) in seen or ref is layer or ref is nxt or isinstance(ref, list) and ref is gc.garbage:
                    continue
                seen.add(id(ref))
                if isinstance(ref, types.FrameType):
                    out.append(f"{level}: frame {ref.f_code.co_name} {ref.f_code.co_filename}:{ref.f_lineno}")
                else:
                    out.append(f"{level}: {type(ref).__name__}")
                nxt.append(ref)
        layer = nxt
    return out[:40]


class FakeContext:
    """What a job sees of the runner: progress and events recorded, never cancelled."""

    def __init__(self):
        self.events, self.progress_calls, self.cancelled = [], [], False

    def emit(self, kind, payload):
        self.events.append((kind, payload))

    def progress(self, *args):
        self.progress_calls.append(args)

    def check_cancelled(self):
        pass


def test_the_load_job_holds_the_model_and_replaces_the_previous_one(tiny_folder):
    ctx = FakeContext()
    first = models.load_job(P.LoadModel(source=str(tiny_folder), precision="4bit", device="cpu"))(ctx)
    held = HOLDINGS.get("base")
    old = weakref.ref(held)
    assert first["measured"]["footprint_bytes"] == first["estimate"]["footprint_bytes"]
    held_kinds = {h["name"]: h["kind"] for h in HOLDINGS.describe()}  # other rooms may hold caches too
    assert held_kinds["base"] == "model" and held_kinds["tokenizer"] == "tokenizer"
    del held
    models.load_job(P.LoadModel(source=str(tiny_folder), precision="bf16", device="cpu"))(ctx)
    gc.collect()
    assert old() is None, f"the first model is still referenced after the second load: {referrers(old())}"
    assert str(HOLDINGS.get("base").dtype) == "torch.bfloat16"
    loaded = [p for kind, p in ctx.events if kind == "model.loaded"]
    assert [p["settings"]["precision"] for p in loaded] == ["4bit", "bf16"]
    P.build(P.ModelLoaded, loaded[-1], "model.loaded")  # a valid event payload
    assert ("log", {"level": "info", "message": "released the previously loaded base model"}) in ctx.events
    with pytest.raises(JobError, match="precision must be one of"):  # refused before any job starts
        models.load_job(P.LoadModel(source=str(tiny_folder), precision="2bit"))


# Through a real backend --------------------------------------------------------------------------


async def wait_for(cond, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_estimate_load_inspect_and_replace_through_the_backend(backend_with_tiny):
    home = backend_with_tiny
    folder = str(tiny.tiny_model_path(home))

    async def body():
        events: list[P.Event] = []
        conn = await Connection.open(P.socket_path(home), "test-models", events.append)
        await conn.call(P.Attach())

        async def run_job(params, timeout=60.0) -> dict:
            job_id = (await conn.call(params))["job_id"]
            await wait_for(lambda: any(e.kind == "job.finished" and e.payload["job_id"] == job_id for e in events),
                           f"job {job_id}", timeout)
            return next(e.payload for e in events if e.kind == "job.finished" and e.payload["job_id"] == job_id)

        opts = await conn.call(P.ModelOptions())
        assert opts["tiny_ready"] and opts["tiny_path"] == folder and opts["offline"]
        assert opts["devices"][0]["device"] == "auto" and opts["devices"][-1]["device"] == "cpu"
        assert "sdpa" in opts["attn_implementations"] and "flash_attention_2" not in opts["attn_implementations"]
        assert (await conn.call(P.InspectModel())) == {"loaded": False}

        est = await conn.call(P.EstimateModel(source=folder, precision="4bit"), timeout=60)
        assert est["parameters"] == TINY_PARAMETERS and est["verdict"] == "fits" and est["device"] == "cpu"
        bad = await conn.request(P.EstimateModel(source=folder + "-missing"))
        assert bad.status == "error" and "no model folder" in bad.reason
        assert bad.result["error"]["where"] == f"source = {folder}-missing" and bad.result["error"]["hint"]

        done = await run_job(P.LoadModel(source=folder, precision="4bit"))
        assert done["status"] == "done", done
        assert done["result"]["measured"]["footprint_bytes"] == done["result"]["estimate"]["footprint_bytes"]
        weights = [e.payload for e in events if e.kind == "job.progress" and e.payload["stage"] == "loading weights"]
        assert weights and weights[-1]["done"] == weights[-1]["total"] == 1 and weights[-1]["unit"] == "shards"
        assert weights[-1]["message"] == "20 of 20 tensors"
        loaded = [e for e in events if e.kind == "model.loaded"]
        assert len(loaded) == 1 and loaded[0].seq is not None  # recorded with the session
        payload = P.event_payload(loaded[0])
        assert payload.settings["precision"] == "4bit" and payload.inspect["layers"] == 2
        inspected = await conn.call(P.InspectModel())
        assert inspected["quantization"].startswith("4-bit nf4") and inspected["load"]["settings"]["source"] == folder

        # A second load replaces the first: the backend holds one base model and one tokenizer.
        done = await run_job(P.LoadModel(source=folder, precision="bf16"))
        assert done["status"] == "done"
        assert (await conn.call(P.InspectModel()))["dtype"] == "bfloat16"
        freed = await run_job(P.FreeMemory())
        assert sorted(d["name"] for d in freed["result"]["dropped"]) == ["base", "tokenizer"]
        assert (await conn.call(P.InspectModel())) == {"loaded": False}

        # Offline, a Hub id fails at once, as a failed job with a message for people.
        failed = await run_job(P.LoadModel(source="mistralai/Mistral-7B-v0.3"), timeout=300)
        assert failed["status"] == "failed" and "HF_HUB_OFFLINE" in failed["error"]["message"]

        # The session's record holds the load config as plain data.
        replay: list[P.Event] = []
        other = await Connection.open(P.socket_path(home), "test-replay", replay.append)
        await other.call(P.Attach(session=loaded[0].session, since=0))
        recorded = [e.payload["settings"] for e in replay if e.kind == "model.loaded"]
        assert [r["precision"] for r in recorded] == ["4bit", "bf16"]
        started = [e.payload["params"] for e in replay if e.kind == "job.started" and e.payload["kind"] == "model.load"]
        assert started[0] == P.to_dict(P.LoadModel(source=folder, precision="4bit"))
        await other.close()
        await conn.close()

    asyncio.run(asyncio.wait_for(body(), 120))


def test_meta_model_build_does_not_leak_into_other_threads(tiny_folder, monkeypatch):
    """train.validate / model.estimate build meta models in worker threads while a load may run
    in the job thread: the load must get real tensors (seen: "Cannot copy out of meta tensor")."""
    import threading

    import torch
    import transformers

    inside, release = threading.Event(), threading.Event()
    real = transformers.AutoModelForCausalLM.from_config

    def slow_from_config(*args, **kwargs):
        model = real(*args, **kwargs)
        inside.set()
        release.wait(10)
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", slow_from_config)
    raw = json.loads((tiny_folder / "config.json").read_text())
    src = models.resolve_source(P.ModelSettings(source=str(tiny_folder)))
    built = {}
    t = threading.Thread(target=lambda: built.setdefault(
        "m", models._build_meta_model(raw, str(tiny_folder / "config.json"), src, False)))
    t.start()
    assert inside.wait(30)
    try:
        other = torch.nn.Linear(4, 4)  # another thread builds a module meanwhile
        assert other.weight.device.type == "cpu"
    finally:
        release.set()
        t.join(30)
    assert next(built["m"].parameters()).device.type == "meta"
