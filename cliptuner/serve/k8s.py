"""Kubernetes manifests for cliptuner that an operator applies as written: ``cliptuner k8s --out DIR``.

``jina export kubernetes flows/k8s.yml`` writes a ConfigMap, a Service and a Deployment per Executor (tuner,
encoder, indexer) and for the gRPC gateway. On their own those do not run cliptuner on a cluster: the Executors
need one shared volume for the model registry, the image's non-root user must be able to write it, the gateway
is jina's plain one (the export refuses a ``gateway: uses:`` that is not a container image, so the Flow cannot
name ``CLIPGateway`` there), and jina's own liveness probe is a ``jina ping`` process (a full Python start every
5 s, whose ``"--timeout 9500"`` reaches ``jina ping`` as one unknown argument and is ignored). This module runs
that export into a temporary folder and completes its objects (loaded as dicts, changed, written back) into DIR:

* ``namespace.yml``: the Namespace (``--namespace``, default ``cliptuner``; also passed to jina as
  ``--k8s-namespace``, which writes it into every object and into the gateway's Executor addresses).
* ``workspace-pvc.yml``: one ReadWriteMany PersistentVolumeClaim (``--storage``, ``--storage-class``,
  ``--pvc-name``) mounted at ``/workspace`` (``CLIPTUNER_WORKSPACE``). It holds what several pods share: the model
  registry ``models/`` (the tuner publishes versions; every encoder replica and the indexer follow
  ``models/CURRENT``), ``data/`` (the PAIRS files a ``/train`` names, the image files client uris name),
  ``runs/`` (one folder per training run) and ``audit/`` (the gateway's audit log). Only the tuner and the gateway
  write it and mount it read-write; the encoder and the indexer write nothing there (their index is on its own
  volume, below) and mount it ``readOnly``, so that "only the tuner writes models" is a property of the mounts. A
  ReadWriteMany claim needs a storage class that offers it (NFS, CephFS, EFS, Azure Files, Filestore, ...).
* ``index-pvc.yml``: one ReadWriteOnce claim per indexer Deployment, ``<deployment>-store`` (``--index-storage``,
  ``--index-storage-class``), mounted at ``/index`` and given to the indexer as its ``index_dir``: the embedded
  store's SQLite database (in WAL mode, which needs the shared-memory locking a local file system gives and NFS
  does not) and its HNSW graph sit on a block volume of their own. jina exports a sharded Executor as one
  Deployment per shard (``indexer-0``, ``indexer-1``, ... behind ``indexer-head``), so a Flow with ``shards: N``
  gets one claim per shard; flows/k8s.yml has no shards, so one. With ``--milvus-uri`` the vectors and the docs'
  fields live in Milvus, but the indexer still keeps each doc's image bytes and tensors there (the content files a
  new model version is re-embedded from; Milvus fields cannot hold them) and its store lock, so the claim stays.
* ``<service>.yml`` per jina deployment (``tuner.yml``, ``encoder.yml``, ``indexer.yml``, ``gateway.yml``): jina's
  ConfigMap, Service and Deployment, with

  - images: ``<--image-prefix><name>:<--tag>``, the tag by default the package's version (never a moving
    ``latest`` unless asked); a pod that reserves GPUs (``--gpus-tuner``, ``--gpus-encoder``) runs the image's
    ``-gpu`` variant, ``<prefix><name>:<tag>-gpu``, built with the CUDA build of ONNX Runtime
    (:data:`GPU_BUILD_ARG`), and its Executor runs with ``device: cuda``, so that a GPU it cannot use stops the pod
    at start instead of serving on the CPU behind a reserved GPU. ``--digest NAME=sha256:...`` pins the image of
    service NAME by digest (``image@sha256:...``). ``imagePullPolicy`` is ``IfNotPresent`` for a version tag or a
    digest, ``Always`` for ``latest``;
  - the base model of a fresh workspace, ``--model`` and ``--pretrained`` (an OpenCLIP tag, whose weights must be
    in the image's Hugging Face cache, or an absolute checkpoint path, e.g. on the shared volume), in the
    Executors' ``uses_with`` and as ``CLIPTUNER_MODEL``/``CLIPTUNER_PRETRAINED``; the tuner publishes it once,
    when the registry is empty;
  - the tuner's ``keep_versions`` (``--keep-versions``, default 5): after each publish all but the newest N
    versions are deleted, never CURRENT;
  - the pod ``securityContext`` of the image's user: ``runAsUser``/``runAsGroup``/``fsGroup`` 10001,
    ``runAsNonRoot``, the runtime's default seccomp profile, and containers without privilege escalation or
    capabilities (the gateway's too);
  - init containers: ``fsGroup`` changes the owner of a block volume, but NFS and most ReadWriteMany volumes
    ignore it, so the pods that write the shared volume (the tuner and the gateway) first run
    ``workspace-owner`` from their own image: root with no capability but ``CHOWN`` (all others dropped, no
    privilege escalation), it gives ``/workspace`` and whichever of ``models/ data/ runs/ audit/`` exist to uid
    10001, without recursing, and exits; the services create the missing folders themselves. A volume that
    squashes root (NFS ``root_squash``) refuses the ``chown``: the container then accepts a world-writable folder
    and otherwise stops the pod with what to do. ``--no-workspace-chown`` leaves it out (a volume already writable
    by 10001, or a namespace whose Pod Security level is ``restricted``). The encoder and the indexer, which mount
    the volume read-only, wait in ``wait-for-model`` (uid 10001, no capabilities) until ``models/CURRENT``
    exists, instead of failing their start until the tuner has published the base version;
  - startup, readiness and liveness probes of the kind ``grpc`` (Kubernetes >= 1.24) on the container's gRPC
    port: every jina server registers the standard ``grpc.health.v1.Health`` service (the gateway's guard lets
    it through without a key), whose overall status (service ``""``) is SERVING from the moment the port is
    bound, which is after the Executor has loaded; the startup probe keeps the failure budget jina derived from
    ``timeout_ready`` (the gateway gets the largest one, since it binds its port only once it has reached the
    Executors). The kubelet's ``grpc`` probe speaks plaintext only, so a gateway with ``--tls-secret`` gets
    ``tcpSocket`` probes on the same port instead (the port accepts connections once the gateway has started);
  - resources: cpu and memory requests (memory also as the limit) per service, ``nvidia.com/gpu`` limits on the
    tuner and the encoder when asked; and threads that match the cpu request, not the node: ``OMP_NUM_THREADS``
    on every container, ``CLIPTUNER_TORCH_THREADS`` on the tuner (its training processes) and ONNX Runtime's
    ``intra_op_threads`` in the Executors' ``uses_with``, each the request rounded up, at least 1
    (:func:`cpu_threads`);
  - training on several nodes, only with ``--train-nodes N`` (N >= 1; default 0: each ``/train`` run trains in
    the tuner's pod, as its child processes): the tuner's ``uses_with`` gets ``train_cluster``, the fields of
    :class:`cliptuner.serve.cluster.TrainingCluster` (:meth:`K8sOptions.training_cluster`): the training image, the
    tuner's (``<prefix>tuner:<tag>``, its ``-gpu`` variant with ``--train-gpus-per-node G`` > 0, pinned by
    ``--digest train=sha256:...``, or by the tuner's digest where it is the same image), ``N`` nodes,
    ``--train-procs-per-node`` processes each (at most G when G > 0: one GPU per process), G GPUs, ``--train-cpu``
    and ``--train-memory`` per pod, the namespace and the shared claim (``--pvc-name``), which the training pods
    mount read-write at ``/workspace`` as uid 10001 (the tuner's ``workspace-owner`` gave the top folders to 10001,
    and the tuner creates each run's folder under ``runs/`` as 10001). Each run is then an Indexed Job of N pods
    that the tuner creates, follows and deletes through the API server, so its pod runs as the ServiceAccount
    ``cliptuner-tuner`` (:data:`cliptuner.serve.cluster.DEFAULT_SERVICE_ACCOUNT`) with its token mounted
    (``automountServiceAccountToken: true``), and its ``device`` is ``cuda`` with G > 0, else ``cpu`` (where the
    Job's pods train). ``--gpus-tuner`` is refused with it: the tuner's pod trains nothing then;
  - replicas: ``--encoder-replicas`` encoders (default 2); the tuner and every indexer (shard) stay at one
    replica and are replaced with the ``Recreate`` strategy, so that two of them never write the same files at
    once (one publisher of versions; one process per on-disk index and its ReadWriteOnce claim);
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
    ``tls.crt``/``tls.key`` as ``--ssl-certfile``/``--ssl-keyfile``. The search page and JSON API of
    ``cliptuner serve --http-port`` run in that command's own process, not in the gateway, so there is none here;
  - Prometheus: Jina's monitoring (``monitoring: true``, ``port_monitoring: 9090`` in flows/k8s.yml) starts a
    ``prometheus_client`` server in every pod, which answers on any path; jina adds a ``monitoring`` port to each
    Service, and this module declares that container port and annotates every pod with ``prometheus.io/scrape``,
    ``prometheus.io/port`` and ``prometheus.io/path``.
* ``training-rbac.yml`` only with ``--train-nodes``: :func:`cliptuner.serve.cluster.training_rbac`, the tuner's
  ServiceAccount, a Role that allows in this namespace only what a run needs (Jobs of ``batch``: create, get, list,
  watch, delete; Services: create, get, delete; Pods: get, list) and the RoleBinding between them.
* ``networkpolicies.yml``: a ``networking.k8s.io/v1`` NetworkPolicy per Deployment, selecting its pods by jina's
  ``app`` label: an Executor's pods accept gRPC only from the gateway's pods (a shard's only from its head's, which
  the gateway calls), the gateway accepts gRPC from anywhere or from the ``--gateway-from`` CIDRs, and every
  metrics port accepts scrapes from the pods of the namespace and of each ``--metrics-from-namespace``. With
  ``--train-nodes``, also :func:`cliptuner.serve.cluster.training_network_policy`: the training pods accept every TCP
  port from each other (rendezvous, the process group's store, gloo and NCCL on ephemeral ports) and nothing else.
  Egress is left open (Milvus, DNS, the tuner's calls to the API server). The kubelet's probes are not subject to
  them.
* ``ingress.yml`` only with ``--ingress-host``: a ``networking.k8s.io/v1`` Ingress for the gateway's gRPC port
  (``--ingress-class``, ``--ingress-tls-secret``), with the annotations ingress-nginx needs for gRPC
  (``backend-protocol: GRPC``, or ``GRPCS`` to a gateway with ``--tls-secret``; the gateway's 320 MiB message limit
  as its body size; day-long read and send timeouts for a synchronous ``/train``). Other controllers ignore them.
* ``servicemonitors.yml`` only with ``--service-monitor``: the Prometheus Operator ServiceMonitors jina writes
  for monitored services; left out by default because applying them fails on a cluster without that operator's
  CRDs, while the pod annotations need nothing.
* ``kustomization.yaml`` listing every file: ``kubectl apply -k DIR`` applies the whole set, ``kubectl
  kustomize DIR`` renders it.

The objects are written for Kubernetes :data:`KUBERNETES_VERSION` and newer;
tests/integration/test_k8s_manifests.py validates the rendered set strictly against that version's schemas
(``kubernetes-validate``), offline.
"""

