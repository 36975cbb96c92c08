"""API keys: the keys file, checking a presented key, roles, rate limits (cliptuner/serve/keys.py)."""

import json
import os

import pytest

from cliptuner.serve.keys import (
    ENDPOINT_ROLES,
    MAX_HEADER_CHARS,
    ROLES,
    KeyRing,
    PermissionDenied,
    Principal,
    RateLimited,
    RateLimiter,
    Unauthenticated,
    create_key,
    hash_key,
    internal_record,
    new_key,
    parse_rate,
    read_keys_file,
    required_role,
    revoke_key,
)


@pytest.fixture
def keys_file(tmp_path):
    return tmp_path / "keys.json"


def bearer(key: str) -> str:
    return f"Bearer {key}"


def test_a_key_is_shown_once_and_the_file_keeps_only_its_hash(keys_file):
    key, record = create_key(keys_file, "admin", name="ci", rate="5/s")
    text = keys_file.read_text()
    assert key not in text and key.split("_")[-1] not in text
    assert record.sha256 == hash_key(key) and record.sha256 in text
    assert record.id in key and record.name == "ci" and record.role == "admin"
    assert len(key.split("_", 2)[2]) >= 43  # 32 random bytes, url-safe base64
    assert oct(os.stat(keys_file).st_mode & 0o777) == "0o600"
    (stored,) = read_keys_file(keys_file)
    assert stored == record


def test_keys_are_unique(keys_file):
    keys = {create_key(keys_file, "search")[0] for _ in range(5)}
    assert len(keys) == 5 and len(read_keys_file(keys_file)) == 5


def test_authenticate_names_the_caller(keys_file):
    key, record = create_key(keys_file, "write", name="indexer-job")
    principal = KeyRing(keys_file).authenticate(bearer(key))
    assert (principal.id, principal.name, principal.role) == (record.id, "indexer-job", "write")
    assert KeyRing(keys_file).authenticate(f"bearer   {key}  ").id == record.id  # scheme case and spaces


@pytest.mark.parametrize(
    "value, says",
    [
        (None, "needs an API key"),
        ("", "needs an API key"),
        ("Basic dXNlcjpwYXNz", "malformed"),
        ("Bearer", "malformed"),
        ("Bearer ", "malformed"),
        ("Token abc", "malformed"),
        ("Bearer " + "x" * (MAX_HEADER_CHARS + 1), f"over {MAX_HEADER_CHARS}"),
        ("Bearer ctk_é", "not ASCII"),
        (b"Bearer \xff\xfe", "not ASCII"),
        ("Bearer ctk_000000000000_" + "A" * 43, "not valid"),
        ("Bearer not-a-key-at-all", "not valid"),
    ],
)
def test_bad_headers_are_refused_without_echoing_them(keys_file, value, says):
    create_key(keys_file, "admin")
    with pytest.raises(Unauthenticated) as caught:
        KeyRing(keys_file).authenticate(value)
    assert says in str(caught.value)
    if isinstance(value, str) and len(value) > 12:
        assert value[7:] not in str(caught.value)


def test_a_wrong_secret_with_a_real_id_is_refused(keys_file):
    key, _ = create_key(keys_file, "admin")
    wrong = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    with pytest.raises(Unauthenticated, match="not valid"):
        KeyRing(keys_file).authenticate(bearer(wrong))


def test_revoking_takes_effect_on_the_next_call_of_a_running_ring(keys_file):
    key, record = create_key(keys_file, "admin")
    other, _ = create_key(keys_file, "search")
    ring = KeyRing(keys_file)
    assert ring.authenticate(bearer(key)).role == "admin"
    revoked = revoke_key(keys_file, record.id)
    assert revoked.revoked is not None
    with pytest.raises(Unauthenticated, match="revoked"):
        ring.authenticate(bearer(key))
    assert ring.authenticate(bearer(other)).role == "search"  # the others still work


def test_a_key_made_while_running_works_at_once(keys_file):
    create_key(keys_file, "admin")
    ring = KeyRing(keys_file)
    key, _ = create_key(keys_file, "write")
    assert ring.authenticate(bearer(key)).role == "write"


