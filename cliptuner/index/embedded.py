"""Embedded vector store behind the indexer: docs and their vectors for one model version, persisted on disk.

Layout::

    <root>/docs.sqlite                        docs, vectors per slot and the manifest (:mod:`cliptuner.index.doctable`);
                                              the manifest: version, dim, slot, generation, and ``rebuild``
                                              ({slot, version}) while a rebuild is unfinished
    <root>/usearch-<slot>-<generation>-<dtype>.index  saved HNSW graph of the active vectors (a cache, see below)
    <root>/.lock                              ``fcntl.flock``: one open Collection per root

The jobs, one place each: the SQLite file (:class:`cliptuner.index.doctable.DocTable`), the HNSW graph
(:class:`cliptuner.index.hnsw.HnswGraph`), the rebuild protocol (:class:`_Rebuild`), and here, in
:class:`Collection`, the vectors in memory (a copy-on-write matrix, or the graph) and what ties them together.
What both vector stores share: the checks and the flow of each call in :class:`cliptuner.index.base.VectorStore`,
the doc type, input checks and exact search in :mod:`cliptuner.index.vectors`.

Durability: every write (upsert, delete, a rebuild's batch, the swap) is one SQLite transaction, committed
with ``synchronous=FULL`` before the call returns, so what a call acknowledged survives ``kill -9`` and power
loss. The vectors in memory are derived from those rows on open.

The manifest lives in the database, not in a separate file: the vectors live there too, so flipping the
manifest in the same SQLite transaction that commits the last of the new vectors makes a rebuild's swap
atomic on disk, and a crash leaves either the old or the new version, never a pointer to missing vectors.
A rebuild writes the new vectors into a fresh slot, in batches, while the old slot keeps serving; an
interrupted rebuild (a crash, ``kill -9``, a failing ``embed``) leaves its slot and its ``rebuild`` record,
invisible to searches, and the next rebuild for the same version resumes from them (see :class:`_Rebuild`).
On open, rows of any other slot are deleted.

Search is exact (``queries @ matrix.T``) below ``exact_threshold`` docs and uses a usearch HNSW graph at or
above it (``backend="auto"``), or always one of the two. The vectors are held once in memory: in the matrix
while search is exact, in the graph (which needs them) once there is one; in float32, float16 or int8
(``dtype``). The graph is a cache of the vectors in the database: it is saved on :meth:`Collection.close` and
after a rebuild under a name that carries the write generation and the dtype, loaded on open when that name
matches, and otherwise rebuilt from the vectors (a process that died without ``close`` pays one build on the
next open, never a stale graph).

Thread-safety: one lock guards the in-memory state and the SQLite connection. A search takes a snapshot of
(version, matrix or graph, ids) under it and computes outside it. The matrix a snapshot holds is never
written again (appends go past its end; replacements and deletions copy), and a rebuild builds a new matrix
or graph on the side and swaps it in, so a search compares its queries with vectors of one version only.
Torch-free: numpy, usearch and the standard library.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cliptuner.index.base import CATCH_UP_ROUNDS, Embed, Hits, Rebuild, VectorStore
from cliptuner.index.doctable import DocTable, doc_rows, vec_from_bytes
from cliptuner.index.hnsw import HnswGraph, HnswSettings
from cliptuner.index.vectors import (
    DTYPES,
    NUMPY_DTYPES,
    StoredDoc,
    TagValue,
    as_f32,
    check_positive_int,
    check_queries,
    check_query_version,
    check_upsert,
    check_where,
    exact_search,
    to_dtype,
)

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "usearch", "exact")
DB_FILE = "docs.sqlite"
INDEX_PREFIX = "usearch-"
INDEX_SUFFIX = ".index"
_MIN_CAPACITY = 1024  # rows allocated for the first vectors
_REBUILD_KEY = "rebuild"  # meta key naming the slot and version of an unfinished rebuild


def _grow(buf: Optional[np.ndarray], n: int, extra: int, dim: int, copy: bool, dtype: str = "f32") -> np.ndarray:
    """A ``dtype`` buffer with room for ``n + extra`` rows whose first ``n`` rows are ``buf``'s (float32 rows are
    converted); ``buf`` itself when it fits."""
    kind = NUMPY_DTYPES[dtype]
    need = n + extra
    if not copy and buf is not None and buf.shape[1] == dim and buf.shape[0] >= need and buf.dtype == kind:
        return buf
    old_cap = 0 if buf is None else buf.shape[0]
    new = np.empty((max(_MIN_CAPACITY, need, 2 * old_cap if need > old_cap else old_cap), dim), kind)
    if n:
        new[:n] = buf[:n] if buf.dtype == kind else to_dtype(as_f32(buf[:n]), dtype)
    return new


@dataclass(frozen=True)
class _Snapshot:
    version: Optional[str]
    n: int  # rows
    dim: Optional[int]
    matrix: Optional[np.ndarray]  # [n, dim]; never written while a snapshot holds it; None while `hnsw` holds them
    ids: list[str]  # row -> doc id (rows < n never change while a snapshot holds the list)
    seqs: list[int]  # row -> doc serial, the HNSW key
    hnsw: Optional[HnswGraph]


class _Rebuild(Rebuild):
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

    The collection's lock guards what it shares with writers and searches.
    """

    def __init__(
        self,
        col: Collection,
        version: str,
        embed: Embed,
        batch_size: int,
        slot: int,
        last_seq: int,
        done: dict[str, tuple[int, np.ndarray]],
    ) -> None:
        super().__init__(col, version, embed, batch_size, next(iter(done.values()))[1].shape[0] if done else None)
        self.col = col
        self.slot = slot
        self.last_seq = last_seq  # docs up to this serial are embedded in order; later ones come as dirty
        self.new = done  # id -> (seq, normalised new vector)

    @classmethod
    def start(cls, col: Collection, version: str, embed: Embed, batch_size: int, last_seq: int) -> _Rebuild:
        """Register the rebuild (or take over the unfinished one of ``version``) and start tracking writes.

        The caller holds ``col._lock``, so no write slips between reading the done vectors and tracking.
        """
        pending = col._pending
        done: dict[str, tuple[int, np.ndarray]] = {}
        if pending is not None and pending.get("version") == version:
            slot = int(pending["slot"])
            done = {doc_id: (seq, vec_from_bytes(vec)) for seq, doc_id, vec in col._table.slot_vectors(slot)}
            if len({vec.shape[0] for _, vec in done.values()}) > 1:  # not written by this code: start over
                done = {}
            logger.info(
                "resuming the rebuild of %s for model version %s: %d docs already embedded",
                col.root,
                version,
                len(done),
            )
        else:
            slot = col._slot + 1
            with col._table.txn() as table:
                table.keep_slots(col._slot)
                table.set_meta(**{_REBUILD_KEY: {"slot": slot, "version": version}})
            col._pending = {"slot": slot, "version": version}
        col._dirty = set()
        return cls(col, version, embed, batch_size, slot, last_seq, done)

    def finish(self) -> int:
        """Embed what is not done, catch up with concurrent writes, then swap; returns the new doc count."""
        self._embed_stored()
        for _ in range(CATCH_UP_ROUNDS):  # without the lock while embedding
            changed = self._take_dirty()
            if not changed:
                break
            self._embed_into_new(changed)
        seqs, ids, matrix = self._ordered()
        col = self.col
        hnsw = (
            HnswGraph.build(self.dim, seqs, ids, matrix, col.hnsw, col.dtype)
            if col._want_hnsw(len(ids), col._hnsw is not None)
            else None
        )
        return self._swap(hnsw)

    def _embed_stored(self) -> None:
        """Every doc stored when the rebuild started and not yet in the slot, in batches, without the lock."""
        col = self.col
        after = 0
        while True:
            with col._lock:
                col._check_open()
                pairs = col._table.docs_without_vector(self.slot, after, self.last_seq, self.batch_size)
            if not pairs:
                return
            after = pairs[-1][0]
            self._embed_into_new(pairs)

    def _embed_into_new(self, pairs: list[tuple[int, StoredDoc]]) -> list[str]:
        """Embed ``(seq, doc)`` pairs into ``self.new`` and the slot; returns their ids.

        Takes the collection's lock only to write (re-entrant: :meth:`_swap` calls this with it held).
        """
        col = self.col
        for start in range(0, len(pairs), self.batch_size):
            batch = pairs[start : start + self.batch_size]
            docs = [doc for _, doc in batch]
            ids = [doc.id for doc in docs]
            vecs = self.embed_batch(docs)  # [len(batch), D]
            with col._lock:
                col._check_open()
                # a doc written since it was read is dirty: its vector here is stale, and it is embedded again
                fresh = [(doc_id, vec) for doc_id, vec in zip(ids, vecs) if doc_id not in col._dirty]
                with col._table.txn() as table:  # docs deleted meanwhile are skipped
                    table.put_vectors_of_stored(self.slot, fresh)
            for (seq, doc), vec in zip(batch, vecs):
                self.new[doc.id] = (seq, vec)
        return [doc.id for _, doc in pairs]

    def _take_dirty(self) -> list[tuple[int, StoredDoc]]:
        """Docs written since they were embedded (to embed again); deleted ones leave ``self.new``."""
        col = self.col
        with col._lock:
            dirty, col._dirty = col._dirty, set()
            current = col._table.fetch(sorted(dirty))
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

    def _swap(self, hnsw: Optional[HnswGraph]) -> int:
        """Under the lock: the last changes, then one transaction flips the manifest, then the in-memory swap.

        ``hnsw`` was built from ``self.new`` as it was before this call; it is patched, or rebuilt, here.
        """
        col = self.col
        with col._lock:
            col._check_open()
            built = {doc_id: seq for doc_id, (seq, _) in self.new.items()}  # what `hnsw` holds
            touched = self._embed_into_new(self._take_dirty())
            stored = col._table.all_ids()
            # docs with no vector yet (none unless the database was edited by hand)
            touched += self._embed_into_new(list(col._table.fetch([i for i in stored if i not in self.new]).values()))
            seqs, ids, matrix = self._ordered()
            n = len(ids)
            if hnsw is not None and col._want_hnsw(n, True):
                hnsw.remove(
                    [seq for doc_id, seq in built.items() if doc_id not in self.new or self.new[doc_id][0] != seq]
                )
                if touched:
                    hnsw.upsert([self.new[i][0] for i in touched], touched, np.stack([self.new[i][1] for i in touched]))
            else:
                hnsw = (
                    HnswGraph.build(self.dim, seqs, ids, matrix, col.hnsw, col.dtype)
                    if col._want_hnsw(n, False)
                    else None
                )
            dim = matrix.shape[1]
            buf = None if hnsw is not None else _grow(matrix, n, 0, dim, copy=True, dtype=col.dtype)  # held once
            generation = col._generation + 1
            with col._table.txn() as table:
                table.drop_orphan_vectors(self.slot)
                table.keep_slots(self.slot)
                table.drop_meta(_REBUILD_KEY)
                table.set_meta(version=self.version, dim=dim, slot=self.slot, generation=generation)
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


