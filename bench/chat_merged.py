"""Chat decoding of a merged folder (issue 14): the fast path (a static KV cache and the compiled
decode step, as the 4-bit base's decode copy has) against the plain path, on the same model.

    python bench/chat_merged.py --model /tmp/qlw-7b     # GPU: the 7B-shaped model (bench/train_smoke.py)
    python bench/chat_merged.py --smoke                 # CPU: the tiny model (the fast path forced on)

Loads the model in 4-bit NF4 (``backend.models``), saves a random LoRA adapter (r=16, all linear
layers), merges it into the dequantised base in bf16 with ``backend.merge.run_merge`` (what the
Merge tab and ``qlw merge`` run), lets the base go, and loads the merged folder through the chat
engine (``chat.load`` of a ``merged:`` target: in bf16 as saved, the decode step compiled while
loading). Then, at batch 1, greedy, ``--tokens`` new tokens (EOS suppressed), after a full-length
warm-up each: ``--runs`` timed answers on the fast path and on the plain path (``model.generate``
with the dynamic cache, the path merged folders took before). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
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

from bench.chat import PROMPT, _summary, _sync, _timed, device_name, versions  # noqa: E402


def runs_on(engine, target, ids, tokens: int, runs: int, device: str, fast: bool) -> dict:
    """A full-length warm-up, then ``runs`` timed answers on one path."""
    from backend import protocol as P

    settings = P.ChatSettings(max_new_tokens=tokens, do_sample=False)
    extra = {"min_new_tokens": tokens}
    t = time.perf_counter()
    warm = engine.answer(target, ids, settings, fast=fast, extra=extra)
    if warm["error"]:
        raise RuntimeError(f"the answer failed: {warm['error']}")
    warmup_s = time.perf_counter() - t

    def one():
        _sync(device)
        result = engine.answer(target, ids, settings, fast=fast, extra=extra, on_delta=lambda text: None)
        _sync(device)
        if result["error"]:
            raise RuntimeError(f"the answer failed: {result['error']}")
        return result["elapsed_s"], result["ttft_s"], result["tokens"], (result["path"], result["output_ids"])

    times, ttfts, counts, extras, _cut = _timed(one, runs, None)
    logits = engine.logits(target, ids, fast=fast)
    return _summary(times, ttfts, counts) | {"path": "/".join(sorted({p for p, _ in extras})),
                                            "warmup_s": round(warmup_s, 2), "output_ids": extras[-1][1],
                                            "logits": logits}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="the tiny model on the CPU")
    ap.add_argument("--model", type=Path, default=None, help="the 7B-shaped folder (default /tmp/qlw-7b; built if missing)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per answer (default 256; 16 with --smoke)")
    ap.add_argument("--runs", type=int, default=3, help="timed answers per path (default 3)")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default bench/results/chat_merged.json)")
    args = ap.parse_args(argv)
    tokens = args.tokens or (16 if args.smoke else 256)
    out_path = args.out or ROOT / "bench" / "results" / ("chat_merged_smoke.json" if args.smoke else "chat_merged.json")
    if args.smoke:
        from backend.chat import decode_copy as _decode_copy

        os.environ.setdefault("QLW_CHAT_FAST", "1")
        _decode_copy.COMPILE_OVERRIDE = {"backend": "aot_eager", "mode": None}  # CPU: trace, no kernels
    from backend import chat, merge, models, protocol as P, tiny
    from backend.holdings import HOLDINGS

    home = Path(tempfile.mkdtemp(prefix="qlw-merged-bench-"))
    try:
        if args.smoke:
            folder = args.model or tiny.ensure_tiny_model(ROOT / ".pytest_cache" / "d" / "qlw-tiny")
            settings = P.ModelSettings(source=str(folder), precision="4bit", compute_dtype="fp32", device="cpu")
        else:
            folder = args.model or Path("/tmp/qlw-7b")
            if not (folder / "config.json").is_file():
                from bench.train_smoke import make_7b

                make_7b(folder)
            settings = P.ModelSettings(source=str(folder), precision="4bit", quant_type="nf4", double_quant=True,
                                       compute_dtype="bf16", device="auto")
        t0 = time.perf_counter()
        models.load_job(P.LoadModel(**P.to_dict(settings)))(chat.QuietContext())
        base, tokenizer = HOLDINGS.get("base"), HOLDINGS.get("tokenizer")
        device = str(chat._device_of(base))
        adapter = chat.make_random_adapter(base, home / "adapter", r=16)
        t = time.perf_counter()
        merged = merge.run_merge({"adapter": str(adapter), "out": str(home / "merged"),
                                  "dtype": "fp32" if args.smoke else "bf16", "into": "dequantized",
                                  "max_shard_size": "5GB", "verify": False}, home, chat.QuietContext())["out"]
        merge_s = time.perf_counter() - t
        template = "chat" if getattr(tokenizer, "chat_template", None) else "raw"
        ids, _ = chat.build_prompt(tokenizer, [{"role": "user", "content": PROMPT}], template)
        chat.ENGINE.release()
        models.release_base_model()
        target = chat.parse_target(f"merged:{merged}")
        t = time.perf_counter()
        ready = chat.ENGINE.prepare(target, home)
        prepare_s = time.perf_counter() - t
        print(f"{device_name(device)}: merged {merged} ({ready.get('precision')}), merge {merge_s:.1f} s, chat.load "
              f"{prepare_s:.1f} s (fast path {ready['fast_path']}); prompt {len(ids)} tokens, {tokens} new tokens, "
              f"{args.runs} runs per path", flush=True)
        rows = {"fast": runs_on(chat.ENGINE, target, ids, tokens, args.runs, device, True),
                "plain": runs_on(chat.ENGINE, target, ids, tokens, args.runs, device, False)}
        diff = float((rows["fast"].pop("logits") - rows["plain"].pop("logits")).abs().max())
        speedup = rows["fast"]["tokens_per_s"] / rows["plain"]["tokens_per_s"]
        same = sum(1 for a, b in zip(rows["fast"]["output_ids"], rows["plain"]["output_ids"]) if a == b)
        print(f"{'path':<7} {'tok/s':>8} {'runs':>24} {'ttft s':>8} {'warm-up s':>10}")
        for name, r in rows.items():
            print(f"{name:<7} {r['tokens_per_s']:>8.1f} {str(r['tokens_per_s_runs']):>24} {r['ttft_s']:>8.3f} "
                  f"{r['warmup_s']:>10.1f}  ({r['path']})")
        print(f"fast / plain: {speedup:.2f}x (target >= 3x: {'met' if speedup >= 3 else 'NOT met'}); next-token logits "
              f"max |diff| {diff:.4f}; greedy tokens equal before the first difference: "
              f"{next((i for i, (a, b) in enumerate(zip(rows['fast']['output_ids'], rows['plain']['output_ids'])) if a != b), same)}"
              f" of {len(rows['fast']['output_ids'])}", flush=True)
        record = {"benchmark": "chat_merged", "smoke": args.smoke,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "device": device_name(device), "host": platform.node(), "versions": versions(),
                  "model": str(settings.source), "merged_precision": ready.get("precision"), "tokens": tokens,
                  "merge_s": round(merge_s, 1), "prepare_s": round(prepare_s, 1), "fast_path": ready["fast_path"],
                  "rows": {k: {x: v for x, v in r.items() if x != "output_ids"} for k, r in rows.items()},
                  "speedup": round(speedup, 2), "logits_max_abs_diff": round(diff, 5), "met": speedup >= 3,
                  "elapsed_s": round(time.perf_counter() - t0, 1)}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {out_path}")
        return 0
    finally:
        chat.ENGINE.release()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
