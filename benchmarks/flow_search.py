"""`/search` through the gRPC Flow on a 100k-doc index: p50/p99 latency and recall@10, against the store in-process.

The same clustered unit vectors as ``search.py`` (``--n`` × the model's embedding size, ``--spread``, data seed
``--seed``) are stored, with a short text each, in the indexer's collection of a fresh workspace whose base model
is ``--model`` (random init: no download), before the Flow starts; the indexer then opens a collection of ``--n``
docs in the model's version, as if they had been indexed, without encoding ``--n`` texts first. Then, one query at
a time, ``--queries`` times each, alternating:

- ``in-process``: :meth:`cliptuner.index.embedded.Collection.search` on that collection in this process (before the Flow
  opens it), the baseline: the search alone;
- ``flow, vector query``: a ``/search`` doc that carries the query vector and the model version (what ``/encode``
  returns) through gateway → encoder → indexer: the search plus the service's path;
- ``flow, text query``: a ``/search`` doc with a caption: the encoder embeds it first (ONNX text tower), so this is
  what a user's text search costs end to end.

recall@10 of the vector queries through the Flow is measured against exact top-10 (numpy), so the service's path
is checked to return what the store finds. The HNSW settings are the indexer's defaults (chosen by ``search.py``
on another data seed).

    python benchmarks/flow_search.py                                   # 100k × 512 (ViT-B-32), 300 queries
    python benchmarks/flow_search.py --model cliptuner-tiny --n 5000 --queries 50   # quick

Returns (and ``--json`` writes) ``in_process``, ``flow_vector`` and ``flow_text``, each ``{p50_ms, p99_ms,
queries_per_s}``, plus ``recall_at_10`` (vector queries through the Flow), ``in_process_recall_at_10``,
``fill_s``, ``startup_s``, ``n``, ``dim``, ``model`` and the machine, versions and command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

K = 10


def latencies(fn, queries, warmup: int = 10) -> tuple[list[float], list]:
    """Call ``fn(query)`` for each query after ``warmup`` calls; (seconds per call, answers)."""
    for q in queries[:warmup]:
        fn(q)
    times, answers = [], []
    for q in queries:
        started = time.perf_counter()
        answers.append(fn(q))
        times.append(time.perf_counter() - started)
    return times, answers


def summary(times: list[float]) -> dict:
    return {
        "p50_ms": 1000 * float(np.median(times)),
        "p99_ms": 1000 * float(np.percentile(times, 99)),
        "queries_per_s": len(times) / sum(times),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="ViT-B-32", help="base model of the served workspace (random init)")
    p.add_argument("--n", type=int, default=100_000, help="docs in the index")
    p.add_argument("--queries", type=int, default=300, help="queries of each kind")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=2.0, help="noise norm around a cluster centre (as search.py)")
    p.add_argument("--seed", type=int, default=1, help="data seed (search.py chose the HNSW settings on seed 0)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime / BLAS threads of the service")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def fill_and_search(
    path: Path, version: str, gallery: np.ndarray, queries: np.ndarray
) -> tuple[float, str, list, list]:
    """Store ``gallery`` in the indexer's collection at ``path`` (its default settings), then search it in this
    process; ``(fill seconds, backend, seconds per query, ids found per query)``."""
    from cliptuner.index.embedded import Collection, StoredDoc

    n = len(gallery)
    fill_started = time.perf_counter()
    with Collection(path) as store:
        store.rebuild(version, lambda docs: np.zeros((0, 1), np.float32))
        for start in range(0, n, 20_000):
            rows = range(start, min(start + 20_000, n))
            store.upsert(
                [StoredDoc(id=str(i), text=f"gallery item {i}") for i in rows],
                gallery[start : start + len(rows)],
                version,
            )
        fill_s = time.perf_counter() - fill_started
        backend = store.stats()["backend"]
        times, found = latencies(lambda q: [doc_id for doc_id, _ in store.search(q, K, version=version)[0]], queries)
    return fill_s, backend, times, found


class FlowQueries:
    """``/search`` requests through the Flow: by vector (in the model's version) and by caption."""

    def __init__(self, client, version: str) -> None:
        from docarray import DocList

        from executors.schemas import ClipDoc

        self.docs, self.doc = DocList[ClipDoc], ClipDoc
        self.client = client
        self.version = version

    def vector_query(self, q: np.ndarray) -> list[str]:
        res = self.client.post(
            "/search",
            inputs=self.docs([self.doc(id="q", embedding=q, model_version=self.version)]),
            parameters={"limit": K},
            return_type=self.docs,
        )
        return [m.id for m in res[0].matches]

    def text_query(self, i: int) -> int:
        res = self.client.post(
            "/search",
            inputs=self.docs([self.doc(id="q", text=f"gallery item {i}")]),
            parameters={"limit": K},
            return_type=self.docs,
        )
        return len(res[0].matches)


def recall(found_lists, truth: np.ndarray) -> float:
    """Share of the exact top-``K`` (``truth``, one row per query) among the ids found."""
    return sum(len({int(i) for i in found} & set(t.tolist())) for found, t in zip(found_lists, truth)) / (
        K * len(truth)
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("JINA_HIDE_SURVEY", "1")
    os.environ.setdefault("JINA_OPTOUT_TELEMETRY", "1")

    from service import FlowProcess

    from benchmarks.search import clustered
    from cliptuner.config import ModelSpec
    from cliptuner.model.manifest import ModelManifest
    from cliptuner.model.registry import Registry
    from cliptuner.serve.bootstrap import ensure_current

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="cliptuner-flow-search-bench-"))
    workspace = work / "ws"
    registry = Registry(workspace / "models")
    version = ensure_current(registry, ModelSpec(args.model))
    dim = ModelManifest.read(registry.path(version)).embed_dim
    both = clustered(args.n + args.queries, dim, args.clusters, args.spread, args.seed)
    gallery, queries = both[: args.n], both[args.n :]
    truth = np.argsort(-(queries @ gallery.T), axis=1)[:, :K]
    fill_s, backend, in_process, local = fill_and_search(workspace / "index" / "0", version, gallery, queries)

    flow = FlowProcess(
        workspace, work / "flow.log", env={"CLIPTUNER_MODEL": args.model, "OMP_NUM_THREADS": str(args.threads)}
    )
    t0 = time.perf_counter()
    flow.start()
    startup = time.perf_counter() - t0
    try:
        search = FlowQueries(flow.client(), version)
        flow_vector, answers = latencies(search.vector_query, queries)
        flow_text, counts = latencies(search.text_query, list(range(args.queries)))
    finally:
        flow.stop()

    if min(counts) != K:
        raise SystemExit(f"a text query got {min(counts)} matches, expected {K}: see {work / 'flow.log'}")
    shutil.rmtree(work, ignore_errors=True)  # kept when the run failed: flow.log is there

    import onnxruntime

    result = {
        "model": args.model,
        "n": args.n,
        "dim": dim,
        "queries": args.queries,
        "spread": args.spread,
        "seed": args.seed,
        "backend": backend,
        "fill_s": fill_s,
        "startup_s": startup,
        "recall_at_10": recall(answers, truth),
        "in_process_recall_at_10": recall(local, truth),
        "in_process": summary(in_process),
        "flow_vector": summary(flow_vector),
        "flow_text": summary(flow_text),
        "threads": args.threads,
        "wall_s": time.perf_counter() - started,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "command": "python benchmarks/flow_search.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def print_table(result: dict) -> None:
    print(
        f"{result['n']} docs × {result['dim']} ({result['model']}, {result['backend']}), {result['queries']} queries "
        f"of each kind, top-{K}; recall@10 through the Flow {result['recall_at_10']:.3f} "
        f"(in-process {result['in_process_recall_at_10']:.3f})"
    )
    print("| path | p50 ms | p99 ms | queries/s |")
    print("|---|---:|---:|---:|")
    for key, name in (
        ("in_process", "in-process search"),
        ("flow_vector", "Flow, vector query"),
        ("flow_text", "Flow, text query"),
    ):
        row = result[key]
        print(f"| {name} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['queries_per_s']:.0f} |")


if __name__ == "__main__":
    main()
