"""An Ollama Modelfile for an exported GGUF (issue 17): FROM, TEMPLATE, stop parameters, and the
generation defaults.

Ollama renders prompts with Go templates, not with the Jinja chat template a transformers
tokenizer carries; a Modelfile without the right TEMPLATE and stop tokens is why fine-tunes
"answer nonsense or never stop" there. A Jinja template cannot be translated in general, so it
is *measured*: rendered on conversations whose contents are markers, the text around each
message is read off (what comes before the first message with and without a system prompt,
before and after each user and assistant turn, and the generation prompt), and a Go template
built from those pieces (:func:`go_template`). Then the Go template is rendered by
:func:`render_go` (the subset of Go's text/template that it uses) on several conversations and
compared with the Jinja rendering; a template that does not reproduce them exactly is refused
with the first difference, never written.

BOS: when the tokenizer adds BOS by itself (llama.cpp does too, from ``add_bos_token`` in the
GGUF), a chat template's leading BOS text is left out of TEMPLATE, or llama.cpp would see two.
"""

from __future__ import annotations

import json
import re
from typing import Any

from backend.jobs import JobError

#: Marker contents: no template changes text like this (no whitespace to strip, no markup).
_MARK = "QLWMARK{}QLW"
#: Conversations the Go template must render exactly as the Jinja one does.
CHECK_CONVERSATIONS = [
    [("user", "Hi")],
    [("system", "Be brief."), ("user", "Hi")],
    [("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Tea or coffee?")],
    [("system", "You answer in one line."), ("user", "Name a colour."), ("assistant", "Blue."),
     ("user", "Another?"), ("assistant", "Green."), ("user", "And one more?")],
]
# A conversation that ends with an assistant turn is not among them: Ollama treats that turn as
# the start of the answer to continue (no end-of-turn after it), as its own templates do.


def _conv(pairs) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in pairs]


