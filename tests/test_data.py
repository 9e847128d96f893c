"""Tests for metalearn.data: task batches, sinusoids, image tasks and loaders."""

from __future__ import annotations

import base64
import io
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metalearn.data import (
    OMNIGLOT_PREPROCESSING,
    ImageTaskConfig,
    ImageTasks,
    SinusoidTasks,
    TaskBatch,
    TaskSource,
    fixed_tasks,
    load_task_source,
    preprocess_images,
)
from metalearn.data.images import random_shift, shifted_views
from metalearn.data.preprocess import image_preprocessing
from test_service_helpers import png_header_only

OMNIGLOT_DIR = Path(__file__).resolve().parents[1] / "metalearn" / "data" / "omniglot"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_batches_equal(a: TaskBatch, b: TaskBatch) -> None:
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.fixture(scope="module")
def omniglot() -> ImageTasks:
    return load_task_source("omniglot")  # ~1 s to decode; shared by the module


# -- synthetic image source whose pixels say which image (and rotation) they are -----


def id_images(n: int, size: int = 4) -> torch.Tensor:
    """Image i has value i+1 in its top-left pixel and 0 elsewhere, so after a
    rotation the id is the max and its corner tells the rotation."""
    x = torch.zeros(n, 1, size, size)
    x[:, 0, 0, 0] = torch.arange(1, n + 1, dtype=torch.float32)
    return x


def decode_ids(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., 1, H, W] -> (image id, rotation index 0..3) per image."""
    flat = x.flatten(-3)
    ids = flat.max(-1).values.long() - 1
    pos = flat.argmax(-1)
    h = x.shape[-1]
    # Where torch.rot90(k) (counter-clockwise) moves the top-left corner.
    corner_to_rot = {0: 0, (h - 1) * h: 1, h * h - 1: 2, h - 1: 3}
    rots = torch.tensor([corner_to_rot[int(p)] for p in pos.flatten()]).view(pos.shape)
    return ids, rots


def synthetic(per_class=(6,) * 12, groups=("a",) * 4 + ("b",) * 4 + ("c",) * 4, **config):
    """12 classes of 6 id-images in groups a/b/c; returns (source, per-image class labels)."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    perm = torch.randperm(len(labels), generator=gen(0))  # unsorted input on purpose
    labels = labels[perm]
    src = ImageTasks(
        id_images(len(labels)),
        labels,
        class_groups=list(groups),
        class_names=[f"{g}/c{i}" for i, g in enumerate(groups)],
        config=ImageTaskConfig(**config),
    )
    return src, labels


# -- TaskBatch ---------------------------------------------------------------------------


def test_task_batch_basics():
    b = TaskBatch(torch.zeros(3, 5, 1), torch.zeros(3, 5, 1), torch.ones(3, 7, 1), torch.ones(3, 7, 1))
    assert len(b) == 3
    sx, sy, qx, qy = b.task(2)
    assert sx.shape == (5, 1) and qy.shape == (7, 1)
    moved = b.to("cpu")
    assert isinstance(moved, TaskBatch) and torch.equal(moved.query_x, b.query_x)
    with pytest.raises(ValueError):
        TaskBatch(torch.zeros(3, 5, 1), torch.zeros(2, 5, 1), torch.ones(3, 7, 1), torch.ones(3, 7, 1))


# -- sinusoid ----------------------------------------------------------------------------


def test_sinusoid_shapes_ranges_and_function():
    src = load_task_source("sinusoid", shots=5, queries=7)
    assert isinstance(src, TaskSource)
    assert src.task_type == "regression" and src.input_shape == (1,) and src.preprocessing is None
    batch, amp, phase = src.sample(2000, gen(0), return_params=True)
    assert batch.support_x.shape == (2000, 5, 1) and batch.support_y.shape == (2000, 5, 1)
    assert batch.query_x.shape == (2000, 7, 1) and batch.query_y.shape == (2000, 7, 1)
    assert batch.support_x.dtype == torch.float32
    assert 0.1 <= amp.min() and amp.max() <= 5.0 and amp.max() > 4.9 and amp.min() < 0.2
    assert 0.0 <= phase.min() and phase.max() <= math.pi and phase.max() > 3.1 and phase.min() < 0.05
    xs = torch.cat([batch.support_x, batch.query_x], 1)
    assert -5.0 <= xs.min() and xs.max() <= 5.0 and xs.min() < -4.99 and xs.max() > 4.99
    expected = amp.view(-1, 1, 1) * torch.sin(batch.query_x - phase.view(-1, 1, 1))
    torch.testing.assert_close(batch.query_y, expected)
    # ways / within_group are accepted and ignored; shots/queries override.
    assert src.sample(3, gen(0), ways=5, shots=2, queries=4).query_x.shape == (3, 4, 1)


