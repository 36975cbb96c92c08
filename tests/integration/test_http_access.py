"""Only the callers a service allows, over its HTTP front: API keys with roles on ``POST /post`` and ``GET /image``.

One `cliptuner serve --keys-file K --http-port P --tls-cert C --tls-key K` (cliptuner-tiny, random init, a
self-signed certificate for 127.0.0.1) serves the whole module over https: every endpoint ×
{no key, malformed header, wrong key, revoked key, a role too low, the right role}, each followed by an authorised
search; ``/image`` with and without a key; a key revoked with `cliptuner keys revoke` while the service runs; the
front's refusals in the audit log, the admitted calls audited by the gateway under the key that the front forwarded;
no key in the audit log or the service's log; plaintext HTTP refused on the https port.
"""

import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from service import ROOT, FlowProcess, free_port, png, self_signed

from cliptuner.serve.audit import tail
from cliptuner.serve.keys import ROLES, create_key, required_role, revoke_key

ENDPOINTS = {  # endpoint -> the rest of a body that makes an allowed call cheap and harmless
    "/encode": {"data": [{"text": "a red circle"}]},
    "/search": {"data": [{"text": "a red circle"}], "parameters": {"limit": 2}},
    "/status": {},
    "/index": {"data": [{"id": "http-access", "text": "a blue square"}]},
    "/delete": {"parameters": {"ids": ["no-such-doc"]}},
    "/train": {"parameters": {"data": "no-such-file.csv", "wait": False}},
    "/train/cancel": {},
    "/models": {},
    "/models/promote": {"parameters": {"version": "v999"}},
    "/models/rollback": {},
    "/models/prune": {"parameters": {"keep": 1000}},
}
CASES = {"no key": 401, "malformed": 401, "wrong key": 401, "revoked": 401, "role too low": 403, "right role": None}
MATRIX = [
    (endpoint, case)
    for endpoint in ENDPOINTS
    for case in CASES
    if not (case == "role too low" and required_role(endpoint) == ROLES[0])  # nothing is below search
]
IMAGE = "images/gallery.png"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("http-access")
    workspace = folder / "ws"
    (workspace / "data" / "images").mkdir(parents=True)
    (workspace / "data" / IMAGE).write_bytes(png(np.full((8, 8, 3), 200, dtype=np.uint8)))
    cert, key_file = self_signed(folder)
    keys_file = folder / "keys.json"
    keys = {role: create_key(keys_file, role, name=f"http-{role}") for role in ROLES}
    revoked, record = create_key(keys_file, "admin", name="http-revoked")
    revoke_key(keys_file, record.id)
    http_port = free_port()
    args = ["--keys-file", str(keys_file), "--http-port", str(http_port), "--tls-cert", str(cert)]
    server = FlowProcess(workspace, folder / "serve.log", args=[*args, "--tls-key", str(key_file)], tls=True)
    server.start()
    server.url = f"https://127.0.0.1:{http_port}"
    server.context = ssl.create_default_context(cafile=str(cert))
    server.keys_file = keys_file
    server.keys = {role: key for role, (key, _) in keys.items()}
    server.ids = {role: record.id for role, (_, record) in keys.items()}
    server.revoked = revoked
    try:
        yield server
    finally:
        server.stop()


