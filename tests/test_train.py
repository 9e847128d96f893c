"""The trainer: configs, run directories, manifests, and resuming after a kill."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from metalearn.checkpoint import load_checkpoint, read_manifest
from metalearn.evaluate import mean_ci95
from metalearn.learner import ALGORITHMS
from metalearn.train import (
    CONFIG_DIR,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    default_config,
    learning_rate,
    read_metrics,
    resolve_config,
    task_generator,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_sine(out, **changes) -> TrainConfig:
    config = default_config("sinusoid", changes.pop("algorithm", "maml"))
    config.update(dict(out=str(out), iterations=40, val_interval=20, val_episodes=20, save_interval=10,
                       log_interval=5, progress=False, model={"hidden": [16, 16]}))
    return config.update(changes)


@pytest.mark.parametrize("task", ["sinusoid", "omniglot"])
def test_defaults_exist_for_every_algorithm(task):
    for algorithm in ALGORITHMS:
        config = default_config(task, algorithm, ways=20 if task == "omniglot" else None)
        config.validate()
        assert config.algorithm == algorithm
    assert default_config("sinusoid", "maml").inner_lr == 0.01
    assert default_config("sinusoid", "maml").meta_batch == 25
    assert default_config("sinusoid", "reptile").inner_steps > 1


def test_a_train_config_carries_every_meta_config_field_with_its_default():
    """TrainConfig.meta_config reads MetaConfig's fields by name: each must be there, defaulting alike, and
    a setting given to the trainer reaches the learner."""
    import dataclasses

    from metalearn.learner import MetaConfig

    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for meta_field in dataclasses.fields(MetaConfig):
        if meta_field.name != "task_type":
            assert meta_field.name in train_fields, meta_field.name
            assert train_fields[meta_field.name].default == meta_field.default, meta_field.name
    config = TrainConfig(algorithm="anil", inner_steps=4, grad_clip=2.0, head_init="prototypes", learn_step_lrs=True)
    meta = config.meta_config("classification")
    assert (meta.algorithm, meta.inner_steps, meta.grad_clip, meta.head_init, meta.learn_step_lrs) == ("anil", 4, 2.0, "prototypes", True)


def test_ready_configs_load_and_validate():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    for required in ["omniglot-5way", "omniglot-20way", "omniglot-20way-best"] + [f"sinusoid-{a}" for a in ALGORITHMS]:
        assert required in names
    for name in names:
        config = resolve_config(name)
        assert config.algorithm in ALGORITHMS


def test_flags_override_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: sinusoid\nalgorithm: fomaml\ninner_lr: 0.05\niterations: 7\n")
    config = resolve_config(str(path), {"iterations": 9, "meta_lr": None})
    assert (config.algorithm, config.inner_lr, config.iterations) == ("fomaml", 0.05, 9)
    path.write_text("bogus_key: 1\n")
    with pytest.raises(ValueError, match="bogus_key"):
        resolve_config(str(path))
    with pytest.raises(FileNotFoundError, match="no config named"):
        resolve_config("no-such-config")


def test_task_generators_differ_by_rank_and_iteration():
    draw = lambda *a: torch.rand(4, generator=task_generator(*a))  # noqa: E731
    assert torch.equal(draw(0, 0, 5), draw(0, 0, 5))
    assert not torch.equal(draw(0, 0, 5), draw(0, 1, 5))
    assert not torch.equal(draw(0, 0, 5), draw(0, 0, 6))


def test_learning_rate_schedules():
    config = TrainConfig(meta_lr=1.0, iterations=100, lr_schedule="cosine", min_lr_fraction=0.1)
    assert learning_rate(config, 0) == pytest.approx(1.0)
    assert learning_rate(config, 100) == pytest.approx(0.1)
    config.lr_schedule = "linear"
    assert learning_rate(config, 50) == pytest.approx(0.55)


def test_mean_ci95():
    mean, ci, std = mean_ci95(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5 and std == pytest.approx(1.2910, abs=1e-4)
    assert ci == pytest.approx(1.96 * 1.2910 / 2, abs=1e-4)


def test_run_directory_and_manifest(tmp_path):
    out = tmp_path / "run"
    summary = Trainer(tiny_sine(out)).run()
    assert summary["iterations"] == 40 and not summary["interrupted"]
    for name in ("best.safetensors", "last.safetensors", "metrics.jsonl", "curves.png"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["kind"] == "val"] == [20, 40]
    assert all("loss" in r and "steps_per_s" in r for r in records if r["kind"] == "train")
    manifest = read_manifest(out / "best.safetensors")
    assert manifest["input_shape"] == [1] and manifest["task_type"] == "regression"
    assert manifest["inner"] == {"steps": 10, "lr": 0.01, "lr_chosen": False, "support_shift": 0}  # the test-time steps, not the training step
    assert manifest["training"]["config"]["algorithm"] == "maml"
    assert manifest["metrics"]["metric"] == "mse" and manifest["metrics"]["episodes"] == 20
    assert manifest["state"]["iteration"] == manifest["metrics"]["iteration"]
    last = load_checkpoint(out / "last.safetensors")
    assert last.manifest["state"]["iteration"] == 40
    assert any(name.startswith("optim/") for name in last.state_tensors)
    with pytest.raises(FileExistsError):
        Trainer(tiny_sine(out))
    with pytest.raises(NotADirectoryError, match="is a file"):
        Trainer(tiny_sine(out / "best.safetensors"))


def test_resume_refuses_changed_settings(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_sine(out, iterations=10)).run()
    with pytest.raises(ValueError, match="cannot change 'inner_lr'"):
        Trainer(TrainConfig(out=str(out)), resume=True, resume_overrides={"inner_lr": 0.5})
    # An unknown or mistyped setting is refused as without --resume (it was an AttributeError), and the
    # same value given again (here as a YAML-style string) is no change.
    with pytest.raises(ValueError, match="unknown setting.*nosuch"):
        Trainer(TrainConfig(out=str(out)), resume=True, resume_overrides={"nosuch": 1})
    with pytest.raises(ValueError, match="iterations must be an integer"):
        Trainer(TrainConfig(out=str(out)), resume=True, resume_overrides={"iterations": "many"})
    same_lr = Trainer(TrainConfig(out=str(out)), resume=True, resume_overrides={"inner_lr": str(tiny_sine(out).inner_lr)})
    assert same_lr.config.inner_lr == tiny_sine(out).inner_lr
    with pytest.raises(FileNotFoundError):
        Trainer(TrainConfig(out=str(tmp_path / "none")), resume=True)
    # More iterations is allowed, and continues from where it stopped.
    trainer = Trainer(TrainConfig(out=str(out)), resume=True, resume_overrides={"iterations": 15})
    assert trainer.iteration == 10
    assert trainer.run()["iterations"] == 15



def test_an_earlier_releases_metasgd_run_with_learn_step_lrs_still_loads_and_resumes(tmp_path):
    """Earlier releases took metasgd with learn_step_lrs and ignored it; refused for new configs now, such a
    run's checkpoints still load (as the plain metasgd they were, same outputs) and the run resumes."""
    out = tmp_path / "run"
    trainer = Trainer(tiny_sine(out, algorithm="metasgd", iterations=10))
    trainer.config.learn_step_lrs = trainer.learner.config.learn_step_lrs = True  # as the earlier release recorded it
    trainer.run()
    assert read_manifest(out / "last.safetensors")["meta_config"]["learn_step_lrs"] is True
    loaded = load_checkpoint(out / "last.safetensors").learner
    assert loaded.config.learn_step_lrs is False
    x = torch.linspace(-5, 5, 7).unsqueeze(1)
    torch.testing.assert_close(loaded.model(x), trainer.learner.model(x))
    for name, rate in trainer.learner.lrs.items():
        torch.testing.assert_close(loaded.lrs[name], rate)  # per element, as before
    resumed = Trainer(TrainConfig(out=str(out)), resume=True, resume_overrides={"iterations": 12})
    assert resumed.run()["iterations"] == 12


