"""The ``cliptuner synth`` command: a synthetic captioned-scenes data set (:mod:`cliptuner.train.synthetic`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cliptuner synth``: its options and their defaults."""
    p = subparsers.add_parser(
        "synth",
        help="write a synthetic captioned-scenes data set",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="folder to write the images and the PAIRS file into (required)")
    p.add_argument(
        "--domain",
        default="domain",
        choices=("generic", "domain"),  # synthetic.DOMAINS
        help="the scene distribution: everyday shapes, or the demo's domain",
    )
    p.add_argument("--n-images", type=int, default=500, help="scenes drawn")
    p.add_argument("--captions-per-image", type=int, default=2, help="captions per scene")
    p.add_argument("--image-size", type=int, default=64, help="side of the square images, in pixels")
    p.add_argument("--seed", type=int, default=0, help="the draw's seed")
    p.add_argument(
        "--format",
        choices=["csv", "karpathy"],
        default="csv",
        help="pairs.csv (image,caption) or a Karpathy-style dataset.json",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> Path:
    """``cliptuner synth``: write a synthetic captioned-scenes data set (CSV or Karpathy JSON)."""
    from cliptuner.train import synthetic

    kwargs = dict(
        n_images=args.n_images,
        domain=args.domain,
        seed=args.seed,
        image_size=args.image_size,
        captions_per_image=args.captions_per_image,
    )
    if args.format == "karpathy":
        path = synthetic.write_karpathy(args.out, **kwargs)
    else:
        path = synthetic.write_csv(args.out, **kwargs)
    print(path)
    return path
