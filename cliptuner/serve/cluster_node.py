"""The entry point of one training pod: ``python -m cliptuner.serve.cluster_node --log-dir DIR -- COMMAND...``.

Each pod of a training Job (:mod:`cliptuner.serve.cluster`) runs ``torchrun`` under this small launcher, which
uses the standard library only and does what the container command alone cannot:

* **Output on the shared volume.** COMMAND's stdout and stderr go both to this process's stdout (``kubectl logs``)
  and, appended, to ``DIR/train-<index>.log``, where ``<index>`` is the pod's ``JOB_COMPLETION_INDEX``; the tuner
  quotes the end of that file when a run fails, without reading pod logs through the API (they are gone once the
  Job is deleted).
* **How the node ended.** When COMMAND ends, ``DIR/node-<index>.json`` records ``{"index", "returncode", "host", "ended_at"}``
  (written whole: a temporary file renamed), so the tuner can say which node failed and with which status.
* **Who hosts the rendezvous.** torchrun's c10d rendezvous guesses whether it hosts the TCP store by comparing the
  endpoint's name with this machine's names and addresses; on Kubernetes that guess depends on the headless
  Service's DNS record being there already, and when node 0 guesses wrong, no node hosts the store and every node
  times out. So the node whose index is ``--host-index`` (default 0) is told it hosts it (``is_host=1``), every
  other node that it does not (``is_host=0``), through ``PET_RDZV_CONF``, torchrun's environment form of
  ``--rdzv_conf`` (the Job's command line passes no ``--rdzv_conf``; a ``PET_RDZV_CONF`` already set is kept).
* **Signals.** SIGTERM and SIGINT (the kubelet stopping the pod when the Job is deleted) are passed on to COMMAND,
  so torchrun ends its workers; this process then exits with COMMAND's status (128 + the signal's number when a
  signal ended it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

INDEX_ENV = "JOB_COMPLETION_INDEX"  # set by Kubernetes in each pod of an Indexed Job
RDZV_CONF_ENV = "PET_RDZV_CONF"  # torchrun reads --rdzv_conf from it when the command line has none
CHUNK = 65536


def log_name(index: int) -> str:
    """The log file of node ``index`` in the run directory."""
    return f"train-{index}.log"


def status_name(index: int) -> str:
    """The file that records how node ``index`` ended."""
    return f"node-{index}.json"


def node_index(env: Optional[dict[str, str]] = None) -> int:
    """This pod's index in its Indexed Job (``JOB_COMPLETION_INDEX``).

    Raises:
        ValueError: the variable is missing or not a non-negative integer.
    """
    value = (os.environ if env is None else env).get(INDEX_ENV)
    if value is None or not value.isdigit():
        raise ValueError(f"{INDEX_ENV} must be set to the pod's index in its Indexed Job (0, 1, ...), got {value!r}")
    return int(value)


def _status(index: int, returncode: int) -> dict:
    return {"index": index, "returncode": returncode, "host": socket.gethostname(), "ended_at": time.time()}


def _write_status(path: Path, status: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(status) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_node(command: Sequence[str], log_dir: Path, host_index: int = 0) -> int:
    """Run ``command`` as node ``JOB_COMPLETION_INDEX``, its output copied to the log file; returns the exit status
    this process should end with (see the module's docstring).

    Raises:
        ValueError: no command, or no valid ``JOB_COMPLETION_INDEX``.
    """
    if not command:
        raise ValueError("no command to run: give it after '--'")
    index = node_index()
    log_dir = Path(log_dir)
    env = dict(os.environ)
    env.setdefault(RDZV_CONF_ENV, f"is_host={int(index == host_index)}")
    out = sys.stdout.buffer
    with (log_dir / log_name(index)).open("ab") as log:

        def copy(data: bytes) -> None:
            for stream in (out, log):
                try:
                    stream.write(data)
                    stream.flush()
                except OSError:  # a closed stdout must not stop the log file, nor the node
                    pass

        copy(f"cliptuner node {index} on {socket.gethostname()}: {' '.join(command)}\n".encode())
        try:
            proc = subprocess.Popen(
                list(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
            )
        except OSError as exc:
            copy(f"cliptuner node {index}: cannot start {command[0]!r}: {exc}\n".encode())
            _write_status(log_dir / status_name(index), _status(index, 127))
            return 127

        def forward(signum: int, frame: object) -> None:
            if proc.poll() is None:
                proc.send_signal(signum)

        previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            assert proc.stdout is not None
            while data := os.read(proc.stdout.fileno(), CHUNK):  # until COMMAND (and what it started) closed it
                copy(data)
            returncode = proc.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            proc.stdout.close()
        with contextlib.suppress(OSError):  # for `kubectl logs`; the log file's tail is kept for COMMAND's output
            out.write(f"cliptuner node {index}: exited with code {returncode}\n".encode())
            out.flush()
    _write_status(log_dir / status_name(index), _status(index, returncode))
    return returncode if returncode >= 0 else 128 - returncode


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        own, command = argv[:split], argv[split + 1 :]
    else:
        own, command = argv, []
    parser = argparse.ArgumentParser(prog="python -m cliptuner.serve.cluster_node", description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", required=True, type=Path, help="the run directory on the shared volume")
    parser.add_argument("--host-index", type=int, default=0, help="the node that hosts the rendezvous store")
    args = parser.parse_args(own)
    try:
        return run_node(command, args.log_dir, args.host_index)
    except ValueError as exc:
        parser.error(str(exc))
    return 2  # parser.error exits; kept for type checkers


if __name__ == "__main__":
    sys.exit(main())
