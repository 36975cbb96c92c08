"""Options of the Executors: the settings they share, their one set-up, and per-request parameters.

:class:`ExecutorSettings` holds what every Executor is configured with (base model, device, registry, bootstrap,
uri policy, request limits); :meth:`ExecutorSetup.start` turns it into the workspace and its registry, the one
uri policy of the service (which client ``uri``s may be read), the request limits, and publishes (or waits for)
the base version of a fresh registry. A setting left unset (None, empty, or a ``${{ ENV.X }}`` Jina could not
expand: see :func:`setting`) is taken from the service's environment
(:class:`cliptuner.settings.ServiceEnvironment`), else from its default.

Request parameters travel as a protobuf Struct: every number arrives as a float, and in a Flow every Executor
receives every parameter of the request (plus a section per Executor name, already merged by Jina into the
parameters of the Executor it names, and Jina's own ``__results__``). So each endpoint checks only the
parameters of the endpoints it owns (:func:`request_parameters`), and ignores them where it only forwards.
"""

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from jina import Executor

from cliptuner.config import ModelSpec
from cliptuner.model.follow import ModelFollower
from cliptuner.model.registry import Registry
from cliptuner.options import config_dataclass
from cliptuner.serve.access import UriPolicy
from cliptuner.serve.bootstrap import ensure_current
from cliptuner.serve.limits import RequestLimits
from cliptuner.settings import PREFIX, ServiceEnvironment

WORKSPACE_ENV = ServiceEnvironment.variable_name("workspace")
URI_ROOTS_ENV = ServiceEnvironment.variable_name("uri_roots")  # folders client uris may name, os.pathsep-separated
ALLOWED_HOSTS_ENV = ServiceEnvironment.variable_name("allowed_hosts")  # http(s) hosts, comma-separated
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
    for candidate in (runtime_workspace, metas_workspace, init_workspace):
        candidate = setting(candidate)
        if candidate:
            return Path(candidate).expanduser().resolve()
    workspace = ServiceEnvironment.get("workspace")
    return None if workspace is None else workspace.resolve()


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


def _list_setting(name: str, value: Any, separator: str) -> list[str]:
    """A list setting: a list, or a string split at ``separator``; when unset, its ``CLIPTUNER_*`` variable; else
    []."""
    value = setting(value)
    if value is None:
        value = ServiceEnvironment.get(name)
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
    roots = _list_setting("uri_roots", uri_roots, os.pathsep)
    hosts = _list_setting("allowed_hosts", allowed_hosts, ",")
    folders = [base / Path(root).expanduser() for root in roots] or [base / DATA_SUBDIR]
    return UriPolicy(roots=tuple(folders), allowed_hosts=tuple(hosts))


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
    """An integer service setting: ``value``; when unset (see :func:`setting`), the variable ``env`` (a
    ``CLIPTUNER_*`` field of :class:`cliptuner.settings.ServiceEnvironment`); else ``default``.

    Raises:
        ValueError: not a whole number, or outside ``[minimum, maximum]`` (names the setting and the variable).
    """
    value = setting(value)
    source = name
    if value is None:
        value, source = ServiceEnvironment.get(env.removeprefix(PREFIX).lower()), env
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


