"""Sinusoid regression tasks, as in the MAML paper (Finn et al., 2017, sec. 5.1).

Each task is ``y = A * sin(x - phi)`` with amplitude ``A ~ U[0.1, 5.0]``,
phase ``phi ~ U[0, pi]`` and inputs ``x ~ U[-5, 5]``; the learner sees ``K``
support points and is scored on ``Q`` query points of the same curve::

    tasks = SinusoidTasks(shots=10, queries=10)
    batch = tasks.sample(25, torch.Generator().manual_seed(0))
    batch.support_x.shape   # [25, 10, 1]
    batch.support_y.shape   # [25, 10, 1]

There is no train/val split of a continuous task family: held-out evaluation
simply uses a different generator seed (see :func:`metalearn.data.fixed_tasks`
or :meth:`SinusoidTasks.fixed_tasks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .tasks import TaskBatch, check_split_name


@dataclass(frozen=True)
class SinusoidConfig:
    """Task distribution and default set sizes (defaults = the MAML paper)."""

    shots: int = 10
    queries: int = 10
    amplitude_range: tuple[float, float] = (0.1, 5.0)
    phase_range: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)

    def __post_init__(self) -> None:
        if self.shots < 1 or self.queries < 0:
            raise ValueError(f"need shots >= 1 and queries >= 0, got shots={self.shots}, queries={self.queries}")
        for name in ("amplitude_range", "phase_range", "x_range"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(lo, hi)}")


def _uniform(shape: tuple[int, ...], bounds: tuple[float, float], generator: torch.Generator | None) -> Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(shape, generator=generator)


class SinusoidTasks:
    """Sinusoid regression task source (``task_type == "regression"``).

    Inputs and targets both have a trailing feature dimension of 1, so a plain
    ``nn.Linear(1, ...)`` network consumes ``support_x`` directly.
    """

    task_type = "regression"
    input_shape = (1,)
    preprocessing = None

    def __init__(self, shots: int = 10, queries: int = 10, config: SinusoidConfig | None = None):
        if config is None:
            config = SinusoidConfig(shots=shots, queries=queries)
        self.config = config

    def __repr__(self) -> str:
        return f"SinusoidTasks({self.config})"

    def split(self, name: str) -> SinusoidTasks:
        """Every split is the same task distribution; use another seed to hold out."""
        check_split_name(name)
        return self

    def sample_params(self, meta_batch: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``(amplitude, phase)``, each ``[meta_batch]``."""
        amplitude = _uniform((meta_batch,), self.config.amplitude_range, generator)
        phase = _uniform((meta_batch,), self.config.phase_range, generator)
        return amplitude, phase

    @staticmethod
    def function(x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
        """The true curves at ``x [T, N, 1]`` for ``amplitude``/``phase [T]`` (e.g. to plot)."""
        return amplitude.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1))

    def sample(
        self,
        meta_batch: int,
        generator: torch.Generator | None = None,
        *,
        ways: int | None = None,
        shots: int | None = None,
        queries: int | None = None,
        within_group: bool = False,
        return_params: bool = False,
    ) -> TaskBatch | tuple[TaskBatch, Tensor, Tensor]:
        """Sample ``meta_batch`` tasks in one vectorised draw.

        ``ways`` and ``within_group`` are accepted for interface compatibility
        with classification sources and ignored. With ``return_params=True``
        also return the tasks' ``amplitude`` and ``phase`` (each ``[T]``).
        """
        del ways, within_group  # meaningless for regression
        if meta_batch < 1:
            raise ValueError(f"meta_batch must be >= 1, got {meta_batch}")
        k = self.config.shots if shots is None else shots
        q = self.config.queries if queries is None else queries
        if k < 1 or q < 0:
            raise ValueError(f"need shots >= 1 and queries >= 0, got shots={k}, queries={q}")
        amplitude, phase = self.sample_params(meta_batch, generator)
        # Support and query points are drawn together: they are i.i.d. from the
        # same curve, so one draw split in two is the same distribution.
        x = _uniform((meta_batch, k + q, 1), self.config.x_range, generator)
        y = self.function(x, amplitude, phase)
        batch = TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])
        if return_params:
            return batch, amplitude, phase
        return batch

    def fixed_tasks(self, num_tasks: int, seed: int = 0, **sample_kwargs) -> TaskBatch:
        """A reproducible evaluation set: the same ``seed`` always gives the same tasks.

        Example: ``eval_batch = SinusoidTasks(shots=5, queries=100).fixed_tasks(100, seed=1)``.
        """
        return self.sample(num_tasks, torch.Generator().manual_seed(seed), **sample_kwargs)
