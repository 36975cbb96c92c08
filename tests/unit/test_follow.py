"""ModelFollower: serves the registry's CURRENT version and moves with it, one cheap check per request.

Two real model versions with different weights (``tiny_model_dir`` and ``tiny_model_dir_v2``) are published, so
that an embedding can only equal the new version's when the new model was really loaded.
"""

import os
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cliptuner.model import follow
from cliptuner.model.follow import ModelFollower
from cliptuner.model.registry import Registry
from cliptuner.model.runtime import OnnxClip
from cliptuner.train.export import generate_sample_images

TEXTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def image():
    return generate_sample_images(1, seed=4)[0]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_model_dir_v2, image):
    """What each model directory embeds: ``{"v1" | "v2": (text rows, image row)}``, from fresh OnnxClips."""
    out = {}
    for name, model_dir in (("v1", tiny_model_dir), ("v2", tiny_model_dir_v2)):
        clip = OnnxClip(model_dir, device="cpu", intra_op_threads=1)
        out[name] = (clip.encode_text(TEXTS), clip.encode_images([image]))
    return out


@pytest.fixture
def registry(tmp_path, tiny_model_dir) -> Registry:
    registry = Registry(tmp_path / "models")
    registry.publish(tiny_model_dir)  # v1
    return registry


@pytest.fixture
def follower(registry) -> ModelFollower:
    return ModelFollower(registry, device="cpu", intra_op_threads=1)


def assert_embeds_like(clip: OnnxClip, expected: tuple[np.ndarray, np.ndarray], image: np.ndarray) -> None:
    np.testing.assert_allclose(clip.encode_text(TEXTS), expected[0], atol=1e-5)
    np.testing.assert_allclose(clip.encode_images([image]), expected[1], atol=1e-5)


