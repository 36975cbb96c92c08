"""Sharding: doc ownership, the version a merged search uses, a collection's previous version, and two indexer
shards with their merger, in this process, through a swap that reaches one shard before the other."""

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from docarray import DocList
from support import run

from cliptuner.index.embedded import Collection, StoredDoc
from cliptuner.index.shards import check_shards, choose_version, merge_hits, shard_of
from cliptuner.model.registry import Registry
from cliptuner.serve import reindex as reindex_module
from executors import indexer as indexer_module
from executors.schemas import ClipDoc, MatchDoc
from executors.shards import TRAILER_ID, ShardMerger, trailer

IDS = [f"doc-{i}" for i in range(2000)] + ["ünïcode", "", "a" * 300]


# -- ownership ---------------------------------------------------------------------------------------------------
def test_shard_of_is_stable_across_processes_and_balanced():
    here = [shard_of(i, 4) for i in IDS]
    code = (
        "import json, sys; from cliptuner.index.shards import shard_of; "
        "print(json.dumps([shard_of(i, 4) for i in json.load(sys.stdin)]))"
    )
    for seed in ("0", "12345"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps(IDS),
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        assert json.loads(out) == here
    counts = Counter(here)
    assert set(counts) == {0, 1, 2, 3} and all(400 < n < 620 for n in counts.values()), counts
    assert {shard_of(i, 1) for i in IDS} == {0}


@pytest.mark.parametrize(
    "shard, shards, message",
    [
        (0, 0, "shards must be >= 1"),
        (2, 2, r"shard must be in \[0, 2\)"),
        (-1, 2, "shard must be in"),
        (0, 2.0, "shards must be a whole"),
        (True, 2, "shard must be a whole"),
    ],
)
def test_bad_shard_settings_are_named(shard, shards, message):
    with pytest.raises(ValueError, match=message):
        check_shards(shard, shards)


# -- the merged version ------------------------------------------------------------------------------------------
def test_choose_version_during_and_after_a_swap():
    assert choose_version([("v1", ["v1"]), ("v1", ["v1"])]) == "v1"
    # shard 0 swapped and keeps v1; shard 1 has not swapped: v1, the version both answered
    assert choose_version([("v2", ["v2", "v1"]), ("v1", ["v1"])]) == "v1"
    assert choose_version([("v2", ["v2", "v1"]), ("v2", ["v2", "v1"])]) == "v2"
    # a vector query of v1 after both swapped: only the kept v1 answers, and no shard serves it
    with pytest.raises(ValueError, match="no model version in common"):
        choose_version([("v2", ["v1"]), ("v2", ["v1"])])
    # shard 1 restarted on v2 and lost v1 while shard 0 is still on v1
    with pytest.raises(ValueError, match=r"shard 1 serves 'v2' and answered \['v2'\]"):
        choose_version([("v1", ["v1"]), ("v2", ["v2"])])
    with pytest.raises(ValueError, match="no shard answered"):
        choose_version([])


def test_merge_hits_keeps_the_best_over_shards_ties_by_id():
    rows = [[("a", 0.9), ("c", 0.5)], [("b", 0.95), ("d", 0.5), ("e", 0.1)], []]
    assert merge_hits(rows, 4) == [("b", 0.95), ("a", 0.9), ("c", 0.5), ("d", 0.5)]
    assert merge_hits(rows, 10)[-1] == ("e", 0.1)


# -- the previous version of a collection -----------------------------------------------------------------------
def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_a_collection_keeps_its_previous_version_searchable_until_dropped(tmp_path):
    rng = np.random.default_rng(0)
    old, new = _unit(rng.normal(size=(20, 8))), _unit(rng.normal(size=(20, 8)))
    docs = [StoredDoc(id=f"d{i}", text=f"t{i}") for i in range(20)]
    with (
        Collection(tmp_path / "kept", backend="exact", keep_previous=True) as col,
        Collection(tmp_path / "plain", backend="exact") as plain,
    ):
        for c in (col, plain):
            c.upsert(docs, old, "v1")
            c.rebuild("v2", lambda batch: new[[int(d.id[1:]) for d in batch]])
        assert col.version == "v2" and col.previous_version == "v1" and plain.previous_version is None
        assert col.stats()["previous_version"] == "v1" and "previous_version" not in plain.stats()
        query = old[3:4]
        assert col.search(query, 1, version="v1")[0][0][0] == "d3"  # v1's vectors, as they were
        np.testing.assert_allclose(col.search(query, 1, version="v1")[0][0][1], 1.0, atol=1e-5)
        assert col.search(new[5:6], 1, version="v2")[0][0][0] == "d5"
        with pytest.raises(ValueError, match="version"):
            plain.search(query, 1, version="v1")
        col.delete(["d3"])  # the kept version is a view of the swap: the indexer drops matches it cannot fetch
        assert col.search(query, 1, version="v1")[0][0][0] == "d3" and col.get(["d3"]) == [None]
        assert col.drop_previous() and col.previous_version is None and not col.drop_previous()
        with pytest.raises(ValueError, match="version"):
            col.search(query, 1, version="v1")


# -- the merger on its own -----------------------------------------------------------------------------------------
def _answer(shard, docs, version="v1", previous=None, **tags):
    return DocList[ClipDoc]([*docs, trailer(shard, 2, version, previous, **tags)])


def test_merger_puts_owned_docs_back_in_request_order():
    merged = run(
        ShardMerger().by_owner(
            docs=DocList[ClipDoc](),
            docs_matrix=[
                _answer(1, [ClipDoc(id="b"), ClipDoc(id="d")], positions=[1, 3]),
                _answer(0, [ClipDoc(id="a"), ClipDoc(id="c")], positions=[0, 2]),
            ],
        )
    )
    assert [d.id for d in merged] == ["a", "b", "c", "d"]


def test_merger_fails_a_request_a_shard_failed_or_missed():
    merger = ShardMerger()
    with pytest.raises(ValueError, match=r"index shard\(s\) \[1\] of 2 did not answer"):
        run(
            merger.by_owner(
                docs=DocList[ClipDoc](), docs_matrix=[_answer(0, [], positions=[]), DocList[ClipDoc]([ClipDoc(id="x")])]
            )
        )
    with pytest.raises(
        ValueError,
        match=r"^shard 1: doc\(s\) 'x' not stored; nothing was deleted \(on that shard\); "
        "the other shards removed their part: 'y'$",
    ):
        run(
            merger.by_owner(
                docs=DocList[ClipDoc](),
                docs_matrix=[
                    _answer(0, [ClipDoc(id="y", tags={"deleted": True})], positions=[1]),
                    DocList[ClipDoc]([trailer(1, 2, "v1", error="doc(s) 'x' not stored; nothing was deleted")]),
                ],
            )
        )
    with pytest.raises(ValueError, match=r"^shards 0, 1: parameter 'limit' must be >= 1$"):
        run(
            merger.search(
                docs=DocList[ClipDoc](),
                docs_matrix=[
                    DocList[ClipDoc]([trailer(i, 2, "v1", error="parameter 'limit' must be >= 1")]) for i in (1, 0)
                ],
            )
        )


def test_merger_search_uses_the_version_every_shard_answered():
    def query(version, *matches):
        return ClipDoc(
            id="q",
            model_version=version,
            embedding=np.full(4, 0.5 if version == "v1" else -0.5, np.float32),
            matches=DocList[MatchDoc]([MatchDoc(id=i, score=s, model_version=v) for i, s, v in matches]),
        )

    swapped = _answer(
        0,
        [query("v2", ("a", 0.99, "v2"), ("b", 0.7, "v1"), ("c", 0.2, "v1"))],
        version="v2",
        previous="v1",
        answered=["v2", "v1"],
        limit=2,
    )
    waiting = _answer(1, [query("v1", ("d", 0.8, "v1"), ("e", 0.1, "v1"))], answered=["v1"], limit=2)
    merged = run(ShardMerger().search(docs=DocList[ClipDoc](), docs_matrix=[swapped, waiting]))
    assert len(merged) == 1 and merged[0].model_version == "v1" and float(merged[0].embedding[0]) == 0.5
    assert [m.id for m in merged[0].matches] == ["d", "b"] and merged[0].scores == pytest.approx([0.8, 0.7])

    done = _answer(1, [query("v2", ("d", 0.3, "v2"))], version="v2", previous="v1", answered=["v2", "v1"], limit=2)
    merged = run(ShardMerger().search(docs=DocList[ClipDoc](), docs_matrix=[swapped, done]))
    assert merged[0].model_version == "v2" and [m.id for m in merged[0].matches] == ["a", "d"]


# -- two indexer shards and the merger, in this process -------------------------------------------------------
def _shard(workspace, shard):
    return indexer_module.CLIPIndexer(
        workspace=str(workspace),
        bootstrap=False,
        bootstrap_timeout=1,
        watch_interval=0,
        runtime_args={"shard_id": shard, "shards": 2},
    )


def test_two_shards_swap_one_after_the_other_and_never_mix_versions(workspace, tiny_model_dir_v2, monkeypatch):
    shards = [_shard(workspace, 0), _shard(workspace, 1)]
    merger = ShardMerger()
    try:
        texts = [f"a {c} {s}" for c in ("red", "blue", "green", "white") for s in ("circle", "square", "star")]
        docs = lambda: DocList[ClipDoc]([ClipDoc(id=f"d{i}", text=t) for i, t in enumerate(texts)])  # noqa: E731
        answers = [run(s.index(docs=docs())) for s in shards]
        for s, answer in zip(shards, answers):
            owned = [d.id for d in answer if d.id != TRAILER_ID]
            assert owned == [f"d{i}" for i in range(len(texts)) if shard_of(f"d{i}", 2) == s.shard]
            assert len(s.collection) == len(owned) > 0
        assert [d.id for d in run(merger.by_owner(docs=docs(), docs_matrix=answers))] == [d.id for d in docs()]

        def merged_search():
            queries = lambda: DocList[ClipDoc]([ClipDoc(id="q", text="a blue star")])  # noqa: E731
            return run(
                merger.search(
                    docs=queries(), docs_matrix=[run(s.search(docs=queries(), parameters={"limit": 3})) for s in shards]
                )
            )[0]

        before = merged_search()
        assert before.model_version == "v1" and {m.model_version for m in before.matches} == {"v1"}

        registry = Registry(workspace / "models")
        registry.set_current(registry.publish(tiny_model_dir_v2, make_current=False))
        shards[1].sync()  # shard 1 swaps; shard 0 has not yet
        assert shards[1].collection.previous_version == "v1" and shards[0].collection.version == "v1"
        during = merged_search()
        assert during.model_version == "v1" and [m.id for m in during.matches] == [m.id for m in before.matches]
        assert during.scores == pytest.approx(before.scores, abs=1e-5)

        # shard 0 swaps while a search runs on it, after the search read its version: the search still answers
        # in v1 (kept), and its trailer says so, not the v2 the shard holds by the time it answers
        search_v1 = shards[0].collection.search

        def swap_first(*args, **kwargs):
            shards[0].collection.search = search_v1
            shards[0].sync()
            return search_v1(*args, **kwargs)

        shards[0].collection.search = swap_first
        raced = merged_search()
        assert shards[0].collection.search is search_v1 and shards[0].collection.version == "v2"
        assert raced.model_version == "v1" and [m.id for m in raced.matches] == [m.id for m in before.matches]

        after = merged_search()
        assert after.model_version == "v2" and {m.model_version for m in after.matches} == {"v2"}
        assert not np.allclose(after.embedding, before.embedding, atol=1e-3)

        # every shard serves v2 now: after the grace period each frees v1
        monkeypatch.setattr(reindex_module, "PREVIOUS_GRACE_S", 0.0)
        for s in shards:
            s.reindexer.maybe_drop_previous()  # starts the grace period
            s.reindexer.maybe_drop_previous()
            assert s.collection.previous_version is None
        assert merged_search().model_version == "v2"
    finally:
        for s in shards:
            s.close()


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_serve_refuses_a_bad_shard_count_before_starting_anything(tmp_path, capsys, monkeypatch, value):
    from cliptuner.cli import main
    from cliptuner.cli.serve import SERVE_ENV

    for name in SERVE_ENV.values():  # serve sets them in this process; restored after the test
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLIPTUNER_INDEX_SHARDS", value)
    assert main(["serve", "--workspace", str(tmp_path)]) == 2
    assert (
        f"--index-shards / CLIPTUNER_INDEX_SHARDS must be a whole number in [1, 64], got '{value}'"
        in capsys.readouterr().err
    )
