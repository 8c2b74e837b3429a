"""Tokens the way trl 1.16's ``SFTTrainer`` counts them (:func:`tokenize_like_trl`), the live
preview of one row (:func:`preview_row`) and token statistics over a split (:func:`token_stats`).
"""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path
from typing import Any, Callable

from backend import protocol as P
from backend.jobs import JobCancelled
from backend.data.sources import DataError, Progress, RowError, _root_message
from backend.data.browse import Opened, ROW_BUDGET_CHARS, _cap, _registry_lock, _rows
from backend.data.shape import check_mapping, effective_loss, settings_from, training_form
from backend.data.formatting import format_row


#: Rows formatted and tokenized per batch in the statistics job.
STATS_BATCH = 1000
#: A formatted row longer than this is not tokenized for the live preview (stats still count it).
PREVIEW_MAX_CHARS = 1_000_000
#: Characters of text beyond ``max_length`` shown in a preview (the rest is summarised).
PREVIEW_CUT_CHARS = 4000


# Tokens, the way trl counts them ----------------------------------------------------------------


_tokenizer_locks: dict[int, threading.Lock] = {}


def load_tokenizer(name: str, home: Path, build: bool = False, progress: Progress | None = None,
                   cancelled: Callable[[], bool] | None = None):
    """The tokenizer of a model folder or Hub id; empty ``name``: the embedded tiny model's
    (built first when ``build``, else a DataError says how to build it). Kept in HOLDINGS."""
    from backend import tiny
    from backend.holdings import HOLDINGS

    if not name:
        folder = tiny.tiny_model_path(home)
        if not (folder / tiny.MARKER_NAME).exists():
            if not build:
                raise DataError("the embedded tiny model (the default tokenizer) is not built yet",
                                where="tokenizer", hint="press ctrl+t to build it (about 10 s), or name a tokenizer")
            report = progress or (lambda stage, done, total: None)
            try:
                folder = tiny.ensure_tiny_model(home, progress=lambda st, d, t: report(f"tiny model: {st}", d, t),
                                                cancelled=cancelled)
            except tiny.TinyBuildCancelled:
                raise JobCancelled() from None
        name_or_path = str(folder)
    else:
        local = Path(name).expanduser()
        name_or_path = str(local.resolve()) if local.exists() else name
    key = "data.tokenizer:" + name_or_path
    tok = HOLDINGS.get(key)
    if tok is None:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(name_or_path)
        except Exception as exc:
            raise DataError(f"could not load the tokenizer {name or 'qlw-tiny-llama'}: {_root_message(exc)}",
                            where="tokenizer", hint="give a model folder or a Hub id that has a tokenizer") from None
        HOLDINGS.put(key, tok, "tokenizer", note=f"tokenizer {Path(name_or_path).name} (data preview and stats)")
    return tok


def _lock_for(tokenizer) -> threading.Lock:
    with _registry_lock:
        return _tokenizer_locks.setdefault(id(tokenizer), threading.Lock())


def common_prefix_length(ids: list[int], other: list[int]) -> int:
    """trl's rule: the completion starts where the prompt's and the full row's tokens diverge."""
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n


def tokenize_like_trl(example: dict[str, Any], tokenizer, loss: str) -> tuple[list[int], list[int]]:
    """``(input_ids, mask)`` of one trl row as ``SFTTrainer._prepare_dataset`` (trl 1.16) makes
    them before truncation; ``mask[i]`` is 1 where token i counts in the loss.

    - text rows: the tokenizer's EOS appended unless present, then ``tokenizer(text=...)``;
    - prompt/completion rows: EOS appended to the completion, prompt and prompt+completion
      tokenized separately, the completion starting at their common prefix; only the completion
      counts with completion-only loss;
    - conversational rows: ``apply_chat_template(tokenize=True, return_dict=True)``; with
      assistant-only loss, the ``{% generation %}`` spans (``assistant_masks``) count.
    """
    eos = tokenizer.eos_token
    if "messages" in example:
        out = tokenizer.apply_chat_template(example["messages"], tools=None, chat_template=None, tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=loss == "assistant_only")
        ids = list(out["input_ids"])
        mask = list(out["assistant_masks"]) if loss == "assistant_only" else [1] * len(ids)
        return ids, mask
    if "prompt" in example:
        completion = example["completion"]
        if eos and not completion.endswith(eos):
            completion += eos
        prompt_ids = list(tokenizer(text=example["prompt"])["input_ids"])
        ids = list(tokenizer(text=example["prompt"] + completion)["input_ids"])
        start = common_prefix_length(prompt_ids, ids)
        mask = [0] * start + [1] * (len(ids) - start) if loss == "completion_only" else [1] * len(ids)
        return ids, mask
    text = example["text"]
    if eos and not text.endswith(eos):
        text += eos
    ids = list(tokenizer(text=text)["input_ids"])
    return ids, [1] * len(ids)


