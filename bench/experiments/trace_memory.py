"""The service's memory after the benchmark's workload, with CPU traces and without.

    python bench/experiments/trace_memory.py

For each setting of ``METALEARN_CPU_TRACES`` (the default, then 0), starts the
service as ``bench/service_bench.py`` does, sends 2 s of MAML and ANIL
requests, stateless and session predicts, at concurrency 1, 8, 16 and 32, and
prints the server's resident memory (``VmRSS``, and its peak ``VmHWM``, from
``/proc``) at start and at the end, with the traces ``/metrics`` reports.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import service_bench as sb  # noqa: E402


def memory(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    return ", ".join(f"{name} {int(value.split()[0]) / 1024:.0f} MB" for name, value in sorted(fields.items(), reverse=True))


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="trace_memory_"))
    model_dir = work / "models"
    model_dir.mkdir()
    sb.make_checkpoints(model_dir)
    batch, origin = sb.make_tasks(64)
    print(f"# tasks: {origin}")
    for settings in ({}, {"METALEARN_CPU_TRACES": "0"}):
        process, port = sb.start_server("service", model_dir, 1, work, 0, settings=settings)
        try:
            start = memory(process.pid)
            for model in ("maml", "anil"):
                for mode in ("stateless", "session"):
                    requests = sb.build_requests(batch, model, port, mode, 64)
                    for concurrency in (1, 8, 16, 32):
                        asyncio.run(sb.run_level(port, requests, concurrency, 2.0, 0.5))
            traces = [line for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines() if line.startswith("metalearn_cpu_trace")]
            print(f"{settings or 'defaults'}: at start {start}; at the end {memory(process.pid)}")
            print("   " + "; ".join(traces))
        finally:
            process.terminate()
            process.wait(15)


if __name__ == "__main__":
    main()
