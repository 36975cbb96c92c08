"""Contrastive losses over a batch of matched image/text embeddings: CLIP's and SigLIP's.

:class:`ClipLoss` is CLIP's symmetric InfoNCE. Under DDP it gathers the features of every rank, so the negatives
are the global batch. The gathered copies carry no gradient; the local shard keeps its own, scaled by the world
size so that DDP's gradient averaging yields exactly the gradient of the global-batch loss (each rank holds the
whole loss, and its own shard's gradient of it; see :class:`_ScaleGrad`). A two-process run therefore matches one
process on the same global batch.

:class:`SigLipLoss` is SigLIP's sigmoid loss over every image/text pair, with the model's learnable logit bias.
Under DDP each rank scores its own images against the texts of every rank (see its docstring); again a
two-process run matches one process on the same global batch. :func:`build_loss` chooses between them.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cliptuner.config import LOSSES

logger = logging.getLogger(__name__)

# OpenCLIP clamps the learnable temperature so that exp(logit_scale) <= 100.
MAX_LOGIT_SCALE = math.log(100.0)


def clamp_logit_scale(model: nn.Module) -> None:
    """Clamp ``model.logit_scale`` to ``[0, ln 100]`` in place, as OpenCLIP does after each step."""
    model = getattr(model, "module", model)
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor`` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


def gather_features(
    image_features: torch.Tensor, text_features: torch.Tensor, world_size: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' features concatenated in rank order; only the local shard carries gradient.

    Returns:
        ``(image [world * batch, dim], text [world * batch, dim])``.
    """
    image_features = _ScaleGrad.apply(image_features, float(world_size))
    text_features = _ScaleGrad.apply(text_features, float(world_size))
    gathered_image = [torch.empty_like(image_features) for _ in range(world_size)]
    gathered_text = [torch.empty_like(text_features) for _ in range(world_size)]
    dist.all_gather(gathered_image, image_features.detach().contiguous())
    dist.all_gather(gathered_text, text_features.detach().contiguous())
    gathered_image[rank] = image_features
    gathered_text[rank] = text_features
    return torch.cat(gathered_image), torch.cat(gathered_text)


