"""Only the callers a service allows: API keys with roles at the gRPC gateway, the audit log, TLS, safe defaults.

One `cliptuner serve --keys-file K` (cliptuner-tiny, random init, a small gallery) serves the module's matrix:
every endpoint × {no key, malformed header, wrong key, revoked key, a role too low, the right role} through a
plain ``jina.Client`` with ``metadata=(("authorization", "Bearer " + key),)``, each followed by an authorised
search. Then: refused requests left nothing in the index, the registry or the runs, and every one of them is a
line of the audit log; a key revoked while the service runs is refused on its next call; bad headers and a flood
of wrong keys leave authorised clients served; a per-key rate limit. TLS and `serve --host 0.0.0.0` without
keys have their own service starts.
"""

import json
import re
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from docarray import DocList
from jina import Client
from prometheus_client.parser import text_string_to_metric_families
from service import ROOT, FlowProcess, by_id, free_ports, png, self_signed

from cliptuner.model.registry import Registry
from cliptuner.serve.audit import tail
from cliptuner.serve.keys import create_key, revoke_key
from executors.schemas import ClipDoc

GALLERY = 6
ENDPOINTS = (  # endpoint, role it needs, parameters that make an allowed call cheap and harmless
    ("/encode", "search", {}),
    ("/search", "search", {"limit": 3}),
    ("/status", "search", {}),
    ("/index", "write", {}),
    ("/delete", "write", {}),  # the query doc is not stored: an allowed /delete fails, deleting nothing
    ("/train", "admin", {"data": "no-such-file.csv"}),
    ("/train/cancel", "admin", {}),
    ("/models", "admin", {}),
    ("/models/promote", "admin", {"version": "v999"}),
    ("/models/rollback", "admin", {}),
    ("/models/prune", "admin", {"keep": 1000}),
)
LOWER = {"write": "search", "admin": "write"}
CASES = ("no key", "malformed", "wrong key", "revoked", "role too low", "right role")
EXPECTED = {
    "no key": "UNAUTHENTICATED",
    "malformed": "UNAUTHENTICATED",
    "wrong key": "UNAUTHENTICATED",
    "revoked": "UNAUTHENTICATED",
    "role too low": "PERMISSION_DENIED",
}


def auth(key):
    return (("authorization", f"Bearer {key}"),)


def call(server, endpoint, metadata=None, parameters=None, docs=None):
    """The gRPC status code name of a call ("OK" when it passed the door, whatever the Executors answered)."""
    if docs is None:
        docs = DocList[ClipDoc]([ClipDoc(id="q-access", text="a red square")])
    try:
        server.client().post(
            endpoint, inputs=docs, parameters=parameters or {}, metadata=metadata, return_type=DocList[ClipDoc]
        )
        return "OK"
    except Exception as exc:  # noqa: BLE001 - the code is in the message of jina's BadServerFlow/BadServer
        found = re.search(r"StatusCode\.([A-Z_]+)", str(exc))
        return found.group(1) if found else "OK"  # an Executor's own error: the request got through


def audit_until(server, predicate, timeout=20.0):
    """The audit log's lines once ``predicate(lines)`` holds (the writer thread appends within milliseconds)."""
    deadline = time.monotonic() + timeout
    while True:
        entries = tail(server.workspace / "audit", 100_000)
        if predicate(entries) or time.monotonic() > deadline:
            return entries
        time.sleep(0.05)


def square(i):
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[..., i % 3] = 40 * (i + 1) % 256
    return png(image)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("access-ws")
    keys_file = workspace.parent / "keys.json"
    keys = {role: create_key(keys_file, role, name=f"{role}-key")[0] for role in ("search", "write", "admin")}
    keys["revoked"], revoked = create_key(keys_file, "admin", name="old")
    revoke_key(keys_file, revoked.id)
    keys["limited"], _ = create_key(keys_file, "search", name="limited", rate="3/m")
    metrics = free_ports(4)
    server = FlowProcess(
        workspace, workspace.parent / "flow.log", args=["--keys-file", str(keys_file), "--metrics-port", str(metrics)]
    )
    server.start()
    server.metrics_port = metrics  # the gateway's
    server.keys, server.keys_file, server.revoked_id = keys, keys_file, revoked.id
    gallery = DocList[ClipDoc]([ClipDoc(id=f"g{i}", blob=square(i), text=f"square {i}") for i in range(GALLERY)])
    server.client().post("/index", inputs=gallery, metadata=auth(keys["write"]), return_type=DocList[ClipDoc])
    yield server
    server.stop()


