"""The offline meta-trainer behind ``metalearn train``.

::

    from metalearn.train import Trainer, default_config

    config = default_config("sinusoid", "reptile")      # what works for the pair
    config.out = "runs/sine-reptile"
    summary = Trainer(config).run()

A run directory holds ``last.safetensors`` (saved every ``save_interval``
iterations, at every validation, at the end and on Ctrl-C/SIGTERM, with the
optimiser state and iteration needed to resume), ``best.safetensors`` (the
best validation score so far), ``metrics.jsonl`` and ``curves.png``.
Checkpoints are written atomically by :func:`metalearn.checkpoint.save_checkpoint`,
so a run killed at any moment (even ``kill -9``) resumes with
``Trainer(config, resume=True)`` / ``metalearn train --resume`` from its last
checkpoint and, on the CPU, ends in bit-for-bit the same state as an
uninterrupted run: the tasks of iteration ``i`` come from a generator seeded
by ``(seed, rank, i)``, and the optimiser state travels in the checkpoint.

Under ``torchrun`` every rank samples its own ``meta_batch / world_size``
tasks and the meta-gradients are averaged (see :mod:`metalearn.distributed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import signal
import sys
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call

from metalearn import default_device, distributed
from metalearn.adaptation import check_support_shift
from metalearn.allocator import keep_freed_memory
from metalearn.checkpoint import BEST, LAST, CheckpointError, json_ready, load_checkpoint, read_manifest, save_checkpoint
from metalearn.evaluate import VALIDATION_SEED, EvalResult, better, evaluate
from metalearn.learner import MetaConfig, MetaLearner, as_recorded, check_algorithm, check_positive_number
from metalearn.models import architecture, build_model

CONFIG_DIR = Path(__file__).parent / "configs"
METRICS, PLOT = "metrics.jsonl", "curves.png"
LOCK = ".train.lock"  # held (flock) by the run writing the directory

# Settings that may change when a run is resumed; everything else must match.
RESUMABLE_CHANGES = {
    "iterations",
    "device",
    "out",
    "val_interval",
    "val_episodes",
    "save_interval",
    "log_interval",
    "threads",
    "progress",
    "time_budget",
}


MAX_IMAGE_SIZE = 1024  # pictures' side at the model's input (a Conv4 of 1024x1024 inputs is already far past a few-shot model)


@dataclass
class TrainConfig:
    """Everything a training run depends on (a plain dataclass; YAML configs set its fields)."""

    task: str = "sinusoid"  # sinusoid | omniglot | path to a folder, .zip or .npz
    algorithm: str = "maml"
    # Task shape
    ways: int = 5
    shots: int = 10
    queries: int = 10
    # Meta-optimisation
    meta_batch: int = 25  # tasks per meta-step, over all processes
    inner_steps: int = 1
    inner_lr: float = 0.01
    meta_lr: float = 1e-3
    optimizer: str = "adam"  # adam | sgd (plain SGD: Reptile's outer step)
    lr_schedule: str = "constant"  # constant | cosine | linear (decay to min_lr_fraction * meta_lr)
    min_lr_fraction: float = 0.0
    iterations: int = 10000
    time_budget: float | None = None  # seconds; stop (and save) when training has used this much wall time
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out: str | None = None
    # Model: overrides of the default spec (e.g. {"channels": 32} or {"hidden": [64, 64]}), or another
    # architecture with its arguments (e.g. {"arch": "my-cnn", "width": 8}: a registered one, see build_learner)
    model: dict = field(default_factory=dict)
    # The rest of MetaConfig's fields, by the same names (meta_config; None = the algorithm's default)
    first_order: bool | None = None
    first_order_iterations: int = 0
    multi_step_loss: bool | None = None
    multi_step_loss_iterations: int = 500
    learn_step_lrs: bool | None = None
    encoder_hidden: int = 64
    head_init: str = "learned"  # learned | prototypes (Proto-MAML: the head starts as the nearest-class-mean classifier)
    loss: str | None = None  # None: the task's (cross_entropy, mse); or a name given to metalearn.register_loss
    grad_clip: float | None = None
    strategy: str = "auto"
    checkpoint_inner: bool = False
    # Data (image tasks)
    rotations: bool = False
    rotate_heldout: bool = True
    max_shift: int = 0  # train-split augmentation: random translation of each image by up to this many pixels
    split_by: str = "character"
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    split_seed: int = 0
    within_group: bool = False  # training tasks from one group (alphabet) each
    # Pictures (omniglot, folders, zips): how they become the model's input (recorded in the checkpoint,
    # which the service applies to uploads). Grey-scale (or RGB with color), resized to image_size x
    # image_size (not cropped: other aspect ratios are squashed), scaled to 0-1, inverted (dark strokes on
    # light paper become 1.0).
    image_size: int = 28
    invert: bool = True
    resample: str = "lanczos"  # nearest | box | bilinear | hamming | bicubic | lanczos
    color: bool = False  # keep colour: 3 input channels (RGB) instead of grey
    skip_undecodable: bool = False  # leave out (with a warning) the files that do not decode, instead of stopping
    # Validation and test-time adaptation
    val_interval: int = 500
    val_episodes: int = 200
    val_ways: int | None = None  # default: ways
    val_shots: int | None = None  # default: shots
    val_queries: int | None = None  # default: queries (images: 1 per class, Lake et al.)
    val_within_group: bool = True  # classification: all classes of a task from one group
    eval_inner_steps: int | None = None  # inner steps at test time (default: inner_steps)
    eval_inner_lr: float | None = None  # inner lr at test time (default: trained/learned lr)
    eval_support_shift: int = 0  # images: adapt at test time also on the support shifted by this many pixels
    transductive: bool = False  # BatchNorm statistics of the query batch at validation
    # Bookkeeping
    save_interval: int = 100
    log_interval: int = 10
    threads: int | None = None
    progress: bool = True

    def to_dict(self) -> dict:
        config = asdict(self)
        if config["loss"] is None:
            del config["loss"]  # (the task's own loss, said by omission: releases before losses were named resume it)
        return config

    def update(self, values: dict[str, Any], where: str = "config") -> TrainConfig:
        """Set fields from a mapping; unknown keys are an error naming ``where``."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)}")
        hints = typing.get_type_hints(TrainConfig)
        for key, value in values.items():
            if key == "model":
                if value is not None and not isinstance(value, dict):
                    raise ValueError(f"{where}: 'model' must be a mapping of model spec overrides")
                value = dict(value or {})
                # Merged into the model settings before (a config file's), unless they name another architecture.
                another = "arch" in value and value["arch"] != self.model.get("arch")
                self.model = value if another else {**self.model, **value}
            else:
                setattr(self, key, _typed(key, value, hints[key], where))
        return self

    def validate(self) -> None:
        check_algorithm(self.algorithm)  # (first: a misspelt algorithm is the likelier mistake than the rest)
        for name in ("ways", "shots", "meta_batch", "iterations", "val_interval", "val_episodes", "save_interval", "log_interval"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.queries < 1:
            raise ValueError(f"queries must be >= 1, got {self.queries}")
        if int(self.eval_support_shift) < 0:
            raise ValueError(f"eval_support_shift must be >= 0, got {self.eval_support_shift}")
        check_positive_number("meta_lr", self.meta_lr)
        if not 4 <= int(self.image_size) <= MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be from 4 to {MAX_IMAGE_SIZE}, got {self.image_size}")
        # The settings read only at validation or at the end, checked now: not after hours of training.
        for name in ("val_ways", "val_shots", "val_queries", "eval_inner_steps", "max_shift"):  # (None: the default; 0 too for val_*)
            value = getattr(self, name)
            if value is not None and int(value) < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name in ("eval_inner_lr", "time_budget"):
            if getattr(self, name) is not None:
                check_positive_number(name, getattr(self, name))
        if not 0 <= self.min_lr_fraction <= 1:
            raise ValueError(f"min_lr_fraction must be from 0 to 1 (of meta_lr), got {self.min_lr_fraction}")
        if not -2**63 <= self.seed < 2**64:  # (torch's generators take 64 bits)
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.lr_schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"lr_schedule must be constant, cosine or linear, got {self.lr_schedule!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        self.meta_config()  # MetaConfig checks the algorithm settings

    def meta_config(self, task_type: str = "classification") -> MetaConfig:
        """The algorithm's settings: each of MetaConfig's fields is the field of the same name here
        (so a new MetaConfig option is a new field here, and nothing else)."""
        return MetaConfig(task_type=task_type, **{f.name: getattr(self, f.name) for f in dataclasses.fields(MetaConfig) if f.name != "task_type"})


def _typed(key: str, value: Any, hint: Any, where: str) -> Any:
    """``value`` (from YAML or ``--set``) as the field's type: ints and numeric strings for floats are fine,
    anything else that does not fit is an error naming the setting (not a TypeError deep inside training)."""
    kinds = typing.get_args(hint) or (hint,)
    if value is None and type(None) in kinds:
        return None
    if float in kinds and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if float in kinds and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    for kind in kinds:
        if kind in (int, str, bool) and type(value) is kind:  # (type: True is an int to isinstance)
            return value
    wanted = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}.get(k, k.__name__) for k in kinds)
    raise ValueError(f"{where}: {key} must be {wanted}, got {value!r}")


