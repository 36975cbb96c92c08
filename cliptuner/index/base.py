"""The base of every vector store: the checks and the flow of each call, written once.

:class:`VectorStore` validates what callers give (ids, vectors, versions, filters, limits), guards the model
version (a search never compares two versions; an upsert of another version is refused until a rebuild),
serialises writes and rebuilds, and holds the ``<root>/.lock`` that keeps one open store per root. A backend
(:mod:`cliptuner.index.embedded`, :mod:`cliptuner.index.milvus`) implements the storage hooks below and a
:class:`Rebuild`. The behaviour suite ``tests/unit/test_vector_stores.py`` runs against every backend.
Torch-free: numpy and the standard library.
"""

from __future__ import annotations

import abc
import fcntl
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cliptuner.index.vectors import (
    StoredDoc,
    check_positive_int,
    check_queries,
    check_query_version,
    check_upsert,
    check_version,
    check_where,
    normalised,
)

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
CATCH_UP_ROUNDS = 3  # rebuild: rounds re-embedding concurrently changed docs before the final locked one
Embed = Callable[[list[StoredDoc]], np.ndarray]  # a batch of docs -> their [len(batch), D] vectors
Hits = list[list[tuple[str, float]]]  # per query, (doc id, cosine similarity) best first


class Rebuild(abc.ABC):
    """One rebuild of a store for a new model version, run in the caller's thread.

    A backend's rebuild embeds the stored docs on the side (resuming an unfinished rebuild of the same version),
    catches up with writes made meanwhile and swaps versions atomically in :meth:`finish`.

    Args:
        store: the store being rebuilt.
        version: the new model version.
        embed: maps a batch of docs to their vectors in ``version``.
        batch_size: docs per ``embed`` call.
        dim: the new vectors' dimension when known (a resumed rebuild), else None.
    """

    def __init__(self, store: VectorStore, version: str, embed: Embed, batch_size: int, dim: Optional[int]) -> None:
        self.store = store
        self.version = version
        self.embed = embed
        self.batch_size = batch_size
        self.dim = dim
        self.embedded = 0  # docs embedded by this run (resumed ones are not)

    def run(self) -> int:
        """Embed, catch up, swap; returns the number of docs the new version holds."""
        n = self.finish()
        logger.info(
            "rebuilt %s for model version %s: %d docs (%d embedded by this run)",
            self.store.root,
            self.version,
            n,
            self.embedded,
        )
        return n

    @abc.abstractmethod
    def finish(self) -> int:
        """Embed what is not done, catch up with concurrent writes and swap; returns the new doc count."""

    def embed_batch(self, docs: list[StoredDoc]) -> np.ndarray:
        """``embed(docs)`` checked: finite, L2-normalised, of one dimension across batches and within the store's
        limit; names the first doc of a bad batch."""
        ids = [doc.id for doc in docs]
        vecs = normalised(self.embed(docs), ids, "embed() output")  # [len(docs), D]
        if self.dim is not None and vecs.shape[1] != self.dim:
            raise ValueError(
                f"embed() returned {vecs.shape[1]}-dim vectors for doc {ids[0]!r}; earlier batches were {self.dim}-dim"
            )
        self.store.check_dim(vecs.shape[1], ids[0], "embed() returned")
        self.dim = vecs.shape[1]
        self.embedded += len(docs)
        return vecs


