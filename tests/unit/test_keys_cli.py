"""`cliptuner keys create|list|revoke` and `cliptuner audit tail`."""

import json

from cliptuner.cli import main
from cliptuner.serve.audit import AuditLog
from cliptuner.serve.keys import KeyRing


def test_create_prints_the_key_once_and_list_never_shows_it(tmp_path, capsys):
    keys_file = tmp_path / "keys.json"
    assert (
        main(["keys", "create", "--role", "write", "--name", "loader", "--rate", "10/s", "--keys-file", str(keys_file)])
        == 0
    )
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("ctk_") and "only time the key is shown" in err
    assert KeyRing(keys_file).authenticate(f"Bearer {key}").role == "write"
    workspace = tmp_path / "ws"
    log = AuditLog(workspace / "audit", usage_every=0.01)
    log.note_use(key.split("_")[1])
    log.close()
    assert main(["keys", "list", "--keys-file", str(keys_file), "--workspace", str(workspace), "--json"]) == 0
    out, _ = capsys.readouterr()
    (row,) = json.loads(out)
    assert (row["name"], row["role"], row["rate"], row["revoked"]) == ("loader", "write", "10/s", "-")
    assert row["last_used"].endswith("Z")
    assert key not in out and "sha256" not in out
    assert main(["keys", "list", "--keys-file", str(keys_file)]) == 0
    table = capsys.readouterr().out
    assert "loader" in table and key not in table


def test_revoke_by_id_and_errors_name_what_is_wrong(tmp_path, capsys):
    keys_file = tmp_path / "keys.json"
    main(["keys", "create", "--role", "admin", "--keys-file", str(keys_file)])
    key = capsys.readouterr().out.strip()
    key_id = key.split("_")[1]
    assert main(["keys", "revoke", key_id, "--keys-file", str(keys_file)]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["keys", "revoke", "0" * 12, "--keys-file", str(keys_file)]) == 2
    assert key_id in capsys.readouterr().err  # names the ids there are
    assert main(["keys", "create", "--role", "admin", "--rate", "often", "--keys-file", str(keys_file)]) == 2
    assert "rate 'often'" in capsys.readouterr().err


def test_keys_without_a_file_says_how_to_name_one(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CLIPTUNER_KEYS_FILE", raising=False)
    assert main(["keys", "list"]) == 2
    assert "--keys-file" in capsys.readouterr().err


def test_audit_tail_prints_the_last_lines(tmp_path, capsys):
    workspace = tmp_path / "ws"
    log = AuditLog(workspace / "audit")
    for i in range(30):
        log.record(endpoint="/index", n=i, result="ok")
    log.close()
    assert main(["audit", "tail", "--workspace", str(workspace), "-n", "3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["n"] for e in lines] == [27, 28, 29]
    assert main(["audit", "tail", "--workspace", str(tmp_path / "nothing")]) == 2
    assert "no audit log" in capsys.readouterr().err


def test_follow_prints_new_lines_and_the_new_file_after_a_rotation(tmp_path, capsys):
    import threading

    from cliptuner.cli.audit import follow

    folder = tmp_path / "audit"
    log = AuditLog(folder, max_bytes=1024, keep=2)
    log.record(n=-1)
    log.flush()

    def write():
        for i in range(40):  # about 2 KB: the file rotates on the way
            log.record(n=i, pad="x" * 30)
            log.flush()

    writer = threading.Thread(target=write)
    watcher = threading.Thread(target=follow, args=(folder / "audit.jsonl",), kwargs={"every": 0.02, "rounds": 150})
    watcher.start()
    writer.start()
    writer.join()
    watcher.join()
    log.close()
    shown = [json.loads(line)["n"] for line in capsys.readouterr().out.splitlines()]
    assert -1 not in shown  # only what came after
    assert shown == sorted(shown) and shown[-1] == 39 and len(set(shown)) == len(shown)
