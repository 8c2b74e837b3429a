"""A merged transformers folder as one GGUF file (issue 17): the converter behind backend/export.py.

Written on the ``gguf`` package (PyPI 0.19.0, llama.cpp's own gguf-py): its ``GGUFWriter``, its
tensor-name maps (``gguf.get_tensor_name_map``), its ``SpecialVocab`` for merges and special
token ids, and its Python quantisers (``gguf.quants``) for F16, BF16 and Q8_0. llama.cpp's
``convert_hf_to_gguf.py`` is the reference converter but is not on PyPI and needs a newer gguf-py
than PyPI's; README.md ("GGUF export") says why this is a converter of its own, and what it covers:

- families: ``llama`` and ``mistral`` (llama.cpp's ``llama`` architecture, whose rotary embedding
  pairs neighbouring dimensions: the q and k projections are permuted from transformers'
  half-split order, the permutation transformers' GGUF loader undoes), and ``qwen2`` (llama.cpp's
  ``qwen2``: neox-style rotary, no permutation; q/k/v biases). Anything else is refused by name.
- the tokenizer from ``tokenizer.json``: byte-level BPE (``gpt2`` in llama.cpp's words, with the
  pre-tokenizer named when it is one llama.cpp knows: GPT-2's, Llama 3's, Qwen2's) or
  SentencePiece-style BPE with byte fallback (``llama``: Llama 2, Mistral); the chat template;
  BOS/EOS/UNK/PAD ids; whether BOS/EOS are added (read from what the tokenizer does, not from a
  flag); the generation stop tokens (``eot``/``eog``).
- one tensor at a time from the safetensors files (never the whole model in memory): 1-D
  tensors (norms, biases) stay F32 as llama.cpp keeps them; a matrix whose rows do not divide
  into the level's blocks falls back to F16 (said in the result).

The file is written under a temporary name in the target's folder and renamed into place when
complete (:func:`write_gguf`), so a crash or a kill never leaves a partial file under the name.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from backend.jobs import JobCancelled, JobError

#: transformers ``model_type`` -> llama.cpp architecture written into the file.
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
#: Levels written here in Python (gguf.quants), and the llama.cpp ftype each one declares.
PYTHON_LEVELS = ("f16", "bf16", "q8_0")
#: k-quants made by llama.cpp's own quantizer (llama-cpp-python, the optional extra), from an f16
#: file written here first: ``llama_ftype`` values of llama.h.
LLAMA_CPP_LEVELS = {"q4_k_m": 15, "q5_k_m": 17}
LEVELS = (*PYTHON_LEVELS, *LLAMA_CPP_LEVELS)
#: The one command that adds the k-quants.
EXTRA_COMMAND = 'pip install "qlw[gguf]"'
TMP_MARK = ".qlw-export-"


def _qtype(level: str):
    import gguf

    return {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
            "q8_0": gguf.GGMLQuantizationType.Q8_0}[level]


def _ftype(level: str):
    import gguf

    return {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[level]


# The model -------------------------------------------------------------------------------------------


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobError(f"{folder} has no config.json: not a transformers model folder", where=str(folder),
                       hint="give a merged model folder (qlw merge writes one) or an adapter folder") from None
    except (OSError, ValueError) as exc:
        raise JobError(f"cannot read {path}: {exc}", where=str(path)) from None


def check_architecture(config: dict[str, Any], where: str = "") -> str:
    """The llama.cpp architecture for this config, or a JobError naming the one refused."""
    model_type = str(config.get("model_type") or "")
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        names = ", ".join(config.get("architectures") or []) or "no architectures listed"
        raise JobError(f"GGUF export supports the Llama, Mistral and Qwen2 families, not {model_type or '?'} "
                       f"({names})", where=where or f"model_type = {model_type}",
                       hint="llama.cpp's own convert_hf_to_gguf.py converts many more architectures; "
                            "qlw writes only the ones it checks against transformers' GGUF loader")
    rope = rope_settings(config)
    if rope["type"] not in ("default", "linear", "llama3"):
        raise JobError(f"the {rope['type']} rotary scaling of this {model_type} model is not written by qlw's "
                       "GGUF export", where=f"rope_scaling = {rope['raw']}",
                       hint="supported: none, linear, llama3; llama.cpp's convert_hf_to_gguf.py handles the others")
    if config.get("sliding_window") and config.get("use_sliding_window", model_type == "mistral"):
        # llama.cpp's llama architecture attends to the whole context; a window shorter than the
        # context would change the model. Mistral 7B v0.2+ sets it to null.
        window = int(config["sliding_window"])
        if window < int(config.get("max_position_embeddings") or 0):
            raise JobError(f"this model uses sliding-window attention (window {window}), which the GGUF "
                           f"{arch} architecture does not", where=f"sliding_window = {window}",
                           hint="llama.cpp's convert_hf_to_gguf.py decides how such models are written")
    return arch


def rope_settings(config: dict[str, Any]) -> dict[str, Any]:
    """theta and scaling, from transformers 5's ``rope_parameters`` or the older
    ``rope_theta``/``rope_scaling``."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = merged.get("rope_type") or merged.get("type") or "default"
    return {"theta": float(theta), "type": kind, "raw": merged or None, **{k: v for k, v in merged.items()
                                                                           if k not in ("rope_theta", "rope_type", "type")}}


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def llama3_rope_factors(config: dict[str, Any]) -> Any:
    """The per-frequency divisors of Llama 3.1's rotary scaling, as llama.cpp reads them from the
    ``rope_freqs`` tensor (the formula of Meta's reference code)."""
    import numpy as np

    rope = rope_settings(config)
    dim = head_dim(config)
    base = rope["theta"]
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def weight_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise JobError(f"{folder} has no safetensors weights", where=str(folder),
                       hint="save the model with safe_serialization (qlw merge does)")
    return files


