"""Dynamic batching: many small concurrent requests embedded in few model runs. Torch-free, Jina-free.

A service that answers one image per request runs the model once per image, while ONNX Runtime (on a CPU and far
more on a GPU) runs a batch of 32 in much less than 32 times the time of one. :class:`MicroBatcher` merges the
small requests that arrive close together into one call of :func:`cliptuner.serve.content.embed_items`:

- A request checks its items first (and :func:`decode_items` decodes its images, in the request's own thread),
  then *submits* them with the model reference it took for the whole request (:meth:`MicroBatcher.submit`), and
  gets a :class:`concurrent.futures.Future` of its rows.
- One worker thread takes the oldest pending submission and waits until ``batch_size`` items that use the *same*
  model reference (identity) are pending, or until ``wait_ms`` has passed since that submission arrived. It then
  runs one ``embed_items`` over the concatenation of the pending submissions of that model, oldest first, up to
  ``batch_size`` items, and hands each submission its own rows. While it runs, the next batch gathers.
- Version safety: submissions of two model references are never merged, so a request is embedded entirely by
  the version it took, also when the service swaps versions while it waits.
- Isolation: a merged run that raises is run again one submission at a time, so that only the submission at fault
  fails, with the error it would have had alone; the others get their rows.
- A submission of ``batch_size`` items or more gains nothing from waiting and is run alone as soon as the worker
  reaches it; :meth:`MicroBatcher.accepts` says which submissions a caller should rather embed itself (large
  ones, whose images :func:`~cliptuner.serve.content.embed_items` decodes one minibatch at a time to bound memory, and
  ones with remote images, whose fetching would hold up everyone else's run).

A cancelled future (its request went away) is dropped before its items are run. Thread-safe.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from cliptuner.model.images import decode_image, fit_image
from cliptuner.serve.access import RemoteImage
from cliptuner.serve.content import Item, embed_items

logger = logging.getLogger(__name__)

MAX_WAIT_MS = 1000.0  # a wait beyond a second is a latency bug, not a batching setting

Embed = Callable[[Any, Sequence[Item]], np.ndarray]  # (model, items) → [len(items), embed_dim]
OnRun = Callable[[int, int], None]  # (items, submissions) of a model run that succeeded


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def decode_items(clip: Any, items: Sequence[Item]) -> list[Item]:
    """``items`` with their local images decoded and resized to the model's input size now.

    Run by a request before it submits, in its own thread: decoding errors then fail that request alone, with the
    message :func:`~cliptuner.serve.content.embed_items` would give, the decoding of concurrent requests runs in
    parallel instead of in the batcher's one worker, and what waits holds ``image_size²`` pixels per image. The
    vectors are those of the undecoded items: preprocessing resizes and crops an image of the input size to itself.

    Args:
        clip: an :class:`~cliptuner.model.runtime.OnnxClip` (its ``limits`` and ``manifest``'s image geometry).
        items: checked items (:func:`cliptuner.serve.content.make_item`); texts and remote images are kept as they are.

    Returns:
        New items (same names, same order).

    Raises:
        cliptuner.model.images.ImageError: an image cannot be decoded or is over the limits (names the item).
    """
    manifest = clip.manifest
    out = []
    for item in items:
        if item.image is None or isinstance(item.image, RemoteImage):
            out.append(item)
            continue
        image = decode_image(item.image, clip.limits, name=item.name)
        fitted = fit_image(
            image, manifest.image_size, manifest.interpolation, manifest.resize_mode, manifest.fill_color or 0
        )
        out.append(Item(name=item.name, image=fitted))
    return out


@dataclass
class _Submission:
    """One request's items, the model reference it took, and where its rows go."""

    clip: Any
    items: Sequence[Item]
    future: Future
    since: float  # time.monotonic() when it was submitted


@dataclass
class BatchStats:
    """What the batcher has done since it started (read with :meth:`MicroBatcher.stats`)."""

    runs: int = 0  # model runs that succeeded (merged or alone)
    items: int = 0  # items embedded by them
    submissions: int = 0  # submissions answered with rows
    largest_run: int = 0  # most items in one run
    merged_runs: int = 0  # runs over more than one submission
    retried_runs: int = 0  # merged runs that raised and were run again one submission at a time
    failed_submissions: int = 0  # submissions answered with an error
    cancelled_submissions: int = 0  # submissions dropped because their future was cancelled

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass
class _Group:
    """Submissions run together: one model reference, the items concatenated."""

    clip: Any
    members: list[_Submission] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(len(s.items) for s in self.members)


class MicroBatcher:
    """Merges concurrent small submissions that use the same model into one embedding run.

    Args:
        batch_size: most items in one merged run (the model's own ``batch_size``: one ONNX Runtime run).
        wait_ms: how long the oldest pending submission may wait for others to join it, in milliseconds
            (> 0; a caller that wants no batching does not use a batcher).
        embed: the embedding function, ``embed(clip, items) -> [len(items), embed_dim]``
            (default :func:`cliptuner.serve.content.embed_items`).
        on_run: called after each successful run with its item and submission counts (metrics).

    Raises:
        ValueError: ``batch_size`` not an integer >= 1, or ``wait_ms`` not in (0, 1000].
    """

    def __init__(
        self, batch_size: int = 32, wait_ms: float = 2.0, embed: Embed = embed_items, on_run: Optional[OnRun] = None
    ) -> None:
        _check(
            isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1,
            f"batch_size must be an integer >= 1, got {batch_size!r}",
        )
        _check(
            isinstance(wait_ms, (int, float))
            and not isinstance(wait_ms, bool)
            and math.isfinite(wait_ms)
            and 0 < wait_ms <= MAX_WAIT_MS,
            f"wait_ms must be a number in (0, {MAX_WAIT_MS:g}], got {wait_ms!r}",
        )
        self.batch_size = batch_size
        self.wait_ms = float(wait_ms)
        self._embed = embed
        self._on_run = on_run
        self._pending: deque[_Submission] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._worker: Optional[threading.Thread] = None
        self._stats = BatchStats()
        self._stats_lock = threading.Lock()

    # -- callers ------------------------------------------------------------------------------------------------
    def accepts(self, items: Sequence[Item]) -> bool:
        """Whether ``items`` gain from batching: fewer than ``batch_size``, and no remote image to fetch."""
        return 0 < len(items) < self.batch_size and not any(isinstance(i.image, RemoteImage) for i in items)

    def submit(self, clip: Any, items: Sequence[Item]) -> Future[np.ndarray]:
        """Queue ``items`` to be embedded by ``clip`` (together with other submissions of the same ``clip``).

        Args:
            clip: the model reference the request took (compared by identity).
            items: the request's checked items (decode their images first: :func:`decode_items`).

        Returns:
            A future of the L2-normalised float32 ``[len(items), embed_dim]`` rows, or of the exception that
            embedding ``items`` alone raises.

        Raises:
            RuntimeError: the batcher is closed.
        """
        future: Future = Future()
        if not items:
            future.set_result(np.empty((0, clip.embed_dim), dtype=np.float32))
            return future
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._pending.append(_Submission(clip, list(items), future, time.monotonic()))
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="cliptuner-batcher", daemon=True)
                self._worker.start()
            self._cond.notify()
        return future

    def embed(self, clip: Any, items: Sequence[Item]) -> np.ndarray:
        """:meth:`submit` and wait for the rows (for callers in a thread).

        Raises:
            Whatever embedding ``items`` alone raises; RuntimeError when the batcher is closed.
        """
        return self.submit(clip, items).result()

    def stats(self) -> dict:
        """A copy of the counters (:class:`BatchStats`), plus ``pending``: submissions waiting now."""
        with self._stats_lock:
            out = self._stats.as_dict()
        with self._cond:
            out["pending"] = len(self._pending)
        return out

    def close(self, timeout: float = 60.0) -> None:
        """Run what is pending (without waiting for more), then stop the worker. Later submissions are refused."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)

    # -- the worker ----------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            group = self._next_group()
            if group is None:
                return
            self._run(group)

    def _next_group(self) -> Optional[_Group]:
        """Wait for a batch to be due and take it off the queue (None once closed and drained)."""
        with self._cond:
            while not self._pending:
                if self._closed:
                    return None
                self._cond.wait()
            head = self._pending[0]  # only this thread removes submissions: it stays the head while we wait
            deadline = head.since + self.wait_ms / 1000.0
            while not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._same_model_items(head.clip) >= self.batch_size:
                    break
                self._cond.wait(remaining)
            return self._take(head.clip)

    def _same_model_items(self, clip: Any) -> int:
        return sum(len(s.items) for s in self._pending if s.clip is clip)

    def _take(self, clip: Any) -> _Group:
        """The oldest pending submissions of ``clip`` that fit in ``batch_size`` items (at least one, whatever its
        size); the rest stay pending in their order."""
        group = _Group(clip)
        kept: deque[_Submission] = deque()
        size = 0
        cancelled = 0
        for sub in self._pending:
            fits = not group.members or size + len(sub.items) <= self.batch_size
            if sub.clip is not clip or not fits or size >= self.batch_size:
                kept.append(sub)
            elif not sub.future.set_running_or_notify_cancel():
                cancelled += 1  # its request went away
            else:
                group.members.append(sub)
                size += len(sub.items)
        self._pending = kept
        if cancelled:
            with self._stats_lock:
                self._stats.cancelled_submissions += cancelled
        return group

    def _run(self, group: _Group) -> None:
        """One model run over the group; on an error, each submission alone (only the culprits fail)."""
        if not group.members:
            return
        try:
            if len(group.members) == 1:
                self._run_alone(group.clip, group.members[0])
                return
            items = [item for sub in group.members for item in sub.items]
            try:
                vectors = self._embed(group.clip, items)  # [group.size, embed_dim]
            except Exception as exc:  # noqa: BLE001 - any error: find the submission at fault
                logger.info("a merged run of %d submissions failed (%s); running each alone", len(group.members), exc)
                with self._stats_lock:
                    self._stats.retried_runs += 1
                for sub in group.members:
                    self._run_alone(group.clip, sub)
                return
            self._ran(len(items), len(group.members), merged=True)
            offset = 0
            for sub in group.members:
                sub.future.set_result(vectors[offset : offset + len(sub.items)])
                offset += len(sub.items)
        except BaseException as exc:  # never leave a caller waiting on a future nobody will set
            for sub in group.members:
                if not sub.future.done():
                    sub.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            logger.exception("the batcher's run failed")

    def _run_alone(self, clip: Any, sub: _Submission) -> None:
        try:
            vectors = self._embed(clip, sub.items)  # [len(sub.items), embed_dim]
        except Exception as exc:  # noqa: BLE001 - the request's own error, handed to it
            with self._stats_lock:
                self._stats.failed_submissions += 1
            sub.future.set_exception(exc)
            return
        self._ran(len(sub.items), 1, merged=False)
        sub.future.set_result(vectors)

    def _ran(self, items: int, submissions: int, merged: bool) -> None:
        with self._stats_lock:
            s = self._stats
            s.runs += 1
            s.items += items
            s.submissions += submissions
            s.largest_run = max(s.largest_run, items)
            s.merged_runs += int(merged)
        if self._on_run is not None:
            try:
                self._on_run(items, submissions)
            except Exception:  # noqa: BLE001 - a metrics hook must not fail a request
                logger.exception("on_run hook failed")


__all__ = ["BatchStats", "MAX_WAIT_MS", "MicroBatcher", "decode_items"]
