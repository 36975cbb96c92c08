"""Fixtures of the Executor tests: a workspace with the session's tiny model published as ``v1``, and the three
Executors built on it as plain objects. A test module may override ``workspace``; the Executors follow."""

import pytest

from cliptuner.model.registry import Registry
from cliptuner.train import synthetic


@pytest.fixture(scope="module")
def scenes():
    return synthetic.generate(12, domain="domain", seed=5)


@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    Registry(tmp_path / "models").publish(tiny_model_dir)  # v1
    return tmp_path


@pytest.fixture
def encoder(workspace):
    from executors import CLIPEncoder

    enc = CLIPEncoder(workspace=str(workspace), bootstrap=False, bootstrap_timeout=1)
    yield enc
    enc.close()


@pytest.fixture
def indexer(workspace):
    from executors import CLIPIndexer

    idx = CLIPIndexer(workspace=str(workspace), bootstrap=False, bootstrap_timeout=1, watch_interval=0)
    yield idx
    idx.close()


@pytest.fixture
def tuner(workspace):
    from executors import CLIPTuner

    t = CLIPTuner(workspace=str(workspace), bootstrap=False, device="cpu")
    yield t
    t.close()
