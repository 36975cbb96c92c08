"""CLIPIndexer: stores docs with their vectors, searches them, and moves them to each new model version.

The endpoints (``/index``, ``/search``, ``/delete``, ``/feedback``, ``/train``, ``/status``), the rule for vectors
that clients send, the request limits and sharding are described in ``docs/service.md``. ``/feedback`` records
what people chose among the results of a search in the workspace's feedback log
(:mod:`cliptuner.serve.feedback`). The vector store is
:mod:`cliptuner.index.stores`; re-embedding for a new version, following CURRENT and a shard's versions are
:class:`cliptuner.serve.reindex.Reindexer`'s. One replica per shard: a store's folder is opened by one process.
"""

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
from docarray import DocList
from jina import Executor, requests

from cliptuner.index.embedded import HnswSettings, StoredDoc, check_where
from cliptuner.index.shards import check_shards, shard_of
from cliptuner.index.stores import open_store
from cliptuner.index.vectors import client_vector, repeated_ids
from cliptuner.serve.content import Item, embed_items, image_source
from cliptuner.serve.feedback import FEEDBACK_SUBDIR, FeedbackRecorder, encoded_image, event_of
from cliptuner.serve.limits import RequestLimits
from cliptuner.serve.reindex import Reindexer
from cliptuner.serve.status import status_view, wants_detail
from cliptuner.settings import ServiceEnvironment

from .content import check_request, doc_blob, doc_item, doc_uri, has_content
from .metrics import Metrics
from .options import INDEX_SUBDIR, ExecutorSettings, ExecutorSetup, int_parameter, request_parameters, setting
from .schemas import ClipDoc, MatchDoc
from .shards import STATUS_ID, trailer

logger = logging.getLogger(__name__)

SEARCH_PARAMETERS = ("limit", "return_content", "filter")
TAG_PREFIX = "tags."  # a filter names tags as the docs carry them: {'tags.category': 'shoes'}


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


def _environment_token() -> Optional[str]:
    """The Milvus token from ``$CLIPTUNER_MILVUS_TOKEN``, or None."""
    token = ServiceEnvironment.get("milvus_token")
    return token.get_secret_value() if token is not None else None


