"""Fast batched kernels for the common case: ANIL on a Conv4-style model (classification).

ANIL adapts only the linear head, so a request's work is one body forward of
its support set (recording its BatchNorm statistics), a few closed-form
softmax-regression gradient steps on the head, and one body forward of the
queries normalised with the support statistics. Here the body runs **once for
the whole micro-batch**: the request dimension is folded into the image batch
for convolutions (shared weights), BatchNorm statistics are taken per request,
and the head steps are batched matrix products. The result is mathematically
what ``metalearn.adaptation.adapt``/``predict`` compute (the service tests
compare them), and sessions have the same tensors (head parameters and the
per-layer ``(mean, var)`` in the shape ``BatchNorm`` records).

:class:`FastFull` does the same for MAML-family models that adapt every
parameter: per-request convolution weights run as one grouped convolution, the
inner loop is first order (test-time adaptation needs no second-order graph).

Both run the first block (a conv with few input channels at full resolution,
the memory-bound part on a CPU) as one fused computation, the same one
``Conv4`` uses in training (``metalearn/first_block.py``). A MAML session's
prediction computed alone runs instead on oneDNN's packed convolutions
(``FastFull.pack``), block by block where they measure faster on this machine
(``FastFull.packed_blocks``): on some CPUs they win for one request of a few
images, on others they lose, and on some they win for one block and lose for
the next.

Anything else (other algorithms, learned learning rates, other architectures)
goes through the generic ``adapt_many``/``predict_many``.
"""

from __future__ import annotations

import functools
import logging
import threading
import time

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.adaptation import Adaptation
from metalearn.first_block import WindowColumns, first_block, fuses, pooled_product, window_columns
from metalearn.models import BatchNorm, Conv4, batch_moments

log = logging.getLogger("service.fastpath")