from __future__ import annotations

import importlib.metadata
import ipaddress
import json
import math
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

KUBERNETES_VERSION = "1.29"  # the oldest Kubernetes the objects are validated against (kubernetes-validate, strict)
DEFAULT_GATEWAY_IMAGE = "jinaai/jina:3.34.0-py311-standard"  # what the export writes; replaced by the project's
FLOW_YAML = Path("flows") / "k8s.yml"
UID = 10001  # the Dockerfile's user `cliptuner`, which owns /workspace in the image
WORKSPACE = "/workspace"
WORKSPACE_VOLUME = "workspace"
WORKSPACE_DIRS = ("models", "data", "runs", "audit")  # registry, /train data, runs, the gateway's audit log
CURRENT_FILE = f"{WORKSPACE}/models/CURRENT"  # the registry's pointer to the served version
READ_ONLY = ("encoder", "indexer")  # they follow models/CURRENT and write nothing to the shared volume
INDEX_DIR = "/index"  # the indexer's index_dir: its own ReadWriteOnce claim
INDEX_VOLUME = "index"
INDEX_CLAIM_SUFFIX = "-store"  # the claim of indexer Deployment D is D-store (indexer-store, indexer-0-store, ...)
DEFAULT_INDEX_STORAGE = "10Gi"
METRICS_PATH = "/metrics"  # prometheus_client's server answers every path; /metrics is Prometheus' default
DEFAULT_METRICS_PORT = 9090  # jina's port_monitoring in Kubernetes
SINGLETONS = ("tuner", "indexer")  # one writer each of their files: one replica, Recreate on update
GPU_RESOURCE = "nvidia.com/gpu"
GPU_SUFFIX = "-gpu"  # tag suffix of the image variant with ONNX Runtime's CUDA build
GPU_BUILD_ARG = "ORT=onnxruntime-gpu[cuda,cudnn]"  # the Dockerfile's ORT: the CUDA build and its CUDA/cuDNN libraries
DEFAULT_RESOURCES = {  # service: (cpu request, memory request and limit)
    "tuner": ("2", "8Gi"),
    "encoder": ("1", "2Gi"),
    "indexer": ("500m", "2Gi"),
    "gateway": ("250m", "512Mi"),
}
OTHER_RESOURCES = ("500m", "1Gi")  # an Executor of a custom --flow that is none of the above
DEFAULT_TRAIN_RESOURCES = ("2", "8Gi")  # each training pod's cpu request, memory request and limit (--train-nodes)
TRAIN_DIGEST = "train"  # --digest train=sha256:... pins the training pods' image
# the TrainingCluster field -> the option it comes from, to name options in its errors (a field with "_" anywhere in
# the message, a short one only where the message starts with it)
TRAIN_OPTIONS = {
    "procs_per_node": "--train-procs-per-node",
    "gpus_per_node": "--train-gpus-per-node",
    "workspace_claim": "--pvc-name",
    "nodes": "--train-nodes",
    "cpu": "--train-cpu",
    "memory": "--train-memory",
    "namespace": "--namespace",
    "image": "the training image (--image-prefix, --tag)",
}
INIT_RESOURCES = {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}}
DEFAULT_MODEL = "cliptuner-tiny"  # flows/k8s.yml's base model (a bundled config, random init: works offline)
DEFAULT_KEEP_VERSIONS = 5
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
DAY_SECONDS = "86400"  # the Ingress's read/send timeouts: a synchronous /train may take hours
NAMESPACE_FILE = "namespace.yml"
PVC_FILE = "workspace-pvc.yml"
INDEX_PVC_FILE = "index-pvc.yml"
NETWORK_POLICY_FILE = "networkpolicies.yml"
INGRESS_FILE = "ingress.yml"
SERVICE_MONITOR_FILE = "servicemonitors.yml"
TRAINING_RBAC_FILE = "training-rbac.yml"
KUSTOMIZATION_FILE = "kustomization.yaml"

