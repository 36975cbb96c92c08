"""CLIPTuner: fine-tune the CURRENT model on the user's pairs, prove the gain, export it and publish it.

Endpoints:

- ``/train``: the pairs are the docs of the request (each with text and an image as tensor, blob or uri;
  docs that share ``tags['image_id']`` are captions of one image), or a PAIRS file named by
  ``parameters['data']`` (a CSV ``image,caption`` or a Karpathy-style JSON, relative to the data root,
  ``<workspace>/data`` by default; paths that leave it are refused). A doc's ``uri`` and every image path inside
  a PAIRS file must lie under the image roots (``uri_roots``, default ``<workspace>/data``, symlinks resolved;
  http(s) only for ``allowed_hosts``), as for every endpoint (:class:`cliptuner.serve.access.UriPolicy`). At most
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
    parameters given with the request override it);
  - ``wait`` (a bool, default True): False answers at once, once the run's training process has started, with
    ``ClipDoc(id='train-run', tags={'run_id': ..., 'state': 'running'})``; poll ``/status`` for its progress and
    its end. The run publishes when it ends, and the encoder and the indexer move to the new version through their
    registry watchers (not before this answer, as with a synchronous run).

  Any other parameter is refused by name. The model starts from the CURRENT version's ``checkpoint.pt``, so
  successive runs continue from the last tuned version. Recall@k is measured before and after on the same
  held-out pairs, the tuned model is exported to ONNX and published as the next version (CURRENT). The response
  is ONE doc, not the training images: ``ClipDoc(id='train-report', model_version=<new>, tags={'report': {...}})``
  where the report holds ``model_version``, ``parent_version``, ``before`` and ``after``
  (``t2i_r1 t2i_r5 t2i_r10 i2t_r1 i2t_r5 i2t_r10 mean_recall``), ``epochs``, ``epoch_losses``,
  ``samples_per_s``, ``split``, ``config`` and timings. In the Flow the encoder and the indexer then move to the
  new version before the client gets this answer.

  The tuner checks the request (parameters, pairs, uri policy, limits) and makes the split itself, then writes
  what training needs into the run directory ``<runs_dir>/<run_id>/inputs`` (the training and held-out pairs as
  PAIRS CSVs, the request's images as files, the options as a ``--config`` JSON) and trains in a child process
  of its own process group, through the same code as the CLI: ``python -m cliptuner.cli train --data ...
  --eval-data ... --pretrained <CURRENT's checkpoint.pt> --out <run>/model --events <run>/events.jsonl``, under
  ``python -m torch.distributed.run --standalone --nproc_per_node N`` with ``processes`` = N > 1, at a lower CPU
  priority than serving (``train_niceness``, default +10) with ``torch_threads`` threads each (default: one CPU
  left to serving), so that searches stay fast while it trains (``benchmarks/train_load.py``). The tuner
  follows the child's events file into ``/status`` and, when the child has exported the tuned model, publishes
  it (the tuner alone writes the registry). This process never imports torch for a run, and a crash or an OOM
  kill of training leaves it serving. One run at a time: a second ``/train`` while one runs is refused with an
  error. Send a request's pairs in one request (``Client.post(..., request_size=len(docs))``): the client
  otherwise splits them into several ``/train`` requests.

  A run that fails — bad pairs, an undecodable image, a non-finite loss, a training process that exits with an
  error or is killed, a cancel, any error up to and including the publish — publishes nothing: CURRENT, and so
  what the encoder and the indexer serve, stays as it was, and the run's directory (with its half-written export)
  is removed. The request raises :class:`TrainingFailed` (:class:`TrainingInputError`, also a ``ValueError``, when
  the input was at fault: ``cliptuner train`` exits with 2) naming the run, the phase and the cause (for a child
  that failed, the end of its output, or the signal that killed it), and ``/status`` shows
  ``training: {state: failed, run_id, phase, error}`` (``state: cancelled`` after a cancel).
- ``/train/cancel``: ``parameters={'run_id': ...}`` (optional; when given it must name the run going) cancels the
  run going: its training process group gets SIGTERM, then SIGKILL after ``STOP_GRACE_S``; nothing is published;
  a synchronous ``/train`` waiting on it fails with a ``TrainingCancelled`` cause. Answers once the run has ended
  with ``ClipDoc(id='train-cancel', tags={'run_id', 'state', 'phase'})`` (``state`` is ``done`` when the run was
  already publishing). With no run going, or another run id, it raises :class:`TrainingNotRunning`.
- ``/status``: appends ``ClipDoc(id='status-tuner', model_version=CURRENT, tags={'training': {...}, ...})``;
  while a run is going, ``training`` holds its phase, the training process's ``pid`` and the last progress event
  (epoch, step/total_steps, loss, samples/s, eta_s).
- ``/models``: the registry's versions, one doc per version in natural order: ``ClipDoc(id=<version>,
  model_version=<version>, tags=<summary>)``, the summary of :meth:`cliptuner.model.registry.Registry.summaries`
  (``current``, ``created_at``, ``parent_version``, ``arch``, ``report`` with ``epochs`` and the before/after
  ``t2i_r5 i2t_r5 mean_recall``, or ``error`` for a version that cannot be read). No parameters.
- ``/models/promote``: ``parameters={'version': 'v3'}`` makes a published version CURRENT once its manifest and
  files check out; ``/models/rollback`` (no parameters) makes the version before CURRENT CURRENT: its
  ``parent_version`` while still published, else the one before it in natural order
  (:meth:`~cliptuner.model.registry.Registry.rollback`). Both answer ``ClipDoc(id=<new CURRENT>, tags={'action',
  'model_version', 'previous_version', 'changed'})``; in the Flow the answer then passes the encoder and the
  indexer, which move to the new CURRENT (the indexer re-embedding what it stores) before it goes on, as after a
  /train. A /train run that is going meanwhile still publishes its version as CURRENT when it ends.
- ``/models/prune``: ``parameters={'keep': K}`` deletes all but the newest K versions, never CURRENT; answers
  ``ClipDoc(id='models-prune', tags={'deleted': [...], 'kept': [...]})``. With ``keep_versions`` set, the tuner
  prunes the same way after each publish (the report's ``pruned_versions`` names what went).
- nothing else: the tuner binds no default handler, so Jina's gateway sends it only the requests of the endpoints
  above. ``/encode``, ``/index``, ``/search`` and ``/delete`` go from the gateway straight to the encoder and the
  indexer: the query path never passes through the training process.

On a fresh workspace the tuner publishes the base model (``model`` + ``pretrained``) as the first version.
"""

