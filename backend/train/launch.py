"""Several processes (issue 19): what a run of ``launch.processes`` > 1 is started with, and the
checks and figures around it. Light: nothing heavy is imported at module level.

- :func:`launch_checks`: the device can hold the processes (one GPU each; on the CPU they share the
  cores and train over gloo), and what FSDP changes (no paged 8-bit optimizer: peft's FSDP guide
  says it fails when saving a checkpoint; no speed levers that copy or compile the sharded weights).
- :func:`accelerate_config`: the accelerate config file qlw writes for the run (``launch/accelerate.yaml``
  in the run folder) and passes to ``accelerate launch --config_file``, so a user's own default
  accelerate config never changes a qlw run. DDP: ``MULTI_GPU`` (on the CPU the same launcher, torchrun,
  with ``use_cpu``: each rank's trainer sets up gloo). FSDP: peft's and bitsandbytes' FSDP-QLoRA
  settings (``docs/source/accelerate/fsdp.md`` of peft 0.21): ``TRANSFORMER_BASED_WRAP`` on the model's
  decoder layers (transformers' Trainer then wraps the LoRA layers apart, ``update_fsdp_plugin_peft``),
  ``use_orig_params: false`` (the memory saving), ``cpu_ram_efficient_loading`` with
  ``sync_module_states`` (only rank 0 reads the weights), ``SHARDED_STATE_DICT`` checkpoints; the
  4-bit weights are stored in the compute dtype (``bnb_4bit_quant_storage``: see
  ``backend.models.loading.FSDP_RANK``), which is what lets FSDP shard them.
- :func:`launch_command`: ``python -m accelerate.commands.launch --config_file ... -m backend.train.worker SPEC``:
  the accelerate CLI itself, never a launcher of qlw's own.
- :func:`plan`: what ``train.validate`` and ``qlw train --check`` show: processes, strategy, the
  global batch and how it is made.

The global batch: ``per_device_train_batch_size`` keeps transformers' meaning (rows per process
and micro-step), so one optimizer step sees ``per_device x gradient_accumulation_steps x processes``
rows. accelerate deals the sampler's batches out to the processes in turn (batch i to rank
i mod N), so with ``per_device`` divided by N the same rows, in the same order, make each step as
in one process, and the loss (trl averages over the tokens of all processes) is the same.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from backend import train_config as TC

#: The file a run's ranks poll at each step boundary: its presence asks them to save and stop.
STOP_FILE = "stop"
#: rank 0's events, one JSON object a line (the supervisor tails it).
EVENTS_FILE = "events.jsonl"
#: What the supervisor hands the ranks (config, session, job id, resume checkpoint).
SPEC_FILE = "run.json"
CONFIG_FILE = "accelerate.yaml"
LOG_FILE = "launcher.log"
RESULT_FILE = "result.json"


def processes(config: dict[str, Any]) -> int:
    """``launch.processes`` of a (normalised) run config; 1 when absent."""
    return int((config.get("launch") or {}).get("processes") or 1)


def strategy(config: dict[str, Any]) -> str:
    return str((config.get("launch") or {}).get("strategy") or "ddp")


def is_launched(config: dict[str, Any]) -> bool:
    """True when the run trains in several processes (started with accelerate launch)."""
    return processes(config) > 1


def rank() -> int:
    """This process's rank in a launched run (torchrun's ``RANK``), 0 otherwise."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def world_size() -> int:
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def is_fsdp_rank() -> bool:
    """True in a rank of an FSDP run (accelerate's launcher sets ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def launch_dir(folder: Path) -> Path:
    """``<run folder>/launch``: the accelerate config, the ranks' spec, events, errors and log."""
    return Path(folder) / "launch"


