"""The three Executors called as plain objects: conversion, validation, model versions, persistence.

A workspace gets the session's exported tiny model published as ``v1`` (no export per test); tests that need
another version publish ``tiny_model_dir_v2`` (other weights), so that a vector can only match the new version's
embedding if it really was made by the new model.
"""

import asyncio
import base64
import json
import threading
import time

import numpy as np
import pytest
from docarray import DocList
from support import QUICK, pair_docs, png, run

from cliptuner.config import ModelSpec
from cliptuner.model.images import ImageError
from cliptuner.model.registry import Registry
from cliptuner.model.runtime import OnnxClip
from cliptuner.serve.bootstrap import BootstrapTimeout, ensure_current
from cliptuner.train import synthetic
from executors import ClipDoc, CLIPEncoder, CLIPIndexer
from executors.options import request_parameters, setting
from executors.tuner import TrainingBusy


def gallery_docs(scenes) -> DocList[ClipDoc]:
    return DocList[ClipDoc](
        [
            ClipDoc(id=f"g{i}", tensor=image, tags={"caption": scenes.captions[i]})
            for i, image in enumerate(scenes.images)
        ]
    )


def stored_vectors(collection) -> dict[str, np.ndarray]:
    """The vectors a search compares queries with, by doc id: scoring the basis vector e_j gives column j."""
    basis = np.eye(collection.dim, dtype=np.float32)  # [D, D]
    columns = collection.search(basis, limit=len(collection), version=collection.version)
    vectors: dict[str, np.ndarray] = {}
    for j, hits in enumerate(columns):
        for doc_id, score in hits:
            vectors.setdefault(doc_id, np.zeros(collection.dim, np.float32))[j] = score
    return vectors


def assert_gallery_embedded_by(collection, scenes, model_dir, not_by_dir) -> None:
    """The collection holds ``model_dir``'s embedding of every gallery image, and not ``not_by_dir``'s."""
    stored = stored_vectors(collection)
    ids = [f"g{i}" for i in range(len(scenes.images))]
    assert sorted(stored) == sorted(ids)
    matrix = np.stack([stored[doc_id] for doc_id in ids])  # [N, D]
    np.testing.assert_allclose(matrix, OnnxClip(model_dir).encode_images(scenes.images), atol=1e-5)
    old = OnnxClip(not_by_dir).encode_images(scenes.images)
    assert (matrix * old).sum(1).max() < 0.99


def test_the_second_version_embeds_differently(tiny_model_dir, tiny_model_dir_v2, scenes):
    v1, v2 = OnnxClip(tiny_model_dir), OnnxClip(tiny_model_dir_v2)
    assert (v1.encode_images(scenes.images) * v2.encode_images(scenes.images)).sum(1).max() < 0.99
    assert (v1.encode_text(scenes.captions) * v2.encode_text(scenes.captions)).sum(1).max() < 0.99


# -- options -------------------------------------------------------------------------------------------------------
def test_unset_settings_are_none():
    assert setting(None) is None and setting("") is None and setting("  ") is None
    assert setting("$CLIPTUNER_PRETRAINED") is None and setting("${{ ENV.CLIPTUNER_MODEL }}") is None
    assert setting("cliptuner-tiny") == "cliptuner-tiny" and setting(3) == 3


def test_request_parameters_ignore_jina_keys_and_sections_but_refuse_unknown_names():
    params = {"limit": 3.0, "__results__": {}, "tuner": {"epochs": 2.0}}
    assert request_parameters(params, ("limit",), "/search") == {"limit": 3.0}
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['limmit'\] for /search; allowed: \['limit'\]"):
        request_parameters({"limmit": 3}, ("limit",), "/search")


# -- encoder -------------------------------------------------------------------------------------------------------
def test_encoder_embeds_mixed_texts_and_images_like_the_runtime(encoder, workspace, scenes):
    image = scenes.images[0]
    path = workspace / "data" / "scene.png"  # under the default image root
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(png(image))
    data_uri = "data:image/png;base64," + base64.b64encode(png(image)).decode()
    docs = DocList[ClipDoc](
        [
            ClipDoc(id="text", text=scenes.captions[0]),
            ClipDoc(id="tensor", tensor=image),
            ClipDoc(id="blob", blob=png(image)),
            ClipDoc(id="path", uri=str(path)),
            ClipDoc(id="data-uri", uri=data_uri),
            ClipDoc(id="pair", text="some other caption", tensor=image),
        ]
    )
    out = run(encoder.encode(docs=docs, parameters={}))
    assert [d.id for d in out] == ["text", "tensor", "blob", "path", "data-uri", "pair"]
    clip = OnnxClip(workspace / "models" / "v1")
    expected_text = clip.encode_text([scenes.captions[0]])[0]
    expected_image = clip.encode_images([image])[0]
    for doc in out:
        assert doc.model_version == "v1"
        assert doc.embedding.shape == (clip.embed_dim,)
        assert np.linalg.norm(doc.embedding) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(out[0].embedding, expected_text, atol=1e-5)
    for doc in out[1:]:  # every image form, and the pair, is embedded by its image (PNG is lossless)
        np.testing.assert_allclose(doc.embedding, expected_image, atol=1e-5)
    assert out[5].text == "some other caption" and out[3].uri == str(path)  # text and uri are kept
    assert all(doc.blob is None and doc.tensor is None for doc in out)  # the image bytes are not sent back


