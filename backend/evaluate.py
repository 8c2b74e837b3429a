"""Evaluation: base, tuned and merged side by side on the same inputs.

For each target: size on disk, load time, generation time (mean and standard deviation over N runs
of a prompt set, greedy, through the chat engine's own path), tokens/s, peak memory, and
perplexity (exp of the mean token loss) on the validation split of the adapter's run or on a text
file. Rows are ``eval.row`` events of the session; ``markdown_table``/``csv_text`` export them and
``qlw eval`` prints the table headless.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from backend import protocol as P
from backend.jobs import JobError, print_job_error

#: Used when no prompts are given: short, varied instructions.
DEFAULT_PROMPTS = [
    "Explain what a LoRA adapter is in two sentences.",
    "Write a haiku about the sea.",
    "List three uses of copper.",
    "What is the capital of France, and why is it famous?",
    "Give one tip for writing clear error messages.",
]
#: Tokens per window when a text file is scored.
TEXT_WINDOW = 512
#: At most this many validation rows are scored (the first ones of the split).
MAX_PPL_ROWS = 256


# Perplexity ------------------------------------------------------------------------------------------


def token_nll(logits, ids: list[int], mask: list[int] | None = None) -> tuple[float, int]:
    """(summed negative log-likelihood, token count) of ``ids`` under ``logits`` ([T, V]):
    token i is predicted from position i-1; only tokens whose ``mask`` is 1 count."""
    import torch

    labels = torch.tensor(ids[1:], dtype=torch.long)
    keep = torch.tensor((mask or [1] * len(ids))[1:], dtype=torch.bool)
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    nll = -logp.gather(1, labels[:, None])[:, 0]
    return float(nll[keep].sum()), int(keep.sum())


def text_sequences(tokenizer, text: str, window: int = TEXT_WINDOW) -> list[tuple[list[int], list[int]]]:
    """A text as consecutive windows of ``window`` tokens (all of them scored)."""
    # The whole text at once (it is cut into windows below): verbose=False keeps the tokenizer
    # from warning that it is longer than the model's context.
    ids = list(tokenizer(text=text, verbose=False)["input_ids"])
    return [(ids[i:i + window], [1] * len(ids[i:i + window])) for i in range(0, len(ids), window)
            if len(ids[i:i + window]) > 1]


def validation_sequences(adapter_path: str, home: Path, tokenizer, limit: int = MAX_PPL_ROWS) -> tuple[list, str]:
    """The validation rows of the adapter's run, tokenized as training did (the loss mask
    included): ``(sequences, note)``."""
    from backend import adapters, data as D, train_config as TC
    from backend.train import data_settings

    run = adapters._run_folder(Path(adapter_path))
    if run is None:
        raise JobError(f"{adapter_path} belongs to no run with a config.toml: no validation split to score",
                       where=adapter_path, hint="give a text file to score (--text)")
    config, errors = TC.read_toml(run / "config.toml")
    if "file" in errors or not isinstance(config.get("data"), dict):
        raise JobError(f"cannot read the run config {run / 'config.toml'}", where=str(run / "config.toml"))
    settings, _notes = data_settings(config["data"], Path(home))
    prepared = D.load_prepared(settings, Path(home))
    if prepared.validation is None or len(prepared.validation) == 0:
        raise JobError(f"the run {run.name} has no validation split", where="data.split_mode",
                       hint="give a text file to score (--text)")
    loss = prepared.report["loss"]
    max_length = int(prepared.settings.get("max_length") or 1024)
    rows = prepared.validation.select(range(min(limit, len(prepared.validation))))
    seqs = []
    for row in rows:
        example = {k: v for k, v in row.items() if v is not None}
        ids, mask = D.tokenize_like_trl(example, tokenizer, loss)
        ids, mask = ids[:max_length], mask[:max_length]
        if sum(mask[1:]):
            seqs.append((ids, mask))
    return seqs, f"{len(seqs)} validation rows of run {run.name} ({loss} loss)"


def perplexity(logits_of: Callable[[list[int]], Any], sequences: list[tuple[list[int], list[int]]],
               cancelled: Callable[[], bool] = lambda: False) -> tuple[float | None, int]:
    """exp(mean token loss) over ``sequences`` ((ids, mask) pairs), and the token count."""
    total, count = 0.0, 0
    for ids, mask in sequences:
        if cancelled():
            break
        nll, n = token_nll(logits_of(ids), ids, mask)
        total += nll
        count += n
    return (math.exp(total / count) if count else None), count


GIB = 1024**3

# Sizes and memory ------------------------------------------------------------------------------------------


def weights_bytes(folder: str | Path) -> int | None:
    """Bytes of a model or adapter folder's weight files (safetensors, bin)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    files = [f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file()]
    return sum(f.stat().st_size for f in files) if files else None


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int | None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # pragma: no cover
        return None


