"""What the library refuses or handles for a researcher's own loop: frozen parameters, ANIL's shortcut,
bad MetaConfig values, malformed task batches, dropout under vmap, and MAML++'s iteration count."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from metalearn import MLP, MetaConfig, MetaLearner, adapt, adapt_many, predict, predict_many
from metalearn.data.tasks import TaskBatch


def sine_batch(tasks=3, shots=5, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(tasks, 2 * shots, 1, generator=g) * 10 - 5
    y = torch.sin(x + torch.rand(tasks, 1, 1, generator=g))
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def label_batch(labels: torch.Tensor, tasks=2, features=4) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    x = lambda: torch.rand(tasks, len(labels), features, generator=g)  # noqa: E731
    y = labels.expand(tasks, -1).clone()
    return TaskBatch(x(), y, x(), y)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_frozen_parameters_get_no_meta_gradient_and_stay(strategy):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8, affine=False), nn.ReLU(), nn.Linear(8, 1))
    model[0].requires_grad_(False)
    learner = MetaLearner(model, MetaConfig("maml", task_type="regression", inner_steps=1, inner_lr=0.1, strategy=strategy))
    frozen = {"model.0.weight", "model.0.bias", "model.1.weight", "model.1.bias"}
    before = {n: p.detach().clone() for n, p in learner.named_parameters()}
    optimizer = torch.optim.Adam(learner.parameters(), lr=0.1)  # every parameter, as the README's loop does
    for _ in range(2):
        result = learner.meta_step(sine_batch(), optimizer)
        assert frozen.isdisjoint(result.grads) and set(result.grads) == set(before) - frozen
    after = dict(learner.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in frozen)
    assert not torch.equal(after["model.3.weight"], before["model.3.weight"])
    assert frozen.isdisjoint(learner.adapt_names)


class ScaledHead(nn.Module):
    """forward is head(body(x)) times a learned temperature: not what ANIL's shortcut computes."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 8), nn.ReLU())
        self.head = nn.Linear(8, 1)
        self.temperature = nn.Parameter(torch.tensor(3.0))

    def forward(self, x):
        return self.head(self.body(x)) * self.temperature


def test_anil_refuses_a_model_whose_forward_is_not_head_of_body():
    learner = MetaLearner(ScaledHead(), MetaConfig("anil", task_type="regression", inner_steps=1, inner_lr=0.1))
    batch = sine_batch()
    with pytest.raises(ValueError, match=r"forward\(x\) is not head\(body\(x\)\)"):
        learner.meta_gradient(batch)
    with pytest.raises(ValueError, match=r"forward\(x\) is not head\(body\(x\)\)"):
        adapt(learner, batch.support_x[0], batch.support_y[0])
    with torch.no_grad():
        learner.model.temperature.fill_(1.0)  # now it is head(body(x)): accepted
    assert learner.meta_gradient(batch).loss > 0


@pytest.mark.parametrize("settings, message", [
    ({"grad_clip": -1.0}, "grad_clip must be a positive"),
    ({"grad_clip": "1"}, "grad_clip must be a positive"),
    ({"strategy": "bogus"}, "unknown batching strategy 'bogus'"),
    ({"strategy": "chunked:0"}, "unknown batching strategy 'chunked:0'"),
    ({"strategy": "vmap", "checkpoint_inner": True}, "checkpoint_inner needs the 'loop' strategy"),
    ({"first_order": "no"}, "first_order must be true or false"),
    ({"inner_steps": 1.5}, "inner_steps must be an integer"),
    ({"multi_step_loss_iterations": -5}, "multi_step_loss_iterations and encoder_hidden must be >= 1"),
    ({"first_order_iterations": -1}, "first_order_iterations >= 0"),
    ({"encoder_hidden": 0}, "encoder_hidden must be >= 1"),
    ({"algorithm": "metasgd", "learn_step_lrs": True}, "metasgd learns a learning rate per parameter element already"),
    ({"algorithm": "reptile", "multi_step_loss": True}, "reptile has no query loss"),
])
def test_meta_config_refuses_bad_values_when_made(settings, message):
    with pytest.raises(ValueError, match=message):
        MetaConfig(**{"algorithm": "maml", **settings})


