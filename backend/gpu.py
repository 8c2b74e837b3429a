"""GPU and host monitoring through NVML and psutil, and freeing what the backend holds.

Follows nvitop's api layer: every NVML read goes through :func:`_query`, so a metric the card
does not report is ``None`` (shown as n/a), never an exception; all reads of one tick are made in
one pass and handed out as one plain snapshot (a dict, the payload of a ``gpu.sample`` event).
With no NVML library or no GPU the snapshot says why in ``nvml_error`` and still carries the
host's CPU and RAM.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from typing import Any, Callable

log = logging.getLogger("qlw.gpu")

MIB = 1024 * 1024


def _query(fn: Callable, *args, default=None):
    """An NVML call that answers ``default`` when the card or driver cannot say."""
    import pynvml

    try:
        value = fn(*args)
    except pynvml.NVMLError:
        return default
    except (AttributeError, TypeError, OSError):  # a binding older than the driver, or vice versa
        return default
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return value


class GpuSampler:
    """Takes snapshots of every visible GPU, the host, and this process."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)  # prime the counters: the first call always says 0
        psutil.cpu_percent(None)
        self.pid = os.getpid()
        self.handles: list[Any] = []
        self.nvml_error: str | None = None
        self.driver: str | None = None
        try:
            import pynvml
        except ImportError as exc:
            self.nvml_error = f"nvidia-ml-py is not installed ({exc})"
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self.nvml_error = _explain_nvml_error(exc)
            return
        count = _query(pynvml.nvmlDeviceGetCount, default=0) or 0
        self.handles = [h for h in (_query(pynvml.nvmlDeviceGetHandleByIndex, i) for i in range(count)) if h is not None]
        self.driver = _query(pynvml.nvmlSystemGetDriverVersion)
        if not self.handles:
            self.nvml_error = "NVML found no GPU on this machine"

    def sample(self) -> dict[str, Any]:
        """One snapshot: plain data, JSON-ready."""
        snap: dict[str, Any] = {
            "time": time.time(),
            "nvml_error": self.nvml_error,
            "driver": self.driver,
            "gpus": [self._gpu(i, h) for i, h in enumerate(self.handles)],
            "host": self._host(),
            "backend": self._backend(),
        }
        return snap

    def _gpu(self, index: int, h: Any) -> dict[str, Any]:
        import pynvml

        mem = _query(pynvml.nvmlDeviceGetMemoryInfo, h)
        util = _query(pynvml.nvmlDeviceGetUtilizationRates, h)
        power = _query(pynvml.nvmlDeviceGetPowerUsage, h)
        limit = _query(pynvml.nvmlDeviceGetEnforcedPowerLimit, h)
        procs = []
        seen = set()
        for getter in (pynvml.nvmlDeviceGetComputeRunningProcesses, pynvml.nvmlDeviceGetGraphicsRunningProcesses):
            for p in _query(getter, h, default=[]) or []:
                if p.pid in seen:
                    continue
                seen.add(p.pid)
                used = getattr(p, "usedGpuMemory", None)
                procs.append({
                    "pid": p.pid,
                    "name": self._proc_name(p.pid),
                    "used_mib": round(used / MIB, 1) if isinstance(used, int) and used >= 0 and used < 2**63 else None,
                    "own": p.pid == self.pid,
                })
        return {
            "index": index,
            "name": _query(pynvml.nvmlDeviceGetName, h),
            "uuid": _query(pynvml.nvmlDeviceGetUUID, h),
            "util_gpu": util.gpu if util is not None else None,
            "util_mem": util.memory if util is not None else None,
            "mem_used_mib": round(mem.used / MIB, 1) if mem is not None else None,
            "mem_total_mib": round(mem.total / MIB, 1) if mem is not None else None,
            "temp_c": _query(pynvml.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU),
            "power_w": round(power / 1000, 1) if power is not None else None,
            "power_limit_w": round(limit / 1000, 1) if limit is not None else None,
            "sm_clock_mhz": _query(pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_SM),
            "processes": procs,
        }

    def _proc_name(self, pid: int) -> str | None:
        try:
            return self._psutil.Process(pid).name()
        except (self._psutil.Error, OSError):
            return None  # another container's or user's process

    def _host(self) -> dict[str, Any]:
        vm = self._psutil.virtual_memory()
        return {
            "cpu_percent": self._psutil.cpu_percent(None),
            "cpu_count": self._psutil.cpu_count(),
            "ram_used_mib": round((vm.total - vm.available) / MIB, 1),
            "ram_total_mib": round(vm.total / MIB, 1),
        }

    def _backend(self) -> dict[str, Any]:
        with self._proc.oneshot():
            rss = self._proc.memory_info().rss
            cpu = self._proc.cpu_percent(None)
        return {"pid": self.pid, "rss_mib": round(rss / MIB, 1), "cpu_percent": cpu, "torch": torch_memory()}


