"""The content of a :class:`~executors.schemas.ClipDoc`: whether it has any, what to embed for it, and whether a
request of docs is within the limits.

The rules themselves (a pair is embedded by its image; ``tensor`` wins over ``blob``, which wins over ``uri``; the
array rule; which uris may be read; the request limits) are the core's, in :mod:`cliptuner.content`,
:mod:`cliptuner.access` and :mod:`cliptuner.limits`; this module only reads a doc's fields into them, the same way
for every Executor.
"""

from typing import Optional, Sequence

from cliptuner.access import UriPolicy
from cliptuner.content import Item, make_item
from cliptuner.limits import RequestLimits

from .schemas import ClipDoc


def doc_item(doc: ClipDoc, policy: UriPolicy, limits: RequestLimits) -> Item:
    """What to embed for a doc (its image, else its text); a ``uri`` is checked against ``policy``, not fetched.

    Raises:
        ValueError: no content, or a bad tensor/blob/uri, or a uri the policy refuses (names the doc id).
    """
    return make_item(f"doc {doc.id!r}", text=doc.text, tensor=doc.tensor, blob=doc.blob, uri=doc.uri,
                     policy=policy, limits=limits.image_limits)


def has_content(doc: ClipDoc) -> bool:
    """True when the doc has text or an image field to embed."""
    return bool(doc.text and doc.text.strip()) or doc.tensor is not None or doc.blob is not None or bool(doc.uri)


def check_request(docs: Sequence[ClipDoc], limits: RequestLimits, what: str = "docs", limit: Optional[int] = None,
                  hint: str = "") -> int:
    """Refuse a request over the limits before anything in it is decoded or tokenized.

    Args:
        docs: the request's docs.
        limits: the Executor's limits.
        what: what they are, for the message (``"docs"``, ``"pairs"``).
        limit: the most docs allowed (default ``limits.max_docs``).
        hint: appended to the count message (what to do instead).

    Returns:
        The bytes the request carries (blobs, tensors, uris), for a caller that adds what it fetches.

    Raises:
        ValueError: too many docs, a text too long or a blob too big (names the doc), or more bytes in all than
            ``limits.max_request_bytes``.
    """
    limits.check_count(len(docs), what, limit, hint)
    total = 0
    for doc in docs:
        total += limits.content_bytes(f"doc {doc.id!r}", text=doc.text, blob=doc.blob, tensor=doc.tensor,
                                      uri=doc.uri)
        limits.check_total(total)
    return total
