"""The first model version of a fresh registry, published once however many services start at the same time.

A service that serves models follows ``CURRENT`` in a :class:`~cliptuner.model.registry.Registry`. On a fresh
workspace there is no version yet: :func:`ensure_current` publishes one from a base :class:`ModelSpec` (an
OpenCLIP arch plus a pretrained tag, a local checkpoint, or nothing for random init), or waits for another
process to do so. Publishers serialise on ``fcntl.flock`` of ``<registry>/.bootstrap.lock``; whoever holds it
re-checks ``CURRENT`` before building, so the base is built once. Waiters poll ``CURRENT`` and give up after
``timeout`` seconds with an error that says what they waited for.

A service that may publish (``spec`` given) first removes what crashed publishers left in the registry
(:meth:`~cliptuner.model.registry.Registry.clean_temps`); the base is built in a registry temp directory, so a crash
while building leaves nothing that the next start does not clean.

torch, open_clip and the exporter are imported only when a base version is actually built, so a torch-free
encoder that finds ``CURRENT`` already set never loads them; one that would have to build the base without the
``train`` extra fails at once with :class:`~cliptuner.extras.MissingTrainExtra` (start the tuner first, or set
``bootstrap: false`` and let the encoder wait for the tuner's version).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from cliptuner.config import ModelSpec
from cliptuner.extras import require_train
from cliptuner.model.registry import TEMP_GRACE_SECONDS, Registry, temp_name

logger = logging.getLogger(__name__)

BOOTSTRAP_LOCK = ".bootstrap.lock"
BASE_SEED = 0  # random init of a base version is reproducible


class BootstrapTimeout(TimeoutError):
    """No model version appeared in the registry in time."""


@contextlib.contextmanager
def _flock(path: Path, deadline: float, poll: float, registry: Registry) -> Iterator[bool]:
    """Hold ``flock(path)``; yields False instead when CURRENT appears while waiting for the lock.

    Raises:
        BootstrapTimeout: the lock stayed taken and no version appeared before ``deadline``.
    """
    with open(path, "a+") as fh:  # one open file per holder: flock excludes threads of one process too
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if registry.current() is not None:
                    yield False
                    return
                if time.monotonic() >= deadline:
                    raise BootstrapTimeout(
                        f"another process has been publishing the base model version in {str(registry.root)!r} "
                        f"for too long (it holds {str(path)!r}); no CURRENT version appeared"
                    ) from None
                time.sleep(poll)
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def publish_base(registry: Registry, spec: ModelSpec) -> str:
    """Build ``spec``, export it to ONNX and publish it as the next version (CURRENT).

    Random init (``spec.pretrained`` None) is seeded, so two fresh workspaces get the same base model.

    Returns:
        The published version name.

    Raises:
        ValueError: unknown arch, pretrained tag or checkpoint file (from :func:`cliptuner.train.models.load_model`).
        cliptuner.extras.MissingTrainExtra: torch/open_clip/onnx are not installed.
    """
    require_train("building the base model version of an empty registry")
    from cliptuner.train.export import export_model_dir
    from cliptuner.train.models import load_model, seed_everything

    seed_everything(BASE_SEED)
    bundle = load_model(spec)
    build_dir = registry.root / temp_name()  # never listed; cleaned at the next start if this process dies
    try:
        export_model_dir(
            bundle, build_dir, checkpoint=True, metadata_extra={"parent_version": None, "role": "base", "report": None}
        )
        version = registry.publish(build_dir, move=True)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    logger.info("published base model %s (pretrained=%r) as %s", spec.arch, spec.pretrained, version)
    return version


def wait_for_current(registry: Registry, timeout: float, poll: float = 0.5) -> str:
    """Wait until the registry has a CURRENT version.

    Raises:
        BootstrapTimeout: none appeared within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        version = registry.current()
        if version is not None:
            return version
        if time.monotonic() >= deadline:
            raise BootstrapTimeout(
                f"no model version in {str(registry.root)!r} after {timeout:g} s: nothing published one. Start a "
                "service that may bootstrap it (the tuner, or an encoder/indexer with bootstrap enabled), or publish "
                "one (cliptuner train --out DIR, then Registry.publish)"
            )
        time.sleep(poll)


def ensure_current(
    registry: Registry | str | Path,
    spec: Optional[ModelSpec],
    timeout: float = 600.0,
    poll: float = 0.5,
    temp_grace: float = TEMP_GRACE_SECONDS,
) -> str:
    """The CURRENT version, publishing the base version first when the registry has none.

    Args:
        registry: the registry (or its directory).
        spec: the base model to publish on a fresh registry; None only waits for someone else to publish.
        timeout: seconds to wait for another publisher (or, with ``spec`` None, for any version).
        poll: seconds between checks while waiting.
        temp_grace: with ``spec``, temp entries of crashed publishers are removed first
            (:meth:`Registry.clean_temps <cliptuner.model.registry.Registry.clean_temps>`); this is its grace period.

    Returns:
        The version CURRENT names.

    Raises:
        BootstrapTimeout: no version appeared in time.
        ValueError: ``spec`` cannot be built.
    """
    registry = registry if isinstance(registry, Registry) else Registry(registry)
    if spec is not None:
        registry.clean_temps(temp_grace)
    version = registry.current()
    if version is not None:
        return version
    if spec is None:
        return wait_for_current(registry, timeout, poll)
    deadline = time.monotonic() + timeout
    with _flock(registry.root / BOOTSTRAP_LOCK, deadline, poll, registry) as holding:
        version = registry.current()
        if not holding or version is not None:
            return version
        published = registry.versions()
        if published:  # versions published with make_current=False, but no CURRENT: serve the newest
            registry.set_current(published[-1])
            logger.info(
                "registry %s had versions %s but no CURRENT; CURRENT is now %s", registry.root, published, published[-1]
            )
            return published[-1]
        return publish_base(registry, spec)
