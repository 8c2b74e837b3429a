"""Shape and mapping: :func:`detect_shape` guesses a role -> column mapping (dolly, Alpaca,
prompt/completion, messages, ShareGPT, preference, plain text), and the checked
:class:`~backend.protocol.PreparedData` settings built from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from backend import protocol as P
from backend.data.sources import DataError, source_dict


ROLES = P.DATA_ROLES
TEMPLATES = P.DATA_TEMPLATES

#: Shapes we recognise, with the words the pane and ``qlw data`` use for them.
SHAPES = {
    "dolly": "instruction/context/response (databricks-dolly)",
    "alpaca": "instruction/input/output (Alpaca)",
    "prompt_completion": "prompt/completion",
    "instruction_response": "instruction/response",
    "prompt_only": "prompts only, no response",
    "messages": "conversations: messages with role/content",
    "sharegpt": "ShareGPT conversations with from/value",
    "text": "plain text",
    "preference": "prompt/chosen/rejected preference pairs (DPO, ORPO)",
    "preference_messages": "chosen/rejected conversations (HH-RLHF, UltraFeedback)",
    "unpaired_preference": "prompt/completion/label rows (KTO)",
    "unknown": "not recognised: map the roles by hand",
}
#: Shapes that train a preference method (DPO, ORPO, KTO), not SFT.
PREFERENCE_SHAPES = ("preference", "preference_messages", "unpaired_preference")

#: Column names that suggest a role (lower case), best first.
ROLE_NAMES = {
    "instruction": ("instruction", "instructions", "prompt", "question", "query", "user", "human", "input_text"),
    "context": ("context", "input", "passage", "background", "document"),
    "response": ("response", "output", "completion", "answer", "target", "assistant", "reply", "output_text"),
    "system": ("system", "system_prompt", "system_message"),
    "text": ("text", "content", "body", "document_text", "raw_text", "sentence"),
    "chosen": ("chosen", "preferred", "chosen_response", "response_chosen", "winner"),
    "rejected": ("rejected", "dispreferred", "rejected_response", "response_rejected", "loser"),
    "label": ("label", "desirable", "is_desirable", "kto_label"),
}
#: Speaker names of conversation datasets -> the chat roles of a template.
SPEAKERS = {
    "user": "user", "human": "user", "prompter": "user", "usr": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "chatgpt": "assistant", "bard": "assistant", "gpt4": "assistant",
    "system": "system", "tool": "tool", "function": "tool", "ipython": "tool",
}


# Shape detection ------------------------------------------------------------------------------


def _conversation_keys(value: Any) -> str | None:
    """``"messages"`` for a list of role/content dicts, ``"sharegpt"`` for from/value."""
    if not isinstance(value, list) or not value or not isinstance(value[0], dict):
        return None
    keys = {k for k, v in value[0].items() if v is not None}
    if {"role", "content"} <= keys:
        return "messages"
    if {"from", "value"} <= keys:
        return "sharegpt"
    return None


def empty_mapping() -> dict[str, str]:
    return {role: "" for role in ROLES}


def detect_shape(columns: list[str], sample: list[dict[str, Any]],
                 types: dict[str, str] | None = None) -> tuple[str, dict[str, str], list[str]]:
    """Recognise the dataset's shape from its column names (and, for conversations, the first
    rows' values): ``(shape, mapping role -> column, notes)``."""
    types = types or {}
    mapping = empty_mapping()
    notes: list[str] = []
    lower = {c.lower(): c for c in columns}

    def pick(role: str, exclude: tuple[str, ...] = ()) -> str:
        for name in ROLE_NAMES[role]:
            if name in lower and lower[name] not in exclude and lower[name] not in mapping.values():
                return lower[name]
        return ""

    chosen, rejected = pick("chosen"), pick("rejected")
    if chosen and rejected:  # preference pairs (before conversations: their sides may be message lists)
        mapping.update(chosen=chosen, rejected=rejected)
        conversational = any(_conversation_keys(r.get(chosen)) for r in sample)
        mapping["instruction"] = pick("instruction")
        mapping["system"] = pick("system")
        if conversational:
            notes.append("chosen/rejected conversations: the messages both sides share are the prompt")
        return ("preference_messages" if conversational else "preference"), mapping, notes
    label = pick("label")
    if label and "completion" in lower and "prompt" in lower:
        mapping.update(instruction=lower["prompt"], response=lower["completion"], label=label)
        mapping["system"] = pick("system")
        return "unpaired_preference", mapping, notes

    for column in columns:  # a conversation column wins over everything else
        kind = next((k for k in (_conversation_keys(r.get(column)) for r in sample) if k), None)
        if kind:
            mapping["messages"] = column
            mapping["system"] = pick("system")
            return kind, mapping, notes

    has = lambda *names: all(n in lower for n in names)  # noqa: E731
    if has("instruction", "context", "response"):
        shape = "dolly"
        mapping.update(instruction=lower["instruction"], context=lower["context"], response=lower["response"])
    elif has("instruction", "output"):
        shape = "alpaca"
        mapping.update(instruction=lower["instruction"], response=lower["output"],
                       context=lower.get("input", ""))
    elif has("prompt", "completion"):
        shape = "prompt_completion"
        mapping.update(instruction=lower["prompt"], response=lower["completion"])
    else:
        instruction = pick("instruction")
        response = pick("response")
        if not instruction and response and "input" in lower:
            instruction = lower["input"]
        if instruction and response:
            shape = "instruction_response"
            mapping.update(instruction=instruction, response=response)
            mapping["context"] = pick("context")
        elif instruction:
            shape = "prompt_only"
            mapping["instruction"] = instruction
            notes.append(f"no response column: rows are prompts ({instruction!r}); training learns the prompt text")
        else:
            text = pick("text")
            strings = [c for c in columns if types.get(c, "string") == "string"]
            if not text and len(strings) == 1:
                text = strings[0]
                notes.append(f"one text column, {text!r}: taken as plain text")
            if text:
                shape = "text"
                mapping["text"] = text
            else:
                shape = "unknown"
                notes.append(f"no column looks like an instruction, a response, a conversation or text "
                             f"(columns: {', '.join(columns) or 'none'}): map the roles by hand")
    mapping["system"] = mapping["system"] or pick("system")
    return shape, mapping, notes


