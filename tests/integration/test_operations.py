"""Operating the service: Prometheus metrics of the gateway and every Executor, and asynchronous /train runs.

One `cliptuner serve --metrics-port P` on a fresh workspace (cliptuner-tiny, random init) serves the whole module.
The tests scrape the four Prometheus endpoints (gateway P, tuner P+1, encoder P+2, indexer P+3) before and after
traffic and check that the counters moved by what was sent; then start /train runs with ``wait: False``, follow
them through /status and the metrics, cancel one and kill the training process of another (nothing published,
CURRENT unchanged, serving goes on) and let one publish (the encoder and the indexer follow it without a /train
passing through them).
"""

import os
import signal
import time
import urllib.request

import numpy as np
import pytest
from docarray import DocList
from prometheus_client.parser import text_string_to_metric_families
from service import FlowProcess, by_id, free_ports, png, post

from cliptuner.model.registry import Registry
from cliptuner.train import synthetic
from executors.schemas import ClipDoc

MEMBERS = ("gateway", "tuner", "encoder", "indexer")  # their Prometheus ports: P, P+1, P+2, P+3
PAIRS = 96


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("ops-workspace")
    base = free_ports(len(MEMBERS))
    server = FlowProcess(workspace, workspace.parent / "flow.log", args=["--metrics-port", str(base)])
    server.start()
    server.metrics_ports = {name: base + i for i, name in enumerate(MEMBERS)}
    yield server
    server.stop()


def scrape(served: FlowProcess, member: str) -> dict:
    """``{(sample name, frozenset(labels)): value}`` of one member's Prometheus endpoint."""
    url = f"http://127.0.0.1:{served.metrics_ports[member]}/"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    """The sample ``name`` whose labels include ``labels`` (0 when absent: a counter not yet incremented)."""
    wanted = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and wanted <= ls]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else 0.0


def versions_served(samples: dict) -> list[str]:
    return sorted(
        dict(ls)["version"] for (n, ls), v in samples.items() if n == "cliptuner_model_version_info" and v == 1
    )


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def training(served: FlowProcess) -> dict:
    return by_id(post(served, "/status"))["status-tuner"].tags["training"]


@pytest.fixture(scope="module")
def pairs():
    scenes = synthetic.generate(PAIRS, domain="domain", seed=7)
    return DocList[ClipDoc](
        [
            ClipDoc(id=f"p{i}", text=caption, tensor=scenes.images[scenes.image_index[i]])
            for i, caption in enumerate(scenes.captions)
        ]
    )


def test_every_member_serves_metrics_and_they_follow_the_traffic(served):
    before = {name: scrape(served, name) for name in MEMBERS}
    assert versions_served(before["encoder"]) == versions_served(before["indexer"]) == ["v1"]
    assert versions_served(before["tuner"]) == ["v1"]
    assert value(before["indexer"], "cliptuner_index_docs") == 0

    scenes = synthetic.generate(6, domain="generic", seed=3)
    gallery = DocList[ClipDoc](
        [ClipDoc(id=f"img{i}", blob=png(image)) for i, image in enumerate(scenes.images)]
        + [ClipDoc(id="note", text="a note about nothing")]
    )
    post(served, "/index", gallery)
    post(
        served,
        "/search",
        DocList[ClipDoc]([ClipDoc(id="q1", text="a red circle"), ClipDoc(id="q2", text="a blue star")]),
        parameters={"limit": 3},
    )
    post(
        served,
        "/encode",
        DocList[ClipDoc](
            [
                ClipDoc(id="t", text="a cat"),
                ClipDoc(id="i", tensor=scenes.images[0]),
                ClipDoc(id="p", text="a pair", tensor=scenes.images[1]),
            ]
        ),
    )
    after = {name: scrape(served, name) for name in MEMBERS}

    gateway = after["gateway"]  # Jina's own request metrics of the gateway
    assert (
        value(gateway, "jina_receiving_request_seconds_count")
        - value(before["gateway"], "jina_receiving_request_seconds_count")
    ) >= 3

    encoder, was = after["encoder"], before["encoder"]
    for endpoint in ("/index", "/search", "/encode"):
        assert (
            value(encoder, "cliptuner_encode_seconds_count", endpoint=endpoint)
            - value(was, "cliptuner_encode_seconds_count", endpoint=endpoint)
        ) == 1, endpoint
    moved = {
        kind: value(encoder, "cliptuner_encoded_items_total", modality=kind)
        - value(was, "cliptuner_encoded_items_total", modality=kind)
        for kind in ("text", "image", "pair")
    }
    assert moved == {"text": 1 + 2 + 1, "image": 6 + 1, "pair": 1}  # /index, /search, /encode
    assert value(encoder, "cliptuner_encode_seconds_sum", endpoint="/encode") > value(
        was, "cliptuner_encode_seconds_sum", endpoint="/encode"
    )
    assert value(encoder, "jina_process_request_seconds_count", executor_endpoint="/encode") >= 1

    indexer = after["indexer"]
    assert value(indexer, "cliptuner_index_docs") == len(gallery)
    assert (
        value(indexer, "cliptuner_search_seconds_count") - value(before["indexer"], "cliptuner_search_seconds_count")
    ) == 1
    assert value(indexer, "cliptuner_rebuild_progress") == 0


