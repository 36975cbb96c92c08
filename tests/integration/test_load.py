"""Load during a model swap: 8 concurrent gRPC clients send mixed /encode and /search requests for the whole of a
/train, and nothing fails or mixes versions.

Every answer is checked independently: an /encode result must equal the offline embedding (ONNX Runtime, in the
test process) of the version it names, and every /search score must equal the cosine of that version's offline
embeddings of the query text and of the matched gallery image. The clients are asyncio clients in one event loop
(blocking clients in threads are sent one after another by this jina/grpcio), each in a bounded loop that ends
when the /train answer has come and every client has sent at least one request after it.
"""

import asyncio
import time
from collections import Counter

import numpy as np
import pytest
from docarray import DocList
from service import post_async, serve_gallery

from cliptuner.model.registry import Registry
from cliptuner.model.runtime import OnnxClip
from cliptuner.train import synthetic
from executors.schemas import ClipDoc

CLIENTS = 8
GALLERY = 24
DEADLINE_S = 900.0
QUERIES = ["a red circle", "two blue squares on the left", "a large teal star", "a small green triangle"]


@pytest.fixture(scope="module")
def gallery():
    return synthetic.generate(GALLERY, domain="domain", seed=404)


@pytest.fixture(scope="module")
def flow(tmp_path_factory, gallery):
    server = serve_gallery(tmp_path_factory.mktemp("load-workspace"), gallery)
    yield server
    server.stop()


async def client_loop(port: int, number: int, gallery, training: asyncio.Task, log: list) -> None:
    """Alternate /encode and /search until /train has answered and one more request went through."""
    sent_after_training = False
    step = 0
    started = time.monotonic()
    while not sent_after_training and time.monotonic() - started < DEADLINE_S:
        after = training.done()
        text = QUERIES[(number + step) % len(QUERIES)]
        try:
            if step % 2 == 0:
                docs = DocList[ClipDoc](
                    [ClipDoc(id="t", text=text), ClipDoc(id="i", tensor=gallery.images[(number + step) % GALLERY])]
                )
                out = await post_async(port, "/encode", docs)
                log.append(("encode", number, step, after, out, (number + step) % GALLERY, text))
            else:
                out = await post_async(
                    port, "/search", DocList[ClipDoc]([ClipDoc(id="q", text=text)]), parameters={"limit": 5}
                )
                log.append(("search", number, step, after, out, None, text))
        except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
            log.append(("failed", number, step, after, repr(exc), None, text))
        sent_after_training = after
        step += 1


def test_mixed_clients_see_no_failure_and_no_mixed_versions_across_a_train(flow, gallery):
    pairs = synthetic.generate(160, domain="domain", seed=505, captions_per_image=2)
    train_docs = DocList[ClipDoc](
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
    log: list = []

    async def scenario():
        training = asyncio.create_task(
            post_async(
                flow.port,
                "/train",
                train_docs,
                request_size=len(train_docs),
                parameters={
                    "epochs": 2,
                    "batch_size": 32,
                    "learning_rate": 1e-3,
                    "warmup_steps": 2,
                    "seed": 0,
                    "gate": False,
                },
            )
        )
        await asyncio.gather(*(client_loop(flow.port, n, gallery, training, log) for n in range(CLIENTS)))
        return await training

    report = asyncio.run(scenario())[0].tags["report"]
    new_version = report["model_version"]

    failures = [entry for entry in log if entry[0] == "failed"]
    assert not failures, failures[:5]
    kinds = Counter((entry[0], entry[3]) for entry in log)
    assert kinds[("encode", False)] and kinds[("search", False)], kinds  # requests were served during /train
    assert {entry[1] for entry in log if entry[3]} == set(range(CLIENTS))  # and by every client after it

    registry = Registry(flow.workspace / "models")
    clips = {v: OnnxClip(registry.path(v), device="cpu", intra_op_threads=1) for v in ("v1", new_version)}
    images = {v: dict(zip(gallery.image_ids, clip.encode_images(gallery.images))) for v, clip in clips.items()}
    versions_after = set()
    for kind, number, step, after, out, image, text in log:
        if kind == "encode":
            text_doc, image_doc = out[0], out[1]
            assert text_doc.model_version == image_doc.model_version, "one request, one version"
            clip = clips[text_doc.model_version]
            np.testing.assert_allclose(text_doc.embedding, clip.encode_text([text])[0], atol=1e-5)
            np.testing.assert_allclose(image_doc.embedding, clip.encode_images([gallery.images[image]])[0], atol=1e-5)
            version = text_doc.model_version
        else:
            query = out[0]
            version = query.model_version
            assert {m.model_version for m in query.matches} == {version}
            expected = [float(clips[version].encode_text([text])[0] @ images[version][m.id]) for m in query.matches]
            np.testing.assert_allclose(query.scores, expected, atol=1e-4, err_msg=f"client {number} step {step}")
        if after:
            versions_after.add(version)
    assert versions_after == {new_version}  # once /train has answered, everyone is served by the tuned version
