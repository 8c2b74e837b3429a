"""Chat: talk to the base model, a tuned adapter or a merged folder, token by token.

One base model is loaded (``HOLDINGS["base"]``); a tuned target is that base with a LoRA adapter
attached by peft and switched on, the base target the same model inside peft's
``disable_adapter()`` context: never a second copy of the base in memory for the plain path.

The fast path. Batch-1 decoding of a bitsandbytes 4-bit model is bound by the CPU (kernel
launches and the dequantisation per layer): 20-35 tokens/s for a 7B on an H100, 12 through
peft with an unmerged adapter. When the base is 4-bit on a GPU and a 16-bit copy fits in free
memory, chat builds a *decode copy*: the same architecture with plain ``nn.Linear`` layers whose
weights are the 4-bit weights dequantised (the values the 4-bit model computes with), and decodes
with a static KV cache (transformers then compiles the forward, CUDA graphs included). For a
tuned target the adapter is merged into that copy in place (``W + B @ A * scaling``, in fp32,
then cast); switching target rewrites the weights in place, so the compiled graph stays valid.
The copy is held in ``HOLDINGS["chat.decode"]`` (``gpu.free`` drops it) and rebuilt when the
base changes. The plain path (the 4-bit model, peft for an adapter) is the fallback, and every
answer says which path produced it.

Generation runs in one long-lived thread (compiled CUDA graphs are recorded per thread), tokens
are read from a ``TextIteratorStreamer`` by the job thread, cleaned for the terminal and sent as
``chat.delta`` events at most every ``DELTA_INTERVAL_S``; a stopping criterion polls the job's
``cancelled`` so a stop ends the answer within a token or two.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import secrets
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

from backend import protocol as P
from backend.holdings import HOLDINGS
from backend.jobs import JobCancelled, JobError

log = logging.getLogger("qlw.chat")

#: Deltas are coalesced to at most one per this many seconds (the last one always goes).
DELTA_INTERVAL_S = 0.05
#: ``QLW_CHAT_FAST``: ``0`` turns the fast path off; ``1`` also allows it on the CPU (tests, --smoke).
FAST_ENV = "QLW_CHAT_FAST"
#: Room kept free beside the decode copy (KV cache, compile workspaces, CUDA graph pools).
FAST_MARGIN_BYTES = 2 * 1024**3
#: The static KV cache is sized in steps of this many tokens, at least ``CACHE_MIN`` (where the
#: model's positions allow). Each step costs every decoded token: sdpa with a mask repeats the
#: key/value heads over the whole cache (a 7B's 1,024 slots: ~1 GB of memory traffic per token,
#: ~7% of its weights). A conversation that outgrows the cache gets a larger one and one more
#: compile (dynamo then marks the length dynamic, so later sizes only re-record CUDA graphs).
CACHE_BUCKET = 1024
CACHE_MIN = 1024
GIB = 1024**3
#: transformers ``CompileConfig`` fields for the decode copy (None: transformers' default,
#: inductor with CUDA graphs, on GPUs only). Set (e.g. ``{"backend": "aot_eager", "mode": None}``)
#: it also compiles on the CPU: how the tests check that one compile serves every answer.
COMPILE_OVERRIDE: dict[str, Any] | None = None

HOLD_PEFT = "chat.peft"
HOLD_DECODE = "chat.decode"
HOLD_MERGED = "chat.merged"


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
    (backend/data.py): the tokenizer's chat template with the generation prompt, Mistral's
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


# Generation --------------------------------------------------------------------------------------------

_GEN_POOL: ThreadPoolExecutor | None = None
_GEN_LOCK = threading.Lock()


def _gen_pool() -> ThreadPoolExecutor:
    """The one generation thread: compiled CUDA graphs are recorded per thread, so every
    generate call (and the warm-up) runs on the same one."""
    global _GEN_POOL
    with _GEN_LOCK:
        if _GEN_POOL is None:
            _GEN_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qlw-generate")
        return _GEN_POOL


def _streamer(tokenizer):
    from transformers import TextIteratorStreamer

    class Streamer(TextIteratorStreamer):
        """Counts tokens and notes when the first one arrived."""

        def __init__(self):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.tokens = 0
            self.first_at: float | None = None
            self._prompt_seen = False

        def put(self, value):
            if not self._prompt_seen:
                self._prompt_seen = True
            else:
                if self.first_at is None:
                    self.first_at = time.perf_counter()
                self.tokens += int(value.numel())
            super().put(value)

    return Streamer()


def _stop_criteria(cancelled: Callable[[], bool]):
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnCancel(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), bool(cancelled()), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopOnCancel()])


def generation_kwargs(settings: P.ChatSettings, tokenizer) -> dict[str, Any]:
    """transformers ``generate`` arguments for these settings."""
    kw: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "do_sample": bool(settings.do_sample),
                          "repetition_penalty": float(settings.repetition_penalty)}
    if settings.do_sample:
        kw.update(temperature=float(settings.temperature), top_p=float(settings.top_p), top_k=int(settings.top_k))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        kw["pad_token_id"] = pad
    return kw


def stream_generate(model, tokenizer, input_ids: list[int], settings: P.ChatSettings, *,
                    cancelled: Callable[[], bool] = lambda: False,
                    on_delta: Callable[[str], None] | None = None,
                    context: Callable[[], Any] = nullcontext,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate an answer with ``model.generate`` in the generation thread, reading its text from
    a streamer here: ``on_delta(text)`` gets the cleaned new text at most every
    ``DELTA_INTERVAL_S``. ``context()`` is entered in the generation thread around the call (e.g.
    peft's ``disable_adapter``). Returns text, tokens, ttft_s, elapsed_s, tokens_per_s,
    finish_reason, stopped, error."""
    import torch

    device = _device_of(model)
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)
    streamer = _streamer(tokenizer)
    kwargs = {**generation_kwargs(settings, tokenizer), **(extra or {})}
    kwargs.update(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                  stopping_criteria=_stop_criteria(cancelled))

    def run():
        torch.manual_seed(settings.seed)
        try:
            with torch.no_grad(), context():
                return model.generate(**kwargs)
        finally:
            streamer.end()  # an exception must not leave the reader waiting

    t0 = time.perf_counter()
    future = _gen_pool().submit(run)
    raw, sent, last_emit = "", "", 0.0
    done = False
    while not done:
        try:
            chunk = streamer.text_queue.get(timeout=DELTA_INTERVAL_S)
        except queue.Empty:
            if future.done() and streamer.text_queue.empty():
                break
            chunk = ""  # no new text: still send what the interval held back
        if chunk is streamer.stop_signal:
            done = True
        elif chunk:  # the streamer yields empty chunks: nothing to show
            raw += chunk
        now = time.perf_counter()
        if on_delta is not None and len(raw) > len(sent) and (done or now - last_emit >= DELTA_INTERVAL_S):
            cleaned = clean_text(raw)
            delta = cleaned[len(sent):]
            if delta:
                on_delta(delta)
                sent = cleaned
                last_emit = now
    error = ""
    out = None
    try:
        out = future.result()
    except Exception as exc:  # reported in the answer; the caller decides what else to do
        error = f"{type(exc).__name__}: {exc}"
        log.exception("generation failed")
    elapsed = time.perf_counter() - t0
    tokens = int(out.shape[1] - ids.shape[1]) if out is not None else streamer.tokens
    if error:
        reason = "error"
    elif cancelled():
        reason = "stopped"
    elif tokens and _ends_with_eos(out, model, tokenizer):
        reason = "eos"
    elif tokens >= settings.max_new_tokens:
        reason = "length"
    else:
        reason = "eos"
    ttft = (streamer.first_at - t0) if streamer.first_at is not None else elapsed
    return {"text": clean_text(raw), "tokens": tokens, "ttft_s": round(ttft, 4), "elapsed_s": round(elapsed, 4),
            "tokens_per_s": round(tokens / elapsed, 3) if elapsed > 0 and tokens else 0.0,
            "finish_reason": reason, "stopped": reason == "stopped", "error": error,
            "output_ids": out[0, ids.shape[1]:].tolist() if out is not None else []}


