"""Loading task sources: :func:`load_task_source` and the loaders behind it.

::

    load_task_source("sinusoid", shots=10, queries=10)
    load_task_source("omniglot", rotations=True, split_by="group", val_fraction=0.2)
    load_task_source("my_glyphs.zip")          # Omniglot-style or <class>/*.png zip
    load_task_source("photos/")                # folder of <class_name>/*.png|jpg
    load_task_source("features.npz")           # arrays x [N, ...] and y [N] (int)

Image folders and zips are recognised by depth (after dropping one top-level
folder shared by every file, as most zips have):

- ``<group>/<class>/<file>`` or deeper (e.g. ``images_background/Greek/
  character01/0394_01.png``): *grouped* -- the group is the folder two levels
  above the file, the class the folder just above it;
- ``<class>/<file>``: *flat* -- every class is in the single group ``"all"``.

Pass ``layout="grouped"`` or ``"flat"`` to override. Several folders/zips may be
merged (``load_image_archives([a, b])``); classes are identified by
``(group, class)`` name and images by ``(group, class, file name)``, so the
Greek and Latin alphabets that appear in both bundled Omniglot zips are loaded
once. Decoding is ~0.25 ms per PNG, so nothing is cached on disk.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import sys
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Union

import numpy as np
import torch

from .images import ImageTaskConfig, ImageTasks
from .preprocess import OMNIGLOT_PREPROCESSING, image_preprocessing, preprocess_images, undecodable
from .sinusoid import SinusoidConfig, SinusoidTasks

PathLike = Union[str, os.PathLike]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
OMNIGLOT_ZIPS = ("images_background_small1.zip", "images_background_small2.zip")
FLAT_GROUP = "all"

_IMAGE_LOADER_OPTIONS = {"image_size", "invert", "resample", "grayscale", "layout", "progress", "skip_undecodable"}
_TASK_CONFIG_OPTIONS = {f.name for f in dataclasses.fields(ImageTaskConfig)}


# -- entry point --------------------------------------------------------------------------


def load_task_source(task: PathLike | Sequence[PathLike], **options: Any) -> SinusoidTasks | ImageTasks:
    """Build a task source from a name or a path.

    ``task``: ``"sinusoid"``, ``"omniglot"`` (the two bundled minimal zips), a
    folder, a ``.zip``, a ``.npz``, or a list of folders/zips to merge.

    ``options``:

    - sinusoid: fields of :class:`SinusoidConfig` (``shots``, ``queries``,
      ``amplitude_range``, ...); ``ways`` is accepted and ignored.
    - images/npz: fields of :class:`ImageTaskConfig` (``ways``, ``shots``,
      ``queries``, ``rotations``, ``rotate_heldout``, ``max_shift``, ``split_by``,
      ``val_fraction``, ``test_fraction``, ``split_seed``); for folders/zips
      (and omniglot) also ``image_size`` (28), ``invert`` (True), ``resample``
      ("lanczos"), ``grayscale`` (True; False keeps colour, RGB), ``progress``
      (False; a progress bar on stderr while the pictures are read),
      ``skip_undecodable`` (False: a file that does not decode is an error; True:
      it is left out, with a warning naming it), and for folders/zips
      ``layout`` ("auto"|"grouped"|"flat").

    If ``ways``/``shots``/``queries`` are given, the source is checked right
    away to have enough classes and examples for them (``ValueError`` otherwise).

    The result has ``.task_type``, ``.input_shape``, ``.preprocessing``,
    ``.split(name)`` and ``.sample(meta_batch, generator, ways=, shots=, queries=)``.
    """
    if isinstance(task, str) and task == "sinusoid":
        options.pop("ways", None)
        _check_options("sinusoid", options, {f.name for f in dataclasses.fields(SinusoidConfig)})
        return SinusoidTasks(config=SinusoidConfig(**options))

    loader_opts = {k: options.pop(k) for k in list(options) if k in _IMAGE_LOADER_OPTIONS}
    _check_options(str(task), options, _TASK_CONFIG_OPTIONS)
    config = ImageTaskConfig(**options)

    if isinstance(task, str) and task == "omniglot":
        _check_options("omniglot", loader_opts, _IMAGE_LOADER_OPTIONS - {"layout"})
        source = load_omniglot(config, **loader_opts)
    elif isinstance(task, (str, os.PathLike)) and Path(task).suffix.lower() == ".npz":
        _check_options(str(task), loader_opts, set())
        source = load_npz(task, config)
    elif isinstance(task, (str, os.PathLike)):
        path = Path(task)
        if not path.exists():
            raise ValueError(
                f"unknown task {str(task)!r}: not 'sinusoid' or 'omniglot', and no such file or folder"
            )
        if not (path.is_dir() or path.suffix.lower() == ".zip"):
            raise ValueError(f"{path}: expected a folder, a .zip or a .npz file")
        source = load_image_archives([path], config, **loader_opts)
    else:
        source = load_image_archives(list(task), config, **loader_opts)

    if {"ways", "shots", "queries"} & options.keys():
        c = source.config
        source._check_enough(c.ways, c.shots + c.queries, within_group=False)
    return source


def _check_options(what: str, given: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for {what}; allowed: {sorted(allowed)}")


# -- images from folders and zips --------------------------------------------------------


def load_omniglot(config: ImageTaskConfig | None = None, **preprocess_options: Any) -> ImageTasks:
    """The two bundled Omniglot "minimal" background zips: 8 alphabets, 242 characters.

    ``preprocess_options``: ``image_size``, ``invert``, ``resample`` (default:
    28x28, inverted, LANCZOS, i.e. :data:`OMNIGLOT_PREPROCESSING`).
    """
    folder = importlib.resources.files(__package__).joinpath("omniglot")
    zips = [folder.joinpath(name) for name in OMNIGLOT_ZIPS]
    return load_image_archives(zips, config, layout="grouped", name="omniglot", **preprocess_options)


def load_image_archives(
    paths: Sequence[Any],
    config: ImageTaskConfig | None = None,
    *,
    image_size: int | Sequence[int] = 28,
    invert: bool = True,
    resample: str = OMNIGLOT_PREPROCESSING["resample"],
    grayscale: bool = True,
    layout: str = "auto",
    progress: bool = False,
    skip_undecodable: bool = False,
    name: str | None = None,
) -> ImageTasks:
    """Load and merge image folders and/or zips into one :class:`ImageTasks`.

    ``paths``: folders, ``.zip`` paths, or ``importlib.resources`` files of zips.
    Images go through :func:`preprocess_images` with the resulting
    ``source.preprocessing`` -- the very function an inference service uses.
    """
    if layout not in ("auto", "grouped", "flat"):
        raise ValueError(f"layout must be 'auto', 'grouped' or 'flat', got {layout!r}")
    if not paths:
        raise ValueError("no folders or zips given")
    prep = image_preprocessing(image_size, invert=invert, resample=resample, grayscale=grayscale)
    name = name or ", ".join(str(p) for p in paths)

    # (group, class, file name) -> (label for errors, zero-arg reader of the bytes)
    found: dict[tuple[str, str, str], tuple[str, Any]] = {}
    for path in paths:
        entries = list(_list_images(path))
        if not entries:
            raise ValueError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
        for key, label, read in _classify(entries, layout, str(path)):
            found.setdefault(key, (label, read))  # first copy wins (duplicates are identical files)

    keys = sorted(found)
    # Each file read when its turn comes: holding every file's bytes first cost their whole size in memory.
    bar = None
    if progress:  # decoding is about 2 ms a small picture, 70 ms a photo: many photos take minutes
        from tqdm import tqdm

        bar = tqdm(total=len(keys), desc="reading pictures", unit="picture", file=sys.stderr, dynamic_ncols=True, leave=False)
    failed: list[tuple[int, str]] | None = [] if skip_undecodable else None
    try:
        images = preprocess_images(_Reading([found[k][1] for k in keys], bar), prep, names=[found[k][0] for k in keys], failed=failed)
    finally:
        if bar is not None:
            bar.close()
    if failed:
        warnings.warn(f"{name}: skipped {len(failed)} picture(s) that do not decode: {undecodable(failed)}", stacklevel=2)
        bad = {i for i, _ in failed}
        kept = [i for i in range(len(keys)) if i not in bad]
        keys, images = [keys[i] for i in kept], images[kept]
        if not keys:
            raise ValueError(f"{name}: no picture decodes")
    class_keys = sorted({(g, c) for g, c, _ in keys})
    class_index = {k: i for i, k in enumerate(class_keys)}
    labels = torch.tensor([class_index[(g, c)] for g, c, _ in keys], dtype=torch.long)
    return ImageTasks(
        images,
        labels,
        class_groups=[g for g, _ in class_keys],
        class_names=[c if g == FLAT_GROUP else f"{g}/{c}" for g, c in class_keys],
        preprocessing=prep,
        config=config,
        name=name,
    )


class _Reading(Sequence):
    """A sequence of files' bytes, each read when it is indexed (ticking ``bar``, a progress bar, if any)."""

    def __init__(self, readers: list, bar=None) -> None:
        self.readers = readers
        self.bar = bar

    def __len__(self) -> int:
        return len(self.readers)

    def __getitem__(self, i: int) -> bytes:
        if self.bar is not None:
            self.bar.update(1)
        return self.readers[i]()


