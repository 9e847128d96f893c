"""Request tensors: decoding and validation against a model.

A tensor in a request body is one of:

- nested JSON lists, e.g. ``[[0.1], [0.5]]`` for two inputs of shape ``[1]``;
- ``{"dtype": "float32", "shape": [2, 1], "base64": "..."}``: raw little-endian
  bytes (``dtype`` one of float32, float64, uint8, int32, int64). Numbers are the
  model's input as they are, except uint8: raw pixels or bytes, mapped to 0-1 as
  the training data's were (inverted too for images whose preprocessing inverts);
- for image models, ``{"images": ["<base64 PNG or JPEG>", ...]}``: decoded and
  preprocessed exactly as the model's training data (the checkpoint's
  ``preprocessing``: resize, grayscale, inversion, scaling).

Every problem is raised as a 422 :class:`service.problems.Problem` naming the
field (``support.x``) and what is wrong.
"""

from __future__ import annotations

import binascii
import io
import math
import re
from typing import Annotated, Any, Literal, Union

import numpy as np
import pybase64
import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag

from service.problems import Problem

DTYPES = {"float32": "<f4", "float64": "<f8", "uint8": "u1", "int32": "<i4", "int64": "<i8"}
MAX_IMAGE_SIDE = 4096
MAX_LIST_PIXELS = 1 << 26  # decoded pixels of one list of images (67 M: a 16 MB body's worth of camera JPEGs)
MAX_DIMENSION = 1 << 31  # of an encoded tensor's declared shape


def json_number(value: Any) -> Any:
    """Refuses what JSON does not write as a number (true, "3") before pydantic's lax mode converts it;
    integral floats (3.0) stay valid integers, as JSON Schema counts them."""
    if isinstance(value, (bool, str)):
        raise ValueError(f"expected a JSON number, got {value!r}")
    return value


# Numbers as JSON writes them: pydantic's default (lax) mode would read `true` as 1 and "3" as 3; a client
# that sends those has a bug the service should name.
JsonInt = Annotated[int, BeforeValidator(json_number)]
JsonFloat = Annotated[float, BeforeValidator(json_number)]


MAX_RANK = 8  # the most dimensions a tensor sent here may have (the OpenAPI document spells out NestedNumbers to it)


class EncodedTensor(BaseModel):
    """Raw little-endian tensor bytes, base64-encoded."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"dtype": "float32", "shape": [1, 1], "base64": "AAAAAA=="}]})
    dtype: Literal["float32", "float64", "uint8", "int32", "int64"]
    shape: list[JsonInt] = Field(..., max_length=MAX_RANK)
    base64: str


class ImageList(BaseModel):
    """Encoded pictures (PNG, JPEG, ...), preprocessed as the model's training data."""

    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(..., description="base64-encoded image files")


def _tensor_form(value: Any) -> str | None:
    """Which form a tensor was sent in, so that a mistake in one is reported against that form alone
    (not against all three, as an undiscriminated union's errors are)."""
    if isinstance(value, (list, tuple)):
        return "lists"
    if isinstance(value, dict):
        return "images" if "images" in value else "encoded"
    return {EncodedTensor: "encoded", ImageList: "images"}.get(type(value))


TensorInput = Annotated[
    Union[Annotated[list[Any], Tag("lists")], Annotated[EncodedTensor, Tag("encoded")], Annotated[ImageList, Tag("images")]],
    Discriminator(
        _tensor_form,
        custom_error_type="tensor_form",
        custom_error_message="expected a tensor: nested lists of numbers, {dtype, shape, base64}, or {images: [...]}",
    ),
]
LabelsInput = Annotated[
    Union[Annotated[list[Any], Tag("lists")], Annotated[EncodedTensor, Tag("encoded")]],
    Discriminator(
        lambda value: "encoded" if _tensor_form(value) == "images" else _tensor_form(value),
        custom_error_type="labels_form",
        custom_error_message="expected labels or targets: a list of numbers, or {dtype, shape, base64}",
    ),
]
# The tags above, which pydantic puts in an error's location after the field's name (support.x.encoded.dtype):
# not a path in the body, so the error answers leave them out.
TENSOR_FORMS = ("lists", "encoded", "images")


