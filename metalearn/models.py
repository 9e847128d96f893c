"""Reference architectures and the BatchNorm that meta-learning needs.

Every model here is a plain ``torch.nn.Module``; the algorithms never call a
hand-written functional forward, they run the module through
``torch.func.functional_call`` with a dict of (possibly adapted) parameters.

Both reference models are split into a ``body`` (feature extractor) and a
``head`` (the last linear layer): ANIL adapts only the head and the
Task-Adaptive variant embeds a task by the mean body feature of its support
set. Any other module works too: the head is then its last ``nn.Linear``.

Models are rebuilt from a small JSON-able spec, which is what checkpoints
store::

    model = build_model({"arch": "conv4", "in_channels": 1, "image_size": 28,
                         "channels": 64, "out_features": 5})
    assert build_model(model.spec).spec == model.spec

A model class of your own gets a spec, and can be checkpointed and served, by
registering it under a name (its constructor's arguments become the spec)::

    @register_architecture("tiny-cnn")
    class TinyCNN(nn.Module):
        def __init__(self, out_features: int = 5, width: int = 16): ...

    TinyCNN(width=8).spec  # {"arch": "tiny-cnn", "out_features": 5, "width": 8}

A process that loads such a checkpoint (``metalearn eval``, the service) must
import the module that registers it first: ``METALEARN_MODEL_MODULES``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import traceback
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.first_block import first_block, fuses, transformed

# --------------------------------------------------------------------------
# BatchNorm with per-batch statistics
# --------------------------------------------------------------------------


@dataclass
class _NormStatistics:
    """What BatchNorm layers do with their statistics inside ``norm_statistics``."""

    record: bool
    stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


_NORM_MODE: ContextVar[_NormStatistics | None] = ContextVar("metalearn_norm_mode", default=None)


def _channels_last(x: torch.Tensor) -> bool:
    """A plain 4-D CPU tensor stored channels-last (and not also NCHW-contiguous)."""
    return (
        x.dim() == 4 and x.device.type == "cpu" and not transformed(x)
        and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    )


def batch_moments(x: torch.Tensor, dims) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of ``x`` over ``dims`` (kept), in two passes: the statistics
    :class:`BatchNorm` records. On the CPU ``torch.var_mean`` is 5-20x slower for Conv4's shapes."""
    mean = x.mean(dims, keepdim=True)
    return mean, (x - mean).square().mean(dims, keepdim=True)


class BatchNorm(nn.Module):
    """BatchNorm over the current batch, without running statistics.

    MAML normalises with the statistics of the batch being processed
    (``track_running_stats=False``). Training uses ``F.batch_norm``: its fused
    kernel is about twice as fast in the second-order backward as the same
    layer written from mean/var ops, and it is exact here because every
    strategy differentiates *inside* ``vmap`` (the torch 2.13 error appears
    only when a second-order gradient is taken outside it).

    At test time the statistics can be recorded on the support set and reused
    for the queries (see :func:`norm_statistics`), so a query's prediction does
    not depend on the other queries that come with it.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = _NORM_MODE.get()
        if mode is None:
            if _channels_last(x):
                # The same normalisation on the [N*H*W, C] view: F.batch_norm's channels-last
                # CPU kernels take 2-3x its NCHW time in the second-order backward, the 2-D
                # ones about the NCHW time.
                n, c, h, w = x.shape
                rows = F.batch_norm(x.permute(0, 2, 3, 1).reshape(-1, c), None, None, self.weight, self.bias, training=True, eps=self.eps)
                return rows.view(n, h, w, c).permute(0, 3, 1, 2)
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        shape = [1, -1] + [1] * (x.dim() - 2)
        if mode.record:
            mean, var = batch_moments(x, [0] + list(range(2, x.dim())))
            mode.stats[self] = (mean, var)
        else:
            mean, var = mode.stats[self]
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


@contextlib.contextmanager
def norm_statistics(
    model: nn.Module, stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Record BatchNorm statistics (``stats=None``) or normalise with given ones.

    Recording yields a dict filled, when the block exits, with ``{layer name:
    (mean, var)}`` of every :class:`BatchNorm` the forward passed through::

        with norm_statistics(model) as stats:
            model(support_x)
        with norm_statistics(model, stats):
            model(query_x)          # normalised with the support statistics
    """
    names = {module: name for name, module in model.named_modules() if isinstance(module, BatchNorm)}
    if stats is None:
        mode = _NormStatistics(record=True)
        recorded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        token = _NORM_MODE.set(mode)
        try:
            yield recorded
        finally:
            _NORM_MODE.reset(token)
        recorded.update({names[module]: value for module, value in mode.stats.items() if module in names})
    else:
        by_module = {module: stats[name] for module, name in names.items() if name in stats}
        missing = [name for name in names.values() if name not in stats]
        if missing:
            raise ValueError(f"no BatchNorm statistics for layers {missing}")
        token = _NORM_MODE.set(_NormStatistics(record=False, stats=by_module))
        try:
            yield dict(stats)
        finally:
            _NORM_MODE.reset(token)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, BatchNorm) for m in model.modules())


