"""Step 2, :func:`run_merge`: load, merge and save into a temporary folder beside the target,
then swap it into place only when complete.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from backend.jobs import JobError
from backend.merge.paths import (
    DTYPE_BYTES, GIB, OLD_MARK, TMP_MARK, _dtype, _fault_at, check_replaceable, clean_stale,
    list_files,
)
from backend.merge.planning import _base_info, plan
from backend.merge.loading import _empty_cuda, load_for_merge, merge_adapter
from backend.merge.saving import _SaveWatcher, _losses_from_store, _read_run_config, model_card, scrub_paths
from backend.merge.verification import verify


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

