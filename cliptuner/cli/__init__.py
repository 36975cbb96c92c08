"""The ``cliptuner`` command: train, eval, export, encode, synth, demo, serve."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from cliptuner.extras import MissingTrainExtra, require_train

logger = logging.getLogger("cliptuner")


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


def _serving_device(value: str) -> str:
    """argparse type of ``--device`` where ONNX Runtime runs (encode, eval): the one syntax ``serve`` takes."""
    from cliptuner.model.runtime import _parse_device

    try:
        _parse_device(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    return "cpu"


def _init_distributed(device: str) -> tuple[int, int]:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1): NCCL on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 1, 0
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_world_size(), dist.get_rank()


def _train_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """TrainConfig and EvalConfig of ``cliptuner train``: field defaults, then the ``--config`` file, then flags.

    Raises:
        ValueError: a bad or unknown option in the file, or a bad value (named).
    """
    from cliptuner.config import EvalConfig, TrainConfig, from_mapping
    from cliptuner.options import cli_names, given_options, read_options_file

    values = read_options_file(args.config, _config_file_options()) if args.config else {}
    values = {**values, **given_options(args, TrainConfig), **given_options(args, EvalConfig)}
    if args.device:
        values["device"] = args.device
    if getattr(args, "events", None):  # whoever follows the --events file (the tuner's /status) sees every step
        values["log_every"] = 1
    device = values.pop("device", None) or _default_device()
    eval_names = set(cli_names(EvalConfig))  # eval_fraction; EvalConfig's batch_size is not TrainConfig's
    eval_values = {k: v for k, v in values.items() if k in eval_names}
    cfg = from_mapping(TrainConfig, {**{k: v for k, v in values.items() if k not in eval_names}, "device": device})
    eval_cfg = from_mapping(EvalConfig, {**eval_values, "split_seed": cfg.seed})
    return cfg, eval_cfg


def _load_general(path: Optional[str]) -> Any:
    if not path:
        return None
    from cliptuner.train.data import load_split

    return load_split(path, "test")


class _ProgressBar:
    """A tqdm bar over optimizer steps, fed by training events."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "before":
            print(
                f"before: t2i R@5 {100 * event['metrics']['t2i_r5']:.1f}%  "
                f"i2t R@5 {100 * event['metrics']['i2t_r5']:.1f}%",
                file=sys.stderr,
            )
        elif kind == "step" and self.enabled:
            from tqdm import tqdm

            if self.bar is None:
                self.bar = tqdm(total=event["total_steps"], unit="step", dynamic_ncols=True, file=sys.stderr)
            self.bar.update(event["step"] - self.bar.n)
            self.bar.set_postfix(
                epoch=f"{event['epoch']}/{event['epochs']}",
                loss=f"{event['loss']:.3f}",
                lr=f"{event['lr']:.1e}",
                sps=f"{event['samples_per_s']:.0f}",
            )
        elif kind == "eval":
            msg = (
                f"epoch {event['epoch']}: t2i R@5 {100 * event['metrics']['t2i_r5']:.1f}%  "
                f"i2t R@5 {100 * event['metrics']['i2t_r5']:.1f}%"
            )
            (self.bar.write(msg) if self.bar is not None else print(msg, file=sys.stderr))
        elif kind == "end" and self.bar is not None:
            self.bar.close()
            self.bar = None


