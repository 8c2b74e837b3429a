"""GGUF and Ollama export (backend/export.py, backend/gguf_convert.py, backend/ollama.py; the
Merge wizard's Export step).
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from backend.protocol.core import event, request


# --------------------------------------------------------------------------------------------
# GGUF and Ollama export (backend/export.py, backend/gguf_convert.py, backend/ollama.py; the
# Merge wizard's Export step). A merged folder (or an adapter, merged first) becomes one GGUF file
# with its tokenizer, chat template and stop tokens, optionally an Ollama Modelfile beside it, and
# is checked against the merged model it came from.

#: f16/bf16/q8_0 are written in Python (gguf); q4_k_m/q5_k_m need llama-cpp-python (``qlw[gguf]``).
EXPORT_LEVELS = ("f16", "bf16", "q8_0", "q4_k_m", "q5_k_m")


@request("export.plan")
class ExportPlan:
    """What an export will take, without loading a model: ``{"model": {"kind": "merged" |
    "adapter", "path", "merged_folder", "architecture", "gguf_architecture", "parameters"},
    "quant", "out" (the .gguf path), "out_exists", "modelfile" (path or ""), "disk": {"need_bytes",
    "free_bytes"}, "size_bytes" (the file's estimated size), "llama_cpp" (the extra installed),
    "refusal" (why it cannot run, "" when it can), "warnings": [str]}``. ``out``: a .gguf path, or
    a folder (the file is named after the model and level); relative paths are under the data
    home's exports/; empty: exports/<model>-<level>.gguf."""

    model: str
    out: str = ""
    quant: str = "q8_0"
    ollama: bool = True


@request("export.start")
class StartExport:
    """Job: (an adapter is merged first, as ``merge.start`` does, into merged/) write the GGUF at
    ``quant`` through a temporary file renamed into place, the Modelfile beside it with
    ``ollama``, then verify with ``verify`` (``export.verified``). Refused with code ``confirm``
    when the file exists and ``overwrite`` is false, and with the command that adds the extra for
    a k-quant without llama-cpp-python. Progress stages: the merge's, ``writing`` (tensors),
    ``quantizing``, ``modelfile``, ``verifying``. Result: ``{"path", "size_bytes", "quant",
    "modelfile", "merged_folder", "verify": export.verified payload or None}``."""

    model: str
    out: str = ""
    quant: str = "q8_0"
    ollama: bool = True
    verify: bool = True
    overwrite: bool = False
    prompts: list[str] = field(default_factory=list)


@event("export.saved")
class ExportSaved:
    """The GGUF is complete at ``path`` (and the Modelfile, when asked): size, time, notes (e.g.
    tensors kept in f16)."""

    path: str
    size_bytes: int
    quant: str
    write_s: float
    tensors: int = 0
    modelfile: str = ""
    merged_folder: str = ""
    notes: list[str] = field(default_factory=list)


@event("export.verified")
class ExportVerified:
    """The GGUF read back (transformers' ``gguf_file=`` path, dequantised) against the merged
    model: ``rows`` of ``{"model": "merged" | "gguf <level>", "perplexity", "max_abs_logit_diff",
    "top1_agreement", "greedy_same", "size_bytes"}``; ``noise_floor``: max |logit diff| of the
    merged model with its matrices rounded to ``noise_dtype`` (what a 16-bit file costs at best);
    ``checks``: ``{"chat_template", "eos", "conversation_tokens", "modelfile_template"}`` each
    true/false (or None when not applicable); ``texts``: where the perplexity rows came from."""

    path: str
    quant: str
    rows: list[dict[str, Any]]
    noise_floor: float
    noise_dtype: str
    checks: dict[str, Any]
    texts: str = ""
    prompts: int = 0
    dtype: str = "fp32"
