"""Checkpoint round trips and refusal of corrupt, truncated and incompatible files."""

from __future__ import annotations

import json
import os
import re
import struct

import pytest
import torch

from metalearn import MLP, Conv4, MetaConfig, MetaLearner, adapt, predict
from metalearn.checkpoint import CheckpointError, load_checkpoint, read_manifest, save_checkpoint
from metalearn.cli import main
from metalearn.train import optimizer_from_state, optimizer_to_state


def _conv_learner(algorithm: str = "mamlpp") -> MetaLearner:
    torch.manual_seed(0)
    return MetaLearner(Conv4(out_features=5, channels=4), MetaConfig(algorithm, inner_steps=2, inner_lr=0.3))


def _images(n: int = 10, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.arange(n) % 5


@pytest.mark.parametrize("algorithm", ["mamlpp", "tamaml", "metasgd"])
def test_a_float64_model_learns_and_comes_back_in_float64(tmp_path, algorithm):
    """What the learner adds to a model (MAML++'s per-step learning rates, TA-MAML's task encoder) takes the
    model's dtype: they were float32 on a float64 model, TA-MAML then failed ("expected m1 and m2 to have
    the same dtype") and a MAML++ checkpoint of mixed types loaded as float32."""
    torch.manual_seed(0)
    learner = MetaLearner(MLP(3, (8,), 4).double(), MetaConfig(algorithm, inner_steps=2, inner_lr=0.1))
    assert {p.dtype for p in learner.parameters()} == {torch.float64}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.arange(6) % 4
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.01)
    from metalearn import TaskBatch

    learner.meta_step(TaskBatch(x[None], y[None], x[None], y[None]), optimizer)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, learner, input_shape=(3,), n_way=4)
    loaded = load_checkpoint(path).learner
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    assert torch.equal(predict(learner, adapt(learner, x, y), x), predict(loaded, adapt(loaded, x, y), x))


@pytest.mark.parametrize("algorithm", ["maml", "mamlpp", "tamaml"])
def test_round_trip_is_bit_identical(tmp_path, algorithm):
    learner = _conv_learner(algorithm)
    # Move away from the initialisation so that every tensor matters.
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "model.safetensors"
    manifest = save_checkpoint(path, learner, input_shape=(1, 28, 28), n_way=5, inner_steps=3,
                               preprocessing={"kind": "image"}, training={"config": {"seed": 1}},
                               metrics={"metric": "accuracy", "mean": 0.5})
    loaded = load_checkpoint(path)
    assert loaded.manifest == manifest
    assert loaded.manifest["inner"] == {"steps": 3, "lr": 0.3, "lr_chosen": False, "support_shift": 0}
    x, y = _images()
    learner.eval()
    with torch.no_grad():
        assert torch.equal(learner.model(x), loaded.learner.model(x))
    a1, a2 = adapt(learner, x, y, steps=3), adapt(loaded.learner, x, y, steps=3)
    assert torch.equal(predict(learner, a1, x), predict(loaded.learner, a2, x))
    for name, tensor in learner.state_dict().items():
        assert torch.equal(tensor, loaded.learner.state_dict()[name]), name


