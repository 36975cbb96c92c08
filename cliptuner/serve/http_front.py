"""HTTP next to the gRPC gateway: the search page and a JSON API (``cliptuner serve --http-port P``).

Jina's own HTTP gateway does not start with the pydantic 2 this project pins (its request models are built with a
pydantic 1 ``Config`` class), so ``cliptuner serve`` runs this small FastAPI app, served by uvicorn in a thread of
its own process, on the gateway's host (``127.0.0.1`` unless told otherwise), over https when given a certificate,
and forwards every call to the gRPC gateway. The routes (``GET /``, ``POST /post``, ``GET /image?uri=U``), their
limits and their errors: see docs/service.md ("Search page and JSON API") and the app's OpenAPI schema
(``GET /openapi.json``); keys and roles: docs/security.md.

Access is the gateway's (:mod:`cliptuner.serve.keys`): with a keys file, ``POST /post`` and ``GET /image`` need the
header ``authorization: Bearer <key>``. ``/post`` checks it before its body is read (401, ``WWW-Authenticate:
Bearer``), then the role against the body's endpoint (403, naming the role needed), and forwards an admitted call
with the same header, so the gateway applies the key's rate limit (429) and audits ``write``/``admin`` calls;
``/image`` needs any valid key. Each refusal here is one line of the audit log (the gateway's, ``<workspace>/audit``).
The page and the schema hold no data and stay open. A key is never logged nor taken from a URL.

The service's doc type and its uri policy come from the caller (:class:`JinaGateway`'s ``doc_type``,
:class:`HttpFront`'s ``policy``): this layer does not import the Executors.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import socket
import threading
import time
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Protocol
from urllib.parse import urlsplit

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from cliptuner.model.images import DEFAULT_LIMITS
from cliptuner.serve.access import UriPolicy, UriRefused
from cliptuner.serve.audit import AuditLog
from cliptuner.serve.keys import AccessError, KeyRing, Principal, RateLimiter, Unauthenticated

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 96 * 1024 * 1024  # one /post body: base64 images of a request within the Executors' 256 MiB cap
DOC_FIELDS = ("id", "text", "uri", "blob", "tags", "embedding", "model_version")  # what a /post doc may carry
IMAGE_TYPES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"))
IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")  # what /image answers with
PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
COMMON_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"))  # on every answer
ACCESS_STATUS = {  # an access refusal's gRPC status name -> the HTTP status of the answer
    "UNAUTHENTICATED": HTTPStatus.UNAUTHORIZED,
    "PERMISSION_DENIED": HTTPStatus.FORBIDDEN,
    "RESOURCE_EXHAUSTED": HTTPStatus.TOO_MANY_REQUESTS,
}
ACCESS_HEADERS = {
    HTTPStatus.UNAUTHORIZED: {"WWW-Authenticate": "Bearer"},
    HTTPStatus.TOO_MANY_REQUESTS: {"Retry-After": "1"},
}
NO_ENDPOINT = "-"  # the endpoint of a call refused before its body was read
POST_METHOD = "POST /post"  # the audit log's ``method`` of a refusal here
IMAGE_METHOD = "GET /image"
BODY_UNREAD = "cliptuner.body_unread"  # set in a /post's scope until its body is read: an error then closes
SECURITY = [{"bearer": []}]  # the routes that need a key, in the OpenAPI schema
SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key of the service (cliptuner keys create), when it runs with a keys file",
    }
}


class RequestError(ValueError):
    """A request this server answers with an error status (the message is what the client reads).

    Args:
        status: the HTTP status.
        message: what the client reads (never a key, never a path on the serving machine).
        headers: headers of the answer (``WWW-Authenticate`` of a 401, ``Retry-After`` of a 429).
    """

    def __init__(self, status: HTTPStatus, message: str, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


def access_refusal(code: str, message: str) -> RequestError:
    """The answer to a refused call: 401, 403 or 429 from the gRPC status name ``code``, with its headers."""
    status = ACCESS_STATUS[code]
    return RequestError(status, message, ACCESS_HEADERS.get(status))


class Gateway(Protocol):
    """What the HTTP front forwards ``/post`` calls to (:class:`JinaGateway`, or a stand-in in tests)."""

    def post(
        self, endpoint: str, docs: list[dict], parameters: dict, authorization: Optional[str] = None
    ) -> list[dict]:
        """Send ``docs`` (keyword arguments of the doc type) to ``endpoint``; the answered docs as JSON.

        ``authorization`` is the caller's header value, sent on as the call's ``authorization`` metadata.

        Raises:
            RequestError: the status and message the client reads (400, 401, 403, 422, 429, 503).
        """
        ...


# -- the JSON API's shapes, for the OpenAPI schema (bodies are checked by hand, so errors name the bad value) ------
class DocIn(BaseModel):
    """One doc of a ``/post`` request: text, an image (``blob`` or ``uri``), or both."""

    model_config = ConfigDict(extra="forbid")

    id: Optional[str] = None
    text: Optional[str] = None
    uri: Optional[str] = Field(None, description="a path under the service's image roots, or a data: URI")
    blob: Optional[str] = Field(None, description="an encoded image file (PNG, JPEG, ...) as base64")
    tags: Optional[dict[str, Any]] = None
    embedding: Optional[list[float]] = None
    model_version: Optional[str] = None


class PostRequest(BaseModel):
    """The body of ``POST /post``, in the shape Jina's HTTP gateway takes (other top-level keys are ignored)."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "anyOf": [{"required": ["execEndpoint"]}, {"required": ["exec_endpoint"]}],
            "not": {"required": ["execEndpoint", "exec_endpoint"]},
        },
    )

    execEndpoint: str = Field(None, pattern="^/", description="the endpoint, such as /search")
    exec_endpoint: str = Field(None, pattern="^/", description="execEndpoint's other spelling")
    data: Optional[list[DocIn]] = None
    parameters: Optional[dict[str, Any]] = None


