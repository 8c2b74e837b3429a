"""``qlw merge``: plan, merge and verify without the front end.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from backend import protocol as P
from backend.jobs import JobCancelled, JobError, print_job_error
from backend.merge.paths import GIB, MIB, take_fault
from backend.merge.planning import plan
from backend.merge.merging import run_merge
from backend.merge.verification import format_table


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
