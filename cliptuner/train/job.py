"""One training job and the one routine that runs it: :func:`train_and_export`.

A :class:`TrainJob` holds what a run needs (the pairs, the model to start from, the training and evaluation
options, where the tuned model version goes), validated once when it is built, and travels as ``job.json``
(:meth:`TrainJob.write`, :meth:`TrainJob.read`). ``cliptuner train``, the demo's base and the tuner's worker
process (:mod:`cliptuner.train.worker`) all run jobs through :func:`train_and_export`. Importing this module does not
import torch: the service builds jobs without it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from PIL import Image

from cliptuner.config import EvalConfig, GateConfig, ModelSpec, TrainConfig, from_mapping
from cliptuner.extras import require_train
from cliptuner.train.data import NO_GROUP, PairSet

logger = logging.getLogger(__name__)

EventCallback = Callable[[dict[str, Any]], None]
JOB_FILE = "job.json"  # a job written for a worker process
REPORT_FILE = "report.json"  # written beside the exported model
AUTO_DEVICE = "auto"  # TrainConfig.device resolved when the job runs: the LOCAL_RANK GPU when CUDA is here, else cpu
# What a run is doing after each training event (a failure is reported with the phase it happened in).
PHASES = ("loading", "evaluating", "training", "exporting")
_PHASE_AFTER = {
    "loaded": "evaluating",
    "before": "training",
    "eval": "training",
    "end": "evaluating",
    "gate": "exporting",  # after "after": the gate measured the regression sets and decided
}


def phase_after(event: Mapping[str, Any], phase: str) -> str:
    """The phase of a run once it emitted ``event`` (``phase`` when the event does not change it)."""
    return _PHASE_AFTER.get(event.get("event"), phase)


_CONFIGS = (("model", ModelSpec), ("cfg", TrainConfig), ("eval_cfg", EvalConfig), ("gate", GateConfig))


def _path(name: str, value: Any, optional: bool = True) -> Optional[str]:
    if value is None and optional:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        allowed = "a non-empty path" + (" or None" if optional else "")
        raise ValueError(f"TrainJob.{name} must be {allowed}, got {value!r}")
    return value


def config_values(config: Any) -> dict[str, Any]:
    """The field values of a config object (:class:`TrainConfig`, :class:`EvalConfig`, :class:`ModelSpec`)."""
    if hasattr(config, "model_dump"):
        return config.model_dump()
    return dataclasses.asdict(config)


@dataclass
class TrainJob:
    """A fine-tuning run: what it trains on, from which model, with which options, and where its export goes.

    Raises:
        ValueError: a path that is not a non-empty string, or a config of the wrong type (named); a stream without
            ``eval_data``, or with options a stream cannot serve (:func:`cliptuner.train.streaming.check_stream_training`).
    """

    data: str  # PAIRS to train on: a CSV (image,caption), a Karpathy-style JSON (its train split), or a stream read
    #   while training: tar shards or parquet, as a brace pattern, a file or a folder (cliptuner.train.streaming)
    out: str  # the model directory written: ONNX towers, model.json, checkpoint.pt, report.json (and plots/)
    model: ModelSpec = field(default_factory=ModelSpec)  # the model to start from
    cfg: TrainConfig = field(default_factory=lambda: TrainConfig(device=AUTO_DEVICE))  # device "auto" allowed
    eval_cfg: EvalConfig = field(default_factory=EvalConfig)  # held-out fraction and seed, recall cut-offs
    eval_data: Optional[str] = None  # held-out PAIRS; None: a seeded fraction of ``data`` (or a JSON's test split)
    general_data: Optional[str] = None  # off-domain PAIRS: the WiSE-FT sweep reports on it, the gate's regression set
    regression_data: Optional[str] = None  # PAIRS the candidate may not lose on (the kept queries of past feedback)
    gate: GateConfig = field(default_factory=GateConfig)  # whether the tuned model may replace the serving one
    serving_label: str = "the serving version"  # how the gate names the weights the run starts from (``version v3``)
    version: Optional[str] = None  # the model version name recorded; None: the name of ``out``
    checkpoint_dir: Optional[str] = None  # resumable training state written here every epoch
    resume: Optional[str] = None  # a last.pt from checkpoint_dir to continue from
    plots: bool = True  # draw out/plots/training.png and recall.png from the report

    def __post_init__(self) -> None:
        self.data = _path("data", self.data, optional=False)
        self.out = _path("out", self.out, optional=False)
        for name in ("eval_data", "general_data", "regression_data", "checkpoint_dir", "resume"):
            setattr(self, name, _path(name, getattr(self, name)))
        for name, cls in _CONFIGS:
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"TrainJob.{name} must be a {cls.__name__}, got {getattr(self, name)!r}")
        if self.version is not None and (not isinstance(self.version, str) or not self.version.strip()):
            raise ValueError(f"TrainJob.version must be a non-empty string or None, got {self.version!r}")
        if not isinstance(self.plots, bool):
            raise ValueError(f"TrainJob.plots must be true or false, got {self.plots!r}")
        if not isinstance(self.serving_label, str) or not self.serving_label.strip():
            raise ValueError(f"TrainJob.serving_label must be a non-empty string, got {self.serving_label!r}")
        from cliptuner.train.streaming import check_stream_training

        cfg = self.cfg
        check_stream_training(self.data, self.eval_data, cfg.keep_best, cfg.early_stop_patience, cfg.hard_negatives)

    @property
    def version_name(self) -> str:
        """The model version recorded in the export: ``version``, else the name of ``out``."""
        return self.version or Path(self.out).name

    def to_dict(self) -> dict[str, Any]:
        """The job as JSON-ready values; :meth:`from_dict` reads it back."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, _ in _CONFIGS:
            values[name] = config_values(values[name])
        return json.loads(json.dumps(values))  # tuples as lists, as the file holds them

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainJob:
        """A job from :meth:`to_dict`'s values, validated.

        Raises:
            ValueError: an unknown or missing key, or a bad value (named).
        """
        if not isinstance(values, Mapping):
            raise ValueError(f"a training job must be a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training job key(s) {unknown}; known: {sorted(known)}")
        missing = sorted({"data", "out"} - set(values))
        if missing:
            raise ValueError(f"a training job needs {missing}")
        values = dict(values)
        for name, config in _CONFIGS:
            if name in values:
                if not isinstance(values[name], Mapping):
                    raise ValueError(f"training job key {name!r} must be a mapping, got {values[name]!r}")
                values[name] = from_mapping(config, values[name])
        return cls(**values)

    def write(self, path: Union[str, os.PathLike]) -> Path:
        """Write the job as JSON to ``path`` (its folder is created); returns ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def read(cls, path: Union[str, os.PathLike]) -> TrainJob:
        """The job written to ``path`` by :meth:`write`.

        Raises:
            ValueError: an unreadable file, invalid JSON, or a bad job (named).
        """
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"cannot read training job {str(path)!r}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ValueError(f"training job {str(path)!r} is not valid JSON: {exc}") from None
        return cls.from_dict(values)


# -- pairs held in memory, as a PAIRS file a job reads -----------------------------------------------------------
def _safe_name(text: str, limit: int = 48) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:limit].strip("._") or "image"


def write_pairs_csv(pairs: PairSet, path: Path) -> Path:
    """Write ``pairs`` as a PAIRS CSV that :func:`cliptuner.train.data.load_csv` reads back as the same pairs.

    Rows follow the pairs' order (the images then come in the set's order); batch groups (hard negatives that
    train with their query pair) go into a ``group`` column, gallery images into rows of their own without a
    caption, marked in a ``gallery`` column. Images held in memory are written
    beside the CSV under ``images/``, named by position and image id: arrays and PIL images as PNG (lossless),
    encoded bytes as they came. Images given as paths are named by their absolute path; a path that two image ids
    share is copied for the second, so that the two stay two images as they were.

    Returns:
        ``path``.
    """
    folder = path.parent / "images"
    folder.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    seen: set[str] = set()
    for i, (image, image_id) in enumerate(zip(pairs.images, pairs.image_ids)):
        stem = f"{i:06d}-{_safe_name(image_id)}"
        if isinstance(image, (str, os.PathLike)) and os.path.abspath(image) not in seen:
            names.append(os.path.abspath(image))
            seen.add(names[-1])
            continue
        if isinstance(image, (str, os.PathLike)):
            name = stem + Path(image).suffix
            shutil.copyfile(image, folder / name)
        elif isinstance(image, (bytes, bytearray, memoryview)):
            name = stem
            (folder / name).write_bytes(bytes(image))
        else:  # an H×W×3 uint8 array (checked when the request was read) or a PIL image
            name = stem + ".png"
            picture = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image))
            picture.save(folder / name, format="PNG")
        names.append(f"images/{name}")
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        groups = pairs.groups
        gallery = ["gallery"] if pairs.gallery else []
        writer.writerow(["image", "caption"] + (["group"] if groups is not None else []) + gallery)
        for pair, (caption, image_i) in enumerate(zip(pairs.captions, pairs.image_index)):
            row = [names[image_i], caption]
            if groups is not None:  # an empty cell: no group (NO_GROUP)
                row.append("" if groups[pair] == NO_GROUP else groups[pair])
            writer.writerow(row + ([""] if gallery else []))
        for image_i in range(pairs.num_captioned, pairs.num_images):  # gallery images: no caption
            writer.writerow([names[image_i], ""] + ([""] if groups is not None else []) + ["1"])
    return path


# -- running a job -----------------------------------------------------------------------------------------------
def default_device() -> str:
    """``cuda:<LOCAL_RANK>`` when CUDA is here (the process's GPU under torchrun), else ``cpu``."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    return "cpu"


def init_distributed(device: str) -> tuple[int, int]:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1): NCCL on GPUs, gloo on CPU.

    Returns:
        ``(world_size, rank)``; ``(1, 0)`` outside torchrun.
    """
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


def _resolved(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with an ``auto`` device resolved (:func:`default_device`)."""
    if cfg.device not in (AUTO_DEVICE, "", None):
        return cfg
    return from_mapping(TrainConfig, {**config_values(cfg), "device": default_device()})


