"""Where a compiled MAML request's time goes, and whether TorchInductor does better: not kept.

    python bench/experiments/maml_inductor.py            # add --no-inductor to skip its compilation

One Conv4-64 MAML request (5-way 1-shot, 10 steps, 5 queries), one torch
thread, freed memory kept as the service keeps it (``keep_freed_memory``):

1. the service's compilation (``service.cpu_scripts.script``: make_fx +
   TorchScript) under ``torch.profiler``, its time split into the 64-channel
   convolutions (forward and backward) and everything else, with the
   convolutions' GFLOP/s;
2. the same recorded graph compiled by TorchInductor (``torch.compile``, which
   generates C++ for the elementwise work and calls oneDNN for the
   convolutions): how long it compiles, how far its answers are from the
   eager run's, and per request against the TorchScript replay, interleaved.

What it showed on a 2-core AMD EPYC (Zen 4, AVX-512; 2026-12-07): the
convolutions run near the machine's convolution rate, so only the rest could
shrink, and Inductor's fused code did not shrink it (see the README's "On
other machines").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from engine_graphs import demo_registry  # noqa: E402

import metalearn  # noqa: E402
from service.cpu_scripts import script  # noqa: E402
from service.cpu_traces import flatten  # noqa: E402
from service.engine import Engine  # noqa: E402

CONV_FLOPS = {  # per call, 5 images, 64 -> 64 channels, 3x3, by output side: the forward's; a backward does twice that
    14: 2 * 5 * 14 * 14 * 64 * 64 * 9,
    7: 2 * 5 * 7 * 7 * 64 * 64 * 9,
    3: 2 * 5 * 3 * 3 * 64 * 64 * 9,
}


def per_request_ms(fn, inputs, calls: int = 20) -> float:
    for _ in range(3):
        fn(*inputs)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(*inputs)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def profile_split(fn, inputs, calls: int = 5) -> None:
    """The convolutions' share of ``calls`` requests (self CPU time), by direction, with their GFLOP/s."""
    from torch.profiler import profile

    with profile(record_shapes=True) as recorded:
        for _ in range(calls):
            fn(*inputs)
    total = conv = flops = 0.0
    for event in recorded.key_averages(group_by_input_shape=True):
        total += event.self_cpu_time_total
        side = event.input_shapes[0][-1] if event.input_shapes and event.input_shapes[0] else None
        if event.key == "aten::mkldnn_convolution" or event.key == "aten::convolution_backward":
            conv += event.self_cpu_time_total
            factor = 2 if event.key == "aten::convolution_backward" else 1
            flops += factor * CONV_FLOPS.get(side, 0) * event.count
    print(f"# per request under the profiler: {total / calls / 1000:.1f} ms, of which the 64-channel convolutions "
          f"{conv / calls / 1000:.1f} ms ({flops / conv / 1e3:.0f} GFLOP/s) and the rest {(total - conv) / calls / 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds")
    parser.add_argument("--no-inductor", action="store_true", help="only the profile of the service's compilation")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    metalearn.keep_freed_memory()
    from engine_graphs import jobs_for

    model = demo_registry(["maml"], "cpu").get("maml")
    engine = Engine(threads=1, cpu_traces=0, cpu_scripts=0)

    def request(seed):
        job = jobs_for(model, 1, "stateless", seed)[0]
        return job, tuple(getattr(job, n).unsqueeze(0) for n in ("support_x", "support_y", "query_x"))

    job, inputs = request(0)
    kernel, _ = engine._adapt_kernel(model, job, 1)

    def eager(*tensors):
        return tuple(flatten(kernel(*tensors))[0])

    with torch.inference_mode(False), torch.no_grad():
        scripted, _ = script(kernel, inputs)
        print(f"# TorchScript replay: {per_request_ms(scripted, inputs):.1f} ms per request")
        profile_split(scripted, inputs)
        if args.no_inductor:
            return
        from torch.fx.experimental.proxy_tensor import make_fx

        graph = make_fx(eager, tracing_mode="fake", _allow_non_fake_inputs=True)(*inputs)
        start = time.perf_counter()
        inductor = torch.compile(graph, backend="inductor")
        inductor(*inputs)
        print(f"# Inductor: {len(graph.graph.nodes)} recorded operations compiled in {time.perf_counter() - start:.0f} s")
        fresh = request(1)[1]
        difference = max((a - b).abs().max().item() for a, b in zip(inductor(*fresh), eager(*fresh)) if a.is_floating_point())
        print(f"# Inductor on a new request: largest difference from eager {difference:.1e}")
        for _ in range(args.rounds):
            print(f"TorchScript {per_request_ms(scripted, inputs):.1f} ms  Inductor {per_request_ms(inductor, inputs):.1f} ms per request")


if __name__ == "__main__":
    main()
