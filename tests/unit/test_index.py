import sqlite3
import threading
import time

import numpy as np
import pytest

from cliptuner.index import Collection, StoredDoc

from vector_support import brute as _brute, random_vectors, text_docs as _docs, unit as _unit

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
def test_exact_search_matches_brute_force(filled):
    col, docs, vecs = filled
    queries = _random(20, seed=1)
    got = col.search(queries, limit=10, version="v1")
    want = _brute(vecs, [d.id for d in docs], queries, 10)
    for g, w in zip(got, want):
        assert [i for i, _ in g] == [i for i, _ in w]
        np.testing.assert_allclose([s for _, s in g], [s for _, s in w], atol=1e-5)
    assert col.stats() == {"count": 300, "version": "v1", "dim": DIM, "backend": "exact"}


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


@pytest.mark.parametrize("backend", ["exact", "usearch"])
def test_replace_existing_id(tmp_path, backend):
    vecs = _random(50, seed=8)
    with Collection(tmp_path / "col", backend=backend) as col:
        col.upsert(_docs(50), vecs, "v1")
        target = _random(1, seed=9)
        col.upsert([StoredDoc(id="d7", text="replaced")], target, "v1")
        assert len(col) == 50
        assert col.get(["d7"])[0].text == "replaced"
        top = col.search(target, limit=1)[0][0]
        assert top[0] == "d7" and top[1] == pytest.approx(1.0, abs=1e-5)
        assert all(i != "d7" for i, _ in col.search(vecs[7], limit=50)[0][:1])


@pytest.mark.parametrize("backend", ["exact", "usearch"])
def test_delete_removes_from_results_and_count(tmp_path, backend):
    vecs = _random(50, seed=10)
    with Collection(tmp_path / "col", backend=backend) as col:
        col.upsert(_docs(50), vecs, "v1")
        assert col.delete(["d3", "d4", "nope", "d3"]) == 2
        assert len(col) == 48 and "d3" not in col and "d5" in col
        assert col.get(["d3", "d5"])[0] is None
        hits = col.search(vecs[3:5], limit=50)
        assert all(len(h) == 48 and {"d3", "d4"}.isdisjoint(i for i, _ in h) for h in hits)
        assert col.delete(["d3"]) == 0
        assert col.search(vecs[10], limit=1)[0][0][0] == "d10"


# -- persistence -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["exact", "usearch"])
def test_persistence_across_reopen(tmp_path, backend):
    vecs, queries = _random(120, seed=11), _random(5, seed=12)
    col = Collection(tmp_path / "col", backend=backend)
    col.upsert(_docs(120), vecs, "v1")
    col.delete(["d0"])
    before = col.search(queries, limit=5)
    col.close()
    if backend == "usearch":
        assert len(list((tmp_path / "col").glob("usearch-*.index"))) == 1
    with Collection(tmp_path / "col", backend=backend) as col:
        assert (len(col), col.version, col.dim) == (119, "v1", DIM)
        after = col.search(queries, limit=5)
    for b, a in zip(before, after):
        assert [i for i, _ in b] == [i for i, _ in a]
        np.testing.assert_allclose([s for _, s in b], [s for _, s in a], atol=1e-5)


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


def test_doc_content_round_trips(tmp_path):
    tensor = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    doc = StoredDoc(id="x", text="a cat", uri="file:///cat.png", blob=b"\x89PNG\x00\x01", tensor=tensor,
                    tags={"split": "train", "n": 3, "nested": {"a": [1, 2.5, None]}})
    with Collection(tmp_path / "col") as col:
        col.upsert([doc, StoredDoc(id="y")], _random(2, seed=14), "v1")
    with Collection(tmp_path / "col") as col:
        got, plain, missing = col.get(["x", "y", "z"])
        batches = list(col.iter_docs(batch_size=1))
    assert missing is None
    assert (got.id, got.text, got.uri, got.blob, got.tags) == (doc.id, doc.text, doc.uri, doc.blob, doc.tags)
    assert got.tensor.dtype == np.uint8 and np.array_equal(got.tensor, tensor)
    assert plain == StoredDoc(id="y")
    assert [[d.id for d in b] for b in batches] == [["x"], ["y"]]


