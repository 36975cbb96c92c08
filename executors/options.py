"""Options of the Executors: service settings from YAML/env, the workspace layout, and per-request parameters.

Every Executor resolves its workspace once, in ``__init__``, with :func:`resolve_workspace` (the shared root and
the model registry in it), builds the base model of a fresh registry with :func:`base_spec`, and the one uri
policy of the service (which client ``uri``s may be read) with :func:`uri_policy`.

Service settings reach an Executor from ``flows/flow.yml`` as ``${{ ENV.X }}``. Jina turns an empty variable into
None and leaves an unset one as the literal text ``$X``; :func:`setting` treats both as "not set".

Request parameters travel as a protobuf Struct: every number arrives as a float, and in a Flow every Executor
receives every parameter of the request (plus a section per Executor name, already merged by Jina into the
parameters of the Executor it names, and Jina's own ``__results__``). So each endpoint checks only the
parameters of the endpoints it owns (:func:`request_parameters`), and ignores them where it only forwards.
"""

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from jina import Executor

from cliptuner.config import ModelSpec
from cliptuner.model.registry import Registry
from cliptuner.serve.access import UriPolicy

WORKSPACE_ENV = "CLIPTUNER_WORKSPACE"
URI_ROOTS_ENV = "CLIPTUNER_URI_ROOTS"  # folders client uris may name, os.pathsep-separated
ALLOWED_HOSTS_ENV = "CLIPTUNER_ALLOWED_HOSTS"  # http(s) hosts client uris may name, comma-separated
MODELS_SUBDIR = "models"  # the model registry
INDEX_SUBDIR = "index"  # the indexer's collection
DATA_SUBDIR = "data"  # PAIRS files /train may name
RUNS_SUBDIR = "runs"  # one folder per /train run: report.json, training state
DEFAULT_ARCH = "cliptuner-tiny"  # base model of a fresh registry when ``model`` is not set

_UNEXPANDED = re.compile(r"^\$(\{\{\s*(ENV|env)\.)?\{?[A-Za-z_][A-Za-z0-9_]*\}?(\s*\}\})?$")


def setting(value: Any) -> Any:
    """A service setting, or None when it is unset: None, an empty string, or an unexpanded ``$VAR``."""
    if value is None:
        return None
    if isinstance(value, str):
        stripped = value.strip()
        if not stripped or _UNEXPANDED.match(stripped):
            return None
        return stripped
    return value


def workspace_root(
    runtime_workspace: Optional[str], metas_workspace: Optional[str], init_workspace: Optional[str]
) -> Optional[Path]:
    """The workspace all three Executors share (``models/``, ``index/``, ``data/``, ``runs/`` under it).

    The first set of: the workspace Jina runs the Executor with (``workspace:`` in the Flow YAML,
    ``--workspace``), ``metas.workspace``, the ``workspace=`` the Executor was built with, ``$CLIPTUNER_WORKSPACE``.
    Unlike ``Executor.workspace``, no per-Executor folder is appended: the registry is shared.
    """
    for candidate in (runtime_workspace, metas_workspace, init_workspace, os.environ.get(WORKSPACE_ENV)):
        candidate = setting(candidate)
        if candidate:
            return Path(candidate).expanduser().resolve()
    return None


@dataclass(frozen=True)
class Workspace:
    """Where an Executor keeps its state, resolved once when it starts."""

    root: Optional[Path]  # the shared workspace; None when none is set (every path is then given explicitly)
    registry: Registry  # the model registry the Executor follows


def resolve_workspace(executor: Executor, models_dir: Optional[str], init_workspace: Optional[str]) -> Workspace:
    """The workspace of an Executor (see :func:`workspace_root`) and its registry: ``models_dir``, else
    ``<workspace>/models``.

    Args:
        executor: the Executor being built (its ``runtime_args.workspace`` and ``metas.workspace`` are read).
        models_dir: the ``models_dir`` setting.
        init_workspace: the ``workspace=`` the Executor was built with.

    Raises:
        ValueError: neither a workspace nor ``models_dir`` is set (names the Executor).
    """
    root = workspace_root(
        getattr(executor.runtime_args, "workspace", None), getattr(executor.metas, "workspace", None), init_workspace
    )
    explicit = setting(models_dir)
    if explicit:
        return Workspace(root=root, registry=Registry(explicit))
    if root is None:
        raise ValueError(
            f"{type(executor).__name__}: no workspace; set CLIPTUNER_WORKSPACE, pass --workspace / "
            "workspace=..., or give models_dir"
        )
    return Workspace(root=root, registry=Registry(root / MODELS_SUBDIR))


