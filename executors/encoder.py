"""CLIPEncoder: texts and images → L2-normalised embeddings with the registry's CURRENT model (ONNX, no torch).

Endpoints:

- ``/encode``: every doc gets ``embedding`` and ``model_version``. Takes no parameters. At most ``max_docs`` docs.
- ``/index``, ``/search``: the same for docs that have content (overwriting any ``embedding``/``model_version``
  a client sent), so that the indexer downstream receives vectors made here; a doc without content but with an
  embedding (a vector query) passes unchanged. Parameters belong to the indexer and are not checked here.
- ``/train`` (after the tuner published a version): swap to CURRENT now, so that once ``/train`` returns, every
  request is encoded by the tuned version; adds ``tags['encoder'] = {'model_version': ...}`` to the report.
- ``/status``: appends ``ClipDoc(id='status-encoder', model_version=..., tags={...})`` to the docs.
- anything else (``/delete``): passes the docs on unchanged.

A doc that carries both text and an image (a pair) is embedded by its image: in a gallery the image is what a
caption searches for, and a query pair is an image query that carries its caption. Send the text as its own
doc to embed the text. An image is taken from ``tensor`` (H×W×3 uint8), else ``blob`` (an encoded file),
else ``uri``: a ``data:`` URI, a local path or ``file://`` URI under the image roots (``uri_roots``, default
``<workspace>/data``; symlinks resolved before the check), or an ``http(s)`` URL of an allow-listed host
(``allowed_hosts``, default none). Any other uri is refused with one message that names the doc, whether or not
the path exists (:class:`cliptuner.access.UriPolicy`).

Request limits (:class:`cliptuner.limits.RequestLimits`), checked before anything is decoded or tokenized:
``max_docs`` docs per request (1024), ``max_text_chars`` characters per text (10,000), ``max_blob_bytes`` per
image (32 MiB) and ``max_request_bytes`` summed over the blobs, tensors and uris of a request (256 MiB).

Model versions: each request takes one model reference (after a one-``stat`` check of ``models/CURRENT``)
and encodes all its docs with it, so no request is ever half old, half new; a new version is loaded and
swapped in without a restart. On a fresh workspace the base version is published first (see
:func:`cliptuner.bootstrap.ensure_current`), or waited for when ``bootstrap`` is off.

Bad input raises inside the endpoint with the doc id and the problem (neither text nor image, an undecodable
blob, a tensor that is not H×W×3 uint8); the service stays up for the next request.
"""

import asyncio
import logging
from typing import Any, Optional

from docarray import DocList
from jina import Executor, requests

from cliptuner.bootstrap import ensure_current
from cliptuner.content import Item, embed_items
from cliptuner.follow import ModelFollower
from cliptuner.limits import RequestLimits

from .content import check_request, doc_item, has_content
from .metrics import Metrics
from .options import base_spec, request_parameters, resolve_workspace, setting, uri_policy
from .schemas import ClipDoc

logger = logging.getLogger(__name__)

