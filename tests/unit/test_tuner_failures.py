"""A /train run that fails never replaces the serving model, and says why: to the client and in /status.

Each failure kind runs the tuner as a plain object on a workspace whose registry holds ``v1`` (CURRENT). After
the failure: CURRENT still names ``v1``, no other version is listed, the registry holds nothing half-written, the
run left no directory under ``runs/``, the error names the run, the phase and the cause, ``/status`` says the
same, and the next run may start.
"""

import os
import re

import pytest
from docarray import DocList

from cliptuner import export, synthetic
from cliptuner.registry import Registry
from cliptuner.train import TrainingStopped
from executors import CLIPTuner, ClipDoc
from executors.tuner import TrainingFailed, TrainingInputError

from support import QUICK, png, run


def pair_docs(n_images: int, seed: int) -> DocList[ClipDoc]:
    pairs = synthetic.generate(n_images, domain="domain", seed=seed, captions_per_image=2)
    return DocList[ClipDoc]([
        ClipDoc(id=f"p{i}", text=caption, blob=png(pairs.images[pairs.image_index[i]]),
                tags={"image_id": pairs.image_ids[pairs.image_index[i]]})
        for i, caption in enumerate(pairs.captions)])


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
    assert training["state"] == "failed" and training["run_id"] == error.run_id and training["phase"] == error.phase
    assert training["parent_version"] == "v1"
    assert f"/train run {error.run_id} failed while {error.phase}: " in str(error)
    assert "nothing was published; CURRENT is still v1" in str(error)
    assert training["error"] == f"{type(error.__cause__).__name__}: {error.__cause__}"
    assert training["error"] in str(error)
    assert tuner._run_lock.acquire(blocking=False)  # the next run may start
    tuner._run_lock.release()
    return error


def test_a_non_finite_loss_fails_the_run_while_training(tuner):
    error = failed_run(tuner, pair_docs(16, seed=2), {**QUICK, "learning_rate": 1e12, "epochs": 3.0})
    assert error.phase == "training" and isinstance(error.__cause__, FloatingPointError)
    assert not isinstance(error, ValueError)
    assert re.search(r"FloatingPointError: loss is (nan|inf); lower the learning rate", str(error))


def test_an_undecodable_image_among_the_pairs_fails_the_run_and_names_it(tuner):
    docs = pair_docs(16, seed=2)
    broken = docs[5].tags["image_id"]
    for doc in docs:  # both captions of one image carry the same broken file
        if doc.tags["image_id"] == broken:
            doc.blob = b"\x89PNG\r\n\x1a\n but not really a PNG"
    error = failed_run(tuner, docs)
    assert isinstance(error, TrainingInputError) and isinstance(error, ValueError)  # the input was at fault
    assert isinstance(error.__cause__, ValueError)
    assert broken in str(error)


def test_too_few_images_fails_while_preparing(tuner):
    error = failed_run(tuner, pair_docs(6, seed=2), {**QUICK, "batch_size": 64.0})
    assert error.phase == "preparing" and isinstance(error, ValueError)
    assert "training images is fewer than batch_size 64" in str(error)


def test_any_error_while_exporting_removes_the_half_written_export(tuner, monkeypatch):
    real_export = export.export_model_dir
    written = []

    def export_half(bundle, out, **kwargs):
        out.mkdir(parents=True)
        (out / "visual.onnx").write_bytes(b"half a graph")
        written.append(out)
        raise RuntimeError("no space left for textual.onnx")

    monkeypatch.setattr("cliptuner.export.export_model_dir", export_half)
    error = failed_run(tuner, pair_docs(16, seed=2))
    assert written and not written[0].exists()
    assert error.phase == "exporting" and type(error) is TrainingFailed
    assert "RuntimeError: no space left for textual.onnx" in str(error)
    # nothing is stuck: the next run trains and publishes
    monkeypatch.setattr("cliptuner.export.export_model_dir", real_export)
    report = run(tuner.train(docs=pair_docs(16, seed=2), parameters=QUICK))[0].tags["report"]
    assert report["model_version"] == tuner.registry.current() == "v2" and report["parent_version"] == "v1"
    assert tuner.status()["training"]["state"] == "done"


def test_a_failed_publish_lists_no_new_version(tuner, monkeypatch):
    def refuse(path, data, **kwargs):
        raise OSError(f"cannot write {path.name}")

    monkeypatch.setattr("cliptuner.registry.write_atomic", refuse)  # after the version dir is renamed into place
    error = failed_run(tuner, pair_docs(16, seed=2))
    assert error.phase == "publishing" and "OSError: cannot write CURRENT" in str(error)


def test_a_stop_during_training_publishes_nothing(tuner):
    on_event = tuner._on_event

    def stop_after_first_step(event):
        on_event(event)
        if event.get("event") == "step":
            tuner._stop.set()

    tuner._on_event = stop_after_first_step
    error = failed_run(tuner, pair_docs(24, seed=2))
    assert error.phase == "training" and isinstance(error.__cause__, TrainingStopped)
    assert "TrainingStopped: training stopped at epoch 1" in str(error)


def test_a_stop_after_the_last_step_drops_the_tuned_model(tuner, monkeypatch):
    real_export = export.export_model_dir

    def export_then_stop(*args, **kwargs):  # the stop arrives while the tuned model is being exported
        out = real_export(*args, **kwargs)
        tuner._stop.set()
        return out

    monkeypatch.setattr("cliptuner.export.export_model_dir", export_then_stop)
    error = failed_run(tuner, pair_docs(16, seed=2))
    assert error.phase == "exporting" and isinstance(error.__cause__, TrainingStopped)
    assert "the tuned model is not published" in str(error)


def test_an_interrupt_is_recorded_and_passes_on_unchanged(tuner, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt()

    monkeypatch.setattr("cliptuner.models.load_model", interrupt)
    assert tuner._run_lock.acquire(blocking=False)  # as train() does before it hands the run to a worker
    with pytest.raises(KeyboardInterrupt):
        tuner._run(tuner.parse_request(QUICK), pair_docs(16, seed=2))
    training = tuner.status()["training"]
    assert (training["state"], training["phase"], training["error"]) == ("failed", "loading", "KeyboardInterrupt: ")
    assert tuner.registry.current() == "v1" and tuner.registry.versions() == ["v1"]
    assert list(tuner.runs_dir.iterdir()) == []
    assert tuner._run_lock.acquire(blocking=False)
    tuner._run_lock.release()

