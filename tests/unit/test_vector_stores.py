"""One behaviour suite for the indexer's vector stores, run against each backend, plus Milvus-specific tests.

``make_store(root)`` opens the backend under test at ``root``: ``"embedded"`` is
:class:`cliptuner.index.embedded.Collection` (exact search), ``"embedded-hnsw"`` the same with a usearch HNSW graph from
the first doc (the graph then holds the vectors: no matrix beside it), ``"milvus"`` is :class:`cliptuner.index.milvus.MilvusCollection`
on Milvus Lite (a local file, no server), ``"milvus-server"`` the same store on a Milvus server reached over TCP
(``uri="http://127.0.0.1:PORT"``: milvus-lite's gRPC server in a child process, one per module; each test's stores
take their own collection name on it). Vectors are small (8-16 dims) and docs few, so that the file runs fast.
"""

import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import numpy as np
import pytest
from milvus_server import MilvusServer
from vector_support import brute as _brute
from vector_support import random_vectors
from vector_support import text_docs as _docs
from vector_support import unit as _unit

from cliptuner.index.base import VectorStore
from cliptuner.index.embedded import Collection, StoredDoc
from cliptuner.index.milvus import LITE_FILE, MilvusCollection, where_expr

DIM = 16
BACKENDS = ["embedded", "embedded-hnsw", "milvus", "milvus-server"]
EMBEDDED = {"embedded": "exact", "embedded-hnsw": "usearch"}  # the Collection backend of each


def _random(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    return random_vectors(n, seed, dim)


def _assert_hits(got: list[list[tuple[str, float]]], want: list[list[tuple[str, float]]], atol: float = 1e-5) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert [i for i, _ in g] == [i for i, _ in w]
        np.testing.assert_allclose([s for _, s in g], [s for _, s in w], atol=atol)


def _new_model(docs: list[StoredDoc]) -> np.ndarray:
    """A 'new model version': a doc's vector is a function of its text alone (12 dims)."""
    return np.stack([_random(1, seed=5000 + int(d.text.split()[-1]), dim=12)[0] for d in docs])


def _assert_embedded_by_new_model(store, texts: dict[str, int]) -> None:
    """Every doc's stored vector is ``_new_model`` of its current text (a search with it finds it at cosine 1)."""
    assert len(store) == len(texts)
    ids = sorted(texts)
    expected = _new_model([StoredDoc(id=i, text=f"text {texts[i]}") for i in ids])
    for doc_id, top in zip(ids, store.search(expected, limit=1, version="v2")):
        assert top[0] == (doc_id, pytest.approx(1.0, abs=1e-5))


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory):
    """A Milvus server on a free port of 127.0.0.1 for this module's tests (stopped after the last one)."""
    folder = tmp_path_factory.mktemp("milvus_server")
    with MilvusServer(folder / "data", folder / "server.log") as server:
        yield server


@pytest.fixture
def make_store(backend, tmp_path, request):
    """Opens the backend under test at a root; everything it opened is closed after the test (before tmp_path,
    where the stores save on close, is removed). On the server, a test's stores share a collection name that no
    other test uses (a reopened root finds its collections again)."""
    opened = []
    server = request.getfixturevalue("milvus_server") if backend == "milvus-server" else None
    name = f"t{uuid.uuid4().hex[:16]}"

    def make(root):
        if backend in EMBEDDED:
            store = Collection(root, backend=EMBEDDED[backend])
        elif server is not None:
            store = MilvusCollection(root, uri=server.uri, name=name)
        else:
            store = MilvusCollection(root)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def test_every_backend_is_a_vector_store_and_a_closed_one_refuses_calls(make_store, tmp_path):
    store = make_store(tmp_path / "store")
    assert isinstance(store, VectorStore)
    store.upsert(_docs(3), _random(3, seed=0), "v1")
    store.close()
    store.close()  # idempotent
    calls = [
        lambda: store.search(_random(1, seed=1), limit=1),
        lambda: store.upsert(_docs(1), _random(1, seed=2), "v1"),
        lambda: store.delete(["d0"]),
        lambda: store.get(["d0"]),
        lambda: list(store.iter_docs()),
        lambda: store.rebuild("v2", _new_model),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=f"{type(store).__name__} .* is closed"):
            call()
    with pytest.raises(TypeError, match="abstract"):
        VectorStore(tmp_path / "base")


