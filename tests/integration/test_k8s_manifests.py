"""`cliptuner k8s --out DIR` writes manifests that are valid Kubernetes objects and deploy as generated.

Every object is validated offline and strictly (unknown keys, wrong types and missing required fields fail) against
the JSON schemas of Kubernetes ``k8s.KUBERNETES_VERSION`` and of the newest version ``kubernetes-validate`` carries,
as ``kubectl kustomize DIR`` renders the set; then the tests check what each option changes.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cliptuner.cli import main
from cliptuner.model.registry import Registry
from cliptuner.serve import k8s

ROOT = Path(__file__).resolve().parents[2]
EXECUTORS = ("tuner", "encoder", "indexer")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
ENCODER_REPLICAS = 3
DIGEST = "sha256:" + "0123456789abcdef" * 4
VERSIONS = (f"{k8s.KUBERNETES_VERSION}.0", kubernetes_validate.latest_version())  # the stated one, the newest
CRDS = ("ServiceMonitor",)  # custom resources: no schema in kubernetes-validate


# --- the offline validator ---------------------------------------------------------------------------------------


def validate(doc: dict[str, Any], version: str = VERSIONS[0]) -> None:
    """Validate ``doc`` strictly against the schema of its kind in Kubernetes ``version``.

    Raises:
        kubernetes_validate.ValidationError: an unknown or misspelled key, a mistyped value, a missing field.
        kubernetes_validate.SchemaNotFoundError: no such kind (or API version) in that Kubernetes.
    """
    kubernetes_validate.validate(doc, version, strict=True)


def render(out: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize out``: the objects ``kubectl apply -k`` would send."""
    result = subprocess.run(["kubectl", "kustomize", str(out)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def key(doc: dict[str, Any]) -> tuple[str, Any, str]:
    return doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"]


def load(out: Path) -> dict[str, list[dict[str, Any]]]:
    """file name -> its objects, for every file of the kustomization in ``out``."""
    kustomization = yaml.safe_load((out / k8s.KUSTOMIZATION_FILE).read_text())
    return {name: [d for d in yaml.safe_load_all((out / name).read_text()) if d] for name in kustomization["resources"]}


def copy(exported: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """A deep copy of an export (build_manifests changes the objects in place)."""
    return json.loads(json.dumps(exported))


# --- one generation per module ------------------------------------------------------------------------------------

GENERATED_ARGS = [
    "--encoder-replicas",
    str(ENCODER_REPLICAS),
    "--gpus-encoder",
    "1",
    "--storage-class",
    "nfs-client",
    "--index-storage-class",
    "standard-rwo",
    "--image-prefix",
    "registry.example.com/ml/cliptuner-",
    "--tag",
    "0.1.0",
    "--digest",
    f"indexer={DIGEST}",
    "--model",
    "ViT-B-32",
    "--pretrained",
    "openai",
    "--keep-versions",
    "3",
    "--metrics-from-namespace",
    "monitoring",
]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[dict[str, Any]]]]:
    """``cliptuner k8s`` with a few non-default options, run once; (DIR, its objects per file)."""
    out = tmp_path_factory.mktemp("k8s") / "manifests"
    assert main(["k8s", "--out", str(out), *GENERATED_ARGS]) == 0
    return out, load(out)


@pytest.fixture(scope="module")
def defaults(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[dict[str, Any]]]]:
    """``cliptuner k8s`` with every default, run once; (DIR, its objects per file)."""
    out = tmp_path_factory.mktemp("k8s-defaults") / "manifests"
    assert main(["k8s", "--out", str(out)]) == 0
    return out, load(out)


@pytest.fixture(scope="module")
def exported() -> dict[str, list[dict[str, Any]]]:
    """jina's own export of flows/k8s.yml (what the options are applied to), run once."""
    return k8s.export_flow(k8s.default_flow(), "cliptuner")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """jina's export of flows/k8s.yml with the indexer in two shards, run once."""
    flow = yaml.safe_load(k8s.default_flow().read_text())
    indexer = next(e for e in flow["executors"] if e["name"] == "indexer")
    indexer["shards"] = 2
    path = tmp_path_factory.mktemp("sharded") / "k8s.yml"
    path.write_text(yaml.safe_dump(flow, sort_keys=False))
    return k8s.export_flow(path, "cliptuner")


def objects(files: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, dict[str, Any]]:
    """name -> object, for every object of ``kind``."""
    return {d["metadata"]["name"]: d for docs in files.values() for d in docs if d["kind"] == kind}


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers of a Deployment's pod template."""
    return deployment["spec"]["template"]["spec"]["containers"]


def init_containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> init container of a Deployment's pod template."""
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"].get("initContainers", [])}


def declared_ports(container: dict[str, Any]) -> set[int]:
    """The container ports a container declares (what a probe, a Service or a scrape may target)."""
    return {int(p["containerPort"]) for p in container.get("ports", [])}


def arg(container: dict[str, Any], flag: str) -> str:
    args = container["args"]
    return args[args.index(flag) + 1]


def uses_with(deployment: dict[str, Any]) -> dict[str, Any]:
    return json.loads(arg(containers(deployment)[0], "--uses-with"))


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def mounts_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container.get("volumeMounts", [])}


# --- validity of the whole set ------------------------------------------------------------------------------------


EVERYTHING_ARGS = [  # every optional object and option: Ingress, ServiceMonitors, TLS, Milvus, CIDRs, no chown
    "--tls-secret",
    "cliptuner-tls",
    "--ingress-host",
    "clip.example.com",
    "--ingress-class",
    "nginx",
    "--ingress-tls-secret",
    "clip-tls",
    "--gateway-from",
    "203.0.113.0/24",
    "--milvus-uri",
    "http://milvus.milvus.svc:19530",
    "--milvus-token-secret",
    "milvus-token",
    "--gpus-tuner",
    "1",
    "--no-workspace-chown",
    "--service-monitor",
    "--tag",
    "latest",
]