class CLIPEncoder(Executor):
    """Embeds texts and images with the CURRENT model version of the registry, following it as it moves.

    Args:
        model: base OpenCLIP arch or bundled config published on a fresh registry (``$CLIPTUNER_MODEL``).
        pretrained: its pretrained tag or local checkpoint; None for random init (``$CLIPTUNER_PRETRAINED``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` for ONNX Runtime (``$CLIPTUNER_DEVICE``).
        models_dir: the registry; default ``<workspace>/models``.
        bootstrap: publish the base version when the registry is empty (else only wait for one).
        bootstrap_timeout: seconds to wait for a version published by another service.
        batch_size: items per ONNX Runtime call.
        intra_op_threads: ONNX Runtime threads per call; None lets it decide.
        uri_roots: folders that ``uri`` paths must lie under (a list or an ``os.pathsep``-separated string,
            relative ones from the workspace); relative uris are taken from the first; unset:
            ``$CLIPTUNER_URI_ROOTS``, else ``<workspace>/data``.
        allowed_hosts: http(s) hosts (``host`` or ``host:port``) that ``uri``s may name (a list or a
            comma-separated string); unset: ``$CLIPTUNER_ALLOWED_HOSTS``, else none.
        max_docs: most docs in one request.
        max_text_chars: most characters in one doc's text.
        max_blob_bytes: most bytes of one encoded image (blob, data: URI, http(s) body).
        max_request_bytes: most bytes of blobs, tensors and uris in one request.

    Raises:
        ValueError: no workspace and no ``models_dir``, a bad model spec / device, or a bad uri or limit setting.
        cliptuner.bootstrap.BootstrapTimeout: no model version appeared in time.
    """

    def __init__(
        self,
        model: Optional[str] = None,
        pretrained: Optional[str] = None,
        device: Optional[str] = None,
        models_dir: Optional[str] = None,
        bootstrap: bool = True,
        bootstrap_timeout: float = 600.0,
        batch_size: int = 32,
        intra_op_threads: Optional[int] = None,
        uri_roots: Optional[Any] = None,
        allowed_hosts: Optional[Any] = None,
        max_docs: int = RequestLimits.max_docs,
        max_text_chars: int = RequestLimits.max_text_chars,
        max_blob_bytes: int = RequestLimits.max_blob_bytes,
        max_request_bytes: int = RequestLimits.max_request_bytes,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        workspace = resolve_workspace(self, models_dir, kwargs.get("workspace"))
        self.registry = workspace.registry
        self.policy = uri_policy(workspace, uri_roots, allowed_hosts)
        self.limits = RequestLimits(max_docs=max_docs, max_text_chars=max_text_chars, max_blob_bytes=max_blob_bytes,
                                    max_request_bytes=max_request_bytes)
        spec = base_spec(model, pretrained) if bootstrap else None
        ensure_current(self.registry, spec, timeout=float(bootstrap_timeout))
        self.follower = ModelFollower(self.registry, device=setting(device) or "auto",
                                      intra_op_threads=setting(intra_op_threads), batch_size=int(batch_size))
        clip = self.follower.clip()
        self.metrics = Metrics(getattr(self.runtime_args, "metrics_registry", None))
        self.metrics.model_version(clip.version)
        logger.info("CLIPEncoder serving %s from %s on %s", clip.version, self.registry.root, clip.providers)

    # -- the work, in worker threads ---------------------------------------------------------------------------
    def _embed(self, docs: DocList[ClipDoc], pass_vector_queries: bool, endpoint: str) -> DocList[ClipDoc]:
        """Embed docs with one model reference.

        Every doc with content is embedded here, and its ``embedding``/``model_version`` overwritten, whatever a
        client sent in them: the indexer behind this encoder in the Flow trusts the vectors it receives
        (``trust_client_vectors``) because of that.

        Args:
            pass_vector_queries: leave as they are vector-only docs (an embedding, no content) for the indexer to
                judge (``/index``, ``/search``); otherwise every doc must have content (``/encode``).

        Raises:
            ValueError: a request over the limits, a doc without content, or with a bad or refused
                tensor/blob/uri (names the doc id), before any is encoded.
            cliptuner.images.ImageError: an image cannot be decoded (names the doc id).
        """
        check_request(docs, self.limits)
        clip = self.follower.clip()  # one version for the whole request
        version = clip.version
        todo: list[tuple[ClipDoc, Item]] = []
        for doc in docs:
            if pass_vector_queries and doc.embedding is not None and not has_content(doc):
                continue  # a vector-only query: the indexer judges it
            todo.append((doc, doc_item(doc, self.policy, self.limits)))  # check every doc before encoding any
        if todo:
            with self.metrics.encoding(endpoint, [doc for doc, _ in todo]):
                vectors = embed_items(clip, [item for _, item in todo])  # [len(todo), embed_dim]
            for (doc, _), vector in zip(todo, vectors):
                doc.embedding = vector
                doc.model_version = version
        self.metrics.model_version(version)
        return docs

    def _swap(self) -> str:
        self.follower.refresh(strict=True)
        version = self.follower.clip().version
        self.metrics.model_version(version)
        return version

    def status(self) -> dict:
        """What this encoder serves: model version, embedding size, providers, registry."""
        clip = self.follower.clip()
        self.metrics.model_version(clip.version)
        return {"executor": "CLIPEncoder", "model_version": clip.version, "embed_dim": clip.embed_dim,
                "providers": clip.providers, "registry": str(self.registry.root),
                "last_error": self.follower.last_error}

    # -- endpoints -----------------------------------------------------------------------------------------------
    @requests(on="/encode")
    async def encode(self, docs: DocList[ClipDoc], parameters: Optional[dict] = None,
                     **kwargs: Any) -> DocList[ClipDoc]:
        """Embed every doc (text, image, or pair → its image); sets ``embedding`` and ``model_version``.

        The image bytes and pixels a client sent are not sent back (``blob`` and ``tensor`` come back empty; ``id``,
        ``text``, ``uri`` and ``tags`` stay): the answer carries what the client asked for, the vectors.
        """
        request_parameters(parameters, (), "/encode")
        docs = await asyncio.to_thread(self._embed, docs, False, "/encode")
        for doc in docs:
            doc.blob = None
            doc.tensor = None
        return docs

    @requests(on="/index")
    async def encode_for_index(self, docs: DocList[ClipDoc], **kwargs: Any) -> DocList[ClipDoc]:
        """Embed docs on their way to the indexer (docs with content; vector-only docs pass for it to judge)."""
        return await asyncio.to_thread(self._embed, docs, True, "/index")

    @requests(on="/search")
    async def encode_queries(self, docs: DocList[ClipDoc], **kwargs: Any) -> DocList[ClipDoc]:
        """Embed queries on their way to the indexer (vector-only queries pass)."""
        return await asyncio.to_thread(self._embed, docs, True, "/search")

    @requests(on=["/train", "/models/promote", "/models/rollback"])
    async def train_done(self, docs: DocList[ClipDoc], **kwargs: Any) -> DocList[ClipDoc]:
        """After the tuner (a ``/train``, ``/models/promote`` or ``/models/rollback``): serve CURRENT before the
        response goes on."""
        version = await asyncio.to_thread(self._swap)
        for doc in docs:
            doc.tags["encoder"] = {"model_version": version}
        return docs

    @requests(on="/status")
    async def report_status(self, docs: DocList[ClipDoc], **kwargs: Any) -> DocList[ClipDoc]:
        """Append this encoder's status doc."""
        state = await asyncio.to_thread(self.status)
        docs.append(ClipDoc(id="status-encoder", model_version=state["model_version"], tags=state))
        return docs

    @requests
    async def passthrough(self, docs: DocList[ClipDoc], **kwargs: Any) -> DocList[ClipDoc]:
        """Endpoints of the others (``/delete``): docs pass unchanged."""
        return docs
