"""``qlw data``: the headless view of a dataset (summary, mapping, preview, token statistics).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from backend import protocol as P
from backend.data.sources import DataError, _excerpt
from backend.data.browse import open_source
from backend.data.shape import ROLES, TEMPLATES, check_mapping, settings_from
from backend.data.tokens import load_tokenizer, preview_row, split_counts, token_stats
from backend.data.handlers import error_result


# `qlw data`: the headless view ----------------------------------------------------------------


def add_cli_arguments(parser) -> None:
    """The options of ``python -m backend data`` (and so of ``qlw data``)."""
    parser.add_argument("path", help="a data file or folder (JSON, JSONL, CSV, TSV, Parquet, Arrow, text) or a Hub id")
    parser.add_argument("--config", default="", help="the Hub dataset's config name")
    parser.add_argument("--split", default="", help="the split to inspect (default: train, or the only one)")
    parser.add_argument("--template", choices=TEMPLATES, default="chat",
                        help="training format: the tokenizer's chat template, Mistral [INST], Alpaca, or raw text")
    parser.add_argument("--tokenizer", default="",
                        help="model folder or Hub id whose tokenizer counts tokens (default: the embedded tiny model)")
    parser.add_argument("--map", action="append", default=[], metavar="ROLE=COLUMN",
                        help=f"correct the detected mapping (roles: {', '.join(ROLES)}; empty COLUMN unmaps)")
    parser.add_argument("--loss", choices=P.DATA_LOSSES, default="auto", help="which tokens count in the loss")
    parser.add_argument("--system-prompt", default="", help="system prompt for rows without a system column")
    parser.add_argument("--max-length", type=int, default=1024, help="trl's max_length in tokens (default 1024)")
    parser.add_argument("--validation-ratio", type=float, default=0.1, help="fraction of rows for validation (0: none)")
    parser.add_argument("--validation-split", default="", help="use this split of the source for validation instead")
    parser.add_argument("--seed", type=int, default=42, help="seed of the train/validation split")
    parser.add_argument("--row", type=int, default=0, help="the row whose training example is shown (default 0)")
    parser.add_argument("--stats-rows", type=int, default=0, help="count tokens of the first N rows only (0: all)")
    parser.add_argument("--no-stats", action="store_true", help="skip the token-length statistics")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--home", type=Path, default=None, help="data home (default: $QLW_HOME or the user data dir)")


def cli(args) -> int:
    """``qlw data``: print what the Data pane shows; 0 when a training example could be made."""
    home = (args.home or P.data_home()).expanduser().resolve()
    out: dict[str, Any] = {}
    import logging

    # The libraries' own complaints (datasets' "Failed to load JSON", the tokenizer's "sequence
    # longer than the model's maximum") are said better below, with the file and line.
    import datasets

    datasets.utils.logging.set_verbosity(logging.CRITICAL)  # datasets resets its level on import
    logging.getLogger("transformers").setLevel(logging.CRITICAL)
    tty = sys.stderr.isatty()

    def progress(stage: str, done: float, total: float) -> None:
        if tty:
            amount = f"{done:,.0f}/{total:,.0f}" if total else f"{done:,.0f}"
            print(f"\r{stage}: {amount}\033[K", end="", file=sys.stderr, flush=True)

    try:
        opened = open_source({"path": args.path, "config": args.config, "split": args.split}, home, progress)
        if tty:
            print("\r\033[K", end="", file=sys.stderr)
        summary = opened.summary
        out["dataset"] = summary
        _file_lines(summary)
        mapping = dict(summary["mapping"])
        for item in args.map:
            role, sep, column = item.partition("=")
            if not sep or role.strip() not in ROLES:
                raise DataError(f"--map {item!r}: expected ROLE=COLUMN with a role of {', '.join(ROLES)}", where="--map")
            mapping[role.strip()] = column.strip()
        split_mode = "split" if args.validation_split else ("ratio" if args.validation_ratio > 0 else "none")
        settings = settings_from({
            "source": summary["source"], "mapping": mapping, "template": args.template, "loss": args.loss,
            "system_prompt": args.system_prompt, "split_mode": split_mode,
            "validation_ratio": args.validation_ratio if split_mode == "ratio" else 0.1,
            "validation_split": args.validation_split, "seed": args.seed, "max_length": args.max_length})
        out["settings"] = P.to_dict(settings)
        if not args.json:
            _print_summary(summary, settings)
        check_mapping(settings, opened.columns)
        out["split"] = split_counts(opened, settings)
        tokenizer = load_tokenizer(args.tokenizer, home, build=True, progress=progress)
        if tty:
            print("\r\033[K", end="", file=sys.stderr)
        if not args.no_stats:
            out["stats"] = token_stats(opened, settings, tokenizer, limit=args.stats_rows, progress=progress,
                                       tokenizer_name=args.tokenizer)
            if tty:
                print("\r\033[K", end="", file=sys.stderr)
        preview = preview_row(opened, settings, args.row, tokenizer, args.tokenizer)
        out["preview"] = preview
    except DataError as exc:
        if tty:
            print("\r\033[K", end="", file=sys.stderr)
        out.update(error_result(exc))
        if args.json:
            print(json.dumps(out, ensure_ascii=False, default=str))
        _print_error(out["error"])
        return 1
    if args.json:
        print(json.dumps(out, ensure_ascii=False, default=str))
    else:
        if "stats" in out:
            _print_stats(out["stats"])
        _print_preview(preview, out["split"], settings)
    # The exit status describes the file, not the row shown: with the statistics, 1 when any row
    # cannot be formatted (training skips it); the preview row's own trouble is then a note.
    stats = out.get("stats")
    if stats is not None:
        if preview["error"]:
            _print_error(preview["error"], "note")
        if stats.get("skipped"):
            print(f"qlw data: error: {stats['skipped']:,} of {stats['rows'] + stats['skipped']:,} rows cannot be "
                  f"formatted (training skips them); first: {_line_of(stats['errors'][0]['index'])}: "
                  f"{stats['errors'][0]['message']}" if stats.get("errors") else
                  f"qlw data: error: {stats['skipped']:,} rows cannot be formatted (training skips them)", file=sys.stderr)
            return 1
        return 0
    if preview["error"]:
        _print_error(preview["error"])
        return 1
    return 0


#: Row index -> the file's line number, for a JSON Lines file (set by :func:`cli`): people look a
#: row up in their file by its line, not by a 0-based index.
_FILE_LINES: list[int] = []
_FILE_NAME = ""


def _file_lines(summary: dict[str, Any]) -> None:
    """Number the rows of a single JSON Lines file by line (blank lines are no rows)."""
    global _FILE_NAME
    _FILE_LINES.clear()
    files = summary.get("files") or []
    if summary.get("kind") != "file" or len(files) != 1 or not str(files[0]).endswith((".jsonl", ".ndjson")):
        return
    with open(files[0], "rb") as fh:
        _FILE_LINES.extend(n for n, raw in enumerate(fh, 1) if raw.strip())
    _FILE_NAME = Path(files[0]).name


def _line_of(index: int) -> str:
    """``line 2 of data.jsonl (row 1)`` where the file's lines are known, else ``row 1``."""
    if 0 <= index < len(_FILE_LINES):
        return f"line {_FILE_LINES[index]} of {_FILE_NAME} (row {index})"
    return f"row {index}"


