"""The service's gRPC gateway: Jina's own, with API keys, roles, rate limits and an audit log at the door.

:class:`CLIPGateway` is Jina's ``GRPCGateway`` with one more server interceptor,
:class:`cliptuner.serve.guard.AccessGuard`, which answers a call without a valid key (or with a role too low for
its endpoint) before the gateway reads it, so such a request never reaches an Executor. The Flow YAMLs name it
(``gateway: uses: CLIPGateway``); TLS is Jina's own (``ssl_certfile``/``ssl_keyfile``, which ``cliptuner serve
--tls-cert/--tls-key`` set).

It reads its settings from the environment (cliptuner/settings.py): ``CLIPTUNER_KEYS_FILE`` (unset: no keys,
every caller is admin), ``CLIPTUNER_WORKSPACE`` (the audit log goes to ``<workspace>/audit/``; unset: no audit
log, which is logged), ``CLIPTUNER_AUDIT_MAX_BYTES`` and ``CLIPTUNER_INTERNAL_KEY`` (``cliptuner serve``'s own
readiness key). With monitoring on, ``cliptuner_access_refusals_total{endpoint, reason}`` counts refusals.
"""

import logging
from typing import Any, Optional

from jina.serve.runtimes.gateway.grpc import GRPCGateway
from prometheus_client import CollectorRegistry, Counter

from cliptuner.serve.audit import AuditLog
from cliptuner.serve.guard import AccessGuard
from cliptuner.serve.keys import KeyRing, RateLimiter, internal_record
from cliptuner.settings import ServiceEnvironment

logger = logging.getLogger(__name__)

SETTINGS = ("keys_file", "workspace", "audit_max_bytes", "internal_key")


def build_guard(environment: ServiceEnvironment, registry: Optional[CollectorRegistry] = None) -> AccessGuard:
    """The interceptor of a gateway with these settings (its refusals counted in ``registry`` when given)."""
    extra = (internal_record(environment.internal_key),) if environment.internal_key else ()
    keyring = KeyRing(environment.keys_file, extra=extra)
    audit = None
    if environment.workspace is not None:
        audit = AuditLog(environment.workspace / "audit", max_bytes=environment.audit_max_bytes)
    else:
        logger.warning("no CLIPTUNER_WORKSPACE: changes and refusals are not written to an audit log")
    refusals = Counter(
        "cliptuner_access_refusals_total",
        "calls refused at the gateway, by endpoint ('-': refused before the request was read) and reason",
        ["endpoint", "reason"],
        registry=registry if registry is not None else CollectorRegistry(),
    )
    if not keyring.enabled:
        logger.warning("no API keys file: every caller of this gateway may train, index and delete")
    return AccessGuard(
        keyring,
        RateLimiter(),
        audit,
        on_refusal=lambda endpoint, reason: refusals.labels(endpoint=endpoint, reason=reason).inc(),
    )


class CLIPGateway(GRPCGateway):
    """Jina's gRPC gateway with :class:`AccessGuard` in front; settings from the ``CLIPTUNER_*`` environment."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        environment = ServiceEnvironment.from_environ(only=SETTINGS)
        self.guard = build_guard(environment, getattr(self, "metrics_registry", None))
        self.grpc_tracing_server_interceptors = [*(self.grpc_tracing_server_interceptors or []), self.guard]

    async def shutdown(self) -> None:
        """Stop the server, then write what the audit log still holds."""
        try:
            await super().shutdown()
        finally:
            if self.guard.audit is not None:
                self.guard.audit.close()
