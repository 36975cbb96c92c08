"""The gateway's front door: a gRPC server interceptor that checks API keys and roles. Jina-free.

:class:`AccessGuard` sits in the gateway's ``grpc.aio`` server (``executors/gateway.py`` adds it) and sees every
call before the gateway does:

* Health checks (``grpc.health.v1.Health``), Jina's dry run and its version info stay open: probes and ``jina
  ping`` need no key, and they carry no data.
* Every other call must carry ``authorization: Bearer <key>`` metadata. The key is checked from the call's
  metadata alone, before a byte of the request is decoded: a missing, malformed, wrong or revoked key is answered
  ``UNAUTHENTICATED`` by a handler that never deserialises the request; a key over its rate limit
  ``RESOURCE_EXHAUSTED``.
* A data call (``Call``, ``process_single_data``, ``stream_doc``) then has each request's endpoint checked
  against the key's role (the request's header only: Jina parses it without the docs). A role too low:
  ``PERMISSION_DENIED``, naming the role needed, and the request goes no further — no Executor sees it.
* ``/status`` requests get the parameter ``detail`` set by the guard (``true`` for ``admin``; a client cannot set
  it): the Executors leave server paths and process ids out of the view of every other role.
* Every ``write``/``admin`` request (with its result) and every refusal is one line of the audit log
  (:class:`cliptuner.serve.audit.AuditLog`); ``on_refusal(endpoint, reason)`` counts refusals for the metrics.

Without a keys file (:attr:`KeyRing.enabled` false) every caller is ``admin``; changes are still audited.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Optional

import grpc

from cliptuner.serve.audit import AuditLog, scrub
from cliptuner.serve.keys import (
    AccessError,
    KeyRing,
    PermissionDenied,
    Principal,
    RateLimiter,
    Unauthenticated,
    required_role,
)

logger = logging.getLogger(__name__)

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/jina.JinaGatewayDryRunRPC/", "/jina.JinaInfoRPC/")
DATA_METHODS = (
    "/jina.JinaRPC/Call",
    "/jina.JinaSingleDataRequestRPC/process_single_data",
    "/jina.JinaSingleDocumentRequestRPC/stream_doc",
)
DRAIN_MESSAGES = 64  # requests of a refused stream read (as bytes) before it is answered
DRAIN_SECONDS = 2.0
NO_ENDPOINT = "-"  # the endpoint of a call refused before its request was read
_CODES = {
    "UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED,
    "PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def _endpoint(request: Any) -> str:
    """The request's endpoint from its header (Jina parses the header without the docs)."""
    header = getattr(request, "header", None)
    return str(getattr(header, "exec_endpoint", "") or "/")


def _count_docs(request: Any) -> Optional[int]:
    """How many docs a request carries (from its protobuf; None when they travel as opaque bytes)."""
    try:
        content = request.proto_with_data.data
        return len(content.docs.docs) if content.HasField("docs") else None
    except Exception:  # a request type without docs
        return None


def _status_of(response: Any) -> tuple[str, Optional[str]]:
    """``("ok", None)`` or ``("error", message)`` from a Jina response's header status."""
    try:
        status = response.header.status
        if status.code == 0:
            return "ok", None
        name = status.exception.name or "error"
        args = list(status.exception.args) or [status.description]
        return "error", f"{name}: {'; '.join(str(a) for a in args)}"[:500]
    except Exception:
        return "ok", None


async def _drain(requests: Any, limit: int = DRAIN_MESSAGES, seconds: float = DRAIN_SECONDS) -> None:
    """Let a refused stream's client finish sending (raw bytes, never decoded), within bounds.

    Ending a streaming call while its client still writes makes gRPC answer some of those calls ``INTERNAL``
    instead of the refusal's code. A client that goes on sending past the bounds gets the refusal anyway.
    """

    async def read() -> None:
        count = 0
        async for _ in requests:
            count += 1
            if count >= limit:
                return

    try:
        await asyncio.wait_for(read(), seconds)
    except (TimeoutError, grpc.RpcError):
        pass


