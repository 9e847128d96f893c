"""``metalearn`` end to end on tiny budgets, and its error paths."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metalearn import MLP, MetaConfig, MetaLearner
from metalearn.checkpoint import load_checkpoint, read_manifest, save_checkpoint
from metalearn.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_sinusoid_train_eval_info(tmp_path, capsys):
    out = tmp_path / "sine"
    code, stdout, err = run(capsys, "train", "--task", "sinusoid", "--algorithm", "fomaml", "--iterations", "30",
                            "--meta-batch", "5", "--val-interval", "15", "--val-episodes", "10", "--out", str(out),
                            "--set", "model={hidden: [16, 16]}")
    assert code == 0, err
    assert "best mse" in stdout
    assert "steps/s" in err  # the progress bar
    code, stdout, err = run(capsys, "eval", str(out), "--episodes", "20", "--shots", "5", "--inner-steps", "3",
                            "--json")
    assert code == 0, err
    result = last_json(stdout)
    assert result["metric"] == "mse" and result["episodes"] == 20 and result["ci95"] >= 0
    assert result["inner_steps"] == 3 and result["shots"] == 5
    assert result["checkpoint"].endswith("best.safetensors")
    assert "/20 [" in err and "episode" in err  # the progress bar
    code, stdout, err = run(capsys, "eval", str(out), "--episodes", "20", "--no-progress")
    assert code == 0 and "episode" not in err
    code, _, err = run(capsys, "eval", str(out), "--ways", "3")  # (it was ignored)
    assert code == 2 and "--ways is for classification models; this one is a regression model" in err
    assert stdout.strip().count("\n") == 0 and re.search(r"best\.safetensors: mse \d+\.\d{4} \+- \d+\.\d{4} \(95% CI, 20 episodes", stdout)
    code, stdout, _ = run(capsys, "info", str(out / "last.safetensors"), "--json")
    manifest = json.loads(stdout)
    assert manifest["algorithm"] == "fomaml" and manifest["state"]["iteration"] == 30


def test_omniglot_tiny_conv(tmp_path, capsys):
    out = tmp_path / "omni"
    code, stdout, err = run(capsys, "train", "--task", "omniglot", "--algorithm", "maml", "--ways", "5",
                            "--shots", "1", "--queries", "2", "--meta-batch", "2", "--inner-steps", "1",
                            "--iterations", "3", "--channels", "8", "--val-interval", "3", "--val-episodes", "4",
                            "--out", str(out), "--no-progress")
    assert code == 0, err
    manifest = read_manifest(out / "best.safetensors")
    assert manifest["n_way"] == 5 and manifest["input_shape"] == [1, 28, 28]
    assert manifest["model_spec"]["channels"] == 8
    assert manifest["preprocessing"]["kind"] == "image" and manifest["preprocessing"]["invert"] is True
    assert manifest["inner"]["steps"] == 3  # the 5-way default: 3 steps at test time
    assert manifest["training"]["validation"]["within_group"] is True
    code, stdout, err = run(capsys, "eval", str(out), "--episodes", "6", "--json")
    assert code == 0, err
    result = last_json(stdout)
    assert result["metric"] == "accuracy" and 0 <= result["mean"] <= 1
    assert (result["ways"], result["within_group"], result["split"]) == (5, True, "val")
    code, stdout, err = run(capsys, "eval", str(out), "--ways", "9")
    assert code == 2 and "more than the 5 classes the model was trained to tell apart" in err
    code, stdout, err = run(capsys, "eval", str(out), "--ways", "1")
    assert code == 2 and "--ways must be >= 2 for classification" in err
    # Other data: the training data's hold-out of whole alphabets does not apply (a .npz has no groups; before:
    # "split_by='group' with 1 groups (all) cannot hold out ...", even with --split all).
    import numpy as np

    np.savez(tmp_path / "other.npz", x=np.random.default_rng(0).integers(0, 255, (120, 1, 28, 28), dtype=np.uint8), y=np.arange(120) % 10)
    for split, classes in (("all", 10), (None, 10)):
        code, stdout, err = run(capsys, "eval", str(out), "--task", str(tmp_path / "other.npz"), "--episodes", "2", "--no-progress",
                                *(["--split", split] if split else []))
        assert code == 0 and f"({split or 'all'} split, {classes} classes)" in stdout, err


def test_support_shift_is_recorded_and_used_by_eval(tmp_path, capsys):
    out = tmp_path / "omni"
    code, _, err = run(capsys, "train", "--task", "omniglot", "--algorithm", "anil", "--ways", "5", "--shots", "1",
                       "--queries", "1", "--meta-batch", "1", "--inner-steps", "1", "--iterations", "2",
                       "--channels", "8", "--val-interval", "2", "--val-episodes", "3", "--eval-support-shift", "2",
                       "--out", str(out), "--no-progress")
    assert code == 0, err
    assert read_manifest(out / "best.safetensors")["inner"]["support_shift"] == 2
    code, stdout, err = run(capsys, "eval", str(out), "--episodes", "4", "--json")
    assert code == 0, err
    shifted = last_json(stdout)
    assert shifted["support_shift"] == 2
    code, stdout, err = run(capsys, "eval", str(out), "--episodes", "4", "--support-shift", "0", "--json")
    assert code == 0, err
    assert last_json(stdout)["support_shift"] == 0
    code, _, err = run(capsys, "eval", str(out), "--episodes", "4", "--support-shift", "28")
    assert code == 2 and "needs image inputs" in err and "larger than that" in err


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["eval", "/no/such/checkpoint.safetensors"], "no such file"),
        (["info", "/no/such/dir"], "no such file"),
        (["train", "--algorithm", "nope"], "invalid choice"),
        (["train", "--iterations", "0"], "must be >= 1"),
        (["train", "--config", "no-such-config"], "no config named"),
        (["train", "--task", "/no/such/data.zip", "--iterations", "1"], "no such file"),
        (["train", "--resume"], "--resume needs --out"),
        (["train", "--resume", "--out", "OUT", "--config", "omniglot-5way"], "leave out --config"),  # (it was ignored)
        (["info", "/dev/null"], "not a regular file"),  # (a FIFO hung the read)
        (["train", "--task", "sinusoid", "--eval-support-shift", "1", "--iterations", "1"], "needs image inputs"),
        (["bogus"], "invalid choice"),
        ([], "required"),
    ],
)
def test_errors_are_one_line(capsys, tmp_path, args, fragment):
    code, _, err = run(capsys, *[a.replace("OUT", str(tmp_path)) for a in args])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], err


def test_running_out_of_memory_is_one_line(monkeypatch, capsys):
    from metalearn import cli

    def needs_too_much(args):
        raise MemoryError()

    monkeypatch.setitem(cli.COMMANDS, "info", needs_too_much)
    code, _, err = run(capsys, "info", "x")
    assert code == 2 and err.strip().splitlines() == ["error: out of memory: the data, pictures or tasks asked for do not fit in this machine's memory"]


def test_console_script_reports_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "metalearn.cli", "eval", str(bad), "--json"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert str(bad) in done.stderr


def test_help_and_bad_flags_answer_before_torch_loads():
    """Importing torch takes about 2 s: ``metalearn --help`` and a bad flag must not wait for it, and the
    package's public names still resolve (imported on first use)."""
    code = """
import sys
from metalearn.cli import main
for argv in (["train", "--algorithm", "nope"], ["info"], ["eval", "x", "--episodes", "0"]):
    assert main(argv) == 2, argv
try:
    main(["--help"])
except SystemExit as exit:
    assert exit.code == 0
print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
import metalearn
print(sorted(set(metalearn.__all__) - set(dir(metalearn))))
from metalearn import *
print(MetaLearner.__module__, adapt.__module__, ALGORITHMS == metalearn.names.ALGORITHMS)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    torch_modules, missing, names = done.stdout.strip().splitlines()[-3:]
    assert torch_modules == "[]" and missing == "[]"
    assert names == "metalearn.learner metalearn.adaptation True"


def test_serve_and_demo_call_the_service(monkeypatch, tmp_path, capsys):
    calls = []
    import types

    fake = types.ModuleType("service.server")
    fake.serve = lambda model_dir, host="127.0.0.1", port=8000, **kw: calls.append((model_dir, host, port))
    monkeypatch.setitem(sys.modules, "service.server", fake)
    models = tmp_path / "models"
    models.mkdir()
    save_checkpoint(models / "x.safetensors", MetaLearner(MLP(1, (4,), 1), MetaConfig("maml", task_type="regression")),
                    input_shape=(1,))  # demo does not train its models beside one of the user's
    assert main(["serve", "--model-dir", str(models), "--port", "8123"]) == 0
    assert main(["demo", "--model-dir", str(models), "--host", "0.0.0.0", "--port", "8124"]) == 0
    assert calls == [(str(models), "127.0.0.1", 8123), (str(models), "0.0.0.0", 8124)]
    code, _, err = run(capsys, "serve", "--model-dir", str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in err
    for command, port in [("serve", "70000"), ("demo", "0"), ("serve", "-1")]:  # (uvicorn listened on 70000 mod 65536)
        code, _, err = run(capsys, command, "--model-dir", str(models), "--port", port)
        assert code == 2 and f"--port: must be from 1 to 65535, got {port}" in err
    assert len(calls) == 2


def test_demo_keeps_its_trained_models_finishes_an_interrupted_one_and_counts_only_real_models(tmp_path, monkeypatch, capsys):
    from metalearn import cli
    from metalearn.train import Trainer, resolve_config

    tiny = {"iterations": 4, "val_interval": 2, "val_episodes": 2, "meta_batch": 2, "progress": False}
    monkeypatch.setattr(cli, "DEMO_MODELS", {"first": {"config": "sinusoid-maml", "overrides": tiny},
                                             "second": {"config": "sinusoid-reptile", "overrides": tiny}})
    models = tmp_path / "models"
    # "second" interrupted half way: 2 of its 4 iterations; and a file that only looks like a model
    Trainer(resolve_config("sinusoid-reptile", {**tiny, "iterations": 2, "out": str(models / "second")})).run()
    (models / "notes.safetensors").write_text("not a checkpoint")
    made = cli.make_demo_models(models)
    err = capsys.readouterr().err
    assert made == [models / "first" / "best.safetensors", models / "second" / "best.safetensors"]
    assert "notes.safetensors" in err and "not a model" in err  # (before: counted as a model, so no demo was trained)
    assert "training demo model first" in err and "training demo model second" in err and "going on from its last checkpoint" in err
    for name in ("first", "second"):
        assert read_manifest(models / name / "last.safetensors")["state"]["iteration"] == 4
    written = {p: p.stat().st_mtime_ns for p in models.glob("*/*.safetensors")}
    assert cli.make_demo_models(models) == made  # both trained: kept as they are
    assert "demo model first: already trained" in capsys.readouterr().err
    assert written == {p: p.stat().st_mtime_ns for p in models.glob("*/*.safetensors")}


def test_validation_falls_back_to_tasks_across_groups_only_where_those_exist(tmp_path, capsys):
    """Held-out groups too small for a within-group task: validation draws its classes across groups,
    and says so. A held-out split too small for any task is an error that says that, with no such note."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for group in range(6):  # 6 groups x 3 classes x 3 images
        for label in range(3):
            folder = tmp_path / "data" / f"g{group}" / f"c{label}"
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray((rng.random((12, 12)) * 255).astype("uint8")).save(folder / f"{i}.png")

    def train(ways: int, out: str) -> tuple[int, str]:
        code, _, err = run(capsys, "train", "--task", str(tmp_path / "data"), "--algorithm", "anil", "--ways", str(ways),
                           "--shots", "1", "--queries", "1", "--meta-batch", "1", "--iterations", "1", "--channels", "8",
                           "--val-interval", "1", "--val-episodes", "2", "--set", "val_fraction=0.34",
                           "--out", str(tmp_path / out), "--no-progress")
        return code, err

    code, err = train(5, "five")  # 6 held-out classes, no group of 5
    assert code == 0, err
    assert "note: validating across groups" in err and "at least ways=5" in err
    assert read_manifest(tmp_path / "five" / "best.safetensors")["training"]["validation"]["within_group"] is False
    code, err = train(10, "ten")  # 12 classes to train on, 6 held out
    assert code != 0
    assert "has 6 classes, fewer than ways=10" in err and "across groups" not in err