def max_pool2(h: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(h, 2)`` as two elementwise maxima of strided views: the same values, several times
    faster on the CPU than the NCHW max-pool kernel (which also computes indices)."""
    height, width = h.shape[-2] // 2 * 2, h.shape[-1] // 2 * 2
    rows = torch.maximum(h[..., 0:height:2, :width], h[..., 1:height:2, :width])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def _blocks(model: nn.Module):
    """``[(conv, conv_name, bn, bn_name)]`` if ``model.body`` is conv -> BatchNorm -> ReLU/MaxPool2d(2) blocks + Flatten.

    The layers' exact classes, not subclasses (whose forward may differ), and zero padding: the kernels call
    ``F.conv2d`` themselves, so a ``padding_mode`` of ``reflect`` would be lost."""
    body = getattr(model, "body", None)
    if type(body) is not nn.Sequential or type(getattr(model, "head", None)) is not nn.Linear:
        return None
    layers = list(body.named_children())
    if not layers or type(layers[-1][1]) is not nn.Flatten or (layers[-1][1].start_dim, layers[-1][1].end_dim) != (1, -1):
        return None
    layers = layers[:-1]
    if len(layers) % 4:
        return None
    blocks = []
    for i in range(0, len(layers), 4):
        (cn, conv), (bn_name, bn), (_, third), (_, fourth) = layers[i : i + 4]
        # ReLU and max-pool commute (ReLU is monotone): accept either order.
        relu, pool = (third, fourth) if type(third) is nn.ReLU else (fourth, third)
        if not (type(conv) is nn.Conv2d and conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)):
            return None
        if not (type(bn) is BatchNorm and type(relu) is nn.ReLU and type(pool) is nn.MaxPool2d):
            return None
        if not (pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2)) and pool.padding in (0, (0, 0))):
            return None
        if pool.dilation not in (1, (1, 1)) or pool.ceil_mode:
            return None
        blocks.append((conv, "body." + cn, bn, "body." + bn_name))
    return blocks


def _forward_is_head_of_body(model: nn.Module, input_shape) -> bool:
    """Whether ``model``'s forward computes ``head(body(x))``, as the kernels do: Conv4's own forward, or one
    that gives the same on random inputs of ``input_shape``, pixels and values far outside them (a forward that
    also scales, or clamps, its input or its logits does not: the kernels would answer for another function
    than the one trained)."""
    if type(model).forward is Conv4.forward:
        return True
    if input_shape is None:
        return False
    weight, generator = model.head.weight, torch.Generator().manual_seed(0)
    # Pixels in [0, 1), and values far outside them (a forward that clamps its input, say, agrees on pixels alone).
    probes = (torch.rand(2, *input_shape, generator=generator), 10 * torch.randn(2, *input_shape, generator=generator))
    try:
        with torch.no_grad():
            return all(torch.allclose(model(x), model.head(model.body(x)), rtol=1e-4, atol=1e-5)
                       for x in (p.to(weight.device, weight.dtype) for p in probes))
    except Exception:  # noqa: BLE001 - a forward that does not run on such inputs is not head(body(x)) as far as we know
        return False


def _inputs(blocks, x: torch.Tensor) -> torch.Tensor | WindowColumns:
    """What the kernels' forward passes take for images ``x`` [R, N, C, H, W]: their window columns when
    the first block fuses (so an inner loop computes them once), else ``x``."""
    conv = blocks[0][0]
    return window_columns(x, conv) if fuses(conv, x.shape[-2], x.shape[-1]) else x


def _first_block(columns: WindowColumns, P: dict, conv: nn.Conv2d, conv_name: str, bn: BatchNorm, bn_name: str, stats: dict | None, record: bool, recorded: dict, channels_last: bool = False) -> torch.Tensor:
    """The first block for R requests, fused (metalearn/first_block.py): the window columns of
    ``x`` [R, N, C, H, W] -> [R, C', N, H/2, W/2] (or [R, N, H/2, W/2, C'] with ``channels_last``).

    BatchNorm statistics are kept per request as ``[R, 1, C', 1, 1]`` (what ``BatchNorm`` records, stacked).
    """
    R = columns.cols.shape[0]
    given = None if stats is None else tuple(t.reshape(R, -1) for t in stats[bn_name])
    weight, bias = P[conv_name + ".weight"], P.get(conv_name + ".bias")
    out, mean, var = first_block(columns, conv, weight, bias, P[bn_name + ".weight"], P[bn_name + ".bias"], bn.eps, given, channels_last)
    if record:
        recorded[bn_name] = (mean.view(R, 1, -1, 1, 1), var.view(R, 1, -1, 1, 1))
    return out


# ---------------------------------------------------------------------------
# ANIL: the body once per micro-batch, the head in closed form
# ---------------------------------------------------------------------------
def supports(learner) -> bool:
    cfg = learner.config
    return (
        cfg.algorithm == "anil"
        and cfg.loss == "cross_entropy"  # (its head steps are cross-entropy's gradient in closed form)
        and learner.head_only
        and _blocks(learner.model) is not None
        and set(learner.adapt_names) == {"head.weight", "head.bias"}
    )


def _request_moments(h: torch.Tensor, R: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per request and channel of ``h`` [R*N, C, H, W], as ``[R, 1, C, 1, 1]``.
    A channels-last ``h`` is reduced as its [R, N*H*W, C] view (contiguous)."""
    C = h.shape[1]
    if h.is_contiguous(memory_format=torch.channels_last):
        mean, var = batch_moments(h.permute(0, 2, 3, 1).reshape(R, -1, C), 1)
        return mean.view(R, 1, C, 1, 1), var.view(R, 1, C, 1, 1)
    return batch_moments(h.unflatten(0, (R, -1)), (1, 3, 4))


class FastAnil:
    traceable_adapt = True  # tensor operations only, no autograd: the engine may replay a trace (service.cpu_traces)

    def __init__(self, learner):
        self.learner = learner
        self.blocks = _blocks(learner.model)
        self.meta_params = learner.meta_params()  # with the learned per-step learning rates, if any
        self.params = learner.model_params(self.meta_params)
        # How a session's prediction computed alone runs: as a MAML session's does (FastFull.prepare: each
        # block's BatchNorm, with the session's statistics, folded into constants made once per session,
        # packed in the blocks where that measures faster); the same computation as predict's, to float
        # rounding. A batch of sessions keeps predict, whose convolutions run once for all of them with the
        # weights they share. One thread, a lone Conv4-64 session predict of 5 images on an AVX2 EPYC: 1.7
        # against 2.5 ms. (Made here, not on first use: two workers would each make one and measure.)
        self.alone = FastFull(learner)

    @torch.no_grad()
    def body(self, x: torch.Tensor, stats: dict | None = None, record: bool = False):
        """Features ``[R, N, F]`` of ``x`` ``[R, N, C, H, W]``; BatchNorm with per-request batch statistics, or ``stats``."""
        R, N = x.shape[:2]
        recorded = {}
        blocks = self.blocks
        x = _inputs(blocks, x)
        if isinstance(x, WindowColumns):
            # Shared weights broadcast over the request dimension. Channels-last from here on:
            # the convolutions run 8-11% faster per request in it (batches of 8-16, one thread).
            h = _first_block(x, self.params, *blocks[0], stats, record, recorded, channels_last=True)  # [R, N, H, W, C]
            h = h.flatten(0, 1).permute(0, 3, 1, 2)
            blocks = blocks[1:]
        else:
            h = x.reshape(R * N, *x.shape[2:])
        for conv, conv_name, bn, bn_name in blocks:
            h = F.conv2d(h, self.params[conv_name + ".weight"], self.params.get(conv_name + ".bias"), conv.stride, conv.padding, conv.dilation)
            hr = h.unflatten(0, (R, N))
            if stats is None:
                mean, var = _request_moments(h, R)
                if record:
                    recorded[bn_name] = (mean, var)
            else:
                mean, var = stats[bn_name]
            scale = torch.rsqrt(var + bn.eps) * self.params[bn_name + ".weight"].view(1, 1, -1, 1, 1)
            shift = self.params[bn_name + ".bias"].view(1, 1, -1, 1, 1) - mean * scale
            h = torch.relu_(max_pool2(torch.addcmul(shift, hr, scale).flatten(0, 1)))
        return h.reshape(R, N, -1), recorded

    @staticmethod
    def head(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(bias.unsqueeze(1), features, weight.transpose(1, 2))

    @torch.no_grad()
    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int, lr: float | None) -> Adaptation:
        learner = self.learner
        R, N = support_y.shape
        features, stats = self.body(support_x, record=True)
        if learner.config.head_init == "prototypes":
            # The learner's own start (class means), per request.
            start = torch.func.vmap(lambda f, y: learner.start_from_features(self.params, f, y))(features, support_y)
            weight, bias = start["head.weight"], start["head.bias"]
        else:
            weight = self.params["head.weight"].expand(R, -1, -1).clone()
            bias = self.params["head.bias"].expand(R, -1).clone()
        onehot = F.one_hot(support_y, weight.shape[1]).to(features.dtype)
        losses = []
        for step in range(steps):
            logits = self.head(weight, bias, features)
            log_probs = torch.log_softmax(logits, -1)
            losses.append(-(log_probs * onehot).sum(-1).mean(-1))
            dlogits = (log_probs.exp() - onehot) / N  # d mean-CE / d logits
            weight = weight - learner.step_lr(self.meta_params, "head.weight", step, lr) * torch.bmm(dlogits.transpose(1, 2), features)
            bias = bias - learner.step_lr(self.meta_params, "head.bias", step, lr) * dlogits.sum(1)
        after = -(torch.log_softmax(self.head(weight, bias, features), -1) * onehot).sum(-1).mean(-1)
        before = losses[0] if losses else after
        # BatchNorm records (mean, var) of shape [1, C, 1, 1] per request: stacked [R, 1, C, 1, 1].
        return Adaptation({"head.weight": weight, "head.bias": bias}, stats, before, after)

    @torch.no_grad()
    def predict(self, adaptation: Adaptation, query_x: torch.Tensor, transductive: bool = False) -> torch.Tensor:
        features, _ = self.body(query_x, stats=None if transductive else adaptation.norm_stats)
        return self.head(adaptation.params["head.weight"], adaptation.params["head.bias"], features)


# ---------------------------------------------------------------------------
# MAML family: every parameter adapts, per-request weights as grouped convolutions
# ---------------------------------------------------------------------------
def supports_full(learner) -> bool:
    """MAML-family models that adapt every parameter of a conv-block model with a fixed SGD learning rate."""
    cfg = learner.config
    names = {n for n, p in learner.model.named_parameters()}
    return (
        cfg.algorithm in ("maml", "fomaml", "reptile")
        and cfg.loss == "cross_entropy"
        and not cfg.learn_step_lrs
        and cfg.head_init == "learned"
        and _blocks(learner.model) is not None
        and set(learner.adapt_names) == names
    )


def _conv_grouped(h: torch.Tensor, R: int, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d) -> torch.Tensor:
    """Per-request convolution in the layout ``[N, R*C, H, W]`` (request r owns channels r*C..(r+1)*C-1).

    ``weight`` [R, O, C, k, k] -> output [N, R*O, H', W']: one grouped convolution (groups = R).
    """
    O = weight.shape[1]
    return F.conv2d(h, weight.flatten(0, 1), None if bias is None else bias.reshape(R * O), conv.stride, conv.padding, conv.dilation, R)


def _grouped_layout(h: torch.Tensor) -> torch.Tensor:
    """[R, N, H, W, C] -> [N, R*C, H, W] in channels-last memory (what the grouped convolutions run fastest on).
    Rows of C contiguous values move, so the copy and its backward stream through memory."""
    R, N, H, W, C = h.shape
    return h.permute(1, 2, 3, 0, 4).reshape(N, H, W, R * C).permute(0, 3, 1, 2)


def _per_request(param: torch.Tensor, R: int) -> torch.Tensor:
    """``R`` copies of ``param``; a conv weight [O, C, kh, kw] as [R, O, C, kh, kw] in memory [R, O, kh, kw, C],
    so that flattened to [R*O, C, kh, kw] it is channels-last: the layout the grouped convolutions take
    (otherwise converted on every call). The SGD updates keep it."""
    if param.dim() != 4:
        return param.expand(R, *param.shape).clone()
    O, C, kh, kw = param.shape
    return torch.empty(R, O, kh, kw, C, dtype=param.dtype, device=param.device).permute(0, 1, 4, 2, 3).copy_(param)


def _packable(conv: nn.Conv2d) -> bool:
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and conv.groups == 1


@functools.cache
def _packed_conv(padding: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]):
    """``conv2d(x, W, b)`` for a weight :func:`_pack_weight` made: oneDNN's convolution
    (``mkldnn::_convolution_pointwise``, the op torch's own inference compilation uses), as a TorchScript
    function so that the engine's traces can record it (the tracer cannot write the op's ``Scalar?[]``
    argument; a function's graph can). Without the ReLU the op can fuse: oneDNN's fused ReLU makes a NaN 0,
    so a query that overflowed a convolution (values near float32's limit) got the prediction of a blank
    input where every other path answers "Prediction not finite"; :func:`packed_block` applies the ReLU
    after the pool instead, to a quarter of the values, in the same time."""
    graph = torch._C.parse_ir(f"""graph(%x : Tensor, %w : Tensor, %b : Tensor):
  %padding : int[] = prim::Constant[value={list(padding)}]()
  %stride : int[] = prim::Constant[value={list(stride)}]()
  %dilation : int[] = prim::Constant[value={list(dilation)}]()
  %groups : int = prim::Constant[value=1]()
  %attr : str = prim::Constant[value="none"]()
  %scalars : Scalar?[] = prim::ListConstruct()
  %algorithm : NoneType = prim::Constant()
  %y : Tensor = mkldnn::_convolution_pointwise(%x, %w, %b, %padding, %stride, %dilation, %groups, %attr, %scalars, %algorithm)
  return (%y)""")
    return torch._C._create_function_from_graph(f"conv_{'_'.join(map(str, padding + stride + dilation))}", graph)


