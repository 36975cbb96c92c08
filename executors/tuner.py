"""CLIPTuner: fine-tune the CURRENT model on the user's pairs, prove the gain, export it and publish it.

Endpoints:

- ``/train``: the pairs are the docs of the request (each with text and an image as tensor, blob or uri;
  docs that share ``tags['image_id']`` are captions of one image), or a PAIRS file named by
  ``parameters['data']`` (a CSV ``image,caption`` or a Karpathy-style JSON, relative to the data root,
  ``<workspace>/data`` by default; paths that leave it are refused). A doc's ``uri`` and every image path inside
  a PAIRS file must lie under the image roots (``uri_roots``, default ``<workspace>/data``, symlinks resolved;
  http(s) only for ``allowed_hosts``), as for every endpoint (:class:`cliptuner.access.UriPolicy`). At most
  ``max_pairs`` docs per request, ``max_text_chars`` per caption, ``max_blob_bytes`` per image and
  ``max_request_bytes`` in all, checked before anything is decoded. Parameters (numbers may arrive as floats):

  - the training options, by field name, with defaults and help from :class:`cliptuner.config.TrainConfig`:
    every field declared ``request`` there (``TRAIN_OPTIONS``: ``epochs``, ``learning_rate``, ``batch_size``,
    ``beta1``, ``keep_best``, ``wiseft_alpha`` …; not ``device``, ``num_workers``, ``log_every``, which the
    service sets). ``seed`` also seeds the held-out split;
  - ``eval_fraction`` (:class:`cliptuner.config.EvalConfig`): share of images held out when no eval data is given;
  - the sources (``SOURCE_OPTIONS``), files under the data root: ``data`` (PAIRS, instead of docs),
    ``eval_data`` (held-out PAIRS, instead of a held-out fraction), ``general_data`` (off-domain PAIRS the
    WiSE-FT sweep also reports on), ``config`` (a YAML or JSON mapping of the option names above to values;
    parameters given with the request override it).

  Any other parameter is refused by name. The model starts from the CURRENT version's ``checkpoint.pt``, so
  successive runs continue from the last tuned version. Recall@k is measured before and after on the same
  held-out pairs, the tuned model is exported to ONNX and published as the next version (CURRENT). The response
  is ONE doc, not the training images: ``ClipDoc(id='train-report', model_version=<new>, tags={'report': {...}})``
  where the report holds ``model_version``, ``parent_version``, ``before`` and ``after``
  (``t2i_r1 t2i_r5 t2i_r10 i2t_r1 i2t_r5 i2t_r10 mean_recall``), ``epochs``, ``epoch_losses``,
  ``samples_per_s``, ``split``, ``config`` and timings. In the Flow the encoder and the indexer then move to the
  new version before the client gets this answer.

  Training runs in a worker thread, so this Executor keeps forwarding ``/encode``, ``/search``… meanwhile. One
  run at a time: a second ``/train`` while one runs is refused with an error. Send a request's pairs in one
  request (``Client.post(..., request_size=len(docs))``): the client otherwise splits them into several
  ``/train`` requests.

  A run that fails — bad pairs, an undecodable image, a non-finite loss, a stop, any error up to and including
  the publish — publishes nothing: CURRENT, and so what the encoder and the indexer serve, stays as it was, and
  the run's half-written export is removed. The request raises :class:`TrainingFailed` (:class:`TrainingInputError`,
  also a ``ValueError``, when the input was at fault) naming the run, the phase and the cause, and ``/status``
  shows ``training: {state: failed, run_id, phase, error}``.
- ``/status``: appends ``ClipDoc(id='status-tuner', model_version=CURRENT, tags={'training': {...}, ...})``;
  while a run is going, ``training`` holds its phase and the last progress event (epoch, step/total_steps,
  loss, samples/s, eta_s).
- anything else: passes the docs on unchanged.

On a fresh workspace the tuner publishes the base model (``model`` + ``pretrained``) as the first version.
"""

import asyncio
import dataclasses
import json
import os
import logging
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from docarray import DocList
from jina import Executor, requests

from cliptuner.bootstrap import ensure_current
from cliptuner.config import EvalConfig, ModelSpec, TrainConfig, from_mapping
from cliptuner.access import RemoteImage
from cliptuner.content import image_source
from cliptuner.data import DataError, PairSet, from_memory, load_split, train_and_held_out
from cliptuner.limits import RequestLimits
from cliptuner.options import read_options_file, request_names
from cliptuner.registry import Registry

from .content import check_request
from .options import DATA_SUBDIR, RUNS_SUBDIR, base_spec, request_parameters, resolve_workspace, setting, uri_policy
from .schemas import ClipDoc

