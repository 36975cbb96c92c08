"""Which image URIs a client may make the service read: one policy, default deny. Torch-free.

A client names an image by ``uri``; the service reads it only when :class:`UriPolicy` allows it:

* ``data:`` URIs (base64 or percent-encoded) are always allowed; they are decoded here, within the byte limit.
* Local paths and ``file://`` URIs are allowed only under the policy's ``roots``. A relative path is taken from
  the first root; every path is resolved (``..`` and symlinks followed) BEFORE it must lie under a resolved
  root, so neither ``..``, an absolute path nor a symlink placed inside a root reaches a file outside; the
  resolved path is what gets read. ``file://host/...`` is refused (only ``file:///path`` and
  ``file://localhost/path``).
* ``http://`` and ``https://`` are allowed only for the ``allowed_hosts`` (``host`` — the scheme's default port
  — or ``host:port``). Nothing is fetched when the uri is checked: :class:`RemoteImage` fetches the body when
  it is needed (:meth:`UriPolicy.fetch`), directly (no proxy from the environment), reading at most
  ``max_bytes``, within ``timeout`` seconds, and following redirects only to the same scheme, host and port,
  at most ``max_redirects`` times.
* Every other uri (another scheme, ``s3://``, ``ftp://``…) is refused.

Every refusal raises :class:`UriRefused` with ONE message, whether or not the path exists, and the message
never echoes a server path or the policy's roots: ``doc 'x': uri is not allowed: local paths must lie under
the service's image roots, http(s) only for allow-listed hosts``. A file under a root that cannot be read or
decoded, or an allowed http(s) uri that cannot be fetched, may say so.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import unquote, unquote_to_bytes, urljoin, urlsplit

from cliptuner.model.images import DEFAULT_LIMITS

logger = logging.getLogger(__name__)

REFUSED = "local paths must lie under the service's image roots, http(s) only for allow-listed hosts"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_READ_CHUNK = 64 * 1024


class UriRefused(ValueError):
    """A uri (or a path) the policy does not allow; the message names the item, never the server's folders."""


class FetchError(ValueError):
    """An allowed http(s) uri could not be fetched: an error status, no answer in time, too big, too many hops."""


def decode_data_uri(uri: str, name: str, max_bytes: int = DEFAULT_LIMITS.max_bytes) -> bytes:
    """The bytes of a ``data:`` URI (base64 or percent-encoded).

    Raises:
        ValueError: malformed, invalid base64, empty, or over ``max_bytes`` (checked on the payload's length
            before decoding, and again after); the message starts with ``name``.
    """
    header, sep, payload = uri.partition(",")
    if not sep:
        raise ValueError(f"{name}: malformed data URI (no ',')")
    if len(payload) > 4 * max_bytes // 3 + 4:
        raise ValueError(f"{name}: data URI is over the limit of {max_bytes} bytes")
    if header.lower().endswith(";base64"):
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"{name}: data URI is not valid base64 ({exc})") from None
    else:
        data = unquote_to_bytes(payload)  # percent-encoded bytes, not text
    if not data:
        raise ValueError(f"{name}: data URI holds no data")
    if len(data) > max_bytes:
        raise ValueError(f"{name}: data URI holds {len(data)} bytes, over the limit of {max_bytes}")
    return data


def _host_port(entry: str) -> tuple[str, Optional[int]]:
    """``host`` or ``host:port`` (``[v6]:port``) of an allow-list entry, lower-cased; None for no port."""
    text = entry.strip().lower()
    if not text or any(c in text for c in "/@?#") or any(c.isspace() for c in text):
        raise ValueError(f"allowed host must be 'host' or 'host:port', got {entry!r}")
    try:
        parts = urlsplit("//" + text)
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host:
        raise ValueError(f"allowed host must be 'host' or 'host:port', got {entry!r}")
    return host, port


