"""CLIPEncoder: texts and images → L2-normalised embeddings with the registry's CURRENT model (ONNX, no torch).

Endpoints, what each does with a doc, the image sources and the request limits are described in docs/service.md.
A request is embedded entirely by one model version; small requests share model runs through a
:class:`cliptuner.serve.batching.MicroBatcher` (``batch_wait_ms``). Its settings are :class:`CLIPEncoder`'s
arguments; unset ones come from the service's environment (:class:`cliptuner.settings.ServiceEnvironment`).
"""

import asyncio
import logging
import math
from typing import Any, Optional

from docarray import DocList
from jina import Executor, requests

from cliptuner.serve.batching import MAX_WAIT_MS, MicroBatcher, decode_items
from cliptuner.serve.content import Item, embed_items
from cliptuner.serve.status import status_view, wants_detail
from cliptuner.settings import ServiceEnvironment

from .content import check_request, doc_item, has_content
from .metrics import Metrics
from .options import ExecutorSettings, ExecutorSetup, request_parameters, setting
from .schemas import ClipDoc

logger = logging.getLogger(__name__)

DEFAULT_BATCH_WAIT_MS = 2.0  # see benchmarks/clients.py: enough to gather a batch under load, unnoticed alone


def batch_wait(value: Any) -> float:
    """``batch_wait_ms`` as milliseconds: a number (or numeric text) in [0, 1000]; unset (None, empty, an
    unexpanded ``$VAR``) gives the default.

    Raises:
        ValueError: not a number, or out of range (names the value).
    """
    value = setting(value)
    if value is None:
        return DEFAULT_BATCH_WAIT_MS
    try:
        wait = float(value)
    except (TypeError, ValueError):
        wait = math.nan
    if isinstance(value, bool) or not (math.isfinite(wait) and 0 <= wait <= MAX_WAIT_MS):
        raise ValueError(
            f"batch_wait_ms must be a number of milliseconds in [0, {MAX_WAIT_MS:g}] (0: no batching), got {value!r}"
        )
    return wait


