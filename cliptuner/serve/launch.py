"""Child processes in process groups of their own: ``cliptuner serve`` for programs that drive the service
(``cliptuner demo``), and :func:`stop_group`, the one routine that ends such a group (the service, a training run's
worker in :mod:`cliptuner.serve.runs`).

The service gets its own process group, so that stopping it also stops the Flow's Executors and a running training
process. :meth:`ServeProcess.start` returns once ``cliptuner serve`` has said "cliptuner serving on" (a ``/status``
has passed through every Executor), and raises with the end of the service's log when it exits or does not get
there in time.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

SERVING = b"cliptuner serving on"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_group(proc: Optional[subprocess.Popen], grace: float) -> None:
    """Stop a child started with ``start_new_session=True`` and everything in its process group: SIGTERM to the
    child, up to ``grace`` seconds for it to exit, then SIGKILL to the group (which outlives its leader when a child
    was orphaned). The one way this project ends a process group: the service launcher, a training run's worker
    (:mod:`cliptuner.serve.runs`) and the tests' Flow processes."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            logger.warning("process %d outlived SIGTERM by %gs: killing its group", proc.pid, grace)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already
    proc.wait(15)


class ServeProcess:
    """``cliptuner serve ARGS`` on 127.0.0.1 and a free port, its output in ``log_path``.

    Args:
        workspace: the service's workspace.
        log_path: where its stdout and stderr go.
        env: settings (``CLIPTUNER_*``) added to this process's environment.
        args: more ``cliptuner serve`` arguments.
        start_timeout: seconds to wait for it to answer.
    """

    def __init__(
        self,
        workspace: Path,
        log_path: Path,
        env: Optional[dict] = None,
        args: Sequence[str] = (),
        start_timeout: float = 300.0,
    ) -> None:
        self.workspace = Path(workspace)
        self.log_path = Path(log_path)
        self.env = dict(env or {})
        self.args = list(args)
        self.start_timeout = start_timeout
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> ServeProcess:
        """Start it and wait until it serves.

        Raises:
            RuntimeError: it exited, or did not serve within ``start_timeout`` (the message ends with its log).
        """
        self.port = free_port()
        env = {
            **os.environ,
            "CLIPTUNER_HOST": "127.0.0.1",
            "CLIPTUNER_PORT": str(self.port),
            "CLIPTUNER_WORKSPACE": str(self.workspace),
            "JINA_HIDE_SURVEY": "1",
            "JINA_OPTOUT_TELEMETRY": "1",
            **self.env,
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            offset = log.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cliptuner.cli", "serve", *self.args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cliptuner serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                if SERVING in log.read():
                    return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"cliptuner serve did not answer within {self.start_timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 60.0) -> None:
        """SIGTERM (the Executors close and save), then SIGKILL whatever is left of its process group."""
        stop_group(self.proc, grace)
        self.proc = None

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
