"""The ``cliptuner serve`` command: the Flow of ``flows/flow.yml`` (gRPC gateway, tuner, encoder, indexer).

Each option sets a ``CLIPTUNER_*`` variable (cliptuner/settings.py) that the Flow and its Executors read; an option
left out keeps the variable's value from the environment. ``--metrics-port`` adds Prometheus monitoring to the Flow
(:func:`cliptuner.serve.flows.flow_config`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

SERVE_ENV = {
    "host": "CLIPTUNER_HOST",
    "port": "CLIPTUNER_PORT",
    "workspace": "CLIPTUNER_WORKSPACE",
    "model": "CLIPTUNER_MODEL",
    "pretrained": "CLIPTUNER_PRETRAINED",
    "device": "CLIPTUNER_DEVICE",
    "metrics_port": "CLIPTUNER_METRICS_PORT",
    "metrics_host": "CLIPTUNER_METRICS_HOST",
    "index_backend": "CLIPTUNER_INDEX_BACKEND",
    "milvus_uri": "CLIPTUNER_MILVUS_URI",
    "milvus_token": "CLIPTUNER_MILVUS_TOKEN",
    "index_shards": "CLIPTUNER_INDEX_SHARDS",
    "batch_wait_ms": "CLIPTUNER_BATCH_WAIT_MS",
    "http_port": "CLIPTUNER_HTTP_PORT",
    "keys_file": "CLIPTUNER_KEYS_FILE",
    "tls_cert": "CLIPTUNER_TLS_CERT",
    "tls_key": "CLIPTUNER_TLS_KEY",
    "insecure_no_auth": "CLIPTUNER_INSECURE_NO_AUTH",
    "auto_train": "CLIPTUNER_AUTO_TRAIN",
}
LOOPBACK = ("127.0.0.1", "::1", "localhost")
METRICS_PORTS = ("GATEWAY", "TUNER", "ENCODER", "INDEXER")  # --metrics-port P: their Prometheus ports P, P+1, ...
DEFAULT_HOST = "127.0.0.1"  # this machine only; a container sets CLIPTUNER_HOST=0.0.0.0 and publishes the port
FLOW_YAML = Path("flows") / "flow.yml"
SHARDS_FLOW_YAML = Path("flows") / "shards.yml"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cliptuner serve``: its options, each with the ``CLIPTUNER_*`` variable it sets."""
    p = subparsers.add_parser("serve", help="start the gRPC services (flows/flow.yml) and block")
    p.add_argument(
        "--host",
        default=None,
        help=f"address the gateway listens on (CLIPTUNER_HOST; default {DEFAULT_HOST}: this machine only; "
        "0.0.0.0: every interface)",
    )
    p.add_argument("--port", type=int, default=None, help="gRPC port (CLIPTUNER_PORT; default 51000)")
    p.add_argument("--workspace", default=None, help="models/, index/, data/, runs/ (CLIPTUNER_WORKSPACE)")
    p.add_argument(
        "--model", default=None, help="base model of a fresh workspace (CLIPTUNER_MODEL; default cliptuner-tiny)"
    )
    p.add_argument("--pretrained", default=None, help="its pretrained tag or checkpoint (CLIPTUNER_PRETRAINED)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (CLIPTUNER_DEVICE; default auto)")
    p.add_argument("--flow", default=None, help="the Flow YAML (default: flows/flow.yml)")
    p.add_argument(
        "--index-backend",
        default=None,
        choices=("auto", "exact", "usearch", "milvus"),
        help="the indexer's vector store (CLIPTUNER_INDEX_BACKEND; default auto: embedded in the "
        'workspace); milvus needs pip install "cliptuner[milvus]"',
    )
    p.add_argument(
        "--milvus-uri",
        default=None,
        help="with --index-backend milvus: the Milvus server, e.g. http://milvus:19530 "
        "(CLIPTUNER_MILVUS_URI; default: Milvus Lite, a file in the workspace's index)",
    )
    p.add_argument(
        "--milvus-token", default=None, help="the Milvus server's token, user:password (CLIPTUNER_MILVUS_TOKEN)"
    )
    p.add_argument(
        "--index-shards",
        type=int,
        default=None,
        metavar="N",
        help="split the index into N shards, each its own process and collection (CLIPTUNER_INDEX_SHARDS; "
        "default 1). N > 1 serves flows/shards.yml unless --flow says otherwise; embedded "
        "backends only",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=None,
        metavar="MS",
        help="how long the encoder lets a small request wait for others to share one model run "
        "(CLIPTUNER_BATCH_WAIT_MS; default 2; 0 turns dynamic batching off)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="turn on Prometheus metrics (CLIPTUNER_METRICS_PORT): the gateway serves them on this port, "
        "the tuner, encoder and indexer on the next three, on --metrics-host. Default: off",
    )
    p.add_argument(
        "--metrics-host",
        default=None,
        help="address the metrics ports listen on (CLIPTUNER_METRICS_HOST; default: the gateway's --host)",
    )
    p.add_argument(
        "--http-port",
        type=int,
        default=None,
        metavar="P",
        help="also serve HTTP on this port of the same host (CLIPTUNER_HTTP_PORT): the search page at / "
        'and a JSON API, POST /post {"execEndpoint": "/search", "data": [...], '
        '"parameters": {...}}, forwarded to the gRPC gateway (cliptuner/serve/http_front.py). Default: off',
    )
    p.add_argument(
        "--auto-train",
        default=None,
        metavar="JSON",
        help='train on the search feedback by itself (CLIPTUNER_AUTO_TRAIN), e.g. \'{"min_events": 200, '
        '"min_queries": 50, "check_every_s": 30, "parameters": {"epochs": 3}}\': after that many new /feedback '
        "events over that many distinct queries, a gated /train on the feedback starts in the background. "
        "Default: off",
    )
    p.add_argument(
        "--keys-file",
        default=None,
        metavar="FILE",
        help="API keys (CLIPTUNER_KEYS_FILE; made by `cliptuner keys create`): every call needs "
        "'authorization: Bearer <key>' with a role that allows its endpoint; the file is read again when it "
        "changes. Default: no keys, every caller may do everything, allowed only on 127.0.0.1",
    )
    p.add_argument(
        "--insecure-no-auth",
        action="store_true",
        default=None,
        help="serve an address other than 127.0.0.1 without API keys (CLIPTUNER_INSECURE_NO_AUTH); anyone who "
        "reaches the port may then retrain, roll back or delete",
    )
    p.add_argument(
        "--tls-cert",
        default=None,
        metavar="PEM",
        help="serve the gRPC gateway and the HTTP front over TLS with this certificate (CLIPTUNER_TLS_CERT); "
        "the file holds the chain up to its root (a self-signed certificate is its own)",
    )
    p.add_argument("--tls-key", default=None, metavar="PEM", help="the private key of --tls-cert (CLIPTUNER_TLS_KEY)")
    p.set_defaults(func=run_serve)


