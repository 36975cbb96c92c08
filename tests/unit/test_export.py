"""torch → ONNX export: graphs, parity, metadata, model directory; ViT-B-32 end to end against torch."""

import copy
import dataclasses
import json
from datetime import UTC, datetime

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer, _clean_whitespace
from PIL import Image

from cliptuner.config import ModelSpec
from cliptuner.model.manifest import ModelManifest
from cliptuner.model.runtime import OnnxClip
from cliptuner.model.tokenizer import VOCAB_FILENAME
from cliptuner.train import export
from cliptuner.train.export import (
    ExportError,
    build_manifest,
    export_model_dir,
    export_onnx,
    generate_sample_images,
    tokenizer_settings,
)
from cliptuner.train.models import load_model

TEXTS = ["a diagram of a red square", "", "Café &amp; crème 😀", "don't STOP " * 40, "x"]


def batch_dim(graph_value) -> str:
    return graph_value.type.tensor_type.shape.dim[0].dim_param


@pytest.fixture(scope="module")
def vit_b32(tmp_path_factory):
    """ViT-B-32 (random init) exported once for this module, without a checkpoint (saves 600 MB of writes)."""
    bundle = load_model(ModelSpec("ViT-B-32"))
    model_dir = export_model_dir(bundle, tmp_path_factory.mktemp("vit_b32") / "model", checkpoint=False)
    return bundle, model_dir


def test_vit_b32_exports_with_dynamic_batch_and_parity(vit_b32):
    bundle, model_dir = vit_b32
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["arch"] == "ViT-B-32" and meta["embed_dim"] == 512 and meta["image_size"] == 224
    assert meta["tokenizer"]["context_length"] == 77
    parity = meta["parity"]
    for tower in ("visual", "textual"):
        assert parity[tower]["min_cosine"] >= 0.9999
        assert export.TRACE_BATCH not in parity[tower]["batch_sizes"]  # proves the dynamic axis
    visual = onnx.load(str(model_dir / "visual.onnx"), load_external_data=False)
    textual = onnx.load(str(model_dir / "textual.onnx"), load_external_data=False)
    assert [i.name for i in visual.graph.input] == ["pixel_values"]
    assert [i.name for i in textual.graph.input] == ["input_ids"]
    assert visual.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert textual.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [o.name for o in visual.graph.output] == [o.name for o in textual.graph.output] == ["embeddings"]
    for graph in (visual.graph, textual.graph):
        assert batch_dim(graph.input[0]) == batch_dim(graph.output[0]) == "batch"
    assert not (model_dir / "checkpoint.pt").exists() and meta["checkpoint"] is None


def test_vit_b32_runtime_matches_torch(vit_b32):
    bundle, model_dir = vit_b32
    arrays = generate_sample_images(4, seed=7)
    clip = OnnxClip(model_dir, device="cpu")
    with torch.no_grad():
        pixels = torch.stack([bundle.preprocess_val(Image.fromarray(a)) for a in arrays])
        torch_img = bundle.model.encode_image(pixels, normalize=True).numpy()
        torch_ids = bundle.tokenizer(TEXTS)
        torch_txt = bundle.model.encode_text(torch_ids, normalize=True).numpy()
    np.testing.assert_array_equal(clip.text_feeds(TEXTS)["input_ids"], torch_ids.numpy())
    onnx_img, onnx_txt = clip.encode_images(arrays), clip.encode_text(TEXTS)
    assert onnx_img.shape == (4, 512) and onnx_txt.shape == (5, 512)
    assert (onnx_img * torch_img).sum(1).min() >= 0.9999
    assert (onnx_txt * torch_txt).sum(1).min() >= 0.9999