def search_ok(server):
    docs = server.client().post(
        "/search",
        inputs=DocList[ClipDoc]([ClipDoc(text="square")]),
        parameters={"limit": 3},
        metadata=auth(server.keys["search"]),
        return_type=DocList[ClipDoc],
    )
    return len(docs[0].matches) == 3


def metadata_for(server, case, needed):
    keys = server.keys
    return {
        "no key": None,
        "malformed": (("authorization", keys[needed]),),  # no "Bearer "
        "wrong key": auth(keys[needed][:-6] + "AAAAAA"),
        "revoked": auth(keys["revoked"]),
        "role too low": auth(keys[LOWER.get(needed, "search")]),
        "right role": auth(keys[needed]),
    }[case]


def state_of(server):
    """What a refused request must not change: the index, the registry's versions, the runs."""
    status = by_id(server.client().post("/status", metadata=auth(server.keys["admin"]), return_type=DocList[ClipDoc]))
    runs = sorted(p.name for p in (server.workspace / "runs").glob("*")) if (server.workspace / "runs").exists() else []
    registry = Registry(server.workspace / "models")
    return status["status-indexer"].tags["count"], registry.current(), registry.versions(), runs


def test_every_endpoint_and_every_kind_of_caller(keyed):
    before = state_of(keyed)
    results = {}
    for endpoint, needed, parameters in ENDPOINTS:
        for case in CASES:
            if case == "role too low" and needed == "search":
                continue  # no role below search
            if case == "right role" and endpoint == "/index":
                continue  # would add the query doc; checked on its own below
            code = call(keyed, endpoint, metadata_for(keyed, case, needed), parameters)
            results[(endpoint, case)] = code
            assert search_ok(keyed), (endpoint, case)
    wrong = {k: v for k, v in results.items() if v != EXPECTED.get(k[1], "OK")}
    assert not wrong, wrong
    assert state_of(keyed) == before  # refused requests changed nothing (and allowed reads neither)


def test_write_and_admin_calls_pass_with_their_roles_and_are_audited(keyed):
    count, *_ = state_of(keyed)
    extra = DocList[ClipDoc]([ClipDoc(id="extra", blob=square(9), text="extra square")])
    keyed.client().post("/index", inputs=extra, metadata=auth(keyed.keys["write"]), return_type=DocList[ClipDoc])
    assert state_of(keyed)[0] == count + 1
    assert call(keyed, "/delete", auth(keyed.keys["admin"]), docs=DocList[ClipDoc]([ClipDoc(id="extra")])) == "OK"
    assert state_of(keyed)[0] == count
    assert call(keyed, "/train", auth(keyed.keys["admin"]), {"data": "no-such-file.csv"}) == "OK"  # past the door
    entries = audit_until(
        keyed, lambda lines: any(e.get("endpoint") == "/train" and e.get("result") == "error" for e in lines)
    )
    mine = [e for e in entries if e.get("endpoint") in ("/index", "/delete") and e.get("result") != "refused"]
    assert any(e["endpoint"] == "/index" and e["docs"] == 1 and e["key_name"] == "write-key" for e in mine)
    assert any(e["endpoint"] == "/delete" and e["docs"] == 1 and e["result"] == "ok" for e in mine)
    train = [e for e in entries if e.get("endpoint") == "/train" and e.get("result") != "refused"]
    assert train and train[-1]["result"] == "error" and "no-such-file.csv" in train[-1]["error"]
    assert all("blob" not in json.dumps(e) for e in entries)


