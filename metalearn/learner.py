"""The meta-learning algorithms, as pure functions of parameter dicts.

One task's objective is a pure function of ``(meta_params, buffers, support_x,
support_y, query_x, query_y)``: the inner loop adapts a copy of the model
parameters on the support set with ``torch.func.grad``, the query loss at the
adapted parameters is the meta-objective. The variants are small differences
in that function:

==========  =================================================================
maml        second order: the meta-gradient flows through the inner gradients
fomaml      inner gradients are constants (taken at detached parameters)
reptile     no query gradient: the meta-"gradient" is ``theta - theta'``
metasgd     a learned learning rate per parameter element
anil        only the head adapts; the body is shared
tamaml      a task encoder maps the mean support feature to per-tensor lr scales
mamlpp      MAML++: multi-step loss, learned per-layer per-step learning rates,
            derivative-order annealing (first order for the first iterations)
==========  =================================================================

Every classification variant but reptile can also start the inner loop with
the head set to the support set's nearest-class-mean classifier instead of the
learned head (``head_init="prototypes"``: Proto-MAML, Triantafillou et al.,
2020); the meta-gradient then reaches the body through the class means too.

``metalearn.batching`` runs the per-task function over a meta-batch (a loop,
``vmap`` or chunks of it); :class:`MetaLearner` is the small object a training
loop talks to::

    learner = MetaLearner(Conv4(out_features=5), MetaConfig("maml", inner_lr=0.4))
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    for iteration in range(1000):
        batch = source.sample(32, generator, ways=5, shots=1, queries=15)
        result = learner.meta_step(batch, optimizer, iteration=iteration)
        print(result.loss, result.accuracy)

A new variant touches these places, in this order: its name in
``metalearn.names.ALGORITHMS`` and the table above; what it changes in ``MetaConfig.__post_init__`` (defaults,
refused combinations), ``MetaLearner.__init__`` (parameters it learns besides
the model's: ``lrs``, ``task_encoder``), ``step_lr`` (its learning rate) and
``task_gradient_fn`` (how the outer gradient is formed); a config
``metalearn/configs/sinusoid-NAME.yaml`` (and, if it needs them, defaults in
``metalearn.train``'s per-task tables); its meta-gradient checked against an
independent computation in ``tests/``. The service serves it through the
generic path; ``service.fastpath`` takes only the variants it names.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.func import functional_call, grad_and_value
from torch.nn.attention import SDPBackend, sdpa_kernel

from metalearn.models import convert_batchnorm, head_module_name, head_parameter_names, norm_statistics, same_definition
from metalearn.names import ALGORITHMS, HEAD_INITS, TASK_TYPES


Params = dict[str, torch.Tensor]


def check_algorithm(name: str) -> None:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")


def check_integer(name: str, value) -> int:
    """``value`` as an ``int`` (numpy's integers too), or a ``ValueError`` naming ``name`` for anything else
    (a bool, a float such as 1.5)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def check_positive_number(name: str, value) -> float:
    """``value`` as a ``float``, or a ``ValueError`` naming ``name`` unless it is a positive finite number
    (not a bool, NaN, infinity, 0 or negative)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def as_recorded(values: dict) -> dict:
    """MetaConfig's fields as a checkpoint or a run recorded them, made acceptable to this release. Earlier
    releases took ``learn_step_lrs`` with metasgd and ignored it (its learned rates were per element, as they
    are now): such a config, refused when made now, still loads and resumes, as the plain metasgd it was."""
    if values.get("algorithm") == "metasgd" and values.get("learn_step_lrs"):
        return {**values, "learn_step_lrs": False}
    return values


@dataclass
class MetaConfig:
    """Everything that defines a meta-learning algorithm (not the optimiser).

    ``None`` means "what the algorithm normally uses" and is resolved in
    ``__post_init__``: e.g. ``first_order`` is True for fomaml and reptile,
    ``multi_step_loss`` and ``learn_step_lrs`` are True for mamlpp.
    """

    algorithm: str = "maml"
    task_type: str = "classification"
    inner_steps: int = 1
    inner_lr: float = 0.01
    first_order: bool | None = None
    # MAML++ options (usable with the other variants too where they make sense: not with reptile, which has
    # no query loss, and learn_step_lrs not with metasgd, whose learned rates are per element already)
    multi_step_loss: bool | None = None
    multi_step_loss_iterations: int = 500
    learn_step_lrs: bool | None = None
    first_order_iterations: int = 0
    # Task-Adaptive MAML
    encoder_hidden: int = 64
    # Where the inner loop starts the linear head (classification): "learned" (the meta-learned
    # weights) or "prototypes" (Proto-MAML: row c = 2 * mean support feature of class c, bias
    # -|mean|^2, i.e. the nearest-class-mean classifier; the body learns through it)
    head_init: str = "learned"
    # Outer loop
    grad_clip: float | None = None
    # Recompute the inner loop in the backward pass instead of storing it
    checkpoint_inner: bool = False
    # How a meta-batch is batched: auto | loop | vmap | chunked:<n>
    strategy: str = "auto"
    # The loss of the inner and the outer loop: cross_entropy | mse | a name given to metalearn.register_loss
    # (None: cross_entropy for classification, mse for regression)
    loss: str | None = None

    def __post_init__(self) -> None:
        check_algorithm(self.algorithm)
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}")
        if self.inner_steps < 0:
            raise ValueError("inner_steps must be >= 0")
        if self.algorithm != "reptile" and self.inner_steps < 1:
            raise ValueError(f"{self.algorithm} needs at least one inner step")
        check_positive_number("inner_lr", self.inner_lr)
        for name in ("inner_steps", "multi_step_loss_iterations", "first_order_iterations", "encoder_hidden"):
            setattr(self, name, check_integer(name, getattr(self, name)))  # (a numpy integer, say: the manifest's JSON takes ints)
        if self.multi_step_loss_iterations < 1 or self.encoder_hidden < 1 or self.first_order_iterations < 0:
            raise ValueError("multi_step_loss_iterations and encoder_hidden must be >= 1, first_order_iterations >= 0")
        for name in ("first_order", "multi_step_loss", "learn_step_lrs", "checkpoint_inner"):
            value = getattr(self, name)
            if type(value).__name__ == "bool_":  # (numpy's, from a YAML or a sweep tool)
                setattr(self, name, value := bool(value))
            if not any(value is allowed for allowed in (None, True, False)):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.grad_clip is not None:
            if isinstance(self.grad_clip, bool) or not isinstance(self.grad_clip, numbers.Real) or not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
                raise ValueError(f"grad_clip must be a positive finite number (the largest meta-gradient norm), or 0 or None "
                                 f"for none, got {self.grad_clip!r}")
            self.grad_clip = float(self.grad_clip) or None  # (0 meant no clipping, and checkpoints may say so)
        if self.strategy != "auto":  # (auto picks loop for checkpoint_inner)
            from metalearn.batching import parse_strategy  # (batching builds on this module)

            parse_strategy(self.strategy, self.checkpoint_inner)
        if self.first_order is None:
            self.first_order = self.algorithm in ("fomaml", "reptile")
        if self.multi_step_loss is None:
            self.multi_step_loss = self.algorithm == "mamlpp"
        if self.learn_step_lrs is None:
            self.learn_step_lrs = self.algorithm == "mamlpp"
        if self.algorithm == "reptile" and (self.multi_step_loss or self.learn_step_lrs):
            raise ValueError("reptile has no query loss: multi_step_loss and learn_step_lrs do not apply")
        if self.algorithm == "metasgd" and self.learn_step_lrs:
            raise ValueError("metasgd learns a learning rate per parameter element already: learn_step_lrs does not apply")
        if self.loss is None:
            self.loss = DEFAULT_LOSSES[self.task_type]
        if not isinstance(self.loss, str) or self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}: the built-in ones are {', '.join(DEFAULT_LOSSES.values())}; register "
                             "one of your own with metalearn.register_loss (a service or metalearn eval imports the module "
                             "that registers it through METALEARN_MODEL_MODULES)")
        if self.loss in DEFAULT_LOSSES.values() and self.loss != DEFAULT_LOSSES[self.task_type]:
            raise ValueError(f"loss {self.loss!r} is {'classification' if self.loss == 'cross_entropy' else 'regression'}'s, "
                             f"not {self.task_type}'s (register a loss of your own for another pairing)")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {self.head_init!r}")
        if self.head_init == "prototypes" and (self.task_type != "classification" or self.algorithm == "reptile"):
            raise ValueError("head_init 'prototypes' needs a classification task and an algorithm with a query loss (not reptile)")

    def to_dict(self) -> dict:
        config = asdict(self)
        if config["loss"] == DEFAULT_LOSSES[self.task_type]:
            del config["loss"]  # (the task's own loss, said by omission: checkpoints older releases can load)
        return config


@dataclass
class StepResult:
    """What one meta-step measured: means over the meta-batch, and each task's query loss and accuracy.

    ``loss`` is the query loss after the last inner step (what validation reports too); with MAML++'s
    multi-step loss, ``grads`` are those of its weighted sum over the steps, which the loss is not."""

    loss: float
    accuracy: float | None
    grads: Params = field(repr=False)
    task_losses: list[float] = field(default_factory=list, repr=False)
    task_accuracies: list[float] | None = field(default=None, repr=False)


def multi_step_loss_weights(steps: int, iteration: int, anneal_iterations: int) -> torch.Tensor:
    """MAML++ importance of the query loss after each inner step.

    Starts uniform and moves linearly towards the final step over
    ``anneal_iterations``, every earlier step keeping at least ``0.03 / steps``;
    from then on only the final step's loss counts (Antoniou et al., 2019, whose
    code counts epochs where this counts meta-iterations). In float64: the objective casts them to the
    losses' type (float32 weights put a 3e-8 relative error into a float64 model's meta-gradient).
    """
    weights = torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if steps == 1:
        return weights
    if iteration >= anneal_iterations:
        return torch.nn.functional.one_hot(torch.tensor(steps - 1), steps).to(weights.dtype)
    decay = iteration / (steps * max(anneal_iterations, 1))
    floor = 0.03 / steps
    weights[:-1] = torch.clamp(weights[:-1] - decay, min=floor)
    weights[-1] = min(1.0 / steps + decay * (steps - 1), 1.0 - (steps - 1) * floor)
    return weights


def _escape(name: str) -> str:
    return name.replace(".", "__")


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # F.mse_loss broadcasts [N, 1] outputs against [N] targets into an [N, N] comparison (with a warning).
    if outputs.shape != targets.shape:
        raise ValueError(f"regression targets of shape {list(targets.shape)} for outputs of shape {list(outputs.shape)}: "
                         "give each example's targets the shape of its outputs (e.g. [N, 1] for one value)")
    return F.mse_loss(outputs, targets)


# The losses a MetaConfig may name: f(outputs [N, outputs], targets [N] labels or [N, outputs]) -> a scalar
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"cross_entropy": F.cross_entropy, "mse": _mse}
DEFAULT_LOSSES = {"classification": "cross_entropy", "regression": "mse"}


def register_loss(name: str, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
    """Make ``fn(outputs, targets) -> scalar`` a loss that ``MetaConfig(loss=name)`` may name, for the inner and
    the outer loop alike; usable as a decorator. ``targets`` are one task's labels ``[N]`` (int64) for a
    classification model, its targets ``[N, outputs]`` for regression. The function must be made of torch
    operations (the inner loop differentiates it twice for MAML, under ``vmap``), and a checkpoint names it,
    so whatever loads one (``metalearn eval``, the service) imports the module that registers it
    (``METALEARN_MODEL_MODULES``), as for architectures::

        @metalearn.register_loss("smoothed")
        def smoothed(logits, labels):
            return F.cross_entropy(logits, labels, label_smoothing=0.1)

        learner = MetaLearner(model, MetaConfig("maml", loss="smoothed"))
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a loss name must be a non-empty string, got {name!r}")
    if name in DEFAULT_LOSSES.values():
        raise ValueError(f"{name!r} is a built-in loss; register yours under another name")

    def register(function):
        if not callable(function):
            raise TypeError(f"register_loss({name!r}) takes a function of (outputs, targets), got {function!r}")
        known = LOSSES.get(name, function)
        if not same_definition(known, function):
            raise ValueError(f"loss {name!r} is already registered for {known.__module__}.{known.__qualname__}")
        LOSSES[name] = function
        return function

    return register if fn is None else register(fn)


