"""Training figures (issue 5): qlw's training code on the CPU, and the 7B QLoRA run on a GPU.

    python bench/train_smoke.py --out bench/results/train_smoke.json        # CPU: the tiny model
    python bench/train_smoke.py --make-7b /tmp/qlw-7b                       # GPU machine: see below
    python -m backend train bench/train_7b.toml --home /tmp/qlw-gpu         # what `qlw train` runs
    python bench/train_smoke.py --oom /tmp/qlw-7b --out bench/results/train_oom.json   # GPU: a real OOM

CPU (default): runs ``backend.train.run_training`` (the code behind ``train.start`` and ``qlw
train``) on the embedded tiny model and the shipped sample dataset, in this process: fp32 LoRA
r=16 for 30 steps (batch 4, 256 tokens, validation every 10 steps), then the defaults a user gets
(4-bit NF4, r=16, batch 4 x 4, 1,024 tokens; on the CPU the optimizer becomes adamw_torch and the
compute dtype fp32) for 6 steps. Prints the loss table and writes steps/s, tokens/s, losses and
wall times to --out.

GPU: ``--make-7b DIR`` saves a Mistral-7B-v0.3-shaped model with random bf16 weights (hidden 4096,
32 layers, vocab 32768; 14.5 GB of safetensors) and the tiny model's tokenizer (its ids fit the
vocabulary; its chat template marks the assistant turns) into DIR, as bench/model_estimate.py
does for the estimate. ``bench/train_7b.toml`` then trains it in 4-bit NF4 with the QLoRA paper's
settings for 50 steps (``model.source`` is /tmp/qlw-7b; override with QLW_MODEL__SOURCE=DIR). On
random weights the loss starts near ln(32768) = 10.4; what the run measures is that the whole path
works on the GPU, its throughput, and the peak memory against ``train.validate``'s estimate.
``--oom DIR`` trains the same model with a batch that cannot fit (128 rows, no gradient
checkpointing) and records the clean end: the alert, what was freed, that the base model is kept
and a small run trains right after in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the backend does

from backend import tiny, train, train_config as TC  # noqa: E402
from sessions.store import Store  # noqa: E402


def local_run(home: Path, quiet: bool = False) -> tuple[train.LocalRun, list]:
    events: list = []
    printer = train._PlainPrinter()

    def on_event(kind, payload):
        events.append((kind, payload))
        if not quiet and kind != "job.progress":
            printer.event(kind, payload)

    store = Store(home / "sessions.db")
    return train.LocalRun(store, store.create_session("bench").id, on_event), events


def figures(events: list, wall: float) -> dict:
    rows = [p for k, p in events if k == "train.log"]
    finished = next((p for k, p in events if k == "train.finished"), {})
    started = next((p for k, p in events if k == "train.started"), {})
    train_rows = [r for r in rows if r["loss"] is not None]
    first, last = (train_rows[0], train_rows[-1]) if train_rows else ({}, {})
    steps = (last.get("step", 0) - first.get("step", 0)) if train_rows else 0
    span = (last.get("elapsed_s", 0) - first.get("elapsed_s", 0)) if train_rows else 0
    return {
        "total_steps": started.get("total_steps"), "trainable_params": started.get("trainable_params"),
        "steps_per_s": round(steps / span, 3) if span else None,
        "tokens_per_s": finished.get("tokens_per_s"),
        "losses": {r["step"]: round(r["loss"], 4) for r in train_rows},
        "eval_losses": {r["step"]: round(r["eval_loss"], 4) for r in rows if r["eval_loss"] is not None},
        "final_loss": finished.get("final_loss"), "final_eval_loss": finished.get("final_eval_loss"),
        "elapsed_s": finished.get("elapsed_s"), "wall_s": round(wall, 2), "peak_memory": finished.get("peak_memory"),
        "alerts": [p for k, p in events if k == "train.alert"],
    }


def cpu(out: Path | None) -> dict:
    home = Path(tempfile.mkdtemp(prefix="qlw-bench-", dir="/tmp"))
    try:
        t = time.perf_counter()
        tiny.ensure_tiny_model(home)
        built = time.perf_counter() - t
        results = {"tiny_build_s": round(built, 2)}
        fp32 = TC.defaults()
        fp32["model"].update(precision="fp32", device="cpu")
        fp32["data"]["max_length"] = 256
        fp32["training"].update(max_steps=30, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                                learning_rate=2e-3, logging_steps=1, eval_steps=10, gradient_checkpointing=False,
                                optim="adamw_torch")
        defaults = TC.defaults()
        defaults["training"].update(max_steps=6, logging_steps=1)
        for name, config in (("fp32_r16_b4_len256", fp32), ("defaults_4bit_b4x4_len1024", defaults)):
            print(f"\n== {name}")
            run, events = local_run(home)
            t = time.perf_counter()
            train.run_training(config, home, run)
            results[name] = {"config": config, **figures(events, time.perf_counter() - t)}
            from backend import models

            models.release_base_model()
        return results
    finally:
        shutil.rmtree(home, ignore_errors=True)


def make_7b(folder: Path, layers: int = 32) -> dict:
    """A Mistral-7B-shaped model with random bf16 weights and the tiny model's tokenizer
    (``layers`` < 32: the same widths with fewer decoder layers, for a quick check of a code path)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig

    cfg = MistralConfig(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                        rope_theta=1_000_000.0, sliding_window=None, head_dim=128, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, max_shard_size="5GB")
    params = model.num_parameters()
    del model
    home = Path(tempfile.mkdtemp(prefix="qlw-tok-", dir="/tmp"))
    tokenizer = AutoTokenizer.from_pretrained(tiny.ensure_tiny_model(home))
    tokenizer.save_pretrained(folder)
    shutil.rmtree(home, ignore_errors=True)
    info = {"folder": str(folder), "parameters": params, "seconds": round(time.perf_counter() - t, 1)}
    print(json.dumps(info))
    return info


