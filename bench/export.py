"""GGUF export figures (issue 17): a merged model folder exported at each level, with file size,
export time and the file read back against the merged model (perplexity, max |Δlogit|, top-1
agreement), beside the noise floor of a 16-bit file.

    python bench/export.py --smoke                          # the embedded tiny model (trained), CPU, ~1 min
    python bench/export.py --shape 7b --layers 2            # Mistral-7B widths, 2 decoder layers: CPU, minutes
    python bench/export.py --shape 7b                       # the whole 7B shape (GPU machine: verify needs ~30 GB)
    python bench/export.py --model DIR                      # an existing merged folder

1. The model: ``--smoke``: the tiny Llama (pre-trained on the sample dataset, so its perplexity
   means something); ``--shape 7b``: bench/train_smoke.py's ``make_7b`` (Mistral-7B-v0.3 widths,
   random bf16 weights, the tiny model's tokenizer; ``--layers N`` keeps N decoder layers);
   ``--model DIR``: a merged folder.
2. For each level (``--levels``, default f16,bf16,q8_0, plus q4_k_m,q5_k_m when llama-cpp-python
   is installed): ``backend.export.run_export`` (what ``export.start`` and ``qlw export`` run),
   timed, with the Modelfile and the verification (the merged model and the file each in fp32,
   perplexity on ``--rows`` responses of the sample dataset).
3. Prints a Markdown table and writes everything (device, versions, date) to --out (default
   bench/results/export.json; export_smoke.json with --smoke).
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

from backend import export as E, gguf_convert as G, tiny  # noqa: E402

MIB = 1024**2


class Recorder:
    """A job context in this process: keeps events, prints stages."""

    cancelled = False

    def __init__(self):
        self.events: list[tuple[str, dict]] = []
        self._stage = ""

    def check_cancelled(self) -> None:
        pass

    def emit(self, kind: str, payload: dict) -> None:
        self.events.append((kind, payload))

    def progress(self, stage: str, done, total=0, unit="", message="") -> None:
        if stage != self._stage:
            print(f"  {stage}...", flush=True)
        self._stage = stage


def texts(rows: int) -> list[str]:
    """Responses of the sample dataset (the tiny model was pre-trained on its plain text)."""
    out = [r["response"] for r in tiny._sample_rows() if len(r["response"]) > 80]
    return [t[:600] for t in out[:rows]]


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "gguf", "safetensors", "llama-cpp-python"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def device_info() -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def write_record(out: Path, name: str, params: int, made, prompts: list[str], results: list[dict]) -> None:
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "model": name, "parameters": params, "made": made, "rows_scored": len(prompts),
              "device": device_info(), "versions": versions(), "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--smoke", action="store_true", help="the embedded tiny model")
    what.add_argument("--shape", choices=("7b",), help="a random model of this shape (bench/train_smoke.py make_7b)")
    what.add_argument("--model", type=Path, help="a merged model folder")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of --shape 7b (default 32)")
    default_levels = "f16,bf16,q8_0" + (",q4_k_m,q5_k_m" if G.llama_cpp_available() else "")
    parser.add_argument("--levels", default=default_levels, help=f"comma-separated (default {default_levels})")
    parser.add_argument("--rows", type=int, default=16, help="sample responses scored for perplexity")
    parser.add_argument("--no-verify", action="store_true", help="sizes and times only")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new one under /tmp, removed)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="qlw-export-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    made = None
    try:
        if args.smoke:
            model = tiny.ensure_tiny_model(home)
            name = "tiny (trained, 0.7M parameters, fp32)"
        elif args.shape:
            sys.path.insert(0, str(ROOT / "bench"))
            from train_smoke import make_7b

            model = work / f"mistral-7b-shape-{args.layers}l"
            if not (model / "config.json").is_file():
                made = make_7b(model, layers=args.layers)
            name = f"Mistral-7B widths, {args.layers} layers (random, bf16)"
        else:
            model = args.model.resolve()
            name = str(model)
        config = G.read_config(model)
        params = E._parameters(config)
        print(f"model: {name}: {params:,} parameters", flush=True)
        prompts = texts(args.rows)
        results = []
        out = args.out or ROOT / "bench" / "results" / ("export_smoke.json" if args.smoke else "export.json")
        for level in [x.strip() for x in args.levels.split(",") if x.strip()]:
            print(f"{level}:", flush=True)
            ctx = Recorder()
            t = time.perf_counter()
            result = E.run_export({"model": str(model), "out": str(work / "out" / f"model-{level}.gguf"),
                                   "quant": level, "ollama": True, "verify": not args.no_verify,
                                   "overwrite": True, "prompts": prompts}, home, ctx)
            total = time.perf_counter() - t
            row = {"level": level, "size_bytes": result["size_bytes"], "export_s": result["write_s"],
                   "total_s": round(total, 2), "modelfile": bool(result["modelfile"])}
            v = result.get("verify")
            if v:
                merged, got = v["rows"]
                row.update(merged_perplexity=merged["perplexity"], gguf_perplexity=got["perplexity"],
                           max_abs_logit_diff=got["max_abs_logit_diff"], top1_agreement=got["top1_agreement"],
                           greedy_same=got["greedy_same"], noise_floor=v["noise_floor"], noise_dtype=v["noise_dtype"],
                           checks=v["checks"], merged_bytes=merged["size_bytes"])
            results.append(row)
            print(f"  {result['size_bytes'] / MIB:,.1f} MiB in {result['write_s']:.1f} s, {total:.1f} s with the "
                  "verification", flush=True)
            (work / "out" / f"model-{level}.gguf").unlink(missing_ok=True)
            write_record(out, name, params, made, prompts, results)  # after every level: a killed run keeps its rows
        print()
        print("| level | file | export s | ppl merged | ppl gguf | Δ ppl | max abs Δlogit | noise floor | top-1 agree |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            if "gguf_perplexity" in r:
                d = r["gguf_perplexity"] / r["merged_perplexity"] - 1
                print(f"| {r['level']} | {r['size_bytes'] / MIB:,.1f} MiB | {r['export_s']:.1f} | "
                      f"{r['merged_perplexity']:.3f} | {r['gguf_perplexity']:.3f} | {d:+.3%} | "
                      f"{r['max_abs_logit_diff']:.2e} | {r['noise_floor']:.2e} ({r['noise_dtype']}) | "
                      f"{r['top1_agreement']:.2%} |")
            else:
                print(f"| {r['level']} | {r['size_bytes'] / MIB:,.1f} MiB | {r['export_s']:.1f} | | | | | | |")
        print(f"\nwrote {out}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