def test_model_dir_contents(tiny_model_dir, tiny_bundle):
    for name in ("visual.onnx", "textual.onnx", "model.json", VOCAB_FILENAME, "checkpoint.pt"):
        assert (tiny_model_dir / name).is_file(), name
    meta = json.loads((tiny_model_dir / "model.json").read_text())
    assert meta["format"] == "cliptuner-model-v1"
    assert meta["arch"] == "cliptuner-tiny" and meta["pretrained"] is None
    assert meta["embed_dim"] == 128 and meta["image_size"] == 64
    assert meta["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert meta["interpolation"] == "bicubic" and meta["resize_mode"] == "shortest"
    assert meta["tokenizer"] == {"kind": "clip_bpe", "vocab": VOCAB_FILENAME, "context_length": 32, "clean": "lower"}
    assert meta["onnx"]["visual"] == {"file": "visual.onnx", "input": "pixel_values", "output": "embeddings"}
    assert meta["onnx"]["textual"] == {"file": "textual.onnx", "input": "input_ids", "output": "embeddings"}
    assert meta["checkpoint"] == "checkpoint.pt" and meta["opset"] == 17
    created = datetime.fromisoformat(meta["created_at"])
    assert created.tzinfo is not None and abs((datetime.now(UTC) - created).total_seconds()) < 3600
    assert "version" not in meta  # the registry adds it when publishing
    assert ModelManifest.read(tiny_model_dir).to_dict() == meta  # what the exporter wrote is a valid manifest


def test_checkpoint_in_model_dir_reloads_identically(tiny_model_dir, tiny_bundle):
    reloaded = load_model(ModelSpec("cliptuner-tiny", pretrained=str(tiny_model_dir / "checkpoint.pt")))
    ids = tiny_bundle.tokenizer(TEXTS)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded.model.encode_text(ids), tiny_bundle.model.encode_text(ids))
        assert torch.equal(reloaded.model.encode_image(pixels), tiny_bundle.model.encode_image(pixels))


def test_metadata_extra_and_its_checks(tiny_bundle):
    manifest = build_manifest(tiny_bundle, parent_version="v3", report={"after": {"t2i_r1": 0.5}}, role="base")
    assert manifest.parent_version == "v3" and manifest.report["after"]["t2i_r1"] == 0.5
    assert manifest.extra == {"role": "base"} and manifest.to_dict()["role"] == "base"
    with pytest.raises(ValueError, match=r"\['embed_dim'\] would replace core keys"):
        build_manifest(tiny_bundle, embed_dim=3)
    with pytest.raises(ValueError, match=r"\['opset'\] would replace core keys"):
        build_manifest(tiny_bundle, opset=11)  # export results are the exporter's to set
    with pytest.raises(ValueError, match="'blob' is not JSON-serialisable"):
        build_manifest(tiny_bundle, blob=object())


def test_a_tokenizer_the_runtime_cannot_serve_is_refused_before_writing(tiny_bundle, tmp_path):
    class SigLipTokenizer:  # stands in for open_clip's SentencePiece-only SigLipTokenizer (no tokenizer.json)
        context_length = 32

        def __call__(self, texts):
            return torch.zeros(len(texts), 32, dtype=torch.long)

    bundle = dataclasses.replace(tiny_bundle, tokenizer=SigLipTokenizer(), spec=ModelSpec("ViT-B-16-SigLIP"))
    with pytest.raises(ValueError, match=r"'ViT-B-16-SigLIP' uses a SigLipTokenizer tokenizer"):
        build_manifest(bundle)
    with pytest.raises(ValueError, match="SigLipTokenizer"):
        export_model_dir(bundle, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="SigLipTokenizer"):
        export_onnx(bundle, tmp_path / "out2")


def test_an_hf_tokenizer_in_clips_mode_or_without_a_pad_token_is_refused(tiny_bundle):
    class Hf:
        pad_token_id = None
        sep_token_id = 2
        padding_side = truncation_side = "right"

    tok = HFTokenizer.__new__(HFTokenizer)  # open_clip's class, without loading a tokenizer
    tok.tokenizer, tok.context_length, tok.strip_sep_token = Hf(), 16, False
    tok.clean_fn, tok.tokenizer_mode = _clean_whitespace, "clips"
    bundle = dataclasses.replace(tiny_bundle, tokenizer=tok, spec=ModelSpec("some-model"))
    with pytest.raises(ValueError, match="tokenizer_mode 'clips', which the runtime does not implement"):
        tokenizer_settings(bundle)
    tok.tokenizer_mode = ""
    with pytest.raises(ValueError, match="'some-model': its Hugging Face tokenizer has no pad token"):
        tokenizer_settings(bundle)
    Hf.pad_token_id, tok.strip_sep_token = 1, True
    spec = tokenizer_settings(bundle)
    assert (spec.kind, spec.vocab, spec.pad_id, spec.strip_sep_id, spec.clean) == (
        "hf",
        "tokenizer.json",
        1,
        2,
        "whitespace",
    )


