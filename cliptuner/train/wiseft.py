"""WiSE-FT: weight-space ensembles of a base model and its fine-tuned version.

Wortsman et al., "Robust fine-tuning of zero-shot models" (CVPR 2022): fine-tuning on a narrow domain gains
accuracy there and loses some of what the base model knew. Interpolating the weights,

    θ(α) = (1 - α) · θ_base + α · θ_tuned,

gives a family of models between the two: ``α = 0`` is the base, ``α = 1`` the fine-tuned model, and an
intermediate ``α`` often keeps most of the domain gain while losing less on general data. Both models must
share the architecture (same state-dict keys and shapes); the interpolation needs no training, only one
evaluation per ``α`` to choose it (:func:`wiseft_sweep`, :func:`best_alpha`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cliptuner.train.evaluate import evaluate

if TYPE_CHECKING:  # pragma: no cover
    from cliptuner.train.data import PairSet
    from cliptuner.train.models import ClipBundle

logger = logging.getLogger(__name__)

StateDict = Mapping[str, torch.Tensor]


def _check_alpha(alpha: Any) -> float:
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or not 0.0 <= alpha <= 1.0
    ):
        raise ValueError(f"alpha must be a number in [0, 1] (0: base weights, 1: tuned weights), got {alpha!r}")
    return float(alpha)


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model.state_dict()``, unaffected by later training of ``model``.

    Take one before fine-tuning to keep the base weights for :func:`interpolate_state`.
    """
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def interpolate_state(base: StateDict, tuned: StateDict, alpha: float) -> dict[str, torch.Tensor]:
    """Interpolate two state dicts of one architecture: ``(1 - alpha) * base + alpha * tuned``.

    Floating-point tensors are interpolated (in at least float32, then cast to the tuned tensor's dtype);
    ``alpha = 0`` returns exactly the base values and ``alpha = 1`` exactly the tuned ones. Entries equal in
    both keep their value, so constant buffers such as an additive ``-inf`` attention mask stay intact.
    Non-floating tensors (integer position ids, boolean masks) are not trained: they must be equal in both and
    are taken from ``tuned``. The inputs are not modified.

    Args:
        base: state dict of the base (zero-shot) model.
        tuned: state dict of the fine-tuned model; its key order and devices are kept.
        alpha: weight of the tuned model, in [0, 1].

    Returns:
        A new state dict with the keys of ``tuned``.

    Raises:
        ValueError: ``alpha`` outside [0, 1]; key sets differ (missing and extra keys listed); a shape differs;
            a key is floating-point in one dict and not in the other; a non-floating tensor differs.
    """
    alpha = _check_alpha(alpha)
    missing = sorted(set(base) - set(tuned))
    extra = sorted(set(tuned) - set(base))
    if missing or extra:
        raise ValueError(
            f"base and tuned state dicts do not hold the same keys: missing from tuned {missing}, "
            f"extra in tuned {extra}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, t in tuned.items():
        b = base[key]
        if b.shape != t.shape:
            raise ValueError(f"{key!r}: shape {tuple(b.shape)} in base but {tuple(t.shape)} in tuned")
        if b.is_floating_point() != t.is_floating_point():
            raise ValueError(f"{key!r}: dtype {b.dtype} in base but {t.dtype} in tuned")
        b = b.detach().to(t.device)
        t = t.detach()
        if not t.is_floating_point():
            if b.dtype != t.dtype or not torch.equal(b, t):
                raise ValueError(
                    f"{key!r}: non-floating tensor ({t.dtype}) differs between base and tuned; "
                    "it is not interpolated, so it must be equal in both"
                )
            out[key] = t.clone()
            continue
        work = torch.promote_types(t.dtype, torch.float32)
        b32, t32 = b.to(work), t.to(work)
        # lerp is exact at both ends: start + 0 * (end - start) and end - (end - start) * 0
        mixed = torch.lerp(b32, t32, alpha)
        mixed = torch.where(b32 == t32, t32, mixed)  # -inf - -inf would otherwise turn masks into nan
        out[key] = mixed.to(t.dtype)
    return out


def apply_wiseft(model: nn.Module, base_state: StateDict, tuned_state: StateDict, alpha: float) -> nn.Module:
    """Load ``interpolate_state(base_state, tuned_state, alpha)`` into ``model`` in place.

    Args:
        model: a model of the architecture both state dicts come from.
        base_state: weights of the base model.
        tuned_state: weights of the fine-tuned model.
        alpha: weight of the tuned model, in [0, 1].

    Returns:
        ``model``, now holding the interpolated weights.

    Raises:
        ValueError: see :func:`interpolate_state`; also when the state does not fit ``model``.
    """
    state = interpolate_state(base_state, tuned_state, alpha)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"the interpolated state does not fit the model: {exc}") from exc
    return model


