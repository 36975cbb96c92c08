"""The tuner's /models endpoints called as plain objects, and the encoder and the indexer following a promote and a
rollback between versions with different weights (``tiny_model_dir`` as v1, ``tiny_model_dir_v2`` as v2)."""

import shutil
import time

import numpy as np
import pytest
from docarray import DocList
from support import QUICK, run

from cliptuner.model.manifest import ModelManifest
from cliptuner.model.registry import Registry
from cliptuner.model.runtime import OnnxClip
from cliptuner.train import synthetic
from executors import ClipDoc, CLIPIndexer

TEXTS = ["a large teal star on the left", "two small dotted brown hexagons"]


@pytest.fixture
def registry(workspace, tiny_model_dir_v2, tmp_path):
    """v1 (CURRENT, the fixture's) and v2: other weights, tuned from v1 with a report, not yet CURRENT."""
    src = tmp_path / "v2-src"
    shutil.copytree(tiny_model_dir_v2, src)
    manifest = ModelManifest.read(src)
    manifest.parent_version = "v1"
    manifest.report = {
        "epochs": 2,
        "before": {"t2i_r5": 0.2, "i2t_r5": 0.25, "mean_recall": 0.3},
        "after": {"t2i_r5": 0.4, "i2t_r5": 0.45, "mean_recall": 0.5},
    }
    manifest.write(src)
    reg = Registry(workspace / "models")
    assert reg.publish(src, make_current=False) == "v2"
    return reg


def gallery(scenes) -> DocList[ClipDoc]:
    return DocList[ClipDoc]([ClipDoc(id=f"g{i}", tensor=image) for i, image in enumerate(scenes.images)])


def stored_matrix(collection, n: int) -> np.ndarray:
    """The stored vector of each gallery doc (scoring the basis vector e_j gives column j)."""
    basis = np.eye(collection.dim, dtype=np.float32)
    matrix = np.zeros((n, collection.dim), np.float32)
    for j, hits in enumerate(collection.search(basis, limit=len(collection), version=collection.version)):
        for doc_id, score in hits:
            matrix[int(doc_id[1:]), j] = score
    return matrix


def assert_serving(encoder, indexer, registry, version: str, other: str, scenes) -> None:
    """The encoder embeds with ``version`` (equal to its offline embedding, not ``other``'s), and the index holds
    ``version``'s embedding of every gallery image."""
    out = run(encoder.encode(docs=DocList[ClipDoc]([ClipDoc(id=f"t{i}", text=t) for i, t in enumerate(TEXTS)])))
    assert [doc.model_version for doc in out] == [version, version]
    got = np.stack([doc.embedding for doc in out])
    np.testing.assert_allclose(got, OnnxClip(registry.path(version)).encode_text(TEXTS), atol=1e-5)
    assert (got * OnnxClip(registry.path(other)).encode_text(TEXTS)).sum(1).max() < 0.99
    assert indexer.collection.version == version and len(indexer.collection) == len(scenes.images)
    np.testing.assert_allclose(
        stored_matrix(indexer.collection, len(scenes.images)),
        OnnxClip(registry.path(version)).encode_images(scenes.images),
        atol=1e-5,
    )


def test_models_lists_one_doc_per_version_with_its_summary(tuner, registry):
    out = run(tuner.list_models(docs=DocList[ClipDoc]()))
    assert [doc.id for doc in out] == ["v1", "v2"] and [doc.model_version for doc in out] == ["v1", "v2"]
    v1, v2 = (doc.tags for doc in out)
    assert v1["current"] is True and v1["parent_version"] is None and v1["report"] is None
    assert v1["arch"] == "cliptuner-tiny" and v1["created_at"]
    assert v2["current"] is False and v2["parent_version"] == "v1"
    assert v2["report"] == {
        "epochs": 2,
        "before": {"t2i_r5": 0.2, "i2t_r5": 0.25, "mean_recall": 0.3},
        "after": {"t2i_r5": 0.4, "i2t_r5": 0.45, "mean_recall": 0.5},
        "gate": None,
    }
    assert [doc.tags for doc in out] == registry.summaries()


def test_encoder_and_indexer_follow_a_promote_and_a_rollback(tuner, encoder, indexer, registry, scenes):
    run(indexer.index(docs=gallery(scenes)))
    assert_serving(encoder, indexer, registry, "v1", "v2", scenes)

    out = run(tuner.promote_model(docs=DocList[ClipDoc](), parameters={"version": "v2"}))
    assert len(out) == 1 and out[0].id == "v2" and out[0].model_version == "v2"
    assert out[0].tags == {"action": "promote", "model_version": "v2", "previous_version": "v1", "changed": True}
    assert registry.current() == "v2"
    # in the Flow the answer then passes the encoder and the indexer, which move to CURRENT before it goes on
    out = run(indexer.train_done(docs=run(encoder.train_done(docs=out))))
    assert out[0].tags["encoder"] == {"model_version": "v2"} and out[0].tags["index"]["model_version"] == "v2"
    assert {"/models/promote", "/models/rollback"} <= set(encoder.requests) & set(indexer.requests)
    assert_serving(encoder, indexer, registry, "v2", "v1", scenes)
    hit = run(indexer.search(docs=DocList[ClipDoc]([ClipDoc(id="q", tensor=scenes.images[3])])))[0]
    assert hit.model_version == "v2" and hit.matches[0].id == "g3"

    out = run(tuner.rollback_model(docs=DocList[ClipDoc]()))  # v2's parent
    assert out[0].id == "v1" and out[0].tags["previous_version"] == "v2" and out[0].tags["action"] == "rollback"
    assert indexer.sync()["from_version"] == "v2"
    assert_serving(encoder, indexer, registry, "v1", "v2", scenes)