class _EventLog:
    """Appends every training event to a file as one JSON line, flushed at once, for a process that follows the
    run (the tuner tails it into ``/status``). Each line also carries ``pid``: the process that trains."""

    def __init__(self, path: str) -> None:
        self.pid = os.getpid()
        self.file = open(path, "a", encoding="utf-8")

    def __call__(self, event: dict[str, Any]) -> None:
        self.file.write(json.dumps({**event, "pid": self.pid}, default=str) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _fan_out(*callbacks: Any) -> Any:
    """One event callback that calls each of ``callbacks`` (None entries skipped) in order."""
    active = [callback for callback in callbacks if callback is not None]

    def emit(event: dict[str, Any]) -> None:
        for callback in active:
            callback(event)

    return emit


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """``cliptuner train``: fine-tune, evaluate before/after, export a model version to ``--out``."""
    require_train("cliptuner train")
    from cliptuner.config import ModelSpec
    from cliptuner.train.data import train_and_held_out
    from cliptuner.train.evaluate import format_report
    from cliptuner.train.export import export_model_dir
    from cliptuner.train.loop import finetune, seed_everything
    from cliptuner.train.models import load_model

    cfg, eval_cfg = _train_configs(args)
    world_size, rank = _init_distributed(cfg.device)
    train_pairs, eval_pairs = train_and_held_out(args.data, args.eval_data, eval_cfg.eval_fraction, eval_cfg.split_seed)
    if rank == 0:
        print(
            f"train: {len(train_pairs)} pairs / {train_pairs.num_images} images;  "
            f"held out: {len(eval_pairs)} pairs / {eval_pairs.num_images} images"
            + (f";  {world_size} processes" if world_size > 1 else ""),
            file=sys.stderr,
        )
    seed_everything(cfg.seed)  # random init is reproducible (and equal on every rank)
    spec = ModelSpec(arch=args.model, pretrained=args.pretrained, force_quick_gelu=args.force_quick_gelu)
    events = _EventLog(args.events) if args.events and rank == 0 else None
    bundle = load_model(spec)
    if events is not None:
        events({"event": "loaded", "world_size": world_size, "device": cfg.device})
    started = time.time()
    try:
        report = finetune(
            bundle,
            train_pairs,
            eval_pairs,
            cfg,
            eval_cfg,
            on_event=_fan_out(_ProgressBar(not args.quiet and rank == 0), events),
            checkpoint_dir=args.checkpoint_dir,
            resume_from=args.resume,
            general_pairs=_load_general(args.general_data),
        )
    finally:
        if events is not None:
            events.close()
        if world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank != 0:  # rank 0 alone evaluates, exports and publishes
        return report
    out = Path(args.out)
    version = args.version or out.name
    report.update(
        {
            "model_version": version,
            "model": {"arch": spec.arch, "pretrained": spec.pretrained},
            "wall_seconds": time.time() - started,
        }
    )
    bundle.model.cpu()
    export_model_dir(
        bundle,
        out,
        checkpoint=True,
        precision=cfg.export_precision,
        metadata_extra={"version": version, "report": report},
    )
    if cfg.export_precision != "fp32":
        report["exported"] = _exported_recall(out, eval_pairs, cfg.export_precision, report["after"])
    (out / "report.json").write_text(json.dumps(report, indent=2))
    if args.plots:
        from cliptuner.train.plots import write_report_plots

        for path in write_report_plots(report, out / "plots"):
            print(f"plot: {path}", file=sys.stderr)
    print(format_report(report["before"], report["after"], report.get("trivial", ())))
    if "wiseft" in report:
        print(
            "WiSE-FT (alpha: held-out t2i R@5"
            + (", general t2i R@5)" if "general" in report["wiseft"]["sweep"][0] else ")")
        )
        for entry in report["wiseft"]["sweep"]:
            line = f"  {entry['alpha']:.2f}: {100 * entry['held_out']['t2i_r5']:.1f}%"
            if "general" in entry:
                line += f"  {100 * entry['general']['t2i_r5']:.1f}%"
            print(line)
    print(f"{report['epochs']} epochs, {report['samples_per_s']:.1f} samples/s; model version {version!r} in {out}")
    return report


def _exported_recall(out: Path, eval_pairs: Any, precision: str, after: dict[str, float]) -> dict[str, Any]:
    """Held-out recall of the exported graphs of another precision than the trained weights, beside the fp32
    ``after``; written into the export's ``model.json`` report too (an fp16 export is measured where CUDA is)."""
    from cliptuner.model.manifest import ModelManifest
    from cliptuner.model.runtime import OnnxClip
    from cliptuner.train.evaluate import evaluate_onnx

    try:
        metrics = evaluate_onnx(OnnxClip(out, device="auto"), eval_pairs)
    except RuntimeError as exc:  # an fp16 export where onnxruntime has no CUDA
        result: dict[str, Any] = {"precision": precision, "measured": False, "reason": str(exc)}
    else:
        result = {
            "precision": precision,
            "measured": True,
            "after": metrics,
            "drop": {k: round(after[k] - metrics[k], 6) for k in metrics if k in after},
        }
        print(
            f"{precision} export: held-out t2i R@5 {100 * metrics['t2i_r5']:.1f}% (fp32 {100 * after['t2i_r5']:.1f}%)",
            file=sys.stderr,
        )
    manifest = ModelManifest.read(out)
    manifest.report = {**(manifest.report or {}), "exported": result}
    manifest.write(out)
    return result


def run_eval(args: argparse.Namespace) -> dict[str, float]:
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


def run_export(args: argparse.Namespace) -> Path:
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


def run_encode(args: argparse.Namespace) -> Any:
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


def run_synth(args: argparse.Namespace) -> Path:
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


MODELS_EPILOG = """\
examples:
  cliptuner models list --workspace ./ws            every version: CURRENT, parent, before -> after R@5
  cliptuner models list --workspace ./ws --json     the same as JSON (one object per version)
  cliptuner models publish out/model --workspace ./ws   a model from cliptuner train --out becomes CURRENT
  cliptuner models promote v3 --workspace ./ws      serve v3 (its manifest and files are checked first)
  cliptuner models rollback --workspace ./ws        serve the version CURRENT was tuned from
  cliptuner models prune --keep 5 --workspace ./ws  delete all but the 5 newest versions (never CURRENT)

A running service follows CURRENT by itself: the encoder from its next request, the indexer re-embeds its
collection with the new version in the background (searches use the old one until the swap).
rollback: CURRENT's parent_version while it is still published, else the version before CURRENT in natural
order (v9 before v10).
"""


def _registry_of(args: argparse.Namespace, create: bool = False) -> Any:
    """The registry ``--models-dir`` or ``--workspace``/models names; it must exist unless ``create`` (publish)."""
    from cliptuner.model.registry import Registry

    if args.models_dir:
        root = Path(args.models_dir)
    elif args.workspace or os.environ.get("CLIPTUNER_WORKSPACE"):
        root = Path(args.workspace or os.environ["CLIPTUNER_WORKSPACE"]) / "models"
    else:
        raise ValueError(
            "no registry: pass --workspace DIR (its models/ folder), --models-dir DIR, or set CLIPTUNER_WORKSPACE"
        )
    root = root.expanduser()
    if not root.is_dir() and not create:
        raise ValueError(f"no model registry at {str(root)!r}")
    return Registry(root)


def _percent(metrics: Any, key: str) -> str:
    value = metrics.get(key) if isinstance(metrics, dict) else None
    return "-" if not isinstance(value, (int, float)) else f"{100 * value:.1f}"


def format_models_table(summaries: list[dict[str, Any]]) -> str:
    """:meth:`Registry.summaries <cliptuner.model.registry.Registry.summaries>` as a table, one row per version.

    Recall columns read ``before -> after`` in percent; ``*`` marks CURRENT; a version that cannot be read shows
    its error under its row.
    """
    header = ("", "VERSION", "CREATED", "PARENT", "ARCH", "EPOCHS", "T2I R@5 %", "I2T R@5 %", "MEAN RECALL %")
    rows, notes = [], {}
    for entry in summaries:
        report = entry.get("report") or {}
        recall = [
            "-" if not report else f"{_percent(report.get('before'), k)} -> {_percent(report.get('after'), k)}"
            for k in ("t2i_r5", "i2t_r5", "mean_recall")
        ]
        created = entry.get("created_at") or "-"
        rows.append(
            (
                "*" if entry.get("current") else "",
                entry["version"],
                created[:19].replace("T", " "),
                entry.get("parent_version") or "-",
                entry.get("arch") or "?",
                str(report.get("epochs")) if report.get("epochs") is not None else "-",
                *recall,
            )
        )
        if entry.get("error"):
            notes[len(rows) - 1] = f"    error: {entry['error']}"
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths)).rstrip()]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if i in notes:
            lines.append(notes[i])
    if not rows:
        lines.append("(no versions)")
    return "\n".join(lines)


