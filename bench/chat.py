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
path allowed there with QLW_CHAT_FAST=1; 16 new tokens unless ``--tokens``).

Time: the phases run in the order qlw base, qlw tuned, bare base, bare tuned (qlw's figures are
the ones the issue asks for; the bare ones are the reference), and the JSON is rewritten after
each phase, so a run cut off keeps what it measured. ``--budget SECONDS`` (default 540, from the
start of the process, building the model included) skips a phase that would not end in time (its
estimate: the longest of the phases named in ``ESTIMATE_FROM`` measured before it, else nothing)
and stops a phase's timed runs early once the next run would pass it (at least one timed run is
kept); skipped phases say so in the table and the JSON. After the timed phases, a float32
reference (the same dequantised weights in float32: next-token logits and a greedy answer per
target) gives each row's distance from what bf16 approximates. On an H100 with the 7B
(2026-11-23, --runs 3): building the model 23 s, imports and load 20-48 s, qlw base 21-49 s (the
compile included), qlw tuned 11 s, bare base 56-62 s, bare tuned 91-99 s, reference 2-14 s:
about 4-5 minutes in all.
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
import traceback
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


def _timed(one, runs: int, deadline: float | None) -> tuple[list, list, list, list, int]:
    """Up to ``runs`` calls of ``one()`` -> (seconds, ttft, tokens, extra); stops before a run that
    would end past ``deadline`` (the last run's time as its estimate), keeping at least one."""
    times, ttfts, counts, extras = [], [], [], []
    for i in range(runs):
        if i and deadline is not None and time.perf_counter() + times[-1] > deadline:
            break
        t, ttft, n, extra = one()
        times.append(t)
        ttfts.append(ttft)
        counts.append(n)
        extras.append(extra)
    return times, ttfts, counts, extras, runs - len(times)


def bare_runs(model, ids, tokens: int, runs: int, device: str, pad: int | None,
              deadline: float | None = None) -> dict:
    """A full-length warm-up, then up to ``runs`` timed ``generate`` calls; tokens/s and time to
    first token."""
    import torch

    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    if pad is not None:
        kwargs["pad_token_id"] = pad
    x = torch.tensor([ids], device=model.device)
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kwargs)
    _sync(device)
    warmup_s = time.perf_counter() - t

    def one():
        streamer = _FirstToken()
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), streamer=streamer, **kwargs)
        _sync(device)
        return (time.perf_counter() - t0, (streamer.first_at or time.perf_counter()) - t0,
                int(out.shape[1] - x.shape[1]), out[0, x.shape[1]:].tolist())

    times, ttfts, counts, outs, cut = _timed(one, runs, deadline)
    with torch.no_grad():
        logits = model(input_ids=x, use_cache=False).logits[0, -1].float().cpu()
    return _summary(times, ttfts, counts) | {"logits": logits, "warmup_s": round(warmup_s, 2), "runs_cut": cut,
                                            "output_ids": outs[-1]}


def qlw_runs(engine, target, ids, tokens: int, runs: int, device: str, deadline: float | None = None) -> dict:
    from backend import protocol as P

    settings = P.ChatSettings(max_new_tokens=tokens, do_sample=False)
    extra = {"min_new_tokens": tokens}
    t = time.perf_counter()
    warm = engine.answer(target, ids, settings, extra=extra)
    if warm["error"]:
        raise RuntimeError(f"qlw answer failed: {warm['error']}")
    warmup_s = time.perf_counter() - t

    def one():
        _sync(device)
        result = engine.answer(target, ids, settings, extra=extra, on_delta=lambda text: None)
        _sync(device)
        if result["error"]:
            raise RuntimeError(f"qlw answer failed: {result['error']}")
        return result["elapsed_s"], result["ttft_s"], result["tokens"], (result["path"], result["output_ids"])

    times, ttfts, counts, extra, cut = _timed(one, runs, deadline)
    logits = engine.logits(target, ids)
    return _summary(times, ttfts, counts) | {"logits": logits, "path": "/".join(sorted({p for p, _ in extra})),
                                            "warmup_s": round(warmup_s, 2), "runs_cut": cut,
                                            "output_ids": extra[-1][1]}


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