def test_a_time_budget_stops_and_saves_the_run_and_says_how_to_go_on(tmp_path, capsys):
    out = tmp_path / "budget"
    args = ["train", "--task", "sinusoid", "--algorithm", "maml", "--meta-batch", "2", "--val-episodes", "4",
            "--iterations", "1000000", "--out", str(out), "--no-progress"]
    code, stdout, err = run(capsys, *args, "--time-budget", "0.3")
    assert code == 0, err
    done = read_manifest(out / "last.safetensors")["training"]["iterations_done"]
    assert 0 < done < 1000000 and (out / "best.safetensors").exists()
    assert f"ran out at iteration {done} of 1000000" in err and "--resume --time-budget SECONDS (more than 0.3)" in err
    code, stdout, err = run(capsys, *args, "--resume", "--time-budget", "0.6")  # the budget counts the time already used
    assert code == 0, err
    assert read_manifest(out / "last.safetensors")["training"]["iterations_done"] > done
    assert "ran out at iteration" in err
    code, _, err = run(capsys, *args, "--resume")  # (before: one more meta-step, then the same stop, validation and save)
    assert code == 2 and "the run's time budget (0.6 s) is used up" in err and "--time-budget SECONDS" in err
    done = read_manifest(out / "last.safetensors")["training"]["iterations_done"]
    code, stdout, err = run(capsys, *args, "--resume", "--set", "time_budget=null", "--iterations", str(done + 3))  # (was ignored)
    assert code == 0 and f"done: {done + 3} iterations" in stdout and "ran out" not in err, err
    assert read_manifest(out / "last.safetensors")["training"]["config"]["time_budget"] is None