class DocOut(BaseModel):
    """One answered doc: the fields the service filled (empty ones left out); a match carries ``score``."""

    id: str
    text: Optional[str] = None
    uri: Optional[str] = None
    model_version: Optional[str] = None
    score: Optional[float] = None
    tags: dict[str, Any]
    blob: Optional[str] = Field(None, description="base64, when asked for with return_content")
    embedding: Optional[list[float]] = None
    tensor: Optional[list[Any]] = None
    scores: Optional[list[float]] = None
    matches: Optional[list[DocOut]] = None


class PostAnswer(BaseModel):
    """The answer of ``POST /post``."""

    data: list[DocOut]


class ErrorAnswer(BaseModel):
    """Any error: what went wrong, naming the bad value (never a path on the serving machine)."""

    error: str


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorAnswer, "description": HTTPStatus(status).phrase} for status in statuses}


# -- requests and answers --------------------------------------------------------------------------------------------
def page_html() -> bytes:
    """The search page shipped in the package (``cliptuner/serve/assets/page.html``)."""
    return resources.files("cliptuner.serve").joinpath("assets", "page.html").read_bytes()


def _embedding(values: Any, i: int) -> np.ndarray:
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"doc {i}: 'embedding' must be a list of numbers")
    try:
        with np.errstate(over="ignore"):
            array = np.asarray(values, dtype=np.float32)
    except OverflowError:  # an integer beyond any float
        array = np.asarray([np.inf], dtype=np.float32)
    if not np.isfinite(array).all():
        raise RequestError(HTTPStatus.BAD_REQUEST, f"doc {i}: 'embedding' must be a list of numbers within float32")
    return array


