"""Registry: atomic publish, CURRENT pointer, version numbering, concurrency, leftovers of crashed publishes."""

import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fake_models import REPORT, make_model_dir, publish_fake

from cliptuner.cli.models import format_models_table
from cliptuner.config import ModelSpec
from cliptuner.model.manifest import REQUIRED_FILES, TEXTUAL_FILE, VISUAL_FILE, VOCAB_FILE
from cliptuner.model.registry import CurrentMoved, Registry, temp_name
from cliptuner.serve.bootstrap import ensure_current


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

    monkeypatch.setattr("cliptuner.model.registry.os.rename", fail)  # after the copy/move, before the version exists
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
    script = (
        "import sys; from cliptuner.model.registry import Registry\n"
        "reg = Registry(sys.argv[1])\n"
        "print(' '.join(reg.publish(sys.argv[2]) for _ in range(3)))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(root), str(src)], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    published = [v for out in outputs for v in out.split()]
    assert sorted(published, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(1, 13)]
    reg = Registry(root)
    assert reg.versions() == [f"v{i}" for i in range(1, 13)]
    assert reg.current() in published
    assert not list(root.glob(".tmp-*"))


# -- leftovers of interrupted publishes ---------------------------------------------------------------------------
SLOW_PUBLISH = """
import functools, shutil, sys, time
from cliptuner.model.registry import Registry

def copy_then_hang(src, dst, **kwargs):  # the first file lands, then the copy stalls until the process is killed
    out = shutil.copy2(src, dst, **kwargs)
    print("copying", flush=True)
    time.sleep(600)
    return out

shutil.copytree = functools.partial(shutil.copytree, copy_function=copy_then_hang)
Registry(sys.argv[1]).publish(sys.argv[2])
"""


def backdate(path: Path, seconds: float) -> None:
    """Set the mtime of ``path`` and everything under it ``seconds`` into the past."""
    when = time.time() - seconds
    for entry in [path, *path.rglob("*")]:
        os.utime(entry, (when, when))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_publish_killed_mid_copy_keeps_current_and_is_cleaned_at_the_next_start(tmp_path):
    reg = Registry(tmp_path / "models")
    src = make_model_dir(tmp_path / "src")
    reg.publish(src)
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_PUBLISH, str(reg.root), str(src)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "copying"
    finally:
        proc.kill()  # SIGKILL: no except or finally block of the publisher runs
        proc.wait(30)
    leftovers = list(reg.root.glob(".tmp-*"))
    assert len(leftovers) == 1 and len(list(leftovers[0].iterdir())) == 1  # half a copy
    assert reg.versions() == ["v1"] and reg.current() == "v1"  # never listed, CURRENT untouched
    with pytest.raises(ValueError, match="unknown model version"):
        reg.path(leftovers[0].name)
    ensure_current(reg.root, None, timeout=1)  # a service that does not publish leaves it alone
    assert leftovers[0].exists()
    # the next start of a publisher: its owner is gone, so it goes at once, whatever its age
    assert ensure_current(reg.root, ModelSpec("cliptuner-tiny"), timeout=1) == "v1"
    assert not leftovers[0].exists()
    assert reg.versions() == ["v1"] and reg.publish(src) == "v2"


def test_a_crash_in_the_copy_step_leaves_no_temp_and_the_old_current(tmp_path, monkeypatch):
    reg = Registry(tmp_path / "models")
    src = make_model_dir(tmp_path / "src")
    reg.publish(src)
    real_copy2 = shutil.copy2
    copied = []

    def copy_one_then_fail(src_file, dst, **kwargs):
        if copied:
            raise OSError("disk full")
        copied.append(real_copy2(src_file, dst, **kwargs))
        return copied[-1]

    monkeypatch.setattr(
        "cliptuner.model.registry.shutil.copytree", functools.partial(shutil.copytree, copy_function=copy_one_then_fail)
    )
    with pytest.raises(OSError, match="disk full"):
        reg.publish(src)
    assert copied  # it did fail midway
    assert reg.versions() == ["v1"] and reg.current() == "v1"
    assert not list(reg.root.glob(".tmp-*"))


def test_a_live_publishers_temp_is_kept_whatever_the_grace(tmp_path, monkeypatch):
    reg = Registry(tmp_path / "models")
    src = make_model_dir(tmp_path / "src")
    filling, release = threading.Event(), threading.Event()

    def copy_and_wait(src_file, dst, **kwargs):
        out = shutil.copy2(src_file, dst, **kwargs)
        filling.set()
        release.wait(60)
        return out

    monkeypatch.setattr(
        "cliptuner.model.registry.shutil.copytree", functools.partial(shutil.copytree, copy_function=copy_and_wait)
    )
    results = []
    publisher = threading.Thread(target=lambda: results.append(reg.publish(src)))
    publisher.start()
    try:
        assert filling.wait(60)
        temp = next(reg.root.glob(".tmp-*"))
        backdate(temp, 7200)
        assert Registry(reg.root).clean_temps(grace=0) == []  # another publisher starting meanwhile
        assert temp.exists()
    finally:
        release.set()
        publisher.join(60)
    assert results == ["v1"] and reg.versions() == ["v1"] and reg.current() == "v1"
    assert not list(reg.root.glob(".tmp-*"))


def test_clean_temps_removes_dead_owners_and_stale_entries_only(tmp_path):
    reg = Registry(tmp_path / "models")
    reg.publish(make_model_dir(tmp_path / "src"))
    ours = temp_name()
    assert f"-{os.getpid()}-" in ours
    dead_owner = ours.replace(f"-{os.getpid()}-", f"-{dead_pid()}-", 1)
    other_host = f".tmp-00000000-{os.getpid()}-{'a' * 32}"  # this pid, but on a host whose pids we cannot see
    fresh = {
        dead_owner: True,  # removed: its owner on this host is gone
        other_host: False,  # kept: another host's publisher may be filling it
        ".tmp-0123abcd": False,  # a name without an owner: by age only
        ".CURRENT.tmp-4242-abcdef01": False,  # an interrupted write_atomic of CURRENT
    }
    for name in fresh:
        if name.startswith(".tmp-"):
            make_model_dir(reg.root / name)
        else:
            (reg.root / name).write_text("v9\n")
    (reg.root / "notes").mkdir()  # not a temp entry, not a version
    assert sorted(reg.clean_temps()) == sorted(name for name, gone in fresh.items() if gone)
    assert all((reg.root / name).exists() != gone for name, gone in fresh.items())
    for entry in reg.root.iterdir():  # everything an hour and a half old now, versions and CURRENT included
        backdate(entry, 5400)
    assert sorted(reg.clean_temps(grace=7200)) == []
    assert sorted(reg.clean_temps()) == sorted(name for name, gone in fresh.items() if not gone)
    assert sorted(p.name for p in reg.root.iterdir()) == [".lock", "CURRENT", "notes", "v1"]
    assert reg.versions() == ["v1"] and reg.current() == "v1"
    with pytest.raises(ValueError, match=r"grace must be >= 0 seconds, got -1"):
        reg.clean_temps(grace=-1)


def test_a_failed_current_write_unpublishes_the_new_version(tmp_path, monkeypatch):
    reg = Registry(tmp_path / "models")
    src = make_model_dir(tmp_path / "src")
    reg.publish(src)

    def refuse(path, data, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("cliptuner.model.registry.write_atomic", refuse)  # after the rename into place
    with pytest.raises(OSError, match="disk full"):
        reg.publish(src)
    with pytest.raises(OSError, match="disk full"):
        reg.publish(src, move=True)
    assert all((src / name).is_file() for name in REQUIRED_FILES)  # the moved directory came back
    assert reg.versions() == ["v1"] and reg.current() == "v1"
    assert sorted(p.name for p in reg.root.iterdir()) == [".lock", "CURRENT", "v1"]


# -- versions: summaries, promote, rollback, prune ----------------------------------------------------------------
def test_summaries_show_lineage_reports_current_and_unreadable_versions(tmp_path):
    reg = Registry(tmp_path / "models")
    assert reg.summaries() == []
    publish_fake(reg, tmp_path, "v1", arch="base-arch")
    publish_fake(reg, tmp_path, "v2", parent="v1", report=REPORT)
    publish_fake(reg, tmp_path, "v10", parent="v2", report={"epochs": 1, "after": "not a dict"}, make_current=False)
    publish_fake(reg, tmp_path, "v3", parent="v2")
    reg.set_current("v2")
    (reg.root / "v3" / "model.json").write_text("{broken")  # a version that cannot be read any more
    summaries = reg.summaries()
    assert [s["version"] for s in summaries] == ["v1", "v2", "v3", "v10"]
    v1, v2, v3, v10 = summaries
    assert v1 == {
        "version": "v1",
        "current": False,
        "status": "published",
        "created_at": "2024-01-01T10:00:00+00:00",
        "parent_version": None,
        "arch": "base-arch",
        "report": None,
    }
    assert v2 == {
        "version": "v2",
        "current": True,
        "status": "current",
        "created_at": "2024-01-02T10:00:00+00:00",
        "parent_version": "v1",
        "arch": "fake",
        "report": {
            "epochs": 3,
            "before": {"t2i_r5": 0.25, "i2t_r5": 0.3, "mean_recall": 0.3},
            "after": {"t2i_r5": 0.5, "i2t_r5": 0.55, "mean_recall": 0.52},
            "gate": None,
        },
    }
    assert v3["current"] is False and v3["arch"] is None and v3["report"] is None
    assert "cannot read" in v3["error"] and "v3" in v3["error"]
    assert v10["report"] == {"epochs": 1, "before": None, "after": None, "gate": None} and "error" not in v10
    (reg.root / "v10" / TEXTUAL_FILE).unlink()
    assert "missing ['textual.onnx']" in reg.summaries()[3]["error"]
    json.dumps(reg.summaries())  # plain JSON: the CLI prints it, the tuner sends it as tags


def test_promote_refuses_unknown_and_broken_versions_and_keeps_current(tmp_path):
    reg = Registry(tmp_path / "models")
    for version in ("v1", "v2", "v3", "v4", "v5"):
        publish_fake(reg, tmp_path, version, make_current=version == "v1")
    with pytest.raises(ValueError, match=r"unknown model version 'v9'.*\['v1', 'v2', 'v3', 'v4', 'v5'\]"):
        reg.promote("v9")
    with pytest.raises(ValueError, match="unknown model version"):
        reg.promote("../v1")
    (reg.root / "v2" / "model.json").write_text(json.dumps({"format": "cliptuner-model-v0"}))
    with pytest.raises(ValueError, match=r"model version 'v2' cannot be served: .*format 'cliptuner-model-v0'"):
        reg.promote("v2")
    (reg.root / "v3" / VISUAL_FILE).unlink()
    with pytest.raises(ValueError, match=r"model version 'v3' cannot be served: .*missing \['visual.onnx'\]"):
        reg.promote("v3")
    (reg.root / "v4" / VOCAB_FILE).write_bytes(b"")
    with pytest.raises(ValueError, match=r"model version 'v4' cannot be served: empty files \['bpe_simple"):
        reg.promote("v4")
    assert reg.current() == "v1"
    change = reg.promote("v5")
    assert (change.version, change.previous, change.changed) == ("v5", "v1", True)
    assert Registry(reg.root).current() == "v5"
    assert not reg.promote("v5").changed and reg.current() == "v5"


def test_rollback_follows_the_parent_then_the_natural_order(tmp_path):
    reg = Registry(tmp_path / "models")
    with pytest.raises(ValueError, match="nothing to roll back .*no CURRENT version"):
        reg.rollback()
    publish_fake(reg, tmp_path, "v1")
    publish_fake(reg, tmp_path, "v2", parent="v1")
    publish_fake(reg, tmp_path, "v3", parent="v1")  # tuned from v1 again, not from v2
    publish_fake(reg, tmp_path, "v4", parent="v3")
    assert reg.rollback_target() == "v3" and reg.current() == "v4"  # only a look
    change = reg.rollback()
    assert (change.version, change.previous) == ("v3", "v4") and reg.current() == "v3"
    assert reg.rollback().version == "v1"  # v3's parent: v2 is skipped
    with pytest.raises(
        ValueError,
        match=r"cannot roll back from model version 'v1': it has no parent and no "
        r"version precedes it; published: \['v1', 'v2', 'v3', 'v4'\]",
    ):
        reg.rollback()
    assert reg.current() == "v1"
    publish_fake(reg, tmp_path, "v10", parent="gone")  # its parent was deleted: the version before it
    assert reg.rollback().version == "v4"
    reg.promote("v2")
    assert reg.rollback().version == "v1"


def test_rollback_refuses_a_target_that_cannot_be_served(tmp_path):
    reg = Registry(tmp_path / "models")
    publish_fake(reg, tmp_path, "v1")
    publish_fake(reg, tmp_path, "v2", parent="v1")
    (reg.root / "v1" / TEXTUAL_FILE).unlink()
    with pytest.raises(ValueError, match=r"cannot roll back from model version 'v2' to 'v1': .*missing"):
        reg.rollback()
    assert reg.current() == "v2"
    publish_fake(reg, tmp_path, "v3")
    (reg.root / "v3" / "model.json").write_text("{broken")  # CURRENT unreadable: the natural order still works
    reg.root.joinpath("CURRENT").write_text("v3\n")
    assert reg.rollback_target() == "v2"


def test_prune_keeps_the_newest_and_never_current(tmp_path):
    reg = Registry(tmp_path / "models")
    for version in ("v1", "v2", "v3", "v4", "v5", "v10"):
        publish_fake(reg, tmp_path, version)
    reg.set_current("v2")
    for bad in (0, -1, True, 1.0, "2"):
        with pytest.raises(ValueError, match=r"keep must be an integer >= 1, got"):
            reg.prune(bad)
    assert reg.prune(2) == ["v1", "v3", "v4"]  # v5 and v10 are the newest two; v2 is CURRENT
    assert reg.versions() == ["v2", "v5", "v10"] and reg.current() == "v2"
    assert reg.prune(1) == ["v5"]
    assert reg.prune(1) == [] and reg.versions() == ["v2", "v10"]
    assert not [p.name for p in reg.root.iterdir() if p.name.startswith(".tmp-")]
    assert sorted(p.name for p in reg.root.iterdir()) == [".lock", "CURRENT", "v10", "v2"]
    assert reg.publish(make_model_dir(tmp_path / "next")) == "v11"  # numbering goes on after the newest


def test_prune_deletes_whole_versions_only(tmp_path, monkeypatch):
    """A reader looking while a version is being deleted sees it whole or not at all: every listed version has all
    its files and reads, and CURRENT always names a complete version."""
    reg = Registry(tmp_path / "models")
    for version in ("v1", "v2", "v3", "v4"):
        publish_fake(reg, tmp_path, version)
        for i in range(20):  # more files: more steps of the deletion to look between
            (reg.root / version / f"extra-{i}.bin").write_bytes(b"x")
    reg.set_current("v1")
    real_rmtree = shutil.rmtree
    removed_paths, problems = [], []

    def look() -> None:
        reader = Registry(reg.root)
        for entry in reader.summaries():
            if "error" in entry:
                problems.append(f"{entry['version']}: {entry['error']}")
            elif len(list((reg.root / entry["version"]).iterdir())) != 25:
                problems.append(f"{entry['version']}: files missing")
        current = reader.current()
        if current not in reader.versions():
            problems.append(f"CURRENT {current} is not a whole version")

    def rmtree_looking(path, *args, **kwargs):  # deletes file by file, a reader looking after each one
        path = Path(path)
        removed_paths.append(path.name)
        for child in sorted(path.iterdir()):
            child.unlink()
            look()
        real_rmtree(path, *args, **kwargs)
        look()

    monkeypatch.setattr("cliptuner.model.registry.shutil.rmtree", rmtree_looking)
    assert reg.prune(1) == ["v2", "v3"]
    assert problems == []
    assert len(removed_paths) == 2 and all(name.startswith(".tmp-") for name in removed_paths)
    assert reg.versions() == ["v1", "v4"]


def test_a_prune_cut_short_leaves_only_a_temp_entry(tmp_path, monkeypatch):
    reg = Registry(tmp_path / "models")
    for version in ("v1", "v2", "v3"):
        publish_fake(reg, tmp_path, version)

    def fail(path, *args, **kwargs):
        raise PermissionError(f"cannot delete {path}")

    monkeypatch.setattr("cliptuner.model.registry.shutil.rmtree", fail)
    assert reg.prune(1) == ["v1", "v2"]  # renamed away: no longer versions, whatever happens to their files
    monkeypatch.undo()
    assert reg.versions() == ["v3"] and reg.current() == "v3"
    leftovers = [p.name for p in reg.root.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 2 and all(str(os.getpid()) in name for name in leftovers)
    assert reg.clean_temps() == []  # its owner (this process) lives


# -- the evaluation gate's candidates ------------------------------------------------------------------------------
REFUSED = {**REPORT, "gate": {"promoted": False, "reason": "not promoted: mean_r5 40.0 vs 50.0 of version v1"}}
PROMOTED = {**REPORT, "gate": {"promoted": True, "reason": "promoted: mean_r5 60.0 vs 50.0 of version v1"}}


def test_a_refused_candidate_is_listed_as_one_with_its_reason_and_rollback_passes_it_by(tmp_path):
    reg = Registry(tmp_path / "models")
    publish_fake(reg, tmp_path, "v1")
    publish_fake(reg, tmp_path, "v2", parent="v1", report=PROMOTED)
    publish_fake(reg, tmp_path, "v3", parent="v2", report=REFUSED, make_current=False)
    publish_fake(reg, tmp_path, "v4", parent="v9", report=PROMOTED)  # its parent is gone: natural order decides
    statuses = {s["version"]: (s["status"], s["report"] and s["report"]["gate"]) for s in reg.summaries()}
    assert statuses == {
        "v1": ("published", None),
        "v2": ("published", {"promoted": True, "reason": PROMOTED["gate"]["reason"]}),
        "v3": ("candidate", {"promoted": False, "reason": REFUSED["gate"]["reason"]}),
        "v4": ("current", {"promoted": True, "reason": PROMOTED["gate"]["reason"]}),
    }
    assert reg.rollback_target() == "v2"  # v3 precedes v4 but never went live by itself
    assert reg.promote("v3").version == "v3"  # an admin may serve a candidate by hand
    assert {s["version"]: s["status"] for s in reg.summaries()}["v3"] == "current"
    assert "gate: not promoted: mean_r5 40.0" not in format_models_table(reg.summaries())
    reg.promote("v4")
    table = format_models_table(reg.summaries())
    assert "candidate" in table and "    gate: not promoted: mean_r5 40.0 vs 50.0 of version v1" in table


def test_publish_with_expect_current_refuses_when_current_moved(tmp_path):
    reg = Registry(tmp_path / "models")
    publish_fake(reg, tmp_path, "v1")
    publish_fake(reg, tmp_path, "v2", parent="v1", make_current=False)
    src = make_model_dir(tmp_path / "src")
    reg.set_current("v2")  # an admin moved CURRENT while a run measured against v1
    with pytest.raises(CurrentMoved, match="moved from 'v1' to 'v2'") as caught:
        reg.publish(src, move=True, expect_current="v1")
    assert caught.value.current == "v2"
    assert reg.versions() == ["v1", "v2"] and reg.current() == "v2"
    assert all((src / name).is_file() for name in REQUIRED_FILES)  # the moved directory came back
    assert reg.publish(src, move=True, expect_current="v2") == "v3" and reg.current() == "v3"
