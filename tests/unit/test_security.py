"""Every endpoint reads client uris under one policy and bounds every request (Executors as plain objects).

The workspace is ``tmp_path/ws`` (its ``data/`` is the default image root) and ``tmp_path/outside.png`` lies beside
it: no endpoint may read it, whichever way a uri names it, and every refusal says the same thing without naming a
server folder. After each refusal a valid request is served.
"""

import csv
import http.server
import json
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from docarray import DocList
from support import QUICK, png, run

from cliptuner.model.registry import Registry
from cliptuner.model.runtime import OnnxClip
from cliptuner.model.tokenizer import ClipTokenizer
from cliptuner.serve.access import REFUSED
from executors import ClipDoc, CLIPEncoder, CLIPIndexer, CLIPTuner
from executors.options import ALLOWED_HOSTS_ENV, URI_ROOTS_ENV

REFUSED_URI = r"uri is not allowed: " + re.escape(REFUSED)


def docs(*items: ClipDoc) -> DocList[ClipDoc]:
    return DocList[ClipDoc](list(items))


@pytest.fixture
def workspace(tmp_path, tiny_model_dir, scenes):
    """``ws`` with v1 published and ``data/inside.png``; ``outside.png`` next to ``ws``."""
    ws = tmp_path / "ws"
    Registry(ws / "models").publish(tiny_model_dir)  # v1
    (ws / "data").mkdir()
    (ws / "data" / "inside.png").write_bytes(png(scenes.images[0]))
    (tmp_path / "outside.png").write_bytes(png(scenes.images[1]))
    return ws


OUTSIDE_URIS = {
    "absolute": lambda ws: str(ws.parent / "outside.png"),
    "missing-absolute": lambda ws: str(ws.parent / "no-such-file.png"),
    "dot-dot": lambda ws: "../outside.png",
    "dot-dot-missing": lambda ws: "../../no/such/file.png",
    "file-uri": lambda ws: (ws.parent / "outside.png").as_uri(),
    "file-uri-with-host": lambda ws: f"file://server{ws.parent / 'outside.png'}",
    "symlink-out": lambda ws: _symlink_out(ws),
    "http-not-allowed": lambda ws: "http://127.0.0.1:9/outside.png",
}


def _symlink_out(ws: Path) -> str:
    link = ws / "data" / "escape.png"
    if not link.is_symlink():
        link.symlink_to(ws.parent / "outside.png")
    return "escape.png"


def assert_refused(call, doc_id: str, ws: Path) -> str:
    """``call()`` raises the one refusal for ``doc_id``, naming no server folder; returns the message."""
    with pytest.raises(ValueError, match=rf"doc '{doc_id}': {REFUSED_URI}") as caught:
        call()
    assert str(ws.parent) not in str(caught.value)
    return str(caught.value)


def assert_encoder_serves(encoder) -> None:
    out = run(encoder.encode(docs=docs(ClipDoc(id="next", uri="inside.png"), ClipDoc(id="t", text="a red circle"))))
    assert all(d.embedding is not None and d.model_version == "v1" for d in out)


# -- the uri policy on every endpoint ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(OUTSIDE_URIS))
def test_encoder_refuses_outside_uris_on_encode_index_and_search(encoder, workspace, kind):
    uri = OUTSIDE_URIS[kind](workspace)
    for endpoint in (encoder.encode, encoder.encode_for_index):  # /encode; /index and /search
        assert_refused(
            lambda: run(endpoint(docs=docs(ClipDoc(id="fine", text="x"), ClipDoc(id="u", uri=uri)))), "u", workspace
        )
        assert_encoder_serves(encoder)


def test_a_refusal_reads_the_same_whether_or_not_the_file_exists(encoder, workspace):
    messages = {
        kind: assert_refused(
            lambda: run(encoder.encode(docs=docs(ClipDoc(id="u", uri=make(workspace))))), "u", workspace
        )
        for kind, make in OUTSIDE_URIS.items()
    }
    assert len(set(messages.values())) == 1, messages


