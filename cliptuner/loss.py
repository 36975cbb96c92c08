"""CLIP contrastive loss: symmetric InfoNCE over a batch of matched image/text embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# OpenCLIP clamps the learnable temperature so that exp(logit_scale) <= 100.
MAX_LOGIT_SCALE = math.log(100.0)


def clamp_logit_scale(model: nn.Module) -> None:
    """Clamp ``model.logit_scale`` to ``[0, ln 100]`` in place, as OpenCLIP does after each step."""
    model = getattr(model, "module", model)
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


class ClipLoss(nn.Module):
    """Symmetric cross-entropy over image→text and text→image similarity logits.

    Row ``i`` of the image features and row ``i`` of the text features are a positive pair; every other row
    of the batch is a negative. The temperature is the model's learnable ``logit_scale`` (passed in already
    exponentiated).

    Args:
        label_smoothing: label smoothing of the cross-entropy (0 = plain InfoNCE).
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = label_smoothing

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor,
               logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarity logits ``(image→text [B, B], text→image [B, B])``."""
        logits_per_image = logit_scale * image_features @ text_features.T  # [batch, batch]
        return logits_per_image, logits_per_image.T

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        """Mean of the two cross-entropies.

        Args:
            image_features: ``[batch, embed_dim]``, L2-normalised.
            text_features: ``[batch, embed_dim]``, L2-normalised.
            logit_scale: scalar, ``exp`` of the model's log temperature.

        Returns:
            A scalar loss tensor.
        """
        if image_features.shape != text_features.shape:
            raise ValueError(f"image and text features differ in shape: {tuple(image_features.shape)} "
                             f"vs {tuple(text_features.shape)}")
        logits_per_image, logits_per_text = self.logits(image_features, text_features, logit_scale)
        labels = torch.arange(image_features.shape[0], device=image_features.device)
        return (F.cross_entropy(logits_per_image.float(), labels, label_smoothing=self.label_smoothing)
                + F.cross_entropy(logits_per_text.float(), labels, label_smoothing=self.label_smoothing)) / 2
