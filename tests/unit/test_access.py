"""Which uris the service reads (:class:`cliptuner.serve.access.UriPolicy`) and the bounds on one request
(:class:`cliptuner.serve.limits.RequestLimits`).

http(s) cases run against a ``http.server`` on 127.0.0.1 (an ephemeral port, in a thread); nothing else is
contacted.
"""

import base64
import http.server
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from cliptuner.model.images import DEFAULT_LIMITS, ImageLimits
from cliptuner.serve.access import REFUSED, FetchError, RemoteImage, UriPolicy, UriRefused, decode_data_uri
from cliptuner.serve.content import image_source, make_item
from cliptuner.serve.limits import RequestLimits
from cliptuner.train.data import DataError, load_csv, load_karpathy

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # bytes served as an image (never decoded here)
REFUSED_MESSAGE = rf"^doc 'x': uri is not allowed: {re.escape(REFUSED)}$"


@pytest.fixture
def root(tmp_path) -> Path:
    """``tmp_path/root`` with ``a.png`` and ``sub/b.png``; ``tmp_path/outside.png`` beside it."""
    inside = tmp_path / "root"
    (inside / "sub").mkdir(parents=True)
    (inside / "a.png").write_bytes(PNG)
    (inside / "sub" / "b.png").write_bytes(PNG)
    (tmp_path / "outside.png").write_bytes(PNG)
    return inside


@pytest.fixture
def policy(root) -> UriPolicy:
    return UriPolicy(roots=(root,))


def refused(policy: UriPolicy, uri: str) -> str:
    with pytest.raises(UriRefused, match=REFUSED_MESSAGE) as caught:
        policy.source(uri, "doc 'x'")
    return str(caught.value)


# -- local paths -------------------------------------------------------------------------------------------------
def test_paths_under_a_root_resolve_to_the_file_under_it(root, policy):
    real = root.resolve()
    for uri in [
        "a.png",
        "sub/b.png",
        "sub/../a.png",
        "./sub/b.png",
        str(root / "a.png"),
        (root / "a.png").as_uri(),
        f"file://localhost{root / 'sub' / 'b.png'}",
    ]:
        resolved = Path(policy.source(uri, "doc 'x'"))
        assert resolved.is_absolute() and resolved.is_relative_to(real) and resolved.is_file(), uri
    assert Path(policy.source("sub/b.png", "doc 'x'")) == real / "sub" / "b.png"


def test_a_relative_path_is_taken_from_the_first_root(tmp_path, root):
    other = tmp_path / "other"
    other.mkdir()
    (other / "c.png").write_bytes(PNG)
    both = UriPolicy(roots=(root, other))
    assert Path(both.source("a.png", "doc 'x'")) == root.resolve() / "a.png"
    assert Path(both.source(str(other / "c.png"), "doc 'x'")) == other.resolve() / "c.png"  # any root, absolute
    assert Path(both.source("../other/c.png", "doc 'x'")) == other.resolve() / "c.png"  # judged once resolved
    refused(both, "../outside.png")


def test_percent_escapes_in_file_uris_are_decoded(root, policy):
    (root / "with space.png").write_bytes(PNG)
    assert Path(policy.source(f"file://{root}/with%20space.png", "doc 'x'")) == (root / "with space.png").resolve()


@pytest.mark.parametrize(
    "make_uri",
    [
        lambda root: str(root.parent / "outside.png"),  # absolute path outside
        lambda root: "../outside.png",  # ../ escape
        lambda root: "sub/../../outside.png",
        lambda root: (root.parent / "outside.png").as_uri(),  # file:// outside
        lambda root: f"file://localhost{root.parent / 'outside.png'}",
        lambda root: "/etc/hostname",
        lambda root: f"{root}-sibling/a.png",  # a folder whose name only starts like the root's
    ],
)
def test_paths_outside_every_root_are_refused_without_naming_a_folder(root, policy, make_uri):
    uri = make_uri(root)
    message = refused(policy, uri)
    assert str(root.parent) not in message and uri not in message


