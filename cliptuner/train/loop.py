"""The fine-tuning loop.

:func:`fit` receives everything it uses (model, loader, loss, optimizer, scheduler, config, callbacks) and
runs epochs of contrastive training (:func:`train_one_epoch`) with AMP on CUDA, gradient accumulation, gradient
clipping, evaluation every N epochs, early stopping and best-weights keeping (``_EpochChoice``) and resumable
checkpoints (``last.pt``). It reports progress as plain dict events through ``on_event`` so a CLI progress bar and
the service consume the same stream.

:func:`finetune` is the whole job on top of it: seed, build, evaluate the base model on the held-out pairs,
train, evaluate again on the same pairs, and return the report.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from cliptuner.config import EvalConfig, TrainConfig
from cliptuner.model.atomic import atomic_path
from cliptuner.train.loss import ClipLoss, SigLipLoss, build_loss, clamp_logit_scale
from cliptuner.train.models import seed_everything
from cliptuner.train.wiseft import apply_wiseft, state_copy, wiseft_sweep

logger = logging.getLogger(__name__)

Event = dict[str, Any]
EventCallback = Callable[[Event], None]
EvalFn = Callable[[], dict[str, float]]

LAST_CHECKPOINT = "last.pt"
MAX_SKIPPED_IN_A_ROW = 25  # AMP: consecutive overflowed (skipped) steps before training gives up
# Options that may differ between a run and its resume: they do not change what is trained.
RESUME_MAY_DIFFER = frozenset({"device", "log_every"})


class TrainingStopped(RuntimeError):
    """Raised inside :func:`fit` when ``should_stop`` asks to abort."""


def _no_weight_decay(name: str, param: nn.Parameter) -> bool:
    # OpenCLIP's rule (open_clip_train/main.py `exclude`): no decay on gains, biases, norms and the logit scale.
    # Matrices are decayed, the token and positional embeddings included, exactly as OpenCLIP trains them, so a
    # run here and the same run under OpenCLIP's own loop optimise the same objective.
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


_BLOCK_INDEX = re.compile(r"(?:resblocks|blocks|layers|stages)\.(\d+)\.")
_VISUAL_STEM = (
    "conv1",
    "class_embedding",
    "positional_embedding",
    "ln_pre",
    "patch_embed",
    "cls_token",
    "pos_embed",
    "stem",
)
_TEXT_STEM = ("token_embedding", "positional_embedding", "cls_emb", "embeddings")


def layer_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """Learning-rate multiplier per parameter name for layer-wise lr decay.

    Each tower is numbered on its own: its embeddings are layer 0, its ``i``-th block is layer ``i + 1`` and
    its head (final norm, projection) is layer ``depth + 1``, which gets the full learning rate; layer ``l``
    gets ``decay ** (depth + 1 - l)``. The logit scale keeps the full rate.
    """
    names = [name for name, _ in model.named_parameters()]

    def tower(name: str) -> str:
        if name.startswith("visual."):
            return "visual"
        return "other" if name.startswith("logit_") else "text"

    depth = {"visual": 0, "text": 0}
    for name in names:
        match = _BLOCK_INDEX.search(name)
        if match and tower(name) in depth:
            depth[tower(name)] = max(depth[tower(name)], int(match.group(1)) + 1)
    scales = {}
    for name in names:
        kind = tower(name)
        if kind == "other" or decay == 1.0:
            scales[name] = 1.0
            continue
        match = _BLOCK_INDEX.search(name)
        stem = _VISUAL_STEM if kind == "visual" else _TEXT_STEM
        if match:
            layer = int(match.group(1)) + 1
        elif any(part in name for part in stem):
            layer = 0
        else:
            layer = depth[kind] + 1
        scales[name] = decay ** (depth[kind] + 1 - layer)
    return scales


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: weight decay only on matrices, layer-wise lr decay if asked."""
    model = getattr(model, "module", model)
    scales = layer_scales(model, cfg.layer_decay)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        groups.setdefault((scales[name], _no_weight_decay(name, param)), []).append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters (are both towers locked?)")
    param_groups = [
        {
            "params": params,
            "lr": cfg.learning_rate * scale,
            "lr_scale": scale,
            "weight_decay": 0.0 if no_decay else cfg.weight_decay,
        }
        for (scale, no_decay), params in sorted(groups.items(), key=lambda item: item[0])
    ]
    return torch.optim.AdamW(param_groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
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
    """Freeze what the config asks to lock, with OpenCLIP's own locking.

    ``lock_image`` freezes the image tower but its last ``image_unlocked_groups`` layer groups;
    ``lock_text`` freezes the text tower but its last ``text_unlocked_layers`` transformer layers.
    """
    model = getattr(model, "module", model)
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=cfg.image_unlocked_groups, freeze_bn_stats=False)
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=cfg.text_unlocked_layers, freeze_layer_norm=True)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)


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
    skipped_steps: int = 0  # AMP steps the gradient scaler skipped because their gradients overflowed