def test_optimizer_state_round_trip_continues_identically(tmp_path):
    torch.manual_seed(0)
    learner = MetaLearner(MLP(), MetaConfig("maml", task_type="regression"))
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    x = torch.randn(8, 1)

    def step(model, opt):
        loss = model.model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step(learner, optimizer)
    state, tensors = optimizer_to_state(optimizer)
    json.dumps(state)  # the non-tensor part is plain JSON
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, learner, state_tensors=tensors, state={"optimizer": state}, input_shape=(1,))

    loaded = load_checkpoint(path)
    twin = loaded.learner.train()
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=1e-2)
    optimizer_from_state(twin_optimizer, loaded.manifest["state"]["optimizer"], loaded.state_tensors)
    step(learner, optimizer)
    step(twin, twin_optimizer)
    for (name, a), b in zip(learner.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


@pytest.fixture
def checkpoint_file(tmp_path):
    path = tmp_path / "good.safetensors"
    save_checkpoint(path, _conv_learner("maml"), input_shape=(1, 28, 28), n_way=5)
    return path


def _expect_error(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message
    return message


def test_truncated_checkpoint_is_refused(checkpoint_file):
    data = checkpoint_file.read_bytes()
    for size in (0, 5, 100, len(data) // 2, len(data) - 1):
        checkpoint_file.write_bytes(data[:size])
        _expect_error(checkpoint_file)


def test_flipped_byte_is_refused(checkpoint_file):
    data = bytearray(checkpoint_file.read_bytes())
    data[-10] ^= 0xFF
    checkpoint_file.write_bytes(bytes(data))
    _expect_error(checkpoint_file, "hash mismatch")


def test_garbage_and_pickle_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    _expect_error(garbage)
    pickled = tmp_path / "pickled.safetensors"
    torch.save({"weight": torch.zeros(3)}, pickled)
    _expect_error(pickled)
    _expect_error(tmp_path / "missing.safetensors", "no such file")


def _rewrite_manifest(path, change):
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    manifest = json.loads(header["__metadata__"]["metalearn"])
    change(manifest)
    header["__metadata__"]["metalearn"] = json.dumps(manifest)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size :])


def test_incompatible_checkpoints_are_refused(checkpoint_file, tmp_path):
    future = tmp_path / "future.safetensors"
    future.write_bytes(checkpoint_file.read_bytes())
    _rewrite_manifest(future, lambda m: m.update(format_version=99))
    _expect_error(future, "format version")

    edited = tmp_path / "edited.safetensors"
    edited.write_bytes(checkpoint_file.read_bytes())
    _rewrite_manifest(edited, lambda m: m["model_spec"].update(channels=8))
    _expect_error(edited, "hash mismatch")

    # A consistent file whose manifest describes another model than its weights.
    other = _rehashed(checkpoint_file, tmp_path / "other.safetensors", lambda m: m["model_spec"].update(channels=8))
    _expect_error(other, "do not match")


def _rehashed(source, target, change):
    """A copy of checkpoint ``source`` at ``target`` whose manifest ``change`` edited, its hash recomputed
    (what a hand edit that knows the format leaves)."""
    from metalearn.checkpoint import _read, atomic_write_bytes, content_hash
    from safetensors.torch import save as save_bytes

    manifest, tensors = _read(source)
    change(manifest)
    manifest["content_hash"] = content_hash(tensors, manifest)
    atomic_write_bytes(target, save_bytes(dict(tensors), metadata={"metalearn": json.dumps(manifest)}))
    return target


MANIFEST_EDITS = {  # a field training, eval or the service reads, made the wrong type or out of range
    "inner": lambda m: m.update(inner=[1]),
    "inner.steps": lambda m: m["inner"].update(steps="ten"),
    "inner.lr": lambda m: m["inner"].update(lr=-1),
    "inner.support_shift": lambda m: m["inner"].update(support_shift=True),
    "input_shape": lambda m: m.update(input_shape=[1, -28, 28]),
    "n_way": lambda m: m.update(n_way="five"),
    "task_type": lambda m: m.update(task_type="ranking"),
    "training": lambda m: m.update(training=[1]),
    "training.config": lambda m: m.update(training={"config": "x"}),
    "metrics": lambda m: m.update(metrics="x"),
    "preprocessing": lambda m: m.update(preprocessing=[1]),
    "model_spec": lambda m: m.update(model_spec=None),
}


@pytest.mark.parametrize("field", sorted(MANIFEST_EDITS))
def test_a_hand_edited_manifest_is_refused_naming_the_file_and_field(checkpoint_file, tmp_path, field):
    edited = _rehashed(checkpoint_file, tmp_path / "edited.safetensors", MANIFEST_EDITS[field])
    _expect_error(edited, "incompatible manifest", f"({field} must be")


def test_the_service_skips_a_hand_edited_checkpoint_and_serves_the_others(checkpoint_file, tmp_path):
    """A list where the manifest's ``inner`` object belongs stopped the whole model directory from loading."""
    from service.registry import ModelRegistry

    models = tmp_path / "models"
    models.mkdir()
    (models / "good.safetensors").write_bytes(checkpoint_file.read_bytes())
    _rehashed(checkpoint_file, models / "edited.safetensors", MANIFEST_EDITS["inner"])
    registry = ModelRegistry.load(models)
    assert registry.names() == ["good"]
    assert "inner must be a JSON object" in registry.errors[str(models / "edited.safetensors")]


def test_the_service_skips_a_model_whose_forward_fails_at_load(checkpoint_file, tmp_path, monkeypatch):
    """A registered architecture's forward can raise anything when the registry runs it once (its outputs'
    width): that model is skipped with the error, the directory still loads."""
    from service.registry import ModelRegistry

    models = tmp_path / "models"
    models.mkdir()
    (models / "good.safetensors").write_bytes(checkpoint_file.read_bytes())

    def failing(self, x):
        raise TypeError("the user's forward failed")

    monkeypatch.setattr(MetaLearner, "outputs_width", failing)
    registry = ModelRegistry.load(models)
    assert registry.names() == []
    assert "TypeError: the user's forward failed" in registry.errors[str(models / "good.safetensors")]


def test_cli_reports_bad_checkpoints_in_one_line(checkpoint_file, capsys):
    data = checkpoint_file.read_bytes()
    checkpoint_file.write_bytes(data[: len(data) // 3])
    for command in (["info", str(checkpoint_file)], ["eval", str(checkpoint_file), "--episodes", "2"]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(checkpoint_file) in err and "Traceback" not in err


def test_read_manifest_of_good_file(checkpoint_file):
    manifest = read_manifest(checkpoint_file)
    assert manifest["input_shape"] == [1, 28, 28] and manifest["n_way"] == 5


def test_a_checkpoint_is_readable_as_any_file_its_user_writes(tmp_path):
    """Written through a temporary file (mkstemp: mode 0600), a checkpoint still gets the mode open() would
    give it: a service running as another user (a container's) read none of a host-trained run before."""
    import os
    import stat

    old = os.umask(0o027)  # (not the usual 022, which is also what an unreadable umask is taken for)
    try:
        save_checkpoint(tmp_path / "m.safetensors", MetaLearner(MLP(1, (4,), 1), MetaConfig("maml", task_type="regression")), input_shape=(1,))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o640


def test_a_write_that_fails_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    """A full disk while a checkpoint is written: the error names the file (it said only 'No space left on
    device'), the previous file is intact and no temporary file is left."""
    import errno

    from metalearn.checkpoint import atomic_write_bytes

    target = tmp_path / "last.safetensors"
    atomic_write_bytes(target, b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=rf"cannot write {re.escape(str(target))} \(No space left on device\); the file as it was is kept") as caught:
        atomic_write_bytes(target, b"new")
    assert caught.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


def test_a_float64_checkpoint_loads_in_float64(tmp_path):
    learner = _conv_learner("maml").double()
    with torch.no_grad():
        learner.model.head.bias.add_(1e-12)  # (lost in a float32 round trip)
    save_checkpoint(tmp_path / "f64.safetensors", learner, input_shape=(1, 28, 28), n_way=5)
    loaded = load_checkpoint(tmp_path / "f64.safetensors").learner
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), learner.state_dict().values()))


def test_tied_weights_are_saved_and_stay_tied(tmp_path):
    """One Parameter under two names (an encoder and a decoder sharing a weight): safetensors refuses shared
    memory, so training such a model died at its first checkpoint; it saves, loads tied and predicts the same."""
    from metalearn import register_architecture

    @register_architecture("test-tied")
    class Tied(torch.nn.Module):
        def __init__(self, hidden: int = 6):
            super().__init__()
            self.encode, self.decode = torch.nn.Linear(1, hidden), torch.nn.Linear(hidden, hidden, bias=False)
            self.mix = torch.nn.Linear(hidden, hidden, bias=False)
            self.mix.weight = self.decode.weight
            self.head = torch.nn.Linear(hidden, 1)

        def forward(self, x):
            return self.head(torch.tanh(self.mix(torch.tanh(self.decode(torch.tanh(self.encode(x)))))))

    torch.manual_seed(0)
    learner = MetaLearner(Tied(), MetaConfig("maml", task_type="regression", inner_steps=2, inner_lr=0.1))
    save_checkpoint(tmp_path / "tied.safetensors", learner, input_shape=(1,))
    loaded = load_checkpoint(tmp_path / "tied.safetensors").learner
    assert loaded.model.mix.weight is loaded.model.decode.weight
    x, y = torch.linspace(-1, 1, 5).unsqueeze(1), torch.linspace(0, 1, 5).unsqueeze(1)
    learner.eval()
    assert torch.equal(predict(learner, adapt(learner, x, y), x), predict(loaded, adapt(loaded, x, y), x))


def test_a_manifest_asking_for_a_far_larger_model_than_its_weights_is_refused_unbuilt(tmp_path, monkeypatch):
    """A few bytes of file must not make the loader allocate what its manifest names (an MLP of 10^5-unit layers:
    tens of GB) before the weights are compared."""
    from safetensors.torch import save as save_bytes

    from metalearn.checkpoint import atomic_write_bytes, build_manifest, content_hash

    small = MetaLearner(MLP(1, (4, 4), 1), MetaConfig("maml", task_type="regression"))
    manifest = build_manifest(small, input_shape=(1,))
    manifest["model_spec"]["hidden"] = [100_000, 100_000]
    tensors = {n: t.detach() for n, t in small.state_dict().items()}
    manifest["content_hash"] = content_hash(tensors, manifest)
    path = tmp_path / "huge.safetensors"
    atomic_write_bytes(path, save_bytes(tensors, metadata={"metalearn": json.dumps(manifest)}))
    built = []
    real_init = MLP.__init__
    monkeypatch.setattr(MLP, "__init__", lambda self, *a, **k: (built.append(torch.empty(0).device.type), real_init(self, *a, **k))[1])
    _expect_error(path, "do not match", "of other shapes ['model.body.0.bias', 'model.body.0.weight'")
    assert built == ["meta"]  # built once, on the meta device, and refused there


def test_a_manifest_that_contradicts_the_model_is_refused_when_saved(tmp_path):
    """input_shape and n_way are checked against the model as the checkpoint is written (a forward of two
    zero inputs, as the service runs at load): a wrong one was accepted, and failed later in metalearn eval
    ("labels ... got labels from 0 to 6") or the service, in other words."""
    learner = MetaLearner(Conv4(out_features=5, channels=4), MetaConfig("maml"))
    refused = {
        "n_way above the outputs": ({"input_shape": (1, 28, 28), "n_way": 7}, "n_way 7 does not fit the model's 5 outputs"),
        "input channels": ({"input_shape": (3, 28, 28), "n_way": 5}, r"input_shape \[3, 28, 28\] does not fit the model"),
        "no input_shape": ({"n_way": 5}, "needs input_shape"),
    }
    for name, (fields, message) in refused.items():
        with pytest.raises(CheckpointError, match=message):
            save_checkpoint(tmp_path / "c.safetensors", learner, **fields)
    assert not list(tmp_path.iterdir())
    save_checkpoint(tmp_path / "c.safetensors", learner, input_shape=(1, 28, 28), n_way=3)  # (fewer ways than outputs: served so)
    assert read_manifest(tmp_path / "c.safetensors")["n_way"] == 3
    save_checkpoint(tmp_path / "c.safetensors", learner, input_shape=(1, 28, 28))  # a classifier without n_way: its outputs,
    assert read_manifest(tmp_path / "c.safetensors")["n_way"] == 5                # as the service takes it
    mlp = MetaLearner(MLP(784, (8,), 5), MetaConfig("maml"))
    with pytest.raises(CheckpointError, match=r"gives \[2, 3, 5\] for a batch of 2 inputs of input_shape \[3, 784\]"):
        save_checkpoint(tmp_path / "m.safetensors", mlp, input_shape=(3, 784), n_way=5)  # (rows: each one's outputs)
    save_checkpoint(tmp_path / "m.safetensors", mlp, input_shape=(1, 784), n_way=5)  # (one row of 784: flattened)


def test_the_save_checks_look_at_the_model_without_changing_it_and_take_token_ids(tmp_path):
    """The forward the save checks run leaves a buffer that the model changes in place as it was (it is saved
    as trained), and a model of token ids that cannot take float zeros is probed with integer ones."""
    from metalearn import register_architecture

    @register_architecture("counting-mlp-test")
    class Counting(torch.nn.Module):
        def __init__(self, width: int = 4):
            super().__init__()
            self.head = torch.nn.Linear(3, width)
            self.register_buffer("seen", torch.tensor(5.0))
            self.spec = {"arch": "counting-mlp-test", "width": width}

        def forward(self, x):
            self.seen.mul_(0.9)  # (in every mode)
            return self.head(x)

    @register_architecture("token-bag-test")
    class Tokens(torch.nn.Module):
        def __init__(self, vocabulary: int = 10):
            super().__init__()
            self.embedding = torch.nn.Embedding(vocabulary, 4)
            self.head = torch.nn.Linear(4, 3)
            self.spec = {"arch": "token-bag-test", "vocabulary": vocabulary}

        def forward(self, x):
            return self.head(self.embedding(x).mean(1))  # (no cast: float inputs fail)

    counting = MetaLearner(Counting(), MetaConfig("maml", task_type="regression"))
    save_checkpoint(tmp_path / "counting.safetensors", counting, input_shape=(3,))
    assert counting.model.seen.item() == 5.0 and load_checkpoint(tmp_path / "counting.safetensors").learner.model.seen.item() == 5.0
    save_checkpoint(tmp_path / "tokens.safetensors", MetaLearner(Tokens(), MetaConfig("maml")), input_shape=(6,), n_way=3)
    assert read_manifest(tmp_path / "tokens.safetensors")["n_way"] == 3
