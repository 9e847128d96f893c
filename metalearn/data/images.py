"""N-way K-shot classification tasks from an in-memory image set.

:class:`ImageTasks` holds every image of a data set in one tensor and samples
meta-batches with a handful of vectorised tensor ops (no per-task Python loop),
so sampling never starves a training loop. It knows each class's *group*
(Omniglot: its alphabet), which drives two things:

- the train/val/test class split (``split_by="character"`` holds out a fraction
  of the characters of every alphabet, ``split_by="group"`` whole alphabets);
- ``within_group=True`` sampling: all classes of a task from one alphabet, the
  Lake et al. (2015) evaluation protocol.

Example::

    src = ImageTasks(images, labels, class_groups, class_names,
                     config=ImageTaskConfig(ways=5, shots=1, queries=15, rotations=True))
    train = src.split("train")
    batch = train.sample(32, torch.Generator().manual_seed(0))
    batch.support_x.shape   # [32, 5, 1, 28, 28]
    batch.support_y[0]      # tensor([0, 1, 2, 3, 4]) -- class-major, one per shot

Loading from Omniglot, a folder, a zip or an ``.npz``: see
:mod:`metalearn.data.sources`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .tasks import TaskBatch, check_split_name

SPLIT_BY = ("character", "class", "group")  # "class" is an alias of "character"


@dataclass(frozen=True)
class ImageTaskConfig:
    """Default task shape, augmentation and class-split settings.

    - ``ways``/``shots``/``queries``: defaults for :meth:`ImageTasks.sample`.
    - ``rotations``: add each character rotated by 90/180/270 degrees as three
      NEW classes (MAML paper), i.e. 4x the classes. Applies to the train split
      and the unsplit source; to val/test only if ``rotate_heldout``.
    - ``split_by``: ``"character"`` (a fraction of the characters of every
      group is held out) or ``"group"`` (whole groups/alphabets are held out).
    - ``val_fraction``/``test_fraction``: share of characters (or of groups)
      held out; the rest is ``train``. ``split_seed`` makes it reproducible.
    """

    ways: int = 5
    shots: int = 1
    queries: int = 15
    rotations: bool = False
    rotate_heldout: bool = True
    max_shift: int = 0
    split_by: str = "character"
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    split_seed: int = 0

    def __post_init__(self) -> None:
        if self.split_by not in SPLIT_BY:
            raise ValueError(f"split_by must be one of {SPLIT_BY}, got {self.split_by!r}")
        for name in ("val_fraction", "test_fraction"):
            f = getattr(self, name)
            if not 0.0 <= f < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {f}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1 to leave training classes, "
                f"got {self.val_fraction} + {self.test_fraction}"
            )
        _check_task_shape(self.ways, self.shots, self.queries)
        if self.max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {self.max_shift}")


def _check_task_shape(ways: int, shots: int, queries: int) -> None:
    if ways < 1 or shots < 1 or queries < 0:
        raise ValueError(f"need ways >= 1, shots >= 1, queries >= 0; got ways={ways}, shots={shots}, queries={queries}")


def _round_half_up(x: float) -> int:
    # Python's round() is banker's rounding (round(2.5) == 2); half-up is less surprising here.
    return int(math.floor(x + 0.5))


@dataclass
class _Store:
    """The shared, immutable image data behind every split/view of a source."""

    images: Tensor  # [N, *input_shape], sorted by class; uint8 (scaled /255 on sampling) or float32
    offsets: Tensor  # [C] int64: first image of each base class
    counts: Tensor  # [C] int64: images per base class
    class_names: list[str]  # [C]
    group_names: list[str]  # [G] sorted
    class_group: Tensor  # [C] int64 index into group_names
    # [4 * N, *input_shape]: images rotated by 0/90/180/270 degrees, built when
    # the first rotating view is made. 4x memory, but sampling stays a single
    # gather (masked per-rotation rot90 calls made sampling ~3x slower).
    rotated: Tensor | None = None

    def rotated_images(self) -> Tensor:
        if self.rotated is None:
            self.rotated = torch.cat([torch.rot90(self.images, r, dims=(-2, -1)) for r in range(4)]).contiguous()
        return self.rotated


class ImageTasks:
    """N-way K-shot classification task source (``task_type == "classification"``).

    Build it from tensors (or use :func:`metalearn.data.load_task_source`):

    - ``images``: ``[num_images, *input_shape]`` (e.g. ``[N, 1, 28, 28]``),
      float32 used as is, or uint8 scaled by 1/255 when sampled;
    - ``labels``: ``[num_images]`` integer class index in ``0..C-1``;
    - ``class_groups``: ``C`` group names (Omniglot: alphabet of each class);
    - ``class_names``: ``C`` class names (default ``"class<i>"``);
    - ``preprocessing``: the JSON-able dict describing how ``images`` were made
      (see :mod:`metalearn.data.preprocess`), or None.

    The object is a read-only *view*: ``split(name)`` returns another view on
    the same tensors, restricted to that split's classes (rotations expanded).
    """

    task_type = "classification"

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        class_groups: Sequence[str],
        class_names: Sequence[str] | None = None,
        *,
        preprocessing: dict[str, Any] | None = None,
        config: ImageTaskConfig | None = None,
        name: str = "images",
    ):
        config = config or ImageTaskConfig()
        labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
            raise ValueError(
                f"{name}: labels must be a 1-D integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{name}: {images.shape[0]} images but {labels.shape[0]} labels")
        num_classes = len(class_groups)
        class_names = list(class_names) if class_names is not None else [f"class{i}" for i in range(num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(f"{name}: {len(class_names)} class names but {num_classes} class groups")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{name}: labels must be in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
        if images.dtype != torch.uint8 and not images.dtype.is_floating_point:
            raise ValueError(f"{name}: images must be uint8 or floating point, got {images.dtype}")
        if images.dtype.is_floating_point and images.dtype != torch.float32:
            images = images.float()

        # Store images class-contiguously so a class is just (offset, count):
        # sampling then needs only index arithmetic and one gather.
        labels = labels.long()
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=num_classes)
        offsets = torch.cumsum(counts, 0) - counts
        group_names = sorted(set(class_groups))
        group_index = {g: i for i, g in enumerate(group_names)}
        class_group = torch.tensor([group_index[g] for g in class_groups], dtype=torch.long)

        store = _Store(
            images=images[order].contiguous(),
            offsets=offsets,
            counts=counts,
            class_names=class_names,
            group_names=group_names,
            class_group=class_group,
        )
        self._init_view(store, config, _split_classes(store, config), preprocessing, name, "all")

    # -- views -------------------------------------------------------------------------

    def _init_view(
        self,
        store: _Store,
        config: ImageTaskConfig,
        splits: dict[str, Tensor],
        preprocessing: dict[str, Any] | None,
        name: str,
        split: str,
    ) -> None:
        self._store = store
        self._splits = splits  # "train"/"val"/"test"/"all" -> sorted base-class ids
        self.config = config
        self.preprocessing = preprocessing
        self.name = name
        self.split_name = split
        self.input_shape: tuple[int, ...] = tuple(store.images.shape[1:])
        base = splits[split]
        rotate = config.rotations and (split in ("train", "all") or config.rotate_heldout)
        self._rotates = rotate
        self._shift = config.max_shift if split == "train" else 0  # augmentation: training tasks only
        if rotate:
            _check_rotatable(self.input_shape, name)
            store.rotated_images()  # build now, not inside the first training step
            # Split on base characters first, then expand: the rotated copies of
            # a character can never leak into a different split.
            self._base = base.repeat_interleave(4)
            self._rot = torch.arange(4).repeat(len(base))
        else:
            self._base = base
            self._rot = torch.zeros_like(base)
        self._group = store.class_group[self._base]  # group of each view class

    def split(self, name: str) -> ImageTasks:
        """This source restricted to split ``"train"``, ``"val"``, ``"test"`` or ``"all"``."""
        check_split_name(name)
        if name != "all" and len(self._splits[name]) == 0:
            raise ValueError(
                f"{self.name}: split {name!r} is empty (val_fraction={self.config.val_fraction}, "
                f"test_fraction={self.config.test_fraction}, split_by={self.config.split_by!r})"
            )
        view = object.__new__(ImageTasks)
        view._init_view(self._store, self.config, self._splits, self.preprocessing, self.name, name)
        return view

    def with_classes(self, names: Sequence[str], split: str) -> ImageTasks:
        """This source's ``split`` made of the base classes ``names`` (those it has, in any split): the split
        a checkpoint recorded, when classes were added to the data since (its split would move)."""
        check_split_name(split)
        index = {name: i for i, name in enumerate(self._store.class_names)}
        ids = torch.tensor(sorted(index[n] for n in set(names) if n in index), dtype=torch.long)
        view = object.__new__(ImageTasks)
        view._init_view(self._store, self.config, {**self._splits, split: ids}, self.preprocessing, self.name, split)
        return view

    def with_config(self, **changes: Any) -> ImageTasks:
        """The same images with other :class:`ImageTaskConfig` settings (no reloading).

        E.g. ``src.with_config(ways=20, shots=5)`` or
        ``src.with_config(split_by="group", split_seed=3).split("val")``.
        The result covers the same split as ``self``; changing split settings
        recomputes the class split.
        """
        config = replace(self.config, **changes)
        split_keys = {"split_by", "val_fraction", "test_fraction", "split_seed"}
        splits = _split_classes(self._store, config) if split_keys & changes.keys() else self._splits
        view = object.__new__(ImageTasks)
        view._init_view(self._store, config, splits, self.preprocessing, self.name, self.split_name)
        if self.split_name != "all":
            return view.split(self.split_name)  # re-checks that the split is not empty
        return view

    # -- introspection -----------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """Classes in this view (rotated copies count as classes)."""
        return len(self._base)

    @property
    def class_names(self) -> list[str]:
        names = self._store.class_names
        return [names[b] + (f"/rot{90 * r}" if r else "") for b, r in zip(self._base.tolist(), self._rot.tolist())]

    @property
    def class_groups(self) -> list[str]:
        """The group (alphabet) of each class in this view."""
        return [self._store.group_names[g] for g in self._group.tolist()]

    @property
    def groups(self) -> list[str]:
        """Sorted names of the groups that have classes in this view."""
        return [self._store.group_names[g] for g in torch.unique(self._group).tolist()]

    @property
    def base_class_names(self) -> list[str]:
        """Names of the un-rotated classes in this view (what the split is made of)."""
        names = self._store.class_names
        return [names[b] for b in torch.unique(self._base).tolist()]

    @property
    def num_images(self) -> int:
        """Distinct stored images behind this view (rotated copies not counted)."""
        return int(self._store.counts[torch.unique(self._base)].sum())

    def class_examples(self, i: int) -> Tensor:
        """All images of view class ``i`` (rotation applied), float32."""
        b, r = int(self._base[i]), int(self._rot[i])
        s = self._store
        x = _as_float(s.images[s.offsets[b] : s.offsets[b] + s.counts[b]])
        # rot90 copies; clone otherwise so callers can't write into the store.
        return torch.rot90(x, r, dims=(-2, -1)) if r else x.clone()

    def __repr__(self) -> str:
        return (
            f"ImageTasks(name={self.name!r}, split={self.split_name!r}, classes={self.num_classes}, "
            f"groups={len(self.groups)}, images={self.num_images}, input_shape={self.input_shape})"
        )

    # -- sampling ----------------------------------------------------------------------

    def sample(
        self,
        meta_batch: int,
        generator: torch.Generator | None = None,
        *,
        ways: int | None = None,
        shots: int | None = None,
        queries: int | None = None,
        within_group: bool = False,
    ) -> TaskBatch:
        """Sample ``meta_batch`` N-way K-shot tasks.

        Per task: ``ways`` distinct classes (all from one group if
        ``within_group``), labelled ``0..ways-1`` in random order; per class
        ``shots + queries`` distinct images, the first ``shots`` in the support
        set, the rest in the query set (so support and query never share an
        image). Examples are class-major: ``support_y[t] == [0]*shots + [1]*shots + ...``.

        Returns ``support_x [T, ways*shots, *input_shape]`` float32,
        ``support_y [T, ways*shots]`` int64, and likewise for the query set.
        """
        w = self.config.ways if ways is None else ways
        k = self.config.shots if shots is None else shots
        q = self.config.queries if queries is None else queries
        _check_task_shape(w, k, q)
        if meta_batch < 1:
            raise ValueError(f"meta_batch must be >= 1, got {meta_batch}")
        self._check_enough(w, k + q, within_group)
        t, n = meta_batch, k + q

        # 1) Classes: random scores per (task, class), keep the top `ways`.
        #    topk of i.i.d. uniforms = a uniformly random ordered subset, so the
        #    position in the result doubles as a randomly assigned label.
        scores = torch.rand(t, self.num_classes, generator=generator)
        if within_group:
            eligible = self._eligible_groups(w)
            pick = eligible[torch.randint(len(eligible), (t,), generator=generator)]
            scores.masked_fill_(self._group[None, :] != pick[:, None], -1.0)
        chosen = scores.topk(w, dim=1).indices  # [T, W] view-class ids
        base, rot = self._base[chosen], self._rot[chosen]

        # 2) Examples: K+Q distinct positions within each chosen class.
        counts, offsets = self._store.counts[base], self._store.offsets[base]
        index = offsets[..., None] + _sample_distinct(counts, n, generator)  # [T, W, K+Q]

        # 3) One gather (from the pre-rotated copies if this view has rotations).
        if self._rotates:
            images = self._store.rotated_images()
            index = index + (rot * len(self._store.images))[..., None]
        else:
            images = self._store.images
        x = _as_float(images[index.reshape(-1)])
        if self._shift:
            x = random_shift(x, self._shift, generator)
        x = x.reshape(t, w, n, *self.input_shape)

        labels = torch.arange(w)
        support_y = labels.repeat_interleave(k).expand(t, -1).contiguous()
        query_y = labels.repeat_interleave(q).expand(t, -1).contiguous()
        return TaskBatch(
            support_x=x[:, :, :k].reshape(t, w * k, *self.input_shape),
            support_y=support_y,
            query_x=x[:, :, k:].reshape(t, w * q, *self.input_shape),
            query_y=query_y,
        )

    def _where(self) -> str:
        """The data and its split, for messages (the whole data: its name alone; "split 'all'" read as if
        another split than the one asked for was meant)."""
        return self.name if self.split_name == "all" else f"{self.name} (split {self.split_name!r})"

    def _check_enough(self, ways: int, per_class: int, within_group: bool) -> None:
        where = self._where()
        if self.num_classes < ways:
            hint = " (it holds val_fraction of the classes: --set val_fraction=0.5, or fewer ways)" if self.split_name == "val" else ""
            raise ValueError(f"{where} has {self.num_classes} classes, fewer than ways={ways}{hint}")
        counts = self._store.counts[self._base]
        small = (counts < per_class).nonzero().flatten()
        if len(small):
            names = self.class_names
            shown = ", ".join(f"{names[i]} ({int(counts[i])})" for i in small[:5].tolist())
            more = f" and {len(small) - 5} more" if len(small) > 5 else ""
            raise ValueError(
                f"{where}: shots + queries = {per_class} examples per class needed, but "
                f"{len(small)} classes have fewer: {shown}{more}"
            )

    def _eligible_groups(self, ways: int) -> Tensor:
        per_group = torch.bincount(self._group, minlength=len(self._store.group_names))
        eligible = (per_group >= ways).nonzero().flatten()
        if len(eligible) == 0:
            raise ValueError(
                f"{self._where()}: within_group sampling needs a group with at "
                f"least ways={ways} classes; the largest has {int(per_group.max())}"
            )
        return eligible


# Above this many images per class, scoring every image (cost ~ T*W*count)
# becomes slower than Floyd's algorithm (cost ~ (K+Q)^2, independent of count).
_MAX_COUNT_FOR_TOPK = 256


def _sample_distinct(counts: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """For every entry ``c`` of ``counts [...]``, ``n`` distinct ints in ``0..c-1``, in random order.

    Returns ``[..., n]``. Needs ``counts >= n`` (checked by the caller).
    """
    max_count = int(counts.max())
    if max_count <= _MAX_COUNT_FOR_TOPK:
        # Random score per image, keep the top n; positions past a class's
        # count score -1 and are never picked. topk of i.i.d. uniforms is a
        # uniformly random ordered subset.
        scores = torch.rand(*counts.shape, max_count, generator=generator)
        scores.masked_fill_(torch.arange(max_count) >= counts[..., None], -1.0)
        return scores.topk(n, dim=-1).indices
    # Floyd's algorithm, vectorised over classes: step j draws r in [0, hi]
    # (hi = count - n + j) and takes hi instead if r was already taken. That
    # gives a uniform n-subset; a final shuffle makes its order uniform too.
    c = counts.reshape(-1)
    out = torch.empty(c.numel(), n, dtype=torch.long)
    for j in range(n):
        hi = c - n + j
        r = (torch.rand(c.numel(), generator=generator) * (hi + 1)).long().minimum(hi)
        taken = (out[:, :j] == r[:, None]).any(dim=1)
        out[:, j] = torch.where(taken, hi, r)
    order = torch.rand(c.numel(), n, generator=generator).argsort(dim=1)
    return out.gather(1, order).view(*counts.shape, n)


def _replicate_pad(images: Tensor, shift: int) -> Tensor:
    """``images`` ``[..., H, W]`` padded by ``shift`` pixels on every side, edge-replicated: a shifted image's
    uncovered border repeats its edge (Omniglot's background is 0, a user's photo keeps its own)."""
    h, w = images.shape[-2:]
    padded = torch.nn.functional.pad(images.reshape(1, -1, h, w), (shift,) * 4, mode="replicate")
    return padded.reshape(*images.shape[:-2], h + 2 * shift, w + 2 * shift)


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Translate each image of ``[B, ..., H, W]`` by its own random offset in ``[-max_shift, max_shift]``.

    One gather from the edge-replicated padded batch: output pixel (i, j) of
    image b is padded pixel (i + dy_b, j + dx_b) with dy_b, dx_b in ``[0, 2*max_shift]``.
    """
    if images.dim() < 3:
        raise ValueError(f"random_shift needs images [B, ..., H, W], got shape {tuple(images.shape)}")
    b, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    s = max_shift
    padded = _replicate_pad(images.reshape(b, -1, h, w), s)
    dy, dx = torch.randint(0, 2 * s + 1, (2, b, 1), generator=generator)
    rows = (dy + torch.arange(h))[:, None, :, None]  # [B, 1, H, 1]
    cols = (dx + torch.arange(w))[:, None, None, :]  # [B, 1, 1, W]
    batch = torch.arange(b)[:, None, None, None]
    channel = torch.arange(padded.shape[1])[None, :, None, None]
    return padded[batch, channel, rows, cols].reshape(images.shape)