def test_uris_under_the_data_root_are_read_by_every_name(encoder, workspace, scenes):
    expected = OnnxClip(workspace / "models" / "v1").encode_images([scenes.images[0]])[0]
    inside = workspace / "data" / "inside.png"
    out = run(
        encoder.encode(
            docs=docs(
                ClipDoc(id="rel", uri="inside.png"),
                ClipDoc(id="abs", uri=str(inside)),
                ClipDoc(id="file", uri=inside.as_uri()),
            )
        )
    )
    for doc in out:
        np.testing.assert_allclose(doc.embedding, expected, atol=1e-5, err_msg=doc.id)


@pytest.mark.parametrize("kind", ["absolute", "dot-dot", "symlink-out", "file-uri"])
def test_indexer_refuses_outside_uris_on_index_and_search_and_stores_nothing(indexer, workspace, kind):
    uri = OUTSIDE_URIS[kind](workspace)
    assert_refused(
        lambda: run(indexer.index(docs=docs(ClipDoc(id="ok", text="fine"), ClipDoc(id="u", uri=uri)))), "u", workspace
    )
    assert len(indexer.collection) == 0
    assert_refused(
        lambda: run(indexer.search(docs=docs(ClipDoc(id="u", uri=uri)), parameters={"limit": 3})), "u", workspace
    )
    run(indexer.index(docs=docs(ClipDoc(id="img", uri="inside.png"))))
    hits = run(indexer.search(docs=docs(ClipDoc(id="q", uri="inside.png")), parameters={"limit": 1}))[0]
    assert hits.matches[0].id == "img" and hits.scores[0] == pytest.approx(1.0, abs=1e-4)


def test_reembedding_refuses_a_stored_path_now_leading_outside(indexer, workspace, tiny_model_dir_v2, scenes):
    (workspace / "data" / "swap.png").write_bytes(png(scenes.images[2]))
    run(indexer.index(docs=docs(ClipDoc(id="swap", uri="swap.png"), ClipDoc(id="kept", uri="inside.png"))))
    (workspace / "data" / "swap.png").unlink()
    (workspace / "data" / "swap.png").symlink_to(workspace.parent / "outside.png")  # replaced after indexing
    Registry(workspace / "models").publish(tiny_model_dir_v2, version="v2")
    with pytest.raises(ValueError, match=rf"^stored doc 'swap': {REFUSED_URI}$"):
        run(indexer.train_done(docs=docs(ClipDoc(id="train-report"))))
    assert indexer.collection.version == "v1" and len(indexer.collection) == 2  # the old version keeps serving
    assert "stored doc 'swap'" in indexer.status()["last_error"]
    hits = run(indexer.search(docs=docs(ClipDoc(id="q", uri="inside.png")), parameters={"limit": 2}))[0]
    assert hits.matches[0].id == "kept" and hits.model_version == "v1"


def test_tuner_refuses_a_pair_doc_with_an_outside_uri(tuner, workspace, scenes):
    pairs = [ClipDoc(id=f"p{i}", text=f"scene {i}", tensor=scenes.images[i]) for i in range(10)]
    pairs.append(ClipDoc(id="u", text="a secret", uri=OUTSIDE_URIS["absolute"](workspace)))
    assert_refused(lambda: run(tuner.train(docs=DocList[ClipDoc](pairs), parameters=QUICK)), "u", workspace)
    assert Registry(workspace / "models").current() == "v1"