@pytest.fixture
def filled(make_store, tmp_path):
    """A store with 40 docs of version v1 (their vectors, and the docs)."""
    vecs, docs = _random(40, seed=0), _docs(40)
    store = make_store(tmp_path / "store")
    store.upsert(docs, vecs, "v1")
    return store, docs, vecs


# -- writing and reading -----------------------------------------------------------------------------------------
def test_empty_store(make_store, tmp_path):
    store = make_store(tmp_path / "store")
    assert (store.version, store.dim, len(store)) == (None, None, 0)
    assert store.search(_random(2, seed=1), limit=3) == [[], []]
    assert store.get(["nope"]) == [None] and "nope" not in store
    assert list(store.iter_docs()) == []


def test_upsert_replaces_an_existing_id(filled, backend):
    store, _, vecs = filled
    target = _random(1, seed=2)
    store.upsert([StoredDoc(id="d7", text="replaced", tags={"k": 1})], target, "v1")
    assert len(store) == 40 and "d7" in store
    got = store.get(["d7"])[0]
    assert (got.text, got.tags) == ("replaced", {"k": 1})
    top = store.search(target, limit=1)[0][0]
    assert top == ("d7", pytest.approx(1.0, abs=1e-5))
    updated = vecs.copy()
    updated[7] = target[0]
    queries = np.vstack([vecs[7], _random(2, seed=3)])  # the old vector of d7 is gone: scores are the new one's
    _assert_hits(store.search(queries, limit=5), _brute(updated, [f"d{i}" for i in range(40)], queries, 5))
    stats = store.stats()
    assert {k: stats[k] for k in ("count", "version", "dim")} == {"count": 40, "version": "v1", "dim": DIM}
    assert stats["backend"] == EMBEDDED.get(backend, "milvus")
    # a replaced doc keeps its place in insertion order
    assert [d.id for batch in store.iter_docs(batch_size=16) for d in batch] == [f"d{i}" for i in range(40)]


@pytest.mark.parametrize("limit", [1, 7, 100])
def test_search_returns_the_exact_top_limit(filled, limit):
    store, docs, vecs = filled
    queries = _random(5, seed=3)
    want = _brute(vecs, [d.id for d in docs], queries, limit)
    _assert_hits(store.search(queries, limit=limit, version="v1"), want)
    assert [len(hits) for hits in store.search(queries, limit=limit)] == [min(limit, 40)] * 5
    _assert_hits(store.search(queries[0], limit=limit), want[:1])  # one [D] query


def test_search_refuses_bad_arguments(filled):
    store, _, vecs = filled
    for limit in (0, -1, 2.5):
        with pytest.raises(ValueError, match="limit"):
            store.search(vecs[:1], limit=limit)
    with pytest.raises(ValueError, match="3 dims"):
        store.search(np.ones((1, 3), np.float32), limit=1)
    with pytest.raises(ValueError, match="shape"):
        store.search(np.ones((1, 2, DIM), np.float32), limit=1)


def test_ids_with_quotes_and_backslashes(make_store, tmp_path):
    ids = ['a"b', "c\\d", "e'f", "g\nh", "caf\u00e9", "x'] or id != ['"]
    vecs = _random(len(ids), seed=4)
    store = make_store(tmp_path / "store")
    store.upsert([StoredDoc(id=i, text=i) for i in ids], vecs, "v1")
    assert [d.text for d in store.get(ids)] == ids
    assert store.delete([ids[-1], "e'f"]) == 2  # an id that reads like a filter removes only itself
    assert len(store) == len(ids) - 2 and store.get(["e'f"]) == [None]
    keep = [0, 1, 3, 4]
    _assert_hits(store.search(vecs[:2], limit=3), _brute(vecs[keep], [ids[i] for i in keep], vecs[:2], 3))


def test_delete_and_missing_ok(filled):
    store, _, vecs = filled
    before = store.search(vecs[:3], limit=5)
    with pytest.raises(ValueError, match=r"doc\(s\) 'nope', 'gone' not stored; nothing was deleted"):
        store.delete(["d1", "nope", "d2", "gone", "nope"], missing_ok=False)
    assert len(store) == 40 and "d1" in store and store.get(["d2"])[0].text == "text 2"
    _assert_hits(store.search(vecs[:3], limit=5), before)
    assert store.delete(["d1", "d2", "d1"], missing_ok=False) == 2
    assert store.delete(["d3", "nope", "d3"]) == 1
    assert store.delete(["d3"]) == 0
    assert len(store) == 37 and "d1" not in store and store.get(["d1", "d4"])[0] is None
    hits = store.search(vecs[1:4], limit=40)
    assert all(len(h) == 37 and {"d1", "d2", "d3"}.isdisjoint(i for i, _ in h) for h in hits)


