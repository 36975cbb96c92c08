"""The feedback log (:mod:`cliptuner.serve.feedback`): events and doc contents read back as written, a retry stored
once, a reused event id with other content refused, every bad event refused by name, images kept once, two
processes appending at once, reading from a sequence number; then the indexer's ``/feedback`` called as a plain
object: the shown docs' content copied from the index (text, blob, tensor, uri), unknown ids refused, and two
shards each checking and copying the docs they own."""

import io
import multiprocessing
import sqlite3
import time

import numpy as np
import pytest
from docarray import DocList
from PIL import Image
from support import png, run

from cliptuner.index.shards import shard_of
from cliptuner.serve.feedback import (
    DB_NAME,
    FEEDBACK_SUBDIR,
    MAX_SHOWN,
    DocContent,
    FeedbackConflict,
    FeedbackEvent,
    FeedbackLog,
    FeedbackUnavailable,
    event_of,
)
from executors.schemas import ClipDoc
from executors.shards import TRAILER_ID

PIXELS = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
IMAGE = png(PIXELS)
OTHER_IMAGE = png(255 - PIXELS)


def event(event_id="e1", **fields) -> FeedbackEvent:
    values = {"shown": ("a", "b", "c"), "chosen": ("b",), "wrong": ("a",), "query_text": "a red shoe"}
    values.update(fields)
    return FeedbackEvent(event_id=event_id, **values)


@pytest.fixture
def log(tmp_path):
    with FeedbackLog(tmp_path / FEEDBACK_SUBDIR) as opened:
        yield opened


def image_rows(root) -> int:
    with sqlite3.connect(root / DB_NAME) as db:
        return db.execute("SELECT COUNT(*) FROM images").fetchone()[0]


# -- the log ---------------------------------------------------------------------------------------------------------
def test_an_event_and_its_contents_read_back_as_recorded(log, tmp_path):
    sent = event(query_image=IMAGE, model_version="v3")
    contents = {"a": DocContent("a", text="a red shoe"), "b": DocContent("b", image=OTHER_IMAGE)}
    before = time.time()
    assert log.record(sent, contents) is True
    [got] = log.events()
    assert got.seq == 1 and before <= got.received_at <= time.time()
    assert got.event == sent and got.event.query_image == IMAGE and got.event.shown == ("a", "b", "c")
    assert log.contents(["a", "b", "c", "zzz"]) == contents  # c has no content, zzz was never shown
    assert log.stats() == {"events": 1, "queries": 1, "last_seq": 1}
    assert (tmp_path / FEEDBACK_SUBDIR / DB_NAME).is_file()
    with sqlite3.connect(tmp_path / FEEDBACK_SUBDIR / DB_NAME) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_retry_is_stored_once_and_may_add_contents(log):
    assert log.record(event(), {"a": DocContent("a", text="first")}) is True
    # the same event again (a client's retry, or another shard writing its own docs' content)
    assert log.record(event(), {"b": DocContent("b", text="from another shard")}) is False
    assert [r.seq for r in log.events()] == [1]
    assert set(log.contents(["a", "b", "c"])) == {"a", "b"}
    # a doc's content is kept from the first event that showed it
    assert log.record(event("e2"), {"a": DocContent("a", text="changed since")}) is True
    assert log.contents(["a"])["a"].text == "first"
    assert log.stats() == {"events": 2, "queries": 1, "last_seq": 2}