def check_access(environment: Any) -> Optional[str]:
    """Refuse settings that would expose the service, and say how it is protected.

    Returns:
        The line ``serve`` prints about access (open on this machine, or the number of keys).

    Raises:
        ValueError: a non-loopback ``--host`` without ``--keys-file`` or ``--insecure-no-auth`` (names both fixes);
            a keys file that cannot be read; only one of ``--tls-cert``/``--tls-key``, or one that is not a file.
    """
    from cliptuner.serve.keys import KeyRing

    cert, key = environment.tls_cert, environment.tls_key
    if (cert is None) != (key is None):
        raise ValueError("--tls-cert and --tls-key go together: pass both (or neither)")
    for name, path in (("--tls-cert", cert), ("--tls-key", key)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{name} {str(path)!r} is not a file")
    if environment.keys_file is None:
        if environment.host not in LOOPBACK and not environment.insecure_no_auth:
            raise ValueError(
                f"refusing to serve {environment.host} without API keys: anyone who reaches it could retrain, roll "
                "back or delete. Make a key with `cliptuner keys create --role admin --keys-file keys.json` and "
                "pass --keys-file keys.json (CLIPTUNER_KEYS_FILE), or pass --insecure-no-auth to serve it open"
            )
        if environment.host in LOOPBACK:
            return "no API keys (--keys-file): open to every caller on this machine"
        return f"no API keys (--insecure-no-auth): OPEN to every caller that reaches {environment.host}"
    records = KeyRing(environment.keys_file).records()
    active = [r for r in records if r.revoked is None]
    if not active:
        return f"API keys required; the keys file {str(environment.keys_file)!r} holds no key in force yet"
    return f"API keys required ({len(active)} in force)"


def _tls_client_roots(cert: Optional[Path]) -> None:
    """Let this process's own gRPC clients (readiness check, HTTP front) trust the gateway's certificate."""
    if cert is not None:
        os.environ["GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"] = str(Path(cert).resolve())


def _default_flow(name: Path = FLOW_YAML) -> Path:
    """``flows/flow.yml`` (or ``name``) of the source tree this package runs from, else of the current directory."""
    beside = Path(__file__).resolve().parents[2] / name
    return beside if beside.is_file() else name.resolve()


def _wait_until_answering(
    host: str, port: int, timeout: float = 120.0, key: Optional[str] = None, tls: bool = False
) -> None:
    """Send ``/status`` through the started Flow until every Executor answers it.

    Jina calls a Flow ready when each of its processes is up; a sharded indexer's head may still be reconnecting
    to a shard it tried before the shard listened, and would fail the first requests. ``serve`` announces itself
    only once a request has gone all the way through.

    Raises:
        RuntimeError: no full answer within ``timeout`` seconds (the last error is named).
    """
    from docarray import DocList
    from jina import Client

    from cliptuner.serve.http_front import local_address
    from executors.schemas import ClipDoc

    client = Client(host=local_address(host), port=port, protocol="grpc", tls=tls)
    metadata = (("authorization", f"Bearer {key}"),) if key else None
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.post("/status", return_type=DocList[ClipDoc], metadata=metadata)
            return
        except Exception as exc:  # BadServer while a shard is unreachable, a connection error before that
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the Flow started but did not answer /status within {timeout:.0f} s: {exc}"
                ) from None
            time.sleep(0.5)


