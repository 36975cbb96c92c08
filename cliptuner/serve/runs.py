"""Training runs of the service: one at a time, each trained by a worker process of its own (jina-free, torch-free).

:class:`TrainingRuns` gives a run a directory under ``runs_dir``, writes the run's job
(:class:`~cliptuner.train.job.TrainJob`) there, starts the worker (``python -m cliptuner.train.worker``, under
torchrun with several processes) in a process group of its own at a lower CPU priority, follows its events into
:attr:`TrainingRuns.progress` (the tuner's ``/status``), learns why it failed from its one ``failed`` event (never
from its output), stops it (cancel, close), and publishes the model it exported. A run that fails publishes nothing
and leaves no directory. The endpoints built on it are described in docs/service.md.

A run's directory ``<runs_dir>/<run_id>/``: ``inputs/`` (``job.json`` and the pairs; removed once published),
``model/`` (the worker's export, moved into the registry), ``events.jsonl`` (the worker's events), ``train.log``
(its stdout and stderr, for operators), ``process.json`` (``{"pgid"}`` of its process group, for a tuner that
restarts after a crash) and ``report.json`` (written once the run has published: a directory without one is
unfinished; it names the request the run answered, ``request_id``).

A run answers one request, named by its request id: the client's ``parameters['request_id']``, or a digest of the
request that the tuner derives. :meth:`TrainingRuns.claim` gives a request that arrives again (a gRPC retry of the
gateway, a client's own retry) the run it already started instead of a second run or a ``TrainingBusy``:
the run going, or one that ended — a client's id for as long as the run's record lasts (published runs: their
``report.json``; failed ones: the last :data:`RECENT_RUNS` in memory), a derived id only while the run goes or
for :data:`DERIVED_ATTACH_S` seconds after it published.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Protocol, Union

import cliptuner
from cliptuner.model.gate import gate_off, refused_after_all
from cliptuner.model.manifest import ModelManifest
from cliptuner.model.registry import CurrentMoved, Registry
from cliptuner.serve.cluster import KubeAPI, KubernetesJobRun, TrainingCluster, stop_leftover_job
from cliptuner.serve.launch import stop_group
from cliptuner.serve.worker_events import (
    LOG_TAIL_LINES,
    PROCESS_FILE,
    TrainingProcessError,
    TrainingProcessInputError,
    WorkerEvents,
    file_tail,
    signal_cause,
)
from cliptuner.train.job import JOB_FILE, PHASES, TrainJob, phase_after
from cliptuner.train.worker import FAILED

logger = logging.getLogger(__name__)

INPUTS_SUBDIR = "inputs"  # what the worker reads: job.json, the pairs as PAIRS CSVs, the request's images
MODEL_SUBDIR = "model"  # the tuned model version the worker exports (the job's ``out``)
EVENTS_FILE = "events.jsonl"  # the worker's events, one JSON line each, followed into ``progress``
LOG_FILE = "train.log"  # the worker's stdout and stderr, for operators (never parsed)
REPORT_FILE = "report.json"  # written when the run has published: a run directory without one is unfinished
WORKER_MODULE = "cliptuner.train.worker"
STOP_GRACE_S = 10.0  # seconds between SIGTERM and SIGKILL when a run's process group is stopped
POLL_S = 0.2  # how often a run's thread reads new events and looks at the worker
DEFAULT_TRAIN_NICENESS = 10  # added to the tuner's nice value for its training processes: serving comes first
MAX_NICENESS = 19  # the lowest CPU priority Linux has
NICE = shutil.which("nice")  # runs the worker at a lower priority, inherited by all its threads
RECENT_RUNS = 64  # ended runs kept in memory with their outcome, for a request that arrives again
DERIVED_ATTACH_S = 60.0  # a request without a client id finds the run it derived for this long after it published
PROGRESS_KEYS = ("epoch", "epochs", "step", "total_steps", "loss", "lr", "samples_per_s", "eta_s", "step_s")
SUMMARY_KEYS = (
    "epoch_losses",
    "eval_history",
    "history_split",
    "best_epoch",
    "split",
    "samples_per_s",
    "train_seconds",
)


class TrainingBusy(RuntimeError):
    """A run was asked for while another one is going."""


class TrainingFailed(RuntimeError):
    """A run failed: nothing was published, CURRENT names what it named before.

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
    """A run failed on its input (bad pairs, an undecodable image, too few images…)."""


