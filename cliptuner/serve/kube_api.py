"""The few calls the tuner makes to the Kubernetes API server, with the standard library only (``urllib`` over
HTTPS): create, get, list and delete Jobs, Services and Pods in a namespace (jina-free, torch-free).

:meth:`KubeAPI.in_cluster` reaches the API server from inside a pod as its service account: the address from
``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT``, the CA and the token mounted under
``/var/run/secrets/kubernetes.io/serviceaccount`` (the token read again at every request, since the kubelet rotates
it). An error names the object, the HTTP status and the API server's message, and for a 403 the permission that is
missing; :attr:`KubeAPIError.transient` tells an error that may pass (no answer, 429, 5xx) from one that will not.
Requests never go through an HTTP proxy.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Optional

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

RESOURCES = {  # kind: (API path prefix, resource, API group)
    "Job": ("apis/batch/v1", "jobs", "batch"),
    "Service": ("api/v1", "services", ""),
    "Pod": ("api/v1", "pods", ""),
}


class KubeAPIError(RuntimeError):
    """The API server refused a request, or could not be reached.

    Attributes:
        status: the HTTP status (None: no answer).
        reason: the API server's reason (``Forbidden``, ``NotFound``, ``AlreadyExists``...).
    """

    def __init__(self, message: str, status: Optional[int] = None, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason

    @property
    def transient(self) -> bool:
        """Whether asking again later may work: no answer, too many requests, or a server error."""
        return self.status is None or self.status == 429 or self.status >= 500


class KubeNotFound(KubeAPIError):
    """The object asked for does not exist."""


class KubeAPI:
    """The few calls the tuner makes to the Kubernetes API server, over HTTPS with the standard library.

    Args:
        base_url: ``https://HOST:PORT`` of the API server (``http://`` is accepted, for tests).
        token: a bearer token; or
        ca_file: the CA that signed the API server's certificate (None: the system's CAs).
        token_file: a file holding the bearer token, read at each request (a service account's token is rotated
            by the kubelet while the pod runs); used when ``token`` is None.
        timeout: seconds per request.

    Raises:
        ValueError: ``base_url`` is not an http(s) URL.
    """

    def __init__(
        self,
        base_url: str,
        token: Optional[str] = None,
        ca_file: Optional[Path] = None,
        *,
        token_file: Optional[Path] = None,
        timeout: float = 30.0,
    ) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("https", "http") or not parsed.netloc:
            raise ValueError(f"the API server's URL must be https://HOST:PORT, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.token_file = Path(token_file) if token_file is not None else None
        self.timeout = timeout
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]  # never through a proxy
        if parsed.scheme == "https":
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)

    @classmethod
    def in_cluster(cls, timeout: float = 30.0, account_dir: Path = SERVICE_ACCOUNT_DIR) -> KubeAPI:
        """The API server as seen from inside a pod, with the pod's service account.

        Raises:
            RuntimeError: not in a pod (``KUBERNETES_SERVICE_HOST`` unset) or no service account token mounted.
        """
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise RuntimeError(
                "KUBERNETES_SERVICE_HOST is not set: training on several nodes needs the tuner to run in a "
                "Kubernetes pod"
            )
        token_file, ca_file = account_dir / "token", account_dir / "ca.crt"
        if not token_file.is_file():
            raise RuntimeError(
                f"no service account token at {token_file}: give the tuner's pod a service account with "
                "automountServiceAccountToken on"
            )
        host = f"[{host}]" if ":" in host else host  # an IPv6 address
        return cls(
            f"https://{host}:{port}",
            ca_file=ca_file if ca_file.is_file() else None,
            token_file=token_file,
            timeout=timeout,
        )

    # -- the calls ----------------------------------------------------------------------------------------------------
    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create ``obj`` (a Job, Service or Pod with ``metadata.namespace``); returns it as the server stored it."""
        kind, namespace, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
        return self._call("POST", "create", kind, namespace, name, self._path(kind, namespace), body=obj)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        """The object ``kind`` ``namespace/name``.

        Raises:
            KubeNotFound: it does not exist.
            KubeAPIError: any other refusal, or no answer.
        """
        return self._call("GET", "get", kind, namespace, name, self._path(kind, namespace, name))

    def list_objects(self, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """The objects ``kind`` in ``namespace`` whose labels match ``label_selector``."""
        path = self._path(kind, namespace) + "?" + urllib.parse.urlencode({"labelSelector": label_selector})
        return list(self._call("GET", "list", kind, namespace, "", path).get("items") or [])

    def delete(self, kind: str, namespace: str, name: str, propagation: Optional[str] = None) -> bool:
        """Delete ``kind`` ``namespace/name`` (``propagation``: ``Foreground``, ``Background`` or ``Orphan`` for its
        dependents); returns False when it was not there."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if propagation is not None:
            body["propagationPolicy"] = propagation
        try:
            self._call("DELETE", "delete", kind, namespace, name, self._path(kind, namespace, name), body=body)
        except KubeNotFound:
            return False
        return True

    # -- plumbing -----------------------------------------------------------------------------------------------------
    def _path(self, kind: str, namespace: str, name: str = "") -> str:
        if kind not in RESOURCES:
            raise ValueError(f"unknown kind {kind!r}; known: {sorted(RESOURCES)}")
        prefix, resource, _ = RESOURCES[kind]
        path = f"/{prefix}/namespaces/{urllib.parse.quote(namespace, safe='')}/{resource}"
        return path + (f"/{urllib.parse.quote(name, safe='')}" if name else "")

    def _bearer(self) -> Optional[str]:
        if self.token is not None:
            return self.token
        if self.token_file is not None:
            try:
                return self.token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise KubeAPIError(f"cannot read the service account token {self.token_file}: {exc}") from None
        return None

    def _call(
        self, method: str, verb: str, kind: str, namespace: str, name: str, path: str, body: Optional[dict] = None
    ) -> dict[str, Any]:
        what = f"{kind} {namespace}/{name}" if name else f"{RESOURCES[kind][1]} in namespace {namespace}"
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        token = self._bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            raise self._refusal(exc, verb, kind, namespace, what) from None
        except (urllib.error.URLError, OSError) as exc:
            cause = getattr(exc, "reason", exc)
            raise KubeAPIError(
                f"cannot {verb} {what}: the API server at {self.base_url} did not answer: {cause}"
            ) from None
        try:
            return json.loads(payload) if payload else {}
        except ValueError:
            raise KubeAPIError(
                f"cannot {verb} {what}: the API server answered with no JSON: {payload[:200]!r}"
            ) from None

    def _refusal(self, exc: urllib.error.HTTPError, verb: str, kind: str, namespace: str, what: str) -> KubeAPIError:
        """The error of an HTTP error answer: the object, the status and the API server's message, and for 401/403
        what is missing."""
        try:
            status = json.loads(exc.read() or b"{}")
        except ValueError:
            status = {}
        status = status if isinstance(status, dict) else {}
        reason = str(status.get("reason") or exc.reason or "")
        message = str(status.get("message") or exc.reason or "no message")
        text = f"cannot {verb} {what}: HTTP {exc.code} {reason}: {message}"
        _, resource, group = RESOURCES[kind]
        if exc.code == 403:
            text += (
                f" (the tuner's service account needs the permission {verb!r} on {resource!r} in API group "
                f"{group or 'core'!r} in namespace {namespace!r}: the Role and RoleBinding of "
                "cliptuner.serve.cluster.training_rbac)"
            )
        elif exc.code == 401:
            text += " (the API server refused the service account token)"
        kind_of_error = KubeNotFound if exc.code == 404 else KubeAPIError
        return kind_of_error(text, exc.code, reason)


def in_cluster_namespace(account_dir: Path = SERVICE_ACCOUNT_DIR) -> str:
    """The namespace of the pod this process runs in (its service account's ``namespace`` file).

    Raises:
        RuntimeError: the file is not there (not in a pod).
    """
    try:
        return (account_dir / "namespace").read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise RuntimeError(f"cannot read this pod's namespace from {account_dir / 'namespace'}: {exc}") from None


__all__ = ["RESOURCES", "SERVICE_ACCOUNT_DIR", "KubeAPI", "KubeAPIError", "KubeNotFound", "in_cluster_namespace"]