def test_encoder_minibatches_many_docs(workspace, scenes):
    enc = CLIPEncoder(workspace=str(workspace), bootstrap=False, batch_size=5)
    try:
        docs = DocList[ClipDoc]([ClipDoc(id=f"t{i}", text=c) for i, c in enumerate(scenes.captions)])
        docs.extend(gallery_docs(scenes))
        out = run(enc.encode(docs=docs))
        embeddings = np.stack([d.embedding for d in out])
        assert embeddings.shape == (24, 128)
        whole = OnnxClip(workspace / "models" / "v1", batch_size=64).encode_images(scenes.images)
        np.testing.assert_allclose(embeddings[12:], whole, atol=1e-5)
    finally:
        enc.close()


@pytest.mark.parametrize(
    "doc, message",
    [
        (ClipDoc(id="empty"), r"doc 'empty': has neither text nor an image"),
        (ClipDoc(id="broken", blob=b"\x89PNG not really"), r"doc 'broken'.*cannot decode"),
        (ClipDoc(id="chw", tensor=np.zeros((3, 16, 16), np.uint8)), r"doc 'chw': tensor must be an H×W×3 uint8 image"),
        (ClipDoc(id="floaty", tensor=np.zeros((16, 16, 3), np.float32)), r"doc 'floaty': tensor must be .* float32"),
        (ClipDoc(id="web", uri="https://example.com/cat.png"), r"doc 'web': uri is not allowed"),
    ],
)
def test_encoder_names_the_bad_doc_and_keeps_serving(encoder, doc, message):
    docs = DocList[ClipDoc]([ClipDoc(id="fine", text="a red circle"), doc])
    with pytest.raises(ValueError, match=message):
        run(encoder.encode(docs=docs))
    out = run(encoder.encode(docs=DocList[ClipDoc]([ClipDoc(id="next", text="a blue square")])))
    assert out[0].embedding is not None


def test_undecodable_blob_is_an_image_error(encoder):
    with pytest.raises(ImageError, match="doc 'x'"):
        run(encoder.encode(docs=DocList[ClipDoc]([ClipDoc(id="x", blob=b"GIF89a?")])))


def test_encoder_refuses_unknown_parameters(encoder):
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['limit'\] for /encode"):
        run(encoder.encode(docs=DocList[ClipDoc]([ClipDoc(id="a", text="x")]), parameters={"limit": 3}))


def test_uri_roots_keep_paths_inside(workspace, scenes, tmp_path):
    inside = workspace / "images"
    inside.mkdir()
    (inside / "a.png").write_bytes(png(scenes.images[0]))
    (tmp_path / "outside.png").write_bytes(png(scenes.images[0]))
    enc = CLIPEncoder(workspace=str(workspace), bootstrap=False, uri_roots=["images"])  # relative to the workspace
    try:
        out = run(enc.encode(docs=DocList[ClipDoc]([ClipDoc(id="ok", uri="a.png")])))
        assert out[0].embedding is not None
        with pytest.raises(ValueError, match="doc 'escape': uri is not allowed"):
            run(enc.encode(docs=DocList[ClipDoc]([ClipDoc(id="escape", uri="../outside.png")])))
    finally:
        enc.close()


def test_encoder_follows_current_without_restart_and_never_mixes_versions(
    encoder, workspace, tiny_model_dir_v2, scenes
):
    registry = Registry(workspace / "models")
    clip = encoder.follower.clip()
    original = clip.encode_images

    def publish_midway(*args, **kwargs):  # CURRENT moves while this request is being encoded
        if registry.current() == "v1":
            registry.publish(tiny_model_dir_v2, version="v2")
        return original(*args, **kwargs)

    clip.encode_images = publish_midway
    docs = DocList[ClipDoc]([ClipDoc(id="img", tensor=scenes.images[0]), ClipDoc(id="txt", text="a star")])
    out = run(encoder.encode(docs=docs))
    assert registry.current() == "v2"
    v1, v2 = OnnxClip(workspace / "models" / "v1"), OnnxClip(workspace / "models" / "v2")
    assert [d.model_version for d in out] == ["v1", "v1"]  # one request, one version
    np.testing.assert_allclose(out[0].embedding, v1.encode_images([scenes.images[0]])[0], atol=1e-5)
    np.testing.assert_allclose(out[1].embedding, v1.encode_text(["a star"])[0], atol=1e-5)
    out = run(encoder.encode(docs=DocList[ClipDoc]([ClipDoc(id="txt", text="a star")])))
    assert out[0].model_version == "v2"  # the next request, the new version: no restart
    np.testing.assert_allclose(out[0].embedding, v2.encode_text(["a star"])[0], atol=1e-5)