def invalid(detail: str, title: str = "Invalid tensor") -> Problem:
    return Problem(422, title, detail)


# torch's words for what a JSON client sent, in a client's words
_LIST_ERRORS = (("'str'", "a string where a number belongs (send 1.5, not \"1.5\")"), ("NoneType", "null where a number belongs"), ("not dict", "an object where a number belongs"))


def _from_lists(value: list, where: str, dtype: torch.dtype) -> np.ndarray:
    # torch's parser, not numpy's: numpy would read None as NaN and "1.5" as a number
    try:
        return torch.tensor(value, dtype=dtype).numpy()
    except (ValueError, TypeError, RuntimeError, OverflowError) as error:
        message = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        message = next((plain for words, plain in _LIST_ERRORS if words in message), message)
        raise invalid(f"{where}: not a rectangular array of numbers ({message})") from None


def b64decode(text: str, where: str) -> bytes:
    """Base64 as clients' libraries write it: the standard alphabet, and also the URL-safe one, without
    padding, or wrapped in lines (coreutils' and MIME encoders wrap at 76 columns)."""
    try:
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    cleaned = "".join(text.split()).rstrip("=").translate(_URL_SAFE)
    try:
        return pybase64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError):
        bad = next((f"{c!r} at position {i}" for i, c in enumerate(cleaned) if c not in _BASE64_ALPHABET), None)
        why = f"character {bad} is not base64" if bad else f"{len(cleaned)} characters cannot be base64 (a length of 4k+1)"
        raise invalid(f"{where}: malformed base64 data: {why}") from None


_URL_SAFE = str.maketrans("-_", "+/")
_BASE64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def _from_base64(value: EncodedTensor, where: str) -> np.ndarray:
    shape = value.shape
    if any(s < 0 for s in shape):
        raise invalid(f"{where}: negative dimension in shape {shape}")
    # (with a 0 among them, dimensions past any array's size still multiply to 0 bytes: refused by name)
    if any(s > MAX_DIMENSION for s in shape):
        raise invalid(f"{where}: shape {shape} is beyond any model's input (dimensions of at most {MAX_DIMENSION})",
                      title="Wrong tensor shape")
    raw = b64decode(value.base64, where)
    itemsize = np.dtype(DTYPES[value.dtype]).itemsize
    count = math.prod(shape)
    if count * itemsize != len(raw):
        raise invalid(
            f"{where}: {len(raw)} bytes do not match shape {shape} of {value.dtype} "
            f"({count} x {itemsize} = {count * itemsize} bytes expected)"
        )
    try:
        return np.frombuffer(raw, dtype=DTYPES[value.dtype]).reshape(shape)
    except ValueError:  # (an empty array's other dimensions multiplying past numpy's index range)
        raise invalid(f"{where}: no array has shape {shape}", title="Wrong tensor shape") from None


