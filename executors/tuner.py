"""CLIPTuner: fine-tunes the CURRENT model version on a request's pairs, proves the gain, and publishes the tuned one.

Endpoints ``/train``, ``/train/cancel``, ``/status``, ``/models``, ``/models/promote``, ``/models/rollback`` and
``/models/prune``; their contract is in docs/service.md. This Executor checks a request and turns it into a
:class:`~cliptuner.train.job.TrainJob`; :class:`cliptuner.serve.runs.TrainingRuns` runs it (one run at a time, each in a
worker process) and publishes the tuned version.
"""

import asyncio
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
from docarray import DocList
from jina import Executor, requests

from cliptuner.config import (
    REQUEST_ID_PATTERN,
    RUN_PARAMETERS,
    TRAIN_SOURCES,
    EvalConfig,
    GateConfig,
    ModelSpec,
    TrainConfig,
    from_mapping,
)
from cliptuner.extras import require_train
from cliptuner.model.registry import CurrentChange, Registry
from cliptuner.options import read_options_file, request_names
from cliptuner.serve.access import RemoteImage
from cliptuner.serve.auto_train import AutoTrainer, AutoTrainPolicy
from cliptuner.serve.cluster import TrainingCluster, in_cluster_namespace
from cliptuner.serve.content import image_source
from cliptuner.serve.feedback import FEEDBACK_SUBDIR
from cliptuner.serve.feedback_training import FeedbackTraining, check_batch, feedback_training_sets
from cliptuner.serve.runs import (
    DEFAULT_TRAIN_NICENESS,
    MAX_NICENESS,
    STOP_GRACE_S,
    Run,
    TrainingBusy,
    TrainingCancelled,
    TrainingFailed,
    TrainingInputError,
    TrainingNotRunning,
    TrainingRuns,
    default_torch_threads,
    hide_paths,
)
from cliptuner.serve.status import status_view, wants_detail
from cliptuner.settings import ServiceEnvironment
from cliptuner.train.data import DataError, PairSet, from_memory, load_split, train_and_held_out
from cliptuner.train.datacheck import check_before_training
from cliptuner.train.job import TrainJob, write_pairs_csv
from cliptuner.train.streaming import StreamError, StreamSource, expand_shards, is_stream_spec, source_files

from .content import check_request, doc_blob, doc_uri
from .metrics import Metrics
from .options import (
    DATA_SUBDIR,
    RUNS_SUBDIR,
    ExecutorSettings,
    ExecutorSetup,
    int_parameter,
    int_setting,
    request_parameters,
    setting,
)
from .schemas import ClipDoc

logger = logging.getLogger(__name__)

TRAIN_OPTIONS = request_names(TrainConfig)  # the TrainConfig fields a request may set
EVAL_OPTIONS = request_names(EvalConfig)  # eval_fraction
GATE_OPTIONS = request_names(GateConfig)  # gate, min_gain, max_regression, gate_metric, gate_wiseft
SOURCE_OPTIONS = ("data", "eval_data", "general_data", "config")  # files under the data root
RUN_OPTIONS = RUN_PARAMETERS  # how the request waits for its run, and which request it is
FEEDBACK = TRAIN_SOURCES[1]  # parameters['source'] of a run on the recorded feedback
REPORT_ID = "train-report"
RUN_DOC_ID = "train-run"  # the answer of a /train with wait=False
CANCEL_DOC_ID = "train-cancel"  # the answer of /train/cancel
TORCH_THREADS_ENV = "CLIPTUNER_TORCH_THREADS"  # torch_threads, when the setting is not given
TRAIN_NICENESS_ENV = "CLIPTUNER_TRAIN_NICENESS"  # train_niceness, when the setting is not given
REQUEST_ID = re.compile(REQUEST_ID_PATTERN)  # a client's parameters['request_id']

__all__ = [
    "CLIPTuner",
    "TrainRequest",
    "TrainingBusy",
    "TrainingCancelled",
    "TrainingFailed",
    "TrainingInputError",
    "TrainingNotRunning",
]


