"""Dynamic batching (cliptuner/serve/batching.py, and the encoder's use of it): merged runs, own rows, isolation, versions.

Most tests use a fake embedding function that records every call and can hold the first one, so that the
submissions made meanwhile are all pending when the worker next looks: what is merged is then decided by the
rules, not by timing. One test runs the real tiny model and compares with a direct :func:`embed_items`.
"""

import asyncio
import threading
import zlib

import numpy as np
import pytest
from docarray import DocList
from support import png, run

from cliptuner.model.images import ImageError
from cliptuner.model.registry import Registry
from cliptuner.model.runtime import OnnxClip
from cliptuner.serve.batching import MicroBatcher, decode_items
from cliptuner.serve.content import Item, embed_items, make_item
from cliptuner.train import synthetic
from executors import ClipDoc, CLIPEncoder
from executors.encoder import DEFAULT_BATCH_WAIT_MS, batch_wait

DIM = 4


class FakeClip:
    """A model reference: only its identity and ``embed_dim`` matter to the batcher."""

    embed_dim = DIM

    def __init__(self, tag: str) -> None:
        self.tag = tag


def vector(clip: FakeClip, name: str) -> np.ndarray:
    """What the fake model gives ``name``: depends on the model and the item only (never on the batch)."""
    return np.random.default_rng(zlib.crc32(f"{clip.tag}/{name}".encode())).normal(size=DIM).astype(np.float32)


class Recorder:
    """A fake ``embed(clip, items)``: records each call, holds the first one until released (``hold_first``), and
    raises, naming the item, when an item's name starts with ``bad``."""

    def __init__(self, hold_first: bool = False) -> None:
        self.calls: list[tuple[FakeClip, list[str]]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, clip: FakeClip, items) -> np.ndarray:
        self.calls.append((clip, [item.name for item in items]))
        self.entered.set()
        assert self.release.wait(30)
        bad = [item.name for item in items if item.name.startswith("bad")]
        if bad:
            raise ValueError(f"{bad[0]}: cannot decode")
        return np.stack([vector(clip, item.name) for item in items])


def texts(prefix: str, n: int) -> list[Item]:
    return [Item(name=f"{prefix}-{i}", text=f"text {prefix} {i}") for i in range(n)]


def expected(clip: FakeClip, items) -> np.ndarray:
    return np.stack([vector(clip, item.name) for item in items])


@pytest.fixture
def held():
    """A batcher whose first run is held: submit ``first``, then everything else piles up until ``go()``."""
    recorder = Recorder(hold_first=True)
    batcher = MicroBatcher(batch_size=8, wait_ms=1, embed=recorder)

    class Held:
        def __init__(self) -> None:
            self.recorder, self.batcher = recorder, batcher

        def start(self, clip: FakeClip):
            future = batcher.submit(clip, texts("first", 1))
            assert recorder.entered.wait(30)
            return future

        def go(self) -> None:
            recorder.release.set()

    yield Held()
    recorder.release.set()
    batcher.close()


def test_pending_submissions_are_merged_into_runs_of_at_most_batch_size_and_each_gets_its_rows(held):
    clip = FakeClip("a")
    first = held.start(clip)
    sizes = [1, 3, 2, 1, 1, 4, 2, 1, 1, 1, 3, 1]  # 21 items in 12 submissions, batch_size 8
    submissions = [texts(f"s{k}", n) for k, n in enumerate(sizes)]
    futures = [held.batcher.submit(clip, items) for items in submissions]
    held.go()
    for items, future in zip(submissions, futures):
        np.testing.assert_array_equal(future.result(30), expected(clip, items))
    np.testing.assert_array_equal(first.result(30), expected(clip, texts("first", 1)))

    runs = held.recorder.calls[1:]  # after the held one
    assert len(runs) < len(submissions)
    assert all(len(names) <= 8 for _, names in runs), [len(n) for _, n in runs]
    assert [name for _, names in runs for name in names] == [i.name for items in submissions for i in items]
    stats = held.batcher.stats()
    assert stats["runs"] == len(held.recorder.calls) and stats["items"] == 1 + sum(sizes)
    assert stats["submissions"] == 1 + len(sizes) and stats["largest_run"] == 8 and stats["merged_runs"] >= 2