# the init container of the pods that write the shared volume: give it to uid 10001 (fsGroup is ignored on NFS),
# one level deep: the services create what is missing, as 10001, once the top is theirs
WORKSPACE_OWNER_SCRIPT = f"""\
set -u
cd {WORKSPACE}
for d in . {" ".join(WORKSPACE_DIRS)}; do
  [ -e "$d" ] || continue
  [ "$(stat -c %u "$d")" = {UID} ] && continue
  chown {UID}:{UID} "$d" && continue
  case "$(stat -c %A "$d")" in
    ????????w?) echo "workspace-owner: {WORKSPACE}/$d is not uid {UID}'s but writable by every user: left as it is" ;;
    *) echo "workspace-owner: cannot give {WORKSPACE}/$d to uid {UID} (a volume that squashes root, such as NFS \
with root_squash?): export it with no_root_squash, or give it to uid {UID} on the server and regenerate with \
--no-workspace-chown" >&2
       exit 1 ;;
  esac
done
"""
# the init container of the pods that mount it read-only: start once the tuner has published a version
WAIT_FOR_MODEL_SCRIPT = f"""\
n=0
until [ -f {CURRENT_FILE} ]; do
  [ $((n % 30)) = 0 ] && echo "wait-for-model: waiting for the tuner to publish {CURRENT_FILE}"
  n=$((n + 1))
  sleep 2
done
"""

# Kubernetes quantities and names (also checked by cliptuner.serve.cluster)
CPU_QUANTITY = re.compile(r"^([0-9]+m|[0-9]+(\.[0-9]+)?)$")
MEMORY_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_HOST = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_PREFIX = re.compile(r"^([a-z0-9][a-z0-9._/:-]*)?$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,255}$")  # an OpenCLIP arch or tag; no spaces
_PRETRAINED = re.compile(r"^/?[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,255}$")  # a tag, or an absolute path