SHIFTED_VIEWS = 5  # the original and four shifts: down, up, right, left


def shifted_views(images: Tensor, shift: int, dim: int = 0) -> Tensor:
    """``images`` ``[..., H, W]`` and four copies shifted by ``shift`` pixels (down, up, right, left,
    edge-replicated), concatenated along ``dim``: ``SHIFTED_VIEWS`` times as many entries there.

    Test-time support augmentation: a 1-shot class is adapted to from five
    views of its one example (``adapt(..., support_shift=...)``).
    """
    h, w = images.shape[-2:]
    if shift < 0 or shift >= min(h, w):
        raise ValueError(f"shift must be in [0, {min(h, w) - 1}] for {h}x{w} images, got {shift}")
    if shift == 0:
        return images
    padded = _replicate_pad(images, shift)
    offsets = ((0, 0), (-shift, 0), (shift, 0), (0, -shift), (0, shift))  # padded origin (s, s) = no shift
    views = [padded[..., shift + dy : shift + dy + h, shift + dx : shift + dx + w] for dy, dx in offsets]
    return torch.cat(views, dim)


def _as_float(x: Tensor) -> Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def _check_rotatable(input_shape: tuple[int, ...], name: str) -> None:
    if len(input_shape) < 2 or input_shape[-1] != input_shape[-2]:
        raise ValueError(f"{name}: rotations need square images [..., H, H], got input shape {input_shape}")


