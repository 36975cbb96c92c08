"""Registry: atomic publish, CURRENT pointer, version numbering, concurrency."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cliptuner.manifest import (CHECKPOINT_FILE, REQUIRED_FILES, TEXTUAL_FILE, VISUAL_FILE, VOCAB_FILE,
                                ModelManifest, OnnxSpec, TokenizerSpec)
from cliptuner.registry import Registry


def make_model_dir(path: Path, payload_bytes: int = 16, arch: str = "fake") -> Path:
    """A directory shaped like an exported model: a valid manifest, files whose contents are not a real model."""
    path.mkdir(parents=True)
    ModelManifest(arch=arch, embed_dim=8, image_size=16, mean=[0.5] * 3, std=[0.5] * 3, interpolation="bicubic",
                  tokenizer=TokenizerSpec(context_length=8), onnx=OnnxSpec.standard(),
                  checkpoint=CHECKPOINT_FILE).write(path)
    (path / VISUAL_FILE).write_bytes(b"v" * payload_bytes)
    (path / TEXTUAL_FILE).write_bytes(b"t" * payload_bytes)
    (path / VOCAB_FILE).write_bytes(b"b" * payload_bytes)
    (path / CHECKPOINT_FILE).write_bytes(b"c" * payload_bytes)
    return path


def test_publish_increments_and_current_follows(tmp_path):
    reg = Registry(tmp_path / "models")
    assert reg.versions() == [] and reg.current() is None and reg.current_path() is None
    src = make_model_dir(tmp_path / "src")
    assert reg.publish(src) == "v1"
    assert reg.current() == "v1"
    assert reg.publish(src) == "v2"
    assert reg.versions() == ["v1", "v2"]
    assert reg.current() == "v2"
    assert reg.current_path() == reg.root / "v2"
    assert (reg.root / "CURRENT").read_text().strip() == "v2"
    assert reg.metadata("v1")["version"] == "v1"
    assert reg.metadata("v2")["version"] == "v2"
    assert reg.metadata("v2")["arch"] == "fake" and reg.manifest("v2").version == "v2"
    for name in REQUIRED_FILES + ("checkpoint.pt",):
        assert (reg.path("v2") / name).is_file()
    assert (src / "model.json").is_file() and "version" not in json.loads((src / "model.json").read_text())  # copied
    assert not list(reg.root.glob(".tmp-*"))


def test_publish_without_making_current_then_promote(tmp_path):
    reg = Registry(tmp_path / "models")
    src = make_model_dir(tmp_path / "src")
    reg.publish(src)
    assert reg.publish(src, make_current=False) == "v2"
    assert reg.current() == "v1"
    reg.set_current("v2")
    assert reg.current() == "v2"


def test_move_publishes_the_directory_itself(tmp_path):
    reg = Registry(tmp_path / "models")
    src = make_model_dir(tmp_path / "src")
    assert reg.publish(src, move=True) == "v1"
    assert not src.exists()
    assert reg.metadata("v1")["version"] == "v1"


def test_versions_sort_numerically_and_auto_follows_highest(tmp_path):
    reg = Registry(tmp_path / "models")
    src = make_model_dir(tmp_path / "src")
    for name in ("v2", "v10", "v9"):
        reg.publish(src, version=name)
    assert reg.versions() == ["v2", "v9", "v10"]
    assert reg.publish(src) == "v11"
    assert reg.publish(src, version="experiment-a") == "experiment-a"
    assert reg.current() == "experiment-a"


def test_existing_or_invalid_version_is_refused(tmp_path):
    reg = Registry(tmp_path / "models")
    src = make_model_dir(tmp_path / "src")
    reg.publish(src, version="v1")
    with pytest.raises(ValueError, match="already exists"):
        reg.publish(src, version="v1")
    for bad in ("", ".hidden", "a/b", "CURRENT", "..", "x" * 200):
        with pytest.raises(ValueError, match="invalid version name"):
            reg.publish(src, version=bad)
    assert reg.versions() == ["v1"]
    assert not list(reg.root.glob(".tmp-*"))


def test_unknown_version_names_known_ones(tmp_path):
    reg = Registry(tmp_path / "models")
    src = make_model_dir(tmp_path / "src")
    reg.publish(src)
    reg.publish(src)
    with pytest.raises(ValueError, match=r"unknown model version 'v7'.*\['v1', 'v2'\]"):
        reg.path("v7")
    with pytest.raises(ValueError, match="unknown model version"):
        reg.metadata("../src")
    with pytest.raises(ValueError, match="unknown model version"):
        reg.set_current("v7")
    assert reg.current() == "v2"


def test_rollback_with_set_current(tmp_path):
    reg = Registry(tmp_path / "models")
    src = make_model_dir(tmp_path / "src")
    reg.publish(src)
    reg.publish(src)
    reg.set_current("v1")
    assert reg.current() == "v1"
    assert Registry(tmp_path / "models").current_path() == tmp_path / "models" / "v1"  # another reader sees it


def test_incomplete_source_is_refused(tmp_path):
    reg = Registry(tmp_path / "models")
    src = make_model_dir(tmp_path / "src")
    (src / "textual.onnx").unlink()
    with pytest.raises(ValueError, match=r"missing \['textual.onnx'\]"):
        reg.publish(src)
    assert reg.versions() == [] and reg.current() is None


def test_invalid_manifest_is_refused_before_copying(tmp_path):
    reg = Registry(tmp_path / "models")
    reg.publish(make_model_dir(tmp_path / "good"))
    bad = make_model_dir(tmp_path / "bad")
    (bad / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read .*model.json"):
        reg.publish(bad)
    assert reg.versions() == ["v1"] and reg.current() == "v1"
    assert not list(reg.root.glob(".tmp-*"))
    with pytest.raises(ValueError, match=r"cannot read .*model.json"):
        reg.publish(bad, move=True)
    assert (bad / "model.json").is_file()  # a refused move leaves the directory where it was
    (bad / "model.json").write_text(json.dumps({"format": "cliptuner-model-v0", "arch": "fake"}))
    with pytest.raises(ValueError, match="format 'cliptuner-model-v0'"):
        reg.publish(bad)
    assert reg.versions() == ["v1"] and not list(reg.root.glob(".tmp-*"))


def test_failed_move_gives_the_directory_back(tmp_path, monkeypatch):
    reg = Registry(tmp_path / "models")
    src = make_model_dir(tmp_path / "src")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("cliptuner.registry.os.rename", fail)  # after the copy/move, before the version exists
    with pytest.raises(OSError, match="disk full"):
        reg.publish(src, move=True)
    assert all((src / name).is_file() for name in REQUIRED_FILES)
    assert reg.versions() == [] and reg.current() is None
    assert not list(reg.root.glob(".tmp-*"))


def test_temp_and_incomplete_dirs_are_never_listed(tmp_path):
    reg = Registry(tmp_path / "models")
    make_model_dir(reg.root / ".tmp-0123abcd")  # a publisher that died mid-copy
    (reg.root / "v5").mkdir()  # no model.json: not a version
    assert reg.versions() == []
    (reg.root / "v1").write_text("a stray file")
    assert reg.publish(make_model_dir(tmp_path / "src")) == "v2"  # skips the stray name
    assert reg.versions() == ["v2"]
    with pytest.raises(ValueError, match="unknown model version"):
        reg.path(".tmp-0123abcd")


def test_readers_never_see_half_written_versions(tmp_path):
    reg = Registry(tmp_path / "models")
    src = make_model_dir(tmp_path / "src", payload_bytes=4 * 1024 * 1024)
    size = (src / "visual.onnx").stat().st_size
    stop = threading.Event()
    problems, seen = [], set()

    def reader():
        while not stop.is_set():
            for version in Registry(reg.root).versions():
                path = reg.root / version
                if (path / "visual.onnx").stat().st_size != size or not (path / "textual.onnx").is_file():
                    problems.append(f"{version}: incomplete files")
                if json.loads((path / "model.json").read_text()).get("version") != version:
                    problems.append(f"{version}: model.json lacks its version")
                seen.add(version)
            current = reg.current()
            if current is not None and not (reg.root / current / "model.json").is_file():
                problems.append(f"CURRENT {current} names no complete version")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(6):
            reg.publish(src)
    finally:
        stop.set()
        thread.join()
    assert problems == []
    assert reg.versions() == [f"v{i}" for i in range(1, 7)]
    assert seen  # the reader did look


def test_concurrent_thread_publishers_get_distinct_versions(tmp_path):
    reg = Registry(tmp_path / "models")
    src = make_model_dir(tmp_path / "src", payload_bytes=64 * 1024)
    results, errors = [], []

    def publish():
        try:
            results.append(Registry(reg.root).publish(src))
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=publish) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(1, 9)]
    assert reg.current() in results
    for version in results:
        assert reg.metadata(version)["version"] == version


def test_concurrent_process_publishers_get_distinct_versions(tmp_path):
    root = tmp_path / "models"
    src = make_model_dir(tmp_path / "src", payload_bytes=64 * 1024)
    script = ("import sys; from cliptuner.registry import Registry\n"
              "reg = Registry(sys.argv[1])\n"
              "print(' '.join(reg.publish(sys.argv[2]) for _ in range(3)))\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(root), str(src)], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    published = [v for out in outputs for v in out.split()]
    assert sorted(published, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(1, 13)]
    reg = Registry(root)
    assert reg.versions() == [f"v{i}" for i in range(1, 13)]
    assert reg.current() in published
    assert not list(root.glob(".tmp-*"))
