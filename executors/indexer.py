"""CLIPIndexer: a persistent collection of docs and their vectors, searched by cosine similarity.

Endpoints:

- ``/index``: stores each doc (its text, uri, blob, tensor and tags, so that it can be re-embedded later) with
  its vector (see "Vectors from clients"). A doc must have content. An existing id is replaced; an id given twice
  in one request is refused (naming it) and nothing of that request is stored. The write is committed to disk
  before the answer: an acknowledged ``/index`` survives ``kill -9``. No parameters.
- ``/search``: ``parameters={'limit': k, 'return_content': bool, 'filter': {'tags.category': 'shoes', ...}}``
  (defaults 10, False and none; a filter keeps the stored docs whose tags equal every value given). Each query
  doc gets
  ``matches`` (best first: ``id``, ``text``, ``uri``, ``tags``, ``score`` and ``model_version``; the stored
  ``blob`` and ``tensor`` only with ``return_content=True``) and ``scores``. A query is a doc with content
  (embedded by the index's version) or a vector query (see below); the query's ``embedding``/``model_version``
  come back as the ones used. A search never compares two versions.
- ``/delete``: removes the docs with these ids. An id that is not stored makes the whole request fail, naming
  it, and nothing is removed; otherwise each doc comes back with ``tags['deleted'] = True``. No parameters.
- ``/train`` (after the tuner and the encoder): re-embeds every stored doc with the CURRENT version and swaps the
  index to it before the response goes on; adds ``tags['index'] = {model_version, count, rebuild_seconds}``.
- ``/status``: appends ``ClipDoc(id='status-indexer', model_version=..., tags={count, rebuilding, ...})``.
- anything else (``/encode``): passes the docs on unchanged.

Model versions: the index holds vectors of one version. When CURRENT moves (a ``/train`` passing through, or
the watcher thread noticing it within ``watch_interval`` seconds), the indexer re-embeds the stored docs with the
new version on the side (:meth:`cliptuner.index.embedded.Collection.rebuild`); searches keep using the old version until
the atomic swap, and docs indexed meanwhile are re-embedded before it. The collection lives under
``<workspace>/index/<shard>`` and survives restarts. A rebuild commits the new vectors in batches: killed midway,
the indexer restarts on the old version and the watcher resumes the rebuild with the docs not yet re-embedded.

Vectors from clients: the indexer stores and compares only vectors made by the index's model version, finite
and L2-normalised here.

- A doc with content (``/index``, or a ``/search`` query) is embedded here by the index's version, whatever
  ``embedding`` it carries, unless the operator set ``trust_client_vectors``: then an ``embedding`` whose
  ``model_version`` is the index's version is used as it is (checked for dimension and finiteness). The Flow sets
  it because the encoder sits before the indexer and overwrites ``embedding``/``model_version`` of every doc with
  content on ``/index`` and ``/search``, so a vector that reaches the indexer there was made by the service; a
  standalone indexer (a Deployment, ``jina executor``) keeps the default, off. Run with it on only behind that
  encoder, with the indexer's own port unreachable to clients.
- A ``/search`` doc without content but with an ``embedding`` is a vector query: its ``model_version`` must be
  the index's version (the ``embedding``/``model_version`` that ``/encode`` returns), its dimension the index's,
  its values finite and not all zero; it is normalised here. A doc with neither content nor ``embedding`` is
  refused.

Client ``uri``s (of docs to index and of queries) and the re-embedding of stored docs follow one
:class:`cliptuner.serve.access.UriPolicy` (``uri_roots``, ``allowed_hosts``; see :class:`~executors.encoder.CLIPEncoder`):
a stored doc whose path now leads outside the image roots (replaced by a symlink) is refused when re-embedded.
Request limits (:class:`cliptuner.serve.limits.RequestLimits`), checked before anything is decoded: ``max_docs`` docs
per ``/index`` or ``/search`` (1024), ``max_text_chars`` per text (10,000), ``max_blob_bytes`` per image (32 MiB),
``max_request_bytes`` per request (256 MiB), ``max_limit`` matches per query (1000).

Run it with one replica per shard: a collection directory is opened by one process at a time.

Shards (flows/shards.yml, ``cliptuner serve --index-shards N``): with Jina ``shards: N`` each shard keeps the docs
whose id hashes to it (:func:`cliptuner.index.shards.shard_of`) in ``<workspace>/index/<shard>``, answers with a trailer
doc, and keeps its previous version searchable after a swap until every shard has swapped; the
:class:`executors.shards.ShardMerger` after the shards puts their answers together (see :mod:`executors.shards`).
Shards need the embedded backend: Milvus shards a collection itself, so run one indexer in front of it.
"""

