"""`python -m backend serve [--home DIR]`: run the backend in the foreground.

`python -m backend data PATH ...` (what `qlw data` runs) prints what the Data pane shows.

`python -m backend train CONFIG.toml` (what `qlw train` runs) trains a run config in this process.

`python -m backend merge ADAPTER OUT` (what `qlw merge` runs) merges an adapter into its base here.

`python -m backend export MODEL OUT` (what `qlw export` runs) writes a GGUF (and a Modelfile) here.

`qlw serve` (without --foreground) and `qlw` itself start this detached from the terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
from pathlib import Path

from backend import __version__, protocol as P


def main(argv: list[str] | None = None) -> int:
    # `qlw VERB` runs this in its place and says so (QLW_PROG), so that usage lines name the
    # command the user typed.
    parser = argparse.ArgumentParser(prog=os.environ.get("QLW_PROG", "python -m backend"), description="the qlw backend")
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="run the backend in the foreground")
    serve.add_argument("--home", type=Path, default=None, help="data home (default: $QLW_HOME or the user data dir)")
    serve.add_argument("--log-level", default=os.environ.get("QLW_LOG_LEVEL", "INFO"))
    # `qlw data PATH ...` runs this: what the Data pane shows, printed (backend/data/).
    from backend import data as data_room

    data_cmd = sub.add_parser(
        "data", help="inspect a dataset as the Data pane would: shape, mapping, columns, token lengths",
        description="Print what the Data pane shows for a dataset: the detected shape and mapping, the "
                    "columns, the row count, token-length statistics and the first training example "
                    "(or the error, with file and line). Exit status 1 when the file cannot be read or mapped or any "
                    "row cannot be formatted (with --no-stats: the row shown); rows are named by their line in a "
                    "JSON Lines file.")
    data_room.add_cli_arguments(data_cmd)
    # `qlw train CONFIG.toml` runs this: the same training code as the backend's job, in this
    # process (backend/train/).
    from backend import train as train_room

    train_cmd = sub.add_parser(
        "train", help="train a run config (TOML) here, headless: the loss table on stdout",
        description="Run a training config (TOML, as the Train pane exports it) in this process, through the "
                    "same code as the backend's train.start job; print the loss table and record a session in "
                    "the data home. Fields can be overridden from the environment: QLW_<SECTION>__<FIELD>=value "
                    "(e.g. QLW_TRAINING__LEARNING_RATE=1e-4). Exit status: 0 done, 1 failed, 2 invalid config, "
                    "130 stopped with ctrl+c (a checkpoint is saved first).")
    train_room.add_cli_arguments(train_cmd)
    # `qlw merge ADAPTER OUT` runs this: the Merge pane's steps in this process (backend/merge/).
    from backend import merge as merge_room

    merge_cmd = sub.add_parser(
        "merge", help="merge a LoRA adapter into its base model and save it (then verify, upload)",
        description="Merge a LoRA adapter (a session's adapter/ or a checkpoint) into its base model in bf16, "
                    "fp16 or fp32 (never 4-bit): into the base as trained, its 4-bit weights dequantized "
                    "(default for a QLoRA adapter), or into the base's original weights. Saves safetensors "
                    "shards, tokenizer, generation config and a model card through a temporary folder renamed "
                    "into place when complete. --verify compares it with the model as trained; --push uploads "
                    "it (token from HF_TOKEN or `hf auth login`, never printed). Exit status: 0 done, 1 failed, "
                    "2 refused (bad input, existing output without --yes), 130 stopped with ctrl+c.")
    merge_room.add_cli_arguments(merge_cmd)
    # `qlw export MODEL OUT` runs this: the Merge wizard's Export step in this process (backend/export.py).
    from backend import export as export_room

    export_cmd = sub.add_parser(
        "export", help="write a merged model (or an adapter, merged first) as a GGUF file, with an Ollama Modelfile",
        description="Write a merged Llama, Mistral or Qwen2 model folder (or an adapter, merged first into the data "
                    "home's merged/) as one GGUF file for llama.cpp, Ollama and LM Studio: weights at --quant "
                    "(f16, bf16, q8_0 written in Python; q4_k_m, q5_k_m by llama.cpp's quantizer, which needs "
                    "pip install \"qlw[gguf]\"), the tokenizer, chat template and stop tokens inside; through a "
                    "temporary file renamed into place. --ollama writes a Modelfile beside it; --verify reads the "
                    "file back and compares it with the merged model. Exit status: 0 done, 1 failed, 2 refused "
                    "(bad input, unsupported architecture, missing extra, existing file without --yes), 130 "
                    "stopped with ctrl+c.")
    export_room.add_cli_arguments(export_cmd)
    # `qlw eval` runs this: base, tuned and merged side by side, the Markdown table on stdout
    # (backend/evaluate.py).
    from backend import evaluate as eval_room

    eval_cmd = sub.add_parser(
        "eval", help="evaluate base, tuned and merged models on the same inputs: the table on stdout",
        description="Load the base model, adapters (--adapter) and merged folders (--merged) here and measure "
                    "each on the same inputs: size on disk, load time, generation time over --runs runs of a "
                    "prompt set (mean and std), tokens/s, peak memory, and perplexity on the validation split "
                    "of the adapter's run (or --text FILE). Prints a Markdown table. Exit status: 0 done, 1 "
                    "failed, 2 bad arguments.")
    eval_room.add_cli_arguments(eval_cmd)
    # `qlw runs ...` runs this: the runs ledger, read from the store (backend/ledger.py, issue 18).
    from backend import ledger as ledger_room

    runs_cmd = sub.add_parser(
        "runs", help="the runs ledger: list, show RUN, diff RUN RUN... (Markdown), export RUN... (CSV)",
        description="Read the data home's sessions store (no backend needed): `list` every run with its status, "
                    "steps, losses, tokens/s, time, adapter size and merged/exported/uploaded flags; `show RUN` one "
                    "run in full; `diff RUN RUN...` the settings that differ (2 to 6 runs, a Markdown table); "
                    "`export RUN...` every logged row as CSV. A run is named by its id, a unique id prefix or its "
                    "name. Exit status: 0 done, 1 no such run, 2 bad arguments.")
    ledger_room.add_cli_arguments(runs_cmd)
    args = parser.parse_args(argv)
    if args.cmd == "runs":
        return ledger_room.cli(args)
    if args.cmd == "eval":
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as `serve` does
        logging.basicConfig(level=os.environ.get("QLW_LOG_LEVEL", "WARNING").upper(), stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")
        return eval_room.cli(args)
    if args.cmd == "data":
        logging.basicConfig(level=os.environ.get("QLW_LOG_LEVEL", "WARNING").upper(), stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")
        return data_room.cli(args)
    if args.cmd == "train":
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as `serve` does
        logging.basicConfig(level=os.environ.get("QLW_LOG_LEVEL", "WARNING").upper(), stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")
        return train_room.cli(args)
    if args.cmd == "export":
        logging.basicConfig(level=os.environ.get("QLW_LOG_LEVEL", "WARNING").upper(), stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")
        return export_room.cli(args)
    if args.cmd == "merge":
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        logging.basicConfig(level=os.environ.get("QLW_LOG_LEVEL", "WARNING").upper(), stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")
        return merge_room.cli(args)

    home = (args.home or P.data_home()).expanduser().resolve()
    # Before torch is ever imported: expandable segments let "free VRAM" return the free parts of
    # a segment that one surviving tensor would otherwise pin (measured in bench/gpu_cleanup.py),
    # and reduce fragmentation in training. A user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from backend.server import AlreadyRunning, serve as run_server

    # A job thread in pure Python holds the GIL for up to the switch interval each time the loop
    # asks for it; 1 ms instead of 5 keeps replies prompt. An idle loop asks nothing, so a job
    # alone runs as before.
    sys.setswitchinterval(float(os.environ.get("QLW_SWITCH_INTERVAL", "0.001")))

    try:
        restart = asyncio.run(run_server(home))
    except AlreadyRunning as exc:
        print(f"qlw backend: {exc}", file=sys.stderr)
        return 3
    if restart:
        # A fresh process: the only way to release a CUDA context. Same pid, socket and home;
        # the lock and the socket were let go by the shutdown (fds are close-on-exec).
        logging.getLogger("qlw").info("restarting the backend")
        logging.shutdown()
        os.execv(sys.executable, [sys.executable, "-m", "backend", "serve", "--home", str(home),
                                  "--log-level", args.log_level])
    # A job thread that ignored its stop request would keep the interpreter alive forever.
    if any(t.name.startswith("qlw-job") and t.is_alive() for t in threading.enumerate()):
        logging.getLogger("qlw").warning("a job thread is still running at exit; ending the process")
        logging.shutdown()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