def test_a_failing_submission_fails_alone_with_its_own_error(held):
    clip = FakeClip("a")
    held.start(clip)
    good1, bad, good2 = texts("good1", 2), [Item(name="bad doc 'x'", text="?")], texts("good2", 1)
    futures = [held.batcher.submit(clip, items) for items in (good1, bad, good2)]
    held.go()
    np.testing.assert_array_equal(futures[0].result(30), expected(clip, good1))
    np.testing.assert_array_equal(futures[2].result(30), expected(clip, good2))
    with pytest.raises(ValueError, match=r"^bad doc 'x': cannot decode$"):
        futures[1].result(30)
    merged = [names for _, names in held.recorder.calls if len(names) == 4]
    assert merged == [["good1-0", "good1-1", "bad doc 'x'", "good2-0"]]  # tried together, then one by one
    stats = held.batcher.stats()
    assert stats["retried_runs"] == 1 and stats["failed_submissions"] == 1


def test_two_model_references_are_never_mixed_in_one_run(held):
    old, new = FakeClip("old"), FakeClip("new")
    held.start(old)
    submissions = [(old if k % 2 == 0 else new, texts(f"s{k}", 1 + k % 3)) for k in range(10)]
    futures = [held.batcher.submit(clip, items) for clip, items in submissions]
    held.go()
    for (clip, items), future in zip(submissions, futures):
        np.testing.assert_array_equal(future.result(30), expected(clip, items))  # made by the model it took
    owner = {item.name: clip for clip, items in submissions for item in items}
    for clip, names in held.recorder.calls[1:]:
        assert all(owner[name] is clip for name in names), names
    assert len(held.recorder.calls) - 1 < len(submissions)  # and still merged, per model


def test_a_cancelled_submission_is_dropped_before_it_runs(held):
    clip = FakeClip("a")
    held.start(clip)
    kept, dropped = texts("kept", 1), texts("dropped", 1)
    future_kept = held.batcher.submit(clip, kept)
    future_dropped = held.batcher.submit(clip, dropped)
    assert future_dropped.cancel()
    held.go()
    np.testing.assert_array_equal(future_kept.result(30), expected(clip, kept))
    assert "dropped-0" not in [name for _, names in held.recorder.calls for name in names]
    assert held.batcher.stats()["cancelled_submissions"] == 1


def test_concurrent_threads_share_runs():
    recorder = Recorder()
    batcher = MicroBatcher(batch_size=16, wait_ms=1000, embed=recorder)  # runs once 16 items are pending
    clip = FakeClip("a")
    barrier = threading.Barrier(16)
    results: dict[int, np.ndarray] = {}

    def client(k: int) -> None:
        barrier.wait()
        results[k] = batcher.embed(clip, texts(f"c{k}", 1))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    batcher.close()
    assert sorted(results) == list(range(16))
    for k, rows in results.items():
        np.testing.assert_array_equal(rows, expected(clip, texts(f"c{k}", 1)))
    assert len(recorder.calls) < 16 and all(len(names) <= 16 for _, names in recorder.calls)


def test_a_large_submission_runs_alone_and_is_not_accepted_for_batching():
    recorder = Recorder()
    batcher = MicroBatcher(batch_size=4, wait_ms=1, embed=recorder)
    clip = FakeClip("a")
    big = texts("big", 6)
    np.testing.assert_array_equal(batcher.embed(clip, big), expected(clip, big))
    assert [len(names) for _, names in recorder.calls] == [6]
    assert batcher.accepts(texts("x", 3)) and not batcher.accepts(texts("x", 4)) and not batcher.accepts([])
    batcher.close()


def test_close_runs_what_is_pending_then_refuses():
    recorder = Recorder(hold_first=True)
    batcher = MicroBatcher(batch_size=8, wait_ms=1000, embed=recorder)
    clip = FakeClip("a")
    first = batcher.submit(clip, texts("first", 1))
    assert recorder.entered.wait(30)
    pending = batcher.submit(clip, texts("pending", 1))
    recorder.release.set()
    batcher.close()  # does not wait the full second for more submissions
    np.testing.assert_array_equal(pending.result(0), expected(clip, texts("pending", 1)))
    assert first.done()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(clip, texts("late", 1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),
        ({"batch_size": 2.5}, r"batch_size must be an integer >= 1, got 2.5"),
        ({"wait_ms": 0}, r"wait_ms must be a number in \(0, 1000\], got 0"),
        ({"wait_ms": float("nan")}, r"wait_ms must be a number in \(0, 1000\], got nan"),
        ({"wait_ms": 5000}, r"wait_ms must be a number in \(0, 1000\], got 5000"),
    ],
)
def test_bad_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MicroBatcher(**kwargs)


def test_batch_wait_setting_from_the_environment():
    assert batch_wait(None) == DEFAULT_BATCH_WAIT_MS and batch_wait("") == DEFAULT_BATCH_WAIT_MS
    assert batch_wait("$CLIPTUNER_BATCH_WAIT_MS") == DEFAULT_BATCH_WAIT_MS
    assert batch_wait("0") == 0.0 and batch_wait(5) == 5.0 and batch_wait("2.5") == 2.5
    for bad in ("soon", "-1", "1e9", True):
        with pytest.raises(ValueError, match=r"batch_wait_ms must be a number of milliseconds in \[0, 1000\]"):
            batch_wait(bad)