@dataclasses.dataclass
class TrainRequest:
    """A validated /train request: what to train on and how."""

    cfg: TrainConfig
    eval_cfg: EvalConfig
    data: Optional[Path]  # PAIRS file, or None for the request's docs
    eval_data: Optional[Path]  # held-out PAIRS file, or None for a held-out fraction
    general_data: Optional[Path] = None  # off-domain PAIRS file: the WiSE-FT sweep, the gate's regression set
    gate: GateConfig = dataclasses.field(default_factory=GateConfig)  # when the tuned version goes live
    wait: bool = True  # answer after the run (the report), or at once (the run id)
    request_id: Optional[str] = None  # the client's id of this request; None: derived (:func:`request_digest`)
    source: str = "request"  # the request's docs or data file, or the recorded feedback (mixed with data)


def _digest_value(value: Any) -> Any:
    """``value`` as JSON can hold it, for :func:`request_digest`: bytes and arrays by their SHA-256."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"sha256": hashlib.sha256(value).hexdigest()}
    if hasattr(value, "tobytes") and hasattr(value, "shape"):  # a numpy array (or a tensor docarray gives)
        return {
            "shape": list(value.shape),
            "dtype": str(value.dtype),
            "sha256": hashlib.sha256(value.tobytes()).hexdigest(),
        }
    return value


def request_digest(parameters: dict, docs: DocList[ClipDoc], files: dict[str, Path]) -> str:
    """The id of a /train request without a client ``request_id``: a digest of what it asks for.

    The same parameters (``wait`` aside), the same docs in the same order (ids, texts, uris, tags, image bytes) and
    the same data files (path, size and modification time, so an edited file is a new request; each shard of a
    stream) give the same id.
    """
    digest = hashlib.sha256()
    params = {k: v for k, v in sorted(parameters.items()) if k not in RUN_OPTIONS}
    digest.update(json.dumps(params, sort_keys=True, default=str).encode())
    for name, source in sorted(files.items()):
        for path in source_files(source):
            stat = path.stat()
            digest.update(json.dumps([name, str(path), stat.st_size, stat.st_mtime_ns]).encode())
    for doc in docs:
        fields = [doc.id, doc.text, doc.uri, doc.tags, _digest_value(doc.blob)]
        if doc.tensor is not None:
            fields.append(_digest_value(np.asarray(doc.tensor)))
        digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    return "derived-" + digest.hexdigest()[:32]


def training_cluster(values: Optional[dict]) -> Optional[TrainingCluster]:
    """The :class:`TrainingCluster` of the tuner's ``train_cluster`` setting (None: runs train in local processes).

    Raises:
        ValueError: not a mapping, an unknown field (named) or a bad value.
    """
    if not values:
        return None
    if not isinstance(values, dict):
        raise ValueError(f"train_cluster must be a mapping of TrainingCluster fields, got {values!r}")
    known = {field.name for field in dataclasses.fields(TrainingCluster)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"train_cluster: unknown field(s) {unknown}; known: {sorted(known)}")
    values = dict(values)
    if "namespace" not in values:
        values["namespace"] = in_cluster_namespace()
    return TrainingCluster(**values)


class CLIPTuner(Executor):
    """Fine-tunes the CURRENT model version on pairs and publishes the tuned one.

    Args:
        data_root: folder that ``parameters['data']``/``['eval_data']`` are relative to; default ``<workspace>/data``.
        runs_dir: where each run has its directory; default ``<workspace>/runs``.
        torch_threads: CPU threads torch may use in each worker process (its ``OMP_NUM_THREADS``); unset:
            ``$CLIPTUNER_TORCH_THREADS``, else ``(CPUs - 1) // processes``, at least 1: one CPU is left to serving.
        train_niceness: added to the tuner's nice value for its worker processes (0 to 19); unset:
            ``$CLIPTUNER_TRAIN_NICENESS``, else 10, so that the encoder's and the indexer's work runs first.
        processes: worker processes per run: N > 1 runs them under torchrun (DDP: NCCL on GPUs, gloo on CPU).
        keep_versions: after each publish, delete all but the newest this many versions (never CURRENT); None
            keeps every version.
        train_cluster: train each run as a Kubernetes Job of several pods instead of a local process: the fields of
            :class:`cliptuner.serve.cluster.TrainingCluster` (``image``, ``nodes``, ``procs_per_node``,
            ``gpus_per_node``, ``cpu``, ``memory``, ``workspace_claim``, ...; ``namespace`` defaults to the tuner pod's
            own). The tuner talks to the API server with its pod's service account (docs/training.md).
        auto_train: train on the search feedback by itself (off when unset): ``min_events`` new events over at
            least ``min_queries`` distinct queries start a gated run, detached, looked for every ``check_every_s``
            seconds, with the ``/train`` ``parameters`` given (:class:`cliptuner.serve.auto_train.AutoTrainPolicy`).
        **kwargs: the settings the three Executors share, by name (:class:`executors.options.ExecutorSettings`:
            model, pretrained, device, models_dir, bootstrap, bootstrap_timeout, uri_roots, allowed_hosts,
            intra_op_threads and the request limits ``max_*``), then jina's own.
            ``device`` is where to train: ``auto`` is decided by the worker process (CUDA if available); the
            tuner's own process never imports torch for a run.

    Raises:
        ValueError: no workspace, a base model that cannot be built, or a bad uri, limit or training setting.
    """

    def __init__(
        self,
        data_root: Optional[str] = None,
        runs_dir: Optional[str] = None,
        torch_threads: Optional[int] = None,
        train_niceness: Optional[int] = None,
        keep_versions: Optional[int] = None,
        processes: int = 1,
        train_cluster: Optional[dict] = None,
        auto_train: Optional[dict] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        require_train("the tuner (CLIPTuner)")  # it builds base versions and runs training workers
        # the set-up every Executor shares: workspace and registry, uri policy, request limits, the base version
        settings = ExecutorSettings.take(kwargs)
        setup = ExecutorSetup.start(self, settings, clean_temps=True)  # a publisher: crashed publishes cleaned
        self.registry: Registry = setup.registry
        self.policy, self.limits, self.base, self.device = setup.policy, setup.limits, setup.base, settings.device
        # the tuner's own settings
        self.data_root = Path(setting(data_root) or setup.root / DATA_SUBDIR).expanduser().resolve()
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.runs_dir = Path(setting(runs_dir) or setup.root / RUNS_SUBDIR).expanduser().resolve()
        keep_versions = setting(keep_versions)
        self.keep_versions = None if keep_versions is None else int_parameter("keep_versions", keep_versions)
        processes = setting(processes)
        self.processes = int_parameter("processes", 1 if processes is None else processes)
        self.torch_threads = int_setting(
            "torch_threads", torch_threads, TORCH_THREADS_ENV, default_torch_threads(self.processes)
        )
        self.train_niceness = int_setting(
            "train_niceness", train_niceness, TRAIN_NICENESS_ENV, DEFAULT_TRAIN_NICENESS, 0, MAX_NICENESS
        )
        self.metrics = Metrics(getattr(self.runtime_args, "metrics_registry", None))
        self.metrics.workspace_volume(setup.root)
        self.metrics.training_outcomes()
        self.metrics.time_requests(self)
        self.metrics.model_version(self.registry.current())
        self.cluster = training_cluster(setting(train_cluster))
        self.runs = TrainingRuns(
            self.runs_dir,
            self.registry,
            processes=self.processes,
            torch_threads=self.torch_threads,
            niceness=self.train_niceness,
            keep_versions=self.keep_versions,
            observer=self.metrics,
            hidden={"the data root": self.data_root},
            cluster=self.cluster,
        )
        self.feedback_root = setup.root / FEEDBACK_SUBDIR
        self.auto: Optional[AutoTrainer] = None
        policy = AutoTrainPolicy.from_setting(setting(auto_train) or ServiceEnvironment.get("auto_train"))
        if policy is not None:
            self.parse_request({**policy.parameters, "source": FEEDBACK})  # bad parameters fail the start
            self.auto = AutoTrainer(
                policy,
                self.feedback_root,
                self._start_auto,
                on_pending=self.metrics.feedback_pending,
                on_started=self.metrics.auto_train_started,
            )
            self.auto.start()
        logger.info(
            "CLIPTuner: CURRENT %s in %s, training on %s (%d process(es) per run, %d torch thread(s) each, "
            "niceness +%d), data root %s",
            self.registry.current(),
            self.registry.root,
            self.device,
            self.processes,
            self.torch_threads,
            self.train_niceness,
            self.data_root,
        )

    # -- request parsing -----------------------------------------------------------------------------------------
    def _data_path(self, name: str, value: Any) -> Path:
        """The file a data parameter names under the data root; for ``data``/``eval_data``/``general_data`` also a
        stream (a brace pattern, a ``.tar``/``.parquet`` file or a folder), every file of which must lie inside it."""
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"parameter {name!r} must name a PAIRS file under the data root, got {value!r}")
        if name != "config" and is_stream_spec(value, base=self.data_root):
            spec = Path(value)
            if spec.is_absolute() and not spec.is_relative_to(self.data_root):
                raise ValueError(f"parameter {name!r}: {value!r} is outside the data root")
            try:  # each file it names, resolved (symlinks and '..' followed), must lie in the data root
                expand_shards(value, root=self.data_root)
            except StreamError as exc:
                raise ValueError(f"parameter {name!r}: {exc}") from None
            return spec if spec.is_absolute() else self.data_root / spec
        path = Path(value).expanduser()
        path = (path if path.is_absolute() else self.data_root / path).resolve()
        if not path.is_relative_to(self.data_root):  # the client never learns where the data root is
            raise ValueError(f"parameter {name!r}: {value!r} is outside the data root")
        if not path.is_file():
            raise ValueError(f"parameter {name!r}: no file {value!r} under the data root")
        return path

    def _relative(self, message: str) -> str:
        """``message`` with the server's data-root prefix taken out of the paths it names."""
        return hide_paths(message, {"the data root": self.data_root})

    def parse_request(self, parameters: Optional[dict]) -> TrainRequest:
        """Validate /train parameters into configs.

        ``parameters['config']`` names a YAML/JSON file of option values under the data root; the request's own
        parameters override it. ``parameters['wait']`` (a bool, default True) chooses whether the request waits
        for the run.

        Raises:
            ValueError: an unknown parameter or config-file option (named), a bad value, or a data path outside
                the data root.
        """
        options = TRAIN_OPTIONS + EVAL_OPTIONS + GATE_OPTIONS
        params = request_parameters(parameters, options + SOURCE_OPTIONS + RUN_OPTIONS + ("source",), "/train")
        wait = params.pop("wait", True)
        if not isinstance(wait, bool):
            raise ValueError(f"parameter 'wait' must be true or false, got {wait!r}")
        source = params.pop("source", TRAIN_SOURCES[0])
        if source not in TRAIN_SOURCES:
            raise ValueError(f"parameter 'source' must be one of {list(TRAIN_SOURCES)}, got {source!r}")
        request_id = params.pop("request_id", None)
        if request_id is not None and not (isinstance(request_id, str) and REQUEST_ID.match(request_id)):
            raise ValueError(
                "parameter 'request_id' must be 1 to 128 letters, digits and . _ : - (starting with a letter or "
                f"digit), got {request_id!r}"
            )
        if "config" in params:
            name = params.pop("config")
            params = {
                **read_options_file(self._data_path("config", name), options, label=str(name)),
                **params,
            }
        train_values = {k: v for k, v in params.items() if k in TRAIN_OPTIONS}
        cfg = from_mapping(TrainConfig, {**train_values, "device": self.device, "log_every": 1})
        eval_values = {k: v for k, v in params.items() if k in EVAL_OPTIONS}
        eval_cfg = from_mapping(EvalConfig, {**eval_values, "split_seed": cfg.seed})
        gate = from_mapping(GateConfig, {k: v for k, v in params.items() if k in GATE_OPTIONS})
        paths = {name: self._data_path(name, params[name]) for name in SOURCE_OPTIONS[:3] if name in params}
        return TrainRequest(
            cfg=cfg,
            eval_cfg=eval_cfg,
            gate=gate,
            **{name: paths.get(name) for name in SOURCE_OPTIONS[:3]},
            wait=wait,
            request_id=request_id,
            source=source,
        )

    def pairs_from_docs(self, docs: DocList[ClipDoc]) -> PairSet:
        """The request's docs as pairs (docs sharing ``tags['image_id']`` are captions of one image).

        An http(s) image is fetched here (once per image), its body counted in the request's bytes.

        Raises:
            ValueError: a request over the limits, a doc without text or without an image, a bad image field or a
                uri the policy refuses (names the doc id), before anything is decoded.
        """
        total = check_request(
            docs,
            self.limits,
            "pairs",
            self.limits.max_pairs,
            "; write them to a PAIRS file under the data root and pass parameters['data']",
        )
        images, captions, image_ids = [], [], []
        for doc in docs:
            name = f"doc {doc.id!r}"
            image = image_source(name, doc.tensor, doc_blob(doc), doc_uri(doc), self.policy, self.limits.image_limits)
            if image is None or not (doc.text and doc.text.strip()):
                raise ValueError(f"{name}: a training pair needs text and an image (blob, uri or tensor)")
            images.append(image)
            captions.append(doc.text)
            image_ids.append(str(doc.tags.get("image_id", doc.id)))
        pairs = from_memory(images, captions, image_ids=image_ids, name="request")
        fetched = []
        for image, image_id in zip(pairs.images, pairs.image_ids):
            if isinstance(image, RemoteImage):
                image = image.read(f"image {image_id!r}")
                total += len(image)
                self.limits.check_total(total)
            fetched.append(image)
        return dataclasses.replace(pairs, images=fetched)

    def split_pairs(self, request: TrainRequest, docs: DocList[ClipDoc]) -> tuple[PairSet, PairSet, dict]:
        """Training and held-out pairs, and where they came from.

        Raises:
            ValueError: no pairs, both docs and a file, a bad file, or fewer training images than ``batch_size``.
        """
        if request.data is not None and len(docs):
            raise ValueError(f"/train got {len(docs)} docs and parameters['data']; give the pairs one way")
        if request.data is None and not len(docs):
            raise ValueError(
                "/train needs pairs: docs with text and an image, or parameters['data'] naming a "
                "PAIRS file under the data root"
            )
        if request.source == FEEDBACK and request.data is not None and is_stream_spec(request.data):
            raise ValueError(
                "/train with source 'feedback' mixes parameters['data'] into the feedback's pairs in memory; "
                f"{str(request.data.relative_to(self.data_root))!r} is a stream (tar shards or parquet): train on it "
                "with source 'request'"
            )
        source = str(request.data.relative_to(self.data_root)) if request.data is not None else "request docs"
        data = self.pairs_from_docs(docs) if request.data is None else request.data
        eval_cfg = request.eval_cfg
        try:  # every problem of the pairs at once (missing, broken, leaking images), before the run starts
            check_before_training(
                data,
                request.eval_data,
                eval_cfg.eval_fraction,
                eval_cfg.split_seed,
                model_dir=self.registry.path(self.registry.current()),  # its tokenizer measures the captions
                resolve_image=self.policy.local_path,
                # a batch holds distinct images (feedback runs are checked against their own pairs later)
                batch_size=request.cfg.batch_size if request.source != FEEDBACK else None,
            )
            train, held_out = train_and_held_out(
                data,
                request.eval_data,
                eval_cfg.eval_fraction,
                eval_cfg.split_seed,
                resolve_image=self.policy.local_path,
            )
        except DataError as exc:  # names files and rows by their paths under the data root only
            raise DataError(self._relative(str(exc))) from None
        if request.eval_data is not None:
            held_out_from = str(request.eval_data.relative_to(self.data_root))
        elif request.data is not None and request.data.suffix.lower() == ".json":
            held_out_from = f"{source} (test split)"
        else:
            held_out_from = f"{eval_cfg.eval_fraction:g} of {source} (seed {eval_cfg.split_seed})"
        if request.source != FEEDBACK:
            check_batch(train, request.cfg.batch_size)
        return train, held_out, {"source": source, "held_out": held_out_from}

    def feedback_split(self, request: TrainRequest, docs: DocList[ClipDoc]) -> FeedbackTraining:
        """The pairs of a run on the recorded feedback, mixed with ``parameters['data']`` when given
        (:func:`cliptuner.serve.feedback_training.feedback_training_sets`).

        Raises:
            ValueError: docs sent too, no usable feedback, too few queries to hold any out, too few images.
        """
        if len(docs):
            raise ValueError(
                f"/train with source 'feedback' trains on the recorded feedback (and parameters['data']); got "
                f"{len(docs)} docs: send none"
            )
        extra, name = None, ""
        if request.data is not None:
            train, held_out, sources = self.split_pairs(request, docs)
            extra, name = (train, held_out), sources["source"]
        elif request.eval_data is not None:  # labelled pairs that measure the run beside the feedback's own
            extra, name = (
                (None, self._load_general(request.eval_data)),
                str(request.eval_data.relative_to(self.data_root)),
            )
        return feedback_training_sets(self.feedback_root, request.cfg.batch_size, extra, name)

    # -- the run's job: checked and written here, trained by a worker, published by the runs --------------------
    def _parent_spec(self, parent: str) -> tuple[ModelSpec, str]:
        """The weights a run starts from (CURRENT's checkpoint: the version serving, which the gate compares the tuned
        weights with) and how the report names them."""
        manifest = self.registry.manifest(parent)
        checkpoint = manifest.checkpoint_path(self.registry.path(parent))
        if checkpoint is not None:
            spec = ModelSpec(arch=manifest.arch, pretrained=str(checkpoint), force_quick_gelu=manifest.force_quick_gelu)
            return spec, f"version {parent}"
        logger.warning(
            "model version %s has no checkpoint; training starts from the base model %s", parent, self.base.arch
        )
        return self.base, f"base model {self.base.arch} (version {parent} has no checkpoint)"

    def _load_general(self, path: Path) -> PairSet:
        """A PAIRS file's test pairs (the WiSE-FT sweep's general pairs, a feedback run's eval data), their image paths
        under the image policy like the others."""
        try:
            return load_split(path, "test", resolve_image=self.policy.local_path)
        except DataError as exc:
            raise DataError(self._relative(str(exc))) from None

    def _prepare(self, run: Run, request: TrainRequest, docs: DocList[ClipDoc]) -> TrainJob:
        """Check the pairs and split them, and write them into the run's inputs; returns the run's job.

        The split made here is handed over as it is: ``data`` the training pairs, ``eval_data`` the held-out ones.
        """
        regression = None
        if request.source == FEEDBACK:
            feedback = self.feedback_split(request, docs)
            train, held_out, run.sources, regression = (
                feedback.train,
                feedback.held_out,
                feedback.sources,
                feedback.regression,
            )
        else:
            train, held_out, run.sources = self.split_pairs(request, docs)
        spec, run.init = self._parent_spec(run.parent)
        general = None
        if request.general_data is not None:
            general_pairs = self._load_general(request.general_data)
            general = write_pairs_csv(general_pairs, run.inputs_dir / "general" / "general.csv")
        if regression is not None:
            regression = write_pairs_csv(regression, run.inputs_dir / "regression" / "regression.csv")
        # a stream is read by the run where it lies (its files were checked under the data root); pairs are written
        stream = isinstance(train, StreamSource)
        data = train.spec if stream else str(write_pairs_csv(train, run.inputs_dir / "train.csv"))
        return TrainJob(
            data=data,
            eval_data=str(write_pairs_csv(held_out, run.inputs_dir / "held_out.csv")),
            general_data=None if general is None else str(general),
            regression_data=None if regression is None else str(regression),
            model=spec,
            cfg=request.cfg,
            eval_cfg=request.eval_cfg,
            gate=request.gate,
            serving_label=run.init,
            out=str(run.model_dir),
            plots=False,  # a version in the registry is served, not looked at: its curves are in the report
        )

    def _start_auto(self, parameters: dict, request_id: str) -> Optional[str]:
        """Start the auto_train policy's run on the feedback, detached; its run id, or None when a run is going.

        A run that fails to start (too little usable feedback) has had its chance on these events: its id is
        returned all the same, and /status shows why it failed.
        """
        request = self.parse_request({**parameters, "source": FEEDBACK, "wait": False, "request_id": request_id})
        try:
            run, new = self.runs.claim(request_id)
        except TrainingBusy:
            return None
        if new:
            prepare = functools.partial(self._prepare, request=request, docs=DocList[ClipDoc]())
            try:
                self.runs.start_detached(prepare, run)
            except TrainingFailed as exc:
                logger.warning("auto_train: run %s did not start: %s", run.run_id, exc)
        return run.run_id

    def _run(self, request: TrainRequest, docs: DocList[ClipDoc]) -> dict:
        """A whole run, as a synchronous /train waits for it (the runs' place taken already)."""
        return self.runs.run(functools.partial(self._prepare, request=request, docs=docs))

    def status(self) -> dict:
        """CURRENT version, the training state (progress while running) and the last run's headline numbers."""
        return {
            "executor": "CLIPTuner",
            "pid": os.getpid(),
            "model_version": self.registry.current(),
            "training": dict(self.runs.progress),
            "last_report": self.runs.last_summary(),
            "device": self.device,
            "processes": self.processes,
            "torch_threads": self.torch_threads,
            "train_niceness": self.train_niceness,
            "data_root": str(self.data_root),
            "cluster": None
            if self.cluster is None
            else f"{self.cluster.nodes} node(s) x {self.cluster.procs_per_node}",
            "auto_train": None if self.auto is None else self.auto.status(),
        }

    def close(self) -> None:
        """Stop a running training: its worker's process group is ended (SIGTERM, then SIGKILL); nothing is
        published."""
        if self.auto is not None:
            self.auto.stop()
        self.runs.close()
        super().close()

    # -- endpoints -----------------------------------------------------------------------------------------------
    @requests(on="/train")
    async def train(self, docs: DocList[ClipDoc], parameters: Optional[dict] = None, **kwargs: Any) -> DocList[ClipDoc]:
        """Fine-tune on the request's pairs (or ``parameters['data']``); returns the one report doc, or with
        ``parameters['wait']=False`` the run's doc as soon as its worker has started."""
        request = self.parse_request(parameters)
        request_id = request.request_id
        if request_id is None:
            files = {name: getattr(request, name) for name in SOURCE_OPTIONS[:3] if getattr(request, name)}
            request_id = await asyncio.to_thread(request_digest, dict(parameters or {}), docs, files)
        loop = asyncio.get_running_loop()
        run, new = self.runs.claim(request_id, derived=request.request_id is None)
        if new:
            try:
                prepare = functools.partial(self._prepare, request=request, docs=docs)
                work = self.runs.run if request.wait else self.runs.start_detached
                future = loop.run_in_executor(None, work, prepare, run)
            except BaseException:
                self.runs.release()
                raise
            # the run releases its place when it ends, even if this request is cancelled meanwhile
            result = await future
            if not request.wait:
                return DocList[ClipDoc]([self._run_doc(result)])
        elif not request.wait:
            return DocList[ClipDoc]([self._run_doc(run)])
        else:  # the same request again (a retry): the report of the run it started, once that run has ended
            result = await loop.run_in_executor(None, run.outcome)
        return DocList[ClipDoc]([ClipDoc(id=REPORT_ID, model_version=result["model_version"], tags={"report": result})])

    @staticmethod
    def _run_doc(run: Run) -> ClipDoc:
        """The answer of a /train with ``wait=False``: the run's id and state (and version, once published)."""
        tags = {"run_id": run.run_id, "state": run.state, "request_id": run.request_id}
        version = run.report["model_version"] if run.report is not None else None
        if run.report is not None:  # published: as CURRENT, or as a candidate the gate refused
            tags["gate"] = run.report.get("gate", {}).get("reason")
        return ClipDoc(id=RUN_DOC_ID, model_version=version, tags=tags)

    @requests(on="/train/cancel")
    async def cancel(
        self, docs: DocList[ClipDoc], parameters: Optional[dict] = None, **kwargs: Any
    ) -> DocList[ClipDoc]:
        """Cancel the run that is going (``parameters['run_id']``, optional, must name it); answers once it ended."""
        params = request_parameters(parameters, ("run_id",), "/train/cancel")
        run = self.runs.cancel(params.get("run_id"))
        await asyncio.get_running_loop().run_in_executor(None, run.finished.wait, STOP_GRACE_S + 60)
        progress = self.runs.progress
        state = progress.get("state") if progress.get("run_id") == run.run_id else None
        return DocList[ClipDoc](
            [ClipDoc(id=CANCEL_DOC_ID, tags={"run_id": run.run_id, "state": state, "phase": progress.get("phase")})]
        )

    @requests(on="/status")
    async def report_status(
        self, docs: DocList[ClipDoc], parameters: Optional[dict] = None, **kwargs: Any
    ) -> DocList[ClipDoc]:
        """Append the tuner's status doc (without server paths and pids unless the gateway set ``detail``)."""
        state = self.status()
        if not wants_detail(parameters):
            state = status_view(state, self.registry.root.parent)
        docs.append(ClipDoc(id="status-tuner", model_version=state["model_version"], tags=state))
        return docs

    # -- model versions (/models…) -------------------------------------------------------------------------------
    async def _registry_call(self, method: Any, *args: Any) -> Any:
        """Run a registry operation in a worker thread; its errors name versions, never the registry's path."""
        try:
            return await asyncio.to_thread(method, *args)
        except ValueError as exc:
            raise ValueError(hide_paths(str(exc), {"the registry": self.registry.root})) from None

    @staticmethod
    def _change_doc(action: str, change: CurrentChange) -> ClipDoc:
        tags = {"action": action, "model_version": change.version, "previous_version": change.previous}
        return ClipDoc(id=change.version, model_version=change.version, tags={**tags, "changed": change.changed})

    @requests(on="/models")
    async def list_models(
        self, docs: DocList[ClipDoc], parameters: Optional[dict] = None, **kwargs: Any
    ) -> DocList[ClipDoc]:
        """One doc per published version (``id`` the version, ``tags`` its summary), in natural order."""
        request_parameters(parameters, (), "/models")
        summaries = await asyncio.to_thread(self.registry.summaries)
        for summary in summaries:  # the error of a version that cannot be read, without the server's paths
            if "error" in summary:
                summary["error"] = hide_paths(summary["error"], {"the registry": self.registry.root})
        return DocList[ClipDoc]([ClipDoc(id=s["version"], model_version=s["version"], tags=s) for s in summaries])

    @requests(on="/models/promote")
    async def promote_model(
        self, docs: DocList[ClipDoc], parameters: Optional[dict] = None, **kwargs: Any
    ) -> DocList[ClipDoc]:
        """Make ``parameters['version']`` CURRENT (checked first); answers one doc named for the new CURRENT."""
        params = request_parameters(parameters, ("version",), "/models/promote")
        version = params.get("version")
        if not isinstance(version, str) or not version.strip():
            raise ValueError(
                f"/models/promote needs parameters['version'], a published version "
                f"({self.registry.versions()}), got {version!r}"
            )
        change = await self._registry_call(self.registry.promote, version.strip())
        self.metrics.model_version(change.version)
        return DocList[ClipDoc]([self._change_doc("promote", change)])

    @requests(on="/models/rollback")
    async def rollback_model(
        self, docs: DocList[ClipDoc], parameters: Optional[dict] = None, **kwargs: Any
    ) -> DocList[ClipDoc]:
        """Make the version before CURRENT CURRENT (see :meth:`Registry.rollback`); answers one doc named for it."""
        request_parameters(parameters, (), "/models/rollback")
        change = await self._registry_call(self.registry.rollback)
        self.metrics.model_version(change.version)
        return DocList[ClipDoc]([self._change_doc("rollback", change)])

    @requests(on="/models/prune")
    async def prune_models(
        self, docs: DocList[ClipDoc], parameters: Optional[dict] = None, **kwargs: Any
    ) -> DocList[ClipDoc]:
        """Delete all but the newest ``parameters['keep']`` versions, never CURRENT."""
        params = request_parameters(parameters, ("keep",), "/models/prune")
        if "keep" not in params:
            raise ValueError("/models/prune needs parameters['keep'], how many of the newest versions to keep")
        keep = int_parameter("keep", params["keep"])
        deleted = await self._registry_call(self.registry.prune, keep)
        tags = {"deleted": deleted, "kept": self.registry.versions()}
        return DocList[ClipDoc]([ClipDoc(id="models-prune", model_version=self.registry.current(), tags=tags)])
