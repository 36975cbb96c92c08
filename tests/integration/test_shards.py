"""The service with a sharded index: `cliptuner serve --index-shards 2` (flows/shards.yml).

Docs are split between the shards by id; every answer comes back in request order; a merged search equals an
exact search over all the docs; a filter and a delete reach every shard; a failure on one shard fails the request
by name; and while the shards move to a new model version one after the other, under a stream of searches, no
answer mixes two versions.
"""

import threading
import time

import numpy as np
from docarray import DocList
from service import FlowProcess, ServerError, by_id, post

from cliptuner.index.shards import shard_of
from cliptuner.model.registry import Registry
from cliptuner.serve.feedback import FEEDBACK_SUBDIR, FeedbackLog
from executors.schemas import ClipDoc

DOCS = 60
SHARDS = 2
WORDS = ["red", "blue", "green", "small", "large", "round", "square", "striped", "dotted", "bright"]


def caption(i: int) -> str:
    return f"a {WORDS[i % 10]} {WORDS[(i // 10) % 10]} thing number {i}"


def search(server, texts, **parameters) -> DocList[ClipDoc]:
    return post(
        server,
        "/search",
        DocList[ClipDoc]([ClipDoc(id=f"q{i}", text=t) for i, t in enumerate(texts)]),
        parameters={"limit": 5, **parameters},
    )


def shard_states(server) -> list[dict]:
    return by_id(post(server, "/status"))["status-indexer"].tags["shards"]


def test_two_shards_split_merge_and_swap_versions_together(tmp_path, tiny_model_dir_v2):
    workspace = tmp_path / "ws"
    server = FlowProcess(workspace, tmp_path / "flow.log", args=["--index-shards", str(SHARDS)])
    server.start()
    try:
        ids = [f"d{i:03d}" for i in range(DOCS)]
        sent = DocList[ClipDoc](
            [
                ClipDoc(id=doc_id, text=caption(i), tags={"half": "odd" if i % 2 else "even"})
                for i, doc_id in enumerate(ids)
            ]
        )
        indexed = post(server, "/index", sent, request_size=DOCS)
        assert [d.id for d in indexed] == ids  # request order, each doc once, as its shard stored it
        assert all(d.model_version == "v1" and d.embedding is not None for d in indexed)

        states = shard_states(server)
        owned = [sum(shard_of(doc_id, SHARDS) == s for doc_id in ids) for s in range(SHARDS)]
        assert sorted(int(s["shard"]) for s in states) == list(range(SHARDS))
        assert [int(s["count"]) for s in sorted(states, key=lambda s: s["shard"])] == owned
        assert all(n > 0 for n in owned)
        assert by_id(post(server, "/status"))["status-indexer"].tags["count"] == DOCS

        # the merged top 5 is the exact top 5 over all docs, whichever shard holds them
        vectors = np.stack([np.asarray(d.embedding) for d in indexed])
        queries = [caption(7), caption(42), "a green square thing", "dotted"]
        found = search(server, queries)
        assert [q.id for q in found] == [f"q{i}" for i in range(len(queries))]
        for query in found:
            scores = vectors @ np.asarray(query.embedding)
            best = sorted(range(DOCS), key=lambda i: (-scores[i], ids[i]))[:5]
            assert [m.id for m in query.matches] == [ids[i] for i in best]
            np.testing.assert_allclose(query.scores, scores[best], atol=1e-5)
            assert {m.model_version for m in query.matches} == {"v1"}
        assert {shard_of(m.id, SHARDS) for q in found for m in q.matches} == set(range(SHARDS))

        odd = search(server, [caption(8)], filter={"tags.half": "odd"})[0]
        assert len(odd.matches) == 5 and all(m.tags["half"] == "odd" for m in odd.matches)

        # a delete reaches the shard of each id, and answers in request order
        gone = ["d031", "d004", "d017"]
        deleted = post(server, "/delete", DocList[ClipDoc]([ClipDoc(id=i) for i in gone]))
        assert [d.id for d in deleted] == gone and all(d.tags["deleted"] for d in deleted)
        assert by_id(post(server, "/status"))["status-indexer"].tags["count"] == DOCS - 3
        assert not {m.id for q in search(server, [caption(31), caption(4), caption(17)]) for m in q.matches} & set(gone)

        # /feedback: every shard checks and stores its own docs; one merged answer per event, stored once
        shown = [m.id for m in search(server, ["a green square thing"], limit=10)[0].matches]
        assert {shard_of(i, SHARDS) for i in shown} == set(range(SHARDS))  # the event names docs of both shards
        event = ClipDoc(
            id="ev-1",
            text="a green square thing",
            model_version="v1",
            tags={"shown": shown, "chosen": [shown[2]], "wrong": []},
        )
        answered = post(server, "/feedback", DocList[ClipDoc]([event]))
        assert [d.id for d in answered] == ["ev-1"] and answered[0].tags["feedback"] == {
            "event_id": "ev-1",
            "stored": True,
        }
        again = post(server, "/feedback", DocList[ClipDoc]([event]))
        assert again[0].tags["feedback"] == {"event_id": "ev-1", "stored": False}
        with FeedbackLog(workspace / FEEDBACK_SUBDIR) as log:
            (recorded,) = log.events()
            assert recorded.event.shown == tuple(shown) and set(log.contents(shown)) == set(shown)
        with ServerError("'d999'"):
            post(
                server,
                "/feedback",
                DocList[ClipDoc]([ClipDoc(id="ev-2", text="red", tags={"shown": ["d999"], "chosen": ["d999"]})]),
            )

        # a refusal on a shard fails the whole request, naming the id, and the service goes on
        with ServerError("'nope' not stored"):
            post(server, "/delete", DocList[ClipDoc]([ClipDoc(id="nope")]))
        with ServerError("parameter 'limit'"):
            search(server, ["red"], limit=0)
        assert len(search(server, ["red"])[0].matches) == 5

        # v2 becomes CURRENT behind the service's back: each shard's watcher moves it on its own clock
        answers: list[tuple[str, set]] = []
        stop = threading.Event()

        def keep_searching() -> None:
            while not stop.is_set():
                for q in search(server, [caption(12), caption(33)]):
                    answers.append((q.model_version, {m.model_version for m in q.matches}))

        searcher = threading.Thread(target=keep_searching)
        searcher.start()
        try:
            time.sleep(1.0)
            registry = Registry(workspace / "models")
            registry.set_current(registry.publish(tiny_model_dir_v2, make_current=False))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if all(s["model_version"] == "v2" for s in shard_states(server)):
                    break
                time.sleep(0.2)
            time.sleep(1.0)
        finally:
            stop.set()
            searcher.join(timeout=60)
        assert all(s["model_version"] == "v2" for s in shard_states(server))
        assert answers and all(matches == {version} for version, matches in answers), [
            a for a in answers if a[1] != {a[0]}
        ][:5]
        assert answers[0][0] == "v1" and answers[-1][0] == "v2"
        # the versions never go back: once the merged answer is v2, every later one is
        first_v2 = next(i for i, (version, _) in enumerate(answers) if version == "v2")
        assert all(version == "v2" for version, _ in answers[first_v2:])
        after = search(server, [caption(7)])[0]
        assert after.model_version == "v2" and len(after.matches) == 5
    finally:
        server.stop()