def packed_block(conv: nn.Conv2d, h: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``relu(max_pool(conv(h, weight) + shift))``, a block with its BatchNorm folded into ``weight`` (packed by
    :func:`_pack_weight`, or dense) and ``shift``, on oneDNN's convolution (:func:`_packed_conv`)."""
    convolution = _packed_conv(tuple(conv.padding), tuple(conv.stride), tuple(conv.dilation))
    return torch.relu_(F.max_pool2d(convolution(h, weight, shift), 2))


def _pack_weight(weight: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A conv weight ``[O, C, kh, kw]`` in oneDNN's own blocked layout (an opaque ``mkldnn`` tensor of the same
    size): an ordinary weight is reordered into it by every call."""
    dense = weight.contiguous(memory_format=torch.channels_last).to_mkldnn()
    return torch._C._nn.mkldnn_reorder_conv2d_weight(dense, list(conv.padding), list(conv.stride), list(conv.dilation), 1, None)


@functools.cache
def packed_convolutions() -> bool:
    """Whether this process runs :func:`_packed_conv` (a CPU build with oneDNN, an op of this torch
    version): tried once on a tiny convolution against ``F.conv2d``."""
    try:
        conv = nn.Conv2d(2, 3, 3, padding=1)
        x = torch.rand(1, 2, 4, 4)
        with torch.no_grad():
            packed = _packed_conv((1, 1), (1, 1), (1, 1))(x, _pack_weight(conv.weight, conv), conv.bias)
            return torch.allclose(packed, conv(x), atol=1e-5)
    except Exception:  # noqa: BLE001 - no oneDNN, or the op changed: the dense path serves
        return False


class _ChannelsLastBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm (batch statistics, no running ones) of a channels-last ``[N, C, H, W]`` tensor, as
    ``F.batch_norm`` computes it, to float32's precision. Torch's own channels-last kernel sums each channel in
    one running total, forward and backward: 1e-6 relative error at best (1e-7 contiguous), growing with a
    channel's mean against its spread (4e-3 at mean/std 1000). Ten inner steps at lr 0.4 amplified that to
    probabilities 5.8e-2 away from offline adaptation (found by a fuzz of the service against offline
    ``metalearn.adapt``). Here every sum is over the ``[N*H*W, C]`` view's rows, which torch's reductions
    sum in blocks, the variance from centred values (two passes), and the backward is BatchNorm's own
    formula over the same sums. It costs 2.5% of a compiled Conv4-64 MAML request in process (one thread), 5% of
    MAML's throughput at concurrency 16 over HTTP (docs/service-performance.md).
    (``metalearn.models.BatchNorm`` runs torch's kernel on that view, as precise as the channels-last one, where
    it runs outside torch.func, in a second-order backward: it keeps that kernel's speed there.)"""

    @staticmethod
    def forward(ctx, h, weight, bias, eps):
        N, C, H, W = h.shape
        rows = h.permute(0, 2, 3, 1).reshape(-1, C)  # (channels-last: a view)
        centred = rows - rows.mean(0)
        invstd = torch.rsqrt(centred.square().mean(0) + eps)
        normalised = centred.mul_(invstd)
        ctx.save_for_backward(normalised, invstd, weight)
        return torch.addcmul(bias, normalised, weight).view(N, H, W, C).permute(0, 3, 1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable  # (first order only: what it saved carries no graph)
    def backward(ctx, grad):
        normalised, invstd, weight = ctx.saved_tensors
        N, C, H, W = grad.shape
        rows = grad.permute(0, 2, 3, 1).reshape(-1, C)
        count = rows.shape[0]
        grad_bias = rows.sum(0)
        grad_weight = (rows * normalised).sum(0)
        grad_h = torch.addcmul(rows - grad_bias / count, normalised, grad_weight / count, value=-1).mul_(weight * invstd)
        return grad_h.view(N, H, W, C).permute(0, 3, 1, 2), grad_weight, grad_bias, None


class FastFull:
    """Batched first-order adaptation of every parameter, one computation for the whole micro-batch.

    Activations live in the layout ``[N, R*C, H, W]`` (channels-last in memory):
    per-request convolutions are one grouped convolution, and per-request
    BatchNorm over (N, H, W) is BatchNorm over that tensor's channels
    (:class:`_ChannelsLastBatchNorm`, forward and backward). The first block, when it has few
    input channels, runs fused (``metalearn.first_block``).
    """

    traceable_adapt = False  # the inner loop takes gradients with autograd, which the tracer refuses (service.cpu_scripts compiles it)

    def __init__(self, learner):
        self.learner = learner
        self.blocks = _blocks(learner.model)
        self.names = list(learner.adapt_names)
        self.params = {n: p.detach() for n, p in learner.model.named_parameters()}
        param = next(iter(self.params.values()))  # oneDNN packs float32 CPU weights of plain convolutions
        self._packable_weights = param.device.type == "cpu" and param.dtype == torch.float32 and all(_packable(c) for c, *_ in self.blocks)
        self._packed_blocks: dict[int, frozenset[int]] = {}  # query images (up to PACKING_MEASURED) -> blocks measured faster packed
        self._measuring = threading.Lock()

    def forward(self, P: dict, x: torch.Tensor | WindowColumns, record: bool = False):
        """Logits ``[R, N, out]`` with parameters ``P`` (each ``[R, ...]``), BatchNorm on each request's batch
        statistics (recorded with ``record``, as ``BatchNorm`` does), and the recorded statistics."""
        recorded = {}
        blocks = self.blocks
        if isinstance(x, WindowColumns):
            R, N = x.cols.shape[0], x.images
            h = _grouped_layout(_first_block(x, P, *blocks[0], None, record, recorded, channels_last=True))
            blocks = blocks[1:]
        else:
            R, N = x.shape[:2]
            h = x.transpose(0, 1).reshape(N, R * x.shape[2], *x.shape[3:]).contiguous(memory_format=torch.channels_last)
        for conv, conv_name, bn, bn_name in blocks:
            h = _conv_grouped(h, R, P[conv_name + ".weight"], P.get(conv_name + ".bias"), conv)
            h = h.contiguous(memory_format=torch.channels_last)
            C = h.shape[1] // R
            weight, bias = P[bn_name + ".weight"].reshape(R * C), P[bn_name + ".bias"].reshape(R * C)
            if not record:
                h = _ChannelsLastBatchNorm.apply(h, weight, bias, bn.eps)
            else:
                # Record the statistics and normalise with them, as BatchNorm's recording does (one
                # pass over h for both; recording is the adaptation's last forward, without autograd).
                mean, var = batch_moments(h.permute(0, 2, 3, 1).reshape(-1, R * C), 0)  # h is channels-last: a view
                recorded[bn_name] = (mean.view(R, 1, C, 1, 1), var.view(R, 1, C, 1, 1))
                h = F.batch_norm(h, mean.reshape(R * C), var.reshape(R * C), weight, bias, False, 0.0, bn.eps)
            # max-pool and ReLU commute (ReLU is monotonic): pooling first leaves ReLU a quarter of the work.
            h = torch.relu(F.max_pool2d(h, 2))
        features = h.contiguous().view(N, R, -1).transpose(0, 1)
        logits = torch.baddbmm(P["head.bias"].unsqueeze(1), features, P["head.weight"].transpose(1, 2))
        return logits, recorded

    @staticmethod
    def _losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape).mean(1)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int, lr: float | None) -> Adaptation:
        lr = self.learner.config.inner_lr if lr is None else lr
        R = support_x.shape[0]
        fast = {n: _per_request(self.params[n], R) for n in self.names}
        support = _inputs(self.blocks, support_x)
        losses = []
        for _ in range(steps):
            with torch.enable_grad():
                leaves = {n: p.requires_grad_() for n, p in fast.items()}
                loss = self._losses(self.forward(leaves, support)[0], support_y)
                grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
            losses.append(loss.detach())
            with torch.no_grad():
                fast = {n: torch.add(p.detach(), g, alpha=-lr) for (n, p), g in zip(leaves.items(), grads)}
        with torch.no_grad():
            logits, stats = self.forward(fast, support, record=True)
            after = self._losses(logits, support_y)
        before = losses[0] if losses else after
        return Adaptation(fast, stats, before, after)

    @torch.no_grad()
    def predict(self, adaptation: Adaptation, query_x: torch.Tensor, transductive: bool = False) -> torch.Tensor:
        if not transductive:
            return self.predict_prepared(self.prepare(adaptation), query_x)
        P = {**{n: p.expand(query_x.shape[0], *p.shape) for n, p in self.params.items()}, **adaptation.params}
        return self.forward(P, _inputs(self.blocks, query_x))[0]

    @torch.no_grad()
    def prepare(self, adaptation: Adaptation) -> dict[str, torch.Tensor]:
        """What predictions with the adaptation's BatchNorm statistics compute with, per request ``[R, ...]``:
        each block's conv weight, and its conv bias and BatchNorm as one per-channel map
        ``scale * conv(x, W) + shift`` (``scale = gamma / sqrt(var + eps)``, ``shift = beta + scale * (b - mean)``).
        The first block's weight carries sign(scale) and its scale is ``|scale|``: max-pool commutes with a
        positive scale, so the fused block pools first. The engine makes these once per session
        (``Session.prepared``): made in every prediction, their small operations cost 50 us of a 0.7 ms
        Conv4 prediction (``bench/experiments/folded_batchnorm.py``)."""
        R = adaptation.params["head.weight"].shape[0]  # every parameter adapts: each has a request dimension
        P = {**{n: p.expand(R, *p.shape) for n, p in self.params.items()}, **adaptation.params}
        prepared = {"head.weight": P["head.weight"], "head.bias": P["head.bias"]}
        for index, (_, conv_name, bn, bn_name) in enumerate(self.blocks):
            mean, var = (t.reshape(R, -1) for t in adaptation.norm_stats[bn_name])
            scale = P[bn_name + ".weight"] * torch.rsqrt(var + bn.eps)
            bias = P.get(conv_name + ".bias")
            shift = P[bn_name + ".bias"] + scale * (-mean if bias is None else bias - mean)
            if index == 0:
                sign = torch.where(scale < 0, -1.0, 1.0)
                weight, scale = (P[conv_name + ".weight"] * sign[:, :, None, None, None]).contiguous(), scale.abs()
                prepared[conv_name + ".weight"] = weight
            elif conv_name + ".weight" in adaptation.params:
                prepared[conv_name + ".weight"] = P[conv_name + ".weight"]
            # (else the model's own weight, which _conv_weight reads: ANIL's body. Among the prepared tensors,
            # a session would count it as its own: 440 KB a Conv4-64 ANIL session, against 3 KB of tensors.)
            prepared.update({bn_name + ".scale": scale, bn_name + ".shift": shift})
        return prepared

    def _conv_weight(self, constants: dict[str, torch.Tensor], conv_name: str, R: int) -> torch.Tensor:
        """Block ``conv_name``'s conv weight ``[R, O, C, kh, kw]`` for :meth:`prepare`'s constants: theirs, or
        the model's where the weight does not adapt."""
        weight = constants.get(conv_name + ".weight")
        return self.params[conv_name + ".weight"].expand(R, -1, -1, -1, -1) if weight is None else weight

    def can_pack(self) -> bool:
        """Whether :meth:`pack` applies: a float32 model on the CPU whose convolutions oneDNN runs packed."""
        return self._packable_weights and packed_convolutions()

    PACKING_MEASURED = 16  # a lone prediction of more query images decides as one of this many did

    def packed_blocks(self, query_x: torch.Tensor) -> frozenset[int]:
        """Which blocks a lone prediction of ``query_x`` ``[N, C, H, W]`` should run packed (:meth:`pack`):
        none where packing does not apply, else those whose packed computation measured faster than with
        the plain constants for this many images (up to ``PACKING_MEASURED``) in this process, once. Which
        wins depends on the CPU, the block and the model: packed, a lone Conv4-64 session predict of 5 images
        took 595 against 750 us on one machine (convolutions at about 270 GFLOP/s on a core); on an AVX2
        EPYC (93 GFLOP/s) the first block took 250 against 399 us packed and the 64-channel convolution at
        7x7 3253 against 273 us (``bench/experiments/packed_convolutions.py``)."""
        if not self.can_pack():
            return frozenset()
        images = min(query_x.shape[0], self.PACKING_MEASURED)
        known = self._packed_blocks.get(images)
        if known is not None:  # (without the lock: a known answer never waits for another count's measurement)
            return known
        with self._measuring:  # (workers arriving together: one measures, the others wait for its answer)
            if images not in self._packed_blocks:
                self._packed_blocks[images] = self._measure_packed_blocks(query_x[:images])
            return self._packed_blocks[images]

    def _measure_packed_blocks(self, query_x: torch.Tensor, runs: int = 9) -> frozenset[int]:
        """Times each block of a prediction of ``query_x`` with the meta-parameters' constants (unit BatchNorm
        statistics: the time does not depend on the values), plain and packed in turn, and compares the
        fastest runs after the first two of each: a service measures this while it starts and compiles,
        and other work inflates some runs (from 2.5 to 15 ms for a whole prediction in three starts of a
        Conv4 service on a noisy 2-core machine), not the least of several."""
        example = Adaptation(
            params={n: self.params[n].unsqueeze(0) for n in self.names},
            norm_stats={bn_name: (torch.zeros(1, bn.num_features), torch.ones(1, bn.num_features)) for _, _, bn, bn_name in self.blocks},
            support_loss_before=torch.zeros(1), support_loss_after=torch.zeros(1))
        plain = self.prepare(example)
        ways = {"plain": plain, "packed": self.pack(plain)}
        h, packs, report = query_x.unsqueeze(0), set(), []
        with torch.no_grad():
            for index in range(len(self.blocks)):
                times: dict[str, list[float]] = {way: [] for way in ways}
                for _ in range(runs):
                    for way, constants in ways.items():
                        start = time.perf_counter()
                        out = self._block(index, constants, h)
                        times[way].append(time.perf_counter() - start)
                plain_s, packed_s = (min(times[way][2:]) for way in ways)
                if packed_s < plain_s:
                    packs.add(index)
                report.append(f"{1e6 * packed_s:.0f} against {1e6 * plain_s:.0f} us")
                h = out
        log.info("a lone prediction of %d query image(s), each block packed against plain: %s; packing blocks %s",
                 query_x.shape[0], ", ".join(report), sorted(packs) or "none")
        return frozenset(packs)

    def pack(self, prepared: dict[str, torch.Tensor], blocks: frozenset[int] | None = None) -> dict[str, torch.Tensor]:
        """:meth:`prepare`'s tensors for one request (``R = 1``) with the ``blocks`` given (every block by default)
        as oneDNN runs them fastest on some CPUs (:meth:`packed_blocks` measures which on this one): the
        block's ``scale`` folded into its conv weight, packed (:func:`_pack_weight`), and ``shift`` as the
        conv's bias, so that the block is one convolution, then the max-pool and the ReLU (:func:`packed_block`). The
        first block too: for one request of a few images, oneDNN's convolution of its input channel and
        the pool took 109 against 183 us for 5 Omniglot images on one machine, 250 against 399 us on
        another, where the fused block from window columns wins on batches and in training. A lone
        Conv4-64 session predict packed whole computed in 595 against 750 us on the first machine
        (``bench/experiments/packed_convolutions.py``), for 200 us of packing once per session predicted
        alone (``Session.prepared``) and a second copy of the packed conv weights (434 KB for all four
        blocks), which the session store counts. Logits differ from the plain constants' by float rounding (1e-6)."""
        assert prepared["head.weight"].shape[0] == 1, "pack takes one request's tensors"
        blocks = frozenset(range(len(self.blocks))) if blocks is None else blocks
        packed = {"head.weight": prepared["head.weight"], "head.bias": prepared["head.bias"]}
        for index, (conv, conv_name, _, bn_name) in enumerate(self.blocks):
            if index not in blocks:
                packed.update({name: prepared[name] for name in (conv_name + ".weight", bn_name + ".scale", bn_name + ".shift") if name in prepared})
                continue
            weight = self._conv_weight(prepared, conv_name, 1)[0] * prepared[bn_name + ".scale"][0].view(-1, 1, 1, 1)  # the first block's sign * |scale| too
            packed[conv_name + ".packed"] = _pack_weight(weight, conv)
            packed[bn_name + ".shift"] = prepared[bn_name + ".shift"][0].contiguous()
        return packed

    def _block(self, index: int, constants: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        """Block ``index`` of a prediction, ``relu(max_pool(scale * conv(h, W) + shift))``, with :meth:`prepare`'s
        or :meth:`pack`'s constants: ``h`` is the queries ``[R, N, C, H, W]`` for the first block, else the
        previous block's output; returns ``[N, R*C', H', W']`` (channels-last in memory)."""
        conv, conv_name, _, bn_name = self.blocks[index]
        if conv_name + ".packed" in constants:  # one request
            if index == 0:
                h = h[0].contiguous(memory_format=torch.channels_last)
            return packed_block(conv, h, constants[conv_name + ".packed"], constants[bn_name + ".shift"])
        scale, shift = constants[bn_name + ".scale"], constants[bn_name + ".shift"]
        if index == 0:
            R, N = h.shape[:2]
            x = _inputs(self.blocks, h)
            if isinstance(x, WindowColumns):
                pooled = pooled_product(constants[conv_name + ".weight"].flatten(-3), x, channels_last=True)  # [R, M, C]
                h = torch.addcmul(shift.unsqueeze(1), pooled, scale.unsqueeze(1)).relu_()
                return _grouped_layout(h.unflatten(1, (x.images, x.pooled_h, x.pooled_w)))
            h = x.transpose(0, 1).reshape(N, R * x.shape[2], *x.shape[3:]).contiguous(memory_format=torch.channels_last)
        R = scale.shape[0]
        h = _conv_grouped(h, R, self._conv_weight(constants, conv_name, R), None, conv)
        return torch.relu(F.max_pool2d(torch.addcmul(shift.reshape(-1, 1, 1), h, scale.reshape(-1, 1, 1)), 2))

    @torch.no_grad()
    def predict_prepared(self, prepared: dict[str, torch.Tensor], query_x: torch.Tensor) -> torch.Tensor:
        """Logits ``[R, N, out]`` for queries ``[R, N, C, H, W]`` from :meth:`prepare`'s tensors (or, for one
        request, :meth:`pack`'s): each block is ``relu(max_pool(scale * conv(h, W) + shift))``, what
        ``predict`` computes without query statistics."""
        h = query_x
        for index in range(len(self.blocks)):
            h = self._block(index, prepared, h)
        R, N = query_x.shape[:2]
        features = h.contiguous().view(N, R, -1).transpose(0, 1)  # Flatten's (C, H, W) order per request
        return torch.baddbmm(prepared["head.bias"].unsqueeze(1), features, prepared["head.weight"].transpose(1, 2))


def fast_kernel(learner, input_shape=None):
    """The fast batched kernel for ``learner``, or None when only the generic path applies (``input_shape``, one
    input's: what a model of another class than ``Conv4`` is tried on, to check that its forward is the kernels')."""
    kernel = FastAnil if supports(learner) else FastFull if supports_full(learner) else None
    if kernel is None or not _forward_is_head_of_body(learner.model, input_shape):
        return None
    return kernel(learner)
