"""Hard-negative batches mined in each space vs random batches, fine-tuning the demo's base on synthetic domain scenes.

What is compared: ``finetune`` of the same base model (``cliptuner-tiny`` pretrained on ``generic`` scenes: the
demo's base, :func:`cliptuner.cli.demo.pretrain_base`, cached or trained now) on the same domain pairs, with the
same budget (epochs, batch size, learning rate, warm-up) and the same seeds, once with random batches of unique
images (``TrainConfig.hard_negatives=False``, the default) and once per mining space of ``--spaces`` with batches
of the pairs the base model puts close together in that space (``hard_negatives=True``,
:mod:`cliptuner.train.hard_negatives`, its default options but ``space``): ``cross`` (caption vs image, the
sampler's default), ``image`` (image vs image), ``text`` (caption vs caption), ``both`` (the mean of the last two).
``TrainConfig`` has no option for the space, so each hard arm runs with the module's default options set to its
space (:data:`cliptuner.train.hard_negatives.DEFAULT_OPTIONS`), and the benchmark checks from the sampler's log
that the run mined in that space.

Data shapes (``--shapes DATA_SEED:IMAGES:CAPTIONS``): synthetic ``domain`` scenes with data seeds that neither the
demo (0), ``sweep.py`` (1000), the base (1001) nor the feedback-loop benchmark (1) uses. Each is cut by image:

- TEST: ``--test-fraction`` of the images (split seed 0, the same for every run of the shape), never used to
  choose anything; it reports before/after.
- VALIDATION: ``--val-fraction`` of the remaining images, set aside by ``finetune`` itself with the run's seed
  (``keep_best=True``): it chooses each run's epoch (``--select-metric``), and its value at that epoch, averaged
  over the seeds, decides between the arms. All arms of one seed share the same validation images.
- TRAIN: the rest, the only images trained on (and mined).

Decision rule, fixed before running: a space wins a shape when its mean validation ``--select-metric`` over the
seeds is higher than random batches'. The best space is the one with the highest validation mean over the shapes
(each shape's mean over the seeds); hard negatives should become the default, mined in that space, only if it
wins on every shape. Choosing the best of several arms on validation favours it there: the test numbers,
reported next to it, decide nothing and are the check.

Also measured, with the base model's embeddings of each run's training part: how hard the batches of the first
epoch are, as the mean over pairs of the highest (and the average) score of a negative in its batch in the cross
space (``max(cos(caption_i, image_j), cos(image_i, caption_j))``, what the loss sees), and the highest in the
image and in the text space, for every sampler.

    python benchmarks/hard_negatives.py --threads 1 --json /tmp/hard_negatives.json
    python benchmarks/hard_negatives.py --quick    # CI size: 1 seed, 1 epoch, 60 + 40 images, batch 8; no claims

Results go to ``--json`` (rewritten after each run) and to stdout as markdown (tables and sentences; progress
goes to stderr). Timings come from whatever machine runs this; on a shared CPU they are noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("hard_negatives")

SPACES = ("cross", "image", "text", "both")  # cliptuner.train.hard_negatives.SPACES (not imported: torch)
DEFAULT_SPACES = ("image", "text", "both")  # cross lost on both shapes in the run before: --spaces adds it
RANDOM = "random"
METRICS = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "mean_recall")
FULL = {
    "shapes": ["2000:400:2", "2001:200:4"],
    "seeds": [0, 1, 2],
    "epochs": 8,
    "batch_size": 32,
    "warmup_steps": 20,
    "base": "demo",
}
QUICK = {
    "shapes": ["2000:60:2", "2001:40:4"],
    "seeds": [0],
    "epochs": 1,
    "batch_size": 8,
    "warmup_steps": 2,
    "base": "random",
}


def parse_shape(text: str) -> dict[str, int]:
    """``DATA_SEED:IMAGES:CAPTIONS`` → ``{"data_seed", "images", "captions"}``."""
    parts = text.split(":")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected DATA_SEED:IMAGES:CAPTIONS (e.g. 2000:400:2), got {text!r}")
    seed, images, captions = (int(p) for p in parts)
    if images < 20 or captions < 1:
        raise argparse.ArgumentTypeError(f"a shape needs at least 20 images and 1 caption each, got {text!r}")
    return {"data_seed": seed, "images": images, "captions": captions}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help=f"CI size, checks the machinery, supports no claim: {QUICK}")
    p.add_argument(
        "--shapes",
        nargs="+",
        type=parse_shape,
        default=None,
        metavar="DATA_SEED:IMAGES:CAPTIONS",
        help=f"synthetic domain data sets (full: {' '.join(FULL['shapes'])}; quick: {' '.join(QUICK['shapes'])})",
    )
    p.add_argument(
        "--spaces",
        nargs="+",
        choices=SPACES,
        default=list(DEFAULT_SPACES),
        help="mining spaces, one hard-negative arm each beside random batches",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (each arm runs each)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=6e-4, help="the demo's learning rate (chosen by sweep.py)")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--val-fraction", type=float, default=0.2, help="of the remaining images: chooses")
    p.add_argument(
        "--select-metric",
        default="mean_recall",
        choices=METRICS,
        help="validation metric that chooses the epoch and decides between the arms",
    )
    p.add_argument(
        "--base",
        default=None,
        help="base checkpoint; 'demo': the demo's base, cached or trained now; 'random': random init "
        f"(full: {FULL['base']}; quick: {QUICK['base']})",
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, [parse_shape(s) for s in value] if name == "shapes" else value)
    args.spaces = [space for space in SPACES if space in args.spaces]  # each once, in a fixed order
    return args


def _base_checkpoint(args: argparse.Namespace) -> Optional[str]:
    """The base's ``pretrained`` (None: random init)."""
    if args.base == "random":
        return None
    if args.base != "demo":
        return args.base
    from cliptuner.cli.demo import pretrain_base

    return str(pretrain_base(quiet=True, say=lambda text: logger.info("%s", text)))