def test_sinusoid_determinism_split_and_fixed_tasks():
    src = SinusoidTasks(shots=10, queries=10)
    assert_batches_equal(src.sample(8, gen(1)), src.sample(8, gen(1)))
    assert not torch.equal(src.sample(8, gen(1)).support_x, src.sample(8, gen(2)).support_x)
    assert src.split("val") is src
    with pytest.raises(ValueError, match="unknown split"):
        src.split("validation")
    assert_batches_equal(src.fixed_tasks(10, seed=3), src.fixed_tasks(10, seed=3))
    a, b = fixed_tasks(src, 10, seed=3, meta_batch=4), fixed_tasks(src, 10, seed=3, meta_batch=4)
    assert [len(x) for x in a] == [4, 4, 2]
    for x, y in zip(a, b):
        assert_batches_equal(x, y)


@pytest.mark.parametrize("kind", ["sinusoid", "images"])
def test_fixed_tasks_do_not_depend_on_their_batching(kind):
    """Task i is the seed's i-th one-task draw: an evaluation batched by 1 (CPU) or 100 (GPU) sees the same tasks."""
    if kind == "sinusoid":
        src, kwargs = SinusoidTasks(shots=5, queries=7), {}
    else:
        src, kwargs = synthetic(val_fraction=0.0)[0], {"ways": 3, "shots": 1, "queries": 2, "within_group": True}
    whole = TaskBatch.cat(fixed_tasks(src, 10, seed=5, **kwargs))
    for meta_batch in (1, 3, 4, 10):
        assert_batches_equal(TaskBatch.cat(fixed_tasks(src, 10, seed=5, meta_batch=meta_batch, **kwargs)), whole)
    first = TaskBatch(whole.support_x[:1], whole.support_y[:1], whole.query_x[:1], whole.query_y[:1])
    assert_batches_equal(first, src.sample(1, gen(5), **kwargs))


# -- image task sampling (synthetic, exact checks) ------------------------------------------


@pytest.mark.parametrize("rotations", [False, True])
@pytest.mark.parametrize("within_group", [False, True])
def test_image_sampling_structure(rotations, within_group):
    src, labels = synthetic(rotations=rotations, val_fraction=0.0)
    ways, shots, queries, t = 4, 2, 3, 50
    b = src.sample(t, gen(0), ways=ways, shots=shots, queries=queries, within_group=within_group)
    assert b.support_x.shape == (t, ways * shots, 1, 4, 4) and b.query_x.shape == (t, ways * queries, 1, 4, 4)
    assert b.support_x.dtype == torch.float32 and b.support_y.dtype == torch.int64
    assert torch.equal(b.support_y[0], torch.arange(ways).repeat_interleave(shots))
    assert torch.equal(b.query_y[0], torch.arange(ways).repeat_interleave(queries))
    s_id, s_rot = decode_ids(b.support_x)
    q_id, q_rot = decode_ids(b.query_x)
    if not rotations:
        assert (s_rot == 0).all() and (q_rot == 0).all()
    rotations_seen = set()
    for i in range(t):
        task_classes = []
        for label in range(ways):
            s, q = s_id[i][b.support_y[i] == label], q_id[i][b.query_y[i] == label]
            ids = torch.cat([s, q])
            assert len(set(ids.tolist())) == shots + queries  # support/query disjoint, no repeats
            cls = labels[ids]
            assert (cls == cls[0]).all()  # one class per label
            rot = torch.cat([s_rot[i][b.support_y[i] == label], q_rot[i][b.query_y[i] == label]])
            assert (rot == rot[0]).all()  # a rotated class is rotated throughout
            rotations_seen.add(int(rot[0]))
            task_classes.append((int(cls[0]), int(rot[0])))
        assert len(set(task_classes)) == ways  # distinct (class, rotation) per label
        if within_group:
            assert len({src._store.class_names[c][0] for c, _ in task_classes}) == 1
    assert rotations_seen == ({0, 1, 2, 3} if rotations else {0})


