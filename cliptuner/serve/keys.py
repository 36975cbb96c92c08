"""API keys with roles: who may call which endpoint. Torch-free and jina-free.

Three roles, each including the one before:

========  =====================================================================================
search    ``/encode``, ``/search``, ``/status`` (the view without server paths or process ids)
write     + ``/index``, ``/delete``, ``/feedback``
admin     + ``/train``, ``/train/cancel``, ``/models`` and ``/models/*``, the full ``/status``
========  =====================================================================================

An endpoint not in :data:`ENDPOINT_ROLES` needs ``admin`` (default deny).

A key is ``ctk_<id>_<secret>``: a 12-hex-digit id and 32 random bytes (url-safe base64). It is shown once, when
made; the keys file keeps the id, a name, the role, an optional rate limit, when it was made, and the key's
SHA-256 — never the key. A caller presents ``authorization: Bearer <key>`` (gRPC metadata or HTTP header);
:meth:`KeyRing.authenticate` finds the record by the id and compares the hashes with ``hmac.compare_digest``.
The keys are random and 256 bits long, so one SHA-256 is the right hash here (a slow password hash protects
guessable secrets, which these are not).

:class:`KeyRing` looks at the keys file's identity (inode, size, mtime) on every call and reads it again when
it changed, so ``cliptuner keys create`` / ``revoke`` — or a Kubernetes Secret updated in place — take effect on
the next request, without a restart. A file that disappears or cannot be read refuses every key (fail closed).

The keys file (``--keys-file`` / ``CLIPTUNER_KEYS_FILE``), JSON::

    {"version": 1, "keys": [{"id": "3f0c9a1b2d4e", "name": "ci", "role": "admin", "rate": "50/s",
                             "created": "2026-12-07T16:00:00Z", "sha256": "…", "revoked": null}]}
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Optional

from cliptuner.model.atomic import write_atomic

logger = logging.getLogger(__name__)

ROLES = ("search", "write", "admin")  # each includes the ones before it
ENDPOINT_ROLES = {
    "/encode": "search",
    "/search": "search",
    "/status": "search",
    "/index": "write",
    "/delete": "write",
    "/feedback": "write",
    "/train": "admin",
    "/train/cancel": "admin",
    "/models": "admin",
}
KEY_PREFIX = "ctk"
ID_HEX = 12  # digits of a key's id
SECRET_BYTES = 32
MAX_HEADER_CHARS = 512  # an authorization value longer than this is refused without being looked at
FILE_VERSION = 1
_KEY_RE = re.compile(rf"^{KEY_PREFIX}_([0-9a-f]{{{ID_HEX}}})_([A-Za-z0-9_-]{{32,128}})$")
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0}
_RATE_UNITS["hour"] = 3600.0
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class AccessError(Exception):
    """A refused call. ``code`` is the gRPC status name (the HTTP front maps it); the message never holds a key."""

    code = "UNAUTHENTICATED"
    reason = "unauthenticated"

    def __init__(self, message: str, key_id: Optional[str] = None) -> None:
        super().__init__(message)
        self.key_id = key_id  # the key's id when it was recognised (a revoked key), for the audit log


class Unauthenticated(AccessError):
    """No key, a malformed one, an unknown, wrong or revoked one (gRPC UNAUTHENTICATED, HTTP 401)."""


class PermissionDenied(AccessError):
    """A valid key whose role is below the endpoint's (gRPC PERMISSION_DENIED, HTTP 403)."""

    code = "PERMISSION_DENIED"
    reason = "role"


class RateLimited(AccessError):
    """A key over its rate limit (gRPC RESOURCE_EXHAUSTED, HTTP 429)."""

    code = "RESOURCE_EXHAUSTED"
    reason = "rate"


def required_role(endpoint: str) -> str:
    """The least role that may call ``endpoint`` (``/models/...`` is ``admin``; an unknown endpoint too)."""
    role = ENDPOINT_ROLES.get(endpoint)
    if role is None:
        return "admin"
    return role


def role_allows(role: str, needed: str) -> bool:
    """Whether ``role`` includes ``needed``."""
    return ROLES.index(role) >= ROLES.index(needed)


