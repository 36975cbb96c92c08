"""What the vector stores share: the doc a store keeps, the checks of what callers give a store (vectors from
clients included), exact search, and the precisions a store may hold vectors in (:data:`DTYPES`).

Used by the embedded store (:mod:`cliptuner.index.embedded`) and the Milvus one (:mod:`cliptuner.index.milvus`), so that
both refuse the same input with the same message. Torch-free: numpy and the standard library.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

# how vectors may be held in memory: float32, float16 (half the memory) or int8 (a quarter; each component of a
# unit vector scaled by 127 and rounded)
DTYPES = ("f32", "f16", "i8")
NUMPY_DTYPES = {"f32": np.float32, "f16": np.float16, "i8": np.int8}
_I8_SCALE = 127.0
_SCORE_ROWS = 1 << 16  # rows of an f16/i8 matrix widened to float32 at a time by exact search
_SCORE_BLOCK = 1 << 24  # query-by-doc scores computed at once by exact search (64 MiB of float32)


@dataclass
class StoredDoc:
    """A doc as the store keeps it: its content, so that it can be re-embedded by a new model version."""

    id: str
    text: Optional[str] = None
    uri: Optional[str] = None
    blob: Optional[bytes] = None  # encoded image file
    tensor: Optional[np.ndarray] = None  # H×W×3 uint8 image
    tags: dict = field(default_factory=dict)


# -- validation ----------------------------------------------------------------------------------------------
def check_version(version: Any) -> str:
    if not isinstance(version, str) or not version:
        raise ValueError(f"version must be a non-empty string, got {version!r}")
    return version


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(value, (float, np.floating)) and not float(value).is_integer():
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_doc(doc: Any) -> None:
    if not isinstance(doc, StoredDoc):
        raise ValueError(f"expected StoredDoc, got {type(doc).__name__}")
    if not isinstance(doc.id, str) or not doc.id:
        raise ValueError(f"doc id must be a non-empty string, got {doc.id!r}")
    for name in ("text", "uri"):
        value = getattr(doc, name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"doc {doc.id!r}: {name} must be a string or None, got {type(value).__name__}")
    if doc.blob is not None and not isinstance(doc.blob, (bytes, bytearray, memoryview)):
        raise ValueError(f"doc {doc.id!r}: blob must be bytes or None, got {type(doc.blob).__name__}")
    if doc.tensor is not None and (not isinstance(doc.tensor, np.ndarray) or doc.tensor.dtype.hasobject):
        raise ValueError(f"doc {doc.id!r}: tensor must be a numeric numpy array or None")
    if not isinstance(doc.tags, dict):
        raise ValueError(f"doc {doc.id!r}: tags must be a dict, got {type(doc.tags).__name__}")
    try:
        json.dumps(doc.tags, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"doc {doc.id!r}: tags must be JSON-serialisable ({err})") from None


def normalised(vectors: Any, ids: list[str], what: str = "vectors") -> np.ndarray:
    """``vectors`` as float32 [len(ids), D], each row L2-normalised; NaN/inf or zero rows name their doc id."""
    try:
        arr = np.array(vectors, dtype=np.float32)  # a copy: the caller's array is never modified
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be a numeric array [N, D]: {err}") from None
    if arr.ndim != 2 or arr.shape[0] != len(ids) or arr.shape[1] == 0:
        raise ValueError(f"{what} have shape {tuple(arr.shape)}; expected [{len(ids)}, D] (one row per doc)")
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        raise ValueError(f"doc {ids[int(np.argmin(finite))]!r}: vector contains NaN or inf")
    norms = np.linalg.norm(arr, axis=1)  # [N]
    if (norms == 0).any():
        raise ValueError(f"doc {ids[int(np.argmin(norms))]!r}: vector is all zeros")
    arr /= norms[:, None]
    return arr


def to_dtype(vectors: np.ndarray, dtype: str) -> np.ndarray:
    """Unit float32 vectors as ``dtype`` holds them (see :data:`DTYPES`)."""
    if dtype == "f32":
        return vectors
    if dtype == "f16":
        return vectors.astype(np.float16)
    return np.clip(np.rint(vectors * _I8_SCALE), -_I8_SCALE, _I8_SCALE).astype(np.int8)


def as_f32(block: np.ndarray) -> np.ndarray:
    """Rows of a matrix held as float32, float16 or int8, as float32 (unit length up to rounding)."""
    if block.dtype == np.float32:
        return block
    if block.dtype == np.int8:
        return block.astype(np.float32) * np.float32(1.0 / _I8_SCALE)
    return block.astype(np.float32)


def _scores(queries: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``queries @ matrix.T`` [q, N] in float32; an f16/i8 matrix is widened ``_SCORE_ROWS`` rows at a time."""
    if matrix.dtype == np.float32:
        return queries @ matrix.T
    out = np.empty((queries.shape[0], matrix.shape[0]), np.float32)
    for start in range(0, matrix.shape[0], _SCORE_ROWS):
        out[:, start : start + _SCORE_ROWS] = queries @ as_f32(matrix[start : start + _SCORE_ROWS]).T
    return out


