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

The package's modules: ``sources`` (the ML stack's import, settings, where a model comes from),
``devices`` (GPUs, free memory, the held base), ``costs`` (the estimate), ``loading``,
``inspector`` and ``handlers`` (the model.load job and the model.* handlers). Their names are
re-exported here; a test that replaces ``bitsandbytes_devices`` does it in ``costs``, which calls it.

This package is imported by the server at start: torch, transformers and bitsandbytes are imported
only inside the functions that need them.
"""

from __future__ import annotations

from backend.models.sources import (  # noqa: F401
    MIB, GIB, DTYPE_NAMES, DTYPE_BYTES, INT8_DTYPE, REQUIRED_CONFIG_KEYS, _TRUE, import_ml_stack,
    settings_from_dict, validate_settings, describe_precision, hub_offline, Source, resolve_source,
    read_config_json, check_config, shard_plan, _size,
)
from backend.models.devices import (  # noqa: F401
    _visible_nvml_indices, list_gpus, cpu_memory, resolve_device, device_memory,
    bitsandbytes_devices, options, _LOADED, release_base_model,
)
from backend.models.costs import (  # noqa: F401
    BNB_4BIT_BLOCKSIZE, BNB_NESTED_BLOCKSIZE, BNB_4BIT_CODE_BYTES, BNB_NESTED_FIXED_BYTES,
    FITS_SHARE, CUDA_CONTEXT_BYTES, _build_meta_model, quant_state_bytes_4bit, count_bytes,
    verdict, estimate,
)
from backend.models.loading import (  # noqa: F401
    disable_cpu_4bit_layout, measure_footprint, LoadedModel, load_base_model, HUB_PATTERNS,
)
from backend.models.inspector import (  # noqa: F401
    linear_groups, tokenizer_facts, inspect_model,
)
from backend.models.handlers import (  # noqa: F401
    load_job, handle_options, handle_estimate, handle_inspect,
)