def test_meta_config_takes_what_it_took_before():
    """0 meant no clipping (checkpoints may say so); numpy numbers are numbers."""
    import numpy as np

    assert MetaConfig("maml", grad_clip=0).grad_clip is None and MetaConfig("maml", grad_clip=0.0).grad_clip is None
    config = MetaConfig("maml", inner_steps=np.int64(5), grad_clip=np.float32(1.5))
    assert (config.inner_steps, config.grad_clip) == (5, 1.5) and type(config.inner_steps) is int and type(config.grad_clip) is float


def test_unequal_classification_tasks_run_as_a_loop():
    learner = MetaLearner(MLP(4, (8,), 3), MetaConfig("maml", inner_steps=1, inner_lr=0.1))
    g = torch.Generator().manual_seed(0)
    tasks = [(torch.rand(n, 4, generator=g), torch.arange(n) % 3, torch.rand(6, 4, generator=g), torch.arange(6) % 3) for n in (3, 6)]
    assert learner.meta_gradient(tasks).loss > 0
    bad = [tasks[0], (*tasks[1][:3], torch.tensor([0, 1, 2, 0, 1, -1]))]
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\) for a model with 3 outputs, got labels from -1 to 2"):
        learner.meta_gradient(bad)


def test_malformed_task_batches_are_refused_before_training():
    classifier = MetaLearner(MLP(4, (8,), 3), MetaConfig("maml", inner_steps=1, inner_lr=0.1))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    for strategy in ("loop", "vmap"):
        as_int32 = classifier.meta_gradient(label_batch(labels.int()), strategy=strategy)
        as_int64 = classifier.meta_gradient(label_batch(labels), strategy=strategy)
        assert as_int32.loss == as_int64.loss
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\).* got labels from -100 to 2"):  # cross_entropy would ignore it
        classifier.meta_gradient(label_batch(torch.tensor([0, 1, 2, 0, 1, -100])))
    with pytest.raises(ValueError, match="labels must be integer class indices"):
        classifier.meta_gradient(label_batch(labels.float()))
    batch = label_batch(labels)
    with pytest.raises(ValueError, match="support examples, and query examples"):
        classifier.meta_gradient(TaskBatch(batch.support_x, batch.support_y, batch.query_x[:, :0], batch.query_y[:, :0]), strategy="vmap")
    regression = MetaLearner(MLP(1, (8,), 1), MetaConfig("maml", task_type="regression", inner_steps=1, inner_lr=0.1))
    batch = sine_batch()
    flat = TaskBatch(batch.support_x, batch.support_y.squeeze(-1), batch.query_x, batch.query_y.squeeze(-1))
    for strategy in ("loop", "vmap"):
        with pytest.raises(ValueError, match=r"regression targets are one row per example, shape \[T, S, outputs\] .* got \[3, 5\]"):
            regression.meta_gradient(flat, strategy=strategy)