logger = logging.getLogger(__name__)

TRAIN_OPTIONS = request_names(TrainConfig)  # the TrainConfig fields a request may set
EVAL_OPTIONS = request_names(EvalConfig)  # eval_fraction
SOURCE_OPTIONS = ("data", "eval_data", "general_data", "config")  # files under the data root
REPORT_ID = "train-report"


class TrainingBusy(RuntimeError):
    """A /train request arrived while another run is going."""


class TrainingFailed(RuntimeError):
    """A /train run failed: nothing was published, CURRENT names what it named before.

    The message names the run, the phase (``preparing``, ``loading``, ``evaluating``, ``training``,
    ``exporting``, ``publishing``) and the cause, which is also the exception's ``__cause__``.

    Attributes:
        run_id: the run, as ``/status`` shows it.
        phase: what the run was doing when it failed.
    """

    def __init__(self, message: str, run_id: Optional[str] = None, phase: Optional[str] = None) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.phase = phase


class TrainingInputError(TrainingFailed, ValueError):
    """A /train run failed on its input (bad pairs, an undecodable image, too few images…)."""


@dataclasses.dataclass
class TrainRequest:
    """A validated /train request: what to train on and how."""

    cfg: TrainConfig
    eval_cfg: EvalConfig
    data: Optional[Path]  # PAIRS file, or None for the request's docs
    eval_data: Optional[Path]  # held-out PAIRS file, or None for a held-out fraction
    general_data: Optional[Path] = None  # off-domain PAIRS file for the WiSE-FT sweep


