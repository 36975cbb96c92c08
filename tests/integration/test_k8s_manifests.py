"""`cliptuner k8s --out DIR` writes manifests that are valid Kubernetes objects and deploy as generated.

Every object is checked offline against the API models of the `kubernetes` Python client: deserialised into its
model class (required fields missing fail there) and walked strictly against the model's fields (the client
drops unknown keys silently, so a misspelled key would otherwise pass).
"""

from __future__ import annotations

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

import pytest
import yaml

from cliptuner.cli import main
from cliptuner.serve import k8s

kubernetes = pytest.importorskip(
    "kubernetes", reason="the offline validation needs the kubernetes client (pip install -e '.[dev]')"
)
from kubernetes.client import ApiClient, models  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXECUTORS = ("tuner", "encoder", "indexer")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
ENCODER_REPLICAS = 3
PRIMITIVES: dict[str, Any] = {
    "str": str,
    "int": int,
    "bool": bool,
    "float": (int, float),
    "object": object,
    "datetime": str,
    "date": str,
}


# --- the offline validator ---------------------------------------------------------------------------------------


def model_name(doc: dict[str, Any]) -> str:
    """The client's model class of an object: ``apps/v1`` + ``Deployment`` -> ``V1Deployment``."""
    version = str(doc["apiVersion"]).rsplit("/", 1)[-1]
    return version[0].upper() + version[1:] + doc["kind"]


def strict_errors(value: Any, type_name: str, path: str = "") -> list[str]:
    """Every key of ``value`` that the model ``type_name`` does not define, and every value of the wrong type.

    Args:
        value: a dict, list or scalar of a manifest.
        type_name: its type as the client's ``openapi_types`` write it (``V1PodSpec``, ``list[V1Container]``,
            ``dict[str, str]`` or ``dict(str, str)``, ``int``, ...).
        path: where ``value`` is, for the messages.

    Returns:
        One message per problem (empty: the value fits the model).
    """
    if value is None:
        return []
    if type_name.startswith("list["):
        if not isinstance(value, list):
            return [f"{path}: expected a list ({type_name}), got {type(value).__name__}"]
        return [e for i, item in enumerate(value) for e in strict_errors(item, type_name[5:-1], f"{path}[{i}]")]
    match = re.fullmatch(r"dict[\[(]\s*str\s*,\s*(.+)[\])]", type_name)
    if match:
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping ({type_name}), got {type(value).__name__}"]
        return [e for key, item in value.items() for e in strict_errors(item, match.group(1), f"{path}.{key}")]
    if type_name in PRIMITIVES:
        expected = PRIMITIVES[type_name]
        if type_name in ("int", "float") and isinstance(value, bool) or not isinstance(value, expected):
            return [f"{path}: expected {type_name}, got {type(value).__name__} {value!r}"]
        return []
    cls = getattr(models, type_name, None)
    if cls is None:
        return [f"{path}: no model {type_name} in the kubernetes client"]
    if not isinstance(value, dict):
        return [f"{path}: expected an object ({type_name}), got {type(value).__name__}"]
    fields = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    errors = []
    for key, item in value.items():
        if key not in fields:
            errors.append(f"{path}.{key}: unknown field of {type_name}")
        else:
            errors.extend(strict_errors(item, cls.openapi_types[fields[key]], f"{path}.{key}"))
    return errors


class _Response:
    """What ``ApiClient.deserialize`` reads: a response whose ``data`` is the JSON body."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.data = json.dumps(doc)


def validate(doc: dict[str, Any]) -> Any:
    """Deserialise ``doc`` into its model (raises on a missing required field) and walk it strictly.

    Returns:
        The model object.

    Raises:
        AssertionError: an unknown kind, key or a mistyped value.
        ValueError: a required field is missing (the client's own validation).
    """
    name = model_name(doc)
    assert hasattr(models, name), f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}: no model {name}"
    errors = strict_errors(doc, name, f"{doc['kind']}/{doc.get('metadata', {}).get('name')}")
    assert not errors, "\n".join(errors)
    return ApiClient().deserialize(_Response(doc), name)


# --- one generation per module ------------------------------------------------------------------------------------


def load(out: Path) -> dict[str, list[dict[str, Any]]]:
    """file name -> its objects, for every file of the kustomization in ``out``."""
    kustomization = yaml.safe_load((out / k8s.KUSTOMIZATION_FILE).read_text())
    return {name: [d for d in yaml.safe_load_all((out / name).read_text()) if d] for name in kustomization["resources"]}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[dict[str, Any]]]]:
    """``cliptuner k8s`` with a few non-default options, run once; (DIR, its objects per file)."""
    out = tmp_path_factory.mktemp("k8s") / "manifests"
    assert (
        main(
            [
                "k8s",
                "--out",
                str(out),
                "--encoder-replicas",
                str(ENCODER_REPLICAS),
                "--gpus-encoder",
                "1",
                "--storage-class",
                "nfs-client",
                "--image-prefix",
                "registry.example.com/ml/cliptuner-",
                "--tag",
                "0.1.0",
            ]
        )
        == 0
    )
    return out, load(out)


@pytest.fixture(scope="module")
def exported() -> dict[str, list[dict[str, Any]]]:
    """jina's own export of flows/k8s.yml (what the options are applied to), run once."""
    return k8s.export_flow(k8s.default_flow(), "cliptuner")


def objects(files: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, dict[str, Any]]:
    """name -> object, for every object of ``kind``."""
    return {d["metadata"]["name"]: d for docs in files.values() for d in docs if d["kind"] == kind}


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers of a Deployment's pod template."""
    return deployment["spec"]["template"]["spec"]["containers"]


def declared_ports(container: dict[str, Any]) -> set[int]:
    """The container ports a container declares (what a probe, a Service or a scrape may target)."""
    return {int(p["containerPort"]) for p in container.get("ports", [])}


# --- tests --------------------------------------------------------------------------------------------------------


def test_every_object_is_a_valid_kubernetes_object(generated):
    out, files = generated
    assert sorted(files) == sorted(
        [k8s.NAMESPACE_FILE, k8s.PVC_FILE, "tuner.yml", "encoder.yml", "indexer.yml", "gateway.yml"]
    )
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, k8s.KUSTOMIZATION_FILE])
    kinds = []
    for docs in files.values():
        for doc in docs:
            validate(doc)
            assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "cliptuner"
            kinds.append(doc["kind"])
    assert sorted(set(kinds)) == ["ConfigMap", "Deployment", "Namespace", "PersistentVolumeClaim", "Service"]


