"""The backend's side: the ``model.load`` job and the model.* handlers.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Callable

from backend import protocol as P
from backend.holdings import HOLDINGS
from backend.jobs import JobContext, JobError
from backend.models.sources import describe_precision, validate_settings
from backend.models.devices import _LOADED, options, release_base_model
from backend.models.costs import estimate
from backend.models.loading import load_base_model
from backend.models.inspector import inspect_model


# The backend's side: job and handlers --------------------------------------------------------------


def load_job(params: P.LoadModel) -> Callable[[JobContext], dict[str, Any]]:
    """The ``model.load`` job: drop the held base model, load the new one with progress by
    shard, hold it (``HOLDINGS["base"]``, ``HOLDINGS["tokenizer"]``) and emit ``model.loaded``."""
    settings = P.ModelSettings(**P.to_dict(params))
    validate_settings(settings)  # a bad choice is refused in the reply, before any job starts

    def run(ctx: JobContext) -> dict[str, Any]:
        if release_base_model():
            ctx.emit("log", {"level": "info", "message": "released the previously loaded base model"})
        loaded = load_base_model(
            settings,
            progress=lambda stage, done, total, unit="", message="": ctx.progress(stage, done, total, unit, message),
            cancelled=lambda: ctx.cancelled,
        )
        ctx.check_cancelled()
        note = f"{loaded.info['source']} · {describe_precision(settings)} · {loaded.info['device']}"
        HOLDINGS.put("base", loaded.model, "model", note)
        if loaded.tokenizer is not None:
            HOLDINGS.put("tokenizer", loaded.tokenizer, "tokenizer", loaded.info["source"])
        _LOADED.clear()
        _LOADED.update(device=loaded.info["device"], settings=P.to_dict(settings),
                       **{k: loaded.info[k] for k in ("source", "estimate", "measured", "comparison", "load_seconds")})
        inspection = inspect_model(loaded.model, loaded.tokenizer)
        payload = {**{k: loaded.info[k] for k in ("settings", "source", "source_path", "device", "estimate",
                                                   "measured", "comparison", "load_seconds")},
                   "inspect": inspection, "tokenizer_error": loaded.info["tokenizer_error"]}
        ctx.emit("model.loaded", payload)
        return {k: loaded.info[k] for k in ("source", "device", "estimate", "measured", "comparison",
                                            "avx512bf16_layout_disabled", "load_seconds")}

    return run


def _error_reply(exc: BaseException) -> P.Reply:
    if isinstance(exc, JobError):
        reason = str(exc) + (f" ({exc.where})" if exc.where else "") + (f". {exc.hint}" if exc.hint else "")
        return P.Reply("", "error", {"error": {"message": str(exc), "where": exc.where, "hint": exc.hint}},
                       reason=reason, code=P.FAILED)
    return P.Reply("", "error", {"error": {"message": f"{type(exc).__name__}: {exc}", "where": "", "hint": ""}},
                   reason=f"{type(exc).__name__}: {exc}", code=P.FAILED)


async def handle_options(home: Path, params: P.ModelOptions) -> P.Reply:
    """``model.options``: read off the event loop (NVML and psutil calls)."""
    return P.Reply("", "ok", await asyncio.to_thread(options, home))


async def handle_estimate(params: P.EstimateModel) -> P.Reply:
    """``model.estimate``: config.json read and the meta model built off the event loop; a bad
    source or config is an ``error`` reply whose result carries message, where and hint."""
    settings = P.ModelSettings(**P.to_dict(params))
    try:
        result = await asyncio.to_thread(estimate, settings)
    except Exception as exc:
        return _error_reply(exc)
    return P.Reply("", "ok", result)


async def handle_inspect(params: P.InspectModel) -> P.Reply:
    """``model.inspect``: the held base model, or ``{"loaded": false}``."""
    model = HOLDINGS.get("base")
    if model is None:
        return P.Reply("", "ok", {"loaded": False})
    tokenizer = HOLDINGS.get("tokenizer")
    try:
        result = await asyncio.to_thread(inspect_model, model, tokenizer)
    except Exception as exc:
        return _error_reply(exc)
    result["load"] = {k: _LOADED.get(k) for k in ("settings", "source", "device", "estimate", "measured",
                                                   "comparison", "load_seconds")}
    return P.Reply("", "ok", result)
