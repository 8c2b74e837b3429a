"""Shipping the tuned model (issue 17): a GGUF file for llama.cpp, Ollama and LM Studio, an Ollama
Modelfile beside it, and a check of the file against the merged model it came from.

The steps of the Merge wizard's Export step and of ``qlw export MODEL OUT`` (one code path):

1. :func:`plan`: from files alone: what MODEL is (a merged folder, or an adapter that is merged
   first into the data home's merged/, as the wizard does), its architecture (Llama, Mistral and
   Qwen2 are written; anything else is refused by name), the file's size at the level against
   the free disk, the output path, and for a k-quant whether llama-cpp-python is installed.
2. :func:`run_export`: (merge,) write the GGUF (backend/gguf_convert.py: f16/bf16/q8_0 in
   Python with ``gguf``; q4_k_m/q5_k_m by llama.cpp's quantizer from an f16 file written first),
   always through a temporary file renamed into place; the Modelfile (backend/ollama.py).
3. :func:`verify`: the file read back by transformers (``from_pretrained(folder,
   gguf_file=...)``, dequantised to torch) against the merged folder: perplexity of each on the
   run's validation rows (the built-in prompts for a folder with no run), max |logit
   difference| on fixed prompts, top-1 agreement at every position, greedy continuations, and
   the chat template, EOS and a rendered conversation tokenised the same by both (through the
   Modelfile's Go template when there is one); beside the noise floor of a 16-bit file (the
   merged model with its matrices rounded to f16, or bf16 for a bf16 export).

A test seam: ``QLW_EXPORT_FAULT=kill@writing`` (SIGKILL this process halfway through the
tensors) or ``fail@writing`` (raise there); read once per process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from backend import gguf_convert as G
from backend import protocol as P
from backend.jobs import JobCancelled, JobError, print_job_error

FAULT_ENV = "QLW_EXPORT_FAULT"
MIB = 1024 * 1024
GIB = 1024 * MIB
#: Room left on the disk beyond the file (metadata, the Modelfile, filesystem overhead).
DISK_MARGIN = 64 * MIB
#: New tokens of each greedy continuation compared.
GREEDY_TOKENS = 24


def take_fault() -> tuple[str, str] | None:
    from backend.merge import parse_fault

    return parse_fault(os.environ.pop(FAULT_ENV, None))


def _fault_fn(fault: tuple[str, str] | None) -> Callable[[str], None]:
    def at(stage: str) -> None:
        if fault is None or fault[1] != stage:
            return
        if fault[0] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure at {stage} ({FAULT_ENV})")

    return at


# Paths and the model ---------------------------------------------------------------------------------------


def exports_home(home: Path) -> Path:
    return Path(home) / "exports"


def check_level(quant: str) -> None:
    if quant not in P.EXPORT_LEVELS:
        raise JobError(f"quant must be one of {', '.join(P.EXPORT_LEVELS)}, got {quant!r}", where="quant",
                       hint="f16/bf16 keep the weights as merged; q8_0 halves the size at a small cost; "
                            "q4_k_m/q5_k_m need llama-cpp-python")


def describe_model(model: str, home: Path) -> dict[str, Any]:
    """``{"kind": "merged" | "adapter", "path", "config_folder"}`` for MODEL (a merged folder or an
    adapter folder); JobError for anything else."""
    from backend import adapters

    text = (model or "").strip()
    if not text:
        raise JobError("no model given", where="model", hint="give a merged model folder or an adapter folder")
    path = Path(text).expanduser()
    if not path.is_absolute() and not path.exists() and (Path(home) / "merged" / text).exists():
        path = Path(home) / "merged" / text  # a merged folder's name, as merge.start takes it
    path = Path(os.path.abspath(path))
    if (path / "adapter_config.json").is_file():
        adapters.inspect_adapter(path)  # a usable LoRA adapter, or a JobError saying why not
        from backend.merge import _base_info

        _, _, src = _base_info(str(path), home)
        if src.folder is None:
            raise JobError(f"the base model of {path} is not a local folder", where=str(path),
                           hint="merge it first (qlw merge), then export the merged folder")
        return {"kind": "adapter", "path": str(path), "config_folder": str(src.folder)}
    if (path / "config.json").is_file():
        return {"kind": "merged", "path": str(path), "config_folder": str(path)}
    raise JobError(f"{path} is neither a merged model folder (config.json) nor an adapter (adapter_config.json)",
                   where=f"model = {text}", hint="give a folder qlw merge wrote, or a run's adapter/ or checkpoint")


def merged_name(adapter: str) -> str:
    """The merged folder an adapter is merged into first (under merged/): the run's name and the
    adapter's (``<run>-adapter-merged``, ``<run>-checkpoint-40-merged``)."""
    path = Path(adapter)
    run = path.parent.parent.name if path.parent.name == "checkpoints" else path.parent.name
    return f"{run}-{path.name}-merged"