# -- the settings every Executor shares, and its set-up ----------------------------------------------------------
@config_dataclass
class ExecutorSettings:
    """What every Executor is configured with: keyword arguments of the same names (``uses_with`` in a Flow).

    Build it with :meth:`take` (from an Executor's ``**kwargs``) or :meth:`of`, which treat unset values as unset
    (:func:`setting`) and fill them from the service's environment. ``uri_roots`` is a list or an
    ``os.pathsep``-separated string (relative ones from the workspace; relative uris are taken from the first;
    unset: ``$CLIPTUNER_URI_ROOTS``, else ``<workspace>/data``); ``allowed_hosts`` a list or a comma-separated
    string of ``host`` or ``host:port`` (unset: ``$CLIPTUNER_ALLOWED_HOSTS``, else none). The limits are checked
    before anything is decoded (:class:`cliptuner.serve.limits.RequestLimits`).
    """

    model: str = DEFAULT_ARCH  # base arch or bundled config published on a fresh registry ($CLIPTUNER_MODEL)
    pretrained: Optional[str] = None  # its pretrained tag or local checkpoint; None: random ($CLIPTUNER_PRETRAINED)
    device: str = "auto"  # auto, cpu, cuda or cuda:N ($CLIPTUNER_DEVICE)
    models_dir: Optional[str] = None  # the registry; None: <workspace>/models
    workspace: Optional[str] = None  # the workspace= the Executor was built with (see workspace_root)
    bootstrap: bool = True  # publish the base version when the registry is empty (else only wait for one)
    bootstrap_timeout: float = 600.0  # seconds to wait for a version published by another service
    uri_roots: Union[str, list, tuple, None] = None  # folders client uris may name (see uri_policy)
    allowed_hosts: Union[str, list, tuple, None] = None  # http(s) hosts client uris may name (see uri_policy)
    intra_op_threads: Optional[int] = None  # ONNX Runtime threads per call; None lets it decide
    max_docs: int = RequestLimits.max_docs  # docs in one /encode, /index or /search request
    max_pairs: int = RequestLimits.max_pairs  # pair docs in one /train request
    max_text_chars: int = RequestLimits.max_text_chars  # characters of one doc's text
    max_blob_bytes: int = RequestLimits.max_blob_bytes  # one encoded image
    max_request_bytes: int = RequestLimits.max_request_bytes  # blobs, tensors and uris of one request
    max_limit: int = RequestLimits.max_limit  # largest `limit` of a /search

    def __post_init__(self) -> None:
        if not self.bootstrap_timeout >= 0:
            raise ValueError(f"bootstrap_timeout must be >= 0 seconds, got {self.bootstrap_timeout!r}")
        if self.intra_op_threads is not None and self.intra_op_threads < 1:
            raise ValueError(f"intra_op_threads must be >= 1 or None, got {self.intra_op_threads!r}")
        self.limits()  # the limits' own checks, now

    @classmethod
    def of(cls, **values: Any) -> "ExecutorSettings":
        """The settings of an Executor's keyword arguments: unset ones (:func:`setting`) left out, ``model``,
        ``pretrained`` and ``device`` then taken from the environment (``uri_roots``, ``allowed_hosts`` and the
        workspace are, when the set-up resolves them).

        Raises:
            ValueError: an unknown name, a value of the wrong type or out of range (named), or a bad variable.
        """
        given = {name: setting(value) for name, value in values.items()}
        given = {name: value for name, value in given.items() if value is not None}
        environment = ServiceEnvironment.from_environ(only=("model", "pretrained", "device"))
        for name in ("model", "pretrained", "device"):
            if name not in given and getattr(environment, name) is not None:
                given[name] = getattr(environment, name)
        return cls(**given)

    @classmethod
    def take(cls, kwargs: dict[str, Any], **defaults: Any) -> "ExecutorSettings":
        """The shared settings among an Executor's keyword arguments, taken out of ``kwargs`` (the rest goes on to
        jina's ``Executor.__init__``), through :meth:`of`.

        Args:
            kwargs: the Executor's ``**kwargs``; the names of this class's fields are removed from it, except
                ``workspace`` (jina reads it too), which is only read.
            defaults: values the Executor sets for itself (e.g. the indexer's validated ``max_limit``); a
                keyword argument of the same name wins.

        Raises:
            ValueError: as :meth:`of`.
        """
        names = [f.name for f in dataclasses.fields(cls) if f.name != "workspace"]
        values = {**defaults, **{name: kwargs.pop(name) for name in names if name in kwargs}}
        return cls.of(workspace=kwargs.get("workspace"), **values)

    def limits(self) -> RequestLimits:
        """The request limits of these settings.

        Raises:
            ValueError: a limit that is not a positive integer, or a blob limit above the request limit.
        """
        return RequestLimits(
            max_docs=self.max_docs,
            max_pairs=self.max_pairs,
            max_text_chars=self.max_text_chars,
            max_blob_bytes=self.max_blob_bytes,
            max_request_bytes=self.max_request_bytes,
            max_limit=self.max_limit,
        )


@dataclass(frozen=True)
class ExecutorSetup:
    """What an Executor works with, made once in ``__init__`` by :meth:`start`."""

    settings: ExecutorSettings
    workspace: Workspace  # the shared root and the registry
    policy: UriPolicy  # which client uris may be read
    limits: RequestLimits  # bounds on one request
    base: ModelSpec  # the base model of a fresh registry
    current: str  # the version CURRENT named once the bootstrap was done

    @property
    def registry(self) -> Registry:
        """The model registry the Executor follows."""
        return self.workspace.registry

    @property
    def root(self) -> Path:
        """The workspace root; with only ``models_dir`` set, the folder that holds the registry."""
        return self.workspace.root or self.registry.root.expanduser().resolve().parent

    def follower(self, batch_size: int) -> ModelFollower:
        """The CURRENT version's ONNX models on the settings' device, following the registry as it moves."""
        return ModelFollower(
            self.registry,
            device=self.settings.device,
            intra_op_threads=self.settings.intra_op_threads,
            batch_size=int(batch_size),
        )

    @classmethod
    def start(cls, executor: Executor, settings: ExecutorSettings, clean_temps: bool = False) -> "ExecutorSetup":
        """Resolve the workspace, the registry, the uri policy and the limits, then bootstrap the registry: publish
        the base version when it is empty and ``settings.bootstrap`` is on, else wait for one.

        Args:
            executor: the Executor being built (its ``runtime_args.workspace`` and ``metas.workspace`` are read).
            settings: its settings (:meth:`ExecutorSettings.of`).
            clean_temps: a publisher (the tuner): remove what a crashed publish left in the registry first.

        Raises:
            ValueError: no workspace and no ``models_dir``, a bad uri setting, or a base model that cannot be built.
            cliptuner.serve.bootstrap.BootstrapTimeout: no model version appeared in time.
        """
        workspace = resolve_workspace(executor, settings.models_dir, settings.workspace)
        policy = uri_policy(workspace, settings.uri_roots, settings.allowed_hosts)
        base = ModelSpec(arch=settings.model, pretrained=settings.pretrained)
        if clean_temps:
            workspace.registry.clean_temps()
        current = ensure_current(
            workspace.registry, base if settings.bootstrap else None, timeout=settings.bootstrap_timeout
        )
        return cls(settings, workspace, policy, settings.limits(), base, current)