def test_large_classes_use_distinct_examples():
    # > 256 images per class takes the Floyd's-algorithm path of the sampler.
    src, labels = synthetic(per_class=(300, 280, 400), groups=("a", "a", "b"), val_fraction=0.0)
    b = src.sample(20, gen(0), ways=3, shots=5, queries=10)
    ids = torch.cat([decode_ids(b.support_x)[0], decode_ids(b.query_x)[0]], 1)
    y = torch.cat([b.support_y, b.query_y], 1)
    for i in range(len(b)):
        for label in range(3):
            task_ids = ids[i][y[i] == label]
            assert len(set(task_ids.tolist())) == 15 and len(set(labels[task_ids].tolist())) == 1


def test_distinct_sampler_is_uniform():
    from metalearn.data.images import _sample_distinct

    for count in (5, 1000):  # both code paths
        picks = _sample_distinct(torch.full((60000,), count), 2, gen(0))
        assert (picks[:, 0] != picks[:, 1]).all() and picks.min() >= 0 and picks.max() < count
        if count == 5:
            pairs = torch.bincount(picks[:, 0] * 5 + picks[:, 1], minlength=25).view(5, 5).float()
            off_diag = pairs[~torch.eye(5, dtype=torch.bool)]
            assert (off_diag - 3000).abs().max() < 300  # 60000 / 20 ordered pairs
        else:
            first = torch.bincount(picks[:, 0] // 100, minlength=10).float()
            assert (first - 6000).abs().max() < 500


def test_labels_are_randomly_assigned():
    src, labels = synthetic(val_fraction=0.0)
    b = src.sample(200, gen(0), ways=2, shots=1, queries=1)
    first_class = labels[decode_ids(b.support_x)[0][:, 0]]
    assert len(set(first_class.tolist())) == 12  # label 0 lands on every class


def test_image_determinism(omniglot):
    train = omniglot.split("train")
    kw = dict(ways=5, shots=1, queries=2)
    assert_batches_equal(train.sample(4, gen(5), **kw), train.sample(4, gen(5), **kw))
    assert not torch.equal(train.sample(4, gen(5)).support_x, train.sample(4, gen(6)).support_x)


def test_uint8_images_are_scaled():
    x = (torch.arange(8 * 4, dtype=torch.uint8) * 7).view(8, 1, 2, 2)
    src = ImageTasks(x, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), ["g", "g"], config=ImageTaskConfig(val_fraction=0.0))
    b = src.sample(2, gen(0), ways=2, shots=2, queries=2)
    assert b.support_x.dtype == torch.float32 and 0.0 <= b.support_x.min() and b.support_x.max() <= 1.0
    assert set((b.support_x * 255).round().long().flatten().tolist()) <= set(x.long().flatten().tolist())


def test_sampling_errors():
    src, _ = synthetic(per_class=(6,) * 11 + (3,), val_fraction=0.0)
    with pytest.raises(ValueError, match="fewer than ways=13$"):
        src.sample(1, gen(0), ways=13)
    held_out, _ = synthetic(val_fraction=0.2)
    with pytest.raises(ValueError, match=r"split 'val'\) has 3 classes, fewer than ways=5 \(.*--set val_fraction="):
        held_out.split("val").sample(1, gen(0), ways=5)
    with pytest.raises(ValueError, match=r"c11 \(3\)"):
        src.sample(1, gen(0), ways=2, shots=2, queries=2)
    with pytest.raises(ValueError, match="within_group.*at least ways=5"):
        src.sample(1, gen(0), ways=5, shots=1, queries=1, within_group=True)
    with pytest.raises(ValueError, match="split 'test' is empty"):
        src.split("test")
    with pytest.raises(ValueError, match="ways >= 1"):
        src.sample(1, gen(0), ways=0)


# -- class splits ---------------------------------------------------------------------------


def base_names(view: ImageTasks) -> set[str]:
    return {name.split("/rot")[0] for name in view.class_names}


