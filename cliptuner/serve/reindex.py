"""Keeps a vector store on the model version the registry serves: re-embedding, following CURRENT, shard versions.

:class:`Reindexer` is what the indexer Executor (``executors/indexer.py``) holds for everything that is not an
endpoint: the models of the versions in use, the rebuild of the store for CURRENT's version (:meth:`Reindexer.sync`,
resumable, see :meth:`cliptuner.index.base.VectorStore.rebuild`), a background thread that follows CURRENT,
and for a shard of a sharded index the record of the version it serves and the freeing of its previous version
once every shard serves the new one (:mod:`cliptuner.index.shards`). The contract of the endpoints is in
``docs/service.md``. Jina-free and torch-free.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

import numpy as np

from cliptuner.index.base import VectorStore
from cliptuner.index.shards import record_version, versions_served
from cliptuner.index.vectors import StoredDoc
from cliptuner.model.follow import ModelFollower
from cliptuner.model.registry import Registry
from cliptuner.model.runtime import OnnxClip
from cliptuner.serve.access import UriPolicy
from cliptuner.serve.content import Item, embed_items, make_item
from cliptuner.serve.limits import RequestLimits

logger = logging.getLogger(__name__)

VERSION_RETRIES = 3  # a swap between taking the store's version and using it: retry with the new one
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


def _ignore(_: Any) -> None:
    return None


class Reindexer:
    """Moves a vector store to CURRENT's model version and keeps the models of the versions in use.

    Args:
        store: the vector store (opened by the caller, closed by it).
        registry: the model registry whose CURRENT the store follows.
        follower: opens the ONNX model of a version.
        policy: the rule for the ``uri`` of a stored doc when it is re-embedded.
        limits: image limits for re-embedded docs.
        batch_size: stored docs re-embedded per batch.
        shard: this store's shard, ``0 <= shard < shards``.
        shards: shards of the index (1: not sharded); a shard records the version it serves beside the others'.
        on_progress: called with the fraction of docs re-embedded (0.0 when a rebuild ends).
        on_version: called with the store's version after a rebuild.
    """

    def __init__(
        self,
        store: VectorStore,
        registry: Registry,
        follower: ModelFollower,
        policy: UriPolicy,
        limits: RequestLimits,
        *,
        batch_size: int = 256,
        shard: int = 0,
        shards: int = 1,
        on_progress: Callable[[float], None] = _ignore,
        on_version: Callable[[Optional[str]], None] = _ignore,
    ) -> None:
        self.store = store
        self.registry = registry
        self.follower = follower
        self.policy = policy
        self.limits = limits
        self.batch_size = batch_size
        self.shard, self.shards = shard, shards
        self.on_progress = on_progress
        self.on_version = on_version
        self.rebuilding: Optional[dict] = None  # {from_version, to_version, started_at} while a rebuild runs
        self.last_rebuild: Optional[dict] = None
        self.last_error: Optional[str] = None
        self._clips: dict[str, OnnxClip] = {}  # the store's version and, during a rebuild, the new one
        self._clips_lock = threading.Lock()
        self._sync_lock = threading.Lock()  # one rebuild at a time
        self._all_swapped_since: Optional[float] = None  # shards: since when every shard serves our version
        self._stop = threading.Event()
        self._watcher: Optional[threading.Thread] = None

    def adopt_current(self) -> None:
        """A store that never held a version takes CURRENT's at once (no docs to re-embed); a shard records it."""
        if self.store.version is None:
            self.store.rebuild(self.registry.current(), lambda docs: np.zeros((0, 1), np.float32))
        self.record_version()

    # -- models ----------------------------------------------------------------------------------------------
    def clip_for(self, version: str) -> OnnxClip:
        """The model of ``version`` (loaded once, kept while the store or CURRENT uses it)."""
        with self._clips_lock:
            clip = self._clips.get(version)
            if clip is None:
                clip = self.follower.open(version)
                self._clips[version] = clip
            return clip

    def forget_clips(self) -> None:
        """Free the models of versions that neither the store (live or previous) nor CURRENT uses."""
        keep = {self.store.version, self.store.previous_version, self.registry.current()}
        with self._clips_lock:
            for version in [v for v in self._clips if v not in keep]:
                del self._clips[version]

    def with_store_version(self, work: Callable[[str], Any]) -> Any:
        """Run ``work(version)`` with the store's version, again if a swap happened in between.

        Raises:
            ValueError: what ``work`` raised with a version that was still the store's.
        """
        for attempt in range(VERSION_RETRIES):
            version = self.store.version
            try:
                return work(version)
            except ValueError:
                if attempt + 1 < VERSION_RETRIES and self.store.version != version:
                    continue  # the store moved to a new version meanwhile: redo with it
                raise
        raise AssertionError("unreachable")

    def dim_of(self, version: str) -> int:
        """The dimension of ``version``'s vectors: the stored ones', else its model's."""
        stats = self.store.stats()
        if stats["count"] and stats["version"] == version:
            return int(stats["dim"])
        return self.clip_for(version).embed_dim

    def each_version(self, work: Callable[[str], Any]) -> tuple[list[tuple[str, Any]], Optional[str], Optional[str]]:
        """Shards: ``work(version)`` in the version the store serves and in the previous one it keeps, if any.

        A version where ``work`` raises ValueError (a vector query of the other version) is not answered.

        Returns:
            ``([(version, result)], serving, previous)``: the answered versions, the served one first, and the
            served and previous versions as read before the work (a swap may land while it runs).

        Raises:
            ValueError: no version answered (the first version's error).
        """
        self.maybe_drop_previous()
        serving, previous = self.store.version, self.store.previous_version
        answers: list[tuple[str, Any]] = []
        first_error: Optional[ValueError] = None
        for version in [v for v in dict.fromkeys((serving, previous)) if v is not None]:
            try:
                answers.append((version, work(version)))
            except ValueError as exc:
                first_error = first_error or exc
        if not answers:
            raise first_error or ValueError("the index holds no model version yet")
        return answers, serving, previous

    # -- rebuilds --------------------------------------------------------------------------------------------
    def sync(self) -> Optional[dict]:
        """Re-embed the stored docs with CURRENT's version if the store holds another one, and swap.

        Returns:
            ``{"model_version", "from_version", "count", "rebuild_seconds"}`` when it rebuilt, else None.

        Raises:
            Whatever embedding a stored doc raises (names the doc); the store then keeps its old version.
        """
        if self.registry.current() in (None, self.store.version):
            return None
        with self._sync_lock:
            target = self.registry.current()
            old = self.store.version
            if target in (None, old):
                return None
            embed = self._embedder(target)
            started = time.monotonic()
            self.rebuilding = {"from_version": old, "to_version": target, "started_at": time.time()}
            try:
                count = self.store.rebuild(target, embed, batch_size=self.batch_size)
            except Exception as exc:
                self.last_error = f"rebuild {old} → {target} failed: {exc}"
                raise
            finally:
                self.rebuilding = None
                self.on_progress(0.0)
                self.on_version(self.store.version)
                self.record_version()
            self.last_error = None
            self.last_rebuild = {
                "model_version": target,
                "from_version": old,
                "count": count,
                "rebuild_seconds": round(time.monotonic() - started, 3),
            }
            self.forget_clips()
            logger.info("index now holds %d docs of version %s (was %s)", count, target, old)
            return dict(self.last_rebuild)

    def _embedder(self, version: str) -> Callable[[list[StoredDoc]], np.ndarray]:
        """``embed`` for a rebuild to ``version``: stored docs to vectors, reporting progress."""
        clip = self.clip_for(version)
        total = max(len(self.store), 1)
        done = 0

        def embed(batch: list[StoredDoc]) -> np.ndarray:
            nonlocal done
            vectors = embed_items(clip, [stored_item(doc, self.policy, self.limits) for doc in batch])
            done += len(batch)
            self.on_progress(min(done / total, 1.0))
            return vectors  # [len(batch), D]

        return embed

    # -- following CURRENT -----------------------------------------------------------------------------------
    def watch(self, interval: float) -> None:
        """Follow CURRENT in a background thread every ``interval`` seconds (0: no thread)."""
        if interval > 0 and self._watcher is None:
            self._watcher = threading.Thread(
                target=self._watch, args=(interval,), name="cliptuner-index-watcher", daemon=True
            )
            self._watcher.start()

    def _watch(self, interval: float) -> None:
        failed_for: Optional[str] = None
        while True:
            current = self.registry.current()
            if current not in (None, self.store.version, failed_for):
                try:
                    self.sync()
                    failed_for = None
                except Exception:  # kept in last_error and /status; retried when CURRENT moves again
                    logger.exception("could not move the index to model version %s", current)
                    failed_for = current
            try:
                self.maybe_drop_previous()
            except Exception:
                logger.exception("shard %d: could not check the other shards' versions", self.shard)
            if self._stop.wait(interval):
                return

    def close(self) -> None:
        """Stop the background thread (waits for a rebuild it runs, up to 30 s)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)

    # -- shards ----------------------------------------------------------------------------------------------
    def record_version(self) -> None:
        """Shards: tell the others (a file beside the shards' stores) which version this shard serves."""
        if self.shards > 1:
            record_version(self.store.root.parent, self.shard, self.store.version)

    def maybe_drop_previous(self) -> None:
        """Shards: free the previous version once every shard has served this one for ``PREVIOUS_GRACE_S``."""
        store = self.store
        if self.shards == 1 or store.previous_version is None:
            return
        served = versions_served(store.root.parent, self.shards)
        if any(version != store.version for version in served):
            self._all_swapped_since = None
            return
        now = time.monotonic()
        if self._all_swapped_since is None:
            self._all_swapped_since = now
        elif now - self._all_swapped_since >= PREVIOUS_GRACE_S and store.drop_previous():
            self._all_swapped_since = None
            self.forget_clips()
            logger.info(
                "shard %d: every shard serves version %s; its previous version is freed", self.shard, store.version
            )

    def status(self) -> dict:
        """What the store holds and where the versions stand: ``model_version``, ``count``, ``dim``, ``backend``,
        ``registry_current``, ``rebuilding``, ``last_rebuild``, ``last_error``, ``index_dir`` (and for a shard
        ``shard``, ``shards``, ``previous_version``)."""
        stats = self.store.stats()
        state = {
            "model_version": stats["version"],
            "count": stats["count"],
            "dim": stats["dim"],
            "backend": stats["backend"],
            "registry_current": self.registry.current(),
            "rebuilding": self.rebuilding,
            "last_rebuild": self.last_rebuild,
            "last_error": self.last_error,
            "index_dir": str(self.store.root),
        }
        if self.shards > 1:
            state.update(shard=self.shard, shards=self.shards, previous_version=stats.get("previous_version"))
        return state


__all__ = ["PREVIOUS_GRACE_S", "Reindexer", "stored_item"]