# -- search --------------------------------------------------------------------------------------------------
def exact_search(matrix: np.ndarray, ids: list[str], queries: np.ndarray, limit: int) -> list[list[tuple[str, float]]]:
    """Top-``limit`` rows of ``matrix`` [N, D] (float32, float16 or int8) by inner product with each normalised
    query [Q, D]."""
    n = matrix.shape[0]
    k = min(limit, n)
    block = max(1, _SCORE_BLOCK // n)
    results: list[list[tuple[str, float]]] = []
    for start in range(0, queries.shape[0], block):
        scores = _scores(queries[start : start + block], matrix)  # [q, N]
        if k < n:
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # [q, k], unordered
        else:
            top = np.broadcast_to(np.arange(n), scores.shape)
        top_scores = np.take_along_axis(scores, top, axis=1)  # [q, k]
        order = np.lexsort((top, -top_scores), axis=1)  # best first; ties by insertion order
        top = np.take_along_axis(top, order, axis=1)
        top_scores = np.take_along_axis(top_scores, order, axis=1)
        for rows, row_scores in zip(top.tolist(), top_scores.tolist()):
            results.append([(ids[r], s) for r, s in zip(rows, row_scores)])
    return results


def check_upsert(
    docs: list[StoredDoc], vectors: np.ndarray, version: str, check: Optional[Callable[[StoredDoc], None]] = None
) -> tuple[str, list[StoredDoc], np.ndarray]:
    """The arguments of an upsert, checked the same way by every vector store, before anything is written.

    Args:
        docs: the docs; ids unique and non-empty.
        vectors: [N, D], one row per doc.
        version: the model version that made them.
        check: a store's own check of each doc (its size limits), after the common one.

    Returns:
        ``(version, docs, vectors)``: the version, the docs as a list, and the vectors L2-normalised float32.

    Raises:
        ValueError: a bad doc, a repeated id or a bad vector (names the doc id), or a bad version.
    """
    version = check_version(version)
    docs = list(docs)
    seen: set[str] = set()
    for doc in docs:
        check_doc(doc)
        if check is not None:
            check(doc)
        if doc.id in seen:
            raise ValueError(f"doc {doc.id!r} appears more than once in one upsert")
        seen.add(doc.id)
    return version, docs, normalised(vectors, [doc.id for doc in docs])  # [N, D]


def repeated_ids(ids: Iterable[str], most: int = 10) -> str:
    """The ids given more than once, as ``'a' (2 times), 'b' (3 times)`` (the first ``most``, then ``...``); "" if
    none is."""
    counts = Counter(ids)
    repeated = [f"{doc_id!r} ({n} times)" for doc_id, n in counts.items() if n > 1]
    return ", ".join(repeated[:most]) + (", ..." if len(repeated) > most else "")


def check_queries(queries: np.ndarray) -> np.ndarray:
    """Query vectors as [Q, D] (one [D] vector becomes [1, D]); not yet normalised.

    Raises:
        ValueError: any other shape.
    """
    queries = np.asarray(queries)
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2:
        raise ValueError(f"queries have shape {tuple(queries.shape)}; expected [Q, D]")
    return queries


def check_query_version(version: Optional[str], held: Optional[str]) -> None:
    """Refuse queries made by another model version than the one the store holds (None: not checked)."""
    if version is not None and held is not None and version != held:
        raise ValueError(
            f"queries are from model version {version!r} but the collection holds version {held!r}; "
            f"encode the queries with {held!r}"
        )


def client_vector(embedding: Any, embedding_version: Optional[str], doc_id: str, version: str, dim: int) -> np.ndarray:
    """A vector a client sent (a vector query, or a trusted embedding) as a unit vector of the store's version.

    Args:
        embedding: the client's vector.
        embedding_version: the model version the client says made it.
        doc_id: the doc it came with (named in errors).
        version: the store's model version.
        dim: the dimension of ``version``'s vectors.

    Raises:
        ValueError: names the doc: not a numeric vector, of another dimension, not finite, all zeros, or of
            another model version.
    """
    try:
        vector = np.asarray(embedding, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"doc {doc_id!r}: embedding must be a numeric vector ({err})") from None
    if vector.ndim != 1 or vector.shape[0] != dim:
        raise ValueError(
            f"doc {doc_id!r}: embedding has shape {tuple(vector.shape)}; the index holds "
            f"{dim}-dimension vectors of model version {version!r}"
        )
    if not np.isfinite(vector).all():
        raise ValueError(f"doc {doc_id!r}: embedding is not finite (it contains NaN or inf)")
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    if norm == 0.0:
        raise ValueError(f"doc {doc_id!r}: embedding is all zeros")
    if embedding_version != version:
        raise ValueError(
            f"doc {doc_id!r}: a vector query's model_version must be the index's version {version!r}, "
            f"got {embedding_version!r}; send the embedding and model_version that /encode "
            "returns, or send text or an image"
        )
    return (vector / norm).astype(np.float32)


_TAG_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
TagValue = Union[str, int, float, bool]


def check_where(where: Optional[dict]) -> dict[str, TagValue]:
    """A search's tag filter, checked: ``{tag name: value}``, every pair must equal the doc's tag.

    The same rule for every vector store: keys are top-level tag names (identifiers), values are strings,
    numbers or booleans (compared as JSON values: ``1`` and ``1.0`` are equal, a string never equals a number).

    Raises:
        ValueError: not a dict, an empty one, a key that is not an identifier, or a value of another type.
    """
    if where is None:
        return {}
    if not isinstance(where, dict) or not where:
        raise ValueError(f"a tag filter is a non-empty mapping of tag name to value, got {where!r}")
    for key, value in where.items():
        if not isinstance(key, str) or not _TAG_KEY.fullmatch(key):
            raise ValueError(
                f"tag filter key {key!r}: must be a tag name (letters, digits and '_', not starting with a digit)"
            )
        if not isinstance(value, (str, int, float, bool)) or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"tag filter {key!r}: value {value!r} must be a string, a finite number or a boolean")
    return dict(where)
