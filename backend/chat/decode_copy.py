"""The decode copy: a 4-bit base's weights dequantised into plain ``nn.Linear`` layers, an
adapter merged in place (:class:`DecodeCopy`), decoded with a static KV cache that transformers
compiles; and when the fast path is allowed (:func:`fast_allowed`, :func:`merged_fast_allowed`).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any

from backend.chat.generation import _device_of, _gen_pool, log


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

