"""What the integration tests share: `cliptuner serve` in a child process, and gRPC clients of it on 127.0.0.1."""

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from docarray import DocList
from jina import Client
from jina.excepts import BadServer
from PIL import Image

from cliptuner.serve.launch import stop_group
from executors.schemas import ClipDoc

# tests/ holds the helpers the unit and integration tests share; the benchmarks import this module from elsewhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from certificates import self_signed  # noqa: E402, F401  (the integration tests import it from here)

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 300.0
SERVING = b"cliptuner serving on"  # what `cliptuner serve` prints once the Flow answers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free ports of 127.0.0.1."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + n > 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class FlowProcess:
    """`cliptuner serve ARGS` in a child process (its own session), on a free port of 127.0.0.1.

    ``env`` adds or overrides environment variables of the service (``CLIPTUNER_*`` settings); ``unset`` names
    variables of this process that the service must not inherit. With ``tls`` (the service serves TLS) the test
    process does not connect itself: the service is ready once it says so, after its own check over TLS.
    """

    def __init__(
        self,
        workspace: Path,
        log_path: Path,
        env: Optional[dict] = None,
        args: Sequence[str] = (),
        unset: Sequence[str] = (),
        tls: bool = False,
    ) -> None:
        self.tls = tls
        self.workspace = workspace
        self.log_path = log_path
        self.env = dict(env or {})
        self.args = list(args)
        self.unset = set(unset)
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0

    def start(self) -> None:
        self.port = free_port()
        inherited = {k: v for k, v in os.environ.items() if k not in self.unset}
        env = {
            **inherited,
            "CLIPTUNER_PORT": str(self.port),
            "CLIPTUNER_WORKSPACE": str(self.workspace),
            "CLIPTUNER_MODEL": "cliptuner-tiny",
            "CLIPTUNER_PRETRAINED": "",
            "CLIPTUNER_DEVICE": "cpu",
            "JINA_HIDE_SURVEY": "1",
            "JINA_OPTOUT_TELEMETRY": "1",
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            **self.env,
        }
        log = open(self.log_path, "a")
        offset = log.tell()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cliptuner.cli", "serve", *self.args],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"cliptuner serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
            except OSError:
                time.sleep(0.5)
                continue
            if (self.tls or self.client().is_flow_ready(timeout=5)) and self._says_serving(offset):
                return
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"the Flow was not ready after {START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def _says_serving(self, offset: int) -> bool:
        """`cliptuner serve` printed, after ``offset`` of the log, that a /status passed through every Executor."""
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return SERVING in log.read()

    def client(self) -> Client:
        return Client(host="127.0.0.1", port=self.port, protocol="grpc")

    def stop(self) -> None:
        """SIGTERM (the Flow closes its Executors, which save their state), then SIGKILL whatever is left of the
        process group (a hung close, or a child orphaned by it)."""
        stop_group(self.proc, 90)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class ExecutorProcess:
    """One Executor as its own gRPC microservice — ``jina executor --uses NAME`` — in a child process (its own
    process group) on 127.0.0.1, as a user runs it."""

    def __init__(self, name: str, workspace: Path, log_path: Path, settings: Optional[dict] = None) -> None:
        self.name = name
        self.workspace = workspace
        self.log_path = log_path
        self.settings = dict(settings or {})
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0

    def start(self) -> None:
        self.port = free_port()
        command = [
            str(Path(sys.executable).parent / "jina"),
            "executor",
            "--uses",
            self.name,
            "--py-modules",
            "executors/__init__.py",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workspace",
            str(self.workspace),
            "--uses-with",
            json.dumps(self.settings),
        ]
        env = {
            **os.environ,
            "JINA_HIDE_SURVEY": "1",
            "JINA_OPTOUT_TELEMETRY": "1",
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
        }
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:  # an Executor alone has no dry-run endpoint to ask; it is ready when it answers
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                self.post("/status")
                return
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.5)
        self.kill()
        pytest.fail(f"{self.name} was not ready after {START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def client(self) -> Client:
        return Client(host="127.0.0.1", port=self.port, protocol="grpc")

    def post(self, on: str, docs=None, **kwargs) -> DocList[ClipDoc]:
        return self.client().post(on, inputs=docs, return_type=DocList[ClipDoc], **kwargs)

    def kill(self) -> None:
        """SIGKILL to the process group: the Executor gets no chance to close or save anything."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        stop_group(self.proc, 60)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def serve_gallery(workspace: Path, gallery) -> FlowProcess:
    """`cliptuner serve` on ``workspace`` with ``gallery`` (a :class:`cliptuner.train.data.PairSet`) indexed as PNG blobs,
    one doc per image, ``id`` its image id and ``tags['i']`` its position."""
    server = FlowProcess(workspace, workspace.parent / "flow.log")
    server.start()
    post(
        server,
        "/index",
        DocList[ClipDoc](
            [
                ClipDoc(id=image_id, blob=png(image), tags={"i": i})
                for i, (image_id, image) in enumerate(zip(gallery.image_ids, gallery.images))
            ]
        ),
    )
    return server


def post(flow: FlowProcess, on: str, docs=None, **kwargs) -> DocList[ClipDoc]:
    return flow.client().post(on, inputs=docs, return_type=DocList[ClipDoc], **kwargs)


async def post_async(port: int, on: str, docs=None, **kwargs) -> DocList[ClipDoc]:
    client = Client(host="127.0.0.1", port=port, protocol="grpc", asyncio=True)
    out = DocList[ClipDoc]()
    async for response in client.post(on, inputs=docs, return_type=DocList[ClipDoc], **kwargs):
        out.extend(response)
    return out


class ServerError:
    """``pytest.raises``-like context: the request fails with an Executor error whose message matches."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.messages: list[str] = []

    def __enter__(self) -> "ServerError":
        self._raises = pytest.raises(BadServer)
        self._info = self._raises.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        suppressed = self._raises.__exit__(*exc)
        header = self._info.value.args[0]  # the response header, with the Executor's exception
        self.messages = [header.status.description, *header.status.exception.args]
        assert any(re.search(self.pattern, m) for m in self.messages), (self.pattern, self.messages)
        return suppressed


def by_id(docs: DocList[ClipDoc]) -> dict:
    return {doc.id: doc for doc in docs}
