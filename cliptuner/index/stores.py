"""The vector stores behind the indexer: one interface, two backends, chosen by name.

* ``auto`` / ``usearch`` / ``exact``: :class:`cliptuner.index.embedded.Collection`, embedded in the indexer's process
  (SQLite on the workspace, exact search or a usearch HNSW graph). No server; one process per collection.
* ``milvus``: :class:`cliptuner.index.milvus.MilvusCollection`, a Milvus server or cluster by URI
  (``http://host:19530``), or Milvus Lite (a local file, in-process) when no URI is given. One Milvus collection
  per model version behind an alias; needs ``pip install "cliptuner[milvus]"``.

Both keep the content of every doc (text, uri, tags, image bytes) so that a new model version can re-embed it,
hold the vectors of one model version at a time, and swap versions atomically after a rebuild. Both are a
:class:`cliptuner.index.base.VectorStore` (the checks and the flow of each call, written once); the behaviour
suite ``tests/unit/test_vector_stores.py`` runs against both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from cliptuner.index.base import VectorStore
from cliptuner.index.embedded import BACKENDS as EMBEDDED_BACKENDS
from cliptuner.index.embedded import Collection, HnswSettings

BACKENDS = (*EMBEDDED_BACKENDS, "milvus")


def open_store(
    root: str | Path,
    backend: str = "auto",
    *,
    exact_threshold: int = 5000,
    hnsw: Optional[HnswSettings] = None,
    milvus_uri: Optional[str] = None,
    milvus_token: Optional[str] = None,
    keep_previous: bool = False,
    dtype: str = "f32",
) -> VectorStore:
    """Open the vector store of ``root`` with the named backend.

    Args:
        root: the store's folder (its files, or for Milvus its content store and, without a URI, the Lite file).
        backend: one of :data:`BACKENDS`.
        exact_threshold: embedded ``auto`` backend: doc count from which it searches an HNSW graph.
        hnsw: embedded backends: the HNSW graph's settings (default :class:`~cliptuner.index.embedded.HnswSettings`).
        milvus_uri: ``milvus``: the server's URI; None or empty: Milvus Lite at ``<root>/milvus.db``.
        milvus_token: ``milvus``: the server's token (``user:password``), if it asks for one.
        keep_previous: embedded backends: keep the version before a rebuild searchable (a sharded index).
        dtype: embedded backends: how the vectors are held in memory, ``f32``, ``f16`` or ``i8``
            (:data:`cliptuner.index.embedded.DTYPES`).

    Raises:
        ValueError: an unknown backend (names the allowed ones), or Milvus options with another backend.
        ImportError: ``milvus`` without the milvus extra installed (says what to install).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown vector store backend {backend!r}; allowed: {list(BACKENDS)}")
    if backend == "milvus":
        from cliptuner.index.milvus import MilvusCollection

        if dtype != "f32":
            raise ValueError(f"vector dtype {dtype!r} is a setting of the embedded backends; Milvus holds float32")
        if keep_previous:
            raise ValueError(
                "keep_previous is a setting of the embedded backends (a sharded index); Milvus swaps "
                "its versions with an alias and shards a collection itself"
            )
        return MilvusCollection(root, uri=milvus_uri or None, token=milvus_token or None)
    if milvus_uri or milvus_token:
        raise ValueError(f"milvus_uri / milvus_token are settings of the 'milvus' backend, not of {backend!r}")
    return Collection(
        root, backend=backend, exact_threshold=exact_threshold, hnsw=hnsw, keep_previous=keep_previous, dtype=dtype
    )


__all__ = ["BACKENDS", "VectorStore", "open_store"]