def test_encoder_train_passthrough_swaps_now_and_status_reports(encoder, workspace, tiny_model_dir_v2):
    Registry(workspace / "models").publish(tiny_model_dir_v2, version="v7")
    report = DocList[ClipDoc]([ClipDoc(id="train-report", model_version="v7", tags={"report": {"x": 1}})])
    out = run(encoder.train_done(docs=report))
    assert out[0].tags["encoder"] == {"model_version": "v7"} and out[0].tags["report"] == {"x": 1}
    encoded = run(encoder.encode(docs=DocList[ClipDoc]([ClipDoc(id="txt", text="a star")])))[0]
    np.testing.assert_allclose(encoded.embedding, OnnxClip(tiny_model_dir_v2).encode_text(["a star"])[0], atol=1e-5)
    status = run(encoder.report_status(docs=DocList[ClipDoc]()))
    assert [d.id for d in status] == ["status-encoder"]
    assert status[0].model_version == "v7" and status[0].tags["embed_dim"] == 128


def test_encoder_waits_for_a_version_then_times_out_clearly(tmp_path):
    with pytest.raises(BootstrapTimeout, match="no model version in .* after 0.3 s"):
        CLIPEncoder(workspace=str(tmp_path), bootstrap=False, bootstrap_timeout=0.3)


def test_encoder_without_workspace_fails_at_start(monkeypatch):
    monkeypatch.delenv("CLIPTUNER_WORKSPACE", raising=False)
    with pytest.raises(ValueError, match="no workspace"):
        CLIPEncoder(bootstrap=False)


def test_concurrent_bootstraps_publish_one_base_version(tmp_path):
    registry = Registry(tmp_path / "models")
    results, errors = [], []

    def start():
        try:
            results.append(ensure_current(registry, ModelSpec("cliptuner-tiny"), timeout=120, poll=0.05))
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == ["v1", "v1", "v1"]
    assert registry.versions() == ["v1"]
    assert registry.metadata("v1")["role"] == "base"
    assert (registry.path("v1") / "checkpoint.pt").is_file()


# -- indexer -------------------------------------------------------------------------------------------------------
def test_indexer_alone_embeds_stores_and_finds_each_image_first(indexer, scenes):
    stored = run(indexer.index(docs=gallery_docs(scenes)))
    assert all(d.model_version == "v1" and d.embedding is not None for d in stored)
    queries = DocList[ClipDoc]([ClipDoc(id=f"q{i}", tensor=image) for i, image in enumerate(scenes.images)])
    out = run(indexer.search(docs=queries, parameters={"limit": 3.0}))
    for i, query in enumerate(out):
        assert len(query.matches) == 3 and len(query.scores) == 3
        assert query.matches[0].id == f"g{i}" and query.scores[0] == pytest.approx(1.0, abs=1e-4)
        assert query.scores == sorted(query.scores, reverse=True)
        assert [m.score for m in query.matches] == query.scores
        assert all(m.model_version == "v1" for m in query.matches) and query.model_version == "v1"
    top = out[4].matches[0]
    assert top.tensor is None and top.blob is None  # no stored image bytes unless asked for
    assert top.tags == {"caption": scenes.captions[4]}
    asked = run(
        indexer.search(
            docs=DocList[ClipDoc]([ClipDoc(id="q", tensor=scenes.images[4])]),
            parameters={"limit": 2, "return_content": True},
        )
    )[0]
    assert [m.id for m in asked.matches] == [m.id for m in out[4].matches[:2]]
    np.testing.assert_array_equal(asked.matches[0].tensor, scenes.images[4])  # the stored content comes back
    assert asked.matches[0].tags == {"caption": scenes.captions[4]}
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    run(indexer.index(docs=DocList[ClipDoc]([ClipDoc(id="pair", text="a red star", blob=png(noise))])))
    hit = run(indexer.search(docs=DocList[ClipDoc]([ClipDoc(id="q", tensor=noise)]), parameters={"limit": 1}))[
        0
    ].matches[0]
    assert (hit.id, hit.text, hit.blob, hit.tensor) == ("pair", "a red star", None, None)  # text, not image bytes


def test_search_filter_keeps_the_docs_whose_tags_match(indexer, scenes):
    docs = gallery_docs(scenes)
    for i, doc in enumerate(docs):
        doc.tags.update(half="even" if i % 2 == 0 else "odd", year=2020 + i % 3, seen=i < 4)
    run(indexer.index(docs=docs))
    query = DocList[ClipDoc]([ClipDoc(id="q", tensor=scenes.images[1])])
    everything = run(indexer.search(docs=query, parameters={"limit": len(docs)}))[0]
    odd = run(indexer.search(docs=query, parameters={"limit": len(docs), "filter": {"tags.half": "odd"}}))[0]
    assert [m.id for m in odd.matches] == [m.id for m in everything.matches if int(m.id[1:]) % 2 == 1]
    assert odd.matches[0].id == "g1" and all(m.tags["half"] == "odd" for m in odd.matches)
    # numbers arrive as floats through protobuf; several keys must all match
    both = run(indexer.search(docs=query, parameters={"limit": 3, "filter": {"tags.year": 2021.0, "tags.seen": True}}))
    expected = [m.id for m in everything.matches if (int(m.id[1:]) % 3, int(m.id[1:]) < 4) == (1, True)][:3]
    assert [m.id for m in both[0].matches] == expected and expected
    none = run(indexer.search(docs=query, parameters={"filter": {"tags.half": "neither"}}))[0]
    assert none.matches == [] and none.scores == []


