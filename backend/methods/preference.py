"""What the preference methods (DPO, ORPO, KTO) share: preference rows and the trainer they build.

Rows. A source row becomes trl's preference row through the prepared dataset's mapping and
template (the roles of ``protocol.PREFERENCE_ROLES`` beside ``instruction``/``context``/
``system``/``response``):

- prompt/chosen/rejected as text: ``instruction`` (+ ``context``) is the prompt;
- chosen/rejected as message lists (HH-RLHF, UltraFeedback): the messages both sides share are
  the prompt, the rest of each side its answer (a mapped ``instruction`` is the prompt when they
  share nothing);
- KTO: prompt, completion (``response``) and ``label`` (true: desirable); paired rows are unpaired
  by trl's ``unpair_preference_dataset`` (chosen: true, rejected: false).

With the ``chat`` template the rows are conversational (``{"prompt": [messages], "chosen":
[messages], ...}``) and trl applies the tokenizer's chat template; with ``mistral``, ``alpaca`` and
``raw`` the prompt is rendered as SFT renders it (backend/data/) and the answers are text (trl
adds EOS). A malformed pair (an empty side, identical sides, no prompt) is reported by its line
and skipped, or the run is refused, as the method's ``malformed`` setting says.

Trainer. ``ref_model=None``: with peft, trl computes the reference with the adapter switched off
(or, for a run that starts from an earlier adapter, with trl's frozen copy of that adapter), never a
second copy of the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from backend import protocol as P
from backend.methods.base import TrainingMethod, lora_config, watched

#: Where a source row comes from, for reports: "line N" for JSON Lines files, else "row N".
_LINE_FORMATS = (".jsonl", ".ndjson")
#: How many malformed pairs a report lists one by one.
REPORT_LINES = 20

TRUE_LABELS = {"true", "1", "yes", "good", "chosen", "desirable", "positive", "accept", "accepted", "👍"}
FALSE_LABELS = {"false", "0", "no", "bad", "rejected", "undesirable", "negative", "reject", "👎"}


class Malformed(ValueError):
    """A pair that cannot train: what is wrong with it (``empty chosen``, ``identical sides``...)."""


def _data():
    from backend import data as D

    return D


def _conversation(row: dict[str, Any], column: str, s: P.PreparedData):
    """``(system, turns)`` of a message-list cell, or None when the cell holds text."""
    value = row.get(column)
    if isinstance(value, str):
        try:
            parsed = json.loads(value) if value.lstrip().startswith("[") else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, list):
            return None
    elif not isinstance(value, list):
        return None
    D = _data()
    return D._turns(row, dataclasses.replace(s, mapping={**s.mapping, "messages": column}))[:2]


def _prompt_turns(row: dict[str, Any], s: P.PreparedData) -> list[dict[str, str]]:
    m, D = s.mapping, _data()
    if not m["instruction"]:
        return []
    instruction = D._text_of(row, m["instruction"], "instruction", False)
    context = D._text_of(row, m["context"], "context", False)
    user = instruction + ("\n\n" + context if context else "") if instruction else context
    return [{"role": "user", "content": user}] if user.strip() else []


def _system(row: dict[str, Any], s: P.PreparedData) -> str:
    D = _data()
    return (D._text_of(row, s.mapping["system"], "system", False) if s.mapping["system"] else "") or s.system_prompt


def pair_parts(row: dict[str, Any], s: P.PreparedData) -> tuple[str, list, list, list]:
    """``(system, prompt turns, chosen turns, rejected turns)`` of a paired row; raises
    :class:`Malformed` for a pair that cannot train and ``RowError`` for an unreadable one."""
    m, D = s.mapping, _data()
    conv_c, conv_r = _conversation(row, m["chosen"], s), _conversation(row, m["rejected"], s)
    system = _system(row, s)
    if conv_c is not None and conv_r is not None:
        (sys_c, tc), (_sys_r, tr) = conv_c, conv_r
        system = sys_c or system
        k = 0
        while k < min(len(tc), len(tr)) - 1 and tc[k] == tr[k]:
            k += 1
        prompt, chosen, rejected = tc[:k], tc[k:], tr[k:]
        if not prompt:
            prompt = _prompt_turns(row, s)
    else:
        prompt = _prompt_turns(row, s)
        chosen = [{"role": "assistant", "content": D._text_of(row, m["chosen"], "chosen", False)}]
        rejected = [{"role": "assistant", "content": D._text_of(row, m["rejected"], "rejected", False)}]
    if not any(t["content"].strip() for t in chosen):
        raise Malformed("empty chosen answer")
    if not any(t["content"].strip() for t in rejected):
        raise Malformed("empty rejected answer")
    if [t["content"].strip() for t in chosen] == [t["content"].strip() for t in rejected]:
        raise Malformed("identical chosen and rejected answers")
    if not any(t["content"].strip() for t in prompt):
        raise Malformed("missing prompt")
    return system, prompt, chosen, rejected


def parse_label(value: Any) -> bool:
    """A KTO label: true/false, 1/0, yes/no, good/bad, chosen/rejected, desirable/undesirable."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower() if value is not None else ""
    if text in TRUE_LABELS:
        return True
    if text in FALSE_LABELS:
        return False
    raise Malformed(f"label {value!r:.40} is neither true nor false")


