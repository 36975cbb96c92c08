"""The HTTP front (`cliptuner/serve/http_front.py`) without a Flow: a stand-in gateway with the same interface.

The refusals over real HTTP (uvicorn on 127.0.0.1), keys and roles (refused before the body is read, audited, the
header forwarded), the gRPC gateway's refusals as HTTP statuses (a stand-in gRPC server and Jina's own client), and
a fuzz run from the app's own OpenAPI schema (schemathesis, in-process): no 5xx, every answer as the schema says,
bodies off the schema refused, the app answering after.
"""

import base64
import http.client
import json
import tempfile
import urllib.error
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, settings

from cliptuner.serve.access import UriPolicy
from cliptuner.serve.audit import LOG_NAME, AuditLog, read_usage
from cliptuner.serve.http_front import MAX_BODY_BYTES, HttpFront, JinaGateway, RequestError, build_app
from cliptuner.serve.keys import KeyRing, create_key, revoke_key

schemathesis = pytest.importorskip("schemathesis", reason="pip install -e '.[dev]' installs schemathesis")
from schemathesis import checks  # noqa: E402 (after the skip)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32  # the media type is read from the first bytes
REFUSED = "/train"  # the one endpoint the stand-in service refuses (as a Flow refuses a bad request: 422)


class FakeGateway:
    """The gRPC gateway's interface: canned docs for any endpoint, the service's refusal (422) for :data:`REFUSED`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[dict], dict]] = []
        self.authorizations: list = []

    def post(self, endpoint: str, docs: list[dict], parameters: dict, authorization=None) -> list[dict]:
        self.calls.append((endpoint, docs, parameters))
        self.authorizations.append(authorization)
        if endpoint == REFUSED:
            raise RequestError(422, f"{endpoint}: the service refused the request")
        answer = []
        for i, doc in enumerate(docs):
            out = {"id": doc.get("id") or f"doc-{i}", "tags": doc.get("tags", {}), "model_version": "v1"}
            if "text" in doc:
                out["text"] = doc["text"]
            out["embedding"] = [0.6, 0.8]
            out["scores"] = [0.9]
            out["matches"] = [{"id": "m0", "uri": "images/m0.png", "tags": {}, "model_version": "v1", "score": 0.9}]
            answer.append(out)
        return answer


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    root = tmp_path_factory.mktemp("front")
    (root / "data" / "images").mkdir(parents=True)
    (root / "data" / "images" / "a.png").write_bytes(PNG)
    (root / "data" / "pairs.csv").write_text("image,caption\nimages/a.png,a\n")
    (root / "secret.png").write_bytes(PNG)
    return root


@pytest.fixture(scope="module")
def front(roots):
    gateway = FakeGateway()
    server = HttpFront("127.0.0.1", 0, gateway, UriPolicy(roots=(roots / "data",), allowed_hosts=("127.0.0.1",)))
    server.start()
    server.url = f"http://127.0.0.1:{server.port}"
    server.gateway = gateway
    try:
        yield server
    finally:
        server.stop()


def call(front, body, content_type="application/json", origin=None):
    """POST /post; (status, headers, parsed JSON answer)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": content_type, **({"Origin": origin} if origin else {})}
    request = urllib.request.Request(front.url + "/post", data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read())


def get(front, path):
    try:
        with urllib.request.urlopen(front.url + path, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def test_post_forwards_docs_and_answers_json(front):
    blob = base64.b64encode(PNG).decode()
    body = {"execEndpoint": "/search", "data": [{"text": "a star"}, {"blob": blob}], "parameters": {"limit": 1}}
    status, headers, answer = call(front, body)
    assert status == 200 and headers["Content-Type"] == "application/json", answer
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["Cache-Control"] == "no-store"
    assert [d["id"] for d in answer["data"]] == ["doc-0", "doc-1"] and answer["data"][0]["matches"][0]["score"] == 0.9
    endpoint, docs, parameters = front.gateway.calls[-1]
    assert endpoint == "/search" and docs[1]["blob"] == PNG and parameters == {"limit": 1}
    status, _, answer = call(front, {"exec_endpoint": "/status"})  # Jina's other spelling, no data
    assert status == 200 and answer == {"data": []}
    status, _, answer = call(front, {"execEndpoint": REFUSED})  # the service's refusal, its message
    assert status == 422 and "refused" in answer["error"]


def test_a_body_over_the_limit_is_refused_before_it_is_read(front):
    connection = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)
    connection.putrequest("POST", "/post")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
    connection.endheaders()  # not one byte of the body: an answer proves it was not waited for
    response = connection.getresponse()
    assert response.status == 413 and response.headers["Connection"] == "close"
    assert "over the limit" in json.loads(response.read())["error"]
    connection.close()
    connection = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)  # no Content-Length: chunked
    connection.putrequest("POST", "/post")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]
    connection.close()
    status, _, _ = call(front, {"execEndpoint": "/status"})
    assert status == 200