def _list_setting(name: str, value: Any, env: str, separator: str) -> list[str]:
    """A list setting: a list, or a string split at ``separator``; when unset, the variable ``env``; else []."""
    value = setting(value)
    if value is None:
        value = setting(os.environ.get(env))
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(separator)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list or a {separator!r}-separated string, got {value!r}")
    return [str(item).strip() for item in value if setting(item) is not None]


def uri_policy(workspace: Workspace, uri_roots: Any = None, allowed_hosts: Any = None) -> UriPolicy:
    """The one rule for client ``uri``s, the same in every Executor (see :class:`cliptuner.serve.access.UriPolicy`).

    Args:
        workspace: the Executor's workspace (:func:`resolve_workspace`).
        uri_roots: folders local paths and ``file://`` URIs must lie under (a list, or an ``os.pathsep``-separated
            string; relative ones are taken from the workspace); unset: ``$CLIPTUNER_URI_ROOTS``, else
            ``<workspace>/data`` (beside the registry when only ``models_dir`` is set).
        allowed_hosts: http(s) hosts that may be fetched, ``host`` or ``host:port`` (a list or a comma-separated
            string); unset: ``$CLIPTUNER_ALLOWED_HOSTS``, else none (no http(s)).

    Raises:
        ValueError: a malformed setting (names it).
    """
    base = workspace.root or workspace.registry.root.expanduser().resolve().parent
    roots = _list_setting("uri_roots", uri_roots, URI_ROOTS_ENV, os.pathsep)
    hosts = _list_setting("allowed_hosts", allowed_hosts, ALLOWED_HOSTS_ENV, ",")
    folders = [base / Path(root).expanduser() for root in roots] or [base / DATA_SUBDIR]
    return UriPolicy(roots=tuple(folders), allowed_hosts=tuple(hosts))


def base_spec(model: Optional[str], pretrained: Optional[str]) -> ModelSpec:
    """The base model of a fresh registry: ``model`` (default ``cliptuner-tiny``) and ``pretrained`` (None: random)."""
    return ModelSpec(arch=setting(model) or DEFAULT_ARCH, pretrained=setting(pretrained))


def request_parameters(parameters: Optional[Mapping[str, Any]], allowed: Iterable[str], endpoint: str) -> dict:
    """The parameters of a request to an endpoint this Executor owns, refusing unknown names.

    Jina's own keys (``__results__``) and per-Executor sections (dict values, keyed by an Executor name) are
    left out, unless the endpoint takes a dict parameter of that name (``/search``'s ``filter``).

    Raises:
        ValueError: a parameter this endpoint does not know (names it and the allowed ones).
    """
    allowed = set(allowed)
    own = {
        k: v
        for k, v in dict(parameters or {}).items()
        if not k.startswith("__") and (k in allowed or not isinstance(v, dict))
    }
    unknown = sorted(set(own) - allowed)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for {endpoint}; allowed: {sorted(allowed)}")
    return own


def int_setting(
    name: str, value: Any, env: str, default: Optional[int], minimum: int = 1, maximum: Optional[int] = None
) -> Optional[int]:
    """An integer service setting: ``value``; when unset (see :func:`setting`), the variable ``env``; else
    ``default``.

    Raises:
        ValueError: not a whole number, or outside ``[minimum, maximum]`` (names the setting and the variable).
    """
    value = setting(value)
    source = name
    if value is None:
        value, source = setting(os.environ.get(env)), env
    if value is None:
        return default
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"{source} must be an integer, got {value!r}") from None
    try:
        return int_parameter(name, value, minimum, maximum)
    except ValueError as exc:
        raise ValueError(f"{exc}" if source == name else f"{exc} (from {env})") from None


def int_parameter(name: str, value: Any, minimum: int = 1, maximum: Optional[int] = None) -> int:
    """An integer request parameter (protobuf sends ``5`` as ``5.0``).

    Raises:
        ValueError: not a whole number, or outside ``[minimum, maximum]`` (names the parameter).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"parameter {name!r} must be an integer, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"parameter {name!r} must be a whole number, got {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"parameter {name!r} must be {bounds}, got {value}")
    return value
