"""The service's ``CLIPTUNER_*`` environment, read in one place: :meth:`ServiceEnvironment.from_environ`.

Every variable is a field of :class:`ServiceEnvironment` with its type, its default and what it does (the JSON
Schema of the model lists them all). A variable that is unset or empty takes the default; a set one is parsed
into its type, and a bad value is refused with a ``ValueError`` that names the variable (and the ``cliptuner
serve`` option that sets it) and what it accepts. The Executors, the serving code and the CLI ask this model;
only code that writes a child process's environment touches ``os.environ`` itself. Torch-free and jina-free.
"""

from __future__ import annotations

import math
import os
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

import pydantic

PREFIX = "CLIPTUNER_"
PORT_RANGE = (1, 65535)
METRICS_MEMBERS = ("gateway", "tuner", "encoder", "indexer")  # one Prometheus port each: --metrics-port P, P+1 ...


def variable(
    default: Any,
    help: str,
    *,
    flag: Optional[str] = None,
    bounds: Optional[tuple[float, float]] = None,
    accepts: Optional[str] = None,
    separator: Optional[str] = None,
) -> Any:
    """A field of :class:`ServiceEnvironment`: one ``CLIPTUNER_<NAME>`` variable.

    Args:
        default: its value when the variable is unset or empty.
        help: what it does.
        flag: the ``cliptuner serve`` option that sets it, named in errors.
        bounds: the inclusive range of a number.
        accepts: how errors describe the accepted values (default: from the type and ``bounds``).
        separator: a list variable: the text between its items.
    """
    extra = {"flag": flag, "bounds": bounds, "accepts": accepts, "separator": separator}
    return pydantic.Field(default, description=help, json_schema_extra={k: v for k, v in extra.items() if v})