def _ends_with_eos(out, model, tokenizer) -> bool:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    return bool(eos) and int(out[0, -1]) in eos


def _device_of(model):
    try:
        return next(model.parameters()).device
    except StopIteration:
        return "cpu"


# The decode copy ------------------------------------------------------------------------------------------


def forget_compiled() -> None:
    """Drop what ``torch.compile`` keeps for the decode copy: its compiled code and the CUDA
    graphs with their memory pools, which are recorded per thread (the generation thread) and
    would otherwise keep the copy's memory after the copy itself is gone."""
    import sys

    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:
        return
    if threading.current_thread().name.startswith("qlw-generate"):
        dynamo.reset()
        return
    try:
        _gen_pool().submit(dynamo.reset).result(timeout=120)
    except RuntimeError as exc:  # the interpreter is shutting down: nothing left to free for
        log.debug("torch.compile caches not reset: %s", exc)
    except Exception:  # freeing must not fail because of the compiler's caches
        log.exception("resetting torch.compile's caches failed")


def apply_compile_override(model) -> None:
    """:data:`COMPILE_OVERRIDE` into ``model``'s generation config (the tests' CPU compile)."""
    if COMPILE_OVERRIDE is not None:
        from transformers import CompileConfig

        compile_config = CompileConfig(**COMPILE_OVERRIDE)
        compile_config._compile_all_devices = True
        model.generation_config.compile_config = compile_config


class FastPathUnavailable(Exception):
    """Why the fast path cannot serve this model or adapter (said in ``fast_path``: "off: ...")."""


def _plain_model(model):
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _linear4bit_class():
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb.nn.Linear4bit


def quantized_linears(model) -> dict[str, Any]:
    """name -> bitsandbytes ``Linear4bit`` of the transformers model under ``model`` (a LoRA
    layer's ``base_layer`` is reported under the LoRA layer's name)."""
    cls = _linear4bit_class()
    if cls is None:
        return {}
    found = {}
    for name, module in _plain_model(model).named_modules():
        base = getattr(module, "base_layer", module)
        if isinstance(base, cls) and not name.endswith(".base_layer"):
            found[name] = base
    return found


def compute_dtype_of(model):
    import torch

    for lin in quantized_linears(model).values():
        return getattr(lin, "compute_dtype", None) or torch.bfloat16
    return getattr(_plain_model(model), "dtype", torch.float32)