import asyncio
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
from docarray import DocList
from jina import Executor, requests

from cliptuner.index.embedded import HnswSettings, StoredDoc, check_where
from cliptuner.index.shards import check_shards, record_version, shard_of, versions_served
from cliptuner.index.stores import open_store
from cliptuner.model.follow import ModelFollower
from cliptuner.model.runtime import OnnxClip
from cliptuner.serve.access import UriPolicy
from cliptuner.serve.bootstrap import ensure_current
from cliptuner.serve.content import Item, embed_items, make_item
from cliptuner.serve.limits import RequestLimits

from .content import check_request, doc_blob, doc_item, doc_uri, has_content
from .metrics import Metrics
from .options import INDEX_SUBDIR, base_spec, int_parameter, request_parameters, resolve_workspace, setting, uri_policy
from .schemas import ClipDoc, MatchDoc
from .shards import STATUS_ID, trailer

logger = logging.getLogger(__name__)

SEARCH_PARAMETERS = ("limit", "return_content", "filter")
MILVUS_TOKEN_ENV = "CLIPTUNER_MILVUS_TOKEN"
TAG_PREFIX = "tags."  # a filter names tags as the docs carry them: {'tags.category': 'shoes'}
_VERSION_RETRIES = 3  # a swap between taking the index version and using it: retry with the new one
# a shard frees its previous version this long after it has seen every shard serve its version: a search that
# reached a shard still on the old version just before its swap has long been answered by then
PREVIOUS_GRACE_S = 10.0


def stored_item(doc: StoredDoc, policy: UriPolicy, limits: RequestLimits) -> Item:
    """What to embed for a stored doc (its image, else its text); its ``uri`` is checked again by ``policy``."""
    return make_item(
        f"stored doc {doc.id!r}",
        text=doc.text,
        tensor=doc.tensor,
        blob=doc.blob,
        uri=doc.uri,
        policy=policy,
        limits=limits.image_limits,
    )


def search_filter(raw: Any) -> Optional[dict]:
    """The ``filter`` parameter of ``/search`` as the vector store's tag filter (``{'category': 'shoes'}``).

    Keys name tags as docs carry them (``tags.<name>``); values are strings, numbers or booleans. A number that
    protobuf carried as a float but is whole (``2024.0``) is compared as the integer it was.

    Raises:
        ValueError: not a mapping, a key without the ``tags.`` prefix, or a bad key or value (names it).
    """
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(
            f"parameter 'filter' must be a non-empty mapping like {{'tags.category': 'shoes'}}, got {raw!r}"
        )
    where = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not key.startswith(TAG_PREFIX):
            raise ValueError(f"parameter 'filter': key {key!r} must name a tag, like 'tags.category'")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        where[key[len(TAG_PREFIX) :]] = value
    return check_where(where)


