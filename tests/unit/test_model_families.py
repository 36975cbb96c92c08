"""Each model family end to end without the hub: CLIP BPE (``cliptuner-tiny``), SigLIP-style and XLM-R-style small
random-init models (``cliptuner.train.families``, tokenizers trained here) train a few steps, export with the
end-to-end parity check (serving tokenizer + ONNX against open_clip's tokenizer + torch), publish, and serve with
the torch-free runtime; the serving tokenizer and image geometry match open_clip's on inputs of every kind."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cliptuner.config import ModelSpec, TrainConfig
from cliptuner.model.hf_tokenizer import HfTokenizer
from cliptuner.model.images import fit_image, preprocess
from cliptuner.model.manifest import ModelManifest
from cliptuner.model.registry import Registry
from cliptuner.model.runtime import OnnxClip
from cliptuner.train import synthetic
from cliptuner.train.export import ExportError, export_model_dir
from cliptuner.train.families import FAMILIES, write_tiny_model
from cliptuner.train.loop import finetune
from cliptuner.train.models import load_model

TEXTS = [
    "a small red circle at the top left",
    "",
    "Two BLUE squares, and a green_cross!!",
    "un petit cercle rouge en haut à gauche 😀",
    "three large white stars " * 12,  # longer than the context: cut
    "赤い丸",
]


@pytest.fixture(scope="module")
def family_archs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: write_tiny_model(root / family, family, seed=1) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_exports_with_parity_publishes_and_serves(family, family_archs, tmp_path):
    torch.manual_seed(0)
    bundle = load_model(ModelSpec(family_archs[family]))
    pairs = synthetic.generate(24, domain="generic", seed=3)
    train, held_out = pairs.split(0.25, seed=0)
    cfg = TrainConfig(epochs=1, batch_size=6, learning_rate=1e-3, warmup_steps=0, seed=0, precision="fp32")
    report = finetune(bundle, train, held_out, cfg)
    assert report["epochs"] == 1 and set(report["after"]) >= {"t2i_r5", "i2t_r5"}
    assert report["loss"] == ("siglip" if family == "siglip" else "clip")  # loss=auto: the family's own

    out = export_model_dir(bundle, tmp_path / "model", metadata_extra={"report": {"family": family}})
    manifest = ModelManifest.read(out)
    parity = manifest.parity
    assert parity["tokenizer"] == {"texts": 6, "ids_equal": True}
    assert parity["textual"]["min_cosine"] >= 0.9999 and parity["visual"]["min_cosine"] >= 0.9999
    expected_kind = "clip_bpe" if family == "clip" else "hf"
    assert manifest.tokenizer.kind == expected_kind and (out / manifest.tokenizer.vocab).is_file()
    if family == "siglip":
        assert manifest.resize_mode == "squash" and manifest.mean == [0.5, 0.5, 0.5]
        assert manifest.tokenizer.clean == "canonicalize" and manifest.tokenizer.pad_id == 0
        assert manifest.logit_bias is not None and manifest.logit_scale is not None
    elif family == "xlmr":
        assert manifest.tokenizer.pad_id == 1 and manifest.logit_bias is None
    else:
        assert manifest.resize_mode == "shortest" and manifest.logit_bias is None

    registry = Registry(tmp_path / "models")
    version = registry.publish(out)
    served = OnnxClip(registry.path(version), device="cpu", intra_op_threads=1)
    with torch.no_grad():
        want_text = bundle.model.encode_text(bundle.tokenizer(TEXTS), normalize=True).numpy()
    got_text = served.encode_text(TEXTS)
    np.testing.assert_allclose((got_text * want_text).sum(-1), 1.0, atol=1e-4)
    images = synthetic.generate(3, seed=5, image_size=48).images  # not the model's input size: resized as torch does
    pixels = np.stack([bundle.preprocess_val(Image.fromarray(image)).numpy() for image in images])
    with torch.no_grad():
        want_image = bundle.model.encode_image(torch.from_numpy(pixels), normalize=True).numpy()
    np.testing.assert_allclose((served.encode_images(images) * want_image).sum(-1), 1.0, atol=1e-4)


@pytest.mark.parametrize("family", ["siglip", "xlmr"])
def test_the_serving_tokenizer_gives_open_clips_ids(family, family_archs):
    bundle = load_model(ModelSpec(family_archs[family]))
    served = HfTokenizer(
        bundle.tokenizer.tokenizer.name_or_path + "/tokenizer.json",
        bundle.context_length,
        clean="canonicalize" if family == "siglip" else "whitespace",
        pad_id=bundle.tokenizer.tokenizer.pad_token_id,
    )
    ids = served(TEXTS)
    np.testing.assert_array_equal(ids, bundle.tokenizer(TEXTS).numpy())
    assert ids.shape == (len(TEXTS), bundle.context_length) and ids.dtype == np.int64
    pad = bundle.tokenizer.tokenizer.pad_token_id
    assert (ids[1] == pad).sum() > (ids[0] == pad).sum()  # the empty text is padded to the context length
    assert served.token_count(TEXTS[4]) > bundle.context_length  # what was cut
    assert served.token_count(TEXTS[0]) == int((ids[0] != pad).sum())


def test_a_tokenizer_that_differs_from_open_clips_fails_the_export(family_archs, tmp_path):
    bundle = load_model(ModelSpec(family_archs["siglip"]))
    bundle.tokenizer.clean_fn = lambda text: text  # open_clip now skips the canonicalize cleaning the model records
    bundle.tokenizer.clean_fn.__name__ = "_clean_canonicalize"
    import open_clip.tokenizer as oc

    real = oc._clean_canonicalize
    try:
        oc._clean_canonicalize = bundle.tokenizer.clean_fn  # still recorded as canonicalize, cleans nothing
        with pytest.raises(ExportError, match=r"the serving tokenizer \(HfTokenizer\) gives other ids than open_clip"):
            export_model_dir(bundle, tmp_path / "model")
    finally:
        oc._clean_canonicalize = real
    assert not (tmp_path / "model" / "model.json").exists()


def test_hf_tokenizer_settings_are_checked(tmp_path, family_archs):
    path = family_archs["xlmr"].removeprefix("local-dir:") + "/tokenizer.json"
    with pytest.raises(ValueError, match="tokenizer file .* does not exist"):
        HfTokenizer(tmp_path / "nothing.json", 16)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a tokenizers tokenizer.json"):
        HfTokenizer(tmp_path / "bad.json", 16)
    with pytest.raises(ValueError, match="pad_id must be an id of the vocab"):
        HfTokenizer(path, 16, pad_id=10**6)
    with pytest.raises(ValueError, match="padding_side must be one of"):
        HfTokenizer(path, 16, pad_id=1, padding_side="middle")
    with pytest.raises(TypeError, match="text #1 must be a str"):
        HfTokenizer(path, 16, pad_id=1)(["fine", 3])
    left = HfTokenizer(path, 16, pad_id=1, padding_side="left", strip_sep_id=2)(["a red circle"])[0]
    assert left[0] == 1 and left[-1] == 0  # padded on the left; the closing </s> (2) replaced by 0


def test_a_manifest_with_an_hf_tokenizer_needs_its_pad_id(tiny_model_dir):
    data = json.loads((tiny_model_dir / "model.json").read_text())
    data["tokenizer"] = {"kind": "hf", "vocab": "tokenizer.json", "context_length": 16, "clean": "whitespace"}
    with pytest.raises(ValueError, match="tokenizer.pad_id must be an integer >= 0 for an hf tokenizer"):
        ModelManifest.from_dict(data)
    data["tokenizer"]["pad_id"] = 1
    data["resize_mode"] = "stretch"
    with pytest.raises(ValueError, match="resize_mode 'stretch' is not supported; known: \\['shortest', 'squash'"):
        ModelManifest.from_dict(data)


@pytest.mark.parametrize("resize_mode", ["shortest", "squash", "longest"])
@pytest.mark.parametrize("shape", [(40, 90), (90, 40), (64, 64), (30, 30)])
def test_image_geometry_matches_open_clips_eval_transform(resize_mode, shape):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = PreprocessCfg(size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize_mode=resize_mode, fill_color=0)
    transform = image_transform_v2(cfg, is_train=False)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8))
    want = transform(image).numpy()
    got = preprocess([image], 64, cfg.mean, cfg.std, "bicubic", resize_mode, 0)[0]
    assert fit_image(image, 64, "bicubic", resize_mode).size == (64, 64)
    np.testing.assert_allclose(got, want, atol=1e-5)
