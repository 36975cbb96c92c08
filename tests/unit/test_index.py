"""What only the embedded store does: its HNSW graph and dtypes, its SQLite file across crashes and resumed
rebuilds. The behaviour it shares with the Milvus store is tested on both in test_vector_stores.py."""

import sqlite3

import numpy as np
import pytest
from vector_support import brute as _brute
from vector_support import random_vectors
from vector_support import text_docs as _docs
from vector_support import unit as _unit

from cliptuner.index.embedded import Collection, StoredDoc

DIM = 32


def _random(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    return random_vectors(n, seed, dim)


@pytest.fixture
def filled(tmp_path):
    vecs = _random(300, seed=0)
    docs = _docs(300)
    col = Collection(tmp_path / "col", backend="exact")
    col.upsert(docs, vecs, "v1")
    yield col, docs, vecs
    col.close()


# -- search ----------------------------------------------------------------------------------------------------
def test_usearch_backend_recall_and_scores(tmp_path):
    vecs, ids = _random(400, seed=2), [f"d{i}" for i in range(400)]
    queries = _random(50, seed=3)
    with Collection(tmp_path / "col", backend="usearch") as col:
        col.upsert([StoredDoc(id=i) for i in ids], vecs, "v1")
        assert col.stats()["backend"] == "usearch"
        got = col.search(queries, limit=10)
    want = _brute(vecs, ids, queries, 10)
    recall = np.mean([len({i for i, _ in g} & {i for i, _ in w}) / 10 for g, w in zip(got, want)])
    assert recall >= 0.95
    cos = dict(zip(ids, _unit(vecs)))
    for q, g in zip(_unit(queries), got):
        assert len(g) == 10
        scores = [s for _, s in g]
        assert scores == sorted(scores, reverse=True)
        np.testing.assert_allclose(scores, [float(cos[i] @ q) for i, _ in g], atol=1e-4)


@pytest.mark.parametrize("backend", ["exact", "usearch"])
@pytest.mark.parametrize("dtype, atol", [("f16", 2e-3), ("i8", 2e-2)])
def test_f16_and_i8_vectors_find_the_same_neighbours_in_less_memory(tmp_path, backend, dtype, atol):
    vecs, ids = _random(300, seed=2, dim=256), [f"d{i}" for i in range(300)]
    queries = _unit(vecs[:40] + 0.3 * _random(40, seed=3, dim=256))  # each near one stored vector
    want = _brute(vecs, ids, queries, 5)
    sizes = {}
    for kind in ("f32", dtype):
        with Collection(tmp_path / kind, backend=backend, dtype=kind) as col:
            col.upsert([StoredDoc(id=i, tags={"k": 1}) for i in ids], vecs, "v1")
            got = col.search(queries, limit=5)
            sizes[kind] = col.memory_bytes()
            # held once: the graph holds the vectors when there is one, else the matrix does
            assert (col._buf is None) == (backend == "usearch") and (col._hnsw is None) == (backend == "exact")
            filtered = col.search(queries[:3], limit=2, where={"k": 1})  # exact, from the graph's vectors too
        assert [g[0][0] for g in got] == [w[0][0] for w in want]
        for g, w in zip(got, want):
            np.testing.assert_allclose([s for _, s in g[:1]], [s for _, s in w[:1]], atol=atol)
        assert [f[0][0] for f in filtered] == [w[0][0] for w in want[:3]]
    assert sizes[dtype] < sizes["f32"] * (0.6 if dtype == "f16" else 0.9)
    # SQLite keeps float32: the same collection opened as f32 scores at full precision again
    with Collection(tmp_path / dtype, backend=backend) as col:
        np.testing.assert_allclose(col.search(vecs[:1], limit=1)[0][0][1], 1.0, atol=1e-5)
    with pytest.raises(ValueError, match=r"unknown vector dtype 'f64'; allowed: \['f32', 'f16', 'i8'\]"):
        Collection(tmp_path / "bad", dtype="f64")


def test_auto_backend_switches_to_hnsw_at_threshold(tmp_path):
    vecs = _random(60, seed=4)
    with Collection(tmp_path / "col", backend="auto", exact_threshold=50) as col:
        col.upsert(_docs(40), vecs[:40], "v1")
        assert col.stats()["backend"] == "exact"
        col.upsert(_docs(60)[40:], vecs[40:], "v1")
        assert col.stats()["backend"] == "usearch"
        top = col.search(vecs[55], limit=1)[0]
        assert top[0][0] == "d55" and top[0][1] == pytest.approx(1.0, abs=1e-5)
        col.delete([f"d{i}" for i in range(40)])  # 20 left: below half the threshold
        assert col.stats()["backend"] == "exact"
        assert col.search(vecs[55], limit=1)[0][0][0] == "d55"


def test_limit_larger_than_collection_and_empty_collection(tmp_path):
    with Collection(tmp_path / "col") as col:
        assert col.search(_random(2, seed=5), limit=3) == [[], []]
        assert col.version is None and col.dim is None and len(col) == 0
        col.upsert(_docs(3), _random(3, seed=6), "v1")
        assert [len(r) for r in col.search(_random(2, seed=7), limit=10)] == [3, 3]


# -- persistence -----------------------------------------------------------------------------------------------
def test_usearch_index_rebuilt_when_saved_file_is_stale(tmp_path):
    vecs = _random(80, seed=13)
    col = Collection(tmp_path / "col", backend="usearch")
    col.upsert(_docs(60), vecs[:60], "v1")
    col.close()
    stale = next((tmp_path / "col").glob("usearch-*.index")).read_bytes()
    col = Collection(tmp_path / "col", backend="usearch")
    col.upsert(_docs(80)[60:], vecs[60:], "v1")
    col._table.close()  # the process dies without close(): nothing saves the index of the last upsert
    col._lock_file.close()
    col._closed = True
    (tmp_path / "col" / "usearch-0-2-f32.index").write_bytes(stale)  # even a file under the expected name is checked
    with Collection(tmp_path / "col", backend="usearch") as col:
        assert len(col) == 80
        assert col.search(vecs[70], limit=1)[0][0][0] == "d70"


def test_second_open_of_same_root_is_refused(tmp_path):
    with Collection(tmp_path / "col"):
        with pytest.raises(RuntimeError, match="already open"):
            Collection(tmp_path / "col")


# -- versions --------------------------------------------------------------------------------------------------
def _embed_reversed(docs: list[StoredDoc]) -> np.ndarray:
    """A 'new model': vector of doc d<i> is the old vector of d<299-i>, in 16 dims."""
    return np.stack([_random(300, seed=0)[299 - int(d.id[1:]), :16] for d in docs])


def test_rebuild_swaps_version_and_vectors(filled, tmp_path):
    col, docs, vecs = filled
    assert col.rebuild("v2", _embed_reversed, batch_size=64) == 300
    assert (col.version, col.dim, len(col)) == ("v2", 16, 300)
    q = vecs[5, :16]
    assert col.search(q, limit=1, version="v2")[0][0][0] == "d294"
    with pytest.raises(ValueError, match="'v1'"):
        col.search(vecs[5], limit=1, version="v1")
    with pytest.raises(ValueError, match="'v1'"):
        col.upsert([StoredDoc(id="late")], vecs[:1], "v1")
    col.close()
    with Collection(tmp_path / "col", backend="exact") as col:
        assert (col.version, col.dim, len(col)) == ("v2", 16, 300)
        assert col.search(q, limit=1)[0][0][0] == "d294"
    db = sqlite3.connect(tmp_path / "col" / "docs.sqlite")
    assert db.execute("SELECT COUNT(*), COUNT(DISTINCT slot) FROM vectors").fetchone() == (300, 1)
    db.close()


@pytest.mark.parametrize("backend", ["exact", "usearch"])
def test_failing_embed_leaves_state_unchanged(tmp_path, backend):
    vecs, queries = _random(100, seed=17), _random(4, seed=18)
    col = Collection(tmp_path / "col", backend=backend)
    col.upsert(_docs(100), vecs, "v1")
    before = col.search(queries, limit=5)
    calls = []

    def embed(docs):
        calls.append(len(docs))
        if len(calls) == 3:  # two batches already written to the new slot
            raise RuntimeError("model crashed")
        return _random(len(docs), seed=19)

    with pytest.raises(RuntimeError, match="model crashed"):
        col.rebuild("v2", embed, batch_size=20)
    # NaN vectors from the new model: rejected (the first doc not done yet is named), nothing changes
    with pytest.raises(ValueError, match="'d40'.*NaN"):
        col.rebuild("v2", lambda docs: np.full((len(docs), DIM), np.nan, np.float32), batch_size=20)
    assert (col.version, len(col)) == ("v1", 100)
    assert col.search(queries, limit=5) == before
    with pytest.raises(ValueError, match="'v2'.*'v1'"):  # the new vectors are not searchable
        col.search(queries, limit=5, version="v2")
    col.close()
    with Collection(tmp_path / "col", backend=backend) as col:
        assert (col.version, len(col)) == ("v1", 100)
        assert [[i for i, _ in r] for r in col.search(queries, limit=5)] == [[i for i, _ in r] for r in before]
    db = sqlite3.connect(tmp_path / "col" / "docs.sqlite")
    # the old version's 100 vectors, and the 40 new ones of the unfinished rebuild, kept for it to resume
    assert db.execute("SELECT slot, COUNT(*) FROM vectors GROUP BY slot ORDER BY slot").fetchall() == [
        (0, 100),
        (1, 40),
    ]
    db.close()


def test_reopen_after_crash_mid_rebuild_sees_old_state(tmp_path):
    vecs = _random(30, seed=20)
    col = Collection(tmp_path / "col")
    col.upsert(_docs(30), vecs, "v1")
    col.close()
    db = sqlite3.connect(tmp_path / "col" / "docs.sqlite")  # what a rebuild killed before its swap leaves
    db.executemany(
        "INSERT INTO vectors (slot, id, vec) VALUES (1, ?, ?)",
        [(f"d{i}", _random(1, seed=21)[0].tobytes()) for i in range(10)],
    )
    db.commit()
    db.close()
    with Collection(tmp_path / "col") as col:
        assert (col.version, len(col)) == ("v1", 30)
        assert col.search(vecs[3], limit=1)[0][0] == ("d3", pytest.approx(1.0, abs=1e-5))
    db = sqlite3.connect(tmp_path / "col" / "docs.sqlite")
    assert db.execute("SELECT COUNT(*) FROM vectors WHERE slot = 1").fetchone() == (0,)
    db.close()


def _new_model(docs: list[StoredDoc]) -> np.ndarray:
    """A 'new model version': a doc's vector is a function of its text alone."""
    return np.stack([_random(1, seed=5000 + int(d.text.split()[-1]))[0] for d in docs])


def _die(col: Collection) -> None:
    """What ``kill -9`` leaves: the database and the lock are released, nothing is saved or cleaned up."""
    col._table.close()
    col._lock_file.close()
    col._closed = True


def _assert_embedded_by_new_model(col: Collection, texts: dict[str, int]) -> None:
    """Every doc's stored vector is ``_new_model`` of its current text (a search with it finds it at cosine 1)."""
    assert len(col) == len(texts)
    ids = sorted(texts)
    expected = _new_model([StoredDoc(id=i, text=f"text {texts[i]}") for i in ids])
    for doc_id, top in zip(ids, col.search(expected, limit=1, version="v2")):
        assert top[0] == (doc_id, pytest.approx(1.0, abs=1e-5))


@pytest.mark.parametrize("backend", ["exact", "usearch"])
def test_rebuild_resumes_after_a_crash_and_embeds_only_the_rest(tmp_path, backend):
    vecs, queries = _random(100, seed=40), _random(4, seed=41)
    col = Collection(tmp_path / "col", backend=backend)
    col.upsert(_docs(100), vecs, "v1")
    before = col.search(queries, limit=5, version="v1")
    calls = []

    def crashing(docs):
        calls.append(len(docs))
        if len(calls) == 4:  # three batches of ten committed to the new slot
            raise RuntimeError("killed")
        return _new_model(docs)

    with pytest.raises(RuntimeError, match="killed"):
        col.rebuild("v2", crashing, batch_size=10)
    _die(col)

    col = Collection(tmp_path / "col", backend=backend)
    try:
        assert (col.version, len(col)) == ("v1", 100)  # the old version serves, nothing half-written shows
        assert col.search(queries, limit=5, version="v1") == before
        # the old version keeps taking writes before the rebuild resumes
        col.upsert(
            [StoredDoc(id="d5", text="text 555"), StoredDoc(id="late", text="text 777")], _random(2, seed=42), "v1"
        )
        col.delete(["d6", "d50"])
        embedded = []

        def counting(docs):
            embedded.extend(d.id for d in docs)
            return _new_model(docs)

        assert col.rebuild("v2", counting, batch_size=10) == 99  # 100 + late - d6 - d50
        # d0..d29 were done (minus d5, rewritten since, and d6, deleted); d50 is gone
        assert sorted(embedded) == sorted(["d5", "late"] + [f"d{i}" for i in range(30, 100) if i != 50])
        assert (col.version, col.dim) == ("v2", DIM)
        texts = {f"d{i}": i for i in range(100) if i not in (6, 50)} | {"d5": 555, "late": 777}
        _assert_embedded_by_new_model(col, texts)
    finally:
        col.close()
    with Collection(tmp_path / "col", backend=backend) as col:
        _assert_embedded_by_new_model(col, texts)
    db = sqlite3.connect(tmp_path / "col" / "docs.sqlite")
    assert db.execute("SELECT COUNT(*), COUNT(DISTINCT slot) FROM vectors").fetchone() == (99, 1)
    assert db.execute("SELECT COUNT(*) FROM meta WHERE key = 'rebuild'").fetchone() == (0,)
    db.close()


def test_a_doc_changed_while_its_batch_was_embedded_is_embedded_again_after_a_crash(tmp_path):
    col = Collection(tmp_path / "col", backend="exact")
    col.upsert(_docs(40), _random(40, seed=43), "v1")
    calls = []

    def crashing(docs):
        calls.append([d.id for d in docs])
        if len(calls) == 2:  # d10..d19 are being embedded from their old text when d12 is rewritten
            col.upsert([StoredDoc(id="d12", text="text 1212")], _random(1, seed=44), "v1")
        if len(calls) == 3:
            raise RuntimeError("killed")
        return _new_model(docs)

    with pytest.raises(RuntimeError, match="killed"):
        col.rebuild("v2", crashing, batch_size=10)
    _die(col)
    with Collection(tmp_path / "col", backend="exact") as col:
        embedded = []
        col.rebuild("v2", lambda docs: embedded.extend(d.id for d in docs) or _new_model(docs), batch_size=10)
        assert sorted(embedded) == sorted(["d12"] + [f"d{i}" for i in range(20, 40)])
        _assert_embedded_by_new_model(col, {f"d{i}": i for i in range(40)} | {"d12": 1212})


def test_a_rebuild_for_another_version_discards_the_unfinished_one(tmp_path):
    col = Collection(tmp_path / "col", backend="exact")
    col.upsert(_docs(30), _random(30, seed=45), "v1")

    def crashing(docs):
        if docs[0].id == "d10":
            raise RuntimeError("killed")
        return _random(len(docs), seed=46)  # vectors the other version must not inherit

    with pytest.raises(RuntimeError, match="killed"):
        col.rebuild("v1b", crashing, batch_size=10)
    _die(col)
    with Collection(tmp_path / "col", backend="exact") as col:
        embedded = []
        col.rebuild("v2", lambda docs: embedded.extend(d.id for d in docs) or _new_model(docs), batch_size=10)
        assert sorted(embedded) == sorted(f"d{i}" for i in range(30))
        _assert_embedded_by_new_model(col, {f"d{i}": i for i in range(30)})


# -- bad inputs ------------------------------------------------------------------------------------------------
def test_bad_query_dim_and_unknown_backend(filled, tmp_path):
    col, _, _ = filled
    with pytest.raises(ValueError, match="3 dims"):
        col.search(np.ones((1, 3), np.float32), limit=1)
    with pytest.raises(ValueError, match=r"'hnsw'.*\['auto', 'usearch', 'exact'\]"):
        Collection(tmp_path / "other", backend="hnsw")
