"""Kubernetes manifests for cliptuner that deploy as written: ``cliptuner k8s --out DIR``.

``jina export kubernetes flows/k8s.yml`` writes a ConfigMap, a Service and a Deployment per Executor (tuner,
encoder, indexer) and for the gRPC gateway. On their own those do not run cliptuner on a cluster: the Executors
need one shared volume for the model registry, the image's non-root user must be able to write it, the gateway
is jina's plain one (the export refuses a ``gateway: uses:`` that is not a container image, so the Flow cannot
name ``CLIPGateway`` there), and jina's own liveness probe is a ``jina ping`` process (a full Python start every
5 s, whose ``"--timeout 9500"`` reaches ``jina ping`` as one unknown argument and is ignored). This module runs
that export into a temporary folder and completes its objects (loaded as dicts, changed, written back) into DIR:

* ``namespace.yml``: the Namespace (``--namespace``, default ``cliptuner``; also passed to jina as
  ``--k8s-namespace``, which writes it into every object and into the gateway's Executor addresses).
* ``workspace-pvc.yml``: one ReadWriteMany PersistentVolumeClaim (``--storage``, ``--storage-class``), mounted
  at ``/workspace`` in every pod: the tuner publishes model versions there, every encoder replica follows
  ``models/CURRENT``, the indexer keeps its collection under ``/workspace/index``, and the gateway appends its
  audit log to ``/workspace/audit`` (``CLIPTUNER_WORKSPACE=/workspace``). A ReadWriteMany claim needs a storage
  class that offers it (NFS, CephFS, EFS, Azure Files, Filestore, ...).
* ``<service>.yml`` per jina deployment (``tuner.yml``, ``encoder.yml``, ``indexer.yml``, ``gateway.yml``): jina's
  ConfigMap, Service and Deployment, with

  - the pod ``securityContext`` of the image's user: ``runAsUser``/``runAsGroup``/``fsGroup`` 10001,
    ``runAsNonRoot``, the runtime's default seccomp profile, and containers without privilege escalation or
    capabilities (the gateway's too);
  - the gateway: the project's image ``<--image-prefix>gateway:<--tag>`` (built from the Dockerfile with
    ``--build-arg TRAIN=0``) in place of jina's, with ``--uses CLIPGateway --py-modules
    /app/executors/__init__.py --extra-search-paths /app`` (``/app`` is the image's code), so API keys, roles
    and the audit log guard the cluster's entry point (executors/gateway.py). The Secret ``--keys-secret``
    (default ``cliptuner-keys``, its key ``keys.json``) is mounted read-only at ``/etc/cliptuner/keys`` and
    named by ``CLIPTUNER_KEYS_FILE``; the kubelet updates a mounted Secret in place (a symlink swap), and the
    gateway's key ring re-reads the file when its identity changes, so a rotated or revoked key takes effect
    within the kubelet's sync period, without a restart. ``--insecure-no-auth`` leaves the Secret out and sets
    ``CLIPTUNER_KEYS_FILE`` empty (the image names a file by default): that gateway is open to every caller.
    ``--tls-secret`` mounts a ``kubernetes.io/tls`` Secret read-only at ``/etc/cliptuner/tls`` and passes its
    ``tls.crt``/``tls.key`` as ``--ssl-certfile``/``--ssl-keyfile``;
  - startup, readiness and liveness probes of the kind ``grpc`` (Kubernetes >= 1.24) on the container's gRPC
    port: every jina server registers the standard ``grpc.health.v1.Health`` service (the gateway's guard lets
    it through without a key), whose overall status (service ``""``) is SERVING from the moment the port is
    bound, which is after the Executor has loaded; the startup probe keeps the failure budget jina derived from
    ``timeout_ready`` (the gateway gets the largest one, since it binds its port only once it has reached the
    Executors). The kubelet's ``grpc`` probe speaks plaintext only, so a gateway with ``--tls-secret`` gets
    ``tcpSocket`` probes on the same port instead (the port accepts connections once the gateway has started);
  - resources: cpu and memory requests (memory also as the limit) per service, and ``nvidia.com/gpu`` limits on
    the tuner and the encoder when asked (``--gpus-tuner``, ``--gpus-encoder``; build those images with
    ``--build-arg ORT=onnxruntime-gpu``);
  - replicas: ``--encoder-replicas`` encoders (default 2); the tuner and the indexer stay at one replica and are
    replaced with the ``Recreate`` strategy, so that two of them never write the shared volume at once (the
    indexer's collection is one on-disk index; one tuner publishes versions);
  - Prometheus: Jina's monitoring (``monitoring: true``, ``port_monitoring: 9090`` in flows/k8s.yml) starts a
    ``prometheus_client`` server in every pod, which answers on any path; jina adds a ``monitoring`` port to each
    Service, and this module declares that container port and annotates every pod with ``prometheus.io/scrape``,
    ``prometheus.io/port`` and ``prometheus.io/path``;
  - the Executor images ``<--image-prefix><name>:<--tag>`` (default ``cliptuner-tuner:latest`` ...), built from
    the Dockerfile with ``--build-arg EXECUTOR=...``.
* ``servicemonitors.yml`` only with ``--service-monitor``: the Prometheus Operator ServiceMonitors jina writes
  for monitored services; left out by default because applying them fails on a cluster without that operator's
  CRDs, while the pod annotations need nothing.
* ``kustomization.yaml`` listing every file: ``kubectl apply -k DIR`` applies the whole set, ``kubectl
  kustomize DIR`` renders it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import field
from pathlib import Path
from typing import Any, Optional

import yaml

from cliptuner.options import config_dataclass

DEFAULT_GATEWAY_IMAGE = "jinaai/jina:3.34.0-py311-standard"  # what the export writes; replaced by the project's
FLOW_YAML = Path("flows") / "k8s.yml"
UID = 10001  # the Dockerfile's user `cliptuner`, which owns /workspace in the image
WORKSPACE = "/workspace"
WORKSPACE_VOLUME = "workspace"
METRICS_PATH = "/metrics"  # prometheus_client's server answers every path; /metrics is Prometheus' default
DEFAULT_METRICS_PORT = 9090  # jina's port_monitoring in Kubernetes
SINGLETONS = ("tuner", "indexer")  # one writer each on the shared volume: one replica, Recreate on update
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_RESOURCES = {  # service: (cpu request, memory request and limit)
    "tuner": ("2", "8Gi"),
    "encoder": ("1", "2Gi"),
    "indexer": ("500m", "2Gi"),
    "gateway": ("250m", "512Mi"),
}
OTHER_RESOURCES = ("500m", "1Gi")  # an Executor of a custom --flow that is none of the above
APP = "/app"  # the Dockerfile's WORKDIR: cliptuner's code, executors/ among it
GATEWAY_CLASS = "CLIPGateway"  # executors/gateway.py
GATEWAY_MODULES = f"{APP}/executors/__init__.py"
DEFAULT_KEYS_SECRET = "cliptuner-keys"
KEYS_SECRET_KEY = "keys.json"  # the Secret's key: `kubectl create secret generic NAME --from-file=keys.json`
KEYS_DIR = "/etc/cliptuner/keys"
KEYS_FILE = f"{KEYS_DIR}/{KEYS_SECRET_KEY}"  # also the image's CLIPTUNER_KEYS_FILE
KEYS_VOLUME = "keys"
TLS_DIR = "/etc/cliptuner/tls"
TLS_VOLUME = "tls"
TLS_CERT, TLS_KEY = "tls.crt", "tls.key"  # the keys of a kubernetes.io/tls Secret
SECRET_MODE = 0o440  # the mounted files: readable by the pod's user and group (fsGroup) only
NAMESPACE_FILE = "namespace.yml"
PVC_FILE = "workspace-pvc.yml"
SERVICE_MONITOR_FILE = "servicemonitors.yml"
KUSTOMIZATION_FILE = "kustomization.yaml"

_CPU = re.compile(r"^([0-9]+m|[0-9]+(\.[0-9]+)?)$")
_MEMORY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_PREFIX = re.compile(r"^([a-z0-9][a-z0-9._/:-]*)?$")


@config_dataclass
class K8sOptions:
    """What ``cliptuner k8s`` generates; every field is one command-line option of the same name.

    A strict pydantic dataclass (:func:`cliptuner.options.config_dataclass`): a value of the wrong type or an
    unknown option is refused when it is built, and so is a bad value (:meth:`validate`), naming the option.

    Attributes:
        flow: the Flow YAML to export (default: flows/k8s.yml of the source tree, else of the current directory).
        namespace: the Kubernetes namespace of every object.
        image_prefix: images are ``<image_prefix><executor name or gateway>:<tag>``.
        tag: the images' tag.
        encoder_replicas: pods of the encoder Deployment.
        storage: size of the shared workspace claim.
        storage_class: its storage class (None: the cluster's default class).
        pvc_name: name of the shared workspace claim.
        gpus_tuner: ``nvidia.com/gpu`` limit of the tuner pod (0: none).
        gpus_encoder: ``nvidia.com/gpu`` limit of each encoder pod (0: none).
        resources: service name -> (cpu request, memory request and limit); missing names take the defaults.
        service_monitor: also write jina's Prometheus Operator ServiceMonitors.
        milvus_uri: the indexer keeps its vectors in this Milvus server or cluster (``backend: milvus``); None:
            the embedded store on the shared volume.
        milvus_token_secret: a Secret whose key ``token`` holds the Milvus token (``user:password``), given to
            the indexer as ``CLIPTUNER_MILVUS_TOKEN``; None: no token.
        keys_secret: the Secret whose key ``keys.json`` is the gateway's API keys file.
        insecure_no_auth: no keys Secret: the gateway serves every caller as admin (``keys_secret`` must be
            left at its default or None).
        tls_secret: a ``kubernetes.io/tls`` Secret (``tls.crt``, ``tls.key``): the gateway serves TLS; None:
            plaintext gRPC.
    """

    flow: Optional[Path] = None
    namespace: str = "cliptuner"
    image_prefix: str = "cliptuner-"
    tag: str = "latest"
    encoder_replicas: int = 2
    storage: str = "20Gi"
    storage_class: Optional[str] = None
    pvc_name: str = "cliptuner-workspace"
    gpus_tuner: int = 0
    gpus_encoder: int = 0
    resources: dict[str, tuple[str, str]] = field(default_factory=dict)
    service_monitor: bool = False
    milvus_uri: Optional[str] = None
    milvus_token_secret: Optional[str] = None
    keys_secret: Optional[str] = DEFAULT_KEYS_SECRET
    insecure_no_auth: bool = False
    tls_secret: Optional[str] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every option before anything is exported.

        Raises:
            ValueError: naming the first bad option and what it accepts.
        """
        if not _DNS_LABEL.match(self.namespace):
            raise ValueError(
                f"--namespace {self.namespace!r}: must be a DNS label (lowercase letters, digits and "
                "'-', at most 63 characters)"
            )
        if not _DNS_SUBDOMAIN.match(self.pvc_name):
            raise ValueError(
                f"--pvc-name {self.pvc_name!r}: must be a DNS subdomain (lowercase letters, digits, '-' and '.')"
            )
        if self.storage_class is not None and not _DNS_SUBDOMAIN.match(self.storage_class):
            raise ValueError(
                f"--storage-class {self.storage_class!r}: must be a DNS subdomain (lowercase letters, "
                "digits, '-' and '.')"
            )
        if not _PREFIX.match(self.image_prefix):
            raise ValueError(
                f"--image-prefix {self.image_prefix!r}: must be a lowercase image reference prefix, "
                "e.g. 'registry.example.com/team/cliptuner-'"
            )
        if not _TAG.match(self.tag):
            raise ValueError(
                f"--tag {self.tag!r}: must be an image tag (letters, digits, '_', '.' and '-', at most "
                "128 characters, not starting with '.' or '-')"
            )
        if self.milvus_uri is not None and not re.match(r"^(https?|tcp|grpc)://[^\s/]+(:\d+)?/?$", self.milvus_uri):
            raise ValueError(
                f"--milvus-uri {self.milvus_uri!r}: must be a server address like http://milvus.milvus.svc:19530"
            )
        if self.milvus_token_secret is not None and self.milvus_uri is None:
            raise ValueError("--milvus-token-secret needs --milvus-uri")
        if self.milvus_token_secret is not None and not _DNS_SUBDOMAIN.match(self.milvus_token_secret):
            raise ValueError(
                f"--milvus-token-secret {self.milvus_token_secret!r}: must be a Secret name (a DNS subdomain)"
            )
        if self.insecure_no_auth and self.keys_secret not in (None, DEFAULT_KEYS_SECRET):
            raise ValueError(f"--keys-secret {self.keys_secret!r} and --insecure-no-auth exclude each other")
        if self.keys_secret is None and not self.insecure_no_auth:
            raise ValueError("--keys-secret: the gateway needs a Secret of API keys, or --insecure-no-auth")
        for option, secret in (("--keys-secret", self.keys_secret), ("--tls-secret", self.tls_secret)):
            if secret is not None and not _DNS_SUBDOMAIN.match(secret):
                raise ValueError(f"{option} {secret!r}: must be a Secret name (a DNS subdomain)")
        if self.encoder_replicas < 1:
            raise ValueError(f"--encoder-replicas {self.encoder_replicas}: must be at least 1")
        for option, gpus in (("--gpus-tuner", self.gpus_tuner), ("--gpus-encoder", self.gpus_encoder)):
            if gpus < 0:
                raise ValueError(f"{option} {gpus}: must be 0 (no GPU) or more")
        if not _MEMORY.match(self.storage):
            raise ValueError(f"--storage {self.storage!r}: must be a Kubernetes quantity, e.g. 20Gi")
        for name, (cpu, memory) in self.resources.items():
            if not _CPU.match(cpu):
                raise ValueError(f"--{name}-cpu {cpu!r}: must be a CPU quantity, e.g. 2, 1.5 or 500m")
            if not _MEMORY.match(memory):
                raise ValueError(f"--{name}-memory {memory!r}: must be a memory quantity, e.g. 512Mi or 8Gi")

    @property
    def gateway_keys_secret(self) -> Optional[str]:
        """The Secret the gateway mounts as its keys file; None with ``insecure_no_auth``."""
        return None if self.insecure_no_auth else self.keys_secret

    def resources_of(self, name: str) -> tuple[str, str]:
        """The (cpu, memory) of service ``name``: its option, else its default, else :data:`OTHER_RESOURCES`."""
        return self.resources.get(name) or DEFAULT_RESOURCES.get(name, OTHER_RESOURCES)


def default_flow() -> Path:
    """``flows/k8s.yml`` of the source tree this package runs from, else of the current directory."""
    beside = Path(__file__).resolve().parents[2] / FLOW_YAML
    return beside if beside.is_file() else FLOW_YAML.resolve()


def export_flow(flow: Path, namespace: str, timeout: float = 300) -> dict[str, list[dict[str, Any]]]:
    """Run ``jina export kubernetes`` on ``flow`` into a temporary folder and load what it wrote.

    Args:
        flow: the Flow YAML.
        namespace: passed as ``--k8s-namespace``.
        timeout: seconds the export may take.

    Returns:
        Jina deployment name (the export's sub-folder: ``gateway``, ``tuner``, ...) -> its objects, in the
        order of its files.

    Raises:
        ValueError: when the Flow file is missing or the export fails (with the end of jina's output).
    """
    if not flow.is_file():
        raise ValueError(f"--flow {str(flow)!r}: no such file")
    env = {**os.environ, "JINA_HIDE_SURVEY": "1", "JINA_OPTOUT_TELEMETRY": "1"}
    env.setdefault("JINA_GATEWAY_IMAGE", DEFAULT_GATEWAY_IMAGE)
    with tempfile.TemporaryDirectory(prefix="cliptuner-k8s-") as tmp:
        out = Path(tmp) / "export"
        cmd = [sys.executable, "-m", "jina", "export", "kubernetes", str(flow), str(out), "--k8s-namespace", namespace]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as exc:
            raise ValueError(f"--flow {str(flow)!r}: jina export kubernetes took longer than {timeout:.0f} s") from exc
        if result.returncode != 0 or not out.is_dir():
            tail = (result.stderr or result.stdout)[-2000:].strip()
            raise ValueError(f"--flow {str(flow)!r}: jina export kubernetes failed (exit {result.returncode}):\n{tail}")
        exported: dict[str, list[dict[str, Any]]] = {}
        for folder in sorted(p for p in out.iterdir() if p.is_dir()):
            for path in sorted(folder.glob("*.yml")):
                docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
                exported.setdefault(folder.name, []).extend(docs)
    if "gateway" not in exported:
        raise ValueError(f"--flow {str(flow)!r}: jina export kubernetes wrote no gateway")
    return exported


def _arg(args: list[str], flag: str) -> Optional[str]:
    """The value after ``flag`` in a container's args, or None."""
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None


def _set_arg(args: list[str], flag: str, value: str) -> None:
    """Set the value after ``flag`` in a container's args, if the flag is there."""
    if flag in args and args.index(flag) + 1 < len(args):
        args[args.index(flag) + 1] = value


def _put_arg(args: list[str], flag: str, *values: str) -> None:
    """Set the value(s) after ``flag`` in a container's args: replaced where the flag is, else appended."""
    if flag in args:
        at = args.index(flag) + 1
        end = at
        while end < len(args) and not args[end].startswith("--"):
            end += 1
        args[at:end] = values
    else:
        args.extend([flag, *values])


def _probe(port: int, period: int, timeout: int, failures: int, delay: int = 0, tls: bool = False) -> dict[str, Any]:
    """A Kubernetes probe on ``port``: ``grpc`` (the standard health service's overall status), or, for a server
    that speaks TLS, ``tcpSocket`` (the kubelet's ``grpc`` probe has no TLS and would fail every handshake)."""
    probe: dict[str, Any] = {
        "tcpSocket" if tls else "grpc": {"port": port},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }
    if delay:
        probe["initialDelaySeconds"] = delay
    return probe


def _pod_type(deployment: dict[str, Any]) -> str:
    """jina's ``pod_type`` label of a Deployment's pods: GATEWAY, WORKER or HEAD."""
    return str(deployment["spec"]["template"]["metadata"].get("labels", {}).get("pod_type", "WORKER"))


def _complete_deployment(deployment: dict[str, Any], options: K8sOptions, startup_failures: int) -> None:
    """Complete one jina Deployment in place: image, replicas, volume, security, probes, resources, metrics.

    Args:
        deployment: the Deployment object, as loaded from jina's YAML.
        options: what to generate.
        startup_failures: the startup probe's failure budget (periods of 5 s).
    """
    spec = deployment["spec"]
    pod = spec["template"]
    pod_spec = pod["spec"]
    labels = pod["metadata"].get("labels", {})
    name = str(labels.get("jina_deployment_name") or deployment["metadata"]["name"])
    pod_type = _pod_type(deployment)
    is_executor = pod_type == "WORKER"

    if name == "encoder" and is_executor:
        spec["replicas"] = options.encoder_replicas
    if name in SINGLETONS and is_executor:
        spec["replicas"] = 1
        spec["strategy"] = {"type": "Recreate"}  # never two writers of the same files on the shared volume

    pod_spec["securityContext"] = {
        "runAsUser": UID,
        "runAsGroup": UID,
        "runAsNonRoot": True,
        "fsGroup": UID,
        "fsGroupChangePolicy": "OnRootMismatch",  # chown a big volume once, not at every start
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    is_gateway = pod_type == "GATEWAY"
    if is_executor or is_gateway:
        pod_spec["volumes"] = [
            *pod_spec.get("volumes", []),
            {"name": WORKSPACE_VOLUME, "persistentVolumeClaim": {"claimName": options.pvc_name}},
        ]
    tls = is_gateway and options.tls_secret is not None

    metrics_port: Optional[int] = None
    for container in pod_spec["containers"]:
        args = [str(a) for a in container.get("args", [])]
        container["args"] = args
        if is_executor:
            container["image"] = f"{options.image_prefix}{name}:{options.tag}"
            _set_arg(args, "--replicas", str(spec["replicas"]))
            container["volumeMounts"] = [
                *container.get("volumeMounts", []),
                {"name": WORKSPACE_VOLUME, "mountPath": WORKSPACE},
            ]
        if name == "indexer" and is_executor and options.milvus_uri is not None:
            uses_with = json.loads(_arg(args, "--uses-with") or "{}")
            uses_with.update(backend="milvus", milvus_uri=options.milvus_uri)
            _set_arg(args, "--uses-with", json.dumps(uses_with))
            if options.milvus_token_secret is not None:
                container["env"] = [
                    *container.get("env", []),
                    {
                        "name": "CLIPTUNER_MILVUS_TOKEN",
                        "valueFrom": {"secretKeyRef": {"name": options.milvus_token_secret, "key": "token"}},
                    },
                ]
        if is_gateway:
            _complete_gateway(pod_spec, container, options)
        container["securityContext"] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}

        ports = container.get("ports") or [{"containerPort": int(_arg(args, "--port") or 8080)}]
        grpc_port = int(ports[0]["containerPort"])
        ports[0].setdefault("name", "grpc")
        if "--monitoring" in args:
            metrics_port = int(_arg(args, "--port-monitoring") or DEFAULT_METRICS_PORT)
            if all(int(p["containerPort"]) != metrics_port for p in ports):
                ports.append({"name": "monitoring", "containerPort": metrics_port})
        container["ports"] = ports

        container["startupProbe"] = _probe(grpc_port, 5, 5, failures=startup_failures, delay=5, tls=tls)
        container["readinessProbe"] = _probe(grpc_port, period=10, timeout=5, failures=3, tls=tls)
        container["livenessProbe"] = _probe(grpc_port, period=10, timeout=10, failures=6, tls=tls)

        cpu, memory = options.resources_of(name)
        resources: dict[str, dict[str, str]] = {
            "requests": {"cpu": cpu, "memory": memory},
            "limits": {"memory": memory},
        }
        gpus = {"tuner": options.gpus_tuner, "encoder": options.gpus_encoder}.get(name, 0) if is_executor else 0
        if gpus:
            resources["limits"][GPU_RESOURCE] = str(gpus)
        container["resources"] = resources

    if metrics_port is not None:
        pod["metadata"]["annotations"] = {
            **pod["metadata"].get("annotations", {}),
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(metrics_port),
            "prometheus.io/path": METRICS_PATH,
        }


def _secret_volume(name: str, secret: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """A volume of the ``keys`` of ``secret``, each as a file of its name (a missing key stops the pod's start)."""
    return {
        "name": name,
        "secret": {
            "secretName": secret,
            "items": [{"key": key, "path": key} for key in keys],
            "defaultMode": SECRET_MODE,
        },
    }


def _complete_gateway(pod_spec: dict[str, Any], container: dict[str, Any], options: K8sOptions) -> None:
    """Make jina's gateway container run ``CLIPGateway`` from the project's image, with keys, TLS and audit log.

    The Secrets are mounted whole, never with ``subPath`` (a ``subPath`` mount is not updated when the Secret
    changes), so that a rotated keys file reaches the running gateway.

    Args:
        pod_spec: the gateway pod's spec (its ``volumes`` are added to).
        container: the gateway container (image, args, env and mounts are changed).
        options: what to generate.
    """
    container["image"] = f"{options.image_prefix}gateway:{options.tag}"
    args = container["args"]
    _put_arg(args, "--uses", GATEWAY_CLASS)
    _put_arg(args, "--py-modules", GATEWAY_MODULES)
    _put_arg(args, "--extra-search-paths", APP)  # jina's own default for a gateway names no folder
    env = [e for e in container.get("env", []) if e.get("name") not in ("CLIPTUNER_KEYS_FILE", "CLIPTUNER_WORKSPACE")]
    env.append({"name": "CLIPTUNER_WORKSPACE", "value": WORKSPACE})  # the audit log: /workspace/audit
    mounts = [*container.get("volumeMounts", []), {"name": WORKSPACE_VOLUME, "mountPath": WORKSPACE}]
    keys_secret = options.gateway_keys_secret
    if keys_secret is not None:
        pod_spec["volumes"].append(_secret_volume(KEYS_VOLUME, keys_secret, (KEYS_SECRET_KEY,)))
        mounts.append({"name": KEYS_VOLUME, "mountPath": KEYS_DIR, "readOnly": True})
        env.append({"name": "CLIPTUNER_KEYS_FILE", "value": KEYS_FILE})
    else:  # the image names a keys file by default; empty: none, every caller is admin
        env.append({"name": "CLIPTUNER_KEYS_FILE", "value": ""})
    if options.tls_secret is not None:
        pod_spec["volumes"].append(_secret_volume(TLS_VOLUME, options.tls_secret, (TLS_CERT, TLS_KEY)))
        mounts.append({"name": TLS_VOLUME, "mountPath": TLS_DIR, "readOnly": True})
        _put_arg(args, "--ssl-certfile", f"{TLS_DIR}/{TLS_CERT}")
        _put_arg(args, "--ssl-keyfile", f"{TLS_DIR}/{TLS_KEY}")
    container["env"] = env
    container["volumeMounts"] = mounts


def _startup_failures(deployment: dict[str, Any]) -> int:
    """The failure budget of jina's startup probe on a Deployment (derived from its ``timeout_ready``)."""
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return max(int(c.get("startupProbe", {}).get("failureThreshold", 120)) for c in containers)


def build_manifests(exported: dict[str, list[dict[str, Any]]], options: K8sOptions) -> dict[str, list[dict[str, Any]]]:
    """Complete jina's exported objects into the full set of manifests (nothing is written).

    Args:
        exported: what :func:`export_flow` returned.
        options: what to generate (validated here).

    Returns:
        file name in DIR -> its objects; ``kustomization.yaml`` maps to one Kustomization.

    Raises:
        ValueError: a bad option, or an option that names an Executor the Flow does not have.
    """
    options.validate()
    workers = {
        str(d["spec"]["template"]["metadata"].get("labels", {}).get("jina_deployment_name", ""))
        for docs in exported.values()
        for d in docs
        if d.get("kind") == "Deployment" and _pod_type(d) == "WORKER"
    }
    for option, executor, asked in (
        ("--encoder-replicas", "encoder", options.encoder_replicas != 2),
        ("--gpus-tuner", "tuner", options.gpus_tuner > 0),
        ("--gpus-encoder", "encoder", options.gpus_encoder > 0),
    ):
        if asked and executor not in workers:
            raise ValueError(f"{option}: the Flow has no Executor named {executor!r} (it has {sorted(workers)})")

    docs_all = [d for docs in exported.values() for d in docs]
    startup = max([_startup_failures(d) for d in docs_all if d.get("kind") == "Deployment"] or [120])

    manifests: dict[str, list[dict[str, Any]]] = {
        NAMESPACE_FILE: [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": options.namespace}}],
    }
    claim: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": options.pvc_name, "namespace": options.namespace},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": options.storage}}},
    }
    if options.storage_class:
        claim["spec"]["storageClassName"] = options.storage_class
    manifests[PVC_FILE] = [claim]

    monitors: list[dict[str, Any]] = []
    order = sorted(exported, key=lambda n: (n == "gateway", n))  # Executors first, the gateway last
    for service in order:
        kept = []
        for doc in exported[service]:
            if doc.get("kind") == "ServiceMonitor":
                monitors.append(doc)
                continue
            if doc.get("kind") == "Deployment":
                budget = startup if _pod_type(doc) == "GATEWAY" else _startup_failures(doc)
                _complete_deployment(doc, options, budget)
            kept.append(doc)
        manifests[f"{service}.yml"] = kept
    if options.service_monitor and monitors:
        manifests[SERVICE_MONITOR_FILE] = monitors
    manifests[KUSTOMIZATION_FILE] = [
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": list(manifests)}
    ]
    return manifests


