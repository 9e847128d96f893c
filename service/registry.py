"""The models the service serves, loaded from a model directory at start.

Every ``*.safetensors`` file directly in the directory is a model named after
the file (``omniglot.safetensors`` -> ``omniglot``), and every sub-directory
holding a ``best.safetensors`` (the output of ``metalearn train --out DIR``) is
a model named after the directory. A file that cannot be loaded is logged and
skipped. Loading never unpickles (see :mod:`metalearn.checkpoint`).

Loading again with the registry being served (``ModelRegistry.load(dir, device,
previous)``, what the service does on ``SIGHUP``) loads only what changed: a
model whose file is the one it was loaded from, or holds the same checkpoint
(the same content hash: copied or touched again), stays the same object (and
the engine's computations recorded for it stay valid), new files are loaded,
models whose file is gone are dropped, and a changed file that fails to load
leaves the version already served in place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metalearn.adaptation import SHIFTED_VIEWS, check_support_shift
from metalearn.checkpoint import BEST, LAST, SUFFIX, Checkpoint, CheckpointError, load_checkpoint
from metalearn.learner import MetaLearner
from metalearn.models import BatchNorm
from service.engine import MEAN, PARAM, VAR

log = logging.getLogger("service.registry")



@dataclass
class LoadedModel:
    name: str
    checkpoint: Checkpoint
    device: str
    input_shape: tuple[int, ...]
    task_type: str
    n_way: int | None
    out_features: int
    inner_steps: int
    default_lr: float | None  # what a request without inner_lr adapts with (None: the model's learned rates)
    adapted_names: list[str] = field(default_factory=list)
    support_shift: int = 0  # test-time support augmentation (metalearn.adaptation.augment_support)
    source: tuple = ()  # the file it was loaded from, as _file_identity says: a reload keeps the model while it is unchanged
    # What the engine works out once per model and keeps with it (so it goes when a reload replaces the
    # model): "fast" its fast kernel or None, "strategy" its batching strategy, "lone_predict_s" the last
    # lone session predict's time per query image, "compile_learner" the copy scripts are recorded on
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def learner(self) -> MetaLearner:
        return self.checkpoint.learner

    @property
    def manifest(self) -> dict:
        return self.checkpoint.manifest

    @property
    def preprocessing(self) -> dict | None:
        """How the training data became the model's input (``kind`` image: pictures; array: a .npz), or None."""
        prep = self.manifest.get("preprocessing")
        return prep if isinstance(prep, dict) else None

    @property
    def accepts_images(self) -> bool:
        return self.preprocessing is not None and self.preprocessing.get("kind") == "image"

    @property
    def inner_lr(self) -> float:
        """The rate the checkpoint records: the default one, or with learned rates the rate training started from."""
        return self.learner.config.inner_lr if self.default_lr is None else self.default_lr

    @property
    def version(self) -> str:
        digest = str(self.manifest.get("content_hash", "")).split(":")[-1]
        return digest[:12] or "unknown"

    def example_steps(self, examples: int, steps: int) -> int:
        """The work of adapting to ``examples`` support examples in ``steps`` inner steps, as
        ``METALEARN_MAX_EXAMPLE_STEPS`` counts it: examples x steps; the examples alone where the head adapts
        alone (ANIL: the body runs once per example, the steps on the head cost little beside it); with a
        ``support_shift``, each example's shifted views count as examples."""
        if self.support_shift:
            examples *= SHIFTED_VIEWS
        return examples if self.learner.head_only else examples * steps

    def session_problem(self, tensors: dict[str, torch.Tensor]) -> str | None:
        """Why ``tensors`` (a stored session's, ``service.engine.session_tensors``) cannot be an adaptation of
        this model, or None: they are each adapted parameter in its shape and each BatchNorm layer's (mean, var)
        of its channels, and nothing else, finite, in the model's dtype. A session read back from a shared
        store (Redis) whose record was written by something else could otherwise predict with the unadapted
        model (no tensors), or fail deep inside the engine."""
        layout = self.derived.get("session_layout")
        if layout is None:  # name -> the shape of a parameter, or the element count of a layer's statistics
            params = dict(self.learner.model.named_parameters())
            layout = {PARAM + name: tuple(params[name].shape) for name in self.adapted_names}
            for name, module in self.learner.model.named_modules():
                if isinstance(module, BatchNorm):
                    layout[MEAN + name] = layout[VAR + name] = module.num_features
            self.derived["session_layout"] = layout
        missing, unexpected = sorted(set(layout) - set(tensors)), sorted(set(tensors) - set(layout))
        wrong = sorted(name for name in set(layout) & set(tensors)
                       if (tuple(tensors[name].shape) if name.startswith(PARAM) else tensors[name].numel()) != layout[name])
        if not (missing or unexpected or wrong):
            dtype = next(iter(self.learner.model.parameters())).dtype
            other = sorted(name for name, t in tensors.items() if t.dtype != dtype)
            if other:
                return f"not {dtype}: {', '.join(other[:3])}"
            odd = sorted(name for name, t in tensors.items() if not bool(torch.isfinite(t).all()))
            return f"not finite: {', '.join(odd[:3])}" if odd else None
        return "; ".join(f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                         for what, names in (("missing", missing), ("unexpected", unexpected), ("of other sizes", wrong)) if names)

    def info(self) -> dict:
        manifest = self.manifest
        return {
            "name": self.name,
            "version": self.version,
            "algorithm": manifest.get("algorithm"),
            "loss": self.learner.config.loss,
            "task_type": self.task_type,
            "input_shape": list(self.input_shape),
            "n_way": self.n_way,
            "output_size": self.out_features,
            "inner_steps": self.inner_steps,
            "inner_lr": self.inner_lr,
            "learned_lrs": self.default_lr is None,
            "support_shift": self.support_shift,
            "adapted_parameters": list(self.adapted_names),
            "accepts_images": self.accepts_images,
            "preprocessing": manifest.get("preprocessing"),
            "metrics": manifest.get("metrics") or {},
            "training": _public_training(manifest.get("training") or {}),
            "model_spec": manifest.get("model_spec"),
            "library_version": manifest.get("library_version"),
            "device": self.device,
        }


