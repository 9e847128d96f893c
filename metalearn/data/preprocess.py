"""Image preprocessing shared by the dataset loaders and the inference service.

Training data and uploaded images must go through *exactly* the same steps,
otherwise a model adapted on uploads sees a different input distribution than
it was meta-trained on. So there is one function, :func:`preprocess_images`,
driven by a JSON-able ``preprocessing`` dict that every image source exposes
(``source.preprocessing``) and that a checkpoint can store::

    prep = source.preprocessing        # e.g. OMNIGLOT_PREPROCESSING
    x = preprocess_images([png_bytes_1, png_bytes_2], prep)   # [2, 1, 28, 28]

Steps, in order: decode (PIL) -> apply EXIF orientation -> flatten any alpha
channel (RGBA, LA, PA, a palette's transparency) onto white; a grey or RGB
picture's colour-key transparency (a PNG's ``transparency=`` colour) is not
applied: those pixels keep their colour -> grayscale ("L"), or RGB with ``grayscale`` false -> resize
to ``size`` (``[height, width]``) with ``resample`` -> scale to [0, 1] -> optionally invert
(so dark strokes on light paper become 1.0 on 0.0).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

ImageInput = Union[bytes, bytearray, memoryview, Image.Image, str, os.PathLike]

# The picture formats read (Pillow's names; JPEG's covers cameras' multi-picture MPO files). Pillow opens many more, but
# its rarer plugins fail on malformed files with exceptions of their own (DDS, BLP, SPIDER), and EPS runs
# Ghostscript: uploads are untrusted bytes.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
ACCEPTED = ", ".join(IMAGE_FORMATS)  # (for messages)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

# LANCZOS is what the original MAML code used to shrink Omniglot's 105x105
# drawings to 28x28 (Pillow's filters antialias when downsampling).
OMNIGLOT_PREPROCESSING: dict[str, Any] = {
    "kind": "image",
    "size": [28, 28],
    "grayscale": True,
    "alpha": "composite_white",
    "invert": True,
    "scale": "0-1",
    "resample": "lanczos",
}


def image_preprocessing(
    size: int | Sequence[int] = 28, invert: bool = True, resample: str = "lanczos", grayscale: bool = True
) -> dict[str, Any]:
    """Build (and validate) a preprocessing dict, e.g. ``image_preprocessing(32, invert=False)``;
    ``grayscale=False`` keeps colour (3 channels, RGB)."""
    if isinstance(size, int):
        size = [size, size]
    prep = dict(OMNIGLOT_PREPROCESSING, size=[int(s) for s in size], invert=bool(invert), resample=resample, grayscale=bool(grayscale))
    _validate(prep)
    return prep


def channels(prep: dict[str, Any]) -> int:
    """Channels of the inputs ``prep`` makes: 1 (grey) or 3 (RGB)."""
    return 1 if prep.get("grayscale", True) else 3


def _validate(prep: dict[str, Any]) -> tuple[tuple[int, int], bool, Image.Resampling]:
    if prep.get("kind") != "image":
        raise ValueError(
            f"preprocess_images needs an image preprocessing dict (kind='image'), got kind={prep.get('kind')!r}"
        )
    size = prep.get("size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise ValueError(f"preprocessing 'size' must be [height, width] positive ints, got {size!r}")
    if not isinstance(prep.get("grayscale", True), bool) or prep.get("scale", "0-1") != "0-1":
        raise ValueError(f"only images scaled to 0-1, grey (grayscale true) or RGB (false), are supported, got {prep!r}")
    if prep.get("alpha", "composite_white") != "composite_white":
        raise ValueError(f"unsupported alpha handling {prep.get('alpha')!r}")
    resample = prep.get("resample", "lanczos")
    if resample not in _RESAMPLE:
        raise ValueError(f"unknown resample {resample!r}; expected one of {sorted(_RESAMPLE)}")
    return (size[0], size[1]), bool(prep.get("invert", True)), _RESAMPLE[resample]


def _open(item: ImageInput) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(item), formats=IMAGE_FORMATS)
    elif isinstance(item, (str, os.PathLike)):
        img = Image.open(item, formats=IMAGE_FORMATS)
    else:
        raise TypeError(f"expected image bytes, a PIL image or a path, got {type(item).__name__}")
    img.load()  # decode now, so errors surface here with the item's name
    return img


# Pictures of more than 8 bits a pixel (16-bit scans and sensors; Pillow's 32-bit "I" holds 16-bit PNGs too).
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _decode(img: Image.Image, grayscale: bool) -> tuple[Image.Image, float]:
    """The picture in grey (or RGB), and its white value: 255, or 65535 for 16-bit pictures (kept as floats:
    ``convert("L")`` would clip every value above 255 to white; a 16-bit picture is grey)."""
    if img.mode in _WIDE_MODES:
        return ImageOps.exif_transpose(img).convert("F"), 65535.0
    if img.mode == "F":
        raise ValueError("32-bit float pictures have no fixed white point: save them as 8- or 16-bit images")
    img = ImageOps.exif_transpose(img)  # phone photos store rotation in EXIF
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # A drawing exported from an HTML canvas is typically black strokes on
        # a *transparent* background; a plain convert("L") would turn the
        # transparent (0,0,0,0) pixels black and erase the drawing.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("L" if grayscale else "RGB"), 255.0


def undecodable(failures: list[tuple[int, str]]) -> str:
    """The reasons of ``(index, reason)`` failures, the first ten (every bad file at once: with many pictures,
    finding them one run at a time costs a decode each)."""
    more = f" (and {len(failures) - 10} more)" if len(failures) > 10 else ""
    return "; ".join(reason for _, reason in failures[:10]) + more


def preprocess_images(
    images: Sequence[ImageInput],
    preprocessing: dict[str, Any] | None = None,
    *,
    names: Sequence[str] | None = None,
    failed: list[tuple[int, str]] | None = None,
) -> Tensor:
    """Decode and normalise images exactly as the training data was.

    ``images``: PNG/JPEG/... bytes (e.g. base64-decoded uploads), PIL images or
    file paths. ``preprocessing``: a source's ``preprocessing`` dict (default:
    :data:`OMNIGLOT_PREPROCESSING`). ``names`` label the items in error messages.

    Returns float32 ``[N, 1, height, width]`` in [0, 1] (``[N, 3, ...]`` RGB with ``grayscale`` false). Raises ``ValueError``
    naming every item that cannot be decoded; with a ``failed`` list, appends ``(index, reason)`` to it
    instead and leaves those rows zero (for a caller that drops them).

    Example::

        x = preprocess_images([base64.b64decode(s) for s in uploads], model_card["preprocessing"])
    """
    prep = OMNIGLOT_PREPROCESSING if preprocessing is None else preprocessing
    (height, width), invert, resample = _validate(prep)
    grayscale = channels(prep) == 1
    out = np.zeros((len(images), channels(prep), height, width), dtype=np.float32)  # (a failed row stays 0)
    failures = [] if failed is None else failed
    for i in range(len(images)):  # (by index: ``images`` may read each file only when asked for it)
        label = names[i] if names is not None else f"image #{i}"
        try:
            img, white = _decode(_open(images[i]), grayscale)
        except UnidentifiedImageError:
            failures.append((i, f"{label}: cannot decode image: not a picture in a format read here ({ACCEPTED})"))
        except (OSError, SyntaxError, ValueError) as e:
            failures.append((i, f"{label}: cannot decode image ({e})"))
        except Image.DecompressionBombError as e:  # (not an OSError: it would go up as a traceback)
            failures.append((i, f"{label}: image too large to decode ({e})"))
        except MemoryError:  # (the machine's, not the file's)
            raise
        except Exception as e:  # noqa: BLE001 - a decoder's own failure on a malformed file is the file's fault
            failures.append((i, f"{label}: cannot decode image ({type(e).__name__}: {e})"))
        else:
            # PIL sizes are (width, height).
            img = img.resize((width, height), resample)
            pixels = np.asarray(img, dtype=np.float32) / white  # [H, W], or [H, W, 3]
            out[i] = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (a 16-bit grey picture fills every channel)
    if failures and failed is None:
        raise ValueError(f"{len(failures)} picture(s) cannot be used; fix or remove them: {undecodable(failures)}")
    if invert:
        np.subtract(1.0, out, out=out)
    return torch.from_numpy(out)