@pytest.mark.parametrize("split_by", ["character", "group"])
def test_splits_disjoint_reproducible_rotations_together(omniglot, split_by):
    def make(seed: int) -> ImageTasks:
        return omniglot.with_config(rotations=True, split_by=split_by, val_fraction=0.2, test_fraction=0.2, split_seed=seed)

    src = make(1)
    views = {name: src.split(name) for name in ("train", "val", "test")}
    bases = {name: base_names(v) for name, v in views.items()}
    assert sum(len(b) for b in bases.values()) == 242
    assert set.union(*bases.values()) == set(omniglot.class_names)
    for name, view in views.items():
        # Every rotation of every base character of the split, and nothing else.
        rotated = (f"{b}{r}" for b in bases[name] for r in ("", "/rot90", "/rot180", "/rot270"))
        assert sorted(view.class_names) == sorted(rotated)
    if split_by == "group":
        groups = [set(v.groups) for v in views.values()]
        assert sum(len(g) for g in groups) == 8 and len(set.union(*groups)) == 8
        assert len(groups[1]) == 2 and len(groups[2]) == 2  # round(0.2 * 8) alphabets each
    else:
        assert all(len(v.groups) == 8 for v in views.values())  # each alphabet contributes to each split
    # Same seed, same split; another seed, another split.
    assert base_names(make(1).split("val")) == bases["val"]
    assert base_names(make(2).split("val")) != bases["val"]


def test_rotate_heldout_option(omniglot):
    src = omniglot.with_config(rotations=True, rotate_heldout=False)
    assert src.split("train").num_classes == 4 * len(base_names(src.split("train")))
    assert src.split("val").num_classes == len(base_names(src.split("val")))


def test_random_shift_matches_padded_crop():
    x = torch.rand(6, 2, 5, 7)
    out = random_shift(x, 2, gen(3))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    offsets = set()
    for b in range(len(x)):
        # Exactly one crop of the padded (random, so nowhere flat) image reproduces each output image.
        crops = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(out[b], padded[b, :, dy:dy + 5, dx:dx + 7])]
        assert len(crops) == 1
        offsets.update(crops)
    assert len(offsets) > 1  # each image gets its own offset
    assert torch.equal(random_shift(x, 2, gen(3)), out)  # seeded
    assert torch.equal(random_shift(x, 0, gen(3)), x)


def test_shifted_views_are_the_four_axis_shifts():
    x = torch.rand(3, 4, 2, 6, 7)  # [R, S, C, H, W]
    views = shifted_views(x, 2, dim=1)
    assert views.shape == (3, 20, 2, 6, 7)
    down, up, right, left = (views[:, 4 * k : 4 * (k + 1)] for k in range(1, 5))
    assert torch.equal(views[:, :4], x)
    assert torch.equal(down[..., 2:, :], x[..., :-2, :]) and torch.equal(down[..., :2, :], x[..., :1, :].expand_as(down[..., :2, :]))
    assert torch.equal(up[..., :-2, :], x[..., 2:, :]) and torch.equal(up[..., -2:, :], x[..., -1:, :].expand_as(up[..., -2:, :]))
    assert torch.equal(right[..., 2:], x[..., :-2]) and torch.equal(right[..., :2], x[..., :1].expand_as(right[..., :2]))
    assert torch.equal(left[..., :-2], x[..., 2:]) and torch.equal(left[..., -2:], x[..., -1:].expand_as(left[..., -2:]))
    assert torch.equal(shifted_views(x, 0), x)
    for bad in (-1, 6):
        with pytest.raises(ValueError, match="shift must be in"):
            shifted_views(x, bad)


def test_max_shift_augments_train_split_only(omniglot):
    src = omniglot.with_config(max_shift=2)
    plain = omniglot.split("train").sample(3, gen(1), ways=5, shots=1, queries=2)
    shifted = src.split("train").sample(3, gen(1), ways=5, shots=1, queries=2)
    assert not torch.equal(plain.support_x, shifted.support_x)
    assert torch.equal(plain.support_y, shifted.support_y)
    # Same pixels moved, nothing invented: the ink per image is nearly unchanged
    # (only strokes within 2 px of the border can leave or be replicated).
    assert torch.allclose(plain.support_x.sum((-1, -2)), shifted.support_x.sum((-1, -2)), rtol=0.1, atol=1.0)
    assert_batches_equal(
        omniglot.split("val").sample(3, gen(1), ways=5, shots=1, queries=2),
        src.split("val").sample(3, gen(1), ways=5, shots=1, queries=2),
    )
    with pytest.raises(ValueError, match="max_shift"):
        ImageTaskConfig(max_shift=-1)


