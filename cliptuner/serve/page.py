"""HTTP next to the gRPC gateway: the search page and a JSON API (``cliptuner serve --http-port P``).

Jina's own HTTP gateway does not start with the pydantic 2 this project pins (its request models are built with a
pydantic 1 ``Config`` class), so ``cliptuner serve`` runs this small standard-library server in its own process,
on the gateway's host (``127.0.0.1`` unless told otherwise), and forwards every call to the gRPC gateway.

Routes:

- ``GET /``: the search page, ``cliptuner/serve/assets/page.html``, one self-contained file (inline CSS and JS, no
  external assets; a Content-Security-Policy allows nothing but this server).
- ``POST /post``: the body is JSON ``{"execEndpoint": "/search", "data": [doc, ...], "parameters": {...}}``
  (``exec_endpoint`` is accepted too; the shape Jina's HTTP gateway takes). A doc has ``id``, ``text``, ``uri``,
  ``blob`` (an encoded image file as base64), ``tags``, ``embedding`` (a list of numbers) and ``model_version``;
  nothing else. The answer is ``{"data": [doc, ...]}`` with each doc's ``id``, ``text``, ``uri``,
  ``model_version``, ``tags``, ``embedding``, ``scores`` and ``matches`` (each with ``id``, ``text``, ``uri``,
  ``tags``, ``model_version``, ``score``; ``blob`` as base64 when asked for with ``return_content``). The
  request must say ``Content-Type: application/json`` (a cross-site page cannot send that without a CORS
  preflight, which this server never grants), and a request with an ``Origin`` header must come from this server.
  Errors: ``{"error": message}`` with 400 (a malformed request), 413 (a body over :data:`MAX_BODY_BYTES`), 415
  (not JSON), 403 (another origin), 422 (the service refused or failed the request: its message), 503 (the
  gateway does not answer).
- ``GET /image?uri=U``: the image file a gallery doc names, for the page's result cards. ``U`` is checked by the
  service's own :class:`cliptuner.serve.access.UriPolicy` (the same image roots, ``CLIPTUNER_URI_ROOTS`` or
  ``<workspace>/data``, symlinks resolved) restricted to local files: never an http(s) fetch, never a path outside
  the roots. Only PNG, JPEG, GIF and WebP files up to the service's image byte limit are served. 403 for a refused
  uri, 404 for a missing or unreadable file or one that is not such an image.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

import numpy as np

from cliptuner.model.images import DEFAULT_LIMITS
from cliptuner.serve.access import UriPolicy, UriRefused

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 96 * 1024 * 1024  # one /post body: base64 images of a request within the Executors' 256 MiB cap
DOC_FIELDS = ("id", "text", "uri", "blob", "tags", "embedding", "model_version")  # what a /post doc may carry
IMAGE_TYPES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"))
PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class RequestError(ValueError):
    """A request this server answers with an error status (the message is what the client reads)."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def page_html() -> bytes:
    """The search page shipped in the package (``cliptuner/serve/assets/page.html``)."""
    return resources.files("cliptuner.serve").joinpath("assets", "page.html").read_bytes()


def docs_from_json(data: Any) -> list[dict]:
    """The ``data`` of a ``/post`` body as keyword arguments of ``ClipDoc`` (``blob`` decoded from base64).

    Raises:
        RequestError: ``data`` is not a list of objects, a doc has an unknown field, a ``blob`` that is not base64
            or an ``embedding`` that is not a list of numbers (names the doc by position).
    """
    if data is None:
        return []
    if not isinstance(data, list):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"'data' must be a list of docs, got {type(data).__name__}")
    docs = []
    for i, raw in enumerate(data):
        if not isinstance(raw, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"doc {i}: must be an object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(DOC_FIELDS))
        if unknown:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"doc {i}: unknown fields {unknown}; known: {list(DOC_FIELDS)}")
        doc = {k: v for k, v in raw.items() if v is not None}
        if "blob" in doc:
            if not isinstance(doc["blob"], str):
                raise RequestError(HTTPStatus.BAD_REQUEST, f"doc {i}: 'blob' must be a base64 string")
            try:
                doc["blob"] = base64.b64decode(doc["blob"], validate=True)
            except (binascii.Error, ValueError) as exc:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"doc {i}: 'blob' is not valid base64 ({exc})") from None
        if "embedding" in doc:
            values = doc["embedding"]
            if not isinstance(values, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
            ):
                raise RequestError(HTTPStatus.BAD_REQUEST, f"doc {i}: 'embedding' must be a list of numbers")
            doc["embedding"] = np.asarray(values, dtype=np.float32)
        for name in ("id", "text", "uri", "model_version"):
            if name in doc and not isinstance(doc[name], str):
                raise RequestError(HTTPStatus.BAD_REQUEST, f"doc {i}: {name!r} must be a string, got {doc[name]!r}")
        if "tags" in doc and not isinstance(doc["tags"], dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"doc {i}: 'tags' must be an object")
        docs.append(doc)
    return docs


