"""CLIPEncoder: texts and images → L2-normalised embeddings with the registry's CURRENT model (ONNX, no torch).

Endpoints:

- ``/encode``: every doc gets ``embedding`` and ``model_version``. Takes no parameters.
- ``/index``, ``/search``: the same for docs that have content, so that the indexer downstream receives
  vectors; a doc without content but with an embedding (a vector query) passes unchanged. Parameters belong
  to the indexer and are not checked here.
- ``/train`` (after the tuner published a version): swap to CURRENT now, so that once ``/train`` returns, every
  request is encoded by the tuned version; adds ``tags['encoder'] = {'model_version': ...}`` to the report.
- ``/status``: appends ``ClipDoc(id='status-encoder', model_version=..., tags={...})`` to the docs.
- anything else (``/delete``): passes the docs on unchanged.

A doc that carries both text and an image (a pair) is embedded by its image: in a gallery the image is what a
caption searches for, and a query pair is an image query that carries its caption. Send the text as its own
doc to embed the text. An image is taken from ``tensor`` (H×W×3 uint8), else ``blob`` (an encoded file),
else ``uri`` (a local path or a ``data:`` URI).

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

from .content import doc_item, has_content
from .options import base_spec, request_parameters, resolve_workspace, setting
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
        uri_root: when set, ``uri`` paths must lie under it (relative ones are taken from it).

    Raises:
        ValueError: no workspace and no ``models_dir``, or a bad model spec / device.
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
        uri_root: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.registry = resolve_workspace(self, models_dir, kwargs.get("workspace")).registry
        spec = base_spec(model, pretrained) if bootstrap else None
        ensure_current(self.registry, spec, timeout=float(bootstrap_timeout))
        self.uri_root = setting(uri_root)
        self.follower = ModelFollower(self.registry, device=setting(device) or "auto",
                                      intra_op_threads=setting(intra_op_threads), batch_size=int(batch_size))
        clip = self.follower.clip()
        logger.info("CLIPEncoder serving %s from %s on %s", clip.version, self.registry.root, clip.providers)

    # -- the work, in worker threads ---------------------------------------------------------------------------
    def _embed(self, docs: DocList[ClipDoc], skip_current: bool) -> DocList[ClipDoc]:
        """Embed docs with one model reference.

        Args:
            skip_current: leave as they are the docs that already carry an embedding of the served version, and
                vector-only docs (an embedding, no content) for the indexer to judge (``/index``, ``/search``);
                otherwise every doc is embedded and must have content (``/encode``).

        Raises:
            ValueError: a doc without content, or with a bad tensor/blob/uri (names the doc id), before any is
                encoded.
            cliptuner.images.ImageError: an image cannot be decoded (names the doc id).
        """
        clip = self.follower.clip()  # one version for the whole request
        version = clip.version
        todo: list[tuple[ClipDoc, Item]] = []
        for doc in docs:
            if skip_current and doc.embedding is not None and (doc.model_version == version or not has_content(doc)):
                continue  # embedded by this version already, or a vector-only query: the indexer judges it
            todo.append((doc, doc_item(doc, self.uri_root)))  # check every doc before encoding any
        if todo:
            vectors = embed_items(clip, [item for _, item in todo])  # [len(todo), embed_dim]
            for (doc, _), vector in zip(todo, vectors):
                doc.embedding = vector
                doc.model_version = version
        return docs

    def _swap(self) -> str:
        self.follower.refresh(strict=True)
        return self.follower.clip().version

    def status(self) -> dict:
        """What this encoder serves: model version, embedding size, providers, registry."""
        clip = self.follower.clip()
        return {"executor": "CLIPEncoder", "model_version": clip.version, "embed_dim": clip.embed_dim,
                "providers": clip.providers, "registry": str(self.registry.root),
                "last_error": self.follower.last_error}

    # -- endpoints -----------------------------------------------------------------------------------------------
    @requests(on="/encode")
    async def encode(self, docs: DocList[ClipDoc], parameters: Optional[dict] = None,
                     **kwargs: Any) -> DocList[ClipDoc]:
        """Embed every doc (text, image, or pair → its image); sets ``embedding`` and ``model_version``."""
        request_parameters(parameters, (), "/encode")
        return await asyncio.to_thread(self._embed, docs, False)

    @requests(on=["/index", "/search"])
    async def encode_for_index(self, docs: DocList[ClipDoc], **kwargs: Any) -> DocList[ClipDoc]:
        """Embed docs on their way to the indexer (docs with content; vector-only queries pass)."""
        return await asyncio.to_thread(self._embed, docs, True)

    @requests(on="/train")
    async def train_done(self, docs: DocList[ClipDoc], **kwargs: Any) -> DocList[ClipDoc]:
        """After the tuner: serve the version it published before the response goes on."""
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
