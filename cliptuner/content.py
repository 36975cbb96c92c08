"""What to embed for one item (a doc of the service, a stored doc): its image if it has one, else its text.

An item carries text, or an image given as a ``tensor`` (``H×W×3`` uint8: the array rule of
:func:`cliptuner.images.check_array_image`), a ``blob`` (an encoded image file) or a ``uri`` (a local path,
``file://`` path, or ``data:`` URI, base64 or percent-encoded), or both text and image (a pair). A pair is
embedded by its image: in a gallery the image is what a caption searches for, and a query pair is an image
query that carries its caption. Send the text as its own item to embed the text.

:func:`image_source` checks an item's image fields cheaply (shape and type, path containment) and returns
something :func:`cliptuner.images.decode_image` takes; decoding happens later, one minibatch at a time, with
the size limits of :mod:`cliptuner.images`. :func:`embed_items` embeds a mixed list with one model. Torch-free.

Local paths: with a ``uri_root``, a relative path is taken from it and every path is resolved (``..`` and
symlinks followed) before it must lie under the resolved root, so neither ``..`` nor a symlink placed inside the
root can reach a file outside it; the resolved path is what gets read.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import unquote, unquote_to_bytes, urlparse

import numpy as np

from .images import DEFAULT_LIMITS, ImageLimits, ImageSource, check_array_image

_MAX_URI_CHARS = 4 * DEFAULT_LIMITS.max_bytes // 3 + 1024  # a data: URI of the largest accepted file


@dataclass(frozen=True)
class Item:
    """One thing to embed: its image source (wins when present) or its text."""

    name: str  # how errors name it: "doc 'abc'"
    image: Optional[ImageSource] = None
    text: Optional[str] = None


def _data_uri(uri: str, name: str, limits: ImageLimits) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise ValueError(f"{name}: malformed data URI (no ',')")
    if len(payload) > 4 * limits.max_bytes // 3 + 4:
        raise ValueError(f"{name}: data URI is over the limit of {limits.max_bytes} bytes")
    if header.lower().endswith(";base64"):
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"{name}: data URI is not valid base64 ({exc})") from None
    else:
        data = unquote_to_bytes(payload)  # percent-encoded bytes, not text
    if not data:
        raise ValueError(f"{name}: data URI holds no data")
    if len(data) > limits.max_bytes:
        raise ValueError(f"{name}: data URI holds {len(data)} bytes, over the limit of {limits.max_bytes}")
    return data


def _local_path(uri: str, name: str, uri_root: Optional[Path]) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme.lower() == "file":
        if parsed.netloc not in ("", "localhost"):  # file://images/a.png would silently read /a.png
            raise ValueError(f"{name}: file URI {uri!r} names host {parsed.netloc!r}; write file:///absolute/path")
        path = Path(unquote(parsed.path))
    else:
        scheme = parsed.scheme
        if scheme and len(scheme) > 1:  # not a Windows drive letter
            raise ValueError(f"{name}: uri scheme {scheme!r} is not supported; give a local path, a file:// path or "
                             "a data: URI (or send the image as blob or tensor)")
        path = Path(uri).expanduser()
    if uri_root is not None:
        resolved = (uri_root / path).resolve()  # an absolute path replaces the root; symlinks and .. followed
        if not resolved.is_relative_to(uri_root):
            raise ValueError(f"{name}: uri {uri!r} is outside the allowed folder")  # the folder is not disclosed
        return resolved
    return path


def image_source(name: str, tensor: Any = None, blob: Optional[bytes] = None, uri: Optional[str] = None,
                 uri_root: Optional[str | os.PathLike] = None,
                 limits: ImageLimits = DEFAULT_LIMITS) -> Optional[ImageSource]:
    """The image of an item, checked but not decoded; None when it has none.

    ``tensor`` wins over ``blob``, which wins over ``uri``.

    Args:
        name: how errors name the item (``"doc 'abc'"``).
        tensor: an ``H×W×3`` uint8 array (:func:`cliptuner.images.check_array_image`).
        blob: an encoded image file (PNG, JPEG…).
        uri: a local path, a ``file://`` URI or a ``data:`` URI.
        uri_root: when set, local paths must lie under it (relative ones are taken from it).
        limits: size limits (the sides and pixel count of a tensor, the byte size of a data URI).

    Raises:
        cliptuner.images.ImageError: a tensor that breaks the array rule (a ``ValueError``).
        ValueError: an empty blob, an unsupported or malformed URI, or a path outside ``uri_root``.
        Every message starts with ``name``.
    """
    if tensor is not None:
        return check_array_image(tensor, limits, f"{name}: tensor")
    if blob is not None:
        if len(blob) == 0:
            raise ValueError(f"{name}: blob is empty")
        return bytes(blob)
    if uri:
        if len(uri) > _MAX_URI_CHARS:
            raise ValueError(f"{name}: uri is {len(uri)} characters long, over the limit of {_MAX_URI_CHARS}")
        if uri.startswith("data:"):
            return _data_uri(uri, name, limits)
        root = None if uri_root is None else Path(uri_root).expanduser().resolve()
        return str(_local_path(uri, name, root))
    return None


def make_item(name: str, text: Optional[str] = None, tensor: Any = None, blob: Optional[bytes] = None,
              uri: Optional[str] = None, uri_root: Optional[str | os.PathLike] = None,
              limits: ImageLimits = DEFAULT_LIMITS) -> Item:
    """An :class:`Item` from an item's fields, refusing one with neither text nor image.

    Raises:
        ValueError: no content, or a bad image field (see :func:`image_source`) — names the item.
    """
    image = image_source(name, tensor, blob, uri, uri_root, limits)
    if image is None:
        if text is None or not str(text).strip():
            raise ValueError(f"{name}: has neither text nor an image (blob, uri or tensor); nothing to embed")
        return Item(name=name, text=str(text))
    return Item(name=name, image=image)


def embed_items(clip: Any, items: Sequence[Item]) -> np.ndarray:
    """Embed items of mixed kinds with one model, in the items' order.

    Args:
        clip: an :class:`cliptuner.runtime.OnnxClip` (``encode_text``, ``encode_images``, ``embed_dim``).
        items: what to embed.

    Returns:
        L2-normalised float32 ``[len(items), embed_dim]``.

    Raises:
        cliptuner.images.ImageError: an image cannot be decoded or is over the limits (names the item).
    """
    out = np.empty((len(items), clip.embed_dim), dtype=np.float32)  # [N, embed_dim]
    image_rows = [i for i, item in enumerate(items) if item.image is not None]
    text_rows = [i for i, item in enumerate(items) if item.image is None]
    if image_rows:
        out[image_rows] = clip.encode_images([items[i].image for i in image_rows],
                                             names=[items[i].name for i in image_rows])
    if text_rows:
        out[text_rows] = clip.encode_text([items[i].text for i in text_rows])
    return out
