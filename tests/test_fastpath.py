"""The service's fast batched kernels equal the generic adaptation (service/fastpath.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metalearn import Conv4, MetaConfig, MetaLearner
from metalearn.adaptation import adapt, predict
from service import fastpath
from test_first_block import omniglot_like


def learner(algorithm: str, size: int = 28, channels: int = 8, in_channels: int = 1, **config) -> MetaLearner:
    torch.manual_seed(0)
    model = Conv4(in_channels=in_channels, out_features=5, channels=channels, image_size=size)
    with torch.no_grad():  # negative BatchNorm scales flip max-pool into min-pool: cover them
        model.body[1].weight[::3] *= -1
        model.body[5].weight[1::4] *= -1
    meta = MetaLearner(model, MetaConfig(algorithm, inner_steps=4, inner_lr=0.4, **config))
    if config.get("learn_step_lrs"):
        with torch.no_grad():  # distinct learned rates per step and per tensor
            for i, rates in enumerate(meta.lrs.values()):
                rates.copy_(torch.linspace(0.5, 0.1, rates.shape[0]) * (1 + i))
    return meta


@pytest.mark.parametrize(
    "algorithm, size, config",
    [
        ("maml", 28, {}),
        ("anil", 28, {}),
        ("anil", 28, {"learn_step_lrs": True}),
        ("anil", 28, {"learn_step_lrs": True, "head_init": "prototypes"}),  # the ready Omniglot configs' kind
        ("maml", 27, {}),  # 27: odd size, grouped-conv first block
        ("maml", 16, {"in_channels": 3}),  # colour pictures (--set color=true)
        ("anil", 16, {"in_channels": 3}),
    ],
)
def test_fast_kernels_equal_generic_adaptation(algorithm, size, config):
    in_channels = config.pop("in_channels", 1)
    meta = learner(algorithm, size, in_channels=in_channels, **config)
    kernel = fastpath.fast_kernel(meta)
    assert isinstance(kernel, fastpath.FastAnil if algorithm == "anil" else fastpath.FastFull)
    R = 3
    support_x, query_x = omniglot_like(R, 5, size, seed=1), omniglot_like(R, 7, size, seed=2)
    if in_channels > 1:  # colour: each channel its own picture
        support_x = torch.cat([omniglot_like(R, 5, size, seed=1 + 10 * c) for c in range(in_channels)], dim=2)
        query_x = torch.cat([omniglot_like(R, 7, size, seed=2 + 10 * c) for c in range(in_channels)], dim=2)
    support_y = torch.arange(5).expand(R, 5).clone()
    lr = None if config.get("learn_step_lrs") else 0.4  # None: the learned per-step rates
    batched = kernel.adapt(support_x, support_y, 4, lr)
    queries = kernel.predict(batched, query_x)
    transductive = kernel.predict(batched, query_x, transductive=True)
    for r in range(R):
        single = adapt(meta, support_x[r], support_y[r], steps=4, lr=lr)
        for name, value in single.params.items():
            torch.testing.assert_close(batched.params[name][r], value, rtol=1e-4, atol=1e-5)
        for name, (mean, var) in single.norm_stats.items():
            torch.testing.assert_close(batched.norm_stats[name][0][r], mean, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(batched.norm_stats[name][1][r], var, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(batched.support_loss_after[r], single.support_loss_after, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(queries[r], predict(meta, single, query_x[r]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(transductive[r], predict(meta, single, query_x[r], transductive=True), rtol=1e-4, atol=1e-4)


class _Conv4Shaped(torch.nn.Module):
    """A user's model laid out as Conv4 (a body of conv, BatchNorm, pool, ReLU blocks and Flatten, then a head)."""

    def __init__(self, padding_mode: str = "zeros", scale: float = 1.0, conv=torch.nn.Conv2d, clamp: bool = False):
        super().__init__()
        self.clamp = clamp
        self.body = torch.nn.Sequential(conv(1, 8, 3, padding=1, padding_mode=padding_mode), torch.nn.BatchNorm2d(8),
                                        torch.nn.MaxPool2d(2), torch.nn.ReLU(), torch.nn.Flatten())
        self.head = torch.nn.Linear(8 * 8 * 8, 5)
        self.scale = scale

    def forward(self, x):
        return self.head(self.body(x.clamp(0, 1) if self.clamp else x)) * self.scale


