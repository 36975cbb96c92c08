"""Milvus vector store behind the indexer: the API and semantics of :class:`cliptuner.index.embedded.Collection` on Milvus.

:class:`MilvusCollection` keeps docs and their vectors for one model version in a Milvus server or cluster
(``uri="http://host:19530"``) or in Milvus Lite, an embedded in-process Milvus on a local file
(``uri=None``: ``<root>/milvus.db``). It needs the ``milvus`` extra: ``pip install "cliptuner[milvus]"``;
pymilvus is imported only when a :class:`MilvusCollection` is made.

Layout::

    Milvus   <name>__<version slug>_<token>   one collection per model version (the slug is the version with
                                              every character outside [A-Za-z0-9_] replaced by ``_``; the real
                                              version is the collection property ``cliptuner.version``)
               id       VARCHAR(512) primary key       doc id
               vector   FLOAT_VECTOR(dim)              L2-normalised, metric IP (= cosine)
               text     VARCHAR, nullable              doc text (None round-trips as None)
               uri      VARCHAR, nullable              doc uri
               tags     JSON                           doc tags (filterable with ``search(where=...)``)
               seq      INT64                          insertion order (kept when a doc is replaced)
               chash    VARCHAR(32)                    hash of the doc's content (text, uri, tags, blob, tensor)
               content  VARCHAR                        name of the doc's content file, "" when it has none
             <name>                           alias naming the live collection; searches go through it only
    <root>/content/<ab>/<id hash>-<chash>.npz  the doc's ``blob`` and ``tensor`` (too big for Milvus fields)
    <root>/milvus.db/                          Milvus Lite's data (only when ``uri`` is None)
    <root>/.lock                               ``fcntl.flock``: one open store per root

Content files: named by a hash of the doc id and the hash of the doc's content, written atomically and
fsynced before the Milvus row that names them, so a row always finds its file and an upsert that fails leaves
the previous file (and row) in place; the file a replaced or deleted doc no longer names is removed after the
Milvus write, and files no row names (left by a crash between the two) are removed on open.

Versions and rebuilds: :meth:`MilvusCollection.rebuild` fills a new collection (property ``cliptuner.state`` =
``building``) from the stored content in batches while the live one serves, marks the live one ``retired``,
points the alias at the new one (``alter_alias``: atomic for searches) and drops the old one. An interrupted
rebuild (a failing ``embed``, a killed process) leaves its collection behind; the next rebuild for the same
version resumes from it. What is still valid there is decided by content hashes: a row is kept when its
``chash`` equals the live doc's, so a doc changed or deleted since it was embedded (by this process or after a
restart) is embedded again, or dropped. While a rebuild collection exists, a delete removes the doc from both
collections and an upsert that changes a doc's content removes its stale vector from the rebuild collection; a
batch embedded from content that changed meanwhile is not written. Before the switch, every live doc is
re-embedded until the rebuild collection holds exactly the live docs with their current content hashes (the
last round holds the write lock). On open, ``retired`` collections (a crash between the switch and the drop)
are dropped, and of several ``building`` ones all but the newest.

Durability: Milvus acknowledges a write once it is in its write-ahead log. On a server that log is the
cluster's (durable when the call returns). Milvus Lite appends it to a local WAL file and flushes it to the OS
before the call returns, so an acknowledged write survives the process being killed, but it does not fsync
it (nor its alias file), so a power loss can lose recent writes: Lite's ``flush`` does not close that gap (it
writes unsynced Parquet files), so writes are not flushed one by one; :meth:`MilvusCollection.close` flushes
and closes Lite's files.

Thread-safety: one re-entrant lock serialises writes, reads of stored docs and the rebuild's bookkeeping. A
search holds no lock: it takes the live version under a sequence counter that the switch bumps before and after
moving the alias, searches through the alias, and is retried when the counter moved meanwhile, so its results
and the version it checked belong to one collection. One writer per Milvus collection family (``uri``,
``name``): the in-memory id map (ids, insertion serials, content hashes) is loaded on open and kept current by
this process's writes. Torch-free: numpy, pymilvus and the standard library.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np

from cliptuner.index.base import CATCH_UP_ROUNDS, Embed, Hits, Rebuild, VectorStore
from cliptuner.index.vectors import StoredDoc, TagValue, check_positive_int, check_where
from cliptuner.model.atomic import atomic_path, fsync_path

logger = logging.getLogger(__name__)

INDEXES = ("HNSW", "FLAT", "AUTOINDEX")
LITE_FILE = "milvus.db"
CONTENT_DIR = "content"
MAX_ID_BYTES = 512  # the primary key's max_length
MAX_TEXT_BYTES = 65535  # max_length of the text and uri fields (Milvus's VARCHAR limit)
MAX_TAGS_BYTES = 65536  # Milvus's default limit on one JSON value
MAX_DIM = 32768  # Milvus's limit on a FLOAT_VECTOR's dimension
MAX_TOPK = 16384  # Milvus's limit on matches per query
_MAX_NAME = 64  # characters of ``name``; collection names add a version slug and a token (Milvus allows 255)
_SLUG = 48  # characters of the version kept in a collection name
_PLACEHOLDER_DIM = 2  # vector dim of a collection made for a version before any vector is known
_CONTENT_NAME_BYTES = 128
_CHASH_CHARS = 32
_READ_CHUNK = 500  # ids per `id in [...]` read
_ITER_BATCH = 1000  # rows per page when scanning a collection
_SEARCH_RETRIES = 3  # a search that overlapped this many switches gives up
_PROP_VERSION = "cliptuner.version"
_PROP_DIM = "cliptuner.dim"  # "" while the collection has not held a vector (placeholder dim)
_PROP_STATE = "cliptuner.state"
_PROP_CREATED = "cliptuner.created"  # time.time_ns() at creation: the newest unfinished rebuild wins
_BUILDING = "building"
_RETIRED = "retired"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# a server's address as pymilvus takes it: http(s) or tcp, a host, an optional port and database path (a local
# ``.db`` file would start Milvus Lite without this store's Lite handling: that is ``uri=None``)
_SERVER_URI = re.compile(r"(https?|tcp)://(\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]+)(:\d{1,5})?(/\S*)?", re.IGNORECASE)
_OUTPUT_FIELDS = ["text", "uri", "tags", "seq", "chash", "content"]
_MISSING = object()  # a tag the doc does not have


class MilvusNotInstalledError(ImportError):
    """pymilvus (or, for Milvus Lite, milvus-lite) is missing: ``pip install "cliptuner[milvus]"``."""


def _import_pymilvus(lite: bool) -> Any:
    """The ``pymilvus`` module; for Milvus Lite also checks that ``milvus_lite`` imports.

    Raises:
        MilvusNotInstalledError: a package is missing (the message says how to install it).
    """
    try:
        import pymilvus
    except ImportError as err:
        raise MilvusNotInstalledError(
            'the Milvus vector store needs pymilvus: pip install "cliptuner[milvus]"'
        ) from err
    if lite:
        try:
            import milvus_lite  # noqa: F401 - pymilvus starts it for a .db URI
        except ImportError as err:
            raise MilvusNotInstalledError(
                'Milvus Lite (uri=None) needs milvus-lite: pip install "cliptuner[milvus]"'
                ", or pass the uri of a Milvus server"
            ) from err
    return pymilvus


class _Entry(NamedTuple):
    """What this process keeps per stored doc: its insertion serial, content hash and content file name."""

    seq: int
    chash: str
    content: str


@dataclass(frozen=True)
class _Target:
    """A Milvus collection of this store: its name, the model version and the vectors' dim (None: none yet)."""

    name: str
    version: str
    dim: Optional[int]


