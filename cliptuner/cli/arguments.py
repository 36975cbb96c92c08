"""Options that several commands share, and their value types, checked while the command line is parsed."""

from __future__ import annotations

import argparse


def serving_device(value: str) -> str:
    """argparse type of ``--device`` where ONNX Runtime runs (encode, eval): the one syntax ``serve`` takes.

    Raises:
        argparse.ArgumentTypeError: ``value`` is none of auto, cpu, cuda or cuda:N (named).
    """
    from cliptuner.model.runtime import _parse_device

    try:
        _parse_device(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def add_serving_device(parser: argparse.ArgumentParser) -> None:
    """Add ``--device``: where ONNX Runtime runs (encode, eval)."""
    parser.add_argument(
        "--device",
        default="auto",
        type=serving_device,
        metavar="DEVICE",
        help="auto, cpu, cuda or cuda:N, where ONNX Runtime runs (default: auto)",
    )