def resolve_out(out: str, home: Path, model_name: str, quant: str) -> Path:
    """The .gguf path: ``out`` itself when it ends in .gguf; else a file named after the model and
    level inside the folder ``out``; relative paths under the data home's exports/."""
    text = (out or "").strip()
    if "\0" in text:
        raise JobError("the output path holds a NUL character", where="out")
    path = Path(text).expanduser() if text else Path("")
    if not path.is_absolute():
        path = exports_home(home) / path
    path = Path(os.path.abspath(path))
    if path.suffix.lower() != ".gguf":
        if path.exists() and not path.is_dir():
            raise JobError(f"{path} exists and is not a folder or a .gguf file", where=f"out = {text}",
                           hint="name a .gguf file or a folder")
        path = path / f"{model_name}-{quant}.gguf"
    if path.is_dir():
        raise JobError(f"{path} is a folder", where=f"out = {text}", hint="name a .gguf file")
    if G.TMP_MARK in path.name:
        raise JobError(f"{path.name} is a name qlw uses for its temporary files", where=f"out = {text}")
    return path


def _disk_free(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return int(shutil.disk_usage(probe).free)


def plan(model: str, out: str, home: Path, quant: str = "q8_0", ollama: bool = True) -> dict[str, Any]:
    """What an export will take (``export.plan``): quick, no model is loaded."""
    check_level(quant)
    m = describe_model(model, home)
    config = G.read_config(Path(m["config_folder"]))
    refusal, arch = "", ""
    try:
        arch = G.check_architecture(config, where=str(Path(m["config_folder"]) / "config.json"))
    except JobError as exc:
        refusal = str(exc)
    name = Path(m["path"]).name if m["kind"] == "merged" else merged_name(m["path"])
    target = resolve_out(out, home, name, quant)
    warnings: list[str] = []
    size = 0
    try:
        size = G.planned_bytes(Path(m["config_folder"]), quant) if not refusal else 0
    except JobError as exc:
        refusal = refusal or str(exc)
    need = size + DISK_MARGIN
    if quant in G.LLAMA_CPP_LEVELS:
        need += G.planned_bytes(Path(m["config_folder"]), "f16") if not refusal else 0  # the f16 file first
    if m["kind"] == "adapter":
        need += int(_parameters(config)) * 2  # the bf16 merged folder
    free = _disk_free(target.parent)
    if need > free:
        warnings.append(f"not enough disk space at {target.parent}: about {need / GIB:.2f} GiB needed, "
                        f"{free / GIB:.2f} GiB free")
    extra = G.llama_cpp_available()
    if quant in G.LLAMA_CPP_LEVELS and not extra and not refusal:
        refusal = str(G.missing_extra(quant)) + f": add it with {G.EXTRA_COMMAND}"
    if m["kind"] == "adapter":
        warnings.append(f"the adapter is merged first (bf16) into {Path(home) / 'merged' / name}")
    if target.exists():
        warnings.append(f"{target} exists: exporting replaces it (confirm to overwrite)")
    return {
        "model": {"kind": m["kind"], "path": m["path"],
                  "merged_folder": m["path"] if m["kind"] == "merged" else str(Path(home) / "merged" / name),
                  "architecture": str(config.get("model_type") or ""), "gguf_architecture": arch,
                  "parameters": _parameters(config)},
        "quant": quant,
        "out": str(target),
        "out_exists": target.exists(),
        "modelfile": str(target.parent / "Modelfile") if ollama else "",
        "disk": {"need_bytes": need, "free_bytes": free},
        "size_bytes": size,
        "llama_cpp": extra,
        "refusal": refusal,
        "warnings": warnings,
    }


def _parameters(config: dict[str, Any]) -> int:
    """Parameters from config.json alone (the Llama/Qwen2 layout: embeddings, attention, MLP)."""
    try:
        h, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
        inter, vocab = int(config["intermediate_size"]), int(config["vocab_size"])
        heads = int(config["num_attention_heads"])
        kv = int(config.get("num_key_value_heads") or heads)
        dim = int(config.get("head_dim") or h // heads)
    except (KeyError, TypeError, ValueError):
        return 0
    attn = h * heads * dim * 2 + h * kv * dim * 2
    per_layer = attn + 3 * h * inter + 2 * h
    head = 0 if config.get("tie_word_embeddings") else vocab * h
    return vocab * h + layers * per_layer + h + head


# The job ------------------------------------------------------------------------------------------------------


def run_export(params: dict[str, Any], home: Path, ctx, fault: tuple[str, str] | None = None,
               record_artifact: Callable[[str, str], None] | None = None) -> dict[str, Any]:
    """(Merge,) write, verify. ``params``: the fields of ``export.start``. Emits ``export.saved``
    (and ``export.verified``); returns the job's result."""
    from backend.tiny import _no_progress_bars

    with _no_progress_bars():
        return _run_export(params, home, ctx, fault, record_artifact)


def _run_export(params: dict[str, Any], home: Path, ctx, fault, record_artifact) -> dict[str, Any]:
    quant = params.get("quant", "q8_0")
    ollama_on = bool(params.get("ollama", True))
    p = plan(params["model"], params.get("out", ""), home, quant, ollama_on)
    if p["refusal"]:
        if quant in G.LLAMA_CPP_LEVELS and not p["llama_cpp"]:
            raise G.missing_extra(quant)
        raise JobError(p["refusal"], where=f"model = {params['model']}")
    out = Path(p["out"])
    if p["out_exists"] and not params.get("overwrite", False):
        raise JobError(f"{out} exists", where=f"out = {out}", hint="confirm to overwrite it, or choose another name")
    if p["disk"]["need_bytes"] > p["disk"]["free_bytes"]:
        raise JobError(f"not enough disk space for the export at {out.parent}: about "
                       f"{p['disk']['need_bytes'] / GIB:.2f} GiB needed, {p['disk']['free_bytes'] / GIB:.2f} GiB free",
                       where=f"out = {out}", hint="free disk space, choose another folder, or a smaller level")
    for w in p["warnings"]:
        if "exists" not in w:
            ctx.emit("log", {"level": "warning" if "disk" in w else "info", "message": w})
    _clean_stale(out)
    m = p["model"]
    folder = Path(m["merged_folder"])
    adapter = m["path"] if m["kind"] == "adapter" else ""
    if adapter:
        from backend import merge

        merge.run_merge({"adapter": adapter, "out": str(folder), "dtype": "bf16", "into": "dequantized"
                         if _trained_4bit(adapter, home) else "original", "verify": False,
                         "overwrite": folder.exists()}, home, ctx, record_artifact=record_artifact)
        ctx.check_cancelled()
    report = ctx.progress
    cancelled = lambda: ctx.cancelled  # noqa: E731
    at = _fault_fn(fault)
    t0 = time.perf_counter()
    if quant in G.PYTHON_LEVELS:
        written = G.write_gguf(folder, out, quant, name=out.stem, report=report, cancelled=cancelled, fault=at)
    else:
        f16 = out.parent / f".{out.stem}{G.TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}-f16.gguf"
        try:
            written = G.write_gguf(folder, f16, "f16", name=out.stem, report=report, cancelled=cancelled, fault=at)
            ctx.check_cancelled()
            report("quantizing", 0, 1, "", f"llama.cpp {quant}")
            G.quantize_llama_cpp(f16, out, quant)
            report("quantizing", 1, 1, "", f"llama.cpp {quant}")
        finally:
            f16.unlink(missing_ok=True)
        written = {**written, "path": str(out), "size_bytes": out.stat().st_size}
    write_s = time.perf_counter() - t0
    vocab: G.VocabFacts = written["vocab"]
    modelfile_path, template, notes = "", "", list(written["notes"])
    if ollama_on:
        report("modelfile", 0, 1, "", "Modelfile")
        try:
            modelfile_path, template = write_modelfile(folder, out, vocab)
        except JobError as exc:
            notes.append(f"no Modelfile: {exc}" + (f" ({exc.hint})" if exc.hint else ""))
            ctx.emit("log", {"level": "warning", "message": notes[-1]})
        report("modelfile", 1, 1, "", "Modelfile")
    if record_artifact is not None:
        try:
            record_artifact("gguf", str(out))
        except Exception:
            pass
    saved = {"path": str(out), "size_bytes": out.stat().st_size, "quant": quant, "write_s": round(write_s, 3),
             "tensors": written["tensors"], "modelfile": modelfile_path, "merged_folder": str(folder), "notes": notes}
    ctx.emit("export.saved", saved)
    result = {**saved, "verify": None}
    if params.get("verify", True):
        texts = None
        if adapter:
            texts = adapter
        result["verify"] = verify(str(folder), str(out), home, ctx, quant=quant, adapter=texts,
                                  prompts=list(params.get("prompts") or []), template=template)
    return result


def _trained_4bit(adapter: str, home: Path) -> bool:
    from backend import adapters

    try:
        return adapters.base_settings_for(adapter, home).precision == "4bit"
    except Exception:
        return False


def _clean_stale(out: Path) -> None:
    """Temporary files of exports whose process is gone (a killed export leaves one)."""
    from backend.merge import _pid_alive

    if not out.parent.is_dir():
        return
    for entry in out.parent.iterdir():
        name = entry.name
        if not name.startswith(".") or G.TMP_MARK not in name:
            continue
        m = re.search(re.escape(G.TMP_MARK) + r"(\d+)-", name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))) and entry.is_file():
            entry.unlink(missing_ok=True)


