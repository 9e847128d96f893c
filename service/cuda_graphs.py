"""CUDA graphs for the engine's computations on a GPU.

One request's adaptation on a GPU is bound by kernel launches, not arithmetic:
ten inner steps of a Conv4 forward and backward are about a thousand small
kernels, 40-50 ms of CPU time for 3 ms of GPU work
(``bench/experiments/request_profile.py cuda``). A CUDA graph records those
launches once and replays them with one call.

:class:`GraphCache` does this for the engine, per computation *shape*: a
function of tensors (an adaptation kernel, a session prediction), its input
shapes and its Python-level arguments (steps, learning rate, BatchNorm mode)
make a key. The first use of a key runs eagerly (most one-off shapes never
need a graph); the second captures a graph, and every later use copies its
inputs into the graph's static input tensors and replays it. Keys whose
capture fails (a computation that synchronises with the CPU, say) run eagerly,
and are tried again after ``retry_failed_s`` (10 minutes); the cache holds at
most ``capacity`` graphs (least recently used dropped), and captures at most
``capacity`` at once, then one per ``refill_s`` seconds (with more shapes in
use than it holds, the rest run eagerly instead of being captured again and
again).

The engine pads a micro-batch to a power of two (:func:`bucket`) so that
batch sizes 1..64 need seven graphs per shape, not 64; padded rows repeat a
real request and are dropped from the results (requests never influence each
other's results, so the padding changes nothing).

Outputs are the graph's static tensors: valid until the next call of the same
key, so a caller copies what it keeps before the next call (the engine's one
worker per GPU consumes a batch's results before it takes the next batch).

One thread per GPU: a capture fails when another thread computes on the GPU
meanwhile (measured on an H100 with two engine workers:
``cudaErrorStreamCaptureUnsupported``), so the engine uses graphs only when a
single worker owns the GPU, its default.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from typing import Any, Callable

import torch

log = logging.getLogger("service.cuda_graphs")


def bucket(count: int, limit: int) -> int:
    """The padded batch size for ``count`` requests: the next power of two, at most ``limit`` (and at least ``count``)."""
    return max(count, min(1 << (count - 1).bit_length(), limit))


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` [R, ...] with its first row repeated to ``rows`` rows."""
    extra = rows - tensor.shape[0]
    if extra <= 0:
        return tensor
    return torch.cat([tensor, tensor[:1].expand(extra, *tensor.shape[1:])])


class _Graph:
    __slots__ = ("graph", "inputs", "outputs", "owner")

    def __init__(self, graph, inputs, outputs, owner):
        self.graph, self.inputs, self.outputs, self.owner = graph, inputs, outputs, owner


