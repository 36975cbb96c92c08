"""The service's own Prometheus metrics, beside the ones Jina's monitoring gives every Executor and the gateway.

With ``monitoring: true`` (flows/flow.yml: ``cliptuner serve --metrics-port``; flows/k8s.yml: always), Jina serves
a Prometheus endpoint per Executor and registers its request metrics (``jina_receiving_request_seconds``,
``jina_process_request_seconds`` …) in a registry of the Executor's runtime. :class:`Metrics` adds the project's
metrics to that same registry, so one scrape of an Executor's port returns both:

========================================  =========  ==========================================================
metric                                     type       what
========================================  =========  ==========================================================
``cliptuner_encode_seconds``               histogram  time to embed one request's docs, by ``endpoint``
``cliptuner_encoded_items_total``          counter    items embedded, by ``modality`` (text, image, pair)
``cliptuner_encode_batch_items``           histogram  items per ONNX Runtime run of the encoder (requests merged
                                                      by dynamic batching count together)
``cliptuner_search_seconds``               histogram  time to answer one ``/search`` request
``cliptuner_index_docs``                   gauge      docs the index holds
``cliptuner_rebuild_progress``             gauge      fraction of the stored docs re-embedded by the running
                                                      rebuild (0 when none runs)
``cliptuner_model_version_info``           gauge      1 for the model version this Executor serves (label
                                                      ``version``); the tuner's is the registry's CURRENT
``cliptuner_train_step_seconds``           gauge      mean seconds per optimizer step of the running training
``cliptuner_train_loss``                   gauge      loss of the latest logged step
``cliptuner_train_samples_per_second``     gauge      training throughput of the running training
``cliptuner_train_progress``               gauge      step / total steps of the running training
``cliptuner_train_runs_total``             counter    finished /train runs, by ``outcome`` (published: promoted
                                                      and serving; refused: the gate kept it a candidate; failed;
                                                      cancelled); each outcome at 0 from the tuner's start
``cliptuner_feedback_pending_events``      gauge      feedback events recorded since the last automatic run
                                                      (the tuner's, with an ``auto_train`` policy)
``cliptuner_auto_train_runs_total``         counter    runs the ``auto_train`` policy started
``cliptuner_request_seconds``              histogram  time an Executor takes to answer one request, by
                                                      ``executor`` (class name) and ``endpoint``
``cliptuner_workspace_free_bytes``         gauge      bytes free for the service on the workspace volume (read
                                                      at each scrape; the tuner's)
``cliptuner_workspace_size_bytes``         gauge      size of the workspace volume in bytes (the tuner's)
========================================  =========  ==========================================================

The ``cliptuner_train_*`` gauges exist while a run trains: they appear with its first step and are removed when
it ends, so that a graph stops where the run stopped instead of showing a loss or throughput of 0 (or the last
run's values) while nothing trains.

Jina's own per-endpoint timing, ``jina_process_request_seconds{executor, executor_endpoint}``, is a summary: a
count and a sum, from which no percentile can be computed; ``cliptuner_request_seconds`` is the histogram of the
same calls (see :meth:`Metrics.time_requests`).

Without monitoring the metrics go to a private registry that nobody scrapes: the code that updates them is the
same either way.
"""

import functools
import inspect
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from jina.constants import __default_endpoint__
from jina.serve.executors import __dry_run_endpoint__
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .schemas import ClipDoc