def test_tokenizer_variants(tiny_bundle):
    canon = dataclasses.replace(tiny_bundle, tokenizer=SimpleTokenizer(context_length=32, clean="canonicalize"))
    assert tokenizer_settings(canon).clean == "canonicalize"
    masked = dataclasses.replace(tiny_bundle, tokenizer=SimpleTokenizer(context_length=32, reduction_mask="simple"))
    with pytest.raises(ValueError, match="reduction mask"):
        tokenizer_settings(masked)


def test_parity_failure_names_the_tower(tiny_bundle, tmp_path, monkeypatch):
    real = export._onnx_embed

    def broken(path, feeds_list, cuda=False):
        outs = real(path, feeds_list, cuda)
        return [o[:, ::-1].copy() for o in outs] if path.name == "textual.onnx" else outs  # a wrong text graph

    monkeypatch.setattr(export, "_onnx_embed", broken)
    with pytest.raises(
        ExportError,
        match=r"textual tower parity check failed: min cosine similarity .* -?0\.\d+ < "
        r"threshold 0\.9999",
    ):
        export_onnx(tiny_bundle, tmp_path, sample_images=generate_sample_images(2))


def test_export_leaves_the_callers_model_untouched(tiny_bundle, tmp_path):
    model = copy.deepcopy(tiny_bundle.model).train()
    bundle = dataclasses.replace(tiny_bundle, model=model)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    result = export_onnx(bundle, tmp_path, check_parity=False)
    assert model.training
    assert torch.backends.mha.get_fastpath_enabled() == fastpath
    assert result["parity"] is None
    onnx.checker.check_model(result["visual"])


def test_half_precision_model_exports_as_fp32_copy(tiny_bundle, tmp_path):
    model = copy.deepcopy(tiny_bundle.model).half()
    bundle = dataclasses.replace(tiny_bundle, model=model)
    result = export_onnx(bundle, tmp_path, sample_texts=TEXTS, parity_threshold=0.999)
    assert next(model.parameters()).dtype == torch.float16  # the caller's model stays fp16
    graph = onnx.load(result["visual"]).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert result["parity"]["visual"]["min_cosine"] >= 0.999


@pytest.fixture(scope="module")
def seeded_tiny():
    """A tiny random-init bundle whose weights do not depend on the test order (int8 error depends on them)."""
    torch.manual_seed(0)
    return load_model(ModelSpec("cliptuner-tiny"))


