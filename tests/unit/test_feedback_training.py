"""Training on the recorded search feedback: ``/train`` with ``source: feedback`` (held-out queries kept out for good,
then the regression set of later runs), ``cliptuner train --feedback``, and the ``auto_train`` policy (once at the
threshold, never two runs at once)."""

import json
import time

import pytest
from docarray import DocList
from support import QUICK, png, run

from cliptuner.cli import main
from cliptuner.serve.auto_train import STATE_FILE, AutoTrainPolicy
from cliptuner.serve.feedback import FEEDBACK_SUBDIR, DocContent, FeedbackEvent, FeedbackLog
from cliptuner.serve.feedback_pairs import HELD_OUT_FILE
from cliptuner.train import synthetic
from executors import CLIPTuner
from executors.schemas import ClipDoc

FEEDBACK_TRAIN = {**QUICK, "batch_size": 4.0, "source": "feedback", "gate": False}


def record(workspace, first: int, count: int, seed: int = 7) -> None:
    """``count`` searches with a chosen result: query = a caption of image i, the result above it skipped."""
    scenes = synthetic.generate(first + count + 1, domain="domain", seed=seed, captions_per_image=2)
    contents = {
        f"d{i}": DocContent(f"d{i}", text=scenes.captions[2 * i], image=png(scenes.images[i]))
        for i in range(first + count + 1)
    }
    with FeedbackLog(workspace / FEEDBACK_SUBDIR) as log:
        for i in range(first, first + count):
            event = FeedbackEvent(
                event_id=f"e{i}",
                query_text=scenes.captions[2 * i + 1],
                shown=(f"d{i + 1}", f"d{i}"),
                chosen=(f"d{i}",),
                model_version="v1",
            )
            assert log.record(event, {k: contents[k] for k in event.shown})


def test_a_run_on_the_feedback_holds_out_its_newest_queries_for_good(tuner, workspace):
    record(workspace, 0, 12)
    report = run(tuner.train(docs=DocList[ClipDoc](), parameters=FEEDBACK_TRAIN))[0].tags["report"]
    split = report["split"]
    assert split["source"].startswith("feedback (12 events through seq 12)")
    assert split["held_out"] == "the newest 3 feedback queries"
    assert split["eval_images"] == 13  # their 3 images among the 13 the searches showed (the gallery)
    counts = split["feedback"]
    assert counts["queries_train"] == 9 and counts["hard_negatives"] == 9 and counts["queries_regression"] == 0
    kept = json.loads((workspace / FEEDBACK_SUBDIR / HELD_OUT_FILE).read_text())["keys"]
    assert len(kept) == 3
    record(workspace, 12, 8)  # the next run: the kept queries are its regression set
    again = run(tuner.train(docs=DocList[ClipDoc](), parameters={**FEEDBACK_TRAIN, "gate": True}))[0].tags["report"]
    assert again["split"]["feedback"]["queries_regression"] == 3 and again["split"]["feedback"]["queries_train"] == 15
    assert set(again["gate"]["regression"]) == {"feedback"}
    assert (
        len(json.loads((workspace / FEEDBACK_SUBDIR / HELD_OUT_FILE).read_text())["keys"]) == 5
    )  # 3 + 2 of the 8 queries first asked since the first run


def test_labelled_eval_data_joins_the_held_out_pairs_of_a_run_on_the_feedback(tuner, workspace):
    record(workspace, 0, 12)
    synthetic.write_csv(workspace / "data" / "clean", n_images=5, domain="domain", seed=3)
    parameters = {**FEEDBACK_TRAIN, "eval_data": "clean/pairs.csv"}
    report = run(tuner.train(docs=DocList[ClipDoc](), parameters=parameters))[0].tags["report"]
    split = report["split"]
    assert split["held_out"] == "the newest 3 feedback queries + clean/pairs.csv"
    assert split["eval_pairs"] == 3 + 5 and split["eval_images"] == 13 + 5
    assert split["source"].startswith("feedback (12 events") and "clean" not in split["source"]  # not trained on


def test_a_run_on_the_feedback_refuses_docs_and_too_little_feedback_by_name(tuner, workspace):
    with pytest.raises(ValueError, match="trains on the recorded feedback .* got 1 docs: send none"):
        run(tuner.train(docs=DocList[ClipDoc]([ClipDoc(id="x", text="a")]), parameters=FEEDBACK_TRAIN))
    with pytest.raises(ValueError, match="no feedback to train on: 0 event"):
        run(tuner.train(docs=DocList[ClipDoc](), parameters=FEEDBACK_TRAIN))
    record(workspace, 0, 3)
    with pytest.raises(ValueError, match="fewer than batch_size 4"):
        run(tuner.train(docs=DocList[ClipDoc](), parameters=FEEDBACK_TRAIN))
    assert not (workspace / FEEDBACK_SUBDIR / HELD_OUT_FILE).exists()  # a refused request used no query up
    assert run(tuner.report_status(docs=DocList[ClipDoc]()))[0].tags["model_version"] == "v1"


