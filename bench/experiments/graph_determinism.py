"""Are the engine's results on a GPU reproducible, with and without CUDA graphs?

    python bench/experiments/graph_determinism.py

For Conv4-64 MAML (fast kernel) and Meta-SGD (generic path), 5-way 1-shot, 10
inner steps at lr 0.4 from a random initialisation: the largest probability
difference between two eager runs of the same batch, and between an eager run
and a graph replay, with cuDNN's default algorithms and with
``torch.backends.cudnn.deterministic = True``, TF32 on (the default) and off.
"""
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from metalearn import Conv4, MetaConfig, MetaLearner  # noqa: E402
from metalearn.checkpoint import save_checkpoint  # noqa: E402
from service.engine import Engine, Job  # noqa: E402
from service.registry import ModelRegistry  # noqa: E402

directory = Path(tempfile.mkdtemp())
for algorithm in ("maml", "metasgd"):
    torch.manual_seed(0)
    learner = MetaLearner(Conv4(out_features=5, channels=64), MetaConfig(algorithm, inner_steps=10, inner_lr=0.4))
    save_checkpoint(directory / f"{algorithm}.safetensors", learner, input_shape=(1, 28, 28), n_way=5)
registry = ModelRegistry.load(directory, "cuda")


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