PHASES = ("qlw/base", "qlw/tuned", "bare/base", "bare/tuned")
#: The phases measured earlier whose longest time estimates a phase's (the same target on the other
#: path; for bare tuned also bare base, whose full-length warm-up is the same).
ESTIMATE_FROM = {"qlw/tuned": ("qlw/base",), "bare/base": ("qlw/base",), "bare/tuned": ("qlw/tuned", "bare/base")}


def reference_logits(base, adapter: Path, ids: list[int], tokens: int = 0, pad: int | None = None) -> dict:
    """The next-token logits of the prompt computed in float32 from the same dequantised 4-bit
    weights (base, and base plus the LoRA delta in float32): the values both bf16 paths
    approximate, so their distances from it say how much of a difference is bf16's own noise.
    With ``tokens``, also the float32 model's greedy answer (``<target>_ids``): how long each bf16
    path's greedy answer stays the same as it measures how near the top logits are here."""
    import gc

    import torch
    from peft import PeftModel

    from backend import chat

    t = time.perf_counter()
    out = {}
    copy = chat.DecodeCopy(base, dtype=torch.float32)
    x = torch.tensor([ids], device=chat._device_of(base))
    peft = None

    def greedy(target: str) -> None:
        if tokens:
            kwargs = {"pad_token_id": pad} if pad is not None else {}
            got = copy.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=tokens,
                                      min_new_tokens=tokens, do_sample=False, **kwargs)
            out[f"{target}_ids"] = got[0, x.shape[1]:].tolist()

    try:
        with torch.no_grad():
            out["base"] = copy.model(input_ids=x, use_cache=False).logits[0, -1].float().cpu()
            greedy("base")
            peft = PeftModel.from_pretrained(base, str(adapter), is_trainable=False)
            copy.materialise(chat.lora_deltas(peft, "default"), "tuned")
            out["tuned"] = copy.model(input_ids=x, use_cache=False).logits[0, -1].float().cpu()
            greedy("tuned")
    finally:
        if peft is not None:
            peft.unload()
        del copy, peft
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    out["seconds"] = round(time.perf_counter() - t, 1)
    return out


def finish_rows(results: dict[str, dict], reference: dict | None = None) -> None:
    """Logit differences (against the bare row, and against the float32 reference when there is
    one), greedy agreement and speedups against the bare rows that exist so far."""
    from backend.data import common_prefix_length as _common_prefix
    for key, row in results.items():
        target = key.split("/")[1]
        if reference and target in reference:
            ref = reference[target]
            row["fp32_max_logit_diff"] = float((row["logits"] - ref).abs().max())
            row["fp32_argmax_equal"] = bool(int(row["logits"].argmax()) == int(ref.argmax()))
            if row.get("output_ids") is not None and f"{target}_ids" in reference:
                row["greedy_tokens_equal_to_fp32"] = _common_prefix(row["output_ids"], reference[f"{target}_ids"])
        bare = results.get("bare/" + target)
        if bare is None:
            row.pop("max_logit_diff", None)
            continue
        row["max_logit_diff"] = float((row["logits"] - bare["logits"]).abs().max())
        row["argmax_equal"] = bool(int(row["logits"].argmax()) == int(bare["logits"].argmax()))
        if row.get("output_ids") is not None and bare.get("output_ids") is not None:
            row["greedy_tokens_equal_to_bare"] = _common_prefix(row["output_ids"], bare["output_ids"])
        if key.startswith("qlw/") and bare["tokens_per_s"]:
            row["speedup"] = round(row["tokens_per_s"] / bare["tokens_per_s"], 2)


