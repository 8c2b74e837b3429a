"""Data: the dataset browser and the prepared dataset (backend/data/, tui/widgets/data/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backend.protocol.core import request, setting


# --------------------------------------------------------------------------------------------
# Data: the dataset browser and the prepared dataset (backend/data/, tui/widgets/data/).
#
# A dataset is named by a *source*, plain data: ``{"path": ..., "config": ..., "split": ...}``
# (see :class:`DataSource`). What training will use is a *prepared dataset*, also plain data (see
# :class:`PreparedData`): the Data pane builds it, the LoRA/Train panes send it back unchanged,
# and ``backend.data.load_prepared`` turns it into the rows trl's ``SFTTrainer`` consumes. The
# preview, the token statistics and training all go through the one formatter in backend/data/.

#: Templates of a prepared dataset: the tokenizer's chat template, Mistral's ``[INST]`` format,
#: the Alpaca prompt, or the columns' text as it is.
DATA_TEMPLATES = ("chat", "mistral", "alpaca", "raw")
#: Roles a column can be mapped to; ``messages`` is a conversation column (role/content or
#: ShareGPT's from/value), ``text`` a plain-text column.
DATA_ROLES = ("instruction", "context", "response", "system", "messages", "text", "chosen", "rejected", "label")
#: The roles of preference rows: ``instruction`` is the prompt; ``chosen``/``rejected`` the two
#: answers (text, or message lists as in HH-RLHF and UltraFeedback); KTO's rows are ``instruction``
#: (prompt), ``response`` (completion) and ``label`` (true: desirable).
PREFERENCE_ROLES = ("chosen", "rejected", "label")
#: ``auto``: assistant-only for chat rows, completion-only for prompt/completion rows, else all.
DATA_LOSSES = ("auto", "assistant_only", "completion_only", "all")
#: Validation rows: none, a seeded random fraction, or another split of the source.
DATA_SPLIT_MODES = ("none", "ratio", "split")
#: Code of a ``refused`` reply to a data request whose dataset this backend has not open (any
#: more, e.g. after a restart or "free memory"): send ``data.open`` again, then retry.
NOT_OPEN = "not_open"


@dataclass
class DataSource:
    """Where rows come from: a local file or folder (JSON, JSONL, CSV, TSV, Parquet, Arrow, plain
    text, or a ``save_to_disk`` folder) or a Hub dataset id, with its ``config`` and the ``split``
    to browse and train on (empty: ``train``, or the only split there is)."""

    path: str
    config: str = ""
    split: str = ""


@dataclass
class PreparedData:
    """A prepared dataset, as plain data: what training will use, exactly.

    ``source`` is a :class:`DataSource` as a dict. ``mapping`` maps each role of ``DATA_ROLES``
    to a column ("" or absent: unmapped). ``template`` is one of ``DATA_TEMPLATES``; ``loss`` one
    of ``DATA_LOSSES``; ``system_prompt`` is used when no column is mapped to ``system``.
    Validation rows: ``split_mode`` (``DATA_SPLIT_MODES``) with ``validation_ratio`` and ``seed``,
    or ``validation_split``. ``max_length`` is trl's ``SFTConfig.max_length`` (tokens; longer rows
    are cut, keeping the start).
    """

    source: dict[str, Any]
    mapping: dict[str, Any] = field(default_factory=dict)
    template: str = "chat"
    loss: str = setting("auto", help="Which tokens count in the loss: auto, assistant_only (chat rows), "
                        "completion_only (prompt/completion rows) or all (SFT only).", choices=DATA_LOSSES)
    system_prompt: str = ""
    split_mode: str = "ratio"
    validation_ratio: float = 0.1
    validation_split: str = ""
    seed: int = 42
    max_length: int = setting(1024, help="trl's max_length in tokens: longer rows are cut (keeping the start).",
                              minimum=1)


@request("data.open")
class OpenData:
    """Open ``source`` (a :class:`DataSource` dict) for browsing. If this backend has it open
    already (and the file did not change), the reply is ``ok`` with ``{"dataset": summary}``;
    otherwise a ``data.open`` job reads it (building the Arrow cache in the data home on first
    use, with progress) and its ``job.finished`` result is ``{"dataset": summary}``. The summary:
    source, kind, files, splits and their row counts, ``num_rows``, ``columns`` (name, type,
    nulls, examples), the detected ``shape`` and ``mapping``, and notes. ``reload`` reads the
    source again even if open."""

    source: dict[str, Any]
    reload: bool = False


@request("data.page")
class DataPage:
    """Rows ``start`` .. ``start + count`` of an open source, of those matching ``filter`` (a
    case-insensitive substring of any column, or ``column:text`` for one column): ``{"rows":
    [{"index": i, "cells": [...]}, ...], "columns": [...], "start", "total" (rows matching),
    "num_rows"}``. Cells are cut to ``cell_chars`` characters; nested values are compact JSON.
    Refused with code ``not_open`` when the source is not open."""

    source: dict[str, Any]
    start: int = 0
    count: int = 100
    filter: str = ""
    cell_chars: int = 200


@request("data.row")
class DataRow:
    """Row ``index`` of an open source in full: ``{"index", "values": {column: value}, "cut":
    {column: full length}}``; nested values stay structured, and a string longer than
    ``max_chars`` is cut there (``cut`` says so)."""

    source: dict[str, Any]
    index: int
    max_chars: int = 200_000


@request("data.preview")
class DataPreview:
    """The training example that ``settings`` (a :class:`PreparedData` dict) makes of row
    ``index``, tokenized exactly as trl's ``SFTTrainer`` will: ``{"example": the trl row,
    "form", "loss", "text", "segments": [{"text", "loss", "cut"}, ...], "tokens", "loss_tokens",
    "truncated", "dropped", "warnings", "error"}``. ``tokenizer``: a model folder or Hub id; empty
    for the embedded tiny model. A row that cannot be formatted gives ``error`` (message, where,
    hint), not a failed request."""

    settings: dict[str, Any]
    index: int = 0
    tokenizer: str = ""


@request("data.stats")
class DataStats:
    """Job: token lengths of every row (the first ``limit`` rows when ``limit`` > 0) as
    ``settings`` formats them, with progress. The ``job.finished`` result: ``{"stats": {"rows",
    "skipped", "errors", "min", "p50", "p95", "p99", "max", "mean", "histogram": {"edges",
    "counts"}, "max_length", "truncated", "dropped", "split"}}``."""

    settings: dict[str, Any]
    tokenizer: str = ""
    bins: int = 40
    limit: int = 0

