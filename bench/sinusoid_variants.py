"""Benchmark (not a test): sinusoid regression MSE after 1 and 10 inner steps, K = 5, 10, 20, for every variant.

Each variant is trained with its defaults (``metalearn.train.default_config
("sinusoid", variant)``: the MAML paper's K=10, meta-batch 25, inner lr 0.01,
Adam 1e-3, with each variant's own needs) for ``--iterations`` meta-steps,
then adapted on 500 fixed held-out tasks per K with 1 and 10 gradient steps
and scored on 100 query points per task (mean MSE, 95% CI)::

    python bench/sinusoid_variants.py                       # all variants, 10000 iterations each
    python bench/sinusoid_variants.py --iterations 3000 --variants maml reptile
    python bench/sinusoid_variants.py --train-per-k         # a model per K (the paper's protocol)

Prints the command and a table, and writes ``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from metalearn.checkpoint import load_checkpoint
from metalearn.data import load_task_source
from metalearn.evaluate import evaluate
from metalearn.learner import ALGORITHMS
from metalearn.train import BEST, Trainer, default_config

KS = (5, 10, 20)
STEPS = (1, 10)


def train(variant: str, k: int, iterations: int, out: Path, seed: int) -> tuple[Path, float]:
    config = default_config("sinusoid", variant)
    config.update(dict(shots=k, iterations=iterations, out=str(out), seed=seed, progress=False,
                       val_interval=max(iterations // 4, 1), val_episodes=200))
    if (out / BEST).exists():
        return out / BEST, 0.0
    started = time.perf_counter()
    Trainer(config).run()
    return out / BEST, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--iterations", type=int, default=10000)
    parser.add_argument("--episodes", type=int, default=500)
    parser.add_argument("--train-per-k", action="store_true", help="train a model per K instead of one at K=10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-sinusoid")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny MLPs: threads only add overhead
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), flush=True)

    out = Path(args.out)
    results: dict[str, dict] = {}
    header = "variant   train_s " + " ".join(f"K={k:<2d} {s:>2d}-step      " for k in KS for s in STEPS)
    print(header, flush=True)
    for variant in args.variants:
        row: dict[str, dict] = {}
        seconds = 0.0
        for k in KS:
            train_k = k if args.train_per_k else 10
            path, took = train(variant, train_k, args.iterations, out / f"{variant}-k{train_k}", args.seed)
            seconds += took
            learner = load_checkpoint(path).learner
            source = load_task_source("sinusoid", shots=k, queries=100)
            for steps in STEPS:
                result = evaluate(learner, source, episodes=args.episodes, inner_steps=steps, seed=1000 + k)
                row[f"K{k}_steps{steps}"] = {"mse": result.mean, "ci95": result.ci95}
        results[variant] = {"train_seconds": seconds, **row}
        cells = " ".join(f"{row[f'K{k}_steps{s}']['mse']:.3f}+-{row[f'K{k}_steps{s}']['ci95']:.3f}" for k in KS
                         for s in STEPS)
        print(f"{variant:9s} {seconds:7.0f} {cells}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"command": sys.argv, "iterations": args.iterations,
                                                  "train_per_k": args.train_per_k, "results": results}, indent=2))


if __name__ == "__main__":
    main()
