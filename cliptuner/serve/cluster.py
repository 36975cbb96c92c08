"""Training on several nodes: a run as a Kubernetes Indexed Job of N pods that meet through torchrun's c10d
rendezvous (jina-free, torch-free; :mod:`cliptuner.serve.kube_api` talks to the API server with the standard
library).

**Why a plain Indexed Job.** Kubeflow's ``PyTorchJob`` needs the training operator and its CRDs installed in the
cluster; an Indexed Job needs nothing beyond Kubernetes itself (``completionMode: Indexed`` is GA since 1.24). Each
of its pods gets an index (``JOB_COMPLETION_INDEX``) and, with ``subdomain`` naming a headless Service, a stable DNS
name ``<job>-<index>.<service>``; pod 0's name is the rendezvous endpoint every node's ``torchrun`` meets at.

**What runs.** :func:`job_manifests` builds a headless Service and the Job: ``nodes`` pods (completions =
parallelism = nodes), ``backoffLimit: 0`` (a failed rank fails the run, and the tuner reports it: torchrun's elastic
restarts are not used), ``restartPolicy: Never``, the image's non-root user (uid/gid 10001, as every cliptuner pod),
the shared workspace claim mounted where the tuner mounts it (``/workspace``), a memory-backed ``/dev/shm`` (NCCL
and DataLoader workers need more than the runtime's 64 MiB), and one container::

    python -m cliptuner.serve.cluster_node --log-dir RUN_DIR -- \\
        python -m torch.distributed.run --nnodes N --nproc_per_node P --rdzv_backend c10d \\
            --rdzv_endpoint <job>-0.<service>:29500 --rdzv_id RUN_ID --local_addr $(POD_IP) --max_restarts 0 \\
            -m cliptuner.train.worker JOB --events EVENTS

With c10d rendezvous, node ranks are assigned by the rendezvous, so no ``--node_rank`` is passed; the pod index
names the node's log file and says which node hosts the rendezvous store (:mod:`cliptuner.serve.cluster_node`,
which also appends the node's output to ``RUN_DIR/train-<index>.log`` on the shared volume, so the tuner quotes a
failure without the pod-logs API, and records how the node ended in ``RUN_DIR/node-<index>.json``).
``--local_addr $(POD_IP)`` (the kubelet expands it from the downward API) makes node 0 announce its pod IP to the
workers as the address of the process group's store instead of a host name.

**How the tuner follows it.** :class:`KubernetesJobRun` has the methods of the local worker process
(:class:`cliptuner.serve.runs.TrainingProcess`): :meth:`~KubernetesJobRun.start` creates the Job and then the
Service (owned by the Job, so the Job's deletion or its TTL removes it too), :meth:`~KubernetesJobRun.poll` reads
the Job's ``Complete``/``Failed`` condition (and fails a run whose pods cannot start their container), the events
come from the same ``events.jsonl`` in the run directory (rank 0 writes it on the shared volume), and
:meth:`~KubernetesJobRun.stop` deletes the Job (foreground: its pods first) and the Service. The tuner publishes the
model rank 0 exported into the run directory as it does for a local run.

The tuner talks to the API server with its pod's service account (:meth:`KubeAPI.in_cluster`); the permissions it
needs are :func:`training_rbac`'s Role, and :func:`training_network_policy` lets the training pods reach each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from cliptuner.serve.cluster_node import log_name, status_name
from cliptuner.serve.k8s import (
    CPU_QUANTITY,
    DNS_LABEL,
    DNS_SUBDOMAIN,
    GPU_RESOURCE,
    MEMORY_QUANTITY,
    UID,
    WORKSPACE,
    WORKSPACE_VOLUME,
)
from cliptuner.serve.kube_api import KubeAPI, KubeAPIError, KubeNotFound, in_cluster_namespace
from cliptuner.serve.worker_events import LOG_TAIL_LINES, PROCESS_FILE, WorkerEvents, file_tail, files_tail

logger = logging.getLogger(__name__)

APP = "cliptuner"
COMPONENT = "training"
RUN_LABEL = "cliptuner/run"
NAME_PREFIX = "cliptuner-train-"
MAX_JOB_NAME = 52  # a pod's host name is <job>-<index> (63 characters at most), and the name is a label value too
DEFAULT_PORT = 29500  # torchrun's rendezvous port on pod 0
DEFAULT_SERVICE_ACCOUNT = "cliptuner-tuner"  # the tuner's, bound to training_rbac's Role
DEFAULT_TTL_S = 3600  # a finished Job (and its Service) stays this long for `kubectl logs`, then goes
DEFAULT_TERMINATION_GRACE_S = 30  # SIGTERM to SIGKILL when a training pod is stopped
NODE_MODULE = "cliptuner.serve.cluster_node"
WORKER_MODULE = "cliptuner.train.worker"
SHM_VOLUME = "dshm"
POLL_INTERVAL_S = 2.0  # the Job is read at most this often, however often the tuner polls
PODS_CHECK_S = 10.0  # the pods of an active Job are looked at this often (a container that cannot start)
UNSTARTABLE_GRACE_S = 120.0  # a container that cannot start for this long fails the run
API_ERROR_GRACE_S = 60.0  # API server errors that may pass (unreachable, 429, 5xx) fail the run after this long
STOP_GRACE_S = 10.0
STOP_MARGIN_S = 30.0  # how much longer than its pods' grace a stop waits for the Job to go
UNSTARTABLE = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)

_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_OWN_ENV = ("POD_IP", "PYTHONUNBUFFERED", "JOB_COMPLETION_INDEX")  # set by the Job itself


# -- names ----------------------------------------------------------------------------------------------------------
def _check_run_id(run_id: Any) -> str:
    if not isinstance(run_id, str) or not _LABEL_VALUE.match(run_id):
        raise ValueError(
            f"run id {run_id!r} must be a label value (letters, digits, '-', '_' and '.', at most 63 characters, "
            "starting and ending with a letter or digit)"
        )
    return run_id


def job_name(run_id: str) -> str:
    """The name of a run's Job and of its headless Service: ``cliptuner-train-<run id>`` as a DNS label (lowercase,
    other characters as ``-``; a long run id cut and given a hash of the whole, so that two stay two).

    Raises:
        ValueError: ``run_id`` is not a label value.
    """
    run_id = _check_run_id(run_id)
    name = NAME_PREFIX + re.sub(r"[^a-z0-9]+", "-", run_id.lower()).strip("-")
    if len(name) > MAX_JOB_NAME:
        digest = hashlib.sha256(run_id.encode()).hexdigest()[:8]
        name = name[: MAX_JOB_NAME - len(digest) - 1].rstrip("-") + "-" + digest
    return name


def training_labels(run_id: Optional[str] = None) -> dict[str, str]:
    """The labels of the training pods (and of their Job and Service); with ``run_id``, those of one run."""
    labels = {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": COMPONENT}
    if run_id is not None:
        labels[RUN_LABEL] = _check_run_id(run_id)
    return labels


# -- what a run's Job looks like --------------------------------------------------------------------------------------
def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_namespace(namespace: Any) -> None:
    _check(
        isinstance(namespace, str) and bool(DNS_LABEL.match(namespace)),
        f"namespace must be a DNS label (lowercase letters, digits and '-', at most 63 characters), got {namespace!r}",
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class TrainingCluster:
    """How the runs of a tuner train on Kubernetes: the Job's pods, what each gets, where the workspace is.

    Raises:
        ValueError: a bad value, naming the field and what it accepts.
    """

    image: str  # the training image: the tuner's (with the training extra), e.g. "registry/cliptuner-tuner:1.2"
    nodes: int  # pods of the Job; torchrun's --nnodes
    procs_per_node: int = 1  # torchrun's --nproc_per_node: one process per GPU, or CPU processes
    namespace: str = "cliptuner"  # where the Job and the Service are created (the tuner's own namespace)
    workspace_claim: str = "cliptuner-workspace"  # the shared ReadWriteMany claim of the workspace
    gpus_per_node: int = 0  # nvidia.com/gpu limit of each pod (0: CPU training over gloo)
    cpu: str = "2"  # cpu request of each pod
    memory: str = "8Gi"  # memory request and limit of each pod
    service_account: Optional[str] = None  # the training pods' service account (None: the namespace's default)
    port: int = DEFAULT_PORT  # the rendezvous port on pod 0
    extra_env: dict[str, str] = dataclasses.field(default_factory=dict)  # more environment of each pod
    workspace_mount: str = WORKSPACE  # where the claim is mounted: where the tuner mounts it, so paths agree
    rendezvous_host: Optional[str] = None  # None: pod 0's DNS name <job>-0.<service>
    ttl_s: int = DEFAULT_TTL_S  # a finished Job is deleted this long after it ended (its Service with it)
    active_deadline_s: Optional[int] = None  # a Job still running after this long fails (None: no limit)
    termination_grace_s: int = DEFAULT_TERMINATION_GRACE_S  # SIGTERM to SIGKILL when a pod is stopped
    node_selector: dict[str, str] = dataclasses.field(default_factory=dict)  # e.g. the GPU nodes' label
    tolerations: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # e.g. the GPU nodes' taint

    def __post_init__(self) -> None:
        _check(
            isinstance(self.image, str) and bool(self.image) and not re.search(r"\s", self.image),
            f"image must be an image reference without spaces, got {self.image!r}",
        )
        for name in ("nodes", "procs_per_node"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        _check(
            _is_int(self.gpus_per_node) and self.gpus_per_node >= 0,
            f"gpus_per_node must be an integer >= 0, got {self.gpus_per_node!r}",
        )
        _check(
            self.gpus_per_node == 0 or self.procs_per_node <= self.gpus_per_node,
            f"procs_per_node ({self.procs_per_node}) must not exceed gpus_per_node ({self.gpus_per_node}): "
            "NCCL needs a GPU of its own for each process",
        )
        _check_namespace(self.namespace)
        for name in ("workspace_claim", "service_account"):
            value = getattr(self, name)
            _check(
                (value is None and name == "service_account")
                or (isinstance(value, str) and bool(DNS_SUBDOMAIN.match(value))),
                f"{name} must be a DNS subdomain (lowercase letters, digits, '-' and '.'), got {value!r}",
            )
        _check(
            isinstance(self.cpu, str) and bool(CPU_QUANTITY.match(self.cpu)),
            f"cpu must be a CPU quantity like '2', '1.5' or '500m', got {self.cpu!r}",
        )
        _check(
            isinstance(self.memory, str) and bool(MEMORY_QUANTITY.match(self.memory)),
            f"memory must be a memory quantity like '8Gi' or '512Mi', got {self.memory!r}",
        )
        _check(_is_int(self.port) and 1 <= self.port <= 65535, f"port must be in 1..65535, got {self.port!r}")
        _check(isinstance(self.extra_env, dict), f"extra_env must be a mapping, got {self.extra_env!r}")
        for key, value in self.extra_env.items():
            _check(
                isinstance(key, str) and bool(_ENV_NAME.match(key)) and key not in _OWN_ENV,
                f"extra_env: {key!r} is not an environment variable name the Job may take (letters, digits, "
                f"'_', '-' and '.', not starting with a digit; not one of {list(_OWN_ENV)})",
            )
            _check(isinstance(value, str), f"extra_env[{key!r}] must be a string, got {value!r}")
        _check(
            isinstance(self.workspace_mount, str) and PurePosixPath(self.workspace_mount).is_absolute(),
            f"workspace_mount must be an absolute path, got {self.workspace_mount!r}",
        )
        _check(
            self.rendezvous_host is None
            or (isinstance(self.rendezvous_host, str) and bool(re.match(r"^[A-Za-z0-9.:-]+$", self.rendezvous_host))),
            f"rendezvous_host must be a host name or address, got {self.rendezvous_host!r}",
        )
        _check(_is_int(self.ttl_s) and self.ttl_s >= 0, f"ttl_s must be an integer >= 0, got {self.ttl_s!r}")
        _check(
            self.active_deadline_s is None or (_is_int(self.active_deadline_s) and self.active_deadline_s >= 1),
            f"active_deadline_s must be an integer >= 1 or None, got {self.active_deadline_s!r}",
        )
        _check(
            _is_int(self.termination_grace_s) and self.termination_grace_s >= 0,
            f"termination_grace_s must be an integer >= 0, got {self.termination_grace_s!r}",
        )
        _check(
            isinstance(self.node_selector, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in self.node_selector.items()),
            f"node_selector must map label names to values (strings), got {self.node_selector!r}",
        )
        _check(
            isinstance(self.tolerations, list) and all(isinstance(t, dict) for t in self.tolerations),
            f"tolerations must be a list of toleration objects, got {self.tolerations!r}",
        )

    def torch_threads(self) -> int:
        """``OMP_NUM_THREADS`` of each training process: the pod's whole CPUs shared by its processes, at least 1."""
        cpus = int(self.cpu[:-1]) // 1000 if self.cpu.endswith("m") else int(float(self.cpu))
        return max(1, cpus // self.procs_per_node)

    def manifests(self, run_id: str, job_path: Path, events_path: Path) -> list[dict[str, Any]]:
        """The headless Service and the Indexed Job of a run (see :func:`job_manifests`)."""
        return _manifests(self, run_id, Path(job_path), Path(events_path))


def _on_volume(cluster: TrainingCluster, name: str, path: Path) -> str:
    """``path`` as the pods see it; it must lie on the shared workspace volume."""
    pure = PurePosixPath(str(path))
    _check(
        pure.is_absolute() and pure.is_relative_to(cluster.workspace_mount),
        f"{name} {str(path)!r} must be on the shared workspace volume (under {cluster.workspace_mount}), where "
        "the training pods see it",
    )
    return str(pure)


def _manifests(cluster: TrainingCluster, run_id: str, job_path: Path, events_path: Path) -> list[dict[str, Any]]:
    name = job_name(run_id)
    labels = training_labels(run_id)
    job_file = _on_volume(cluster, "the job file", job_path)
    events_file = _on_volume(cluster, "the events file", events_path)
    run_dir = str(PurePosixPath(events_file).parent)
    host = cluster.rendezvous_host or f"{name}-0.{name}"
    torchrun = [
        "python",
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(cluster.nodes),
        "--nproc_per_node",
        str(cluster.procs_per_node),
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"{host}:{cluster.port}",
        "--rdzv_id",
        run_id,
        "--local_addr",
        "$(POD_IP)",
        "--max_restarts",
        "0",
        "-m",
        WORKER_MODULE,
        job_file,
        "--events",
        events_file,
    ]
    env = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "OMP_NUM_THREADS", "value": str(cluster.torch_threads())},
    ]
    env = [e for e in env if e["name"] not in cluster.extra_env]
    env += [{"name": key, "value": value} for key, value in sorted(cluster.extra_env.items())]
    limits = {"memory": cluster.memory}
    if cluster.gpus_per_node:
        limits[GPU_RESOURCE] = str(cluster.gpus_per_node)
    container = {
        "name": "train",
        "image": cluster.image,
        "command": ["python", "-m", NODE_MODULE, "--log-dir", run_dir, "--"],
        "args": torchrun,
        "workingDir": run_dir,
        "env": env,
        "ports": [{"name": "rendezvous", "containerPort": cluster.port, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": cluster.cpu, "memory": cluster.memory}, "limits": limits},
        "volumeMounts": [
            {"name": WORKSPACE_VOLUME, "mountPath": cluster.workspace_mount},
            {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
        ],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    pod_spec: dict[str, Any] = {
        "subdomain": name,  # with the headless Service of that name: <job>-<index>.<service> resolves
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # the training pods never talk to the API server
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": cluster.termination_grace_s,
        "securityContext": {
            "runAsUser": UID,
            "runAsGroup": UID,
            "runAsNonRoot": True,
            "fsGroup": UID,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": WORKSPACE_VOLUME, "persistentVolumeClaim": {"claimName": cluster.workspace_claim}},
            {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}},
        ],
    }
    if cluster.service_account is not None:
        pod_spec["serviceAccountName"] = cluster.service_account
    if cluster.node_selector:
        pod_spec["nodeSelector"] = dict(cluster.node_selector)
    if cluster.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in cluster.tolerations]
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": cluster.nodes,
        "parallelism": cluster.nodes,
        # one failed pod fails the run: a torchrun group cannot go on without a rank. No podFailurePolicy: with no
        # retries there is nothing to fail sooner, and ignoring a disruption would start a pod that cannot rejoin
        # a rendezvous that has closed (elastic restarts are not used)
        "backoffLimit": 0,
        "ttlSecondsAfterFinished": cluster.ttl_s,
        "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
    }
    if cluster.active_deadline_s is not None:
        job_spec["activeDeadlineSeconds"] = cluster.active_deadline_s
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": cluster.namespace, "labels": dict(labels)},
        "spec": {
            "clusterIP": "None",
            "selector": dict(labels),
            "publishNotReadyAddresses": True,  # the pods' names resolve before they are ready (they have no probe)
            "ports": [{"name": "rendezvous", "port": cluster.port, "targetPort": cluster.port, "protocol": "TCP"}],
        },
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": cluster.namespace, "labels": dict(labels)},
        "spec": job_spec,
    }
    return [service, job]


