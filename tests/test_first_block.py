"""The fused first block (metalearn/first_block.py) is the plain conv -> BatchNorm -> max-pool -> ReLU,
to second order, and Conv4's meta-gradients through it equal those through the plain modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import metalearn.first_block
import metalearn.models
from metalearn import Conv4, MetaConfig, MetaLearner
from metalearn.batching import run_meta_batch
from metalearn.data.tasks import TaskBatch
from metalearn.first_block import first_block, fuses


def omniglot_like(requests: int, images: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    """Blank background with a few strokes: blank 2x2 windows tie exactly, as on real characters
    (the max-pool backward must send their gradient where F.max_pool2d does)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(requests, images, 1, size, size)
    x[..., 8:20, 12:15] = 1.0  # a solid stroke: equal 3x3 patches inside it tie too
    x += (torch.rand(x.shape, generator=g) > 0.85).float() * torch.rand(x.shape, generator=g)
    return x


def plain_block(x, weight, bias, gamma, beta, eps=1e-5):
    """The module's first block written plainly: conv -> batch-statistics BatchNorm -> max-pool -> ReLU."""
    y = F.conv2d(x, weight, bias, padding=1)
    return torch.relu(F.max_pool2d(F.batch_norm(y, None, None, gamma, beta, training=True, eps=eps), 2))


