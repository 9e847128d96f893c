"""Winograd convolutions written with torch operations against oneDNN's direct convolution: not kept.

    python bench/experiments/winograd.py

Winograd's F(m x m, 3 x 3) computes a 3x3 convolution with fewer
multiplications (2.25x fewer for F(2x2), 4x for F(4x4)): each input tile is
transformed, the transformed tiles and weights multiplied channel-wise as one
batched matrix product per tile position, and the products transformed back.
A session's weights could be transformed once (as ``FastFull.pack`` packs them),
so only the input and output transforms and the products run per request.

Here, for the 64-channel convolutions of a Conv4-64 prediction of 5 images (and
of 80, for comparison), one torch thread, medians: the direct convolution, both
Winograd variants with the weights transformed beforehand (and their largest
difference from it, relative), then F(2x2)'s and F(4x4)'s pieces at 14x14. Torch
has no fused Winograd kernel on this CPU (NNPACK's, the only one it ships, fails
to run here: ``torch._nnpack_spatial_convolution`` raises), and the pieces
written with torch operations, each a pass through memory, cost more than the
arithmetic they save: MKL's batched products of these shapes run at about 90
GFLOP/s where oneDNN's direct convolution runs at 240.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_graphs import median_us  # noqa: E402

# Lavin and Gray (2016): input transform B^T, weight transform G, output transform A^T.
VARIANTS = {
    "F(2x2,3x3)": dict(
        m=2,
        BT=[[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        G=[[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        AT=[[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    "F(4x4,3x3)": dict(
        m=4,
        BT=[[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        G=[[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        AT=[[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}


def transformed_weights(weight: torch.Tensor, variant: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U`` [a*a, O, C] (G g G^T per tile position, computed in float64) and the input and output
    transforms as matrices on flattened tiles (Kronecker products), for tiles of side a = m + 2."""
    a = variant["m"] + 2
    G, BT, AT = (torch.tensor(variant[k], dtype=torch.float64) for k in ("G", "BT", "AT"))
    U = torch.einsum("ij,ocjl,ml->imoc", G, weight.double(), G).reshape(a * a, *weight.shape[:2])
    return U.float().contiguous(), torch.kron(BT, BT).float(), torch.kron(AT, AT).float()


def winograd(x: torch.Tensor, U: torch.Tensor, input_transform: torch.Tensor, output_transform: torch.Tensor, m: int) -> torch.Tensor:
    """A 3x3, padding-1 convolution of ``x`` [N, C, H, W] with the weights :func:`transformed_weights` made."""
    N, C, H, W = x.shape
    a, tiles = m + 2, -(-H // m)
    padded = F.pad(x, (1, tiles * m + 1 - W, 1, tiles * m + 1 - H))
    d = padded.unfold(2, a, m).unfold(3, a, m).permute(4, 5, 1, 0, 2, 3).reshape(a * a, -1)  # [a*a, C*N*T*T]
    V = (input_transform @ d).view(a * a, C, -1)
    M = torch.bmm(U, V)  # [a*a, O, N*T*T]
    Y = (output_transform @ M.view(a * a, -1)).view(m, m, -1, N, tiles, tiles)
    return Y.permute(3, 2, 4, 0, 5, 1).reshape(N, -1, tiles * m, tiles * m)[:, :, :H, :W]


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print("# 64 -> 64 channels, 3x3, padding 1, one thread: medians in us (largest difference from direct, relative)")
    for images, side in [(5, 14), (5, 7), (80, 14)]:
        x = torch.randn(images, 64, side, side)
        weight = torch.randn(64, 64, 3, 3) * 0.05
        direct = F.conv2d(x, weight, padding=1)
        row = f"{images} x {side}x{side}: direct {median_us(lambda: F.conv2d(x, weight, padding=1)):.0f}"
        for name, variant in VARIANTS.items():
            U, BT, AT = transformed_weights(weight, variant)
            out = winograd(x, U, BT, AT, variant["m"])
            error = ((out - direct).abs().max() / direct.abs().max()).item()
            row += f"  {name} {median_us(lambda: winograd(x, U, BT, AT, variant['m'])):.0f} ({error:.0e})"
        print(row)
    x = torch.randn(5, 64, 14, 14)
    for name, variant in VARIANTS.items():
        m = variant["m"]
        a, tiles = m + 2, -(-14 // m)
        U, BT, AT = transformed_weights(torch.randn(64, 64, 3, 3), variant)
        padded = F.pad(x, (1, tiles * m - 13, 1, tiles * m - 13))
        tiles_view = padded.unfold(2, a, m).unfold(3, a, m)
        d = tiles_view.permute(4, 5, 1, 0, 2, 3).reshape(a * a, -1)
        V = (BT @ d).view(a * a, 64, -1)
        M = torch.bmm(U, V)
        flops = 2 * a * a * 64 * 64 * V.shape[-1]
        product_us = median_us(lambda: torch.bmm(U, V))
        print(f"# {name} pieces, 5 x 14x14: tiles gathered {median_us(lambda: tiles_view.permute(4, 5, 1, 0, 2, 3).reshape(a * a, -1)):.0f}, "
              f"input transform {median_us(lambda: BT @ d):.0f}, products {product_us:.0f} ({flops / product_us / 1e3:.0f} GFLOP/s), "
              f"output transform {median_us(lambda: AT @ M.view(a * a, -1)):.0f}")
    try:
        torch._nnpack_spatial_convolution(x, torch.randn(64, 64, 3, 3), None, [1, 1])
        print("# NNPACK's convolution runs here")
    except RuntimeError as error:
        print(f"# NNPACK's convolution: {error}")


if __name__ == "__main__":
    main()
