"""CLIPIndexer: a persistent collection of docs and their vectors, searched by cosine similarity.

Endpoints:

- ``/index``: stores each doc (its text, uri, blob, tensor and tags, so that it can be re-embedded later) with
  its vector. A doc must have content; its ``embedding`` is used when ``model_version`` is the index's version,
  otherwise (no embedding — the indexer running alone — or another version) the indexer embeds it with its own
  model of the index's version. An existing id is replaced. No parameters.
- ``/search``: ``parameters={'limit': k}`` (default 10). Each query doc gets ``matches`` (stored docs with their
  content, ``model_version`` and ``score``, best first) and ``scores``. A query embedded by another version than
  the index's is re-encoded here with the index's version: a search never compares two versions; the query's
  ``embedding``/``model_version`` come back as the ones used.
- ``/delete``: removes the docs with these ids; each doc comes back with ``tags['deleted']`` (True when it was
  stored). No parameters.
- ``/train`` (after the tuner and the encoder): re-embeds every stored doc with the CURRENT version and swaps the
  index to it before the response goes on; adds ``tags['index'] = {model_version, count, rebuild_seconds}``.
- ``/status``: appends ``ClipDoc(id='status-indexer', model_version=..., tags={count, rebuilding, ...})``.
- anything else (``/encode``): passes the docs on unchanged.

Model versions: the index holds vectors of one version. When CURRENT moves (a ``/train`` passing through, or
the watcher thread noticing it within ``watch_interval`` seconds), the indexer re-embeds the stored docs with the
new version on the side (:meth:`cliptuner.index.Collection.rebuild`); searches keep using the old version until
the atomic swap, and docs indexed meanwhile are re-embedded before it. The collection lives under
``<workspace>/index/<shard>`` and survives restarts.

Run it with one replica per shard: a collection directory is opened by one process at a time.
"""

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from docarray import DocList
from jina import Executor, requests

from cliptuner.bootstrap import ensure_current
from cliptuner.content import Item, embed_items, make_item
from cliptuner.follow import ModelFollower
from cliptuner.index import Collection, StoredDoc
from cliptuner.runtime import OnnxClip

from .content import doc_item, has_content
from .options import INDEX_SUBDIR, base_spec, int_parameter, request_parameters, resolve_workspace, setting
from .schemas import ClipDoc, MatchDoc

logger = logging.getLogger(__name__)

SEARCH_PARAMETERS = ("limit",)
_VERSION_RETRIES = 3  # a swap between taking the index version and using it: retry with the new one


def stored_item(doc: StoredDoc, uri_root: Optional[str] = None) -> Item:
    """What to embed for a stored doc (its image, else its text)."""
    return make_item(f"stored doc {doc.id!r}", text=doc.text, tensor=doc.tensor, blob=doc.blob, uri=doc.uri,
                     uri_root=uri_root)


