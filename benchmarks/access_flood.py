"""Authorised /search latency before and during a flood of wrong API keys, on one keyed service in one run.

Starts `cliptuner serve --keys-file K` on 127.0.0.1 (fresh workspace, ``--model`` random init: no download),
indexes ``--gallery`` synthetic scenes with a ``write`` key, then sends ``--queries`` text queries to ``/search``
one at a time with a ``search`` key:

1. ``before``: nothing else runs (the baseline);
2. ``during``: while ``--flood-clients`` other processes send ``--flood`` calls in all, each with a different
   wrong key (well-formed ``ctk_<id>_<secret>`` values that are not in the keys file), as fast as they are
   answered. The queries run while the flood lasts; every flood call must be answered ``UNAUTHENTICATED``;
3. ``after``: idle again.

The ratio is p50 during ÷ p50 before. Each refused call is also an audit line (written by the gateway's writer
thread), so the figure includes that cost. On a 2-core machine the flood's clients take CPU from the service too.

    python benchmarks/access_flood.py                         # 1000 wrong keys, 200 queries a phase
    python benchmarks/access_flood.py --quick                 # 300 wrong keys, 40 queries

Returns (and writes to ``--json``): ``before``, ``during``, ``after`` (``p50_ms``, ``p99_ms``, ``n``), ``ratio``,
``flood`` (``calls``, ``refused``, ``other``, ``calls_per_s``), ``audit_lines`` and the command.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cliptuner-tiny")
    p.add_argument("--gallery", type=int, default=64)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--flood", type=int, default=1000, help="wrong-key calls in all")
    p.add_argument("--flood-clients", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the service")
    p.add_argument("--quick", action="store_true", help="--gallery 16 --queries 40 --flood 300")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.gallery, args.queries, args.flood = 16, 40, 300
    return args


def flood(port: int, calls: int, offset: int, results) -> None:
    """Send ``calls`` /search calls with wrong keys; put (refused, other, seconds) on ``results``."""
    os.environ.setdefault("JINA_HIDE_SURVEY", "1")
    import logging

    from docarray import DocList
    from jina import Client

    from executors.schemas import ClipDoc

    logging.disable(logging.ERROR)  # jina logs every refused call at ERROR
    client = Client(host="127.0.0.1", port=port, protocol="grpc")
    docs = DocList[ClipDoc]([ClipDoc(text="x")])
    refused = other = 0
    started = time.perf_counter()
    for i in range(calls):
        wrong = f"ctk_{offset + i:012x}_" + "B" * 43
        try:
            client.post("/search", inputs=docs, metadata=(("authorization", f"Bearer {wrong}"),))
            other += 1
        except Exception as exc:  # noqa: BLE001 - jina's BadServerFlow carries the status code in its text
            if "UNAUTHENTICATED" in str(exc):
                refused += 1
            else:
                other += 1
    results.put((refused, other, time.perf_counter() - started))


def timed_searches(client, texts, key) -> list[float]:
    from docarray import DocList

    from executors.schemas import ClipDoc

    seconds = []
    for text in texts:
        started = time.perf_counter()
        docs = client.post(
            "/search",
            inputs=DocList[ClipDoc]([ClipDoc(text=text)]),
            parameters={"limit": 5},
            metadata=(("authorization", f"Bearer {key}"),),
            return_type=DocList[ClipDoc],
        )
        seconds.append(time.perf_counter() - started)
        if len(docs[0].matches) != 5:
            raise RuntimeError(f"an authorised search answered {len(docs[0].matches)} matches, not 5")
    return seconds


def summary(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "n": len(seconds)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("JINA_HIDE_SURVEY", "1")
    os.environ.setdefault("JINA_OPTOUT_TELEMETRY", "1")
    from docarray import DocList
    from service import FlowProcess, png

    from cliptuner.serve.audit import tail
    from cliptuner.serve.keys import create_key
    from cliptuner.train import synthetic
    from executors.schemas import ClipDoc

    tmp = Path(tempfile.mkdtemp(prefix="cliptuner-bench-"))
    keys_file = tmp / "keys.json"
    write_key, _ = create_key(keys_file, "write", name="bench-writer")
    search_key, _ = create_key(keys_file, "search", name="bench-search")
    flow = FlowProcess(
        tmp / "ws", tmp / "flow.log", env={"CLIPTUNER_MODEL": args.model}, args=["--keys-file", str(keys_file)]
    )
    flow.start()
    failed = True
    try:
        client = flow.client()
        gallery = synthetic.generate(args.gallery, "generic", seed=0)
        docs = DocList[ClipDoc](
            [
                ClipDoc(id=f"g{i}", blob=png(np.asarray(img)), text=caption)
                for i, (img, caption) in enumerate(zip(gallery.images, gallery.captions))
            ]
        )
        client.post("/index", inputs=docs, metadata=(("authorization", f"Bearer {write_key}"),), request_size=32)
        texts = synthetic.generate(args.queries + 10, "generic", seed=2).captions
        timed_searches(client, texts[:10], search_key)  # warm-up
        queries = texts[10 : 10 + args.queries]
        before = timed_searches(client, queries, search_key)
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        share = args.flood // args.flood_clients
        workers = [
            ctx.Process(
                target=flood, args=(flow.port, share + (i < args.flood % args.flood_clients), i * 10**6, results)
            )
            for i in range(args.flood_clients)
        ]
        flood_started = time.perf_counter()
        for w in workers:
            w.start()
        during: list[float] = []
        while any(w.is_alive() for w in workers) or not during:
            during += timed_searches(client, queries[len(during) % len(queries) :][:10] or queries[:10], search_key)
            if len(during) >= 10 * args.queries:
                break
        for w in workers:
            w.join(600)
        flood_s = time.perf_counter() - flood_started
        counts = [results.get(timeout=30) for _ in workers]
        after = timed_searches(client, queries, search_key)
        time.sleep(1.0)
        audit = [e for e in tail(flow.workspace / "audit", 10**7) if e.get("result") == "refused"]
        failed = False
    finally:
        flow.stop()
        if not failed:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"failed; the Flow's log: {tmp / 'flow.log'}", file=sys.stderr)
    refused = sum(c[0] for c in counts)
    result = {
        "before": summary(before),
        "during": summary(during),
        "after": summary(after),
        "flood": {
            "calls": args.flood,
            "refused": refused,
            "other": sum(c[1] for c in counts),
            "calls_per_s": args.flood / flood_s,
            "clients": args.flood_clients,
        },
        "audit_lines": len(audit),
        "model": args.model,
        "command": "python benchmarks/access_flood.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "wall_s": time.perf_counter() - started,
    }
    result["ratio"] = result["during"]["p50_ms"] / result["before"]["p50_ms"]
    print("| phase | p50 ms | p99 ms | n |\n|---|---|---|---|")
    for phase in ("before", "during", "after"):
        r = result[phase]
        print(f"| {phase} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['n']} |")
    f = result["flood"]
    print(
        f"\nwrong-key calls: {f['calls']} from {f['clients']} clients at {f['calls_per_s']:.0f}/s; refused "
        f"{f['refused']}, other {f['other']}; refusals in the audit log: {result['audit_lines']}; "
        f"p50 during / before: {result['ratio']:.2f}×"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
