"""The engine: targets made ready (the held base, an adapter switched on, a merged folder, the
decode copy) and answered (:class:`ChatEngine`, the one :data:`ENGINE` of the process).
"""

from __future__ import annotations

import json
import time
import weakref
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

from backend import protocol as P
from backend.holdings import HOLDINGS
from backend.jobs import JobError
from backend.chat.prompts import Target
from backend.chat.generation import _device_of, log, stream_generate
from backend.chat.decode_copy import (
    DecodeCopy, FastPathUnavailable, GIB, _plain_model, apply_compile_override, fast_allowed,
    lora_deltas, merged_fast_allowed, reuse_static_cache,
)


HOLD_PEFT = "chat.peft"
HOLD_DECODE = "chat.decode"
HOLD_MERGED = "chat.merged"


# The engine: targets made ready, and answered -------------------------------------------------------------


def _adapter_name(path: str) -> str:
    import hashlib

    return "a" + hashlib.sha1(path.encode()).hexdigest()[:10]


class ChatEngine:
    """Makes targets ready and answers with them. Heavy objects live in HOLDINGS only (the base,
    the PeftModel, the decode copy, a merged model); the engine keeps plain facts about them and
    checks, on every use, that what it finds is still what it built on."""

    def __init__(self):
        self.fast_reason: str | None = None  # None: not decided for the held base yet
        self.fast_for: Any = None  # weakref to the base the decision is about
        self.adapter_fast: dict[str, str] = {}  # adapter path -> "" or why its fast path is off
        self.last_base_settings: P.ModelSettings | None = None
        self.warmed: set[str] = set()
        #: How a merged folder is loaded: "saved" (in the dtype its config.json names, when it
        #: fits beside the base) or "base" (with the base's settings, e.g. 4-bit again).
        self.merged_precision = "saved"

    # Holdings ------------------------------------------------------------------------------------------

    def base(self):
        return HOLDINGS.get("base")

    def tokenizer(self):
        return HOLDINGS.get("tokenizer")

    def peft(self):
        """The held PeftModel when it still wraps the held base; a stale one is dropped."""
        peft = HOLDINGS.get(HOLD_PEFT)
        base = self.base()
        if peft is not None and (base is None or _plain_model(peft) is not base):
            HOLDINGS.drop(HOLD_PEFT)
            return None
        return peft

    def attached(self) -> list[str]:
        peft = self.peft()
        return [p for p, name in getattr(peft, "qlw_paths", {}).items()] if peft is not None else []

    def decode_copy(self) -> DecodeCopy | None:
        dc = HOLDINGS.get(HOLD_DECODE)
        base = self.base()
        if dc is not None and (base is None or not dc.source_alive(base)):
            HOLDINGS.drop(HOLD_DECODE)
            return None
        return dc

    def release(self, merged: bool = True) -> list[str]:
        """Take adapters out of the base (peft's unload: no merge) and drop the decode copy (and
        the merged model): before training or loading another base. Returns what was dropped."""
        dropped = []
        peft = HOLDINGS.get(HOLD_PEFT)
        if peft is not None:
            try:
                peft.unload()
            except Exception:  # the base is dropped below when it still carries LoRA layers
                log.exception("peft unload failed")
            HOLDINGS.drop(HOLD_PEFT)
            dropped.append(HOLD_PEFT)
            base = self.base()
            if base is not None and _carries_lora(base):
                from backend import models

                models.release_base_model()
                dropped.append("base")
        if HOLDINGS.drop(HOLD_DECODE):
            dropped.append(HOLD_DECODE)
            _collect()
        if merged and HOLDINGS.drop(HOLD_MERGED):
            dropped.append(HOLD_MERGED)
        self.fast_reason, self.fast_for, self.adapter_fast = None, None, {}
        self.warmed.clear()
        return dropped

    # Making targets ready --------------------------------------------------------------------------------

    def prepare(self, target: Target, home: Path, ctx=None) -> dict[str, Any]:
        """Load what ``target`` needs (the base, the adapter, the merged folder, the decode copy);
        returns ``{"target", "load_s", "fast_path", "path", "steps"}`` (``steps``: seconds spent
        on the base, the adapter and the fast path's decode copy and compile, this time)."""
        report = (lambda stage, done=0, total=0: ctx.progress(stage, done, total)) if ctx is not None else (lambda *a: None)
        t0 = time.perf_counter()
        if target.kind == "merged":
            held = self._ensure_merged(target, home, ctx)
            t_load = time.perf_counter()
            fast = held["fast"]
            if not fast and not held.get("warmed"):
                fast = self._warm_up(target, report)
            return {"target": target.id, "load_s": round(time.perf_counter() - t0, 3),
                    "fast_path": "on" if not fast else f"off: {fast}", "path": "fast" if not fast else "plain",
                    "precision": held["precision"], "note": held["note"],
                    "steps": {"base_s": round(t_load - t0, 3), "adapter_s": 0.0,
                              "fast_s": round(time.perf_counter() - t_load, 3)}}
        if target.kind == "tuned":
            from backend import adapters

            adapters.inspect_adapter(target.path)  # a broken folder is refused before any load
        self._ensure_base(target, home, ctx)
        t_base = time.perf_counter()
        if target.kind == "tuned":
            report("attaching the adapter")
            self._ensure_adapter(target.path)
        t_adapter = time.perf_counter()
        fast = self._ensure_fast(target, report)
        if not fast:
            fast = self._warm_up(target, report)
        if ctx is not None:
            ctx.check_cancelled()
        t_end = time.perf_counter()
        return {"target": target.id, "load_s": round(t_end - t0, 3),
                "fast_path": "on" if not fast else f"off: {fast}", "path": "fast" if not fast else "plain",
                "steps": {"base_s": round(t_base - t0, 3), "adapter_s": round(t_adapter - t_base, 3),
                          "fast_s": round(t_end - t_adapter, 3)}}

    def _ensure_base(self, target: Target, home: Path, ctx) -> None:
        from backend import adapters, models

        base = self.base()
        if base is not None and models._LOADED.get("settings"):
            self.last_base_settings = P.ModelSettings(**models._LOADED["settings"])
        if base is not None:
            if target.kind == "tuned":
                try:
                    adapters.check_against_base(target.path, base)
                    return
                except JobError as exc:
                    mismatch = exc
            else:
                return
        if target.kind == "tuned":
            settings = adapters.base_settings_for(target.path, home)
            from backend.train_config import model_settings

            settings = model_settings(P.to_dict(settings), Path(home), build=True)
        elif self.last_base_settings is not None:
            settings = self.last_base_settings
        else:
            raise JobError("no base model is loaded", where="target = base",
                           hint="load one in the Model tab (or talk to an adapter: its base is loaded for it)")
        if base is not None and ctx is not None:
            ctx.emit("log", {"level": "info", "message": f"{mismatch}; loading {settings.source}, the base it was "
                                                         "trained on"})
        self.release()
        models.load_job(P.LoadModel(**P.to_dict(settings)))(ctx if ctx is not None else QuietContext())
        self.last_base_settings = settings
        if target.kind == "tuned":
            adapters.check_against_base(target.path, self.base())

    def _ensure_adapter(self, path: str) -> str:
        from backend import adapters

        peft = self.peft()
        paths = getattr(peft, "qlw_paths", {}) if peft is not None else {}
        if path in paths:
            return paths[path]
        name = _adapter_name(path)
        model = peft if peft is not None else self.base()
        peft = adapters.attach_adapter(model, path, name)
        paths = dict(paths)
        paths[path] = name
        peft.qlw_paths = paths
        HOLDINGS.put(HOLD_PEFT, peft, "adapter", ", ".join(Path(p).name for p in paths))
        return name

    def _ensure_fast(self, target: Target, report=lambda *a: None) -> str:
        """"" when ``target`` will decode on the fast path (the copy built and holding its
        weights), else why not."""
        base = self.base()
        if base is None:
            return "no base model"
        if self.fast_for is None or self.fast_for() is not base:
            self.fast_reason = fast_allowed(base)
            self.fast_for = weakref.ref(base)
            self.adapter_fast = {}
        if self.fast_reason:
            return self.fast_reason
        deltas = None
        if target.kind == "tuned":
            why = self.adapter_fast.get(target.path)
            if why:
                return why
            name = self._ensure_adapter(target.path)
            try:
                deltas = lora_deltas(self.peft(), name)
            except FastPathUnavailable as exc:
                self.adapter_fast[target.path] = str(exc)
                return str(exc)
        dc = self.decode_copy()
        if dc is None:
            report("building the decode copy")
            try:
                dc = DecodeCopy(base)
            except FastPathUnavailable as exc:
                self.fast_reason = str(exc)
                return self.fast_reason
            except Exception as exc:  # an architecture the copy cannot rebuild: stay on the plain path
                log.exception("decode copy failed")
                self.fast_reason = f"the decode copy failed ({type(exc).__name__}: {exc})"
                return self.fast_reason
            HOLDINGS.put(HOLD_DECODE, dc, "model", f"chat decode copy ({dc.nbytes() / GIB:.2f} GiB, {dc.dtype})")
        report("switching weights")
        dc.materialise(deltas, target.id if target.kind == "tuned" else "base")
        return ""

    def _warm_up(self, target: Target, report=lambda *a: None) -> str:
        """A short answer on the fast path, so that compiling the decode step happens while
        loading, not in the first answer (and a failure turns the fast path off here)."""
        if target.kind == "merged":
            held = HOLDINGS.get(HOLD_MERGED)
            if held is None or held["fast"] or held["warmed"]:
                return held["fast"] if held is not None else "not loaded"
        else:
            dc = self.decode_copy()
            if dc is None or id(dc) in self.warmed:
                return ""
        report("compiling the decode step")
        t0 = time.perf_counter()
        tokenizer = self.tokenizer_for(target)
        ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0] * 4
        result = self.answer(target, ids, P.ChatSettings(max_new_tokens=4, do_sample=False),
                             extra={"min_new_tokens": 4})
        if target.kind == "merged":
            held = HOLDINGS.get(HOLD_MERGED)
            if result["path"] != "fast":
                return held["fast"] if held is not None and held["fast"] else "the fast path failed"
            held["warmed"] = True
            log.info("merged fast path warmed up in %.1f s", time.perf_counter() - t0)
            return ""
        if result["path"] != "fast":
            return self.fast_reason or "the fast path failed"
        self.warmed.add(id(dc))
        log.info("fast path warmed up in %.1f s", time.perf_counter() - t0)
        return ""

    def _ensure_merged(self, target: Target, home: Path, ctx) -> dict[str, Any]:
        from backend import models

        held = HOLDINGS.get(HOLD_MERGED)
        if held is not None and held["path"] == target.path and held["choice"] == self.merged_precision:
            return held
        HOLDINGS.drop(HOLD_MERGED)
        folder = Path(target.path)
        if not (folder / "config.json").is_file():
            raise JobError(f"no model folder at {folder} (no config.json)", where=str(folder),
                           hint="pick a merged model folder (the Merge tab writes one)")
        base_settings = self.last_base_settings or (P.ModelSettings(**models._LOADED["settings"])
                                                    if models._LOADED.get("settings") else None)
        fields_ = P.to_dict(base_settings) if base_settings is not None else {}
        settings = P.ModelSettings(**{**fields_, "source": str(folder), "revision": ""})
        settings, note = self._merged_settings(settings, folder)
        loaded = models.load_base_model(
            settings,
            progress=(lambda st, d, t, u="", m="": ctx.progress(st, d, t, u, m)) if ctx is not None else None,
            cancelled=(lambda: ctx.cancelled) if ctx is not None else None)
        tokenizer = loaded.tokenizer or self.tokenizer()
        apply_compile_override(loaded.model)
        held = {"path": target.path, "model": loaded.model, "tokenizer": tokenizer, "choice": self.merged_precision,
                "precision": models.describe_precision(settings), "note": note,
                "fast": merged_fast_allowed(loaded.model), "cache": None, "cache_len": 0, "warmed": False,
                "load_s": loaded.info["load_seconds"], "info": {k: loaded.info[k] for k in ("source", "device", "measured")}}
        HOLDINGS.put(HOLD_MERGED, held, "model", f"merged model {folder.name} ({held['precision']})")
        return held

    def _merged_settings(self, settings: P.ModelSettings, folder: Path) -> tuple[P.ModelSettings, str]:
        """The settings to load a merged folder with, and a note on the choice. A merged folder
        holds base + adapter in 16 or 32 bits; quantising it to 4 bits again rounds the weights
        to the 4-bit grid, which undoes much of the adapter's (small) change, so it is loaded as
        saved unless ``merged_precision`` says "base" or it does not fit beside the base."""
        from dataclasses import replace

        from backend import models

        saved = saved_precision(folder)
        if self.merged_precision != "saved" or saved is None or settings.precision == saved:
            return settings, ""
        as_saved = replace(settings, precision=saved)
        est = models.estimate(as_saved)
        # The merged model comes beside the base (estimate counts the held base as free).
        room = est["free_bytes"] - est["reclaimed_bytes"]
        need = est["total_bytes"] + est["context_bytes"]
        if need > room and HOLDINGS.get(HOLD_DECODE) is not None:
            HOLDINGS.drop(HOLD_DECODE)  # the decode copy is rebuilt when the base is used again
            _collect()
            self.warmed.clear()
            est = models.estimate(as_saved)
            room = est["free_bytes"] - est["reclaimed_bytes"]
        if need <= room:
            return as_saved, f"loaded in {saved}, as saved"
        return settings, (f"loaded like the base ({models.describe_precision(settings)}): in {saved} as saved it "
                          f"needs {need / GIB:.1f} GiB and {max(room, 0) / GIB:.1f} GiB are free beside the base; "
                          "re-quantising a merged model undoes part of the adapter's change")

    # Using targets ---------------------------------------------------------------------------------------

    @contextmanager
    def model_for(self, target: Target, fast: bool = True) -> Iterator[tuple[Any, Any, Callable[[], Any], str]]:
        """(model, tokenizer, context, path) to generate with: ``context()`` is entered around
        each call (peft's ``disable_adapter`` for the base while an adapter is attached)."""
        if target.kind == "merged":
            held = HOLDINGS.get(HOLD_MERGED)
            if held is None or held["path"] != target.path:
                raise JobError(f"{target.label} is not loaded", where=target.id, hint="send chat.load first")
            yield held["model"], held["tokenizer"], nullcontext, "fast" if fast and not held["fast"] else "plain"
            return
        base, tokenizer = self.base(), self.tokenizer()
        if base is None:
            raise JobError("no base model is loaded", where=target.id, hint="send chat.load first")
        if tokenizer is None:
            raise JobError("the base model has no tokenizer", where="model.source",
                           hint="load a model folder that holds its tokenizer files")
        if fast and not self._ensure_fast(target):
            yield self.decode_copy().model, tokenizer, nullcontext, "fast"
            return
        peft = self.peft()
        if target.kind == "tuned":
            name = self._ensure_adapter(target.path)
            peft = self.peft()
            peft.set_adapter(name)
            yield peft, tokenizer, nullcontext, "plain"
        elif peft is not None:
            yield peft, tokenizer, peft.disable_adapter, "plain"
        else:
            yield base, tokenizer, nullcontext, "plain"

    def answer(self, target: Target, input_ids: list[int], settings: P.ChatSettings, *,
               cancelled: Callable[[], bool] = lambda: False, on_delta: Callable[[str], None] | None = None,
               fast: bool = True, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Generate one answer; the result of :func:`stream_generate` plus ``path``."""
        with self.model_for(target, fast) as (model, tokenizer, context, path):
            extra = dict(extra or {})
            if path == "fast" and target.kind == "merged":
                held = HOLDINGS.get(HOLD_MERGED)
                held["cache"], held["cache_len"], cache = reuse_static_cache(
                    model, held["cache"], held["cache_len"], len(input_ids) + settings.max_new_tokens)
                if cache is not None:
                    extra["past_key_values"] = cache
                else:
                    extra["cache_implementation"] = "static"
            elif path == "fast":
                cache = self.decode_copy().static_cache(len(input_ids) + settings.max_new_tokens)
                if cache is not None:
                    extra["past_key_values"] = cache
                else:
                    extra["cache_implementation"] = "static"
            result = stream_generate(model, tokenizer, input_ids, settings, cancelled=cancelled, on_delta=on_delta,
                                     context=context, extra=extra)
        result["path"] = path
        if path == "fast" and result["error"] and not result["tokens"]:
            # The compiled decode failed before any text: stay on the plain path from now on.
            if target.kind == "merged":
                held = HOLDINGS.get(HOLD_MERGED)
                held.update(fast=f"the fast path failed ({result['error'][:200]})", cache=None, cache_len=0)
            else:
                self.fast_reason = f"the fast path failed ({result['error'][:200]})"
                HOLDINGS.drop(HOLD_DECODE)
            result = self.answer(target, input_ids, settings, cancelled=cancelled, on_delta=on_delta, fast=False,
                                 extra={k: v for k, v in (extra or {}).items()
                                        if k not in ("past_key_values", "cache_implementation")})
        return result

    def logits(self, target: Target, input_ids: list[int], fast: bool = True, last_only: bool = True):
        """Logits of ``input_ids`` (the next token's, or all) as float32 on the CPU, through the
        path ``answer`` would use (no cache)."""
        import torch

        with self.model_for(target, fast) as (model, tokenizer, context, path):
            ids = torch.tensor([input_ids], dtype=torch.long, device=_device_of(model))
            with torch.no_grad(), context():
                out = model(input_ids=ids, use_cache=False).logits[0]
        out = out[-1] if last_only else out
        return out.float().cpu()

    def tokenizer_for(self, target: Target):
        if target.kind == "merged":
            held = HOLDINGS.get(HOLD_MERGED)
            if held is not None and held["path"] == target.path:
                return held["tokenizer"]
        tokenizer = self.tokenizer()
        if tokenizer is None:
            raise JobError("the base model has no tokenizer", where="model.source",
                           hint="load a model folder that holds its tokenizer files")
        return tokenizer

    def fast_path_state(self) -> str:
        base = self.base()
        if base is None or self.fast_for is None or self.fast_for() is not base:
            return "unknown"
        return "on" if not self.fast_reason else f"off: {self.fast_reason}"


def _collect() -> None:
    """Collect the dropped copy (its model and compiled call form a cycle) and give its CUDA
    memory back to the driver."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


#: config.json's dtype names -> ModelSettings.precision
_SAVED_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def saved_precision(folder: Path) -> str | None:
    """The precision a model folder was saved in ("bf16", "fp16", "fp32"), from its config.json;
    None for a quantised folder or one that does not say."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("quantization_config"):
        return None
    dtype = config.get("dtype") or config.get("torch_dtype")
    return _SAVED_DTYPES.get(str(dtype).replace("torch.", "")) if dtype else None


def _carries_lora(model) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


class QuietContext:
    """A job context that reports nowhere (the headless tools and the benchmark)."""

    job_id = "local"
    session = ""
    cancelled = False

    def progress(self, *args, **kwargs) -> None:
        pass

    def emit(self, kind: str, payload: dict[str, Any]) -> None:
        pass

    def check_cancelled(self) -> None:
        pass


#: The backend's one engine.
ENGINE = ChatEngine()


def make_random_adapter(model, folder: str | Path, r: int = 16, lora_alpha: int = 16, seed: int = 0,
                        target_modules: Any = "all-linear") -> Path:
    """Save a LoRA adapter with random A *and* B (peft's ``init_lora_weights=False``, so it
    changes the outputs) for ``model`` into ``folder``, and leave ``model`` as it was (the LoRA
    layers are taken out again). For benchmarks and tests: a trained adapter behaves the same
    for speed and exactness."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=target_modules,
                        init_lora_weights=False, task_type="CAUSAL_LM")
    peft = get_peft_model(model, config)
    folder = Path(folder)
    peft.save_pretrained(str(folder))
    peft.unload()
    model.eval()
    return folder