class TrainingCancelled(RuntimeError):
    """A run was stopped before it published: cancelled, or the service closing."""


class TrainingNotRunning(ValueError):
    """A cancel found no run to cancel: none is going, or the run id names another."""


def hide_paths(message: str, roots: dict[str, Path]) -> str:
    """``message`` as a client may read it: a path under one of ``roots`` shown relative to it, the root itself (quoted
    or not) by its label. Roots are taken in order, so name a folder before a folder that holds it."""
    for label, root in roots.items():
        root = str(root)
        message = message.replace(repr(root), label).replace(root + os.sep, "").replace(root, label)
    return message


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


def worker_argv(job_path: Path, events_path: Path, processes: int = 1) -> list[str]:
    """The worker's command line: ``python -m cliptuner.train.worker JOB --events EVENTS``, under
    ``python -m torch.distributed.run --standalone --nproc_per_node N`` with ``processes`` = N > 1."""
    args = ["-m", WORKER_MODULE, str(job_path), "--events", str(events_path)]
    if processes > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(processes),
            *args,
        ]
    return [sys.executable, *args]


def worker_env(torch_threads: int) -> dict[str, str]:
    """The worker's environment: this one, with this cliptuner importable and ``OMP_NUM_THREADS=torch_threads``."""
    env = dict(os.environ)
    source_root = str(Path(cliptuner.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([source_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = str(torch_threads)
    return env


def _group_works_in(pgid: int, run_dir: Path) -> bool:
    """True when process ``pgid`` is alive and its working directory is ``run_dir``: the worker a run started (a pid
    reused since by another process does not work there)."""
    try:
        return Path(os.readlink(f"/proc/{pgid}/cwd")) == run_dir
    except OSError:  # gone, not ours, or no /proc (then nothing can be told, and nothing is killed)
        return False


def clean_unfinished_runs(
    runs_dir: Path, wait_s: float = STOP_GRACE_S, kube_api: Optional[KubeAPI] = None
) -> list[str]:
    """Remove the runs a previous service process left unfinished, ending their workers first.

    A tuner that was killed (SIGKILL, OOM, a node lost) cannot stop its worker's process group, which lives in a
    session of its own, nor remove the run directory. At the next start, every run directory without a report is
    such a leftover: its process group, when it still runs in that directory, gets SIGKILL (nothing it would
    produce can be published any more), and the directory is removed. One tuner per workspace.

    Returns:
        The run ids removed.
    """
    removed = []
    for run_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        if (run_dir / REPORT_FILE).exists():
            continue
        if kube_api is not None:
            stop_leftover_job(kube_api, run_dir, wait_s)  # a Job the run's process.json names, if any
        try:
            pgid = int(json.loads((run_dir / PROCESS_FILE).read_text(encoding="utf-8"))["pgid"])
        except (OSError, ValueError, KeyError, TypeError):
            pgid = None
        if pgid is not None and _group_works_in(pgid, run_dir.resolve()):
            logger.warning(
                "run %s: its worker group %d outlived the tuner that started it; killing it", run_dir.name, pgid
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


class TrainingProcess(WorkerEvents):
    """A worker as a child process in a process group of its own, its events file read as it grows.

    Its stdout and stderr go to ``train.log`` in the run directory, its events to ``events.jsonl``;
    :meth:`read_events` hands each complete new line to a callback and keeps the first ``failed`` event.
    :meth:`stop` ends the whole group (torchrun and its workers, DataLoader workers) with
    :func:`cliptuner.serve.launch.stop_group`.

    With ``niceness`` > 0 the command runs under ``nice -n NICENESS``, so the process starts (and every thread and
    process it makes inherits) a nice value that much above this one's (19 at most); without a ``nice`` program,
    the priority is set on the child right after it started, before it creates any thread.
    """

    def __init__(self, argv: list[str], env: dict[str, str], run_dir: Path, niceness: int = 0) -> None:
        self.argv = argv
        self.env = env
        super().__init__(run_dir / EVENTS_FILE)
        self.run_dir = run_dir
        self.niceness = niceness
        self.log_path = run_dir / LOG_FILE
        self.proc: Optional[subprocess.Popen] = None
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

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """End the process group: SIGTERM, up to ``grace`` seconds for the child to exit, then SIGKILL."""
        with self._stopping:
            stop_group(self.proc, grace)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last non-empty ``lines`` of its log (at most 2000 characters), or ``no output``."""
        return file_tail(self.log_path, lines) or "no output"


@dataclasses.dataclass
class Run:
    """One run: where it lives, what it started from, its worker and how it ends."""

    run_id: str
    run_dir: Path
    started: float  # time.time()
    parent: str = ""  # CURRENT when the run began
    init: str = ""  # what the weights start from, as the report names it
    sources: dict = dataclasses.field(default_factory=dict)  # the report's split sources
    process: Optional[Union[TrainingProcess, KubernetesJobRun]] = None
    request_id: Optional[str] = None  # the request it answers: the client's id or a derived one
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)  # a cancel asked for it
    finished: threading.Event = dataclasses.field(default_factory=threading.Event)  # its progress state is final
    report: Optional[dict] = None  # once it published
    error: Optional[TrainingFailed] = None  # once it failed or was cancelled
    ended: Optional[float] = None  # time.time() when it ended
    final_state: Optional[str] = None  # done (published), failed or cancelled, once it ended

    @property
    def state(self) -> str:
        """``running``, ``done`` (published), ``failed`` or ``cancelled``."""
        return self.final_state if self.finished.is_set() and self.final_state else "running"

    def outcome(self, timeout: Optional[float] = None) -> dict:
        """Wait for the run to end; its report, or its error raised.

        Raises:
            TrainingFailed: the run failed or was cancelled (the error its own request got).
            TimeoutError: it had not ended after ``timeout`` seconds.
        """
        if not self.finished.wait(timeout):
            raise TimeoutError(f"run {self.run_id} is still going")
        if self.report is not None:
            return self.report
        if self.error is not None:
            raise self.error
        raise TrainingFailed(f"/train run {self.run_id} ended without a report", run_id=self.run_id)

    @property
    def inputs_dir(self) -> Path:
        """Where the run's job and pairs go."""
        return self.run_dir / INPUTS_SUBDIR

    @property
    def model_dir(self) -> Path:
        """Where the worker exports the tuned model (the job's ``out``)."""
        return self.run_dir / MODEL_SUBDIR


class RunObserver(Protocol):
    """What :class:`TrainingRuns` tells about its runs (the tuner's Prometheus metrics)."""

    def training_event(self, event: dict) -> None: ...

    def training_finished(self, outcome: str) -> None: ...

    def model_version(self, version: Optional[str]) -> None: ...


class _Unobserved:
    """An observer that records nothing."""

    def training_event(self, event: dict) -> None:
        return None

    def training_finished(self, outcome: str) -> None:
        return None

    def model_version(self, version: Optional[str]) -> None:
        return None


Prepare = Callable[[Run], TrainJob]  # checks and writes a run's inputs into run.inputs_dir; returns its job


class TrainingRuns:
    """The training runs of one service: one at a time, each a worker process, published into ``registry``.

    Args:
        runs_dir: one directory per run under it; unfinished ones left by a previous process are removed here.
        registry: where a finished run publishes: as CURRENT when the evaluation gate promotes it (the report's
            ``gate``, :mod:`cliptuner.model.gate`), else as a listed candidate.
        processes: worker processes per run (torchrun with more than one).
        torch_threads: ``OMP_NUM_THREADS`` of each worker process.
        niceness: added to this process's nice value for the workers (0 to 19).
        keep_versions: after each publish, keep only the newest this many versions (never CURRENT); None keeps all.
        observer: told of each event (``training_event``), each finished run (``training_finished`` with
            ``published``, ``refused`` — the gate kept it a candidate —, ``failed`` or ``cancelled``) and the version
            serving after each publish (``model_version``).
        hidden: more folders to take out of the messages clients read (label → folder), beside the run directory and
            the registry.
    """

    def __init__(
        self,
        runs_dir: Path,
        registry: Registry,
        processes: int = 1,
        torch_threads: int = 1,
        niceness: int = DEFAULT_TRAIN_NICENESS,
        keep_versions: Optional[int] = None,
        observer: Optional[RunObserver] = None,
        hidden: Optional[dict[str, Path]] = None,
        cluster: Optional[TrainingCluster] = None,
        kube_api: Optional[KubeAPI] = None,
    ) -> None:
        self.runs_dir = Path(runs_dir)
        self.registry = registry
        self.processes = processes
        self.torch_threads = torch_threads
        self.niceness = niceness
        self.keep_versions = keep_versions
        self.observer = observer if observer is not None else _Unobserved()
        self.hidden = dict(hidden or {})
        self.cluster = cluster
        self.kube_api = kube_api if kube_api is not None or cluster is None else KubeAPI.in_cluster()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        clean_unfinished_runs(self.runs_dir, kube_api=self.kube_api)
        self.progress: dict[str, Any] = {"state": "idle"}  # replaced whole on each change: readers see one state
        self.last_report: Optional[dict] = None
        self.active: Optional[Run] = None  # the run going, if any
        self._lock = threading.Lock()  # held from acquire() until the run going has ended
        self._claims = threading.Lock()  # makes finding a request's run and starting a new one one step
        self._recent: collections.OrderedDict[str, Run] = collections.OrderedDict()  # request id -> run, newest last
        self._stop = threading.Event()

    # -- the worker -----------------------------------------------------------------------------------------------
    def worker_argv(self, job_path: Path, events_path: Path) -> list[str]:
        """The command line of a run's worker (see :func:`worker_argv`)."""
        return worker_argv(job_path, events_path, self.processes)

    def worker_env(self) -> dict[str, str]:
        """The environment of a run's worker (see :func:`worker_env`)."""
        return worker_env(self.torch_threads)

    # -- one run at a time ----------------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the one run's place; the run started next releases it when it ends.

        Raises:
            TrainingBusy: a run is going (named, with where it is).
        """
        if not self._lock.acquire(blocking=False):
            progress = self.progress
            raise TrainingBusy(
                f"a /train run is already going (run {progress.get('run_id')}, phase {progress.get('phase')}, "
                f"epoch {progress.get('epoch')}/{progress.get('epochs')}); one run at a time: poll /status and "
                "send this one when it is done"
            )

    def release(self) -> None:
        """Give the place back when no run was started after :meth:`acquire` (or :meth:`claim`: the run it made is
        forgotten, so that its request finds no run that will never start)."""
        with self._claims:
            run = self.active
            if run is not None and run.process is None and not run.finished.is_set():
                self.active = None
                if run.request_id is not None and self._recent.get(run.request_id) is run:
                    del self._recent[run.request_id]
            self._lock.release()

    def claim(self, request_id: str, derived: bool = False) -> tuple[Run, bool]:
        """The run that answers request ``request_id``: the one it already has, or a new one (not started yet).

        A request that arrives again gets its run back — the run going, or one that ended and is still on record
        (see the module's docs) — and ``(run, False)``; follow it with :meth:`Run.outcome`. Otherwise the one
        run's place is taken for a new run, given back by :meth:`start` (or :meth:`run`, :meth:`start_detached`)
        when it ends, or by :meth:`release` when it is not started.

        Args:
            request_id: the client's id, or one derived from the request.
            derived: True when the id was derived: it then finds only the run going, or one that published in the
                last :data:`DERIVED_ATTACH_S` seconds.

        Returns:
            ``(run, new)``.

        Raises:
            TrainingBusy: another request's run is going.
        """
        with self._claims:
            found = self.find(request_id, derived)
            if found is not None:
                # while the run goes, a repeat is a retry (the client's, or the gateway's after a lost connection)
                log = logger.warning if found.state == "running" else logger.info
                log("request %s arrived again: it follows its run %s (%s)", request_id, found.run_id, found.state)
                return found, False
            self.acquire()
            run = self._new_run(request_id)
            self.active = run
            self._remember(run)
            return run, True

    def find(self, request_id: str, derived: bool = False) -> Optional[Run]:
        """The run of request ``request_id`` that a request arriving again follows, or None (see :meth:`claim`)."""
        active = self.active
        if active is not None and active.request_id == request_id and not active.finished.is_set():
            return active
        run = self._recent.get(request_id)
        if run is not None and run.finished.is_set():
            if not derived:
                return run
            if run.report is not None and run.ended is not None and time.time() - run.ended < DERIVED_ATTACH_S:
                return run
            return None
        if derived or run is not None:
            return None
        return self._published_run(request_id)

    def _published_run(self, request_id: str) -> Optional[Run]:
        """A run that published for the client's ``request_id``, from its ``report.json`` (one a tuner before this one
        ran), or None."""
        for report_path in sorted(self.runs_dir.glob(f"*/{REPORT_FILE}"), reverse=True):
            try:
                report = json.loads(report_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(report, dict) and report.get("request_id") == request_id:
                run = Run(
                    run_id=report_path.parent.name,
                    run_dir=report_path.parent,
                    started=report_path.stat().st_mtime - float(report.get("wall_seconds") or 0),
                    parent=str(report.get("parent_version") or ""),
                    request_id=request_id,
                    report=report,
                    ended=report_path.stat().st_mtime,
                    final_state="done",
                )
                run.finished.set()
                return run
        return None

    def _new_run(self, request_id: Optional[str] = None) -> Run:
        run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        return Run(run_id=run_id, run_dir=self.runs_dir / run_id, started=time.time(), request_id=request_id)

    def _remember(self, run: Run) -> None:
        if run.request_id is None:
            return
        self._recent[run.request_id] = run
        self._recent.move_to_end(run.request_id)
        while len(self._recent) > RECENT_RUNS:
            oldest = next(iter(self._recent))
            if not self._recent[oldest].finished.is_set():
                break
            del self._recent[oldest]

    def run(self, prepare: Prepare, run: Optional[Run] = None) -> dict:
        """A whole run (after :meth:`acquire` or :meth:`claim`): :meth:`start`, then :meth:`finish`; returns its
        report."""
        return self.finish(self.start(prepare, run))

    def start_detached(self, prepare: Prepare, run: Optional[Run] = None) -> Run:
        """:meth:`start` a run (after :meth:`acquire` or :meth:`claim`) and follow it to its end in a thread of its
        own."""
        run = self.start(prepare, run)
        try:
            threading.Thread(target=self._finish_quietly, args=(run,), name=f"train-{run.run_id}", daemon=True).start()
        except BaseException as exc:
            raise self._abandon(run, exc) from exc
        return run

    def _finish_quietly(self, run: Run) -> None:
        try:
            self.finish(run)
        except TrainingFailed:
            pass  # recorded in progress and logged

    def start(self, prepare: Prepare, run: Optional[Run] = None) -> Run:
        """Begin a run (after :meth:`acquire`, or the run :meth:`claim` gave): ``prepare`` checks and writes its
        inputs, then its worker starts.

        Raises:
            TrainingInputError, TrainingFailed: as :meth:`finish` (the run is recorded and cleaned up, the place
                released).
        """
        run = run if run is not None else self._new_run()
        self.active = run
        try:
            run.parent = self.registry.current()
            self.progress = {
                "state": "running",
                "phase": "preparing",
                "run_id": run.run_id,
                "started_at": run.started,
                "parent_version": run.parent,
                **({"request_id": run.request_id} if run.request_id else {}),
            }
            run.inputs_dir.mkdir(parents=True)
            job = prepare(run)
            job_path = job.write(run.inputs_dir / JOB_FILE)
            if self._stop_asked(run):
                raise self._stopped(run, "before training")
            self._set_phase(PHASES[0])
            if self.cluster is not None:
                run.process = KubernetesJobRun(
                    self.kube_api, self.cluster, run.run_id, job_path, run.run_dir / EVENTS_FILE
                )
            else:
                run.process = TrainingProcess(
                    self.worker_argv(job_path, run.run_dir / EVENTS_FILE), self.worker_env(), run.run_dir, self.niceness
                )
            run.process.start()
            self.progress = {**self.progress, "pid": run.process.pid}
        except Exception as exc:
            raise self._abandon(run, exc) from exc
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: recorded, then on their way unchanged
            self._abandon(run, exc)
            raise
        return run

    def finish(self, run: Run) -> dict:
        """Follow a started run to its end and publish its model; releases the place when done.

        Only a run whose worker exported a model, with no cancel or stop asked for, publishes. A run that fails
        leaves CURRENT and the registry as they were, removes its run directory (the half-written export), shows
        ``state: failed`` (``cancelled`` for a cancel or a stop) with ``phase`` and ``error`` in :attr:`progress`,
        and raises.

        Raises:
            TrainingInputError: the run failed on bad input: a ``TrainingFailed`` and a ``ValueError``.
            TrainingFailed: the run failed on any other error; the message names the run, the phase and the cause
                (also its ``__cause__``).
        """
        try:
            try:
                report = self._follow(run)
                if self._stop_asked(run):
                    raise self._stopped(run, "after training; the tuned model is not published")
                self._set_phase("publishing")
                version = self._publish(run, report)
            except Exception as exc:
                raise self._abandon(run, exc) from exc
            except BaseException as exc:  # KeyboardInterrupt, SystemExit: recorded, then on their way unchanged
                self._abandon(run, exc)
                raise
            return self._published(run, version, report)  # the run has succeeded, whatever happens to its files
        finally:
            self._end(run)

    def cancel(self, run_id: Optional[str] = None) -> Run:
        """Ask the run that is going to stop: its worker's process group is ended and nothing is published.

        Args:
            run_id: the run to cancel; None: whichever is going.

        Returns:
            The run; its ``finished`` event is set once its state in :attr:`progress` is final.

        Raises:
            TrainingNotRunning: no run is going, or ``run_id`` names another one (a ``ValueError``).
            ValueError: ``run_id`` is not a string.
        """
        if run_id is not None and not isinstance(run_id, str):
            raise ValueError(f"parameter 'run_id' must be a string, got {run_id!r}")
        run = self.active
        if run is None or run.finished.is_set():
            last = self.progress
            after = f" (the last run, {last['run_id']}, is {last.get('state')})" if last.get("run_id") else ""
            raise TrainingNotRunning(f"no /train run is going: nothing to cancel{after}")
        if run_id is not None and run_id != run.run_id:
            raise TrainingNotRunning(f"run {run_id!r} is not going: the run going is {run.run_id!r}")
        run.cancelled.set()
        logger.info("run %s: cancel asked for while %s", run.run_id, self.progress.get("phase"))
        return run

    def request_stop(self) -> None:
        """Ask the run going, and any run started later, to stop and publish nothing (the service is closing)."""
        self._stop.set()

    def close(self) -> None:
        """Stop the run going: its worker's process group is ended (SIGTERM, then SIGKILL); nothing is published."""
        self.request_stop()
        run = self.active
        if run is not None and run.process is not None:
            run.process.stop()

    def last_summary(self) -> Optional[dict]:
        """The headline numbers of the last published run (None before the first)."""
        r = self.last_report
        if r is None:
            return None
        keys = ("model_version", "parent_version", "before", "after", "epochs")
        summary = {**{key: r[key] for key in keys}, **{key: r[key] for key in SUMMARY_KEYS if key in r}}
        gate = r.get("gate") or {}
        return {**summary, "promoted": gate.get("promoted", True), "gate": gate.get("reason")}

    # -- following a run ------------------------------------------------------------------------------------------
    def _on_event(self, event: dict) -> None:
        """Fold one worker event into :attr:`progress` (one reference swap: readers see a consistent dict)."""
        self.observer.training_event(event)
        kind = event.get("event")
        update: dict[str, Any] = {"last_event": kind, "updated_at": time.time()}
        if "pid" in event and kind != FAILED:  # the process that trains (rank 0 under torchrun)
            update["pid"] = event["pid"]
        phase = phase_after(event, self.progress.get("phase"))
        if phase != self.progress.get("phase"):
            update["phase"] = phase
        if kind == "before":
            update["before"] = event["metrics"]
        elif kind in ("step", "epoch"):
            update.update({k: event[k] for k in PROGRESS_KEYS if k in event})
        elif kind == "eval":
            update["last_eval"] = {"epoch": event["epoch"], **event["metrics"]}
        elif kind == "after":
            update["after"] = event["metrics"]
        elif kind == "gate":
            update["gate"] = event.get("reason")
        self.progress = {**self.progress, **update}

    def _set_phase(self, phase: str) -> None:
        self.progress = {**self.progress, "phase": phase}

    def _stop_asked(self, run: Run) -> bool:
        return self._stop.is_set() or run.cancelled.is_set()

    def _stopped(self, run: Run, when: Optional[str] = None) -> TrainingCancelled:
        """The error of a run stopped ``when`` (default: where its progress is)."""
        why = "cancelled" if run.cancelled.is_set() else "stopped: the tuner is closing"
        progress = self.progress
        if when is None and progress.get("step"):
            when = (
                f"at epoch {progress.get('epoch')}/{progress.get('epochs')}, step {progress['step']}/"
                f"{progress.get('total_steps')}"
            )
        return TrainingCancelled(f"the run was {why} {when or 'while ' + str(progress.get('phase'))}")

    def _clean(self, run: Run) -> Callable[[str], str]:
        """Takes the run directory, the registry and the ``hidden`` folders out of a message."""
        roots = {"the run directory": run.run_dir, "the registry": self.registry.root, **self.hidden}
        return lambda message: hide_paths(message, roots)

    def _follow(self, run: Run) -> dict:
        """Follow the worker to its end (its events into :attr:`progress`); returns the report of the model it
        exported to the run's ``model`` directory (no version yet), which is also written into its ``model.json``.

        Raises:
            TrainingCancelled: a cancel or a stop was asked for (the process group is ended first).
            TrainingProcessError: the worker failed or was killed (:class:`TrainingProcessInputError` when it
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
        if process.failed is not None and process.failed.get("phase") in PHASES:
            self._set_phase(process.failed["phase"])
        if returncode != 0:
            raise process.failure(returncode, self._clean(run))
        return self._exported_report(run)

    def _exported_report(self, run: Run) -> dict:
        """The service's report of the model the worker exported, written into its ``model.json`` too."""
        model_dir = run.model_dir
        child_report = json.loads((model_dir / REPORT_FILE).read_text(encoding="utf-8"))
        (model_dir / REPORT_FILE).unlink()  # the run's report.json is the service's, written beside the model
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

    # -- how a run ends -------------------------------------------------------------------------------------------
    def _publish(self, run: Run, report: dict) -> str:
        """Publish the run's model: as CURRENT when the gate promoted it, else as a candidate (listed, not served).

        A promoted candidate goes live only if CURRENT still names the version it was measured against (checked
        under the registry's lock); when an admin moved CURRENT meanwhile, it stays a candidate, and its report says
        why. A run with the gate off replaces CURRENT as before the gate existed.
        """
        gate = report.setdefault("gate", gate_off().to_dict())
        if not gate.get("promoted"):
            return self.registry.publish(run.model_dir, move=True, make_current=False)
        if not gate.get("enabled", True) or not run.parent:
            return self.registry.publish(run.model_dir, move=True)
        try:
            return self.registry.publish(run.model_dir, move=True, expect_current=run.parent)
        except CurrentMoved as exc:
            report["gate"] = refused_after_all(
                gate,
                f"CURRENT moved from {run.parent} to {exc.current} during the run, and the candidate was measured "
                f"against {run.parent}",
            )
            manifest = ModelManifest.read(run.model_dir)
            dataclasses.replace(manifest, report=report).write(run.model_dir)
            return self.registry.publish(run.model_dir, move=True, make_current=False)

    def _published(self, run: Run, version: str, report: dict) -> dict:
        """Record a run that published ``version``: its report (also ``report.json`` in its directory)."""
        shutil.rmtree(run.inputs_dir, ignore_errors=True)  # train.log stays, with report.json
        (run.run_dir / EVENTS_FILE).unlink(missing_ok=True)
        (run.run_dir / PROCESS_FILE).unlink(missing_ok=True)
        pruned = self._prune_after_publish(version)
        if pruned:
            report["pruned_versions"] = pruned
        report["model_version"] = version
        report["serving_version"] = self.registry.current()
        report["wall_seconds"] = round(time.time() - run.started, 3)
        if run.request_id is not None:
            report["request_id"] = run.request_id
        try:
            (run.run_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:  # the report also lives in the version's model.json
            logger.warning("run %s published %s but could not write its report.json: %s", run.run_id, version, exc)
        self.last_report = report
        run.report, run.final_state = report, "done"
        promoted = bool(report["gate"].get("promoted"))
        self.observer.training_finished("published" if promoted else "refused")
        self.observer.model_version(self.registry.current())
        self.progress = {
            "state": "done",
            "run_id": run.run_id,
            "model_version": version,
            "parent_version": run.parent,
            "promoted": promoted,
            "gate": report["gate"].get("reason"),
            "serving_version": report["serving_version"],
            "finished_at": time.time(),
            "wall_seconds": report["wall_seconds"],
        }
        logger.info(
            "run %s published %s (t2i R@5 %.3f → %.3f); %s",
            run.run_id,
            version,
            report["before"]["t2i_r5"],
            report["after"]["t2i_r5"],
            report["gate"].get("reason"),
        )
        return report

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

    def _failure(self, run_id: str, exc: BaseException) -> TrainingFailed:
        """Record a failed run in :attr:`progress` and build the error the client gets (phase and cause named)."""
        phase = self.progress.get("phase") or "preparing"
        cause = f"{type(exc).__name__}: {exc}"
        state = "cancelled" if isinstance(exc, TrainingCancelled) else "failed"
        self.progress = {**self.progress, "state": state, "phase": phase, "error": cause, "finished_at": time.time()}
        message = (
            f"/train run {run_id} failed while {phase}: {cause} (nothing was published; CURRENT is still "
            f"{self.registry.current()})"
        )
        (logger.info if state == "cancelled" else logger.error)("%s", message)
        self.observer.training_finished(state)
        kind = TrainingInputError if isinstance(exc, ValueError) else TrainingFailed
        return kind(message, run_id=run_id, phase=phase)

    def _abandon(self, run: Run, exc: BaseException) -> TrainingFailed:
        """End a run that failed: its process group stopped, recorded in :attr:`progress`, its directory removed,
        the place released. Returns the error for the client."""
        try:
            if run.process is not None:
                run.process.stop()
            failure = self._failure(run.run_id, exc)
            run.error, run.final_state = failure, self.progress.get("state", "failed")
            shutil.rmtree(run.run_dir, ignore_errors=True)
        finally:
            self._end(run)
        return failure

    def _end(self, run: Run) -> None:
        """The run is over (its state in :attr:`progress` is final): release the place, once."""
        if run.finished.is_set():
            return
        self.active = None
        run.ended = time.time()
        run.finished.set()
        self._lock.release()


__all__ = [
    "DEFAULT_TRAIN_NICENESS",
    "DERIVED_ATTACH_S",
    "MAX_NICENESS",
    "RECENT_RUNS",
    "Run",
    "RunObserver",
    "TrainingBusy",
    "TrainingCancelled",
    "TrainingFailed",
    "TrainingInputError",
    "TrainingNotRunning",
    "TrainingProcess",
    "TrainingProcessError",
    "TrainingProcessInputError",
    "TrainingRuns",
    "clean_unfinished_runs",
    "cpu_count",
    "default_torch_threads",
    "hide_paths",
    "signal_cause",
    "worker_argv",
    "worker_env",
]
