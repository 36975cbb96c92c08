"""A /train run that fails never replaces the serving model, and says why: to the client and in /status.

Each failure kind runs the tuner as a plain object on a workspace whose registry holds ``v1`` (CURRENT). After
the failure: CURRENT still names ``v1``, no other version is listed, the registry holds nothing half-written, the
run left no directory under ``runs/``, the error names the run, the phase and the cause, ``/status`` says the
same, and the next run may start.

Training runs in a worker process (``python -m cliptuner.train.worker``): a failure inside it is made by what the
worker is given (a learning rate that blows the loss up, a corrupt image) or, for the export, by running the worker
through a small script that replaces the exporter before calling it.
"""

import os
import re
import struct
import sys
import zlib

import pytest
from docarray import DocList
from support import QUICK, pair_docs, run

from cliptuner.model.registry import Registry
from cliptuner.serve.runs import TrainingProcess, TrainingProcessError
from cliptuner.train.job import TrainJob
from executors import ClipDoc, CLIPTuner
from executors.tuner import TrainingCancelled, TrainingFailed, TrainingInputError

# the worker with an exporter that writes half a model directory and fails
EXPORT_FAILS = """
import sys
from pathlib import Path

import cliptuner.train.export


def export_half(bundle, out, **kwargs):
    Path(out).mkdir(parents=True)
    (Path(out) / "visual.onnx").write_bytes(b"half a graph")
    raise RuntimeError("no space left for textual.onnx")


cliptuner.train.export.export_model_dir = export_half
from cliptuner.train.worker import main

sys.exit(main(sys.argv[1:]))
"""


def failed_run(tuner: CLIPTuner, docs: DocList[ClipDoc], parameters: dict = QUICK) -> TrainingFailed:
    """Send /train, expect it to fail, and check that nothing changed; returns the error the client got."""
    models = tuner.registry.root
    entries = sorted(os.listdir(models))
    with pytest.raises(TrainingFailed) as info:
        run(tuner.train(docs=docs, parameters=parameters))
    error = info.value
    registry = Registry(models)
    assert registry.current() == "v1" and registry.versions() == ["v1"]
    assert sorted(os.listdir(models)) == entries  # no temp dir, no half-written version
    assert list(tuner.runs_dir.iterdir()) == []  # the run's export is gone with its directory
    training = run(tuner.report_status(docs=DocList[ClipDoc]()))[0].tags["training"]
    state = "cancelled" if isinstance(error.__cause__, TrainingCancelled) else "failed"
    assert training["state"] == state and training["run_id"] == error.run_id and training["phase"] == error.phase
    assert training["parent_version"] == "v1"
    assert f"/train run {error.run_id} failed while {error.phase}: " in str(error)
    assert "nothing was published; CURRENT is still v1" in str(error)
    assert training["error"] == f"{type(error.__cause__).__name__}: {error.__cause__}"
    assert training["error"] in str(error)
    assert tuner.runs._lock.acquire(blocking=False)  # the next run may start
    tuner.runs._lock.release()
    return error


