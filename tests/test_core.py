"""The algorithms against independent computations, and batched == loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metalearn import (
    ALGORITHMS,
    Conv4,
    MetaConfig,
    MetaLearner,
    MLP,
    adapt,
    adapt_many,
    build_model,
    predict,
    predict_many,
    register_loss,
)
from metalearn.data.tasks import TaskBatch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only adds synchronisation (and stalls on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def regression_batch(tasks=4, shots=5, queries=6, dtype=torch.float32, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    amplitude = torch.rand(tasks, 1, 1, generator=g, dtype=dtype) * 4 + 0.5
    phase = torch.rand(tasks, 1, 1, generator=g, dtype=dtype) * 3

    def points(n):
        x = torch.rand(tasks, n, 1, generator=g, dtype=dtype) * 10 - 5
        return x, amplitude * torch.sin(x - phase)

    sx, sy = points(shots)
    qx, qy = points(queries)
    return TaskBatch(sx, sy, qx, qy)


def image_batch(tasks=3, ways=3, shots=2, queries=2, size=16, seed=0, dtype=torch.float32) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    labels = lambda k: torch.arange(ways).repeat_interleave(k).expand(tasks, -1).clone()  # noqa: E731
    sx = torch.randn(tasks, ways * shots, 1, size, size, generator=g, dtype=dtype)
    qx = torch.randn(tasks, ways * queries, 1, size, size, generator=g, dtype=dtype)
    return TaskBatch(sx, labels(shots), qx, labels(queries))


def tiny_mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return MLP(1, (6, 5), 1).to(dtype)


def flat(params: dict) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflat(vector: torch.Tensor, like: dict) -> dict:
    out, offset = {}, 0
    for name, p in like.items():
        out[name] = vector[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return out


# ---------------------------------------------------------------------------
# Meta-gradients against independent computations
# ---------------------------------------------------------------------------


def test_maml_one_step_matches_explicit_hessian():
    model = tiny_mlp()
    alpha = 0.05
    learner = MetaLearner(model, MetaConfig("maml", task_type="regression", inner_steps=1, inner_lr=alpha))
    batch = regression_batch(tasks=1, dtype=torch.float64)
    sx, sy, qx, qy = batch.task(0)
    params = {n: p.detach() for n, p in model.named_parameters()}
    theta = flat(params)

    def support_loss(vector):
        return F.mse_loss(torch.func.functional_call(model, unflat(vector, params), (sx,)), sy)

    def query_loss(vector):
        return F.mse_loss(torch.func.functional_call(model, unflat(vector, params), (qx,)), qy)

    hessian = torch.autograd.functional.hessian(support_loss, theta)
    support_grad = torch.autograd.functional.jacobian(support_loss, theta)
    adapted = theta - alpha * support_grad
    query_grad = torch.autograd.functional.jacobian(query_loss, adapted)
    expected = (torch.eye(theta.numel(), dtype=theta.dtype) - alpha * hessian) @ query_grad

    result = learner.meta_gradient(batch, strategy="loop")
    got = flat({n: result.grads["model." + n] for n in params})
    assert torch.allclose(got, expected, atol=1e-10, rtol=1e-8)
    # A first-order gradient would differ: the Hessian term matters here.
    assert not torch.allclose(query_grad, expected, atol=1e-6)


def _reference_query_loss(model, vector, like, batch, alpha, steps, loss=F.mse_loss):
    """Plain-autograd MAML objective for finite differences (independent of metalearn's inner loop)."""
    sx, sy, qx, qy = batch.task(0)
    params = unflat(vector, like)
    for _ in range(steps):
        params = {n: p.detach().requires_grad_() for n, p in params.items()}
        support_loss = loss(torch.func.functional_call(model, params, (sx,)), sy)
        grads = torch.autograd.grad(support_loss, list(params.values()))
        params = {n: p.detach() - alpha * g for (n, p), g in zip(params.items(), grads)}
    return loss(torch.func.functional_call(model, params, (qx,)), qy)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_maml_several_steps_matches_finite_differences(strategy):
    model = tiny_mlp(seed=1)
    alpha, steps = 0.03, 3
    learner = MetaLearner(model, MetaConfig("maml", task_type="regression", inner_steps=steps, inner_lr=alpha))
    batch = regression_batch(tasks=1, dtype=torch.float64, seed=3)
    params = {n: p.detach() for n, p in model.named_parameters()}
    theta = flat(params)
    got = flat({n: learner.meta_gradient(batch, strategy=strategy).grads["model." + n] for n in params})
    assert_matches_finite_differences(got, theta, lambda v: _reference_query_loss(model, v, params, batch, alpha, steps))


class _TinyAttention(nn.Module):
    """A sequence of 2-feature steps -> attention over its tokens -> mean -> one value (inputs [N, 1])."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(2, 4)
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        tokens = self.embed(torch.stack([x, torch.sin(x)], -1).expand(-1, 3, -1) * torch.tensor([[1.0], [0.5], [-1.0]], dtype=x.dtype))
        return self.head(self.attention(tokens, tokens, tokens, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("algorithm, strategy", [("maml", "loop"), ("maml", "vmap"), ("metasgd", "loop")])
def test_second_order_through_attention_matches_finite_differences(algorithm, strategy):
    """Attention's fast CPU kernel (flash attention) has no derivative of its backward: second order
    runs it on the math kernel. Every second-order variant failed on nn.MultiheadAttention or a Transformer."""
    torch.manual_seed(2)
    model = _TinyAttention().double()
    alpha, steps = 0.05, 2
    learner = MetaLearner(model, MetaConfig(algorithm, task_type="regression", inner_steps=steps, inner_lr=alpha))
    batch = regression_batch(tasks=1, dtype=torch.float64, seed=3)
    params = {n: p.detach() for n, p in model.named_parameters()}
    theta = flat(params)
    got = flat({n: learner.meta_gradient(batch, strategy=strategy).grads["model." + n] for n in params})
    assert_matches_finite_differences(got, theta, lambda v: _reference_query_loss(model, v, params, batch, alpha, steps))


def _log_cosh(outputs, targets):
    return torch.log(torch.cosh(outputs - targets)).mean()


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_a_registered_loss_is_the_inner_and_the_outer_loss(strategy):
    register_loss("test-log-cosh", _log_cosh)
    model = tiny_mlp(seed=1)
    alpha, steps = 0.03, 3
    config = dict(task_type="regression", inner_steps=steps, inner_lr=alpha, strategy=strategy)
    learner = MetaLearner(model, MetaConfig("maml", loss="test-log-cosh", **config))
    batch = regression_batch(tasks=1, dtype=torch.float64, seed=3)
    params = {n: p.detach() for n, p in model.named_parameters()}
    theta = flat(params)
    got = flat({n: learner.meta_gradient(batch).grads["model." + n] for n in params})
    assert_matches_finite_differences(got, theta, lambda v: _reference_query_loss(model, v, params, batch, alpha, steps, loss=_log_cosh))
    with_mse = flat({n: MetaLearner(model, MetaConfig("maml", **config)).meta_gradient(batch).grads["model." + n] for n in params})
    assert not torch.allclose(got, with_mse, atol=1e-4)


def assert_matches_finite_differences(gradient, theta, loss_at, directions=5, eps=1e-6, atol=1e-8):
    """``gradient . d`` equals the central difference of ``loss_at`` along random directions ``d``."""
    g = torch.Generator().manual_seed(0)
    for _ in range(directions):
        direction = torch.randn(theta.shape, generator=g, dtype=theta.dtype)
        numeric = (loss_at(theta + eps * direction) - loss_at(theta - eps * direction)) / (2 * eps)
        assert torch.isclose(gradient @ direction, numeric, rtol=1e-6, atol=atol), (gradient @ direction, numeric)


def test_metasgd_learning_rate_gradient_matches_finite_differences():
    model = tiny_mlp(seed=2)
    learner = MetaLearner(model, MetaConfig("metasgd", task_type="regression", inner_steps=2, inner_lr=0.02)).double()
    batch = regression_batch(tasks=1, dtype=torch.float64, seed=4)
    grads = learner.meta_gradient(batch).grads
    name = "lrs.body__0__weight"
    assert grads[name].abs().sum() > 0
    lrs = learner.lrs["body__0__weight"]
    index = (0, 0)
    eps = 1e-6
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            lrs[index] += sign * eps
        values.append(learner.meta_gradient(batch).loss)
        with torch.no_grad():
            lrs[index] -= sign * eps
    numeric = (values[0] - values[1]) / (2 * eps)
    assert abs(grads[name][index].item() - numeric) < 1e-6 * max(1.0, abs(numeric))


def test_fomaml_equals_query_gradient_at_adapted_parameters():
    model = tiny_mlp(seed=3)
    learner = MetaLearner(model, MetaConfig("fomaml", task_type="regression", inner_steps=3, inner_lr=0.05))
    batch = regression_batch(tasks=1, dtype=torch.float64, seed=5)
    sx, sy, qx, qy = batch.task(0)
    adapted = adapt(learner, sx, sy).params
    adapted = {n: p.clone().requires_grad_() for n, p in adapted.items()}
    loss = F.mse_loss(torch.func.functional_call(model, adapted, (qx,)), qy)
    expected = torch.autograd.grad(loss, list(adapted.values()))
    result = learner.meta_gradient(batch)
    for (name, _), g in zip(adapted.items(), expected):
        assert torch.allclose(result.grads["model." + name], g, atol=1e-12)


def test_reptile_update_equals_formula():
    model = tiny_mlp(seed=4)
    epsilon, steps, alpha = 0.3, 4, 0.02
    learner = MetaLearner(model, MetaConfig("reptile", task_type="regression", inner_steps=steps, inner_lr=alpha))
    batch = regression_batch(tasks=3, dtype=torch.float64, seed=6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = [adapt(learner, *batch.task(i)[:2]).params for i in range(len(batch))]
    optimizer = torch.optim.SGD(learner.parameters(), lr=epsilon)
    learner.meta_step(batch, optimizer)
    for name, p in model.named_parameters():
        mean_delta = torch.stack([a[name] - before[name] for a in adapted]).mean(0)
        assert torch.allclose(p.detach(), before[name] + epsilon * mean_delta, atol=1e-12)
        assert not torch.allclose(p.detach(), before[name])


def test_metasgd_and_tamaml_meta_parameters_get_gradients():
    for algorithm, prefix in (("metasgd", "lrs."), ("tamaml", "task_encoder."), ("mamlpp", "lrs.")):
        torch.manual_seed(0)
        learner = MetaLearner(Conv4(out_features=3, channels=4, image_size=16), MetaConfig(algorithm, inner_steps=2, inner_lr=0.1))
        grads = learner.meta_gradient(image_batch()).grads
        extra = {n: g for n, g in grads.items() if n.startswith(prefix)}
        assert extra, algorithm
        largest = max(g.abs().max() for g in extra.values())
        for name, g in extra.items():
            assert torch.isfinite(g).all(), (algorithm, name)
            if name.endswith("__bias") and ".body__" in name and name.split("__")[1] in ("0", "4", "8", "12"):
                # A conv bias just before batch-statistics BatchNorm is cancelled by it: its inner
                # gradient, hence its learning rate's meta-gradient, is zero up to rounding.
                assert g.abs().max() <= 1e-5 * largest, (algorithm, name)
            else:
                assert g.abs().sum() > 0, (algorithm, name)


def test_anil_leaves_body_untouched_in_inner_loop():
    torch.manual_seed(0)
    learner = MetaLearner(Conv4(out_features=3, channels=4, image_size=16), MetaConfig("anil", inner_steps=3, inner_lr=0.5))
    batch = image_batch()
    adaptation = adapt(learner, *batch.task(0)[:2])
    assert set(adaptation.params) == {"head.weight", "head.bias"}
    assert not torch.allclose(adaptation.params["head.weight"], learner.model.head.weight)
    trajectory, _ = learner.inner_loop(learner.meta_params(), {}, *batch.task(0)[:2], steps=3, create_graph=False)
    assert all(set(step) == {"head.weight", "head.bias"} for step in trajectory)
    # The body still gets an outer (meta) gradient.
    grads = learner.meta_gradient(batch).grads
    assert grads["model.body.0.weight"].abs().sum() > 0


def test_multi_step_loss_weights_anneal_to_final_step():
    from metalearn.learner import multi_step_loss_weights

    start = multi_step_loss_weights(5, 0, 100)
    late = multi_step_loss_weights(5, 99, 100)
    assert start.dtype == torch.float64  # (cast to the losses' type by the objective: float32 was 3e-8 off in float64 models)
    assert torch.allclose(start, torch.full((5,), 0.2, dtype=torch.float64))
    # (Antoniou et al.'s floor for the earlier steps while annealing, then the final step's loss alone)
    assert torch.allclose(late[:-1], torch.full((4,), 0.03 / 5, dtype=torch.float64)) and torch.isclose(late.sum(), torch.tensor(1.0, dtype=torch.float64))
    for iteration in (100, 1000):
        assert multi_step_loss_weights(5, iteration, 100).tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_derivative_order_annealing_switches_to_second_order():
    model = tiny_mlp(seed=5)
    config = MetaConfig("mamlpp", task_type="regression", inner_steps=2, inner_lr=0.05, first_order_iterations=10, multi_step_loss=False, learn_step_lrs=False)
    learner = MetaLearner(model, config)
    batch = regression_batch(tasks=2, dtype=torch.float64)
    early = learner.meta_gradient(batch, iteration=0).grads
    late = learner.meta_gradient(batch, iteration=10).grads
    first = MetaLearner(model, MetaConfig("fomaml", task_type="regression", inner_steps=2, inner_lr=0.05)).meta_gradient(batch).grads
    second = MetaLearner(model, MetaConfig("maml", task_type="regression", inner_steps=2, inner_lr=0.05)).meta_gradient(batch).grads
    for name in first:
        assert torch.allclose(early[name], first[name])
        assert torch.allclose(late[name], second[name])


def test_gradient_clipping_bounds_the_meta_gradient_norm():
    torch.manual_seed(0)
    learner = MetaLearner(tiny_mlp(dtype=torch.float32), MetaConfig("maml", task_type="regression", inner_lr=0.01, grad_clip=1e-3))
    optimizer = torch.optim.SGD(learner.parameters(), lr=1.0)
    before = torch.cat([p.detach().reshape(-1).clone() for p in learner.parameters()])
    learner.meta_step(regression_batch(), optimizer)
    after = torch.cat([p.detach().reshape(-1) for p in learner.parameters()])
    assert (after - before).norm() <= 1e-3 * (1 + 1e-4)


def test_checkpointed_inner_loop_gives_the_same_gradient():
    torch.manual_seed(0)
    learner = MetaLearner(Conv4(out_features=3, channels=4, image_size=16), MetaConfig("maml", inner_steps=3, inner_lr=0.1))
    batch = image_batch()
    calls = []
    learner.model.head.register_forward_hook(lambda *args: calls.append(1))
    plain = learner.meta_gradient(batch, strategy="loop").grads
    plain_calls, calls[:] = len(calls), []
    learner.config.checkpoint_inner = True
    checkpointed = learner.meta_gradient(batch, strategy="loop").grads
    # Recompute instead of store: the inner steps' forwards run again in the backward pass.
    assert len(calls) > plain_calls
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name
    with pytest.raises(ValueError, match="loop"):
        learner.meta_gradient(batch, strategy="vmap")


# ---------------------------------------------------------------------------
# Batched over tasks == loop
# ---------------------------------------------------------------------------


def _assert_same(a, b, atol=1e-5):
    assert abs(a.loss - b.loss) < atol
    for name in a.grads:
        assert torch.allclose(a.grads[name], b.grads[name], atol=atol, rtol=1e-4), (name, (a.grads[name] - b.grads[name]).abs().max())


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("strategy", ["vmap", "chunked:2"])
def test_batched_equals_loop_mlp_regression(algorithm, strategy):
    torch.manual_seed(0)
    learner = MetaLearner(MLP(1, (16, 16), 1), MetaConfig(algorithm, task_type="regression", inner_steps=2, inner_lr=0.02))
    batch = regression_batch(tasks=5)
    _assert_same(learner.meta_gradient(batch, strategy="loop"), learner.meta_gradient(batch, strategy=strategy))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_batched_equals_loop_conv4_batchnorm(algorithm):
    torch.manual_seed(0)
    learner = MetaLearner(Conv4(out_features=3, channels=6, image_size=16), MetaConfig(algorithm, inner_steps=2, inner_lr=0.1))
    batch = image_batch(tasks=4)
    loop = learner.meta_gradient(batch, strategy="loop")
    _assert_same(loop, learner.meta_gradient(batch, strategy="vmap"))
    _assert_same(loop, learner.meta_gradient(batch, strategy="chunked:3"))


def first_order_reference(learner, batch, steps: int, lr: float) -> dict:
    """An independent first-order meta-gradient (plain autograd, task by task): each inner gradient is
    taken at detached tensors and used as a constant; the query loss of the adapted parameters is then
    differentiated with respect to the initial ones, the tensors that were not adapted included."""
    from torch.func import functional_call

    model = learner.model
    params = dict(model.named_parameters())
    regression = learner.config.task_type == "regression"

    def loss(values, x, y):
        out = functional_call(model, values, (x,))
        return F.mse_loss(out, y) if regression else F.cross_entropy(out, y)

    total = 0.0
    count = batch.support_x.shape[0]
    for t in range(count):
        fast = {n: params[n] for n in learner.adapt_names}
        for _ in range(steps):
            held = {n: f.detach().requires_grad_() for n, f in fast.items()}
            frozen = {n: p.detach() for n, p in params.items()}
            grads = torch.autograd.grad(loss({**frozen, **held}, batch.support_x[t], batch.support_y[t]), list(held.values()))
            fast = {n: fast[n] - lr * g for n, g in zip(held, grads)}
        total = total + loss({**params, **fast}, batch.query_x[t], batch.query_y[t]) / count
    return dict(zip(params, torch.autograd.grad(total, list(params.values()))))


@pytest.mark.parametrize("task_type", ["regression", "classification"])
def test_first_order_anil_meta_gradient_matches_an_independent_computation_on_every_strategy(task_type):
    """First-order ANIL's body meta-gradient kept the inner gradient's dependence on the body features
    under vmap and chunked (up to 100% off, while the loop was right): auto picks vmap for models
    without convolutions, and every model on a GPU."""
    torch.manual_seed(0)
    regression = task_type == "regression"
    model = MLP(1, (16, 16), 1) if regression else MLP(3, (8,), 4)
    learner = MetaLearner(model.double(), MetaConfig("anil", task_type=task_type, inner_steps=3, inner_lr=0.1, first_order=True))
    if regression:
        batch = regression_batch(tasks=4, dtype=torch.float64)
    else:
        g = torch.Generator().manual_seed(1)
        batch = TaskBatch(torch.randn(3, 6, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (3, 6), generator=g),
                          torch.randn(3, 5, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (3, 5), generator=g))
    want = first_order_reference(learner, batch, steps=3, lr=0.1)
    assert any(want[n].abs().max() > 1e-3 for n in want if n.startswith("body"))  # (the case has a body gradient to get wrong)
    for strategy in ("loop", "vmap", "chunked:2"):
        got = learner.meta_gradient(batch, strategy=strategy).grads
        for name in want:
            torch.testing.assert_close(got["model." + name], want[name], atol=1e-10, rtol=1e-8, msg=lambda m: f"{strategy} {name}: {m}")


class NativeBatchNormNet(nn.Module):
    """Calls F.batch_norm(training=True) directly: the case that breaks grad-outside-vmap."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(4))
        self.shift = nn.Parameter(torch.zeros(4))
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        x = F.batch_norm(self.conv(x), None, None, self.scale, self.shift, training=True)
        return self.head(F.max_pool2d(F.relu(x), 2).flatten(1))


@pytest.mark.parametrize("algorithm", ["maml", "metasgd", "mamlpp"])
def test_batched_equals_loop_with_native_batch_norm_second_order(algorithm):
    torch.manual_seed(0)
    learner = MetaLearner(NativeBatchNormNet().double(), MetaConfig(algorithm, inner_steps=2, inner_lr=0.2)).double()
    batch = image_batch(tasks=4, dtype=torch.float64)
    loop = learner.meta_gradient(batch, strategy="loop")
    batched = learner.meta_gradient(batch, strategy="vmap")
    for name in loop.grads:
        assert torch.allclose(loop.grads[name], batched.grads[name], atol=1e-10), name


def test_unequal_task_shapes_fall_back_to_loop():
    torch.manual_seed(0)
    learner = MetaLearner(MLP(1, (8,), 1), MetaConfig("maml", task_type="regression"))
    a, b = regression_batch(tasks=1, shots=3), regression_batch(tasks=1, shots=7)
    result = learner.meta_gradient([a.task(0), b.task(0)], strategy="vmap")
    expected = {n: (learner.meta_gradient(a).grads[n] + learner.meta_gradient(b).grads[n]) / 2 for n in result.grads}
    for name in expected:
        assert torch.allclose(result.grads[name], expected[name], atol=1e-6)


# ---------------------------------------------------------------------------
# Test-time adaptation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_adapt_many_equals_adapt(algorithm):
    torch.manual_seed(0)
    learner = MetaLearner(Conv4(out_features=3, channels=4, image_size=16), MetaConfig(algorithm, inner_steps=2, inner_lr=0.1))
    batch = image_batch(tasks=3)
    many = adapt_many(learner, batch.support_x, batch.support_y, steps=3, lr=0.2)
    outputs = predict_many(learner, many, batch.query_x)
    for i in range(3):
        one = adapt(learner, batch.support_x[i], batch.support_y[i], steps=3, lr=0.2)
        assert torch.allclose(one.support_loss_after, many.support_loss_after[i], atol=1e-5)
        for name in one.params:
            assert torch.allclose(one.params[name], many.params[name][i], atol=1e-5)
        assert torch.allclose(predict(learner, one, batch.query_x[i]), outputs[i], atol=1e-4)


@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_support_shift_adapts_on_the_shifted_views(algorithm):
    from metalearn.data.images import shifted_views

    torch.manual_seed(0)
    learner = MetaLearner(Conv4(out_features=3, channels=4, image_size=16), MetaConfig(algorithm, inner_steps=2, inner_lr=0.2))
    batch = image_batch(tasks=2, shots=1)
    sx, sy = batch.support_x[0], batch.support_y[0]
    shifted = adapt(learner, sx, sy, support_shift=1)
    by_hand = adapt(learner, shifted_views(sx, 1), sy.repeat(5))
    plain = adapt(learner, sx, sy)
    for name in plain.params:
        assert torch.equal(shifted.params[name], by_hand.params[name])
    assert any(not torch.allclose(shifted.params[n], plain.params[n]) for n in plain.params)
    many = adapt_many(learner, batch.support_x, batch.support_y, support_shift=1)
    for name in plain.params:
        assert torch.allclose(many.params[name][0], shifted.params[name], atol=1e-5)
    with pytest.raises(ValueError, match="needs image inputs"):
        adapt(MetaLearner(tiny_mlp(torch.float32), MetaConfig("maml", "regression")), torch.zeros(5, 1), torch.zeros(5, 1), support_shift=1)


def test_adaptation_lowers_support_loss_and_builds_no_graph():
    torch.manual_seed(0)
    learner = MetaLearner(Conv4(out_features=3, channels=4, image_size=16), MetaConfig("maml", inner_lr=0.3))
    sx, sy, _, _ = image_batch().task(0)
    adaptation = adapt(learner, sx, sy, steps=5)
    assert adaptation.support_loss_after < adaptation.support_loss_before
    assert all(p.grad_fn is None and not p.requires_grad for p in adaptation.params.values())
    zero = adapt(learner, sx, sy, steps=0)
    assert torch.equal(zero.support_loss_before, zero.support_loss_after)


def test_support_statistics_make_predictions_independent_of_other_queries():
    torch.manual_seed(0)
    learner = MetaLearner(Conv4(out_features=3, channels=4, image_size=16), MetaConfig("maml", inner_lr=0.3))
    batch = image_batch(queries=20)
    sx, sy, qx, _ = batch.task(0)
    adaptation = adapt(learner, sx, sy, steps=2)
    assert set(adaptation.norm_stats) == {"body.1", "body.5", "body.9", "body.13"}
    alone = predict(learner, adaptation, qx[:1])
    among = predict(learner, adaptation, qx)[:1]
    assert torch.allclose(alone, among, atol=1e-5)
    transductive_alone = predict(learner, adaptation, qx[:1], transductive=True)
    transductive_among = predict(learner, adaptation, qx, transductive=True)[:1]
    assert not torch.allclose(transductive_alone, transductive_among, atol=1e-3)


def test_model_specs_rebuild_and_native_batchnorm_is_converted():
    for model in (MLP(1, (40, 40), 1), Conv4(in_channels=3, out_features=7, channels=8, image_size=32)):
        rebuilt = build_model(model.spec)
        assert rebuilt.spec == model.spec
        assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in model.parameters()]
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model({"arch": "resnet"})
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 2))
    learner = MetaLearner(net, MetaConfig("anil"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in learner.model.modules())
    assert learner.adapt_names == ["3.weight", "3.bias"]


# ---------------------------------------------------------------------------
# Every variant learns sinusoid regression
# ---------------------------------------------------------------------------

SINUSOID_SETTINGS = {
    "maml": dict(inner_steps=1, inner_lr=0.01),
    "fomaml": dict(inner_steps=1, inner_lr=0.01),
    "reptile": dict(inner_steps=5, inner_lr=0.02),
    "metasgd": dict(inner_steps=1, inner_lr=0.01),
    "anil": dict(inner_steps=1, inner_lr=0.01),
    "tamaml": dict(inner_steps=1, inner_lr=0.01),
    "mamlpp": dict(inner_steps=2, inner_lr=0.01),
}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_variant_learns_sinusoid_regression(algorithm):
    from metalearn.data import SinusoidTasks

    torch.manual_seed(0)
    source = SinusoidTasks(shots=10, queries=10)
    evaluation = source.sample(50, torch.Generator().manual_seed(123))
    learner = MetaLearner(MLP(1, (40, 40), 1), MetaConfig(algorithm, task_type="regression", **SINUSOID_SETTINGS[algorithm]))

    def post_adaptation_mse():
        adapted = adapt_many(learner, evaluation.support_x, evaluation.support_y)
        outputs = predict_many(learner, adapted, evaluation.query_x)
        return F.mse_loss(outputs, evaluation.query_y).item()

    untrained = post_adaptation_mse()
    meta_lr = 1.0 if algorithm == "reptile" else 1e-2
    optimizer = (torch.optim.SGD if algorithm == "reptile" else torch.optim.Adam)(learner.parameters(), lr=meta_lr)
    generator = torch.Generator().manual_seed(1)
    for iteration in range(300):
        learner.meta_step(source.sample(10, generator), optimizer, iteration=iteration)
    trained = post_adaptation_mse()
    assert trained < 0.5 * untrained, (untrained, trained)


@pytest.mark.parametrize("kind", ["sinusoid", "omniglot"])
def test_evaluate_scores_the_same_tasks_however_they_are_chunked(kind):
    """The chunk (how many tasks one vmapped computation adapts) is the device's business, not the result's."""
    from metalearn.data import load_task_source
    from metalearn.evaluate import evaluate

    torch.manual_seed(0)
    if kind == "sinusoid":
        source, kwargs = load_task_source("sinusoid", shots=5, queries=10), {}
        learner = MetaLearner(MLP(1, (16, 16), 1), MetaConfig("maml", task_type="regression", inner_lr=0.01))
    else:
        source, kwargs = load_task_source("omniglot", ways=3, shots=1, queries=1).split("val"), {"ways": 3, "within_group": True}
        learner = MetaLearner(Conv4(out_features=3, channels=4), MetaConfig("maml", inner_lr=0.4))
    results = [evaluate(learner, source, episodes=7, inner_steps=2, chunk=chunk, **kwargs) for chunk in (1, 3, 7)]
    per_task = [r.mean for r in results]
    assert per_task[1] == pytest.approx(per_task[0], rel=1e-5) and per_task[2] == pytest.approx(per_task[0], rel=1e-5)
    assert all(r.std == pytest.approx(results[0].std, rel=1e-4, abs=1e-6) for r in results)


def test_evaluate_predicts_among_the_tasks_classes():
    """A model with more outputs than the task's ways: a prediction is one of the task's classes, as the service
    answers over a checkpoint's n_way (evaluate took the argmax over every output: outputs no label has scored 0)."""
    from metalearn.data import load_task_source
    from metalearn.evaluate import evaluate

    torch.manual_seed(0)
    source = load_task_source("omniglot", ways=3, shots=1, queries=2).split("val")
    learner = MetaLearner(Conv4(out_features=5, channels=4), MetaConfig("maml", inner_lr=0.4))
    with torch.no_grad():
        learner.model.head.bias[3:] = 100.0  # (outputs 3 and 4, which no 3-way label is, always the largest)
    result = evaluate(learner, source, episodes=10, inner_steps=0, ways=3, within_group=True)
    assert result.mean > 0.2


@pytest.mark.parametrize("head_init,steps", [("learned", 3), ("prototypes", 2), ("prototypes", 0)])
def test_anil_adaptation_reuses_the_support_features(head_init, steps):
    """ANIL's adapt() runs the body over the support set once; what it returns equals the long way: the inner
    loop, then a whole support forward with the adapted head for the statistics and the loss after."""
    from metalearn.models import norm_statistics

    torch.manual_seed(0)
    learner = MetaLearner(Conv4(out_features=3, channels=4), MetaConfig("anil", inner_steps=2, inner_lr=0.3, head_init=head_init))
    assert learner.head_only
    support_x, support_y = torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 2, 0, 1, 2])
    learner.check_head_only(support_x)  # (once per learner, one forward: not the adaptation's own work)
    body_runs = []
    hook = learner.model.body[12].register_forward_hook(lambda *_: body_runs.append(1))  # the last conv: every body pass
    got = adapt(learner, support_x, support_y, steps=steps)
    hook.remove()
    assert len(body_runs) == 1
    batched = adapt_many(learner, support_x.unsqueeze(0), support_y.unsqueeze(0), steps=steps)

    meta, buffers = learner.meta_params(), learner.buffers_dict()
    with torch.no_grad():
        trajectory, losses = learner.inner_loop(meta, buffers, support_x, support_y, steps=steps, create_graph=False)
        adapted = trajectory[-1] if trajectory else learner.initial_fast(meta, buffers, support_x, support_y)
        with norm_statistics(learner.model) as stats:
            outputs = learner.forward_with({**learner.model_params(meta), **adapted}, buffers, support_x)
        after = learner._loss(outputs, support_y)
    assert set(got.params) == set(adapted) and set(got.norm_stats) == set(stats) and len(stats) == 4
    for name in adapted:
        torch.testing.assert_close(got.params[name], adapted[name])
        torch.testing.assert_close(batched.params[name][0], adapted[name])  # (vmapped: float32 rounding)
    for name, (mean, var) in stats.items():
        torch.testing.assert_close(got.norm_stats[name][0], mean)
        torch.testing.assert_close(got.norm_stats[name][1], var)
    torch.testing.assert_close(got.support_loss_after, after)
    torch.testing.assert_close(got.support_loss_before, losses[0] if losses else after)
