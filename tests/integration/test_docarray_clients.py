"""docarray's standard ImageDoc and TextDoc from a plain `jina.Client`, over gRPC on 127.0.0.1.

One Flow (`cliptuner serve`, cliptuner-tiny) serves the module. An ``ImageDoc`` by ``tensor``, ``bytes_`` (PNG) or
``url`` (a file under ``<workspace>/data``) and a ``TextDoc`` are encoded exactly as a ``ClipDoc`` with
``tensor``/``blob``/``uri``/``text`` and as the served model in-process; ImageDocs indexed are found by TextDoc
and ImageDoc queries, whose matches a client reads as ``ClipDoc`` (or as its own type that declares ``matches``);
the standard names follow the same uri rules, and a doc whose names disagree is refused by name.
"""

from typing import Optional

import numpy as np
import pytest
from docarray import BaseDoc, DocList
from docarray.documents import ImageDoc, TextDoc
from service import FlowProcess, ServerError, png

from cliptuner.model.registry import Registry
from cliptuner.model.runtime import OnnxClip
from executors.schemas import ClipDoc

IMAGES = 4
QUERY = "a small red square on a blue field"


class Match(BaseDoc):
    """What a client that does not import the service's schemas declares to read a match."""

    uri: Optional[str] = None
    score: Optional[float] = None
    model_version: Optional[str] = None


class Labelled(TextDoc):
    """A client type whose ``tags`` is not the service's (a dict)."""

    tags: list[str] = ["cat"]


