"""`python -m benchmarks`: writes RESULTS.md, results.json and charts from scratch, judges targets, reports failures.

One real run of two cheap parts in quick mode (a child process per part, as always), then the judging and the
failure path on parts made for the test.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402
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
