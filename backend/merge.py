"""Merging a LoRA adapter into its base model, saving the result, and checking it (issue 7).

The steps of the Merge pane and of ``qlw merge`` (one code path for both):

1. :func:`plan`: what a merge will take, from files alone (no model load): the adapter and the
   base it was trained on, the device (the GPU when the merged model fits there, else the CPU),
   memory and disk needed against what is free, the output folder.
2. :func:`run_merge`: load the base again in the chosen way and precision, never merging into
   4-bit weights:

   - ``into="dequantized"`` (the default for a QLoRA adapter): the base as the adapter saw it in
     training, loaded in 4-bit as trained, then every bitsandbytes ``Linear4bit`` replaced by an
     ``nn.Linear`` holding ``bitsandbytes.functional.dequantize_4bit`` of its weight in the merge
     dtype (:func:`dequantize_model`); the merged model then behaves like the trained one.
   - ``into="original"``: the base's own full-precision weights from its folder.

   Then peft's merge layer by layer (``merge`` + ``unload``, i.e. ``merge_and_unload`` with
   progress), and ``save_pretrained`` (safetensors, shards of ``max_shard_size``), the tokenizer
   and chat template, the generation config, a config.json that names no path of the base, and
   a README.md model card.
3. :func:`verify`: the saved folder loaded on its own against the model as trained (4-bit base +
   adapter) and against the full-precision base + adapter: max |logit difference|, perplexity,
   size on disk, and the noise floor of the merge dtype (the base in that dtype against fp32).

Safety: everything is written into a temporary folder beside the target (same filesystem) and
renamed into place only when complete, so a failed, cancelled or killed merge leaves no
half-written model under the target's name; leftovers of a killed merge are removed by the next
one. An existing target is replaced only with ``overwrite`` (old renamed away, new renamed in,
old deleted), and only when it is empty or a model folder (:func:`replace_refusal`): a folder of
anything else is refused, never deleted. Free disk space is checked first.

A test seam: ``QLW_MERGE_FAULT=kill@saving`` (SIGKILL this process once the weights are written,
before the folder is complete) or ``fail@saving`` (raise there); read once per process.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from backend import protocol as P
from backend.jobs import JobCancelled, JobError, print_job_error

FAULT_ENV = "QLW_MERGE_FAULT"
MIB = 1024 * 1024
GIB = 1024 * MIB
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
#: Marks of this module's temporary folders beside a target: ``.<name>.qlw-merge-<pid>-<hex>``
#: (being written) and ``.<name>.qlw-old-<hex>`` (a replaced target being deleted).
TMP_MARK = ".qlw-merge-"
OLD_MARK = ".qlw-old-"
#: Prompts of the verification table when none are given: short, varied, English.
DEFAULT_PROMPTS = [
    "The capital of France is Paris, and the capital of Germany is",
    "To make a cup of tea, first boil the water, then",
    "Question: What is 12 times 7?\nAnswer:",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]
#: Room left on the disk beyond the estimated bytes (tokenizer, card, filesystem overhead).
DISK_MARGIN = 64 * MIB


def _dtype(name: str):
    import torch

    return getattr(torch, DTYPE_NAMES[name])


def parse_fault(text: str | None) -> tuple[str, str] | None:
    """``"kill@saving"`` -> ``("kill", "saving")``; None for empty or malformed text."""
    m = re.fullmatch(r"\s*(kill|fail)\s*@\s*([a-z ]+?)\s*", text or "")
    return (m.group(1), m.group(2)) if m else None


def take_fault() -> tuple[str, str] | None:
    return parse_fault(os.environ.pop(FAULT_ENV, None))


def _fault_at(fault: tuple[str, str] | None, stage: str) -> None:
    if fault is None or fault[1] != stage:
        return
    if fault[0] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected failure at {stage} ({FAULT_ENV})")


# Paths -----------------------------------------------------------------------------------------------


def merged_home(home: Path) -> Path:
    return Path(home) / "merged"


def resolve_out(out: str, home: Path) -> Path:
    """The output folder: absolute as given, or relative to ``<home>/merged`` (which a relative
    path may not leave). JobError for an empty or unusable path."""
    text = (out or "").strip()
    if not text or "\0" in text:
        raise JobError("no output folder given", where="out", hint="name a folder, e.g. my-model (under the data "
                       "home's merged/) or an absolute path")
    path = Path(text).expanduser()
    if not path.is_absolute():
        base = merged_home(home).resolve()
        path = (base / path).resolve()
        if not path.is_relative_to(base) or path == base:
            raise JobError(f"{text} leads outside {base}", where=f"out = {text}",
                           hint="give a folder name under merged/, or an absolute path")
    else:
        path = Path(os.path.abspath(path))
    if path.name.startswith(".") and (TMP_MARK in path.name or OLD_MARK in path.name):
        raise JobError(f"{path.name} is a name qlw uses for its temporary folders", where=f"out = {text}",
                       hint="choose another name")
    if path.exists() and not path.is_dir():
        raise JobError(f"{path} exists and is a file, not a folder", where=f"out = {text}",
                       hint="choose another name")
    return path


#: Weight files that, beside a config.json, make a folder a model folder a merge may replace.
MODEL_WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "model*.bin")


def _is_qlw_card(readme: Path) -> bool:
    """A README.md model card qlw wrote (its front matter tags it ``qlw`` and ``merged``)."""
    try:
        head = readme.read_text(encoding="utf-8", errors="replace")[:2000]
    except OSError:
        return False
    front = head.split("---", 2)[1] if head.startswith("---") and head.count("---") >= 2 else ""
    return "- qlw" in front and "- merged" in front


def replace_refusal(out: Path) -> str | None:
    """Why an existing ``out`` may not be replaced by a merge (None: it may be, or it does not
    exist). Only an empty folder or a model folder (config.json and weights, or a folder with
    qlw's model card) is replaced; anything else (a folder of the user's notes, the home, ~) is
    someone's files that a mistyped output folder must never delete."""
    out = Path(out)
    if out.is_symlink():
        return f"{out} is a link, not a folder qlw wrote"
    if not out.exists():
        return None
    if not out.is_dir():
        return f"{out} is a file, not a model folder"
    try:
        entries = sorted(out.iterdir(), key=lambda e: e.name)
    except OSError as exc:
        return f"{out} cannot be read ({exc.strerror or exc})"
    if not entries:
        return None
    names = {e.name for e in entries if e.is_file()}
    weights = any(e.is_file() and any(e.match(g) for g in MODEL_WEIGHTS) for e in entries)
    if "config.json" in names and weights:
        return None
    if "README.md" in names and _is_qlw_card(out / "README.md"):
        return None
    shown = [e.name + ("/" if e.is_dir() else "") for e in entries[:5]]
    more = f" and {len(entries) - 5} more" if len(entries) > 5 else ""
    return (f"{out} is not a model folder (no config.json with weights, no qlw model card): it holds "
            f"{', '.join(shown)}{more}, which replacing it would delete")


