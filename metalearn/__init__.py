"""metalearn: model-agnostic meta-learning for any ``torch.nn.Module``, and a service that adapts per request.

The public surface::

    from metalearn import MetaConfig, MetaLearner, Conv4, adapt, predict
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Each public name and the module that defines it, imported on first use (PEP 562): the
# command line's --help and a bad flag then answer without loading torch (about 2 s).
_EXPORTS = {
    "Adaptation": "metalearn.adaptation",
    "adapt": "metalearn.adaptation",
    "adapt_many": "metalearn.adaptation",
    "predict": "metalearn.adaptation",
    "predict_many": "metalearn.adaptation",
    "keep_freed_memory": "metalearn.allocator",
    "TaskBatch": "metalearn.data.tasks",
    "ALGORITHMS": "metalearn.names",
    "MetaConfig": "metalearn.learner",
    "MetaLearner": "metalearn.learner",
    "StepResult": "metalearn.learner",
    "register_loss": "metalearn.learner",
    "MLP": "metalearn.models",
    "BatchNorm": "metalearn.models",
    "Conv4": "metalearn.models",
    "build_model": "metalearn.models",
    "convert_batchnorm": "metalearn.models",
    "norm_statistics": "metalearn.models",
    "register_architecture": "metalearn.models",
}

if TYPE_CHECKING:  # what editors and type checkers see
    from metalearn.adaptation import Adaptation, adapt, adapt_many, predict, predict_many
    from metalearn.allocator import keep_freed_memory
    from metalearn.data.tasks import TaskBatch
    from metalearn.learner import MetaConfig, MetaLearner, StepResult, register_loss
    from metalearn.models import MLP, BatchNorm, Conv4, build_model, convert_batchnorm, norm_statistics, register_architecture
    from metalearn.names import ALGORITHMS


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'metalearn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def default_device() -> str:
    """``cuda`` when a GPU is available, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


__all__ = [
    "ALGORITHMS",
    "Adaptation",
    "BatchNorm",
    "Conv4",
    "MLP",
    "MetaConfig",
    "MetaLearner",
    "StepResult",
    "TaskBatch",
    "adapt",
    "adapt_many",
    "build_model",
    "convert_batchnorm",
    "default_device",
    "keep_freed_memory",
    "norm_statistics",
    "predict",
    "predict_many",
    "register_architecture",
    "register_loss",
]