def parse_rate(text: Optional[str]) -> Optional[float]:
    """``"50/s"``, ``"600/m"``, ``"1000/h"`` -> calls per second; ``None``/empty -> ``None`` (no limit).

    Raises:
        ValueError: names the value and the accepted form.
    """
    if text is None or str(text).strip() == "":
        return None
    match = _RATE_RE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"rate {text!r}: expected a positive number of calls per s, m or h, such as 50/s or 600/m")
    return float(match.group(1)) / _RATE_UNITS[match.group(2)]


def rate_burst(text: Optional[str]) -> Optional[float]:
    """How many calls a rate allows at once: N of ``"N/unit"`` (at least 1); ``None`` without a limit."""
    if parse_rate(text) is None:
        return None
    return max(1.0, float(_RATE_RE.match(str(text)).group(1)))


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key, as the keys file stores it."""
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def now_iso() -> str:
    """The time now, UTC, to the second (``2026-12-07T16:00:00Z``)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class KeyRecord:
    """One key as the keys file keeps it (never the key itself)."""

    id: str  # 12 hex digits, also the key's second part
    name: str  # who or what holds it: "ci", "search-page", ...
    role: str  # search, write or admin
    sha256: str  # hex SHA-256 of the whole key
    created: str  # UTC, ISO 8601
    rate: Optional[str] = None  # calls per second/minute/hour ("50/s"); None: no limit
    revoked: Optional[str] = None  # when it was revoked; a revoked key is refused

    def __post_init__(self) -> None:
        if not re.fullmatch(rf"[0-9a-f]{{{ID_HEX}}}", str(self.id)):
            raise ValueError(f"key id {self.id!r}: expected {ID_HEX} hex digits")
        if self.role not in ROLES:
            raise ValueError(f"key {self.id}: role {self.role!r} is not one of {', '.join(ROLES)}")
        if not re.fullmatch(r"[0-9a-f]{64}", str(self.sha256)):
            raise ValueError(f"key {self.id}: sha256 must be 64 hex digits")
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(
                f"key {self.id}: name {self.name!r} must be 1-64 letters, digits or . _ @ -, starting with a "
                "letter or digit"
            )
        parse_rate(self.rate)

    @property
    def rate_per_s(self) -> Optional[float]:
        """The rate limit in calls per second, or ``None``."""
        return parse_rate(self.rate)

    @functools.cached_property
    def principal(self) -> Principal:
        """The caller this key makes (its rate parsed once per record, not per call)."""
        return Principal(
            id=self.id, name=self.name, role=self.role, rate_per_s=self.rate_per_s, burst=rate_burst(self.rate)
        )


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id, name and role (``id`` None: the service runs without keys)."""

    id: Optional[str]
    name: str
    role: str
    rate_per_s: Optional[float] = None
    burst: Optional[float] = None  # calls allowed at once (N of "N/unit"); default max(1, rate_per_s)

    def allows(self, endpoint: str) -> bool:
        """Whether this caller may call ``endpoint``."""
        return role_allows(self.role, required_role(endpoint))

    def check(self, endpoint: str) -> None:
        """Raise :class:`PermissionDenied`, naming the role needed, unless this caller may call ``endpoint``."""
        needed = required_role(endpoint)
        if not role_allows(self.role, needed):
            raise PermissionDenied(f"{endpoint} needs the role {needed!r}; this key has the role {self.role!r}")


ANONYMOUS = Principal(id=None, name="anonymous", role="admin")  # every caller when the service runs without keys


# -- the keys file ------------------------------------------------------------------------------------------------
def read_keys_file(path: Path) -> list[KeyRecord]:
    """The records of a keys file (a missing file: none).

    Raises:
        ValueError: not JSON, not this format, or a record that does not validate (names the file and the record).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"keys file {str(path)!r} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError(f'keys file {str(path)!r}: expected {{"version": {FILE_VERSION}, "keys": [...]}}')
    records = []
    for i, item in enumerate(data["keys"]):
        if not isinstance(item, dict):
            raise ValueError(f"keys file {str(path)!r}: keys[{i}] is not an object")
        fields = {k: item.get(k) for k in KeyRecord.__dataclass_fields__ if k in item}
        unknown = sorted(set(item) - set(KeyRecord.__dataclass_fields__))
        if unknown:
            raise ValueError(f"keys file {str(path)!r}: keys[{i}] has unknown fields {unknown}")
        try:
            records.append(KeyRecord(**fields))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"keys file {str(path)!r}: keys[{i}]: {exc}") from None
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"keys file {str(path)!r}: a key id appears twice")
    return records


