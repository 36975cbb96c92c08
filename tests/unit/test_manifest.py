"""ModelManifest: the model-directory format — round trip, validation errors, unknown keys kept."""

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest

from cliptuner.model import manifest as mf
from cliptuner.model.manifest import ModelManifest, OnnxSpec, TokenizerSpec


def minimal(**overrides) -> ModelManifest:
    fields = dict(
        arch="fake",
        embed_dim=8,
        image_size=16,
        mean=[0.5, 0.5, 0.5],
        std=[0.25, 0.25, 0.25],
        interpolation="bicubic",
        tokenizer=TokenizerSpec(context_length=8),
        onnx=OnnxSpec.standard(),
    )
    return ModelManifest(**{**fields, **overrides})


@pytest.fixture
def model_dir(tmp_path):
    """A directory the manifest accepts: a minimal model.json and placeholder files."""
    path = tmp_path / "model"
    path.mkdir()
    minimal().write(path)
    for name in mf.REQUIRED_FILES[1:]:
        (path / name).write_bytes(b"x")
    return path


def rewrite(model_dir, change) -> None:
    data = json.loads((model_dir / mf.MANIFEST_FILE).read_text())
    change(data)
    (model_dir / mf.MANIFEST_FILE).write_text(json.dumps(data))


def test_round_trip_through_dict_and_directory(model_dir):
    m = minimal(
        parity={"threshold": 0.9999},
        opset=17,
        exporter="torchscript",
        created_at="2024-01-01T00:00:00+00:00",
        version="v3",
        parent_version="v2",
        report={"after": {"t2i_r1": 0.5}},
    )
    assert ModelManifest.from_dict(m.to_dict()) == m
    assert ModelManifest.from_dict(json.loads(m.to_json())) == m
    m.write(model_dir)
    assert ModelManifest.read(model_dir) == m
    assert os.listdir(model_dir).count(mf.MANIFEST_FILE) == 1 and not [n for n in os.listdir(model_dir) if ".tmp" in n]


def test_to_dict_layout_and_lineage_keys(model_dir):
    data = minimal().to_dict()
    assert list(data)[:2] == ["format", "arch"] and data["format"] == mf.FORMAT == "cliptuner-model-v1"
    assert data["tokenizer"] == {"kind": "clip_bpe", "vocab": mf.VOCAB_FILE, "context_length": 8, "clean": "lower"}
    assert data["onnx"]["visual"] == {"file": "visual.onnx", "input": "pixel_values", "output": "embeddings"}
    assert data["checkpoint"] is None and data["pretrained"] is None  # always present, even when null
    assert not {"version", "parent_version", "report"} & set(data)  # only once set
    data["mean"].append(1.0)
    assert minimal().to_dict()["mean"] == [0.5, 0.5, 0.5]  # every call is a fresh copy


def test_unknown_keys_are_kept_at_every_level(model_dir):
    rewrite(
        model_dir,
        lambda d: (
            d.update(role="base", future={"a": [1, 2]}),
            d["tokenizer"].update(lowercase=True),
            d["onnx"]["visual"].update(dtype="fp16"),
            d["onnx"].update(opset_hint=18),
        ),
    )
    m = ModelManifest.read(model_dir)
    assert m.extra == {"role": "base", "future": {"a": [1, 2]}}
    assert m.tokenizer.extra == {"lowercase": True} and m.onnx.visual.extra == {"dtype": "fp16"}
    assert m.onnx.extra == {"opset_hint": 18}
    before = json.loads((model_dir / mf.MANIFEST_FILE).read_text())
    m.write(model_dir)
    assert json.loads((model_dir / mf.MANIFEST_FILE).read_text()) == before


def test_extra_may_not_shadow_a_field():
    with pytest.raises(ValueError, match=r"extra keys \['arch'\] shadow fields"):
        minimal(extra={"arch": "other"})


def test_older_directories_without_optional_keys_still_load(model_dir):
    rewrite(
        model_dir,
        lambda d: [
            d.pop(k)
            for k in (
                "pretrained",
                "force_quick_gelu",
                "resize_mode",
                "created_at",
                "opset",
                "exporter",
                "parity",
                "checkpoint",
            )
        ],
    )
    m = ModelManifest.read(model_dir)
    assert m.resize_mode == "shortest" and m.force_quick_gelu is False and m.checkpoint is None