def corrupt_copy(model_dir: Path, dest: Path, how: str) -> Path:
    """A copy of ``model_dir`` whose visual tower cannot be loaded."""
    shutil.copytree(model_dir, dest)
    visual = dest / "visual.onnx"
    data = visual.read_bytes()
    visual.write_bytes(b"not an onnx model" * 8 if how == "garbage" else data[: len(data) // 2])
    return dest


def test_the_two_versions_embed_differently(reference):
    texts_v1, image_v1 = reference["v1"]
    texts_v2, image_v2 = reference["v2"]
    assert np.max(np.abs(texts_v1 - texts_v2)) > 1e-2
    assert np.max(np.abs(image_v1 - image_v2)) > 1e-2


def test_follows_current_after_a_publish_and_a_rollback(follower, registry, tiny_model_dir_v2, reference, image):
    first = follower.clip()
    assert first.version == "v1" and follower.version == "v1"
    assert_embeds_like(first, reference["v1"], image)

    assert registry.publish(tiny_model_dir_v2) == "v2"
    second = follower.clip()
    assert second.version == "v2" and follower.version == "v2" and second is not first
    assert_embeds_like(second, reference["v2"], image)
    assert_embeds_like(OnnxClip(registry.path("v2"), device="cpu"), reference["v2"], image)
    assert_embeds_like(first, reference["v1"], image)  # a request still holding the old model finishes with it

    registry.set_current("v1")  # a rollback
    back = follower.clip()
    assert back.version == "v1"
    assert_embeds_like(back, reference["v1"], image)


def test_refresh_reports_whether_the_version_changed(follower, registry, tiny_model_dir_v2):
    assert follower.refresh() is True and follower.version == "v1"  # the first load
    assert follower.refresh() is False
    registry.publish(tiny_model_dir_v2)
    assert follower.refresh() is True and follower.version == "v2"
    assert follower.refresh() is False


def test_one_stat_per_request_when_nothing_changed(follower, registry, monkeypatch):
    served = follower.clip()
    stats, reads = [], []

    def counting_stat(path, *args, **kwargs):
        stats.append(Path(path))
        return os.stat(path, *args, **kwargs)

    def counting_current():
        reads.append(1)
        return Registry.current(registry)

    def no_load(version):
        raise AssertionError(f"loaded {version} although CURRENT did not change")

    monkeypatch.setattr(follow, "os", SimpleNamespace(stat=counting_stat))
    monkeypatch.setattr(registry, "current", counting_current)
    monkeypatch.setattr(follower, "open", no_load)
    for _ in range(5):
        assert follower.clip() is served
    assert stats == [registry.root / "CURRENT"] * 5
    assert reads == []  # CURRENT is not even read while its inode, mtime and size stay the same


def test_a_new_current_is_read_once_then_checked_by_stat_again(follower, registry, tiny_model_dir_v2, monkeypatch):
    follower.clip()
    registry.publish(tiny_model_dir_v2)
    loads = []
    real_open = follower.open
    monkeypatch.setattr(follower, "open", lambda version: loads.append(version) or real_open(version))
    for _ in range(4):
        assert follower.clip().version == "v2"
    assert loads == ["v2"]


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_a_bad_new_version_keeps_the_old_one_serving_and_reports_why(
    follower, registry, tiny_model_dir, tiny_model_dir_v2, reference, image, tmp_path, monkeypatch, how
):
    served = follower.clip()
    bad = registry.publish(corrupt_copy(tiny_model_dir_v2, tmp_path / "bad", how))
    assert registry.current() == bad

    loads = []
    real_open = follower.open
    monkeypatch.setattr(follower, "open", lambda version: loads.append(version) or real_open(version))
    for _ in range(3):  # requests keep being answered by the old version; the bad one is tried once
        assert follower.clip() is served
    assert loads == [bad]
    assert follower.version == "v1"
    assert follower.last_error is not None and f"cannot load model version {bad!r}" in follower.last_error
    assert_embeds_like(follower.clip(), reference["v1"], image)

    with pytest.raises(Exception, match="visual"):  # a caller that must have CURRENT (/train) hears the error
        follower.refresh(strict=True)
    assert follower.version == "v1"

    good = registry.publish(tiny_model_dir_v2)  # the next publish is picked up and clears the error
    assert follower.clip().version == good
    assert follower.last_error is None
    assert_embeds_like(follower.clip(), reference["v2"], image)


def test_a_bad_current_with_nothing_served_yet_raises(registry, tiny_model_dir_v2, tmp_path):
    registry.publish(corrupt_copy(tiny_model_dir_v2, tmp_path / "bad", "garbage"))
    follower = ModelFollower(registry, device="cpu", intra_op_threads=1)
    with pytest.raises(Exception, match="visual"):
        follower.clip()
    assert follower.version is None and "cannot load model version 'v2'" in follower.last_error


def test_an_empty_registry_has_nothing_to_serve(tmp_path):
    follower = ModelFollower(tmp_path / "models", device="cpu")
    with pytest.raises(RuntimeError, match="has no CURRENT"):
        follower.clip()
    with pytest.raises(RuntimeError, match="has no CURRENT model version"):
        follower.refresh(strict=True)
    assert follower.refresh() is False


def test_concurrent_callers_each_get_one_consistent_model(
    follower, registry, tiny_model_dir_v2, reference, monkeypatch
):
    follower.clip()
    loads = []
    real_open = follower.open
    monkeypatch.setattr(follower, "open", lambda version: loads.append(version) or real_open(version))
    workers = 4
    started = threading.Barrier(workers + 1)
    published = threading.Event()
    seen: list[list[tuple[str, np.ndarray]]] = [[] for _ in range(workers)]
    errors: list[BaseException] = []

    def serve(slot: int) -> None:
        try:
            for i in range(10_000):  # bounded; a worker stops once it was served by the new version
                clip = follower.clip()  # one model for the whole "request"
                seen[slot].append((clip.version, clip.encode_text(TEXTS)))
                if i == 0:
                    started.wait(timeout=60)
                if published.is_set() and clip.version == "v2":
                    return
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(slot,)) for slot in range(workers)]
    for thread in threads:
        thread.start()
    started.wait(timeout=60)  # every worker has been served by v1
    registry.publish(tiny_model_dir_v2)
    published.set()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert loads == ["v2"]  # concurrent callers that noticed the change loaded the new version once
    for calls in seen:
        versions = [version for version, _ in calls]
        assert versions[0] == "v1" and versions[-1] == "v2"
        assert versions == sorted(versions)  # never back to the old version once the new one served
        for version, texts in calls:  # each call's model is wholly one version: its label matches its weights
            np.testing.assert_allclose(texts, reference[version][0], atol=1e-5)
