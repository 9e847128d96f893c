"""Evaluation on held-out tasks: what the trainer's validation and ``metalearn eval`` run.

Adapt from the meta-learned initialisation on each task's support set (no
second-order graph, :func:`metalearn.adaptation.adapt_many`), predict its
queries (:func:`metalearn.adaptation.predict_many`) and report the mean
per-task accuracy (classification) or MSE (regression) with a 95% confidence
interval over the tasks::

    source = load_task_source("omniglot", rotations=True).split("val")
    result = evaluate(learner, source, episodes=400, ways=20, shots=1, queries=1,
                      inner_steps=10, within_group=True)
    print(result.describe())      # accuracy 0.912 +- 0.013 (400 episodes, ...)

The tasks come from :func:`metalearn.data.fixed_tasks` with a fixed seed, so
the same arguments always evaluate on the same tasks and curves are
comparable across runs and checkpoints.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass

import torch

from metalearn.adaptation import SHIFTED_VIEWS, adapt_many, predict_many
from metalearn.data.tasks import task_stream
from metalearn.learner import MetaLearner

# The trainer validates on tasks drawn with VALIDATION_SEED and keeps the best
# checkpoint by them; `metalearn eval` and evaluate() draw theirs with EVAL_SEED
# unless told otherwise, so a best checkpoint is not scored on the tasks that
# chose it (task i is the i-th draw of a seed: with one seed for both, the
# first validation-episodes tasks of an evaluation were the validation's own).
# Training tasks come from generators derived from the run seed, never these.
VALIDATION_SEED = 20260
EVAL_SEED = 52051
Z95 = 1.96


@dataclass
class EvalResult:
    metric: str  # "accuracy" or "mse"
    mean: float
    ci95: float
    episodes: int
    std: float
    inner_steps: int
    inner_lr: float | None
    ways: int | None
    shots: int
    queries: int
    within_group: bool
    transductive: bool
    seed: int
    seconds: float
    support_shift: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        shape = f"{self.ways}-way {self.shots}-shot" if self.ways else f"K={self.shots}"
        where = ", within one group" if self.within_group else ""
        views = f", support shifted by {self.support_shift} px" if self.support_shift else ""
        return (
            f"{self.metric} {self.mean:.4f} +- {self.ci95:.4f} (95% CI, {self.episodes} episodes, {shape}"
            f"{where}, {self.inner_steps} inner steps{views})"
        )


def mean_ci95(values: torch.Tensor) -> tuple[float, float, float]:
    """Mean, 95% confidence half-width (normal approximation) and standard deviation."""
    values = values.double()
    n = values.numel()
    mean = values.mean().item()
    std = values.std(unbiased=True).item() if n > 1 else 0.0
    return mean, Z95 * std / math.sqrt(n) if n > 1 else 0.0, std


def default_chunk(learner: MetaLearner, device: torch.device, images_per_task: int | None = None) -> int:
    """Tasks adapted at once (one vmapped computation). On a GPU 100; on the CPU 200 for a model without
    convolutions, and for a conv net about 160 images a chunk (up to 16 tasks, at least 1): per task,
    Conv4's 5-way tasks (10 images) took 2.6-4.2x less time 16 at a time than one at a time, 20-way ones
    (40) 1.4x less 4 at a time, and 20-way tasks with shifted support views (120) were fastest alone;
    larger chunks than that spill the caches (``bench/experiments/eval_chunks.py``). The tasks themselves
    do not depend on it (``task_stream``)."""
    has_conv = any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in learner.model.modules())
    if device.type == "cuda":
        return 100
    if not has_conv:
        return 200
    return max(1, min(16, 160 // images_per_task)) if images_per_task else 1


@torch.no_grad()
def evaluate(
    learner: MetaLearner,
    source,
    *,
    episodes: int = 400,
    ways: int | None = None,
    shots: int | None = None,
    queries: int | None = None,
    inner_steps: int | None = None,
    inner_lr: float | None = None,
    within_group: bool = False,
    transductive: bool = False,
    support_shift: int = 0,
    seed: int = EVAL_SEED,
    chunk: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """Adapt to ``episodes`` held-out tasks of ``source`` and score the queries.

    ``inner_steps``/``inner_lr`` default to the learner's training values
    (``inner_lr=None`` keeps learned learning rates); ``support_shift`` adds
    shifted views of the support images (``metalearn.adaptation.augment_support``).
    Per-task scores are averaged; ``ci95`` is 1.96 standard errors. ``progress``:
    a progress bar of the episodes on stderr.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    started = time.perf_counter()
    device = next(learner.parameters()).device
    steps = learner.config.inner_steps if inner_steps is None else inner_steps
    classification = source.task_type == "classification"
    kwargs = {"shots": shots, "queries": queries}
    if classification:
        kwargs.update(ways=ways, within_group=within_group)
    if chunk is None:
        first = source.sample(1, torch.Generator().manual_seed(seed), **kwargs)  # (task_stream's first task)
        images = first.support_x.shape[1] * (SHIFTED_VIEWS if support_shift else 1) + first.query_x.shape[1]
        chunk = default_chunk(learner, device, images)
    was_training = learner.training
    learner.eval()
    scores = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=episodes, desc="eval", unit="episode", file=sys.stderr, dynamic_ncols=True, leave=False)
    try:
        for batch in task_stream(source, episodes, seed, chunk, **kwargs):
            batch = batch.to(device)
            adaptation = adapt_many(
                learner, batch.support_x, batch.support_y, steps=steps, lr=inner_lr, support_shift=support_shift
            )
            outputs = predict_many(learner, adaptation, batch.query_x, transductive=transductive)
            if classification:
                # Among the task's classes: a model with more outputs than ways predicts one of them (as the
                # service's probabilities, over a checkpoint's n_way, do).
                scores.append((outputs[..., :ways].argmax(-1) == batch.query_y).float().mean(-1).cpu())
            else:
                scores.append((outputs - batch.query_y).pow(2).flatten(1).mean(-1).cpu())
            if bar is not None:
                bar.update(len(scores[-1]))
    finally:
        learner.train(was_training)
        if bar is not None:
            bar.close()
    mean, ci95, std = mean_ci95(torch.cat(scores))
    sample = batch  # the last batch tells the actual task shape
    num_ways = int(sample.support_y.max().item()) + 1 if classification else None
    return EvalResult(
        metric="accuracy" if classification else "mse",
        mean=mean,
        ci95=ci95,
        episodes=episodes,
        std=std,
        inner_steps=steps,
        inner_lr=inner_lr,
        ways=num_ways,
        shots=sample.support_x.shape[1] // (num_ways or 1),
        queries=sample.query_x.shape[1] // (num_ways or 1),
        within_group=bool(within_group and classification),
        transductive=transductive,
        seed=seed,
        seconds=time.perf_counter() - started,
        support_shift=support_shift,
    )


def better(metric: str, new: float, old: float | None) -> bool:
    """Is ``new`` an improvement on ``old`` (higher accuracy, lower MSE)?"""
    if old is None:
        return True  # the first result is the best so far, even a NaN one
    if math.isnan(old):
        return not math.isnan(new)
    return new > old if metric == "accuracy" else new < old


__all__ = ["EVAL_SEED", "VALIDATION_SEED", "EvalResult", "better", "evaluate", "mean_ci95"]