class _ClampedConv(torch.nn.Conv2d):
    def forward(self, x):
        return super().forward(x).clamp(max=1.0)


@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_only_models_computing_what_the_kernels_compute_take_them(algorithm):
    """The kernels compute ``head(body(x))`` with zero-padded ``F.conv2d``: a model laid out as Conv4 takes them
    only if its forward gives that on random inputs of its shape, its padding is zeros and its layers are the
    plain classes. The service answered a scaled forward's model, or reflection padding's, with the
    kernels' function (201/200, its probabilities up to 0.98 from offline adaptation)."""
    kind = fastpath.FastAnil if algorithm == "anil" else fastpath.FastFull
    plain = MetaLearner(_Conv4Shaped(), MetaConfig(algorithm, inner_lr=0.4))
    assert isinstance(fastpath.fast_kernel(plain, (1, 16, 16)), kind)
    assert fastpath.fast_kernel(plain) is None  # (no inputs to try it on: the generic path)
    # (clamp: the same function on pixels in [0, 1], another outside them)
    for model in (_Conv4Shaped(scale=0.25), _Conv4Shaped(padding_mode="reflect"), _Conv4Shaped(conv=_ClampedConv), _Conv4Shaped(clamp=True)):
        assert fastpath.fast_kernel(MetaLearner(model, MetaConfig(algorithm, inner_lr=0.4)), (1, 16, 16)) is None


def test_the_kernels_channels_last_batchnorm_is_batchnorm_to_float32_precision():
    """FastFull's BatchNorm of the inner loop. Torch's channels-last batch_norm sums each channel in one running
    total: on this input (mean/std 1000, as a conv output can be) its float32 gradients are 1.6e-3 off, and ten
    inner steps at lr 0.4 amplified such errors to probabilities 5.8e-2 away from offline adaptation."""
    from service.fastpath import _ChannelsLastBatchNorm

    torch.manual_seed(0)
    x = (torch.randn(25, 64, 14, 14, dtype=torch.float64) * 0.003 + 3).contiguous(memory_format=torch.channels_last)
    grad = (torch.randn_like(x) * 1e-2).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(64, dtype=torch.float64) + 0.5, torch.randn(64, dtype=torch.float64)

    def outputs(batchnorm, *tensors):
        x, weight, bias = (t.detach().requires_grad_() for t in tensors[:3])
        y = batchnorm(x, weight, bias)
        return [y.detach(), *torch.autograd.grad(y, (x, weight, bias), tensors[3])]

    def torch_own(x, weight, bias):
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5)

    def ours(x, weight, bias):
        return _ChannelsLastBatchNorm.apply(x, weight, bias, 1e-5)

    def error(got, want):  # relative to the largest value
        return float((got.double() - want).abs().max() / want.abs().max())

    names = ("output", "grad x", "grad weight", "grad bias")
    reference = outputs(torch_own, x.contiguous(), weight, bias, grad.contiguous())  # float64
    for what, got, want in zip(names, outputs(ours, x, weight, bias, grad), reference):  # the same function, in float64
        assert error(got, want) < 1e-11, what
    single = outputs(ours, x.float(), weight.float(), bias.float(), grad.float())
    for what, got, want in zip(names, single, reference):
        assert error(got, want) < 2e-4, (what, error(got, want))  # (here 1e-4 at most; torch: 4e-5 contiguous, 6e-4 channels-last)
    assert single[0].is_contiguous(memory_format=torch.channels_last)