def decode_copy_bytes(model, dtype=None) -> int:
    """Bytes the decode copy adds beside ``model``: its dequantised linear weights (the other
    tensors are shared with the 4-bit model when their dtype matches)."""
    import torch

    dtype = dtype or compute_dtype_of(model)
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for lin in quantized_linears(model).values():
        total += int(lin.in_features) * int(lin.out_features) * size
    for p in _plain_model(model).parameters():
        if p.dtype != dtype and not isinstance(p, _params4bit_class()):
            total += p.numel() * size
    return total


def _params4bit_class():
    try:
        import bitsandbytes as bnb
        return bnb.nn.Params4bit
    except ImportError:  # pragma: no cover
        return type(None)


def lora_deltas(peft_model, adapter: str) -> dict[str, tuple]:
    """module name -> (A, B, scaling, fan_in_fan_out) of ``adapter`` in a PeftModel; raises
    :class:`FastPathUnavailable` for what a merge into plain linear weights cannot express."""
    from peft.tuners.lora import LoraLayer

    cfg = peft_model.peft_config.get(adapter)
    if cfg is not None and getattr(cfg, "modules_to_save", None):
        raise FastPathUnavailable("the adapter trains whole modules (modules_to_save)")
    out = {}
    for name, module in _plain_model(peft_model).named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter in getattr(module, "lora_embedding_A", {}):
            raise FastPathUnavailable("the adapter has LoRA on an embedding")
        if adapter not in module.lora_A:
            continue
        if module.use_dora.get(adapter, False):
            raise FastPathUnavailable("DoRA adapters are served on the plain path")
        out[name] = (module.lora_A[adapter].weight, module.lora_B[adapter].weight, float(module.scaling[adapter]),
                     bool(getattr(module, "fan_in_fan_out", False)))
    if not out:
        raise FastPathUnavailable("the adapter has no LoRA linear layers")
    return out


class DecodeCopy:
    """A plain (16- or 32-bit) copy of a 4-bit model for fast decoding; see the module docstring.

    Tensors other than the quantised linear weights are shared with the source model (when their
    dtype matches); :meth:`materialise` writes the base weights, or the base plus a LoRA delta,
    into the copy in place.
    """

    def __init__(self, source, dtype=None):
        import copy

        import torch
        from transformers import AutoModelForCausalLM

        plain_src = _plain_model(source)
        self.source_ref = weakref.ref(plain_src)
        self.dtype = dtype or compute_dtype_of(source)
        self.quantized = quantized_linears(source)
        config = copy.deepcopy(plain_src.config)
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                try:
                    delattr(config, attr)
                except AttributeError:
                    pass
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        src_modules = dict(plain_src.named_modules())
        device = _device_of(plain_src)
        self.linear_params: dict[str, Any] = {}
        self.shared_linear: dict[str, Any] = {}  # name -> source nn.Linear whose weight is shared
        for mname, module in model.named_modules():
            src = src_modules.get(mname)
            if src is None:
                raise FastPathUnavailable(f"the copy has a module {mname!r} the model lacks")
            base = getattr(src, "base_layer", src)
            for pname, param in list(module.named_parameters(recurse=False)):
                if mname in self.quantized and pname == "weight":
                    new = torch.empty(param.shape, dtype=self.dtype, device=device)
                    self.linear_params[mname] = new
                else:
                    ref = getattr(base, pname)
                    new = ref.detach() if ref.dtype == self.dtype else ref.detach().to(self.dtype)
                    if pname == "weight" and isinstance(base, torch.nn.Linear):
                        self.shared_linear[mname] = base
                module._parameters[pname] = torch.nn.Parameter(new, requires_grad=False)
            for bname, buf in list(module.named_buffers(recurse=False)):
                module._buffers[bname] = getattr(base, bname).detach().clone() if buf is not None else None
            for attr, value in list(vars(module).items()):  # e.g. rotary's original_inv_freq
                if isinstance(value, torch.Tensor) and value.is_meta and hasattr(base, attr):
                    setattr(module, attr, getattr(base, attr))
        leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if leftover:
            raise FastPathUnavailable(f"could not fill {leftover[0]} of the copy")
        model.generation_config = copy.deepcopy(plain_src.generation_config)
        apply_compile_override(model)
        model.eval()
        self.model = model
        self.state = ""  # what the weights hold now: "base" or "tuned:<adapter>"
        self.cache = None
        self.materialise(None, "base")
        # However the copy goes (chat's release, gpu.free dropping every holding), its compiled
        # graphs go with it.
        weakref.finalize(self, forget_compiled).atexit = False  # at exit the process frees it all

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.linear_params.values())

    def source_alive(self, model) -> bool:
        return self.source_ref() is _plain_model(model)

    def materialise(self, deltas: dict[str, tuple] | None, state: str) -> float:
        """Write base weights (``deltas`` None) or base + LoRA deltas into the copy, in place;
        returns the seconds it took."""
        import torch
        import bitsandbytes.functional as BF

        if state == self.state:
            return 0.0
        t0 = time.perf_counter()
        deltas = deltas or {}
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for name, dst in self.linear_params.items():
                lin = self.quantized[name]
                w = BF.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
                dst.copy_(self._with_delta(w, deltas.get(name)))
            for name, d in deltas.items():
                if name in self.linear_params:
                    continue
                src = self.shared_linear.get(name)
                if src is None:
                    raise FastPathUnavailable(f"LoRA module {name} is not a linear layer of the copy")
                owned = torch.empty_like(src.weight, dtype=self.dtype)
                modules[name]._parameters["weight"] = torch.nn.Parameter(owned, requires_grad=False)
                self.linear_params[name] = owned
                self.quantized.pop(name, None)
                self.shared_linear.pop(name)
                self._owned_plain = getattr(self, "_owned_plain", {})
                self._owned_plain[name] = src
                owned.copy_(self._with_delta(src.weight, d))
            for name, src in getattr(self, "_owned_plain", {}).items():
                if name not in deltas:
                    self.linear_params[name].copy_(src.weight.to(self.dtype))
        self.state = state
        return time.perf_counter() - t0

    def _with_delta(self, w, d):
        if d is None:
            return w.to(self.dtype)
        import torch

        a, b, scaling, fan_in_fan_out = d
        delta = (b.detach().to(device=w.device, dtype=torch.float32) @ a.detach().to(device=w.device, dtype=torch.float32)) * scaling
        if fan_in_fan_out:
            delta = delta.T
        return (w.to(torch.float32) + delta).to(self.dtype)

    def static_cache(self, need: int):
        """A static KV cache of at least ``need`` tokens (reused while big enough, so the compiled
        decode step is reused), reset for a new answer; None where transformers lacks one."""
        self.cache, self.cache_len, cache = reuse_static_cache(self.model, self.cache, getattr(self, "cache_len", 0), need)
        return cache


