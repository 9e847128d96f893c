"""How many tasks ``metalearn.evaluate`` should adapt at once on the CPU: time per task by chunk size.

    python bench/experiments/eval_chunks.py            # the process's torch threads
    python bench/experiments/eval_chunks.py --threads 1

For Conv4 models (MAML and ANIL) of a few widths, ways, support sizes and inner
steps: ``adapt_many`` + ``predict_many`` (what ``evaluate`` runs per chunk, one
vmapped computation) on random 1-shot tasks, the least time of a few runs
divided by the chunk's tasks. ``metalearn.evaluate.default_chunk`` is set from
it: what counts is the images a chunk holds.
"""

from __future__ import annotations

import argparse
import time

import torch

from metalearn import Conv4, MetaConfig, MetaLearner
from metalearn.adaptation import adapt_many, predict_many
from metalearn.evaluate import default_chunk

# (algorithm, channels, ways, inner steps, support views: 5 = the support shift's)
CASES = [("maml", 32, 5, 3, 1), ("maml", 64, 5, 10, 1), ("maml", 64, 20, 5, 1), ("anil", 64, 5, 10, 1),
         ("anil", 64, 20, 25, 5)]
CHUNKS = [1, 2, 4, 8, 16, 32, 64]


def time_per_task(learner: MetaLearner, chunk: int, ways: int, steps: int, views: int) -> float:
    support_x, query_x = torch.rand(chunk, ways * views, 1, 28, 28), torch.rand(chunk, ways, 1, 28, 28)
    support_y = torch.arange(ways).repeat(views).expand(chunk, -1).contiguous()

    def run():
        predict_many(learner, adapt_many(learner, support_x, support_y, steps=steps), query_x)

    run()  # warm-up
    times = []
    for _ in range(max(2, 16 // chunk)):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times) / chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for algorithm, channels, ways, steps, views in CASES:
        learner = MetaLearner(Conv4(out_features=ways, channels=channels), MetaConfig(algorithm, inner_steps=steps, inner_lr=0.4))
        learner.eval()
        images = ways * views + ways
        per_task = {chunk: round(1000 * time_per_task(learner, chunk, ways, steps, views), 1) for chunk in CHUNKS if chunk * images <= 2048}
        print(f"{algorithm} Conv4-{channels} {ways}-way 1-shot x{views} views ({images} images a task), {steps} steps, "
              f"{args.threads} threads: ms per task by chunk {per_task}; default_chunk: {default_chunk(learner, torch.device('cpu'), images)}", flush=True)


if __name__ == "__main__":
    main()