def _forward(
    model: nn.Module, images: torch.Tensor, texts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Normalised features, exp(logit_scale) and the logit bias through the model's forward (so DDP sees the call).

    The bias is None for a model without one; OpenCLIP models built with ``init_logit_bias`` (the SigLIP family)
    return it as a fourth output (or the ``logit_bias`` key).
    """
    out = model(image=images, text=texts)
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias")
    return out[0], out[1], out[2], (out[3] if len(out) > 3 else None)


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    texts: torch.Tensor,
    loss_fn: ClipLoss | SigLipLoss,
    cfg: TrainConfig,
    scaler: Optional[torch.amp.GradScaler] = None,
) -> torch.Tensor:
    """Forward and backward of one optimizer step's batch; returns the (detached) loss.

    With ``cfg.accum_steps > 1`` the batch is cut into that many micro-batches and features are accumulated
    (OpenCLIP's ``accum_freq``): a no-grad pass embeds every micro-batch, then each micro-batch is embedded
    again with gradient and the loss over the *whole* batch is back-propagated through it. The gradient equals
    the one-big-batch gradient while activations are held for one micro-batch at a time.

    The logit scale (and a SigLIP-family model's logit bias) takes part in every micro-batch's loss, but each of
    those losses carries its whole gradient, so it is kept (not detached) in exactly one of them: the last. Under
    DDP the last micro-batch is the synchronising one (the others run under ``no_sync``), so every trainable
    parameter, the logit scale and bias included, is used in the backward whose gradients DDP averages; a parameter
    used only in a ``no_sync`` micro-batch would never be reduced, and DDP would refuse the next step ("Expected to
    have finished reduction").

    A :class:`SigLipLoss` receives the model's logit bias; a :class:`ClipLoss` does not. When a model with a bias
    is trained with the CLIP loss, the bias still enters the graph with weight zero: its gradient is 0 (AdamW then
    leaves it where it is, as it has no weight decay), and DDP sees every parameter used.

    Without a ``scaler`` a non-finite loss raises :class:`FloatingPointError`. With one (fp16 AMP) it is left to
    the scaler, which skips the optimizer step whose gradients overflowed and lowers its scale, as OpenCLIP does.
    """
    device = images.device
    backward = (lambda loss: scaler.scale(loss).backward()) if scaler is not None else (lambda loss: loss.backward())

    def batch_loss(
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: Optional[torch.Tensor],
    ) -> torch.Tensor:
        if isinstance(loss_fn, SigLipLoss):
            return loss_fn(image_features, text_features, logit_scale, logit_bias)
        loss = loss_fn(image_features, text_features, logit_scale)
        if logit_bias is not None and logit_bias.requires_grad:
            loss = loss + 0.0 * logit_bias.sum()  # unused by the CLIP loss: a zero gradient, so DDP reduces it
        return loss

    if cfg.accum_steps == 1:
        with _autocast(cfg, device):
            image_features, text_features, logit_scale, logit_bias = _forward(model, images, texts)  # [batch, dim] x2
            loss = batch_loss(image_features, text_features, logit_scale, logit_bias)
        if scaler is None:
            _check_finite(loss)
        backward(loss)
        return loss.detach()

    image_chunks, text_chunks = images.tensor_split(cfg.accum_steps), texts.tensor_split(cfg.accum_steps)
    with torch.no_grad(), _autocast(cfg, device):
        cached = [_forward(model, i, t)[:2] for i, t in zip(image_chunks, text_chunks)]
    no_sync = getattr(model, "no_sync", None)
    for j, (image_chunk, text_chunk) in enumerate(zip(image_chunks, text_chunks)):
        last = j == len(image_chunks) - 1
        with no_sync() if no_sync is not None and not last else nullcontext(), _autocast(cfg, device):
            image_features, text_features, logit_scale, logit_bias = _forward(model, image_chunk, text_chunk)
            all_image = torch.cat([c[0] for c in cached[:j]] + [image_features] + [c[0] for c in cached[j + 1 :]])
            all_text = torch.cat([c[1] for c in cached[:j]] + [text_features] + [c[1] for c in cached[j + 1 :]])
            if not last:  # the scale and the bias carry their gradient in the last micro-batch only
                logit_scale = logit_scale.detach()
                logit_bias = logit_bias.detach() if logit_bias is not None else None
            loss = batch_loss(all_image, all_text, logit_scale, logit_bias)
            if scaler is None:
                _check_finite(loss)
            backward(loss)
    return loss.detach()


def _check_finite(loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()}; lower the learning rate or use precision=fp32")


def _check_resumable(saved: dict[str, Any], cfg: TrainConfig, path: str | Path) -> None:
    """Refuse to resume a checkpoint written with other training options (it would not continue that run)."""
    current = asdict(cfg)
    differing = sorted(
        name
        for name in set(saved) | set(current)
        if name not in RESUME_MAY_DIFFER and _comparable(saved.get(name)) != _comparable(current.get(name))
    )
    if differing:
        details = ", ".join(
            f"{name}: {saved.get(name)!r} in the checkpoint, {current.get(name)!r} now" for name in differing
        )
        raise ValueError(
            f"cannot resume from {str(path)!r}: it was written with other training options ({details}); "
            "resume with the options of that run, or start a new one"
        )


def _comparable(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _seed_loader_epoch(loader: Any, seed: int, epoch: int) -> None:
    """Key the loader's randomness to ``(seed, epoch)``: the batch order and the worker seeds.

    A DataLoader draws its workers' base seed from its generator at every new iterator, so without this a
    resumed run (a fresh generator) would give epoch ``k`` the worker seeds of epoch 0, and with
    ``num_workers > 0`` its augmentations would differ from the uninterrupted run's.
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    if hasattr(batch_sampler, "set_epoch"):
        batch_sampler.set_epoch(epoch)
    generator = getattr(loader, "generator", None)
    if generator is not None:
        generator.manual_seed((seed * 1_000_003 + epoch) % (2**63))


def _optimizer_step(optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler]) -> bool:
    """Step the optimizer (through the scaler under AMP); False when the scaler skipped the step."""
    if scaler is None:
        optimizer.step()
        return True
    scale = scaler.get_scale()
    scaler.step(optimizer)  # skipped when the unscaled gradients hold inf/NaN
    scaler.update()  # ... and then the scale is lowered
    return scaler.get_scale() >= scale


def _distributed() -> tuple[int, int]:
    """``(world_size, rank)`` of the initialised process group, ``(1, 0)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision, on every rank."""
    world_size, _ = _distributed()
    if world_size == 1:
        return flag
    tensor = torch.tensor([1 if flag else 0], device=device)
    torch.distributed.broadcast(tensor, src=0)
    return bool(tensor.item())


def _default_scaler(
    scaler: Optional[torch.amp.GradScaler], cfg: TrainConfig, device: torch.device
) -> Optional[torch.amp.GradScaler]:
    """The caller's scaler, else one for fp16 AMP on CUDA (else none); says when a precision falls back to fp32."""
    if scaler is None and device.type == "cuda" and cfg.precision == "amp":
        scaler = torch.amp.GradScaler("cuda")
    if device.type != "cuda" and cfg.precision != "fp32":
        logger.info("precision %s needs CUDA; training in fp32 on %s", cfg.precision, device)
    return scaler


@dataclass
class _Progress:
    """This process's counters over a run: optimizer steps, samples and the seconds spent in steps.

    ``step`` counts every step of the run (a resumed run starts at the checkpoint's); rates and times per step
    count only the steps taken since this process started.
    """

    total_steps: int
    step: int
    steps_at_start: int
    samples_seen: int = 0
    train_time: float = 0.0
    skipped_in_a_row: int = 0  # AMP steps skipped since the last one taken

    def step_event(self, epoch: int, cfg: TrainConfig, loss: torch.Tensor, lr: float, logit_scale: float) -> Event:
        """The ``step`` event after the current step of ``epoch`` (0-based)."""
        steps_here = max(self.step - self.steps_at_start, 1)
        return {
            "event": "step",
            "epoch": epoch + 1,
            "epochs": cfg.epochs,
            "step": self.step,
            "total_steps": self.total_steps,
            "loss": float(loss),
            "lr": lr,
            "logit_scale": logit_scale,
            "samples_per_s": self.samples_seen / max(self.train_time, 1e-9),
            "eta_s": (self.total_steps - self.step) * self.train_time / steps_here,
            "step_s": self.train_time / steps_here,
        }


def _log_step(event: Event) -> None:
    logger.info(
        "epoch %d/%d step %d/%d loss %.4f lr %.2e logit_scale %.1f %.1f samples/s",
        event["epoch"],
        event["epochs"],
        event["step"],
        event["total_steps"],
        event["loss"],
        event["lr"],
        event["logit_scale"],
        event["samples_per_s"],
    )


def _apply_gradients(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: Optional[torch.amp.GradScaler],
    cfg: TrainConfig,
    loss: torch.Tensor,
    progress: _Progress,
    result: FitResult,
) -> None:
    """Clip and apply the gradients of one step; under AMP count a skipped step and give up after too many.

    Raises:
        FloatingPointError: ``MAX_SKIPPED_IN_A_ROW`` steps in a row overflowed.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    if cfg.grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip_norm)
    if _optimizer_step(optimizer, scaler):
        scheduler.step()  # the schedule counts the steps that were taken
        clamp_logit_scale(getattr(model, "module", model))
        progress.skipped_in_a_row = 0
        return
    result.skipped_steps += 1
    progress.skipped_in_a_row += 1
    logger.info(
        "step %d skipped: gradients overflowed under AMP (loss scale now %g)", progress.step + 1, scaler.get_scale()
    )
    if progress.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
        raise FloatingPointError(
            f"{progress.skipped_in_a_row} steps in a row overflowed under fp16 AMP (last loss {float(loss)}); "
            "lower the learning rate or use precision=amp_bf16 or fp32"
        )


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    loss_fn: ClipLoss | SigLipLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: Optional[torch.amp.GradScaler],
    cfg: TrainConfig,
    epoch: int,
    progress: _Progress,
    result: FitResult,
    emit: EventCallback,
    should_stop: Optional[Callable[[], bool]] = None,
) -> None:
    """Train one pass over ``loader``: epoch ``epoch`` (0-based) of the run.

    Emits a ``step`` event every ``cfg.log_every`` steps (and at the run's last step), then the ``epoch`` event;
    ``result`` gets the epoch's mean loss, ``progress`` the steps, samples and time.

    Raises:
        TrainingStopped: ``should_stop`` returned True before a step.
    """
    world_size, rank = _distributed()
    inner = getattr(model, "module", model)
    device = next(model.parameters()).device
    _seed_loader_epoch(loader, cfg.seed, epoch)
    model.train()
    epoch_loss, epoch_batches = 0.0, 0
    epoch_start = time.perf_counter()
    for images, texts, _image_index in loader:
        if should_stop is not None and should_stop():
            raise TrainingStopped(f"training stopped at epoch {epoch + 1}, step {progress.step}")
        t0 = time.perf_counter()
        images = images.to(device, non_blocking=True)
        texts = texts.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = train_step(model, images, texts, loss_fn, cfg, scaler)
        _apply_gradients(model, optimizer, scheduler, scaler, cfg, loss, progress, result)
        progress.step += 1
        progress.train_time += time.perf_counter() - t0
        if math.isfinite(float(loss)):
            epoch_loss += float(loss)
            epoch_batches += 1
        progress.samples_seen += images.shape[0] * world_size

        if progress.step % cfg.log_every == 0 or progress.step == progress.total_steps:
            lr, logit_scale = optimizer.param_groups[-1]["lr"], float(inner.logit_scale.detach().exp())
            event = progress.step_event(epoch, cfg, loss, lr, logit_scale)
            if rank == 0:
                _log_step(event)
            emit(event)

    mean_loss = epoch_loss / max(epoch_batches, 1)
    result.epoch_losses.append(mean_loss)
    result.epochs_run = epoch + 1
    result.steps = progress.step
    emit(
        {
            "event": "epoch",
            "epoch": epoch + 1,
            "epochs": cfg.epochs,
            "loss": mean_loss,
            "seconds": time.perf_counter() - epoch_start,
        }
    )


class _EpochChoice:
    """Early stopping and best-weights keeping over a run's evaluations.

    The best metric and its epoch are reported, so they live in the run's :class:`FitResult`; the patience left
    and, with ``cfg.keep_best``, a CPU copy of the best weights are kept here. Both travel in the checkpoint.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        best_state: Optional[dict[str, torch.Tensor]] = None,
        patience_left: Optional[int] = None,
    ) -> None:
        self.cfg = cfg
        self.best_state = best_state
        self.patience_left = patience_left

    def due(self, epoch: int) -> bool:
        """Whether the end of ``epoch`` (0-based) is evaluated: every ``cfg.eval_every`` epochs, and the last."""
        every = self.cfg.eval_every
        return bool(every and (epoch + 1) % every == 0) or epoch + 1 == self.cfg.epochs

    def record(
        self, metrics: dict[str, float], epoch: int, inner: nn.Module, result: FitResult, emit: EventCallback
    ) -> bool:
        """Take the evaluation of the end of ``epoch`` (0-based): emit it, keep the best; True to stop early."""
        cfg = self.cfg
        result.eval_history.append({"epoch": epoch + 1, **metrics})
        value = metrics[cfg.early_stop_metric]
        improved = result.best_metric is None or value > result.best_metric
        emit({"event": "eval", "epoch": epoch + 1, "metrics": metrics, "improved": improved})
        if improved:
            result.best_metric, result.best_epoch = value, epoch + 1
            self.patience_left = cfg.early_stop_patience
            if cfg.keep_best:
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in inner.state_dict().items()}
            return False
        if self.patience_left is None:
            return False
        self.patience_left -= 1
        if self.patience_left > 0:
            return False
        logger.info(
            "early stop after epoch %d: %s did not improve on %.4f (epoch %s)",
            epoch + 1,
            cfg.early_stop_metric,
            result.best_metric,
            result.best_epoch,
        )
        return True

    def restore_best(self, inner: nn.Module, result: FitResult) -> None:
        """With ``cfg.keep_best``, put back the best weights when the last epoch was not the best."""
        if self.cfg.keep_best and self.best_state is not None and result.best_epoch != result.epochs_run:
            inner.load_state_dict(self.best_state)
            logger.info(
                "restored the best weights (epoch %d, %s=%.4f)",
                result.best_epoch,
                self.cfg.early_stop_metric,
                result.best_metric,
            )


def _evaluate_epoch(
    model: nn.Module,
    eval_fn: EvalFn,
    choice: _EpochChoice,
    epoch: int,
    result: FitResult,
    emit: EventCallback,
) -> bool:
    """Evaluate on rank 0 and let it decide whether to stop early; every rank gets that decision."""
    stop = False
    if _distributed()[1] == 0:
        stop = choice.record(eval_fn(), epoch, getattr(model, "module", model), result, emit)
    model.train()
    stop = _broadcast_flag(stop, next(model.parameters()).device)
    result.stopped_early = stop
    return stop


def _save_last_checkpoint(
    checkpoint_dir: str | Path,
    inner: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: Optional[torch.amp.GradScaler],
    epoch: int,
    result: FitResult,
    choice: _EpochChoice,
    cfg: TrainConfig,
    stream: Optional[dict[str, Any]] = None,
) -> None:
    """Write the full training state after ``epoch`` (0-based) to ``checkpoint_dir/last.pt``, atomically.

    ``stream``: within an epoch of a stream, the loader's state (``{"epoch", "done"}``: the epoch being read and the
    shards done in it); ``epoch`` is then the last whole epoch (``stream["epoch"] - 1``).
    """
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    state = {
        "model": inner.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler else None,
        "epoch": epoch + 1,
        "result": asdict(result),
        "best_state": choice.best_state,
        "patience_left": choice.patience_left,
        "config": asdict(cfg),
        "rng": _rng_state(),
        "stream": stream,
    }
    with atomic_path(Path(checkpoint_dir) / LAST_CHECKPOINT) as tmp:
        torch.save(state, tmp)


def _resume(
    path: str | Path,
    inner: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: Optional[torch.amp.GradScaler],
    cfg: TrainConfig,
    stream: Any = None,
) -> tuple[int, FitResult, _EpochChoice]:
    """Load a ``last.pt`` into the training objects and the RNGs; ``(epochs done, result so far, epoch choice)``.

    A ``stream`` loader (:class:`cliptuner.train.stream_loader.StreamLoader`) is told which shards of the epoch
    being read were done when the checkpoint was written, to skip them.

    Raises:
        ValueError: the checkpoint was written with other training options, or names shards ``stream`` lacks.
    """
    state = torch.load(path, map_location="cpu", weights_only=False)
    _check_resumable(state.get("config", {}), cfg, path)
    inner.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    start_epoch = int(state["epoch"])
    result = FitResult(**state["result"])
    choice = _EpochChoice(cfg, state.get("best_state"), state.get("patience_left", cfg.early_stop_patience))
    _set_rng_state(state["rng"])
    if stream is not None and state.get("stream"):
        stream.resume(state["stream"])
        logger.info(
            "resuming the stream after %d shard(s) done in epoch %d", len(state["stream"]["done"]), start_epoch + 1
        )
    logger.info("resumed from %s at epoch %d", path, start_epoch)
    return start_epoch, result, choice


def fit(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    loss_fn: ClipLoss | SigLipLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    eval_fn: Optional[EvalFn] = None,
    on_event: Optional[EventCallback] = None,
    checkpoint_dir: Optional[str | Path] = None,
    resume_from: Optional[str | Path] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
) -> FitResult:
    """Train ``model`` for ``cfg.epochs`` epochs of contrastive learning.

    Under DDP (an initialised process group; ``model`` wrapped in ``DistributedDataParallel``; ``loss_fn``
    built with the world size) every rank trains, and only rank 0 evaluates, emits events and writes
    checkpoints; early-stopping decisions are broadcast from rank 0.

    Args:
        model: an OpenCLIP model (or its DDP wrapper), already on its device.
        loader: yields one optimizer step's batch ``(images [B,3,H,W], texts [B,ctx], image_index [B])``,
            ``B = cfg.batch_size * cfg.accum_steps``.
        loss_fn: the contrastive loss.
        optimizer: built over the trainable parameters.
        scheduler: stepped once per optimizer step.
        cfg: training options.
        eval_fn: returns held-out metrics for the current weights; drives early stopping and best keeping.
        on_event: receives progress events (``{"event": "step" | "epoch" | "eval" | "end", ...}``).
        checkpoint_dir: where ``last.pt`` (full training state) is written after every epoch; for a stream
            (a :class:`cliptuner.train.stream_loader.StreamLoader`) also each time shards are done within an epoch,
            with their names.
        resume_from: a ``last.pt`` to continue from (model, optimizer, scheduler, scaler, epoch, history, RNG);
            written with the same options (``cfg`` may differ only in ``device`` and ``log_every``). A run that had
            stopped early stays stopped. A stream resumes its epoch without the shards done before.
        should_stop: polled between steps; returning True raises :class:`TrainingStopped`.
        scaler: the gradient scaler; default: one for fp16 AMP on CUDA, else none. Under a scaler a step whose
            gradients overflow is skipped (the weights, optimizer and schedule stay where they were), as OpenCLIP
            does; ``MAX_SKIPPED_IN_A_ROW`` skips in a row stop training with :class:`FloatingPointError`.

    Returns:
        A :class:`FitResult`. With ``cfg.keep_best`` and an ``eval_fn``, the model ends with the weights of the
        best evaluation.
    """
    is_main = _distributed()[1] == 0
    emit = (on_event or (lambda event: None)) if is_main else (lambda event: None)
    inner = getattr(model, "module", model)
    scaler = _default_scaler(scaler, cfg, next(model.parameters()).device)
    if len(loader) == 0:
        raise ValueError("the training loader yields no batch: fewer distinct images than the batch size?")
    from cliptuner.train.stream_loader import StreamLoader, planned_steps

    stream = loader if isinstance(loader, StreamLoader) else None

    result, start_epoch, choice = FitResult(), 0, _EpochChoice(cfg, patience_left=cfg.early_stop_patience)
    if resume_from is not None:
        start_epoch, result, choice = _resume(resume_from, inner, optimizer, scheduler, scaler, cfg, stream)
    progress = _Progress(total_steps=planned_steps(loader, cfg.epochs), step=result.steps, steps_at_start=result.steps)
    if stream is not None and checkpoint_dir is not None and is_main:

        def shards_done(state: dict[str, Any]) -> None:  # between two steps: the shards named are trained on
            result.steps = progress.step
            _save_last_checkpoint(
                checkpoint_dir, inner, optimizer, scheduler, scaler, state["epoch"] - 1, result, choice, cfg, state
            )

        stream.on_shards_done = shards_done
    first_epoch = cfg.epochs if result.stopped_early else start_epoch  # an early-stopped run stays stopped
    for epoch in range(first_epoch, cfg.epochs):
        if stream is not None:
            stream.set_epoch(epoch)
        train_one_epoch(
            model, loader, loss_fn, optimizer, scheduler, scaler, cfg, epoch, progress, result, emit, should_stop
        )
        stop = False
        if eval_fn is not None and choice.due(epoch):
            stop = _evaluate_epoch(model, eval_fn, choice, epoch, result, emit)
        if checkpoint_dir is not None and is_main:
            _save_last_checkpoint(checkpoint_dir, inner, optimizer, scheduler, scaler, epoch, result, choice, cfg)
        if stop:
            break

    choice.restore_best(inner, result)
    result.train_seconds += progress.train_time
    result.samples_per_s = progress.samples_seen / progress.train_time if progress.train_time > 0 else 0.0
    model.eval()
    emit(
        {
            "event": "end",
            "epochs_run": result.epochs_run,
            "steps": result.steps,
            "samples_per_s": result.samples_per_s,
            "stopped_early": result.stopped_early,
            "skipped_steps": result.skipped_steps,
        }
    )
    return result


def _training_device(cfg: TrainConfig) -> torch.device:
    """``cfg.device`` as a device, refused when it names CUDA on a machine without it."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} asked for, but CUDA is not available here")
    return device


def _distributed_model(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` when more than one process trains, else itself."""
    if world_size == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index or 0] if device.type == "cuda" else None
    )