def _public_training(training: dict) -> dict:
    """The manifest's training record without the trainer machine's paths (its run directory goes, a data
    path keeps its file name: what the model was trained on, not where it lay) or the data's class names
    (their count per split)."""
    config = training.get("config")
    if not isinstance(config, dict):
        return training
    config = {k: v for k, v in config.items() if k != "out"}
    task = config.get("task")
    if isinstance(task, str) and ("/" in task or "\\" in task):
        config["task"] = task.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    public = {**training, "config": config}
    data = training.get("data")
    if isinstance(data, dict) and isinstance(data.get("classes"), dict):  # the class names stay private: their counts
        public["data"] = {**data, "classes": {split: len(names) for split, names in data["classes"].items()}}
    return public


def load_model(name: str, path: Path, device: str) -> LoadedModel:
    checkpoint = load_checkpoint(path, device)
    checkpoint.learner.float()  # (the service computes in float32, as requests' tensors arrive: a float64 checkpoint too)
    manifest = checkpoint.manifest  # (its fields' types and ranges are checked by load_checkpoint)
    input_shape = tuple(manifest["input_shape"])
    task_type = manifest["task_type"]
    recorded = checkpoint.adaptation_settings()
    support_shift = recorded["support_shift"]
    try:
        check_support_shift(support_shift, input_shape)
    except ValueError as error:
        raise CheckpointError(f"{path}: bad support_shift: {error}") from None
    out_features = checkpoint.learner.outputs_width(torch.zeros((2, *input_shape), device=device))
    n_way = manifest.get("n_way")
    if task_type == "classification":
        n_way = int(n_way) if n_way else out_features
        if n_way < 2 or n_way > out_features:
            raise CheckpointError(f"{path}: n_way {n_way} does not fit the model's {out_features} outputs")
    else:
        n_way = None
    for p in checkpoint.learner.parameters():
        p.requires_grad_(False)
    return LoadedModel(
        name=name,
        checkpoint=checkpoint,
        device=device,
        input_shape=input_shape,
        task_type=task_type,
        n_way=n_way,
        out_features=out_features,
        inner_steps=recorded["steps"],
        default_lr=recorded["lr"],
        adapted_names=list(checkpoint.learner.adapt_names),
        support_shift=support_shift,
    )


def discover(model_dir: str | Path) -> list[tuple[str, Path]]:
    """``(name, checkpoint path)`` of every model in ``model_dir``, sorted by name."""
    root = Path(model_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir()):
        try:
            if entry.is_file() and entry.suffix == SUFFIX and not entry.name.startswith("."):
                found.append((entry.stem, entry))
            elif entry.is_dir() and (entry / BEST).is_file():
                found.append((entry.name, entry / BEST))
        except OSError as error:  # a directory this user may not enter (a volume's lost+found, a run of another user)
            if entry.name != "lost+found":
                log.warning("skipping %s: %s", entry, error.strerror or error)
    return found


def _file_identity(path: Path) -> tuple:
    """What tells a checkpoint file from its replacement: a rewrite in place changes its size or time, an
    atomic replacement (how ``metalearn train`` writes) its inode too."""
    st = path.stat()
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)