def kto_parts(row: dict[str, Any], s: P.PreparedData) -> list[tuple[str, list, list, bool]]:
    """``[(system, prompt turns, completion turns, label)]`` of a prompt/completion/label row
    (paired rows are unpaired by trl's ``unpair_preference_dataset``: see :func:`load_pairs`)."""
    m, D = s.mapping, _data()
    label = parse_label(row.get(m["label"]))
    conv = _conversation(row, m["response"], s)
    if conv is not None:
        system, turns = conv
        system = system or _system(row, s)
        k = max(i for i, t in enumerate(turns) if t["role"] != "assistant") + 1 if any(
            t["role"] != "assistant" for t in turns) else 0
        prompt, completion = turns[:k] or _prompt_turns(row, s), turns[k:]
    else:
        system, prompt = _system(row, s), _prompt_turns(row, s)
        completion = [{"role": "assistant", "content": D._text_of(row, m["response"], "response", False)}]
    if not any(t["content"].strip() for t in completion):
        raise Malformed("empty completion")
    if not any(t["content"].strip() for t in prompt):
        raise Malformed("missing prompt")
    return [(system, prompt, completion, label)]


def render_prompt(system: str, prompt: list[dict[str, str]], template: str):
    """The prompt as trl takes it: messages for the chat template, else text as SFT renders it."""
    D = _data()
    if template == "chat":
        return ([{"role": "system", "content": system}] if system else []) + prompt
    if template == "mistral":
        return D._mistral(system, prompt)
    if template == "alpaca":
        user = "\n\n".join(t["content"] for t in prompt)
        text = D.ALPACA_PROMPT.format(instruction=user)
        return system + "\n\n" + text.split("\n\n", 1)[1] if system else text
    pieces = ([system] if system else []) + [t["content"] for t in prompt if t["content"]]
    return "\n\n".join(pieces) + "\n\n"


def render_answer(turns: list[dict[str, str]], template: str):
    if template == "chat":
        return turns
    text = "\n\n".join(t["content"] for t in turns)
    return " " + text if template == "mistral" else text


def format_pair(row: dict[str, Any], s: P.PreparedData) -> dict[str, Any]:
    """One paired row as trl's DPO/ORPO row: ``{"prompt", "chosen", "rejected"}``."""
    system, prompt, chosen, rejected = pair_parts(row, s)
    return {"prompt": render_prompt(system, prompt, s.template), "chosen": render_answer(chosen, s.template),
            "rejected": render_answer(rejected, s.template)}


def format_unpaired(row: dict[str, Any], s: P.PreparedData) -> list[dict[str, Any]]:
    """One row as trl's KTO rows: ``[{"prompt", "completion", "label"}, ...]``."""
    return [{"prompt": render_prompt(system, prompt, s.template), "completion": render_answer(done, s.template),
             "label": label} for system, prompt, done, label in kto_parts(row, s)]