def wiseft_sweep(
    bundle: ClipBundle,
    base_state: StateDict,
    tuned_state: StateDict,
    alphas: Sequence[float],
    eval_sets: Mapping[str, PairSet],
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 128,
) -> list[dict[str, Any]]:
    """Evaluate the interpolated model at each ``alpha`` on each named evaluation set.

    The model of ``bundle`` ends with the tuned weights, also when an evaluation fails.

    Args:
        bundle: the model to load the weights into (evaluated in place).
        base_state: weights of the base model.
        tuned_state: weights of the fine-tuned model.
        alphas: weights of the tuned model to try, each in [0, 1].
        eval_sets: set name → pairs, e.g. ``{"held_out": domain_split, "general": generic_pairs}``.
        ks: recall@k cut-offs.
        batch_size: images or texts per forward pass.

    Returns:
        One entry per alpha, in the given order: ``{"alpha": a, "<set name>": {metric: value}, ...}``.

    Raises:
        ValueError: no alphas, an alpha outside [0, 1], no eval sets, or a set named ``"alpha"``; checked
            before the model is touched.
    """
    alphas = [_check_alpha(a) for a in alphas]
    if not alphas:
        raise ValueError("alphas is empty; give at least one value in [0, 1]")
    if not eval_sets:
        raise ValueError("eval_sets is empty; give at least one named PairSet")
    if "alpha" in eval_sets:
        raise ValueError("an eval set cannot be named 'alpha' (that key holds the interpolation weight)")
    missing = sorted(set(base_state) ^ set(tuned_state))
    if missing:
        raise ValueError(f"base and tuned state dicts do not hold the same keys; differing: {missing}")

    sweep: list[dict[str, Any]] = []
    try:
        for alpha in alphas:
            apply_wiseft(bundle.model, base_state, tuned_state, alpha)
            entry: dict[str, Any] = {"alpha": alpha}
            for name, pairs in eval_sets.items():
                entry[name] = evaluate(bundle, pairs, ks, batch_size)
            logger.info(
                "wise-ft alpha %.2f: %s",
                alpha,
                ", ".join(f"{name} t2i_r5 {entry[name].get('t2i_r5', float('nan')):.3f}" for name in eval_sets),
            )
            sweep.append(entry)
    finally:
        bundle.model.load_state_dict(tuned_state, strict=True)
    return sweep


def best_alpha(sweep: Sequence[Mapping[str, Any]], set_name: str, metric: str = "t2i_r5") -> float:
    """The alpha of ``sweep`` with the highest ``metric`` on ``set_name``.

    Ties go to the smallest alpha: the model closest to the base, which keeps the most of what it knew.
    There is no default set: choose on a validation set, never on the split whose recall you report (that
    number would then be flattered by the choice).

    Args:
        sweep: the output of :func:`wiseft_sweep`.
        set_name: which evaluation set decides (a validation set).
        metric: which metric decides (``t2i_r5``, ``mean_recall``, ...).

    Returns:
        The chosen alpha.

    Raises:
        ValueError: an empty sweep, or a set or metric the sweep does not hold.
    """
    if not sweep:
        raise ValueError("the sweep is empty")
    for entry in sweep:
        if set_name not in entry:
            known = sorted(k for k in entry if k != "alpha")
            raise ValueError(f"unknown eval set {set_name!r}; known: {known}")
        if metric not in entry[set_name]:
            raise ValueError(f"unknown metric {metric!r}; known: {sorted(entry[set_name])}")
    best = max(sweep, key=lambda entry: (entry[set_name][metric], -entry["alpha"]))
    return float(best["alpha"])
