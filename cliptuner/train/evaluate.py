"""Retrieval evaluation with CLIP_benchmark's protocol.

* text→image recall@k: a caption hits when its own image is among the k images most similar to it;
* image→text recall@k: an image hits when any of its captions is among the k captions most similar to it.

Ties count against the model (a negative scoring exactly as high as the positive ranks above it), so a
collapsed model whose embeddings are all equal scores zero instead of a perfect recall. Non-finite embeddings
(a broken model) are refused with an error rather than scored: every comparison with NaN is false, so nothing
would outrank the positive and recall would read 100 %. A cut-off ``k`` at least as large as the number of
candidates gives recall 1.0 by construction; :func:`trivial_cutoffs` names such metrics so reports flag them
(CLIP_benchmark refuses them outright).

:func:`retrieval_metrics` works on plain arrays, so the same numbers come out of the torch model
(:func:`embed_with_torch`) and of an exported ONNX model (:func:`embed_with_onnx`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from cliptuner.model.images import DEFAULT_LIMITS, ImageLimits, decode_image

if TYPE_CHECKING:  # pragma: no cover
    from cliptuner.model.runtime import OnnxClip
    from cliptuner.train.data import PairSet
    from cliptuner.train.models import ClipBundle

logger = logging.getLogger(__name__)

METRIC_KEYS = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10")


def _hits(scores: np.ndarray, positive: np.ndarray, ks: Sequence[int]) -> dict[int, np.ndarray]:
    """For each query row, whether a positive is within the top k (ties and NaN scores against the positive)."""
    best_positive = np.where(positive, scores, -np.inf).max(axis=1, keepdims=True)  # [queries, 1]
    scorable = np.isfinite(best_positive[:, 0])  # a NaN positive is a miss, never a hit
    outranking = (((scores >= best_positive) | np.isnan(scores)) & ~positive).sum(axis=1)  # negatives at or above it
    return {k: (outranking < k) & scorable for k in ks}


def check_finite(embeddings: np.ndarray, what: str) -> None:
    """Refuse embeddings that hold NaN or inf, naming how many rows do.

    Raises:
        ValueError: some rows are not finite (the model is broken: it would otherwise score a perfect recall).
    """
    bad = ~np.isfinite(embeddings).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"{int(bad.sum())} of {len(embeddings)} {what} embeddings are not finite (NaN or inf; "
            f"first rows {rows[:5].tolist()}): the model is broken, its recall cannot be measured"
        )


def trivial_cutoffs(num_images: int, num_texts: int, ks: Sequence[int]) -> list[str]:
    """Metrics whose recall is 1.0 by construction: ``k`` at least the number of candidates.

    Text→image ranks ``num_images`` candidates, image→text ``num_texts``.
    """
    return [f"t2i_r{k}" for k in ks if k >= num_images] + [f"i2t_r{k}" for k in ks if k >= num_texts]


def retrieval_metrics(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    image_index: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """Recall@k in both directions.

    Args:
        image_embeddings: ``[num_images, dim]``, L2-normalised.
        text_embeddings: ``[num_texts, dim]``, L2-normalised.
        image_index: for each text, the row of its image in ``image_embeddings``.
        ks: cut-offs.
        chunk: query rows scored at once (bounds memory for large sets).

    Returns:
        ``{"t2i_r1": ..., "i2t_r1": ..., ..., "mean_recall": ...}`` with values in [0, 1].

    Raises:
        ValueError: mismatched sizes, an empty set, or non-finite embeddings (see :func:`check_finite`).
    """
    image_index = np.asarray(image_index, dtype=np.int64)
    num_images, num_texts = len(image_embeddings), len(text_embeddings)
    if num_texts != len(image_index):
        raise ValueError(f"{num_texts} text embeddings but {len(image_index)} image indices")
    if num_images == 0 or num_texts == 0:
        raise ValueError("retrieval metrics need at least one image and one text")
    if image_index.min() < 0 or image_index.max() >= num_images:
        raise ValueError(f"image_index must lie in [0, {num_images}), got [{image_index.min()}, {image_index.max()}]")
    image_embeddings = np.asarray(image_embeddings, dtype=np.float32)
    text_embeddings = np.asarray(text_embeddings, dtype=np.float32)
    check_finite(image_embeddings, "image")
    check_finite(text_embeddings, "text")
    trivial = trivial_cutoffs(num_images, num_texts, ks)
    if trivial:
        logger.warning(
            "recall %s is 1.0 by construction: %d images and %d texts are no more than k candidates",
            trivial,
            num_images,
            num_texts,
        )

    t2i = {k: [] for k in ks}
    for start in range(0, num_texts, chunk):
        scores = text_embeddings[start : start + chunk] @ image_embeddings.T  # [chunk, num_images]
        positive = np.zeros_like(scores, dtype=bool)
        positive[np.arange(len(scores)), image_index[start : start + chunk]] = True
        for k, hit in _hits(scores, positive, ks).items():
            t2i[k].append(hit)
    i2t = {k: [] for k in ks}
    for start in range(0, num_images, chunk):
        rows = np.arange(start, min(start + chunk, num_images))
        scores = image_embeddings[rows] @ text_embeddings.T  # [chunk, num_texts]
        positive = image_index[None, :] == rows[:, None]
        has_caption = positive.any(axis=1)
        for k, hit in _hits(scores, positive, ks).items():
            i2t[k].append(hit[has_caption])

    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"t2i_r{k}"] = float(np.concatenate(t2i[k]).mean())
    for k in ks:
        metrics[f"i2t_r{k}"] = float(np.concatenate(i2t[k]).mean())
    metrics["mean_recall"] = float(np.mean([metrics[f"t2i_r{k}"] for k in ks] + [metrics[f"i2t_r{k}"] for k in ks]))
    return metrics


def embed_with_torch(
    bundle: ClipBundle, pairs: PairSet, batch_size: int = 128, limits: ImageLimits = DEFAULT_LIMITS
) -> tuple[np.ndarray, np.ndarray]:
    """Embed the distinct images and all captions of ``pairs`` with the torch model (eval transforms).

    Returns:
        ``(image_embeddings [num_images, dim], text_embeddings [num_pairs, dim])``, L2-normalised float32.
    """
    import torch

    model = getattr(bundle.model, "module", bundle.model)
    was_training = model.training
    model.eval()
    device = bundle.device
    image_chunks, text_chunks = [], []
    try:
        with torch.no_grad():
            for start in range(0, pairs.num_images, batch_size):
                batch = [
                    bundle.preprocess_val(decode_image(img, limits, name=pairs.image_ids[start + i]))
                    for i, img in enumerate(pairs.images[start : start + batch_size])
                ]
                pixels = torch.stack(batch).to(device)  # [batch, 3, H, W]
                image_chunks.append(model.encode_image(pixels, normalize=True).float().cpu().numpy())
            for start in range(0, len(pairs.captions), batch_size):
                ids = bundle.tokenizer(list(pairs.captions[start : start + batch_size])).to(device)  # [batch, ctx]
                text_chunks.append(model.encode_text(ids, normalize=True).float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(image_chunks), np.concatenate(text_chunks)


def embed_with_onnx(clip: OnnxClip, pairs: PairSet) -> tuple[np.ndarray, np.ndarray]:
    """Embed the distinct images and all captions of ``pairs`` with an exported ONNX model."""
    images = clip.encode_images(list(pairs.images), names=list(pairs.image_ids))
    texts = clip.encode_text(list(pairs.captions))
    return images, texts


def evaluate(
    bundle: ClipBundle, pairs: PairSet, ks: Sequence[int] = (1, 5, 10), batch_size: int = 128
) -> dict[str, float]:
    """Recall@k of the torch model on ``pairs``."""
    image_emb, text_emb = embed_with_torch(bundle, pairs, batch_size)
    return retrieval_metrics(image_emb, text_emb, pairs.image_index, ks)


def evaluate_onnx(clip: OnnxClip, pairs: PairSet, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k of an exported ONNX model on ``pairs``."""
    image_emb, text_emb = embed_with_onnx(clip, pairs)
    return retrieval_metrics(image_emb, text_emb, pairs.image_index, ks)


def format_report(
    before: dict[str, float], after: dict[str, float] | None = None, trivial: Sequence[str] = (), label: str = "before"
) -> str:
    """A small table of recall@k in percent: one column (``label``), or before/after/change.

    Metrics named in ``trivial`` (see :func:`trivial_cutoffs`) are marked, and a note under the table says why.
    """
    keys = [k for k in METRIC_KEYS if k in before] + (["mean_recall"] if "mean_recall" in before else [])
    lines = [f"{'metric':<12}{label:>9}" + (f"{'after':>9}{'change':>9}" if after else "")]
    for key in keys:
        line = f"{key:<12}{100 * before[key]:>8.1f}%"
        if after:
            line += f"{100 * after[key]:>8.1f}%{100 * (after[key] - before[key]):>+8.1f}"
        if key in trivial or (key == "mean_recall" and trivial):
            line += "  *"
        lines.append(line)
    if trivial:
        lines.append(
            f"* trivial: {', '.join(trivial)} rank no more than k candidates, so they are 1.0 by "
            "construction (mean_recall includes them); use a larger held-out set"
        )
    return "\n".join(lines)
