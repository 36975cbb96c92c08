"""End to end over real gRPC: the Flow of flows/flow.yml, started by `cliptuner serve` on a fresh workspace.

One Flow serves the whole module (the learning run is the expensive part), so the tests run in order and
share state: index a synthetic gallery and measure caption→image recall@5; /train on other scenes of the same
domain while /search and /encode keep being answered; measure recall@5 again; /status and /delete; bad input;
then stop the Flow and start it again on the same workspace.

Which model made the vectors is checked by value, not by the ``model_version`` labels: every score a search
returns must equal the cosine of that version's embeddings of the query and of the matched doc's stored content,
computed here with :class:`cliptuner.model.runtime.OnnxClip` from the version's directory in the registry. An index
that kept the old vectors after /train fails that, whatever it labels its matches.

The Flow runs in its own process (`python -m cliptuner.cli serve`), started fresh: its Executors are forked
from a process that never ran torch. The test process is a gRPC client on 127.0.0.1 that also reads the
published model versions (ONNX Runtime only) to compute the expected scores. The Flow gets
``OMP_NUM_THREADS=1``: on a CPU shared with other processes, torch's default of one thread per core
oversubscribes the cores and training slows down several-fold.

Requests sent while /train runs come from other asyncio clients in the same event loop: with this jina and
grpcio, two blocking ``Client.post`` calls from two threads of one process are sent one after the other (the
second waits for the first), which would hide whether the service answers during training.

Sizes can be raised for a longer, stronger learning run: CLIPTUNER_IT_GALLERY (images searched),
CLIPTUNER_IT_TRAIN_IMAGES (training scenes, two captions each), CLIPTUNER_IT_EPOCHS.
"""

import asyncio
import os
import signal

import numpy as np
import pytest
from docarray import DocList
from service import ExecutorProcess, FlowProcess, ServerError, by_id, png, post, post_async

from cliptuner.model.registry import Registry
from cliptuner.model.runtime import OnnxClip
from cliptuner.train import synthetic
from executors.schemas import ClipDoc

GALLERY = int(os.environ.get("CLIPTUNER_IT_GALLERY", "200"))
TRAIN_IMAGES = int(os.environ.get("CLIPTUNER_IT_TRAIN_IMAGES", "600"))
EPOCHS = int(os.environ.get("CLIPTUNER_IT_EPOCHS", "5"))
TRAIN_PARAMETERS = {
    "epochs": EPOCHS,
    "batch_size": 32,
    "learning_rate": 1e-3,
    "warmup_steps": 10,
    "seed": 0,
    "eval_fraction": 0.2,
}


@pytest.fixture(scope="module")
def gallery():
    """Scenes to search (one caption each); never trained on."""
    return synthetic.generate(GALLERY, domain="domain", seed=101)


