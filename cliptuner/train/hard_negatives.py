"""Hard-negative batches: each training batch gathers pairs that the base model confuses with each other.

The contrastive loss learns only from the negatives that share a batch, and in random batches most of them are
easy (a caption about a striped star against an image of two dotted rings). As sentence-transformers'
``mine_hard_negatives`` does for text, this module asks the model to be fine-tuned, with its base weights, which
pairs it confuses, and builds the batches from them (``TrainConfig.hard_negatives``):

1. **Embedding**, once, before training: the distinct images and every caption with the base model (eval
   transforms, eval mode, no gradient, batched: :func:`cliptuner.train.evaluate.embed_with_torch`).
2. **Mining** (:func:`mine_neighbours`): how hard a negative pair ``j`` is for pair ``i`` is a score in one of
   four spaces (``HardNegativeOptions.space``, :data:`SPACES`):

   - ``"cross"`` (the default): across the modalities, as the loss sees them:
     ``max(cos(caption_i, image_j), cos(image_i, caption_j))`` (caption ``i`` would retrieve image ``j``, or
     image ``i`` caption ``j``). It means something only where the base model already matches captions to
     images; a base at chance on the domain finds "neighbours" that share nothing with the pair.
   - ``"image"``: ``cos(image_i, image_j)``: pairs whose images look alike to the base (colours, layouts),
     which an image encoder can tell before it has learnt the domain's words. Every pair of one image scores
     the same, so a pair's ``k`` neighbours cover ``k / captions per image`` images; the batches reach further
     through the neighbours' own neighbours.
   - ``"text"``: ``cos(caption_i, caption_j)``: pairs whose captions read alike.
   - ``"both"``: the mean of the two, ``(cos(image_i, image_j) + cos(caption_i, caption_j)) / 2``: pairs alike
     in both modalities, hard for both directions of the loss. The mean, not the max: the two cosines can
     live on different scales (one tower's cosines all higher than the other's), and a constant offset
     between them changes no ranking of the mean, while the max would then be that tower's list alone.

   Every score is symmetric in ``i`` and ``j``. Each pair keeps its ``neighbours`` best-scoring other pairs,
   found by a top-k over chunks of rows, so memory stays ``chunk × pairs`` scores (50k pairs of 25k images:
   about 50 s on one CPU thread in the cross space, the time grows with the square of the pairs).
   Never a neighbour, because it would be a false negative (a positive the loss pushes away): a pair of the same
   image; a pair whose caption is the same text (after case and whitespace folding); and, with
   ``relative_margin`` (sentence-transformers' option of that name), a pair that scores within that margin of
   pair ``i``'s own score or above it (``score > pos - relative_margin * |pos|``). ``pos`` is pair ``i``
   scored against itself in the same space: ``cos(caption_i, image_i)`` in the cross space (a candidate the
   model already ranks near the true match), ``1`` in the others (``cos(x, x)`` of a unit vector), where the
   margin rules out near-duplicates: an image or a caption (or both, on average) with a cosine above
   ``1 - relative_margin`` to pair ``i``'s own.
3. **Batches** (:class:`HardNegativeBatchSampler`), each epoch anew (seeded by ``(seed, epoch)``): a batch starts
   at a seed pair drawn at random among the images with the most pairs left in the epoch, and fills up from the
   seed's hardest neighbours, then theirs (breadth first, hardest first); a neighbour already used this epoch
   is passed through (its own neighbours are looked at, up to a budget per batch) but not taken again. When no
   neighbour fits, a new seed starts inside the same batch. The score is symmetric, so the lists are made
   symmetric too (a pair that lists ``i`` is ``i``'s neighbour as well): a pair that is in no one's top-k is
   still reached from its own neighbours, not only as a seed. No batch holds two pairs of one image or two
   pairs with the same caption text, and each pair is used at most once per epoch. Pairs left at the end that
   clash with each other are swapped into full batches against pairs that fit, so that an epoch has as many
   full batches as the pairs allow (as :class:`~cliptuner.train.data.UniqueImageBatchSampler`'s do).

Neighbours are mined once, with the base weights, and not again during training: "hard" means what the model
confused before it was tuned; mining once keeps the cost at one extra pass over the training pairs; and the
batches of epoch ``k`` depend only on the base model, the pairs and ``(seed, k)``, so a resumed run gets the
same batches. Under DDP rank 0 embeds and mines and sends the neighbour table to the other ranks, so that every
rank plans the same global batches (embeddings computed on every rank could differ in their last bits and flip
a tie); each rank then takes its contiguous slice of every global batch, as the other samplers do.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from cliptuner.train.data import (
    NO_GROUP,
    PairDataset,
    PairSet,
    _check_global_batch,
    _check_sampling,
    _EpochPlanned,
    collate_pairs,
)

if TYPE_CHECKING:  # pragma: no cover
    from cliptuner.config import TrainConfig
    from cliptuner.train.models import ClipBundle

logger = logging.getLogger(__name__)

NO_NEIGHBOUR = -1  # a row of the neighbour table shorter than ``neighbours`` is padded with this
SPACES = ("cross", "image", "text", "both")  # where neighbours are mined (see the module docstring)
EmbedFn = Callable[[PairSet], tuple[np.ndarray, np.ndarray]]  # pairs → (images [I, d], captions [P, d]), L2-normed


@dataclass(frozen=True)
class HardNegativeOptions:
    """How neighbours are mined and batches are filled."""

    neighbours: int = 32  # neighbours kept per pair (the top-k of the mining)
    space: str = "cross"  # where pairs are scored: cross (caption vs image), image, text, both (mean of the two)
    relative_margin: Optional[float] = None  # skip candidates scoring above pos - margin * |pos|; None: keep all
    expand_per_batch: int = 4  # × the batch size: neighbours already used that a batch may look through
    embed_batch_size: int = 128  # images or captions embedded at once
    chunk: int = 512  # pairs whose scores against all pairs are held at once while mining

    def __post_init__(self) -> None:
        for name in ("neighbours", "embed_batch_size", "chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.expand_per_batch, bool) or not isinstance(self.expand_per_batch, int):
            raise ValueError(f"expand_per_batch must be an integer >= 0, got {self.expand_per_batch!r}")
        if self.expand_per_batch < 0:
            raise ValueError(f"expand_per_batch must be an integer >= 0, got {self.expand_per_batch!r}")
        if self.relative_margin is not None and not 0 <= self.relative_margin < 1:
            raise ValueError(f"relative_margin must be in [0, 1) or None, got {self.relative_margin!r}")
        _check_space(self.space)


def _check_space(space: object) -> None:
    if space not in SPACES:
        raise ValueError(f"space must be one of {list(SPACES)}, got {space!r}")


DEFAULT_OPTIONS = HardNegativeOptions()


def caption_ids(captions: Sequence[str]) -> np.ndarray:
    """One id per caption, equal for captions with the same text after case and whitespace folding."""
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(" ".join(c.split()).casefold(), len(ids)) for c in captions], dtype=np.int64)


@dataclass
class MinedNeighbours:
    """The neighbour table of :func:`mine_neighbours`."""

    pairs: np.ndarray  # [num_pairs, k] int64: neighbours of each pair, hardest first; NO_NEIGHBOUR pads
    scores: np.ndarray  # [num_pairs, k] float32: their scores; NaN where NO_NEIGHBOUR
    positive: np.ndarray  # [num_pairs] float32: pair i against itself in the space (cross: cos(caption_i, image_i))
    dropped_by_margin: int  # candidates (pair, other pair) the relative margin ruled out


def mine_neighbours(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    image_index: Sequence[int],
    k: int = DEFAULT_OPTIONS.neighbours,
    relative_margin: Optional[float] = None,
    captions: Optional[np.ndarray] = None,
    chunk: int = DEFAULT_OPTIONS.chunk,
    device: str | torch.device = "cpu",
    space: str = DEFAULT_OPTIONS.space,
) -> MinedNeighbours:
    """For each pair, the ``k`` other pairs that score highest against it in ``space`` (see the module docstring).

    Args:
        image_embeddings: ``[num_images, dim]``, L2-normalised.
        text_embeddings: ``[num_pairs, dim]``, L2-normalised, one per pair.
        image_index: for each pair, its row in ``image_embeddings``.
        k: neighbours per pair (fewer when fewer candidates are left).
        relative_margin: rule out candidates scoring above ``pos - relative_margin * |pos|`` (``pos``: the pair
            against itself in ``space``); None: keep them.
        captions: caption ids (:func:`caption_ids`): pairs with the same id are never neighbours; None: no rule.
        chunk: rows scored at once (memory: about ``3 * chunk * num_pairs`` floats).
        device: where the scores are computed.
        space: ``"cross"``, ``"image"``, ``"text"`` or ``"both"`` (:data:`SPACES`).

    Returns:
        The neighbour table.

    Raises:
        ValueError: sizes disagree, an index is out of range, an embedding is not finite, ``k``/``chunk`` < 1,
            or an unknown space.
    """
    _check_space(space)
    image_index = np.asarray(image_index, dtype=np.int64)
    images = np.asarray(image_embeddings, dtype=np.float32)
    texts = np.asarray(text_embeddings, dtype=np.float32)
    num_pairs = len(image_index)
    if k < 1 or chunk < 1:
        raise ValueError(f"k and chunk must be >= 1, got k={k}, chunk={chunk}")
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1]:
        raise ValueError(f"embeddings must be [n, dim] with one dim, got {images.shape} and {texts.shape}")
    if len(texts) != num_pairs:
        raise ValueError(f"{len(texts)} caption embeddings but {num_pairs} pairs")
    if num_pairs and (image_index.min() < 0 or image_index.max() >= len(images)):
        raise ValueError(f"image_index must lie in [0, {len(images)}), got [{image_index.min()}, {image_index.max()}]")
    if not (np.isfinite(images).all() and np.isfinite(texts).all()):
        raise ValueError("embeddings hold NaN or inf: the base model is broken, no neighbour can be mined")
    if captions is not None and len(captions) != num_pairs:
        raise ValueError(f"{len(captions)} caption ids but {num_pairs} pairs")
    k = min(k, max(num_pairs - 1, 1))

    dev = torch.device(device)
    img = torch.from_numpy(images).to(dev)  # [num_images, dim]
    txt = torch.from_numpy(texts).to(dev)  # [num_pairs, dim]
    index = torch.from_numpy(image_index).to(dev)  # [num_pairs]
    caption = torch.from_numpy(np.asarray(captions, dtype=np.int64)).to(dev) if captions is not None else None
    out_pairs = np.full((num_pairs, k), NO_NEIGHBOUR, dtype=np.int64)
    out_scores = np.full((num_pairs, k), np.nan, dtype=np.float32)
    positive = np.empty(num_pairs, dtype=np.float32)
    dropped = 0
    with torch.no_grad():
        for start in range(0, num_pairs, chunk):
            rows = torch.arange(start, min(start + chunk, num_pairs), device=dev)
            scores, pos = _scores(space, img, txt, index, rows)  # [c, num_pairs], [c, 1]
            never = index[None, :] == index[rows, None]  # the same image (the pair itself included)
            if caption is not None:
                never |= caption[None, :] == caption[rows, None]  # the same caption text
            if relative_margin is not None:
                too_close = (scores > pos - relative_margin * pos.abs()) & ~never
                dropped += int(too_close.sum())
                never |= too_close
            scores = scores.masked_fill(never, float("-inf"))
            top, which = torch.topk(scores, k, dim=1)  # [c, k], hardest first
            valid = torch.isfinite(top)
            out_pairs[start : start + len(rows)] = torch.where(valid, which, NO_NEIGHBOUR).cpu().numpy()
            out_scores[start : start + len(rows)] = torch.where(valid, top, float("nan")).cpu().numpy()
            positive[start : start + len(rows)] = pos[:, 0].cpu().numpy()
    return MinedNeighbours(out_pairs, out_scores, positive, dropped)


def _scores(
    space: str, img: torch.Tensor, txt: torch.Tensor, index: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores of the pairs ``rows`` against every pair in ``space``, ``[c, num_pairs]``, and of each of them
    against itself, ``[c, 1]`` (the reference of the relative margin)."""
    if space == "cross":
        t2i = txt[rows] @ img.T  # [c, num_images]: caption i against every image
        i2t = img[index[rows]] @ txt.T  # [c, num_pairs]: image i against every caption
        return torch.maximum(t2i[:, index], i2t), t2i.gather(1, index[rows, None])
    if space in ("image", "both"):
        i2i = img[index[rows]] @ img.T  # [c, num_images]: image i against every image
        image_scores, image_self = i2i[:, index], i2i.gather(1, index[rows, None])
        if space == "image":
            return image_scores, image_self
    t2t = txt[rows] @ txt.T  # [c, num_pairs]: caption i against every caption
    text_scores, text_self = t2t, t2t.gather(1, rows[:, None])
    if space == "text":
        return text_scores, text_self
    return (image_scores + text_scores) / 2, (image_self + text_self) / 2


