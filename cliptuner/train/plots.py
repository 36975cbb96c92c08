"""PNG plots of a tuning run: the training curves, recall before vs after, and top matches before vs after.

Plain inputs (a training report's dicts, uint8 image arrays, strings): no Documents, no model. matplotlib is
imported when a plot is drawn, with its non-interactive ``Agg`` backend, so that the serving install (which has no
matplotlib) never needs it.

- :func:`training_curves`: loss per epoch and recall@5 both ways per epoch (``report["epoch_losses"]``,
  ``report["eval_history"]``), saying which split the curve was measured on.
- :func:`recall_bars`: recall@k text→image and image→text before vs after, on the held-out split.
- :func:`match_grid`: for a few text queries, the top matches before and after, each with its score; the image
  the caption was written for is framed.
- :func:`write_report_plots`: the first two from a report into a folder.
- :func:`is_drawn`: whether a PNG is a drawn chart (size, not one flat colour).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

logger = logging.getLogger(__name__)

RECALL_KEYS = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10")
HISTORY_SPLITS = {"val": "validation part of the training images", "eval": "held-out pairs"}
DPI = 110


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def training_curves(report: dict, path: str | Path, title: str = "Training") -> Path:
    """Loss per epoch (left axis) and recall@5 both ways per evaluated epoch (right axis).

    Args:
        report: a training report (:func:`cliptuner.train.loop.finetune`): ``epoch_losses``, and ``eval_history`` with
            ``history_split`` when epochs were evaluated.
        path: the PNG to write.

    Raises:
        ValueError: the report has no epoch losses.
    """
    losses = list(report.get("epoch_losses") or [])
    if not losses:
        raise ValueError("the report has no epoch_losses: nothing to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = list(range(1, len(losses) + 1))
    ax.plot(epochs, losses, marker="o", color="#1c7ed6", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean training loss")
    ax.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(1, len(epochs) // 10)])
    history = report.get("eval_history") or []
    handles, labels = ax.get_legend_handles_labels()
    if history:
        right = ax.twinx()
        split = HISTORY_SPLITS.get(report.get("history_split", ""), "evaluation split")
        for key, colour in (("t2i_r5", "#2b8a3e"), ("i2t_r5", "#e8590c")):
            points = [(h["epoch"], 100 * h[key]) for h in history if key in h]
            if points:
                right.plot(*zip(*points), marker="s", color=colour, label=f"{key} ({split})")
        if report.get("best_epoch"):
            right.axvline(report["best_epoch"], color="grey", linestyle=":", label="epoch kept")
        right.set_ylabel("recall@5 (%)")
        right.set_ylim(0, 100)
        more_h, more_l = right.get_legend_handles_labels()
        handles, labels = handles + more_h, labels + more_l
    ax.legend(handles, labels, fontsize=8, loc="center right")
    ax.set_title(title)
    return _save(fig, path)


def recall_bars(
    before: dict,
    after: dict,
    path: str | Path,
    title: str = "Held-out recall",
    labels: tuple[str, str] = ("before", "after"),
) -> Path:
    """Recall@1/5/10 text→image and image→text, before vs after, as grouped bars (in %).

    Raises:
        ValueError: neither dict has a recall key.
    """
    keys = [k for k in RECALL_KEYS if k in before or k in after]
    if not keys:
        raise ValueError(f"no recall to plot: expected keys among {list(RECALL_KEYS)}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(keys))
    width = 0.38
    for offset, metrics, label, colour in (
        (-width / 2, before, labels[0], "#adb5bd"),
        (width / 2, after, labels[1], "#2b8a3e"),
    ):
        values = [100 * metrics.get(k, 0.0) for k in keys]
        bars = ax.bar(x + offset, values, width, label=label, color=colour)
        for bar, value in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, value + 1, f"{value:.0f}", ha="center", fontsize=7)
    ax.set_xticks(
        x,
        [k.replace("t2i_r", "text→image R@").replace("i2t_r", "image→text R@") for k in keys],
        fontsize=8,
        rotation=15,
    )
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 108)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


@dataclass
class Match:
    """One retrieved image: its pixels, its score, and whether it is the image the query was written for."""

    image: np.ndarray  # H×W×3 uint8
    score: float
    correct: bool = False


@dataclass
class QueryMatches:
    """A text query and its top matches before and after tuning."""

    query: str
    before: list[Match] = field(default_factory=list)
    after: list[Match] = field(default_factory=list)


def match_grid(
    rows: Sequence[QueryMatches],
    path: str | Path,
    labels: tuple[str, str] = ("before", "after"),
    title: Optional[str] = None,
) -> Path:
    """A grid: one row per query; its top matches before (left) and after (right), score under each, the right
    image framed in green.

    Raises:
        ValueError: no rows, or a row without matches.
    """
    if not rows:
        raise ValueError("no queries to plot")
    width = max(max(len(r.before), len(r.after)) for r in rows)
    if width == 0:
        raise ValueError("the queries have no matches to plot")
    plt = _pyplot()
    cols = 2 * width
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols + 0.4, 1.9 * len(rows) + 0.6), squeeze=False)
    for r, row in enumerate(rows):
        for side, matches in enumerate((row.before, row.after)):
            for i in range(width):
                ax = axes[r][side * width + i]
                ax.set_xticks([])
                ax.set_yticks([])
                if i >= len(matches):
                    ax.axis("off")
                    continue
                match = matches[i]
                ax.imshow(np.asarray(match.image))
                for spine in ax.spines.values():
                    spine.set_edgecolor("#2b8a3e" if match.correct else "#dee2e6")
                    spine.set_linewidth(4 if match.correct else 1)
                ax.set_xlabel(f"{match.score:.3f}", fontsize=7)
                if r == 0 and i == 0:
                    ax.set_title(labels[side], fontsize=9, loc="left")
        axes[r][0].set_ylabel(_wrap(row.query, 22), fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    if line:
        lines.append(line)
    return "\n".join(lines[:4])


def write_report_plots(report: dict, folder: str | Path, prefix: str = "") -> list[Path]:
    """``training.png`` (when the report has epoch losses) and ``recall.png`` (when it has before/after recall)
    into ``folder``; returns the paths written. A plot that cannot be drawn is logged, not raised: plots never
    fail a training run that succeeded."""
    folder = Path(folder)
    written: list[Path] = []
    try:
        if report.get("epoch_losses"):
            written.append(training_curves(report, folder / f"{prefix}training.png"))
        if report.get("before") and report.get("after"):
            written.append(recall_bars(report["before"], report["after"], folder / f"{prefix}recall.png"))
    except Exception as exc:  # noqa: BLE001 - a plot must not fail the run it describes
        logger.warning("could not draw the plots in %s: %s", folder, exc)
    return written


def is_drawn(path: str | Path, min_size: tuple[int, int] = (300, 200), min_std: float = 8.0) -> bool:
    """Whether a PNG looks like a drawn chart: at least ``min_size`` pixels and not one flat colour."""
    from PIL import Image

    with Image.open(path) as image:
        if image.width < min_size[0] or image.height < min_size[1]:
            return False
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    return float(pixels.std()) >= min_std
