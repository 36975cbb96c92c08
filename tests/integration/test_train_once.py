"""A synchronous /train is answered once, by the run it started: over a long quiet connection, and when sent again.

One `cliptuner serve` whose gateway pings its Executors every second (``CLIPTUNER_GRPC_KEEPALIVE_MS=1000``, ten times
Jina's rate, so that a minute of training is as many pings as ten minutes at the default). Without keepalive options
on the servers that gRPC reads, the tuner's server would close the connection after its third ping and the gateway
would re-send the /train (tests/unit/test_keepalive.py shows that cut on a plain gRPC server).

``SLOW_EPOCHS`` makes the run last over three minutes: `pytest -m slow tests/integration/test_train_once.py`.
"""

import asyncio
import time

import pytest
from docarray import DocList
from service import FlowProcess, by_id, post_async

from cliptuner.model.registry import Registry
from cliptuner.train import synthetic
from executors.schemas import ClipDoc

PAIRS = 48
EPOCHS = 150  # about a minute of training on 2 CPUs (2 steps an epoch)
SLOW_EPOCHS = 600


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("once-workspace")
    server = FlowProcess(workspace, workspace.parent / "flow.log", env={"CLIPTUNER_GRPC_KEEPALIVE_MS": "1000"})
    server.start()
    yield server
    server.stop()


def pairs(seed: int) -> DocList[ClipDoc]:
    scenes = synthetic.generate(PAIRS, domain="domain", seed=seed)
    return DocList[ClipDoc](
        [
            ClipDoc(id=f"p{i}", text=caption, tensor=scenes.images[scenes.image_index[i]])
            for i, caption in enumerate(scenes.captions)
        ]
    )


def parameters(epochs: int) -> dict:
    return {"epochs": epochs, "batch_size": 16, "eval_fraction": 0.25, "seed": 0}


def held_open(served: FlowProcess, docs: DocList[ClipDoc], params: dict) -> tuple[dict, list]:
    """Send a synchronous /train and, while it runs, the same request again (twice: not waiting, and waiting).

    Returns the first call's report and what the repeats got: the run doc of ``wait=False``
    and the report of the second synchronous call.
    """

    async def scenario():
        first = asyncio.create_task(post_async(served.port, "/train", docs, parameters=params))
        deadline = time.monotonic() + 300
        while True:  # until the run is training
            status = by_id(await post_async(served.port, "/status"))["status-tuner"].tags["training"]
            if status.get("step"):
                break
            assert not first.done() and time.monotonic() < deadline, served.log_tail()
            await asyncio.sleep(0.5)
        detached = (await post_async(served.port, "/train", docs, parameters={**params, "wait": False}))[0]
        assert detached.tags["run_id"] == status["run_id"] and detached.tags["state"] == "running"
        again = (await post_async(served.port, "/train", docs, parameters=params))[0]  # once the run has published
        report = (await first)[0].tags["report"]
        return report, [detached, again]

    return asyncio.run(scenario())


def check_once(served: FlowProcess, versions_before: list, report: dict, repeats: list) -> None:
    registry = Registry(served.workspace / "models")
    assert registry.versions() == [*versions_before, report["model_version"]]  # one run, one new version
    assert repeats[1].tags["report"] == report
    log = served.log_path.read_text(errors="replace")
    assert "too_many_pings" not in log and "GOAWAY" not in log
    # the tuner saw this request three times: its own two repeats, never a re-send by the gateway
    assert log.count(f"request {report['request_id']} arrived again") == 2, served.log_tail()


def test_a_synchronous_train_outlives_a_minute_of_pings_and_a_repeat_follows_its_run(served):
    before = Registry(served.workspace / "models").versions()
    report, repeats = held_open(served, pairs(seed=3), parameters(EPOCHS))
    check_once(served, before, report, repeats)
    assert report["request_id"].startswith("derived-") and report["epochs"] == EPOCHS


@pytest.mark.slow
def test_a_synchronous_train_outlives_minutes_of_pings(served):
    before = Registry(served.workspace / "models").versions()
    report, repeats = held_open(served, pairs(seed=4), parameters(SLOW_EPOCHS))
    check_once(served, before, report, repeats)
    assert report["epochs"] == SLOW_EPOCHS
