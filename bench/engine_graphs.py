"""The service engine on a GPU with and without CUDA graphs, in process (no HTTP).

    python bench/engine_graphs.py                      # needs a CUDA GPU
    python bench/engine_graphs.py --rows 1,8,64 --reps 15

For Conv4-64 5-way 1-shot requests (10 inner steps, 5 query images), runs the
engine's batch computation (``Engine._compute``: stacking, adaptation,
prediction, results to Python, session tensors) for a batch of R requests,
interleaving an engine with ``cuda_graphs=16`` and one with ``cuda_graphs=0``,
and prints median milliseconds per batch and the ratio. Models: MAML (the fast
full-adaptation kernel), ANIL (the fast head-only kernel) and Meta-SGD (the
generic ``adapt_many`` path); modes: adapt-and-predict and session predict. It
also prints the largest difference between the two engines' probabilities.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metalearn import Conv4, MetaConfig, MetaLearner  # noqa: E402
from metalearn.checkpoint import save_checkpoint  # noqa: E402
from service.engine import Engine, Job  # noqa: E402
from service.registry import ModelRegistry  # noqa: E402
from service.sessions import Session  # noqa: E402


def median_us(fn, calls: int = 300, sleep_s: float = 0.0, touch: torch.Tensor | None = None) -> float:
    """Median microseconds of ``calls`` calls of ``fn``; each after ``sleep_s`` asleep and ``touch`` (a tensor
    standing for other work's memory traffic) incremented, when given."""
    times = []
    for _ in range(calls):
        if sleep_s:
            time.sleep(sleep_s)
        if touch is not None:
            touch.add_(1)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def demo_registry(algorithms, device: str) -> ModelRegistry:
    """Untrained Conv4-64 5-way checkpoints, one per algorithm (10 inner steps at lr 0.4), loaded on ``device``."""
    directory = Path(tempfile.mkdtemp(prefix="engine_graphs_"))
    for algorithm in algorithms:
        torch.manual_seed(0)
        learner = MetaLearner(Conv4(out_features=5, channels=64), MetaConfig(algorithm, inner_steps=10, inner_lr=0.4))
        save_checkpoint(directory / f"{algorithm}.safetensors", learner, input_shape=(1, 28, 28), n_way=5)
    return ModelRegistry.load(directory, device)


def held(model, sessions: list[dict]) -> list[Session]:
    """Sessions with these tensors, held as the service's in-memory store holds them (what a worker
    prepares from one is made once per session: pass the same ones to every jobs_for call to time
    predictions without that)."""
    return [Session(f"s{i}", model.name, None, 0.0, float("inf"), tensors) for i, tensors in enumerate(sessions)]


def jobs_for(model, rows: int, mode: str, seed: int, sessions: list[dict] | list[Session] | None = None) -> list[Job]:
    """``rows`` requests for ``model``: adapt-and-predict (``predict``), adapt and keep (``adapt``), or
    predictions with ``sessions`` (``session``): :func:`held` ones, or session tensors held anew."""
    g = torch.Generator().manual_seed(seed)
    sessions = sessions or []
    held_sessions = sessions if all(isinstance(s, Session) for s in sessions) else held(model, sessions)
    jobs = []
    for i in range(rows):
        query = torch.rand(5, 1, 28, 28, generator=g)
        if mode == "session":
            session = held_sessions[i % len(held_sessions)]
            jobs.append(Job("predict", model, query_x=query, session=session.tensors, session_prepared=session.prepared))
        else:
            support = torch.rand(5, 1, 28, 28, generator=g)
            jobs.append(Job("adapt", model, support_x=support, support_y=torch.arange(5), steps=10, lr=None,
                            query_x=query, keep_session=mode == "adapt"))
    return jobs


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(engine: Engine, jobs: list[Job]) -> tuple[float, list[dict]]:
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        results = engine._compute(jobs)
    sync()
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,64", help="requests per batch")
    parser.add_argument("--algorithms", default="maml,anil,metasgd")
    parser.add_argument("--modes", default="predict,session", help="predict: adapt-and-predict; session: session predict")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only as a smoke run (graphs apply on a GPU alone, both engines run eagerly)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/engine_graphs.py needs a CUDA GPU (--device cpu for a smoke run)")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0) if args.device == 'cuda' else 'the CPU (smoke run: no graphs)'}")
    registry = demo_registry(args.algorithms.split(","), args.device)
    engines = {"graphs": Engine(cuda_graphs=16, max_batch_size=64), "eager": Engine(cuda_graphs=0, max_batch_size=64)}
    print(f"{'model':8} {'mode':8} {'R':>3} {'eager ms':>9} {'graphs ms':>9} {'ratio':>6} {'ms/request':>10} {'max |dp|':>9}")
    for algorithm in args.algorithms.split(","):
        model = registry.get(algorithm)
        # sessions to predict with: one adaptation's tensors per request slot
        _, adapted = timed(engines["eager"], jobs_for(model, 8, "adapt", seed=99))
        sessions = held(model, [r["tensors"] for r in adapted])  # prepared by the first run, as in the service
        for mode in args.modes.split(","):
            for rows in (int(r) for r in args.rows.split(",")):
                times = {name: [] for name in engines}
                diff = 0.0
                for rep in range(args.reps + 3):  # the first three: eager use, capture, first replay
                    jobs = jobs_for(model, rows, mode, seed=rep, sessions=sessions)
                    out = {}
                    for name, engine in (engines.items() if rep % 2 else reversed(engines.items())):
                        seconds, out[name] = timed(engine, jobs)
                        if rep >= 3:
                            times[name].append(seconds)
                    for a, b in zip(out["graphs"], out["eager"]):
                        diff = max(diff, (torch.tensor(a["probabilities"]) - torch.tensor(b["probabilities"])).abs().max().item())
                eager, graphs = (statistics.median(times[n]) * 1000 for n in ("eager", "graphs"))
                print(f"{algorithm:8} {mode:8} {rows:3d} {eager:9.2f} {graphs:9.2f} {eager / graphs:5.1f}x {graphs / rows:10.2f} {diff:9.1e}", flush=True)
    cache = engines["graphs"]._graphs(args.device)
    if cache is not None and args.device == "cuda":  # (on the CPU: the engines' traces, both)
        print(f"GPU memory: {torch.cuda.memory_reserved() / 2**20:.0f} MB reserved, {torch.cuda.max_memory_allocated() / 2**20:.0f} MB "
              f"peak allocated (eager and graphed engines together; each graph keeps its own memory pool)")
        print(f"graphs: {cache.captures} captured, {cache.replays} replays, {cache.failures} failed captures")


if __name__ == "__main__":
    main()
