"""Shared fixtures: one tiny random-init model per session and its exported model directory.

Session fixtures are shared by every test: do not mutate them (``copy.deepcopy(tiny_bundle.model)`` first,
and copy ``tiny_model_dir`` before writing into it).
"""

import os

os.environ.setdefault("JINA_HIDE_SURVEY", "1")
os.environ.setdefault("JINA_OPTOUT_TELEMETRY", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bundle():
    """``cliptuner-tiny`` with random init (64 px images, context 32, 128-d embeddings), in eval mode on CPU."""
    from cliptuner.config import ModelSpec
    from cliptuner.train.models import load_model

    return load_model(ModelSpec("cliptuner-tiny"))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_bundle, tmp_path_factory) -> Path:
    """``tiny_bundle`` exported once with :func:`cliptuner.train.export.export_model_dir` (checkpoint included)."""
    from cliptuner.train.export import export_model_dir

    return export_model_dir(tiny_bundle, tmp_path_factory.mktemp("tiny_model") / "model")


@pytest.fixture(scope="session")
def tiny_model_dir_v2(tiny_bundle, tmp_path_factory) -> Path:
    """A second exported model: ``tiny_bundle`` with every parameter perturbed (seeded), so that it embeds the
    same inputs differently (cosine with ``tiny_model_dir``'s embeddings well below 0.99).

    Publish it where a test needs a new model version: a version with the same weights would hide whether
    anything was re-embedded.
    """
    import copy
    import dataclasses

    import torch

    from cliptuner.train.export import export_model_dir

    model = copy.deepcopy(tiny_bundle.model)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in model.parameters():
            spread = float(param.std()) if param.numel() > 1 else 0.0
            param.add_(torch.randn(param.shape, generator=generator) * 0.3 * (spread or 0.02))
    bundle = dataclasses.replace(tiny_bundle, model=model)
    return export_model_dir(bundle, tmp_path_factory.mktemp("tiny_model_v2") / "model")
