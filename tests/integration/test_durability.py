"""An acknowledged ``/index`` survives ``kill -9`` of the indexer process.

The indexer runs alone, as its own process (``jina executor --uses CLIPIndexer`` on 127.0.0.1, in its own process
group), with the HNSW backend, so that the index it searches after a restart is a cache rebuilt from the
database. A client indexes small text docs in a loop, a few per request; at a random moment the process group
gets SIGKILL. The indexer is started again on the same workspace, and every doc whose ``/index`` was answered
must be stored and found first by a search with its own text (cosine 1). The request the kill interrupted is
all or nothing.
"""

import random
import threading
import time
from pathlib import Path

import pytest
from docarray import DocList
from service import ExecutorProcess, by_id

from cliptuner.model.registry import Registry
from executors.schemas import ClipDoc

DOCS_PER_REQUEST = 4
MAX_REQUESTS = 400  # the kill comes long before; the loop is bounded anyway
WORDS = (
    "amber",
    "basalt",
    "cedar",
    "dune",
    "ember",
    "fjord",
    "garnet",
    "heron",
    "indigo",
    "jasper",
    "kelp",
    "lichen",
    "marble",
    "nectar",
    "onyx",
    "pine",
    "quartz",
    "raven",
    "sage",
    "tundra",
    "umber",
    "violet",
    "willow",
    "xenon",
    "yarrow",
    "zinc",
)


def text_of(n: int) -> str:
    """A short caption of its own for doc ``n``."""
    rng = random.Random(n)
    return f"doc {n}: " + " ".join(rng.choice(WORDS) for _ in range(4))


class IndexerProcess(ExecutorProcess):
    """The indexer alone, with the HNSW backend (its index a cache rebuilt from the database at start)."""

    def __init__(self, workspace: Path, log_path: Path) -> None:
        super().__init__(
            "CLIPIndexer",
            workspace,
            log_path,
            {"bootstrap": False, "device": "cpu", "intra_op_threads": 1, "backend": "usearch", "watch_interval": 0},
        )


@pytest.fixture
def indexer_process(tmp_path, tiny_model_dir):
    Registry(tmp_path / "models").publish(tiny_model_dir)  # v1
    server = IndexerProcess(tmp_path, tmp_path / "indexer.log")
    yield server
    server.stop()


def test_acknowledged_index_requests_survive_kill_9(indexer_process):
    server = indexer_process
    server.start()
    acknowledged: list[int] = []
    in_flight: list[int] = []
    killed = threading.Event()
    first_ack = threading.Event()
    delay = random.Random().uniform(1.0, 4.0)  # a different moment on every run

    def killer() -> None:
        first_ack.wait(60)
        time.sleep(delay)
        server.kill()
        killed.set()

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    for request in range(MAX_REQUESTS):
        numbers = list(range(request * DOCS_PER_REQUEST, (request + 1) * DOCS_PER_REQUEST))
        docs = DocList[ClipDoc]([ClipDoc(id=f"d{n}", text=text_of(n), tags={"n": n}) for n in numbers])
        in_flight = numbers
        try:
            out = server.post("/index", docs)
        except Exception:  # noqa: BLE001 - the process died under the request
            assert killed.wait(30), f"an /index failed before the kill:\n{server.log_tail()}"
            break
        assert sorted(d.id for d in out) == sorted(f"d{n}" for n in numbers)
        acknowledged += numbers
        in_flight = []
        first_ack.set()
    else:
        in_flight = []
    first_ack.set()
    thread.join(90)
    assert killed.is_set() and server.proc.poll() is not None
    assert acknowledged, "no /index was answered before the kill"

    server.start()  # the same workspace
    count = by_id(server.post("/status"))["status-indexer"].tags["count"]
    # the interrupted request is all or nothing
    assert count in (len(acknowledged), len(acknowledged) + len(in_flight)), (count, len(acknowledged))
    found = {}
    for start in range(0, len(acknowledged), 50):
        numbers = acknowledged[start : start + 50]
        queries = DocList[ClipDoc]([ClipDoc(id=f"q{n}", text=text_of(n)) for n in numbers])
        for query in server.post("/search", queries, parameters={"limit": 1}):
            found[query.id] = (query.matches[0].id, query.scores[0], query.matches[0].tags)
    print(f"\n{len(acknowledged)} docs acknowledged before the kill, {count} stored after the restart")
    for n in acknowledged:
        doc_id, score, tags = found[f"q{n}"]
        assert doc_id == f"d{n}" and score == pytest.approx(1.0, abs=1e-4), (n, doc_id, score)
        assert tags == {"n": n}
