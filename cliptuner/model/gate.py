"""The evaluation gate: whether a tuned candidate replaces the version serving now. Torch-free.

A finished run is a *candidate*. The run measures it and the version serving now (the weights it started from)
on the same held-out split, and on each regression set given (general pairs, the kept queries of past feedback).
:func:`decide` applies :class:`cliptuner.config.GateConfig` to those numbers:

- gain: ``candidate - serving`` on ``gate_metric`` (default ``mean_r5``, the mean of t2i and i2t recall@5) must be
  at least ``min_gain``; with ``min_gain = 0`` a tie is not enough (nothing says the candidate is better, and a swap
  costs a re-embedding of the whole index);
- regression: on every regression set, ``serving - candidate`` must be at most ``max_regression``.

The decision travels in the run's report as ``report["gate"]`` (:meth:`GateDecision.to_dict`); the version's
``model.json`` keeps it, so listings show a refused candidate with its reason (:func:`gate_status`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

from cliptuner.config import GateConfig

EPSILON = 1e-9  # recalls are fractions of whole counts: compare them without float noise
GATE_OFF_REASON = "gate off: every finished run is promoted"


def gate_value(metrics: Mapping[str, float], metric: str) -> float:
    """``metric`` of a recall dict: ``mean_r5`` is the mean of ``t2i_r5`` and ``i2t_r5``.

    Raises:
        ValueError: the dict lacks what the metric needs (names the keys it has).
    """
    needed = ("t2i_r5", "i2t_r5") if metric == "mean_r5" else (metric,)
    missing = [key for key in needed if key not in metrics]
    if missing:
        raise ValueError(f"gate metric {metric!r} needs {missing}; the metrics hold {sorted(metrics)}")
    return float(sum(metrics[key] for key in needed) / len(needed))


@dataclasses.dataclass(frozen=True)
class Regression:
    """The candidate against the serving version on one regression set."""

    serving: float
    candidate: float
    max_regression: float

    @property
    def loss(self) -> float:
        return self.serving - self.candidate

    @property
    def passed(self) -> bool:
        return self.loss <= self.max_regression + EPSILON

    def to_dict(self) -> dict[str, Any]:
        return {
            "serving": round(self.serving, 6),
            "candidate": round(self.candidate, 6),
            "loss": round(self.loss, 6),
            "passed": self.passed,
        }


@dataclasses.dataclass(frozen=True)
class GateDecision:
    """What the gate decided for one candidate, and on which numbers."""

    promoted: bool
    reason: str  # "promoted: ..." or "not promoted: ..." with the numbers
    metric: str
    serving: Optional[float] = None  # gate metric of the serving version on the held-out split
    candidate: Optional[float] = None
    min_gain: float = 0.0
    regression: Mapping[str, Regression] = dataclasses.field(default_factory=dict)
    enabled: bool = True
    failed: Optional[str] = None  # "gain", "regression" or "current moved" when refused

    @property
    def gain(self) -> Optional[float]:
        return None if self.serving is None or self.candidate is None else self.candidate - self.serving

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"enabled", "promoted", "reason", "metric", "serving", "candidate", "gain", "min_gain",
        "regression": {name: {"serving", "candidate", "loss", "passed"}}, "failed"}``."""
        out: dict[str, Any] = {"enabled": self.enabled, "promoted": self.promoted, "reason": self.reason}
        if not self.enabled:
            return out
        gain = self.gain
        out.update(
            metric=self.metric,
            serving=None if self.serving is None else round(self.serving, 6),
            candidate=None if self.candidate is None else round(self.candidate, 6),
            gain=None if gain is None else round(gain, 6),
            min_gain=self.min_gain,
            regression={name: r.to_dict() for name, r in self.regression.items()},
            failed=self.failed,
        )
        return out


def _points(value: float) -> str:
    return f"{100 * value:.1f}"


def gate_off() -> GateDecision:
    """The decision of a run with ``gate: false``: promoted, nothing measured."""
    return GateDecision(promoted=True, reason=GATE_OFF_REASON, metric="", enabled=False)


def decide(
    cfg: GateConfig,
    serving: Mapping[str, float],
    candidate: Mapping[str, float],
    regression: Optional[Mapping[str, tuple[Mapping[str, float], Mapping[str, float]]]] = None,
    serving_label: str = "the serving version",
) -> GateDecision:
    """Whether ``candidate`` replaces the serving version.

    Args:
        cfg: the gate's options (``cfg.gate`` false: promoted without looking at the numbers).
        serving: held-out recall of the serving version (measured in the same run, on the same split).
        candidate: held-out recall of the candidate.
        regression: regression set name → ``(serving recall, candidate recall)`` on that set.
        serving_label: how the reason names the serving version (``version v3``).

    Returns:
        The decision; its ``reason`` names the metric and the numbers (in points of recall).

    Raises:
        ValueError: a recall dict lacks what ``cfg.gate_metric`` needs.
    """
    if not cfg.gate:
        return gate_off()
    metric = cfg.gate_metric
    served, tuned = gate_value(serving, metric), gate_value(candidate, metric)
    regressions = {
        name: Regression(gate_value(before, metric), gate_value(after, metric), cfg.max_regression)
        for name, (before, after) in (regression or {}).items()
    }
    gain = tuned - served
    enough = gain > EPSILON if cfg.min_gain == 0 else gain >= cfg.min_gain - EPSILON
    numbers = f"{metric} {_points(tuned)} vs {_points(served)} of {serving_label} on the held-out split"
    common = {
        "metric": metric,
        "serving": served,
        "candidate": tuned,
        "min_gain": cfg.min_gain,
        "regression": regressions,
    }
    if not enough:
        wanted = "more than 0" if cfg.min_gain == 0 else f"at least {_points(cfg.min_gain)}"
        reason = f"not promoted: {numbers}: a gain of {_points(gain)} points, {wanted} needed"
        return GateDecision(promoted=False, reason=reason, failed="gain", **common)
    lost = {name: r for name, r in regressions.items() if not r.passed}
    if lost:
        details = "; ".join(
            f"{name} {_points(r.candidate)} vs {_points(r.serving)} (-{_points(r.loss)} points)"
            for name, r in lost.items()
        )
        reason = (
            f"not promoted: {numbers} ({gain * 100:+.1f} points), but it loses more than "
            f"{_points(cfg.max_regression)} points on {details}"
        )
        return GateDecision(promoted=False, reason=reason, failed="regression", **common)
    kept = "".join(f"; {name} {_points(r.candidate)} vs {_points(r.serving)}" for name, r in regressions.items())
    return GateDecision(promoted=True, reason=f"promoted: {numbers} ({gain * 100:+.1f} points){kept}", **common)


def refused_after_all(gate: Mapping[str, Any], why: str) -> dict[str, Any]:
    """A ``report["gate"]`` dict the gate passed, turned into a refusal for ``why`` (e.g. CURRENT moved)."""
    return {**gate, "promoted": False, "reason": f"not promoted: {why}", "failed": "current moved"}


def gate_status(report: Any) -> Optional[dict[str, Any]]:
    """``{"promoted", "reason"}`` of a version's training report, or None when it has no gate decision (a base
    version, or one trained before the gate existed)."""
    if not isinstance(report, Mapping):
        return None
    gate = report.get("gate")
    if not isinstance(gate, Mapping) or "promoted" not in gate:
        return None
    return {"promoted": bool(gate["promoted"]), "reason": str(gate.get("reason", ""))}


__all__ = [
    "GATE_OFF_REASON",
    "GateDecision",
    "Regression",
    "decide",
    "gate_off",
    "gate_status",
    "gate_value",
    "refused_after_all",
]
