"""Where a loaded CPU server's time goes: CPU time per request on each of its threads, and its workers' batch time.

    python bench/experiments/cpu_split.py                                  # ANIL stateless, concurrency 16
    python bench/experiments/cpu_split.py --model maml --mode session --concurrency 1
    python bench/experiments/cpu_split.py --setting METALEARN_CPU_TRACES=0 # the service without CPU traces
    python bench/experiments/cpu_split.py --model sine                     # MAML on the sinusoid MLP (a small model)

Runs the service as ``bench/service_bench.py`` does (same checkpoints, requests
and load generator), loads it for ``--duration`` seconds and prints, per
request: the CPU time of each server thread (``/proc/PID/task/*/stat``: the
event loop is the main thread; the others, the engine's workers among them,
are listed by thread id: the kernel names them all ``python``), the load
generator's CPU time, and the wall time the workers spent in batches
(``metalearn_engine_batch_seconds`` from ``/metrics``). A worker whose batches
take more wall time than CPU time waited for something (the GIL, mostly);
cores busy = total CPU time / wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import service_bench as sb  # noqa: E402


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of ``pid``, by thread id."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def batch_seconds(port: int) -> float:
    return sb.metric_total(port, "metalearn_engine_batch_seconds_sum")


def sine_requests(model_dir: Path, count: int) -> tuple[str, list[tuple[str, bytes]]]:
    """The benchmark's sinusoid checkpoint (``sine``) in ``model_dir``, and ``count`` stateless requests for it."""
    import json

    sb.make_sine_checkpoint(model_dir)
    requests = []
    for support_x, support_y, query_x in sb.sine_tasks(count):
        body = {"support": {"x": sb.encode(support_x), "y": sb.encode(support_y)}, "query": {"x": sb.encode(query_x)}}
        requests.append(("/v1/models/sine/predict", json.dumps(body).encode()))
    return "sinusoids", requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="anil", choices=["maml", "anil", "sine"])
    parser.add_argument("--mode", default="stateless", choices=["stateless", "session"])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--setting", action="append", default=[], help="NAME=VALUE for the service (repeatable)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cpu_split_"))
    model_dir = work / "models"
    model_dir.mkdir()
    if args.model == "sine":
        if args.mode != "stateless":
            parser.error("--model sine: stateless requests only")
        origin, requests = sine_requests(model_dir, 2 * args.concurrency)
    else:
        sb.make_checkpoints(model_dir)
        batch, origin = sb.make_tasks(2 * args.concurrency)
    settings = dict(item.split("=", 1) for item in args.setting)
    process, port = sb.start_server("service", model_dir, 1, work, 0, settings=settings)
    try:
        if args.model != "sine":
            requests = sb.build_requests(batch, args.model, port, args.mode, 2 * args.concurrency)
        sb.warm_up(port, requests, args.concurrency)  # traces, caches, and the compilations they start
        cpu0, batches0, own0, t0 = thread_cpu(process.pid), batch_seconds(port), os.times(), time.perf_counter()
        result = asyncio.run(sb.run_level(port, requests, args.concurrency, args.duration, 0.0))
        cpu1, batches1, own1, t1 = thread_cpu(process.pid), batch_seconds(port), os.times(), time.perf_counter()
    finally:
        process.terminate()
        process.wait(15)
    count = len(result["latencies"])
    wall = t1 - t0
    print(f"# {args.model} {args.mode}, concurrency {args.concurrency}, settings {settings or 'default'}; tasks: {origin}")
    print(f"{result['throughput']:.0f} req/s over {wall:.1f} s ({count} requests)")
    server_cpu = 0.0
    for tid in sorted(cpu1):
        used = cpu1[tid] - cpu0.get(tid, 0.0)
        server_cpu += used
        if used > 0.01:
            name = "event loop (main thread)" if tid == process.pid else f"thread {tid}"
            print(f"  server {name}: {1000 * used / count:.2f} ms CPU per request")
    generator = (own1.user + own1.system) - (own0.user + own0.system)
    print(f"  load generator: {1000 * generator / count:.2f} ms CPU per request")
    print(f"  workers' batches: {1000 * (batches1 - batches0) / count:.2f} ms wall per request (all workers)")
    print(f"cores busy: {(server_cpu + generator) / wall:.2f} of {os.cpu_count()}")


if __name__ == "__main__":
    main()
