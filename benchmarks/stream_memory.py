"""Reading pairs as a stream (tar shards) vs whole into memory (CSV + image files): peak memory and samples/s.

The same ``--pairs`` pairs (small JPEGs, ``--image-size`` pixels a side, seeded noise so that every image is
distinct, and a caption each) are written twice under ``--workdir``: as img2dataset-style tar shards of
``--per-shard`` pairs (with ``{shard}_stats.json``), and as a PAIRS CSV beside one JPEG file per pair. Generation
is timed first (``generate_s``).

Each variant then runs in a fresh child process (``python -m benchmarks.stream_memory --child VARIANT``), so that
its peak resident set is its own: the child imports torch and open_clip and builds ``cliptuner-tiny``'s training
transform and tokenizer (the model is dropped), records its resident set (``rss_setup_mb``), opens the data
(``open_s``), reads training batches of ``--batch`` pairs — decode, the training transform, tokenizing; no
model — for one epoch, or its first ``--max-batches`` (the in-memory side holds every pair once the data is open and
plans its whole epoch before the first batch; the stream holds its buffer from the first batch on), and records
``VmHWM`` from ``/proc/self/status`` (``peak_mb``):

- ``csv`` (the baseline): :func:`cliptuner.train.data.load_csv` (every path checked, the pairs held in a
  :class:`~cliptuner.train.data.PairSet`) and :func:`~cliptuner.train.data.make_loader` (shuffled batches of unique
  images, the epoch planned up front).
- ``stream``: :func:`cliptuner.train.streaming.open_stream` (pairs counted from the stats files) and
  :class:`cliptuner.train.stream_loader.StreamLoader` with ``--shuffle-buffer`` samples held.

Both read in the child's own process (no DataLoader workers) with ``--threads`` torch threads. The ratios are
stream ÷ csv, measured in the same run: ``peak_ratio``, ``growth_ratio`` (peak minus the set-up resident set: what
reading the data cost) and ``speed_ratio`` (samples/s).

    python benchmarks/stream_memory.py                       # 200000 pairs, a whole epoch each (~20 min on 1 core)
    python benchmarks/stream_memory.py --max-batches 300      # 200000 pairs, 300 batches read each (~5 min)
    python benchmarks/stream_memory.py --pairs 20000 --json /tmp/stream_memory.json
    python benchmarks/stream_memory.py --quick               # = --pairs 4000 --per-shard 500

Counting the pairs of the shards from their tar headers alone (what a stream without img2dataset's stats files
costs before training) is timed too: ``header_scan_s``.

Returns (and ``--json`` writes): ``variants`` ({csv, stream}: ``samples``, ``batches``, ``open_s``, ``read_s``,
``samples_per_s``, ``rss_setup_mb``, ``peak_mb``, ``growth_mb``), ``peak_ratio``, ``growth_ratio``,
``speed_ratio``, ``generate_s``, ``header_scan_s``, ``disk_mb`` ({tar, csv}), and ``pairs``, ``per_shard``, ``shards``,
``image_size``, ``batch``, ``shuffle_buffer``, ``threads``, ``max_batches``, ``machine``, ``python``, ``torch``, ``wall_s``,
``command``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUICK = {"pairs": 4000, "per_shard": 500}  # what --quick sets
VARIANTS = ("csv", "stream")  # the baseline first
FILES_PER_FOLDER = 1000  # the CSV variant's images, so that no folder holds them all


def _status_kb(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


# -- the data ------------------------------------------------------------------------------------------------------
def _samples(pairs: int, size: int, seed: int) -> Iterator[tuple[str, bytes, str]]:
    """``(key, jpeg bytes, caption)``: seeded noise (every image distinct) with a gradient, a caption each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 96, size, dtype=np.float32)[None, :, None]
    for i in range(pairs):
        noise = rng.integers(0, 160, size=(size, size, 3), dtype=np.uint8)
        pixels = np.clip(noise + ramp, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
        yield f"{i:09d}", buffer.getvalue(), f"noise picture number {i} with a warm ramp"


def generate(workdir: Path, pairs: int, size: int, per_shard: int, seed: int) -> dict:
    """Write the pairs as tar shards (``workdir/shards``) and as a CSV + JPEG files (``workdir/csv``)."""
    from cliptuner.train.streaming import count_tar, write_tar_shards

    shards_dir, csv_dir = workdir / "shards", workdir / "csv"
    for folder in (shards_dir, csv_dir):
        shutil.rmtree(folder, ignore_errors=True)
    csv_dir.mkdir(parents=True)
    started = time.perf_counter()
    rows: list[tuple[str, str]] = []

    def both() -> Iterator[tuple[str, bytes, str, str]]:
        for n, (key, data, caption) in enumerate(_samples(pairs, size, seed)):
            relative = f"images/{n // FILES_PER_FOLDER:04d}/{key}.jpg"
            target = csv_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            rows.append((relative, caption))
            yield key, data, "jpg", caption

    paths = write_tar_shards(both(), shards_dir, per_shard, stats=True)
    with (csv_dir / "pairs.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    generate_s = time.perf_counter() - started
    started = time.perf_counter()
    counted = sum(count_tar(path, use_stats=False) for path in paths)  # what a stream without stats files costs
    if counted != pairs:
        raise RuntimeError(f"the tar headers count {counted} pairs, {pairs} were written")
    return {
        "generate_s": generate_s,
        "header_scan_s": time.perf_counter() - started,
        "shards": len(paths),
        "disk_mb": {"tar": _disk_mb(shards_dir), "csv": _disk_mb(csv_dir)},
    }


def _disk_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


# -- one variant, in a child process ---------------------------------------------------------------------------------
def child(
    variant: str, workdir: Path, batch: int, shuffle_buffer: int, threads: int, seed: int, max_batches: int = 0
) -> dict:
    """Read one epoch of training batches through ``variant``; what it cost (see the module docstring)."""
    import gc

    import torch

    from cliptuner.config import ModelSpec
    from cliptuner.train.models import load_model

    torch.set_num_threads(threads)
    bundle = load_model(ModelSpec("cliptuner-tiny"))
    transform, tokenizer = bundle.preprocess_train, bundle.tokenizer
    del bundle
    gc.collect()
    rss_setup = _status_kb("VmRSS")
    t0 = time.perf_counter()
    if variant == "csv":
        from cliptuner.train.data import load_csv, make_loader

        loader = make_loader(load_csv(workdir / "csv" / "pairs.csv"), transform, tokenizer, batch, seed=seed)
    else:
        from cliptuner.train.stream_loader import StreamLoader
        from cliptuner.train.streaming import open_stream

        loader = StreamLoader(
            open_stream(workdir / "shards"), transform, tokenizer, batch, seed=seed, shuffle_buffer=shuffle_buffer
        )
    open_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = batches = 0
    for images, _texts, _index in loader:
        samples += images.shape[0]
        batches += 1
        if batches == max_batches:
            break
    read_s = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    return {
        "samples": samples,
        "batches": batches,
        "open_s": open_s,
        "read_s": read_s,
        "samples_per_s": samples / read_s if read_s > 0 else 0.0,
        "rss_setup_mb": rss_setup / 1024,
        "peak_mb": peak / 1024,
        "growth_mb": (peak - rss_setup) / 1024,
    }


def _run_child(variant: str, args: argparse.Namespace, workdir: Path) -> dict:
    command = [sys.executable, "-m", "benchmarks.stream_memory", "--child", variant, "--workdir", str(workdir)]
    command += [
        "--batch",
        str(args.batch),
        "--shuffle-buffer",
        str(args.shuffle_buffer),
        "--threads",
        str(args.threads),
    ]
    command += ["--seed", str(args.seed), "--max-batches", str(args.max_batches)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the {variant} child failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the run -------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--pairs", type=int, default=200_000, help="pairs written (and read by each variant)")
    p.add_argument("--per-shard", type=int, default=10_000, help="pairs per tar shard (img2dataset's default)")
    p.add_argument("--image-size", type=int, default=32, help="side of the JPEG images in pixels")
    p.add_argument("--batch", type=int, default=64, help="pairs per training batch")
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="samples the stream holds (TrainConfig default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each child")
    p.add_argument("--max-batches", type=int, default=0, help="batches read by each variant (0: one whole epoch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the data is written (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the data written (with --workdir)")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--quick",
        action="store_true",
        help="quick sizes: " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in QUICK.items()),
    )
    args, _ = p.parse_known_args(argv)
    if args.quick:
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    if args.child:
        result = child(
            args.child, Path(args.workdir), args.batch, args.shuffle_buffer, args.threads, args.seed, args.max_batches
        )
        print(json.dumps(result))
        return result
    if args.pairs < args.batch or args.per_shard < 1 or args.batch < 2 or args.shuffle_buffer < args.batch:
        p.error("--pairs and --shuffle-buffer must be >= --batch >= 2, --per-shard >= 1")

    import torch

    started = time.perf_counter()
    temporary = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="stream-memory-"))
    try:
        data = generate(workdir, args.pairs, args.image_size, args.per_shard, args.seed)
        variants = {}
        for variant in VARIANTS:
            variants[variant] = _run_child(variant, args, workdir)
    finally:
        if temporary or not args.keep:
            shutil.rmtree(workdir / "shards", ignore_errors=True)
            shutil.rmtree(workdir / "csv", ignore_errors=True)
            if temporary:
                shutil.rmtree(workdir, ignore_errors=True)
    base, stream = variants["csv"], variants["stream"]
    result = {
        "variants": variants,
        "peak_ratio": stream["peak_mb"] / base["peak_mb"],
        "growth_ratio": stream["growth_mb"] / base["growth_mb"] if base["growth_mb"] > 0 else None,
        "speed_ratio": stream["samples_per_s"] / base["samples_per_s"] if base["samples_per_s"] > 0 else None,
        **data,
        "pairs": args.pairs,
        "per_shard": args.per_shard,
        "image_size": args.image_size,
        "batch": args.batch,
        "shuffle_buffer": args.shuffle_buffer,
        "threads": args.threads,
        "max_batches": args.max_batches,
        "wall_s": time.perf_counter() - started,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": "python benchmarks/stream_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def _print(result: dict) -> None:
    print(
        f"{result['pairs']} pairs ({result['image_size']}px JPEG), {result['shards']} shards of {result['per_shard']}, "
        f"batch {result['batch']}, shuffle buffer {result['shuffle_buffer']}, {result['threads']} thread(s); "
        f"data written in {result['generate_s']:.1f} s; pairs counted from the tar headers in "
        f"{result['header_scan_s']:.2f} s"
    )
    print("| variant | open s | read s | samples | samples/s | RSS after set-up MB | peak MB | peak − set-up MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, v in result["variants"].items():
        label = "CSV + files, in memory (baseline)" if name == "csv" else "tar shards, streamed"
        print(
            f"| {label} | {v['open_s']:.2f} | {v['read_s']:.1f} | {v['samples']} | {v['samples_per_s']:.0f} | "
            f"{v['rss_setup_mb']:.0f} | {v['peak_mb']:.0f} | {v['growth_mb']:.0f} |"
        )
    growth = result["growth_ratio"]
    speed = result["speed_ratio"]
    print(
        f"stream ÷ csv: peak {result['peak_ratio']:.3f}, peak − set-up "
        f"{'n/a' if growth is None else f'{growth:.3f}'}, samples/s {'n/a' if speed is None else f'{speed:.3f}'}"
    )


if __name__ == "__main__":
    main()