def test_a_reused_event_id_with_other_content_is_a_conflict_and_stores_nothing(log):
    log.record(event(), {})
    with pytest.raises(FeedbackConflict, match=r"feedback event 'e1' was recorded before with another chosen, wrong"):
        log.record(event(chosen=("a",), wrong=("b",)), {"c": DocContent("c", text="c")})
    with pytest.raises(FeedbackConflict, match="another query_image"):
        log.record(event(query_image=IMAGE), {})
    with pytest.raises(FeedbackConflict, match="new event id"):
        # all or nothing: the first event of the batch is not kept either
        log.record_many([event("e2"), event(query_text="another query")], {})
    assert [r.event for r in log.events()] == [event()]
    assert log.contents(["c"]) == {}


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"event_id": "has space"}, r"feedback event id must be .* got 'has space'"),
        ({"event_id": ""}, "feedback event id must be"),
        ({"event_id": "x" * 129}, "feedback event id must be"),
        ({"event_id": "e1\n"}, "feedback event id must be"),
        ({"event_id": 7}, "feedback event id must be .* got 7"),
        ({"shown": "abc"}, r"'e1': shown must be a list of doc ids \(strings\), got 'abc'"),
        ({"shown": ("a", 3)}, r"shown must be a list of doc ids \(non-empty strings\), got 3 in it"),
        ({"shown": ("a", "")}, "got '' in it"),
        ({"shown": (), "chosen": (), "wrong": ()}, r"shown must name the ids shown \(at least one\)"),
        ({"shown": tuple(f"d{i}" for i in range(MAX_SHOWN + 1))}, f"shown has 101 ids, over the limit of {MAX_SHOWN}"),
        ({"shown": ("a", "b", "a")}, r"shown names \['a'\] more than once"),
        ({"chosen": ("b", "b")}, r"chosen names \['b'\] more than once"),
        ({"chosen": ("x",)}, r"chosen ids \['x'\] are not among the shown ids"),
        ({"wrong": ("y", "z")}, r"wrong ids \['y', 'z'\] are not among the shown ids"),
        ({"chosen": ("a",), "wrong": ("a",)}, r"ids \['a'\] are both chosen and wrong"),
        ({"chosen": (), "wrong": ()}, "says nothing; give at least one chosen or one wrong id"),
        ({"query_text": None}, "has no query; give the query's text or image"),
        ({"query_text": "  "}, "query_text must be a non-blank string or None, got '  '"),
        ({"query_text": 5}, "query_text must be a non-blank string or None, got 5"),
        ({"query_image": b""}, "query_image must be encoded image bytes or None, got empty bytes"),
        ({"query_image": "x.png"}, "query_image must be encoded image bytes or None, got str"),
        ({"model_version": ""}, "model_version must be a non-empty string or None, got ''"),
    ],
)
def test_every_bad_event_is_refused_naming_the_problem(fields, message):
    with pytest.raises(ValueError, match=message):
        event(**fields)


def test_lists_are_taken_as_tuples():
    got = event(shown=["a", "b"], chosen=["a"], wrong=[])
    assert got.shown == ("a", "b") and got.chosen == ("a",) and got.wrong == ()


@pytest.mark.parametrize(
    "tags, message",
    [
        ({"chosen": ["a"]}, r"doc 'e1': tags\['shown'\] must list the ids shown"),
        ({"shown": "a,b", "chosen": ["a"]}, r"doc 'e1': tags\['shown'\] must be a list of doc ids"),
        (
            {"shown": ["a", 1.0], "chosen": ["a"]},
            r"tags\['shown'\] must be a list of doc ids \(non-empty strings\), got 1.0",
        ),
        ({"shown": ["a"], "chosen": {"a": 1}}, r"tags\['chosen'\] must be a list of doc ids"),
        ({"shown": ["a"], "chosen": ["a"], "colour": "red"}, r"unknown tags \['colour'\] for /feedback"),
        ({"shown": ["a", "a"], "chosen": ["a"]}, r"tags\['shown'\] names \['a'\] more than once"),
        ("shown", "doc 'e1': tags must be a mapping"),
    ],
)
def test_the_tags_of_a_feedback_doc_are_checked_by_name(tags, message):
    with pytest.raises(ValueError, match=message):
        event_of("e1", tags, "a query")


def test_event_of_takes_a_blank_text_as_none():
    got = event_of("e1", {"shown": ["a"], "wrong": ["a"]}, "  ", IMAGE, "v1")
    assert got.query_text is None and got.query_image == IMAGE and got.chosen == () and got.model_version == "v1"