def _ignore(event: dict[str, Any]) -> None:
    return None


def train_and_export(job: TrainJob, on_event: Optional[EventCallback] = None) -> dict[str, Any]:
    """Fine-tune as ``job`` says, evaluate before and after on the same held-out pairs, and export the model version.

    Under torchrun every rank trains its shard; rank 0 alone evaluates, exports, writes ``report.json`` and emits
    events. Besides the training events of :func:`cliptuner.train.loop.finetune`, ``on_event`` receives ``loaded``
    first (``world_size``, ``device``, and the pairs and images trained on and held out), and after ``after``:
    ``exported`` (the recall of an fp16/int8 export, :func:`exported_recall`) and ``plots`` (the ``paths`` drawn).

    Args:
        job: the run.
        on_event: receives each event, in order (rank 0 only).

    Returns:
        The report (rank 0's holds ``model_version``, ``model`` and ``wall_seconds`` too; it is also written to
        ``<out>/report.json`` and into the export's ``model.json``).

    Raises:
        ValueError: bad input: unreadable pairs, an undecodable image, too few images (also
            :class:`cliptuner.train.data.DataError`).
        MissingTrainExtra: torch or open_clip is not installed.
    """
    require_train("training a model")
    from cliptuner.train.data import train_and_held_out
    from cliptuner.train.gating import gate_after, gate_baseline
    from cliptuner.train.loop import finetune
    from cliptuner.train.models import load_model, seed_everything

    cfg = _resolved(job.cfg)
    world_size, rank = init_distributed(cfg.device)
    emit = on_event if on_event is not None and rank == 0 else _ignore
    try:
        eval_cfg = job.eval_cfg
        train_pairs, eval_pairs = train_and_held_out(
            job.data, job.eval_data, eval_cfg.eval_fraction, eval_cfg.split_seed
        )
        seed_everything(cfg.seed)  # random init is reproducible (and equal on every rank)
        bundle = load_model(job.model)
        emit(
            {
                "event": "loaded",
                "world_size": world_size,
                "device": cfg.device,
                "train_pairs": len(train_pairs),
                "train_images": train_pairs.num_images,
                **({"train_shards": train_pairs.num_shards} if hasattr(train_pairs, "num_shards") else {}),
                "eval_pairs": len(eval_pairs),
                "eval_images": eval_pairs.num_images,
            }
        )
        started = time.time()
        general = load_general(job.general_data)
        regression = regression_sets(general, job.regression_data)
        baseline = gate_baseline(bundle, job.gate, regression, eval_cfg, cfg.device) if rank == 0 else None
        report = finetune(
            bundle,
            train_pairs,
            eval_pairs,
            cfg,
            eval_cfg,
            on_event=emit,
            checkpoint_dir=job.checkpoint_dir,
            resume_from=job.resume,
            general_pairs=general,
        )
        if rank == 0:
            report["gate"] = gate_after(
                bundle, baseline, job.gate, cfg, eval_cfg, eval_pairs, report, job.serving_label, emit
            )
    finally:
        if world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank != 0:  # rank 0 alone evaluates and exports
        return report
    report.update(
        {
            "model_version": job.version_name,
            "model": {"arch": job.model.arch, "pretrained": job.model.pretrained},
            "wall_seconds": time.time() - started,
        }
    )
    return _export(job, bundle, eval_pairs, cfg.export_precision, report, emit)


