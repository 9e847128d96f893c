"""Test-time adaptation: what evaluation and the service run.

Adapt from the meta-learned initialisation on a support set (no second-order
graph), then predict queries with the adapted parameters::

    adaptation = adapt(learner, support_x, support_y, steps=10)
    logits = predict(learner, adaptation, query_x)          # support statistics
    logits = predict(learner, adaptation, query_x, transductive=True)

Both have batched forms over several independent requests of the same shape
(``adapt_many`` / ``predict_many``), which the service uses to run concurrent
requests as one computation.

One learner computes in one thread at a time: ``functional_call`` swaps the
adapted tensors into its module for the length of a call. Threads that adapt
concurrently each need their own ``copy.deepcopy(learner)`` (the service's
workers keep one each).

BatchNorm at prediction time: by default queries are normalised with
statistics recorded on the support set with the adapted parameters, so a
query's prediction does not depend on which other queries come with it.
``transductive=True`` uses the statistics of the query batch, as MAML's own
evaluation does.

Image models may augment the support set at test time: with
``support_shift=s`` every support image also enters shifted by ``s`` pixels
down, up, right and left (edge-replicated), so a 1-shot class is adapted to
from five views of its example (on held-out Omniglot 20-way 1-shot, +0.8
points for the best config with ``s=2``; see the README).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from metalearn.batching import check_input_dtype, check_label_range, check_sets, map_tasks
from metalearn.data.images import SHIFTED_VIEWS, shifted_views
from metalearn.learner import MetaLearner, Params, check_integer, check_positive_number
from metalearn.models import has_batchnorm, norm_statistics

NormStats = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Adaptation:
    """The result of adapting to one support set (or a stack of them, for ``adapt_many``).

    ``params`` holds only the parameters adaptation changed (the head for
    ANIL); ``norm_stats`` the support-set BatchNorm statistics (empty for
    models without BatchNorm).
    """

    params: Params
    norm_stats: NormStats
    support_loss_before: torch.Tensor
    support_loss_after: torch.Tensor

    def nbytes(self) -> int:
        tensors = list(self.params.values()) + [t for pair in self.norm_stats.values() for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)


@contextlib.contextmanager
def _buffer_changes_explained():
    """torch.func's words for a forward that changes a buffer in place name an operator, not the cause or the way out."""
    try:
        yield
    except RuntimeError as error:
        if "mutate a captured Tensor" not in str(error):
            raise
        raise RuntimeError(
            "the model's forward changes one of its buffers in place, which adaptation (differentiated with torch.func) "
            "cannot do, and must not: a buffer moved by each support set would make every answer depend on the ones "
            "before it. Change buffers only under `if self.training:`, as BatchNorm does, and adapt in eval mode "
            f"(learner.eval(); checkpoints load so). torch said: {str(error).splitlines()[0]}"
        ) from error


def _adapt_one(learner: MetaLearner, steps: int, lr: float | None, meta_params, buffers, support_x, support_y):
    params = learner.model_params(meta_params)
    features = None
    if learner.head_only:
        # Only the head adapts (ANIL): the body's one support pass gives the features every step uses,
        # the BatchNorm statistics queries will be normalised with, and the loss after adaptation.
        with norm_statistics(learner.model) as stats:
            features = learner.body_features(params, buffers, support_x)
    trajectory, losses = learner.inner_loop(
        meta_params, buffers, support_x, support_y, steps=steps, create_graph=False, lr_override=lr, features=features
    )
    adapted = trajectory[-1] if trajectory else learner.initial_fast(meta_params, buffers, support_x, support_y, features)
    if features is not None:
        outputs = learner.head_forward(adapted, features)
    else:
        # One more support forward with the adapted parameters: the loss after
        # adaptation and the BatchNorm statistics queries will be normalised with.
        with norm_statistics(learner.model) as stats:
            outputs = learner.forward_with({**params, **adapted}, buffers, support_x)
    after = learner._loss(outputs, support_y)
    before = losses[0] if losses else after
    return adapted, dict(stats), before.detach(), after.detach()


def _predict_one(learner: MetaLearner, meta_params, buffers, adapted, norm_stats, query_x):
    params = {**learner.model_params(meta_params), **adapted}
    if norm_stats is None:
        return learner.forward_with(params, buffers, query_x)
    with norm_statistics(learner.model, norm_stats):
        return learner.forward_with(params, buffers, query_x)


