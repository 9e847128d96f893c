"""Where a lone request's time goes: client latency, time in the engine, computation; servers with other settings interleaved.

    python bench/experiments/latency_split.py                                   # MAML session predicts
    python bench/experiments/latency_split.py --model anil --mode stateless
    python bench/experiments/latency_split.py --server "" --server METALEARN_WORKERS=1 --server METALEARN_CPU_TRACES=0
    python bench/experiments/latency_split.py --server "" --server CPUS=0      # the second server on core 0 alone
    python bench/experiments/latency_split.py --server "" --server SOURCE=/tmp/old   # against a git worktree of another commit

Starts one service per ``--server`` (comma-separated NAME=VALUE settings; ""
for the defaults) as ``bench/service_bench.py`` does, then sends requests one at
a time, in blocks of 400 that alternate between the servers (``--reps`` blocks
each), and prints the medians of: the client's latency, the engine's
``timing.total_ms`` (queue wait, computation and the hand-offs to and from the
worker) and ``timing.compute_ms`` (the batch computation alone), both from the
responses; and the means of the client's latency and of the route's, as the
service's middleware measures it (``/metrics``: from the request's arrival in
the app to its response; it counts each block's first 50 requests too, which
the other columns skip). Client minus route is the sockets, uvicorn's HTTP
parsing and the load generator; route minus engine, the route's own work
(body parsing and validation, decoding, the session lookup, the response).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import service_bench as sb  # noqa: E402


async def block(port: int, requests: list[tuple[str, bytes]], samples: dict[str, list[float]], count: int = 400, skip: int = 50) -> None:
    connection = sb.Connection(port)
    await connection.open()
    try:
        for i in range(count):
            path, body = requests[i % len(requests)]
            t0 = time.perf_counter()
            status, payload = await connection.post(path, body)
            elapsed = time.perf_counter() - t0
            if status >= 300:
                raise RuntimeError(f"{path}: HTTP {status}: {payload[:300]!r}")
            if i >= skip:
                timing = json.loads(payload)["timing"]
                samples["client"].append(1000 * elapsed)
                samples["engine"].append(timing["total_ms"])
                samples["compute"].append(timing["compute_ms"])
    finally:
        connection.close()


def route_totals(port: int, mode: str) -> tuple[float, float]:
    """Seconds and count of the predict route's requests so far (``/metrics``, every status)."""
    prefix = "/v1/sessions/" if mode == "session" else "/v1/models/"
    seconds = count = 0.0
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
        if 'method="POST"' in line and f'route="{prefix}' in line and "/predict" in line:
            if line.startswith("metalearn_http_request_duration_seconds_sum"):
                seconds += float(line.rsplit(" ", 1)[1])
            elif line.startswith("metalearn_http_request_duration_seconds_count"):
                count += float(line.rsplit(" ", 1)[1])
    return seconds, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="maml", choices=["maml", "anil"])
    parser.add_argument("--mode", default="session", choices=["stateless", "session"])
    parser.add_argument("--server", action="append", help='settings of one server, "NAME=VALUE,..." ("" = defaults; repeatable)')
    parser.add_argument("--reps", type=int, default=8)
    args = parser.parse_args()
    configs = args.server or ["", "METALEARN_WORKERS=1"]

    work, model_dir = sb.checkpoint_workspace("latency_split_")
    batch, origin = sb.make_tasks(2)
    servers = sb.start_configured(configs, model_dir, work)
    try:
        requests = [sb.build_requests(batch, args.model, port, args.mode, 2) for _, port in servers]
        for (_, port), sent in zip(servers, requests):  # traces captured, background compilations done
            sb.warm_up(port, sent)
        samples = [{"client": [], "engine": [], "compute": []} for _ in configs]
        routes = [[0.0, 0.0] for _ in configs]  # the route's seconds and requests over the blocks
        for rep in range(args.reps):
            order = range(len(configs)) if rep % 2 == 0 else reversed(range(len(configs)))
            for i in order:
                port = servers[i][1]
                seconds, count = route_totals(port, args.mode)
                asyncio.run(block(port, requests[i], samples[i]))
                after = route_totals(port, args.mode)
                routes[i][0] += after[0] - seconds
                routes[i][1] += after[1] - count
    finally:
        for process, _ in servers:
            process.terminate()
            process.wait(15)
    print(f"# {args.model} {args.mode}, one request at a time; tasks: {origin}")
    for config, got, (seconds, count) in zip(configs, samples, routes):
        medians = {k: statistics.median(v) for k, v in got.items()}
        print(f"{config or 'defaults':40s} client p50 {medians['client']:.3f} ms  engine {medians['engine']:.3f}  "
              f"compute {medians['compute']:.3f}  (n={len(got['client'])})")
        means = {k: statistics.mean(v) for k, v in got.items()}
        print(f"{'':40s} means: client {means['client']:.3f} ms  route {1000 * seconds / max(count, 1):.3f}  "
              f"engine {means['engine']:.3f}  compute {means['compute']:.3f}")


if __name__ == "__main__":
    main()
