"""The ``cliptuner encode`` command: texts and image files as embeddings of an exported model (no torch)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from cliptuner.cli.arguments import add_serving_device


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cliptuner encode``: its options, help and example."""
    p = subparsers.add_parser(
        "encode",
        help="embed texts and images with an exported model",
        epilog='example:\n  cliptuner encode --model-dir runs/v1 --text "a red dress" --image shoe.jpg',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-dir", required=True, help="an exported model directory (required)")
    p.add_argument("--text", nargs="*", default=[], metavar="TEXT", help="texts to embed")
    p.add_argument("--image", nargs="*", default=[], metavar="FILE", help="image files to embed")
    add_serving_device(p)
    p.add_argument("--out", default=None, help="write a .npy instead of JSON lines (default: JSON lines on stdout)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> Any:
    """``cliptuner encode``: texts and/or images → embeddings (ONNX runtime, no torch)."""
    import numpy as np

    from cliptuner.model.runtime import OnnxClip

    if not args.text and not args.image:
        raise SystemExit("give --text and/or --image")
    clip = OnnxClip(args.model_dir, device=args.device)
    parts = []
    if args.text:
        parts.append(clip.encode_text(list(args.text)))
    if args.image:
        parts.append(clip.encode_images(list(args.image), names=list(args.image)))
    embeddings = np.concatenate(parts)
    if args.out:
        np.save(args.out, embeddings)
        print(f"{embeddings.shape[0]} embeddings of dim {embeddings.shape[1]} → {args.out}")
    else:
        for label, row in zip(list(args.text or []) + list(args.image or []), embeddings):
            print(json.dumps({"input": label, "embedding": [round(float(x), 6) for x in row]}))
    return embeddings
