"""`python -m benchmarks`: writes RESULTS.md, results.json and charts from scratch, judges targets, reports failures.

One real run of two cheap parts in quick mode (a child process per part, as always), then the judging and the
failure path on parts made for the test; ``--merge``; and the feedback loop: its quick run, its click model,
its caption sets, its table and chart from made-up results.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import feedback_loop, harness  # noqa: E402
from cliptuner.train.plots import is_drawn  # noqa: E402


def test_quick_run_writes_results_json_and_charts_from_scratch(tmp_path):
    out = tmp_path / "report" / "RESULTS.md"
    stale = out.parent / "charts" / "stale.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "search", "flow_search", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "**Quick mode**" in text and "python -m benchmarks --quick --only search flow_search" in text
    search_row = next(line for line in text.splitlines() if line.startswith("| search 100k"))
    assert "recall@10 " in search_row and ("**met**" in search_row or "**short**" in search_row)
    flow_row = next(line for line in text.splitlines() if line.startswith("| `/search` through the Flow"))
    assert "vector query" in flow_row and flow_row.rstrip().endswith("| reported |")
    assert "| training step |" in text and "not run" in text  # parts left out are named, not dropped
    assert "python benchmarks/search.py --n 4000" in text and "| hnsw |" in text  # the script's own table
    assert "INFO" not in text  # the Flow's logs are not copied into the report
    raw = json.loads((out.parent / "results.json").read_text())
    assert set(raw["parts"]) == {"search", "flow_search"}
    assert raw["parts"]["flow_search"]["result"]["recall_at_10"] == pytest.approx(
        raw["parts"]["flow_search"]["result"]["in_process_recall_at_10"]
    )  # the Flow returns what the store finds
    charts = sorted(p.name for p in (out.parent / "charts").iterdir())
    assert charts == ["latency.png", "search.png"]  # the stale file is gone; ratios/recall had nothing to show
    for name in charts:
        assert is_drawn(out.parent / "charts" / name), name
        assert f"charts/{name}" in text


def _fake_part(monkeypatch, tmp_path, name: str, body: str) -> None:
    """The only part is ``name``, whose script is ``body`` (a module of a package under ``tmp_path``)."""
    package = tmp_path / "parts_for_test"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / f"{name}.py").write_text(body)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(
        harness,
        "PARTS",
        (harness.Part(name, f"parts_for_test.{name}", f"Test part {name}", (), (), "A part made for the test."),),
    )
    monkeypatch.setattr(harness, "PART_NAMES", (name,))


def test_a_failing_part_is_reported_with_its_output_and_the_run_exits_1(monkeypatch, tmp_path):
    _fake_part(
        monkeypatch, tmp_path, "boom", "print('halfway there')\nraise SystemExit('the benchmark broke: no data')\n"
    )
    code = harness.main(["--out", str(tmp_path / "RESULTS.md")])
    assert code == 1
    text = (tmp_path / "RESULTS.md").read_text()
    assert "**Failed** (exit 1)" in text and "the benchmark broke: no data" in text and "halfway there" in text


def test_a_part_that_writes_no_results_is_a_failure(monkeypatch, tmp_path):
    _fake_part(monkeypatch, tmp_path, "silent", "print('| a | table |')\n")
    code = harness.main(["--out", str(tmp_path / "RESULTS.md")])
    assert code == 1
    assert "no results written" in (tmp_path / "RESULTS.md").read_text()


def _outcome(result: dict) -> dict:
    return {"result": result}


@pytest.mark.parametrize("ratio, verdict", [(1.95, "**met**"), (1.9, "**met**"), (1.89, "**short**")])
def test_a_ratio_target_is_judged_on_its_bound(ratio, verdict):
    target = next(t for t in harness.TARGETS if t.measure.startswith("ONNX image encode, ViT-B-32"))
    shown, judged = harness.judge(target, {"encode_speed": _outcome({"image": {"ratio": ratio}})})
    assert judged == verdict and shown == f"{ratio:.2f}×"


def test_search_needs_both_recall_and_speed():
    target = next(t for t in harness.TARGETS if t.part == "search")
    judged = [
        harness.judge(target, {"search": _outcome({"report": {"hnsw": {"recall_at_10": recall, "qps_ratio": speed}}})})[
            1
        ]
        for recall, speed in ((0.96, 11.0), (0.94, 30.0), (0.99, 9.0))
    ]
    assert judged == ["**met**", "**short**", "**short**"]


def test_latency_under_training_is_an_upper_bound():
    target = next(t for t in harness.TARGETS if t.part == "train_load" and "p50" in t.measure)
    row = {"idle": {"p50_ms": 10.0}, "training": {"p50_ms": 25.0}}
    assert harness.judge(target, {"train_load": _outcome({**row, "ratio": 2.5})})[1] == "**met**"
    assert harness.judge(target, {"train_load": _outcome({**row, "ratio": 3.2})})[1] == "**short**"


def test_missing_figures_say_why():
    fp16 = next(t for t in harness.TARGETS if t.measure.startswith("fp16"))
    assert "no CUDA device" in harness.judge(fp16, {"precision": _outcome({"speed": {}})})[1]
    gain = next(t for t in harness.TARGETS if t.measure.startswith("fine-tuning gain"))
    assert harness.judge(gain, {"precision": _outcome({"speed": {}})})[1].startswith("not measured")
    assert harness.judge(gain, {})[1] == "not run"
    assert harness.judge(gain, {"precision": {"error": "exit 1"}})[1].startswith("failed")


def test_fine_tuning_gain_is_the_worse_direction():
    gain = next(t for t in harness.TARGETS if t.measure.startswith("fine-tuning gain"))
    recall = {
        "before": {"t2i_r5": 0.05, "i2t_r5": 0.04},
        "after_fp32": {"t2i_r5": 0.80, "i2t_r5": 0.20},
        "after_int8": {"t2i_r5": 0.79, "i2t_r5": 0.20},
        "drop": {"t2i_r5": 0.01, "i2t_r5": 0.0},
    }
    shown, verdict = harness.judge(gain, {"precision": _outcome({"recall": recall})})
    assert shown == "+0.160" and verdict == "**short**"  # t2i gained 0.75 but i2t only 0.16


def test_a_report_is_written_again_from_its_raw_results(monkeypatch, tmp_path):
    _fake_part(
        monkeypatch,
        tmp_path,
        "one",
        "import json, sys\n"
        "json.dump({'image': {'ratio': 1.5}}, open(sys.argv[sys.argv.index('--json') + 1], 'w'))\n"
        "print('| a | table |')\n",
    )
    first = tmp_path / "first" / "RESULTS.md"
    assert harness.main(["--out", str(first)]) == 0
    again = tmp_path / "again" / "RESULTS.md"
    assert harness.main(["--from-json", str(first.parent / "results.json"), "--out", str(again)]) == 0
    assert again.read_text() == first.read_text()
    raw = json.loads((again.parent / "results.json").read_text())
    assert raw["parts"]["one"]["result"] == {"image": {"ratio": 1.5}}


def test_a_short_figure_says_what_limits_it():
    results = {
        "precision": {
            "result": {"speed": {"image": {"ratio": 1.6}}},
            "command": "python x.py",
            "stdout": "| t |",
            "wall_s": 1.0,
        }
    }
    text = harness.render(
        results,
        {
            "date": "d",
            "platform": "p",
            "cpu": "c",
            "cores": 2,
            "cuda": "no",
            "python": "3.11",
            "versions": {},
            "commit": "x",
        },
        [],
        False,
        "cmd",
        1.0,
    )
    assert "| int8 ONNX image encode |" in text and "**short**" in text
    assert "- **int8 ONNX image encode**: Dynamic quantization" in text


# -- the feedback_loop part ----------------------------------------------------------------------------------------


def _check_arm(arm: dict, events: int, shown: int) -> None:
    """What every arm of the feedback loop must show, whatever the clicks taught: each round's serving version and
    recall follow from its run's outcome; the gate measured on queries no version had trained on, among at least the
    ``shown`` results of a search."""
    rounds = arm["rounds"]
    assert rounds[0]["run"] is None and rounds[0]["clicks"] == 0 and rounds[0]["serving"] == "v1"
    for before, row in zip(rounds, rounds[1:]):
        run = row["run"]
        assert row["clicks"] - before["clicks"] >= events  # a round is K events at least
        assert row["searches"] > before["searches"] and row["queries"] >= before["queries"]
        if run["state"] == "done" and run["promoted"]:
            assert row["serving"] == run["candidate"] != before["serving"]
            assert arm["models"][run["candidate"]] in ("current", "published")
        else:  # refused or failed: the same version serves, so the same searches find the same images
            assert row["serving"] == before["serving"] and row["unseen"] == before["unseen"]
            if run["state"] == "done":
                assert arm["models"][run["candidate"]] == "candidate" and run["reason"].startswith("not promoted")
        if run["state"] == "done":
            assert run["audit"]["held_out_queries"] == run["feedback"]["queries_held_out"]
            # the service holds out only queries no run trained on: the gate compares two versions that never saw them
            assert run["audit"]["held_out_trained"] == 0 and run["audit"]["regression_trained"] == 0
            assert run["eval_images"] >= shown  # each query ranked among the images the searches showed, not a few
    assert arm["models"][rounds[-1]["serving"]] == "current"


def test_quick_feedback_loop_serves_what_each_run_decided(tmp_path):
    out = tmp_path / "report" / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "feedback_loop", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out.parent / "results.json").read_text())["parts"]["feedback_loop"]["result"]
    arms = {arm["name"]: arm for arm in r["arms"]}
    assert set(arms) == {"gated", "ungated"}
    for arm in arms.values():
        assert len(arm["rounds"]) == 3 and arm["stopped"] is None
        _check_arm(arm, arm["auto_train"]["min_events"], r["settings"]["limit"])
    assert all(row["run"]["promoted"] for row in arms["ungated"]["rounds"][1:] if row["run"]["state"] == "done")
    assert arms["ungated"]["auto_train"]["parameters"]["gate"] is False
    assert arms["gated"]["gate_options"]["gate_metric"] == "mean_r5"  # the service's default gate
    assert all(arm["auto_train"]["parameters"]["eval_data"] for arm in arms.values())  # labelled pairs judge too
    harmful = r["harmful"]
    assert harmful["run"]["state"] == "done" and harmful["serving_before"] == arms["gated"]["rounds"][-1]["serving"]
    if harmful["run"]["promoted"]:
        assert harmful["serving_after"] == harmful["run"]["candidate"] and not harmful["unchanged"]
    else:
        assert harmful["unchanged"] and harmful["serving_after"] == harmful["serving_before"]
        assert harmful["unseen_after"] == harmful["unseen_before"]
    text = out.read_text()
    assert "| learning from clicks, gate on: R@5 on never-searched captions |" in text
    assert "| a harmful candidate (captions shuffled across images) |" in text
    assert "| round | searches | clicks so far (wrong) |" in text and "**gate off** (ungated)" in text
    assert is_drawn(out.parent / "charts" / "feedback_loop.png") and "charts/feedback_loop.png" in text


def test_a_click_lands_where_the_model_says():
    model = feedback_loop.ClickModel(examination=0.7, wrong_rate=0.1)
    rng = np.random.default_rng(0)
    shown = [f"d{i}" for i in range(10)]
    assert all(model.choose(shown, "elsewhere", rng) is None for _ in range(200))  # not shown: no click
    n = 20_000
    at_rank_4 = [model.choose(shown, "d3", rng) for _ in range(n)]
    clicked = [c for c in at_rank_4 if c is not None]
    assert len(clicked) / n == pytest.approx(4**-0.7, abs=0.015)  # examined with probability 1/4^0.7
    wrong = [c for c in clicked if c != "d3"]
    assert len(wrong) / len(clicked) == pytest.approx(0.1, abs=0.015)
    top, bottom = wrong.count("d0"), wrong.count("d9")  # mistakes are position-biased too
    assert top / bottom == pytest.approx(10**0.7, rel=0.35)
    assert all(model.choose(shown, "d0", rng) in shown for _ in range(100))


def test_never_searched_captions_are_not_in_the_pool():
    captions = ["a red star", "A red  star", "two rings", "a blue star", "a ring", "a blue star", "a ring"]
    images = [0, 0, 0, 1, 1, 1, 2]
    sets = feedback_loop.search_sets(captions, images, ["g0", "g1", "g2"], per_image=3)
    # image 0: "a red star" searched, "A red  star" is the same query: dropped; its last caption never searched;
    # "a blue star" twice for image 1 is one query; "a ring" describes images 1 and 2: left out everywhere
    assert sets.pool == ["a red star", "a blue star"] and sets.pool_ids == ["g0", "g1"]
    assert sets.unseen == ["two rings"] and sets.unseen_ids == ["g0"]
    keys = {feedback_loop.query_key(c) for c in sets.pool}
    assert not keys & {feedback_loop.query_key(c) for c in sets.unseen}
    assert sets.dropped == 4


def test_the_automatic_runs_use_the_services_gate_unless_a_metric_is_named():
    default = feedback_loop.parse_args([])
    gated, ungated = feedback_loop.auto_train_policy(default, True), feedback_loop.auto_train_policy(default, False)
    assert "gate_metric" not in gated["parameters"] and "gate" not in gated["parameters"]
    assert ungated["parameters"]["gate"] is False and "gate_metric" not in ungated["parameters"]
    options = feedback_loop.gate_in_effect(gated)
    assert (options["gate_metric"], options["min_gain"], options["max_regression"]) == ("mean_r5", 0.0, 0.01)
    named = feedback_loop.auto_train_policy(feedback_loop.parse_args(["--gate-metric", "mean_recall"]), True)
    assert feedback_loop.gate_in_effect(named)["gate_metric"] == "mean_recall"


def test_the_audit_counts_measured_queries_that_the_serving_version_was_trained_on(tmp_path):
    pool = ["a red star", "two rings", "a blue star", "a ring"]
    audit = feedback_loop.HeldOutAudit(tmp_path, pool)

    def kept(*captions):
        keys = sorted(feedback_loop.query_key(c) for c in captions)
        (tmp_path / "held_out.json").write_text(json.dumps({"keys": keys, "through_seq": 1}))

    kept("a blue star")  # run 1 from v1 (seen nothing) holds out query 2, trains on 0 and 1, and v2 serves
    first = audit.after_run({0, 1, 2}, serving="v1", candidate="v2")
    assert first == {
        "held_out_queries": 1,
        "held_out_trained": 0,
        "regression_queries": 0,
        "regression_trained": 0,
        "trained_queries": 2,
    }
    kept("a blue star", "a red star")  # run 2 from v2 holds out query 0, which v2 was trained on
    second = audit.after_run({0, 1, 2, 3}, serving="v2", candidate="v3")
    assert (second["held_out_queries"], second["held_out_trained"]) == (1, 1)
    assert (second["regression_queries"], second["regression_trained"]) == (1, 0)
    assert second["trained_queries"] == 2  # queries 1 and 3
    third = audit.after_run({0, 1, 2, 3}, serving="v1", candidate=None)  # from v1 again; the run failed
    assert third == {
        "held_out_queries": 0,
        "held_out_trained": 0,
        "regression_queries": 2,
        "regression_trained": 0,
        "trained_queries": 0,
    }


def _loop_result(harmful_promoted: bool) -> dict:
    def row(n, clicks, r5, serving, run=None):
        return {
            "round": n,
            "searches": 10 * clicks,
            "clicks": clicks,
            "wrong_clicks": 0,
            "queries": clicks // 2,
            "run": run,
            "serving": serving,
            "unseen": {"r1": 0.0, "r5": r5, "r10": r5},
            "pool": {"r1": 0.0, "r5": r5, "r10": r5},
        }

    refused = {"state": "done", "candidate": "v3", "promoted": False, "reason": "not promoted: mean_recall 70 vs 80"}
    promoted = {"state": "done", "candidate": "v2", "promoted": True, "reason": "promoted: mean_recall 80 vs 50"}
    failed = {"state": "failed", "candidate": None, "promoted": False, "reason": "ValueError: too few images"}
    rounds = [
        row(0, 0, 0.05, "v1"),
        row(1, 60, 0.20, "v2", promoted),
        row(2, 120, 0.20, "v2", refused),
        row(3, 180, 0.20, "v2", failed),
    ]
    arm = {
        "name": "gated",
        "gate": True,
        "auto_train": {
            "min_events": 60,
            "min_queries": 30,
            "parameters": {"epochs": 10, "batch_size": 8, "learning_rate": 6e-4, "gate_metric": "mean_recall"},
        },
        "rounds": rounds,
        "start_r5": 0.05,
        "final_r5": 0.20,
        "clicks_for": {"10": 60, "30": None},
        "stopped": None,
        "models": {"v1": "published", "v2": "current", "v3": "candidate", "v4": "candidate"},
        "wall_s": 100.0,
    }
    harmful = {
        "parameters": {"epochs": 1},
        "run": {"state": "done", "candidate": "v4", "promoted": harmful_promoted, "reason": "not promoted: worse"},
        "serving_before": "v2",
        "serving_after": "v4" if harmful_promoted else "v2",
        "unseen_before": {"r5": 0.20},
        "unseen_after": {"r5": 0.02 if harmful_promoted else 0.20},
        "unchanged": not harmful_promoted,
        "data": {"train_pairs": 1, "train_images": 1, "still_matching": 0, "eval_pairs": 1, "eval_images": 1},
    }
    return {
        "arms": [arm],
        "harmful": harmful,
        "data": {
            "gallery_images": 120,
            "pool_captions": 360,
            "unseen_captions": 120,
            "dropped_captions": 0,
            "data_seed": 0,
        },
        "settings": {"base": "demo", "limit": 10},
        "click_model": "position-based",
        "threads": 2,
    }


def test_the_feedback_loop_table_names_each_rounds_decision_and_the_clicks_each_gain_took():
    text = harness.feedback_loop_tables(_loop_result(harmful_promoted=False))
    lines = text.splitlines()
    assert next(line for line in lines if line.startswith("| 1 |")).endswith("v2: **promoted**: mean_recall 80 vs 50 |")
    assert "v3: **refused**: mean_recall 70 vs 80 |" in next(line for line in lines if line.startswith("| 2 |"))
    assert "failed: ValueError: too few images |" in next(line for line in lines if line.startswith("| 3 |"))
    assert "+10 points: 60 clicks (round 1); +30 points: not reached in 180 clicks" in text
    assert "Serving unchanged after the harmful run." in text


def test_the_feedback_loop_table_says_what_the_gate_measured_on_and_what_the_audit_found():
    result = _loop_result(harmful_promoted=False)
    arm = result["arms"][0]
    arm["auto_train"]["parameters"].pop("gate_metric")
    arm["gate_options"] = {"gate": True, "min_gain": 0.0, "max_regression": 0.01, "gate_metric": "mean_r5"}
    clean = {"held_out_queries": 6, "held_out_trained": 0, "regression_queries": 0, "regression_trained": 0}
    arm["rounds"][1]["run"].update(
        held_out={"serving": {"t2i_r5": 0.5, "i2t_r5": 0.7}, "candidate": {"t2i_r5": 0.6, "i2t_r5": 0.8}},
        eval_pairs=6,
        eval_images=80,
        feedback={"queries_held_out": 6, "queries_regression": 0},
        audit={**clean, "trained_queries": 24},
    )
    arm["rounds"][2]["run"].update(
        held_out={"serving": {"t2i_r5": 0.6, "i2t_r5": 0.8}, "candidate": {"t2i_r5": 0.5, "i2t_r5": 0.8}},
        eval_pairs=6,
        eval_images=90,
        feedback={"queries_held_out": 0, "queries_regression": 6},
        audit={**clean, "held_out_queries": 0, "regression_queries": 6, "trained_queries": 24},
    )
    text = harness.feedback_loop_tables(result)
    assert "gate on: gate_metric mean_r5, min_gain 0, max_regression 0.01 (the service's defaults)." in text
    row_1, row_2 = (next(line for line in text.splitlines() if line.startswith(f"| {n} |")) for n in (1, 2))
    assert "| 6 (0) + 0 (0) / 24 | 60.0 % → 70.0 %, 6 pairs among 80 images | v2: **promoted**" in row_1
    assert "6 pairs among 90 images (the regression set: no new query)" in row_2
    assert "put the candidate above the version serving in 1 of the 2 finished runs, level in 0, below in 1." in text
    assert "Audit: none of the 6 queries its runs held out for the gate and the 6 regression queries" in text
    arm["rounds"][2]["run"]["audit"]["regression_trained"] = 2
    text = harness.feedback_loop_tables(result)
    assert "**0 held-out and 2 regression** had been trained on by the version serving" in text


@pytest.mark.parametrize("promoted, verdict", [(False, "**met**"), (True, "**short**")])
def test_a_harmful_candidate_must_be_refused_with_serving_unchanged(promoted, verdict):
    target = next(t for t in harness.TARGETS if t.measure.startswith("a harmful candidate"))
    shown, judged = harness.judge(target, {"feedback_loop": _outcome(_loop_result(promoted))})
    assert judged == verdict and shown.startswith("promoted" if promoted else "refused")
    gain = next(t for t in harness.TARGETS if t.measure.startswith("learning from clicks, gate on"))
    assert harness.judge(gain, {"feedback_loop": _outcome(_loop_result(promoted))})[0] == (
        "5.0 % → 20.0 % after 180 clicks (3 rounds, 1 promoted)"
    )
    ungated = next(t for t in harness.TARGETS if t.measure.startswith("learning from clicks, gate off"))
    assert (
        "the ungated arm did not run" in harness.judge(ungated, {"feedback_loop": _outcome(_loop_result(promoted))})[1]
    )


def test_the_feedback_loop_chart_is_drawn(tmp_path):
    path = harness.feedback_loop_chart(_loop_result(harmful_promoted=False), tmp_path / "loop.png")
    assert is_drawn(path)


def test_merge_keeps_the_other_parts_and_names_the_run_of_the_new_one(monkeypatch, tmp_path):
    package = tmp_path / "parts_for_test"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, ratio in (("first", 1.5), ("second", 2.5)):
        (package / f"{name}.py").write_text(
            "import json, sys\n"
            f"json.dump({{'ratio': {ratio}}}, open(sys.argv[sys.argv.index('--json') + 1], 'w'))\n"
            f"print('| {name} | table |')\n"
        )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    parts = tuple(
        harness.Part(n, f"parts_for_test.{n}", f"Part {n}", (), (), "For the test.") for n in ("first", "second")
    )
    monkeypatch.setattr(harness, "PARTS", parts)
    monkeypatch.setattr(harness, "PART_NAMES", ("first", "second"))
    out = tmp_path / "RESULTS.md"
    assert harness.main(["--only", "first", "--out", str(out)]) == 0
    first_run = json.loads((tmp_path / "results.json").read_text())
    assert harness.main(["--only", "second", "--merge", "--out", str(out)]) == 0
    merged = json.loads((tmp_path / "results.json").read_text())
    assert merged["command"] == first_run["command"] and merged["parts"]["first"] == first_run["parts"]["first"]
    assert merged["parts"]["second"]["result"] == {"ratio": 2.5}
    assert merged["parts"]["second"]["ran"]["command"] == "python -m benchmarks --only second --merge --out " + str(out)
    text = out.read_text()
    assert "| first | table |" in text and "| second | table |" in text
    assert "This part ran on its own: `python -m benchmarks --only second --merge" in text
    assert text.count("This part ran on its own") == 1  # the first part is the report's own run
    assert harness.main(["--from-json", str(tmp_path / "results.json"), "--out", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text() == text


def test_merge_needs_an_earlier_report(tmp_path):
    with pytest.raises(SystemExit):
        harness.main(["--only", "search", "--merge", "--out", str(tmp_path / "RESULTS.md")])