# ----------------------------------------------------------------------
# Defaults per (task, algorithm) and config files
# ----------------------------------------------------------------------

# Sinusoid: the MAML paper (K=10, meta-batch 25, one inner step of 0.01, Adam
# 1e-3, 10 steps at test time), with what each variant needs on top.
_SINUSOID = {
    "maml": {},
    "fomaml": {},
    # Meta-SGD learns per-parameter lrs for exactly one step: more steps at
    # test time with them overshoot.
    "metasgd": {"eval_inner_steps": 1},
    "tamaml": {},
    # Only the 40->1 head adapts: it needs more and larger steps.
    "anil": {"inner_steps": 5, "inner_lr": 0.05},
    # Several inner steps, and Reptile's outer update: plain SGD towards the
    # mean adapted weights.
    "reptile": {"inner_steps": 10, "inner_lr": 0.02, "optimizer": "sgd", "meta_lr": 0.5, "lr_schedule": "linear"},
    # MAML++: several steps with learned per-step lrs and the multi-step loss.
    "mamlpp": {"inner_steps": 5, "multi_step_loss_iterations": 2000},
}

_OMNIGLOT_5WAY = {
    "maml": {},
    "fomaml": {},
    "metasgd": {},
    "tamaml": {},
    "anil": {"inner_steps": 5},
    "reptile": {"inner_steps": 5, "inner_lr": 0.1, "optimizer": "sgd", "meta_lr": 0.5, "lr_schedule": "linear"},
    "mamlpp": {"inner_steps": 3, "inner_lr": 0.1, "first_order_iterations": 100},
}

_OMNIGLOT_20WAY = {
    "maml": {},
    "fomaml": {},
    "metasgd": {},
    "tamaml": {},
    "anil": {},
    "reptile": {"inner_steps": 10, "optimizer": "sgd", "meta_lr": 0.5, "lr_schedule": "linear"},
    "mamlpp": {"first_order_iterations": 100},
}