def torch_memory() -> list[dict[str, Any]]:
    """torch's allocated/reserved/peak memory per CUDA device of this process; empty when torch
    was never imported or CUDA never initialised (sampling must not import torch or create a
    CUDA context)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    out = []
    for d in range(torch.cuda.device_count()):
        out.append({
            "device": d,
            "allocated_mib": round(torch.cuda.memory_allocated(d) / MIB, 1),
            "reserved_mib": round(torch.cuda.memory_reserved(d) / MIB, 1),
            "peak_mib": round(torch.cuda.max_memory_allocated(d) / MIB, 1),
        })
    return out


def _explain_nvml_error(exc: Exception) -> str:
    import pynvml

    if isinstance(exc, pynvml.NVMLError_LibraryNotFound):
        return "no NVIDIA GPU visible: the NVIDIA driver's NVML library (libnvidia-ml.so) was not found"
    if isinstance(exc, pynvml.NVMLError_DriverNotLoaded):
        return "no NVIDIA GPU visible: the NVIDIA driver is not loaded"
    if isinstance(exc, pynvml.NVMLError_NoPermission):
        return "no NVIDIA GPU visible: no permission to query NVML"
    return f"no NVIDIA GPU visible: NVML failed to start ({exc})"


def own_nvml_mib(sampler: GpuSampler) -> float | None:
    """This process's GPU memory across devices as NVML counts it (None without NVML)."""
    if not sampler.handles:
        return None
    total, found = 0.0, False
    for i, h in enumerate(sampler.handles):
        for p in sampler._gpu(i, h)["processes"]:
            if p["own"] and p["used_mib"] is not None:
                total += p["used_mib"]
                found = True
    return total if found else 0.0


def free_memory(holdings, sampler: GpuSampler | None = None) -> dict[str, Any]:
    """Drop everything ``holdings`` holds, collect garbage and give cached CUDA memory back.

    Returns before/after figures (torch reserved, NVML memory of this process) and what is still
    held and why. Runs in the job thread.
    """
    sampler = sampler or GpuSampler()
    torch = sys.modules.get("torch")
    cuda = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()

    def reserved() -> float | None:
        if not cuda:
            return None
        return round(sum(torch.cuda.memory_reserved(d) for d in range(torch.cuda.device_count())) / MIB, 1)

    before = {"torch_reserved_mib": reserved(), "nvml_process_mib": own_nvml_mib(sampler),
              "rss_mib": sampler._backend()["rss_mib"]}
    # Library objects that keep their own references: let them drop those first.
    for held in holdings.describe():
        obj = holdings.get(held["name"])
        accelerator = getattr(obj, "accelerator", None)
        if accelerator is not None and hasattr(accelerator, "free_memory"):
            accelerator.free_memory()  # accelerate: drops its refs to models, optimizers, dataloaders
        obj = None
    dropped = holdings.release_all()
    if "bitsandbytes" in sys.modules:
        # transformers' Trainer registers every nn.Embedding with bitsandbytes' process-wide
        # GlobalOptimManager (32-bit optimizer states for embeddings under 8-bit optimizers);
        # that singleton would keep the embedding, and the segment it sits in, alive.
        import bitsandbytes

        bitsandbytes.optim.GlobalOptimManager.get_instance().initialize()
    if "torch._dynamo" in sys.modules:
        torch.compiler.reset()  # compiled graphs and their guards hold the modules they traced
    collected = gc.collect()
    if cuda:
        torch.cuda.synchronize()
        # cuBLAS keeps a workspace per handle and stream (32 MiB each on Hopper), allocated through
        # torch's caching allocator and owned by no Python object: the forward's and the autograd
        # thread's backward's matmuls each leave one. Found with bench/gpu_cleanup.py --trace-memory.
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            clear_workspaces()
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
        for d in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(d)
    after = {"torch_reserved_mib": reserved(), "nvml_process_mib": own_nvml_mib(sampler),
             "rss_mib": sampler._backend()["rss_mib"]}
    still = []
    if cuda:
        leftover = after["torch_reserved_mib"] or 0
        if leftover > 0:
            still.append({"what": f"{leftover:.0f} MiB reserved by torch",
                          "why": "tensors still referenced outside the backend's holdings (a bug worth reporting)"})
        still.append({"what": f"CUDA context, about {after['nvml_process_mib'] or 0:.0f} MiB on the GPU",
                      "why": "a CUDA context lives as long as its process; restart the backend to release it "
                             "(the UI re-attaches by itself)"})
    return {"dropped": dropped, "gc_collected": collected, "before": before, "after": after,
            "still_held": still, "cuda": cuda}
