"""Which model a free worker serves next: fair shares of compute between the models of one queue.

Every model's requests wait in the engine's one queue. Served first come, first served, a cheap model's
request waited behind every expensive request queued before it (an operator's review, 18 models at
concurrency 12: p50 92-185 ms for every kind, where a sinusoid session predict alone takes 1.8 ms).

:class:`FairShare` charges each model the compute seconds its batches take, and a free worker serves the
model charged least among those with requests queued (its oldest request first, then those that batch with
it). A model that had nothing queued starts again from the least charged of the others (the floor), so time
spent idle does not bank credit to hold the others back later. With one model queued this is first come,
first served; under a mix, each model gets an equal share of the workers' time while it wants one, and a
cheap model's requests wait for a free worker instead of the whole queue. (Start-time fair queuing, with
costs measured instead of declared.)

Two workers pick while each other's batches compute, so a batch is charged an estimate when it is taken
(the model's recent seconds per request times its requests) and set right when it ends.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Iterable


class FairShare:
    """The engine's choice of the next batch's first job; call under the engine's queue lock.

        fair = FairShare()
        index = fair.pick(pending)            # the first job of the next batch: pending[index]
        fair.shared(model)                    # other models served too (lately queued): keep batches short
        charged = fair.start(model, jobs)     # once the batch is formed
        ...                                   # compute it
        fair.settle(model, jobs, seconds, charged)
    """

    SMOOTHING = 0.2  # weight of a batch's seconds per request in the model's running estimate
    RECENT_S = 1.0  # a model with requests queued this recently counts as served alongside the others

    def __init__(self) -> None:
        self._charged: dict[int, float] = {}  # id(model) -> compute seconds charged so far
        self._per_job: dict[int, float] = {}  # id(model) -> recent compute seconds per request
        self._floor = 0.0  # the least charged of the models with requests queued, when a worker last picked
        self._queued_at: dict[int, float] = {}  # id(model) -> when a pick last found its requests queued (monotonic)

    def pick(self, pending: deque[Any]) -> int:
        """Index in ``pending`` (jobs with a ``model``, oldest first) of the job a free worker takes first."""
        oldest: dict[int, int] = {}  # id(model) -> index of its oldest queued job
        for index, job in enumerate(pending):
            oldest.setdefault(id(job.model), index)
        now = time.monotonic()
        for key in oldest:
            self._queued_at[key] = now
        # (ties, a model back from idle at the floor: the older job first; one model queued: its oldest, index 0)
        model = min(oldest, key=lambda m: (self._standing(m), oldest[m]))
        self._floor = self._standing(model)
        return oldest[model]

    def shared(self, model: Any) -> bool:
        """Whether other models than ``model`` had requests queued in the last ``RECENT_S`` seconds."""
        since = time.monotonic() - self.RECENT_S
        return any(at >= since for key, at in self._queued_at.items() if key != id(model))

    def start(self, model: Any, jobs: int) -> float:
        """Charge ``model`` the estimate of a batch of ``jobs`` taken to compute; returns the estimate."""
        key = id(model)
        estimate = self._per_job.get(key, 0.0) * jobs
        self._charged[key] = self._standing(key) + estimate
        return estimate

    def settle(self, model: Any, jobs: int, seconds: float, charged: float = 0.0) -> None:
        """A batch of ``model``'s ``jobs``, charged ``charged`` when it started (0: computed without a
        pick, on the event loop), took ``seconds``."""
        key = id(model)
        self._charged[key] = self._standing(key) + seconds - charged
        if jobs:
            per_job = seconds / jobs
            previous = self._per_job.get(key)
            self._per_job[key] = per_job if previous is None else previous + self.SMOOTHING * (per_job - previous)

    def keep(self, models: Iterable[int]) -> None:
        """Forget every model but those with these ids (a reload replaced the others)."""
        kept = frozenset(models)
        for table in (self._charged, self._per_job, self._queued_at):
            for key in [key for key in table if key not in kept]:
                del table[key]

    def _standing(self, key: int) -> float:
        return max(self._charged.get(key, 0.0), self._floor)