def _list_images(path: Any) -> Iterable[tuple[tuple[str, ...], str, Any]]:
    """Yield ``(relative path parts, label, reader)`` for every image under ``path``."""

    def wanted(parts: tuple[str, ...]) -> bool:
        # Skip macOS resource forks (__MACOSX/, ._foo.png) and other hidden files.
        return (
            PurePosixPath(parts[-1]).suffix.lower() in IMAGE_SUFFIXES
            and not any(p.startswith(".") or p == "__MACOSX" for p in parts)
        )

    if isinstance(path, (str, os.PathLike)) and Path(path).is_dir():
        root = Path(path)
        for file in sorted(root.rglob("*")):
            parts = file.relative_to(root).parts
            if file.is_file() and wanted(parts):
                yield parts, str(file), file.read_bytes
        return

    try:
        archive = zipfile.ZipFile(path if isinstance(path, (str, os.PathLike)) else path.open("rb"))
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path}: not a readable folder or zip file ({e})") from e
    for info in archive.infolist():
        parts = tuple(p for p in info.filename.replace("\\", "/").split("/") if p)  # (Windows' zips may use backslashes)
        if not info.is_dir() and parts and wanted(parts):
            yield parts, f"{path}:{info.filename}", (lambda n=info.filename: archive.read(n))


