"""The ``cliptuner train`` command: fine-tune on PAIRS, evaluate before and after, export a model version.

Its training options are the fields of TrainConfig and EvalConfig (:mod:`cliptuner.config`).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from cliptuner.extras import require_train


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cliptuner train``: its options (TrainConfig and EvalConfig fields among them) and help."""
    p = subparsers.add_parser("train", help="fine-tune a model on PAIRS and export it")
    p.add_argument(
        "--data",
        default=None,
        help="PAIRS: CSV (image,caption[,group]) or Karpathy-style JSON; or a stream read while training, with bounded "
        "memory (shuffle_buffer samples): webdataset tar shards as img2dataset writes them ('shards/{00000..00099}.tar', "
        "a .tar file or a folder of them) or parquet (a file, a brace pattern or a folder; columns: image bytes, a "
        "{bytes: ...} struct or local paths, and caption/text/txt); a stream needs --eval-data (required unless "
        "--feedback is given)",
    )
    p.add_argument(
        "--feedback",
        default=None,
        metavar="WORKSPACE",
        help="train on the search feedback a service recorded in WORKSPACE/feedback: its newest queries are held out "
        "(and kept out of training from now on), the queries earlier runs held out are the gate's regression set; "
        "mixed with --data when both are given (default: none)",
    )
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
    from cliptuner.config import EvalConfig, GateConfig, TrainConfig
    from cliptuner.options import add_arguments

    g = parser.add_argument_group(
        "training", "options of TrainConfig and EvalConfig (cliptuner/config.py); they override the values of --config"
    )
    add_arguments(g, TrainConfig)
    add_arguments(g, EvalConfig)
    add_arguments(
        parser.add_argument_group(
            "gate",
            "whether the tuned model beats the start weights on the held-out split and loses at most max_regression "
            "on --general-data (GateConfig); the report says promoted or not, and `cliptuner models publish` keeps "
            "a refused model a candidate",
        ),
        GateConfig,
    )
    g.add_argument(
        "--device",
        default=None,
        help="torch device (default: cuda if available — the LOCAL_RANK GPU under torchrun — else cpu)",
    )
    g.add_argument(
        "--general-data",
        default=None,
        help="PAIRS of general (not tuned-for) data, evaluated in the WiSE-FT sweep and the gate's regression set "
        "(default: none)",
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
    from cliptuner.config import EvalConfig, GateConfig, TrainConfig
    from cliptuner.options import cli_names

    return cli_names(TrainConfig) + cli_names(EvalConfig) + cli_names(GateConfig) + ("device",)


def _train_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """TrainConfig and EvalConfig of ``cliptuner train``: field defaults, then the ``--config`` file, then flags.

    Without ``--device`` (or ``device`` in the file) the device is ``auto``: CUDA when there is one (the LOCAL_RANK
    GPU under torchrun), else cpu, decided when the run starts.

    Raises:
        ValueError: a bad or unknown option in the file, or a bad value (named).
    """
    from cliptuner.config import EvalConfig, GateConfig, TrainConfig, from_mapping
    from cliptuner.options import cli_names, given_options, read_options_file
    from cliptuner.train.job import AUTO_DEVICE

    values = read_options_file(args.config, _config_file_options()) if args.config else {}
    values = {k: v for k, v in values.items() if k not in cli_names(GateConfig)}  # _gate_config's
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


def _gate_config(args: argparse.Namespace) -> Any:
    """The GateConfig of ``cliptuner train``: defaults, then the ``--config`` file, then flags.

    Raises:
        ValueError: a bad value (named).
    """
    from cliptuner.config import GateConfig, from_mapping
    from cliptuner.options import cli_names, given_options, read_options_file

    values = read_options_file(args.config, _config_file_options()) if args.config else {}
    gate_names = cli_names(GateConfig)
    return from_mapping(
        GateConfig, {**{k: v for k, v in values.items() if k in gate_names}, **given_options(args, GateConfig)}
    )


def _feedback_inputs(args: argparse.Namespace, cfg: Any, eval_cfg: Any, folder: Path) -> dict[str, Any]:
    """``--feedback``: the run's training, held-out and regression pairs written as PAIRS files into ``folder``
    (:func:`cliptuner.serve.feedback_training.feedback_training_sets`)."""
    from cliptuner.serve.feedback import FEEDBACK_SUBDIR
    from cliptuner.serve.feedback_training import feedback_training_sets
    from cliptuner.train.data import load_split, train_and_held_out
    from cliptuner.train.job import write_pairs_csv

    extra, name = None, str(args.data or args.eval_data or "")
    if args.data:
        extra = train_and_held_out(args.data, args.eval_data, eval_cfg.eval_fraction, eval_cfg.split_seed)
    elif args.eval_data:  # labelled pairs that measure the run beside the feedback's own
        extra = (None, load_split(args.eval_data, "test"))
    sets = feedback_training_sets(Path(args.feedback) / FEEDBACK_SUBDIR, cfg.batch_size, extra, name)
    regression = None
    if sets.regression is not None:
        regression = str(write_pairs_csv(sets.regression, folder / "regression" / "pairs.csv"))
    return {
        "data": str(write_pairs_csv(sets.train, folder / "train" / "pairs.csv")),
        "eval_data": str(write_pairs_csv(sets.held_out, folder / "held_out" / "pairs.csv")),
        "regression_data": regression,
    }


def train_job(args: argparse.Namespace, inputs: Optional[Path] = None) -> Any:
    """The :class:`~cliptuner.train.job.TrainJob` of ``cliptuner train``'s arguments, validated.

    Args:
        args: the parsed arguments.
        inputs: with ``--feedback``, a folder for the PAIRS files the feedback becomes.

    Raises:
        ValueError: a bad option (named), neither --data nor --feedback, or too little feedback.
    """
    from cliptuner.config import ModelSpec
    from cliptuner.train.job import TrainJob

    cfg, eval_cfg = _train_configs(args)
    if not args.data and not args.feedback:
        raise ValueError("cliptuner train needs --data PAIRS, --feedback WORKSPACE, or both")
    if args.feedback:
        from cliptuner.train.streaming import is_stream_spec

        if args.data and is_stream_spec(args.data):
            raise ValueError(
                f"--feedback mixes --data into the feedback's pairs in memory; {args.data!r} is a stream (tar shards or "
                "parquet): train on it without --feedback"
            )
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank would hold out queries of its own
            raise ValueError("--feedback runs in one process; under torchrun, train on the feedback with /train")
        if inputs is None:
            raise ValueError("--feedback needs a folder for the pairs it becomes")
        sources = _feedback_inputs(args, cfg, eval_cfg, inputs)
    else:
        sources = {"data": args.data, "eval_data": args.eval_data, "regression_data": None}
    return TrainJob(
        **sources,
        general_data=args.general_data,
        model=ModelSpec(arch=args.model, pretrained=args.pretrained, force_quick_gelu=args.force_quick_gelu),
        cfg=cfg,
        eval_cfg=eval_cfg,
        gate=_gate_config(args),
        serving_label="the start weights",
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

    with tempfile.TemporaryDirectory(prefix="cliptuner-feedback-") as inputs:
        job = train_job(args, Path(inputs))
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
