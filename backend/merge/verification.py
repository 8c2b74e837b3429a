"""Step 3, :func:`verify`: the saved folder against the model as trained and against the
full-precision base + adapter: logit differences, perplexity, size, and the merge dtype's noise floor.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from backend import protocol as P
from backend.jobs import JobCancelled, JobError
from backend.merge.paths import DEFAULT_PROMPTS, MIB, _dtype, folder_bytes
from backend.merge.planning import _base_info
from backend.merge.loading import _empty_cuda, compute_4bit_in


# Verification -----------------------------------------------------------------------------------------------


def _logits(model, tokenizer, prompts: list[str], device: str):
    """Per prompt: the logits (fp32, on the CPU) and the summed next-token loss and token count."""
    import torch

    out = []
    with torch.no_grad():
        for text in prompts:
            enc = tokenizer(text, return_tensors="pt")
            ids = enc["input_ids"].to(device)
            logits = model(input_ids=ids).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            out.append((logits[0].cpu(), float(loss), int(ids.shape[1] - 1)))
    return out


def _ppl(rows) -> float:
    nll = sum(r[1] for r in rows)
    n = sum(r[2] for r in rows)
    return float(math.exp(nll / n)) if n else float("nan")


def _max_diff(a, b) -> float:
    return float(max((x[0] - y[0]).abs().max().item() for x, y in zip(a, b)))


def verify(out: str, adapter: str, home: Path, ctx, dtype: str = "fp32", merge_dtype: str | None = None,
           prompts: list[str] | None = None, device: str = "") -> dict[str, Any]:
    """The verification table (``merge.verified``): the saved folder loaded on its own, the model
    as trained (its base as trained + adapter) and the full-precision base + adapter, each in
    ``dtype``, on ``prompts``; one model at a time (logits kept on the CPU)."""
    from backend.tiny import _no_progress_bars

    with _no_progress_bars():
        return _verify(out, adapter, home, ctx, dtype, merge_dtype, prompts, device)


def _verify(out: str, adapter: str, home: Path, ctx, dtype: str, merge_dtype: str | None,
            prompts: list[str] | None, device: str) -> dict[str, Any]:
    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backend import adapters, models

    report = ctx.progress
    cancelled = lambda: ctx.cancelled  # noqa: E731
    folder = Path(out)
    if not (folder / "config.json").is_file():
        raise JobError(f"{folder} is not a saved model folder (no config.json)", where=f"out = {out}",
                       hint="merge first, or pick the merged folder")
    prompts = [p for p in (prompts or []) if p.strip()] or list(DEFAULT_PROMPTS)
    info, trained, src = _base_info(adapter, home)
    if merge_dtype is None:
        try:
            merge_dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(
                json.loads((folder / "config.json").read_text()).get("dtype") or "", "fp32")
        except (OSError, ValueError):
            merge_dtype = "fp32"
    if not device:
        device = models.resolve_device("auto")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    steps = 4
    rows = []

    def free() -> None:
        gc.collect()
        _empty_cuda()

    # 1. The merged folder, on its own.
    report("verifying", 0, steps, "", "loading the merged model")
    t = time.perf_counter()
    merged = AutoModelForCausalLM.from_pretrained(str(folder), dtype=_dtype(dtype), device_map={"": device})
    merged.eval()
    load_s = time.perf_counter() - t
    merged_rows = _logits(merged, tokenizer, prompts, device)
    del merged
    free()
    if cancelled():
        raise JobCancelled()
    # 2. The model as trained: the base as trained (4-bit) + the adapter, computing in ``dtype``.
    report("verifying", 1, steps, "", "loading the base as trained + adapter")
    as_trained = P.ModelSettings(**{**P.to_dict(trained), "device": device, "attn_implementation": "sdpa"})
    if as_trained.precision not in ("4bit", "8bit"):
        as_trained.precision = dtype
    t = time.perf_counter()
    loaded = models.load_base_model(as_trained, cancelled=cancelled)
    if as_trained.precision == "4bit":
        compute_4bit_in(loaded.model, _dtype(dtype))
    model = adapters.attach_adapter(loaded.model, adapter, name="verify")
    trained_load = time.perf_counter() - t
    trained_rows = _logits(model, tokenizer, prompts, device)
    del model, loaded
    free()
    if cancelled():
        raise JobCancelled()
    # 3. The full-precision base + adapter; the same base without the adapter gives the noise
    # floor: its logits in the merge dtype against fp32.
    report("verifying", 2, steps, "", "loading the full-precision base + adapter")
    full = P.ModelSettings(source=trained.source, revision=trained.revision,
                           trust_remote_code=trained.trust_remote_code, precision=dtype, device=device)
    t = time.perf_counter()
    loaded = models.load_base_model(full, cancelled=cancelled)
    model = adapters.attach_adapter(loaded.model, adapter, name="verify")
    full_load = time.perf_counter() - t
    report("verifying", 3, steps, "", "noise floor")
    full_rows = _logits(model, tokenizer, prompts, device)
    if dtype != "fp32":
        noise = float("nan")  # no fp32 copy to compare with (verification in fp32 did not fit)
        ctx.emit("log", {"level": "warning", "message": f"verified in {dtype}: no noise floor (it needs the base "
                                                        "in fp32)"})
    elif merge_dtype == "fp32":
        noise = 0.0
    else:
        with model.disable_adapter():
            base32 = _logits(model, tokenizer, prompts, device)
        model.to(_dtype(merge_dtype))
        with model.disable_adapter():
            noise = _max_diff(_logits(model, tokenizer, prompts, device), base32)
    del model, loaded
    free()
    base_disk = models.shard_plan(src.folder)["disk_bytes"] if src.folder else None
    with_adapter = (base_disk + int(info["size_bytes"])) if base_disk else None
    rows = [
        {"model": "merged", "max_abs_logit_diff": _max_diff(merged_rows, trained_rows),
         "max_abs_logit_diff_vs_full": _max_diff(merged_rows, full_rows), "perplexity": _ppl(merged_rows),
         "size_bytes": folder_bytes(folder), "load_s": round(load_s, 3)},
        {"model": "trained (4-bit base + adapter)" if trained.precision == "4bit" else
            f"trained ({trained.precision} base + adapter)", "max_abs_logit_diff": None,
         "max_abs_logit_diff_vs_full": _max_diff(trained_rows, full_rows), "perplexity": _ppl(trained_rows),
         "size_bytes": with_adapter, "load_s": round(trained_load, 3)},
        {"model": "full-precision base + adapter", "max_abs_logit_diff": _max_diff(full_rows, trained_rows),
         "max_abs_logit_diff_vs_full": None, "perplexity": _ppl(full_rows),
         "size_bytes": with_adapter, "load_s": round(full_load, 3)},
    ]
    report("verifying", steps, steps, "", "")
    result = {"out": str(folder), "dtype": dtype, "merge_dtype": merge_dtype, "rows": rows,
              "noise_floor": noise, "prompts": len(prompts), "device": device}
    ctx.emit("merge.verified", result)
    return result


def format_table(verified: dict[str, Any]) -> str:
    """The verification table as text (``qlw merge --verify`` and the bench)."""
    head = f"{'model':<34}  {'max |Δlogit| vs trained':>23}  {'vs full+adapter':>15}  {'perplexity':>10}  {'size':>10}  {'load s':>7}"
    lines = [head]
    for r in verified["rows"]:
        def f(v, spec):
            return "—" if v is None else format(v, spec)

        size = "—" if r["size_bytes"] is None else f"{r['size_bytes'] / MIB:,.1f} MiB"
        lines.append(f"{r['model']:<34}  {f(r['max_abs_logit_diff'], '.3e'):>23}  "
                     f"{f(r.get('max_abs_logit_diff_vs_full'), '.3e'):>15}  {f(r['perplexity'], '.4g'):>10}  "
                     f"{size:>10}  {f(r['load_s'], '.1f'):>7}")
    lines.append(f"noise floor of {verified['merge_dtype']}: max |Δlogit| {verified['noise_floor']:.3e} (the base in "
                 f"{verified['merge_dtype']} vs fp32); computed in {verified['dtype']} on {verified['prompts']} prompts")
    return "\n".join(lines)