def doc_to_json(doc: Any) -> dict:
    """A ``ClipDoc`` or ``MatchDoc`` as JSON: bytes as base64, arrays as lists, empty fields left out."""
    out: dict[str, Any] = {"id": doc.id}
    for name in ("text", "uri", "model_version", "score"):
        value = getattr(doc, name, None)
        if value is not None:
            out[name] = value
    out["tags"] = dict(doc.tags or {})
    if getattr(doc, "blob", None) is not None:
        out["blob"] = base64.b64encode(doc.blob).decode("ascii")
    for name in ("embedding", "tensor"):
        value = getattr(doc, name, None)
        if value is not None:
            out[name] = np.asarray(value).tolist()
    if getattr(doc, "scores", None) is not None:
        out["scores"] = list(doc.scores)
    if getattr(doc, "matches", None) is not None:
        out["matches"] = [doc_to_json(match) for match in doc.matches]
    return out


def image_type(data: bytes) -> Optional[str]:
    """The media type of an encoded PNG, JPEG, GIF or WebP file, from its first bytes; None for anything else."""
    for magic, kind in IMAGE_TYPES:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _server_error(exc: Exception) -> str:
    """The message of an error the Flow answered with (Jina's ``BadServer`` carries the response header)."""
    header = exc.args[0] if exc.args else None
    status = getattr(header, "status", None)
    if status is None:
        return str(exc)
    parts = [str(arg) for arg in getattr(status.exception, "args", ())] or [status.description]
    return "; ".join(part for part in parts if part) or "the service failed the request"


