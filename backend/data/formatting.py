"""The one formatter (:func:`format_row`): a row, the mapping and the template make one trl row
(``{"messages"}``, ``{"prompt", "completion"}`` or ``{"text"}``).
"""

from __future__ import annotations

import json
from typing import Any

from backend import protocol as P
from backend.data.sources import RowError, _excerpt
from backend.data.browse import _jsonable
from backend.data.shape import ROLES, SPEAKERS, effective_loss, settings_from, training_form


ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
#: Mistral's end of an assistant turn inside the prompt of a multi-turn row. trl adds the
#: tokenizer's own EOS after the completion, as for every prompt/completion row.
MISTRAL_EOS = "</s>"


# The formatter --------------------------------------------------------------------------------


def _text_of(row: dict[str, Any], column: str, role: str, required: bool) -> str:
    if not column:
        return ""
    value = row.get(column)
    if value is None:
        if required:
            raise RowError(f"the {role} column {column!r} is empty (null)", where=f"column {column}",
                           hint="fix the row, or map another column; training skips such rows")
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(_jsonable(value), ensure_ascii=False)
    return str(value)


def _turns(row: dict[str, Any], s: P.PreparedData) -> tuple[str, list[dict[str, str]], dict[str, str]]:
    """``(system, turns, parts)``: the row as a conversation in the standard roles, plus the
    instruction/context/response parts of non-conversational rows (for Alpaca)."""
    m = s.mapping
    system = _text_of(row, m["system"], "system", False) if m["system"] else ""
    system = system or s.system_prompt
    if m["messages"]:
        column = m["messages"]
        conv = row.get(column)
        if conv is None:
            raise RowError(f"the conversation column {column!r} is empty (null)", where=f"column {column}",
                           hint="training skips such rows")
        if isinstance(conv, str):
            try:
                conv = json.loads(conv)
            except ValueError:
                conv = None
        if not isinstance(conv, list) or not conv:
            raise RowError(f"the conversation column {column!r} does not hold a list of messages",
                           where=f"column {column}", hint="map the messages role to a column of role/content lists")
        turns = []
        for i, msg in enumerate(conv):
            if not isinstance(msg, dict):
                raise RowError(f"message {i} of {column!r} is not an object: {_excerpt(str(msg), 40)}",
                               where=f"column {column}[{i}]")
            speaker = msg.get("role") if msg.get("role") is not None else msg.get("from")
            content = msg.get("content") if "content" in msg else msg.get("value")
            role = SPEAKERS.get(str(speaker).strip().lower()) if speaker is not None else None
            if role is None:
                raise RowError(f"message {i} of {column!r} has an unknown speaker {speaker!r}",
                               where=f"column {column}[{i}]",
                               hint="speakers are user/human, assistant/gpt, system or tool")
            if content is None:
                raise RowError(f"message {i} of {column!r} ({role}) has no content (null)", where=f"column {column}[{i}]",
                               hint="training skips such rows")
            if not isinstance(content, str):
                content = json.dumps(_jsonable(content), ensure_ascii=False)
            turns.append({"role": role, "content": content})
        if turns[0]["role"] == "system":
            system = turns.pop(0)["content"]
            if not turns:
                raise RowError(f"the conversation in {column!r} holds only a system message", where=f"column {column}")
        return system, turns, {}
    instruction = _text_of(row, m["instruction"], "instruction", True)
    context = _text_of(row, m["context"], "context", False)
    user = instruction + ("\n\n" + context if context else "") if instruction else context
    turns = [{"role": "user", "content": user}]
    parts = {"instruction": instruction, "context": context}
    if m["response"]:
        response = _text_of(row, m["response"], "response", True)
        turns.append({"role": "assistant", "content": response})
        parts["response"] = response
    return system, turns, parts


