"""benchmarks/encode_speed.py and benchmarks/train_step.py at tiny sizes: complete, finite, agreeing results.

Timings are never asserted: only that every documented key is there, that rates and ratios are positive and
finite, and that the two sides computed the same thing (embeddings; the first-batch loss).
"""

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import encode_speed, train_step  # noqa: E402

COMMON = ("machine", "python", "torch", "threads", "wall_s", "command")


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_encode_speed_tiny_run_is_complete_and_both_sides_agree(tmp_path, capsys):
    out = tmp_path / "encode.json"
    result = encode_speed.main(
        [
            "--model",
            "cliptuner-tiny",
            "--batch",
            "4",
            "--repeats",
            "1",
            "--gemm-size",
            "128",
            "--gemm-repeats",
            "1",
            "--profile",
            "always",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    for key in (*COMMON, "onnxruntime", "numpy", "model", "batch", "matmul_peak_gflops", "image", "text"):
        assert key in result, key
    assert result["model"] == "cliptuner-tiny" and result["batch"] == 4 and result["threads"] == 1
    assert positive_finite(result["matmul_peak_gflops"])
    best = max(v for k, v in result["matmul"].items() if k != "size")
    assert result["matmul_peak_gflops"] <= best and result["matmul"]["size"] == 128
    for tower in ("image", "text"):
        row = result[tower]
        for key in (
            "onnx_per_s",
            "torch_per_s",
            "ratio",
            "gflop_per_item",
            "onnx_gflops",
            "torch_gflops",
            "peak_gflops",
            "onnx_fraction_of_peak",
            "torch_fraction_of_peak",
            "ratio_ceiling",
        ):
            assert positive_finite(row[key]), (tower, key, row[key])
        assert math.isclose(row["ratio"], row["onnx_per_s"] / row["torch_per_s"])
        assert math.isclose(row["onnx_gflops"], row["gflop_per_item"] * row["onnx_per_s"])
        assert math.isclose(row["onnx_fraction_of_peak"], row["onnx_gflops"] / row["peak_gflops"])
        assert row["peak_gflops"] <= best
        assert row["min_cosine"] >= 0.999, (tower, row["min_cosine"])
        e2e = result["end_to_end"][tower]
        assert all(positive_finite(e2e[k]) for k in ("onnx_per_s", "torch_per_s", "ratio"))
        for side in ("onnx", "torch"):
            prof = result["profile"][tower][side]
            assert prof["ops"] and all(0 < o["share"] <= 1 for o in prof["ops"]), (tower, side, prof)
            assert sum(o["share"] for o in prof["ops"]) <= 1 + 1e-9
            assert 0 < prof["matmul_share"] <= 1
        # the ONNX profile sees the graph's matrix products
        assert any(o["op"] in ("MatMul", "Gemm", "FusedMatMul") for o in result["profile"][tower]["onnx"]["ops"])
    assert isinstance(result["notes"], list)
    # the tiny image tower: 64 px, 8 px patches (64 tokens + class), width 128, 4 layers -> ~0.1 GFLOP per image
    assert 0.05 < result["image"]["gflop_per_item"] < 0.2
    assert json.loads(out.read_text())["image"]["ratio"] == result["image"]["ratio"]
    printed = capsys.readouterr().out
    assert "| image | model |" in printed and "| text | end-to-end |" in printed


def test_train_step_tiny_run_is_complete_and_both_loops_start_from_the_same_loss(tmp_path, capsys):
    out = tmp_path / "train.json"
    result = train_step.main(
        [
            "--model",
            "cliptuner-tiny",
            "--batch",
            "4",
            "--steps",
            "1",
            "--repeats",
            "2",
            "--profile",
            "always",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    for key in (
        *COMMON,
        "open_clip",
        "project_steps_per_s",
        "bare_steps_per_s",
        "ratio",
        "ratios",
        "model",
        "batch",
        "samples_per_s",
    ):
        assert key in result, key
    assert result["model"] == "cliptuner-tiny" and result["batch"] == 4
    for key in ("project_steps_per_s", "bare_steps_per_s", "ratio"):
        assert positive_finite(result[key]), (key, result[key])
    assert len(result["ratios"]) == 2 and all(positive_finite(r) for r in result["ratios"])
    assert math.isclose(result["ratio"], result["project_steps_per_s"] / result["bare_steps_per_s"])
    assert math.isclose(result["samples_per_s"]["bare"], 4 * result["bare_steps_per_s"])
    assert math.isclose(result["samples_per_s"]["project"], 4 * result["project_steps_per_s"])
    # same initial weights and batch: the two loops compute the same first loss
    first = result["first_loss"]
    assert positive_finite(first["project"]) and math.isclose(first["project"], first["bare"], rel_tol=1e-5)
    for side in ("project", "bare"):
        prof = result["profile"][side]
        assert prof["ops"] and all(0 < o["share"] <= 1 for o in prof["ops"])
        assert sum(prof["seconds"].values()) > 0
    assert result["notes"] and "project vs bare" in result["notes"][0]
    assert json.loads(out.read_text())["ratios"] == result["ratios"]
    assert "| cliptuner fit |" in capsys.readouterr().out