# -- versions --------------------------------------------------------------------------------------------------
def test_version_mismatch_on_upsert_and_search(filled):
    col, _, vecs = filled
    with pytest.raises(ValueError, match=r"'v2'.*'v1'"):
        col.upsert([StoredDoc(id="new")], _random(1, seed=15), "v2")
    with pytest.raises(ValueError, match=r"'v2'.*'v1'"):
        col.search(vecs[:1], limit=3, version="v2")
    assert len(col) == 300 and "new" not in col
    assert col.delete([f"d{i}" for i in range(300)]) == 300
    col.upsert([StoredDoc(id="new")], _random(1, seed=16, dim=8), "v2")  # empty again: takes the new version
    assert (col.version, col.dim, len(col)) == ("v2", 8, 1)


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


def test_rebuild_of_empty_collection_sets_version(tmp_path):
    with Collection(tmp_path / "col") as col:
        assert col.rebuild("v3", lambda docs: pytest.fail("nothing to embed")) == 0
        assert col.version == "v3"
    with Collection(tmp_path / "col") as col:
        assert col.version == "v3"


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
    assert db.execute("SELECT slot, COUNT(*) FROM vectors GROUP BY slot ORDER BY slot").fetchall() == [(0, 100),
                                                                                                      (1, 40)]
    db.close()


def test_reopen_after_crash_mid_rebuild_sees_old_state(tmp_path):
    vecs = _random(30, seed=20)
    col = Collection(tmp_path / "col")
    col.upsert(_docs(30), vecs, "v1")
    col.close()
    db = sqlite3.connect(tmp_path / "col" / "docs.sqlite")  # what a rebuild killed before its swap leaves
    db.executemany("INSERT INTO vectors (slot, id, vec) VALUES (1, ?, ?)",
                   [(f"d{i}", _random(1, seed=21)[0].tobytes()) for i in range(10)])
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
        col.upsert([StoredDoc(id="d5", text="text 555"), StoredDoc(id="late", text="text 777")],
                   _random(2, seed=42), "v1")
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


def test_get_without_content_leaves_out_the_image_bytes(tmp_path):
    tensor = np.zeros((4, 4, 3), np.uint8)
    with Collection(tmp_path / "col") as col:
        col.upsert([StoredDoc(id="x", text="a cat", uri="cat.png", blob=b"\x89PNG", tensor=tensor, tags={"k": 1})],
                   _random(1, seed=47), "v1")
        light, missing = col.get(["x", "nope"], content=False)
        full = col.get(["x"])[0]
    assert missing is None
    assert light == StoredDoc(id="x", text="a cat", uri="cat.png", tags={"k": 1})
    assert full.blob == b"\x89PNG" and np.array_equal(full.tensor, tensor)


def test_delete_of_unknown_ids_can_be_refused_and_then_removes_nothing(filled):
    col, _, vecs = filled
    before = col.search(vecs[:3], limit=5)
    with pytest.raises(ValueError, match=r"doc\(s\) 'nope', 'gone' not stored; nothing was deleted"):
        col.delete(["d1", "nope", "d2", "gone", "nope"], missing_ok=False)
    assert len(col) == 300 and "d1" in col and col.search(vecs[:3], limit=5) == before
    assert col.delete(["d1", "d2", "d1"], missing_ok=False) == 2
    assert len(col) == 298 and "d1" not in col


def test_writes_during_rebuild_are_re_embedded(tmp_path):
    def new_model(docs):  # the new version embeds a doc from its text
        return np.stack([_random(1, seed=1000 + int(d.text.split()[-1]))[0] for d in docs])

    with Collection(tmp_path / "col", backend="usearch") as col:
        col.upsert(_docs(40), _random(40, seed=22), "v1")
        seen = []

        def embed(docs):
            if not seen:  # mid-rebuild: the old version still serves writes
                col.upsert([StoredDoc(id="late", text="text 77"), StoredDoc(id="d39", text="text 55")],
                           _random(2, seed=23), "v1")
                col.delete(["d0"])
            seen.append([d.id for d in docs])
            return new_model(docs)

        assert col.rebuild("v2", embed, batch_size=10) == 40
        assert "d0" not in col and "late" in col
        for doc_id, text_n in [("late", 77), ("d39", 55), ("d5", 5)]:
            top = col.search(_random(1, seed=1000 + text_n), limit=1, version="v2")[0][0]
            assert top == (doc_id, pytest.approx(1.0, abs=1e-4))


