"""One meta-training step: metalearn's batching strategies against the textbook per-task loop.

Workloads (issue 2):
  W1  sinusoid MLP 1-40-40-1, meta-batch 25, K=10 (10 queries), 1 inner step
  W2  Omniglot-shaped 5-way 1-shot, Conv4-64, meta-batch 32, 15 queries/class, 1 step
  W3  Omniglot-shaped 20-way 1-shot, Conv4-64, meta-batch 16, 5 queries/class, 5 steps

The baseline is the per-task loop of a textbook: a hand-written functional
forward (F.conv2d, F.batch_norm, ...), ``torch.autograd.grad(create_graph=True)``
in the inner loop, one ``backward`` per task. The candidate is
``MetaLearner.meta_gradient`` with the strategy ``auto`` picks (or
``--strategies``), in a process that keeps freed memory for reuse as
``metalearn train`` does (``metalearn.keep_freed_memory``). On the CPU the
textbook loop also runs once more with that same allocator setting
("textbook+keep"), so the part of the speed-up that any loop gets from the
allocator is visible. Every measurement runs in a fresh subprocess, candidates
interleaved, medians reported:

    python bench/meta_step.py                      # all workloads, both orders
    python bench/meta_step.py --workloads W1 --orders second --reps 5
    python bench/meta_step.py --device cuda --workloads W2     # on a GPU machine

"step MB" is what one step adds to the resident memory of the process (large
allocations mapped straight from the kernel, the kernel's peak-RSS mark reset
before the step; on a GPU: peak allocated memory); "peak RSS" is the whole
process's. "speed" and "memory" are ratios to the textbook loop measured in the
same run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

WORKLOADS = {
    "W1": dict(kind="mlp", tasks=25, ways=1, shots=10, queries=10, steps=1, lr=0.01),
    "W2": dict(kind="conv", tasks=32, ways=5, shots=1, queries=15, steps=1, lr=0.4),
    "W3": dict(kind="conv", tasks=16, ways=20, shots=1, queries=5, steps=5, lr=0.1),
}


def make_batch(w: dict, generator: torch.Generator):
    from metalearn.data.tasks import TaskBatch

    t = w["tasks"]
    if w["kind"] == "mlp":
        sx = torch.rand(t, w["shots"], 1, generator=generator) * 10 - 5
        qx = torch.rand(t, w["queries"], 1, generator=generator) * 10 - 5
        return TaskBatch(sx, torch.sin(sx), qx, torch.sin(qx))
    ways = w["ways"]
    sx = torch.rand(t, ways * w["shots"], 1, 28, 28, generator=generator)
    qx = torch.rand(t, ways * w["queries"], 1, 28, 28, generator=generator)
    sy = torch.arange(ways).repeat_interleave(w["shots"]).expand(t, -1).clone()
    qy = torch.arange(ways).repeat_interleave(w["queries"]).expand(t, -1).clone()
    return TaskBatch(sx, sy, qx, qy)


# ---------------------------------------------------------------------------
# The textbook baseline: hand-written functional forward, per-task loop
# ---------------------------------------------------------------------------


def textbook_forward(kind: str, params: dict, x: torch.Tensor) -> torch.Tensor:
    if kind == "mlp":
        x = F.relu(F.linear(x, params["body.0.weight"], params["body.0.bias"]))
        x = F.relu(F.linear(x, params["body.2.weight"], params["body.2.bias"]))
        return F.linear(x, params["head.weight"], params["head.bias"])
    for block in range(4):
        conv, norm = f"body.{4 * block}", f"body.{4 * block + 1}"
        x = F.conv2d(x, params[conv + ".weight"], params[conv + ".bias"], padding=1)
        x = F.batch_norm(x, None, None, params[norm + ".weight"], params[norm + ".bias"], training=True)
        x = F.max_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), params["head.weight"], params["head.bias"])


def textbook_step(model, batch, w: dict, first_order: bool) -> None:
    kind = w["kind"]
    loss_fn = F.mse_loss if kind == "mlp" else F.cross_entropy
    params = dict(model.named_parameters())
    for i in range(len(batch)):
        sx, sy, qx, qy = batch.task(i)
        fast = dict(params)
        for _ in range(w["steps"]):
            loss = loss_fn(textbook_forward(kind, fast, sx), sy)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {n: p - w["lr"] * g for (n, p), g in zip(fast.items(), grads)}
        (loss_fn(textbook_forward(kind, fast, qx), qy) / len(batch)).backward()


# ---------------------------------------------------------------------------
# One measurement (child process)
# ---------------------------------------------------------------------------


def build(w: dict):
    from metalearn import Conv4, MLP

    torch.manual_seed(0)
    return MLP(1, (40, 40), 1) if w["kind"] == "mlp" else Conv4(out_features=w["ways"], channels=64)


def measure(workload: str, impl: str, order: str, steps: int, device: str = "cpu") -> dict:
    from metalearn import MetaConfig, MetaLearner
    from metalearn.batching import choose_strategy

    w = WORKLOADS[workload]
    first_order = order == "first"
    if impl != "textbook":
        from metalearn import keep_freed_memory

        keep_freed_memory(device)
    batch = make_batch(w, torch.Generator().manual_seed(0)).to(device)
    model = build(w).to(device)
    task_type = "regression" if w["kind"] == "mlp" else "classification"
    learner = MetaLearner(
        model, MetaConfig("maml", task_type=task_type, inner_steps=w["steps"], inner_lr=w["lr"], first_order=first_order)
    )
    strategy = choose_strategy(learner, device) if impl == "auto" else impl

    def step():
        if impl.startswith("textbook"):
            textbook_step(model, batch, w, first_order)
            model.zero_grad(set_to_none=True)
        else:
            learner.meta_gradient(batch, strategy=strategy)

    cuda = device.startswith("cuda")
    step()  # warm-up (allocator, kernels, lazily imported modules)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if cuda:
        peak_mb = step_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # of this fresh process
        step_mb = _step_rss_mb(step)
    return {
        "steps_per_s": steps / elapsed,
        "peak_mb": peak_mb,
        "step_mb": step_mb,
        "strategy": impl if impl.startswith("textbook") else strategy,
    }


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _step_rss_mb(step) -> float:
    """What one more step adds to the resident memory of the process, measured after the timed steps.

    glibc keeps freed memory in its heap, so the RSS of later steps depends on
    what earlier ones left behind; here allocations over 64 KiB (every tensor
    that matters) are mapped from and returned to the kernel directly, and the
    kernel's peak-RSS mark (VmHWM) is reset just before the step (Linux).
    """
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    libc.malloc_trim(0)
    step()  # once with the new allocator settings, so nothing lazily allocated counts below
    libc.malloc_trim(0)
    steady = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS
    step()
    return max(_status_mb("VmHWM") - steady, 0.0)


def run_child(workload: str, impl: str, order: str, steps: int, device: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", workload, impl, order, str(steps), device],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="W1,W2,W3")
    parser.add_argument("--orders", default="second,first")
    parser.add_argument("--strategies", default="auto", help="comma-separated: auto, loop, vmap, chunked:N")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (fresh process each)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        workload, impl, order, steps, device = args.child
        print(json.dumps(measure(workload, impl, order, int(steps), device)))
        return

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; medians of {args.reps} interleaved runs, each in a fresh process")
    memory_label = "peak GPU MB" if args.device.startswith("cuda") else "peak RSS MB"
    header = (
        f"{'workload':8} {'order':6} {'implementation':16} {'steps/s':>9} {memory_label:>12}"
        f" {'step MB':>8} {'speed':>7} {'memory':>7} {'vs keep':>7}"
    )
    print(header)
    print("-" * len(header))
    for workload in args.workloads.split(","):
        w = WORKLOADS[workload]
        # Conv steps take seconds on the CPU, milliseconds on a GPU (where 2 would time launch jitter).
        steps = 20 if w["kind"] == "mlp" or args.device.startswith("cuda") else 2
        for order in args.orders.split(","):
            impls = ["textbook"] + (["textbook+keep"] if args.device == "cpu" else []) + args.strategies.split(",")
            results: dict[str, list[dict]] = {impl: [] for impl in impls}
            for _ in range(args.reps):
                for impl in impls:
                    results[impl].append(run_child(workload, impl, order, steps, args.device))
            base_speed = statistics.median(r["steps_per_s"] for r in results["textbook"])
            base_memory = statistics.median(r["step_mb"] for r in results["textbook"])
            # Like for like: the textbook loop with the same allocator setting as ours.
            keep_speed = statistics.median(r["steps_per_s"] for r in results["textbook+keep"]) if "textbook+keep" in results else None
            for impl in impls:
                speed = statistics.median(r["steps_per_s"] for r in results[impl])
                peak = statistics.median(r["peak_mb"] for r in results[impl])
                memory = statistics.median(r["step_mb"] for r in results[impl])
                label = impl if impl != "auto" else f"auto={results[impl][0]['strategy']}"
                # Below 1 MB the step needs no memory worth a ratio (tiny models).
                memory_ratio = f"{memory / base_memory:6.2f}x" if base_memory >= 1 else "    n/a"
                runs = " ".join(f"{r['steps_per_s']:.3g}" for r in results[impl])
                like_for_like = f"{speed / keep_speed:6.2f}x" if keep_speed else "    n/a"
                print(
                    f"{workload:8} {order:6} {label:16} {speed:9.3f} {peak:12.0f} {memory:8.0f}"
                    f" {speed / base_speed:6.2f}x {memory_ratio} {like_for_like}   runs: {runs}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
