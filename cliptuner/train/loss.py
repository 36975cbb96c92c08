"""CLIP contrastive loss: symmetric InfoNCE over a batch of matched image/text embeddings.

Under DDP the loss gathers the features of every rank, so the negatives are the global batch. The gathered
copies carry no gradient; the local shard keeps its own, scaled by the world size so that DDP's gradient
averaging yields exactly the gradient of the global-batch loss (each rank holds the whole loss, and its own
shard's gradient of it; see :class:`_ScaleGrad`). A two-process run therefore matches one process on the same
global batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

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


def build_loss(cfg: Any, model: nn.Module, world_size: int = 1, rank: int = 0) -> nn.Module:
    """The loss ``cfg.loss`` names for ``model`` (``auto``: what its family was pretrained with).

    Raises:
        ValueError: an unknown loss name.
    """
    if cfg.loss not in ("auto", "clip"):
        raise ValueError(f"loss must be one of ['auto', 'clip', 'siglip'], got {cfg.loss!r}")
    return ClipLoss(world_size=world_size, rank=rank)