def _final_metrics(result: FitResult, selecting: bool, rank: int, run_eval: EvalFn) -> dict[str, float]:
    """Held-out metrics of the weights training ended with; empty on ranks other than 0.

    The last epoch's evaluation when it was of those weights on the held-out pairs, else a new one.
    """
    if rank != 0:
        return {}
    if not selecting and result.eval_history and result.eval_history[-1]["epoch"] == result.epochs_run:
        return {k: v for k, v in result.eval_history[-1].items() if k != "epoch"}  # the final weights' eval
    return run_eval()


def _wiseft_sweep_and_apply(
    bundle: Any,
    model: nn.Module,
    base_state: dict[str, torch.Tensor],
    cfg: TrainConfig,
    eval_cfg: EvalConfig,
    eval_pairs: Any,
    general_pairs: Any,
    after: dict[str, float],
) -> tuple[dict[str, Any], dict[str, float]]:
    """Sweep WiSE-FT alphas between the base and the tuned weights; with ``cfg.wiseft_alpha``, keep that blend.

    Returns:
        The report's ``wiseft`` section and the ``after`` metrics (the blend's held-out ones when one is kept).
    """
    tuned_state = state_copy(model)
    eval_sets = {"held_out": eval_pairs, **({"general": general_pairs} if general_pairs is not None else {})}
    alphas = sorted(set(cfg.wiseft_alphas) | ({cfg.wiseft_alpha} if cfg.wiseft_alpha is not None else set()))
    wiseft: dict[str, Any] = {
        "sweep": wiseft_sweep(bundle, base_state, tuned_state, alphas, eval_sets, eval_cfg.ks, eval_cfg.batch_size)
    }
    if cfg.wiseft_alpha is not None:
        apply_wiseft(model, base_state, tuned_state, cfg.wiseft_alpha)
        wiseft["alpha"] = cfg.wiseft_alpha
        wiseft["tuned_after"] = after
        after = next(e["held_out"] for e in wiseft["sweep"] if e["alpha"] == cfg.wiseft_alpha)
    return wiseft, after


