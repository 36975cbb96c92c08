"""What to embed for one item: image fields checked at request time, data: URIs, paths under a root, mixed batches.

The array rule is one function (:func:`cliptuner.model.images.check_array_image`) used when a request arrives
(:func:`cliptuner.serve.content.image_source`) and again before decoding (:func:`cliptuner.model.images.decode_image`):
both must accept and refuse exactly the same arrays.
"""

import base64
import io
from pathlib import Path
from urllib.parse import quote_from_bytes

import numpy as np
import pytest
from PIL import Image

from cliptuner.model.images import ImageError, ImageLimits, check_array_image, decode_image
from cliptuner.model.runtime import OnnxClip
from cliptuner.serve.access import UriPolicy, UriRefused
from cliptuner.serve.content import Item, embed_items, image_source, make_item
from cliptuner.train.export import generate_sample_images


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pictures() -> list[np.ndarray]:
    return generate_sample_images(3, seed=11)


@pytest.fixture(scope="module")
def clip(tiny_model_dir) -> OnnxClip:
    return OnnxClip(tiny_model_dir, device="cpu", intra_op_threads=1)


# -- which field wins ----------------------------------------------------------------------------------------------
def test_tensor_wins_over_blob_which_wins_over_uri(pictures, tmp_path):
    path = tmp_path / "c.png"
    path.write_bytes(png(pictures[2]))
    tensor, blob = pictures[0], png(pictures[1])

    policy = UriPolicy(roots=(tmp_path,))
    from_tensor = image_source("doc 'a'", tensor=tensor, blob=blob, uri=str(path), policy=policy)
    assert isinstance(from_tensor, np.ndarray) and np.array_equal(from_tensor, tensor)
    assert image_source("doc 'a'", blob=blob, uri=str(path), policy=policy) == blob
    assert image_source("doc 'a'", uri=str(path), policy=policy) == str(path.resolve())
    assert image_source("doc 'a'") is None
    assert image_source("doc 'a'", uri="") is None  # an empty uri is no image


def test_make_item_embeds_a_pair_by_its_image_and_text_alone_by_its_text(pictures):
    pair = make_item("doc 'p'", text="a red circle", tensor=pictures[0])
    assert pair.image is not None and pair.text is None and pair.name == "doc 'p'"
    text = make_item("doc 't'", text="a red circle")
    assert text == Item(name="doc 't'", text="a red circle")


@pytest.mark.parametrize("fields", [{}, {"text": ""}, {"text": "   \n"}, {"uri": ""}])
def test_an_item_with_neither_text_nor_image_is_refused(fields):
    with pytest.raises(ValueError, match=r"^doc 'nothing': has neither text nor an image"):
        make_item("doc 'nothing'", **fields)


def test_an_empty_blob_is_refused():
    with pytest.raises(ValueError, match=r"^doc 'b': blob is empty"):
        make_item("doc 'b'", text="a caption", blob=b"")


# -- the array rule ---------------------------------------------------------------------------------------------------
def _nan_image() -> np.ndarray:
    image = np.zeros((8, 8, 3), np.float32)
    image[0, 0, 0] = np.nan
    return image


