"""atomic_path / write_atomic: whole-file replacement, no temp files left behind, clear errors."""

import os
import subprocess
import sys
import threading

import pytest

from cliptuner.model import atomic
from cliptuner.model.atomic import atomic_path, fsync_path, write_atomic


def test_write_atomic_replaces_the_whole_content(tmp_path):
    path = tmp_path / "CURRENT"
    write_atomic(path, "a much longer first version\n")
    write_atomic(path, "v2\n")
    assert path.read_text(encoding="utf-8") == "v2\n"  # not "v2\n" over the tail of the old content
    assert os.listdir(tmp_path) == ["CURRENT"]


def test_str_is_utf8_and_bytes_are_written_as_is(tmp_path):
    write_atomic(tmp_path / "text", "café 😀")
    assert (tmp_path / "text").read_bytes() == "café 😀".encode()
    write_atomic(str(tmp_path / "blob"), b"\x00\xffraw", fsync=False)
    assert (tmp_path / "blob").read_bytes() == b"\x00\xffraw"
    with pytest.raises(TypeError, match="bytes or str"):
        write_atomic(tmp_path / "bad", 3)
    assert sorted(os.listdir(tmp_path)) == ["blob", "text"]


def test_atomic_path_yields_a_hidden_sibling_and_renames_it(tmp_path):
    path = tmp_path / "last.pt"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".last.pt.tmp-") and str(os.getpid()) in tmp.name
        assert not path.exists()  # nothing is visible under the final name until the block ends
        tmp.write_bytes(b"state")
    assert path.read_bytes() == b"state"
    assert os.listdir(tmp_path) == ["last.pt"]


def test_exception_keeps_the_old_content_and_removes_the_temp_file(tmp_path):
    path = tmp_path / "model.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(path) as tmp:
            tmp.write_text("half of the new cont")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["model.json"]


def test_a_block_that_writes_nothing_is_an_error(tmp_path):
    path = tmp_path / "x"
    path.write_text("old")
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(path):
            pass
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["x"]


def test_missing_parent_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"directory '.*missing' does not exist"):
        write_atomic(tmp_path / "missing" / "file", "x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with atomic_path(tmp_path / "missing" / "file"):
            pytest.fail("the block must not run")
    assert os.listdir(tmp_path) == []


def test_failed_fsync_removes_the_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_text("old")

    def fail(p):
        raise OSError("I/O error")

    monkeypatch.setattr(atomic, "fsync_path", fail)
    with pytest.raises(OSError, match="I/O error"):
        write_atomic(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f"]


def test_fsync_path_takes_files_and_directories(tmp_path):
    (tmp_path / "f").write_text("x")
    fsync_path(tmp_path / "f")
    fsync_path(tmp_path)
    fsync_path(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        fsync_path(tmp_path / "nope")


def test_directory_fsync_that_the_platform_refuses_is_tolerated(tmp_path, monkeypatch):
    import errno

    def refuse(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(atomic.os, "fsync", refuse)
    fsync_path(tmp_path)  # a directory: tolerated
    (tmp_path / "f").write_text("x")
    with pytest.raises(OSError):
        fsync_path(tmp_path / "f")  # a file: a real error


def test_concurrent_writers_never_leave_a_torn_file(tmp_path):
    path = tmp_path / "shared"
    payloads = [bytes([65 + i]) * (256 * 1024) for i in range(8)]
    errors = []

    def writer(data):
        try:
            for _ in range(5):
                write_atomic(path, data, fsync=False)
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert path.read_bytes() in payloads
    assert os.listdir(tmp_path) == ["shared"]


def test_imports_nothing_heavy():
    script = (
        "import sys; import cliptuner.model.atomic\n"
        "print(sorted(m for m in sys.modules if m.startswith(('cliptuner.', 'torch', 'numpy'))))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['cliptuner.model', 'cliptuner.model.atomic']"
