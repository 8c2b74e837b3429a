"""Merge figures (issue 7): a random LoRA adapter merged into a Mistral-7B-shaped base on a GPU.

    python bench/merge.py                                   # GPU machine: the whole run, ~2-3 minutes on an H100
    python bench/merge.py --model /tmp/qlw-7b               # an existing base folder (bench/train_smoke.py --make-7b)
    python bench/merge.py --smoke --out /tmp/merge.json     # anywhere, on the CPU: the tiny model, seconds

1. The base: a Mistral-7B-v0.3-shaped model with random bf16 weights (``bench/train_smoke.py``'s
   ``make_7b``: 14.5 GB of safetensors and the tiny model's tokenizer), or ``--model DIR``.
2. A random LoRA adapter on it, as a QLoRA run leaves it: r=16, lora_alpha=16 on every linear
   layer (all-linear), B non-zero, saved with peft's file layout in ``runs/<session>/adapter``
   beside a run config that says the base was trained in 4-bit NF4 with double quantisation and
   bf16 compute.
3. ``backend.merge.run_merge`` (what ``merge.start`` and ``qlw merge`` run): the base loaded in
   4-bit as trained, dequantised to bf16, the adapter merged, saved in 5 GB shards through a
   temporary folder; then the verification table in fp32 (merged folder alone; 4-bit base +
   adapter; full-precision base + adapter; the bf16 noise floor).
4. Prints the stage times and the table; writes everything (device, versions, date) to --out
   (default bench/results/merge.json; bench/results/merge_smoke.json with --smoke).

--smoke runs the same steps on the CPU with the embedded tiny model (saved in fp32; its "4-bit
as trained" base is the same folder loaded in 4-bit NF4 on the CPU).
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

from backend import merge, tiny, train_config as TC  # noqa: E402

GIB = 1024**3


class Recorder:
    """A job context in this process: keeps events, times each progress stage, prints stages."""

    def __init__(self, quiet: bool = False):
        self.events: list[tuple[str, dict]] = []
        self.stages: dict[str, list[float]] = {}
        self.quiet = quiet
        self.cancelled = False
        self._stage = ""

    def check_cancelled(self) -> None:
        pass

    def emit(self, kind: str, payload: dict) -> None:
        self.events.append((kind, payload))
        if kind == "log" and not self.quiet:
            print(f"{payload['level']}: {payload['message']}", flush=True)

    def progress(self, stage: str, done, total=0, unit="", message="") -> None:
        now = time.perf_counter()
        span = self.stages.setdefault(stage, [now, now])
        span[1] = now
        if stage != self._stage and not self.quiet:
            print(f"{stage}...", flush=True)
        self._stage = stage

    def stage_seconds(self) -> dict[str, float]:
        return {k: round(v[1] - v[0], 3) for k, v in self.stages.items()}


def make_adapter(base: Path, run: Path, r: int = 16, seed: int = 0) -> dict:
    """A random LoRA adapter (all-linear, non-zero B) for ``base``, in peft's layout, and a run
    config saying the base was trained in 4-bit NF4; built from the meta model (no weights read)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    t = time.perf_counter()
    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    tensors, names = {}, set()
    for name, module in meta.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            fin, fout = module.in_features, module.out_features
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(r, fin, generator=gen) / fin**0.5).to(torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(fout, r, generator=gen) * 0.02).to(torch.bfloat16)
            names.add(name.rsplit(".", 1)[-1])
    folder = run / "adapter"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=r, lora_alpha=r, lora_dropout=0.05, target_modules=sorted(names), task_type="CAUSAL_LM",
               base_model_name_or_path=str(base)).save_pretrained(str(folder))
    cfg = TC.defaults()
    cfg["name"] = "bench merge"
    cfg["model"].update(source=str(base), precision="4bit", quant_type="nf4", double_quant=True, compute_dtype="bf16")
    cfg["lora"].update(r=r, lora_alpha=r)
    (run / "config.toml").write_text(TC.dumps_toml(cfg), encoding="utf-8")
    return {"path": str(folder), "tensors": len(tensors), "parameters": sum(v.numel() for v in tensors.values()),
            "bytes": (folder / "adapter_model.safetensors").stat().st_size, "seconds": round(time.perf_counter() - t, 2)}


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "safetensors", "huggingface_hub", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def device_info() -> dict:
    import torch

    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "cuda": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(cuda=torch.cuda.get_device_name(0), cuda_total_bytes=int(props.total_memory),
                    cuda_version=torch.version.cuda)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny model on the CPU")
    parser.add_argument("--model", type=Path, default=None, metavar="DIR", help="an existing base folder (bf16 safetensors)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--verify-dtype", default="fp32", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new one under /tmp, removed after)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default bench/results/merge.json)")
    args = parser.parse_args(argv)
    out = args.out or ROOT / "bench" / "results" / ("merge_smoke.json" if args.smoke else "merge.json")
    work = args.work or Path(tempfile.mkdtemp(prefix="qlw-merge-bench-", dir="/tmp"))
    keep = args.work is not None
    t_all = time.perf_counter()
    result: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "mode": "smoke" if args.smoke else "gpu", "dtype": args.dtype, "into": "dequantized"}
    try:
        home = work / "home"
        home.mkdir(parents=True, exist_ok=True)
        if args.model:
            base = args.model.expanduser().resolve()
            result["base"] = {"folder": str(base), "built": False}
        elif args.smoke:
            base = tiny.ensure_tiny_model(home)
            result["base"] = {"folder": "embedded tiny model", "built": True}
        else:
            from bench.train_smoke import make_7b  # a Mistral-7B-shaped random bf16 model + tokenizer

            base = work / "base-7b"
            print("building a Mistral-7B-shaped random model...", flush=True)
            result["base"] = {**make_7b(base), "built": True}
        run = home / "runs" / "bench-merge"
        result["adapter"] = make_adapter(base, run)
        print(f"adapter: {result['adapter']['tensors']} tensors, {result['adapter']['parameters']:,} parameters", flush=True)
        ctx = Recorder()
        plan = merge.plan(str(run / "adapter"), "bench-merged", home, args.dtype, "dequantized",
                          device="cpu" if args.smoke else "auto")
        result["plan"] = {k: plan[k] for k in ("device", "memory", "disk", "into_default", "warnings")}
        result["parameters"] = plan["base"]["parameters"]
        t = time.perf_counter()
        merged = merge.run_merge({"adapter": str(run / "adapter"), "out": "bench-merged", "dtype": args.dtype,
                                  "into": "dequantized", "max_shard_size": "5GB", "verify": True,
                                  "verify_dtype": args.verify_dtype, "device": "cpu" if args.smoke else "auto"},
                                 home, ctx)
        result["merge_and_verify_s"] = round(time.perf_counter() - t, 2)
        result.update({k: merged[k] for k in ("merge_s", "save_s", "size_bytes", "files")})
        result["merge_device"] = merged["device"]
        result["stage_s"] = ctx.stage_seconds()
        result["verify"] = merged["verify"]
        card = (Path(merged["out"]) / "README.md").read_text(encoding="utf-8")
        result["model_card_names_base"] = str(plan["base"]["source"]).rsplit("/", 1)[-1] in card
        config_text = (Path(merged["out"]) / "config.json").read_text(encoding="utf-8")
        result["config_names_base_path"] = str(base) in config_text
        result["wall_s"] = round(time.perf_counter() - t_all, 2)
        result["versions"] = versions()
        result["device"] = device_info()
        print()
        print(f"device: {result['device'].get('cuda') or 'CPU'}; {result['parameters']:,} parameters; "
              f"merge {result['merge_s']:.1f} s (load, dequantize, merge), save {result['save_s']:.1f} s "
              f"({result['size_bytes'] / GIB:.2f} GiB in {len([f for f in result['files'] if f['name'].endswith('.safetensors')])} "
              f"shard(s)), whole run {result['wall_s']:.1f} s")
        print("stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["stage_s"].items()))
        print(merge.format_table(merged["verify"]))
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
