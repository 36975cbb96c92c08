"""WiSE-FT: exact end points, the midpoint, untouched integer buffers, clear errors, and the alpha sweep."""

import copy
import dataclasses

import pytest
import torch

from cliptuner.train import synthetic
from cliptuner.train.evaluate import evaluate
from cliptuner.train.wiseft import apply_wiseft, best_alpha, interpolate_state, state_copy, wiseft_sweep


@pytest.fixture()
def bundle(tiny_bundle):
    """A private copy of the session's tiny model."""
    return dataclasses.replace(tiny_bundle, model=copy.deepcopy(tiny_bundle.model))


@pytest.fixture()
def states(bundle):
    """``(base, tuned)``: the random-init weights and a seeded perturbation of every floating tensor."""
    base = state_copy(bundle.model)
    gen = torch.Generator().manual_seed(0)
    tuned = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
        for k, v in base.items()
    }
    return base, tuned


@pytest.fixture(scope="module")
def eval_sets():
    return {
        "held_out": synthetic.generate(40, domain="domain", seed=1),
        "general": synthetic.generate(40, domain="generic", seed=2),
    }


def _assert_state_equal(model, expected):
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_alpha_zero_loads_exactly_the_base_weights_and_alpha_one_exactly_the_tuned(bundle, states):
    base, tuned = states
    apply_wiseft(bundle.model, base, tuned, 1.0)
    _assert_state_equal(bundle.model, tuned)
    apply_wiseft(bundle.model, base, tuned, 0.0)
    _assert_state_equal(bundle.model, base)
    assert any(not torch.equal(base[k], tuned[k]) for k in base)  # the two ends differ


def test_alpha_half_is_the_midpoint_and_inputs_are_left_alone(states):
    base, tuned = states
    base_before = {k: v.clone() for k, v in base.items()}
    tuned_before = {k: v.clone() for k, v in tuned.items()}
    mixed = interpolate_state(base, tuned, 0.5)
    for key in base:
        torch.testing.assert_close(mixed[key], (base[key] + tuned[key]) / 2)
    quarter = interpolate_state(base, tuned, 0.25)
    key = next(k for k in base if base[k].is_floating_point() and base[k].numel() > 1)
    torch.testing.assert_close(quarter[key], 0.75 * base[key] + 0.25 * tuned[key])
    for key in base:
        assert torch.equal(base[key], base_before[key]) and torch.equal(tuned[key], tuned_before[key])
        assert mixed[key].data_ptr() not in (base[key].data_ptr(), tuned[key].data_ptr())


def test_integer_buffers_are_kept_and_constant_masks_stay_finite_where_they_were():
    mask = torch.full((3, 3), float("-inf")).triu(1)
    base = {
        "w": torch.zeros(2, 2),
        "position_ids": torch.arange(5),
        "mask": mask.clone(),
        "half": torch.zeros(4, dtype=torch.float16),
    }
    tuned = {
        "w": torch.ones(2, 2),
        "position_ids": torch.arange(5),
        "mask": mask.clone(),
        "half": torch.ones(4, dtype=torch.float16),
    }
    for alpha in (0.0, 0.3, 1.0):
        out = interpolate_state(base, tuned, alpha)
        assert out["position_ids"].dtype == torch.int64 and torch.equal(out["position_ids"], torch.arange(5))
        assert torch.equal(out["mask"], mask)  # -inf stays -inf, zeros stay zero, no nan from inf - inf
        assert out["half"].dtype == torch.float16
        torch.testing.assert_close(out["w"], torch.full((2, 2), alpha))


def test_differing_integer_buffer_is_an_error_naming_the_key():
    base = {"w": torch.zeros(2), "position_ids": torch.arange(5)}
    tuned = {"w": torch.ones(2), "position_ids": torch.arange(5).flip(0)}
    with pytest.raises(ValueError, match="position_ids"):
        interpolate_state(base, tuned, 0.5)


def test_mismatched_keys_list_what_is_missing_and_what_is_extra():
    base = {"a": torch.zeros(2), "b": torch.zeros(2)}
    tuned = {"a": torch.ones(2), "c": torch.ones(2)}
    with pytest.raises(ValueError, match=r"missing from tuned \['b'\].*extra in tuned \['c'\]"):
        interpolate_state(base, tuned, 0.5)


