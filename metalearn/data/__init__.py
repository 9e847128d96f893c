"""Few-shot task data: sinusoid regression and N-way K-shot image classification.

Everything a trainer needs is :func:`load_task_source` and the :class:`TaskBatch`
it samples::

    import torch
    from metalearn.data import load_task_source, fixed_tasks

    source = load_task_source("omniglot", ways=5, shots=1, queries=15, rotations=True)
    train, val = source.split("train"), source.split("val")
    g = torch.Generator().manual_seed(0)
    batch = train.sample(32, g).to("cuda")      # support_x [32, 5, 1, 28, 28], ...
    val_batches = fixed_tasks(val, 600, seed=1, meta_batch=100)

    sine = load_task_source("sinusoid", shots=10, queries=10)
    batch = sine.sample(25, g)                  # support_x/support_y [25, 10, 1]

An inference service turns uploads into model inputs with the source's (or
the checkpoint's) ``preprocessing`` dict::

    x = preprocess_images([png_bytes], source.preprocessing)   # [1, 1, 28, 28]
"""

from .images import ImageTaskConfig, ImageTasks
from .preprocess import OMNIGLOT_PREPROCESSING, image_preprocessing, preprocess_images
from .sinusoid import SinusoidConfig, SinusoidTasks
from .sources import load_image_archives, load_npz, load_omniglot, load_task_source
from .tasks import SPLIT_NAMES, TaskBatch, TaskSource, fixed_tasks

__all__ = [
    "OMNIGLOT_PREPROCESSING",
    "SPLIT_NAMES",
    "ImageTaskConfig",
    "ImageTasks",
    "SinusoidConfig",
    "SinusoidTasks",
    "TaskBatch",
    "TaskSource",
    "fixed_tasks",
    "image_preprocessing",
    "load_image_archives",
    "load_npz",
    "load_omniglot",
    "load_task_source",
    "preprocess_images",
]