def test_dropout_trains_under_vmap_and_adapts_in_a_stack():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1))
    learner = MetaLearner(model, MetaConfig("maml", task_type="regression", inner_steps=1, inner_lr=0.1, strategy="vmap"))
    result = learner.meta_step(sine_batch(), torch.optim.SGD(learner.parameters(), lr=0.01))
    assert torch.isfinite(torch.tensor(result.loss))
    batch = sine_batch()
    same = (batch.support_x[:1].expand(3, -1, -1), batch.support_y[:1].expand(3, -1, -1))
    adaptation = adapt_many(learner, *same)  # in training mode: dropout draws anew for each request
    weights = adaptation.params["3.weight"]
    assert weights.shape[0] == 3 and (weights[0] - weights[1]).abs().max() > 1e-3 and (weights[1] - weights[2]).abs().max() > 1e-3
    learner.eval()  # and a model in evaluation mode adapts identical requests alike (to float rounding)
    weights = adapt_many(learner, *same).params["3.weight"]
    torch.testing.assert_close(weights[0], weights[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(weights[1], weights[2], atol=1e-6, rtol=0)


class _Recurrent(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.rnn = layer(1, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):  # x [N, 1]: a sequence of 3 steps x, 2x, 3x
        return self.head(self.rnn(x.unsqueeze(1) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1))[0][:, -1])


class _RecurrentCell(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.cell = layer(1, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):  # the same 3-step sequence, one cell step at a time
        state = None
        for step in (1.0, 2.0, 3.0):
            state = self.cell(x * step, state)
            state = state[0] if isinstance(state, tuple) else state
        return self.head(state)


@pytest.mark.parametrize("layer", [nn.GRU, nn.LSTM, nn.RNN, nn.GRUCell, nn.RNNCell])
def test_recurrent_models_train_and_adapt_as_a_loop(layer):
    """torch.func.vmap cannot run torch's recurrent layers: 'auto' trains them as a loop, adapt_many and
    predict_many loop over the requests (as adapt and predict each), and an explicit vmap is refused with a
    message. Before, a GRU failed at its first meta-step with "output with shape [5, 8] doesn't match the
    broadcast shape [4, 5, 8]" and every validation (adapt_many) with it."""
    torch.manual_seed(0)
    model = _RecurrentCell(layer) if issubclass(layer, nn.RNNCellBase) else _Recurrent(layer)
    learner = MetaLearner(model, MetaConfig("maml", task_type="regression", inner_steps=2, inner_lr=0.1))
    batch = sine_batch()
    auto = learner.meta_gradient(batch)
    loop = learner.meta_gradient(batch, strategy="loop")
    assert all(torch.equal(auto.grads[n], loop.grads[n]) for n in loop.grads)
    with pytest.raises(ValueError, match=f"torch.func.vmap cannot run the model's {layer.__name__} layers; use 'loop'"):
        learner.meta_gradient(batch, strategy="chunked:2")
    learner.eval()
    stacked = adapt_many(learner, batch.support_x, batch.support_y)
    outputs = predict_many(learner, stacked, batch.query_x)
    for r in range(len(batch.support_x)):
        single = adapt(learner, batch.support_x[r], batch.support_y[r])
        assert all(torch.equal(stacked.params[n][r], p) for n, p in single.params.items())
        assert torch.equal(outputs[r], predict(learner, single, batch.query_x[r]))


@pytest.mark.parametrize("algorithm", ["maml", "anil", "reptile"])
def test_a_forward_that_returns_a_tuple_is_refused_with_what_to_do(algorithm):
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(1, 1)

        def forward(self, x):
            return self.head(x), x

    learner = MetaLearner(Pair(), MetaConfig(algorithm, task_type="regression", inner_steps=1, inner_lr=0.1))
    for run in (lambda: learner.meta_gradient(sine_batch()), lambda: adapt(learner, sine_batch().support_x[0], sine_batch().support_y[0])):
        with pytest.raises(TypeError, match="the model's forward returned a tuple; metalearn needs one tensor of outputs"):
            run()


def test_a_model_that_changes_a_buffer_in_forward_is_told_to_train_as_a_loop():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(1, 1)
            self.register_buffer("calls", torch.zeros(1))

        def forward(self, x):
            self.calls.add_(1)
            return self.head(x)

    learner = MetaLearner(Counting(), MetaConfig("maml", task_type="regression", inner_steps=1, inner_lr=0.1))
    with pytest.raises(RuntimeError, match=r"strategy 'vmap', what auto chose: a model that changes its buffers in forward.*strategy='loop'"):
        learner.meta_gradient(sine_batch())
    assert math.isfinite(learner.meta_gradient(sine_batch(), strategy="loop").loss)

    # Adapting it cannot work, and must not (each support set would move the buffer): said in words, not
    # torch.func's "attempted to call in-place operation (aten::add_.Tensor) that would mutate a captured Tensor"
    learner.eval()
    task = sine_batch()
    for run in (lambda: adapt(learner, task.support_x[0], task.support_y[0]), lambda: adapt_many(learner, task.support_x, task.support_y)):
        with pytest.raises(RuntimeError, match=r"the model's forward changes one of its buffers in place.*`if self.training:`.*torch said: During a grad"):
            run()

    class CountingWhileTraining(Counting):
        def forward(self, x):
            if self.training:
                self.calls.add_(1)
            return self.head(x)

    learner = MetaLearner(CountingWhileTraining(), MetaConfig("maml", task_type="regression", inner_steps=1, inner_lr=0.1))
    assert math.isfinite(learner.meta_gradient(sine_batch(), strategy="loop").loss)
    learner.eval()  # (as a checkpoint loads): what the message says to do adapts
    calls = learner.model.calls.clone()
    adaptation = adapt(learner, task.support_x[0], task.support_y[0])
    assert torch.isfinite(predict(learner, adaptation, task.query_x[0])).all() and torch.equal(learner.model.calls, calls)


def test_meta_step_counts_iterations_for_mamlpp():
    """MAML++'s first-order phase and loss annealing follow meta_step's own count unless told otherwise."""
    torch.manual_seed(0)
    config = MetaConfig("mamlpp", task_type="regression", inner_steps=2, inner_lr=0.1, first_order_iterations=2)
    learner = MetaLearner(MLP(1, (8,), 1), config)
    batch = sine_batch()
    at = {i: learner.meta_gradient(batch, iteration=i).grads["model.head.weight"] for i in (0, 2)}
    assert not torch.allclose(at[0], at[2])  # first order, then second
    assert torch.equal(learner.meta_gradient(batch).grads["model.head.weight"], at[0])
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)  # (steps that change nothing)
    for _ in range(2):
        learner.meta_step(batch, optimizer)
    assert learner.meta_steps_taken == 2
    assert torch.equal(learner.meta_gradient(batch).grads["model.head.weight"], at[2])


def test_batchnorm_conversion_keeps_the_models_dtype_and_device():
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.BatchNorm1d(8, affine=False, track_running_stats=False),
                          nn.Linear(8, 1)).double()
    learner = MetaLearner(model, MetaConfig("maml", task_type="regression", inner_steps=1, inner_lr=0.1))
    assert {p.dtype for p in learner.parameters()} == {torch.float64}
    batch = sine_batch()
    x = lambda t: t.expand(*t.shape[:-1], 3).double()  # noqa: E731
    learner.meta_step(TaskBatch(x(batch.support_x), batch.support_y.double(), x(batch.query_x), batch.query_y.double()),
                      torch.optim.SGD(learner.parameters(), lr=0.01))
    with torch.device("meta"):  # a layer with neither weights nor statistics follows the model's first parameter
        on_meta = MetaLearner(nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8, affine=False, track_running_stats=False), nn.Linear(8, 1)),
                              MetaConfig("maml", task_type="regression"))
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}