def _from_images(value: ImageList, where: str, preprocessing: dict | None, max_count: int) -> torch.Tensor:
    if preprocessing is None or preprocessing.get("kind") != "image":
        raise invalid(f"{where}: this model takes tensors, not images (its checkpoint records no image preprocessing)")
    if not value.images:
        raise invalid(f"{where}: empty image list", title="Empty input")
    _check_count(len(value.images), where, max_count)  # (before any is decoded)
    pixels = 0
    from PIL import Image, UnidentifiedImageError

    from metalearn.data.preprocess import ACCEPTED, IMAGE_FORMATS, preprocess_images

    blobs = []
    for i, text in enumerate(value.images):
        if text[:5].lower() == "data:":  # a data URL (a browser's canvas.toDataURL(), say): its base64 part
            header, _, text = text.partition(",")
            if not header.lower().endswith(";base64"):  # (the scheme and its parameters are case-insensitive)
                raise invalid(f"{where}.images[{i}]: a data URL must be base64 (data:image/png;base64,...), got {header[:60]!r}")
        blob = b64decode(text, f"{where}.images[{i}]")
        try:
            with Image.open(io.BytesIO(blob), formats=IMAGE_FORMATS) as img:
                width, height = img.size
        except Image.DecompressionBombError as error:  # Pillow's own limit, reached before ours by its header alone
            counted = re.search(r"\((\d+) pixels\)", str(error))  # ("Image size (2500000000 pixels) exceeds limit ...")
            raise invalid(f"{where}.images[{i}]: image of {counted[1] if counted else 'over ' + str(2 * Image.MAX_IMAGE_PIXELS)} "
                          f"pixels exceeds {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}") from None
        except UnidentifiedImageError:
            raise invalid(f"{where}.images[{i}]: not a picture in a format read here ({ACCEPTED})") from None
        except MemoryError:  # (the machine's, not the upload's)
            raise
        except Exception as error:  # noqa: BLE001 - a decoder's own failure on a malformed header is the upload's fault
            raise invalid(f"{where}.images[{i}]: not a decodable image ({type(error).__name__})") from None
        if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
            raise invalid(f"{where}.images[{i}]: image of {width}x{height} pixels exceeds {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}")
        pixels += width * height
        if pixels > MAX_LIST_PIXELS:  # (a small PNG of one colour decodes to tens of MB, in a fraction of a second each)
            raise invalid(f"{where}: the images up to images[{i}] hold {pixels} pixels, over the {MAX_LIST_PIXELS} one list may "
                          "decode to: send them smaller (the model sees them at its input size), or in several requests")
        blobs.append(blob)
    try:
        return preprocess_images(blobs, preprocessing, names=[f"{where}.images[{i}]" for i in range(len(blobs))])
    except (ValueError, TypeError, OSError, Image.DecompressionBombError) as error:
        raise invalid(str(error)[:300]) from None


def _array_from(value: Any, where: str, list_dtype: torch.dtype, expected: str) -> np.ndarray:
    """An array from either wire form: nested lists or ``{dtype, shape, base64}``.

    The checks below run in numpy: a request's labels or inputs are small, and on
    the event loop each torch call costs several times its numpy equivalent."""
    if isinstance(value, EncodedTensor):
        return _from_base64(value, where)
    if isinstance(value, list):
        return _from_lists(value, where, list_dtype)
    raise invalid(f"{where}: expected {expected}")


