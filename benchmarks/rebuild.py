"""Re-embedding the index for a new model version vs encoding the same content in-process, in one run.

A :class:`~executors.indexer.CLIPIndexer` (in this process, no Flow) on a fresh workspace stores ``--docs`` PNG
images of synthetic scenes; then a second model version is published (the same weights: the work is the same) and
the indexer's :meth:`~executors.indexer.CLIPIndexer.sync` re-embeds every stored doc into it and swaps — what
happens after a ``/train``. The baseline is :meth:`OnnxClip.encode_images` of the same PNGs with the same model,
in batches of the same size, in the same process. Both sides use ``--threads`` ONNX Runtime threads. The ratio
is rebuild docs/s ÷ in-process images/s; one row per vector store (``--stores``).

    python benchmarks/rebuild.py --docs 2000 --size 224
    python benchmarks/rebuild.py --docs 200 --size 64 --stores embedded     # a quick check

What the rebuild adds to the encoding: reading each doc's content back from the store, the checks of every
image (the same as on ``/index``), writing the new vectors in batches (one transaction each, so that a killed
rebuild resumes), and the swap.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def one_store(backend: str, blobs: list[bytes], args: argparse.Namespace) -> dict:
    """Index ``blobs`` with ``backend``, publish v2, time the rebuild and the in-process baseline."""
    from docarray import DocList

    from cliptuner.model.registry import Registry
    from cliptuner.model.runtime import OnnxClip
    from executors import ClipDoc, CLIPIndexer

    work = Path(tempfile.mkdtemp(prefix="cliptuner-rebuild-bench-"))
    try:
        indexer = CLIPIndexer(
            workspace=str(work),
            model=args.model,
            device="cpu",
            intra_op_threads=args.threads,
            batch_size=args.batch,
            rebuild_batch_size=args.batch,
            watch_interval=0,
            backend="milvus" if backend == "milvus" else "exact",
        )
        try:
            for start in range(0, len(blobs), 256):
                docs = DocList[ClipDoc](
                    [ClipDoc(id=f"d{i}", blob=blob) for i, blob in enumerate(blobs[start : start + 256], start)]
                )
                indexer._index(docs, list(range(len(docs))))
            registry = Registry(work / "models")
            registry.publish(registry.path("v1"))  # v2: the same weights, so both sides do the same work
            clip = OnnxClip(registry.path("v2"), device="cpu", intra_op_threads=args.threads)
            batches = [blobs[i : i + args.batch] for i in range(0, len(blobs), args.batch)]

            def baseline() -> float:
                started = time.perf_counter()
                for batch in batches:
                    clip.encode_images(batch)
                return time.perf_counter() - started

            baseline()  # warm-up
            before = baseline()
            started = time.perf_counter()
            rebuilt = indexer.sync()
            rebuild = time.perf_counter() - started
            after = baseline()
            assert rebuilt is not None and rebuilt["count"] == len(blobs), rebuilt
            assert indexer.collection.version == "v2"
        finally:
            indexer.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    in_process = len(blobs) / statistics.mean([before, after])
    return {
        "store": backend,
        "rebuild_docs_per_s": len(blobs) / rebuild,
        "in_process_images_per_s": in_process,
        "ratio": (len(blobs) / rebuild) / in_process,
        "rebuild_s": rebuild,
        "baseline_s": [before, after],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--docs", type=int, default=2000, help="stored images")
    p.add_argument("--size", type=int, default=224, help="side of the images, in pixels")
    p.add_argument("--model", default="cliptuner-tiny", help="base model (random init)")
    p.add_argument("--batch", type=int, default=64, help="images per ONNX call on both sides")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads on both sides")
    p.add_argument("--stores", nargs="+", default=["embedded", "milvus"], choices=("embedded", "milvus"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("JINA_HIDE_SURVEY", "1")
    os.environ.setdefault("JINA_OPTOUT_TELEMETRY", "1")

    from cliptuner.train.synthetic import generate

    blobs = [png(image) for image in generate(args.docs, "generic", seed=5, image_size=args.size).images]
    rows = [one_store(store, blobs, args) for store in args.stores]
    result = {
        "docs": args.docs,
        "size": args.size,
        "model": args.model,
        "batch": args.batch,
        "threads": args.threads,
        "rows": rows,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "command": "python benchmarks/rebuild.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(
        f"{args.docs} PNG scenes {args.size}x{args.size}, {args.model}, batches of {args.batch}, "
        f"{args.threads} ORT threads"
    )
    print("| store | rebuild docs/s | in-process images/s | ratio |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['store']} | {row['rebuild_docs_per_s']:.1f} | {row['in_process_images_per_s']:.1f} | "
            f"{row['ratio']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