def test_the_validator_rejects_a_misspelled_key_a_wrong_type_and_a_missing_field(generated):
    _, files = generated
    deployment = objects(files, "Deployment")["encoder"]
    typo = json.loads(json.dumps(deployment))
    probe = containers(typo)[0].pop("readinessProbe")
    containers(typo)[0]["readinesProbe"] = probe
    with pytest.raises(AssertionError, match=r"readinesProbe: unknown field of V1Container"):
        validate(typo)
    nested = json.loads(json.dumps(deployment))
    nested["spec"]["template"]["spec"]["securityContext"]["fsgroup"] = 10001
    with pytest.raises(AssertionError, match=r"fsgroup: unknown field of V1PodSecurityContext"):
        validate(nested)
    mistyped = json.loads(json.dumps(deployment))
    mistyped["spec"]["replicas"] = "two"
    with pytest.raises(AssertionError, match=r"spec.replicas: expected int"):
        validate(mistyped)
    nameless = json.loads(json.dumps(deployment))
    del containers(nameless)[0]["name"]
    with pytest.raises(ValueError, match="name"):
        validate(nameless)
    with pytest.raises(AssertionError, match="no model"):
        validate({"apiVersion": "v1", "kind": "Deploymnet", "metadata": {"name": "x"}})


def test_encoder_replicas_follow_the_option_and_the_singletons_stay_single(generated):
    _, files = generated
    deployments = objects(files, "Deployment")
    assert sorted(deployments) == sorted([*EXECUTORS, "gateway"])
    assert deployments["encoder"]["spec"]["replicas"] == ENCODER_REPLICAS
    args = containers(deployments["encoder"])[0]["args"]
    assert args[args.index("--replicas") + 1] == str(ENCODER_REPLICAS)
    for name in ("tuner", "indexer"):  # one writer each on the shared volume, also during an update
        assert deployments[name]["spec"]["replicas"] == 1
        assert deployments[name]["spec"]["strategy"] == {"type": "Recreate"}


def test_every_executor_pod_mounts_the_shared_claim_as_the_image_user(generated):
    _, files = generated
    claims = objects(files, "PersistentVolumeClaim")
    assert list(claims) == ["cliptuner-workspace"]
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
        mounts = [(m["name"], m["mountPath"]) for c in containers(deployment) for m in c.get("volumeMounts", [])]
        assert volumes["workspace"]["persistentVolumeClaim"]["claimName"] == "cliptuner-workspace"
        if name == "gateway":  # its audit log goes to /workspace/audit; its keys are checked below
            assert mounts == [("workspace", "/workspace"), ("keys", k8s.KEYS_DIR)]
            assert {"name": "CLIPTUNER_WORKSPACE", "value": "/workspace"} in containers(deployment)[0]["env"]
            continue
        assert mounts == [("workspace", "/workspace")]
        container = containers(deployment)[0]
        assert container["image"] == f"registry.example.com/ml/cliptuner-{name}:0.1.0"
        assert container["args"][container["args"].index("--workspace") + 1] == "/workspace"


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