def _header(file_name: str, options: K8sOptions) -> str:
    """The comment at the top of a written file: where it comes from, and what to keep in mind."""
    lines = [
        "# Written by `cliptuner k8s` (cliptuner/serve/k8s.py) from `jina export kubernetes`; regenerate rather "
        "than edit."
    ]
    if file_name == "indexer.yml":
        lines.append(
            "# The indexer stays at ONE replica: its collection is one on-disk index under /workspace/index "
            "on the shared volume."
        )
    if file_name == "encoder.yml":
        lines.append(
            f"# {options.encoder_replicas} encoder replica(s) (--encoder-replicas); each follows "
            "/workspace/models/CURRENT."
        )
    if file_name == PVC_FILE:
        lines.append("# Shared by every Executor pod at /workspace: needs a storage class that offers ReadWriteMany.")
    if file_name == "gateway.yml":
        lines.extend(_gateway_header(options))
    if file_name == KUSTOMIZATION_FILE:
        lines.append("# kubectl apply -k <this folder>   (kubectl kustomize <this folder> renders it)")
    return "\n".join(lines) + "\n"


def _gateway_header(options: K8sOptions) -> list[str]:
    """What ``gateway.yml``'s header says about access: the keys Secret it expects, or that it runs open."""
    if options.gateway_keys_secret is None:
        lines = [
            "# --insecure-no-auth: this gateway runs WITHOUT API keys. Every caller that reaches it is admin: it may",
            "# train, roll back, index and delete. Regenerate without --insecure-no-auth to require keys.",
        ]
    else:
        lines = [
            f"# The gateway (CLIPGateway) requires API keys: the Secret {options.gateway_keys_secret!r} (key "
            f"{KEYS_SECRET_KEY}) must exist in",
            f"# namespace {options.namespace!r} before the pod starts: `cliptuner keys create --role admin --name ci "
            "--keys-file keys.json`,",
            f"# then `kubectl -n {options.namespace} create secret generic {options.gateway_keys_secret} "
            f"--from-file={KEYS_SECRET_KEY}`.",
        ]
    if options.tls_secret is not None:
        lines.append(
            f"# TLS from the kubernetes.io/tls Secret {options.tls_secret!r}; the probes are tcpSocket (the kubelet's "
            "grpc probe has no TLS)."
        )
    return lines