class ClipLoss(nn.Module):
    """Symmetric cross-entropy over image→text and text→image similarity logits.

    Row ``i`` of the image features and row ``i`` of the text features are a positive pair; every other row
    of the batch is a negative. The temperature is the model's learnable ``logit_scale`` (passed in already
    exponentiated).

    Args:
        label_smoothing: label smoothing of the cross-entropy (0 = plain InfoNCE).
        world_size: number of DDP processes; above 1, features are gathered from every rank.
        rank: this process's rank.
    """

    def __init__(self, label_smoothing: float = 0.0, world_size: int = 1, rank: int = 0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.label_smoothing = label_smoothing
        self.world_size = world_size
        self.rank = rank

    def logits(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarity logits ``(image→text [B, B], text→image [B, B])``."""
        logits_per_image = logit_scale * image_features @ text_features.T  # [batch, batch]
        return logits_per_image, logits_per_image.T

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        """Mean of the two cross-entropies.

        Args:
            image_features: ``[batch, embed_dim]``, L2-normalised.
            text_features: ``[batch, embed_dim]``, L2-normalised.
            logit_scale: scalar, ``exp`` of the model's log temperature.

        Returns:
            A scalar loss tensor.
        """
        if image_features.shape != text_features.shape:
            raise ValueError(
                f"image and text features differ in shape: {tuple(image_features.shape)} "
                f"vs {tuple(text_features.shape)}"
            )
        if self.world_size > 1:
            image_features, text_features = gather_features(image_features, text_features, self.world_size, self.rank)
        logits_per_image, logits_per_text = self.logits(image_features, text_features, logit_scale)
        labels = torch.arange(image_features.shape[0], device=image_features.device)
        return (
            F.cross_entropy(logits_per_image.float(), labels, label_smoothing=self.label_smoothing)
            + F.cross_entropy(logits_per_text.float(), labels, label_smoothing=self.label_smoothing)
        ) / 2


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' ``[batch, dim]`` tensors concatenated in rank order, differentiable with respect to every rank.

    Backward: rank ``r``'s tensor appears in the output of every rank, so its gradient is the sum over ranks of
    the gradient each rank's loss sends to that slice. One all-reduce of the whole ``[world * batch, dim]``
    gradient delivers those sums everywhere; each rank keeps its own slice. (An all-reduce rather than a
    reduce-scatter because gloo, the CPU backend, has no reduce-scatter; the gradient is small: features, not
    logits.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.batch = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # [world * batch, dim]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        start = ctx.rank * ctx.batch
        return grad[start : start + ctx.batch], None, None


class SigLipLoss(nn.Module):
    """SigLIP's sigmoid loss: every image/text pair of the batch is a binary match / no-match decision.

    Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (ICCV 2023). With logits
    ``z_ij = t * <x_i, y_j> + b`` (``t`` the exponentiated logit scale, ``b`` the learnable logit bias) and
    labels ``l_ij = 1`` for the matching pair ``i == j``, ``-1`` otherwise::

        loss = -1/B * sum_{i, j} log sigmoid(l_ij * z_ij)

    summed over all ``B * B`` pairs and divided by the batch size ``B``, as OpenCLIP's ``SigLipLoss`` normalises
    it (not a mean over the pairs). The bias is what lets the loss start sane: with ``B - 1`` negatives per
    positive, SigLIP models begin at ``b = -10`` so that most pairs already read as no-match.

    Under DDP (``world_size > 1``) rank ``r`` scores its own ``B`` images against the texts of every rank
    (``world_size * B`` texts, its own matches at offset ``r * B``), as OpenCLIP does: only text features
    travel. OpenCLIP passes them around the ring one neighbour at a time (``neighbour_exchange``); this loss
    gathers them in one all-gather (:class:`_GatherWithGrad`), whose backward returns to each rank the gradient
    that every rank's loss sends to its texts. The chosen exchange is simpler to get right, runs the same on gloo
    and NCCL, and holds the same ``B x world * B`` logits for backward as the ring does; it gives up only the ring's
    overlap of communication with compute. Each rank's gradient is then that of its share of the global loss,
    and DDP's averaging of the gradients gives exactly the gradient of the single-process loss over the global
    batch (whose value is the mean of the ranks' shares). So that every rank reports the same number as one
    process would, the returned value is that global loss (one scalar all-reduce); its gradient stays this
    rank's share. Every rank must hold the same batch size.

    Args:
        world_size: number of DDP processes; above 1, text features are gathered from every rank.
        rank: this process's rank.

    Raises:
        ValueError: ``world_size`` below 1 or ``rank`` outside ``[0, world_size)``.
    """

    def __init__(self, world_size: int = 1, rank: int = 0) -> None:
        super().__init__()
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank!r}, world_size={world_size}")
        self.world_size = world_size
        self.rank = rank

    def logits(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
    ) -> torch.Tensor:
        """Pair logits ``t * image @ text.T + b``, in float32: ``[images, texts]``."""
        return (logit_scale * image_features @ text_features.T).float() + logit_bias.float()

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
    ) -> torch.Tensor:
        """The sigmoid loss of this rank's batch (against the global batch's texts under DDP).

        Args:
            image_features: ``[batch, embed_dim]``, L2-normalised.
            text_features: ``[batch, embed_dim]``, L2-normalised; row ``i`` matches image row ``i``.
            logit_scale: one value, ``exp`` of the model's log temperature.
            logit_bias: one value, the model's ``logit_bias`` (added to every logit).

        Returns:
            A scalar loss tensor (float32).

        Raises:
            ValueError: features not ``[batch, dim]`` or of different shapes, an empty batch, a missing bias, or
                a scale or bias of more than one value.
        """
        if image_features.ndim != 2 or image_features.shape != text_features.shape:
            raise ValueError(
                "image and text features must both be [batch, embed_dim] of one shape, got "
                f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
            )
        if image_features.shape[0] == 0:
            raise ValueError("the batch is empty: SigLipLoss needs at least one image/text pair")
        if logit_bias is None:
            raise ValueError(
                "SigLipLoss needs the model's logit_bias, got None: the model has no learnable bias "
                "(OpenCLIP builds one with init_logit_bias, as the SigLIP family does); use ClipLoss for it"
            )
        for name, value in (("logit_scale", logit_scale), ("logit_bias", logit_bias)):
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{name} must be a tensor of one value, got {shape}")

        batch = image_features.shape[0]
        if self.world_size > 1:
            text_features = _GatherWithGrad.apply(text_features, self.world_size, self.rank)  # [world * batch, dim]
        logits = self.logits(image_features, text_features, logit_scale, logit_bias)  # [batch, world * batch]
        labels = torch.full_like(logits, -1.0)
        rows = torch.arange(batch, device=logits.device)
        labels[rows, rows + self.rank * batch] = 1.0
        loss = -F.logsigmoid(labels * logits).sum() / batch
        if self.world_size > 1:
            share = loss.detach()
            total = share.clone()
            dist.all_reduce(total)
            loss = loss + (total / self.world_size - share)  # the global loss's value, this rank's gradient
        return loss


def build_loss(cfg: Any, model: nn.Module, world_size: int = 1, rank: int = 0) -> nn.Module:
    """The loss ``cfg.loss`` names for ``model``.

    ``clip`` gives :class:`ClipLoss`, ``siglip`` :class:`SigLipLoss`, and ``auto`` what the model's family was
    pretrained with: SigLIP for a model with a learnable ``logit_bias`` (OpenCLIP builds one for the SigLIP
    family, ``init_logit_bias`` in its config), CLIP otherwise.

    Args:
        cfg: training options; only ``cfg.loss`` is read.
        model: the OpenCLIP model, or its ``DistributedDataParallel`` wrapper.
        world_size: number of DDP processes.
        rank: this process's rank.

    Raises:
        ValueError: an unknown loss name, or ``siglip`` for a model without a ``logit_bias``.
    """
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {cfg.loss!r}")
    inner = getattr(model, "module", model)
    has_bias = getattr(inner, "logit_bias", None) is not None
    name = ("siglip" if has_bias else "clip") if cfg.loss == "auto" else cfg.loss
    if name == "siglip" and not has_bias:
        raise ValueError(
            f"loss='siglip' needs a model with a learnable logit_bias, and {type(inner).__name__} has none "
            "(OpenCLIP builds one for the SigLIP family, from init_logit_bias in the model config); "
            "use loss='clip' or 'auto' for this model"
        )
    logger.info("contrastive loss: %s%s", name, " (auto)" if cfg.loss == "auto" else "")
    if name == "siglip":
        return SigLipLoss(world_size=world_size, rank=rank)
    return ClipLoss(world_size=world_size, rank=rank)