def write_modelfile(folder: Path, out: Path, vocab: G.VocabFacts) -> tuple[str, str]:
    """The Modelfile beside ``out`` (temporary file renamed into place): (its path, TEMPLATE)."""
    from transformers import AutoTokenizer

    from backend import ollama

    tok = AutoTokenizer.from_pretrained(str(folder))
    template = ollama.ollama_template(tok, vocab.add_bos)
    if '"""' in template:
        raise JobError('the chat template holds """, which a Modelfile cannot quote', where="chat_template",
                       hint="write TEMPLATE in the Modelfile by hand")
    stops = list(vocab.stop_tokens)
    # A fine-tune that skips its end-of-turn token still stops where the next turn would begin.
    pieces = ollama.measure(tok)
    control = {t for t, ty in zip(vocab.tokens, vocab.types) if ty == 3}
    for piece in (pieces["user_start"].strip(), pieces["generation"].strip()):
        if piece and piece in control and piece not in stops:
            stops.append(piece)
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
    text = ollama.modelfile(out.name, template, stops, ollama.generation_parameters(gen))
    path = out.parent / "Modelfile"
    tmp = out.parent / f".Modelfile{G.TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return str(path), template


# Verification --------------------------------------------------------------------------------------------------


def _round_matrices(model, dtype) -> None:
    """Every matrix of ``model`` rounded to ``dtype`` and back (what a 16-bit file stores)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(p.to(dtype).to(p.dtype))


def _score(model, sequences, prompts_ids, device: str, cancelled) -> dict[str, Any]:
    """Perplexity over ``sequences`` ((ids, mask)), logits of each prompt, and greedy continuations."""
    import torch

    from backend.evaluate import perplexity

    def logits_of(ids):
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu()

    ppl, tokens = perplexity(logits_of, sequences, cancelled)
    logits = [logits_of(ids) for ids in prompts_ids]
    greedy = []
    with torch.no_grad():
        for ids in prompts_ids:
            out = model.generate(input_ids=torch.tensor([ids], device=device), max_new_tokens=GREEDY_TOKENS,
                                 do_sample=False, pad_token_id=model.config.pad_token_id or 0)
            greedy.append(out[0, len(ids):].tolist())
    return {"perplexity": ppl, "tokens": tokens, "logits": logits, "greedy": greedy}


def verify(folder: str, gguf_path: str, home: Path, ctx, quant: str = "", adapter: str | None = None,
           prompts: list[str] | None = None, template: str = "", device: str = "") -> dict[str, Any]:
    """The verification table (``export.verified``): the GGUF read back by transformers against
    the merged folder, each in fp32, one model at a time (logits kept on the CPU)."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backend import evaluate, models, ollama
    from backend.merge import DEFAULT_PROMPTS

    report = ctx.progress
    cancelled = lambda: ctx.cancelled  # noqa: E731
    folder_p, gguf_p = Path(folder), Path(gguf_path)
    device = device or models.resolve_device("auto")
    steps = 3
    report("verifying", 0, steps, "", "loading the merged model")
    tok = AutoTokenizer.from_pretrained(str(folder_p))
    prompts = [p for p in (prompts or []) if p.strip()] or list(DEFAULT_PROMPTS)
    prompts_ids = [list(tok(p)["input_ids"]) for p in prompts]
    sequences, texts = [], ""
    if adapter:
        try:
            sequences, texts = evaluate.validation_sequences(adapter, home, tok)
        except JobError as exc:
            texts = f"no validation rows ({exc}): the prompts instead"
    if not sequences:
        sequences = [(ids, [1] * len(ids)) for ids in prompts_ids]
        texts = texts or f"the {len(prompts)} verification prompts (a merged folder names no run to take " \
                         "validation rows from)"
    level_dtype = "bf16" if quant == "bf16" else "fp16"
    merged = AutoModelForCausalLM.from_pretrained(str(folder_p), dtype=torch.float32, device_map={"": device})
    merged.eval()
    ref = _score(merged, sequences, prompts_ids, device, cancelled)
    if cancelled():
        raise JobCancelled()
    report("verifying", 1, steps, "", f"noise floor ({level_dtype})")
    _round_matrices(merged, torch.bfloat16 if level_dtype == "bf16" else torch.float16)
    with torch.no_grad():
        rounded = [merged(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in prompts_ids]
    noise = max(float((a - b).abs().max()) for a, b in zip(rounded, ref["logits"]))
    del merged, rounded
    gc.collect()
    if cancelled():
        raise JobCancelled()
    report("verifying", 2, steps, "", "loading the GGUF")
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_p.parent), gguf_file=gguf_p.name, dtype=torch.float32,
                                                      device_map={"": device})
    gguf_model.eval()
    got = _score(gguf_model, sequences, prompts_ids, device, cancelled)
    del gguf_model
    gc.collect()
    diff = max(float((a - b).abs().max()) for a, b in zip(got["logits"], ref["logits"]))
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(got["logits"], ref["logits"]))
    positions = sum(a.shape[0] for a in ref["logits"])
    greedy_same = sum(a == b for a, b in zip(got["greedy"], ref["greedy"]))
    # The tokenizer inside the file: template, EOS, and a conversation tokenised the same. The
    # special tokens and the BOS flag are read from the file's own metadata, as llama.cpp reads
    # them: transformers 5.17's GGUF tokenizer took EOS for `<s>` and added no BOS on files that
    # say eos 2 and add_bos_token true (5.25 reads them right; bench/README.md, GGUF export).
    gtok = AutoTokenizer.from_pretrained(str(gguf_p.parent), gguf_file=gguf_p.name)
    special = G.read_special(gguf_p)
    bos = [special["bos"]] if special.get("add_bos") and special.get("bos") is not None else []
    conv = [{"role": r, "content": c} for r, c in ollama.CHECK_CONVERSATIONS[3]]
    checks: dict[str, Any] = {"chat_template": None, "eos": tok.eos_token_id == special.get("eos"),
                              "conversation_tokens": None, "modelfile_template": None}
    if tok.chat_template:
        checks["chat_template"] = gtok.chat_template == tok.chat_template
        want = list(tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=True)
                    ["input_ids"])
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        checks["conversation_tokens"] = list(gtok(text, add_special_tokens=False)["input_ids"]) == want
        if template:
            # What Ollama sends llama.cpp: the Go template's text, with BOS in front where the file
            # asks for it (add_bos_token).
            rendered = gtok(ollama.render_go(template, conv), add_special_tokens=False)["input_ids"]
            checks["modelfile_template"] = bos + list(rendered) == want
    rows = [
        {"model": "merged", "perplexity": ref["perplexity"], "max_abs_logit_diff": None, "top1_agreement": None,
         "greedy_same": None, "size_bytes": evaluate.weights_bytes(folder_p)},
        {"model": f"gguf {quant}", "perplexity": got["perplexity"], "max_abs_logit_diff": diff,
         "top1_agreement": agree / positions if positions else None,
         "greedy_same": f"{greedy_same}/{len(prompts_ids)}", "size_bytes": gguf_p.stat().st_size},
    ]
    report("verifying", steps, steps, "", "")
    result = {"path": str(gguf_p), "quant": quant, "rows": rows, "noise_floor": noise, "noise_dtype": level_dtype,
              "checks": checks, "texts": texts, "prompts": len(prompts), "dtype": "fp32"}
    ctx.emit("export.verified", result)
    return result