def _train_loader(bundle: Any, train_pairs: Any, cfg: TrainConfig, world_size: int, rank: int) -> Any:
    """The shuffled, seeded loader of this rank's shard: one optimizer step's batch (all micro-batches) at a time."""
    if cfg.hard_negatives:  # batches of pairs the base model confuses (mined now, before training)
        from cliptuner.train.hard_negatives import hard_negative_loader

        return hard_negative_loader(bundle, train_pairs, cfg, world_size, rank)
    from cliptuner.train.data import make_loader
    from cliptuner.train.streaming import StreamSource

    if isinstance(train_pairs, StreamSource):  # read while training, cfg.shuffle_buffer samples held per reader
        from cliptuner.train.stream_loader import StreamLoader

        return StreamLoader(
            train_pairs,
            bundle.preprocess_train,
            bundle.tokenizer,
            cfg.batch_size * cfg.accum_steps,
            seed=cfg.seed,
            shuffle_buffer=cfg.shuffle_buffer,
            num_workers=cfg.num_workers,
            num_replicas=world_size,
            rank=rank,
        )
    return make_loader(
        train_pairs,
        bundle.preprocess_train,
        bundle.tokenizer,
        cfg.batch_size * cfg.accum_steps,
        seed=cfg.seed,
        shuffle=True,
        num_workers=cfg.num_workers,
        num_replicas=world_size,
        rank=rank,
    )