def test_bad_contents_are_refused(log):
    with pytest.raises(ValueError, match=r"contents\['a'\] must be the DocContent of doc 'a'"):
        log.record(event(), {"a": DocContent("b", text="b")})
    with pytest.raises(ValueError, match=r"contents of docs no event showed: \['zzz'\]"):
        log.record(event(), {"zzz": DocContent("zzz", text="z")})
    with pytest.raises(ValueError, match="has neither text nor an image"):
        DocContent("a")
    with pytest.raises(ValueError, match="expected a FeedbackEvent"):
        log.record({"event_id": "e1"}, {})
    assert log.events() == []


def test_images_are_kept_once_whichever_events_and_docs_share_them(log, tmp_path):
    log.record(event("e1", query_image=IMAGE), {"a": DocContent("a", image=IMAGE), "b": DocContent("b", image=IMAGE)})
    log.record(event("e2", query_text=None, query_image=IMAGE), {"c": DocContent("c", text="c", image=OTHER_IMAGE)})
    assert image_rows(tmp_path / FEEDBACK_SUBDIR) == 2
    got = log.contents(["a", "b", "c"])
    assert got["a"].image == got["b"].image == IMAGE and got["c"] == DocContent("c", "c", OTHER_IMAGE)
    assert [r.event.query_image for r in log.events()] == [IMAGE, IMAGE]
    # e1: text and image; e2: the image alone: two distinct queries
    assert log.stats() == {"events": 2, "queries": 2, "last_seq": 2}


def test_events_after_a_sequence_number(log):
    for i in range(5):
        log.record(event(f"e{i}", query_text=f"query {i % 3}"), {})
    assert [r.seq for r in log.events(after_seq=3)] == [4, 5]
    assert [r.event.event_id for r in log.events(after_seq=3)] == ["e3", "e4"]
    assert log.events(after_seq=5) == []
    assert [r.seq for r in log.events(after_seq=1, limit=2)] == [2, 3]  # a page
    with pytest.raises(ValueError, match="limit must be an integer >= 1 or None, got 0"):
        log.events(limit=0)
    assert log.stats() == {"events": 5, "queries": 3, "last_seq": 5}
    for bad in (-1, 1.0, True, "2"):
        with pytest.raises(ValueError, match="after_seq must be an integer >= 0"):
            log.events(after_seq=bad)


def test_a_closed_log_says_so(tmp_path):
    log = FeedbackLog(tmp_path / "fb")
    log.close()
    log.close()
    with pytest.raises(ValueError, match="feedback log feedback.db is closed"):
        log.record(event(), {})


def _append(root, writer: int, n: int, start) -> None:
    """A writer process: open the log when told to, and record ``n`` events of its own, each with a content."""
    start.wait(60)
    with FeedbackLog(root) as log:
        for i in range(n):
            doc_id = f"w{writer}-d{i}"
            sent = FeedbackEvent(f"w{writer}-e{i}", shown=(doc_id, "shared"), chosen=(doc_id,), query_text=f"q{i}")
            assert log.record(
                sent, {doc_id: DocContent(doc_id, text=f"text {i}"), "shared": DocContent("shared", image=IMAGE)}
            )


def test_two_processes_appending_at_once_keep_every_event(tmp_path):
    root, n = tmp_path / FEEDBACK_SUBDIR, 60
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    writers = [context.Process(target=_append, args=(root, w, n, start)) for w in range(2)]
    for process in writers:
        process.start()
    start.set()  # both open the fresh file and write at the same time
    for process in writers:
        process.join(120)
    assert [process.exitcode for process in writers] == [0, 0]
    with FeedbackLog(root) as log:
        recorded = log.events()
        assert [r.seq for r in recorded] == list(range(1, 2 * n + 1))
        assert {r.event.event_id for r in recorded} == {f"w{w}-e{i}" for w in range(2) for i in range(n)}
        for w in range(2):  # each writer's events in the order it wrote them
            mine = [r.event.event_id for r in recorded if r.event.event_id.startswith(f"w{w}-")]
            assert mine == [f"w{w}-e{i}" for i in range(n)]
        assert len(log.contents([f"w{w}-d{i}" for w in range(2) for i in range(n)])) == 2 * n
        assert log.contents(["shared"])["shared"].image == IMAGE
    assert image_rows(root) == 1


