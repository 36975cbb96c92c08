"""The HNSW graph of the embedded store (usearch): its settings, and the graph as a cache of a collection's vectors.

The graph is keyed by doc serial (``docs.seq``); it holds the vectors itself (in the collection's dtype), so
while a collection has a graph it keeps no matrix beside it (:class:`cliptuner.index.embedded.Collection`).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cliptuner.index.vectors import as_f32
from cliptuner.model.atomic import atomic_path

logger = logging.getLogger(__name__)

_HNSW_EXTRA = 8  # candidates asked for beyond `limit`, dropped if their key no longer maps to a doc
# usearch inserts a batch on all cores by default; inserting concurrently into a small graph leaves it poorly
# linked (measured with usearch 2.26: ~0.5-1% of 1,000 stored vectors not found as their own nearest neighbour,
# none with one thread), so batches below this many rows are inserted on one thread (a 1,000-row batch: ~0.1 s).
_HNSW_PARALLEL_ADD = 10_000


def _import_usearch():
    try:
        from usearch.index import Index
    except ImportError as err:  # pragma: no cover - usearch is a dependency
        raise ImportError("the usearch backend needs usearch: pip install 'usearch>=2.12,<3'") from err
    return Index


def _add_threads(rows: int) -> int:
    """Threads for inserting ``rows`` vectors into an HNSW index: one for small batches, else all (0)."""
    return 1 if rows < _HNSW_PARALLEL_ADD else 0


@dataclass(frozen=True)
class HnswSettings:
    """The HNSW graph of the embedded store (usearch): its degree and the breadth of insertion and search.

    Higher values find more of the true nearest neighbours at the cost of memory (``connectivity``), build time
    (``expansion_add``) or query time (``expansion_search``). The defaults are the ones ``benchmarks/search.py``
    chose on 100k clustered 512-d vectors (``benchmarks/CHOICES.md``; on much noisier data no tried setting reached
    recall@10 0.95); on other data of the same kind they reach recall@10 0.995 at 11.1x exact search
    (``python -m benchmarks``, ``benchmarks/RESULTS.md``).
    """

    connectivity: int = 16  # links per node
    expansion_add: int = 128  # candidates kept while inserting
    expansion_search: int = 64  # candidates kept while searching (>= the limit asked for)

    def __post_init__(self) -> None:
        for name in ("connectivity", "expansion_add", "expansion_search"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 4096:
                raise ValueError(f"HNSW {name} must be a whole number in [2, 4096], got {value!r}")


class HnswGraph:
    """A usearch HNSW index whose keys are doc serials (``docs.seq``); every call into it holds its lock."""

    def __init__(self, index: Any, key_to_id: dict[int, str]) -> None:
        self.index = index
        self.key_to_id = key_to_id
        self.lock = threading.Lock()

    @classmethod
    def build(
        cls,
        dim: int,
        keys: list[int],
        ids: list[str],
        matrix: np.ndarray,
        settings: HnswSettings = HnswSettings(),
        dtype: str = "f32",
    ) -> HnswGraph:
        index = _import_usearch()(
            ndim=dim,
            metric="cos",
            dtype=dtype,
            connectivity=settings.connectivity,
            expansion_add=settings.expansion_add,
            expansion_search=settings.expansion_search,
        )
        if keys:
            index.add(
                np.asarray(keys, dtype=np.uint64),
                np.ascontiguousarray(as_f32(matrix[: len(keys)])),
                threads=_add_threads(len(keys)),
            )
        return cls(index, dict(zip(keys, ids)))

    @classmethod
    def load(
        cls, path: Path, dim: int, keys: list[int], ids: list[str], settings: HnswSettings = HnswSettings()
    ) -> Optional[HnswGraph]:
        """The index saved at ``path`` if it holds exactly ``keys`` in ``dim`` dims, built with ``settings``'
        connectivity, else None. (The file's name says in which dtype it holds them.)"""
        try:
            index = _import_usearch().restore(str(path), view=False)
        except Exception as err:  # a truncated or foreign file: rebuilt from the vectors
            logger.warning("could not load %s (%s); rebuilding it", path, err)
            return None
        if index is None or index.ndim != dim or len(index) != len(keys) or index.connectivity != settings.connectivity:
            return None
        index.expansion_add = settings.expansion_add
        index.expansion_search = settings.expansion_search
        if keys and not np.all(index.contains(np.asarray(keys, dtype=np.uint64))):
            return None
        return cls(index, dict(zip(keys, ids)))

    def upsert(self, keys: list[int], ids: list[str], vectors: np.ndarray) -> None:
        keys_arr = np.asarray(keys, dtype=np.uint64)
        with self.lock:
            present = [k for k in keys if k in self.key_to_id]
            if present:
                self.index.remove(np.asarray(present, dtype=np.uint64))
            self.index.add(keys_arr, np.ascontiguousarray(vectors), threads=_add_threads(len(keys)))
            self.key_to_id.update(zip(keys, ids))

    def vectors(self, keys: list[int]) -> tuple[list[str], np.ndarray]:
        """The doc ids and float32 [n, dim] vectors (in the graph's precision) of those of ``keys`` it still holds."""
        with self.lock:
            present = [k for k in keys if k in self.key_to_id]
            ids = [self.key_to_id[k] for k in present]
            if not present:
                return ids, np.zeros((0, self.index.ndim), np.float32)
            got = self.index.get(np.asarray(present, dtype=np.uint64), dtype=np.float32)
        return ids, np.asarray(got, dtype=np.float32).reshape(len(present), -1)

    def remove(self, keys: list[int]) -> None:
        with self.lock:
            present = [k for k in keys if k in self.key_to_id]
            if not present:
                return
            self.index.remove(np.asarray(present, dtype=np.uint64))
            for k in present:
                del self.key_to_id[k]

    def search(self, queries: np.ndarray, limit: int) -> list[list[tuple[str, float]]]:
        with self.lock:
            size = len(self.index)
            if size == 0:
                return [[] for _ in range(queries.shape[0])]
            matches = self.index.search(queries, count=min(size, limit + _HNSW_EXTRA))
            keys = np.asarray(matches.keys).reshape(queries.shape[0], -1)
            distances = np.asarray(matches.distances).reshape(queries.shape[0], -1)
            counts = np.asarray(matches.counts).reshape(-1) if hasattr(matches, "counts") else [keys.shape[1]]
            key_to_id = self.key_to_id
            results = []
            for q in range(queries.shape[0]):
                hits = []
                for key, dist in zip(keys[q, : counts[q]].tolist(), distances[q, : counts[q]].tolist()):
                    doc_id = key_to_id.get(key)
                    if doc_id is not None and not math.isnan(dist):
                        hits.append((doc_id, 1.0 - dist))
                hits.sort(key=lambda hit: -hit[1])
                results.append(hits[:limit])
            return results

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            with self.lock:
                self.index.save(str(tmp))