BAD_ARRAYS = [
    pytest.param(np.zeros((8, 8), np.uint8), r"got shape \(8, 8\) dtype uint8; a grayscale image", id="grayscale"),
    pytest.param(np.zeros((8, 8, 4), np.uint8), r"got shape \(8, 8, 4\) dtype uint8; an RGBA image", id="rgba"),
    pytest.param(np.zeros((3, 16, 16), np.uint8), r"got shape \(3, 16, 16\) dtype uint8; channels first", id="chw"),
    pytest.param(np.zeros((2, 8, 8, 3), np.uint8), r"got shape \(2, 8, 8, 3\) dtype uint8", id="batch"),
    pytest.param(np.zeros((8, 8, 3), np.float32), r"got shape \(8, 8, 3\) dtype float32; floats", id="float"),
    pytest.param(_nan_image(), r"got shape \(8, 8, 3\) dtype float32", id="nan"),
    pytest.param(np.full((8, 8, 3), np.inf), r"got shape \(8, 8, 3\) dtype float64", id="inf"),
    pytest.param(np.zeros((8, 8, 3), np.int64), r"got shape \(8, 8, 3\) dtype int64", id="int64"),
    pytest.param(np.zeros((8, 8, 3), bool), r"got shape \(8, 8, 3\) dtype bool", id="bool"),
    pytest.param(np.array(7, np.uint8), r"got shape \(\) dtype uint8", id="scalar"),
    pytest.param(
        np.zeros((0, 8, 3), np.uint8), r"with sides of at least 1 pixels, got shape \(0, 8, 3\)", id="no-rows"
    ),
    pytest.param(
        np.zeros((8, 0, 3), np.uint8), r"with sides of at least 1 pixels, got shape \(8, 0, 3\)", id="no-cols"
    ),
]


@pytest.mark.parametrize("array, detail", BAD_ARRAYS)
def test_bad_tensors_are_refused_naming_item_shape_dtype_and_rule(array, detail):
    with pytest.raises(ImageError, match=rf"^doc 'x': tensor must be an H×W×3 uint8 image.*{detail}"):
        image_source("doc 'x'", tensor=array)


@pytest.mark.parametrize("array, detail", BAD_ARRAYS)
def test_decode_image_refuses_the_same_arrays_with_the_same_rule(array, detail):
    with pytest.raises(ImageError, match=rf"^image doc 'x': array must be an H×W×3 uint8 image.*{detail}"):
        decode_image(array, name="doc 'x'")


def test_request_check_and_decoding_accept_exactly_the_same_arrays():
    limits = ImageLimits(max_pixels=64, min_side=2)
    candidates = [
        np.zeros(shape, dtype)
        for shape in [(8, 8, 3), (2, 32, 3), (1, 8, 3), (9, 8, 3), (8, 8), (8, 8, 4)]
        for dtype in (np.uint8, np.float32)
    ]
    accepted = []
    for array in candidates:
        try:
            image_source("doc 'x'", tensor=array, limits=limits)
            at_request = True
        except ImageError:
            at_request = False
        try:
            decoded = decode_image(array, limits, name="doc 'x'")
            at_decode = True
        except ImageError:
            at_decode = False
        assert at_request == at_decode, (array.shape, array.dtype)
        if at_decode:
            assert decoded.mode == "RGB" and decoded.size == (array.shape[1], array.shape[0])
            accepted.append(array.shape)
    assert accepted == [(8, 8, 3), (2, 32, 3)]  # uint8 only, within both limits


def test_a_tensor_over_max_pixels_is_refused_before_decoding():
    limits = ImageLimits(max_pixels=100)
    big = np.zeros((11, 10, 3), np.uint8)
    with pytest.raises(ImageError, match=r"^doc 'big': tensor: 11x10 = 110 pixels is over the limit of 100"):
        image_source("doc 'big'", tensor=big, limits=limits)
    with pytest.raises(ImageError, match=r"over the limit of 100"):
        decode_image(big, limits, name="doc 'big'")
    assert image_source("doc 'ok'", tensor=np.zeros((10, 10, 3), np.uint8), limits=limits) is not None


def test_a_valid_tensor_decodes_to_the_same_pixels(pictures):
    array = check_array_image(pictures[0], name="doc 'x': tensor")
    assert array is pictures[0]  # no copy
    assert np.array_equal(np.asarray(decode_image(pictures[0][:, ::2])), pictures[0][:, ::2])  # strided view


def test_a_ragged_list_is_not_an_array_image():
    with pytest.raises(ImageError, match=r"^doc 'r': tensor must be an H×W×3 uint8 image, got something that is not"):
        image_source("doc 'r'", tensor=[[1, 2], [3]])


