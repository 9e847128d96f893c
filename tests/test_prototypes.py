"""``head_init="prototypes"`` (Proto-MAML): the inner loop starts the head as the nearest-class-mean
classifier of the support set, and the meta-gradient flows through those class means into the body."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metalearn import MLP, Conv4, MetaConfig, MetaLearner, adapt, adapt_many, predict, predict_many
from metalearn.checkpoint import load_checkpoint, save_checkpoint
from metalearn.data.tasks import TaskBatch
from service import fastpath
from test_core import assert_matches_finite_differences, unflat


def class_batch(tasks=1, ways=3, shots=2, queries=2, features=4, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    labels = lambda k: torch.arange(ways).repeat_interleave(k).expand(tasks, -1).clone()  # noqa: E731
    centres = torch.randn(tasks, ways, 1, features, generator=g, dtype=torch.float64) * 2
    def points(k):
        return (centres.expand(-1, -1, k, -1) + torch.randn(tasks, ways, k, features, generator=g, dtype=torch.float64)).flatten(1, 2)
    return TaskBatch(points(shots), labels(shots), points(queries), labels(queries))


def image_batch(tasks=3, ways=3, shots=2, queries=2, size=16, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    labels = lambda k: torch.arange(ways).repeat_interleave(k).expand(tasks, -1).clone()  # noqa: E731
    sx = torch.randn(tasks, ways * shots, 1, size, size, generator=g, dtype=torch.float64)
    qx = torch.randn(tasks, ways * queries, 1, size, size, generator=g, dtype=torch.float64)
    return TaskBatch(sx, labels(shots), qx, labels(queries))


def conv_learner(algorithm: str) -> MetaLearner:
    torch.manual_seed(0)
    model = Conv4(out_features=3, channels=4, image_size=16)
    return MetaLearner(model, MetaConfig(algorithm, inner_steps=2, inner_lr=0.1, head_init="prototypes")).double()


@pytest.mark.parametrize("algorithm", ["anil", "maml"])
def test_the_head_starts_as_the_nearest_class_mean_classifier(algorithm):
    learner = conv_learner(algorithm)
    sx, sy, qx, qy = image_batch(tasks=1).task(0)
    adaptation = adapt(learner, sx, sy, steps=0)
    with torch.no_grad():
        support_features = learner.model.body(sx)  # BatchNorm with the support batch's statistics
        means = torch.stack([support_features[sy == c].mean(0) for c in range(3)])
        torch.testing.assert_close(adaptation.params["head.weight"], 2 * means)
        torch.testing.assert_close(adaptation.params["head.bias"], -(means * means).sum(-1))
        # Transductive prediction: queries normalised with their own batch statistics, like body(qx).
        logits = predict(learner, adaptation, qx, transductive=True)
        query_features = learner.model.body(qx)
    nearest = torch.cdist(query_features, means).argmin(-1)
    assert torch.equal(logits.argmax(-1), nearest)
    # 2 p.f - |p|^2 = |f|^2 - |f - p|^2: the logits are minus squared distances up to a per-query constant
    torch.testing.assert_close(logits - (query_features**2).sum(-1, keepdim=True), -torch.cdist(query_features, means) ** 2)


def _reference_query_loss(model, vector, like, batch, alpha, steps):
    """MAML with a prototype-initialised head, written plainly (independent of metalearn's inner loop)."""
    sx, sy, qx, qy = batch.task(0)
    vector = vector.detach().requires_grad_()  # the inner gradients are taken with respect to its views
    params = unflat(vector, like)
    body = {n[len("body."):]: p for n, p in params.items() if n.startswith("body.")}
    features = functional_call(model.body, body, (sx,))
    means = torch.stack([features[sy == c].mean(0) for c in range(3)])
    params = {**params, "head.weight": 2 * means, "head.bias": -(means * means).sum(-1)}
    for _ in range(steps):
        # The head and the body are separate variables of the inner loop: differentiate with respect
        # to fresh views, so the inner gradient leaves out the class means' dependence on the body.
        inner = {n: p.view_as(p) for n, p in params.items()}
        loss = F.cross_entropy(functional_call(model, inner, (sx,)), sy)
        grads = torch.autograd.grad(loss, list(inner.values()), create_graph=True)
        params = {n: p - alpha * g for (n, p), g in zip(inner.items(), grads)}
    return F.cross_entropy(functional_call(model, params, (qx,)), qy)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_meta_gradient_through_the_class_means_matches_finite_differences(strategy):
    torch.manual_seed(2)
    model = MLP(4, (6,), 3).double()
    alpha, steps = 0.1, 2
    learner = MetaLearner(model, MetaConfig("maml", inner_steps=steps, inner_lr=alpha, head_init="prototypes"))
    batch = class_batch(seed=3)
    params = {n: p.detach() for n, p in model.named_parameters()}
    result = learner.meta_gradient(batch, strategy=strategy)
    got = torch.cat([result.grads["model." + n].reshape(-1) for n in params])
    # The learned head is replaced by the class means: its meta-gradient is exactly zero.
    assert result.grads["model.head.weight"].abs().max() == 0 and result.grads["model.head.bias"].abs().max() == 0
    assert result.grads["model.body.0.weight"].abs().max() > 0
    theta = torch.cat([p.reshape(-1) for p in params.values()])
    loss_at = lambda vector: _reference_query_loss(model, vector, params, batch, alpha, steps)  # noqa: E731
    assert_matches_finite_differences(got, theta, loss_at, atol=1e-9)


@pytest.mark.parametrize("algorithm", ["anil", "maml", "fomaml", "metasgd", "mamlpp"])
def test_batched_equals_loop_and_adapt_many_equals_adapt(algorithm):
    learner = conv_learner(algorithm)
    batch = image_batch(tasks=3)
    loop = learner.meta_gradient(batch, strategy="loop")
    batched = learner.meta_gradient(batch, strategy="vmap")
    for name in loop.grads:
        torch.testing.assert_close(batched.grads[name], loop.grads[name], rtol=1e-8, atol=1e-10)
    many = adapt_many(learner, batch.support_x, batch.support_y, steps=2)
    outputs = predict_many(learner, many, batch.query_x)
    for i in range(3):
        one = adapt(learner, batch.support_x[i], batch.support_y[i], steps=2)
        for name in one.params:
            torch.testing.assert_close(many.params[name][i], one.params[name])
        torch.testing.assert_close(outputs[i], predict(learner, one, batch.query_x[i]))


def test_configuration_errors_and_checkpoint_round_trip(tmp_path):
    with pytest.raises(ValueError, match="classification"):
        MetaConfig("maml", task_type="regression", head_init="prototypes")
    with pytest.raises(ValueError, match="reptile"):
        MetaConfig("reptile", head_init="prototypes")
    with pytest.raises(ValueError, match="head_init"):
        MetaConfig("maml", head_init="zeros")
    # The service's MAML kernel starts from the learned head: such models take the generic path
    # (its ANIL kernel starts from the class means: tests/test_fastpath.py).
    assert fastpath.fast_kernel(conv_learner("maml")) is None
    learner = conv_learner("anil")
    save_checkpoint(tmp_path / "proto.safetensors", learner.float(), input_shape=(1, 16, 16), n_way=3)
    loaded = load_checkpoint(tmp_path / "proto.safetensors").learner
    assert loaded.config.head_init == "prototypes"
    sx, sy, qx, _ = image_batch(tasks=1).task(0)
    sx, qx = sx.float(), qx.float()
    torch.testing.assert_close(predict(loaded, adapt(loaded, sx, sy, steps=1), qx), predict(learner, adapt(learner, sx, sy, steps=1), qx))
