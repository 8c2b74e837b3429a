"""Merging a LoRA adapter into its base model, saving the result, and checking it (issue 7).

The steps of the Merge pane and of ``qlw merge`` (one code path for both):

1. :func:`plan`: what a merge will take, from files alone (no model load): the adapter and the
   base it was trained on, the device (the GPU when the merged model fits there, else the CPU),
   memory and disk needed against what is free, the output folder.
2. :func:`run_merge`: load the base again in the chosen way and precision, never merging into
   4-bit weights:

   - ``into="dequantized"`` (the default for a QLoRA adapter): the base as the adapter saw it in
     training, loaded in 4-bit as trained, then every bitsandbytes ``Linear4bit`` replaced by an
     ``nn.Linear`` holding ``bitsandbytes.functional.dequantize_4bit`` of its weight in the merge
     dtype (:func:`dequantize_model`); the merged model then behaves like the trained one.
   - ``into="original"``: the base's own full-precision weights from its folder.

   Then peft's merge layer by layer (``merge`` + ``unload``, i.e. ``merge_and_unload`` with
   progress), and ``save_pretrained`` (safetensors, shards of ``max_shard_size``), the tokenizer
   and chat template, the generation config, a config.json that names no path of the base, and
   a README.md model card.
3. :func:`verify`: the saved folder loaded on its own against the model as trained (4-bit base +
   adapter) and against the full-precision base + adapter: max |logit difference|, perplexity,
   size on disk, and the noise floor of the merge dtype (the base in that dtype against fp32).

Safety: everything is written into a temporary folder beside the target (same filesystem) and
renamed into place only when complete, so a failed, cancelled or killed merge leaves no
half-written model under the target's name; leftovers of a killed merge are removed by the next
one. An existing target is replaced only with ``overwrite`` (old renamed away, new renamed in,
old deleted), and only when it is empty or a model folder (:func:`replace_refusal`): a folder of
anything else is refused, never deleted. Free disk space is checked first.

A test seam: ``QLW_MERGE_FAULT=kill@saving`` (SIGKILL this process once the weights are written,
before the folder is complete) or ``fail@saving`` (raise there); read once per process.

The package's modules: ``paths`` (constants, the fault seam, folders), ``planning`` (step 1),
``loading`` (the base loaded and merged), ``saving`` (scrubbed files, the model card), ``merging``
(step 2), ``verification`` (step 3), ``handlers`` (merge.* and hub.* requests, :func:`register`)
and ``cli`` (``qlw merge``). Their names are re-exported here; a test that replaces a helper
(``_disk_free``) does it in the module that calls it (``planning``).
"""

from __future__ import annotations

from backend.merge.paths import (  # noqa: F401
    FAULT_ENV, MIB, GIB, DTYPE_NAMES, DTYPE_BYTES, TMP_MARK, OLD_MARK, DEFAULT_PROMPTS,
    parse_fault, take_fault, merged_home, resolve_out, MODEL_WEIGHTS, replace_refusal,
    write_refusal, check_replaceable, _pid_alive, clean_stale, folder_bytes, list_files,
)
from backend.merge.planning import (  # noqa: F401
    DISK_MARGIN, check_params, _base_info, plan,
)
from backend.merge.loading import (  # noqa: F401
    dequantize_model, compute_4bit_in, load_for_merge, merge_adapter,
)
from backend.merge.saving import (  # noqa: F401
    scrub_paths, _fmt, model_card,
)
from backend.merge.verification import (  # noqa: F401
    verify, format_table,
)
from backend.merge.merging import (  # noqa: F401
    run_merge, _swap_into_place, _fsync_dir,
)
from backend.merge.handlers import (  # noqa: F401
    merge_job, verify_job, _refusal, register,
)
from backend.merge.cli import (  # noqa: F401
    add_cli_arguments, cli,
)
