"""Image decoding with limits, and CLIP preprocessing in numpy/PIL (no torch).

Images arrive as a file path, encoded bytes, a PIL image or an array. Every decode is guarded before pixels
are allocated: a file larger than ``max_bytes`` or a header that announces more than ``max_pixels`` is refused
with an :class:`ImageError` that names the item, so a decompression bomb cannot take a process down.

The one rule for array images (a ``tensor`` of a request, an array handed to the library), checked by
:func:`check_array_image` wherever an array enters: an RGB image of shape ``H×W×3`` and dtype ``uint8``, each
side at least ``min_side`` and ``H*W`` at most ``max_pixels``. Nothing else is converted silently: a grayscale
``H×W`` array, an ``H×W×4`` RGBA array, a ``3×H×W`` (channels-first) array or floats (whose range — [0, 1] or
[0, 255] — and NaN/inf cannot be guessed safely) are refused with an error that names the item, the shape, the
dtype and this rule; convert them first (``np.stack([g] * 3, -1)``, ``rgba[..., :3]``,
``np.round(x * 255).astype(np.uint8)``), or send the encoded file instead.

:func:`preprocess` reproduces OpenCLIP's evaluation transform (resize per the model's resize mode — the shortest
side and a centre crop for CLIP, a squash to a square for SigLIP, the longest side and padding — with the model's
filter, scale to [0, 1], normalise by mean/std) so the ONNX runtime sees what torch saw.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Image.Image]

_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


class ImageError(ValueError):
    """An image could not be used: unreadable, too large, or of the wrong shape."""


@dataclass(frozen=True)
class ImageLimits:
    """Upper bounds checked before an image is decoded."""

    max_bytes: int = 32 * 1024 * 1024  # largest encoded file accepted
    max_pixels: int = 40_000_000  # largest width*height accepted (PIL's own bomb limit is ~179M)
    min_side: int = 1  # smallest width or height accepted

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1 or self.min_side < 1:
            raise ValueError(f"image limits must be positive, got {self}")


DEFAULT_LIMITS = ImageLimits()

ARRAY_IMAGE_RULE = "an H×W×3 uint8 image"  # RGB, height × width × 3 channels of 0–255


def _array_hint(array: np.ndarray) -> str:
    """How to turn a refused array into an accepted one, for the common cases."""
    if array.ndim == 2:
        return "; a grayscale image: stack it to 3 channels"
    if array.ndim == 3 and array.shape[2] == 4:
        return "; an RGBA image: drop the alpha channel (array[..., :3])"
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3):
        return "; channels first: transpose it to H×W×3"
    if np.issubdtype(array.dtype, np.floating):
        return "; floats: scale to 0–255 and convert to uint8"
    return ""


def check_array_image(array: Any, limits: ImageLimits = DEFAULT_LIMITS, name: str = "array") -> np.ndarray:
    """The one check of an array image (see the module docstring): ``H×W×3`` uint8 within ``limits``.

    Cheap (shape and dtype only, no pixel is read), so it runs when a request arrives as well as before decoding.

    Args:
        array: the candidate image (anything ``np.asarray`` takes).
        limits: the side and pixel-count limits.
        name: how errors name it, e.g. ``"doc 'abc': tensor"``.

    Returns:
        The array as an ``np.ndarray`` (not copied when it already is one).

    Raises:
        ImageError: not an array, wrong rank or channel count, a dtype other than uint8, a side under
            ``limits.min_side``, or more than ``limits.max_pixels`` pixels; the message names the item, its
            shape and dtype, and the rule.
    """
    try:
        array = np.asarray(array)
    except (TypeError, ValueError) as exc:
        raise ImageError(f"{name} must be {ARRAY_IMAGE_RULE}, got something that is not an array ({exc})") from None
    got = f"got shape {tuple(array.shape)} dtype {array.dtype}"
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ImageError(f"{name} must be {ARRAY_IMAGE_RULE}, {got}{_array_hint(array)}")
    height, width = int(array.shape[0]), int(array.shape[1])
    if min(height, width) < limits.min_side:
        raise ImageError(f"{name} must be {ARRAY_IMAGE_RULE} with sides of at least {limits.min_side} pixels, {got}")
    if height * width > limits.max_pixels:
        raise ImageError(
            f"{name}: {height}x{width} = {height * width} pixels is over the limit of {limits.max_pixels} ({got})"
        )
    return array


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return repr(str(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {source.shape} {source.dtype}>"
    return f"<{type(source).__name__}>"


def decode_image(source: ImageSource, limits: ImageLimits = DEFAULT_LIMITS, name: str | None = None) -> Image.Image:
    """Decode one image into an RGB PIL image, refusing anything over ``limits``.

    Args:
        source: a path, encoded bytes, an ``H×W×3`` uint8 array (:func:`check_array_image`), or a PIL image.
        limits: size limits checked before decoding.
        name: how to name the item in errors (a row, a doc id); defaults to a description of ``source``.

    Returns:
        An RGB ``PIL.Image.Image``.

    Raises:
        ImageError: the source is missing, unreadable, too large, or an array of the wrong shape or type.
    """
    label = name or _describe(source)
    if isinstance(source, Image.Image):
        _check_size(source.width, source.height, limits, label)
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        array = check_array_image(source, limits, f"image {label}: array")
        return Image.fromarray(np.ascontiguousarray(array))  # H×W×3 uint8 is RGB
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > limits.max_bytes:
            raise ImageError(f"image {label}: {len(data)} bytes is over the limit of {limits.max_bytes}")
        if not data:
            raise ImageError(f"image {label}: empty bytes")
        return _open(io.BytesIO(data), limits, label)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"image {label}: no such file")
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ImageError(f"image {label}: {size} bytes is over the limit of {limits.max_bytes}")
        with path.open("rb") as fh:
            return _open(io.BytesIO(fh.read()), limits, label)
    raise ImageError(
        f"image {label}: unsupported type {type(source).__name__}; "
        "give a path, encoded bytes, an H×W×3 uint8 array or a PIL image"
    )


def _check_size(width: int, height: int, limits: ImageLimits, label: str) -> None:
    if width * height > limits.max_pixels:
        raise ImageError(
            f"image {label}: {width}x{height} = {width * height} pixels is over the limit of {limits.max_pixels}"
        )
    if min(width, height) < limits.min_side:
        raise ImageError(f"image {label}: {width}x{height} is smaller than {limits.min_side} pixels on a side")


_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def _open(buffer: io.BytesIO, limits: ImageLimits, label: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(buffer)  # reads the header only
            _check_size(image.width, image.height, limits, label)
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image {label}: refused as a decompression bomb ({exc})") from exc
    except Exception as exc:  # PIL raises many types for corrupt data
        reason = _BUFFER_REPR.sub("", str(exc)).strip()  # "cannot identify image file <_io.BytesIO object at 0x…>"
        raise ImageError(f"image {label}: cannot decode ({type(exc).__name__}: {reason})") from exc
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Resize the shortest side to ``size`` and centre-crop ``size × size`` (OpenCLIP's eval geometry)."""
    if interpolation not in _INTERPOLATION:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {interpolation!r}")
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), _INTERPOLATION[interpolation])
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