@dataclass
class _Cursor:
    """Where :meth:`MilvusCollection.iter_docs` is: the last serial given, and the sorted serials after it."""

    after: int = 0
    order: list[tuple[int, str]] = field(default_factory=list)
    pos: int = 0


# -- encoding ------------------------------------------------------------------------------------------------
def _quote(value: str) -> str:
    """A Milvus filter string literal for ``value``: double-quoted, with backslash, quote, CR, LF, tab escaped."""
    escaped = (
        value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    )
    return f'"{escaped}"'


def _ids_expr(ids: list[str]) -> str:
    """``id in [...]`` for string ids, each escaped (pymilvus's own ``ids=`` quotes them without escaping)."""
    return f"id in [{', '.join(_quote(i) for i in ids)}]"


def where_expr(where: Optional[dict]) -> str:
    """The Milvus filter expression for a tag equality filter (checked by :func:`cliptuner.index.embedded.check_where`).

    Args:
        where: ``{tag name: value}`` or None (no filter); a doc matches when every top-level tag equals its value.
            Names are plain identifiers (``[A-Za-z_][A-Za-z0-9_]*``); values are str, finite numbers or bool.

    Returns:
        e.g. ``tags["category"] == "shoes" and tags["year"] == 2024``; "" for None.

    Raises:
        ValueError: ``where`` is not a non-empty dict, a name is not a plain identifier, or a value has another
            type (the rule shared with the embedded store).
    """
    where = check_where(where)
    parts = []
    for key, value in where.items():
        if isinstance(value, bool):
            literal = "true" if value else "false"
        elif isinstance(value, int):
            literal = str(value)
        elif isinstance(value, float):
            literal = repr(float(value))
        else:
            literal = _quote(value)
        parts.append(f'tags["{key}"] == {literal}')
    return " and ".join(parts)


def _tag_equals(tag: Any, value: TagValue) -> bool:
    """JSON equality of a stored tag and a filter value: a boolean only equals a boolean, a string a string, and
    numbers compare by value (``1 == 1.0``). Milvus Lite compares JSON values as Python does (``true == 1``), so
    its matches are checked with this."""
    if isinstance(value, bool) or isinstance(tag, bool):
        return isinstance(tag, bool) and isinstance(value, bool) and tag == value
    if isinstance(value, str) or isinstance(tag, str):
        return isinstance(tag, str) and isinstance(value, str) and tag == value
    return isinstance(tag, (int, float)) and tag == value