def _render(tokenizer, messages: list[dict[str, str]], gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def _between(text: str, left: str, right: str) -> str:
    i = text.index(left) + len(left)
    return text[i:text.index(right, i)]


class TemplateError(JobError):
    pass


def measure(tokenizer) -> dict[str, str]:
    """The pieces of the chat template around each message: ``head_system`` (before a first
    system message), ``head_user`` (before a first user message), ``system_end``, ``user_start``,
    ``user_end``, ``assistant_start``, ``assistant_end``, ``generation``."""
    m = [_MARK.format(i) for i in range(6)]
    try:
        u = _render(tokenizer, _conv([("user", m[0])]), False)
        u_gen = _render(tokenizer, _conv([("user", m[0])]), True)
        ua = _render(tokenizer, _conv([("user", m[0]), ("assistant", m[1])]), False)
        uau = _render(tokenizer, _conv([("user", m[0]), ("assistant", m[1]), ("user", m[2])]), False)
        su = _render(tokenizer, _conv([("system", m[3]), ("user", m[0])]), False)
    except Exception as exc:
        raise TemplateError(f"the chat template does not render a plain system/user/assistant conversation: {exc}",
                            where="chat_template") from None
    if not u_gen.startswith(u):
        raise TemplateError("the chat template's generation prompt is not added at the end", where="chat_template")
    user_end = u[u.index(m[0]) + len(m[0]):]
    between_ua = _between(ua, m[0], m[1])
    if not between_ua.startswith(user_end):
        raise TemplateError("the text after a user turn differs between the last turn and an earlier one",
                            where="chat_template")
    assistant_end = ua[ua.index(m[1]) + len(m[1]):]
    between_au = _between(uau, m[1], m[2])
    if not between_au.startswith(assistant_end):
        raise TemplateError("the text after an assistant turn differs between the last turn and an earlier one",
                            where="chat_template")
    user_start = between_au[len(assistant_end):]
    head_user = u[:u.index(m[0])]
    between_su = _between(su, m[3], m[0])
    if not between_su.endswith(user_start):
        raise TemplateError("the text before a user turn differs after a system prompt", where="chat_template")
    return {
        "head_system": su[:su.index(m[3])],
        "head_user": head_user,
        "system_end": between_su[:len(between_su) - len(user_start)],
        "user_start": user_start,
        "user_end": user_end,
        "assistant_start": between_ua[len(user_end):],
        "assistant_end": assistant_end,
        "generation": u_gen[len(u):],
    }


def _lit(text: str) -> str:
    """Literal text inside a Go template (a Go string action when it holds template delimiters)."""
    if "{{" in text or "}}" in text:
        return "{{ " + json.dumps(text) + " }}"
    return text


def go_template(pieces: dict[str, str], strip_bos: str = "") -> str:
    """The Go template (Ollama's ``.Messages`` form) from :func:`measure`'s pieces; ``strip_bos``:
    a BOS text to leave out at the start (llama.cpp adds the token itself)."""
    p = dict(pieces)
    for key in ("head_system", "head_user"):
        if strip_bos and p[key].startswith(strip_bos):
            p[key] = p[key][len(strip_bos):]
    # One line, no whitespace trimming ({{- would eat a piece's own newlines).
    return (
        "{{ range $i, $_ := .Messages }}"
        "{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        '{{ if eq .Role "system" }}'
        "{{ if eq $i 0 }}" + _lit(p["head_system"]) + "{{ end }}"
        "{{ .Content }}" + _lit(p["system_end"]) +
        '{{ else if eq .Role "user" }}'
        "{{ if eq $i 0 }}" + _lit(p["head_user"]) + "{{ else }}" + _lit(p["user_start"]) + "{{ end }}"
        "{{ .Content }}" + _lit(p["user_end"]) +
        "{{ if $last }}" + _lit(p["generation"]) + "{{ end }}"
        '{{ else if eq .Role "assistant" }}'
        + _lit(p["assistant_start"]) + "{{ .Content }}{{ if not $last }}" + _lit(p["assistant_end"]) + "{{ end }}"
        "{{ end }}"
        "{{ end }}"
    )


# A small Go text/template interpreter: the subset go_template writes --------------------------------------

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def _tokens(template: str) -> list[tuple[str, str]]:
    """``("text", s)`` and ``("action", s)`` items, with Go's ``{{-``/``-}}`` trimming applied."""
    out: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        if text:
            out.append(("text", text))
        out.append(("action", m.group(2)))
        trim_next = bool(m.group(3))
        pos = m.end()
    text = template[pos:]
    if trim_next:
        text = text.lstrip(" \t\r\n")
    if text:
        out.append(("text", text))
    return out


def _parse(items: list[tuple[str, str]], i: int, stop: tuple[str, ...]) -> tuple[list, int, str]:
    """Nodes until an action starting with one of ``stop``; returns (nodes, index, the stop action)."""
    nodes: list = []
    while i < len(items):
        kind, text = items[i]
        if kind == "text":
            nodes.append(("text", text))
            i += 1
            continue
        head = text.split(None, 1)[0] if text else ""
        if head in stop or (head == "else" and "else" in stop):
            return nodes, i, text
        if head == "if":
            branches = []
            cond = text[2:].strip()
            i += 1
            while True:
                body, i, end = _parse(items, i, ("else", "end"))
                branches.append((cond, body))
                i += 1
                if end == "end":
                    break
                rest = end[4:].strip()
                cond = rest[2:].strip() if rest.startswith("if") else "true"
            nodes.append(("if", branches))
        elif head == "range":
            spec = text[5:].strip()
            m = re.fullmatch(r"\$(\w+),\s*\$(\w*)\s*:=\s*(.+)", spec)
            if not m:
                raise ValueError(f"unsupported range: {spec}")
            body, i, _ = _parse(items, i + 1, ("end",))
            i += 1
            nodes.append(("range", m.group(1), m.group(3), body))
        else:
            nodes.append(("action", text))
            i += 1
    return nodes, i, ""


def _split_args(expr: str) -> list[str]:
    out, depth, cur, in_str = [], 0, "", False
    i = 0
    while i < len(expr):
        c = expr[i]
        if in_str:
            cur += c
            if c == "\\":
                cur += expr[i + 1]
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
            cur += c
        elif c == "(":
            depth += 1
            cur += c
        elif c == ")":
            depth -= 1
            cur += c
        elif c.isspace() and depth == 0:
            if cur:
                out.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    if cur:
        out.append(cur)
    return out


def _eval(expr: str, scope: dict[str, Any]) -> Any:
    expr = expr.strip()
    args = _split_args(expr)
    if len(args) > 1:
        fn, rest = args[0], [_eval(a, scope) for a in args[1:]]
        if fn == "eq":
            return any(rest[0] == r for r in rest[1:])
        if fn == "len":
            return len(rest[0])
        if fn == "slice":
            return rest[0][rest[1]:rest[2] if len(rest) > 2 else None]
        if fn == "not":
            return not rest[0]
        if fn == "and":
            return all(rest)
        if fn == "or":
            return next((r for r in rest if r), rest[-1])
        raise ValueError(f"unsupported function {fn}")
    if expr.startswith("(") and expr.endswith(")"):
        return _eval(expr[1:-1], scope)
    if expr.startswith('"'):
        return json.loads(expr)
    if expr == "true":
        return True
    if re.fullmatch(r"-?\d+", expr):
        return int(expr)
    if expr.startswith("$"):
        name, _, path = expr[1:].partition(".")
        value = scope["$" + name] if name else scope["$"]
    elif expr.startswith("."):
        value, path = scope["."], expr[1:]
    else:
        raise ValueError(f"unsupported expression {expr}")
    for part in filter(None, path.split(".")):
        value = value.get(part, "") if isinstance(value, dict) else getattr(value, part)
    return value


def _run(nodes: list, scope: dict[str, Any], out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "action":
            text = node[1]
            m = re.fullmatch(r"\$(\w+)\s*:=\s*(.+)", text)
            if m:
                scope["$" + m.group(1)] = _eval(m.group(2), scope)
            else:
                value = _eval(text, scope)
                out.append("" if value is None else str(value))
        elif kind == "if":
            for cond, body in node[1]:
                if _eval(cond, scope):
                    _run(body, scope, out)
                    break
        elif kind == "range":
            for i, item in enumerate(_eval(node[2], scope)):
                inner = {**scope, "$" + node[1]: i, ".": item}
                _run(node[3], inner, out)


def render_go(template: str, messages: list[dict[str, str]]) -> str:
    """``template`` rendered as Ollama would with ``.Messages``: the subset of Go's text/template
    that :func:`go_template` writes (range with index, if/else if/else, eq, len, slice, not,
    variables, whitespace trimming)."""
    # Ollama's messages are Go structs: .Role, .Content
    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages], "System": "", "Prompt": ""}
    nodes, _, _ = _parse(_tokens(template), 0, ())
    out: list[str] = []
    _run(nodes, {"$": data, ".": data}, out)
    return "".join(out)


