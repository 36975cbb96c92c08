"""Hyper-parameter sweep on the offline domain benchmark, and the WiSE-FT curve of the best setting.

Grid: ``cliptuner-tiny`` from a seeded random init, fine-tuned on synthetic ``domain`` scenes (a seeded share of
the images held out with all their captions) for every learning rate × batch size. Each run trains for
``--epochs`` and is evaluated on the held-out images after every epoch, so one run gives the whole epochs
dimension (a shorter run would anneal its cosine schedule sooner; the curve is that of the long run).
Per run: held-out recall@k before and after, the per-epoch curve, the best epoch, samples/s and wall time.

``--wiseft``: pre-train a base briefly on ``generic`` scenes, fine-tune it on the domain split with the best
grid setting (its learning rate, batch size and best epoch count), then evaluate the WiSE-FT interpolations
``(1 - α)·base + α·tuned`` on the held-out domain split and on unseen generic scenes ("general").

Results go to ``--out`` as JSON (rewritten after each run) and to stdout as markdown tables.

    python benchmarks/sweep.py --n-images 800 --epochs 10 --lrs 3e-4 1e-3 3e-3 --batch-sizes 32 64 \\
        --seed 0 --out results.json --wiseft

Timings come from whatever machine runs this; on a shared CPU they are noisy.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import open_clip
import torch

from cliptuner import synthetic
from cliptuner.config import EvalConfig, ModelSpec, TrainConfig
from cliptuner.models import ClipBundle, load_model
from cliptuner.train import finetune, seed_everything
from cliptuner.wiseft import best_alpha, state_copy, wiseft_sweep

logger = logging.getLogger("sweep")

SELECT_METRIC = "t2i_r5"  # what picks the best epoch and the best run (ties: i2t_r5, then mean_recall)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="cliptuner-tiny", help="OpenCLIP arch or bundled config (random init)")
    p.add_argument("--n-images", type=int, default=800, help="synthetic domain images")
    p.add_argument("--captions-per-image", type=int, default=2, help="captions per domain image")
    p.add_argument("--eval-fraction", type=float, default=0.2, help="share of images held out")
    p.add_argument("--epochs", type=int, default=10, help="epochs per run (evaluated after each)")
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3], help="learning rates")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64], help="batch sizes")
    p.add_argument("--warmup-steps", type=int, default=10, help="linear warmup steps of every run")
    p.add_argument("--seed", type=int, default=0, help="seeds data, split, init and training")
    p.add_argument("--out", default="results.json", help="JSON results file")
    p.add_argument("--wiseft", action="store_true", help="also measure the WiSE-FT curve of the best setting")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="WiSE-FT alphas")
    p.add_argument("--pretrain-images", type=int, default=1000, help="generic images the WiSE-FT base trains on")
    p.add_argument("--pretrain-epochs", type=int, default=6, help="epochs of base pre-training")
    p.add_argument("--pretrain-lr", type=float, default=1e-3, help="learning rate of base pre-training")
    p.add_argument("--pretrain-batch-size", type=int, default=64, help="batch size of base pre-training")
    p.add_argument("--general-images", type=int, default=200, help="unseen generic images of the 'general' set")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice; 1 avoids oversubscribing "
                   "cores that other processes use)")
    return p.parse_args(argv)


def _fresh_model(arch: str, seed: int) -> ClipBundle:
    seed_everything(seed)  # the same random init for every run
    return load_model(ModelSpec(arch))


def _pick(history: Sequence[dict[str, float]]) -> dict[str, float]:
    return max(history, key=lambda m: (m[SELECT_METRIC], m["i2t_r5"], m["mean_recall"], -m["epoch"]))


def run_grid_point(args: argparse.Namespace, lr: float, batch_size: int, train_pairs: Any, held_out: Any) -> dict:
    """One fine-tuning run from the seeded random init; evaluated on ``held_out`` after every epoch."""
    bundle = _fresh_model(args.model, args.seed)
    cfg = TrainConfig(epochs=args.epochs, batch_size=batch_size, learning_rate=lr, warmup_steps=args.warmup_steps,
                      seed=args.seed, keep_best=False, log_every=10**6)
    t0 = time.perf_counter()
    report = finetune(bundle, train_pairs, held_out, cfg, EvalConfig())
    wall = time.perf_counter() - t0
    best = _pick(report["eval_history"])
    return {
        "lr": lr, "batch_size": batch_size, "epochs": report["epochs"], "steps": report["steps"],
        "before": report["before"], "after": report["after"],
        "best_epoch": best["epoch"], "best": {k: v for k, v in best.items() if k != "epoch"},
        "eval_history": report["eval_history"], "epoch_losses": report["epoch_losses"],
        "samples_per_s": report["samples_per_s"], "train_seconds": report["train_seconds"], "wall_s": wall,
    }


def run_wiseft(args: argparse.Namespace, best_run: dict, train_pairs: Any, held_out: Any) -> dict:
    """Pre-train a generic base, fine-tune it on the domain with the best setting, sweep alpha."""
    general = synthetic.generate(args.general_images, domain="generic", seed=args.seed + 1)
    pretrain_pairs = synthetic.generate(args.pretrain_images, domain="generic", seed=args.seed,
                                        captions_per_image=args.captions_per_image)
    bundle = _fresh_model(args.model, args.seed)

    t0 = time.perf_counter()
    pre_cfg = TrainConfig(epochs=args.pretrain_epochs, batch_size=args.pretrain_batch_size, learning_rate=args.pretrain_lr,
                          warmup_steps=20, seed=args.seed, eval_every=0, keep_best=False, log_every=10**6)
    pre = finetune(bundle, pretrain_pairs, general, pre_cfg, EvalConfig())
    pretrain_wall = time.perf_counter() - t0
    logger.info("base pre-trained on %d generic images in %.0f s: general t2i_r5 %.3f -> %.3f",
                args.pretrain_images, pretrain_wall, pre["before"]["t2i_r5"], pre["after"]["t2i_r5"])
    base_state = state_copy(bundle.model)

    t0 = time.perf_counter()
    ft_cfg = TrainConfig(epochs=best_run["best_epoch"], batch_size=best_run["batch_size"],
                         learning_rate=best_run["lr"], warmup_steps=args.warmup_steps, seed=args.seed,
                         keep_best=False, log_every=10**6)
    ft = finetune(bundle, train_pairs, held_out, ft_cfg, EvalConfig())
    finetune_wall = time.perf_counter() - t0
    tuned_state = state_copy(bundle.model)

    t0 = time.perf_counter()
    sweep = wiseft_sweep(bundle, base_state, tuned_state, args.alphas, {"held_out": held_out, "general": general})
    sweep_wall = time.perf_counter() - t0
    balanced = max(sweep, key=lambda e: (e["held_out"][SELECT_METRIC] + e["general"][SELECT_METRIC], -e["alpha"]))
    return {
        "pretrain": {"images": args.pretrain_images, "captions_per_image": args.captions_per_image,
                     "epochs": args.pretrain_epochs, "lr": args.pretrain_lr, "batch_size": args.pretrain_batch_size,
                     "general_before": pre["before"], "general_after": pre["after"],
                     "epoch_losses": pre["epoch_losses"], "wall_s": pretrain_wall},
        "finetune": {"lr": ft_cfg.learning_rate, "batch_size": ft_cfg.batch_size, "epochs": ft_cfg.epochs,
                     "held_out_before": ft["before"], "held_out_after": ft["after"],
                     "eval_history": ft["eval_history"], "samples_per_s": ft["samples_per_s"],
                     "wall_s": finetune_wall},
        "general_images": args.general_images,
        "sweep": sweep, "sweep_wall_s": sweep_wall,
        "best_alpha_held_out": best_alpha(sweep, "held_out", SELECT_METRIC),
        "best_alpha_general": best_alpha(sweep, "general", SELECT_METRIC),
        "best_alpha_sum": balanced["alpha"],
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(results: dict) -> str:
    """The results as markdown tables (recall in percent)."""
    lines: list[str] = []
    runs = results["runs"]
    if runs:
        lines += ["### Grid (held-out domain split, recall@5 in %)", "",
                  "| lr | batch | t2i R@5 before | t2i R@5 best | i2t R@5 before | i2t R@5 best | best epoch "
                  "| t2i R@5 last | i2t R@5 last | final loss | samples/s | wall s |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in runs:
            lines.append(
                f"| {r['lr']:g} | {r['batch_size']} | {_pct(r['before']['t2i_r5'])} | {_pct(r['best']['t2i_r5'])} "
                f"| {_pct(r['before']['i2t_r5'])} | {_pct(r['best']['i2t_r5'])} | {r['best_epoch']} "
                f"| {_pct(r['after']['t2i_r5'])} | {_pct(r['after']['i2t_r5'])} | {r['epoch_losses'][-1]:.3f} "
                f"| {r['samples_per_s']:.0f} | {r['wall_s']:.0f} |")
        epochs = max(len(r["eval_history"]) for r in runs)
        for metric in ("t2i_r5", "i2t_r5"):
            lines += ["", f"### {metric} per epoch (%)", "",
                      "| lr | batch | " + " | ".join(f"ep {e + 1}" for e in range(epochs)) + " |",
                      "|---:|---:|" + "---:|" * epochs]
            for r in runs:
                cells = [_pct(h[metric]) for h in r["eval_history"]] + [""] * (epochs - len(r["eval_history"]))
                lines.append(f"| {r['lr']:g} | {r['batch_size']} | " + " | ".join(cells) + " |")
        best = results.get("best_run")
        if best:
            lines += ["", f"Best run ({SELECT_METRIC} at its best epoch): lr {best['lr']:g}, batch {best['batch_size']}, "
                          f"epoch {best['best_epoch']}."]
    w = results.get("wiseft")
    if w:
        pre, ft = w["pretrain"], w["finetune"]
        lines += ["", "### WiSE-FT (recall in %)", "",
                  f"Base: trained {pre['epochs']} epoch(s) on {pre['images']} generic images (lr {pre['lr']:g}, batch "
                  f"{pre['batch_size']}); general t2i R@5 {_pct(pre['general_before']['t2i_r5'])} → "
                  f"{_pct(pre['general_after']['t2i_r5'])}. Tuned: {ft['epochs']} epoch(s) on the domain split "
                  f"(lr {ft['lr']:g}, batch {ft['batch_size']}). General set: {w['general_images']} unseen generic "
                  "images.", "",
                  "| alpha | held-out t2i R@5 | held-out i2t R@5 | held-out mean R | general t2i R@5 "
                  "| general i2t R@5 | general mean R |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for e in w["sweep"]:
            h, g = e["held_out"], e["general"]
            lines.append(f"| {e['alpha']:g} | {_pct(h['t2i_r5'])} | {_pct(h['i2t_r5'])} | {_pct(h['mean_recall'])} "
                         f"| {_pct(g['t2i_r5'])} | {_pct(g['i2t_r5'])} | {_pct(g['mean_recall'])} |")
        lines += ["", f"Best alpha by held-out t2i R@5: {w['best_alpha_held_out']:g}; by general t2i R@5: "
                      f"{w['best_alpha_general']:g}; by their sum: {w['best_alpha_sum']:g}."]
    return "\n".join(lines)


def _environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__,
            "platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}


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
        "args": vars(args), "environment": _environment(), "load_avg_start": os.getloadavg(),
        "select_metric": SELECT_METRIC, "runs": []}

    pairs = synthetic.generate(args.n_images, domain="domain", seed=args.seed,
                               captions_per_image=args.captions_per_image)
    train_pairs, held_out = pairs.split(args.eval_fraction, seed=args.seed)
    results["split"] = {"train_images": train_pairs.num_images, "train_pairs": len(train_pairs),
                        "eval_images": held_out.num_images, "eval_pairs": len(held_out)}
    logger.info("domain data: %s", results["split"])

    for lr in args.lrs:
        for batch_size in args.batch_sizes:
            run = run_grid_point(args, lr, batch_size, train_pairs, held_out)
            results["runs"].append(run)
            logger.info("lr %g batch %d: t2i_r5 %.3f -> best %.3f (epoch %d), %.0f samples/s, %.0f s", lr, batch_size,
                        run["before"]["t2i_r5"], run["best"]["t2i_r5"], run["best_epoch"], run["samples_per_s"],
                        run["wall_s"])
            _write(out, results)

    best = max(results["runs"], key=lambda r: (r["best"][SELECT_METRIC], r["best"]["i2t_r5"],
                                               r["best"]["mean_recall"]))
    results["best_run"] = {k: best[k] for k in ("lr", "batch_size", "best_epoch")}
    if args.wiseft:
        results["wiseft"] = run_wiseft(args, best, train_pairs, held_out)
    results["total_wall_s"] = time.perf_counter() - started
    results["load_avg_end"] = os.getloadavg()
    _write(out, results)
    print(markdown(results))
    print(f"\nTotal wall time {results['total_wall_s']:.0f} s; results in {out}")
    return results


if __name__ == "__main__":
    main()
