"""Bad input over gRPC, table-driven: each case gets a clear error naming the doc and the problem, the next valid
request succeeds, and the index is unchanged.

One Flow (`cliptuner serve` on 127.0.0.1) serves the module, with a small gallery indexed first. After every
refused request the test checks that a valid search still finds a known gallery image first and that the index
holds exactly the gallery. Valid images of every common PIL mode (grayscale, palette, RGBA, CMYK, 16-bit, 1×1)
must be encoded, and a corrupt model version in the registry must not take the service down.
"""

import io
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from docarray import DocList
from PIL import Image
from service import FlowProcess, ServerError, by_id, png, post, serve_gallery

from cliptuner.model.registry import Registry
from cliptuner.serve.limits import RequestLimits
from cliptuner.train import synthetic
from executors.schemas import ClipDoc

GALLERY = 12


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header announces ``width``×``height`` (a decompression bomb when large, broken when 0)."""
    data = bytearray(encoded(Image.new("RGB", (1, 1))))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def doc(id_: str, **fields: Any) -> ClipDoc:
    return ClipDoc(id=id_, **fields)


@dataclass
class Case:
    name: str
    on: str
    docs: Callable[[Path], list]  # workspace → docs (some cases place files in the workspace first)
    message: str  # regex the error must match
    parameters: dict = field(default_factory=dict)


def _outside_file(workspace: Path) -> Path:
    path = workspace.parent / "outside-secret.png"
    path.write_bytes(png(np.full((8, 8, 3), 200, np.uint8)))
    return path


def _symlink_out(workspace: Path) -> str:
    link = workspace / "data" / "escape.png"
    if not link.is_symlink():
        link.symlink_to(_outside_file(workspace))
    return str(link)


REFUSED_URI = r"doc 'u': uri is not allowed"
REFUSED_URL = r"doc 'u' \(url\): uri is not allowed"
RGB = np.zeros((8, 8, 3), np.uint8)

CASES = [
    # images: bytes that are not a usable image
    Case("corrupt-bytes", "/encode", lambda w: [doc("b", blob=b"this is not an image")], r"doc 'b'.*cannot decode"),
    Case(
        "truncated-png",
        "/encode",
        lambda w: [doc("b", blob=png(np.full((64, 64, 3), 7, np.uint8))[:60])],
        r"doc 'b'.*(cannot decode|truncated)",
    ),
    Case("non-image-file", "/index", lambda w: [doc("b", blob=b"PK\x03\x04" + bytes(200))], r"doc 'b'.*cannot decode"),
    Case(
        "decompression-bomb",
        "/encode",
        lambda w: [doc("b", blob=png_with_size(30000, 30000))],
        r"doc 'b'.*(over the limit|decompression bomb)",
    ),
    Case("zero-size-png", "/encode", lambda w: [doc("b", blob=png_with_size(0, 0))], r"doc 'b'.*(cannot decode|empty)"),
    Case("empty-blob", "/encode", lambda w: [doc("b", blob=b"")], r"doc 'b'.*(empty|neither text nor an image)"),
    # tensors
    Case(
        "tensor-rank-2",
        "/encode",
        lambda w: [doc("t", tensor=np.zeros((8, 8), np.uint8))],
        r"doc 't'.*H×W×3 uint8.*\(8, 8\)",
    ),
    Case(
        "tensor-rank-4",
        "/index",
        lambda w: [doc("t", tensor=np.zeros((1, 8, 8, 3), np.uint8))],
        r"doc 't'.*H×W×3 uint8",
    ),
    Case(
        "tensor-float",
        "/encode",
        lambda w: [doc("t", tensor=np.zeros((8, 8, 3), np.float32))],
        r"doc 't'.*H×W×3 uint8.*float32",
    ),
    Case(
        "tensor-nan",
        "/search",
        lambda w: [doc("t", tensor=np.full((8, 8, 3), np.nan, np.float32))],
        r"doc 't'.*H×W×3 uint8",
    ),
    Case(
        "tensor-4-channels",
        "/encode",
        lambda w: [doc("t", tensor=np.zeros((8, 8, 4), np.uint8))],
        r"doc 't'.*H×W×3 uint8.*\(8, 8, 4\)",
    ),
    Case(
        "tensor-empty-side",
        "/encode",
        lambda w: [doc("t", tensor=np.zeros((0, 8, 3), np.uint8))],
        r"doc 't'.*(empty side|shape \(0, 8, 3\))",
    ),  # an empty array loses its dtype on the wire
    # texts and docs without content
    Case("empty-text", "/encode", lambda w: [doc("x", text="")], r"doc 'x'.*neither text nor an image"),
    Case("whitespace-text", "/index", lambda w: [doc("x", text="  \n\t ")], r"doc 'x'.*neither text nor an image"),
    Case("oversized-text", "/encode", lambda w: [doc("x", text="word " * 40_000)], r"doc 'x'.*(text|characters)"),
    Case("no-content", "/index", lambda w: [doc("ok", text="fine"), doc("x")], r"doc 'x'.*neither text nor an image"),
    # uris the service must not read
    Case("absolute-path", "/encode", lambda w: [doc("u", uri=str(_outside_file(w)))], REFUSED_URI),
    Case("missing-absolute-path", "/encode", lambda w: [doc("u", uri="/no/such/dir/x.png")], REFUSED_URI),
    Case("file-uri", "/index", lambda w: [doc("u", uri=_outside_file(w).as_uri())], REFUSED_URI),
    Case("dot-dot", "/search", lambda w: [doc("u", uri="../../../../etc/hostname")], REFUSED_URI),
    Case("symlink-out", "/index", lambda w: [doc("u", uri=_symlink_out(w))], REFUSED_URI),
    Case("http-not-allowed", "/encode", lambda w: [doc("u", uri="http://example.invalid/cat.png")], REFUSED_URI),
    Case(
        "train-uri-outside",
        "/train",
        lambda w: [doc(f"u{i}" if i else "u", text="a cat", uri=str(_outside_file(w))) for i in range(8)],
        REFUSED_URI,
        {"epochs": 1, "batch_size": 2},
    ),
    Case(
        "bad-data-uri",
        "/encode",
        lambda w: [doc("d", uri="data:image/png;base64,@@@not-base64@@@")],
        r"doc 'd'.*data URI",
    ),
    # docarray's standard names (ImageDoc/TextDoc `url`, `bytes_`): the same rules as `uri` and `blob`
    Case("url-outside", "/encode", lambda w: [doc("u", url=str(_outside_file(w)))], REFUSED_URL),
    Case("url-symlink-out", "/index", lambda w: [doc("u", url=_symlink_out(w))], REFUSED_URL),
    Case("url-http-not-allowed", "/search", lambda w: [doc("u", url="http://example.invalid/cat.png")], REFUSED_URL),
    Case(
        "uri-url-disagree",
        "/index",
        lambda w: [doc("d", uri="cat.png", url="dog.png")],
        r"doc 'd': uri and url differ .*executors\.schemas\.ClipDoc",
    ),
    Case(
        "blob-bytes-disagree",
        "/encode",
        lambda w: [doc("d", blob=png(RGB), bytes_=png(RGB + 1))],
        r"doc 'd': blob and bytes_ differ",
    ),
    Case(
        "corrupt-bytes_",
        "/index",
        lambda w: [doc("b", bytes_=b"this is not an image")],
        r"doc 'b' \(bytes_\).*cannot decode",
    ),
    Case(
        "oversized-bytes_",
        "/encode",
        lambda w: [doc("b", bytes_=bytes(RequestLimits.max_blob_bytes + 1))],
        rf"doc 'b' \(bytes_\): blob is {RequestLimits.max_blob_bytes + 1} bytes, over the limit",
    ),
    # /index, /delete, /search specifics
    Case("duplicate-ids", "/index", lambda w: [doc("dup", text="one"), doc("dup", text="two")], r"dup"),
    Case("delete-unknown", "/delete", lambda w: [doc("never-stored")], r"never-stored"),
    Case("limit-zero", "/search", lambda w: [doc("q", text="a star")], r"'limit'", {"limit": 0}),
    Case("limit-text", "/search", lambda w: [doc("q", text="a star")], r"'limit'", {"limit": "ten"}),
    Case("limit-fraction", "/search", lambda w: [doc("q", text="a star")], r"'limit'", {"limit": 2.5}),
    Case("limit-too-large", "/search", lambda w: [doc("q", text="a star")], r"'limit'", {"limit": 10**9}),
    Case(
        "unknown-parameter",
        "/search",
        lambda w: [doc("q", text="a star")],
        r"unknown parameter\(s\) \['topk'\]",
        {"topk": 3},
    ),
    Case(
        "return-content-ill-typed",
        "/search",
        lambda w: [doc("q", text="a star")],
        r"return_content",
        {"return_content": "yes"},
    ),
    Case(
        "filter-not-a-mapping",
        "/search",
        lambda w: [doc("q", text="a star")],
        r"parameter 'filter' must be",
        {"filter": "tags.kind == 'a' or 1 == 1"},
    ),
    Case(
        "filter-not-a-tag",
        "/search",
        lambda w: [doc("q", text="a star")],
        r"key 'id' must name a tag",
        {"filter": {"id": "x"}},
    ),
    Case(
        "filter-injected-key",
        "/search",
        lambda w: [doc("q", text="a star")],
        r"must be a tag name",
        {"filter": {"tags.kind') OR 1=1 --": "x"}},
    ),
    Case(
        "filter-nested-value",
        "/search",
        lambda w: [doc("q", text="a star")],
        r"must be a string",
        {"filter": {"tags.kind": {"$ne": "x"}}},
    ),
    Case(
        "vector-query-wrong-dim",
        "/search",
        lambda w: [doc("v", embedding=np.ones(7, np.float32))],
        r"doc 'v'.*(dimension|dim)",
    ),
    Case(
        "vector-query-nan",
        "/search",
        lambda w: [doc("v", embedding=np.full(128, np.nan, np.float32))],
        r"doc 'v'.*finite",
    ),
    # /train
    Case("train-without-pairs", "/train", lambda w: [], r"/train needs pairs", {"epochs": 1}),
    Case(
        "train-too-few",
        "/train",
        lambda w: [doc(f"p{i}", text=f"scene {i}", tensor=RGB) for i in range(3)],
        r"(fewer than batch_size|too few|hold out)",
        {"epochs": 1},
    ),
    Case(
        "train-text-only", "/train", lambda w: [doc("p", text="a star")], r"doc 'p'.*text and an image", {"epochs": 1}
    ),
    Case(
        "train-unknown-parameter",
        "/train",
        lambda w: [doc("p", text="a star", tensor=RGB)],
        r"unknown parameter\(s\) \['lr'\] for /train",
        {"lr": 0.1},
    ),
    Case("train-ill-typed", "/train", lambda w: [doc("p", text="a star", tensor=RGB)], r"epochs", {"epochs": "five"}),
    Case("train-negative-epochs", "/train", lambda w: [doc("p", text="a star", tensor=RGB)], r"epochs", {"epochs": -1}),
    Case("train-data-outside", "/train", lambda w: [], r"outside the data root|not allowed", {"data": "../../x.csv"}),
    Case(
        "train-unknown-precision",
        "/train",
        lambda w: [doc("p", text="a star", tensor=RGB)],
        r"export_precision must be one of \['fp32', 'fp16', 'int8'\], got 'int4'",
        {"export_precision": "int4"},
    ),
    Case(
        "train-ill-typed-precision",
        "/train",
        lambda w: [doc("p", text="a star", tensor=RGB)],
        r"export_precision must be a string, got 8",
        {"export_precision": 8},
    ),
    # oversized requests
    Case("too-many-docs", "/encode", lambda w: [doc(f"n{i}", text="x") for i in range(5000)], r"(docs|limit)"),
]


@pytest.fixture(scope="module")
def gallery():
    return synthetic.generate(GALLERY, domain="domain", seed=303)


@pytest.fixture(scope="module")
def flow(tmp_path_factory, gallery):
    server = serve_gallery(tmp_path_factory.mktemp("bad-input-workspace"), gallery)
    yield server
    server.stop()


def assert_served_and_intact(flow: FlowProcess, gallery, probe: int = 4) -> None:
    """A valid search finds a gallery image first, and the index holds exactly the gallery."""
    hits = post(
        flow,
        "/search",
        DocList[ClipDoc]([ClipDoc(id="probe", tensor=gallery.images[probe])]),
        parameters={"limit": GALLERY},
    )[0]
    assert hits.matches[0].id == gallery.image_ids[probe]
    assert sorted(m.id for m in hits.matches) == sorted(gallery.image_ids)
    assert by_id(post(flow, "/status"))["status-indexer"].tags["count"] == GALLERY


def test_the_table_has_at_least_thirty_kinds():
    assert len({case.name for case in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_bad_input_is_named_and_the_service_goes_on(flow, gallery, case):
    docs = case.docs(flow.workspace)
    with ServerError(case.message) as error:
        post(
            flow,
            case.on,
            DocList[ClipDoc](docs) if docs else None,
            parameters=case.parameters,
            request_size=max(len(docs), 1),
        )
    assert not any(str(flow.workspace.parent) in m for m in error.messages if "uri is not allowed" in m)
    assert_served_and_intact(flow, gallery)


def test_a_refused_uri_says_the_same_whether_or_not_the_file_exists(flow):
    messages = []
    for uri in (str(_outside_file(flow.workspace)), str(flow.workspace.parent / "does-not-exist.png")):
        with ServerError(REFUSED_URI) as error:
            post(flow, "/encode", DocList[ClipDoc]([doc("u", uri=uri)]))
        messages.append(error.messages)
    assert messages[0] == messages[1]


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "1x1", "LA", "1"])
def test_every_common_image_mode_is_encoded(flow, mode):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8))
    if mode == "1x1":
        blob = encoded(rgb.resize((1, 1)))
    elif mode == "CMYK":
        blob = encoded(rgb.convert("CMYK"), "JPEG")
    elif mode == "I;16":
        blob = encoded(Image.fromarray(rng.integers(0, 65535, (40, 30), dtype=np.uint16)))
    else:
        blob = encoded(rgb.convert(mode))
    out = post(flow, "/encode", DocList[ClipDoc]([doc("img", blob=blob)]))[0]
    assert out.embedding.shape == (128,) and abs(float(np.linalg.norm(out.embedding)) - 1) < 1e-4


def test_a_uri_under_the_data_root_is_read(flow):
    path = flow.workspace / "data" / "inside.png"
    path.write_bytes(png(np.full((16, 16, 3), 90, np.uint8)))
    by_path = post(flow, "/encode", DocList[ClipDoc]([doc("u", uri=str(path))]))[0]
    by_blob = post(flow, "/encode", DocList[ClipDoc]([doc("b", blob=path.read_bytes())]))[0]
    np.testing.assert_allclose(by_path.embedding, by_blob.embedding, atol=1e-6)


def test_a_corrupt_model_version_in_the_registry_leaves_the_old_one_serving(flow, gallery):
    registry = Registry(flow.workspace / "models")
    serving = registry.current()
    broken = flow.workspace / "broken-version"
    shutil.copytree(registry.path(serving), broken)
    (broken / "textual.onnx").write_bytes(b"\x08\x01 this is not an onnx graph")
    version = registry.publish(broken, move=True)  # CURRENT now names a version that cannot be loaded
    try:
        out = post(flow, "/encode", DocList[ClipDoc]([doc("t", text="a blue square")]))[0]
        assert out.model_version == serving and out.embedding.shape == (128,)
        assert_served_and_intact(flow, gallery)
    finally:
        registry.set_current(serving)
    assert version != serving
