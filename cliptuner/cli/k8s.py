"""The ``cliptuner k8s`` command: Kubernetes manifests for the services, from flows/k8s.yml.

What is written and why is described in :mod:`cliptuner.serve.k8s`, which renders them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from cliptuner.serve import k8s

K8S_EPILOG = """\
written into DIR:
  namespace.yml        the Namespace
  workspace-pvc.yml    the shared ReadWriteMany claim at /workspace: models/ (the registry), data/, runs/, audit/;
                       read-write in the tuner and the gateway, read-only in the encoder and the indexer
  index-pvc.yml        a ReadWriteOnce claim per indexer (per shard) at /index, its index_dir (SQLite + HNSW:
                       block storage, never NFS); kept with --milvus-uri for the docs' image bytes
  tuner.yml encoder.yml indexer.yml gateway.yml
                       jina's ConfigMap, Service and Deployment per service, completed: images pinned to a
                       version tag (or digest), uid/gid/fsGroup 10001, init containers (workspace-owner chowns
                       the shared volume's top folders in the tuner and gateway pods; wait-for-model holds the
                       encoder and indexer until models/CURRENT exists), gRPC probes, cpu/memory (and GPU)
                       resources with threads to match, base model and version retention, Prometheus port and
                       annotations; the gateway runs CLIPGateway (API keys, roles, audit log) with the keys
                       Secret at /etc/cliptuner/keys (and the TLS Secret at /etc/cliptuner/tls)
  training-rbac.yml    with --train-nodes only: the tuner's ServiceAccount (cliptuner-tuner, its token mounted in
                       the tuner's pod) and the Role it creates, follows and deletes the training Jobs with
  networkpolicies.yml  Executors accept gRPC from the gateway only; the gateway from anywhere or --gateway-from;
                       metrics ports from this namespace and --metrics-from-namespace; with --train-nodes, the
                       training pods accept TCP from each other only (egress stays open: the API server, DNS)
  ingress.yml          with --ingress-host only: gRPC to the gateway (ingress-nginx annotations)
  servicemonitors.yml  with --service-monitor only (needs the Prometheus Operator's CRDs)
  kustomization.yaml   lists them all

examples:
  cliptuner k8s --out k8s/
  cliptuner k8s --out k8s/ --image-prefix registry.example.com/ml/cliptuner- --model ViT-B-32 --pretrained openai \\
      --storage-class nfs-client --index-storage-class standard-rwo --gpus-encoder 1 --encoder-replicas 4
  cliptuner k8s --out k8s/ --digest encoder=sha256:<64 hex digits> --digest gateway=sha256:<...>
  cliptuner k8s --out k8s/ --milvus-uri http://milvus.milvus.svc:19530 --milvus-token-secret milvus-token
  cliptuner k8s --out k8s/ --train-nodes 2 --train-gpus-per-node 1     (each /train run: a Job of 2 GPU pods)
  cliptuner k8s --out k8s/ --ingress-host clip.example.com --ingress-class nginx --ingress-tls-secret clip-tls \\
      --metrics-from-namespace monitoring
  kubectl apply -k k8s/

API keys (the gateway does not start without the Secret, unless --insecure-no-auth):
  cliptuner keys create --role admin --name ci --keys-file keys.json
  kubectl -n cliptuner create secret generic cliptuner-keys --from-file=keys.json
Rotate or revoke: edit keys.json (cliptuner keys create/revoke), then
  kubectl -n cliptuner create secret generic cliptuner-keys --from-file=keys.json --dry-run=client -o yaml \\
      | kubectl apply -f -
(the kubelet updates the mounted file in place; the gateway reads it again, no restart)

Build and push one image per Executor, and the gateway's, first, tagged with the version (see the Dockerfile):
  docker build --build-arg EXECUTOR=CLIPTuner -t cliptuner-tuner:{tag} .
  docker build --build-arg EXECUTOR=CLIPEncoder --build-arg TRAIN=0 -t cliptuner-encoder:{tag} .   (CLIPIndexer likewise)
  docker build --build-arg TRAIN=0 -t cliptuner-gateway:{tag} .
and, for the pods that reserve GPUs (--gpus-encoder, --gpus-tuner, --train-gpus-per-node), the -gpu variant with
ONNX Runtime's CUDA build:
  docker build --build-arg EXECUTOR=CLIPEncoder --build-arg TRAIN=0 --build-arg "{gpu_arg}" \\
      -t cliptuner-encoder:{tag}-gpu .
  docker build --build-arg EXECUTOR=CLIPTuner --build-arg "{gpu_arg}" -t cliptuner-tuner:{tag}-gpu .
(the training pods of --train-nodes run the tuner's image, its -gpu variant with --train-gpus-per-node).
Kubernetes >= {kubernetes}: the probes are native gRPC probes (tcpSocket on a gateway with --tls-secret).
"""


def _epilog() -> str:
    """:data:`K8S_EPILOG` with the default tag (the package's version, or ``TAG`` when it is not installed)."""
    try:
        tag = k8s.default_tag()
    except ValueError:
        tag = "TAG"
    return K8S_EPILOG.format(tag=tag, gpu_arg=k8s.GPU_BUILD_ARG, kubernetes=k8s.KUBERNETES_VERSION)


def _digest(text: str) -> tuple[str, str]:
    """``NAME=sha256:...`` as (NAME, digest); the digest itself is checked by :class:`~cliptuner.serve.k8s.K8sOptions`."""
    name, sep, digest = text.partition("=")
    if not sep or not name or not digest:
        raise argparse.ArgumentTypeError(f"{text!r}: must be NAME=sha256:<64 hex digits>, e.g. encoder=sha256:...")
    return name, digest


def _optional(text: str) -> Optional[str]:
    """A value where ``none`` (or nothing) means None."""
    return None if text.strip().lower() in ("", "none") else text


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cliptuner k8s``: its options, each with its default, and what it writes.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers`` returned.
    """
    p = subparsers.add_parser(
        "k8s",
        help="write Kubernetes manifests for the services (flows/k8s.yml)",
        description=(k8s.__doc__ or "").split("\n\n")[0].replace("``", ""),
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder to write the manifests into (created; it may hold only files of an earlier run)",
    )
    p.add_argument("--flow", default=None, help="the Flow YAML to export (default: flows/k8s.yml)")
    p.add_argument("--namespace", default="cliptuner", help="namespace of every object (default: cliptuner)")
    images = p.add_argument_group("images")
    images.add_argument(
        "--image-prefix",
        default="cliptuner-",
        help="images are <prefix><executor or gateway>:<tag>, e.g. a registry path "
        "'registry.example.com/ml/cliptuner-' (default: cliptuner-)",
    )
    images.add_argument(
        "--tag",
        default=None,
        help="tag of the images (default: the package's version; 'latest' makes the pods pull at every start)",
    )
    images.add_argument(
        "--digest",
        action="append",
        type=_digest,
        default=[],
        metavar="NAME=sha256:...",
        help="pin the image of service NAME (tuner, encoder, indexer, gateway; train: the training pods' image "
        "with --train-nodes) by digest, image@sha256:...; repeatable (default: by tag)",
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--model",
        default=k8s.DEFAULT_MODEL,
        metavar="ARCH",
        help="base model of a fresh workspace, published by the tuner: an OpenCLIP arch, e.g. ViT-B-32, or a "
        f"bundled config (default: {k8s.DEFAULT_MODEL})",
    )
    model.add_argument(
        "--pretrained",
        default=None,
        type=_optional,
        metavar="TAG_OR_PATH",
        help="its pretrained tag (weights from the image's Hugging Face cache), or an absolute checkpoint path in "
        f"the tuner's pod, e.g. {k8s.WORKSPACE}/data/base.pt (default: none, random init)",
    )
    model.add_argument(
        "--keep-versions",
        type=int,
        default=k8s.DEFAULT_KEEP_VERSIONS,
        metavar="N",
        help="the tuner keeps the newest N model versions on the volume, never deleting CURRENT; 0 keeps all "
        f"(default: {k8s.DEFAULT_KEEP_VERSIONS})",
    )
    p.add_argument(
        "--encoder-replicas",
        type=int,
        default=2,
        metavar="N",
        help="encoder pods (default: 2); the tuner and the indexer always run one pod each (the indexer one per "
        "shard: its index is on its own ReadWriteOnce claim)",
    )
    storage = p.add_argument_group("storage")
    storage.add_argument("--storage", default="20Gi", help="size of the shared workspace claim (default: 20Gi)")
    storage.add_argument(
        "--storage-class",
        default=None,
        help="storage class of the shared claim; it must offer ReadWriteMany, e.g. NFS, CephFS, EFS, Azure "
        "Files (default: the cluster's default class)",
    )
    storage.add_argument(
        "--pvc-name", default="cliptuner-workspace", help="name of the workspace claim (default: cliptuner-workspace)"
    )
    storage.add_argument(
        "--index-storage",
        default=k8s.DEFAULT_INDEX_STORAGE,
        help=f"size of each indexer's ReadWriteOnce claim (default: {k8s.DEFAULT_INDEX_STORAGE})",
    )
    storage.add_argument(
        "--index-storage-class",
        default=None,
        help="storage class of the indexer claims: block storage, not NFS (default: the cluster's default class)",
    )
    storage.add_argument(
        "--no-workspace-chown",
        dest="workspace_chown",
        action="store_false",
        help="leave out the workspace-owner init container (root, CAP_CHOWN only) for a volume that uid 10001 "
        "can already write, or a namespace with the 'restricted' Pod Security level (default: included)",
    )
    resources = p.add_argument_group("resources")
    resources.add_argument(
        "--gpus-tuner",
        type=int,
        default=0,
        metavar="N",
        help="nvidia.com/gpu limit of the tuner pod; > 0 runs the image <prefix>tuner:<tag>-gpu (built with "
        f"--build-arg {k8s.GPU_BUILD_ARG}) with device cuda (default: 0, none)",
    )
    resources.add_argument(
        "--gpus-encoder",
        type=int,
        default=0,
        metavar="N",
        help="nvidia.com/gpu limit of each encoder pod; > 0 runs the image <prefix>encoder:<tag>-gpu (built with "
        f"--build-arg {k8s.GPU_BUILD_ARG}) with device cuda (default: 0, none)",
    )
    for name, (cpu, memory) in k8s.DEFAULT_RESOURCES.items():
        resources.add_argument(
            f"--{name}-cpu",
            default=cpu,
            help=f"cpu request of the {name}, no limit; its threads are this rounded up (default: {cpu})",
        )
        resources.add_argument(
            f"--{name}-memory", default=memory, help=f"memory request and limit of the {name} (default: {memory})"
        )
    training = p.add_argument_group(
        "training on several nodes",
        "each /train run as a Kubernetes Job of N pods that train together (torchrun); see docs/training.md",
    )
    training.add_argument(
        "--train-nodes",
        type=int,
        default=0,
        metavar="N",
        help="N >= 1: each run is a Job of N pods, created by the tuner with its service account "
        f"({k8s.TRAINING_RBAC_FILE}); 0: runs train inside the tuner's pod (default: 0)",
    )
    training.add_argument(
        "--train-procs-per-node",
        type=int,
        default=1,
        metavar="P",
        help="training processes in each pod; at most --train-gpus-per-node when that is > 0 (default: 1)",
    )
    training.add_argument(
        "--train-gpus-per-node",
        type=int,
        default=0,
        metavar="G",
        help="nvidia.com/gpu limit of each training pod; > 0 runs the image <prefix>tuner:<tag>-gpu with device "
        "cuda (default: 0, CPU training)",
    )
    train_cpu, train_memory = k8s.DEFAULT_TRAIN_RESOURCES
    training.add_argument(
        "--train-cpu", default=train_cpu, metavar="CPU", help=f"cpu request of each training pod (default: {train_cpu})"
    )
    training.add_argument(
        "--train-memory",
        default=train_memory,
        metavar="MEMORY",
        help=f"memory request and limit of each training pod (default: {train_memory})",
    )
    p.add_argument(
        "--milvus-uri",
        default=None,
        help="keep the index's vectors in this Milvus server or cluster, e.g. "
        "http://milvus.milvus.svc:19530 (default: the embedded store on the indexer's claim)",
    )
    p.add_argument(
        "--milvus-token-secret",
        default=None,
        metavar="SECRET",
        help="a Secret whose key 'token' holds the Milvus token (user:password), passed to the indexer "
        "as CLIPTUNER_MILVUS_TOKEN",
    )
    gateway = p.add_argument_group("gateway")
    access = gateway.add_mutually_exclusive_group()
    access.add_argument(
        "--keys-secret",
        default=k8s.DEFAULT_KEYS_SECRET,
        metavar="SECRET",
        help="the Secret whose key 'keys.json' is the gateway's API keys file (cliptuner keys create), mounted "
        f"read-only at {k8s.KEYS_DIR} (default: {k8s.DEFAULT_KEYS_SECRET})",
    )
    access.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="no keys Secret: the gateway serves every caller that reaches it as admin (train, roll back, delete)",
    )
    gateway.add_argument(
        "--tls-secret",
        default=None,
        metavar="SECRET",
        help="a kubernetes.io/tls Secret (tls.crt, tls.key): the gateway serves gRPC over TLS with it, mounted "
        f"read-only at {k8s.TLS_DIR}; its probes become tcpSocket (default: plaintext)",
    )
    network = p.add_argument_group("network")
    network.add_argument(
        "--gateway-from",
        action="append",
        default=[],
        metavar="CIDR",
        help="the gateway's gRPC port accepts connections from this CIDR only (repeatable; include the Ingress "
        "controller's pods when it is used) (default: from anywhere)",
    )
    network.add_argument(
        "--metrics-from-namespace",
        action="append",
        default=[],
        metavar="NAMESPACE",
        help="the pods of this namespace (e.g. where Prometheus runs) may scrape the metrics ports too; "
        "repeatable (default: only this namespace's pods)",
    )
    network.add_argument(
        "--ingress-host",
        default=None,
        metavar="HOST",
        help="write an Ingress for the gateway's gRPC port on HOST (default: none)",
    )
    network.add_argument(
        "--ingress-class", default=None, help="the Ingress's ingressClassName (default: the cluster's default)"
    )
    network.add_argument(
        "--ingress-tls-secret",
        default=None,
        metavar="SECRET",
        help="a kubernetes.io/tls Secret for HOST that the Ingress controller terminates TLS with (ingress-nginx "
        "serves gRPC on its TLS port only) (default: none)",
    )
    p.add_argument(
        "--service-monitor",
        action="store_true",
        help="also write jina's Prometheus Operator ServiceMonitors (servicemonitors.yml; needs that "
        "operator's CRDs; the pod annotations work without)",
    )
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace) -> k8s.K8sOptions:
    """The :class:`~cliptuner.serve.k8s.K8sOptions` of parsed ``cliptuner k8s`` arguments.

    Raises:
        ValueError: a bad option (named), or a service given twice to ``--digest``.
    """
    digests: dict[str, str] = {}
    for name, digest in args.digest:
        if name in digests:
            raise ValueError(f"--digest {name}=...: given twice")
        digests[name] = digest
    return k8s.K8sOptions(
        flow=Path(args.flow) if args.flow else None,
        namespace=args.namespace,
        image_prefix=args.image_prefix,
        tag=args.tag,
        digests=digests,
        model=args.model,
        pretrained=args.pretrained,
        keep_versions=args.keep_versions,
        encoder_replicas=args.encoder_replicas,
        storage=args.storage,
        storage_class=args.storage_class,
        pvc_name=args.pvc_name,
        index_storage=args.index_storage,
        index_storage_class=args.index_storage_class,
        workspace_chown=args.workspace_chown,
        gpus_tuner=args.gpus_tuner,
        gpus_encoder=args.gpus_encoder,
        resources={
            name: (getattr(args, f"{name}_cpu"), getattr(args, f"{name}_memory")) for name in k8s.DEFAULT_RESOURCES
        },
        service_monitor=args.service_monitor,
        milvus_uri=args.milvus_uri,
        milvus_token_secret=args.milvus_token_secret,
        keys_secret=None if args.insecure_no_auth else args.keys_secret,
        insecure_no_auth=args.insecure_no_auth,
        tls_secret=args.tls_secret,
        gateway_from=tuple(args.gateway_from),
        metrics_from_namespaces=tuple(args.metrics_from_namespace),
        ingress_host=args.ingress_host,
        ingress_class=args.ingress_class,
        ingress_tls_secret=args.ingress_tls_secret,
        train_nodes=args.train_nodes,
        train_procs_per_node=args.train_procs_per_node,
        train_gpus_per_node=args.train_gpus_per_node,
        train_cpu=args.train_cpu,
        train_memory=args.train_memory,
    )


def run(args: argparse.Namespace) -> list[Path]:
    """``cliptuner k8s``: write the manifests and say how to apply them.

    Args:
        args: the parsed command line.

    Returns:
        The written files.
    """
    out = Path(args.out)
    written = k8s.generate(out, options_from_args(args))
    for path in written:
        print(path)
    print(f"apply with: kubectl apply -k {out}", file=sys.stderr)
    return written
