"""/train runs its training in a worker process (``python -m cliptuner.train.worker``), follows it through its
events, and publishes what it exported; ``wait=False`` answers with a run id at once; ``/train/cancel`` ends a run.

The tuner is a plain object on a workspace whose registry holds ``v1``. Each run starts a Python process that
imports torch, so the runs here are few and short; a run meant to be killed or cancelled is given many epochs,
and ended as soon as it reports its first optimizer step.
"""

import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from docarray import DocList
from PIL import Image
from support import QUICK, pair_docs, png, run

from cliptuner.config import EvalConfig, ModelSpec
from cliptuner.model.images import decode_image
from cliptuner.model.registry import Registry
from cliptuner.serve.runs import PROCESS_FILE
from cliptuner.train.data import PairSet, load_csv
from cliptuner.train.evaluate import METRIC_KEYS
from cliptuner.train.job import TrainJob, write_pairs_csv
from executors import ClipDoc
from executors.tuner import CANCEL_DOC_ID, RUN_DOC_ID, TrainingBusy, TrainingFailed, TrainingNotRunning

LONG = {**QUICK, "epochs": 40.0}  # a run that is still training when it is killed or cancelled
REPORT_KEYS = {
    "model_version",
    "parent_version",
    "init",
    "before",
    "after",
    "epochs",
    "steps",
    "epoch_losses",
    "eval_history",
    "stopped_early",
    "skipped_steps",
    "trivial",
    "samples_per_s",
    "train_seconds",
    "split",
    "history_split",
    "config",
    "world_size",
    "wall_seconds",
}
PROGRESS_KEYS = {"phase", "epoch", "epochs", "step", "total_steps", "loss", "samples_per_s", "eta_s", "pid"}


def training_status(tuner) -> dict:
    """The tuner's ``training`` state, asked through its /status endpoint."""
    return run(tuner.report_status(docs=DocList[ClipDoc](), parameters={"detail": True}))[0].tags["training"]