# -- data: URIs ------------------------------------------------------------------------------------------------------
def test_base64_data_uri_gives_the_file_bytes(pictures):
    data = png(pictures[0])
    payload = base64.b64encode(data).decode()
    assert image_source("doc 'd'", uri=f"data:image/png;base64,{payload}") == data
    assert image_source("doc 'd'", uri=f"data:image/png;BASE64,{payload}") == data


def test_percent_encoded_data_uri_gives_the_file_bytes(pictures):
    data = png(pictures[0])  # binary: bytes >= 0x80 must come back as they were, not as text
    assert any(byte >= 0x80 for byte in data)
    assert image_source("doc 'd'", uri=f"data:image/png,{quote_from_bytes(data)}") == data


@pytest.mark.parametrize(
    "uri, message",
    [
        ("data:image/png;base64", r"malformed data URI \(no ','\)"),
        ("data:image/png;base64,not*base64!", r"data URI is not valid base64"),
        ("data:image/png;base64,", r"data URI holds no data"),
        ("data:image/png,", r"data URI holds no data"),
    ],
)
def test_malformed_data_uris_are_refused(uri, message):
    with pytest.raises(ValueError, match=rf"^doc 'd': {message}"):
        image_source("doc 'd'", uri=uri)


def test_data_uris_over_the_byte_limit_are_refused():
    limits = ImageLimits(max_bytes=300)
    with pytest.raises(ValueError, match=r"^doc 'd': data URI is over the limit of 300 bytes"):
        image_source("doc 'd'", uri="data:image/png;base64," + base64.b64encode(b"x" * 600).decode(), limits=limits)
    with pytest.raises(ValueError, match=r"^doc 'd': data URI holds 301 bytes, over the limit of 300"):
        image_source("doc 'd'", uri="data:image/png;base64," + base64.b64encode(b"x" * 301).decode(), limits=limits)
    assert (
        image_source("doc 'd'", uri="data:image/png;base64," + base64.b64encode(b"x" * 300).decode(), limits=limits)
        == b"x" * 300
    )


def test_a_uri_longer_than_the_largest_data_uri_is_refused_by_length():
    with pytest.raises(ValueError, match=r"^doc 'd': uri is \d+ characters long, over the limit"):
        image_source("doc 'd'", uri="data:," + "A" * (50 * 1024 * 1024))


# -- local paths and other uris (the rules themselves: tests/unit/test_access.py) -----------------------------------
@pytest.fixture
def root(tmp_path, pictures) -> Path:
    """``tmp_path/root`` with ``a.png`` and ``sub/b.png``; ``tmp_path/outside.png`` beside it."""
    inside = tmp_path / "root"
    (inside / "sub").mkdir(parents=True)
    (inside / "a.png").write_bytes(png(pictures[0]))
    (inside / "sub" / "b.png").write_bytes(png(pictures[1]))
    (tmp_path / "outside.png").write_bytes(png(pictures[2]))
    return inside


@pytest.fixture
def policy(root) -> UriPolicy:
    return UriPolicy(roots=(root,))


def test_paths_under_the_policy_roots_resolve_to_files_under_them(root, policy):
    real = root.resolve()
    for uri in [
        "a.png",
        "sub/b.png",
        "sub/../a.png",
        str(root / "a.png"),
        f"file://{root / 'sub' / 'b.png'}",
        f"file://localhost{root / 'a.png'}",
    ]:
        resolved = Path(image_source("doc 'p'", uri=uri, policy=policy))
        assert resolved.is_absolute() and resolved.is_relative_to(real) and resolved.is_file(), uri


@pytest.mark.parametrize(
    "make_uri",
    [
        lambda root: "../outside.png",
        lambda root: str(root.parent / "outside.png"),
        lambda root: f"file://{root.parent / 'outside.png'}",
        lambda root: "file://images/a.png",
        lambda root: "https://example.com/cat.png",
        lambda root: "s3://bucket/cat.png",
    ],
)
def test_uris_the_policy_does_not_allow_get_one_message_naming_the_item(root, policy, make_uri):
    with pytest.raises(
        UriRefused,
        match=r"^doc 'e': uri is not allowed: local paths must lie under the service's "
        r"image roots, http\(s\) only for allow-listed hosts$",
    ):
        make_item("doc 'e'", text="a caption", uri=make_uri(root), policy=policy)


