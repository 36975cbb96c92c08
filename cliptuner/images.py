"""Image decoding with limits, and CLIP preprocessing in numpy/PIL (no torch).

Images arrive as a file path, encoded bytes, a PIL image or an ``H×W×3`` uint8 array. Every decode is
guarded before pixels are allocated: a file larger than ``max_bytes`` or a header that announces more than
``max_pixels`` is refused with an :class:`ImageError` that names the item, so a decompression bomb cannot take
a process down.

:func:`preprocess` reproduces OpenCLIP's evaluation transform (resize the shortest side with bicubic
filtering, centre crop, scale to [0, 1], normalise by mean/std) so the ONNX runtime sees what torch saw.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

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
        source: a path, encoded bytes, an ``H×W×3`` (or ``H×W``) uint8 array, or a PIL image.
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
        return _from_array(source, limits, label)
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
    raise ImageError(f"image {label}: unsupported type {type(source).__name__}; "
                     "give a path, encoded bytes, an H×W×3 uint8 array or a PIL image")


def _check_size(width: int, height: int, limits: ImageLimits, label: str) -> None:
    if width * height > limits.max_pixels:
        raise ImageError(f"image {label}: {width}x{height} = {width * height} pixels is over the limit of "
                         f"{limits.max_pixels}")
    if min(width, height) < limits.min_side:
        raise ImageError(f"image {label}: {width}x{height} is smaller than {limits.min_side} pixels on a side")


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
        raise ImageError(f"image {label}: cannot decode ({type(exc).__name__}: {exc})") from exc
    return image.convert("RGB")


def _from_array(array: np.ndarray, limits: ImageLimits, label: str) -> Image.Image:
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ImageError(f"image {label}: array must be H×W×3 (or H×W×4, H×W), got shape {tuple(array.shape)}")
    _check_size(int(array.shape[1]), int(array.shape[0]), limits, label)
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and 0.0 <= float(array.min()) and float(array.max()) <= 1.0:
            array = np.round(array * 255.0).astype(np.uint8)
        else:
            raise ImageError(f"image {label}: array dtype must be uint8 (or float in [0, 1]), got {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array[..., :3]), mode="RGB")


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


def preprocess(
    images: Sequence[Image.Image],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
) -> np.ndarray:
    """Turn RGB PIL images into a normalised float32 batch.

    Returns:
        ``np.ndarray`` of shape ``[batch, 3, image_size, image_size]``, dtype float32.
    """
    mean_arr = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3)
    std_arr = np.asarray(std, dtype=np.float32).reshape(1, 1, 3)
    out = np.empty((len(images), 3, image_size, image_size), dtype=np.float32)
    for i, image in enumerate(images):
        pixels = np.asarray(resize_and_crop(image, image_size, interpolation), dtype=np.float32) / 255.0
        out[i] = ((pixels - mean_arr) / std_arr).transpose(2, 0, 1)  # [3, H, W]
    return out
