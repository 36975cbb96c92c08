"""The fine-tuning loop.

:func:`fit` receives everything it uses (model, loader, loss, optimizer, scheduler, config, callbacks) and
runs epochs of contrastive training with AMP on CUDA, gradient accumulation, gradient clipping, evaluation
every N epochs, early stopping, best-weights keeping and resumable checkpoints. It reports progress as plain
dict events through ``on_event`` so a CLI progress bar and the service consume the same stream.

:func:`finetune` is the whole job on top of it: seed, build, evaluate the base model on the held-out pairs,
train, evaluate again on the same pairs, and return the report.
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from .config import EvalConfig, TrainConfig
from .loss import ClipLoss, clamp_logit_scale

logger = logging.getLogger(__name__)

Event = dict[str, Any]
EventCallback = Callable[[Event], None]
EvalFn = Callable[[], dict[str, float]]

LAST_CHECKPOINT = "last.pt"


class TrainingStopped(RuntimeError):
    """Raised inside :func:`fit` when ``should_stop`` asks to abort."""


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _no_weight_decay(name: str, param: nn.Parameter) -> bool:
    # OpenCLIP's rule: no decay on gains, biases, norms, embeddings and the logit scale.
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name \
        or "embedding" in name or "token" in name


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with weight decay only on matrices."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if _no_weight_decay(name, param) else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (are both towers locked?)")
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": cfg.weight_decay}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup for ``cfg.warmup_steps``, then cosine decay to zero (or constant)."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def apply_locks(model: nn.Module, cfg: TrainConfig) -> None:
    """Freeze the towers the config asks to lock (OpenCLIP's own locking, whole tower)."""
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _autocast(cfg: TrainConfig, device: torch.device):
    if device.type == "cuda" and cfg.precision == "amp":
        return torch.autocast("cuda", dtype=torch.float16)
    if device.type == "cuda" and cfg.precision == "amp_bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@dataclass
class FitResult:
    """What :func:`fit` leaves behind besides the trained model."""

    epochs_run: int = 0
    steps: int = 0
    epoch_losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    eval_history: list[dict[str, Any]] = field(default_factory=list)  # {"epoch": n, **metrics}
    best_epoch: Optional[int] = None
    best_metric: Optional[float] = None
    samples_per_s: float = 0.0
    train_seconds: float = 0.0
    stopped_early: bool = False


def fit(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    loss_fn: ClipLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    eval_fn: Optional[EvalFn] = None,
    on_event: Optional[EventCallback] = None,
    checkpoint_dir: Optional[str | Path] = None,
    resume_from: Optional[str | Path] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> FitResult:
    """Train ``model`` for ``cfg.epochs`` epochs of contrastive learning.

    Args:
        model: an OpenCLIP model (``encode_image``, ``encode_text``, ``logit_scale``), already on its device.
        loader: yields ``(images [B,3,H,W], texts [B,ctx], image_index [B])``.
        loss_fn: the contrastive loss.
        optimizer: built over the trainable parameters.
        scheduler: stepped once per optimizer step.
        cfg: training options.
        eval_fn: returns held-out metrics for the current weights; drives early stopping and best keeping.
        on_event: receives progress events (``{"event": "step" | "epoch" | "eval" | "end", ...}``).
        checkpoint_dir: where ``last.pt`` (full training state) is written after every epoch.
        resume_from: a ``last.pt`` to continue from (model, optimizer, scheduler, epoch, history).
        should_stop: polled between steps; returning True raises :class:`TrainingStopped`.

    Returns:
        A :class:`FitResult`. With ``cfg.keep_best`` and an ``eval_fn``, the model ends with the weights of the
        best evaluation.
    """
    emit = on_event or (lambda event: None)
    device = next(model.parameters()).device
    use_scaler = device.type == "cuda" and cfg.precision == "amp"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    if device.type != "cuda" and cfg.precision != "fp32":
        logger.info("precision %s needs CUDA; training in fp32 on %s", cfg.precision, device)

    micro_per_epoch = len(loader)
    if micro_per_epoch == 0:
        raise ValueError("the training loader yields no batch: fewer distinct images than batch_size?")
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.accum_steps)
    total_steps = steps_per_epoch * cfg.epochs

    result = FitResult()
    start_epoch = 0
    best_state: Optional[dict[str, torch.Tensor]] = None
    patience_left = cfg.early_stop_patience
    if resume_from is not None:
        state = torch.load(resume_from, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"])
        result = FitResult(**state["result"])
        best_state = state.get("best_state")
        patience_left = state.get("patience_left", patience_left)
        _set_rng_state(state["rng"])
        logger.info("resumed from %s at epoch %d", resume_from, start_epoch)

    samples_seen = 0
    train_time = 0.0
    step = result.steps
    for epoch in range(start_epoch, cfg.epochs):
        if hasattr(loader, "batch_sampler") and hasattr(loader.batch_sampler, "set_epoch"):
            loader.batch_sampler.set_epoch(epoch)
        model.train()
        epoch_loss, epoch_batches = 0.0, 0
        epoch_start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for micro, (images, texts, _image_index) in enumerate(loader):
            if should_stop is not None and should_stop():
                raise TrainingStopped(f"training stopped at epoch {epoch + 1}, step {step}")
            t0 = time.perf_counter()
            images = images.to(device, non_blocking=True)
            texts = texts.to(device, non_blocking=True)
            with _autocast(cfg, device):
                image_features = model.encode_image(images, normalize=True)  # [batch, dim]
                text_features = model.encode_text(texts, normalize=True)  # [batch, dim]
                loss = loss_fn(image_features, text_features, model.logit_scale.exp())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}, step {step}; "
                                         "lower the learning rate or use precision=fp32")
            scaled = loss / cfg.accum_steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            epoch_loss += float(loss.detach())
            epoch_batches += 1
            samples_seen += images.shape[0]

            last_micro = micro + 1 == micro_per_epoch
            if (micro + 1) % cfg.accum_steps == 0 or last_micro:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if cfg.grad_clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(
                        [p for p in model.parameters() if p.requires_grad], cfg.grad_clip_norm)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                clamp_logit_scale(model)
                step += 1
            train_time += time.perf_counter() - t0

            if step and ((micro + 1) % cfg.accum_steps == 0 or last_micro) and \
                    (step % cfg.log_every == 0 or step == total_steps):
                rate = samples_seen / max(train_time, 1e-9)
                steps_done_now = step - result.steps
                eta = (total_steps - step) * (train_time / max(steps_done_now, 1))
                event = {"event": "step", "epoch": epoch + 1, "epochs": cfg.epochs, "step": step,
                         "total_steps": total_steps, "loss": float(loss.detach()),
                         "lr": optimizer.param_groups[-1]["lr"], "logit_scale": float(model.logit_scale.detach().exp()),
                         "samples_per_s": rate, "eta_s": eta}
                logger.info("epoch %d/%d step %d/%d loss %.4f lr %.2e logit_scale %.1f %.1f samples/s",
                            epoch + 1, cfg.epochs, step, total_steps, event["loss"], event["lr"],
                            event["logit_scale"], rate)
                emit(event)

        mean_loss = epoch_loss / max(epoch_batches, 1)
        result.epoch_losses.append(mean_loss)
        result.epochs_run = epoch + 1
        result.steps = step
        emit({"event": "epoch", "epoch": epoch + 1, "epochs": cfg.epochs, "loss": mean_loss,
              "seconds": time.perf_counter() - epoch_start})

        is_last = epoch + 1 == cfg.epochs
        if eval_fn is not None and ((cfg.eval_every and (epoch + 1) % cfg.eval_every == 0) or is_last):
            metrics = eval_fn()
            model.train()
            result.eval_history.append({"epoch": epoch + 1, **metrics})
            value = metrics[cfg.early_stop_metric]
            improved = result.best_metric is None or value > result.best_metric
            emit({"event": "eval", "epoch": epoch + 1, "metrics": metrics, "improved": improved})
            if improved:
                result.best_metric, result.best_epoch = value, epoch + 1
                patience_left = cfg.early_stop_patience
                if cfg.keep_best:
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            elif patience_left is not None:
                patience_left -= 1
                if patience_left <= 0:
                    logger.info("early stop after epoch %d: %s did not improve on %.4f (epoch %s)",
                                epoch + 1, cfg.early_stop_metric, result.best_metric, result.best_epoch)
                    result.stopped_early = True

        if checkpoint_dir is not None:
            Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                     "epoch": epoch + 1, "result": asdict(result), "best_state": best_state,
                     "patience_left": patience_left, "config": asdict(cfg), "rng": _rng_state()}
            tmp = Path(checkpoint_dir) / (LAST_CHECKPOINT + ".tmp")
            torch.save(state, tmp)
            tmp.replace(Path(checkpoint_dir) / LAST_CHECKPOINT)
        if result.stopped_early:
            break

    if cfg.keep_best and best_state is not None and result.best_epoch != result.epochs_run:
        model.load_state_dict(best_state)
        logger.info("restored the best weights (epoch %d, %s=%.4f)", result.best_epoch,
                    cfg.early_stop_metric, result.best_metric)
    result.train_seconds += train_time
    result.samples_per_s = samples_seen / train_time if train_time > 0 else 0.0
    model.eval()
    emit({"event": "end", "epochs_run": result.epochs_run, "steps": result.steps,
          "samples_per_s": result.samples_per_s, "stopped_early": result.stopped_early})
    return result


