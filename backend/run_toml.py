"""Run configs as TOML files and ``QLW_*`` environment overrides: writing a config
(``dumps_toml``), reading one with each error at its file line (``loads_toml``, ``read_toml``),
and the environment's values over a file's (``env_overrides``, ``apply_env``). The checks
themselves are ``backend.train_config``'s; its module re-exports these names."""

from __future__ import annotations

import copy
import json
import math
import re
import tomllib
from typing import Any, Mapping

from backend import protocol as P
from backend.train_config import ENV_PREFIX, RULES, TOP_LEVEL, Errors, _unknown, defaults, normalise


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value if v is not None]
    return value


DEFAULTS_NOTE = (
    "# The defaults: model.source = \"\" is the embedded tiny model (built on first use) and\n"
    "# data.source.path = \"\" the shipped sample dataset; name yours (a folder or Hub id, a data file).\n"
    "# logging_steps, eval_steps and save_steps below 1 are fractions of the run (0.01: every 1% of the steps).\n"
    "# bf16/fp16 are left out: unset, they follow the model's compute dtype and the device.\n")


def dumps_toml(config: Mapping[str, Any], defaults_note: bool = False) -> str:
    """A run config as TOML (unset fields such as ``bf16 = None`` are left out: absent means unset);
    ``defaults_note`` adds what the defaults mean (``qlw train --print-config``)."""
    method = config.get("method", "sft")
    ordered = _strip_none({k: config[k] for k in TOP_LEVEL
                           if k in config and (k not in P.METHOD_SETTINGS or k == method)})
    head = ("# qlw run config: `qlw train THIS_FILE.toml` runs it; the Train pane imports it.\n"
            "# Field names are those of peft's LoraConfig, trl's SFTConfig/DPOConfig/KTOConfig/ORPOConfig\n"
            "# and transformers; method = \"sft\", \"dpo\", \"orpo\" or \"kto\".\n"
            + (DEFAULTS_NOTE if defaults_note else ""))
    try:
        import tomli_w
    except ImportError:  # an environment without it (a bare GPU image): the run config's shape is simple
        return head + _plain_toml(ordered)
    return head + tomli_w.dumps(ordered, multiline_strings=True)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _plain_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """TOML for nested tables of scalars and lists (what a run config holds), without tomli_w."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in data.items():
        if isinstance(v, Mapping):
            name = f"{prefix}.{k}" if prefix else k
            out += f"\n[{name}]\n" + _plain_toml(v, name)
    return out


def key_lines(text: str) -> dict[str, int]:
    """The line (1-based) where each dotted key is set in TOML ``text``, and where each table
    starts (a light reading of the file, good for ``key = value`` lines under ``[table]``
    headers, which is what :func:`dumps_toml` writes)."""
    out: dict[str, int] = {}
    table: list[str] = []
    header = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\"' -]+?)\s*\]\s*(#.*)?$")
    assign = re.compile(r"^\s*([A-Za-z0-9_\-\"'. ]+?)\s*=")
    for n, line in enumerate(text.splitlines(), 1):
        h = header.match(line)
        if h and not line.lstrip().startswith("[["):
            table = [p.strip().strip("\"'") for p in h.group(1).split(".")]
            out.setdefault(".".join(table), n)
            continue
        a = assign.match(line)
        if a:
            key = [p.strip().strip("\"'") for p in a.group(1).split(".")]
            out.setdefault(".".join(table + key), n)
    return out


def _line_of(path: str, lines: dict[str, int]) -> int | None:
    parts = path.split(".")
    while parts:
        found = lines.get(".".join(parts))
        if found:
            return found
        parts.pop()
    return None


def loads_toml(text: str, environ: Mapping[str, str] | None = None) -> tuple[dict[str, Any], Errors]:
    """``(config, errors)`` from TOML ``text`` (then environment overrides, when ``environ`` is
    given). Errors are keyed by field and say the line: ``"lora.r": "must be ... (line 12)"``;
    a syntax error is keyed ``"toml"`` with tomllib's line and column."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return defaults(), {"toml": f"not valid TOML: {exc}"}
    env_errors: Errors = {}
    if environ is not None:
        raw, env_errors = apply_env(raw, environ)
    config, errors = normalise(raw)
    lines = key_lines(text)
    located: Errors = {}
    for path, message in errors.items():
        line = _line_of(path, lines)
        located[path] = f"{message} (line {line})" if line and path not in env_errors else message
    located.update(env_errors)
    return config, located


def read_toml(path, environ: Mapping[str, str] | None = None) -> tuple[dict[str, Any], Errors]:
    """:func:`loads_toml` of a file; a file that cannot be read is an error keyed ``"file"``."""
    from pathlib import Path

    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return defaults(), {"file": f"{p}: no such file"}
    except (OSError, UnicodeDecodeError) as exc:
        return defaults(), {"file": f"{p}: cannot be read ({exc})"}
    return loads_toml(text, environ)


# Environment -----------------------------------------------------------------------------------------


def _parse_env_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        low = text.strip().lower()
        if low in ("true", "yes", "on"):
            return True
        if low in ("false", "no", "off"):
            return False
        return text


def env_overrides(environ: Mapping[str, str]) -> tuple[list[tuple[list[str], Any, str]], Errors]:
    """``QLW_<SECTION>__<FIELD>[__<KEY>]`` variables as ``[(path, value, variable)]`` plus errors
    for variables that name no section or field. Variables without ``__`` (``QLW_HOME``) are not
    config overrides."""
    out, errors = [], {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        section = path[0]
        if section not in RULES:
            errors[name] = f"{name}: no section {section!r}; sections are {', '.join(RULES)}"
            continue
        if len(path) < 2 or path[1] not in RULES[section]:
            field = path[1] if len(path) > 1 else ""
            errors[f"{section}.{field}"] = f"{name}: {_unknown(section, field, list(RULES[section]))}"
            continue
        nested_ok = section == "data" and path[1] in ("source", "mapping")
        if len(path) > 2 and not (nested_ok and len(path) == 3):
            errors[".".join(path)] = f"{name}: {'.'.join(path)} is not a field"
            continue
        out.append((path, _parse_env_value(environ[name]), name))
    return out, errors


def apply_env(raw: Mapping[str, Any], environ: Mapping[str, str]) -> tuple[dict[str, Any], Errors]:
    """``raw`` with the environment's overrides applied (before normalising)."""
    raw = copy.deepcopy(dict(raw))
    overrides, errors = env_overrides(environ)
    for path, value, _name in overrides:
        node = raw.setdefault(path[0], {})
        if not isinstance(node, dict):
            continue  # normalise reports the section
        if len(path) == 3:
            inner = node.get(path[1])
            if isinstance(inner, str) and path[1] == "source":
                inner = {"path": inner}
            if not isinstance(inner, dict):
                inner = {}
            inner[path[2]] = value if path[1] == "mapping" or isinstance(value, str) else str(value)
            node[path[1]] = inner
        else:
            node[path[1]] = value
    return raw, errors
