"""`/encode` through the gRPC Flow vs the in-process ONNX runtime, on the same PNG blobs, in one run.

Starts `cliptuner serve` (flows/flow.yml) on 127.0.0.1 with a fresh workspace whose base model is ``--model``
(random init: no download), then encodes the same ``--images`` PNG blobs ``--repeats`` times each way,
alternating, in requests of ``--batch`` docs: (a) a gRPC client through the gateway, (b) :class:`OnnxClip` on the
model directory the Flow serves, in this process. Both sides use ``--threads`` ONNX Runtime threads (the Flow's
encoder gets them through ``OMP_NUM_THREADS``/its setting; the in-process runtime through ``intra_op_threads``).
Prints images/s of each, and the ratio Flow / in-process (the median over repeats).

    python benchmarks/flow_encode.py --model ViT-B-32 --images 128 --batch 32 --repeats 5
    python benchmarks/flow_encode.py --model cliptuner-tiny --images 512 --batch 32 --repeats 5

The topology matters: `/encode` goes gateway → encoder (the tuner binds no default handler, so the gateway never
sends it query traffic). Timings depend on the machine and its load; the ratio is measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="cliptuner-tiny", help="base model of the served workspace (random init)")
    p.add_argument("--images", type=int, default=128, help="PNG blobs encoded per repeat")
    p.add_argument("--size", type=int, default=256, help="side of the square test images, in pixels")
    p.add_argument("--batch", type=int, default=32, help="docs per request (and per in-process call)")
    p.add_argument("--repeats", type=int, default=5, help="alternating measurements of each side")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads on both sides")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    os.environ.setdefault("JINA_HIDE_SURVEY", "1")
    os.environ.setdefault("JINA_OPTOUT_TELEMETRY", "1")
    from docarray import DocList
    from service import FlowProcess, png

    from cliptuner.registry import Registry
    from cliptuner.runtime import OnnxClip
    from executors.schemas import ClipDoc

    rng = np.random.default_rng(0)
    blobs = [png(rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)) for _ in range(args.images)]
    workspace = Path(tempfile.mkdtemp(prefix="cliptuner-bench-")) / "ws"
    flow = FlowProcess(workspace, workspace.parent / "flow.log",
                       env={"CLIPTUNER_MODEL": args.model, "OMP_NUM_THREADS": str(args.threads)})
    t0 = time.perf_counter()
    flow.start()
    startup = time.perf_counter() - t0
    try:
        registry = Registry(workspace / "models")
        clip = OnnxClip(registry.current_path(), device="cpu", intra_op_threads=args.threads)
        client = flow.client()
        batches = [blobs[i:i + args.batch] for i in range(0, len(blobs), args.batch)]

        def through_flow() -> np.ndarray:
            out = []
            for batch in batches:
                docs = DocList[ClipDoc]([ClipDoc(id=str(i), blob=b) for i, b in enumerate(batch)])
                res = client.post("/encode", inputs=docs, return_type=DocList[ClipDoc], request_size=len(batch))
                out.extend(d.embedding for d in res)
            return np.stack(out)

        def in_process() -> np.ndarray:
            return np.concatenate([clip.encode_images(batch) for batch in batches])

        reference, served = in_process(), through_flow()  # warm-up, and the two must agree
        max_diff = float(np.abs(reference - served).max())
        times = {"flow": [], "in_process": []}
        for _ in range(args.repeats):
            for name, fn in (("in_process", in_process), ("flow", through_flow)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    finally:
        flow.stop()

    rates = {name: [args.images / t for t in ts] for name, ts in times.items()}
    ratios = [f / i for f, i in zip(rates["flow"], rates["in_process"])]
    result = {
        "model": args.model, "images": args.images, "size": args.size, "batch": args.batch, "repeats": args.repeats,
        "threads": args.threads, "flow_images_per_s": statistics.median(rates["flow"]),
        "in_process_images_per_s": statistics.median(rates["in_process"]), "ratio_median": statistics.median(ratios),
        "ratios": ratios, "max_abs_diff": max_diff, "startup_s": startup,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
        "command": "python benchmarks/flow_encode.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(f"{args.model}: /encode through the Flow {result['flow_images_per_s']:.1f} images/s, in-process "
          f"{result['in_process_images_per_s']:.1f} images/s; ratio {result['ratio_median']:.2f} "
          f"(median of {args.repeats}; each: {', '.join(f'{r:.2f}' for r in ratios)}); max |diff| {max_diff:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