class CLIPIndexer(Executor):
    """Stores docs with their vectors, searches them, and re-embeds them when the model version changes.

    Args:
        model: base arch published on a fresh registry when ``bootstrap`` (``$CLIPTUNER_MODEL``).
        pretrained: its pretrained tag or checkpoint; None for random init (``$CLIPTUNER_PRETRAINED``).
        device: ONNX Runtime device for the indexer's own model: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        models_dir: the registry; default ``<workspace>/models``.
        index_dir: the collection; default ``<workspace>/index/<shard id>``.
        backend: ``auto``, ``usearch`` or ``exact`` (see :class:`cliptuner.index.Collection`).
        exact_threshold: doc count from which ``auto`` searches an HNSW index.
        bootstrap: publish the base version when the registry is empty (else only wait for one).
        bootstrap_timeout: seconds to wait for a version published by another service.
        batch_size: items per ONNX Runtime call.
        rebuild_batch_size: stored docs re-embedded per batch during a rebuild.
        intra_op_threads: ONNX Runtime threads per call.
        uri_root: when set, ``uri`` paths must lie under it.
        default_limit: matches per query when ``limit`` is not given.
        max_limit: the largest ``limit`` accepted.
        watch_interval: seconds between checks of CURRENT by the background watcher; 0 disables it.

    Raises:
        ValueError: no workspace, or bad settings.
        RuntimeError: the collection is already open in another process.
    """

    def __init__(
        self,
        model: Optional[str] = None,
        pretrained: Optional[str] = None,
        device: Optional[str] = None,
        models_dir: Optional[str] = None,
        index_dir: Optional[str] = None,
        backend: str = "auto",
        exact_threshold: int = 5000,
        bootstrap: bool = True,
        bootstrap_timeout: float = 600.0,
        batch_size: int = 32,
        rebuild_batch_size: int = 256,
        intra_op_threads: Optional[int] = None,
        uri_root: Optional[str] = None,
        default_limit: int = 10,
        max_limit: int = 1000,
        watch_interval: float = 2.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        workspace = resolve_workspace(self, models_dir, kwargs.get("workspace"))
        self.registry = workspace.registry
        self.default_limit = int_parameter("default_limit", default_limit)
        self.max_limit = int_parameter("max_limit", max_limit, minimum=self.default_limit)
        self.rebuild_batch_size = int_parameter("rebuild_batch_size", rebuild_batch_size)
        self.uri_root = setting(uri_root)
        ensure_current(self.registry, base_spec(model, pretrained) if bootstrap else None,
                       timeout=float(bootstrap_timeout))
        self.follower = ModelFollower(self.registry, device=setting(device) or "auto",
                                      intra_op_threads=setting(intra_op_threads), batch_size=int(batch_size))
        self.collection = Collection(self._index_dir(index_dir, workspace.root), backend=backend,
                                     exact_threshold=exact_threshold)
        self._clips: dict[str, OnnxClip] = {}  # the index's version and, during a rebuild, the new one
        self._clips_lock = threading.Lock()
        self._sync_lock = threading.Lock()  # one rebuild at a time
        self._rebuilding: Optional[dict] = None
        self._last_rebuild: Optional[dict] = None
        self._last_error: Optional[str] = None
        if self.collection.version is None:  # a new collection takes CURRENT at once (no docs to re-embed)
            self.collection.rebuild(self.registry.current(), lambda docs: np.zeros((0, 1), np.float32))
        self._stop = threading.Event()
        self._watcher: Optional[threading.Thread] = None
        if float(watch_interval) > 0:
            self._watcher = threading.Thread(target=self._watch, args=(float(watch_interval),),
                                             name="cliptuner-index-watcher", daemon=True)
            self._watcher.start()
        logger.info("CLIPIndexer: %d docs of version %s in %s (CURRENT %s)", len(self.collection),
                    self.collection.version, self.collection.root, self.registry.current())

    def _index_dir(self, index_dir: Optional[str], root: Optional[Path]) -> Path:
        explicit = setting(index_dir)
        if explicit:
            return Path(explicit).expanduser()
        if root is None:
            raise ValueError("CLIPIndexer: no workspace; set CLIPTUNER_WORKSPACE, pass --workspace / workspace=..., "
                             "or give index_dir")
        shard = getattr(self.runtime_args, "shard_id", None)
        return root / INDEX_SUBDIR / str(shard if isinstance(shard, int) and shard >= 0 else 0)

    # -- model versions --------------------------------------------------------------------------------------
    def _clip_for(self, version: str) -> OnnxClip:
        """The indexer's model of ``version`` (loaded once, kept while the index or CURRENT uses it)."""
        with self._clips_lock:
            clip = self._clips.get(version)
            if clip is None:
                clip = self.follower.open(version)
                self._clips[version] = clip
            return clip

    def _forget_clips(self) -> None:
        keep = {self.collection.version, self.registry.current()}
        with self._clips_lock:
            for version in [v for v in self._clips if v not in keep]:
                del self._clips[version]

    def sync(self) -> Optional[dict]:
        """Re-embed the stored docs with CURRENT's version if the index holds another one, and swap.

        Returns:
            ``{"model_version", "from_version", "count", "rebuild_seconds"}`` when it rebuilt, else None.

        Raises:
            Whatever embedding a stored doc raises (names the doc); the index then keeps its old version.
        """
        if self.registry.current() in (None, self.collection.version):
            return None
        with self._sync_lock:
            target = self.registry.current()
            old = self.collection.version
            if target in (None, old):
                return None
            clip = self._clip_for(target)
            started = time.monotonic()
            self._rebuilding = {"from_version": old, "to_version": target, "started_at": time.time()}
            embed: Callable[[list[StoredDoc]], np.ndarray] = \
                lambda batch: embed_items(clip, [stored_item(doc, self.uri_root) for doc in batch])
            try:
                count = self.collection.rebuild(target, embed, batch_size=self.rebuild_batch_size)
            except Exception as exc:
                self._last_error = f"rebuild {old} → {target} failed: {exc}"
                raise
            finally:
                self._rebuilding = None
            self._last_error = None
            self._last_rebuild = {"model_version": target, "from_version": old, "count": count,
                                  "rebuild_seconds": round(time.monotonic() - started, 3)}
            self._forget_clips()
            logger.info("index now holds %d docs of version %s (was %s)", count, target, old)
            return dict(self._last_rebuild)

    def _watch(self, interval: float) -> None:
        """Follow CURRENT in the background (a version published while no /train passes through here)."""
        failed_for: Optional[str] = None
        while True:
            current = self.registry.current()
            if current not in (None, self.collection.version, failed_for):
                try:
                    self.sync()
                    failed_for = None
                except Exception:  # kept in _last_error and /status; retried when CURRENT moves again
                    logger.exception("could not move the index to model version %s", current)
                    failed_for = current
            if self._stop.wait(interval):
                return

    def close(self) -> None:
        """Stop the watcher and close the collection (saves its HNSW index)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)
        self.collection.close()
        super().close()

    # -- the work, in worker threads ---------------------------------------------------------------------------
    def _vectors(self, docs: DocList[ClipDoc], version: str, need_content: bool) -> np.ndarray:
        """One vector per doc in ``version``: its embedding if made by ``version``, else embedded here.

        Raises:
            ValueError: a doc without content (``need_content``, or one whose embedding is of another version).
        """
        vectors: list[Optional[np.ndarray]] = []
        todo: list[tuple[int, Item]] = []
        for i, doc in enumerate(docs):
            if need_content and not has_content(doc):
                raise ValueError(f"doc {doc.id!r}: has neither text nor an image (blob, uri or tensor); the indexer "
                                 "stores content so that it can re-embed it when the model changes")
            if doc.embedding is not None and doc.model_version == version:
                vectors.append(np.asarray(doc.embedding, dtype=np.float32).reshape(-1))
                continue
            if not has_content(doc):
                made_by = f"model version {doc.model_version!r}" if doc.embedding is not None else "no embedding"
                raise ValueError(f"doc {doc.id!r}: has {made_by} but the index holds version {version!r}, and no "
                                 "text or image to encode with it")
            vectors.append(None)
            todo.append((i, doc_item(doc, self.uri_root)))
        if todo:
            embedded = embed_items(self._clip_for(version), [item for _, item in todo])  # [len(todo), D]
            for (i, _), vector in zip(todo, embedded):
                vectors[i] = vector
        if not vectors:
            return np.zeros((0, self.collection.dim or 1), np.float32)
        dims = {v.shape[0] for v in vectors}
        if len(dims) > 1:
            raise ValueError(f"docs have embeddings of different sizes {sorted(dims)}")
        return np.stack(vectors)  # [N, D]

    def _with_index_version(self, work: Callable[[str], Any]) -> Any:
        """Run ``work(version)`` with the index's version, again if a swap happened in between."""
        for attempt in range(_VERSION_RETRIES):
            version = self.collection.version
            try:
                return work(version)
            except ValueError:
                if attempt + 1 < _VERSION_RETRIES and self.collection.version != version:
                    continue  # the index moved to a new version meanwhile: redo with it
                raise
        raise AssertionError("unreachable")

    def _index(self, docs: DocList[ClipDoc]) -> DocList[ClipDoc]:
        seen: set[str] = set()
        for doc in docs:
            if doc.id in seen:
                raise ValueError(f"doc {doc.id!r} appears more than once in one /index request")
            seen.add(doc.id)
            doc_item(doc, self.uri_root)  # check content before embedding anything
        stored = [StoredDoc(id=doc.id, text=doc.text, uri=doc.uri, blob=doc.blob,
                            tensor=None if doc.tensor is None else np.asarray(doc.tensor), tags=dict(doc.tags))
                  for doc in docs]

        def upsert(version: str) -> str:
            vectors = self._vectors(docs, version, need_content=True)
            self.collection.upsert(stored, vectors, version)
            for doc, vector in zip(docs, vectors):
                doc.embedding, doc.model_version = vector, version
            return version

        if len(docs):
            self._with_index_version(upsert)
        return docs

    def _search(self, docs: DocList[ClipDoc], limit: int) -> DocList[ClipDoc]:
        def search(version: str) -> tuple[str, np.ndarray, list]:
            vectors = self._vectors(docs, version, need_content=False)
            return version, vectors, self.collection.search(vectors, limit, version=version)

        if not len(docs):
            return docs
        version, vectors, hits = self._with_index_version(search)
        wanted = list(dict.fromkeys(doc_id for row in hits for doc_id, _ in row))
        stored = dict(zip(wanted, self.collection.get(wanted)))
        for doc, vector, row in zip(docs, vectors, hits):
            matches, scores = [], []
            for doc_id, score in row:
                found = stored.get(doc_id)
                if found is None:  # deleted between the search and the fetch
                    continue
                matches.append(MatchDoc(id=found.id, text=found.text, uri=found.uri, blob=found.blob,
                                        tensor=found.tensor, model_version=version, score=float(score),
                                        tags=found.tags))
                scores.append(float(score))
            doc.embedding, doc.model_version = vector, version
            doc.matches = DocList[MatchDoc](matches)
            doc.scores = scores
        return docs

    def _delete(self, docs: DocList[ClipDoc]) -> DocList[ClipDoc]:
        ids = [doc.id for doc in docs]
        present = {doc_id for doc_id, found in zip(ids, self.collection.get(ids)) if found is not None}
        self.collection.delete(ids)
        for doc in docs:
            doc.tags["deleted"] = doc.id in present
        return docs

    def status(self) -> dict:
        """What this indexer holds: version, count, dimension, backend, rebuild state, CURRENT."""
        stats = self.collection.stats()
        return {"executor": "CLIPIndexer", "model_version": stats["version"], "count": stats["count"],
                "dim": stats["dim"], "backend": stats["backend"], "registry_current": self.registry.current(),
                "rebuilding": self._rebuilding, "last_rebuild": self._last_rebuild, "last_error": self._last_error,
                "index_dir": str(self.collection.root)}

    # -- endpoints -----------------------------------------------------------------------------------------------
    @requests(on="/index")
    async def index(self, docs: DocList[ClipDoc], parameters: Optional[dict] = None,
                    **kwargs: Any) -> DocList[ClipDoc]:
        """Store docs with their vectors (embedding them here when they lack a vector of the index's version)."""
        request_parameters(parameters, (), "/index")
        return await asyncio.to_thread(self._index, docs)

    @requests(on="/search")
    async def search(self, docs: DocList[ClipDoc], parameters: Optional[dict] = None,
                     **kwargs: Any) -> DocList[ClipDoc]:
        """Top-``limit`` stored docs per query by cosine similarity, as ``matches`` and ``scores``."""
        params = request_parameters(parameters, SEARCH_PARAMETERS, "/search")
        limit = int_parameter("limit", params.get("limit", self.default_limit), maximum=self.max_limit)
        return await asyncio.to_thread(self._search, docs, limit)

    @requests(on="/delete")
    async def delete(self, docs: DocList[ClipDoc], parameters: Optional[dict] = None,
                     **kwargs: Any) -> DocList[ClipDoc]:
        """Remove stored docs by id; ``tags['deleted']`` says whether each was stored."""
        request_parameters(parameters, (), "/delete")
        return await asyncio.to_thread(self._delete, docs)

    @requests(on="/train")
    async def train_done(self, docs: DocList[ClipDoc], **kwargs: Any) -> DocList[ClipDoc]:
        """After the tuner and the encoder: re-embed everything with the new version before the response goes on."""
        rebuilt = await asyncio.to_thread(self.sync)
        stats = self.collection.stats()
        summary = {"model_version": stats["version"], "count": stats["count"],
                   "rebuild_seconds": None if rebuilt is None else rebuilt["rebuild_seconds"]}
        for doc in docs:
            doc.tags["index"] = summary
        return docs

    @requests(on="/status")
    async def report_status(self, docs: DocList[ClipDoc], **kwargs: Any) -> DocList[ClipDoc]:
        """Append this indexer's status doc."""
        state = await asyncio.to_thread(self.status)
        docs.append(ClipDoc(id="status-indexer", model_version=state["model_version"], tags=state))
        return docs

    @requests
    async def passthrough(self, docs: DocList[ClipDoc], **kwargs: Any) -> DocList[ClipDoc]:
        """Endpoints of the others (``/encode``): docs pass unchanged."""
        return docs
