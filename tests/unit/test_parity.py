"""End-to-end parity: what a client sends (encoded image files, raw texts) → the ONNX runtime, against the same
input → OpenCLIP's own preprocessing and tokenizer → the torch model.

A cosine bound alone is weak on random-init models: resizing with bilinear instead of bicubic filtering still
gives cosines above 0.9999 on smooth pictures. So the images here are non-square, of sizes other than the
model's input, full of high-frequency content (noise, stripes) where the resampling filter shows, and the
preprocessed pixels themselves are compared with OpenCLIP's.
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cliptuner.model.runtime import OnnxClip

TEXTS = ["a photo of a cat", "", "A RED square!!", "emoji 😀 &amp; café", "long " * 60]
PIXEL_TOLERANCE = 1e-5  # normalised pixels; one grey level is ~0.015, bilinear vs bicubic differs by ~0.5
EMBEDDING_TOLERANCE = 1e-4  # per component of unit vectors; bilinear vs bicubic differs by ~0.01


def encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_files() -> list[bytes]:
    """PNG and JPEG files of noise (97×61, 200×150) and stripes (150×200): none square, none 64 px."""
    rng = np.random.default_rng(0)
    stripes = np.zeros((200, 150, 3), np.uint8)
    stripes[:, ::2, 0] = 255  # one-pixel columns
    stripes[::3, :, 1] = 200  # rows every third pixel
    arrays = [
        rng.integers(0, 256, (61, 97, 3), dtype=np.uint8),
        rng.integers(0, 256, (150, 200, 3), dtype=np.uint8),
        stripes,
    ]
    return [encoded(array, fmt) for array in arrays for fmt in ("PNG", "JPEG")]


@pytest.fixture(scope="module")
def clip(tiny_model_dir) -> OnnxClip:
    return OnnxClip(tiny_model_dir, device="cpu", intra_op_threads=1)


def open_clip_pixels(tiny_bundle, files: list[bytes]) -> torch.Tensor:
    """PIL decode, then OpenCLIP's evaluation transform."""
    return torch.stack([tiny_bundle.preprocess_val(Image.open(io.BytesIO(data)).convert("RGB")) for data in files])


def test_runtime_preprocessing_equals_open_clips(clip, tiny_bundle, image_files):
    pixels = clip.image_feeds(image_files)["pixel_values"]  # [N, 3, 64, 64]
    expected = open_clip_pixels(tiny_bundle, image_files).numpy()
    assert pixels.shape == expected.shape == (6, 3, 64, 64)
    worst = float(np.abs(pixels - expected).max())
    assert worst <= PIXEL_TOLERANCE, f"runtime pixels differ from OpenCLIP's by up to {worst:.4g}"


def test_image_files_embed_like_open_clip_and_torch(clip, tiny_bundle, image_files):
    with torch.no_grad():
        expected = tiny_bundle.model.encode_image(open_clip_pixels(tiny_bundle, image_files), normalize=True).numpy()
    embeddings = clip.encode_images(image_files)
    assert embeddings.shape == (6, 128)
    np.testing.assert_allclose(embeddings, expected, atol=EMBEDDING_TOLERANCE, rtol=0)
    assert (embeddings * expected).sum(1).min() >= 1 - 1e-5


def test_texts_embed_like_open_clip_and_torch(clip, tiny_bundle):
    with torch.no_grad():
        expected = tiny_bundle.model.encode_text(tiny_bundle.tokenizer(TEXTS), normalize=True).numpy()
    embeddings = clip.encode_text(TEXTS)
    np.testing.assert_allclose(embeddings, expected, atol=EMBEDDING_TOLERANCE, rtol=0)
    assert (embeddings * expected).sum(1).min() >= 1 - 1e-5
