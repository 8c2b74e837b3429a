"""GPU benchmark for the base-model estimate (issue 4): estimated against measured memory.

    python bench/model_estimate.py --out bench/results/model_estimate.json   # on the GPU machine
    python bench/model_estimate.py --smoke --out /tmp/model_estimate.json    # anywhere, on the CPU

1. Builds a Mistral-7B-v0.3-shaped model (hidden 4096, 32 layers, 32 heads, 8 kv heads,
   intermediate 14336, vocab 32768, head_dim 128) with random bf16 weights on the GPU and saves it
   as safetensors shards (5 GB each) into a temporary folder (--dir to choose it).
2. For each precision (4-bit nf4 with double quantisation and bf16 compute, then bf16), asks
   qlw's estimate (``backend.models.estimate``: config.json alone), then loads the folder through
   qlw's loader (``backend.models.load_base_model``: progress by shard, the AVX512-BF16 CPU layout
   off) and measures ``get_memory_footprint()``, the quantization state it leaves out, and
   ``torch.cuda.memory_allocated`` before and after the load (and the peak while loading).
   A forward pass on 64 tokens checks that the model runs.
3. Prints estimate against measured with their ratio (target: within 10 %), and writes it all as
   JSON to --out.

--smoke runs the same steps on the CPU with a tiny Mistral (several shards), in seconds; there is
no CUDA allocator there, so only the footprint and the tensor bytes are compared.
"""

from __future__ import annotations

import argparse
import gc
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

# As the backend does (backend/__main__.py): freed memory really goes back between the loads.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

from backend import models, protocol as P  # noqa: E402

GIB = 1024**3
MIB = 1024**2
TARGET = 0.10
RUNS = {  # name -> ModelSettings fields
    "4bit-nf4": dict(precision="4bit", quant_type="nf4", double_quant=True, compute_dtype="bf16"),
    "bf16": dict(precision="bf16"),
}


def mistral_config(smoke: bool):
    from transformers import MistralConfig

    if smoke:
        return MistralConfig(vocab_size=1024, hidden_size=128, intermediate_size=448, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             head_dim=32)
    # Mistral-7B-v0.3's shape.
    return MistralConfig(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                         rope_theta=1_000_000.0, sliding_window=None, head_dim=128)


def build_and_save(cfg, folder: Path, device: str, shard_size: str) -> dict:
    """Random bf16 weights built on ``device`` and saved as safetensors shards."""
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    built = time.perf_counter() - t
    params = model.num_parameters()
    model.save_pretrained(folder, max_shard_size=shard_size)
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    files = sorted(folder.glob("*.safetensors"))
    return {"parameters": params, "build_seconds": round(built, 2),
            "save_seconds": round(time.perf_counter() - t - built, 2), "shards": len(files),
            "disk_bytes": sum(f.stat().st_size for f in files)}


def ratio(measured, estimated):
    return round(measured / estimated, 4) if measured and estimated else None


