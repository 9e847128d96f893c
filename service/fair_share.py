"""Which job a free worker serves next: fair shares of compute between API keys, and between the models of each.

Every request waits in the engine's one queue. Served first come, first served, a cheap model's request
waited behind every expensive request queued before it (an operator's review, 18 models at concurrency 12:
p50 92-185 ms for every kind, where a sinusoid session predict alone takes 1.8 ms), and one API key's burst
held every other key's requests behind it.

:class:`FairShare` charges the compute seconds each batch takes to the API keys (owners) of its requests and
to each key's models. A free worker serves the key charged least among those with requests queued, and of
that key's models the one charged least (its oldest request first, then those that batch with it, whoever
sent them). A key or a model that had nothing queued starts again from the least charged of the others (the
floor), so time spent idle does not bank credit to hold the others back later. With one key and one model
queued this is first come, first served; under a mix, each key gets an equal share of the workers' time
while it wants one, and each of its models an equal share of that. Without API keys every request has the
same owner (None): the models share. (Start-time fair queuing, with costs measured instead of declared.)

Two workers pick while each other's batches compute, so a batch is charged an estimate when it is taken
(the model's recent seconds per request times its requests) and set right when it ends.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Hashable, Iterable


class _Ledger:
    """Compute seconds charged to parties compared within groups (each group with its own floor)."""

    def __init__(self) -> None:
        self.charged: dict[Hashable, float] = {}
        self._floor: dict[Hashable, float] = {}  # group -> the standing of the party last picked in it

    def standing(self, party: Hashable, group: Hashable) -> float:
        return max(self.charged.get(party, 0.0), self._floor.get(group, 0.0))

    def least(self, oldest: dict[Hashable, int], group: Hashable = None) -> Hashable:
        """The party of ``oldest`` (party -> index of its oldest queued job) charged least; ties, and a party
        back from idle at the floor: the older job first."""
        party = min(oldest, key=lambda p: (self.standing(p, group), oldest[p]))
        self._floor[group] = self.standing(party, group)
        return party

    def charge(self, party: Hashable, group: Hashable, seconds: float) -> None:
        self.charged[party] = self.standing(party, group) + seconds

    def keep(self, kept) -> None:
        for party in [p for p in self.charged if not kept(p)]:
            del self.charged[party]


class FairShare:
    """The engine's choice of the next batch's first job; call under the engine's queue lock. Jobs have a
    ``model`` and an ``owner`` (the API key's owner id, None without keys).

        fair = FairShare()
        index = fair.pick(pending)            # the first job of the next batch: pending[index]
        fair.shared(job)                      # others served too (lately queued): keep batches short
        charged = fair.start(batch)           # once the batch is formed (its jobs may have other owners)
        ...                                   # compute it
        fair.settle(batch, seconds, charged)   # (or first: charged = fair.refund(batch, running, charged))
    """

    SMOOTHING = 0.2  # weight of a batch's seconds per request in the model's running estimate
    RECENT_S = 1.0  # a key's model with requests queued this recently counts as served alongside the others

    def __init__(self) -> None:
        self._owners = _Ledger()  # owner -> compute seconds, compared among all owners
        self._models = _Ledger()  # (owner, id(model)) -> compute seconds, compared among the owner's models
        self._per_job: dict[int, float] = {}  # id(model) -> recent compute seconds per request
        self._queued_at: dict[tuple, float] = {}  # (owner, id(model)) -> when a pick last found its requests queued (monotonic)

    def pick(self, pending: deque[Any]) -> int:
        """Index in ``pending`` (jobs, oldest first) of the job a free worker takes first."""
        owners: dict[Hashable, int] = {}  # owner -> index of its oldest queued job
        models: dict[tuple, int] = {}  # (owner, id(model)) -> index of its oldest queued job
        for index, job in enumerate(pending):
            owners.setdefault(job.owner, index)
            models.setdefault((job.owner, id(job.model)), index)
        now = time.monotonic()
        for party in models:
            self._queued_at[party] = now
        owner = self._owners.least(owners)
        return models[self._models.least({party: index for party, index in models.items() if party[0] == owner}, owner)]

    def shared(self, job: Any) -> bool:
        """Whether other keys, or other models of ``job``'s key, had requests queued in the last ``RECENT_S``
        seconds."""
        since, party = time.monotonic() - self.RECENT_S, (job.owner, id(job.model))
        return any(at >= since for other, at in self._queued_at.items() if other != party)

    def per_job(self, model: Any) -> float | None:
        """``model``'s recent compute seconds per request (None before its first batch)."""
        return self._per_job.get(id(model))

    def start(self, jobs: list[Any]) -> float:
        """Charge the owners and models of a batch of ``jobs`` (of one model) the estimate of its compute
        seconds, as it is taken; returns the estimate."""
        per_job = self._per_job.get(id(jobs[0].model), 0.0)
        self._charge(jobs, per_job)
        return per_job * len(jobs)

    def settle(self, jobs: list[Any], seconds: float, charged: float = 0.0, computed: bool = True) -> None:
        """A batch of ``jobs`` (of one model), charged ``charged`` when it started (0: computed without a pick,
        on the event loop), took ``seconds``; ``computed``: False when it was not (every job cancelled)."""
        if not jobs:
            return
        self._charge(jobs, (seconds - charged) / len(jobs))
        if computed:
            key = id(jobs[0].model)
            per_job = seconds / len(jobs)
            previous = self._per_job.get(key)
            self._per_job[key] = per_job if previous is None else previous + self.SMOOTHING * (per_job - previous)

    def refund(self, batch: list[Any], running: list[Any], charged: float) -> float:
        """The jobs of ``batch`` (charged ``charged`` when taken) not in ``running`` were cancelled before they
        ran: their owners get their part of the estimate back. Returns the part the running jobs were charged."""
        taken = {id(job) for job in running}
        cancelled = [job for job in batch if id(job) not in taken]
        each = charged / len(batch)
        self.settle(cancelled, 0.0, each * len(cancelled), computed=False)
        return each * len(running)

    def _charge(self, jobs: list[Any], each: float) -> None:
        for job in jobs:  # (a batch takes compatible jobs whoever sent them: each owner pays for its own)
            self._owners.charge(job.owner, None, each)
            self._models.charge((job.owner, id(job.model)), job.owner, each)

    def keep(self, models: Iterable[int]) -> None:
        """Forget every model but those with these ids (a reload replaced the others)."""
        kept = frozenset(models)
        self._models.keep(lambda party: party[1] in kept)
        for model in [model for model in self._per_job if model not in kept]:
            del self._per_job[model]
        for party in [party for party in self._queued_at if party[1] not in kept]:
            del self._queued_at[party]