def write_keys_file(path: Path, records: list[KeyRecord]) -> None:
    """Replace the keys file atomically, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"version": FILE_VERSION, "keys": [asdict(r) for r in records]}, indent=2) + "\n"
    old_mask = os.umask(0o077)
    try:
        write_atomic(path, body)
    finally:
        os.umask(old_mask)


def create_key(path: Path, role: str, name: Optional[str] = None, rate: Optional[str] = None) -> tuple[str, KeyRecord]:
    """Make a key, add its record to the keys file (made when missing) and return ``(key, record)``.

    The key is returned here and nowhere else: the file keeps its hash.

    Raises:
        ValueError: an unknown role, a bad name or rate, or a keys file that cannot be read.
    """
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    records = read_keys_file(path)
    taken = {r.id for r in records}
    key, key_id = new_key()
    while key_id in taken:
        key, key_id = new_key()
    record = KeyRecord(
        id=key_id, name=name or f"{role}-{key_id[:4]}", role=role, sha256=hash_key(key), created=now_iso(), rate=rate
    )
    write_keys_file(path, [*records, record])
    return key, record


def revoke_key(path: Path, key_id: str) -> KeyRecord:
    """Mark the key ``key_id`` revoked in the keys file; the service refuses it from its next request on.

    Raises:
        KeyError: no such key (names the ids there are).
    """
    records = read_keys_file(path)
    for i, record in enumerate(records):
        if record.id == key_id:
            if record.revoked is None:
                records[i] = record = replace(record, revoked=now_iso())
                write_keys_file(path, records)
            return record
    known = ", ".join(r.id for r in records) or "none"
    raise KeyError(f"no key with the id {key_id!r} in {str(path)!r} (ids: {known})")


# -- checking a presented key -------------------------------------------------------------------------------------
class KeyRing:
    """The keys of a keys file, read again whenever the file changes; :meth:`authenticate` checks a header.

    Args:
        path: the keys file; ``None``: no keys, every caller is :data:`ANONYMOUS` (admin).
        extra: records that are not in the file (``cliptuner serve``'s own readiness key).
    """

    def __init__(self, path: Optional[Path], extra: tuple[KeyRecord, ...] = ()) -> None:
        self.path = None if path is None else Path(path)
        self.extra = extra
        self._lock = threading.Lock()
        self._identity: Optional[tuple[int, int, int]] = None
        self._records: dict[str, KeyRecord] = {r.id: r for r in extra}
        self._error: Optional[str] = None
        self._dummy = hash_key(f"{KEY_PREFIX}_{'0' * ID_HEX}_{secrets.token_urlsafe(SECRET_BYTES)}")
        if self.path is not None:
            self._refresh()
            if self._error:
                raise ValueError(self._error)

    @property
    def enabled(self) -> bool:
        """Whether keys are checked (a keys file was given)."""
        return self.path is not None

    def records(self) -> list[KeyRecord]:
        """The records in force now (the file's, re-read when it changed, and the extra ones)."""
        self._refresh()
        return list(self._records.values())

    def _refresh(self) -> None:
        """Read the file again when its inode, size or mtime changed; on an error refuse every key."""
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
            identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            identity = None
        if identity == self._identity and identity is not None:
            return
        with self._lock:
            if identity == self._identity and identity is not None:
                return
            self._identity = identity
            if identity is None:
                self._records, self._error = {r.id: r for r in self.extra}, f"keys file {str(self.path)!r} is missing"
            else:
                try:
                    records = read_keys_file(self.path)
                    self._records, self._error = {**{r.id: r for r in records}, **{r.id: r for r in self.extra}}, None
                except (OSError, ValueError) as exc:
                    self._records, self._error = {r.id: r for r in self.extra}, str(exc)
            if self._error:
                logger.error("every key is refused until the keys file is fixed: %s", self._error)
            else:
                active = sum(r.revoked is None for r in self._records.values())
                logger.info("keys file read: %d keys in force", active)

    def authenticate(self, authorization: Optional[str]) -> Principal:
        """The caller of an ``authorization`` header value (``Bearer <key>``).

        Raises:
            Unauthenticated: missing, malformed, oversized or non-ASCII value; unknown, wrong or revoked key; an
                unreadable keys file. The message says which, never echoing the value.
        """
        if self.path is None:
            return ANONYMOUS
        if authorization is None or authorization == "":
            raise Unauthenticated("this service needs an API key: send the header 'authorization: Bearer <key>'")
        if isinstance(authorization, bytes):
            try:
                authorization = authorization.decode("ascii")
            except UnicodeDecodeError:
                raise Unauthenticated("the authorization header is not ASCII") from None
        if len(authorization) > MAX_HEADER_CHARS:
            raise Unauthenticated(f"the authorization header is over {MAX_HEADER_CHARS} characters")
        if not authorization.isascii():
            raise Unauthenticated("the authorization header is not ASCII")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("malformed authorization header: expected 'Bearer <key>'")
        key = key.strip()
        self._refresh()
        match = _KEY_RE.match(key)
        record = self._records.get(match.group(1)) if match else None
        presented = hash_key(key)
        same = hmac.compare_digest(presented, record.sha256 if record is not None else self._dummy)
        if self._error and (record is None or record not in self.extra):
            raise Unauthenticated("no key is accepted now: the service cannot read its keys file (see its log)")
        if record is None or not same:
            raise Unauthenticated("the API key is not valid")
        if record.revoked is not None:
            raise Unauthenticated(f"the API key {record.id} was revoked", key_id=record.id)
        return Principal(
            id=record.id,
            name=record.name,
            role=record.role,
            rate_per_s=record.rate_per_s,
            burst=rate_burst(record.rate),
        )


class RateLimiter:
    """A token bucket per key: a key limited to ``N/unit`` may make N calls at once, refilled at N per unit.

    A call is one gRPC call (one ``Client.post``, however many requests it streams) or one HTTP request.
    """

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, principal: Principal) -> None:
        """Count one call of ``principal``.

        Raises:
            RateLimited: the key is over its limit (names the key's name and its limit).
        """
        rate = principal.rate_per_s
        if rate is None or principal.id is None:
            return
        capacity = principal.burst or max(1.0, rate)
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(principal.id, (capacity, now))
            tokens = min(capacity, tokens + (now - at) * rate)
            if tokens < 1.0:
                self._buckets[principal.id] = (tokens, now)
                wait = (1.0 - tokens) / rate
                raise RateLimited(
                    f"the key {principal.name!r} is over its rate limit ({_describe_rate(rate)}); "
                    f"retry in {math.ceil(wait * 1000)} ms"
                )
            self._buckets[principal.id] = (tokens - 1.0, now)


def _describe_rate(rate: float) -> str:
    """Calls per second as the shortest readable form: 50/s, 10/m, 100/h."""
    for unit, seconds in (("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        per = rate * seconds
        if per >= 1 and abs(per - round(per)) < 1e-6:
            return f"{round(per)}/{unit}"
    return f"{rate:g}/s"


def internal_record(spec: str) -> KeyRecord:
    """The record of ``cliptuner serve``'s own key (role ``search``, for its readiness check), from ``ID:SHA256``.

    ``serve`` makes the key in memory and hands the gateway only its id and hash (``CLIPTUNER_INTERNAL_KEY``);
    it is never written to the keys file.

    Raises:
        ValueError: not ``ID:SHA256``.
    """
    key_id, _, digest = spec.partition(":")
    return KeyRecord(id=key_id, name="serve", role="search", sha256=digest, created=now_iso())


def new_key() -> tuple[str, str]:
    """A fresh ``(key, key_id)``, not stored anywhere."""
    key_id = secrets.token_hex(ID_HEX // 2)
    return f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}", key_id


def describe(records: list[KeyRecord], last_used: dict[str, str]) -> list[dict[str, Any]]:
    """Rows for ``cliptuner keys list``: id, name, role, rate, created, last used, revoked — never the hash."""
    return [
        {
            "id": r.id,
            "name": r.name,
            "role": r.role,
            "rate": r.rate or "-",
            "created": r.created,
            "last_used": last_used.get(r.id, "-"),
            "revoked": r.revoked or "-",
        }
        for r in records
    ]
