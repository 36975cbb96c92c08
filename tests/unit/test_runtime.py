"""OnnxClip: ONNX-only encoding that matches torch, providers, errors, no torch import."""

import io
import json
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from cliptuner.model import runtime
from cliptuner.model.images import ImageError, ImageLimits
from cliptuner.model.manifest import ModelManifest
from cliptuner.model.registry import Registry
from cliptuner.model.runtime import OnnxClip
from cliptuner.train.export import generate_sample_images

TEXTS = ["a photo of a cat", "", "A RED square!!", "emoji 😀 &amp; café", "long " * 60]


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def clip(tiny_model_dir) -> OnnxClip:
    return OnnxClip(tiny_model_dir, device="cpu", intra_op_threads=1)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The same pictures as a path, PNG bytes, an array and a PIL image."""
    arrays = generate_sample_images(4, seed=3)
    path = tmp_path_factory.mktemp("images") / "first.png"
    path.write_bytes(png_bytes(arrays[0]))
    return arrays, [str(path), png_bytes(arrays[1]), arrays[2], Image.fromarray(arrays[3])]


def test_embeddings_match_torch(clip, tiny_bundle, images):
    arrays, sources = images
    model = tiny_bundle.model
    with torch.no_grad():
        pixels = torch.stack([tiny_bundle.preprocess_val(Image.fromarray(a)) for a in arrays])
        torch_img = model.encode_image(pixels, normalize=True).numpy()
        torch_txt = model.encode_text(tiny_bundle.tokenizer(TEXTS), normalize=True).numpy()
    onnx_img = clip.encode_images(sources)
    onnx_txt = clip.encode_text(TEXTS)
    assert onnx_img.shape == (4, 128) and onnx_txt.shape == (5, 128)
    assert onnx_img.dtype == np.float32 and onnx_txt.dtype == np.float32
    assert (onnx_img * torch_img).sum(1).min() >= 0.9999
    assert (onnx_txt * torch_txt).sum(1).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(onnx_img, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(onnx_txt, axis=1), 1.0, atol=1e-5)


def test_properties(clip, tiny_model_dir):
    assert clip.embed_dim == 128
    assert clip.providers == ["CPUExecutionProvider"]
    assert clip.version == tiny_model_dir.name  # no version key: the directory name
    meta = clip.metadata
    assert meta["arch"] == "cliptuner-tiny" and meta["tokenizer"]["context_length"] == 32
    meta["embed_dim"] = 1
    assert clip.embed_dim == 128 and clip.metadata["embed_dim"] == 128  # a copy
    assert clip.manifest == ModelManifest.read(tiny_model_dir) and clip.manifest.to_dict() == clip.metadata
    assert clip.text_feeds(["a"])["input_ids"].shape == (1, 32)
    assert clip.image_feeds([np.zeros((10, 20, 3), np.uint8)])["pixel_values"].shape == (1, 3, 64, 64)


def test_empty_inputs_give_zero_rows(clip):
    assert clip.encode_text([]).shape == (0, 128)
    assert clip.encode_images([]).shape == (0, 128)


def test_minibatches_give_the_same_result(tiny_model_dir, clip, images):
    _, sources = images
    small = OnnxClip(tiny_model_dir, device="cpu", batch_size=2)
    np.testing.assert_allclose(small.encode_text(TEXTS), clip.encode_text(TEXTS), atol=1e-5)
    np.testing.assert_allclose(
        small.encode_images(sources + sources[:1]), clip.encode_images(sources + sources[:1]), atol=1e-5
    )


def test_concurrent_encodes_agree(clip, images):
    _, sources = images
    expected_txt, expected_img = clip.encode_text(TEXTS), clip.encode_images(sources)

    def work(i):
        return clip.encode_text(TEXTS) if i % 2 else clip.encode_images(sources)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(8)))
    for i, result in enumerate(results):
        np.testing.assert_allclose(result, expected_txt if i % 2 else expected_img, atol=1e-5)


def test_bad_image_is_named(clip, images):
    _, sources = images
    with pytest.raises(ImageError, match="doc-b"):
        clip.encode_images([sources[1], b"not an image"], names=["doc-a", "doc-b"])
    with pytest.raises(ImageError, match=r"item #1: image <12 bytes>: cannot decode"):
        clip.encode_images([sources[1], b"not an image"])
    with pytest.raises(ValueError, match="names has 1 entries for 2 images"):
        clip.encode_images([sources[1], sources[2]], names=["one"])
    with pytest.raises(TypeError, match="list of strings"):
        clip.encode_text("a single string")


def test_image_limits_apply(tiny_model_dir):
    strict = OnnxClip(tiny_model_dir, device="cpu", limits=ImageLimits(max_pixels=100))
    with pytest.raises(ImageError, match="over the limit"):
        strict.encode_images([np.zeros((20, 20, 3), np.uint8)], names=["big"])


def test_cuda_without_cuda_provider_raises(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="device='cuda'.*no CUDAExecutionProvider.*onnxruntime-gpu"):
        OnnxClip(tiny_model_dir, device="cuda")
    assert OnnxClip(tiny_model_dir, device="auto").providers == ["CPUExecutionProvider"]


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_cuda_listed_but_unusable_falls_back_or_raises(tiny_model_dir, monkeypatch):
    if "CUDAExecutionProvider" in runtime.ort.get_available_providers():
        pytest.fail("this test expects a CPU-only onnxruntime; the CUDA path is covered by the gpu test")
    # a provider that the build lists but cannot create (missing CUDA libraries) must not be trusted
    monkeypatch.setattr(
        runtime.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert OnnxClip(tiny_model_dir, device="auto").providers == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="device='cuda'"):
        OnnxClip(tiny_model_dir, device="cuda:0")


def test_bad_arguments_raise(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="device must be one of"):
        OnnxClip(tiny_model_dir, device="tpu")
    with pytest.raises(ValueError, match="device must be one of"):
        OnnxClip(tiny_model_dir, device="cpu:1")
    with pytest.raises(ValueError, match="batch_size"):
        OnnxClip(tiny_model_dir, batch_size=0)
    with pytest.raises(ValueError, match="no model.json"):
        OnnxClip(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    meta = json.loads((broken / "model.json").read_text())
    meta["format"] = "something-else"
    (broken / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format 'something-else'"):
        OnnxClip(broken)
    (broken / "model.json").write_text(ModelManifest.read(tiny_model_dir).to_json())
    (broken / "textual.onnx").unlink()
    with pytest.raises(ValueError, match=r"is not a model directory: missing \['textual.onnx'\]"):
        OnnxClip(broken)


def test_version_comes_from_the_registry(tiny_model_dir, tmp_path):
    reg = Registry(tmp_path / "models")
    reg.publish(tiny_model_dir)
    version = reg.publish(tiny_model_dir)
    clip = OnnxClip(reg.current_path(), device="cpu")
    assert clip.version == version == "v2"
    assert clip.encode_text(["x"]).shape == (1, 128)


def test_fresh_process_encodes_without_torch(tiny_model_dir, clip, images, tmp_path):
    arrays, sources = images
    np.save(tmp_path / "array.npy", arrays[2])
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from cliptuner.model.runtime import OnnxClip
        clip = OnnxClip({str(tiny_model_dir)!r}, device="auto", batch_size=2)
        txt = clip.encode_text({TEXTS!r})
        img = clip.encode_images([{sources[0]!r}, np.load({str(tmp_path / "array.npy")!r})])
        assert "torch" not in sys.modules and "open_clip" not in sys.modules, "runtime imported torch/open_clip"
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip", "torchvision"))
        print(json.dumps({{"txt": txt.tolist(), "img": img.tolist(), "heavy": heavy, "providers": clip.providers}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    np.testing.assert_allclose(np.array(out["txt"]), clip.encode_text(TEXTS), atol=1e-5)
    np.testing.assert_allclose(np.array(out["img"]), clip.encode_images([sources[0], arrays[2]]), atol=1e-5)


@pytest.mark.gpu
def test_cuda_provider_serves_and_matches_cpu(tiny_model_dir, clip):
    gpu = OnnxClip(tiny_model_dir, device="cuda")
    assert gpu.providers[0] == "CUDAExecutionProvider"
    assert OnnxClip(tiny_model_dir, device="auto").providers[0] == "CUDAExecutionProvider"
    assert (gpu.encode_text(TEXTS) * clip.encode_text(TEXTS)).sum(1).min() >= 0.999
