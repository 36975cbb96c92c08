"""``/feedback`` over gRPC, through the Flow of flows/flow.yml (`cliptuner serve` on 127.0.0.1, tiny model).

One Flow serves the module: a small gallery (captions, PNG blobs, a file under the data root) is indexed, a search
is answered, and feedback on it is stored with the content of the shown docs; the same event again is a retry,
stored once; every kind of bad input gets an error naming the doc and the problem, nothing of it is stored, and
the next /search is answered. A separate test starts its own Flow, acknowledges events while the service gets
SIGKILL at a random moment, and reads the log back with :class:`cliptuner.serve.feedback.FeedbackLog`: every
acknowledged event is there.
"""

import io
import os
import random
import signal
import threading
import time

import numpy as np
import pytest
from docarray import DocList
from PIL import Image
from service import FlowProcess, ServerError, png, post

from cliptuner.serve.feedback import FEEDBACK_SUBDIR, MAX_SHOWN, DocContent, FeedbackEvent, FeedbackLog
from cliptuner.train import synthetic
from executors.schemas import ClipDoc

GALLERY = 6  # images; each also indexed as its caption


@pytest.fixture(scope="module")
def gallery():
    return synthetic.generate(GALLERY, domain="domain", seed=31, image_size=32)


@pytest.fixture(scope="module")
def flow(tmp_path_factory, gallery):
    """The Flow with the gallery indexed: ``img-i`` a PNG blob (``img-0`` a file under the data root instead) and
    ``cap-i`` its caption."""
    workspace = tmp_path_factory.mktemp("feedback")
    (workspace / "data").mkdir()
    (workspace / "data" / "img-0.png").write_bytes(png(gallery.images[0]))
    server = FlowProcess(workspace, workspace.parent / "feedback-flow.log")
    server.start()
    try:
        docs = [ClipDoc(id="img-0", uri="img-0.png")]
        docs += [ClipDoc(id=f"img-{i}", blob=png(gallery.images[i])) for i in range(1, GALLERY)]
        docs += [ClipDoc(id=f"cap-{i}", text=caption) for i, caption in enumerate(gallery.captions)]
        post(server, "/index", DocList[ClipDoc](docs))
        yield server
    finally:
        server.stop()


def feedback(event_id, shown, chosen=(), wrong=(), **fields) -> ClipDoc:
    return ClipDoc(id=event_id, tags={"shown": list(shown), "chosen": list(chosen), "wrong": list(wrong)}, **fields)


def search(flow, query: ClipDoc, limit=5) -> ClipDoc:
    return post(flow, "/search", DocList[ClipDoc]([query]), parameters={"limit": limit})[0]


def log_of(flow) -> FeedbackLog:
    return FeedbackLog(flow.workspace / FEEDBACK_SUBDIR)


def test_feedback_on_a_search_is_stored_with_the_shown_docs_content_once(flow, gallery):
    answer = search(flow, ClipDoc(id="q", text=gallery.captions[2]), limit=GALLERY * 2)
    shown = [m.id for m in answer.matches]
    assert {"img-0", "img-2", "cap-2"} <= set(shown)
    sent = feedback(
        "ev-text-1",
        shown,
        chosen=["img-2"],
        wrong=["img-0"],
        text=gallery.captions[2],
        model_version=answer.model_version,
    )
    [out] = post(flow, "/feedback", DocList[ClipDoc]([sent]))
    assert out.id == "ev-text-1" and out.tags["feedback"] == {"event_id": "ev-text-1", "stored": True}

    with log_of(flow) as log:
        [recorded] = log.events()
        assert recorded.seq == 1
        assert recorded.event == FeedbackEvent(
            "ev-text-1", tuple(shown), ("img-2",), ("img-0",), gallery.captions[2], None, "v1"
        )
        contents = log.contents(shown)
        assert set(contents) == set(shown)  # every shown doc's content, as the index holds it
        assert contents["img-2"] == DocContent("img-2", image=png(gallery.images[2]))  # the stored blob
        assert contents["img-0"] == DocContent("img-0", image=png(gallery.images[0]))  # the file its uri names
        assert contents["cap-2"] == DocContent("cap-2", text=gallery.captions[2])

    # the same event again (a retry): answered, not stored twice
    [again] = post(flow, "/feedback", DocList[ClipDoc]([sent]))
    assert again.tags["feedback"] == {"event_id": "ev-text-1", "stored": False}

    # an image query, sent as a tensor: stored PNG-encoded; no image bytes come back
    answer = search(flow, ClipDoc(id="q", tensor=gallery.images[4]))
    shown = [m.id for m in answer.matches]
    assert shown[0] == "img-4"
    sent = feedback("ev-image-1", shown, chosen=[shown[0]], tensor=gallery.images[4], model_version="v1")
    [out] = post(flow, "/feedback", DocList[ClipDoc]([sent]))
    assert out.tags["feedback"]["stored"] is True and out.tensor is None and out.blob is None
    with log_of(flow) as log:
        assert [r.event.event_id for r in log.events()] == ["ev-text-1", "ev-image-1"]
        image = log.events(after_seq=1)[0].event.query_image
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(image)).convert("RGB")), gallery.images[4])
        assert log.stats() == {"events": 2, "queries": 2, "last_seq": 2}


def test_a_reused_event_id_with_other_choices_is_refused(flow):
    sent = feedback("ev-conflict", ["cap-1", "cap-2"], chosen=["cap-1"], text="a query")
    post(flow, "/feedback", DocList[ClipDoc]([sent]))
    changed = feedback("ev-conflict", ["cap-1", "cap-2"], chosen=["cap-2"], text="a query")
    with ServerError(r"feedback event 'ev-conflict' was recorded before with another chosen"):
        post(flow, "/feedback", DocList[ClipDoc]([changed]))
    with log_of(flow) as log:
        [kept] = [r.event for r in log.events() if r.event.event_id == "ev-conflict"]
        assert kept.chosen == ("cap-1",)


