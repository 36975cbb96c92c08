"""The ``cliptuner`` command: train, data, eval, export, encode, synth, demo, serve, models, keys, audit, k8s.

``main`` parses the command line and runs the command it names. Each command is a module of this package with
``add_parser(subparsers)`` (its options, help and examples) and ``run(args)``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Optional

from cliptuner.cli import audit, data, demo_command, encode, evaluate, export, k8s, keys, models, serve, synth, train
from cliptuner.cli.train import _train_configs as _train_configs  # the options a train run gets, for tests
from cliptuner.extras import MissingTrainExtra

logger = logging.getLogger("cliptuner")

COMMANDS = (
    train,
    data,
    evaluate,
    export,
    encode,
    synth,
    demo_command,
    serve,
    models,
    keys,
    audit,
    k8s,
)  # in the order --help lists

DESCRIPTION = (
    "Fine-tune CLIP on your own image-text pairs, measure recall@k before and after,\n"
    "export ONNX, and serve it as gRPC microservices."
)
EXAMPLES = """\
examples:
  cliptuner demo                                   the whole service offline, with plots (start here)
  cliptuner data check pairs.csv                   missing or broken images, held-out leaks, long captions
  cliptuner train --data pairs.csv --model ViT-B-32 --pretrained openai --epochs 5 --out runs/v1
  cliptuner eval --data test.csv --model-dir runs/v1
  cliptuner encode --model-dir runs/v1 --text "a red dress" --image shoe.jpg
  cliptuner serve --workspace ./ws                 gRPC on 127.0.0.1:51000 (tuner, encoder, indexer)
  cliptuner COMMAND --help                         every option of a command, with its default
"""


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cliptuner")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The ``cliptuner`` parser: the top-level options, then one subcommand per module of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="cliptuner", description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"cliptuner {_package_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every training step line")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command ``argv`` names (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 done, 2 bad input (one line on stderr), 3 a command that needs the training extra;
        ``data check`` exits 1 when it finds problems.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("JINA_HIDE_SURVEY", "1")
    try:
        args.func(args)
    except ValueError as exc:  # bad input: one clear line, no traceback
        print(f"cliptuner {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except MissingTrainExtra as exc:  # a serving-only install: what to install, no traceback
        print(f"cliptuner {args.command}: error: {exc}", file=sys.stderr)
        return 3
    return 0
