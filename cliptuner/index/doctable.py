"""The SQLite file of the embedded store: docs, their vectors per slot, and the manifest.

Layout of ``docs.sqlite`` (WAL mode, ``synchronous=FULL``)::

    docs(seq, id, text, uri, blob, tensor, tags)   one row per doc; ``seq`` keeps insertion order
    vectors(slot, id, vec)                          float32 vectors, one slot per model version
    meta(key, value)                                the manifest (JSON values)

:class:`DocTable` names each query the collection makes (:mod:`cliptuner.index.embedded` decides what to write when);
a write is done inside :meth:`DocTable.txn`, one SQLite transaction, committed before it returns. The caller
serialises access (one connection, shared by threads under the collection's lock).
"""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cliptuner.index.vectors import StoredDoc, TagValue

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
_SQL_CHUNK = 500  # ids per `IN (...)` query, well under SQLite's variable limit


def _encode_tensor(tensor: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, tensor, allow_pickle=False)
    return buf.getvalue()


def _decode_tensor(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def doc_rows(docs: list[StoredDoc]) -> list[tuple]:
    """The ``docs`` rows of validated docs (id, text, uri, blob, tensor, tags), for :meth:`DocTable.upsert_rows`."""
    return [
        (
            doc.id,
            doc.text,
            doc.uri,
            None if doc.blob is None else bytes(doc.blob),
            None if doc.tensor is None else _encode_tensor(doc.tensor),
            json.dumps(doc.tags, ensure_ascii=False),
        )
        for doc in docs
    ]


def _doc_from_row(row: tuple) -> tuple[int, StoredDoc]:
    seq, doc_id, text, uri, blob, tensor, tags = row
    return seq, StoredDoc(
        id=doc_id,
        text=text,
        uri=uri,
        blob=None if blob is None else bytes(blob),
        tensor=None if tensor is None else _decode_tensor(tensor),
        tags=json.loads(tags),
    )


def vec_bytes(vec: np.ndarray) -> bytes:
    """A vector as the ``vectors`` table stores it (little-endian float32)."""
    return np.ascontiguousarray(vec, dtype="<f4").tobytes()


def vec_from_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def _chunks(ids: list[str]) -> Iterator[tuple[list[str], str]]:
    """``ids`` in chunks, each with its ``?, ?, ...`` placeholder list."""
    for start in range(0, len(ids), _SQL_CHUNK):
        chunk = ids[start : start + _SQL_CHUNK]
        yield chunk, ",".join("?" * len(chunk))


class DocTable:
    """One store's SQLite file; see the module doc for its tables.

    Raises:
        sqlite3.Error: the file cannot be opened or its schema created.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def txn(self) -> Iterator[DocTable]:
        """One write transaction (``BEGIN IMMEDIATE``): committed at the end of the block, rolled back if it raises."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- the manifest --------------------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta")}

    def set_meta(self, **values: Any) -> None:
        self._db.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [(k, json.dumps(v)) for k, v in values.items()],
        )

    def drop_meta(self, key: str) -> None:
        self._db.execute("DELETE FROM meta WHERE key = ?", (key,))

    # -- docs ------------------------------------------------------------------------------------------------------
    def upsert_rows(self, rows: list[tuple]) -> None:
        """Insert or replace docs by id, as :func:`doc_rows` encoded them (a replaced doc keeps its ``seq``)."""
        self._db.executemany(_UPSERT_DOC, rows)

    def delete_docs(self, ids: list[str]) -> int:
        """Remove docs (not their vectors); returns how many were there."""
        return sum(self._db.execute("DELETE FROM docs WHERE id = ?", (i,)).rowcount for i in ids)

    def seqs(self, ids: list[str]) -> dict[str, int]:
        """id -> seq of the stored ones among ``ids``."""
        found: dict[str, int] = {}
        for chunk, marks in _chunks(ids):
            found.update(self._db.execute(f"SELECT id, seq FROM docs WHERE id IN ({marks})", chunk).fetchall())
        return found

    def fetch(self, ids: list[str], content: bool = True) -> dict[str, tuple[int, StoredDoc]]:
        """id -> (seq, doc) of the stored ones among ``ids`` (without blob and tensor unless ``content``)."""
        columns = _DOC_COLUMNS if content else _DOC_COLUMNS_NO_CONTENT
        found = {}
        for chunk, marks in _chunks(ids):
            for row in self._db.execute(f"SELECT {columns} FROM docs WHERE id IN ({marks})", chunk):
                found[row[1]] = _doc_from_row(row)
        return found

    def stored_ids(self, ids: list[str]) -> set[str]:
        """The ids among ``ids`` that have a doc row."""
        stored: set[str] = set()
        for chunk, marks in _chunks(ids):
            stored.update(i for (i,) in self._db.execute(f"SELECT id FROM docs WHERE id IN ({marks})", chunk))
        return stored

    def all_ids(self) -> list[str]:
        return [doc_id for (doc_id,) in self._db.execute("SELECT id FROM docs")]

    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM docs").fetchone()[0]

    def max_seq(self) -> Optional[int]:
        """The newest doc's serial; None while there is no doc."""
        return self._db.execute("SELECT MAX(seq) FROM docs").fetchone()[0]

    def docs_after(self, after: int, limit: int) -> list[tuple[int, StoredDoc]]:
        """(seq, doc) of up to ``limit`` docs with a serial above ``after``, in insertion order."""
        rows = self._db.execute(
            f"SELECT {_DOC_COLUMNS} FROM docs WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        ).fetchall()
        return [_doc_from_row(row) for row in rows]

    def docs_without_vector(self, slot: int, after: int, up_to: int, limit: int) -> list[tuple[int, StoredDoc]]:
        """(seq, doc) of up to ``limit`` docs with a serial in ``(after, up_to]`` and no vector in ``slot``."""
        rows = self._db.execute(
            f"SELECT {_DOC_COLUMNS} FROM docs d WHERE seq > ? AND seq <= ? AND NOT EXISTS "
            "(SELECT 1 FROM vectors v WHERE v.slot = ? AND v.id = d.id) ORDER BY seq LIMIT ?",
            (after, up_to, slot, limit),
        ).fetchall()
        return [_doc_from_row(row) for row in rows]

    def ids_matching(self, where: dict[str, TagValue]) -> set[str]:
        """Ids of the docs whose tags equal every pair of ``where`` (keys checked by
        :func:`cliptuner.index.vectors.check_where`: tag names only, so they are safe inside the JSON path)."""
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
                clauses.append(
                    f"(json_type(tags, '$.{key}') IN ('integer', 'real') AND json_extract(tags, '$.{key}') = ?)"
                )
                params.append(value)
        return {row[0] for row in self._db.execute(f"SELECT id FROM docs WHERE {' AND '.join(clauses)}", params)}

    # -- vectors ---------------------------------------------------------------------------------------------------
    def slot_vectors(self, slot: int) -> list[tuple[int, str, bytes]]:
        """(seq, id, vector bytes) of the docs with a vector in ``slot``, in insertion order."""
        return self._db.execute(
            "SELECT d.seq, d.id, v.vec FROM docs d JOIN vectors v ON v.id = d.id AND v.slot = ? ORDER BY d.seq", (slot,)
        ).fetchall()

    def count_vectors(self, slot: int) -> int:
        return self._db.execute("SELECT COUNT(*) FROM vectors WHERE slot = ?", (slot,)).fetchone()[0]

    def put_vectors(self, slot: int, pairs: Iterable[tuple[str, np.ndarray]]) -> None:
        """Insert or replace ``(id, vector)`` rows of ``slot``."""
        self._db.executemany(
            "INSERT OR REPLACE INTO vectors (slot, id, vec) VALUES (?, ?, ?)",
            [(slot, doc_id, vec_bytes(vec)) for doc_id, vec in pairs],
        )

    def put_vectors_of_stored(self, slot: int, pairs: Iterable[tuple[str, np.ndarray]]) -> None:
        """Like :meth:`put_vectors`, skipping ids that have no doc (deleted meanwhile)."""
        self._db.executemany(
            "INSERT OR REPLACE INTO vectors (slot, id, vec) SELECT ?, id, ? FROM docs WHERE id = ?",
            [(slot, vec_bytes(vec), doc_id) for doc_id, vec in pairs],
        )

    def delete_vectors(self, ids: list[str], except_slot: Optional[int] = None) -> None:
        """Remove the vectors of ``ids`` in every slot, or in every slot but ``except_slot``."""
        if except_slot is None:
            self._db.executemany("DELETE FROM vectors WHERE id = ?", [(i,) for i in ids])
        else:
            self._db.executemany("DELETE FROM vectors WHERE id = ? AND slot != ?", [(i, except_slot) for i in ids])

    def keep_slots(self, *slots: int) -> int:
        """Remove the vectors of every other slot; returns how many rows went."""
        marks = ",".join("?" * len(slots))
        return self._db.execute(f"DELETE FROM vectors WHERE slot NOT IN ({marks})", slots).rowcount

    def drop_orphan_vectors(self, slot: int) -> None:
        """Remove the vectors of ``slot`` whose doc is gone."""
        self._db.execute("DELETE FROM vectors WHERE slot = ? AND id NOT IN (SELECT id FROM docs)", (slot,))
