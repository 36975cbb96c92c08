"""The project's training step vs a bare OpenCLIP loop: same model config, weights, batches, threads and precision.

Both sides train ``--model`` (ViT-B-32 by default, seeded random init, the same initial weights copied into
both) in fp32 on the CPU with ``--threads`` torch threads, on the same ``--steps`` pre-made batches of
``--batch`` pairs (synthetic scenes through the bundle's training transform and tokenizer, built once before
any timing: the data loader is outside the timed region on both sides).

- ``project``: :func:`cliptuner.train.loop.fit` itself, one epoch over the batches, with what ``finetune`` builds
  for it from the default :class:`~cliptuner.config.TrainConfig` (``precision="fp32"``): the optimizer of
  :func:`~cliptuner.train.loop.build_optimizer` (AdamW, parameter groups without weight decay on gains, biases and
  the logit scale), the warm-up + cosine :func:`~cliptuner.train.loop.build_scheduler`,
  :class:`cliptuner.train.loss.ClipLoss`, :func:`~cliptuner.train.loop.apply_locks` (nothing locked by default). Each step:
  ``zero_grad``, forward through the model's ``forward``, loss, the finite-loss check, backward, gradient
  clipping at ``grad_clip_norm`` (1.0 by default), ``optimizer.step``, ``scheduler.step``, the logit-scale
  clamp, and the bookkeeping of the progress events (one ``float(loss)`` per step).
- ``bare``: ``open_clip.create_model``, ``open_clip.loss.ClipLoss()``, ``torch.optim.AdamW(model.parameters())``
  with the same lr, betas, eps and weight decay (one parameter group), and per step ``zero_grad``, forward,
  loss, backward, the same gradient clipping, ``optimizer.step``. What the project adds and the bare loop
  lacks: the scheduler, the clamp, the finite check, the parameter groups and the events.

The sides alternate in blocks (one ``fit`` call of ``--steps`` steps, then ``--steps`` bare steps; the order
swaps every repeat), ``--repeats`` times, after one untimed warm-up step each (it allocates the AdamW state).
Steps/s of a block = steps ÷ its wall time; a side's rate is the median over blocks; ``ratio`` = project median
÷ bare median and ``ratios`` the per-repeat ratios of the paired blocks. ``first_loss`` holds each side's loss on
the first batch, from identical weights (they must agree to float rounding). With ``--profile auto`` a ratio
under ``--target`` profiles one step of each side with ``torch.profiler`` (top operators by self CPU time).

A ViT-B-32 step at batch 32 is about 1.4 TFLOP of matrix products (forward and backward of both towers, 14.5
GFLOP per pair forward) plus an AdamW update of 151 M parameters: about 45 s on two cores that other processes
share (the full run, 10 steps, then takes about 8 minutes), several times less on idle ones. ``--batch 16``
halves the model part if that is too slow.

    python benchmarks/train_step.py            # ViT-B-32, batch 32: 4 paired blocks of 1 step
    python benchmarks/train_step.py --quick    # = --model cliptuner-tiny --batch 32 --steps 3 --repeats 4

Returns (and ``--json`` writes) a dict: ``project_steps_per_s``, ``bare_steps_per_s``, ``ratio``, ``ratios``,
``samples_per_s`` ``{project, bare}``, ``first_loss`` ``{project, bare}``, ``profile`` (when profiled:
``{project, bare}`` each ``{ops: [{op, share}, ...], seconds: {op: s}}``) and ``notes`` (where the project's
step spends more), ``model``, ``batch``, ``steps``, ``repeats``, ``grad_clip_norm``,
``timed_region``, and ``machine``, ``python``, ``torch``, ``open_clip``, ``threads``, ``wall_s``, ``command``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOP_OPS = 8  # operators listed per profile
QUICK = {"model": "cliptuner-tiny", "batch": 32, "steps": 3, "repeats": 4}  # what --quick sets


class _Project:
    """The project's path: :func:`cliptuner.train.loop.fit` with what ``finetune`` builds for it."""

    def __init__(self, bundle, cfg, total_steps: int) -> None:
        from cliptuner.train.loop import apply_locks, build_optimizer, build_scheduler
        from cliptuner.train.loss import ClipLoss

        self.model = bundle.model
        self.cfg = cfg
        apply_locks(self.model, cfg)
        self.loss_fn = ClipLoss()
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, total_steps)
        self.first_loss = None

    def run(self, batches: list) -> None:
        from cliptuner.train.loop import fit

        def keep_first(event: dict) -> None:
            if self.first_loss is None and event["event"] == "step":
                self.first_loss = event["loss"]

        fit(
            self.model,
            batches,
            self.loss_fn,
            self.optimizer,
            self.scheduler,
            self.cfg,
            on_event=keep_first if self.first_loss is None else None,
        )


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


