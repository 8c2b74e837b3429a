"""Base models: where they come from, what they will cost, loading them, and what is inside.

- :func:`resolve_source` tells a local folder from a Hub id, and fails at once (no network wait)
  for a Hub id that is not in the local cache when the Hub is offline (``HF_HUB_OFFLINE``).
- :func:`estimate` answers from ``config.json`` alone: the exact parameter count (the model built
  on the meta device with accelerate's ``init_empty_weights``, ties applied) and the bytes the
  chosen precision needs, module by module as bitsandbytes would store them, against the free
  memory of the chosen device: "fits", "tight" or "will not fit".
- :func:`load_base_model` loads through ``from_pretrained`` with progress by shard and
  cancellation, then turns off bitsandbytes' AVX512-BF16 CPU layout on every ``Linear4bit``
  (see :func:`disable_cpu_4bit_layout` for why), and measures the real footprint.
- :func:`inspect_model` describes a loaded model and its tokenizer as plain data: architecture,
  layers, parameters, the linear modules grouped by name (for LoRA's ``target_modules``), and the
  tokenizer's special tokens, pad token and chat template.

The estimate, per module of the meta model (``n`` = a weight's parameter count):

- unquantized parameters and buffers: ``n * bytes(dtype)`` (modules the model keeps in fp32: 4);
- 4-bit weights (every ``nn.Linear`` that bitsandbytes converts: not the embeddings, not the
  output head, not tied weights, not the norms): ``ceil(n / 2)`` bytes of packed uint8, plus
  the quantization state of ``b = ceil(n / 64)`` blocks: without double quantization an fp32
  absmax per block and the 16-entry fp32 code (``4b + 64``); with it a uint8 absmax per block,
  an fp32 offset, an fp32 absmax per 256 blocks and a 256-entry fp32 code
  (``b + 4 + 4 * ceil(b / 256) + 1024 + 64``);
- 8-bit weights: ``n`` bytes of int8 plus an fp32 scale per output row.

The state of 4-bit and 8-bit weights lives outside the model's parameters, so
``get_memory_footprint()`` does not count it; the measured figures after a load report it apart
(``quant_state_bytes``), and ``torch.cuda.memory_allocated`` sees it. bf16, fp16 and fp32 need
exactly their parameter bytes plus buffers.

This module is imported by the server at start: torch, transformers and bitsandbytes are imported
only inside the functions that need them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import json
import math
import os
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from backend import protocol as P
from backend.holdings import HOLDINGS
from backend.jobs import JobCancelled, JobContext, JobError

MIB = 1024 * 1024
GIB = 1024 * MIB

#: bitsandbytes' 4-bit block size (one absmax per 64 weights) and, with double quantization,
#: the block size of the second level (one fp32 absmax per 256 first-level absmax values).
BNB_4BIT_BLOCKSIZE = 64
BNB_NESTED_BLOCKSIZE = 256
#: Bytes of a 4-bit weight's quantization state besides its absmax values: the fp32 code of the
#: 4-bit type (16 entries), and with double quantization the fp32 offset and the 256-entry fp32
#: code of the second level.
BNB_4BIT_CODE_BYTES = 16 * 4
BNB_NESTED_FIXED_BYTES = 4 + 256 * 4

#: "fits" when the model needs at most this share of the free memory (the rest is for
#: activations, LoRA weights and optimizer states); "tight" up to all of it.
FITS_SHARE = 0.85
#: What creating a CUDA context costs on the card (measured 0.5 GiB on an H100), counted when
#: this process has none yet.
CUDA_CONTEXT_BYTES = 512 * MIB

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


# Devices and free memory ---------------------------------------------------------------------


def _visible_nvml_indices(count: int) -> list[int]:
    """NVML indices of the GPUs torch sees, in torch's order (CUDA_VISIBLE_DEVICES)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return list(range(count))
    out = []
    for part in env.split(","):
        part = part.strip()
        if not part.isdigit():
            return list(range(count))  # UUIDs or MIG names: assume the natural order
        if int(part) < count:
            out.append(int(part))
    return out


def list_gpus() -> list[dict[str, Any]]:
    """Every GPU this process may use, as ``{"device": "cuda:N", "name", "free_bytes",
    "total_bytes"}``: from torch when it already holds a CUDA context, else from NVML (so that
    asking creates no context). Empty without a GPU."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out.append({"device": f"cuda:{i}", "name": torch.cuda.get_device_name(i),
                        "free_bytes": int(free), "total_bytes": int(total)})
        return out
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception:  # no driver, no library, no GPU
        return []
    out = []
    for i, index in enumerate(_visible_nvml_indices(count)):
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
        except Exception:
            continue
        out.append({"device": f"cuda:{i}", "name": name.decode() if isinstance(name, bytes) else name,
                    "free_bytes": int(mem.free), "total_bytes": int(mem.total)})
    return out


def cpu_memory() -> dict[str, Any]:
    """The host's memory as a device: available and total RAM."""
    import psutil

    vm = psutil.virtual_memory()
    return {"device": "cpu", "name": "CPU RAM", "free_bytes": int(vm.available), "total_bytes": int(vm.total)}