class Gateway:
    """Calls of the gRPC gateway on ``host:port``, one Jina client per call (the server runs calls in threads)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        self.port = port

    def post(self, endpoint: str, docs: list[dict], parameters: dict) -> list[dict]:
        """Send ``docs`` to ``endpoint``; the answered docs as JSON.

        Raises:
            RequestError: 422 with the service's message when the Flow failed the request, 503 when it does not
                answer, 400 when the docs do not make ``ClipDoc``s.
        """
        from docarray import DocList
        from jina import Client
        from jina.excepts import BadServer

        from executors.schemas import ClipDoc

        try:
            inputs = DocList[ClipDoc]([ClipDoc(**doc) for doc in docs])
        except (TypeError, ValueError) as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"a doc does not fit the doc schema: {exc}") from None
        client = Client(host=self.host, port=self.port, protocol="grpc")
        try:
            answer = client.post(
                endpoint,
                inputs=inputs if len(inputs) else None,
                parameters=parameters,
                return_type=DocList[ClipDoc],
                request_size=max(len(inputs), 1),
            )
        except BadServer as exc:
            raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, _server_error(exc)) from None
        except (ConnectionError, OSError) as exc:
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, f"the gateway does not answer: {exc}") from None
        return [doc_to_json(doc) for doc in answer]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        logger.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, extra: Optional[dict] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlsplit(self.path)
        try:
            if url.path in ("/", "/index.html"):
                self._send(200, page_html(), "text/html; charset=utf-8", {"Content-Security-Policy": PAGE_CSP})
            elif url.path == "/image":
                uri = parse_qs(url.query).get("uri", [""])[0]
                data, kind = self.server.image(uri)
                self._send(200, data, kind)
            else:
                raise RequestError(HTTPStatus.NOT_FOUND, f"no such page: {url.path!r}")
        except RequestError as exc:
            self._json(exc.status, {"error": str(exc)})

    def do_POST(self) -> None:  # noqa: N802
        try:
            if urlsplit(self.path).path != "/post":
                raise RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint: {self.path!r}; POST /post")
            self._check_origin()
            body = self._body()
            try:
                request = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {exc}") from None
            if not isinstance(request, dict):
                raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
            endpoint = request.get("execEndpoint", request.get("exec_endpoint"))
            if not isinstance(endpoint, str) or not endpoint.startswith("/"):
                raise RequestError(
                    HTTPStatus.BAD_REQUEST, f"'execEndpoint' must name an endpoint such as '/search', got {endpoint!r}"
                )
            parameters = request.get("parameters") or {}
            if not isinstance(parameters, dict):
                raise RequestError(HTTPStatus.BAD_REQUEST, f"'parameters' must be an object, got {parameters!r}")
            docs = docs_from_json(request.get("data"))
            self._json(200, {"data": self.server.gateway.post(endpoint, docs, parameters)})
        except RequestError as exc:
            self._json(exc.status, {"error": str(exc)})

    def _check_origin(self) -> None:
        kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise RequestError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"Content-Type must be application/json, got {kind or 'none'!r}"
            )
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != self.headers.get("Host"):
            raise RequestError(HTTPStatus.FORBIDDEN, f"requests from another origin are refused: {origin!r}")

    def _body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or "")
        except ValueError:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length is required") from None
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True  # the unread body must not be taken for the next request
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body has {length} bytes, over the limit of {MAX_BODY_BYTES}"
            )
        return self.rfile.read(length)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], gateway: Gateway, policy: UriPolicy) -> None:
        super().__init__(address, _Handler)
        self.gateway = gateway
        self.policy = policy

    def image(self, uri: str) -> tuple[bytes, str]:
        """The bytes and media type of the local image file ``uri`` names, when the policy allows it."""
        if not uri:
            raise RequestError(HTTPStatus.BAD_REQUEST, "give the image as ?uri=...")
        try:
            source = self.policy.source(uri, "image")
        except UriRefused as exc:
            raise RequestError(HTTPStatus.FORBIDDEN, str(exc)) from None
        except ValueError as exc:  # a malformed data: URI
            raise RequestError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        if isinstance(source, bytes):
            data = source
        elif isinstance(source, str):
            path = Path(source)
            try:
                if path.stat().st_size > DEFAULT_LIMITS.max_bytes:
                    raise RequestError(HTTPStatus.NOT_FOUND, "image: the file is over the image size limit")
                data = path.read_bytes()
            except OSError:
                raise RequestError(HTTPStatus.NOT_FOUND, "image: no readable file there") from None
        else:  # http(s): never fetched for the page
            raise RequestError(HTTPStatus.FORBIDDEN, "image: only local files are served")
        kind = image_type(data)
        if kind is None:
            raise RequestError(HTTPStatus.NOT_FOUND, "image: not a PNG, JPEG, GIF or WebP file")
        return data, kind


def local_policy(workspace: Path) -> UriPolicy:
    """The service's uri policy for ``workspace`` (its image roots), with no http(s) host allowed."""
    from executors.options import Workspace, uri_policy

    policy = uri_policy(Workspace(root=workspace.expanduser().resolve(), registry=None))  # type: ignore[arg-type]
    return UriPolicy(roots=policy.roots)


class HttpFront:
    """The search page and the JSON API on ``host:port``, forwarding to the gRPC gateway on ``grpc_port``.

    Args:
        host: the address to listen on (the gateway's).
        port: the HTTP port.
        grpc_port: the gateway's gRPC port (reached on ``host``, or ``127.0.0.1`` for ``0.0.0.0``).
        workspace: the service's workspace (its image roots, for ``/image``).

    Raises:
        OSError: the port cannot be bound (raised here, before the service announces itself).
    """

    def __init__(self, host: str, port: int, grpc_port: int, workspace: Path) -> None:
        self.server = _Server((host, port), Gateway(host, grpc_port), local_policy(workspace))
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.serve_forever, name="cliptuner-http", daemon=True)
        self._thread.start()
        logger.info("search page and JSON API on http://%s:%d/", *self.server.server_address[:2])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(10)