def _classify(entries, layout: str, where: str):
    """Turn relative paths into ``((group, class, file), label, reader)``."""
    # Drop one top-level folder shared by all files (the usual zip wrapper),
    # unless that would leave files without the class (or, for layout="grouped",
    # group) folder they need.
    tops = {parts[0] for parts, _, _ in entries}
    needed = 3 if layout == "grouped" else 2
    if len(tops) == 1 and min(len(p) for p, _, _ in entries) > needed:
        entries = [(parts[1:], label, read) for parts, label, read in entries]
    depths = {len(parts) for parts, _, _ in entries}
    if len(depths) > 1:
        examples = {len(p): label for p, label, _ in entries}
        raise ValueError(
            f"{where}: image files at different folder depths, e.g. "
            + "; ".join(examples[d] for d in sorted(examples))
            + " (expected <group>/<class>/<file> or <class>/<file> throughout)"
        )
    depth = depths.pop()
    if depth < 2:
        raise ValueError(f"{where}: images must be inside class folders (<class>/<file>), found {entries[0][1]}")
    grouped = depth >= 3 if layout == "auto" else layout == "grouped"
    if grouped and depth < 3:
        raise ValueError(f"{where}: layout='grouped' needs <group>/<class>/<file>, found {entries[0][1]}")
    for parts, label, read in entries:
        if grouped:
            key = (parts[-3], parts[-2], parts[-1])
        else:
            key = (FLAT_GROUP, "/".join(parts[:-1]), parts[-1])
        yield key, label, read


# -- arrays from .npz ---------------------------------------------------------------------


def load_npz(path: PathLike, config: ImageTaskConfig | None = None) -> ImageTasks:
    """Classification tasks from a ``.npz`` with arrays ``x [N, ...]`` and ``y [N]`` (class labels).

    Labels can be any integers or strings (they are mapped to 0..C-1 in sorted order;
    class names are the original labels as strings). Images are ``[N, C, H, W]``
    (channels first). All classes are in one
    group, so use ``split_by="character"`` (the default). ``uint8`` inputs
    are scaled by 1/255 when sampled; other numeric inputs are used as float32.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: cannot read as a .npz of plain arrays ({e})") from e

    for key in ("x", "y"):
        if key not in arrays:
            raise ValueError(f"{path}: missing array {key!r} (found: {', '.join(sorted(arrays)) or 'none'})")
    x, y = arrays["x"], arrays["y"]
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{path}: 'y' must be 1-D labels [N], got shape {y.shape}")
    if x.ndim == 0 or len(x) != len(y):
        raise ValueError(f"{path}: 'x' has {len(x) if x.ndim else 0} examples but 'y' has {len(y)}")
    if len(y) == 0:
        raise ValueError(f"{path}: no examples")
    if y.dtype.kind == "f" and np.isfinite(y).all() and np.array_equal(y, np.round(y)):
        y = y.astype(np.int64)  # class numbers saved as floats
    if y.dtype.kind not in "iuUS":
        regression = " (regression from your own data is not supported: the sinusoid task is the regression one)" if y.dtype.kind == "f" else ""
        raise ValueError(f"{path}: 'y' must hold class labels (integers or strings), got dtype {y.dtype}{regression}")
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{path}: 'x' must be numeric, got dtype {x.dtype}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        raise ValueError(f"{path}: 'x' contains NaN or infinite values in {int(bad.sum())} example(s), the first at index {int(np.argmax(bad))}")

    classes, labels = np.unique(y, return_inverse=True)
    if x.ndim == 1:
        x = x[:, None]  # scalar inputs become one feature
    if x.dtype == np.uint8:
        images = torch.from_numpy(np.ascontiguousarray(x))
        prep = {"kind": "array", "dtype": "uint8", "scale": "divide_255"}
    else:
        images = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        prep = {"kind": "array", "dtype": str(x.dtype), "scale": "none"}
    return ImageTasks(
        images,
        torch.from_numpy(labels.astype(np.int64).reshape(-1)),
        class_groups=[FLAT_GROUP] * len(classes),
        class_names=[str(c) for c in classes.tolist()],
        preprocessing=prep,
        config=config,
        name=str(path),
    )