def test_every_refusal_is_in_the_audit_log(keyed):
    entries = audit_until(keyed, lambda lines: any(keyed.revoked_id == e.get("key_id") for e in lines))
    refused = [e for e in entries if e.get("result") == "refused"]
    denied = [e for e in refused if e["code"] == "PERMISSION_DENIED"]
    for endpoint, needed, _ in ENDPOINTS:
        if needed != "search":
            assert any(e["endpoint"] == endpoint and e["role"] == LOWER[needed] for e in denied), endpoint
    unauthenticated = [e for e in refused if e["code"] == "UNAUTHENTICATED"]
    assert len(unauthenticated) >= 4 * len(ENDPOINTS)
    assert any(e["key_id"] == keyed.revoked_id and "revoked" in e["error"] for e in unauthenticated)
    assert all(keyed.keys["admin"] not in json.dumps(e) for e in entries)


def test_a_key_revoked_while_serving_is_refused_on_its_next_call(keyed):
    key, record = create_key(keyed.keys_file, "search", name="short-lived")
    assert call(keyed, "/search", auth(key), {"limit": 1}) == "OK"
    revoke_key(keyed.keys_file, record.id)
    assert call(keyed, "/search", auth(key), {"limit": 1}) == "UNAUTHENTICATED"
    assert search_ok(keyed)


@pytest.mark.parametrize(
    "value, codes",
    [
        ("Bearer " + "A" * 1_000, {"UNAUTHENTICATED"}),  # over the service's 512 characters
        ("Bearer " + "A" * 20_000, {"UNAUTHENTICATED", "RESOURCE_EXHAUSTED"}),  # over gRPC's own metadata limit
        ("bearer,bearer", {"UNAUTHENTICATED"}),
        ("Bearer " + "x" * 64, {"UNAUTHENTICATED"}),
    ],
    ids=["oversized", "over-grpc-limit", "junk", "wrong-shape"],
)  # non-ASCII and control characters: gRPC clients refuse to send them (tests/unit/test_keys.py, HTTP tests)
def test_bad_authorization_headers_are_refused_and_the_service_keeps_serving(keyed, value, codes):
    assert call(keyed, "/search", (("authorization", value),)) in codes
    assert search_ok(keyed)


def test_two_authorization_headers_are_refused(keyed):
    metadata = (*auth(keyed.keys["admin"]), *auth(keyed.keys["search"]))
    assert call(keyed, "/status", metadata) == "UNAUTHENTICATED"


def test_a_key_over_its_rate_is_refused_and_others_are_served(keyed):
    codes = [call(keyed, "/search", auth(keyed.keys["limited"]), {"limit": 1}) for _ in range(5)]
    assert codes[:3] == ["OK"] * 3 and codes[3:] == ["RESOURCE_EXHAUSTED"] * 2
    assert search_ok(keyed)


def test_a_flood_of_wrong_keys_leaves_authorised_clients_served(keyed):
    client = Client(host="127.0.0.1", port=keyed.port, protocol="grpc")
    refused = 0
    for i in range(200):
        try:
            client.post(
                "/search", inputs=DocList[ClipDoc]([ClipDoc(text="x")]), metadata=auth(f"ctk_{i:012x}_" + "B" * 43)
            )
        except Exception as exc:  # noqa: BLE001
            refused += "UNAUTHENTICATED" in str(exc)
        if i % 50 == 0:
            assert search_ok(keyed)
    assert refused == 200
    assert search_ok(keyed)


def test_search_keys_see_status_without_server_paths_admins_see_it_all(keyed):
    limited = by_id(keyed.client().post("/status", metadata=auth(keyed.keys["search"]), return_type=DocList[ClipDoc]))
    full = by_id(keyed.client().post("/status", metadata=auth(keyed.keys["admin"]), return_type=DocList[ClipDoc]))
    shown = json.dumps({k: d.tags for k, d in limited.items()})
    assert str(keyed.workspace) not in shown and '"pid"' not in shown
    assert full["status-tuner"].tags["pid"] > 0 and str(keyed.workspace) in json.dumps(full["status-tuner"].tags)
    forged = by_id(
        keyed.client().post(
            "/status", parameters={"detail": True}, metadata=auth(keyed.keys["search"]), return_type=DocList[ClipDoc]
        )
    )
    assert "pid" not in forged["status-tuner"].tags  # a client cannot ask for the detail itself


