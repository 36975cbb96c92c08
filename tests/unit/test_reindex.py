"""The Reindexer without a Flow or an Executor: a store moved to CURRENT's version, failures kept for /status,
the background watcher, and a shard's two versions."""

import time

import numpy as np
import pytest

import cliptuner.serve.reindex as reindex_module
from cliptuner.index.embedded import Collection, StoredDoc
from cliptuner.index.shards import record_version
from cliptuner.model.follow import ModelFollower
from cliptuner.model.registry import Registry
from cliptuner.serve.access import UriPolicy
from cliptuner.serve.content import embed_items
from cliptuner.serve.limits import RequestLimits
from cliptuner.serve.reindex import Reindexer, stored_item

TEXTS = ["a red square", "a blue circle", "a green triangle", "a yellow star", "a black line"]


@pytest.fixture
def registry(tmp_path, tiny_model_dir):
    registry = Registry(tmp_path / "models")
    registry.publish(tiny_model_dir)  # v1
    return registry


def _reindexer(store, registry, **kwargs):
    follower = ModelFollower(registry, device="cpu", intra_op_threads=1)
    return Reindexer(store, registry, follower, UriPolicy(), RequestLimits(), **kwargs)


def _fill(reindexer):
    """Store the text docs with vectors of the store's version; returns their vectors."""
    docs = [StoredDoc(id=f"t{i}", text=text) for i, text in enumerate(TEXTS)]
    version = reindexer.store.version
    items = [stored_item(doc, reindexer.policy, reindexer.limits) for doc in docs]
    vectors = embed_items(reindexer.clip_for(version), items)  # [len(TEXTS), D]
    reindexer.store.upsert(docs, vectors, version)
    return vectors


def test_sync_moves_the_store_to_current_and_reports_progress(tmp_path, registry, tiny_model_dir_v2):
    progress, versions = [], []
    with Collection(tmp_path / "index") as store:
        reindexer = _reindexer(store, registry, batch_size=2, on_progress=progress.append, on_version=versions.append)
        reindexer.adopt_current()
        assert store.version == "v1" and reindexer.sync() is None  # already on CURRENT
        before = _fill(reindexer)
        registry.publish(tiny_model_dir_v2, version="v2")

        rebuilt = reindexer.sync()

        assert rebuilt["model_version"] == "v2" and rebuilt["from_version"] == "v1" and rebuilt["count"] == 5
        assert store.version == "v2" and len(store) == 5
        assert progress == pytest.approx([0.4, 0.8, 1.0, 0.0]) and versions == ["v2"]
        after = embed_items(
            reindexer.clip_for("v2"), [stored_item(d, reindexer.policy, reindexer.limits) for d in store.get(["t0"])]
        )
        hits = store.search(after, 1, version="v2")
        assert hits[0][0][0] == "t0" and hits[0][0][1] == pytest.approx(1.0, abs=1e-4)
        assert not np.allclose(after[0], before[0], atol=1e-3)
        status = reindexer.status()
        assert status["model_version"] == "v2" and status["registry_current"] == "v2"
        assert status["last_rebuild"] == rebuilt and status["rebuilding"] is None and status["last_error"] is None
        assert "shard" not in status


def test_a_failed_rebuild_is_kept_for_status_and_the_store_keeps_its_version(
    tmp_path, registry, tiny_model_dir_v2, monkeypatch
):
    with Collection(tmp_path / "index") as store:
        reindexer = _reindexer(store, registry)
        reindexer.adopt_current()
        _fill(reindexer)
        registry.publish(tiny_model_dir_v2, version="v2")

        def failing(clip, items):
            raise RuntimeError("the model crashed")

        monkeypatch.setattr(reindex_module, "embed_items", failing)
        with pytest.raises(RuntimeError, match="the model crashed"):
            reindexer.sync()
        status = reindexer.status()
        assert store.version == "v1" and status["model_version"] == "v1" and status["rebuilding"] is None
        assert status["last_error"] == "rebuild v1 → v2 failed: the model crashed" and status["last_rebuild"] is None


def test_the_watcher_follows_current_and_stops_on_close(tmp_path, registry, tiny_model_dir_v2):
    with Collection(tmp_path / "index") as store:
        reindexer = _reindexer(store, registry)
        reindexer.adopt_current()
        _fill(reindexer)
        reindexer.watch(0.05)
        try:
            registry.publish(tiny_model_dir_v2, version="v2")
            deadline = time.monotonic() + 30
            while store.version != "v2" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert store.version == "v2" and len(store) == 5
        finally:
            reindexer.close()
        assert not reindexer._watcher.is_alive()


def test_with_store_version_redoes_work_once_the_store_moved(tmp_path, registry, tiny_model_dir_v2):
    with Collection(tmp_path / "index") as store:
        reindexer = _reindexer(store, registry)
        reindexer.adopt_current()
        _fill(reindexer)
        registry.publish(tiny_model_dir_v2, version="v2")
        seen = []

        def work(version):
            seen.append(version)
            if len(seen) == 1:
                reindexer.sync()  # a swap lands between reading the version and using it
                raise ValueError(f"queries are from model version {version!r}")
            return version

        assert reindexer.with_store_version(work) == "v2" and seen == ["v1", "v2"]
        with pytest.raises(ValueError, match="always"):  # the store did not move: the error is the caller's
            reindexer.with_store_version(lambda version: (_ for _ in ()).throw(ValueError("always")))


def test_a_shard_answers_in_both_versions_until_every_shard_has_swapped(
    tmp_path, registry, tiny_model_dir_v2, monkeypatch
):
    with Collection(tmp_path / "index" / "0", keep_previous=True) as store:
        reindexer = _reindexer(store, registry, shard=0, shards=2)
        reindexer.adopt_current()
        record_version(tmp_path / "index", 1, "v1")
        _fill(reindexer)
        registry.publish(tiny_model_dir_v2, version="v2")
        reindexer.sync()
        assert store.previous_version == "v1" and reindexer.status()["previous_version"] == "v1"

        answers, serving, previous = reindexer.each_version(lambda version: version.upper())
        assert answers == [("v2", "V2"), ("v1", "V1")] and (serving, previous) == ("v2", "v1")

        def only_v1(version):
            if version != "v1":
                raise ValueError(f"a vector of v1 cannot search {version}")
            return "found"

        assert reindexer.each_version(only_v1)[0] == [("v1", "found")]
        with pytest.raises(ValueError, match="cannot search"):
            reindexer.each_version(lambda version: only_v1("v3"))

        monkeypatch.setattr(reindex_module, "PREVIOUS_GRACE_S", 0.0)
        reindexer.maybe_drop_previous()
        reindexer.maybe_drop_previous()
        assert store.previous_version == "v1"  # shard 1 still serves v1
        record_version(tmp_path / "index", 1, "v2")
        reindexer.maybe_drop_previous()  # starts the grace period
        reindexer.maybe_drop_previous()
        assert store.previous_version is None
        assert reindexer.each_version(lambda version: version)[0] == [("v2", "v2")]
