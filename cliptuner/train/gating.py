"""The gate's measurements inside a training run: the weights it starts from against the tuned ones.

A run starts from the weights of the version serving now (the tuner trains CURRENT's checkpoint), so "serving" is
measured in the same run, on the same split, by the same code as the candidate:

1. :func:`gate_baseline`, before training: the start weights on each regression set (a copy of them is kept for
   the WiSE-FT rescue). Their held-out recall is the report's ``before``.
2. :func:`gate_after`, after training: the tuned weights on each regression set, then
   :func:`cliptuner.model.gate.decide` on held-out ``before``/``after`` and the regression numbers.
3. The WiSE-FT rescue (``gate_wiseft``): when the tuned weights lose too much on a regression set, each blend
   ``(1 - a) * start + a * tuned`` is measured and decided the same way; the passing blend with the best held-out
   gate metric (ties: the smaller ``a``) is kept in the model, which is then exported. Its held-out recall becomes
   ``after`` (the tuned weights' stays as ``tuned_after``). The blend is chosen on the split it is reported on, as
   the gate itself is; the regression sets keep it honest about what it loses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Optional

from cliptuner.config import EvalConfig, GateConfig, TrainConfig
from cliptuner.model.gate import decide, gate_off, gate_value
from cliptuner.train.data import PairSet
from cliptuner.train.evaluate import evaluate
from cliptuner.train.wiseft import apply_wiseft, state_copy, wiseft_sweep

RESCUE_ALPHAS = (0.2, 0.4, 0.6, 0.8)  # blends tried by the rescue when the run names no wiseft_alphas


@dataclasses.dataclass
class GateBaseline:
    """What the gate measured of the start weights before training."""

    regression: dict[str, PairSet]  # regression set name -> pairs
    serving: dict[str, dict[str, float]]  # regression set name -> recall of the start weights there
    state: Optional[dict[str, Any]]  # a CPU copy of the start weights, for the rescue


def _measure(bundle: Any, sets: Mapping[str, PairSet], eval_cfg: EvalConfig) -> dict[str, dict[str, float]]:
    return {name: evaluate(bundle, pairs, eval_cfg.ks, eval_cfg.batch_size) for name, pairs in sets.items()}


def gate_baseline(
    bundle: Any, cfg: GateConfig, regression: Mapping[str, PairSet], eval_cfg: EvalConfig, device: str
) -> Optional[GateBaseline]:
    """Measure the start weights on the regression sets (on ``device``); None when the gate is off."""
    if not cfg.gate:
        return None
    bundle.model.to(device)
    state = state_copy(bundle.model) if cfg.gate_wiseft else None
    return GateBaseline(dict(regression), _measure(bundle, regression, eval_cfg), state)


def gate_after(
    bundle: Any,
    baseline: Optional[GateBaseline],
    cfg: GateConfig,
    train_cfg: TrainConfig,
    eval_cfg: EvalConfig,
    eval_pairs: PairSet,
    report: dict[str, Any],
    serving_label: str,
    emit: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """The gate's decision on the tuned weights in ``bundle`` (``report["gate"]``), emitted as a ``gate`` event.

    With the WiSE-FT rescue the model may end with a blend; ``report["after"]`` then describes it and
    ``report["tuned_after"]`` keeps the tuned weights' numbers.
    """
    if baseline is None:
        decision = gate_off().to_dict()
        emit({"event": "gate", **decision})
        return decision
    tuned = _measure(bundle, baseline.regression, eval_cfg)
    pairs = {name: (baseline.serving[name], tuned[name]) for name in baseline.regression}
    first = decide(cfg, report["before"], report["after"], pairs, serving_label)
    out = first.to_dict()
    if first.failed == "regression" and cfg.gate_wiseft and baseline.state is not None:
        out = _rescue(bundle, baseline, cfg, train_cfg, eval_cfg, eval_pairs, report, serving_label, out)
    emit({"event": "gate", **out})
    return out


def _rescue(
    bundle: Any,
    baseline: GateBaseline,
    cfg: GateConfig,
    train_cfg: TrainConfig,
    eval_cfg: EvalConfig,
    eval_pairs: PairSet,
    report: dict[str, Any],
    serving_label: str,
    refused: dict[str, Any],
) -> dict[str, Any]:
    """Try WiSE-FT blends; keep the best that passes in the model, or leave the tuned weights and the refusal."""
    alphas = sorted(a for a in (train_cfg.wiseft_alphas or RESCUE_ALPHAS) if 0.0 < a < 1.0) or list(RESCUE_ALPHAS)
    tuned_state = state_copy(bundle.model)
    sets = {"held_out": eval_pairs, **baseline.regression}
    sweep = wiseft_sweep(bundle, baseline.state, tuned_state, alphas, sets, eval_cfg.ks, eval_cfg.batch_size)
    tried, best = [], None
    for entry in sweep:
        regression = {name: (baseline.serving[name], entry[name]) for name in baseline.regression}
        decision = decide(cfg, report["before"], entry["held_out"], regression, serving_label)
        tried.append({"alpha": entry["alpha"], "promoted": decision.promoted, "reason": decision.reason})
        score = gate_value(entry["held_out"], cfg.gate_metric)
        if decision.promoted and (best is None or score > best[0]):
            best = (score, entry, decision)
    if best is None:
        return {**refused, "reason": refused["reason"] + "; no WiSE-FT blend passed either", "wiseft": {"tried": tried}}
    _, entry, decision = best
    apply_wiseft(bundle.model, baseline.state, tuned_state, entry["alpha"])
    report["tuned_after"], report["after"] = report["after"], entry["held_out"]
    out = decision.to_dict()
    out["reason"] = decision.reason.replace("promoted:", f"promoted (WiSE-FT blend, alpha {entry['alpha']:g}):", 1)
    out["wiseft"] = {"alpha": entry["alpha"], "tried": tried, "tuned": refused}
    return out


__all__ = ["RESCUE_ALPHAS", "GateBaseline", "gate_after", "gate_baseline"]
