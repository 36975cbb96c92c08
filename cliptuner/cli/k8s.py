"""The ``cliptuner k8s`` command: Kubernetes manifests for the services, from flows/k8s.yml.

What is written and why is described in :mod:`cliptuner.serve.k8s`, which renders them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cliptuner.serve import k8s

K8S_EPILOG = """\
written into DIR:
  namespace.yml        the Namespace
  workspace-pvc.yml    the shared ReadWriteMany claim, mounted at /workspace in every pod
  tuner.yml encoder.yml indexer.yml gateway.yml
                       jina's ConfigMap, Service and Deployment per service, completed: volume, uid/gid/fsGroup
                       10001 (the image's user), gRPC startup/readiness/liveness probes, cpu/memory (and GPU)
                       resources, Prometheus annotations and metrics port, the images; the gateway runs
                       CLIPGateway (API keys, roles, audit log in /workspace/audit) with the keys Secret
                       mounted at /etc/cliptuner/keys (and the TLS Secret at /etc/cliptuner/tls)
  servicemonitors.yml  with --service-monitor only (needs the Prometheus Operator's CRDs)
  kustomization.yaml   lists them all

examples:
  cliptuner k8s --out k8s/
  cliptuner k8s --out k8s/ --image-prefix registry.example.com/ml/cliptuner- --tag 0.1.0 \\
      --storage-class nfs-client --gpus-tuner 1 --gpus-encoder 1 --encoder-replicas 4
  cliptuner k8s --out k8s/ --milvus-uri http://milvus.milvus.svc:19530 --milvus-token-secret milvus-token
  cliptuner k8s --out k8s/ --tls-secret cliptuner-tls
  kubectl apply -k k8s/

API keys (the gateway does not start without the Secret, unless --insecure-no-auth):
  cliptuner keys create --role admin --name ci --keys-file keys.json
  kubectl -n cliptuner create secret generic cliptuner-keys --from-file=keys.json
Rotate or revoke: edit keys.json (cliptuner keys create/revoke), then
  kubectl -n cliptuner create secret generic cliptuner-keys --from-file=keys.json --dry-run=client -o yaml \\
      | kubectl apply -f -
(the kubelet updates the mounted file in place; the gateway reads it again, no restart)

Build and push one image per Executor, and the gateway's, first (see the Dockerfile):
  docker build --build-arg EXECUTOR=CLIPTuner -t cliptuner-tuner .    (CLIPEncoder, CLIPIndexer likewise)
  docker build --build-arg TRAIN=0 -t cliptuner-gateway .
The probes are Kubernetes' native gRPC probes (Kubernetes >= 1.24); tcpSocket on a gateway with --tls-secret.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cliptuner k8s``: its options, each with its default, and what it writes.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers`` returned.
    """
    p = subparsers.add_parser(
        "k8s",
        help="write Kubernetes manifests for the services (flows/k8s.yml)",
        description=(k8s.__doc__ or "").split("\n\n")[0].replace("``", ""),
        epilog=K8S_EPILOG,
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
    p.add_argument(
        "--image-prefix",
        default="cliptuner-",
        help="images are <prefix><executor or gateway>:<tag>, e.g. a registry path "
        "'registry.example.com/ml/cliptuner-' (default: cliptuner-)",
    )
    p.add_argument("--tag", default="latest", help="tag of the images (default: latest)")
    p.add_argument(
        "--encoder-replicas",
        type=int,
        default=2,
        metavar="N",
        help="encoder pods (default: 2); the tuner and the indexer always run one pod each: the "
        "indexer's collection is one index on the shared volume",
    )
    p.add_argument("--storage", default="20Gi", help="size of the shared workspace claim (default: 20Gi)")
    p.add_argument(
        "--storage-class",
        default=None,
        help="storage class of the claim; it must offer ReadWriteMany, e.g. NFS, CephFS, EFS, Azure "
        "Files (default: the cluster's default class)",
    )
    p.add_argument(
        "--pvc-name", default="cliptuner-workspace", help="name of the workspace claim (default: cliptuner-workspace)"
    )
    p.add_argument(
        "--gpus-tuner",
        type=int,
        default=0,
        metavar="N",
        help="nvidia.com/gpu limit of the tuner pod (default: 0, none; build its image with "
        "--build-arg ORT=onnxruntime-gpu)",
    )
    p.add_argument(
        "--gpus-encoder",
        type=int,
        default=0,
        metavar="N",
        help="nvidia.com/gpu limit of each encoder pod (default: 0, none)",
    )
    for name, (cpu, memory) in k8s.DEFAULT_RESOURCES.items():
        p.add_argument(f"--{name}-cpu", default=cpu, help=f"cpu request of the {name} (default: {cpu}; no limit)")
        p.add_argument(
            f"--{name}-memory", default=memory, help=f"memory request and limit of the {name} (default: {memory})"
        )
    p.add_argument(
        "--milvus-uri",
        default=None,
        help="keep the index's vectors in this Milvus server or cluster, e.g. "
        "http://milvus.milvus.svc:19530 (default: the embedded store on the shared volume)",
    )
    p.add_argument(
        "--milvus-token-secret",
        default=None,
        metavar="SECRET",
        help="a Secret whose key 'token' holds the Milvus token (user:password), passed to the indexer "
        "as CLIPTUNER_MILVUS_TOKEN",
    )
    access = p.add_mutually_exclusive_group()
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
    p.add_argument(
        "--tls-secret",
        default=None,
        metavar="SECRET",
        help="a kubernetes.io/tls Secret (tls.crt, tls.key): the gateway serves gRPC over TLS with it, mounted "
        f"read-only at {k8s.TLS_DIR}; its probes become tcpSocket (default: plaintext)",
    )
    p.add_argument(
        "--service-monitor",
        action="store_true",
        help="also write jina's Prometheus Operator ServiceMonitors (servicemonitors.yml; needs that "
        "operator's CRDs; the pod annotations work without)",
    )
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace) -> k8s.K8sOptions:
    """The :class:`~cliptuner.serve.k8s.K8sOptions` of parsed ``cliptuner k8s`` arguments."""
    return k8s.K8sOptions(
        flow=Path(args.flow) if args.flow else None,
        namespace=args.namespace,
        image_prefix=args.image_prefix,
        tag=args.tag,
        encoder_replicas=args.encoder_replicas,
        storage=args.storage,
        storage_class=args.storage_class,
        pvc_name=args.pvc_name,
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