def test_an_async_run_reports_progress_and_cancel_publishes_nothing(served, pairs):
    versions = Registry(served.workspace / "models").versions()
    answer = post(
        served,
        "/train",
        pairs,
        parameters={"wait": False, "epochs": 50, "batch_size": 16, "eval_fraction": 0.25, "seed": 0, "gate": False},
    )
    run_id = answer[0].tags["run_id"]
    assert answer[0].id == "train-run" and answer[0].tags["state"] == "running"

    progress = wait_for(
        lambda: (lambda t: t if t.get("step") else None)(training(served)),
        180,
        "the run's first optimizer steps in /status",
    )
    assert progress["run_id"] == run_id and progress["state"] == "running" and progress["phase"] == "training"
    assert progress["total_steps"] > progress["step"] > 0 and progress["loss"] > 0
    assert progress["samples_per_s"] > 0 and progress["eta_s"] >= 0 and progress["step_s"] > 0
    tuner = wait_for(
        lambda: (lambda s: s if value(s, "cliptuner_train_progress") > 0 else None)(scrape(served, "tuner")),
        30,
        "the tuner's training metrics",
    )
    assert value(tuner, "cliptuner_train_loss") > 0 and value(tuner, "cliptuner_train_step_seconds") > 0
    assert value(tuner, "cliptuner_train_samples_per_second") > 0

    cancelled = post(served, "/train/cancel", parameters={"run_id": run_id})
    assert cancelled[0].tags["run_id"] == run_id and cancelled[0].tags["state"] == "cancelled"
    assert training(served)["state"] == "cancelled"
    registry = Registry(served.workspace / "models")
    assert registry.versions() == versions and registry.current() == "v1"
    assert value(scrape(served, "tuner"), "cliptuner_train_runs_total", outcome="cancelled") == 1
    assert by_id(post(served, "/encode", DocList[ClipDoc]([ClipDoc(id="t", text="a cat")])))["t"].model_version == "v1"


def test_killing_the_training_process_fails_the_run_and_serving_goes_on(served, pairs):
    answer = post(
        served,
        "/train",
        pairs,
        parameters={"wait": False, "epochs": 50, "batch_size": 16, "eval_fraction": 0.25, "seed": 0, "gate": False},
    )
    run_id = answer[0].tags["run_id"]
    progress = wait_for(
        lambda: (lambda t: t if t.get("step") else None)(training(served)), 180, "the run's first optimizer steps"
    )
    os.killpg(os.getpgid(progress["pid"]), signal.SIGKILL)  # what an OOM kill does
    failed = wait_for(
        lambda: (lambda t: t if t.get("state") == "failed" else None)(training(served)), 60, "the run to fail"
    )
    assert failed["run_id"] == run_id and "the training process was killed by signal 9 (SIGKILL)" in failed["error"]
    registry = Registry(served.workspace / "models")
    assert registry.current() == "v1" and registry.versions() == ["v1"]
    assert post(served, "/encode", DocList[ClipDoc]([ClipDoc(id="t", text="a cat")]))[0].model_version == "v1"
    found = post(served, "/search", DocList[ClipDoc]([ClipDoc(id="q", text="a cat")]), parameters={"limit": 2})[0]
    assert len(found.matches) == 2 and found.model_version == "v1"
    assert value(scrape(served, "tuner"), "cliptuner_train_runs_total", outcome="failed") == 1


def test_an_async_run_publishes_and_the_encoder_and_indexer_follow(served, pairs):
    answer = post(
        served,
        "/train",
        pairs,
        parameters={"wait": False, "epochs": 1, "batch_size": 16, "eval_fraction": 0.25, "seed": 0, "gate": False},
    )
    run_id = answer[0].tags["run_id"]
    done = wait_for(
        lambda: (lambda t: t if t.get("state") in ("done", "failed") else None)(training(served)), 300, "the run to end"
    )
    assert done["state"] == "done" and done["run_id"] == run_id and done["model_version"] == "v2"

    def followed():  # the encoder moves at its next request (here /status), the indexer by its watcher
        status = by_id(post(served, "/status"))
        return (
            status if all(status[f"status-{name}"].model_version == "v2" for name in ("encoder", "indexer")) else None
        )

    wait_for(followed, 120, "the encoder and the indexer to serve v2")
    samples = {name: scrape(served, name) for name in ("tuner", "encoder", "indexer")}
    assert {name: versions_served(s) for name, s in samples.items()} == {name: ["v2"] for name in samples}
    assert value(samples["tuner"], "cliptuner_train_runs_total", outcome="published") == 1
    assert value(samples["indexer"], "cliptuner_rebuild_progress") == 0
    encoded = post(served, "/encode", DocList[ClipDoc]([ClipDoc(id="t", text="a cat")]))[0]
    assert encoded.model_version == "v2" and np.isclose(np.linalg.norm(encoded.embedding), 1, atol=1e-5)
