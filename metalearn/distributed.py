"""Data-parallel meta-training with ``torch.distributed`` (launched by ``torchrun``).

``torchrun --nproc_per_node N -m metalearn.cli train ...`` (or the ``metalearn``
script) starts N processes with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set.
Every rank builds the same initial model, samples its own share of the
meta-batch (task generators are seeded with the rank), and the meta-gradients
are averaged with one all-reduce before the optimiser step, so N processes
with meta-batch ``B`` take exactly the step one process takes on the
combined ``B`` tasks. Only rank 0 writes checkpoints, logs and the progress
bar. The backend is NCCL on GPUs and gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> Context:
    """The rank layout torchrun put in the environment (a single process when absent)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return Context(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def setup(device: torch.device) -> Context:
    """Join the process group when launched with WORLD_SIZE > 1 (no-op otherwise)."""
    context = from_environment()
    if context.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=context.rank, world_size=context.world_size)
        context.initialized_here = True
    return context


def teardown(context: Context) -> None:
    if context.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_parameters(module: torch.nn.Module, context: Context) -> None:
    """Make every rank start from rank 0's weights."""
    if not context.enabled:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def gradient_reducer(context: Context):
    """A ``reduce_grads`` hook for :meth:`MetaLearner.meta_step`: average ``.grad`` over ranks.

    All gradients go through one flat buffer, so a step costs one all-reduce.
    """
    if not context.enabled:
        return None

    def reduce(params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= context.world_size
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n

    return reduce


def average_scalars(values: list[float], context: Context, device: torch.device) -> list[float]:
    """Mean of a few numbers over ranks (loss and accuracy for the log)."""
    if not context.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return (tensor / context.world_size).tolist()


def barrier(context: Context) -> None:
    if context.enabled:
        dist.barrier()