class CLIPEncoder(Executor):
    """Embeds texts and images with the CURRENT model version of the registry, following it as it moves.

    Args:
        batch_size: items per ONNX Runtime call, and most items in one batched run.
        batch_wait_ms: how long a small request may wait for others to share its model run, in milliseconds
            (0 turns dynamic batching off); unset: ``$CLIPTUNER_BATCH_WAIT_MS``, else 2.
        **kwargs: the settings the three Executors share, by name (:class:`executors.options.ExecutorSettings`:
            model, pretrained, device, models_dir, bootstrap, bootstrap_timeout, uri_roots, allowed_hosts,
            intra_op_threads and the request limits ``max_*``), then jina's own.

    Raises:
        ValueError: no workspace and no ``models_dir``, a bad model spec / device, a bad uri or limit setting, or a
            bad ``batch_wait_ms``.
        cliptuner.serve.bootstrap.BootstrapTimeout: no model version appeared in time.
    """

    def __init__(
        self,
        batch_size: int = 32,
        batch_wait_ms: Optional[float] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        wait = setting(batch_wait_ms)
        self.batch_wait_ms = batch_wait(ServiceEnvironment.get("batch_wait_ms") if wait is None else wait)
        settings = ExecutorSettings.take(kwargs)
        setup = ExecutorSetup.start(self, settings)
        self.registry, self.policy, self.limits = setup.registry, setup.policy, setup.limits
        self.follower = setup.follower(batch_size)
        clip = self.follower.clip()
        self.metrics = Metrics(getattr(self.runtime_args, "metrics_registry", None))
        self.metrics.time_requests(self)
        self.metrics.model_version(clip.version)
        self.batch_size = int(batch_size)
        self.batcher = (
            MicroBatcher(self.batch_size, self.batch_wait_ms, on_run=self._model_run)
            if self.batch_wait_ms > 0
            else None
        )
        logger.info(
            "CLIPEncoder serving %s from %s on %s (batch_wait_ms=%g)",
            clip.version,
            self.registry.root,
            clip.providers,
            self.batch_wait_ms,
        )

    # -- the work, in worker threads ---------------------------------------------------------------------------
    def _check_docs(self, docs: DocList[ClipDoc], pass_vector_queries: bool) -> tuple[Any, list[ClipDoc], list[Item]]:
        """Check a request, take its one model reference, and the items of the docs to embed.

        Every doc with content is embedded, and its ``embedding``/``model_version`` overwritten, whatever a client
        sent in them: the indexer behind this encoder in the Flow trusts the vectors it receives
        (``trust_client_vectors``) because of that.

        Args:
            pass_vector_queries: leave as they are vector-only docs (an embedding, no content) for the indexer to
                judge (``/index``, ``/search``); otherwise every doc must have content (``/encode``).

        Returns:
            The model reference (one version for the whole request), the docs to embed and their items.

        Raises:
            ValueError: a request over the limits, a doc without content, or with a bad or refused
                tensor/blob/uri (names the doc id), before any is encoded.
        """
        check_request(docs, self.limits)
        clip = self.follower.clip()  # one version for the whole request
        todo: list[ClipDoc] = []
        items: list[Item] = []
        for doc in docs:
            if pass_vector_queries and doc.embedding is not None and not has_content(doc):
                continue  # a vector-only query: the indexer judges it
            items.append(doc_item(doc, self.policy, self.limits))  # check every doc before encoding any
            todo.append(doc)
        return clip, todo, items

    def _embed_now(self, clip: Any, todo: list[ClipDoc], items: list[Item], endpoint: str) -> None:
        """Embed a request's items in this thread, on their own (no batching)."""
        if todo:
            with self.metrics.encoding(endpoint, todo):
                vectors = embed_items(clip, items)  # [len(todo), embed_dim]
            self._model_run(len(items), 1)
            self._apply(clip, todo, vectors)
        self.metrics.model_version(clip.version)

    def _apply(self, clip: Any, todo: list[ClipDoc], vectors: Any) -> None:
        for doc, vector in zip(todo, vectors):
            doc.embedding = vector
            doc.model_version = clip.version

    def _embed(self, docs: DocList[ClipDoc], pass_vector_queries: bool, endpoint: str) -> DocList[ClipDoc]:
        """Embed docs with one model reference, in this thread (see :meth:`_check_docs`).

        Raises:
            ValueError: see :meth:`_check_docs`.
            cliptuner.model.images.ImageError: an image cannot be decoded (names the doc id).
        """
        clip, todo, items = self._check_docs(docs, pass_vector_queries)
        self._embed_now(clip, todo, items, endpoint)
        return docs

    def _prepare_batched(
        self, docs: DocList[ClipDoc], pass_vector_queries: bool, endpoint: str
    ) -> Optional[tuple[Any, list[ClipDoc], list[Item]]]:
        """Check a request and decode its images for the batcher; a request the batcher does not take (large, or
        with http(s) images) is embedded here instead, and None returned.

        Raises:
            ValueError, cliptuner.model.images.ImageError: as :meth:`_embed`, before anything is submitted.
        """
        clip, todo, items = self._check_docs(docs, pass_vector_queries)
        if not todo or not self.batcher.accepts(items):
            self._embed_now(clip, todo, items, endpoint)
            return None
        return clip, todo, decode_items(clip, items)

    async def _encode(self, docs: DocList[ClipDoc], pass_vector_queries: bool, endpoint: str) -> DocList[ClipDoc]:
        """Embed docs (see :meth:`_embed`), through the batcher when batching is on: the request waits for its
        rows without holding a thread, so many small requests can wait together."""
        if self.batcher is None:
            return await asyncio.to_thread(self._embed, docs, pass_vector_queries, endpoint)
        prepared = await asyncio.to_thread(self._prepare_batched, docs, pass_vector_queries, endpoint)
        if prepared is None:
            return docs
        clip, todo, items = prepared
        with self.metrics.encoding(endpoint, todo):
            vectors = await asyncio.wrap_future(self.batcher.submit(clip, items))  # [len(todo), embed_dim]
        self._apply(clip, todo, vectors)
        self.metrics.model_version(clip.version)
        return docs

    def _model_run(self, items: int, submissions: int) -> None:
        """Count a model run's items (ONNX Runtime runs at most ``batch_size`` at a time)."""
        full, rest = divmod(items, self.batch_size)
        for size in [self.batch_size] * full + ([rest] if rest else []):
            self.metrics.encode_batch(size)

    def _swap(self) -> str:
        self.follower.refresh(strict=True)
        version = self.follower.clip().version
        self.metrics.model_version(version)
        return version

    def status(self) -> dict:
        """What this encoder serves: model version, embedding size, providers, registry, and ``batching``: its
        settings (``batch_wait_ms``, 0 when off; ``batch_size``) and, when on, the batcher's counters
        (:meth:`cliptuner.serve.batching.MicroBatcher.stats`: ``runs``, ``items``, ``largest_run``, ``merged_runs`` …;
        requests embedded on their own are not counted there)."""
        clip = self.follower.clip()
        self.metrics.model_version(clip.version)
        batching = {"batch_wait_ms": self.batch_wait_ms, "batch_size": self.batch_size}
        if self.batcher is not None:
            batching.update(self.batcher.stats())
        return {
            "executor": "CLIPEncoder",
            "model_version": clip.version,
            "embed_dim": clip.embed_dim,
            "providers": clip.providers,
            "registry": str(self.registry.root),
            "last_error": self.follower.last_error,
            "batching": batching,
        }

    def close(self) -> None:
        """Embed what the batcher holds, stop it, then close the Executor."""
        if self.batcher is not None:
            self.batcher.close()
        super().close()

    # -- endpoints -----------------------------------------------------------------------------------------------
    @requests(on="/encode")
    async def encode(
        self, docs: DocList[ClipDoc], parameters: Optional[dict] = None, **kwargs: Any
    ) -> DocList[ClipDoc]:
        """Embed every doc (text, image, or pair → its image); sets ``embedding`` and ``model_version``.

        The image bytes and pixels a client sent are not sent back (``blob``, ``bytes_`` and ``tensor`` come back
        empty; ``id``, ``text``, ``uri``, ``url`` and ``tags`` stay): the answer carries what the client asked for,
        the vectors.
        """
        request_parameters(parameters, (), "/encode")
        docs = await self._encode(docs, False, "/encode")
        for doc in docs:
            doc.blob = None
            doc.bytes_ = None
            doc.tensor = None
        return docs

    @requests(on="/index")
    async def encode_for_index(self, docs: DocList[ClipDoc], **kwargs: Any) -> DocList[ClipDoc]:
        """Embed docs on their way to the indexer (docs with content; vector-only docs pass for it to judge)."""
        return await self._encode(docs, True, "/index")

    @requests(on="/search")
    async def encode_queries(self, docs: DocList[ClipDoc], **kwargs: Any) -> DocList[ClipDoc]:
        """Embed queries on their way to the indexer (vector-only queries pass)."""
        return await self._encode(docs, True, "/search")

    @requests(on=["/train", "/models/promote", "/models/rollback"])
    async def train_done(self, docs: DocList[ClipDoc], **kwargs: Any) -> DocList[ClipDoc]:
        """After the tuner (a ``/train``, ``/models/promote`` or ``/models/rollback``): serve CURRENT before the
        response goes on."""
        version = await asyncio.to_thread(self._swap)
        for doc in docs:
            doc.tags["encoder"] = {"model_version": version}
        return docs

    @requests(on="/status")
    async def report_status(
        self, docs: DocList[ClipDoc], parameters: Optional[dict] = None, **kwargs: Any
    ) -> DocList[ClipDoc]:
        """Append this encoder's status doc (without server paths unless the gateway set ``detail``)."""
        state = await asyncio.to_thread(self.status)
        if not wants_detail(parameters):
            state = status_view(state, self.registry.root.parent)
        docs.append(ClipDoc(id="status-encoder", model_version=state["model_version"], tags=state))
        return docs

    @requests
    async def passthrough(self, docs: DocList[ClipDoc], **kwargs: Any) -> DocList[ClipDoc]:
        """Endpoints of the others (``/delete``): docs pass unchanged."""
        return docs
