"""The data of a run on the recorded search feedback: ``/train`` with ``source: feedback`` and
``cliptuner train --feedback WORKSPACE`` both take it from :func:`feedback_training_sets`.

The feedback's pairs and split are :func:`cliptuner.serve.feedback_pairs.split_feedback`'s: the newest queries are
held out (before/after and the gate), the queries earlier runs held out are the regression set, the rest is trained
on with its hard negatives. When no query is new since the last run, the regression set measures the run instead
(its queries were never trained on either). A PAIRS file may be mixed in: its training part joins the training pairs, its held-out
part the held-out pairs. The held-out queries are recorded as kept (never trained on again) only once everything
checked out, so a refused request does not use them up.

Feedback judges a run with a lean toward the version serving: a person can choose only a result that version showed,
so the queries with a choice are those it already answered well, and the held-out ones too. Labelled eval data (a
PAIRS file of the domain, ``eval_data``) added to the held-out pairs gives the gate a measure that leans toward
neither; without it a run on feedback alone is promoted only when it beats that lean.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from cliptuner.serve.feedback import FeedbackLog
from cliptuner.serve.feedback_pairs import split_feedback
from cliptuner.train.data import PairSet, concat_pairs


@dataclasses.dataclass(frozen=True)
class FeedbackTraining:
    """What a run on the feedback trains on, is measured on and may not lose on."""

    train: PairSet
    held_out: PairSet
    regression: Optional[PairSet]  # the queries earlier runs held out; None before there are any
    sources: dict  # the report's split sources: source, held_out, feedback (the counts)


def check_batch(train: PairSet, batch_size: int) -> None:
    """Raise ValueError unless ``train`` has at least ``batch_size`` images (a batch holds distinct images)."""
    if train.num_images < batch_size:
        raise ValueError(
            f"{train.num_images} training images is fewer than batch_size {batch_size}: "
            "send more pairs or lower batch_size"
        )


def feedback_training_sets(
    root: Path,
    batch_size: int,
    extra: Optional[tuple[Optional[PairSet], Optional[PairSet]]] = None,
    extra_name: str = "",
) -> FeedbackTraining:
    """The training, held-out and regression pairs of a run on the feedback log in ``root``.

    Args:
        root: the feedback log's folder (``<workspace>/feedback``).
        batch_size: the run's batch size (the training pairs need as many images).
        extra: the training and held-out parts of a PAIRS file to mix in (either may be None: labelled eval data
            alone adds held-out pairs, which judge a run more fairly than feedback alone: see the module's docs).
        extra_name: how the sources name that file.

    Raises:
        ValueError: no usable feedback, too few queries to hold any out, or too few training images (names the
            counts).
    """
    log = FeedbackLog(root)
    try:
        preview = split_feedback(log, persist=False)
        if preview.train is None or (preview.held_out is None and preview.regression is None):
            raise ValueError(
                f"too little feedback to train on and hold out (at least two queries with a chosen result "
                f"whose content is stored): {preview.counts}"
            )
        check_batch(concat_pairs([preview.train, *([extra[0]] if extra and extra[0] is not None else [])]), batch_size)
        split = split_feedback(log)  # checked: its newest queries are held out from now on
    finally:
        log.close()
    if split.train is None or (split.held_out is None and split.regression is None):  # it changed between the looks
        raise ValueError(f"too little feedback to train on and hold out: {split.counts}")
    counts = split.counts
    source = f"feedback ({counts.get('events_used')} events through seq {counts.get('through_seq')})"
    if split.held_out is not None:
        held_out_from, measured = f"the newest {counts.get('queries_held_out')} feedback queries", split.held_out
    else:  # no query new since the last run: the queries earlier runs held out, never trained on, measure it
        held_out_from = f"the {counts.get('queries_regression')} feedback queries earlier runs held out (none is new)"
        measured = split.regression
    trains, held = [split.train], [measured]
    if extra is not None and extra[0] is not None:
        trains.append(extra[0])
        source += f" + {extra_name}"
    if extra is not None and extra[1] is not None:
        held.append(extra[1])
        held_out_from += f" + {extra_name}" if extra[0] is None else f" + the held-out part of {extra_name}"
    return FeedbackTraining(
        train=concat_pairs(trains, name="feedback"),
        held_out=concat_pairs(held, name="feedback held out"),
        regression=split.regression,
        sources={"source": source, "held_out": held_out_from, "feedback": counts},
    )


__all__ = ["FeedbackTraining", "check_batch", "feedback_training_sets"]