import asyncio
import contextlib
import csv
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
from docarray import DocList
from jina import Executor, requests
from PIL import Image

import cliptuner
from cliptuner.config import EvalConfig, ModelSpec, TrainConfig, from_mapping
from cliptuner.extras import require_train
from cliptuner.model.manifest import ModelManifest
from cliptuner.model.registry import CurrentChange, Registry
from cliptuner.options import cli_names, read_options_file, request_names
from cliptuner.serve.access import RemoteImage
from cliptuner.serve.bootstrap import ensure_current
from cliptuner.serve.content import image_source
from cliptuner.serve.limits import RequestLimits
from cliptuner.train.data import DataError, PairSet, from_memory, load_split, train_and_held_out

from .content import check_request, doc_blob, doc_uri
from .metrics import Metrics
from .options import (
    DATA_SUBDIR,
    RUNS_SUBDIR,
    base_spec,
    int_parameter,
    int_setting,
    request_parameters,
    resolve_workspace,
    setting,
    uri_policy,
)
from .schemas import ClipDoc

logger = logging.getLogger(__name__)

TRAIN_OPTIONS = request_names(TrainConfig)  # the TrainConfig fields a request may set
EVAL_OPTIONS = request_names(EvalConfig)  # eval_fraction
SOURCE_OPTIONS = ("data", "eval_data", "general_data", "config")  # files under the data root
RUN_OPTIONS = ("wait",)  # how the request waits for its run
REPORT_ID = "train-report"
RUN_DOC_ID = "train-run"  # the answer of a /train with wait=False
CANCEL_DOC_ID = "train-cancel"  # the answer of /train/cancel

# In a run's directory <runs_dir>/<run_id>/: what the training process reads, writes and says.
INPUTS_SUBDIR = "inputs"  # the pairs as PAIRS CSVs (+ the request's images), the options as --config JSON
MODEL_SUBDIR = "model"  # the tuned model version, exported by the training process (--out)
EVENTS_FILE = "events.jsonl"  # its training events, one JSON line each (--events), tailed into /status
LOG_FILE = "train.log"  # its stdout and stderr; the end of it names the cause when it fails
PROCESS_FILE = "process.json"  # {"pgid": ...} of its process group, for a tuner that restarts after a crash
REPORT_FILE = "report.json"  # written when the run has published: a run directory without one is unfinished
STOP_GRACE_S = 10.0  # seconds between SIGTERM and SIGKILL when a run's process group is stopped
POLL_S = 0.2  # how often a run's thread reads new events and looks at the training process
TORCH_THREADS_ENV = "CLIPTUNER_TORCH_THREADS"  # torch_threads, when the setting is not given
TRAIN_NICENESS_ENV = "CLIPTUNER_TRAIN_NICENESS"  # train_niceness, when the setting is not given
DEFAULT_TRAIN_NICENESS = 10  # added to the tuner's nice value for its training processes: serving comes first
MAX_NICENESS = 19  # the lowest CPU priority Linux has
NICE = shutil.which("nice")  # runs the training command at a lower priority, inherited by all its threads
CLI_ERROR = "cliptuner train: error: "  # how `cliptuner train` names bad input, exiting with INPUT_ERROR_EXIT
INPUT_ERROR_EXIT = 2


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
    wait: bool = True  # answer after the run (the report), or at once (the run id)


class TrainingCancelled(RuntimeError):
    """A run was stopped before it published: cancelled through ``/train/cancel``, or the tuner closing."""


class TrainingNotRunning(ValueError):
    """``/train/cancel`` found no run to cancel: none is going, or the run id names another."""


class TrainingProcessError(RuntimeError):
    """The training process ended without a tuned model: a non-zero exit, or killed by a signal.

    Attributes:
        returncode: its exit status; negative: the number of the signal that killed it.
    """

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


class TrainingProcessInputError(TrainingProcessError, ValueError):
    """The training process refused its input (``cliptuner train`` exits with 2: an undecodable image…)."""


def hide_paths(message: str, roots: dict[str, Path]) -> str:
    """``message`` as a client may read it: a path under one of ``roots`` shown relative to it, the root itself (quoted
    or not) by its label. Roots are taken in order, so name a folder before a folder that holds it."""
    for label, root in roots.items():
        root = str(root)
        message = message.replace(repr(root), label).replace(root + os.sep, "").replace(root, label)
    return message


def _safe_name(text: str, limit: int = 48) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:limit].strip("._") or "image"