def run_models(args: argparse.Namespace) -> Any:
    """``cliptuner models list|publish|promote|rollback|prune``: operate on the model versions of a registry."""
    registry = _registry_of(args, create=args.models_command == "publish")
    if args.models_command == "publish":
        version = registry.publish(args.model_dir, args.version, make_current=not args.no_current)
        print(f"published {version}" + ("" if args.no_current else f"; CURRENT is now {version}"))
        return version
    if args.models_command == "list":
        summaries = registry.summaries()
        print(json.dumps(summaries, indent=2) if args.json else format_models_table(summaries))
        return summaries
    if args.models_command == "promote":
        change = registry.promote(args.version)
        print(f"CURRENT is now {change.version}" + (f" (was {change.previous})" if change.changed else " (unchanged)"))
        return change
    if args.models_command == "rollback":
        change = registry.rollback()
        print(f"rolled back: CURRENT is now {change.version} (was {change.previous})")
        return change
    deleted = registry.prune(args.keep)
    print(
        f"deleted {', '.join(deleted)}; kept {', '.join(registry.versions())}"
        if deleted
        else f"nothing to delete; kept {', '.join(registry.versions())}"
    )
    return deleted


SERVE_ENV = {
    "host": "CLIPTUNER_HOST",
    "port": "CLIPTUNER_PORT",
    "workspace": "CLIPTUNER_WORKSPACE",
    "model": "CLIPTUNER_MODEL",
    "pretrained": "CLIPTUNER_PRETRAINED",
    "device": "CLIPTUNER_DEVICE",
    "metrics_port": "CLIPTUNER_METRICS_PORT",
    "index_backend": "CLIPTUNER_INDEX_BACKEND",
    "milvus_uri": "CLIPTUNER_MILVUS_URI",
    "milvus_token": "CLIPTUNER_MILVUS_TOKEN",
    "index_shards": "CLIPTUNER_INDEX_SHARDS",
    "batch_wait_ms": "CLIPTUNER_BATCH_WAIT_MS",
    "http_port": "CLIPTUNER_HTTP_PORT",
}
METRICS_PORTS = ("GATEWAY", "TUNER", "ENCODER", "INDEXER")  # CLIPTUNER_METRICS_PORT_<name> = the port + index
DEFAULT_HOST = "127.0.0.1"  # this machine only; a container sets CLIPTUNER_HOST=0.0.0.0 and publishes the port
FLOW_YAML = Path("flows") / "flow.yml"
SHARDS_FLOW_YAML = Path("flows") / "shards.yml"


