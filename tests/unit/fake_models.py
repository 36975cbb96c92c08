"""Fake model versions for registry tests: directories shaped like exported models, without a real model."""

from pathlib import Path

from cliptuner.model.manifest import (
    CHECKPOINT_FILE,
    TEXTUAL_FILE,
    VISUAL_FILE,
    VOCAB_FILE,
    ModelManifest,
    OnnxSpec,
    TokenizerSpec,
)
from cliptuner.model.registry import Registry


def make_model_dir(path: Path, payload_bytes: int = 16, arch: str = "fake") -> Path:
    """A directory shaped like an exported model: a valid manifest, files whose contents are not a real model."""
    path.mkdir(parents=True)
    ModelManifest(
        arch=arch,
        embed_dim=8,
        image_size=16,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        interpolation="bicubic",
        tokenizer=TokenizerSpec(context_length=8),
        onnx=OnnxSpec.standard(),
        checkpoint=CHECKPOINT_FILE,
    ).write(path)
    (path / VISUAL_FILE).write_bytes(b"v" * payload_bytes)
    (path / TEXTUAL_FILE).write_bytes(b"t" * payload_bytes)
    (path / VOCAB_FILE).write_bytes(b"b" * payload_bytes)
    (path / CHECKPOINT_FILE).write_bytes(b"c" * payload_bytes)
    return path


REPORT = {
    "model_version": None,
    "epochs": 3,
    "epoch_losses": [2.0, 1.5, 1.2],
    "samples_per_s": 50.0,
    "before": {"t2i_r1": 0.1, "t2i_r5": 0.25, "i2t_r5": 0.3, "mean_recall": 0.3},
    "after": {"t2i_r1": 0.3, "t2i_r5": 0.5, "i2t_r5": 0.55, "mean_recall": 0.52},
}


def publish_fake(
    reg: Registry,
    tmp_path: Path,
    version: str,
    parent: str | None = None,
    report: dict | None = None,
    make_current: bool = True,
    **kwargs,
) -> str:
    """Publish a fake model directory with the given lineage as ``version``."""
    src = make_model_dir(tmp_path / f"src-{version}", **kwargs)
    manifest = ModelManifest.read(src)
    manifest.parent_version, manifest.report = parent, report
    manifest.created_at = f"2024-01-0{len(reg.versions()) + 1}T10:00:00+00:00"
    manifest.write(src)
    return reg.publish(src, version=version, make_current=make_current)