def task_kind(task: str) -> str:
    return task if task in ("sinusoid", "omniglot") else "path"


def default_config(task: str = "sinusoid", algorithm: str = "maml", ways: int | None = None) -> TrainConfig:
    """What works for a (task, algorithm) pair; every field can still be overridden."""
    check_algorithm(algorithm)
    kind = task_kind(task)
    config = TrainConfig(task=task, algorithm=algorithm)
    if kind == "sinusoid":
        config.update(
            dict(ways=1, shots=10, queries=10, meta_batch=25, inner_steps=1, inner_lr=0.01, meta_lr=1e-3,
                 iterations=15000, val_interval=1000, val_episodes=500, val_queries=100, eval_inner_steps=10, save_interval=500,
                 log_interval=50, threads=1)
        )
        config.update(_SINUSOID.get(algorithm, {}))
        return config
    ways = ways or 5
    if ways >= 10:
        # Omniglot 20-way 1-shot (the setting the learn2learn reference ran on a CPU).
        config.update(
            dict(ways=ways, shots=1, queries=5, meta_batch=4, inner_steps=5, inner_lr=0.1, meta_lr=1e-3,
                 iterations=600, val_interval=100, val_episodes=200, val_queries=1, eval_inner_steps=10,
                 save_interval=10, log_interval=5)
        )
        config.update(_OMNIGLOT_20WAY.get(algorithm, {}))
    else:
        # Omniglot 5-way 1-shot (MAML paper: one step of 0.4; three at test time).
        config.update(
            dict(ways=ways, shots=1, queries=15, meta_batch=16, inner_steps=1, inner_lr=0.4, meta_lr=1e-3,
                 iterations=2000, val_interval=250, val_episodes=200, val_queries=1, eval_inner_steps=3,
                 save_interval=50, log_interval=10)
        )
        config.update(_OMNIGLOT_5WAY.get(algorithm, {}))
    if kind == "omniglot":
        # Rotations make new training classes (MAML paper). Validation holds
        # out one whole alphabet (split_seed 0: Korean, 40 characters) without
        # rotations, so that it is the judged protocol: 20-way 1-shot within
        # an alphabet never seen in training.
        config.update(dict(rotations=True, split_by="group", val_fraction=0.125, rotate_heldout=False))
    else:
        config.queries = min(config.queries, 5)
    return config


