"""A Milvus server on 127.0.0.1 for the tests of the milvus backend's server path (``uri="http://host:port"``).

milvus-lite ships one: ``python -m milvus_lite server --data-dir DIR --host H --port P`` serves the Milvus gRPC
protocol (the service pymilvus speaks to a Milvus standalone or cluster) from a data folder. pymilvus runs the same
server in a thread of its own process for a local file URI; here it runs as a child process, so the store talks
to it over TCP exactly as to a remote Milvus. Shared by tests/unit/test_vector_stores.py and
tests/integration/test_milvus_flow.py.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MilvusServer:
    """``python -m milvus_lite server`` in a child process (its own session) on a free port of 127.0.0.1.

    Use as a context manager: the server accepts connections on entry, and is stopped (SIGINT: it closes its
    data folder; SIGKILL if it does not exit) on exit.

    Args:
        data_dir: the server's data folder (created if missing).
        log_path: where its output goes.
    """

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.data_dir = Path(data_dir)
        self.log_path = Path(log_path)
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None

    @property
    def uri(self) -> str:
        """The URI a client passes as ``uri`` (``http://127.0.0.1:PORT``)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MilvusServer":
        """Start the server and wait until it accepts a TCP connection.

        Raises:
            RuntimeError: the server exited, or did not accept connections within ``START_TIMEOUT`` s (with the
                end of its log).
        """
        self.port = _free_port()
        command = [
            sys.executable,
            "-m",
            "milvus_lite",
            "server",
            "--data-dir",
            str(self.data_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--max-workers",
            "4",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Milvus server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"the Milvus server did not listen on {self.uri} within {START_TIMEOUT:.0f} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGINT (the server stops and closes its data folder), then SIGKILL if it is still running."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> "MilvusServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