def launch_checks(eff: dict[str, Any], device: str, gpus: int | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """``(errors, warnings)`` of the launch section on ``device``; ``eff`` (the effective config)
    is adapted in place (FSDP: the optimizer and the speed levers). ``gpus``: the GPUs this process
    sees (None: asked of NVML)."""
    errors: dict[str, str] = {}
    warnings: dict[str, str] = {}
    n, how = processes(eff), strategy(eff)
    if n < 2:
        return errors, warnings
    t = eff["training"]
    if device.startswith("cuda"):
        if gpus is None:
            from backend import models

            gpus = len(models.list_gpus())
        if n > gpus:
            errors["launch.processes"] = (f"{n} processes need {n} GPUs (one each); this machine shows {gpus}: "
                                          f"set processes to {max(gpus, 1)} or fewer")
        if eff["model"]["device"] not in ("auto", "cuda", "cuda:0"):
            warnings["model.device"] = (f"with {n} processes each trains on its own GPU (cuda:0 to cuda:{n - 1}); "
                                        f"model.device = {eff['model']['device']} is not used")
    if how == "fsdp":
        if t["optim"] in ("paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit"):
            warnings["training.optim"] = (f"{t['optim']} fails when an FSDP-QLoRA run saves a checkpoint (peft's FSDP "
                                          "guide): adamw_torch is used")
            t["optim"] = "adamw_torch"
        if t.get("speed") != "manual":
            warnings["training.speed"] = ("fsdp shards the weights: the speed levers that copy or compile them are off "
                                          "(speed manual; gradient_checkpointing as set)")
            t["speed"] = "manual"
    return errors, warnings


def decoder_layer_classes(model_section: dict[str, Any], home: Path) -> list[str]:
    """The model's decoder layer classes (``_no_split_modules``: ``LlamaDecoderLayer``), FSDP's
    wrapping unit, read from the model built on the meta device from config.json (no weights)."""
    from backend import models
    from backend.train_config import model_settings

    settings = model_settings(model_section, home)
    src = models.resolve_source(settings)
    raw, where = models.read_config_json(src)
    meta = models._build_meta_model(raw, where, src, settings.trust_remote_code)
    return [str(name) for name in (getattr(meta, "_no_split_modules", None) or [])]


def mixed_precision(eff: dict[str, Any]) -> str:
    t = eff["training"]
    return "bf16" if t.get("bf16") else ("fp16" if t.get("fp16") else "no")


def accelerate_config(eff: dict[str, Any], device: str, layer_classes: list[str] | None = None) -> dict[str, Any]:
    """The accelerate config (as accelerate's ``ClusterConfig`` YAML reads it) of a launched run."""
    n = processes(eff)
    cpu = device == "cpu"
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        # DDP: torchrun starts the processes; on the CPU the trainer's use_cpu makes them gloo ranks.
        "distributed_type": "FSDP" if strategy(eff) == "fsdp" and not cpu else "MULTI_GPU",
        "downcast_bf16": "no",
        "machine_rank": 0,
        "main_training_function": "main",
        # The precision is the trainer's (bf16/fp16 in the training section); the same here.
        "mixed_precision": mixed_precision(eff),
        "num_machines": 1,
        "num_processes": n,
        "main_process_port": 0,  # accelerate picks a free port: two runs may launch side by side
        "rdzv_backend": "static",
        "same_network": True,
        "tpu_env": [],
        "tpu_use_cluster": False,
        "tpu_use_sudo": False,
        "use_cpu": cpu,
        "gpu_ids": "all",
    }
    if config["distributed_type"] == "FSDP":
        fsdp: dict[str, Any] = {
            "fsdp_version": 1,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_forward_prefetch": False,
            "fsdp_offload_params": False,
            "fsdp_sharding_strategy": "FULL_SHARD",
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_sync_module_states": True,
            "fsdp_use_orig_params": False,
        }
        if layer_classes:
            fsdp["fsdp_transformer_layer_cls_to_wrap"] = ",".join(layer_classes)
        config["fsdp_config"] = fsdp
    return config


def dumps_yaml(config: dict[str, Any]) -> str:
    import yaml  # accelerate's own dependency

    head = ("# accelerate config written by qlw for this run (backend/train/launch.py); qlw passes it to\n"
            "# `accelerate launch --config_file`, so your default accelerate config does not apply.\n")
    return head + yaml.safe_dump(config, sort_keys=False)


def launch_command(config_file: Path, spec_file: Path, python: str | None = None) -> list[str]:
    """The command line of a launched run: the accelerate CLI starting ``backend.train.worker`` in
    each process."""
    return [python or sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "-m", "backend.train.worker", str(spec_file)]


def plan(eff: dict[str, Any], device: str) -> dict[str, Any]:
    """What the form and ``qlw train --check`` show about the processes: ``{"processes",
    "strategy", "global_batch", "per_device_train_batch_size", "gradient_accumulation_steps",
    "text"}``."""
    n, how = processes(eff), strategy(eff)
    t = eff["training"]
    text = TC.batch_text(eff)
    if n > 1:
        where = "CPU (gloo)" if device == "cpu" else "GPUs"
        text = (f"{n} processes ({how}, accelerate launch) on {where}; {text}; to keep a one-process run's steps, "
                f"divide per_device_train_batch_size or gradient_accumulation_steps by {n}")
    return {"processes": n, "strategy": how if n > 1 else "single", "global_batch": TC.global_batch(eff),
            "per_device_train_batch_size": t["per_device_train_batch_size"],
            "gradient_accumulation_steps": t["gradient_accumulation_steps"], "text": text}
