"""Hyper-parameter sweep on the offline domain benchmark: choose on validation data, report on a test split.

Data: synthetic ``domain`` scenes drawn with ``--data-seed`` (a seed the demo and the tests do not use; the
script checks by image hash that none of its images is one of the demo's). They are cut into three disjoint
parts by image (all captions of an image go with it):

- TEST: a seeded ``--test-fraction`` of the images, never used to choose anything; it reports before/after.
- VALIDATION: ``--val-fraction`` of the remaining (training) images, set aside by ``finetune`` itself
  (``TrainConfig(keep_best=True, val_fraction=...)``): evaluated after every epoch, it chooses the epoch whose
  weights are restored, and here also the learning rate and batch size.
- TRAIN: the rest, the only images trained on.

Grid: ``cliptuner-tiny`` from the same seeded random init, fine-tuned for every learning rate × batch size for
``--epochs`` epochs. The epoch is chosen on validation recall (``finetune``'s best-weights keeping), the
winner of the grid is the run with the best validation recall at its chosen epoch, and every run's restored
weights are evaluated on the test split, which is reported and never compared to choose.

``--wiseft``: pre-train a base on ``generic`` scenes, fine-tune it on the domain with the winner's learning
rate and batch size (epoch again chosen on the domain validation part), and evaluate the WiSE-FT
interpolations ``(1 - α)·base + α·tuned`` on two validation sets (the domain validation part and unseen
generic scenes) that choose α, and on two test sets (the domain test split and other unseen generic scenes)
that report the curve.

Results go to ``--out`` as JSON (rewritten after each run) and to stdout as markdown.

    python benchmarks/sweep.py --n-images 800 --epochs 10 --lrs 1.5e-4 3e-4 6e-4 --batch-sizes 32 64 \\
        --threads 1 --out results.json --wiseft

Timings come from whatever machine runs this; on a shared CPU they are noisy.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import open_clip
import torch

from cliptuner.config import EvalConfig, ModelSpec, TrainConfig
from cliptuner.train import synthetic
from cliptuner.train.data import PairSet
from cliptuner.train.loop import finetune, seed_everything
from cliptuner.train.models import ClipBundle, load_model
from cliptuner.train.wiseft import best_alpha, state_copy, wiseft_sweep

logger = logging.getLogger("sweep")

SELECT_METRIC = "t2i_r5"  # chooses the epoch (finetune's early_stop_metric) and the grid winner
TIE_BREAK = ("i2t_r5", "mean_recall")  # then these, between grid points equal on SELECT_METRIC
DEMO = {"domain": "domain", "seed": 0, "n_images": 600, "captions_per_image": 2}  # what `cliptuner demo` trains on


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="cliptuner-tiny", help="OpenCLIP arch or bundled config (random init)")
    p.add_argument("--n-images", type=int, default=800, help="synthetic domain images")
    p.add_argument("--captions-per-image", type=int, default=2, help="captions per domain image")
    p.add_argument(
        "--data-seed",
        type=int,
        default=1000,
        help="seed of the synthetic scenes (domain: this seed; generic pre-training: +1; generic "
        "validation/test: +2); the demo uses seed 0",
    )
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of images in the test split")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of the remaining (training) images set aside as validation",
    )
    p.add_argument("--epochs", type=int, default=10, help="epochs per run (validation after each)")
    p.add_argument("--lrs", type=float, nargs="+", default=[1.5e-4, 3e-4, 6e-4], help="learning rates")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64], help="batch sizes")
    p.add_argument("--warmup-steps", type=int, default=20, help="linear warmup steps of every run (the demo's)")
    p.add_argument("--seed", type=int, default=0, help="seeds the splits, the init and training")
    p.add_argument("--out", default="results.json", help="JSON results file")
    p.add_argument("--wiseft", action="store_true", help="also measure the WiSE-FT curve of the winner")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="WiSE-FT alphas")
    p.add_argument("--pretrain-images", type=int, default=1000, help="generic images the WiSE-FT base trains on")
    p.add_argument("--pretrain-epochs", type=int, default=6, help="epochs of base pre-training")
    p.add_argument("--pretrain-lr", type=float, default=1e-3, help="learning rate of base pre-training")
    p.add_argument("--pretrain-batch-size", type=int, default=64, help="batch size of base pre-training")
    p.add_argument(
        "--general-images",
        type=int,
        default=400,
        help="unseen generic images, half for the general validation set, half for the general test set",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice; 1 "
        "avoids oversubscribing cores that other processes use)",
    )
    return p.parse_args(argv)


def image_hashes(pairs: PairSet) -> set[str]:
    """SHA-256 of every image of ``pairs`` (its pixels, shape and dtype)."""
    hashes = set()
    for image in pairs.images:
        array = np.ascontiguousarray(np.asarray(image))
        hashes.add(hashlib.sha256(f"{array.shape}{array.dtype}".encode() + array.tobytes()).hexdigest())
    return hashes


def overlap_checks(parts: dict[str, PairSet], demo: PairSet) -> dict[str, Any]:
    """Images shared between the demo's data and each part, and between every two parts (all must be 0).

    Raises:
        ValueError: any image is shared; the message names the two sets.
    """
    hashes = {name: image_hashes(pairs) for name, pairs in parts.items()}
    demo_hashes = image_hashes(demo)
    shared = {f"demo & {name}": len(h & demo_hashes) for name, h in hashes.items()}
    names = list(hashes)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared[f"{a} & {b}"] = len(hashes[a] & hashes[b])
    bad = {pair: n for pair, n in shared.items() if n}
    if bad:
        raise ValueError(f"image sets that must be disjoint share images: {bad}; choose another --data-seed")
    return {
        "images": {name: len(h) for name, h in hashes.items()},
        "demo_images": len(demo_hashes),
        "demo": dict(DEMO),
        "shared": shared,
    }


def _fresh_model(arch: str, seed: int) -> ClipBundle:
    seed_everything(seed)  # the same random init for every run
    return load_model(ModelSpec(arch))


def _metrics(entry: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in entry.items() if k != "epoch"}


def chosen_epoch(history: Sequence[dict[str, float]]) -> int:
    """The epoch ``fit`` keeps: the first evaluation with the highest ``SELECT_METRIC``."""
    best = None
    for entry in history:
        if best is None or entry[SELECT_METRIC] > best[SELECT_METRIC]:
            best = entry
    if best is None:
        raise ValueError("no evaluation in the history: nothing to choose an epoch from")
    return int(best["epoch"])


def _rank(val: dict[str, float]) -> tuple[float, ...]:
    return (val[SELECT_METRIC], *(val[k] for k in TIE_BREAK))


def run_grid_point(
    args: argparse.Namespace, lr: float, batch_size: int, train_pairs: PairSet, test: PairSet, val_images: int
) -> dict:
    """One fine-tuning run from the seeded random init; epoch chosen on validation, restored weights tested."""
    bundle = _fresh_model(args.model, args.seed)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=batch_size,
        learning_rate=lr,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        keep_best=True,
        val_fraction=args.val_fraction,
        log_every=10**6,
    )
    t0 = time.perf_counter()
    report = finetune(bundle, train_pairs, test, cfg, EvalConfig())
    wall = time.perf_counter() - t0
    if report["split"].get("val_images") != val_images:
        raise RuntimeError(
            f"finetune set aside {report['split'].get('val_images')} validation images, expected {val_images}"
        )
    history = report["eval_history"]  # on the validation part (keep_best)
    epoch = chosen_epoch(history)
    if report.get("best_epoch") not in (None, epoch):
        raise RuntimeError(f"finetune restored epoch {report['best_epoch']}, expected {epoch}")
    return {
        "lr": lr,
        "batch_size": batch_size,
        "epochs": report["epochs"],
        "steps": report["steps"],
        "chosen_epoch": epoch,
        "val": _metrics(next(h for h in history if h["epoch"] == epoch)),
        "val_last": _metrics(history[-1]),
        "val_history": history,
        "test_before": report["before"],
        "test_after": report["after"],
        "epoch_losses": report["epoch_losses"],
        "samples_per_s": report["samples_per_s"],
        "train_seconds": report["train_seconds"],
        "wall_s": wall,
    }


def run_wiseft(
    args: argparse.Namespace,
    winner: dict,
    train_pairs: PairSet,
    val: PairSet,
    test: PairSet,
    general_val: PairSet,
    general_test: PairSet,
    pretrain_pairs: PairSet,
) -> dict:
    """Pre-train a generic base, fine-tune it on the domain with the winner's lr and batch, sweep alpha.

    Alpha is chosen on the validation sets (``domain_val``, ``general_val``); the test sets (``domain_test``,
    ``general_test``) only report.
    """
    bundle = _fresh_model(args.model, args.seed)

    t0 = time.perf_counter()
    pre_cfg = TrainConfig(
        epochs=args.pretrain_epochs,
        batch_size=args.pretrain_batch_size,
        learning_rate=args.pretrain_lr,
        warmup_steps=20,
        seed=args.seed,
        eval_every=0,
        keep_best=False,
        log_every=10**6,
    )
    pre = finetune(bundle, pretrain_pairs, general_test, pre_cfg, EvalConfig())  # no choice: last epoch kept
    pretrain_wall = time.perf_counter() - t0
    logger.info(
        "base pre-trained on %d generic images in %.0f s: general test t2i_r5 %.3f -> %.3f",
        pretrain_pairs.num_images,
        pretrain_wall,
        pre["before"]["t2i_r5"],
        pre["after"]["t2i_r5"],
    )
    base_state = state_copy(bundle.model)

    t0 = time.perf_counter()
    ft_cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=winner["batch_size"],
        learning_rate=winner["lr"],
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        keep_best=True,
        val_fraction=args.val_fraction,
        log_every=10**6,
    )
    ft = finetune(bundle, train_pairs, test, ft_cfg, EvalConfig())
    finetune_wall = time.perf_counter() - t0
    if ft["split"].get("val_images") != val.num_images:
        raise RuntimeError(
            f"finetune set aside {ft['split'].get('val_images')} validation images, expected {val.num_images}"
        )
    ft_epoch = chosen_epoch(ft["eval_history"])
    tuned_state = state_copy(bundle.model)

    t0 = time.perf_counter()
    sets = {"domain_val": val, "general_val": general_val, "domain_test": test, "general_test": general_test}
    sweep = wiseft_sweep(bundle, base_state, tuned_state, args.alphas, sets)
    sweep_wall = time.perf_counter() - t0
    by_sum = max(sweep, key=lambda e: (e["domain_val"][SELECT_METRIC] + e["general_val"][SELECT_METRIC], -e["alpha"]))[
        "alpha"
    ]
    chosen = {
        "domain_val": best_alpha(sweep, "domain_val", SELECT_METRIC),
        "general_val": best_alpha(sweep, "general_val", SELECT_METRIC),
        "sum_val": by_sum,
    }
    return {
        "pretrain": {
            "images": pretrain_pairs.num_images,
            "captions_per_image": args.captions_per_image,
            "data_seed": args.data_seed + 1,
            "epochs": args.pretrain_epochs,
            "lr": args.pretrain_lr,
            "batch_size": args.pretrain_batch_size,
            "general_test_before": pre["before"],
            "general_test_after": pre["after"],
            "epoch_losses": pre["epoch_losses"],
            "wall_s": pretrain_wall,
        },
        "finetune": {
            "lr": ft_cfg.learning_rate,
            "batch_size": ft_cfg.batch_size,
            "epochs": ft_cfg.epochs,
            "chosen_epoch": ft_epoch,
            "val_history": ft["eval_history"],
            "test_before": ft["before"],
            "test_after": ft["after"],
            "samples_per_s": ft["samples_per_s"],
            "wall_s": finetune_wall,
        },
        "general_val_images": general_val.num_images,
        "general_test_images": general_test.num_images,
        "sweep": sweep,
        "sweep_wall_s": sweep_wall,
        "chosen_alpha": chosen,  # each chosen on validation sets only
        "chosen_alpha_test": {
            rule: next(
                {"domain_test": e["domain_test"], "general_test": e["general_test"]}
                for e in sweep
                if e["alpha"] == alpha
            )
            for rule, alpha in chosen.items()
        },
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _setup_lines(results: dict) -> list[str]:
    env, split, a = results["environment"], results["split"], results["args"]
    ov = results["overlap"]
    shared = ", ".join(f"{pair}: {n}" for pair, n in ov["shared"].items())
    return [
        "### Setup",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        f"- Date {results['date']}; machine: {env['platform']}, {env['cpu_count']} CPUs "
        f"({env['processor'] or 'processor not reported'}), CUDA {'yes' if env['cuda'] else 'no'}, "
        f"{env['torch_threads']} torch thread(s); Python {env['python']}, torch {env['torch']}, "
        f"open_clip {env['open_clip']}; 1-minute load average {results['load_avg_start'][0]:.1f} at the start, "
        f"{results.get('load_avg_end', [float('nan')])[0]:.1f} at the end.",
        f"- Data: {a['n_images']} synthetic `domain` scenes × {a['captions_per_image']} captions, data seed "
        f"{a['data_seed']}, cut by image into train {split['train_images']} images ({split['train_pairs']} pairs), "
        f"validation {split['val_images']} ({split['val_pairs']}) and test {split['test_images']} "
        f"({split['test_pairs']}).",
        f"- Overlap check (SHA-256 of the pixels; the script stops if any count is not 0): images shared between "
        f"the demo's {ov['demo_images']} images (`cliptuner demo`, seed {ov['demo']['seed']}) and the sets used here, "
        f"and between those sets — {shared}.",
        f"- Chosen on VALIDATION only: the epoch of each run (the first with the highest validation "
        f"{SELECT_METRIC}; its weights are restored), the winning learning rate × batch size (highest validation "
        f"{SELECT_METRIC} at the chosen epoch; ties by {', '.join(TIE_BREAK)})"
        + (
            ", and the WiSE-FT α (on the domain validation part and a generic validation set)"
            if "wiseft" in results
            else ""
        )
        + ".",
        "- Reported on TEST (never compared to choose anything): recall of every run before training and of its "
        "restored weights"
        + (", and the WiSE-FT curve on the domain test split and a generic test set" if "wiseft" in results else "")
        + ".",
        f"- Validation and test pools differ in size ({split['val_images']} vs {split['test_images']} images), "
        "so recall@k on one is not comparable to recall@k on the other.",
    ]


def markdown(results: dict) -> str:
    """The results as markdown: setup, grid, per-epoch validation curves, winner, WiSE-FT (recall in percent)."""
    lines = _setup_lines(results)
    runs = results["runs"]
    if runs:
        lines += [
            "",
            "### Grid (recall@5 in %)",
            "",
            "| lr | batch | val t2i R@5 at chosen epoch | val i2t R@5 at chosen epoch | chosen epoch "
            "| test t2i R@5 before | test t2i R@5 after | test i2t R@5 before | test i2t R@5 after "
            "| final loss | samples/s | wall s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in runs:
            lines.append(
                f"| {r['lr']:g} | {r['batch_size']} | {_pct(r['val']['t2i_r5'])} | {_pct(r['val']['i2t_r5'])} "
                f"| {r['chosen_epoch']} | {_pct(r['test_before']['t2i_r5'])} | {_pct(r['test_after']['t2i_r5'])} "
                f"| {_pct(r['test_before']['i2t_r5'])} | {_pct(r['test_after']['i2t_r5'])} "
                f"| {r['epoch_losses'][-1]:.3f} | {r['samples_per_s']:.0f} | {r['wall_s']:.0f} |"
            )
        epochs = max(len(r["val_history"]) for r in runs)
        for metric in ("t2i_r5", "i2t_r5"):
            lines += [
                "",
                f"### Validation {metric} per epoch (%)",
                "",
                "| lr | batch | " + " | ".join(f"ep {e + 1}" for e in range(epochs)) + " |",
                "|---:|---:|" + "---:|" * epochs,
            ]
            for r in runs:
                cells = [_pct(h[metric]) for h in r["val_history"]] + [""] * (epochs - len(r["val_history"]))
                lines.append(f"| {r['lr']:g} | {r['batch_size']} | " + " | ".join(cells) + " |")
    win = results.get("winner")
    if win:
        before, after = win["test_before"], win["test_after"]
        lines += [
            "",
            f"### Winner (chosen on validation): lr {win['lr']:g}, batch {win['batch_size']}, "
            f"epoch {win['chosen_epoch']}",
            "",
            f"Validation {SELECT_METRIC} at that epoch: {_pct(win['val'][SELECT_METRIC])}. Its test recall "
            "(%), before training and with the restored weights:",
            "",
            "| metric | before | after |",
            "|---|---:|---:|",
        ]
        for key in ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "mean_recall"):
            lines.append(f"| {key} | {_pct(before[key])} | {_pct(after[key])} |")
    w = results.get("wiseft")
    if w:
        pre, ft = w["pretrain"], w["finetune"]
        lines += [
            "",
            "### WiSE-FT (recall in %)",
            "",
            f"Base: trained {pre['epochs']} epoch(s) on {pre['images']} generic images (data seed "
            f"{pre['data_seed']}, lr {pre['lr']:g}, batch {pre['batch_size']}, last epoch kept); general test "
            f"t2i R@5 {_pct(pre['general_test_before']['t2i_r5'])} → "
            f"{_pct(pre['general_test_after']['t2i_r5'])}. "
            f"Tuned: the base fine-tuned on the domain train part with the winner's lr {ft['lr']:g} and batch "
            f"{ft['batch_size']} for up to {ft['epochs']} epochs, epoch {ft['chosen_epoch']} chosen on the "
            f"domain validation part; domain test t2i R@5 {_pct(ft['test_before']['t2i_r5'])} → "
            f"{_pct(ft['test_after']['t2i_r5'])}. General sets: {w['general_val_images']} (validation) and "
            f"{w['general_test_images']} (test) other unseen generic images.",
            "",
            "| alpha | domain val t2i R@5 | general val t2i R@5 | domain test t2i R@5 | domain test i2t R@5 "
            "| domain test mean R | general test t2i R@5 | general test i2t R@5 | general test mean R |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for e in w["sweep"]:
            dv, gv, dt, gt = e["domain_val"], e["general_val"], e["domain_test"], e["general_test"]
            lines.append(
                f"| {e['alpha']:g} | {_pct(dv['t2i_r5'])} | {_pct(gv['t2i_r5'])} | {_pct(dt['t2i_r5'])} "
                f"| {_pct(dt['i2t_r5'])} | {_pct(dt['mean_recall'])} | {_pct(gt['t2i_r5'])} "
                f"| {_pct(gt['i2t_r5'])} | {_pct(gt['mean_recall'])} |"
            )
        rules = {
            "domain_val": "domain validation t2i R@5",
            "general_val": "general validation t2i R@5",
            "sum_val": "the sum of the two validation t2i R@5",
        }
        lines += [
            "",
            "α chosen on validation, and its test recall (t2i R@5, %):",
            "",
            "| chosen by | alpha | domain test | general test |",
            "|---|---:|---:|---:|",
        ]
        for rule, alpha in w["chosen_alpha"].items():
            t = w["chosen_alpha_test"][rule]
            lines.append(
                f"| {rules[rule]} | {alpha:g} | {_pct(t['domain_test']['t2i_r5'])} "
                f"| {_pct(t['general_test']['t2i_r5'])} |"
            )
    return "\n".join(lines)


def _environment() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def _write(path: Path, results: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logger.setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/sweep.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "args": vars(args),
        "environment": _environment(),
        "load_avg_start": os.getloadavg(),
        "select_metric": SELECT_METRIC,
        "tie_break": list(TIE_BREAK),
        "runs": [],
    }

    pairs = synthetic.generate(
        args.n_images, domain="domain", seed=args.data_seed, captions_per_image=args.captions_per_image
    )
    train_pairs, test = pairs.split(args.test_fraction, seed=args.seed)
    fit_pairs, val = train_pairs.split(args.val_fraction, args.seed)  # the split finetune makes with keep_best
    parts = {"train": fit_pairs, "val": val, "test": test}
    general_val = general_test = pretrain_pairs = None
    if args.wiseft:
        pretrain_pairs = synthetic.generate(
            args.pretrain_images, domain="generic", seed=args.data_seed + 1, captions_per_image=args.captions_per_image
        )
        general_test, general_val = synthetic.generate(
            args.general_images, domain="generic", seed=args.data_seed + 2
        ).split(0.5, seed=args.seed)
        parts.update(pretrain=pretrain_pairs, general_val=general_val, general_test=general_test)
    demo = synthetic.generate(
        DEMO["n_images"], domain=DEMO["domain"], seed=DEMO["seed"], captions_per_image=DEMO["captions_per_image"]
    )
    results["overlap"] = overlap_checks(parts, demo)
    results["split"] = {
        "train_images": fit_pairs.num_images,
        "train_pairs": len(fit_pairs),
        "val_images": val.num_images,
        "val_pairs": len(val),
        "test_images": test.num_images,
        "test_pairs": len(test),
    }
    logger.info("domain data: %s; images shared: %s", results["split"], results["overlap"]["shared"])

    for lr in args.lrs:
        for batch_size in args.batch_sizes:
            run = run_grid_point(args, lr, batch_size, train_pairs, test, val.num_images)
            results["runs"].append(run)
            logger.info(
                "lr %g batch %d: val %s %.3f at epoch %d; test %.3f -> %.3f; %.0f samples/s, %.0f s",
                lr,
                batch_size,
                SELECT_METRIC,
                run["val"][SELECT_METRIC],
                run["chosen_epoch"],
                run["test_before"][SELECT_METRIC],
                run["test_after"][SELECT_METRIC],
                run["samples_per_s"],
                run["wall_s"],
            )
            _write(out, results)

    winner = max(results["runs"], key=lambda r: _rank(r["val"]))  # validation only; first in grid order on ties
    results["winner"] = {k: winner[k] for k in ("lr", "batch_size", "chosen_epoch", "val", "test_before", "test_after")}
    if args.wiseft:
        results["wiseft"] = run_wiseft(args, winner, train_pairs, val, test, general_val, general_test, pretrain_pairs)
    results["total_wall_s"] = time.perf_counter() - started
    results["load_avg_end"] = os.getloadavg()
    _write(out, results)
    print(markdown(results))
    print(f"\nTotal wall time {results['total_wall_s']:.0f} s; results in {out}")
    return results


if __name__ == "__main__":
    main()