def test_refusals_are_counted_by_endpoint_and_reason(keyed):
    import urllib.request

    def refusals():
        text = urllib.request.urlopen(f"http://127.0.0.1:{keyed.metrics_port}/metrics", timeout=10).read().decode()
        counted = {}
        for family in text_string_to_metric_families(text):
            if family.name == "cliptuner_access_refusals":
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        counted[(sample.labels["endpoint"], sample.labels["reason"])] = sample.value
        return counted

    before = refusals()
    assert call(keyed, "/train", auth(keyed.keys["search"])) == "PERMISSION_DENIED"
    assert call(keyed, "/search", None) == "UNAUTHENTICATED"
    after = refusals()
    assert after[("/train", "role")] == before.get(("/train", "role"), 0) + 1
    assert after[("-", "unauthenticated")] == before.get(("-", "unauthenticated"), 0) + 1


def test_health_checks_stay_open(keyed):
    assert Client(host="127.0.0.1", port=keyed.port, protocol="grpc").is_flow_ready(timeout=5)


# -- their own service starts --------------------------------------------------------------------------------------
def test_serving_another_address_without_keys_is_refused_with_the_fix(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "cliptuner.cli", "serve", "--host", "0.0.0.0", "--workspace", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "JINA_HIDE_SURVEY": "1", "HOME": str(tmp_path)},
    )
    assert run.returncode == 2
    assert "--keys-file" in run.stderr and "--insecure-no-auth" in run.stderr and "0.0.0.0" in run.stderr
    assert not (tmp_path / "models").exists()  # refused before anything started


TLS_CLIENT = textwrap.dedent(
    """
    import json, sys
    from docarray import DocList
    from jina import Client
    from executors.schemas import ClipDoc
    port, key = int(sys.argv[1]), sys.argv[2]
    client = Client(host="127.0.0.1", port=port, protocol="grpc", tls=True)
    md = (("authorization", "Bearer " + key),)
    client.post("/index", inputs=DocList[ClipDoc]([ClipDoc(id="t", text="over tls")]), metadata=md)
    docs = client.post("/search", inputs=DocList[ClipDoc]([ClipDoc(text="over tls")]), metadata=md,
                       return_type=DocList[ClipDoc])
    plain = Client(host="127.0.0.1", port=port, protocol="grpc")
    try:
        plain.post("/search", inputs=DocList[ClipDoc]([ClipDoc(text="x")]), metadata=md, timeout=10)
        plaintext = "answered"
    except Exception as exc:
        plaintext = "refused"
    print(json.dumps({"matches": [m.id for m in docs[0].matches], "plaintext": plaintext}))
    """
)


def test_tls_gateway_serves_searches_to_a_tls_client(tmp_path):
    cert, key_file = self_signed(tmp_path)
    keys_file = tmp_path / "keys.json"
    key, _ = create_key(keys_file, "write")
    workspace = tmp_path / "ws"
    server = FlowProcess(
        workspace,
        tmp_path / "flow.log",
        args=["--keys-file", str(keys_file), "--tls-cert", str(cert), "--tls-key", str(key_file)],
        tls=True,
    )
    server.start()
    try:
        run = subprocess.run(
            [sys.executable, "-c", TLS_CLIENT, str(server.port), key],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={
                "PATH": "/usr/bin:/bin",
                "PYTHONPATH": str(ROOT),
                "JINA_HIDE_SURVEY": "1",
                "JINA_OPTOUT_TELEMETRY": "1",
                "HOME": str(tmp_path),
                "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(cert),  # trust the self-signed certificate
            },
        )
        assert run.returncode == 0, run.stderr[-3000:]
        answer = json.loads(run.stdout.strip().splitlines()[-1])
        assert answer["matches"] == ["t"] and answer["plaintext"] == "refused"
        assert "over TLS" in server.log_path.read_text()
    finally:
        server.stop()