def test_what_a_cross_site_page_could_send_is_refused(front):
    status, _, answer = call(front, {"execEndpoint": "/status"}, content_type="text/plain")
    assert status == 415 and "application/json" in answer["error"]
    status, _, answer = call(front, b"execEndpoint=/status", content_type="application/x-www-form-urlencoded")
    assert status == 415
    status, _, answer = call(front, {"execEndpoint": "/status"}, origin="http://evil.example")
    assert status == 403 and "another origin" in answer["error"]
    status, _, answer = call(front, {"execEndpoint": "/status"}, origin=front.url)  # the page itself
    assert status == 200
    status, headers, _ = get(front, "/")
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{not json", "not JSON"),
        (b"[" * 100_000, "not JSON"),  # nested beyond the parser's recursion
        (b"\xff\xfe\x00", "not JSON"),
        (b"[1]", "must be a JSON object"),
        ({"execEndpoint": "search"}, "'execEndpoint' must name an endpoint"),
        ({"execEndpoint": None, "exec_endpoint": "/search"}, "endpoint once"),
        ({"execEndpoint": "/search", "parameters": 0}, "'parameters' must be an object"),
        ({"execEndpoint": "/search", "data": {"text": "x"}}, "'data' must be a list"),
        ({"execEndpoint": "/search", "data": [5]}, "doc 0: must be an object"),
        ({"execEndpoint": "/search", "data": [{"text": "x"}, {"colour": 1}]}, "doc 1: unknown fields ['colour']"),
        ({"execEndpoint": "/search", "data": [{"blob": 5}]}, "'blob' must be a base64 string"),
        ({"execEndpoint": "/search", "data": [{"blob": "%%%"}]}, "not valid base64"),
        ({"execEndpoint": "/search", "data": [{"embedding": [True]}]}, "list of numbers"),
        ({"execEndpoint": "/search", "data": [{"embedding": [1e39]}]}, "within float32"),
        ({"execEndpoint": "/search", "data": [{"embedding": [10**400]}]}, "within float32"),
        ({"execEndpoint": "/search", "data": [{"id": 7}]}, "'id' must be a string"),
        ({"execEndpoint": "/search", "data": [{"tags": []}]}, "'tags' must be an object"),
    ],
)
def test_wrong_bodies_are_refused_by_name(front, body, expected):
    status, _, answer = call(front, body)
    assert status == 400 and expected in answer["error"], answer


def test_image_serves_only_image_files_under_the_roots_and_never_names_a_path(front, roots):
    status, headers, body = get(front, "/image?uri=images/a.png")
    assert status == 200 and headers["Content-Type"] == "image/png" and body == PNG
    assert headers["X-Content-Type-Options"] == "nosniff"
    for uri, expected in (
        (str(roots / "secret.png"), 403),
        ("../secret.png", 403),
        ("/etc/passwd", 403),
        ("http://127.0.0.1/a.png", 403),  # an allowed host of the service, still never fetched for the page
        ("file://elsewhere/a.png", 403),
        ("pairs.csv", 404),
        ("images/missing.png", 404),
        ("", 400),
    ):
        status, headers, body = get(front, "/image?uri=" + urllib.request.quote(uri))
        assert status == expected and headers["Content-Type"] == "application/json", (uri, body)
        assert str(roots) not in body.decode() and "secret" not in body.decode(), body


