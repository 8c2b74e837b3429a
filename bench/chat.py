"""Chat decoding speed (issue 6): bare ``model.generate`` against qlw's chat path, base and tuned.

    python bench/chat.py --model /tmp/qlw-7b          # GPU machine (builds the model there if missing)
    python bench/chat.py --smoke                      # CPU: the tiny model, the same code, in seconds

Loads a Mistral-7B-v0.3-shaped random model (bench/train_smoke.py's ``make_7b``; ``--model DIR``
reuses a folder it saved) in 4-bit NF4 through ``backend.models.load_base_model``, saves a LoRA
adapter with random A and B (r=16, all linear layers: it changes the outputs), then for the base
and the tuned target measures, at batch 1 with greedy decoding of ``--tokens`` new tokens (EOS
suppressed, so every run decodes the same count), after one full-length warm-up, ``--runs`` timed
runs of:

- bare: ``model.generate`` on the 4-bit model (peft's ``PeftModel`` with the adapter on for tuned);
- qlw: ``backend.chat.ChatEngine.answer``, the code behind ``chat.send`` (streamer, stop criterion,
  the fast decode copy with a static cache when it applies; ``path`` says which ran).

The table gives tokens/s (new tokens over the generate call's wall time), time to first token,
and the largest absolute difference of the next-token logits from the bare model's on the same
prompt (``ChatEngine.logits``, through the same path as the answers). ``prepare_s`` is what
``chat.load`` takes (the decode copy and its compile warm-up). Writes --out as JSON (device,
versions, date). ``--smoke`` runs it on the embedded tiny model on the CPU (fp32 compute, the fast
path allowed there with QLW_CHAT_FAST=1).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the backend does

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _FirstToken:
    """A streamer that only notes when the first new token arrived (for the bare runs)."""

    def __init__(self):
        self.calls = 0
        self.first_at = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first_at is None:  # the first call carries the prompt
            self.first_at = time.perf_counter()

    def end(self):
        pass


def bare_runs(model, ids, tokens: int, runs: int, device: str, pad: int | None) -> dict:
    """Warm-up, then ``runs`` timed ``generate`` calls; tokens/s and time to first token."""
    import torch

    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    if pad is not None:
        kwargs["pad_token_id"] = pad
    x = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kwargs)
    times, ttfts, counts = [], [], []
    for _ in range(runs):
        streamer = _FirstToken()
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), streamer=streamer, **kwargs)
        _sync(device)
        times.append(time.perf_counter() - t0)
        ttfts.append((streamer.first_at or time.perf_counter()) - t0)
        counts.append(int(out.shape[1] - x.shape[1]))
    with torch.no_grad():
        logits = model(input_ids=x, use_cache=False).logits[0, -1].float().cpu()
    return _summary(times, ttfts, counts) | {"logits": logits}


def qlw_runs(engine, target, ids, tokens: int, runs: int, device: str) -> dict:
    from backend import protocol as P

    settings = P.ChatSettings(max_new_tokens=tokens, do_sample=False)
    extra = {"min_new_tokens": tokens}
    warm = engine.answer(target, ids, settings, extra=extra)
    if warm["error"]:
        raise RuntimeError(f"qlw answer failed: {warm['error']}")
    times, ttfts, counts, paths = [], [], [], set()
    for _ in range(runs):
        _sync(device)
        result = engine.answer(target, ids, settings, extra=extra, on_delta=lambda text: None)
        _sync(device)
        times.append(result["elapsed_s"])
        ttfts.append(result["ttft_s"])
        counts.append(result["tokens"])
        paths.add(result["path"])
    logits = engine.logits(target, ids)
    return _summary(times, ttfts, counts) | {"logits": logits, "path": "/".join(sorted(paths))}


def _summary(times, ttfts, counts) -> dict:
    return {"tokens": counts, "seconds": [round(t, 4) for t in times],
            "tokens_per_s": round(sum(counts) / sum(times), 2),
            "tokens_per_s_runs": [round(c / t, 2) for c, t in zip(counts, times)],
            "tokens_per_s_std": round(statistics.pstdev([c / t for c, t in zip(counts, times)]), 2),
            "ttft_s": round(statistics.median(ttfts), 4)}


def versions() -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}
    return out


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the tiny model on the CPU")
    ap.add_argument("--model", type=Path, default=None,
                    help="the 7B-shaped folder (default /tmp/qlw-7b; built there by bench/train_smoke.py's make_7b "
                         "when missing); with --smoke: a tiny model folder (default: the tests' cached tiny model)")
    ap.add_argument("--tokens", type=int, default=256, help="new tokens per run (default 256)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per path and target (default 3)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON results (default bench/results/chat.json, chat_smoke.json with --smoke)")
    args = ap.parse_args(argv)
    out_path = args.out or ROOT / "bench" / "results" / ("chat_smoke.json" if args.smoke else "chat.json")
    t_start = time.perf_counter()
    if args.smoke:
        os.environ.setdefault("QLW_CHAT_FAST", "1")  # let the fast path run on the CPU too

    import torch

    from backend import chat, models, protocol as P, tiny
    from backend.holdings import HOLDINGS

    made = None
    if args.smoke:
        # The tests' cached tiny model (tests/backend/test_train.py's fixture): built once.
        folder = args.model or tiny.ensure_tiny_model(ROOT / ".pytest_cache" / "d" / "qlw-tiny")
        settings = P.ModelSettings(source=str(folder), precision="4bit", compute_dtype="fp32", device="cpu")
    else:
        folder = args.model or Path("/tmp/qlw-7b")
        if not (folder / "config.json").is_file():
            from bench.train_smoke import make_7b

            made = make_7b(folder)
        settings = P.ModelSettings(source=str(folder), precision="4bit", quant_type="nf4", double_quant=True,
                                   compute_dtype="bf16", device="auto")
    t = time.perf_counter()
    models.load_job(P.LoadModel(**P.to_dict(settings)))(chat.QuietContext())
    load_s = time.perf_counter() - t
    base, tokenizer = HOLDINGS.get("base"), HOLDINGS.get("tokenizer")
    device = str(chat._device_of(base))
    adapter = chat.make_random_adapter(base, Path(tempfile.mkdtemp(prefix="qlw-bench-adapter-")) / "adapter", r=16)
    template = "chat" if getattr(tokenizer, "chat_template", None) else "raw"
    ids, _text = chat.build_prompt(tokenizer, [{"role": "user", "content": PROMPT}], template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    print(f"{device_name(device)}: {settings.source} in 4-bit, loaded in {load_s:.1f} s; prompt {len(ids)} tokens, "
          f"{args.tokens} new tokens, {args.runs} runs after a warm-up", flush=True)

    results: dict[str, dict] = {}
    t = time.perf_counter()
    results["bare/base"] = bare_runs(base, ids, args.tokens, args.runs, device, pad)
    print(f"  bare base: {results['bare/base']['tokens_per_s']} tokens/s ({time.perf_counter() - t:.0f} s)", flush=True)
    from peft import PeftModel

    t = time.perf_counter()
    peft = PeftModel.from_pretrained(base, str(adapter), is_trainable=False)
    peft.eval()
    results["bare/tuned"] = bare_runs(peft, ids, args.tokens, args.runs, device, pad)
    peft.unload()
    del peft
    print(f"  bare tuned: {results['bare/tuned']['tokens_per_s']} tokens/s ({time.perf_counter() - t:.0f} s)", flush=True)

    engine = chat.ENGINE
    for name, target in (("base", chat.parse_target("base")), ("tuned", chat.parse_target(f"tuned:{adapter}"))):
        t = time.perf_counter()
        ready = engine.prepare(target, ROOT)
        prepare_s = time.perf_counter() - t
        row = qlw_runs(engine, target, ids, args.tokens, args.runs, device)
        row["prepare_s"] = round(prepare_s, 2)
        row["fast_path"] = ready["fast_path"]
        results[f"qlw/{name}"] = row
        print(f"  qlw {name}: {row['tokens_per_s']} tokens/s on the {row['path']} path (prepare {prepare_s:.1f} s, "
              f"{time.perf_counter() - t:.0f} s)", flush=True)

    for key, row in results.items():
        bare = results["bare/" + key.split("/")[1]]["logits"]
        row["max_logit_diff"] = float((row["logits"] - bare).abs().max())
        row["argmax_equal"] = bool(int(row["logits"].argmax()) == int(bare.argmax()))
    for key in ("qlw/base", "qlw/tuned"):
        bare = results["bare/" + key.split("/")[1]]
        results[key]["speedup"] = round(results[key]["tokens_per_s"] / bare["tokens_per_s"], 2)

    header = f"{'path':<12} {'target':<6} {'tokens/s':>9} {'± std':>6} {'ttft s':>7} {'max|Δlogit|':>11} {'speedup':>7}"
    print()
    print(header)
    print("-" * len(header))
    for key, row in results.items():
        kind, target = key.split("/")
        path = kind if kind == "bare" else f"qlw {row['path']}"
        print(f"{path:<12} {target:<6} {row['tokens_per_s']:>9.1f} {row['tokens_per_s_std']:>6.1f} "
              f"{row['ttft_s']:>7.3f} {row['max_logit_diff']:>11.3g} {row.get('speedup', 1.0):>6.2f}x")
    wall = time.perf_counter() - t_start
    print(f"\nwall time {wall:.0f} s; fast path: {results['qlw/base']['fast_path']}")

    record = {
        "benchmark": "chat", "smoke": args.smoke, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": device_name(device), "versions": versions(), "model": str(settings.source),
        "settings": P.to_dict(settings), "made_model": made, "load_s": round(load_s, 2), "prompt_tokens": len(ids),
        "new_tokens": args.tokens, "runs": args.runs, "adapter": {"r": 16, "target_modules": "all-linear",
                                                                   "init": "random A and B"},
        "rows": {k: {kk: vv for kk, vv in v.items() if kk != "logits"} for k, v in results.items()},
        "wall_s": round(wall, 1),
    }
    if device.startswith("cuda"):
        record["torch_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
