"""The ``metalearn`` command: ``train``, ``eval``, ``info``, ``demo`` and ``serve``.

::

    metalearn train --task sinusoid --algorithm reptile --out runs/sine-reptile
    metalearn train --config omniglot-20way --out runs/o20 --iterations 300
    metalearn train --config omniglot-20way --out runs/o20 --resume
    torchrun --nproc_per_node 2 -m metalearn.cli train --config omniglot-20way --out runs/o20-ddp
    metalearn eval runs/o20 --episodes 400 --inner-steps 10 --json
    metalearn info runs/o20/best.safetensors
    metalearn demo                       # train small demo models if needed, then serve them
    metalearn serve --model-dir models --port 8000

Errors (missing files, corrupt checkpoints, bad settings) end with a one-line
message on stderr and exit status 2 (130, as for Ctrl-C, for an interrupted run), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from metalearn.names import ALGORITHMS, HEAD_INITS

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A command-line problem reported as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags in one line (no usage block) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _int_at_least(minimum: int, maximum: int | None = None):
    """An argparse type: an integer >= ``minimum`` (and <= ``maximum``), with a one-line error otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)
_port = _int_at_least(1, 65535)  # (uvicorn took 70000 as 70000 mod 65536, and listened there)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _setting(text: str) -> tuple[str, Any]:
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        parsed = value
    return key.strip().replace("-", "_"), parsed


# Train flags that map 1:1 onto TrainConfig fields.
_TRAIN_FIELDS = (
    "task", "algorithm", "ways", "shots", "queries", "meta_batch", "inner_steps", "inner_lr", "meta_lr",
    "iterations", "seed", "device", "out", "threads", "time_budget", "val_interval", "val_episodes",
    "eval_inner_steps", "eval_support_shift", "head_init",
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="metalearn", description="Meta-learning (MAML and friends): train, evaluate, serve.")
    from metalearn import __version__

    parser.add_argument("--version", action="version", version=f"metalearn {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    train = commands.add_parser("train", help="meta-train a model and write a run directory",
                                description="Meta-train; flags override the config file, which overrides the "
                                            "defaults for the (task, algorithm) pair.")
    train.add_argument("--config", help="a config name (see metalearn/configs) or a YAML file")
    train.add_argument("--task", help="sinusoid, omniglot, or a folder/.zip/.npz of your data")
    train.add_argument("--algorithm", choices=ALGORITHMS)
    train.add_argument("--ways", type=_positive_int)
    train.add_argument("--shots", type=_positive_int)
    train.add_argument("--queries", type=_positive_int)
    train.add_argument("--meta-batch", type=_positive_int)
    train.add_argument("--inner-steps", type=_non_negative_int)
    train.add_argument("--inner-lr", type=_positive_float)
    train.add_argument("--meta-lr", type=_positive_float)
    train.add_argument("--iterations", type=_positive_int)
    train.add_argument("--seed", type=int)
    train.add_argument("--device", choices=("auto", "cpu", "cuda"))
    train.add_argument("--out", help="run directory (default runs/<task>-<algorithm>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from last.safetensors")
    train.add_argument("--threads", type=_positive_int, help="torch CPU threads")
    train.add_argument("--time-budget", type=_positive_float, help="stop (and save) after this many seconds")
    train.add_argument("--val-interval", type=_positive_int)
    train.add_argument("--val-episodes", type=_positive_int)
    train.add_argument("--eval-inner-steps", type=_non_negative_int, help="inner steps at test time")
    train.add_argument("--eval-support-shift", type=_non_negative_int,
                       help="images: at test time also adapt on the support shifted by this many pixels (4 extra views)")
    train.add_argument("--head-init", choices=HEAD_INITS,
                       help="where the inner loop starts the head: the learned weights, or the support set's class means (Proto-MAML)")
    train.add_argument("--channels", type=_positive_int, help="Conv4 width (default 64)")
    train.add_argument("--set", dest="settings", action="append", type=_setting, default=[], metavar="KEY=VALUE",
                       help="any other TrainConfig field, e.g. --set lr_schedule=cosine (repeatable)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on held-out tasks")
    evaluate.add_argument("path", help="a checkpoint file, or a run directory (its best checkpoint)")
    evaluate.add_argument("--task", help="task source (default: the one the checkpoint was trained on)")
    evaluate.add_argument("--split", choices=("train", "val", "test", "all"),
                          help="class split to draw tasks from (default: val of the training task, else all)")
    evaluate.add_argument("--ways", type=_positive_int)
    evaluate.add_argument("--shots", type=_positive_int)
    evaluate.add_argument("--queries", type=_positive_int)
    evaluate.add_argument("--inner-steps", type=_non_negative_int)
    evaluate.add_argument("--inner-lr", type=_positive_float)
    evaluate.add_argument("--support-shift", type=_non_negative_int,
                          help="shifted support views at test time (default: the checkpoint's; 0 turns them off)")
    evaluate.add_argument("--episodes", type=_positive_int, default=400)
    evaluate.add_argument("--seed", type=int, help="draws the evaluation tasks (default: one other than the trainer's "
                          "validation seed, so a best checkpoint is not scored on the tasks that chose it)")
    group = evaluate.add_mutually_exclusive_group()
    group.add_argument("--within-group", dest="within_group", action="store_true", default=None,
                       help="all classes of a task from one group/alphabet (default for image tasks)")
    group.add_argument("--across-groups", dest="within_group", action="store_false")
    evaluate.add_argument("--transductive", action="store_true", help="normalise queries with query-batch statistics")
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    evaluate.add_argument("--threads", type=_positive_int)
    evaluate.add_argument("--json", action="store_true", help="print the result as one JSON line")
    evaluate.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    info = commands.add_parser("info", help="print a checkpoint's manifest")
    info.add_argument("path", help="a checkpoint file or a run directory")
    info.add_argument("--json", action="store_true", help="the manifest as JSON only")

    demo = commands.add_parser("demo", help="train small demo models (if there are none) and serve them")
    demo.add_argument("--model-dir", default="models", help="where the models are, or the demo models go (default: models)")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    demo.add_argument("--port", type=_port, default=8000, help="port to listen on (default: 8000)")
    demo.add_argument("--no-serve", action="store_true", help="only make the demo models")
    demo.add_argument("--threads", type=_positive_int, help="torch CPU threads while training")

    serve = commands.add_parser("serve", help="serve the models of a directory over HTTP")
    serve.add_argument("--model-dir", help="default: METALEARN_MODEL_DIR, else models")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8000)
    serve.add_argument("--device", choices=("auto", "cpu", "cuda"))
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                       help="info logs a line per request; warning keeps warnings and errors only")
    return parser