# The evaluation -----------------------------------------------------------------------------------------------


def evaluate(targets: list[str], home: Path, *, prompts: list[str] | None = None, runs: int = 3,
             max_new_tokens: int = 64, text_path: str = "", ctx=None, engine=None,
             on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Evaluate each target on the same prompts and text; returns the rows (``eval.row``)."""
    from backend import models
    from backend.chat.engine import ENGINE, HOLD_MERGED, QuietContext
    from backend.chat.generation import _device_of
    from backend.chat.prompts import build_prompt, parse_target, resolve_template
    from backend.holdings import HOLDINGS

    engine = engine or ENGINE
    ctx = ctx or QuietContext()
    parsed = [parse_target(t) for t in targets]
    prompts = [p for p in (prompts or DEFAULT_PROMPTS) if p.strip()]
    if runs < 1:
        raise JobError(f"runs = {runs}: at least one run", where="runs")
    settings = P.ChatSettings(max_new_tokens=max_new_tokens, do_sample=False)
    text = None
    if text_path:
        try:
            text = Path(text_path).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise JobError(f"cannot read the text to score: {exc}", where=text_path) from None
    adapter = next((t.path for t in parsed if t.kind == "tuned"), "")
    rows = []
    sequences_cache: dict[int, tuple[list, str]] = {}
    for i, target in enumerate(parsed):
        ctx.check_cancelled()
        ctx.progress(f"evaluating {target.label}", i, len(parsed))
        if target.kind == "merged" and all(t.kind == "merged" for t in parsed[i:]) and engine.base() is not None:
            # Nothing after this needs the base: let it and the decode copy go, so that the merged
            # model has the memory, and its peak is its own.
            engine.release(merged=False)
            models.release_base_model()
        ready = engine.prepare(target, home, ctx)
        device = str(_device_of(engine.base() if target.kind != "merged" else
                                HOLDINGS.get(HOLD_MERGED)["model"]))
        note = []
        steps = ready.get("steps") or {}
        if target.kind == "base":
            load_s = models._LOADED.get("load_seconds")
            size = weights_bytes(models._LOADED.get("settings", {}).get("source", ""))
        elif target.kind == "tuned":
            load_s = steps.get("adapter_s", ready["load_s"])
            size = weights_bytes(target.path)
            note.append("size: the adapter (beside the base); load: attaching it to the loaded base")
        else:
            held = HOLDINGS.get(HOLD_MERGED)
            load_s = held["load_s"]
            size = weights_bytes(target.path)
            note.append(held["note"] or f"loaded in {held['precision']}")
        if ready.get("path") == "fast" and target.kind == "merged":
            note.append(f"fast path: static cache, decode step compiled in {steps.get('fast_s', 0):.1f} s")
        elif ready.get("path") == "fast":
            if steps.get("fast_s", 0) >= 0.5:
                note.append(f"fast path: decode copy and compile ready in {steps['fast_s']:.1f} s (once per base)")
            copy_bytes = engine.decode_copy().nbytes() if engine.decode_copy() is not None else 0  # no reference kept
            if copy_bytes:
                note.append(f"peak memory includes the {copy_bytes / GIB:.2f} GiB decode copy")
        tokenizer = engine.tokenizer_for(target)
        template, system = resolve_template(P.ChatSettings(), tokenizer, adapter)
        prompt_ids = [build_prompt(tokenizer, [{"role": "user", "content": p}], template, system)[0] for p in prompts]
        _reset_peak(device)
        engine.answer(target, prompt_ids[0], settings, cancelled=lambda: ctx.cancelled)  # warm-up
        times, tokens, path = [], 0, ready.get("path", "")
        for r in range(runs):
            t = 0.0
            for ids in prompt_ids:
                ctx.check_cancelled()
                result = engine.answer(target, ids, settings, cancelled=lambda: ctx.cancelled)
                if result["error"]:
                    raise JobError(f"generation failed on {target.label}: {result['error']}", where=target.id)
                t += result["elapsed_s"]
                tokens += result["tokens"]
                path = result["path"]
            times.append(t)
            ctx.progress(f"evaluating {target.label}", i + (r + 1) / (runs + 1), len(parsed))
        ppl, ppl_tokens = None, 0
        try:
            key = id(tokenizer)
            if key not in sequences_cache:
                if text is not None:
                    sequences_cache[key] = (text_sequences(tokenizer, text), f"text {Path(text_path).name}")
                elif adapter:
                    sequences_cache[key] = validation_sequences(adapter, home, tokenizer)
                else:
                    sequences_cache[key] = ([], "no text to score: give a text file or evaluate an adapter")
            seqs, ppl_note = sequences_cache[key]
            ppl, ppl_tokens = perplexity(lambda ids: engine.logits(target, ids, last_only=False), seqs,
                                         lambda: ctx.cancelled)
            note.append(f"perplexity on {ppl_note}")
        except JobError as exc:
            note.append(f"no perplexity: {exc}")
        ctx.check_cancelled()
        row = {"target": target.id, "label": target.label, "size_bytes": size,
               "load_s": round(load_s, 3) if load_s is not None else None,
               "gen_mean_s": round(statistics.mean(times), 4),
               "gen_std_s": round(statistics.stdev(times), 4) if len(times) > 1 else 0.0,
               "tokens_per_s": round(tokens / sum(times), 2) if sum(times) else None,
               "peak_bytes": _peak(device), "perplexity": round(ppl, 4) if ppl is not None else None,
               "ppl_tokens": ppl_tokens, "runs": runs, "device": device, "path": path, "note": "; ".join(note)}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    ctx.progress("evaluating", len(parsed), len(parsed))
    return rows


def eval_job(params: P.EvalRun, home: Path, room=None):
    """The ``eval.run`` job: one ``eval.row`` event per target."""
    from backend.chat.prompts import parse_target

    if not params.targets:
        raise JobError("no targets to evaluate", where="targets", hint="name base, tuned:<adapter>, merged:<folder>")
    for t in params.targets:
        parse_target(t)
    if params.runs < 1 or params.max_new_tokens < 1:
        raise JobError("runs and max_new_tokens must be at least 1", where="runs")

    def run(ctx) -> dict[str, Any]:
        if room is not None:
            room.last_eval = []

        def on_row(row):
            ctx.emit("eval.row", row)
            if room is not None:
                room.last_eval.append(row)

        rows = evaluate(params.targets, home, prompts=params.prompts, runs=params.runs,
                        max_new_tokens=params.max_new_tokens, text_path=params.text_path, ctx=ctx, on_row=on_row)
        return {"rows": rows, "markdown": markdown_table(rows)}

    return run


# The server's side ----------------------------------------------------------------------------------------


def register(server) -> None:
    """Add the eval.* requests to ``server``. They go through the chat room (``server.chat``,
    added first): its refusal while a job holds the GPU, its export paths, its session events,
    and its ``last_eval`` rows, which ``eval.export`` writes."""
    import asyncio

    room = server.chat

    async def eval_run(client, params: P.EvalRun) -> P.Reply:
        try:
            fn = eval_job(params, server.home, room)
        except JobError as exc:
            return room._bad(exc)
        return room._start("eval.run", params, fn)

    async def eval_export(client, params: P.EvalExport) -> P.Reply:
        if params.format not in P.EVAL_EXPORT_FORMATS:
            return P.Reply("", "error", reason=f"format must be one of {', '.join(P.EVAL_EXPORT_FORMATS)}",
                           code=P.BAD_MESSAGE)
        rows = room.last_eval or [p for k, p in await asyncio.to_thread(room._events, ("eval.row",))]
        if not rows:
            return P.Reply("", "refused", reason="no evaluation to export yet: run one first")
        path = room._export_target(params.path, params.overwrite)
        if isinstance(path, P.Reply):
            return path
        text = markdown_table(rows) if params.format == "markdown" else csv_text(rows)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(path.write_text, text, "utf-8")
        except OSError as exc:
            return P.Reply("", "error", {"path": str(path)}, reason=f"cannot write {path}: {exc}", code=P.FAILED)
        return P.Reply("", "ok", {"path": str(path), "rows": len(rows)})

    server.handlers.update({"eval.run": eval_run, "eval.export": eval_export})


# Tables ------------------------------------------------------------------------------------------------------

COLUMNS = [("label", "target"), ("size_bytes", "size"), ("load_s", "load s"), ("gen_mean_s", "gen s (mean)"),
           ("gen_std_s", "gen s (std)"), ("tokens_per_s", "tokens/s"), ("peak_bytes", "peak memory"),
           ("perplexity", "perplexity"), ("ppl_tokens", "ppl tokens"), ("path", "path")]


def _fmt(key: str, value: Any) -> str:
    if value is None or value == "":
        return "—"
    if key in ("size_bytes", "peak_bytes"):
        return f"{value / 1024**3:.2f} GiB" if value >= 1024**3 else f"{value / 1024**2:.1f} MiB"
    if key in ("load_s", "gen_mean_s", "gen_std_s"):
        return f"{value:.3f}"
    if key == "tokens_per_s":
        return f"{value:.1f}"
    if key == "perplexity":
        return f"{value:.3f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(title for _k, title in COLUMNS) + " |"
    rule = "|" + "|".join("---" if k in ("label", "path") else "---:" for k, _t in COLUMNS) + "|"
    lines = [head, rule]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(k, row.get(k)).replace("|", "\\|") for k, _t in COLUMNS) + " |")
    devices = sorted({str(r.get("device")) for r in rows})
    runs = sorted({str(r.get("runs")) for r in rows})
    lines.append("")
    lines.append(f"Device {', '.join(devices)}; generation time per run of the prompt set (runs: {', '.join(runs)}), "
                 "greedy; peak memory: torch's peak on a GPU, the process RSS on the CPU.")
    for row in rows:
        if row.get("note"):
            lines.append(f"- {row['label']}: {row['note']}")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    keys = ["target", "label", "size_bytes", "load_s", "gen_mean_s", "gen_std_s", "tokens_per_s", "peak_bytes",
            "perplexity", "ppl_tokens", "runs", "device", "path", "note"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buf.getvalue()


# `qlw eval`: headless ------------------------------------------------------------------------------------------


def add_cli_arguments(parser) -> None:
    """The options of ``python -m backend eval`` (and so of ``qlw eval``)."""
    parser.add_argument("--base", default="", metavar="MODEL",
                        help="the base model (folder or Hub id; default: the one the first adapter was trained on)")
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR",
                        help="an adapter or checkpoint folder to evaluate on the base (repeatable)")
    parser.add_argument("--merged", action="append", default=[], metavar="DIR",
                        help="a merged model folder to evaluate (repeatable)")
    parser.add_argument("--merged-precision", default="saved", choices=("saved", "base"),
                        help="load merged folders as saved (default; 4-bit again only if they do not fit beside the "
                             "base) or with the base's settings (re-quantised: as a 4-bit deployment would)")
    parser.add_argument("--no-base", action="store_true", help="leave the base model's own row out")
    parser.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                        help="prompts, one per line (default: a built-in set of five)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of the prompt set per target (default 3)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    parser.add_argument("--text", type=Path, default=None, metavar="FILE",
                        help="score perplexity on this text (default: the first adapter's run's validation split)")
    parser.add_argument("--precision", default="4bit", choices=P.MODEL_PRECISIONS, help="how to load the base (4bit)")
    parser.add_argument("--compute-dtype", default="bf16", choices=P.MODEL_COMPUTE_DTYPES)
    parser.add_argument("--device", default="auto", help="auto (the first GPU, else the CPU), cpu, cuda:N")
    parser.add_argument("--markdown", type=Path, default=None, metavar="FILE", help="also write the table here")
    parser.add_argument("--csv", type=Path, default=None, metavar="FILE", help="also write the rows as CSV here")
    parser.add_argument("--home", type=Path, default=None, help="data home (default: $QLW_HOME or the user data dir)")


def cli(args) -> int:
    """``qlw eval``: evaluate here (no daemon), print the Markdown table; 0 done, 1 failed, 2 bad arguments."""
    import logging
    import warnings

    from backend.chat.engine import ENGINE, QuietContext

    home = (args.home or P.data_home()).expanduser().resolve()
    if logging.getLogger().getEffectiveLevel() >= logging.WARNING:
        warnings.filterwarnings("ignore")
        for name in ("bitsandbytes", "transformers", "peft", "accelerate"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if not args.base and not args.adapter and not args.merged:
        print("qlw eval: name what to evaluate: --base MODEL, --adapter DIR and/or --merged DIR", file=sys.stderr)
        return 2
    prompts = None
    if args.prompts is not None:
        try:
            prompts = [line.strip() for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as exc:
            print(f"qlw eval: cannot read {args.prompts}: {exc}", file=sys.stderr)
            return 2
        if not prompts:
            print(f"qlw eval: {args.prompts} holds no prompt", file=sys.stderr)
            return 2
    if args.runs < 1 or args.max_new_tokens < 1:
        print("qlw eval: --runs and --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    targets = []
    ENGINE.merged_precision = args.merged_precision
    if args.base:
        from backend.train_config import model_settings

        ENGINE.last_base_settings = model_settings(
            {"source": args.base, "precision": args.precision, "compute_dtype": args.compute_dtype,
             "device": args.device}, home, build=True)
    if (args.base or args.adapter) and not args.no_base:
        targets.append("base")
    targets += [f"tuned:{a}" for a in args.adapter] + [f"merged:{m}" for m in args.merged]
    if not targets:
        print("qlw eval: nothing to evaluate (--no-base without --adapter or --merged)", file=sys.stderr)
        return 2
    if args.adapter and not args.base:
        # The base of the first adapter is loaded for it; the base row comes after.
        targets = [t for t in targets if t != "base"]
        targets = targets[:1] + (["base"] if not args.no_base else []) + targets[1:]

    class Printer(QuietContext):
        def progress(self, stage, done, total=0, unit="", message=""):
            if sys.stderr.isatty():
                print(f"\r{stage} {done:.1f}/{total:g}".ljust(60), end="", file=sys.stderr, flush=True)

    try:
        rows = evaluate(targets, home, prompts=prompts, runs=args.runs, max_new_tokens=args.max_new_tokens,
                        text_path=str(args.text) if args.text else "", ctx=Printer())
    except JobError as exc:
        print(file=sys.stderr)  # ends the progress line
        print_job_error("eval", exc)
        return 1
    if sys.stderr.isatty():
        print("\r" + " " * 60 + "\r", end="", file=sys.stderr)
    table = markdown_table(rows)
    print(table, end="")
    for path, text in ((args.markdown, table), (args.csv, csv_text(rows) if args.csv else "")):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return 0