def find_config(name: str) -> Path:
    """A config file by path, or by name from ``metalearn/configs`` (``omniglot-20way``)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"config file {name} not found")
        return path
    candidate = CONFIG_DIR / f"{name}.yaml"
    if not candidate.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"no config named {name!r} (known: {known})")
    return candidate


def read_config_file(name: str) -> dict:
    import yaml

    path = find_config(name)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config must be a mapping of settings")
    values.pop("description", None)
    return values


def resolve_config(config_file: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults for the (task, algorithm) pair <- config file <- overrides (command-line flags)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    file_values = read_config_file(config_file) if config_file else {}
    task = overrides.get("task", file_values.get("task", "sinusoid"))
    algorithm = overrides.get("algorithm", file_values.get("algorithm", "maml"))
    ways = overrides.get("ways", file_values.get("ways"))
    config = default_config(task, algorithm, ways=ways)
    config.update(file_values, where=str(config_file))
    config.update(overrides, where="command line")
    config.validate()
    return config


# ----------------------------------------------------------------------
# Pieces of a run
# ----------------------------------------------------------------------


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = default_device()
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA GPU is available")
        if name == "cuda":
            name = f"cuda:{local_rank % torch.cuda.device_count()}"
    return torch.device(name)


# TrainConfig's settings for pictures (omniglot, folders, zips), which a .npz does not take.
PICTURE_SETTINGS = ("image_size", "invert", "resample", "color", "skip_undecodable")


def load_source(config: TrainConfig):
    """The task source of a config (Omniglot, sinusoid or the user's data)."""
    from metalearn.data import load_task_source

    if task_kind(config.task) == "sinusoid":
        return load_task_source("sinusoid", shots=config.shots, queries=config.queries)
    options = dict(
        ways=config.ways,
        shots=config.shots,
        queries=config.queries,
        rotations=config.rotations,
        rotate_heldout=config.rotate_heldout,
        max_shift=config.max_shift,
        split_by=config.split_by,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        split_seed=config.split_seed,
    )
    if str(config.task).lower().endswith(".npz"):
        changed = ", ".join(name for name in PICTURE_SETTINGS if getattr(config, name) != getattr(TrainConfig, name))
        if changed:
            raise ValueError(f"{changed}: for pictures (omniglot, folders, zips); a .npz holds its inputs as they are")
        return load_task_source(config.task, **options)
    return load_task_source(config.task, **options, image_size=config.image_size, invert=config.invert,
                            resample=config.resample, grayscale=not config.color, progress=config.progress,
                            skip_undecodable=config.skip_undecodable)


def data_record(source) -> dict:
    """What a checkpoint records of its classification data: the classes of each split, by name (so that
    ``metalearn eval`` holds out the same classes after classes were added to the data), and the count of
    examples. Empty for task families without classes (sinusoid)."""
    if not hasattr(source, "base_class_names"):
        return {}
    classes = {}
    for split in ("train", "val", "test"):
        try:
            classes[split] = sorted(source.split(split).base_class_names)
        except ValueError:  # an empty split
            continue
    return {"examples": source.num_images, "classes": classes}


def describe_data(source, record: dict) -> str:
    """One line: the data's classes per split, examples, and the input they become."""
    splits = ", ".join(f"{len(names)} {split}" for split, names in record["classes"].items())
    prep = source.preprocessing or {}
    if prep.get("kind") == "image":
        height, width = prep["size"]
        colour = "grey-scale" if prep.get("grayscale", True) else "RGB"
        how = f"pictures made {colour} {height}x{width} ({prep['resample']}{', inverted' if prep.get('invert') else ''}; image_size, invert, resample, color set it)"
    else:
        how = "arrays" + (" of uint8, divided by 255" if prep.get("scale") == "divide_255" else "")
    return f"{source.name}: {sum(len(n) for n in record['classes'].values())} classes ({splits}), {record['examples']} examples, input {list(source.input_shape)}: {how}"


def check_ways(ways: int, name: str = "ways") -> None:
    """Classification tasks need two classes at least: a 1-way task is answered right whatever the model."""
    if ways < 2:
        raise ValueError(f"{name} must be >= 2 for classification, got {ways}: a 1-way task is answered right "
                         "whatever the model, so there is nothing to learn or measure")


def build_learner(config: TrainConfig, source) -> MetaLearner:
    """The model the config's ``model`` names (overrides of the task's default spec, or another
    architecture), wrapped for the config's algorithm."""
    shape = tuple(source.input_shape)
    out_features = 1 if source.task_type == "regression" else config.ways
    if source.task_type == "regression":
        spec = {"arch": "mlp", "in_features": shape[0], "hidden": [40, 40], "out_features": 1}
    elif len(shape) == 3:
        spec = {"arch": "conv4", "in_channels": shape[0], "image_size": shape[-1], "channels": 64,
                "out_features": out_features}
        if shape[-1] != shape[-2] and config.model.get("arch", "conv4") == "conv4":
            if shape[-1] in (1, 3, 4) and shape[0] == shape[1]:
                raise ValueError(f"inputs of shape {shape} look channels-last: images are [C, H, W] (channels first); "
                                 "for a .npz, np.transpose(x, (0, 3, 1, 2))")
            raise ValueError(f"conv4 needs square images, got input shape {shape}")
    else:
        spec = {"arch": "mlp", "in_features": int(math.prod(shape)), "hidden": [256, 128], "out_features": out_features}
    arch = config.model.get("arch", spec["arch"])
    if arch != spec["arch"]:
        # Another architecture (a registered one of the user's): the task's sizes fill in the
        # constructor arguments of these names it takes, the config gives the rest.
        sizes = {"in_features": int(math.prod(shape)), "in_channels": shape[0], "out_features": out_features}
        if len(shape) == 3 and shape[-1] == shape[-2]:
            sizes["image_size"] = shape[-1]
        taken = inspect.signature(architecture(arch)).parameters
        spec = {"arch": arch, **{name: value for name, value in sizes.items() if name in taken}}
    spec.update(config.model)
    learner = MetaLearner(build_model(spec), config.meta_config(source.task_type))
    check_outputs(learner.model, spec["arch"], shape, out_features)
    return learner


def check_outputs(model: torch.nn.Module, arch: str, input_shape: tuple[int, ...], out_features: int) -> None:
    """Run ``model`` once on two inputs of the task's shape, so that a model that fails on them or gives
    the wrong number of outputs is said before training, naming the model (a model of the user's own
    fails otherwise deep in the first meta-step, or trains on broadcast targets). It runs on copies of the
    buffers: a forward that changes one in place, whatever the mode, must not change what training starts from."""
    probe = torch.zeros(2, *input_shape)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    training = model.training
    model.eval()  # (dropout and the like left as they are)
    try:
        with torch.no_grad():
            outputs = functional_call(model, buffers, (probe,))  # (its own parameters, the copies of its buffers)
    except Exception as error:  # noqa: BLE001 - the model's own code: any failure, said with what it was given
        raise ValueError(f"model {arch!r} failed on a batch of the task's inputs (shape {list(probe.shape)}): "
                         f"{type(error).__name__}: {error}") from error
    finally:
        model.train(training)
    if not isinstance(outputs, torch.Tensor):
        raise ValueError(f"model {arch!r} returns a {type(outputs).__name__} from forward; metalearn needs one tensor of "
                         "outputs [N, outputs] (logits or values): return it alone, or wrap the model in a module that does")
    if tuple(outputs.shape) != (2, out_features):
        got = list(outputs.shape)
        need = "one value per input" if out_features == 1 else f"one logit per way, --ways {out_features}"
        raise ValueError(f"model {arch!r} gives outputs {got} for a batch of 2 of the task's inputs; the task needs "
                         f"[2, {out_features}] ({need}): set the argument that sizes its last layer "
                         "(e.g. --set 'model={out_features: N}')")


def task_generator(seed: int, rank: int, iteration: int) -> torch.Generator:
    """The generator the tasks of one iteration on one rank come from (resume needs no sampler state)."""
    digest = hashlib.sha256(f"metalearn:{seed}:{rank}:{iteration}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def make_optimizer(config: TrainConfig, learner: MetaLearner) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(learner.parameters(), lr=config.meta_lr)
    return torch.optim.Adam(learner.parameters(), lr=config.meta_lr)


def learning_rate(config: TrainConfig, iteration: int) -> float:
    progress = min(iteration / max(config.iterations, 1), 1.0)
    low = config.meta_lr * config.min_lr_fraction
    if config.lr_schedule == "cosine":
        return low + 0.5 * (config.meta_lr - low) * (1 + math.cos(math.pi * progress))
    if config.lr_schedule == "linear":
        return config.meta_lr + (low - config.meta_lr) * progress
    return config.meta_lr


def optimizer_to_state(optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """An optimiser's state as JSON plus named tensors (no pickle)."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return {"param_groups": state_dict["param_groups"], "scalars": scalars}, tensors


def optimizer_from_state(optimizer: torch.optim.Optimizer, saved: dict, tensors: dict[str, torch.Tensor]) -> None:
    current = optimizer.state_dict()
    groups = []
    for mine, theirs in zip(current["param_groups"], saved["param_groups"]):
        group = dict(mine)
        for key, value in theirs.items():
            group[key] = tuple(value) if isinstance(mine.get(key), tuple) else value
        groups.append(group)
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        if name.startswith("optim/"):
            _, index, key = name.split("/", 2)
            state.setdefault(int(index), {})[key] = tensor.clone()
    for index, values in saved.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


class TrainingDiverged(RuntimeError):
    """The meta-training loss became NaN or infinite: training stops without saving the broken weights."""


class _ValidationInterrupted(BaseException):
    """Ctrl-C / SIGTERM during a validation (which takes up to half a minute on Omniglot): it is dropped, and
    the run saves where it is and stops. (A BaseException, as KeyboardInterrupt is: an ``except Exception`` in
    the user's model or loss code must not take it.)"""


class _StopRequest:
    """Ctrl-C / SIGTERM set a flag the loop checks between iterations, or end a validation in progress
    (:meth:`validation`); a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._validating = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if self._validating:
            self._validating = False  # (raised once)
            raise _ValidationInterrupted

    @contextlib.contextmanager
    def validation(self):
        """A validation that a stop request ends (:class:`_ValidationInterrupted`)."""
        self._validating = not self.requested
        try:
            if self.requested:
                raise _ValidationInterrupted
            yield
        finally:
            self._validating = False

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------


class _Window:
    """Sums over the meta-steps since the last metrics line (their means are the line)."""

    def __init__(self) -> None:
        self.loss = self.accuracy = 0.0
        self.count = 0
        self.start = time.perf_counter()

    def add(self, loss: float, accuracy: float) -> None:
        self.loss += loss
        self.accuracy += accuracy
        self.count += 1


def _another_run(out: Path) -> FileExistsError:
    return FileExistsError(f"{out}: another metalearn train is writing this run directory; wait for it to end or choose another --out")


def held_by_another_run(out: Path) -> None:
    """Raise the error a second run on ``out`` gets while another one holds the directory's lock (POSIX)."""
    try:
        import fcntl

        with open(out / LOCK, "r") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (released as the file closes)
    except BlockingIOError:
        raise _another_run(out) from None
    except (ImportError, OSError):  # no lock file, no fcntl: nobody holds it that we can tell
        pass


class Trainer:
    """Runs (or resumes) one meta-training run; see the module docstring."""

    def __init__(self, config: TrainConfig, resume: bool = False, resume_overrides: dict | None = None):
        config.validate()
        if config.out is None:
            config.out = str(Path("runs") / f"{Path(config.task).stem}-{config.algorithm}")
        self.out = Path(config.out)
        if self.out.exists() and not self.out.is_dir():
            raise NotADirectoryError(f"--out {self.out} is a file; a run directory goes there")
        self.resume = resume
        self.context = distributed.from_environment()
        if resume:
            config = self._resumed_config(config, resume_overrides or {})
        else:
            self._refuse_a_run_there()
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device, self.context.local_rank)
        keep_freed_memory(self.device)  # on the CPU, 15-20% of a step went to re-faulting freed memory
        if config.meta_batch % self.context.world_size:
            raise ValueError(
                f"meta_batch {config.meta_batch} is not divisible by the {self.context.world_size} processes"
            )
        self.local_batch = config.meta_batch // self.context.world_size

        source = load_source(config)
        self.source = source
        self.task_type = source.task_type
        if self.task_type == "classification":
            check_ways(config.ways)
            if config.val_ways:  # (0 or None: ways, as everywhere val_ways is read)
                check_ways(config.val_ways, "val_ways")
        check_support_shift(config.eval_support_shift, source.input_shape)
        self.train_source = source.split("train")
        self.val_source = self._validation_source(source)
        self.data_record = data_record(source)
        if self.context.is_main and self.data_record:
            print(f"data: {describe_data(source, self.data_record)}", file=sys.stderr)

        torch.manual_seed(config.seed)
        self.learner = build_learner(config, source).to(self.device)
        self.optimizer = make_optimizer(config, self.learner)
        self.val_kwargs = self._validation_kwargs()  # (after the model: inputs it cannot take are the likelier mistake)
        self.iteration = 0
        self.best: dict | None = None
        self.saved_at: int | None = None  # the iteration last.safetensors holds (written or resumed from)
        self.elapsed = 0.0
        self.last_val: dict | None = None
        if resume:
            self._load_state()
            self.saved_at = self.iteration
            budget = config.time_budget
            if budget is not None and self.elapsed >= budget and self.iteration < config.iterations:
                # (it would train one more meta-step, then stop, validate and save again)
                raise ValueError(f"--resume: the run's time budget ({budget:g} s) is used up ({self.elapsed:.0f} s of training); "
                                 "pass --time-budget SECONDS, more than that, to go on")
            if "iterations" in (resume_overrides or {}) and self.iteration > config.iterations:
                # (it said "done" and did nothing: the run is not cut back to fewer iterations)
                raise ValueError(f"--resume: the run is at iteration {self.iteration}, past --iterations {config.iterations}: "
                                 "pass more iterations to go on")

    # -- setup ------------------------------------------------------------

    def _resumed_config(self, config: TrainConfig, overrides: dict) -> TrainConfig:
        path = self.out / LAST
        if not path.exists():
            held_by_another_run(self.out)  # (a run that has not saved yet: that is what to say)
            raise FileNotFoundError(f"--resume: {path} does not exist (nothing to resume)")
        saved = TrainConfig().update(as_recorded(read_manifest(path).get("training", {}).get("config", {})), where=str(path))
        # Through update: an unknown or mistyped setting is refused as it is without --resume.
        changes = {key: value for key, value in overrides.items() if key != "resume"}
        resumed = dataclasses.replace(saved).update(changes, where="--resume")
        for key in changes:
            if key not in RESUMABLE_CHANGES and getattr(resumed, key) != getattr(saved, key):
                raise ValueError(
                    f"--resume: cannot change {key!r} of an existing run ({getattr(saved, key)!r} -> {getattr(resumed, key)!r})"
                )
        resumed.out = str(self.out)
        resumed.validate()
        return resumed

    def _validation_source(self, source):
        if self.task_type == "regression":
            return source
        if self.config.val_fraction <= 0:
            return None
        return source.split("val")

    def _validation_kwargs(self) -> dict:
        c = self.config
        kwargs = dict(
            shots=c.val_shots or c.shots,
            queries=c.val_queries or c.queries,
            inner_steps=self.eval_inner_steps,
            inner_lr=c.eval_inner_lr,
            transductive=c.transductive,
            support_shift=c.eval_support_shift,
            episodes=c.val_episodes,
        )
        if self.task_type == "classification":
            kwargs["ways"] = c.val_ways or c.ways
            kwargs["within_group"] = c.val_within_group
            # A split too small for any validation task: said now, not at the first validation.
            error = None if self.val_source is None else self._sampling_error(kwargs, within_group=c.val_within_group)
            if error is not None and c.val_within_group and self._sampling_error(kwargs, within_group=False) is None:
                print(f"note: validating across groups ({error})", file=sys.stderr)
                kwargs["within_group"] = False
            elif error is not None:
                raise ValueError(f"validation cannot draw its tasks: {error}; set val_ways, val_shots or val_queries "
                                 "(--set), or a larger val_fraction")
        return kwargs

    def _sampling_error(self, kwargs: dict, within_group: bool) -> ValueError | None:
        """Why the validation split cannot give a task of ``kwargs``' shape, or None when it can."""
        try:
            self.val_source.sample(1, torch.Generator().manual_seed(0), ways=kwargs["ways"], shots=kwargs["shots"],
                                   queries=kwargs["queries"], within_group=within_group)
        except ValueError as error:
            return error
        return None

    @property
    def eval_inner_steps(self) -> int:
        c = self.config
        return c.eval_inner_steps if c.eval_inner_steps is not None else c.inner_steps

    # -- checkpoints -------------------------------------------------------

    def _manifest_fields(self, metrics: dict | None) -> dict:
        c = self.config
        return dict(
            input_shape=tuple(self.source.input_shape),
            n_way=c.ways if self.task_type == "classification" else None,
            preprocessing=self.source.preprocessing,
            training={
                "config": c.to_dict(),
                "iterations_done": self.iteration,
                "world_size": self.context.world_size,
                "wall_seconds": round(self.elapsed, 3),
                "validation": {k: v for k, v in self.val_kwargs.items() if k not in ("inner_steps", "inner_lr", "support_shift")},
                "data": self.data_record,
            },
            metrics=metrics or {},
            inner_steps=self.eval_inner_steps,
            inner_lr=c.eval_inner_lr,
            support_shift=c.eval_support_shift,
        )

    def save(self, name: str, metrics: dict | None = None) -> None:
        state, tensors = optimizer_to_state(self.optimizer)
        tensors["rng/torch"] = torch.get_rng_state()
        resume_state = {
            "iteration": self.iteration,
            "best": self.best,
            "last_val": self.last_val,
            "elapsed": self.elapsed,
            "optimizer": state,
            "seed": self.config.seed,
            "world_size": self.context.world_size,
        }
        save_checkpoint(self.out / name, self.learner, state_tensors=tensors, state=resume_state,
                        **self._manifest_fields(metrics))
        if name == LAST:
            self.saved_at = self.iteration

    def _load_state(self) -> None:
        path = self.out / LAST
        checkpoint = load_checkpoint(path, device=self.device)
        state = checkpoint.manifest.get("state")
        if not state or "optimizer" not in state:
            raise CheckpointError(f"{path}: has no training state to resume from")
        try:
            self.learner.load_state_dict(checkpoint.learner.state_dict())
        except RuntimeError as error:
            raise CheckpointError(f"{path}: does not match this run's model ({error})") from None
        tensors = {k: v.to(self.device) for k, v in checkpoint.state_tensors.items() if k.startswith("optim/")}
        optimizer_from_state(self.optimizer, state["optimizer"], tensors)
        if "rng/torch" in checkpoint.state_tensors:
            torch.set_rng_state(checkpoint.state_tensors["rng/torch"])
        self.iteration = int(state["iteration"])
        recorded = state.get("world_size", 1)
        if recorded != self.context.world_size and self.context.is_main:
            # (each process draws its own tasks: the run goes on, but not as it would have without the stop)
            print(f"note: resuming a run trained by {recorded} process(es) with {self.context.world_size}: its "
                  "meta-batches are drawn differently from here on", file=sys.stderr)
        self.best = state.get("best")
        self.last_val = state.get("last_val")
        self.elapsed = float(state.get("elapsed", 0.0))
        for record in (self.best, self.last_val):  # (a diverged validation's NaN is kept as null)
            for key, value in (record or {}).items():
                if value is None and key in ("mean", "ci95", "std"):
                    record[key] = math.nan

    def _truncate_metrics(self, iteration: int) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be written again)."""
        path = self.out / METRICS
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by kill -9
            if record.get("iteration", 0) <= iteration:
                kept.append(line)
        path.write_text("".join(k + "\n" for k in kept))

    # -- logging -------------------------------------------------------------

    def _log(self, record: dict) -> None:
        with open(self.out / METRICS, "a") as handle:
            handle.write(json.dumps(json_ready(record), allow_nan=False) + "\n")

    def validate(self) -> EvalResult | None:
        if self.val_source is None:
            return None
        return evaluate(self.learner, self.val_source, seed=VALIDATION_SEED, **self.val_kwargs)

    # -- the loop ------------------------------------------------------------

    def run(self) -> dict:
        """Train to ``config.iterations`` (or the time budget); returns a summary dict."""
        context = distributed.setup(self.device)
        try:
            with self._run_directory(context.is_main):
                return self._run(context)
        finally:
            distributed.teardown(context)

    def _refuse_a_run_there(self) -> None:
        if (self.out / LAST).exists():
            raise FileExistsError(
                f"{self.out} already holds a run ({LAST}); pass --resume to continue it or choose another --out"
            )

    @contextlib.contextmanager
    def _run_directory(self, main: bool):
        """The run directory, made and held by this run alone (the main process's): a second ``metalearn train``
        on the same ``--out`` is refused before it writes anything there, instead of interleaving its metrics
        with this one's and overwriting its checkpoints. What the constructor read of the directory is read
        again once it is held (another run may have written it in between)."""
        if not main:
            yield
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / LOCK, "a") as lock:
            try:
                import fcntl  # (POSIX)

                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (released when the file closes, or the process ends)
            except BlockingIOError:
                raise _another_run(self.out) from None
            except (ImportError, OSError) as error:  # a file system without locks (some network mounts), or no fcntl
                print(f"note: {self.out} cannot be locked ({error}): nothing stops a second run from writing it at once",
                      file=sys.stderr)
            if self.resume:
                if read_manifest(self.out / LAST).get("state", {}).get("iteration") != self.saved_at:
                    raise FileExistsError(f"{self.out}: another run wrote {LAST} after this one read it; resume again")
                self._truncate_metrics(self.iteration)  # (log lines past the checkpoint resumed from: written again)
            else:
                self._refuse_a_run_there()
                if (self.out / METRICS).exists() and (self.out / METRICS).stat().st_size:
                    print(f"note: {self.out / METRICS} held the log of a run that saved no checkpoint: this run's log "
                          "replaces it", file=sys.stderr)
                (self.out / METRICS).write_text("")  # a fresh run, a fresh log (not appended to another run's)
            yield

    def _run(self, context: distributed.Context) -> dict:
        c = self.config
        main = context.is_main
        if not self.resume:
            distributed.broadcast_parameters(self.learner, context)
        reduce = distributed.gradient_reducer(context)
        bar = None
        if main and c.progress:
            from tqdm import tqdm

            bar = tqdm(total=c.iterations, initial=self.iteration, desc=f"{c.algorithm} {Path(c.task).stem}",
                       dynamic_ncols=True, file=sys.stderr, unit="it")
        interrupted = False
        window = _Window()
        started = time.perf_counter() - self.elapsed
        with _StopRequest() as stop:
            # (with several processes a validation is not interrupted: the others would wait for this one)
            validation_stop = None if context.enabled else stop
            while self.iteration < c.iterations:
                i = self.iteration
                lr = learning_rate(c, i)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                generator = task_generator(c.seed, context.rank, i)
                batch = self.train_source.sample(self.local_batch, generator, within_group=c.within_group)
                result = self.learner.meta_step(batch.to(self.device), self.optimizer, iteration=i, reduce_grads=reduce)
                accuracy = result.accuracy if result.accuracy is not None else float("nan")
                budget_over = c.time_budget is not None and time.perf_counter() - started >= c.time_budget
                loss, accuracy, stop_any = distributed.average_scalars(
                    [result.loss, accuracy, float(stop.requested or budget_over)], context, self.device
                )
                if not math.isfinite(loss):  # (averaged: every process stops here together)
                    if bar is not None:
                        bar.close()
                    raise TrainingDiverged(self._diverged(i + 1, loss))
                self.iteration = i + 1
                self.elapsed = time.perf_counter() - started
                window.add(loss, accuracy)
                done = self.iteration == c.iterations
                if main and (self.iteration % c.log_interval == 0 or done or stop_any):
                    self._log_train(window, lr, bar)
                    window = _Window()
                if bar is not None:
                    bar.update(1)
                if stop_any:
                    interrupted = not budget_over or stop.requested
                    break
                if self.iteration % c.val_interval == 0 or done:
                    if main:
                        self._validate_and_save(done, validation_stop)
                    if stop.requested and validation_stop is not None:  # (stopped in the validation: no step more)
                        interrupted = True
                        break
                elif self.iteration % c.save_interval == 0 and main:
                    self.save(LAST, metrics=self.last_val)
            # (the last validation dropped, interrupted: a resume at the last iteration runs it, and nothing else)
            unvalidated = self.val_source is not None and (self.last_val or {}).get("iteration") != self.iteration
            if main and (interrupted or unvalidated or self.iteration < c.iterations or not (self.out / LAST).exists()):
                # Stopped early (Ctrl-C, SIGTERM or time budget): validate unless
                # interrupted, then save where we are.
                if not interrupted:
                    self._validate_and_save(True, validation_stop)
                    interrupted = stop.requested  # (during that validation)
                else:
                    self.save(LAST, metrics=self.last_val)
        if bar is not None:
            bar.close()
        distributed.barrier(context)
        summary = {
            "out": str(self.out),
            "iterations": self.iteration,
            "interrupted": interrupted,
            "wall_seconds": round(self.elapsed, 2),
            "best": self.best,
            "last": self.last_val,
        }
        if main:
            self._plot()
        return summary

    def _log_train(self, window: "_Window", lr: float, bar) -> None:
        """One line of metrics.jsonl for the steps since the last one, and the progress bar's figures."""
        record = {"kind": "train", "iteration": self.iteration, "loss": window.loss / window.count, "lr": lr,
                  "steps_per_s": window.count / max(time.perf_counter() - window.start, 1e-9), "elapsed": round(self.elapsed, 3)}
        if self.task_type == "classification":
            record["accuracy"] = window.accuracy / window.count
        self._log(record)
        if bar is not None:
            postfix = {"loss": f"{record['loss']:.4f}"}
            if "accuracy" in record:
                postfix["acc"] = f"{record['accuracy']:.3f}"
            postfix["steps/s"] = f"{record['steps_per_s']:.2f}"
            if self.last_val:
                postfix["val"] = f"{self.last_val['mean']:.4f}"
            bar.set_postfix(postfix, refresh=False)

    def _diverged(self, iteration: int, loss: float) -> str:
        c = self.config
        kept = f"{self.out / LAST} holds iteration {self.saved_at}" if self.saved_at is not None else "no checkpoint was written"
        return (f"training diverged at iteration {iteration}: the meta-training loss is {loss}. Stopped; {kept}. "
                f"Try a smaller meta_lr (now {c.meta_lr:g}) or inner_lr (now {c.inner_lr:g}), or clip the meta-gradient "
                f"(--set grad_clip=1.0), and start a new run.")

    def _validate_and_save(self, final: bool, stop: _StopRequest | None = None) -> None:
        """Validate, keep the best, save ``last``. ``stop``: a stop request ends the validation, which is then
        dropped (``last`` saved without it). (With several processes the others would wait for this one in
        their next step: a request stops them all after it, as between iterations.)"""
        try:
            with stop.validation() if stop is not None else contextlib.nullcontext():
                result = self.validate()
        except _ValidationInterrupted:
            print(f"\nstopping: the validation at iteration {self.iteration} was interrupted and is dropped; "
                  f"saving {LAST}", file=sys.stderr)
            self.save(LAST, metrics=self.last_val)
            return
        metrics = None
        if result is not None:
            metrics = {**result.to_dict(), "iteration": self.iteration}
            self.last_val = metrics
            self._log({"kind": "val", **metrics})
            if math.isnan(result.mean):
                lr = self.config.eval_inner_lr
                cure = f"a smaller eval_inner_lr (now {lr:g})" if lr is not None else "a smaller inner_lr or meta_lr"
                print(f"note: validation at iteration {self.iteration} gave {result.metric} nan: adapting at test time "
                      f"({result.inner_steps} inner steps) diverges; {cure} may help", file=sys.stderr)
            if better(result.metric, result.mean, self.best["mean"] if self.best else None):
                self.best = metrics
                self.save(BEST, metrics=metrics)
        elif final:
            # No validation split: the final weights are the best we have.
            self.best = {"iteration": self.iteration}
            self.save(BEST, metrics={})
        self.save(LAST, metrics=metrics)
        self._plot()

    def _plot(self) -> None:
        try:
            plot_metrics(self.out / METRICS, self.out / PLOT)
        except Exception as error:  # a plot must never kill a training run
            print(f"note: could not draw {PLOT}: {error}", file=sys.stderr)


def read_metrics(path: str | Path) -> list[dict]:
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> None:
    """Learning curves (training loss/accuracy, validation metric with its 95% CI) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)

    def values(rows: list[dict], key: str) -> list[float]:
        return [math.nan if r.get(key) is None else r[key] for r in rows]  # (NaN is written as null: a gap)

    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        its = [r["iteration"] for r in train]
        axes[0].plot(its, values(train, "loss"), label="query loss (train)")
        if "accuracy" in train[0]:
            twin = axes[0].twinx()
            twin.plot(its, values(train, "accuracy"), color="tab:orange", alpha=0.7, label="accuracy (train)")
            twin.set_ylabel("accuracy")
            twin.legend(loc="upper right")
        axes[0].set_xlabel("iteration")
        axes[0].set_ylabel("loss")
        axes[0].legend(loc="upper left")
        axes[0].set_title("meta-training")
    if val:
        its = [r["iteration"] for r in val]
        axes[1].errorbar(its, values(val, "mean"), yerr=values(val, "ci95"), marker="o", capsize=3)
        axes[1].set_xlabel("iteration")
        axes[1].set_ylabel(val[-1]["metric"])
        axes[1].set_title(f"validation ({val[-1]['episodes']} tasks, 95% CI)")
        if val[-1]["metric"] == "mse":
            axes[1].set_yscale("log")
    fig.tight_layout()
    tmp = Path(png_path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(png_path)


__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "default_config", "resolve_config", "find_config", "load_source", "build_learner",
           "plot_metrics", "task_generator"]