def test_a_symlink_inside_a_root_that_points_outside_is_refused(root, policy):
    os.symlink(root.parent / "outside.png", root / "link.png")
    os.symlink(root.parent, root / "up")
    for uri in ["link.png", str(root / "link.png"), "up/outside.png", (root / "link.png").as_uri()]:
        refused(policy, uri)


def test_a_symlink_that_stays_inside_is_read_through_its_target(root, policy):
    os.symlink(root / "sub" / "b.png", root / "alias.png")
    assert Path(policy.source("alias.png", "doc 'x'")) == (root / "sub" / "b.png").resolve()


def test_a_symlinked_root_is_resolved_when_the_policy_is_built(root, tmp_path):
    os.symlink(root, tmp_path / "root-link")
    linked = UriPolicy(roots=(tmp_path / "root-link",))
    assert linked.roots == (root.resolve(),)
    assert Path(linked.source("a.png", "doc 'x'")) == root.resolve() / "a.png"


def test_a_missing_path_outside_gets_the_same_message_as_an_existing_one(root, policy):
    existing = refused(policy, str(root.parent / "outside.png"))
    missing = refused(policy, str(root.parent / "no-such-file.png"))
    assert existing == missing
    assert refused(policy, "../no-such-file.png") == existing


def test_a_missing_file_under_a_root_passes_the_check_and_is_reported_when_read(root, policy):
    assert Path(policy.source("later.png", "doc 'x'")) == root.resolve() / "later.png"


@pytest.mark.parametrize(
    "uri",
    [
        "file://images/a.png",
        "file://example.com/etc/passwd",
        "s3://bucket/a.png",
        "ftp://127.0.0.1/a.png",
        "gopher://x/y",
        "javascript:alert(1)",
        "http://[::1",
    ],
)
def test_file_uris_with_a_host_and_other_schemes_are_refused(policy, uri):
    refused(policy, uri)


def test_without_roots_every_local_path_is_refused(root):
    for uri in ["a.png", str(root / "a.png"), (root / "a.png").as_uri()]:
        refused(UriPolicy(), uri)


def test_a_symlink_loop_or_a_nul_byte_is_refused(root, policy):
    os.symlink(root / "loop-b", root / "loop-a")
    os.symlink(root / "loop-a", root / "loop-b")
    refused(policy, "loop-a")
    refused(policy, "a\x00.png")


def test_local_path_checks_a_path_for_another_caller_with_its_own_label(root, policy):
    assert policy.local_path(str(root / "sub" / "b.png"), "line 2: image 'b.png'") == root.resolve() / "sub" / "b.png"
    with pytest.raises(UriRefused, match=rf"^line 3: image '\.\./x\.png' is not allowed: {re.escape(REFUSED)}$"):
        policy.local_path(str(root / ".." / "outside.png"), "line 3: image '../x.png'")