# ----------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------


def checkpoint_path(path: str) -> Path:
    """A checkpoint file, or a run directory's best (else last) checkpoint."""
    from metalearn.checkpoint import BEST, LAST, CheckpointError

    p = Path(path)
    if p.is_dir():
        for name in (BEST, LAST):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{p}: run directory without {BEST} or {LAST}")
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    return p


def cmd_train(args: argparse.Namespace) -> int:
    from metalearn.train import Trainer, resolve_config

    overrides = {name: getattr(args, name) for name in _TRAIN_FIELDS}
    if args.no_progress:
        overrides["progress"] = False
    settings = dict(args.settings)
    if args.channels:
        settings.setdefault("model", {})
        settings["model"] = {**(settings["model"] or {}), "channels": args.channels}
    overrides.update(settings)
    if args.resume:
        if not args.out:
            raise UsageError("metalearn train: --resume needs --out (the run directory to continue)")
        if args.config:  # (it would be ignored: the run goes on with the config it recorded)
            raise UsageError("metalearn train: --resume continues the run in --out with the config it recorded; "
                             "leave out --config (flags such as --iterations or --time-budget may change)")
        from metalearn.train import TrainConfig

        config = TrainConfig(out=args.out)
        # (a flag left out is None, a --set null is a value: --set time_budget=null removes the run's budget)
        changes = {**{k: v for k, v in overrides.items() if v is not None}, **settings}
        trainer = Trainer(config, resume=True, resume_overrides=changes)
    else:
        config = resolve_config(args.config, overrides)
        trainer = Trainer(config)
    summary = trainer.run()
    if not trainer.context.is_main:
        return 0
    best = summary.get("best") or {}
    if summary["interrupted"]:
        print(f"interrupted at iteration {summary['iterations']}; continue with: metalearn train --out "
              f"{summary['out']} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    budget, planned = trainer.config.time_budget, trainer.config.iterations
    if budget is not None and summary["iterations"] < planned:
        print(f"the time budget ({budget:g} s of training, counted across resumes) ran out at iteration "
              f"{summary['iterations']} of {planned}; to go on: metalearn train --out {summary['out']} --resume "
              f"--time-budget SECONDS (more than {budget:g})", file=sys.stderr)
    line = f"done: {summary['iterations']} iterations in {summary['wall_seconds']:.1f}s -> {summary['out']}"
    if best.get("metric"):
        line += f"; best {best['metric']} {best['mean']:.4f} +- {best['ci95']:.4f} at iteration {best['iteration']}"
    print(line)
    return 0


def held_out_as_recorded(source, split: str, recorded: list[str], same_task: bool):
    """``source``'s split ``split`` as the checkpoint recorded it (its classes by name): classes added to the
    data since would otherwise move the split, and training classes be evaluated as held out."""
    try:
        now = set(source.split(split).base_class_names)
    except ValueError:  # that split is empty in the data as it is now
        now = set()
    have, wanted = set(source.base_class_names), set(recorded)
    present = [name for name in recorded if name in have]
    if not present:
        raise UsageError(f"metalearn eval: none of the {len(recorded)} {split} classes the checkpoint recorded is in {source.name}")
    if now != wanted or len(present) < len(recorded):
        changes = []
        if len(present) < len(recorded):
            changes.append(f"{len(recorded) - len(present)} of them are no longer in the data")
        if same_task and now - wanted:
            changes.append(f"the split computed now would have {len(now - wanted)} other classes")
        note = f" ({'; '.join(changes)})" if changes else ""
        print(f"note: evaluating on the {len(present)} {split} classes the checkpoint recorded{note}", file=sys.stderr)
    return source.with_classes(present, split)


def eval_settings(checkpoint, args: argparse.Namespace) -> tuple[Any, dict]:
    """The held-out task source and the evaluate() arguments for a checkpoint and the eval flags."""
    manifest = checkpoint.manifest
    config, same_task = _eval_config(manifest, args)
    source = _heldout_source(config, manifest, args, same_task)
    return source, _evaluate_kwargs(config, manifest, args, source, checkpoint.adaptation_settings())


def _eval_config(manifest: dict, args: argparse.Namespace) -> tuple[Any, bool]:
    """The training config the checkpoint records, with eval's task and task shape (ways, shots, queries);
    and whether the task is the one it was trained on."""
    from metalearn.train import PICTURE_SETTINGS, TrainConfig, check_ways

    saved = (manifest.get("training") or {}).get("config")
    config = TrainConfig()
    if saved:
        config.update({k: v for k, v in saved.items() if k in {f for f in TrainConfig.__dataclass_fields__}})
    elif not args.task:
        raise UsageError("metalearn eval: the checkpoint does not say what it was trained on; pass --task")
    config.progress = args.progress  # (reading the pictures: the bar eval's flag says)
    same_task = not args.task or args.task == config.task
    if args.task:
        config.task = args.task
        if str(args.task).lower().endswith(".npz"):  # pictures' settings of the training data do not apply to it
            for name in PICTURE_SETTINGS:
                setattr(config, name, getattr(TrainConfig, name))
    n_way = manifest.get("n_way")
    ways = args.ways or config.val_ways or n_way or config.ways
    if manifest.get("task_type") == "classification":
        if n_way and ways > n_way:
            raise UsageError(f"metalearn eval: --ways {ways} is more than the {n_way} classes the model was trained to tell apart (its n_way)")
        try:
            check_ways(ways, "--ways")
        except ValueError as error:
            raise UsageError(f"metalearn eval: {error}") from None
    elif args.ways:  # (it would be ignored)
        raise UsageError(f"metalearn eval: --ways is for classification models; this one is a {manifest.get('task_type')} model")
    config.ways = ways
    config.shots = args.shots or config.val_shots or config.shots
    config.queries = args.queries or (config.val_queries if same_task else None) or config.queries
    if not same_task:
        config.rotations = False
        # Holding out whole groups (alphabets) was the training data's split: other data, without groups
        # (a .npz, a folder of classes) or with its own, is split by class.
        config.split_by = TrainConfig.split_by
    return config, same_task


def _heldout_source(config, manifest: dict, args: argparse.Namespace, same_task: bool):
    """The task source to evaluate on: the classes training held out (as it recorded them), or all of
    another task's; refused if it does not fit the model."""
    from metalearn.train import load_source, task_kind

    try:
        source = load_source(config)
    except (ValueError, FileNotFoundError) as error:
        if args.task or task_kind(config.task) != "path" or Path(config.task).exists():
            raise
        raise UsageError(f"metalearn eval: the checkpoint was trained on {config.task!r} (the path as metalearn train was given it), "
                         f"which is not found from {os.getcwd()}: pass --task PATH ({error})") from None
    if manifest.get("task_type") != source.task_type:
        raise UsageError(
            f"metalearn eval: the checkpoint is a {manifest.get('task_type')} model but task "
            f"{config.task!r} is {source.task_type}"
        )
    if list(source.input_shape) != list(manifest.get("input_shape", [])):
        raise UsageError(
            f"metalearn eval: task inputs have shape {list(source.input_shape)}, the model expects "
            f"{manifest.get('input_shape')}"
        )
    recorded = (((manifest.get("training") or {}).get("data") or {}).get("classes") or {})
    # Other data (another path, a zip) holding the recorded held-out classes is held out as they were;
    # data without them (a transfer test) is evaluated whole, as before.
    held_out_there = "val" in recorded and bool(set(recorded["val"]) & set(getattr(source, "base_class_names", [])))
    split = args.split or ("val" if (same_task or held_out_there) and config.val_fraction > 0 else "all")
    if split in recorded:
        return held_out_as_recorded(source, split, recorded[split], same_task)
    return source.split(split)


def _evaluate_kwargs(config, manifest: dict, args: argparse.Namespace, source, recorded: dict) -> dict:
    """evaluate()'s arguments: eval's flags, else what the checkpoint records for test time (``recorded``:
    ``Checkpoint.adaptation_settings``, as the service adapts)."""
    from metalearn.adaptation import check_support_shift
    from metalearn.evaluate import EVAL_SEED

    kwargs = dict(
        episodes=args.episodes,
        shots=config.shots,
        queries=config.queries,
        inner_steps=args.inner_steps if args.inner_steps is not None else recorded["steps"],
        inner_lr=args.inner_lr if args.inner_lr is not None else recorded["lr"],
        transductive=args.transductive,
        support_shift=args.support_shift if args.support_shift is not None else recorded["support_shift"],
        seed=args.seed if args.seed is not None else EVAL_SEED,
    )
    try:
        check_support_shift(kwargs["support_shift"], source.input_shape)
    except ValueError as error:
        raise UsageError(f"metalearn eval: {error}") from None
    if manifest.get("task_type") == "classification":
        kwargs["ways"] = config.ways
        within = config.val_within_group if args.within_group is None else args.within_group
        if within:
            try:
                source.sample(1, None, ways=config.ways, shots=config.shots, queries=config.queries, within_group=True)
            except ValueError as error:
                if args.within_group:
                    raise UsageError(f"metalearn eval: --within-group: {error}") from None
                within = False
        kwargs["within_group"] = within
    return kwargs


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from metalearn.allocator import keep_freed_memory
    from metalearn.checkpoint import json_ready, load_checkpoint
    from metalearn.evaluate import evaluate
    from metalearn.train import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    path = checkpoint_path(args.path)
    device = resolve_device(args.device)
    keep_freed_memory(device)
    checkpoint = load_checkpoint(path, device=device)
    source, kwargs = eval_settings(checkpoint, args)
    result = evaluate(checkpoint.learner, source, progress=args.progress, **kwargs)
    record = {**result.to_dict(), "checkpoint": str(path), "split": getattr(source, "split_name", None)}
    where = f" ({record['split']} split, {source.num_classes} classes)" if record["split"] else ""
    print(json.dumps(json_ready(record), allow_nan=False) if args.json else f"{path}{where}: {result.describe()}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from metalearn.checkpoint import json_ready, read_manifest

    path = checkpoint_path(args.path)
    manifest = json_ready(read_manifest(path))  # (checkpoints before this release may hold NaN)
    if args.json:
        print(json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False))
        return 0
    shown = {k: v for k, v in manifest.items() if k != "state"}
    print(f"# {path}")
    print(json.dumps(shown, indent=2, sort_keys=True))
    if "state" in manifest:
        print(f"# resume state: iteration {manifest['state'].get('iteration')}")
    return 0


def _service(module: str):
    """``service.<module>``, or the error that says the service is not installed."""
    try:
        return importlib.import_module(f"service.{module}")
    except ImportError as error:
        raise UsageError(f"the service is not available ({error}); install metalearn with its service extras") from None


def _serve(model_dir: str, host: str, port: int, **settings: Any) -> None:
    _service("server").serve(model_dir=model_dir, host=host, port=port, **settings)


def cmd_serve(args: argparse.Namespace) -> int:
    model_dir = args.model_dir or _service("settings").Settings.from_environment().model_dir  # (a .env file's too)
    if not Path(model_dir).is_dir():
        raise UsageError(f"metalearn serve: model directory {model_dir} does not exist")
    if not os.access(model_dir, os.R_OK | os.X_OK):
        raise UsageError(f"metalearn serve: model directory {model_dir} is not readable by this user (uid {os.getuid()})")
    settings = {"device": args.device} if args.device else {}
    _serve(model_dir, args.host, args.port, log_level=args.log_level, **settings)
    return 0


# Small, quick demo models: a sinusoid MAML regressor and an Omniglot 5-way classifier.
DEMO_MODELS = {
    "sinusoid-maml": {"config": "sinusoid-maml", "overrides": {"iterations": 3000, "val_interval": 1000,
                                                                 "val_episodes": 200}},
    "omniglot-5way": {"config": "omniglot-5way", "overrides": {"iterations": 300, "val_interval": 150,
                                                                 "val_episodes": 100, "model": {"channels": 32},
                                                                 "meta_batch": 8, "queries": 5}},
}


def make_demo_models(model_dir: str | Path, threads: int | None = None) -> list[Path]:
    """Train the demo models into ``model_dir`` (one run directory each), unless it holds models of its own (the
    user's: left alone, no demo added); a demo model already trained is kept, one interrupted goes on."""
    from metalearn.checkpoint import BEST, LAST, CheckpointError, read_manifest
    from metalearn.train import Trainer, resolve_config

    root = Path(model_dir)
    usable = []
    for _, path in _service("registry").discover(root):  # (what the service would serve)
        try:
            read_manifest(path)
            usable.append(path)
        except CheckpointError as error:
            print(f"note: {_one_line(error)}: not a model (the service skips it too)", file=sys.stderr)
    demo_paths = {root / name / BEST for name in DEMO_MODELS}
    own = [path for path in usable if path not in demo_paths]
    if own:
        print(f"{root}: {len(own)} model(s) of its own already there, not training demo models", file=sys.stderr)
        return usable
    made = []
    for name, recipe in DEMO_MODELS.items():
        out = root / name
        config = resolve_config(recipe["config"], {**recipe["overrides"], "out": str(out), "threads": threads})
        try:
            trained = read_manifest(out / LAST).get("state", {}).get("iteration", 0)
        except CheckpointError:  # none yet (a broken one is said when the run goes on from it)
            trained = 0
        if trained >= config.iterations and out / BEST in usable:
            print(f"demo model {name}: already trained ({out})", file=sys.stderr)
        else:
            resume = (out / LAST).exists()
            print(f"training demo model {name} -> {out}" + (" (going on from its last checkpoint)" if resume else ""), file=sys.stderr)
            overrides = {"iterations": config.iterations, **({"threads": threads} if threads else {})}
            trainer = Trainer(config, resume=True, resume_overrides=overrides) if resume else Trainer(config)
            trainer.run()
        made.append(out / BEST)
    return made


def cmd_demo(args: argparse.Namespace) -> int:
    make_demo_models(args.model_dir, threads=args.threads)
    if args.no_serve:
        return 0
    _serve(args.model_dir, args.host, args.port)
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "info": cmd_info, "demo": cmd_demo, "serve": cmd_serve}


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or error.__class__.__name__
    return " ".join(text.split())


def _plain_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the command's other notes are written: Python's default adds the file, line and source
    line of the library code that warned, which says nothing to someone running a command."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    if not os.environ.get("METALEARN_DEBUG"):
        warnings.formatwarning = _plain_warning
    try:
        args = build_parser().parse_args(argv)  # --help and bad flags: answered before torch loads
        from metalearn.models import MODEL_MODULES_VARIABLE, import_model_modules

        import_model_modules(os.environ.get(MODEL_MODULES_VARIABLE, ""))  # architectures of the user's own
        return COMMANDS[args.command](args)
    except UsageError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:  # (Python's; torch's own allocation failures are RuntimeErrors, below)
        if os.environ.get("METALEARN_DEBUG"):
            raise
        print("error: out of memory: the data, pictures or tasks asked for do not fit in this machine's memory", file=sys.stderr)
        return EXIT_ERROR
    except (FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError) as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, TypeError, RuntimeError, OSError) as error:  # a CheckpointError is a ValueError
        if os.environ.get("METALEARN_DEBUG"):
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