def resolve_device(device: str, gpus: list[dict[str, Any]] | None = None) -> str:
    """``auto`` is the first GPU, else the CPU; ``cuda`` is ``cuda:0``. Refuses a GPU that is
    not there."""
    gpus = list_gpus() if gpus is None else gpus
    if device == "auto":
        return gpus[0]["device"] if gpus else "cpu"
    if device == "cuda":
        device = "cuda:0"
    if device.startswith("cuda") and device not in {g["device"] for g in gpus}:
        have = ", ".join(g["device"] for g in gpus) or "none"
        raise JobError(f"there is no {device} on this machine (GPUs: {have})", where=f"device = {device}",
                       hint="choose auto or cpu, or another GPU")
    return device


def device_memory(device: str, gpus: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Free and total memory of a resolved device (``cpu`` or ``cuda:N``)."""
    if device == "cpu":
        return cpu_memory()
    gpus = list_gpus() if gpus is None else gpus
    for g in gpus:
        if g["device"] == device:
            return dict(g)
    raise JobError(f"there is no {device} on this machine", where=f"device = {device}")


def _cuda_context_exists() -> bool:
    import sys

    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized())


def bitsandbytes_devices() -> set[str]:
    """Device types bitsandbytes can quantize on here (empty when it is not installed)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return set()
    import bitsandbytes as bnb

    return set(getattr(bnb, "supported_torch_devices", {"cuda", "cpu"}))


def options(home: Path) -> dict[str, Any]:
    """What the Model pane offers: precisions, attention implementations that are installed,
    devices with their free memory, whether the Hub is offline, and the tiny model's folder.
    Cheap: imports neither torch nor bitsandbytes."""
    from backend import tiny

    gpus = list_gpus()
    attn = [a for a in P.MODEL_ATTN_IMPLEMENTATIONS
            if a != "flash_attention_2" or importlib.util.find_spec("flash_attn") is not None]
    tiny_path = tiny.tiny_model_path(home)
    return {
        "precisions": list(P.MODEL_PRECISIONS),
        "quant_types": list(P.MODEL_QUANT_TYPES),
        "compute_dtypes": list(P.MODEL_COMPUTE_DTYPES),
        "attn_implementations": attn,
        "devices": [{"device": "auto", "name": f"auto ({gpus[0]['device'] if gpus else 'cpu'})"},
                    *gpus, cpu_memory()],
        "bitsandbytes": importlib.util.find_spec("bitsandbytes") is not None,
        "offline": hub_offline(),
        "tiny_path": str(tiny_path),
        "tiny_ready": (tiny_path / "config.json").is_file(),
    }


# The estimate -----------------------------------------------------------------------------------


def _build_meta_model(raw: dict[str, Any], config_path: str, src: Source, trust_remote_code: bool):
    """The model of ``raw`` on the meta device (no memory, no weights), with its ties applied."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_kwargs = dict(trust_remote_code=trust_remote_code)
    if src.folder is None and raw.get("auto_map"):
        # The config's own code lives beside it in the repository: let transformers fetch it.
        config = AutoConfig.from_pretrained(src.name, revision=src.revision, **config_kwargs)
    else:
        config = AutoConfig.from_pretrained(str(Path(config_path).parent), **config_kwargs)
    # torch's device context is thread-local. accelerate's init_empty_weights patches
    # nn.Module for the whole process, so a load running in the job thread meanwhile got meta
    # tensors ("Cannot copy out of meta tensor"; seen when train.validate overlapped a load).
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    # Tie weights (embeddings <-> lm_head) explicitly, or a tied model counts its embedding twice.
    model.tie_weights()
    return model


def _bnb_skip_modules(model) -> list[str]:
    """Modules bitsandbytes leaves unquantized: tied weights, the output embedding, the last
    module, and modules the model keeps in fp32 (as transformers' quantizer decides)."""
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        skip = list(get_keys_to_not_convert(model))
    except Exception:  # another transformers version: the same rule, written out
        skip = []
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        skip += [k.removesuffix(".weight") for k in (*tied.keys(), *tied.values())]
        names = [n for n, _ in model.named_parameters()]
        if names:
            skip.append(names[-1].removesuffix(".weight"))
        out = model.get_output_embeddings()
        skip += [n for n, m in model.named_modules() if out is not None and m is out]
    skip += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return sorted(set(skip))


def _should_convert(name: str, skip: list[str]) -> bool:
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module

        return should_convert_module(name, skip)
    except ImportError:
        return not any(name == k or name.startswith(k + ".") or name.endswith(k) for k in skip)


def _keep_fp32(model) -> list[str]:
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return sorted(keep)


def quant_state_bytes_4bit(n: int, double_quant: bool) -> int:
    """Bytes of the quantization state of one 4-bit weight of ``n`` parameters."""
    blocks = math.ceil(n / BNB_4BIT_BLOCKSIZE)
    if double_quant:
        return blocks + 4 * math.ceil(blocks / BNB_NESTED_BLOCKSIZE) + BNB_NESTED_FIXED_BYTES + BNB_4BIT_CODE_BYTES
    return 4 * blocks + BNB_4BIT_CODE_BYTES


def count_bytes(model, s: P.ModelSettings) -> dict[str, Any]:
    """Parameter count and bytes of ``model`` (on the meta device) in the precision of ``s``."""
    from torch import nn

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()
    quantized = s.precision in ("4bit", "8bit")
    rest = INT8_DTYPE if s.precision == "8bit" else (s.compute_dtype if s.precision == "4bit" else s.precision)
    rest_bytes = DTYPE_BYTES[rest]
    skip = _bnb_skip_modules(model) if quantized else []
    keep = _keep_fp32(model)
    seen: set[int] = set()
    totals = dict(parameters=0, quantized_parameters=0, weight_bytes=0, quant_state_bytes=0, buffer_bytes=0,
                  quantized_modules=0)
    kept_linear: list[str] = []
    for name, module in model.named_modules():
        linear = type(module) is nn.Linear or bool(Conv1D and isinstance(module, Conv1D))
        convert = quantized and linear and _should_convert(name, skip)
        if quantized and linear and not convert:
            kept_linear.append(name)
        in_fp32 = any(k in name for k in keep) if keep else False
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue  # tied
            seen.add(id(param))
            n = param.numel()
            totals["parameters"] += n
            if convert and pname == "weight":
                totals["quantized_parameters"] += n
                totals["quantized_modules"] += 1
                if s.precision == "4bit":
                    totals["weight_bytes"] += math.ceil(n / 2)
                    totals["quant_state_bytes"] += quant_state_bytes_4bit(n, s.double_quant)
                else:
                    out_features = module.weight.shape[1] if isinstance(module, Conv1D) else module.out_features
                    totals["weight_bytes"] += n
                    totals["quant_state_bytes"] += 4 * out_features  # fp32 scale per row (SCB)
            else:
                totals["weight_bytes"] += n * (4 if in_fp32 else rest_bytes)
        for _bname, buf in module.named_buffers(recurse=False):
            if buf is not None and id(buf) not in seen:
                seen.add(id(buf))
                # Buffers (rotary frequencies) keep their own dtype when the model is cast.
                totals["buffer_bytes"] += buf.numel() * buf.element_size()
    totals["footprint_bytes"] = totals["weight_bytes"] + totals["buffer_bytes"]
    totals["total_bytes"] = totals["footprint_bytes"] + totals["quant_state_bytes"]
    totals["kept_linear"] = kept_linear
    totals["dtype"] = DTYPE_NAMES[rest]
    return totals


def verdict(need: int, free: int) -> str:
    """``fits`` (room to spare for training), ``tight`` or ``will not fit``."""
    if need <= FITS_SHARE * free:
        return "fits"
    if need <= free:
        return "tight"
    return "will not fit"


def estimate(s: P.ModelSettings, src: Source | None = None) -> dict[str, Any]:
    """What loading with ``s`` will take, from ``config.json`` alone, against the free memory of
    the chosen device. Plain data; raises :class:`JobError` for a bad source or config."""
    validate_settings(s)
    t0 = time.perf_counter()
    src = src or resolve_source(s)
    import_ml_stack()
    raw, where = read_config_json(src)
    check_config(raw, where, s.trust_remote_code)
    model = _build_meta_model(raw, where, src, s.trust_remote_code)
    counts = count_bytes(model, s)
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    gpus = list_gpus()
    device = resolve_device(s.device, gpus)
    mem = device_memory(device, gpus)
    need = counts["total_bytes"]
    overhead = CUDA_CONTEXT_BYTES if device.startswith("cuda") and not _cuda_context_exists() else 0
    # A load replaces the model the backend holds: its memory counts as free.
    reclaim = _held_bytes_on(device)
    free = mem["free_bytes"] + reclaim
    if s.precision in ("4bit", "8bit") and device.split(":")[0] not in bitsandbytes_devices():
        raise JobError(f"bitsandbytes cannot quantize on {device} here", where=f"precision = {s.precision}",
                       hint="choose bf16/fp16/fp32, or another device")
    plan = shard_plan(src.folder)
    return {
        "source": src.describe(),
        "source_kind": src.kind,
        "config_path": where,
        "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
        "model_type": getattr(config, "model_type", ""),
        "layers": getattr(text, "num_hidden_layers", None),
        "hidden_size": getattr(text, "hidden_size", None),
        "vocab_size": getattr(text, "vocab_size", None),
        "tie_word_embeddings": bool(getattr(text, "tie_word_embeddings", False)),
        "parameters": counts["parameters"],
        "quantized_parameters": counts["quantized_parameters"],
        "quantized_modules": counts["quantized_modules"],
        "unquantized_parameters": counts["parameters"] - counts["quantized_parameters"],
        # Linear layers bitsandbytes leaves in 16 bits (the output head, tied weights); the
        # embeddings and norms are never quantized.
        "unquantized_linear": counts["kept_linear"],
        "precision": s.precision,
        "precision_label": describe_precision(s),
        "dtype": counts["dtype"],
        "weight_bytes": counts["weight_bytes"],
        "buffer_bytes": counts["buffer_bytes"],
        "quant_state_bytes": counts["quant_state_bytes"],
        "footprint_bytes": counts["footprint_bytes"],
        "total_bytes": need,
        "device": device,
        "device_name": mem.get("name", device),
        "free_bytes": free,
        "reclaimed_bytes": reclaim,
        "device_total_bytes": mem["total_bytes"],
        "context_bytes": overhead,
        "verdict": verdict(need + overhead, free),
        "shards": len(plan["files"]),
        "disk_bytes": plan["disk_bytes"],
        "seconds": round(time.perf_counter() - t0, 3),
    }


# What the backend holds ---------------------------------------------------------------------------

#: Plain facts about the model in HOLDINGS["base"] (settings, device, measured bytes), so that
#: an estimate can count a model that a load would replace as free. Not the model itself.
_LOADED: dict[str, Any] = {}


def _held_bytes_on(device: str) -> int:
    if HOLDINGS.get("base") is None or not _LOADED or _LOADED.get("device") != device:
        return 0
    return int(_LOADED.get("measured", {}).get("tensor_bytes") or 0)


def release_base_model() -> bool:
    """Drop the held base model and tokenizer (before loading another); True if one was held."""
    had = HOLDINGS.drop("base")
    HOLDINGS.drop("tokenizer")
    _LOADED.clear()
    if had:
        gc.collect()
        import sys

        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    return had


# Loading ------------------------------------------------------------------------------------------


class _LoadCancelled(Exception):
    """Raised from inside from_pretrained's weight loop to stop a cancelled load."""


class _WeightProgress:
    """Wraps from_pretrained's "Loading weights" loop: reports progress by shard (fractional:
    the share of each shard's tensors loaded) and stops the loop when the job is cancelled."""

    def __init__(self, items, plan: dict[str, Any], report: Callable, is_cancelled: Callable[[], bool]):
        self._items = items
        self._report = report
        self._is_cancelled = is_cancelled
        self._keys = plan.get("keys") or {}
        n_shards = max(1, len(plan.get("files") or []))
        self._per_shard = [0] * n_shards
        for index in self._keys.values():
            self._per_shard[index] += 1
        self._done = [0] * n_shards
        self.n_shards = n_shards
        try:
            self.total = len(items)
        except TypeError:
            self.total = 0

    def __iter__(self):
        count = 0
        self._emit(0)
        for item in self._items:
            if self._is_cancelled():
                raise _LoadCancelled()
            yield item
            count += 1
            self._account(item)
            self._emit(count)

    def _account(self, item) -> None:
        mapping = item[1] if isinstance(item, tuple) and len(item) == 2 else None
        sources: set[str] = set()
        for keys in (getattr(mapping, "layer_targets", None) or {}).values():
            sources |= set(keys)
        if not sources and isinstance(item, tuple):
            sources = {item[0]}
        for key in sources:
            index = self._keys.get(key)
            if index is not None:
                self._done[index] += 1

    def _shards_done(self, count: int) -> float:
        if not self._keys:  # unknown layout: the share of tensors, in shards
            return round(self.n_shards * count / self.total, 2) if self.total else 0.0
        return round(sum(min(1.0, d / t) for d, t in zip(self._done, self._per_shard) if t), 2)

    def _emit(self, count: int) -> None:
        done = self._shards_done(count)
        if count == self.total:
            done = float(self.n_shards)
        self._report("loading weights", done, self.n_shards, "shards",
                     f"{count:,} of {self.total:,} tensors" if self.total else "")

    # tqdm's interface, as far as transformers uses it
    def __len__(self) -> int:
        return self.total

    def update(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


@contextlib.contextmanager
def _watch_weight_loop(plan: dict[str, Any], report: Callable, is_cancelled: Callable[[], bool]) -> Iterator[None]:
    """Route transformers' "Loading weights" progress bar through :class:`_WeightProgress`, with
    every other progress bar off (they would only clutter the backend's log)."""
    from transformers.utils import logging as hf_logging

    def hook(factory, args, kwargs):
        if kwargs.get("desc") == "Loading weights" and args:
            return _WeightProgress(args[0], plan, report, is_cancelled)
        return factory(*args, **kwargs)

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    restore: Callable[[], None]
    if hasattr(hf_logging, "set_tqdm_hook"):
        previous = hf_logging.set_tqdm_hook(hook)
        restore = lambda: hf_logging.set_tqdm_hook(previous)  # noqa: E731
    else:  # transformers < 5.2x: wrap the name core_model_loading calls
        import transformers.core_model_loading as cml

        original = getattr(cml, "tqdm", None)

        def patched(*args, **kwargs):
            return hook(original, args, kwargs)

        if original is not None:
            cml.tqdm = patched
        restore = lambda: setattr(cml, "tqdm", original) if original is not None else None  # noqa: E731
    try:
        yield
    finally:
        restore()
        if was_enabled:
            hf_logging.enable_progress_bar()


def disable_cpu_4bit_layout(model) -> int:
    """Turn off bitsandbytes' AVX512-BF16 CPU layout on every ``Linear4bit``; returns how many.

    On a CPU with AVX512-BF16, the first no-grad forward in eval mode repacks each 4-bit weight in
    place into a CPU layout whose ``gemv_4bit`` op has no backward: every LoRA gradient after that
    is silently wrong (only a ``gemv_4bit`` autograd warning tells). Called right after loading,
    before anything runs the model.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _from_pretrained_kwargs(s: P.ModelSettings, src: Source, device: str) -> dict[str, Any]:
    import torch

    kwargs: dict[str, Any] = dict(
        revision=src.revision,
        trust_remote_code=s.trust_remote_code,
        attn_implementation=s.attn_implementation,
        device_map={"": device},
    )
    if src.offline:
        kwargs["local_files_only"] = True
    if s.precision == "4bit":
        from transformers import BitsAndBytesConfig

        compute = getattr(torch, DTYPE_NAMES[s.compute_dtype])
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=s.quant_type, bnb_4bit_use_double_quant=s.double_quant,
            bnb_4bit_compute_dtype=compute)
        kwargs["dtype"] = compute  # the modules bitsandbytes leaves alone compute in the same dtype
    elif s.precision == "8bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["dtype"] = getattr(torch, DTYPE_NAMES[INT8_DTYPE])
    else:
        kwargs["dtype"] = getattr(torch, DTYPE_NAMES[s.precision])
    return kwargs


def measure_footprint(model) -> dict[str, Any]:
    """What a loaded model takes: ``get_memory_footprint()`` (parameters and buffers), the
    bitsandbytes quantization state it does not count, and their sum."""
    footprint = int(model.get_memory_footprint())
    counted = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    extra: dict[int, int] = {}

    def add(t) -> None:
        if t is not None and hasattr(t, "data_ptr") and t.numel() and t.data_ptr() not in counted:
            extra[t.data_ptr()] = t.numel() * t.element_size()

    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:  # 4-bit
            add(qs.absmax)
            add(qs.code)
            add(getattr(qs, "offset", None))
            if getattr(qs, "state2", None) is not None:
                add(qs.state2.absmax)
                add(qs.state2.code)
        add(getattr(p, "SCB", None))  # 8-bit row scales
        cb = getattr(p, "CB", None)
        if cb is not None and cb.data_ptr() != p.data_ptr():
            add(cb)
    quant = sum(extra.values())
    return {"footprint_bytes": footprint, "quant_state_bytes": quant, "tensor_bytes": footprint + quant}


def _ratio(measured: float | None, estimated: float) -> float | None:
    return round(measured / estimated, 4) if measured and estimated else None


@dataclass
class LoadedModel:
    """What :func:`load_base_model` returns: the model, its tokenizer (None when the source has
    none), and plain facts (settings, estimate, measured footprint, timings)."""

    model: Any
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)


def load_base_model(
    s: P.ModelSettings,
    progress: Callable[..., None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> LoadedModel:
    """Load the base model of ``s`` (and its tokenizer) for fine-tuning.

    ``progress(stage, done, total, unit, message)`` is called from this thread: ``resolving``,
    ``estimating``, ``downloading`` (a Hub model, online), ``loading weights`` (by shard),
    ``tokenizer``, ``measuring``.
    ``cancelled()`` is polled between tensors; a cancelled load raises :class:`JobCancelled`
    and leaves nothing behind. Errors are :class:`JobError` for people.
    """
    report = progress or (lambda *a, **k: None)
    is_cancelled = cancelled or (lambda: False)

    def check() -> None:
        if is_cancelled():
            raise JobCancelled()

    t0 = time.perf_counter()
    validate_settings(s)
    report("resolving", 0, 0, "", s.source)
    src = resolve_source(s)  # before any heavy import: an offline Hub id fails here, at once
    check()
    report("estimating", 0, 0, "", "config.json")
    est = estimate(s, src)
    device = est["device"]
    if device == "cpu" and est["verdict"] == "will not fit":
        # On the CPU an overfull load ends with the kernel killing the backend: refuse instead.
        raise JobError(
            f"{src.describe()} needs {est['total_bytes'] / GIB:.1f} GiB in {describe_precision(s)}, "
            f"and the host has {est['free_bytes'] / GIB:.1f} GiB free", where=f"device = {s.device}",
            hint="choose 4-bit, a GPU, or free memory first")
    check()
    import psutil
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if src.kind == "hub" and src.folder is None:
        src = _download(src, s.trust_remote_code, report)
        check()
    kwargs = _from_pretrained_kwargs(s, src, device)
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)
    rss_before = psutil.Process().memory_info().rss
    plan = shard_plan(src.folder)
    t_load = time.perf_counter()
    try:
        with _watch_weight_loop(plan, report, is_cancelled):
            model = AutoModelForCausalLM.from_pretrained(src.ref, **kwargs)
    except _LoadCancelled:
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
        raise JobCancelled() from None
    except torch.OutOfMemoryError as exc:
        gc.collect()
        torch.cuda.empty_cache()
        raise JobError(f"out of memory on {device} while loading ({exc})".split("Tried")[0].strip(),
                       where=f"device = {device}, precision = {s.precision}",
                       hint="choose 4-bit, free VRAM (ctrl+f), or another GPU") from None
    except (OSError, ValueError, ImportError, RuntimeError) as exc:
        raise JobError(f"transformers could not load {src.describe()}: {exc}",
                       where=f"source = {s.source}", hint=_load_hint(exc)) from None
    load_s = time.perf_counter() - t_load
    # Right after loading, before anything runs the model (see the function's docstring).
    layout_off = disable_cpu_4bit_layout(model)
    model.eval()
    check()
    report("tokenizer", 0, 1, "", "")
    tokenizer, tokenizer_error = None, ""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            src.ref, revision=src.revision, trust_remote_code=s.trust_remote_code,
            **({"local_files_only": True} if src.offline else {}))
    except Exception as exc:  # a model without a tokenizer still loads; the inspector says so
        tokenizer_error = f"{type(exc).__name__}: {exc}"
    report("tokenizer", 1, 1, "", "")
    report("measuring", 0, 1, "", "")
    measured = measure_footprint(model)
    if on_cuda:
        torch.cuda.synchronize(device)
        measured["torch_allocated_bytes"] = int(torch.cuda.memory_allocated(device) - allocated_before)
        measured["torch_peak_bytes"] = int(torch.cuda.max_memory_allocated(device) - allocated_before)
    else:
        measured["torch_allocated_bytes"] = None
        measured["torch_peak_bytes"] = None
    measured["rss_delta_bytes"] = int(psutil.Process().memory_info().rss - rss_before)
    comparison = {
        "footprint_vs_estimate": _ratio(measured["footprint_bytes"], est["footprint_bytes"]),
        "tensors_vs_estimate": _ratio(measured["tensor_bytes"], est["total_bytes"]),
        "allocated_vs_estimate": _ratio(measured["torch_allocated_bytes"], est["total_bytes"]),
    }
    report("measuring", 1, 1, "", "")
    info = {
        "settings": P.to_dict(s),
        "source": src.describe(),
        "source_path": str(Path(model.config._name_or_path)) if getattr(model.config, "_name_or_path", "") else src.ref,
        "device": device,
        "estimate": est,
        "measured": measured,
        "comparison": comparison,
        "avx512bf16_layout_disabled": layout_off,
        "tokenizer_error": tokenizer_error,
        "load_seconds": round(load_s, 3),
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    return LoadedModel(model, tokenizer, info)


#: What a load needs from a Hub repository: config, weights, tokenizer files (and, with
#: trust_remote_code, the model's own Python files). Not the other formats (GGUF, ONNX, ...).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]


def _download(src: Source, trust_remote_code: bool, report: Callable) -> Source:
    """Fetch what a load needs from the Hub into the cache (weights as safetensors, or as
    ``pytorch_model*.bin`` only where the repository has no safetensors) and return the source
    with its cached snapshot folder, so that the load reports progress by shard."""
    from huggingface_hub import list_repo_files, snapshot_download

    report("downloading", 0, 0, "", f"{src.describe()} from the Hub (files already cached are skipped)")
    where = f"source = {src.name}" + (f", revision = {src.revision}" if src.revision else "")
    try:
        files = list_repo_files(src.name, revision=src.revision)
        patterns = list(HUB_PATTERNS)
        if not any(f.endswith(".safetensors") for f in files):
            patterns.append("pytorch_model*.bin")
        if trust_remote_code:
            patterns.append("*.py")
        folder = snapshot_download(src.name, revision=src.revision, allow_patterns=patterns)
    except Exception as exc:
        raise JobError(f"could not download {src.describe()}: {type(exc).__name__}: {exc}", where=where,
                       hint="check the network and the id; for a gated or private model run `hf auth login`") from None
    return Source("hub", src.name, Path(folder), src.revision, src.offline)


def _load_hint(exc: BaseException) -> str:
    text = str(exc)
    if "trust_remote_code" in text:
        return "this model runs its own code: turn on trust_remote_code only if you trust the source"
    if "offline" in text.lower() or "local_files_only" in text:
        return "the Hub is offline: download the model first, or give a local folder"
    if "safetensors" in text or "pytorch_model" in text or "no file named" in text.lower():
        return "the folder lacks the weights (*.safetensors): copy or download them completely"
    return "see the detail in the backend log"


# The inspector -----------------------------------------------------------------------------------


def _linear_kind(module) -> tuple[bool, bool]:
    """(is a linear layer, is quantized) for torch, bitsandbytes and transformers' Conv1D."""
    from torch import nn

    try:
        import bitsandbytes as bnb

        quant_types: tuple = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        quant_types = ()
    if quant_types and isinstance(module, quant_types):
        return True, True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()
    return isinstance(module, nn.Linear) or bool(Conv1D and isinstance(module, Conv1D)), False


def linear_groups(model) -> list[dict[str, Any]]:
    """The linear modules grouped by their last name (``q_proj``, ``k_proj``, ...), in model
    order: count, distinct ``[out_features, in_features]`` shapes, whether quantized, and whether
    peft's ``"all-linear"`` includes them (it leaves out the output head)."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    groups: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        is_linear, quantized = _linear_kind(module)
        if not is_linear or not name:
            continue
        if hasattr(module, "in_features"):
            shape = [int(module.out_features), int(module.in_features)]
        else:  # Conv1D stores (in, out)
            shape = [int(module.weight.shape[1]), int(module.weight.shape[0])]
        leaf = name.rsplit(".", 1)[-1]
        g = groups.setdefault(leaf, {"name": leaf, "count": 0, "shapes": [], "quantized": quantized,
                                     "in_all_linear": True, "example": name})
        g["count"] += 1
        if shape not in g["shapes"]:
            g["shapes"].append(shape)
        g["quantized"] = g["quantized"] and quantized
        if module is out_emb:
            g["in_all_linear"] = False
    return list(groups.values())


def tokenizer_facts(tokenizer) -> dict[str, Any]:
    """Vocabulary size, special tokens, whether a pad token exists (and the usual fix), and
    whether a chat template exists."""
    if tokenizer is None:
        return {"loaded": False}
    special = {name.removesuffix("_token"): value for name, value in tokenizer.special_tokens_map.items()
               if isinstance(value, str)}
    extra = list(getattr(tokenizer, "extra_special_tokens", None) or
                 getattr(tokenizer, "additional_special_tokens", None) or [])
    has_pad = tokenizer.pad_token is not None
    pad_fix = ""
    if not has_pad:
        if tokenizer.eos_token is not None:
            pad_fix = f"tokenizer.pad_token = tokenizer.eos_token ({tokenizer.eos_token!r})"
        elif tokenizer.unk_token is not None:
            pad_fix = f"tokenizer.pad_token = tokenizer.unk_token ({tokenizer.unk_token!r})"
        else:
            pad_fix = "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the embeddings"
    max_len = getattr(tokenizer, "model_max_length", None)
    return {
        "loaded": True,
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "base_vocab_size": getattr(tokenizer, "vocab_size", None),
        "model_max_length": int(max_len) if isinstance(max_len, int) and max_len < 10**9 else None,
        "special_tokens": special,
        "extra_special_tokens": [str(t) for t in extra][:50],
        "has_pad": has_pad,
        "pad_token_id": tokenizer.pad_token_id if has_pad else None,
        "pad_fix": pad_fix,
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "padding_side": getattr(tokenizer, "padding_side", None),
    }


def inspect_model(model, tokenizer=None) -> dict[str, Any]:
    """A loaded model and its tokenizer as plain data, for the Model pane and the LoRA form."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    quant = getattr(config, "quantization_config", None)
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict()
    if isinstance(quant, dict):
        if quant.get("load_in_4bit"):
            compute = str(quant.get("bnb_4bit_compute_dtype", "")).replace("torch.", "")
            compute = {v: k for k, v in DTYPE_NAMES.items()}.get(compute, compute)
            label = (f"4-bit {quant.get('bnb_4bit_quant_type')}"
                     f"{' + double quant' if quant.get('bnb_4bit_use_double_quant') else ''}, compute {compute}")
        elif quant.get("load_in_8bit"):
            label = "8-bit (LLM.int8)"
        else:
            label = str(quant.get("quant_method", "quantized"))
    else:
        label = ""
    first = next(model.parameters(), None)
    dtype = getattr(model, "dtype", None) or (first.dtype if first is not None else None)
    return {
        "loaded": True,
        "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", ""),
        "name_or_path": getattr(config, "_name_or_path", ""),
        "layers": getattr(text, "num_hidden_layers", None),
        "hidden_size": getattr(text, "hidden_size", None),
        "intermediate_size": getattr(text, "intermediate_size", None),
        "attention_heads": getattr(text, "num_attention_heads", None),
        "kv_heads": getattr(text, "num_key_value_heads", None),
        "vocab_size": getattr(text, "vocab_size", None),
        "max_position_embeddings": getattr(text, "max_position_embeddings", None),
        "parameters": int(model.num_parameters()),
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else "",
        "quantization": label,
        "device": str(first.device) if first is not None else "",
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "linear_groups": linear_groups(model),
        "tokenizer": tokenizer_facts(tokenizer),
    }


# The backend's side: job and handlers --------------------------------------------------------------


def load_job(params: P.LoadModel) -> Callable[[JobContext], dict[str, Any]]:
    """The ``model.load`` job: drop the held base model, load the new one with progress by
    shard, hold it (``HOLDINGS["base"]``, ``HOLDINGS["tokenizer"]``) and emit ``model.loaded``."""
    settings = P.ModelSettings(**P.to_dict(params))
    validate_settings(settings)  # a bad choice is refused in the reply, before any job starts

    def run(ctx: JobContext) -> dict[str, Any]:
        if release_base_model():
            ctx.emit("log", {"level": "info", "message": "released the previously loaded base model"})
        loaded = load_base_model(
            settings,
            progress=lambda stage, done, total, unit="", message="": ctx.progress(stage, done, total, unit, message),
            cancelled=lambda: ctx.cancelled,
        )
        ctx.check_cancelled()
        note = f"{loaded.info['source']} · {describe_precision(settings)} · {loaded.info['device']}"
        HOLDINGS.put("base", loaded.model, "model", note)
        if loaded.tokenizer is not None:
            HOLDINGS.put("tokenizer", loaded.tokenizer, "tokenizer", loaded.info["source"])
        _LOADED.clear()
        _LOADED.update(device=loaded.info["device"], settings=P.to_dict(settings),
                       **{k: loaded.info[k] for k in ("source", "estimate", "measured", "comparison", "load_seconds")})
        inspection = inspect_model(loaded.model, loaded.tokenizer)
        payload = {**{k: loaded.info[k] for k in ("settings", "source", "source_path", "device", "estimate",
                                                   "measured", "comparison", "load_seconds")},
                   "inspect": inspection, "tokenizer_error": loaded.info["tokenizer_error"]}
        ctx.emit("model.loaded", payload)
        return {k: loaded.info[k] for k in ("source", "device", "estimate", "measured", "comparison",
                                            "avx512bf16_layout_disabled", "load_seconds")}

    return run


def _error_reply(exc: BaseException) -> P.Reply:
    if isinstance(exc, JobError):
        reason = str(exc) + (f" ({exc.where})" if exc.where else "") + (f". {exc.hint}" if exc.hint else "")
        return P.Reply("", "error", {"error": {"message": str(exc), "where": exc.where, "hint": exc.hint}},
                       reason=reason, code=P.FAILED)
    return P.Reply("", "error", {"error": {"message": f"{type(exc).__name__}: {exc}", "where": "", "hint": ""}},
                   reason=f"{type(exc).__name__}: {exc}", code=P.FAILED)


async def handle_options(home: Path, params: P.ModelOptions) -> P.Reply:
    """``model.options``: read off the event loop (NVML and psutil calls)."""
    return P.Reply("", "ok", await asyncio.to_thread(options, home))


async def handle_estimate(params: P.EstimateModel) -> P.Reply:
    """``model.estimate``: config.json read and the meta model built off the event loop; a bad
    source or config is an ``error`` reply whose result carries message, where and hint."""
    settings = P.ModelSettings(**P.to_dict(params))
    try:
        result = await asyncio.to_thread(estimate, settings)
    except Exception as exc:
        return _error_reply(exc)
    return P.Reply("", "ok", result)


async def handle_inspect(params: P.InspectModel) -> P.Reply:
    """``model.inspect``: the held base model, or ``{"loaded": false}``."""
    model = HOLDINGS.get("base")
    if model is None:
        return P.Reply("", "ok", {"loaded": False})
    tokenizer = HOLDINGS.get("tokenizer")
    try:
        result = await asyncio.to_thread(inspect_model, model, tokenizer)
    except Exception as exc:
        return _error_reply(exc)
    result["load"] = {k: _LOADED.get(k) for k in ("settings", "source", "device", "estimate", "measured",
                                                   "comparison", "load_seconds")}
    return P.Reply("", "ok", result)