# request latencies of an encoder/indexer: from a few ms (one text) to a minute (a big batch of images on a CPU)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# any endpoint's answer: the same, up to a synchronous /train of hours
_REQUEST_BUCKETS = (*_LATENCY_BUCKETS, 300.0, 1800.0, 7200.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # items per model run (batch_size caps it: 32 by default)
TRAIN_OUTCOMES = ("published", "refused", "failed", "cancelled")  # how a /train run ends (cliptuner_train_runs_total)
# the gauges of the running training, removed when it ends
_TRAINING_GAUGES = (
    "cliptuner_train_step_seconds",
    "cliptuner_train_loss",
    "cliptuner_train_samples_per_second",
    "cliptuner_train_progress",
)
# Jina's handlers that are not this Executor's work: a default handler (a passthrough of requests meant for another
# Executor) and the dry run (health checks)
_UNTIMED_ENDPOINTS = (__default_endpoint__, __dry_run_endpoint__)


def modality(doc: ClipDoc) -> str:
    """``"pair"`` (text and an image: embedded by its image), ``"image"`` or ``"text"``."""
    image = doc.tensor is not None or doc.blob is not None or doc.bytes_ is not None or bool(doc.uri or doc.url)
    if image:
        return "pair" if doc.text else "image"
    return "text"


class Metrics:
    """The metrics of one Executor, created on first use in its runtime's registry (or a private one).

    Args:
        registry: Jina's ``runtime_args.metrics_registry`` (None when monitoring is off).
    """

    def __init__(self, registry: Optional[CollectorRegistry]) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.exposed = registry is not None
        self._lock = threading.Lock()
        self._metrics: dict[str, Any] = {}
        self._version: Optional[str] = None

    def _get(self, kind: type, name: str, documentation: str, **kwargs: Any) -> Any:
        with self._lock:
            metric = self._metrics.get(name)
            if metric is None:
                metric = kind(name, documentation, registry=self.registry, **kwargs)
                self._metrics[name] = metric
            return metric

    def _remove(self, name: str) -> None:
        """Unregister a metric made by :meth:`_get` (its series leaves the scrape; the next ``_get`` makes it anew)."""
        with self._lock:
            metric = self._metrics.pop(name, None)
            if metric is not None:
                self.registry.unregister(metric)

    # -- every Executor -------------------------------------------------------------------------------------
    def time_requests(self, executor: Any) -> None:
        """Time every request that ``executor``'s endpoints answer, in ``cliptuner_request_seconds``.

        Wraps the handler of each endpoint in ``executor.requests`` (Jina's copy for this instance: other instances
        of the class keep theirs) with a timer labelled ``executor`` (the class name) and ``endpoint``; a request
        that fails is timed too. Left out: the default handler and Jina's dry run (``_UNTIMED_ENDPOINTS``), and
        streaming (generator) endpoints. Call it once, at the end of the Executor's ``__init__``.

        Args:
            executor: a Jina Executor, after ``super().__init__``.

        Raises:
            ValueError: the Executor's endpoints are timed already.
        """
        histogram = self._get(
            Histogram,
            "cliptuner_request_seconds",
            "Time an Executor takes to answer one request, by Executor and endpoint",
            labelnames=("executor", "endpoint"),
            buckets=_REQUEST_BUCKETS,
        )
        name = type(executor).__name__
        for endpoint, handler in list(executor.requests.items()):
            if endpoint in _UNTIMED_ENDPOINTS or handler.is_generator:
                continue
            if getattr(handler.fn, "__cliptuner_timed__", False):
                raise ValueError(f"{name}: the endpoints are timed already (time_requests was called twice)")
            executor.requests[endpoint] = handler._replace(fn=_timed(handler.fn, histogram.labels(name, endpoint)))

    # -- encoder and indexer --------------------------------------------------------------------------------
    @contextmanager
    def encoding(self, endpoint: str, docs: Any) -> Iterator[None]:
        """Time a request's embedding, and count its docs by modality once it succeeded."""
        histogram = self._get(
            Histogram,
            "cliptuner_encode_seconds",
            "Time to embed the docs of one request",
            labelnames=("endpoint",),
            buckets=_LATENCY_BUCKETS,
        )
        started = time.perf_counter()
        yield
        histogram.labels(endpoint).observe(time.perf_counter() - started)
        self.count_items(docs)

    def count_items(self, docs: Any) -> None:
        """Count embedded docs by modality."""
        counter = self._get(Counter, "cliptuner_encoded_items", "Items embedded, by modality", labelnames=("modality",))
        counts: dict[str, int] = {}
        for doc in docs:
            kind = modality(doc)
            counts[kind] = counts.get(kind, 0) + 1
        for kind, n in counts.items():
            counter.labels(kind).inc(n)

    def encode_batch(self, items: int) -> None:
        """Count one model run of the encoder and its items (several requests when batched together)."""
        self._get(
            Histogram,
            "cliptuner_encode_batch_items",
            "Items per ONNX Runtime run of the encoder",
            buckets=_BATCH_BUCKETS,
        ).observe(items)

    @contextmanager
    def searching(self) -> Iterator[None]:
        """Time one ``/search`` request (successful ones)."""
        histogram = self._get(
            Histogram, "cliptuner_search_seconds", "Time to answer one /search request", buckets=_LATENCY_BUCKETS
        )
        started = time.perf_counter()
        yield
        histogram.observe(time.perf_counter() - started)

    def index_size(self, count: Callable[[], int]) -> None:
        """Report the index's doc count, read at each scrape."""
        self._get(Gauge, "cliptuner_index_docs", "Docs the index holds").set_function(count)

    def rebuild_progress(self, fraction: float) -> None:
        """Fraction of the stored docs re-embedded by the running rebuild (0 when none runs)."""
        self._get(
            Gauge, "cliptuner_rebuild_progress", "Fraction of the stored docs re-embedded by the running rebuild"
        ).set(fraction)

    def model_version(self, version: Optional[str]) -> None:
        """The model version served (one labelled series set to 1; the previous one removed)."""
        gauge = self._get(
            Gauge, "cliptuner_model_version_info", "The model version served (value 1)", labelnames=("version",)
        )
        with self._lock:
            if version == self._version:
                return
            if self._version is not None:
                gauge.remove(self._version)
            if version is not None:
                gauge.labels(version).set(1)
            self._version = version

    # -- tuner ------------------------------------------------------------------------------------------------
    def workspace_volume(self, root: str | Path) -> None:
        """Report the size of the volume that holds ``root`` and the bytes free on it, read at each scrape.

        Free bytes are those an unprivileged process may still use (``f_bavail``: what the service can write).
        A volume that cannot be read (unmounted) reports NaN, which no alert threshold matches.
        """
        path = os.fspath(root)

        def read(field: str) -> float:
            try:
                stat = os.statvfs(path)
            except OSError:
                return math.nan
            return float(getattr(stat, field) * stat.f_frsize)

        self._get(
            Gauge, "cliptuner_workspace_free_bytes", "Bytes free for the service on the workspace volume"
        ).set_function(lambda: read("f_bavail"))
        self._get(Gauge, "cliptuner_workspace_size_bytes", "Size of the workspace volume in bytes").set_function(
            lambda: read("f_blocks")
        )

    def feedback_pending(self, events: int) -> None:
        """Feedback events recorded since the last automatic run (the auto_train policy's count)."""
        self._get(
            Gauge, "cliptuner_feedback_pending_events", "Feedback events recorded since the last automatic run"
        ).set(events)

    def auto_train_started(self) -> None:
        """Count a run the auto_train policy started."""
        self._get(Counter, "cliptuner_auto_train_runs", "Runs the auto_train policy started").inc()

    def training_outcomes(self) -> None:
        """Start the run counter of each outcome at 0, so that ``increase()`` and ``rate()`` see the first run
        that ends so (a series that first appears at 1 shows no increase). Call it once, when the tuner starts."""
        counter = self._runs_counter()
        for outcome in TRAIN_OUTCOMES:
            counter.labels(outcome)

    def _runs_counter(self) -> Counter:
        return self._get(Counter, "cliptuner_train_runs", "Finished /train runs, by outcome", labelnames=("outcome",))

    def training_event(self, event: dict) -> None:
        """Follow a training process's ``step`` events."""
        if event.get("event") != "step":
            return
        if "step_s" in event:
            self._get(
                Gauge, "cliptuner_train_step_seconds", "Mean seconds per optimizer step of the running training"
            ).set(event["step_s"])
        if "loss" in event:
            self._get(Gauge, "cliptuner_train_loss", "Loss of the latest logged training step").set(event["loss"])
        if "samples_per_s" in event:
            self._get(Gauge, "cliptuner_train_samples_per_second", "Training throughput (samples/s)").set(
                event["samples_per_s"]
            )
        if event.get("total_steps"):
            self._get(Gauge, "cliptuner_train_progress", "Step / total steps of the running training").set(
                event.get("step", 0) / event["total_steps"]
            )

    def training_finished(self, outcome: str) -> None:
        """Count a finished run (``published``, ``refused``, ``failed`` or ``cancelled``) and remove the gauges of the running
        training (they come back with the next run's first step)."""
        self._runs_counter().labels(outcome).inc()
        for name in _TRAINING_GAUGES:
            self._remove(name)


def _timed(fn: Callable, observer: Any) -> Callable:
    """``fn`` (a Jina handler, sync or async) that gives its duration to ``observer.observe`` however it ends."""
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                observer.observe(time.perf_counter() - started)

        timed = timed_async
    else:

        @functools.wraps(fn)
        def timed_sync(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                observer.observe(time.perf_counter() - started)

        timed = timed_sync
    timed.__cliptuner_timed__ = True
    return timed


__all__ = ["TRAIN_OUTCOMES", "Metrics", "modality"]