def stored_matrix(collection, ids: list[str]) -> np.ndarray:
    stored = stored_vectors(collection)
    return np.stack([stored[doc_id] for doc_id in ids])  # [N, D]


def forged(docs: DocList[ClipDoc], version: str = "v1") -> DocList[ClipDoc]:
    """The docs with a client's vector (not their content's embedding) labelled ``version``."""
    vector = np.ones(128, np.float32) / np.sqrt(128)
    for doc in docs:
        doc.embedding, doc.model_version = vector, version
    return docs


def test_a_standalone_indexer_embeds_content_itself_whatever_vector_comes_with_it(indexer, workspace, scenes):
    run(indexer.index(docs=forged(gallery_docs(scenes))))
    ids = [f"g{i}" for i in range(len(scenes.images))]
    np.testing.assert_allclose(
        stored_matrix(indexer.collection, ids),
        OnnxClip(workspace / "models" / "v1").encode_images(scenes.images),
        atol=1e-5,
    )
    plain = run(
        indexer.search(docs=DocList[ClipDoc]([ClipDoc(id="q", text=scenes.captions[2])]), parameters={"limit": 5})
    )[0]
    out = run(
        indexer.search(
            docs=forged(DocList[ClipDoc]([ClipDoc(id="q", text=scenes.captions[2])])), parameters={"limit": 5}
        )
    )[0]
    assert [m.id for m in out.matches] == [m.id for m in plain.matches]
    np.testing.assert_allclose(out.scores, plain.scores, atol=1e-6)
    np.testing.assert_allclose(out.embedding, plain.embedding, atol=1e-6)  # the vector used comes back


def test_a_trusting_indexer_uses_vectors_of_its_version_and_embeds_the_others(workspace, scenes):
    idx = CLIPIndexer(workspace=str(workspace), bootstrap=False, watch_interval=0, trust_client_vectors=True)
    try:
        run(idx.index(docs=gallery_docs(scenes)))
        target = stored_vectors(idx.collection)["g3"]
        trusted = DocList[ClipDoc]([ClipDoc(id="q", text="anything", embedding=3 * target, model_version="v1")])
        out = run(idx.search(docs=trusted, parameters={"limit": 1}))[0]
        assert out.matches[0].id == "g3" and out.scores[0] == pytest.approx(1.0, abs=1e-5)  # used, normalised
        other = forged(DocList[ClipDoc]([ClipDoc(id="q", tensor=scenes.images[5])]), version="v0-elsewhere")
        out = run(idx.search(docs=other, parameters={"limit": 1}))[0]
        assert out.matches[0].id == "g5" and out.model_version == "v1"  # another version's vector: re-embedded
        for embedding, message in [
            (np.full(128, np.nan, np.float32), "doc 'n': embedding is not finite"),
            (np.ones(64, np.float32), r"doc 'n': embedding has shape \(64,\).*128"),
            (np.zeros(128, np.float32), "doc 'n': embedding is all zeros"),
        ]:
            bad = DocList[ClipDoc](
                [ClipDoc(id="ok", text="fine"), ClipDoc(id="n", text="x", embedding=embedding, model_version="v1")]
            )
            with pytest.raises(ValueError, match=message):
                run(idx.index(docs=bad))
            assert len(idx.collection) == 12 and "ok" not in idx.collection
    finally:
        idx.close()
    with pytest.raises(ValueError, match="trust_client_vectors must be true or false, got 'yes'"):
        CLIPIndexer(workspace=str(workspace), bootstrap=False, watch_interval=0, trust_client_vectors="yes")


def test_the_encoder_overwrites_client_vectors_before_a_trusting_indexer(encoder, workspace, scenes):
    docs = forged(gallery_docs(scenes))
    docs.append(ClipDoc(id="text", text=scenes.captions[0], embedding=np.ones(128, np.float32), model_version="v1"))
    encoded = run(encoder.encode_for_index(docs=docs))
    clip = OnnxClip(workspace / "models" / "v1")
    expected = np.vstack([clip.encode_images(scenes.images), clip.encode_text([scenes.captions[0]])])
    np.testing.assert_allclose(np.stack([d.embedding for d in encoded]), expected, atol=1e-5)
    idx = CLIPIndexer(workspace=str(workspace), bootstrap=False, watch_interval=0, trust_client_vectors=True)
    try:
        run(idx.index(docs=encoded))
        np.testing.assert_allclose(stored_matrix(idx.collection, [d.id for d in encoded]), expected, atol=1e-5)
    finally:
        idx.close()