def docs_from_json(data: Any) -> list[dict]:
    """The ``data`` of a ``/post`` body as keyword arguments of the doc type (``blob`` decoded from base64).

    Raises:
        RequestError: ``data`` is not a list of objects, a doc has an unknown field, a ``blob`` that is not base64
            or an ``embedding`` that is not a list of finite numbers (names the doc by position).
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
            doc["embedding"] = _embedding(doc["embedding"], i)
        for name in ("id", "text", "uri", "model_version"):
            if name in doc and not isinstance(doc[name], str):
                raise RequestError(HTTPStatus.BAD_REQUEST, f"doc {i}: {name!r} must be a string, got {doc[name]!r}")
        if "tags" in doc and not isinstance(doc["tags"], dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"doc {i}: 'tags' must be an object")
        docs.append(doc)
    return docs


def parse_post(body: bytes) -> tuple[str, list[dict], dict]:
    """A ``/post`` body as (endpoint, docs, parameters).

    Raises:
        RequestError: 400 naming what is wrong (not JSON, not an object, no endpoint, ``parameters`` not an object,
            a bad doc).
    """
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RequestError(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {str(exc)[:200]}") from None
    if not isinstance(request, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
    if "execEndpoint" in request and "exec_endpoint" in request:
        raise RequestError(HTTPStatus.BAD_REQUEST, "give the endpoint once: 'execEndpoint' or 'exec_endpoint'")
    endpoint = request.get("execEndpoint", request.get("exec_endpoint"))
    if not isinstance(endpoint, str) or not endpoint.startswith("/"):
        raise RequestError(
            HTTPStatus.BAD_REQUEST, f"'execEndpoint' must name an endpoint such as '/search', got {endpoint!r}"
        )
    parameters = request.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"'parameters' must be an object, got {parameters!r}")
    return endpoint, docs_from_json(request.get("data")), parameters


def doc_to_json(doc: Any) -> dict:
    """A doc or a match of the doc type as JSON: bytes as base64, arrays as lists, empty fields left out."""
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


def read_image(policy: UriPolicy, uri: str) -> tuple[bytes, str]:
    """The bytes and media type of the local image file (or ``data:`` URI) ``uri`` names, when ``policy`` allows it.

    Raises:
        RequestError: 400 no uri or a malformed ``data:`` URI, 403 refused by the policy or not local, 404 no
            readable file, over the image byte limit, or not a PNG, JPEG, GIF or WebP file.
    """
    if not uri:
        raise RequestError(HTTPStatus.BAD_REQUEST, "give the image as ?uri=...")
    try:
        source = policy.source(uri, "image")
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


def check_post_headers(request: Request) -> None:
    """Refuse a ``/post`` from its headers, before its body is read.

    Raises:
        RequestError: 415 not ``Content-Type: application/json`` (a cross-site page cannot send that without a CORS
            preflight, never granted here), 403 an ``Origin`` other than this server, 411 no ``Content-Length``,
            413 a body over :data:`MAX_BODY_BYTES`.
    """
    kind = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise RequestError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"Content-Type must be application/json, got {kind or 'none'!r}"
        )
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        raise RequestError(HTTPStatus.FORBIDDEN, f"requests from another origin are refused: {origin!r}")
    try:
        length = int(request.headers.get("content-length") or "")
    except ValueError:
        raise RequestError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length is required") from None
    if not 0 <= length <= MAX_BODY_BYTES:
        raise RequestError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body has {length} bytes, over the limit of {MAX_BODY_BYTES}"
        )


def _server_error(exc: Exception) -> str:
    """The message of an error the Flow answered with (Jina's ``BadServer`` carries the response header)."""
    header = exc.args[0] if exc.args else None
    status = getattr(header, "status", None)
    if status is None:
        return str(exc)
    parts = [str(arg) for arg in getattr(status.exception, "args", ())] or [status.description]
    return "; ".join(part for part in parts if part) or "the service failed the request"


def gateway_refusal(exc: BaseException) -> RequestError:
    """The answer to a call the gRPC gateway ended with a status (a ``grpc.RpcError``, or Jina's ``BadServerFlow``
    raised from one): 401, 403 or 429 for the gateway's access refusals, 503 for any other status."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    code = getattr(cause, "code", None)
    details = getattr(cause, "details", None)
    name = getattr(code(), "name", "UNKNOWN") if callable(code) else "UNKNOWN"
    message = (details() if callable(details) else None) or name
    if name in ACCESS_STATUS:
        return access_refusal(name, message)
    return RequestError(HTTPStatus.SERVICE_UNAVAILABLE, f"the gateway ended the call with {name}: {message}")


def local_address(host: str) -> str:
    """Where this machine reaches a server that listens on ``host`` (every interface: ``127.0.0.1``)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


class JinaGateway:
    """Calls of the gRPC gateway on ``host:port``, one Jina client per call (the server runs calls in threads).

    Args:
        host: the gateway's host (``0.0.0.0`` and ``::`` are reached on ``127.0.0.1``).
        port: its gRPC port.
        doc_type: the service's doc type (a docarray ``BaseDoc`` with ``matches`` and ``scores``).
        tls: the gateway serves TLS (its certificate is trusted through ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``).
    """

    def __init__(self, host: str, port: int, doc_type: type, tls: bool = False) -> None:
        self.host = local_address(host)
        self.port = port
        self.doc_type = doc_type
        self.tls = tls

    def post(
        self, endpoint: str, docs: list[dict], parameters: dict, authorization: Optional[str] = None
    ) -> list[dict]:
        """Send ``docs`` to ``endpoint`` with the caller's ``authorization``; the answered docs as JSON.

        Raises:
            RequestError: 422 with the service's message when the Flow failed the request; 401, 403 or 429 when
                the gateway refused the key, its role or its rate; 503 when it does not answer; 400 when the docs
                do not make docs of the doc type.
        """
        import grpc
        from docarray import DocList
        from jina import Client
        from jina.excepts import BadServer, BadServerFlow

        try:
            inputs = DocList[self.doc_type]([self.doc_type(**doc) for doc in docs])
        except (TypeError, ValueError) as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"a doc does not fit the doc schema: {exc}") from None
        client = Client(host=self.host, port=self.port, protocol="grpc", tls=self.tls)
        try:
            answer = client.post(
                endpoint,
                inputs=inputs if len(inputs) else None,
                parameters=parameters,
                return_type=DocList[self.doc_type],
                request_size=max(len(inputs), 1),
                metadata=(("authorization", authorization),) if authorization else (),
                stream=False,  # one unary call: a refusal's status arrives as sent, never racing a streamed write
            )
        except BadServer as exc:
            raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, _server_error(exc)) from None
        except (BadServerFlow, grpc.RpcError) as exc:  # Jina raises some statuses as they are (INTERNAL)
            raise gateway_refusal(exc) from None
        except (ConnectionError, OSError) as exc:
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, f"the gateway does not answer: {exc}") from None
        return [doc_to_json(doc) for doc in answer]