def test_missing_manifest_or_unreadable_json(tmp_path, model_dir):
    with pytest.raises(ValueError, match=r"'.*empty' is not a model directory: no model.json"):
        (tmp_path / "empty").mkdir()
        ModelManifest.read(tmp_path / "empty")
    (model_dir / mf.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read '.*model.json'"):
        ModelManifest.read(model_dir)
    (model_dir / mf.MANIFEST_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match="the manifest must be a JSON object, got list"):
        ModelManifest.read(model_dir)


def test_bad_format(model_dir):
    rewrite(model_dir, lambda d: d.update(format="cliptuner-model-v0"))
    with pytest.raises(ValueError, match=r"model.json' has format 'cliptuner-model-v0'; expected 'cliptuner-model-v1'"):
        ModelManifest.read(model_dir)
    rewrite(model_dir, lambda d: d.pop("format"))
    with pytest.raises(ValueError, match="has format None"):
        ModelManifest.read(model_dir)


@pytest.mark.parametrize(
    "path, shown",
    [
        (("embed_dim",), "'embed_dim'"),
        (("onnx",), "'onnx'"),
        (("tokenizer", "context_length"), "'tokenizer.context_length'"),
        (("onnx", "textual"), "'onnx.textual'"),
        (("onnx", "visual", "input"), "'onnx.visual.input'"),
    ],
)
def test_missing_key_is_named(model_dir, path, shown):
    def drop(d):
        for key in path[:-1]:
            d = d[key]
        del d[path[-1]]

    rewrite(model_dir, drop)
    with pytest.raises(ValueError, match=rf"model.json' lacks \[{shown}\]"):
        ModelManifest.read(model_dir)


def test_unknown_tokenizer_kind(model_dir):
    rewrite(model_dir, lambda d: d["tokenizer"].update(kind="sentencepiece"))
    with pytest.raises(
        ValueError, match=r"tokenizer kind 'sentencepiece' is not supported; known: \['clip_bpe', 'hf'\]"
    ):
        ModelManifest.read(model_dir)


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "resize_mode",
            "stretch",
            r"resize_mode 'stretch' is not supported; known: \['shortest', 'squash', 'longest'\]",
        ),
        ("fill_color", 300, r"fill_color must be an integer in \[0, 255\], got 300"),
        ("interpolation", "lanczos", r"interpolation 'lanczos' is not supported"),
        ("embed_dim", 0, "embed_dim must be a positive integer"),
        ("image_size", "64", "image_size must be a positive integer"),
        ("mean", [0.5, 0.5], "mean must be a list of 3 numbers"),
        ("tokenizer", "clip", "tokenizer must be a JSON object, got str"),
        ("checkpoint", "../../elsewhere.pt", "checkpoint must be a file name inside the model directory"),
    ],
)
def test_bad_values_are_named(model_dir, key, value, message):
    rewrite(model_dir, lambda d: d.update({key: value}))
    with pytest.raises(ValueError, match=message):
        ModelManifest.read(model_dir)


def test_graph_file_outside_the_directory_is_refused(model_dir):
    rewrite(model_dir, lambda d: d["onnx"]["visual"].update(file="/etc/passwd"))
    with pytest.raises(ValueError, match="onnx.visual.file must be a file name inside the model directory"):
        ModelManifest.read(model_dir)


@pytest.mark.parametrize("name", mf.REQUIRED_FILES[1:])
def test_missing_file(model_dir, name):
    (model_dir / name).unlink()
    with pytest.raises(ValueError, match=rf"'.*model' is not a model directory: missing \['{name}'\]"):
        ModelManifest.read(model_dir)


def test_checkpoint_path(model_dir):
    m = ModelManifest.read(model_dir)
    assert m.checkpoint_path(model_dir) is None  # none named
    m.checkpoint = mf.CHECKPOINT_FILE
    m.write(model_dir)
    m = ModelManifest.read(model_dir)  # a named checkpoint that is absent does not make the directory invalid
    assert m.checkpoint_path(model_dir) is None
    (model_dir / mf.CHECKPOINT_FILE).write_bytes(b"c")
    assert m.checkpoint_path(model_dir) == model_dir / mf.CHECKPOINT_FILE


def test_exported_directory_reads_back(tiny_model_dir, tmp_path):
    m = ModelManifest.read(tiny_model_dir)
    assert m.arch == "cliptuner-tiny" and m.embed_dim == 128 and m.image_size == 64
    assert m.tokenizer.context_length == 32 and m.onnx.textual.input == mf.TEXT_INPUT
    assert m.checkpoint_path(tiny_model_dir) == tiny_model_dir / mf.CHECKPOINT_FILE
    assert m.opset == 17 and m.parity["visual"]["min_cosine"] >= 0.9999
    assert m.to_dict() == json.loads((tiny_model_dir / mf.MANIFEST_FILE).read_text())
    copied = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    changed = copy.deepcopy(m)
    changed.version = "v9"
    changed.write(copied)
    assert ModelManifest.read(copied) == changed and ModelManifest.read(copied).to_dict()["version"] == "v9"


def test_manifest_is_torch_free():
    script = "import sys; import cliptuner.model.manifest; print(any(m.split('.')[0] == 'torch' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