class TextQuery(TextDoc):
    """docarray's TextDoc with the fields a search answers in."""

    model_version: Optional[str] = None
    matches: Optional[DocList[Match]] = None
    scores: Optional[list[float]] = None


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("docarray-clients-workspace")
    server = FlowProcess(workspace, workspace.parent / "flow.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    return [rng.integers(0, 256, (24 + 4 * k, 20, 3), dtype=np.uint8) for k in range(IMAGES)]


@pytest.fixture(scope="module")
def files(flow, images) -> list[str]:
    """Each image as a PNG file under the workspace's data root."""
    data = flow.workspace / "data"
    data.mkdir(exist_ok=True)
    paths = []
    for k, image in enumerate(images):
        path = data / f"image-{k}.png"
        path.write_bytes(png(image))
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def clip(flow) -> OnnxClip:
    return OnnxClip(Registry(flow.workspace / "models").current_path(), device="cpu", intra_op_threads=1)


def call(flow: FlowProcess, on: str, docs, return_type, **kwargs):
    return flow.client().post(on, inputs=docs, return_type=return_type, **kwargs)


def test_image_and_text_docs_are_encoded_like_clip_docs(flow, images, files, clip):
    standard = DocList[ImageDoc](
        [ImageDoc(id="t", tensor=images[0]), ImageDoc(id="b", bytes_=png(images[1])), ImageDoc(id="u", url=files[2])]
    )
    own = DocList[ClipDoc](
        [ClipDoc(id="t", tensor=images[0]), ClipDoc(id="b", blob=png(images[1])), ClipDoc(id="u", uri=files[2])]
    )
    as_clip = call(flow, "/encode", standard, DocList[ClipDoc])
    reference = call(flow, "/encode", own, DocList[ClipDoc])
    expected = clip.encode_images(images[:3])  # [3, embed_dim]
    assert [d.id for d in as_clip] == ["t", "b", "u"]
    for got, ref, vector in zip(as_clip, reference, expected):
        np.testing.assert_allclose(got.embedding, ref.embedding, atol=1e-6)
        np.testing.assert_allclose(got.embedding, vector, atol=1e-5)
        assert got.model_version == clip.version
    assert as_clip[2].url == files[2] and as_clip[2].uri is None  # echoed under the name the client used

    as_image = call(flow, "/encode", standard, DocList[ImageDoc])
    assert [d.id for d in as_image] == ["t", "b", "u"]
    for got, vector in zip(as_image, expected):
        np.testing.assert_allclose(got.embedding, vector, atol=1e-5)
        assert got.tensor is None and got.bytes_ is None  # the pixels and bytes sent are not sent back
    assert as_image[2].url == files[2]

    texts = DocList[TextDoc]([TextDoc(id="x", text=QUERY)])
    as_text = call(flow, "/encode", texts, DocList[TextDoc])[0]
    text_clip = call(flow, "/encode", DocList[ClipDoc]([ClipDoc(id="x", text=QUERY)]), DocList[ClipDoc])[0]
    assert as_text.id == "x" and as_text.text == QUERY
    np.testing.assert_allclose(as_text.embedding, text_clip.embedding, atol=1e-6)
    np.testing.assert_allclose(as_text.embedding, clip.encode_text([QUERY])[0], atol=1e-5)


def test_indexed_image_docs_are_found_by_text_and_image_queries(flow, images, files, clip):
    gallery = DocList[ImageDoc](
        [
            ImageDoc(id="g0", tensor=images[0]),
            ImageDoc(id="g1", bytes_=png(images[1])),
            ImageDoc(id="g2", url=files[2]),
            ImageDoc(id="g3", bytes_=png(images[3])),
        ]
    )
    indexed = call(flow, "/index", gallery, DocList[ImageDoc])
    assert [d.id for d in indexed] == ["g0", "g1", "g2", "g3"]
    vectors = clip.encode_images(images)  # [IMAGES, embed_dim]
    for got, vector in zip(indexed, vectors):
        np.testing.assert_allclose(got.embedding, vector, atol=1e-5)

    query = DocList[TextDoc]([TextDoc(id="q", text=QUERY)])
    hits = call(flow, "/search", query, DocList[ClipDoc], parameters={"limit": IMAGES})[0]
    expected = vectors @ clip.encode_text([QUERY])[0]  # [IMAGES] cosine scores
    order = [f"g{k}" for k in np.argsort(-expected, kind="stable")]
    assert [m.id for m in hits.matches] == order
    np.testing.assert_allclose(hits.scores, np.sort(expected)[::-1], atol=1e-5)
    assert hits.model_version == clip.version and {m.model_version for m in hits.matches} == {clip.version}
    assert {m.id: m.uri for m in hits.matches}["g2"] == files[2]  # a url is stored as the doc's uri

    declared = call(flow, "/search", query, DocList[TextQuery], parameters={"limit": IMAGES})[0]
    assert [m.id for m in declared.matches] == order and declared.model_version == clip.version
    np.testing.assert_allclose(declared.scores, hits.scores, atol=1e-6)
    plain = call(flow, "/search", query, DocList[TextDoc], parameters={"limit": IMAGES})[0]
    np.testing.assert_allclose(plain.embedding, hits.embedding, atol=1e-6)  # TextDoc has no field for matches

    by_image = call(
        flow,
        "/search",
        DocList[ImageDoc]([ImageDoc(id="qi", bytes_=png(images[2]))]),
        DocList[ClipDoc],
        parameters={"limit": 2},
    )[0]
    assert by_image.matches[0].id == "g2" and by_image.scores[0] == pytest.approx(1.0, abs=1e-4)


def test_standard_names_follow_the_uri_rules_and_must_agree(flow, images, files):
    outside = flow.workspace.parent / "outside-docarray.png"
    outside.write_bytes(png(images[0]))
    with ServerError(r"doc 'o' \(url\): uri is not allowed") as error:
        call(flow, "/encode", DocList[ImageDoc]([ImageDoc(id="o", url=str(outside))]), DocList[ImageDoc])
    assert not any(str(flow.workspace.parent) in m for m in error.messages)
    with ServerError(r"doc 'o' \(url\): uri is not allowed"):
        call(flow, "/index", DocList[ImageDoc]([ImageDoc(id="o", url="../../../../etc/hostname")]), DocList[ImageDoc])
    with ServerError(r"doc 'n' \(bytes_\).*cannot decode"):
        call(flow, "/search", DocList[ImageDoc]([ImageDoc(id="n", bytes_=b"not an image at all")]), DocList[ClipDoc])
    with ServerError(r"doc 'd': uri and url differ .*executors\.schemas\.ClipDoc"):
        call(flow, "/encode", DocList[ClipDoc]([ClipDoc(id="d", uri=files[0], url=files[1])]), DocList[ClipDoc])
    with ServerError(r"doc 'e': blob and bytes_ differ"):
        call(
            flow,
            "/index",
            DocList[ClipDoc]([ClipDoc(id="e", blob=png(images[0]), bytes_=png(images[1]))]),
            DocList[ClipDoc],
        )
    agreeing = call(flow, "/encode", DocList[ClipDoc]([ClipDoc(id="a", uri=files[3], url=files[3])]), DocList[ClipDoc])[
        0
    ]
    alone = call(flow, "/encode", DocList[ImageDoc]([ImageDoc(id="a", url=files[3])]), DocList[ClipDoc])[0]
    np.testing.assert_allclose(agreeing.embedding, alone.embedding, atol=1e-6)


def test_a_doc_that_does_not_fit_the_schema_is_refused_naming_the_schema_to_send(flow):
    with ServerError(
        r"doc 'l': cannot be read as executors\.schemas\.ClipDoc \(tags: .*dictionary.*\); send "
        r"executors\.schemas\.ClipDoc, or docarray's ImageDoc or TextDoc"
    ):
        call(flow, "/encode", DocList[Labelled]([Labelled(id="l", text=QUERY)]), DocList[ClipDoc])
    with ServerError(r"doc 'l': cannot be read as executors\.schemas\.ClipDoc"):
        call(flow, "/search", DocList[Labelled]([Labelled(id="l", text=QUERY)]), DocList[ClipDoc])
    out = call(flow, "/encode", DocList[TextDoc]([TextDoc(id="after", text=QUERY)]), DocList[ClipDoc])
    assert out[0].id == "after" and out[0].embedding is not None  # and the service goes on