def test_int8_export_serves_on_cpu_close_to_fp32_and_smaller(seeded_tiny, tmp_path):
    fp32_dir = export_model_dir(seeded_tiny, tmp_path / "fp32", checkpoint=False, sample_texts=TEXTS)
    out = export_model_dir(seeded_tiny, tmp_path / "int8", checkpoint=False, precision="int8", sample_texts=TEXTS)
    manifest = ModelManifest.read(out)
    assert manifest.precision == "int8" and ModelManifest.read(fp32_dir).precision == "fp32"
    parity = manifest.parity
    assert parity["precision"] == "int8" and parity["checked"] and parity["threshold"] == 0.99
    assert parity["fp32"]["visual"]["min_cosine"] >= 0.9999  # checked before the conversion too
    assert 0.99 <= parity["visual"]["min_cosine"] < 1.0 and 0.99 <= parity["textual"]["min_cosine"] < 1.0
    # 8-bit weights saturated ORT's AVX2 u8×s8 kernels: this image tower then agreed to 0.992 only
    assert parity["visual"]["min_cosine"] >= 0.999
    ops = {node.op_type for node in onnx.load(str(out / "textual.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops  # the weights are int8
    for name in ("visual.onnx", "textual.onnx"):
        assert (out / name).stat().st_size < 0.6 * (fp32_dir / name).stat().st_size
    fp32, int8 = OnnxClip(fp32_dir, device="cpu"), OnnxClip(out, device="cpu")
    images = generate_sample_images(4, seed=5)
    for a, b in (
        (fp32.encode_images(images), int8.encode_images(images)),
        (fp32.encode_text(TEXTS), int8.encode_text(TEXTS)),
    ):
        cosines = (a * b).sum(axis=1)
        assert cosines.min() >= 0.99 and not np.allclose(a, b, atol=1e-6)


def test_int8_graphs_quantize_matmuls_and_embedding_with_7_bit_weights_and_keep_the_patch_conv(seeded_tiny, tmp_path):
    result = export_onnx(seeded_tiny, tmp_path, check_parity=False, precision="int8")
    visual, textual = onnx.load(result["visual"]), onnx.load(result["textual"])
    for model in (visual, textual):
        onnx.checker.check_model(model)
        assert batch_dim(model.graph.input[0]) == "batch" and batch_dim(model.graph.output[0]) == "batch"
        assert "MatMulInteger" in {node.op_type for node in model.graph.node}
        weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
        assert weights and all(np.abs(w.astype(np.int32)).max() <= 64 for w in weights)  # 2 × 255 × 64 < 2 ** 15
    visual_ops = {node.op_type for node in visual.graph.node}
    assert "Conv" in visual_ops and "ConvInteger" not in visual_ops  # ConvInteger is slower than the fp32 Conv
    # every weight matrix, the attention out-projections (Gemm in the fp32 graph) and the token embedding included
    largest_fp32 = max(
        numpy_helper.to_array(t).nbytes for t in textual.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
    )
    assert largest_fp32 <= seeded_tiny.model.positional_embedding.numel() * 4  # the positional embedding


def test_int8_graphs_that_miss_their_threshold_are_refused_by_tower(seeded_tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(export.PARITY_THRESHOLDS, "int8", 0.999999)  # no int8 graph agrees that closely
    with pytest.raises(
        ExportError,
        match=r"visual tower parity check failed: min cosine similarity ONNX vs torch "
        r"0\.9\d+ < threshold 0\.999999",
    ):
        export_onnx(seeded_tiny, tmp_path, precision="int8", sample_texts=TEXTS)


def test_fp16_export_is_marked_and_refused_on_a_cpu_only_runtime(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "_cuda_usable", lambda: False)  # as on this CPU-only install
    out = export_model_dir(tiny_bundle, tmp_path / "fp16", checkpoint=False, precision="fp16", sample_texts=TEXTS)
    manifest = ModelManifest.read(out)
    assert manifest.precision == "fp16"
    assert manifest.parity["checked"] is False and "CUDA" in manifest.parity["reason"]
    assert manifest.parity["fp32"]["textual"]["min_cosine"] >= 0.9999
    initializers = onnx.load(str(out / "visual.onnx")).graph.initializer
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in initializers)
    graph = onnx.load(str(out / "visual.onnx")).graph  # inputs and outputs stay float32
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        with pytest.raises(RuntimeError, match=r"fp16 export, for CUDA serving.*--precision int8"):
            OnnxClip(out, device="auto")


@pytest.mark.gpu
def test_fp16_export_parity_on_cuda(tiny_bundle, tmp_path):
    out = export_model_dir(tiny_bundle, tmp_path / "fp16", checkpoint=False, precision="fp16", sample_texts=TEXTS)
    parity = ModelManifest.read(out).parity
    assert parity["checked"] and parity["device"] == "cuda"
    assert parity["visual"]["min_cosine"] >= 0.999 and parity["textual"]["min_cosine"] >= 0.999
    clip = OnnxClip(out, device="cuda")
    assert clip.encode_text(["a red square"]).shape == (1, tiny_bundle.embed_dim)


def test_bad_options_raise(tiny_bundle, tmp_path):
    with pytest.raises(ValueError, match=r"precision must be one of \['fp32', 'fp16', 'int8'\], got 'int4'"):
        export_onnx(tiny_bundle, tmp_path, precision="int4")
    with pytest.raises(ValueError, match="exporter must be one of"):
        export_onnx(tiny_bundle, tmp_path, exporter="tensorrt")
    with pytest.raises(ValueError, match="parity_threshold"):
        export_onnx(tiny_bundle, tmp_path, parity_threshold=1.5)


@pytest.mark.slow
def test_dynamo_exporter(tiny_bundle, tmp_path):
    result = export_onnx(tiny_bundle, tmp_path, exporter="dynamo")
    assert result["opset"] >= 18
    assert result["parity"]["textual"]["min_cosine"] >= 0.9999
    assert result["parity"]["visual"]["min_cosine"] >= 0.9999