class AccessGuard(grpc.aio.ServerInterceptor):
    """Checks keys and roles for every call of a gRPC gateway; see the module's docstring.

    Args:
        keyring: the keys (``KeyRing(None)``: no keys, everyone is admin).
        limiter: per-key rate limits (``None``: none).
        audit: where changes and refusals are written (``None``: nowhere).
        on_refusal: called with ``(endpoint, reason)`` for each refusal (the metrics).
    """

    def __init__(
        self,
        keyring: KeyRing,
        limiter: Optional[RateLimiter] = None,
        audit: Optional[AuditLog] = None,
        on_refusal: Optional[Callable[[str, str], None]] = None,
    ) -> None:
        self.keyring = keyring
        self.limiter = limiter
        self.audit = audit
        self.on_refusal = on_refusal

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        principal: Optional[Principal] = None
        try:
            values = [v for k, v in (details.invocation_metadata or ()) if k == "authorization"]
            if len(values) > 1:
                raise Unauthenticated("send one authorization header, not several")
            principal = self.keyring.authenticate(values[0] if values else None)
            if self.limiter is not None:
                self.limiter.take(principal)
        except AccessError as exc:
            return self._denied(handler, exc, method, principal)
        if self.audit is not None:
            self.audit.note_use(principal.id)
        if method not in DATA_METHODS:
            return handler
        if handler.request_streaming:
            return self._streaming(handler, principal, method)
        return self._unary(handler, principal, method)

    # -- refusals -------------------------------------------------------------------------------------------------
    def _refused(
        self, exc: AccessError, endpoint: str, principal: Optional[Principal], peer: Optional[str], method: str
    ) -> None:
        if self.on_refusal is not None:
            self.on_refusal(endpoint, exc.reason)
        if self.audit is not None:
            self.audit.refusal(exc, principal, endpoint, method, peer)

    def _denied(self, handler: Any, exc: AccessError, method: str, principal: Optional[Principal]) -> Any:
        """A handler of the same shape that answers ``exc`` without deserialising the request."""
        code = _CODES[exc.code]

        def deny(context: grpc.aio.ServicerContext) -> None:
            self._refused(exc, NO_ENDPOINT, principal, context.peer(), method)
            context.set_code(code)
            context.set_details(str(exc))

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
            deny(context)
            if handler.request_streaming:
                await _drain(request)

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            deny(context)
            if handler.request_streaming:
                await _drain(request)
            return
            yield  # pragma: no cover - makes this an async generator

        serializer = handler.response_serializer
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(streaming, None, serializer)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(unary, None, serializer)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(streaming, None, serializer)
        return grpc.unary_unary_rpc_method_handler(unary, None, serializer)

    # -- admitted calls -------------------------------------------------------------------------------------------
    def _admit(self, request: Any, principal: Principal, context: Any, method: str) -> tuple[str, Optional[dict]]:
        """Check one request's endpoint against the role; returns ``(endpoint, audit entry or None)``.

        Raises:
            PermissionDenied: the role is too low (refusal recorded).
        """
        endpoint = _endpoint(request)
        try:
            principal.check(endpoint)
        except PermissionDenied as exc:
            self._refused(exc, endpoint, principal, context.peer(), method)
            raise
        if endpoint == "/status":
            request.parameters = {**request.parameters, "detail": principal.role == "admin"}
        if self.audit is None or required_role(endpoint) == "search":
            return endpoint, None
        entry = {
            "key_id": principal.id,
            "key_name": principal.name,
            "role": principal.role,
            "endpoint": endpoint,
            "peer": context.peer(),
            "docs": _count_docs(request),
            "parameters": scrub({k: v for k, v in request.parameters.items() if not k.startswith("__")}),
            "started": time.monotonic(),
        }
        return endpoint, entry

    def _finish(self, entry: Optional[dict], response: Any = None, error: Optional[BaseException] = None) -> None:
        if entry is None or self.audit is None:
            return
        seconds = round(time.monotonic() - entry.pop("started"), 3)
        if error is not None:
            result, message, code = "error", f"{type(error).__name__}: {error}"[:500], "CANCELLED"
        else:
            result, message = _status_of(response)
            code = "OK"
        self.audit.record(**entry, result=result, code=code, error=message, seconds=seconds)

    def _unary(self, handler: Any, principal: Principal, method: str) -> Any:
        inner = handler.unary_unary or handler.unary_stream

        if handler.unary_unary is not None:

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    _, entry = self._admit(request, principal, context, method)
                except PermissionDenied as exc:
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
                try:
                    response = await inner(request, context)
                except BaseException as exc:
                    self._finish(entry, error=exc)
                    raise
                self._finish(entry, response)
                return response

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                _, entry = self._admit(request, principal, context, method)
            except PermissionDenied as exc:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            last = None
            async for response in inner(request, context):
                last = response
                yield response
            self._finish(entry, last)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )

    def _streaming(self, handler: Any, principal: Principal, method: str) -> Any:
        inner = handler.stream_stream

        async def stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            pending: dict[str, dict] = {}
            refused: list[PermissionDenied] = []

            async def admitted() -> AsyncIterator[Any]:
                async for request in request_iterator:
                    try:
                        _, entry = self._admit(request, principal, context, method)
                    except PermissionDenied as exc:
                        refused.append(exc)  # this request and the rest of the stream go no further
                        await _drain(request_iterator)
                        return
                    if entry is not None:
                        pending[request.header.request_id] = entry
                    yield request

            async for response in inner(admitted(), context):
                self._finish(pending.pop(getattr(response.header, "request_id", ""), None), response)
                yield response
            for entry in pending.values():
                self._finish(entry, error=RuntimeError("no response"))
            if refused:
                context.set_code(grpc.StatusCode.PERMISSION_DENIED)
                context.set_details(str(refused[0]))

        return grpc.stream_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)