def write_refusal(out: Path) -> str | None:
    """Why the merged model could not be written at ``out`` (None: it can): the nearest existing
    folder on its way is probed by creating (and removing) a folder there, as the merge's
    temporary folder will be, so a read-only file system or a folder without permission is
    found before any model is loaded (a check of the mode bits would miss both as root)."""
    folder = Path(out).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        probe = tempfile.mkdtemp(prefix=".qlw-write-check-", dir=folder)
        os.rmdir(probe)
    except OSError as exc:
        return f"{folder} is not writable ({exc.strerror or exc})"
    return None


def check_replaceable(out: Path, text: str | None = None) -> None:
    """JobError when ``out`` exists and is not a folder a merge may replace."""
    why = replace_refusal(out)
    if why:
        raise JobError(why, where=f"out = {text or out}",
                       hint="pick another output folder (a new or empty one): qlw replaces only a model folder")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> list[str]:
    """Remove what killed merges left beside ``out``: temporary folders of processes that are
    gone, and replaced targets not yet deleted. Returns the names removed."""
    removed = []
    parent = out.parent
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        name = entry.name
        if not name.startswith(f".{out.name}"):
            continue
        rest = name[len(out.name) + 1:]
        stale = False
        if rest.startswith(TMP_MARK):
            m = re.match(r"(\d+)-", rest[len(TMP_MARK):])
            stale = m is None or int(m.group(1)) == os.getpid() or not _pid_alive(int(m.group(1)))
            if m is not None and int(m.group(1)) == os.getpid():
                stale = False  # one of this process's own merges may still be writing it
        elif rest.startswith(OLD_MARK):
            stale = True
        if stale and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(name)
    return removed