def _origin(url: str) -> Optional[tuple[str, str, int]]:
    """``(scheme, host, port)`` of an http(s) URL, the port defaulted by scheme; None when it has none."""
    try:
        parts = urlsplit(url)
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:
        return None
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    return scheme, host, _DEFAULT_PORTS[scheme] if port is None else port


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to the same scheme, host and port, at most ``limit`` times."""

    def __init__(self, origin: tuple[str, str, int], limit: int, name: str) -> None:
        super().__init__()
        self.origin, self.limit, self.name = origin, limit, name
        self.followed = 0
        self.max_redirections = limit + 1  # counted here, with a clear message

    def http_error_302(self, req: Any, fp: Any, code: int, msg: str, headers: Any) -> Any:
        location = headers.get("location") or headers.get("uri")
        if location is not None and _origin(urljoin(req.full_url, location)) != self.origin:
            fp.close()  # checked before urllib's own scheme check, so that every other target reads the same
            raise UriRefused(f"{self.name}: uri is not allowed: {REFUSED} (it redirects to another host)")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        if _origin(newurl) != self.origin:
            fp.close()
            raise UriRefused(f"{self.name}: uri is not allowed: {REFUSED} (it redirects to another host)")
        self.followed += 1
        if self.followed > self.limit:
            fp.close()
            raise FetchError(f"{self.name}: uri redirects more than {self.limit} times")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


@dataclass(frozen=True)
class RemoteImage:
    """An allowed http(s) image, fetched when it is needed (:meth:`read`), not when the uri is checked."""

    url: str
    policy: UriPolicy
    max_bytes: int = DEFAULT_LIMITS.max_bytes  # largest body read

    def read(self, name: str) -> bytes:
        """The body (see :meth:`UriPolicy.fetch`)."""
        return self.policy.fetch(self.url, name, self.max_bytes)


@dataclass(frozen=True)
class UriPolicy:
    """Which uris a client may make the service read (see the module docstring). The default allows only ``data:``.

    ``roots`` are resolved (``~``, symlinks) when the policy is built; a relative root is taken from the current
    directory (the Executors make them absolute first, from the workspace).
    """

    roots: tuple[Path, ...] = ()  # folders local paths must lie under; relative paths are taken from the first
    allowed_hosts: tuple[str, ...] = ()  # "host" (the scheme's default port) or "host:port"; empty: no http(s)
    timeout: float = 10.0  # seconds for one http(s) fetch, from connecting to the last byte
    max_redirects: int = 3  # same-origin redirects followed per fetch

    def __post_init__(self) -> None:
        if isinstance(self.roots, (str, os.PathLike)) or isinstance(self.allowed_hosts, str):
            raise ValueError(f"roots and allowed_hosts must be sequences, got {self.roots!r}, {self.allowed_hosts!r}")
        object.__setattr__(self, "roots", tuple(Path(root).expanduser().resolve() for root in self.roots))
        hosts = []
        for entry in self.allowed_hosts:
            host, port = _host_port(str(entry))
            host = f"[{host}]" if ":" in host else host
            hosts.append(host if port is None else f"{host}:{port}")
        object.__setattr__(self, "allowed_hosts", tuple(hosts))
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or not self.timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        if isinstance(self.max_redirects, bool) or not isinstance(self.max_redirects, int) or self.max_redirects < 0:
            raise ValueError(f"max_redirects must be an integer >= 0, got {self.max_redirects!r}")

    # -- checks --------------------------------------------------------------------------------------------------
    def local_path(self, path: Union[str, os.PathLike], what: str) -> Path:
        """The resolved file a local path names, when it lies under a root.

        Args:
            path: absolute, or relative to the first root.
            what: how errors name it (``"doc 'x': uri"``, ``"line 3: image 'a.png'"``).

        Raises:
            UriRefused: no roots, or the resolved path (symlinks and ``..`` followed) lies under none of them —
                the same message whether or not the path exists.
        """
        refused = UriRefused(f"{what} is not allowed: {REFUSED}")
        if not self.roots:
            raise refused
        try:
            resolved = (self.roots[0] / Path(path)).resolve()  # an absolute path replaces the root
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
            raise refused from None
        if not any(resolved.is_relative_to(root) for root in self.roots):
            logger.debug("%s: refused %r (resolves outside the image roots)", what, str(path))
            raise refused
        return resolved

    def allows_url(self, url: str) -> bool:
        """True when ``url`` is http(s) on an allowed host (and port)."""
        origin = _origin(url)
        if origin is None or not self.allowed_hosts:
            return False
        scheme, host, port = origin
        for entry in self.allowed_hosts:
            allowed_host, allowed_port = _host_port(entry)
            if host == allowed_host and port == (_DEFAULT_PORTS[scheme] if allowed_port is None else allowed_port):
                return True
        return False

    def source(self, uri: str, name: str, max_bytes: int = DEFAULT_LIMITS.max_bytes) -> Union[bytes, str, RemoteImage]:
        """What a ``uri`` lets the service read, checked but not fetched or decoded.

        Args:
            uri: a ``data:`` URI, a local path, a ``file://`` URI or an ``http(s)://`` URL.
            name: how errors name the item (``"doc 'abc'"``).
            max_bytes: the largest image accepted (a ``data:`` URI's bytes, an http(s) body).

        Returns:
            The bytes of a ``data:`` URI, the resolved path (``str``) of a local file, or a :class:`RemoteImage`.

        Raises:
            UriRefused: anything the policy does not allow (one message, see the module docstring).
            ValueError: a malformed or oversized ``data:`` URI.
        """
        if uri[:5].lower() == "data:":
            return decode_data_uri(uri, name, max_bytes)
        refused = UriRefused(f"{name}: uri is not allowed: {REFUSED}")
        try:
            parsed = urlsplit(uri)
        except ValueError:
            raise refused from None
        scheme = parsed.scheme.lower()
        if scheme in _DEFAULT_PORTS:
            if not self.allows_url(uri):
                logger.debug("%s: refused %r (host not allowed)", name, uri[:200])
                raise refused
            return RemoteImage(uri, self, max_bytes)
        if scheme == "file":
            if parsed.netloc.lower() not in ("", "localhost"):  # file://images/a.png would silently read /a.png
                raise refused
            path = unquote(parsed.path)
        elif scheme and len(scheme) > 1:  # a one-letter scheme is a Windows drive letter
            raise refused
        else:
            path = uri
        return str(self.local_path(path, f"{name}: uri"))

    # -- http(s) -------------------------------------------------------------------------------------------------
    def fetch(self, url: str, name: str, max_bytes: int = DEFAULT_LIMITS.max_bytes) -> bytes:
        """The body of an allowed http(s) URL: at most ``max_bytes``, within ``timeout``, same-origin redirects.

        Raises:
            UriRefused: the host is not allowed, or a redirect leads to another scheme, host or port.
            FetchError: an HTTP error status, a connection failure or timeout, too many redirects, an empty
                body, or a body over ``max_bytes`` (reading stops there); every message starts with ``name``.
        """
        origin = _origin(url)
        if origin is None or not self.allows_url(url):
            raise UriRefused(f"{name}: uri is not allowed: {REFUSED}")
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), _SameOriginRedirects(origin, self.max_redirects, name)
        )
        request = urllib.request.Request(url, headers={"User-Agent": "cliptuner", "Accept": "image/*"})
        over = FetchError(f"{name}: uri body is over the limit of {max_bytes} bytes")
        deadline = time.monotonic() + float(self.timeout)
        chunks: list[bytes] = []
        size = 0
        try:
            with opener.open(request, timeout=float(self.timeout)) as response:
                length = response.headers.get("Content-Length", "")
                if length.strip().isdigit() and int(length) > max_bytes:
                    raise over
                while True:
                    chunk = response.read(min(_READ_CHUNK, max_bytes + 1 - size))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > max_bytes:
                        raise over
                    if time.monotonic() > deadline:
                        raise TimeoutError("timed out")
        except (UriRefused, FetchError):
            raise
        except urllib.error.HTTPError as exc:
            raise FetchError(f"{name}: uri could not be fetched (HTTP {exc.code})") from None
        except urllib.error.URLError as exc:
            raise FetchError(f"{name}: uri could not be fetched ({_reason(exc.reason)})") from None
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise FetchError(f"{name}: uri could not be fetched ({_reason(exc)})") from None
        if not size:
            raise FetchError(f"{name}: uri body is empty")
        logger.debug("%s: fetched %d bytes from %s", name, size, url[:200])
        return b"".join(chunks)


def _reason(exc: Any) -> str:
    if isinstance(exc, TimeoutError) or "timed out" in str(exc):
        return "timed out"
    return type(exc).__name__ if isinstance(exc, BaseException) else str(exc)


DATA_ONLY = UriPolicy()  # data: URIs only: what the library allows when no policy is given