def _torch_device(device: Optional[str]) -> str:
    import torch

    device = setting(device) or "auto"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class CLIPTuner(Executor):
    """Fine-tunes the CURRENT model version on pairs and publishes the tuned one.

    Args:
        model: base OpenCLIP arch or bundled config, published on a fresh registry (``$CLIPTUNER_MODEL``).
        pretrained: its pretrained tag or local checkpoint; None for random init (``$CLIPTUNER_PRETRAINED``).
        device: where to train: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:N`` (``$CLIPTUNER_DEVICE``).
        models_dir: the registry; default ``<workspace>/models``.
        data_root: folder that ``parameters['data']``/``['eval_data']`` are relative to; default ``<workspace>/data``.
        runs_dir: where each run keeps its ``report.json``; default ``<workspace>/runs``.
        bootstrap: publish the base version when the registry is empty (else wait for one).
        bootstrap_timeout: seconds to wait for a version published by another service.
        torch_threads: CPU threads torch may use; None leaves torch's default.
        uri_roots: folders that a doc's ``uri`` and the image paths of a PAIRS file must lie under; unset:
            ``$CLIPTUNER_URI_ROOTS``, else ``<workspace>/data`` (see :func:`executors.options.uri_policy`).
        allowed_hosts: http(s) hosts a doc's ``uri`` may name; unset: ``$CLIPTUNER_ALLOWED_HOSTS``, else none.
        max_pairs: most pairs one request may carry (guards memory before anything is decoded).
        max_text_chars: most characters in one caption.
        max_blob_bytes: most bytes of one encoded image (blob, data: URI, http(s) body).
        max_request_bytes: most bytes of blobs, tensors, uris and fetched http(s) bodies in one request.

    Raises:
        ValueError: no workspace, a base model that cannot be built, or a bad uri or limit setting.
    """

    def __init__(
        self,
        model: Optional[str] = None,
        pretrained: Optional[str] = None,
        device: Optional[str] = None,
        models_dir: Optional[str] = None,
        data_root: Optional[str] = None,
        runs_dir: Optional[str] = None,
        bootstrap: bool = True,
        bootstrap_timeout: float = 600.0,
        torch_threads: Optional[int] = None,
        uri_roots: Optional[Any] = None,
        allowed_hosts: Optional[Any] = None,
        max_pairs: int = RequestLimits.max_pairs,
        max_text_chars: int = RequestLimits.max_text_chars,
        max_blob_bytes: int = RequestLimits.max_blob_bytes,
        max_request_bytes: int = RequestLimits.max_request_bytes,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        workspace = resolve_workspace(self, models_dir, kwargs.get("workspace"))
        self.registry: Registry = workspace.registry
        root = workspace.root or self.registry.root.parent
        self.data_root = Path(setting(data_root) or root / DATA_SUBDIR).expanduser().resolve()
        self.runs_dir = Path(setting(runs_dir) or root / RUNS_SUBDIR).expanduser().resolve()
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.base = base_spec(model, pretrained)
        self.device = _torch_device(device)
        self.policy = uri_policy(workspace, uri_roots, allowed_hosts)
        self.limits = RequestLimits(max_pairs=max_pairs, max_text_chars=max_text_chars, max_blob_bytes=max_blob_bytes,
                                    max_request_bytes=max_request_bytes)
        if setting(torch_threads):
            import torch

            torch.set_num_threads(int(torch_threads))
        self.registry.clean_temps()  # a publisher: remove what a crashed publish left behind
        ensure_current(self.registry, self.base if bootstrap else None, timeout=float(bootstrap_timeout))
        self._run_lock = threading.Lock()  # one training run at a time
        self._stop = threading.Event()
        self._progress: dict[str, Any] = {"state": "idle"}
        self._last_report: Optional[dict] = None
        logger.info("CLIPTuner: CURRENT %s in %s, training on %s, data root %s", self.registry.current(),
                    self.registry.root, self.device, self.data_root)

    # -- request parsing -----------------------------------------------------------------------------------------
    def _data_path(self, name: str, value: Any) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"parameter {name!r} must name a PAIRS file under the data root, got {value!r}")
        path = Path(value).expanduser()
        path = (path if path.is_absolute() else self.data_root / path).resolve()
        if not path.is_relative_to(self.data_root):  # the client never learns where the data root is
            raise ValueError(f"parameter {name!r}: {value!r} is outside the data root")
        if not path.is_file():
            raise ValueError(f"parameter {name!r}: no file {value!r} under the data root")
        return path

    def _load_general(self, path: Path) -> PairSet:
        """The off-domain pairs of the WiSE-FT sweep, their image paths under the image policy like the others."""
        try:
            return load_split(path, "test", resolve_image=self.policy.local_path)
        except DataError as exc:
            raise DataError(self._relative(str(exc))) from None

    def _relative(self, message: str) -> str:
        """``message`` with the server's data-root prefix taken out of the paths it names."""
        return message.replace(str(self.data_root) + os.sep, "").replace(str(self.data_root), "<data root>")

    def parse_request(self, parameters: Optional[dict]) -> TrainRequest:
        """Validate /train parameters into configs.

        ``parameters['config']`` names a YAML/JSON file of option values under the data root; the request's own
        parameters override it.

        Raises:
            ValueError: an unknown parameter or config-file option (named), a bad value, or a data path outside
                the data root.
        """
        params = request_parameters(parameters, TRAIN_OPTIONS + EVAL_OPTIONS + SOURCE_OPTIONS, "/train")
        if "config" in params:
            name = params.pop("config")
            params = {**read_options_file(self._data_path("config", name), TRAIN_OPTIONS + EVAL_OPTIONS,
                                          label=str(name)), **params}
        train_values = {k: v for k, v in params.items() if k in TRAIN_OPTIONS}
        cfg = from_mapping(TrainConfig, {**train_values, "device": self.device, "log_every": 1})
        eval_values = {k: v for k, v in params.items() if k in EVAL_OPTIONS}
        eval_cfg = from_mapping(EvalConfig, {**eval_values, "split_seed": cfg.seed})
        data = self._data_path("data", params["data"]) if "data" in params else None
        eval_data = self._data_path("eval_data", params["eval_data"]) if "eval_data" in params else None
        general = self._data_path("general_data", params["general_data"]) if "general_data" in params else None
        return TrainRequest(cfg=cfg, eval_cfg=eval_cfg, data=data, eval_data=eval_data, general_data=general)

    def pairs_from_docs(self, docs: DocList[ClipDoc]) -> PairSet:
        """The request's docs as pairs (docs sharing ``tags['image_id']`` are captions of one image).

        An http(s) image is fetched here (once per image), its body counted in the request's bytes.

        Raises:
            ValueError: a request over the limits, a doc without text or without an image, a bad image field or a
                uri the policy refuses (names the doc id), before anything is decoded.
        """
        total = check_request(docs, self.limits, "pairs", self.limits.max_pairs,
                              "; write them to a PAIRS file under the data root and pass parameters['data']")
        images, captions, image_ids = [], [], []
        for doc in docs:
            name = f"doc {doc.id!r}"
            image = image_source(name, doc.tensor, doc.blob, doc.uri, self.policy, self.limits.image_limits)
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
            raise ValueError("/train needs pairs: docs with text and an image, or parameters['data'] naming a "
                             "PAIRS file under the data root")
        source = str(request.data.relative_to(self.data_root)) if request.data is not None else "request docs"
        data = self.pairs_from_docs(docs) if request.data is None else request.data
        try:
            train, held_out = train_and_held_out(data, request.eval_data, request.eval_cfg.eval_fraction,
                                                 request.eval_cfg.split_seed, resolve_image=self.policy.local_path)
        except DataError as exc:  # names files and rows by their paths under the data root only
            raise DataError(self._relative(str(exc))) from None
        if request.eval_data is not None:
            held_out_from = str(request.eval_data.relative_to(self.data_root))
        elif request.data is not None and request.data.suffix.lower() == ".json":
            held_out_from = f"{source} (test split)"
        else:
            held_out_from = f"{request.eval_cfg.eval_fraction:g} of {source} (seed {request.eval_cfg.split_seed})"
        if train.num_images < request.cfg.batch_size:
            raise ValueError(f"{train.num_images} training images is fewer than batch_size {request.cfg.batch_size}: "
                             "send more pairs or lower batch_size")
        return train, held_out, {"source": source, "held_out": held_out_from}

    # -- the run, in a worker thread -----------------------------------------------------------------------------
    def _on_event(self, event: dict) -> None:
        kind = event.get("event")
        update: dict[str, Any] = {"last_event": kind, "updated_at": time.time()}
        if kind == "before":
            update.update(phase="training", before=event["metrics"])
        elif kind in ("step", "epoch"):
            update.update({k: event[k] for k in ("epoch", "epochs", "step", "total_steps", "loss", "lr",
                                                 "samples_per_s", "eta_s") if k in event})
        elif kind == "eval":
            update.update(phase="training", last_eval={"epoch": event["epoch"], **event["metrics"]})
        elif kind == "end":
            update.update(phase="evaluating")
        elif kind == "after":
            update.update(phase="exporting", after=event["metrics"])
        self._progress = {**self._progress, **update}  # one reference swap: /status reads a consistent dict

    def _parent_spec(self, parent: str) -> tuple[ModelSpec, str]:
        manifest = self.registry.manifest(parent)
        checkpoint = manifest.checkpoint_path(self.registry.path(parent))
        if checkpoint is not None:
            spec = ModelSpec(arch=manifest.arch, pretrained=str(checkpoint), force_quick_gelu=manifest.force_quick_gelu)
            return spec, f"version {parent}"
        logger.warning("model version %s has no checkpoint; training starts from the base model %s", parent,
                       self.base.arch)
        return self.base, f"base model {self.base.arch} (version {parent} has no checkpoint)"

    def _set_phase(self, phase: str) -> None:
        self._progress = {**self._progress, "phase": phase}  # one reference swap, as in _on_event

    def _train_and_export(self, request: TrainRequest, docs: DocList[ClipDoc], model_dir: Path, parent: str,
                          started: float) -> dict:
        """Split, train and evaluate, then export the tuned model to ``model_dir``; returns the report (no version).

        Raises:
            TrainingStopped: a stop was asked for (polled between steps, and once more after the export).
        """
        train, held_out, sources = self.split_pairs(request, docs)
        from cliptuner.export import export_model_dir
        from cliptuner.models import load_model
        from cliptuner.train import TrainingStopped, finetune, seed_everything

        self._set_phase("loading")
        spec, init = self._parent_spec(parent)
        seed_everything(request.cfg.seed)
        bundle = load_model(spec)
        general = None if request.general_data is None else self._load_general(request.general_data)
        self._set_phase("evaluating")
        result = finetune(bundle, train, held_out, request.cfg, request.eval_cfg, on_event=self._on_event,
                          should_stop=self._stop.is_set, general_pairs=general)
        report = {"model_version": None, "parent_version": parent, "init": init, **result}
        report["split"] = {**result["split"], **sources}
        report["wall_seconds"] = round(time.time() - started, 3)
        bundle.model.cpu()
        self._set_phase("exporting")
        export_model_dir(bundle, model_dir, checkpoint=True,
                         metadata_extra={"parent_version": parent, "report": report})
        if self._stop.is_set():  # asked for after the last step: the tuned model is dropped, not published
            raise TrainingStopped("a stop was asked for after training; the tuned model is not published")
        return report

    def _failure(self, run_id: str, exc: BaseException) -> TrainingFailed:
        """Record a failed run in ``/status`` and build the error the client gets (phase and cause named)."""
        phase = self._progress.get("phase") or "preparing"
        cause = f"{type(exc).__name__}: {exc}"
        self._progress = {**self._progress, "state": "failed", "phase": phase, "error": cause,
                          "finished_at": time.time()}
        message = (f"/train run {run_id} failed while {phase}: {cause} (nothing was published; CURRENT is still "
                   f"{self.registry.current()})")
        logger.error("%s", message)
        kind = TrainingInputError if isinstance(exc, ValueError) else TrainingFailed
        return kind(message, run_id=run_id, phase=phase)

    def _run(self, request: TrainRequest, docs: DocList[ClipDoc]) -> dict:
        """Split, train, evaluate, export and publish; releases the run lock when done.

        Only a run that got through every phase, with no stop asked for, publishes. A run that fails (bad pairs,
        an undecodable image, a non-finite loss, a stop, any error up to and including the publish) leaves CURRENT
        and the registry as they were, removes its run directory (the half-written export), shows
        ``state: failed`` with ``phase`` and ``error`` in ``/status``, and raises.

        Raises:
            TrainingInputError: the run failed on a ``ValueError`` (bad input): a ``TrainingFailed`` and a
                ``ValueError``.
            TrainingFailed: the run failed on any other error; the message names the run, the phase and the cause
                (also its ``__cause__``).
        """
        run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        run_dir = self.runs_dir / run_id
        started = time.time()
        try:
            parent = self.registry.current()
            self._progress = {"state": "running", "phase": "preparing", "run_id": run_id, "started_at": started,
                              "parent_version": parent}
            try:
                report = self._train_and_export(request, docs, run_dir / "model", parent, started)
                self._set_phase("publishing")
                version = self.registry.publish(run_dir / "model", move=True)
            except Exception as exc:
                failure = self._failure(run_id, exc)
                shutil.rmtree(run_dir, ignore_errors=True)
                raise failure from exc
            except BaseException as exc:  # KeyboardInterrupt, SystemExit: recorded, then on their way unchanged
                self._failure(run_id, exc)
                shutil.rmtree(run_dir, ignore_errors=True)
                raise
            # published: the run has succeeded, whatever happens to its report file
            report["model_version"] = version
            report["wall_seconds"] = round(time.time() - started, 3)
            try:
                (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            except OSError as exc:  # the report also lives in the version's model.json
                logger.warning("run %s published %s but could not write its report.json: %s", run_id, version, exc)
            self._last_report = report
            self._progress = {"state": "done", "run_id": run_id, "model_version": version, "parent_version": parent,
                              "finished_at": time.time(), "wall_seconds": report["wall_seconds"]}
            logger.info("run %s published %s: t2i R@5 %.3f → %.3f", run_id, version, report["before"]["t2i_r5"],
                        report["after"]["t2i_r5"])
            return report
        finally:
            self._run_lock.release()

    def status(self) -> dict:
        """CURRENT version, the training state (progress while running) and the last run's headline numbers."""
        last = None
        if self._last_report is not None:
            r = self._last_report
            last = {"model_version": r["model_version"], "parent_version": r["parent_version"],
                    "before": r["before"], "after": r["after"], "epochs": r["epochs"]}
        return {"executor": "CLIPTuner", "model_version": self.registry.current(), "training": dict(self._progress),
                "last_report": last, "device": self.device, "data_root": str(self.data_root)}

    def close(self) -> None:
        """Ask a running training to stop at its next step."""
        self._stop.set()
        super().close()

    # -- endpoints -----------------------------------------------------------------------------------------------
    @requests(on="/train")
    async def train(self, docs: DocList[ClipDoc], parameters: Optional[dict] = None,
                    **kwargs: Any) -> DocList[ClipDoc]:
        """Fine-tune on the request's pairs (or ``parameters['data']``); returns the one report doc."""
        request = self.parse_request(parameters)
        if not self._run_lock.acquire(blocking=False):
            progress = self._progress
            raise TrainingBusy(
                f"a /train run is already going (run {progress.get('run_id')}, phase {progress.get('phase')}, "
                f"epoch {progress.get('epoch')}/{progress.get('epochs')}); one run at a time: poll /status and "
                "send this one when it is done")
        try:
            future = asyncio.get_running_loop().run_in_executor(None, self._run, request, docs)
        except BaseException:
            self._run_lock.release()
            raise
        report = await future  # _run releases the lock when it ends, even if this request is cancelled meanwhile
        return DocList[ClipDoc]([ClipDoc(id=REPORT_ID, model_version=report["model_version"],
                                         tags={"report": report})])

    @requests(on="/status")
    async def report_status(self, docs: DocList[ClipDoc], **kwargs: Any) -> DocList[ClipDoc]:
        """Append the tuner's status doc."""
        state = self.status()
        docs.append(ClipDoc(id="status-tuner", model_version=state["model_version"], tags=state))
        return docs

    @requests
    async def passthrough(self, docs: DocList[ClipDoc], **kwargs: Any) -> DocList[ClipDoc]:
        """Endpoints of the encoder and the indexer: docs pass unchanged."""
        return docs