def scan(model_dir: str | Path) -> dict[str, tuple | None] | None:
    """Every checkpoint file of ``model_dir`` (``discover``) with its identity (``_file_identity``; None when
    it cannot be read), or None when there is no such directory."""
    if not Path(model_dir).is_dir():
        return None
    found: dict[str, tuple | None] = {}
    for _, path in discover(model_dir):
        try:
            found[str(path)] = _file_identity(path)
        except OSError:
            found[str(path)] = None
    return found


class ModelRegistry:
    def __init__(self, models: dict[str, LoadedModel] | None = None, errors: dict[str, str] | None = None, seen: dict | None = None):
        self.models = models or {}
        self.errors = errors or {}
        self.seen = seen or {}  # scan() of the model directory when it was loaded: every file, loaded or not

    def changed_on_disk(self, model_dir: str | Path) -> bool:
        """Whether ``model_dir`` has a checkpoint file added, removed or changed since this registry was
        loaded (one that failed to load counts once: until it changes again). A directory gone is no change."""
        now = scan(model_dir)
        return now is not None and now != self.seen

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu", previous: "ModelRegistry | None" = None) -> "ModelRegistry":
        """The models of ``model_dir``; with ``previous`` (the registry being served), a reload (module docstring)."""
        if previous is not None and not Path(model_dir).is_dir():
            # An unmounted volume, say: dropping every model would take the service down.
            log.error("model directory %s does not exist: still serving the models loaded before", model_dir)
            return previous
        if previous is not None and previous.models and not discover(model_dir):
            # An unmounted volume usually leaves an empty mount point: the same, for an empty directory. The
            # registry remembers the directory empty, so that the next look sees no change (and no new reload).
            log.error("model directory %s holds no checkpoint now: still serving the models loaded before (%s)", model_dir, ", ".join(previous.names()))
            return cls(previous.models, previous.errors, scan(model_dir))
        models: dict[str, LoadedModel] = {}
        errors: dict[str, str] = {}
        seen = scan(model_dir)  # before loading: a file changing meanwhile is seen as changed by the next look
        if seen is None:
            log.warning("model directory %s does not exist: serving no models", model_dir)
        else:
            for run in sorted(p.parent for p in Path(model_dir).glob("*/" + LAST) if not (p.parent / BEST).exists()):
                # Served once its best checkpoint appears (a reload sees it come).
                log.info("not serving run directory %s yet: it has no %s (its training has not validated yet, or stopped first)", run, BEST)
        for name, path in discover(model_dir):
            if name in models:
                log.warning("skipping %s: a model named %r is already loaded from %s", path, name, models[name].checkpoint.path)
                errors[str(path)] = f"duplicate model name {name!r}"
                continue
            served = previous.get(name) if previous is not None else None
            try:
                source = _file_identity(path)
                if served is not None and served.source == source:
                    models[name] = served
                    continue
                loaded = load_model(name, path, device)
                if served is not None and loaded.manifest.get("content_hash") == served.manifest.get("content_hash"):
                    served.source = source  # the same checkpoint written again (copied, touched): nothing to change
                    models[name] = served
                    continue
                loaded.source = source
                models[name] = loaded
                log.info("loaded model %r from %s (%s, %s)", name, path, loaded.manifest.get("algorithm"), device)
            except Exception as error:  # noqa: BLE001 - one bad checkpoint (or a registered model's forward that fails) is skipped, not fatal
                # Logged as text: a log record keeps its arguments, and the exception's traceback holds
                # this call's models (a handler keeping records, as pytest's does, kept replaced models alive).
                reason = str(error) if isinstance(error, (CheckpointError, OSError)) else f"{path}: {error.__class__.__name__}: {error}"
                if served is None:
                    log.error("skipping checkpoint %s: %s", path, reason)
                    errors[str(path)] = reason
                else:
                    log.error("keeping model %r version %s: its new checkpoint %s does not load: %s", name, served.version, path, reason)
                    errors[str(path)] = f"{reason} (still serving the version loaded before, {served.version})"
                    models[name] = served
        return cls(models, errors, seen)

    def changes_from(self, previous: "ModelRegistry") -> dict[str, list[str]]:
        """What a reload did: model names ``added``, ``updated`` (another object: a new version or file),
        ``removed`` and ``kept``."""
        before, after = previous.models, self.models
        return {
            "added": sorted(after.keys() - before.keys()),
            "updated": sorted(n for n in after.keys() & before.keys() if after[n] is not before[n]),
            "removed": sorted(before.keys() - after.keys()),
            "kept": sorted(n for n in after.keys() & before.keys() if after[n] is before[n]),
        }

    def get(self, name: str) -> LoadedModel | None:
        return self.models.get(name)

    def names(self) -> list[str]:
        return sorted(self.models)
