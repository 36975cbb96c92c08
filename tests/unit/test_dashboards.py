"""The Grafana dashboard and the Prometheus alert rules of deploy/monitoring/ query only metrics the service exports,
and the metrics they rely on behave as the panels and alerts expect.

What the service exports is collected, not listed: :class:`executors.metrics.Metrics` with every public method
called, the gateway's refusal counter (:func:`executors.gateway.build_guard`) and Jina's own request metrics (its
monitoring mixin, which the gateway and every Executor's worker use, and an Executor's per-endpoint summary), each
in a fresh registry. A PromQL expression's metric names are found by a small tokenizer and checked against those
families with Prometheus's exposition suffixes (a counter is queried as ``_total``, a histogram as ``_bucket``,
``_sum``, ``_count``...).
"""

import asyncio
import inspect
import json
import math
import os
import re
from pathlib import Path

import pytest
import yaml
from docarray import DocList
from jina import Executor, requests
from jina.serve.runtimes.monitoring import MonitoringRequestMixin
from prometheus_client import CollectorRegistry

from cliptuner.settings import ServiceEnvironment
from executors import metrics as metrics_module
from executors.gateway import build_guard
from executors.metrics import TRAIN_OUTCOMES, Metrics
from executors.schemas import ClipDoc

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
DASHBOARD = MONITORING / "cliptuner-dashboard.json"
ALERTS = MONITORING / "alerts.yml"

# series Prometheus itself adds to every scrape target (not exported by a process)
SCRAPE_SERIES = {"up"}
# the alerts the operations guide describes (docs/operations.md, "Dashboards and alerts")
ALERT_NAMES = {
    "CliptunerTargetDown",
    "CliptunerSearchLatencyHigh",
    "CliptunerTrainingFailed",
    "CliptunerCandidateRefused",
    "CliptunerWorkspaceVolumeNearlyFull",
    "CliptunerWorkspaceVolumeFull",
    "CliptunerRefusalsSurging",
}
SEVERITIES = {"critical", "warning", "info"}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s"}

# PromQL's functions and aggregation operators (prometheus.io/docs/prometheus/latest/querying/functions/, operators/)
PROMQL_FUNCTIONS = {
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh", "avg_over_time", "ceil",
    "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh", "count_over_time", "day_of_month", "day_of_week",
    "day_of_year", "days_in_month", "deg", "delta", "deriv", "exp", "floor", "histogram_avg", "histogram_count",
    "histogram_fraction", "histogram_quantile", "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters",
    "hour", "idelta", "increase", "irate", "label_join", "label_replace", "last_over_time", "ln", "log10", "log2",
    "mad_over_time", "max_over_time", "min_over_time", "minute", "month", "pi", "predict_linear",
    "present_over_time", "quantile_over_time", "rad", "rate", "resets", "round", "scalar", "sgn", "sin", "sinh",
    "sort", "sort_by_label", "sort_by_label_desc", "sort_desc", "sqrt", "stddev_over_time", "stdvar_over_time",
    "sum_over_time", "tan", "tanh", "time", "timestamp", "vector", "year",
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile",
    "limitk", "limit_ratio",
}  # fmt: skip
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                   "offset", "atan2", "inf", "nan", "start", "end"}  # fmt: skip

# the names prometheus_client gives the series of a metric family, by family type
EXPOSED_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),  # prometheus_client's summaries have no quantiles
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
}

