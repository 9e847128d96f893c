"""Throughput of servers with other settings, interleaved: which setting serves more requests per second.

    python bench/experiments/settings_ab.py --server "" --server METALEARN_PIN_WORKERS=false
    python bench/experiments/settings_ab.py --level anil:stateless:16 --level maml:session:1 --server "" --server METALEARN_WORKERS=1

Starts one service per ``--server`` (comma-separated NAME=VALUE settings; ""
for the defaults; ``CPUS=0`` pins the server to core 0) as ``bench/service_bench.py`` does (same checkpoints,
requests and closed-loop load generator), warms each up (and waits for its
background compilations), then for each ``--level`` (model:mode:concurrency)
runs ``--reps`` repetitions of ``--duration`` seconds on each server in
alternating order, so a drifting machine affects all alike, and prints each
server's requests per second (every repetition, and the median), the p50
latency over the repetitions, the medians' ratio to the first server, and how
many of the level's requests computed on the event loop
(``METALEARN_INLINE_PREDICT_MS``: lone session predicts).
(``bench/experiments/latency_split.py`` compares servers one request at a time.)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import service_bench as sb  # noqa: E402

DEFAULT_LEVELS = ["maml:stateless:1", "maml:session:1", "maml:stateless:16", "anil:stateless:16", "maml:session:16"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", action="append", help='settings of one server, "NAME=VALUE,..." ("" = defaults; repeatable)')
    parser.add_argument("--level", action="append", help=f"model:mode:concurrency (repeatable; default {' '.join(DEFAULT_LEVELS)})")
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--duration", type=float, default=4.0)
    args = parser.parse_args()
    configs = args.server or ["", "METALEARN_PIN_WORKERS=false"]
    levels = [(model, mode, int(concurrency)) for model, mode, concurrency in (level.split(":") for level in args.level or DEFAULT_LEVELS)]

    work, model_dir = sb.checkpoint_workspace("settings_ab_")
    batch, origin = sb.make_tasks(64)
    servers = sb.start_configured(configs, model_dir, work)
    try:
        print(f"# {args.reps} x {args.duration:g} s per level and server, interleaved; tasks: {origin}")
        for model, mode, concurrency in levels:
            requests = [sb.build_requests(batch, model, port, mode, 64) for _, port in servers]
            for (_, port), sent in zip(servers, requests):
                sb.warm_up(port, sent)
                sb.wait_for_compilations(port)
            runs: list[list[dict]] = [[] for _ in configs]
            counted = ("metalearn_http_requests_total", "metalearn_engine_predicts_on_event_loop_total")
            before = [[sb.metric_total(port, name) for name in counted] for _, port in servers]
            for rep in range(args.reps):
                order = range(len(configs)) if rep % 2 == 0 else reversed(range(len(configs)))
                for i in order:
                    runs[i].append(asyncio.run(sb.run_level(servers[i][1], requests[i], concurrency, args.duration, 1.0)))
            counts = [[sb.metric_total(port, name) - start for name, start in zip(counted, first)] for (_, port), first in zip(servers, before)]
            summaries = [sb.summarise(r) for r in runs]
            print(f"{model} {mode} c={concurrency}:")
            for config, summary, (requested, in_place) in zip(configs, summaries, counts):
                ratio = summary["throughput"] / summaries[0]["throughput"]
                # (requests counted less the /metrics read before the runs, which the read after counts)
                print(f"  {config or 'defaults':40s} {summary['throughput']:7.1f} req/s {summary['throughputs']}  "
                      f"p50 {summary['p50_ms']:.2f} ms  ({ratio:.2f}x the first; on the event loop: {in_place:.0f} of {requested - 1:.0f})")
    finally:
        for process, _ in servers:
            process.terminate()
            process.wait(15)


if __name__ == "__main__":
    main()
