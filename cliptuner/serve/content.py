"""What to embed for one item (a doc of the service, a stored doc): its image if it has one, else its text.

An item carries text, or an image given as a ``tensor`` (``H×W×3`` uint8: the array rule of
:func:`cliptuner.model.images.check_array_image`), a ``blob`` (an encoded image file) or a ``uri`` (a ``data:`` URI, a
local path or ``file://`` URI, or an ``http(s)://`` URL), or both text and image (a pair). A pair is embedded by
its image: in a gallery the image is what a caption searches for, and a query pair is an image query that
carries its caption. Send the text as its own item to embed the text.

:func:`image_source` checks an item's image fields cheaply (shape and type, size, whether the uri is allowed)
and returns something :func:`cliptuner.model.images.decode_image` takes, or a :class:`cliptuner.serve.access.RemoteImage`
that :func:`embed_items` fetches when it needs it; decoding happens later, one minibatch at a time, with the size
limits of :mod:`cliptuner.model.images`. :func:`embed_items` embeds a mixed list with one model. Torch-free.

Which uris may be read is the :class:`cliptuner.serve.access.UriPolicy` given (default deny: without one, only
``data:`` URIs): local paths only under its roots (symlinks resolved first), http(s) only for its hosts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from cliptuner.model.images import DEFAULT_LIMITS, ImageLimits, ImageSource, check_array_image
from cliptuner.serve.access import DATA_ONLY, RemoteImage, UriPolicy

_MAX_URI_CHARS = 4 * DEFAULT_LIMITS.max_bytes // 3 + 1024  # a data: URI of the largest accepted file
_REMOTE_CHUNK = 32  # images fetched and embedded at a time when some are remote (bounds the bodies held)


@dataclass(frozen=True)
class Item:
    """One thing to embed: its image source (wins when present) or its text."""

    name: str  # how errors name it: "doc 'abc'"
    image: Optional[Union[ImageSource, RemoteImage]] = None
    text: Optional[str] = None


def image_source(
    name: str,
    tensor: Any = None,
    blob: Optional[bytes] = None,
    uri: Optional[str] = None,
    policy: UriPolicy = DATA_ONLY,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> Optional[Union[ImageSource, RemoteImage]]:
    """The image of an item, checked but not decoded (nor fetched); None when it has none.

    ``tensor`` wins over ``blob``, which wins over ``uri``.

    Args:
        name: how errors name the item (``"doc 'abc'"``).
        tensor: an ``H×W×3`` uint8 array (:func:`cliptuner.model.images.check_array_image`).
        blob: an encoded image file (PNG, JPEG…).
        uri: a ``data:`` URI, a local path, a ``file://`` URI or an ``http(s)://`` URL.
        policy: which uris may be read (default: ``data:`` only).
        limits: size limits (the sides and pixel count of a tensor, the byte size of a blob, a data URI or an
            http(s) body).

    Returns:
        The tensor, the blob's bytes, a data URI's bytes, a local file's resolved path (``str``), or a
        :class:`cliptuner.serve.access.RemoteImage`.

    Raises:
        cliptuner.model.images.ImageError: a tensor that breaks the array rule (a ``ValueError``).
        cliptuner.serve.access.UriRefused: a uri the policy does not allow (one message, no server path).
        ValueError: an empty or oversized blob, or a malformed or oversized data URI.
        Every message starts with ``name``.
    """
    if tensor is not None:
        return check_array_image(tensor, limits, f"{name}: tensor")
    if blob is not None:
        if len(blob) == 0:
            raise ValueError(f"{name}: blob is empty")
        if len(blob) > limits.max_bytes:
            raise ValueError(f"{name}: blob is {len(blob)} bytes, over the limit of {limits.max_bytes}")
        return bytes(blob)
    if uri:
        if len(uri) > _MAX_URI_CHARS:
            raise ValueError(f"{name}: uri is {len(uri)} characters long, over the limit of {_MAX_URI_CHARS}")
        return policy.source(uri, name, limits.max_bytes)
    return None


def make_item(
    name: str,
    text: Optional[str] = None,
    tensor: Any = None,
    blob: Optional[bytes] = None,
    uri: Optional[str] = None,
    policy: UriPolicy = DATA_ONLY,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> Item:
    """An :class:`Item` from an item's fields, refusing one with neither text nor image.

    Raises:
        ValueError: no content, or a bad or refused image field (see :func:`image_source`) — names the item.
    """
    image = image_source(name, tensor, blob, uri, policy, limits)
    if image is None:
        if text is None or not str(text).strip():
            raise ValueError(f"{name}: has neither text nor an image (blob, uri or tensor); nothing to embed")
        return Item(name=name, text=str(text))
    return Item(name=name, image=image)


def embed_items(clip: Any, items: Sequence[Item]) -> np.ndarray:
    """Embed items of mixed kinds with one model, in the items' order.

    Remote images (:class:`cliptuner.serve.access.RemoteImage`) are fetched a few at a time, just before they are
    embedded, so that the bodies held at once stay bounded.

    Args:
        clip: an :class:`cliptuner.model.runtime.OnnxClip` (``encode_text``, ``encode_images``, ``embed_dim``).
        items: what to embed.

    Returns:
        L2-normalised float32 ``[len(items), embed_dim]``.

    Raises:
        cliptuner.model.images.ImageError: an image cannot be decoded or is over the limits (names the item).
        cliptuner.serve.access.FetchError: a remote image cannot be fetched (names the item).
    """
    out = np.empty((len(items), clip.embed_dim), dtype=np.float32)  # [N, embed_dim]
    image_rows = [i for i, item in enumerate(items) if item.image is not None]
    text_rows = [i for i, item in enumerate(items) if item.image is None]
    remote = any(isinstance(items[i].image, RemoteImage) for i in image_rows)
    step = _REMOTE_CHUNK if remote else max(1, len(image_rows))
    for start in range(0, len(image_rows), step):
        rows = image_rows[start : start + step]
        out[rows] = clip.encode_images(
            [readable(items[i].image, items[i].name) for i in rows], names=[items[i].name for i in rows]
        )
    if text_rows:
        out[text_rows] = clip.encode_text([items[i].text for i in text_rows])
    return out


def readable(image: Union[ImageSource, RemoteImage], name: str) -> ImageSource:
    """``image`` as :func:`cliptuner.model.images.decode_image` takes it: a remote image is fetched, the rest kept.

    Raises:
        cliptuner.serve.access.FetchError: a remote image cannot be fetched (names the item).
    """
    return image.read(name) if isinstance(image, RemoteImage) else image
