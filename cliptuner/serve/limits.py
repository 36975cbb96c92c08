"""Bounds on one request to the service, checked before anything in it is decoded or tokenized. Torch-free.

:class:`RequestLimits` is the one set of limits every Executor is configured with; each checks what applies to
it (the doc count of ``/encode``, ``/index`` and ``/search``, the pair count of ``/train``, the ``limit`` of a
search) and, for every doc, :meth:`RequestLimits.content_bytes`: its text length and the bytes of its image
fields, summed over the request. A refused request names the doc (or the parameter) and the limit; nothing of
it has been decoded, embedded or stored.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

import numpy as np

from cliptuner.model.images import DEFAULT_LIMITS, ImageLimits

MIB = 1024 * 1024


@dataclass(frozen=True)
class RequestLimits:
    """Upper bounds on one request."""

    max_docs: int = 1024  # docs in one /encode, /index or /search request
    max_pairs: int = 1_000_000  # pair docs in one /train request (bigger sets: a PAIRS file)
    max_text_chars: int = 10_000  # characters of one doc's text
    max_blob_bytes: int = DEFAULT_LIMITS.max_bytes  # one encoded image: a blob, a data: URI, an http(s) body
    max_request_bytes: int = 256 * MIB  # summed over a request's blobs, tensors and uris
    max_limit: int = 1000  # largest `limit` of a /search

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")
        if self.max_blob_bytes > self.max_request_bytes:
            raise ValueError(
                f"max_blob_bytes ({self.max_blob_bytes}) must not exceed max_request_bytes ({self.max_request_bytes})"
            )

    @property
    def image_limits(self) -> ImageLimits:
        """The image limits a request's images are checked with (``max_blob_bytes``, default pixel limits)."""
        return ImageLimits(max_bytes=self.max_blob_bytes)

    def check_count(self, count: int, what: str = "docs", limit: Optional[int] = None, hint: str = "") -> None:
        """Refuse more than ``limit`` (default ``max_docs``) items in one request.

        Raises:
            ValueError: ``"<count> <what> in one request is over the limit of <limit>"`` plus ``hint``.
        """
        limit = self.max_docs if limit is None else limit
        if count > limit:
            raise ValueError(f"{count} {what} in one request is over the limit of {limit}{hint}")

    def content_bytes(
        self,
        name: str,
        text: Optional[str] = None,
        blob: Optional[bytes] = None,
        tensor: Any = None,
        uri: Optional[str] = None,
    ) -> int:
        """Check one item's text and blob against the limits; the bytes it adds to the request.

        Cheap: lengths and shapes only (a ``data:`` URI counts as its length, the size of the bytes it encodes
        or more; a tensor as its ``nbytes``).

        Raises:
            ValueError: a text over ``max_text_chars`` or a blob over ``max_blob_bytes``; names the item and the
                length.
        """
        if text is not None and len(text) > self.max_text_chars:
            raise ValueError(f"{name}: text is {len(text)} characters long, over the limit of {self.max_text_chars}")
        size = 0
        if blob is not None:
            if len(blob) > self.max_blob_bytes:
                raise ValueError(f"{name}: blob is {len(blob)} bytes, over the limit of {self.max_blob_bytes}")
            size += len(blob)
        if tensor is not None:
            size += int(tensor.nbytes) if isinstance(tensor, np.ndarray) else int(np.asarray(tensor).nbytes)
        if uri:
            size += len(uri)
        return size

    def check_total(self, total: int, what: str = "request") -> None:
        """Refuse a request whose content adds up to more than ``max_request_bytes``.

        Raises:
            ValueError: names the running total and the limit.
        """
        if total > self.max_request_bytes:
            raise ValueError(
                f"the {what}'s blobs, tensors and uris add up to more than the limit of "
                f"{self.max_request_bytes} bytes (at least {total}); send fewer docs per request"
            )
