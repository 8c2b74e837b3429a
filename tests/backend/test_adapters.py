"""backend/adapters.py: finding adapters, refusing broken or mismatched ones, attaching them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from backend import adapters as A  # noqa: E402
from backend.jobs import JobError  # noqa: E402


def tiny_llama(hidden: int = 32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def save_adapter(model, folder: Path, r: int = 4) -> Path:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # a non-zero B, so the adapter changes the outputs
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(str(folder))
    peft_model.unload()
    return folder


@pytest.fixture
def run(tmp_path):
    """A data home with one session's run: config.toml, adapter/, checkpoints/checkpoint-4."""
    home = tmp_path / "home"
    run = home / "runs" / "20261123-000000-abcdef"
    save_adapter(tiny_llama(), run / "adapter")
    ckpt = run / "checkpoints" / "checkpoint-4"
    shutil.copytree(run / "adapter", ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps(
        {"global_step": 4, "log_history": [{"loss": 2.5, "step": 2}, {"loss": 2.25, "step": 4},
                                           {"eval_loss": 2.4, "step": 4}]}))
    (run / "config.toml").write_text('version = 1\n[model]\nsource = "/models/base"\nprecision = "bf16"\n'
                                     'revision = ""\ntrust_remote_code = false\nquant_type = "nf4"\n'
                                     'double_quant = true\ncompute_dtype = "bf16"\nattn_implementation = "sdpa"\n'
                                     'device = "cpu"\n')
    return home, run


def test_lists_a_sessions_adapter_and_checkpoints_with_their_settings_and_losses(run):
    home, folder = run
    found = A.list_adapters(home)
    assert {a["kind"] for a in found} == {"adapter", "checkpoint"}
    final = next(a for a in found if a["kind"] == "adapter")
    ckpt = next(a for a in found if a["kind"] == "checkpoint")
    assert final["session"] == folder.name and final["r"] == 4 and final["lora_alpha"] == 8
    assert final["target_modules"] == sorted(final["target_modules"]) and "q_proj" in final["target_modules"]
    assert ckpt["step"] == 4 and ckpt["final_loss"] == 2.25 and ckpt["final_eval_loss"] == 2.4
    assert final["final_loss"] == 2.25  # the final adapter takes its run's newest checkpoint's losses
    assert final["run_config"] == str(folder / "config.toml")
    assert final["method"] == ckpt["method"] == "sft"  # a config without `method` is an SFT run's


def test_an_adapter_names_the_method_its_run_trained_with(run):
    home, folder = run
    config = folder / "config.toml"
    config.write_text('method = "dpo"\n' + config.read_text())
    assert {a["method"] for a in A.list_adapters(home)} == {"dpo"}
    config.unlink()  # no run config: taken for SFT (as before methods existed)
    assert {a["method"] for a in A.list_adapters(home)} == {"sft"}


def test_broken_adapters_are_refused_with_a_reason_before_any_model_is_touched(run, tmp_path):
    home, folder = run
    bad = tmp_path / "truncated"
    shutil.copytree(folder / "adapter", bad)
    weights = bad / A.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(JobError, match="truncated") as exc:
        A.inspect_adapter(bad)
    assert exc.value.hint
    weights.write_bytes(b"\x01\x02")
    with pytest.raises(JobError, match="empty or truncated"):
        A.inspect_adapter(bad)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(JobError, match="not a valid safetensors"):
        A.inspect_adapter(bad)
    (bad / A.CONFIG_FILE).write_text("{not json")
    with pytest.raises(JobError, match="cannot be read as JSON"):
        A.inspect_adapter(bad)
    (bad / A.CONFIG_FILE).unlink()
    with pytest.raises(JobError, match="not a peft adapter"):
        A.inspect_adapter(bad)
    with pytest.raises(JobError, match="no adapter folder"):
        A.inspect_adapter(tmp_path / "nowhere")
    assert all(a["path"] != str(bad) for a in A.list_adapters(home))


def test_an_adapter_for_another_base_is_refused_and_a_matching_one_attaches(run):
    _home, folder = run
    other = tiny_llama(hidden=48)
    with pytest.raises(JobError, match="trained for another base model") as exc:
        A.check_against_base(folder / "adapter", other)
    assert "in_features" in str(exc.value) or "out_features" in str(exc.value)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64))
    with pytest.raises(JobError, match="do not exist"):
        A.check_against_base(folder / "adapter", gpt2)

    base = tiny_llama()
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        plain = base(ids).logits
    tuned = A.attach_adapter(base, folder / "adapter")
    with torch.no_grad():
        with_adapter = tuned(ids).logits
        with tuned.disable_adapter():
            without = tuned(ids).logits
    assert not torch.allclose(with_adapter, plain)
    assert torch.equal(without, plain)


def test_the_base_an_adapter_was_trained_on_comes_from_its_run_config(run, tmp_path):
    home, folder = run
    s = A.base_settings_for(folder / "checkpoints" / "checkpoint-4", home)
    assert s.source == "/models/base" and s.precision == "bf16" and s.device == "cpu"
    loose = tmp_path / "loose"
    shutil.copytree(folder / "adapter", loose)
    cfg = json.loads((loose / A.CONFIG_FILE).read_text())
    cfg["base_model_name_or_path"] = "org/some-model"
    (loose / A.CONFIG_FILE).write_text(json.dumps(cfg))
    s = A.base_settings_for(loose, home)
    assert s.source == "org/some-model" and s.precision == "4bit"
