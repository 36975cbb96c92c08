"""The ``cliptuner eval`` command: recall@k of an exported model directory on PAIRS (ONNX Runtime, no torch)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cliptuner.cli.arguments import add_serving_device


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cliptuner eval``: its options, help and example."""
    p = subparsers.add_parser(
        "eval",
        help="recall@k of an exported model on PAIRS",
        epilog="example:\n  cliptuner eval --data test.csv --model-dir runs/v1 --json metrics.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data", required=True, help="PAIRS to evaluate: CSV (image,caption) or Karpathy-style JSON (required)"
    )
    p.add_argument(
        "--model-dir", required=True, help="an exported model directory, e.g. cliptuner train's --out (required)"
    )
    p.add_argument("--split", default="test", help="split of a Karpathy JSON to evaluate (default: test)")
    add_serving_device(p)
    p.add_argument("--json", default=None, help="also write the metrics to this file (default: none)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict[str, float]:
    """``cliptuner eval``: recall@k of an exported model directory on a PAIRS file (ONNX, no torch)."""
    from cliptuner.model.runtime import OnnxClip
    from cliptuner.train.data import load_pairs
    from cliptuner.train.evaluate import evaluate_onnx, format_report, trivial_cutoffs

    split = args.split if args.data.endswith(".json") else None
    pairs = load_pairs(args.data, split=split)
    clip = OnnxClip(args.model_dir, device=args.device)
    metrics = evaluate_onnx(clip, pairs)
    print(format_report(metrics, trivial=trivial_cutoffs(pairs.num_images, len(pairs), (1, 5, 10)), label="recall"))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2))
    return metrics
