"""Base models' settings and sources: the ML stack imported once (:func:`import_ml_stack`), the
settings checked (:func:`validate_settings`), a local folder told from a Hub id (:func:`resolve_source`,
failing at once for an uncached Hub id when offline), its ``config.json`` read and checked, its shards.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend import protocol as P
from backend.jobs import JobError


MIB = 1024 * 1024
GIB = 1024 * MIB

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
#: 8-bit (LLM.int8) multiplies in fp16: the modules it leaves unquantized are loaded in fp16.
INT8_DTYPE = "fp16"
#: The config keys an estimate cannot do without (or their alias in the config class).
REQUIRED_CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
_TRUE = {"1", "true", "yes", "on"}
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


# Imports -------------------------------------------------------------------------------------

_IMPORTED = threading.Event()


def import_ml_stack() -> None:
    """Import torch, transformers, accelerate and bitsandbytes (when installed) once, in a
    throwaway thread.

    Why a thread: on a CPU with AVX512-BF16, importing bitsandbytes logs an exception object
    (an optional kernel package is missing). A handler that keeps log records (pytest's does)
    keeps that exception's traceback, hence every frame that was on the stack during the import,
    hence their locals: imported from inside a load, the first model loaded would never be freed.
    """
    if _IMPORTED.is_set():
        return

    def run() -> None:
        import accelerate  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401

        if importlib.util.find_spec("bitsandbytes") is not None:
            try:
                import bitsandbytes  # noqa: F401
            except Exception:  # a broken install: the quantized precisions will say so
                pass

    thread = threading.Thread(target=run, name="qlw-import-ml", daemon=True)
    thread.start()
    thread.join()
    _IMPORTED.set()


# Settings ------------------------------------------------------------------------------------


def settings_from_dict(data: dict[str, Any]) -> P.ModelSettings:
    """A :class:`~backend.protocol.ModelSettings` from plain data (e.g. a recorded session)."""
    return P.build(P.ModelSettings, data, "model settings")


def validate_settings(s: P.ModelSettings) -> None:
    """Refuse settings that name an unknown choice, saying which field and what is allowed."""
    choices = {
        "precision": P.MODEL_PRECISIONS,
        "quant_type": P.MODEL_QUANT_TYPES,
        "compute_dtype": P.MODEL_COMPUTE_DTYPES,
        "attn_implementation": P.MODEL_ATTN_IMPLEMENTATIONS,
    }
    for name, allowed in choices.items():
        value = getattr(s, name)
        if value not in allowed:
            raise JobError(f"{name} must be one of {', '.join(allowed)}", where=f"{name} = {value!r}")
    if not s.source.strip():
        raise JobError("no model source given", where="source",
                       hint="type a model folder or a Hub id such as mistralai/Mistral-7B-v0.3")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", s.device):
        raise JobError("device must be auto, cpu, cuda or cuda:N", where=f"device = {s.device!r}")
    if s.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise JobError("flash_attention_2 needs the flash-attn package, which is not installed",
                       where="attn_implementation = 'flash_attention_2'",
                       hint="choose sdpa (PyTorch's own fused attention), or install flash-attn")


def describe_precision(s: P.ModelSettings) -> str:
    """The precision in words: ``4-bit nf4 + double quant, compute bf16``, ``8-bit``, ``bf16``."""
    if s.precision == "4bit":
        dq = " + double quant" if s.double_quant else ""
        return f"4-bit {s.quant_type}{dq}, compute {s.compute_dtype}"
    if s.precision == "8bit":
        return "8-bit (LLM.int8), fp16 elsewhere"
    return s.precision


# Where the model comes from --------------------------------------------------------------------


def hub_offline() -> bool:
    """True when the Hub must not be asked: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``),
    read now rather than when huggingface_hub was imported."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return True
    return False


@dataclass
class Source:
    """A resolved model source: a local ``folder``, or a Hub ``repo_id`` (``folder`` is then its
    cached snapshot when one is known)."""

    kind: str  # "folder" or "hub"
    name: str  # what the user typed
    folder: Path | None
    revision: str | None
    offline: bool

    @property
    def ref(self) -> str:
        """What to hand ``from_pretrained``: the folder (a Hub model's cached snapshot once it is
        known, so that loading asks the network nothing more), else the Hub id."""
        return str(self.folder) if self.folder is not None else self.name

    def describe(self) -> str:
        if self.kind == "folder":
            return str(self.folder)
        return f"{self.name}@{self.revision}" if self.revision else self.name


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or text in (".", "..") or text.count("/") > 1 or "\\" in text


def resolve_source(s: P.ModelSettings) -> Source:
    """Tell a folder from a Hub id, without importing anything heavy and without the network.

    Raises :class:`JobError` for a missing folder, a folder without ``config.json``, a malformed
    Hub id, and a Hub id that is not cached while the Hub is offline (at once: the Hub is never
    asked).
    """
    text = s.source.strip()
    revision = s.revision.strip() or None
    path = Path(text).expanduser()
    if path.is_dir():
        path = path.resolve()
        if not (path / "config.json").is_file():
            raise JobError(f"{path} has no config.json: it is not a transformers model folder",
                           where=f"source = {text}",
                           hint="point at the folder that holds config.json and the weights (*.safetensors)")
        return Source("folder", text, path, None, hub_offline())
    if path.exists():
        raise JobError(f"{path} is a file, not a model folder", where=f"source = {text}",
                       hint="point at the folder that holds config.json and the weights")
    if _looks_like_path(text) or not _REPO_ID.match(text) or "--" in text or ".." in text:
        raise JobError(f"no model folder at {path}", where=f"source = {text}",
                       hint="check the path (relative paths are relative to the backend's data home), "
                            "or give a Hub id such as mistralai/Mistral-7B-v0.3")
    offline = hub_offline()
    cached = _cached_config(text, revision) if offline else None  # online, the Hub says what is current
    if offline and cached is None:
        raise JobError(
            f"{text} is not a local folder and is not in the Hugging Face cache, and the Hub is offline "
            "(HF_HUB_OFFLINE=1)",
            where=f"source = {text}" + (f", revision = {revision}" if revision else ""),
            hint=f"download it where there is network (`hf download {text}`) into this machine's cache, "
                 "give a local folder, or unset HF_HUB_OFFLINE",
        )
    return Source("hub", text, cached.parent if cached else None, revision, offline)


