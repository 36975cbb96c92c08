"""`/encode` through the gRPC Flow vs the in-process ONNX runtime, on the same images, in one run.

Starts `cliptuner serve` (flows/flow.yml, or ``--flow``) on 127.0.0.1 with a fresh workspace whose base model is
``--model`` (random init: no download), then encodes the same ``--images`` PNG blobs ``--repeats`` times each way,
alternating, in requests of ``--batch`` docs: (a) a gRPC client through the gateway, (b) :class:`OnnxClip` on the
model directory the Flow serves, in this process. Both sides use ``--threads`` ONNX Runtime threads (the Flow's
encoder gets them through ``OMP_NUM_THREADS``; the in-process runtime through ``intra_op_threads``). Prints
images/s of each, and the ratio Flow / in-process (the median over repeats), for each client mode:

- ``sequential``: one ``post`` per request, each waiting for its answer (the latency-bound worst case: nothing
  overlaps the transfer and decoding of one request with the encoding of another);
- ``streamed``: one ``post`` of all the images with ``request_size=--batch``, Jina's usual way to send many docs:
  the client keeps several requests in flight, so transfers overlap encoding.

``--content`` chooses the PNGs: ``noise`` (uniform random pixels: incompressible, ~3 bytes a pixel, the worst case
for transfer) or ``scenes`` (the synthetic scenes of :mod:`cliptuner.train.synthetic`: flat colours and textures that
compress like drawings).

    python benchmarks/flow_encode.py --model ViT-B-32 --images 64 --batch 32 --repeats 5
    python benchmarks/flow_encode.py --model cliptuner-tiny --images 256 --batch 32 --repeats 5

The topology matters: `/encode` goes gateway → encoder → indexer (the tuner binds no default handler, so the
gateway never sends it query traffic; the indexer forwards the encoder's answer, which carries vectors, not image
bytes). Timings depend on the machine and its load; the ratio is measured side by side.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT / "tests" / "integration"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="cliptuner-tiny", help="base model of the served workspace (random init)")
    p.add_argument("--images", type=int, default=128, help="PNG blobs encoded per repeat")
    p.add_argument("--size", type=int, default=256, help="side of the square test images, in pixels")
    p.add_argument("--batch", type=int, default=32, help="docs per request (and per in-process call)")
    p.add_argument("--repeats", type=int, default=5, help="alternating measurements of each side")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads on both sides")
    p.add_argument("--content", choices=("noise", "scenes"), default="noise", help="what the PNGs show")
    p.add_argument(
        "--clients",
        nargs="+",
        choices=("sequential", "streamed"),
        default=["sequential", "streamed"],
        help="client modes measured",
    )
    p.add_argument("--flow", default=None, help="the Flow YAML served (default: flows/flow.yml)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def png_blobs(count: int, size: int, content: str) -> list[bytes]:
    """``count`` PNGs of ``size``×``size``: uniform random pixels (``noise``) or synthetic ``scenes``."""
    from service import png

    if content == "noise":
        rng = np.random.default_rng(0)
        arrays = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(count)]
    else:
        from cliptuner.train.synthetic import generate

        arrays = generate(count, "generic", seed=0, image_size=size).images
    return [png(a) for a in arrays]


class EncodeSides:
    """The ways of encoding the same blobs: in this process, and through the Flow with each client mode."""

    def __init__(self, client, clip, blobs: list[bytes], batch: int) -> None:
        from docarray import DocList

        from executors.schemas import ClipDoc

        self.docs, self.doc = DocList[ClipDoc], ClipDoc
        self.client = client
        self.clip = clip
        self.blobs = blobs
        self.batch = batch
        self.batches = [blobs[i : i + batch] for i in range(0, len(blobs), batch)]

    def sequential(self) -> np.ndarray:
        """One ``post`` per request, each waiting for its answer."""
        out = []
        for batch in self.batches:
            docs = self.docs([self.doc(id=str(i), blob=b) for i, b in enumerate(batch)])
            res = self.client.post("/encode", inputs=docs, return_type=self.docs, request_size=len(batch))
            out.extend(d.embedding for d in res)
        return np.stack(out)

    def streamed(self) -> np.ndarray:
        """One ``post`` of all the blobs in requests of ``batch`` docs."""
        docs = self.docs([self.doc(id=str(i), blob=b) for i, b in enumerate(self.blobs)])
        res = self.client.post("/encode", inputs=docs, return_type=self.docs, request_size=self.batch)
        by_id = {d.id: d.embedding for d in res}  # answers may arrive in another order
        return np.stack([by_id[str(i)] for i in range(len(self.blobs))])

    def in_process(self) -> np.ndarray:
        return np.concatenate([self.clip.encode_images(batch) for batch in self.batches])


def measure(sides: dict, repeats: int) -> tuple[float, dict[str, list[float]]]:
    """Max |difference| of each Flow side from the in-process one, and the seconds of each side per repeat
    (the sides alternate within a repeat; the first in-process call warms up)."""
    reference = sides["in_process"]()  # warm-up, and the sides must agree
    max_diff = max(float(np.abs(reference - fn()).max()) for name, fn in sides.items() if name != "in_process")
    times = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return max_diff, times


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("JINA_HIDE_SURVEY", "1")
    os.environ.setdefault("JINA_OPTOUT_TELEMETRY", "1")
    from service import FlowProcess

    from cliptuner.model.registry import Registry
    from cliptuner.model.runtime import OnnxClip

    blobs = png_blobs(args.images, args.size, args.content)
    workspace = Path(tempfile.mkdtemp(prefix="cliptuner-bench-")) / "ws"
    flow = FlowProcess(
        workspace,
        workspace.parent / "flow.log",
        env={"CLIPTUNER_MODEL": args.model, "OMP_NUM_THREADS": str(args.threads)},
        args=["--flow", args.flow] if args.flow else [],
    )
    t0 = time.perf_counter()
    flow.start()
    startup = time.perf_counter() - t0
    try:
        registry = Registry(workspace / "models")
        clip = OnnxClip(registry.current_path(), device="cpu", intra_op_threads=args.threads)
        encode = EncodeSides(flow.client(), clip, blobs, args.batch)
        by_mode = {"sequential": encode.sequential, "streamed": encode.streamed}
        sides = {"in_process": encode.in_process, **{name: by_mode[name] for name in args.clients}}
        max_diff, times = measure(sides, args.repeats)
    finally:
        flow.stop()
    shutil.rmtree(workspace.parent, ignore_errors=True)  # kept when the run failed: flow.log is there
    result = report(args, argv, blobs, times, max_diff, startup)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def report(args: argparse.Namespace, argv, blobs: list[bytes], times: dict, max_diff: float, startup: float) -> dict:
    """The results (images/s of each side, Flow ÷ in-process ratios), printed as they are gathered."""
    rates = {name: [args.images / t for t in ts] for name, ts in times.items()}
    result = {
        "model": args.model,
        "content": args.content,
        "images": args.images,
        "size": args.size,
        "mean_png_bytes": int(np.mean([len(b) for b in blobs])),
        "batch": args.batch,
        "repeats": args.repeats,
        "threads": args.threads,
        "in_process_images_per_s": statistics.median(rates["in_process"]),
        "max_abs_diff": max_diff,
        "startup_s": startup,
        "clients": {},
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "command": "python benchmarks/flow_encode.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(
        f"{args.model}, {args.images} {args.content} PNGs {args.size}x{args.size} (mean "
        f"{result['mean_png_bytes'] / 1e3:.0f} kB), requests of {args.batch}: in-process "
        f"{result['in_process_images_per_s']:.1f} images/s; max |diff| {max_diff:.1e}"
    )
    for name in args.clients:
        ratios = [f / i for f, i in zip(rates[name], rates["in_process"])]
        result["clients"][name] = {
            "flow_images_per_s": statistics.median(rates[name]),
            "ratio_median": statistics.median(ratios),
            "ratios": ratios,
        }
        print(
            f"  {name:10s} client: Flow {statistics.median(rates[name]):.1f} images/s, ratio "
            f"{statistics.median(ratios):.2f} (median of {args.repeats}; each: "
            f"{', '.join(f'{r:.2f}' for r in ratios)})"
        )
    return result


if __name__ == "__main__":
    main()
