"""conv -> batch-statistics BatchNorm -> 2x2 max-pool -> ReLU, fused, for a conv with few input channels.

On the CPU the first block of a Conv4-style network is memory-bound: its
output has 64 channels at full resolution, and the plain modules read or write
that tensor a dozen times per forward and backward (conv bias, BatchNorm
forward and backward, the max-pool kernel, which is slow on NCHW tensors, its
zero-filled backward). Three identities remove most of those passes:

* BatchNorm with batch statistics cancels the conv bias exactly;
* the statistics of ``y = W cols`` (``cols``: the unfolded input, K = in_channels
  * kh * kw rows) are quadratic forms of the small K x K Gram matrix of
  ``cols``: ``mean = W m / n``, ``E[y^2] = W G W^T / n``;
* max-pool commutes with BatchNorm's per-channel affine map once sign(gamma)
  is folded into the conv weights, so normalisation runs on the pooled tensor.

What is left at full resolution is one small matrix product (K is 9 for a
grey-scale 3x3 conv) and the pooling, done on columns grouped by their
position in the 2x2 window so the four candidates are contiguous blocks. The
result is differentiable to any order (the meta-gradient of second-order MAML
goes through it): the only hand-written backward is the max-pool's, whose
gradient is linear in the incoming gradient and built from ordinary ops.

Used by :class:`metalearn.models.Conv4` in training and test-time adaptation
on the CPU, and by the service's batched kernels (``service/fastpath.py``),
with any number of leading batch dimensions (one set of weights per entry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn


def conv_output_size(conv: nn.Conv2d, height: int, width: int) -> tuple[int, int]:
    """Output size of a stride-1 ``conv`` on ``height`` x ``width`` inputs."""
    return tuple(size + 2 * pad - dil * (k - 1) for size, pad, dil, k in zip((height, width), conv.padding, conv.dilation, conv.kernel_size))


def fuses(conv: nn.Conv2d, height: int, width: int) -> bool:
    """Whether the fused block applies: a stride-1 conv with few inputs per output (the Gram matrix is
    K x K) and an even output size (every pixel belongs to exactly one pooling window)."""
    k = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    if conv.stride != (1, 1) or conv.groups != 1 or k > 32 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    out_h, out_w = conv_output_size(conv, height, width)
    return out_h % 2 == 0 and out_w % 2 == 0 and out_h > 0 and out_w > 0


@dataclass(frozen=True)
class WindowColumns:
    """The unfolded input of the fused block: ``cols`` ``[..., 4, M, K]`` (2x2 window position, output
    pixel (image, row, column) of the pooled grid, K = in_channels * kh * kw), the image count and the
    pooled height and width."""

    cols: torch.Tensor
    images: int
    pooled_h: int
    pooled_w: int

    @cached_property
    def moments(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Column count, sums ``[..., K, 1]`` and Gram matrix ``[..., K, K]`` of the columns, in float64
        (``E[y^2] - mean^2`` cancels); computed once however many weights the columns meet."""
        cols64 = self.cols.flatten(-3, -2).double()
        return cols64.shape[-2], cols64.sum(-2).unsqueeze(-1), cols64.transpose(-1, -2) @ cols64


def window_columns(x: torch.Tensor, conv: nn.Conv2d) -> WindowColumns:
    """im2col of ``x`` ``[..., N, C, H, W]``, the columns grouped by their position in the 2x2 pooling
    window (row-major, as ``F.max_pool2d`` scans it), K innermost: the layout the block's products read
    fastest. Compute it once when the same input goes through the block several times (an inner loop)."""
    lead, (N, C, H, W) = x.shape[:-4], x.shape[-4:]
    cols = F.unfold(x.reshape(-1, C, H, W), conv.kernel_size, dilation=conv.dilation, padding=conv.padding)
    K = cols.shape[1]
    out_h, out_w = conv_output_size(conv, H, W)
    pooled_h, pooled_w = out_h // 2, out_w // 2
    d = len(lead)
    grid = cols.view(*lead, N, K, pooled_h, 2, pooled_w, 2)
    grid = grid.permute(*range(d), d + 3, d + 5, d, d + 2, d + 4, d + 1)
    return WindowColumns(grid.reshape(*lead, 4, N * pooled_h * pooled_w, K), N, pooled_h, pooled_w)