class CLIPIndexer(Executor):
    """Stores docs with their vectors, searches them, and re-embeds them when the model version changes.

    Args:
        model: base arch published on a fresh registry when ``bootstrap`` (``$CLIPTUNER_MODEL``).
        pretrained: its pretrained tag or checkpoint; None for random init (``$CLIPTUNER_PRETRAINED``).
        device: ONNX Runtime device for the indexer's own model: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        models_dir: the registry; default ``<workspace>/models``.
        index_dir: the collection; default ``<workspace>/index/<shard id>``.
        backend: the vector store (:mod:`cliptuner.index.stores`): ``auto``, ``usearch`` or ``exact`` (embedded,
            :class:`cliptuner.index.embedded.Collection`), or ``milvus`` (:class:`cliptuner.index.milvus.MilvusCollection`;
            ``$CLIPTUNER_INDEX_BACKEND`` in flows/flow.yml).
        hnsw_connectivity, hnsw_expansion_add, hnsw_expansion_search: the embedded backend's HNSW graph
            (:class:`cliptuner.index.embedded.HnswSettings`; on 100k clustered 512-d vectors the defaults reach recall@10
            0.995 at 11.1x the exact search's queries/s, ``benchmarks/RESULTS.md``, and fall short on harder data,
            ``benchmarks/CHOICES.md``).
        vector_dtype: the embedded backends: how the vectors are held in memory, ``f32``, ``f16`` (half the
            memory) or ``i8`` (a quarter), at that precision (recall in ``benchmarks/RESULTS.md``); on disk they stay
            float32, so a change takes effect at the next start.
        milvus_uri: ``milvus``: the server's URI (``http://host:19530``); unset: Milvus Lite in the index folder.
        milvus_token: ``milvus``: the server's token, if it asks for one; unset: ``$CLIPTUNER_MILVUS_TOKEN``
            (a Kubernetes Secret reaches the indexer that way, see ``cliptuner k8s --milvus-token-secret``).
        exact_threshold: doc count from which ``auto`` searches an HNSW index.
        bootstrap: publish the base version when the registry is empty (else only wait for one).
        bootstrap_timeout: seconds to wait for a version published by another service.
        batch_size: items per ONNX Runtime call.
        rebuild_batch_size: stored docs re-embedded per batch during a rebuild.
        intra_op_threads: ONNX Runtime threads per call.
        uri_roots: folders that ``uri`` paths must lie under; unset: ``$CLIPTUNER_URI_ROOTS``, else
            ``<workspace>/data`` (see :func:`executors.options.uri_policy`).
        allowed_hosts: http(s) hosts ``uri``s may name; unset: ``$CLIPTUNER_ALLOWED_HOSTS``, else none.
        default_limit: matches per query when ``limit`` is not given.
        max_limit: the largest ``limit`` accepted.
        max_docs: most docs in one ``/index`` or ``/search`` request.
        max_text_chars: most characters in one doc's text.
        max_blob_bytes: most bytes of one encoded image (blob, data: URI, http(s) body).
        max_request_bytes: most bytes of blobs, tensors and uris in one request.
        watch_interval: seconds between checks of CURRENT by the background watcher; 0 disables it.
        trust_client_vectors: use the ``embedding`` of a doc with content when its ``model_version`` is the
            index's, instead of embedding the content here. Only behind an encoder that embeds every doc with
            content (the Flow); off for an indexer that clients reach directly.

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
        hnsw_connectivity: int = HnswSettings.connectivity,
        hnsw_expansion_add: int = HnswSettings.expansion_add,
        hnsw_expansion_search: int = HnswSettings.expansion_search,
        vector_dtype: str = "f32",
        milvus_uri: Optional[str] = None,
        milvus_token: Optional[str] = None,
        bootstrap: bool = True,
        bootstrap_timeout: float = 600.0,
        batch_size: int = 32,
        rebuild_batch_size: int = 256,
        intra_op_threads: Optional[int] = None,
        uri_roots: Optional[Any] = None,
        allowed_hosts: Optional[Any] = None,
        default_limit: int = 10,
        max_limit: int = RequestLimits.max_limit,
        max_docs: int = RequestLimits.max_docs,
        max_text_chars: int = RequestLimits.max_text_chars,
        max_blob_bytes: int = RequestLimits.max_blob_bytes,
        max_request_bytes: int = RequestLimits.max_request_bytes,
        watch_interval: float = 2.0,
        trust_client_vectors: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        shards = getattr(self.runtime_args, "shards", None)
        self.shard, self.shards = (
            check_shards(getattr(self.runtime_args, "shard_id", 0), shards)
            if isinstance(shards, int) and shards > 1
            else (0, 1)
        )
        if self.shards > 1 and setting(backend) == "milvus":
            raise ValueError(
                f"CLIPIndexer: {self.shards} shards need the embedded backend (auto, usearch or exact); "
                "Milvus shards a collection itself: run one indexer in front of it"
            )
        workspace = resolve_workspace(self, models_dir, kwargs.get("workspace"))
        self.registry = workspace.registry
        self.default_limit = int_parameter("default_limit", default_limit)
        self.max_limit = int_parameter("max_limit", max_limit, minimum=self.default_limit)
        self.rebuild_batch_size = int_parameter("rebuild_batch_size", rebuild_batch_size)
        if not isinstance(trust_client_vectors, bool):
            raise ValueError(f"trust_client_vectors must be true or false, got {trust_client_vectors!r}")
        self.trust_client_vectors = trust_client_vectors
        self.policy = uri_policy(workspace, uri_roots, allowed_hosts)
        self.limits = RequestLimits(
            max_docs=max_docs,
            max_text_chars=max_text_chars,
            max_blob_bytes=max_blob_bytes,
            max_request_bytes=max_request_bytes,
            max_limit=self.max_limit,
        )
        ensure_current(
            self.registry, base_spec(model, pretrained) if bootstrap else None, timeout=float(bootstrap_timeout)
        )
        self.follower = ModelFollower(
            self.registry,
            device=setting(device) or "auto",
            intra_op_threads=setting(intra_op_threads),
            batch_size=int(batch_size),
        )
        self.collection = open_store(
            self._index_dir(index_dir, workspace.root),
            backend=setting(backend) or "auto",
            exact_threshold=exact_threshold,
            hnsw=HnswSettings(
                int_parameter("hnsw_connectivity", hnsw_connectivity, 2),
                int_parameter("hnsw_expansion_add", hnsw_expansion_add, 2),
                int_parameter("hnsw_expansion_search", hnsw_expansion_search, 2),
            ),
            milvus_uri=setting(milvus_uri),
            milvus_token=setting(milvus_token) or os.environ.get(MILVUS_TOKEN_ENV) or None,
            keep_previous=self.shards > 1,
            dtype=setting(vector_dtype) or "f32",
        )
        self._all_swapped_since: Optional[float] = None  # shards: since when every shard serves our version
        self._clips: dict[str, OnnxClip] = {}  # the index's version and, during a rebuild, the new one
        self._clips_lock = threading.Lock()
        self._sync_lock = threading.Lock()  # one rebuild at a time
        self._rebuilding: Optional[dict] = None
        self._last_rebuild: Optional[dict] = None
        self._last_error: Optional[str] = None
        if self.collection.version is None:  # a new collection takes CURRENT at once (no docs to re-embed)
            self.collection.rebuild(self.registry.current(), lambda docs: np.zeros((0, 1), np.float32))
        self._record_version()
        self.metrics = Metrics(getattr(self.runtime_args, "metrics_registry", None))
        self.metrics.index_size(lambda: len(self.collection))
        self.metrics.rebuild_progress(0.0)
        self.metrics.model_version(self.collection.version)
        self._stop = threading.Event()
        self._watcher: Optional[threading.Thread] = None
        if float(watch_interval) > 0:
            self._watcher = threading.Thread(
                target=self._watch, args=(float(watch_interval),), name="cliptuner-index-watcher", daemon=True
            )
            self._watcher.start()
        logger.info(
            "CLIPIndexer: %d docs of version %s in %s (CURRENT %s)",
            len(self.collection),
            self.collection.version,
            self.collection.root,
            self.registry.current(),
        )

    def _index_dir(self, index_dir: Optional[str], root: Optional[Path]) -> Path:
        explicit = setting(index_dir)
        if explicit:
            return Path(explicit).expanduser()
        if root is None:
            raise ValueError(
                "CLIPIndexer: no workspace; set CLIPTUNER_WORKSPACE, pass --workspace / workspace=..., "
                "or give index_dir"
            )
        return root / INDEX_SUBDIR / str(self.shard)

    # -- shards ------------------------------------------------------------------------------------------------
    def _record_version(self) -> None:
        """Shards: tell the others (a file beside the shards' collections) which version this shard serves."""
        if self.shards > 1:
            record_version(self.collection.root.parent, self.shard, self.collection.version)

    def _maybe_drop_previous(self) -> None:
        """Shards: free the previous version once every shard has served this one for ``PREVIOUS_GRACE_S``."""
        if self.shards == 1 or self.collection.previous_version is None:
            return
        served = versions_served(self.collection.root.parent, self.shards)
        if any(version != self.collection.version for version in served):
            self._all_swapped_since = None
            return
        now = time.monotonic()
        if self._all_swapped_since is None:
            self._all_swapped_since = now
        elif now - self._all_swapped_since >= PREVIOUS_GRACE_S and self.collection.drop_previous():
            self._all_swapped_since = None
            self._forget_clips()
            logger.info(
                "shard %d: every shard serves version %s; its previous version is freed",
                self.shard,
                self.collection.version,
            )

    def _mine(self, docs: DocList[ClipDoc]) -> list[int]:
        """Positions of the docs this shard owns (all of them without shards)."""
        if self.shards == 1:
            return list(range(len(docs)))
        return [i for i, doc in enumerate(docs) if shard_of(doc.id, self.shards) == self.shard]

    async def _answer(self, work: Callable[[], Any]) -> DocList[ClipDoc]:
        """Run an endpoint's ``work()`` (which returns ``(docs, trailer tags)``) and answer with it.

        Without shards the docs are the answer and errors propagate. A shard appends its trailer and answers a
        failure with the trailer alone, carrying the error, since Jina's head would pass a failed shard's
        request on as a success (see :mod:`executors.shards`).
        """
        if self.shards == 1:
            docs, _ = await work()
            return docs
        try:
            docs, tags = await work()
        except Exception as exc:
            logger.warning("shard %d: %s", self.shard, exc)
            return DocList[ClipDoc](
                [
                    trailer(
                        self.shard,
                        self.shards,
                        self.collection.version,
                        self.collection.previous_version,
                        error=str(exc),
                    )
                ]
            )
        # what the work saw (a search says which versions it searched in), else what the shard holds now
        version = tags.pop("serving", self.collection.version)
        previous = tags.pop("previous", self.collection.previous_version)
        docs.append(trailer(self.shard, self.shards, version, previous, **tags))
        return docs

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
        keep = {self.collection.version, self.collection.previous_version, self.registry.current()}
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
            total = max(len(self.collection), 1)
            done = 0

            def embed(batch: list[StoredDoc]) -> np.ndarray:
                nonlocal done
                vectors = embed_items(clip, [stored_item(doc, self.policy, self.limits) for doc in batch])
                done += len(batch)
                self.metrics.rebuild_progress(min(done / total, 1.0))
                return vectors

            try:
                count = self.collection.rebuild(target, embed, batch_size=self.rebuild_batch_size)
            except Exception as exc:
                self._last_error = f"rebuild {old} → {target} failed: {exc}"
                raise
            finally:
                self._rebuilding = None
                self.metrics.rebuild_progress(0.0)
                self.metrics.model_version(self.collection.version)
                self._record_version()
            self._last_error = None
            self._last_rebuild = {
                "model_version": target,
                "from_version": old,
                "count": count,
                "rebuild_seconds": round(time.monotonic() - started, 3),
            }
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
            try:
                self._maybe_drop_previous()
            except Exception:
                logger.exception("shard %d: could not check the other shards' versions", self.shard)
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
        """One L2-normalised vector per doc in ``version``, by the rule of "Vectors from clients" (module doc).

        A doc with content is embedded here, unless ``trust_client_vectors`` is on and its ``embedding`` is of
        ``version``; a doc without content (a vector query) gives its ``embedding``, which must be of ``version``.

        Raises:
            ValueError: names the doc: no content (``need_content``), neither content nor an embedding, or an
                embedding of the wrong dimension, not finite, all zeros, or (without content) of another version.
        """
        vectors: list[Optional[np.ndarray]] = []
        todo: list[tuple[int, Item]] = []
        for i, doc in enumerate(docs):
            content = has_content(doc)
            if need_content and not content:
                raise ValueError(
                    f"doc {doc.id!r}: has neither text nor an image (blob, uri or tensor); the indexer "
                    "stores content so that it can re-embed it when the model changes"
                )
            if not content and doc.embedding is None:
                raise ValueError(
                    f"doc {doc.id!r}: has neither text nor an image (blob, uri or tensor) nor an "
                    "embedding; nothing to search with"
                )
            if not content or (
                self.trust_client_vectors and doc.embedding is not None and doc.model_version == version
            ):
                vectors.append(self._client_vector(doc, version))
                continue
            vectors.append(None)
            todo.append((i, doc_item(doc, self.policy, self.limits)))
        if todo:
            embedded = embed_items(self._clip_for(version), [item for _, item in todo])  # [len(todo), D]
            for (i, _), vector in zip(todo, embedded):
                vectors[i] = vector
        if not vectors:
            return np.zeros((0, self.collection.dim or 1), np.float32)
        return np.stack(vectors)  # [N, D]

    def _index_dim(self, version: str) -> int:
        """The dimension of ``version``'s vectors: the stored ones', else its model's."""
        stats = self.collection.stats()
        if stats["count"] and stats["version"] == version:
            return int(stats["dim"])
        return self._clip_for(version).embed_dim

    def _client_vector(self, doc: ClipDoc, version: str) -> np.ndarray:
        """A doc's own ``embedding`` as a unit vector of ``version``, or a ValueError naming the doc."""
        try:
            vector = np.asarray(doc.embedding, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise ValueError(f"doc {doc.id!r}: embedding must be a numeric vector ({err})") from None
        dim = self._index_dim(version)
        if vector.ndim != 1 or vector.shape[0] != dim:
            raise ValueError(
                f"doc {doc.id!r}: embedding has shape {tuple(vector.shape)}; the index holds "
                f"{dim}-dimension vectors of model version {version!r}"
            )
        if not np.isfinite(vector).all():
            raise ValueError(f"doc {doc.id!r}: embedding is not finite (it contains NaN or inf)")
        norm = float(np.linalg.norm(vector.astype(np.float64)))
        if norm == 0.0:
            raise ValueError(f"doc {doc.id!r}: embedding is all zeros")
        if doc.model_version != version:
            raise ValueError(
                f"doc {doc.id!r}: a vector query's model_version must be the index's version {version!r}, "
                f"got {doc.model_version!r}; send the embedding and model_version that /encode "
                "returns, or send text or an image"
            )
        return (vector / norm).astype(np.float32)

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

    def _index(self, docs: DocList[ClipDoc], mine: list[int]) -> DocList[ClipDoc]:
        """Check every doc of the request, then store the ones at positions ``mine`` (this shard's); returns those."""
        check_request(docs, self.limits)
        counts = Counter(doc.id for doc in docs)
        repeated = [f"{doc_id!r} ({n} times)" for doc_id, n in counts.items() if n > 1]
        if repeated:
            shown = ", ".join(repeated[:10]) + (", ..." if len(repeated) > 10 else "")
            raise ValueError(
                f"doc ids given more than once in one /index request: {shown}; nothing was stored (send each id once)"
            )
        for doc in docs:
            doc_item(doc, self.policy, self.limits)  # check content before embedding anything
        if len(mine) != len(docs):
            docs = DocList[ClipDoc]([docs[i] for i in mine])
        stored = [
            StoredDoc(
                id=doc.id,
                text=doc.text,
                uri=doc_uri(doc),
                blob=doc_blob(doc),  # url, bytes_ too
                tensor=None if doc.tensor is None else np.asarray(doc.tensor),
                tags=dict(doc.tags),
            )
            for doc in docs
        ]

        def upsert(version: str) -> str:
            vectors = self._vectors(docs, version, need_content=True)
            self.collection.upsert(stored, vectors, version)
            for doc, vector in zip(docs, vectors):
                doc.embedding, doc.model_version = vector, version
            return version

        if len(docs):
            self._with_index_version(upsert)
        return docs

    def _match_docs(
        self, hits: list[list[tuple[str, float]]], version: str, return_content: bool
    ) -> list[list[MatchDoc]]:
        """The stored docs behind ``(id, score)`` rows, as matches scored by ``version``."""
        wanted = list(dict.fromkeys(doc_id for row in hits for doc_id, _ in row))
        stored = dict(zip(wanted, self.collection.get(wanted, content=return_content)))  # image bytes if asked
        return [
            [
                MatchDoc(
                    id=found.id,
                    text=found.text,
                    uri=found.uri,
                    blob=found.blob,
                    tensor=found.tensor,
                    model_version=version,
                    score=float(score),
                    tags=found.tags,
                )
                for found, score in ((stored.get(doc_id), score) for doc_id, score in row)
                if found is not None
            ]  # None: deleted between the search and the fetch
            for row in hits
        ]

    def _search(
        self, docs: DocList[ClipDoc], limit: int, return_content: bool = False, where: Optional[dict] = None
    ) -> DocList[ClipDoc]:
        check_request(docs, self.limits)

        def search(version: str) -> tuple[str, np.ndarray, list]:
            vectors = self._vectors(docs, version, need_content=False)
            return version, vectors, self.collection.search(vectors, limit, version=version, where=where)

        if not len(docs):
            return docs
        version, vectors, hits = self._with_index_version(search)
        for doc, vector, matches in zip(docs, vectors, self._match_docs(hits, version, return_content)):
            doc.embedding, doc.model_version = vector, version
            doc.matches = DocList[MatchDoc](matches)
            doc.scores = [m.score for m in matches]
        return docs

    def _search_shard(
        self, docs: DocList[ClipDoc], limit: int, return_content: bool, where: Optional[dict]
    ) -> tuple[DocList[ClipDoc], dict]:
        """A shard's search: every query in the version it serves and in the previous one it keeps, if any.

        Each match carries its ``model_version``; a query's ``embedding``/``model_version`` are those of the
        served version. Returns the docs and the trailer's tags: the versions answered, the limit, and the served
        and previous versions as this search read them (a swap may land while it runs).
        """
        check_request(docs, self.limits)
        self._maybe_drop_previous()
        # read once: a swap during this search must not make the trailer claim a version the search did not use
        serving, previous = self.collection.version, self.collection.previous_version
        versions = [v for v in dict.fromkeys((serving, previous)) if v is not None]
        answered, first_error = [], None
        matches: list[list[MatchDoc]] = [[] for _ in docs]
        query_vectors: Optional[tuple[str, np.ndarray]] = None  # the first answered version's: the served one's
        for version in versions:
            try:  # a vector query of one version cannot be searched in the other: that version is not answered
                vectors = self._vectors(docs, version, need_content=False)
                hits = self.collection.search(vectors, limit, version=version, where=where) if len(docs) else []
            except ValueError as exc:
                first_error = first_error or exc
                continue
            answered.append(version)
            if query_vectors is None:
                query_vectors = (version, vectors)
            for row, found in zip(matches, self._match_docs(hits, version, return_content)):
                row.extend(found)
        if query_vectors is None:
            raise first_error or ValueError("the index holds no model version yet")
        version, vectors = query_vectors
        for doc, vector, found in zip(docs, vectors, matches):
            doc.embedding, doc.model_version = vector, version
            doc.matches = DocList[MatchDoc](found)
            doc.scores = [m.score for m in found]
        return docs, {"answered": answered, "limit": limit, "serving": serving, "previous": previous}

    def _delete(self, docs: DocList[ClipDoc], mine: list[int]) -> DocList[ClipDoc]:
        """Remove the docs at positions ``mine`` (this shard's), all or none; returns them, tagged ``deleted``."""
        if len(mine) != len(docs):
            docs = DocList[ClipDoc]([docs[i] for i in mine])
        self.collection.delete([doc.id for doc in docs], missing_ok=False)  # an unknown id: nothing is removed
        for doc in docs:
            doc.tags["deleted"] = True
        return docs

    def status(self) -> dict:
        """What this indexer holds: version, count, dimension, backend, rebuild state, CURRENT (and its shard)."""
        stats = self.collection.stats()
        state = {
            "executor": "CLIPIndexer",
            "model_version": stats["version"],
            "count": stats["count"],
            "dim": stats["dim"],
            "backend": stats["backend"],
            "registry_current": self.registry.current(),
            "rebuilding": self._rebuilding,
            "last_rebuild": self._last_rebuild,
            "last_error": self._last_error,
            "index_dir": str(self.collection.root),
        }
        if self.shards > 1:
            state.update(shard=self.shard, shards=self.shards, previous_version=stats.get("previous_version"))
        return state

    # -- endpoints -----------------------------------------------------------------------------------------------
    @requests(on="/index")
    async def index(self, docs: DocList[ClipDoc], parameters: Optional[dict] = None, **kwargs: Any) -> DocList[ClipDoc]:
        """Store docs with their vectors (embedding them here when they lack a vector of the index's version)."""

        async def work() -> tuple[DocList[ClipDoc], dict]:
            request_parameters(parameters, (), "/index")
            mine = self._mine(docs)
            return await asyncio.to_thread(self._index, docs, mine), {"positions": mine}

        return await self._answer(work)

    @requests(on="/search")
    async def search(
        self, docs: DocList[ClipDoc], parameters: Optional[dict] = None, **kwargs: Any
    ) -> DocList[ClipDoc]:
        """Top-``limit`` stored docs per query by cosine similarity, as ``matches`` and ``scores``."""

        async def work() -> tuple[DocList[ClipDoc], dict]:
            params = request_parameters(parameters, SEARCH_PARAMETERS, "/search")
            limit = int_parameter("limit", params.get("limit", self.default_limit), maximum=self.max_limit)
            return_content = params.get("return_content", False)
            if not isinstance(return_content, bool):  # protobuf carries a bool as a bool: anything else is a mistake
                raise ValueError(f"parameter 'return_content' must be true or false, got {return_content!r}")
            where = search_filter(params.get("filter"))
            with self.metrics.searching():
                if self.shards > 1:
                    return await asyncio.to_thread(self._search_shard, docs, limit, return_content, where)
                return await asyncio.to_thread(self._search, docs, limit, return_content, where), {}

        return await self._answer(work)

    @requests(on="/delete")
    async def delete(
        self, docs: DocList[ClipDoc], parameters: Optional[dict] = None, **kwargs: Any
    ) -> DocList[ClipDoc]:
        """Remove stored docs by id, all or none: an id that is not stored fails the request (naming it)."""

        async def work() -> tuple[DocList[ClipDoc], dict]:
            request_parameters(parameters, (), "/delete")
            mine = self._mine(docs)
            return await asyncio.to_thread(self._delete, docs, mine), {"positions": mine}

        return await self._answer(work)

    @requests(on=["/train", "/models/promote", "/models/rollback"])
    async def train_done(self, docs: DocList[ClipDoc], **kwargs: Any) -> DocList[ClipDoc]:
        """After the tuner and the encoder (a ``/train``, ``/models/promote`` or ``/models/rollback``): re-embed
        everything with CURRENT's version before the response goes on."""

        async def work() -> tuple[DocList[ClipDoc], dict]:
            rebuilt = await asyncio.to_thread(self.sync)
            stats = self.collection.stats()
            summary = {
                "model_version": stats["version"],
                "count": stats["count"],
                "rebuild_seconds": None if rebuilt is None else rebuilt["rebuild_seconds"],
            }
            for doc in docs:
                doc.tags["index"] = summary
            return docs, {}

        return await self._answer(work)

    @requests(on="/status")
    async def report_status(self, docs: DocList[ClipDoc], **kwargs: Any) -> DocList[ClipDoc]:
        """Append this indexer's status doc."""

        async def work() -> tuple[DocList[ClipDoc], dict]:
            state = await asyncio.to_thread(self.status)
            docs.append(ClipDoc(id=STATUS_ID, model_version=state["model_version"], tags=state))
            return docs, {}

        return await self._answer(work)

    @requests
    async def passthrough(self, docs: DocList[ClipDoc], **kwargs: Any) -> DocList[ClipDoc]:
        """Endpoints of the others (``/encode``): docs pass unchanged."""
        return docs
