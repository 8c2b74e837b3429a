"""Chat's targets and transcripts, its jobs, and the server's side: :class:`ChatRoom` answers the
chat.* requests; :func:`register` adds them to the server (``backend.evaluate.register`` adds the
eval.* requests through the same room).
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

from backend import protocol as P
from backend.holdings import HOLDINGS
from backend.jobs import JobCancelled, JobError
from backend.chat.prompts import (
    Target, _conversation, build_prompt, chat_settings, parse_target, resolve_template,
)
from backend.chat.engine import ChatEngine, ENGINE, HOLD_MERGED


# Targets, transcripts ------------------------------------------------------------------------------------


def _new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(4)}"


def merged_folders(home: Path) -> list[Path]:
    """Merged model folders of the data home: ``merged/<name>`` (where the Merge tab writes) and
    ``runs/<session>/merged*``."""
    home = Path(home)
    candidates = list((home / "merged").iterdir()) if (home / "merged").is_dir() else []
    if (home / "runs").is_dir():
        for run in (home / "runs").iterdir():
            if run.is_dir():
                candidates += [d for d in run.iterdir() if d.name.startswith("merged")]
    found = [d for d in candidates if d.is_dir() and (d / "config.json").is_file()]
    return sorted(found, key=lambda d: d.stat().st_mtime, reverse=True)


def list_targets(home: Path, engine: "ChatEngine | None" = None) -> dict[str, Any]:
    """The ``chat.targets`` reply: the base, every adapter and checkpoint, merged folders."""
    from backend import adapters, models

    engine = engine or ENGINE
    base = engine.base()
    source = models._LOADED.get("source") if base is not None else None
    settings = models._LOADED.get("settings") or {}
    targets = [{"id": "base", "label": f"base ({source})" if source else "base (none loaded)", "kind": "base",
                "path": settings.get("source", "") if base is not None else "", "session": "", "step": None,
                "base_source": source, "loaded": base is not None}]
    attached = set(engine.attached())
    for a in adapters.list_adapters(home):
        what = f"step {a['step']}" if a["kind"] == "checkpoint" else "adapter"
        targets.append({"id": f"tuned:{a['path']}", "label": f"tuned: {a['session'] or Path(a['path']).parent.name} {what}",
                        "kind": "tuned", "path": a["path"], "session": a["session"], "name": a.get("name", ""),
                        "step": a["step"],
                        "base_source": a["base_model"], "loaded": a["path"] in attached})
    held = HOLDINGS.get(HOLD_MERGED)
    for d in merged_folders(home):
        targets.append({"id": f"merged:{d.resolve()}", "label": f"merged: {d.parent.name}/{d.name}", "kind": "merged",
                        "path": str(d.resolve()), "session": d.parent.name, "step": None, "base_source": "",
                        "loaded": held is not None and held["path"] == str(d.resolve())})
    return {"targets": targets, "base_loaded": base is not None, "base_source": source,
            "fast_path": engine.fast_path_state()}


def transcript(events: list[tuple[str, dict[str, Any]]], conversation: str) -> list[dict[str, Any]]:
    """The answers of one conversation, in order: each chat.answer with its chat.started's
    settings, messages and time."""
    started = {p["answer_id"]: p for kind, p in events if kind == "chat.started" and p.get("conversation") == conversation}
    out = []
    for kind, p in events:
        if kind == "chat.answer" and p.get("conversation") == conversation:
            s = started.get(p["answer_id"], {})
            out.append({**p, "settings": s.get("settings", {}), "time": s.get("time"),
                        "messages": s.get("messages", []), "prompt_tokens": s.get("prompt_tokens")})
    return out


def transcript_markdown(answers: list[dict[str, Any]], conversation: str) -> str:
    lines = [f"# qlw chat {conversation}", ""]
    last_turn = None
    for a in answers:
        turn = (len(a.get("messages") or []), a.get("prompt"))
        if turn != last_turn:
            lines += ["## User", "", a.get("prompt", ""), ""]
            last_turn = turn
        facts = (f"{a['tokens']} tokens, {a['tokens_per_s']:.1f} tokens/s, first token {a['ttft_s']:.2f} s, "
                 f"{a['path']} path, {a['finish_reason']}")
        lines += [f"## {parse_target(a['target']).label}", "", f"_{facts}_", "", a.get("text", ""), ""]
    return "\n".join(lines).rstrip() + "\n"


def transcript_jsonl(answers: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers)


# Jobs ------------------------------------------------------------------------------------------------------


def send_job(params: P.ChatSend, home: Path, conversation: str, answer_ids: list[str], engine: "ChatEngine | None" = None):
    """The ``chat.send`` job: answer with the target, then with ``compare_with``."""
    engine = engine or ENGINE
    settings = chat_settings(params.settings)
    targets = [parse_target(params.target)] + ([parse_target(params.compare_with)] if params.compare_with else [])
    _conversation(params.messages, settings.system_prompt)  # a bad conversation is refused before the job

    def run(ctx) -> dict[str, Any]:
        prompt = params.messages[-1]["content"]
        adapter = next((t.path for t in targets if t.kind == "tuned"), "")
        summaries = []
        for target, answer_id in zip(targets, answer_ids):
            if ctx.cancelled:
                break
            try:
                engine.prepare(target, home, ctx)
                tokenizer = engine.tokenizer_for(target)
                template, system = resolve_template(settings, tokenizer, adapter)
                ids, _text = build_prompt(tokenizer, params.messages, template, system)
            except Exception as exc:
                _emit_failed(ctx, answer_id, conversation, target, prompt, exc)
                raise
            ctx.emit("chat.started", {"answer_id": answer_id, "conversation": conversation, "target": target.id,
                                      "prompt_tokens": len(ids), "settings": P.to_dict(settings), "time": time.time(),
                                      "messages": params.messages, "template": template})
            result = engine.answer(target, ids, settings, cancelled=lambda: ctx.cancelled,
                                   on_delta=lambda text, aid=answer_id: ctx.emit("chat.delta", {"answer_id": aid, "text": text}))
            payload = {"answer_id": answer_id, "conversation": conversation, "target": target.id, "prompt": prompt,
                       **{k: result[k] for k in ("text", "tokens", "ttft_s", "tokens_per_s", "elapsed_s", "stopped",
                                                  "finish_reason", "path", "error")}}
            ctx.emit("chat.answer", payload)
            summaries.append({k: payload[k] for k in ("answer_id", "target", "tokens", "tokens_per_s", "ttft_s",
                                                       "finish_reason", "path")})
            if result["error"]:
                raise JobError(f"generation failed on {target.label}: {result['error']}", where=target.id,
                               hint="see the backend log; free memory (ctrl+f) and try again")
        return {"conversation": conversation, "answers": summaries}

    return run


def _emit_failed(ctx, answer_id: str, conversation: str, target: Target, prompt: str, exc: Exception) -> None:
    ctx.emit("chat.answer", {"answer_id": answer_id, "conversation": conversation, "target": target.id,
                             "prompt": prompt, "text": "", "tokens": 0, "ttft_s": 0.0, "tokens_per_s": 0.0,
                             "elapsed_s": 0.0, "stopped": isinstance(exc, JobCancelled),
                             "finish_reason": "stopped" if isinstance(exc, JobCancelled) else "error",
                             "path": "", "error": str(exc)})


def load_job(target: Target, home: Path, engine: "ChatEngine | None" = None):
    """The ``chat.load`` job."""
    engine = engine or ENGINE

    def run(ctx) -> dict[str, Any]:
        return engine.prepare(target, home, ctx)

    return run


# The server's side ---------------------------------------------------------------------------------------


class ChatRoom:
    """The chat requests of one backend, and what evaluation shares with them: the refusal while
    a job holds the GPU, the export paths, the session's events and the last evaluation's rows."""

    def __init__(self, server):
        self.server = server
        self.conversation = _new_id("c")
        self.last_eval: list[dict[str, Any]] = []

    def busy(self, what: str) -> P.Reply | None:
        """A refusal naming the job that holds the GPU, or None when none runs."""
        job = self.server.jobs.current if self.server.jobs else None
        if job is None:
            return None
        since = time.strftime("%H:%M:%S", time.localtime(job.started))
        if job.kind == "train.start":
            reason = f"a train.start job ({job.job_id}, since {since}) holds the GPU: {what} after it ends or stop it"
        else:
            reason = f"a {job.kind} job ({job.job_id}, since {since}) is running: {what} when it ends, or stop it"
        return P.Reply("", "refused", {"job": job.to_dict()}, reason=reason)

    def _start(self, method: str, params: Any, fn) -> P.Reply:
        refusal = self.busy("chat" if method.startswith("chat") else "evaluate")
        return refusal or self.server._start_job(method, params, fn)

    @staticmethod
    def _bad(exc: JobError) -> P.Reply:
        reason = str(exc) + (f" ({exc.where})" if exc.where else "") + (f": {exc.hint}" if exc.hint else "")
        return P.Reply("", "error", {"error": {"message": str(exc), "where": exc.where, "hint": exc.hint}},
                       reason=reason, code=P.BAD_MESSAGE)

    async def targets(self, client, params: P.ChatTargets) -> P.Reply:
        import asyncio

        return P.Reply("", "ok", await asyncio.to_thread(list_targets, self.server.home))

    async def load(self, client, params: P.ChatLoad) -> P.Reply:
        try:
            target = parse_target(params.target)
        except JobError as exc:
            return self._bad(exc)
        return self._start("chat.load", params, load_job(target, self.server.home))

    async def send(self, client, params: P.ChatSend) -> P.Reply:
        conversation = params.conversation or self.conversation
        n = 2 if params.compare_with else 1
        answer_ids = [_new_id("a") for _ in range(n)]
        try:
            fn = send_job(params, self.server.home, conversation, answer_ids)
        except JobError as exc:
            return self._bad(exc)
        reply = self._start("chat.send", params, fn)
        if reply.status == "accepted":
            reply.result.update(answer_ids=answer_ids, conversation=conversation)
        return reply

    async def clear(self, client, params: P.ChatClear) -> P.Reply:
        self.conversation = _new_id("c")
        return P.Reply("", "ok", {"conversation": self.conversation})

    def _export_target(self, text: str, overwrite: bool) -> Path | P.Reply:
        """Where an export goes (a relative path: under ``<home>/exports``, never out of it), or
        the refusal: a path that leaves exports/, a folder, an existing file without ``overwrite``."""
        text = (text or "").strip()
        if not text or "\0" in text:
            return P.Reply("", "refused", reason="no file name given: name the file to write")
        path = Path(text).expanduser()
        if not path.is_absolute():
            base = (self.server.home / "exports").resolve()
            path = (base / path).resolve()
            if not path.is_relative_to(base) or path == base:
                return P.Reply("", "refused", {"path": str(path)},
                               reason=f"{text} leads outside {base}: give a file name under exports/, or an absolute path")
        if path.is_dir():
            return P.Reply("", "refused", {"path": str(path)}, reason=f"{path} is a folder: name a file")
        if path.exists() and not overwrite:
            return P.Reply("", "refused", {"path": str(path)}, code=P.CONFIRM,
                           reason=f"{path} exists: confirm to overwrite it")
        return path

    def _events(self, kinds: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
        """Events of these kinds from the current session, then the recent others (oldest first)."""
        store = self.server.store
        sessions = [self.server.current_session] if self.server.current_session else []
        sessions += [s.id for s in store.read_sessions(50) if s.id not in sessions]
        out = []
        for sid in reversed(sessions):
            out += [(e.kind, e.payload) for e in store.read_events(sid) if e.kind in kinds]
        return out

    async def export(self, client, params: P.ChatExport) -> P.Reply:
        import asyncio

        if params.format not in P.CHAT_EXPORT_FORMATS:
            return P.Reply("", "error", reason=f"format must be one of {', '.join(P.CHAT_EXPORT_FORMATS)}",
                           code=P.BAD_MESSAGE)
        conversation = params.conversation or self.conversation
        path = self._export_target(params.path, params.overwrite)
        if isinstance(path, P.Reply):
            return path

        def write() -> int:
            answers = transcript(self._events(("chat.started", "chat.answer")), conversation)
            text = transcript_markdown(answers, conversation) if params.format == "markdown" else transcript_jsonl(answers)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            return len(answers)

        try:
            n = await asyncio.to_thread(write)
        except OSError as exc:
            return P.Reply("", "error", {"path": str(path)}, reason=f"cannot write {path}: {exc}", code=P.FAILED)
        return P.Reply("", "ok", {"path": str(path), "answers": n, "conversation": conversation})


#: Jobs that use the held base model as loaded: chat lets go of it before they run.
RELEASE_BEFORE = ("train.start", "model.load")


def register(server) -> ChatRoom:
    """Add the chat requests to ``server`` (``backend.evaluate.register`` adds eval.* beside them,
    through this room); chat's adapters and decode copy are
    let go before a training run or another base model uses the held base."""
    room = ChatRoom(server)
    server.chat = room
    server.handlers.update({
        "chat.targets": room.targets,
        "chat.load": room.load,
        "chat.send": room.send,
        "chat.clear": room.clear,
        "chat.export": room.export,
    })
    # Training and model.load use HOLDINGS["base"] as they find it: their jobs first take chat's
    # LoRA layers out of it and drop the decode copy (its memory is the training run's now).
    server.before_job(RELEASE_BEFORE, ENGINE.release)
    return room