def folder_bytes(folder: Path) -> int:
    total = 0
    for p in Path(folder).rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def list_files(folder: Path) -> list[dict[str, Any]]:
    """The folder's files (relative names) with their sizes, sorted by name."""
    folder = Path(folder)
    return [{"name": str(p.relative_to(folder)), "size_bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file()]


def _disk_free(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return int(shutil.disk_usage(probe).free)


# The plan ----------------------------------------------------------------------------------------------


def check_params(dtype: str, into: str, max_shard_size: str = "5GB") -> None:
    if dtype not in P.MERGE_DTYPES:
        raise JobError(f"dtype must be one of {', '.join(P.MERGE_DTYPES)}, got {dtype!r}", where="dtype",
                       hint="never 4-bit: a merge into 4-bit weights would round the adapter away")
    if into not in P.MERGE_INTO:
        raise JobError(f"into must be one of {', '.join(P.MERGE_INTO)}, got {into!r}", where="into")
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*([KMGT]i?B)\s*", max_shard_size or "", re.IGNORECASE):
        raise JobError(f"max_shard_size must look like 5GB, 500MB or 2GiB, got {max_shard_size!r}",
                       where="max_shard_size")


def _side_files_bytes(folder: Path | str | None) -> int:
    """The bytes of a local base folder's files other than its weights (tokenizer, configs),
    which the merged folder gets too; 0 for a Hub model (not downloaded here)."""
    if not folder or not Path(folder).is_dir():
        return 0
    total = 0
    for f in Path(folder).iterdir():
        if f.is_file() and not any(f.match(g) for g in MODEL_WEIGHTS):
            total += f.stat().st_size
    return total


def _base_info(adapter: str | Path, home: Path):
    """(adapter info, base settings as trained, resolved source)."""
    from backend import adapters, models

    info = adapters.inspect_adapter(adapter)
    settings = adapters.base_settings_for(adapter, home)
    try:
        src = models.resolve_source(settings)
    except JobError as exc:
        raise JobError(f"the base model this adapter was trained on is not available: {exc}",
                       where=exc.where or f"base = {settings.source}",
                       hint=exc.hint or "put the base model's folder back, or pick another adapter") from None
    return info, settings, src


def plan(adapter: str, out: str, home: Path, dtype: str = "bf16", into: str = "dequantized",
         max_shard_size: str = "5GB", device: str = "auto") -> dict[str, Any]:
    """What a merge will take (``merge.plan``): quick, no model is loaded."""
    from backend import models

    check_params(dtype, into, max_shard_size)
    info, trained, src = _base_info(adapter, home)
    target = resolve_out(out, home)
    quantized = trained.precision == "4bit"
    warnings: list[str] = []
    if into == "dequantized" and not quantized:
        warnings.append(f"the adapter was trained on a {trained.precision} base, not a 4-bit one: "
                        "'dequantized' is the same as 'original' here")
    if trained.precision == "8bit" and into == "dequantized":
        warnings.append("8-bit bases are merged from their original weights")
    full = P.ModelSettings(source=trained.source, revision=trained.revision,
                           trust_remote_code=trained.trust_remote_code, precision=dtype, device=device)
    est = models.estimate(full, src)
    need = int(est["total_bytes"])
    if into == "dequantized" and quantized:
        # The 4-bit weights stay until each layer is replaced: at worst both copies of one layer.
        need += int(est["total_bytes"] * 0.05)
    need += int(info["size_bytes"] * 2)  # the adapter, upcast to fp32 by peft
    chosen = est["device"]
    free = int(est["free_bytes"])
    if chosen.startswith("cuda") and need > free and device == "auto":
        cpu = models.cpu_memory()
        warnings.append(f"the merge needs about {need / GIB:.1f} GiB and {chosen} has {free / GIB:.1f} GiB free: "
                        "merging on the CPU (slower)")
        chosen, free = "cpu", int(cpu["free_bytes"])
    verdict = models.verdict(need, free)
    if verdict == "will not fit":
        warnings.append(f"not enough memory on {chosen}: about {need / GIB:.1f} GiB needed, {free / GIB:.1f} GiB free")
    if trained.precision == "bf16" and dtype == "fp16" or trained.compute_dtype == "bf16" and dtype == "fp16":
        warnings.append("the adapter was trained in bf16: fp16 has a smaller range (values over 65,504 overflow)")
    # What the folder will hold (weights in the merge dtype, plus the base's tokenizer and config
    # files), and what the free-space check asks for: that plus a margin for the writes' slack.
    disk_size = int(est["parameters"]) * DTYPE_BYTES[dtype] + _side_files_bytes(src.folder)
    disk_need = disk_size + DISK_MARGIN
    disk_free = _disk_free(target.parent)
    if disk_need > disk_free:
        warnings.append(f"not enough disk space at {target.parent}: about {disk_need / GIB:.1f} GiB needed, "
                        f"{disk_free / GIB:.1f} GiB free")
    out_exists = target.exists()
    out_unwritable = write_refusal(target)
    if out_unwritable:
        warnings.append(f"the merged model cannot be written to {target}: {out_unwritable}; pick another output folder")
    out_blocked = replace_refusal(target) if out_exists else None
    if out_blocked:
        warnings.append(f"{target} exists and cannot be replaced: {out_blocked}; pick another output folder")
    elif out_exists:
        warnings.append(f"{target} exists: merging replaces it (confirm to overwrite)")
    return {
        "adapter": info,
        "base": {"source": trained.source, "precision": trained.precision,
                 "precision_label": models.describe_precision(trained), "path": str(src.folder or ""),
                 "parameters": est["parameters"]},
        "into_default": "dequantized" if quantized else "original",
        "dtype": dtype, "into": into, "max_shard_size": max_shard_size,
        "device": chosen,
        "memory": {"need_bytes": need, "free_bytes": free, "verdict": verdict,
                   "reclaimed_bytes": int(est.get("reclaimed_bytes") or 0) if chosen == est["device"] else 0},
        "disk": {"size_bytes": disk_size, "need_bytes": disk_need, "free_bytes": disk_free},
        "out": str(target),
        "out_exists": out_exists,
        "out_blocked": out_blocked,
        "out_unwritable": out_unwritable,
        "warnings": warnings,
    }


# Loading and dequantizing ----------------------------------------------------------------------------


def dequantize_model(model, dtype) -> int:
    """Replace every bitsandbytes ``Linear4bit`` of ``model`` by an ``nn.Linear`` holding its
    dequantized weight in ``dtype`` (one layer at a time), drop the model's quantization config,
    and cast the rest of the model to ``dtype``. Returns how many layers were replaced.

    transformers (5.17 and 5.23 alike) has ``model.dequantize(dtype)`` for bitsandbytes models
    (``integrations.bitsandbytes.dequantize_and_replace``), but it dequantizes every weight twice,
    in the dtype the layer was quantized from (bf16 for a bf16-compute run), then casts: an fp32
    merge would carry bf16 rounding that the 4-bit layer computing in fp32 never sees. Here each
    weight is dequantized once, in fp32, and rounded once to ``dtype``."""
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit

    n = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear4bit):
            continue
        weight = module.weight
        # Dequantized in fp32 (absmax x code exactly), then rounded once to ``dtype``: the 4-bit
        # layer computing in fp32 sees these fp32 values, not ones rounded to its load dtype.
        state = copy.copy(weight.quant_state)
        state.dtype = torch.float32
        with torch.no_grad():
            dense = dequantize_4bit(weight.data, state).to(dtype)
        with torch.device("meta"):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight = torch.nn.Parameter(dense, requires_grad=False)
        if module.bias is not None:
            linear.bias = torch.nn.Parameter(module.bias.data.to(dtype), requires_grad=False)
        model.set_submodule(name, linear)
        del module, weight
        n += 1
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    else:
        for attr in ("hf_quantizer", "quantization_method"):
            if hasattr(model, attr):
                delattr(model, attr)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    model.to(dtype)
    model.config.dtype = dtype
    return n


def compute_4bit_in(model, dtype) -> None:
    """Make a 4-bit model compute in ``dtype`` without touching its quantized weights: its
    ``Linear4bit`` layers compute in ``dtype`` (they dequantize to the dtype they were quantized
    from, then cast) and its unquantized parameters are cast (buffers such as rotary frequencies
    keep their dtype). The model as trained, only computed more precisely."""
    from bitsandbytes.nn import Linear4bit, Params4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.compute_dtype = dtype
        for name, param in module.named_parameters(recurse=False):
            if isinstance(param, Params4bit) or not param.is_floating_point():
                continue
            param.data = param.data.to(dtype)


def load_for_merge(src, trained: P.ModelSettings, dtype: str, into: str, device: str,
                   report: Callable[..., None], cancelled: Callable[[], bool]):
    """The base to merge into, in ``dtype`` on ``device``: (model, tokenizer, how it was loaded)."""
    from backend import models

    quantized = trained.precision == "4bit"
    if into == "dequantized" and quantized:
        # Loaded exactly as in training (the compute dtype decides which tensors bitsandbytes
        # quantizes: the checkpoint's, cast to it), so the 4-bit weights and the unquantized
        # modules are those the adapter was trained against; then dequantized to the merge dtype.
        settings = P.ModelSettings(source=trained.source, revision=trained.revision,
                                   trust_remote_code=trained.trust_remote_code, precision="4bit",
                                   quant_type=trained.quant_type, double_quant=trained.double_quant,
                                   compute_dtype=trained.compute_dtype, attn_implementation="sdpa", device=device)
        how = f"{models.describe_precision(settings)} as trained, dequantized to {dtype}"
    else:
        settings = P.ModelSettings(source=trained.source, revision=trained.revision,
                                   trust_remote_code=trained.trust_remote_code, precision=dtype,
                                   attn_implementation="sdpa", device=device)
        how = f"original weights in {dtype}"
    loaded = models.load_base_model(
        settings, progress=lambda stage, done, total, unit="", message="": report("loading base", done, total, unit,
                                                                                     f"{stage} {message}".strip()),
        cancelled=cancelled)
    model = loaded.model
    if settings.precision == "4bit":
        dequantize_model(model, _dtype(dtype))
    return model, loaded.tokenizer, how


def merge_adapter(model, adapter: str | Path, report: Callable[..., None], cancelled: Callable[[], bool]):
    """peft's merge, layer by layer with progress: the plain model with the adapter folded in."""
    from peft.tuners.lora import LoraLayer

    from backend import adapters

    report("attaching adapter", 0, 1, "", str(adapter))
    peft_model = adapters.attach_adapter(model, adapter, name="merge")
    report("attaching adapter", 1, 1, "", "")
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    import torch

    with torch.no_grad():
        for i, layer in enumerate(layers):
            if cancelled():
                raise JobCancelled()
            layer.merge(adapter_names=["merge"])
            report("merging", i + 1, len(layers), "layers", "")
    merged = peft_model.unload()  # the base layers, which now hold the merged weights
    return merged


# Saving ---------------------------------------------------------------------------------------------------


def _strip_paths(value: Any, paths: list[str], replacement: str) -> tuple[Any, int]:
    """``value`` with every string that names one of ``paths`` replaced; and how many were."""
    if isinstance(value, str):
        for p in paths:
            if p and p in value:
                return (replacement if value.strip() == p else value.replace(p, replacement)), 1
        return value, 0
    if isinstance(value, dict):
        n = 0
        out = {}
        for k, v in value.items():
            out[k], c = _strip_paths(v, paths, replacement)
            n += c
        return out, n
    if isinstance(value, list):
        n = 0
        items = []
        for v in value:
            v2, c = _strip_paths(v, paths, replacement)
            items.append(v2)
            n += c
        return items, n
    return value, 0


def scrub_paths(folder: Path, paths: list[str], replacement: str) -> list[str]:
    """Rewrite the folder's JSON files so none names a path of the base (transformers writes
    ``_name_or_path`` and tokenizers ``name_or_path``; peft stores the absolute base path).
    Returns the files changed."""
    changed = []
    paths = sorted({p for p in paths if p and len(p) > 1}, key=len, reverse=True)
    for f in sorted(Path(folder).glob("*.json")):
        if f.name.endswith(".index.json"):
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        clean, n = _strip_paths(data, paths, replacement)
        for key in ("_name_or_path", "name_or_path"):
            if isinstance(clean, dict) and isinstance(clean.get(key), str) and clean[key].startswith("/"):
                clean[key] = replacement
                n += 1
        if n:
            f.write_text(json.dumps(clean, indent=2, sort_keys=False) + "\n", encoding="utf-8")
            changed.append(f.name)
    return changed


class _SaveWatcher:
    """Reports the bytes written into a folder while ``save_pretrained`` writes it (progress by
    file, from another thread: save_pretrained has no callback)."""

    def __init__(self, folder: Path, total: int, report: Callable[..., None], interval: float = 0.25):
        self.folder, self.total, self.report, self.interval = folder, total, report, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qlw-merge-save-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        sizes = {}
        for p in self.folder.glob("*.safetensors"):
            try:
                st = p.stat()
            except OSError:  # renamed or removed while we looked
                continue
            sizes[p.name] = (st.st_size, st.st_mtime)
        done = sum(size for size, _ in sizes.values())
        newest = max(sizes, key=lambda name: sizes[name][1], default="")
        self.report("saving", min(done, self.total), self.total, "bytes", f"{len(sizes)} file(s), {newest}")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(2)


def _read_run_config(info: dict[str, Any]) -> dict[str, Any]:
    path = info.get("run_config")
    if not path:
        return {}
    try:
        from backend import train_config as TC

        config, errors = TC.read_toml(Path(path))
        return config if "file" not in errors else {}
    except Exception:
        return {}


def _losses_from_store(home: Path, session: str) -> tuple[float | None, float | None]:
    """The final training and validation loss the session store recorded (train.finished)."""
    db = Path(home) / "sessions.db"
    if not session or not db.is_file():
        return None, None
    try:
        from sessions.store import Store

        store = Store(db)
        try:
            rows = [e for e in store.read_events(session) if e.kind == "train.finished"]
        finally:
            store.close()
    except Exception:
        return None, None
    if not rows:
        return None, None
    last = rows[-1].payload
    return last.get("final_loss"), last.get("final_eval_loss")


def _fmt(value: Any) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "—"
    return str(value)


def model_card(*, name: str, base: str, base_is_hub: bool, info: dict[str, Any], run: dict[str, Any],
               losses: tuple[float | None, float | None], dtype: str, into: str, how: str) -> str:
    """README.md of the merged folder: the base, the data, the LoRA and training settings, the
    final losses, how it was merged and how to load it."""
    data = (run.get("data") or {})
    source = (data.get("source") or {})
    dataset = source.get("path") or "—"
    if source.get("split"):
        dataset += f" (split {source['split']})"
    lora_rows = [("r", info.get("r")), ("lora_alpha", info.get("lora_alpha")),
                 ("lora_dropout", info.get("lora_dropout")), ("target_modules", info.get("target_modules")),
                 ("use_rslora", info.get("use_rslora")), ("use_dora", info.get("use_dora"))]
    for key, value in (run.get("lora") or {}).items():
        if key not in dict(lora_rows) and key != "target_modules":
            lora_rows.append((key, value))
    training = run.get("training") or {}
    keys = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
            "gradient_accumulation_steps", "lr_scheduler_type", "warmup_ratio", "optim", "weight_decay",
            "gradient_checkpointing", "seed")
    train_rows = [(k, training[k]) for k in keys if k in training]
    model = run.get("model") or {}
    trained_on = model.get("precision", "?")
    if trained_on == "4bit":
        trained_on = (f"4-bit {model.get('quant_type', 'nf4')}{' + double quant' if model.get('double_quant') else ''}, "
                      f"compute {model.get('compute_dtype', 'bf16')}")
    front = ["---", "library_name: transformers", "tags:", "- qlw", "- lora", "- merged"]
    if base_is_hub:
        front.append(f"base_model: {base}")
    front.append("---")
    loss, eval_loss = losses
    lines = [
        *front, "",
        f"# {name}", "",
        f"A LoRA adapter merged into its base model with qlw. Weights in {dtype} (safetensors).", "",
        "| | |", "|---|---|",
        f"| base model | {base} |",
        f"| base as trained | {trained_on} |",
        f"| merged into | {into}: {how} |",
        f"| dataset | {dataset} |",
        f"| data template | {_fmt(data.get('template'))}, max_length {_fmt(data.get('max_length'))} |",
        f"| final training loss | {_fmt(loss)} |",
        f"| final validation loss | {_fmt(eval_loss)} |",
        f"| adapter | {info.get('kind', 'adapter')}{' at step ' + str(info['step']) if info.get('step') else ''} |",
        "",
        "## LoRA settings", "", "| setting | value |", "|---|---|",
        *(f"| {k} | {_fmt(v)} |" for k, v in lora_rows), "",
        "## Training settings", "",
    ]
    if train_rows:
        lines += ["| setting | value |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in train_rows), ""]
    else:
        lines += ["Not recorded (the adapter has no run config beside it).", ""]
    lines += [
        "## How to load it", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("path/to/{name}", dtype="auto")',
        f'tokenizer = AutoTokenizer.from_pretrained("path/to/{name}")',
        'messages = [{"role": "user", "content": "Hello!"}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,",
        '                                       return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))",
        "```", "",
        "No adapter or peft is needed: the LoRA weights are part of the model's weights.", "",
    ]
    return "\n".join(lines)


# The merge job ------------------------------------------------------------------------------------------


def run_merge(params: dict[str, Any], home: Path, ctx, fault: tuple[str, str] | None = None,
              record_artifact: Callable[[str, str], None] | None = None) -> dict[str, Any]:
    """Merge, save (atomically), optionally verify. ``params``: the fields of ``merge.start``.
    Emits ``merge.saved`` (and ``merge.verified``); returns the job's result."""
    from backend.tiny import _no_progress_bars  # transformers' tqdm bars stay out of logs and tables

    with _no_progress_bars():
        return _run_merge(params, home, ctx, fault, record_artifact)


def _run_merge(params: dict[str, Any], home: Path, ctx, fault: tuple[str, str] | None,
               record_artifact: Callable[[str, str], None] | None) -> dict[str, Any]:
    from backend import models

    adapter = params["adapter"]
    dtype = params.get("dtype", "bf16")
    into = params.get("into", "dequantized")
    max_shard = params.get("max_shard_size", "5GB")
    overwrite = bool(params.get("overwrite", False))
    report = ctx.progress
    cancelled = lambda: ctx.cancelled  # noqa: E731
    p = plan(adapter, params["out"], home, dtype, into, max_shard, device=params.get("device") or "auto")
    out = Path(p["out"])
    check_replaceable(out, params["out"])
    if p["out_unwritable"]:
        raise JobError(f"the merged model cannot be written to {out}: {p['out_unwritable']}", where=f"out = {out}",
                       hint="choose a folder you can write to (the default is the data home's merged/)")
    if p["out_exists"] and not overwrite:
        raise JobError(f"{out} exists", where=f"out = {out}", hint="confirm to overwrite it, or choose another folder")
    if p["disk"]["need_bytes"] > p["disk"]["free_bytes"]:
        raise JobError(f"not enough disk space for the merged model at {out.parent}: about "
                       f"{p['disk']['need_bytes'] / GIB:.2f} GiB needed, {p['disk']['free_bytes'] / GIB:.2f} GiB free",
                       where=f"out = {out}", hint="free disk space, choose another folder, or merge in a smaller dtype")
    if p["memory"]["verdict"] == "will not fit":
        raise JobError(f"not enough memory to merge on {p['device']}: about {p['memory']['need_bytes'] / GIB:.1f} GiB "
                       f"needed, {p['memory']['free_bytes'] / GIB:.1f} GiB free", where=f"device = {p['device']}",
                       hint="free memory (ctrl+f frees VRAM), or merge in a smaller dtype")
    for w in p["warnings"]:
        if "exists" not in w:
            ctx.emit("log", {"level": "warning", "message": w})
    info, trained, src = _base_info(adapter, home)
    if src.folder and out.exists() and os.path.realpath(src.folder) == os.path.realpath(out):
        raise JobError(f"{out} is the base model's own folder", where=f"out = {params['out']}",
                       hint="pick another output folder: the merge must not replace the base it loads")
    removed = clean_stale(out)
    if removed:
        ctx.emit("log", {"level": "info", "message": f"removed leftovers of an interrupted merge: {', '.join(removed)}"})
    # The held base model (Chat's, the last run's) is let go only when the merge, or the fp32
    # verification after it, needs its memory.
    peak = max(p["memory"]["need_bytes"], int(p["base"]["parameters"]) * 4 if params.get("verify", True) else 0)
    if peak > p["memory"]["free_bytes"] - p["memory"].get("reclaimed_bytes", 0) and models.release_base_model():
        ctx.emit("log", {"level": "info", "message": "released the held base model to make room for the merge"})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    model = tokenizer = merged = None
    try:
        model, tokenizer, how = load_for_merge(src, trained, dtype, into, p["device"], report, cancelled)
        ctx.check_cancelled()
        merged = merge_adapter(model, adapter, report, cancelled)
        model = None
        merge_s = time.perf_counter() - t0
        ctx.check_cancelled()
        # config.json names no path of the base (peft and transformers would write it).
        base_name = trained.source if src.kind == "hub" else Path(trained.source).name
        merged.config._name_or_path = trained.source if src.kind == "hub" else ""
        if hasattr(merged, "name_or_path"):
            merged.name_or_path = ""
        merged.config.dtype = _dtype(dtype)
        tmp.mkdir()
        t_save = time.perf_counter()
        total = int(p["base"]["parameters"]) * DTYPE_BYTES[dtype]
        report("saving", 0, total, "bytes", "weights")
        with _SaveWatcher(tmp, total, report) as watcher:
            merged.save_pretrained(str(tmp), max_shard_size=max_shard.replace(" ", ""))
            watcher.poll()
        _fault_at(fault, "saving")
        ctx.check_cancelled()
        if tokenizer is not None:
            report("saving", total, total, "bytes", "tokenizer and chat template")
            tokenizer.save_pretrained(str(tmp))
        gen = getattr(merged, "generation_config", None)
        if gen is not None and not (tmp / "generation_config.json").exists():
            gen.save_pretrained(str(tmp))
        paths = [str(src.folder) if src.folder else "", str(Path(trained.source).expanduser()),
                 os.path.realpath(str(src.folder)) if src.folder else "", str(Path(adapter).resolve())]
        scrub_paths(tmp, [x for x in paths if x.startswith("/")], base_name)
        report("model card", 0, 1, "", "README.md")
        run_cfg = _read_run_config(info)
        losses = (info.get("final_loss"), info.get("final_eval_loss"))
        if losses == (None, None):
            losses = _losses_from_store(home, info.get("session", ""))
        card = model_card(name=out.name, base=trained.source if src.kind == "hub" else base_name,
                          base_is_hub=src.kind == "hub", info=info, run=run_cfg, losses=losses,
                          dtype=dtype, into=into if trained.precision == "4bit" else "original", how=how)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        report("model card", 1, 1, "", "README.md")
        save_s = time.perf_counter() - t_save
        ctx.check_cancelled()
        _swap_into_place(tmp, out, overwrite)
    except OSError as exc:  # the disk filled, the folder went read-only: said for people
        shutil.rmtree(tmp, ignore_errors=True)
        raise JobError(f"could not write the merged model to {out.parent}: {exc.strerror or exc}",
                       where=str(exc.filename or out), hint="free disk space, or choose a folder you can write to") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model = merged = None
        import gc

        gc.collect()
        _empty_cuda()
    files = list_files(out)
    size = sum(f["size_bytes"] for f in files)
    if record_artifact is not None:
        try:
            record_artifact("merged", str(out))
        except Exception:
            pass
    saved = {"out": str(out), "files": files, "size_bytes": size, "merge_s": round(merge_s, 3),
             "save_s": round(save_s, 3), "dtype": dtype, "into": into, "device": p["device"], "how": how}
    ctx.emit("merge.saved", saved)
    result = {"out": str(out), "files": files, "size_bytes": size, "merge_s": saved["merge_s"],
              "save_s": saved["save_s"], "verify": None, "dtype": dtype, "into": into, "device": p["device"]}
    if params.get("verify", True):
        # fp32 when the base fits in fp32 where the merge ran (one model at a time), else the merge dtype.
        fp32_fits = int(p["base"]["parameters"]) * 4 * 1.2 < p["memory"]["free_bytes"]
        verify_dtype = params.get("verify_dtype") or ("fp32" if fp32_fits else dtype)
        result["verify"] = verify(str(out), adapter, home, ctx, dtype=verify_dtype, merge_dtype=dtype,
                                  prompts=list(params.get("prompts") or []), device=p["device"])
    return result


def _empty_cuda() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _swap_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the complete folder into place; an existing target (only with ``overwrite``) is
    renamed away first and deleted after."""
    old = None
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise JobError(f"{out} exists", where=f"out = {out}", hint="confirm to overwrite it")
        check_replaceable(out)  # again: the folder may have changed while the merge ran
        old = out.parent / f".{out.name}{OLD_MARK}{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)  # put the old one back: the target is never left missing
        raise
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


# The backend's requests --------------------------------------------------------------------------------------


def merge_job(params: P.StartMerge, home: Path, store=None):
    """The ``merge.start`` job (the handler checked ``out`` and the confirmation)."""
    fault = take_fault()

    def run(ctx) -> dict[str, Any]:
        record = (lambda kind, path: store.add_artifact(ctx.session, kind, path)) if store is not None else None
        return run_merge(P.to_dict(params), home, ctx, fault=fault, record_artifact=record)

    return run


def verify_job(params: P.VerifyMerge, home: Path):
    def run(ctx) -> dict[str, Any]:
        check_params(params.dtype, "dequantized")
        return verify(str(resolve_out(params.out, home)), params.adapter, home, ctx, dtype=params.dtype,
                      prompts=list(params.prompts))

    return run


def _refusal(exc: JobError) -> P.Reply:
    reason = str(exc) + (f" ({exc.where})" if exc.where else "") + (f": {exc.hint}" if exc.hint else "")
    return P.Reply("", "refused", {"error": {"message": str(exc), "where": exc.where, "hint": exc.hint}},
                   reason=reason, code=P.BAD_MESSAGE)


def register(server) -> None:
    """Add the merge.* and hub.* requests to a :class:`backend.server.BackendServer`."""
    import asyncio

    from backend import adapters, hub

    home = server.home

    async def merge_adapters(client, params: P.MergeAdapters) -> P.Reply:
        return P.Reply("", "ok", {"adapters": await asyncio.to_thread(adapters.list_adapters, home)})

    async def merge_plan(client, params: P.MergePlan) -> P.Reply:
        try:
            result = await asyncio.to_thread(plan, params.adapter, params.out, home, params.dtype, params.into,
                                             params.max_shard_size)
        except JobError as exc:
            return _refusal(exc)
        return P.Reply("", "ok", result)

    async def merge_start(client, params: P.StartMerge) -> P.Reply:
        try:
            check_params(params.dtype, params.into, params.max_shard_size)
            out = resolve_out(params.out, home)
            await asyncio.to_thread(adapters.inspect_adapter, params.adapter)
            check_replaceable(out, params.out)
        except JobError as exc:
            return _refusal(exc)
        if out.exists() and not params.overwrite:
            return P.Reply("", "refused", {"out": str(out)}, code=P.CONFIRM,
                           reason=f"{out} exists: confirm to overwrite it (the old folder is replaced only once "
                                  "the new one is complete)")
        return server._start_job("merge.start", params, merge_job(params, home, server.store))

    async def merge_verify(client, params: P.VerifyMerge) -> P.Reply:
        try:
            if params.dtype not in P.MERGE_DTYPES:
                raise JobError(f"dtype must be one of {', '.join(P.MERGE_DTYPES)}", where="dtype")
            out = resolve_out(params.out, home)
            if not (out / "config.json").is_file():
                raise JobError(f"{out} is not a saved model folder", where=f"out = {params.out}",
                               hint="merge first, or pick the merged folder")
            await asyncio.to_thread(adapters.inspect_adapter, params.adapter)
        except JobError as exc:
            return _refusal(exc)
        return server._start_job("merge.verify", params, verify_job(params, home))

    async def hub_status(client, params: P.HubStatus) -> P.Reply:
        return P.Reply("", "ok", await asyncio.to_thread(hub.status))

    async def hub_push(client, params: P.HubPush) -> P.Reply:
        if not params.dry_run:
            if hub.offline():
                return P.Reply("", "refused", {"offline": True}, reason=hub.OFFLINE_REASON)
            if await asyncio.to_thread(hub.token_source) is None:
                return P.Reply("", "refused", {"token_source": None},
                               reason=f"no Hugging Face token: {hub.LOGIN_HINT}")
        folder = Path(params.folder).expanduser()
        if params.folder.strip() and not folder.is_absolute():  # a merged folder's name, as merge.start takes it
            folder = merged_home(home) / folder
        params = P.HubPush(**{**P.to_dict(params), "folder": str(folder)})
        try:
            await asyncio.to_thread(hub.upload_list, params.folder, params.adapter_only)
        except JobError as exc:
            return _refusal(exc)
        return server._start_job("hub.push", params, hub.push_job(params))

    server.handlers.update({
        "merge.adapters": merge_adapters,
        "merge.plan": merge_plan,
        "merge.start": merge_start,
        "merge.verify": merge_verify,
        "hub.status": hub_status,
        "hub.push": hub_push,
    })


# `qlw merge`: headless -------------------------------------------------------------------------------------------


def add_cli_arguments(parser) -> None:
    """The options of ``python -m backend merge`` (and so of ``qlw merge``)."""
    parser.add_argument("adapter", help="the adapter folder (a session's adapter/ or a checkpoint-N)")
    parser.add_argument("out", nargs="?", default="",
                        help="where to save the merged model (absolute, or relative to the data home's merged/); "
                             "not needed with --adapter-only")
    parser.add_argument("--dtype", default="bf16", choices=P.MERGE_DTYPES, help="precision of the merged weights")
    parser.add_argument("--into", default=None, choices=P.MERGE_INTO,
                        help="dequantized: the 4-bit base as trained, dequantized (default for a QLoRA adapter); "
                             "original: the base's full-precision weights")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--verify", action="store_true",
                        help="compare the saved model with the model as trained and the full-precision base + adapter")
    parser.add_argument("--prompt", action="append", default=[], help="a verification prompt (repeatable)")
    parser.add_argument("--push", default="", metavar="REPO_ID", help="upload the merged folder to this Hub repository")
    vis = parser.add_mutually_exclusive_group()
    vis.add_argument("--private", dest="private", action="store_true", default=True, help="a private repository (default)")
    vis.add_argument("--public", dest="private", action="store_false", help="a public repository")
    parser.add_argument("--adapter-only", action="store_true", help="upload only the adapter (with --push; no merge)")
    parser.add_argument("--dry-run", action="store_true", help="with --push: list what would be uploaded, send nothing")
    parser.add_argument("--yes", action="store_true", help="overwrite an existing output folder")
    parser.add_argument("--home", type=Path, default=None, help="data home (default: $QLW_HOME or the user data dir)")


def _print_plan(p: dict[str, Any]) -> None:
    a, b = p["adapter"], p["base"]
    print(f"adapter: {a['path']} ({a['kind']}{', step ' + str(a['step']) if a.get('step') else ''}; r={a['r']}, "
          f"lora_alpha={a['lora_alpha']}, target_modules={', '.join(a['target_modules'] or []) if isinstance(a['target_modules'], list) else a['target_modules']})")
    print(f"base: {b['source']} (trained in {b['precision_label']}; {b['parameters']:,} parameters)")
    m, d = p["memory"], p["disk"]
    print(f"merge: {p['into']} -> {p['dtype']} on {p['device']}: about {m['need_bytes'] / GIB:.2f} GiB of "
          f"{m['free_bytes'] / GIB:.1f} GiB free ({m['verdict']}); disk about {d['need_bytes'] / GIB:.2f} GiB of "
          f"{d['free_bytes'] / GIB:.1f} GiB free")
    print(f"out: {p['out']}")
    for w in p["warnings"]:
        print(f"warning: {w}", file=__import__("sys").stderr)


def cli(args) -> int:
    """``qlw merge ADAPTER OUT``: merge (and verify, push) here, with progress; record a session.
    0: done; 1: failed; 2: refused (bad input, existing output without --yes); 130: ctrl+c."""
    import logging
    import sys
    import warnings

    from backend import hub
    from backend.train import LocalRun, _PlainPrinter, _RichPrinter
    from sessions.store import Store

    home = (args.home or P.data_home()).expanduser().resolve()
    if logging.getLogger().getEffectiveLevel() >= logging.WARNING:
        warnings.filterwarnings("ignore")
        for name in ("bitsandbytes", "transformers", "peft", "accelerate", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.ERROR)

    def fail(exc: JobError, code: int) -> int:
        print_job_error("merge", exc)
        return code

    into = args.into
    p = None
    if args.adapter_only and not args.push:
        print("qlw merge: --adapter-only uploads the adapter: give --push REPO_ID", file=sys.stderr)
        return 2
    if not args.adapter_only:
        try:
            p = plan(args.adapter, args.out, home, args.dtype, into or "dequantized", args.max_shard_size)
            if into is None:
                into = p["into_default"]
                p = plan(args.adapter, args.out, home, args.dtype, into, args.max_shard_size)
        except JobError as exc:
            return fail(exc, 2)
        _print_plan(p)
        if p.get("out_blocked"):
            print(f"qlw merge: not replacing {p['out']}: {p['out_blocked']}; pick another output folder",
                  file=sys.stderr)
            return 2
        if p.get("out_unwritable"):
            print(f"qlw merge: cannot write {p['out']}: {p['out_unwritable']}; pick a folder you can write to",
                  file=sys.stderr)
            return 2
        if p["out_exists"] and not args.yes:
            print(f"qlw merge: {p['out']} exists: pass --yes to replace it (only once the new one is complete)",
                  file=sys.stderr)
            return 2
    if args.push and not args.dry_run and hub.offline():
        print(f"qlw merge: {hub.OFFLINE_REASON}: not uploading", file=sys.stderr)
    home.mkdir(parents=True, exist_ok=True)
    store = Store(home / "sessions.db")
    info = store.create_session(f"qlw merge {Path(args.adapter).name}")
    printer = _RichPrinter() if sys.stdout.isatty() else _PlainPrinter()
    verified: dict[str, Any] = {}

    def on_event(kind: str, payload: dict[str, Any]) -> None:
        if kind == "merge.saved":
            printer.line(f"saved {payload['out']}: {len(payload['files'])} files, {payload['size_bytes'] / MIB:,.1f} MiB "
                         f"(merge {payload['merge_s']:.1f} s, save {payload['save_s']:.1f} s)")
        elif kind == "merge.verified":
            verified.update(payload)
            for line in format_table(payload).splitlines():
                printer.line(line)
        elif kind == "hub.pushed":
            what = "would upload" if payload["dry_run"] else "uploaded"
            printer.line(f"{what} {len(payload['files'])} files ({payload.get('size_bytes', 0) / MIB:,.1f} MiB) to "
                         f"{payload['repo_id']} ({'private' if payload['private'] else 'public'}): {payload['url']}")
            for f in payload["files"]:
                printer.line(f"  {f['size_bytes']:>14,}  {f['path']}")
        else:
            printer.event(kind, payload)

    run = LocalRun(store, info.id, on_event)
    store.set_status(info.id, "running")
    params = {"adapter": args.adapter, "out": args.out, "dtype": args.dtype, "into": into or "dequantized",
              "max_shard_size": args.max_shard_size, "verify": args.verify, "overwrite": args.yes,
              "prompts": args.prompt}
    run.emit("job.started", {"job_id": run.job_id, "kind": "merge.start", "params": params})
    status, code, error, result = "done", 0, None, {}
    t0 = time.monotonic()
    try:
        with printer:
            if not args.adapter_only:
                result = run_merge(params, home, run, fault=take_fault(),
                                   record_artifact=lambda kind, path: store.add_artifact(info.id, kind, path))
            if args.push and (args.dry_run or not hub.offline()):
                folder = args.adapter if args.adapter_only else result["out"]
                result["push"] = hub.push(folder, args.push, run, private=args.private, adapter_only=args.adapter_only,
                         dry_run=args.dry_run)
    except JobCancelled:
        status, code = "cancelled", 130
    except KeyboardInterrupt:
        status, code = "cancelled", 130
    except JobError as exc:
        status = "failed"
        error = {"message": str(exc), "where": exc.where, "hint": exc.hint}
        code = fail(exc, 1)
    run.finish("merge.start", status, time.monotonic() - t0, result, error)
    return code