def _with_lines(text: str) -> str:
    return re.sub(r"\brow (\d+)\b", lambda m: _line_of(int(m.group(1))), text) if _FILE_LINES else text


def _print_error(error: dict[str, Any], label: str = "error") -> None:
    print(f"qlw data: {label}: {_with_lines(error['message'])}", file=sys.stderr)
    if error.get("where"):
        print(f"  where: {_with_lines(error['where'])}", file=sys.stderr)
    if error.get("hint"):
        print(f"  hint:  {error['hint']}", file=sys.stderr)


def _print_summary(summary: dict[str, Any], s: P.PreparedData) -> None:
    splits = ", ".join(f"{k} {v:,}" for k, v in summary["splits"].items())
    mapped = ", ".join(f"{role} <- {col}" for role, col in s.mapping.items() if col) or "nothing"
    print(f"source    {summary['description']}")
    print(f"rows      {summary['num_rows']:,} in split {summary['split']} (splits: {splits})")
    print(f"shape     {summary['shape']}: {summary['shape_label']}")
    print(f"mapping   {mapped}")
    for note in summary["notes"]:
        print(f"note      {note}")
    print()
    cols = summary["columns"]
    wname = max([4] + [len(c["name"]) for c in cols])
    wtype = max([4] + [len(c["type"]) for c in cols])
    print(f"{'column':<{wname}}  {'type':<{wtype}}  {'nulls':>7}  example")
    for c in cols:
        example = str(c["examples"][0]) if c["examples"] else ""
        example = example.replace("\n", " ⏎ ")
        print(f"{c['name']:<{wname}}  {c['type']:<{wtype}}  {c['nulls']:>7,}  {_excerpt(example, 60)}")
    print()