def _resolve(learner: MetaLearner, steps: int | None, lr: float | None) -> tuple[int, float | None]:
    """``steps`` (None: the trained number) and ``lr`` (None: the trained rates), checked."""
    steps = learner.config.inner_steps if steps is None else check_integer("steps", steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    return steps, None if lr is None else check_positive_number("lr", lr)


def _at_hand(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read at no cost and decide nothing that is recorded: a plain tensor on
    the CPU, outside a trace and ``vmap``. Not one on a GPU (reading it waits for the GPU, and fails while
    a CUDA graph captures), nor the service's CPU scripts' fake tensors (they record shapes, not values):
    the service checks a request's labels itself before they reach the device."""
    return (t.device.type == "cpu" and type(t) is torch.Tensor and not torch.jit.is_tracing()
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


def _checked_support(learner: MetaLearner, support_x: torch.Tensor, support_y: torch.Tensor, stacked: bool) -> torch.Tensor:
    """``support_y`` checked as a meta-batch's tasks are (``metalearn.batching``): labels or targets shaped
    as the task type needs, support sets not empty, ANIL's model, and classification labels in
    ``[0, outputs)`` where they are at hand (:func:`_at_hand`; on a GPU, check them before moving them there)."""
    support_y = learner.check_targets(support_y, stacked=stacked)
    check_sets(support_x if stacked else (support_x,), what="the stack of support sets")
    one_task = support_x[0] if stacked else support_x
    check_input_dtype(learner, one_task)
    learner.check_head_only(one_task)  # (ANIL's; once, and then the label range needs no forward of its own)
    if _at_hand(support_y):
        check_label_range(learner, one_task, [support_y])
    return support_y


def check_support_shift(support_shift: int, input_shape) -> None:
    """Raise ``ValueError`` unless ``support_shift`` fits inputs of ``input_shape`` (images ``[..., H, W]``
    larger than the shift); 0 fits anything. What training, ``metalearn eval`` and the service check up front."""
    shape = list(input_shape)
    if support_shift < 0 or (support_shift and (len(shape) < 2 or support_shift >= min(shape[-2:]))):
        raise ValueError(f"a support shift of {support_shift} px needs image inputs [..., H, W] larger than that; "
                         f"the inputs have shape {shape}")


def augment_support(
    support_x: torch.Tensor, support_y: torch.Tensor, support_shift: int, stacked: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The support set ``[S, *input]`` (``[R, S, *input]`` if ``stacked``) with ``support_shift``-pixel
    shifted views of every image added (``metalearn.data.images.shifted_views``), labels repeated."""
    if not support_shift:
        return support_x, support_y
    dim = 1 if stacked else 0
    if support_x.dim() < dim + 3:
        raise ValueError(f"support_shift needs image inputs [..., H, W]; got support_x of shape {tuple(support_x.shape)}")
    repeats = [1] * support_y.dim()
    repeats[dim] = SHIFTED_VIEWS
    return shifted_views(support_x, support_shift, dim), support_y.repeat(*repeats)


@torch.no_grad()
def adapt(
    learner: MetaLearner,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    steps: int | None = None,
    lr: float | None = None,
    support_shift: int = 0,
) -> Adaptation:
    """Adapt to one support set. ``steps``/``lr`` override the trained defaults.

    ``lr`` replaces the base (or learned) inner learning rate; Task-Adaptive
    scales still apply on top of it. ``support_shift`` > 0 adds shifted views
    of every support image (:func:`augment_support`).

    Refused with a ``ValueError``: steps that are not an integer >= 0, an ``lr`` that is not a positive
    finite number, an empty support set, labels or targets of the wrong shape or type, and (for labels
    on the CPU) class indices outside the model's outputs.
    """
    steps, lr = _resolve(learner, steps, lr)
    support_y = _checked_support(learner, support_x, support_y, stacked=False)
    support_x, support_y = augment_support(support_x, support_y, support_shift)
    with _buffer_changes_explained():
        adapted, stats, before, after = _adapt_one(
            learner, steps, lr, learner.meta_params(), learner.buffers_dict(), support_x, support_y
        )
    return Adaptation(adapted, stats, before, after)


@torch.no_grad()
def adapt_many(
    learner: MetaLearner,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    steps: int | None = None,
    lr: float | None = None,
    support_shift: int = 0,
) -> Adaptation:
    """``adapt`` for a stack of independent support sets ``[R, S, ...]``, as one vmapped computation
    (checked as ``adapt`` checks one)."""
    steps, lr = _resolve(learner, steps, lr)
    support_y = _checked_support(learner, support_x, support_y, stacked=True)
    support_x, support_y = augment_support(support_x, support_y, support_shift, stacked=True)

    def one(meta_params, buffers, x, y):
        return _adapt_one(learner, steps, lr, meta_params, buffers, x, y)

    with _buffer_changes_explained():
        adapted, stats, before, after = map_tasks(learner, one, (None, None, 0, 0), learner.meta_params(), learner.buffers_dict(), support_x, support_y)
    return Adaptation(adapted, stats, before, after)


@torch.no_grad()
def predict(
    learner: MetaLearner, adaptation: Adaptation, query_x: torch.Tensor, transductive: bool = False
) -> torch.Tensor:
    """Outputs (logits or regression values) for ``query_x`` with adapted parameters."""
    check_input_dtype(learner, query_x)
    stats = None if transductive or not has_batchnorm(learner.model) else adaptation.norm_stats
    return _predict_one(learner, learner.meta_params(), learner.buffers_dict(), adaptation.params, stats, query_x)


@torch.no_grad()
def predict_many(
    learner: MetaLearner, adaptation: Adaptation, query_x: torch.Tensor, transductive: bool = False
) -> torch.Tensor:
    """``predict`` for stacked adaptations ``[R, ...]`` and queries ``[R, Q, ...]``: one forward pass."""
    check_input_dtype(learner, query_x)
    use_stats = not transductive and has_batchnorm(learner.model)

    def one(meta_params, buffers, adapted, stats, x):
        return _predict_one(learner, meta_params, buffers, adapted, stats if use_stats else None, x)

    stats = adaptation.norm_stats if use_stats else {}
    return map_tasks(learner, one, (None, None, 0, 0, 0), learner.meta_params(), learner.buffers_dict(), adaptation.params, stats, query_x)
