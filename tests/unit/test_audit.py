"""The audit log: lines on disk, fsync'd by a writer thread, rotated by size, shared by two processes."""

import json
import multiprocessing

from cliptuner.serve.audit import LOG_NAME, MAX_TEXT, AuditLog, log_files, read_usage, scrub, tail


def lines(folder):
    return [json.loads(line) for path in log_files(folder) for line in path.read_text().splitlines()]


def test_a_record_is_on_disk_after_flush(tmp_path):
    log = AuditLog(tmp_path / "audit")
    log.record(key_id="a" * 12, endpoint="/index", docs=3, result="ok")
    log.flush()
    (entry,) = lines(tmp_path / "audit")
    assert entry["endpoint"] == "/index" and entry["docs"] == 3 and entry["time"].endswith("Z")
    log.close()


def test_close_writes_what_is_queued(tmp_path):
    log = AuditLog(tmp_path / "audit")
    for i in range(200):
        log.record(endpoint="/delete", n=i)
    log.close()
    assert [e["n"] for e in lines(tmp_path / "audit")] == list(range(200))
    log.record(endpoint="/late")  # after close: dropped, no error
    assert len(lines(tmp_path / "audit")) == 200


def test_rotation_keeps_the_newest_lines_within_the_files_kept(tmp_path):
    folder = tmp_path / "audit"
    log = AuditLog(folder, max_bytes=2048, keep=3)
    for i in range(300):
        log.record(endpoint="/index", n=i, pad="x" * 40)
        if i % 10 == 9:
            log.flush()
    log.close()
    files = log_files(folder)
    assert [p.name for p in files] == ["audit.2.jsonl", "audit.1.jsonl", LOG_NAME]
    assert all(p.stat().st_size <= 2048 for p in files)
    numbers = [e["n"] for e in lines(folder)]
    assert numbers == sorted(numbers) and numbers[-1] == 299 and numbers[0] > 0  # the oldest were dropped
    assert [e["n"] for e in tail(folder, 5)] == [295, 296, 297, 298, 299]


def _write_many(folder, tag):
    log = AuditLog(folder, max_bytes=1 << 20)
    for i in range(300):
        log.record(endpoint="/index", writer=tag, n=i)
    log.close()


def test_two_processes_append_whole_lines_to_one_file(tmp_path):
    folder = tmp_path / "audit"
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_write_many, args=(folder, tag)) for tag in ("gateway", "http")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    entries = lines(folder)  # json.loads fails on a torn line
    for tag in ("gateway", "http"):
        assert [e["n"] for e in entries if e["writer"] == tag] == list(range(300))


def test_key_use_is_kept_for_keys_list(tmp_path):
    folder = tmp_path / "audit"
    log = AuditLog(folder, usage_every=0.05)
    log.note_use("a" * 12)
    log.note_use(None)
    log.flush()
    log.close()
    used = read_usage(folder)
    assert list(used) == ["a" * 12] and used["a" * 12].endswith("Z")


def test_parameters_are_kept_without_content():
    long = "y" * 5000
    kept = scrub({"data": "pairs.csv", "caption": long, "deep": {"a": {"b": {"c": 1}}}, "ids": list(range(100))})
    assert kept["data"] == "pairs.csv"
    assert len(kept["caption"]) < MAX_TEXT + 20 and long not in json.dumps(kept)
    assert kept["deep"] == {"a": "<dict>"}
    assert len(kept["ids"]) == 21 and kept["ids"][-1] == "…(+80)"


def test_a_torn_line_is_shown_not_fatal(tmp_path):
    folder = tmp_path / "audit"
    folder.mkdir()
    (folder / LOG_NAME).write_text('{"endpoint": "/index"}\n{"endpo\n')
    assert tail(folder, 5) == [{"endpoint": "/index"}, {"unreadable": '{"endpo'}]
