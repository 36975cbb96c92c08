"""The evaluation gate: the decision rule (:mod:`cliptuner.model.gate`) and its measurements in a run
(:mod:`cliptuner.train.gating`), on the session's tiny model."""

import copy
import dataclasses

import pytest
import torch

from cliptuner.config import EvalConfig, GateConfig, ModelSpec, TrainConfig
from cliptuner.model.gate import GATE_OFF_REASON, decide, gate_status, gate_value
from cliptuner.train import synthetic
from cliptuner.train.evaluate import evaluate
from cliptuner.train.gating import gate_after, gate_baseline
from cliptuner.train.loop import finetune
from cliptuner.train.models import load_model


def recall(t2i: float, i2t: float, **more: float) -> dict:
    return {"t2i_r1": t2i / 2, "t2i_r5": t2i, "i2t_r5": i2t, "mean_recall": (t2i + i2t) / 2, **more}


# -- the rule --------------------------------------------------------------------------------------------------------
def test_gate_value_is_the_mean_of_both_recalls_at_5_or_one_recall():
    assert gate_value(recall(0.5, 0.3), "mean_r5") == pytest.approx(0.4)
    assert gate_value(recall(0.5, 0.3), "t2i_r1") == 0.25
    with pytest.raises(ValueError, match=r"gate metric 'mean_r5' needs \['i2t_r5'\]; the metrics hold \['t2i_r5'\]"):
        gate_value({"t2i_r5": 0.5}, "mean_r5")


def test_a_better_candidate_is_promoted_with_its_numbers_in_the_reason():
    decision = decide(GateConfig(), recall(0.4, 0.2), recall(0.6, 0.4), serving_label="version v3")
    assert decision.promoted and decision.failed is None and decision.gain == pytest.approx(0.2)
    assert decision.reason == "promoted: mean_r5 50.0 vs 30.0 of version v3 on the held-out split (+20.0 points)"
    assert decision.to_dict()["gain"] == 0.2 and decision.to_dict()["serving"] == 0.3


def test_a_worse_candidate_and_a_tie_are_refused_and_min_gain_raises_the_bar():
    worse = decide(GateConfig(), recall(0.6, 0.4), recall(0.5, 0.3))
    assert not worse.promoted and worse.failed == "gain"
    assert worse.reason == (
        "not promoted: mean_r5 40.0 vs 50.0 of the serving version on the held-out split: a gain of -10.0 points, "
        "more than 0 needed"
    )
    tie = decide(GateConfig(), recall(0.5, 0.5), recall(0.6, 0.4))  # same mean: nothing says it is better
    assert not tie.promoted and "a gain of 0.0 points" in tie.reason
    small = decide(GateConfig(min_gain=0.05), recall(0.5, 0.5), recall(0.54, 0.5))
    assert not small.promoted and "a gain of 2.0 points, at least 5.0 needed" in small.reason
    assert decide(GateConfig(min_gain=0.05), recall(0.5, 0.5), recall(0.6, 0.5)).promoted
    assert decide(GateConfig(min_gain=-0.02), recall(0.5, 0.5), recall(0.48, 0.5)).promoted  # a bounded loss
    assert decide(GateConfig(gate_metric="t2i_r5"), recall(0.5, 0.9), recall(0.6, 0.1)).promoted


def test_a_loss_on_a_regression_set_blocks_a_gain_and_names_the_set():
    held = (recall(0.2, 0.2), recall(0.6, 0.6))
    fine = decide(GateConfig(), *held, {"general": (recall(0.5, 0.5), recall(0.495, 0.5))})
    assert fine.promoted and "general 49.8 vs 50.0" in fine.reason  # 0.25 points lost: within 1 point
    blocked = decide(
        GateConfig(), *held, {"general": (recall(0.5, 0.5), recall(0.45, 0.5)), "feedback": (recall(0.3, 0.3),) * 2}
    )
    assert not blocked.promoted and blocked.failed == "regression"
    assert "loses more than 1.0 points on general 47.5 vs 50.0 (-2.5 points)" in blocked.reason
    assert "feedback" not in blocked.reason.split("loses", 1)[1]
    assert blocked.to_dict()["regression"] == {
        "general": {"serving": 0.5, "candidate": 0.475, "loss": 0.025, "passed": False},
        "feedback": {"serving": 0.3, "candidate": 0.3, "loss": 0.0, "passed": True},
    }
    loose = decide(GateConfig(max_regression=0.05), *held, {"general": (recall(0.5, 0.5), recall(0.45, 0.5))})
    assert loose.promoted


def test_gate_off_promotes_without_measuring_and_statuses_read_reports():
    decision = decide(GateConfig(gate=False), recall(0.9, 0.9), recall(0.0, 0.0))
    assert decision.promoted and decision.to_dict() == {"enabled": False, "promoted": True, "reason": GATE_OFF_REASON}
    assert gate_status({"gate": {"promoted": False, "reason": "x"}}) == {"promoted": False, "reason": "x"}
    assert gate_status({"before": {}}) is None and gate_status(None) is None