def _format_batch(batch: dict[str, list], settings: dict[str, Any], unpaired: bool) -> dict[str, list]:
    D = _data()
    s = D.settings_from(settings)
    keys = ("prompt", "completion", "label") if unpaired else ("prompt", "chosen", "rejected")
    out: dict[str, list] = {k: [] for k in keys}
    for row in D._rows(batch):
        examples = format_unpaired(row, s) if unpaired else [format_pair(row, s)]
        for example in examples:
            for k in keys:
                out[k].append(example[k])
    return out


def required_roles(s: P.PreparedData, unpaired: bool) -> None:
    """The mapping maps what the method needs; DataError keyed by role otherwise."""
    D, m = _data(), s.mapping
    if unpaired and not (m["response"] and m["label"]):
        raise D.DataError("KTO needs prompt/completion/label rows (map instruction, response and label) or "
                          "pairs (map chosen and rejected)", where="mapping.label",
                          hint="map the label column (true: a desirable completion), or chosen and rejected")
    if not unpaired and not (m["chosen"] and m["rejected"]):
        missing = " and ".join(r for r in ("chosen", "rejected") if not m[r])
        raise D.DataError(f"a preference run needs the chosen and rejected answers: {missing} is not mapped",
                          where=f"mapping.{'chosen' if not m['chosen'] else 'rejected'}",
                          hint="map the columns of the preferred and the dispreferred answer (Data tab)")


def scan(opened, s: P.PreparedData, unpaired: bool, cancelled=None) -> list[dict[str, Any]]:
    """Every row that cannot train, with its line: ``[{"index", "line", "problem"}]``."""
    D = _data()
    ds = opened.dataset
    files = getattr(opened.resolved, "files", None) or []
    by_line = bool(files) and len(files) == 1 and Path(files[0]).suffix.lower() in _LINE_FORMATS
    bad = []
    for start in range(0, len(ds), 1000):
        if cancelled is not None and cancelled():
            from backend.jobs import JobCancelled

            raise JobCancelled()
        for offset, row in enumerate(D._rows(ds[start:start + 1000])):
            index = start + offset
            try:
                format_unpaired(row, s) if unpaired else format_pair(row, s)
            except (Malformed, D.RowError) as exc:
                where = f" ({exc.where})" if isinstance(exc, D.RowError) and exc.where else ""
                bad.append({"index": index, "line": f"{'line' if by_line else 'row'} {index + 1}",
                            "problem": f"{exc}{where}"})
    return bad


def load_pairs(data: dict[str, Any], home: Path, *, unpaired: bool, malformed: str, progress=None,
               cancelled=None, log=None):
    """The prepared preference dataset: malformed rows reported (and skipped, or the run refused),
    the rest split into train and validation (seeded, as SFT's) and formatted as trl's rows."""
    D = _data()
    log = log or (lambda level, message: None)
    s = D.settings_from(data)
    opened = D.open_source(s.source, home, progress, cancelled)
    required_roles(s, unpaired)
    for role, column in s.mapping.items():
        if column and column not in opened.columns:
            raise D.DataError(f"the {role} role is mapped to column {column!r}, which this dataset does not have",
                              where=f"mapping.{role}", hint=f"its columns are: {', '.join(opened.columns)}")
    if progress:
        progress("checking pairs", 0, 0)
    bad = scan(opened, s, unpaired, cancelled)
    if bad:
        listed = "; ".join(f"{b['line']}: {b['problem']}" for b in bad[:REPORT_LINES])
        more = f" (and {len(bad) - REPORT_LINES} more)" if len(bad) > REPORT_LINES else ""
        if malformed == "refuse":
            raise D.DataError(f"{len(bad)} malformed row(s) of {opened.num_rows}: {listed}{more}",
                              where=f"data.source: {bad[0]['line']}",
                              hint="fix or remove them, or set malformed = \"skip\" to train without them")
        log("warning", f"skipped {len(bad)} malformed row(s) of {opened.num_rows}: {listed}{more}")
    base = opened.dataset
    if bad:
        skip = {b["index"] for b in bad}
        base = base.select([i for i in range(len(base)) if i not in skip])
    validation = None
    if s.split_mode == "ratio":
        n_val = math.ceil(s.validation_ratio * len(base))
        if len(base) - n_val < 1 or n_val < 1:
            raise D.DataError(f"a validation ratio of {s.validation_ratio:g} leaves {len(base) - n_val} train and "
                              f"{n_val} validation rows of {len(base)}", where="settings.validation_ratio",
                              hint="choose another ratio, or no validation")
        parts = base.train_test_split(test_size=n_val, seed=s.seed, shuffle=True)
        base, validation = parts["train"], parts["test"]
    elif s.split_mode == "split":
        D.split_counts(opened, s)  # names a missing split
        validation = opened.splits[s.validation_split]
    kwargs = {"batched": True, "batch_size": 1000, "fn_kwargs": {"settings": P.to_dict(s), "unpaired": unpaired}}
    train = base.map(_format_batch, remove_columns=base.column_names, desc="Formatting train pairs", **kwargs)
    val = None
    if validation is not None:
        val = validation.map(_format_batch, remove_columns=validation.column_names,
                             desc="Formatting validation pairs", **kwargs)
    report = {"train_rows": len(train), "train_skipped": len(bad), "validation_rows": len(val) if val is not None else 0,
              "validation_skipped": 0, "form": "messages" if s.template == "chat" else "text",
              "loss": "completion_only", "malformed": bad[:REPORT_LINES], "malformed_count": len(bad)}
    return D.Prepared(train, val, {}, P.to_dict(s), report)