def load_general(path: Optional[str]) -> Optional[PairSet]:
    """The off-domain pairs of the WiSE-FT sweep (a Karpathy JSON's test split), or None without a path."""
    if not path:
        return None
    from cliptuner.train.data import load_split

    return load_split(path, "test")


def regression_sets(general: Optional[PairSet], regression_data: Optional[str]) -> dict[str, PairSet]:
    """The gate's regression sets: ``general`` (the general pairs) and ``feedback`` (a PAIRS file of kept queries)."""
    sets = {} if general is None else {"general": general}
    if regression_data:
        from cliptuner.train.data import load_split

        sets["feedback"] = load_split(regression_data, "test")
    return sets


def _export(
    job: TrainJob, bundle: Any, eval_pairs: PairSet, precision: str, report: dict[str, Any], emit: EventCallback
) -> dict[str, Any]:
    """Export the trained model version to ``job.out`` with its report (and plots)."""
    from cliptuner.train import export

    out = Path(job.out)
    bundle.model.cpu()
    export.export_model_dir(
        bundle,
        out,
        checkpoint=True,
        precision=precision,
        metadata_extra={"version": job.version_name, "report": report},
    )
    if precision != "fp32":
        report["exported"] = exported_recall(out, eval_pairs, precision, report["after"])
        emit({"event": "exported", **report["exported"]})
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    if job.plots:
        from cliptuner.train.plots import write_report_plots

        paths = write_report_plots(report, out / "plots")
        emit({"event": "plots", "paths": [str(path) for path in paths]})
    return report


def exported_recall(out: Path, eval_pairs: PairSet, precision: str, after: dict[str, float]) -> dict[str, Any]:
    """Held-out recall of the exported graphs of another precision than the trained weights, beside the fp32
    ``after``; written into the export's ``model.json`` report too (an fp16 export is measured where CUDA is).

    Returns:
        ``{"precision", "measured": True, "after", "drop"}``, or ``{"precision", "measured": False, "reason"}``.
    """
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
    manifest = ModelManifest.read(out)
    manifest.report = {**(manifest.report or {}), "exported": result}
    manifest.write(out)
    return result


__all__ = [
    "AUTO_DEVICE",
    "JOB_FILE",
    "PHASES",
    "TrainJob",
    "config_values",
    "default_device",
    "exported_recall",
    "init_distributed",
    "load_general",
    "phase_after",
    "regression_sets",
    "train_and_export",
    "write_pairs_csv",
]
