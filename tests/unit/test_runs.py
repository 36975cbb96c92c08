"""The training-run manager (:mod:`cliptuner.serve.runs`) without a Flow and without an Executor.

Most runs here start a small stand-in worker (a Python one-liner, no torch) that writes events as the real worker
does, so that each way a run can end is fast and exact: a structured ``failed`` event of kind ``input`` or
``error``, a worker killed by a signal, one that exits without a word, a cancel, a publish. The real worker's own
failure event is checked once, on a PAIRS file with an image that does not decode.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from cliptuner.config import TrainConfig
from cliptuner.model.registry import Registry
from cliptuner.serve import launch
from cliptuner.serve import runs as runs_module
from cliptuner.serve.runs import (
    EVENTS_FILE,
    LOG_FILE,
    PROCESS_FILE,
    TrainingBusy,
    TrainingCancelled,
    TrainingFailed,
    TrainingInputError,
    TrainingNotRunning,
    TrainingProcessError,
    TrainingProcessInputError,
    TrainingRuns,
    clean_unfinished_runs,
    hide_paths,
    worker_argv,
)
from cliptuner.train.job import TrainJob

# A stand-in worker: `python -c FAKE MODE JOB EVENTS`; it writes events as the worker does (JSON lines with pid)
FAKE = textwrap.dedent(
    """
    import json, os, shutil, sys, time

    mode, job_path, events_path = sys.argv[1:4]
    job = json.load(open(job_path))

    def emit(event):
        with open(events_path, "a") as fh:
            fh.write(json.dumps({**event, "pid": os.getpid()}) + "\\n")

    emit({"event": "loaded", "world_size": 1, "device": "cpu"})
    if mode == "input":
        emit({"event": "before", "metrics": {"t2i_r5": 0.1}})
        image = os.path.join(os.path.dirname(job_path), "images", "000003-cat.png")
        emit({"event": "failed", "phase": "training", "kind": "input", "rank": 0,
              "message": f"image 'cat' ({image}): cannot decode image: not a PNG"})
        sys.exit(2)
    if mode == "error":
        emit({"event": "failed", "phase": "evaluating", "kind": "error", "rank": 0,
              "message": "RuntimeError: CUDA error: device-side assert triggered"})
        sys.exit(1)
    if mode == "silent":
        print("Segmentation fault (core dumped)", file=sys.stderr)
        sys.exit(139)
    if mode == "train":
        emit({"event": "before", "metrics": {"t2i_r5": 0.1}})
        emit({"event": "step", "epoch": 1, "epochs": 9, "step": 1, "total_steps": 90, "loss": 2.5})
        time.sleep(600)
    if mode == "publish":
        shutil.copytree(os.environ["FAKE_MODEL"], job["out"])
        split = {"train_images": 18, "train_pairs": 36, "eval_images": 6, "eval_pairs": 12}
        report = {"before": {"t2i_r5": 0.1}, "after": {"t2i_r5": 0.4}, "epochs": 1, "split": split,
                  "model_version": "model", "model": {"arch": "x"}, "wall_seconds": 1.0}
        if os.environ.get("FAKE_GATE"):
            report["gate"] = json.loads(os.environ["FAKE_GATE"])
        open(os.path.join(job["out"], "report.json"), "w").write(json.dumps(report))
        emit({"event": "after", "metrics": report["after"]})
    """
)


@pytest.fixture
def registry(tmp_path, tiny_model_dir):
    registry = Registry(tmp_path / "models")
    registry.publish(tiny_model_dir)  # v1
    return registry


class Observer:
    def __init__(self):
        self.events, self.finished, self.versions = [], [], []

    def training_event(self, event):
        self.events.append(event)

    def training_finished(self, outcome):
        self.finished.append(outcome)

    def model_version(self, version):
        self.versions.append(version)


def fake_runs(tmp_path, registry, mode, monkeypatch, tiny_model_dir, **kwargs) -> TrainingRuns:
    """TrainingRuns whose worker is the stand-in in ``mode``."""
    runs = TrainingRuns(tmp_path / "runs", registry, niceness=0, observer=Observer(), **kwargs)
    runs.worker_argv = lambda job, events: [sys.executable, "-c", FAKE, mode, str(job), str(events)]
    monkeypatch.setenv("FAKE_MODEL", str(tiny_model_dir))
    return runs


def prepare(run):
    run.sources = {"source": "request docs"}
    run.init = f"version {run.parent}"
    return TrainJob(data=str(run.inputs_dir / "train.csv"), out=str(run.model_dir))


def wait_for_step(runs, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if runs.progress.get("step"):
            return runs.progress
        time.sleep(0.02)
    pytest.fail("the stand-in worker reported no step")


def assert_nothing_left(runs, registry):
    assert registry.current() == "v1" and registry.versions() == ["v1"]
    assert list(runs.runs_dir.iterdir()) == []  # the run's directory went with it
    runs.acquire()  # the next run may start
    runs.release()


def test_a_worker_that_reports_bad_input_fails_the_run_as_an_input_error_naming_the_cause(
    tmp_path, registry, monkeypatch, tiny_model_dir
):
    runs = fake_runs(tmp_path, registry, "input", monkeypatch, tiny_model_dir)
    runs.acquire()
    with pytest.raises(TrainingInputError) as info:
        runs.run(prepare)
    error = info.value
    assert isinstance(error, ValueError) and error.phase == "training"  # the phase the worker reported
    cause = error.__cause__
    assert isinstance(cause, TrainingProcessInputError) and cause.returncode == 2
    assert "the training process exited with code 2: image 'cat' (inputs/images/000003-cat.png): cannot decode" in str(
        error
    )
    assert str(tmp_path) not in str(error)  # the run directory's path is not shown
    assert "nothing was published; CURRENT is still v1" in str(error)
    assert runs.progress["state"] == "failed" and runs.progress["error"].startswith("TrainingProcessInputError: ")
    assert runs.observer.finished == ["failed"] and runs.observer.events[-1]["event"] == "failed"
    assert_nothing_left(runs, registry)


def test_a_worker_that_reports_an_error_fails_the_run_with_its_message(tmp_path, registry, monkeypatch, tiny_model_dir):
    runs = fake_runs(tmp_path, registry, "error", monkeypatch, tiny_model_dir)
    runs.acquire()
    with pytest.raises(TrainingFailed) as info:
        runs.run(prepare)
    error = info.value
    assert not isinstance(error, ValueError) and error.phase == "evaluating"
    assert type(error.__cause__) is TrainingProcessError and error.__cause__.returncode == 1
    assert "exited with code 1: RuntimeError: CUDA error: device-side assert triggered" in str(error)
    assert_nothing_left(runs, registry)


def test_a_worker_that_dies_without_a_failed_event_is_named_by_its_exit_status_and_log(
    tmp_path, registry, monkeypatch, tiny_model_dir
):
    runs = fake_runs(tmp_path, registry, "silent", monkeypatch, tiny_model_dir)
    runs.acquire()
    with pytest.raises(TrainingFailed) as info:
        runs.run(prepare)
    error = info.value
    assert not isinstance(error, ValueError) and error.__cause__.returncode == 139
    assert "exited with code 139 without reporting why; its log ends:\nSegmentation fault (core dumped)" in str(error)
    assert_nothing_left(runs, registry)


def test_a_killed_worker_fails_the_run_naming_the_signal(tmp_path, registry, monkeypatch, tiny_model_dir):
    runs = fake_runs(tmp_path, registry, "train", monkeypatch, tiny_model_dir)
    runs.acquire()
    box = {}
    thread = threading.Thread(target=lambda: box.update(error=pytest.raises(TrainingFailed, runs.run, prepare)))
    thread.start()
    progress = wait_for_step(runs)
    run = runs.active
    assert progress["pid"] == run.process.pid != os.getpid() and progress["phase"] == "training"
    assert json.loads((run.run_dir / PROCESS_FILE).read_text()) == {"pgid": run.process.pid}
    os.killpg(run.process.pid, signal.SIGKILL)
    thread.join(60)
    error = box["error"].value
    assert not isinstance(error, ValueError) and error.phase == "training" and error.run_id == run.run_id
    assert "the training process was killed by signal 9 (SIGKILL)" in str(error)
    assert error.__cause__.returncode == -signal.SIGKILL
    assert_nothing_left(runs, registry)


def test_a_cancel_ends_the_worker_group_and_publishes_nothing(tmp_path, registry, monkeypatch, tiny_model_dir):
    runs = fake_runs(tmp_path, registry, "train", monkeypatch, tiny_model_dir)
    with pytest.raises(TrainingNotRunning, match="no /train run is going"):
        runs.cancel()
    runs.acquire()
    run = runs.start_detached(prepare)
    wait_for_step(runs)
    with pytest.raises(TrainingBusy, match=f"a /train run is already going \\(run {run.run_id}, phase training"):
        runs.acquire()
    with pytest.raises(TrainingNotRunning, match=f"the run going is '{run.run_id}'"):
        runs.cancel("another")
    assert runs.cancel(run.run_id) is run
    assert run.finished.wait(30)
    assert run.process.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(run.process.pid, 0)  # its whole process group is gone
    assert runs.progress["state"] == "cancelled" and runs.progress["phase"] == "training"
    assert runs.progress["error"] == "TrainingCancelled: the run was cancelled at epoch 1/9, step 1/90"
    assert runs.observer.finished == ["cancelled"]
    assert_nothing_left(runs, registry)


def test_a_stop_before_the_worker_starts_publishes_nothing(tmp_path, registry, monkeypatch, tiny_model_dir):
    runs = fake_runs(tmp_path, registry, "publish", monkeypatch, tiny_model_dir)
    runs.request_stop()  # the service is closing
    runs.acquire()
    with pytest.raises(TrainingFailed) as info:
        runs.run(prepare)
    assert isinstance(info.value.__cause__, TrainingCancelled)
    assert "the run was stopped: the tuner is closing before training" in str(info.value)
    assert_nothing_left(runs, registry)


def test_a_run_that_exported_publishes_its_model_with_the_report(tmp_path, registry, monkeypatch, tiny_model_dir):
    runs = fake_runs(tmp_path, registry, "publish", monkeypatch, tiny_model_dir, keep_versions=1)
    runs.acquire()
    report = runs.run(prepare)
    assert report["model_version"] == registry.current() == "v2" and registry.versions() == ["v2"]
    assert report["parent_version"] == "v1" and report["init"] == "version v1" and report["pruned_versions"] == ["v1"]
    assert report["split"] == {
        "train_images": 18,
        "train_pairs": 36,
        "eval_images": 6,
        "eval_pairs": 12,
        "source": "request docs",
    }
    assert "model" not in report  # the worker's spec names server paths
    assert registry.metadata("v2")["report"]["after"] == {"t2i_r5": 0.4}
    (run_dir,) = list(runs.runs_dir.iterdir())
    assert sorted(p.name for p in run_dir.iterdir()) == ["report.json", "train.log"]
    assert runs.progress["state"] == "done" and runs.progress["model_version"] == "v2"
    assert runs.last_summary()["after"] == {"t2i_r5": 0.4}
    assert runs.observer.finished == ["published"] and runs.observer.versions == ["v2"]


REFUSED_GATE = {"enabled": True, "promoted": False, "reason": "not promoted: mean_r5 10.0 vs 20.0", "failed": "gain"}
PASSED_GATE = {"enabled": True, "promoted": True, "reason": "promoted: mean_r5 40.0 vs 10.0", "failed": None}


def test_a_run_the_gate_refused_is_published_as_a_candidate_and_serving_stays(
    tmp_path, registry, monkeypatch, tiny_model_dir
):
    monkeypatch.setenv("FAKE_GATE", json.dumps(REFUSED_GATE))
    runs = fake_runs(tmp_path, registry, "publish", monkeypatch, tiny_model_dir)
    runs.acquire()
    report = runs.run(prepare)
    assert report["model_version"] == "v2" and report["serving_version"] == registry.current() == "v1"
    assert report["gate"] == REFUSED_GATE and registry.metadata("v2")["report"]["gate"] == REFUSED_GATE
    (summary,) = [s for s in registry.summaries() if s["version"] == "v2"]
    assert summary["status"] == "candidate" and summary["report"]["gate"]["reason"] == REFUSED_GATE["reason"]
    assert runs.progress["state"] == "done" and runs.progress["promoted"] is False
    assert runs.progress["gate"] == REFUSED_GATE["reason"] and runs.progress["serving_version"] == "v1"
    assert runs.last_summary()["promoted"] is False and runs.last_summary()["gate"] == REFUSED_GATE["reason"]
    assert runs.observer.finished == ["refused"] and runs.observer.versions == ["v1"]


def test_a_promoted_run_stays_a_candidate_when_current_moved_during_it(tmp_path, registry, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("FAKE_GATE", json.dumps(PASSED_GATE))
    runs = fake_runs(tmp_path, registry, "publish", monkeypatch, tiny_model_dir)

    def prepare_then_move_current(run):
        registry.publish(tiny_model_dir)  # an admin's publish: CURRENT is v2 while the run measured against v1
        return prepare(run)

    runs.acquire()
    report = runs.run(prepare_then_move_current)
    assert report["model_version"] == "v3" and registry.current() == "v2"
    assert report["gate"]["promoted"] is False and report["gate"]["failed"] == "current moved"
    assert "CURRENT moved from v1 to v2 during the run" in report["gate"]["reason"]
    assert registry.metadata("v3")["report"]["gate"] == report["gate"]  # the listing says why
    assert {s["version"]: s["status"] for s in registry.summaries()} == {
        "v1": "published",
        "v2": "current",
        "v3": "candidate",
    }


def test_a_run_the_gate_promoted_replaces_current(tmp_path, registry, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("FAKE_GATE", json.dumps(PASSED_GATE))
    runs = fake_runs(tmp_path, registry, "publish", monkeypatch, tiny_model_dir)
    runs.acquire()
    report = runs.run(prepare)
    assert report["model_version"] == report["serving_version"] == registry.current() == "v2"
    assert runs.progress["promoted"] is True and runs.observer.finished == ["published"]


def test_the_worker_command_runs_under_torchrun_with_several_processes(tmp_path):
    job, events = tmp_path / "job.json", tmp_path / "events.jsonl"
    single = worker_argv(job, events)
    assert single == [sys.executable, "-m", "cliptuner.train.worker", str(job), "--events", str(events)]
    assert worker_argv(job, events, 3) == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "3",
        *single[1:],
    ]


def test_the_process_group_is_stopped_by_the_one_routine(tmp_path, registry, monkeypatch, tiny_model_dir):
    """A worker's group ends through :func:`cliptuner.serve.launch.stop_group`, as the service launcher's does."""
    calls = []
    real = launch.stop_group
    monkeypatch.setattr("cliptuner.serve.runs.stop_group", lambda proc, grace: (calls.append(grace), real(proc, grace)))
    runs = fake_runs(tmp_path, registry, "train", monkeypatch, tiny_model_dir)
    runs.acquire()
    run = runs.start_detached(prepare)
    wait_for_step(runs)
    runs.close()
    assert run.finished.wait(30) and calls and run.process.poll() is not None
    assert runs.progress["state"] == "cancelled"


def test_clean_unfinished_runs_kills_only_a_group_working_in_the_run(tmp_path):
    """A recorded pid that another process holds now (pid reuse) is not killed; the directory still goes."""
    stranger = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], cwd=tmp_path, start_new_session=True
    )
    try:
        runs = tmp_path / "runs"
        (runs / "r-1").mkdir(parents=True)
        (runs / "r-1" / PROCESS_FILE).write_text(json.dumps({"pgid": stranger.pid}))  # not working in r-1
        (runs / "r-2").mkdir()  # no process file: a run that died before its process started
        assert clean_unfinished_runs(runs, wait_s=1) == ["r-1", "r-2"]
        assert list(runs.iterdir()) == [] and stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_clean_unfinished_runs_kills_a_group_left_working_in_its_run(tmp_path):
    run_dir = tmp_path / "runs" / "r-1"
    run_dir.mkdir(parents=True)
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], cwd=run_dir, start_new_session=True
    )
    try:
        (run_dir / PROCESS_FILE).write_text(json.dumps({"pgid": orphan.pid}))
        (tmp_path / "runs" / "done").mkdir()
        (tmp_path / "runs" / "done" / "report.json").write_text("{}")  # a published run stays
        reaper = threading.Thread(target=orphan.wait)  # reaped here, as its parent, once killed
        reaper.start()
        assert clean_unfinished_runs(tmp_path / "runs", wait_s=10) == ["r-1"]
        reaper.join(10)
        assert orphan.returncode == -signal.SIGKILL
        assert [p.name for p in (tmp_path / "runs").iterdir()] == ["done"]
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def test_hide_paths_names_roots_by_label():
    message = "cannot read '/srv/ws/data' or /srv/ws/data/a/b.png in /srv/ws/runs/r1/inputs"
    roots = {"the run directory": "/srv/ws/runs/r1", "the data root": "/srv/ws/data"}
    assert hide_paths(message, roots) == "cannot read the data root or a/b.png in inputs"


def test_the_real_worker_reports_an_undecodable_image_as_one_input_failure(tmp_path):
    """``python -m cliptuner.train.worker``: bad input exits 2 with one ``failed`` event of kind input, naming the
    image; the traceback-free message is the whole contract, its log is for operators."""
    from cliptuner.train import synthetic

    csv = synthetic.write_csv(tmp_path / "data", n_images=12, domain="domain", seed=1, captions_per_image=1)
    broken = sorted((tmp_path / "data").rglob("*.png"))[3]
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but not really a PNG")
    cfg = TrainConfig(device="cpu", batch_size=4, epochs=1, warmup_steps=1)
    job = TrainJob(data=str(csv), out=str(tmp_path / "model"), cfg=cfg, plots=False)
    job_path = job.write(tmp_path / "run" / "job.json")
    events = tmp_path / "run" / EVENTS_FILE
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "run" / LOG_FILE, "wb") as log:
        code = subprocess.run(
            worker_argv(job_path, events), stdout=log, stderr=subprocess.STDOUT, env=env, timeout=300
        ).returncode
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    failed = [event for event in lines if event["event"] == "failed"]
    assert code == 2 and len(failed) == 1 and lines[-1] is failed[0]
    assert failed[0]["kind"] == "input" and failed[0]["phase"] in ("loading", "evaluating", "training")
    assert broken.name in failed[0]["message"] and "decode" in failed[0]["message"]
    assert not (tmp_path / "model").exists()
    shutil.rmtree(tmp_path / "run")


# -- a request that arrives again follows its run (claim) -------------------------------------------------------------
def test_a_request_claimed_again_while_its_run_goes_follows_that_run_and_gets_its_report(
    tmp_path, registry, monkeypatch, tiny_model_dir
):
    runs = fake_runs(tmp_path, registry, "publish", monkeypatch, tiny_model_dir)
    first, new = runs.claim("nightly-42")
    assert new and first.request_id == "nightly-42"
    again, new_again = runs.claim("nightly-42")  # before it even started: same run, no TrainingBusy
    assert not new_again and again is first
    with pytest.raises(TrainingBusy):  # another request still waits its turn
        runs.claim("another")
    results = []
    follower = threading.Thread(target=lambda: results.append(again.outcome(timeout=60)))
    follower.start()
    report = runs.run(prepare, first)
    follower.join(60)
    assert results == [report] and report["model_version"] == "v2" and report["request_id"] == "nightly-42"
    assert registry.versions() == ["v1", "v2"]  # one run, one version
    assert runs.progress["state"] == "done"
    # after it published: the client's id still finds it, also from its report.json for a tuner started later
    assert runs.claim("nightly-42") == (first, False)
    later = TrainingRuns(tmp_path / "runs", registry, niceness=0)
    found, new = later.claim("nightly-42")
    assert not new and found.run_id == first.run_id and found.outcome()["model_version"] == "v2"
    assert later.progress == {"state": "idle"}  # nothing started
    fresh, new = later.claim("nightly-43")
    assert new
    later.release()  # not started after all: the request finds nothing, and may start anew
    assert later.find("nightly-43") is None and later.claim("nightly-43")[1]
    later.release()


def test_a_derived_request_id_finds_only_a_going_or_just_published_run(tmp_path, registry, monkeypatch, tiny_model_dir):
    runs = fake_runs(tmp_path, registry, "publish", monkeypatch, tiny_model_dir)
    run, _ = runs.claim("derived-abc", derived=True)
    runs.run(prepare, run)
    assert runs.claim("derived-abc", derived=True) == (run, False)  # a retry that arrives just after the publish
    run.ended -= runs_module.DERIVED_ATTACH_S + 1  # long after: the same content is a new request
    again, new = runs.claim("derived-abc", derived=True)
    assert new and again is not run
    runs.release()


def test_a_failed_run_gives_its_error_to_a_request_that_arrives_again_with_the_clients_id(
    tmp_path, registry, monkeypatch, tiny_model_dir
):
    runs = fake_runs(tmp_path, registry, "error", monkeypatch, tiny_model_dir)
    run, _ = runs.claim("job-7")
    with pytest.raises(TrainingFailed) as first:
        runs.run(prepare, run)
    again, new = runs.claim("job-7")
    assert not new and again.state == "failed"
    with pytest.raises(TrainingFailed) as second:
        again.outcome()
    assert second.value is first.value and "device-side assert" in str(second.value)
    # a derived id does not stick to a failure: the same content may be tried again
    failed, _ = runs.claim("derived-x", derived=True)
    with pytest.raises(TrainingFailed):
        runs.run(prepare, failed)
    retry, new = runs.claim("derived-x", derived=True)
    assert new and retry is not failed
    runs.release()


def test_a_cancelled_run_reads_cancelled_to_the_request_that_follows_it(
    tmp_path, registry, monkeypatch, tiny_model_dir
):
    runs = fake_runs(tmp_path, registry, "train", monkeypatch, tiny_model_dir)
    run, _ = runs.claim("job-8")
    started = runs.start_detached(prepare, run)
    wait_for_step(runs)
    follower, new = runs.claim("job-8")
    assert not new and follower.state == "running"
    runs.cancel(started.run_id)
    with pytest.raises(TrainingFailed, match="cancelled"):
        follower.outcome(timeout=60)
    assert follower.state == "cancelled"
    assert_nothing_left(runs, registry)
