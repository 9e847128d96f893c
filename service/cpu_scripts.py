"""Compiled adaptations on the CPU (MAML's kernel, the generic path), recorded on a background thread.

The CPU traces (``service.cpu_traces``) cannot hold an inner loop that takes
gradients with autograd: the TorchScript tracer refuses it ("Cannot insert a
Tensor that requires grad as a constant"). So a MAML adaptation runs eagerly:
about 4000 torch calls from Python per request, each releasing and retaking the
GIL that the HTTP event loop and the other worker need. So does the engine's
generic path (any module: Meta-SGD, regression, ...).

``make_fx`` records the same computation one level down (on fake tensors: shapes,
not values), as the aten operations that run, autograd's backward and the SGD
updates included, and TorchScript
compiles the recorded graph's Python code (each operation pointed at its
overload packet: TorchScript cannot resolve ``aten.x.default``; tracing the
recorded graph instead fails on the backward operators' ``bool[3]``
arguments). Replays equal the eager run bit for bit on new requests, hold no GIL
between operations and skip Python's per-call overhead. Measured in process
(``bench/experiments/maml_scripted.py``, Conv4-64, 5-way 1-shot, 10 steps, 5
queries, one torch thread):

- one request: 25 ms scripted against 36-38 ms eager;
- eagerly in a batch of 8: 30-32 ms per request; scripted in a batch of 16:
  34-35 ms per request (slower than one by one);
- the generic path: a Conv4-64 Meta-SGD request 37 ms against 77-81 ms eager,
  a sinusoid MLP's MAML request 0.48 ms against 4.2 ms eager alone (the engine
  compiles the generic path's session predictions too).

So a batch runs its requests one at a time through the script of a single
request: one compilation per request shape, whatever the batch size. Except
for small models: where a request's script runs in under ``cheap_s`` (2 ms of
CPU; the sinusoid MLP's 0.45 ms), the per-request overhead and the small
tensors dominate, and a script of the whole batch pays (the same MLP: 0.35,
0.18 and 0.11 ms per request in batches of 2, 4 and 8). For those shapes a
batch is padded to the next power of two (repeating its first request; cheap
here) and, once that size is compiled too, runs through one call; until then,
row by row.

Recording and compiling take seconds (about 4 s for the example above), far
too long for the batch that meets a new shape to wait. :class:`ScriptCache`
compiles on one background thread, at a lower OS priority, shared by the
engine's workers; until a shape's script is ready its batches run eagerly, as
they would without it, at about half their speed while the recording runs
(it pauses for them: :class:`_Yielding`), and one of them waits about half a
second for TorchScript's compiler, which holds the GIL. A shape is compiled on its ``capture_after``-th batch;
failures (an operation TorchScript cannot express, a replay that disagrees with
the eager run) leave it eager, counted in ``/metrics``.

While it records, FX's tracer patches ``torch.nn.Module.__call__`` and
``__getattr__`` process-wide with wrappers that pass straight through for
anything it does not trace: another thread calling a module meanwhile (the
engine's generic path) computes the same, a little slower. The fast kernels
call no modules.
"""

from __future__ import annotations

import atexit
import builtins
import functools
import logging
import os
import re
import threading
import time
import weakref
from collections import OrderedDict, deque
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from service.cpu_traces import _Trace, flatten
from service.cuda_graphs import GraphCache, pad_rows

log = logging.getLogger("service.cpu_scripts")


class _Yielding(TorchDispatchMode):
    """Passes every operation on, and pauses ``pause_s`` after each ``run_s`` of recording.

    The recording is Python that holds the GIL, and a worker computing eagerly meanwhile needs the
    GIL back after each of its thousands of operations: measured in process, a MAML request that
    takes 37 ms alone took 0.7-1.5 s while a recording ran, and 80 ms with these pauses (the
    recording takes about twice as long)."""

    def __init__(self, run_s: float = 0.002, pause_s: float = 0.002):
        super().__init__()
        self.run_s, self.pause_s = run_s, pause_s
        self.since = time.perf_counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if time.perf_counter() - self.since > self.run_s:
            time.sleep(self.pause_s)  # (releases the GIL)
            self.since = time.perf_counter()
        return func(*args, **(kwargs or {}))


# make_fx keeps its state in module globals (torch.fx's patcher): two recordings at once in one process,
# the compiling thread's and load_recorder's on a reload, say, broke one of them ("CURRENT_PATCHER is None").
_RECORDING = threading.Lock()