@config_dataclass
class K8sOptions:
    """What ``cliptuner k8s`` generates; every field is one command-line option of the same name.

    A strict pydantic dataclass (:func:`cliptuner.options.config_dataclass`): a value of the wrong type or an
    unknown option is refused when it is built, and so is a bad value (:meth:`validate`), naming the option.

    Attributes:
        flow: the Flow YAML to export (default: flows/k8s.yml of the source tree, else of the current directory).
        namespace: the Kubernetes namespace of every object.
        image_prefix: images are ``<image_prefix><executor name or gateway>:<tag>``.
        tag: the images' tag; None: the package's version (:func:`default_tag`).
        digests: service name -> ``sha256:<hex>``: that service's image is pinned by digest.
        model: the base model of a fresh workspace: an OpenCLIP arch or a bundled config.
        pretrained: its pretrained tag or an absolute checkpoint path in the pod; None: random init.
        keep_versions: the tuner keeps the newest this many model versions (never deleting CURRENT); 0 keeps all.
        encoder_replicas: pods of the encoder Deployment.
        storage: size of the shared workspace claim.
        storage_class: its storage class (None: the cluster's default class).
        pvc_name: name of the shared workspace claim.
        index_storage: size of each indexer's ReadWriteOnce claim.
        index_storage_class: its storage class, a block storage one (None: the cluster's default class).
        workspace_chown: run the ``workspace-owner`` init container in the pods that write the shared volume.
        gpus_tuner: ``nvidia.com/gpu`` limit of the tuner pod (0: none); > 0 runs the ``-gpu`` image.
        gpus_encoder: ``nvidia.com/gpu`` limit of each encoder pod (0: none); > 0 runs the ``-gpu`` image.
        resources: service name -> (cpu request, memory request and limit); missing names take the defaults.
        service_monitor: also write jina's Prometheus Operator ServiceMonitors.
        milvus_uri: the indexer keeps its vectors in this Milvus server or cluster (``backend: milvus``); None:
            the embedded store on its own claim.
        milvus_token_secret: a Secret whose key ``token`` holds the Milvus token (``user:password``), given to
            the indexer as ``CLIPTUNER_MILVUS_TOKEN``; None: no token.
        keys_secret: the Secret whose key ``keys.json`` is the gateway's API keys file.
        insecure_no_auth: no keys Secret: the gateway serves every caller as admin (``keys_secret`` must be
            left at its default or None).
        tls_secret: a ``kubernetes.io/tls`` Secret (``tls.crt``, ``tls.key``): the gateway serves TLS; None:
            plaintext gRPC.
        gateway_from: CIDRs the gateway's gRPC port accepts connections from; empty: from anywhere.
        metrics_from_namespaces: namespaces (besides this one) whose pods may scrape the metrics ports.
        ingress_host: write an Ingress for the gateway's gRPC port on this host; None: no Ingress.
        ingress_class: the Ingress's ``ingressClassName`` (None: the cluster's default class).
        ingress_tls_secret: a ``kubernetes.io/tls`` Secret the Ingress controller terminates TLS with.
        train_nodes: 0: each ``/train`` run trains in the tuner's pod; N >= 1: each run is a Kubernetes Job of N pods
            (:mod:`cliptuner.serve.cluster`), and the tuner gets the service account and Role to run it.
        train_procs_per_node: training processes in each of those pods (torchrun's ``--nproc_per_node``).
        train_gpus_per_node: ``nvidia.com/gpu`` limit of each training pod (0: CPU training over gloo); > 0 runs the
            tuner's ``-gpu`` image with device ``cuda``, at most one process per GPU.
        train_cpu: cpu request of each training pod.
        train_memory: memory request and limit of each training pod.
    """

    flow: Optional[Path] = None
    namespace: str = "cliptuner"
    image_prefix: str = "cliptuner-"
    tag: Optional[str] = None
    digests: dict[str, str] = field(default_factory=dict)
    model: str = DEFAULT_MODEL
    pretrained: Optional[str] = None
    keep_versions: int = DEFAULT_KEEP_VERSIONS
    encoder_replicas: int = 2
    storage: str = "20Gi"
    storage_class: Optional[str] = None
    pvc_name: str = "cliptuner-workspace"
    index_storage: str = DEFAULT_INDEX_STORAGE
    index_storage_class: Optional[str] = None
    workspace_chown: bool = True
    gpus_tuner: int = 0
    gpus_encoder: int = 0
    resources: dict[str, tuple[str, str]] = field(default_factory=dict)
    service_monitor: bool = False
    milvus_uri: Optional[str] = None
    milvus_token_secret: Optional[str] = None
    keys_secret: Optional[str] = DEFAULT_KEYS_SECRET
    insecure_no_auth: bool = False
    tls_secret: Optional[str] = None
    gateway_from: tuple[str, ...] = ()
    metrics_from_namespaces: tuple[str, ...] = ()
    ingress_host: Optional[str] = None
    ingress_class: Optional[str] = None
    ingress_tls_secret: Optional[str] = None
    train_nodes: int = 0
    train_procs_per_node: int = 1
    train_gpus_per_node: int = 0
    train_cpu: str = DEFAULT_TRAIN_RESOURCES[0]
    train_memory: str = DEFAULT_TRAIN_RESOURCES[1]

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every option before anything is exported.

        Raises:
            ValueError: naming the first bad option and what it accepts.
        """
        if not DNS_LABEL.match(self.namespace):
            raise ValueError(
                f"--namespace {self.namespace!r}: must be a DNS label (lowercase letters, digits and "
                "'-', at most 63 characters)"
            )
        for option, name in (
            ("--pvc-name", self.pvc_name),
            ("--storage-class", self.storage_class),
            ("--index-storage-class", self.index_storage_class),
            ("--ingress-class", self.ingress_class),
        ):
            if name is not None and not DNS_SUBDOMAIN.match(name):
                raise ValueError(f"{option} {name!r}: must be a DNS subdomain (lowercase letters, digits, '-' and '.')")
        self._validate_images()
        self._validate_model()
        if self.keep_versions < 0:
            raise ValueError(f"--keep-versions {self.keep_versions}: must be 1 or more (0: keep every version)")
        if self.milvus_uri is not None and not re.match(r"^(https?|tcp)://[^\s/]+(:\d+)?/?$", self.milvus_uri):
            raise ValueError(
                f"--milvus-uri {self.milvus_uri!r}: must be a server address like http://milvus.milvus.svc:19530"
            )
        if self.milvus_token_secret is not None and self.milvus_uri is None:
            raise ValueError("--milvus-token-secret needs --milvus-uri")
        if self.insecure_no_auth and self.keys_secret not in (None, DEFAULT_KEYS_SECRET):
            raise ValueError(f"--keys-secret {self.keys_secret!r} and --insecure-no-auth exclude each other")
        if self.keys_secret is None and not self.insecure_no_auth:
            raise ValueError("--keys-secret: the gateway needs a Secret of API keys, or --insecure-no-auth")
        for option, secret in (
            ("--keys-secret", self.keys_secret),
            ("--tls-secret", self.tls_secret),
            ("--milvus-token-secret", self.milvus_token_secret),
            ("--ingress-tls-secret", self.ingress_tls_secret),
        ):
            if secret is not None and not DNS_SUBDOMAIN.match(secret):
                raise ValueError(f"{option} {secret!r}: must be a Secret name (a DNS subdomain)")
        if self.encoder_replicas < 1:
            raise ValueError(f"--encoder-replicas {self.encoder_replicas}: must be at least 1")
        for option, gpus in (("--gpus-tuner", self.gpus_tuner), ("--gpus-encoder", self.gpus_encoder)):
            if gpus < 0:
                raise ValueError(f"{option} {gpus}: must be 0 (no GPU) or more")
        for option, size in (("--storage", self.storage), ("--index-storage", self.index_storage)):
            if not MEMORY_QUANTITY.match(size):
                raise ValueError(f"{option} {size!r}: must be a Kubernetes quantity, e.g. 20Gi")
        for name, (cpu, memory) in self.resources.items():
            if not CPU_QUANTITY.match(cpu) or _cpus(cpu) <= 0:
                raise ValueError(f"--{name}-cpu {cpu!r}: must be a CPU quantity above 0, e.g. 2, 1.5 or 500m")
            if not MEMORY_QUANTITY.match(memory):
                raise ValueError(f"--{name}-memory {memory!r}: must be a memory quantity, e.g. 512Mi or 8Gi")
        self._validate_network()
        self._validate_training()

    def _validate_images(self) -> None:
        if not _PREFIX.match(self.image_prefix):
            raise ValueError(
                f"--image-prefix {self.image_prefix!r}: must be a lowercase image reference prefix, "
                "e.g. 'registry.example.com/team/cliptuner-'"
            )
        if self.tag is not None and (not _TAG.match(self.tag) or len(self.tag + GPU_SUFFIX) > 128):
            raise ValueError(
                f"--tag {self.tag!r}: must be an image tag (letters, digits, '_', '.' and '-', at most "
                f"{128 - len(GPU_SUFFIX)} characters, not starting with '.' or '-')"
            )
        for name, digest in self.digests.items():
            if not DNS_LABEL.match(name):
                raise ValueError(f"--digest {name}={digest}: {name!r} must be a service name, e.g. encoder")
            if not _DIGEST.match(digest):
                raise ValueError(f"--digest {name}={digest}: the digest must be sha256: and 64 lowercase hex digits")

    def _validate_model(self) -> None:
        if not _MODEL_NAME.match(self.model):
            raise ValueError(
                f"--model {self.model!r}: must be an OpenCLIP arch or a bundled config, e.g. ViT-B-32 (letters, "
                "digits and . _ - : / @ + =, no spaces)"
            )
        if self.pretrained is None:
            return
        if not _PRETRAINED.match(self.pretrained):
            raise ValueError(
                f"--pretrained {self.pretrained!r}: must be a pretrained tag, e.g. openai, or an absolute "
                "checkpoint path (letters, digits and . _ - : / @ + =, no spaces)"
            )
        if ("/" in self.pretrained or Path(self.pretrained).suffix) and not self.pretrained.startswith("/"):
            raise ValueError(
                f"--pretrained {self.pretrained!r}: a checkpoint must be an absolute path in the tuner's pod, "
                f"e.g. {WORKSPACE}/data/base.pt on the shared volume"
            )

    def _validate_network(self) -> None:
        for cidr in self.gateway_from:
            try:
                ipaddress.ip_network(cidr, strict=True)
            except ValueError as exc:
                raise ValueError(f"--gateway-from {cidr!r}: must be a CIDR, e.g. 10.0.0.0/8 ({exc})") from None
            if "/" not in cidr:
                raise ValueError(f"--gateway-from {cidr!r}: must be a CIDR with its prefix length, e.g. {cidr}/32")
        for namespace in self.metrics_from_namespaces:
            if not DNS_LABEL.match(namespace):
                raise ValueError(f"--metrics-from-namespace {namespace!r}: must be a namespace name (a DNS label)")
        if self.ingress_host is not None and not _HOST.match(self.ingress_host):
            raise ValueError(
                f"--ingress-host {self.ingress_host!r}: must be a DNS name, e.g. cliptuner.example.com "
                "(or *.example.com)"
            )
        for option, value in (
            ("--ingress-class", self.ingress_class),
            ("--ingress-tls-secret", self.ingress_tls_secret),
        ):
            if value is not None and self.ingress_host is None:
                raise ValueError(f"{option} needs --ingress-host")

    def _validate_training(self) -> None:
        if self.train_nodes < 0:
            raise ValueError(
                f"--train-nodes {self.train_nodes}: must be 0 (each run trains in the tuner's pod) or more (each run "
                "is a Job of that many pods)"
            )
        if self.train_nodes == 0:
            for option, value, default in (
                ("--train-procs-per-node", self.train_procs_per_node, 1),
                ("--train-gpus-per-node", self.train_gpus_per_node, 0),
                ("--train-cpu", self.train_cpu, DEFAULT_TRAIN_RESOURCES[0]),
                ("--train-memory", self.train_memory, DEFAULT_TRAIN_RESOURCES[1]),
            ):
                if value != default:
                    raise ValueError(f"{option} needs --train-nodes N (N >= 1: each run trains as a Job of N pods)")
            if TRAIN_DIGEST in self.digests:
                raise ValueError(
                    f"--digest {TRAIN_DIGEST}=...: pins the training pods' image, which needs --train-nodes"
                )
            return
        if self.gpus_tuner:
            raise ValueError(
                f"--gpus-tuner {self.gpus_tuner} and --train-nodes {self.train_nodes} exclude each other: with "
                "--train-nodes the runs train in the Job's pods, not in the tuner's, so give the GPUs to them "
                "(--train-gpus-per-node)"
            )
        if CPU_QUANTITY.match(self.train_cpu) and _cpus(self.train_cpu) <= 0:
            raise ValueError(f"--train-cpu {self.train_cpu!r}: must be a CPU quantity above 0, e.g. 2, 1.5 or 500m")
        gpu_image = self.train_gpus_per_node > 0
        if gpu_image and "tuner" in self.digests and TRAIN_DIGEST not in self.digests:
            raise ValueError(
                f"--digest tuner=...: pins the tuner's image {self.image('tuner')!r}, but the training pods run "
                f"its {GPU_SUFFIX} variant (--train-gpus-per-node): pin that one too, with --digest "
                f"{TRAIN_DIGEST}=sha256:..."
            )
        self.training_cluster()  # the checks of TrainingCluster itself, with the options named

    @property
    def image_tag(self) -> str:
        """The images' tag: ``tag``, else the package's version.

        Raises:
            ValueError: no ``tag`` and cliptuner is not installed (its version is unknown).
        """
        return self.tag if self.tag is not None else default_tag()

    def image(self, service: str, gpu: bool = False) -> str:
        """The image of ``service``: ``<prefix><service>:<tag>[-gpu][@sha256:...]``."""
        reference = f"{self.image_prefix}{service}:{self.image_tag}{GPU_SUFFIX if gpu else ''}"
        digest = self.digests.get(service)
        return f"{reference}@{digest}" if digest else reference

    def training_image(self) -> str:
        """The training pods' image: the tuner's, ``-gpu`` with ``train_gpus_per_node``; pinned by ``--digest train``,
        else by the tuner's digest where it is the tuner's own image."""
        gpu = self.train_gpus_per_node > 0
        reference = f"{self.image_prefix}tuner:{self.image_tag}{GPU_SUFFIX if gpu else ''}"
        digest = self.digests.get(TRAIN_DIGEST) or (None if gpu != (self.gpus_tuner > 0) else self.digests.get("tuner"))
        return f"{reference}@{digest}" if digest else reference

    def training_cluster(self) -> Optional[dict[str, Any]]:
        """The tuner's ``train_cluster`` setting (the fields of :class:`cliptuner.serve.cluster.TrainingCluster`), or
        None when runs train in the tuner's pod (``train_nodes`` 0).

        Raises:
            ValueError: the fields make no valid TrainingCluster (its error, with the options named).
        """
        if self.train_nodes == 0:
            return None
        from cliptuner.serve.cluster import TrainingCluster  # cluster imports this module's constants

        settings: dict[str, Any] = {
            "image": self.training_image(),
            "nodes": self.train_nodes,
            "procs_per_node": self.train_procs_per_node,
            "gpus_per_node": self.train_gpus_per_node,
            "cpu": self.train_cpu,
            "memory": self.train_memory,
            "namespace": self.namespace,
            "workspace_claim": self.pvc_name,
            "service_account": None,  # the training pods never talk to the API server (no token is mounted)
        }
        try:
            TrainingCluster(**settings)
        except ValueError as exc:
            raise ValueError(_with_option_names(str(exc))) from None
        return settings

    @property
    def gateway_keys_secret(self) -> Optional[str]:
        """The Secret the gateway mounts as its keys file; None with ``insecure_no_auth``."""
        return None if self.insecure_no_auth else self.keys_secret

    def resources_of(self, name: str) -> tuple[str, str]:
        """The (cpu, memory) of service ``name``: its option, else its default, else :data:`OTHER_RESOURCES`."""
        return self.resources.get(name) or DEFAULT_RESOURCES.get(name, OTHER_RESOURCES)

    def gpus_of(self, name: str) -> int:
        """The GPUs an Executor named ``name`` reserves (the tuner's and the encoder's options; else 0)."""
        return {"tuner": self.gpus_tuner, "encoder": self.gpus_encoder}.get(name, 0)


def _with_option_names(message: str) -> str:
    """A :class:`~cliptuner.serve.cluster.TrainingCluster` error with its fields named as the options they come from."""
    for name, option in TRAIN_OPTIONS.items():
        message = re.sub(rf"\b{name}\b" if "_" in name else rf"^{name}\b", option, message)
    return message


def default_tag() -> str:
    """The package's version as an image tag (a character a tag cannot hold, such as PEP 440's ``+``, becomes ``-``).

    Raises:
        ValueError: cliptuner is not installed, so its version is unknown.
    """
    try:
        version = importlib.metadata.version("cliptuner")
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            "--tag: cliptuner is not installed, so its version (the default tag) is unknown; pass --tag"
        ) from None
    return re.sub(r"[^A-Za-z0-9_.-]", "-", version)


def _cpus(cpu: str) -> float:
    """A CPU quantity (``500m``, ``1.5``, ``2``) in CPUs."""
    return float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)


def cpu_threads(cpu: str) -> int:
    """The threads of a container whose cpu request is ``cpu``: rounded up, at least 1 (``500m`` -> 1, ``1.5`` -> 2)."""
    return max(1, math.ceil(_cpus(cpu)))


def pull_policy(image: str) -> str:
    """``IfNotPresent`` for an image pinned by digest or by a version tag; ``Always`` for ``latest`` (or none)."""
    if "@sha256:" in image:
        return "IfNotPresent"
    name = image.rsplit("/", 1)[-1]
    tag = name.split(":", 1)[1] if ":" in name else "latest"
    return "Always" if tag in ("latest", "latest" + GPU_SUFFIX) else "IfNotPresent"


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


def _service_name(deployment: dict[str, Any]) -> str:
    """The jina deployment a Deployment belongs to: ``indexer`` for ``indexer``, ``indexer-0`` and ``indexer-head``."""
    labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    return str(labels.get("jina_deployment_name") or deployment["metadata"]["name"])


def _selector(deployment: dict[str, Any]) -> dict[str, str]:
    """The labels that select a Deployment's pods (jina's ``app: <deployment name>``)."""
    return dict(deployment["spec"]["selector"]["matchLabels"])


def _ports(deployment: dict[str, Any]) -> tuple[int, Optional[int]]:
    """(gRPC port, metrics port or None) of a Deployment's pods, from its first container's args."""
    args = [str(a) for a in deployment["spec"]["template"]["spec"]["containers"][0].get("args", [])]
    grpc_port = int(_arg(args, "--port") or 8080)
    metrics = int(_arg(args, "--port-monitoring") or DEFAULT_METRICS_PORT) if "--monitoring" in args else None
    return grpc_port, metrics


def index_claim_name(deployment: dict[str, Any]) -> str:
    """The ReadWriteOnce claim of an indexer Deployment: ``<deployment name>-store``."""
    return f"{deployment['metadata']['name']}{INDEX_CLAIM_SUFFIX}"


def _set_env(container: dict[str, Any], name: str, value: str) -> None:
    """Set ``name`` in a container's env: replaced where it is, else appended."""
    container["env"] = [*(e for e in container.get("env", []) if e.get("name") != name), {"name": name, "value": value}]