def print_table(results: dict[str, dict], phases: dict[str, dict]) -> None:
    header = (f"{'path':<12} {'target':<6} {'runs':>4} {'tokens/s':>9} {'± std':>6} {'ttft s':>7} "
              f"{'max|Δlogit|':>11} {'vs fp32':>8} {'=bare greedy':>12} {'=fp32 greedy':>12} {'speedup':>7} {'phase s':>7}")
    print()
    print(header)
    print("-" * len(header))
    for key in PHASES:
        kind, target = key.split("/")
        phase = phases.get(key, {"status": "not run"})
        row = results.get(key)
        if row is None:
            why = phase["status"] + (f": {phase['reason']}" if phase.get("reason") else "")
            print(f"{kind:<12} {target:<6} {'-':>4} {why}")
            continue
        path = kind if kind == "bare" else f"qlw {row['path']}"
        diff = f"{row['max_logit_diff']:>11.3g}" if "max_logit_diff" in row else f"{'-':>11}"
        diff += f" {row['fp32_max_logit_diff']:>8.3g}" if "fp32_max_logit_diff" in row else f" {'-':>8}"
        for field in ("greedy_tokens_equal_to_bare", "greedy_tokens_equal_to_fp32"):
            same = row.get(field)
            same_text = f"{same}/{len(row['output_ids'])}" if same is not None else "-"
            diff += f" {same_text:>12}"
        speed = f"{row['speedup']:>6.2f}x" if "speedup" in row else (f"{1.0:>6.2f}x" if kind == "bare" else f"{'-':>7}")
        print(f"{path:<12} {target:<6} {len(row['tokens']):>4} {row['tokens_per_s']:>9.1f} {row['tokens_per_s_std']:>6.1f} "
              f"{row['ttft_s']:>7.3f} {diff} {speed} {phase.get('seconds', 0):>7.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the tiny model on the CPU")
    ap.add_argument("--model", type=Path, default=None,
                    help="the 7B-shaped folder (default /tmp/qlw-7b; built there by bench/train_smoke.py's make_7b "
                         "when missing); with --smoke: a tiny model folder (default: the tests' cached tiny model)")
    ap.add_argument("--layers", type=int, default=32,
                    help="decoder layers when the model is built here (default 32 = Mistral-7B; fewer: a quick "
                         "check of the code path on the GPU, not the benchmark's figure)")
    ap.add_argument("--tokens", type=int, default=None,
                    help="new tokens per run, the warm-up included (default 256; 16 with --smoke)")
    ap.add_argument("--runs", type=int, default=2, help="timed runs per path and target (default 2)")
    ap.add_argument("--budget", type=float, default=540.0,
                    help="seconds from the start for the whole bench (default 540): phases that would not end in "
                         "time are skipped, and the table says so")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON results (default bench/results/chat.json, chat_smoke.json with --smoke)")
    args = ap.parse_args(argv)
    tokens = args.tokens or (16 if args.smoke else 256)
    out_path = args.out or ROOT / "bench" / "results" / ("chat_smoke.json" if args.smoke else "chat.json")
    t_start = time.perf_counter()
    deadline = t_start + args.budget
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

            made = make_7b(folder, layers=args.layers)
        settings = P.ModelSettings(source=str(folder), precision="4bit", quant_type="nf4", double_quant=True,
                                   compute_dtype="bf16", device="auto")
    load = lambda: models.load_job(P.LoadModel(**P.to_dict(settings)))(chat.QuietContext())  # noqa: E731
    t = time.perf_counter()
    load()
    load_s = time.perf_counter() - t
    base, tokenizer = HOLDINGS.get("base"), HOLDINGS.get("tokenizer")
    device = str(chat._device_of(base))
    adapter = chat.make_random_adapter(base, Path(tempfile.mkdtemp(prefix="qlw-bench-adapter-")) / "adapter", r=16)
    template = "chat" if getattr(tokenizer, "chat_template", None) else "raw"
    ids, _text = chat.build_prompt(tokenizer, [{"role": "user", "content": PROMPT}], template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    setup_s = time.perf_counter() - t_start
    print(f"{device_name(device)}: {settings.source} in 4-bit, loaded in {load_s:.1f} s (imports, load and the "
          f"adapter: {setup_s:.1f} s); prompt {len(ids)} tokens, {tokens} new tokens, {args.runs} runs after a "
          f"full-length warm-up; budget {args.budget:.0f} s", flush=True)

    results: dict[str, dict] = {}
    phases: dict[str, dict] = {"setup": {"status": "done", "seconds": round(setup_s, 1)}}
    record = {
        "benchmark": "chat", "smoke": args.smoke, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": device_name(device), "versions": versions(), "model": str(settings.source),
        "settings": P.to_dict(settings), "made_model": made, "load_s": round(load_s, 2), "prompt_tokens": len(ids),
        "new_tokens": tokens, "runs": args.runs, "budget_s": args.budget,
        "adapter": {"r": 16, "target_modules": "all-linear", "init": "random A and B"},
        "order": list(PHASES),
    }

    reference: dict = {}

    def write(complete: bool) -> None:
        finish_rows(results, reference)
        record.update(phases=phases, complete=complete, wall_s=round(time.perf_counter() - t_start, 1),
                      rows={k: {kk: vv for kk, vv in v.items() if kk not in ("logits", "output_ids")}
                            for k, v in results.items()})
        if device.startswith("cuda"):
            record["torch_peak_bytes"] = int(torch.cuda.max_memory_allocated())
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out_path)

    write(False)
    engine = chat.ENGINE
    targets = {"base": chat.parse_target("base"), "tuned": chat.parse_target(f"tuned:{adapter}")}
    released = False

    def run_phase(key: str) -> dict:
        nonlocal released
        kind, name = key.split("/")
        if kind == "qlw":
            t = time.perf_counter()
            ready = engine.prepare(targets[name], ROOT)
            prepare_s = time.perf_counter() - t
            row = qlw_runs(engine, targets[name], ids, tokens, args.runs, device, deadline)
            row["prepare_s"] = round(prepare_s, 2)
            row["fast_path"] = ready["fast_path"]
            return row
        if not released:  # the bare runs see the base as loaded: no adapter, no decode copy
            engine.release(merged=True)
            chat.forget_compiled()
            released = True
            if HOLDINGS.get("base") is None:  # release drops a base it could not take LoRA layers out of
                load()
        base = HOLDINGS.get("base")
        if name == "base":
            return bare_runs(base, ids, tokens, args.runs, device, pad, deadline)
        from peft import PeftModel

        peft = PeftModel.from_pretrained(base, str(adapter), is_trainable=False)
        peft.eval()
        try:
            return bare_runs(peft, ids, tokens, args.runs, device, pad, deadline)
        finally:
            peft.unload()
            del peft

    failed = False
    for key in PHASES:
        now = time.perf_counter()
        est = max([phases.get(k, {}).get("seconds", 0.0) for k in ESTIMATE_FROM.get(key, ())] or [0.0])
        if now >= deadline or now + est > deadline:
            left = deadline - now
            phases[key] = {"status": "skipped", "reason": f"budget: {max(left, 0):.0f} s left"
                           + (f", about {est:.0f} s needed" if est else "")}
            print(f"  {key}: skipped ({phases[key]['reason']})", flush=True)
            write(False)
            continue
        try:
            row = run_phase(key)
        except Exception as exc:  # keep what the other phases measured
            traceback.print_exc()
            failed = True
            phases[key] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:300],
                           "seconds": round(time.perf_counter() - now, 1)}
            print(f"  {key}: failed after {phases[key]['seconds']:.0f} s: {phases[key]['reason']}", flush=True)
            write(False)
            continue
        seconds = time.perf_counter() - now
        results[key] = row
        phases[key] = {"status": "done" if not row["runs_cut"] else "cut",
                       "seconds": round(seconds, 1), "warmup_s": row["warmup_s"]}
        if row["runs_cut"]:
            phases[key]["reason"] = f"budget: {row['runs_cut']} timed run(s) left out"
        where = f" on the {row['path']} path (prepare {row['prepare_s']:.1f} s)" if key.startswith("qlw/") else ""
        print(f"  {key}: {row['tokens_per_s']} tokens/s{where}; {len(row['tokens'])} runs, warm-up "
              f"{row['warmup_s']:.1f} s, phase {seconds:.1f} s", flush=True)
        write(False)

    # The float32 reference of the next-token logits (after the timed phases: it holds a float32 copy).
    now = time.perf_counter()
    if now + 60 > deadline:
        phases["reference"] = {"status": "skipped", "reason": f"budget: {max(deadline - now, 0):.0f} s left"}
    else:
        try:
            if HOLDINGS.get("base") is None:
                load()
            reference.update(reference_logits(HOLDINGS.get("base"), adapter, ids, tokens, pad))
            phases["reference"] = {"status": "done", "seconds": reference.pop("seconds")}
        except Exception as exc:
            traceback.print_exc()
            phases["reference"] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:300]}
    print(f"  float32 reference: {phases['reference']['status']}"
          + (f" ({phases['reference'].get('reason') or str(phases['reference'].get('seconds')) + ' s'})"), flush=True)

    complete = all(phases.get(k, {}).get("status") == "done" for k in PHASES)
    write(complete)
    print_table(results, phases)
    wall = time.perf_counter() - t_start
    fast = results.get("qlw/base", {}).get("fast_path", "not measured")
    print(f"\nwall time {wall:.0f} s (setup {setup_s:.0f} s, budget {args.budget:.0f} s); fast path: {fast}"
          + ("" if complete else "; INCOMPLETE: see the phases above"))
    print(f"wrote {out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