def _finite_float32(array: np.ndarray, where: str) -> torch.Tensor:
    """``array`` as a contiguous float32 tensor of its own, checked for NaN and infinities after the cast
    (a float64 value beyond float32's range becomes inf). Copied only when it must be: a base64 array
    is a read-only view of the request's bytes."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not array.flags.writeable:
        array = array.copy()
    if not np.isfinite(array).all():
        raise invalid(f"{where}: contains NaN or infinite values (or numbers beyond float32's range, about 3.4e38)", title="Non-finite values")
    return torch.from_numpy(array)


def uint8_as_trained(array: np.ndarray, preprocessing: dict | None) -> np.ndarray:
    """uint8 values (pixels, a .npz's bytes) mapped to the model's input as its training data's were: divided
    by 255 (and inverted, for images whose preprocessing inverts); unchanged for a model whose training
    data had no such mapping (floats, or no record)."""
    kind = (preprocessing or {}).get("kind")
    if kind == "image":
        scaled = array.astype(np.float32) / np.float32(255.0)
        return np.float32(1.0) - scaled if preprocessing.get("invert", True) else scaled
    if kind == "array" and preprocessing.get("scale") == "divide_255":
        return array.astype(np.float32) / np.float32(255.0)
    return array


def _check_count(count: int, where: str, max_count: int) -> None:
    if count > max_count:
        raise Problem(422, "Too many examples", f"{where}: {count} examples, the limit is {max_count}")


def decode_inputs(value: Any, where: str, input_shape: tuple[int, ...], preprocessing: dict | None, max_count: int) -> torch.Tensor:
    """A float32 tensor ``[N, *input_shape]`` with ``1 <= N <= max_count`` and finite values.

    ``preprocessing``: the model's record of how its training data became its input. Pictures go through
    it whole; a uint8 tensor gets its value mapping (:func:`uint8_as_trained`); other numbers go as they are."""
    if isinstance(value, ImageList):
        array = _from_images(value, where, preprocessing, max_count).numpy()
    else:
        if isinstance(value, list) and value and isinstance(value[0], list):  # (counted before the numbers are read;
            _check_count(len(value), where, max_count)                      # a flat list is a shape error, below)
        _refuse_booleans(value, where, "an input value", "Invalid tensor")
        array = _array_from(value, where, torch.float32, "nested lists, {dtype, shape, base64} or {images}")
        if isinstance(value, EncodedTensor) and value.dtype == "uint8":
            array = uint8_as_trained(array, preprocessing)
    expected = (len(input_shape) + 1, list(input_shape))
    if array.ndim != expected[0] or list(array.shape[1:]) != expected[1]:
        raise invalid(
            f"{where}: expected shape [N, {', '.join(map(str, input_shape))}] (rank {expected[0]}) for this model, "
            f"got {list(array.shape)} (rank {array.ndim})",
            title="Wrong tensor shape",
        )
    count = array.shape[0]
    if count == 0:
        raise invalid(f"{where}: no examples (N = 0)", title="Empty input")
    _check_count(count, where, max_count)
    return _finite_float32(array, where)


def _refuse_booleans(value: Any, where: str, what: str, title: str) -> None:
    """``true``/``false`` in nested lists (a client's ``label === "cat"``) would be read as 1 and 0. Each list's
    element types are collected in C (``map(type, ...)``): 0.15 ms for 5 Conv4 pictures sent as lists (torch reads
    them in 0.28), and lists are the slow form anyway (fast clients send base64)."""
    pending = [value] if isinstance(value, list) else []
    while pending:
        items = pending.pop()
        types = set(map(type, items))
        if bool in types:
            raise invalid(f"{where}: true/false is not {what}: send numbers", title=title)
        if list in types:
            pending.extend(item for item in items if type(item) is list)


def decode_labels(value: Any, where: str, count: int, n_way: int) -> torch.Tensor:
    """Class indices ``[count]`` (int64) in ``[0, n_way)`` covering every class."""
    _refuse_booleans(value, where, "a class index", "Invalid labels")
    array = _array_from(value, where, torch.float64, "a list of class indices or {dtype, shape, base64}")
    if array.ndim != 1:
        raise invalid(f"{where}: expected a flat list of {count} class indices, got shape {list(array.shape)}", title="Wrong tensor shape")
    if array.shape[0] != count:
        raise invalid(f"{where}: {array.shape[0]} labels for {count} inputs", title="Wrong tensor shape")
    as_float = array.astype(np.float64, copy=False)
    if not np.isfinite(as_float).all() or not np.array_equal(as_float, np.round(as_float)):
        raise invalid(f"{where}: labels must be integer class indices", title="Invalid labels")
    outside = (as_float < 0) | (as_float >= n_way)
    if outside.any():
        bad = as_float[outside][0]
        raise invalid(f"{where}: label {bad:.0f} is outside [0, {n_way}) for this {n_way}-way model", title="Invalid labels")  # an integer
    labels = as_float.astype(np.int64)
    missing = sorted(set(range(n_way)) - set(labels.tolist()))
    if missing:
        raise invalid(f"{where}: class(es) {missing} have no support example; every one of the {n_way} classes needs at least one", title="Invalid labels")
    return torch.from_numpy(labels)


def decode_targets(value: Any, where: str, count: int, out_features: int) -> torch.Tensor:
    """Regression targets ``[count, out_features]`` (``[count]`` accepted when out_features is 1)."""
    _refuse_booleans(value, where, "a target", "Invalid tensor")
    array = _array_from(value, where, torch.float32, "nested lists of targets or {dtype, shape, base64}")
    sent = list(array.shape)
    if array.ndim == 1 and out_features == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[1] != out_features or array.shape[0] != count:
        accepted = f"[{count}, {out_features}]" + (f" or [{count}]" if out_features == 1 else "")
        raise invalid(f"{where}: expected targets of shape {accepted} for {count} inputs, got {sent}", title="Wrong tensor shape")
    return _finite_float32(array, where)
