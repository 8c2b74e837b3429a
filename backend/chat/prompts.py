"""Chat's text: answers cleaned for the terminal (:func:`clean_text`), settings and targets
(:func:`chat_settings`, :func:`parse_target`), and the prompt a conversation becomes
(:func:`resolve_template`, :func:`build_prompt`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from backend import protocol as P
from backend.jobs import JobError


# Text for the terminal -----------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
#: Bidirectional overrides and isolates (they reorder what the terminal shows), the replacement
#: character of undecodable bytes, and non-characters.
_INVISIBLE = re.compile("[\u202a-\u202e\u2066-\u2069\ufffd\ufffe\uffff]")


def clean_text(text: str) -> str:
    """Model output as safe terminal text: escape sequences and control bytes removed (newlines
    and tabs kept, ``\\r`` as a newline), lone surrogates, bidi overrides and the replacement
    character of undecodable bytes dropped."""
    if not text:
        return ""
    text = _ANSI.sub("", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = text.encode("utf-8", "ignore").decode("utf-8")  # lone surrogates
    return _INVISIBLE.sub("", text)


# Settings and targets ------------------------------------------------------------------------------


def chat_settings(data: dict[str, Any] | P.ChatSettings | None) -> P.ChatSettings:
    """A :class:`~backend.protocol.ChatSettings` from plain data, checked; JobError for a bad field."""
    if isinstance(data, P.ChatSettings):
        return data
    data = dict(data or {})
    names = {f.name for f in fields(P.ChatSettings)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise JobError(f"unknown chat setting(s): {', '.join(unknown)}", where="settings",
                       hint=f"settings are {', '.join(sorted(names))}")
    s = P.ChatSettings(**data)
    checks = [
        ("max_new_tokens", isinstance(s.max_new_tokens, int) and 1 <= s.max_new_tokens <= 32768, "1 to 32768"),
        ("temperature", isinstance(s.temperature, (int, float)) and s.temperature > 0, "above 0"),
        ("top_p", isinstance(s.top_p, (int, float)) and 0 < s.top_p <= 1, "in (0, 1]"),
        ("top_k", isinstance(s.top_k, int) and s.top_k >= 0, "0 (off) or more"),
        ("repetition_penalty", isinstance(s.repetition_penalty, (int, float)) and s.repetition_penalty > 0, "above 0"),
        ("seed", isinstance(s.seed, int), "an integer"),
        ("template", s.template == "auto" or s.template in P.DATA_TEMPLATES,
         f"auto or one of {', '.join(P.DATA_TEMPLATES)}"),
    ]
    for name, ok, want in checks:
        if not ok:
            raise JobError(f"chat setting {name} = {getattr(s, name)!r} must be {want}", where=f"settings.{name}")
    return s


@dataclass
class Target:
    """A parsed target id."""

    id: str
    kind: str  # base | tuned | merged
    path: str = ""

    @property
    def label(self) -> str:
        if self.kind == "base":
            return "base"
        p = Path(self.path)
        if self.kind == "merged":
            return f"merged ({p.name})"
        # A session's adapter is named by its run folder, a checkpoint by run and step.
        tail = f"{p.parent.parent.name}/{p.name}" if p.name.startswith("checkpoint-") else p.parent.name or p.name
        return f"tuned ({tail})"


def parse_target(target: str) -> Target:
    """``base``, ``tuned:<adapter folder>`` or ``merged:<folder>``; JobError otherwise."""
    text = (target or "").strip()
    if text == "base":
        return Target("base", "base")
    kind, sep, path = text.partition(":")
    if sep and kind in ("tuned", "merged") and path.strip():
        folder = Path(path.strip()).expanduser()
        try:
            folder = folder.resolve()
        except OSError:
            pass
        return Target(f"{kind}:{folder}", kind, str(folder))
    raise JobError(f"unknown chat target {target!r}", where="target",
                   hint="use base, tuned:<adapter folder> or merged:<model folder> (chat.targets lists them)")


# Prompts ---------------------------------------------------------------------------------------------


def _run_data_section(adapter_path: str) -> dict[str, Any]:
    """The data section of the run config of the session that trained this adapter ({} if none)."""
    from backend import adapters, train_config as TC

    run = adapters._run_folder(Path(adapter_path))
    if run is None:
        return {}
    config, errors = TC.read_toml(run / "config.toml")
    data = config.get("data") if "file" not in errors else None
    return data if isinstance(data, dict) else {}


def resolve_template(settings: P.ChatSettings, tokenizer, adapter_path: str = "") -> tuple[str, str]:
    """(template, system prompt) for this conversation: an explicit template as asked; ``auto``:
    the run's data template (and its system prompt) when the adapter's session has one, else the
    tokenizer's chat template, else raw text."""
    system = settings.system_prompt
    if settings.template != "auto":
        return settings.template, system
    if adapter_path:
        data = _run_data_section(adapter_path)
        if data.get("template") in P.DATA_TEMPLATES:
            return data["template"], system or str(data.get("system_prompt") or "")
    return ("chat" if getattr(tokenizer, "chat_template", None) else "raw"), system


def _conversation(messages: list[dict[str, Any]], system: str) -> tuple[str, list[dict[str, str]]]:
    """(system, turns): checked roles and text; the conversation must end with a user turn."""
    if not isinstance(messages, list) or not messages:
        raise JobError("no messages to answer", where="messages", hint="send the conversation ending with a user turn")
    turns: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise JobError(f"message {i} is not an object", where=f"messages[{i}]")
        role, content = msg.get("role"), msg.get("content")
        if role not in ("user", "assistant", "system"):
            raise JobError(f"message {i} has role {role!r}", where=f"messages[{i}].role",
                           hint="roles are user, assistant and system")
        if not isinstance(content, str):
            raise JobError(f"message {i} has no text content", where=f"messages[{i}].content")
        if role == "system":
            system = system or content
            continue
        turns.append({"role": role, "content": content})
    if not turns or turns[-1]["role"] != "user":
        raise JobError("the conversation must end with a user message", where="messages",
                       hint="append the new user turn to the history")
    return system, turns


def build_prompt(tokenizer, messages: list[dict[str, Any]], template: str, system: str = "") -> tuple[list[int], str]:
    """The prompt's token ids and text, formatted the way training formatted its rows
    (backend/data/): the tokenizer's chat template with the generation prompt, Mistral's
    ``[INST]`` format, the Alpaca prompt, or the turns' text joined by blank lines."""
    from backend import data as D

    system, turns = _conversation(messages, system)
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise JobError("this tokenizer has no chat template", where="settings.template",
                           hint="choose the mistral, alpaca or raw template")
        msgs = ([{"role": "system", "content": system}] if system else []) + turns
        out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
        ids = list(out["input_ids"])
        return ids, tokenizer.decode(ids)
    if template == "mistral":
        text = D._mistral(system, turns)
    elif template == "alpaca":
        pieces = []
        for i, t in enumerate(turns):
            if t["role"] == "user":
                prompt = D.ALPACA_PROMPT.format(instruction=t["content"])
                if system:
                    prompt = system + "\n\n" + prompt.split("\n\n", 1)[1]
                pieces.append(prompt)
            else:
                pieces.append(t["content"] + (tokenizer.eos_token or "") + "\n\n")
        text = "".join(pieces)
    elif template == "raw":
        text = "\n\n".join(([system] if system else []) + [t["content"] for t in turns if t["content"]]) + "\n\n"
    else:
        raise JobError(f"unknown template {template!r}", where="settings.template",
                       hint=f"auto or one of {', '.join(P.DATA_TEMPLATES)}")
    return list(tokenizer(text=text)["input_ids"]), text