def load_base(base: Optional[str]) -> Any:
    """The base model (random init seeded, so that every arm starts from the same weights)."""
    import torch

    from cliptuner.config import ModelSpec
    from cliptuner.train.models import load_model

    if base is None:
        torch.manual_seed(0)
    return load_model(ModelSpec("cliptuner-tiny", pretrained=base))


def batch_hardness(
    batches: Sequence[Sequence[int]], image_emb: Any, text_emb: Any, image_index: Sequence[int]
) -> dict[str, float]:
    """Over the pairs of the batches: the mean of the highest and of the average score of the negatives in the same
    batch in the cross space (``max``, ``mean``), and the mean of the highest in the image and in the text space
    (``image_max``, ``text_max``)."""
    import numpy as np

    image_index = np.asarray(image_index)
    parts: dict[str, list[Any]] = {"max": [], "mean": [], "image_max": [], "text_max": []}
    for batch in batches:
        b = np.asarray(batch)
        img = image_emb[image_index[b]]  # [B, d]
        txt = text_emb[b]  # [B, d]
        t2i = txt @ img.T  # [B, B]: caption i vs image j
        cross = np.maximum(t2i, t2i.T)  # max(cos(caption_i, image_j), cos(image_i, caption_j))
        off = ~np.eye(len(b), dtype=bool)
        parts["max"].append(np.where(off, cross, -np.inf).max(axis=1))
        parts["mean"].append((cross * off).sum(axis=1) / off.sum(axis=1))
        parts["image_max"].append(np.where(off, img @ img.T, -np.inf).max(axis=1))
        parts["text_max"].append(np.where(off, txt @ txt.T, -np.inf).max(axis=1))
    return {name: float(np.concatenate(values).mean()) for name, values in parts.items()}


def first_epoch_hardness(bundle: Any, fit_pairs: Any, cfg: Any, spaces: Sequence[str]) -> dict[str, Any]:
    """How hard the first epoch's batches of every sampler are, by the base model's embeddings."""
    import numpy as np

    from cliptuner.train.data import UniqueImageBatchSampler
    from cliptuner.train.evaluate import embed_with_torch
    from cliptuner.train.hard_negatives import DEFAULT_OPTIONS, HardNegativeBatchSampler, caption_ids, mine_neighbours

    image_emb, text_emb = embed_with_torch(bundle, fit_pairs)
    ids = caption_ids(fit_pairs.captions)
    samplers: dict[str, Any] = {RANDOM: UniqueImageBatchSampler(fit_pairs.image_index, cfg.batch_size, seed=cfg.seed)}
    for space in spaces:
        mined = mine_neighbours(
            image_emb,
            text_emb,
            fit_pairs.image_index,
            DEFAULT_OPTIONS.neighbours,
            DEFAULT_OPTIONS.relative_margin,
            ids,
            space=space,
        )
        samplers[space] = HardNegativeBatchSampler(
            fit_pairs.image_index, mined.pairs, cfg.batch_size, seed=cfg.seed, caption_ids=ids
        )
    out: dict[str, Any] = {
        name: batch_hardness(list(s), image_emb, text_emb, fit_pairs.image_index) for name, s in samplers.items()
    }
    index = np.asarray(fit_pairs.image_index)
    out["positive"] = float((text_emb * image_emb[index]).sum(axis=1).mean())  # cos(caption_i, image_i)
    return out