def _complete_deployment(deployment: dict[str, Any], options: K8sOptions, startup_failures: int) -> None:
    """Complete one jina Deployment in place: image, replicas, volumes, init containers, security, probes,
    resources and threads, Executor settings, metrics.

    Args:
        deployment: the Deployment object, as loaded from jina's YAML.
        options: what to generate.
        startup_failures: the startup probe's failure budget (periods of 5 s).
    """
    spec = deployment["spec"]
    pod = spec["template"]
    pod_spec = pod["spec"]
    name = _service_name(deployment)
    pod_type = _pod_type(deployment)
    is_executor = pod_type == "WORKER"
    is_gateway = pod_type == "GATEWAY"
    read_only = is_executor and name in READ_ONLY
    has_index = is_executor and name == "indexer"

    if name == "encoder" and is_executor:
        spec["replicas"] = options.encoder_replicas
    if name in SINGLETONS and is_executor:
        spec["replicas"] = 1
        spec["strategy"] = {"type": "Recreate"}  # never two writers of the same files, nor two mounts of one RWO claim

    pod_spec["securityContext"] = {
        "runAsUser": UID,
        "runAsGroup": UID,
        "runAsNonRoot": True,
        "fsGroup": UID,
        "fsGroupChangePolicy": "OnRootMismatch",  # chown a big volume once, not at every start
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    workspace_mount: dict[str, Any] = {"name": WORKSPACE_VOLUME, "mountPath": WORKSPACE}
    if read_only:
        workspace_mount["readOnly"] = True
    if is_executor or is_gateway:
        pod_spec["volumes"] = [
            *pod_spec.get("volumes", []),
            {"name": WORKSPACE_VOLUME, "persistentVolumeClaim": {"claimName": options.pvc_name}},
        ]
    if has_index:
        pod_spec["volumes"].append(
            {"name": INDEX_VOLUME, "persistentVolumeClaim": {"claimName": index_claim_name(deployment)}}
        )
    tls = is_gateway and options.tls_secret is not None
    gpus = options.gpus_of(name) if is_executor else 0
    cpu, memory = options.resources_of(name)
    threads = cpu_threads(cpu)

    metrics_port: Optional[int] = None
    for container in pod_spec["containers"]:
        args = [str(a) for a in container.get("args", [])]
        container["args"] = args
        if is_executor:
            container["image"] = options.image(name, gpu=gpus > 0)
            _set_arg(args, "--replicas", str(spec["replicas"]))
            mounts = [*container.get("volumeMounts", []), dict(workspace_mount)]
            if has_index:
                mounts.append({"name": INDEX_VOLUME, "mountPath": INDEX_DIR})
            container["volumeMounts"] = mounts
            _complete_executor(container, name, options, gpus, threads)
        if is_gateway:
            _complete_gateway(pod_spec, container, options)
        container["imagePullPolicy"] = pull_policy(str(container["image"]))
        _set_env(container, "OMP_NUM_THREADS", str(threads))
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

        resources: dict[str, dict[str, str]] = {
            "requests": {"cpu": cpu, "memory": memory},
            "limits": {"memory": memory},
        }
        if gpus:
            resources["limits"][GPU_RESOURCE] = str(gpus)
        container["resources"] = resources

    if is_executor and name == "tuner" and options.train_nodes:
        _complete_training_tuner(pod_spec)

    if is_executor or is_gateway:
        image = str(pod_spec["containers"][0]["image"])
        if read_only:
            pod_spec["initContainers"] = [_wait_for_model(image)]
        elif options.workspace_chown:
            pod_spec["initContainers"] = [_workspace_owner(image)]

    if metrics_port is not None:
        pod["metadata"]["annotations"] = {
            **pod["metadata"].get("annotations", {}),
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(metrics_port),
            "prometheus.io/path": METRICS_PATH,
        }


def _complete_executor(container: dict[str, Any], name: str, options: K8sOptions, gpus: int, threads: int) -> None:
    """Set an Executor container's settings (``--uses-with``) and env: base model, threads, GPU, retention, index.

    Only the project's Executors (tuner, encoder, indexer) get the settings they take; an Executor of a custom
    ``--flow`` gets ``OMP_NUM_THREADS`` only (set by the caller).
    """
    args = container["args"]
    uses_with = json.loads(_arg(args, "--uses-with") or "{}")
    if name in ("tuner", *READ_ONLY):
        # the base of a fresh registry (only a service that bootstraps it reads them: the tuner here)
        uses_with.update(model=options.model, pretrained=options.pretrained, intra_op_threads=threads)
        _set_env(container, "CLIPTUNER_MODEL", options.model)
        _set_env(container, "CLIPTUNER_PRETRAINED", options.pretrained or "")
    if gpus:
        uses_with["device"] = "cuda"  # fail at start, rather than serve on the CPU behind a reserved GPU
    if name == "tuner":
        uses_with["keep_versions"] = options.keep_versions or None
        _set_env(container, "CLIPTUNER_TORCH_THREADS", str(threads))
        train_cluster = options.training_cluster()
        if train_cluster is not None:
            uses_with["train_cluster"] = train_cluster
            # the tuner's device is where its runs train: in the Job's pods, on their GPUs or on their CPUs (a pod
            # that reserved none must not pick a GPU of its node that the device plugin gave to another pod)
            uses_with["device"] = "cuda" if options.train_gpus_per_node else "cpu"
    if name == "indexer":
        uses_with["index_dir"] = INDEX_DIR
        if options.milvus_uri is not None:
            uses_with.update(backend="milvus", milvus_uri=options.milvus_uri)
            if options.milvus_token_secret is not None:
                container["env"] = [
                    *container.get("env", []),
                    {
                        "name": "CLIPTUNER_MILVUS_TOKEN",
                        "valueFrom": {"secretKeyRef": {"name": options.milvus_token_secret, "key": "token"}},
                    },
                ]
    _put_arg(args, "--uses-with", json.dumps(uses_with))


def _complete_training_tuner(pod_spec: dict[str, Any]) -> None:
    """Give the tuner's pod the service account that :func:`cliptuner.serve.cluster.training_rbac` binds to the Role
    of the training Jobs, and its token (the tuner reaches the API server with it: ``KubeAPI.in_cluster``)."""
    from cliptuner.serve.cluster import DEFAULT_SERVICE_ACCOUNT  # cluster imports this module's constants

    pod_spec["serviceAccountName"] = DEFAULT_SERVICE_ACCOUNT
    pod_spec["automountServiceAccountToken"] = True  # whatever the service account says: the tuner needs it


def _init_container(
    name: str, image: str, script: str, security: dict[str, Any], read_only: bool = False
) -> dict[str, Any]:
    """An init container that runs ``sh -c script`` from ``image`` with the shared volume mounted."""
    mount: dict[str, Any] = {"name": WORKSPACE_VOLUME, "mountPath": WORKSPACE}
    if read_only:
        mount["readOnly"] = True
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": pull_policy(image),
        "command": ["sh", "-c", script],
        "securityContext": security,
        "resources": json.loads(json.dumps(INIT_RESOURCES)),
        "volumeMounts": [mount],
    }


