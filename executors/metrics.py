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
``cliptuner_train_runs_total``             counter    finished /train runs, by ``outcome`` (published, failed,
                                                      cancelled)
========================================  =========  ==========================================================

Without monitoring the metrics go to a private registry that nobody scrapes: the code that updates them is the
same either way.
"""

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .schemas import ClipDoc

# request latencies of an encoder/indexer: from a few ms (one text) to a minute (a big batch of images on a CPU)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # items per model run (batch_size caps it: 32 by default)


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
        """Count a finished run: ``published``, ``failed`` or ``cancelled``."""
        self._get(Counter, "cliptuner_train_runs", "Finished /train runs, by outcome", labelnames=("outcome",)).labels(
            outcome
        ).inc()


__all__ = ["Metrics", "modality"]
