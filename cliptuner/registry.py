"""Model versions on disk: the seam between training (which publishes) and serving (which follows CURRENT).

Layout::

    <root>/v1/              a model directory (see cliptuner.manifest): model.json, the ONNX graphs, the vocab…
    <root>/v2/...
    <root>/CURRENT          the name of the version to serve, one line

Publishing checks the prepared model directory (:meth:`cliptuner.manifest.ModelManifest.read`), copies (or
moves) it into ``<root>/.tmp-<uuid>``, writes the version name into its ``model.json``, fsyncs, and renames it
to ``<root>/<version>`` — a rename is atomic, so a reader sees either no version or a complete one, never a
half-written one. CURRENT is then replaced atomically (:func:`cliptuner.atomic.write_atomic`). Publishers and
``set_current`` serialise on ``fcntl.flock`` of ``<root>/.lock``, which works across threads, processes and
replicas sharing a POSIX volume. Torch-free.

A publisher killed mid-copy leaves its temp directory behind (never listed, never served). Temp directories are
named for their owner, ``.tmp-<host>-<pid>-<uuid>`` (``<host>`` a short hash of who can see that pid), and
:meth:`Registry.clean_temps`, which publishers call when they start, removes the leftovers: a temp directory
whose owner ran on this host is removed once that process is gone (never while it lives, however long the copy
takes); a temp entry whose owner cannot be checked (another host's, an older name, the ``.CURRENT.tmp-*`` file
of an interrupted :func:`~cliptuner.atomic.write_atomic`) once nothing in it changed for a grace period.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

from .atomic import fsync_path, write_atomic
from .manifest import MANIFEST_FILE, ModelManifest

logger = logging.getLogger(__name__)

CURRENT_FILE = "CURRENT"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
TEMP_GRACE_SECONDS = 3600.0  # a temp entry whose owner cannot be checked is a leftover once untouched this long
_OWNED_TEMP_RE = re.compile(r"^\.tmp-([0-9a-f]{8})-(\d+)-[0-9a-f]+$")  # .tmp-<host>-<pid>-<uuid>
_ANY_TEMP_RE = re.compile(r"^\.(tmp-.+|.+\.tmp-\d+-[0-9a-f]+)$")  # publish's (any age of this code), write_atomic's
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_AUTO_VERSION_RE = re.compile(r"^v(\d+)$")
_RESERVED = {CURRENT_FILE}


def _natural_key(name: str) -> list[Any]:
    """``v2`` < ``v10``: digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def _host_tag() -> str:
    """Who can see our pids: a hash of the host name, the boot and the pid namespace.

    Two containers of one machine share the host name under host networking but not their pids; a reboot ends
    every publisher. Where a part cannot be read it is left out (the host name alone still separates hosts).
    """
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))  # e.g. 'pid:[4026531836]'
    return hashlib.sha1("\0".join(parts).encode("utf-8")).hexdigest()[:8]


_HOST_TAG = _host_tag()


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie, killed but not yet reaped, counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no procfs: trust kill(0)
        return True
    return stat[stat.rindex(")") + 2:].split(" ", 1)[0] != "Z"


