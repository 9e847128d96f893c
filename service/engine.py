"""The worker that owns the device: a bounded queue, micro-batching, timeouts.

Routes build a job (an adaptation, optionally followed by a prediction on
queries, or a prediction with a stored session) and ``await
engine.submit(job)``. Worker threads (one on a GPU, which it owns; on a CPU
as many as the cores allow at ``threads`` torch threads each: a micro-batch of
small convolutions does not scale across threads, separate batches do) take
jobs from one bounded queue, the API keys, and each key's models, sharing the
workers' time fairly (a free worker serves the key charged the least compute time
among those queued, that key's least charged model, its oldest job first:
``service.fair_share``), and run *compatible* jobs together:

- adaptations for the same model with the same support/query shapes, inner
  steps, learning rate and BatchNorm mode are stacked and run as one batched
  adaptation (``metalearn.adaptation.adapt_many``/``predict_many``, or a loop
  where that is faster for the model on this device, see :func:`choose_strategy`);
- session predictions for different sessions of one model with the same query
  shape become one ``predict_many`` forward pass with per-session parameters;
- except, while other models or keys are served too (had requests queued in the
  last second), where a compiled computation runs its requests one by one anyway (a
  Conv4-64 MAML adaptation, ``service.cpu_scripts``): those jobs are then taken
  one at a time, so that no batch holds a worker for eight requests' time.

Workers never compute with one module at once: the generic path runs on each
worker's own copy of the learner (see :meth:`Engine._learner`).

On a GPU with one worker (the default) each batch's tensor work (adaptation,
prediction, the finiteness checks) is replayed from a CUDA graph per shape,
the batch padded to a power of two (``service.cuda_graphs``): a request is a
thousand small kernels, and launching them costs more than running them. On
the CPU, each worker replays TorchScript traces of the fast kernels' computations
that take no gradients (``service.cpu_traces``): they run without taking the GIL
between operations, which the HTTP event loop and the other workers need. The
other adaptations (MAML-family fast kernels, which take gradients, and the
generic path) are compiled on a background thread instead and then run request
by request, or a small model's as whole batches (``service.cpu_scripts``).

Under concurrency a batch waits at most ``max_wait_ms`` for company (jobs that
arrive while the worker is busy batch naturally; a lone client is never delayed). When ``queue_size`` jobs are pending,
``submit`` raises :class:`QueueFull` (the route answers 503 + Retry-After); a
job not finished within ``request_timeout_s`` raises :class:`JobTimeout`
(cancelled if it had not started).

One exception: on the CPU, a session predict whose request is the only one
the app is handling, every worker idle, computes on the event loop's own
thread when its model's last lone prediction took at most
``inline_predict_ms`` (see :meth:`Engine.submit`). On a 2-core AVX2 EPYC, the
hand-off to a sleeping worker and the event loop's wake-up for the answer took
0.33 ms of a lone Conv4-64 MAML session predict's 3.5 ms, and the computation
ran slower on the worker's idle core than on the event loop's busy one: in
place, 3.23 against 3.81 ms p50 at the client. Concurrent requests still go to
the workers and batch.

Every prediction depends only on its own request: BatchNorm layers use the
support-set statistics (or, with ``transductive``, the statistics of the
request's own query batch), never statistics across the micro-batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Hashable

import torch

from metalearn.adaptation import Adaptation, adapt, adapt_many, augment_support, predict, predict_many
from metalearn.batching import choose_strategy
from service.cpu_scripts import ScriptCache, load_recorder
from service.cpu_traces import TraceCache
from service.cuda_graphs import GraphCache, bucket, pad_rows
from service.fair_share import FairShare
from service.settings import EngineConfig

log = logging.getLogger("service.engine")

PARAM, MEAN, VAR = "param:", "mean:", "var:"


class QueueFull(Exception):
    """More than ``queue_size`` jobs pending."""

    def __init__(self, retry_after: int):
        super().__init__(f"the request queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class JobTimeout(Exception):
    """The job did not finish within the request timeout."""


class EngineStopped(Exception):
    """The worker is not running."""


class ModelRefused(Exception):
    """A request's inputs made the model's own code raise (a registered architecture's forward: an ``nn.Embedding``
    given an index past its vocabulary, say): the request's fault, as far as the service can tell."""


def raised_by_model_code(error: BaseException, model: torch.nn.Module) -> bool:
    """Whether ``error`` was raised inside the forward of ``model`` or one of its layers, for a user's architecture
    (a class of metalearn's own failing on inputs already checked is a bug). Told by the frames' ``self``, an
    instance of one of the model's layer classes (a worker runs its own copy of the model), so that a forward
    inherited from torch (an ``nn.Sequential`` subclass) counts too."""
    if type(model).__module__.split(".")[0] == "metalearn":
        return False
    layers = {type(module) for module in model.modules()}
    frame = error.__traceback__
    while frame is not None:
        if type(frame.tb_frame.f_locals.get("self")) in layers:
            return True
        frame = frame.tb_next
    return False


def session_tensors(adaptation: Adaptation, index: int) -> dict[str, torch.Tensor]:
    """Entry ``index`` of a stacked adaptation as the session store's ``{name: tensor}``."""

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t[index].detach().clone()

    out = {PARAM + n: pick(t) for n, t in adaptation.params.items()}
    for layer, (mean, var) in adaptation.norm_stats.items():
        out[MEAN + layer] = pick(mean)
        out[VAR + layer] = pick(var)
    return out