def _png_with_broken_pixels(size: int = 64) -> bytes:
    """A PNG whose header and chunk checksums are sound but whose pixel stream is not zlib data: the data check
    before training lets it through (it reads headers); decoding it, in the worker, fails."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", b"not zlib data") + chunk(b"IEND", b"")


def test_a_non_finite_loss_fails_the_run_while_training(tuner):
    error = failed_run(
        tuner, pair_docs(16, seed=2, blobs=True), {**QUICK, "learning_rate": 1e12, "epochs": 3.0, "precision": "fp32"}
    )
    assert error.phase == "training" and isinstance(error.__cause__, TrainingProcessError)
    assert error.__cause__.returncode == 1 and not isinstance(error, ValueError)
    assert "the training process exited with code 1" in str(error)
    assert re.search(r"FloatingPointError: loss is (nan|inf); lower the learning rate", str(error))


def test_an_undecodable_image_among_the_pairs_fails_the_run_and_names_it(tuner):
    docs = pair_docs(16, seed=2, blobs=True)
    broken = docs[5].tags["image_id"]
    for doc in docs:  # both captions of one image carry the same broken file
        if doc.tags["image_id"] == broken:
            doc.blob = _png_with_broken_pixels()
    error = failed_run(tuner, docs)
    assert isinstance(error, TrainingInputError) and isinstance(error, ValueError)  # the input was at fault
    assert isinstance(error.__cause__, TrainingProcessError) and isinstance(error.__cause__, ValueError)
    assert error.__cause__.returncode == 2  # the worker refused its input
    assert broken in str(error) and "cannot decode" in str(error)
    assert str(tuner.runs_dir) not in str(error)  # no server path


def test_too_few_images_fails_while_preparing(tuner):
    error = failed_run(tuner, pair_docs(6, seed=2, blobs=True), {**QUICK, "batch_size": 64.0})
    assert error.phase == "preparing" and isinstance(error, ValueError)
    assert "training images is fewer than batch_size 64" in str(error)


def test_any_error_while_exporting_removes_the_half_written_export(tuner):
    real_argv = tuner.runs.worker_argv
    written = []

    def export_fails(job_path, events_path):
        written.append(TrainJob.read(job_path).out)
        return [sys.executable, "-c", EXPORT_FAILS, str(job_path), "--events", str(events_path)]

    tuner.runs.worker_argv = export_fails
    error = failed_run(tuner, pair_docs(16, seed=2, blobs=True))
    assert written and not os.path.exists(written[0])  # the half-written model directory is gone
    assert error.phase == "exporting" and type(error) is TrainingFailed
    assert "RuntimeError: no space left for textual.onnx" in str(error)
    # nothing is stuck: the next run trains and publishes
    tuner.runs.worker_argv = real_argv
    report = run(tuner.train(docs=pair_docs(16, seed=2, blobs=True), parameters=QUICK))[0].tags["report"]
    assert report["model_version"] == tuner.registry.current() == "v2" and report["parent_version"] == "v1"
    assert tuner.status()["training"]["state"] == "done"


def test_a_failed_publish_lists_no_new_version(tuner, monkeypatch):
    def refuse(path, data, **kwargs):
        raise OSError(f"cannot write {path.name}")

    monkeypatch.setattr("cliptuner.model.registry.write_atomic", refuse)  # after the version dir is renamed into place
    error = failed_run(tuner, pair_docs(16, seed=2, blobs=True))
    assert error.phase == "publishing" and "OSError: cannot write CURRENT" in str(error)


def test_a_stop_during_training_ends_the_training_process_and_publishes_nothing(tuner):
    on_event = tuner.runs._on_event
    processes = []

    def stop_after_first_step(event):  # as close() does: the tuner is going away
        on_event(event)
        if event.get("event") == "step":
            processes.append(tuner.runs.active.process)
            tuner.runs.request_stop()

    tuner.runs._on_event = stop_after_first_step
    error = failed_run(tuner, pair_docs(24, seed=2, blobs=True), {**QUICK, "epochs": 20.0})
    assert error.phase == "training" and isinstance(error.__cause__, TrainingCancelled)
    assert "TrainingCancelled: the run was stopped: the tuner is closing at epoch 1/20, step 1/" in str(error)
    assert processes[0].poll() is not None  # the training process is gone
    with pytest.raises(ProcessLookupError):
        os.killpg(processes[0].pid, 0)  # and so is its process group


def test_a_stop_after_the_last_step_drops_the_tuned_model(tuner):
    on_event = tuner.runs._on_event

    def stop_once_exported(event):  # the stop arrives after the training process wrote the tuned model
        on_event(event)
        if event.get("event") == "gate":  # the last event before the export
            tuner.runs.active.process.proc.wait(timeout=300)
            tuner.runs.request_stop()

    tuner.runs._on_event = stop_once_exported
    error = failed_run(tuner, pair_docs(16, seed=2, blobs=True))
    assert error.phase == "exporting" and isinstance(error.__cause__, TrainingCancelled)
    assert "after training; the tuned model is not published" in str(error)


def test_an_interrupt_is_recorded_and_passes_on_unchanged(tuner, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt()

    monkeypatch.setattr(TrainingProcess, "start", interrupt)
    tuner.runs.acquire()  # as train() does before it hands the run to a worker thread
    with pytest.raises(KeyboardInterrupt):
        tuner._run(tuner.parse_request(QUICK), pair_docs(16, seed=2, blobs=True))
    training = tuner.status()["training"]
    assert (training["state"], training["phase"], training["error"]) == ("failed", "loading", "KeyboardInterrupt: ")
    assert tuner.registry.current() == "v1" and tuner.registry.versions() == ["v1"]
    assert list(tuner.runs_dir.iterdir()) == []
    assert tuner.runs._lock.acquire(blocking=False)
    tuner.runs._lock.release()