def _content_hash(doc: StoredDoc) -> str:
    """Hex digest over everything the store keeps of a doc except its id (length-prefixed, unambiguous)."""
    h = hashlib.blake2b(digest_size=_CHASH_CHARS // 2)

    def part(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    part(json.dumps([doc.text, doc.uri, doc.tags], sort_keys=True, ensure_ascii=False).encode("utf-8"))
    part(b"" if doc.blob is None else b"b" + bytes(doc.blob))
    if doc.tensor is None:
        part(b"")
    else:
        tensor = np.ascontiguousarray(doc.tensor)
        part(f"t{tensor.dtype.str}{tensor.shape}".encode("ascii"))
        part(tensor.tobytes())
    return h.hexdigest()


def _content_name(doc_id: str, chash: str) -> str:
    """File name (under ``content/``) of a doc's blob and tensor: a hash of the id plus the content hash."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=16).hexdigest()
    return f"{digest[:2]}/{digest}-{chash}.npz"


def _check_milvus_doc(doc: StoredDoc) -> None:
    """What Milvus's fields add to :func:`cliptuner.index.vectors.check_doc`: byte limits and strict JSON tags."""
    size = len(doc.id.encode("utf-8"))
    if size > MAX_ID_BYTES:
        raise ValueError(f"doc {doc.id[:80]!r}...: id is {size} bytes in UTF-8; Milvus ids hold at most {MAX_ID_BYTES}")
    for name in ("text", "uri"):
        value = getattr(doc, name)
        if value is not None and len(value.encode("utf-8")) > MAX_TEXT_BYTES:
            raise ValueError(
                f"doc {doc.id!r}: {name} is {len(value.encode('utf-8'))} bytes in UTF-8; the Milvus "
                f"store holds at most {MAX_TEXT_BYTES}"
            )
    try:
        tags = json.dumps(doc.tags, allow_nan=False, ensure_ascii=False)
    except ValueError:
        raise ValueError(f"doc {doc.id!r}: tags hold NaN or infinity, which Milvus JSON fields refuse") from None
    if len(tags.encode("utf-8")) > MAX_TAGS_BYTES:
        raise ValueError(
            f"doc {doc.id!r}: tags are {len(tags.encode('utf-8'))} bytes as JSON; Milvus holds at most {MAX_TAGS_BYTES}"
        )


class _Rebuild(Rebuild):
    """One rebuild of a :class:`MilvusCollection` for a new model version; resumable after a failure or a crash.

    ``new`` maps each doc id written to the rebuild collection to the content hash it was embedded from. A doc
    needs (re-)embedding while ``new`` lacks it or holds another hash than the live doc's; docs deleted from the
    store leave ``new`` (their rows were deleted with them). The rebuild collection is made with the first
    batch's vectors (their dim), unless a resumed one exists.
    """

    def __init__(
        self,
        store: MilvusCollection,
        version: str,
        embed: Embed,
        batch_size: int,
        done: dict[str, str],
        dim: Optional[int],
    ) -> None:
        super().__init__(store, version, embed, batch_size, dim)
        self.store: MilvusCollection = store
        self.new = done

    @classmethod
    def start(cls, store: MilvusCollection, version: str, embed: Embed, batch_size: int) -> _Rebuild:
        """Take over the unfinished rebuild of ``version`` (keeping its rows that match the live content) or
        drop an unfinished one of another version. The caller holds ``store._lock``."""
        pending = store._pending
        done: dict[str, str] = {}
        dim = None
        if pending is not None and pending.version == version:
            rows = store._scan(pending.name, ["chash"])
            stale = [
                doc_id
                for doc_id, row in rows.items()
                if doc_id not in store._docs or store._docs[doc_id].chash != row["chash"]
            ]
            if stale:
                store._client.delete(pending.name, filter=_ids_expr(stale), timeout=store.timeout)
            stale_set = set(stale)
            done = {doc_id: row["chash"] for doc_id, row in rows.items() if doc_id not in stale_set}
            dim = pending.dim
            logger.info(
                "resuming the rebuild of %s for model version %s: %d docs already embedded, %d stale",
                store.root,
                version,
                len(done),
                len(stale),
            )
        elif pending is not None:
            store._drop(pending.name)
            store._pending = None
        return cls(store, version, embed, batch_size, done, dim)

    def finish(self) -> int:
        """Embed what is missing or stale, catch up with concurrent writes, then switch; returns the doc count."""
        for _ in range(1 + CATCH_UP_ROUNDS):  # the stored docs, then rounds for writes made meanwhile
            todo = self._todo()
            if not todo:
                break
            self._embed_ids(todo)
        return self._switch()

    def _todo(self) -> list[str]:
        """Ids (in insertion order) whose rebuild vector is missing or was made from other content."""
        store = self.store
        with store._lock:
            store._check_open()
            docs = store._docs
            for doc_id in [i for i in self.new if i not in docs]:
                del self.new[doc_id]
            todo = sorted((entry.seq, doc_id) for doc_id, entry in docs.items() if self.new.get(doc_id) != entry.chash)
        return [doc_id for _, doc_id in todo]

    def _embed_ids(self, ids: list[str]) -> None:
        """Embed ``ids`` batch by batch (without the lock, unless the caller holds it) into the rebuild collection.

        A batch is read under the lock, embedded outside it, and written under it for the docs whose content is
        still the one read (a doc written meanwhile is left for the next round).
        """
        store = self.store
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            with store._lock:
                store._check_open()
                entries = {doc_id: store._docs[doc_id] for doc_id in chunk if doc_id in store._docs}
                read = store._fetch(list(entries), content=True)
            docs = [read[doc_id] for doc_id in chunk if doc_id in read]
            if not docs:
                continue
            vecs = self.embed_batch(docs)  # [len(docs), D]
            with store._lock:
                store._check_open()
                fresh = [(doc, vec) for doc, vec in zip(docs, vecs) if store._docs.get(doc.id) == entries[doc.id]]
                if not fresh:
                    continue
                if store._pending is None:
                    store._pending = store._create(self.version, self.dim, _BUILDING)
                store._client.upsert(store._pending.name, [store._row(doc, vec, entries[doc.id]) for doc, vec in fresh])
                store._wrote(store._pending.name, len(fresh))
                for doc, _ in fresh:
                    self.new[doc.id] = entries[doc.id].chash

    def _switch(self) -> int:
        """Under the lock: embed the last changes, check that the rebuild collection holds every live doc with
        its current content, point the alias at it and drop the old collection."""
        store = self.store
        with store._lock:
            store._check_open()
            todo = self._todo()
            if todo:
                self._embed_ids(todo)  # the lock is re-entrant: writers wait for this last round
            missing = [doc_id for doc_id, entry in store._docs.items() if self.new.get(doc_id) != entry.chash]
            if missing:  # pragma: no cover - only if embed() itself wrote to the store
                raise RuntimeError(f"rebuild for {self.version!r}: doc {missing[0]!r} changed during the last round")
            if store._pending is None:  # no doc to embed (all deleted meanwhile): an empty collection
                dim = self.dim if self.dim is not None else (store._live.dim if store._live else None)
                store._pending = store._create(self.version, dim, _BUILDING)
            target = store._pending
            store._switch_to(target)
            store._pending = None
            return len(store._docs)


class MilvusCollection(VectorStore):
    """Docs and their vectors for ONE model version in Milvus; the calls and checks of
    :class:`cliptuner.index.base.VectorStore`, the semantics of :class:`cliptuner.index.embedded.Collection`.

    Searches go through the alias, ties by insertion order; Milvus returns at most 16384 matches per query. A
    replaced doc keeps its insertion serial. An upsert writes the content files under new names first and the
    docs in one Milvus upsert call. A delete also removes the doc from an unfinished rebuild's collection.

    Args:
        root: local directory of the store (created if missing): the content files, the lock and, for Milvus
            Lite, its data. One open store per root at a time.
        uri: a Milvus server or cluster (``"http://host:19530"``); None for Milvus Lite at ``<root>/milvus.db``.
        token: credentials for a server (``"user:password"`` or an API key); unused by Milvus Lite.
        name: alias of the live collection and prefix (``<name>__``) of the per-version collection names (a
            plain identifier of at most 64 characters, without ``__`` and not ending in ``_``, so that one store's
            prefix never matches another's collections). Stores sharing a server need distinct names.
        index: vector index of new collections: ``"HNSW"``, ``"FLAT"`` (exact) or ``"AUTOINDEX"`` (the
            server's choice).
        hnsw_m: HNSW graph degree ``M``.
        ef_construction: HNSW ``efConstruction``.
        ef_search: HNSW ``ef`` at search time (raised to ``limit`` when a search asks for more matches).
        timeout: seconds per Milvus call (None: pymilvus's default).
        flush_rows: Milvus Lite: flush a collection once this many rows wait unflushed (Lite scans unflushed
            rows in Python at every search); a new live collection is flushed before searches reach it.

    Raises:
        ValueError: a bad ``name``, ``uri``, ``index`` or parameter (names the option).
        MilvusNotInstalledError: pymilvus or milvus-lite is missing (an ImportError).
        RuntimeError: ``root`` is already open, or the alias ``name`` is taken by something else.
    """

    max_dim = MAX_DIM
    holder = "Milvus"

    def __init__(
        self,
        root: str | Path,
        uri: Optional[str] = None,
        name: str = "cliptuner",
        index: str = "HNSW",
        hnsw_m: int = 16,
        ef_construction: int = 200,
        ef_search: int = 64,
        token: Optional[str] = None,
        timeout: Optional[float] = None,
        flush_rows: int = 1024,
    ) -> None:
        if (
            not isinstance(name, str)
            or not _IDENT.fullmatch(name)
            or len(name) > _MAX_NAME
            or "__" in name
            or name.endswith("_")
        ):
            # no "__" and no trailing "_": then no other store's collections (``<name>__...``) start with this
            # store's prefix, so stores sharing a server never take (or drop) each other's collections
            raise ValueError(
                f"name must be a plain identifier ([A-Za-z_][A-Za-z0-9_]*) of at most {_MAX_NAME} characters, "
                f"without '__' and not ending in '_', got {name!r}"
            )
        if not isinstance(index, str) or index.upper() not in INDEXES:
            raise ValueError(f"unknown index {index!r}; allowed: {list(INDEXES)}")
        if uri is not None and (not isinstance(uri, str) or not _SERVER_URI.fullmatch(uri)):
            raise ValueError(
                "uri must be a Milvus server URI (http://, https:// or tcp://, a host and a port, such as "
                f"'http://localhost:19530') or None (Milvus Lite in the store's folder), got {uri!r}"
            )
        self.name = name
        self.index = index.upper()
        self.hnsw_m = check_positive_int("hnsw_m", hnsw_m)
        self.ef_construction = check_positive_int("ef_construction", ef_construction)
        self.ef_search = check_positive_int("ef_search", ef_search)
        self.timeout = timeout
        self.flush_rows = check_positive_int("flush_rows", flush_rows)
        self._unflushed: dict[str, int] = {}  # Milvus Lite: rows written per collection since its last flush
        self.lite = uri is None
        self.uri = str(Path(root) / LITE_FILE) if self.lite else uri
        pymilvus = _import_pymilvus(self.lite)
        self._MilvusClient = pymilvus.MilvusClient
        self._DataType = pymilvus.DataType
        self._MilvusException = pymilvus.MilvusException
        super().__init__(root)  # the lock serialises writes, stored-doc reads and the rebuild's bookkeeping
        self._content_dir = self.root / CONTENT_DIR
        self._swap_cv = threading.Condition(threading.Lock())
        self._swap_gen = 0  # odd while the alias moves
        self._token = token
        self._open()

    def _connect(self) -> None:
        kwargs = {} if self._token is None else {"token": self._token}
        self._client = self._MilvusClient(uri=self.uri, **kwargs)

    def _disconnect(self) -> None:
        """Close the Milvus connection (Milvus Lite: stop its server, which flushes and closes its files)."""
        with contextlib.suppress(Exception):
            self._client.close()
        if self.lite:  # stop Lite's in-process server: flushes and closes its files, releases its lock
            try:
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(self.uri)
            except Exception as err:  # noqa: BLE001 - its atexit hook stops it otherwise
                logger.warning("could not stop Milvus Lite for %s: %s", self.uri, err)

    def _wrote(self, coll: str, rows: int, force: bool = False) -> None:
        """Count rows written to ``coll``; Milvus Lite: flush it once ``flush_rows`` are waiting (or ``force``).

        Milvus Lite searches the rows it has not flushed by scanning them in Python at every query (measured
        here: ~1 s a query over 20,000 unflushed 512-d rows, ~50 ms once flushed and indexed), so a Lite store
        flushes in steps; a Milvus server indexes growing segments itself and is never flushed from here.
        """
        if not self.lite:
            return
        waiting = self._unflushed.get(coll, 0) + rows
        if waiting and (force or waiting >= self.flush_rows):
            self._client.flush(coll, timeout=self.timeout)
            waiting = 0
        self._unflushed[coll] = waiting

    # -- opening -------------------------------------------------------------------------------------------
    def _load(self) -> None:
        """Find the live and an unfinished rebuild collection, drop leftovers, load the id map, sweep content."""
        prefix = f"{self.name}__"
        ours: dict[str, dict] = {}
        live_name = None
        for coll in self._client.list_collections(timeout=self.timeout):
            if not coll.startswith(prefix):
                continue
            props = self._client.describe_collection(coll, timeout=self.timeout).get("properties") or {}
            if _PROP_VERSION not in props:
                logger.warning("Milvus collection %s has this store's prefix but not its properties; left alone", coll)
                continue
            ours[coll] = props
            if self.name in self._client.list_aliases(coll, timeout=self.timeout).get("aliases", []):
                live_name = coll
        self._live: Optional[_Target] = self._target(live_name, ours[live_name]) if live_name else None
        building = sorted(
            (int(props.get(_PROP_CREATED) or 0), coll)
            for coll, props in ours.items()
            if coll != live_name and props.get(_PROP_STATE) == _BUILDING
        )
        self._pending: Optional[_Target] = self._target(building[-1][1], ours[building[-1][1]]) if building else None
        for coll in ours:
            if coll != live_name and (self._pending is None or coll != self._pending.name):
                logger.info("dropping Milvus collection %s (left by an earlier version or rebuild)", coll)
                self._drop(coll)
        for target in (self._live, self._pending):
            if target is not None:
                self._client.load_collection(target.name, timeout=self.timeout)
        if self._pending is not None:
            logger.info(
                "%s: an unfinished rebuild for model version %r is kept; rebuild(%r) resumes it",
                self.root,
                self._pending.version,
                self._pending.version,
            )
        self._docs: dict[str, _Entry] = {}
        if self._live is not None:
            self._docs = {
                doc_id: _Entry(int(row["seq"]), row["chash"], row["content"])
                for doc_id, row in self._scan(self._live.name, ["seq", "chash", "content"]).items()
            }
        self._next_seq = max((entry.seq for entry in self._docs.values()), default=0) + 1
        self._sweep_content()

    @staticmethod
    def _target(coll: str, props: dict) -> _Target:
        dim = props.get(_PROP_DIM) or ""
        return _Target(coll, str(props[_PROP_VERSION]), int(dim) if dim else None)

    def _scan(self, coll: str, fields: list[str]) -> dict[str, dict]:
        """id -> row (``fields``) of every row of ``coll``, page by page."""
        rows: dict[str, dict] = {}
        iterator = self._client.query_iterator(coll, batch_size=_ITER_BATCH, output_fields=fields, timeout=self.timeout)
        try:
            while True:
                page = iterator.next()
                if not page:
                    break
                for row in page:
                    rows[row["id"]] = row
        finally:
            iterator.close()
        return rows

    def _sweep_content(self) -> None:
        """Remove content files no stored doc names (a crash between a file and its Milvus row) and temp files."""
        if not self._content_dir.is_dir():
            return
        named = {entry.content for entry in self._docs.values() if entry.content}
        removed = 0
        for sub in self._content_dir.iterdir():
            if not sub.is_dir():
                continue
            for path in sub.iterdir():
                if f"{sub.name}/{path.name}" not in named:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        removed += 1
        if removed:
            logger.info("removed %d content files of %s that no stored doc names", removed, self.root)

    # -- Milvus helpers ------------------------------------------------------------------------------------
    def _create(self, version: str, dim: Optional[int], state: str) -> _Target:
        """A new, loaded, empty collection for ``version`` with ``dim``-dim vectors (None: a placeholder dim)."""
        slug = re.sub(r"[^A-Za-z0-9_]", "_", version)[:_SLUG]
        coll = f"{self.name}__{slug}_{uuid.uuid4().hex[:12]}"
        schema = self._MilvusClient.create_schema(
            auto_id=False,
            enable_dynamic_field=False,
            description=f"cliptuner docs embedded by model version {version!r}"[:1000],
        )
        dt = self._DataType
        schema.add_field("id", dt.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
        schema.add_field("vector", dt.FLOAT_VECTOR, dim=dim or _PLACEHOLDER_DIM)
        schema.add_field("text", dt.VARCHAR, max_length=MAX_TEXT_BYTES, nullable=True)
        schema.add_field("uri", dt.VARCHAR, max_length=MAX_TEXT_BYTES, nullable=True)
        schema.add_field("tags", dt.JSON)
        schema.add_field("seq", dt.INT64)
        schema.add_field("chash", dt.VARCHAR, max_length=_CHASH_CHARS)
        schema.add_field("content", dt.VARCHAR, max_length=_CONTENT_NAME_BYTES)
        properties = {
            _PROP_VERSION: version,
            _PROP_DIM: "" if dim is None else str(dim),
            _PROP_STATE: state,
            _PROP_CREATED: str(time.time_ns()),
        }
        self._client.create_collection(
            coll, schema=schema, consistency_level="Strong", properties=properties, timeout=self.timeout
        )
        try:
            params = {"M": self.hnsw_m, "efConstruction": self.ef_construction} if self.index == "HNSW" else {}
            index_params = self._MilvusClient.prepare_index_params()
            index_params.add_index(field_name="vector", index_type=self.index, metric_type="IP", params=params)
            # sync=False: pymilvus would poll the build of this empty collection's index in 0.5 s sleeps
            self._client.create_index(coll, index_params, sync=False, timeout=self.timeout)
            self._client.load_collection(coll, timeout=self.timeout)
        except BaseException:
            self._drop(coll)
            raise
        return _Target(coll, version, dim)

    def _drop(self, coll: str) -> None:
        """Drop a collection of this store; a failure is logged (the next open drops it)."""
        try:
            self._client.drop_collection(coll, timeout=self.timeout)
        except Exception as err:  # noqa: BLE001 - cleanup only
            logger.warning("could not drop Milvus collection %s (%s); the next open drops it", coll, err)

    def _switch_to(self, target: _Target) -> None:
        """Point the alias at ``target`` (the live collection from now on) and drop the old live one.

        The old one is marked ``retired`` first, so that a crash before the drop leaves it recognisable.
        Searches that overlap the move see the sequence counter change and run again.
        """
        old = self._live
        self._wrote(target.name, 0, force=True)  # a new live collection starts with its rows indexed
        if old is not None:
            try:
                self._client.alter_collection_properties(old.name, {_PROP_STATE: _RETIRED}, timeout=self.timeout)
            except Exception as err:  # noqa: BLE001 - only a hint for cleaning up after a crash
                logger.warning("could not mark Milvus collection %s retired: %s", old.name, err)
        with self._swap_cv:
            self._swap_gen += 1
        try:
            if old is None:
                try:
                    self._client.create_alias(target.name, self.name, timeout=self.timeout)
                except self._MilvusException as err:
                    raise RuntimeError(
                        f"could not create the Milvus alias {self.name!r} for {target.name} ({err}); "
                        f"is {self.name!r} used by another collection? pass another name="
                    ) from err
            else:
                self._client.alter_alias(target.name, self.name, timeout=self.timeout)
            self._live = target
        finally:
            with self._swap_cv:
                self._swap_gen += 1
                self._swap_cv.notify_all()
        if old is not None:
            self._drop(old.name)

    def _row(self, doc: StoredDoc, vec: np.ndarray, entry: _Entry) -> dict:
        return {
            "id": doc.id,
            "vector": vec.tolist(),
            "text": doc.text,
            "uri": doc.uri,
            "tags": doc.tags,
            "seq": entry.seq,
            "chash": entry.chash,
            "content": entry.content,
        }

    def _fetch(self, ids: list[str], content: bool = True) -> dict[str, StoredDoc]:
        """id -> doc of the stored ones among ``ids`` (blob and tensor read only if ``content``); callers hold
        ``self._lock`` (so that no write removes a content file between the row and the file)."""
        found: dict[str, StoredDoc] = {}
        ids = [i for i in ids if i in self._docs]
        for start in range(0, len(ids), _READ_CHUNK):
            chunk = ids[start : start + _READ_CHUNK]
            rows = self._client.query(
                self._live.name, filter=_ids_expr(chunk), output_fields=_OUTPUT_FIELDS, timeout=self.timeout
            )
            for row in rows:
                doc = StoredDoc(id=row["id"], text=row.get("text"), uri=row.get("uri"), tags=row.get("tags") or {})
                if content and row.get("content"):
                    doc.blob, doc.tensor = self._read_content(row["content"], doc.id)
                found[doc.id] = doc
        return found

    # -- content files -------------------------------------------------------------------------------------
    def _read_content(self, name: str, doc_id: str) -> tuple[Optional[bytes], Optional[np.ndarray]]:
        path = self._content_dir / name
        try:
            with np.load(path, allow_pickle=False) as data:
                blob = data["blob"].tobytes() if "blob" in data.files else None
                tensor = data["tensor"] if "tensor" in data.files else None
        except FileNotFoundError:
            raise RuntimeError(f"doc {doc_id!r}: its content file {str(path)!r} is missing") from None
        return blob, tensor

    def _write_content(self, docs: list[StoredDoc], entries: dict[str, _Entry]) -> list[Path]:
        """Write the content files the docs need and that do not exist yet, fsynced; returns the new paths."""
        written: list[Path] = []
        try:
            for doc in docs:
                name = entries[doc.id].content
                if not name:
                    continue
                path = self._content_dir / name
                if path.exists():  # the same id and content hash: the same bytes
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                arrays = {}
                if doc.blob is not None:
                    arrays["blob"] = np.frombuffer(bytes(doc.blob), dtype=np.uint8)
                if doc.tensor is not None:
                    arrays["tensor"] = np.ascontiguousarray(doc.tensor)
                with atomic_path(path, fsync=False) as tmp:  # one fsync per file and per directory below
                    with open(tmp, "wb") as fh:
                        np.savez(fh, **arrays)
                written.append(path)
            for path in written:
                fsync_path(path)
            for parent in {path.parent for path in written} | ({self._content_dir} if written else set()):
                fsync_path(parent)
        except BaseException:
            self._remove_files(written)
            raise
        return written

    @staticmethod
    def _remove_files(paths: list[Path]) -> None:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # -- reading -------------------------------------------------------------------------------------------
    @property
    def version(self) -> Optional[str]:
        """Model version of the live collection (None before anything was stored or rebuilt)."""
        live = self._live
        return None if live is None else live.version

    @property
    def dim(self) -> Optional[int]:
        """Dimension of the stored vectors (None before the first vector)."""
        live = self._live
        return None if live is None else live.dim

    @property
    def collection_name(self) -> Optional[str]:
        """Name of the live Milvus collection (the one the alias ``name`` names)."""
        live = self._live
        return None if live is None else live.name

    def __len__(self) -> int:
        return len(self._docs)

    def __contains__(self, doc_id: object) -> bool:
        with self._lock:
            return isinstance(doc_id, str) and doc_id in self._docs

    def _held(self) -> tuple[Optional[str], Optional[int], int]:
        live = self._live
        return (None, None, 0) if live is None else (live.version, live.dim, len(self._docs))

    def _next_docs(self, cursor: Optional[_Cursor], batch_size: int) -> tuple[list[StoredDoc], _Cursor]:
        """The next docs by insertion serial: the serials after the cursor's are sorted once per pass, and a doc
        replaced or deleted since is skipped."""
        cursor = cursor or _Cursor()
        ids: list[str] = []
        while len(ids) < batch_size:
            if cursor.pos >= len(cursor.order):  # the next serials, sorted once per pass
                cursor.order = sorted((e.seq, doc_id) for doc_id, e in self._docs.items() if e.seq > cursor.after)
                cursor.pos = 0
                if not cursor.order:
                    break
            seq, doc_id = cursor.order[cursor.pos]
            cursor.pos += 1
            entry = self._docs.get(doc_id)
            if entry is not None and entry.seq == seq:
                ids.append(doc_id)
                cursor.after = seq
        found = self._fetch(ids, content=True) if ids else {}
        return [found[doc_id] for doc_id in ids if doc_id in found], cursor

    def stats(self) -> dict:
        """``{"count", "version", "dim", "backend": "milvus", "index", "collection"}``."""
        with self._lock:
            live = self._live
            return {
                "count": len(self._docs),
                "version": self.version,
                "dim": self.dim,
                "backend": "milvus",
                "index": self.index,
                "collection": None if live is None else live.name,
            }

    def _search(self, queries: np.ndarray, limit: int, version: Optional[str], where: dict) -> Hits:
        """Search through the alias, again when the live collection switched meanwhile (see the module doc)."""
        for _ in range(_SEARCH_RETRIES):
            with self._swap_cv:
                self._check_open()
                while self._swap_gen % 2:
                    self._swap_cv.wait()
                gen = self._swap_gen
                held = self._held()
            normed = self._checked_queries(queries, version, *held)
            if normed is None:
                return [[] for _ in range(queries.shape[0])]
            try:
                results = self._search_live(normed, limit, where)
            except self._MilvusException:
                if self._swap_gen != gen:  # the old collection went away under the search: run it again
                    continue
                raise
            if self._swap_gen == gen:
                return results
        raise RuntimeError(
            f"{self.root}: the live collection switched during {_SEARCH_RETRIES} attempts of one search; search again"
        )

    def _search_live(self, queries: np.ndarray, limit: int, where: dict) -> list[list[tuple[str, float]]]:
        """Top-``limit`` per normalised query through the alias, ties by insertion order.

        With a tag filter, each match's tags are checked with :func:`_tag_equals` (Milvus Lite also matches
        ``true`` with ``1``); when that drops matches, the search is repeated asking for more (up to 16384).
        """
        expr = where_expr(where) if where else ""
        want = min(limit, MAX_TOPK)
        fetch = want
        fields = ["seq", "tags"] if where else ["seq"]
        while True:
            params = {"ef": max(self.ef_search, fetch)} if self.index == "HNSW" else {}
            hits = self._client.search(
                self.name,
                data=queries.tolist(),
                limit=fetch,
                filter=expr,
                output_fields=fields,
                anns_field="vector",
                search_params={"metric_type": "IP", "params": params},
                timeout=self.timeout,
            )
            results, short = [], False
            for query_hits in hits:
                kept = [
                    h
                    for h in query_hits
                    if not where
                    or all(
                        _tag_equals((h["entity"].get("tags") or {}).get(key, _MISSING), value)
                        for key, value in where.items()
                    )
                ]
                short = short or (len(kept) < want and len(query_hits) == fetch)
                ranked = sorted((-float(h["distance"]), int(h["entity"].get("seq", 0)), h["id"]) for h in kept)
                results.append([(doc_id, -neg) for neg, _, doc_id in ranked[:want]])
            if not short or fetch >= MAX_TOPK:
                return results
            fetch = min(fetch * 4, MAX_TOPK)

    # -- writing -------------------------------------------------------------------------------------------
    def _check_doc(self, doc: StoredDoc) -> None:
        _check_milvus_doc(doc)

    def _prepare(self, docs: list[StoredDoc]) -> list[str]:
        return [_content_hash(doc) for doc in docs]

    def _write(self, docs: list[StoredDoc], vecs: np.ndarray, version: str, prepared: Any) -> None:
        """Content files first, then one Milvus upsert (into a new collection while the store is empty, switched
        to once it holds the docs); files a replaced doc no longer names are removed last."""
        ids = [doc.id for doc in docs]
        dim = vecs.shape[1]
        live = self._live
        empty = not self._docs
        next_seq = self._next_seq
        entries: dict[str, _Entry] = {}
        for doc, chash in zip(docs, prepared):
            old = self._docs.get(doc.id)
            if old is None:
                seq, next_seq = next_seq, next_seq + 1
            else:
                seq = old.seq
            has_content = doc.blob is not None or doc.tensor is not None
            entries[doc.id] = _Entry(seq, chash, _content_name(doc.id, chash) if has_content else "")
        rows = [self._row(doc, vec, entries[doc.id]) for doc, vec in zip(docs, vecs)]
        new_files = self._write_content(docs, entries)
        fresh: Optional[_Target] = None
        try:
            if live is None or (empty and (version != live.version or dim != live.dim)):
                # an empty store takes any version and dim: a new collection, switched to once it holds the docs
                fresh = self._create(version, dim, _BUILDING)
                self._client.upsert(fresh.name, rows, timeout=self.timeout)
                self._wrote(fresh.name, len(rows), force=True)
                self._switch_to(fresh)
            else:
                if self._pending is not None:  # stale vectors of the rebuild collection go first
                    changed = [i for i in ids if i not in self._docs or self._docs[i].chash != entries[i].chash]
                    if changed:
                        self._client.delete(self._pending.name, filter=_ids_expr(changed), timeout=self.timeout)
                self._client.upsert(live.name, rows, timeout=self.timeout)
                self._wrote(live.name, len(rows))
        except BaseException:
            if fresh is not None and self._live is not fresh:
                self._drop(fresh.name)
            self._remove_files(new_files)
            raise
        superseded = [
            self._content_dir / self._docs[i].content
            for i in ids
            if i in self._docs and self._docs[i].content and self._docs[i].content != entries[i].content
        ]
        self._docs.update(entries)
        self._next_seq = next_seq
        self._remove_files(superseded)

    def _stored_ids(self, ids: list[str]) -> set[str]:
        return {i for i in ids if i in self._docs}

    def _remove(self, ids: list[str]) -> int:
        """Delete from the live collection and an unfinished rebuild's one, then the content files."""
        present = [i for i in ids if i in self._docs]
        if not present:
            return 0
        expr = _ids_expr(present)
        if self._pending is not None:
            self._client.delete(self._pending.name, filter=expr, timeout=self.timeout)
        self._client.delete(self._live.name, filter=expr, timeout=self.timeout)
        files = [self._content_dir / self._docs[i].content for i in present if self._docs[i].content]
        for doc_id in present:
            del self._docs[doc_id]
        self._remove_files(files)
        return len(present)

    def _start_rebuild(self, version: str, embed: Embed, batch_size: int) -> Optional[_Rebuild]:
        """A :class:`_Rebuild` (resuming the unfinished one of ``version``); an empty store drops an unfinished
        rebuild and just takes ``version``."""
        if self._docs:
            return _Rebuild.start(self, version, embed, batch_size)
        if self._pending is not None:
            self._drop(self._pending.name)
            self._pending = None
        if self._live is None or self._live.version != version:
            dim = None if self._live is None else self._live.dim
            self._switch_to(self._create(version, dim, _BUILDING))
        return None

    def __repr__(self) -> str:
        return (
            f"MilvusCollection({str(self.root)!r}, uri={self.uri!r}, name={self.name!r}, count={len(self._docs)}, "
            f"version={self.version!r})"
        )