def format_table(v: dict[str, Any]) -> str:
    """The verification table as text (``qlw export --verify`` and the bench)."""
    head = (f"{'model':<12}  {'perplexity':>10}  {'max |Δlogit|':>12}  {'top-1 agree':>11}  {'greedy same':>11}  "
            f"{'size':>11}")
    lines = [head]
    for r in v["rows"]:
        def f(x, spec):
            return "—" if x is None else format(x, spec)

        size = "—" if r["size_bytes"] is None else f"{r['size_bytes'] / MIB:,.2f} MiB"
        lines.append(f"{r['model']:<12}  {f(r['perplexity'], '.4f'):>10}  {f(r['max_abs_logit_diff'], '.3e'):>12}  "
                     f"{f(r['top1_agreement'], '.2%'):>11}  {r['greedy_same'] or '—':>11}  {size:>11}")
    lines.append(f"noise floor of a {v['noise_dtype']} file: max |Δlogit| {v['noise_floor']:.3e} (the merged model's "
                 f"matrices rounded to {v['noise_dtype']}); {v['prompts']} prompts, computed in {v['dtype']}")
    lines.append(f"perplexity on {v['texts']}")
    marks = {True: "yes", False: "NO", None: "—"}
    c = v["checks"]
    lines.append(f"inside the file: chat template {marks[c['chat_template']]}, EOS {marks[c['eos']]}, a conversation "
                 f"tokenised the same {marks[c['conversation_tokens']]}, Modelfile TEMPLATE the same "
                 f"{marks[c['modelfile_template']]}")
    return "\n".join(lines)


