"""Training batches of a stream (:mod:`cliptuner.train.streaming`): one reader per DataLoader worker, ranks in step.

:class:`StreamLoader` is what :func:`cliptuner.train.loop.fit` iterates for a stream, in place of the DataLoader of
:func:`cliptuner.train.data.make_loader`: it yields ``(images [B,3,H,W], texts [B,ctx], index [B])``, one optimizer
step's batch on this rank. Each reader (a DataLoader worker, or this process without workers) reads the shards of
its slot in the epoch's :func:`~cliptuner.train.streaming.shard_plan` through a
:class:`~cliptuner.train.streaming.ShuffleBuffer` of ``shuffle_buffer`` samples and decodes only the samples a batch
takes. The guarantees (disjoint shards, unique images per batch, ranks in step, resume by shard) are listed in
:mod:`cliptuner.train.streaming`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Optional

import numpy as np
import torch

from cliptuner.model.images import DEFAULT_LIMITS, ImageError, ImageLimits, decode_image
from cliptuner.train.streaming import Sample, ShuffleBuffer, StreamSource, read_samples, shard_plan

logger = logging.getLogger(__name__)

_SKIPS_LOGGED = 5  # images that cannot be decoded, logged one by one per reader, then counted


class StreamBatch(NamedTuple):
    """One batch as a reader yields it; :class:`StreamLoader` passes on the first three."""

    images: Any  # [B, 3, H, W] float
    texts: Any  # [B, ctx] long
    index: Any  # [B] long: an id of each sample's image (its digest), unique within the batch
    shards: Any  # [B] long: each sample's shard index
    done: list[int]  # shards done once this batch has been trained
    worker: int  # the DataLoader worker that read it (0 without workers)


def _image_id(digest: bytes) -> int:
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class _StreamDataset(torch.utils.data.IterableDataset):
    """An iterable dataset of :class:`StreamBatch`: each reader reads its slot of the epoch's :func:`shard_plan`."""

    def __init__(
        self,
        source: StreamSource,
        transform: Callable,
        tokenizer: Callable,
        batch_size: int,
        shuffle_buffer: int,
        seed: int,
        num_replicas: int,
        rank: int,
        num_workers: int,
        limits: ImageLimits,
    ) -> None:
        self.source = source
        self.transform = transform
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.num_workers = num_workers
        self.limits = limits
        self.epoch = 0
        self.skip: frozenset[int] = frozenset()  # shards done before a resume
        self._skipped = 0

    def shards_of(self, worker: int) -> list[int]:
        plan = shard_plan(self.source.num_shards, self.seed, self.epoch, self.num_replicas, max(self.num_workers, 1))
        return [s for s in plan[self.rank][worker] if s not in self.skip]

    def _prepare(self, sample: Sample) -> Optional[Any]:
        try:
            image = decode_image(sample.image, self.limits, name=sample.key)
        except ImageError as exc:
            self._skipped += 1
            if self._skipped <= _SKIPS_LOGGED:
                logger.warning("skipped: %s", exc)
            return None
        return self.transform(image)  # [3, H, W]

    def __iter__(self) -> Iterator[StreamBatch]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        rng = np.random.default_rng([abs(int(self.seed)), int(self.epoch), self.rank, worker, 0x5EED])
        buffer = ShuffleBuffer(self.batch_size, self.shuffle_buffer, rng, self._prepare)
        self._skipped = 0
        for pixels, samples, done in buffer.batches(read_samples(self.source, self.shards_of(worker))):
            yield StreamBatch(
                torch.stack(pixels),  # [B, 3, H, W]
                self.tokenizer([s.caption for s in samples]),  # [B, ctx]
                torch.tensor([_image_id(s.digest) for s in samples], dtype=torch.long),  # [B]
                torch.tensor([s.shard for s in samples], dtype=torch.long),  # [B]
                list(done),
                worker,
            )
        if self._skipped > _SKIPS_LOGGED:
            logger.warning("%d sample(s) skipped in all by this reader (images that cannot be decoded)", self._skipped)