@pytest.fixture(scope="module")
def everything(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``cliptuner k8s`` with :data:`EVERYTHING_ARGS`, run once; its DIR."""
    out = tmp_path_factory.mktemp("k8s-everything") / "manifests"
    assert main(["k8s", "--out", str(out), *EVERYTHING_ARGS]) == 0
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_kubectl_kustomize_renders_a_set_valid_for_the_stated_kubernetes(generated, defaults, everything, version):
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is not on PATH: `kubectl kustomize DIR` cannot be checked (it runs offline)")
    for out in (generated[0], defaults[0], everything):
        files = load(out)
        assert sorted(p.name for p in out.iterdir()) == sorted([*files, k8s.KUSTOMIZATION_FILE])
        rendered = render(out)
        assert {key(d) for d in rendered} == {key(d) for docs in files.values() for d in docs}
        for doc in rendered:
            assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "cliptuner", key(doc)
            if doc["kind"] not in CRDS:
                validate(doc, version)
    kinds = {d["kind"] for d in render(everything)}
    assert kinds == {
        "Namespace",
        "PersistentVolumeClaim",
        "ConfigMap",
        "Service",
        "Deployment",
        "NetworkPolicy",
        "Ingress",
        "ServiceMonitor",
    }


def test_the_written_files(generated, defaults):
    out, files = generated
    assert list(files) == [
        k8s.NAMESPACE_FILE,
        k8s.PVC_FILE,
        k8s.INDEX_PVC_FILE,
        "encoder.yml",
        "indexer.yml",
        "tuner.yml",
        "gateway.yml",
        k8s.NETWORK_POLICY_FILE,
    ]
    assert list(defaults[1]) == list(files)  # no Ingress, no ServiceMonitors unless asked
    assert (
        (out / k8s.KUSTOMIZATION_FILE).read_text().splitlines()[1].endswith(f"Kubernetes >= {k8s.KUBERNETES_VERSION}.")
    )


def test_the_validator_rejects_a_misspelled_key_a_wrong_type_a_missing_field_and_an_unknown_kind(generated):
    _, files = generated
    deployment = objects(files, "Deployment")["encoder"]
    validate(deployment)
    typo = json.loads(json.dumps(deployment))
    containers(typo)[0]["readinesProbe"] = containers(typo)[0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="'readinesProbe' was unexpected"):
        validate(typo)
    nested = json.loads(json.dumps(deployment))
    nested["spec"]["template"]["spec"]["securityContext"]["fsgroup"] = 10001
    with pytest.raises(kubernetes_validate.ValidationError, match="'fsgroup' was unexpected"):
        validate(nested)
    mistyped = json.loads(json.dumps(deployment))
    mistyped["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError, match="'two' is not of type 'integer'"):
        validate(mistyped)
    nameless = json.loads(json.dumps(deployment))
    del containers(nameless)[0]["name"]
    with pytest.raises(kubernetes_validate.ValidationError, match="'name' is a required property"):
        validate(nameless)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate({"apiVersion": "apps/v1", "kind": "Deploymnet", "metadata": {"name": "x"}})


# --- replicas, volumes, security ---------------------------------------------------------------------------------


def test_encoder_replicas_follow_the_option_and_the_singletons_stay_single(generated):
    _, files = generated
    deployments = objects(files, "Deployment")
    assert sorted(deployments) == sorted([*EXECUTORS, "gateway"])
    assert deployments["encoder"]["spec"]["replicas"] == ENCODER_REPLICAS
    assert arg(containers(deployments["encoder"])[0], "--replicas") == str(ENCODER_REPLICAS)
    for name in ("tuner", "indexer"):  # one writer each of their files, also during an update
        assert deployments[name]["spec"]["replicas"] == 1
        assert deployments[name]["spec"]["strategy"] == {"type": "Recreate"}


def test_the_shared_claim_is_written_by_the_tuner_and_the_gateway_and_read_by_the_others(generated):
    _, files = generated
    claims = objects(files, "PersistentVolumeClaim")
    claim = claims["cliptuner-workspace"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"] == "nfs-client"
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    for name, deployment in objects(files, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        security = pod["securityContext"]
        assert (security["runAsUser"], security["runAsGroup"], security["fsGroup"]) == (10001, 10001, 10001)
        assert security["runAsNonRoot"] is True
        for container in containers(deployment):
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            }
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert volumes["workspace"]["persistentVolumeClaim"]["claimName"] == "cliptuner-workspace"
        container = containers(deployment)[0]
        mounts = mounts_of(container)
        workspace = mounts.pop("workspace")
        assert workspace["mountPath"] == "/workspace"
        assert workspace.get("readOnly", False) is (name in ("encoder", "indexer")), name
        if name == "gateway":  # its audit log goes to /workspace/audit; its keys are checked below
            assert list(mounts) == ["keys"]
            assert env_of(container)["CLIPTUNER_WORKSPACE"] == "/workspace"
            continue
        assert list(mounts) == (["index"] if name == "indexer" else []), name
        assert arg(container, "--workspace") == "/workspace"


# --- images: version tags, digests, the -gpu variant --------------------------------------------------------------


def test_images_are_pinned_to_the_package_version_by_default(defaults):
    _, files = defaults
    version = importlib.metadata.version("cliptuner")
    assert k8s.default_tag() == version
    for name, deployment in objects(files, "Deployment").items():
        for container in [*containers(deployment), *init_containers(deployment).values()]:
            assert container["image"] == f"cliptuner-{name}:{version}", name
            assert container["imagePullPolicy"] == "IfNotPresent", name
    assert "latest" not in json.dumps(files)


def test_a_digest_pins_one_image_and_latest_is_always_pulled(generated, exported):
    _, files = generated
    deployments = objects(files, "Deployment")
    indexer = containers(deployments["indexer"])[0]
    assert indexer["image"] == f"registry.example.com/ml/cliptuner-indexer:0.1.0@{DIGEST}"
    assert indexer["imagePullPolicy"] == "IfNotPresent"
    assert init_containers(deployments["indexer"])["wait-for-model"]["image"] == indexer["image"]
    assert containers(deployments["tuner"])[0]["image"] == "registry.example.com/ml/cliptuner-tuner:0.1.0"

    latest = k8s.build_manifests(copy(exported), k8s.K8sOptions(tag="latest", digests={"gateway": DIGEST}))
    for name, deployment in objects(latest, "Deployment").items():
        container = containers(deployment)[0]
        if name == "gateway":
            assert (container["image"], container["imagePullPolicy"]) == (
                f"cliptuner-gateway:latest@{DIGEST}",
                "IfNotPresent",
            )
        else:
            assert (container["image"], container["imagePullPolicy"]) == (f"cliptuner-{name}:latest", "Always")
    assert k8s.pull_policy("cliptuner-encoder:latest-gpu") == "Always"
    assert k8s.pull_policy("registry:5000/cliptuner-encoder") == "Always"  # no tag: latest
    assert k8s.pull_policy("registry:5000/cliptuner-encoder:0.1.0-gpu") == "IfNotPresent"

    with pytest.raises(ValueError, match=r"--digest merger=\.\.\.: the Flow has no service named 'merger'"):
        k8s.build_manifests(copy(exported), k8s.K8sOptions(digests={"merger": DIGEST}))


def test_the_digest_option_is_refused_when_malformed_or_repeated(tmp_path, capsys):
    assert main(["k8s", "--out", str(tmp_path / "a"), "--digest", "encoder=sha256:abc"]) == 2
    assert (
        "--digest encoder=sha256:abc: the digest must be sha256: and 64 lowercase hex digits" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main(["k8s", "--out", str(tmp_path / "b"), "--digest", f"encoder{DIGEST}"])
    assert "must be NAME=sha256:<64 hex digits>" in capsys.readouterr().err
    assert (
        main(["k8s", "--out", str(tmp_path / "c"), "--digest", f"encoder={DIGEST}", "--digest", f"encoder={DIGEST}"])
        == 2
    )
    assert "--digest encoder=...: given twice" in capsys.readouterr().err


def test_gpu_pods_run_the_gpu_image_on_cuda_and_reserve_the_gpus(generated, exported):
    _, files = generated
    deployments = objects(files, "Deployment")
    encoder = containers(deployments["encoder"])[0]
    assert encoder["image"] == "registry.example.com/ml/cliptuner-encoder:0.1.0-gpu"
    assert encoder["resources"]["limits"][k8s.GPU_RESOURCE] == "1"
    assert uses_with(deployments["encoder"])["device"] == "cuda"  # no silent fallback to the CPU
    for name in ("tuner", "indexer", "gateway"):
        container = containers(deployments[name])[0]
        assert "-gpu" not in container["image"] and k8s.GPU_RESOURCE not in container["resources"]["limits"], name
    assert uses_with(deployments["tuner"])["device"] == "auto"

    both = k8s.K8sOptions(gpus_tuner=2, gpus_encoder=1, resources={"tuner": ("4", "16Gi")})
    deployments = objects(k8s.build_manifests(copy(exported), both), "Deployment")
    tuner = containers(deployments["tuner"])[0]
    assert tuner["resources"]["limits"] == {"memory": "16Gi", k8s.GPU_RESOURCE: "2"}
    assert tuner["image"].endswith("-gpu") and uses_with(deployments["tuner"])["device"] == "cuda"
    assert init_containers(deployments["tuner"])["workspace-owner"]["image"] == tuner["image"]


def test_the_help_says_how_to_build_the_gpu_image(capsys):
    with pytest.raises(SystemExit):
        main(["k8s", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f'--build-arg "{k8s.GPU_BUILD_ARG}"' in help_text
    assert f"-t cliptuner-encoder:{k8s.default_tag()}-gpu ." in help_text
    assert "<prefix>encoder:<tag>-gpu" in help_text and "<prefix>tuner:<tag>-gpu" in help_text
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f'--build-arg "{k8s.GPU_BUILD_ARG}"' in dockerfile
    assert 'pip install "$ORT"' in dockerfile and "ldconfig" in dockerfile  # the CUDA libraries are found


# --- the base model, version retention, threads: what the Executors are started with ------------------------------


def test_model_and_pretrained_reach_the_executors(generated, defaults):
    for files, model, pretrained in ((generated[1], "ViT-B-32", "openai"), (defaults[1], "cliptuner-tiny", None)):
        deployments = objects(files, "Deployment")
        for name in EXECUTORS:
            settings = uses_with(deployments[name])
            assert (settings["model"], settings["pretrained"]) == (model, pretrained), name
            env = env_of(containers(deployments[name])[0])
            assert (env["CLIPTUNER_MODEL"], env["CLIPTUNER_PRETRAINED"]) == (model, pretrained or ""), name
    flow = yaml.safe_load(k8s.default_flow().read_text())
    tuner = next(e for e in flow["executors"] if e["name"] == "tuner")["uses_with"]
    assert (tuner["model"], tuner["pretrained"], tuner["keep_versions"]) == (
        k8s.DEFAULT_MODEL,
        None,
        k8s.DEFAULT_KEEP_VERSIONS,
    )  # the defaults are flows/k8s.yml's


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("model", "ViT B 32", "--model 'ViT B 32': must be an OpenCLIP arch"),
        ("model", "", "--model '': must be an OpenCLIP arch"),
        ("model", "ViT-B-32;rm", "--model 'ViT-B-32;rm'"),
        ("pretrained", "open ai", "--pretrained 'open ai': must be a pretrained tag"),
        ("pretrained", "ckpt/base.pt", "--pretrained 'ckpt/base.pt': a checkpoint must be an absolute path"),
        ("pretrained", "base.pt", "--pretrained 'base.pt': a checkpoint must be an absolute path"),
    ],
)
def test_a_bad_model_name_is_refused(option, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        k8s.K8sOptions(**{option: value})


def test_a_checkpoint_path_and_none_are_accepted(tmp_path, capsys):
    assert k8s.K8sOptions(pretrained="/workspace/data/base.pt").pretrained == "/workspace/data/base.pt"
    assert k8s.K8sOptions(model="hf-hub:timm/ViT-B-16-SigLIP", pretrained="webli").model.startswith("hf-hub:")
    assert main(["k8s", "--out", str(tmp_path / "a"), "--pretrained", "bad tag"]) == 2
    assert "cliptuner k8s: error: --pretrained 'bad tag'" in capsys.readouterr().err


def test_every_setting_given_to_an_executor_is_one_its_class_takes(generated, exported):
    from executors import CLIPEncoder, CLIPIndexer, CLIPTuner
    from executors.options import ExecutorSettings

    classes = {"tuner": CLIPTuner, "encoder": CLIPEncoder, "indexer": CLIPIndexer}
    milvus = k8s.K8sOptions(milvus_uri="http://milvus.milvus.svc:19530", gpus_tuner=1)
    for files in (generated[1], k8s.build_manifests(copy(exported), milvus)):
        for name, cls in classes.items():
            accepted = set(inspect.signature(cls.__init__).parameters) | {
                f.name for f in dataclasses.fields(ExecutorSettings)
            }
            settings = uses_with(objects(files, "Deployment")[name])
            assert set(settings) <= accepted, (name, set(settings) - accepted)
            ExecutorSettings.of(**{k: v for k, v in settings.items() if k in ExecutorSettings.__dataclass_fields__})


def test_the_tuner_keeps_the_newest_versions(generated, defaults, exported):
    assert uses_with(objects(generated[1], "Deployment")["tuner"])["keep_versions"] == 3
    assert uses_with(objects(defaults[1], "Deployment")["tuner"])["keep_versions"] == k8s.DEFAULT_KEEP_VERSIONS
    every = k8s.build_manifests(copy(exported), k8s.K8sOptions(keep_versions=0))
    assert uses_with(objects(every, "Deployment")["tuner"])["keep_versions"] is None  # 0: keep every version
    for name in ("encoder", "indexer"):  # only the publisher prunes
        assert "keep_versions" not in uses_with(objects(defaults[1], "Deployment")[name])
    with pytest.raises(ValueError, match=r"--keep-versions -1: must be 1 or more \(0: keep every version\)"):
        k8s.K8sOptions(keep_versions=-1)


def test_threads_follow_each_pods_cpu_request(generated, exported):
    assert [k8s.cpu_threads(c) for c in ("250m", "500m", "1", "1.5", "2", "2100m", "16")] == [1, 1, 1, 2, 2, 3, 16]
    options = k8s.K8sOptions(resources={"tuner": ("3500m", "8Gi"), "encoder": ("4", "2Gi")})
    deployments = objects(k8s.build_manifests(copy(exported), options), "Deployment")
    expected = {"tuner": 4, "encoder": 4, "indexer": 1, "gateway": 1}  # 3500m, 4, 500m and 250m rounded up
    for name, threads in expected.items():
        container = containers(deployments[name])[0]
        env = env_of(container)
        assert env["OMP_NUM_THREADS"] == str(threads), name
        assert ("CLIPTUNER_TORCH_THREADS" in env) is (name == "tuner"), name
        if name == "tuner":
            assert env["CLIPTUNER_TORCH_THREADS"] == str(threads)
        if name != "gateway":
            assert uses_with(deployments[name])["intra_op_threads"] == threads, name
    with pytest.raises(ValueError, match=r"--encoder-cpu '0m': must be a CPU quantity above 0"):
        k8s.K8sOptions(resources={"encoder": ("0m", "2Gi")})


# --- the indexer's own volume ----------------------------------------------------------------------------------------


def test_the_indexer_keeps_its_index_on_its_own_read_write_once_claim(generated, exported):
    _, files = generated
    claims = objects(files, "PersistentVolumeClaim")
    assert sorted(claims) == ["cliptuner-workspace", "indexer-store"]
    store = claims["indexer-store"]
    assert store["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert store["spec"]["storageClassName"] == "standard-rwo"
    assert store["spec"]["resources"]["requests"]["storage"] == k8s.DEFAULT_INDEX_STORAGE
    indexer = objects(files, "Deployment")["indexer"]
    volumes = {v["name"]: v for v in indexer["spec"]["template"]["spec"]["volumes"]}
    assert volumes["index"]["persistentVolumeClaim"]["claimName"] == "indexer-store"
    mount = mounts_of(containers(indexer)[0])["index"]
    assert mount == {"name": "index", "mountPath": k8s.INDEX_DIR}  # writable, unlike /workspace
    assert uses_with(indexer)["index_dir"] == mount["mountPath"]
    for name, deployment in objects(files, "Deployment").items():  # nobody else mounts it
        if name != "indexer":
            assert "index" not in {v["name"] for v in deployment["spec"]["template"]["spec"].get("volumes", [])}

    options = k8s.K8sOptions(milvus_uri="http://milvus.milvus.svc:19530", index_storage="2Gi")
    with_milvus = k8s.build_manifests(copy(exported), options)
    store = objects(with_milvus, "PersistentVolumeClaim")["indexer-store"]  # the docs' image bytes stay local
    assert store["spec"]["resources"]["requests"]["storage"] == "2Gi" and "storageClassName" not in store["spec"]
    assert uses_with(objects(with_milvus, "Deployment")["indexer"])["index_dir"] == k8s.INDEX_DIR


def test_each_indexer_shard_gets_its_own_claim(sharded):
    manifests = k8s.build_manifests(copy(sharded), k8s.K8sOptions())
    deployments = objects(manifests, "Deployment")
    assert sorted(deployments) == ["encoder", "gateway", "indexer-0", "indexer-1", "indexer-head", "tuner"]
    claims = {d["metadata"]["name"]: d for d in manifests[k8s.INDEX_PVC_FILE]}
    assert sorted(claims) == ["indexer-0-store", "indexer-1-store"]
    for shard in ("indexer-0", "indexer-1"):
        deployment = deployments[shard]
        validate(deployment)
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["index"]["persistentVolumeClaim"]["claimName"] == f"{shard}-store"
        assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
        assert uses_with(deployment)["index_dir"] == k8s.INDEX_DIR
        assert mounts_of(containers(deployment)[0])["workspace"]["readOnly"] is True
    head = deployments["indexer-head"]["spec"]["template"]["spec"]
    assert "volumes" not in head and "initContainers" not in head  # jina's head routes, it stores nothing
    for claim in claims.values():
        validate(claim)


READER = """
import errno, os, sys

# What a read-only mount of the workspace does to Python: every write under it fails (mkdir of an existing folder
# says it exists, as the kernel does). The test also mounts it read-only where it can, for writes from C code.
WORKSPACE = os.path.realpath(sys.argv[1])
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = {  # event -> positions of the paths it writes
    "os.mkdir": (0,), "os.remove": (0,), "os.rmdir": (0,), "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,),
    "os.truncate": (0,), "os.rename": (0, 1), "os.link": (1,), "os.symlink": (1,), "shutil.copyfile": (1,),
    "shutil.rmtree": (0,), "sqlite3.connect": (0,),
}


def under(path):
    if not isinstance(path, (str, bytes, os.PathLike)):
        return False  # a file descriptor
    real = os.path.realpath(os.fsdecode(path))
    return real == WORKSPACE or real.startswith(WORKSPACE + os.sep)


def guard(event, args):
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE_FLAGS)
        paths = [path] if writing else []
    else:
        paths = [args[i] for i in PATH_EVENTS.get(event, ())]
    for path in paths:
        if under(path):
            if event == "os.mkdir" and os.path.isdir(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
            print(f"write refused: {event} {path}", file=sys.stderr, flush=True)
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)


