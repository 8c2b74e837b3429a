"""The Data room: open datasets, page through them, detect their shape, and format training rows.

One package serves the Data pane (through the server), the headless ``qlw data`` command and,
later, training: all of them go through the same functions here, so what the pane previews is
what ``qlw data`` prints and what trl's ``SFTTrainer`` trains on.

- **Sources** (``sources``: :func:`resolve_source`, :func:`open_source`): local JSON, JSONL, CSV/TSV, Parquet,
  Arrow and plain-text files or folders, ``save_to_disk`` folders, and Hub ids (with config and
  split), all read by ``datasets``. The first read builds an Arrow cache under
  ``<home>/datasets`` (never the current folder); after that a ``Dataset`` is memory-mapped and
  gives random access by index, so a page of a 1,000,000-row file is a slice, not a scan.
- **Browsing** (``browse``: :class:`Opened`): pages of rows with cells cut to a width, a filter computed with
  Arrow kernels over every string (nested ones too), one row in full, and a column summary with
  types, null counts and examples.
- **Shape and mapping** (``shape``: :func:`detect_shape`): dolly, Alpaca, prompt/completion,
  instruction/response, prompt-only, ``messages`` (role/content), ShareGPT (from/value) and plain
  text, as a role -> column mapping the user may correct.
- **The one formatter** (``formatting``: :func:`format_row`): a row, the mapping and the template make one trl
  row: ``{"messages": [...]}`` for the chat template, ``{"prompt", "completion"}`` for Mistral,
  Alpaca and raw text with a response, ``{"text"}`` otherwise.
  :func:`load_prepared` (``prepared``) maps it over the source's train/validation split for training;
  :func:`sft_config_kwargs` gives the matching ``SFTConfig`` settings.
- **Tokens** (``tokens``: :func:`tokenize_like_trl`, :func:`preview_row`, :func:`token_stats`): the token ids
  and loss mask exactly as trl 1.16's ``SFTTrainer._prepare_dataset`` computes them (EOS added to
  non-conversational rows, prompt masked by the common-prefix rule, assistant masks from
  ``{% generation %}``, truncation keeping the start, fully masked rows dropped).

Bad input is reported, never fatal: every failure is a :class:`DataError` saying what is wrong,
where (file and line, row and column, mapping role) and what to do next.

The server's side (:class:`DataRoom`) is in ``handlers``, ``qlw data`` in ``cli``; this package
re-exports their names, so ``from backend import data as D; D.format_row(...)`` keeps working.
``tokens.PREVIEW_MAX_CHARS``, a limit a test lowers, is set where it is read, not re-exported.

Nothing heavy is imported at module level: the server imports this package at start.
"""

from __future__ import annotations

from backend.data.sources import (  # noqa: F401
    FORMATS, DataError, RowError, NotOpen, Resolved, source_dict, resolve_source, cache_dir,
    Progress, load_splits, _root_message, diagnose_file,
)
from backend.data.shape import (  # noqa: F401
    ROLES, TEMPLATES, SHAPES, PREFERENCE_SHAPES, ROLE_NAMES, SPEAKERS, empty_mapping, detect_shape,
    settings_from, default_settings, check_mapping, training_form, effective_loss,
    sft_config_kwargs,
)
from backend.data.browse import (  # noqa: F401
    ROW_BUDGET_CHARS, MAX_OPEN, MAX_FILTERS, Opened, _rows, _cap, feature_type, open_source,
    find_open, require_open,
)
from backend.data.formatting import (  # noqa: F401
    ALPACA_PROMPT_INPUT, ALPACA_PROMPT, MISTRAL_EOS, _text_of, _turns, format_row, _mistral,
)
from backend.data.tokens import (  # noqa: F401
    STATS_BATCH, PREVIEW_CUT_CHARS, load_tokenizer, _lock_for,
    common_prefix_length, tokenize_like_trl, labels_like_trl, has_generation_markers, preview_row,
    _segments, split_counts, token_stats,
)
from backend.data.prepared import (  # noqa: F401
    Prepared, _format_batch, load_prepared,
)
from backend.data.handlers import (  # noqa: F401
    DataRoom, error_result, register,
)
from backend.data.cli import (  # noqa: F401
    add_cli_arguments, cli, _line_of,
)