def test_vector_queries_are_checked_and_normalised(indexer, scenes):
    run(indexer.index(docs=gallery_docs(scenes)))
    text = run(
        indexer.search(docs=DocList[ClipDoc]([ClipDoc(id="q", text=scenes.captions[2])]), parameters={"limit": 5})
    )[0]
    vector_query = DocList[ClipDoc]([ClipDoc(id="vq", embedding=2.5 * text.embedding, model_version="v1")])
    out = run(indexer.search(docs=vector_query, parameters={"limit": 5}))[0]
    assert [m.id for m in out.matches] == [m.id for m in text.matches]
    np.testing.assert_allclose(out.scores, text.scores, atol=1e-5)
    assert abs(float(np.linalg.norm(out.embedding)) - 1) < 1e-5
    for doc, message in [
        (
            ClipDoc(id="v", embedding=np.ones(7, np.float32), model_version="v1"),
            r"doc 'v': embedding has shape \(7,\); the index holds 128-dimension vectors of model version 'v1'",
        ),
        (
            ClipDoc(id="v", embedding=np.full(128, np.inf, np.float32), model_version="v1"),
            "doc 'v': embedding is not finite",
        ),
        (ClipDoc(id="v", embedding=np.zeros(128, np.float32), model_version="v1"), "doc 'v': embedding is all zeros"),
        (
            ClipDoc(id="v", embedding=text.embedding, model_version="v0-elsewhere"),
            "doc 'v': a vector query's model_version must be the index's version 'v1', got 'v0-elsewhere'",
        ),
        (ClipDoc(id="v", embedding=text.embedding), "doc 'v': a vector query's model_version .* got None"),
        (ClipDoc(id="v"), "doc 'v': has neither text nor an image .* nor an embedding"),
    ]:
        with pytest.raises(ValueError, match=message):
            run(indexer.search(docs=DocList[ClipDoc]([ClipDoc(id="ok", text="fine"), doc])))
    again = run(indexer.search(docs=vector_query, parameters={"limit": 5}))[0]  # the service goes on
    assert [m.id for m in again.matches] == [m.id for m in text.matches]


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"limit": 0}, r"parameter 'limit' must be in \[1, 1000\], got 0"),
        ({"limit": 2.5}, r"parameter 'limit' must be a whole number"),
        ({"limit": 5, "top_k": 5}, r"unknown parameter\(s\) \['top_k'\] for /search"),
        ({"limit": "5"}, r"parameter 'limit' must be an integer, got '5'"),
        ({"limit": 1001}, r"parameter 'limit' must be in \[1, 1000\], got 1001"),
        ({"return_content": "yes"}, r"parameter 'return_content' must be true or false, got 'yes'"),
        ({"return_content": 1.0}, r"parameter 'return_content' must be true or false, got 1.0"),
        (
            {"filter": {"category": "shoes"}},
            r"parameter 'filter': key 'category' must name a tag, like 'tags.category'",
        ),
        ({"filter": {}}, r"parameter 'filter' must be a non-empty mapping"),
        ({"filter": "tags.category == 'shoes'"}, r"parameter 'filter' must be a non-empty mapping"),
        ({"filter": {"tags.a b": 1}}, r"tag filter key 'a b': must be a tag name"),
        ({"filter": {"tags.kind": ["a", "b"]}}, r"tag filter 'kind': value \['a', 'b'\] must be a string"),
    ],
)
def test_search_parameters_are_checked(indexer, scenes, parameters, message):
    run(indexer.index(docs=gallery_docs(scenes)))
    with pytest.raises(ValueError, match=message):
        run(indexer.search(docs=DocList[ClipDoc]([ClipDoc(id="q", text="x")]), parameters=parameters))


def test_index_refuses_docs_it_could_not_reembed(indexer, scenes):
    run(indexer.index(docs=gallery_docs(scenes)))
    with pytest.raises(ValueError, match="doc 'vec': has neither text nor an image"):
        run(indexer.index(docs=DocList[ClipDoc]([ClipDoc(id="vec", embedding=np.ones(128), model_version="v1")])))
    with pytest.raises(ValueError, match="doc 'bad'.*tensor must be"):
        run(
            indexer.index(
                docs=DocList[ClipDoc](
                    [ClipDoc(id="ok", text="fine"), ClipDoc(id="bad", tensor=np.zeros((2, 2), np.uint8))]
                )
            )
        )
    assert len(indexer.collection) == 12 and "ok" not in indexer.collection  # all or nothing


def test_index_refuses_repeated_ids_by_name_and_stores_nothing(indexer, scenes):
    run(indexer.index(docs=gallery_docs(scenes)))
    docs = DocList[ClipDoc](
        [
            ClipDoc(id="new", text="a"),
            ClipDoc(id="g1", text="b"),
            ClipDoc(id="g1", text="c"),
            ClipDoc(id="dup", text="d"),
            ClipDoc(id="dup", text="e"),
            ClipDoc(id="dup", text="f"),
        ]
    )
    with pytest.raises(
        ValueError,
        match=r"more than once in one /index request: 'g1' \(2 times\), 'dup' \(3 times\); "
        "nothing was stored",
    ):
        run(indexer.index(docs=docs))
    assert len(indexer.collection) == 12 and "new" not in indexer.collection
    assert indexer.collection.get(["g1"])[0].text is None  # not replaced
    run(indexer.index(docs=DocList[ClipDoc]([ClipDoc(id="new", text="a")])))  # the next valid request is served
    assert len(indexer.collection) == 13