def script(fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...]) -> tuple[Callable[..., Any], Callable]:
    """``fn`` recorded at ``inputs`` with make_fx and compiled by TorchScript: (a function of the inputs
    returning the tensors of ``fn``'s result in ``flatten``'s order, the function that rebuilds the
    result from them). ``inputs`` must be distinct tensors: the recording takes one tensor passed
    twice for one input.

    The function lives in its own compilation unit, freed with it: ``torch.jit.script`` of the
    recorded module would compile it into TorchScript's global unit, for the life of the process
    (about 40 MB per MAML adaptation, measured). So the recorded graph's constants become arguments,
    and its Python code is compiled as a plain function."""
    from torch.fx.experimental.proxy_tensor import make_fx

    structure: dict[str, Callable] = {}

    def flat(*args):
        with _Yielding():
            tensors, structure["rebuild"] = flatten(fn(*args))
        return tuple(tensors)

    # Fake tensors: the recording computes shapes, not values (faster, and no memory for the
    # intermediates), and a computation that reads a value to decide something fails to record instead
    # of fixing that decision. The model's tensors, read from fn's closure, are real: constants.
    with _RECORDING:
        recorded = make_fx(flat, tracing_mode="fake", _allow_non_fake_inputs=True)(*inputs)
    graph = recorded.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    constants = []
    for node in list(graph.nodes):
        node.meta.clear()  # (fake tensors, stack traces: nothing the compilation needs)
        if node.op == "get_attr":  # a tensor the computation read from elsewhere (a model parameter, say)
            with graph.inserting_after(placeholders[-1]):
                placeholders.append(graph.placeholder(f"constant_{len(constants)}"))
            constants.append(getattr(recorded, node.target))
            node.replace_all_uses_with(placeholders[-1])
            graph.erase_node(node)
        elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            node.target = node.target.overloadpacket  # TorchScript resolves aten.x, not aten.x.default
    code = graph.python_code(root_module="self")
    source = code.src.replace("def forward(self, ", "def compute(", 1)
    # FX frees each value after its last use with a trailing "; name = None", which TorchScript's parser
    # rejects; its interpreter frees values after their last use itself.
    source = re.sub(r";\s*(\w+\s*=\s*)+None$", "", source, flags=re.MULTILINE)
    names = dict(code.globals)

    def resolve(name: str) -> Any:
        return names[name] if name in names else getattr(builtins, name, None)

    unit = torch.jit.CompilationUnit()
    unit.define(source, rcb=resolve)
    function = unit.find_function("compute")
    constants = tuple(constants)

    def compiled(*args):
        outputs = function(*args, *constants)
        return outputs if isinstance(outputs, tuple) else (outputs,)

    compiled.unit = unit  # (the function keeps its unit alive too)
    return compiled, structure["rebuild"]


@functools.cache  # once per process
def load_recorder() -> None:
    """Record and compile a tiny computation, so that what recording imports and builds on first use
    (about 120 000 Python objects and 80 MB, in 0.9 s) is in place now: the service then freezes it out
    of the garbage collector's full passes (``service.app``). Loaded by the first compilation instead,
    every full collection after it scanned those objects again (50-100 ms pauses)."""
    script(lambda image, weight: (torch.nn.functional.conv2d(image, weight).relu().sum(),), (torch.rand(1, 1, 4, 4), torch.rand(1, 1, 3, 3)))


def _close_at_exit(cache_ref: weakref.ref) -> None:
    cache = cache_ref()
    if cache is not None:
        cache.close()
        cache.join(60.0)


class _Whole(tuple):
    """The key of a whole batch's script: (the request's key, rows)."""


class _Script(_Trace):
    __slots__ = ("seconds",)  # CPU seconds of one run on the example it was compiled for

    def __init__(self, function, rebuild, owner, seconds: float):
        super().__init__(function, None, rebuild, owner)  # (the function keeps its compilation unit alive)
        self.seconds = seconds


