"""The audit log: one JSON line per change and per refusal, in ``<workspace>/audit/``. Torch-free and jina-free.

Every ``write``/``admin`` request and every refused call is one line of ``audit.jsonl``::

    {"time": "2026-12-07T16:00:00.123Z", "key_id": "3f0c9a1b2d4e", "key_name": "ci", "role": "admin",
     "endpoint": "/train", "peer": "ipv4:127.0.0.1:50012", "docs": 0, "parameters": {"data": "pairs.csv"},
     "result": "ok", "code": "OK", "error": null, "seconds": 12.5}

Parameters are kept without content: strings are cut to :data:`MAX_TEXT` characters and nesting to two levels;
docs are counted, never copied. A refusal has ``"result": "refused"``, the gRPC code and the reason.

Lines are handed to a writer thread (:meth:`AuditLog.record` never blocks a request on the disk); the thread
appends what has queued, flushes and fsyncs, under an exclusive ``flock`` on ``audit/.lock`` so that the gateway
and the HTTP front (two processes) append to one file. When ``audit.jsonl`` would pass ``max_bytes`` it becomes
``audit.1.jsonl`` (``.1`` becomes ``.2`` …, ``keep`` files in all). The same thread keeps, every
``usage_every`` seconds, the time each key was last used in ``audit/keys-used.json`` (``cliptuner keys list``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Optional

from cliptuner.model.atomic import write_atomic

logger = logging.getLogger(__name__)

LOG_NAME = "audit.jsonl"
USAGE_NAME = "keys-used.json"
LOCK_NAME = ".lock"
MAX_TEXT = 200  # characters of a string parameter kept in a line
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_KEEP = 8


def timestamp(at: Optional[float] = None) -> str:
    """UTC ISO 8601 with milliseconds."""
    moment = datetime.fromtimestamp(time.time() if at is None else at, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def scrub(value: Any, depth: int = 0) -> Any:
    """A request's parameters as a line keeps them: strings cut, lists shortened, two levels of nesting."""
    if isinstance(value, str):
        return value if len(value) <= MAX_TEXT else value[:MAX_TEXT] + f"…(+{len(value) - MAX_TEXT})"
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if depth >= 2:
        return f"<{type(value).__name__}>"
    if isinstance(value, dict):
        return {str(k)[:MAX_TEXT]: scrub(v, depth + 1) for k, v in list(value.items())[:50]}
    if isinstance(value, (list, tuple)):
        items = [scrub(v, depth + 1) for v in value[:20]]
        return items + [f"…(+{len(value) - 20})"] if len(value) > 20 else items
    return f"<{type(value).__name__}>"