def wait_until(condition, what: str, timeout: float = 300.0):
    """Poll ``condition`` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"gave up waiting for {what}")


def training_steps(tuner) -> dict:
    """Wait until the run reports optimizer steps; its /status ``training`` then."""
    return wait_until(
        lambda: (lambda t: t if t.get("state") == "running" and t.get("step") else None)(training_status(tuner)),
        "the first optimizer step",
    )


def in_thread(call):
    """Run ``call()`` in a thread; returns the thread and a dict that gets its ``result`` or ``error``."""
    box: dict = {}

    def target():
        try:
            box["result"] = call()
        except BaseException as exc:  # handed to the test
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def assert_nothing_published(tuner) -> None:
    registry = Registry(tuner.registry.root)
    assert registry.current() == "v1" and registry.versions() == ["v1"]
    assert list(tuner.runs_dir.iterdir()) == []  # the run's directory went with it
    assert tuner.runs._lock.acquire(blocking=False)  # the next run may start
    tuner.runs._lock.release()


def process_group_gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_pairs_written_for_the_training_process_read_back_as_the_same_pairs(tmp_path, scenes):
    shared = tmp_path / "data" / "shared.png"
    shared.parent.mkdir()
    shared.write_bytes(png(scenes.images[2]))
    pairs = PairSet(
        images=[scenes.images[0], png(scenes.images[1]), str(shared), str(shared), Image.fromarray(scenes.images[3])],
        captions=[
            "an array",
            "a blob, first caption",
            "a path",
            "the same path, another image",
            "a blob, second caption",
            'a PIL image, with a comma, and "quotes"\non two lines',
        ],
        image_index=[0, 1, 2, 3, 1, 4],
        image_ids=["a", "b/../evil", "c", "d", "e"],
    )
    path = write_pairs_csv(pairs, tmp_path / "run" / "inputs" / "train.csv")
    back = load_csv(path)
    assert back.captions == pairs.captions and back.image_index == pairs.image_index
    assert back.num_images == 5  # two image ids on one file stay two images
    for i, expected in enumerate(
        [scenes.images[0], scenes.images[1], scenes.images[2], scenes.images[2], scenes.images[3]]
    ):
        np.testing.assert_array_equal(np.asarray(decode_image(back.images[i])), expected)
    assert back.images[2] == str(shared)  # a file is named, not copied; its second image id gets a copy
    # written beside the CSV, one file per image, named without a path a client could steer
    assert sorted(os.listdir(tmp_path / "run" / "inputs" / "images")) == [
        "000000-a.png",
        "000001-b_.._evil",
        "000003-d.png",
        "000004-e.png",
    ]


def test_a_run_trains_in_another_process_and_publishes_the_report_of_the_same_split(tuner, workspace, monkeypatch):
    docs = pair_docs(24, seed=11)
    train, held_out, _ = tuner.split_pairs(tuner.parse_request(QUICK), docs)  # the split, made by the tuner
    events, jobs = [], []
    on_event = tuner.runs._on_event
    tuner.runs._on_event = lambda event: (events.append(event), on_event(event))
    prepare = tuner._prepare
    tuner._prepare = lambda run, request, docs: (jobs.append(prepare(run, request, docs)), jobs[-1])[1]
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "torch", None)  # any `import torch` in this process fails during the run
        out = run(tuner.train(docs=docs, parameters=QUICK))
    report = out[0].tags["report"]
    registry = Registry(workspace / "models")
    assert out[0].id == "train-report" and out[0].model_version == report["model_version"] == registry.current() == "v2"
    assert set(report) >= REPORT_KEYS and "model" not in report  # the training process's spec names server paths
    assert report["parent_version"] == "v1" and report["init"] == "version v1" and report["world_size"] == 1
    metadata = registry.metadata("v2")
    assert metadata["parent_version"] == "v1" and metadata["report"]["after"] == report["after"]
    assert not (registry.path("v2") / "report.json").exists()

    # the worker got the options as the request gave them, the tuner's split, and v1's weights to start from
    (job,) = jobs
    assert isinstance(job, TrainJob) and job.cfg == tuner.parse_request(QUICK).cfg
    assert job.eval_cfg == tuner.parse_request(QUICK).eval_cfg and job.cfg.log_every == 1
    assert job.model == ModelSpec("cliptuner-tiny", pretrained=str(registry.path("v1") / "checkpoint.pt"))
    assert Path(job.data).name == "train.csv" and Path(job.eval_data).name == "held_out.csv"
    assert Path(job.out).name == "model" and job.general_data is None

    # trained elsewhere: every event came from one other process, the kinds in order
    pids = {event["pid"] for event in events}
    assert len(pids) == 1 and os.getpid() not in pids
    kinds = [event["event"] for event in events]
    assert kinds[:2] == ["loaded", "before"] and kinds[-2:] == ["after", "gate"] and "step" in kinds and "end" in kinds

    # on the split the tuner made: the same counts, and the base model's recall on the same held-out pairs
    split = report["split"]
    assert (split["train_images"], split["train_pairs"]) == (train.num_images, len(train)) == (18, 36)
    assert (split["eval_images"], split["eval_pairs"]) == (held_out.num_images, len(held_out)) == (6, 12)
    assert split["source"] == "request docs" and split["held_out"] == "0.25 of request docs (seed 3)"
    from cliptuner.train.evaluate import evaluate
    from cliptuner.train.models import load_model

    v1 = load_model(ModelSpec("cliptuner-tiny", pretrained=str(registry.path("v1") / "checkpoint.pt")))
    before = evaluate(v1, held_out, EvalConfig().ks, EvalConfig().batch_size)
    for key in METRIC_KEYS:
        assert report["before"][key] == pytest.approx(before[key], abs=1e-9), key

    # the run directory keeps the report and the training log, not the inputs
    (run_dir,) = list(tuner.runs_dir.iterdir())
    assert sorted(p.name for p in run_dir.iterdir()) == ["report.json", "train.log"]


def test_a_killed_training_process_fails_the_run_clearly_while_the_tuner_answers(tuner):
    thread, box = in_thread(lambda: run(tuner.train(docs=pair_docs(24, seed=2), parameters=LONG)))
    progress = training_steps(tuner)  # /status answers while the child trains
    assert progress["pid"] != os.getpid() and progress["phase"] == "training"
    os.killpg(os.getpgid(progress["pid"]), signal.SIGKILL)
    thread.join(timeout=120)
    error = box["error"]
    assert isinstance(error, TrainingFailed) and not isinstance(error, ValueError)
    assert error.run_id == progress["run_id"] and error.phase == "training"
    assert f"/train run {error.run_id} failed while training: " in str(error)
    assert "the training process was killed by signal 9 (SIGKILL)" in str(error)
    assert "nothing was published; CURRENT is still v1" in str(error)
    training = training_status(tuner)
    assert training["state"] == "failed" and "killed by signal 9" in training["error"]
    assert_nothing_published(tuner)


def test_a_tuner_that_starts_again_ends_the_training_its_killed_predecessor_left(tuner, workspace):
    """A killed tuner cannot stop its training process group (a session of its own): the next tuner on the
    workspace finds the unfinished run directory, kills the group still working in it, and removes it."""
    from executors import CLIPTuner

    answer = run(tuner.train(docs=pair_docs(24, seed=2), parameters={**LONG, "wait": False}))
    run_id = answer[0].tags["run_id"]
    progress = training_steps(tuner)
    pgid = os.getpgid(progress["pid"])
    run_dir = tuner.runs_dir / run_id
    assert json.loads((run_dir / PROCESS_FILE).read_text()) == {"pgid": pgid}
    finished = tuner.runs_dir / "r-finished"  # a published run's directory stays
    finished.mkdir()
    (finished / "report.json").write_text("{}")

    successor = CLIPTuner(workspace=str(workspace), bootstrap=False, device="cpu")  # what a restart does
    try:
        assert not run_dir.exists() and finished.is_dir()
        wait_until(lambda: process_group_gone(pgid), "the orphaned training process group to end", 30)
        training = wait_until(
            lambda: (lambda t: t if t.get("state") == "failed" else None)(training_status(tuner)),
            "the first tuner to see its run fail",
            60,
        )
        assert "killed by signal 9" in training["error"]
        assert Registry(tuner.registry.root).current() == "v1"
    finally:
        successor.close()


def test_wait_false_answers_with_a_run_id_then_publishes_and_the_encoder_follows(tuner, encoder):
    out = run(tuner.train(docs=pair_docs(24, seed=11), parameters={**QUICK, "epochs": 2.0, "wait": False}))
    assert [d.id for d in out] == [RUN_DOC_ID] and out[0].tags["state"] == "running"
    run_id = out[0].tags["run_id"]
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", run_id)
    with pytest.raises(TrainingBusy, match=f"a /train run is already going \\(run {run_id}"):
        run(tuner.train(docs=pair_docs(12, seed=2), parameters=QUICK))
    progress = training_steps(tuner)
    assert progress["run_id"] == run_id and set(progress) >= PROGRESS_KEYS
    assert progress["epochs"] == 2 and progress["total_steps"] == 8 and progress["loss"] > 0  # 36 pairs, 8 a step
    assert progress["pid"] != os.getpid()

    done = wait_until(
        lambda: (lambda t: t if t["state"] != "running" else None)(training_status(tuner)), "the run to end"
    )
    assert done["state"] == "done" and done["run_id"] == run_id and done["model_version"] == "v2"
    assert tuner.registry.current() == "v2" and tuner.status()["last_report"]["model_version"] == "v2"
    encoded = run(encoder.encode(docs=DocList[ClipDoc]([ClipDoc(id="t", text="a red circle")])))
    assert encoded[0].model_version == "v2"  # the encoder follows CURRENT on its own


def test_cancel_ends_an_async_run_and_publishes_nothing(tuner):
    with pytest.raises(TrainingNotRunning, match="no /train run is going: nothing to cancel"):
        run(tuner.cancel(docs=DocList[ClipDoc](), parameters={}))
    out = run(tuner.train(docs=pair_docs(24, seed=2), parameters={**LONG, "wait": False}))
    run_id = out[0].tags["run_id"]
    progress = training_steps(tuner)
    with pytest.raises(TrainingNotRunning, match=f"run 'nope' is not going: the run going is '{run_id}'"):
        run(tuner.cancel(docs=DocList[ClipDoc](), parameters={"run_id": "nope"}))
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['force'\] for /train/cancel"):
        run(tuner.cancel(docs=DocList[ClipDoc](), parameters={"run_id": run_id, "force": True}))

    answer = run(tuner.cancel(docs=DocList[ClipDoc](), parameters={"run_id": run_id}))
    assert [d.id for d in answer] == [CANCEL_DOC_ID]
    assert answer[0].tags["run_id"] == run_id and answer[0].tags["state"] == "cancelled"
    assert process_group_gone(progress["pid"])
    training = training_status(tuner)
    assert training["state"] == "cancelled" and training["run_id"] == run_id and training["phase"] == "training"
    assert training["error"].startswith("TrainingCancelled: the run was cancelled at epoch 1/40, step ")
    assert_nothing_published(tuner)
    with pytest.raises(TrainingNotRunning, match=f"the last run, {run_id}, is cancelled"):
        run(tuner.cancel(docs=DocList[ClipDoc](), parameters={"run_id": run_id}))


def test_cancel_fails_the_synchronous_train_that_waits_on_the_run(tuner):
    thread, box = in_thread(lambda: run(tuner.train(docs=pair_docs(24, seed=2), parameters=LONG)))
    training_steps(tuner)
    answer = run(tuner.cancel(docs=DocList[ClipDoc](), parameters={}))
    thread.join(timeout=120)
    error = box["error"]
    assert answer[0].tags["state"] == "cancelled" and isinstance(error, TrainingFailed)
    assert re.search(r"failed while training: TrainingCancelled: the run was cancelled at epoch 1/40", str(error))
    assert_nothing_published(tuner)


@pytest.mark.parametrize("wait", ["no", 0.0, 1.0, None])
def test_wait_must_be_a_bool(tuner, wait):
    with pytest.raises(ValueError, match=r"parameter 'wait' must be true or false"):
        run(tuner.train(docs=pair_docs(12, seed=2), parameters={**QUICK, "wait": wait}))
    assert training_status(tuner)["state"] == "idle"  # refused before any run began


def test_settings_choose_the_worker_command_and_its_threads(workspace):
    from executors import CLIPTuner

    single = CLIPTuner(workspace=str(workspace), bootstrap=False, device="cpu")
    several = CLIPTuner(workspace=str(workspace), bootstrap=False, processes=2, torch_threads=3)
    job, events = Path("r/inputs/job.json"), Path("r/events.jsonl")
    worker = ["-m", "cliptuner.train.worker", "r/inputs/job.json", "--events", "r/events.jsonl"]
    try:
        assert single.runs.worker_argv(job, events) == [sys.executable, *worker]
        assert several.runs.worker_argv(job, events) == [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            *worker,
        ]
        assert several.runs.worker_env()["OMP_NUM_THREADS"] == "3"
        assert several.status()["device"] == "auto" and several.status()["processes"] == 2
    finally:
        single.close()
        several.close()
    with pytest.raises(ValueError, match="parameter 'processes' must be >= 1, got 0"):
        CLIPTuner(workspace=str(workspace), bootstrap=False, processes=0)


@pytest.mark.slow
def test_two_training_processes_under_torchrun_publish_one_version(workspace):
    from executors import CLIPTuner

    tuner = CLIPTuner(workspace=str(workspace), bootstrap=False, device="cpu", processes=2, torch_threads=1)
    try:
        out = run(tuner.train(docs=pair_docs(24, seed=11), parameters={**QUICK, "batch_size": 4.0}))
    finally:
        tuner.close()
    report = out[0].tags["report"]
    assert report["world_size"] == 2 and report["model_version"] == tuner.registry.current() == "v2"
    assert report["split"]["train_images"] == 18 and report["split"]["eval_images"] == 6
