"""Are the engine's results on a GPU reproducible, with and without CUDA graphs?

    python bench/experiments/graph_determinism.py

For Conv4-64 MAML (fast kernel) and Meta-SGD (generic path), 5-way 1-shot, 10
inner steps at lr 0.4 from a random initialisation: the largest probability
difference between two eager runs of the same batch, and between an eager run
and a graph replay, with cuDNN's default algorithms and with
``torch.backends.cudnn.deterministic = True``, TF32 on (the default) and off.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_graphs import demo_registry  # noqa: E402
from service.engine import Engine, Job  # noqa: E402

registry = demo_registry(("maml", "metasgd"), "cuda")


def jobs(model, rows):
    g = torch.Generator().manual_seed(rows)
    return [Job("adapt", model, support_x=torch.rand(5, 1, 28, 28, generator=g), support_y=torch.arange(5), steps=10,
                lr=None, query_x=torch.rand(5, 1, 28, 28, generator=g), keep_session=False) for _ in range(rows)]


def probabilities(engine, batch):
    return torch.tensor([r["probabilities"] for r in engine._compute(batch)])


for tf32 in (True, False):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    for deterministic in (False, True):
        torch.backends.cudnn.deterministic = deterministic
        for name in ("maml", "metasgd"):
            model = registry.get(name)
            for rows in (1, 8):
                batch = jobs(model, rows)
                eager, graphed = Engine(cuda_graphs=0), Engine(cuda_graphs=4, max_batch_size=64)
                a, b = probabilities(eager, batch), probabilities(eager, batch)
                for _ in range(3):  # eager, capture, replay
                    c = probabilities(graphed, batch)
                print(f"tf32={tf32!s:5} deterministic={deterministic!s:5} {name:8} R={rows}: eager vs eager {(a - b).abs().max():.1e}, "
                      f"eager vs graph {(a - c).abs().max():.1e} ({graphed._graphs('cuda').captures} captured)", flush=True)