TOO_MANY = [f"doc-{i}" for i in range(MAX_SHOWN + 1)]


@pytest.mark.parametrize(
    "docs, message",
    [
        (
            [feedback("bad-1", ["cap-1", "nope"], chosen=["cap-1"], text="q")],
            r"shown ids \['nope'\] are not in the index",
        ),
        ([feedback("bad-2", TOO_MANY, chosen=["cap-1"], text="q")], r"shown has 101 ids, over the limit of 100"),
        (
            [ClipDoc(id="bad-3", text="q", tags={"shown": ["cap-1", 2], "chosen": ["cap-1"]})],
            r"doc 'bad-3': tags\['shown'\] must be a list of doc ids \(non-empty strings\), got 2(\.0)? in it",
        ),
        (
            [ClipDoc(id="bad-4", text="q", tags={"shown": ["cap-1"], "chosen": "cap-1"})],
            r"doc 'bad-4': tags\['chosen'\] must be a list of doc ids \(strings\), got 'cap-1'",
        ),
        (
            [feedback("bad-5", ["cap-1", "cap-1"], chosen=["cap-1"], text="q")],
            r"tags\['shown'\] names \['cap-1'\] more than once",
        ),
        (
            [
                feedback("bad-6", ["cap-1"], chosen=["cap-1"], text="q"),
                feedback("bad-6", ["cap-1"], chosen=["cap-1"], text="q"),
            ],
            r"event ids given more than once in one /feedback request: 'bad-6'",
        ),
        (
            [feedback("bad-7", ["cap-1", "cap-2"], chosen=["cap-3"], text="q")],
            r"chosen ids \['cap-3'\] are not among the shown",
        ),
        ([feedback("bad-8", ["cap-1"], chosen=["cap-1"])], r"feedback event 'bad-8': has no query"),
        ([feedback("bad-9", ["cap-1"], text="q")], r"says nothing; give at least one chosen or one wrong id"),
        ([feedback("bad 10", ["cap-1"], chosen=["cap-1"], text="q")], r"feedback event id must be .* got 'bad 10'"),
        ([feedback("bad-11", ["cap-1"], chosen=["cap-1"], uri="../outside.png")], r"doc 'bad-11': uri is not allowed"),
        ([feedback("bad-12", ["cap-1"], chosen=["cap-1"], blob=b"not an image")], r"doc 'bad-12'.*cannot decode"),
        (
            [ClipDoc(id="bad-13", text="q", tags={"shown": ["cap-1"], "chosen": ["cap-1"], "score": 1})],
            r"unknown tags \['score'\]",
        ),
    ],
)
def test_bad_feedback_gets_a_named_error_and_the_service_goes_on(flow, gallery, docs, message):
    with log_of(flow) as log:
        before = log.stats()
    with ServerError(message):
        post(flow, "/feedback", DocList[ClipDoc](docs))
    with log_of(flow) as log:
        assert log.stats() == before  # nothing of a refused request is stored
    hits = search(flow, ClipDoc(id="q", tensor=gallery.images[3]), limit=1)
    assert hits.matches[0].id == "img-3"  # the next search is answered


# -- kill -9 -----------------------------------------------------------------------------------------------------------
MAX_EVENTS = 400  # the kill comes long before; the loop is bounded anyway


def test_acknowledged_feedback_survives_kill_9(tmp_path):
    server = FlowProcess(tmp_path / "ws", tmp_path / "flow.log")
    server.start()
    try:
        ids = [f"d{i}" for i in range(12)]
        post(server, "/index", DocList[ClipDoc]([ClipDoc(id=i, text=f"thing number {i}") for i in ids]))
        rng = random.Random()
        acknowledged: list[FeedbackEvent] = []
        in_flight: list[FeedbackEvent] = []
        killed, first_ack = threading.Event(), threading.Event()
        delay = rng.uniform(0.5, 3.0)  # a different moment on every run

        def killer() -> None:
            first_ack.wait(120)
            time.sleep(delay)
            os.killpg(server.proc.pid, signal.SIGKILL)  # the gateway and every Executor, without a chance to close
            killed.set()

        threading.Thread(target=killer, daemon=True).start()
        for n in range(MAX_EVENTS):
            shown = tuple(rng.sample(ids, 5))
            event = FeedbackEvent(f"ev-{n}", shown, (shown[n % 5],), (), f"query {n}", None, "v1")
            in_flight = [event]
            try:
                [out] = post(
                    server,
                    "/feedback",
                    DocList[ClipDoc](
                        [feedback(event.event_id, shown, event.chosen, text=event.query_text, model_version="v1")]
                    ),
                )
            except Exception:  # noqa: BLE001 - the service died under the request
                assert killed.wait(30), f"a /feedback failed before the kill:\n{server.log_tail()}"
                break
            assert out.tags["feedback"]["stored"] is True
            acknowledged.append(event)
            in_flight = []
            first_ack.set()
        first_ack.set()
        assert killed.wait(150) and server.proc.wait(30) is not None
        assert acknowledged, "no /feedback was answered before the kill"
    finally:
        server.stop()

    with FeedbackLog(tmp_path / "ws" / FEEDBACK_SUBDIR) as log:
        recorded = [r.event for r in log.events()]
        # every acknowledged event, in order, as sent; the one the kill interrupted is all or nothing
        assert recorded in (acknowledged, acknowledged + in_flight), (len(recorded), len(acknowledged))
        assert set(log.contents(ids)) == {i for e in recorded for i in e.shown}
        print(f"\n{len(acknowledged)} events acknowledged before the kill, {len(recorded)} in the log after it")