def block_inputs(R: int = 3, channels: int = 6):
    torch.manual_seed(1)
    x = omniglot_like(R, 4).double()
    weight = torch.randn(R, channels, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(R, channels, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(R, channels, dtype=torch.float64, requires_grad=True)  # mixed signs
    beta = torch.randn(R, channels, dtype=torch.float64, requires_grad=True)
    return x, (weight, bias, gamma, beta)


def as_nchw(out: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The block's output [R, C, N, h, w] (or [R, N, h, w, C] channels-last) as [R, N, C, h, w]."""
    return out.permute(0, 1, 4, 2, 3) if channels_last else out.transpose(1, 2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_statistics_and_gradients_equal_plain_modules_float64(channels_last):
    conv = Conv4(channels=6).body[0]
    x, params = block_inputs()
    out, mean, var = first_block(x, conv, *params, 1e-5, channels_last=channels_last)
    out = as_nchw(out, channels_last)
    upstream = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad((out * upstream).sum(), params)
    assert grads[1].abs().max() == 0  # the conv bias: BatchNorm cancels it exactly
    for r in range(x.shape[0]):
        mine = [t.detach()[r].clone().requires_grad_() for t in params]
        expected = plain_block(x[r], *mine)  # [N, C, 14, 14]
        torch.testing.assert_close(out[r], expected, rtol=1e-9, atol=1e-9)
        expected_grads = torch.autograd.grad((expected * upstream[r]).sum(), mine)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got[r], want, rtol=1e-8, atol=1e-9)
        y = F.conv2d(x[r], mine[0].detach(), mine[1].detach(), padding=1)
        torch.testing.assert_close(mean[r], y.mean((0, 2, 3)), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(var[r], y.var((0, 2, 3), correction=0), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("channels_last", [False, True])
def test_second_order_hessian_vector_products_equal_plain_modules_float64(channels_last):
    """What second-order MAML differentiates: the gradient of (gradient . v)."""
    conv = Conv4(channels=6).body[0]
    x, params = block_inputs(R=1)
    upstream = torch.randn(1, 4, 6, 14, 14, dtype=torch.float64)
    directions = [torch.randn_like(p) for p in params]

    def hvp(block):
        loss = (block(*params) * upstream).pow(2).sum()  # non-linear in the block's output
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return torch.autograd.grad(sum((g * d).sum() for g, d in zip(grads, directions)), params)

    fused = hvp(lambda *p: as_nchw(first_block(x, conv, *p, 1e-5, channels_last=channels_last)[0], channels_last))
    plain = hvp(lambda w, b, g, be: plain_block(x[0], w[0], b[0], g[0], be[0]).unsqueeze(0))
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)
    assert fused[0].abs().max() > 0 and fused[2].abs().max() > 0


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shared", [False, True], ids=["per-request weights", "shared weights"])
def test_forward_without_autograd_equals_plain_modules(channels_last, shared, monkeypatch):
    """With no gradient to record, the block pools in cache-sized chunks (``_pooled_max``): small
    chunks here, so requests and rows split across several of them."""
    monkeypatch.setattr(metalearn.first_block, "_CHUNK_VALUES", 4 * 6 * 50)  # 50 rows of one request per chunk
    conv = Conv4(channels=6).body[0]
    x, params = block_inputs()
    if shared:
        params = tuple(t[0] for t in params)
    with torch.no_grad():
        out, _, _ = first_block(x, conv, *params, 1e-5, channels_last=channels_last)
    out = as_nchw(out, channels_last)
    for r in range(x.shape[0]):
        mine = [t[r] if not shared else t for t in params]
        torch.testing.assert_close(out[r], plain_block(x[r], *[t.detach() for t in mine]), rtol=1e-9, atol=1e-9)


def test_forward_without_autograd_under_vmap_over_weights_only():
    """Batched weights with an unbatched input (several adapted models, one query set) take the
    transform-safe path: the chunked one writes with out=, which vmap cannot batch."""
    model = Conv4(out_features=5, channels=6).eval()
    torch.manual_seed(2)
    stacked = {n: p.detach() + 0.1 * torch.randn(3, *p.shape) for n, p in model.named_parameters()}
    x = omniglot_like(1, 4)[0]
    with torch.no_grad():
        batched = torch.func.vmap(lambda params: torch.func.functional_call(model, params, (x,)))(stacked)
        one_by_one = torch.stack([torch.func.functional_call(model, {n: t[i] for n, t in stacked.items()}, (x,)) for i in range(3)])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)


def test_given_statistics_normalise_like_batchnorm_with_them():
    conv = Conv4(channels=6).body[0]
    x, params = block_inputs(R=2)
    stats = (torch.randn(2, 6, dtype=torch.float64), torch.rand(2, 6, dtype=torch.float64) + 0.1)
    out, _, _ = first_block(x, conv, *params, 1e-5, stats=stats)
    for r in range(2):
        weight, bias, gamma, beta = (t.detach()[r] for t in params)
        y = F.conv2d(x[r], weight, bias, padding=1)
        normed = F.batch_norm(y, stats[0][r], stats[1][r], gamma, beta, training=False, eps=1e-5)
        torch.testing.assert_close(out[r].transpose(0, 1), torch.relu(F.max_pool2d(normed, 2)), rtol=1e-9, atol=1e-9)


def test_applies_only_where_the_identities_hold():
    conv = Conv4(channels=6).body[0]
    assert fuses(conv, 28, 28)
    assert not fuses(conv, 27, 27)  # odd output: a row and a column outside every window
    assert not fuses(Conv4(in_channels=4).body[0], 28, 28)  # 36 inputs per output: the Gram trick stops paying


def meta_batch(tasks: int = 3, ways: int = 5) -> TaskBatch:
    support_x = omniglot_like(tasks, ways, seed=1).double()
    query_x = omniglot_like(tasks, 2 * ways, seed=2).double()
    support_y = torch.arange(ways).expand(tasks, -1).clone()
    return TaskBatch(support_x, support_y, query_x, torch.arange(ways).repeat(2).expand(tasks, -1).clone())


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "metasgd", "anil", "tamaml", "mamlpp"])
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_conv4_meta_gradients_equal_the_plain_modules(algorithm, strategy, monkeypatch):
    torch.manual_seed(0)
    model = Conv4(out_features=5, channels=6)
    with torch.no_grad():
        model.body[1].weight[::3] *= -1  # negative BatchNorm scales turn the max-pool into a min-pool
    learner = MetaLearner(model, MetaConfig(algorithm, inner_steps=2, inner_lr=0.3)).double()
    batch = meta_batch()
    fused = run_meta_batch(learner, batch, strategy=strategy)
    monkeypatch.setattr(metalearn.models, "fuses", lambda *args: False)
    plain = run_meta_batch(learner, batch, strategy=strategy)
    assert fused.loss == pytest.approx(plain.loss, rel=1e-12)
    scale = max(g.abs().max() for g in plain.grads.values())
    for name, grad in plain.grads.items():
        torch.testing.assert_close(fused.grads[name], grad, rtol=0, atol=1e-12 * scale)


def test_conv4_runs_channels_last_after_the_fused_block(monkeypatch):
    """Outside torch.func transforms the blocks after the fused one run channels-last (BatchNorm on the
    [N*H*W, C] view); the output equals the plain NCHW modules'. (The meta-gradient test above covers
    the backward passes, to second order.)"""
    seen = []
    real = metalearn.models._channels_last
    monkeypatch.setattr(metalearn.models, "_channels_last", lambda x: seen.append(real(x)) or seen[-1])
    torch.manual_seed(0)
    model = Conv4(out_features=5, channels=6).double()
    x = torch.rand(10, 1, 28, 28, dtype=torch.float64)
    fused = model(x)
    assert seen == [True, True, True]  # the three BatchNorms after the first block
    seen.clear()
    batched = torch.func.vmap(model)(x.unsqueeze(0))  # fused too, but NCHW inside a transform
    assert seen == [False] * 3
    torch.testing.assert_close(batched[0], fused, rtol=0, atol=1e-12)
    monkeypatch.setattr(metalearn.models, "fuses", lambda *args: False)
    seen.clear()
    torch.testing.assert_close(fused, model(x), rtol=0, atol=1e-12)
    assert seen == [False] * 4