# The backend's requests -------------------------------------------------------------------------------------


def export_job(params: P.StartExport, home: Path, store=None):
    fault = take_fault()

    def run(ctx) -> dict[str, Any]:
        record = (lambda kind, path: store.add_artifact(ctx.session, kind, path)) if store is not None else None
        return run_export(P.to_dict(params), home, ctx, fault=fault, record_artifact=record)

    return run


def _refusal(exc: JobError) -> P.Reply:
    from backend.merge import _refusal as refusal

    return refusal(exc)


def register(server) -> None:
    """Add the export.* requests to a :class:`backend.server.BackendServer`."""
    import asyncio

    home = server.home

    async def export_plan(client, params: P.ExportPlan) -> P.Reply:
        try:
            result = await asyncio.to_thread(plan, params.model, params.out, home, params.quant, params.ollama)
        except JobError as exc:
            return _refusal(exc)
        return P.Reply("", "ok", result)

    async def export_start(client, params: P.StartExport) -> P.Reply:
        try:
            p = await asyncio.to_thread(plan, params.model, params.out, home, params.quant, params.ollama)
            if p["refusal"]:
                if params.quant in G.LLAMA_CPP_LEVELS and not p["llama_cpp"]:
                    raise G.missing_extra(params.quant)
                raise JobError(p["refusal"], where=f"model = {params.model}")
        except JobError as exc:
            return _refusal(exc)
        if p["out_exists"] and not params.overwrite:
            return P.Reply("", "refused", {"out": p["out"]}, code=P.CONFIRM,
                           reason=f"{p['out']} exists: confirm to overwrite it (replaced only once the new file "
                                  "is complete)")
        return server._start_job("export.start", params, export_job(params, home, server.store))

    server.handlers.update({"export.plan": export_plan, "export.start": export_start})


