"""Self-describing checkpoints: one safetensors file, its manifest in the header.

A checkpoint file holds every meta-parameter of a :class:`MetaLearner` (the
model's initialisation, learned learning rates, the task encoder) as
safetensors tensors, and a JSON manifest in the safetensors metadata under
``"metalearn"``: format version, algorithm and its config, model spec, task
type, input shape, ``n_way``, the inner steps and learning rate to use at
test time, preprocessing, training config, validation metrics, library
version and a content hash. The service rebuilds the learner from the file
alone::

    save_checkpoint("runs/x/best.safetensors", learner, input_shape=(1, 28, 28), n_way=5)
    checkpoint = load_checkpoint("runs/x/best.safetensors")
    checkpoint.learner, checkpoint.manifest["inner"]["steps"]

Loading never unpickles (safetensors holds raw tensors; the manifest is JSON).
Writes are atomic: a temporary file in the same directory, fsync, rename.
Extra tensors and JSON (the trainer's optimiser and RNG state) can ride along
under ``state`` so a run resumes from the same file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

import metalearn
from metalearn.learner import MetaConfig, MetaLearner, as_recorded, check_integer, check_positive_number
from metalearn.models import build_model
from metalearn.names import TASK_TYPES

FORMAT_VERSION = 1
MANIFEST_KEY = "metalearn"
STATE_PREFIX = "state/"
SUFFIX = ".safetensors"
# A training run directory's checkpoints (``metalearn train --out``): the best by validation (the one served
# and evaluated), and the latest (resumed from; written from the first save, best only from the first validation)
BEST, LAST = "best" + SUFFIX, "last" + SUFFIX


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


@dataclass
class Checkpoint:
    path: Path
    manifest: dict
    learner: MetaLearner
    state_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem

    def adaptation_settings(self) -> dict:
        """:func:`adaptation_settings` of this checkpoint: ``adapt(checkpoint.learner, x, y,
        **checkpoint.adaptation_settings())`` adapts as ``metalearn eval`` and the service do."""
        return adaptation_settings(self.manifest, self.learner)


def adaptation_settings(manifest: dict, learner: MetaLearner) -> dict:
    """How a checkpoint's model adapts at test time (``metalearn eval``, the service) unless asked otherwise:
    ``{"steps", "lr", "support_shift"}`` for :func:`metalearn.adapt`, from the manifest's ``inner`` record.
    ``lr`` is None, the model's meta-learned rates, for a model that learned them (Meta-SGD, MAML++) unless a
    test-time rate was chosen for it (``eval_inner_lr``, ``save_checkpoint``'s ``inner_lr``), which replaces them."""
    inner = manifest.get("inner") or {}
    lr = float(inner.get("lr", learner.config.inner_lr))
    if learner.learned_lrs:
        chosen = inner.get("lr_chosen")
        if chosen is None:  # (recorded before lr_chosen was: a training run's eval_inner_lr says)
            chosen = ((manifest.get("training") or {}).get("config") or {}).get("eval_inner_lr") is not None
        lr = lr if chosen else None
    return {"steps": int(inner.get("steps", learner.config.inner_steps)), "lr": lr,
            "support_shift": int(inner.get("support_shift", 0))}


def json_ready(value: Any) -> Any:
    """``value`` with each non-finite float (a diverged evaluation's NaN, an infinity) as None: JSON has no NaN,
    and ``json.dumps`` would write one that strict parsers refuse."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def content_hash(tensors: dict[str, torch.Tensor], manifest: dict) -> str:
    """sha256 over the manifest (without its hash) and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    body = {k: v for k, v in manifest.items() if k != "content_hash"}
    digest.update(json.dumps(body, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return "sha256:" + digest.hexdigest()


def _umask() -> int:
    """The process's umask, read without setting it (os.umask sets it, for every thread, while it asks)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` so that ``path`` is either the old file or the whole new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; a checkpoint is read by others (a service running as another user,
        # a container's): the permissions open() would give it.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:  # a full disk, a quota: said with the file (its old version is intact)
        Path(tmp).unlink(missing_ok=True)
        raise OSError(error.errno, f"cannot write {path} ({error.strerror or error}); the file as it was is kept") from error
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def build_manifest(
    learner: MetaLearner,
    *,
    input_shape: tuple[int, ...] | list[int],
    n_way: int | None = None,
    preprocessing: dict | None = None,
    training: dict | None = None,
    metrics: dict | None = None,
    inner_steps: int | None = None,
    inner_lr: float | None = None,
    support_shift: int = 0,
) -> dict:
    spec = getattr(learner.model, "spec", None)
    if spec is None:
        raise CheckpointError(f"the model ({type(learner.model).__qualname__}) has no 'spec': a model class of your own "
                              "is checkpointed once registered (metalearn.register_architecture)")
    for name, value in spec.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"the model's spec is not JSON: argument {name!r} = {value!r} ({error}). A checkpoint "
                                  "rebuilds the model from its spec, so a registered class's constructor arguments must "
                                  "be numbers, strings, booleans, None, lists or dicts (float(x) for a numpy number)") from None
    config = learner.config
    return {
        "format_version": FORMAT_VERSION,
        "library_version": metalearn.__version__,
        "algorithm": config.algorithm,
        "meta_config": config.to_dict(),
        "model_spec": spec,
        "task_type": config.task_type,
        "input_shape": list(input_shape),
        "n_way": n_way,
        "inner": {
            "steps": int(inner_steps if inner_steps is not None else config.inner_steps),
            "lr": float(inner_lr if inner_lr is not None else config.inner_lr),
            # Whether that lr was chosen for test time: a model that learned its own rates adapts with it only then.
            "lr_chosen": inner_lr is not None,
            "support_shift": int(support_shift),  # test-time support augmentation (adapt(..., support_shift))
        },
        "preprocessing": preprocessing,
        "training": training or {},
        "metrics": metrics or {},
    }


def _check_fits(learner: MetaLearner, input_shape: tuple[int, ...], n_way: int | None) -> int:
    """The manifest's ``input_shape`` and ``n_way`` against the model, run once on two zero inputs of that shape
    (as the service does when it loads the checkpoint; integer zeros for a model that takes token ids), on
    copies of its buffers: a contradiction is said here, not by ``metalearn eval`` or the service later, in
    other words. Returns the model's outputs per example."""
    param = next(learner.model.parameters(), None)
    device, dtype = (None, None) if param is None else (param.device, param.dtype)
    try:
        outputs = learner.probe(torch.zeros((2, *input_shape), device=device, dtype=dtype))
    except Exception as error:  # noqa: BLE001 - the model's own code: any failure, said with what it was given
        try:
            outputs = learner.probe(torch.zeros((2, *input_shape), device=device, dtype=torch.long))
        except Exception:  # noqa: BLE001 - (nor token ids: the first failure is the one to say)
            raise CheckpointError(f"input_shape {list(input_shape)} does not fit the model: it fails on a batch of 2 such "
                                  f"inputs ({type(error).__name__}: {error})") from error
    if not isinstance(outputs, torch.Tensor) or outputs.dim() != 2 or outputs.shape[0] != 2:
        got = list(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
        raise CheckpointError(f"the model gives {got} for a batch of 2 inputs of input_shape {list(input_shape)}; "
                              "metalearn needs [2, outputs]: is input_shape the shape of one input?")
    width = outputs.shape[-1]
    if learner.config.task_type == "classification" and n_way is not None and not 2 <= n_way <= width:
        raise CheckpointError(f"n_way {n_way} does not fit the model's {width} outputs (2 to {width})")
    return width


def save_checkpoint(
    path: str | os.PathLike,
    learner: MetaLearner,
    *,
    state_tensors: dict[str, torch.Tensor] | None = None,
    **manifest_fields: Any,
) -> dict:
    """Write ``learner`` (and optional resume ``state_tensors``) to ``path`` atomically; returns the manifest.

    ``manifest_fields`` are those of :func:`build_manifest` (``input_shape``
    required) plus ``state`` (JSON-able resume state, e.g. iteration).
    """
    state = manifest_fields.pop("state", None)
    if "input_shape" not in manifest_fields:
        raise CheckpointError("save_checkpoint needs input_shape=...: the shape of one input, without the batch "
                              "dimension (e.g. (1, 28, 28)); metalearn eval and the service check inputs against it")
    manifest = build_manifest(learner, **manifest_fields)
    outputs = _check_fits(learner, tuple(manifest_fields["input_shape"]), manifest_fields.get("n_way"))
    if learner.config.task_type == "classification" and manifest["n_way"] is None:
        manifest["n_way"] = outputs  # (what the service takes a classifier's n_way to be, said in the manifest)
    if state is not None:
        manifest["state"] = state
    manifest = json_ready(manifest)
    tensors, stored = {}, set()
    for name, tensor in [*learner.state_dict().items(), *((STATE_PREFIX + n, t) for n, t in (state_tensors or {}).items())]:
        tensor = tensor.detach().cpu().contiguous()
        if tensor.numel() and tensor.untyped_storage().data_ptr() in stored:
            # Tied weights (one Parameter under two names): safetensors refuses shared memory, so the second
            # name gets a copy; loading copies both into the one Parameter the constructor ties again.
            tensor = tensor.clone()
        stored.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    manifest["content_hash"] = content_hash(tensors, manifest)
    data = save_bytes(tensors, metadata={MANIFEST_KEY: json.dumps(manifest, sort_keys=True, allow_nan=False)})
    atomic_write_bytes(path, data)
    return manifest


def _parse_header(path: Path, raw: bytes) -> dict:
    if len(raw) < 8:
        raise CheckpointError(f"{path}: file is truncated ({len(raw)} bytes), not a checkpoint")
    header_size = int.from_bytes(raw[:8], "little")
    if header_size <= 0 or 8 + header_size > len(raw):
        # (the size itself is not repeated: for a file that is no checkpoint it is its first 8 bytes)
        raise CheckpointError(f"{path}: not a safetensors checkpoint, or truncated (its header's size is past the file's end)")
    try:
        header = json.loads(raw[8 : 8 + header_size])
        manifest = json.loads(header["__metadata__"][MANIFEST_KEY])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{path}: no metalearn manifest in the safetensors header") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: the manifest is not a JSON object")
    return manifest


def _check_manifest(manifest: dict) -> None:
    """Raise ``ValueError`` naming the first field of a manifest that training, evaluation and the service read
    whose type or range is wrong. Checkpoints this library writes always pass; a hand-edited one (its hash
    recomputed) may not."""
    for key in ("meta_config", "model_spec"):
        if not isinstance(manifest.get(key), dict):
            raise ValueError(f"{key} must be a JSON object, got {manifest.get(key)!r}")
    if manifest.get("task_type") not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {', '.join(TASK_TYPES)}, got {manifest.get('task_type')!r}")
    shape = manifest.get("input_shape")
    if not isinstance(shape, list) or not shape or min(check_integer("input_shape", s) for s in shape) < 1:
        raise ValueError(f"input_shape must be a non-empty list of positive integers, got {shape!r}")
    if manifest.get("n_way") is not None and check_integer("n_way", manifest["n_way"]) < 1:
        raise ValueError(f"n_way must be a positive integer or null, got {manifest['n_way']!r}")
    for key in ("inner", "training", "metrics", "state", "preprocessing"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise ValueError(f"{key} must be a JSON object{' or null' if key == 'preprocessing' else ''}, got {manifest[key]!r}")
    inner = manifest.get("inner") or {}
    for key in ("steps", "support_shift"):
        if key in inner and check_integer(f"inner.{key}", inner[key]) < 0:
            raise ValueError(f"inner.{key} must be an integer >= 0, got {inner[key]!r}")
    if "lr" in inner:
        check_positive_number("inner.lr", inner["lr"])
    if not isinstance(inner.get("lr_chosen", False), bool):
        raise ValueError(f"inner.lr_chosen must be true or false, got {inner['lr_chosen']!r}")
    for key in ("config", "data"):
        value = (manifest.get("training") or {}).get(key)
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"training.{key} must be a JSON object, got {value!r}")


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a checkpoint, checked for format and hash (the weights are read but not built)."""
    return _read(Path(path))[0]


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():  # (a FIFO would hang the read, a device never end it)
        raise CheckpointError(f"{path}: not a regular file, so not a checkpoint")
    raw = path.read_bytes()
    manifest = _parse_header(path, raw)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not supported by metalearn "
            f"{metalearn.__version__} (expected {FORMAT_VERSION})"
        )
    try:
        tensors = load_bytes(raw)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: corrupt or truncated tensor data ({error})") from None
    expected = manifest.get("content_hash")
    if expected != content_hash(tensors, manifest):
        raise CheckpointError(f"{path}: content hash mismatch, the file is corrupt or was modified")
    try:
        _check_manifest(manifest)
    except ValueError as error:
        raise CheckpointError(f"{path}: incompatible manifest ({error})") from None
    return manifest, tensors


def _build(path: Path, manifest: dict) -> MetaLearner:
    try:
        config = MetaConfig(**as_recorded(manifest["meta_config"]))
        return MetaLearner(build_model(manifest["model_spec"]), config)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: incompatible manifest ({error})") from None
    except Exception as error:  # noqa: BLE001 - a registered architecture's constructor is the user's code
        raise CheckpointError(f"{path}: building its model failed ({error.__class__.__name__}: {error})") from None


def _check_weights(path: Path, weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    if set(weights) != set(expected) or any(weights[n].shape != expected[n].shape for n in expected):
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(set(weights) - set(expected))
        reshaped = sorted(n for n in set(weights) & set(expected) if weights[n].shape != expected[n].shape)
        raise CheckpointError(
            f"{path}: weights do not match the model the manifest describes "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}, of other shapes {reshaped[:5]})"
        )


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the learner a checkpoint describes, with its weights, on ``device``."""
    path = Path(path)
    manifest, tensors = _read(path)
    weights = {n: t for n, t in tensors.items() if not n.startswith(STATE_PREFIX)}
    state = {n[len(STATE_PREFIX) :]: t for n, t in tensors.items() if n.startswith(STATE_PREFIX)}
    # The manifest's model is first built on the meta device (shapes, no memory) and compared with the
    # file's weights: a manifest that names a model far larger than its weights (a few bytes asking
    # for hidden layers of 10^5 units) is refused before anything is allocated.
    try:
        with torch.device("meta"):
            shapes = _build(path, manifest).state_dict()
    except Exception:  # noqa: BLE001 - a bad manifest is reported by the real build below; a registered
        shapes = None  # constructor that cannot run on the meta device is compared once built
    if shapes is not None:
        _check_weights(path, weights, shapes)
    learner = _build(path, manifest)
    if shapes is None:
        _check_weights(path, weights, learner.state_dict())
    # The weights' own precision (a float64 model stays float64; the model is built in float32).
    dtypes = {t.dtype for t in weights.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        learner.to(dtype=dtypes.pop())
    learner.load_state_dict(weights)
    learner.to(device)
    learner.eval()
    return Checkpoint(path=path, manifest=manifest, learner=learner, state_tensors=state)