def _print_stats(st: dict[str, Any]) -> None:
    print(f"token lengths ({st['tokenizer']}, {st['rows']:,} rows{', ' + str(st['skipped']) + ' skipped' if st['skipped'] else ''})")
    if not st["rows"]:
        print("  no row could be formatted")
    else:
        print(f"  min {st['min']:,}  p50 {st['p50']:,}  p95 {st['p95']:,}  p99 {st['p99']:,}  max {st['max']:,}  "
              f"mean {st['mean']:,}")
        print(f"  max_length {st['max_length']:,}: {st['truncated']:,} rows cut ({st['tokens_cut']:,} tokens), "
              f"{st['dropped']:,} dropped by trl (no loss token left)")
        counts, edges = st["histogram"]["counts"], st["histogram"]["edges"]
        peak = max(counts) or 1
        # Merge into at most 12 lines for a terminal.
        step = max(1, math.ceil(len(counts) / 12))
        for i in range(0, len(counts), step):
            c = sum(counts[i:i + step])
            lo, hi = edges[i], edges[min(i + step, len(edges) - 1)]
            bar = "█" * max(1 if c else 0, round(30 * c / (peak * step)))
            print(f"  {lo:>7,}-{hi:<7,} {bar} {c:,}")
    for e in st["errors"]:
        print(f"  skipped {_line_of(e['index'])}: {e['message']}")
    print()


def _print_preview(pv: dict[str, Any], split: dict[str, int], s: P.PreparedData) -> None:
    print(f"split     train {split['train']:,}, validation {split['validation']:,}"
          + (f" (seed {s.seed})" if s.split_mode == "ratio" else ""))
    if pv.get("error"):
        return
    print(f"template  {s.template}; trl rows are {pv['form']}; loss: {pv['loss']}")
    print()
    print(f"first training example ({_line_of(pv['index'])}): the trl row")
    print(json.dumps(pv["example"], ensure_ascii=False, indent=2))
    print()
    print(f"training text ({pv['tokens']:,} tokens, {pv['loss_tokens']:,} in the loss between ⟦ ⟧; cut after "
          f"max_length between ✂ ✂):")
    parts = []
    for seg in pv["segments"]:
        text = seg["text"]
        if seg["cut"]:
            text = f"✂{text}✂"
        elif seg["loss"] and pv["loss"] != "all":
            text = f"⟦{text}⟧"
        parts.append(text)
    print("".join(parts))
    for w in pv["warnings"]:
        print(f"warning: {w}")