def reuse_static_cache(model, cache, cache_len: int, need: int):
    """``(cache, its length, the cache to pass or None)``: ``cache`` reset when it holds ``need``
    tokens, else a new static cache of ``need`` rounded up to ``CACHE_BUCKET`` tokens (at least
    ``CACHE_MIN``), so that the compiled decode step sees the same shapes answer after answer."""
    try:
        from transformers import StaticCache
    except ImportError:  # pragma: no cover
        return cache, cache_len, None
    size = -(-need // CACHE_BUCKET) * CACHE_BUCKET
    positions = getattr(model.config, "max_position_embeddings", None) or CACHE_MIN
    size = max(size, min(CACHE_MIN, positions))
    if cache is None or cache_len < size:
        try:
            cache = StaticCache(config=model.config, max_cache_len=size)
        except TypeError:
            return None, 0, None
        cache_len = size
    else:
        cache.reset()
    return cache, cache_len, cache


def merged_fast_allowed(model) -> str:
    """"" when a merged (plain 16-bit) model may decode with a static cache and the compiled
    decode step, as the decode copy does; else why not."""
    import torch

    env = os.environ.get(FAST_ENV, "").strip()
    if env == "0":
        return f"{FAST_ENV}=0"
    if quantized_linears(model) or getattr(model, "is_quantized", False):
        return "it is quantized: it decodes as loaded"
    dtype = getattr(model, "dtype", None)
    if dtype not in (torch.bfloat16, torch.float16) and env != "1":
        return f"it is in {str(dtype).replace('torch.', '')}: the compiled decode step is for 16-bit weights"
    device = _device_of(model)
    if getattr(device, "type", str(device)) != "cuda" and env != "1":
        return "the model is on the CPU"
    return ""


def fast_allowed(model) -> str:
    """"" when the fast path may serve ``model``; else why not (for ``fast_path``: "off: ...")."""
    env = os.environ.get(FAST_ENV, "").strip()
    if env == "0":
        return f"{FAST_ENV}=0"
    if not quantized_linears(model):
        return "the base is not 4-bit (bitsandbytes): it decodes as loaded"
    device = _device_of(model)
    on_cuda = getattr(device, "type", str(device)) == "cuda"
    if not on_cuda and env != "1":
        return "the model is on the CPU"
    need = decode_copy_bytes(model)
    free = _free_bytes(device)
    if free is not None and need + FAST_MARGIN_BYTES + need // 10 > free:
        return (f"a {need / GIB:.1f} GiB decode copy does not fit in {free / GIB:.1f} GiB free "
                f"(free memory, or use the plain path)")
    return ""


def _free_bytes(device) -> int | None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover
        return None


# The engine: targets made ready, and answered -------------------------------------------------------------


def _adapter_name(path: str) -> str:
    import hashlib

    return "a" + hashlib.sha1(path.encode()).hexdigest()[:10]


class ChatEngine:
    """Makes targets ready and answers with them. Heavy objects live in HOLDINGS only (the base,
    the PeftModel, the decode copy, a merged model); the engine keeps plain facts about them and
    checks, on every use, that what it finds is still what it built on."""

    def __init__(self):
        self.fast_reason: str | None = None  # None: not decided for the held base yet
        self.fast_for: Any = None  # weakref to the base the decision is about
        self.adapter_fast: dict[str, str] = {}  # adapter path -> "" or why its fast path is off
        self.last_base_settings: P.ModelSettings | None = None
        self.warmed: set[str] = set()
        #: How a merged folder is loaded: "saved" (in the dtype its config.json names, when it
        #: fits beside the base) or "base" (with the base's settings, e.g. 4-bit again).
        self.merged_precision = "saved"

    # Holdings ------------------------------------------------------------------------------------------

    def base(self):
        return HOLDINGS.get("base")

    def tokenizer(self):
        return HOLDINGS.get("tokenizer")

    def peft(self):
        """The held PeftModel when it still wraps the held base; a stale one is dropped."""
        peft = HOLDINGS.get(HOLD_PEFT)
        base = self.base()
        if peft is not None and (base is None or _plain_model(peft) is not base):
            HOLDINGS.drop(HOLD_PEFT)
            return None
        return peft

    def attached(self) -> list[str]:
        peft = self.peft()
        return [p for p, name in getattr(peft, "qlw_paths", {}).items()] if peft is not None else []

    def decode_copy(self) -> DecodeCopy | None:
        dc = HOLDINGS.get(HOLD_DECODE)
        base = self.base()
        if dc is not None and (base is None or not dc.source_alive(base)):
            HOLDINGS.drop(HOLD_DECODE)
            return None
        return dc

    def release(self, merged: bool = True) -> list[str]:
        """Take adapters out of the base (peft's unload: no merge) and drop the decode copy (and
        the merged model): before training or loading another base. Returns what was dropped."""
        dropped = []
        peft = HOLDINGS.get(HOLD_PEFT)
        if peft is not None:
            try:
                peft.unload()
            except Exception:  # the base is dropped below when it still carries LoRA layers
                log.exception("peft unload failed")
            HOLDINGS.drop(HOLD_PEFT)
            dropped.append(HOLD_PEFT)
            base = self.base()
            if base is not None and _carries_lora(base):
                from backend import models

                models.release_base_model()
                dropped.append("base")
        if HOLDINGS.drop(HOLD_DECODE):
            dropped.append(HOLD_DECODE)
            _collect()
        if merged and HOLDINGS.drop(HOLD_MERGED):
            dropped.append(HOLD_MERGED)
        self.fast_reason, self.fast_for, self.adapter_fast = None, None, {}
        self.warmed.clear()
        return dropped

    # Making targets ready --------------------------------------------------------------------------------

    def prepare(self, target: Target, home: Path, ctx=None) -> dict[str, Any]:
        """Load what ``target`` needs (the base, the adapter, the merged folder, the decode copy);
        returns ``{"target", "load_s", "fast_path", "path", "steps"}`` (``steps``: seconds spent
        on the base, the adapter and the fast path's decode copy and compile, this time)."""
        report = (lambda stage, done=0, total=0: ctx.progress(stage, done, total)) if ctx is not None else (lambda *a: None)
        t0 = time.perf_counter()
        if target.kind == "merged":
            held = self._ensure_merged(target, home, ctx)
            t_load = time.perf_counter()
            fast = held["fast"]
            if not fast and not held.get("warmed"):
                fast = self._warm_up(target, report)
            return {"target": target.id, "load_s": round(time.perf_counter() - t0, 3),
                    "fast_path": "on" if not fast else f"off: {fast}", "path": "fast" if not fast else "plain",
                    "precision": held["precision"], "note": held["note"],
                    "steps": {"base_s": round(t_load - t0, 3), "adapter_s": 0.0,
                              "fast_s": round(time.perf_counter() - t_load, 3)}}
        if target.kind == "tuned":
            from backend import adapters

            adapters.inspect_adapter(target.path)  # a broken folder is refused before any load
        self._ensure_base(target, home, ctx)
        t_base = time.perf_counter()
        if target.kind == "tuned":
            report("attaching the adapter")
            self._ensure_adapter(target.path)
        t_adapter = time.perf_counter()
        fast = self._ensure_fast(target, report)
        if not fast:
            fast = self._warm_up(target, report)
        if ctx is not None:
            ctx.check_cancelled()
        t_end = time.perf_counter()
        return {"target": target.id, "load_s": round(t_end - t0, 3),
                "fast_path": "on" if not fast else f"off: {fast}", "path": "fast" if not fast else "plain",
                "steps": {"base_s": round(t_base - t0, 3), "adapter_s": round(t_adapter - t_base, 3),
                          "fast_s": round(t_end - t_adapter, 3)}}

    def _ensure_base(self, target: Target, home: Path, ctx) -> None:
        from backend import adapters, models

        base = self.base()
        if base is not None and models._LOADED.get("settings"):
            self.last_base_settings = P.ModelSettings(**models._LOADED["settings"])
        if base is not None:
            if target.kind == "tuned":
                try:
                    adapters.check_against_base(target.path, base)
                    return
                except JobError as exc:
                    mismatch = exc
            else:
                return
        if target.kind == "tuned":
            settings = adapters.base_settings_for(target.path, home)
            from backend.train import model_settings

            settings = model_settings(P.to_dict(settings), Path(home), build=True)
        elif self.last_base_settings is not None:
            settings = self.last_base_settings
        else:
            raise JobError("no base model is loaded", where="target = base",
                           hint="load one in the Model tab (or talk to an adapter: its base is loaded for it)")
        if base is not None and ctx is not None:
            ctx.emit("log", {"level": "info", "message": f"{mismatch}; loading {settings.source}, the base it was "
                                                         "trained on"})
        self.release()
        models.load_job(P.LoadModel(**P.to_dict(settings)))(ctx if ctx is not None else QuietContext())
        self.last_base_settings = settings
        if target.kind == "tuned":
            adapters.check_against_base(target.path, self.base())

    def _ensure_adapter(self, path: str) -> str:
        from backend import adapters

        peft = self.peft()
        paths = getattr(peft, "qlw_paths", {}) if peft is not None else {}
        if path in paths:
            return paths[path]
        name = _adapter_name(path)
        model = peft if peft is not None else self.base()
        peft = adapters.attach_adapter(model, path, name)
        paths = dict(paths)
        paths[path] = name
        peft.qlw_paths = paths
        HOLDINGS.put(HOLD_PEFT, peft, "adapter", ", ".join(Path(p).name for p in paths))
        return name

    def _ensure_fast(self, target: Target, report=lambda *a: None) -> str:
        """"" when ``target`` will decode on the fast path (the copy built and holding its
        weights), else why not."""
        base = self.base()
        if base is None:
            return "no base model"
        if self.fast_for is None or self.fast_for() is not base:
            self.fast_reason = fast_allowed(base)
            self.fast_for = weakref.ref(base)
            self.adapter_fast = {}
        if self.fast_reason:
            return self.fast_reason
        deltas = None
        if target.kind == "tuned":
            why = self.adapter_fast.get(target.path)
            if why:
                return why
            name = self._ensure_adapter(target.path)
            try:
                deltas = lora_deltas(self.peft(), name)
            except FastPathUnavailable as exc:
                self.adapter_fast[target.path] = str(exc)
                return str(exc)
        dc = self.decode_copy()
        if dc is None:
            report("building the decode copy")
            try:
                dc = DecodeCopy(base)
            except FastPathUnavailable as exc:
                self.fast_reason = str(exc)
                return self.fast_reason
            except Exception as exc:  # an architecture the copy cannot rebuild: stay on the plain path
                log.exception("decode copy failed")
                self.fast_reason = f"the decode copy failed ({type(exc).__name__}: {exc})"
                return self.fast_reason
            HOLDINGS.put(HOLD_DECODE, dc, "model", f"chat decode copy ({dc.nbytes() / GIB:.2f} GiB, {dc.dtype})")
        report("switching weights")
        dc.materialise(deltas, target.id if target.kind == "tuned" else "base")
        return ""

    def _warm_up(self, target: Target, report=lambda *a: None) -> str:
        """A short answer on the fast path, so that compiling the decode step happens while
        loading, not in the first answer (and a failure turns the fast path off here)."""
        if target.kind == "merged":
            held = HOLDINGS.get(HOLD_MERGED)
            if held is None or held["fast"] or held["warmed"]:
                return held["fast"] if held is not None else "not loaded"
        else:
            dc = self.decode_copy()
            if dc is None or id(dc) in self.warmed:
                return ""
        report("compiling the decode step")
        t0 = time.perf_counter()
        tokenizer = self.tokenizer_for(target)
        ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0] * 4
        result = self.answer(target, ids, P.ChatSettings(max_new_tokens=4, do_sample=False),
                             extra={"min_new_tokens": 4})
        if target.kind == "merged":
            held = HOLDINGS.get(HOLD_MERGED)
            if result["path"] != "fast":
                return held["fast"] if held is not None and held["fast"] else "the fast path failed"
            held["warmed"] = True
            log.info("merged fast path warmed up in %.1f s", time.perf_counter() - t0)
            return ""
        if result["path"] != "fast":
            return self.fast_reason or "the fast path failed"
        self.warmed.add(id(dc))
        log.info("fast path warmed up in %.1f s", time.perf_counter() - t0)
        return ""

    def _ensure_merged(self, target: Target, home: Path, ctx) -> dict[str, Any]:
        from backend import models

        held = HOLDINGS.get(HOLD_MERGED)
        if held is not None and held["path"] == target.path and held["choice"] == self.merged_precision:
            return held
        HOLDINGS.drop(HOLD_MERGED)
        folder = Path(target.path)
        if not (folder / "config.json").is_file():
            raise JobError(f"no model folder at {folder} (no config.json)", where=str(folder),
                           hint="pick a merged model folder (the Merge tab writes one)")
        base_settings = self.last_base_settings or (P.ModelSettings(**models._LOADED["settings"])
                                                    if models._LOADED.get("settings") else None)
        fields_ = P.to_dict(base_settings) if base_settings is not None else {}
        settings = P.ModelSettings(**{**fields_, "source": str(folder), "revision": ""})
        settings, note = self._merged_settings(settings, folder)
        loaded = models.load_base_model(
            settings,
            progress=(lambda st, d, t, u="", m="": ctx.progress(st, d, t, u, m)) if ctx is not None else None,
            cancelled=(lambda: ctx.cancelled) if ctx is not None else None)
        tokenizer = loaded.tokenizer or self.tokenizer()
        apply_compile_override(loaded.model)
        held = {"path": target.path, "model": loaded.model, "tokenizer": tokenizer, "choice": self.merged_precision,
                "precision": models.describe_precision(settings), "note": note,
                "fast": merged_fast_allowed(loaded.model), "cache": None, "cache_len": 0, "warmed": False,
                "load_s": loaded.info["load_seconds"], "info": {k: loaded.info[k] for k in ("source", "device", "measured")}}
        HOLDINGS.put(HOLD_MERGED, held, "model", f"merged model {folder.name} ({held['precision']})")
        return held

    def _merged_settings(self, settings: P.ModelSettings, folder: Path) -> tuple[P.ModelSettings, str]:
        """The settings to load a merged folder with, and a note on the choice. A merged folder
        holds base + adapter in 16 or 32 bits; quantising it to 4 bits again rounds the weights
        to the 4-bit grid, which undoes much of the adapter's (small) change, so it is loaded as
        saved unless ``merged_precision`` says "base" or it does not fit beside the base."""
        from dataclasses import replace

        from backend import models

        saved = saved_precision(folder)
        if self.merged_precision != "saved" or saved is None or settings.precision == saved:
            return settings, ""
        as_saved = replace(settings, precision=saved)
        est = models.estimate(as_saved)
        # The merged model comes beside the base (estimate counts the held base as free).
        room = est["free_bytes"] - est["reclaimed_bytes"]
        need = est["total_bytes"] + est["context_bytes"]
        if need > room and HOLDINGS.get(HOLD_DECODE) is not None:
            HOLDINGS.drop(HOLD_DECODE)  # the decode copy is rebuilt when the base is used again
            _collect()
            self.warmed.clear()
            est = models.estimate(as_saved)
            room = est["free_bytes"] - est["reclaimed_bytes"]
        if need <= room:
            return as_saved, f"loaded in {saved}, as saved"
        return settings, (f"loaded like the base ({models.describe_precision(settings)}): in {saved} as saved it "
                          f"needs {need / GIB:.1f} GiB and {max(room, 0) / GIB:.1f} GiB are free beside the base; "
                          "re-quantising a merged model undoes part of the adapter's change")

    # Using targets ---------------------------------------------------------------------------------------

    @contextmanager
    def model_for(self, target: Target, fast: bool = True) -> Iterator[tuple[Any, Any, Callable[[], Any], str]]:
        """(model, tokenizer, context, path) to generate with: ``context()`` is entered around
        each call (peft's ``disable_adapter`` for the base while an adapter is attached)."""
        if target.kind == "merged":
            held = HOLDINGS.get(HOLD_MERGED)
            if held is None or held["path"] != target.path:
                raise JobError(f"{target.label} is not loaded", where=target.id, hint="send chat.load first")
            yield held["model"], held["tokenizer"], nullcontext, "fast" if fast and not held["fast"] else "plain"
            return
        base, tokenizer = self.base(), self.tokenizer()
        if base is None:
            raise JobError("no base model is loaded", where=target.id, hint="send chat.load first")
        if tokenizer is None:
            raise JobError("the base model has no tokenizer", where="model.source",
                           hint="load a model folder that holds its tokenizer files")
        if fast and not self._ensure_fast(target):
            yield self.decode_copy().model, tokenizer, nullcontext, "fast"
            return
        peft = self.peft()
        if target.kind == "tuned":
            name = self._ensure_adapter(target.path)
            peft = self.peft()
            peft.set_adapter(name)
            yield peft, tokenizer, nullcontext, "plain"
        elif peft is not None:
            yield peft, tokenizer, peft.disable_adapter, "plain"
        else:
            yield base, tokenizer, nullcontext, "plain"

    def answer(self, target: Target, input_ids: list[int], settings: P.ChatSettings, *,
               cancelled: Callable[[], bool] = lambda: False, on_delta: Callable[[str], None] | None = None,
               fast: bool = True, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Generate one answer; the result of :func:`stream_generate` plus ``path``."""
        with self.model_for(target, fast) as (model, tokenizer, context, path):
            extra = dict(extra or {})
            if path == "fast" and target.kind == "merged":
                held = HOLDINGS.get(HOLD_MERGED)
                held["cache"], held["cache_len"], cache = reuse_static_cache(
                    model, held["cache"], held["cache_len"], len(input_ids) + settings.max_new_tokens)
                if cache is not None:
                    extra["past_key_values"] = cache
                else:
                    extra["cache_implementation"] = "static"
            elif path == "fast":
                cache = self.decode_copy().static_cache(len(input_ids) + settings.max_new_tokens)
                if cache is not None:
                    extra["past_key_values"] = cache
                else:
                    extra["cache_implementation"] = "static"
            result = stream_generate(model, tokenizer, input_ids, settings, cancelled=cancelled, on_delta=on_delta,
                                     context=context, extra=extra)
        result["path"] = path
        if path == "fast" and result["error"] and not result["tokens"]:
            # The compiled decode failed before any text: stay on the plain path from now on.
            if target.kind == "merged":
                held = HOLDINGS.get(HOLD_MERGED)
                held.update(fast=f"the fast path failed ({result['error'][:200]})", cache=None, cache_len=0)
            else:
                self.fast_reason = f"the fast path failed ({result['error'][:200]})"
                HOLDINGS.drop(HOLD_DECODE)
            result = self.answer(target, input_ids, settings, cancelled=cancelled, on_delta=on_delta, fast=False,
                                 extra={k: v for k, v in (extra or {}).items()
                                        if k not in ("past_key_values", "cache_implementation")})
        return result

    def logits(self, target: Target, input_ids: list[int], fast: bool = True, last_only: bool = True):
        """Logits of ``input_ids`` (the next token's, or all) as float32 on the CPU, through the
        path ``answer`` would use (no cache)."""
        import torch

        with self.model_for(target, fast) as (model, tokenizer, context, path):
            ids = torch.tensor([input_ids], dtype=torch.long, device=_device_of(model))
            with torch.no_grad(), context():
                out = model(input_ids=ids, use_cache=False).logits[0]
        out = out[-1] if last_only else out
        return out.float().cpu()

    def tokenizer_for(self, target: Target):
        if target.kind == "merged":
            held = HOLDINGS.get(HOLD_MERGED)
            if held is not None and held["path"] == target.path:
                return held["tokenizer"]
        tokenizer = self.tokenizer()
        if tokenizer is None:
            raise JobError("the base model has no tokenizer", where="model.source",
                           hint="load a model folder that holds its tokenizer files")
        return tokenizer

    def fast_path_state(self) -> str:
        base = self.base()
        if base is None or self.fast_for is None or self.fast_for() is not base:
            return "unknown"
        return "on" if not self.fast_reason else f"off: {self.fast_reason}"


def _collect() -> None:
    """Collect the dropped copy (its model and compiled call form a cycle) and give its CUDA
    memory back to the driver."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


#: config.json's dtype names -> ModelSettings.precision
_SAVED_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def saved_precision(folder: Path) -> str | None:
    """The precision a model folder was saved in ("bf16", "fp16", "fp32"), from its config.json;
    None for a quantised folder or one that does not say."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("quantization_config"):
        return None
    dtype = config.get("dtype") or config.get("torch_dtype")
    return _SAVED_DTYPES.get(str(dtype).replace("torch.", "")) if dtype else None


def _carries_lora(model) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


class QuietContext:
    """A job context that reports nowhere (the headless tools and the benchmark)."""

    job_id = "local"
    session = ""
    cancelled = False

    def progress(self, *args, **kwargs) -> None:
        pass

    def emit(self, kind: str, payload: dict[str, Any]) -> None:
        pass

    def check_cancelled(self) -> None:
        pass


#: The backend's one engine.
ENGINE = ChatEngine()


def make_random_adapter(model, folder: str | Path, r: int = 16, lora_alpha: int = 16, seed: int = 0,
                        target_modules: Any = "all-linear") -> Path:
    """Save a LoRA adapter with random A *and* B (peft's ``init_lora_weights=False``, so it
    changes the outputs) for ``model`` into ``folder``, and leave ``model`` as it was (the LoRA
    layers are taken out again). For benchmarks and tests: a trained adapter behaves the same
    for speed and exactness."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=target_modules,
                        init_lora_weights=False, task_type="CAUSAL_LM")
    peft = get_peft_model(model, config)
    folder = Path(folder)
    peft.save_pretrained(str(folder))
    peft.unload()
    model.eval()
    return folder


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
    """The chat and evaluation requests of one backend."""

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

    async def eval_run(self, client, params: P.EvalRun) -> P.Reply:
        from backend import evaluate

        try:
            fn = evaluate.eval_job(params, self.server.home, self)
        except JobError as exc:
            return self._bad(exc)
        return self._start("eval.run", params, fn)

    async def eval_export(self, client, params: P.EvalExport) -> P.Reply:
        import asyncio

        from backend import evaluate

        if params.format not in P.EVAL_EXPORT_FORMATS:
            return P.Reply("", "error", reason=f"format must be one of {', '.join(P.EVAL_EXPORT_FORMATS)}",
                           code=P.BAD_MESSAGE)
        rows = self.last_eval or [p for k, p in await asyncio.to_thread(self._events, ("eval.row",))]
        if not rows:
            return P.Reply("", "refused", reason="no evaluation to export yet: run one first")
        path = self._export_target(params.path, params.overwrite)
        if isinstance(path, P.Reply):
            return path
        text = evaluate.markdown_table(rows) if params.format == "markdown" else evaluate.csv_text(rows)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(path.write_text, text, "utf-8")
        except OSError as exc:
            return P.Reply("", "error", {"path": str(path)}, reason=f"cannot write {path}: {exc}", code=P.FAILED)
        return P.Reply("", "ok", {"path": str(path), "rows": len(rows)})


#: Jobs that use the held base model as loaded: chat lets go of it before they run.
RELEASE_BEFORE = ("train.start", "model.load")


def register(server) -> ChatRoom:
    """Add the chat and evaluation requests to ``server``; chat's adapters and decode copy are
    let go before a training run or another base model uses the held base."""
    room = ChatRoom(server)
    server.chat = room
    server.handlers.update({
        "chat.targets": room.targets,
        "chat.load": room.load,
        "chat.send": room.send,
        "chat.clear": room.clear,
        "chat.export": room.export,
        "eval.run": room.eval_run,
        "eval.export": room.eval_export,
    })
    # Training and model.load use HOLDINGS["base"] as they find it: their jobs first take chat's
    # LoRA layers out of it and drop the decode copy (its memory is the training run's now).
    server.before_job(RELEASE_BEFORE, ENGINE.release)
    return room