def job_manifests(run_id: str, job_path: Path, events_path: Path, **options: Any) -> list[dict[str, Any]]:
    """The headless Service and the Indexed Job that train run ``run_id`` on ``nodes`` pods.

    Args:
        run_id: the run (a label value); the Job and the Service are named :func:`job_name` of it.
        job_path: the run's ``job.json``, on the shared volume.
        events_path: the run's ``events.jsonl`` in its run directory, on the shared volume; the nodes' logs go
            beside it.
        **options: the fields of :class:`TrainingCluster`: ``image`` and ``nodes`` at least, and
            ``namespace``, ``procs_per_node``, ``workspace_claim``, ``gpus_per_node``, ``cpu``, ``memory``,
            ``service_account``, ``port``, ``extra_env``, ``workspace_mount``, ``rendezvous_host``, ``ttl_s``,
            ``active_deadline_s``, ``termination_grace_s``, ``node_selector``, ``tolerations``.

    Returns:
        ``[service, job]`` as dicts, ready to be created (the Service first for ``kubectl apply``;
        :class:`KubernetesJobRun` creates the Job first, to make it the Service's owner).

    Raises:
        ValueError: an unknown or bad option, a bad run id, or a path not on the workspace volume (named).
    """
    known = {f.name for f in dataclasses.fields(TrainingCluster)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown training cluster option(s) {unknown}; known: {sorted(known)}")
    missing = sorted({"image", "nodes"} - set(options))
    if missing:
        raise ValueError(f"a training Job needs {missing}")
    return TrainingCluster(**options).manifests(run_id, job_path, events_path)


# -- what the tuner's service account may do, and who may reach the training pods ------------------------------------
def training_rbac(namespace: str, service_account: str = DEFAULT_SERVICE_ACCOUNT) -> list[dict[str, Any]]:
    """The ServiceAccount of the tuner, the Role that lets it run training Jobs, and the RoleBinding between them.

    The Role allows, in ``namespace`` only: Jobs (``batch``) create, get, list, watch, delete; Services create,
    get, delete (the Job's headless Service); Pods get, list (to fail a run whose pods cannot start). Give the
    tuner's pod ``serviceAccountName: <service_account>``.

    Raises:
        ValueError: ``namespace`` is not a DNS label or ``service_account`` not a DNS subdomain.
    """
    _check_namespace(namespace)
    _check(
        isinstance(service_account, str) and bool(DNS_SUBDOMAIN.match(service_account)),
        f"service account {service_account!r} must be a DNS subdomain (lowercase letters, digits, '-' and '.')",
    )
    labels = {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": "tuner"}
    role = f"{service_account}-training"
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": service_account, "namespace": namespace, "labels": labels},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": role, "namespace": namespace, "labels": labels},
            "rules": [
                {
                    "apiGroups": ["batch"],
                    "resources": ["jobs"],
                    "verbs": ["create", "get", "list", "watch", "delete"],
                },
                {"apiGroups": [""], "resources": ["services"], "verbs": ["create", "get", "delete"]},
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": role, "namespace": namespace, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
        },
    ]


