"""Generation: one long-lived thread runs ``generate`` (compiled CUDA graphs are recorded per
thread); tokens are read from a ``TextIteratorStreamer``, cleaned and sent as ``chat.delta`` at most
every ``DELTA_INTERVAL_S``; a stopping criterion polls the job's ``cancelled``
(:func:`stream_generate`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any, Callable

from backend import protocol as P
from backend.chat.prompts import clean_text


log = logging.getLogger("qlw.chat")

#: Deltas are coalesced to at most one per this many seconds (the last one always goes).
DELTA_INTERVAL_S = 0.05


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

