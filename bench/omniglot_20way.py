"""Benchmark (not a test): Omniglot 20-way 1-shot, Conv4-64, trained on both minimal splits with rotations.

Trains a config (default: the ready ``omniglot-20way``) for a fixed iteration
and/or time budget, then reports held-out accuracy the way the checkpoints
are judged (Lake et al.): 20-way 1-shot tasks with all 20 classes from one
alphabet, characters never seen in training (the config's held-out split:
the Korean alphabet, held out whole, no rotations), 400 trials, adapted with
10 inner steps::

    python bench/omniglot_20way.py                                   # ready config, 600 iterations
    python bench/omniglot_20way.py --config omniglot-20way-best      # the 1-hour config
    python bench/omniglot_20way.py --config omniglot-20way-maml      # the learn2learn reference setting
    python bench/omniglot_20way.py --iterations 300 --threads 1 --out runs/bench-o20

Prints the command, the wall time and the accuracy with its 95% CI, and
writes ``bench.json`` into the run directory. An existing run directory is
resumed (or just evaluated if it is finished).
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
from metalearn.evaluate import evaluate
from metalearn.train import BEST, LAST, Trainer, resolve_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="omniglot-20way")
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--time-budget", type=float, help="seconds of training")
    parser.add_argument("--out", help="run directory (default runs/bench-<config>)")
    parser.add_argument("--episodes", type=int, default=400)
    parser.add_argument("--eval-steps", type=lambda text: [int(v) for v in text.split(",")], default=[10, 25],
                        help="comma-separated inner steps to evaluate with (default 10,25)")
    parser.add_argument("--support-shift", type=int,
                        help="shifted support views at test time (default: what each checkpoint records)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), flush=True)
    out = Path(args.out or f"runs/bench-{Path(args.config).stem}")
    overrides = {"out": str(out), "iterations": args.iterations, "time_budget": args.time_budget,
                 "threads": args.threads, "device": args.device, "seed": args.seed}
    if args.no_progress:
        overrides["progress"] = False
    config = resolve_config(args.config, overrides)
    resume = (out / LAST).exists()
    trainer = Trainer(config, resume=resume, resume_overrides=overrides if resume else None) if resume else Trainer(config)
    started = time.perf_counter()
    summary = trainer.run()
    train_wall = summary["wall_seconds"]
    print(f"trained {summary['iterations']} iterations in {train_wall:.0f} s wall "
          f"({time.perf_counter() - started:.0f} s in this invocation)", flush=True)

    results = {"command": sys.argv, "config": trainer.config.to_dict(), "iterations": summary["iterations"],
               "train_wall_seconds": train_wall, "evaluations": {}}
    for name in (BEST, LAST):
        checkpoint = load_checkpoint(out / name, device=trainer.device)
        state = checkpoint.manifest.get("state", {})
        shift = args.support_shift if args.support_shift is not None else int(checkpoint.manifest["inner"].get("support_shift", 0))
        for steps in args.eval_steps:
            result = evaluate(checkpoint.learner, trainer.val_source, episodes=args.episodes, ways=20, shots=1,
                              queries=1, inner_steps=steps, within_group=True, support_shift=shift)
            results["evaluations"][f"{name} {steps} steps" + (f" shift {shift}" if shift else "")] = {**result.to_dict(), "iteration": state.get("iteration")}
            views = f", support shifted by {shift} px" if shift else ""
            print(f"{name} (iteration {state.get('iteration')}): held-out {', '.join(trainer.val_source.groups)} "
                  f"20-way 1-shot within alphabet, {steps} steps{views}: {100 * result.mean:.2f}% "
                  f"+- {100 * result.ci95:.2f}% ({result.episodes} trials)", flush=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