def _default_flow(name: Path = FLOW_YAML) -> Path:
    """``flows/flow.yml`` (or ``name``) of the source tree this package runs from, else of the current directory."""
    beside = Path(__file__).resolve().parents[2] / name
    return beside if beside.is_file() else name.resolve()


def _index_shards() -> int:
    """``CLIPTUNER_INDEX_SHARDS`` as a count (1 when unset)."""
    raw = os.environ.get("CLIPTUNER_INDEX_SHARDS", "").strip() or "1"
    try:
        shards = int(raw)
    except ValueError:
        shards = 0
    if not 1 <= shards <= 64:
        raise ValueError(f"--index-shards / CLIPTUNER_INDEX_SHARDS must be a whole number in [1, 64], got {raw!r}")
    return shards


def _metrics_environment() -> None:
    """From ``CLIPTUNER_METRICS_PORT`` P: ``CLIPTUNER_METRICS`` and the Prometheus port of each Flow member
    (gateway P, tuner P+1, encoder P+2, indexer P+3); without it monitoring is off."""
    raw = os.environ.get("CLIPTUNER_METRICS_PORT", "").strip()
    if not raw:
        os.environ["CLIPTUNER_METRICS"] = "false"
        for name in METRICS_PORTS:
            os.environ[f"CLIPTUNER_METRICS_PORT_{name}"] = ""  # unused; the Flow YAML needs a value
        return
    try:
        base = int(raw)
    except ValueError:
        raise ValueError(f"--metrics-port / CLIPTUNER_METRICS_PORT must be a port number, got {raw!r}") from None
    if not 1 <= base <= 65535 - len(METRICS_PORTS) + 1:
        raise ValueError(
            f"--metrics-port / CLIPTUNER_METRICS_PORT must leave room for {len(METRICS_PORTS)} ports "
            f"below 65536, got {base}"
        )
    os.environ["CLIPTUNER_METRICS"] = "true"
    for i, name in enumerate(METRICS_PORTS):
        os.environ[f"CLIPTUNER_METRICS_PORT_{name}"] = str(base + i)