def test_a_learner_with_nothing_to_adapt_is_refused():
    frozen = MLP(1, (8,), 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters to adapt"):
        MetaLearner(frozen, MetaConfig("maml", task_type="regression"))
    with pytest.raises(ValueError, match="no trainable parameters to adapt"):
        MetaLearner(nn.Sequential(nn.Linear(1, 1), nn.ReLU()).requires_grad_(False), MetaConfig("maml", task_type="regression"))
    model = MLP(1, (8,), 1)
    model.head.requires_grad_(False)
    with pytest.raises(ValueError, match="the model's head has no trainable parameters"):
        MetaLearner(model, MetaConfig("anil", task_type="regression"))
    model.head.bias.requires_grad_(True)  # a frozen head weight stays as it is: ANIL adapts the bias only
    learner = MetaLearner(model, MetaConfig("anil", task_type="regression", inner_steps=2, inner_lr=0.5))
    batch = sine_batch()
    adapted = adapt(learner, batch.support_x[0], batch.support_y[0]).params
    assert set(adapted) == {"head.bias"}


def test_an_optimizer_that_misses_learned_parameters_is_refused():
    learner = MetaLearner(MLP(1, (8,), 1), MetaConfig("metasgd", task_type="regression", inner_steps=1, inner_lr=0.1))
    with pytest.raises(ValueError, match=r"the optimizer does not update lrs\.body__0__bias, lrs\.body__0__weight, .*learner\.parameters\(\)"):
        learner.meta_step(sine_batch(), torch.optim.Adam(learner.model.parameters(), lr=1e-3))
    assert learner.meta_steps_taken == 0 and all(p.grad is None for p in learner.parameters())


def test_meta_step_adds_to_a_gradient_already_there():
    """A regulariser's gradient taken before meta_step is kept, as loss.backward() would keep it."""
    batch = sine_batch()
    steps = {}
    for regularised in (False, True):
        torch.manual_seed(0)
        learner = MetaLearner(MLP(1, (8,), 1), MetaConfig("maml", task_type="regression", inner_steps=1, inner_lr=0.1))
        optimizer = torch.optim.SGD(learner.parameters(), lr=1.0)
        before = {n: p.detach().clone() for n, p in learner.named_parameters()}
        if regularised:
            (0.5 * learner.model.head.weight.pow(2).sum()).backward()
        result = learner.meta_step(batch, optimizer)
        steps[regularised] = {n: before[n] - p.detach() for n, p in learner.named_parameters()}
    torch.testing.assert_close(steps[False]["model.head.weight"], result.grads["model.head.weight"])
    torch.testing.assert_close(steps[True]["model.head.weight"] - steps[False]["model.head.weight"], before["model.head.weight"])
    torch.testing.assert_close(steps[True]["model.body.0.weight"], steps[False]["model.body.0.weight"])


def test_labels_beyond_the_models_outputs_are_refused_for_every_strategy():
    classifier = MetaLearner(MLP(4, (8,), 3), MetaConfig("maml", inner_steps=1, inner_lr=0.1))
    for strategy in ("loop", "vmap", "chunked:1"):  # (under vmap, an index error from a decomposition before)
        with pytest.raises(ValueError, match=r"class indices in \[0, 3\) for a model with 3 outputs, got labels from 0 to 3"):
            classifier.meta_gradient(label_batch(torch.tensor([0, 1, 2, 3])), strategy=strategy)


def test_misshaped_batches_and_support_sets_are_refused_not_misread():
    regression = MetaLearner(MLP(1, (8,), 1), MetaConfig("maml", task_type="regression", inner_steps=1, inner_lr=0.1))
    batch = sine_batch(tasks=4)
    stacked = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    for given in (stacked, list(stacked)):  # four stacked tensors read as a list of tasks trained on the wrong thing
        with pytest.raises(ValueError, match="pass TaskBatch"):
            regression.meta_gradient(given)
    one_task = TaskBatch(batch.support_x[0], batch.support_y[0], batch.query_x[0], batch.query_y[0])  # [S, 1]: S tasks of one?
    with pytest.raises(ValueError, match=r"regression targets are one row per example, shape \[T, S, outputs\]"):
        regression.meta_gradient(one_task)
    with pytest.raises(ValueError, match=r"shape \[S, outputs\] .* got \[5\]"):
        adapt(regression, batch.support_x[0], batch.support_y[0, :, 0])
    classifier = MetaLearner(MLP(4, (8,), 3), MetaConfig("maml", inner_steps=1, inner_lr=0.1))
    tasks = label_batch(torch.tensor([0, 1, 2, 0, 1, 2]))
    with pytest.raises(ValueError, match=r"one class index per example, shape \[S\], got \[2, 6\].*adapt_many"):
        adapt(classifier, tasks.support_x, tasks.support_y)  # a stack of support sets is not one support set
    assert adapt_many(classifier, tasks.support_x, tasks.support_y).params["head.weight"].shape[0] == 2
    with pytest.raises(ValueError, match="use task_type='regression'"):
        adapt(classifier, tasks.support_x[0], tasks.support_y[0].float())


def test_meta_config_switches_are_booleans_not_numbers():
    with pytest.raises(ValueError, match="first_order must be true or false, got 1"):
        MetaConfig("maml", first_order=1)


def test_losses_are_named_and_registered_once():
    import torch.nn.functional as F

    from metalearn import register_loss

    assert MetaConfig("maml").loss == "cross_entropy" and MetaConfig("maml", task_type="regression").loss == "mse"
    with pytest.raises(ValueError, match=r"unknown loss 'hinge'.*metalearn.register_loss.*METALEARN_MODEL_MODULES"):
        MetaConfig("maml", loss="hinge")
    with pytest.raises(ValueError, match="loss 'cross_entropy' is classification's, not regression's"):
        MetaConfig("maml", task_type="regression", loss="cross_entropy")
    with pytest.raises(ValueError, match="'mse' is a built-in loss"):
        register_loss("mse", F.l1_loss)

    @register_loss("test-l1")
    def l1(outputs, targets):
        return F.l1_loss(outputs, targets)

    register_loss("test-l1", l1)  # (the same function again: a module imported twice, a notebook cell run again)
    with pytest.raises(ValueError, match="loss 'test-l1' is already registered for"):
        register_loss("test-l1", F.l1_loss)
    assert MetaConfig("maml", task_type="regression", loss="test-l1").to_dict()["loss"] == "test-l1"
    # The task's own loss goes without saying: a checkpoint of it stays loadable by releases before losses were named
    assert "loss" not in MetaConfig("maml").to_dict() and MetaConfig(**MetaConfig("maml").to_dict()).loss == "cross_entropy"


def test_step_results_give_each_tasks_query_loss_and_accuracy():
    classifier = MetaLearner(MLP(4, (8,), 3), MetaConfig("maml", inner_steps=1, inner_lr=0.1))
    batch = label_batch(torch.tensor([0, 1, 2, 0, 1, 2]), tasks=3)
    for strategy in ("loop", "vmap"):
        result = classifier.meta_gradient(batch, strategy=strategy)
        assert len(result.task_losses) == 3 and len(result.task_accuracies) == 3
        assert result.loss == pytest.approx(sum(result.task_losses) / 3) and result.accuracy == pytest.approx(sum(result.task_accuracies) / 3)
        alone = classifier.meta_gradient(TaskBatch(*(t[1:2] for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y))))
        assert result.task_losses[1] == pytest.approx(alone.loss, rel=1e-5)
    assert MetaLearner(MLP(1, (8,), 1), MetaConfig("maml", task_type="regression")).meta_gradient(sine_batch()).task_accuracies is None


