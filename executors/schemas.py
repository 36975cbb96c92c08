"""The doc types every endpoint of the Flow speaks (docarray v2); the public contract of the services.

A :class:`ClipDoc` carries text, or an image (``blob``: an encoded image file, ``uri``: a path on the serving
machine or a ``data:`` URI, ``tensor``: an ``H×W×3`` uint8 array), or both (a pair). The encoder fills
``embedding`` and ``model_version``; a search fills ``matches`` (best first) and ``scores`` (cosine
similarity, descending, one per match).

docarray's standard :class:`~docarray.documents.ImageDoc` and :class:`~docarray.documents.TextDoc` are read too:
``ClipDoc`` carries their field names ``url`` (read as ``uri``: the same uri rules, the same limits) and ``bytes_``
(read as ``blob``), so a request of ``DocList[ImageDoc]`` or ``DocList[TextDoc]`` arrives field by field
(:mod:`executors.content` reads them; a doc whose ``uri`` and ``url``, or ``blob`` and ``bytes_``, differ is
refused, naming it). An answer read as ``DocList[ImageDoc]``/``DocList[TextDoc]`` keeps the fields those types
have (``id``, ``embedding``, ``url``, ``text``…); ``model_version``, ``matches`` and ``scores`` are read with
``ClipDoc`` (``return_type=DocList[ClipDoc]``), or with a client type that declares them.

No ``from __future__ import annotations`` here: Jina and pydantic read these annotations at runtime.

``ClipDoc.matches`` publishes its JSON schema with the match schema written inline (``WithJsonSchema``): the
Jina gateway rebuilds every Executor's doc types from their JSON schemas (docarray's
``create_base_doc_from_schema``) and compares them along the chain; for an ``Optional[DocList[...]]`` field the
rebuilt type keeps a ``$ref`` to a definition it does not carry, its ``schema()`` raises
``KeyError('#/$defs/MatchDoc')`` and the gateway of a Flow with more than one Executor fails to start. The Python
type, validation and protobuf encoding stay those of ``Optional[DocList[MatchDoc]]``.
"""

from typing import Annotated, Any, Optional

from docarray import BaseDoc, DocList
from docarray.typing import NdArray
from pydantic import Field, ValidationError, WithJsonSchema

SCHEMA = "executors.schemas.ClipDoc"  # what errors tell clients to send


class MatchDoc(BaseDoc):
    """One search result: a stored doc's content, the model version that scored it and its cosine score."""

    text: Optional[str] = None
    uri: Optional[str] = None
    blob: Optional[bytes] = None
    tensor: Optional[NdArray] = None
    model_version: Optional[str] = None
    score: Optional[float] = None
    tags: dict = Field(default_factory=dict)


_MATCHES_JSON_SCHEMA = {
    "anyOf": [{"type": "array", "items": MatchDoc.model_json_schema()}, {"type": "null"}],
    "default": None,
}


class ClipDoc(BaseDoc):
    """A text, an image, or both; with its embedding and, for a query, its matches."""

    text: Optional[str] = None
    uri: Optional[str] = None
    blob: Optional[bytes] = None
    tensor: Optional[NdArray] = None  # H×W×3 uint8
    url: Optional[str] = None  # docarray's ImageDoc/TextDoc name, read as `uri` (when both are given, they must agree)
    bytes_: Optional[bytes] = None  # docarray's ImageDoc/TextDoc name, read as `blob` (likewise)
    embedding: Optional[NdArray] = None  # [embed_dim] float32, L2-normalised
    model_version: Optional[str] = None  # the model version that made `embedding` (or that scored `matches`)
    tags: dict = Field(default_factory=dict)
    matches: Annotated[Optional[DocList[MatchDoc]], WithJsonSchema(_MATCHES_JSON_SCHEMA)] = None  # best first
    scores: Optional[list[float]] = None  # cosine similarity of each match, descending

    @classmethod
    def from_protobuf(cls, pb_msg: Any) -> "ClipDoc":
        """A doc from the wire; one whose fields do not fit this schema (a client type with a field of the same name
        and another type) is refused naming the doc, the fields and the schema to send, not with pydantic's bare
        message.

        Raises:
            ValueError: a field cannot be read as this schema's.
        """
        try:
            return super().from_protobuf(pb_msg)
        except ValidationError as err:
            doc_id = pb_msg.data["id"].text if "id" in pb_msg.data else None
            problems = "; ".join(
                f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in err.errors()[:5]
            )
            raise ValueError(
                f"doc {doc_id!r}: cannot be read as {SCHEMA} ({problems}); send {SCHEMA}, or docarray's "
                "ImageDoc or TextDoc"
            ) from None


__all__ = ["SCHEMA", "ClipDoc", "MatchDoc"]
