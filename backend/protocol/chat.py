"""Chat and evaluation (backend/chat/, backend/evaluate.py, tui/widgets/chat/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backend.protocol.core import event, request


# --------------------------------------------------------------------------------------------
# Chat and evaluation (backend/chat/, backend/evaluate.py, tui/widgets/chat/).
#
# A *target* is a string id: ``"base"`` (the held base model, adapter switched off),
# ``"tuned:<adapter folder>"`` (the held base with that adapter switched on: a session's adapter
# or a checkpoint) or ``"merged:<folder>"`` (a merged model folder, loaded on its own). Base and
# tuned share ONE loaded base: the adapter is switched on and off, never a second copy.

#: What a target id starts with.
CHAT_TARGET_KINDS = ("base", "tuned", "merged")
#: Why an answer ended.
CHAT_FINISH_REASONS = ("eos", "length", "stopped", "error")
#: Formats of ``chat.export`` and ``eval.export``.
CHAT_EXPORT_FORMATS = ("markdown", "jsonl")
EVAL_EXPORT_FORMATS = ("markdown", "csv")


@dataclass
class ChatSettings:
    """How an answer is generated (transformers' ``generate`` names). ``template``: ``auto`` (the
    run's data template when the adapter's session has one, else the tokenizer's chat template),
    or one of ``DATA_TEMPLATES``. ``system_prompt`` empty: the run's own system prompt, if any."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    do_sample: bool = True
    seed: int = 0
    system_prompt: str = ""
    template: str = "auto"


@request("chat.targets")
class ChatTargets:
    """What can be talked to: ``{"targets": [{"id", "label", "kind", "path", "session", "step",
    "base_source", "loaded"}], "base_loaded", "base_source", "fast_path"}`` (the base, every
    adapter and checkpoint of the data home, and merged folders)."""


@request("chat.load")
class ChatLoad:
    """Job: make ``target`` ready (load the base if needed, from the adapter's run config; attach
    the adapter; or load the merged folder, in the dtype it was saved in when it fits beside the
    base); result ``{"target", "load_s", "fast_path", "path"}`` plus ``steps`` (seconds: base,
    adapter, fast path) for base and tuned, ``precision`` and ``note`` for a merged folder."""

    target: str


@request("chat.send")
class ChatSend:
    """Job: answer ``messages`` (the whole conversation, ending with the new user turn) with
    ``target`` (and then ``compare_with``, when given) under ``settings`` (:class:`ChatSettings`
    fields). Accepted with ``{"job_id", "session", "answer_ids"}``; refused while another job
    (e.g. training) holds the GPU. Stop with ``job.cancel``. Events: ``chat.started``, several
    ``chat.delta``, ``chat.answer`` per target."""

    target: str
    messages: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    compare_with: str = ""
    conversation: str = ""


@request("chat.clear")
class ChatClear:
    """Start a new conversation: ``{"conversation": new id}``."""

    conversation: str = ""


@request("chat.export")
class ChatExport:
    """Write a conversation's transcript (``conversation`` empty: the current one) as Markdown or
    JSONL (``CHAT_EXPORT_FORMATS``): ``{"path", "answers": n}``. A relative ``path`` is under
    ``<home>/exports`` (and may not leave it); an existing file is refused with code ``confirm``
    unless ``overwrite``."""

    path: str
    format: str = "markdown"
    conversation: str = ""
    overwrite: bool = False


@request("eval.run")
class EvalRun:
    """Job: evaluate ``targets`` on the same inputs: size on disk, load time, generation time
    (mean and std over ``runs`` runs of ``prompts``; empty: a built-in set), peak memory, and
    perplexity on ``text_path`` (empty: the validation split of the target's run). One
    ``eval.row`` per target; result ``{"rows": [...], "markdown"}``."""

    targets: list[str]
    prompts: list[str] = field(default_factory=list)
    runs: int = 3
    max_new_tokens: int = 64
    text_path: str = ""


@request("eval.export")
class EvalExport:
    """Write the last evaluation's rows as Markdown or CSV (``EVAL_EXPORT_FORMATS``): ``{"path"}``.
    The path rules of ``chat.export`` apply (under ``<home>/exports``; ``overwrite`` to replace)."""

    path: str
    format: str = "markdown"
    overwrite: bool = False


@event("chat.started")
class ChatStarted:
    """An answer began: the prompt's token count and the settings in force."""

    answer_id: str
    conversation: str
    target: str
    prompt_tokens: int
    settings: dict[str, Any]
    time: float
    #: The conversation sent (so a transcript can be redrawn from events alone).
    messages: list[dict[str, Any]] = field(default_factory=list)
    template: str = ""


@event("chat.delta", ephemeral=True)
class ChatDelta:
    """New text of an answer since the last delta, coalesced (at least ~50 ms apart)."""

    answer_id: str
    text: str


@event("chat.answer")
class ChatAnswer:
    """An answer ended: its whole (cleaned) text, tokens, time to first token, tokens/s,
    ``finish_reason`` (``CHAT_FINISH_REASONS``) and ``path``: ``fast`` (the bf16 decode copy,
    compiled with a static cache) or ``plain`` (the loaded model, with peft for an adapter)."""

    answer_id: str
    conversation: str
    target: str
    prompt: str
    text: str
    tokens: int
    ttft_s: float
    tokens_per_s: float
    elapsed_s: float
    stopped: bool
    finish_reason: str
    path: str
    error: str = ""


@event("eval.row")
class EvalRow:
    """One target's evaluation figures (``None`` where not measured)."""

    target: str
    label: str
    size_bytes: int | None
    load_s: float | None
    gen_mean_s: float | None
    gen_std_s: float | None
    tokens_per_s: float | None
    peak_bytes: int | None
    perplexity: float | None
    ppl_tokens: int
    runs: int
    device: str
    path: str = ""
    note: str = ""

