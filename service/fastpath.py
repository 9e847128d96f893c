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
the memory-bound part on a CPU) as one fused computation with a hand-written
backward; see the comment above ``_first_block``.

Anything else (other algorithms, learned learning rates, other architectures)
goes through the generic ``adapt_many``/``predict_many``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.adaptation import Adaptation
from metalearn.models import BatchNorm


def max_pool2(h: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(h, 2)`` as two elementwise maxima of strided views: the same values, several times
    faster on the CPU than the NCHW max-pool kernel (which also computes indices)."""
    height, width = h.shape[-2] // 2 * 2, h.shape[-1] // 2 * 2
    rows = torch.maximum(h[..., 0:height:2, :width], h[..., 1:height:2, :width])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def _blocks(model: nn.Module):
    """``[(conv, conv_name, bn, bn_name)]`` if ``model.body`` is conv -> BatchNorm -> ReLU/MaxPool2d(2) blocks + Flatten."""
    body = getattr(model, "body", None)
    if not isinstance(body, nn.Sequential) or not isinstance(getattr(model, "head", None), nn.Linear):
        return None
    layers = list(body.named_children())
    if not layers or not isinstance(layers[-1][1], nn.Flatten):
        return None
    layers = layers[:-1]
    if len(layers) % 4:
        return None
    blocks = []
    for i in range(0, len(layers), 4):
        (cn, conv), (bn_name, bn), (_, third), (_, fourth) = layers[i : i + 4]
        # ReLU and max-pool commute (ReLU is monotone): accept either order.
        relu, pool = (third, fourth) if isinstance(third, nn.ReLU) else (fourth, third)
        if not (isinstance(conv, nn.Conv2d) and conv.groups == 1 and isinstance(bn, BatchNorm) and isinstance(relu, nn.ReLU)):
            return None
        if not (isinstance(pool, nn.MaxPool2d) and pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2)) and pool.padding in (0, (0, 0))):
            return None
        if pool.dilation not in (1, (1, 1)) or pool.ceil_mode:
            return None
        blocks.append((conv, "body." + cn, bn, "body." + bn_name))
    return blocks


# ---------------------------------------------------------------------------
# The first block (few input channels, full resolution), without full-resolution passes
# ---------------------------------------------------------------------------
# On the CPU the first block is memory-bound: its output has 64 channels at full
# resolution, and the generic path reads or writes that tensor a dozen times per
# step (conv bias, BatchNorm forward and backward, max-pool and its backward, layout
# copies). Three identities remove all but two of those passes:
#   * BatchNorm with batch statistics cancels the conv bias exactly (its gradient is 0);
#   * the statistics of y = W cols are quadratic forms of the small Gram matrix of
#     the unfolded input: mean = W m / n, E[y^2] = W G W^T / n;
#   * max-pool commutes with BatchNorm's per-channel affine map once sign(gamma) is
#     folded into the conv weights, so normalisation runs on the pooled tensor.
# The backward is then a few small products (Gram terms) plus one pooled-size
# product for the max-pool winners, instead of a full-resolution gradient.


def _conv_output_size(conv: nn.Conv2d, height: int, width: int) -> tuple[int, int]:
    """Output size of a stride-1 ``conv`` on ``height`` x ``width`` inputs."""
    return tuple(size + 2 * pad - dil * (k - 1) for size, pad, dil, k in zip((height, width), conv.padding, conv.dilation, conv.kernel_size))


def _first_block_applies(conv: nn.Conv2d, height: int, width: int) -> bool:
    """The fused first block needs a stride-1 conv with few inputs per output (the Gram matrix is K x K)
    and an even output size (every pixel belongs to one pooling window)."""
    k = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    if conv.stride != (1, 1) or k > 32 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    out_h, out_w = _conv_output_size(conv, height, width)
    return out_h % 2 == 0 and out_w % 2 == 0 and out_h > 0 and out_w > 0


def _window_cols(x: torch.Tensor, conv: nn.Conv2d) -> tuple[torch.Tensor, int, int]:
    """im2col of ``x`` [R, N, C, H, W] as ``cols`` [R, K, 4, N * H'/2 * W'/2], with the columns grouped by
    position in their 2x2 pooling window (row-major), so pooling compares contiguous blocks.
    Returns cols and the pooled size."""
    R, N = x.shape[:2]
    cols = F.unfold(x.flatten(0, 1), conv.kernel_size, dilation=conv.dilation, padding=conv.padding)
    K = cols.shape[1]
    out_h, out_w = _conv_output_size(conv, x.shape[3], x.shape[4])
    pooled_h, pooled_w = out_h // 2, out_w // 2
    grid = cols.view(R, N, K, pooled_h, 2, pooled_w, 2).permute(0, 2, 4, 6, 1, 3, 5)
    return grid.reshape(R, K, 4, N * pooled_h * pooled_w), pooled_h, pooled_w


def _max_pool_windows(y: torch.Tensor) -> torch.Tensor:
    """Max over dim 2 of ``y`` [R, C, 4, M] (the four elements of each 2x2 window)."""
    v00, v01, v10, v11 = y.unbind(2)
    return torch.maximum(torch.maximum(v00, v01), torch.maximum(v10, v11))


def _gram_statistics(cols: torch.Tensor, signed_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per request and channel, mean and variance of ``y = signed_weight @ cols`` over all columns,
    from the K x K Gram matrix of ``cols`` (float64: E[y^2] - mean^2 cancels). Also returns the Gram matrix
    and column sums (the backward reuses them)."""
    cols64 = cols.flatten(2).double()
    count = cols64.shape[2]
    gram = torch.bmm(cols64, cols64.transpose(1, 2))
    sums = cols64.sum(2)
    w64 = signed_weight.double()
    mean = torch.bmm(w64, sums.unsqueeze(-1)).squeeze(-1) / count
    var = ((torch.bmm(w64, gram) * w64).sum(2) / count - mean * mean).clamp_min(0)
    dtype = cols.dtype
    return mean.to(dtype), var.to(dtype), gram.to(dtype), sums.to(dtype)


def _float_mask(compare, a: torch.Tensor, b) -> torch.Tensor:
    """``compare(a, b)`` as 0.0/1.0 in ``a``'s dtype: on the CPU, writing a comparison straight into a float
    tensor is several times faster than a bool tensor and a cast (measured, torch 2.13)."""
    out = torch.empty_like(a)
    return compare(a, b, out=out)


class _FirstBlockBatchStats(torch.autograd.Function):
    """ReLU(max-pool(BatchNorm(conv))) with batch statistics per request.

    Inputs: ``cols`` [R, K, 4, M] (no gradient, see ``_window_cols``), ``signed_weight`` =
    sign(gamma) * W as [R, C, K], ``abs_gamma`` and ``beta`` [R, C]. Outputs the block
    [R, C, M] and the statistics of the (bias-free, signed) conv output. First order only:
    this serves test-time adaptation.
    """

    @staticmethod
    def forward(ctx, cols, signed_weight, abs_gamma, beta, eps: float):
        R, K, _, M = cols.shape
        y = torch.bmm(signed_weight, cols.view(R, K, 4 * M)).view(R, -1, 4, M)
        mean, var, gram, sums = _gram_statistics(cols, signed_weight)
        inv_std = torch.rsqrt(var + eps)
        pooled = _max_pool_windows(y)
        scale = abs_gamma * inv_std
        out = torch.addcmul((beta - mean * scale).unsqueeze(-1), pooled, scale.unsqueeze(-1)).clamp_min_(0)
        ctx.save_for_backward(cols, y, pooled, out, signed_weight, abs_gamma, inv_std, mean, gram, sums)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        cols, y, pooled, out, signed_weight, abs_gamma, inv_std, mean, gram, sums = ctx.saved_tensors
        count = cols.shape[2] * cols.shape[3]
        grad = grad_out * _float_mask(torch.gt, out, 0)  # through the ReLU
        grad_beta = grad.sum(2)
        grad_dot_pooled = torch.linalg.vecdot(grad, pooled)
        grad_abs_gamma = inv_std * (grad_dot_pooled - mean * grad_beta)
        # BatchNorm's backward is g_y = scatter(a * g) + c1 + c2 * y; its sums over the
        # (sparse) full-resolution gradient are taken on the pooled tensor, and
        # sum(y * cols) = W G, so only the scatter term touches per-pixel data.
        a = abs_gamma * inv_std
        c2 = -(abs_gamma * grad_abs_gamma / count) * inv_std * inv_std
        c1 = -(abs_gamma * grad_beta / count) * inv_std - c2 * mean
        grad_weight = c1.unsqueeze(-1) * sums.unsqueeze(1) + c2.unsqueeze(-1) * torch.bmm(signed_weight, gram)
        # The scatter term: each window's gradient goes to exactly one element holding its
        # max, the first in row-major order as F.max_pool2d's index. Windows tie often
        # (blank background, solid strokes), between equal patches, so only the "exactly one" matters.
        remaining = grad * a.unsqueeze(-1)
        for element in range(3):
            taken = remaining * _float_mask(torch.eq, y[:, :, element], pooled)
            grad_weight.baddbmm_(taken, cols[:, :, element].transpose(1, 2))
            remaining = remaining - taken
        grad_weight.baddbmm_(remaining, cols[:, :, 3].transpose(1, 2))
        return None, grad_weight, grad_abs_gamma, grad_beta, None


def _first_block(x: torch.Tensor, P: dict, conv: nn.Conv2d, conv_name: str, bn: BatchNorm, bn_name: str, stats: dict | None, record: bool, recorded: dict) -> torch.Tensor:
    """The first block for R requests: ``x`` [R, N, C, H, W] -> ReLU(max-pool(BatchNorm(conv(x)))) as [R, N, C', H/2, W/2].

    Same function as the module's block; see the comment above for why it is written this way.
    """
    R, N = x.shape[:2]
    cols, pooled_h, pooled_w = _window_cols(x, conv)
    weight = P[conv_name + ".weight"].flatten(2)  # [R, C', K]
    gamma, beta = P[bn_name + ".weight"], P[bn_name + ".bias"]
    bias = P.get(conv_name + ".bias")
    bias = torch.zeros_like(gamma) if bias is None else bias
    sign = torch.where(gamma < 0, -1.0, 1.0).to(gamma.dtype)
    signed_weight = weight * sign.unsqueeze(-1)
    if stats is None:
        out, mean, var = _FirstBlockBatchStats.apply(cols, signed_weight, gamma.abs(), beta, bn.eps)
        if record:
            # BatchNorm records the statistics of the conv output with its bias and sign.
            recorded[bn_name] = ((sign * mean + bias).view(R, 1, -1, 1, 1), var.view(R, 1, -1, 1, 1))
    else:
        recorded_mean, recorded_var = (t.reshape(R, -1) for t in stats[bn_name])
        y = torch.bmm(signed_weight, cols.flatten(2)).view(R, -1, *cols.shape[2:])
        mean = sign * (recorded_mean - bias)
        scale = gamma.abs() * torch.rsqrt(recorded_var + bn.eps)
        out = torch.addcmul((beta - mean * scale).unsqueeze(-1), _max_pool_windows(y), scale.unsqueeze(-1)).clamp_min_(0)
    return out.view(R, -1, N, pooled_h, pooled_w)


# ---------------------------------------------------------------------------
# ANIL: the body once per micro-batch, the head in closed form
# ---------------------------------------------------------------------------
def supports(learner) -> bool:
    cfg = learner.config
    return (
        cfg.algorithm == "anil"
        and cfg.task_type == "classification"
        and not cfg.learn_step_lrs
        and getattr(learner, "_head_only", False)
        and _blocks(learner.model) is not None
        and set(learner.adapt_names) == {"head.weight", "head.bias"}
    )


class FastAnil:
    head_only = True

    def __init__(self, learner):
        self.learner = learner
        self.blocks = _blocks(learner.model)
        self.params = {n: p.detach() for n, p in learner.model.named_parameters()}

    @torch.no_grad()
    def body(self, x: torch.Tensor, stats: dict | None = None, record: bool = False):
        """Features ``[R, N, F]`` of ``x`` ``[R, N, C, H, W]``; BatchNorm with per-request batch statistics, or ``stats``."""
        R, N = x.shape[:2]
        recorded = {}
        blocks = self.blocks
        if _first_block_applies(blocks[0][0], x.shape[-2], x.shape[-1]):
            _, conv_name, _, bn_name = blocks[0]
            first = [conv_name + ".weight", conv_name + ".bias", bn_name + ".weight", bn_name + ".bias"]
            shared = {n: self.params[n].expand(R, *self.params[n].shape) for n in first if n in self.params}
            h = _first_block(x, shared, *blocks[0], stats, record, recorded)  # [R, C, N, H, W]
            h = h.transpose(1, 2).flatten(0, 1)
            blocks = blocks[1:]
        else:
            h = x.reshape(R * N, *x.shape[2:])
        for conv, conv_name, bn, bn_name in blocks:
            h = F.conv2d(h, self.params[conv_name + ".weight"], self.params.get(conv_name + ".bias"), conv.stride, conv.padding, conv.dilation)
            hr = h.unflatten(0, (R, N))
            if stats is None:
                var, mean = torch.var_mean(hr, (1, 3, 4), correction=0, keepdim=True)
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
        lr = self.learner.config.inner_lr if lr is None else lr
        R, N = support_y.shape
        features, stats = self.body(support_x, record=True)
        weight = self.params["head.weight"].expand(R, -1, -1).clone()
        bias = self.params["head.bias"].expand(R, -1).clone()
        onehot = F.one_hot(support_y, weight.shape[1]).to(features.dtype)
        losses = []
        for _ in range(steps):
            logits = self.head(weight, bias, features)
            log_probs = torch.log_softmax(logits, -1)
            losses.append(-(log_probs * onehot).sum(-1).mean(-1))
            dlogits = (log_probs.exp() - onehot) / N  # d mean-CE / d logits
            weight = weight - lr * torch.bmm(dlogits.transpose(1, 2), features)
            bias = bias - lr * dlogits.sum(1)
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
        and cfg.task_type == "classification"
        and not cfg.learn_step_lrs
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
    """[R, C, N, H, W] -> [N, R*C, H, W] in channels-last memory (what the grouped convolutions run fastest on)."""
    R, C, N, H, W = h.shape
    return h.permute(2, 3, 4, 0, 1).contiguous().view(N, H, W, R * C).permute(0, 3, 1, 2)


class FastFull:
    """Batched first-order adaptation of every parameter, one computation for the whole micro-batch.

    Activations live in the layout ``[N, R*C, H, W]`` (channels-last in memory):
    per-request convolutions are one grouped convolution, and per-request
    BatchNorm over (N, H, W) is exactly the fused ``F.batch_norm`` kernel
    (forward and backward) on that tensor. The first block, when it has few
    input channels, runs fused (see ``_FirstBlockBatchStats``).
    """

    head_only = False

    def __init__(self, learner):
        self.learner = learner
        self.blocks = _blocks(learner.model)
        self.names = list(learner.adapt_names)
        self.params = {n: p.detach() for n, p in learner.model.named_parameters()}

    def forward(self, P: dict, x: torch.Tensor, stats: dict | None = None, record: bool = False):
        R, N = x.shape[:2]
        recorded = {}
        blocks = self.blocks
        if _first_block_applies(blocks[0][0], x.shape[-2], x.shape[-1]):
            h = _grouped_layout(_first_block(x, P, *blocks[0], stats, record, recorded))
            blocks = blocks[1:]
        else:
            h = x.transpose(0, 1).reshape(N, R * x.shape[2], *x.shape[3:]).contiguous(memory_format=torch.channels_last)
        for conv, conv_name, bn, bn_name in blocks:
            h = _conv_grouped(h, R, P[conv_name + ".weight"], P.get(conv_name + ".bias"), conv)
            h = h.contiguous(memory_format=torch.channels_last)
            C = h.shape[1] // R
            weight, bias = P[bn_name + ".weight"].reshape(R * C), P[bn_name + ".bias"].reshape(R * C)
            if stats is None:
                if record:
                    var, mean = torch.var_mean(h, (0, 2, 3), correction=0)
                    recorded[bn_name] = (mean.view(R, 1, C, 1, 1), var.view(R, 1, C, 1, 1))
                h = F.batch_norm(h, None, None, weight, bias, True, 0.0, bn.eps)
            else:
                mean, var = stats[bn_name]
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
        fast = {n: self.params[n].expand(R, *self.params[n].shape).clone() for n in self.names}
        losses = []
        for _ in range(steps):
            with torch.enable_grad():
                leaves = {n: p.requires_grad_() for n, p in fast.items()}
                loss = self._losses(self.forward(leaves, support_x)[0], support_y)
                # The first block's conv bias is cancelled by BatchNorm: unused, zero gradient.
                grads = torch.autograd.grad(loss.sum(), list(leaves.values()), allow_unused=True, materialize_grads=True)
            losses.append(loss.detach())
            with torch.no_grad():
                fast = {n: p.detach() - lr * g for (n, p), g in zip(leaves.items(), grads)}
        with torch.no_grad():
            logits, stats = self.forward(fast, support_x, record=True)
            after = self._losses(logits, support_y)
        before = losses[0] if losses else after
        return Adaptation(fast, stats, before, after)

    @torch.no_grad()
    def predict(self, adaptation: Adaptation, query_x: torch.Tensor, transductive: bool = False) -> torch.Tensor:
        P = {**{n: p.expand(query_x.shape[0], *p.shape) for n, p in self.params.items()}, **adaptation.params}
        return self.forward(P, query_x, stats=None if transductive else adaptation.norm_stats)[0]


def fast_kernel(learner):
    """The fast batched kernel for ``learner``, or None when only the generic path applies."""
    if supports(learner):
        return FastAnil(learner)
    if supports_full(learner):
        return FastFull(learner)
    return None
