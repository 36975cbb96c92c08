"""The demo's commands: ``cliptuner demo`` (the whole service offline) and ``cliptuner pretrain-base``.

The demo itself is :mod:`cliptuner.cli.demo`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from cliptuner.extras import require_train


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cliptuner demo`` and ``cliptuner pretrain-base``: their options and defaults."""
    p = subparsers.add_parser(
        "demo",
        help="the whole service offline: a pretrained base tuned on a domain through the gRPC Flow",
        description="Starts `cliptuner serve` on 127.0.0.1 with a base model pretrained on generic synthetic scenes "
        "(cached after the first run), indexes a held-out gallery of domain scenes, measures recall "
        "through /encode and searches through /search, tunes through /train, and measures and "
        "searches again; prints the before/after table and the top matches, and draws plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--workdir", default=None, help="where the workspace, plots and demo.json go (default: a new temporary folder)"
    )
    p.add_argument("--quick", action="store_true", help="a minute-sized run of every step (its recall says little)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where the base model is cached (default: $CLIPTUNER_CACHE or ~/.cache/cliptuner)",
    )
    # the tuning settings: the ones benchmarks/sweep.py chose on validation scenes disjoint from the demo's
    p.add_argument("--n-images", type=int, default=None, help="domain images (default: 600; --quick 60)")
    p.add_argument("--epochs", type=int, default=None, help="tuning epochs (default: 10; --quick 2)")
    p.add_argument("--batch-size", type=int, default=None, help="tuning batch size (default: 32; --quick 16)")
    p.add_argument("--lr", dest="learning_rate", type=float, default=None, help="tuning learning rate (default: 6e-4)")
    p.add_argument("--seed", type=int, default=None, help="data and training seed (default: 0)")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch threads of the tuning process (default: every CPU: the demo sends no queries while it tunes)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar while the base pretrains")
    p.set_defaults(func=run)

    p = subparsers.add_parser(
        "pretrain-base",
        help="train and cache the demo's base model (generic synthetic scenes)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--cache-dir", default=None, help="where it is cached (default: $CLIPTUNER_CACHE or ~/.cache/cliptuner)"
    )
    p.add_argument("--quick", action="store_true", help="the quick demo's small base")
    p.add_argument("--force", action="store_true", help="train it again even if it is cached")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> Any:
    """``cliptuner demo`` or ``cliptuner pretrain-base``, as ``args.command`` names."""
    if args.command == "pretrain-base":
        return run_pretrain_base(args)
    return run_demo(args)


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """``cliptuner demo``: the whole service offline, a pretrained base tuned on a domain (:mod:`cliptuner.cli.demo`)."""
    require_train("cliptuner demo")
    import dataclasses
    import signal

    from cliptuner.cli.demo import DemoSettings
    from cliptuner.cli.demo import run_demo as demo

    # SIGTERM ends the demo like Ctrl-C: the service it started is stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    overrides = {
        name: getattr(args, name)
        for name in ("n_images", "epochs", "batch_size", "learning_rate", "seed")
        if getattr(args, name) is not None
    }
    settings = dataclasses.replace(settings, **overrides)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cliptuner-demo-"))
    return demo(
        settings,
        workdir,
        cache=Path(args.cache_dir) if args.cache_dir else None,
        say=lambda line: print(f"[demo] {line}", file=sys.stderr, flush=True),
        quiet=args.quiet,
        torch_threads=args.torch_threads,
    )


def run_pretrain_base(args: argparse.Namespace) -> Path:
    """``cliptuner pretrain-base``: the demo's base model, trained once on generic scenes and cached."""
    require_train("cliptuner pretrain-base")
    from cliptuner.cli.demo import BaseSettings, DemoSettings, pretrain_base

    settings = DemoSettings.quick().base if args.quick else BaseSettings()
    path = pretrain_base(
        settings,
        cache=Path(args.cache_dir) if args.cache_dir else None,
        force=args.force,
        quiet=args.quiet,
        say=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(path)
    return path