class _Bare:
    """A bare OpenCLIP loop: model, ``open_clip.loss.ClipLoss``, AdamW; forward, loss, backward, clip, step."""

    def __init__(self, arch: str, state: dict, cfg) -> None:
        import open_clip
        import torch

        quiet = _DropRandomInitWarning()  # the weights are loaded next: no "initialized randomly" warning
        logging.getLogger().addFilter(quiet)
        try:
            self.model = open_clip.create_model(arch)
        finally:
            logging.getLogger().removeFilter(quiet)
        self.model.load_state_dict(state)
        self.loss_fn = open_clip.loss.ClipLoss()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=cfg.learning_rate,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )
        self.clip = cfg.grad_clip_norm
        self.first_loss = None

    def step(self, images, texts) -> None:
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(image=images, text=texts)
        image_features, text_features, logit_scale = (
            (out["image_features"], out["text_features"], out["logit_scale"]) if isinstance(out, dict) else out[:3]
        )
        loss = self.loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        if self.first_loss is None:
            self.first_loss = float(loss.detach())

    def run(self, batches: list) -> None:
        self.model.train()
        for images, texts, _ in batches:
            self.step(images, texts)


def make_batches(bundle, batch: int, steps: int, seed: int) -> list:
    """``steps`` batches ``(images [batch, 3, H, W], texts [batch, context], image_index)`` of synthetic pairs."""
    from cliptuner.train.data import make_loader
    from cliptuner.train.synthetic import generate

    pairs = generate(batch * steps, "generic", seed=seed, image_size=bundle.image_size)
    loader = make_loader(pairs, bundle.preprocess_train, bundle.tokenizer, batch, seed=seed, shuffle=True)
    batches = list(loader)
    if len(batches) < steps:
        raise RuntimeError(f"the loader gave {len(batches)} batches, {steps} wanted")
    return batches[:steps]


