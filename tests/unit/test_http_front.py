"""The HTTP front (`cliptuner/serve/http_front.py`) without a Flow: a stand-in gateway with the same interface.

The refusals over real HTTP (uvicorn on 127.0.0.1), and a fuzz run from the app's own OpenAPI schema (schemathesis,
in-process): no 5xx, every answer as the schema says, bodies off the schema refused, the app answering after.
"""

import base64
import http.client
import json
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, settings

from cliptuner.serve.access import UriPolicy
from cliptuner.serve.http_front import MAX_BODY_BYTES, HttpFront, RequestError, build_app

schemathesis = pytest.importorskip("schemathesis", reason="pip install -e '.[dev]' installs schemathesis")
from schemathesis import checks  # noqa: E402 (after the skip)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32  # the media type is read from the first bytes
REFUSED = "/train"  # the one endpoint the stand-in service refuses (as a Flow refuses a bad request: 422)


class FakeGateway:
    """The gRPC gateway's interface: canned docs for any endpoint, the service's refusal (422) for :data:`REFUSED`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[dict], dict]] = []

    def post(self, endpoint: str, docs: list[dict], parameters: dict) -> list[dict]:
        self.calls.append((endpoint, docs, parameters))
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


# -- fuzzing from the OpenAPI schema ----------------------------------------------------------------------------
FUZZ_GATEWAY = FakeGateway()
FUZZ_APP = build_app(FUZZ_GATEWAY, UriPolicy())
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", FUZZ_APP)
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
        response = client.post("http://testserver/post", json=body)
    assert response.status_code == 200 and response.json()["data"][0]["matches"][0]["id"] == "m0"