def request(served, method, path, body=None, authorization=None):
    """One call over https; (status, headers, parsed JSON answer or bytes)."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if authorization is not None:
        headers["Authorization"] = authorization
    data = None if body is None else json.dumps(body).encode()
    call = urllib.request.Request(served.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(call, timeout=120, context=served.context) as response:
            status, answer_headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        status, answer_headers, raw = exc.code, exc.headers, exc.read()
    try:
        return status, answer_headers, json.loads(raw)
    except ValueError:
        return status, answer_headers, raw


def post(served, endpoint, authorization=None):
    return request(served, "POST", "/post", {"execEndpoint": endpoint, **ENDPOINTS[endpoint]}, authorization)


def header_for(served, endpoint, case):
    needed = required_role(endpoint)
    return {
        "no key": None,
        "malformed": "Token " + served.keys[needed],
        "wrong key": "Bearer " + served.keys[needed][:-6] + "AAAAAA",  # its id, another secret
        "revoked": "Bearer " + served.revoked,
        "role too low": "Bearer " + served.keys[ROLES[ROLES.index(needed) - 1]],
        "right role": "Bearer " + served.keys[needed],
    }[case]


def assert_search_answers(served):
    status, _, answer = post(served, "/search", "Bearer " + served.keys["search"])
    assert status == 200 and "data" in answer, answer


@pytest.mark.parametrize(("endpoint", "case"), MATRIX)
def test_each_endpoint_answers_only_the_keys_its_role_allows(served, endpoint, case):
    status, headers, answer = post(served, endpoint, header_for(served, endpoint, case))
    expected = CASES[case]
    if expected is None:
        assert status not in (401, 403), (endpoint, status, answer)
    else:
        assert status == expected, (endpoint, case, status, answer)
        assert set(answer) == {"error"} and not any(key in answer["error"] for key in served.keys.values())
    if expected == 401:
        assert headers["WWW-Authenticate"] == "Bearer"
    if expected == 403:
        assert f"needs the role {required_role(endpoint)!r}" in answer["error"], answer
    assert_search_answers(served)


def test_image_needs_a_valid_key(served):
    path = "/image?uri=" + urllib.request.quote(IMAGE)
    for authorization in (None, "Bearer nope", "Bearer " + served.revoked):
        status, headers, answer = request(served, "GET", path, authorization=authorization)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer", answer
    status, headers, body = request(served, "GET", path, authorization="Bearer " + served.keys["search"])
    assert status == 200 and headers["Content-Type"] == "image/png" and body.startswith(b"\x89PNG")
    status, headers, body = request(served, "GET", "/")  # the page and its schema hold no data: open
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert request(served, "GET", "/openapi.json")[0] == 200


def keys_cli(*args):
    run = subprocess.run(
        [sys.executable, "-m", "cliptuner.cli", "keys", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_a_key_revoked_while_serving_is_refused_on_its_next_request(served):
    key = keys_cli("create", "--role", "search", "--name", "http-live", "--keys-file", str(served.keys_file))
    key = key.splitlines()[-1]
    authorization = "Bearer " + key
    assert post(served, "/search", authorization)[0] == 200
    key_id = key.split("_")[1]
    keys_cli("revoke", key_id, "--keys-file", str(served.keys_file))
    status, _, answer = post(served, "/search", authorization)
    assert status == 401 and "revoked" in answer["error"] and key not in answer["error"]
    status, _, _ = request(served, "GET", "/image?uri=" + urllib.request.quote(IMAGE), authorization=authorization)
    assert status == 401
    assert_search_answers(served)


def test_plain_http_is_not_served_on_the_https_port(served):
    with pytest.raises((OSError, urllib.error.URLError)):  # not HTTP: a TLS alert, or the connection closed
        urllib.request.urlopen(served.url.replace("https://", "http://") + "/", timeout=30).read()


def audit_entries(served, until, timeout=30.0):
    """The audit log's entries once ``until(entries)`` holds (both processes write it from their own threads)."""
    deadline = time.monotonic() + timeout
    while True:
        entries = tail(served.workspace / "audit", 100_000)
        if until(entries) or time.monotonic() > deadline:
            return entries
        time.sleep(0.2)


def test_refusals_are_audited_at_the_front_and_admitted_calls_by_the_gateway(served):
    status, _, _ = post(served, "/train", "Bearer " + served.keys["write"])
    assert status == 403
    status, _, _ = post(served, "/index", "Bearer " + served.keys["write"])
    assert status == 200

    def front_refusal(entry):
        return entry.get("method") == "POST /post" and entry.get("key_id") == served.ids["write"]

    def admitted_index(entry):
        return entry.get("endpoint") == "/index" and entry.get("key_id") == served.ids["write"]

    def both_written(entries):
        return any(map(front_refusal, entries)) and any(admitted_index(e) and e["result"] != "refused" for e in entries)

    entries = audit_entries(served, both_written)
    refused = [e for e in entries if front_refusal(e)]
    assert refused, entries[-10:]
    assert refused[-1]["endpoint"] == "/train" and refused[-1]["code"] == "PERMISSION_DENIED"
    assert refused[-1]["result"] == "refused" and refused[-1]["peer"].startswith("127.0.0.1:")
    unknown = [e for e in entries if e.get("method") == "POST /post" and e.get("key_id") is None]
    assert unknown and all(e["code"] == "UNAUTHENTICATED" and e["endpoint"] == "-" for e in unknown)
    # the gateway knew the caller of an admitted /index only from the header the front forwarded
    assert [e for e in entries if admitted_index(e) and e["result"] != "refused"], entries[-10:]


def test_no_key_is_written_to_the_audit_log_or_the_service_log(served):
    texts = [path.read_text(errors="replace") for path in (served.workspace / "audit").glob("*.jsonl")]
    texts.append(served.log_path.read_text(errors="replace"))
    for key in [*served.keys.values(), served.revoked]:
        secret = key.split("_", 2)[2]
        assert not any(secret in text for text in texts)
