"""The Flow configuration ``cliptuner serve`` starts: a Flow YAML, with Prometheus monitoring added when asked.

The Flow YAMLs (flows/) name only the variables they need; metrics are off there. :func:`flow_config` loads one
as a mapping (its ``${{ ENV.X }}`` left for Jina to expand), makes its ``py_modules`` absolute (the mapping has no
folder of its own), and, given ports, turns on ``monitoring`` for the gateway and for each Executor it names;
given a certificate and key, the gateway serves TLS.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import yaml

GATEWAY = "gateway"


def flow_config(
    path: Path, metrics_ports: Mapping[str, int], tls: Optional[tuple[Path, Path]] = None
) -> dict[str, Any]:
    """The Flow YAML at ``path`` as a mapping for ``jina.Flow.load_config``, with monitoring on the given ports.

    Args:
        path: the Flow YAML.
        metrics_ports: ``gateway`` and Executor names -> their Prometheus port; empty: monitoring stays off.
            An Executor of the Flow that is not named keeps the YAML's settings.
        tls: ``(certificate, private key)``: the gateway serves TLS with them.

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