def accuracy_of(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(dim=-1) == labels).float().mean()


class MetaLearner(nn.Module):
    """A model plus the extra meta-parameters its algorithm learns.

    ``learner.parameters()`` is what the meta-optimiser updates: the model's
    initialisation, and per algorithm the learned inner learning rates
    (``lrs``) or the task encoder. ``nn.BatchNorm`` layers are replaced by the
    per-batch :class:`metalearn.models.BatchNorm` (running statistics have no
    meaning when every task adapts its own parameters).
    """

    def __init__(self, model: nn.Module, config: MetaConfig | None = None):
        super().__init__()
        self.config = config or MetaConfig()
        self.model = convert_batchnorm(model)
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        self.adapt_names = head_parameter_names(model) if self.config.algorithm == "anil" else trainable
        if not self.adapt_names:
            what = "the model's head has" if self.config.algorithm == "anil" else "the model has"
            raise ValueError(f"{what} no trainable parameters to adapt (none, or all requires_grad=False): "
                             "meta-learning would change nothing")
        # Models that expose body/head with forward = head(body(x)) let ANIL
        # compute the body once per task instead of once per inner step.
        self.head_only = (
            self.config.algorithm == "anil"
            and isinstance(getattr(model, "body", None), nn.Module)
            and head_module_name(model) == "head"
        )
        cfg = self.config
        params = dict(model.named_parameters())
        if cfg.algorithm == "metasgd":
            self.lrs = nn.ParameterDict(
                {_escape(n): nn.Parameter(torch.full_like(params[n], cfg.inner_lr)) for n in self.adapt_names}
            )
        elif cfg.learn_step_lrs:
            self.lrs = nn.ParameterDict(
                {_escape(n): nn.Parameter(torch.full((cfg.inner_steps,), cfg.inner_lr, dtype=params[n].dtype, device=params[n].device))
                 for n in self.adapt_names}
            )
        if cfg.algorithm == "tamaml":
            head = model.get_submodule(head_module_name(model))
            if not isinstance(head, nn.Linear):
                raise ValueError("tamaml needs the model's head to be an nn.Linear (its input is the task embedding)")
            like_head = {"dtype": head.weight.dtype, "device": head.weight.device}  # (a float64 model's encoder is float64)
            self.task_encoder = nn.Sequential(
                nn.Linear(head.in_features, cfg.encoder_hidden, **like_head),
                nn.ReLU(),
                nn.Linear(cfg.encoder_hidden, len(self.adapt_names), **like_head),
            )
            # Small last layer: scales start near 1 (2 * sigmoid(0)) yet every
            # encoder weight gets a gradient from the first step.
            nn.init.normal_(self.task_encoder[2].weight, std=1e-2)
            nn.init.zeros_(self.task_encoder[2].bias)
        if cfg.head_init == "prototypes":
            head_name = head_module_name(model)
            if not isinstance(model.get_submodule(head_name), nn.Linear) or head_name + ".weight" not in self.adapt_names:
                raise ValueError("head_init 'prototypes' needs the model's head to be an nn.Linear that adapts")
        self._loss = LOSSES[cfg.loss]
        self.meta_steps_taken = 0  # meta_step calls: the default iteration (MAML++'s annealing counts it)

    # ------------------------------------------------------------------
    # Parameter dicts
    # ------------------------------------------------------------------
    def meta_params(self) -> Params:
        """Every meta-parameter detached (views of the same storage: an optimiser step changes them), keyed like
        ``named_parameters``."""
        return {name: p.detach() for name, p in self.named_parameters()}

    def buffers_dict(self) -> Params:
        return dict(self.model.named_buffers())

    @staticmethod
    def model_params(meta_params: Params) -> Params:
        return {name[len("model.") :]: p for name, p in meta_params.items() if name.startswith("model.")}

    # ------------------------------------------------------------------
    # Forward passes
    # ------------------------------------------------------------------
    def forward_with(self, params: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
        outputs = functional_call(self.model, (params, buffers), (x,))
        if not isinstance(outputs, torch.Tensor):  # (a tuple or a dict: an AttributeError deep inside the loss before)
            raise TypeError(f"the model's forward returned a {type(outputs).__name__}; metalearn needs one tensor of "
                            "outputs [N, outputs] (logits or values): return it alone, or wrap the model in a module that does")
        return outputs

    def body_features(self, params: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
        """The input of the head for ``x``: the task embedding and ANIL's fixed features."""
        return self._features_and_outputs(params, buffers, x)[0]

    def _features_and_outputs(self, params: Params, buffers: Params, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        head = self.model.get_submodule(head_module_name(self.model))
        captured: list[torch.Tensor] = []
        handle = head.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0]))
        try:
            outputs = self.forward_with(params, buffers, x)
        finally:
            handle.remove()
        return captured[0].flatten(1), outputs

    def check_head_only(self, x: torch.Tensor) -> None:
        """ANIL runs the body once and adapts the head on its features, which is the model only if its
        forward is ``head(body(x))``: checked once, on ``x`` (one task's inputs), before anything trains or
        adapts on the shortcut (a model that scales or transforms the head's output would otherwise be
        trained on one function and predict with another)."""
        if not self.head_only or getattr(self, "_head_only_checked", False):
            return
        params, buffers = self.model_params(self.meta_params()), self.buffers_dict()
        training = self.model.training
        self.model.eval()  # (dropout off: the two ways must see the same function)
        try:
            with torch.no_grad():
                features, full = self._features_and_outputs(params, buffers, x)
                shortcut = self.head_forward({n: p for n, p in params.items() if n in self.adapt_names}, features)
        finally:
            self.model.train(training)
        if full.shape != shortcut.shape or not torch.allclose(full, shortcut, rtol=1e-4, atol=1e-5):
            raise ValueError("anil: the model's forward(x) is not head(body(x)), which ANIL computes (the body once, "
                             "the head adapted on its features); make forward return self.head(self.body(x)), or "
                             "use another algorithm (maml, fomaml) for this model")
        self._head_only_checked = True
        self._outputs_width = full.shape[-1]  # (what outputs_width would run the model once more for)

    def check_targets(self, y: torch.Tensor, stacked: bool = False) -> torch.Tensor:
        """One task's labels or targets (``stacked``: a stack of tasks'), checked for what would otherwise
        train on the wrong thing or fail deep inside: classification labels are one integer class index per
        example (``[S]``; int32 taken as int64), regression targets one row per example (``[S, outputs]``,
        e.g. ``[S, 1]`` for one value). Returns them as the loss takes them. (Shapes and dtypes only: the
        values' range is checked by ``metalearn.batching.check_label_range``, for meta-batches and adaptation.)"""
        lead = "[T, S" if stacked else "[S"
        if self.config.task_type == "classification":
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise ValueError(f"classification labels must be integer class indices, got {y.dtype} "
                                 "(for real-valued targets, use task_type='regression')")
            if y.dim() != (2 if stacked else 1):
                raise ValueError(f"classification labels are one class index per example, shape {lead}], got "
                                 f"{list(y.shape)}" + ("" if stacked else " (for a stack of tasks, adapt each task or use adapt_many)"))
            return y.long()
        if y.dim() < (3 if stacked else 2):
            raise ValueError(f"regression targets are one row per example, shape {lead}, outputs] (e.g. {lead}, 1] for "
                             f"one value), got {list(y.shape)}")
        return y

    def outputs_width(self, x: torch.Tensor) -> int:
        """How many outputs (classes) the model gives per example, found once from one task's inputs ``x``."""
        if getattr(self, "_outputs_width", None) is None:
            self._outputs_width = self.probe(x).shape[-1]
        return self._outputs_width

    def probe(self, x: torch.Tensor) -> torch.Tensor:
        """The model's outputs for ``x``, in eval mode (dropout off; a layer of the user's that keeps statistics
        leaves them as they are), on copies of the buffers (a forward that changes one in place, whatever the
        mode, changes the copy), without autograd: a look at the model that leaves it as it was."""
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                buffers = {name: buffer.clone() for name, buffer in self.buffers_dict().items()}
                return self.forward_with(self.model_params(self.meta_params()), buffers, x)
        finally:
            self.model.train(training)

    def head_forward(self, head_params: Params, features: torch.Tensor) -> torch.Tensor:
        prefix = "head."
        return functional_call(self.model.head, {n[len(prefix) :]: p for n, p in head_params.items()}, (features,))

    def _task_forward(
        self, params: Params, buffers: Params, x: torch.Tensor, features: torch.Tensor | None = None
    ) -> Callable[[Params], torch.Tensor]:
        """Forward of one task's inputs ``x`` as a function of the adapted parameters (``features``:
        ``x``'s body features at ``params``, if already computed)."""
        frozen = {n: p for n, p in params.items() if n not in self.adapt_names}
        if self.head_only:
            features = self.body_features(params, buffers, x) if features is None else features
            return lambda fast: self.head_forward(fast, features)
        return lambda fast: self.forward_with({**frozen, **fast}, buffers, x)

    # ------------------------------------------------------------------
    # Inner loop
    # ------------------------------------------------------------------
    def initial_fast(
        self, meta_params: Params, buffers: Params, support_x: torch.Tensor, support_y: torch.Tensor,
        features: torch.Tensor | None = None,
    ) -> Params:
        """Where the inner loop starts: the meta-learned values of the adapted parameters, with the
        head set from the support set's class means when ``config.head_init`` is ``prototypes``
        (``features``: as for :meth:`inner_loop`)."""
        params = self.model_params(meta_params)
        if features is None:
            features = self._support_features(params, buffers, support_x)
        return self.start_from_features(params, features, support_y)

    def _support_features(self, params: Params, buffers: Params, support_x: torch.Tensor) -> torch.Tensor | None:
        """Body features of the support set when something needs them (ANIL's head-only loop, prototypes,
        the Task-Adaptive encoder's embedding), computed once for all of them."""
        if self.head_only or self.config.head_init == "prototypes" or self.config.algorithm == "tamaml":
            return self.body_features(params, buffers, support_x)
        return None

    def start_from_features(self, params: Params, features: torch.Tensor | None, support_y: torch.Tensor) -> Params:
        """:meth:`initial_fast` given the support set's body ``features`` (needed for prototypes only)."""
        fast = {n: params[n] for n in self.adapt_names}
        if self.config.head_init != "prototypes":
            return fast
        head = head_module_name(self.model)
        ways = fast[head + ".weight"].shape[0]
        # One-hot by comparison (vmap-friendly); a class absent from the support set gets a zero row.
        onehot = (support_y.unsqueeze(-1) == torch.arange(ways, device=support_y.device)).to(features.dtype)
        prototypes = (onehot.transpose(0, 1) @ features) / onehot.sum(0).clamp_min(1).unsqueeze(-1)
        # logits 2 p.f - |p|^2 rank classes like -|f - p|^2: the nearest class mean
        fast[head + ".weight"] = 2 * prototypes
        if head + ".bias" in fast:
            fast[head + ".bias"] = -(prototypes * prototypes).sum(-1)
        return fast

    def _lr_scales(self, meta_params: Params, features: torch.Tensor | None):
        if self.config.algorithm != "tamaml":
            return None
        embedding = features.mean(0).detach()
        encoder = {n[len("task_encoder.") :]: p for n, p in meta_params.items() if n.startswith("task_encoder.")}
        return 2.0 * torch.sigmoid(functional_call(self.task_encoder, encoder, (embedding,)))

    @property
    def learned_lrs(self) -> bool:
        """Whether the inner learning rates are meta-learned (Meta-SGD's, one per parameter element; with
        ``learn_step_lrs``, one per step): ``step_lr`` reads them unless overridden. Told by the ``lrs`` that
        ``__init__`` creates for them, so that a new variant that learns its rates is decided in one place."""
        return isinstance(getattr(self, "lrs", None), nn.ParameterDict)

    def step_lr(self, meta_params: Params, name: str, step: int, override: float | None):
        """The inner learning rate of parameter ``name`` at ``step``: ``override``, else the learned
        (Meta-SGD, per-step) or configured one."""
        if override is not None:
            return override
        cfg = self.config
        if cfg.algorithm == "metasgd":
            return meta_params["lrs." + _escape(name)]
        if cfg.learn_step_lrs:
            per_step = meta_params["lrs." + _escape(name)]
            return per_step[min(step, per_step.shape[0] - 1)]
        return cfg.inner_lr

    def inner_loop(
        self,
        meta_params: Params,
        buffers: Params,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        *,
        steps: int,
        create_graph: bool,
        lr_override: float | None = None,
        use_autograd: bool = False,
        features: torch.Tensor | None = None,
    ) -> tuple[list[Params], list[torch.Tensor]]:
        """Adapt on the support set; returns the adapted parameters after each step and the support losses.

        ``create_graph=False`` takes every inner gradient at detached
        parameters (first order: no second-order graph is built).
        ``use_autograd`` differentiates with the autograd engine instead of
        ``torch.func``, so that ``config.checkpoint_inner`` can recompute each
        step in the backward pass (``torch.func`` does not support
        checkpointing). ``features``: the support set's body features at
        ``meta_params`` (:meth:`body_features`), when the caller has them.
        """
        params = self.model_params(meta_params)
        if features is None:
            features = self._support_features(params, buffers, support_x)
        forward = self._task_forward(params, buffers, support_x, features)
        scales = self._lr_scales(meta_params, features)
        differentiate = autograd_differentiate if use_autograd else _func_differentiate
        names = list(self.adapt_names)

        def one_step(step: int, *fast_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            fast = dict(zip(names, fast_values))
            grads, loss = differentiate(lambda p: self._loss(forward(p), support_y), fast, create_graph)
            updated = []
            for index, name in enumerate(names):
                lr = self.step_lr(meta_params, name, step, lr_override)
                if scales is not None:
                    lr = lr * scales[index]
                updated.append(fast[name] - lr * grads[name])
            return (*updated, loss)

        checkpointed = use_autograd and self.config.checkpoint_inner and create_graph
        start = self.start_from_features(params, features, support_y)
        fast_values = tuple(start[n] for n in names)
        trajectory, losses = [], []
        for step in range(steps):
            if checkpointed:
                out = torch.utils.checkpoint.checkpoint(one_step, step, *fast_values, use_reentrant=False)
            else:
                out = one_step(step, *fast_values)
            fast_values, loss = out[:-1], out[-1]
            trajectory.append(dict(zip(names, fast_values)))
            losses.append(loss)
        return trajectory, losses

    # ------------------------------------------------------------------
    # Per-task objectives (pure; run per task by metalearn.batching)
    # ------------------------------------------------------------------
    def task_gradient_fn(self, iteration: int = 0, use_autograd: bool = False):
        """``f(meta_params, buffers, sx, sy, qx, qy) -> (grads, (loss, accuracy))`` for one task."""
        cfg = self.config
        if cfg.algorithm == "reptile":
            return self._reptile_task
        first_order = cfg.first_order or iteration < cfg.first_order_iterations
        weights = (  # (annealed: the final step's loss alone, without the other steps' query forwards)
            multi_step_loss_weights(cfg.inner_steps, iteration, cfg.multi_step_loss_iterations)
            if cfg.multi_step_loss and iteration < cfg.multi_step_loss_iterations
            else None
        )

        def objective(meta_params, buffers, support_x, support_y, query_x, query_y):
            # Second order differentiates the inner gradients again: attention (nn.MultiheadAttention, the
            # Transformer layers) then runs on the math kernel, the one whose backward has a derivative
            # (flash attention's has none: "derivative for ..._flash_attention_for_cpu_backward is not implemented").
            with contextlib.nullcontext() if first_order else sdpa_kernel(SDPBackend.MATH):
                trajectory, _ = self.inner_loop(
                    meta_params,
                    buffers,
                    support_x,
                    support_y,
                    steps=cfg.inner_steps,
                    create_graph=not first_order,
                    use_autograd=use_autograd,
                )
                forward = self._task_forward(self.model_params(meta_params), buffers, query_x)
                if weights is None:
                    outputs = forward(trajectory[-1])
                    loss = self._loss(outputs, query_y)
                else:
                    per_step = [forward(fast) for fast in trajectory]
                    outputs = per_step[-1]
                    losses = torch.stack([self._loss(out, query_y) for out in per_step])
                    loss = (weights.to(losses) * losses).sum()
            metrics = (self._loss(outputs, query_y).detach(), self._accuracy(outputs, query_y))
            return loss, metrics

        if not use_autograd:
            with_value = grad_and_value(objective, has_aux=True)

            def func_gradient(*args):
                grads, (_, metrics) = with_value(*args)
                return grads, metrics

            return func_gradient

        def autograd_gradient(meta_params, *task):
            leaves = {n: p.detach().requires_grad_() for n, p in meta_params.items()}
            loss, metrics = objective(leaves, *task)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            return _fill_missing(dict(zip(leaves, grads)), leaves), metrics

        return autograd_gradient

    def _reptile_task(self, meta_params, buffers, support_x, support_y, query_x, query_y):
        cfg = self.config
        trajectory, _ = self.inner_loop(
            meta_params, buffers, support_x, support_y, steps=cfg.inner_steps, create_graph=False
        )
        params = self.model_params(meta_params)
        adapted = trajectory[-1] if trajectory else {n: params[n] for n in self.adapt_names}
        # theta - theta': an optimiser step of size epsilon on this moves theta
        # to theta + epsilon * (theta' - theta), Reptile's update.
        grads = {n: torch.zeros_like(p) for n, p in meta_params.items()}
        for name in self.adapt_names:
            grads["model." + name] = (params[name] - adapted[name]).detach()
        outputs = self._task_forward(params, buffers, query_x)(adapted)
        metrics = (self._loss(outputs, query_y).detach(), self._accuracy(outputs, query_y))
        return grads, metrics

    def _accuracy(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.config.task_type != "classification":
            return torch.zeros((), device=outputs.device)
        return accuracy_of(outputs, labels).detach()

    # ------------------------------------------------------------------
    # The training-loop surface
    # ------------------------------------------------------------------
    def meta_gradient(self, batch, iteration: int | None = None, strategy: str | None = None) -> StepResult:
        """Mean meta-gradient over the tasks of ``batch`` (a ``TaskBatch``), without touching ``.grad``.

        ``iteration`` (what MAML++'s annealing and ``first_order_iterations`` count) defaults to the
        number of :meth:`meta_step` calls so far; pass it when resuming a run."""
        from metalearn.batching import run_meta_batch

        iteration = self.meta_steps_taken if iteration is None else iteration
        strategy = strategy or self.config.strategy
        result = run_meta_batch(self, batch, iteration=iteration, strategy=strategy)
        # Frozen parameters (requires_grad=False, an affine=False BatchNorm's): their gradients are left
        # out, so an optimiser given learner.parameters() leaves them as they are.
        frozen = {name for name, p in self.named_parameters() if not p.requires_grad}
        if frozen:
            result.grads = {name: g for name, g in result.grads.items() if name not in frozen}
        return result

    def meta_step(self, batch, optimizer: torch.optim.Optimizer, iteration: int | None = None, reduce_grads=None) -> StepResult:
        """Compute the meta-gradient, clip it if configured, and take one optimiser step.

        The meta-gradient is added to what ``.grad`` already holds (a regulariser's gradient, say), as
        ``loss.backward()`` would. ``optimizer`` must update every trainable parameter of the learner
        (``learner.parameters()``: with Meta-SGD or MAML++ the learned learning rates too); freeze one with
        ``requires_grad_(False)`` instead of leaving it out. ``iteration`` as in :meth:`meta_gradient`.
        ``reduce_grads`` (e.g. an all-reduce across processes) is applied to the gradients before clipping.
        """
        self._check_optimizer(optimizer)
        if not self.training and not getattr(self, "_warned_eval_mode", False):
            self._warned_eval_mode = True
            warnings.warn("meta_step on a learner in eval mode (load_checkpoint returns one so): dropout is off while "
                          "it trains; call learner.train() first", stacklevel=2)
        result = self.meta_gradient(batch, iteration=iteration)
        self.meta_steps_taken += 1
        named = dict(self.named_parameters())
        for name, grad in result.grads.items():
            param = named[name]
            grad = grad.to(param.dtype)
            param.grad = grad if param.grad is None else param.grad + grad
        if reduce_grads is not None:
            reduce_grads([p for p in self.parameters() if p.grad is not None])
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.parameters(), self.config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return result

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        # A parameter the optimiser does not hold would get a gradient and never move: a Meta-SGD
        # learner's learning rates under Adam(model.parameters()) stay at their initial value, silently.
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in self.named_parameters() if p.requires_grad and id(p) not in held]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise ValueError(f"the optimizer does not update {shown}: give it learner.parameters() (not the model's), "
                             "or freeze what should stay fixed with requires_grad_(False)")


def _func_differentiate(loss_of: Callable[[Params], torch.Tensor], fast: Params, create_graph: bool):
    if not create_graph:
        # First order: the inner gradient is a constant. Detaching the adapted tensors is not enough: the
        # loss also reads tensors that are not adapted (ANIL's body features), and under an outer
        # torch.func transform the gradient kept its dependence on them (ANIL first order's body
        # meta-gradient was up to 100% off under vmap, not in the loop, whose autograd.grad keeps none).
        grads, loss = grad_and_value(loss_of)({n: p.detach() for n, p in fast.items()})
        return {n: g.detach() for n, g in grads.items()}, loss
    return grad_and_value(loss_of)(fast)


def autograd_differentiate(loss_of: Callable[[Params], torch.Tensor], fast: Params, create_graph: bool):
    """The autograd-engine way to differentiate the support loss (used with activation checkpointing)."""
    if create_graph:
        # Fresh views make every adapted tensor its own variable: the gradient with respect to one
        # leaves out paths through the others even when one was computed from another (a head
        # initialised from the body's class means), as torch.func's grad does.
        fast = {n: p.view_as(p) for n, p in fast.items()}
    else:
        fast = {n: p.detach().requires_grad_() for n, p in fast.items()}
    loss = loss_of(fast)
    grads = torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph)
    return dict(zip(fast, grads)), loss.detach()


def _fill_missing(grads: dict, reference: Params) -> Params:
    return {n: (g if g is not None else torch.zeros_like(reference[n])) for n, g in grads.items()}


__all__ = [
    "ALGORITHMS",
    "MetaConfig",
    "MetaLearner",
    "StepResult",
    "multi_step_loss_weights",
    "accuracy_of",
    "register_loss",
    "norm_statistics",
]
