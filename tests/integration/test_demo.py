"""`cliptuner demo --quick`: every step through the real service (base pretraining and its cache, the gRPC Flow,
/index, /encode, /search, /train followed through /status, the move to the tuned version), its report and plots."""

import json
import os
import subprocess
import sys
from pathlib import Path

from cliptuner.train.plots import is_drawn

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "JINA_HIDE_SURVEY": "1", "JINA_OPTOUT_TELEMETRY": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "cliptuner.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_quick_demo_tunes_through_the_service_and_draws_its_plots(tmp_path):
    work, cache = tmp_path / "work", tmp_path / "cache"
    run = cli("demo", "--quick", "--workdir", str(work), "--cache-dir", str(cache), "--quiet")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "base model: pretraining cliptuner-tiny" in run.stderr  # an empty cache: the base is trained first
    # progress is sampled from /status (a quick run may pass an epoch between two samples): started, then done
    assert "service: serving on 127.0.0.1:" in run.stderr and "tuning: run " in run.stderr
    assert "tuning: done in" in run.stderr and "model version v2" in run.stderr
    result = json.loads((work / "demo.json").read_text())
    assert result["base_version"] == "v1" and result["tuned_version"] == "v2"
    assert result["report"]["epochs"] == 2 and len(result["report"]["epoch_losses"]) == 2
    for when in ("before", "after"):
        assert all(0.0 <= result[when][key] <= 1.0 for key in ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r5"))
    assert result["before"] != result["after"]  # the tuned version embeds differently
    assert len(result["queries"]) == 3
    for hits in result["top_before"] + result["top_after"]:
        assert len(hits) == 3 and all(gid.startswith("g") for gid, _, _ in hits)
    assert {version for hits in result["top_after"] for _, _, version in hits} == {"v2"}
    assert "t2i_r5" in run.stdout and "pretrained base" in run.stdout and "tuned" in run.stdout
    for name in ("training.png", "recall.png", "matches.png"):
        assert is_drawn(work / "plots" / name), name

    again = cli("pretrain-base", "--quick", "--cache-dir", str(cache))  # the demo's base is cached
    assert again.returncode == 0 and "cached at" in again.stderr
    assert Path(again.stdout.strip()).is_file() and Path(again.stdout.strip()).name == "checkpoint.pt"