def labels_like_trl(ids: list[int], mask: list[int], max_length: int | None) -> tuple[list[int], list[int], bool]:
    """``(input_ids, labels, dropped)`` after trl's label building and ``keep_start``
    truncation; ``dropped``: no label is left, so trl drops the row."""
    labels = [t if m else -100 for t, m in zip(ids, mask)]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels, all(label == -100 for label in labels)


def has_generation_markers(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = template.get("default", "")
    return bool(re.search(r"\{%-?\s*generation\s*-?%\}", template))


def preview_row(opened: Opened, settings: dict[str, Any] | P.PreparedData, index: int, tokenizer,
                tokenizer_name: str = "") -> dict[str, Any]:
    """What training makes of row ``index``: the trl row, the exact text, its tokens as
    segments in and out of the loss (and cut by ``max_length``). Row and mapping problems come
    back as ``error`` (message, where, hint), never raised."""
    result: dict[str, Any] = {"index": int(index), "tokenizer": tokenizer_name or "qlw-tiny-llama", "warnings": [],
                              "error": None, "example": None, "segments": [], "text": "", "tokens": 0,
                              "loss_tokens": 0, "truncated": False, "dropped": False}
    try:
        s = settings_from(settings)
        from backend.methods import preference

        if preference.is_preference_mapping(s.mapping):  # DPO/ORPO/KTO rows: both sides, answers in the loss
            return preference.preview_pair(opened, s, index, tokenizer, result)
        check_mapping(s, opened.columns)
        loss = effective_loss(s)
        result.update(form=training_form(s), loss=loss, max_length=s.max_length, template=s.template)
        result["split"] = split_counts(opened, s)
        row = opened.raw_row(index)
        example = format_row(row, s)
    except DataError as exc:
        where = exc.where
        if isinstance(exc, RowError):
            where = f"row {index}, {exc.where}" if exc.where else f"row {index}"
        result["error"] = {"message": str(exc), "where": where, "hint": exc.hint}
        return result
    result["example"] = _cap(example, 200_000, [ROW_BUDGET_CHARS], {}, "example")
    size = sum(len(v) if isinstance(v, str) else sum(len(m.get("content") or "") for m in v) for v in example.values())
    if size > PREVIEW_MAX_CHARS:
        result["error"] = {"message": f"row {index} is {size:,} characters long: too long for a live preview",
                           "where": f"row {index}", "hint": "token statistics still measure it; max_length cuts it in training"}
        return result
    if result["form"] == "messages" and not getattr(tokenizer, "chat_template", None):
        result["error"] = {"message": f"the tokenizer {result['tokenizer']} has no chat template",
                           "where": "settings.template", "hint": "choose the Mistral, Alpaca or raw template, "
                           "or a tokenizer that has a chat template"}
        return result
    if loss == "assistant_only" and not has_generation_markers(tokenizer):
        result["warnings"].append("the tokenizer's chat template has no {% generation %} markers: trl swaps in a "
                                  "training template for known model families, else it cannot mask; the mask below is empty")
    try:
        with _lock_for(tokenizer):
            ids, mask = tokenize_like_trl(example, tokenizer, loss)
    except Exception as exc:  # e.g. a chat template that raises on a role it does not know
        result["error"] = {"message": f"the tokenizer's chat template fails on row {index}: {_root_message(exc)}",
                           "where": f"row {index}", "hint": "choose another template, or fix the row's roles"}
        return result
    kept_ids, labels, dropped = labels_like_trl(ids, mask, s.max_length)
    result.update(
        tokens=len(ids),
        loss_tokens=sum(1 for label in labels if label != -100),
        truncated=len(ids) > s.max_length,
        dropped=dropped,
        segments=_segments(tokenizer, ids, mask, s.max_length),
    )
    result["text"] = "".join(seg["text"] for seg in result["segments"])
    if dropped:
        result["warnings"].append(f"no loss token is left within max_length {s.max_length}: trl drops this row")
    elif result["truncated"]:
        result["warnings"].append(f"{len(ids) - s.max_length:,} of {len(ids):,} tokens lie beyond max_length "
                                  f"{s.max_length} and are cut")
    if loss == "all" and training_form(s) != "text" and not (s.mapping["response"] or s.mapping["messages"]):
        result["warnings"].append("no response column: training learns the whole text, prompts included")
    return result


def _segments(tokenizer, ids: list[int], mask: list[int], max_length: int) -> list[dict[str, Any]]:
    """Consecutive tokens with the same (in loss, cut) state, decoded together."""
    segments: list[dict[str, Any]] = []
    start = 0
    n = len(ids)
    while start < n:
        state = (bool(mask[start]), start >= max_length)
        stop = start + 1
        while stop < n and (bool(mask[stop]), stop >= max_length) == state:
            stop += 1
        text = tokenizer.decode(ids[start:stop], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if state[1] and len(text) > PREVIEW_CUT_CHARS:
            text = text[:PREVIEW_CUT_CHARS] + f"… ({len(text) - PREVIEW_CUT_CHARS:,} more characters)"
        segments.append({"text": text, "loss": state[0], "cut": state[1], "tokens": stop - start})
        start = stop
    return segments


# Token statistics -----------------------------------------------------------------------------


def split_counts(opened: Opened, s: P.PreparedData) -> dict[str, int]:
    """Rows of the train and validation parts that ``s`` makes (before formatting)."""
    n = opened.num_rows
    if s.split_mode == "ratio":
        n_val = math.ceil(s.validation_ratio * n)
        return {"train": n - n_val, "validation": n_val}
    if s.split_mode == "split":
        if s.validation_split not in opened.splits:
            raise DataError(f"the source has no split {s.validation_split!r} for validation",
                            where="settings.validation_split", hint=f"its splits are: {', '.join(opened.splits)}")
        return {"train": n, "validation": len(opened.splits[s.validation_split])}
    return {"train": n, "validation": 0}


def token_stats(opened: Opened, settings: dict[str, Any] | P.PreparedData, tokenizer, bins: int = 40, limit: int = 0,
                progress: Progress | None = None, cancelled: Callable[[], bool] | None = None,
                tokenizer_name: str = "") -> dict[str, Any]:
    """Token lengths of the rows as trl will see them (before truncation): percentiles, a
    histogram, how many rows ``max_length`` cuts and how many trl drops (no loss token left).
    Rows that cannot be formatted are counted and the first few named."""
    import numpy as np

    report = progress or (lambda stage, done, total: None)
    is_cancelled = cancelled or (lambda: False)
    s = settings_from(settings)
    from backend.methods.preference import is_preference_mapping

    if is_preference_mapping(s.mapping):
        # SFT's statistics would measure the prompts alone: say so rather than show them.
        raise DataError("token statistics measure SFT rows; these are preference pairs", where="mapping",
                        hint="the preview shows each pair's chosen and rejected tokens and what max_length cuts")
    check_mapping(s, opened.columns)
    loss = effective_loss(s)
    form = training_form(s)
    if form == "messages" and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"the tokenizer {tokenizer_name or 'qlw-tiny-llama'} has no chat template",
                        where="settings.template", hint="choose the Mistral, Alpaca or raw template")
    total = opened.num_rows if limit <= 0 else min(limit, opened.num_rows)
    lengths = np.zeros(total, dtype=np.int64)
    no_loss_before = np.zeros(total, dtype=np.int64)  # tokens before the first loss token
    ok = np.zeros(total, dtype=bool)
    errors: list[dict[str, Any]] = []
    skipped = 0
    eos = tokenizer.eos_token or ""
    report("tokenizing", 0, total)
    for start in range(0, total, STATS_BATCH):
        if is_cancelled():
            raise JobCancelled()
        stop = min(total, start + STATS_BATCH)
        examples, where = [], []
        for offset, row in enumerate(_rows(opened.dataset[start:stop])):
            try:
                examples.append(format_row(row, s))
                where.append(start + offset)
            except RowError as exc:
                skipped += 1
                if len(errors) < 5:
                    errors.append({"index": start + offset, "message": str(exc), "where": exc.where})
        if examples:
            with _lock_for(tokenizer):
                try:
                    measured = [(where, *_batch_lengths(examples, form, loss, tokenizer, eos, s.max_length))]
                except Exception:  # one row the chat template rejects: measure row by row
                    measured = []
                    for index, example in zip(where, examples):
                        try:
                            measured.append(([index], *_batch_lengths([example], form, loss, tokenizer, eos, s.max_length)))
                        except Exception as exc:
                            skipped += 1
                            if len(errors) < 5:
                                errors.append({"index": index, "where": "chat template",
                                               "message": f"the tokenizer's chat template fails: {_root_message(exc)}"})
            for indices, full, before in measured:
                idx = np.asarray(indices)
                lengths[idx] = full
                no_loss_before[idx] = before
                ok[idx] = True
        report("tokenizing", stop, total)
    counted = lengths[ok]
    result: dict[str, Any] = {
        "rows": int(ok.sum()), "skipped": skipped, "errors": errors, "num_rows": opened.num_rows,
        "limit": limit, "max_length": s.max_length, "loss": loss, "form": form, "template": s.template,
        "tokenizer": tokenizer_name or "qlw-tiny-llama", "split": split_counts(opened, s),
    }
    if counted.size == 0:
        result.update(min=0, p50=0, p95=0, p99=0, max=0, mean=0.0, total_tokens=0, truncated=0, dropped=0,
                      histogram={"edges": [0, 1], "counts": [0]})
        return result
    p50, p95, p99 = (int(np.percentile(counted, q, method="nearest")) for q in (50, 95, 99))
    top = int(counted.max())
    nbins = max(1, min(int(bins), 200, top))
    width = max(1, math.ceil(top / nbins))
    edges = [i * width for i in range(nbins + 1)]
    counts, _ = np.histogram(counted, bins=edges)
    dropped = int((no_loss_before[ok] >= s.max_length).sum()) if loss != "all" else 0
    result.update(
        min=int(counted.min()), p50=p50, p95=p95, p99=p99, max=top, mean=round(float(counted.mean()), 1),
        total_tokens=int(counted.sum()),
        truncated=int((counted > s.max_length).sum()),
        tokens_cut=int(np.clip(counted - s.max_length, 0, None).sum()),
        dropped=dropped,
        histogram={"edges": edges, "counts": [int(c) for c in counts]},
    )
    return result


def _batch_lengths(examples: list[dict[str, Any]], form: str, loss: str, tokenizer, eos: str,
                   max_length: int | None = None):
    """Token lengths of a batch of trl rows (as :func:`tokenize_like_trl` counts them, batched),
    and the number of tokens before the first one in the loss. That second count matters only
    for rows longer than ``max_length`` (only they can lose every loss token), so it is measured
    for those alone; other rows get 0."""

    def lengths(texts: list[str], special: bool = True) -> list[int]:
        enc = tokenizer(texts, add_special_tokens=special, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]
        return [len(ids) for ids in enc]

    def long(full: list[int]) -> list[int]:
        return [i for i, n in enumerate(full) if max_length is None or n > max_length]

    if form == "messages":
        convs = [ex["messages"] for ex in examples]
        full = lengths(tokenizer.apply_chat_template(convs, tokenize=False), special=False)
        before = [0] * len(convs)
        if loss != "assistant_only":
            return full, before
        heads, at = [], []
        for i in long(full):  # everything up to the first answer, with the assistant header
            conv = convs[i]
            k = next((j for j, msg in enumerate(conv) if msg["role"] == "assistant"), len(conv))
            if k:
                heads.append(conv[:k])
                at.append(i)
        if heads:
            rendered = tokenizer.apply_chat_template(heads, tokenize=False, add_generation_prompt=True)
            for i, n in zip(at, lengths(rendered, special=False)):
                before[i] = n
        return full, before
    if form == "prompt_completion":
        full = lengths([ex["prompt"] + (ex["completion"] if ex["completion"].endswith(eos) else ex["completion"] + eos)
                        for ex in examples])
        before = [0] * len(full)
        if loss != "completion_only":
            return full, before
        at = long(full)
        if at:
            for i, n in zip(at, lengths([examples[i]["prompt"] for i in at])):
                before[i] = min(n, full[i])
        return full, before
    full = lengths([ex["text"] if ex["text"].endswith(eos) else ex["text"] + eos for ex in examples])
    return full, [0] * len(full)