def test_cliptuner_train_trains_on_a_workspaces_feedback(workspace, tmp_path, capsys):
    record(workspace, 0, 12)
    out = tmp_path / "tuned"
    args = ["train", "--feedback", str(workspace), "--out", str(out), "--quiet", "--device", "cpu"]
    assert main([*args, "--epochs", "1", "--batch-size", "4", "--no-plots"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["split"]["eval_images"] == 13 and report["gate"]["enabled"] is True
    assert "gate: " in capsys.readouterr().out
    assert main(["train", "--out", str(tmp_path / "none"), "--quiet"]) == 2  # neither --data nor --feedback
    assert "needs --data PAIRS, --feedback WORKSPACE, or both" in capsys.readouterr().err


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"source": "elsewhere"}, r"parameter 'source' must be one of \['request', 'feedback'\], got 'elsewhere'"),
        ({"source": 1.0}, r"parameter 'source' must be one of"),
        ({"min_gain": 5.0}, r"min_gain must be in \[-1, 1\], got 5.0"),
        ({"gate": "yes"}, "gate must be true or false"),
        ({"gate_metric": "r5"}, r"gate_metric must be one of \['mean_r5'"),
    ],
)
def test_bad_source_and_gate_parameters_are_refused_by_name_and_the_tuner_goes_on(
    tuner, workspace, parameters, message
):
    with pytest.raises(ValueError, match=message):
        run(tuner.train(docs=DocList[ClipDoc](), parameters={**FEEDBACK_TRAIN, **parameters}))
    assert not (workspace / FEEDBACK_SUBDIR / HELD_OUT_FILE).exists()
    assert run(tuner.report_status(docs=DocList[ClipDoc]()))[0].tags["model_version"] == "v1"  # still answering
    assert tuner.runs.active is None  # no run was claimed: the next /train may start


@pytest.fixture
def auto_tuner(workspace):
    policy = {"min_events": 6, "min_queries": 6, "check_every_s": 3600, "parameters": {**QUICK, "batch_size": 4}}
    t = CLIPTuner(workspace=str(workspace), bootstrap=False, device="cpu", auto_train=policy)
    yield t
    t.close()


def test_auto_train_starts_one_run_at_the_threshold_and_never_two_at_once(auto_tuner, workspace):
    record(workspace, 0, 5)
    assert auto_tuner.auto.check() is None  # 5 of 6 events: nothing yet
    assert auto_tuner.auto.status()["pending"] == {"events": 5, "queries": 5}
    record(workspace, 5, 1)
    run_id = auto_tuner.auto.check()
    assert run_id is not None and auto_tuner.runs.active is not None
    state = json.loads((workspace / FEEDBACK_SUBDIR / STATE_FILE).read_text())
    assert state["through_seq"] == 6 and state["run_id"] == run_id
    record(workspace, 6, 6)  # enough for another run while the first still goes
    assert auto_tuner.auto.check() is None and auto_tuner.runs.active.run_id == run_id
    assert auto_tuner.auto.check() is None
    deadline = time.monotonic() + 300
    while auto_tuner.runs.progress.get("state") == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    progress = auto_tuner.runs.progress
    assert progress["run_id"] == run_id and progress["state"] == "done", progress
    assert auto_tuner.auto.check() not in (None, run_id)  # the six new events: the next run
    status = run(auto_tuner.report_status(docs=DocList[ClipDoc]()))[0].tags["auto_train"]
    assert status["min_events"] == 6 and status["last_run"]["through_seq"] == 12


@pytest.mark.parametrize(
    "values, message",
    [
        ({"min_events": 0}, "auto_train.min_events must be an integer >= 1, got 0"),
        ({"every": 3}, r"auto_train: unknown key\(s\) \['every'\]"),
        ({"parameters": {"source": "request"}}, r"may not set \['source'\]"),
        ('{"min_events": ', "auto_train must be a JSON object"),
    ],
)
def test_a_bad_auto_train_policy_is_named(values, message):
    with pytest.raises(ValueError, match=message):
        AutoTrainPolicy.from_setting(values)


def test_bad_auto_train_parameters_fail_the_tuners_start(workspace):
    with pytest.raises(ValueError, match="epochs"):
        CLIPTuner(workspace=str(workspace), bootstrap=False, device="cpu", auto_train={"parameters": {"epochs": 0}})
