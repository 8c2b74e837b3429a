"""Training methods, one module each behind one seam (:class:`~backend.methods.base.TrainingMethod`).

``method`` in the run config picks one: ``sft`` (trl's SFTTrainer), ``dpo`` (DPOTrainer), ``orpo``
(``trl.experimental.orpo.ORPOTrainer``) and ``kto`` (KTOTrainer). Adding a method is a module here
plus its settings' dataclass (with catalogue metadata) in ``backend/protocol/``.
Importing this package is cheap: the trl classes are imported when a trainer is built.
"""

from __future__ import annotations

import importlib

from backend import protocol as P
from backend.methods.base import TrainingMethod

#: method name -> "module:Class" in this package.
_REGISTRY = {"sft": "sft:SFT", "dpo": "dpo:DPO", "orpo": "orpo:ORPO", "kto": "kto:KTO"}
assert tuple(_REGISTRY) == P.TRAINING_METHODS


def get(name: str) -> TrainingMethod:
    """The method of that name (``RunConfig.method``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown training method {name!r}; methods are {', '.join(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"backend.methods.{module}"), cls)()
