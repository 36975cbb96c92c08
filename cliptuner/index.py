"""Embedded vector store behind the indexer: docs and their vectors for one model version, persisted on disk.

Layout::

    <root>/docs.sqlite                        docs, vectors and the manifest (WAL mode, ``synchronous=FULL``)
        docs(seq, id, text, uri, blob, tensor, tags)   one row per doc; ``seq`` keeps insertion order
        vectors(slot, id, vec)                          float32 vectors, one slot per model version
        meta(key, value)                                the manifest: version, dim, slot, generation, and
                                                        ``rebuild`` ({slot, version}) while a rebuild is unfinished
    <root>/usearch-<slot>-<generation>.index  saved HNSW graph of the active vectors (a cache, see below)
    <root>/.lock                              ``fcntl.flock``: one open Collection per root

Durability: every write (upsert, delete, a rebuild's batch, the swap) is one SQLite transaction, committed
with ``synchronous=FULL`` before the call returns, so what a call acknowledged survives ``kill -9`` and power
loss. The in-memory matrix and the HNSW index are derived from those rows on open.

The manifest lives in the database, not in a separate file: the vectors live there too, so flipping the
manifest in the same SQLite transaction that commits the last of the new vectors makes a rebuild's swap
atomic on disk, and a crash leaves either the old or the new version, never a pointer to missing vectors.
A rebuild writes the new vectors into a fresh slot, in batches, while the old slot keeps serving; an
interrupted rebuild (a crash, ``kill -9``, a failing ``embed``) leaves its slot and its ``rebuild`` record,
invisible to searches, and the next rebuild for the same version resumes from them (see :class:`_Rebuild`).
On open, rows of any other slot are deleted.

Search is exact (``queries @ matrix.T``) below ``exact_threshold`` docs and uses a usearch HNSW index at or
above it (``backend="auto"``), or always one of the two. The HNSW index is a cache of the vectors in the
database: it is saved on :meth:`Collection.close` and after a rebuild under a name that carries the write
generation, loaded on open when that name matches, and otherwise rebuilt from the vectors (a process that
died without ``close`` pays one build on the next open, never a stale index).

Thread-safety: one lock guards the in-memory state and the SQLite connection. A search takes a snapshot of
(version, matrix, ids, HNSW index) under it and computes outside it. The matrix a snapshot holds is never
written again (appends go past its end; replacements and deletions copy), and a rebuild builds a new matrix
and index on the side and swaps them in, so a search compares its queries with vectors of one version only.
Torch-free: numpy, usearch and the standard library.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import math
import re
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np

from .atomic import atomic_path

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "usearch", "exact")
# how the vectors are held in memory: float32, float16 (half the memory), int8 (a quarter; each unit vector's
# components scaled by 127 and rounded). SQLite keeps float32 whatever this says, so a change takes effect on open.
DTYPES = ("f32", "f16", "i8")
_NUMPY_DTYPES = {"f32": np.float32, "f16": np.float16, "i8": np.int8}
_I8_SCALE = 127.0
_SCORE_ROWS = 1 << 16  # rows of an f16/i8 matrix widened to float32 at a time by exact search
DB_FILE = "docs.sqlite"
LOCK_FILE = ".lock"
INDEX_PREFIX = "usearch-"
INDEX_SUFFIX = ".index"
_SQL_CHUNK = 500  # ids per `IN (...)` query, well under SQLite's variable limit
_MIN_CAPACITY = 1024  # rows allocated for the first vectors
_SCORE_BLOCK = 1 << 24  # query-by-doc scores computed at once by exact search (64 MiB of float32)
_HNSW_EXTRA = 8  # candidates asked for beyond `limit`, dropped if their key no longer maps to a doc
# usearch inserts a batch on all cores by default; inserting concurrently into a small graph leaves it poorly
# linked (measured with usearch 2.26: ~0.5-1% of 1,000 stored vectors not found as their own nearest neighbour,
# none with one thread), so batches below this many rows are inserted on one thread (a 1,000-row batch: ~0.1 s).
_HNSW_PARALLEL_ADD = 10_000
_CATCH_UP_ROUNDS = 3  # rebuild: rounds re-embedding concurrently changed docs before the final locked one

_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    text TEXT,
    uri TEXT,
    blob BLOB,
    tensor BLOB,
    tags TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS vectors (
    slot INTEGER NOT NULL,
    id TEXT NOT NULL,
    vec BLOB NOT NULL,
    PRIMARY KEY (slot, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS vectors_by_id ON vectors (id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_UPSERT_DOC = (
    "INSERT INTO docs (id, text, uri, blob, tensor, tags) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET text = excluded.text, uri = excluded.uri, blob = excluded.blob, "
    "tensor = excluded.tensor, tags = excluded.tags"
)
_DOC_COLUMNS = "seq, id, text, uri, blob, tensor, tags"
_DOC_COLUMNS_NO_CONTENT = "seq, id, text, uri, NULL, NULL, tags"  # the same row shape, without the image bytes
_REBUILD_KEY = "rebuild"  # meta key naming the slot and version of an unfinished rebuild


@dataclass
class StoredDoc:
    """A doc as the store keeps it: its content, so that it can be re-embedded by a new model version."""

    id: str
    text: Optional[str] = None
    uri: Optional[str] = None
    blob: Optional[bytes] = None  # encoded image file
    tensor: Optional[np.ndarray] = None  # H×W×3 uint8 image
    tags: dict = field(default_factory=dict)


# -- encoding ------------------------------------------------------------------------------------------------
def _encode_tensor(tensor: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, tensor, allow_pickle=False)
    return buf.getvalue()


def _decode_tensor(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _doc_row(doc: StoredDoc) -> tuple:
    """The ``docs`` row of a validated doc (id, text, uri, blob, tensor, tags)."""
    tensor = None if doc.tensor is None else _encode_tensor(doc.tensor)
    return (doc.id, doc.text, doc.uri, None if doc.blob is None else bytes(doc.blob), tensor,
            json.dumps(doc.tags, ensure_ascii=False))


def _doc_from_row(row: tuple) -> StoredDoc:
    _, doc_id, text, uri, blob, tensor, tags = row
    return StoredDoc(id=doc_id, text=text, uri=uri, blob=None if blob is None else bytes(blob),
                     tensor=None if tensor is None else _decode_tensor(tensor), tags=json.loads(tags))


def _vec_bytes(vec: np.ndarray) -> bytes:
    return np.ascontiguousarray(vec, dtype="<f4").tobytes()


# -- validation ----------------------------------------------------------------------------------------------
def _check_version(version: Any) -> str:
    if not isinstance(version, str) or not version:
        raise ValueError(f"version must be a non-empty string, got {version!r}")
    return version


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(value, (float, np.floating)) and not float(value).is_integer():
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_doc(doc: Any) -> None:
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


def _normalised(vectors: Any, ids: list[str], what: str = "vectors") -> np.ndarray:
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


def _to_dtype(vectors: np.ndarray, dtype: str) -> np.ndarray:
    """Unit float32 vectors as ``dtype`` holds them (see :data:`DTYPES`)."""
    if dtype == "f32":
        return vectors
    if dtype == "f16":
        return vectors.astype(np.float16)
    return np.clip(np.rint(vectors * _I8_SCALE), -_I8_SCALE, _I8_SCALE).astype(np.int8)


def _as_f32(block: np.ndarray) -> np.ndarray:
    """Rows of a matrix held as float32, float16 or int8, as float32 (unit length up to rounding)."""
    if block.dtype == np.float32:
        return block
    if block.dtype == np.int8:
        return block.astype(np.float32) * np.float32(1.0 / _I8_SCALE)
    return block.astype(np.float32)


def _grow(buf: Optional[np.ndarray], n: int, extra: int, dim: int, copy: bool, dtype: str = "f32") -> np.ndarray:
    """A ``dtype`` buffer with room for ``n + extra`` rows whose first ``n`` rows are ``buf``'s (float32 rows are
    converted); ``buf`` itself when it fits."""
    kind = _NUMPY_DTYPES[dtype]
    need = n + extra
    if not copy and buf is not None and buf.shape[1] == dim and buf.shape[0] >= need and buf.dtype == kind:
        return buf
    old_cap = 0 if buf is None else buf.shape[0]
    new = np.empty((max(_MIN_CAPACITY, need, 2 * old_cap if need > old_cap else old_cap), dim), kind)
    if n:
        new[:n] = buf[:n] if buf.dtype == kind else _to_dtype(_as_f32(buf[:n]), dtype)
    return new


def _scores(queries: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``queries @ matrix.T`` [q, N] in float32; an f16/i8 matrix is widened ``_SCORE_ROWS`` rows at a time."""
    if matrix.dtype == np.float32:
        return queries @ matrix.T
    out = np.empty((queries.shape[0], matrix.shape[0]), np.float32)
    for start in range(0, matrix.shape[0], _SCORE_ROWS):
        out[:, start:start + _SCORE_ROWS] = queries @ _as_f32(matrix[start:start + _SCORE_ROWS]).T
    return out