def transformed(t: torch.Tensor) -> bool:
    """Whether ``t`` is inside a torch.func transform (vmap, grad), where ``out=`` and layout queries fail."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def _winners(candidate: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """1.0 where ``candidate`` is the window's maximum, else 0.0, in ``pooled``'s dtype.

    The comparison writes straight into a float tensor: a bool mask would be
    converted on every multiplication (a third of the max-pool backward;
    ``torch.where`` is slower still). ``vmap`` has no rule for ``out=``, so under
    a ``torch.func`` transform the mask is converted. A fresh tensor each call: the
    multiplication saves it for the double backward."""
    if transformed(pooled):
        return (candidate == pooled).to(pooled.dtype)
    return torch.eq(candidate, pooled, out=torch.empty_like(pooled))


class _PooledProduct(torch.autograd.Function):
    """``max`` over the four window positions of the product of ``weight`` ``[..., C, K]`` and ``cols``
    ``[..., 4, M, K]``: ``[..., C, M]``, or ``[..., M, C]`` with ``channels_last`` (and the unpooled
    product, not differentiable).

    The gradient goes to one element per window, the first maximum in row-major
    order (``F.max_pool2d``'s choice; blank backgrounds tie a lot). ``cols`` is
    input data and gets no gradient.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(weight, cols, channels_last):
        flat = cols.flatten(-3, -2)  # [..., 4M, K]
        if channels_last:
            product = (flat @ weight.transpose(-1, -2)).unflatten(-2, (4, -1))  # [..., 4, M, C]
        else:
            product = (weight @ flat.transpose(-1, -2)).unflatten(-1, (4, -1)).movedim(-2, -3)  # [..., 4, C, M] (a view)
        a, b, c, d = product.unbind(-3)
        return torch.maximum(torch.maximum(a, b), torch.maximum(c, d)), product

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        ctx.mark_non_differentiable(outputs[1])
        ctx.set_materialize_grads(False)
        ctx.channels_last = inputs[2]
        ctx.save_for_backward(inputs[1], outputs[0], outputs[1])

    @staticmethod
    def backward(ctx, grad_pooled, _grad_product):
        if grad_pooled is None:
            return None, None, None
        cols, pooled, product = ctx.saved_tensors
        # Written with ordinary ops: linear in grad_pooled with constant masks, so
        # autograd differentiates it again (second-order MAML).
        remaining = grad_pooled.contiguous()  # it may come permuted (e.g. from a grouped layout): mixed layouts are slow
        grad_weight = None
        for position in range(4):
            if position < 3:
                taken = remaining * _winners(product.select(-3, position), pooled)
                remaining = remaining - taken
            else:
                taken = remaining
            # [..., C, K] as (cols^T @ taken)^T: MKL runs this orientation about 4x faster (K = 9 is the
            # product's short side either way).
            term = (cols.select(-3, position).transpose(-1, -2) @ (taken if ctx.channels_last else taken.transpose(-1, -2))).transpose(-1, -2)
            grad_weight = term if grad_weight is None else grad_weight + term
        return grad_weight, None, None


# About 1 MiB of products per chunk: the four window positions' products stay in the cache until
# pooled (written out whole, they cost a pass through memory and most of the forward's time).
_CHUNK_VALUES = 1 << 18


def _pooled_max(weight: torch.Tensor, cols: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``_PooledProduct``'s pooled output, with no autograd record, computed in cache-sized chunks
    (lead entries and column rows) so the full product is never written. One thread, requests of 5
    images: 1.6x faster for 16 with one weight (ANIL), 1.25x for 8 with their own."""
    *lead, _, M, K = cols.shape
    C, L = weight.shape[-2], math.prod(lead)
    cols = cols.reshape(L, 4, M, K)
    weight = weight.reshape(-1, C, K)
    weight_t = weight.transpose(-1, -2).contiguous()  # [l, K, C]: a contiguous right factor is faster
    out = torch.empty(L, M, C, dtype=cols.dtype, device=cols.device) if channels_last else torch.empty(L, C, M, dtype=cols.dtype, device=cols.device)
    rows = max(1, min(M, _CHUNK_VALUES // (4 * C)))
    leads = max(1, _CHUNK_VALUES // (4 * C * M))
    for l0 in range(0, L, leads):
        w_t = weight_t if weight.shape[0] == 1 else weight_t[l0 : l0 + leads]
        for m0 in range(0, M, rows):
            block = cols[l0 : l0 + leads, :, m0 : m0 + rows]
            l, _, m, _ = block.shape
            if w_t.shape[0] == 1:  # one weight for the whole chunk: one 2-D product (a broadcast matmul is 3x slower)
                product = (block.reshape(l * 4 * m, K) @ w_t[0]).view(l, 4, m, C)
            else:
                product = (block.reshape(l, 4 * m, K) @ w_t).view(l, 4, m, C)
            if channels_last:
                a, b, c, d = product.unbind(1)  # [l, m, C] each
                target = out[l0 : l0 + leads, m0 : m0 + rows]
            else:
                a, b, c, d = product.transpose(-1, -2).unbind(1)  # [l, C, m] each
                target = out[l0 : l0 + leads, :, m0 : m0 + rows]
            torch.maximum(torch.maximum(a, b), torch.maximum(c, d), out=target)
    return out.view(*lead, *out.shape[1:])


def pooled_product(weight: torch.Tensor, columns: WindowColumns, channels_last: bool = False) -> torch.Tensor:
    """The max over each 2x2 window of ``weight`` ``[..., C, K]`` times the columns: ``[..., C, M]``, or
    ``[..., M, C]`` with ``channels_last``. Without autograd, on the CPU, in cache-sized chunks; not inside
    torch.func transforms (of the weights or the inputs: the chunks are written with out=, which they do
    not support), nor on a GPU (many small kernels where one large one runs well)."""
    recorded = torch.is_grad_enabled() and weight.requires_grad
    if recorded or columns.cols.device.type != "cpu" or transformed(columns.cols) or transformed(weight):
        return _PooledProduct.apply(weight, columns.cols, channels_last)[0]
    return _pooled_max(weight, columns.cols, channels_last)


def _gram_statistics(columns: WindowColumns, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance over all columns of ``weight @ cols``, per channel ``[..., C]``, from the
    columns' Gram matrix (float64)."""
    count, sums, gram = columns.moments
    w64 = weight.double()
    mean = (w64 @ sums).squeeze(-1) / count
    var = (((w64 @ gram) * w64).sum(-1) / count - mean * mean).clamp_min(0)
    return mean.to(weight.dtype), var.to(weight.dtype)


def first_block(
    x: torch.Tensor | WindowColumns,
    conv: nn.Conv2d,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ReLU(max-pool(BatchNorm(conv(x)))) for ``x`` ``[..., N, C_in, H, W]`` (or its
    :func:`window_columns`) -> ``[..., C, N, H'/2, W'/2]``, or ``[..., N, H'/2, W'/2, C]`` with
    ``channels_last`` (the layout channels-last convolutions read; computed directly, not copied).

    ``weight`` ``[..., C, C_in, kh, kw]``, ``bias``/``gamma``/``beta`` ``[..., C]``: one set per
    leading index, or one shared set that broadcasts (``conv`` gives padding and dilation; check
    :func:`fuses` first).
    BatchNorm uses the statistics of the batch, or ``stats`` = (mean, var) of the
    conv output ``[..., C]``. Returns the block's output and the (mean, var) it
    normalised with, as ``BatchNorm`` records them.
    """
    columns = x if isinstance(x, WindowColumns) else window_columns(x, conv)
    sign = torch.where(gamma < 0, -1.0, 1.0).to(gamma.dtype)  # a constant: no gradient flows through it
    signed_weight = weight.flatten(-3) * sign.unsqueeze(-1)
    pooled = pooled_product(signed_weight, columns, channels_last)  # max over each window of sign * (W cols)
    bias = torch.zeros_like(gamma) if bias is None else bias
    if stats is None:
        signed_mean, var = _gram_statistics(columns, signed_weight)
        mean = sign * signed_mean + bias
    else:
        mean, var = stats
    # sign * (mean - bias) is signed_mean again; written this way the bias stays in the graph
    # with its true gradient, exactly zero.
    center = sign * (mean - bias)
    scale = gamma * sign * torch.rsqrt(var + eps)
    pixel_axis = -2 if channels_last else -1  # where M is in pooled: the per-channel terms broadcast along it
    out = torch.addcmul((beta - center * scale).unsqueeze(pixel_axis), pooled, scale.unsqueeze(pixel_axis)).relu()
    grid = (columns.images, columns.pooled_h, columns.pooled_w)
    return (out.unflatten(-2, grid) if channels_last else out.unflatten(-1, grid)), mean, var