def test_delete_refuses_unknown_ids_by_name_and_removes_nothing(indexer, scenes):
    run(indexer.index(docs=gallery_docs(scenes)))
    with pytest.raises(ValueError, match=r"doc\(s\) 'nope' not stored; nothing was deleted"):
        run(indexer.delete(docs=DocList[ClipDoc]([ClipDoc(id="g0"), ClipDoc(id="nope")])))
    assert len(indexer.collection) == 12 and "g0" in indexer.collection
    out = run(indexer.delete(docs=DocList[ClipDoc]([ClipDoc(id="g0")])))
    assert [d.tags["deleted"] for d in out] == [True]
    hits = run(
        indexer.search(docs=DocList[ClipDoc]([ClipDoc(id="q", tensor=scenes.images[0])]), parameters={"limit": 12})
    )[0]
    assert "g0" not in [m.id for m in hits.matches] and len(hits.matches) == 11
    status = run(indexer.report_status(docs=DocList[ClipDoc]()))[0]
    assert status.id == "status-indexer" and status.tags["count"] == 11 and status.model_version == "v1"


def test_index_survives_restart(workspace, scenes):
    first = CLIPIndexer(workspace=str(workspace), bootstrap=False, watch_interval=0)
    run(first.index(docs=gallery_docs(scenes)))
    query = DocList[ClipDoc]([ClipDoc(id="q", text=scenes.captions[3])])
    before = run(first.search(docs=query, parameters={"limit": 5}))[0]
    first.close()
    second = CLIPIndexer(workspace=str(workspace), bootstrap=False, watch_interval=0)
    try:
        assert len(second.collection) == 12 and second.collection.version == "v1"
        after = run(
            second.search(docs=DocList[ClipDoc]([ClipDoc(id="q", text=scenes.captions[3])]), parameters={"limit": 5})
        )[0]
        assert [m.id for m in after.matches] == [m.id for m in before.matches]
        np.testing.assert_allclose(after.scores, before.scores, atol=1e-6)
    finally:
        second.close()


def test_train_passthrough_rebuilds_the_index_with_the_new_version(indexer, workspace, tiny_model_dir_v2, scenes):
    run(indexer.index(docs=gallery_docs(scenes)))
    models = workspace / "models"
    assert_gallery_embedded_by(indexer.collection, scenes, models / "v1", not_by_dir=tiny_model_dir_v2)
    Registry(models).publish(tiny_model_dir_v2, version="v2")
    out = run(indexer.train_done(docs=DocList[ClipDoc]([ClipDoc(id="train-report", model_version="v2")])))
    assert out[0].tags["index"]["model_version"] == "v2" and out[0].tags["index"]["count"] == 12
    assert out[0].tags["index"]["rebuild_seconds"] >= 0
    assert_gallery_embedded_by(indexer.collection, scenes, models / "v2", not_by_dir=models / "v1")
    hits = run(indexer.search(docs=DocList[ClipDoc]([ClipDoc(id="q", tensor=scenes.images[1])])))[0]
    assert hits.matches[0].id == "g1" and hits.scores[0] == pytest.approx(1.0, abs=1e-4)
    assert hits.model_version == "v2"
    status = run(indexer.report_status(docs=DocList[ClipDoc]()))[0].tags
    assert status["last_rebuild"]["from_version"] == "v1" and status["rebuilding"] is None


def test_a_rebuild_stopped_midway_resumes_when_the_indexer_starts_again(
    workspace, tiny_model_dir_v2, scenes, monkeypatch
):
    import cliptuner.serve.reindex as reindex_module

    first = CLIPIndexer(workspace=str(workspace), bootstrap=False, watch_interval=0, rebuild_batch_size=4)
    run(first.index(docs=gallery_docs(scenes)))
    models = workspace / "models"
    Registry(models).publish(tiny_model_dir_v2, version="v2")
    real, batches = reindex_module.embed_items, []

    def stopping(clip, items):
        batches.append(len(items))
        if len(batches) == 3:  # two batches of the new version committed
            raise RuntimeError("process killed")
        return real(clip, items)

    monkeypatch.setattr(reindex_module, "embed_items", stopping)
    with pytest.raises(RuntimeError, match="process killed"):
        first.sync()
    assert first.collection.version == "v1" and first.status()["last_error"].endswith("process killed")
    first.close()
    monkeypatch.setattr(
        reindex_module, "embed_items", lambda clip, items: batches.append(len(items)) or real(clip, items)
    )
    batches.clear()
    second = CLIPIndexer(workspace=str(workspace), bootstrap=False, watch_interval=0, rebuild_batch_size=4)
    try:
        assert second.collection.version == "v1"  # the old version serves until the swap
        assert_gallery_embedded_by(second.collection, scenes, models / "v1", not_by_dir=models / "v2")
        assert second.sync()["count"] == 12
        assert batches == [4]  # only the docs the stopped rebuild had not done
        assert_gallery_embedded_by(second.collection, scenes, models / "v2", not_by_dir=models / "v1")
    finally:
        second.close()


