"""The ``cliptuner train`` command: fine-tune on PAIRS, evaluate before and after, export a model version.

Its training options are the fields of TrainConfig and EvalConfig (:mod:`cliptuner.config`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from cliptuner.extras import require_train


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cliptuner train``: its options (TrainConfig and EvalConfig fields among them) and help."""
    p = subparsers.add_parser("train", help="fine-tune a model on PAIRS and export it")
    p.add_argument("--data", required=True, help="PAIRS: CSV (image,caption) or Karpathy-style JSON (required)")
    p.add_argument("--eval-data", default=None, help="held-out PAIRS (default: a seeded fraction of --data)")
    p.add_argument("--model", default="cliptuner-tiny", help="OpenCLIP arch or bundled config (default: %(default)s)")
    p.add_argument(
        "--pretrained",
        default=None,
        help="OpenCLIP tag (e.g. openai) or local checkpoint path (default: none, random init)",
    )
    p.add_argument("--out", required=True, help="directory for the tuned model version (required)")
    p.add_argument(
        "--model-version", dest="version", default=None, help="model version name (default: the --out folder name)"
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="YAML or JSON mapping of training option names (TrainConfig/EvalConfig fields, e.g. "
        "learning_rate: 1e-5) to values; flags given here override it (default: none)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")
    p.add_argument(
        "--events",
        default=None,
        metavar="FILE",
        help="append every training event (loaded, before, step, epoch, eval, end, wiseft, after, exported, plots) to "
        "FILE as one JSON line, flushed at once, for a process that follows the run; a step "
        "event every optimizer step (default: none)",
    )
    p.add_argument(
        "--force-quick-gelu",
        action="store_true",
        help="build the model with QuickGELU, as OpenAI-trained weights expect (default: off)",
    )
    p.add_argument(
        "--no-plots",
        dest="plots",
        action="store_false",
        help="do not draw OUT/plots/training.png (loss and recall per epoch) and OUT/plots/recall.png "
        "(held-out recall before vs after) (default: drawn)",
    )
    _add_train_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``cliptuner train``: see :func:`run_train`."""
    return run_train(args)


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    from cliptuner.config import EvalConfig, TrainConfig
    from cliptuner.options import add_arguments

    g = parser.add_argument_group(
        "training", "options of TrainConfig and EvalConfig (cliptuner/config.py); they override the values of --config"
    )
    add_arguments(g, TrainConfig)
    add_arguments(g, EvalConfig)
    g.add_argument(
        "--device",
        default=None,
        help="torch device (default: cuda if available — the LOCAL_RANK GPU under torchrun — else cpu)",
    )
    g.add_argument(
        "--general-data",
        default=None,
        help="PAIRS of general (not tuned-for) data, evaluated in the WiSE-FT sweep (default: none)",
    )
    g.add_argument(
        "--checkpoint-dir", default=None, help="write resumable training state here every epoch (default: none)"
    )
    g.add_argument(
        "--resume",
        default=None,
        help="continue from a last.pt written by --checkpoint-dir (default: start from --model/--pretrained)",
    )


def _config_file_options() -> tuple[str, ...]:
    """The option names a ``cliptuner train --config`` file may set: the flags' fields, and ``device``."""
    from cliptuner.config import EvalConfig, TrainConfig
    from cliptuner.options import cli_names

    return cli_names(TrainConfig) + cli_names(EvalConfig) + ("device",)


def _train_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """TrainConfig and EvalConfig of ``cliptuner train``: field defaults, then the ``--config`` file, then flags.

    Without ``--device`` (or ``device`` in the file) the device is ``auto``: CUDA when there is one (the LOCAL_RANK
    GPU under torchrun), else cpu, decided when the run starts.

    Raises:
        ValueError: a bad or unknown option in the file, or a bad value (named).
    """
    from cliptuner.config import EvalConfig, TrainConfig, from_mapping
    from cliptuner.options import cli_names, given_options, read_options_file
    from cliptuner.train.job import AUTO_DEVICE

    values = read_options_file(args.config, _config_file_options()) if args.config else {}
    values = {**values, **given_options(args, TrainConfig), **given_options(args, EvalConfig)}
    if args.device:
        values["device"] = args.device
    if getattr(args, "events", None):  # whoever follows the --events file (the tuner's /status) sees every step
        values["log_every"] = 1
    device = values.pop("device", None) or AUTO_DEVICE
    eval_names = set(cli_names(EvalConfig))  # eval_fraction; EvalConfig's batch_size is not TrainConfig's
    eval_values = {k: v for k, v in values.items() if k in eval_names}
    cfg = from_mapping(TrainConfig, {**{k: v for k, v in values.items() if k not in eval_names}, "device": device})
    eval_cfg = from_mapping(EvalConfig, {**eval_values, "split_seed": cfg.seed})
    return cfg, eval_cfg


def train_job(args: argparse.Namespace) -> Any:
    """The :class:`~cliptuner.train.job.TrainJob` of ``cliptuner train``'s arguments, validated.

    Raises:
        ValueError: a bad option (named).
    """
    from cliptuner.config import ModelSpec
    from cliptuner.train.job import TrainJob

    cfg, eval_cfg = _train_configs(args)
    return TrainJob(
        data=args.data,
        eval_data=args.eval_data,
        general_data=args.general_data,
        model=ModelSpec(arch=args.model, pretrained=args.pretrained, force_quick_gelu=args.force_quick_gelu),
        cfg=cfg,
        eval_cfg=eval_cfg,
        out=args.out,
        version=args.version,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        plots=args.plots,
    )


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """``cliptuner train``: fine-tune, evaluate before/after, export a model version to ``--out``
    (:func:`cliptuner.train.job.train_and_export`), showing its progress and, at the end, its report."""
    require_train("cliptuner train")
    from cliptuner.cli.progress import TrainingProgress, fan_out, print_report
    from cliptuner.train.job import train_and_export
    from cliptuner.train.worker import EventLog

    job = train_job(args)
    lead = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 alone reports
    events = EventLog(args.events) if args.events and lead else None
    try:
        report = train_and_export(job, fan_out(TrainingProgress(bar=not args.quiet and lead), events))
    finally:
        if events is not None:
            events.close()
    if lead:
        print_report(report, Path(job.out))
    return report