# `qlw export`: headless -----------------------------------------------------------------------------------------


def add_cli_arguments(parser) -> None:
    """The options of ``python -m backend export`` (and so of ``qlw export``)."""
    parser.add_argument("model", help="a merged model folder, or an adapter folder (merged first, into merged/)")
    parser.add_argument("out", nargs="?", default="",
                        help="the .gguf file, or a folder for <model>-<quant>.gguf (relative: under the data "
                             "home's exports/)")
    parser.add_argument("--quant", default="q8_0", choices=P.EXPORT_LEVELS,
                        help=f"f16, bf16, q8_0 (default; written in Python), q4_k_m, q5_k_m (need llama-cpp-python: "
                             f"{G.EXTRA_COMMAND})")
    parser.add_argument("--ollama", action="store_true", help="write an Ollama Modelfile beside the file")
    parser.add_argument("--verify", action="store_true",
                        help="read the file back and compare it with the merged model (perplexity, logits, greedy, "
                             "tokenizer)")
    parser.add_argument("--prompt", action="append", default=[], help="a verification prompt (repeatable)")
    parser.add_argument("--yes", action="store_true", help="replace an existing file")
    parser.add_argument("--home", type=Path, default=None, help="data home (default: $QLW_HOME or the user data dir)")


def cli(args) -> int:
    """``qlw export MODEL OUT``: 0 done; 1 failed; 2 refused (bad input, unsupported model, missing
    extra, existing file without --yes); 130 ctrl+c."""
    import logging
    import sys
    import warnings

    from backend.train import LocalRun, _PlainPrinter, _RichPrinter
    from sessions.store import Store

    home = (args.home or P.data_home()).expanduser().resolve()
    if logging.getLogger().getEffectiveLevel() >= logging.WARNING:
        warnings.filterwarnings("ignore")
        for name in ("transformers", "peft", "accelerate", "huggingface_hub", "gguf"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        p = plan(args.model, args.out, home, args.quant, args.ollama)
        if p["refusal"]:
            if args.quant in G.LLAMA_CPP_LEVELS and not p["llama_cpp"]:
                raise G.missing_extra(args.quant)
            raise JobError(p["refusal"], where=f"model = {args.model}")
    except JobError as exc:
        print_job_error("export", exc)
        return 2
    mdl = p["model"]
    print(f"model: {mdl['path']} ({mdl['kind']}; {mdl['architecture']} -> GGUF {mdl['gguf_architecture']}; "
          f"{mdl['parameters']:,} parameters)")
    print(f"out: {p['out']} ({args.quant}, about {p['size_bytes'] / MIB:,.1f} MiB; disk {p['disk']['need_bytes'] / GIB:.2f} "
          f"GiB of {p['disk']['free_bytes'] / GIB:.1f} GiB free)")
    for w in p["warnings"]:
        print(f"note: {w}", file=sys.stderr)
    if p["out_exists"] and not args.yes:
        print(f"qlw export: {p['out']} exists: pass --yes to replace it (only once the new one is complete)",
              file=sys.stderr)
        return 2
    home.mkdir(parents=True, exist_ok=True)
    store = Store(home / "sessions.db")
    info = store.create_session(f"qlw export {Path(args.model).name}")
    printer = _RichPrinter() if sys.stdout.isatty() else _PlainPrinter()

    def on_event(kind: str, payload: dict[str, Any]) -> None:
        if kind == "export.saved":
            printer.line(f"saved {payload['path']}: {payload['size_bytes'] / MIB:,.2f} MiB, {payload['tensors']} "
                         f"tensors in {payload['write_s']:.1f} s" + (f"; {payload['modelfile']}" if payload["modelfile"]
                                                                     else ""))
            for note in payload.get("notes") or []:
                printer.line(f"note: {note}")
        elif kind == "export.verified":
            for line in format_table(payload).splitlines():
                printer.line(line)
        else:
            printer.event(kind, payload)

    run = LocalRun(store, info.id, on_event)
    store.set_status(info.id, "running")
    params = {"model": args.model, "out": args.out, "quant": args.quant, "ollama": args.ollama,
              "verify": args.verify, "overwrite": args.yes, "prompts": args.prompt}
    run.emit("job.started", {"job_id": run.job_id, "kind": "export.start", "params": params})
    status, code, error, result = "done", 0, None, {}
    t0 = time.monotonic()
    try:
        with printer:
            result = run_export(params, home, run, fault=take_fault(),
                                record_artifact=lambda kind, path: store.add_artifact(info.id, kind, path))
    except (JobCancelled, KeyboardInterrupt):
        status, code = "cancelled", 130
    except JobError as exc:
        status = "failed"
        error = {"message": str(exc), "where": exc.where, "hint": exc.hint}
        print_job_error("export", exc)
        code = 1
    run.finish("export.start", status, time.monotonic() - t0, result, error)
    return code