def test_concurrent_searches_during_rebuild_see_one_version(tmp_path):
    # old vectors map the query to doc A, then f199, f198, ...; new vectors to doc B, then f0, f1, ...
    q = np.zeros(DIM, np.float32)
    q[0] = 1.0
    rest = _unit(_random(200, seed=24)[:, 1:])
    cos = np.linspace(-0.9, 0.9, 200, dtype=np.float32)[:, None]  # filler i's similarity to q (old version)
    ids = ["A", "B"] + [f"f{i}" for i in range(200)]
    old = np.vstack([q, -q, np.hstack([cos, np.sqrt(1 - cos**2) * rest])])
    new = np.vstack([-q, q, np.hstack([-cos, np.sqrt(1 - cos**2) * rest])])
    expected = {}
    for name, mat in (("v1", old), ("v2", new)):
        expected[name] = [(i, round(s, 4)) for i, s in _brute(mat, ids, q[None], 5)[0]]
    col = Collection(tmp_path / "col", backend="exact")
    col.upsert([StoredDoc(id=i) for i in ids], old, "v1")
    row = {doc_id: r for r, doc_id in enumerate(ids)}

    def embed(docs):
        time.sleep(0.01)
        return new[[row[d.id] for d in docs]]

    results, errors = [], []
    stop = threading.Event()

    def searcher():
        while not stop.is_set():
            try:
                for version in ("v1", "v2", None):
                    try:
                        hits = col.search(q, limit=5, version=version)[0]
                    except ValueError:
                        assert version is not None  # a query of the other version: refused, never mixed
                        continue
                    results.append((version, [(i, round(s, 4)) for i, s in hits]))
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(err)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    col.rebuild("v2", embed, batch_size=16)
    time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    seen = {tuple(hits) for _, hits in results}
    assert seen <= {tuple(expected["v1"]), tuple(expected["v2"])}
    assert seen == {tuple(expected["v1"]), tuple(expected["v2"])}  # searches ran before and after the swap
    for version, hits in results:
        if version is not None:
            assert hits == expected[version]
    assert col.search(q, limit=1)[0][0][0] == "B"
    col.close()


# -- bad inputs ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("docs, vectors, match", [
    (lambda: [StoredDoc(id="n1")], lambda: _random(1, seed=30, dim=DIM + 1), r"'n1'.*33 dims"),
    (lambda: [StoredDoc(id="n1"), StoredDoc(id="n2")],
     lambda: np.vstack([_random(1, seed=31), np.full((1, DIM), np.nan)]), r"'n2'.*NaN"),
    (lambda: [StoredDoc(id="n1"), StoredDoc(id="n1")], lambda: _random(2, seed=32), r"'n1'.*more than once"),
    (lambda: [StoredDoc(id="n1"), StoredDoc(id="n2")], lambda: _random(3, seed=33), r"shape \(3, 32\).*\[2, D\]"),
    (lambda: [StoredDoc(id="")], lambda: _random(1, seed=34), "non-empty"),
    (lambda: [StoredDoc(id="n1"), StoredDoc(id="d5", text="changed")],
     lambda: np.vstack([_random(1, seed=35), np.zeros((1, DIM))]), r"'d5'.*zeros"),
    (lambda: [StoredDoc(id="n1", tags={"bad": object()})], lambda: _random(1, seed=36), r"'n1'.*JSON"),
])
def test_bad_upserts_raise_and_store_nothing(filled, docs, vectors, match):
    col, _, vecs = filled
    before = col.search(vecs[:3], limit=5)
    with pytest.raises(ValueError, match=match):
        col.upsert(docs(), vectors(), "v1")
    assert len(col) == 300 and "n1" not in col and col.get(["n1"]) == [None]
    assert col.get(["d5"])[0].text == "text 5"
    assert col.search(vecs[:3], limit=5) == before


@pytest.mark.parametrize("limit", [0, -1, 2.5])
def test_bad_limit_raises(filled, limit):
    col, _, vecs = filled
    with pytest.raises(ValueError, match="limit"):
        col.search(vecs[:1], limit=limit)


def test_bad_query_dim_and_unknown_backend(filled, tmp_path):
    col, _, _ = filled
    with pytest.raises(ValueError, match="3 dims"):
        col.search(np.ones((1, 3), np.float32), limit=1)
    with pytest.raises(ValueError, match=r"'hnsw'.*\['auto', 'usearch', 'exact'\]"):
        Collection(tmp_path / "other", backend="hnsw")