class AuditLog:
    """Appends audit lines from a writer thread; see the module's docstring.

    Args:
        folder: ``<workspace>/audit``.
        max_bytes: the size at which ``audit.jsonl`` is rotated.
        keep: how many files (the current one and rotated ones) are kept.
        usage_every: seconds between writes of ``keys-used.json``.
    """

    def __init__(
        self,
        folder: Path,
        max_bytes: int = DEFAULT_MAX_BYTES,
        keep: int = DEFAULT_KEEP,
        usage_every: float = 10.0,
    ) -> None:
        if max_bytes < 1024:
            raise ValueError(f"max_bytes must be at least 1024, got {max_bytes}")
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.keep, self.usage_every = max_bytes, keep, usage_every
        self._queue: queue.Queue[Optional[dict]] = queue.Queue()
        self._used: dict[str, str] = {}
        self._used_lock = threading.Lock()
        self._last_usage_write = 0.0
        self._thread = threading.Thread(target=self._run, name="audit-log", daemon=True)
        self._closed = False
        self._thread.start()

    # -- producers --------------------------------------------------------------------------------------------
    def record(self, **entry: Any) -> None:
        """Queue one line (``time`` is added); returns at once."""
        if self._closed:
            return
        self._queue.put({"time": timestamp(), **entry})

    def refusal(self, exc: Any, principal: Any, endpoint: str, method: str, peer: Optional[str]) -> None:
        """Queue the line of a refused call: ``exc`` an ``AccessError``, ``principal`` the caller or ``None``."""
        self.record(
            key_id=principal.id if principal else getattr(exc, "key_id", None),
            key_name=principal.name if principal else None,
            role=principal.role if principal else None,
            endpoint=endpoint,
            method=method,
            peer=peer,
            result="refused",
            code=exc.code,
            error=str(exc),
        )

    def note_use(self, key_id: Optional[str]) -> None:
        """Remember that ``key_id`` was used now (written to ``keys-used.json`` within ``usage_every`` s)."""
        if key_id is None:
            return
        with self._used_lock:
            self._used[key_id] = timestamp()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every line queued so far is on disk (for tests and shutdown)."""
        done = threading.Event()
        self._queue.put({"__flush__": done})  # type: ignore[dict-item]
        done.wait(timeout)

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    # -- the writer thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            try:
                first = self._queue.get(timeout=self.usage_every)
            except queue.Empty:
                first = {}
            batch = [first]
            while True:  # everything queued meanwhile goes in the same write and fsync
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is None for item in batch)
            lines = [item for item in batch if item and "__flush__" not in item]
            flushes = [item["__flush__"] for item in batch if item and "__flush__" in item]
            try:
                with self._locked():
                    if lines:
                        self._append(lines)
                    if stop or flushes or time.monotonic() - self._last_usage_write >= self.usage_every:
                        self._write_usage()
            except OSError as exc:  # a full disk must not stop the service; it is logged
                logger.error("audit log: %d lines not written: %s", len(lines), exc)
            for done in flushes:
                done.set()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.folder / LOCK_NAME, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _append(self, lines: list[dict]) -> None:
        data = "".join(json.dumps(line, default=str, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")
        path = self.folder / LOG_NAME
        with contextlib.suppress(FileNotFoundError):
            size = path.stat().st_size
            if size and size + len(data) > self.max_bytes:
                self._rotate()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _rotate(self) -> None:
        oldest = self.folder / f"audit.{self.keep - 1}.jsonl"
        if self.keep == 1:
            (self.folder / LOG_NAME).unlink(missing_ok=True)
            return
        oldest.unlink(missing_ok=True)
        for i in range(self.keep - 2, 0, -1):
            src = self.folder / f"audit.{i}.jsonl"
            if src.exists():
                os.replace(src, self.folder / f"audit.{i + 1}.jsonl")
        os.replace(self.folder / LOG_NAME, self.folder / "audit.1.jsonl")

    def _write_usage(self) -> None:
        self._last_usage_write = time.monotonic()
        with self._used_lock:
            fresh, self._used = self._used, {}
        if not fresh:
            return
        merged = read_usage(self.folder)
        merged.update({k: v for k, v in fresh.items() if v > merged.get(k, "")})
        write_atomic(self.folder / USAGE_NAME, json.dumps(merged, indent=1, sort_keys=True) + "\n")


def read_usage(folder: Path) -> dict[str, str]:
    """Key id -> when it was last used, from ``keys-used.json`` (empty when there is none)."""
    try:
        data = json.loads((Path(folder) / USAGE_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def log_files(folder: Path) -> list[Path]:
    """The audit files, oldest first."""
    folder = Path(folder)
    rotated = sorted(
        (p for p in folder.glob("audit.*.jsonl") if p.name.split(".")[1].isdigit()),
        key=lambda p: -int(p.name.split(".")[1]),
    )
    current = folder / LOG_NAME
    return rotated + ([current] if current.exists() else [])


def tail(folder: Path, lines: int = 20) -> list[dict]:
    """The last ``lines`` entries, oldest first (a line that is not JSON is shown as ``{"unreadable": text}``)."""
    out: list[dict] = []
    for path in reversed(log_files(folder)):
        chunk = []
        for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not text.strip():
                continue
            try:
                chunk.append(json.loads(text))
            except json.JSONDecodeError:
                chunk.append({"unreadable": text[:MAX_TEXT]})
        out = chunk + out
        if len(out) >= lines:
            break
    return out[-lines:] if lines > 0 else []
