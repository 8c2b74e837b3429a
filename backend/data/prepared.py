"""The prepared dataset for training (:func:`load_prepared`): the formatter mapped over the source's
train/validation split, cached beside the source's Arrow files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from backend import protocol as P
from backend.data.sources import DataError, Progress, RowError, cache_dir
from backend.data.browse import Opened, _rows, open_source
from backend.data.shape import check_mapping, effective_loss, settings_from, sft_config_kwargs, training_form
from backend.data.formatting import format_row
from backend.data.tokens import split_counts

if TYPE_CHECKING:  # pragma: no cover - annotations only
    import datasets


# The prepared dataset, for training ----------------------------------------------------------


@dataclass
class Prepared:
    """What training consumes: trl rows for train (and validation), the SFTConfig settings."""

    train: "datasets.Dataset"
    validation: "datasets.Dataset | None"
    sft_config: dict[str, Any]
    settings: dict[str, Any]
    report: dict[str, Any]


def _format_batch(batch: dict[str, list], settings: dict[str, Any]) -> dict[str, list]:
    s = settings_from(settings)
    out: dict[str, list] = {}
    keys = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}[training_form(s)]
    for key in keys:
        out[key] = []
    for row in _rows(batch):
        try:
            example = format_row(row, s)
        except RowError:
            continue  # counted by the caller: formatted rows vs source rows
        if set(example) != set(keys):  # e.g. an unanswered row under a prompt/completion template
            continue
        for key in keys:
            out[key].append(example[key])
    return out


def _prepared_cache(home: Path, opened: Opened, s: P.PreparedData, part: str) -> str | None:
    """Where ``datasets`` writes a derived table (formatted rows, split indices). It writes them
    beside the source's Arrow files, which for files and Hub ids are in the data home already;
    a ``save_to_disk`` folder is the user's, so its derived tables go to the data home instead."""
    if opened.resolved.kind != "disk":
        return None
    import hashlib

    key = json.dumps([opened.resolved.key, opened.signature, P.to_dict(s), part], default=str)
    folder = cache_dir(home) / "prepared"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}-{part}.arrow")


def load_prepared(settings: dict[str, Any] | P.PreparedData, home: Path, progress: Progress | None = None,
                  cancelled: Callable[[], bool] | None = None) -> Prepared:
    """The prepared dataset for trl's ``SFTTrainer``: the source's rows split into train and
    validation (seeded), each formatted by :func:`format_row`. Rows that cannot be formatted are
    left out and counted in ``report``; ``sft_config`` holds the matching ``SFTConfig`` settings."""
    s = settings_from(settings)
    opened = open_source(s.source, home, progress, cancelled)
    check_mapping(s, opened.columns)
    base = opened.dataset
    validation = None
    counts = split_counts(opened, s)
    if s.split_mode == "ratio":
        if counts["train"] < 1 or counts["validation"] < 1:
            raise DataError(f"a validation ratio of {s.validation_ratio:g} leaves {counts['train']} train and "
                            f"{counts['validation']} validation rows of {opened.num_rows}",
                            where="settings.validation_ratio", hint="choose another ratio, or no validation")
        parts = base.train_test_split(test_size=counts["validation"], seed=s.seed, shuffle=True,
                                      train_indices_cache_file_name=_prepared_cache(home, opened, s, "train-indices"),
                                      test_indices_cache_file_name=_prepared_cache(home, opened, s, "validation-indices"))
        base, validation = parts["train"], parts["test"]
    elif s.split_mode == "split":
        validation = opened.splits[s.validation_split]
        check_mapping(s, list(validation.column_names))
    kwargs = {"batched": True, "batch_size": 1000, "fn_kwargs": {"settings": P.to_dict(s)}}
    train = base.map(_format_batch, remove_columns=base.column_names, desc="Formatting train rows",
                     cache_file_name=_prepared_cache(home, opened, s, "train"), **kwargs)
    val = None
    if validation is not None:
        val = validation.map(_format_batch, remove_columns=validation.column_names, desc="Formatting validation rows",
                             cache_file_name=_prepared_cache(home, opened, s, "validation"), **kwargs)
    report = {
        "train_rows": len(train), "train_skipped": len(base) - len(train),
        "validation_rows": len(val) if val is not None else 0,
        "validation_skipped": (len(validation) - len(val)) if val is not None else 0,
        "form": training_form(s), "loss": effective_loss(s),
    }
    return Prepared(train, val, sft_config_kwargs(s), P.to_dict(s), report)