class _SpaceSeen(logging.Handler):
    """Collects the spaces the sampler's log says it mined in."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.spaces: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("hard negatives: "):
            self.spaces.append(message.removeprefix("hard negatives: ").split(" space", 1)[0])


def run_arm(
    args: argparse.Namespace, base: Optional[str], arm: str, seed: int, train: Any, test: Any
) -> dict[str, Any]:
    """One fine-tuning run of the base: the epoch chosen on validation, its weights tested."""
    from unittest import mock

    from cliptuner.config import EvalConfig, TrainConfig
    from cliptuner.train import hard_negatives
    from cliptuner.train.loop import finetune

    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        seed=seed,
        keep_best=True,
        val_fraction=args.val_fraction,
        early_stop_metric=args.select_metric,
        hard_negatives=arm != RANDOM,
        log_every=10**6,
    )
    bundle = load_base(base)
    seen = _SpaceSeen()
    sampler_log = logging.getLogger(hard_negatives.__name__)
    level = sampler_log.level
    sampler_log.addHandler(seen)
    sampler_log.setLevel(logging.INFO)
    options = dataclasses.replace(hard_negatives.DEFAULT_OPTIONS, space="cross" if arm == RANDOM else arm)
    started = time.perf_counter()
    try:
        with mock.patch.object(hard_negatives, "DEFAULT_OPTIONS", options):
            report = finetune(bundle, train, test, cfg, EvalConfig())
    finally:
        sampler_log.removeHandler(seen)
        sampler_log.setLevel(level)
    wall = time.perf_counter() - started
    expected = [] if arm == RANDOM else [arm]
    if seen.spaces != expected:
        raise RuntimeError(f"arm {arm!r}: the sampler mined in {seen.spaces}, expected {expected}")
    chosen = next(h for h in report["eval_history"] if h["epoch"] == report["best_epoch"])
    return {
        "arm": arm,
        "seed": seed,
        "best_epoch": report["best_epoch"],
        "val": {k: chosen[k] for k in METRICS},
        "val_history": [h[args.select_metric] for h in report["eval_history"]],
        "test_before": report["before"],
        "test_after": report["after"],
        "steps": report["steps"],
        "final_loss": report["epoch_losses"][-1],
        "split": report["split"],
        "wall_s": wall,
    }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def summarise(shape: dict[str, Any], select: str, spaces: Sequence[str]) -> dict[str, Any]:
    """Per arm: mean validation (the decision) and test numbers over the seeds; per space: its gain over random on
    validation and test, and on how many seeds it is ahead; the best space of the shape and whether it wins."""
    out: dict[str, Any] = {}
    for arm in (RANDOM, *spaces):
        runs = [r for r in shape["runs"] if r["arm"] == arm]
        if not runs:
            continue
        out[arm] = {
            "val": {k: _mean([r["val"][k] for r in runs]) for k in METRICS},
            "test_after": {k: _mean([r["test_after"][k] for r in runs]) for k in METRICS},
            "test_before": {k: _mean([r["test_before"][k] for r in runs]) for k in METRICS},
            "wall_s": _mean([r["wall_s"] for r in runs]),
            "seeds": [r["seed"] for r in runs],
        }
    if RANDOM not in out:
        return out
    by_seed: dict[int, dict[str, float]] = {}
    for r in shape["runs"]:
        by_seed.setdefault(r["seed"], {})[r["arm"]] = r["val"][select]
    out["spaces"] = {}
    for space in spaces:
        if space not in out:
            continue
        gain = out[space]["val"][select] - out[RANDOM]["val"][select]
        out["spaces"][space] = {
            "val_gain": gain,
            "test_gain": out[space]["test_after"][select] - out[RANDOM]["test_after"][select],
            "wins_on_val": gain > 0,
            "seeds_ahead": sum(1 for v in by_seed.values() if space in v and RANDOM in v and v[space] > v[RANDOM]),
        }
    if out["spaces"]:
        best = max(out["spaces"], key=lambda space: out[space]["val"][select])
        out["best_space"] = best
        out["hard_wins_on_val"] = out["spaces"][best]["wins_on_val"]
        out["val_gain"] = out["spaces"][best]["val_gain"]
        out["seeds_hard_ahead"] = out["spaces"][best]["seeds_ahead"]
    return out


def decide(results: dict[str, Any], select: str, spaces: Sequence[str]) -> None:
    """The verdict over the shapes (validation only), into ``results``."""
    summaries = [s["summary"] for s in results["shapes"]]
    val = {
        space: _mean([s[space]["val"][select] for s in summaries])
        for space in spaces
        if summaries and all(space in s for s in summaries)
    }
    wins = {space: [s["spaces"][space]["wins_on_val"] for s in summaries] for space in val}
    results["space_val_mean"] = val
    results["random_val_mean"] = _mean([s[RANDOM]["val"][select] for s in summaries]) if summaries else None
    results["spaces_winning_every_shape"] = [space for space in val if all(wins[space])]
    best = max(val, key=val.get) if val else None
    results["best_space"] = best
    results["hard_wins_on_every_shape"] = best is not None and all(wins[best])
    if best is None:
        results["verdict"] = "no hard-negative arm ran on every shape: nothing to decide"
        return
    n = len(summaries)
    won = sum(wins[best])
    others = [space for space in results["spaces_winning_every_shape"] if space != best]
    also = f" ({', '.join(others)} also wins on every shape)" if others else ""
    if results["hard_wins_on_every_shape"]:
        results["verdict"] = (
            f"the best space on validation, {best}, wins on all {n} shapes: hard negatives mined in the {best} "
            f"space are the candidate default{also}"
        )
    else:
        results["verdict"] = (
            f"the best space on validation, {best}, wins on {won} of {n} shapes: keep random batches as the "
            f"default{also}"
        )


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _label(arm: str) -> str:
    return RANDOM if arm == RANDOM else f"hard, {arm}"


def _hardness_cells(h: Optional[dict[str, float]]) -> str:
    if h is None:
        return "| |"
    return f"| {h['max']:.3f} / {h['mean']:.3f} | {h['image_max']:.3f} / {h['text_max']:.3f} |"


def markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    select, spaces = settings["select_metric"], settings["spaces"]
    lines = []
    for shape in results["shapes"]:
        s, summary = shape["shape"], shape.get("summary", {})
        lines += [
            "",
            f"#### Data seed {s['data_seed']}: {s['images']} images × {s['captions']} captions "
            f"(train {shape['split']['train_images']} images / {shape['split']['train_pairs']} pairs, "
            f"validation {shape['split']['val_images']} / {shape['split']['val_pairs']}, "
            f"test {shape['split']['test_images']} / {shape['split']['test_pairs']})",
            "",
            f"| arm | seed | chosen epoch | val {select} | val t2i R@5 | val i2t R@5 | test {select} before → after "
            "| test t2i R@5 after | test i2t R@5 after | in-batch negatives, epoch 1, base, cross: hardest / mean "
            "| hardest, image / text | wall s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in shape["runs"]:
            h = shape["hardness"].get(str(r["seed"]), {}).get(r["arm"])
            lines.append(
                f"| {_label(r['arm'])} | {r['seed']} | {r['best_epoch']} | {_pct(r['val'][select])} "
                f"| {_pct(r['val']['t2i_r5'])} | {_pct(r['val']['i2t_r5'])} "
                f"| {_pct(r['test_before'][select])} → {_pct(r['test_after'][select])} "
                f"| {_pct(r['test_after']['t2i_r5'])} | {_pct(r['test_after']['i2t_r5'])} "
                f"{_hardness_cells(h)} {r['wall_s']:.0f} |"
            )
        for arm in (RANDOM, *spaces):
            if arm in summary:
                a = summary[arm]
                lines.append(
                    f"| **{_label(arm)}, mean** | | | **{_pct(a['val'][select])}** | {_pct(a['val']['t2i_r5'])} "
                    f"| {_pct(a['val']['i2t_r5'])} | {_pct(a['test_before'][select])} → "
                    f"{_pct(a['test_after'][select])} | {_pct(a['test_after']['t2i_r5'])} "
                    f"| {_pct(a['test_after']['i2t_r5'])} | | | {a['wall_s']:.0f} |"
                )
        if summary.get("spaces"):
            seeds = len(summary[RANDOM]["seeds"])
            each = "; ".join(
                f"{space} {_pct(summary[space]['val'][select])} ({100 * g['val_gain']:+.1f}, ahead on "
                f"{g['seeds_ahead']} of {seeds} seeds)"
                for space, g in summary["spaces"].items()
            )
            best = summary["best_space"]
            lines += [
                "",
                f"Validation {select}, mean over {seeds} seeds: random {_pct(summary[RANDOM]['val'][select])}; "
                f"hard: {each}. Best space {best}: it {'wins' if summary['hard_wins_on_val'] else 'does not win'} "
                "on this shape.",
            ]
    if results.get("space_val_mean"):
        names = [f"data seed {shape['shape']['data_seed']}" for shape in results["shapes"]]
        lines += [
            "",
            f"| space | {' | '.join(f'val {select} gain, {n}' for n in names)} | val {select}, mean of shapes "
            f"| {' | '.join(f'test gain, {n}' for n in names)} | wins on every shape |",
            "|---|" + "---:|" * (2 * len(names) + 1) + "---|",
        ]
        lines.append(
            f"| random | {' | '.join('' for _ in names)} | {_pct(results['random_val_mean'])} "
            f"| {' | '.join('' for _ in names)} | |"
        )
        for space, mean in results["space_val_mean"].items():
            gains = [shape["summary"]["spaces"][space] for shape in results["shapes"]]
            val_gains = " | ".join(f"{100 * g['val_gain']:+.1f}" for g in gains)
            test_gains = " | ".join(f"{100 * g['test_gain']:+.1f}" for g in gains)
            lines.append(
                f"| {space} | {val_gains} | {_pct(mean)} | {test_gains} "
                f"| {'yes' if space in results['spaces_winning_every_shape'] else 'no'} |"
            )
    verdict = results.get("verdict")
    if verdict is not None:
        lines += ["", f"**Verdict (validation only): {verdict}**"]
    return "\n".join(lines)


def _environment() -> dict[str, Any]:
    import open_clip
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def _write(path: Optional[str], results: dict[str, Any]) -> None:
    if path:
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(path)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from cliptuner.config import TrainConfig
    from cliptuner.train import synthetic

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base = _base_checkpoint(args)
    results: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/hard_negatives.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": {**{k: v for k, v in vars(args).items() if k != "json"}, "base": base or "random init"},
        "arms": [RANDOM, *args.spaces],
        "environment": _environment(),
        "load_avg_start": os.getloadavg(),
        "shapes": [],
    }
    for shape in args.shapes:
        pairs = synthetic.generate(
            shape["images"], domain="domain", seed=shape["data_seed"], captions_per_image=shape["captions"]
        )
        train, test = pairs.split(args.test_fraction, seed=0)
        fit0, val0 = train.split(args.val_fraction, args.seeds[0])
        entry: dict[str, Any] = {
            "shape": shape,
            "split": {
                "train_images": fit0.num_images,
                "train_pairs": len(fit0),
                "val_images": val0.num_images,
                "val_pairs": len(val0),
                "test_images": test.num_images,
                "test_pairs": len(test),
                "distinct_captions": len(set(pairs.captions)),
                "pairs": len(pairs),
            },
            "hardness": {},
            "runs": [],
        }
        results["shapes"].append(entry)
        for seed in args.seeds:
            fit_pairs, _ = train.split(args.val_fraction, seed)  # the part finetune trains on with this seed
            base_bundle = load_base(base)
            entry["hardness"][str(seed)] = first_epoch_hardness(
                base_bundle, fit_pairs, TrainConfig(batch_size=args.batch_size, seed=seed), args.spaces
            )
            for arm in (RANDOM, *args.spaces):
                run = run_arm(args, base, arm, seed, train, test)
                entry["runs"].append(run)
                logger.info(
                    "data seed %d, seed %d, %s: val %s %.3f at epoch %d; test %.3f -> %.3f; %.0f s",
                    shape["data_seed"],
                    seed,
                    arm,
                    args.select_metric,
                    run["val"][args.select_metric],
                    run["best_epoch"],
                    run["test_before"][args.select_metric],
                    run["test_after"][args.select_metric],
                    run["wall_s"],
                )
                _write(args.json, results)
        entry["summary"] = summarise(entry, args.select_metric, args.spaces)
    decide(results, args.select_metric, args.spaces)
    results["wall_s"] = time.perf_counter() - started
    results["load_avg_end"] = os.getloadavg()
    _write(args.json, results)
    print(
        f"Hard-negative batches mined in the {', '.join(args.spaces)} space(s) vs random batches: cliptuner-tiny "
        f"from {'the demo base' if args.base == 'demo' else args.base if base else 'random init'}, {args.epochs} "
        f"epoch(s), batch {args.batch_size}, lr {args.lr:g}, seeds {args.seeds}; recall in %; {args.threads} "
        "thread(s)."
    )
    if args.quick:
        print("Quick run (CI size): it checks that the benchmark runs; its numbers support no claim.")
    print(markdown(results))
    print(f"\nWall time {results['wall_s']:.0f} s.")
    return results


if __name__ == "__main__":
    # progress goes to stderr with its level first (the harness leaves such lines out of RESULTS.md)
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    logger.setLevel(logging.INFO)
    main()