def finetune(
    bundle: Any,
    train_pairs: Any,
    eval_pairs: Any,
    cfg: TrainConfig,
    eval_cfg: Optional[EvalConfig] = None,
    on_event: Optional[EventCallback] = None,
    checkpoint_dir: Optional[str | Path] = None,
    resume_from: Optional[str | Path] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> dict[str, Any]:
    """Evaluate, fine-tune and evaluate again on the same held-out pairs.

    Args:
        bundle: a :class:`cliptuner.models.ClipBundle` (trained in place; moved to ``cfg.device``).
        train_pairs: :class:`cliptuner.data.PairSet` to train on.
        eval_pairs: held-out :class:`~cliptuner.data.PairSet`, never trained on.
        cfg: training options.
        eval_cfg: evaluation options (k values, batch size).
        on_event: progress callback (see :func:`fit`); also receives ``{"event": "before"|"after", "metrics"}``.
        checkpoint_dir: where resumable training state is written each epoch.
        resume_from: a previous ``last.pt`` to continue from.
        should_stop: polled between steps to abort.

    Returns:
        The report: ``{"before", "after", "epochs", "epoch_losses", "samples_per_s", "split", ...}``.
    """
    from .data import make_loader
    from .evaluate import evaluate

    eval_cfg = eval_cfg or EvalConfig()
    emit = on_event or (lambda event: None)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} asked for, but CUDA is not available here")
    seed_everything(cfg.seed)
    model = bundle.model.to(device)
    apply_locks(model, cfg)

    def run_eval() -> dict[str, float]:
        return evaluate(bundle, eval_pairs, eval_cfg.ks, eval_cfg.batch_size)

    before = run_eval()
    emit({"event": "before", "metrics": before})
    loader = make_loader(train_pairs, bundle.preprocess_train, bundle.tokenizer, cfg.batch_size, seed=cfg.seed,
                         shuffle=True, num_workers=cfg.num_workers)
    optimizer = build_optimizer(model, cfg)
    total_steps = math.ceil(len(loader) / cfg.accum_steps) * cfg.epochs
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    result = fit(model, loader, ClipLoss(), optimizer, scheduler, cfg, eval_fn=run_eval, on_event=on_event,
                 checkpoint_dir=checkpoint_dir, resume_from=resume_from, should_stop=should_stop)
    if cfg.keep_best and result.eval_history and result.best_epoch == result.epochs_run:
        after = {k: v for k, v in result.eval_history[-1].items() if k != "epoch"}
    else:
        after = run_eval()
    emit({"event": "after", "metrics": after})
    return {
        "before": before,
        "after": after,
        "epochs": result.epochs_run,
        "steps": result.steps,
        "epoch_losses": result.epoch_losses,
        "eval_history": result.eval_history,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "samples_per_s": result.samples_per_s,
        "train_seconds": result.train_seconds,
        "split": {"train_pairs": len(train_pairs), "train_images": train_pairs.num_images,
                  "eval_pairs": len(eval_pairs), "eval_images": eval_pairs.num_images},
        "config": asdict(cfg),
    }