class ServiceEnvironment(pydantic.BaseModel):
    """Every ``CLIPTUNER_*`` variable of the service, typed (the field ``port`` is ``CLIPTUNER_PORT``)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    host: str = variable(
        "127.0.0.1", "address the gateway listens on (0.0.0.0: every interface)", flag="--host", accepts="an address"
    )
    port: int = variable(51000, "gRPC port of the gateway", flag="--port", bounds=PORT_RANGE)
    workspace: Optional[Path] = variable(
        None, "the shared workspace: models/ (registry), index/, data/, runs/", flag="--workspace"
    )
    model: str = variable("cliptuner-tiny", "base OpenCLIP arch or bundled config of a fresh workspace", flag="--model")
    pretrained: Optional[str] = variable(
        None, "pretrained tag or local checkpoint of the base (unset: random init)", flag="--pretrained"
    )
    device: str = variable("auto", "auto, cpu, cuda or cuda:N", flag="--device")
    uri_roots: Optional[tuple[str, ...]] = variable(
        None,
        "folders a client uri may name, relative ones from the workspace (unset: <workspace>/data)",
        separator=os.pathsep,
    )
    allowed_hosts: Optional[tuple[str, ...]] = variable(
        None, "http(s) hosts a client uri may name, host or host:port (unset: none)", separator=","
    )
    index_backend: str = variable(
        "auto", "the indexer's vector store: auto, exact, usearch or milvus", flag="--index-backend"
    )
    milvus_uri: Optional[str] = variable(
        None, "milvus: the server (unset: Milvus Lite, a file in the index)", flag="--milvus-uri"
    )
    milvus_token: Optional[pydantic.SecretStr] = variable(
        None, "milvus: the server's token, user:password", flag="--milvus-token"
    )
    index_shards: int = variable(1, "indexer shards (flows/shards.yml)", flag="--index-shards", bounds=(1, 64))
    batch_wait_ms: Optional[float] = variable(
        None,
        "how long the encoder lets a small request wait for others to share a model run, in ms (unset: 2; 0: off)",
        flag="--batch-wait-ms",
        bounds=(0, 1000),
    )
    http_port: Optional[int] = variable(
        None, "also serve HTTP (search page, JSON API) on this port", flag="--http-port", bounds=PORT_RANGE
    )
    metrics_port: Optional[int] = variable(
        None,
        "Prometheus ports: the gateway on this one, the tuner, encoder and indexer on the next three (unset: off)",
        flag="--metrics-port",
        bounds=(1, PORT_RANGE[1] - len(METRICS_MEMBERS) + 1),
        accepts=f"a port number that leaves room for {len(METRICS_MEMBERS)} ports below 65536",
    )
    metrics_host: Optional[str] = variable(
        None,
        "address the Prometheus ports listen on (unset: the gateway's host, CLIPTUNER_HOST)",
        flag="--metrics-host",
        accepts="an address",
    )
    grpc_keepalive_ms: Optional[int] = variable(
        None,
        "how often the gateway pings the Executors on a quiet connection, in ms (unset: 10000, Jina's); every gRPC "
        "server of the Flow accepts pings twice as often",
        bounds=(100, 3_600_000),
    )
    keys_file: Optional[Path] = variable(
        None,
        "the API keys file (cliptuner keys create); unset: no keys, open to every caller (127.0.0.1 only)",
        flag="--keys-file",
    )
    insecure_no_auth: bool = variable(
        False, "serve an address other than 127.0.0.1 without API keys", flag="--insecure-no-auth"
    )
    tls_cert: Optional[Path] = variable(
        None, "TLS certificate (PEM) of the gateway and the HTTP front", flag="--tls-cert"
    )
    tls_key: Optional[Path] = variable(None, "TLS private key (PEM) of --tls-cert", flag="--tls-key")
    internal_key: Optional[str] = variable(
        None, "set by cliptuner serve: ID:SHA256 of its own readiness key (role search), never stored"
    )
    audit_max_bytes: int = variable(
        16 * 1024 * 1024, "size at which <workspace>/audit/audit.jsonl is rotated", bounds=(1024, 2**40)
    )
    cache: Optional[Path] = variable(None, "where `cliptuner demo` caches its base model (unset: ~/.cache/cliptuner)")
    auto_train: Optional[str] = variable(
        None,
        'the tuner\'s auto_train policy as JSON, e.g. {"min_events": 200, "min_queries": 50, "parameters": '
        '{"epochs": 3}}: train on the search feedback by itself, gated (unset: off)',
        flag="--auto-train",
        accepts="a JSON object",
    )
    torch_threads: Optional[int] = variable(None, "CPU threads of each training process (unset: the CPUs left)")
    train_niceness: Optional[int] = variable(None, "CPU priority of training below serving, 0 to 19 (unset: 10)")

    @classmethod
    def variable_name(cls, field: str) -> str:
        """The environment variable of ``field``: ``CLIPTUNER_`` + its name in capitals."""
        if field not in cls.model_fields:
            raise ValueError(f"no setting {field!r}; known: {sorted(cls.model_fields)}")
        return PREFIX + field.upper()

    @classmethod
    def label(cls, field: str) -> str:
        """How errors name ``field``: ``--flag / CLIPTUNER_<NAME>``, or the variable alone."""
        flag = _extra(cls, field).get("flag")
        return f"{flag} / {cls.variable_name(field)}" if flag else cls.variable_name(field)

    @classmethod
    def from_environ(
        cls, environ: Optional[Mapping[str, str]] = None, only: Optional[Iterable[str]] = None
    ) -> ServiceEnvironment:
        """The settings of ``environ`` (default: this process's environment, read now).

        Args:
            environ: the variables.
            only: read just these fields (the others keep their defaults), so that a bad variable that a reader
                does not use does not stop it; default: every field (what ``cliptuner serve`` checks before it
                starts anything).

        Raises:
            ValueError: a variable that does not parse as its type or lies outside its range; names the variable,
                what it accepts and the value.
        """
        environ = os.environ if environ is None else environ
        names = list(cls.model_fields) if only is None else list(only)
        values = {}
        for name in names:
            raw = environ.get(cls.variable_name(name))
            if raw is not None and raw.strip():
                values[name] = _parse(cls, name, raw.strip())
        return cls(**values)

    @classmethod
    def get(cls, field: str, environ: Optional[Mapping[str, str]] = None) -> Any:
        """The value of one setting: its variable parsed, else its default.

        Raises:
            ValueError: an unknown field, or a bad value of its variable (named).
        """
        return getattr(cls.from_environ(environ, only=[field]), field)

    def is_set(self, field: str) -> bool:
        """Whether the variable of ``field`` was given (not left to its default)."""
        return field in self.model_fields_set

    def metrics_ports(self) -> dict[str, int]:
        """Flow member -> its Prometheus port (``metrics_port`` and the next ones); empty when metrics are off."""
        if self.metrics_port is None:
            return {}
        return {member: self.metrics_port + i for i, member in enumerate(METRICS_MEMBERS)}


def _extra(cls: type[pydantic.BaseModel], field: str) -> dict[str, Any]:
    extra = cls.model_fields[field].json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _base_type(cls: type[pydantic.BaseModel], field: str) -> type:
    """``int`` for ``Optional[int]``, ``tuple`` for ``Optional[tuple[str, ...]]``, ..."""
    hint = cls.model_fields[field].annotation
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        hint = args[0]
    return typing.get_origin(hint) or hint


def _accepts(cls: type[pydantic.BaseModel], field: str, base: type) -> str:
    extra = _extra(cls, field)
    if extra.get("accepts"):
        return str(extra["accepts"])
    bounds = extra.get("bounds")
    if base is int and bounds == PORT_RANGE:
        return f"a port number in [{bounds[0]}, {bounds[1]}]"
    if base is int:
        return f"a whole number in [{bounds[0]:g}, {bounds[1]:g}]" if bounds else "an integer"
    if base is float:
        return f"a number in [{bounds[0]:g}, {bounds[1]:g}]" if bounds else "a number"
    if base is bool:
        return "true or false"
    return "text"


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(cls: type[pydantic.BaseModel], field: str, raw: str) -> Any:
    """The value of a set variable, in the type of ``field``.

    Raises:
        ValueError: ``<label> must be <what it accepts>, got '<raw>'``.
    """
    base = _base_type(cls, field)
    extra = _extra(cls, field)
    error = ValueError(f"{cls.label(field)} must be {_accepts(cls, field, base)}, got {raw!r}")
    if base is tuple:
        return tuple(item.strip() for item in raw.split(extra["separator"]) if item.strip())
    if base is bool:
        if raw.lower() not in _TRUE | _FALSE:
            raise error
        return raw.lower() in _TRUE
    if base in (int, float):
        try:
            value = int(raw) if base is int else float(raw)
        except ValueError:
            raise error from None
        bounds = extra.get("bounds")
        if not math.isfinite(value) or (bounds and not bounds[0] <= value <= bounds[1]):
            raise error
        return value
    if base is Path:
        return Path(raw).expanduser()
    return raw