class StreamLoader:
    """Batches of a stream for :func:`cliptuner.train.loop.fit`: ``(images [B,3,H,W], texts [B,ctx], index [B])``.

    Call :meth:`set_epoch` before each epoch (``fit`` does). Under DDP every rank builds one with its ``rank``;
    before each batch the ranks agree that all of them have one (the epoch ends for all when one runs out) and
    share which shards are done. ``on_shards_done`` (set by ``fit``) is called with :meth:`state` each time
    ``checkpoint_every`` more shards are done, between two steps.

    Attributes for tests and logs: ``seen[epoch]`` the shard names whose samples were yielded, ``seen_by_worker``
    ``{(epoch, worker): names}``, ``batches[epoch]`` the batches yielded.

    Raises:
        ValueError: fewer shards than ranks × workers, a shuffle buffer smaller than a batch, or no full batch.
    """

    generator = None  # fit seeds a DataLoader's generator each epoch; this loader seeds its workers itself
    batch_sampler = None

    def __init__(
        self,
        source: StreamSource,
        transform: Callable,
        tokenizer: Callable,
        batch_size: int,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        limits: ImageLimits = DEFAULT_LIMITS,
        checkpoint_every: int = 1,
    ) -> None:
        slots = num_replicas * max(num_workers, 1)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        if source.num_shards < slots:
            raise ValueError(
                f"stream {source.spec!r} has {source.num_shards} shard(s) but {num_replicas} process(es) x "
                f"{max(num_workers, 1)} reader(s) (DataLoader workers) read it, each its own shards: give at least "
                f"{slots} shards (or fewer workers)"
            )
        if shuffle_buffer < batch_size:
            raise ValueError(
                f"shuffle_buffer {shuffle_buffer} is smaller than a batch of {batch_size} pairs (batch_size x "
                "accum_steps): the buffer must hold at least one batch"
            )
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 shard, got {checkpoint_every}")
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.num_replicas = num_replicas
        self.rank = rank
        self.checkpoint_every = checkpoint_every
        self.dataset = _StreamDataset(
            source, transform, tokenizer, batch_size, shuffle_buffer, seed, num_replicas, rank, num_workers, limits
        )
        self._generator = torch.Generator()
        self._loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=num_workers, generator=self._generator
        )
        self._counts = [s.count for s in source.shards]
        self._index = {s.name: i for i, s in enumerate(source.shards)}
        self.epoch = 0
        self.done: list[str] = []  # shards done in this epoch, in the order they were done
        self._resume: tuple[int, list[str]] = (-1, [])
        self.on_shards_done: Optional[Callable[[dict[str, Any]], None]] = None
        self.seen: dict[int, set[str]] = {}
        self.seen_by_worker: dict[tuple[int, int], set[str]] = {}
        self.batches: dict[int, int] = {}
        if self.steps(0) < 1:
            raise ValueError(
                f"stream {source.spec!r}: {len(source)} pairs over {source.num_shards} shard(s), dealt to {slots} "
                f"reader(s), give no full batch of {batch_size}; lower batch_size or give more pairs"
            )

    # -- the plan ----------------------------------------------------------------------------------------------------
    def steps(self, epoch: int, skip: Sequence[int] = ()) -> int:
        """Batches each rank is planned to yield in ``epoch``: the fewest any rank's readers can fill."""
        skipped = set(skip)
        plan = shard_plan(self.source.num_shards, self.seed, epoch, self.num_replicas, max(self.num_workers, 1))
        return min(
            sum(sum(self._counts[s] for s in slot if s not in skipped) // self.batch_size for slot in readers)
            for readers in plan
        )

    def total_steps(self, epochs: int) -> int:
        """Batches planned over ``epochs`` epochs from the first (what the learning-rate schedule is built for)."""
        return sum(self.steps(epoch) for epoch in range(epochs))

    def __len__(self) -> int:
        """Batches planned for the current epoch (its done shards left out after a resume)."""
        return self.steps(self.epoch, self.dataset.skip)

    # -- epochs and resuming -----------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Read the shards of ``epoch`` (call before iterating, on every rank)."""
        self.epoch = int(epoch)
        resumed_epoch, resumed_done = self._resume
        self.done = list(resumed_done) if self.epoch == resumed_epoch else []
        self.dataset.epoch = self.epoch
        self.dataset.skip = frozenset(self._index[name] for name in self.done)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: ``{"epoch": the epoch being read, "done": shard names done in it}``."""
        return {"epoch": self.epoch, "done": list(self.done)}

    def resume(self, state: Optional[dict[str, Any]]) -> None:
        """Skip the shards a checkpoint's :meth:`state` names as done when its epoch is read.

        Raises:
            ValueError: the state names shards this stream does not hold (another ``--data``).
        """
        if not state:
            return
        unknown = [name for name in state.get("done", []) if name not in self._index]
        if unknown:
            raise ValueError(
                f"the checkpoint names shard(s) that stream {self.source.spec!r} does not hold (e.g. {unknown[:3]}); "
                "resume with the data of that run"
            )
        self._resume = (int(state["epoch"]), list(state.get("done", [])))
        self.set_epoch(self.epoch)

    # -- iterating ---------------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.dataset.epoch = epoch
        self._generator.manual_seed((abs(int(self.seed)) * 1_000_003 + epoch * 7919 + self.rank) % (2**63))
        seen = self.seen.setdefault(epoch, set())
        self.batches[epoch] = 0
        batches = iter(self._loader)
        pending: list[int] = []
        try:
            while True:
                batch = next(batches, None)
                have, newly = self._agree(batch is not None, pending)
                self._record(newly, announce=have)
                if not have:
                    return
                assert batch is not None
                pending = list(batch.done)
                names = {self.source.shards[s].name for s in set(batch.shards.tolist())}
                seen.update(names)
                self.seen_by_worker.setdefault((epoch, batch.worker), set()).update(names)
                self.batches[epoch] += 1
                yield batch.images, batch.texts, batch.index
        finally:
            del batches  # the workers of an epoch ended early (another rank ran out, a stop) go with it

    def _record(self, newly: list[int], announce: bool) -> None:
        before = len(self.done)
        self.done.extend(self.source.shards[s].name for s in newly if self.source.shards[s].name not in self.done)
        crossed = len(self.done) // self.checkpoint_every > before // self.checkpoint_every
        if announce and crossed and self.on_shards_done is not None:
            self.on_shards_done(self.state())

    def _agree(self, have: bool, pending: list[int]) -> tuple[bool, list[int]]:
        """Whether every rank has a batch, and the shards any rank finished with its last batch."""
        if self.num_replicas == 1:
            return have, sorted(pending)
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        mine = torch.tensor([int(have), len(pending)], dtype=torch.long, device=device)
        every = [torch.zeros_like(mine) for _ in range(self.num_replicas)]
        dist.all_gather(every, mine)
        have_all = all(int(t[0]) == 1 for t in every)
        most = max(int(t[1]) for t in every)
        if not most:
            return have_all, []
        padded = torch.full((most,), -1, dtype=torch.long, device=device)
        if pending:
            padded[: len(pending)] = torch.tensor(pending, dtype=torch.long, device=device)
        lists = [torch.empty_like(padded) for _ in range(self.num_replicas)]
        dist.all_gather(lists, padded)
        return have_all, sorted({int(s) for t in lists for s in t.tolist() if s >= 0})


def planned_steps(loader: Any, epochs: int) -> int:
    """Optimizer steps a run of ``epochs`` epochs is planned for: a stream's plan, else ``len(loader) * epochs``."""
    if isinstance(loader, StreamLoader):
        return loader.total_steps(epochs)
    return len(loader) * epochs


__all__ = ["StreamBatch", "StreamLoader", "planned_steps"]