@pytest.mark.parametrize(
    "docs, vectors, match",
    [
        (lambda: [StoredDoc(id="n1")], lambda: _random(1, seed=30, dim=DIM + 1), r"'n1'.*17 dims"),
        (
            lambda: [StoredDoc(id="n1"), StoredDoc(id="n2")],
            lambda: np.vstack([_random(1, seed=31), np.full((1, DIM), np.nan)]),
            r"'n2'.*NaN",
        ),
        (lambda: [StoredDoc(id="n1"), StoredDoc(id="n1")], lambda: _random(2, seed=32), r"'n1'.*more than once"),
        (
            lambda: [StoredDoc(id="n1"), StoredDoc(id="d5", text="changed")],
            lambda: np.vstack([_random(1, seed=35), np.zeros((1, DIM))]),
            r"'d5'.*zeros",
        ),
        (lambda: [StoredDoc(id="n1", tags={"bad": object()})], lambda: _random(1, seed=36), r"'n1'.*JSON"),
    ],
)
def test_bad_upserts_store_nothing(filled, docs, vectors, match):
    store, _, vecs = filled
    before = store.search(vecs[:3], limit=5)
    with pytest.raises(ValueError, match=match):
        store.upsert(docs(), vectors(), "v1")
    assert len(store) == 40 and "n1" not in store and store.get(["n1"]) == [None]
    assert store.get(["d5"])[0].text == "text 5"
    _assert_hits(store.search(vecs[:3], limit=5), before)


def test_version_checks(filled):
    store, _, vecs = filled
    with pytest.raises(ValueError, match=r"'v2'.*'v1'"):
        store.upsert([StoredDoc(id="new")], _random(1, seed=5), "v2")
    with pytest.raises(ValueError, match=r"'v2'.*'v1'"):
        store.search(vecs[:1], limit=3, version="v2")
    assert len(store) == 40 and "new" not in store
    assert store.delete([f"d{i}" for i in range(40)]) == 40
    store.upsert([StoredDoc(id="new")], _random(1, seed=6, dim=8), "v2")  # empty again: takes the new version
    assert (store.version, store.dim, len(store)) == ("v2", 8, 1)
    assert store.search(_random(1, seed=6, dim=8), limit=2, version="v2")[0] == [("new", pytest.approx(1.0, abs=1e-5))]


# -- tag filters -------------------------------------------------------------------------------------------------
_TAGS = [
    {"category": "shoes", "year": 2024, "ratio": 0.5, "sale": True},
    {"category": "shoes", "year": 2023, "ratio": 0.25, "sale": False},
    {"category": "hats", "year": 2024, "ratio": 0.5, "sale": True},
    {"category": 'say "hi"\\n', "year": 2022},
    {"sale": 1, "label": "1", "ratio": 1},
    {},
    {"category": "shoes", "year": 2024, "nested": {"a": 1}},
]


def _tag_equals(tag, value) -> bool:
    """JSON equality: a boolean equals only a boolean, a string only a string, numbers by value (1 == 1.0)."""
    if isinstance(value, bool) or isinstance(tag, bool):
        return isinstance(tag, bool) and isinstance(value, bool) and tag == value
    if isinstance(value, str) or isinstance(tag, str):
        return isinstance(tag, str) and isinstance(value, str) and tag == value
    return isinstance(tag, (int, float)) and tag == value


@pytest.fixture
def tagged(make_store, tmp_path):
    """35 docs whose tags cycle through ``_TAGS``."""
    vecs = _random(35, seed=7)
    docs = [StoredDoc(id=f"t{i}", text=f"text {i}", tags=dict(_TAGS[i % len(_TAGS)])) for i in range(35)]
    store = make_store(tmp_path / "store")
    store.upsert(docs, vecs, "v1")
    return store, docs, vecs