def _cached_config(repo_id: str, revision: str | None) -> Path | None:
    """The cached ``config.json`` of ``repo_id`` at ``revision``, if the cache has one."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # a malformed id or an unreadable cache: treat as not cached
        return None
    return Path(found) if isinstance(found, str) else None


def read_config_json(src: Source) -> tuple[dict[str, Any], str]:
    """The raw ``config.json`` of ``src`` and where it was read (a path or a Hub URL)."""
    if src.folder is not None:
        path = src.folder / "config.json"
    else:
        path = Path(_download_config(src))
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise JobError(f"config.json is not valid JSON: {exc}", where=str(path),
                       hint="the download may be incomplete: fetch it again") from None
    if not isinstance(raw, dict):
        raise JobError("config.json does not hold a JSON object", where=str(path))
    return raw, str(path)


def _download_config(src: Source) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf_errors

    where = f"source = {src.name}" + (f", revision = {src.revision}" if src.revision else "")
    try:
        return hf_hub_download(src.name, "config.json", revision=src.revision)
    except hf_errors.GatedRepoError:
        raise JobError(f"{src.name} is gated: accept its licence on the Hub and log in", where=where,
                       hint="run `hf auth login` with a token that has access") from None
    except hf_errors.RepositoryNotFoundError:
        raise JobError(f"no model {src.name} on the Hub (or it is private)", where=where,
                       hint="check the spelling; for a private model run `hf auth login`") from None
    except hf_errors.RevisionNotFoundError:
        raise JobError(f"{src.name} has no revision {src.revision!r}", where=where,
                       hint="use a branch, tag or commit that exists (empty means main)") from None
    except hf_errors.EntryNotFoundError:
        raise JobError(f"{src.name} has no config.json: not a transformers model", where=where) from None
    except Exception as exc:  # network and offline errors
        raise JobError(f"could not read config.json of {src.name} from the Hub: {exc}", where=where,
                       hint="check the network, or download the model and give its folder") from None


def check_config(raw: dict[str, Any], where: str, trust_remote_code: bool) -> None:
    """Refuse a config that transformers cannot build a causal LM from, or that lacks keys the
    estimate needs (transformers would silently fill in defaults)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = raw.get("model_type")
    auto_map = raw.get("auto_map") if isinstance(raw.get("auto_map"), dict) else {}
    if not model_type and not auto_map:
        raise JobError("config.json has no model_type", where=where,
                       hint="a transformers config names its model_type (llama, mistral, qwen2, ...)")
    known = model_type in CONFIG_MAPPING
    if auto_map and (not known or "AutoModelForCausalLM" in auto_map) and not trust_remote_code:
        raise JobError(
            f"this model ({model_type or 'custom'}) runs its own Python code from the model's repository "
            "(auto_map in config.json), and trust_remote_code is off",
            where=where,
            hint="turn on trust_remote_code only if you trust the source: its code runs in the backend",
        )
    if not known and not auto_map:
        import transformers

        raise JobError(f"transformers {transformers.__version__} does not know the model type {model_type!r}",
                       where=where, hint="upgrade transformers, or check config.json's model_type")
    if known and not auto_map and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise JobError(f"{model_type} is not a causal language model (no AutoModelForCausalLM class)",
                       where=where, hint="qlw fine-tunes decoder models: Llama, Mistral, Qwen, Gemma, Phi, ...")
    aliases = getattr(CONFIG_MAPPING[model_type], "attribute_map", {}) if known else {}
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    missing = [key for key in REQUIRED_CONFIG_KEYS
               if not any(name in raw or name in text for name in {key, aliases.get(key, key)})]
    if missing:
        raise JobError(f"config.json lacks {', '.join(missing)}", where=where,
                       hint="the file is incomplete: transformers would fill in defaults and build another "
                            "model than the weights; fetch the model's config.json again")


def shard_plan(folder: Path | None) -> dict[str, Any]:
    """The checkpoint's shards: ``files``, ``keys`` (tensor name -> shard index) and the bytes on
    disk; empty when unknown (a Hub model not downloaded yet)."""
    if folder is None:
        return {"files": [], "keys": {}, "disk_bytes": 0}
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError):
                break
            files = sorted(set(weight_map.values()))
            order = {f: i for i, f in enumerate(files)}
            return {"files": files, "keys": {k: order[f] for k, f in weight_map.items()},
                    "disk_bytes": sum(_size(folder / f) for f in files)}
    single = folder / "model.safetensors"
    if single.is_file():
        return {"files": [single.name], "keys": dict.fromkeys(_safetensors_keys(single), 0),
                "disk_bytes": _size(single)}
    files = sorted(p.name for p in folder.glob("*.safetensors")) or sorted(p.name for p in folder.glob("pytorch_model*.bin"))
    return {"files": files, "keys": {}, "disk_bytes": sum(_size(folder / f) for f in files)}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _safetensors_keys(path: Path) -> list[str]:
    """Tensor names from a safetensors header (8-byte length, then JSON), without loading it."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return []
    return [k for k in header if k != "__metadata__"]