class VectorStore(abc.ABC):
    """Docs and their vectors for ONE model version, kept under ``root``; the interface the indexer uses.

    Backends implement the hooks (``_connect``, ``_load``, ``_disconnect``, ``_held``, ``_fetch``, ``_next_docs``,
    ``_search``, ``_write``, ``_stored_ids``, ``_remove``, ``_start_rebuild``) and the properties. Writes, reads
    of stored docs and a rebuild's bookkeeping hold ``_lock`` (re-entrant); ``_rebuild_lock`` runs one rebuild
    at a time.

    Args:
        root: the store's local folder (created if missing). One open store per root at a time.
    """

    max_dim: Optional[int] = None  # the largest vector dimension the backend holds (None: no limit)
    holder = "the store"  # how limit errors name the backend

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._rebuild_lock = threading.Lock()  # one rebuild at a time
        self._closed = True

    # -- opening and closing ---------------------------------------------------------------------------------
    def _open(self) -> None:
        """Take ``root``'s lock file, connect and load; on any failure release what was taken.

        Raises:
            RuntimeError: ``root`` is already open in another store.
        """
        self._lock_file = open(self.root / LOCK_FILE, "a+")
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise RuntimeError(
                f"{str(self.root)!r} is already open in another {type(self).__name__}; close it first"
            ) from None
        try:
            self._connect()
            try:
                self._load()
            except BaseException:
                self._disconnect()
                raise
        except BaseException:
            self._lock_file.close()
            raise
        self._closed = False

    @abc.abstractmethod
    def _connect(self) -> None:
        """Open the backend's storage (a database file, a client)."""

    @abc.abstractmethod
    def _load(self) -> None:
        """Read the stored state: version, ids, an unfinished rebuild; drop leftovers of a crash."""

    @abc.abstractmethod
    def _disconnect(self) -> None:
        """Close what :meth:`_connect` opened."""

    def _before_close(self) -> None:
        """Save what a clean close keeps (called under the lock, before :meth:`_disconnect`)."""
        return None

    def close(self) -> None:
        """Save what the backend keeps on a clean close, close its storage and release ``root``. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._before_close()
            finally:
                try:
                    self._disconnect()
                finally:
                    self._lock_file.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} {str(self.root)!r} is closed")

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def version(self) -> Optional[str]:
        """Model version of the stored vectors (None while empty and never set)."""

    @property
    @abc.abstractmethod
    def dim(self) -> Optional[int]:
        """Dimension of the stored vectors (None before the first vector)."""

    @property
    def previous_version(self) -> Optional[str]:
        """The version before the last rebuild while it is kept searchable, else None."""
        return None

    def drop_previous(self) -> bool:
        """Free the previous version's vectors if one is kept; True if one was."""
        return False

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __contains__(self, doc_id: object) -> bool: ...

    @abc.abstractmethod
    def stats(self) -> dict:
        """``{"count", "version", "dim", "backend", ...}``: what the store holds now."""

    @abc.abstractmethod
    def _held(self) -> tuple[Optional[str], Optional[int], int]:
        """``(version, dim, count)`` of the live vectors; the caller holds the lock."""

    @abc.abstractmethod
    def _fetch(self, ids: list[str], content: bool) -> dict[str, StoredDoc]:
        """id -> stored doc of the stored ones among ``ids`` (unique strings); the caller holds the lock."""

    @abc.abstractmethod
    def _next_docs(self, cursor: Any, batch_size: int) -> tuple[list[StoredDoc], Any]:
        """The next ``batch_size`` stored docs in insertion order after ``cursor`` (None: from the start), and
        the cursor after them; the caller holds the lock."""

    def get(self, ids: list[str], content: bool = True) -> list[Optional[StoredDoc]]:
        """Stored docs by id, aligned with ``ids``; None for an unknown id.

        Args:
            ids: the doc ids.
            content: also read ``blob`` and ``tensor`` (the image bytes); when False they come back None and
                are never read.
        """
        ids = list(ids)
        with self._lock:
            self._check_open()
            found = self._fetch([i for i in dict.fromkeys(ids) if isinstance(i, str)], content)
        return [found.get(i) if isinstance(i, str) else None for i in ids]

    def iter_docs(self, batch_size: int = 256) -> Iterator[list[StoredDoc]]:
        """All stored docs with their content in insertion order, ``batch_size`` at a time (the lock is not held
        between batches; docs added meanwhile come at the end, deleted ones are skipped)."""
        batch_size = check_positive_int("batch_size", batch_size)
        cursor = None
        while True:
            with self._lock:
                self._check_open()
                docs, cursor = self._next_docs(cursor, batch_size)
            if not docs:
                return
            yield docs

    def search(
        self, queries: np.ndarray, limit: int, version: Optional[str] = None, where: Optional[dict] = None
    ) -> Hits:
        """Nearest stored docs by cosine similarity.

        Args:
            queries: [Q, D] (or one [D]) query vectors; normalised here.
            limit: at most this many matches per query (>= 1).
            version: the model version that made ``queries``; checked against the stored vectors' version (or
                a previous version the backend keeps searchable).
            where: tag equality filter (:func:`cliptuner.index.vectors.check_where`): only docs whose every named
                top-level tag equals the value match.

        Returns:
            Per query, ``(doc id, cosine similarity)`` best first (ties by insertion order); ``[]`` per query
            while the store is empty.

        Raises:
            ValueError: ``limit`` < 1, ``version`` differs from the stored version, bad query vectors, or a bad
                filter.
        """
        limit = check_positive_int("limit", limit)
        where = check_where(where)
        queries = check_queries(queries)
        return self._search(queries, limit, version, where)

    @abc.abstractmethod
    def _search(self, queries: np.ndarray, limit: int, version: Optional[str], where: dict) -> Hits:
        """:meth:`search` on checked arguments; checks the queries against the vectors it reads with
        :meth:`_checked_queries`."""

    @staticmethod
    def _checked_queries(
        queries: np.ndarray, version: Optional[str], held_version: Optional[str], held_dim: Optional[int], count: int
    ) -> Optional[np.ndarray]:
        """The queries normalised for a search of vectors of ``held_version``, or None when there is nothing to
        search (no docs, no queries).

        Raises:
            ValueError: the queries are of another version or dimension, or not finite / all zeros.
        """
        check_query_version(version, held_version)
        if count == 0 or queries.shape[0] == 0:
            return None
        if queries.shape[1] != held_dim:
            raise ValueError(
                f"queries have {queries.shape[1]} dims; the collection holds "
                f"{held_dim}-dim vectors (version {held_version!r})"
            )
        return normalised(queries, [f"query {i}" for i in range(queries.shape[0])], "queries")

    # -- writing -------------------------------------------------------------------------------------------
    def check_dim(self, dim: int, doc_id: str, what: str = "vector has") -> None:
        """Refuse vectors longer than the backend holds (names the doc)."""
        if self.max_dim is not None and dim > self.max_dim:
            raise ValueError(f"doc {doc_id!r}: {what} {dim} dims; {self.holder} holds at most {self.max_dim}")

    def _check_doc(self, doc: StoredDoc) -> None:
        """A backend's own limits on a doc (field sizes), after the common checks; raises ValueError."""
        return None

    def _prepare(self, docs: list[StoredDoc]) -> Any:
        """What a write needs from the docs, computed before the lock is taken (encoded rows, hashes)."""
        return None

    def upsert(self, docs: list[StoredDoc], vectors: np.ndarray, version: str) -> None:
        """Store docs and their vectors; an existing id has its doc and vector replaced (its insertion order kept).

        All or nothing: everything is validated before anything is written, and a call that raises stores
        nothing (as far as the backend allows, see its class).

        Args:
            docs: the docs, unique non-empty ids.
            vectors: [N, D] float32, one row per doc (L2-normalised here).
            version: model version that made ``vectors``; must be the store's unless it is empty.

        Raises:
            ValueError: a bad doc or vector (names the doc id), or a version/dimension mismatch.
        """
        version, docs, vecs = check_upsert(docs, vectors, version, self._check_doc)  # vecs: [N, D]
        ids = [doc.id for doc in docs]
        dim = vecs.shape[1]
        if ids:
            self.check_dim(dim, ids[0])
        prepared = self._prepare(docs)
        with self._lock:
            self._check_open()
            held_version, held_dim, count = self._held()
            if count and version != held_version:
                raise ValueError(
                    f"vectors are from model version {version!r} but the collection holds version "
                    f"{held_version!r}; rebuild() the collection for {version!r} first"
                )
            if count and dim != held_dim:
                raise ValueError(
                    f"doc {ids[0]!r}: vector has {dim} dims; the collection holds {held_dim}-dim "
                    f"vectors (version {held_version!r})"
                )
            if docs:
                self._write(docs, vecs, version, prepared)

    @abc.abstractmethod
    def _write(self, docs: list[StoredDoc], vecs: np.ndarray, version: str, prepared: Any) -> None:
        """Store checked docs and [N, D] unit vectors; the caller holds the lock."""

    def delete(self, ids: list[str], missing_ok: bool = True) -> int:
        """Remove docs by id (an id given twice counts once), with their vectors of every version held.

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
            return self._remove(wanted)

    @abc.abstractmethod
    def _stored_ids(self, ids: list[str]) -> set[str]:
        """The stored ones among ``ids``; the caller holds the lock."""

    @abc.abstractmethod
    def _remove(self, ids: list[str]) -> int:
        """Remove the stored ones among ``ids`` (unique strings); returns how many; the caller holds the lock."""

    def rebuild(self, version: str, embed: Embed, batch_size: int = 256) -> int:
        """Re-embed every stored doc for a new model version and swap to it atomically.

        The new vectors are built on the side while searches keep using the old ones. Docs upserted or deleted
        while the rebuild runs are re-embedded (or dropped) before the swap. After a failure (``embed`` raising,
        bad vectors, the process killed) the store serves its old version, and the next ``rebuild`` for the
        same ``version`` embeds only the docs not done yet (see the backend's :class:`Rebuild`).

        Args:
            version: the new model version.
            embed: maps a batch of docs (with text, uri, tags, blob and tensor) to their [len(batch), D] vectors
                in the new version (called per batch).
            batch_size: docs per ``embed`` call.

        Returns:
            The number of docs the new version holds.

        Raises:
            ValueError: bad arguments, or ``embed`` returned bad vectors (names the doc id). Whatever ``embed``
                raises propagates; in every failure the store keeps serving its old version.
        """
        version = check_version(version)
        batch_size = check_positive_int("batch_size", batch_size)
        with self._rebuild_lock:
            with self._lock:
                self._check_open()
                job = self._start_rebuild(version, embed, batch_size)
            if job is None:
                return 0
            try:
                return job.run()
            except BaseException:
                self._rebuild_stopped()
                logger.warning(
                    "rebuild of %s for model version %s stopped after %d newly embedded docs; the old "
                    "version serves, and rebuild(%r) resumes",
                    self.root,
                    version,
                    job.embedded,
                    version,
                )
                raise

    @abc.abstractmethod
    def _start_rebuild(self, version: str, embed: Embed, batch_size: int) -> Optional[Rebuild]:
        """The rebuild to run (taking over an unfinished one of ``version``), or None when the store is empty:
        it then just takes ``version``. The caller holds both locks."""

    def _rebuild_stopped(self) -> None:
        """Forget what a failed rebuild tracked in memory (its resumable state stays stored)."""
        return None


__all__ = ["CATCH_UP_ROUNDS", "LOCK_FILE", "Embed", "Hits", "Rebuild", "VectorStore"]