class FrontAccess:
    """Keys and roles at the HTTP front: who calls, and one audit line per refusal (as the gateway's guard writes).

    Args:
        keyring: the keys (``KeyRing(None)``: no keys, every caller is admin).
        audit: where refusals are written (``None``: nowhere).
    """

    def __init__(self, keyring: KeyRing, audit: Optional[AuditLog] = None) -> None:
        self.keyring = keyring
        self.audit = audit
        self.limiter = RateLimiter()  # /image only: /post calls are counted by the gateway they go to

    def caller(self, request: Request, method: str) -> tuple[Principal, Optional[str]]:
        """The caller of ``request`` and its ``authorization`` value, from the headers alone (its key's use noted).

        Raises:
            RequestError: 401 (``WWW-Authenticate: Bearer``) for a missing, malformed, oversized, non-ASCII, wrong
                or revoked key, or more than one header (refusal recorded).
        """
        values = request.headers.getlist("authorization")
        try:
            if len(values) > 1:
                raise Unauthenticated("send one authorization header, not several")
            header = values[0] if values else None
            principal = self.keyring.authenticate(header)
        except AccessError as exc:
            raise self.refuse(request, exc, None, NO_ENDPOINT, method) from None
        if self.audit is not None:
            self.audit.note_use(principal.id)
        return principal, header

    def limit(self, request: Request, principal: Principal, method: str) -> None:
        """Count one call of ``principal`` against its key's rate (for calls this front answers itself).

        Raises:
            RequestError: 429 with ``Retry-After`` over the limit (refusal recorded).
        """
        try:
            self.limiter.take(principal)
        except AccessError as exc:
            raise self.refuse(request, exc, principal, NO_ENDPOINT, method) from None

    def check(self, request: Request, principal: Principal, endpoint: str, method: str) -> None:
        """Refuse ``endpoint`` unless ``principal``'s role allows it.

        Raises:
            RequestError: 403 naming the role needed (refusal recorded).
        """
        try:
            principal.check(endpoint)
        except AccessError as exc:
            raise self.refuse(request, exc, principal, endpoint, method) from None

    def refuse(
        self, request: Request, exc: AccessError, principal: Optional[Principal], endpoint: str, method: str
    ) -> RequestError:
        """Record the refusal ``exc`` in the audit log; the answer to send."""
        if self.audit is not None:
            client = request.client
            self.audit.refusal(exc, principal, endpoint, method, f"{client.host}:{client.port}" if client else None)
        return access_refusal(exc.code, str(exc))


