"""GPU benchmark for the monitor and the one-key cleanup (issue 3).

    python bench/gpu_cleanup.py            # on the GPU machine: Mistral-7B shape, 4-bit nf4
    python bench/gpu_cleanup.py --smoke    # anywhere: a tiny model of the same architecture

1. Measures the CUDA context alone (a fresh context, nothing allocated) through NVML.
2. Builds a Mistral-7B-shaped model with random weights on the GPU, saves it, and loads it back
   through the real 4-bit path (bitsandbytes nf4, double quantisation, bf16 compute).
3. Trains LoRA (r=16, all linear layers) with trl's SFTTrainer and paged_adamw_8bit, in blocks
   of steps with the backend's GPU sampler (1 s) off and on, alternated, and compares the
   throughput of the two.
4. Puts model, trainer, optimizer and tokenizer into the backend's holdings, drops every other
   reference, and runs the backend's free_memory: torch reserved and the process's NVML memory
   before and after.
Prints a table and writes gpu_cleanup.json (to --out).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# As the backend does (backend/__main__.py): expandable segments let empty_cache give back the
# free parts of a segment that one surviving tensor would otherwise pin. --no-expandable turns
# it off to compare.
if "--no-expandable" not in sys.argv:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

from backend import protocol as P  # noqa: E402
from backend.gpu import GpuSampler, free_memory, own_nvml_mib  # noqa: E402
from backend.holdings import HOLDINGS  # noqa: E402

MIB = 1024 * 1024
MODES = ("off", "full", "host")


def time_sampler_calls(sampler: GpuSampler, reps: int = 20) -> dict:
    """Wall time of one sample and of each NVML read in it, idle, in ms (median of reps)."""
    import pynvml

    out = {"sample": [], "host": [], "backend": []}
    for _ in range(reps):
        t = time.perf_counter(); sampler.sample(); out["sample"].append(time.perf_counter() - t)
        t = time.perf_counter(); sampler._host(); out["host"].append(time.perf_counter() - t)
        t = time.perf_counter(); sampler._backend(); out["backend"].append(time.perf_counter() - t)
    if sampler.handles:
        h = sampler.handles[0]
        calls = {
            "memory": (pynvml.nvmlDeviceGetMemoryInfo, h), "util": (pynvml.nvmlDeviceGetUtilizationRates, h),
            "power": (pynvml.nvmlDeviceGetPowerUsage, h), "power_limit": (pynvml.nvmlDeviceGetEnforcedPowerLimit, h),
            "temp": (pynvml.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU),
            "sm_clock": (pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_SM),
            "compute_procs": (pynvml.nvmlDeviceGetComputeRunningProcesses, h),
            "graphics_procs": (pynvml.nvmlDeviceGetGraphicsRunningProcesses, h),
            "name": (pynvml.nvmlDeviceGetName, h),
        }
        for name, (fn, *a) in calls.items():
            out[name] = []
            for _ in range(reps):
                t = time.perf_counter()
                try:
                    fn(*a)
                except pynvml.NVMLError:
                    pass
                out[name].append(time.perf_counter() - t)
    return {k: round(1000 * statistics.median(v), 3) for k, v in out.items()}


def active_blocks_by_origin(limit: int = 8) -> list:
    """After cleanup, with allocation history recorded: the live allocator blocks, grouped by the
    Python frames that allocated them (to find who keeps memory alive outside the holdings)."""
    snap = torch.cuda.memory._snapshot()
    groups: dict[str, list] = {}
    for seg in snap.get("segments", []):
        for b in seg.get("blocks", []):
            if b.get("state") != "active_allocated":
                continue
            frames = [f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in b.get("frames", [])
                      if f.get("filename", "").endswith(".py")]
            key = " <- ".join(frames[:6]) or "(no python frames)"
            g = groups.setdefault(key, [0, 0])
            g[0] += b["size"]
            g[1] += 1
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])[:limit]
    return [{"mib": round(v[0] / MIB, 1), "blocks": v[1], "origin": k} for k, v in rows]


def _describe(o) -> str:
    import types

    if isinstance(o, dict):
        return f"dict{list(o.keys())[:5]}"
    if isinstance(o, types.FrameType):
        return f"frame {Path(o.f_code.co_filename).name}:{o.f_lineno}:{o.f_code.co_name}"
    if isinstance(o, types.FunctionType):
        return f"function {o.__module__}.{o.__qualname__}"
    if isinstance(o, types.ModuleType):
        return f"module {o.__name__}"
    return f"{type(o).__module__}.{type(o).__qualname__}"


def referrer_chain(obj, ignore, depth: int = 7) -> list[str]:
    """One path of referrers from ``obj`` upwards (to find what keeps it alive)."""
    import types

    chain, seen, cur = [], {id(x) for x in ignore}, obj
    for _ in range(depth):
        seen.add(id(cur))
        refs = [r for r in gc.get_referrers(cur) if id(r) not in seen and not isinstance(r, types.FrameType)
                and r is not chain and not (isinstance(r, list) and len(r) > 10_000)]
        if not refs:
            break
        # Prefer non-container owners: they name the culprit.
        refs.sort(key=lambda r: isinstance(r, (dict, list, tuple)))
        cur = refs[0]
        chain.append(_describe(cur))
        if isinstance(cur, types.ModuleType):
            break
    return chain


def module_holders(limit: int = 8) -> list:
    """After cleanup: the nn.Modules still alive, with two levels of what refers to them."""
    import types
    import weakref

    objs = gc.get_objects()
    mods = [weakref.ref(o) for o in objs if isinstance(o, torch.nn.Module)
            and not type(o).__module__.startswith("transformers.activations")]
    del objs
    out = []
    for ref in mods[:limit]:
        m = ref()
        if m is None:
            continue
        row = {"module": _describe(m), "params_mib": round(sum(p.numel() * p.element_size() for p in m.parameters()) / MIB, 1),
               "referrers": []}
        for r in gc.get_referrers(m):
            if isinstance(r, types.FrameType):
                continue
            entry = {"by": _describe(r)}
            if isinstance(r, (dict, list, tuple, types.CellType)):
                entry["held_by"] = [_describe(x) for x in gc.get_referrers(r) if not isinstance(x, types.FrameType)][:5]
            row["referrers"].append(entry)
        out.append(row)
        del m
    return out


def live_cuda_tensors(limit: int = 6) -> dict:
    """After cleanup: CUDA tensors still alive, their total size and who refers to the largest."""
    tensors = []
    for o in gc.get_objects():
        try:
            if torch.is_tensor(o) and o.is_cuda:
                tensors.append(o)
        except Exception:
            pass
    total = sum(t.untyped_storage().nbytes() for t in tensors)
    tensors.sort(key=lambda t: t.untyped_storage().nbytes(), reverse=True)
    holders = []
    for t in tensors[:limit]:
        refs = []
        for r in gc.get_referrers(t):
            if r is tensors:
                continue
            if isinstance(r, dict):
                owners = [type(x).__module__ + "." + type(x).__name__ for x in gc.get_referrers(r)
                          if not isinstance(x, (list, dict)) and hasattr(x, "__dict__")][:3]
                refs.append(f"dict{list(r.keys())[:4]} of {owners}")
            else:
                refs.append(type(r).__module__ + "." + type(r).__name__)
        holders.append({"shape": list(t.shape), "dtype": str(t.dtype), "mib": round(t.untyped_storage().nbytes() / MIB, 1),
                        "referrers": refs[:6], "chain": referrer_chain(t, ignore=[tensors])})
    del tensors
    return {"count_total_mib": round(total / MIB, 1), "largest": holders}


def mistral_config(smoke: bool):
    from transformers import MistralConfig

    if smoke:
        return MistralConfig(vocab_size=1024, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             head_dim=16)
    # Mistral-7B-v0.3's shape.
    return MistralConfig(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                         rope_theta=1_000_000.0, sliding_window=None, head_dim=128)


def word_tokenizer(vocab_size: int):
    """A real fast tokenizer over words t0..tN, so trl tokenizes text as it would any other."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t1", eos_token="t2", bos_token="t3")


