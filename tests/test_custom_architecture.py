"""A model class of the user's own (tests/architecture_plugin.py, registered as ``tiny-cnn``) and a loss of theirs
(``smoothed-ce``): the spec, checkpoints, ``metalearn train``/``eval``/``info`` and the service, and the refusals
around them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from architecture_plugin import TinyCNN
from metalearn import Conv4, MetaConfig, MetaLearner, adapt, build_model, predict, register_architecture
from metalearn.checkpoint import CheckpointError, load_checkpoint, read_manifest, save_checkpoint
from metalearn.cli import EXIT_ERROR, main
from metalearn.data.preprocess import OMNIGLOT_PREPROCESSING
from test_service_helpers import ROOT, ServerProcess, image_tasks, train_and_save

TESTS = Path(__file__).resolve().parent
PLUGIN = "architecture_plugin"


def plugin_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess that can import the plugin (METALEARN_* of this process dropped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METALEARN_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS)])
    env.update(extra)
    return env


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metalearn.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    learner = MetaLearner(TinyCNN(width=4), MetaConfig("maml", inner_steps=2, inner_lr=0.4, first_order=True))
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    return train_and_save(path, learner, [image_tasks(seed=s) for s in range(2)], input_shape=(1, 28, 28), n_way=5,
                          preprocessing=OMNIGLOT_PREPROCESSING)


def test_the_spec_is_the_constructor_arguments():
    assert TinyCNN(width=4).spec == {"arch": "tiny-cnn", "in_channels": 1, "out_features": 5, "width": 4, "head_scale": 1.0}
    assert TinyCNN(2, 3, 6).spec == {"arch": "tiny-cnn", "in_channels": 2, "out_features": 3, "width": 6, "head_scale": 1.0}
    rebuilt = build_model(TinyCNN(width=4).spec)
    assert type(rebuilt) is TinyCNN and rebuilt.spec == TinyCNN(width=4).spec
    with pytest.raises(ValueError, match="bad model spec.*'depth'"):
        build_model({"arch": "tiny-cnn", "depth": 3})
    with pytest.raises(ValueError, match="bad model spec.*'hidden': 5"):  # an argument its constructor cannot use
        build_model({"arch": "mlp", "hidden": 5})


def test_registration_refuses_what_a_spec_cannot_rebuild():
    with pytest.raises(ValueError, match="built-in"):
        register_architecture("conv4")(TinyCNN)
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("tiny-cnn")(type("TinyCNN2", (nn.Module,), {}))

    class Positional(nn.Module):
        def __init__(self, *sizes: int):
            super().__init__()

    with pytest.raises(TypeError, match=r"\*args"):
        register_architecture("positional")(Positional)

    class NamedArch(nn.Module):
        def __init__(self, arch: str = "x"):
            super().__init__()

    with pytest.raises(TypeError, match="'arch'"):
        register_architecture("named-arch")(NamedArch)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_architecture("function")(lambda: nn.Linear(1, 1))
    with pytest.raises(ValueError, match="TinyCNN is already registered as 'tiny-cnn'"):
        register_architecture("tiny-cnn-alias")(TinyCNN)  # its instances' spec could name only one
    assert TinyCNN().spec["arch"] == "tiny-cnn"
    with pytest.raises(ValueError, match="unknown architecture 'positional'.*METALEARN_MODEL_MODULES"):
        build_model({"arch": "positional"})  # none of the refused ones was registered


def test_save_refuses_a_model_it_could_not_rebuild(tmp_path):
    class Unregistered(TinyCNN):  # an instance of a subclass is not a TinyCNN to rebuild
        pass

    assert not hasattr(Unregistered(), "spec")
    config = MetaConfig("maml", inner_steps=1)
    with pytest.raises(CheckpointError, match="Unregistered.*has no 'spec'.*register_architecture"):
        save_checkpoint(tmp_path / "a.safetensors", MetaLearner(Unregistered(), config), input_shape=(1, 28, 28))
    with pytest.raises(CheckpointError, match="not JSON: argument 'head_scale' = np.float32.*float"):
        save_checkpoint(tmp_path / "b.safetensors", MetaLearner(TinyCNN(head_scale=np.float32(0.5)), config),
                        input_shape=(1, 28, 28))
    assert not list(tmp_path.iterdir())


def test_checkpoint_round_trip_gives_the_same_adaptation(checkpoint):
    task = image_tasks(tasks=1, seed=7)
    sx, sy, qx = task.support_x[0], task.support_y[0], task.query_x[0]
    manifest = read_manifest(checkpoint)
    assert manifest["model_spec"] == {"arch": "tiny-cnn", "in_channels": 1, "out_features": 5, "width": 4, "head_scale": 1.0}
    first, second = load_checkpoint(checkpoint).learner, load_checkpoint(checkpoint).learner
    assert torch.equal(predict(first, adapt(first, sx, sy), qx), predict(second, adapt(second, sx, sy), qx))


def assert_eval_needs_the_module(checkpoint: Path, unknown: str) -> None:
    """metalearn eval refuses ``checkpoint`` in one line naming what is ``unknown`` without the plugin, and evaluates it with it."""
    refused = cli(plugin_env(), "eval", str(checkpoint), "--episodes", "2")
    assert refused.returncode == EXIT_ERROR and refused.stderr.count("\n") == 1, refused.stderr
    assert unknown in refused.stderr and "METALEARN_MODEL_MODULES" in refused.stderr
    evaluated = cli(plugin_env(METALEARN_MODEL_MODULES=PLUGIN), "eval", str(checkpoint), "--task", "omniglot",
                    "--episodes", "2", "--no-progress", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout.splitlines()[-1])["metric"] == "accuracy"


def test_eval_and_info_need_the_module_imported(checkpoint):
    assert_eval_needs_the_module(checkpoint, "unknown architecture 'tiny-cnn'")
    info = cli(plugin_env(METALEARN_MODEL_MODULES=PLUGIN), "info", str(checkpoint), "--json")
    assert json.loads(info.stdout)["model_spec"]["arch"] == "tiny-cnn"
    missing = cli(plugin_env(METALEARN_MODEL_MODULES="no_such_module"), "info", str(checkpoint))
    assert missing.returncode == EXIT_ERROR and missing.stderr.count("\n") == 1, missing.stderr
    assert "METALEARN_MODEL_MODULES: no module named 'no_such_module'; is the directory" in missing.stderr
    as_file = cli(plugin_env(METALEARN_MODEL_MODULES=PLUGIN + ".py"), "info", str(checkpoint))
    assert "(a module's name, not its file's: 'architecture_plugin')" in as_file.stderr, as_file.stderr


def test_a_module_that_fails_to_import_is_said_with_where(tmp_path):
    (tmp_path / "broken_models.py").write_text("import metalearn\n\nraise RuntimeError('missing config file')\n")
    (tmp_path / "needs_more.py").write_text("import no_such_dependency\n")
    for module, expected in (("broken_models", "RuntimeError: missing config file (at "),
                             ("needs_more", "ModuleNotFoundError: No module named 'no_such_dependency' (at ")):
        env = plugin_env(METALEARN_MODEL_MODULES=module)
        env["PYTHONPATH"] += os.pathsep + str(tmp_path)
        failed = cli(env, "info", "nowhere.safetensors")
        assert failed.returncode == EXIT_ERROR and failed.stderr.count("\n") == 1, failed.stderr
        assert f"METALEARN_MODEL_MODULES: importing {module!r} failed: {expected}" in failed.stderr
        assert f"{module}.py:" in failed.stderr


def test_train_builds_it_from_the_config(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("METALEARN_MODEL_MODULES", PLUGIN)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["train", "--task", "omniglot", "--algorithm", "fomaml", "--ways", "3", "--shots", "1",
                     "--queries", "1", "--meta-batch", "1", "--inner-steps", "1", "--iterations", "2",
                     "--val-interval", "2", "--val-episodes", "2", "--out", str(tmp_path / "run"), "--no-progress",
                     "--set", "model={arch: tiny-cnn, width: 4}"])
    finally:
        torch.set_num_threads(previous)
    assert code == 0, capsys.readouterr().err
    # The task filled in in_channels and out_features (3 ways); the config gave the width.
    spec = read_manifest(tmp_path / "run" / "best.safetensors")["model_spec"]
    assert spec == {"arch": "tiny-cnn", "in_channels": 1, "out_features": 3, "width": 4, "head_scale": 1.0}


def test_train_config_model_settings_merge_and_the_model_is_checked_first(tmp_path, capsys, monkeypatch):
    """``--set model=`` adds to a config file's model unless it names another architecture; a model that
    fails on the task's inputs, or gives other than one output per way, stops the run before training."""
    from metalearn.train import resolve_config

    monkeypatch.setenv("METALEARN_MODEL_MODULES", PLUGIN)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text("task: omniglot\nalgorithm: fomaml\nways: 3\nmodel: {arch: tiny-cnn, width: 4}\n")
    assert resolve_config(str(config_file), {"model": {"head_scale": 0.5}}).model == {"arch": "tiny-cnn", "width": 4, "head_scale": 0.5}
    assert resolve_config(str(config_file), {"model": {"arch": "conv4", "channels": 8}}).model == {"arch": "conv4", "channels": 8}
    common = ["train", "--config", str(config_file), "--iterations", "1", "--out", str(tmp_path / "run"), "--no-progress"]
    cases = (
        ("model={out_features: 5}", "model 'tiny-cnn' gives outputs [2, 5] for a batch of 2 of the task's inputs; the task needs [2, 3]"),
        ("model={in_channels: 3}", "model 'tiny-cnn' failed on a batch of the task's inputs (shape [2, 1, 28, 28]): RuntimeError"),
    )
    for setting, message in cases:
        assert main([*common, "--set", setting]) == EXIT_ERROR
        data, err = capsys.readouterr().err.split("\n", 1)  # the line on the data, then the error's
        assert data.startswith("data: omniglot: 242 classes") and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_the_service_serves_it_like_offline_adaptation(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # (ServerProcess puts the repository before it)
    server = ServerProcess(checkpoint.parent, tmp_path / "server.log", cli=True, model_modules=PLUGIN).wait_ready()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            described = http.get("/v1/models/tiny")
            assert described.status_code == 200, described.text
            assert described.json()["algorithm"] == "maml" and described.json()["n_way"] == 5
            task = image_tasks(tasks=1, queries=3, seed=11)
            sx, sy, qx = task.support_x[0], task.support_y[0], task.query_x[0]
            created = http.post("/v1/models/tiny/adapt", json={"support": {"x": sx.tolist(), "y": sy.tolist()}})
            assert created.status_code == 201, created.text
            answer = http.post(f"/v1/sessions/{created.json()['session_id']}/predict", json={"x": qx.tolist()})
            assert answer.status_code == 200, answer.text
    finally:
        server.stop()
    learner = load_checkpoint(checkpoint).learner
    expected = torch.softmax(predict(learner, adapt(learner, sx, sy), qx), -1)
    np.testing.assert_allclose(answer.json()["probabilities"], expected.numpy(), atol=1e-5)


def test_inputs_the_models_own_code_refuses_are_a_422(tmp_path, monkeypatch):
    """Token ids past an nn.Embedding's vocabulary make the model's forward raise IndexError: the request's
    fault (422 inputs-refused-by-the-model, with torch's words), not a 500; the good requests of its batch
    are answered, and the service serves on."""
    from architecture_plugin import TokenBag, TokenSequence

    torch.manual_seed(0)
    for name, model in (("tokens", TokenBag()), ("sequence", TokenSequence())):  # (the second's forward is torch's)
        learner = MetaLearner(model, MetaConfig("maml", task_type="regression", inner_steps=2, inner_lr=0.1))
        save_checkpoint(tmp_path / "models" / f"{name}.safetensors", learner, input_shape=(3,))
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    server = ServerProcess(tmp_path / "models", tmp_path / "server.log", cli=True, model_modules=PLUGIN).wait_ready()
    try:
        def body(largest_id):
            return {"support": {"x": [[1, 2, 3], [4, 5, largest_id]], "y": [0.5, -0.5]}, "query": {"x": [[7, 8, 9]]}}

        with httpx.Client(base_url=server.url, timeout=60) as http:
            for name in ("tokens", "sequence"):
                answers = [http.post(f"/v1/models/{name}/predict", json=body(i)) for i in (6, 12, 9)]
                assert [a.status_code for a in answers] == [200, 422, 200], [a.text for a in answers]
                problem = answers[1].json()
                assert problem["type"].endswith("/inputs-refused-by-the-model") and "IndexError: index out of range" in problem["detail"]
            assert http.get("/healthz").status_code == 200
    finally:
        server.stop()
    assert "refused its inputs (IndexError" in (tmp_path / "server.log").read_text()


def test_the_service_refuses_to_start_without_its_module(checkpoint, tmp_path):
    server = ServerProcess(checkpoint.parent, tmp_path / "server.log", cli=True, model_modules="no_such_module")
    try:
        assert server.process.wait(120) == EXIT_ERROR
        assert "error: METALEARN_MODEL_MODULES: no module named 'no_such_module'" in server.log()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def smoothed_checkpoint(tmp_path_factory) -> Path:
    """A Conv4 MAML model, the kind the service has fast kernels for, meta-learned with the plugin's loss."""
    torch.manual_seed(0)
    learner = MetaLearner(Conv4(out_features=5, channels=8), MetaConfig("maml", inner_steps=2, inner_lr=0.4, first_order=True, loss="smoothed-ce"))
    path = tmp_path_factory.mktemp("models") / "smoothed.safetensors"
    return train_and_save(path, learner, [image_tasks(seed=s) for s in range(2)], input_shape=(1, 28, 28), n_way=5,
                          preprocessing=OMNIGLOT_PREPROCESSING)


def test_a_registered_loss_is_recorded_and_needs_its_module_to_load(smoothed_checkpoint):
    assert read_manifest(smoothed_checkpoint)["meta_config"]["loss"] == "smoothed-ce"
    assert load_checkpoint(smoothed_checkpoint).learner.config.loss == "smoothed-ce"  # (this process imported the plugin)
    assert_eval_needs_the_module(smoothed_checkpoint, "unknown loss 'smoothed-ce'")


def test_the_service_adapts_with_the_models_own_loss(smoothed_checkpoint, tmp_path, monkeypatch):
    """The service's fast kernels compute cross-entropy: a model of another loss adapts through the generic path,
    as metalearn.adapt does."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    task = image_tasks(tasks=1, queries=3, seed=11)
    sx, sy, qx = task.support_x[0], task.support_y[0], task.query_x[0]
    learner = load_checkpoint(smoothed_checkpoint).learner
    expected = torch.softmax(predict(learner, adapt(learner, sx, sy), qx), -1)
    learner.config.loss, learner._loss = "cross_entropy", torch.nn.functional.cross_entropy
    with_cross_entropy = torch.softmax(predict(learner, adapt(learner, sx, sy), qx), -1)
    assert (expected - with_cross_entropy).abs().max() > 1e-3  # (the loss makes a difference this test can see)
    server = ServerProcess(smoothed_checkpoint.parent, tmp_path / "server.log", cli=True, model_modules=PLUGIN).wait_ready()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert http.get("/v1/models/smoothed").json()["loss"] == "smoothed-ce"
            created = http.post("/v1/models/smoothed/adapt", json={"support": {"x": sx.tolist(), "y": sy.tolist()}})
            assert created.status_code == 201, created.text
            answers = [http.post(f"/v1/sessions/{created.json()['session_id']}/predict", json={"x": qx.tolist()}),
                       http.post("/v1/models/smoothed/predict", json={"support": {"x": sx.tolist(), "y": sy.tolist()}, "query": {"x": qx.tolist()}})]
    finally:
        server.stop()
    for answer in answers:
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(answer.json()["probabilities"], expected.numpy(), atol=1e-5)
