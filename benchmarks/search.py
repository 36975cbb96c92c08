"""Vector search at 100k × 512: recall@10 and queries/s of each store against exact search, in one run.

Data: clustered unit vectors (``--clusters`` centres; each point a centre plus Gaussian noise, normalised), the
shape of CLIP image embeddings of a gallery with many near-duplicates. Queries are other draws from the same
clusters. The ground truth is exact top-10 by inner product (numpy). Each store answers one query per call, as
``/search`` does for one query doc; queries/s is over ``--queries`` calls after a warm-up.

Honest settings: the HNSW settings are chosen on data seed ``--choose-seed`` (the cheapest setting of the grid
that reaches ``--target`` recall@10, by queries/s), and every reported number comes from another data seed,
``--report-seed``, that chose nothing.

Stores measured (``--stores``):

- ``exact``: :class:`cliptuner.index.embedded.Collection` with ``backend="exact"`` (the baseline: its queries/s is the
  denominator of every ratio);
- ``hnsw``: the same collection with ``backend="usearch"`` and the chosen :class:`HnswSettings`;
- ``hnsw-f16``, ``hnsw-i8``, ``exact-f16``, ``exact-i8``: those two holding the vectors as float16 or int8
  (``Collection(dtype=...)``), with the same settings;
- ``milvus``: :class:`cliptuner.index.milvus.MilvusCollection` on Milvus Lite (a local file, in-process).

    python benchmarks/search.py                       # 100k × 512, choose on seed 0, report on seed 1
    python benchmarks/search.py --n 20000 --queries 200 --grid-connectivity 16 --grid-expansion 64 128  # quick

Memory: megabytes per million vectors that each embedded store holds in RAM (``Collection.memory_bytes``: the
matrix, or the HNSW graph with its vectors and links, which then is the only copy), and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cliptuner.index.embedded import Collection, HnswSettings, StoredDoc  # noqa: E402

K = 10


def clustered(n: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """``n`` unit vectors around ``clusters`` random unit centres (the same centres for a given seed)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    points = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)).astype(
        np.float32
    ) / np.sqrt(dim)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def data(args: argparse.Namespace, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gallery [n, dim], queries [q, dim], exact top-K ids [q, K]) of one data seed."""
    both = clustered(args.n + args.queries, args.dim, args.clusters, args.spread, seed)
    gallery, queries = both[: args.n], both[args.n :]
    truth = np.argsort(-(queries @ gallery.T), axis=1)[:, :K]
    return gallery, queries, truth


def fill(store, gallery: np.ndarray, batch: int = 20_000) -> float:
    """Upsert the gallery (ids ``"<row>"``); seconds taken."""
    started = time.perf_counter()
    for start in range(0, len(gallery), batch):
        rows = range(start, min(start + batch, len(gallery)))
        store.upsert([StoredDoc(id=str(i), text=f"doc {i}") for i in rows], gallery[start : start + len(rows)], "v1")
    return time.perf_counter() - started


def measure(store, queries: np.ndarray, truth: np.ndarray, warmup: int = 20) -> dict:
    """recall@K against ``truth`` and queries/s, one query per call."""
    for q in queries[:warmup]:
        store.search(q, K, version="v1")
    found, latencies = [], []
    for q in queries:
        started = time.perf_counter()
        hits = store.search(q, K, version="v1")[0]
        latencies.append(time.perf_counter() - started)
        found.append([int(doc_id) for doc_id, _ in hits])
    hits = sum(len(set(f) & set(t.tolist())) for f, t in zip(found, truth))
    return {
        "recall_at_10": hits / (K * len(queries)),
        "qps": len(queries) / sum(latencies),
        "p50_ms": 1000 * float(np.median(latencies)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
    }


EMBEDDED = {
    "exact": ("exact", "f32"),
    "exact-f16": ("exact", "f16"),
    "exact-i8": ("exact", "i8"),
    "hnsw": ("usearch", "f32"),
    "hnsw-f16": ("usearch", "f16"),
    "hnsw-i8": ("usearch", "i8"),
}


def hnsw_store(root: Path, settings: HnswSettings, dtype: str = "f32") -> Collection:
    return Collection(root, backend="usearch", hnsw=settings, dtype=dtype)


def choose(args: argparse.Namespace, work: Path) -> tuple[HnswSettings, list[dict]]:
    """The grid on the choice seed: per connectivity one graph, searched with each expansion."""
    gallery, queries, truth = data(args, args.choose_seed)
    with Collection(work / "choose-exact", backend="exact") as exact:
        fill(exact, gallery)
        base = measure(exact, queries, truth)
    rows = []
    for connectivity in args.grid_connectivity:
        root = work / f"choose-m{connectivity}"
        with hnsw_store(root, HnswSettings(connectivity=connectivity, expansion_add=args.expansion_add)) as store:
            build = fill(store, gallery)
        for expansion in args.grid_expansion:
            settings = HnswSettings(
                connectivity=connectivity, expansion_add=args.expansion_add, expansion_search=expansion
            )
            with hnsw_store(root, settings) as store:  # the saved graph, searched with this expansion
                result = measure(store, queries, truth)
            rows.append(
                {
                    "connectivity": connectivity,
                    "expansion_search": expansion,
                    "build_s": build,
                    **result,
                    "qps_ratio": result["qps"] / base["qps"],
                }
            )
            print(
                f"  choose: M={connectivity} ef={expansion}: recall@10 {result['recall_at_10']:.3f}, "
                f"{result['qps']:.0f} q/s ({result['qps'] / base['qps']:.1f}x exact)",
                file=sys.stderr,
            )
    good = [r for r in rows if r["recall_at_10"] >= args.target]
    best = max(good, key=lambda r: r["qps"]) if good else max(rows, key=lambda r: r["recall_at_10"])
    return HnswSettings(
        connectivity=best["connectivity"], expansion_add=args.expansion_add, expansion_search=best["expansion_search"]
    ), rows


def report(args: argparse.Namespace, work: Path, settings: HnswSettings) -> dict:
    gallery, queries, truth = data(args, args.report_seed)
    out: dict = {}
    for name in ["exact"] + [s for s in args.stores if s in EMBEDDED and s != "exact"]:  # exact: the baseline
        backend, dtype = EMBEDDED[name]
        with Collection(work / name, backend=backend, hnsw=settings, dtype=dtype) as store:
            build = fill(store, gallery)
            out[name] = {
                **measure(store, queries, truth),
                "fill_s": build,
                "mb_per_million": store.memory_bytes() / args.n,
            }  # bytes per vector = MB per million
    if "milvus" in args.stores:
        from cliptuner.index.milvus import MilvusCollection

        with MilvusCollection(work / "milvus") as store:
            build = fill(store, gallery)
            out["milvus"] = {**measure(store, queries, truth), "fill_s": build}
    for row in out.values():
        row["qps_ratio"] = row["qps"] / out["exact"]["qps"]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--n", type=int, default=100_000, help="gallery vectors")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument(
        "--spread",
        type=float,
        default=2.5,
        help="noise norm around a cluster centre (unit centres): the larger, the harder for a graph",
    )
    p.add_argument("--choose-seed", type=int, default=0)
    p.add_argument("--report-seed", type=int, default=1)
    p.add_argument("--target", type=float, default=0.95, help="recall@10 the chosen HNSW setting must reach")
    p.add_argument("--grid-connectivity", type=int, nargs="+", default=[16, 32])
    p.add_argument("--grid-expansion", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--expansion-add", type=int, default=128)
    p.add_argument(
        "--settings",
        type=int,
        nargs=2,
        metavar=("CONNECTIVITY", "EXPANSION_SEARCH"),
        default=None,
        help="skip the grid and report with these HNSW settings (the ones an earlier run chose on --choose-seed)",
    )
    p.add_argument(
        "--stores", nargs="+", default=["exact", "hnsw", "hnsw-f16", "hnsw-i8", "milvus"], choices=(*EMBEDDED, "milvus")
    )
    p.add_argument("--threads", type=int, default=2, help="BLAS threads of the exact search")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    with tempfile.TemporaryDirectory(prefix="cliptuner-search-bench-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        if args.settings:
            settings, grid = (
                HnswSettings(
                    connectivity=args.settings[0], expansion_add=args.expansion_add, expansion_search=args.settings[1]
                ),
                [],
            )
        else:
            settings, grid = choose(args, work)
        results = report(args, work, settings)
        wall = time.perf_counter() - started
    result = {
        "n": args.n,
        "dim": args.dim,
        "queries": args.queries,
        "clusters": args.clusters,
        "spread": args.spread,
        "choose_seed": args.choose_seed,
        "report_seed": args.report_seed,
        "target": args.target,
        "chosen": dataclasses.asdict(settings),
        "grid": grid,
        "report": results,
        "wall_s": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "command": "python benchmarks/search.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(
        f"{args.n} x {args.dim} ({args.clusters} clusters), {args.queries} queries, report seed "
        f"{args.report_seed}; HNSW chosen on seed {args.choose_seed}: connectivity {settings.connectivity}, "
        f"expansion_search {settings.expansion_search}"
    )
    print("| store | recall@10 | queries/s | × exact | p50 ms | p99 ms | fill s | MB per million vectors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in results.items():
        memory = f"{row['mb_per_million']:.0f}" if "mb_per_million" in row else "–"
        print(
            f"| {name} | {row['recall_at_10']:.3f} | {row['qps']:.0f} | {row['qps_ratio']:.1f} | "
            f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['fill_s']:.1f} | {memory} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
