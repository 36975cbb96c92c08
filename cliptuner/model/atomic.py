"""Atomic file replacement: write next to the destination, fsync, ``os.replace``, fsync the directory.

A reader of ``path`` sees either the old content or the complete new content, never a partial file; after
the call returns the new content survives a crash. Torch-free and imports nothing else from cliptuner.

Example::

    with atomic_path(ckpt_dir / "last.pt") as tmp:
        torch.save(state, tmp)

    write_atomic(root / "CURRENT", "v3\\n")
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Union

__all__ = ["fsync_path", "atomic_path", "write_atomic"]

# errnos some platforms / filesystems return when asked to fsync a directory (or when it is not supported)
_DIR_FSYNC_UNSUPPORTED = {
    errno.EINVAL,
    errno.EBADF,
    errno.EACCES,
    errno.EPERM,
    errno.EISDIR,
    getattr(errno, "ENOTSUP", errno.EINVAL),
    getattr(errno, "EOPNOTSUPP", errno.EINVAL),
}


def fsync_path(path: Union[str, os.PathLike]) -> None:
    """Flush a file's or a directory's data and metadata to disk.

    Directories are opened read-only; where the platform cannot open or fsync a directory (Windows, some
    network filesystems) this returns quietly. A missing path raises ``FileNotFoundError``.
    """
    path = Path(path)
    is_dir = path.is_dir()
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if is_dir else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if is_dir and exc.errno in _DIR_FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (is_dir and exc.errno in _DIR_FSYNC_UNSUPPORTED):
            raise
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    """A hidden sibling of ``path``, unique per process and thread (random suffix)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: Union[str, os.PathLike], *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block ends normally it replaces ``path`` atomically.

    The caller writes the whole file at the yielded path (``torch.save(state, tmp)``, ``index.save(str(tmp))``…).
    On normal exit the temp file is fsynced, renamed onto ``path`` with ``os.replace`` and the parent
    directory is fsynced (``fsync=False`` skips both fsyncs: atomic against readers, not against crashes).
    If the block raises, the temp file is removed, ``path`` keeps its old content, and the error propagates.

    Raises:
        FileNotFoundError: the parent directory of ``path`` does not exist.
        FileNotFoundError: the block finished without creating the temp file.
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(
            errno.ENOENT,
            f"cannot write {str(path)!r} atomically: directory {str(parent)!r} does not exist",
            str(parent),
        )
    tmp = _temp_name(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(errno.ENOENT, f"nothing was written to the temp file for {str(path)!r}", str(tmp))
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # only still there when something failed before the rename
    if fsync:
        fsync_path(parent)


def write_atomic(path: Union[str, os.PathLike], data: Union[bytes, str], *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` (a ``str`` is written as UTF-8) atomically; see :func:`atomic_path`."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    elif not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"write_atomic takes bytes or str, got {type(data).__name__}")
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
