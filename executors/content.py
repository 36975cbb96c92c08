"""The content of a :class:`~executors.schemas.ClipDoc`: whether it has any, what to embed for it, and whether a
request of docs is within the limits.

The rules themselves (a pair is embedded by its image; ``tensor`` wins over ``blob``, which wins over ``uri``; the
array rule; which uris may be read; the request limits) are the core's, in :mod:`cliptuner.serve.content`,
:mod:`cliptuner.serve.access` and :mod:`cliptuner.serve.limits`; this module only reads a doc's fields into them, the same way
for every Executor.

docarray's standard names are read as ClipDoc's (:data:`STANDARD_NAMES`): ``url`` as ``uri`` and ``bytes_`` as
``blob``, under the same rules and limits, so that a client's ``ImageDoc``/``TextDoc`` is served like a
``ClipDoc``. A doc that gives both names with different values is refused, naming it; errors about a value read
from a standard name say so (``doc 'x' (url): uri is not allowed: ...``). A ``TextDoc``'s ``url`` is read as an
image too: the service does not fetch text files, so send the text itself in ``text``.
"""

from collections.abc import Callable, Sequence
from typing import Any, Optional

from cliptuner.serve.access import UriPolicy
from cliptuner.serve.content import Item, make_item
from cliptuner.serve.limits import RequestLimits

from .schemas import SCHEMA, ClipDoc

# docarray's ImageDoc/TextDoc field → the ClipDoc field it is read as
STANDARD_NAMES = {"url": "uri", "bytes_": "blob"}


def _given_uri(value: Optional[str]) -> bool:
    return bool(value)  # an empty uri is no uri


def _given_blob(value: Optional[bytes]) -> bool:
    return value is not None  # an empty blob is an (empty, refused) image


def _read(doc: ClipDoc, field: str, standard: str, given: Callable[[Any], bool]) -> tuple[Any, str]:
    """A doc's ``field``, else its value under docarray's ``standard`` name; and which of the two it came from.

    Raises:
        ValueError: both are given and differ (names the doc and both fields).
    """
    value, other = getattr(doc, field), getattr(doc, standard)
    if given(value):
        if given(other) and value != other:
            raise ValueError(
                f"doc {doc.id!r}: {field} and {standard} differ ({standard}, docarray's ImageDoc/TextDoc "
                f"name, is read as {field} of {SCHEMA}); send one of them"
            )
        return value, field
    return (other, standard) if given(other) else (value, field)


def doc_uri(doc: ClipDoc) -> Optional[str]:
    """The doc's ``uri``, else its ``url``.

    Raises:
        ValueError: ``uri`` and ``url`` differ (names the doc).
    """
    uri, _ = _read(doc, "uri", "url", _given_uri)
    return str(uri) if uri else uri


def doc_blob(doc: ClipDoc) -> Optional[bytes]:
    """The doc's ``blob``, else its ``bytes_``.

    Raises:
        ValueError: ``blob`` and ``bytes_`` differ (names the doc).
    """
    blob, _ = _read(doc, "blob", "bytes_", _given_blob)
    return bytes(blob) if blob is not None and type(blob) is not bytes else blob  # docarray's ImageBytes → bytes


def _named(doc: ClipDoc, *sources: str) -> str:
    """How errors name the doc: ``doc 'x'``, with the standard names its content was read from."""
    standard = [source for source in sources if source in STANDARD_NAMES]
    return f"doc {doc.id!r}" + (f" ({', '.join(standard)})" if standard else "")


def doc_item(doc: ClipDoc, policy: UriPolicy, limits: RequestLimits) -> Item:
    """What to embed for a doc (its image, else its text); a ``uri`` (or ``url``) is checked against ``policy``,
    not fetched.

    Raises:
        ValueError: no content, or a bad tensor/blob/uri, or a uri the policy refuses, or a standard name that
            disagrees with ClipDoc's (names the doc id).
    """
    blob, blob_from = _read(doc, "blob", "bytes_", _given_blob)
    uri, uri_from = _read(doc, "uri", "url", _given_uri)
    if doc.tensor is not None:
        sources: tuple[str, ...] = ()
    elif blob is not None:
        sources = (blob_from,)
    else:
        sources = (uri_from,) if uri else ()
    return make_item(
        _named(doc, *sources),
        text=doc.text,
        tensor=doc.tensor,
        blob=blob,
        uri=str(uri) if uri else uri,
        policy=policy,
        limits=limits.image_limits,
    )


def has_content(doc: ClipDoc) -> bool:
    """True when the doc has text or an image field to embed (``url`` and ``bytes_`` included)."""
    return (
        bool(doc.text and doc.text.strip())
        or doc.tensor is not None
        or _given_blob(doc.blob)
        or _given_blob(doc.bytes_)
        or _given_uri(doc.uri)
        or _given_uri(doc.url)
    )


def check_request(
    docs: Sequence[ClipDoc], limits: RequestLimits, what: str = "docs", limit: Optional[int] = None, hint: str = ""
) -> int:
    """Refuse a request over the limits before anything in it is decoded or tokenized.

    Args:
        docs: the request's docs.
        limits: the Executor's limits.
        what: what they are, for the message (``"docs"``, ``"pairs"``).
        limit: the most docs allowed (default ``limits.max_docs``).
        hint: appended to the count message (what to do instead).

    Returns:
        The bytes the request carries (blobs, tensors, uris, and their standard names), for a caller that adds
        what it fetches.

    Raises:
        ValueError: too many docs, a text too long or a blob (``bytes_``) too big (names the doc), a standard name
            that disagrees with ClipDoc's, or more bytes in all than ``limits.max_request_bytes``.
    """
    limits.check_count(len(docs), what, limit, hint)
    total = 0
    for doc in docs:
        blob, blob_from = _read(doc, "blob", "bytes_", _given_blob)
        uri, _ = _read(doc, "uri", "url", _given_uri)
        total += limits.content_bytes(f"doc {doc.id!r}", text=doc.text, tensor=doc.tensor, uri=uri)
        total += limits.content_bytes(_named(doc, blob_from), blob=blob)
        limits.check_total(total)
    return total