def test_meta_step_in_eval_mode_warns_once():
    learner = MetaLearner(MLP(1, (8,), 1), MetaConfig("maml", task_type="regression")).eval()
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
    with pytest.warns(UserWarning, match=r"eval mode .* call learner.train\(\) first"):
        learner.meta_step(sine_batch(), optimizer)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner.meta_step(sine_batch(), optimizer)  # (once is enough)
        learner.train().meta_step(sine_batch(), optimizer)


@pytest.mark.parametrize("many", [False, True])
def test_adapt_refuses_what_a_meta_step_refuses(many):
    """An empty support set (a silent NaN adaptation before) and labels outside the model's outputs (torch's
    "Target 3 is out of bounds", or -100 ignored) get meta_step's messages from adapt and adapt_many."""
    classifier = MetaLearner(MLP(4, (8,), 3), MetaConfig("maml", inner_steps=1, inner_lr=0.1))
    tasks = label_batch(torch.tensor([0, 1, 2, 0, 1, 2]))
    run = (lambda x, y: adapt_many(classifier, x, y)) if many else (lambda x, y: adapt(classifier, x[0], y[0]))
    with pytest.raises(ValueError, match="every task needs support examples: got a support set of size 0"):
        run(tasks.support_x[:, :0], tasks.support_y[:, :0])
    for labels, shown in (([0, 1, 2, 0, 1, 3], "0 to 3"), ([0, 1, 2, 0, 1, -100], "-100 to 2"), ([0, -1, 2, 0, 1, 2], "-1 to 2")):
        bad = torch.tensor(labels).expand(2, -1)
        with pytest.raises(ValueError, match=rf"class indices in \[0, 3\) for a model with 3 outputs, got labels from {shown}"):
            run(tasks.support_x, bad)
        with pytest.raises(ValueError, match=rf"class indices in \[0, 3\) for a model with 3 outputs, got labels from {shown}"):
            classifier.meta_gradient(TaskBatch(tasks.support_x, bad, tasks.query_x, tasks.query_y))  # (the same words)
    regression = MetaLearner(MLP(1, (8,), 1), MetaConfig("maml", task_type="regression", inner_steps=1, inner_lr=0.1))
    batch = sine_batch()
    with pytest.raises(ValueError, match="every task needs support examples: got a support set of size 0"):
        (adapt_many(regression, batch.support_x[:, :0], batch.support_y[:, :0]) if many
         else adapt(regression, batch.support_x[0, :0], batch.support_y[0, :0]))
    assert torch.isfinite(run(tasks.support_x, tasks.support_y).support_loss_after).all()


