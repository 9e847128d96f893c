"""Running one task's meta-gradient over a whole meta-batch.

Strategies, all giving the same result (tests check it to 1e-5):

``loop``
    One task at a time with the autograd engine: each task's graph is freed
    before the next. The reference, the fallback for unequal shapes, and the
    only strategy that supports ``checkpoint_inner``.
``vmap``
    ``torch.func.vmap`` over the task dimension. Each task is differentiated
    *inside* the vmap (``vmap(grad(f))``), which keeps second-order gradients
    through ``F.batch_norm`` exact (differentiating outside the vmap is not,
    in torch 2.13).
``chunked:N``
    vmap over chunks of N tasks, looping over the chunks: bounds the memory
    of vmap on big models.

``auto`` picks by workload; see :func:`choose_strategy`. Models with torch's
recurrent layers (``nn.RNN``, ``nn.GRU``, ``nn.LSTM``, their cells) run as a loop only:
vmap cannot run them (:func:`vmaps`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import vmap
from torch.utils._pytree import tree_leaves, tree_map

from metalearn.learner import MetaLearner, StepResult

STRATEGIES = ("auto", "loop", "vmap", "chunked:<n>")
RECURRENT = (nn.RNNBase, nn.RNNCellBase)  # nn.RNN, nn.GRU, nn.LSTM and their cells


def vmaps(model: nn.Module) -> bool:
    """Whether ``torch.func.vmap`` runs ``model``: not with torch's recurrent layers, whose batching fails in
    torch 2.13 (nn.GRU and nn.RNN: "output with shape [5, 16] doesn't match the broadcast shape [4, 5, 16]";
    nn.LSTM without gradients: "Batching rule not implemented for aten::lstm.input")."""
    return not any(isinstance(module, RECURRENT) for module in model.modules())


def map_tasks(learner: MetaLearner, fn, in_dims: tuple, *args):
    """``vmap(fn, in_dims, randomness="different")(*args)``, or, for a model vmap cannot run (:func:`vmaps`),
    the same as a loop over the stacked dimension (``in_dims`` 0 or None per argument, any pytree of tensors)."""
    if vmaps(learner.model):
        return vmap(fn, in_dims=in_dims, randomness="different")(*args)
    count = tree_leaves(next(a for a, dim in zip(args, in_dims) if dim == 0))[0].shape[0]
    outputs = [fn(*(a if dim is None else tree_map(lambda t: t[i], a) for a, dim in zip(args, in_dims))) for i in range(count)]
    return tree_map(lambda *parts: torch.stack(parts), *outputs)


def choose_strategy(learner: MetaLearner, device: str | torch.device, training: bool = True) -> str:
    """``vmap`` or ``loop`` for a stack of tasks (training) or of adaptation requests (the service).

    Measured (bench/meta_step.py, bench/service_bench.py): on the CPU, vmap
    turns a convolution whose weights differ per task into a grouped
    convolution and keeps every task's activations alive, so such models run
    as a loop; fully connected models gain several-fold from vmap. In
    training, every conv weight gets a per-task gradient inside the vmap, so
    any convolution means a loop; at test time only adapted conv weights do
    (ANIL's head-only adaptation folds the requests into one batch). On a GPU
    vmap wins for both.
    """
    if (training and learner.config.checkpoint_inner) or not vmaps(learner.model):
        return "loop"
    if torch.device(device).type == "cuda":
        return "vmap"
    adapted = set(learner.adapt_names)
    for name, module in learner.model.named_modules():
        if not isinstance(module, nn.modules.conv._ConvNd):
            continue
        if training or any(f"{name}.{p}" in adapted for p, _ in module.named_parameters(recurse=False)):
            return "loop"
    return "vmap"


def check_sets(support_x, query_x=None, what: str = "the meta-batch") -> None:
    """Raise ``ValueError`` unless there are tasks and every task's support set, and query set when
    ``query_x`` is given (a query loss needs one), has examples (with none, the loss is a silent NaN).
    ``support_x``/``query_x``: the tasks' inputs stacked ``[T, S, ...]``, or a sequence of ``[S, ...]``."""
    if len(support_x) == 0:
        raise ValueError(f"{what} has no tasks")
    for name, sets in (("support", support_x), ("query", query_x)):
        empty = sets is not None and (sets.shape[1:2] == (0,) if isinstance(sets, torch.Tensor)
                                      else any(x.shape[:1] == (0,) for x in sets))
        if empty:
            needs = "support examples" + (", and query examples for its query loss" if query_x is not None else "")
            raise ValueError(f"every task needs {needs}: got a {name} set of size 0")


def check_input_dtype(learner: MetaLearner, *inputs: torch.Tensor) -> None:
    """Raise ``ValueError`` unless floating-point inputs have the model's floating-point dtype: torch's own
    error ("mat1 and mat2 must have the same dtype") names neither. (Integer inputs, token ids say, pass.)"""
    param = next(learner.model.parameters(), None)
    if param is None or not param.is_floating_point():
        return
    for x in inputs:
        if x.is_floating_point() and x.dtype != param.dtype:
            raise ValueError(f"the inputs are {x.dtype} and the model's parameters {param.dtype}: convert the inputs "
                             f"(x.to({param.dtype})), or the model (learner.to({x.dtype}))")


def check_label_range(learner: MetaLearner, x: torch.Tensor, labels) -> None:
    """Raise ``ValueError`` unless the classification ``labels`` (tensors of class indices, as
    :meth:`MetaLearner.check_targets` returns them) are in ``[0, outputs)`` for the model's outputs on
    inputs like ``x`` (one task's): cross_entropy ignores -100, and a label too large is an index error
    (under ``vmap``, from a decomposition). Nothing to check for regression. Reads the labels' values:
    for labels on a GPU, that waits for it."""
    if learner.config.task_type != "classification":
        return
    ways = learner.outputs_width(x)
    labels = torch.cat([t.flatten() for t in labels])
    low, high = torch.stack(torch.aminmax(labels)).tolist() if labels.numel() else (0, 0)
    if not 0 <= low <= high < ways:
        raise ValueError(f"classification labels must be class indices in [0, {ways}) for a model with {ways} "
                         f"outputs, got labels from {low} to {high}")


def _checked(learner: MetaLearner, tasks: tuple) -> tuple:
    """The meta-batch's tasks, checked where a mistake would otherwise train silently or fail deep inside:
    labels or targets shaped as the task type needs (:meth:`MetaLearner.check_targets`), classification
    labels in ``[0, outputs)`` (:func:`check_label_range`; one sync a step), support and query sets not
    empty (:func:`check_sets`)."""
    support_x, support_y, query_x, query_y = tasks
    check_sets(support_x, None if learner.config.algorithm == "reptile" else query_x)
    # (a list of unequal tasks gives tuples of tensors, one per task)
    stacked = isinstance(support_y, torch.Tensor)
    checked = lambda labels: (learner.check_targets(labels, stacked=True) if stacked  # noqa: E731
                              else tuple(learner.check_targets(t) for t in labels))
    support_y, query_y = checked(support_y), checked(query_y)
    check_input_dtype(learner, support_x[0], *([] if query_x is None else [query_x[0]]))
    learner.check_head_only(support_x[0])  # (ANIL's; once, and then the label range needs no forward of its own)
    check_label_range(learner, support_x[0], [t for y in (support_y, query_y) for t in ([y] if stacked else y)])
    return support_x, support_y, query_x, query_y


def parse_strategy(strategy: str, checkpoint_inner: bool = False) -> tuple[str, int]:
    """``(kind, chunk size)`` of a strategy other than ``auto``, or an error that lists them (or says that
    ``checkpoint_inner`` needs ``loop``)."""
    if not isinstance(strategy, str):
        raise ValueError(f"strategy must be a string, one of {', '.join(STRATEGIES)}; got {strategy!r}")
    kind, size = None, 0
    if strategy in ("loop", "vmap"):
        kind = strategy
    elif strategy.startswith("chunked:"):
        try:
            size = int(strategy.split(":", 1)[1])
        except ValueError:
            size = 0
        kind = "chunked" if size >= 1 else None
    if kind is None:
        raise ValueError(f"unknown batching strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if checkpoint_inner and kind != "loop":
        raise ValueError(f"checkpoint_inner needs the 'loop' strategy (torch.func transforms cannot checkpoint), got {strategy!r}")
    return kind, size


def run_meta_batch(learner: MetaLearner, batch, iteration: int = 0, strategy: str = "auto") -> StepResult:
    """Mean meta-gradient, query loss and accuracy over the tasks of ``batch``.

    ``batch`` is a ``TaskBatch`` (tasks of equal shapes, stacked), or a list of
    ``(support_x, support_y, query_x, query_y)`` tuples of unequal shapes,
    which always runs as a loop.
    """
    if isinstance(batch, (list, tuple)):
        if not all(isinstance(task, (list, tuple)) and len(task) == 4 for task in batch):
            raise ValueError("a meta-batch is a TaskBatch, or a list of (support_x, support_y, query_x, query_y) tuples "
                             "(one per task); for four stacked tensors [T, ...], pass TaskBatch(support_x, support_y, "
                             "query_x, query_y)")
        strategy = "loop"
        tasks = tuple(zip(*batch))
    else:
        tasks = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    tasks = _checked(learner, tasks)
    chosen = strategy == "auto"
    if chosen:
        strategy = choose_strategy(learner, next(learner.parameters()).device)
    kind, chunk = parse_strategy(strategy, learner.config.checkpoint_inner)
    if kind != "loop" and not vmaps(learner.model):
        layer = next(type(m).__name__ for m in learner.model.modules() if isinstance(m, RECURRENT))
        raise ValueError(f"strategy {strategy!r}: torch.func.vmap cannot run the model's {layer} layers; use 'loop' "
                         "(what 'auto' picks for it)")
    meta_params = learner.meta_params()
    buffers = learner.buffers_dict()
    count = len(tasks[0])
    if kind == "loop":
        # The autograd engine, not torch.func: per task, functorch's wrapping
        # costs ~3x on small models, and only autograd can checkpoint.
        per_task = learner.task_gradient_fn(iteration, use_autograd=True)

        def task_fn(meta_params, buffers, *chunk_tasks):
            grads, (loss, accuracy) = per_task(meta_params, buffers, *(t[0] for t in chunk_tasks))
            return {n: g.unsqueeze(0) for n, g in grads.items()}, (loss.reshape(1), accuracy.reshape(1))

        size = 1
    else:
        task_fn = vmap(learner.task_gradient_fn(iteration), in_dims=(None, None, 0, 0, 0, 0), randomness="different")  # (dropout: each task its own)
        size = count if kind == "vmap" else chunk
    sums = {n: torch.zeros_like(p) for n, p in meta_params.items()}
    loss_parts, accuracy_parts = [], []
    for start in range(0, count, size):
        try:
            grads, (loss, accuracy) = task_fn(meta_params, buffers, *(t[start : start + size] for t in tasks))
        except RuntimeError as error:
            if kind == "loop":
                raise
            # (torch's words alone name an operator, "...would mutate a captured Tensor" or a broadcast shape)
            raise RuntimeError(f"{error}\n(under torch.func.vmap, strategy {strategy!r}{', what auto chose' if chosen else ''}: "
                               "a model that changes its buffers "
                               "in forward (only while training, to adapt), or has layers vmap cannot batch, trains with strategy='loop')") from error
        for name, g in grads.items():
            sums[name] += g.sum(0)
        loss_parts.append(loss)
        accuracy_parts.append(accuracy)
    grads = {n: s / count for n, s in sums.items()}
    losses, accuracies = torch.cat(loss_parts), torch.cat(accuracy_parts)
    classification = learner.config.task_type == "classification"
    return StepResult(loss=losses.mean().item(), accuracy=accuracies.mean().item() if classification else None, grads=grads,
                      task_losses=losses.tolist(), task_accuracies=accuracies.tolist() if classification else None)