def format_row(row: dict[str, Any], settings: dict[str, Any] | P.PreparedData) -> dict[str, Any]:
    """THE formatter: one source row as the trl row training will use.

    - ``chat``: ``{"messages": [{"role", "content"}, ...]}`` (a system message first when there
      is one); trl applies the tokenizer's chat template.
    - ``mistral``: ``{"prompt": "[INST] ... [/INST]", "completion": " answer"}``; earlier turns of
      a conversation stay in the prompt (``[INST] q [/INST] a</s>[INST] q2 [/INST]``).
    - ``alpaca``: the Alpaca prompt (with or without its Input section) and the response.
    - ``raw``: the columns' text joined by blank lines, the response as the completion.
    - plain text, and rows without a response under the non-chat templates: ``{"text": ...}``.

    trl adds the tokenizer's BOS (when it adds one) and EOS to non-conversational rows itself.
    Raises :class:`RowError` for a row that cannot be formatted.
    """
    s = _checked(settings)
    m = s.mapping
    form = training_form(s)
    if form == "text" and m["text"] and not (m["messages"] or m["instruction"]):
        return {"text": _text_of(row, m["text"], "text", True)}
    system, turns, parts = _turns(row, s)
    loss = effective_loss(s)
    answered = turns[-1]["role"] == "assistant"
    if loss in ("assistant_only", "completion_only") and not any(t["role"] == "assistant" for t in turns):
        raise RowError("this conversation has no assistant message: nothing for the loss to learn",
                       where=f"column {m['messages'] or m['response']}", hint="training skips such rows")
    if s.template == "chat":
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        return {"messages": messages}
    if form == "prompt_completion" and not answered:
        raise RowError("the conversation does not end with an assistant message: there is no completion",
                       where=f"column {m['messages']}", hint="use the chat template for such conversations")
    head, last = (turns[:-1], turns[-1]["content"]) if answered and form == "prompt_completion" else (turns, None)
    if s.template == "mistral":
        prompt = _mistral(system, head)
        return {"prompt": prompt, "completion": " " + last} if last is not None else {"text": prompt}
    if s.template == "alpaca":
        if m["messages"]:
            if len(head) != 1 or head[0]["role"] != "user":
                raise RowError(f"Alpaca has one instruction and one response; this conversation has {len(turns)} messages",
                               where=f"column {m['messages']}", hint="use the chat or Mistral template for conversations")
            instruction, context = head[0]["content"], ""
        else:
            instruction, context = parts["instruction"], parts["context"]
        prompt = (ALPACA_PROMPT_INPUT.format(instruction=instruction, input=context) if context
                  else ALPACA_PROMPT.format(instruction=instruction))
        if system:
            prompt = system + "\n\n" + prompt.split("\n\n", 1)[1]  # the system prompt replaces the preamble
        return {"prompt": prompt, "completion": last} if last is not None else {"text": prompt}
    # raw
    pieces = ([system] if system else []) + [t["content"] for t in head if t["content"]]
    prompt = "\n\n".join(pieces)
    if last is None:
        return {"text": prompt}
    return {"prompt": prompt + "\n\n" if prompt else "", "completion": last}


def _checked(settings: dict[str, Any] | P.PreparedData) -> P.PreparedData:
    """Settings checked once: a PreparedData that came out of :func:`settings_from` (every role
    present in its mapping) is used as it is, so formatting a million rows does not re-check."""
    if isinstance(settings, P.PreparedData) and set(settings.mapping) == set(ROLES) \
            and all(isinstance(v, str) for v in settings.mapping.values()):
        return settings
    return settings_from(settings)


def _mistral(system: str, turns: list[dict[str, str]]) -> str:
    out = []
    prefix = system + "\n\n" if system else ""
    for t in turns:
        if t["role"] == "assistant":
            out.append(f" {t['content']}{MISTRAL_EOS}")
        else:  # user (and tool results) are instructions
            out.append(f"[INST] {prefix}{t['content']} [/INST]")
            prefix = ""
    return "".join(out)