class PreferenceMethod(TrainingMethod):
    """DPO, ORPO and KTO: preference rows, ``ref_model=None``, an optional adapter to start from."""

    unpaired = False
    uses_reference = True

    def prepare(self, data: dict[str, Any], eff: dict[str, Any], home: Path, progress=None, cancelled=None, log=None):
        m = data.get("mapping") or {}
        # KTO on paired data: the pairs, unpaired the way trl does it (chosen: true, rejected: false).
        unpair = self.unpaired and bool(m.get("chosen") and m.get("rejected")) and not (m.get("response") and m.get("label"))
        prepared = load_pairs(data, home, unpaired=self.unpaired and not unpair,
                              malformed=self.settings(eff)["malformed"], progress=progress, cancelled=cancelled, log=log)
        if unpair:
            from trl.data_utils import unpair_preference_dataset

            prepared.train = unpair_preference_dataset(prepared.train)
            if prepared.validation is not None:
                prepared.validation = unpair_preference_dataset(prepared.validation)
            prepared.report.update(train_rows=len(prepared.train), unpaired=True,
                                   validation_rows=len(prepared.validation) if prepared.validation is not None else 0)
        return prepared

    def trainer_class(self) -> type:
        raise NotImplementedError

    def build_trainer(self, model, tokenizer, eff: dict[str, Any], prepared, args, callbacks: list, log=None):
        has_eval = prepared.validation is not None and len(prepared.validation) > 0
        peft_config = lora_config(eff["lora"])
        start = self.settings(eff)["start_adapter"]
        if start:
            from peft import PeftModel

            # The earlier run's adapter goes on training; trl keeps a frozen copy of it as the
            # reference ("ref" adapter), so the model is in memory once.
            model = PeftModel.from_pretrained(model, str(Path(start).expanduser()), is_trainable=True)
            peft_config = None
            if log is not None:
                log("info", f"starting from the adapter in {start} (its LoRA settings; the lora section is not used)")
        kwargs = dict(model=model, args=args, train_dataset=prepared.train,
                      eval_dataset=prepared.validation if has_eval else None, processing_class=tokenizer,
                      peft_config=peft_config, callbacks=callbacks)
        if self.uses_reference:
            kwargs["ref_model"] = None
        return watched(self.trainer_class())(**kwargs)


def check_start_adapter(path: str) -> str | None:
    """Why ``path`` is no adapter to start from (None when it is one)."""
    if not path:
        return None
    p = Path(path).expanduser()
    if not (p / "adapter_config.json").is_file():
        return f"{p} holds no LoRA adapter (adapter_config.json): choose a finished run's adapter folder"
    return None


# The preview: what trl trains on for one pair ------------------------------------------------------


def is_preference_mapping(mapping: dict[str, Any]) -> bool:
    """True when the mapping makes preference rows (chosen and rejected, or a KTO label)."""
    return bool((mapping.get("chosen") and mapping.get("rejected")) or mapping.get("label"))