def adaptation_from_tensors(tensors: dict[str, torch.Tensor]) -> Adaptation:
    params = {n[len(PARAM):]: t for n, t in tensors.items() if n.startswith(PARAM)}
    stats = {n[len(MEAN):]: (t, tensors[VAR + n[len(MEAN):]]) for n, t in tensors.items() if n.startswith(MEAN)}
    return Adaptation(params, stats, torch.zeros(()), torch.zeros(()))


@dataclass
class Job:
    """One request's work. ``kind`` is ``adapt`` (with optional ``query_x``) or ``predict``."""

    kind: str
    model: Any  # service.registry.LoadedModel
    support_x: torch.Tensor | None = None
    support_y: torch.Tensor | None = None
    steps: int = 0
    lr: float | None = None  # None: the model's own (possibly learned) learning rate
    query_x: torch.Tensor | None = None
    transductive: bool = False
    session: dict[str, torch.Tensor] | None = None
    # Session.prepared: what the worker derives from the session for predictions (views, a kernel's
    # constants), made once per session object instead of once per request
    session_prepared: Callable[[Hashable, Callable[[dict], dict]], dict[str, torch.Tensor]] | None = None
    keep_session: bool = True
    owner: Hashable | None = None  # who asked (the API key's owner id; None without keys): whose fair share it takes
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    _key: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def key(self) -> tuple:
        """What a batch's jobs share, and what names its trace, graph or compilation. It starts with the
        model object's id, not its name: while a checkpoint is reloaded, jobs for the replaced model and
        its successor share a name and must not share a batch. Made once: a worker asks again at every
        look at the queue (a session's signature sorts its 26 tensors' names)."""
        if self._key is None:
            self._key = self._make_key()
        return self._key

    def work(self) -> int:
        """The example-steps of an adaptation (``LoadedModel.example_steps``); 0 for a session predict."""
        return self.model.example_steps(len(self.support_x), self.steps) if self.kind == "adapt" else 0

    def _make_key(self) -> tuple:
        def shape(t):
            return None if t is None else (tuple(t.shape), t.dtype)

        if self.kind == "adapt":
            return (id(self.model), "adapt", shape(self.support_x), shape(self.support_y), self.steps, self.lr, shape(self.query_x), self.transductive, self.keep_session)
        signature = tuple(sorted((n, tuple(t.shape)) for n, t in self.session.items()))
        return (id(self.model), "predict", shape(self.query_x), self.transductive, signature)


def _compatible(job: Job, key: tuple) -> bool:
    """Whether ``job`` can join a batch of ``key``. A job whose key fails cannot: it stays queued and
    fails alone, as the first job of a batch (``Engine._run``), not taking a batch of others with it."""
    try:
        return job.key() == key
    except Exception:  # noqa: BLE001
        return False


def _stack(adaptations: list[Adaptation]) -> Adaptation:
    params = {n: torch.stack([a.params[n] for a in adaptations]) for n in adaptations[0].params}
    stats = {
        n: (torch.stack([a.norm_stats[n][0] for a in adaptations]), torch.stack([a.norm_stats[n][1] for a in adaptations]))
        for n in adaptations[0].norm_stats
    }
    before = torch.stack([a.support_loss_before for a in adaptations])
    after = torch.stack([a.support_loss_after for a in adaptations])
    return Adaptation(params, stats, before, after)