def test_mismatched_shape_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match=r"'proj'.*\(2, 3\).*\(3, 2\)"):
        interpolate_state({"proj": torch.zeros(2, 3)}, {"proj": torch.zeros(3, 2)}, 0.5)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_alpha_outside_zero_one_is_an_error(alpha):
    with pytest.raises(ValueError, match="alpha must be a number in \\[0, 1\\]"):
        interpolate_state({"w": torch.zeros(2)}, {"w": torch.ones(2)}, alpha)


def test_sweep_gives_metrics_per_alpha_and_set_matching_the_two_models_and_ends_tuned(bundle, states, eval_sets):
    base, tuned = states
    bundle.model.load_state_dict(base)
    base_metrics = {name: evaluate(bundle, pairs) for name, pairs in eval_sets.items()}
    bundle.model.load_state_dict(tuned)
    tuned_metrics = {name: evaluate(bundle, pairs) for name, pairs in eval_sets.items()}
    assert base_metrics != tuned_metrics  # otherwise the checks below could not tell the ends apart

    bundle.model.load_state_dict(base)  # the sweep must not depend on what the model holds when it starts
    sweep = wiseft_sweep(bundle, base, tuned, [0.0, 0.5, 1.0], eval_sets)

    assert [entry["alpha"] for entry in sweep] == [0.0, 0.5, 1.0]
    for entry in sweep:
        assert set(entry) == {"alpha", "held_out", "general"}
        for name in eval_sets:
            assert set(entry[name]) >= {"t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "mean_recall"}
    assert {name: sweep[0][name] for name in eval_sets} == base_metrics
    assert {name: sweep[-1][name] for name in eval_sets} == tuned_metrics
    _assert_state_equal(bundle.model, tuned)


def test_sweep_rejects_bad_alphas_before_touching_the_model(bundle, states, eval_sets):
    base, tuned = states
    with pytest.raises(ValueError, match="alpha"):
        wiseft_sweep(bundle, base, tuned, [0.0, 2.0], eval_sets)
    _assert_state_equal(bundle.model, base)  # the valid 0.0 was not evaluated first, the model still holds base
    with pytest.raises(ValueError, match="empty"):
        wiseft_sweep(bundle, base, tuned, [], eval_sets)
    with pytest.raises(ValueError, match="eval_sets"):
        wiseft_sweep(bundle, base, tuned, [0.5], {})


def test_sweep_restores_the_tuned_weights_when_an_evaluation_fails(bundle, states, eval_sets):
    base, tuned = states
    broken = dataclasses.replace(eval_sets["held_out"], images=[b"not an image"] * eval_sets["held_out"].num_images)
    with pytest.raises(ValueError, match="cannot decode"):
        wiseft_sweep(bundle, base, tuned, [0.5], {"held_out": broken})
    _assert_state_equal(bundle.model, tuned)


def test_best_alpha_picks_the_highest_metric_and_breaks_ties_toward_the_base():
    def entry(alpha, held, general):
        return {
            "alpha": alpha,
            "val": {"t2i_r5": held, "mean_recall": held / 2},
            "general": {"t2i_r5": general, "mean_recall": general / 2},
        }

    sweep = [entry(0.0, 0.2, 0.6), entry(0.5, 0.7, 0.5), entry(0.75, 0.7, 0.4), entry(1.0, 0.65, 0.3)]
    assert best_alpha(sweep, "val") == 0.5
    assert best_alpha(sweep, set_name="general") == 0.0
    assert best_alpha(sweep, "val", metric="mean_recall") == 0.5
    with pytest.raises(TypeError):
        best_alpha(sweep)  # no default set: the caller names the validation set that chooses
    with pytest.raises(ValueError, match="unknown eval set 'domain'.*general.*val"):
        best_alpha(sweep, set_name="domain")
    with pytest.raises(ValueError, match="unknown metric 'r99'"):
        best_alpha(sweep, "val", metric="r99")
    with pytest.raises(ValueError, match="empty"):
        best_alpha([], "val")
