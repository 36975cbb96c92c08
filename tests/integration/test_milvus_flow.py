"""The service on the Milvus vector store: `cliptuner serve --index-backend milvus` indexes, searches with and
without a tag filter, and moves to the version a /train publishes — the index re-embedded into the new version's
Milvus collection and the alias switched before /train answers — then keeps its collection across a restart.

Twice: on Milvus Lite (in the indexer's process, on a file in the workspace), and on a Milvus server reached over
TCP (`--milvus-uri http://127.0.0.1:PORT`: milvus-lite's gRPC server in a child process, up across the restart).
"""

import contextlib

import numpy as np
import pytest
from docarray import DocList
from milvus_server import MilvusServer
from pymilvus import MilvusClient
from service import FlowProcess, by_id, png, post

from cliptuner.model.registry import Registry
from cliptuner.model.runtime import OnnxClip
from cliptuner.train import synthetic
from executors.schemas import ClipDoc

GALLERY = 40


def serve(workspace, log, milvus_uri=None) -> FlowProcess:
    uri_args = ["--milvus-uri", milvus_uri] if milvus_uri else []
    server = FlowProcess(workspace, log, args=["--index-backend", "milvus", *uri_args])
    server.start()
    return server


def live_count(uri: str) -> int:
    """Rows of the collection that the alias ``cliptuner`` names, asked of the Milvus server directly."""
    client = MilvusClient(uri=uri)
    try:
        live = client.describe_alias("cliptuner")["collection_name"]
        return client.query(live, filter="", output_fields=["count(*)"])[0]["count(*)"]
    finally:
        client.close()


def top_ids(server, gallery, i: int, **filters) -> list[str]:
    parameters = {"limit": 5, **({"filter": filters} if filters else {})}
    return [
        m.id
        for m in post(
            server, "/search", DocList[ClipDoc]([ClipDoc(id="q", tensor=gallery.images[i])]), parameters=parameters
        )[0].matches
    ]


@pytest.mark.parametrize("milvus", ["lite", "server"])
def test_index_search_filter_train_and_restart_on_milvus(tmp_path, milvus):
    with contextlib.ExitStack() as stack:
        uri = None
        if milvus == "server":
            uri = stack.enter_context(MilvusServer(tmp_path / "milvus", tmp_path / "milvus.log")).uri
        run_index_search_filter_train_and_restart(tmp_path, uri)
        lite_files = list((tmp_path / "ws" / "index").rglob("milvus.db"))
        if uri is None:
            assert lite_files
        else:  # the vectors are on the server, nothing of Milvus in the workspace
            assert not lite_files and live_count(uri) == GALLERY


def run_index_search_filter_train_and_restart(tmp_path, milvus_uri) -> None:
    gallery = synthetic.generate(GALLERY, domain="domain", seed=101)
    pairs = synthetic.generate(96, domain="domain", seed=202)
    workspace = tmp_path / "ws"
    server = serve(workspace, tmp_path / "flow.log", milvus_uri)
    try:
        assert by_id(post(server, "/status"))["status-indexer"].tags["backend"] == "milvus"
        post(
            server,
            "/index",
            DocList[ClipDoc](
                [
                    ClipDoc(id=image_id, blob=png(image), tags={"half": "even" if i % 2 == 0 else "odd"})
                    for i, (image_id, image) in enumerate(zip(gallery.image_ids, gallery.images))
                ]
            ),
        )
        assert top_ids(server, gallery, 3)[0] == gallery.image_ids[3]
        odd = top_ids(server, gallery, 3, **{"tags.half": "odd"})
        assert odd[0] == gallery.image_ids[3] and all(int(i[-5:]) % 2 == 1 for i in odd)
        assert all(int(i[-5:]) % 2 == 0 for i in top_ids(server, gallery, 3, **{"tags.half": "even"}))

        report = post(
            server,
            "/train",
            DocList[ClipDoc](
                [
                    ClipDoc(id=f"p{i}", text=caption, tensor=pairs.images[pairs.image_index[i]])
                    for i, caption in enumerate(pairs.captions)
                ]
            ),
            parameters={"epochs": 2, "batch_size": 16, "eval_fraction": 0.25, "seed": 0, "gate": False},
            request_size=len(pairs),
        )[0]
        assert report.tags["index"]["model_version"] == "v2" and report.tags["index"]["count"] == GALLERY
        # /train has answered: searches run on v2's vectors, which differ from v1's
        v2 = OnnxClip(Registry(workspace / "models").path("v2"), device="cpu", intra_op_threads=1)
        query = DocList[ClipDoc]([ClipDoc(id="q", text=gallery.captions[5])])
        found = post(server, "/search", query, parameters={"limit": 3})[0]
        assert found.model_version == "v2"
        images = dict(zip(gallery.image_ids, v2.encode_images(gallery.images)))
        expected = [float(v2.encode_text([gallery.captions[5]])[0] @ images[m.id]) for m in found.matches]
        np.testing.assert_allclose(found.scores, expected, atol=1e-4)
        before_restart = top_ids(server, gallery, 7)
    finally:
        server.stop()

    server = serve(workspace, tmp_path / "flow.log", milvus_uri)  # the collection and its version survive a restart
    try:
        status = by_id(post(server, "/status"))["status-indexer"]
        assert (status.model_version, status.tags["count"]) == ("v2", GALLERY)
        assert top_ids(server, gallery, 7) == before_restart
    finally:
        server.stop()
