"""The content of a :class:`~executors.schemas.ClipDoc`: whether it has any, and what to embed for it.

The rules themselves (a pair is embedded by its image; ``tensor`` wins over ``blob``, which wins over ``uri``; the
array rule; ``uri`` containment) are the core's, in :mod:`cliptuner.content`; this module only reads a doc's fields
into it, the same way for every Executor.
"""

from typing import Optional

from cliptuner.content import Item, make_item

from .schemas import ClipDoc


def doc_item(doc: ClipDoc, uri_root: Optional[str] = None) -> Item:
    """What to embed for a doc (its image, else its text).

    Raises:
        ValueError: no content, or a bad tensor/blob/uri (names the doc id).
    """
    return make_item(f"doc {doc.id!r}", text=doc.text, tensor=doc.tensor, blob=doc.blob, uri=doc.uri,
                     uri_root=uri_root)


def has_content(doc: ClipDoc) -> bool:
    """True when the doc has text or an image field to embed."""
    return bool(doc.text and doc.text.strip()) or doc.tensor is not None or doc.blob is not None or bool(doc.uri)
