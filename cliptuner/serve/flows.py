"""The Flow configuration ``cliptuner serve`` starts: a Flow YAML, with Prometheus monitoring added when asked.

The Flow YAMLs (flows/) name only the variables they need; metrics are off there. :func:`flow_config` loads one
as a mapping (its ``${{ ENV.X }}`` left for Jina to expand), makes its ``py_modules`` absolute (the mapping has no
folder of its own), and, given ports, turns on ``monitoring`` for the gateway and for each Executor it names;
given a certificate and key, the gateway serves TLS.

Keepalive: Jina's gRPC channels ping every 10 s (``grpc.keepalive_time_ms`` 9999, also on a connection whose only
call is a long ``/train`` that sends nothing), but the options meant to let a server accept those pings are
``grpc.http1.*`` keys that gRPC does not read. A server that keeps gRPC's defaults takes a ping within 5 minutes of
the last one, with no data between them, as a strike and, after two, closes the connection (GOAWAY
``ENHANCE_YOUR_CALM`` / ``too_many_pings``); the gateway then re-sends the request. The Flow YAMLs therefore set
the HTTP/2 keys gRPC reads — on every server (``grpc_server_options``, which the Executors inherit from the Flow's
``with``) and on the gateway's channels (``grpc_channel_options``) — and :func:`flow_config` sets them on any Flow
(:data:`KEEPALIVE_SERVER_OPTIONS`, :data:`KEEPALIVE_CHANNEL_OPTIONS`), at the interval ``keepalive_ms`` when given.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import yaml

GATEWAY = "gateway"
KEEPALIVE_MS = 10_000  # Jina's channels ping every 9999 ms
# what every gRPC server of the Flow accepts: pings twice as often as the channels send them, data or not
KEEPALIVE_SERVER_OPTIONS = {"grpc.http2.min_ping_interval_without_data_ms": KEEPALIVE_MS // 2}
# the gateway's channels keep pinging through a long quiet call (gRPC stops after 2 pings without data by default),
# so a lost Executor is noticed within keepalive + timeout
KEEPALIVE_CHANNEL_OPTIONS = {"grpc.http2.max_pings_without_data": 0}


def keepalive_options(keepalive_ms: int) -> tuple[dict[str, int], dict[str, int]]:
    """The ``(server, channel)`` gRPC options of a Flow whose gateway pings its Executors every ``keepalive_ms``."""
    server = {**KEEPALIVE_SERVER_OPTIONS, "grpc.http2.min_ping_interval_without_data_ms": max(1, keepalive_ms // 2)}
    channel = {**KEEPALIVE_CHANNEL_OPTIONS, "grpc.keepalive_time_ms": keepalive_ms}
    return server, channel


def flow_config(
    path: Path,
    metrics_ports: Mapping[str, int],
    tls: Optional[tuple[Path, Path]] = None,
    keepalive_ms: Optional[int] = None,
) -> dict[str, Any]:
    """The Flow YAML at ``path`` as a mapping for ``jina.Flow.load_config``, with monitoring on the given ports.

    Args:
        path: the Flow YAML.
        metrics_ports: ``gateway`` and Executor names -> their Prometheus port; empty: monitoring stays off.
            An Executor of the Flow that is not named keeps the YAML's settings.
        tls: ``(certificate, private key)``: the gateway serves TLS with them.
        keepalive_ms: the gateway's ping interval (None: Jina's, 10 s); the servers accept pings at half of it.

    Returns:
        The Flow's mapping.

    Raises:
        ValueError: the file does not hold a Flow mapping (names the file).
    """
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict) or config.get("jtype") != "Flow":
        raise ValueError(f"{str(path)!r} is not a Flow YAML (jtype: Flow)")
    executors = config.get("executors") or []
    gateway = config.get(GATEWAY)
    server, channel = (KEEPALIVE_SERVER_OPTIONS, KEEPALIVE_CHANNEL_OPTIONS)
    if keepalive_ms is not None:
        server, channel = keepalive_options(keepalive_ms)
    given = config["with"] = config.get("with") or {}
    for key, options in (("grpc_server_options", server), ("grpc_channel_options", channel)):
        own = given.get(key) or {}  # the YAML's options win, unless an interval was asked for
        given[key] = {**own, **options} if keepalive_ms is not None else {**options, **own}
    for member in [*executors, *([gateway] if isinstance(gateway, dict) else [])]:  # their own options win
        if member.get("grpc_server_options"):
            member["grpc_server_options"] = {**given["grpc_server_options"], **member["grpc_server_options"]}
    for member in [*executors, *([gateway] if isinstance(gateway, dict) else [])]:
        modules = member.get("py_modules")
        if modules:
            modules = [modules] if isinstance(modules, str) else modules
            member["py_modules"] = [str((path.parent / module).resolve()) for module in modules]
    if isinstance(gateway, dict) and gateway.get("py_modules"):
        gateway.setdefault("extra_search_paths", [str(path.parent.resolve())])  # Jina's default for it is [None]
    if tls is not None:  # the gateway's own arguments: Executors inherit the Flow's `with` and would serve TLS too
        if not isinstance(gateway, dict):
            gateway = config[GATEWAY] = {}
        gateway.update(ssl_certfile=str(tls[0]), ssl_keyfile=str(tls[1]))
    if metrics_ports:
        if GATEWAY in metrics_ports:
            config.setdefault("with", {}).update(monitoring=True, port_monitoring=metrics_ports[GATEWAY])
        for executor in executors:
            if executor.get("name") in metrics_ports:
                executor.update(monitoring=True, port_monitoring=metrics_ports[executor["name"]])
    return config
