"""A training job is validated once, travels as job.json unchanged, and a worker's failure becomes one event."""

import json

import pytest

from cliptuner.config import EvalConfig, ModelSpec, TrainConfig
from cliptuner.train.data import DataError
from cliptuner.train.job import PHASES, TrainJob, phase_after
from cliptuner.train.worker import failure_event


def full_job(tmp_path) -> TrainJob:
    return TrainJob(
        data=str(tmp_path / "train.csv"),
        eval_data=str(tmp_path / "held_out.csv"),
        general_data=str(tmp_path / "general.json"),
        model=ModelSpec("cliptuner-tiny", pretrained=str(tmp_path / "v1" / "checkpoint.pt"), force_quick_gelu=True),
        cfg=TrainConfig(epochs=3, batch_size=8, wiseft_alphas=(0.5, 1.0), grad_clip_norm=None, device="auto"),
        eval_cfg=EvalConfig(eval_fraction=0.3, split_seed=7, ks=(1, 5)),
        out=str(tmp_path / "model"),
        version="v9",
        checkpoint_dir=str(tmp_path / "state"),
        plots=False,
    )


def test_a_job_reads_back_from_its_file_as_the_same_job(tmp_path):
    job = full_job(tmp_path)
    path = job.write(tmp_path / "run" / "inputs" / "job.json")
    assert path.name == "job.json" and json.loads(path.read_text())["cfg"]["wiseft_alphas"] == [0.5, 1.0]
    back = TrainJob.read(path)
    assert back == job
    assert back.cfg.wiseft_alphas == (0.5, 1.0) and back.eval_cfg.ks == (1, 5) and back.cfg.grad_clip_norm is None
    assert back.version_name == "v9" and TrainJob(data="a.csv", out="runs/tuned").version_name == "tuned"


def test_a_default_job_trains_on_the_device_the_worker_finds():
    job = TrainJob(data="pairs.csv", out="out")
    assert job.cfg.device == "auto" and job.model == ModelSpec() and job.plots
    assert TrainJob.from_dict(job.to_dict()) == job


@pytest.mark.parametrize(
    "values, message",
    [
        ({"data": "a.csv", "out": "o", "epochs": 3}, r"unknown training job key\(s\) \['epochs'\]"),
        ({"out": "o"}, r"a training job needs \['data'\]"),
        ({"data": "", "out": "o"}, "TrainJob.data must be a non-empty path, got ''"),
        ({"data": "a.csv", "out": "o", "eval_data": 3}, "TrainJob.eval_data must be a non-empty path or None, got 3"),
        ({"data": "a.csv", "out": "o", "cfg": {"epochs": 0}}, "epochs must be an integer >= 1, got 0"),
        ({"data": "a.csv", "out": "o", "cfg": {"epochz": 1}}, "epochz"),
        ({"data": "a.csv", "out": "o", "cfg": [1]}, "training job key 'cfg' must be a mapping"),
        ({"data": "a.csv", "out": "o", "plots": "yes"}, "TrainJob.plots must be true or false, got 'yes'"),
        ({"data": "a.csv", "out": "o", "version": " "}, "TrainJob.version must be a non-empty string or None"),
    ],
)
def test_a_bad_job_is_refused_by_name(values, message):
    with pytest.raises(ValueError, match=message):
        TrainJob.from_dict(values)


def test_configs_of_the_wrong_type_are_refused():
    with pytest.raises(ValueError, match="TrainJob.cfg must be a TrainConfig"):
        TrainJob(data="a.csv", out="o", cfg={"epochs": 1})
    with pytest.raises(ValueError, match="TrainJob.model must be a ModelSpec"):
        TrainJob(data="a.csv", out="o", model="cliptuner-tiny")


def test_an_unreadable_job_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="cannot read training job"):
        TrainJob.read(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        TrainJob.read(tmp_path / "bad.json")


def test_the_phase_follows_the_training_events():
    phase, seen = PHASES[0], []
    kinds = ("loaded", "before", "step", "eval", "epoch", "end", "wiseft", "after", "gate", "exported", "plots")
    for kind in kinds:
        phase = phase_after({"event": kind}, phase)
        seen.append(phase)
    assert (
        seen
        == ["evaluating", "training", "training", "training", "training", "evaluating", "evaluating", "evaluating"]
        + ["exporting"] * 3
    )


def test_a_failure_is_one_event_of_kind_input_or_error(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    bad_input = failure_event(DataError("pairs.csv line 3: no image 'missing.png'"), "loading")
    assert bad_input == {
        "event": "failed",
        "phase": "loading",
        "kind": "input",
        "message": "pairs.csv line 3: no image 'missing.png'",
        "rank": 1,
    }
    error = failure_event(FloatingPointError("loss is nan; lower the learning rate"), "training")
    assert error["kind"] == "error" and error["message"] == "FloatingPointError: loss is nan; lower the learning rate"
    assert len(failure_event(RuntimeError("x" * 10_000), "exporting")["message"]) == 4000