class Collection(VectorStore):
    """Docs and their vectors for ONE model version, persisted under ``root``; survives restarts.

    The calls and their checks are :class:`cliptuner.index.base.VectorStore`'s; this class keeps the docs in
    SQLite and the vectors in memory (a matrix or an HNSW graph). A search with a tag filter is exact over the
    matching docs (it never misses a match the way an HNSW walk over all docs could).

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
            needs this while its shards swap one after another (:mod:`cliptuner.index.shards`). The previous version is
            a read-only view of the moment of the swap: docs written later are not in it (a deleted doc's id can
            still come back from it), and it is not persisted.

    Raises:
        ValueError: unknown backend or a threshold below 1.
        RuntimeError: ``root`` is already open in another Collection.
    """

    def __init__(
        self,
        root: str | Path,
        backend: str = "auto",
        exact_threshold: int = 5000,
        hnsw: Optional[HnswSettings] = None,
        keep_previous: bool = False,
        dtype: str = "f32",
    ) -> None:
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
        self.exact_threshold = check_positive_int("exact_threshold", exact_threshold)
        self.backend = backend
        super().__init__(root)  # the lock guards the in-memory state and the SQLite connection
        self._dirty: Optional[set[str]] = None  # ids upserted or deleted while a rebuild runs
        self._open()

    # -- opening, closing and persistence ------------------------------------------------------------------
    def _connect(self) -> None:
        self._table = DocTable(self.root / DB_FILE)

    def _disconnect(self) -> None:
        self._table.close()

    def _before_close(self) -> None:
        """Save the HNSW graph (if any) and drop the previous version's vectors."""
        self._previous = None
        if self._hnsw is not None:
            path = self._index_path()
            if not path.exists():
                self._hnsw.save(path)
            self._remove_stale_index_files()

    def _load(self) -> None:
        meta = self._table.meta()
        self._version: Optional[str] = meta.get("version")
        self._dim: Optional[int] = meta.get("dim")
        self._slot: int = meta.get("slot", 0)
        self._generation: int = meta.get("generation", 0)
        pending = meta.get(_REBUILD_KEY)
        # an unfinished rebuild into a slot the manifest never pointed at; kept so that it can resume
        self._pending: Optional[dict] = (
            pending if isinstance(pending, dict) and pending.get("slot") != self._slot else None
        )
        keep = self._pending["slot"] if self._pending is not None else self._slot
        with self._table.txn() as table:  # vectors of any other slot: left by a rebuild with no record, never read
            removed = table.keep_slots(self._slot, keep)
            if pending is not None and self._pending is None:
                table.drop_meta(_REBUILD_KEY)
        if removed:
            logger.info("removed %d vectors of an interrupted rebuild in %s", removed, self.root)
        if self._pending is not None:
            done = self._table.count_vectors(keep)
            logger.info(
                "%s: an unfinished rebuild for model version %r holds %d docs; rebuild(%r) resumes it",
                self.root,
                self._pending.get("version"),
                done,
                self._pending.get("version"),
            )
        rows = self._table.slot_vectors(self._slot)
        n_docs = self._table.count()
        if n_docs != len(rows):
            logger.warning(
                "%d docs in %s have no vector for version %r; rebuild() re-embeds them",
                n_docs - len(rows),
                self.root,
                self._version,
            )
        self._seqs: list[int] = [r[0] for r in rows]
        self._ids: list[str] = [r[1] for r in rows]
        self._row: dict[str, int] = {doc_id: i for i, doc_id in enumerate(self._ids)}
        self._n = len(rows)
        self._buf: Optional[np.ndarray] = None  # the vectors, unless the HNSW graph holds them
        matrix = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4").reshape(self._n, self._dim or 0)
        self._hnsw: Optional[HnswGraph] = None
        if self._want_hnsw(self._n, False):
            path = self._index_path()
            if path.exists():
                self._hnsw = HnswGraph.load(path, self._dim, self._seqs, self._ids, self.hnsw)
            if self._hnsw is None:
                self._hnsw = HnswGraph.build(self._dim, self._seqs, self._ids, matrix, self.hnsw, self.dtype)
                self._hnsw.save(path)
        elif rows:
            self._buf = _grow(matrix, self._n, 0, self._dim, copy=True, dtype=self.dtype)
        self._remove_stale_index_files()

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

    def _held(self) -> tuple[Optional[str], Optional[int], int]:
        return self._version, self._dim, self._n

    def _fetch(self, ids: list[str], content: bool) -> dict[str, StoredDoc]:
        return {doc_id: doc for doc_id, (_, doc) in self._table.fetch(ids, content).items()}

    def _next_docs(self, cursor: Optional[int], batch_size: int) -> tuple[list[StoredDoc], Optional[int]]:
        pairs = self._table.docs_after(cursor or 0, batch_size)
        return [doc for _, doc in pairs], (pairs[-1][0] if pairs else cursor)

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
            if (
                version is not None
                and previous is not None
                and version == previous.version
                and version != self._version
            ):
                return previous
            matrix = self._buf[: self._n] if self._buf is not None else None
            return _Snapshot(self._version, self._n, self._dim, matrix, self._ids, self._seqs, self._hnsw)

    def _search(self, queries: np.ndarray, limit: int, version: Optional[str], where: dict) -> Hits:
        """Exact or HNSW search of a snapshot (the previous version's, while ``keep_previous`` keeps the one
        ``version`` names); a tag filter searches the matching docs exactly."""
        snap = self._snapshot(version)
        normed = self._checked_queries(queries, version, snap.version, snap.dim, snap.n)
        if normed is None:
            return [[] for _ in range(queries.shape[0])]
        queries = normed
        if where:
            with self._lock:
                self._check_open()
                matching = self._table.ids_matching(where)
            kept = [r for r, doc_id in enumerate(snap.ids[: snap.n]) if doc_id in matching]
            if snap.matrix is not None:
                ids, vectors = [snap.ids[r] for r in kept], snap.matrix[kept]
            else:  # the graph holds the vectors: take those of the matching docs out of it
                ids, vectors = snap.hnsw.vectors([snap.seqs[r] for r in kept])
            if not ids:
                return [[] for _ in range(queries.shape[0])]
            return exact_search(vectors, ids, queries, limit)
        if snap.hnsw is not None:
            return snap.hnsw.search(queries, limit)
        return exact_search(snap.matrix, snap.ids[: snap.n], queries, limit)

    # -- writing -------------------------------------------------------------------------------------------
    def _prepare(self, docs: list[StoredDoc]) -> list[tuple]:
        return doc_rows(docs)  # encoded before the lock is taken

    def _write(self, docs: list[StoredDoc], vecs: np.ndarray, version: str, prepared: Any) -> None:
        """Commit the rows and vectors in one transaction, then publish them in memory."""
        ids = [doc.id for doc in docs]
        dim = vecs.shape[1]
        replace = [i for i, doc_id in enumerate(ids) if doc_id in self._row]
        append = [i for i, doc_id in enumerate(ids) if doc_id not in self._row]
        n = self._n
        buf = None  # while the HNSW graph holds the vectors, there is no matrix
        if self._hnsw is None:
            # Prepare the new matrix before committing: snapshots keep the old rows, appends go past them.
            buf = _grow(self._buf, n, len(append), dim, copy=bool(replace) or self._buf is None, dtype=self.dtype)
            held = to_dtype(vecs, self.dtype)
            if replace:
                buf[[self._row[ids[i]] for i in replace]] = held[replace]
            if append:
                buf[n : n + len(append)] = held[append]
        generation = self._generation + 1
        with self._table.txn() as table:
            table.upsert_rows(prepared)
            table.put_vectors(self._slot, zip(ids, vecs))
            if self._pending is not None:  # new-version vectors made from the content replaced here
                table.delete_vectors(ids, except_slot=self._slot)
            seq_of = table.seqs([ids[i] for i in append])
            table.set_meta(version=version, dim=dim, generation=generation)
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
            self._hnsw.upsert(
                [self._seqs[self._row[ids[i]]] for i in changed], [ids[i] for i in changed], vecs[changed]
            )
        elif self._want_hnsw(self._n, False):  # the graph takes the vectors over from the matrix
            self._hnsw = HnswGraph.build(dim, self._seqs, self._ids, self._buf[: self._n], self.hnsw, self.dtype)
            self._buf = None

    def _stored_ids(self, ids: list[str]) -> set[str]:
        return self._table.stored_ids(ids)

    def _remove(self, ids: list[str]) -> int:
        """Delete the docs and all their vectors in one transaction; a running rebuild drops them too."""
        if self._dirty is not None:
            self._dirty.update(ids)
        if not ids:
            return 0
        generation = self._generation + 1
        with self._table.txn() as table:
            removed = table.delete_docs(ids)
            if removed:
                table.delete_vectors(ids)
                table.set_meta(generation=generation)
        if not removed:
            return 0
        self._generation = generation
        gone = {i for i in ids if i in self._row}
        if gone:
            keep = [r for r, doc_id in enumerate(self._ids) if doc_id not in gone]
            removed_keys = [self._seqs[self._row[i]] for i in gone]
            if self._hnsw is None:
                buf = _grow(None, 0, len(keep), self._dim, copy=True, dtype=self.dtype)
                buf[: len(keep)] = self._buf[keep]
                self._buf = buf
            elif self._want_hnsw(len(keep), True):
                self._hnsw.remove(removed_keys)
            else:  # few enough for exact search again: the vectors go back from the graph into a matrix
                _, vectors = self._hnsw.vectors([self._seqs[r] for r in keep])
                buf = _grow(None, 0, len(keep), self._dim, copy=True, dtype=self.dtype)
                buf[: len(keep)] = to_dtype(vectors, self.dtype)
                self._buf, self._hnsw = buf, None
            self._ids = [self._ids[r] for r in keep]
            self._seqs = [self._seqs[r] for r in keep]
            self._row = {doc_id: r for r, doc_id in enumerate(self._ids)}
            self._n = len(keep)
        return removed

    def _start_rebuild(self, version: str, embed: Embed, batch_size: int) -> Optional[_Rebuild]:
        """A :class:`_Rebuild` into a fresh slot (or the unfinished one of ``version``); an empty collection just
        takes ``version``."""
        last_seq = self._table.max_seq()
        if last_seq is not None:
            return _Rebuild.start(self, version, embed, batch_size, last_seq)
        if version != self._version or self._pending is not None:
            with self._table.txn() as table:
                table.keep_slots(self._slot)
                table.drop_meta(_REBUILD_KEY)
                table.set_meta(version=version, generation=self._generation + 1)
            self._version, self._generation, self._pending = version, self._generation + 1, None
        return None

    def _rebuild_stopped(self) -> None:
        with self._lock:
            self._dirty = None

    def __repr__(self) -> str:
        return f"Collection({str(self.root)!r}, backend={self.backend!r}, count={self._n}, version={self._version!r})"


__all__ = [
    "BACKENDS",
    "DTYPES",
    "Collection",
    "HnswSettings",
    "StoredDoc",
    "TagValue",
    "check_queries",
    "check_query_version",
    "check_upsert",
    "check_where",
]