def profile_step(run: Callable[[list], None], batches: list) -> dict:
    """Self CPU time per operator over one training step.

    Returns:
        ``{"ops": [{"op", "share"}, ...] (the top ones), "seconds": {op: self CPU seconds} (all of them)}``.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(batches[:1])
    times = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages() if e.self_cpu_time_total > 0}
    total = sum(times.values()) or 1.0
    return {
        "ops": [
            {"op": op, "share": t / total}
            for op, t in sorted(times.items(), key=lambda kv: kv[1], reverse=True)[:TOP_OPS]
        ],
        "seconds": times,
    }


def diagnose(profiles: dict) -> list[str]:
    """The operators on which the project's step spends the most more time than the bare step, in words."""
    project, bare = profiles["project"]["seconds"], profiles["bare"]["seconds"]
    extra = sorted(((project.get(op, 0.0) - bare.get(op, 0.0), op) for op in set(project) | set(bare)), reverse=True)
    total = sum(bare.values()) or 1.0
    more = [f"{op} +{100 * dt / total:.1f}%" for dt, op in extra[: TOP_OPS // 2] if dt > 0]
    return [
        f"profiled step, project vs bare: {sum(project.values()):.3f} s vs {total:.3f} s of operator time; "
        f"most extra time in {', '.join(more) or 'no operator'} (share of the bare step)"
    ]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="ViT-B-32", help="OpenCLIP arch or bundled config (random init)")
    p.add_argument("--batch", type=int, default=32, help="pairs per step")
    p.add_argument("--steps", type=int, default=1, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=4, help="timed blocks per side (alternating)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="profile one step per side: auto = when the ratio is under --target",
    )
    p.add_argument("--target", type=float, default=0.95, help="project ÷ bare target (for --profile auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument(
        "--quick",
        action="store_true",
        help="quick sizes: " + " ".join(f"--{k}={v}" for k, v in QUICK.items()) + " (options given explicitly win)",
    )
    args, _ = p.parse_known_args(argv)
    if args.quick:
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    if args.batch < 2 or args.steps < 1 or args.repeats < 1:
        p.error("--batch must be >= 2, --steps and --repeats >= 1")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import open_clip
    import torch

    from cliptuner.config import ModelSpec, TrainConfig
    from cliptuner.train.models import load_model

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    bundle = load_model(ModelSpec(args.model))
    cfg = TrainConfig(batch_size=args.batch, precision="fp32", device="cpu", epochs=1, seed=args.seed, log_every=10**9)
    bare = _Bare(args.model, bundle.model.state_dict(), cfg)
    project = _Project(bundle, cfg, total_steps=(1 + args.repeats) * args.steps + 1)
    batches = make_batches(bundle, args.batch, args.steps, args.seed)
    sides = {"project": project, "bare": bare}
    for side in sides.values():  # untimed: the first step allocates the optimizer state
        side.run(batches[:1])
    rates: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for _ in range(args.repeats):
        for name in order:
            t0 = time.perf_counter()
            sides[name].run(batches)
            rates[name].append(args.steps / (time.perf_counter() - t0))
        order.reverse()
    medians = {name: statistics.median(r) for name, r in rates.items()}
    result = {
        "project_steps_per_s": medians["project"],
        "bare_steps_per_s": medians["bare"],
        "ratio": medians["project"] / medians["bare"],
        "ratios": [p_ / b_ for p_, b_ in zip(rates["project"], rates["bare"])],
        "samples_per_s": {name: rate * args.batch for name, rate in medians.items()},
        "first_loss": {"project": project.first_loss, "bare": bare.first_loss},
    }
    if args.profile == "always" or (args.profile == "auto" and result["ratio"] < args.target):
        result["profile"] = {name: profile_step(side.run, batches) for name, side in sides.items()}
        result["notes"] = diagnose(result["profile"])
    result.update(
        model=args.model,
        batch=args.batch,
        steps=args.steps,
        repeats=args.repeats,
        grad_clip_norm=cfg.grad_clip_norm,
        threads=args.threads,
        timed_region="optimizer steps on pre-made batches (no data loading), fp32 CPU",
        wall_s=time.perf_counter() - started,
        machine=f"{platform.platform()}, {os.cpu_count()} CPUs",
        python=platform.python_version(),
        torch=torch.__version__,
        open_clip=open_clip.__version__,
        command="python benchmarks/train_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def _print(result: dict) -> None:
    print(
        f"{result['model']}, batch {result['batch']}, fp32 CPU, {result['threads']} threads, median of "
        f"{result['repeats']} blocks of {result['steps']} steps; first-batch loss project "
        f"{result['first_loss']['project']:.6f}, bare {result['first_loss']['bare']:.6f}"
    )
    print("| loop | steps/s | samples/s | project ÷ bare |")
    print("|---|---:|---:|---:|")
    print(f"| bare OpenCLIP | {result['bare_steps_per_s']:.3f} | {result['samples_per_s']['bare']:.1f} | |")
    print(
        f"| cliptuner fit | {result['project_steps_per_s']:.3f} | {result['samples_per_s']['project']:.1f} | "
        f"{result['ratio']:.3f} (per repeat: {', '.join(f'{r:.3f}' for r in result['ratios'])}) |"
    )
    for side, prof in result.get("profile", {}).items():
        print(f"profile {side}: " + ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in prof["ops"]))
    for note in result.get("notes", []):
        print(f"note: {note}")


if __name__ == "__main__":
    main()