def test_the_indexer_watcher_follows_a_promote(workspace, registry, tuner, scenes):
    idx = CLIPIndexer(workspace=str(workspace), bootstrap=False, watch_interval=0.05)
    try:
        run(idx.index(docs=gallery(scenes)))
        run(tuner.promote_model(docs=DocList[ClipDoc](), parameters={"version": "v2"}))
        deadline = time.monotonic() + 60
        while idx.collection.version != "v2" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert idx.collection.version == "v2"
        np.testing.assert_allclose(
            stored_matrix(idx.collection, len(scenes.images)),
            OnnxClip(registry.path("v2")).encode_images(scenes.images),
            atol=1e-5,
        )
    finally:
        idx.close()


@pytest.mark.parametrize(
    "endpoint, parameters, message",
    [
        (
            "promote_model",
            {},
            r"/models/promote needs parameters\['version'\], a published version \(\['v1', 'v2'\]\), "
            r"got None",
        ),
        ("promote_model", {"version": 3.0}, r"needs parameters\['version'\].*got 3.0"),
        ("promote_model", {"version": "v9"}, r"unknown model version 'v9' in the registry; known: \['v1', 'v2'\]"),
        ("promote_model", {"version": "../../etc"}, r"unknown model version '\.\./\.\./etc' in the registry; known: "),
        ("promote_model", {"version": "v2", "keep": 1.0}, r"unknown parameter\(s\) \['keep'\] for /models/promote"),
        ("rollback_model", {"version": "v1"}, r"unknown parameter\(s\) \['version'\] for /models/rollback"),
        ("list_models", {"limit": 3.0}, r"unknown parameter\(s\) \['limit'\] for /models"),
        ("prune_models", {}, r"/models/prune needs parameters\['keep'\]"),
        ("prune_models", {"keep": 0.0}, r"parameter 'keep' must be >= 1, got 0"),
        ("prune_models", {"keep": 1.5}, r"parameter 'keep' must be a whole number, got 1.5"),
        ("prune_models", {"keep": "2"}, r"parameter 'keep' must be an integer, got '2'"),
    ],
)
def test_parameters_are_checked_by_name(tuner, registry, workspace, endpoint, parameters, message):
    with pytest.raises(ValueError, match=message) as error:
        run(getattr(tuner, endpoint)(docs=DocList[ClipDoc](), parameters=parameters))
    assert str(workspace) not in str(error.value)  # errors name versions, never the server's paths
    assert registry.current() == "v1" and registry.versions() == ["v1", "v2"]


def test_a_broken_version_is_not_promoted_and_the_encoder_keeps_serving(tuner, encoder, registry):
    (registry.path("v2") / "textual.onnx").unlink()
    with pytest.raises(
        ValueError,
        match=r"model version 'v2' cannot be served: 'v2' is not a model directory: "
        r"missing \['textual.onnx'\]",
    ) as error:
        run(tuner.promote_model(docs=DocList[ClipDoc](), parameters={"version": "v2"}))
    assert str(registry.root) not in str(error.value)
    listed = run(tuner.list_models(docs=DocList[ClipDoc]()))
    assert listed[1].tags["error"] == "'v2' is not a model directory: missing ['textual.onnx']"
    assert registry.current() == "v1"
    out = run(encoder.encode(docs=DocList[ClipDoc]([ClipDoc(id="t", text=TEXTS[0])])))
    assert out[0].model_version == "v1"
    with pytest.raises(ValueError, match=r"cannot roll back from model version 'v1': it has no parent"):
        run(tuner.rollback_model(docs=DocList[ClipDoc]()))


def test_prune_endpoint_never_deletes_current(tuner, registry, tiny_model_dir):
    registry.publish(tiny_model_dir, make_current=False)  # v3
    parameters = {"keep": 1.0, "tuner": {"keep": 5.0}, "__results__": {}}  # as Jina delivers them in a Flow
    out = run(tuner.prune_models(docs=DocList[ClipDoc](), parameters=parameters))
    assert len(out) == 1 and out[0].id == "models-prune" and out[0].model_version == "v1"
    assert out[0].tags == {"deleted": ["v2"], "kept": ["v1", "v3"]}
    assert registry.versions() == ["v1", "v3"] and registry.current() == "v1"


def test_keep_versions_prunes_after_each_publish(workspace, registry):
    from executors import CLIPTuner

    with pytest.raises(ValueError, match="parameter 'keep_versions' must be >= 1, got 0"):
        CLIPTuner(workspace=str(workspace), bootstrap=False, device="cpu", keep_versions=0)
    tuner = CLIPTuner(workspace=str(workspace), bootstrap=False, device="cpu", keep_versions=1)
    try:
        pairs = synthetic.generate(24, domain="domain", seed=11, captions_per_image=2)
        docs = DocList[ClipDoc](
            [
                ClipDoc(
                    id=f"p{i}",
                    text=caption,
                    tensor=pairs.images[pairs.image_index[i]],
                    tags={"image_id": pairs.image_ids[pairs.image_index[i]]},
                )
                for i, caption in enumerate(pairs.captions)
            ]
        )
        report = run(tuner.train(docs=docs, parameters=QUICK))[0].tags["report"]
    finally:
        tuner.close()
    assert report["model_version"] == "v3" and report["parent_version"] == "v1"
    assert report["pruned_versions"] == ["v1", "v2"]
    assert registry.versions() == ["v3"] and registry.current() == "v3"