# Tensors ------------------------------------------------------------------------------------------------


@dataclass
class TensorPlan:
    """One tensor of the file: where it comes from and what it becomes."""

    hf_name: str
    gguf_name: str
    file: str
    shape: tuple[int, ...]
    qtype: Any
    nbytes: int
    permute_heads: int = 0  # >0: llama's q/k permutation with this many heads


def permute_qk(weights, n_heads: int):
    """transformers' rotary layout (first half, second half of each head) -> GGUF llama's
    (interleaved pairs): row 2i of a head is its row i, row 2i+1 its row i + dim/2."""
    rows = weights.shape[0]
    return (weights.reshape(n_heads, 2, rows // n_heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = math.prod(shape)
    return n // block * size


def plan_tensors(folder: Path, config: dict[str, Any], level: str) -> tuple[list[TensorPlan], list[str]]:
    """Every tensor of the file, from the safetensors headers (no weights read): names mapped with
    gguf's tensor map, the type each gets; and notes (fallbacks, skipped tensors)."""
    import gguf
    from safetensors import safe_open

    arch_name = check_architecture(config)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    n_layers = int(config["num_hidden_layers"])
    name_map = gguf.get_tensor_name_map(arch, n_layers)
    target = _qtype(level)
    tied = bool(config.get("tie_word_embeddings", False))
    notes: list[str] = []
    plans: list[TensorPlan] = []
    fallback = 0
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                if tied and name == "lm_head.weight":
                    continue  # llama.cpp uses the embedding when output.weight is absent
                found = name_map.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
                if found is None:
                    raise JobError(f"the tensor {name} has no GGUF name in the {arch_name} map", where=path.name,
                                   hint="this model has parts the llama.cpp architecture does not; "
                                        "use llama.cpp's convert_hf_to_gguf.py")
                shape = tuple(int(d) for d in f.get_slice(name).get_shape())
                if len(shape) == 1:
                    qtype = gguf.GGMLQuantizationType.F32
                else:
                    qtype = target
                    block = gguf.GGML_QUANT_SIZES[target][0]
                    if shape[-1] % block:
                        qtype = gguf.GGMLQuantizationType.F16
                        fallback += 1
                heads = 0
                if arch_name == "llama" and name.endswith("self_attn.q_proj.weight"):
                    heads = int(config["num_attention_heads"])
                elif arch_name == "llama" and name.endswith("self_attn.k_proj.weight"):
                    heads = int(config.get("num_key_value_heads") or config["num_attention_heads"])
                plans.append(TensorPlan(name, found[1], path.name, shape, qtype, _nbytes(shape, qtype), heads))
    if fallback:
        notes.append(f"{fallback} matrices have rows that do not divide into {level} blocks: written in f16")
    order = {"token_embd": 0, "blk": 1, "output_norm": 2, "output": 3}
    plans.sort(key=lambda p: (order.get(p.gguf_name.split(".")[0], 1), _layer(p.gguf_name), p.gguf_name))
    return plans, notes


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def tensor_data(plan: TensorPlan, handle) -> Any:
    """The tensor as it goes into the file (numpy), read from an open safetensors ``handle``."""
    import gguf
    import numpy as np
    import torch

    t = handle.get_tensor(plan.hf_name)
    weights = t.to(torch.float32).numpy()
    if plan.permute_heads:
        weights = permute_qk(weights, plan.permute_heads)
    if plan.qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(weights, dtype=np.float32)
    return gguf.quants.quantize(np.ascontiguousarray(weights), plan.qtype)


# The tokenizer -----------------------------------------------------------------------------------------


@dataclass
class VocabFacts:
    model: str  # "gpt2" | "llama"
    pre: str
    tokens: list[str]
    scores: list[float]
    types: list[int]
    merges: list[str]
    special: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    stop_ids: list[int] = field(default_factory=list)
    stop_tokens: list[str] = field(default_factory=list)
    add_space_prefix: bool = True


def _pre_tokenizer_name(tokenizer_json: dict[str, Any], where: str) -> str:
    """llama.cpp's name for the way a byte-level BPE tokenizer splits text before merging."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    kind = pre.get("type")
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if kind == "Sequence":
        items = pre.get("pretokenizers") or []
        splits = [p for p in items if p.get("type") == "Split"]
        if len(splits) == 1 and any(p.get("type") == "ByteLevel" and not p.get("use_regex", True) for p in items):
            regex = (splits[0].get("pattern") or {}).get("Regex", "")
            known = _known_splits()
            if regex in known:
                return known[regex]
            raise JobError("the tokenizer splits text with a regular expression llama.cpp's tokenizer is not "
                           "known by qlw to share", where=f"{where}: pre_tokenizer {regex[:60]}",
                           hint="llama.cpp's convert_hf_to_gguf.py identifies many more tokenizers")
    raise JobError(f"the tokenizer's pre-tokenizer ({kind}) is not one qlw can name for llama.cpp",
                   where=f"{where}: pre_tokenizer", hint="llama.cpp's convert_hf_to_gguf.py identifies more")


def _known_splits() -> dict[str, str]:
    """Regular expressions of the byte-level tokenizers llama.cpp knows, with its names for them:
    Qwen2's (transformers' own constant) and Llama 3's (from transformers' GGUF tables, where the
    installed version has them)."""
    known: dict[str, str] = {}
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        for name in ("llama-bpe", "tekken"):
            if name in GGUF_PRE_TOKENIZER_SPLITS:
                known.setdefault(GGUF_PRE_TOKENIZER_SPLITS[name], name)
    except ImportError:
        pass
    try:
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        known[PRETOKENIZE_REGEX] = "qwen2"
    except ImportError:
        pass
    return known


def read_vocab(folder: Path, config: dict[str, Any]) -> VocabFacts:
    """The tokenizer of a model folder as GGUF metadata."""
    import gguf
    from transformers import AutoTokenizer

    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise JobError(f"{folder} has no tokenizer.json", where=str(folder),
                       hint="save the tokenizer beside the model (qlw merge does)")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    tok = AutoTokenizer.from_pretrained(str(folder))
    vocab: dict[str, int] = dict(tok.get_vocab())
    n_vocab = int(config.get("vocab_size") or len(vocab))
    added = {a["content"]: a for a in tj.get("added_tokens") or []}
    byte_fallback = bool(model.get("byte_fallback"))
    if model.get("type") != "BPE":
        raise JobError(f"the tokenizer is a {model.get('type')} model; qlw's GGUF export writes BPE tokenizers",
                       where=str(path), hint="llama.cpp's convert_hf_to_gguf.py handles the others")
    kind = "llama" if byte_fallback else "gpt2"
    pre = "default" if kind == "llama" else _pre_tokenizer_name(tj, str(path))
    by_id = {i: t for t, i in vocab.items()}
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:  # the embedding has rows beyond the tokenizer: llama.cpp wants a name for each
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(text)
        a = added.get(text)
        if a is not None:
            types.append(gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
            scores.append(0.0 if kind == "llama" else -1000.0)
        elif kind == "llama" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types.append(gguf.TokenType.BYTE)
            scores.append(0.0)
        else:
            types.append(gguf.TokenType.NORMAL)
            # SentencePiece-style BPE merges by score in llama.cpp: earlier ids were merged first.
            scores.append(-float(i) if kind == "llama" else 0.0)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    ids: dict[str, int] = {}
    for name in ("bos", "eos", "unk", "pad"):
        token = getattr(tok, f"{name}_token", None)
        tid = vocab.get(token) if isinstance(token, str) else None
        if tid is None:
            tid = special.special_token_ids.get(name)
        if tid is not None:
            ids[name] = int(tid)
    probe = tok("a", add_special_tokens=True)["input_ids"]
    bare = tok("a", add_special_tokens=False)["input_ids"]
    add_bos = "bos" in ids and len(probe) > len(bare) and probe[0] == ids["bos"]
    add_eos = "eos" in ids and len(probe) > len(bare) and probe[-1] == ids["eos"]
    stop_ids = _stop_ids(folder, config, ids)
    # SentencePiece style: a space is put before the text (Llama 2, Mistral) unless the tokenizer
    # says otherwise; llama.cpp reads this flag.
    space_prefix = "Prepend" in json.dumps(tj.get("normalizer")) or \
        (tj.get("pre_tokenizer") or {}).get("prepend_scheme", "never") != "never"
    return VocabFacts(add_space_prefix=space_prefix, model=kind, pre=pre, tokens=tokens, scores=scores, types=[int(t) for t in types],
                      merges=list(special.merges), special=ids, add_bos=add_bos, add_eos=add_eos,
                      chat_template=tok.chat_template if isinstance(tok.chat_template, str) else None,
                      stop_ids=stop_ids, stop_tokens=[tokens[i] for i in stop_ids if 0 <= i < len(tokens)])


def _stop_ids(folder: Path, config: dict[str, Any], ids: dict[str, int]) -> list[int]:
    """The tokens generation stops at: generation_config.json's eos_token_id (one or a list), the
    config's, the tokenizer's EOS."""
    found: list[int] = []

    def add(value) -> None:
        for v in (value if isinstance(value, list) else [value]):
            if isinstance(v, int) and v not in found:
                found.append(v)

    gen = Path(folder) / "generation_config.json"
    if gen.is_file():
        try:
            add(json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id"))
        except (OSError, ValueError):
            pass
    add(config.get("eos_token_id"))
    if "eos" in ids:
        add(ids["eos"])
    return found


# Writing ---------------------------------------------------------------------------------------------


def _metadata(writer, config: dict[str, Any], arch: str, vocab: VocabFacts, level: str, name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_type("model")
    writer.add_quantized_by("qlw")
    writer.add_context_length(int(config.get("max_position_embeddings") or 4096))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    heads = int(config["num_attention_heads"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    dim = head_dim(config)
    writer.add_rope_dimension_count(dim)
    if dim != int(config["hidden_size"]) // heads:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps") or 1e-6))
    rope = rope_settings(config)
    writer.add_rope_freq_base(rope["theta"])
    if rope["type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope.get("factor", 1.0)))
    writer.add_vocab_size(len(vocab.tokens))
    writer.add_file_type(_ftype(level))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for key, tid in vocab.special.items():
        getattr(writer, f"add_{key}_token_id")(tid)
    if vocab.model == "llama":
        writer.add_add_space_prefix(vocab.add_space_prefix)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
    eos = vocab.special.get("eos")
    others = [i for i in vocab.stop_ids if i != eos]
    if others:
        # llama.cpp ends a turn at EOS and at these (e.g. Llama 3's <|eot_id|>); Ollama reads them too.
        writer.add_eot_token_id(others[0])


def write_gguf(folder: Path, out: Path, level: str, *, name: str = "",
               report: Callable[..., None] = lambda *a, **k: None,
               cancelled: Callable[[], bool] = lambda: False,
               fault: Callable[[str], None] = lambda stage: None) -> dict[str, Any]:
    """Write ``folder`` (a merged transformers model) as ``out`` at ``level`` (f16, bf16, q8_0),
    through a temporary file in ``out``'s folder renamed into place. Progress ``writing`` by tensor.
    Returns ``{"path", "size_bytes", "tensors", "notes", "vocab": VocabFacts}``."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    if level not in PYTHON_LEVELS:
        raise JobError(f"{level} is not written in Python", where=f"quant = {level}")
    folder, out = Path(folder), Path(out)
    config = read_config(folder)
    arch = check_architecture(config, where=str(folder / "config.json"))
    plans, notes = plan_tensors(folder, config, level)
    vocab = read_vocab(folder, config)
    rope = rope_settings(config)
    extra = []
    if arch == "llama" and rope["type"] == "llama3":
        extra.append(("rope_freqs.weight", llama3_rope_factors(config)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    writer = gguf.GGUFWriter(None, arch)
    try:
        name = name or folder.name
        if name.strip().lower() == "mistral":
            # transformers' GGUF loader takes a file named exactly "mistral" for an architecture
            # gguf-py does not map, and cannot read it back.
            name = f"{name}-{level}"
        _metadata(writer, config, arch, vocab, level, name)
        for tname, data in extra:
            writer.add_tensor_info(tname, data.shape, data.dtype, data.nbytes)
        for p in plans:
            if p.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dtype = {gguf.GGMLQuantizationType.F32: "float32", gguf.GGMLQuantizationType.F16: "float16"}[p.qtype]
                writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(dtype), p.nbytes)
            else:
                writer.add_tensor_info(p.gguf_name, gguf.quants.quant_shape_to_byte_shape(p.shape, p.qtype),
                                       np.dtype(np.uint8), p.nbytes, raw_dtype=p.qtype)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, data in extra:
            writer.write_tensor_data(data)
        total = len(plans)
        report("writing", 0, total, "tensors", "")
        handles: dict[str, Any] = {}
        try:
            for i, p in enumerate(plans):
                if cancelled():
                    raise JobCancelled()
                if p.file not in handles:
                    handles[p.file] = safe_open(str(folder / p.file), framework="pt").__enter__()
                data = tensor_data(p, handles[p.file])
                if data.nbytes != p.nbytes:
                    raise JobError(f"{p.hf_name}: {data.nbytes} bytes where {p.nbytes} were planned",
                                   where=p.file)
                writer.write_tensor_data(data)
                report("writing", i + 1, total, "tensors", p.gguf_name)
                if i + 1 == max(1, total // 2):
                    fault("writing")
        finally:
            for h in handles.values():
                h.__exit__(None, None, None)
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        writer.close()
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    return {"path": str(out), "size_bytes": out.stat().st_size, "tensors": len(plans) + len(extra),
            "notes": notes, "vocab": vocab, "arch": arch}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_special(path: Path) -> dict[str, Any]:
    """The special tokens a GGUF file declares, as llama.cpp reads them: ``bos``, ``eos``, ``pad``
    (ids or None) and ``add_bos`` / ``add_eos`` (bool or None). Reads the metadata only."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def field(key: str):
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    return {"bos": field("tokenizer.ggml.bos_token_id"), "eos": field("tokenizer.ggml.eos_token_id"),
            "pad": field("tokenizer.ggml.padding_token_id"), "add_bos": field("tokenizer.ggml.add_bos_token"),
            "add_eos": field("tokenizer.ggml.add_eos_token")}


def planned_bytes(folder: Path, level: str) -> int:
    """About how large the file will be at ``level`` (tensors only; k-quants estimated by their
    bits per weight)."""
    config = read_config(folder)
    if level in PYTHON_LEVELS:
        plans, _ = plan_tensors(folder, config, level)
        return sum(p.nbytes for p in plans)
    plans, _ = plan_tensors(folder, config, "f16")
    bits = {"q4_k_m": 4.85, "q5_k_m": 5.7}[level]  # llama.cpp's quoted bits per weight for a 7B
    return int(sum(math.prod(p.shape) for p in plans) * bits / 8)


# k-quants through llama.cpp -----------------------------------------------------------------------------


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def missing_extra(level: str) -> JobError:
    return JobError(f"{level} is a k-quant: only llama.cpp's quantizer makes it, and llama-cpp-python is not "
                    "installed", where=f"quant = {level}",
                    hint=f"add it with: {EXTRA_COMMAND}  (compiles llama.cpp, about 25 min on 2 cores); "
                         "or export f16, bf16 or q8_0, which need nothing more")


def quantize_llama_cpp(src: Path, out: Path, level: str) -> None:
    """llama.cpp's ``llama_model_quantize`` from the f16 file ``src`` to ``out`` at ``level``
    (through a temporary file renamed into place)."""
    if not llama_cpp_available():
        raise missing_extra(level)
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_CPP_LEVELS[level]
    params.nthread = os.cpu_count() or 1
    tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise JobError(f"llama.cpp's quantizer failed (return code {rc}) making {level} from {src.name}",
                           where=str(src), hint="the backend log has llama.cpp's own message")
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