def test_serve_takes_its_model_dir_from_the_environment(tmp_path, capsys, monkeypatch):
    """Without --model-dir, metalearn serve serves METALEARN_MODEL_DIR (the default, models, overrode it)."""
    monkeypatch.setenv("METALEARN_MODEL_DIR", str(tmp_path / "from-env"))
    code, _, err = run(capsys, "serve", "--port", "1")
    assert code == 2 and f"model directory {tmp_path / 'from-env'} does not exist" in err


def test_serve_refuses_an_unreadable_model_dir_in_one_line(tmp_path, capsys, monkeypatch):
    """(os.access stands in for a directory of another user's: the tests may run as root, who reads all.)"""
    import metalearn.cli

    monkeypatch.setattr(metalearn.cli.os, "access", lambda path, mode: False)
    code, _, err = run(capsys, "serve", "--model-dir", str(tmp_path), "--port", "1")
    assert code == 2 and err.count("\n") == 1 and f"model directory {tmp_path} is not readable by this user" in err


def _picture_classes(root, classes, start=0, images=4, size=20, seed=0):
    """``classes`` class folders of grey pictures under ``root`` (class names c<start>.., one per class)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed + start)
    for label in range(start, start + classes):
        folder = root / f"c{label:02d}"
        folder.mkdir(parents=True)
        for i in range(images):
            Image.fromarray((rng.random((size, size + 7)) * 255).astype("uint8")).save(folder / f"{i}.png")


def test_pictures_size_and_inversion_are_settings_and_the_data_is_said(tmp_path, capsys):
    _picture_classes(tmp_path / "data", 10)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--task", str(tmp_path / "data"), "--algorithm", "anil", "--ways", "2", "--shots", "1",
                       "--queries", "1", "--meta-batch", "1", "--iterations", "1", "--channels", "4", "--val-interval", "1",
                       "--val-episodes", "2", "--set", "image_size=16", "--set", "invert=false", "--set", "resample=bilinear",
                       "--out", str(out), "--no-progress")
    assert code == 0, err
    manifest = read_manifest(out / "best.safetensors")
    assert manifest["input_shape"] == [1, 16, 16]
    assert (manifest["preprocessing"]["size"], manifest["preprocessing"]["invert"], manifest["preprocessing"]["resample"]) == ([16, 16], False, "bilinear")
    assert f"data: {tmp_path / 'data'}: 10 classes (8 train, 2 val), 40 examples, input [1, 16, 16]: pictures made grey-scale 16x16 (bilinear;" in err
    classes = manifest["training"]["data"]["classes"]
    assert len(classes["train"]) == 8 and len(classes["val"]) == 2 and not set(classes["train"]) & set(classes["val"])
    import numpy as np

    np.savez(tmp_path / "other.npz", x=np.random.default_rng(0).random((24, 1, 16, 16)).astype(np.float32), y=np.arange(24) % 4)
    code, stdout, err = run(capsys, "eval", str(out), "--task", str(tmp_path / "other.npz"), "--episodes", "2", "--no-progress")
    assert code == 0 and "(all split, 4 classes)" in stdout, err  # the pictures' settings of training do not apply to a .npz
    code, _, err = run(capsys, "train", "--task", str(tmp_path / "data"), "--algorithm", "maml", "--ways", "2", "--shots", "1",
                       "--queries", "1", "--meta-batch", "1", "--iterations", "1", "--channels", "4", "--val-interval", "1",
                       "--val-episodes", "2", "--set", "image_size=16", "--set", "color=true", "--out", str(tmp_path / "rgb_run"), "--no-progress")
    assert code == 0, err
    assert "input [3, 16, 16]: pictures made RGB 16x16" in err
    manifest = read_manifest(tmp_path / "rgb_run" / "best.safetensors")
    assert manifest["input_shape"] == [3, 16, 16] and manifest["preprocessing"]["grayscale"] is False
    assert manifest["model_spec"]["in_channels"] == 3
    import numpy as np

    np.savez(tmp_path / "d.npz", x=np.zeros((8, 3), np.float32), y=np.arange(8) % 4)
    code, _, err = run(capsys, "train", "--task", str(tmp_path / "d.npz"), "--set", "image_size=16", "--out", str(tmp_path / "npz"), "--no-progress")
    assert code == 2 and "image_size: for pictures (omniglot, folders, zips); a .npz holds its inputs as they are" in err
    np.savez(tmp_path / "rgb.npz", x=np.zeros((200, 12, 12, 3), np.uint8), y=np.arange(200) % 10)
    code, _, err = run(capsys, "train", "--task", str(tmp_path / "rgb.npz"), "--out", str(tmp_path / "rgb"), "--no-progress")
    assert code == 2 and "look channels-last: images are [C, H, W] (channels first); for a .npz, np.transpose(x, (0, 3, 1, 2))" in err, err


def test_eval_holds_out_the_classes_the_checkpoint_recorded(tmp_path, capsys, monkeypatch):
    """Classes added to the data after training would move the computed split (training classes evaluated as
    held out): eval evaluates on the classes the checkpoint recorded, and says so; a relative data path that
    is not found from another directory gets a hint."""
    data = tmp_path / "data"
    _picture_classes(data, 10)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "train", "--task", "data", "--algorithm", "anil", "--ways", "2", "--shots", "1", "--queries", "1",
                       "--meta-batch", "1", "--iterations", "1", "--channels", "4", "--val-interval", "1", "--val-episodes", "2",
                       "--out", "run", "--no-progress")
    assert code == 0, err
    recorded = read_manifest(tmp_path / "run" / "best.safetensors")["training"]["data"]["classes"]["val"]
    _picture_classes(data, 4, start=10)  # new classes since
    code, stdout, err = run(capsys, "eval", "run", "--episodes", "4", "--no-progress")
    assert code == 0, err
    assert "(val split, 2 classes)" in stdout
    assert "note: evaluating on the 2 val classes the checkpoint recorded (the split computed now would have" in err
    code, stdout, err = run(capsys, "eval", "run", "--episodes", "4", "--no-progress", "--json")
    assert code == 0 and last_json(stdout)["split"] == "val"
    from metalearn.cli import eval_settings
    import argparse

    args = argparse.Namespace(task=None, ways=None, shots=None, queries=None, split=None, episodes=4, inner_steps=None, inner_lr=None,
                              transductive=False, support_shift=None, seed=None, within_group=None, progress=False)
    source, _ = eval_settings(load_checkpoint(tmp_path / "run" / "best.safetensors"), args)
    assert sorted(source.base_class_names) == sorted(recorded)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = run(capsys, "eval", str(tmp_path / "run"), "--episodes", "4", "--no-progress")
    assert code == 2 and "the checkpoint was trained on 'data' (the path as metalearn train was given it), which is not found from" in err
    assert "pass --task PATH" in err


def test_a_commands_warnings_read_as_its_notes_do(monkeypatch, tmp_path, capsys):
    """A warning in a command (skip_undecodable's skipped pictures, say) printed Python's file, line and source
    line of the library code that warned; the commands write it as "warning: ..." (METALEARN_DEBUG keeps Python's)."""
    import warnings

    from metalearn.cli import main

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # (restored after the test)
    monkeypatch.delenv("METALEARN_DEBUG", raising=False)
    main(["info", str(tmp_path / "nothing.safetensors")])
    assert warnings.formatwarning("3 pictures skipped", UserWarning, "/x/sources.py", 186, "warnings.warn(...)") == "warning: 3 pictures skipped\n"
