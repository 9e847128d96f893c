"""The service's fast batched kernels equal the generic adaptation (service/fastpath.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metalearn import Conv4, MetaConfig, MetaLearner
from metalearn.adaptation import adapt, predict
from service import fastpath


def omniglot_like(requests: int, images: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    """Blank background with a few strokes: blank 2x2 windows tie exactly, as on real characters
    (the hand-written max-pool backward must send their gradient where F.max_pool2d does)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(requests, images, 1, size, size)
    x[..., 8:20, 12:15] = 1.0  # a solid stroke: equal 3x3 patches inside it tie too
    x += (torch.rand(x.shape, generator=g) > 0.85).float() * torch.rand(x.shape, generator=g)
    return x


def learner(algorithm: str, size: int = 28, channels: int = 8) -> MetaLearner:
    torch.manual_seed(0)
    model = Conv4(out_features=5, channels=channels, image_size=size)
    with torch.no_grad():  # negative BatchNorm scales flip max-pool into min-pool: cover them
        model.body[1].weight[::3] *= -1
        model.body[5].weight[1::4] *= -1
    return MetaLearner(model, MetaConfig(algorithm, inner_steps=4, inner_lr=0.4))


def first_block_reference(x, weight, bias, gamma, beta, eps=1e-5):
    """The module's first block written plainly: conv -> batch-statistics BatchNorm -> max-pool -> ReLU."""
    y = F.conv2d(x, weight, bias, padding=1)
    return torch.relu(F.max_pool2d(F.batch_norm(y, None, None, gamma, beta, training=True, eps=eps), 2))


def test_first_block_forward_and_gradients_equal_autograd_float64():
    model = Conv4(out_features=5, channels=6).double()
    conv, bn = model.body[0], model.body[1]
    torch.manual_seed(1)
    R, N = 3, 4
    x = omniglot_like(R, N).double()
    weight = torch.randn(R, 6, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(R, 6, dtype=torch.float64)
    gamma = (torch.randn(R, 6, dtype=torch.float64)).requires_grad_()  # mixed signs
    beta = torch.randn(R, 6, dtype=torch.float64, requires_grad=True)
    params = {"body.0.weight": weight, "body.0.bias": bias, "body.1.weight": gamma, "body.1.bias": beta}
    recorded = {}
    out = fastpath._first_block(x, params, conv, "body.0", bn, "body.1", None, True, recorded)  # [R, C, N, 14, 14]
    upstream = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad((out * upstream).sum(), [weight, gamma, beta])
    for r in range(R):
        w, g, b = (t.detach()[r].clone().requires_grad_() for t in (weight, gamma, beta))
        expected = first_block_reference(x[r], w, bias[r], g, b, bn.eps)  # [N, C, 14, 14]
        torch.testing.assert_close(out[r].transpose(0, 1), expected, rtol=1e-9, atol=1e-9)
        expected_grads = torch.autograd.grad((expected * upstream[r].transpose(0, 1)).sum(), [w, g, b])
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got[r], want, rtol=1e-8, atol=1e-9)
        y = F.conv2d(x[r], weight[r].detach(), bias[r], padding=1)
        mean, var = recorded["body.1"]
        torch.testing.assert_close(mean[r].flatten(), y.mean((0, 2, 3)), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(var[r].flatten(), y.var((0, 2, 3), correction=0), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("algorithm, size", [("maml", 28), ("anil", 28), ("maml", 27)])  # 27: odd size, grouped-conv first block
def test_fast_kernels_equal_generic_adaptation(algorithm, size):
    meta = learner(algorithm, size)
    kernel = fastpath.fast_kernel(meta)
    assert isinstance(kernel, fastpath.FastAnil if algorithm == "anil" else fastpath.FastFull)
    R = 3
    support_x, query_x = omniglot_like(R, 5, size, seed=1), omniglot_like(R, 7, size, seed=2)
    support_y = torch.arange(5).expand(R, 5).clone()
    batched = kernel.adapt(support_x, support_y, 4, 0.4)
    queries = kernel.predict(batched, query_x)
    transductive = kernel.predict(batched, query_x, transductive=True)
    for r in range(R):
        single = adapt(meta, support_x[r], support_y[r], steps=4, lr=0.4)
        for name, value in single.params.items():
            torch.testing.assert_close(batched.params[name][r], value, rtol=1e-4, atol=1e-5)
        for name, (mean, var) in single.norm_stats.items():
            torch.testing.assert_close(batched.norm_stats[name][0][r], mean, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(batched.norm_stats[name][1][r], var, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(batched.support_loss_after[r], single.support_loss_after, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(queries[r], predict(meta, single, query_x[r]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(transductive[r], predict(meta, single, query_x[r], transductive=True), rtol=1e-4, atol=1e-4)