def _split_classes(store: _Store, config: ImageTaskConfig) -> dict[str, Tensor]:
    """Assign every base class to exactly one of train/val/test, reproducibly.

    Classes/groups are ordered by name before shuffling with ``split_seed``, so
    the split does not depend on file or zip order.
    """
    g = torch.Generator().manual_seed(config.split_seed)
    num_classes = len(store.class_names)
    assignment = torch.zeros(num_classes, dtype=torch.long)  # 0 train, 1 val, 2 test

    def by_name(ids: list[int]) -> list[int]:
        return sorted(ids, key=lambda c: store.class_names[c])

    if config.split_by == "group":
        num_groups = len(store.group_names)

        def n_held(fraction: float) -> int:
            # At least one group whenever a fraction is asked for at all.
            return max(1, _round_half_up(fraction * num_groups)) if fraction > 0 else 0

        n_test, n_val = n_held(config.test_fraction), n_held(config.val_fraction)
        if n_test + n_val >= num_groups:
            raise ValueError(
                f"split_by='group' with {num_groups} groups ({', '.join(store.group_names)}) cannot hold out "
                f"{n_val} val + {n_test} test groups and keep a training group"
            )
        order = torch.randperm(num_groups, generator=g).tolist()  # group_names is sorted already
        for rank, group in enumerate(order):
            assignment[store.class_group == group] = 2 if rank < n_test else 1 if rank < n_test + n_val else 0
    else:
        for group in range(len(store.group_names)):
            ids = by_name((store.class_group == group).nonzero().flatten().tolist())
            perm = torch.randperm(len(ids), generator=g).tolist()
            n_test = _round_half_up(config.test_fraction * len(ids))
            n_val = _round_half_up(config.val_fraction * len(ids))
            for rank, p in enumerate(perm):
                assignment[ids[p]] = 2 if rank < n_test else 1 if rank < n_test + n_val else 0

    return {
        "train": (assignment == 0).nonzero().flatten(),
        "val": (assignment == 1).nonzero().flatten(),
        "test": (assignment == 2).nonzero().flatten(),
        "all": torch.arange(num_classes),
    }
