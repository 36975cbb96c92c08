"""What every way of running a training worker shares: its events file read as it grows, and the error of a run that
failed (jina-free, torch-free).

A worker (:mod:`cliptuner.train.worker`) says what happens only through its events file: one JSON object a line,
the training events of rank 0 and, when a rank fails, one ``failed`` event (``phase``, ``kind``, ``message``). A
local worker process (:class:`cliptuner.serve.runs.TrainingProcess`) and a Kubernetes Job of several pods
(:class:`cliptuner.serve.cluster.KubernetesJobRun`) both write that file into the run directory, so both follow it
with :class:`WorkerEvents` and explain a failure the same way: the ``failed`` event first, else the signal that
killed the worker, else its exit status and the end of its output (:meth:`WorkerEvents.log_tail`, which each kind
of run reads from its own log files).
"""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Optional

from cliptuner.train.worker import FAILED, INPUT

logger = logging.getLogger(__name__)

PROCESS_FILE = "process.json"  # in the run directory: what a tuner that restarts after a crash must stop
LOG_TAIL_LINES = 5  # lines of output quoted when a worker ended without a failed event
MAX_TAIL_CHARS = 2000  # at most this much of that output is quoted


class TrainingProcessError(RuntimeError):
    """The worker ended without a tuned model: it reported a failure, exited with an error, or was killed.

    Attributes:
        returncode: its exit status; negative: the number of the signal that killed it.
    """

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


class TrainingProcessInputError(TrainingProcessError, ValueError):
    """The worker refused its input (its ``failed`` event has ``kind: input``)."""


def signal_cause(returncode: int) -> str:
    """How a worker killed by signal ``-returncode`` ended, the signal named."""
    number = -returncode
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = "unknown signal"
    hint = " (out of memory, or stopped from outside?)" if number == signal.SIGKILL else ""
    return f"the training process was killed by signal {number} ({name}){hint}"


def file_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last non-empty ``lines`` of the text file ``path`` (at most :data:`MAX_TAIL_CHARS` characters); empty when
    it cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    tail = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return "\n".join(tail)[-MAX_TAIL_CHARS:]


def files_tail(paths: Iterable[Path], lines: int = LOG_TAIL_LINES) -> str:
    """:func:`file_tail` of each of ``paths`` that has output, each under a line naming the file; at most
    :data:`MAX_TAIL_CHARS` characters in all (the end of the last ones kept), or ``no output``."""
    parts = []
    for path in paths:
        tail = file_tail(path, lines)
        if tail:
            parts.append(f"{Path(path).name}:\n{tail}")
    return "\n".join(parts)[-MAX_TAIL_CHARS:] or "no output"


class WorkerEvents:
    """A run's worker seen through its events file, and the error of a run that failed.

    :meth:`read_events` hands each complete new line of the file to a callback and keeps the first ``failed``
    event in :attr:`failed`. Subclasses say where the worker's output is (:meth:`log_tail`) and how the run ended
    (:meth:`ended`).

    Args:
        events_path: the worker's events file (it may not exist yet).
    """

    def __init__(self, events_path: Path) -> None:
        self.events_path = Path(events_path)
        self.failed: Optional[dict] = None  # the first failed event it wrote
        self._offset = 0  # bytes of the events file already handed on

    def read_events(self, on_event: Callable[[dict], None], stop: Callable[[], bool]) -> None:
        """Hand each complete new line of the events file to ``on_event``, in order; return early once ``stop()``."""
        try:
            with self.events_path.open("rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:  # not written yet
            return
        for line in data[: data.rfind(b"\n") + 1].splitlines(keepends=True):  # a line being written waits
            self._offset += len(line)
            try:
                event = json.loads(line)
            except ValueError:
                logger.warning("%s: unreadable event line %r", self.events_path, line[:200])
                continue
            if not isinstance(event, dict):
                continue
            if event.get("event") == FAILED and self.failed is None:
                self.failed = event
            on_event(event)
            if stop():
                return

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last non-empty ``lines`` of the worker's output (at most 2000 characters), or ``no output``."""
        raise NotImplementedError

    def ended(self, returncode: int) -> str:
        """How a run that exited with ``returncode`` ended, for the start of its error message."""
        return f"the training process exited with code {returncode}"

    def failure(self, returncode: int, clean: Callable[[str], str]) -> TrainingProcessError:
        """The error of a worker that exited with ``returncode`` != 0; ``clean`` takes server paths out of it.

        The cause is its ``failed`` event; without one, the signal that killed it, or how it ended and the end of
        its output.
        """
        if self.failed is not None:
            message = f"{self.ended(returncode)}: {self.failed.get('message')}"
            kind = TrainingProcessInputError if self.failed.get("kind") == INPUT else TrainingProcessError
            return kind(clean(message), returncode)
        if returncode < 0:
            return TrainingProcessError(signal_cause(returncode), returncode)
        message = f"{self.ended(returncode)} without reporting why; its log ends:\n"
        return TrainingProcessError(clean(message + self.log_tail()), returncode)


__all__ = [
    "LOG_TAIL_LINES",
    "MAX_TAIL_CHARS",
    "PROCESS_FILE",
    "TrainingProcessError",
    "TrainingProcessInputError",
    "WorkerEvents",
    "file_tail",
    "files_tail",
    "signal_cause",
]
