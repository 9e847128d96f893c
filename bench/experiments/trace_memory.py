"""The service's memory after the benchmark's workload, with CPU traces and scripts and without.

    python bench/experiments/trace_memory.py
    python bench/experiments/trace_memory.py --server "" --server METALEARN_CPU_SCRIPTS=0

For each ``--server`` (comma-separated NAME=VALUE settings, "" for the defaults;
by default: the defaults, then without scripts, then without traces either),
starts the service as ``bench/service_bench.py`` does, sends 2 s of MAML and
ANIL requests, stateless and session predicts, at concurrency 1, 8, 16 and 32,
waits for background compilations to finish, and prints the server's resident
memory (``VmRSS``, and its peak ``VmHWM``, from ``/proc``) at start and at the
end, with the traces and scripts ``/metrics`` reports.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import service_bench as sb  # noqa: E402


def memory(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    return ", ".join(f"{name} {int(value.split()[0]) / 1024:.0f} MB" for name, value in sorted(fields.items(), reverse=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", action="append", help='settings of one server, "NAME=VALUE,..." ("" = defaults; repeatable)')
    args = parser.parse_args()
    servers = args.server or ["", "METALEARN_CPU_SCRIPTS=0", "METALEARN_CPU_SCRIPTS=0,METALEARN_CPU_TRACES=0"]
    work, model_dir = sb.checkpoint_workspace("trace_memory_")
    batch, origin = sb.make_tasks(64)
    print(f"# tasks: {origin}")
    for server in servers:
        ((process, port),) = sb.start_configured([server], model_dir, work)
        try:
            start = memory(process.pid)
            for model in ("maml", "anil"):
                for mode in ("stateless", "session"):
                    requests = sb.build_requests(batch, model, port, mode, 64)
                    for concurrency in (1, 8, 16, 32):
                        asyncio.run(sb.run_level(port, requests, concurrency, 2.0, 0.5))
            sb.wait_for_compilations(port)  # (service.cpu_scripts)
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines()
            traces = [line for line in metrics if line.startswith(("metalearn_cpu_trace", "metalearn_cpu_script")) and not line.endswith("_created")]
            print(f"{server or 'defaults'}: at start {start}; at the end {memory(process.pid)}")
            print("   " + "; ".join(traces))
        finally:
            process.terminate()
            process.wait(15)


if __name__ == "__main__":
    main()
