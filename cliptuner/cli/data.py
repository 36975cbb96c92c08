"""The ``cliptuner data`` command: ``data check PAIRS`` looks at training pairs before a run is spent on them.

The check is :func:`cliptuner.train.datacheck.check_pairs`: missing and unreadable images, byte-identical images
and where they fall across the train/held-out split the trainer would make (a leak when on both sides), repeated
captions, captions the model's tokenizer cuts, and the spread of image sizes. Exit status: 0 when training can
start (warnings allowed), 1 when the check found problems, 2 for bad options.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

PROBLEMS_EXIT = 1  # the exit status of a check that found problems

EXAMPLES = """\
examples:
  cliptuner data check pairs.csv                          the held-out split of cliptuner train's defaults
  cliptuner data check pairs.csv --eval-data test.csv     the eval file's images against the training ones
  cliptuner data check dataset_flickr8k.json --arch ViT-B-32
  cliptuner data check pairs.csv --model-dir runs/v1 --json > check.json

exit status: 0 no problems (warnings allowed), 1 problems (training would fail or its held-out recall leak),
2 bad options
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cliptuner data`` and its ``check`` subcommand."""
    p = subparsers.add_parser("data", help="check PAIRS before training (cliptuner data check PAIRS)")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="check")
    c = sub.add_parser(
        "check",
        help="report missing, unreadable and duplicate images, held-out leaks, repeated and over-long captions",
        description="Check PAIRS as cliptuner train would read and split them, every finding at once.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("pairs", metavar="PAIRS", help="a CSV (image,caption) or a Karpathy-style JSON")
    c.add_argument(
        "--eval-data",
        default=None,
        help="held-out PAIRS, as cliptuner train --eval-data (default: a seeded fraction of PAIRS, or the JSON's "
        "test split)",
    )
    c.add_argument(
        "--arch",
        default="cliptuner-tiny",
        help="OpenCLIP arch or bundled config whose tokenizer measures the captions, as cliptuner train --model "
        "(default: %(default)s; needs the training extra)",
    )
    c.add_argument(
        "--model-dir",
        default=None,
        help="an exported model version whose tokenizer measures the captions instead of --arch (no torch needed) "
        "(default: none)",
    )
    c.add_argument(
        "--eval-fraction",
        type=float,
        default=0.2,
        help="share of the images held out when no eval data applies, as cliptuner train (default: %(default)s)",
    )
    c.add_argument(
        "--split-seed",
        "--seed",
        dest="split_seed",
        type=int,
        default=0,
        help="seed of the held-out split: cliptuner train's --seed (default: %(default)s)",
    )
    c.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="also report fewer training images than this batch size as a problem (default: not checked)",
    )
    c.add_argument(
        "--decode",
        action="store_true",
        help="decode every image in full, as training will (slower; finds corrupt pixel data the header check "
        "misses) (default: header, structure and bytes only)",
    )
    c.add_argument("--json", action="store_true", help="print the report as JSON instead of text (default: text)")
    c.set_defaults(func=run)


def _tokens(args: argparse.Namespace) -> tuple[Any, str]:
    """The caption length to check with, or None and why not."""
    from cliptuner.extras import missing_train_modules
    from cliptuner.train.datacheck import arch_caption_tokens, version_caption_tokens

    if args.model_dir:
        return version_caption_tokens(args.model_dir), ""
    missing = missing_train_modules()
    if "torch" in missing or "open_clip" in missing:
        return None, (
            f"caption lengths not checked: the tokenizer of {args.arch!r} needs the training extra; "
            "give --model-dir DIR (an exported model version) instead"
        )
    return arch_caption_tokens(args.arch), ""


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``cliptuner data check``: print the report; exit with :data:`PROBLEMS_EXIT` when it has problems.

    Raises:
        ValueError: a PAIRS source the check does not read, a bad option or a tokenizer that cannot be built.
        SystemExit: with :data:`PROBLEMS_EXIT` after printing, when the check found problems.
    """
    from cliptuner.train.datacheck import check_pairs, unchecked_reason

    for source in (args.pairs, args.eval_data):
        reason = None if source is None else unchecked_reason(source)
        if reason is not None:
            raise ValueError(f"cannot check {source!r}: {reason}")
    tokens, why_not = _tokens(args)
    report = check_pairs(
        args.pairs,
        args.eval_data,
        eval_fraction=args.eval_fraction,
        split_seed=args.split_seed,
        tokens=tokens,
        batch_size=args.batch_size,
        decode=args.decode,
    )
    if why_not:
        report.notes = [why_not if note.startswith("caption lengths not checked") else note for note in report.notes]
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json else report.summary())
    if not report.ok:
        raise SystemExit(PROBLEMS_EXIT)
    return report.to_dict()