def build_and_save(cfg, folder: Path, device: str) -> float:
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - t


def load_4bit(folder: Path, device: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": 0} if device == "cuda" else {"": "cpu"})
    return model, time.perf_counter() - t


class SamplerThread:
    """The backend's sampling, as the server runs it: one snapshot per interval, encoded as the
    event that would be broadcast."""

    def __init__(self, sampler: GpuSampler, interval: float = 1.0):
        self.sampler, self.interval = sampler, interval
        self.on = threading.Event()
        self.mode = "full"
        self.stop = threading.Event()
        self.samples = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            if self.on.is_set():
                if self.mode == "host":  # psutil and torch counters only, no NVML
                    snap = {"time": time.time(), "gpus": [], "host": self.sampler._host(),
                            "backend": self.sampler._backend(), "nvml_error": None, "driver": None}
                else:
                    snap = self.sampler.sample()
                P.encode(P.Event("gpu.sample", snap, snap["time"]))
                self.samples += 1
            self.stop.wait(self.interval)


def _paired_cost(blocks, times, mode: str) -> dict:
    """Per round, 100 * (1 - off block's mean step time / ``mode`` block's): median and quartiles."""
    costs, prev_off = [], None
    for m, a, b in blocks:
        ts = [times[i] for i in range(a, b + 1) if i in times]
        if not ts:
            continue
        mean = statistics.fmean(ts)
        if m == "off":
            prev_off = mean
        elif m == mode and prev_off is not None:
            costs.append(100 * (1 - prev_off / mean))
    if len(costs) < 2:
        return {"rounds": len(costs)}
    q = statistics.quantiles(costs, n=4)
    return {"rounds": len(costs), "median": round(statistics.median(costs), 2), "q1": round(q[0], 2),
            "q3": round(q[2], 2), "mean": round(statistics.fmean(costs), 2),
            "sem": round(statistics.stdev(costs) / len(costs) ** 0.5, 2)}


def train_blocks(model, tok, args, sampler_thread, out):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rng = torch.Generator().manual_seed(1)
    n_rows = args.batch * (args.warmup + len(MODES) * args.blocks * args.block_steps) + 8
    ids = torch.randint(10, tok.vocab_size, (n_rows, args.seq_len - 1), generator=rng)
    texts = [" ".join(f"t{i}" for i in row.tolist()) for row in ids]
    ds = Dataset.from_dict({"text": texts})

    step_times: list[tuple[int, float]] = []
    schedule = {}  # step -> "off" / "full" / "host"
    blocks = []  # (mode, first step, last step)
    step = args.warmup
    for b in range(len(MODES) * args.blocks):
        mode = MODES[b % len(MODES)]
        blocks.append((mode, step + 1, step + args.block_steps))
        for _ in range(args.block_steps):
            step += 1
            schedule[step] = mode

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            nxt = state.global_step + 1
            if schedule.get(nxt, "off") != "off":
                sampler_thread.mode = schedule[nxt]
                sampler_thread.on.set()
            else:
                sampler_thread.on.clear()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step_times.append((state.global_step, time.perf_counter() - self.t))

    cfg = SFTConfig(
        output_dir=str(Path(args.work) / "trainer"), max_steps=args.warmup + len(MODES) * args.blocks * args.block_steps,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, learning_rate=2e-4,
        max_length=args.seq_len, packing=False, gradient_checkpointing=True,
        optim="paged_adamw_8bit" if not args.smoke else "adamw_torch", bf16=not args.smoke,
        use_cpu=args.smoke, logging_steps=10, save_strategy="no", report_to="none", seed=0,
        dataset_num_proc=None, dataloader_num_workers=0,
    )
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora,
                         callbacks=[Timer()])
    t = time.perf_counter()
    trainer.train()
    out["train_wall_s"] = round(time.perf_counter() - t, 2)
    sampler_thread.on.clear()
    tokens_per_step = args.batch * args.seq_len
    by_mode = {m: [] for m in MODES}
    times = dict(step_times)
    for s, dt in step_times:
        if s in schedule:
            by_mode[schedule[s]].append(dt)
    tps = {m: tokens_per_step / statistics.median(v) for m, v in by_mode.items()}
    out["sampling"] = {
        "steps_per_mode": {m: len(v) for m, v in by_mode.items()},
        "median_step_s": {m: round(statistics.median(v), 4) for m, v in by_mode.items()},
        "tokens_per_s": {m: round(v, 1) for m, v in tps.items()},
        "cost_percent": round(100 * (1 - tps["full"] / tps["off"]), 2),
        "cost_percent_host_only": round(100 * (1 - tps["host"] / tps["off"]), 2),
        "block_medians_s": [(m, round(statistics.median([times[i] for i in range(a, b + 1) if i in times]), 4))
                            for m, a, b in blocks],
        # Paired: each round's "full" (and "host") block against the "off" block right before it,
        # so slow drifts of the card (clocks, the paged optimizer) cancel out of the comparison.
        "paired_cost_percent": _paired_cost(blocks, times, "full"),
        "paired_cost_percent_host_only": _paired_cost(blocks, times, "host"),
        "samples_taken": sampler_thread.samples,
        "interval_s": sampler_thread.interval,
    }
    out["torch_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / MIB, 1) if torch.cuda.is_available() else None
    # From here on only the holdings keep these alive, as in the backend.
    HOLDINGS.put("base", trainer.model, "model", "Mistral-7B shape, 4-bit nf4 + LoRA")
    HOLDINGS.put("trainer", trainer, "trainer", "SFTTrainer")
    HOLDINGS.put("optimizer", trainer.optimizer, "optimizer", cfg.optim)
    HOLDINGS.put("tokenizer", tok, "tokenizer")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny model (CPU is fine)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=6, help="pairs of (off, on) blocks")
    ap.add_argument("--block-steps", type=int, default=10)
    ap.add_argument("--work", default=None)
    ap.add_argument("--no-expandable", action="store_true", help="leave PYTORCH_CUDA_ALLOC_CONF unset")
    ap.add_argument("--trace-memory", action="store_true",
                    help="record allocation history and list what is still allocated after cleanup, by origin")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_cleanup.json")
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.seq_len, args.warmup, args.blocks, args.block_steps = 2, 32, 1, 1, 2
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    args.work = args.work or tempfile.mkdtemp(prefix="qlw-bench-")
    out: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
                 "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke,
                 "versions": _versions(), "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    sampler = GpuSampler()
    out["nvml_error"] = sampler.nvml_error

    if device == "cuda":
        if args.trace_memory:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        torch.cuda.init()
        x = torch.ones(1, device="cuda")
        del x
        torch.cuda.empty_cache()
        out["cuda_context_only_mib"] = own_nvml_mib(sampler)

    out["sampler_call_ms_idle"] = time_sampler_calls(sampler)
    cfg = mistral_config(args.smoke)
    folder = Path(args.work) / "mistral-random"
    out["build_and_save_s"] = round(build_and_save(cfg, folder, device), 1)
    model, load_s = load_4bit(folder, device)
    out["load_4bit_s"] = round(load_s, 1)
    out["footprint_mib"] = round(model.get_memory_footprint() / MIB, 1)
    tok = word_tokenizer(cfg.vocab_size)
    thread = SamplerThread(sampler, 1.0)
    train_blocks(model, tok, args, thread, out)
    del model, tok
    thread.stop.set()

    gc.collect()
    result = free_memory(HOLDINGS, sampler)
    out["cleanup"] = result
    out["live_cuda_tensors_after"] = live_cuda_tensors() if device == "cuda" else None
    if device == "cuda" and args.trace_memory:
        out["allocated_after_mib"] = round(torch.cuda.memory_allocated() / MIB, 1)
        out["active_blocks_after"] = active_blocks_by_origin()
        out["modules_alive_after"] = module_holders()
    before, after = result["before"], result["after"]
    if device == "cuda":
        out["reserved_after_percent_of_before"] = round(100 * after["torch_reserved_mib"] / before["torch_reserved_mib"], 3)
        # What the process still holds beyond a bare context (cuBLAS/cuDNN workspaces, kernels).
        out["nvml_after_minus_context_mib"] = round(after["nvml_process_mib"] - out["cuda_context_only_mib"], 1)

    print(f"device {out['device']}  date {out['date']}  versions {out['versions']}")
    print(f"build+save {out['build_and_save_s']} s, load 4-bit {out['load_4bit_s']} s, footprint {out['footprint_mib']} MiB, "
          f"torch peak allocated {out['torch_peak_allocated_mib']} MiB")
    s = out["sampling"]
    print(f"sampling at 1 s: tokens/s {s['tokens_per_s']} -> cost full {s['cost_percent']}%, host only "
          f"{s['cost_percent_host_only']}% ({s['steps_per_mode']} steps, {s['samples_taken']} samples)")
    print("paired cost per round (full):", s["paired_cost_percent"], " (host only):", s["paired_cost_percent_host_only"])
    print("block medians:", s["block_medians_s"])
    print("sampler calls, idle, ms:", out["sampler_call_ms_idle"])
    print("live CUDA tensors after cleanup:", json.dumps(out["live_cuda_tensors_after"]))
    if device == "cuda" and args.trace_memory:
        print("torch allocated after cleanup:", out["allocated_after_mib"], "MiB; live blocks by origin:")
        for row in out["active_blocks_after"]:
            print(f"  {row['mib']:>9} MiB {row['blocks']:>5} blocks  {row['origin']}")
        print("modules alive after cleanup:")
        for row in out["modules_alive_after"]:
            print("  ", json.dumps(row))
    print(f"{'':24}{'before':>12}{'after':>12}")
    for key in ("torch_reserved_mib", "nvml_process_mib", "rss_mib"):
        print(f"{key:24}{str(before[key]):>12}{str(after[key]):>12}")
    if device == "cuda":
        print(f"CUDA context alone {out['cuda_context_only_mib']} MiB; reserved after = "
              f"{out['reserved_after_percent_of_before']}% of before; NVML after - context = {out['nvml_after_minus_context_mib']} MiB")
    print("dropped:", ", ".join(d["name"] for d in result["dropped"]))
    for s in result["still_held"]:
        print("still held:", s["what"], "-", s["why"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print("wrote", args.out)
    return 0


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "nvidia-ml-py"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
