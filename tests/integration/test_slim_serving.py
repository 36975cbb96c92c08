"""Serving without torch: the encoder and the indexer need only the base install.

The runtime test starts `cliptuner serve --flow flows/serving.yml` (gateway → encoder → indexer) in processes
where importing torch, torchvision, open_clip or onnx raises ``ModuleNotFoundError`` (a ``sitecustomize`` on
``PYTHONPATH`` installs the hook before anything else runs, and every process the service starts inherits it), on
a registry this test process published into. /encode, /index and /search must then work and give the vectors
that the model gives in this process. The control: the same hook makes an encoder that would have to build the
base model version fail at once, naming the missing extra, so the hook is active in those processes.

The packaging test checks that the base install does not depend on those packages, that the ``train`` extra
does, and that the Dockerfile's serving images (``TRAIN=0``) install without it.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest
from docarray import DocList
from service import ROOT, FlowProcess, by_id, png, post

from cliptuner.model.registry import Registry
from cliptuner.model.runtime import OnnxClip
from cliptuner.train import synthetic
from executors.schemas import ClipDoc

TRAIN_PACKAGES = {"torch", "torchvision", "open_clip_torch", "onnx"}
BLOCKED_MODULES = ("torch", "torchvision", "open_clip", "onnx")

SITECUSTOMIZE = textwrap.dedent(f'''
    """Make the training packages impossible to import, as if they were not installed."""
    import importlib.abc
    import sys

    class _NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED_MODULES!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: serving without torch)", name=name)
            return None

    sys.meta_path.insert(0, _NotInstalled())
''')


def group_processes(pgid: int) -> list[int]:
    """The live processes of a process group (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # it ended meanwhile
                continue
            if int(fields[2]) == pgid:  # stat: pid (comm) state ppid pgrp ...
                pids.append(int(entry.name))
    return pids


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower().replace("-", "_")


def test_the_base_install_leaves_the_training_packages_to_the_train_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {requirement_name(r) for r in project["dependencies"]}
    assert not base & TRAIN_PACKAGES, base & TRAIN_PACKAGES
    assert {"onnxruntime", "jina", "docarray"} <= base
    assert TRAIN_PACKAGES <= {requirement_name(r) for r in project["optional-dependencies"]["train"]}
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'if [ "$TRAIN" = 1 ]; then pip install ".[train]"; else pip install .; fi' in dockerfile
    for executor in ("CLIPEncoder", "CLIPIndexer"):  # the documented serving image builds
        assert re.search(rf"--build-arg EXECUTOR={executor} --build-arg TRAIN=0", dockerfile), executor


@pytest.fixture
def no_torch(tmp_path) -> dict:
    """Environment of a service whose processes cannot import the training packages."""
    hook = tmp_path / "no-torch"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": f"{hook}:{ROOT}"}


def test_encoder_and_indexer_serve_without_torch(tmp_path, tiny_model_dir, no_torch):
    workspace = tmp_path / "ws"
    # a model trained elsewhere enters the registry through the CLI, torch-free too
    env = {**os.environ, "JINA_HIDE_SURVEY": "1", "JINA_OPTOUT_TELEMETRY": "1", **no_torch}
    published = subprocess.run(
        [
            sys.executable,
            "-m",
            "cliptuner.cli",
            "models",
            "publish",
            str(tiny_model_dir),
            "--workspace",
            str(workspace),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert published.returncode == 0, published.stderr
    assert "published v1; CURRENT is now v1" in published.stdout
    assert Registry(workspace / "models").current() == "v1"
    server = FlowProcess(workspace, tmp_path / "flow.log", env=no_torch, args=["--flow", "flows/serving.yml"])
    server.start()
    try:
        scenes = synthetic.generate(8, domain="generic", seed=11)
        gallery = DocList[ClipDoc]([ClipDoc(id=f"img{i}", blob=png(image)) for i, image in enumerate(scenes.images)])
        indexed = post(server, "/index", gallery)
        assert [d.model_version for d in indexed] == ["v1"] * len(gallery)

        clip = OnnxClip(tiny_model_dir, device="cpu", intra_op_threads=1)
        encoded = by_id(
            post(
                server,
                "/encode",
                DocList[ClipDoc]([ClipDoc(id="t", text=scenes.captions[3]), ClipDoc(id="i", tensor=scenes.images[3])]),
            )
        )
        np.testing.assert_allclose(encoded["t"].embedding, clip.encode_text([scenes.captions[3]])[0], atol=1e-5)
        np.testing.assert_allclose(encoded["i"].embedding, clip.encode_images([scenes.images[3]])[0], atol=1e-5)

        found = post(
            server, "/search", DocList[ClipDoc]([ClipDoc(id="q", tensor=scenes.images[5])]), parameters={"limit": 3}
        )[0]
        assert found.matches[0].id == "img5" and found.scores[0] == pytest.approx(1.0, abs=1e-4)
        status = by_id(post(server, "/status"))
        assert set(status) == {"status-encoder", "status-indexer"}  # no tuner in this Flow
        assert status["status-indexer"].tags["count"] == len(gallery)
        # and no process of the service has torch's libraries mapped (what importing it would have loaded)
        processes = group_processes(server.proc.pid)
        assert len(processes) >= 3  # cliptuner serve (the gateway), the encoder, the indexer
        maps = {pid: Path(f"/proc/{pid}/maps").read_text() for pid in processes}
        assert sum("onnxruntime" in m for m in maps.values()) >= 2  # the encoder and the indexer run ONNX Runtime
        assert not [pid for pid, m in maps.items() if re.search(r"libtorch|/torch/lib/", m)]
    finally:
        server.stop()
    assert "ModuleNotFoundError" not in server.log_path.read_text(errors="replace")


def test_without_torch_an_empty_registry_fails_naming_the_train_extra(tmp_path, no_torch):
    """The control: with the hook active, an encoder that must build the base model version cannot, and the
    commands that train say what to install."""
    code = (
        "from executors import CLIPEncoder; "
        f"CLIPEncoder(workspace={str(tmp_path / 'ws')!r}, device='cpu', bootstrap=True)"
    )
    env = {"JINA_HIDE_SURVEY": "1", "JINA_OPTOUT_TELEMETRY": "1", "PATH": "/usr/bin:/bin", **no_torch}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "MissingTrainExtra" in result.stderr
    assert "building the base model version of an empty registry needs the training extra" in result.stderr
    assert 'pip install "cliptuner[train]"' in result.stderr
    assert not (tmp_path / "ws" / "models" / "CURRENT").exists()

    demo = subprocess.run(
        [sys.executable, "-m", "cliptuner.cli", "demo", "--workdir", str(tmp_path / "demo")],
        cwd=ROOT,
        env={**env, "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert demo.returncode == 3
    assert demo.stderr.strip().splitlines() == [
        "cliptuner demo: error: cliptuner demo needs the training extra (torch, open_clip, onnx not installed): "
        'pip install "cliptuner[train]". Serving (encoder, indexer) works without it.'
    ]


@pytest.mark.parametrize("family", ["clip", "siglip", "xlmr"])
def test_each_model_family_trains_exports_and_serves_without_torch(family, tmp_path, no_torch):
    """CLIP BPE, SigLIP-style and XLM-R-style models: a few training steps here, the export's end-to-end parity
    check, a published version, and a torch-free Flow that encodes as the tuned torch model does and searches."""
    import torch

    from cliptuner.config import ModelSpec, TrainConfig
    from cliptuner.train.export import export_model_dir
    from cliptuner.train.families import write_tiny_model
    from cliptuner.train.loop import finetune
    from cliptuner.train.models import load_model

    torch.manual_seed(0)
    bundle = load_model(ModelSpec(write_tiny_model(tmp_path / "base", family, seed=2)))
    pairs = synthetic.generate(24, domain="generic", seed=4)
    train, held_out = pairs.split(0.25, seed=0)
    finetune(bundle, train, held_out, TrainConfig(epochs=1, batch_size=6, warmup_steps=0, precision="fp32"))
    model_dir = export_model_dir(bundle, tmp_path / "model")
    assert json.loads((model_dir / "model.json").read_text())["parity"]["tokenizer"]["ids_equal"] is True
    workspace = tmp_path / "ws"
    Registry(workspace / "models").publish(model_dir)

    texts = ["a small red circle at the top left", "deux grands carrés bleus", "two large blue squares " * 10]
    with torch.no_grad():
        want = bundle.model.encode_text(bundle.tokenizer(texts), normalize=True).numpy()
    server = FlowProcess(workspace, tmp_path / "flow.log", env=no_torch, args=["--flow", "flows/serving.yml"])
    server.start()
    try:
        scenes = synthetic.generate(6, domain="generic", seed=11)
        gallery = DocList[ClipDoc]([ClipDoc(id=f"img{i}", blob=png(image)) for i, image in enumerate(scenes.images)])
        assert [d.model_version for d in post(server, "/index", gallery)] == ["v1"] * len(gallery)
        encoded = by_id(
            post(server, "/encode", DocList[ClipDoc]([ClipDoc(id=f"t{i}", text=t) for i, t in enumerate(texts)]))
        )
        got = np.stack([encoded[f"t{i}"].embedding for i in range(len(texts))])
        np.testing.assert_allclose((got * want).sum(-1), 1.0, atol=1e-4)  # the tuned torch model's vectors
        found = post(
            server, "/search", DocList[ClipDoc]([ClipDoc(id="q", tensor=scenes.images[4])]), parameters={"limit": 3}
        )[0]
        assert found.matches[0].id == "img4" and found.scores[0] == pytest.approx(1.0, abs=1e-4)
        text_hits = post(server, "/search", DocList[ClipDoc]([ClipDoc(id="q", text=texts[1])]), parameters={"limit": 6})
        assert sorted(m.id for m in text_hits[0].matches) == sorted(d.id for d in gallery)
    finally:
        server.stop()
    assert "ModuleNotFoundError" not in server.log_path.read_text(errors="replace")