# Settings -------------------------------------------------------------------------------------


def settings_from(data: dict[str, Any] | P.PreparedData) -> P.PreparedData:
    """A checked :class:`~backend.protocol.PreparedData` (every role in ``mapping``, "" when
    unmapped). Raises :class:`DataError` naming the bad setting."""
    if isinstance(data, P.PreparedData):
        data = P.to_dict(data)
    try:
        s = P.build(P.PreparedData, data, "settings")
    except P.ProtocolError as exc:
        raise DataError(exc.message, where="settings") from None
    source = source_dict(s.source)
    unknown = sorted(set(s.mapping) - set(ROLES))
    if unknown:
        raise DataError(f"unknown role(s) in the mapping: {', '.join(unknown)}", where="settings.mapping",
                        hint=f"roles are {', '.join(ROLES)}")
    mapping = {}
    for role in ROLES:
        value = s.mapping.get(role) or ""
        if not isinstance(value, str):
            raise DataError(f"the {role} role must name a column, got {value!r:.40}", where=f"settings.mapping.{role}")
        mapping[role] = value
    for name, value, allowed in (("template", s.template, TEMPLATES), ("loss", s.loss, P.DATA_LOSSES),
                                 ("split_mode", s.split_mode, P.DATA_SPLIT_MODES)):
        if value not in allowed:
            raise DataError(f"{name} must be one of {', '.join(allowed)}, got {value!r:.40}", where=f"settings.{name}")
    if s.split_mode == "ratio" and not 0 < s.validation_ratio < 1:
        raise DataError(f"validation_ratio must be between 0 and 1, got {s.validation_ratio:g}",
                        where="settings.validation_ratio", hint="e.g. 0.1 for 10% validation rows")
    if s.split_mode == "split" and not s.validation_split:
        raise DataError("split_mode 'split' needs validation_split (the name of a split of the source)",
                        where="settings.validation_split")
    if s.max_length < 1:
        raise DataError(f"max_length must be at least 1, got {s.max_length}", where="settings.max_length")
    return dataclasses.replace(s, source=source, mapping=mapping)


def default_settings(summary: dict[str, Any], template: str = "chat") -> P.PreparedData:
    """The settings the pane starts from for an opened source: its detected mapping."""
    src = summary["source"]
    return P.PreparedData(source={"path": src["path"], "config": src.get("config", ""), "split": src.get("split", "")},
                          mapping=dict(summary["mapping"]), template=template)


def check_mapping(s: P.PreparedData, columns: list[str]) -> None:
    """Every mapped column exists, and the mapping says where the text is. Raises DataError."""
    m = s.mapping
    for role in ROLES:
        column = m.get(role)
        if column and column not in columns:
            raise DataError(f"the {role} role is mapped to column {column!r}, which this dataset does not have",
                            where=f"mapping.{role}", hint=f"its columns are: {', '.join(columns)}")
    if not (m["messages"] or m["instruction"] or m["text"]):
        raise DataError("nothing is mapped: no instruction, conversation (messages) or text column",
                        where="mapping", hint="map a column to instruction (and response), messages, or text")


def training_form(s: P.PreparedData) -> str:
    """Which trl dataset type the settings make: ``messages``, ``prompt_completion`` or ``text``."""
    m = s.mapping
    if m["text"] and not (m["messages"] or m["instruction"]):
        return "text"
    if s.template == "chat":
        return "messages"
    if m["messages"] or m["response"]:
        return "prompt_completion"
    return "text"


def effective_loss(s: P.PreparedData) -> str:
    """The loss the settings mean: ``assistant_only``, ``completion_only`` or ``all``."""
    form = training_form(s)
    answered = bool(s.mapping["messages"] or s.mapping["response"])
    if s.loss == "auto":
        if form == "messages":
            return "assistant_only" if answered else "all"
        return "completion_only" if form == "prompt_completion" else "all"
    if s.loss == "assistant_only" and form != "messages":
        raise DataError("assistant-only loss needs conversational rows: choose the chat template",
                        where="settings.loss", hint="or use completion-only loss with the Mistral, Alpaca or raw template")
    if s.loss == "assistant_only" and not answered:
        raise DataError("assistant-only loss needs a response or conversation column: these rows have no answer",
                        where="settings.loss", hint="map a response column, or train on all tokens")
    if s.loss == "completion_only" and form != "prompt_completion":
        raise DataError("completion-only loss needs prompt/completion rows: the Mistral, Alpaca or raw template "
                        "with a response column", where="settings.loss",
                        hint="with the chat template, use assistant-only loss")
    return s.loss


def sft_config_kwargs(settings: dict[str, Any] | P.PreparedData) -> dict[str, Any]:
    """The ``trl.SFTConfig`` settings that go with the prepared dataset's rows."""
    s = settings_from(settings)
    loss = effective_loss(s)
    return {
        "max_length": s.max_length,
        "truncation_mode": "keep_start",
        "assistant_only_loss": loss == "assistant_only",
        "completion_only_loss": loss == "completion_only",
        "dataset_text_field": "text",
    }

