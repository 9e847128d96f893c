"""TorchScript traces of the engine's computations on the CPU.

On the CPU an engine worker computes a micro-batch as hundreds of small torch
calls from Python, and every call releases and retakes the GIL. The HTTP event
loop runs Python in the same process, and so do the other workers: under load
a worker waits for the GIL between its calls, with its core idle. Measured on
the 2-core development machine (``bench/experiments/cpu_split.py``, ANIL at
concurrency 16): the workers' batches took 4.65 ms of wall time per request
for 2.33 ms of CPU time, with the two cores 69% busy.

A trace records the computation's tensor operations once; replaying it runs
them in TorchScript's interpreter, which holds no GIL between them (and skips
Python's per-call overhead), with results equal to the eager run. Traced, the
same load ran 1.47x the requests per second, and the batches took 2.78 ms of
wall time per request for 1.91 ms of CPU time.

:class:`TraceCache` keeps traces with the bookkeeping of
:class:`service.cuda_graphs.GraphCache` (first use of a key eager, the second
traces, failures run eagerly from then on, least recently used dropped). A
trace fixes every Python-level decision it saw: shapes, step counts, learning
rates, modes, chunk sizes. The engine's keys hold all of them, and it traces
only computations whose tensor work depends on nothing else: its fast kernels
without autograd (``service.fastpath``: ANIL's adaptation, every prediction;
MAML's inner loop takes gradients and runs eagerly).

Each trace lives in its own TorchScript compilation unit, freed when the trace
is dropped (``torch.jit.trace`` keeps every function in one global unit for
the life of the process: several MB per ANIL trace).
``torch.jit`` is deprecated in torch 2.x but present in the versions the
project allows; should it fail, the capture fails and the key runs eagerly
(counted in ``/metrics``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from typing import Any, Callable, Iterator

import torch

from service.cuda_graphs import GraphCache

# Shapes read while tracing warn that they become constants: they are part of each trace's key. Ignored for the
# whole process, not in a catch_warnings block around each trace: that is not thread-safe, and with workers
# tracing at once the warnings reached stderr, multi-line, outside the log's format.
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)

log = logging.getLogger("service.cpu_traces")

Rebuild = Callable[[Iterator[torch.Tensor]], Any]


def flatten(value: Any) -> tuple[list[torch.Tensor], Rebuild]:
    """The tensors of ``value`` (nested in tuples, lists, dicts and dataclasses; anything else is kept
    as it is) and a function that rebuilds ``value``'s structure from new tensors in the same order."""
    if isinstance(value, torch.Tensor):
        return [value], next
    if isinstance(value, (tuple, list)):
        parts = [flatten(item) for item in value]
        kind = type(value)
        return [t for tensors, _ in parts for t in tensors], lambda leaves: kind([rebuild(leaves) for _, rebuild in parts])
    if isinstance(value, dict):
        keys = list(value)
        tensors, rebuild_values = flatten([value[k] for k in keys])
        return tensors, lambda leaves: dict(zip(keys, rebuild_values(leaves)))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = [f.name for f in dataclasses.fields(value)]
        tensors, rebuild_values = flatten([getattr(value, n) for n in names])
        kind = type(value)
        return tensors, lambda leaves: kind(**dict(zip(names, rebuild_values(leaves))))
    return [], lambda leaves: value


# Operations whose output shape follows from tensor values, not shapes: a graph with one keeps its size reads.
_VALUE_SHAPED = {
    "aten::nonzero", "aten::nonzero_numpy", "aten::argwhere", "aten::masked_select", "aten::index", "aten::bincount",
    "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::repeat_interleave",
}


def fixed_shapes(graph: torch._C.Graph) -> torch._C.Graph:
    """A copy of ``graph`` in which every size read is the size seen while tracing, the shape arithmetic on
    them folded away: the tracer records ``x.shape[0] * C`` as operations so that a trace generalises to
    other shapes, which these traces never meet (a trace is replayed only on inputs of the shapes in its
    key). A third of a Conv4 session predict's operations, 5% of its replay. A graph in which a shape
    follows from tensor values (``nonzero``, ``one_hot`` of unknown width, ...) is returned unchanged."""
    fixed = graph.copy()
    for node in fixed.findAllNodes("aten::size"):
        tensor, *dim = node.inputs()
        sizes = tensor.type().sizes() if isinstance(tensor.type(), torch._C.TensorType) else None
        if sizes is None or None in sizes or (dim and dim[0].toIValue() is None):
            continue
        fixed.setInsertPoint(node)
        node.output().replaceAllUsesWith(fixed.insertConstant(sizes[dim[0].toIValue()] if dim else list(sizes)))
    fixed.setInsertPoint(fixed.return_node())  # back to the end, where a graph inserts by default
    torch._C._jit_pass_constant_propagation(fixed)
    torch._C._jit_pass_dce(fixed)
    value_shaped = any(fixed.findAllNodes(kind) for kind in _VALUE_SHAPED) or any(
        not isinstance(node.inputsAt(1).toIValue(), int) or node.inputsAt(1).toIValue() < 0 for node in fixed.findAllNodes("aten::one_hot")
    )
    return graph if value_shaped else fixed


class _Trace:
    __slots__ = ("function", "unit", "rebuild", "owner")

    def __init__(self, function, unit, rebuild, owner):
        self.function, self.unit, self.rebuild, self.owner = function, unit, rebuild, owner


class TraceCache(GraphCache):
    """Replays a TorchScript trace of ``fn(*inputs)`` per key, traced on the key's ``capture_after``-th use.

    ::

        traces = TraceCache(capacity=24)
        result = traces.run(("adapt", shapes, steps, lr), compute, (support_x, support_y), owner=model)

    ``fn`` must compute its result from its tensor arguments with tensor
    operations only, every other decision fixed by the key. Its result may
    nest tensors in tuples, lists, dicts and dataclasses; each replay returns
    new tensors.
    """

    what = "TorchScript trace"
    pads = False  # on the CPU a padded row costs as much as a real one
    retry_failed_s = None  # its failures are the computation's own (an operation it cannot express): for good

    def __init__(self, capacity: int = 24, capture_after: int = 2, warmup: int = 2, refill_s: float = 10.0):
        super().__init__(capacity=capacity, capture_after=capture_after, warmup=warmup, refill_s=refill_s)

    def _capture(self, fn, inputs, owner) -> _Trace:
        from torch.jit._trace import _get_trace_graph  # the graph, without torch.jit.trace's global registration

        start = time.perf_counter()
        structure: dict[str, Rebuild] = {}

        def flat(*args):
            tensors, structure["rebuild"] = flatten(fn(*args))
            return tuple(tensors)

        graph, _ = _get_trace_graph(flat, inputs)  # (its TracerWarnings are ignored: see the filter below the imports)
        graph = fixed_shapes(graph)
        unit = torch._C.CompilationUnit()
        function = unit.create_function("compute", graph)
        for _ in range(self.warmup):  # TorchScript profiles the first runs and optimises the graph after them
            function(*inputs)
        self.captures += 1
        log.info("traced a computation in %.0f ms (%d traces)", 1000 * (time.perf_counter() - start), len(self._graphs) + 1)
        return _Trace(function, unit, structure["rebuild"], owner)

    def _replay(self, entry: _Trace, inputs: tuple[torch.Tensor, ...]) -> Any:
        outputs = entry.function(*inputs)
        return entry.rebuild(iter(outputs if isinstance(outputs, tuple) else (outputs,)))