def oom(folder: Path) -> dict:
    """A batch that cannot fit ends cleanly; the base model stays; a small run trains after it."""
    import torch

    from backend.holdings import HOLDINGS
    from backend.jobs import JobError

    home = Path(tempfile.mkdtemp(prefix="qlw-oom-", dir="/tmp"))
    config, errors = TC.read_toml(ROOT / "bench" / "train_7b.toml")
    assert not errors, errors
    config["model"]["source"] = str(folder)
    big = json.loads(json.dumps(config))
    big["data"]["max_length"] = 4096
    big["training"].update(per_device_train_batch_size=128, gradient_accumulation_steps=1,
                           gradient_checkpointing=False, max_steps=3, eval_steps=0, save_steps=0)
    big["data"]["split_mode"] = "none"
    run, events = local_run(home)
    t = time.perf_counter()
    try:
        train.run_training(big, home, run)
        ended = "no OOM (the card is bigger than expected)"
    except JobError as exc:
        ended = f"{exc} | where: {exc.where} | hint: {exc.hint}"
    result = {"ended": ended, "seconds": round(time.perf_counter() - t, 1),
              "alert": next((p for k, p in events if k == "train.alert"), None),
              "finished": next((p for k, p in events if k == "train.finished"), None),
              "base_model_kept": HOLDINGS.get("base") is not None, "holdings": HOLDINGS.describe(),
              "torch_allocated_after_mib": round(torch.cuda.memory_allocated() / 2**20, 1),
              "torch_reserved_after_mib": round(torch.cuda.memory_reserved() / 2**20, 1)}
    small = json.loads(json.dumps(config))
    small["training"].update(max_steps=5, logging_steps=1, eval_steps=0, save_steps=0)
    run, events = local_run(home)
    t = time.perf_counter()
    train.run_training(small, home, run)
    result["after"] = figures(events, time.perf_counter() - t)
    shutil.rmtree(home, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--make-7b", type=Path, default=None, metavar="DIR", help="save the 7B-shaped model to DIR")
    parser.add_argument("--oom", type=Path, default=None, metavar="DIR", help="a real CUDA OOM on the model in DIR")
    args = parser.parse_args()
    if args.make_7b:
        result = make_7b(args.make_7b)
    elif args.oom:
        result = oom(args.oom)
    else:
        result = cpu(args.out)
    import torch

    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                         "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
