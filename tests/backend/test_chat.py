"""Chat (backend/chat.py) on the tiny model in 4-bit on the CPU: prompts as training formatted
them, streamed answers in several deltas, stop, the adapter switched on and off with exact
logits, the fast path's decode copy against the 4-bit model, the chat.send job's events and
transcript, and the refusal while training holds the GPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from backend import chat, data as D, evaluate, models, protocol as P, tiny
from backend.holdings import HOLDINGS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded(tiny_folder, tmp_path_factory):
    """The tiny model in 4-bit NF4 (fp32 compute) on the CPU, held as the base, and a random
    LoRA adapter (A and B non-zero) saved for it."""
    chat.ENGINE.release()
    models.load_job(P.LoadModel(source=str(tiny_folder), precision="4bit", compute_dtype="fp32",
                                device="cpu"))(chat.QuietContext())
    base, tokenizer = HOLDINGS.get("base"), HOLDINGS.get("tokenizer")
    adapter = chat.make_random_adapter(base, tmp_path_factory.mktemp("adapter") / "adapter", r=8, lora_alpha=16)
    assert not chat._carries_lora(base)
    yield base, tokenizer, adapter
    chat.ENGINE.release()
    models.release_base_model()


def prompt_ids(tokenizer, text="Tell me about copper and iron."):
    return chat.build_prompt(tokenizer, [{"role": "user", "content": text}], "chat")[0]


def test_clean_text_keeps_text_and_drops_what_terminals_misread():
    dirty = "red \x1b[31mtext\x1b[0m\r\nbell\x07 nul\x00 tab\tok \ud800 bidi\u202eX \ufffd end"
    assert chat.clean_text(dirty) == "red text\nbell nul tab\tok  bidiX  end"
    assert chat.clean_text("") == ""
    assert chat.clean_text("naïve café ✓ 日本") == "naïve café ✓ 日本"


def test_prompts_follow_the_training_templates(loaded):
    _base, tokenizer, _adapter = loaded
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "and now?"}]
    ids, _ = chat.build_prompt(tokenizer, msgs, "chat", "be brief")
    want = tokenizer.apply_chat_template([{"role": "system", "content": "be brief"}] + msgs,
                                         add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids == list(want)
    _ids, text = chat.build_prompt(tokenizer, msgs, "mistral")
    assert text == D._mistral("", msgs) == "[INST] hi [/INST] hello</s>[INST] and now? [/INST]"
    _ids, text = chat.build_prompt(tokenizer, msgs[-1:], "alpaca")
    assert text == D.ALPACA_PROMPT.format(instruction="and now?")
    _ids, text = chat.build_prompt(tokenizer, msgs[-1:], "raw", "sys")
    assert text == "sys\n\nand now?\n\n"
    with pytest.raises(chat.JobError, match="end with a user message"):
        chat.build_prompt(tokenizer, msgs[:2], "chat")
    with pytest.raises(chat.JobError, match="must be"):
        chat.chat_settings({"top_p": 2.0})
    assert chat.resolve_template(P.ChatSettings(), tokenizer) == ("chat", "")


def test_an_answer_streams_as_several_deltas(loaded, monkeypatch):
    _base, tokenizer, _adapter = loaded
    monkeypatch.setattr(chat.generation, "DELTA_INTERVAL_S", 0.02)
    deltas, times = [], []

    def on_delta(text):
        deltas.append(text)
        times.append(time.perf_counter())

    result = chat.ENGINE.answer(chat.parse_target("base"), prompt_ids(tokenizer),
                                P.ChatSettings(max_new_tokens=40, do_sample=True, seed=1),
                                on_delta=on_delta, fast=False, extra={"min_new_tokens": 40})
    assert result["tokens"] == 40 and result["finish_reason"] == "length" and result["path"] == "plain"
    assert len(deltas) >= 3, deltas
    assert "".join(deltas) == result["text"] and all(deltas)
    assert all(b - a >= 0.02 * 0.9 for a, b in zip(times, times[1:-1]))  # coalesced (the last one may follow at once)
    assert 0 < result["ttft_s"] <= result["elapsed_s"] and result["tokens_per_s"] > 0


def test_stop_ends_the_answer_within_a_couple_of_tokens(loaded):
    _base, tokenizer, _adapter = loaded
    stop = {"at": None}
    counted = []

    def on_delta(text):
        if stop["at"] is None:
            stop["at"] = time.perf_counter()

    def cancelled():
        counted.append(1)
        return stop["at"] is not None

    result = chat.ENGINE.answer(chat.parse_target("base"), prompt_ids(tokenizer),
                                P.ChatSettings(max_new_tokens=200, do_sample=True, seed=2), cancelled=cancelled,
                                on_delta=on_delta, fast=False, extra={"min_new_tokens": 200})
    assert result["finish_reason"] == "stopped" and result["stopped"]
    assert result["tokens"] < 200
    # The criterion is polled once per token: after the stop was seen, at most a couple more tokens.
    polls_after_stop = sum(1 for _ in counted) - result["tokens"]
    assert polls_after_stop <= 2


def test_adapter_switch_gives_the_plain_base_logits_exactly(loaded):
    base, tokenizer, adapter = loaded
    ids = prompt_ids(tokenizer)
    x = torch.tensor([ids])
    with torch.no_grad():
        plain = base(input_ids=x, use_cache=False).logits[0, -1].float()
    engine = chat.ENGINE
    tuned = chat.parse_target(f"tuned:{adapter}")
    engine.prepare(tuned, Path("."))
    assert HOLDINGS.get(chat.HOLD_PEFT) is not None and chat._carries_lora(base)
    t1 = engine.logits(tuned, ids, fast=False)
    b1 = engine.logits(chat.parse_target("base"), ids, fast=False)
    t2 = engine.logits(tuned, ids, fast=False)
    assert torch.equal(b1, plain)  # the adapter switched off is the plain base, bit for bit
    assert (t1 - plain).abs().max() > 1e-2  # the adapter changes the answer
    assert torch.equal(t2, t1)  # and switching back restores the tuned logits
    engine.release()
    assert not chat._carries_lora(base) and HOLDINGS.get(chat.HOLD_PEFT) is None
    with torch.no_grad():
        assert torch.equal(base(input_ids=x, use_cache=False).logits[0, -1].float(), plain)


def test_the_decode_copy_computes_what_the_4bit_model_computes(loaded, monkeypatch):
    base, tokenizer, adapter = loaded
    monkeypatch.setenv(chat.FAST_ENV, "1")  # the fast path is for GPUs; allowed on the CPU here
    engine = chat.ENGINE
    engine.release()
    ids = prompt_ids(tokenizer)
    greedy = P.ChatSettings(max_new_tokens=16, do_sample=False)
    for target in (chat.parse_target("base"), chat.parse_target(f"tuned:{adapter}")):
        ready = engine.prepare(target, Path("."))
        assert ready["fast_path"] == "on" and ready["path"] == "fast", ready
        fast, plain = engine.logits(target, ids), engine.logits(target, ids, fast=False)
        assert (fast - plain).abs().max() < 1e-4, target.id
        a = engine.answer(target, ids, greedy, extra={"min_new_tokens": 16})
        b = engine.answer(target, ids, greedy, fast=False, extra={"min_new_tokens": 16})
        assert a["path"] == "fast" and b["path"] == "plain"
        assert a["output_ids"] == b["output_ids"] and a["text"] == b["text"], target.id
    dc = HOLDINGS.get(chat.HOLD_DECODE)
    assert isinstance(dc, chat.DecodeCopy)
    assert {h["name"]: h["kind"] for h in HOLDINGS.describe()}[chat.HOLD_DECODE] == "model"
    # One copy serves both targets: switching writes the weights in place (same tensors).
    before = {n: p.data_ptr() for n, p in dc.model.named_parameters()}
    engine.prepare(chat.parse_target("base"), Path("."))
    assert {n: p.data_ptr() for n, p in dc.model.named_parameters()} == before
    assert engine.fast_path_state() == "on"
    engine.release()
    assert HOLDINGS.get(chat.HOLD_DECODE) is None


class Ctx(chat.QuietContext):
    def __init__(self):
        self.events = []
        self.stop = False

    @property
    def cancelled(self):
        return self.stop

    def emit(self, kind, payload):
        self.events.append((kind, json.loads(json.dumps(payload))))  # what goes on the wire


def test_send_job_answers_both_targets_and_the_transcript_exports(loaded, tmp_path):
    _base, tokenizer, adapter = loaded
    msgs = [{"role": "user", "content": "Name a metal."}]
    params = P.ChatSend(target="base", messages=msgs, compare_with=f"tuned:{adapter}",
                        settings={"max_new_tokens": 8, "do_sample": False})
    ctx = Ctx()
    result = chat.send_job(params, tmp_path, "c1", ["a1", "a2"])(ctx)
    kinds = [k for k, _ in ctx.events]
    assert kinds.count("chat.started") == 2 and kinds.count("chat.answer") == 2
    for kind, payload in ctx.events:
        if kind in P.EVENTS:
            P.build(P.EVENTS[kind], payload, kind)  # every payload fits the protocol
    answers = [p for k, p in ctx.events if k == "chat.answer"]
    assert [a["target"] for a in answers] == ["base", chat.parse_target(f"tuned:{adapter}").id]
    assert all(a["prompt"] == "Name a metal." and a["finish_reason"] in ("eos", "length") for a in answers)
    assert [a["answer_id"] for a in result["answers"]] == ["a1", "a2"]
    started = [p for k, p in ctx.events if k == "chat.started"]
    assert started[0]["prompt_tokens"] == len(prompt_ids(tokenizer, "Name a metal.")) and started[0]["template"] == "chat"
    rows = chat.transcript(ctx.events, "c1")
    md = chat.transcript_markdown(rows, "c1")
    assert md.count("## User") == 1 and "## base" in md and "## tuned" in md
    lines = chat.transcript_jsonl(rows).splitlines()
    assert [json.loads(line)["answer_id"] for line in lines] == ["a1", "a2"]
    with pytest.raises(chat.JobError, match="unknown chat target"):
        chat.send_job(P.ChatSend(target="nope", messages=msgs), tmp_path, "c1", ["a3"])


class _Job:
    def __init__(self, kind):
        self.kind, self.job_id, self.started = kind, "j1", time.time()

    def to_dict(self):
        return {"kind": self.kind, "job_id": self.job_id}


class _Jobs:
    def __init__(self, kind):
        self.current = _Job(kind) if kind else None


class _Server:
    def __init__(self, kind, home):
        self.jobs, self.home, self.handlers, self.job_factories = _Jobs(kind), home, {}, {}
        self.started = []

    def _start_job(self, method, params, fn):
        self.started.append(method)
        return P.Reply("", "accepted", {"job_id": "x", "session": "s"})


def test_chat_is_refused_while_training_holds_the_gpu(tmp_path):
    import asyncio

    room = chat.ChatRoom(_Server("train.start", tmp_path))
    params = P.ChatSend(target="base", messages=[{"role": "user", "content": "hi"}])
    reply = asyncio.run(room.send(None, params))
    assert reply.status == "refused"
    assert "train.start job" in reply.reason and "holds the GPU" in reply.reason and "stop it" in reply.reason
    room = chat.ChatRoom(_Server("", tmp_path))
    reply = asyncio.run(room.send(None, params))
    assert reply.status == "accepted" and len(reply.result["answer_ids"]) == 1
    reply = asyncio.run(room.load(None, P.ChatLoad(target="weird:thing")))
    assert reply.status == "error" and "unknown chat target" in reply.reason


def test_chat_through_the_backend(tiny_folder, tmp_path_factory):
    """chat.* on a real backend: the targets list the session's adapter; a compare send streams
    both answers (deltas are not stored, the transcript is); the export writes it."""
    import asyncio
    import shutil
    import tempfile

    from tests.conftest import start_backend, stop_backend
    from tui.client import Connection

    home = Path(tempfile.mkdtemp(prefix="qlw-c-", dir="/tmp"))
    shutil.copytree(tiny_folder, tiny.tiny_model_path(home))
    models.load_job(P.LoadModel(source=str(tiny_folder), precision="fp32", device="cpu"))(chat.QuietContext())
    adapter = chat.make_random_adapter(HOLDINGS.get("base"), home / "runs" / "s1" / "adapter", r=4, lora_alpha=8)
    models.release_base_model()
    (home / "runs" / "s1" / "config.toml").write_text(
        f'name = "s1"\n[model]\nsource = "{tiny_folder}"\nprecision = "fp32"\ndevice = "cpu"\n', encoding="utf-8")
    proc = start_backend(home)
    try:
        async def body():
            events: list = []
            conn = await Connection.open(P.socket_path(home), "chat-test", events.append)
            await conn.call(P.Attach())
            listed = await conn.call(P.ChatTargets())
            tuned = f"tuned:{adapter.resolve()}"
            assert [t["id"] for t in listed["targets"]] == ["base", tuned] and not listed["base_loaded"]
            msgs = [{"role": "user", "content": "Name a metal."}]
            sent = await conn.call(P.ChatSend(target=tuned, messages=msgs, compare_with="base",
                                              settings={"max_new_tokens": 12, "do_sample": True, "seed": 3}))
            assert len(sent["answer_ids"]) == 2
            for _ in range(600):
                if any(e.kind == "job.finished" and e.payload["job_id"] == sent["job_id"] for e in events):
                    break
                await asyncio.sleep(0.05)
            end = next(e.payload for e in events if e.kind == "job.finished")
            assert end["status"] == "done", end
            answers = [e.payload for e in events if e.kind == "chat.answer"]
            assert [a["answer_id"] for a in answers] == sent["answer_ids"]
            assert [a["target"] for a in answers] == [tuned, "base"]
            deltas = [e for e in events if e.kind == "chat.delta"]
            assert deltas and all(e.seq is None for e in deltas)
            for a in answers:
                assert "".join(e.payload["text"] for e in deltas if e.payload["answer_id"] == a["answer_id"]) == a["text"]
            listed = await conn.call(P.ChatTargets())
            assert listed["base_loaded"] and listed["targets"][1]["loaded"]
            out = await conn.call(P.ChatExport(path="talk.md", format="markdown"))
            assert out["answers"] == 2 and Path(out["path"]) == home / "exports" / "talk.md"
            assert "Name a metal." in Path(out["path"]).read_text(encoding="utf-8")
            job = await conn.call(P.EvalRun(targets=[tuned, "base"], prompts=["Hi"], runs=1, max_new_tokens=2))
            for _ in range(600):
                if any(e.kind == "job.finished" and e.payload["job_id"] == job["job_id"] for e in events):
                    break
                await asyncio.sleep(0.05)
            assert [e.payload["target"] for e in events if e.kind == "eval.row"] == [tuned, "base"]
            out = await conn.call(P.EvalExport(path=str(home / "eval.csv"), format="csv"))
            assert (home / "eval.csv").read_text(encoding="utf-8").count("\n") == 3 and out["rows"] == 2
            # Loading a base model (as training does) first takes chat's adapter out of the base.
            job = await conn.call(P.LoadModel(source=str(tiny_folder), precision="fp32", device="cpu"))
            for _ in range(600):
                if any(e.kind == "job.finished" and e.payload["job_id"] == job["job_id"] for e in events):
                    break
                await asyncio.sleep(0.05)
            listed = await conn.call(P.ChatTargets())
            assert listed["base_loaded"] and not listed["targets"][1]["loaded"]
            cleared = await conn.call(P.ChatClear())
            assert cleared["conversation"] != sent["conversation"]
            await conn.close()

        asyncio.run(body())
    finally:
        stop_backend(proc)
        shutil.rmtree(home, ignore_errors=True)


def test_one_compile_serves_base_tuned_and_every_prompt(loaded, monkeypatch):
    """The fast path's decode step is compiled once (at load, by the warm-up): switching between
    base and tuned rewrites weights in place and new prompts reuse the static cache, so nothing
    recompiles; the compiled answers equal the plain path's. (On the CPU with dynamo's
    aot_eager backend: the same tracing and guards as on a GPU, without CUDA graphs.)"""
    from torch._dynamo.utils import counters

    base, tokenizer, adapter = loaded
    monkeypatch.setenv(chat.FAST_ENV, "1")
    monkeypatch.setattr(chat.decode_copy, "COMPILE_OVERRIDE", {"backend": "aot_eager", "mode": None})
    engine = chat.ENGINE
    engine.release()
    torch._dynamo.reset()
    counters.clear()
    try:
        assert engine.prepare(chat.parse_target("base"), Path("."))["fast_path"] == "on"
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1
        greedy = P.ChatSettings(max_new_tokens=10, do_sample=False)
        for target, text in [("base", "Name a metal."), (f"tuned:{adapter}", "Name a metal."),
                             ("base", "A much longer question about copper, iron and the stars."),
                             (f"tuned:{adapter}", "Why?")]:
            t, ids = chat.parse_target(target), prompt_ids(tokenizer, text)
            engine.prepare(t, Path("."))
            fast = engine.answer(t, ids, greedy, extra={"min_new_tokens": 10})
            plain = engine.answer(t, ids, greedy, fast=False, extra={"min_new_tokens": 10})
            assert fast["path"] == "fast" and fast["output_ids"] == plain["output_ids"], target
        assert counters["stats"]["unique_graphs"] == graphs  # no recompile
    finally:
        engine.release()
        torch._dynamo.reset()


def test_exports_stay_under_exports_and_ask_before_overwriting(tmp_path):
    import asyncio

    from sessions.store import Store

    server = _Server("", tmp_path)
    server.store, server.current_session = Store(tmp_path / "sessions.db"), None
    room = chat.ChatRoom(server)
    run = lambda params: asyncio.run(room.export(None, params))  # noqa: E731
    for bad in ("../../escape.md", "../sessions.db", "a/../../b.md", ""):
        reply = run(P.ChatExport(path=bad))
        assert reply.status == "refused", bad
    assert not (tmp_path.parent / "escape.md").exists() and not (tmp_path / "sessions.db-journal").exists()
    ok = run(P.ChatExport(path="talks/one.md"))
    assert ok.status == "ok" and Path(ok.result["path"]) == tmp_path / "exports" / "talks" / "one.md"
    again = run(P.ChatExport(path="talks/one.md", format="jsonl"))
    assert again.status == "refused" and again.code == P.CONFIRM and "confirm" in again.reason
    assert run(P.ChatExport(path="talks/one.md", format="jsonl", overwrite=True)).status == "ok"
    assert run(P.ChatExport(path="talks")).status == "refused"  # a folder
    room.last_eval = [{"target": "base", "label": "base"}]
    server.chat = room
    evaluate.register(server)  # eval.export goes through the chat room's export paths
    eval_export = server.handlers["eval.export"]
    assert asyncio.run(eval_export(None, P.EvalExport(path="../x.csv", format="csv"))).status == "refused"
    assert asyncio.run(eval_export(None, P.EvalExport(path="t.csv", format="csv"))).status == "ok"
    server.store.close()


def test_server_runs_before_job_hooks_in_the_job_thread_first(tmp_path):
    """Rooms let go of what they hold through the server's before-job hooks: chat releases its
    adapters and decode copy before train.start and model.load; a hook runs in the job's thread,
    before the job's own work, and only for the methods it was registered for."""
    import asyncio
    import threading

    from backend.server import BackendServer

    seen = []

    async def go():
        server = BackendServer(tmp_path / "home")
        await server.start()
        try:
            for method in chat.RELEASE_BEFORE:
                assert chat.ENGINE.release in server.before_job_hooks[method]
            server.before_job(["diag.ticker"], lambda: seen.append(("hook", threading.current_thread())))
            job = lambda ctx: seen.append(("job", threading.current_thread())) or {}  # noqa: E731
            assert server._start_job("diag.ticker", P.DiagTicker(count=1), job).status == "accepted"
            assert await server.jobs.wait(10)
            assert server._start_job("diag.burn", P.DiagBurn(seconds=0), job).status == "accepted"
            assert await server.jobs.wait(10)
        finally:
            await server.shutdown(graceful=True)

    asyncio.run(asyncio.wait_for(go(), 30))
    assert [what for what, _ in seen] == ["hook", "job", "job"]
    assert seen[0][1] is seen[1][1] and seen[0][1] is not threading.main_thread()
