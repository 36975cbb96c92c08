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
    from cliptuner.models import load_model

    return load_model(ModelSpec("cliptuner-tiny"))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_bundle, tmp_path_factory) -> Path:
    """``tiny_bundle`` exported once with :func:`cliptuner.export.export_model_dir` (checkpoint included)."""
    from cliptuner.export import export_model_dir

    return export_model_dir(tiny_bundle, tmp_path_factory.mktemp("tiny_model") / "model")