def _workspace_owner(image: str) -> dict[str, Any]:
    """``workspace-owner``: root with only ``CAP_CHOWN`` gives the shared volume's top folders to uid 10001."""
    return _init_container(
        "workspace-owner",
        image,
        WORKSPACE_OWNER_SCRIPT,
        {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
        },
    )


def _wait_for_model(image: str) -> dict[str, Any]:
    """``wait-for-model``: the pod's user, no capabilities, waits until the tuner has published a version."""
    return _init_container(
        "wait-for-model",
        image,
        WAIT_FOR_MODEL_SCRIPT,
        {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        read_only=True,
    )


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
    container["image"] = options.image("gateway")
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


def _claim(name: str, options: K8sOptions, access: str, size: str, storage_class: Optional[str]) -> dict[str, Any]:
    """A PersistentVolumeClaim of ``size`` with one access mode, in the cluster's default class unless named."""
    claim: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": options.namespace},
        "spec": {"accessModes": [access], "resources": {"requests": {"storage": size}}},
    }
    if storage_class:
        claim["spec"]["storageClassName"] = storage_class
    return claim


def _tcp(port: int) -> dict[str, Any]:
    return {"protocol": "TCP", "port": port}


def _network_policies(deployments: list[dict[str, Any]], options: K8sOptions) -> list[dict[str, Any]]:
    """One NetworkPolicy per Deployment: who may open its gRPC port and scrape its metrics port.

    An Executor's gRPC port: the gateway's pods, or for a shard of a sharded Executor its head's pods (the gateway
    calls the head, the head the shards). The gateway's: anyone, or the ``gateway_from`` CIDRs. Every metrics
    port: the pods of this namespace and of the ``metrics_from_namespaces``. Egress stays open.
    """
    gateway_pods = next(_selector(d) for d in deployments if _pod_type(d) == "GATEWAY")
    heads = {_service_name(d): _selector(d) for d in deployments if _pod_type(d) == "HEAD"}
    scrapers: list[dict[str, Any]] = [{"podSelector": {}}]
    scrapers += [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}
        for namespace in options.metrics_from_namespaces
    ]
    policies = []
    for deployment in deployments:
        grpc_port, metrics_port = _ports(deployment)
        pod_type = _pod_type(deployment)
        grpc_rule: dict[str, Any] = {"ports": [_tcp(grpc_port)]}
        if pod_type == "GATEWAY":
            if options.gateway_from:
                grpc_rule["from"] = [{"ipBlock": {"cidr": cidr}} for cidr in options.gateway_from]
        else:
            callers = heads.get(_service_name(deployment)) if pod_type == "WORKER" else None
            grpc_rule["from"] = [{"podSelector": {"matchLabels": callers or gateway_pods}}]
        rules = [grpc_rule]
        if metrics_port is not None and metrics_port != grpc_port:
            rules.append({"from": scrapers, "ports": [_tcp(metrics_port)]})
        policies.append(
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": f"{deployment['metadata']['name']}-ingress", "namespace": options.namespace},
                "spec": {
                    "podSelector": {"matchLabels": _selector(deployment)},
                    "policyTypes": ["Ingress"],
                    "ingress": rules,
                },
            }
        )
    return policies