ITERATIONS = 150


def _train_command(out: Path) -> list[str]:
    return ["train", "--task", "sinusoid", "--algorithm", "maml", "--iterations", str(ITERATIONS), "--out", str(out),
            "--no-progress", "--meta-batch", "10", "--val-interval", "60", "--val-episodes", "10",
            "--set", "save_interval=5", "--set", "model={hidden: [16, 16]}", "--threads", "1"]


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "metalearn.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _interrupt(out: Path, process: subprocess.Popen, at_least: int, sig: int, timeout: float = 90) -> str:
    """Send ``sig`` once ``last.safetensors`` has reached ``at_least`` iterations; returns stderr."""
    deadline = time.time() + timeout
    try:
        while True:
            assert time.time() < deadline, "no checkpoint appeared"
            assert process.poll() is None, "training finished before it could be interrupted"
            try:
                if read_manifest(out / "last.safetensors")["state"]["iteration"] >= at_least:
                    break
            except Exception:
                pass
            time.sleep(0.02)
        process.send_signal(sig)
        return process.communicate(timeout=60)[1]
    finally:
        if process.poll() is None:
            process.kill()


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    checkpoint = load_checkpoint(out / "last.safetensors")
    assert checkpoint.manifest["state"]["iteration"] == ITERATIONS
    optim = {k: v for k, v in checkpoint.state_tensors.items() if k.startswith("optim/")}
    return {**checkpoint.learner.state_dict(), **optim}