def test_split_config_errors():
    with pytest.raises(ValueError, match="split_by"):
        ImageTaskConfig(split_by="alphabet")
    with pytest.raises(ValueError, match="must be < 1"):
        ImageTaskConfig(val_fraction=0.5, test_fraction=0.5)
    synthetic(groups=("a",) * 12, split_by="group", val_fraction=0.0)  # nothing held out: fine
    with pytest.raises(ValueError, match="keep a training group"):
        synthetic(groups=("a",) * 12, split_by="group", val_fraction=0.2)


# -- bundled Omniglot -----------------------------------------------------------------------


def test_omniglot_contents(omniglot):
    assert omniglot.task_type == "classification" and omniglot.input_shape == (1, 28, 28)
    assert omniglot.preprocessing == OMNIGLOT_PREPROCESSING
    assert len(omniglot.groups) == 8 and omniglot.num_classes == 242
    assert omniglot.num_images == 242 * 20  # Greek/Latin, present in both zips, loaded once
    assert torch.equal(omniglot._store.counts, torch.full((242,), 20))
    img = omniglot.class_examples(0)
    assert img.dtype == torch.float32 and img.min() == 0.0 and img.max() == 1.0
    assert img.mean() < 0.5  # inverted: mostly background (0), strokes 1


def test_omniglot_within_group_one_alphabet(omniglot):
    val = omniglot.with_config(split_by="group", val_fraction=0.25).split("val")
    b = val.sample(8, gen(0), ways=5, shots=1, queries=1, within_group=True)
    group_of = dict(zip(val.class_names, val.class_groups))
    examples = {name: val.class_examples(i) for i, name in enumerate(val.class_names)}
    for i in range(len(b)):
        groups = set()
        for x in b.support_x[i]:
            name = next(n for n, ex in examples.items() if (ex == x).all(dim=(1, 2, 3)).any())
            groups.add(group_of[name])
        assert len(groups) == 1


def test_preprocess_images_matches_loader(omniglot):
    with zipfile.ZipFile(OMNIGLOT_DIR / "images_background_small2.zip") as z:
        members = sorted(n for n in z.namelist() if "/Greek/character03/" in n and n.endswith(".png"))
        raw = z.read(members[0])
    cls = omniglot.class_names.index("Greek/character03")
    from_loader = omniglot.class_examples(cls)[0]
    assert torch.equal(preprocess_images([raw], omniglot.preprocessing)[0], from_loader)
    assert torch.equal(preprocess_images([Image.open(io.BytesIO(raw))])[0], from_loader)


def test_preprocess_images_uploads(monkeypatch):
    # A canvas export: black stroke on a transparent background, 100x100 RGBA.
    canvas = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    canvas.paste((0, 0, 0, 255), (40, 0, 60, 100))
    buf = io.BytesIO()
    canvas.save(buf, "PNG")
    x = preprocess_images([buf.getvalue()], OMNIGLOT_PREPROCESSING)
    assert x.shape == (1, 1, 28, 28) and x.dtype == torch.float32
    assert x[0, 0, :, 14].min() > 0.95 and x[0, 0, :, 2].max() < 0.05  # stroke 1, background 0
    jpeg = io.BytesIO()
    canvas.convert("RGB").save(jpeg, "JPEG")  # RGB flattening makes the background black: all ~1 inverted
    assert preprocess_images([jpeg.getvalue()]).shape == (1, 1, 28, 28)
    with pytest.raises(ValueError, match="upload.png: cannot decode"):
        preprocess_images([b"not an image"], names=["upload.png"])
    with pytest.raises(ValueError, match="bomb.png: image too large to decode"):  # a ValueError, not Pillow's own
        preprocess_images([png_header_only(20000, 20000)], names=["bomb.png"])
    # Formats outside IMAGE_FORMATS are not opened: Pillow's rarer plugins fail on malformed files with exceptions
    # of their own (a DDS header with a pixel format it does not know: NotImplementedError), and EPS runs Ghostscript.
    dds = b"DDS |" + bytes(71) + (32).to_bytes(4, "little") + (0x2000).to_bytes(4, "little") + bytes(48)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    for name, data in (("a.dds", dds), ("b.eps", eps)):
        with pytest.raises(ValueError, match=name.replace(".", r"\.") + r": cannot decode image: not a picture in a format read here"):
            preprocess_images([data], names=[name])
    # A read format's decoder failing with an exception of its own names the file too (not a traceback).
    from PIL import PngImagePlugin

    def broken_decoder(self):
        raise NotImplementedError("a decoder's own failure")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", broken_decoder)
    with pytest.raises(ValueError, match=r"c\.png: cannot decode image \(NotImplementedError: a decoder's own failure\)"):
        preprocess_images([buf.getvalue()], names=["c.png"])
    with pytest.raises(ValueError, match="kind='image'"):
        preprocess_images([buf.getvalue()], {"kind": "array"})