def test_without_a_policy_only_data_uris_are_read(root, pictures):
    data = png(pictures[0])
    assert image_source("doc 'd'", uri="data:image/png;base64," + base64.b64encode(data).decode()) == data
    for uri in ["a.png", str(root / "a.png"), f"file://{root / 'a.png'}"]:
        with pytest.raises(UriRefused, match=r"^doc 'p': uri is not allowed"):
            image_source("doc 'p'", uri=uri)


def test_a_blob_over_the_byte_limit_is_refused_before_decoding():
    limits = ImageLimits(max_bytes=300)
    with pytest.raises(ValueError, match=r"^doc 'b': blob is 301 bytes, over the limit of 300$"):
        image_source("doc 'b'", blob=b"x" * 301, limits=limits)
    assert image_source("doc 'b'", blob=b"x" * 300, limits=limits) == b"x" * 300


def test_remote_images_are_fetched_a_few_at_a_time_when_embedded(clip, pictures, monkeypatch):
    bodies = {f"http://images.test/{i}.png": png(pictures[i % 3]) for i in range(70)}
    fetched, batches = [], []

    def fetch(self, url, name, max_bytes):  # stands in for the network: the policy's fetch is tested elsewhere
        fetched.append(url)
        return bodies[url]

    monkeypatch.setattr(UriPolicy, "fetch", fetch)
    encode_images = clip.encode_images
    monkeypatch.setattr(
        clip,
        "encode_images",
        lambda images, names=None: batches.append(len(images)) or encode_images(images, names=names),
    )
    web = UriPolicy(allowed_hosts=("images.test",))
    items = [make_item(f"doc '{i}'", uri=url, policy=web) for i, url in enumerate(bodies)]
    assert fetched == []  # checked, not fetched
    vectors = embed_items(clip, items)
    assert fetched == list(bodies) and max(batches) < len(items) and sum(batches) == len(items)
    np.testing.assert_allclose(vectors, clip.encode_images([bodies[url] for url in bodies]), atol=1e-5)


# -- embedding ----------------------------------------------------------------------------------------------------
def test_mixed_items_embed_as_each_would_alone(clip, pictures, root):
    data = png(pictures[1])
    items = [
        make_item("doc 't0'", text="a red circle"),
        make_item("doc 'i0'", tensor=pictures[0]),
        make_item("doc 't1'", text="two blue squares"),
        make_item("doc 'i1'", text="a caption that is not used", blob=data),
        make_item("doc 'i2'", uri="data:image/png;base64," + base64.b64encode(data).decode()),
        make_item("doc 'i3'", uri="sub/b.png", policy=UriPolicy(roots=(root,))),
        make_item("doc 't2'", text="a green triangle"),
    ]
    together = embed_items(clip, items)
    assert together.shape == (len(items), clip.embed_dim) and together.dtype == np.float32
    for row, item in zip(together, items):
        alone = clip.encode_images([item.image]) if item.image is not None else clip.encode_text([item.text])
        np.testing.assert_allclose(row, alone[0], atol=1e-5, err_msg=item.name)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(together[3], together[4], atol=1e-6)  # the same file as blob and as data: URI
    np.testing.assert_allclose(together[4], together[5], atol=1e-6)  # … and as a path
    assert not np.allclose(together[0], together[1], atol=1e-3)  # a text is not embedded like an image


def test_embedding_no_items_gives_no_rows(clip):
    assert embed_items(clip, []).shape == (0, clip.embed_dim)


def test_an_undecodable_image_is_named_when_embedding(clip):
    items = [make_item("doc 'fine'", text="a star"), make_item("doc 'broken'", blob=b"\x89PNG not really")]
    with pytest.raises(ImageError, match=r"doc 'broken'.*cannot decode"):
        embed_items(clip, items)