# -- the indexer's /feedback, as a plain object ------------------------------------------------------------------
def feedback_doc(event_id, shown, chosen=(), wrong=(), **fields) -> ClipDoc:
    tags = {"shown": list(shown), "chosen": list(chosen), "wrong": list(wrong)}
    return ClipDoc(id=event_id, tags=tags, **fields)


def test_the_indexer_records_an_event_with_the_content_of_the_shown_docs(indexer, workspace):
    data = workspace / "data"
    data.mkdir(exist_ok=True)
    (data / "c.png").write_bytes(OTHER_IMAGE)
    gallery = DocList[ClipDoc](
        [
            ClipDoc(id="text", text="a red shoe"),
            ClipDoc(id="blob", blob=IMAGE, text="caption of blob"),
            ClipDoc(id="tensor", tensor=PIXELS),
            ClipDoc(id="uri", uri="c.png"),
        ]
    )
    run(indexer.index(docs=gallery))
    query = DocList[ClipDoc]([ClipDoc(id="q", text="a red shoe")])
    answer = run(indexer.search(docs=query, parameters={"limit": 4}))[0]
    shown = [m.id for m in answer.matches]
    sent = DocList[ClipDoc](
        [
            feedback_doc("ev-1", shown, chosen=["text"], wrong=["tensor"], text="a red shoe", model_version="v1"),
            feedback_doc("ev-2", ["uri", "blob"], chosen=["uri"], tensor=PIXELS),
        ]
    )
    out = run(indexer.feedback_event(docs=sent))
    assert [d.id for d in out] == ["ev-1", "ev-2"]
    assert [d.tags["feedback"] for d in out] == [
        {"event_id": "ev-1", "stored": True},
        {"event_id": "ev-2", "stored": True},
    ]
    assert out[1].tensor is None and out[1].blob is None  # no image bytes sent back
    log = FeedbackLog(workspace / FEEDBACK_SUBDIR)
    try:
        first, second = (r.event for r in log.events())
        assert first == FeedbackEvent("ev-1", tuple(shown), ("text",), ("tensor",), "a red shoe", None, "v1")
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(second.query_image))), PIXELS)  # a tensor as a PNG
        got = log.contents(["text", "blob", "tensor", "uri"])
        assert got["text"] == DocContent("text", "a red shoe")
        assert got["blob"] == DocContent("blob", "caption of blob", IMAGE)  # the stored blob as it is
        assert got["uri"] == DocContent("uri", None, OTHER_IMAGE)  # the file the uri names
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(got["tensor"].image))), PIXELS)
    finally:
        log.close()
    # the same request again: a retry, stored once
    again = run(indexer.feedback_event(docs=sent))
    assert [d.tags["feedback"]["stored"] for d in again] == [False, False]


@pytest.mark.parametrize(
    "docs, parameters, message",
    [
        (
            [feedback_doc("e", ["text", "nope"], chosen=["text"], text="q")],
            None,
            r"shown ids \['nope'\] are not in the index",
        ),
        ([feedback_doc("e", ["text"], chosen=["text"])], None, "has no query"),
        ([feedback_doc("e", ["text"], chosen=["text"], blob=b"not an image")], None, r"doc 'e'.*cannot decode"),
        ([feedback_doc("e", ["text"], chosen=["text"], uri="/etc/passwd")], None, r"doc 'e': uri is not allowed"),
        (
            [
                feedback_doc("e", ["text"], chosen=["text"], text="q"),
                feedback_doc("e", ["text"], wrong=["text"], text="q"),
            ],
            None,
            r"event ids given more than once in one /feedback request: 'e' \(2 times\)",
        ),
        (
            [feedback_doc("e", ["text"], chosen=["text"], text="q")],
            {"limit": 3.0},
            r"unknown parameter\(s\) \['limit'\] for /feedback",
        ),
        ([feedback_doc("e", ["text"], chosen=["text"], text="x" * 20_000)], None, "over the limit"),
    ],
)
def test_the_indexer_refuses_bad_feedback_and_records_nothing(indexer, workspace, docs, parameters, message):
    run(indexer.index(docs=DocList[ClipDoc]([ClipDoc(id="text", text="a red shoe")])))
    with pytest.raises(ValueError, match=message):
        run(indexer.feedback_event(docs=DocList[ClipDoc](docs), parameters=parameters))
    with FeedbackLog(workspace / FEEDBACK_SUBDIR) as log:
        assert log.events() == [] and log.contents(["text"]) == {}