def bind_metrics(host: str) -> None:
    """Make the Prometheus servers of the Flow's processes listen on ``host`` only.

    Jina starts each one with ``prometheus_client.start_http_server(port, registry=...)``, whose address defaults to
    every interface, and has no option for it. It looks the function up when it starts the server, in the process
    of each gateway and Executor, which the Flow forks from this one: replacing the module's function here gives them
    all this address.

    Raises:
        ValueError: processes are not forked (``JINA_MP_START_METHOD``), so the address could not reach them.
    """
    import multiprocessing

    import prometheus_client

    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_context().get_start_method()
    if method != "fork":
        raise ValueError(
            f"--metrics-port needs the Flow's processes forked (multiprocessing start method {method!r}, "
            "JINA_MP_START_METHOD): only then do the metrics ports listen on --metrics-host"
        )
    start = getattr(prometheus_client.start_http_server, "__wrapped__", prometheus_client.start_http_server)

    def start_http_server(port: int, addr: str = host, *args: Any, **kwargs: Any) -> Any:
        return start(port, host, *args, **kwargs)

    start_http_server.__wrapped__ = start  # type: ignore[attr-defined]
    prometheus_client.start_http_server = start_http_server


def run_serve(args: argparse.Namespace) -> None:
    """``cliptuner serve``: start the Flow of ``flows/flow.yml`` (gRPC gateway, tuner, encoder, indexer) and block.

    Each option sets its ``CLIPTUNER_*`` variable, which the Flow and its Executors read; an option left out keeps
    the variable's value from the environment. The gateway listens on ``127.0.0.1`` unless ``--host`` or
    ``CLIPTUNER_HOST`` says otherwise (``0.0.0.0``: every interface); the Executors of ``flows/flow.yml`` always
    listen on ``127.0.0.1``, where only the gateway talks to them. Stops on Ctrl-C or SIGTERM.
    """
    import signal
    import threading

    from cliptuner.serve.flows import flow_config
    from cliptuner.serve.keys import hash_key, new_key
    from cliptuner.settings import ServiceEnvironment

    given = {
        name: "1" if getattr(args, option) is True else str(getattr(args, option))
        for option, name in SERVE_ENV.items()
        if getattr(args, option, None) is not None
    }
    environment = ServiceEnvironment.from_environ({**os.environ, **given})  # every variable checked before anything
    shards = environment.index_shards
    flow_path = Path(args.flow) if args.flow else _default_flow(SHARDS_FLOW_YAML if shards > 1 else FLOW_YAML)
    if not flow_path.is_file():
        raise ValueError(f"no Flow YAML at {str(flow_path)!r}; pass --flow PATH")
    if environment.workspace is None:
        raise ValueError("no workspace: pass --workspace DIR or set CLIPTUNER_WORKSPACE")
    workspace = environment.workspace.resolve()
    host, port, http_port = environment.host, environment.port, environment.http_port
    if http_port is not None and http_port == port:
        raise ValueError(f"--http-port / CLIPTUNER_HTTP_PORT must differ from the gRPC port, got {http_port} for both")
    access = check_access(environment)
    if environment.keys_file is not None:
        given["CLIPTUNER_KEYS_FILE"] = str(Path(environment.keys_file).resolve())
    ready_key, ready_id = new_key()  # serve's own key for its readiness check: role search, only its hash leaves
    os.environ.update(CLIPTUNER_INTERNAL_KEY=f"{ready_id}:{hash_key(ready_key)}")
    tls = None
    if environment.tls_cert is not None and environment.tls_key is not None:
        tls = (Path(environment.tls_cert).resolve(), Path(environment.tls_key).resolve())
        _tls_client_roots(tls[0])
    os.environ.update(given)  # the Executors, child processes of the Flow, read them
    os.environ.update(  # what the Flow YAMLs name, as the Flow expands them
        CLIPTUNER_HOST=host,
        CLIPTUNER_PORT=str(port),
        CLIPTUNER_WORKSPACE=str(workspace),
        CLIPTUNER_INDEX_SHARDS=str(shards),
    )
    os.environ.setdefault("JINA_OPTOUT_TELEMETRY", "1")

    from jina import Flow

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    metrics = environment.metrics_ports()
    if metrics:
        bind_metrics(environment.metrics_host or host)
    flow = Flow.load_config(flow_config(flow_path, metrics, tls=tls, keepalive_ms=environment.grpc_keepalive_ms))
    with flow:
        _wait_until_answering(host, port, key=ready_key, tls=tls is not None)
        http = None
        if http_port is not None:  # the JSON API and the search page, in this process, in front of the gRPC gateway
            from cliptuner.serve.audit import AuditLog
            from cliptuner.serve.http_front import HttpFront, JinaGateway
            from cliptuner.serve.keys import KeyRing
            from executors.options import Workspace, uri_policy
            from executors.schemas import ClipDoc

            front_workspace = Workspace(root=workspace, registry=None)  # type: ignore[arg-type]
            http = HttpFront(
                host,
                http_port,
                JinaGateway(host, port, ClipDoc, tls=tls is not None),
                uri_policy(front_workspace),
                keyring=KeyRing(environment.keys_file),  # the gateway's keys; its refusals in the gateway's audit log
                audit=AuditLog(workspace / "audit", max_bytes=environment.audit_max_bytes),
                tls=tls,
            )
            http.start()
        also = f", http {host}:{http_port} (search page and JSON API)" if http is not None else ""
        secure = " over TLS" if tls else ""
        print(
            f"cliptuner serving on grpc {host}:{port}{also}{secure} (workspace {workspace}); {access}; Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        try:
            flow.block(stop_event=stop)
        finally:
            if http is not None:
                http.stop()


run = run_serve
