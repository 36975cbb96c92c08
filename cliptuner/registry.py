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
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

from .atomic import fsync_path, write_atomic
from .manifest import MANIFEST_FILE, ModelManifest

logger = logging.getLogger(__name__)

CURRENT_FILE = "CURRENT"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_AUTO_VERSION_RE = re.compile(r"^v(\d+)$")
_RESERVED = {CURRENT_FILE}


def _natural_key(name: str) -> list[Any]:
    """``v2`` < ``v10``: digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


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
        """
        src = Path(src_dir)
        manifest = ModelManifest.read(src)
        if version is not None:
            self._check_new_name(version)
        tmp = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        if move:
            shutil.move(str(src), str(tmp))
        else:
            shutil.copytree(src, tmp)
        try:
            _fsync_tree(tmp, skip=(MANIFEST_FILE,))
            with self._lock():
                name = version if version is not None else self._next_version()
                self._check_new_name(name)
                dataclasses.replace(manifest, version=name).write(tmp)
                os.rename(tmp, self.root / name)
                fsync_path(self.root)
                if make_current:
                    write_atomic(self.root / CURRENT_FILE, name + "\n")
        except BaseException:
            if tmp.exists():
                if move:
                    shutil.move(str(tmp), str(src))  # give the caller its directory back
                else:
                    shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("published model version %s in %s%s", name, self.root, " (CURRENT)" if make_current else "")
        return name

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
