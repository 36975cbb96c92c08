"""Serve whatever version a registry's CURRENT names, swapping models atomically when it moves.

:class:`ModelFollower` holds one :class:`~cliptuner.model.runtime.OnnxClip`. :meth:`ModelFollower.clip` first checks
``CURRENT`` with one ``os.stat`` (inode, mtime, size: ``os.replace`` gives the file a new inode), and only when
that changed reads the name and, for a new version, builds the new sessions and replaces the reference. A
caller takes the reference once per request and uses it for the whole request, so a request is served by one
version from start to end while the next one already sees the new version. No restart, no lock on the
request path (only loading a new version is serialised). Torch-free.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Optional

from cliptuner.model.registry import CURRENT_FILE, Registry
from cliptuner.model.runtime import OnnxClip

logger = logging.getLogger(__name__)

_Signature = Optional[tuple[int, int, int]]


class ModelFollower:
    """The ONNX model of the registry's CURRENT version, reloaded when CURRENT changes.

    Thread-safe.

    Args:
        registry: the registry to follow (or its directory).
        device: passed to :class:`OnnxClip` (``auto``, ``cpu``, ``cuda``, ``cuda:N``).
        intra_op_threads: passed to :class:`OnnxClip`.
        batch_size: passed to :class:`OnnxClip`.
    """

    def __init__(
        self,
        registry: Registry | str | Path,
        device: str = "auto",
        intra_op_threads: Optional[int] = None,
        batch_size: int = 32,
    ) -> None:
        self.registry = registry if isinstance(registry, Registry) else Registry(registry)
        self.device = device
        self.intra_op_threads = intra_op_threads
        self.batch_size = batch_size
        self._clip: Optional[OnnxClip] = None
        self._signature: _Signature = None
        self._load_lock = threading.Lock()
        self.last_error: Optional[str] = None  # why the newest CURRENT could not be loaded, if it could not

    def _stat(self) -> _Signature:
        try:
            st = os.stat(self.registry.root / CURRENT_FILE)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def open(self, version: str) -> OnnxClip:
        """A new :class:`OnnxClip` of a published version (not cached, not made current here).

        Raises:
            ValueError: the version is not published or its directory is not a model.
        """
        return OnnxClip(
            self.registry.path(version),
            device=self.device,
            intra_op_threads=self.intra_op_threads,
            batch_size=self.batch_size,
        )

    @property
    def version(self) -> Optional[str]:
        """The version served now (None before the first load)."""
        clip = self._clip
        return None if clip is None else clip.version

    def clip(self) -> OnnxClip:
        """The model to use for one request: CURRENT's, after a cheap check that CURRENT did not move.

        Raises:
            RuntimeError: the registry has no CURRENT version yet and nothing was loaded before.
        """
        if self._clip is None or self._stat() != self._signature:
            self.refresh()
        clip = self._clip
        if clip is None:
            raise RuntimeError(f"no model version to serve: {str(self.registry.root)!r} has no CURRENT")
        return clip

    def refresh(self, strict: bool = False) -> bool:
        """Re-read CURRENT and swap to its version if it is not the one served.

        A version that fails to load is logged and the old one keeps serving, unless ``strict``.

        Args:
            strict: raise when CURRENT cannot be loaded instead of keeping the old version.

        Returns:
            True when the served version changed.

        Raises:
            ValueError: ``strict`` (or nothing is served yet) and CURRENT's version cannot be loaded (a bad
                directory; a corrupt ONNX file raises onnxruntime's own error instead).
            RuntimeError: ``strict`` and the registry has no CURRENT.
        """
        with self._load_lock:
            signature = self._stat()
            version = self.registry.current()
            if version is None:
                if strict:
                    raise RuntimeError(f"{str(self.registry.root)!r} has no CURRENT model version")
                return False
            if self._clip is not None and self._clip.version == version:
                self._signature = signature
                return False
            try:
                clip = self.open(version)
            except Exception as exc:  # onnxruntime's own errors (InvalidProtobuf, Fail) derive from Exception only
                self.last_error = f"cannot load model version {version!r}: {exc}"
                self._signature = signature  # do not retry on every request; the next CURRENT change retries
                if strict or self._clip is None:
                    raise
                logger.error("%s; still serving %s", self.last_error, self._clip.version)
                return False
            old = self.version
            self._clip = clip  # one reference assignment: a request sees the old model or the new one
            self._signature = signature
            self.last_error = None
            logger.info("now serving model version %s (was %s)", version, old)
            return True