class ScriptCache(GraphCache):
    """Runs ``fn(*inputs)`` (inputs stacked over requests) row by row through a script of one row, once
    compiled; where that script is cheap (under ``cheap_s``), whole batches through a script of their size.

    ::

        scripts = ScriptCache(capacity=8)
        result = scripts.run(key, compute, (support_x, support_y, query_x), owner=model)
        ...
        scripts.close()

    ``fn`` must compute each row from that row of its inputs alone, with tensor
    operations only (autograd allowed), every other decision fixed by ``key``,
    and return tensors whose first dimension is the row, nested as
    :func:`service.cpu_traces.flatten` allows. One cache serves several threads.
    """

    what = "TorchScript compilation"
    pads = False  # (the engine's batches come unpadded; this cache pads cheap shapes' batches itself)
    retry_failed_s = None  # its failures are the computation's own (an operation it cannot express): for good
    cheap_s = 0.002  # a row's script under this much CPU time: compile whole batches of that shape too

    def __init__(self, capacity: int = 8, capture_after: int = 3, warmup: int = 2, refill_s: float = 30.0, nice: int = 10):
        super().__init__(capacity=capacity, capture_after=capture_after, warmup=warmup, refill_s=refill_s)
        self.nice = nice  # the compiling thread's OS priority, relative to the workers'
        self._cheap: OrderedDict[tuple, None] = OrderedDict()  # row keys whose script ran in under cheap_s (bounded)
        self._guard = threading.Condition()  # the tables and the compile queue
        self._queue: deque[tuple] = deque()
        self._compiling: set[tuple] = set()
        self._thread: threading.Thread | None = None
        self._closed = False

    def run(self, key: tuple, fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], owner: Any = None,
            record: Callable[[int], Callable[..., Any]] | None = None) -> Any:
        """``fn(*inputs)``. ``record(rows)``: builds what the compiling thread records instead of ``fn``
        for ``rows`` requests (the same computation, without state another thread uses meanwhile);
        called here, and only when this call queues a compilation."""
        count = inputs[0].shape[0]
        if count > 1 and key in self._cheap and self._room_for_whole():
            rows = 1 << (count - 1).bit_length()  # the next power of two
            whole = _Whole((key, rows))
            padded = tuple(pad_rows(t, rows) for t in inputs)
            entry = self._entry(whole, fn, padded, owner, record, rows)
            if entry is not None:
                outputs = self._replayed(whole, entry, lambda: entry.function(*padded))
                if outputs is not None:
                    return entry.rebuild(iter(t[:count] for t in outputs))
        entry = self._entry(key, fn, inputs, owner, record, 1)
        if entry is not None:
            outputs = self._replayed(key, entry, lambda: self._by_row(entry, inputs))
            if outputs is not None:
                return entry.rebuild(iter(outputs))
        return fn(*inputs)

    def runs_by_row(self, key: tuple) -> bool:
        """Whether :meth:`run` computes ``key``'s batches row by row through a compiled script (held, and not
        cheap): such a batch takes as long as its rows would one by one (the engine takes their jobs one at
        a time)."""
        with self._guard:
            return key in self._graphs and key not in self._cheap

    def _entry(self, key: tuple, fn, inputs: tuple[torch.Tensor, ...], owner, record, rows: int) -> _Script | None:
        """``key``'s compilation, or None (counting the use, and queueing the compilation of ``inputs``'
        first ``rows`` rows when due)."""
        with self._guard:
            entry, capture = (None, False) if key in self._compiling else self._admit(key)
            capture = capture and not self._closed
            if capture:
                self._compiling.add(key)
        if capture:
            # Copied: the recording must not keep the batch's tensors (or the caller's) alive.
            job = (key, record(rows) if record else fn, tuple(t[:rows].clone() for t in inputs), owner)
            with self._guard:
                self._queue.append(job)
                self._start()
                self._guard.notify()
        return entry

    def _room_for_whole(self) -> bool:
        """Whether a whole batch's script may be held without dropping a request's script."""
        with self._guard:
            return sum(not isinstance(k, _Whole) for k in self._graphs) < self.capacity

    def _victim(self) -> tuple:
        """The least recently used whole batch's script (its shape still runs row by row, and recompiles
        in a second); a request's script only when none is left."""
        return next((k for k in self._graphs if isinstance(k, _Whole)), next(iter(self._graphs)))

    def _replayed(self, key: tuple, entry: _Script, replay: Callable[[], Any]) -> Any:
        """``replay()``'s tensors, or None when it raises: that script is dropped and ``key`` runs without it."""
        try:
            return replay()
        except Exception as error:  # noqa: BLE001 - a script that cannot run these inputs: not used again
            with self._guard:
                if self._graphs.pop(key, None) is not None:
                    self._fail(key, error)
                self._cheap.pop(key, None)  # (a row key's: nor are its batches compiled from now on)
            return None

    @staticmethod
    def _by_row(entry: _Script, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        rows = [entry.function(*(t[i : i + 1] for t in inputs)) for i in range(inputs[0].shape[0])]
        return list(rows[0]) if len(rows) == 1 else [torch.cat(column) for column in zip(*rows)]

    def forget(self, stale: Callable[[tuple], bool]) -> None:
        """:meth:`GraphCache.forget` for the compilations held, queued or under way (one under way is not
        held when it finishes); a whole batch's script goes with its request's key."""
        def stale_request(key: tuple) -> bool:
            return stale(key[0] if isinstance(key, _Whole) else key)

        with self._guard:
            super().forget(stale_request)
            for key in [k for k in self._cheap if stale_request(k)]:
                del self._cheap[key]
            self._queue = deque(job for job in self._queue if not stale_request(job[0]))
            self._compiling = {key for key in self._compiling if not stale_request(key)}
            self._guard.notify_all()

    def pending(self) -> int:
        """Shapes queued or being compiled."""
        with self._guard:
            return len(self._compiling)

    def wait(self, timeout: float) -> bool:
        """Block until nothing is queued or compiling (tests, warm-up); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._guard:
            while self._compiling:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._guard.wait(min(remaining, 0.1))
            return True

    def reopen(self) -> None:
        """Compile again after :meth:`close` (an engine started again)."""
        with self._guard:
            self._closed = False

    def close(self) -> None:
        """Stop compiling (a compilation under way finishes first, on its daemon thread); scripts held keep working."""
        with self._guard:
            self._closed = True
            self._queue.clear()
            self._compiling.clear()
            self._guard.notify_all()

    # ------------------------------------------------------------------
    # The compiling thread
    # ------------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None:
            # A daemon thread still inside TorchScript's C++ when the interpreter exits aborts the process
            # ("terminate called without an active exception"): at exit, let it finish what it compiles.
            atexit.register(_close_at_exit, weakref.ref(self))
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._compile_loop, name="metalearn-compile", daemon=True)
            self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        """After :meth:`close`: wait for the compiling thread to end (a compilation under way finishes first)."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _compile_loop(self) -> None:
        try:  # Linux: a thread's niceness is its own; the workers keep the cores first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        except (AttributeError, OSError):
            pass
        while self._compile_next():
            pass

    def _compile_next(self) -> bool:
        """Wait for the next queued compilation and run it; False once closed. (A call of its own: the thread
        keeps no reference to the last one's computation and owner while it waits.)"""
        with self._guard:
            while not self._queue and not self._closed:
                self._guard.wait()
            if self._closed:
                return False
            key, fn, inputs, owner = self._queue.popleft()
        try:
            with torch.inference_mode(False), torch.no_grad():
                entry, error = self._capture(fn, inputs, owner), None
        except Exception as failure:  # noqa: BLE001 - any problem means: this key stays eager
            entry, error = None, failure
        with self._guard:
            if error is not None:
                self._fail(key, error)
            elif key in self._compiling:  # (not closed meanwhile)
                self._hold(key, entry)
                self.captures += 1
                if inputs[0].shape[0] == 1 and entry.seconds < self.cheap_s:  # a row's script, cheap
                    self._remember(self._cheap, key, None)
            self._compiling.discard(key)
            # Before the waiters wake: once wait() returns, this thread keeps no model alive (a
            # failure's traceback holds the frames that held it too).
            del fn, inputs, owner, entry, error
            self._guard.notify_all()
        return True

    def _capture(self, fn, inputs, owner) -> _Script:
        start = time.perf_counter()
        rows = inputs[0].shape[0]
        # The eager run first: what a computation does once, on real values (ANIL's check that the model's
        # forward is head(body(x)), on a learner copied for this thread), the recording on fake tensors
        # cannot ("DataDependentOutputException: aten.allclose"): with two workers, whose recording learner
        # was a fresh copy, no generic ANIL adaptation ever compiled.
        expected, _ = flatten(fn(*inputs))
        function, rebuild = script(fn, inputs)
        # TorchScript profiles the first runs and optimises the graph after them. The cost of a run is
        # the least CPU time of them (of this thread, not wall time: the compiling thread runs at a lower
        # priority, and waits while the workers are busy): the first ones include that optimisation,
        # and caches the compilation left cold.
        seconds = float("inf")
        for _ in range(self.warmup + 3):
            cpu = time.thread_time()
            outputs = function(*inputs)
            seconds = min(seconds, time.thread_time() - cpu)
        # A script that disagrees with the eager run, or whose results are not a row per request, is never used.
        if len(outputs) != len(expected):
            raise RuntimeError(f"the script returns {len(outputs)} tensors, the computation {len(expected)}")
        for got, want in zip(outputs, expected):
            if got.shape != want.shape or got.dtype != want.dtype or got.dim() == 0 or got.shape[0] != rows:
                raise RuntimeError(f"the script returns {tuple(got.shape)} {got.dtype} where the computation returns {tuple(want.shape)} {want.dtype} ({rows} rows expected)")
            same = torch.allclose(got, want, rtol=1e-4, atol=1e-5, equal_nan=True) if got.is_floating_point() else torch.equal(got, want)
            if not same:
                raise RuntimeError("the script's result differs from the eager computation's")
        log.info("compiled a computation of %d row(s) in %.1f s (%d held; a run takes %.2f ms)", rows, time.perf_counter() - start, len(self._graphs) + 1, 1000 * seconds)
        return _Script(function, rebuild, owner, seconds)