def test_watcher_follows_current_in_the_background(workspace, tiny_model_dir_v2, scenes):
    idx = CLIPIndexer(workspace=str(workspace), bootstrap=False, watch_interval=0.1)
    try:
        run(idx.index(docs=gallery_docs(scenes)))
        Registry(workspace / "models").publish(tiny_model_dir_v2, version="v3")
        deadline = time.monotonic() + 30
        while idx.collection.version != "v3" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert idx.collection.version == "v3" and len(idx.collection) == 12
        assert_gallery_embedded_by(
            idx.collection, scenes, workspace / "models" / "v3", not_by_dir=workspace / "models" / "v1"
        )
    finally:
        idx.close()


# -- tuner ---------------------------------------------------------------------------------------------------------


def test_train_publishes_a_version_and_returns_one_report_doc(tuner, workspace):
    out = run(tuner.train(docs=pair_docs(24, seed=11), parameters=QUICK))
    assert len(out) == 1 and out[0].id == "train-report" and out[0].tensor is None
    report = out[0].tags["report"]
    registry = Registry(workspace / "models")
    assert out[0].model_version == report["model_version"] == registry.current() == "v2"
    assert report["parent_version"] == "v1" and report["init"] == "version v1"
    for side in ("before", "after"):
        assert set(report[side]) >= {"t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"}
    assert report["epochs"] == 1 and len(report["epoch_losses"]) == 1 and report["samples_per_s"] > 0
    # 24 images, captions of one image stay together: 6 held out, 18 trained on
    assert report["split"]["eval_images"] == 6 and report["split"]["train_images"] == 18
    assert report["split"]["train_pairs"] == 36 and report["split"]["source"] == "request docs"
    assert report["config"]["batch_size"] == 8 and report["config"]["learning_rate"] == 1e-3
    metadata = registry.metadata("v2")
    assert metadata["parent_version"] == "v1" and metadata["report"]["after"] == report["after"]
    run_reports = list((workspace / "runs").glob("*/report.json"))
    assert len(run_reports) == 1 and json.loads(run_reports[0].read_text())["model_version"] == "v2"
    status = run(tuner.report_status(docs=DocList[ClipDoc]()))[0].tags
    assert status["training"]["state"] == "done" and status["last_report"]["model_version"] == "v2"
    # the next run continues from the tuned version
    again = run(tuner.train(docs=pair_docs(24, seed=12), parameters=QUICK))[0]
    assert again.model_version == "v3" and again.tags["report"]["parent_version"] == "v2"
    assert again.tags["report"]["init"] == "version v2"


def test_train_from_a_pairs_file_under_the_data_root(tuner, workspace):
    csv = synthetic.write_csv(workspace / "data" / "shapes", n_images=20, domain="domain", seed=4, captions_per_image=2)
    relative = str(csv.relative_to(workspace / "data"))
    out = run(tuner.train(docs=DocList[ClipDoc](), parameters={**QUICK, "data": relative}))
    report = out[0].tags["report"]
    assert report["split"]["source"] == relative and report["split"]["eval_images"] == 5
    held_out = synthetic.write_csv(
        workspace / "data" / "held-out", n_images=7, domain="domain", seed=6, captions_per_image=1
    )
    out = run(
        tuner.train(
            docs=pair_docs(16, seed=8), parameters={**QUICK, "eval_data": str(held_out.relative_to(workspace / "data"))}
        )
    )
    split = out[0].tags["report"]["split"]  # all request pairs train; the file's pairs are held out
    assert (split["train_images"], split["eval_images"], split["eval_pairs"]) == (16, 7, 7)
    assert split["held_out"] == "held-out/" + held_out.name


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"epochs": 1, "learnig_rate": 0.1}, r"unknown parameter\(s\) \['learnig_rate'\] for /train"),
        ({"epochs": 1.5}, r"epochs must be a whole number"),
        ({"data": "../../etc/passwd"}, r"parameter 'data': '../../etc/passwd' is outside the data root"),
        ({"data": "missing.csv"}, r"parameter 'data': no file 'missing.csv' under the data root"),
        ({"eval_fraction": 1.5}, r"eval_fraction must be in \(0, 1\)"),
        ({"device": "cuda"}, r"unknown parameter\(s\) \['device'\]"),
        ({"export_precision": "int4"}, r"export_precision must be one of \['fp32', 'fp16', 'int8'\], got 'int4'"),
        ({"export_precision": 8.0}, r"export_precision must be a string, got 8"),
    ],
)
def test_train_parameters_are_checked_by_name(tuner, parameters, message):
    with pytest.raises(ValueError, match=message):
        run(tuner.train(docs=pair_docs(4, seed=1), parameters=parameters))


def test_train_parameters_become_the_core_configs(tuner):
    request = tuner.parse_request(
        {
            "epochs": 3.0,
            "batch_size": 16.0,
            "learning_rate": 5e-4,
            "seed": 9.0,
            "eval_fraction": 0.3,
            "layer_decay": 0.8,
            "wiseft_alphas": [0.5, 1.0],
            "lock_image": True,
            "image_unlocked_groups": 1.0,
            "tuner": {"epochs": 3.0},
        }
    )
    cfg = request.cfg
    assert (cfg.epochs, cfg.batch_size, cfg.seed, cfg.image_unlocked_groups) == (3, 16, 9, 1)
    assert isinstance(cfg.epochs, int) and cfg.learning_rate == 5e-4 and cfg.layer_decay == 0.8
    assert tuple(cfg.wiseft_alphas) == (0.5, 1.0) and cfg.device == "cpu" and cfg.lock_image
    assert request.eval_cfg.eval_fraction == 0.3 and request.eval_cfg.split_seed == 9
    assert request.data is None and request.eval_data is None


