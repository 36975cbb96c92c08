"""Model versions on disk: the seam between training (which publishes) and serving (which follows CURRENT).

Layout::

    <root>/v1/              a model directory (see cliptuner.model.manifest): model.json, the ONNX graphs, the vocab…
    <root>/v2/...
    <root>/CURRENT          the name of the version to serve, one line

Publishing checks the prepared model directory (:meth:`cliptuner.model.manifest.ModelManifest.read`), copies (or
moves) it into ``<root>/.tmp-<uuid>``, writes the version name into its ``model.json``, fsyncs, and renames it
to ``<root>/<version>`` — a rename is atomic, so a reader sees either no version or a complete one, never a
half-written one. CURRENT is then replaced atomically (:func:`cliptuner.model.atomic.write_atomic`). Publishers and
``set_current`` serialise on ``fcntl.flock`` of ``<root>/.lock``, which works across threads, processes and
replicas sharing a POSIX volume. Torch-free.

A publisher killed mid-copy leaves its temp directory behind (never listed, never served). Temp directories are
named for their owner, ``.tmp-<host>-<pid>-<uuid>`` (``<host>`` a short hash of who can see that pid), and
:meth:`Registry.clean_temps`, which publishers call when they start, removes the leftovers: a temp directory
whose owner ran on this host is removed once that process is gone (never while it lives, however long the copy
takes); a temp entry whose owner cannot be checked (another host's, an older name, the ``.CURRENT.tmp-*`` file
of an interrupted :func:`~cliptuner.model.atomic.write_atomic`) once nothing in it changed for a grace period.

Operating on versions (``cliptuner models …``, the tuner's ``/models`` endpoints):

- :meth:`Registry.summaries` lists every version with its lineage, its report's headline numbers and its status:
  ``current``, ``candidate`` (the evaluation gate refused it: :mod:`cliptuner.model.gate`) or ``published``.
- :meth:`Registry.promote` points CURRENT at a published version once its manifest and files check out.
- :meth:`Registry.rollback` points CURRENT at the version before it, by lineage: the CURRENT version's
  ``parent_version`` (the version it was tuned from) while that is still published, else the version just before
  it in natural order. No history file is kept: the rule reads only what is on disk, so every process and every
  replica agrees on it. Rolling back again walks further down the lineage (``v3`` → ``v2`` → ``v1``), never
  back up; use promote to go forward.
- :meth:`Registry.prune` deletes all but the newest ``keep`` versions in natural order, never CURRENT. Each
  version is first renamed to a temp name under the lock (a reader sees the whole version or none of it), then
  deleted; a deletion cut short leaves a temp entry that :meth:`Registry.clean_temps` removes.

CURRENT changes and prunes take the same lock as publishes, so none of them sees another half done.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from cliptuner.model.atomic import fsync_path, write_atomic
from cliptuner.model.gate import gate_status
from cliptuner.model.manifest import MANIFEST_FILE, ModelManifest

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
HEADLINE_METRICS = ("t2i_r5", "i2t_r5", "mean_recall")  # what a version summary shows of before / after


class CurrentMoved(ValueError):
    """A publish that was to replace CURRENT found it naming another version than the one the caller expected."""

    def __init__(self, message: str, current: Optional[str]) -> None:
        super().__init__(message)
        self.current = current


@dataclasses.dataclass(frozen=True)
class CurrentChange:
    """What a promote or a rollback did to CURRENT."""

    version: str  # what CURRENT names now
    previous: Optional[str]  # what it named before (None on a registry that had no CURRENT)

    @property
    def changed(self) -> bool:
        return self.version != self.previous


def _headline(report: Any) -> Optional[dict[str, Any]]:
    """The numbers of a training report a listing shows: ``epochs`` and ``before``/``after`` headline recalls."""
    if not isinstance(report, dict):
        return None
    out: dict[str, Any] = {"epochs": report.get("epochs")}
    for side in ("before", "after"):
        metrics = report.get(side)
        out[side] = {k: metrics[k] for k in HEADLINE_METRICS if k in metrics} if isinstance(metrics, dict) else None
    out["gate"] = gate_status(report)
    return out


def version_status(current: bool, report: Any) -> str:
    """How a listing names a version: ``current``; ``candidate`` (the gate refused it, it never went live unless an
    admin promotes it); ``published`` (any other: served before, a base, one published by hand)."""
    if current:
        return "current"
    gate = gate_status(report)
    return "candidate" if gate is not None and not gate["promoted"] else "published"


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
    return stat[stat.rindex(")") + 2 :].split(" ", 1)[0] != "Z"


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
            if (
                _VERSION_RE.match(entry.name)
                and entry.name not in _RESERVED
                and entry.is_dir()
                and (entry / MANIFEST_FILE).is_file()
            ):
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

    def summaries(self) -> list[dict[str, Any]]:
        """One summary per published version, in natural order (as :meth:`versions`).

        Each is ``{"version", "current", "status", "created_at", "parent_version", "arch", "report"}`` where
        ``status`` is :func:`version_status`'s, ``created_at`` is the export time of ``model.json`` (ISO 8601, UTC)
        and ``report`` is None for a version published without a training report (a base version), else
        ``{"epochs", "before", "after", "gate"}`` with the :data:`HEADLINE_METRICS` of each side and the gate's
        ``{"promoted", "reason"}`` (None for a run without a gate decision). A version whose manifest or files do not check out is listed with
        None for what could not be read and ``"error"`` saying why; a version deleted while listing is left out.
        """
        current = self.current()
        out = []
        for version in self.versions():
            entry: dict[str, Any] = {
                "version": version,
                "current": version == current,
                "status": "current" if version == current else "published",
                "created_at": None,
                "parent_version": None,
                "arch": None,
                "report": None,
            }
            try:
                manifest = ModelManifest.read(self.root / version)
            except ValueError as exc:
                if not (self.root / version).is_dir():  # pruned meanwhile: not a version any more
                    continue
                entry["error"] = str(exc)
            else:
                entry.update(
                    status=version_status(version == current, manifest.report),
                    created_at=manifest.created_at,
                    parent_version=manifest.parent_version,
                    arch=manifest.arch,
                    report=_headline(manifest.report),
                )
            out.append(entry)
        return out

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

    def publish(
        self,
        src_dir: str | Path,
        version: Optional[str] = None,
        *,
        make_current: bool = True,
        move: bool = False,
        expect_current: Optional[str] = None,
    ) -> str:
        """Publish a prepared model directory as a new version and (by default) point CURRENT at it.

        Args:
            src_dir: a model directory that :meth:`ModelManifest.read <cliptuner.model.manifest.ModelManifest.read>`
                accepts (:func:`cliptuner.train.export.export_model_dir` writes one).
            version: the name to publish under; default the next of ``v1``, ``v2``, …
            make_current: replace CURRENT with the new version.
            move: move ``src_dir`` instead of copying it (a rename when on the same filesystem).
            expect_current: with ``make_current``, publish only if CURRENT still names this version (checked under
                the lock, so no promote or rollback slips in between); None: whatever CURRENT names.

        Returns:
            The version name.

        Raises:
            CurrentMoved: CURRENT no longer names ``expect_current``; nothing is published (as for OSError below).
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
                current = self.current()
                if make_current and expect_current is not None and current != expect_current:
                    raise CurrentMoved(
                        f"CURRENT of {str(self.root)!r} moved from {expect_current!r} to {current!r}", current
                    )
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
            logger.warning(
                "removed %s from %s: a leftover of an interrupted publish (%s)", entry.name, self.root, reason
            )
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

    def promote(self, version: str) -> CurrentChange:
        """Point CURRENT at a published version after checking that it can be served.

        The version's ``model.json`` must read and check (:meth:`ModelManifest.read
        <cliptuner.model.manifest.ModelManifest.read>`) and every file it names must be there and not empty. Promoting
        the version CURRENT already names changes nothing.

        Returns:
            The version now CURRENT and the one before.

        Raises:
            ValueError: the version is not published (names the known ones), or its manifest or files do not check
                out (names the version and the problem); CURRENT is then unchanged.
        """
        with self._lock():
            previous = self.current()
            self._check_servable(version)
            if version != previous:
                write_atomic(self.root / CURRENT_FILE, version + "\n")
        logger.info("CURRENT of %s: %s (was %s)", self.root, version, previous)
        return CurrentChange(version=version, previous=previous)

    def rollback_target(self) -> str:
        """The version :meth:`rollback` would make CURRENT (see the rule there), without changing anything.

        Raises:
            ValueError: no CURRENT, or no version before it (names CURRENT and the published versions).
        """
        current = self.current()
        if current is None:
            raise ValueError(f"nothing to roll back in {str(self.root)!r}: no CURRENT version")
        versions = self.versions()
        parent = None
        with contextlib.suppress(ValueError):  # CURRENT's manifest unreadable: fall back to the natural order
            parent = ModelManifest.read(self.root / current).parent_version
        if parent and parent != current and parent in versions:
            return parent
        earlier = [v for v in versions if _natural_key(v) < _natural_key(current) and not self._refused(v)]
        if not earlier:
            why = f"its parent version {parent!r} is no longer published and" if parent else "it has no parent and"
            raise ValueError(
                f"cannot roll back from model version {current!r}: {why} no version precedes it; published: {versions}"
            )
        return earlier[-1]

    def _refused(self, version: str) -> bool:
        """Whether the gate refused ``version`` (a candidate that never went live by itself)."""
        try:
            gate = gate_status(ModelManifest.read(self.root / version).report)
        except ValueError:
            return False
        return gate is not None and not gate["promoted"]

    def rollback(self) -> CurrentChange:
        """Point CURRENT at the version before it.

        The rule: the CURRENT version's ``parent_version`` (the version it was tuned from) if it is still
        published; else the newest version that precedes CURRENT in natural order (``v9`` before ``v10``) and that
        the gate did not refuse (a candidate never served goes live only by a promote). Only
        what is on disk counts (no history is kept), so rolling back twice walks two steps down the lineage.
        The target is checked as :meth:`promote` checks a version.

        Returns:
            The version now CURRENT and the one before.

        Raises:
            ValueError: no CURRENT, no version before it, or that version's manifest or files do not check out
                (names it); CURRENT is then unchanged.
        """
        with self._lock():
            previous = self.current()
            target = self.rollback_target()
            try:
                self._check_servable(target)
            except ValueError as exc:
                raise ValueError(f"cannot roll back from model version {previous!r} to {target!r}: {exc}") from None
            write_atomic(self.root / CURRENT_FILE, target + "\n")
        logger.info("CURRENT of %s rolled back: %s (was %s)", self.root, target, previous)
        return CurrentChange(version=target, previous=previous)

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` versions in natural order; CURRENT is always kept.

        Under the registry lock each version to delete is renamed to a temp name, so a reader sees it whole or
        not at all; the renamed directories are then deleted after the lock is released. A deletion cut short
        (a crash) leaves a temp entry of this process that :meth:`clean_temps` removes later. A version some
        process still serves from memory keeps serving; only a new load of it fails.

        Args:
            keep: how many of the newest versions to keep (>= 1); CURRENT is kept besides them when older.

        Returns:
            The versions deleted, in natural order.

        Raises:
            ValueError: ``keep`` is not an integer >= 1.
            OSError: a rename failed; the versions renamed before it are deleted, the others left as they were.
        """
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
        doomed: list[tuple[str, Path]] = []
        try:
            with self._lock():
                current = self.current()
                versions = self.versions()
                for version in versions[:-keep]:
                    if version == current:
                        continue
                    tmp = self.root / temp_name()
                    os.rename(self.root / version, tmp)
                    doomed.append((version, tmp))
                if doomed:
                    fsync_path(self.root)
        finally:
            for version, tmp in doomed:
                try:
                    shutil.rmtree(tmp)
                except OSError as exc:  # clean_temps removes it once this process is gone
                    logger.warning(
                        "pruned model version %s of %s, but could not delete %s yet: %s",
                        version,
                        self.root,
                        tmp.name,
                        exc,
                    )
        deleted = [version for version, _ in doomed]
        if deleted:
            logger.info(
                "pruned model versions %s from %s (kept the newest %d and CURRENT %s)",
                deleted,
                self.root,
                keep,
                current,
            )
        return deleted

    def _check_servable(self, version: str) -> None:
        """Raise ValueError (naming the version) unless it is published and its manifest and files check out."""
        path = self.path(version)
        try:
            manifest = ModelManifest.read(path)
        except ValueError as exc:
            raise ValueError(f"model version {version!r} cannot be served: {exc}") from None
        empty = [name for name in manifest.files() if (path / name).stat().st_size == 0]
        if empty:
            raise ValueError(f"model version {version!r} cannot be served: empty files {empty}")

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not _VERSION_RE.match(name) or name in _RESERVED:
            raise ValueError(
                f"invalid version name {name!r}: use letters, digits, '.', '_' or '-', starting with a "
                f"letter or digit (not {sorted(_RESERVED)})"
            )
        if (self.root / name).exists():
            raise ValueError(f"version {name!r} already exists in {str(self.root)!r}; published: {self.versions()}")