def _finite_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[R] bool: row r of every tensor (stacked over requests) is all finite."""
    rows = tensors[0].shape[0]
    finite = torch.ones(rows, dtype=torch.bool, device=tensors[0].device)
    for tensor in tensors:
        finite &= torch.isfinite(tensor.reshape(rows, -1)).all(1)
    return finite


class Engine:
    """Runs adaptations and predictions in worker threads, micro-batched (see the module docstring).

    ``Engine(settings.engine_config(), metrics=...)`` in the service; ``Engine(workers=2, threads=1)`` changes
    the default :class:`EngineConfig`'s fields (or those of the config given)."""

    def __init__(self, config: EngineConfig | None = None, *, metrics: Any = None, **changes: Any):
        config = replace(config or EngineConfig(), **changes)
        self.max_batch_size = config.max_batch_size
        self.max_wait = config.max_wait_ms / 1000.0
        self.queue_size = config.queue_size
        self.request_timeout_s = config.request_timeout_s
        self.threads = config.threads
        self.workers = config.workers
        self.metrics = metrics
        self.cuda_graphs = config.cuda_graphs
        self.cpu_traces = config.cpu_traces
        self.worker_cpus = config.worker_cpus
        self.inline_predict_s = config.inline_predict_ms / 1000.0  # (tests change it on a running engine)
        self.max_batch_work = config.max_batch_work
        # Compiled adaptations on the CPU (those traces cannot hold), shared by the workers; None = none (service.cpu_scripts)
        self._scripts = ScriptCache(capacity=config.cpu_scripts) if config.cpu_scripts else None
        self._pending: deque[Job] = deque()
        self._fair = FairShare()  # which key's and model's jobs a free worker takes next (under the queue's lock)
        self._batch_times: deque[tuple[float, float]] = deque(maxlen=256)  # (when, seconds) of the last batches
        self._computing: dict[int, float] = {}  # worker thread -> when its batch began (monotonic), while it computes
        self._shed_reason: str | None = None  # set by shed(): the service is stopping
        self._finish_by: tuple[float, str] | None = None  # set by finish_by(): (monotonic deadline, why)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)  # guards the queue; a worker filling a batch waits on it for company
        self._idle: list[threading.Condition] = []  # workers waiting for work, the most recently idle last
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._local = threading.local()  # per worker: its own copies of the learners (see _learner), its graphs
        self._graph_caches: list[GraphCache] = []  # every worker's, CUDA graphs and CPU traces
        # What was recorded for models no longer served: the keys to drop, and how many times models changed
        # (each worker drops its own recordings, before its next batch, when it sees the count move).
        self._stale: Callable[[tuple], bool] = lambda key: False
        self._served_generation = 0
        self._last_batch_size = 1
        self._loop_failed_at = -math.inf  # (monotonic) when a worker's loop last logged a failure of its own
        self.batches = 0

    # ------------------------------------------------------------------
    # Lifecycle
    # ------------------------------------------------------------------
    def load_compiler(self, models) -> None:
        """Load the recording machinery now if any of ``models`` will have computations compiled
        (``service.cpu_scripts.load_recorder``): on the CPU with scripts on, any model whose adaptation
        is compiled (every one but ANIL's traced kernel; a model whose predictions are compiled is one)."""
        if any(self._scripting(m) and self._adapt_replay(m) == "script" for m in models):
            load_recorder()

    def serve_only(self, models) -> None:
        """Forget what was recorded for any model but ``models`` (the ones served after a reload): the
        compilations now, each worker's traces or CUDA graphs now if it idles, else before its next batch.
        Each recording keeps its model alive; without this, replaced models stayed in memory until their
        recordings were evicted. (Every recording's key starts with ``id(model)``; a served model is
        alive, so its id is its own.)"""
        served = frozenset(id(model) for model in models)

        def stale(key: tuple) -> bool:
            return key[0] not in served

        with self._cond:
            self._stale = stale
            self._served_generation += 1
            self._fair.keep(served)
            for wake in self._idle:
                wake.notify()
        if self._scripts is not None:
            self._scripts.forget(stale)

    def _forget_stale(self) -> None:
        """In a worker: drop its recordings for models no longer served, if models changed since it last looked."""
        generation = self._served_generation
        if getattr(self._local, "served_generation", 0) != generation:
            self._local.served_generation = generation
            graphs = getattr(self._local, "graphs", None)
            if graphs is not None:
                graphs.forget(self._stale)

    def start(self) -> None:
        if self._threads:
            return
        self._stopping = False
        if self._scripts is not None:
            self._scripts.reopen()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"metalearn-engine-{i}", daemon=True) for i in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            # (the queue emptied first: a cancelled job's callback, run inside cancel(), withdraws it from the
            # queue, and would otherwise change the deque this loop walks)
            queued, self._pending = list(self._pending), deque()
            for job in queued:
                job.future.cancel()
            self._cond.notify_all()
            for wake in self._idle:
                wake.notify()
            self._idle.clear()
        if self._scripts is not None:
            self._scripts.close()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._scripts is not None:
            # A compilation under way (seconds of CPU, on a daemon thread) is of no use to a service that
            # stops: waiting for it took shutdowns past a container's grace period (12-13 s against 4).
            self._scripts.join(min(1.0, max(0.0, deadline - time.monotonic())))
        self._threads = []

    def longest_recent_batch(self, window_s: float = 60.0) -> float:
        """The longest batch of the last ``window_s`` seconds, a batch still computing counted by its time so far
        (0 when none): a stopping server's margin."""
        now = time.monotonic()
        with self._cond:
            done = (seconds for when, seconds in self._batch_times if when >= now - window_s)
            return max([*done, *(now - began for began in list(self._computing.values()))], default=0.0)

    def finish_by(self, deadline: float, reason: str) -> None:
        """From now on, start a batch only as large as is expected to end by ``deadline`` (monotonic): a job
        that would not is failed with :class:`EngineStopped` when a worker reaches it, so that a stopping
        server answers it (``503``, retry elsewhere) instead of dropping its connection at the end of its grace
        period. (A review: 24 adaptations of 100 examples x 100 steps queued at SIGTERM; the workers took
        batches of 8, each longer than the grace left, and 16 connections were dropped.) A model's cost is its
        recent seconds per request (``FairShare.per_job``); one of unknown cost is taken alone."""
        with self._cond:
            self._finish_by = (deadline, reason)

    def _fitting(self, job: Job) -> int:
        """How many requests like ``job`` one batch may take before the :meth:`finish_by` deadline (no limit
        before one is set; 0: not even ``job``). Called under the queue's lock."""
        if self._finish_by is None:
            return self.max_batch_size
        left = self._finish_by[0] - time.monotonic()
        per_job = self._fair.per_job(job.model)
        if per_job is None or per_job <= 0:
            return 1 if left > 0 else 0
        return max(0, min(self.max_batch_size, int(left // per_job)))

    def shed(self, reason: str) -> int:
        """Fail every job still queued with :class:`EngineStopped` (answered ``503`` with ``Retry-After``), and
        every job submitted from now on, so that a stopping server answers them before its grace period ends
        instead of dropping their connections; jobs already computing finish. Returns how many were shed."""
        with self._cond:
            queued, self._pending = list(self._pending), deque()
            self._shed_reason = reason  # and what comes later: it would not finish either
        for job in queued:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(EngineStopped(reason))
        return len(queued)

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads) and not self._stopping

    def depth(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------
    # Submission (event loop side)
    # ------------------------------------------------------------------
    def submit_nowait(self, job: Job) -> concurrent.futures.Future:
        with self._cond:
            if not self.running:
                raise EngineStopped("the adaptation worker is not running")
            if self._shed_reason is not None:
                raise EngineStopped(self._shed_reason)
            if len(self._pending) >= self.queue_size:
                # Retry-After: a rough time to drain what is queued.
                raise QueueFull(max(1, int(self.request_timeout_s // 10)))
            self._pending.append(job)
            depth = len(self._pending)
            self._cond.notify_all()  # workers filling a batch: this job may join one
            if self._idle:
                # The most recently idle worker: its caches still hold the model and its buffers (with
                # the longest-idle one, as a plain notify would pick, a lone client's session predict
                # took 0.1 ms longer on 2 workers than on 1).
                self._idle.pop().notify()
        # A job cancelled while queued (its request timed out, its client left) leaves the queue at once:
        # skipped only when a worker reached it, it held a place, and a full queue of them refused new requests.
        # (The callback finds the job by its future: one holding the job would make a reference cycle, which
        # only the garbage collector frees, with the request's tensors.)
        job.future.add_done_callback(self._withdraw_if_cancelled)
        if self.metrics is not None:
            self.metrics.queue_depth(depth)
        return job.future

    def _withdraw_if_cancelled(self, future: concurrent.futures.Future) -> None:
        if not future.cancelled():
            return
        with self._cond:
            for index, queued in enumerate(self._pending):
                if queued.future is future:
                    del self._pending[index]
                    depth = len(self._pending)
                    break
            else:
                return
        if self.metrics is not None:
            self.metrics.queue_depth(depth)

    async def submit(self, job: Job, timeout: float | None = None, alone: Callable[[], bool] | None = None) -> Any:
        """The job's result, computed by a worker; or, for a session predict whose request is ``alone()``
        (the only one the app is handling), on this thread (the event loop's) when that is faster: on the
        CPU, every worker idle, and the model's last lone prediction computed within ``inline_predict_ms``
        for this many query images. Under concurrency the workers batch, which is faster."""
        if alone is not None and alone() and self._may_compute_here(job):  # (alone first: the cheaper check)
            # Requests read from the sockets in the same turn of the event loop as this one were scheduled
            # after it and have not started: one turn lets them start, and count, before deciding.
            await asyncio.sleep(0)
            if alone() and self._may_compute_here(job):
                return self._compute_here(job)
        future = self.submit_nowait(job)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout or self.request_timeout_s)
        except asyncio.TimeoutError:
            future.cancel()
            raise JobTimeout(f"the request did not finish within {timeout or self.request_timeout_s:g} s") from None

    def _may_compute_here(self, job: Job) -> bool:
        if job.kind != "predict" or job.session is None or self.inline_predict_s <= 0 or str(job.model.device) != "cpu":
            return False
        per_image = job.model.derived.get("lone_predict_s", {}).get(job.transductive)
        if per_image is None or per_image * len(job.query_x) > self.inline_predict_s:
            return False  # (not measured yet: a worker computes the model's first lone predictions)
        with self._cond:
            return self.running and not self._stopping and not self._pending and len(self._idle) == self.workers

    def _compute_here(self, job: Job) -> Any:
        """Run ``job`` on the calling thread as a worker would run a batch of one (the same kernels, with
        this thread's own traces; the same metrics and errors)."""
        self._forget_stale()
        job.future.set_running_or_notify_cancel()
        if self.metrics is not None:
            self.metrics.computed_here()
        self._execute([job])
        return job.future.result()

    # ------------------------------------------------------------------
    # Worker
    # ------------------------------------------------------------------
    def _take_compatible(self, key: tuple, batch: list[Job], limit: int) -> None:
        """Move the queued jobs that can run with ``batch`` into it, up to ``limit`` jobs and, with a
        ``max_batch_work``, while their work fits in it: a batch of 8 requests each at the limit of one
        request's computation would hold its worker 8 times as long as that limit means to (80 s for
        Conv4-64 against a 30 s request timeout), and run past a stopping server's grace period."""
        if len(batch) >= limit or not self._pending:
            return
        room = (self.max_batch_work or math.inf) - sum(job.work() for job in batch)
        keep: deque[Job] = deque()
        while self._pending:
            job = self._pending.popleft()
            if len(batch) < limit and _compatible(job, key) and job.work() <= room:
                batch.append(job)
                room -= job.work()
            else:
                keep.append(job)
        self._pending = keep

    def _next_batch(self, batch: list[Job]) -> float | None:
        """Fill ``batch`` (empty) with the next job and those that can run with it: the oldest job of the least
        charged model of the least charged key among those queued (service.fair_share). Returns the estimate the
        batch was charged, None when the engine stops. (Filled in place: should something fail on the way,
        the caller still knows which jobs it took.)"""
        if not hasattr(self._local, "wake"):
            self._local.wake = threading.Condition(self._lock)  # this worker's own, under the queue's lock
        late: list[Job] = []  # jobs that would not finish before a stopping server's deadline (finish_by)
        try:
            with self._cond:
                charged = self._fill_batch(batch, late)
                depth = len(self._pending)
        finally:
            for job in late:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(EngineStopped(self._finish_by[1]))
        if self.metrics is not None and charged is not None:
            self.metrics.queue_depth(depth)
        return charged

    def _fill_batch(self, batch: list[Job], late: list[Job]) -> float | None:
        """:meth:`_next_batch` under the queue's lock; jobs that would end past the :meth:`finish_by` deadline
        go to ``late`` (``batch`` may then stay empty)."""
        while True:
            while not self._pending and not self._stopping:
                if late:
                    return 0.0  # (no batch: the late jobs are answered first)
                self._forget_stale()  # (serve_only wakes the idle workers for this)
                self._idle.append(self._local.wake)
                self._local.wake.wait()
                if self._local.wake in self._idle:  # woken by something other than a submit
                    self._idle.remove(self._local.wake)
            if self._stopping:
                return None
            index = self._fair.pick(self._pending)
            first = self._pending[index]
            del self._pending[index]
            fitting = self._fitting(first)
            if fitting > 0:
                break
            late.append(first)
        batch.append(first)
        key = first.key()
        # A computation that runs its rows one by one gains little from company, and while other models
        # (or keys) are served, a batch of them would hold the worker, and their requests arriving
        # meanwhile, for the length of all of them. (Taken one at a time with one model served, MAML
        # served 4% fewer requests at concurrency 16; why was not found: in process, batches of 1 and 8
        # take the same per request.)
        by_row = self._scripts is not None and self._fair.shared(first) and self._scripts.runs_by_row(key)
        limit = 1 if by_row else fitting
        self._take_compatible(key, batch, limit)
        # Wait for company only under concurrency (the last batch had several
        # jobs): a lone client pays no batching delay.
        if self.max_wait > 0 and len(batch) < limit and self._last_batch_size > 1:
            deadline = time.perf_counter() + self.max_wait
            while len(batch) < limit:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
                if self._stopping:
                    break
                self._take_compatible(key, batch, limit)
        self._last_batch_size = len(batch)
        return self._fair.start(batch)

    def _run(self, index: int) -> None:
        if self.worker_cpus:
            try:  # this thread, and the torch threads it starts: they inherit it
                os.sched_setaffinity(0, self.worker_cpus[index % len(self.worker_cpus)])
            except (OSError, AttributeError) as error:  # not Linux, or cores no longer allowed
                log.warning("worker %d runs unpinned: %s", index, error)
        if self.threads:
            torch.set_num_threads(self.threads)
        while self._serve_next_batch():
            pass

    LOOP_FAILURE_PAUSE_S = 0.05

    def _serve_next_batch(self) -> bool:
        """Wait for the next batch and run it; False when the engine stops. (A call of its own: an idle
        worker keeps no reference to its last jobs, which would keep their model alive after a reload.)"""
        batch: list[Job] = []
        try:
            charged = self._next_batch(batch)
            if charged is None:
                return False
            if not batch:
                return True
            self._forget_stale()
            running = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if len(running) < len(batch):  # (cancelled while queued: their owners are refunded their estimate)
                with self._cond:
                    charged = self._fair.refund(batch, running, charged)
            if running:
                self._execute(running, charged)
        except Exception as error:  # noqa: BLE001 - a worker that died would leave every later request waiting
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(error)
            # A bug here that lasts fails every batch: the traceback once a minute (a review's half-finished edit
            # logged 500 000 in two minutes), and a pause, not a core spinning through the queue.
            now = time.monotonic()
            if now - self._loop_failed_at >= 60.0:
                self._loop_failed_at = now
                log.exception("a worker's loop failed outside a computation; its batch fails and the worker goes on "
                              "(further failures of this kind are logged once a minute)")
            else:
                log.debug("a worker's loop failed outside a computation again: %r", error)
            time.sleep(self.LOOP_FAILURE_PAUSE_S)
        return True

    def _execute(self, batch: list[Job], charged: float = 0.0) -> None:
        """Compute ``batch`` and answer its jobs; its jobs' keys and model are charged its time (``charged``:
        the estimate charged when the batch was taken; 0 for a job computed on the event loop)."""
        worker = threading.get_ident()
        began = time.monotonic()
        self._computing[worker] = began  # (longest_recent_batch counts a batch while it computes)
        try:
            self._execute_timed(batch)
        finally:
            self._computing.pop(worker, None)
            with self._cond:
                self._fair.settle(batch, time.monotonic() - began, charged)

    def _execute_timed(self, batch: list[Job]) -> None:
        kind = batch[0].kind
        start = time.perf_counter()
        try:
            with torch.inference_mode(False), torch.no_grad():
                results = self._compute(batch)
        except Exception as error:  # noqa: BLE001 - isolate the failing request
            if len(batch) > 1:
                log.warning("batch of %d %s jobs failed (%s); running them one by one", len(batch), kind, error)
                for job in batch:
                    self._execute_timed([job])
                return
            if raised_by_model_code(error, batch[0].model.learner.model):
                log.warning("%s job for model %s: the model's code refused its inputs (%s: %s)", kind, batch[0].model.name, type(error).__name__, error)
                error = ModelRefused(f"{type(error).__name__}: {error}")
            else:
                log.exception("%s job for model %s failed", kind, batch[0].model.name)
            batch[0].future.set_exception(error)
            return
        elapsed = time.perf_counter() - start
        if kind == "predict" and len(batch) == 1 and batch[0].session is not None:
            # What the next lone session predict of this model would cost, per query image (see submit)
            times = batch[0].model.derived.setdefault("lone_predict_s", {})
            times[batch[0].transductive] = elapsed / max(1, len(batch[0].query_x))
        for job, result in zip(batch, results):
            result["compute_seconds"] = elapsed
            result["batch_size"] = len(batch)
            job.future.set_result(result)
        with self._cond:  # several workers count
            self.batches += 1
            self._batch_times.append((time.monotonic(), elapsed))
        if self.metrics is not None:
            self.metrics.batch(kind, batch[0].model.name, len(batch), elapsed)

    # ------------------------------------------------------------------
    # The computations
    # ------------------------------------------------------------------
    def _compute(self, batch: list[Job]) -> list[dict]:
        if batch[0].kind == "adapt":
            return self._adapt(batch)
        return self._predict(batch)

    def _strategy(self, model) -> str:
        if "strategy" not in model.derived:
            model.derived.setdefault("strategy", choose_strategy(model.learner, model.device, training=False))
        return model.derived["strategy"]

    def _fast(self, model):
        """The fast batched kernel for this model, or None (see service.fastpath).

        Both kernels beat the generic path even for a single request on the CPU;
        results agree with it to float rounding (tests/test_fastpath.py).
        """
        if "fast" not in model.derived:
            from service import fastpath

            # (setdefault: two workers building it at once all use the first one's)
            model.derived.setdefault("fast", fastpath.fast_kernel(model.learner, model.input_shape))
        return model.derived["fast"]

    def _learner(self, model):
        """The learner this worker runs the generic path with: with several workers, its own copy.

        ``functional_call`` swaps the given tensors into the module for the length of a
        call, and ANIL's feature capture hooks the module's head: two workers computing
        with one module at once would read each other's parameters and could leave one's
        adapted parameters in the model. The fast kernels never touch the module.
        """
        learner = model.learner
        if self.workers == 1:
            return learner
        if not hasattr(self._local, "replicas"):
            # original learner -> this worker's copy, for as long as the original is served or computed
            # with (a reload replaces models: service.app.reload_models)
            self._local.replicas = weakref.WeakKeyDictionary()
        if learner not in self._local.replicas:
            self._local.replicas[learner] = copy.deepcopy(learner)
        return self._local.replicas[learner]

    def _scripting(self, model) -> bool:
        """Whether this model's computations may run through compilations (service.cpu_scripts): on the CPU, when on."""
        return self._scripts is not None and str(model.device) == "cpu"

    def _recording(self, model, build: Callable[..., tuple[Callable, str | None]]) -> Callable[[int], Callable] | None:
        """What a compilation of ``rows`` requests records (service.cpu_scripts), built only when one is
        queued: ``build(rows=..., learner=...)`` is a kernel builder. The fast kernels keep no state, so
        their computation itself (None); the generic path sets per-call state on its modules (BatchNorm's
        statistics modes, ANIL's feature hooks), so the compiling thread records on a learner of its own."""
        if self._fast(model) is not None:
            return None

        def record(rows: int) -> Callable:
            # Copied here, on the worker that queues the compilation: with one worker the model's
            # learner is that worker's (with several, every worker computes on a copy of its own).
            if "compile_learner" not in model.derived:
                with self._cond:  # (two workers may queue at once)
                    if "compile_learner" not in model.derived:
                        model.derived["compile_learner"] = copy.deepcopy(model.learner)
            return build(rows=rows, learner=model.derived["compile_learner"])[0]

        return record

    def _graphs(self, device) -> GraphCache | None:
        """This worker's cache of recorded computations, or None: on a GPU its CUDA graphs, when graphs
        are on and this is the only worker (a capture fails while another thread computes on the GPU;
        see service.cuda_graphs); on the CPU its TorchScript traces (service.cpu_traces), when on."""
        if str(device).startswith("cuda"):
            if not self.cuda_graphs or self.workers > 1:
                return None
            make = partial(GraphCache, capacity=self.cuda_graphs)
        elif self.cpu_traces:
            make = partial(TraceCache, capacity=self.cpu_traces)
        else:
            return None
        if not hasattr(self._local, "graphs"):  # (a worker serves one device: the registry's)
            self._local.graphs = make()
            with self._cond:
                self._graph_caches.append(self._local.graphs)
        return self._local.graphs

    def graph_stats(self) -> dict[str, int]:
        """CUDA graphs over all workers: held, captures, replays, failures, evictions (all 0 off a GPU)."""
        return self._cache_stats(lambda cache: not isinstance(cache, TraceCache))

    def trace_stats(self) -> dict[str, int]:
        """CPU traces over all workers: held, captures, replays, failures, evictions."""
        return self._cache_stats(lambda cache: isinstance(cache, TraceCache))

    def script_stats(self) -> dict[str, int]:
        """Compiled CPU adaptations (shared by the workers): held, compiled, batches replayed, failures, evictions, compiling."""
        if self._scripts is None:
            return {"held": 0, "captures": 0, "replays": 0, "failures": 0, "evictions": 0, "pending": 0}
        s = self._scripts
        return {"held": len(s), "captures": s.captures, "replays": s.replays, "failures": s.failures, "evictions": s.evictions, "pending": s.pending()}

    def _cache_stats(self, include: Callable[[GraphCache], bool]) -> dict[str, int]:
        with self._cond:
            caches = [cache for cache in self._graph_caches if include(cache)]
        return {
            "held": sum(len(c) for c in caches),
            "captures": sum(c.captures for c in caches),
            "replays": sum(c.replays for c in caches),
            "failures": sum(c.failures for c in caches),
            "evictions": sum(c.evictions for c in caches),
        }

    def _rows(self, graphs: GraphCache | None, count: int) -> int:
        """How many rows a batch of ``count`` computes: padded to a graph bucket with CUDA graphs, else ``count``."""
        return bucket(count, self.max_batch_size) if graphs is not None and graphs.pads else count

    def _graphed(self, graphs: GraphCache | None, batch: list[Job], compute: Callable, replay: str | None, inputs: list[torch.Tensor], rows: int, record: Callable | None = None):
        """``compute(*inputs)``, replayed from a CUDA graph when there are graphs (inputs padded to ``rows``).
        On the CPU, as the kernel builder's ``replay`` allows: ``"trace"`` from this worker's trace of it
        (service.cpu_traces), ``"script"`` through scripts compiled in the background, row by row (or,
        for a small model, the whole batch: service.cpu_scripts; what it records: ``record(rows)`` when
        given, else ``compute``), ``None`` eagerly."""
        model = batch[0].model
        if replay == "script" and self._scripting(model):
            # The key leaves out the rows: the cache compiles a request's computation (and batch sizes itself).
            return self._scripts.run(batch[0].key(), compute, tuple(inputs), owner=model, record=record)
        if graphs is None or (isinstance(graphs, TraceCache) and replay != "trace"):
            return compute(*inputs)
        inputs = tuple(pad_rows(t, rows) for t in inputs)
        return graphs.run(batch[0].key() + (rows,), compute, inputs, owner=model)

    def _adapt(self, batch: list[Job]) -> list[dict]:
        model = batch[0].model
        device = model.device
        first = batch[0]
        count = len(batch)
        graphs = self._graphs(device)
        rows = self._rows(graphs, count)
        inputs = [torch.stack([j.support_x for j in batch]), torch.stack([j.support_y for j in batch])]
        if first.query_x is not None:
            inputs.append(torch.stack([j.query_x for j in batch]))
        inputs = [t.to(device, non_blocking=True) for t in inputs]
        compute, replay = self._adapt_kernel(model, first, rows)
        record = self._recording(model, partial(self._adapt_kernel, model, first))
        stacked, outputs, finite = self._graphed(graphs, batch, compute, replay, inputs, rows, record)
        before = stacked.support_loss_before[:count].float().cpu().tolist()
        after = stacked.support_loss_after[:count].float().cpu().tolist()
        finite = finite[:count].cpu().tolist()
        results = []
        decoded = None if outputs is None else self._decode_outputs(model, outputs[:count])
        for i in range(count):
            if not finite[i]:  # the mask covers the parameters, the outputs and both support losses
                results.append({"diverged": True, "support_loss_before": before[i], "support_loss_after": after[i]})
                continue
            result: dict = {"support_loss_before": before[i], "support_loss_after": after[i]}
            if first.keep_session:
                result["tensors"] = session_tensors(stacked, i)
            if decoded is not None:
                result.update({k: v[i] for k, v in decoded.items()})
            results.append(result)
        return results

    def _adapt_kernel(self, model, first: Job, rows: int, learner=None) -> tuple[Callable, str | None]:
        """``compute(support_x, support_y[, query_x])`` for ``rows`` stacked requests like ``first``:
        -> (stacked Adaptation, outputs or None, per-row all-finite mask). Only tensor work (graphable).
        With it, how the CPU may replay it (see _graphed): every path computes each row alone; the fast
        kernels the same way for any number of rows, and a trace when they take no gradients; the rest
        through a script. ``learner``: the generic path's learner (default: this worker's)."""
        steps, lr, transductive, shift = first.steps, first.lr, first.transductive, model.support_shift
        strategy = self._strategy(model)
        fast = self._fast(model)
        if fast is None and learner is None:
            learner = self._learner(model)  # (the fast kernels need no copy)

        def compute(sx, sy, qx=None):
            # Every path below (fast kernels included) adapts to the augmented support set.
            sx, sy = augment_support(sx, sy, shift, stacked=True)
            if fast is not None:
                stacked = fast.adapt(sx, sy, steps, lr)
                outputs = None if qx is None else fast.predict(stacked, qx, transductive=transductive)
            elif rows == 1 or strategy == "loop":
                adaptations = [adapt(learner, sx[i], sy[i], steps=steps, lr=lr) for i in range(rows)]
                outputs = None
                if qx is not None:
                    outputs = torch.stack([predict(learner, a, qx[i], transductive=transductive) for i, a in enumerate(adaptations)])
                stacked = _stack(adaptations)
            else:
                stacked = adapt_many(learner, sx, sy, steps=steps, lr=lr)
                outputs = None if qx is None else predict_many(learner, stacked, qx, transductive=transductive)
            tensors = [*stacked.params.values(), stacked.support_loss_before, stacked.support_loss_after]
            return stacked, outputs, _finite_rows(tensors + ([] if outputs is None else [outputs]))

        return compute, self._adapt_replay(model)

    def _adapt_replay(self, model) -> str:
        """How the CPU may replay ``model``'s adaptations (see _graphed): a trace when the fast kernel takes
        no gradients, else a script."""
        fast = self._fast(model)
        return "trace" if fast is not None and fast.traceable_adapt else "script"

    def _predict(self, batch: list[Job]) -> list[dict]:
        model = batch[0].model
        device = model.device
        first = batch[0]
        count = len(batch)
        graphs = self._graphs(device)
        rows = self._rows(graphs, count)
        # (alone: one row, as _predict_kernel decides it; with CUDA graphs one job is one row too: bucket(1) == 1)
        key, make = self._session_inputs(model, first.transductive, lone_query=first.query_x if rows == 1 else None)
        sessions = [make(j.session) if j.session_prepared is None else j.session_prepared(key, make) for j in batch]
        names = sorted(sessions[0])
        inputs = [torch.stack([j.query_x for j in batch]).to(device, non_blocking=True)]
        inputs += [sessions[0][n] if count == 1 else torch.cat([s[n] for s in sessions]) for n in names]
        compute, replay = self._predict_kernel(model, first, names, rows)
        record = self._recording(model, partial(self._predict_kernel, model, first, names))
        outputs, finite = self._graphed(graphs, batch, compute, replay, inputs, rows, record)
        finite = finite[:count].cpu().tolist()
        decoded = self._decode_outputs(model, outputs[:count])
        return [{k: v[i] for k, v in decoded.items()} if finite[i] else {"diverged": True} for i in range(count)]

    def _preparing(self, model, transductive: bool, alone: bool):
        """The fast kernel whose predictions compute with constants it prepares from a session
        (FastFull.prepare: with the session's BatchNorm statistics, not the queries'), else None: MAML's,
        and for a prediction computed ``alone``, ANIL's (FastAnil.alone; its batches share the body)."""
        fast = self._fast(model)
        if transductive or fast is None:
            return None
        if hasattr(fast, "prepare"):
            return fast
        return fast.alone if alone else None

    def _session_inputs(self, model, transductive: bool, lone_query: torch.Tensor | None = None) -> tuple[Hashable, Callable[[dict], dict]]:
        """How a prediction's session becomes its inputs, for ``Session.prepared(key, make)``: ``make(tensors)``
        -> ``{name: [1, ...] tensor}`` on the model's device: views of the session's tensors, or the constants
        the kernel prepares from them; for a prediction computed alone (of ``lone_query``), packed in the
        blocks where that pays (FastFull.packed_blocks; batches concatenate the plain constants)."""
        device = model.device

        def views(tensors: dict) -> dict:
            return {name: t.to(device).unsqueeze(0) for name, t in tensors.items()}

        preparing = self._preparing(model, transductive, alone=lone_query is not None)
        if preparing is None:
            return ("views", str(device)), views
        blocks = frozenset() if lone_query is None else preparing.packed_blocks(lone_query)
        if blocks:
            return ("packed", tuple(sorted(blocks)), str(device)), lambda tensors: preparing.pack(preparing.prepare(adaptation_from_tensors(views(tensors))), blocks)
        return ("prepared", str(device)), lambda tensors: preparing.prepare(adaptation_from_tensors(views(tensors)))

    def _predict_kernel(self, model, first: Job, names: list[str], rows: int, learner=None) -> tuple[Callable, str | None]:
        """``compute(query_x, *session inputs in names' order)`` for ``rows`` stacked session predictions
        like ``first`` (see _session_inputs): -> (outputs, per-row all-finite mask). Only tensor work
        (graphable). With it, how the CPU may replay it (see _graphed): the fast kernels' predictions are
        tensor operations alone (a trace); the generic path's go through a script. ``learner`` as for
        _adapt_kernel."""
        transductive = first.transductive
        fast = self._fast(model)
        preparing = self._preparing(model, transductive, alone=rows == 1)
        if fast is None and learner is None:
            learner = self._learner(model)

        def compute(qx, *session):
            tensors = dict(zip(names, session))
            if preparing is not None:
                outputs = preparing.predict_prepared(tensors, qx)
            elif fast is not None:
                outputs = fast.predict(adaptation_from_tensors(tensors), qx, transductive=transductive)
            elif rows == 1:
                adaptation = adaptation_from_tensors({n: t[0] for n, t in tensors.items()})
                outputs = predict(learner, adaptation, qx[0], transductive=transductive).unsqueeze(0)
            else:
                outputs = predict_many(learner, adaptation_from_tensors(tensors), qx, transductive=transductive)
            return outputs, _finite_rows([outputs])

        return compute, "script" if fast is None else "trace"

    @staticmethod
    def _decode_outputs(model, outputs: torch.Tensor) -> dict[str, list]:
        """``outputs`` [R, N, out] -> per request lists (classification: predictions + probabilities)."""
        outputs = outputs.float()
        if model.task_type == "classification":
            logits = outputs[..., : model.n_way]
            probabilities = torch.softmax(logits, dim=-1)
            return {
                "predictions": probabilities.argmax(-1).cpu().tolist(),
                "probabilities": probabilities.cpu().tolist(),
            }
        values = outputs.cpu()
        if values.shape[-1] == 1:
            values = values.squeeze(-1)
        return {"predictions": values.tolist()}