def write_manifests(out: Path, manifests: dict[str, list[dict[str, Any]]], options: K8sOptions) -> list[Path]:
    """Write ``manifests`` into ``out`` (created if needed), one multi-document YAML file each.

    Args:
        out: the output folder; it may hold only files this command writes (they are replaced).
        manifests: what :func:`build_manifests` returned.
        options: for the files' header comments.

    Returns:
        The written files, in the kustomization's order.

    Raises:
        ValueError: when ``out`` is a file or holds anything else, which a later ``kubectl apply -f`` would mix in.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r}: is a file, not a folder")
    if out.is_dir():
        ours = {p for p in out.iterdir() if p.name in manifests or _written_by_us(p)}
        foreign = sorted(p.name for p in out.iterdir() if p not in ours)
        if foreign:
            raise ValueError(
                f"--out {str(out)!r}: holds files this command does not write ({', '.join(foreign)}); "
                "pass an empty or new folder"
            )
        for stale in ours:
            if stale.name not in manifests:  # from an earlier run with other options (e.g. --service-monitor)
                stale.unlink()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, docs in manifests.items():
        path = out / file_name
        path.write_text(
            _header(file_name, options)
            + yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False, explicit_start=False)
        )
        written.append(path)
    return written


def _written_by_us(path: Path) -> bool:
    """Whether ``path`` starts with the header comment of :func:`_header`."""
    try:
        return path.is_file() and path.read_text().startswith("# Written by `cliptuner k8s`")
    except (OSError, UnicodeDecodeError):
        return False


def generate(out: Path, options: K8sOptions) -> list[Path]:
    """Export the Flow, complete its objects and write them into ``out``.

    Args:
        out: the output folder.
        options: what to generate.

    Returns:
        The written files.

    Raises:
        ValueError: a bad option, a missing Flow file, a failed export or an output folder in use.
    """
    options.validate()
    flow = options.flow or default_flow()
    manifests = build_manifests(export_flow(flow, options.namespace), options)
    return write_manifests(out, manifests, options)