@pytest.mark.parametrize(
    "where",
    [
        {"category": "shoes"},
        {"category": "shoes", "year": 2024},
        {"year": 2024},
        {"year": 2024.0},  # JSON numbers: 2024 == 2024.0
        {"ratio": 0.5},
        {"ratio": 1.0},
        {"sale": True},  # not the doc whose sale is 1
        {"sale": 1},  # not the docs whose sale is true
        {"sale": False, "category": "shoes"},
        {"label": "1"},
        {"category": 'say "hi"\\n'},
    ],
)
def test_where_filters_by_tag_equality(tagged, where):
    store, docs, vecs = tagged
    queries = _random(3, seed=8)
    keep = [i for i, d in enumerate(docs) if all(k in d.tags and _tag_equals(d.tags[k], v) for k, v in where.items())]
    assert keep
    want = _brute(vecs[keep], [docs[i].id for i in keep], queries, 4)
    _assert_hits(store.search(queries, limit=4, version="v1", where=where), want)
    _assert_hits(
        store.search(queries, limit=50, where=where), _brute(vecs[keep], [docs[i].id for i in keep], queries, 50)
    )


def test_where_without_matches_gives_empty_lists(tagged):
    store, _, _ = tagged
    assert store.search(_random(2, seed=9), limit=3, where={"category": "boots"}) == [[], []]
    assert store.search(_random(1, seed=9), limit=3, where={"missing_tag": 1}) == [[]]
    assert store.search(_random(1, seed=9), limit=3, where={"label": 1}) == [[]]  # a string never equals a number


@pytest.mark.parametrize(
    "where, match",
    [
        ({"a-b": 1}, "a-b"),
        ({"tags.x": 1}, "tags.x"),
        ({"": 1}, "''"),
        ({"1abc": 1}, "1abc"),
        ({"nested": {"a": 1}}, "nested"),
        ({"category": None}, "category"),
        ({"category": ["shoes"]}, "category"),
        ({"ratio": float("nan")}, "ratio"),
        ({}, "non-empty"),
        (["category"], "category"),
    ],
)
def test_where_refuses_bad_names_and_values(tagged, where, match):
    store, _, vecs = tagged
    with pytest.raises(ValueError, match=match):
        store.search(vecs[:1], limit=3, where=where)


# -- persistence -------------------------------------------------------------------------------------------------
def test_restart_keeps_docs_version_vectors_and_content(make_store, tmp_path):
    tensor = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    rich = StoredDoc(
        id="rich",
        text="a cat",
        uri="file:///cat.png",
        blob=b"\x89PNG\x00\x01",
        tensor=tensor,
        tags={"split": "train", "n": 3, "nested": {"a": [1, 2.5, None]}},
    )
    empty_text = StoredDoc(id="empty", text="", uri=None)
    vecs, queries = _random(22, seed=10), _random(4, seed=11)
    store = make_store(tmp_path / "store")
    store.upsert([rich, empty_text] + _docs(20), vecs, "v1")
    store.delete(["d0"])
    store.upsert([StoredDoc(id="d1", text="text 101", blob=b"new")], vecs[3:4], "v1")
    before = store.search(queries, limit=6)
    order = [d.id for batch in store.iter_docs(batch_size=5) for d in batch]
    store.close()
    store = make_store(tmp_path / "store")
    assert (len(store), store.version, store.dim) == (21, "v1", DIM)
    _assert_hits(store.search(queries, limit=6), before)
    got, plain, replaced, gone = store.get(["rich", "empty", "d1", "d0"])
    assert gone is None
    assert (got.id, got.text, got.uri, got.blob, got.tags) == (rich.id, rich.text, rich.uri, rich.blob, rich.tags)
    assert got.tensor.dtype == np.uint8 and np.array_equal(got.tensor, tensor)
    assert plain == StoredDoc(id="empty", text="")
    assert (replaced.text, replaced.blob, replaced.tensor) == ("text 101", b"new", None)
    light = store.get(["rich"], content=False)[0]
    assert (light.blob, light.tensor, light.text) == (None, None, "a cat")
    assert (
        [d.id for batch in store.iter_docs(batch_size=5) for d in batch]
        == order
        == ["rich", "empty"] + [f"d{i}" for i in range(1, 20)]
    )


# -- rebuilds ----------------------------------------------------------------------------------------------------
def test_rebuild_swaps_version_and_vectors(filled, make_store, tmp_path):
    store, docs, _ = filled
    new = _new_model(docs)
    assert store.rebuild("v2", _new_model, batch_size=16) == 40
    assert (store.version, store.dim, len(store)) == ("v2", 12, 40)
    queries = _random(3, seed=12, dim=12)
    want = _brute(new, [d.id for d in docs], queries, 5)
    _assert_hits(store.search(queries, limit=5, version="v2"), want)  # the scores are the new vectors'
    with pytest.raises(ValueError, match="'v1'"):
        store.search(_random(1, seed=13), limit=1, version="v1")
    with pytest.raises(ValueError, match="'v1'"):
        store.upsert([StoredDoc(id="late")], _random(1, seed=13), "v1")
    store.close()
    store = make_store(tmp_path / "store")
    assert (store.version, store.dim, len(store)) == ("v2", 12, 40)
    _assert_hits(store.search(queries, limit=5), want)


