"""The batch type every task source returns, and the interface they share.

A *task source* produces meta-batches of few-shot tasks. Regression sources
(:class:`~metalearn.data.sinusoid.SinusoidTasks`) and classification sources
(:class:`~metalearn.data.images.ImageTasks`) have the same small interface
(:class:`TaskSource`), so a trainer never needs to know which one it has::

    source = load_task_source("omniglot", ways=5, shots=1, queries=15)
    train, val = source.split("train"), source.split("val")
    g = torch.Generator().manual_seed(0)
    batch = train.sample(32, g)              # TaskBatch with 32 tasks
    for i in range(len(batch)):
        sx, sy, qx, qy = batch.task(i)       # one task's support / query sets
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

SPLIT_NAMES = ("train", "val", "test", "all")


@dataclass
class TaskBatch:
    """A meta-batch of ``T`` tasks, each with a support and a query set.

    Shapes (``S`` support and ``Q`` query examples per task):

    - ``support_x``: ``[T, S, *input_shape]`` float32
    - ``support_y``: ``[T, S, 1]`` float32 for regression,
      ``[T, S]`` int64 labels in ``0..ways-1`` for classification
    - ``query_x``: ``[T, Q, *input_shape]``
    - ``query_y``: ``[T, Q, 1]`` or ``[T, Q]`` as for ``support_y``

    Example::

        batch = source.sample(16, torch.Generator().manual_seed(0))
        batch = batch.to("cuda")
        sx, sy, qx, qy = batch.task(0)
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def __post_init__(self) -> None:
        # Cheap consistency check: catches a mis-assembled batch at the source
        # instead of as a confusing shape error deep inside a model.
        t = self.support_x.shape[0]
        for name in ("support_y", "query_x", "query_y"):
            if getattr(self, name).shape[0] != t:
                raise ValueError(f"TaskBatch.{name} has {getattr(self, name).shape[0]} tasks, support_x has {t}")
        if self.support_y.shape[:2] != self.support_x.shape[:2]:
            raise ValueError("TaskBatch support_x / support_y disagree on the number of support examples")
        if self.query_y.shape[:2] != self.query_x.shape[:2]:
            raise ValueError("TaskBatch query_x / query_y disagree on the number of query examples")

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TaskBatch:
        """Return a copy with all four tensors moved to ``device``."""
        return TaskBatch(
            self.support_x.to(device, non_blocking=non_blocking),
            self.support_y.to(device, non_blocking=non_blocking),
            self.query_x.to(device, non_blocking=non_blocking),
            self.query_y.to(device, non_blocking=non_blocking),
        )

    def task(self, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The ``i``-th task as ``(support_x, support_y, query_x, query_y)``."""
        return self.support_x[i], self.support_y[i], self.query_x[i], self.query_y[i]

    @classmethod
    def cat(cls, batches: Sequence[TaskBatch]) -> TaskBatch:
        """The tasks of ``batches`` (alike in shape) as one batch, in order."""
        return cls(*(torch.cat([getattr(b, name) for b in batches]) for name in ("support_x", "support_y", "query_x", "query_y")))


@runtime_checkable
class TaskSource(Protocol):
    """What :func:`~metalearn.data.load_task_source` returns.

    ``sample`` takes ``ways`` / ``shots`` / ``queries`` as optional overrides of
    the source's configured defaults; ``ways`` and ``within_group`` are ignored
    by regression sources.
    """

    task_type: str  # "regression" or "classification"
    input_shape: tuple[int, ...]
    preprocessing: dict[str, Any] | None

    def split(self, name: str) -> TaskSource: ...

    def sample(
        self,
        meta_batch: int,
        generator: torch.Generator | None = None,
        *,
        ways: int | None = None,
        shots: int | None = None,
        queries: int | None = None,
        within_group: bool = False,
    ) -> TaskBatch: ...


def task_stream(
    source: TaskSource,
    num_tasks: int,
    seed: int = 0,
    meta_batch: int | None = None,
    **sample_kwargs: Any,
) -> Iterator[TaskBatch]:
    """``num_tasks`` reproducible tasks, ``meta_batch`` at a time (default: all at once), made as they are
    needed. Task i is the seeded generator's i-th draw of one task, so the tasks do not depend on how they
    are batched: an evaluation on a CPU (small batches) and on a GPU (large ones) sees the same tasks."""
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    meta_batch = meta_batch or num_tasks
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, num_tasks, meta_batch):
        count = min(meta_batch, num_tasks - start)
        yield TaskBatch.cat([source.sample(1, generator, **sample_kwargs) for _ in range(count)])


def fixed_tasks(
    source: TaskSource,
    num_tasks: int,
    seed: int = 0,
    meta_batch: int | None = None,
    **sample_kwargs: Any,
) -> list[TaskBatch]:
    """A reproducible list of evaluation batches (``num_tasks`` tasks in all; :func:`task_stream`).

    The same source, seed and sampling arguments always give the same tasks, however they are batched,
    so validation curves are comparable across runs. Use a seed the training loop never uses, and
    chunk with ``meta_batch`` to bound memory::

        val_batches = fixed_tasks(source.split("val"), 600, seed=1234, meta_batch=50,
                                  ways=5, shots=1, queries=15)
    """
    return list(task_stream(source, num_tasks, seed, meta_batch, **sample_kwargs))


def check_split_name(name: str) -> None:
    if name not in SPLIT_NAMES:
        raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLIT_NAMES)}")
