"""Dynamic batching through the gRPC Flow: 16 concurrent single-image clients share model runs, each gets the
vector of its own image, and a bad doc among them fails only its own request.

The clients are asyncio clients in one event loop (blocking clients in threads are sent one after another by this
jina/grpcio). The encoder's wait is set through ``CLIPTUNER_BATCH_WAIT_MS`` (as an operator sets it), long enough
that concurrent requests meet on this shared machine; ``/status`` shows it arrived and that runs held more than
one item.
"""

import asyncio

import numpy as np
import pytest
from docarray import DocList
from jina.excepts import BadServer
from service import FlowProcess, png, post, post_async

from cliptuner.model.registry import Registry
from cliptuner.model.runtime import OnnxClip
from cliptuner.train import synthetic
from executors.schemas import ClipDoc

CLIENTS = 16
WAIT_MS = 50


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("batching-workspace")
    server = FlowProcess(workspace, workspace.parent / "flow.log", env={"CLIPTUNER_BATCH_WAIT_MS": str(WAIT_MS)})
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def images():
    return synthetic.generate(CLIENTS, domain="domain", seed=808, image_size=72).images


def encoder_batching(flow: FlowProcess) -> dict:
    status = {doc.id: doc for doc in post(flow, "/status")}
    return status["status-encoder"].tags["batching"]


def server_messages(exc: BaseException) -> list[str]:
    """What a failed request says: the Executor's error as the client receives it."""
    assert isinstance(exc, BadServer), repr(exc)
    header = exc.args[0]
    return [header.status.description, *header.status.exception.args]


async def concurrent_encodes(port: int, requests: list[DocList]) -> list:
    return await asyncio.gather(*(post_async(port, "/encode", docs) for docs in requests), return_exceptions=True)


def test_concurrent_single_image_clients_share_runs_and_get_their_own_vectors(flow, images):
    before = encoder_batching(flow)
    requests = [DocList[ClipDoc]([ClipDoc(id=f"c{k}", blob=png(image))]) for k, image in enumerate(images)]
    answers = asyncio.run(concurrent_encodes(flow.port, requests))

    failures = [a for a in answers if isinstance(a, BaseException)]
    assert not failures, failures[:3]
    clip = OnnxClip(Registry(flow.workspace / "models").current_path(), device="cpu", intra_op_threads=1)
    reference = clip.encode_images(images)  # [CLIENTS, embed_dim]
    for k, answer in enumerate(answers):
        assert [doc.id for doc in answer] == [f"c{k}"] and answer[0].model_version == clip.version
        np.testing.assert_allclose(answer[0].embedding, reference[k], atol=1e-5)

    after = encoder_batching(flow)
    assert after["batch_wait_ms"] == WAIT_MS and after["batch_size"] == 32
    assert after["items"] - before["items"] == CLIENTS
    assert after["runs"] - before["runs"] < CLIENTS and after["largest_run"] > 1, (before, after)


def test_a_bad_doc_among_concurrent_clients_fails_only_its_own_request(flow, images):
    requests = [DocList[ClipDoc]([ClipDoc(id=f"c{k}", blob=png(image))]) for k, image in enumerate(images)]
    broken = CLIENTS // 2
    requests[broken] = DocList[ClipDoc]([ClipDoc(id="broken", blob=b"\x89PNG\r\n\x1a\n not really a png")])
    answers = asyncio.run(concurrent_encodes(flow.port, requests))

    messages = server_messages(answers[broken])
    assert any("doc 'broken'" in m and "cannot decode" in m for m in messages), messages
    clip = OnnxClip(Registry(flow.workspace / "models").current_path(), device="cpu", intra_op_threads=1)
    reference = clip.encode_images(images)
    for k, answer in enumerate(answers):
        if k == broken:
            continue
        assert not isinstance(answer, BaseException), answer
        np.testing.assert_allclose(answer[0].embedding, reference[k], atol=1e-5)
    out = asyncio.run(concurrent_encodes(flow.port, requests[:2]))  # and the service goes on
    assert all(not isinstance(a, BaseException) for a in out)