def run_one(name: str, folder: Path, device: str, fields: dict) -> dict:
    settings = P.ModelSettings(source=str(folder), device=device, **fields)
    t = time.perf_counter()
    est = models.estimate(settings)
    est_seconds = time.perf_counter() - t
    shards_seen: list[tuple[float, float]] = []

    def progress(stage, done, total, unit="", message=""):
        if stage == "loading weights" and (not shards_seen or int(done) != int(shards_seen[-1][0]) or done == total):
            shards_seen.append((done, total))
            print(f"    {name}: {stage} {done:g}/{total:g} {unit} ({message})", flush=True)

    t = time.perf_counter()
    loaded = models.load_base_model(settings, progress=progress)
    load_seconds = time.perf_counter() - t
    measured = loaded.info["measured"]
    from_pretrained_seconds = loaded.info["load_seconds"]
    ids = torch.randint(0, loaded.model.config.vocab_size, (1, 64), device=loaded.model.device)
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits
    finite = bool(torch.isfinite(logits).all())
    del logits, loaded
    models.release_base_model()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    ratios = {
        "footprint / estimate": ratio(measured["footprint_bytes"], est["footprint_bytes"]),
        "tensors / estimate": ratio(measured["tensor_bytes"], est["total_bytes"]),
        "allocated / estimate": ratio(measured["torch_allocated_bytes"], est["total_bytes"]),
    }
    within = all(abs(r - 1) <= TARGET for r in ratios.values() if r is not None)
    return {
        "name": name,
        "settings": P.to_dict(settings),
        "estimate": {k: est[k] for k in ("parameters", "quantized_parameters", "weight_bytes", "buffer_bytes",
                                         "quant_state_bytes", "footprint_bytes", "total_bytes", "free_bytes",
                                         "verdict", "device", "precision_label")},
        "estimate_seconds": round(est_seconds, 3),
        "measured": measured,
        "ratios": ratios,
        "within_target": within,
        "shard_progress": shards_seen,
        "forward_finite": finite,
        "load_seconds": round(load_seconds, 2),  # estimate, load, tokenizer, measuring
        "from_pretrained_seconds": from_pretrained_seconds,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny Mistral on the CPU: the same code path, in seconds")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "model_estimate.json",
                    help="where to write the JSON results")
    ap.add_argument("--dir", type=Path, default=None, help="where to save the random model (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the saved model folder")
    ap.add_argument("--device", default=None, help="cuda:0 (default) or cpu; --smoke implies cpu")
    args = ap.parse_args()

    device = "cpu" if args.smoke else (args.device or "cuda:0")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on a machine without a GPU", file=sys.stderr)
        return 2
    cfg = mistral_config(args.smoke)
    folder = args.dir or Path(tempfile.mkdtemp(prefix="qlw-bench-model-"))
    folder.mkdir(parents=True, exist_ok=True)
    import bitsandbytes
    import transformers

    out = {
        "what": "qlw base-model estimate vs measured memory (bench/model_estimate.py)",
        "smoke": args.smoke,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "device": device,
            "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "bitsandbytes": bitsandbytes.__version__,
        },
        "config": {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                "num_key_value_heads", "intermediate_size", "vocab_size", "head_dim")},
        "target": f"within {TARGET:.0%}",
        "runs": [],
    }
    try:
        print(f"building a {'tiny' if args.smoke else 'Mistral-7B-shaped'} model on {device} into {folder} ...",
              flush=True)
        out["saved"] = build_and_save(cfg, folder, device, "200KB" if args.smoke else "5GB")
        print(f"  {out['saved']['parameters']:,} parameters, {out['saved']['shards']} shards, "
              f"{out['saved']['disk_bytes'] / MIB:,.1f} MiB on disk", flush=True)
        for name, fields in RUNS.items():
            out["runs"].append(run_one(name, folder, device, fields))
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)

    unit, scale = ("MiB", MIB) if args.smoke else ("GiB", GIB)
    print()
    print(f"{'run':10} {'estimate':>12} {'footprint':>12} {'ratio':>7} {'est.+state':>12} {'tensors':>12} "
          f"{'ratio':>7} {'allocated':>12} {'ratio':>7} {'peak':>10}")
    for r in out["runs"]:
        e, m, q = r["estimate"], r["measured"], r["ratios"]

        def fmt(b):
            return f"{b / scale:.3f} {unit}" if b is not None else "n/a"

        def fr(x):
            return f"{x:.3f}" if x is not None else "n/a"

        print(f"{r['name']:10} {fmt(e['footprint_bytes']):>12} {fmt(m['footprint_bytes']):>12} "
              f"{fr(q['footprint / estimate']):>7} {fmt(e['total_bytes']):>12} {fmt(m['tensor_bytes']):>12} "
              f"{fr(q['tensors / estimate']):>7} {fmt(m['torch_allocated_bytes']):>12} "
              f"{fr(q['allocated / estimate']):>7} {fmt(m['torch_peak_bytes']):>10}")
    ok = all(r["within_target"] and r["forward_finite"] for r in out["runs"])
    print(f"\nall ratios within {TARGET:.0%}: {'yes' if ok else 'NO'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
