"""The backend's requests: merge.* and hub.* jobs and replies; :func:`register` adds them to the
server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backend import protocol as P
from backend.jobs import JobError
from backend.merge.paths import check_replaceable, merged_home, resolve_out, take_fault
from backend.merge.planning import check_params, plan
from backend.merge.merging import run_merge
from backend.merge.verification import verify


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