def _both_ways(table: np.ndarray) -> list[list[int]]:
    """Each pair's neighbours and the pairs that list it as theirs, by rank (a neighbour at rank ``r`` of either
    list comes at ``r``; ties by pair index), at most ``2 * k`` per pair.

    The score is symmetric, so a pair that lists ``i`` is as hard for ``i`` as ``i`` is for it; without these
    reverse links a pair that is nobody's top-k could be reached only as a seed.
    """
    num_pairs, k = table.shape
    rows, ranks = np.nonzero(table != NO_NEIGHBOUR)
    others = table[rows, ranks]
    src = np.concatenate([rows, others])
    dst = np.concatenate([others, rows])
    rank = np.concatenate([ranks, ranks])
    order = np.lexsort((dst, rank, src))  # by pair, then rank, then neighbour
    _, first = np.unique(src[order] * num_pairs + dst[order], return_index=True)
    keep = order[np.sort(first)]  # each (pair, neighbour) once, at its best rank, still in that order
    src, dst = src[keep], dst[keep]
    starts = np.searchsorted(src, np.arange(num_pairs + 1))
    return [dst[starts[i] : min(starts[i + 1], starts[i] + 2 * k)].tolist() for i in range(num_pairs)]


class HardNegativeBatchSampler(_EpochPlanned):
    """Batches of pair indices built from neighbours (a ``torch`` batch sampler by protocol).

    Each epoch (seeded by ``(seed, epoch)``) a batch starts at a seed pair, chosen at random among the images
    with the most pairs left in the epoch (so that an image with many captions is spread over many batches), and
    takes the seed's neighbours, then their neighbours, breadth first; a neighbour already used this epoch, or
    one that clashes with the batch, is not taken but its neighbours are looked at, for up to
    ``expand_per_batch * batch_size * num_replicas`` such pairs per batch. When nothing reachable fits, a new
    seed starts inside the batch. No batch holds two pairs of one image, nor (with ``caption_ids``) two pairs
    with one caption text; each pair is used at most once per epoch. The partial batches left at the end (pairs
    that clash with each other) are completed from each other by swaps with full batches (see ``_complete``).

    Full batches come in random order, their pairs shuffled. ``drop_last=True`` yields the full batches only; the
    partial ones (at the end of the epoch, when the pairs left clash with each other) are left out, and with
    ``drop_last=False`` they follow, largest first. Unless a few images hold most captions, every pair but fewer
    than one global batch is used each epoch. The number of batches may differ slightly between epochs: ``len()``
    gives that of the epoch set by :meth:`set_epoch`.

    With ``num_replicas > 1`` each global batch of ``batch_size * num_replicas`` pairs is cut into contiguous
    slices and rank ``r`` yields slice ``r``; all ranks yield the same number of batches (give every rank the
    same neighbour table).

    Args:
        image_index: pair → image id (``PairSet.image_index``).
        neighbours: ``[num_pairs, k]`` neighbour table, hardest first, :data:`NO_NEIGHBOUR` padding
            (:attr:`MinedNeighbours.pairs`).
        batch_size: pairs per batch on this rank.
        seed: base seed; call :meth:`set_epoch` each epoch for a new order.
        drop_last: only full batches (required when ``num_replicas > 1``).
        num_replicas: number of DDP ranks.
        rank: this rank.
        caption_ids: pair → caption id (:func:`caption_ids`); pairs with one id never share a batch. None: no rule.
        expand_per_batch: see above.

    Raises:
        ValueError: no pairs, a neighbour table of another shape or with an index out of range,
            ``batch_size * num_replicas`` larger than the number of distinct images, bad rank, or
            ``drop_last=False`` with several replicas.
    """

    def __init__(
        self,
        image_index: Sequence[int],
        neighbours: np.ndarray,
        batch_size: int,
        seed: int = 0,
        drop_last: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        caption_ids: Optional[Sequence[int]] = None,
        expand_per_batch: int = DEFAULT_OPTIONS.expand_per_batch,
    ) -> None:
        _check_sampling(batch_size, seed, drop_last, num_replicas, rank)
        self._image = np.asarray(image_index, dtype=np.int64)
        num_pairs = len(self._image)
        if num_pairs == 0:
            raise ValueError("no pairs to sample")
        table = np.asarray(neighbours, dtype=np.int64)
        if table.ndim != 2 or len(table) != num_pairs:
            raise ValueError(f"neighbours must be a [{num_pairs}, k] table, got shape {table.shape}")
        if table.size and (table.min() < NO_NEIGHBOUR or table.max() >= num_pairs):
            raise ValueError(f"neighbours must be pair indices in [0, {num_pairs}) or {NO_NEIGHBOUR}")
        self._caption = np.asarray(caption_ids, dtype=np.int64) if caption_ids is not None else np.arange(num_pairs)
        if len(self._caption) != num_pairs:
            raise ValueError(f"{len(self._caption)} caption ids but {num_pairs} pairs")
        if expand_per_batch < 0:
            raise ValueError(f"expand_per_batch must be >= 0, got {expand_per_batch}")
        self.global_batch = _check_global_batch(batch_size, num_replicas, len(np.unique(self._image)))
        self._neighbours = _both_ways(table)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.expand_limit = expand_per_batch * self.global_batch
        self.epoch = 0
        self._plan_epoch: Optional[int] = None
        self._plan: list[list[int]] = []

    def __len__(self) -> int:
        return len(self._global_batches())

    def _make_plan(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng((self.seed, epoch))
        batches = _EpochFiller(
            self._image, self._caption, self._neighbours, self.global_batch, self.expand_limit, rng
        ).batches(rng)
        return self._in_order(batches, self.global_batch, self.drop_last, rng)


class _EpochFiller:
    """Fills the batches of one epoch by the rule of :class:`HardNegativeBatchSampler`.

    Seeds come from a heap keyed by ``(-pairs left of the image, a random rank of the image)``; an entry whose
    count is out of date is skipped when popped (a fresh one was pushed when the count changed), and entries
    of images the batch cannot take are set aside until the batch is done.
    """

    def __init__(
        self,
        image: np.ndarray,
        caption: np.ndarray,
        neighbours: list[list[int]],
        size: int,
        expand_limit: int,
        rng: np.random.Generator,
    ) -> None:
        self.image = image.tolist()
        self.caption = caption.tolist()
        self.neighbours = neighbours
        self.size = size
        self.expand_limit = expand_limit
        self.used = [False] * len(self.image)
        self.left = len(self.image)
        order = rng.permutation(len(self.image)).tolist()  # each image's pairs, in a random order
        self.unused_of: dict[int, deque[int]] = {}
        for pair in order:
            self.unused_of.setdefault(self.image[pair], deque()).append(pair)
        self.remaining = {image: len(pairs) for image, pairs in self.unused_of.items()}
        tie = rng.permutation(len(self.remaining)).tolist()
        self.rank_of = {image: int(t) for image, t in zip(self.remaining, tie)}
        self.heap = [(-n, self.rank_of[image], image) for image, n in self.remaining.items()]
        heapq.heapify(self.heap)

    def batches(self, rng: np.random.Generator) -> list[list[int]]:
        """The epoch's batches: filled from neighbours, then the partial ones completed by swaps."""
        out = []
        while self.left:
            out.append(self._fill())
        return _complete(out, self.image, self.caption, self.size, rng)

    def _fill(self) -> list[int]:
        batch: list[int] = []
        images: set[int] = set()
        captions: set[int] = set()
        frontier: deque[int] = deque()
        seen: set[int] = set()
        looked_through = 0
        set_aside: list[tuple[int, int, int]] = []
        while len(batch) < self.size:
            pair = None
            while frontier:
                candidate = frontier.popleft()
                if candidate in seen:
                    continue
                seen.add(candidate)
                if self._fits(candidate, images, captions):
                    pair = candidate
                    break
                if looked_through < self.expand_limit:  # used or clashing: look at its neighbours instead
                    looked_through += 1
                    frontier.extend(self.neighbours[candidate])
            if pair is None:
                pair = self._seed(images, captions, set_aside)
                if pair is None:
                    break  # nothing left fits this batch
                seen.add(pair)
            self._take(pair)
            batch.append(pair)
            images.add(self.image[pair])
            captions.add(self.caption[pair])
            frontier.extend(self.neighbours[pair])
        for entry in set_aside:
            heapq.heappush(self.heap, entry)
        return batch

    def _fits(self, pair: int, images: set[int], captions: set[int]) -> bool:
        return not self.used[pair] and self.image[pair] not in images and self.caption[pair] not in captions

    def _seed(self, images: set[int], captions: set[int], set_aside: list[tuple[int, int, int]]) -> Optional[int]:
        """An unused pair of the image with the most pairs left that the batch can take; None when none can."""
        while self.heap:
            entry = heapq.heappop(self.heap)
            count, _, image = entry
            if -count != self.remaining[image]:
                continue  # out of date: a fresh entry was pushed when the count changed (none when it reached 0)
            if image not in images:
                unused = self.unused_of[image]
                while self.used[unused[0]]:  # pairs taken as neighbours leave lazily
                    unused.popleft()
                for pair in unused:
                    if not self.used[pair] and self.caption[pair] not in captions:
                        return pair
            set_aside.append(entry)
        return None

    def _take(self, pair: int) -> None:
        self.used[pair] = True
        self.left -= 1
        image = self.image[pair]
        self.remaining[image] -= 1
        if self.remaining[image]:
            heapq.heappush(self.heap, (-self.remaining[image], self.rank_of[image], image))


def _complete(
    batches: list[list[int]], image: list[int], caption: list[int], size: int, rng: np.random.Generator
) -> list[list[int]]:
    """Complete partial batches with the pairs of the other partial ones, so that an epoch loses no full batch.

    Batches filled one after another can end with pairs that clash with each other (two captions of one image
    left for the last batch). A pair ``u`` of a smaller partial batch joins the largest one (the target) when it
    fits; otherwise it swaps into a full batch (taken in random order) that lacks its image and caption, against
    a pair of that batch that fits the target. Repeats while two partial batches hold at least ``size`` pairs
    together and a swap succeeds.
    """
    full = [b for b in batches if len(b) == size]
    partial = sorted((b for b in batches if len(b) < size), key=len, reverse=True)
    if len(partial) < 2 or not full:
        return batches
    full_images = [{image[p] for p in b} for b in full]
    full_captions = [{caption[p] for p in b} for b in full]
    order = rng.permutation(len(full)).tolist()
    while len(partial) >= 2 and sum(len(b) for b in partial) >= size:
        target, donors = partial[0], partial[1:]
        images, captions = {image[p] for p in target}, {caption[p] for p in target}
        moved = 0
        for donor in donors:
            for u in list(donor):
                if len(target) == size:
                    break
                joining = u
                if image[u] in images or caption[u] in captions:
                    joining = None
                    for f in order:
                        if image[u] in full_images[f] or caption[u] in full_captions[f]:
                            continue
                        q = next((q for q in full[f] if image[q] not in images and caption[q] not in captions), None)
                        if q is None:
                            continue
                        full[f][full[f].index(q)] = u
                        full_images[f].symmetric_difference_update({image[q], image[u]})
                        full_captions[f].symmetric_difference_update({caption[q], caption[u]})
                        joining = q
                        break
                    if joining is None:
                        continue
                donor.remove(u)
                target.append(joining)
                images.add(image[joining])
                captions.add(caption[joining])
                moved += 1
        if len(target) == size:
            full.append(target)
            full_images.append(images)
            full_captions.append(captions)
            order.append(len(full) - 1)
        partial = sorted((b for b in partial if b and len(b) < size), key=len, reverse=True)
        if not moved:
            break
    return full + partial


def _from_rank_zero(table: Optional[np.ndarray], world_size: int, device: torch.device) -> np.ndarray:
    """Rank 0's neighbour table on every rank."""
    if world_size == 1:
        assert table is not None
        return table
    box = [table]
    torch.distributed.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def hard_negative_loader(
    bundle: ClipBundle,
    pairs: Any,
    cfg: TrainConfig,
    world_size: int = 1,
    rank: int = 0,
    options: Optional[HardNegativeOptions] = None,
    embed: Optional[EmbedFn] = None,
) -> torch.utils.data.DataLoader:
    """The training loader of ``TrainConfig.hard_negatives``: batches from the base model's neighbours.

    Args:
        bundle: the model with its base weights (embedded before training; not changed).
        pairs: the training :class:`~cliptuner.train.data.PairSet` (held in memory: every pair is embedded).
        cfg: training options (``batch_size * accum_steps`` pairs per rank and step, ``seed``, ``num_workers``).
        world_size: DDP ranks.
        rank: this rank (rank 0 embeds and mines; the others receive its table).
        options: mining and filling options (``space``: where neighbours are mined); default
            :data:`DEFAULT_OPTIONS` (the cross space).
        embed: pairs → ``(image embeddings [num_images, d], caption embeddings [num_pairs, d])``, L2-normalised;
            default: the bundle's model (:func:`~cliptuner.train.evaluate.embed_with_torch`).

    Returns:
        A DataLoader of ``(images [B,3,H,W], texts [B,ctx], image_index [B])`` with a
        :class:`HardNegativeBatchSampler` (``loader.batch_sampler.set_epoch`` each epoch).

    Raises:
        ValueError: the pairs are not a PairSet, some pairs are in batch groups, or see the sampler.
    """
    if not isinstance(pairs, PairSet):
        raise ValueError(
            f"hard_negatives needs the training pairs held in memory (a PairSet), got {type(pairs).__name__}: "
            "streamed data cannot be mined"
        )
    if pairs.groups is not None and any(group != NO_GROUP for group in pairs.groups):
        raise ValueError(
            "hard_negatives cannot be combined with batch groups (pairs from search feedback carry their own "
            "hard negatives); train them with hard_negatives=false"
        )
    options = options or DEFAULT_OPTIONS
    batch_size = cfg.batch_size * cfg.accum_steps
    _check_sampling(batch_size, cfg.seed, True, world_size, rank)
    _check_global_batch(batch_size, world_size, len(set(pairs.image_index)))
    captions = caption_ids(pairs.captions)
    table = None
    if rank == 0:
        started = time.perf_counter()
        if embed is None:
            from cliptuner.train.evaluate import embed_with_torch

            image_emb, text_emb = embed_with_torch(bundle, pairs, options.embed_batch_size)
        else:
            image_emb, text_emb = embed(pairs)
        mined = mine_neighbours(
            image_emb,
            text_emb,
            pairs.image_index,
            options.neighbours,
            options.relative_margin,
            captions,
            options.chunk,
            device=bundle.device,
            space=options.space,
        )
        table = mined.pairs
        kept = table != NO_NEIGHBOUR
        logger.info(
            "hard negatives: %s space, %.1f neighbours kept per pair on average (of %d) for %d pairs in %.1f s; "
            "mean score %.3f vs %.3f for the pairs against themselves; %d candidates ruled out by the relative margin",
            options.space,
            kept.sum(axis=1).mean(),
            table.shape[1],
            len(pairs),
            time.perf_counter() - started,
            float(np.nanmean(mined.scores)) if kept.any() else float("nan"),
            float(mined.positive.mean()),
            mined.dropped_by_margin,
        )
    table = _from_rank_zero(table, world_size, bundle.device)
    sampler = HardNegativeBatchSampler(
        pairs.image_index,
        table,
        batch_size,
        seed=cfg.seed,
        num_replicas=world_size,
        rank=rank,
        caption_ids=captions,
        expand_per_batch=options.expand_per_batch,
    )
    dataset = PairDataset(pairs, bundle.preprocess_train, bundle.tokenizer)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate_pairs,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
