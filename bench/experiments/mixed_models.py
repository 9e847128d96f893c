"""Two loads at once on one server: how long the light load's requests wait behind the heavy one's.

    python bench/experiments/mixed_models.py --server "" --server SOURCE=/tmp/old
    python bench/experiments/mixed_models.py --heavy maml:stateless:12 --light anil:session:4 --server ""
    python bench/experiments/mixed_models.py --heavy maml:stateless:12 --light maml:stateless:1 --keys --server "" --server SOURCE=/tmp/old

With ``--keys`` the servers have two API keys, and each load sends its own: one key's burst beside
another key's requests (of the same model or not).

Starts one service per ``--server`` (as ``bench/experiments/settings_ab.py``: "NAME=VALUE,..." settings,
``SOURCE=DIR`` for the code of another checkout), with the benchmark's checkpoints (``bench/service_bench.py``).
Each repetition runs the ``--heavy`` and the ``--light`` load (model:mode:concurrency, closed loops) together
for ``--duration`` seconds on each server in turn, alternating the order, and prints per server and load the
requests per second (median of the repetitions) and the p50/p99 latency over all of them, then the light
load's p50 and p99 and the heavy load's throughput as ratios to the first server's.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import service_bench as sb  # noqa: E402


def parse_load(text: str) -> tuple[str, str, int]:
    model, mode, concurrency = text.split(":")
    return model, mode, int(concurrency)


# The two loads' API keys with --keys (bench-only: loopback servers this script starts)
KEYS = {"heavy": "heavy-load-key-0123456789", "light": "light-load-key-0123456789"}


async def both(port: int, heavy: tuple, light: tuple, duration: float, keys: dict) -> tuple[dict, dict]:
    (heavy_requests, heavy_concurrency), (light_requests, light_concurrency) = heavy, light
    return tuple(
        await asyncio.gather(
            sb.run_level(port, heavy_requests, heavy_concurrency, duration, 1.0, api_key=keys.get("heavy")),
            sb.run_level(port, light_requests, light_concurrency, duration, 1.0, api_key=keys.get("light")),
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", action="append", help='settings of one server, "NAME=VALUE,..." ("" = defaults; repeatable)')
    parser.add_argument("--heavy", default="maml:stateless:12", help="model:mode:concurrency of the expensive load")
    parser.add_argument("--light", default="anil:session:4", help="model:mode:concurrency of the cheap load")
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--keys", action="store_true", help="two API keys, one per load")
    args = parser.parse_args()
    configs = args.server or [""]
    keys = KEYS if args.keys else {}
    loads = {"heavy": parse_load(args.heavy), "light": parse_load(args.light)}

    work, model_dir = sb.checkpoint_workspace("mixed_models_")
    batch, origin = sb.make_tasks(64)
    servers = sb.start_configured(configs, model_dir, work, {"METALEARN_API_KEYS": ",".join(keys.values())} if keys else None)
    try:
        print(f"# heavy {args.heavy} and light {args.light} together, {args.reps} x {args.duration:g} s per server, interleaved; tasks: {origin}")
        prepared = []  # per server: {load: (requests, concurrency)}
        for _, port in servers:
            requests = {}
            for name, (model, mode, concurrency) in loads.items():
                sent = sb.build_requests(batch, model, port, mode, 64, api_key=keys.get(name))
                sb.warm_up(port, sent, api_key=keys.get(name))
                requests[name] = (sent, concurrency)
            sb.wait_for_compilations(port)
            prepared.append(requests)
        runs = [{"heavy": [], "light": []} for _ in configs]
        for rep in range(args.reps):
            order = range(len(configs)) if rep % 2 == 0 else reversed(range(len(configs)))
            for i in order:
                heavy, light = asyncio.run(both(servers[i][1], prepared[i]["heavy"], prepared[i]["light"], args.duration, keys))
                runs[i]["heavy"].append(heavy)
                runs[i]["light"].append(light)
        summaries = [{name: sb.summarise(server_runs[name]) for name in loads} for server_runs in runs]
        first = summaries[0]
        for config, summary in zip(configs, summaries):
            print(f"server [{config or 'defaults'}]")
            for name in loads:
                s = summary[name]
                print(f"  {name:5s} {s['throughput']:8.1f} req/s (reps {s['throughputs']})  p50 {s['p50_ms']:7.1f} ms  p99 {s['p99_ms']:7.1f} ms  n={s['n']} errors={s['errors']}")
            print(
                f"  against the first server: light p50 {summary['light']['p50_ms'] / first['light']['p50_ms']:.2f}x, "
                f"light p99 {summary['light']['p99_ms'] / first['light']['p99_ms']:.2f}x, "
                f"heavy throughput {summary['heavy']['throughput'] / first['heavy']['throughput']:.2f}x"
            )
    finally:
        for process, _ in servers:
            process.terminate()
        for process, _ in servers:
            process.wait(30)


if __name__ == "__main__":
    main()