def test_adapt_many_refuses_an_empty_stack_and_meta_batches_any_empty_task():
    classifier = MetaLearner(MLP(4, (8,), 3), MetaConfig("maml", inner_steps=1, inner_lr=0.1))
    tasks = label_batch(torch.tensor([0, 1, 2, 0, 1, 2]))
    with pytest.raises(ValueError, match="the stack of support sets has no tasks"):  # (an IndexError before)
        adapt_many(classifier, tasks.support_x[:0], tasks.support_y[:0])
    g = torch.Generator().manual_seed(0)
    unequal = [(torch.rand(n, 4, generator=g), torch.arange(n) % 3, torch.rand(6, 4, generator=g), torch.arange(6) % 3) for n in (3, 0)]
    with pytest.raises(ValueError, match="support examples, and query examples for its query loss: got a support set of size 0"):
        classifier.meta_gradient(unequal)  # (only the first task's sets were looked at)


@pytest.mark.parametrize("settings, message", [
    ({"lr": -1}, "lr must be a positive finite number, got -1"),
    ({"lr": 0}, "lr must be a positive finite number, got 0"),
    ({"lr": float("nan")}, "lr must be a positive finite number, got nan"),
    ({"lr": float("inf")}, "lr must be a positive finite number, got inf"),
    ({"lr": True}, "lr must be a positive finite number, got True"),
    ({"lr": "0.1"}, "lr must be a positive finite number, got '0.1'"),
    ({"steps": 1.5}, "steps must be an integer, got 1.5"),
    ({"steps": True}, "steps must be an integer, got True"),
    ({"steps": -1}, "steps must be >= 0, got -1"),
])
@pytest.mark.parametrize("many", [False, True])
def test_adapt_refuses_bad_steps_and_learning_rates(settings, message, many):
    learner = MetaLearner(MLP(1, (8,), 1), MetaConfig("maml", task_type="regression", inner_steps=1, inner_lr=0.1))
    batch = sine_batch()
    with pytest.raises(ValueError, match=message):
        if many:
            adapt_many(learner, batch.support_x, batch.support_y, **settings)
        else:
            adapt(learner, batch.support_x[0], batch.support_y[0], **settings)