def test_rebuild_of_an_empty_store_sets_the_version(make_store, tmp_path):
    store = make_store(tmp_path / "store")
    assert store.rebuild("v3", lambda docs: pytest.fail("nothing to embed")) == 0
    assert store.version == "v3"
    store.close()
    store = make_store(tmp_path / "store")
    assert store.version == "v3" and len(store) == 0
    store.upsert(_docs(2), _random(2, seed=14, dim=8), "v3")
    assert (store.version, store.dim, len(store)) == ("v3", 8, 2)


def test_rebuild_embeds_from_the_stored_content(make_store, tmp_path):
    tensors = [np.full((2, 3, 3), i, np.uint8) for i in range(7)]
    docs = [
        StoredDoc(id=f"c{i}", text=f"text {i}", uri=f"u{i}", blob=bytes([i, 255]), tensor=tensors[i], tags={"i": i})
        for i in range(7)
    ]
    store = make_store(tmp_path / "store")
    store.upsert(docs, _random(7, seed=15), "v1")
    seen: list[list[StoredDoc]] = []

    def embed(batch):
        seen.append(batch)
        return _new_model(batch)

    assert store.rebuild("v2", embed, batch_size=3) == 7
    assert [len(b) for b in seen] == [3, 3, 1]
    got = {d.id: d for batch in seen for d in batch}
    for doc in docs:
        d = got[doc.id]
        assert isinstance(d, StoredDoc)
        assert (d.text, d.uri, d.blob, d.tags) == (doc.text, doc.uri, doc.blob, doc.tags)
        assert np.array_equal(d.tensor, doc.tensor) and d.tensor.dtype == np.uint8
    _assert_embedded_by_new_model(store, {f"c{i}": i for i in range(7)})
    assert store.get(["c4"])[0].blob == bytes([4, 255])  # the content stays with the new version


def test_writes_during_rebuild_are_re_embedded(filled):
    store, _, _ = filled
    calls = []

    def embed(docs):
        if not calls:  # mid-rebuild: the old version still serves writes
            store.upsert(
                [StoredDoc(id="late", text="text 77"), StoredDoc(id="d39", text="text 55")], _random(2, seed=16), "v1"
            )
            store.delete(["d0"])
        calls.append([d.id for d in docs])
        return _new_model(docs)

    assert store.rebuild("v2", embed, batch_size=10) == 40
    assert "d0" not in store and "late" in store
    _assert_embedded_by_new_model(store, {f"d{i}": i for i in range(1, 39)} | {"late": 77, "d39": 55})