def test_train_refuses_bad_pairs_and_too_few_images(tuner):
    docs = pair_docs(12, seed=2)
    docs.append(ClipDoc(id="caption-only", text="a lonely caption"))
    with pytest.raises(ValueError, match="doc 'caption-only': a training pair needs text and an image"):
        run(tuner.train(docs=docs, parameters=QUICK))
    with pytest.raises(ValueError, match="training images is fewer than batch_size 64"):
        run(tuner.train(docs=pair_docs(12, seed=2), parameters={"epochs": 1}))
    assert run(tuner.report_status(docs=DocList[ClipDoc]()))[0].tags["training"]["state"] == "failed"
    assert tuner.runs._lock.acquire(blocking=False)  # released after a failure
    tuner.runs._lock.release()


def test_one_training_at_a_time(tuner):
    tuner.runs.acquire()  # as if a run were going
    try:
        with pytest.raises(TrainingBusy, match="a /train run is already going"):
            run(tuner.train(docs=pair_docs(12, seed=2), parameters=QUICK))
    finally:
        tuner.runs.release()


def test_the_same_train_request_sent_again_follows_its_run_instead_of_training_twice(tuner, workspace):
    """A retry (the gateway re-sends a /train whose connection broke) gets the report of the run it started."""
    docs = pair_docs(16, seed=5)

    async def twice():
        first = asyncio.create_task(tuner.train(docs=docs, parameters=QUICK))
        await asyncio.sleep(0.5)  # the first is running when the same request arrives again
        again = await tuner.train(docs=pair_docs(16, seed=5), parameters={**QUICK, "wait": True})
        return await first, again

    first, again = run(twice())
    assert first[0].tags["report"] == again[0].tags["report"] and first[0].model_version == "v2"
    assert Registry(workspace / "models").versions() == ["v1", "v2"]  # one run published once
    assert first[0].tags["report"]["request_id"].startswith("derived-")
    # other pairs are another request; a client's own id names a request whatever its content
    other = run(tuner.train(docs=pair_docs(16, seed=6), parameters={**QUICK, "request_id": "nightly-2026-12-07"}))
    assert other[0].model_version == "v3"
    detached = run(
        tuner.train(docs=pair_docs(16, seed=7), parameters={**QUICK, "request_id": "nightly-2026-12-07", "wait": False})
    )[0]
    assert detached.tags["state"] == "done" and detached.model_version == "v3"
    assert Registry(workspace / "models").versions() == ["v1", "v2", "v3"]


@pytest.mark.parametrize("request_id", ["", "has space", "x" * 129, 7.0, "-leading-dash"])
def test_a_bad_request_id_is_refused_by_name(tuner, request_id):
    with pytest.raises(ValueError, match="parameter 'request_id' must be 1 to 128 letters"):
        run(tuner.train(docs=pair_docs(4, seed=1), parameters={**QUICK, "request_id": request_id}))
    assert tuner.runs.active is None and tuner.runs.find(str(request_id)) is None  # refused before anything ran
    tuner.runs.acquire()  # the next request may start
    tuner.runs.release()


def test_passthrough_endpoints_forward_docs_unchanged(encoder, indexer):
    docs = DocList[ClipDoc]([ClipDoc(id="a", text="x", tags={"k": 1})])
    for executor in (encoder, indexer):
        out = run(executor.passthrough(docs=docs))
        assert [d.id for d in out] == ["a"] and out[0].tags == {"k": 1} and out[0].embedding is None


def test_the_tuner_binds_only_its_own_endpoints(tuner):
    """No default handler: Jina's gateway then sends the query endpoints past the tuner, never through it."""
    bound = set(tuner.requests)
    assert "/train" in bound and "/status" in bound
    assert not bound & {"/encode", "/index", "/search", "/delete", "__default__"}


def test_train_pairs_read_docarrays_standard_fields(tuner, workspace):
    """ImageDoc-style pairs: ``bytes_`` read as ``blob``, ``url`` as ``uri`` (under the data root), by the same rules."""
    scenes = synthetic.generate(2, "domain", seed=4, image_size=32)
    (workspace / "data").mkdir(exist_ok=True)
    (workspace / "data" / "b.png").write_bytes(png(scenes.images[1]))
    docs = DocList[ClipDoc](
        [
            ClipDoc(id="a", text=scenes.captions[0], bytes_=png(scenes.images[0])),
            ClipDoc(id="b", text=scenes.captions[1], url="b.png"),
        ]
    )
    pairs = tuner.pairs_from_docs(docs)
    assert len(pairs) == 2 and pairs.num_images == 2
    with pytest.raises(ValueError, match="uri is not allowed"):
        tuner.pairs_from_docs(DocList[ClipDoc]([ClipDoc(id="c", text="x", url="/etc/passwd")]))