def test_resources_and_gpu_limits_only_where_asked(generated, exported):
    _, files = generated
    for name, deployment in objects(files, "Deployment").items():
        resources = containers(deployment)[0]["resources"]
        cpu, memory = k8s.DEFAULT_RESOURCES[name]
        assert resources["requests"] == {"cpu": cpu, "memory": memory}
        assert resources["limits"]["memory"] == memory
        assert (k8s.GPU_RESOURCE in resources["limits"]) == (name == "encoder"), name
    assert containers(objects(files, "Deployment")["encoder"])[0]["resources"]["limits"][k8s.GPU_RESOURCE] == "1"

    defaults = k8s.build_manifests(json.loads(json.dumps(exported)), k8s.K8sOptions())
    assert "storageClassName" not in defaults[k8s.PVC_FILE][0]["spec"]
    for name, deployment in objects(defaults, "Deployment").items():
        validate(deployment)
        assert k8s.GPU_RESOURCE not in containers(deployment)[0]["resources"]["limits"], name
        if name == "encoder":
            assert deployment["spec"]["replicas"] == 2
        if name in EXECUTORS:
            assert containers(deployment)[0]["image"] == f"cliptuner-{name}:latest"

    both = k8s.K8sOptions(gpus_tuner=2, gpus_encoder=1, resources={"tuner": ("4", "16Gi")})
    deployments = objects(k8s.build_manifests(json.loads(json.dumps(exported)), both), "Deployment")
    limits = {name: containers(d)[0]["resources"]["limits"] for name, d in deployments.items()}
    assert limits["tuner"] == {"memory": "16Gi", k8s.GPU_RESOURCE: "2"}
    assert limits["encoder"][k8s.GPU_RESOURCE] == "1"
    assert k8s.GPU_RESOURCE not in limits["indexer"] and k8s.GPU_RESOURCE not in limits["gateway"]


def test_service_monitors_only_when_asked(generated, exported):
    _, files = generated
    assert not objects(files, "ServiceMonitor")  # jina writes them; they need the Prometheus Operator's CRDs
    manifests = k8s.build_manifests(json.loads(json.dumps(exported)), k8s.K8sOptions(service_monitor=True))
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
    uses_with = json.loads(default["args"][default["args"].index("--uses-with") + 1])
    assert "backend" not in uses_with and "milvus_uri" not in uses_with  # the embedded store by default
    assert all(e["name"] != "CLIPTUNER_MILVUS_TOKEN" for e in default.get("env", []))

    options = k8s.K8sOptions(milvus_uri="http://milvus.milvus.svc:19530", milvus_token_secret="milvus-token")
    options.validate()
    deployments = objects(k8s.build_manifests(json.loads(json.dumps(exported)), options), "Deployment")
    indexer = containers(deployments["indexer"])[0]
    validate(deployments["indexer"])
    uses_with = json.loads(indexer["args"][indexer["args"].index("--uses-with") + 1])
    assert uses_with["backend"] == "milvus" and uses_with["milvus_uri"] == "http://milvus.milvus.svc:19530"
    assert uses_with["bootstrap"] is False and uses_with["trust_client_vectors"] is True  # the rest is kept
    assert {
        "name": "CLIPTUNER_MILVUS_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "milvus-token", "key": "token"}},
    } in indexer["env"]
    for name in ("tuner", "encoder"):  # only the indexer talks to the vector store
        args = containers(deployments[name])[0]["args"]
        assert "milvus" not in args[args.index("--uses-with") + 1]


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
    ],
)
def test_a_bad_option_is_refused_by_name(option, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        k8s.K8sOptions(**{option: value}).validate()


def test_the_command_refuses_bad_input_with_one_line(tmp_path, capsys):
    assert main(["k8s", "--out", str(tmp_path / "a"), "--encoder-replicas", "0"]) == 2
    assert "cliptuner k8s: error: --encoder-replicas 0" in capsys.readouterr().err
    assert main(["k8s", "--out", str(tmp_path / "b"), "--flow", str(tmp_path / "missing.yml")]) == 2
    assert "--flow" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.yml").write_text("kind: Secret\n")
    with pytest.raises(ValueError, match="--out .*mine.yml"):
        k8s.write_manifests(tmp_path / "c", {"x.yml": []}, k8s.K8sOptions())


def test_kubectl_kustomize_renders_every_object(generated):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH: `kubectl kustomize DIR` cannot be checked here")
    out, files = generated
    result = subprocess.run(["kubectl", "kustomize", str(out)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = {
        (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])
        for d in yaml.safe_load_all(result.stdout)
        if d
    }
    expected = {
        (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for docs in files.values() for d in docs
    }
    assert rendered == expected


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


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


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


def test_the_gateway_keeps_the_flows_message_limit(generated):
    _, files = generated
    _, container = gateway_of(files)
    options = parse_gateway_args(container["args"]).grpc_server_options
    flow = yaml.safe_load((ROOT / "flows" / "flow.yml").read_text())
    limit = flow["with"]["grpc_server_options"]["grpc.max_receive_message_length"]
    assert options == {"grpc.max_receive_message_length": limit}  # refused before deserialising, as with serve


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

    renamed = k8s.build_manifests(json.loads(json.dumps(exported)), k8s.K8sOptions(keys_secret="api-keys"))
    pod, _ = gateway_of(renamed)
    validate(objects(renamed, "Deployment")["gateway"])
    assert {v["name"]: v for v in pod["volumes"]}["keys"]["secret"]["secretName"] == "api-keys"


def test_the_tls_secret_gives_the_gateway_its_certificate_and_tcp_probes(exported):
    options = k8s.K8sOptions(tls_secret="cliptuner-tls")
    manifests = k8s.build_manifests(json.loads(json.dumps(exported)), options)
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