def test_searches_during_a_swap_see_one_version(make_store, tmp_path):
    # old vectors map the query to doc A, then f59, f58, ...; new vectors to doc B, then f0, f1, ...
    q = np.zeros(8, np.float32)
    q[0] = 1.0
    rest = _unit(_random(60, seed=17, dim=7))
    cos = np.linspace(-0.9, 0.9, 60, dtype=np.float32)[:, None]
    ids = ["A", "B"] + [f"f{i}" for i in range(60)]
    old = np.vstack([q, -q, np.hstack([cos, np.sqrt(1 - cos**2) * rest])])
    new = np.vstack([-q, q, np.hstack([-cos, np.sqrt(1 - cos**2) * rest])])
    expected = {"v1": _brute(old, ids, q[None], 5)[0], "v2": _brute(new, ids, q[None], 5)[0]}
    store = make_store(tmp_path / "store")
    store.upsert([StoredDoc(id=i, text=f"text {n}") for n, i in enumerate(ids)], old, "v1")
    row = {doc_id: r for r, doc_id in enumerate(ids)}

    def embed(docs):
        time.sleep(0.02)
        return new[[row[d.id] for d in docs]]

    results, errors = [], []
    stop = threading.Event()

    def searcher():
        while not stop.is_set():
            try:
                for version in ("v1", "v2", None):
                    try:
                        hits = store.search(q, limit=5, version=version)[0]
                    except ValueError:
                        assert version is not None  # a query of the other version: refused, never mixed
                        continue
                    results.append((version, hits))
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(err)

    threads = [threading.Thread(target=searcher) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    store.rebuild("v2", embed, batch_size=8)
    time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    assert not errors

    def which(hits):
        """The version whose vectors gave exactly these ids and scores (None: neither, a mix)."""
        for name, want in expected.items():
            if [i for i, _ in hits] == [i for i, _ in want] and np.allclose(
                [s for _, s in hits], [s for _, s in want], atol=1e-5
            ):
                return name
        return None

    seen = [(version, which(hits)) for version, hits in results]
    assert all(got is not None for _, got in seen)
    assert {got for _, got in seen} == {"v1", "v2"}  # searches ran before and after the swap
    assert all(got == version for version, got in seen if version is not None)
    assert store.search(q, limit=1)[0][0][0] == "B"


def test_failed_rebuild_keeps_old_version_and_the_next_one_resumes(filled, make_store, tmp_path):
    store, _, vecs = filled
    queries = _random(4, seed=18)
    before = store.search(queries, limit=5, version="v1")
    calls = []

    def crashing(docs):
        calls.append(len(docs))
        if len(calls) == 3:  # two batches of ten done
            raise RuntimeError("model crashed")
        return _new_model(docs)

    with pytest.raises(RuntimeError, match="model crashed"):
        store.rebuild("v2", crashing, batch_size=10)
    assert (store.version, store.dim, len(store)) == ("v1", DIM, 40)  # the old version serves
    _assert_hits(store.search(queries, limit=5, version="v1"), before)
    with pytest.raises(ValueError, match=r"'v2'.*'v1'"):  # the new vectors are not searchable
        store.search(_random(1, seed=19, dim=12), limit=5, version="v2")
    with pytest.raises(ValueError, match=r"'d20'.*NaN"):  # bad vectors: the first doc not done yet is named
        store.rebuild("v2", lambda docs: np.full((len(docs), 12), np.nan, np.float32), batch_size=10)
    store.close()  # a restart between the failure and the resume
    store = make_store(tmp_path / "store")
    assert (store.version, len(store)) == ("v1", 40)
    _assert_hits(store.search(queries, limit=5), before)
    # the old version keeps taking writes before the rebuild resumes
    store.upsert(
        [StoredDoc(id="d5", text="text 555"), StoredDoc(id="late", text="text 777")], _random(2, seed=20), "v1"
    )
    store.delete(["d6", "d30"])
    embedded = []

    def counting(docs):
        embedded.extend(d.id for d in docs)
        return _new_model(docs)

    assert store.rebuild("v2", counting, batch_size=10) == 39  # 40 + late - d6 - d30
    # d0..d19 were done (minus d5, rewritten since, and d6, deleted); d30 is gone
    assert sorted(embedded) == sorted(["d5", "late"] + [f"d{i}" for i in range(20, 40) if i != 30])
    texts = {f"d{i}": i for i in range(40) if i not in (6, 30)} | {"d5": 555, "late": 777}
    _assert_embedded_by_new_model(store, texts)
    store.close()
    store = make_store(tmp_path / "store")
    assert (store.version, store.dim) == ("v2", 12)
    _assert_embedded_by_new_model(store, texts)


def test_a_rebuild_for_another_version_starts_over(filled):
    store, _, _ = filled

    def crashing(docs):
        if docs[0].id == "d20":
            raise RuntimeError("killed")
        return _random(len(docs), seed=21, dim=12)  # vectors the other version must not inherit

    with pytest.raises(RuntimeError, match="killed"):
        store.rebuild("v1b", crashing, batch_size=10)
    embedded = []
    store.rebuild("v2", lambda docs: embedded.extend(d.id for d in docs) or _new_model(docs), batch_size=10)
    assert sorted(embedded) == sorted(f"d{i}" for i in range(40))
    _assert_embedded_by_new_model(store, {f"d{i}": i for i in range(40)})


# -- Milvus only -------------------------------------------------------------------------------------------------
@pytest.fixture
def milvus(tmp_path):
    store = MilvusCollection(tmp_path / "store")
    yield store
    store.close()


def _ours(store: MilvusCollection) -> list[str]:
    return sorted(c for c in store._client.list_collections() if c.startswith(f"{store.name}__"))


def test_milvus_alias_names_the_live_collection_and_the_old_one_is_dropped(milvus):
    milvus.upsert(_docs(12), _random(12, seed=22), "v1")
    first = milvus.collection_name
    assert milvus._client.describe_alias("cliptuner")["collection_name"] == first
    assert _ours(milvus) == [first]
    props = milvus._client.describe_collection(first)["properties"]
    assert props["cliptuner.version"] == "v1" and props["cliptuner.dim"] == str(DIM)
    milvus.rebuild("v2", _new_model, batch_size=5)
    second = milvus.collection_name
    assert second != first and milvus._client.describe_alias("cliptuner")["collection_name"] == second
    assert _ours(milvus) == [second]  # the old version's collection is dropped
    assert milvus.stats() == {
        "count": 12,
        "version": "v2",
        "dim": 12,
        "backend": "milvus",
        "index": "HNSW",
        "collection": second,
    }


def test_milvus_failed_rebuild_keeps_its_collection_for_the_resume(milvus, tmp_path):
    milvus.upsert(_docs(12), _random(12, seed=23), "v1")
    live = milvus.collection_name

    def crashing(docs):
        if docs[0].id == "d5":
            raise RuntimeError("killed")
        return _new_model(docs)

    with pytest.raises(RuntimeError, match="killed"):
        milvus.rebuild("v2", crashing, batch_size=5)
    pending = [c for c in _ours(milvus) if c != live]
    assert len(pending) == 1 and milvus._client.describe_alias("cliptuner")["collection_name"] == live
    assert milvus._client.query(pending[0], filter="", output_fields=["count(*)"])[0]["count(*)"] == 5


def test_milvus_version_with_odd_characters(milvus, tmp_path):
    version = "org/model:v1.2 beta+\u00e9"
    milvus.upsert(_docs(3), _random(3, seed=24), version)
    assert milvus.collection_name.startswith("cliptuner__org_model_v1_2_beta__")
    milvus.close()
    with MilvusCollection(tmp_path / "store") as store:
        assert store.version == version and len(store) == 3


def test_milvus_refuses_a_long_id_by_name(milvus):
    milvus.upsert(_docs(2), _random(2, seed=25), "v1")
    with pytest.raises(ValueError, match=r"doc 'xxxxxxxxxx.*513 bytes.*512"):
        milvus.upsert([StoredDoc(id="ok"), StoredDoc(id="x" * 513)], _random(2, seed=26), "v1")
    with pytest.raises(ValueError, match="600 bytes"):
        milvus.upsert([StoredDoc(id="\u00e9" * 300)], _random(1, seed=27), "v1")
    assert len(milvus) == 2 and "ok" not in milvus
    milvus.upsert([StoredDoc(id="y" * 512)], _random(1, seed=28), "v1")  # exactly the limit fits
    assert "y" * 512 in milvus


def test_milvus_refuses_bad_options(tmp_path):
    with pytest.raises(ValueError, match="name"):
        MilvusCollection(tmp_path / "a", name="bad-name")
    with pytest.raises(ValueError, match=r"index 'IVF_PQ'"):
        MilvusCollection(tmp_path / "a", index="IVF_PQ")
    with pytest.raises(ValueError, match="ef_search"):
        MilvusCollection(tmp_path / "a", ef_search=0)
    for name in ("shop_", "shop__2"):  # their collections would start with the prefix of the store 'shop'
        with pytest.raises(ValueError, match=f"'__' and not ending in '_', got '{name}'"):
            MilvusCollection(tmp_path / "a", name=name)


@pytest.mark.parametrize(
    "uri", ["127.0.0.1:19530", "grpc://milvus:19530", "/data/milvus.db", "http://", "http://milvus:port", ""]
)
def test_milvus_refuses_a_uri_that_is_not_a_server(tmp_path, uri):
    with pytest.raises(ValueError, match=f"uri must be a Milvus server URI .*, got {re.escape(repr(uri))}"):
        MilvusCollection(tmp_path / "a", uri=uri)
    assert not (tmp_path / "a").exists()  # refused before anything was made


# -- Milvus server (uri="http://...") ----------------------------------------------------------------------------
def test_milvus_server_holds_the_collection_and_another_client_sees_it(milvus_server, tmp_path):
    from pymilvus import MilvusClient

    with MilvusCollection(tmp_path / "store", uri=milvus_server.uri, name="seen") as store:
        assert not store.lite
        store.upsert(_docs(6), _random(6, seed=40), "v1")
        live = store.collection_name
    assert not (tmp_path / "store" / LITE_FILE).exists()  # nothing of Milvus in the store's folder
    client = MilvusClient(uri=milvus_server.uri)
    try:
        assert client.describe_alias("seen")["collection_name"] == live
        assert client.query(live, filter="", output_fields=["count(*)"])[0]["count(*)"] == 6
    finally:
        client.close()


def test_milvus_stores_sharing_a_server_keep_apart_by_name(milvus_server, tmp_path):
    vecs = _random(8, seed=44)
    shop = MilvusCollection(tmp_path / "shop", uri=milvus_server.uri, name="shop")
    archive = MilvusCollection(tmp_path / "archive", uri=milvus_server.uri, name="shop_archive")
    try:
        shop.upsert(_docs(5, prefix="s"), vecs[:5], "v1")
        archive.upsert(_docs(3, prefix="a"), vecs[5:], "v7")
        shop.rebuild("v2", _new_model, batch_size=2)  # drops only shop's old collection
        shop.close()
        shop = MilvusCollection(tmp_path / "shop", uri=milvus_server.uri, name="shop")  # its open drops leftovers
        assert (shop.version, len(shop)) == ("v2", 5)
        assert (archive.version, len(archive)) == ("v7", 3)
        _assert_hits(archive.search(vecs[5:], limit=3), _brute(vecs[5:], ["a0", "a1", "a2"], vecs[5:], 3))
    finally:
        shop.close()
        archive.close()


def test_milvus_store_survives_a_server_restart(tmp_path):
    queries = _random(3, seed=45, dim=12)
    with MilvusServer(tmp_path / "data", tmp_path / "server.log") as server:
        with MilvusCollection(tmp_path / "store", uri=server.uri, name="kept") as store:
            store.upsert(_docs(20), _random(20, seed=46), "v1")
            store.delete(["d3"])
            store.rebuild("v2", _new_model, batch_size=8)
            before = store.search(queries, limit=5)
    with MilvusServer(tmp_path / "data", tmp_path / "server.log") as server:  # another port, the same data
        with MilvusCollection(tmp_path / "store", uri=server.uri, name="kept") as store:
            assert (store.version, store.dim, len(store)) == ("v2", 12, 19) and "d3" not in store
            _assert_hits(store.search(queries, limit=5), before)


def test_milvus_unreachable_server_is_named_and_leaves_the_root_free(tmp_path):
    from pymilvus import MilvusException

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for _ in range(2):  # the failed open released the root's lock: the second try fails the same way
        with pytest.raises(MilvusException, match=f"127.0.0.1:{port}"):
            MilvusCollection(tmp_path / "store", uri=f"http://127.0.0.1:{port}", timeout=10)


def test_milvus_second_open_of_the_same_root_is_refused(milvus, tmp_path):
    with pytest.raises(RuntimeError, match="already open"):
        MilvusCollection(tmp_path / "store")


def test_where_expr_escapes_strings():
    assert where_expr({"category": 'a"b\\c\nd', "year": 2024, "r": 0.5, "ok": False}) == (
        'tags["category"] == "a\\"b\\\\c\\nd" and tags["year"] == 2024 and tags["r"] == 0.5 and tags["ok"] == false'
    )
    assert where_expr(None) == ""


def test_milvus_acknowledged_writes_survive_a_killed_process(tmp_path):
    code = textwrap.dedent(f"""
        import os
        import numpy as np
        from cliptuner.index.embedded import StoredDoc
        from cliptuner.index.milvus import MilvusCollection
        store = MilvusCollection({str(tmp_path / "store")!r})
        vecs = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
        store.upsert([StoredDoc(id=f"k{{i}}", text=f"text {{i}}", blob=b"img") for i in range(5)], vecs, "v1")
        store.delete(["k4"])
        os._exit(0)  # no close(): what kill -9 leaves
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    with MilvusCollection(tmp_path / "store") as store:
        assert (store.version, len(store)) == ("v1", 4)
        assert store.get(["k3"])[0].blob == b"img"


def test_module_imports_without_pymilvus(tmp_path):
    code = textwrap.dedent(f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("pymilvus", "milvus_lite"):
                    raise ImportError(f"No module named {{name!r}} (blocked)")
                return None

        sys.meta_path.insert(0, Block())
        import cliptuner.index.milvus as ms
        try:
            ms.MilvusCollection({str(tmp_path / "store")!r})
        except ImportError as err:
            assert isinstance(err, ms.MilvusNotInstalledError), type(err)
            print(err)
        else:
            raise SystemExit("no ImportError")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'pip install "cliptuner[milvus]"' in out.stdout