def test_adapt_takes_numpy_numbers_and_bools_are_no_learning_rate():
    import numpy as np

    learner = MetaLearner(MLP(1, (8,), 1), MetaConfig("maml", task_type="regression", inner_steps=1, inner_lr=0.1))
    batch = sine_batch()
    with_numpy = adapt(learner, batch.support_x[0], batch.support_y[0], steps=np.int64(2), lr=np.float32(0.25))
    plain = adapt(learner, batch.support_x[0], batch.support_y[0], steps=2, lr=0.25)
    torch.testing.assert_close(with_numpy.params, plain.params)
    with pytest.raises(ValueError, match="inner_lr must be a positive finite number, got True"):
        MetaConfig("maml", inner_lr=True)


def test_adapt_reads_no_label_values_where_that_would_wait_or_be_recorded():
    """The service records adaptations on fake tensors (service.cpu_scripts) and captures them in CUDA graphs:
    a check that read the labels' values would fail to record, or wait for the GPU, on every request. The
    service checks a request's labels itself, before they reach the device."""
    from torch.fx.experimental.proxy_tensor import make_fx

    classifier = MetaLearner(MLP(4, (8,), 3), MetaConfig("maml", inner_steps=1, inner_lr=0.1))
    tasks = label_batch(torch.tensor([0, 1, 2, 0, 1, 2]))
    for fn, args in ((lambda x, y: adapt_many(classifier, x, y, steps=2, lr=0.1).support_loss_after, (tasks.support_x, tasks.support_y)),
                     (lambda x, y: adapt(classifier, x, y, steps=2, lr=0.1).support_loss_after, (tasks.support_x[0], tasks.support_y[0]))):
        recorded = make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(*args)
        assert "aminmax" not in recorded.code
        torch.testing.assert_close(recorded(*args), fn(*args))


def test_inputs_of_another_float_dtype_than_the_model_are_refused_naming_both():
    """float64 inputs (a numpy array's default) to a float32 model failed with torch's "mat1 and mat2 must have
    the same dtype, but got Double and Float"; adapt, predict and a meta-step now say what to convert."""
    learner = MetaLearner(MLP(1, (8,), 1), MetaConfig("maml", task_type="regression"))
    x, y = torch.randn(5, 1, dtype=torch.float64), torch.randn(5, 1)
    message = r"the inputs are torch.float64 and the model's parameters torch.float32: convert the inputs"
    with pytest.raises(ValueError, match=message):
        adapt(learner, x, y)
    with pytest.raises(ValueError, match=message):
        predict(learner, adapt(learner, x.float(), y), x)
    batch = TaskBatch(x.unsqueeze(0), y.unsqueeze(0), x.unsqueeze(0), y.unsqueeze(0))
    with pytest.raises(ValueError, match=message):
        learner.meta_step(batch, torch.optim.Adam(learner.parameters()))
    learner.double()
    predict(learner, adapt(learner, x, y.double()), x)  # (in the model's dtype: taken)
