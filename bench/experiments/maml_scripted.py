"""Could MAML's adaptation run without the GIL too? make_fx + TorchScript against eager, in process.

    python bench/experiments/maml_scripted.py                      # a batch of 8 MAML requests (Conv4-64, 10 steps, 5 queries)
    python bench/experiments/maml_scripted.py --rows 1
    python bench/experiments/maml_scripted.py --model metasgd      # Conv4-64 Meta-SGD: the engine's generic path
    python bench/experiments/maml_scripted.py --model sine --rows 1   # MAML on a 1-40-40-1 MLP, 10 shots (generic, regression)

The service's CPU traces (``service/cpu_traces.py``) cannot hold MAML's inner
loop: it takes gradients with autograd, and the TorchScript tracer refuses
("Cannot insert a Tensor that requires grad as a constant"). This experiment
compiles the engine's whole adaptation for a batch of ``--rows`` requests
(forward, autograd's backward and the SGD updates, ten steps) as the service
does (``service.cpu_scripts.script``: recorded as aten operations with
``make_fx``, compiled by TorchScript in a compilation unit of its own),
checks it against the eager computation on new requests, then times per
request, interleaved: eager and scripted, each alone and beside a thread that
runs Python 40% of the time (the event loop's part, in a loaded server).

It found what the service does with it (``service/cpu_scripts.py``): per
request, a script of one request is as fast as one of 4 and faster than one
of 16, so the service compiles one request's computation and runs a batch
through it row by row; the compilation takes seconds (printed), so the service
compiles on a background thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import service_bench as sb  # noqa: E402
from engine_graphs import demo_registry, jobs_for  # noqa: E402

from service.cpu_scripts import script  # noqa: E402
from service.cpu_traces import flatten  # noqa: E402
from service.engine import Engine, Job  # noqa: E402


def python_load(stop: threading.Event) -> None:
    """Python work 40% of the time (0.6 ms of JSON decoding, 0.9 ms asleep), like a loaded event loop."""
    blob = json.dumps({"x": "a" * 20000})
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < 0.0006:
            json.loads(blob)
        time.sleep(0.0009)


def sine_model():
    """The service benchmark's sinusoid model (MAML on a 1-40-40-1 MLP), as the service loads it."""
    from service.registry import ModelRegistry

    directory = Path(tempfile.mkdtemp(prefix="maml_scripted_"))
    sb.make_sine_checkpoint(directory)
    return ModelRegistry.load(directory, "cpu").get("sine")


def sine_jobs(model, rows: int, seed: int) -> list[Job]:
    """Sinusoid requests: 10 support points, 10 queries."""
    return [Job("adapt", model, support_x=sx, support_y=sy, steps=10, lr=None, query_x=qx, keep_session=False) for sx, sy, qx in sb.sine_tasks(rows, seed)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8, help="requests per batch")
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--model", default="maml", choices=["maml", "metasgd", "sine"])
    args = parser.parse_args()

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    model = sine_model() if args.model == "sine" else demo_registry([args.model], "cpu").get(args.model)
    engine = Engine(threads=1, cpu_traces=0, cpu_scripts=0)

    def batch(seed):
        jobs = sine_jobs(model, args.rows, seed) if args.model == "sine" else jobs_for(model, args.rows, "stateless", seed)
        return jobs, tuple(torch.stack([getattr(j, n) for j in jobs]) for n in ("support_x", "support_y", "query_x"))

    jobs, inputs = batch(0)
    kernel, _ = engine._adapt_kernel(model, jobs[0], args.rows)

    def eager(*tensors):
        return tuple(flatten(kernel(*tensors))[0])

    with torch.inference_mode(False), torch.no_grad():
        start = time.perf_counter()
        scripted, _ = script(kernel, inputs)
        print(f"# {args.rows} {args.model} requests per batch: recorded and compiled in {time.perf_counter() - start:.1f} s")
        for _ in range(3):  # TorchScript optimises after its first runs
            scripted(*inputs)
        for seed in (1, 2):
            fresh = batch(seed)[1]
            difference = max((a - b).abs().max().item() for a, b in zip(scripted(*fresh), eager(*fresh)) if a.is_floating_point())
            print(f"# new requests (seed {seed}): largest difference from eager {difference:.2e}")

        def per_request(fn) -> float:
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                fn(*inputs)
                times.append(time.perf_counter() - t0)
            return 1000 * statistics.median(times) / args.rows

        for rep in range(2):
            row = {"eager": per_request(eager), "scripted": per_request(scripted)}
            stop = threading.Event()
            load = threading.Thread(target=python_load, args=(stop,))
            load.start()
            row["eager, Python 40%"] = per_request(eager)
            row["scripted, Python 40%"] = per_request(scripted)
            stop.set()
            load.join()
            print("  ".join(f"{name} {ms:.2f}" for name, ms in row.items()), "ms per request")


if __name__ == "__main__":
    main()