def tokenize_side(tokenizer, prompt, answer) -> tuple[list[int], list[int]]:
    """``(ids, mask)`` of prompt + one answer as trl 1.16's DPO/KTO tokenization makes them: the
    prompt (with the generation prompt, for messages) and prompt + answer tokenized apart, the
    answer starting where they diverge; the tokenizer's EOS appended to a text answer; mask 1 on
    the answer's tokens (the loss)."""
    if isinstance(prompt, list):
        def ids_of(messages, generation):
            out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                add_generation_prompt=generation)
            return list(out["input_ids"])

        prompt_ids = ids_of(prompt, True)
        full = ids_of(prompt + answer, False)
    else:
        eos = tokenizer.eos_token
        if eos and not answer.endswith(eos):
            answer += eos
        prompt_ids = list(tokenizer(text=prompt)["input_ids"])
        full = list(tokenizer(text=prompt + answer)["input_ids"])
    D = _data()
    start = D.common_prefix_length(prompt_ids, full)
    return full, [0] * start + [1] * (len(full) - start)


def preview_pair(opened, s: P.PreparedData, index: int, tokenizer, result: dict[str, Any]) -> dict[str, Any]:
    """``data.preview`` of a preference row: ``result["sides"]`` holds each side's training text
    (``chosen``/``rejected``, or KTO's ``completion``) as segments in and out of the loss; the
    top-level segments are the first side's. Problems come back as ``error``, never raised."""
    D = _data()
    unpaired = bool(s.mapping["label"] and s.mapping["response"])
    result.update(form="messages" if s.template == "chat" else "prompt_completion", loss="completion_only",
                  max_length=s.max_length, template=s.template, sides={})
    try:
        result["split"] = D.split_counts(opened, s)
        row = opened.raw_row(index)
        if unpaired:
            example = format_unpaired(row, s)[0]
            sides = {"completion": example["completion"]}
            result["label"] = example["label"]
        else:
            example = format_pair(row, s)
            sides = {"chosen": example["chosen"], "rejected": example["rejected"]}
    except Malformed as exc:
        result["error"] = {"message": f"malformed pair: {exc}", "where": f"row {index}",
                           "hint": "training skips it (or refuses, with malformed = \"refuse\")"}
        return result
    except D.DataError as exc:
        result["error"] = {"message": str(exc), "where": f"row {index}, {exc.where}" if exc.where else f"row {index}",
                           "hint": exc.hint}
        return result
    result["example"] = D._cap(example, 200_000, [D.ROW_BUDGET_CHARS], {}, "example")
    if s.template == "chat" and not getattr(tokenizer, "chat_template", None):
        result["error"] = {"message": f"the tokenizer {result['tokenizer']} has no chat template",
                           "where": "settings.template", "hint": "choose the Mistral, Alpaca or raw template"}
        return result
    try:
        with D._lock_for(tokenizer):
            tokenized = {name: tokenize_side(tokenizer, example["prompt"], answer) for name, answer in sides.items()}
    except Exception as exc:
        result["error"] = {"message": f"the tokenizer's chat template fails on row {index}: {D._root_message(exc)}",
                           "where": f"row {index}", "hint": "choose another template, or fix the row's roles"}
        return result
    for name, (ids, mask) in tokenized.items():
        segments = D._segments(tokenizer, ids, mask, s.max_length)
        loss_tokens = sum(mask[: s.max_length])
        result["sides"][name] = {"segments": segments, "text": "".join(seg["text"] for seg in segments),
                                 "tokens": len(ids), "loss_tokens": loss_tokens, "truncated": len(ids) > s.max_length}
        if not loss_tokens:
            result["warnings"].append(f"the prompt alone fills max_length {s.max_length}: the {name} side has no "
                                      "token in the loss (trl drops such DPO rows; ORPO and KTO train on nothing)")
        elif len(ids) > s.max_length:
            result["warnings"].append(f"the {name} side is {len(ids):,} tokens: {len(ids) - s.max_length:,} beyond "
                                      f"max_length {s.max_length} are cut")
    first = next(iter(result["sides"].values()))
    result.update(segments=first["segments"], text=first["text"], tokens=first["tokens"],
                  loss_tokens=first["loss_tokens"], truncated=first["truncated"])
    return result