def _last_touched(path: Path) -> float:
    """Newest mtime of ``path`` and, for a directory, of everything under it (a copy in progress moves it)."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest


def temp_name() -> str:
    """A fresh temp entry name for the registry root, naming its owner: ``.tmp-<host>-<pid>-<uuid>``."""
    return f"{TMP_PREFIX}{_HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex}"


def _fsync_tree(root: Path, skip: tuple[str, ...] = ()) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if name not in skip:
                fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


class Registry:
    """Published model versions under ``root`` and the CURRENT pointer.

    Args:
        root: the registry directory (created if missing).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # -- reading -------------------------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Published versions, sorted numerically (``v2`` before ``v10``); temp dirs are never listed."""
        found = []
        for entry in self.root.iterdir():
            if (_VERSION_RE.match(entry.name) and entry.name not in _RESERVED and entry.is_dir()
                    and (entry / MANIFEST_FILE).is_file()):
                found.append(entry.name)
        return sorted(found, key=_natural_key)

    def current(self) -> Optional[str]:
        """The version CURRENT names, or None before the first publish."""
        try:
            name = (self.root / CURRENT_FILE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return name or None

    def current_path(self) -> Optional[Path]:
        """Directory of the CURRENT version, or None before the first publish."""
        name = self.current()
        return None if name is None else self.path(name)

    def path(self, version: str) -> Path:
        """Directory of a published version.

        Raises:
            ValueError: the version is not published (names the known versions).
        """
        if isinstance(version, str) and _VERSION_RE.match(version) and version not in _RESERVED:
            candidate = self.root / version
            if candidate.is_dir() and (candidate / MANIFEST_FILE).is_file():
                return candidate
        raise ValueError(f"unknown model version {version!r} in {str(self.root)!r}; known: {self.versions()}")

    def manifest(self, version: str) -> ModelManifest:
        """The checked manifest of a published version.

        Raises:
            ValueError: the version is not published, or its directory is no longer a valid model directory.
        """
        return ModelManifest.read(self.path(version))

    def metadata(self, version: str) -> dict[str, Any]:
        """``model.json`` of a published version, as a dict."""
        return self.manifest(version).to_dict()

    # -- writing -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.root / LOCK_FILE, "a+") as fh:  # one open file per holder: flock excludes threads too
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _next_version(self) -> str:
        numbers = [int(m.group(1)) for name in self.versions() if (m := _AUTO_VERSION_RE.match(name))]
        number = max(numbers, default=0) + 1
        while (self.root / f"v{number}").exists():  # a stray entry that is not a published version
            number += 1
        return f"v{number}"

    def publish(self, src_dir: str | Path, version: Optional[str] = None, *, make_current: bool = True,
                move: bool = False) -> str:
        """Publish a prepared model directory as a new version and (by default) point CURRENT at it.

        Args:
            src_dir: a model directory that :meth:`ModelManifest.read <cliptuner.manifest.ModelManifest.read>`
                accepts (:func:`cliptuner.export.export_model_dir` writes one).
            version: the name to publish under; default the next of ``v1``, ``v2``, …
            make_current: replace CURRENT with the new version.
            move: move ``src_dir`` instead of copying it (a rename when on the same filesystem).

        Returns:
            The version name.

        Raises:
            ValueError: ``src_dir`` is not a valid model directory (no or a bad ``model.json``, a missing file), or
                the version name is invalid or already published.
            OSError: copying, renaming or writing CURRENT failed. Nothing is published then: no temp directory
                is left, the version is not listed, CURRENT is unchanged, and a moved ``src_dir`` is given back.
        """
        src = Path(src_dir)
        manifest = ModelManifest.read(src)
        if version is not None:
            self._check_new_name(version)
        tmp = self.root / temp_name()
        try:
            if move:
                shutil.move(str(src), str(tmp))
            else:
                shutil.copytree(src, tmp)
            _fsync_tree(tmp, skip=(MANIFEST_FILE,))
            with self._lock():
                name = version if version is not None else self._next_version()
                self._check_new_name(name)
                dataclasses.replace(manifest, version=name).write(tmp)
                os.rename(tmp, self.root / name)
                try:
                    fsync_path(self.root)
                    if make_current:
                        write_atomic(self.root / CURRENT_FILE, name + "\n")
                except BaseException:
                    if self.current() != name:  # not published after all: CURRENT never named it
                        os.rename(self.root / name, tmp)
                    raise
        except BaseException:
            if tmp.exists():
                if move and not src.exists():
                    shutil.move(str(tmp), str(src))  # give the caller its directory back
                else:  # a copy, or a move across filesystems that failed before removing the source
                    shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("published model version %s in %s%s", name, self.root, " (CURRENT)" if make_current else "")
        return name

    def clean_temps(self, grace: float = TEMP_GRACE_SECONDS) -> list[str]:
        """Remove temp entries that crashed publishers left in the root; keep those a live publisher may be filling.

        An entry whose owner ran on this host (its name holds host and pid) is removed when that process is gone
        and kept while it lives, whatever its age. An entry whose owner cannot be checked (one of another host, a
        name without an owner, such as the ``.CURRENT.tmp-*`` file of an interrupted atomic write) is removed
        when nothing in it changed for ``grace`` seconds. Published versions, CURRENT and the lock files are never
        touched. An entry that cannot be removed (permissions) is logged and left. Call it when a publisher starts.

        Args:
            grace: seconds after its last change that an entry of an owner that cannot be checked counts as left
                over; keep it well above the longest copy of a model directory.

        Returns:
            The names removed.

        Raises:
            ValueError: ``grace`` is negative.
        """
        if not grace >= 0:
            raise ValueError(f"grace must be >= 0 seconds, got {grace!r}")
        removed = []
        now = time.time()
        for entry in self.root.iterdir():
            if not _ANY_TEMP_RE.match(entry.name):
                continue
            owned = _OWNED_TEMP_RE.match(entry.name)
            try:
                if owned and owned.group(1) == _HOST_TAG:
                    if _pid_alive(int(owned.group(2))):
                        continue
                    reason = f"its publisher (pid {owned.group(2)}) is gone"
                elif now - _last_touched(entry) > grace:
                    reason = f"unchanged for over {grace:g} s"
                else:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except FileNotFoundError:  # renamed into place or removed by someone else meanwhile
                continue
            except OSError as exc:  # a leftover that cannot go yet must not keep a service from starting
                logger.warning("could not remove the leftover %s from %s: %s", entry.name, self.root, exc)
                continue
            removed.append(entry.name)
            logger.warning("removed %s from %s: a leftover of an interrupted publish (%s)", entry.name, self.root,
                           reason)
        return removed

    def set_current(self, version: str) -> None:
        """Point CURRENT at a published version (a rollback, or a promotion of one published with make_current=False).

        Raises:
            ValueError: the version is not published.
        """
        with self._lock():
            self.path(version)
            write_atomic(self.root / CURRENT_FILE, version + "\n")
        logger.info("CURRENT of %s is now %s", self.root, version)

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not _VERSION_RE.match(name) or name in _RESERVED:
            raise ValueError(f"invalid version name {name!r}: use letters, digits, '.', '_' or '-', starting with a "
                             f"letter or digit (not {sorted(_RESERVED)})")
        if (self.root / name).exists():
            raise ValueError(f"version {name!r} already exists in {str(self.root)!r}; published: {self.versions()}")