def ollama_template(tokenizer, add_bos: bool) -> str:
    """The Go TEMPLATE of ``tokenizer``'s chat template, checked on :data:`CHECK_CONVERSATIONS`:
    Go text (+ BOS when llama.cpp adds it) == the Jinja rendering with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the tokenizer has no chat template", where="tokenizer_config.json",
                            hint="train with a chat template (the Data pane's templates) or add one to the tokenizer")
    bos = tokenizer.bos_token if add_bos and tokenizer.bos_token else ""
    template = go_template(measure(tokenizer), strip_bos=bos)
    for pairs in CHECK_CONVERSATIONS:
        messages = _conv(pairs)
        want = _render(tokenizer, messages, pairs[-1][0] != "assistant")
        got = render_go(template, messages)
        if bos and want.startswith(bos) and not got.startswith(bos):
            got = bos + got
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise TemplateError(f"the chat template could not be written as an Ollama template: on a "
                                f"{len(pairs)}-message conversation the two differ at character {at} "
                                f"({want[max(0, at - 20):at + 20]!r} vs {got[max(0, at - 20):at + 20]!r})",
                                where="chat_template",
                                hint="write TEMPLATE in the Modelfile by hand; the GGUF itself carries the chat "
                                     "template, which llama.cpp applies")
    return template


def _quote(value: str) -> str:
    return json.dumps(value)


def modelfile(gguf_name: str, template: str, stops: list[str], params: dict[str, Any], system: str = "") -> str:
    """The Modelfile text: FROM the GGUF beside it, TEMPLATE, stop and generation parameters."""
    lines = [f"# Written by qlw for {gguf_name}: `ollama create NAME -f Modelfile` in this folder.",
             f"FROM ./{gguf_name}", "", f'TEMPLATE """{template}"""', ""]
    if system:
        lines.append(f'SYSTEM """{system}"""')
        lines.append("")
    for stop in stops:
        lines.append(f"PARAMETER stop {_quote(stop)}")
    for key, value in params.items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"


def generation_parameters(folder_config: dict[str, Any], chat: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ollama's parameters from the model's generation_config.json, else qlw's Chat settings
    (``chat``: a ``ChatSettings`` dict; its defaults when None)."""
    from backend import protocol as P

    chat = {**P.to_dict(P.ChatSettings()), **(chat or {})}
    gen = folder_config or {}
    sample = gen.get("do_sample", chat.get("do_sample", True))
    out: dict[str, Any] = {}
    if sample:
        out["temperature"] = gen.get("temperature", chat["temperature"])
        out["top_p"] = gen.get("top_p", chat["top_p"])
        out["top_k"] = gen.get("top_k", chat["top_k"])
    else:
        out["temperature"] = 0
    out["repeat_penalty"] = gen.get("repetition_penalty", chat["repetition_penalty"])
    return out