def test_each_shard_checks_and_copies_the_docs_it_owns(workspace):
    from executors import CLIPIndexer

    shards = [
        CLIPIndexer(
            workspace=str(workspace),
            bootstrap=False,
            bootstrap_timeout=1,
            watch_interval=0,
            runtime_args={"shard_id": s, "shards": 2},
        )
        for s in range(2)
    ]
    try:
        ids = [f"d{i}" for i in range(8)]
        for shard in shards:
            run(shard.index(docs=DocList[ClipDoc]([ClipDoc(id=i, text=f"caption {i}") for i in ids])))
        owner = {i: shard_of(i, 2) for i in ids}
        assert set(owner.values()) == {0, 1}

        def sent(event_id, shown):
            return DocList[ClipDoc]([feedback_doc(event_id, shown, chosen=shown[:1], text="q")])

        answers = [run(shard.feedback_event(docs=sent("ev", ids))) for shard in shards]
        for s, answer in enumerate(answers):
            assert [d.id for d in answer] == ["ev", TRAILER_ID] and answer[1].tags["shard"] == s
            assert "error" not in answer[1].tags and answer[1].tags["positions"] == [0]
        assert sorted(a[0].tags["feedback"]["stored"] for a in answers) == [False, True]  # one row, written once
        with FeedbackLog(workspace / FEEDBACK_SUBDIR) as log:
            assert len(log.events()) == 1 and set(log.contents(ids)) == set(ids)  # each shard copied its own

        # an id unknown to its owner: that shard refuses (in its trailer), the other keeps the event
        unknown = next(f"x{i}" for i in range(100) if shard_of(f"x{i}", 2) == 1)
        answers = [run(shard.feedback_event(docs=sent("ev-2", ["d0", unknown]))) for shard in shards]
        assert f"shown ids ['{unknown}'] are not in the index" in answers[1][-1].tags["error"]
        assert answers[0][0].tags["feedback"]["stored"] is True and "error" not in answers[0][-1].tags
        with FeedbackLog(workspace / FEEDBACK_SUBDIR) as log:
            assert [r.event.event_id for r in log.events()] == ["ev", "ev-2"]
    finally:
        for shard in shards:
            shard.close()


def test_a_workspace_that_cannot_hold_the_log_fails_feedback_only(workspace):
    from executors import CLIPIndexer

    (workspace / FEEDBACK_SUBDIR).write_text("not a folder")  # as a read-only workspace would refuse it
    indexer = CLIPIndexer(workspace=str(workspace), bootstrap=False, bootstrap_timeout=1, watch_interval=0)
    try:
        run(indexer.index(docs=DocList[ClipDoc]([ClipDoc(id="a", text="a red shoe")])))
        with pytest.raises(FeedbackUnavailable, match="the feedback log cannot be opened: File exists$"):
            run(indexer.feedback_event(docs=DocList[ClipDoc]([feedback_doc("e", ["a"], chosen=["a"], text="q")])))
        hits = run(indexer.search(docs=DocList[ClipDoc]([ClipDoc(id="q", text="a red shoe")])))[0]
        assert [m.id for m in hits.matches] == ["a"]  # everything else is served
    finally:
        indexer.close()