# -- search --------------------------------------------------------------------------------------------------
def _exact_search(matrix: np.ndarray, ids: list[str], queries: np.ndarray,
                  limit: int) -> list[list[tuple[str, float]]]:
    """Top-``limit`` rows of ``matrix`` [N, D] (float32, float16 or int8) by inner product with each normalised
    query [Q, D]."""
    n = matrix.shape[0]
    k = min(limit, n)
    block = max(1, _SCORE_BLOCK // n)
    results: list[list[tuple[str, float]]] = []
    for start in range(0, queries.shape[0], block):
        scores = _scores(queries[start:start + block], matrix)  # [q, N]
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


def check_upsert(docs: list[StoredDoc], vectors: np.ndarray, version: str,
                 check: Optional[Callable[[StoredDoc], None]] = None) -> tuple[str, list[StoredDoc], np.ndarray]:
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
    version = _check_version(version)
    docs = list(docs)
    seen: set[str] = set()
    for doc in docs:
        _check_doc(doc)
        if check is not None:
            check(doc)
        if doc.id in seen:
            raise ValueError(f"doc {doc.id!r} appears more than once in one upsert")
        seen.add(doc.id)
    return version, docs, _normalised(vectors, [doc.id for doc in docs])  # [N, D]


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
        raise ValueError(f"queries are from model version {version!r} but the collection holds version {held!r}; "
                         f"encode the queries with {held!r}")


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
            raise ValueError(f"tag filter key {key!r}: must be a tag name (letters, digits and '_', not starting "
                             "with a digit)")
        if not isinstance(value, (str, int, float, bool)) or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"tag filter {key!r}: value {value!r} must be a string, a finite number or a boolean")
    return dict(where)


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
    chose on 100k clustered 512-d vectors (recall@10 0.994 at 10x exact search on other data of the same kind;
    on much noisier data no tried setting reached 0.95: ``benchmarks/RESULTS.md``).
    """

    connectivity: int = 16  # links per node
    expansion_add: int = 128  # candidates kept while inserting
    expansion_search: int = 64  # candidates kept while searching (>= the limit asked for)

    def __post_init__(self) -> None:
        for name in ("connectivity", "expansion_add", "expansion_search"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 4096:
                raise ValueError(f"HNSW {name} must be a whole number in [2, 4096], got {value!r}")


class _Hnsw:
    """A usearch HNSW index whose keys are doc serials (``docs.seq``); every call into it holds its lock."""

    def __init__(self, index: Any, key_to_id: dict[int, str]) -> None:
        self.index = index
        self.key_to_id = key_to_id
        self.lock = threading.Lock()

    @classmethod
    def build(cls, dim: int, keys: list[int], ids: list[str], matrix: np.ndarray,
              settings: HnswSettings = HnswSettings(), dtype: str = "f32") -> "_Hnsw":
        index = _import_usearch()(ndim=dim, metric="cos", dtype=dtype, connectivity=settings.connectivity,
                                  expansion_add=settings.expansion_add, expansion_search=settings.expansion_search)
        if keys:
            index.add(np.asarray(keys, dtype=np.uint64), np.ascontiguousarray(_as_f32(matrix[:len(keys)])),
                      threads=_add_threads(len(keys)))
        return cls(index, dict(zip(keys, ids)))

    @classmethod
    def load(cls, path: Path, dim: int, keys: list[int], ids: list[str],
             settings: HnswSettings = HnswSettings()) -> Optional["_Hnsw"]:
        """The index saved at ``path`` if it holds exactly ``keys`` in ``dim`` dims, built with ``settings``'
        connectivity, else None. (The file's name says in which dtype it holds them.)"""
        try:
            index = _import_usearch().restore(str(path), view=False)
        except Exception as err:  # a truncated or foreign file: rebuilt from the vectors
            logger.warning("could not load %s (%s); rebuilding it", path, err)
            return None
        if index is None or index.ndim != dim or len(index) != len(keys) \
                or index.connectivity != settings.connectivity:
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
                for key, dist in zip(keys[q, :counts[q]].tolist(), distances[q, :counts[q]].tolist()):
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


@dataclass(frozen=True)
class _Snapshot:
    version: Optional[str]
    n: int  # rows
    dim: Optional[int]
    matrix: Optional[np.ndarray]  # [n, dim]; never written while a snapshot holds it; None while `hnsw` holds them
    ids: list[str]  # row -> doc id (rows < n never change while a snapshot holds the list)
    seqs: list[int]  # row -> doc serial, the HNSW key
    hnsw: Optional[_Hnsw]


class _Rebuild:
    """One rebuild of a :class:`Collection` for a new model version; resumable after a crash.

    On disk: the new vectors go to their own ``slot`` of the ``vectors`` table, committed batch by batch, and
    ``meta['rebuild'] = {"slot", "version"}`` names that slot until the swap. The manifest keeps pointing at
    the old slot, so searches and a reopened collection see only the old version. A rebuild for the same
    version that finds this record (after a crash, ``kill -9`` or a failing ``embed``) keeps the vectors
    already in the slot and embeds only the other docs; a rebuild for another version discards them.

    A vector in the slot is always its doc's current content embedded: a write to the collection deletes the
    doc's vectors outside the active slot in the same transaction, and a batch is not written for a doc that
    changed while the batch was embedded (the change marks it dirty, and it is embedded again). The swap, which
    drops the other slots, points the manifest at the new one and removes the record, is one transaction.

    Runs in the caller's thread; the collection's lock guards what it shares with writers and searches.
    """

    def __init__(self, col: "Collection", version: str, embed: Callable[[list[StoredDoc]], np.ndarray],
                 batch_size: int, slot: int, last_seq: int, done: dict[str, tuple[int, np.ndarray]]) -> None:
        self.col = col
        self.version = version
        self.embed = embed
        self.batch_size = batch_size
        self.slot = slot
        self.last_seq = last_seq  # docs up to this serial are embedded in order; later ones come as dirty
        self.new = done  # id -> (seq, normalised new vector)
        self.dim: Optional[int] = next(iter(done.values()))[1].shape[0] if done else None
        self.embedded = 0  # docs embedded by this run (resumed ones are not)

    @classmethod
    def start(cls, col: "Collection", version: str, embed: Callable[[list[StoredDoc]], np.ndarray],
              batch_size: int, last_seq: int) -> "_Rebuild":
        """Register the rebuild (or take over the unfinished one of ``version``) and start tracking writes.

        The caller holds ``col._lock``, so no write slips between reading the done vectors and tracking.
        """
        pending = col._pending
        done: dict[str, tuple[int, np.ndarray]] = {}
        if pending is not None and pending.get("version") == version:
            slot = int(pending["slot"])
            rows = col._db.execute("SELECT d.seq, d.id, v.vec FROM vectors v JOIN docs d ON d.id = v.id "
                                   "WHERE v.slot = ?", (slot,)).fetchall()
            done = {doc_id: (seq, np.frombuffer(vec, dtype="<f4").astype(np.float32)) for seq, doc_id, vec in rows}
            if len({vec.shape[0] for _, vec in done.values()}) > 1:  # not written by this code: start over
                done = {}
            logger.info("resuming the rebuild of %s for model version %s: %d docs already embedded", col.root,
                        version, len(done))
        else:
            slot = col._slot + 1
            with col._txn() as db:
                db.execute("DELETE FROM vectors WHERE slot != ?", (col._slot,))
                col._set_meta(**{_REBUILD_KEY: {"slot": slot, "version": version}})
            col._pending = {"slot": slot, "version": version}
        col._dirty = set()
        return cls(col, version, embed, batch_size, slot, last_seq, done)

    def run(self) -> int:
        """Embed what is not done, catch up with concurrent writes, then swap; returns the new doc count."""
        self._embed_stored()
        for _ in range(_CATCH_UP_ROUNDS):  # without the lock while embedding
            changed = self._take_dirty()
            if not changed:
                break
            self._embed_into_new(changed)
        seqs, ids, matrix = self._ordered()
        col = self.col
        hnsw = _Hnsw.build(self.dim, seqs, ids, matrix, col.hnsw, col.dtype) \
            if col._want_hnsw(len(ids), col._hnsw is not None) else None
        n = self._swap(hnsw)
        logger.info("rebuilt %s for model version %s: %d docs (%d embedded by this run)", col.root, self.version, n,
                    self.embedded)
        return n

    def _embed_stored(self) -> None:
        """Every doc stored when the rebuild started and not yet in the slot, in batches, without the lock."""
        col = self.col
        after = 0
        while True:
            with col._lock:
                col._check_open()
                rows = col._db.execute(
                    f"SELECT {_DOC_COLUMNS} FROM docs d WHERE seq > ? AND seq <= ? AND NOT EXISTS "
                    "(SELECT 1 FROM vectors v WHERE v.slot = ? AND v.id = d.id) ORDER BY seq LIMIT ?",
                    (after, self.last_seq, self.slot, self.batch_size)).fetchall()
            if not rows:
                return
            after = rows[-1][0]
            self._embed_into_new([(row[0], _doc_from_row(row)) for row in rows])

    def _embed_into_new(self, pairs: list[tuple[int, StoredDoc]]) -> list[str]:
        """Embed ``(seq, doc)`` pairs into ``self.new`` and the slot; returns their ids.

        Takes the collection's lock only to write (re-entrant: :meth:`_swap` calls this with it held).
        """
        col = self.col
        for start in range(0, len(pairs), self.batch_size):
            batch = pairs[start:start + self.batch_size]
            docs = [doc for _, doc in batch]
            ids = [doc.id for doc in docs]
            vecs = _normalised(self.embed(docs), ids, "embed() output")  # [len(batch), D]
            if self.dim is not None and vecs.shape[1] != self.dim:
                raise ValueError(f"embed() returned {vecs.shape[1]}-dim vectors for doc {ids[0]!r}; "
                                 f"earlier batches were {self.dim}-dim")
            self.dim = vecs.shape[1]
            self.embedded += len(batch)
            with col._lock:
                col._check_open()
                # a doc written since it was read is dirty: its vector here is stale, and it is embedded again
                fresh = [(doc_id, vec) for doc_id, vec in zip(ids, vecs) if doc_id not in col._dirty]
                with col._txn() as db:  # docs deleted meanwhile are skipped
                    db.executemany("INSERT OR REPLACE INTO vectors (slot, id, vec) SELECT ?, id, ? FROM docs "
                                   "WHERE id = ?", [(self.slot, _vec_bytes(vec), doc_id) for doc_id, vec in fresh])
            for (seq, doc), vec in zip(batch, vecs):
                self.new[doc.id] = (seq, vec)
        return [doc.id for _, doc in pairs]

    def _take_dirty(self) -> list[tuple[int, StoredDoc]]:
        """Docs written since they were embedded (to embed again); deleted ones leave ``self.new``."""
        col = self.col
        with col._lock:
            dirty, col._dirty = col._dirty, set()
            current = col._fetch(sorted(dirty))
        for doc_id in dirty - current.keys():
            self.new.pop(doc_id, None)
        return list(current.values())

    def _ordered(self) -> tuple[list[int], list[str], np.ndarray]:
        """Serials, ids and the [n, dim] matrix of ``self.new``, in insertion order."""
        items = sorted(self.new.items(), key=lambda item: item[1][0])
        if not items:  # every doc was deleted meanwhile
            return [], [], np.zeros((0, self.dim or self.col._dim or 1), np.float32)
        seqs = [seq for _, (seq, _) in items]
        ids = [doc_id for doc_id, _ in items]
        return seqs, ids, np.stack([vec for _, (_, vec) in items])

    def _swap(self, hnsw: Optional[_Hnsw]) -> int:
        """Under the lock: the last changes, then one transaction flips the manifest, then the in-memory swap.

        ``hnsw`` was built from ``self.new`` as it was before this call; it is patched, or rebuilt, here.
        """
        col = self.col
        with col._lock:
            col._check_open()
            built = {doc_id: seq for doc_id, (seq, _) in self.new.items()}  # what `hnsw` holds
            touched = self._embed_into_new(self._take_dirty())
            stored = [doc_id for (doc_id,) in col._db.execute("SELECT id FROM docs")]
            # docs with no vector yet (none unless the database was edited by hand)
            touched += self._embed_into_new(list(col._fetch([i for i in stored if i not in self.new]).values()))
            seqs, ids, matrix = self._ordered()
            n = len(ids)
            if hnsw is not None and col._want_hnsw(n, True):
                hnsw.remove([seq for doc_id, seq in built.items()
                             if doc_id not in self.new or self.new[doc_id][0] != seq])
                if touched:
                    hnsw.upsert([self.new[i][0] for i in touched], touched,
                                np.stack([self.new[i][1] for i in touched]))
            else:
                hnsw = _Hnsw.build(self.dim, seqs, ids, matrix, col.hnsw, col.dtype) if col._want_hnsw(n, False) \
                    else None
            dim = matrix.shape[1]
            buf = None if hnsw is not None else _grow(matrix, n, 0, dim, copy=True, dtype=col.dtype)  # held once
            generation = col._generation + 1
            with col._txn() as db:
                db.execute("DELETE FROM vectors WHERE slot = ? AND id NOT IN (SELECT id FROM docs)", (self.slot,))
                db.execute("DELETE FROM vectors WHERE slot != ?", (self.slot,))
                db.execute("DELETE FROM meta WHERE key = ?", (_REBUILD_KEY,))
                col._set_meta(version=self.version, dim=dim, slot=self.slot, generation=generation)
            if col.keep_previous and col._version not in (None, self.version):
                col._previous = col._snapshot()  # read-only from here on: writes go to the new matrix and graph
            col._version, col._dim, col._slot, col._generation = self.version, dim, self.slot, generation
            col._pending = None
            col._buf = buf
            col._ids, col._seqs, col._n = ids, seqs, n
            col._row = {doc_id: r for r, doc_id in enumerate(ids)}
            col._hnsw = hnsw
            col._dirty = None
            index_path = col._index_path()
        if hnsw is not None:
            try:
                hnsw.save(index_path)
            except OSError as err:  # only a cache: the next open rebuilds it
                logger.warning("could not save %s: %s", index_path, err)
        with col._lock:
            if not col._closed:
                col._remove_stale_index_files()
        return n


class Collection:
    """Docs and their vectors for ONE model version, persisted under ``root``; survives restarts.

    Args:
        root: directory of the collection (created if missing). One open Collection per root at a time.
        backend: ``"auto"`` (exact search below ``exact_threshold`` docs, usearch HNSW at or above it),
            ``"usearch"`` (always HNSW) or ``"exact"`` (always brute force).
        exact_threshold: doc count at which ``"auto"`` builds the HNSW index; it keeps it until the count falls
            below half of that.
        hnsw: the HNSW graph's settings (default :class:`HnswSettings`); a saved graph built with another
            connectivity is rebuilt on open.
        dtype: how the vectors are held in memory (:data:`DTYPES`): ``"f32"``, ``"f16"`` (half the memory) or
            ``"i8"`` (a quarter); scores are then that precise (``benchmarks/search.py`` measures the recall). On
            disk they stay float32.
        keep_previous: after a rebuild, keep the old version's vectors in memory, searchable with
            ``search(version=<old version>)``, until :meth:`drop_previous` or the next rebuild. A sharded index
            needs this while its shards swap one after another (:mod:`cliptuner.shards`). The previous version is
            a read-only view of the moment of the swap: docs written later are not in it (a deleted doc's id can
            still come back from it), and it is not persisted.

    Raises:
        ValueError: unknown backend or a threshold below 1.
        RuntimeError: ``root`` is already open in another Collection.
    """

    def __init__(self, root: str | Path, backend: str = "auto", exact_threshold: int = 5000,
                 hnsw: Optional[HnswSettings] = None, keep_previous: bool = False, dtype: str = "f32") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; allowed: {list(BACKENDS)}")
        if dtype not in DTYPES:
            raise ValueError(f"unknown vector dtype {dtype!r}; allowed: {list(DTYPES)}")
        self.dtype = dtype
        if not isinstance(keep_previous, bool):
            raise ValueError(f"keep_previous must be true or false, got {keep_previous!r}")
        self.keep_previous = keep_previous
        self._previous: Optional[_Snapshot] = None  # the version before the last rebuild (keep_previous)
        self.hnsw = hnsw if hnsw is not None else HnswSettings()
        self.exact_threshold = _check_positive_int("exact_threshold", exact_threshold)
        self.backend = backend
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # in-memory state and the SQLite connection
        self._rebuild_lock = threading.Lock()  # one rebuild at a time
        self._dirty: Optional[set[str]] = None  # ids upserted or deleted while a rebuild runs
        self._closed = True
        self._lock_file = open(self.root / LOCK_FILE, "a+")
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise RuntimeError(f"{str(self.root)!r} is already open in another Collection; close it first") from None
        try:
            self._db = sqlite3.connect(self.root / DB_FILE, isolation_level=None, check_same_thread=False)
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
                self._load()
            except BaseException:
                self._db.close()
                raise
        except BaseException:
            self._lock_file.close()
            raise
        self._closed = False

    # -- opening and persistence helpers -----------------------------------------------------------------
    def _load(self) -> None:
        meta = {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta")}
        self._version: Optional[str] = meta.get("version")
        self._dim: Optional[int] = meta.get("dim")
        self._slot: int = meta.get("slot", 0)
        self._generation: int = meta.get("generation", 0)
        pending = meta.get(_REBUILD_KEY)
        # an unfinished rebuild into a slot the manifest never pointed at; kept so that it can resume
        self._pending: Optional[dict] = pending if isinstance(pending, dict) and pending.get("slot") != self._slot \
            else None
        keep = self._pending["slot"] if self._pending is not None else self._slot
        with self._txn() as db:  # vectors of any other slot: left by a rebuild with no record, never read
            removed = db.execute("DELETE FROM vectors WHERE slot NOT IN (?, ?)", (self._slot, keep)).rowcount
            if pending is not None and self._pending is None:
                db.execute("DELETE FROM meta WHERE key = ?", (_REBUILD_KEY,))
        if removed:
            logger.info("removed %d vectors of an interrupted rebuild in %s", removed, self.root)
        if self._pending is not None:
            done = self._db.execute("SELECT COUNT(*) FROM vectors WHERE slot = ?", (keep,)).fetchone()[0]
            logger.info("%s: an unfinished rebuild for model version %r holds %d docs; rebuild(%r) resumes it",
                        self.root, self._pending.get("version"), done, self._pending.get("version"))
        rows = self._db.execute(
            "SELECT d.seq, d.id, v.vec FROM docs d JOIN vectors v ON v.id = d.id AND v.slot = ? ORDER BY d.seq",
            (self._slot,)).fetchall()
        n_docs = self._db.execute("SELECT COUNT(*) FROM docs").fetchone()[0]
        if n_docs != len(rows):
            logger.warning("%d docs in %s have no vector for version %r; rebuild() re-embeds them",
                           n_docs - len(rows), self.root, self._version)
        self._seqs: list[int] = [r[0] for r in rows]
        self._ids: list[str] = [r[1] for r in rows]
        self._row: dict[str, int] = {doc_id: i for i, doc_id in enumerate(self._ids)}
        self._n = len(rows)
        self._buf: Optional[np.ndarray] = None  # the vectors, unless the HNSW graph holds them
        matrix = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4").reshape(self._n, self._dim or 0)
        self._hnsw: Optional[_Hnsw] = None
        if self._want_hnsw(self._n, False):
            path = self._index_path()
            if path.exists():
                self._hnsw = _Hnsw.load(path, self._dim, self._seqs, self._ids, self.hnsw)
            if self._hnsw is None:
                self._hnsw = _Hnsw.build(self._dim, self._seqs, self._ids, matrix, self.hnsw, self.dtype)
                self._hnsw.save(path)
        elif rows:
            self._buf = _grow(matrix, self._n, 0, self._dim, copy=True, dtype=self.dtype)
        self._remove_stale_index_files()

    @contextlib.contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        """One SQLite write transaction; callers hold ``self._lock``."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _set_meta(self, **values: Any) -> None:
        self._db.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [(k, json.dumps(v)) for k, v in values.items()])

    def _index_path(self, slot: Optional[int] = None, generation: Optional[int] = None) -> Path:
        slot = self._slot if slot is None else slot
        generation = self._generation if generation is None else generation
        return self.root / f"{INDEX_PREFIX}{slot}-{generation}-{self.dtype}{INDEX_SUFFIX}"

    def _remove_stale_index_files(self) -> None:
        keep = self._index_path().name if self._hnsw is not None else None
        for path in self.root.glob(f"{INDEX_PREFIX}*{INDEX_SUFFIX}"):
            if path.name != keep:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _want_hnsw(self, n: int, have: bool) -> bool:
        if n == 0 or self.backend == "exact":
            return False
        if self.backend == "usearch":
            return True
        return n >= self.exact_threshold or (have and n >= self.exact_threshold // 2)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"collection {str(self.root)!r} is closed")

    def _fetch(self, ids: list[str], content: bool = True) -> dict[str, tuple[int, StoredDoc]]:
        """id -> (seq, doc) of the stored ones among ``ids`` (without blob and tensor unless ``content``);
        callers hold ``self._lock``."""
        found = {}
        columns = _DOC_COLUMNS if content else _DOC_COLUMNS_NO_CONTENT
        for start in range(0, len(ids), _SQL_CHUNK):
            chunk = ids[start:start + _SQL_CHUNK]
            sql = f"SELECT {columns} FROM docs WHERE id IN ({','.join('?' * len(chunk))})"
            for row in self._db.execute(sql, chunk):
                found[row[1]] = (row[0], _doc_from_row(row))
        return found

    def _stored_ids(self, ids: list[str]) -> set[str]:
        """The ids among ``ids`` that have a doc row; callers hold ``self._lock``."""
        stored: set[str] = set()
        for start in range(0, len(ids), _SQL_CHUNK):
            chunk = ids[start:start + _SQL_CHUNK]
            stored.update(i for (i,) in self._db.execute(
                f"SELECT id FROM docs WHERE id IN ({','.join('?' * len(chunk))})", chunk))
        return stored

    # -- reading -------------------------------------------------------------------------------------------
    @property
    def version(self) -> Optional[str]:
        """Model version of the stored vectors (None while empty and never set)."""
        return self._version

    @property
    def previous_version(self) -> Optional[str]:
        """The version before the last rebuild while it is kept (``keep_previous``), else None."""
        previous = self._previous
        return None if previous is None else previous.version

    def drop_previous(self) -> bool:
        """Free the previous version's vectors (searches already holding them finish); True if one was kept."""
        with self._lock:
            dropped, self._previous = self._previous is not None, None
        return dropped

    @property
    def dim(self) -> Optional[int]:
        """Dimension of the stored vectors (None before the first upsert)."""
        return self._dim

    def __len__(self) -> int:
        return self._n

    def __contains__(self, doc_id: object) -> bool:
        with self._lock:
            return doc_id in self._row

    def get(self, ids: list[str], content: bool = True) -> list[Optional[StoredDoc]]:
        """Stored docs by id, aligned with ``ids``; None for an unknown id.

        Args:
            ids: the doc ids.
            content: also read ``blob`` and ``tensor`` (the image bytes); when False they come back None and
                are never read from disk.
        """
        ids = list(ids)
        with self._lock:
            self._check_open()
            found = self._fetch([i for i in dict.fromkeys(ids) if isinstance(i, str)], content)
        return [found[i][1] if i in found else None for i in ids]

    def iter_docs(self, batch_size: int = 256) -> Iterator[list[StoredDoc]]:
        """All stored docs in insertion order, ``batch_size`` at a time (the lock is not held between batches)."""
        batch_size = _check_positive_int("batch_size", batch_size)
        after = 0
        while True:
            with self._lock:
                self._check_open()
                rows = self._db.execute(f"SELECT {_DOC_COLUMNS} FROM docs WHERE seq > ? ORDER BY seq LIMIT ?",
                                        (after, batch_size)).fetchall()
            if not rows:
                return
            after = rows[-1][0]
            yield [_doc_from_row(row) for row in rows]

    def stats(self) -> dict:
        """``{"count", "version", "dim", "backend"}`` (and ``previous_version`` with ``keep_previous``); backend is
        the one searches use now."""
        with self._lock:
            active = "usearch" if self._hnsw is not None or self.backend == "usearch" else "exact"
            stats = {"count": self._n, "version": self._version, "dim": self._dim, "backend": active}
            if self.keep_previous:
                stats["previous_version"] = self.previous_version
            return stats

    def memory_bytes(self) -> int:
        """Bytes the vectors take in memory now: the matrix (its allocated rows), or the HNSW graph (its vectors
        and links), which holds them itself: one or the other, never both. A previous version kept for a sharded
        search comes on top."""
        with self._lock:
            if self._hnsw is not None:
                with self._hnsw.lock:
                    return int(self._hnsw.index.serialized_length)
            return 0 if self._buf is None else int(self._buf.nbytes)

    def _snapshot(self, version: Optional[str] = None) -> _Snapshot:
        """What searches of ``version`` read: the previous version's vectors when it names that, else the live ones."""
        with self._lock:
            self._check_open()
            previous = self._previous
            if version is not None and previous is not None and version == previous.version \
                    and version != self._version:
                return previous
            matrix = self._buf[:self._n] if self._buf is not None else None
            return _Snapshot(self._version, self._n, self._dim, matrix, self._ids, self._seqs, self._hnsw)

    def search(self, queries: np.ndarray, limit: int, version: Optional[str] = None,
               where: Optional[dict] = None) -> list[list[tuple[str, float]]]:
        """Nearest stored docs by cosine similarity.

        Args:
            queries: [Q, D] (or one [D]) query vectors; normalised here.
            limit: at most this many matches per query (>= 1).
            version: the model version that made ``queries``; checked against the stored vectors' version (or
                the previous version, while ``keep_previous`` keeps one).
            where: tag equality filter (:func:`check_where`): only docs whose tags match are searched, exactly
                (a filtered search never misses a match the way an HNSW graph walk over all docs could).

        Returns:
            Per query, ``(doc id, cosine similarity)`` best first; ``[]`` per query while the collection is empty.

        Raises:
            ValueError: ``limit`` < 1, ``version`` differs from the stored version, bad query vectors, or a bad
                filter.
        """
        limit = _check_positive_int("limit", limit)
        where = check_where(where)
        queries = check_queries(queries)
        snap = self._snapshot(version)
        check_query_version(version, snap.version)
        if snap.n == 0 or queries.shape[0] == 0:
            return [[] for _ in range(queries.shape[0])]
        if queries.shape[1] != snap.dim:
            raise ValueError(f"queries have {queries.shape[1]} dims; the collection holds "
                             f"{snap.dim}-dim vectors (version {snap.version!r})")
        queries = _normalised(queries, [f"query {i}" for i in range(queries.shape[0])], "queries")
        if where:
            matching = self._ids_matching(where)
            kept = [r for r, doc_id in enumerate(snap.ids[:snap.n]) if doc_id in matching]
            if snap.matrix is not None:
                ids, vectors = [snap.ids[r] for r in kept], snap.matrix[kept]
            else:  # the graph holds the vectors: take those of the matching docs out of it
                ids, vectors = snap.hnsw.vectors([snap.seqs[r] for r in kept])
            if not ids:
                return [[] for _ in range(queries.shape[0])]
            return _exact_search(vectors, ids, queries, limit)
        if snap.hnsw is not None:
            return snap.hnsw.search(queries, limit)
        return _exact_search(snap.matrix, snap.ids[:snap.n], queries, limit)

    def _ids_matching(self, where: dict[str, TagValue]) -> set[str]:
        """Ids of the stored docs whose tags equal every pair of ``where``."""
        clauses, params = [], []
        for key, value in where.items():
            # json_type tells a JSON string from a number; booleans are JSON true/false (1/0 to SQLite)
            if isinstance(value, bool):
                clauses.append(f"json_type(tags, '$.{key}') = ?")
                params.append("true" if value else "false")
            elif isinstance(value, str):
                clauses.append(f"(json_type(tags, '$.{key}') = 'text' AND json_extract(tags, '$.{key}') = ?)")
                params.append(value)
            else:
                clauses.append(f"(json_type(tags, '$.{key}') IN ('integer', 'real') "
                               f"AND json_extract(tags, '$.{key}') = ?)")
                params.append(value)
        with self._lock:
            self._check_open()
            return {row[0] for row in self._db.execute(f"SELECT id FROM docs WHERE {' AND '.join(clauses)}", params)}

    # -- writing -------------------------------------------------------------------------------------------
    def upsert(self, docs: list[StoredDoc], vectors: np.ndarray, version: str) -> None:
        """Store docs and their vectors; an existing id has its doc and vector replaced.

        All or nothing: a call that raises stores nothing.

        Args:
            docs: the docs, unique non-empty ids.
            vectors: [N, D] float32, one row per doc (L2-normalised here).
            version: model version that made ``vectors``; must be the collection's unless it is empty.

        Raises:
            ValueError: a bad doc or vector (names the doc id), or a version/dimension mismatch.
        """
        version, docs, vecs = check_upsert(docs, vectors, version)  # vecs: [N, D]
        ids = [doc.id for doc in docs]
        rows = [_doc_row(doc) for doc in docs]
        with self._lock:
            self._check_open()
            empty = self._n == 0
            if not empty and version != self._version:
                raise ValueError(f"vectors are from model version {version!r} but the collection holds version "
                                 f"{self._version!r}; rebuild() the collection for {version!r} first")
            dim = vecs.shape[1]
            if not empty and dim != self._dim:
                raise ValueError(f"doc {ids[0]!r}: vector has {dim} dims; the collection holds {self._dim}-dim "
                                 f"vectors (version {self._version!r})")
            if not docs:
                return
            replace = [i for i, doc_id in enumerate(ids) if doc_id in self._row]
            append = [i for i, doc_id in enumerate(ids) if doc_id not in self._row]
            n = self._n
            buf = None  # while the HNSW graph holds the vectors, there is no matrix
            if self._hnsw is None:
                # Prepare the new matrix before committing: snapshots keep the old rows, appends go past them.
                buf = _grow(self._buf, n, len(append), dim, copy=bool(replace) or self._buf is None, dtype=self.dtype)
                held = _to_dtype(vecs, self.dtype)
                if replace:
                    buf[[self._row[ids[i]] for i in replace]] = held[replace]
                if append:
                    buf[n:n + len(append)] = held[append]
            generation = self._generation + 1
            with self._txn() as db:
                db.executemany(_UPSERT_DOC, rows)
                db.executemany("INSERT OR REPLACE INTO vectors (slot, id, vec) VALUES (?, ?, ?)",
                               [(self._slot, doc_id, _vec_bytes(vec)) for doc_id, vec in zip(ids, vecs)])
                if self._pending is not None:  # new-version vectors made from the content replaced here
                    db.executemany("DELETE FROM vectors WHERE id = ? AND slot != ?", [(i, self._slot) for i in ids])
                seq_of = {}
                new_ids = [ids[i] for i in append]
                for start in range(0, len(new_ids), _SQL_CHUNK):
                    chunk = new_ids[start:start + _SQL_CHUNK]
                    seq_of.update(db.execute(
                        f"SELECT id, seq FROM docs WHERE id IN ({','.join('?' * len(chunk))})", chunk).fetchall())
                self._set_meta(version=version, dim=dim, generation=generation)
            # Committed: publish.
            self._version, self._dim, self._generation = version, dim, generation
            self._buf = buf
            for i in append:
                self._row[ids[i]] = len(self._ids)
                self._ids.append(ids[i])
                self._seqs.append(seq_of[ids[i]])
            self._n = n + len(append)
            if self._dirty is not None:
                self._dirty.update(ids)
            changed = replace + append
            if self._hnsw is not None:
                self._hnsw.upsert([self._seqs[self._row[ids[i]]] for i in changed], [ids[i] for i in changed],
                                  vecs[changed])
            elif self._want_hnsw(self._n, False):  # the graph takes the vectors over from the matrix
                self._hnsw = _Hnsw.build(dim, self._seqs, self._ids, self._buf[:self._n], self.hnsw, self.dtype)
                self._buf = None

    def delete(self, ids: list[str], missing_ok: bool = True) -> int:
        """Remove docs by id (an id given twice counts once).

        Args:
            ids: the ids to remove.
            missing_ok: ignore ids that are not stored; when False, one unknown id makes the call remove nothing.

        Returns:
            The number of docs actually removed.

        Raises:
            ValueError: ``missing_ok`` is False and some ids are not stored (names them); nothing was removed.
        """
        ids = list(dict.fromkeys(ids))
        wanted = [i for i in ids if isinstance(i, str)]
        with self._lock:
            self._check_open()
            if not missing_ok:
                stored = self._stored_ids(wanted)
                unknown = [i for i in ids if i not in stored]
                if unknown:
                    shown = ", ".join(repr(i) for i in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
                    raise ValueError(f"doc(s) {shown} not stored; nothing was deleted")
            if self._dirty is not None:
                self._dirty.update(wanted)
            if not wanted:
                return 0
            generation = self._generation + 1
            with self._txn() as db:
                removed = sum(db.execute("DELETE FROM docs WHERE id = ?", (i,)).rowcount for i in wanted)
                if removed:
                    db.executemany("DELETE FROM vectors WHERE id = ?", [(i,) for i in wanted])
                    self._set_meta(generation=generation)
            if not removed:
                return 0
            self._generation = generation
            gone = {i for i in wanted if i in self._row}
            if gone:
                keep = [r for r, doc_id in enumerate(self._ids) if doc_id not in gone]
                removed_keys = [self._seqs[self._row[i]] for i in gone]
                if self._hnsw is None:
                    buf = _grow(None, 0, len(keep), self._dim, copy=True, dtype=self.dtype)
                    buf[:len(keep)] = self._buf[keep]
                    self._buf = buf
                elif self._want_hnsw(len(keep), True):
                    self._hnsw.remove(removed_keys)
                else:  # few enough for exact search again: the vectors go back from the graph into a matrix
                    _, vectors = self._hnsw.vectors([self._seqs[r] for r in keep])
                    buf = _grow(None, 0, len(keep), self._dim, copy=True, dtype=self.dtype)
                    buf[:len(keep)] = _to_dtype(vectors, self.dtype)
                    self._buf, self._hnsw = buf, None
                self._ids = [self._ids[r] for r in keep]
                self._seqs = [self._seqs[r] for r in keep]
                self._row = {doc_id: r for r, doc_id in enumerate(self._ids)}
                self._n = len(keep)
            return removed

    def rebuild(self, version: str, embed: Callable[[list[StoredDoc]], np.ndarray], batch_size: int = 256) -> int:
        """Re-embed every stored doc for a new model version and swap to it atomically.

        The new vectors and index are built on the side while searches keep using the old ones; the swap
        happens under the lock in memory and in one SQLite transaction on disk. Docs upserted or deleted while
        the rebuild runs are re-embedded (or dropped) before the swap. The new vectors are committed batch by
        batch: after a crash, a kill or an exception, the collection serves its old version, and the next
        ``rebuild`` for the same ``version`` embeds only the docs not done yet (see :class:`_Rebuild`).

        Args:
            version: the new model version.
            embed: maps a batch of docs to their [len(batch), D] vectors in the new version (called per batch).
            batch_size: docs per ``embed`` call.

        Returns:
            The number of docs the new version holds.

        Raises:
            ValueError: bad arguments, or ``embed`` returned bad vectors (names the doc id). Whatever ``embed``
                raises propagates; in every failure the collection keeps serving its old version and vectors.
        """
        version = _check_version(version)
        batch_size = _check_positive_int("batch_size", batch_size)
        with self._rebuild_lock:
            with self._lock:
                self._check_open()
                last_seq = self._db.execute("SELECT MAX(seq) FROM docs").fetchone()[0]
                if last_seq is None:  # empty: just take the version
                    if version != self._version or self._pending is not None:
                        with self._txn() as db:
                            db.execute("DELETE FROM vectors WHERE slot != ?", (self._slot,))
                            db.execute("DELETE FROM meta WHERE key = ?", (_REBUILD_KEY,))
                            self._set_meta(version=version, generation=self._generation + 1)
                        self._version, self._generation, self._pending = version, self._generation + 1, None
                    return 0
                job = _Rebuild.start(self, version, embed, batch_size, last_seq)
            try:
                return job.run()
            except BaseException:
                with self._lock:
                    self._dirty = None
                logger.warning("rebuild of %s for model version %s stopped after %d newly embedded docs; the old "
                               "version serves, and rebuild(%r) resumes", self.root, version, job.embedded, version)
                raise

    def close(self) -> None:
        """Save the HNSW index (if any), close the database and release ``root``. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._previous = None
            try:
                if self._hnsw is not None:
                    path = self._index_path()
                    if not path.exists():
                        self._hnsw.save(path)
                    self._remove_stale_index_files()
            finally:
                self._db.close()
                self._lock_file.close()

    def __enter__(self) -> "Collection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Collection({str(self.root)!r}, backend={self.backend!r}, count={self._n}, "
                f"version={self._version!r})")