@pytest.mark.parametrize(
    "values, message",
    [
        ({"min_gain": 2.0}, r"min_gain must be in \[-1, 1\], got 2.0"),
        ({"max_regression": -0.1}, r"max_regression must be in \[0, 1\], got -0.1"),
        ({"gate_metric": "r5"}, r"gate_metric must be one of \['mean_r5', 't2i_r1'"),
        ({"gate": 1}, "gate must be true or false"),
    ],
)
def test_bad_gate_options_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        GateConfig(**values)


# -- the measurements in a run ---------------------------------------------------------------------------------------
@pytest.fixture
def bundle(tiny_bundle):
    torch.set_num_threads(1)
    return dataclasses.replace(tiny_bundle, model=copy.deepcopy(tiny_bundle.model))


def spoil(model, scale=0.5, seed=0):
    """Add noise to every weight: a candidate that lost what the start weights knew."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale * (p.std() if p.numel() > 1 else 1.0))


def test_a_run_measures_the_start_weights_and_the_candidate_on_each_regression_set(bundle):
    held_out = synthetic.generate(8, domain="domain", seed=1)
    general = synthetic.generate(10, domain="generic", seed=2)
    eval_cfg = EvalConfig()
    events = []
    baseline = gate_baseline(bundle, GateConfig(), {"general": general}, eval_cfg, "cpu")
    assert baseline.serving["general"] == evaluate(bundle, general) and baseline.state is None
    report = {"before": evaluate(bundle, held_out), "after": recall(1.0, 1.0)}  # a candidate far ahead on held-out
    spoil(bundle.model)
    spoiled = evaluate(bundle, general)
    gate = gate_after(
        bundle, baseline, GateConfig(max_regression=0.0), TrainConfig(), eval_cfg, held_out, report, "v1", events.append
    )
    loss = gate_value(baseline.serving["general"], "mean_r5") - gate_value(spoiled, "mean_r5")
    assert gate["regression"]["general"]["loss"] == pytest.approx(loss, abs=1e-6)
    assert gate["promoted"] is (loss <= 0) and events == [{"event": "gate", **gate}]
    assert gate_after(bundle, None, GateConfig(gate=False), TrainConfig(), eval_cfg, held_out, report, "v1", print)[
        "reason"
    ] == (GATE_OFF_REASON)


@pytest.fixture
def seeded_bundle():
    """``cliptuner-tiny`` from a fixed random init, so that what the test teaches it is the same on every run."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return load_model(ModelSpec("cliptuner-tiny"))


def test_the_wiseft_rescue_keeps_the_best_blend_that_passes_in_the_model(seeded_bundle):
    bundle = seeded_bundle
    held_out = synthetic.generate(8, domain="domain", seed=1)
    general = synthetic.generate(8, domain="generic", seed=2)
    eval_cfg = EvalConfig()
    # recall@1 on 8 pairs: the held-out side always passes (min_gain -1), the general side decides
    cfg = GateConfig(gate_wiseft=True, gate_metric="t2i_r1", max_regression=0.0, min_gain=-1.0)
    teach = TrainConfig(epochs=40, batch_size=8, learning_rate=2e-3, warmup_steps=0, device="cpu", seed=0)
    finetune(bundle, general, general, teach, eval_cfg)  # start weights that know the general set by heart
    baseline = gate_baseline(bundle, cfg, {"general": general}, eval_cfg, "cpu")
    assert baseline.serving["general"]["t2i_r1"] == 1.0
    start = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    spoil(bundle.model, scale=3.0)
    tuned = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    report = {"before": evaluate(bundle, held_out), "after": evaluate(bundle, held_out)}
    report["before"] = {k: 1.0 for k in report["before"]}  # min_gain -1: the held-out side always passes
    tuned_after = report["after"]
    assert evaluate(bundle, general)["t2i_r1"] < 1.0  # the tuned weights alone lose on the general set
    alphas = TrainConfig(wiseft_alphas=(0.95, 0.05, 0.5))  # tried in increasing order; 0.05 is close to the start
    gate = gate_after(bundle, baseline, cfg, alphas, eval_cfg, held_out, report, "version v1", lambda e: None)
    tried = gate["wiseft"]["tried"]
    assert [t["alpha"] for t in tried] == [0.05, 0.5, 0.95]
    assert gate["wiseft"]["tuned"]["failed"] == "regression" and not gate["wiseft"]["tuned"]["promoted"]
    passing = [t["alpha"] for t in tried if t["promoted"]]
    assert passing and gate["promoted"] and gate["wiseft"]["alpha"] in passing
    assert gate["reason"].startswith(f"promoted (WiSE-FT blend, alpha {gate['wiseft']['alpha']:g}):")
    alpha = gate["wiseft"]["alpha"]
    for key, value in bundle.model.state_dict().items():  # the model holds the chosen blend, ready to export
        if value.is_floating_point() and not torch.equal(start[key], tuned[key]):
            expected = torch.lerp(start[key].float(), tuned[key].float(), alpha)
            assert torch.allclose(value.float(), expected, atol=1e-5), key
            break
    assert report["tuned_after"] == tuned_after and report["after"] == evaluate(bundle, held_out)