# -- generic user sources ---------------------------------------------------------------------


def write_png(path: Path, seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path.read_bytes()


def test_folder_source(tmp_path):
    root = tmp_path / "photos"
    raw = {}
    for c, cls in enumerate(["cat", "dog", "fox"]):
        for i in range(4):
            raw[(cls, i)] = write_png(root / cls / f"{i}.png", 10 * c + i)
    (root / "cat" / ".DS_Store").write_bytes(b"junk")  # ignored
    src = load_task_source(str(root), ways=3, shots=1, queries=3, val_fraction=0.0)
    assert src.class_names == ["cat", "dog", "fox"] and src.groups == ["all"]
    assert src.input_shape == (1, 28, 28) and src.num_images == 12
    expected = preprocess_images([raw[("dog", 2)]], src.preprocessing)[0]
    assert torch.equal(src.class_examples(1)[2], expected)
    b = src.sample(2, gen(0))
    assert b.support_x.shape == (2, 3, 1, 28, 28) and b.query_y.shape == (2, 9)

    # The same classes zipped, with a wrapper folder and macOS junk, merge into one class set.
    zpath = tmp_path / "photos.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for (cls, i), data in raw.items():
            z.writestr(f"photos/{cls}/{i}.png", data)
        z.writestr("__MACOSX/photos/cat/._0.png", b"junk")
    zipped = load_task_source(zpath, val_fraction=0.0, image_size=16, invert=False, resample="bilinear")
    assert zipped.class_names == src.class_names and zipped.input_shape == (1, 16, 16)
    assert zipped.preprocessing["resample"] == "bilinear" and zipped.preprocessing["invert"] is False
    merged = load_task_source([root, zpath], val_fraction=0.0)
    assert merged.num_images == 12

    # One alphabet in a folder: flat by default, grouped on request.
    for i in range(2):
        write_png(tmp_path / "one" / "Greek" / f"character0{i}" / "a.png", i)
    assert load_task_source(tmp_path / "one", val_fraction=0.0).class_names == ["character00", "character01"]
    grouped = load_task_source(tmp_path / "one", layout="grouped", val_fraction=0.0)
    assert grouped.class_names == ["Greek/character00", "Greek/character01"] and grouped.groups == ["Greek"]


def test_folder_source_errors(tmp_path):
    write_png(tmp_path / "mixed" / "a" / "0.png", 0)
    write_png(tmp_path / "mixed" / "g" / "b" / "0.png", 1)
    with pytest.raises(ValueError, match="different folder depths"):
        load_task_source(tmp_path / "mixed")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load_task_source(tmp_path / "empty")
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "0.png").write_bytes(b"nope")
    (tmp_path / "bad" / "b").mkdir()
    with pytest.raises(ValueError, match=r"0\.png: cannot decode"):
        load_task_source(tmp_path / "bad")
    with pytest.raises(ValueError, match="unknown task"):
        load_task_source(tmp_path / "missing")
    with pytest.raises(TypeError, match="unknown option"):
        load_task_source("omniglot", wayz=5)
    with pytest.raises(TypeError, match="unknown option"):
        load_task_source("sinusoid", rotations=True)


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(30, 1, 8, 8), dtype=np.uint8)
    y = np.repeat([7, -3, 42], 10)
    path = tmp_path / "data.npz"
    np.savez(path, x=x, y=y)
    src = load_task_source(str(path), ways=3, shots=2, queries=3, val_fraction=0.0, rotations=True)
    assert src.input_shape == (1, 8, 8) and src.preprocessing == {"kind": "array", "dtype": "uint8", "scale": "divide_255"}
    assert sorted(src.base_class_names) == ["-3", "42", "7"] and src.num_classes == 12
    plain = src.with_config(rotations=False)
    idx = plain.class_names.index("42")
    assert torch.equal(plain.class_examples(idx), torch.from_numpy(x[y == 42]).float() / 255)
    b = src.sample(4, gen(0))
    assert b.support_x.shape == (4, 6, 1, 8, 8) and b.support_x.dtype == torch.float32

    feats = tmp_path / "feats.npz"
    np.savez(feats, x=rng.normal(size=(20, 5)), y=np.arange(20) % 4)
    f = load_task_source(feats, ways=4, shots=2, queries=3, val_fraction=0.0)
    assert f.input_shape == (5,) and f.preprocessing["scale"] == "none"
    assert f.sample(2, gen(0)).query_x.shape == (2, 12, 5)


