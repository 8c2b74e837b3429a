"""Chat: talk to the base model, a tuned adapter or a merged folder, token by token.

One base model is loaded (``HOLDINGS["base"]``); a tuned target is that base with a LoRA adapter
attached by peft and switched on, the base target the same model inside peft's
``disable_adapter()`` context: never a second copy of the base in memory for the plain path.

The fast path. Batch-1 decoding of a bitsandbytes 4-bit model is bound by the CPU (kernel
launches and the dequantisation per layer): 20-35 tokens/s for a 7B on an H100, 12 through
peft with an unmerged adapter. When the base is 4-bit on a GPU and a 16-bit copy fits in free
memory, chat builds a *decode copy*: the same architecture with plain ``nn.Linear`` layers whose
weights are the 4-bit weights dequantised (the values the 4-bit model computes with), and decodes
with a static KV cache (transformers then compiles the forward, CUDA graphs included). For a
tuned target the adapter is merged into that copy in place (``W + B @ A * scaling``, in fp32,
then cast); switching target rewrites the weights in place, so the compiled graph stays valid.
The copy is held in ``HOLDINGS["chat.decode"]`` (``gpu.free`` drops it) and rebuilt when the
base changes. The plain path (the 4-bit model, peft for an adapter) is the fallback, and every
answer says which path produced it.

Generation runs in one long-lived thread (compiled CUDA graphs are recorded per thread), tokens
are read from a ``TextIteratorStreamer`` by the job thread, cleaned for the terminal and sent as
``chat.delta`` events at most every ``DELTA_INTERVAL_S``; a stopping criterion polls the job's
``cancelled`` so a stop ends the answer within a token or two.

The package's modules, in the order they build on each other: ``prompts`` (text, settings,
targets, prompts), ``generation`` (the generation thread and the streamer), ``decode_copy``,
``engine`` (:class:`ChatEngine` and its one :data:`ENGINE`), ``handlers`` (transcripts, jobs,
:class:`ChatRoom`, :func:`register`). Their names are re-exported here, except the tunables a test
or bench sets: set ``generation.DELTA_INTERVAL_S`` and ``decode_copy.COMPILE_OVERRIDE`` where they
are read.
"""

from __future__ import annotations

from backend.holdings import HOLDINGS  # noqa: F401
from backend.jobs import JobError  # noqa: F401

from backend.chat.prompts import (  # noqa: F401
    clean_text, chat_settings, Target, parse_target, resolve_template, _conversation, build_prompt,
)
from backend.chat.generation import (  # noqa: F401
    generation_kwargs, stream_generate, _device_of,
)
from backend.chat.decode_copy import (  # noqa: F401
    FAST_ENV, FAST_MARGIN_BYTES, CACHE_BUCKET, CACHE_MIN, GIB, forget_compiled,
    apply_compile_override, FastPathUnavailable, _plain_model, quantized_linears, compute_dtype_of,
    decode_copy_bytes, lora_deltas, DecodeCopy, reuse_static_cache, merged_fast_allowed,
    fast_allowed,
)
from backend.chat.engine import (  # noqa: F401
    HOLD_PEFT, HOLD_DECODE, HOLD_MERGED, ChatEngine, saved_precision, _carries_lora, QuietContext,
    ENGINE, make_random_adapter,
)
from backend.chat.handlers import (  # noqa: F401
    merged_folders, list_targets, transcript, transcript_markdown, transcript_jsonl, send_job,
    load_job, ChatRoom, RELEASE_BEFORE, register,
)