def _optional_port(name: str, option: str) -> Optional[int]:
    """The port in environment variable ``name`` (set from ``option``), or None when it is unset or empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        port = int(raw)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ValueError(f"{option} / {name} must be a port number in [1, 65535], got {raw!r}")
    return port


def _wait_until_answering(host: str, port: int, timeout: float = 120.0) -> None:
    """Send ``/status`` through the started Flow until every Executor answers it.

    Jina calls a Flow ready when each of its processes is up; a sharded indexer's head may still be reconnecting
    to a shard it tried before the shard listened, and would fail the first requests. ``serve`` announces itself
    only once a request has gone all the way through.

    Raises:
        RuntimeError: no full answer within ``timeout`` seconds (the last error is named).
    """
    from docarray import DocList
    from jina import Client

    from executors.schemas import ClipDoc

    client = Client(host="127.0.0.1" if host in ("0.0.0.0", "::", "") else host, port=port, protocol="grpc")
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.post("/status", return_type=DocList[ClipDoc])
            return
        except Exception as exc:  # BadServer while a shard is unreachable, a connection error before that
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the Flow started but did not answer /status within {timeout:.0f} s: {exc}"
                ) from None
            time.sleep(0.5)


def run_serve(args: argparse.Namespace) -> None:
    """``cliptuner serve``: start the Flow of ``flows/flow.yml`` (gRPC gateway, tuner, encoder, indexer) and block.

    Each option sets its ``CLIPTUNER_*`` variable, which the Flow YAML reads; an option left out keeps the
    variable's value from the environment. The gateway listens on ``127.0.0.1`` unless ``--host`` or
    ``CLIPTUNER_HOST`` says otherwise (``0.0.0.0``: every interface); the Executors of ``flows/flow.yml`` always
    listen on ``127.0.0.1``, where only the gateway talks to them. Stops on Ctrl-C or SIGTERM.
    """
    import signal
    import threading

    for option, name in SERVE_ENV.items():
        value = getattr(args, option)
        if value is not None:
            os.environ[name] = str(value)
    shards = _index_shards()
    os.environ["CLIPTUNER_INDEX_SHARDS"] = str(shards)
    flow_path = Path(args.flow) if args.flow else _default_flow(SHARDS_FLOW_YAML if shards > 1 else FLOW_YAML)
    if not flow_path.is_file():
        raise ValueError(f"no Flow YAML at {str(flow_path)!r}; pass --flow PATH")
    if not os.environ.get("CLIPTUNER_PORT"):
        os.environ["CLIPTUNER_PORT"] = "51000"
    if not os.environ.get("CLIPTUNER_HOST", "").strip():
        os.environ["CLIPTUNER_HOST"] = DEFAULT_HOST
    if not os.environ.get("CLIPTUNER_WORKSPACE"):
        raise ValueError("no workspace: pass --workspace DIR or set CLIPTUNER_WORKSPACE")
    os.environ["CLIPTUNER_WORKSPACE"] = str(Path(os.environ["CLIPTUNER_WORKSPACE"]).expanduser().resolve())
    _metrics_environment()
    http_port = _optional_port("CLIPTUNER_HTTP_PORT", "--http-port")
    if http_port is not None and str(http_port) == os.environ["CLIPTUNER_PORT"].strip():
        raise ValueError(f"--http-port / CLIPTUNER_HTTP_PORT must differ from the gRPC port, got {http_port} for both")
    for name in SERVE_ENV.values():  # unset → empty: the Flow YAML then passes None rather than the text "$NAME"
        os.environ.setdefault(name, "")
    os.environ.setdefault("JINA_OPTOUT_TELEMETRY", "1")

    from jina import Flow

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    flow = Flow.load_config(str(flow_path))
    host, port = os.environ["CLIPTUNER_HOST"], int(os.environ["CLIPTUNER_PORT"])
    with flow:
        _wait_until_answering(host, port)
        http = None
        if http_port is not None:  # the JSON API and the search page, in this process, in front of the gRPC gateway
            from cliptuner.serve.page import HttpFront

            http = HttpFront(host, http_port, grpc_port=port, workspace=Path(os.environ["CLIPTUNER_WORKSPACE"]))
            http.start()
        also = f", http {host}:{http_port} (search page and JSON API)" if http is not None else ""
        print(
            f"cliptuner serving on grpc {host}:{port}{also} (workspace {os.environ['CLIPTUNER_WORKSPACE']}); "
            "Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        try:
            flow.block(stop_event=stop)
        finally:
            if http is not None:
                http.stop()


DESCRIPTION = (
    "Fine-tune CLIP on your own image-text pairs, measure recall@k before and after,\n"
    "export ONNX, and serve it as gRPC microservices."
)
EXAMPLES = """\
examples:
  cliptuner demo                                   the whole service offline, with plots (start here)
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
    parser = argparse.ArgumentParser(
        prog="cliptuner", description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"cliptuner {_package_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every training step line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a model on PAIRS and export it")
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
        help="append every training event (loaded, before, step, epoch, eval, end, wiseft, after) to "
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
    p.set_defaults(func=run_train)

    p = sub.add_parser(
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
    p.add_argument(
        "--device",
        default="auto",
        type=_serving_device,
        metavar="DEVICE",
        help="auto, cpu, cuda or cuda:N, where ONNX Runtime runs (default: auto)",
    )
    p.add_argument("--json", default=None, help="also write the metrics to this file (default: none)")
    p.set_defaults(func=run_eval)

    p = sub.add_parser(
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
    p.set_defaults(func=run_export)

    p = sub.add_parser(
        "encode",
        help="embed texts and images with an exported model",
        epilog='example:\n  cliptuner encode --model-dir runs/v1 --text "a red dress" --image shoe.jpg',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-dir", required=True, help="an exported model directory (required)")
    p.add_argument("--text", nargs="*", default=[], metavar="TEXT", help="texts to embed")
    p.add_argument("--image", nargs="*", default=[], metavar="FILE", help="image files to embed")
    p.add_argument(
        "--device",
        default="auto",
        type=_serving_device,
        metavar="DEVICE",
        help="auto, cpu, cuda or cuda:N, where ONNX Runtime runs (default: auto)",
    )
    p.add_argument("--out", default=None, help="write a .npy instead of JSON lines (default: JSON lines on stdout)")
    p.set_defaults(func=run_encode)

    p = sub.add_parser(
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
    p.set_defaults(func=run_synth)

    p = sub.add_parser(
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
    p.set_defaults(func=run_demo)

    p = sub.add_parser(
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
    p.set_defaults(func=run_pretrain_base)

    p = sub.add_parser("serve", help="start the gRPC services (flows/flow.yml) and block")
    p.add_argument(
        "--host",
        default=None,
        help=f"address the gateway listens on (CLIPTUNER_HOST; default {DEFAULT_HOST}: this machine only; "
        "0.0.0.0: every interface)",
    )
    p.add_argument("--port", type=int, default=None, help="gRPC port (CLIPTUNER_PORT; default 51000)")
    p.add_argument("--workspace", default=None, help="models/, index/, data/, runs/ (CLIPTUNER_WORKSPACE)")
    p.add_argument(
        "--model", default=None, help="base model of a fresh workspace (CLIPTUNER_MODEL; default cliptuner-tiny)"
    )
    p.add_argument("--pretrained", default=None, help="its pretrained tag or checkpoint (CLIPTUNER_PRETRAINED)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (CLIPTUNER_DEVICE; default auto)")
    p.add_argument("--flow", default=None, help="the Flow YAML (default: flows/flow.yml)")
    p.add_argument(
        "--index-backend",
        default=None,
        choices=("auto", "exact", "usearch", "milvus"),
        help="the indexer's vector store (CLIPTUNER_INDEX_BACKEND; default auto: embedded in the "
        'workspace); milvus needs pip install "cliptuner[milvus]"',
    )
    p.add_argument(
        "--milvus-uri",
        default=None,
        help="with --index-backend milvus: the Milvus server, e.g. http://milvus:19530 "
        "(CLIPTUNER_MILVUS_URI; default: Milvus Lite, a file in the workspace's index)",
    )
    p.add_argument(
        "--milvus-token", default=None, help="the Milvus server's token, user:password (CLIPTUNER_MILVUS_TOKEN)"
    )
    p.add_argument(
        "--index-shards",
        type=int,
        default=None,
        metavar="N",
        help="split the index into N shards, each its own process and collection (CLIPTUNER_INDEX_SHARDS; "
        "default 1). N > 1 serves flows/shards.yml unless --flow says otherwise; embedded "
        "backends only",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=None,
        metavar="MS",
        help="how long the encoder lets a small request wait for others to share one model run "
        "(CLIPTUNER_BATCH_WAIT_MS; default 2; 0 turns dynamic batching off)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="turn on Prometheus metrics (CLIPTUNER_METRICS_PORT): the gateway serves them on this port, "
        "the tuner, encoder and indexer on the next three. Jina binds these endpoints to every "
        "interface, whatever --host says; firewall them where the machine is reachable. Default: off",
    )
    p.add_argument(
        "--http-port",
        type=int,
        default=None,
        metavar="P",
        help="also serve HTTP on this port of the same host (CLIPTUNER_HTTP_PORT): the search page at / "
        'and a JSON API, POST /post {"execEndpoint": "/search", "data": [...], '
        '"parameters": {...}}, forwarded to the gRPC gateway (cliptuner/serve/page.py). Default: off',
    )
    p.set_defaults(func=run_serve)

    p = sub.add_parser(
        "models",
        help="list, promote, roll back and prune model versions of a registry",
        description="Operate on the model versions of a registry (<workspace>/models).",
        epilog=MODELS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = argparse.ArgumentParser(add_help=False)
    group = where.add_mutually_exclusive_group()
    group.add_argument(
        "--workspace",
        default=None,
        help="the service's workspace; the registry is its models/ (default: $CLIPTUNER_WORKSPACE)",
    )
    group.add_argument("--models-dir", default=None, help="the registry itself, instead of --workspace")
    actions = p.add_subparsers(dest="models_command", required=True, metavar="{list,publish,promote,rollback,prune}")
    q = actions.add_parser(
        "list",
        parents=[where],
        help="every version: CURRENT, created, parent, arch, the report's before -> after recall",
    )
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q = actions.add_parser(
        "publish",
        parents=[where],
        help="publish an exported model directory (cliptuner train --out, cliptuner export) as "
        "the next version and make it CURRENT; creates the registry if needed",
    )
    q.add_argument("model_dir", help="the model directory (model.json and its ONNX files)")
    q.add_argument("--model-version", dest="version", default=None, help="its name (default: the next of v1, v2, ...)")
    q.add_argument("--no-current", action="store_true", help="publish without making it CURRENT (promote later)")
    q = actions.add_parser("promote", parents=[where], help="make a published version CURRENT")
    q.add_argument("version", help="the version to serve, e.g. v3")
    actions.add_parser(
        "rollback",
        parents=[where],
        help="make the version before CURRENT CURRENT: its parent while "
        "published, else the previous one in natural order",
    )
    q = actions.add_parser("prune", parents=[where], help="delete all but the newest K versions (never CURRENT)")
    q.add_argument("--keep", type=int, required=True, metavar="K", help="how many of the newest versions to keep")
    p.set_defaults(func=run_models)

    from cliptuner.serve.k8s import add_k8s_parser  # cliptuner k8s: Kubernetes manifests from flows/k8s.yml

    add_k8s_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
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