def test_page_and_unknown_routes(front):
    status, headers, body = get(front, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"<script" in body
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert get(front, "/index.html")[2] == body
    status, _, body = get(front, "/nope")
    assert status == 404 and "no such page" in json.loads(body)["error"]
    status, headers, body = get(front, "/post")
    assert status == 405 and "POST" in headers["Allow"] and "not allowed" in json.loads(body)["error"]
    assert get(front, "/docs")[0] == 404  # no page that loads assets from elsewhere


def test_stop_releases_the_port():
    server = HttpFront("127.0.0.1", 0, FakeGateway(), UriPolicy())
    server.start()
    port = server.port
    server.stop()
    again = HttpFront("127.0.0.1", port, FakeGateway(), UriPolicy())  # bindable again at once
    again.start()
    again.stop()
    with pytest.raises(OSError):
        with HttpFront("127.0.0.1", 0, FakeGateway(), UriPolicy()).socket as taken:
            HttpFront("127.0.0.1", taken.getsockname()[1], FakeGateway(), UriPolicy())


# -- keys and roles ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """A keys file with a key of each role and a revoked one: ``{"path", "search", "write", "admin", "revoked"}``."""
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    made = {role: create_key(path, role, name=f"{role}-key") for role in ("search", "write", "admin")}
    revoked, record = create_key(path, "admin", name="gone")
    revoke_key(path, record.id)
    return {"path": path, **{role: key for role, (key, _) in made.items()}, "ids": made, "revoked": revoked}


@pytest.fixture(scope="module")
def keyed(roots, keys, tmp_path_factory):
    """The front with keys on and an audit log."""
    gateway = FakeGateway()
    audit = AuditLog(tmp_path_factory.mktemp("audit"))
    server = HttpFront(
        "127.0.0.1", 0, gateway, UriPolicy(roots=(roots / "data",)), keyring=KeyRing(keys["path"]), audit=audit
    )
    server.start()
    server.gateway = gateway
    try:
        yield server
    finally:
        server.stop()


def send(port, method, path, body=b"", headers=(), length=None):
    """One raw HTTP request (header values as bytes, sent as they are); (status, headers, parsed JSON or bytes)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(len(body) if length is None else length))
        connection.endheaders(body if length is None else None)
        response = connection.getresponse()
        data = response.read()
        try:
            data = json.loads(data)
        except ValueError:
            pass
        return response.status, response.headers, data
    finally:
        connection.close()


def post_with(port, body, authorization=None, length=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = [("Content-Type", "application/json")]
    if authorization is not None:
        headers.append(("Authorization", authorization))
    return send(port, "POST", "/post", data, headers, length)


def audit_lines(server) -> list[dict]:
    server.audit.flush()
    path = server.audit.folder / LOG_NAME
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


BAD_KEYS = {
    "none": None,
    "empty": b"",
    "not bearer": b"Basic dXNlcjpwYXNz",
    "bearer alone": b"Bearer",
    "not a key": b"Bearer not-a-key",
    "unknown id": b"Bearer ctk_0123456789ab_" + b"A" * 43,
    "non-ascii": b"Bearer ctk_\xe9\xe9",
    "10 kB": b"Bearer " + b"a" * 10_000,
}


@pytest.mark.parametrize("case", [*BAD_KEYS, "wrong secret", "revoked"])
def test_a_post_without_a_valid_key_is_refused_before_its_body_is_read(keyed, keys, case):
    if case == "wrong secret":  # a real key's id with another secret
        header = ("Bearer " + keys["admin"][:-4] + "AAAA").encode()
    elif case == "revoked":
        header = f"Bearer {keys['revoked']}".encode()
    else:
        header = BAD_KEYS[case]
    before = len(keyed.gateway.calls)
    status, headers, answer = post_with(keyed.port, b"{not json", header)  # a body that would be a 400
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer", answer
    assert isinstance(answer, dict) and set(answer) == {"error"}
    assert header is None or header[7:] == b"" or header[7:].decode("latin-1") not in answer["error"]
    # a body announced but never sent: only an answer from the headers alone can come back
    status, _, _ = post_with(keyed.port, b"", header, length=MAX_BODY_BYTES)
    assert status == 401
    assert len(keyed.gateway.calls) == before  # the stand-in gateway saw nothing


def test_a_revoked_or_added_key_takes_effect_on_the_next_request(keyed, keys, tmp_path):
    key, record = create_key(keys["path"], "search", name="short-lived")
    body = {"execEndpoint": "/status"}
    assert post_with(keyed.port, body, f"Bearer {key}")[0] == 200
    revoke_key(keys["path"], record.id)
    status, _, answer = post_with(keyed.port, body, f"Bearer {key}")
    assert status == 401 and "revoked" in answer["error"] and key not in answer["error"]


def test_two_authorization_headers_are_refused(keyed, keys):
    headers = [
        ("Content-Type", "application/json"),
        ("Authorization", f"Bearer {keys['admin']}"),
        ("Authorization", f"Bearer {keys['admin']}"),
    ]
    status, _, answer = send(keyed.port, "POST", "/post", b'{"execEndpoint": "/status"}', headers)
    assert status == 401 and "one authorization header" in answer["error"]


@pytest.mark.parametrize(
    ("role", "endpoint", "needed"),
    [
        ("search", "/index", "write"),
        ("search", "/delete", "write"),
        ("search", "/train", "admin"),
        ("write", "/train/cancel", "admin"),
        ("write", "/models", "admin"),
        ("write", "/models/rollback", "admin"),
        ("write", "/no-such-endpoint", "admin"),  # an unknown endpoint needs admin
    ],
)
def test_a_role_too_low_is_403_naming_the_role_needed(keyed, keys, role, endpoint, needed):
    before = len(keyed.gateway.calls)
    status, headers, answer = post_with(keyed.port, {"execEndpoint": endpoint}, f"Bearer {keys[role]}")
    assert status == 403 and f"needs the role {needed!r}" in answer["error"], answer
    assert keys[role] not in answer["error"] and "WWW-Authenticate" not in headers
    assert len(keyed.gateway.calls) == before


def test_a_bad_body_from_a_valid_key_is_still_a_400(keyed, keys):
    status, _, answer = post_with(keyed.port, b"{not json", f"Bearer {keys['search']}")
    assert status == 400 and "not JSON" in answer["error"]


def test_an_admitted_call_goes_on_with_its_authorization(keyed, keys):
    for role, endpoint in (("search", "/search"), ("write", "/index"), ("admin", "/models"), ("admin", "/status")):
        header = f"Bearer {keys[role]}"
        lines = len(audit_lines(keyed))
        status, _, answer = post_with(keyed.port, {"execEndpoint": endpoint, "data": [{"text": "x"}]}, header)
        assert status == 200, answer
        assert keyed.gateway.calls[-1][0] == endpoint and keyed.gateway.authorizations[-1] == header
        assert len(audit_lines(keyed)) == lines  # the gateway audits admitted calls, not the front


def test_image_needs_a_valid_key_and_the_page_and_schema_do_not(keyed, keys):
    for header in (None, b"Bearer nope", f"Bearer {keys['revoked']}".encode()):
        status, headers, answer = send(
            keyed.port, "GET", "/image?uri=images/a.png", headers=[("Authorization", header)] if header else []
        )
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer" and "error" in answer
    key, record = create_key(keys["path"], "search", name="image-only")
    status, headers, body = send(
        keyed.port, "GET", "/image?uri=images/a.png", headers=[("Authorization", f"Bearer {key}")]
    )
    assert status == 200 and body == PNG and headers["Content-Type"] == "image/png"
    keyed.audit.flush()  # the key's use is noted for `cliptuner keys list`, though no gateway saw this call
    assert record.id in read_usage(keyed.audit.folder)
    status, headers, body = send(keyed.port, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    status, _, schema = send(keyed.port, "GET", "/openapi.json")
    assert status == 200 and schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert schema["paths"]["/post"]["post"]["security"] == [{"bearer": []}]
    assert {"401", "403", "429"} <= set(schema["paths"]["/post"]["post"]["responses"])


def test_image_counts_against_the_key_rate_at_the_front(keyed, keys):
    key, _ = create_key(keys["path"], "search", name="image-rate", rate="2/m")
    statuses = [
        send(keyed.port, "GET", "/image?uri=images/a.png", headers=[("Authorization", f"Bearer {key}")])
        for _ in range(3)
    ]
    assert [s[0] for s in statuses] == [200, 200, 429]
    status, headers, answer = statuses[2]
    assert headers["Retry-After"] == "1" and "'image-rate' is over its rate limit (2/m)" in answer["error"]
    other = send(keyed.port, "GET", "/image?uri=images/a.png", headers=[("Authorization", f"Bearer {keys['search']}")])
    assert other[0] == 200  # another key is not slowed


def test_each_refusal_is_one_audit_line_without_the_key(keyed, keys):
    lines = len(audit_lines(keyed))
    post_with(keyed.port, {"execEndpoint": "/status"}, "Bearer not-a-key")
    post_with(keyed.port, {"execEndpoint": "/train", "parameters": {"data": "p.csv"}}, f"Bearer {keys['write']}")
    send(keyed.port, "GET", "/image?uri=images/a.png")
    new = audit_lines(keyed)[lines:]
    assert len(new) == 3, new
    unknown, role, image = new
    assert unknown["result"] == "refused" and unknown["code"] == "UNAUTHENTICATED" and unknown["endpoint"] == "-"
    assert unknown["method"] == "POST /post" and unknown["key_id"] is None and unknown["role"] is None
    assert unknown["peer"].startswith("127.0.0.1:") and unknown["error"]
    write_id = keys["ids"]["write"][1].id
    assert role["code"] == "PERMISSION_DENIED" and role["endpoint"] == "/train" and role["key_id"] == write_id
    assert role["key_name"] == "write-key" and role["role"] == "write" and "'admin'" in role["error"]
    assert image["method"] == "GET /image" and image["code"] == "UNAUTHENTICATED" and image["result"] == "refused"
    text = (keyed.audit.folder / LOG_NAME).read_text()
    assert not any(keys[name] in text for name in ("search", "write", "admin", "revoked"))


# -- the gRPC gateway's refusals, through Jina's client ----------------------------------------------------------
class RefusingGateway:
    """A gRPC server with Jina's unary data method that ends every call with ``self.code``."""

    def __init__(self) -> None:
        self.code = grpc.StatusCode.RESOURCE_EXHAUSTED
        self.metadata: list[dict] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        handler = grpc.unary_unary_rpc_method_handler(self._call)
        methods = grpc.method_handlers_generic_handler(
            "jina.JinaSingleDataRequestRPC", {"process_single_data": handler}
        )
        self.server.add_generic_rpc_handlers((methods,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def _call(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        context.abort(self.code, f"refused with {self.code.name}")


@pytest.fixture(scope="module")
def refusing(keys):
    from executors.schemas import ClipDoc

    upstream = RefusingGateway()
    upstream.server.start()
    front = HttpFront(
        "127.0.0.1", 0, JinaGateway("127.0.0.1", upstream.port, ClipDoc), UriPolicy(), keyring=KeyRing(keys["path"])
    )
    front.start()
    front.upstream = upstream
    try:
        yield front
    finally:
        front.stop()
        upstream.server.stop(0)


@pytest.mark.parametrize(
    ("code", "status", "header"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, 401, ("WWW-Authenticate", "Bearer")),
        (grpc.StatusCode.PERMISSION_DENIED, 403, None),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, ("Retry-After", "1")),
        (grpc.StatusCode.INTERNAL, 503, None),
    ],
)
def test_the_gateways_refusals_keep_their_meaning_over_http(refusing, keys, code, status, header):
    refusing.upstream.code = code
    authorization = f"Bearer {keys['search']}"
    got, headers, answer = post_with(refusing.port, {"execEndpoint": "/search", "data": [{"text": "x"}]}, authorization)
    assert got == status and f"refused with {code.name}" in answer["error"], answer
    if header is not None:
        assert headers[header[0]] == header[1]
    assert refusing.upstream.metadata[-1]["authorization"] == authorization  # the key went on as gRPC metadata


# -- fuzzing from the OpenAPI schema ----------------------------------------------------------------------------
FUZZ_GATEWAY = FakeGateway()
FUZZ_KEYS = tempfile.TemporaryDirectory()  # removed when the interpreter exits
FUZZ_KEY, _ = create_key(Path(FUZZ_KEYS.name) / "keys.json", "admin", name="fuzz")
FUZZ_APP = build_app(FUZZ_GATEWAY, UriPolicy(), keyring=KeyRing(Path(FUZZ_KEYS.name) / "keys.json"))
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", FUZZ_APP)


@SCHEMA.auth()
class FuzzKey:
    """The admin key on every generated call, except those that leave the header out on purpose (then a 401)."""

    def get(self, case, context):
        return FUZZ_KEY

    def set(self, case, data, context):
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


SCHEMA.config.generation.update(
    modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE], max_examples=60
)
FUZZ_CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]


@SCHEMA.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_fuzz_from_the_openapi_schema(case):
    case.call_and_validate(checks=FUZZ_CHECKS)


def test_the_fuzzed_app_still_answers():  # runs after the fuzz test (file order)
    from schemathesis.python import asgi

    with asgi.get_client(FUZZ_APP) as client:
        body = {"execEndpoint": "/search", "data": [{"text": "a star"}], "parameters": {"limit": 1}}
        response = client.post("http://testserver/post", json=body, headers={"Authorization": f"Bearer {FUZZ_KEY}"})
    assert response.status_code == 200 and response.json()["data"][0]["matches"][0]["id"] == "m0"