RESIZE_MODES = ("shortest", "squash", "longest")


def fit_image(
    image: Image.Image, size: int, interpolation: str = "bicubic", resize_mode: str = "shortest", fill_color: int = 0
) -> Image.Image:
    """``image`` brought to ``size × size`` as OpenCLIP's evaluation transform does for each resize mode.

    ``shortest`` (CLIP): resize the shortest side, centre crop. ``squash`` (SigLIP): resize both sides, the aspect
    ratio is not kept. ``longest``: resize the longest side, then pad the short side evenly with ``fill_color``.

    Raises:
        ValueError: an unknown resize mode or interpolation.
    """
    if resize_mode == "shortest":
        return resize_and_crop(image, size, interpolation)
    if interpolation not in _INTERPOLATION:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {interpolation!r}")
    if resize_mode == "squash":
        return image if image.size == (size, size) else image.resize((size, size), _INTERPOLATION[interpolation])
    if resize_mode == "longest":
        width, height = image.size
        ratio = max(width / size, height / size)
        new_w, new_h = round(width / ratio), round(height / ratio)  # OpenCLIP's ResizeKeepRatio(longest=1)
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), _INTERPOLATION[interpolation])
        if (new_w, new_h) == (size, size):
            return image
        canvas = Image.new("RGB", (size, size), (fill_color,) * 3)
        left, top = max(size - new_w, 0) // 2, max(size - new_h, 0) // 2
        canvas.paste(image.crop((0, 0, min(new_w, size), min(new_h, size))), (left, top))
        return canvas
    raise ValueError(f"resize_mode must be one of {list(RESIZE_MODES)}, got {resize_mode!r}")


def preprocess(
    images: Sequence[Image.Image],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    resize_mode: str = "shortest",
    fill_color: int = 0,
) -> np.ndarray:
    """Turn RGB PIL images into a normalised float32 batch (geometry: :func:`fit_image`).

    Returns:
        ``np.ndarray`` of shape ``[batch, 3, image_size, image_size]``, dtype float32.
    """
    mean_arr = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3)
    std_arr = np.asarray(std, dtype=np.float32).reshape(1, 1, 3)
    out = np.empty((len(images), 3, image_size, image_size), dtype=np.float32)
    for i, image in enumerate(images):
        fitted = fit_image(image, image_size, interpolation, resize_mode, fill_color)
        pixels = np.asarray(fitted, dtype=np.float32) / 255.0
        out[i] = ((pixels - mean_arr) / std_arr).transpose(2, 0, 1)  # [3, H, W]
    return out