def _write_pairs(folder: Path, images: list, rows: list[tuple[str, str]]) -> None:
    (folder / "images").mkdir(parents=True)
    for i, image in enumerate(images):
        (folder / "images" / f"{i}.png").write_bytes(png(image))
    with (folder / "pairs.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)


def test_tuner_refuses_pairs_files_whose_image_paths_leave_the_roots(tuner, workspace, scenes):
    data = workspace / "data"
    os.symlink(workspace.parent / "outside.png", data / "link-out.png")
    rows = [(f"images/{i}.png", f"scene {i}") for i in range(10)]
    bad = [
        ("../../../outside.png", "escape"),
        (str(workspace.parent / "outside.png"), "absolute"),
        ("../link-out.png", "a symlink out"),
        ("../../../no-such.png", "missing outside"),
    ]
    _write_pairs(data / "evil", scenes.images[:10], rows + bad)
    with pytest.raises(ValueError) as caught:
        run(tuner.train(docs=DocList[ClipDoc](), parameters={**QUICK, "data": "evil/pairs.csv"}))
    message = str(caught.value)
    for line, (image, _) in enumerate(bad, start=len(rows) + 2):
        assert f"line {line}: image {image!r} is not allowed: {REFUSED}" in message
    assert str(workspace.parent / "outside.png") not in message.replace(repr(bad[1][0]), "")
    karpathy = {
        "images": [
            {"filename": f"{i}.png", "filepath": "images", "split": "train", "sentences": [{"raw": f"scene {i}"}]}
            for i in range(10)
        ]
    }
    karpathy["images"].append(
        {"filename": "../../../outside.png", "filepath": "images", "split": "test", "sentences": [{"raw": "escape"}]}
    )
    (data / "evil" / "dataset.json").write_text(json.dumps(karpathy), encoding="utf-8")
    with pytest.raises(ValueError, match=r"image 10 \('\.\./\.\./\.\./outside\.png'\) is not allowed"):
        run(tuner.train(docs=DocList[ClipDoc](), parameters={**QUICK, "data": "evil/dataset.json"}))
    _write_pairs(data / "good", scenes.images, [(f"images/{i}.png", scenes.captions[i]) for i in range(12)])
    with pytest.raises(ValueError) as caught:  # the WiSE-FT sweep's general pairs are read under the same rule
        run(
            tuner.train(
                docs=DocList[ClipDoc](),
                parameters={**QUICK, "batch_size": 4.0, "data": "good/pairs.csv", "general_data": "evil/pairs.csv"},
            )
        )
    assert f"image {bad[0][0]!r} is not allowed: {REFUSED}" in str(caught.value)
    assert str(data) not in str(caught.value)
    assert Registry(workspace / "models").current() == "v1"


def test_after_refusals_the_tuner_trains_on_uris_and_pairs_files_under_the_root(tuner, workspace, scenes):
    data = workspace / "data"
    _write_pairs(data / "good", scenes.images, [(f"images/{i}.png", scenes.captions[i]) for i in range(12)])
    assert_refused(
        lambda: run(tuner.train(docs=docs(ClipDoc(id="u", text="x", uri="../outside.png")), parameters=QUICK)),
        "u",
        workspace,
    )
    pairs = DocList[ClipDoc](
        [ClipDoc(id=f"p{i}", text=scenes.captions[i], uri=f"good/images/{i}.png") for i in range(12)]
    )
    out = run(tuner.train(docs=pairs, parameters={**QUICK, "batch_size": 4.0}))
    assert out[0].model_version == "v2" and out[0].tags["report"]["split"]["train_images"] == 9
    out = run(tuner.train(docs=DocList[ClipDoc](), parameters={**QUICK, "batch_size": 4.0, "data": "good/pairs.csv"}))
    assert out[0].model_version == "v3"


# -- request limits ----------------------------------------------------------------------------------------------
def test_an_oversized_text_is_refused_before_tokenizing(encoder, indexer, tuner, workspace, scenes, monkeypatch):
    long = "word " * 2_001  # 10,005 characters
    with monkeypatch.context() as patched:
        patched.setattr(ClipTokenizer, "__call__", lambda self, texts: pytest.fail("tokenized a refused text"))
        message = r"doc 'long': text is 10005 characters long, over the limit of 10000"
        for call in (
            lambda: encoder.encode(docs=docs(ClipDoc(id="ok", text="x"), ClipDoc(id="long", text=long))),
            lambda: encoder.encode_for_index(docs=docs(ClipDoc(id="long", text=long))),
            lambda: indexer.index(docs=docs(ClipDoc(id="long", text=long))),
            lambda: indexer.search(docs=docs(ClipDoc(id="long", text=long)), parameters={}),
        ):
            with pytest.raises(ValueError, match=message):
                run(call())
        with pytest.raises(ValueError, match=message):
            run(tuner.train(docs=docs(ClipDoc(id="long", text=long, tensor=scenes.images[0])), parameters=QUICK))
    assert_encoder_serves(encoder)
    assert run(encoder.encode(docs=docs(ClipDoc(id="edge", text="word " * 2_000))))[0].embedding is not None
    assert len(indexer.collection) == 0


def test_too_many_docs_are_refused_before_anything_is_embedded(workspace, encoder, indexer, monkeypatch):
    many = docs(*[ClipDoc(id=f"t{i}", text="x") for i in range(1025)])
    with monkeypatch.context() as patched:
        patched.setattr(ClipTokenizer, "__call__", lambda self, texts: pytest.fail("tokenized a refused request"))
        for call in (
            lambda: encoder.encode(docs=many),
            lambda: indexer.index(docs=many),
            lambda: indexer.search(docs=many, parameters={}),
        ):
            with pytest.raises(ValueError, match=r"^1025 docs in one request is over the limit of 1024"):
                run(call())
    small = CLIPEncoder(workspace=str(workspace), bootstrap=False, max_docs=2)
    try:
        with pytest.raises(ValueError, match=r"^3 docs in one request is over the limit of 2"):
            run(small.encode(docs=docs(*[ClipDoc(id=f"t{i}", text="x") for i in range(3)])))
        assert len(run(small.encode(docs=docs(*[ClipDoc(id=f"t{i}", text="x") for i in range(2)])))) == 2
    finally:
        small.close()
    assert len(run(encoder.encode(docs=docs(*[ClipDoc(id=f"t{i}", text="x") for i in range(1024)])))) == 1024


def test_too_many_pairs_are_refused_with_a_hint(workspace, scenes):
    tuner = CLIPTuner(workspace=str(workspace), bootstrap=False, device="cpu", max_pairs=3)
    try:
        pairs = DocList[ClipDoc]([ClipDoc(id=f"p{i}", text="x", tensor=scenes.images[i]) for i in range(4)])
        with pytest.raises(ValueError, match=r"4 pairs in one request is over the limit of 3; write them to a PAIRS"):
            run(tuner.train(docs=pairs, parameters=QUICK))
    finally:
        tuner.close()


def test_too_many_bytes_are_refused_per_blob_and_per_request(workspace, scenes):
    blob = png(scenes.images[0])
    enc = CLIPEncoder(
        workspace=str(workspace), bootstrap=False, max_blob_bytes=len(blob), max_request_bytes=2 * len(blob) + 100
    )
    wide = np.zeros(((2 * len(blob) + 100) // (64 * 3) + 1, 64, 3), np.uint8)  # over the request limit alone
    idx = CLIPIndexer(
        workspace=str(workspace),
        bootstrap=False,
        watch_interval=0,
        max_blob_bytes=len(blob),
        max_request_bytes=2 * len(blob),
    )
    try:
        with pytest.raises(ValueError, match=rf"^doc 'big': blob is {len(blob) + 1} bytes, over the limit of"):
            run(enc.encode(docs=docs(ClipDoc(id="big", blob=blob + b"\0"))))
        three = docs(*[ClipDoc(id=f"b{i}", blob=blob) for i in range(3)])
        with pytest.raises(ValueError, match=r"add up to more than the limit of \d+ bytes"):
            run(enc.encode(docs=three))
        with pytest.raises(ValueError, match=r"add up to more than the limit of \d+ bytes"):
            run(idx.index(docs=three))
        with pytest.raises(ValueError, match=r"add up to more than the limit of \d+ bytes"):  # tensors count too
            run(enc.encode(docs=docs(ClipDoc(id="t", tensor=wide))))
        assert len(idx.collection) == 0
        assert len(run(enc.encode(docs=docs(ClipDoc(id="b0", blob=blob), ClipDoc(id="b1", blob=blob))))) == 2
        assert len(run(idx.index(docs=three[:2]))) == 2 and len(idx.collection) == 2
    finally:
        enc.close()
        idx.close()


def test_a_search_limit_over_the_maximum_is_refused(indexer, workspace):
    run(indexer.index(docs=docs(ClipDoc(id="a", text="a red circle"))))
    with pytest.raises(ValueError, match=r"parameter 'limit' must be in \[1, 1000\], got 1001"):
        run(indexer.search(docs=docs(ClipDoc(id="q", text="x")), parameters={"limit": 1001.0}))
    hits = run(indexer.search(docs=docs(ClipDoc(id="q", text="x")), parameters={"limit": 1000.0}))[0]
    assert [m.id for m in hits.matches] == ["a"]
    narrow = CLIPIndexer(
        workspace=str(workspace), index_dir=str(workspace / "narrow"), bootstrap=False, watch_interval=0, max_limit=50
    )
    try:
        assert narrow.limits.max_limit == 50
        with pytest.raises(ValueError, match=r"parameter 'limit' must be in \[1, 50\], got 51"):
            run(narrow.search(docs=docs(ClipDoc(id="q", text="x")), parameters={"limit": 51}))
    finally:
        narrow.close()


# -- one setting for the three Executors -------------------------------------------------------------------------
def test_the_three_executors_share_one_policy_from_the_environment(workspace, tmp_path, monkeypatch):
    extra = tmp_path / "extra"
    extra.mkdir()
    monkeypatch.setenv(URI_ROOTS_ENV, os.pathsep.join(["data", str(extra)]))
    monkeypatch.setenv(ALLOWED_HOSTS_ENV, "images.example.com, 127.0.0.1:8080")
    built = [
        CLIPEncoder(workspace=str(workspace), bootstrap=False),
        CLIPIndexer(workspace=str(workspace), bootstrap=False, watch_interval=0),
        CLIPTuner(workspace=str(workspace), bootstrap=False, device="cpu"),
    ]
    try:
        policies = {executor.policy for executor in built}
        assert len(policies) == 1
        policy = policies.pop()
        assert policy.roots == ((workspace / "data").resolve(), extra.resolve())
        assert policy.allowed_hosts == ("images.example.com", "127.0.0.1:8080")
    finally:
        for executor in built:
            executor.close()
    explicit = CLIPEncoder(workspace=str(workspace), bootstrap=False, uri_roots=str(extra), allowed_hosts=[])
    try:  # a setting wins over the environment
        assert explicit.policy.roots == (extra.resolve(),)
    finally:
        explicit.close()
    monkeypatch.delenv(URI_ROOTS_ENV)
    monkeypatch.delenv(ALLOWED_HOSTS_ENV)
    default = CLIPEncoder(workspace=str(workspace), bootstrap=False)
    try:
        assert default.policy.roots == ((workspace / "data").resolve(),) and default.policy.allowed_hosts == ()
    finally:
        default.close()


def test_bad_settings_fail_at_start(workspace):
    with pytest.raises(ValueError, match="allowed host must be 'host' or 'host:port', got 'http://x.com'"):
        CLIPEncoder(workspace=str(workspace), bootstrap=False, allowed_hosts="http://x.com")
    with pytest.raises(ValueError, match="max_docs must be a positive integer, got 0"):
        CLIPIndexer(workspace=str(workspace), bootstrap=False, watch_interval=0, max_docs=0)
    with pytest.raises(ValueError, match="max_text_chars must be a positive integer"):
        CLIPTuner(workspace=str(workspace), bootstrap=False, device="cpu", max_text_chars=-5)


# -- an allow-listed http host, end to end -----------------------------------------------------------------------
@pytest.fixture
def image_server(scenes):
    """A ``http.server`` on 127.0.0.1 (ephemeral port) serving ``/scene.png``; 404 for anything else."""
    body = png(scenes.images[3])

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path != "/scene.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_an_allowed_host_is_fetched_by_the_encoder_and_the_indexer(workspace, scenes, image_server):
    url = f"http://{image_server}/scene.png"
    expected = OnnxClip(workspace / "models" / "v1").encode_images([scenes.images[3]])[0]
    enc = CLIPEncoder(workspace=str(workspace), bootstrap=False, allowed_hosts=image_server)
    idx = CLIPIndexer(workspace=str(workspace), bootstrap=False, watch_interval=0, allowed_hosts=[image_server])
    try:
        np.testing.assert_allclose(
            run(enc.encode(docs=docs(ClipDoc(id="w", uri=url))))[0].embedding, expected, atol=1e-5
        )
        with pytest.raises(ValueError, match=r"doc 'gone': uri could not be fetched \(HTTP 404\)"):
            run(enc.encode(docs=docs(ClipDoc(id="gone", uri=f"http://{image_server}/missing.png"))))
        run(idx.index(docs=docs(ClipDoc(id="w", uri=url))))
        hits = run(idx.search(docs=docs(ClipDoc(id="q", tensor=scenes.images[3])), parameters={"limit": 1}))[0]
        assert hits.matches[0].id == "w" and hits.scores[0] == pytest.approx(1.0, abs=1e-4)
    finally:
        enc.close()
        idx.close()
