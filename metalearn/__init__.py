"""metalearn: model-agnostic meta-learning for any ``torch.nn.Module``, and a service that adapts per request.

The public surface::

    from metalearn import MetaConfig, MetaLearner, Conv4, adapt, predict
"""

from metalearn.adaptation import Adaptation, adapt, adapt_many, predict, predict_many
from metalearn.allocator import keep_freed_memory
from metalearn.data.tasks import TaskBatch
from metalearn.learner import ALGORITHMS, MetaConfig, MetaLearner, StepResult, register_loss
from metalearn.models import MLP, BatchNorm, Conv4, build_model, convert_batchnorm, norm_statistics, register_architecture

__version__ = "0.1.0"


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