_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`")
_GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)[^}]*\}|\$(\w+)")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_WORD = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)\s*(\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (Grafana variables allowed) selects.

    Strings, Grafana variables, label matchers (``{...}``), ranges (``[...]``) and the label lists of ``by``,
    ``without``, ``on``, ``ignoring``, ``group_left`` and ``group_right`` are removed; of the words left, those
    called (followed by ``(``) must be PromQL functions, keywords are skipped, and the rest are metric names.

    Raises:
        ValueError: a word is called that is no PromQL function (a typo would otherwise hide a metric name).
    """
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VARIABLE.sub("1", text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _LABEL_LIST.sub(" ", text)
    names = set()
    for match in _WORD.finditer(text):
        word, called = match.group(1), match.group(2)
        if called:
            if word not in PROMQL_FUNCTIONS:
                raise ValueError(f"{word!r} is not a PromQL function, in {expr!r}")
        elif word.lower() not in PROMQL_KEYWORDS:
            names.add(word)
    return names


def exposed_names(registry: CollectorRegistry) -> set[str]:
    """Every series name a scrape of ``registry`` can return, whether or not a labelled metric has a child yet."""
    names = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in EXPOSED_SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def unknown_metrics(expr: str, known: set[str]) -> set[str]:
    """The metric names of ``expr`` that are not in ``known`` (what the checker reports)."""
    return metric_names(expr) - known


class Probe(Executor):
    """An Executor with a sync and an async endpoint and a default handler, for :meth:`Metrics.time_requests`."""

    @requests(on="/search")
    async def search(self, docs: DocList[ClipDoc], **kwargs) -> DocList[ClipDoc]:
        return docs

    @requests(on="/fail")
    def fail(self, docs: DocList[ClipDoc], **kwargs) -> DocList[ClipDoc]:
        raise RuntimeError("boom")

    @requests
    async def passthrough(self, docs: DocList[ClipDoc], **kwargs) -> DocList[ClipDoc]:
        return docs


def call(executor: Executor, endpoint: str) -> None:
    """One request to ``endpoint`` through Jina's own dispatch (as the worker runtime calls it)."""
    docs = DocList[ClipDoc]([ClipDoc(id="q", text="a cat")])
    asyncio.run(executor.__acall__(endpoint, docs=docs, tracing_context=None))


def exercise(metrics: Metrics, executor: Executor, workspace: Path) -> list[str]:
    """Call every public method of ``metrics``; returns their names."""
    docs = [ClipDoc(id="t", text="a cat")]
    with metrics.encoding("/encode", docs):
        pass
    metrics.count_items(docs)
    metrics.encode_batch(3)
    with metrics.searching():
        pass
    metrics.index_size(lambda: 7)
    metrics.rebuild_progress(0.5)
    metrics.model_version("v1")
    metrics.time_requests(executor)
    metrics.workspace_volume(workspace)
    metrics.training_outcomes()
    metrics.training_event(
        {"event": "step", "step": 1, "total_steps": 4, "loss": 2.0, "step_s": 0.1, "samples_per_s": 9}
    )
    metrics.feedback_pending(3)
    metrics.auto_train_started()
    return [
        "feedback_pending",
        "auto_train_started",
        "encoding",
        "count_items",
        "encode_batch",
        "searching",
        "index_size",
        "rebuild_progress",
        "model_version",
        "time_requests",
        "workspace_volume",
        "training_outcomes",
        "training_event",
    ]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    """Every series name the service's processes export (the training gauges included, read while a run trains)."""
    executor_registry = CollectorRegistry()  # an Executor's runtime registry: Jina's metrics and the project's
    executor = Probe(runtime_args={"metrics_registry": executor_registry, "name": "probe"})
    metrics = Metrics(executor_registry)
    called = exercise(metrics, executor, tmp_path_factory.mktemp("workspace"))
    names = exposed_names(executor_registry)
    metrics.training_finished("published")
    called.append("training_finished")
    names |= exposed_names(executor_registry)
    public = {name for name, _ in inspect.getmembers(Metrics, inspect.isfunction) if not name.startswith("_")}
    assert set(called) == public, "exercise() must call every public method of Metrics"

    gateway_registry = CollectorRegistry()
    build_guard(ServiceEnvironment(), gateway_registry)  # cliptuner_access_refusals_total
    MonitoringRequestMixin(metrics_registry=gateway_registry, runtime_name="gateway")  # Jina's request metrics
    return names | exposed_names(gateway_registry) | SCRAPE_SERIES


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _alerts() -> dict:
    return yaml.safe_load(ALERTS.read_text())


def _queries() -> list[tuple[str, str]]:
    """``(where, expr)`` of every dashboard target and alert rule."""
    found = []
    for panel in _dashboard()["panels"]:
        for target in panel.get("targets", []):
            found.append((f"dashboard {panel['title']!r} {target['refId']}", target["expr"]))
    for group in _alerts()["groups"]:
        for rule in group["rules"]:
            found.append((f"alert {rule['alert']}", rule["expr"]))
    return found


# -- every query names exported metrics ---------------------------------------------------------------------------
@pytest.mark.parametrize("where, expr", _queries(), ids=[where for where, _ in _queries()])
def test_every_query_names_only_metrics_the_service_exports(exported, where, expr):
    names = metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    assert not names - exported, f"{where}: {sorted(names - exported)} are not exported"


def test_the_exported_names_hold_what_the_queries_rely_on(exported):
    assert {
        "cliptuner_request_seconds_bucket",
        "cliptuner_search_seconds_bucket",
        "cliptuner_train_runs_total",
        "cliptuner_train_loss",
        "cliptuner_workspace_free_bytes",
        "cliptuner_workspace_size_bytes",
        "cliptuner_access_refusals_total",
        "jina_process_request_seconds_count",
        "jina_receiving_request_seconds_sum",
        "jina_failed_requests_total",
        "jina_number_of_pending_requests",
    } <= exported
    # a counter is not queried by its family name, nor a histogram without a suffix
    assert not {"cliptuner_train_runs", "cliptuner_search_seconds", "cliptuner_request_seconds"} & exported


def test_the_checker_finds_metric_names_and_refuses_unknown_ones(exported):
    expr = (
        'histogram_quantile(0.99, sum by (le, endpoint) (rate(cliptuner_request_seconds_bucket{endpoint="/search", '
        'namespace="$namespace"}[$__rate_interval]))) > 1e3 and on (namespace) group_left (version) '
        'cliptuner_model_version_info offset 5m or label_replace(up, "x", "$1", "job", "(cliptuner_fake)")'
    )
    assert metric_names(expr) == {"cliptuner_request_seconds_bucket", "cliptuner_model_version_info", "up"}
    assert unknown_metrics(expr, exported) == set()
    assert unknown_metrics("rate(cliptuner_serch_seconds_bucket[5m])", exported) == {"cliptuner_serch_seconds_bucket"}
    assert unknown_metrics("increase(cliptuner_train_runs[1h])", exported) == {"cliptuner_train_runs"}
    assert unknown_metrics("cliptuner_search_seconds > 1", exported) == {"cliptuner_search_seconds"}
    with pytest.raises(ValueError, match="'histogram_quantle' is not a PromQL function"):
        metric_names("histogram_quantle(0.9, cliptuner_search_seconds_bucket)")


# -- structure ---------------------------------------------------------------------------------------------------
def test_alert_rules_are_a_prometheus_rule_groups_file():
    alerts = _alerts()
    assert set(alerts) == {"groups"} and alerts["groups"]
    seen = []
    for group in alerts["groups"]:
        assert isinstance(group["name"], str) and group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"]), rule["alert"]
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert re.fullmatch(r"(\d+[smhdwy])+", rule["for"]), (rule["alert"], rule["for"])
            assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
            assert isinstance(rule["annotations"]["summary"], str) and rule["annotations"]["summary"].strip()
            assert rule["annotations"].get("description", "x").strip()
            seen.append(rule["alert"])
    assert len(seen) == len(set(seen)), "alert names repeat"
    assert set(seen) == ALERT_NAMES


def test_dashboard_is_grafana_json_with_panels_that_query():
    dashboard = _dashboard()
    assert dashboard["title"] and dashboard["uid"] == "cliptuner" and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in variables
    ids, queried = set(), 0
    for panel in dashboard["panels"]:
        assert panel["id"] not in ids, f"panel id {panel['id']} repeats"
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["description"] and panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"]["uid"] == "${datasource}"
            used = {a or b for a, b in _GRAFANA_VARIABLE.findall(target["expr"])}
            assert used <= variables | GRAFANA_BUILTINS, (panel["title"], used - variables - GRAFANA_BUILTINS)
            queried += 1
    assert queried >= 20


# -- the metrics behind them --------------------------------------------------------------------------------------
def test_training_finished_counts_the_run_and_removes_the_training_gauges():
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.training_outcomes()
    assert {o: registry.get_sample_value("cliptuner_train_runs_total", {"outcome": o}) for o in TRAIN_OUTCOMES} == {
        o: 0.0 for o in TRAIN_OUTCOMES
    }  # each outcome from 0, so that increase() sees the first run that ends so
    step = {"event": "step", "step": 3, "total_steps": 4, "loss": 1.5, "step_s": 0.2, "samples_per_s": 80.0}
    metrics.training_event(step)
    gauges = {
        "cliptuner_train_progress": 0.75,
        "cliptuner_train_loss": 1.5,
        "cliptuner_train_step_seconds": 0.2,
        "cliptuner_train_samples_per_second": 80.0,
    }
    assert {name: registry.get_sample_value(name) for name in gauges} == gauges
    metrics.training_finished("failed")
    assert {name: registry.get_sample_value(name) for name in gauges} == dict.fromkeys(gauges)  # gone from the scrape
    assert registry.get_sample_value("cliptuner_train_runs_total", {"outcome": "failed"}) == 1.0
    metrics.training_finished("cancelled")  # a run that ended before its first step: nothing to remove
    assert registry.get_sample_value("cliptuner_train_runs_total", {"outcome": "cancelled"}) == 1.0
    metrics.training_event({**step, "step": 1, "loss": 3.0})  # the next run's first step brings them back
    assert registry.get_sample_value("cliptuner_train_progress") == 0.25
    assert registry.get_sample_value("cliptuner_train_loss") == 3.0


def test_workspace_volume_is_read_at_each_scrape(tmp_path, monkeypatch):
    registry = CollectorRegistry()
    Metrics(registry).workspace_volume(tmp_path)
    size = registry.get_sample_value("cliptuner_workspace_size_bytes")
    free = registry.get_sample_value("cliptuner_workspace_free_bytes")
    real = os.statvfs(tmp_path)
    assert size == real.f_blocks * real.f_frsize and 0 < free <= size

    class Stat:
        f_blocks, f_bavail, f_frsize = 1000, 50, 4096

    seen = []
    monkeypatch.setattr(metrics_module.os, "statvfs", lambda path: seen.append(path) or Stat)
    assert registry.get_sample_value("cliptuner_workspace_free_bytes") == 50 * 4096
    assert registry.get_sample_value("cliptuner_workspace_size_bytes") == 1000 * 4096
    assert seen and set(seen) == {str(tmp_path)}  # read when scraped, not when registered

    def unreadable(path):
        raise FileNotFoundError(path)

    monkeypatch.setattr(metrics_module.os, "statvfs", unreadable)
    assert math.isnan(registry.get_sample_value("cliptuner_workspace_free_bytes"))


def test_time_requests_times_each_endpoint_of_one_executor():
    registry = CollectorRegistry()
    executor = Probe(runtime_args={"metrics_registry": registry, "name": "probe"})
    other = Probe(runtime_args={"metrics_registry": CollectorRegistry(), "name": "other"})
    metrics = Metrics(registry)
    metrics.time_requests(executor)

    def count(endpoint: str) -> float:
        return registry.get_sample_value("cliptuner_request_seconds_count", {"executor": "Probe", "endpoint": endpoint})

    assert (count("/search"), count("/fail")) == (0.0, 0.0)  # each endpoint's series from the start
    call(executor, "/search")
    call(executor, "/search")
    with pytest.raises(RuntimeError, match="boom"):
        call(executor, "/fail")  # a failed request is timed too
    call(executor, "/elsewhere")  # the default handler (a passthrough) is not
    assert (count("/search"), count("/fail"), count("/default")) == (2.0, 1.0, None)
    inf_bucket = {"executor": "Probe", "endpoint": "/search", "le": "+Inf"}
    assert registry.get_sample_value("cliptuner_request_seconds_bucket", inf_bucket) == 2.0
    jina_count = registry.get_sample_value(
        "jina_process_request_seconds_count",
        {"executor": "Probe", "executor_endpoint": "/search", "runtime_name": "probe"},
    )
    assert jina_count == 2.0  # Jina's own timing goes on
    assert not hasattr(other.requests["/search"].fn, "__cliptuner_timed__")  # another instance keeps its handlers
    assert executor.requests["/search"].fn.__name__ == "search"  # Jina finds write endpoints and batching by name
    with pytest.raises(ValueError, match="Probe: the endpoints are timed already"):
        metrics.time_requests(executor)