def _ingress(gateway: dict[str, Any], service: dict[str, Any], options: K8sOptions) -> dict[str, Any]:
    """The Ingress of the gateway's gRPC port on ``options.ingress_host``, annotated for ingress-nginx.

    The body size is unlimited (``0``): ingress-nginx counts a gRPC stream's messages together, and the gateway
    refuses each message above its own limit before deserialising it; the read and send timeouts are a day, since
    a synchronous ``/train`` answers when its run has ended.
    """
    grpc_port, _ = _ports(gateway)
    service_port = next(
        (int(p["port"]) for p in service["spec"]["ports"] if int(p.get("targetPort", p["port"])) == grpc_port),
        grpc_port,
    )
    host = str(options.ingress_host)
    spec: dict[str, Any] = {
        "rules": [
            {
                "host": host,
                "http": {
                    "paths": [
                        {
                            "path": "/",
                            "pathType": "Prefix",
                            "backend": {
                                "service": {"name": service["metadata"]["name"], "port": {"number": service_port}}
                            },
                        }
                    ]
                },
            }
        ]
    }
    if options.ingress_class:
        spec["ingressClassName"] = options.ingress_class
    if options.ingress_tls_secret:
        spec["tls"] = [{"hosts": [host], "secretName": options.ingress_tls_secret}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {
            "name": gateway["metadata"]["name"],
            "namespace": options.namespace,
            "annotations": {
                "nginx.ingress.kubernetes.io/backend-protocol": "GRPCS" if options.tls_secret else "GRPC",
                "nginx.ingress.kubernetes.io/proxy-body-size": "0",
                "nginx.ingress.kubernetes.io/proxy-read-timeout": DAY_SECONDS,
                "nginx.ingress.kubernetes.io/proxy-send-timeout": DAY_SECONDS,
            },
        },
        "spec": spec,
    }


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
        _service_name(d)
        for docs in exported.values()
        for d in docs
        if d.get("kind") == "Deployment" and _pod_type(d) == "WORKER"
    }
    for option, executor, asked in (
        ("--encoder-replicas", "encoder", options.encoder_replicas != 2),
        ("--train-nodes", "tuner", options.train_nodes > 0),
        ("--gpus-tuner", "tuner", options.gpus_tuner > 0),
        ("--gpus-encoder", "encoder", options.gpus_encoder > 0),
    ):
        if asked and executor not in workers:
            raise ValueError(f"{option}: the Flow has no Executor named {executor!r} (it has {sorted(workers)})")
    pinnable = workers | {"gateway"} | ({TRAIN_DIGEST} if options.train_nodes else set())
    for service in options.digests:
        if service not in pinnable:
            raise ValueError(
                f"--digest {service}=...: the Flow has no service named {service!r} (it has {sorted(pinnable)})"
            )

    docs_all = [d for docs in exported.values() for d in docs]
    startup = max([_startup_failures(d) for d in docs_all if d.get("kind") == "Deployment"] or [120])

    services: dict[str, list[dict[str, Any]]] = {}
    deployments: list[dict[str, Any]] = []
    index_claims: list[dict[str, Any]] = []
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
                deployments.append(doc)
                if _pod_type(doc) == "WORKER" and _service_name(doc) == "indexer":
                    index_claims.append(
                        _claim(
                            index_claim_name(doc),
                            options,
                            "ReadWriteOnce",
                            options.index_storage,
                            options.index_storage_class,
                        )
                    )
            kept.append(doc)
        services[f"{service}.yml"] = kept

    manifests: dict[str, list[dict[str, Any]]] = {
        NAMESPACE_FILE: [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": options.namespace}}],
        PVC_FILE: [_claim(options.pvc_name, options, "ReadWriteMany", options.storage, options.storage_class)],
    }
    if index_claims:
        manifests[INDEX_PVC_FILE] = index_claims
    if options.train_nodes:
        from cliptuner.serve.cluster import training_rbac  # cluster imports this module's constants

        manifests[TRAINING_RBAC_FILE] = training_rbac(options.namespace)
    manifests.update(services)
    manifests[NETWORK_POLICY_FILE] = _network_policies(deployments, options)
    if options.train_nodes:
        from cliptuner.serve.cluster import training_network_policy

        manifests[NETWORK_POLICY_FILE].append(training_network_policy(options.namespace))
    if options.ingress_host is not None:
        gateway = next(d for d in deployments if _pod_type(d) == "GATEWAY")
        gateway_service = next(
            d
            for d in exported["gateway"]
            if d.get("kind") == "Service" and d["metadata"]["name"] == gateway["metadata"]["name"]
        )
        manifests[INGRESS_FILE] = [_ingress(gateway, gateway_service, options)]
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
            f"# ONE replica per indexer (shard): its index is on its own ReadWriteOnce claim at {INDEX_DIR} "
            f"({INDEX_PVC_FILE}); /workspace is read-only."
        )
    if file_name == "encoder.yml":
        lines.append(
            f"# {options.encoder_replicas} encoder replica(s) (--encoder-replicas; kubectl scale works too); each "
            "follows /workspace/models/CURRENT, mounted read-only."
        )
    if file_name == "tuner.yml" and options.train_nodes:
        lines.append(
            f"# --train-nodes {options.train_nodes}: each /train run is a Kubernetes Job of {options.train_nodes} "
            f"pod(s) x {options.train_procs_per_node} process(es), created by the tuner as its service account "
            f"({TRAINING_RBAC_FILE}); the tuner trains nothing itself."
        )
    if file_name == TRAINING_RBAC_FILE:
        lines.append(
            "# The tuner's ServiceAccount and the Role it runs the training Jobs with (--train-nodes), in this "
            "namespace only: Jobs and their headless Services created, read and deleted, Pods read."
        )
    if file_name == PVC_FILE:
        lines.append(
            "# Shared at /workspace (models/ data/ runs/ audit/): needs a storage class that offers ReadWriteMany. "
            "The tuner and the gateway write it; the encoder and the indexer mount it read-only."
        )
    if file_name == INDEX_PVC_FILE:
        lines.append(
            "# One ReadWriteOnce claim per indexer (shard) for its SQLite + HNSW index: use a block storage class, "
            "never NFS (SQLite's WAL needs local locking)."
        )
    if file_name == NETWORK_POLICY_FILE:
        lines.append(
            "# Enforced by a network plugin that implements NetworkPolicy (Calico, Cilium, ...); elsewhere they are "
            "accepted and do nothing."
        )
        if options.train_nodes:
            lines.append(
                "# The training Jobs' pods (--train-nodes) accept every TCP port from each other only (rendezvous, "
                "gloo, NCCL); egress stays open, the tuner's to the API server too."
            )
    if file_name == INGRESS_FILE:
        lines.append(
            "# gRPC through the Ingress: the annotations are ingress-nginx's (others ignore them); ingress-nginx "
            "serves gRPC (HTTP/2) on its TLS port only."
        )
    if file_name == "gateway.yml":
        lines.extend(_gateway_header(options))
    if file_name == KUSTOMIZATION_FILE:
        lines.append(
            f"# kubectl apply -k <this folder>   (kubectl kustomize <this folder> renders it); Kubernetes >= "
            f"{KUBERNETES_VERSION}."
        )
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
            + yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, explicit_start=False)
        )
        written.append(path)
    return written


class _Dumper(yaml.SafeDumper):
    """YAML as ``yaml.safe_dump`` writes it, but text of several lines (the init containers' scripts) as a literal
    block, readable in the file."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _represent_str)


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