def convert_batchnorm(model: nn.Module, like: torch.Tensor | None = None) -> nn.Module:
    """Replace ``nn.BatchNorm1d/2d/3d`` layers by :class:`BatchNorm`, in place.

    Running statistics have no meaning when every task adapts its own
    parameters, so meta-learning normalises per batch; affine weights are kept.
    A replacement takes the device and dtype of the layer it replaces (of
    ``like``, by default the model's first parameter, for a layer with neither
    weights nor running statistics).
    """
    if like is None:
        like = next((t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()), None)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            own = next((t for t in [*child.parameters(), *child.buffers()] if t.is_floating_point()), like)
            factory = {} if own is None else {"device": own.device, "dtype": own.dtype}
            replacement = BatchNorm(child.num_features, eps=child.eps, **factory)
            if child.affine:
                with torch.no_grad():
                    replacement.weight.copy_(child.weight)
                    replacement.bias.copy_(child.bias)
            else:
                replacement.weight.requires_grad_(False)
                replacement.bias.requires_grad_(False)
            setattr(model, name, replacement)
        else:
            convert_batchnorm(child, like)
    return model


# --------------------------------------------------------------------------
# Reference architectures
# --------------------------------------------------------------------------


class MLP(nn.Module):
    """Fully connected ReLU network, e.g. 1-40-40-1 for sinusoid regression. Inputs ``[N, in_features]``, or
    ``[N, *shape]`` of ``in_features`` values each (flattened: 28x28 pictures without a channel axis)."""

    def __init__(self, in_features: int = 1, hidden: tuple[int, ...] | list[int] = (40, 40), out_features: int = 1):
        super().__init__()
        if min([in_features, *hidden, out_features]) < 1:  # (torch builds a layer of width 0, which learns nothing)
            raise ValueError(f"MLP sizes must be >= 1, got in_features={in_features}, hidden={list(hidden)}, out_features={out_features}")
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)
        self.in_features = in_features
        self.spec = {"arch": "mlp", "in_features": in_features, "hidden": list(hidden), "out_features": out_features}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 2 and x.shape[1:].numel() == self.in_features:  # ([N, 1, 784] too: not a batch of rows)
            x = x.flatten(1)
        return self.head(self.body(x))


