"""Loading (:func:`load_base_model`): ``from_pretrained`` with progress by shard and cancellation,
bitsandbytes' AVX512-BF16 CPU layout turned off (:func:`disable_cpu_4bit_layout`), the real
footprint measured.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from backend import protocol as P
from backend.jobs import JobCancelled, JobError
from backend.models.sources import (
    DTYPE_NAMES, GIB, INT8_DTYPE, Source, describe_precision, resolve_source, shard_plan,
    validate_settings,
)
from backend.models.costs import estimate


# Loading ------------------------------------------------------------------------------------------


class _LoadCancelled(Exception):
    """Raised from inside from_pretrained's weight loop to stop a cancelled load."""


class _WeightProgress:
    """Wraps from_pretrained's "Loading weights" loop: reports progress by shard (fractional:
    the share of each shard's tensors loaded) and stops the loop when the job is cancelled."""

    def __init__(self, items, plan: dict[str, Any], report: Callable, is_cancelled: Callable[[], bool]):
        self._items = items
        self._report = report
        self._is_cancelled = is_cancelled
        self._keys = plan.get("keys") or {}
        n_shards = max(1, len(plan.get("files") or []))
        self._per_shard = [0] * n_shards
        for index in self._keys.values():
            self._per_shard[index] += 1
        self._done = [0] * n_shards
        self.n_shards = n_shards
        try:
            self.total = len(items)
        except TypeError:
            self.total = 0

    def __iter__(self):
        count = 0
        self._emit(0)
        for item in self._items:
            if self._is_cancelled():
                raise _LoadCancelled()
            yield item
            count += 1
            self._account(item)
            self._emit(count)

    def _account(self, item) -> None:
        mapping = item[1] if isinstance(item, tuple) and len(item) == 2 else None
        sources: set[str] = set()
        for keys in (getattr(mapping, "layer_targets", None) or {}).values():
            sources |= set(keys)
        if not sources and isinstance(item, tuple):
            sources = {item[0]}
        for key in sources:
            index = self._keys.get(key)
            if index is not None:
                self._done[index] += 1

    def _shards_done(self, count: int) -> float:
        if not self._keys:  # unknown layout: the share of tensors, in shards
            return round(self.n_shards * count / self.total, 2) if self.total else 0.0
        return round(sum(min(1.0, d / t) for d, t in zip(self._done, self._per_shard) if t), 2)

    def _emit(self, count: int) -> None:
        done = self._shards_done(count)
        if count == self.total:
            done = float(self.n_shards)
        self._report("loading weights", done, self.n_shards, "shards",
                     f"{count:,} of {self.total:,} tensors" if self.total else "")

    # tqdm's interface, as far as transformers uses it
    def __len__(self) -> int:
        return self.total

    def update(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


@contextlib.contextmanager
def _watch_weight_loop(plan: dict[str, Any], report: Callable, is_cancelled: Callable[[], bool]) -> Iterator[None]:
    """Route transformers' "Loading weights" progress bar through :class:`_WeightProgress`, with
    every other progress bar off (they would only clutter the backend's log)."""
    from transformers.utils import logging as hf_logging

    def hook(factory, args, kwargs):
        if kwargs.get("desc") == "Loading weights" and args:
            return _WeightProgress(args[0], plan, report, is_cancelled)
        return factory(*args, **kwargs)

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    restore: Callable[[], None]
    if hasattr(hf_logging, "set_tqdm_hook"):
        previous = hf_logging.set_tqdm_hook(hook)
        restore = lambda: hf_logging.set_tqdm_hook(previous)  # noqa: E731
    else:  # transformers < 5.2x: wrap the name core_model_loading calls
        import transformers.core_model_loading as cml

        original = getattr(cml, "tqdm", None)

        def patched(*args, **kwargs):
            return hook(original, args, kwargs)

        if original is not None:
            cml.tqdm = patched
        restore = lambda: setattr(cml, "tqdm", original) if original is not None else None  # noqa: E731
    try:
        yield
    finally:
        restore()
        if was_enabled:
            hf_logging.enable_progress_bar()


def disable_cpu_4bit_layout(model) -> int:
    """Turn off bitsandbytes' AVX512-BF16 CPU layout on every ``Linear4bit``; returns how many.

    On a CPU with AVX512-BF16, the first no-grad forward in eval mode repacks each 4-bit weight in
    place into a CPU layout whose ``gemv_4bit`` op has no backward: every LoRA gradient after that
    is silently wrong (only a ``gemv_4bit`` autograd warning tells). Called right after loading,
    before anything runs the model.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


#: Set by backend/train/worker.py in a rank of an FSDP run (issue 19), for that process only: the
#: weights load as peft's FSDP-QLoRA guide loads them: no device_map (FSDP puts each shard on its
#: rank's GPU; with cpu_ram_efficient_loading only rank 0 reads the weights), and 4-bit weights
#: stored in the compute dtype (``bnb_4bit_quant_storage``, the model's dtype with it), which is
#: what lets FSDP shard them (it shards float tensors only).
FSDP_RANK = False


def _from_pretrained_kwargs(s: P.ModelSettings, src: Source, device: str) -> dict[str, Any]:
    import torch

    kwargs: dict[str, Any] = dict(
        revision=src.revision,
        trust_remote_code=s.trust_remote_code,
        attn_implementation=s.attn_implementation,
        device_map={"": device},
    )
    if src.offline:
        kwargs["local_files_only"] = True
    if s.precision == "4bit":
        from transformers import BitsAndBytesConfig

        compute = getattr(torch, DTYPE_NAMES[s.compute_dtype])
        storage = {"bnb_4bit_quant_storage": compute} if FSDP_RANK else {}
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=s.quant_type, bnb_4bit_use_double_quant=s.double_quant,
            bnb_4bit_compute_dtype=compute, **storage)
        kwargs["dtype"] = compute  # the modules bitsandbytes leaves alone compute in the same dtype
    elif s.precision == "8bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["dtype"] = getattr(torch, DTYPE_NAMES[INT8_DTYPE])
    else:
        kwargs["dtype"] = getattr(torch, DTYPE_NAMES[s.precision])
    if FSDP_RANK:
        kwargs.pop("device_map")
    return kwargs


def measure_footprint(model) -> dict[str, Any]:
    """What a loaded model takes: ``get_memory_footprint()`` (parameters and buffers), the
    bitsandbytes quantization state it does not count, and their sum."""
    footprint = int(model.get_memory_footprint())
    counted = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    extra: dict[int, int] = {}

    def add(t) -> None:
        if t is not None and hasattr(t, "data_ptr") and t.numel() and t.data_ptr() not in counted:
            extra[t.data_ptr()] = t.numel() * t.element_size()

    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:  # 4-bit
            add(qs.absmax)
            add(qs.code)
            add(getattr(qs, "offset", None))
            if getattr(qs, "state2", None) is not None:
                add(qs.state2.absmax)
                add(qs.state2.code)
        add(getattr(p, "SCB", None))  # 8-bit row scales
        cb = getattr(p, "CB", None)
        if cb is not None and cb.data_ptr() != p.data_ptr():
            add(cb)
    quant = sum(extra.values())
    return {"footprint_bytes": footprint, "quant_state_bytes": quant, "tensor_bytes": footprint + quant}


def _ratio(measured: float | None, estimated: float) -> float | None:
    return round(measured / estimated, 4) if measured and estimated else None


@dataclass
class LoadedModel:
    """What :func:`load_base_model` returns: the model, its tokenizer (None when the source has
    none), and plain facts (settings, estimate, measured footprint, timings)."""

    model: Any
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)


def load_base_model(
    s: P.ModelSettings,
    progress: Callable[..., None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> LoadedModel:
    """Load the base model of ``s`` (and its tokenizer) for fine-tuning.

    ``progress(stage, done, total, unit, message)`` is called from this thread: ``resolving``,
    ``estimating``, ``downloading`` (a Hub model, online), ``loading weights`` (by shard),
    ``tokenizer``, ``measuring``.
    ``cancelled()`` is polled between tensors; a cancelled load raises :class:`JobCancelled`
    and leaves nothing behind. Errors are :class:`JobError` for people.
    """
    report = progress or (lambda *a, **k: None)
    is_cancelled = cancelled or (lambda: False)

    def check() -> None:
        if is_cancelled():
            raise JobCancelled()

    t0 = time.perf_counter()
    validate_settings(s)
    report("resolving", 0, 0, "", s.source)
    src = resolve_source(s)  # before any heavy import: an offline Hub id fails here, at once
    check()
    report("estimating", 0, 0, "", "config.json")
    est = estimate(s, src)
    device = est["device"]
    if device == "cpu" and est["verdict"] == "will not fit":
        # On the CPU an overfull load ends with the kernel killing the backend: refuse instead.
        raise JobError(
            f"{src.describe()} needs {est['total_bytes'] / GIB:.1f} GiB in {describe_precision(s)}, "
            f"and the host has {est['free_bytes'] / GIB:.1f} GiB free", where=f"device = {s.device}",
            hint="choose 4-bit, a GPU, or free memory first")
    check()
    import psutil
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if src.kind == "hub" and src.folder is None:
        src = _download(src, s.trust_remote_code, report)
        check()
    kwargs = _from_pretrained_kwargs(s, src, device)
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)
    rss_before = psutil.Process().memory_info().rss
    plan = shard_plan(src.folder)
    t_load = time.perf_counter()
    try:
        with _watch_weight_loop(plan, report, is_cancelled):
            model = AutoModelForCausalLM.from_pretrained(src.ref, **kwargs)
    except _LoadCancelled:
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
        raise JobCancelled() from None
    except torch.OutOfMemoryError as exc:
        gc.collect()
        torch.cuda.empty_cache()
        raise JobError(f"out of memory on {device} while loading ({exc})".split("Tried")[0].strip(),
                       where=f"device = {device}, precision = {s.precision}",
                       hint="choose 4-bit, free VRAM (ctrl+f), or another GPU") from None
    except (OSError, ValueError, ImportError, RuntimeError) as exc:
        raise JobError(f"transformers could not load {src.describe()}: {exc}",
                       where=f"source = {s.source}", hint=_load_hint(exc)) from None
    load_s = time.perf_counter() - t_load
    # Right after loading, before anything runs the model (see the function's docstring).
    layout_off = disable_cpu_4bit_layout(model)
    model.eval()
    check()
    report("tokenizer", 0, 1, "", "")
    tokenizer, tokenizer_error = None, ""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            src.ref, revision=src.revision, trust_remote_code=s.trust_remote_code,
            **({"local_files_only": True} if src.offline else {}))
    except Exception as exc:  # a model without a tokenizer still loads; the inspector says so
        tokenizer_error = f"{type(exc).__name__}: {exc}"
    report("tokenizer", 1, 1, "", "")
    report("measuring", 0, 1, "", "")
    measured = measure_footprint(model)
    if on_cuda:
        torch.cuda.synchronize(device)
        measured["torch_allocated_bytes"] = int(torch.cuda.memory_allocated(device) - allocated_before)
        measured["torch_peak_bytes"] = int(torch.cuda.max_memory_allocated(device) - allocated_before)
    else:
        measured["torch_allocated_bytes"] = None
        measured["torch_peak_bytes"] = None
    measured["rss_delta_bytes"] = int(psutil.Process().memory_info().rss - rss_before)
    comparison = {
        "footprint_vs_estimate": _ratio(measured["footprint_bytes"], est["footprint_bytes"]),
        "tensors_vs_estimate": _ratio(measured["tensor_bytes"], est["total_bytes"]),
        "allocated_vs_estimate": _ratio(measured["torch_allocated_bytes"], est["total_bytes"]),
    }
    report("measuring", 1, 1, "", "")
    info = {
        "settings": P.to_dict(s),
        "source": src.describe(),
        "source_path": str(Path(model.config._name_or_path)) if getattr(model.config, "_name_or_path", "") else src.ref,
        "device": device,
        "estimate": est,
        "measured": measured,
        "comparison": comparison,
        "avx512bf16_layout_disabled": layout_off,
        "tokenizer_error": tokenizer_error,
        "load_seconds": round(load_s, 3),
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    return LoadedModel(model, tokenizer, info)


#: What a load needs from a Hub repository: config, weights, tokenizer files (and, with
#: trust_remote_code, the model's own Python files). Not the other formats (GGUF, ONNX, ...).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]


def _download(src: Source, trust_remote_code: bool, report: Callable) -> Source:
    """Fetch what a load needs from the Hub into the cache (weights as safetensors, or as
    ``pytorch_model*.bin`` only where the repository has no safetensors) and return the source
    with its cached snapshot folder, so that the load reports progress by shard."""
    from huggingface_hub import list_repo_files, snapshot_download

    report("downloading", 0, 0, "", f"{src.describe()} from the Hub (files already cached are skipped)")
    where = f"source = {src.name}" + (f", revision = {src.revision}" if src.revision else "")
    try:
        files = list_repo_files(src.name, revision=src.revision)
        patterns = list(HUB_PATTERNS)
        if not any(f.endswith(".safetensors") for f in files):
            patterns.append("pytorch_model*.bin")
        if trust_remote_code:
            patterns.append("*.py")
        folder = snapshot_download(src.name, revision=src.revision, allow_patterns=patterns)
    except Exception as exc:
        raise JobError(f"could not download {src.describe()}: {type(exc).__name__}: {exc}", where=where,
                       hint="check the network and the id; for a gated or private model run `hf auth login`") from None
    return Source("hub", src.name, Path(folder), src.revision, src.offline)


def _load_hint(exc: BaseException) -> str:
    text = str(exc)
    if "trust_remote_code" in text:
        return "this model runs its own code: turn on trust_remote_code only if you trust the source"
    if "offline" in text.lower() or "local_files_only" in text:
        return "the Hub is offline: download the model first, or give a local folder"
    if "safetensors" in text or "pytorch_model" in text or "no file named" in text.lower():
        return "the folder lacks the weights (*.safetensors): copy or download them completely"
    return "see the detail in the backend log"