def training_network_policy(namespace: str, restrict_egress: bool = False) -> dict[str, Any]:
    """A NetworkPolicy that lets the training pods reach each other on every TCP port and nothing else reach them.

    torchrun's rendezvous listens on one port, but the process group's store, gloo and NCCL use ephemeral ports,
    so all TCP between training pods is allowed. With ``restrict_egress`` the training pods may also reach only
    each other and the cluster's DNS (``kube-dns`` in ``kube-system``), nothing else: no downloads.

    Raises:
        ValueError: ``namespace`` is not a DNS label.
    """
    _check_namespace(namespace)
    peers = [{"podSelector": {"matchLabels": training_labels()}}]
    spec: dict[str, Any] = {
        "podSelector": {"matchLabels": training_labels()},
        "policyTypes": ["Ingress"],
        "ingress": [{"from": peers, "ports": [{"protocol": "TCP"}]}],
    }
    if restrict_egress:
        dns = {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
        spec["policyTypes"].append("Egress")
        spec["egress"] = [
            {"to": peers, "ports": [{"protocol": "TCP"}]},
            {"to": [dns], "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
        ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{APP}-{COMPONENT}", "namespace": namespace, "labels": training_labels()},
        "spec": spec,
    }


# -- one run ----------------------------------------------------------------------------------------------------------
class KubernetesJobRun(WorkerEvents):
    """A run's worker as a Kubernetes Indexed Job, followed as :class:`cliptuner.serve.runs.TrainingProcess` follows a
    local one: :meth:`start`, :meth:`poll`, :meth:`read_events`, :meth:`stop`, :meth:`log_tail`, :meth:`failure`,
    :attr:`failed` and :attr:`pid` (None: no local process).

    Args:
        api: the API server.
        cluster: the Job's shape (image, nodes, processes per node, GPUs, the workspace claim...).
        run_id: the run; names the Job and the Service (:func:`job_name`) and is torchrun's rendezvous id.
        job_path: the run's ``job.json`` on the shared volume.
        events_path: the run's ``events.jsonl``; its folder is the run directory, where the nodes' logs go.
        poll_interval_s: the Job is read at most this often (:meth:`poll` answers from the last read between).
        pods_check_s: how often the pods of an active Job are looked at.
        unstartable_grace_s: a pod whose container cannot start (a missing image...) for this long fails the run.
        api_error_grace_s: how long errors of an API server that may come back are waited out before the run fails.

    Raises:
        ValueError: the Job cannot be built (a bad run id, a path not on the workspace volume).
    """

    def __init__(
        self,
        api: KubeAPI,
        cluster: TrainingCluster,
        run_id: str,
        job_path: Path,
        events_path: Path,
        *,
        poll_interval_s: float = POLL_INTERVAL_S,
        pods_check_s: float = PODS_CHECK_S,
        unstartable_grace_s: float = UNSTARTABLE_GRACE_S,
        api_error_grace_s: float = API_ERROR_GRACE_S,
    ) -> None:
        super().__init__(Path(events_path))
        self.api = api
        self.cluster = cluster
        self.run_id = run_id
        self.run_dir = self.events_path.parent
        self.namespace = cluster.namespace
        self.job_name = job_name(run_id)
        self.service, self.job = cluster.manifests(run_id, Path(job_path), self.events_path)
        self.poll_interval_s = poll_interval_s
        self.pods_check_s = pods_check_s
        self.unstartable_grace_s = unstartable_grace_s
        self.api_error_grace_s = api_error_grace_s
        self.reason: Optional[str] = None  # why the Job failed, once it has
        self.returncode: Optional[int] = None  # 0 once the Job completed, 1 once it failed
        self.created = False
        self._next_poll = 0.0
        self._next_pods_check = 0.0
        self._failing_since: Optional[float] = None  # the first of the API errors waited out now
        self._stuck: dict[str, float] = {}  # pod -> since when its container cannot start
        self._unscheduled: set[str] = set()  # pods already logged as not scheduled
        self._stopping = threading.Lock()
        self._stopped = False

    @property
    def pid(self) -> Optional[int]:
        """None: the worker runs in the Job's pods, not in a local process."""
        return None

    def describe(self) -> str:
        """``job NAMESPACE/NAME`` (N nodes × P processes)."""
        c = self.cluster
        return f"job {self.namespace}/{self.job_name} ({c.nodes} nodes x {c.procs_per_node} processes)"

    # -- starting -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Create the Job and then its headless Service (owned by the Job); record them in ``process.json``.

        Raises:
            KubeAPIError: the API server refused one of them (named, with the permission missing); a Job created
                before the Service was refused is deleted again.
        """
        record = {"job": self.job_name, "service": self.job_name, "namespace": self.namespace}
        (self.run_dir / PROCESS_FILE).write_text(json.dumps(record), encoding="utf-8")  # before: a crash leaves a name
        created = self.api.create(self.job)
        self.created = True
        service = json.loads(json.dumps(self.service))
        uid = (created.get("metadata") or {}).get("uid")
        if uid:  # the Job's deletion (by a stop or its TTL) takes the Service with it
            service["metadata"]["ownerReferences"] = [
                {"apiVersion": "batch/v1", "kind": "Job", "name": self.job_name, "uid": uid}
            ]
        try:
            self.api.create(service)
        except BaseException:
            self.stop()
            raise
        logger.info("training %s started: %s", self.describe(), " ".join(self.job_command()))

    def job_command(self) -> list[str]:
        """The command line each pod runs (the node launcher, then torchrun's command line)."""
        container = self.job["spec"]["template"]["spec"]["containers"][0]
        return [*container["command"], *container["args"]]

    # -- following ------------------------------------------------------------------------------------------------
    def poll(self) -> Optional[int]:
        """0 once the Job completed, 1 once it failed (or a pod could not start, or the Job was deleted from
        outside), None while it runs; the Job is read at most every ``poll_interval_s``.

        Raises:
            KubeAPIError: the API server refused to show the Job (a missing permission), or gave no answer for
                longer than ``api_error_grace_s``.
        """
        if self.returncode is not None or not self.created:
            return self.returncode
        now = time.monotonic()
        if now < self._next_poll:
            return None
        self._next_poll = now + self.poll_interval_s
        try:
            job = self.api.get("Job", self.namespace, self.job_name)
            for condition in (job.get("status") or {}).get("conditions") or []:
                if condition.get("status") != "True":
                    continue
                if condition.get("type") == "Complete":
                    return self._ended(0, None)
                if condition.get("type") == "Failed":
                    reason = condition.get("reason") or "Failed"
                    message = condition.get("message")
                    return self._ended(1, f"{reason}: {message}" if message else reason)
            problem = self._pod_problem(now) if now >= self._next_pods_check else None
        except KubeNotFound:
            return self._ended(1, "the Job was deleted before it finished, from outside the tuner")
        except KubeAPIError as exc:
            self._api_error(exc, now)
            return None
        self._failing_since = None
        return None if problem is None else self._ended(1, problem)

    def _ended(self, returncode: int, reason: Optional[str]) -> int:
        self.returncode, self.reason = returncode, reason
        if returncode:
            logger.warning("training %s failed: %s", self.describe(), reason)
        return returncode

    def _api_error(self, exc: KubeAPIError, now: float) -> None:
        """Wait out an API error that may pass, for up to ``api_error_grace_s``; raise any other at once.

        Raises:
            KubeAPIError: ``exc`` when it will not pass, or has lasted too long.
        """
        if not exc.transient:
            raise exc
        if self._failing_since is None:
            self._failing_since = now
        if now - self._failing_since >= self.api_error_grace_s:
            raise KubeAPIError(
                f"{exc} (for {now - self._failing_since:.0f}s: the run is given up; its Job may still run)",
                exc.status,
                exc.reason,
            ) from exc
        logger.warning("training %s: %s; asking again", self.describe(), exc)

    def _pod_problem(self, now: float) -> Optional[str]:
        """Why the run cannot go on when one of its pods cannot start its container for ``unstartable_grace_s``
        (a missing image, a bad configuration); None otherwise. A pod not scheduled yet is logged, once: a cluster
        autoscaler may still make room for it."""
        self._next_pods_check = now + self.pods_check_s
        pods = self.api.list_objects("Pod", self.namespace, f"{RUN_LABEL}={self.run_id}")
        for pod in pods:
            name = str((pod.get("metadata") or {}).get("name"))
            status = pod.get("status") or {}
            for condition in status.get("conditions") or []:
                if (
                    condition.get("type") == "PodScheduled"
                    and condition.get("status") == "False"
                    and name not in self._unscheduled
                ):
                    self._unscheduled.add(name)
                    logger.warning(
                        "training %s: pod %s is not scheduled yet: %s", self.describe(), name, condition.get("message")
                    )
            waiting = [
                (s.get("state") or {}).get("waiting") or {}
                for s in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
            ]
            stuck = next((w for w in waiting if w.get("reason") in UNSTARTABLE), None)
            if stuck is None:
                self._stuck.pop(name, None)
                continue
            since = self._stuck.setdefault(name, now)
            if now - since >= self.unstartable_grace_s:
                return f"pod {name} cannot start its container: {stuck.get('reason')}: {stuck.get('message') or ''}"
        return None

    # -- stopping -------------------------------------------------------------------------------------------------
    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Delete the Job (its pods first: foreground propagation) and its Service; wait up to ``grace`` plus the
        pods' termination grace and :data:`STOP_MARGIN_S` for the Job to be gone. Errors are logged, not raised
        (the Job named, for an operator to delete by hand)."""
        with self._stopping:
            if not self.created or self._stopped:
                return
            self._stopped = True
            try:
                gone = not self.api.delete("Job", self.namespace, self.job_name, propagation="Foreground")
                deadline = time.monotonic() + grace + self.cluster.termination_grace_s + STOP_MARGIN_S
                while not gone and time.monotonic() < deadline:
                    try:
                        self.api.get("Job", self.namespace, self.job_name)
                    except KubeNotFound:
                        gone = True
                    else:
                        time.sleep(0.5)
                if not gone:
                    logger.warning(
                        "training %s: still being deleted; its pods may still write to %s",
                        self.describe(),
                        self.run_dir,
                    )
            except KubeAPIError as exc:
                logger.error(
                    "training %s could not be deleted: %s; delete it with `kubectl -n %s delete job %s`",
                    self.describe(),
                    exc,
                    self.namespace,
                    self.job_name,
                )
            try:
                self.api.delete("Service", self.namespace, self.job_name)
            except KubeAPIError as exc:
                logger.warning("training %s: its Service could not be deleted: %s", self.describe(), exc)

    # -- how it ended ---------------------------------------------------------------------------------------------
    def node_results(self) -> list[dict[str, Any]]:
        """How each node that has ended did (its ``node-<index>.json``), in the order they ended."""
        results = []
        for index in range(self.cluster.nodes):
            try:
                result = json.loads((self.run_dir / status_name(index)).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(result, dict) and isinstance(result.get("returncode"), int):
                results.append({**result, "index": index})
        return sorted(results, key=lambda r: (r.get("ended_at", 0), r["index"]))

    def failed_nodes(self) -> list[dict[str, Any]]:
        """The nodes that ended with a non-zero status, the first to end first (the others are often stopped
        because of it)."""
        return [r for r in self.node_results() if r["returncode"] != 0]

    def ended(self, returncode: int) -> str:
        """``training job NS/NAME failed (reason)`` and which node exited first with which status."""
        text = f"training job {self.namespace}/{self.job_name} failed"
        if self.reason:
            text += f" ({self.reason})"
        failed = self.failed_nodes()
        if failed:
            first, *others = failed
            text += f"; node {first['index']} exited with code {first['returncode']}"
            if others:
                text += " first (then " + ", ".join(f"node {r['index']} with {r['returncode']}" for r in others) + ")"
        return text

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The end of the log of the node that failed first; else of every node's log; or ``no output``."""
        failed = self.failed_nodes()
        if failed:
            first = self.run_dir / log_name(failed[0]["index"])
            return f"{first.name}:\n{file_tail(first, lines) or 'no output'}"
        return files_tail([self.run_dir / log_name(i) for i in range(self.cluster.nodes)], lines)


def stop_leftover_job(api: KubeAPI, run_dir: Path, grace: float = STOP_GRACE_S) -> Optional[str]:
    """Delete the Job (and Service) that an unfinished run directory's ``process.json`` names, if it names one.

    A tuner that was killed cannot stop the Job of its run; the next one calls this for each unfinished run
    directory before removing it, so that no training pod writes there any more.

    Returns:
        ``NAMESPACE/NAME`` of the Job deleted (or found gone already), or None when the directory names none.
    """
    try:
        record = json.loads((Path(run_dir) / PROCESS_FILE).read_text(encoding="utf-8"))
        namespace, name = str(record["namespace"]), str(record["job"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    deadline = time.monotonic() + grace + STOP_MARGIN_S
    try:
        gone = not api.delete("Job", namespace, name, propagation="Foreground")
        while not gone and time.monotonic() < deadline:
            try:
                api.get("Job", namespace, name)
                time.sleep(0.5)
            except KubeNotFound:
                gone = True
        api.delete("Service", namespace, str(record.get("service") or name))
    except KubeAPIError as exc:
        logger.error(
            "could not delete the training Job %s/%s of %s: %s; delete it with `kubectl -n %s delete job %s`",
            namespace,
            name,
            run_dir,
            exc,
            namespace,
            name,
        )
    else:
        logger.warning("deleted the training Job %s/%s left by a tuner that stopped without ending it", namespace, name)
    return f"{namespace}/{name}"


__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_SERVICE_ACCOUNT",
    "KubeAPI",
    "KubeAPIError",
    "KubeNotFound",
    "KubernetesJobRun",
    "TrainingCluster",
    "in_cluster_namespace",
    "job_manifests",
    "job_name",
    "stop_leftover_job",
    "training_labels",
    "training_network_policy",
    "training_rbac",
]