# -- the real model -------------------------------------------------------------------------------------------
def test_batched_rows_equal_a_direct_embedding_on_the_tiny_model(tiny_model_dir):
    clip = OnnxClip(tiny_model_dir, device="cpu", intra_op_threads=1, batch_size=8)
    scenes = synthetic.generate(9, domain="domain", seed=11, image_size=80)
    submissions = [
        [make_item("doc 'a'", blob=png(scenes.images[0]))],
        [make_item("doc 'b'", text=scenes.captions[1]), make_item("doc 'c'", tensor=scenes.images[2])],
        [
            make_item("doc 'd'", tensor=scenes.images[3]),
            make_item("doc 'e'", blob=png(scenes.images[4])),
            make_item("doc 'f'", text="a red circle"),
        ],
        [make_item("doc 'g'", blob=png(scenes.images[5]))],
        [make_item("doc 'h'", text=scenes.captions[6]), make_item("doc 'i'", tensor=scenes.images[7])],
    ]
    calls: list[int] = []
    release = threading.Event()

    def embed(model, items):
        calls.append(len(items))
        assert release.wait(30)
        return embed_items(model, items)

    batcher = MicroBatcher(batch_size=8, wait_ms=1, embed=embed)
    held = batcher.submit(clip, [make_item("doc 'z'", tensor=scenes.images[8])])
    while not calls:
        threading.Event().wait(0.01)
    futures = [batcher.submit(clip, decode_items(clip, items)) for items in submissions]
    release.set()
    for items, future in zip(submissions, futures):
        np.testing.assert_allclose(future.result(60), embed_items(clip, items), atol=1e-5)
    np.testing.assert_allclose(held.result(60), clip.encode_images([scenes.images[8]]), atol=1e-5)
    batcher.close()
    assert len(calls) - 1 < len(submissions) and max(calls) <= 8


def test_decoding_before_submitting_raises_what_embedding_raises(tiny_model_dir):
    clip = OnnxClip(tiny_model_dir, device="cpu", intra_op_threads=1)
    items = [make_item("doc 'ok'", text="fine"), make_item("doc 'broken'", blob=b"GIF89a?")]
    with pytest.raises(ImageError) as direct:
        embed_items(clip, items)
    with pytest.raises(ImageError) as early:
        decode_items(clip, items)
    assert str(early.value) == str(direct.value) and "doc 'broken'" in str(early.value)


# -- the encoder ----------------------------------------------------------------------------------------------
def batch_histogram(encoder: CLIPEncoder) -> dict[str, float]:
    """The encoder's ``cliptuner_encode_batch_items`` histogram: count, sum, and the count of runs of 1 item."""
    get = encoder.metrics.registry.get_sample_value
    return {
        "count": get("cliptuner_encode_batch_items_count") or 0.0,
        "sum": get("cliptuner_encode_batch_items_sum") or 0.0,
        "single": get("cliptuner_encode_batch_items_bucket", {"le": "1.0"}) or 0.0,
    }


async def encode_concurrently(encoder: CLIPEncoder, requests: list[DocList]) -> list[DocList]:
    return await asyncio.gather(*(encoder.encode(docs=docs) for docs in requests))


def single_image_requests(images, prefix: str = "r") -> list[DocList]:
    return [DocList[ClipDoc]([ClipDoc(id=f"{prefix}{k}", blob=png(image))]) for k, image in enumerate(images)]


def test_the_encoder_merges_concurrent_requests_and_each_gets_its_vectors(workspace, tiny_model_dir, scenes):
    encoder = CLIPEncoder(
        workspace=str(workspace), bootstrap=False, bootstrap_timeout=1, batch_size=8, batch_wait_ms=1000
    )  # a full batch runs at once: 8 requests of one image
    try:
        requests = single_image_requests(scenes.images[:8])
        answers = run(encode_concurrently(encoder, requests))
        reference = OnnxClip(tiny_model_dir, device="cpu").encode_images(scenes.images[:8])
        for k, answer in enumerate(answers):
            assert [doc.id for doc in answer] == [f"r{k}"] and answer[0].model_version == "v1"
            assert answer[0].blob is None
            np.testing.assert_allclose(answer[0].embedding, reference[k], atol=1e-5)
        batching = encoder.status()["batching"]
        assert batching["batch_wait_ms"] == 1000 and batching["batch_size"] == 8
        assert batching["largest_run"] > 1 and batching["runs"] < 8 and batching["items"] == 8
        histogram = batch_histogram(encoder)
        assert histogram["count"] == batching["runs"] and histogram["sum"] == 8
    finally:
        encoder.close()


