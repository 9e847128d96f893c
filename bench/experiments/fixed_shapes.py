"""CPU traces with their size reads fixed to the traced shapes (``service.cpu_traces.fixed_shapes``), against traces as recorded.

    python bench/experiments/fixed_shapes.py

The tracer records every ``x.shape[i]`` and the arithmetic on it as graph
operations, so that a trace could run on other shapes; the engine replays a
trace only on the shapes in its key, so ``fixed_shapes`` replaces those reads
with the traced sizes and folds the arithmetic away. For the engine's traced
computations (MAML and ANIL session predicts of 5 queries, ANIL adapt-and-predict
batches of 1 and 8 requests, 10 steps; Conv4-64, one thread), this prints the
graph's operations as recorded and fixed, and the engine's computation time
(``Engine._compute``) with each, interleaved in blocks of 50 calls: the median
of 15 block medians, and of the per-block ratios.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from engine_graphs import demo_registry, jobs_for, median_us  # noqa: E402

import metalearn  # noqa: E402
from service import cpu_traces  # noqa: E402
from service.engine import Engine  # noqa: E402



def main() -> None:
    metalearn.keep_freed_memory()
    torch.set_num_threads(1)
    registry = demo_registry(["maml", "anil"], "cpu")
    as_recorded, fixed = Engine(threads=1, cpu_traces=24, cpu_scripts=0), Engine(threads=1, cpu_traces=24, cpu_scripts=0)
    nodes: dict[str, list[int]] = {}
    real_fixed_shapes = cpu_traces.fixed_shapes

    def counting(graph):
        out = real_fixed_shapes(graph)
        nodes.setdefault("current", []).extend([len(list(graph.nodes())), len(list(out.nodes()))])
        return out

    workloads = []
    with torch.no_grad():
        for name in ("maml", "anil"):
            model = registry.get(name)
            session = as_recorded._compute(jobs_for(model, 1, "adapt", seed=1))[0]["tensors"]
            workloads.append((f"{name} session predict", jobs_for(model, 1, "session", seed=2, sessions=[session])))
        for rows in (1, 8):
            workloads.append((f"anil adapt + predict x{rows}", jobs_for(registry.get("anil"), rows, "predict", seed=3)))
        print("# Conv4-64, one thread; graph operations as recorded -> fixed; engine computation, median of 15 interleaved blocks")
        for label, jobs in workloads:
            cpu_traces.fixed_shapes = lambda graph: graph  # the first engine traces as recorded
            for _ in range(4):
                as_recorded._compute(jobs)
            nodes.clear()
            cpu_traces.fixed_shapes = counting
            for _ in range(4):
                fixed._compute(jobs)
            cpu_traces.fixed_shapes = real_fixed_shapes
            before, after = nodes["current"][:2]
            times: dict[str, list[float]] = {"recorded": [], "fixed": []}
            for _ in range(15):
                times["recorded"].append(median_us(lambda: as_recorded._compute(jobs), calls=50))
                times["fixed"].append(median_us(lambda: fixed._compute(jobs), calls=50))
            ratio = statistics.median(a / b for a, b in zip(times["recorded"], times["fixed"]))
            print(f"{label:28s} {before:5d} -> {after:4d} operations  recorded {statistics.median(times['recorded']):7.0f} us  "
                  f"fixed {statistics.median(times['fixed']):7.0f} us  ({ratio:.3f}x)")
        # Both engines answer alike (the traces replay the same operations on the same values).
        for label, jobs in workloads:
            for a, b in zip(as_recorded._compute(jobs), fixed._compute(jobs)):
                assert a.keys() == b.keys() and all(a[k] == b[k] for k in a if k != "tensors"), label


if __name__ == "__main__":
    main()