def _split_counts(train_pairs: Any, eval_pairs: Any, val_pairs: Any) -> dict[str, int]:
    """The report's ``split``: pairs and images trained on, held out and (when an epoch is chosen) validated on.

    For a stream the training pairs and images are those counted before reading (an image per sample), with its
    ``train_shards``.
    """
    return {
        "train_pairs": len(train_pairs),
        "train_images": train_pairs.num_images,
        **({"train_shards": train_pairs.num_shards} if hasattr(train_pairs, "num_shards") else {}),
        "eval_pairs": len(eval_pairs),
        "eval_images": eval_pairs.num_images,
        **({"val_pairs": len(val_pairs), "val_images": val_pairs.num_images} if val_pairs else {}),
    }


def _report(
    result: FitResult,
    cfg: TrainConfig,
    *,
    before: dict[str, float],
    after: dict[str, float],
    selecting: bool,
    trivial: list[str],
    split: dict[str, int],
    world_size: int,
    wiseft: dict[str, Any],
    loss: str,
) -> dict[str, Any]:
    """The report of :func:`finetune` (its keys in this order)."""
    return {
        "before": before,
        "after": after,
        "epochs": result.epochs_run,
        "steps": result.steps,
        "epoch_losses": result.epoch_losses,
        "eval_history": result.eval_history,
        **({"best_epoch": result.best_epoch} if selecting else {}),
        "stopped_early": result.stopped_early,
        "skipped_steps": result.skipped_steps,
        "trivial": trivial,
        "samples_per_s": result.samples_per_s,
        "train_seconds": result.train_seconds,
        "split": split,
        "history_split": "val" if selecting else "eval",
        "config": asdict(cfg),
        "world_size": world_size,
        "loss": loss,  # the loss trained with (cfg.loss "auto" resolved)
        **({"wiseft": wiseft} if wiseft else {}),
    }


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
    general_pairs: Any = None,
) -> dict[str, Any]:
    """Evaluate, fine-tune and evaluate again on the same held-out pairs.

    With ``cfg.wiseft_alphas`` the report also holds a WiSE-FT sweep (recall at each alpha on the held-out
    pairs, and on ``general_pairs`` when given, to show what the base model knew and tuning kept); with
    ``cfg.wiseft_alpha`` the model ends with those interpolated weights and ``after`` describes them.

    Args:
        bundle: a :class:`cliptuner.train.models.ClipBundle` (trained in place; moved to ``cfg.device``).
        train_pairs: :class:`cliptuner.train.data.PairSet` to train on, or a
            :class:`cliptuner.train.streaming.StreamSource` read while training (it cannot choose an epoch: no
            ``keep_best``, early stopping or hard negatives).
        eval_pairs: held-out :class:`~cliptuner.train.data.PairSet`, never trained on and never used to choose: with
            ``keep_best`` or early stopping, the epoch is chosen on ``cfg.val_fraction`` of the training images.
        cfg: training options.
        eval_cfg: evaluation options (k values, batch size).
        on_event: progress callback (see :func:`fit`); also receives ``{"event": "before"|"after", "metrics"}``.
        checkpoint_dir: where resumable training state is written each epoch.
        resume_from: a previous ``last.pt`` to continue from.
        should_stop: polled between steps to abort.
        general_pairs: optional pairs of the general (not tuned-for) distribution, for the WiSE-FT sweep.

    Returns:
        The report: ``{"before", "after", "epochs", "epoch_losses", "samples_per_s", "split", ...}``.
        ``eval_history`` holds the per-epoch evaluations: on the validation part when an epoch is chosen
        (``keep_best``/early stopping; then ``best_epoch`` names it), else on the held-out pairs, as a curve that
        chooses nothing (and no ``best_epoch`` is reported). ``trivial`` lists the cut-offs whose recall is 1.0
        by construction on the held-out pairs (``k`` at least the number of candidates). Under DDP
        every rank trains its shard of each global batch; only rank 0 evaluates (other ranks' report has
        empty ``before``/``after``).
    """
    from cliptuner.train.evaluate import evaluate, trivial_cutoffs

    eval_cfg = eval_cfg or EvalConfig()
    world_size, rank = _distributed()
    emit = on_event if on_event is not None and rank == 0 else (lambda event: None)
    device = _training_device(cfg)
    seed_everything(cfg.seed)
    model = bundle.model.to(device)
    apply_locks(model, cfg)

    def run_eval(pairs: Any = eval_pairs) -> dict[str, float]:
        return evaluate(bundle, pairs, eval_cfg.ks, eval_cfg.batch_size)

    from cliptuner.train.stream_loader import planned_steps
    from cliptuner.train.streaming import check_stream_training

    check_stream_training(train_pairs, eval_pairs, cfg.keep_best, cfg.early_stop_patience, cfg.hard_negatives)
    # Choosing an epoch (best weights, early stopping) on the split that reports "after" would flatter it:
    # the choice is made on a validation part of the training images instead.
    selecting = cfg.keep_best or cfg.early_stop_patience is not None
    val_pairs = None
    if selecting:
        train_pairs, val_pairs = train_pairs.split(cfg.val_fraction, cfg.seed)
    before = run_eval() if rank == 0 else {}
    emit({"event": "before", "metrics": before})
    use_wiseft = bool(cfg.wiseft_alphas) or cfg.wiseft_alpha is not None
    base_state = state_copy(model) if use_wiseft and rank == 0 else None
    loader = _train_loader(bundle, train_pairs, cfg, world_size, rank)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, planned_steps(loader, cfg.epochs))
    loss_fn = build_loss(cfg, model, world_size=world_size, rank=rank)
    result = fit(
        _distributed_model(model, device, world_size),
        loader,
        loss_fn,
        optimizer,
        scheduler,
        cfg,
        eval_fn=(lambda: run_eval(val_pairs)) if selecting else run_eval,
        on_event=on_event,
        checkpoint_dir=checkpoint_dir,
        resume_from=resume_from,
        should_stop=should_stop,
    )
    after = _final_metrics(result, selecting, rank, run_eval)
    wiseft: dict[str, Any] = {}
    if base_state is not None:
        wiseft, after = _wiseft_sweep_and_apply(
            bundle, model, base_state, cfg, eval_cfg, eval_pairs, general_pairs, after
        )
        emit({"event": "wiseft", "sweep": wiseft["sweep"]})
    emit({"event": "after", "metrics": after})
    return _report(
        result,
        cfg,
        before=before,
        after=after,
        selecting=selecting,
        trivial=trivial_cutoffs(eval_pairs.num_images, len(eval_pairs), eval_cfg.ks),
        split=_split_counts(train_pairs, eval_pairs, val_pairs),
        world_size=world_size,
        wiseft=wiseft,
        loss="siglip" if isinstance(loss_fn, SigLipLoss) else "clip",
    )