def test_an_unreadable_keys_file_refuses_every_key_until_fixed(keys_file):
    key, _ = create_key(keys_file, "admin")
    ring = KeyRing(keys_file)
    good = keys_file.read_text()
    keys_file.write_text("{not json")
    with pytest.raises(Unauthenticated, match="cannot read its keys file"):
        ring.authenticate(bearer(key))
    keys_file.write_text(good)
    assert ring.authenticate(bearer(key)).role == "admin"
    keys_file.unlink()
    with pytest.raises(Unauthenticated, match="cannot read its keys file"):
        ring.authenticate(bearer(key))


def test_a_bad_keys_file_is_refused_at_start_with_its_name(keys_file):
    keys_file.write_text(json.dumps({"version": 1, "keys": [{"id": "zz", "role": "admin"}]}))
    with pytest.raises(ValueError, match="keys.json"):
        KeyRing(keys_file)
    keys_file.write_text(
        json.dumps(
            {"version": 1, "keys": [{"id": "a" * 12, "role": "root", "name": "x", "sha256": "0" * 64, "created": "t"}]}
        )
    )
    with pytest.raises(ValueError, match="role 'root'"):
        KeyRing(keys_file)


def test_without_a_keys_file_everyone_is_admin():
    ring = KeyRing(None)
    assert not ring.enabled
    assert ring.authenticate(None).role == "admin"


def test_the_internal_record_is_known_only_by_its_hash(keys_file):
    create_key(keys_file, "admin")
    key, key_id = new_key()
    ring = KeyRing(keys_file, extra=(internal_record(f"{key_id}:{hash_key(key)}"),))
    principal = ring.authenticate(bearer(key))
    assert (principal.role, principal.name) == ("search", "serve")
    assert key_id not in keys_file.read_text()


def test_revoking_an_unknown_id_names_the_known_ones(keys_file):
    _, record = create_key(keys_file, "admin")
    with pytest.raises(KeyError, match=record.id):
        revoke_key(keys_file, "0" * 12)


@pytest.mark.parametrize("role", ROLES)
def test_roles_include_the_ones_before(role):
    principal = Principal(id="a" * 12, name="x", role=role)
    allowed = {endpoint for endpoint in [*ENDPOINT_ROLES, "/models/promote", "/unknown"] if principal.allows(endpoint)}
    expected = {
        "search": {"/encode", "/search", "/status"},
        "write": {"/encode", "/search", "/status", "/index", "/delete", "/feedback"},
    }.get(role)
    if expected is None:
        assert allowed == {*ENDPOINT_ROLES, "/models/promote", "/unknown"}
    else:
        assert allowed == expected


def test_permission_denied_names_the_role_needed():
    with pytest.raises(PermissionDenied, match="/train needs the role 'admin'; this key has the role 'write'"):
        Principal(id="a" * 12, name="x", role="write").check("/train")
    assert required_role("/models/prune") == "admin" and required_role("/no-such") == "admin"


@pytest.mark.parametrize("text, per_s", [("50/s", 50.0), ("600/m", 10.0), ("36/h", 0.01), ("2.5/sec", 2.5)])
def test_parse_rate(text, per_s):
    assert parse_rate(text) == pytest.approx(per_s)


@pytest.mark.parametrize("text", ["50", "0/s", "-1/s", "5/day", "fast"])
def test_bad_rates_are_named(text):
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


def test_the_rate_limit_refuses_over_the_rate_and_refills():
    now = [100.0]
    limiter = RateLimiter(clock=lambda: now[0])
    limited = Principal(id="a" * 12, name="ci", role="search", rate_per_s=5.0)
    free = Principal(id="b" * 12, name="other", role="search", rate_per_s=None)
    for _ in range(5):
        limiter.take(limited)
    with pytest.raises(RateLimited, match="'ci' is over its rate limit \\(5/s\\)"):
        limiter.take(limited)
    for _ in range(100):
        limiter.take(free)  # another key is not affected
    now[0] += 0.2  # one token back
    limiter.take(limited)
    with pytest.raises(RateLimited):
        limiter.take(limited)


def test_a_key_limited_per_minute_may_use_its_calls_at_once(keys_file):
    key, _ = create_key(keys_file, "search", rate="3/m")
    principal = KeyRing(keys_file).authenticate(bearer(key))
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    for _ in range(3):
        limiter.take(principal)
    with pytest.raises(RateLimited, match="3/m"):
        limiter.take(principal)
    now[0] += 20.0  # one call back per 20 s
    limiter.take(principal)
