"""What the optional ``train`` extra brings, and a clear error where it is needed but not installed.

The base install (``pip install cliptuner``) serves: the encoder and the indexer run ONNX Runtime and never import
torch. Training, export and building a base model version need ``pip install "cliptuner[train]"`` (torch,
torchvision, open_clip_torch, onnx); the commands and services that do those call :func:`require_train` first, so a
serving-only install fails at once with one line that says what to install, not with a traceback from deep inside.
"""

from __future__ import annotations

import importlib.util

TRAIN_MODULES = ("torch", "open_clip", "onnx")  # import names of the `train` extra's packages
INSTALL_HINT = 'pip install "cliptuner[train]"'


class MissingTrainExtra(ImportError):
    """Something that trains or exports ran on an install without the ``train`` extra."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # an import hook that refuses it, or a broken half-installed package
        return False


def missing_train_modules() -> list[str]:
    """The ``train`` extra's modules that cannot be imported here (empty when it is installed)."""
    return [module for module in TRAIN_MODULES if not _installed(module)]


def require_train(what: str) -> None:
    """Raise :class:`MissingTrainExtra` naming ``what`` and the missing modules unless the ``train`` extra is here.

    Args:
        what: what needs it, for the message (``"cliptuner train"``, ``"building the base model version"``).
    """
    missing = missing_train_modules()
    if missing:
        raise MissingTrainExtra(
            f"{what} needs the training extra ({', '.join(missing)} not installed): "
            f"{INSTALL_HINT}. Serving (encoder, indexer) works without it."
        )


__all__ = ["MissingTrainExtra", "TRAIN_MODULES", "INSTALL_HINT", "missing_train_modules", "require_train"]