class GraphCache:
    """Replays a CUDA graph of ``fn(*inputs)`` per key, capturing it on the key's ``capture_after``-th use.

    ::

        graphs = GraphCache(capacity=16)
        outputs = graphs.run(("adapt", shapes, steps, lr), compute, (support_x, support_y), owner=model)

    ``fn`` must compute only on the GPU from its tensor arguments (no CPU
    synchronisation) and return tensors in any nesting of tuples, dicts and
    dataclasses. ``owner`` is kept alive with the graph (the graph reads its
    parameters' memory).
    """

    what = "CUDA graph capture"  # for the log
    pads = True  # the engine pads batches to a bucket size (fewer graphs; padding is free on a GPU)
    # A key whose capture failed is tried again after this long (None: never). A capture may fail for
    # a passing reason (another thread's GPU work during it, memory pressure); without a retry that
    # shape ran eagerly, several times slower, for the rest of the process.
    retry_failed_s: float | None = 600.0

    def __init__(self, capacity: int = 16, capture_after: int = 2, warmup: int = 2, refill_s: float = 10.0):
        if capacity < 1 or capture_after < 1:
            raise ValueError("capacity and capture_after must be >= 1")
        self.capacity = capacity
        self.capture_after = capture_after
        self.warmup = warmup
        # A capture budget: ``capacity`` captures at once, then one per ``refill_s`` seconds. With more
        # shapes in use than the cache holds, least-recently-used eviction would otherwise recapture
        # on nearly every use (each capture costs a few eager runs); now the others run eagerly.
        self.refill_s = refill_s
        self._budget = float(capacity)
        self._budget_at = time.monotonic()
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._uses: OrderedDict[tuple, int] = OrderedDict()  # keys seen, not (yet) captured; bounded
        self._failed: OrderedDict[tuple, float] = OrderedDict()  # key -> when to try it again
        self.captures = 0
        self.replays = 0
        self.failures = 0
        self.evictions = 0  # entries dropped for room (not those of models no longer served): more shapes in use than held

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, key: tuple, fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], owner: Any = None) -> Any:
        entry, capture = self._admit(key)
        if entry is not None:
            return self._replay(entry, inputs)
        if not capture:
            return fn(*inputs)
        try:
            entry = self._capture(fn, inputs, owner)
        except Exception as error:  # noqa: BLE001 - any capture problem means: run this key eagerly
            self._fail(key, error)
            return fn(*inputs)
        self._hold(key, entry)
        self.replays += 1
        return self._replay(entry, inputs)

    def forget(self, stale: Callable[[tuple], bool]) -> None:
        """Drop every key ``stale(key)`` says will not come again (a model no longer served), and with its
        entry the owner the entry keeps alive."""
        for table in (self._graphs, self._uses, self._failed):
            for key in [k for k in table if stale(k)]:
                del table[key]

    def _admit(self, key: tuple) -> tuple[Any, bool]:
        """(the entry to replay for ``key``, or None; whether to capture ``key`` now), counting this use."""
        entry = self._graphs.get(key)
        if entry is not None:
            self._graphs.move_to_end(key)
            self.replays += 1
            return entry, False
        if key in self._failed:
            if time.monotonic() < self._failed[key]:
                return None, False
            del self._failed[key]
        uses = self._uses.pop(key, 0) + 1
        if uses < self.capture_after or not self._spend_budget():
            self._remember(self._uses, key, uses)
            return None, False
        return None, True

    def _hold(self, key: tuple, entry: Any) -> None:
        self._graphs[key] = entry
        while len(self._graphs) > self.capacity:
            del self._graphs[self._victim()]
            self.evictions += 1

    def _victim(self) -> tuple:
        """The key dropped when the cache is over capacity: the least recently used."""
        return next(iter(self._graphs))

    def _fail(self, key: tuple, error: Exception) -> None:
        """``key`` runs eagerly from now on (for ``retry_failed_s``)."""
        self.failures += 1
        retry = self.retry_failed_s
        self._remember(self._failed, key, math.inf if retry is None else time.monotonic() + retry)
        logging.getLogger(type(self).__module__).warning(
            "%s failed for %s (%s: %s); running it eagerly%s", self.what, key, type(error).__name__, str(error)[:300],
            "" if retry is None else f", tried again in {retry:.0f} s")

    def _spend_budget(self) -> bool:
        now = time.monotonic()
        self._budget = min(float(self.capacity), self._budget + (now - self._budget_at) / self.refill_s)
        self._budget_at = now
        if self._budget < 1.0:
            return False
        self._budget -= 1.0
        return True

    def _replay(self, entry: _Graph, inputs: tuple[torch.Tensor, ...]) -> Any:
        for static, tensor in zip(entry.inputs, inputs):
            static.copy_(tensor)
        entry.graph.replay()
        return entry.outputs

    def _remember(self, table: OrderedDict, key: tuple, value) -> None:
        table[key] = value
        while len(table) > 64 * self.capacity:  # many distinct one-off keys (learning rates, say) stay bounded
            table.popitem(last=False)

    def _capture(self, fn, inputs, owner) -> _Graph:
        start = time.perf_counter()
        static = tuple(t.clone() for t in inputs)
        # Warm up on a side stream (lazy initialisation, cuDNN's algorithm choice) as capture requires.
        stream = torch.cuda.Stream(device=static[0].device)
        stream.wait_stream(torch.cuda.current_stream(static[0].device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                fn(*static)
        torch.cuda.current_stream(static[0].device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads' GPU calls during the capture (a Redis store copying session tensors
        # to the host, say) are not refused; should they break the capture, this key runs eagerly instead.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = fn(*static)
        self.captures += 1
        log.info("captured a CUDA graph in %.0f ms (%d graphs)", 1000 * (time.perf_counter() - start), len(self._graphs) + 1)
        return _Graph(graph, static, outputs, owner)
