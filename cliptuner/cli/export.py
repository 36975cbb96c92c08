"""The ``cliptuner export`` command: a checkpoint written by ``cliptuner train`` as an ONNX model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from cliptuner.extras import require_train


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cliptuner export``: its options, help and example."""
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint to an ONNX model directory",
        epilog="example:\n  cliptuner export --checkpoint runs/v1/checkpoint.pt --out runs/v1-int8 --precision int8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by cliptuner train (required)")
    p.add_argument("--out", required=True, help="the model directory to write (required)")
    p.add_argument("--model", default=None, help="arch (default: the one recorded in the checkpoint)")
    p.add_argument(
        "--model-version",
        dest="version",
        default=None,
        help="model version name recorded in model.json (default: the --out folder name)",
    )
    p.add_argument(
        "--with-checkpoint", action="store_true", help="copy the weights into the directory too (default: off)"
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "fp16", "int8"),
        help="of the ONNX graphs: fp32; int8 (dynamic quantization, for CPU serving); fp16 (for CUDA "
        "serving; its parity check runs only where onnxruntime has CUDA)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> Path:
    """``cliptuner export``: a checkpoint file → ONNX model directory."""
    require_train("cliptuner export")
    from cliptuner.config import ModelSpec
    from cliptuner.train.export import export_model_dir
    from cliptuner.train.models import load_model, read_checkpoint

    arch = args.model or read_checkpoint(args.checkpoint).get("arch")
    if not arch:
        raise SystemExit(f"{args.checkpoint} does not record its arch; pass --model")
    bundle = load_model(ModelSpec(arch=arch, pretrained=args.checkpoint))
    out = export_model_dir(
        bundle,
        Path(args.out),
        checkpoint=args.with_checkpoint,
        precision=args.precision,
        metadata_extra={"version": args.version or Path(args.out).name},
    )
    print(f"exported {arch} ({args.precision}) to {out}")
    return out