@pytest.fixture(scope="module")
def train_pairs():
    """Other scenes of the same domain, two captions each."""
    return synthetic.generate(TRAIN_IMAGES, domain="domain", seed=202, captions_per_image=2)


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("flow-workspace")
    server = FlowProcess(workspace, workspace.parent / "flow.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def state():
    return {}


def caption_queries(gallery) -> DocList[ClipDoc]:
    return DocList[ClipDoc](
        [ClipDoc(id=f"q-{image_id}", text=gallery.captions[i]) for i, image_id in enumerate(gallery.image_ids)]
    )


def offline_clip(flow: FlowProcess, version: str) -> OnnxClip:
    """The published ``version``, loaded in the test process."""
    return OnnxClip(Registry(flow.workspace / "models").path(version), device="cpu", intra_op_threads=1)


def offline_gallery(flow: FlowProcess, gallery, version: str) -> dict[str, np.ndarray]:
    """``version``'s embedding of every gallery image, by doc id (PNG blobs decode to the same pixels)."""
    return dict(zip(gallery.image_ids, offline_clip(flow, version).encode_images(gallery.images)))


def expected_scores(
    flow: FlowProcess, gallery, version: str, results: DocList[ClipDoc], texts: dict[str, str]
) -> list[np.ndarray]:
    """Per query doc of ``results``: cosine of ``version``'s embeddings of its text and of each match's image."""
    images = offline_gallery(flow, gallery, version)
    queries = dict(zip(texts, offline_clip(flow, version).encode_text(list(texts.values()))))
    return [np.array([queries[query.id] @ images[m.id] for m in query.matches]) for query in results]


def assert_scored_by(
    flow: FlowProcess, gallery, version: str, results: DocList[ClipDoc], texts: dict[str, str]
) -> list[np.ndarray]:
    """Every score equals ``version``'s offline cosine: query and stored vectors were both made by ``version``."""
    expected = expected_scores(flow, gallery, version, results, texts)
    for query, scores in zip(results, expected):
        assert query.model_version == version
        np.testing.assert_allclose(query.scores, scores, atol=1e-4, err_msg=f"query {query.id}")
    return expected


def recall_at_5(flow: FlowProcess, gallery, version: str) -> float:
    """Caption→image recall@5 over the gallery; every score must be ``version``'s (never two versions)."""
    queries = caption_queries(gallery)
    results = post(flow, "/search", queries, parameters={"limit": 5}, request_size=50)
    assert len(results) == gallery.num_images
    hits = 0
    for query in results:
        assert len(query.matches) == 5 and query.scores == sorted(query.scores, reverse=True)
        hits += query.id[len("q-") :] in [m.id for m in query.matches]
    assert_scored_by(flow, gallery, version, results, {q.id: q.text for q in queries})
    return hits / len(results)


def test_index_then_search_with_the_base_model(flow, gallery, state):
    docs = DocList[ClipDoc]()
    for i, (image_id, image) in enumerate(zip(gallery.image_ids, gallery.images)):
        content = {"tensor": image} if i % 2 else {"blob": png(image)}  # both ways a client sends images
        docs.append(ClipDoc(id=image_id, tags={"caption": gallery.captions[i]}, **content))
    stored = post(flow, "/index", docs, request_size=50)
    assert len(stored) == GALLERY and {d.model_version for d in stored} == {"v1"}

    encoded = post(
        flow,
        "/encode",
        DocList[ClipDoc]([ClipDoc(id="t", text="a red circle"), ClipDoc(id="i", tensor=gallery.images[0])]),
    )
    for doc in encoded:
        assert doc.model_version == "v1" and abs(np.linalg.norm(doc.embedding) - 1) < 1e-4
    indexed = by_id(stored)[gallery.image_ids[0]]  # sent as a PNG blob; responses may come back in any order
    np.testing.assert_allclose(encoded[1].embedding, indexed.embedding, atol=1e-5)  # blob and tensor alike

    top = post(
        flow,
        "/search",
        DocList[ClipDoc]([ClipDoc(id="q", tensor=gallery.images[3])]),
        parameters={"limit": 3, "return_content": True},
    )[0]
    assert top.matches[0].id == gallery.image_ids[3] and top.scores[0] == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_array_equal(top.matches[0].tensor, gallery.images[3])  # the stored content comes back
    assert top.matches[0].tags == {"caption": gallery.captions[3]}

    state["before"] = recall_at_5(flow, gallery, "v1")


def test_encode_and_search_never_pass_through_the_tuner(flow, gallery):
    """With the tuner's process frozen (SIGSTOP), /encode, /index, /search and /delete are still answered."""
    tuner_pid = by_id(post(flow, "/status"))["status-tuner"].tags["pid"]
    assert int(tuner_pid) != flow.proc.pid

    async def query_path():
        encoded = await post_async(flow.port, "/encode", DocList[ClipDoc]([ClipDoc(id="t", text="a red circle")]))
        await post_async(flow.port, "/index", DocList[ClipDoc]([ClipDoc(id="probe", text="a probe doc")]))
        found = await post_async(
            flow.port, "/search", DocList[ClipDoc]([ClipDoc(id="q", text="a probe doc")]), parameters={"limit": 1}
        )
        await post_async(flow.port, "/delete", DocList[ClipDoc]([ClipDoc(id="probe")]))
        return encoded, found

    os.kill(int(tuner_pid), signal.SIGSTOP)
    try:
        encoded, found = asyncio.run(asyncio.wait_for(query_path(), timeout=60))
    finally:
        os.kill(int(tuner_pid), signal.SIGCONT)
    assert encoded[0].embedding.shape == (128,) and found[0].matches[0].id == "probe"
    assert by_id(post(flow, "/status"))["status-indexer"].tags["count"] == GALLERY


def test_train_while_serving_then_search_with_the_tuned_version(flow, gallery, train_pairs, state):
    pairs = DocList[ClipDoc](
        [
            ClipDoc(
                id=f"pair-{i}",
                text=caption,
                tensor=train_pairs.images[train_pairs.image_index[i]],
                tags={"image_id": train_pairs.image_ids[train_pairs.image_index[i]]},
            )
            for i, caption in enumerate(train_pairs.captions)
        ]
    )

    async def scenario():
        training = asyncio.create_task(
            post_async(flow.port, "/train", pairs, parameters=TRAIN_PARAMETERS, request_size=len(pairs))
        )
        progress = None
        while not training.done():  # wait until the tuner reports optimizer steps
            tuner = by_id(await post_async(flow.port, "/status"))["status-tuner"].tags["training"]
            if tuner.get("state") == "running" and tuner.get("step"):
                progress = tuner
                break
            await asyncio.sleep(0.5)
        assert progress is not None, "the training finished before it could be observed"
        # meanwhile, other clients are served by the version that serves now
        searched = await post_async(
            flow.port, "/search", DocList[ClipDoc]([ClipDoc(id="s", text="a star")]), parameters={"limit": 3}
        )
        encoded = await post_async(
            flow.port,
            "/encode",
            DocList[ClipDoc]([ClipDoc(id="t", text="a blue square"), ClipDoc(id="i", tensor=gallery.images[0])]),
        )
        with ServerError("a /train run is already going"):
            await post_async(flow.port, "/train", pairs[:64], parameters=TRAIN_PARAMETERS, request_size=64)
        served_during_training = not training.done()
        return progress, searched, encoded, served_during_training, await training

    progress, searched, encoded, served_during_training, report_docs = asyncio.run(scenario())
    assert served_during_training
    assert progress["epochs"] == EPOCHS and progress["total_steps"] > 0 and progress["loss"] > 0
    assert "eta_s" in progress
    assert len(searched[0].matches) == 3
    assert_scored_by(flow, gallery, "v1", searched, {"s": "a star"})
    assert [d.model_version for d in encoded] == ["v1", "v1"] and encoded[0].embedding.shape == (128,)
    v1 = offline_clip(flow, "v1")
    np.testing.assert_allclose(encoded[0].embedding, v1.encode_text(["a blue square"])[0], atol=1e-5)
    np.testing.assert_allclose(encoded[1].embedding, v1.encode_images([gallery.images[0]])[0], atol=1e-5)

    assert [d.id for d in report_docs] == ["train-report"]
    report_doc = report_docs[0]
    assert report_doc.tensor is None and report_doc.blob is None  # the training images are not echoed back
    report = report_doc.tags["report"]
    assert report_doc.model_version == report["model_version"] == "v2" and report["parent_version"] == "v1"
    for side in ("before", "after"):
        assert set(report[side]) >= {"t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"}
    assert len(report["epoch_losses"]) == report["epochs"] == EPOCHS
    assert report["epoch_losses"][-1] < report["epoch_losses"][0]
    assert report["samples_per_s"] > 0
    assert report["split"]["train_images"] + report["split"]["eval_images"] == TRAIN_IMAGES
    assert report_doc.tags["encoder"] == {"model_version": "v2"}
    assert report_doc.tags["index"]["model_version"] == "v2" and report_doc.tags["index"]["count"] == GALLERY

    # /train has returned: every search now runs on the tuned version's vectors, and finds more
    state["after"] = recall_at_5(flow, gallery, "v2")
    old, new = offline_gallery(flow, gallery, "v1"), offline_gallery(flow, gallery, "v2")
    assert min(float(old[i] @ new[i]) for i in gallery.image_ids) < 0.99  # so v1's vectors would not pass
    own = post(flow, "/search", DocList[ClipDoc]([ClipDoc(id="q", tensor=gallery.images[7])]), parameters={"limit": 1})[
        0
    ]  # a stored doc's own content finds itself at cosine 1
    assert own.matches[0].id == gallery.image_ids[7] and own.scores[0] == pytest.approx(1.0, abs=1e-4)
    state["report"] = report
    print(
        f"\ngallery caption→image recall@5: before {state['before']:.3f}, after {state['after']:.3f} "
        f"({GALLERY} images); /train report t2i_r5 {report['before']['t2i_r5']:.3f} → "
        f"{report['after']['t2i_r5']:.3f}; {report['samples_per_s']:.1f} samples/s"
    )
    chance = 5 / GALLERY
    assert state["after"] >= state["before"] + 0.15, (state["before"], state["after"])
    assert state["after"] >= 4 * chance


def test_status_reports_versions_count_and_training(flow, state):
    status = by_id(post(flow, "/status"))
    assert set(status) == {"status-tuner", "status-encoder", "status-indexer"}
    tuner, encoder, indexer = status["status-tuner"], status["status-encoder"], status["status-indexer"]
    assert tuner.model_version == encoder.model_version == indexer.model_version == "v2"
    assert tuner.tags["training"]["state"] == "done" and tuner.tags["training"]["model_version"] == "v2"
    assert tuner.tags["last_report"]["after"] == state["report"]["after"]
    assert indexer.tags["count"] == GALLERY and indexer.tags["rebuilding"] is None


def test_delete_removes_docs_from_results(flow, gallery):
    gone = [gallery.image_ids[0], gallery.image_ids[1]]
    out = post(flow, "/delete", DocList[ClipDoc]([ClipDoc(id=gone[0]), ClipDoc(id=gone[1])]))
    assert [d.tags["deleted"] for d in out] == [True, True]
    everything = post(
        flow, "/search", DocList[ClipDoc]([ClipDoc(id="q", tensor=gallery.images[0])]), parameters={"limit": GALLERY}
    )[0]
    ids = [m.id for m in everything.matches]
    assert len(ids) == GALLERY - 2 and not set(gone) & set(ids)
    assert by_id(post(flow, "/status"))["status-indexer"].tags["count"] == GALLERY - 2


@pytest.mark.parametrize(
    "on, docs, parameters, message",
    [
        (
            "/encode",
            [ClipDoc(id="ok", text="fine"), ClipDoc(id="hollow")],
            None,
            "doc 'hollow': has neither text nor an image",
        ),
        ("/index", [ClipDoc(id="garbled", blob=b"\x89PNG\r\n\x1a\n garbage")], None, "doc 'garbled'.*cannot decode"),
        (
            "/search",
            [ClipDoc(id="flat", tensor=np.zeros((8, 8), np.uint8))],
            {"limit": 3},
            "doc 'flat': tensor must be an H×W×3 uint8 image, got shape \\(8, 8\\)",
        ),
        ("/search", [ClipDoc(id="q", text="a star")], {"limit": 3, "topk": 3}, "unknown parameter\\(s\\) \\['topk'\\]"),
        (
            "/train",
            [ClipDoc(id="p", text="a star", tensor=np.zeros((8, 8, 3), np.uint8))],
            {"epochs": 1, "lr": 0.1},
            "unknown parameter\\(s\\) \\['lr'\\] for /train",
        ),
    ],
)
def test_bad_input_gets_a_named_error_and_the_service_goes_on(flow, gallery, on, docs, parameters, message):
    with ServerError(message):
        post(flow, on, DocList[ClipDoc](docs), parameters=parameters or {})
    hits = post(
        flow, "/search", DocList[ClipDoc]([ClipDoc(id="q", tensor=gallery.images[5])]), parameters={"limit": 1}
    )[0]
    assert hits.matches[0].id == gallery.image_ids[5]  # the next valid request is served, nothing was lost
    assert by_id(post(flow, "/status"))["status-indexer"].tags["count"] == GALLERY - 2


def test_restart_keeps_the_index_and_the_tuned_model(flow, gallery):
    queries = caption_queries(gallery)[2:12]
    texts = {q.id: q.text for q in queries}
    before = post(flow, "/search", queries, parameters={"limit": 5})
    flow.stop()
    flow.start()
    status = by_id(post(flow, "/status"))
    assert {d.model_version for d in status.values()} == {"v2"}
    assert status["status-indexer"].tags["count"] == GALLERY - 2
    after = post(flow, "/search", caption_queries(gallery)[2:12], parameters={"limit": 5})
    assert_scored_by(flow, gallery, "v2", after, texts)  # the tuned vectors were kept, not re-made by v1
    after = by_id(after)
    for b in before:
        a = after[b.id]
        assert [m.id for m in a.matches] == [m.id for m in b.matches]
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_the_encoder_runs_alone_as_a_microservice(tmp_path, tiny_model_dir):
    """``jina executor --uses CLIPEncoder``: the encoder as its own gRPC service on a shared workspace."""
    Registry(tmp_path / "models").publish(tiny_model_dir)
    encoder = ExecutorProcess("CLIPEncoder", tmp_path, tmp_path / "encoder.log", {"bootstrap": False, "device": "cpu"})
    encoder.start()
    try:
        out = encoder.post("/encode", DocList[ClipDoc]([ClipDoc(id="a", text="a green triangle")]))
        assert out[0].model_version == "v1" and out[0].embedding.shape == (128,)
        np.testing.assert_allclose(
            out[0].embedding, OnnxClip(tiny_model_dir).encode_text(["a green triangle"])[0], atol=1e-5
        )
        assert [d.id for d in encoder.post("/status")] == ["status-encoder"]
        with ServerError("doc 'x': has neither text nor an image"):
            encoder.post("/encode", DocList[ClipDoc]([ClipDoc(id="x")]))
    finally:
        encoder.stop()