def test_pairs_files_read_through_the_policy_refuse_rows_outside_before_looking_at_them(root, policy):
    os.symlink(root / "sub" / "b.png", root / "alias.png")
    csv_path = root / "pairs.csv"
    rows = [
        "a.png,inside",
        "alias.png,a link inside",
        "../outside.png,escape",
        f"{root.parent / 'missing.png'},missing outside",
        "missing.png,missing inside",
    ]
    csv_path.write_text("\n".join(["image,caption", *rows]) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_csv(csv_path, resolve_image=policy.local_path)
    message = str(caught.value)
    assert f"line 4: image '../outside.png' is not allowed: {REFUSED}" in message
    assert f"line 5: image {str(root.parent / 'missing.png')!r} is not allowed: {REFUSED}" in message
    assert "line 6: image file 'missing.png' not found" in message and "looked at" not in message
    csv_path.write_text("image,caption\na.png,inside\nalias.png,a link inside\n", encoding="utf-8")
    pairs = load_csv(csv_path, resolve_image=policy.local_path)
    assert pairs.images == [str(root.resolve() / "a.png"), str(root.resolve() / "sub" / "b.png")]  # what is read
    assert load_csv(csv_path).images[1] == str(root / "alias.png")  # without a policy: as written (a local user)
    (root / "dataset.json").write_text(
        '{"images": [{"filename": "../outside.png", "sentences": [{"raw": "x"}]}]}', encoding="utf-8"
    )
    with pytest.raises(DataError, match=rf"image 0 \('\.\./outside\.png'\) is not allowed: {re.escape(REFUSED)}"):
        load_karpathy(root / "dataset.json", resolve_image=policy.local_path)


# -- data: URIs --------------------------------------------------------------------------------------------------
def test_data_uris_are_always_allowed_and_size_limited():
    payload = base64.b64encode(PNG).decode()
    for policy in (UriPolicy(), UriPolicy(allowed_hosts=("example.com",))):
        assert policy.source(f"data:image/png;base64,{payload}", "doc 'x'") == PNG
        assert policy.source(f"DATA:image/png;BASE64,{payload}", "doc 'x'") == PNG
    with pytest.raises(ValueError, match=r"^doc 'x': data URI holds 1032 bytes, over the limit of 1031$"):
        UriPolicy().source(f"data:image/png;base64,{payload}", "doc 'x'", max_bytes=1031)
    assert UriPolicy().source(f"data:image/png;base64,{payload}", "doc 'x'", max_bytes=1032) == PNG
    with pytest.raises(ValueError, match=r"^doc 'x': data URI is over the limit of 10 bytes"):
        decode_data_uri(f"data:image/png;base64,{payload}", "doc 'x'", max_bytes=10)
    with pytest.raises(ValueError, match=r"^doc 'x': data URI is not valid base64"):
        decode_data_uri("data:image/png;base64,@@@", "doc 'x'")


# -- http(s) -----------------------------------------------------------------------------------------------------
class _Images(http.server.BaseHTTPRequestHandler):
    """Routes of the test server; ``server.release`` holds ``/slow`` back until the test lets it go."""

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send(self, body: bytes, length: bool = True) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        port = self.server.server_address[1]
        self.server.hits.append(self.path)
        if self.path == "/img.png":
            self._send(PNG)
        elif self.path == "/big":
            self._send(b"x" * 5000)
        elif self.path == "/big-unannounced":  # no Content-Length: the reader must stop by itself
            self.close_connection = True
            self._send(b"x" * 50_000, length=False)
        elif self.path == "/same-host":
            self._redirect("/hop")
        elif self.path == "/hop":
            self._redirect(f"http://127.0.0.1:{port}/img.png")
        elif self.path == "/other-host":
            self._redirect(f"http://localhost:{port}/img.png")  # same machine, another host name
        elif self.path == "/other-port":
            self._redirect(f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}/img.png")
        elif self.path == "/file":
            self._redirect("file:///etc/hostname")
        elif self.path.startswith("/loop"):
            self._redirect(f"/loop{len(self.path)}")
        elif self.path == "/slow":
            self.server.release.wait(30)
            self._send(PNG)
        elif self.path == "/empty":
            self._send(b"")
        else:
            self.send_error(404)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a client that stopped reading: expected here
        pass


@pytest.fixture(scope="module")
def server():
    httpd = _Server(("127.0.0.1", 0), _Images)
    httpd.hits = []
    httpd.release = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def web(server) -> tuple[str, UriPolicy]:
    """The server's base URL and a policy that allows it."""
    host = f"127.0.0.1:{server.server_address[1]}"
    server.hits.clear()
    return f"http://{host}", UriPolicy(allowed_hosts=(host,), timeout=5.0)


def test_http_is_refused_unless_the_host_is_allowed(server, web, policy):
    base, allowed = web
    refused(policy, f"{base}/img.png")  # no hosts allowed by default
    refused(UriPolicy(allowed_hosts=("127.0.0.1",)), f"{base}/img.png")  # a host alone means its default port
    refused(UriPolicy(allowed_hosts=("127.0.0.1:1",)), f"{base}/img.png")  # another port
    refused(allowed, f"https://localhost:{server.server_address[1]}/img.png")  # another host name
    refused(allowed, f"http://x@localhost:{server.server_address[1]}/img.png")  # userinfo does not make a host
    with pytest.raises(UriRefused, match=r"^doc 'x': uri is not allowed"):
        policy.fetch(f"{base}/img.png", "doc 'x'")
    assert server.hits == []  # nothing was requested


def test_an_allowed_host_is_fetched_when_read_not_when_checked(server, web):
    base, allowed = web
    source = allowed.source(f"{base}/img.png", "doc 'x'")
    assert isinstance(source, RemoteImage) and server.hits == []
    assert source.read("doc 'x'") == PNG
    assert server.hits == ["/img.png"]
    assert allowed.source(f"HTTP://127.0.0.1:{server.server_address[1]}/img.png", "doc 'x'").read("doc 'x'") == PNG


def test_allowed_hosts_are_normalised_and_checked():
    assert UriPolicy(allowed_hosts=("Images.Example.COM", "[::1]:8080", " cdn.example.com:443 ")).allowed_hosts == (
        "images.example.com",
        "[::1]:8080",
        "cdn.example.com:443",
    )
    policy = UriPolicy(allowed_hosts=("images.example.com",))
    assert policy.allows_url("https://images.example.com/a.png") and policy.allows_url("http://images.example.com/a")
    assert not policy.allows_url("https://images.example.com:8443/a.png")
    assert not policy.allows_url("https://images.example.com.evil.net/a.png")
    for bad in ("http://example.com", "example.com/path", "user@example.com", "", "example.com:99999"):
        with pytest.raises(ValueError, match="allowed host must be 'host' or 'host:port'"):
            UriPolicy(allowed_hosts=(bad,))


@pytest.mark.parametrize("path", ["/big", "/big-unannounced"])
def test_a_body_over_the_limit_is_refused(web, path):
    base, allowed = web
    with pytest.raises(FetchError, match=r"^doc 'x': uri body is over the limit of 1000 bytes$"):
        allowed.source(f"{base}{path}", "doc 'x'", max_bytes=1000).read("doc 'x'")
    assert len(allowed.fetch(f"{base}/big", "doc 'x'", max_bytes=5000)) == 5000  # at the limit it is read


def test_a_redirect_to_the_same_host_is_followed(server, web):
    base, allowed = web
    assert allowed.fetch(f"{base}/same-host", "doc 'x'") == PNG
    assert server.hits == ["/same-host", "/hop", "/img.png"]


@pytest.mark.parametrize("path", ["/other-host", "/other-port", "/file"])
def test_a_redirect_elsewhere_is_refused(server, web, path):
    base, allowed = web
    with pytest.raises(UriRefused, match=r"^doc 'x': uri is not allowed: .* \(it redirects to another host\)$"):
        allowed.fetch(f"{base}{path}", "doc 'x'")
    assert server.hits == [path]  # the target was never requested


def test_redirects_are_followed_a_few_times_only(server, web):
    base, _ = web
    limited = UriPolicy(allowed_hosts=(base.removeprefix("http://"),), max_redirects=2)
    with pytest.raises(FetchError, match=r"^doc 'x': uri redirects more than 2 times$"):
        limited.fetch(f"{base}/loop", "doc 'x'")
    assert len(server.hits) == 3
    none = UriPolicy(allowed_hosts=(base.removeprefix("http://"),), max_redirects=0)
    with pytest.raises(FetchError, match="redirects more than 0 times"):
        none.fetch(f"{base}/same-host", "doc 'x'")


def test_a_server_that_does_not_answer_in_time_is_refused(server, web):
    base, _ = web
    impatient = UriPolicy(allowed_hosts=(base.removeprefix("http://"),), timeout=0.2)
    try:
        with pytest.raises(FetchError, match=r"^doc 'x': uri could not be fetched \(timed out\)$"):
            impatient.fetch(f"{base}/slow", "doc 'x'")
    finally:
        server.release.set()


def test_error_statuses_and_empty_bodies_are_named(web):
    base, allowed = web
    with pytest.raises(FetchError, match=r"^doc 'x': uri could not be fetched \(HTTP 404\)$"):
        allowed.fetch(f"{base}/nothing-here", "doc 'x'")
    with pytest.raises(FetchError, match=r"^doc 'x': uri body is empty$"):
        allowed.fetch(f"{base}/empty", "doc 'x'")


def test_image_source_and_make_item_apply_the_policy(root, policy, web):
    base, allowed = web
    assert image_source("doc 'x'", uri="a.png", policy=policy) == str(root.resolve() / "a.png")
    with pytest.raises(UriRefused, match=REFUSED_MESSAGE):
        image_source("doc 'x'", uri="a.png")  # default: data: URIs only
    with pytest.raises(UriRefused, match=REFUSED_MESSAGE):
        make_item("doc 'x'", text="a caption", uri="../outside.png", policy=policy)
    item = make_item("doc 'x'", uri=f"{base}/img.png", policy=allowed, limits=ImageLimits(max_bytes=2000))
    assert isinstance(item.image, RemoteImage) and item.image.max_bytes == 2000


# -- request limits ----------------------------------------------------------------------------------------------
def test_request_limits_have_the_documented_defaults_and_refuse_bad_values():
    limits = RequestLimits()
    assert (limits.max_docs, limits.max_text_chars, limits.max_limit) == (1024, 10_000, 1000)
    assert limits.max_blob_bytes == DEFAULT_LIMITS.max_bytes == 32 * 1024 * 1024
    assert limits.max_request_bytes == 256 * 1024 * 1024
    assert limits.image_limits.max_bytes == limits.max_blob_bytes
    for field, value in [
        ("max_docs", 0),
        ("max_text_chars", -1),
        ("max_limit", 2.5),
        ("max_pairs", True),
        ("max_request_bytes", "1"),
    ]:
        with pytest.raises(ValueError, match=rf"^{field} must be a positive integer, got {value!r}$"):
            RequestLimits(**{field: value})
    with pytest.raises(ValueError, match="max_blob_bytes .* must not exceed max_request_bytes"):
        RequestLimits(max_blob_bytes=100, max_request_bytes=10)


def test_request_limits_check_counts_texts_blobs_and_totals():
    limits = RequestLimits(max_docs=3, max_text_chars=5, max_blob_bytes=10, max_request_bytes=25)
    limits.check_count(3)
    with pytest.raises(ValueError, match=r"^4 docs in one request is over the limit of 3$"):
        limits.check_count(4)
    with pytest.raises(ValueError, match=r"^7 pairs in one request is over the limit of 6; use a file$"):
        limits.check_count(7, "pairs", 6, "; use a file")
    assert limits.content_bytes("doc 'a'", text="12345") == 0
    with pytest.raises(ValueError, match=r"^doc 'a': text is 6 characters long, over the limit of 5$"):
        limits.content_bytes("doc 'a'", text="123456")
    with pytest.raises(ValueError, match=r"^doc 'b': blob is 11 bytes, over the limit of 10$"):
        limits.content_bytes("doc 'b'", blob=b"x" * 11)
    size = limits.content_bytes("doc 'c'", blob=b"x" * 10, tensor=np.zeros((2, 2, 3), np.uint8), uri="data:,ab")
    assert size == 10 + 12 + 8  # the blob, the tensor's bytes, the uri's length
    limits.check_total(25)
    with pytest.raises(ValueError, match=r"add up to more than the limit of 25 bytes \(at least 26\)"):
        limits.check_total(26)