def write_pairs_csv(pairs: PairSet, path: Path) -> Path:
    """Write ``pairs`` as a PAIRS CSV that :func:`cliptuner.train.data.load_csv` reads back as the same pairs.

    Rows follow the pairs' order (the images then come in the set's order). Images held in memory are written
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
        writer.writerow(["image", "caption"])
        for caption, image_i in zip(pairs.captions, pairs.image_index):
            writer.writerow([names[image_i], caption])
    return path


def _process_cause(log: str, returncode: int) -> str:
    """Why a training process ended with ``returncode``, from its exit status and the end of its output ``log``.

    A signal is named; else ``cliptuner train``'s one-line error for bad input, else the exception of the first
    Python traceback (under torchrun, the worker's, before torchrun's own summary), else the last lines.
    """
    if returncode < 0:
        number = -returncode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown signal"
        hint = " (out of memory, or stopped from outside?)" if number == signal.SIGKILL else ""
        return f"the training process was killed by signal {number} ({name}){hint}"
    if CLI_ERROR in log:
        detail = log[log.rindex(CLI_ERROR) + len(CLI_ERROR) :].strip()
    elif "Traceback (most recent call last):" in log:
        block = log[log.index("Traceback (most recent call last):") :].splitlines()[1:]
        lines = []
        for line in block:
            if not lines and (not line.strip() or line[0].isspace()):
                continue  # the frames of the traceback
            if lines and (line.startswith(("Traceback", "During handling", "The above exception")) or not line.strip()):
                break
            lines.append(line)
        detail = "\n".join(lines).strip()
    else:
        detail = "\n".join(line for line in log.strip().splitlines()[-5:] if line.strip())
    detail = detail[-2000:] or "no output"
    return f"the training process exited with code {returncode}: {detail}"


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask: a container's cpuset, ``taskset``), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_torch_threads(processes: int, cpus: Optional[int] = None) -> int:
    """Threads for each of ``processes`` training processes that leave one CPU to serving: ``(cpus - 1) //
    processes``, at least 1."""
    cpus = cpu_count() if cpus is None else cpus
    return max(1, (cpus - 1) // processes)


def _group_works_in(pgid: int, run_dir: Path) -> bool:
    """True when process ``pgid`` is alive and its working directory is ``run_dir``: the training process a run
    started (a pid reused since by another process does not work there)."""
    try:
        return Path(os.readlink(f"/proc/{pgid}/cwd")) == run_dir
    except OSError:  # gone, not ours, or no /proc (then nothing can be told, and nothing is killed)
        return False


def clean_unfinished_runs(runs_dir: Path, wait_s: float = STOP_GRACE_S) -> list[str]:
    """Remove the runs a previous tuner process left unfinished, ending their training processes first.

    A tuner that was killed (SIGKILL, OOM, a node lost) cannot stop its training process group, which lives in a
    session of its own, nor remove the run directory. At the next start, every run directory without a
    report is such a leftover: its process group, when it still runs in that directory, gets SIGKILL (nothing it
    would produce can be published any more), and the directory is removed. One tuner per workspace.

    Returns:
        The run ids removed.
    """
    removed = []
    for run_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        if (run_dir / REPORT_FILE).exists():
            continue
        try:
            pgid = int(json.loads((run_dir / PROCESS_FILE).read_text(encoding="utf-8"))["pgid"])
        except (OSError, ValueError, KeyError, TypeError):
            pgid = None
        if pgid is not None and _group_works_in(pgid, run_dir.resolve()):
            logger.warning(
                "run %s: its training process group %d outlived the tuner that started it; killing it",
                run_dir.name,
                pgid,
            )
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            deadline = time.monotonic() + wait_s
            while _group_works_in(pgid, run_dir.resolve()) and time.monotonic() < deadline:
                time.sleep(0.05)
        shutil.rmtree(run_dir, ignore_errors=True)
        logger.warning("removed unfinished run %s (left by a tuner that stopped without ending it)", run_dir.name)
        removed.append(run_dir.name)
    return removed


class _TrainingProcess:
    """``cliptuner train`` as a child process in a process group of its own, its events file read as it grows.

    It writes its output to ``train.log`` and its events to ``events.jsonl`` in the run directory;
    :meth:`read_events` hands each complete new line to a callback. :meth:`stop` ends the whole group (torchrun
    and its workers, DataLoader workers): SIGTERM, then SIGKILL after a grace period.

    With ``niceness`` > 0 the command runs under ``nice -n NICENESS``, so the process starts (and every thread and
    process it makes inherits) a nice value that much above this one's (19 at most); without a ``nice`` program,
    the priority is set on the child right after it started, before it creates any thread.
    """

    def __init__(self, argv: list[str], env: dict[str, str], run_dir: Path, niceness: int = 0) -> None:
        self.argv = argv
        self.env = env
        self.run_dir = run_dir
        self.niceness = niceness
        self.events_path = run_dir / EVENTS_FILE
        self.log_path = run_dir / LOG_FILE
        self.proc: Optional[subprocess.Popen] = None
        self._offset = 0  # bytes of the events file already handed on
        self._stopping = threading.Lock()

    @property
    def pid(self) -> Optional[int]:
        """The child's pid, which is also its process group id."""
        return None if self.proc is None else self.proc.pid

    def start(self) -> None:
        argv = [NICE, "-n", str(self.niceness), *self.argv] if self.niceness and NICE else self.argv
        with self.log_path.open("ab") as log:  # the child holds its own descriptor of it
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.run_dir,
                env=self.env,
                start_new_session=True,
            )
        if self.niceness and not NICE:  # Popen returned once the child ran exec: it is one fresh thread
            target = min(MAX_NICENESS, os.getpriority(os.PRIO_PROCESS, 0) + self.niceness)
            with contextlib.suppress(ProcessLookupError):
                os.setpriority(os.PRIO_PROCESS, self.proc.pid, target)
        (self.run_dir / PROCESS_FILE).write_text(json.dumps({"pgid": self.proc.pid}), encoding="utf-8")
        logger.info("training process %d started (niceness +%d): %s", self.proc.pid, self.niceness, " ".join(self.argv))

    def poll(self) -> Optional[int]:
        """Its exit status, or None while it runs."""
        return self.proc.poll()

    def read_events(self, on_event: Callable[[dict], None], stop: Callable[[], bool]) -> None:
        """Hand each complete new line of the events file to ``on_event``, in order; return early once ``stop()``."""
        try:
            with self.events_path.open("rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:  # not written yet
            return
        for line in data[: data.rfind(b"\n") + 1].splitlines(keepends=True):  # a line being written waits
            self._offset += len(line)
            try:
                event = json.loads(line)
            except ValueError:
                logger.warning("%s: unreadable event line %r", self.events_path, line[:200])
                continue
            if isinstance(event, dict):
                on_event(event)
            if stop():
                return

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """End the process group: SIGTERM, up to ``grace`` seconds for the child to exit, then SIGKILL."""
        if self.proc is None:
            return
        with self._stopping:
            for sig, timeout in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
                try:
                    os.killpg(self.proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass  # the group is gone already
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    logger.warning("training process %d outlived SIGTERM by %gs: killing it", self.proc.pid, grace)

    def failure(self, returncode: int, clean: Callable[[str], str]) -> TrainingProcessError:
        """The error of a process that exited with ``returncode`` != 0; ``clean`` takes server paths out of it."""
        try:
            log = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            log = ""
        message = clean(_process_cause(log, returncode))
        input_error = returncode == INPUT_ERROR_EXIT or (returncode > 0 and CLI_ERROR in log)
        return (TrainingProcessInputError if input_error else TrainingProcessError)(message, returncode)


@dataclasses.dataclass
class _Run:
    """One /train run: where it lives, what it started from, its training process and how it ends."""

    run_id: str
    run_dir: Path
    started: float  # time.time()
    parent: str = ""  # CURRENT when the run began
    init: str = ""  # what the weights start from, as the report names it
    sources: dict = dataclasses.field(default_factory=dict)  # the report's split sources
    process: Optional[_TrainingProcess] = None
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)  # /train/cancel asked for it
    finished: threading.Event = dataclasses.field(default_factory=threading.Event)  # its /status state is final


class CLIPTuner(Executor):
    """Fine-tunes the CURRENT model version on pairs and publishes the tuned one.

    Args:
        model: base OpenCLIP arch or bundled config, published on a fresh registry (``$CLIPTUNER_MODEL``).
        pretrained: its pretrained tag or local checkpoint; None for random init (``$CLIPTUNER_PRETRAINED``).
        device: where to train: ``auto`` (CUDA if available, decided by the training process: the tuner's own
            process never imports torch for a run), ``cpu``, ``cuda``, ``cuda:N`` (``$CLIPTUNER_DEVICE``).
        models_dir: the registry; default ``<workspace>/models``.
        data_root: folder that ``parameters['data']``/``['eval_data']`` are relative to; default ``<workspace>/data``.
        runs_dir: where each run has its directory (inputs and events while it runs; then its ``report.json`` and
            its training process's ``train.log``); default ``<workspace>/runs``.
        bootstrap: publish the base version when the registry is empty (else wait for one).
        bootstrap_timeout: seconds to wait for a version published by another service.
        torch_threads: CPU threads torch may use in each training process (its ``OMP_NUM_THREADS``); unset:
            ``$CLIPTUNER_TORCH_THREADS``, else ``(CPUs - 1) // processes``, at least 1
            (:func:`default_torch_threads`): one CPU is left to the encoder and the indexer.
        train_niceness: added to the tuner's nice value for its training processes (0 to 19; 0: the same CPU
            priority as serving); unset: ``$CLIPTUNER_TRAIN_NICENESS``, else 10. When training and serving share
            CPUs, the kernel then runs the encoder's and the indexer's work first, and training takes what is
            left.
        processes: training processes per run: 1 runs ``python -m cliptuner.cli train``; N > 1 runs it under
            ``python -m torch.distributed.run --standalone --nproc_per_node N`` (DDP: NCCL on GPUs, gloo on CPU).
        uri_roots: folders that a doc's ``uri`` and the image paths of a PAIRS file must lie under; unset:
            ``$CLIPTUNER_URI_ROOTS``, else ``<workspace>/data`` (see :func:`executors.options.uri_policy`).
        allowed_hosts: http(s) hosts a doc's ``uri`` may name; unset: ``$CLIPTUNER_ALLOWED_HOSTS``, else none.
        max_pairs: most pairs one request may carry (guards memory before anything is decoded).
        max_text_chars: most characters in one caption.
        max_blob_bytes: most bytes of one encoded image (blob, data: URI, http(s) body).
        max_request_bytes: most bytes of blobs, tensors, uris and fetched http(s) bodies in one request.
        keep_versions: after each publish, delete all but the newest this many versions (never CURRENT); None
            keeps every version.

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
        train_niceness: Optional[int] = None,
        uri_roots: Optional[Any] = None,
        allowed_hosts: Optional[Any] = None,
        max_pairs: int = RequestLimits.max_pairs,
        max_text_chars: int = RequestLimits.max_text_chars,
        max_blob_bytes: int = RequestLimits.max_blob_bytes,
        max_request_bytes: int = RequestLimits.max_request_bytes,
        keep_versions: Optional[int] = None,
        processes: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        require_train("the tuner (CLIPTuner)")  # it builds base versions and runs `cliptuner train`
        workspace = resolve_workspace(self, models_dir, kwargs.get("workspace"))
        self.registry: Registry = workspace.registry
        root = workspace.root or self.registry.root.parent
        self.data_root = Path(setting(data_root) or root / DATA_SUBDIR).expanduser().resolve()
        self.runs_dir = Path(setting(runs_dir) or root / RUNS_SUBDIR).expanduser().resolve()
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        clean_unfinished_runs(self.runs_dir)
        self.base = base_spec(model, pretrained)
        self.device = str(setting(device) or "auto")
        self.policy = uri_policy(workspace, uri_roots, allowed_hosts)
        self.limits = RequestLimits(
            max_pairs=max_pairs,
            max_text_chars=max_text_chars,
            max_blob_bytes=max_blob_bytes,
            max_request_bytes=max_request_bytes,
        )
        keep_versions = setting(keep_versions)
        self.keep_versions = None if keep_versions is None else int_parameter("keep_versions", keep_versions)
        processes = setting(processes)
        self.processes = int_parameter("processes", 1 if processes is None else processes)
        self.torch_threads = int_setting(
            "torch_threads", torch_threads, TORCH_THREADS_ENV, default_torch_threads(self.processes)
        )
        self.train_niceness = int_setting(
            "train_niceness",
            train_niceness,
            TRAIN_NICENESS_ENV,
            DEFAULT_TRAIN_NICENESS,
            minimum=0,
            maximum=MAX_NICENESS,
        )
        self.registry.clean_temps()  # a publisher: remove what a crashed publish left behind
        ensure_current(self.registry, self.base if bootstrap else None, timeout=float(bootstrap_timeout))
        self._run_lock = threading.Lock()  # one training run at a time
        self._stop = threading.Event()
        self._progress: dict[str, Any] = {"state": "idle"}
        self._last_report: Optional[dict] = None
        self._active: Optional[_Run] = None  # the run going, if any
        self.metrics = Metrics(getattr(self.runtime_args, "metrics_registry", None))
        self.metrics.model_version(self.registry.current())
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
        params = request_parameters(parameters, TRAIN_OPTIONS + EVAL_OPTIONS + SOURCE_OPTIONS + RUN_OPTIONS, "/train")
        wait = params.pop("wait", True)
        if not isinstance(wait, bool):
            raise ValueError(f"parameter 'wait' must be true or false, got {wait!r}")
        if "config" in params:
            name = params.pop("config")
            params = {
                **read_options_file(self._data_path("config", name), TRAIN_OPTIONS + EVAL_OPTIONS, label=str(name)),
                **params,
            }
        train_values = {k: v for k, v in params.items() if k in TRAIN_OPTIONS}
        cfg = from_mapping(TrainConfig, {**train_values, "device": self.device, "log_every": 1})
        eval_values = {k: v for k, v in params.items() if k in EVAL_OPTIONS}
        eval_cfg = from_mapping(EvalConfig, {**eval_values, "split_seed": cfg.seed})
        data = self._data_path("data", params["data"]) if "data" in params else None
        eval_data = self._data_path("eval_data", params["eval_data"]) if "eval_data" in params else None
        general = self._data_path("general_data", params["general_data"]) if "general_data" in params else None
        return TrainRequest(cfg=cfg, eval_cfg=eval_cfg, data=data, eval_data=eval_data, general_data=general, wait=wait)

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
        source = str(request.data.relative_to(self.data_root)) if request.data is not None else "request docs"
        data = self.pairs_from_docs(docs) if request.data is None else request.data
        try:
            train, held_out = train_and_held_out(
                data,
                request.eval_data,
                request.eval_cfg.eval_fraction,
                request.eval_cfg.split_seed,
                resolve_image=self.policy.local_path,
            )
        except DataError as exc:  # names files and rows by their paths under the data root only
            raise DataError(self._relative(str(exc))) from None
        if request.eval_data is not None:
            held_out_from = str(request.eval_data.relative_to(self.data_root))
        elif request.data is not None and request.data.suffix.lower() == ".json":
            held_out_from = f"{source} (test split)"
        else:
            held_out_from = f"{request.eval_cfg.eval_fraction:g} of {source} (seed {request.eval_cfg.split_seed})"
        if train.num_images < request.cfg.batch_size:
            raise ValueError(
                f"{train.num_images} training images is fewer than batch_size {request.cfg.batch_size}: "
                "send more pairs or lower batch_size"
            )
        return train, held_out, {"source": source, "held_out": held_out_from}

    # -- the run: prepared here, trained by a child process, published here ------------------------------------
    def _on_event(self, event: dict) -> None:
        self.metrics.training_event(event)
        kind = event.get("event")
        update: dict[str, Any] = {"last_event": kind, "updated_at": time.time()}
        if "pid" in event:  # the process that trains (rank 0 under torchrun)
            update["pid"] = event["pid"]
        if kind == "loaded":
            update.update(phase="evaluating")
        elif kind == "before":
            update.update(phase="training", before=event["metrics"])
        elif kind in ("step", "epoch"):
            update.update(
                {
                    k: event[k]
                    for k in (
                        "epoch",
                        "epochs",
                        "step",
                        "total_steps",
                        "loss",
                        "lr",
                        "samples_per_s",
                        "eta_s",
                        "step_s",
                    )
                    if k in event
                }
            )
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
        logger.warning(
            "model version %s has no checkpoint; training starts from the base model %s", parent, self.base.arch
        )
        return self.base, f"base model {self.base.arch} (version {parent} has no checkpoint)"

    def _set_phase(self, phase: str) -> None:
        self._progress = {**self._progress, "phase": phase}  # one reference swap, as in _on_event

    def _train_argv(self, args: list[str]) -> list[str]:
        """The training process's command line: ``cliptuner train ARGS``, under torchrun with ``processes`` > 1."""
        if self.processes > 1:
            return [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(self.processes),
                "-m",
                "cliptuner.cli",
                "train",
                *args,
            ]
        return [sys.executable, "-m", "cliptuner.cli", "train", *args]

    def _train_env(self) -> dict[str, str]:
        """The training process's environment: this one, with this cliptuner importable and ``torch_threads``."""
        env = dict(os.environ)
        source_root = str(Path(cliptuner.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([source_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["PYTHONUNBUFFERED"] = "1"
        env["OMP_NUM_THREADS"] = str(self.torch_threads)
        return env

    def _write_inputs(
        self, run: _Run, request: TrainRequest, spec: ModelSpec, train: PairSet, held_out: PairSet
    ) -> list[str]:
        """Write what the training process reads into the run directory; returns its ``cliptuner train`` arguments.

        The split made here is handed over as it is (``--data`` the training pairs, ``--eval-data`` the held-out
        ones), and the options as a ``--config`` JSON of the TrainConfig/EvalConfig values.
        """
        inputs = run.run_dir / INPUTS_SUBDIR
        inputs.mkdir(parents=True)
        options = {name: getattr(request.cfg, name) for name in cli_names(TrainConfig)}
        options.update({name: getattr(request.eval_cfg, name) for name in cli_names(EvalConfig)})
        if self.device != "auto":  # auto: the training process takes CUDA if it has one (its LOCAL_RANK GPU)
            options["device"] = self.device
        (inputs / "config.json").write_text(json.dumps(options, indent=2) + "\n", encoding="utf-8")
        args = [
            "--data",
            str(write_pairs_csv(train, inputs / "train.csv")),
            "--eval-data",
            str(write_pairs_csv(held_out, inputs / "held_out.csv")),
            "--config",
            str(inputs / "config.json"),
            "--model",
            spec.arch,
            "--out",
            str(run.run_dir / MODEL_SUBDIR),
            "--events",
            str(run.run_dir / EVENTS_FILE),
            "--quiet",
        ]
        if spec.pretrained:
            args += ["--pretrained", spec.pretrained]
        if spec.force_quick_gelu:
            args.append("--force-quick-gelu")
        if request.general_data is not None:
            general = self._load_general(request.general_data)
            args += ["--general-data", str(write_pairs_csv(general, inputs / "general" / "general.csv"))]
        return args

    def _prepare(self, run: _Run, request: TrainRequest, docs: DocList[ClipDoc]) -> None:
        """Check the pairs and split them, write the run's inputs and start its training process."""
        train, held_out, run.sources = self.split_pairs(request, docs)
        spec, run.init = self._parent_spec(run.parent)
        args = self._write_inputs(run, request, spec, train, held_out)
        if self._stop_asked(run):
            raise self._stopped(run, "before training")
        self._set_phase("loading")
        run.process = _TrainingProcess(self._train_argv(args), self._train_env(), run.run_dir, self.train_niceness)
        run.process.start()
        self._progress = {**self._progress, "pid": run.process.pid}

    def _stop_asked(self, run: _Run) -> bool:
        return self._stop.is_set() or run.cancelled.is_set()

    def _stopped(self, run: _Run, when: Optional[str] = None) -> TrainingCancelled:
        """The error of a run stopped ``when`` (default: where its progress is)."""
        why = "cancelled" if run.cancelled.is_set() else "stopped: the tuner is closing"
        progress = self._progress
        if when is None and progress.get("step"):
            when = (
                f"at epoch {progress.get('epoch')}/{progress.get('epochs')}, step {progress['step']}/"
                f"{progress.get('total_steps')}"
            )
        return TrainingCancelled(f"the run was {why} {when or 'while ' + str(progress.get('phase'))}")

    def _clean_message(self, run: _Run, message: str) -> str:
        """``message`` with the paths of the run directory, the registry and the data root taken out."""
        return hide_paths(
            message,
            {"the run directory": run.run_dir, "the registry": self.registry.root, "the data root": self.data_root},
        )

    def _train_and_export(self, run: _Run) -> dict:
        """Follow the training process to its end (its events into ``/status``); returns the report of the model it
        exported to the run's ``model`` directory (no version yet), which is also written into its ``model.json``.

        Raises:
            TrainingCancelled: a cancel or a stop was asked for (the process group is ended first).
            TrainingProcessError: the process failed or was killed (:class:`TrainingProcessInputError` when it
                refused its input).
        """
        process = run.process
        while True:
            returncode = process.poll()
            process.read_events(self._on_event, lambda: self._stop_asked(run))
            if self._stop_asked(run):
                if process.poll() is None:
                    process.stop()
                    raise self._stopped(run)
                raise self._stopped(run, "after training; the tuned model is not published")
            if returncode is not None:
                break
            run.cancelled.wait(POLL_S)
        if returncode != 0:
            raise process.failure(returncode, lambda message: self._clean_message(run, message))
        model_dir = run.run_dir / MODEL_SUBDIR
        child_report = json.loads((model_dir / "report.json").read_text(encoding="utf-8"))
        (model_dir / "report.json").unlink()  # the run's report.json is the tuner's, written beside the model
        report = {
            "model_version": None,
            "parent_version": run.parent,
            "init": run.init,
            **{k: v for k, v in child_report.items() if k not in ("model_version", "model", "wall_seconds")},
        }
        report["split"] = {**child_report["split"], **run.sources}
        report["wall_seconds"] = round(time.time() - run.started, 3)
        manifest = ModelManifest.read(model_dir)
        dataclasses.replace(manifest, version=None, parent_version=run.parent, report=report).write(model_dir)
        return report

    def _failure(self, run_id: str, exc: BaseException) -> TrainingFailed:
        """Record a failed run in ``/status`` and build the error the client gets (phase and cause named)."""
        phase = self._progress.get("phase") or "preparing"
        cause = f"{type(exc).__name__}: {exc}"
        state = "cancelled" if isinstance(exc, TrainingCancelled) else "failed"
        self._progress = {**self._progress, "state": state, "phase": phase, "error": cause, "finished_at": time.time()}
        message = (
            f"/train run {run_id} failed while {phase}: {cause} (nothing was published; CURRENT is still "
            f"{self.registry.current()})"
        )
        (logger.info if state == "cancelled" else logger.error)("%s", message)
        self.metrics.training_finished(state)
        kind = TrainingInputError if isinstance(exc, ValueError) else TrainingFailed
        return kind(message, run_id=run_id, phase=phase)

    def _abandon(self, run: _Run, exc: BaseException) -> TrainingFailed:
        """End a run that failed: its process group stopped, recorded in ``/status``, its directory removed, the run
        lock released. Returns the error for the client."""
        try:
            if run.process is not None:
                run.process.stop()
            failure = self._failure(run.run_id, exc)
            shutil.rmtree(run.run_dir, ignore_errors=True)
        finally:
            self._end(run)
        return failure

    def _end(self, run: _Run) -> None:
        """The run is over (its state in ``/status`` is final): release the run lock, once."""
        if run.finished.is_set():
            return
        self._active = None
        run.finished.set()
        self._run_lock.release()

    def _start(self, request: TrainRequest, docs: DocList[ClipDoc]) -> _Run:
        """Begin a run (the run lock held): check and split its pairs, write its inputs, start its training process.

        Raises:
            TrainingInputError, TrainingFailed: as :meth:`_run` (the run is recorded and cleaned up, the lock
                released).
        """
        run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        run = _Run(run_id=run_id, run_dir=self.runs_dir / run_id, started=time.time())
        self._active = run
        try:
            run.parent = self.registry.current()
            self._progress = {
                "state": "running",
                "phase": "preparing",
                "run_id": run_id,
                "started_at": run.started,
                "parent_version": run.parent,
            }
            self._prepare(run, request, docs)
        except Exception as exc:
            raise self._abandon(run, exc) from exc
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: recorded, then on their way unchanged
            self._abandon(run, exc)
            raise
        return run

    def _finish(self, run: _Run) -> dict:
        """Follow a started run to its end and publish its model; releases the run lock when done.

        Only a run whose training process exported a model, with no cancel or stop asked for, publishes. A run
        that fails (bad pairs, an undecodable image, a non-finite loss, a killed training process, a cancel, any
        error up to and including the publish) leaves CURRENT and the registry as they were, removes its run
        directory (the half-written export), shows ``state: failed`` (``cancelled`` for a cancel or a stop) with
        ``phase`` and ``error`` in ``/status``, and raises.

        Raises:
            TrainingInputError: the run failed on a ``ValueError`` (bad input): a ``TrainingFailed`` and a
                ``ValueError``.
            TrainingFailed: the run failed on any other error; the message names the run, the phase and the cause
                (also its ``__cause__``).
        """
        run_id, run_dir, parent, started = run.run_id, run.run_dir, run.parent, run.started
        try:
            try:
                report = self._train_and_export(run)
                if self._stop_asked(run):
                    raise self._stopped(run, "after training; the tuned model is not published")
                self._set_phase("publishing")
                version = self.registry.publish(run_dir / MODEL_SUBDIR, move=True)
            except Exception as exc:
                raise self._abandon(run, exc) from exc
            except BaseException as exc:  # KeyboardInterrupt, SystemExit: recorded, then on their way unchanged
                self._abandon(run, exc)
                raise
            # published: the run has succeeded, whatever happens to its report file
            shutil.rmtree(run_dir / INPUTS_SUBDIR, ignore_errors=True)  # train.log stays, with report.json
            (run_dir / EVENTS_FILE).unlink(missing_ok=True)
            (run_dir / PROCESS_FILE).unlink(missing_ok=True)
            pruned = self._prune_after_publish(version)
            if pruned:
                report["pruned_versions"] = pruned
            report["model_version"] = version
            report["wall_seconds"] = round(time.time() - started, 3)
            try:
                (run_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            except OSError as exc:  # the report also lives in the version's model.json
                logger.warning("run %s published %s but could not write its report.json: %s", run_id, version, exc)
            self._last_report = report
            self.metrics.training_finished("published")
            self.metrics.model_version(version)
            self._progress = {
                "state": "done",
                "run_id": run_id,
                "model_version": version,
                "parent_version": parent,
                "finished_at": time.time(),
                "wall_seconds": report["wall_seconds"],
            }
            logger.info(
                "run %s published %s: t2i R@5 %.3f → %.3f",
                run_id,
                version,
                report["before"]["t2i_r5"],
                report["after"]["t2i_r5"],
            )
            return report
        finally:
            self._end(run)

    def _run(self, request: TrainRequest, docs: DocList[ClipDoc]) -> dict:
        """A whole run, as a synchronous /train waits for it: :meth:`_start`, then :meth:`_finish`."""
        return self._finish(self._start(request, docs))

    def _start_detached(self, request: TrainRequest, docs: DocList[ClipDoc]) -> _Run:
        """:meth:`_start` a run and follow it in a thread of its own (a /train with ``wait=False``)."""
        run = self._start(request, docs)
        try:
            threading.Thread(target=self._finish_detached, args=(run,), name=f"train-{run.run_id}", daemon=True).start()
        except BaseException as exc:
            raise self._abandon(run, exc) from exc
        return run

    def _finish_detached(self, run: _Run) -> None:
        try:
            self._finish(run)
        except TrainingFailed:
            pass  # recorded in /status and logged

    def cancel_run(self, run_id: Optional[str] = None) -> _Run:
        """Ask the run that is going to stop: its training process group is ended and nothing is published.

        Args:
            run_id: the run to cancel; None: whichever is going.

        Returns:
            The run; its ``finished`` event is set once its state in ``/status`` is final.

        Raises:
            TrainingNotRunning: no run is going, or ``run_id`` names another one (a ``ValueError``).
            ValueError: ``run_id`` is not a string.
        """
        if run_id is not None and not isinstance(run_id, str):
            raise ValueError(f"parameter 'run_id' must be a string, got {run_id!r}")
        run = self._active
        if run is None or run.finished.is_set():
            last = self._progress
            after = f" (the last run, {last['run_id']}, is {last.get('state')})" if last.get("run_id") else ""
            raise TrainingNotRunning(f"no /train run is going: nothing to cancel{after}")
        if run_id is not None and run_id != run.run_id:
            raise TrainingNotRunning(f"run {run_id!r} is not going: the run going is {run.run_id!r}")
        run.cancelled.set()
        logger.info("run %s: cancel asked for while %s", run.run_id, self._progress.get("phase"))
        return run

    def status(self) -> dict:
        """CURRENT version, the training state (progress while running) and the last run's headline numbers."""
        last = None
        if self._last_report is not None:
            r = self._last_report
            last = {
                "model_version": r["model_version"],
                "parent_version": r["parent_version"],
                "before": r["before"],
                "after": r["after"],
                "epochs": r["epochs"],
                **{
                    key: r[key]
                    for key in (
                        "epoch_losses",
                        "eval_history",
                        "history_split",
                        "best_epoch",
                        "split",
                        "samples_per_s",
                        "train_seconds",
                    )
                    if key in r
                },
            }
        return {
            "executor": "CLIPTuner",
            "pid": os.getpid(),
            "model_version": self.registry.current(),
            "training": dict(self._progress),
            "last_report": last,
            "device": self.device,
            "processes": self.processes,
            "torch_threads": self.torch_threads,
            "train_niceness": self.train_niceness,
            "data_root": str(self.data_root),
        }

    def close(self) -> None:
        """Stop a running training: its process group is ended (SIGTERM, then SIGKILL); nothing is published."""
        self._stop.set()
        run = self._active
        if run is not None and run.process is not None:
            run.process.stop()
        super().close()

    # -- endpoints -----------------------------------------------------------------------------------------------
    @requests(on="/train")
    async def train(self, docs: DocList[ClipDoc], parameters: Optional[dict] = None, **kwargs: Any) -> DocList[ClipDoc]:
        """Fine-tune on the request's pairs (or ``parameters['data']``); returns the one report doc, or with
        ``parameters['wait']=False`` the run's doc as soon as its training process has started."""
        request = self.parse_request(parameters)
        if not self._run_lock.acquire(blocking=False):
            progress = self._progress
            raise TrainingBusy(
                f"a /train run is already going (run {progress.get('run_id')}, phase {progress.get('phase')}, "
                f"epoch {progress.get('epoch')}/{progress.get('epochs')}); one run at a time: poll /status and "
                "send this one when it is done"
            )
        try:
            work = self._run if request.wait else self._start_detached
            future = asyncio.get_running_loop().run_in_executor(None, work, request, docs)
        except BaseException:
            self._run_lock.release()
            raise
        result = await future  # the run releases the lock when it ends, even if this request is cancelled meanwhile
        if not request.wait:
            return DocList[ClipDoc]([ClipDoc(id=RUN_DOC_ID, tags={"run_id": result.run_id, "state": "running"})])
        return DocList[ClipDoc]([ClipDoc(id=REPORT_ID, model_version=result["model_version"], tags={"report": result})])

    @requests(on="/train/cancel")
    async def cancel(
        self, docs: DocList[ClipDoc], parameters: Optional[dict] = None, **kwargs: Any
    ) -> DocList[ClipDoc]:
        """Cancel the run that is going (``parameters['run_id']``, optional, must name it); answers once it ended."""
        params = request_parameters(parameters, ("run_id",), "/train/cancel")
        run = self.cancel_run(params.get("run_id"))
        await asyncio.get_running_loop().run_in_executor(None, run.finished.wait, STOP_GRACE_S + 60)
        progress = self._progress
        state = progress.get("state") if progress.get("run_id") == run.run_id else None
        return DocList[ClipDoc](
            [ClipDoc(id=CANCEL_DOC_ID, tags={"run_id": run.run_id, "state": state, "phase": progress.get("phase")})]
        )

    @requests(on="/status")
    async def report_status(self, docs: DocList[ClipDoc], **kwargs: Any) -> DocList[ClipDoc]:
        """Append the tuner's status doc."""
        state = self.status()
        docs.append(ClipDoc(id="status-tuner", model_version=state["model_version"], tags=state))
        return docs

    # -- model versions (/models…) -------------------------------------------------------------------------------
    def _prune_after_publish(self, version: str) -> list[str]:
        """Keep the newest ``keep_versions`` versions after publishing ``version``; a failure is logged, not raised
        (the run has published by then)."""
        if self.keep_versions is None:
            return []
        try:
            return self.registry.prune(self.keep_versions)
        except Exception as exc:  # the next publish, or /models/prune, tries again
            logger.warning(
                "published %s, but pruning to the newest %d versions failed: %s", version, self.keep_versions, exc
            )
            return []

    async def _registry_call(self, method: Any, *args: Any) -> Any:
        """Run a registry operation in a worker thread; its errors name versions, never the registry's path."""
        try:
            return await asyncio.to_thread(method, *args)
        except ValueError as exc:
            raise ValueError(hide_paths(str(exc), {"the registry": self.registry.root})) from None

    @staticmethod
    def _change_doc(action: str, change: CurrentChange) -> ClipDoc:
        return ClipDoc(
            id=change.version,
            model_version=change.version,
            tags={
                "action": action,
                "model_version": change.version,
                "previous_version": change.previous,
                "changed": change.changed,
            },
        )

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
        return DocList[ClipDoc](
            [
                ClipDoc(
                    id="models-prune",
                    model_version=self.registry.current(),
                    tags={"deleted": deleted, "kept": self.registry.versions()},
                )
            ]
        )