def test_killed_and_interrupted_run_resumes_to_the_same_final_state(tmp_path, capsys):
    from metalearn.cli import main

    out = tmp_path / "interrupted"
    # kill -9 at some point after iteration 20...
    process = _start(_train_command(out))
    _interrupt(out, process, 20, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    killed_at = read_manifest(out / "last.safetensors")["state"]["iteration"]
    assert 20 <= killed_at < ITERATIONS
    # ...resume, and Ctrl-C that one: it saves where it is and exits 130...
    process = _start(_train_command(out) + ["--resume"])
    err = _interrupt(out, process, killed_at + 15, signal.SIGINT)
    assert process.returncode == 130 and "--resume" in err and "Traceback" not in err
    stopped_at = read_manifest(out / "last.safetensors")["state"]["iteration"]
    assert killed_at < stopped_at < ITERATIONS
    # ...and resume again to the end.
    assert main(_train_command(out) + ["--resume"]) == 0
    straight = tmp_path / "straight"
    assert main(_train_command(straight)) == 0
    capsys.readouterr()

    a, b = _final_state(out), _final_state(straight)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The log has no duplicated iterations after the resumes.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    iterations = [r["iteration"] for r in records if r["kind"] == "train"]
    assert iterations == sorted(set(iterations)) and iterations[-1] == ITERATIONS


def test_a_stop_request_during_a_validation_drops_it_and_stops_at_once(tmp_path):
    """Ctrl-C or SIGTERM while a validation runs (half a minute on Omniglot): the validation ends there and is
    dropped, last.safetensors is saved at that iteration and the run stops, without another meta-step. (Before,
    the validation ran to its end, then one more step; a second Ctrl-C meanwhile lost everything unsaved.)"""
    out = tmp_path / "run"
    trainer = Trainer(TrainConfig(task="sinusoid", iterations=50, val_interval=10, val_episodes=4, meta_batch=2, out=str(out),
                                  progress=False, model={"hidden": [8, 8]}, threads=1))
    validated, validate = [], trainer.validate

    def validation():
        validated.append(trainer.iteration)
        if trainer.iteration == 20:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)  # a long validation: the request ends it
            raise AssertionError("the validation was not interrupted")
        return validate()

    trainer.validate = validation
    summary = trainer.run()
    assert summary["interrupted"] and summary["iterations"] == 20 and validated == [10, 20]
    assert read_manifest(out / "last.safetensors")["state"]["iteration"] == 20
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["kind"] == "val"] == [10]
    assert Trainer(TrainConfig(out=str(out)), resume=True).run()["iterations"] == 50
    # The last validation interrupted: a resume at the last iteration runs it (before: it did nothing, and the
    # final weights were never validated)
    final = tmp_path / "final"
    trainer = Trainer(TrainConfig(task="sinusoid", iterations=20, val_interval=10, val_episodes=4, meta_batch=2, out=str(final),
                                  progress=False, model={"hidden": [8, 8]}, threads=1))
    validate = trainer.validate

    def last_interrupted():
        if trainer.iteration == 20:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)
        return validate()

    trainer.validate = last_interrupted
    assert trainer.run()["interrupted"]
    summary = Trainer(TrainConfig(out=str(final)), resume=True).run()
    records = [json.loads(line) for line in (final / "metrics.jsonl").read_text().splitlines()]
    assert not summary["interrupted"] and [r["iteration"] for r in records if r["kind"] == "val"] == [10, 20]
    assert summary["last"]["iteration"] == 20 and read_manifest(final / "last.safetensors")["metrics"]["iteration"] == 20


