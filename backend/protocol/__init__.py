"""The contract between the qlw front end and the backend.

Everything the two processes share lives here: where the socket is, the protocol version, the
envelope types, the typed request parameters and event payloads, and their wire encoding. It is
pure Python (stdlib + platformdirs) and cheap to import: the front end imports nothing else from
the backend.

Wire format: one JSON object per line (UTF-8, ``\n``-terminated, at most ``MAX_MESSAGE_BYTES``).
Every object has ``"type"``, one of ``hello``, ``welcome``, ``request``, ``reply``, ``event``.

- The client opens with :class:`Hello`; the server answers :class:`Welcome` or, on a protocol
  version mismatch, a :class:`Reply` with status ``error`` and code ``version_mismatch``, then
  closes.
- A :class:`Request` names a ``method`` (see ``REQUESTS``) and carries an ``id``; it gets exactly
  one :class:`Reply` with that id: ``ok`` (done, with a result), ``accepted`` (a job started; its
  progress follows as events), ``refused`` (valid, but not possible now: ``reason`` says why) or
  ``error`` (malformed, unknown, or failed: ``code`` and ``reason``).
- An :class:`Event` reports anything that happens later. Events of a session carry that session's
  id and a sequence number (1, 2, ... per session); they are written to the store before they are
  sent, so a client that re-attaches with ``attach(session, since=N)`` gets every event after N,
  then the live stream, with no gap and no duplicate. Telemetry events (``ephemeral``, e.g. GPU
  samples) have no session and no sequence number and are never replayed.

The package's modules: ``core`` (version, error codes, rendezvous, envelopes, the registries and
the :func:`setting` helpers), ``wire`` (encode/decode and validation), and one module per room
with its requests and events (``general``, ``data``, ``models``, ``train``, ``chat``, ``merge``,
``ui``, ``export``). Every name is re-exported here: ``from backend.protocol import X`` and
``P.X`` keep working, and the rooms register in the order they always did.
"""

from __future__ import annotations

from backend.protocol.core import (  # noqa: F401
    PROTOCOL_VERSION, MAX_MESSAGE_BYTES, MAX_SOCKET_PATH_BYTES, BAD_JSON, BAD_MESSAGE,
    UNKNOWN_TYPE, UNKNOWN_METHOD, TOO_LARGE, VERSION_MISMATCH, NOT_READY, FAILED, CONFIRM,
    REPLY_STATUSES, ProtocolError, data_home, socket_path, Hello, Welcome, Request, Reply, Event,
    ENVELOPES, REQUESTS, EVENTS, EPHEMERAL, request, event, setting, setting_kind,
    settings_catalogue,
)
from backend.protocol.general import (  # noqa: F401
    Ping, Status, Attach, ListSessions, NewSession, CancelJob, PrepareTiny, DiagTicker, DiagBurn,
    GpuHistory, GpuInterval, FreeMemory, RestartBackend, Shutdown, SessionCreated, SessionStatus,
    JobStarted, JobProgress, JobFinished, ErrorEvent, LogEvent, GpuSample, DiagTick,
)
from backend.protocol.data import (  # noqa: F401
    DATA_TEMPLATES, DATA_ROLES, PREFERENCE_ROLES, DATA_LOSSES, DATA_SPLIT_MODES, NOT_OPEN,
    DataSource, PreparedData, OpenData, DataPage, DataRow, DataPreview, DataStats,
)
from backend.protocol.models import (  # noqa: F401
    MODEL_PRECISIONS, MODEL_QUANT_TYPES, MODEL_COMPUTE_DTYPES, MODEL_ATTN_IMPLEMENTATIONS,
    MODEL_VERDICTS, ModelSettings, ModelOptions, EstimateModel, LoadModel, InspectModel,
    ModelLoaded,
)
from backend.protocol.train import (  # noqa: F401
    RUN_CONFIG_VERSION, LR_SCHEDULERS, OPTIMIZERS, SPEEDS, LORA_BIASES, TRAIN_PRESETS,
    TRAINING_METHODS, MALFORMED_PAIRS, DPO_LOSS_TYPES, KTO_LOSS_TYPES, LAUNCH_STRATEGIES, LoraSettings,
    TrainingSettings, PreferenceSettings, DPOSettings, ORPOSettings, KTOSettings, LaunchSettings, METHOD_SETTINGS,
    METHOD_LOG_COLUMNS, RunConfig, TrainPresets, ValidateRun, StartTraining, ListCheckpoints,
    ExportRunConfig, ImportRunConfig, TrainStarted, TrainLog, TrainCheckpoint, TrainAlert,
    TrainFinished,
)
from backend.protocol.wire import (  # noqa: F401
    _hints, build, to_dict, encode, decode, request_params, make_request, event_payload,
)
from backend.protocol.chat import (  # noqa: F401
    CHAT_TARGET_KINDS, CHAT_FINISH_REASONS, CHAT_EXPORT_FORMATS, EVAL_EXPORT_FORMATS, ChatSettings,
    ChatTargets, ChatLoad, ChatSend, ChatClear, ChatExport, EvalRun, EvalExport, ChatStarted,
    ChatDelta, ChatAnswer, EvalRow,
)
from backend.protocol.merge import (  # noqa: F401
    MERGE_DTYPES, MERGE_INTO, MergeAdapters, MergePlan, StartMerge, VerifyMerge, HubStatus,
    HubPush, MergeSaved, MergeVerified, HubPushed,
)
from backend.protocol.ui import (  # noqa: F401
    UI_KEY_PATTERN, UI_MAX_KEYS, UI_MAX_VALUE_BYTES, SetUiState, GetUiState, UiChanged,
)
from backend.protocol.export import (  # noqa: F401
    EXPORT_LEVELS, ExportPlan, StartExport, ExportSaved, ExportVerified,
)


# Issue 18: the runs ledger (runs.*) and run notices register themselves from their own module.
from backend import protocol_runs as _protocol_runs  # noqa: E402,F401
