"""The doc types every endpoint of the Flow speaks (docarray v2); the public contract of the services.

A :class:`ClipDoc` carries text, or an image (``blob``: an encoded image file, ``uri``: a path on the serving
machine or a ``data:`` URI, ``tensor``: an ``H×W×3`` uint8 array), or both (a pair). The encoder fills
``embedding`` and ``model_version``; a search fills ``matches`` (best first) and ``scores`` (cosine
similarity, descending, one per match).

No ``from __future__ import annotations`` here: Jina and pydantic read these annotations at runtime.

``ClipDoc.matches`` publishes its JSON schema with the match schema written inline (``WithJsonSchema``): the
Jina gateway rebuilds every Executor's doc types from their JSON schemas (docarray's
``create_base_doc_from_schema``) and compares them along the chain; for an ``Optional[DocList[...]]`` field the
rebuilt type keeps a ``$ref`` to a definition it does not carry, its ``schema()`` raises
``KeyError('#/$defs/MatchDoc')`` and the gateway of a Flow with more than one Executor fails to start. The Python
type, validation and protobuf encoding stay those of ``Optional[DocList[MatchDoc]]``.
"""

from typing import Annotated, Optional

from docarray import BaseDoc, DocList
from docarray.typing import NdArray
from pydantic import Field, WithJsonSchema


class MatchDoc(BaseDoc):
    """One search result: a stored doc's content, the model version that scored it and its cosine score."""

    text: Optional[str] = None
    uri: Optional[str] = None
    blob: Optional[bytes] = None
    tensor: Optional[NdArray] = None
    model_version: Optional[str] = None
    score: Optional[float] = None
    tags: dict = Field(default_factory=dict)


_MATCHES_JSON_SCHEMA = {"anyOf": [{"type": "array", "items": MatchDoc.model_json_schema()}, {"type": "null"}],
                        "default": None}


class ClipDoc(BaseDoc):
    """A text, an image, or both; with its embedding and, for a query, its matches."""

    text: Optional[str] = None
    uri: Optional[str] = None
    blob: Optional[bytes] = None
    tensor: Optional[NdArray] = None  # H×W×3 uint8
    embedding: Optional[NdArray] = None  # [embed_dim] float32, L2-normalised
    model_version: Optional[str] = None  # the model version that made `embedding` (or that scored `matches`)
    tags: dict = Field(default_factory=dict)
    matches: Annotated[Optional[DocList[MatchDoc]], WithJsonSchema(_MATCHES_JSON_SCHEMA)] = None  # best first
    scores: Optional[list[float]] = None  # cosine similarity of each match, descending


__all__ = ["ClipDoc", "MatchDoc"]