def test_a_bad_doc_fails_only_its_own_concurrent_request(workspace, tiny_model_dir, scenes):
    encoder = CLIPEncoder(
        workspace=str(workspace), bootstrap=False, bootstrap_timeout=1, batch_size=8, batch_wait_ms=200
    )
    try:
        requests = single_image_requests(scenes.images[:5])
        requests.insert(2, DocList[ClipDoc]([ClipDoc(id="broken", blob=b"GIF89a?")]))

        async def scenario():
            return await asyncio.gather(*(encoder.encode(docs=docs) for docs in requests), return_exceptions=True)

        answers = run(scenario())
        assert isinstance(answers[2], ImageError) and "doc 'broken'" in str(answers[2])
        reference = OnnxClip(tiny_model_dir, device="cpu").encode_images(scenes.images[:5])
        good = [a for k, a in enumerate(answers) if k != 2]
        for k, answer in enumerate(good):
            np.testing.assert_allclose(answer[0].embedding, reference[k], atol=1e-5)
    finally:
        encoder.close()


def test_a_request_keeps_the_version_it_took_across_a_swap(workspace, tiny_model_dir, tiny_model_dir_v2, scenes):
    encoder = CLIPEncoder(workspace=str(workspace), bootstrap=False, bootstrap_timeout=1, batch_size=8)
    entered, release = threading.Event(), threading.Event()

    def held_embed(clip, items):  # the first run (a blocker) waits, so both requests are pending together
        entered.set()
        assert release.wait(30)
        return embed_items(clip, items)

    encoder.batcher.close()
    encoder.batcher = MicroBatcher(8, 1, embed=held_embed)
    try:

        async def scenario():
            blocker = encoder.batcher.submit(encoder.follower.clip(), [Item(name="blocker", text="x")])
            await asyncio.to_thread(entered.wait, 30)  # the worker holds the blocker: nothing is pending
            before = asyncio.create_task(encoder.encode(docs=single_image_requests(scenes.images[:1], "old")[0]))
            while encoder.batcher.stats()["pending"] < 1:  # it took v1 and waits
                await asyncio.sleep(0.005)
            Registry(workspace / "models").publish(tiny_model_dir_v2)  # v2 becomes CURRENT
            after = asyncio.create_task(encoder.encode(docs=single_image_requests(scenes.images[1:2], "new")[0]))
            while encoder.batcher.stats()["pending"] < 2:  # it took v2 and waits beside the v1 request
                await asyncio.sleep(0.005)
            release.set()
            await asyncio.wrap_future(blocker)
            return await before, await after

        before, after = run(scenario())
        assert before[0].model_version == "v1" and after[0].model_version == "v2"
        np.testing.assert_allclose(
            before[0].embedding, OnnxClip(tiny_model_dir).encode_images(scenes.images[:1])[0], atol=1e-5
        )
        np.testing.assert_allclose(
            after[0].embedding, OnnxClip(tiny_model_dir_v2).encode_images(scenes.images[1:2])[0], atol=1e-5
        )
        assert encoder.batcher.stats()["merged_runs"] == 0
    finally:
        release.set()
        encoder.close()


def test_batch_wait_zero_embeds_each_request_on_its_own(workspace, tiny_model_dir, scenes):
    encoder = CLIPEncoder(workspace=str(workspace), bootstrap=False, bootstrap_timeout=1, batch_wait_ms=0)
    try:
        assert encoder.batcher is None
        answers = run(encode_concurrently(encoder, single_image_requests(scenes.images[:6])))
        reference = OnnxClip(tiny_model_dir, device="cpu").encode_images(scenes.images[:6])
        for k, answer in enumerate(answers):
            np.testing.assert_allclose(answer[0].embedding, reference[k], atol=1e-5)
        assert batch_histogram(encoder) == {"count": 6.0, "sum": 6.0, "single": 6.0}  # one run per request
        assert encoder.status()["batching"] == {"batch_wait_ms": 0.0, "batch_size": 32}
    finally:
        encoder.close()


def test_a_request_of_batch_size_docs_or_more_is_not_held(encoder, scenes):
    docs = DocList[ClipDoc]([ClipDoc(id=f"d{i}", tensor=image) for i, image in enumerate(list(scenes.images) * 3)])
    out = run(encoder.encode(docs=docs))  # 36 docs, batch_size 32: embedded on their own, in two ONNX runs
    assert len(out) == 36 and all(doc.embedding is not None for doc in out)
    assert encoder.batcher.stats()["runs"] == 0
    assert batch_histogram(encoder) == {"count": 2.0, "sum": 36.0, "single": 0.0}
