"""What the deployment's proxy (``deploy/nginx.conf``) costs: the same requests sent to one service directly
and through nginx in front of it, interleaved.

    python bench/experiments/proxy_overhead.py                        # MAML session predicts, ANIL stateless
    python bench/experiments/proxy_overhead.py --reps 4 --duration 6

Starts one service as ``bench/service_bench.py`` does and nginx in front of it (``bench/local_proxy.py``,
with the rate limits lifted: they would refuse the load itself), then measures, for each (model, mode),
each concurrency and each route in turn (``--reps`` rounds, the order alternating): requests per second
and p50/p99 latency, closed loop (``service_bench.run_level``). Session predictions are the cheapest
requests (about 1 ms lone on a fast core), so they show the proxy's own time best; on a 2-core machine
nginx's workers also take CPU from the service's under load.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import service_bench as sb  # noqa: E402
from local_proxy import start_proxy  # noqa: E402

# Benchmark load from one address would meet the per-key and per-address limits at once.
UNLIMITED = {"rate=20r/s": "rate=100000r/s", "rate=100r/s": "rate=100000r/s"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="maml:session,anil:stateless", help="model:mode pairs, comma-separated")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    cases = [tuple(case.split(":")) for case in args.cases.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]

    work, model_dir = sb.checkpoint_workspace("proxy_overhead_")
    batch, origin = sb.make_tasks(8)
    service, port = sb.start_server("service", model_dir, 1, work, 8)
    proxy = None
    results: dict[tuple, list[dict]] = {}
    try:
        proxy, proxy_port = start_proxy([port], Path(tempfile.mkdtemp(prefix="proxy_", dir=work)), replace=UNLIMITED)
        for model, mode in cases:
            requests = sb.build_requests(batch, model, port, mode, 8)
            sb.warm_up(port, requests)
            for concurrency in levels:
                for rep in range(args.reps):
                    routes = [("direct", port), ("proxy", proxy_port)]
                    for route, target in routes if rep % 2 == 0 else routes[::-1]:
                        run = asyncio.run(sb.run_level(target, requests, concurrency, args.duration, 1.0))
                        results.setdefault((model, mode, concurrency, route), []).append(run)
    finally:
        if proxy is not None:
            proxy.send_signal(signal.SIGQUIT)
            proxy.wait(15)
        service.terminate()
        service.wait(15)

    print(f"# one service (2 workers of 1 thread on 2 cores: the defaults), direct and through nginx; tasks: {origin}")
    print(f"# {args.reps} rounds of {args.duration:g} s per level, medians of the rounds' throughput; p50/p99 over every round")
    for model, mode in cases:
        for concurrency in levels:
            direct, proxied = (sb.summarise(results[(model, mode, concurrency, route)]) for route in ("direct", "proxy"))
            errors = direct["errors"] + proxied["errors"]
            print(f"{model} {mode:9s} c={concurrency:<3d} direct {direct['throughput']:8.1f} req/s p50 {direct['p50_ms']:7.2f} ms "
                  f"p99 {direct['p99_ms']:7.2f} | proxy {proxied['throughput']:8.1f} req/s p50 {proxied['p50_ms']:7.2f} ms "
                  f"p99 {proxied['p99_ms']:7.2f} | throughput {proxied['throughput'] / direct['throughput']:.2f}x, "
                  f"p50 {proxied['p50_ms'] - direct['p50_ms']:+.2f} ms (rounds: {direct['throughputs']} / {proxied['throughputs']})"
                  + (f"  ERRORS {errors}" if errors else ""))


if __name__ == "__main__":
    main()