sys.addaudithook(guard)

import asyncio, json
from docarray import DocList
from executors import CLIPEncoder, CLIPIndexer
from executors.schemas import ClipDoc

workspace, store = sys.argv[1], sys.argv[2]
encoder = CLIPEncoder(workspace=workspace, bootstrap=False, bootstrap_timeout=1)
indexer = CLIPIndexer(workspace=workspace, index_dir=store, bootstrap=False, bootstrap_timeout=1, watch_interval=0)
texts = ["a red square", "a blue circle", "a green star"]
asyncio.run(indexer.index(docs=DocList[ClipDoc]([ClipDoc(id=f"d{i}", text=t) for i, t in enumerate(texts)])))


def state():
    query = DocList[ClipDoc]([ClipDoc(id="q", text="a red square")])
    encoded = asyncio.run(encoder.encode(docs=DocList[ClipDoc]([ClipDoc(id="q", text="a red square")])))[0]
    found = asyncio.run(indexer.search(docs=query, parameters={"limit": 1}))[0]
    return {"encoder": encoded.model_version, "index": indexer.collection.version, "top": found.matches[0].id}


print(json.dumps(state()), flush=True)
sys.stdin.readline()  # the tuner publishes a new version meanwhile
asyncio.run(encoder.train_done(docs=DocList[ClipDoc]()))
asyncio.run(indexer.train_done(docs=DocList[ClipDoc]()))
print(json.dumps(state()), flush=True)
encoder.close()
indexer.close()
"""
# run `$@` with the folder $1 mounted read-only onto itself, in a mount namespace of its own
READ_ONLY_MOUNT = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'


def read_only_mount_prefix(folder: Path) -> list[str]:
    """The command prefix that runs a command with ``folder`` mounted read-only, where this machine allows one (a
    mount namespace: root, or an unprivileged user namespace); else none (the reader's audit hook still guards)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    namespace = [unshare, "-m"] if os.geteuid() == 0 else [unshare, "-r", "-m"]
    probe = subprocess.run([*namespace, "sh", "-c", READ_ONLY_MOUNT, "sh", str(folder), "true"], capture_output=True)
    return [*namespace, "sh", "-c", READ_ONLY_MOUNT, "sh", str(folder)] if probe.returncode == 0 else []


def test_the_encoder_and_the_indexer_write_nothing_to_the_shared_volume(tmp_path, tiny_model_dir, tiny_model_dir_v2):
    """What their read-only mount of /workspace relies on: on a workspace they cannot write (mounted read-only where
    this machine allows it, and every write from Python under it refused), they load CURRENT, index, search, and
    move to the version the tuner publishes next, with their index in their own folder (the ReadWriteOnce claim)."""
    workspace, store = tmp_path / "workspace", tmp_path / "index"
    registry = Registry(workspace / "models")
    registry.publish(tiny_model_dir)  # v1
    (workspace / "data").mkdir()
    store.mkdir()
    before = {str(p.relative_to(workspace)) for p in workspace.rglob("*")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPTUNER_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    mount = read_only_mount_prefix(workspace)
    proc = subprocess.Popen(
        [*mount, sys.executable, "-c", READER, str(workspace), str(store)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        first = proc.stdout.readline()
        assert first, proc.stderr.read()[-3000:]
        assert json.loads(first) == {"encoder": "v1", "index": "v1", "top": "d0"}
        assert registry.publish(tiny_model_dir_v2) == "v2"  # the tuner, the one writer, in its own mount
        proc.stdin.write("go\n")
        proc.stdin.flush()
        second = proc.stdout.readline()
        assert second, proc.stderr.read()[-3000:]
        assert json.loads(second) == {"encoder": "v2", "index": "v2", "top": "d0"}
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert "write refused" not in proc.stderr.read()
    added = {str(p.relative_to(workspace)) for p in workspace.rglob("*")} - before
    assert "models/v2" in added and all(p.startswith("models/v2") for p in added), added  # the tuner's only
    assert any(store.iterdir())  # the index went to its own folder


# --- init containers: the shared volume's owner, the wait for the first version ------------------------------------


def test_the_writers_make_the_shared_volume_theirs_and_the_readers_wait_for_a_version(generated, exported):
    _, files = generated
    for name, deployment in objects(files, "Deployment").items():
        inits = init_containers(deployment)
        image = containers(deployment)[0]["image"]
        if name in ("tuner", "gateway"):
            assert list(inits) == ["workspace-owner"], name
            owner = inits["workspace-owner"]
            assert owner["image"] == image and owner["command"] == ["sh", "-c", k8s.WORKSPACE_OWNER_SCRIPT]
            assert owner["securityContext"] == {
                "runAsUser": 0,
                "runAsGroup": 0,
                "runAsNonRoot": False,
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
            }
            assert owner["volumeMounts"] == [{"name": "workspace", "mountPath": "/workspace"}]
        else:
            assert list(inits) == ["wait-for-model"], name
            wait = inits["wait-for-model"]
            assert wait["image"] == image and wait["command"] == ["sh", "-c", k8s.WAIT_FOR_MODEL_SCRIPT]
            assert "runAsUser" not in wait["securityContext"]  # the pod's uid 10001
            assert wait["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            assert wait["volumeMounts"] == [{"name": "workspace", "mountPath": "/workspace", "readOnly": True}]
        for init in inits.values():
            assert init["resources"] == k8s.INIT_RESOURCES
    unchowned = k8s.build_manifests(copy(exported), k8s.K8sOptions(workspace_chown=False))
    for name, deployment in objects(unchowned, "Deployment").items():
        assert list(init_containers(deployment)) == ([] if name in ("tuner", "gateway") else ["wait-for-model"])


def _script_in(folder: Path, script: str) -> str:
    return script.replace(k8s.WORKSPACE, str(folder))


def test_workspace_owner_gives_the_top_folders_to_the_service_user_without_recursing(tmp_path):
    workspace = tmp_path / "workspace"
    (workspace / "models" / "v1").mkdir(parents=True)
    (workspace / "audit").mkdir()
    bin_dir = tmp_path / "bin"  # a chown that records its calls (only root could give files to uid 10001)
    bin_dir.mkdir()
    log = tmp_path / "chown.log"
    (bin_dir / "chown").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (bin_dir / "chown").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    script = _script_in(workspace, k8s.WORKSPACE_OWNER_SCRIPT)
    result = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == ["10001:10001 .", "10001:10001 models", "10001:10001 audit"]

    (bin_dir / "chown").write_text("#!/bin/sh\nexit 1\n")  # a volume that squashes root
    (workspace / "data").mkdir()
    for folder in (workspace, workspace / "models", workspace / "audit"):
        folder.chmod(0o777)  # writable by every user: accepted as it is
    result = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"cannot give {workspace}/data to uid 10001" in result.stderr and "no_root_squash" in result.stderr
    assert f"{workspace}/models is not uid 10001's but writable by every user" in result.stdout


def test_wait_for_model_waits_for_current(tmp_path):
    models = tmp_path / "workspace" / "models"
    models.mkdir(parents=True)
    proc = subprocess.Popen(
        ["sh", "-c", _script_in(tmp_path / "workspace", k8s.WAIT_FOR_MODEL_SCRIPT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert "waiting for the tuner to publish" in proc.stdout.readline()
        assert proc.poll() is None
        (models / "CURRENT").write_text("v1\n")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


# --- network policies and the Ingress -----------------------------------------------------------------------------


def _rules(policy: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """port -> the peers allowed to reach it (``[]``: everyone)."""
    return {p["port"]: rule.get("from", []) for rule in policy["spec"]["ingress"] for p in rule["ports"]}


def test_executors_accept_grpc_only_from_the_gateway(generated):
    _, files = generated
    deployments = objects(files, "Deployment")
    policies = objects(files, "NetworkPolicy")
    assert sorted(policies) == sorted(f"{name}-ingress" for name in deployments)
    gateway_pods = deployments["gateway"]["spec"]["template"]["metadata"]["labels"]
    scrapers = [
        {"podSelector": {}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
    ]
    for name, deployment in deployments.items():
        policy = policies[f"{name}-ingress"]
        selected = policy["spec"]["podSelector"]["matchLabels"]
        assert selected.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        assert all(  # it selects no other service's pods
            not selected.items() <= other["spec"]["template"]["metadata"]["labels"].items()
            for other_name, other in deployments.items()
            if other_name != name
        )
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        grpc_port = int(arg(containers(deployment)[0], "--port"))
        metrics_port = int(arg(containers(deployment)[0], "--port-monitoring"))
        rules = _rules(policy)
        assert sorted(rules) == sorted([grpc_port, metrics_port])
        assert rules[metrics_port] == scrapers, name
        if name == "gateway":
            assert rules[grpc_port] == [], name  # from anywhere
        else:
            (peer,) = rules[grpc_port]
            assert peer["podSelector"]["matchLabels"].items() <= gateway_pods.items(), name
            assert peer["podSelector"]["matchLabels"]["app"] == "gateway"


def test_the_gateway_can_be_limited_to_cidrs_and_shards_to_their_head(exported, sharded):
    options = k8s.K8sOptions(gateway_from=("10.0.0.0/8", "2001:db8::/32"))
    policies = objects(k8s.build_manifests(copy(exported), options), "NetworkPolicy")
    assert _rules(policies["gateway-ingress"])[8080] == [
        {"ipBlock": {"cidr": "10.0.0.0/8"}},
        {"ipBlock": {"cidr": "2001:db8::/32"}},
    ]
    assert _rules(policies["gateway-ingress"])[9090] == [{"podSelector": {}}]  # this namespace only, by default
    policies = objects(k8s.build_manifests(copy(sharded), k8s.K8sOptions()), "NetworkPolicy")
    for shard in ("indexer-0", "indexer-1"):  # the gateway calls the head; the head calls the shards
        assert _rules(policies[f"{shard}-ingress"])[8080] == [{"podSelector": {"matchLabels": {"app": "indexer-head"}}}]
    assert _rules(policies["indexer-head-ingress"])[8080] == [{"podSelector": {"matchLabels": {"app": "gateway"}}}]
    for policy in policies.values():
        validate(policy)


def test_an_ingress_for_the_gateways_grpc_port_only_when_asked(generated, exported):
    _, files = generated
    assert not objects(files, "Ingress")
    options = k8s.K8sOptions(ingress_host="clip.example.com", ingress_class="nginx", ingress_tls_secret="clip-tls")
    manifests = k8s.build_manifests(copy(exported), options)
    (ingress,) = manifests[k8s.INGRESS_FILE]
    validate(ingress)
    assert k8s.INGRESS_FILE in manifests[k8s.KUSTOMIZATION_FILE][0]["resources"]
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == "0"  # the gateway limits each message
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "86400"  # a synchronous /train
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [{"hosts": ["clip.example.com"], "secretName": "clip-tls"}]
    (rule,) = spec["rules"]
    assert rule["host"] == "clip.example.com"
    (path,) = rule["http"]["paths"]
    service = objects(manifests, "Service")["gateway"]
    grpc_port = int(arg(containers(objects(manifests, "Deployment")["gateway"])[0], "--port"))
    target = next(p for p in service["spec"]["ports"] if int(p["port"]) == path["backend"]["service"]["port"]["number"])
    assert path["backend"]["service"]["name"] == "gateway" and int(target["targetPort"]) == grpc_port
    assert (path["path"], path["pathType"]) == ("/", "Prefix")  # every gRPC method: /<service>/<method>

    tls = k8s.build_manifests(copy(exported), k8s.K8sOptions(ingress_host="clip.example.com", tls_secret="gw-tls"))
    (ingress,) = tls[k8s.INGRESS_FILE]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPCS"
    assert "tls" not in ingress["spec"] and "ingressClassName" not in ingress["spec"]
    with pytest.raises(ValueError, match="--ingress-tls-secret needs --ingress-host"):
        k8s.K8sOptions(ingress_tls_secret="clip-tls")


# --- probes, Services, metrics, Milvus, options -------------------------------------------------------------------


def test_every_container_has_grpc_probes_on_a_port_it_declares(generated):
    _, files = generated
    for name, deployment in objects(files, "Deployment").items():
        for container in containers(deployment):
            ports = declared_ports(container)
            grpc_port = int(container["args"][container["args"].index("--port") + 1])
            assert grpc_port in ports, name
            for kind in PROBES:
                probe = container[kind]
                assert set(probe) & {"grpc", "exec", "httpGet", "tcpSocket"} == {"grpc"}, (name, kind)
                assert probe["grpc"]["port"] == grpc_port, (name, kind)
            # jina's budget from timeout_ready (1200 s / 5 s); the gateway waits for the slowest Executor
            assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 1200, (
                name
            )


def test_services_expose_the_grpc_and_metrics_ports_of_their_pods(generated):
    _, files = generated
    deployments = objects(files, "Deployment")
    services = objects(files, "Service")
    assert sorted(services) == sorted([*EXECUTORS, "gateway"])
    for name, service in services.items():
        pod = deployments[name]["spec"]["template"]
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        ports = declared_ports(containers(deployments[name])[0])
        by_name = {p["name"]: p for p in service["spec"]["ports"]}
        assert int(by_name["port"]["targetPort"]) in ports  # gRPC
        assert int(by_name["monitoring"]["targetPort"]) in ports
    gateway = services["gateway"]["spec"]["ports"]
    grpc_port = int(
        containers(deployments["gateway"])[0]["args"][containers(deployments["gateway"])[0]["args"].index("--port") + 1]
    )
    assert any(int(p["port"]) == grpc_port and int(p["targetPort"]) == grpc_port for p in gateway)


def test_prometheus_annotations_point_at_a_declared_metrics_port(generated):
    _, files = generated
    for name, deployment in objects(files, "Deployment").items():
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", name
        assert annotations["prometheus.io/path"] == k8s.METRICS_PATH
        port = int(annotations["prometheus.io/port"])
        container = containers(deployment)[0]
        assert port in declared_ports(container), name
        assert "--monitoring" in container["args"]  # jina serves metrics only with monitoring on
        assert container["args"][container["args"].index("--port-monitoring") + 1] == str(port)


def test_resources_are_requested_per_service_and_gpus_only_where_asked(defaults):
    _, files = defaults
    for name, deployment in objects(files, "Deployment").items():
        resources = containers(deployment)[0]["resources"]
        cpu, memory = k8s.DEFAULT_RESOURCES[name]
        assert resources == {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}}, name
    assert "storageClassName" not in objects(files, "PersistentVolumeClaim")["cliptuner-workspace"]["spec"]
    assert objects(files, "Deployment")["encoder"]["spec"]["replicas"] == 2


def test_service_monitors_only_when_asked(generated, exported):
    _, files = generated
    assert not objects(files, "ServiceMonitor")  # jina writes them; they need the Prometheus Operator's CRDs
    manifests = k8s.build_manifests(copy(exported), k8s.K8sOptions(service_monitor=True))
    monitors = manifests[k8s.SERVICE_MONITOR_FILE]
    assert sorted(m["metadata"]["name"] for m in monitors) == sorted([*EXECUTORS, "gateway"])
    assert k8s.SERVICE_MONITOR_FILE in manifests[k8s.KUSTOMIZATION_FILE][0]["resources"]
    services = objects(manifests, "Service")
    for monitor in monitors:
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["monitoring"]
        assert "monitoring" in {p["name"] for p in services[monitor["metadata"]["name"]]["spec"]["ports"]}


def test_the_indexer_connects_to_milvus_when_asked(generated, exported):
    _, files = generated
    default = containers(objects(files, "Deployment")["indexer"])[0]
    settings = json.loads(arg(default, "--uses-with"))
    assert "backend" not in settings and "milvus_uri" not in settings  # the embedded store by default
    assert all(e["name"] != "CLIPTUNER_MILVUS_TOKEN" for e in default.get("env", []))

    options = k8s.K8sOptions(milvus_uri="http://milvus.milvus.svc:19530", milvus_token_secret="milvus-token")
    options.validate()
    deployments = objects(k8s.build_manifests(copy(exported), options), "Deployment")
    indexer = containers(deployments["indexer"])[0]
    validate(deployments["indexer"])
    settings = uses_with(deployments["indexer"])
    assert settings["backend"] == "milvus" and settings["milvus_uri"] == "http://milvus.milvus.svc:19530"
    assert settings["bootstrap"] is False and settings["trust_client_vectors"] is True  # the rest is kept
    assert {
        "name": "CLIPTUNER_MILVUS_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "milvus-token", "key": "token"}},
    } in indexer["env"]
    for name in ("tuner", "encoder"):  # only the indexer talks to the vector store
        assert "milvus" not in arg(containers(deployments[name])[0], "--uses-with")


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("milvus_uri", "milvus:19530", "--milvus-uri 'milvus:19530'"),
        ("milvus_token_secret", "milvus-token", "--milvus-token-secret needs --milvus-uri"),
        ("encoder_replicas", 0, "--encoder-replicas 0"),
        ("gpus_tuner", -1, "--gpus-tuner -1"),
        ("namespace", "Cliptuner", "--namespace 'Cliptuner'"),
        ("tag", "-bad", "--tag '-bad'"),
        ("storage", "20GB", "--storage '20GB'"),
        ("resources", {"encoder": ("1", "2GB")}, "--encoder-memory '2GB'"),
        ("resources", {"tuner": ("two", "8Gi")}, "--tuner-cpu 'two'"),
        ("keys_secret", "Cliptuner_Keys", "--keys-secret 'Cliptuner_Keys'"),
        ("keys_secret", None, "--keys-secret: the gateway needs a Secret of API keys, or --insecure-no-auth"),
        ("tls_secret", "tls secret", "--tls-secret 'tls secret'"),
        ("tag", "t" * 125, "--tag 'ttt"),
        ("digests", {"Encoder": DIGEST}, "'Encoder' must be a service name"),
        ("index_storage", "10GB", "--index-storage '10GB'"),
        ("index_storage_class", "Fast_SSD", "--index-storage-class 'Fast_SSD'"),
        ("gateway_from", ("10.0.0.1/8",), "--gateway-from '10.0.0.1/8': must be a CIDR"),
        ("gateway_from", ("10.0.0.1",), "--gateway-from '10.0.0.1': must be a CIDR with its prefix length"),
        ("gateway_from", ("anywhere",), "--gateway-from 'anywhere'"),
        ("metrics_from_namespaces", ("Monitoring",), "--metrics-from-namespace 'Monitoring'"),
        ("ingress_host", "clip example.com", "--ingress-host 'clip example.com'"),
        ("ingress_class", "nginx", "--ingress-class needs --ingress-host"),
    ],
)
def test_a_bad_option_is_refused_by_name(option, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        k8s.K8sOptions(**{option: value})


def test_the_command_refuses_bad_input_with_one_line(tmp_path, capsys):
    assert main(["k8s", "--out", str(tmp_path / "a"), "--encoder-replicas", "0"]) == 2
    assert "cliptuner k8s: error: --encoder-replicas 0" in capsys.readouterr().err
    assert main(["k8s", "--out", str(tmp_path / "b"), "--flow", str(tmp_path / "missing.yml")]) == 2
    assert "--flow" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.yml").write_text("kind: Secret\n")
    with pytest.raises(ValueError, match="--out .*mine.yml"):
        k8s.write_manifests(tmp_path / "c", {"x.yml": []}, k8s.K8sOptions())


# --- training on several nodes: each /train run as a Kubernetes Job ----------------------------------------------

TRAIN_ARGS = [
    "--train-nodes",
    "2",
    "--train-gpus-per-node",
    "1",
    "--train-procs-per-node",
    "1",
    "--train-cpu",
    "4",
    "--train-memory",
    "24Gi",
    "--namespace",
    "ml-search",
    "--pvc-name",
    "shared-workspace",
    "--image-prefix",
    "registry.example.com/ml/cliptuner-",
    "--tag",
    "0.1.0",
]
RUN_DIR = Path(k8s.WORKSPACE) / "runs" / "run-1"  # where the tuner puts a run: <workspace>/runs/<run id>


@pytest.fixture(scope="module")
def training(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[dict[str, Any]]]]:
    """``cliptuner k8s`` with :data:`TRAIN_ARGS`, run once; (DIR, its objects per file)."""
    out = tmp_path_factory.mktemp("k8s-training") / "manifests"
    assert main(["k8s", "--out", str(out), *TRAIN_ARGS]) == 0
    return out, load(out)


def train_cluster_of(files: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The tuner's ``train_cluster`` setting, as the rendered JSON gives it to CLIPTuner."""
    return uses_with(objects(files, "Deployment")["tuner"])["train_cluster"]


def run_job(train_cluster: dict[str, Any]) -> list[dict[str, Any]]:
    """The headless Service and the Job the tuner would create for run ``run-1`` with ``train_cluster``."""
    from cliptuner.serve.cluster import job_manifests

    return job_manifests("run-1", RUN_DIR / "inputs" / "job.json", RUN_DIR / "events.jsonl", **train_cluster)


def allows(role: dict[str, Any], group: str, resource: str, verb: str) -> bool:
    """Whether one of the Role's rules grants ``verb`` on ``resource`` of API ``group`` (no wildcards expected)."""
    return any(
        group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"] for rule in role["rules"]
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_training_on_several_nodes_renders_a_valid_set(training, version):
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is not on PATH: `kubectl kustomize DIR` cannot be checked (it runs offline)")
    out, files = training
    assert k8s.TRAINING_RBAC_FILE in files
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, k8s.KUSTOMIZATION_FILE])
    rendered = render(out)
    assert {key(d) for d in rendered} == {key(d) for docs in files.values() for d in docs}
    for doc in rendered:
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "ml-search", key(doc)
        validate(doc, version)
    assert {"ServiceAccount", "Role", "RoleBinding"} <= {d["kind"] for d in rendered}
    for doc in run_job(train_cluster_of(files)):  # what the tuner creates at each run validates too
        validate(doc, version)


def test_the_tuner_trains_each_run_as_a_job_of_the_gpu_tuner_image_on_the_workspace_claim(training):
    from cliptuner.serve.cluster import TrainingCluster
    from executors import CLIPTuner

    out, files = training
    deployments = objects(files, "Deployment")
    settings = train_cluster_of(files)
    cluster = TrainingCluster(**settings)
    assert "train_cluster" in inspect.signature(CLIPTuner.__init__).parameters
    tuner = containers(deployments["tuner"])[0]
    assert tuner["image"] == "registry.example.com/ml/cliptuner-tuner:0.1.0"  # the tuner itself trains nothing
    assert k8s.GPU_RESOURCE not in tuner["resources"]["limits"]
    assert cluster.image == tuner["image"] + k8s.GPU_SUFFIX  # the tuner's -gpu variant
    (claim,) = objects({k8s.PVC_FILE: files[k8s.PVC_FILE]}, "PersistentVolumeClaim").values()
    assert cluster.workspace_claim == claim["metadata"]["name"] == "shared-workspace"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every training pod mounts it
    workspace = next(v for v in deployments["tuner"]["spec"]["template"]["spec"]["volumes"] if v["name"] == "workspace")
    assert workspace["persistentVolumeClaim"]["claimName"] == cluster.workspace_claim
    assert (cluster.nodes, cluster.procs_per_node, cluster.gpus_per_node) == (2, 1, 1)
    assert (cluster.cpu, cluster.memory, cluster.namespace) == ("4", "24Gi", "ml-search")
    assert cluster.service_account is None  # the training pods get no API token
    assert uses_with(deployments["tuner"])["device"] == "cuda"  # where the runs train: the Job's GPUs
    cpu_only = k8s.K8sOptions(train_nodes=3, tag="0.1.0").training_cluster()
    assert cpu_only is not None and cpu_only["image"] == "cliptuner-tuner:0.1.0"
    assert TrainingCluster(**cpu_only).gpus_per_node == 0
    assert "--train-nodes 2: each /train run is a Kubernetes Job" in (out / "tuner.yml").read_text()


def test_the_tuner_runs_as_the_service_account_the_role_of_the_training_jobs_is_bound_to(training):
    _, files = training
    deployments = objects(files, "Deployment")
    pod = deployments["tuner"]["spec"]["template"]["spec"]
    (account,) = objects(files, "ServiceAccount").values()
    (binding,) = objects(files, "RoleBinding").values()
    (role,) = objects(files, "Role").values()
    assert pod["serviceAccountName"] == account["metadata"]["name"] == "cliptuner-tuner"
    assert pod["automountServiceAccountToken"] is True  # KubeAPI.in_cluster reads the mounted token
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "cliptuner-tuner", "namespace": "ml-search"}]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    for verb in ("create", "get", "delete"):
        assert allows(role, "batch", "jobs", verb), verb
        assert allows(role, "", "services", verb), verb
    assert allows(role, "", "pods", "list")  # a run whose pods cannot start fails
    assert not allows(role, "", "secrets", "get") and not allows(role, "", "jobs", "create")  # nothing else
    for name, deployment in deployments.items():  # only the tuner runs as that account
        if name != "tuner":
            assert "serviceAccountName" not in deployment["spec"]["template"]["spec"], name


def test_the_training_pods_reach_each_other_and_write_the_run_folder_as_the_tuners_user(training):
    _, files = training
    deployments = objects(files, "Deployment")
    tuner_pod = deployments["tuner"]["spec"]["template"]["spec"]
    service, job = run_job(train_cluster_of(files))
    job_pod = job["spec"]["template"]
    pod_spec = job_pod["spec"]
    (container,) = pod_spec["containers"]
    # the shared claim, read-write, where the tuner mounts it, as the uid that owns what the tuner writes
    assert {"name": "workspace", "persistentVolumeClaim": {"claimName": "shared-workspace"}} in pod_spec["volumes"]
    mount = mounts_of(container)["workspace"]
    assert mount["mountPath"] == mounts_of(containers(deployments["tuner"])[0])["workspace"]["mountPath"]
    assert not mount.get("readOnly")
    for field in ("runAsUser", "runAsGroup", "fsGroup"):
        assert pod_spec["securityContext"][field] == tuner_pod["securityContext"][field] == k8s.UID, field
    assert container["workingDir"] == str(RUN_DIR)  # the run folder the tuner made under runs/
    owner_script = init_containers(deployments["tuner"])["workspace-owner"]["command"][-1]
    assert "runs" in k8s.WORKSPACE_DIRS and "runs" in owner_script  # the tuner's init container gave runs/ to it
    assert container["resources"]["limits"][k8s.GPU_RESOURCE] == "1"
    assert pod_spec["automountServiceAccountToken"] is False
    # the training NetworkPolicy selects the Job's pods and admits them (every TCP port) from each other only
    policies = objects({k8s.NETWORK_POLICY_FILE: files[k8s.NETWORK_POLICY_FILE]}, "NetworkPolicy")
    labels = job_pod["metadata"]["labels"]
    selecting = [p for p in policies.values() if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
    (training_policy,) = selecting  # no Executor's policy applies to the training pods
    (rule,) = training_policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"].items() <= labels.items()
    assert rule["ports"] == [{"protocol": "TCP"}]  # rendezvous, store, gloo and NCCL's ephemeral ports
    assert service["spec"]["selector"].items() <= labels.items()
    for policy in policies.values():  # egress is never restricted: the tuner reaches the API server, pods the DNS
        assert policy["spec"]["policyTypes"] == ["Ingress"] and "egress" not in policy["spec"], policy["metadata"]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--train-nodes", "2", "--train-procs-per-node", "2", "--train-gpus-per-node", "1"],
            "--train-procs-per-node (2) must not exceed --train-gpus-per-node (1)",
        ),
        (["--train-nodes", "2", "--train-procs-per-node", "0"], "--train-procs-per-node must be an integer >= 1"),
        (["--train-nodes", "-1"], "--train-nodes -1: must be 0"),
        (["--train-gpus-per-node", "1"], "--train-gpus-per-node needs --train-nodes"),
        (["--train-nodes", "2", "--train-memory", "8GB"], "--train-memory must be a memory quantity"),
        (["--train-nodes", "2", "--train-cpu", "0"], "--train-cpu '0': must be a CPU quantity above 0"),
        (["--train-nodes", "2", "--gpus-tuner", "1"], "--gpus-tuner 1 and --train-nodes 2 exclude each other"),
        (
            ["--digest", f"train={DIGEST}"],
            "--digest train=...: pins the training pods' image, which needs --train-nodes",
        ),
        (
            ["--train-nodes", "2", "--train-gpus-per-node", "1", "--digest", f"tuner={DIGEST}"],
            "pin that one too, with --digest train=sha256:...",
        ),
    ],
)
def test_a_bad_training_combination_is_refused_naming_the_options(tmp_path, capsys, args, message):
    out = tmp_path / "refused"
    assert main(["k8s", "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing written


def test_digests_pin_the_training_image(exported):
    gpu = k8s.K8sOptions(
        tag="0.1.0", train_nodes=2, train_gpus_per_node=2, digests={"tuner": DIGEST, "train": "sha256:" + "f" * 64}
    )
    files = k8s.build_manifests(copy(exported), gpu)
    assert train_cluster_of(files)["image"] == "cliptuner-tuner:0.1.0-gpu@sha256:" + "f" * 64
    assert containers(objects(files, "Deployment")["tuner"])[0]["image"] == f"cliptuner-tuner:0.1.0@{DIGEST}"
    cpu = k8s.K8sOptions(tag="0.1.0", train_nodes=2, digests={"tuner": DIGEST})  # the tuner's own image
    files = k8s.build_manifests(copy(exported), cpu)
    assert train_cluster_of(files)["image"] == containers(objects(files, "Deployment")["tuner"])[0]["image"]
    assert train_cluster_of(files)["image"] == f"cliptuner-tuner:0.1.0@{DIGEST}"


def test_without_train_nodes_nothing_of_it_is_rendered(defaults, generated, capsys):
    for out, files in (defaults, generated):
        assert k8s.TRAINING_RBAC_FILE not in files and not (out / k8s.TRAINING_RBAC_FILE).exists()
        kinds = {d["kind"] for docs in files.values() for d in docs}
        assert not kinds & {"ServiceAccount", "Role", "RoleBinding"}
        for deployment in objects(files, "Deployment").values():
            pod = deployment["spec"]["template"]["spec"]
            assert "serviceAccountName" not in pod and "automountServiceAccountToken" not in pod
        assert "train_cluster" not in uses_with(objects(files, "Deployment")["tuner"])
        assert all("training" not in name for name in objects(files, "NetworkPolicy"))
    with pytest.raises(SystemExit):
        main(["k8s", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--train-nodes N" in help_text and k8s.TRAINING_RBAC_FILE in help_text


def test_regenerating_without_train_nodes_removes_the_training_rbac(tmp_path):
    out = tmp_path / "k8s"
    assert main(["k8s", "--out", str(out), "--train-nodes", "1"]) == 0
    assert (out / k8s.TRAINING_RBAC_FILE).is_file()
    assert main(["k8s", "--out", str(out)]) == 0
    assert not (out / k8s.TRAINING_RBAC_FILE).exists()  # kubectl apply -k no longer sees it
    assert k8s.TRAINING_RBAC_FILE not in (out / k8s.KUSTOMIZATION_FILE).read_text()


# --- the gateway: CLIPGateway, API keys, TLS ----------------------------------------------------------------------


def gateway_of(files: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the gateway's pod spec, its container)."""
    deployment = objects(files, "Deployment")["gateway"]
    return deployment["spec"]["template"]["spec"], containers(deployment)[0]


def parse_gateway_args(args: list[str]) -> Any:
    """The rendered args as ``jina gateway`` parses them (an unknown or malformed argument fails here)."""
    from jina.parsers import set_gateway_parser

    assert args[0] == "gateway"
    return set_gateway_parser().parse_args(args[1:])


def test_the_gateway_runs_clipgateway_from_the_project_image(generated, exported):
    _, files = generated
    _, container = gateway_of(files)
    assert container["image"] == "registry.example.com/ml/cliptuner-gateway:0.1.0"
    assert container["command"] == ["jina"]
    parsed = parse_gateway_args(container["args"])
    assert parsed.uses == "CLIPGateway"
    assert parsed.py_modules == ["/app/executors/__init__.py"]
    assert parsed.extra_search_paths == ["/app"]
    assert parsed.ssl_certfile is None and parsed.ssl_keyfile is None  # plaintext unless --tls-secret
    assert parsed.port == [8080]
    # what it replaces: jina's own gateway from jina's image, everything else of jina's args kept
    jina_gateway = containers(next(d for d in exported["gateway"] if d["kind"] == "Deployment"))[0]
    assert jina_gateway["image"] == k8s.DEFAULT_GATEWAY_IMAGE
    original = parse_gateway_args([str(a) for a in jina_gateway["args"]])
    assert original.uses == "GRPCGateway"
    for option in ("deployments_addresses", "graph_description", "timeout_send", "monitoring", "port_monitoring"):
        assert getattr(parsed, option) == getattr(original, option), option


def test_the_gateway_keeps_the_flows_message_limit_and_keepalive(generated):
    from cliptuner.serve.flows import KEEPALIVE_CHANNEL_OPTIONS, KEEPALIVE_SERVER_OPTIONS

    _, files = generated
    _, container = gateway_of(files)
    parsed = parse_gateway_args(container["args"])
    flow = yaml.safe_load((ROOT / "flows" / "flow.yml").read_text())
    limit = flow["with"]["grpc_server_options"]["grpc.max_receive_message_length"]
    # refused before deserialising, as with serve; the Executors' keepalive pings accepted, as with serve
    assert parsed.grpc_server_options["grpc.max_receive_message_length"] == limit
    assert KEEPALIVE_SERVER_OPTIONS.items() <= parsed.grpc_server_options.items()
    assert KEEPALIVE_CHANNEL_OPTIONS.items() <= parsed.grpc_channel_options.items()  # its channels to the Executors
    for name in EXECUTORS:  # every server of the chain accepts the gateway's pings during a long quiet /train
        server_options = json.loads(arg(containers(objects(files, "Deployment")[name])[0], "--grpc-server-options"))
        assert KEEPALIVE_SERVER_OPTIONS.items() <= server_options.items(), name


def test_the_gateway_mounts_the_keys_secret_read_only(generated, exported):
    out, files = generated
    pod, container = gateway_of(files)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["keys"]["secret"]["secretName"] == "cliptuner-keys"
    assert volumes["keys"]["secret"]["items"] == [{"key": "keys.json", "path": "keys.json"}]
    assert volumes["keys"]["secret"]["defaultMode"] == 0o440  # the pod's user and group (fsGroup) only
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["keys"] == {"name": "keys", "mountPath": "/etc/cliptuner/keys", "readOnly": True}
    assert all("subPath" not in m for m in container["volumeMounts"])  # a subPath mount never sees an update
    assert env_of(container)["CLIPTUNER_KEYS_FILE"] == "/etc/cliptuner/keys/keys.json"
    assert "tls" not in volumes and "tls" not in mounts
    header = (out / "gateway.yml").read_text().split("\napiVersion")[0]
    assert "requires API keys" in header and "create secret generic cliptuner-keys --from-file=keys.json" in header

    renamed = k8s.build_manifests(copy(exported), k8s.K8sOptions(keys_secret="api-keys"))
    pod, _ = gateway_of(renamed)
    validate(objects(renamed, "Deployment")["gateway"])
    assert {v["name"]: v for v in pod["volumes"]}["keys"]["secret"]["secretName"] == "api-keys"


def test_the_tls_secret_gives_the_gateway_its_certificate_and_tcp_probes(exported):
    options = k8s.K8sOptions(tls_secret="cliptuner-tls")
    manifests = k8s.build_manifests(copy(exported), options)
    deployments = objects(manifests, "Deployment")
    for deployment in deployments.values():
        validate(deployment)
    pod, container = gateway_of(manifests)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "cliptuner-tls"
    assert {i["key"] for i in volumes["tls"]["secret"]["items"]} == {"tls.crt", "tls.key"}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["tls"] == {"name": "tls", "mountPath": "/etc/cliptuner/tls", "readOnly": True}
    assert "keys" in mounts  # TLS comes on top of the keys
    parsed = parse_gateway_args(container["args"])
    assert (parsed.ssl_certfile, parsed.ssl_keyfile) == ("/etc/cliptuner/tls/tls.crt", "/etc/cliptuner/tls/tls.key")
    assert parsed.uses == "CLIPGateway"
    grpc_port = int(container["args"][container["args"].index("--port") + 1])
    for kind in PROBES:  # the kubelet's grpc probe speaks no TLS
        assert set(container[kind]) & {"grpc", "exec", "httpGet", "tcpSocket"} == {"tcpSocket"}, kind
        assert container[kind]["tcpSocket"]["port"] == grpc_port
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 1200
    for name in EXECUTORS:  # the Executors keep their plaintext gRPC probes
        assert all("grpc" in containers(deployments[name])[0][kind] for kind in PROBES), name
    header = k8s._header("gateway.yml", options)
    assert "cliptuner-tls" in header and "tcpSocket" in header


def test_insecure_no_auth_renders_an_open_gateway_without_the_secret(tmp_path):
    out = tmp_path / "open"
    assert main(["k8s", "--out", str(out), "--insecure-no-auth"]) == 0
    files = load(out)
    for deployment in objects(files, "Deployment").values():
        validate(deployment)
    pod, container = gateway_of(files)
    assert [v["name"] for v in pod["volumes"]] == ["workspace"]
    assert [m["name"] for m in container["volumeMounts"]] == ["workspace"]
    assert not any("secret" in v for docs in files.values() for d in docs for v in _volumes(d))
    assert env_of(container)["CLIPTUNER_KEYS_FILE"] == ""  # the image names a keys file by default: none here
    assert parse_gateway_args(container["args"]).uses == "CLIPGateway"  # still audited and guarded by role
    header = (out / "gateway.yml").read_text().split("\napiVersion")[0]
    assert "WITHOUT API keys" in header


def _volumes(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc.get("kind") != "Deployment":
        return []
    return doc["spec"]["template"]["spec"].get("volumes", [])


def test_keys_secret_and_insecure_no_auth_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["k8s", "--out", str(tmp_path / "a"), "--keys-secret", "mine", "--insecure-no-auth"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--keys-secret 'mine' and --insecure-no-auth exclude each other"):
        k8s.K8sOptions(keys_secret="mine", insecure_no_auth=True)
    assert k8s.K8sOptions(insecure_no_auth=True).gateway_keys_secret is None


def test_the_rendered_gateway_args_load_clipgateway(generated, tmp_path):
    """`jina gateway` with the rendered args (paths of /app moved to this tree, on 127.0.0.1, no Executors
    reachable) loads CLIPGateway from executors/__init__.py: it reads the keys file and the workspace at start."""
    _, files = generated
    _, container = gateway_of(files)
    args = [a.replace(k8s.APP, str(ROOT)) for a in container["args"][1:]]
    for flag in ("--monitoring",):  # jina's metrics server binds every interface: left out here
        args.remove(flag)
    for flag in ("--port-monitoring", "--k8s-namespace"):
        del args[args.index(flag) : args.index(flag) + 2]
    addresses = json.loads(args[args.index("--deployments-addresses") + 1])
    args[args.index("--deployments-addresses") + 1] = json.dumps({name: ["grpc://127.0.0.1:1"] for name in addresses})
    args[args.index("--port") + 1] = str(_free_port())
    command = [sys.executable, "-m", "jina", "gateway", *args, "--host", "127.0.0.1"]
    env = {**os.environ, "JINA_HIDE_SURVEY": "1", "JINA_OPTOUT_TELEMETRY": "1", "PYTHONPATH": str(ROOT)}

    missing = tmp_path / "no-secret" / "keys.json"
    failed = subprocess.run(
        command,
        env={**env, "CLIPTUNER_KEYS_FILE": str(missing), "CLIPTUNER_WORKSPACE": str(tmp_path / "ws1")},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert failed.returncode != 0
    assert f"keys file {str(missing)!r} is missing" in failed.stdout + failed.stderr

    keys = tmp_path / "keys.json"
    assert main(["keys", "create", "--role", "admin", "--name", "ci", "--keys-file", str(keys)]) == 0
    workspace = tmp_path / "ws2"
    proc = subprocess.Popen(
        command,
        env={**env, "CLIPTUNER_KEYS_FILE": str(keys), "CLIPTUNER_WORKSPACE": str(workspace)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not (workspace / "audit").is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (workspace / "audit").is_dir()  # CLIPGateway opened its audit log in the workspace
        assert proc.poll() is None  # and keeps running, waiting for its Executors
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