def test_npz_errors(tmp_path):
    def npz(name, **arrays):
        p = tmp_path / name
        np.savez(p, **arrays)
        return p

    x = np.zeros((10, 4), np.float32)
    with pytest.raises(ValueError, match=r"noy\.npz: missing array 'y' \(found: x\)"):
        load_task_source(npz("noy.npz", x=x))
    with pytest.raises(ValueError, match=r"len\.npz: 'x' has 10 examples but 'y' has 9"):
        load_task_source(npz("len.npz", x=x, y=np.zeros(9, int)))
    with pytest.raises(ValueError, match=r"float\.npz: 'y' must hold class labels \(integers or strings\), got dtype float64 \(regression from your own data is not supported"):
        load_task_source(npz("float.npz", x=x, y=np.linspace(0, 1, 10)))
    # class numbers saved as floats, and names, are labels
    assert sorted(load_task_source(npz("integral.npz", x=x, y=np.arange(10.0) % 2), val_fraction=0.0).base_class_names) == ["0", "1"]
    named = load_task_source(npz("names.npz", x=x, y=np.array(["sku-1", "sku-22"] * 5)), val_fraction=0.0)
    assert sorted(named.base_class_names) == ["sku-1", "sku-22"]
    broken = x.copy()
    broken[[3, 7], 1] = np.nan
    with pytest.raises(ValueError, match=r"nan\.npz: 'x' contains NaN or infinite values in 2 example\(s\), the first at index 3"):
        load_task_source(npz("nan.npz", x=broken, y=np.arange(10) % 2))
    with pytest.raises(ValueError, match=r"obj\.npz: cannot read"):
        load_task_source(npz("obj.npz", x=x, y=np.array([[1], "a"] * 5, dtype=object)))
    small = npz("small.npz", x=x, y=np.arange(10) % 2)
    with pytest.raises(ValueError, match=r"small\.npz.*2 classes, fewer than ways=5"):
        load_task_source(small, ways=5)
    with pytest.raises(ValueError, match=r"small\.npz: shots \+ queries = 6 examples per class needed"):  # (the whole data: no "split 'all'")
        load_task_source(small, ways=2, shots=1, queries=5, val_fraction=0.0)
    with pytest.raises(ValueError, match="rotations need square images"):
        load_task_source(small, rotations=True)


def test_pictures_as_companies_have_them(tmp_path):
    """16-bit pictures keep their grey levels (convert("L") clipped them white); float ones are refused by
    name; every bad file is named in one error; a zip written with backslashes (Windows) loads; TIFFs count."""
    import zipfile

    from PIL import Image

    prep = image_preprocessing(8, invert=False)
    levels = np.linspace(0, 255, 64).reshape(8, 8).astype(np.uint8)

    def encoded(array, fmt="PNG"):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format=fmt)
        return buf.getvalue()

    wide, narrow = preprocess_images([encoded(levels.astype(np.uint16) * 257), encoded(levels)], prep)
    assert torch.equal(wide, narrow) and 0.45 < float(narrow.mean()) < 0.55
    with pytest.raises(ValueError, match=r"^3 picture\(s\) cannot be used; fix or remove them: a\.tif: .*32-bit float pictures .*; b\.png: cannot decode image: not a picture in a format read here \(PNG, JPEG, .*; c\.png: "):
        preprocess_images([encoded(np.ones((8, 8), np.float32), "TIFF"), b"nope", b"", encoded(levels)], prep, names=["a.tif", "b.png", "c.png", "d.png"])
    archive = tmp_path / "windows.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for label in range(3):
            for i in range(2):
                z.writestr(f"data\\c{label}\\{i}.tif", encoded(levels, "TIFF"))
    source = load_task_source(archive, val_fraction=0.0)
    assert sorted(source.base_class_names) == ["c0", "c1", "c2"] and source.num_images == 6


