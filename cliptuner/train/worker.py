"""The training worker process: ``python -m cliptuner.train.worker JOB.json --events EVENTS.jsonl``.

It runs one :class:`~cliptuner.train.job.TrainJob` through :func:`~cliptuner.train.job.train_and_export` and says
what happens only through its events file, one JSON object a line, flushed at once: the training events (each with
the ``pid`` of the process that trains) and, when it fails, one ``{"event": "failed", "phase", "kind", "message",
"rank", "pid"}``, where ``kind`` is ``input`` for bad input (a ``ValueError``: unreadable pairs, an undecodable
image) and ``error`` for anything else. It exits with 0, 2 (input) or 1 (error). Its stdout and stderr (logging,
tracebacks) are for operators, not for the process that follows it. Under torchrun every rank runs it; rank 0
writes the training events, any rank that fails writes its ``failed`` event.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, Optional

from cliptuner.train.job import PHASES, TrainJob, phase_after, train_and_export

logger = logging.getLogger(__name__)

FAILED = "failed"  # the event of a run that failed
INPUT = "input"  # its kind when the input was at fault
ERROR = "error"  # its kind otherwise
INPUT_ERROR_EXIT = 2
ERROR_EXIT = 1
MAX_MESSAGE_CHARS = 4000


class EventLog:
    """Appends events to a file as JSON lines, each flushed at once and carrying ``pid``: the process that wrote it.

    Args:
        path: the events file (appended to).
    """

    def __init__(self, path: str) -> None:
        self.pid = os.getpid()
        self.file = open(path, "a", encoding="utf-8")

    def __call__(self, event: dict[str, Any]) -> None:
        self.file.write(json.dumps({**event, "pid": self.pid}, default=str) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def failure_event(exc: BaseException, phase: str) -> dict[str, Any]:
    """The ``failed`` event of a run that raised ``exc`` while ``phase``."""
    kind = INPUT if isinstance(exc, ValueError) else ERROR
    message = str(exc) if kind == INPUT else f"{type(exc).__name__}: {exc}"
    return {
        "event": FAILED,
        "phase": phase,
        "kind": kind,
        "message": message[:MAX_MESSAGE_CHARS],
        "rank": int(os.environ.get("RANK", "0")),
    }


def run(job_path: str, events_path: Optional[str]) -> int:
    """Run the job of ``job_path``, its events appended to ``events_path``; returns the exit status."""
    events = EventLog(events_path) if events_path else None
    phase = PHASES[0]

    def on_event(event: dict[str, Any]) -> None:
        nonlocal phase
        phase = phase_after(event, phase)
        if events is not None:
            events(event)

    try:
        train_and_export(TrainJob.read(job_path), on_event)
    except Exception as exc:
        failed = failure_event(exc, phase)
        if failed["kind"] == INPUT:
            logger.error("training failed on its input while %s: %s", phase, exc)
        else:
            logger.exception("training failed while %s", phase)
        if events is not None:
            events(failed)
        return INPUT_ERROR_EXIT if failed["kind"] == INPUT else ERROR_EXIT
    finally:
        if events is not None:
            events.close()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cliptuner.train.worker", description=__doc__.splitlines()[0])
    parser.add_argument("job", help="the job file (job.json, written by TrainJob.write)")
    parser.add_argument("--events", default=None, metavar="FILE", help="append the run's events here as JSON lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args.job, args.events)


if __name__ == "__main__":
    sys.exit(main())