class Conv4(nn.Module):
    """The 4-block convolutional network of the MAML paper.

    Each block: 3x3 convolution, per-batch BatchNorm, ReLU, 2x2 max-pool; then a
    linear head on the flattened features (64 features for 28x28 inputs).
    The max-pool runs before the ReLU: the same function (ReLU is monotone, so
    it commutes with max), with the ReLU and its backward on a 4x smaller tensor.
    On the CPU the first block runs fused (``metalearn.first_block``): the same
    function, differentiable to any order, without most full-resolution passes,
    and the blocks after it run channels-last.
    """

    def __init__(self, in_channels: int = 1, out_features: int = 5, channels: int = 64, image_size: int = 28):
        super().__init__()
        if min(in_channels, out_features, channels) < 1:
            raise ValueError(f"Conv4 sizes must be >= 1, got in_channels={in_channels}, out_features={out_features}, channels={channels}")
        blocks: list[nn.Module] = []
        width, size = in_channels, image_size
        for _ in range(4):
            blocks += [
                nn.Conv2d(width, channels, 3, padding=1),
                BatchNorm(channels),
                nn.MaxPool2d(2),
                nn.ReLU(),
            ]
            width, size = channels, size // 2
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for 4 pooling blocks")
        blocks.append(nn.Flatten())
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(channels * size * size, out_features)
        self.spec = {
            "arch": "conv4",
            "in_channels": in_channels,
            "image_size": image_size,
            "channels": channels,
            "out_features": out_features,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, norm = self.body[0], self.body[1]
        if _NORM_MODE.get() is None and x.device.type == "cpu" and x.dim() == 4 and not x.requires_grad and fuses(conv, *x.shape[-2:]):
            # The same function as the modules below, several times faster on the CPU
            # (see metalearn/first_block.py); BatchNorm's recording modes take the plain path.
            # Channels-last from there on (outside torch.func transforms): on the CPU the
            # 64-channel convolutions run faster in it and F.max_pool2d's NCHW kernel is ~15x
            # slower than its channels-last one; a Conv4 meta-step gains 7-16%.
            channels_last = not (transformed(x) or transformed(conv.weight))
            h, _, _ = first_block(x, conv, conv.weight, conv.bias, norm.weight, norm.bias, norm.eps, channels_last=channels_last)
            return self.head(self.body[4:](h.permute(0, 3, 1, 2) if channels_last else h.transpose(0, 1)))
        return self.head(self.body(x))


_BUILT_IN = {"mlp": MLP, "conv4": Conv4}
_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = dict(_BUILT_IN)
MODEL_MODULES_VARIABLE = "METALEARN_MODEL_MODULES"


def same_definition(a: Any, b: Any) -> bool:
    """Whether two classes or functions are one definition (the same module and qualified name): one defined again,
    re-running a notebook cell or importing a module twice, replaces its registration instead of clashing with it."""
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def register_architecture(name: str) -> Callable:
    """Class decorator: checkpoints may name this model class ``name``, and its instances get a ``spec``.

    The spec is ``{"arch": name, **constructor arguments}`` (defaults filled in),
    which is what a checkpoint stores and :func:`build_model` calls the class
    with again, so the arguments must be JSON values (numbers, strings, lists,
    dicts). Instances of an unregistered subclass get no spec: they could not be
    rebuilt as this class. ::

        @metalearn.register_architecture("tiny-cnn")
        class TinyCNN(nn.Module):
            def __init__(self, out_features: int = 5, width: int = 16): ...
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"an architecture name must be a non-empty string, got {name!r}")
    if name in _BUILT_IN:
        raise ValueError(f"{name!r} is a built-in architecture; register yours under another name")

    def register(cls):
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"register_architecture({name!r}) decorates an nn.Module subclass, got {cls!r}")
        known = _ARCHITECTURES.get(name, cls)
        if not same_definition(known, cls):
            raise ValueError(f"architecture {name!r} is already registered for {known!r}")
        other = next((n for n, c in _ARCHITECTURES.items() if n != name and same_definition(c, cls)), None)
        if other is not None:  # its instances' spec can name only one
            raise ValueError(f"{cls.__qualname__} is already registered as {other!r}")
        signature = inspect.signature(cls.__init__)
        parameters = list(signature.parameters.values())[1:]  # after self
        if any(p.kind is p.VAR_POSITIONAL for p in parameters):
            raise TypeError(f"{cls.__qualname__}.__init__ takes *args: a spec needs every argument named")
        if any(p.name == "arch" for p in parameters):
            raise TypeError(f"{cls.__qualname__}.__init__ takes an argument named 'arch', which the spec uses for the name")
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            if type(self) is cls:  # (a subclass's own registration, if any, writes its spec after this)
                bound = signature.bind(self, *args, **kwargs)
                bound.apply_defaults()
                arguments = dict(list(bound.arguments.items())[1:])
                for p in parameters:
                    if p.kind is p.VAR_KEYWORD:
                        arguments.update(arguments.pop(p.name))
                self.spec = {"arch": name, **arguments}

        cls.__init__ = __init__
        _ARCHITECTURES[name] = cls
        return cls

    return register


def import_model_modules(modules: str) -> None:
    """Import the comma-separated Python ``modules`` that register architectures (``METALEARN_MODEL_MODULES``).

    The names come from whoever runs the process, never from a checkpoint: a
    checkpoint can only name an architecture that is registered already."""
    for module in filter(None, (m.strip() for m in modules.split(","))):
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - any failure of the user's module, said in one line
            name = getattr(error, "name", None) if isinstance(error, ModuleNotFoundError) else None
            if name and (module == name or module.startswith(name + ".")):  # the module itself is not found
                hint = f" (a module's name, not its file's: {module[:-3]!r})" if module.endswith(".py") else ""
                raise ValueError(f"{MODEL_MODULES_VARIABLE}: no module named {name!r}{hint}; is the directory that "
                                 "holds it on PYTHONPATH?") from None
            raise ValueError(f"{MODEL_MODULES_VARIABLE}: importing {module!r} failed: {_raised_where(error)}") from None


def _raised_where(error: BaseException) -> str:
    """``Type: message`` and where the innermost frame raised it (``file:line``)."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


def build_model(spec: dict) -> nn.Module:
    """Rebuild a model from its JSON-able ``spec``: a reference architecture, or a registered one."""
    if not isinstance(spec, dict) or "arch" not in spec:
        raise ValueError(f"model spec must be a dict with an 'arch' key, got {spec!r}")
    kwargs = dict(spec)
    cls = architecture(kwargs.pop("arch"))
    try:
        return cls(**kwargs)
    except TypeError as error:  # (arguments it does not take, or of a type it cannot use: {"hidden": 5})
        raise ValueError(f"bad model spec {spec!r}: {error}") from None


def architecture(arch: Any) -> Callable[..., nn.Module]:
    """The class registered as ``arch``, or an error that says how to register one."""
    if not isinstance(arch, str) or arch not in _ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(_ARCHITECTURES)}. A model class of your own "
                         f"is known once the module that registers it (metalearn.register_architecture) is imported: "
                         f"in Python, import it first; for metalearn train, eval and serve, name it in "
                         f"{MODEL_MODULES_VARIABLE} (comma-separated; read at start: a new architecture needs a restart)")
    return _ARCHITECTURES[arch]


def head_module_name(model: nn.Module) -> str:
    """Name of the module ANIL adapts: ``head`` if the model has one, else its last Linear."""
    if isinstance(getattr(model, "head", None), nn.Module):
        return "head"
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError("model has neither a 'head' attribute nor an nn.Linear layer to use as head")
    return linears[-1]


def head_parameter_names(model: nn.Module) -> list[str]:
    """The head's trainable parameters: what ANIL adapts (a frozen one stays as it is)."""
    prefix = head_module_name(model) + "."
    return [name for name, p in model.named_parameters() if name.startswith(prefix) and p.requires_grad]