def test_settings_are_checked_against_their_types(tmp_path):
    config = TrainConfig()
    config.update({"meta_lr": "1e-3", "inner_lr": 1, "grad_clip": None, "val_ways": 3, "rotations": True})
    assert (config.meta_lr, config.inner_lr, config.grad_clip, config.val_ways, config.rotations) == (1e-3, 1.0, None, 3, True)
    assert type(config.inner_lr) is float
    for values, message in [({"meta_lr": "abc"}, "meta_lr must be a number"), ({"iterations": 2.5}, "iterations must be an integer"),
                            ({"iterations": True}, "iterations must be an integer"), ({"rotations": 1}, "rotations must be true or false"),
                            ({"lr_schedule": 5}, "lr_schedule must be a string"), ({"val_ways": "three"}, "val_ways must be an integer or null")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig().update(values, where="here")
    path = tmp_path / "c.yaml"
    path.write_text("task: sinusoid\nmeta_lr: 1e-4\niterations: ten\n")  # YAML 1.1 reads 1e-4 as a string
    with pytest.raises(ValueError, match="iterations must be an integer, got 'ten'"):
        resolve_config(str(path))
    path.write_text("task: sinusoid\nmeta_lr: 1e-4\n")
    assert resolve_config(str(path)).meta_lr == 1e-4


def test_a_diverging_run_stops_and_keeps_its_last_finite_checkpoint(tmp_path):
    out = tmp_path / "run"
    # Adam moves every weight by about meta_lr in its first step: the second meta-batch's loss overflows.
    trainer = Trainer(tiny_sine(out, meta_lr=1e30, save_interval=1))
    with pytest.raises(TrainingDiverged, match=r"iteration 2: the meta-training loss is (nan|inf).*holds iteration 1.*meta_lr"):
        trainer.run()
    checkpoint = load_checkpoint(out / "last.safetensors")
    assert checkpoint.manifest["state"]["iteration"] == 1
    assert all(torch.isfinite(p).all() for p in checkpoint.learner.parameters())
    assert not (out / "best.safetensors").exists()
    with pytest.raises(TrainingDiverged, match="holds iteration 1"):  # resumed: the checkpoint it resumed from
        Trainer(TrainConfig(out=str(out)), resume=True, resume_overrides={"save_interval": 1000}).run()
    result = subprocess.run([sys.executable, "-m", "metalearn.cli", "train", "--task", "sinusoid", "--out", str(tmp_path / "cli"),
                             "--set", "meta_lr=1e30", "--iterations", "5", "--no-progress"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "error: training diverged at iteration 2" in result.stderr


def test_classification_needs_two_ways_at_least(tmp_path):
    """A 1-way task is answered right whatever the model: trained, it 'learns' to 100% accuracy."""
    config = default_config("omniglot", "maml").update(dict(out=str(tmp_path / "one"), progress=False))
    with pytest.raises(ValueError, match="ways must be >= 2 for classification, got 1"):
        Trainer(config.update(dict(ways=1)))
    with pytest.raises(ValueError, match="val_ways must be >= 2 for classification, got 1"):
        Trainer(config.update(dict(ways=5, val_ways=1)))
    assert Trainer(tiny_sine(tmp_path / "sine", ways=1)).task_type == "regression"  # ways means nothing there


def test_settings_read_late_are_checked_before_training(tmp_path):
    """What only validation or the end of a run reads is refused before the first meta-step, not after hours of
    training (before: a validation split too small for its tasks, or eval_inner_steps=-1, failed at the first
    validation, with no checkpoint written)."""
    for change, message in [({"eval_inner_steps": -1}, "eval_inner_steps must be >= 0"), ({"val_queries": -1}, "val_queries must be >= 0"),
                            ({"eval_inner_lr": -1.0}, "eval_inner_lr must be a positive finite number, got -1.0"),
                            ({"eval_inner_lr": 0.0}, "eval_inner_lr must be a positive finite number, got 0.0"),
                            ({"time_budget": 0.0}, "time_budget must be a positive finite number, got 0.0"),
                            ({"min_lr_fraction": 5.0}, "min_lr_fraction must be from 0 to 1"),
                            ({"image_size": 10**6}, "image_size must be from 4 to 1024"),
                            ({"seed": 10**23}, "seed must fit in 64 bits")]:
        with pytest.raises(ValueError, match=message):
            Trainer(tiny_sine(tmp_path / "refused", **change))
    assert not (tmp_path / "refused").exists()
    data = tmp_path / "d.npz"  # 12 classes: 10 to train on, 2 held out, too few for 5-way validation tasks
    np.savez(data, x=np.random.default_rng(0).random((120, 6), dtype=np.float32), y=np.repeat(list("abcdefghijkl"), 10))
    config = default_config(str(data), "maml").update(dict(out=str(tmp_path / "late"), iterations=5, progress=False))
    with pytest.raises(ValueError, match=r"validation cannot draw its tasks: .*fewer than ways=5.*val_ways"):
        Trainer(config)
    assert Trainer(config.update(dict(val_ways=2))).val_kwargs["ways"] == 2


def test_pictures_without_a_channel_axis_train_the_default_mlp(tmp_path):
    """An .npz of [N, H, W] pictures (no channel axis) gets the default MLP of H*W inputs, which flattens
    them (it failed in the first forward: "mat1 and mat2 shapes cannot be multiplied (56x28 and 784x256)")."""
    data = tmp_path / "flat.npz"
    np.savez(data, x=np.random.default_rng(0).random((100, 8, 8), dtype=np.float32), y=np.repeat(np.arange(10), 10))
    config = default_config(str(data), "maml").update(dict(out=str(tmp_path / "run"), iterations=2, ways=3, shots=1, queries=2,
                                                           meta_batch=2, val_interval=2, val_episodes=2, val_fraction=0.5, progress=False))
    trainer = Trainer(config)
    assert trainer.learner.model.spec["in_features"] == 64
    assert trainer.run()["iterations"] == 2


def test_a_fresh_run_starts_its_own_log_and_one_run_writes_a_directory(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"kind": "train", "iteration": 300, "loss": 1.0}\n')  # a run that saved nothing
    Trainer(tiny_sine(out, iterations=10, val_interval=10)).run()
    assert "this run's log replaces it" in capsys.readouterr().err
    assert [r["iteration"] for r in read_metrics(out / "metrics.jsonl")] == [5, 10, 10]  # (not 300, 5, 10, 10)
    # A second run on the same directory while one writes it is refused before it writes anything there (before:
    # both wrote it at once); here the running one has logged past its last checkpoint, which a resume would drop.
    import fcntl

    running = '{"kind": "train", "iteration": 15, "loss": 1.0}\n'
    with open(out / "metrics.jsonl", "a") as log:
        log.write(running)
    with open(out / ".train.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FileExistsError, match="another metalearn train is writing this run directory"):
            Trainer(TrainConfig(out=str(out)), resume=True, resume_overrides={"iterations": 20}).run()
        assert (out / "metrics.jsonl").read_text().endswith(running)
    # What a run read of the directory before it held it is read again: another run may have written it since.
    stale = Trainer(TrainConfig(out=str(out)), resume=True, resume_overrides={"iterations": 20})
    Trainer(TrainConfig(out=str(out)), resume=True, resume_overrides={"iterations": 20}).run()  # released: goes on
    with pytest.raises(FileExistsError, match="another run wrote last.safetensors after this one read it"):
        stale.run()
    fresh = Trainer(tiny_sine(tmp_path / "other", iterations=5, val_interval=5))
    Trainer(tiny_sine(tmp_path / "other", iterations=5, val_interval=5)).run()
    with pytest.raises(FileExistsError, match="already holds a run"):
        fresh.run()


def test_non_finite_results_are_written_as_json_null(tmp_path, capsys):
    """A validation that diverges (an absurd test-time learning rate) gives NaN: metrics.jsonl, the checkpoint's
    manifest and `metalearn eval --json` write null, which every JSON parser reads (not NaN, which strict ones refuse)."""
    out = tmp_path / "run"
    Trainer(tiny_sine(out, iterations=5, val_interval=5, eval_inner_lr=1e30)).run()

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text[:200]}"))

    val = [strict(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert val and val[-1]["mean"] is None
    assert read_manifest(out / "best.safetensors")["metrics"]["mean"] is None
    from metalearn.cli import main

    assert main(["eval", str(out), "--episodes", "2", "--inner-lr", "1e30", "--json", "--no-progress"]) == 0
    assert strict(capsys.readouterr().out.strip().splitlines()[-1])["mean"] is None
    assert main(["info", str(out), "--json"]) == 0
    strict(capsys.readouterr().out)
    # Resumed, the null is a NaN again (the progress bar shows the last validation's mean), and the curves draw.
    resumed = Trainer(TrainConfig(out=str(out)), resume=True, resume_overrides={"iterations": 10, "progress": True})
    assert math.isnan(resumed.last_val["mean"]) and math.isnan(resumed.best["mean"])
    resumed.run()
    assert "could not draw" not in capsys.readouterr().err and (out / "curves.png").stat().st_size > 0


def test_layers_of_no_width_are_refused(tmp_path):
    """torch builds a Linear of width 0 with only a warning, and it learns nothing: a model spec asking for one
    (``--set "model={hidden: [0]}"``) is refused."""
    with pytest.raises(ValueError, match=r"MLP sizes must be >= 1, got in_features=1, hidden=\[16, 0\]"):
        Trainer(tiny_sine(tmp_path / "zero", model={"hidden": [16, 0]}))
    config = default_config("omniglot", "maml").update(dict(out=str(tmp_path / "conv"), progress=False, model={"channels": 0}))
    with pytest.raises(ValueError, match="Conv4 sizes must be >= 1"):
        Trainer(config)


def test_a_model_returning_a_tuple_is_told_to_return_one_tensor():
    """Before training, check_outputs said "gives outputs tuple ... set the argument that sizes its last layer"."""
    from metalearn.train import check_outputs

    class Pair(torch.nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(ValueError, match=r"model 'pair' returns a tuple from forward; metalearn needs one tensor of outputs"):
        check_outputs(Pair(), "pair", (1,), 1)


def test_the_check_before_training_leaves_a_models_buffers_as_they_were():
    """check_outputs ran the model itself: a forward that changes a buffer in place (whatever the mode)
    changed what training starts from before the first meta-step."""
    from metalearn.train import check_outputs

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(1, 1)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls += 1
            return self.linear(x)

    model = Counting()
    check_outputs(model, "counting", (1,), 1)
    assert model.calls.item() == 0
    assert model.training


def test_resuming_with_another_process_count_says_the_run_changes(tmp_path, capsys):
    """The resume state records how many processes trained the run; another count goes on, with a note (each
    process draws its own tasks, so the run is no longer the one it would have been)."""
    from metalearn.checkpoint import _read, atomic_write_bytes, content_hash
    from safetensors.torch import save as save_bytes

    out = tmp_path / "run"
    Trainer(tiny_sine(out, iterations=10)).run()
    Trainer(TrainConfig(out=str(out)), resume=True)
    assert "resuming a run trained by" not in capsys.readouterr().err
    manifest, tensors = _read(out / "last.safetensors")
    manifest["state"]["world_size"] = 2
    manifest["content_hash"] = content_hash(tensors, manifest)
    atomic_write_bytes(out / "last.safetensors", save_bytes(dict(tensors), metadata={"metalearn": json.dumps(manifest)}))
    Trainer(TrainConfig(out=str(out)), resume=True)
    assert "resuming a run trained by 2 process(es) with 1" in capsys.readouterr().err


def test_a_resume_that_would_do_nothing_or_finds_a_run_still_starting_says_so(tmp_path):
    """--resume with fewer --iterations than the run has done said "done" and did nothing; on a run still
    before its first save it said "nothing to resume" where the run was in fact being written."""
    import fcntl

    out = tmp_path / "run"
    Trainer(tiny_sine(out, iterations=10, val_interval=10)).run()
    with pytest.raises(ValueError, match="the run is at iteration 10, past --iterations 5: pass more iterations"):
        Trainer(TrainConfig(out=str(out)), resume=True, resume_overrides={"iterations": 5})
    starting = tmp_path / "starting"
    starting.mkdir()
    with open(starting / ".train.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FileExistsError, match="another metalearn train is writing this run directory"):
            Trainer(TrainConfig(out=str(starting)), resume=True)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):  # (no run holds it)
        Trainer(TrainConfig(out=str(starting)), resume=True)
