"""``metalearn train`` under torchrun: 2 gloo processes take the step 1 process takes on the combined meta-batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metalearn.checkpoint import load_checkpoint
from metalearn.data import TaskBatch
from metalearn.train import TrainConfig, build_learner, load_source, task_generator

ROOT = Path(__file__).resolve().parents[1]
META_LR = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "metalearn.cli", "train", "--task", "sinusoid", "--algorithm", "maml", "--meta-batch", "4",
        "--iterations", "1", "--meta-lr", str(META_LR), "--set", "optimizer=sgd", "--set", "model={hidden: [8, 8]}",
        "--val-interval", "1", "--val-episodes", "4", "--threads", "1", "--seed", "3", "--out", str(out),
        "--no-progress", *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_processes_match_one_process_with_the_combined_meta_batch(tmp_path):
    out = tmp_path / "ddp"
    done = torchrun(out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: 1 iterations") == 1  # only rank 0 reports
    assert sorted(p.name for p in out.iterdir()) == [".train.lock", "best.safetensors", "curves.png", "last.safetensors",
                                                      "metrics.jsonl"]
    checkpoint = load_checkpoint(out / "last.safetensors")
    assert checkpoint.manifest["training"]["world_size"] == 2

    # One process, the same initial weights, both ranks' tasks in one meta-batch.
    config = TrainConfig(**checkpoint.manifest["training"]["config"])
    source = load_source(config)
    torch.manual_seed(config.seed)
    learner = build_learner(config, source)
    before = {n: p.detach().clone() for n, p in learner.named_parameters()}
    parts = [source.sample(2, task_generator(config.seed, rank, 0)) for rank in range(2)]
    batch = TaskBatch(*(torch.cat([getattr(p, f) for p in parts]) for f in ("support_x", "support_y", "query_x",
                                                                             "query_y")))
    expected = learner.meta_gradient(batch).grads
    after = checkpoint.learner.state_dict()
    for name, value in before.items():
        gradient = (value - after[name]) / META_LR  # plain SGD: w1 = w0 - lr * g
        torch.testing.assert_close(gradient, expected[name], rtol=1e-4, atol=1e-5, msg=name)

    # Resuming works the same under torchrun.
    done = torchrun(out, "--resume", "--iterations", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(out / "last.safetensors").manifest["state"]["iteration"] == 2