def test_colour_pictures_keep_their_colour(tmp_path):
    """grayscale=False: RGB inputs [N, 3, H, W]; a red and a green cap of one luminance stay apart (grey,
    they are one picture), and the service's decoding of an upload with the checkpoint's record gives the same."""
    from PIL import Image

    def cap(colour):
        buf = io.BytesIO()
        Image.new("RGB", (30, 20), colour).save(buf, format="PNG")
        return buf.getvalue()

    red, green = cap((200, 0, 0)), cap((0, 102, 0))  # equal luminance to within a grey level
    grey = preprocess_images([red, green], image_preprocessing(8, invert=False))
    assert grey.shape == (2, 1, 8, 8) and float((grey[0] - grey[1]).abs().max()) <= 1 / 255 + 1e-6
    colour = preprocess_images([red, green], image_preprocessing(8, invert=False, grayscale=False))
    assert colour.shape == (2, 3, 8, 8)
    assert torch.allclose(colour[0, :, 0, 0], torch.tensor([200 / 255, 0.0, 0.0])) and torch.allclose(colour[1, :, 0, 0], torch.tensor([0.0, 0.4, 0.0]))
    for label, picture in enumerate((red, green, cap((0, 0, 200)))):
        folder = tmp_path / "caps" / f"c{label}"
        folder.mkdir(parents=True)
        for i in range(3):
            (folder / f"{i}.png").write_bytes(picture)
    source = load_task_source(tmp_path / "caps", image_size=8, grayscale=False, invert=False, val_fraction=0.0)
    assert source.input_shape == (3, 8, 8) and source.preprocessing["grayscale"] is False

    from service.tensors import ImageList, decode_inputs

    upload = ImageList(images=[base64.b64encode(red).decode()])
    assert torch.equal(decode_inputs(upload, "x", (3, 8, 8), source.preprocessing, 10), colour[:1])


def test_reading_many_pictures_shows_progress(tmp_path, capsys):
    """progress=True: a bar on stderr while the pictures are read (photos decode at tens of ms each)."""
    from PIL import Image

    for label in range(2):
        folder = tmp_path / "pics" / f"c{label}"
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((9, 9), 40 * i, np.uint8)).save(folder / f"{i}.png")
    quiet = load_task_source(tmp_path / "pics", val_fraction=0.0)
    assert "reading pictures" not in capsys.readouterr().err
    shown = load_task_source(tmp_path / "pics", val_fraction=0.0, progress=True)
    assert "reading pictures" in capsys.readouterr().err
    assert torch.equal(shown.class_examples(0), quiet.class_examples(0))


def test_undecodable_pictures_can_be_left_out(tmp_path):
    """skip_undecodable: the files that do not decode are left out with a warning naming them (by default
    they stop the load, all named); the rest load as they would alone."""
    from PIL import Image

    for label in range(3):
        folder = tmp_path / "pics" / f"c{label}"
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((9, 9), 30 * i + label, np.uint8)).save(folder / f"{i}.png")
    clean = load_task_source(tmp_path / "pics", val_fraction=0.0)
    (tmp_path / "pics" / "c1" / "9.png").write_bytes(b"truncated")
    (tmp_path / "pics" / "c2" / "8.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"2 picture\(s\) cannot be used; fix or remove them: .*c1/9\.png.*; .*c2/8\.png"):
        load_task_source(tmp_path / "pics", val_fraction=0.0)
    with pytest.warns(UserWarning, match=r"skipped 2 picture\(s\) that do not decode: .*c1/9\.png"):
        skipped = load_task_source(tmp_path / "pics", val_fraction=0.0, skip_undecodable=True)
    assert skipped.num_images == clean.num_images == 9 and skipped.base_class_names == clean.base_class_names
    for c in range(3):
        assert torch.equal(skipped.class_examples(c), clean.class_examples(c))
