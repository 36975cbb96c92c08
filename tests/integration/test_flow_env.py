"""`jina flow --uses flows/flow.yml` with only the three variables the Flow names (CLIPTUNER_HOST, _PORT and
_WORKSPACE) starts and serves /encode: every other CLIPTUNER_* variable is unset, and the Executors take their
defaults (a fresh workspace gets the random-init cliptuner-tiny base)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from docarray import DocList
from jina import Client
from service import ROOT, free_port

from cliptuner.serve.launch import stop_group
from executors.schemas import ClipDoc

START_TIMEOUT = 300.0


def jina_command() -> list[str]:
    """The `jina` console script of this environment."""
    script = Path(sys.executable).with_name("jina")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "jina"]


def tail(path: Path, size: int = 4000) -> str:
    return path.read_text(errors="replace")[-size:] if path.exists() else ""


@pytest.fixture
def flow_with_three_variables(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPTUNER_")}
    env.update(
        JINA_HIDE_SURVEY="1",
        JINA_OPTOUT_TELEMETRY="1",
        CLIPTUNER_HOST="127.0.0.1",
        CLIPTUNER_PORT=str(port),
        CLIPTUNER_WORKSPACE=str(tmp_path / "workspace"),
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    log_path = tmp_path / "flow.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*jina_command(), "flow", "--uses", "flows/flow.yml"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        client = Client(host="127.0.0.1", port=port, protocol="grpc")
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jina flow exited with {proc.returncode}:\n{tail(log_path)}")
            if time.monotonic() > deadline:
                pytest.fail(f"the Flow was not ready after {START_TIMEOUT:.0f} s:\n{tail(log_path)}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    pass
                if client.is_flow_ready(timeout=5):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        yield client
    finally:
        stop_group(proc, grace=20)


def test_jina_flow_starts_with_three_variables_and_encodes(flow_with_three_variables):
    docs = flow_with_three_variables.post(
        "/encode", inputs=DocList[ClipDoc]([ClipDoc(id="t", text="a red dress")]), return_type=DocList[ClipDoc]
    )
    assert [doc.id for doc in docs] == ["t"]
    embedding = np.asarray(docs[0].embedding, dtype=np.float64)
    assert embedding.ndim == 1 and embedding.size > 0 and np.all(np.isfinite(embedding))
    assert np.linalg.norm(embedding) == pytest.approx(1.0, abs=1e-4)
    assert docs[0].model_version  # the base version the tuner published on the fresh workspace