class CLIPIndexer(Executor):
    """Stores docs with their vectors, searches them, and re-embeds them when the model version changes.

    Args:
        index_dir: the collection; default ``<workspace>/index/<shard id>``.
        backend: the vector store (:mod:`cliptuner.index.stores`): ``auto``, ``usearch`` or ``exact`` (embedded,
            :class:`cliptuner.index.embedded.Collection`), or ``milvus`` (:class:`cliptuner.index.milvus.MilvusCollection`;
            unset: ``$CLIPTUNER_INDEX_BACKEND``, else ``auto``).
        hnsw_connectivity, hnsw_expansion_add, hnsw_expansion_search: the embedded backend's HNSW graph
            (:class:`cliptuner.index.embedded.HnswSettings`; recall in ``benchmarks/RESULTS.md``).
        vector_dtype: the embedded backends: vectors held in memory as ``f32``, ``f16`` or ``i8`` (recall in
            ``benchmarks/RESULTS.md``); float32 on disk, so a change takes effect at the next start.
        milvus_uri: ``milvus``: the server's URI (``http://host:19530``); unset: Milvus Lite in the index folder.
        milvus_token: ``milvus``: the server's token, if it asks for one; unset: ``$CLIPTUNER_MILVUS_TOKEN``
            (a Kubernetes Secret reaches the indexer that way, see ``cliptuner k8s --milvus-token-secret``).
        exact_threshold: doc count from which ``auto`` searches an HNSW index.
        batch_size: items per ONNX Runtime call.
        rebuild_batch_size: stored docs re-embedded per batch during a rebuild.
        default_limit: matches per query when ``limit`` is not given.
        max_limit: the largest ``limit`` accepted.
        watch_interval: seconds between checks of CURRENT by the background watcher; 0 disables it.
        trust_client_vectors: use the ``embedding`` of a doc with content when its ``model_version`` is the
            index's, instead of embedding the content here. Only behind an encoder that embeds every doc with
            content (the Flow); off for an indexer that clients reach directly.
        **kwargs: the settings the three Executors share, by name (:class:`executors.options.ExecutorSettings`:
            model, pretrained, device, models_dir, bootstrap, bootstrap_timeout, uri_roots, allowed_hosts,
            intra_op_threads and the request limits ``max_*``), then jina's own.

    Raises:
        ValueError: no workspace, or bad settings.
        RuntimeError: the collection is already open in another process.
    """

    def __init__(
        self,
        index_dir: Optional[str] = None,
        backend: Optional[str] = None,
        exact_threshold: int = 5000,
        hnsw_connectivity: int = HnswSettings.connectivity,
        hnsw_expansion_add: int = HnswSettings.expansion_add,
        hnsw_expansion_search: int = HnswSettings.expansion_search,
        vector_dtype: str = "f32",
        milvus_uri: Optional[str] = None,
        milvus_token: Optional[str] = None,
        batch_size: int = 32,
        rebuild_batch_size: int = 256,
        default_limit: int = 10,
        max_limit: int = RequestLimits.max_limit,
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
        backend = setting(backend) or ServiceEnvironment.get("index_backend")
        if self.shards > 1 and backend == "milvus":
            raise ValueError(
                f"CLIPIndexer: {self.shards} shards need the embedded backend (auto, usearch or exact); "
                "Milvus shards a collection itself: run one indexer in front of it"
            )
        self.default_limit = int_parameter("default_limit", default_limit)
        self.max_limit = int_parameter("max_limit", max_limit, minimum=self.default_limit)
        self.rebuild_batch_size = int_parameter("rebuild_batch_size", rebuild_batch_size)
        if not isinstance(trust_client_vectors, bool):
            raise ValueError(f"trust_client_vectors must be true or false, got {trust_client_vectors!r}")
        self.trust_client_vectors = trust_client_vectors
        settings = ExecutorSettings.take(kwargs, max_limit=self.max_limit)
        setup = ExecutorSetup.start(self, settings)
        self.registry, self.policy, self.limits = setup.registry, setup.policy, setup.limits
        self.follower = setup.follower(batch_size)
        self.collection = open_store(
            self._index_dir(index_dir, setup.workspace.root),
            backend=backend,
            exact_threshold=exact_threshold,
            hnsw=HnswSettings(
                int_parameter("hnsw_connectivity", hnsw_connectivity, 2),
                int_parameter("hnsw_expansion_add", hnsw_expansion_add, 2),
                int_parameter("hnsw_expansion_search", hnsw_expansion_search, 2),
            ),
            milvus_uri=setting(milvus_uri) or ServiceEnvironment.get("milvus_uri"),
            milvus_token=setting(milvus_token) or _environment_token(),
            keep_previous=self.shards > 1,
            dtype=setting(vector_dtype) or "f32",
        )
        self.feedback = FeedbackRecorder(
            setup.root / FEEDBACK_SUBDIR,  # <workspace>/feedback, one log for all shards; opened at the first event
            self.collection,
            self.policy,
            self.limits.image_limits,
            owns=lambda doc_id: shard_of(doc_id, self.shards) == self.shard,
        )
        self.metrics = Metrics(getattr(self.runtime_args, "metrics_registry", None))
        self.metrics.time_requests(self)
        self.reindexer = Reindexer(
            self.collection,
            self.registry,
            self.follower,
            self.policy,
            self.limits,
            batch_size=self.rebuild_batch_size,
            shard=self.shard,
            shards=self.shards,
            on_progress=self.metrics.rebuild_progress,
            on_version=self.metrics.model_version,
        )
        self.reindexer.adopt_current()
        self.metrics.index_size(lambda: len(self.collection))
        self.metrics.rebuild_progress(0.0)
        self.metrics.model_version(self.collection.version)
        self.reindexer.watch(float(watch_interval))
        held = (len(self.collection), self.collection.version, self.collection.root, self.registry.current())
        logger.info("CLIPIndexer: %d docs of version %s in %s (CURRENT %s)", *held)

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
            held = (self.collection.version, self.collection.previous_version)
            return DocList[ClipDoc]([trailer(self.shard, self.shards, *held, error=str(exc))])
        # what the work saw (a search says which versions it searched in), else what the shard holds now
        version = tags.pop("serving", self.collection.version)
        previous = tags.pop("previous", self.collection.previous_version)
        docs.append(trailer(self.shard, self.shards, version, previous, **tags))
        return docs

    def sync(self) -> Optional[dict]:
        """Move the index to CURRENT's version now (see :meth:`cliptuner.serve.reindex.Reindexer.sync`)."""
        return self.reindexer.sync()

    def close(self) -> None:
        """Stop following CURRENT and close the collection (saves its HNSW index) and the feedback log."""
        self.reindexer.close()
        self.collection.close()
        self.feedback.close()
        super().close()

    # -- the work, in worker threads ---------------------------------------------------------------------------
    def _vectors(self, docs: DocList[ClipDoc], version: str, need_content: bool) -> np.ndarray:
        """One L2-normalised vector per doc in ``version``, by the rule for vectors from clients (docs/service.md).

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
                dim = self.reindexer.dim_of(version)
                vectors.append(client_vector(doc.embedding, doc.model_version, doc.id, version, dim))
                continue
            vectors.append(None)
            todo.append((i, doc_item(doc, self.policy, self.limits)))
        if todo:
            embedded = embed_items(self.reindexer.clip_for(version), [item for _, item in todo])  # [len(todo), D]
            for (i, _), vector in zip(todo, embedded):
                vectors[i] = vector
        if not vectors:
            return np.zeros((0, self.collection.dim or 1), np.float32)
        return np.stack(vectors)  # [N, D]

    def _index(self, docs: DocList[ClipDoc], mine: list[int]) -> DocList[ClipDoc]:
        """Check every doc of the request, then store the ones at positions ``mine`` (this shard's); returns those."""
        check_request(docs, self.limits)
        repeated = repeated_ids(doc.id for doc in docs)
        if repeated:
            raise ValueError(
                f"doc ids given more than once in one /index request: {repeated}; nothing was stored (send each id once)"
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
            self.reindexer.with_store_version(upsert)
        return docs

    def _match_docs(
        self, hits: list[list[tuple[str, float]]], version: str, return_content: bool
    ) -> list[list[MatchDoc]]:
        """The stored docs behind ``(id, score)`` rows, as matches scored by ``version``."""
        wanted = list(dict.fromkeys(doc_id for row in hits for doc_id, _ in row))
        stored = dict(zip(wanted, self.collection.get(wanted, content=return_content)))  # image bytes if asked
        return [
            [
                MatchDoc(**vars(found), model_version=version, score=float(score))
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
        version, vectors, hits = self.reindexer.with_store_version(search)
        return self._answered(docs, version, vectors, self._match_docs(hits, version, return_content))

    @staticmethod
    def _answered(
        docs: DocList[ClipDoc], version: str, vectors: np.ndarray, matches: list[list[MatchDoc]]
    ) -> DocList[ClipDoc]:
        """The query docs with the vectors searched with (of ``version``), their matches and scores."""
        for doc, vector, found in zip(docs, vectors, matches):
            doc.embedding, doc.model_version = vector, version
            doc.matches = DocList[MatchDoc](found)
            doc.scores = [m.score for m in found]
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

        def search(version: str) -> tuple[np.ndarray, list[list[MatchDoc]]]:
            vectors = self._vectors(docs, version, need_content=False)
            hits = self.collection.search(vectors, limit, version=version, where=where) if len(docs) else []
            return vectors, self._match_docs(hits, version, return_content)

        answers, serving, previous = self.reindexer.each_version(search)
        matches: list[list[MatchDoc]] = [[] for _ in docs]
        for _, (_, found) in answers:
            for row, more in zip(matches, found):
                row.extend(more)
        version, (vectors, _) = answers[0]  # the queries as the served version embeds them
        tags = {"answered": [v for v, _ in answers], "limit": limit, "serving": serving, "previous": previous}
        return self._answered(docs, version, vectors, matches), tags

    def _delete(self, docs: DocList[ClipDoc], mine: list[int]) -> DocList[ClipDoc]:
        """Remove the docs at positions ``mine`` (this shard's), all or none; returns them, tagged ``deleted``."""
        if len(mine) != len(docs):
            docs = DocList[ClipDoc]([docs[i] for i in mine])
        self.collection.delete([doc.id for doc in docs], missing_ok=False)  # an unknown id: nothing is removed
        for doc in docs:
            doc.tags["deleted"] = True
        return docs

    def _feedback(self, docs: DocList[ClipDoc]) -> DocList[ClipDoc]:
        """Record one feedback event per doc (all or none); the docs, tagged ``feedback``, without image bytes."""
        check_request(docs, self.limits)
        repeated = repeated_ids(doc.id for doc in docs)
        if repeated:
            raise ValueError(
                f"event ids given more than once in one /feedback request: {repeated}; nothing was recorded "
                "(send each event once)"
            )
        events = []
        for doc in docs:
            name, limits = f"doc {doc.id!r}", self.limits.image_limits
            source = image_source(name, doc.tensor, doc_blob(doc), doc_uri(doc), self.policy, limits)
            image = None if source is None else encoded_image(source, name, limits)  # a tensor as a PNG
            events.append(event_of(doc.id, doc.tags, doc.text, image, doc.model_version))
        stored = self.feedback.record(events)
        answered = DocList[ClipDoc]()
        for doc, new in zip(docs, stored):
            uri = doc_uri(doc)
            answered.append(
                ClipDoc(
                    id=doc.id,
                    text=doc.text,
                    uri=None if uri and uri[:5].lower() == "data:" else uri,  # a data: uri is image bytes too
                    model_version=doc.model_version,
                    tags={**doc.tags, "feedback": {"event_id": doc.id, "stored": new}},
                )
            )
        return answered

    def status(self) -> dict:
        """What this indexer holds: version, count, dimension, backend, rebuild state, CURRENT (and its shard)."""
        return {"executor": "CLIPIndexer", **self.reindexer.status()}

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

    @requests(on="/feedback")
    async def feedback_event(
        self, docs: DocList[ClipDoc], parameters: Optional[dict] = None, **kwargs: Any
    ) -> DocList[ClipDoc]:
        """Record what people chose among the results of a search: one event per doc, stored durably and once per
        event id; a shard checks and copies the shown docs it owns (docs/service.md)."""

        async def work() -> tuple[DocList[ClipDoc], dict]:
            request_parameters(parameters, (), "/feedback")
            return await asyncio.to_thread(self._feedback, docs), {"positions": list(range(len(docs)))}

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
    async def report_status(
        self, docs: DocList[ClipDoc], parameters: Optional[dict] = None, **kwargs: Any
    ) -> DocList[ClipDoc]:
        """Append this indexer's status doc (without server paths unless the gateway set ``detail``)."""

        async def work() -> tuple[DocList[ClipDoc], dict]:
            state = await asyncio.to_thread(self.status)
            if not wants_detail(parameters):
                state = status_view(state, self.registry.root.parent)
            docs.append(ClipDoc(id=STATUS_ID, model_version=state["model_version"], tags=state))
            return docs, {}

        return await self._answer(work)

    @requests
    async def passthrough(self, docs: DocList[ClipDoc], **kwargs: Any) -> DocList[ClipDoc]:
        """Endpoints of the others (``/encode``): docs pass unchanged."""
        return docs