# -- the app ---------------------------------------------------------------------------------------------------------
class _Json(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content).encode("utf-8")


def _error(status: int, message: str, headers: Optional[dict] = None) -> Response:
    return _Json({"error": message}, status_code=status, headers=headers)


class _CommonHeaders:
    """ASGI middleware: ``nosniff`` and ``no-store`` on every answer."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(name, value) for name, value in COMMON_HEADERS if name not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _handle_errors(app: FastAPI) -> None:
    """Every error as ``{"error": message}``: the app's own, unknown routes, and anything unexpected (logged)."""

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> Response:
        headers = dict(exc.headers)
        if exc.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE or request.scope.get(BODY_UNREAD):
            headers["Connection"] = "close"  # the unread body must not be taken for a request
        return _error(exc.status, str(exc), headers or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        path = request.url.path
        if exc.status_code == HTTPStatus.NOT_FOUND:
            message = (
                f"no such page: {path!r}" if request.method == "GET" else f"no such endpoint: {path!r}; POST /post"
            )
        elif exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
            message = f"{request.method} is not allowed on {path!r}; allowed: {(exc.headers or {}).get('Allow', '')}"
        else:
            message = str(exc.detail)
        return _error(exc.status_code, message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return _error(HTTPStatus.BAD_REQUEST, "; ".join(str(e.get("msg", e)) for e in exc.errors())[:500])

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> Response:
        logger.error("HTTP front: %s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(HTTPStatus.INTERNAL_SERVER_ERROR, "the HTTP front failed the request; see the service log")


def build_app(
    gateway: Gateway, policy: UriPolicy, keyring: Optional[KeyRing] = None, audit: Optional[AuditLog] = None
) -> FastAPI:
    """The search page, ``POST /post`` (forwarded to ``gateway``) and ``GET /image`` (files ``policy`` allows).

    Args:
        gateway: where ``/post`` calls go (:class:`JinaGateway`).
        policy: the uri policy ``/image`` checks; only its roots are used (never an http(s) fetch).
        keyring: the keys ``/post`` and ``/image`` check (``None``: no keys, every caller is admin).
        audit: where refusals are written (``None``: nowhere).
    """
    policy = UriPolicy(roots=policy.roots)
    access = FrontAccess(keyring if keyring is not None else KeyRing(None), audit)
    page = page_html()
    app = FastAPI(
        title="cliptuner search page and JSON API", docs_url=None, redoc_url=None, openapi_url="/openapi.json"
    )
    app.add_middleware(_CommonHeaders)
    _handle_errors(app)

    @app.get("/", response_class=Response, responses={200: {"content": {"text/html": {}}, "description": "the page"}})
    @app.get("/index.html", response_class=Response, include_in_schema=False)
    def search_page() -> Response:
        """The search page: one self-contained file; its Content-Security-Policy allows nothing but this server."""
        return Response(page, media_type="text/html; charset=utf-8", headers={"Content-Security-Policy": PAGE_CSP})

    @app.post(
        "/post",
        response_class=_Json,
        responses={200: {"model": PostAnswer}, **_errors(400, 401, 403, 411, 413, 415, 422, 429, 503)},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": _REF.format(model="PostRequest")}}},
            },
            "security": SECURITY,
        },
    )
    async def post(request: Request) -> Response:
        """Forward a call to the service: ``{"execEndpoint": "/search", "data": [doc, ...], "parameters": {...}}``."""
        request.scope[BODY_UNREAD] = True
        principal, authorization = access.caller(request, POST_METHOD)  # before the body is read
        check_post_headers(request)
        body = await request.body()
        request.scope[BODY_UNREAD] = False
        endpoint, docs, parameters = parse_post(body)
        access.check(request, principal, endpoint, POST_METHOD)
        answer = await run_in_threadpool(gateway.post, endpoint, docs, parameters, authorization)
        return _Json({"data": answer})

    @app.get(
        "/image",
        response_class=Response,
        responses={200: {"content": {kind: {} for kind in IMAGE_MEDIA_TYPES}}, **_errors(400, 401, 403, 404)},
        openapi_extra={"security": SECURITY},
    )
    def image(request: Request, uri: str = "") -> Response:
        """The gallery image ``uri`` names, for the page's result cards: local files under the image roots only."""
        principal, _ = access.caller(request, IMAGE_METHOD)  # any valid key: every role may search
        access.limit(request, principal, IMAGE_METHOD)  # /image is answered here, so its rate is counted here
        data, kind = read_image(policy, uri)
        return Response(data, media_type=kind)

    _publish_schemas(app)
    return app


_REF = "#/components/schemas/{model}"


def _publish_schemas(app: FastAPI) -> None:
    """Put the hand-declared request body's models (``PostRequest``, ``DocIn``) into the schema's components.

    ``/post`` reads its body by hand (so that a wrong value is refused with a 400 naming it, and an oversized body
    before it is read); FastAPI therefore does not see these models, and the schema gets them here.
    """
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original()
            body = PostRequest.model_json_schema(ref_template=_REF)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(body.pop("$defs", {}), PostRequest=body)
            schema["components"]["securitySchemes"] = SECURITY_SCHEMES
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class HttpFront:
    """The search page and the JSON API on ``host:port``, served by uvicorn in a thread of this process.

    Args:
        host: the address to listen on (the gateway's).
        port: the HTTP port (0: any free one, see :attr:`port`).
        gateway: where ``/post`` calls go (:class:`JinaGateway`).
        policy: the service's uri policy (its image roots, for ``/image``).
        keyring: the keys (``None``: no keys, every caller is admin).
        audit: where refusals are written (the gateway's ``<workspace>/audit``); :meth:`stop` closes it.
        tls: ``(certificate, private key)`` PEM files: serve https.

    Raises:
        OSError: the port cannot be bound (raised here, before the service announces itself).
    """

    def __init__(
        self,
        host: str,
        port: int,
        gateway: Gateway,
        policy: UriPolicy,
        keyring: Optional[KeyRing] = None,
        audit: Optional[AuditLog] = None,
        tls: Optional[tuple[Path, Path]] = None,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family)
        self.audit = audit
        self.scheme = "https" if tls else "http"
        config = uvicorn.Config(
            build_app(gateway, policy, keyring, audit),
            loop="asyncio",
            http="h11",
            ws="none",
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=5,
            ssl_certfile=str(tls[0]) if tls else None,
            ssl_keyfile=str(tls[1]) if tls else None,
        )
        self.server = uvicorn.Server(config)
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        return self.socket.getsockname()[1]

    def start(self, timeout: float = 30.0) -> None:
        """Serve in a daemon thread; returns once uvicorn serves.

        Raises:
            RuntimeError: uvicorn did not start within ``timeout`` seconds.
        """
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[self.socket])), name="cliptuner-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP front did not start; see the log above")
            time.sleep(0.02)
        logger.info("search page and JSON API on %s://%s:%d/", self.scheme, *self.socket.getsockname()[:2])

    def stop(self) -> None:
        """Stop accepting, let running calls finish (5 s at most), close the socket, then the audit log."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.socket.close()
        if self.audit is not None:
            self.audit.close()
