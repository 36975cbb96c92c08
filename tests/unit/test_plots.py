"""The plots of a tuning run: written, the right size, not blank, and refused with a clear error when empty."""

import numpy as np
import pytest
from PIL import Image

from cliptuner.train import plots, synthetic
from cliptuner.train.plots import is_drawn

REPORT = {
    "epoch_losses": [2.1, 1.7, 1.2, 0.9],
    "eval_history": [{"epoch": e, "t2i_r5": r, "i2t_r5": r * 0.9} for e, r in ((1, 0.1), (2, 0.3), (3, 0.5), (4, 0.6))],
    "history_split": "val",
    "best_epoch": 4,
    "before": {"t2i_r1": 0.01, "t2i_r5": 0.05, "t2i_r10": 0.1, "i2t_r1": 0.02, "i2t_r5": 0.06, "i2t_r10": 0.1},
    "after": {"t2i_r1": 0.3, "t2i_r5": 0.7, "t2i_r10": 0.9, "i2t_r1": 0.25, "i2t_r5": 0.6, "i2t_r10": 0.8},
}


def test_report_plots_are_drawn(tmp_path):
    written = plots.write_report_plots(REPORT, tmp_path / "plots")
    assert [p.name for p in written] == ["training.png", "recall.png"]
    for path in written:
        assert is_drawn(path), path


def test_a_report_without_recall_gets_only_the_curves(tmp_path):
    written = plots.write_report_plots({"epoch_losses": [1.0, 0.5]}, tmp_path)
    assert [p.name for p in written] == ["training.png"] and is_drawn(written[0])


def test_a_plot_that_cannot_be_drawn_does_not_fail_the_run(tmp_path, caplog):
    written = plots.write_report_plots({"epoch_losses": [1.0], "before": {"x": 1}, "after": {"y": 2}}, tmp_path)
    assert [p.name for p in written] == ["training.png"]  # the bars had no recall keys
    assert "could not draw the plots" in caplog.text and "no recall to plot" in caplog.text


def test_empty_inputs_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="no epoch_losses"):
        plots.training_curves({}, tmp_path / "t.png")
    with pytest.raises(ValueError, match="no recall to plot"):
        plots.recall_bars({}, {}, tmp_path / "r.png")
    with pytest.raises(ValueError, match="no queries"):
        plots.match_grid([], tmp_path / "g.png")
    with pytest.raises(ValueError, match="no matches"):
        plots.match_grid([plots.QueryMatches("a red circle")], tmp_path / "g.png")


def test_match_grid_shows_each_query_row_with_its_images(tmp_path):
    data = synthetic.generate(6, "domain", seed=1, image_size=48)
    rows = [
        plots.QueryMatches(
            data.captions[q],
            before=[plots.Match(data.images[(q + i) % 6], 0.3 - 0.01 * i) for i in range(3)],
            after=[plots.Match(data.images[(q + i) % 6], 0.6 - 0.1 * i, correct=i == 0) for i in range(3)],
        )
        for q in range(2)
    ]
    one = plots.match_grid(rows[:1], tmp_path / "one.png", title="top-3")
    two = plots.match_grid(rows, tmp_path / "two.png", title="top-3")
    assert is_drawn(one) and is_drawn(two)
    with Image.open(one) as a, Image.open(two) as b:
        assert b.height > 1.5 * a.height and b.width == a.width  # a row per query, 3 + 3 columns each
        pixels = np.asarray(b.convert("RGB"))
    green = np.all(pixels == np.array([0x2B, 0x8A, 0x3E]), axis=-1)
    assert green.sum() > 100  # the correct matches are framed
