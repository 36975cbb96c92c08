"""`jina export kubernetes` turns flows/k8s.yml into Deployments that run the Executors from their images."""

import dataclasses
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from executors import CLIPEncoder, CLIPIndexer, CLIPTuner
from executors.options import ExecutorSettings

ROOT = Path(__file__).resolve().parents[2]
IMAGES = {
    "tuner": "cliptuner-tuner:latest",
    "encoder": "cliptuner-encoder:latest",
    "indexer": "cliptuner-indexer:latest",
}


def _export(out: Path) -> None:
    env = {
        **os.environ,
        "JINA_GATEWAY_IMAGE": "jinaai/jina:3.34.0-py311-standard",
        "JINA_HIDE_SURVEY": "1",
        "JINA_OPTOUT_TELEMETRY": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "jina", "export", "kubernetes", str(ROOT / "flows" / "k8s.yml"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_export_writes_a_deployment_per_executor_from_its_image(tmp_path):
    _export(tmp_path / "k8s")
    assert sorted(p.name for p in (tmp_path / "k8s").iterdir()) == ["encoder", "gateway", "indexer", "tuner"]
    for name, image in IMAGES.items():
        docs = list(yaml.safe_load_all((tmp_path / "k8s" / name / f"{name}.yml").read_text()))
        deployment = next(d for d in docs if d and d.get("kind") == "Deployment")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == image
        args = container["args"]
        assert args[args.index("--uses") + 1] == "config.yml"  # what the image's config.yml loads
        assert args[args.index("--workspace") + 1] == "/workspace"  # the shared registry
        assert "--monitoring" in args and args[args.index("--port-monitoring") + 1] == "9090"  # Prometheus metrics
        if name == "encoder":
            assert deployment["spec"]["replicas"] == 2
        if name != "tuner":  # replicas follow the version the tuner publishes
            assert '"bootstrap": false' in args[args.index("--uses-with") + 1]


def test_the_image_config_fits_every_executor_class():
    # each image's config.yml is the root config.yml with its jtype set to one class (see the Dockerfile)
    config = yaml.safe_load((ROOT / "config.yml").read_text())
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'sed -i "s/^jtype: .*/jtype: ${EXECUTOR}/" config.yml' in dockerfile
    for cls in (CLIPTuner, CLIPEncoder, CLIPIndexer):
        # its own keyword arguments, and the settings every Executor takes from its **kwargs
        accepted = set(inspect.signature(cls.__init__).parameters) | {
            f.name for f in dataclasses.fields(ExecutorSettings)
        }
        assert set(config["with"]) <= accepted, (cls.__name__, set(config["with"]) - accepted)
        assert cls.__name__ in dockerfile


def test_the_gateway_is_left_to_cliptuner_k8s_and_its_image_names_the_mounted_keys_file():
    # the export takes only a container image as the gateway's `uses`: flows/k8s.yml names none, and
    # `cliptuner k8s` runs CLIPGateway from the project's image, whose CLIPTUNER_KEYS_FILE is where it mounts keys
    from cliptuner.serve import k8s

    flow = yaml.safe_load((ROOT / "flows" / "k8s.yml").read_text())
    assert "gateway" not in flow
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"CLIPTUNER_KEYS_FILE={k8s.KEYS_FILE} " in dockerfile
    assert "docker build --build-arg TRAIN=0" in dockerfile and "-t cliptuner-gateway ." in dockerfile
    assert re.search(r"^WORKDIR /app$", dockerfile, re.M)  # where --py-modules finds executors/
    assert re.search(r"^COPY executors \./executors$", dockerfile, re.M)
    assert k8s.GATEWAY_MODULES == "/app/executors/__init__.py"
