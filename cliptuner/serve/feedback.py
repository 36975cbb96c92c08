"""The feedback log: what people chose among the results of a search, kept durably in the workspace.

One event is one search as the client saw it: the query (text and/or image, as sent to ``/search``), the model
version that answered, the ids shown (best first), the ids the person chose ("good match") and the ids marked
wrong ("not this"), under a client event id. :class:`FeedbackEvent` checks an event; :class:`FeedbackLog` keeps
events and the content of the docs they showed; :class:`FeedbackRecorder` is what the indexer's ``/feedback``
runs: it checks the shown ids against an index and copies their content into the log with the event.

The rules of the log:

* **Durable.** ``<workspace>/feedback/feedback.db``, SQLite in WAL mode with ``synchronous=FULL``; a record is one
  transaction, committed before :meth:`FeedbackLog.record` returns: an acknowledged event survives ``kill -9``.
* **Idempotent on the event id.** The same id with the same content is a retry: stored once, ``record`` returns
  False. The same id with other content raises :class:`FeedbackConflict` (naming the fields that differ).
* **Shared.** Several processes (index shards, a trainer reading it) open the same file: writers take SQLite's
  write lock at the start of their transaction (``BEGIN IMMEDIATE``) and wait up to ``busy_timeout`` for it;
  readers never wait for writers. SQLite's locks need a local filesystem: the log's folder must not be on a
  network share (NFS) that several machines write.
* **Content once per doc id.** The content of a shown doc (its text, its image as encoded bytes) is copied the
  first time an event shows it; later events showing the same id keep that copy (INSERT OR IGNORE), so a doc
  re-indexed under the same id with other content keeps its first content here. Images are kept once per
  SHA-256, whichever queries and docs share them.

Layout of ``feedback.db``::

    events(seq, event_id, received_at, query_text, query_image, model_version, shown, chosen, wrong)
                                        one row per event; seq 1, 2, 3... in arrival order; id lists as JSON
    contents(doc_id, text, image)       a shown doc's content, once per doc id
    images(sha256, data)                encoded image files, once per SHA-256 (query_image and image name them)

Jina-free and torch-free: the standard library, numpy and PIL (through :mod:`cliptuner.model.images`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from PIL import Image

from cliptuner.config import REQUEST_ID_PATTERN
from cliptuner.index.base import VectorStore
from cliptuner.index.vectors import StoredDoc
from cliptuner.model.images import DEFAULT_LIMITS, ImageError, ImageLimits, ImageSource, decode_image
from cliptuner.serve.access import DATA_ONLY, RemoteImage, UriPolicy
from cliptuner.serve.content import image_source

logger = logging.getLogger(__name__)

FEEDBACK_SUBDIR = "feedback"  # <workspace>/feedback/feedback.db
DB_NAME = "feedback.db"
MAX_SHOWN = 100  # ids shown per event
EVENT_ID_PATTERN = REQUEST_ID_PATTERN  # an event id: letters, digits and . _ : - (128 at most), as a request_id
FEEDBACK_TAGS = ("shown", "chosen", "wrong")  # the tags of a /feedback doc
SCHEMA_VERSION = 1  # PRAGMA user_version of feedback.db
_EVENT_ID = re.compile(EVENT_ID_PATTERN)
_SQL_CHUNK = 500  # ids per `IN (...)` query, well under SQLite's variable limit
_SHOWN_MAX = 10  # ids named in one error message

_SCHEMA = f"""
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS images (
    sha256 TEXT PRIMARY KEY,
    data BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    received_at REAL NOT NULL,
    query_text TEXT,
    query_image TEXT REFERENCES images (sha256),
    model_version TEXT,
    shown TEXT NOT NULL,
    chosen TEXT NOT NULL,
    wrong TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS contents (
    doc_id TEXT PRIMARY KEY,
    text TEXT,
    image TEXT REFERENCES images (sha256)
) WITHOUT ROWID;
PRAGMA user_version = {SCHEMA_VERSION};
COMMIT;
"""
_EVENT_COLUMNS = "query_text, query_image, model_version, shown, chosen, wrong"  # what a retry must repeat


class FeedbackConflict(ValueError):
    """An event id that was recorded before with other content (a new event needs a new id)."""


def _named_ids(ids: Iterable[str]) -> str:
    """Ids for a message: the first few, then ``...``."""
    ids = list(ids)
    return repr(ids[:_SHOWN_MAX])[:-1] + (", ...]" if len(ids) > _SHOWN_MAX else "]")


def _repeated(ids: Sequence[str]) -> list[str]:
    """The ids given more than once, each once, in order."""
    seen: set[str] = set()
    repeated: dict[str, None] = {}
    for doc_id in ids:
        if doc_id in seen:
            repeated[doc_id] = None
        seen.add(doc_id)
    return list(repeated)


def _id_tuple(name: str, value: Any, what: str) -> tuple[str, ...]:
    """``value`` (a list or tuple of non-empty strings, each once) as a tuple.

    Raises:
        ValueError: another type, a non-string or empty id, or an id given twice (names ``what`` and ``name``).
    """
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what}: {name} must be a list of doc ids (strings), got {value!r}")
    bad = [item for item in value if not isinstance(item, str) or not item]
    if bad:
        raise ValueError(f"{what}: {name} must be a list of doc ids (non-empty strings), got {bad[0]!r} in it")
    repeated = _repeated(value)
    if repeated:
        raise ValueError(f"{what}: {name} names {_named_ids(repeated)} more than once")
    return tuple(value)


@dataclass(frozen=True)
class FeedbackEvent:
    """One search as the client saw it, and what the person said about its results.

    Lists are given as tuples (a list is taken and kept as a tuple). Checked when built: a ``ValueError`` names
    the event, the field and the value.
    """

    event_id: str  # the client's id of the event (EVENT_ID_PATTERN): sent again, the event is stored once
    shown: tuple[str, ...]  # result ids in the order shown (best first): 1 to MAX_SHOWN, each once
    chosen: tuple[str, ...]  # ids the person chose ("good match"); a subset of shown
    wrong: tuple[str, ...] = ()  # ids marked wrong ("not this"); a subset of shown, disjoint from chosen
    query_text: Optional[str] = None  # the query's text as sent to /search
    query_image: Optional[bytes] = None  # the query image as encoded bytes (PNG/JPEG...)
    model_version: Optional[str] = None  # the model version that answered the search

    def __post_init__(self) -> None:
        if not isinstance(self.event_id, str) or not _EVENT_ID.fullmatch(self.event_id):
            raise ValueError(
                f"feedback event id must be 1 to 128 letters, digits or '._:-', starting with a letter or a "
                f"digit, got {self.event_id!r}"
            )
        what = f"feedback event {self.event_id!r}"
        for name in ("shown", "chosen", "wrong"):
            object.__setattr__(self, name, _id_tuple(name, getattr(self, name), what))
        if not self.shown:
            raise ValueError(f"{what}: shown must name the ids shown (at least one), got []")
        if len(self.shown) > MAX_SHOWN:
            raise ValueError(f"{what}: shown has {len(self.shown)} ids, over the limit of {MAX_SHOWN}")
        shown = set(self.shown)
        for name in ("chosen", "wrong"):
            outside = [i for i in getattr(self, name) if i not in shown]
            if outside:
                raise ValueError(f"{what}: {name} ids {_named_ids(outside)} are not among the shown ids")
        both = [i for i in self.chosen if i in set(self.wrong)]
        if both:
            raise ValueError(f"{what}: ids {_named_ids(both)} are both chosen and wrong")
        if not self.chosen and not self.wrong:
            raise ValueError(f"{what}: says nothing; give at least one chosen or one wrong id")
        if self.query_text is not None and (not isinstance(self.query_text, str) or not self.query_text.strip()):
            raise ValueError(f"{what}: query_text must be a non-blank string or None, got {self.query_text!r}")
        if self.query_image is not None:
            if not isinstance(self.query_image, (bytes, bytearray, memoryview)) or not len(self.query_image):
                got = "empty bytes" if isinstance(self.query_image, bytes) else type(self.query_image).__name__
                raise ValueError(f"{what}: query_image must be encoded image bytes or None, got {got}")
            object.__setattr__(self, "query_image", bytes(self.query_image))
        if self.query_text is None and self.query_image is None:
            raise ValueError(f"{what}: has no query; give the query's text or image as sent to /search")
        if self.model_version is not None and (not isinstance(self.model_version, str) or not self.model_version):
            raise ValueError(f"{what}: model_version must be a non-empty string or None, got {self.model_version!r}")


@dataclass(frozen=True)
class DocContent:
    """A shown doc's content as the index held it when the event arrived: its text, its image, or both."""

    doc_id: str
    text: Optional[str] = None
    image: Optional[bytes] = None  # encoded image bytes

    def __post_init__(self) -> None:
        if not isinstance(self.doc_id, str) or not self.doc_id:
            raise ValueError(f"doc content: doc_id must be a non-empty string, got {self.doc_id!r}")
        if self.text is not None and not isinstance(self.text, str):
            raise ValueError(f"doc content {self.doc_id!r}: text must be a string or None, got {self.text!r}")
        if self.image is not None:
            if not isinstance(self.image, (bytes, bytearray, memoryview)) or not len(self.image):
                raise ValueError(f"doc content {self.doc_id!r}: image must be encoded image bytes or None")
            object.__setattr__(self, "image", bytes(self.image))
        if self.text is None and self.image is None:
            raise ValueError(f"doc content {self.doc_id!r}: has neither text nor an image")


@dataclass(frozen=True)
class RecordedEvent:
    """An event as read back from the log."""

    seq: int  # 1, 2, 3... in arrival order
    received_at: float  # time.time() when recorded
    event: FeedbackEvent


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _chunks(ids: list[str]) -> Iterator[tuple[list[str], str]]:
    """``ids`` in chunks, each with its ``?, ?, ...`` placeholder list."""
    for start in range(0, len(ids), _SQL_CHUNK):
        chunk = ids[start : start + _SQL_CHUNK]
        yield chunk, ",".join("?" * len(chunk))


class FeedbackLog:
    """The feedback events of a workspace and the content of the docs they showed (see the module doc).

    Safe to share between the threads of a process (one connection, under a lock) and between processes
    (SQLite's locks).

    Args:
        root: the log's folder, ``<workspace>/feedback``; created if missing.
        busy_timeout: seconds a write waits for another process's transaction before it fails.

    Raises:
        ValueError: the file was written by a newer schema.
        sqlite3.Error: the file cannot be opened.
    """

    def __init__(self, root: Path, busy_timeout: float = 30.0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / DB_NAME
        self._lock = threading.Lock()
        self._db: Optional[sqlite3.Connection] = sqlite3.connect(
            self.path, timeout=float(busy_timeout), isolation_level=None, check_same_thread=False
        )
        try:
            self._set_wal(float(busy_timeout))
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ValueError(
                    f"{self.path.name} has schema version {version}, newer than this cliptuner's "
                    f"{SCHEMA_VERSION}; upgrade cliptuner to read it"
                )
            if version < SCHEMA_VERSION:
                self._db.executescript(_SCHEMA)
        except BaseException:
            self.close()
            raise

    def _set_wal(self, busy_timeout: float) -> None:
        """WAL mode: switching a new file takes a lock that SQLite does not wait for, so wait here."""
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
                continue
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"{self.path.name}: journal mode is {mode!r}, not WAL")
            return

    def close(self) -> None:
        """Close the file (later calls raise); closing twice is harmless."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> FeedbackLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise ValueError(f"the feedback log {self.path.name} is closed")
        return self._db

    @contextlib.contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        """One write transaction that holds SQLite's write lock from its start: committed at the end of the block
        (before it returns), rolled back if it raises."""
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # the block raised, or the commit failed (a full disk)
                    db.execute("ROLLBACK")
                raise

    # -- writing ---------------------------------------------------------------------------------------------------
    def record(self, event: FeedbackEvent, contents: Mapping[str, DocContent]) -> bool:
        """Store one event, and the content of (some of) its shown docs, in one transaction.

        Args:
            event: the event.
            contents: doc id -> its content, for ids among ``event.shown``; a doc whose content is stored already
                keeps it.

        Returns:
            True when the event was stored now; False when this event id was stored before with the same
            content (a retry: nothing of the event changes; contents not stored yet are added).

        Raises:
            FeedbackConflict: the event id was stored with other content (names the fields that differ).
            ValueError: not a :class:`FeedbackEvent`, or a content for an id that is not shown, or under another
                key than its ``doc_id``.
        """
        return self.record_many([event], contents)[0]

    def record_many(self, events: Sequence[FeedbackEvent], contents: Mapping[str, DocContent]) -> list[bool]:
        """Store several events, and the content of their shown docs, in one transaction: all or nothing.

        Returns:
            Per event, as :meth:`record` says.

        Raises:
            FeedbackConflict: an event id was stored with other content; nothing is stored.
            ValueError: as :meth:`record`.
        """
        for event in events:
            if not isinstance(event, FeedbackEvent):
                raise ValueError(f"expected a FeedbackEvent, got {type(event).__name__}")
        shown = {doc_id for event in events for doc_id in event.shown}
        for key, content in contents.items():
            if not isinstance(content, DocContent) or content.doc_id != key:
                got = (
                    f"the content of {content.doc_id!r}" if isinstance(content, DocContent) else type(content).__name__
                )
                raise ValueError(f"contents[{key!r}] must be the DocContent of doc {key!r}, got {got}")
        outside = [key for key in contents if key not in shown]
        if outside:
            raise ValueError(f"contents of docs no event showed: {_named_ids(outside)}")
        with self._txn() as db:
            now = time.time()  # with the write lock held: later sequence numbers are not received earlier
            stored = [self._insert_event(db, event, now) for event in events]
            for content in contents.values():
                image = self._insert_image(db, content.image)
                db.execute(
                    "INSERT OR IGNORE INTO contents (doc_id, text, image) VALUES (?, ?, ?)",
                    (content.doc_id, content.text, image),
                )
        return stored

    @staticmethod
    def _insert_image(db: sqlite3.Connection, data: Optional[bytes]) -> Optional[str]:
        if data is None:
            return None
        sha = _sha256(data)
        db.execute("INSERT OR IGNORE INTO images (sha256, data) VALUES (?, ?)", (sha, data))
        return sha

    def _insert_event(self, db: sqlite3.Connection, event: FeedbackEvent, now: float) -> bool:
        """Insert ``event`` unless its id is there; False for a retry (same content). Inside a transaction."""
        row = (
            event.query_text,
            None if event.query_image is None else _sha256(event.query_image),
            event.model_version,
            json.dumps(event.shown, ensure_ascii=False),
            json.dumps(event.chosen, ensure_ascii=False),
            json.dumps(event.wrong, ensure_ascii=False),
        )
        before = db.execute(f"SELECT {_EVENT_COLUMNS} FROM events WHERE event_id = ?", (event.event_id,)).fetchone()
        if before is not None:
            if tuple(before) != row:
                names = [name.strip() for name in _EVENT_COLUMNS.split(",")]
                differ = [name for name, old, new in zip(names, before, row) if old != new]
                raise FeedbackConflict(
                    f"feedback event {event.event_id!r} was recorded before with another {', '.join(differ)}; "
                    "a new event needs a new event id"
                )
            return False
        self._insert_image(db, event.query_image)
        db.execute(
            f"INSERT INTO events (event_id, received_at, {_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (event.event_id, now, *row),
        )
        return True

    # -- reading ---------------------------------------------------------------------------------------------------
    def events(self, after_seq: int = 0, limit: Optional[int] = None) -> list[RecordedEvent]:
        """The events recorded after ``after_seq`` (0: all), in arrival order; at most ``limit`` of them (None: all),
        so that a reader can page through a long log with the last ``seq`` it got.

        Raises:
            ValueError: ``after_seq`` is not an integer >= 0, or ``limit`` not an integer >= 1.
        """
        if isinstance(after_seq, bool) or not isinstance(after_seq, int) or after_seq < 0:
            raise ValueError(f"after_seq must be an integer >= 0, got {after_seq!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be an integer >= 1 or None, got {limit!r}")
        with self._lock:
            rows = (
                self._conn()
                .execute(
                    "SELECT e.seq, e.received_at, e.event_id, e.query_text, i.data, e.model_version, e.shown, "
                    "e.chosen, e.wrong FROM events e LEFT JOIN images i ON i.sha256 = e.query_image "
                    "WHERE e.seq > ? ORDER BY e.seq LIMIT ?",
                    (after_seq, -1 if limit is None else limit),
                )
                .fetchall()
            )
        return [
            RecordedEvent(
                seq=seq,
                received_at=received_at,
                event=FeedbackEvent(
                    event_id=event_id,
                    shown=tuple(json.loads(shown)),
                    chosen=tuple(json.loads(chosen)),
                    wrong=tuple(json.loads(wrong)),
                    query_text=text,
                    query_image=None if image is None else bytes(image),
                    model_version=version,
                ),
            )
            for seq, received_at, event_id, text, image, version, shown, chosen, wrong in rows
        ]

    def contents(self, doc_ids: Iterable[str]) -> dict[str, DocContent]:
        """The stored content of the docs among ``doc_ids`` that have one (the others are left out)."""
        ids = list(dict.fromkeys(i for i in doc_ids if isinstance(i, str)))
        found: dict[str, DocContent] = {}
        with self._lock:
            db = self._conn()
            for chunk, marks in _chunks(ids):
                for doc_id, text, image in db.execute(
                    f"SELECT c.doc_id, c.text, i.data FROM contents c LEFT JOIN images i ON i.sha256 = c.image "
                    f"WHERE c.doc_id IN ({marks})",
                    chunk,
                ):
                    found[doc_id] = DocContent(doc_id, text, None if image is None else bytes(image))
        return found

    def content_ids(self, doc_ids: Iterable[str]) -> set[str]:
        """The ids among ``doc_ids`` whose content is stored (nothing but the ids is read)."""
        ids = list(dict.fromkeys(i for i in doc_ids if isinstance(i, str)))
        found: set[str] = set()
        with self._lock:
            db = self._conn()
            for chunk, marks in _chunks(ids):
                found.update(i for (i,) in db.execute(f"SELECT doc_id FROM contents WHERE doc_id IN ({marks})", chunk))
        return found

    def stats(self) -> dict:
        """``{"events": n, "queries": distinct queries (by text and image SHA-256), "last_seq": the newest seq or 0}``."""
        with self._lock:
            events, queries, last = (
                self._conn()
                .execute(
                    "SELECT COUNT(*), COUNT(DISTINCT quote(query_text) || ',' || quote(query_image)), "
                    "COALESCE(MAX(seq), 0) FROM events"
                )
                .fetchone()
            )
        return {"events": events, "queries": queries, "last_seq": last}


# -- what the indexer's /feedback runs ------------------------------------------------------------------------------
def png_bytes(array: np.ndarray) -> bytes:
    """An ``H×W×3`` uint8 array as a PNG file."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def encoded_image(
    source: Union[ImageSource, RemoteImage], name: str, limits: ImageLimits = DEFAULT_LIMITS, check: bool = True
) -> bytes:
    """The encoded file of an image as :func:`cliptuner.serve.content.image_source` gave it: a tensor PNG-encoded,
    bytes as they are, a local file read, a remote image fetched.

    Args:
        source: what ``image_source`` returned (checked against the uri policy already).
        name: how errors name the item (``"doc 'abc'"``).
        limits: the byte and pixel limits.
        check: decode the bytes (within ``limits``) to make sure they are an image.

    Raises:
        ValueError: a file that cannot be read, a fetch that fails, bytes over the limit, or (``check``) bytes that
            are not an image (:class:`cliptuner.model.images.ImageError`); every message starts with ``name``.
    """
    if isinstance(source, RemoteImage):
        source = source.read(name)
    if isinstance(source, np.ndarray):
        return png_bytes(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            size = path.stat().st_size
            if size > limits.max_bytes:
                raise ImageError(f"{name}: uri names {size} bytes, over the limit of {limits.max_bytes}")
            source = path.read_bytes()
        except OSError:
            raise ImageError(f"{name}: uri names no readable file") from None
    data = bytes(source)
    if check:
        decode_image(data, limits, name)
    return data


def stored_content(
    doc: StoredDoc, policy: UriPolicy = DATA_ONLY, limits: ImageLimits = DEFAULT_LIMITS
) -> Optional[DocContent]:
    """A stored doc's content for the log: its text, and its image as encoded bytes (a blob as it is, a tensor
    PNG-encoded, a uri read under ``policy``); None when it has neither.

    An image that cannot be read now (a file gone, a uri the policy no longer allows, a failed fetch) is left out
    and logged: the doc keeps its text, if any.
    """
    name = f"doc {doc.id!r}"
    image = None
    try:
        source = image_source(name, tensor=doc.tensor, blob=doc.blob, uri=doc.uri, policy=policy, limits=limits)
        if source is not None:
            image = encoded_image(source, name, limits, check=False)
    except ValueError as exc:
        logger.warning("%s: its image is left out of the feedback log: %s", name, exc)
    text = doc.text if doc.text and doc.text.strip() else None
    if text is None and image is None:
        return None
    return DocContent(doc.id, text, image)


def event_of(
    event_id: str,
    tags: Mapping[str, Any],
    query_text: Optional[str] = None,
    query_image: Optional[bytes] = None,
    model_version: Optional[str] = None,
) -> FeedbackEvent:
    """An event from a ``/feedback`` doc's fields: ``tags`` holds the lists ``shown``, ``chosen`` and ``wrong``.

    A blank ``query_text`` is no text. Tags arrive through protobuf: each list must hold strings.

    Raises:
        ValueError: ``tags`` is not a mapping, has keys other than :data:`FEEDBACK_TAGS`, lacks ``shown``, or a
            list that is not a list of strings; or the event does not check out (:class:`FeedbackEvent`).
    """
    what = f"doc {event_id!r}"
    if not isinstance(tags, Mapping):
        raise ValueError(f"{what}: tags must be a mapping with {list(FEEDBACK_TAGS)}, got {tags!r}")
    unknown = sorted(str(key) for key in tags if key not in FEEDBACK_TAGS)
    if unknown:
        raise ValueError(f"{what}: unknown tags {unknown} for /feedback; known: {list(FEEDBACK_TAGS)}")
    if "shown" not in tags:
        raise ValueError(f"{what}: tags['shown'] must list the ids shown, best first")
    lists = {name: _id_tuple(f"tags[{name!r}]", tags.get(name, []), what) for name in FEEDBACK_TAGS}
    return FeedbackEvent(
        event_id=event_id,
        shown=lists["shown"],
        chosen=lists["chosen"],
        wrong=lists["wrong"],
        query_text=query_text if isinstance(query_text, str) and query_text.strip() else None,
        query_image=query_image,
        model_version=model_version,
    )


class FeedbackUnavailable(RuntimeError):
    """The feedback log cannot be opened (a read-only workspace, say); the rest of the service is unaffected."""


class FeedbackRecorder:
    """Records feedback events with the content of the shown docs an index holds.

    The log is opened at the first event, not before: a service whose workspace cannot hold it (mounted read-only)
    serves everything else and answers ``/feedback`` with :class:`FeedbackUnavailable`.

    Args:
        root: the log's folder (``<workspace>/feedback``).
        store: the index the shown ids must be in, and whose content is copied.
        policy: the uri policy stored uris are read under.
        limits: the image limits (bytes read per image).
        owns: whether a doc id is this index's (a shard checks and copies only its own docs); default: all.
    """

    def __init__(
        self,
        root: Path,
        store: VectorStore,
        policy: UriPolicy = DATA_ONLY,
        limits: ImageLimits = DEFAULT_LIMITS,
        owns: Optional[Callable[[str], bool]] = None,
    ) -> None:
        self.root = Path(root)
        self.store = store
        self.policy = policy
        self.limits = limits
        self.owns = owns or (lambda doc_id: True)
        self._log: Optional[FeedbackLog] = None
        self._lock = threading.Lock()

    @property
    def log(self) -> FeedbackLog:
        """The log, opened on first use.

        Raises:
            FeedbackUnavailable: it cannot be opened (the reason, without the server's path).
        """
        with self._lock:
            if self._log is None:
                try:
                    self._log = FeedbackLog(self.root)
                except OSError as exc:
                    raise FeedbackUnavailable(f"the feedback log cannot be opened: {exc.strerror or exc}") from None
                except sqlite3.Error as exc:
                    raise FeedbackUnavailable(f"the feedback log cannot be opened: {exc}") from None
            return self._log

    def close(self) -> None:
        """Close the log if it was opened."""
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None

    def record(self, events: Sequence[FeedbackEvent]) -> list[bool]:
        """Check the events' shown ids that this index owns, then store the events with those docs' content (the
        ones the log lacks), all in one transaction.

        Returns:
            Per event: True stored now, False a retry of an event stored before.

        Raises:
            ValueError: a shown id this index owns is not stored in it (names the event and the ids); nothing is
                recorded.
            FeedbackConflict: an event id was recorded before with other content; nothing is recorded.
            FeedbackUnavailable: the log cannot be opened.
        """
        log = self.log
        mine = list(dict.fromkeys(doc_id for event in events for doc_id in event.shown if self.owns(doc_id)))
        held = {doc.id for doc in self.store.get(mine, content=False) if doc is not None}
        absent = set(mine) - held
        for event in events:
            unknown = [doc_id for doc_id in event.shown if doc_id in absent]
            if unknown:
                raise ValueError(
                    f"feedback event {event.event_id!r}: shown ids {_named_ids(unknown)} are not in the index; "
                    "nothing was recorded"
                )
        known = log.content_ids(mine)
        missing = [doc_id for doc_id in mine if doc_id not in known]
        contents = {}
        for doc in self.store.get(missing, content=True):
            content = None if doc is None else stored_content(doc, self.policy, self.limits)
            if content is not None:
                contents[content.doc_id] = content
        return log.record_many(events, contents)


__all__ = [
    "EVENT_ID_PATTERN",
    "FEEDBACK_SUBDIR",
    "FEEDBACK_TAGS",
    "MAX_SHOWN",
    "DocContent",
    "FeedbackConflict",
    "FeedbackEvent",
    "FeedbackLog",
    "FeedbackRecorder",
    "FeedbackUnavailable",
    "RecordedEvent",
    "encoded_image",
    "event_of",
    "png_bytes",
    "stored_content",
]
