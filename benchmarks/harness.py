"""Run every benchmark, judge each figure against its target, write RESULTS.md and PNG charts from scratch.

Each part is one script of this folder, run in a child process of its own (``python -m benchmarks.<script> ARGS
--json FILE``), so that its threads, memory and failures stay its own; its stdout (the tables it prints) goes into
RESULTS.md under its command. Every figure judged here is a ratio against a baseline that the same script measured
in the same run, side by side; the targets table says which. A part that fails is reported as failed with the end
of its output, and the other parts still run; the exit status is then 1.

Parts (``--only``/``--skip`` take these names):

========================  ==============================================================================
``encode_speed``          ONNX vs torch eager encoding of the same inputs (ViT-B-32), and the fraction of the
                          matmul peak measured in the same run
``train_step``            the project's training step vs a bare OpenCLIP loop on the same batch
``precision``             int8 vs fp32 ONNX graphs (speed, agreement), and a fine-tuning run whose held-out
                          recall is reported for the base, the tuned fp32 and the tuned int8 model
``flow_encode_vit``       ``/encode`` through the gRPC Flow vs the in-process runtime, ViT-B-32
``flow_encode_tiny``      the same with ``cliptuner-tiny``
``concurrent``            16 concurrent single-image clients vs one client sending batches of 32
``search``                HNSW (f32/f16/i8) vs exact search at 100k × 512
``flow_search``           ``/search`` through the Flow on a 100k index: p50/p99 and recall@10
``rebuild``               re-embedding the index after a new version vs in-process encoding
``train_load``            search latency while a ``/train`` runs vs idle; peak memory of each process
``access_flood``          authorised ``/search`` p50 before and during 1000 calls with wrong API keys
``seed_table``            recall@5 before vs after tuning public CLIP models on Flickr/COCO (runs only where
                          the weights are cached and the data sets are on disk)
``feedback_loop``         simulated users search, click and send ``/feedback``; ``auto_train`` trains, the gate
                          decides: recall@5 on captions nobody searched, per round, vs the start; and a harmful
                          candidate the gate must refuse
========================  ==============================================================================

``--merge`` runs some parts again and keeps the others' results from the report's ``results.json``: each part
run now is marked with this run's command and date, which its section of RESULTS.md names.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Part:
    """One benchmark script and the arguments of a full and of a quick run."""

    name: str  # what --only/--skip and the results use
    script: str  # benchmarks/<script>.py (a dotted name: that module, wherever it is on the path)
    title: str  # its RESULTS.md heading
    full: tuple[str, ...]
    quick: tuple[str, ...]
    about: str  # what it measures against what, for RESULTS.md
    timeout_s: Optional[float] = None  # a full run's time limit when longer than the default (--timeout overrides)


PARTS: tuple[Part, ...] = (
    Part(
        "encode_speed",
        "encode_speed",
        "ONNX Runtime vs torch eager encoding",
        full=(),
        quick=("--quick",),
        about="The same weights (ViT-B-32, random init) and the same pre-made inputs through the project's ONNX "
        "towers and through the torch model in eager mode, alternating; and the fp32 matmul peak of this "
        "machine measured in the same run, against which the achieved GFLOP/s is set.",
    ),
    Part(
        "train_step",
        "train_step",
        "Training step vs a bare OpenCLIP loop",
        full=("--batch", "16", "--repeats", "3"),
        quick=("--quick",),
        about="One optimizer step of the project's training code vs a bare OpenCLIP loop (model + ClipLoss + "
        "AdamW) on the same batch, same model and threads, alternating.",
    ),
    Part(
        "precision",
        "precision",
        "int8 vs fp32 ONNX graphs, and what fine-tuning gains",
        full=(),
        quick=(
            "--model",
            "cliptuner-tiny",
            "--images",
            "32",
            "--texts",
            "32",
            "--repeats",
            "1",
            "--n-images",
            "60",
            "--epochs",
            "1",
        ),
        about="Speed and agreement of the int8 graphs (ONNX Runtime dynamic quantization) against the fp32 export "
        "of the same weights; then `cliptuner-tiny` fine-tuned on the synthetic domain data with the "
        "demo's settings (chosen on other data by `sweep.py`, see CHOICES.md) and exported in int8: its "
        "held-out recall before training (the base), after (fp32) and of the int8 graphs, on held-out "
        "images that chose nothing.",
    ),
    Part(
        "flow_encode_vit",
        "flow_encode",
        "`/encode` through the Flow vs in-process, ViT-B-32",
        full=("--model", "ViT-B-32", "--images", "64", "--batch", "32", "--repeats", "3", "--content", "noise"),
        quick=("--model", "cliptuner-tiny", "--images", "32", "--batch", "16", "--repeats", "1"),
        about="`cliptuner serve` on 127.0.0.1 vs `OnnxClip` in the benchmark's process on the same model "
        "directory and the same PNG blobs (random pixels, 256×256), alternating; a sequential client (one "
        "request at a time) and a streamed one (one `post`, `request_size` 32).",
    ),
    Part(
        "flow_encode_tiny",
        "flow_encode",
        "`/encode` through the Flow vs in-process, cliptuner-tiny",
        full=("--model", "cliptuner-tiny", "--images", "256", "--batch", "32", "--repeats", "3", "--content", "noise"),
        quick=(),
        about="As above with the 8 M-parameter `cliptuner-tiny`, where transport and decoding weigh most.",
    ),
    Part(
        "concurrent",
        "clients",
        "16 concurrent single-image clients vs one batching client",
        full=(),
        quick=("--quick",),
        about="The same PNG images through the Flow, sent by 16 concurrent clients one image per request, and by "
        "one client in requests of 32, alternating; with the encoder's request batching on and off.",
    ),
    Part(
        "search",
        "search",
        "Vector search at 100k × 512",
        full=("--spread", "2.0", "--settings", "16", "64", "--stores", "exact", "hnsw", "hnsw-f16", "hnsw-i8"),
        quick=(
            "--n",
            "4000",
            "--dim",
            "128",
            "--queries",
            "100",
            "--clusters",
            "100",
            "--spread",
            "2.0",
            "--settings",
            "16",
            "64",
            "--stores",
            "exact",
            "hnsw",
        ),
        about="Clustered unit vectors, one query per call; the HNSW settings (M 16, ef 64, the indexer's "
        "defaults) were chosen by `search.py` on data seed 0 (CHOICES.md); this run reports on seed 1, "
        "which chose nothing. Exact search (numpy, the embedded store below 5k docs) is the baseline.",
    ),
    Part(
        "flow_search",
        "flow_search",
        "`/search` through the Flow on a 100k index",
        full=(),
        quick=("--model", "cliptuner-tiny", "--n", "3000", "--queries", "30"),
        about="The indexer's collection holds 100k docs (clustered 512-d vectors) before the Flow starts; "
        "queries go one at a time through gateway → encoder → indexer, as vectors (recall@10 checked "
        "against exact top-10) and as texts (embedded by the encoder first); the same collection searched "
        "in-process is the baseline.",
    ),
    Part(
        "rebuild",
        "rebuild",
        "Re-embedding the index after `/train`",
        full=("--docs", "1000"),
        quick=("--docs", "48", "--size", "64", "--stores", "embedded"),
        about="A `CLIPIndexer`'s stored PNGs re-embedded for a new version (what follows a `/train`) vs "
        "`OnnxClip.encode_images` of the same PNGs in the same process.",
    ),
    Part(
        "train_load",
        "train_load",
        "Serving while a `/train` runs; memory of each process",
        full=(),
        quick=("--gallery", "64", "--queries", "40", "--train-images", "128", "--no-after"),
        about="`/search` latency through the Flow, one query at a time, while idle and while a `/train` child "
        "process trains; the peak resident memory of the gateway, each Executor and the training process.",
    ),
    Part(
        "access_flood",
        "access_flood",
        "Authorised searches during a flood of wrong API keys",
        full=(),
        quick=("--quick",),
        about="`cliptuner serve --keys-file` on 127.0.0.1: `/search` with a valid key, one query at a time, before "
        "and while other processes send 1000 calls with wrong keys (each refused UNAUTHENTICATED and written "
        "to the audit log); p50 during ÷ p50 before.",
    ),
    Part(
        "seed_table",
        "seed_table",
        "Public CLIP models on Flickr8k/30k and COCO (the seed table)",
        full=(),
        quick=(),
        about="Recall@5 before and after fine-tuning ViT-B-32 (openai), ViT-B-16-plus-240 and ViT-B-32-quickgelu "
        "(laion400m_e32) on the Karpathy test splits, same split before and after. It runs only where the "
        "weights are in the Hugging Face cache and the data sets on disk; rows it cannot run say why.",
    ),
    Part(
        "stream_memory",
        "stream_memory",
        "Streamed tar shards vs pairs held in memory: memory and read speed, 32 px images",
        full=("--pairs", "200000", "--max-batches", "300"),
        quick=("--quick",),
        about="The same pairs written twice, as img2dataset-style tar shards and as a CSV beside one JPEG per pair, "
        "then read by training's data path in a fresh process each (decode, the training transform, tokenizing; "
        "no model) for the first 300 batches of 64: the stream through its shuffle buffer of 1000 samples, the "
        "baseline with the CSV loader and the batch sampler, which hold every pair and plan the epoch up front. "
        "Peak resident memory (VmHWM) above the process's set-up, and samples per second; stream ÷ CSV.",
    ),
    Part(
        "stream_memory_large",
        "stream_memory",
        "Streamed tar shards vs pairs held in memory: memory and read speed, 160 px images",
        full=("--pairs", "40000", "--image-size", "160", "--per-shard", "2000", "--max-batches", "300"),
        quick=(),
        about="As above on another data shape: fewer, larger images (40,000 pairs of 160 px JPEGs, 20 shards).",
    ),
    Part(
        "hard_negatives",
        "hard_negatives",
        "Hard-negative batches vs random batches",
        full=("--threads", "1", "--spaces", "cross", "image", "text", "both"),
        quick=("--quick",),
        about="`hard_negatives` (batches of the pairs the base model confuses, mined once from its embeddings "
        "before training; `cross`: caption against image, what `hard_negatives` does, and three other spaces to "
        "mine in: image against image, caption against caption, both) against the default random batches of "
        "unique images: the demo's base fine-tuned on "
        "synthetic domain pairs of two shapes (data seeds no other benchmark or choice uses), same budget and "
        "seeds. Validation (a part of the training images) chooses each run's epoch and decides between the "
        "arms by a rule fixed before the run — hard negatives become the default only if they win on every "
        "shape; a test split that chooses nothing reports.",
        timeout_s=3600.0,  # 5 arms x 2 shapes x 3 seeds of 8 epochs: about 25 minutes on one thread
    ),
    Part(
        "feedback_loop",
        "feedback_loop",
        "Learning from users' clicks: `/feedback`, `auto_train` and the gate",
        full=(),
        quick=("--quick",),
        about="`cliptuner serve` with an `auto_train` policy, started from the demo's pretrained base (`--quick`: "
        "random init) with the demo's held-out domain gallery indexed through `/index`. Simulated users search "
        "with captions of the gallery's images, see the top 10 and click (the click model is stated below); "
        "every click is a `/feedback` event. After each round of K events the tuner trains on the feedback by "
        "itself and the gate promotes the candidate or refuses it. Recall@5 (text → image) is measured through "
        "`/search` on other captions of the same images, which no user ever searched, before the first click "
        "and after each round: the baseline is the start version, on the same captions, in the same run. Two "
        "arms, each a service of its own with the same data, users and settings: the gate on, and the gate off "
        "(every finished run promoted: what the clicks teach); the gated arm uses the service's gate defaults. Each automatic run gets `eval_data`: labelled domain images (a fifth "
        "of the demo's training images: not in the gallery, never trained on) with their captions, which join its held-out feedback queries (held-out "
        "feedback alone leans toward the version serving: a person can choose only what it showed). The "
        "gate measures each run on the feedback queries first asked since the run before (when none is new, on "
        "those earlier runs held out), each ranked among every gallery image the clicked searches showed; an "
        "audit counts how many of those queries the serving version had been trained on (0 expected). Last, a "
        "`/train` on captions shuffled across images, gated on clean held-out pairs, must be refused with "
        "serving unchanged.",
    ),
)
PART_NAMES = tuple(part.name for part in PARTS)


# -- targets ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Target:
    """One row of the targets table: a figure read from a part's results, and the rule it must meet.

    ``read`` returns the figure (or None when the part did not measure it) and ``show`` its text; ``meets`` is None
    for figures that are reported without a target.
    """

    measure: str
    baseline: str
    goal: str
    part: str
    read: Callable[[dict], Optional[float]]
    show: Callable[[dict], str]
    meets: Optional[Callable[[dict], bool]] = None
    missing: str = ""  # why the figure can be absent (shown when it is)
    short: str = ""  # when it is short: what limits it and what would close the gap (shown only then)


def _get(result: dict, *keys, default=None):
    for key in keys:
        if not isinstance(result, dict) or key not in result:
            return default
        result = result[key]
    return result


def _flow_modes(r: dict) -> str:
    clients = _get(r, "clients", default={})
    return ", ".join(f"{mode} {clients[mode]['ratio_median']:.2f}×" for mode in clients)


def _best_mode(r: dict) -> Optional[float]:
    ratios = [c["ratio_median"] for c in _get(r, "clients", default={}).values()]
    return max(ratios) if ratios else None


def _hnsw(r: dict) -> dict:
    return _get(r, "report", "hnsw", default={}) or {}


def _r5_drop(r: dict) -> Optional[float]:
    drop = _get(r, "recall", "drop")
    return None if drop is None else max(drop["t2i_r5"], drop["i2t_r5"])


def _gain(r: dict) -> Optional[float]:
    before, after = _get(r, "recall", "before"), _get(r, "recall", "after_fp32")
    if before is None or after is None:
        return None
    return min(after["t2i_r5"] - before["t2i_r5"], after["i2t_r5"] - before["i2t_r5"])


def _rebuild_ratio(r: dict, store: str) -> Optional[float]:
    for row in _get(r, "rows", default=[]):
        if row["store"] == store:
            return row["ratio"]
    return None


def _fmt(value: Optional[float], spec: str = ".2f", suffix: str = "×") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


ARM_LABELS = {"gated": "gate on", "ungated": "gate off"}  # the feedback_loop part's arms, as the report names them


def _arm(r: dict, name: str) -> Optional[dict]:
    """One arm of the feedback_loop part's results (``gated``, ``ungated``), None when it did not run."""
    return next((arm for arm in r.get("arms", []) if arm["name"] == name), None)


def _loop_gain(arm: dict) -> str:
    rounds = arm["rounds"]
    promoted = sum(1 for row in rounds[1:] if (row.get("run") or {}).get("promoted"))
    return (
        f"{_pct(arm['start_r5'])} → {_pct(arm['final_r5'])} after {rounds[-1]['clicks']} clicks "
        f"({len(rounds) - 1} rounds, {promoted} promoted)"
    )


def _clicks_for(arm: dict) -> str:
    clicks = arm["rounds"][-1]["clicks"]
    return ", ".join(
        f"+{points}: {n} clicks" if n is not None else f"+{points}: not reached in {clicks}"
        for points, n in arm["clicks_for"].items()
    )


def _all_clicks_for(r: dict) -> str:
    return "; ".join(f"{ARM_LABELS[arm['name']]}: {_clicks_for(arm)}" for arm in r.get("arms", []))


def _harmful_refused(r: dict) -> bool:
    harmful = r["harmful"]
    return harmful["run"]["state"] == "done" and not harmful["run"]["promoted"] and harmful["unchanged"]


def _harmful(r: dict) -> str:
    h = r["harmful"]
    decision = "refused" if not h["run"]["promoted"] else "promoted"
    return (
        f"{decision}; serving {h['serving_before']} → {h['serving_after']}, never-searched R@5 "
        f"{_pct(h['unseen_before']['r5'])} → {_pct(h['unseen_after']['r5'])}"
    )


def _stream(r: dict) -> str:
    csv, stream = r["variants"]["csv"], r["variants"]["stream"]
    return (
        f"{stream['growth_mb']:.0f} vs {csv['growth_mb']:.0f} MB above set-up ({r['growth_ratio']:.2f}×), "
        f"peak {r['peak_ratio']:.2f}×; samples/s {r['speed_ratio']:.2f}× ({r['pairs']} pairs, {r['image_size']} px)"
    )


def _hard_negatives(r: dict) -> str:
    return r["verdict"]


TARGETS: tuple[Target, ...] = (
    Target(
        "ONNX image encode, ViT-B-32 fp32",
        "torch eager, same weights and inputs",
        "≥ 1.9×",
        "encode_speed",
        read=lambda r: _get(r, "image", "ratio"),
        show=lambda r: _fmt(_get(r, "image", "ratio")),
        meets=lambda r: r["image"]["ratio"] >= 1.9,
        short=(
            "The baseline is already close to the FLOP limit: the matrix products that make up almost all of "
            "a ViT-B-32 forward pass run in the same BLAS-class kernels in torch eager and in ONNX Runtime, so "
            "no graph rewrite can win more than `ratio_ceiling` (the measured matmul peak over torch's achieved "
            "rate, in the part's table). A 1.9× gain over eager needs a baseline that wastes time outside the "
            "matrix products (small batches, a GPU launch-bound model, Python overhead), or lower precision "
            "(the int8 row)."
        ),
    ),
    Target(
        "ONNX text encode, ViT-B-32 fp32",
        "torch eager, same weights and inputs",
        "≥ 1.9×",
        "encode_speed",
        read=lambda r: _get(r, "text", "ratio"),
        show=lambda r: _fmt(_get(r, "text", "ratio")),
        meets=lambda r: r["text"]["ratio"] >= 1.9,
        short="As for the image tower.",
    ),
    Target(
        "ONNX image encode: fraction of the fp32 FLOP limit",
        "matmul peak, same run",
        "≥ 0.8",
        "encode_speed",
        read=lambda r: _get(r, "image", "onnx_fraction_of_peak"),
        show=lambda r: _fmt(_get(r, "image", "onnx_fraction_of_peak"), suffix=""),
        meets=lambda r: r["image"]["onnx_fraction_of_peak"] >= 0.8,
    ),
    Target(
        "ONNX text encode: fraction of the fp32 FLOP limit",
        "matmul peak, same run",
        "≥ 0.8",
        "encode_speed",
        read=lambda r: _get(r, "text", "onnx_fraction_of_peak"),
        show=lambda r: _fmt(_get(r, "text", "onnx_fraction_of_peak"), suffix=""),
        meets=lambda r: r["text"]["onnx_fraction_of_peak"] >= 0.8,
    ),
    Target(
        "int8 ONNX image encode",
        "fp32 ONNX, same weights",
        "≥ 1.8×",
        "precision",
        read=lambda r: _get(r, "speed", "image", "ratio"),
        show=lambda r: _fmt(_get(r, "speed", "image", "ratio")),
        meets=lambda r: r["speed"]["image"]["ratio"] >= 1.8,
        short=(
            "Dynamic quantization makes the weight matrix products int8, but the rest stays fp32 and does not "
            "get faster: the patch convolution, GELU, LayerNorm, softmax, the attention products between "
            "activations, and the quantization of each batch's activations. On a CPU without VNNI (AVX2 only: "
            "see the machine line) ONNX Runtime's int8 kernels also lose part of their edge. Closing it: a CPU "
            "with AVX-512 VNNI or AMX, static quantization with calibration data (no per-batch activation "
            "scaling), or an export whose attention ONNX Runtime can fuse."
        ),
    ),
    Target(
        "int8: recall@5 drop on the domain benchmark (worse of t2i, i2t)",
        "the tuned fp32 model, same split",
        "≤ 0.01",
        "precision",
        read=_r5_drop,
        show=lambda r: _fmt(_r5_drop(r), "+.3f", ""),
        meets=lambda r: _r5_drop(r) <= 0.01,
        missing="the fine-tuning part did not run",
    ),
    Target(
        "fp16 ONNX parity",
        "fp32",
        "reported (GPU speed where a GPU is available)",
        "precision",
        read=lambda r: _get(r, "fp16", "min_cosine"),
        show=lambda r: _fmt(_get(r, "fp16", "min_cosine"), ".4f", ""),
        missing="fp16 graphs run on the CUDA provider only and this run had no CUDA device",
    ),
    Target(
        "`/encode` through the Flow, PNG blobs, ViT-B-32",
        "in-process runtime, same blobs",
        "≥ 0.9×",
        "flow_encode_vit",
        read=_best_mode,
        show=_flow_modes,
        meets=lambda r: _best_mode(r) >= 0.9,
    ),
    Target(
        "`/encode` through the Flow, PNG blobs, cliptuner-tiny",
        "in-process runtime, same blobs",
        "≥ 0.7×",
        "flow_encode_tiny",
        read=_best_mode,
        show=_flow_modes,
        meets=lambda r: _best_mode(r) >= 0.7,
        short=(
            "A batch of 32 takes the tiny model about as long to encode as its 6 MB of PNGs take to serialise "
            "and parse on the way through the client, the gateway and the encoder, so transport is half the "
            "cost. Streaming (`request_size`) overlaps the two; smaller images or JPEGs cut the transport."
        ),
    ),
    Target(
        "16 concurrent single-image clients",
        "one client, batches of 32",
        "≥ 0.8×",
        "concurrent",
        read=lambda r: r.get("ratio"),
        show=lambda r: f"{_fmt(r.get('ratio'))} (batching off: {_fmt(r.get('unbatched_ratio'))})",
        meets=lambda r: r["ratio"] >= 0.8,
        short=(
            "Each single-image request costs a few milliseconds of CPU in every Jina process on its way "
            "(client, gateway, encoder, and the indexer, which forwards `/encode` answers), on the same 2 "
            "cores that encode; batching removes the model-run overhead, not that. More cores, or clients "
            "that send several images per request, close it."
        ),
    ),
    Target(
        "training step",
        "bare OpenCLIP loop (model + ClipLoss + AdamW), same batch",
        "≥ 0.95×",
        "train_step",
        read=lambda r: r.get("ratio"),
        show=lambda r: _fmt(r.get("ratio")),
        meets=lambda r: r["ratio"] >= 0.95,
    ),
    Target(
        "search 100k × 512, top-10 (HNSW)",
        "exact numpy",
        "recall@10 ≥ 0.95 at ≥ 10× QPS",
        "search",
        read=lambda r: _hnsw(r).get("recall_at_10"),
        show=lambda r: f"recall@10 {_hnsw(r)['recall_at_10']:.3f} at {_hnsw(r)['qps_ratio']:.1f}×",
        meets=lambda r: _hnsw(r)["recall_at_10"] >= 0.95 and _hnsw(r)["qps_ratio"] >= 10,
        short=(
            "A graph search at a fixed `expansion_search` trades recall for speed; a larger expansion (or "
            "connectivity) buys recall at the cost of queries/s (CHOICES.md has the grid)."
        ),
    ),
    Target(
        "`/search` through the Flow, 100k docs: p50 / p99",
        "the same collection in-process",
        "reported",
        "flow_search",
        read=lambda r: _get(r, "flow_vector", "p50_ms"),
        show=lambda r: (
            f"vector query {r['flow_vector']['p50_ms']:.1f} / {r['flow_vector']['p99_ms']:.1f} ms, "
            f"text query {r['flow_text']['p50_ms']:.1f} / {r['flow_text']['p99_ms']:.1f} ms "
            f"(in-process {r['in_process']['p50_ms']:.2f} / {r['in_process']['p99_ms']:.2f} ms); "
            f"recall@10 {r['recall_at_10']:.3f}"
        ),
    ),
    Target(
        "index rebuild after `/train` (embedded store)",
        "in-process encode of the same content",
        "≥ 0.9×",
        "rebuild",
        read=lambda r: _rebuild_ratio(r, "embedded"),
        show=lambda r: "; ".join(f"{row['store']} {row['ratio']:.2f}×" for row in r.get("rows", [])),
        meets=lambda r: _rebuild_ratio(r, "embedded") >= 0.9,
        short=(
            "Reading the stored content back, checking each image and committing the vectors batch by batch "
            "come on top of the encoding."
        ),
    ),
    Target(
        "search p50 during `/train`",
        "idle p50",
        "≤ 3×",
        "train_load",
        read=lambda r: r.get("ratio"),
        show=lambda r: f"{r['ratio']:.2f}× ({r['training']['p50_ms']:.1f} vs {r['idle']['p50_ms']:.1f} ms)",
        meets=lambda r: r["ratio"] <= 3.0,
    ),
    Target(
        "fine-tuning gain, offline domain benchmark (worse of t2i, i2t R@5)",
        "base model, same split (settings chosen on validation only)",
        "tuned − base ≥ +0.20",
        "precision",
        read=_gain,
        show=lambda r: _fmt(_gain(r), "+.3f", ""),
        meets=lambda r: _gain(r) >= 0.20,
        missing="the fine-tuning part did not run",
    ),
    Target(
        "authorised search p50 during 1000 wrong-key calls",
        "p50 before the flood",
        "reported",
        "access_flood",
        read=lambda r: r.get("ratio"),
        show=lambda r: (
            f"{r['ratio']:.2f}× ({r['during']['p50_ms']:.1f} vs {r['before']['p50_ms']:.1f} ms; "
            f"{r['flood']['refused']}/{r['flood']['calls']} refused)"
        ),
    ),
    Target(
        "peak memory of each Executor process",
        "–",
        "reported",
        "train_load",
        read=lambda r: max(r["memory_mb"].values()) if r.get("memory_mb") else None,
        show=lambda r: ", ".join(f"{name} {mb:.0f} MB" for name, mb in r["memory_mb"].items()),
    ),
    Target(
        "learning from clicks, gate on: R@5 on never-searched captions",
        "the start version, same captions, same run",
        "reported",
        "feedback_loop",
        read=lambda r: (_arm(r, "gated") or {}).get("final_r5"),
        show=lambda r: _loop_gain(_arm(r, "gated")),
        missing="the gated arm did not run",
    ),
    Target(
        "learning from clicks, gate off (every run promoted): R@5 on never-searched captions",
        "the start version, same captions, same run",
        "reported",
        "feedback_loop",
        read=lambda r: (_arm(r, "ungated") or {}).get("final_r5"),
        show=lambda r: _loop_gain(_arm(r, "ungated")),
        missing="the ungated arm did not run",
    ),
    Target(
        "clicks needed for +10 / +30 points of never-searched R@5",
        "the start version, same captions, same run",
        "reported",
        "feedback_loop",
        read=lambda r: len(r["arms"]) if r.get("arms") else None,
        show=_all_clicks_for,
    ),
    Target(
        "a harmful candidate (captions shuffled across images)",
        "the version serving before the run, same captions",
        "refused; the same version and recall serve",
        "feedback_loop",
        read=lambda r: _get(r, "harmful", "unseen_after", "r5"),
        show=_harmful,
        meets=_harmful_refused,
        missing="the gated arm did not run",
        short=(
            "The gate compares the candidate with the serving version on the run's held-out pairs only, and its "
            "default min_gain (0) takes any gain there: where both versions are near chance on those pairs (the "
            "clicks teach the gallery's images, not the domain's other images), noise decides. A min_gain above "
            "the noise of the held-out split, or a significance test, would refuse such a candidate."
        ),
    ),
    Target(
        "streamed tar shards: memory while reading, 32 px images",
        "the same pairs as a CSV + image files, held in memory",
        "reported",
        "stream_memory",
        read=lambda r: _get(r, "growth_ratio"),
        show=_stream,
    ),
    Target(
        "streamed tar shards: memory while reading, 160 px images",
        "the same pairs as a CSV + image files, held in memory",
        "reported",
        "stream_memory_large",
        read=lambda r: _get(r, "growth_ratio"),
        show=_stream,
    ),
    Target(
        "hard-negative batches: validation mean recall",
        "random batches, same budget, seeds and split",
        "the default only where better on every shape",
        "hard_negatives",
        read=lambda r: 1.0 if "verdict" in r else None,
        show=_hard_negatives,
    ),
)


def judge(target: Target, results: dict) -> tuple[str, str]:
    """(the measured text, the verdict) of one target: ``met``, ``short``, ``reported`` or why it is absent."""
    outcome = results.get(target.part)
    if outcome is None:
        return "–", "not run"
    if outcome.get("error"):
        return "–", "failed (see its section)"
    r = outcome["result"]
    try:
        value = target.read(r)
    except (KeyError, TypeError):
        value = None
    if value is None:
        return "–", f"not measured: {target.missing}" if target.missing else "not measured"
    shown = target.show(r)
    if target.meets is None:
        return shown, "reported"
    return shown, "**met**" if target.meets(r) else "**short**"


# -- running ---------------------------------------------------------------------------------------------------
def run_part(part: Part, quick: bool, work: Path, timeout: float) -> dict:
    """Run one part in a child process; ``{"argv", "result", "stdout", "wall_s"}`` or with ``error``."""
    argv = list(part.quick if quick else part.full)
    out = work / f"{part.name}.json"
    module = part.script if "." in part.script else f"benchmarks.{part.script}"
    command = [sys.executable, "-m", module, *argv, "--json", str(out)]
    env = {**os.environ, "JINA_HIDE_SURVEY": "1", "JINA_OPTOUT_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}
    print(
        f"[benchmarks] {part.name}: python benchmarks/{part.script}.py {shlex.join(argv)}", file=sys.stderr, flush=True
    )
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
        )
        output, code = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output, code = (
            (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or ""),
            f"timeout after {timeout:.0f} s",
        )
    wall = time.perf_counter() - started
    outcome = {"argv": argv, "wall_s": wall, "command": f"python benchmarks/{part.script}.py {shlex.join(argv)}"}
    if code != 0 or not out.exists():
        outcome["error"] = f"exit {code}" if code != 0 else "no results written"
        outcome["output_tail"] = output[-4000:]
        print(f"[benchmarks] {part.name} FAILED ({outcome['error']}):\n{output[-2000:]}", file=sys.stderr, flush=True)
        return outcome
    outcome["result"] = json.loads(out.read_text())
    outcome["stdout"] = tables_only(output)
    print(f"[benchmarks] {part.name}: done in {wall:.0f} s", file=sys.stderr, flush=True)
    return outcome


def tables_only(output: str) -> str:
    """What a script printed, without the logs of the Flow and libraries mixed into its output."""
    keep = []
    for line in output.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        noisy = any(
            mark in line
            for mark in (
                "INFO",
                "WARNI",
                "DEBUG",
                "ERROR",
                "USDT:",
                "───",
                "━",
                "Traceback",
                "UserWarning",
                "warnings.warn",
                "🔗",
                "🔒",
                "🌐",
                "⠋",
                "⠙",
            )
        )
        if not noisy:
            keep.append(line.rstrip())
    return "\n".join(keep)


# -- the machine -----------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gb = int(line.split()[1]) / 2**20
    except OSError:
        pass
    versions = {}
    for name, module in (
        ("torch", "torch"),
        ("open_clip", "open_clip"),
        ("onnxruntime", "onnxruntime"),
        ("onnx", "onnx"),
        ("jina", "jina"),
        ("docarray", "docarray"),
        ("numpy", "numpy"),
        ("usearch", "usearch"),
        ("grpcio", "grpc"),
    ):
        try:
            versions[name] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - absent or broken: say so
            versions[name] = "not installed"
    cuda = "no"
    try:
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            cuda = "ONNX Runtime CUDA provider available"
    except Exception:  # noqa: BLE001
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        commit = f"{commit}{' (with uncommitted changes)' if dirty else ''}" if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {
        "platform": platform.platform(),
        "cpu": cpu or "not reported",
        "cores": os.cpu_count(),
        "memory_gb": memory_gb,
        "cuda": cuda,
        "python": platform.python_version(),
        "versions": versions,
        "commit": commit,
    }


# -- RESULTS.md ------------------------------------------------------------------------------------------------
def render(results: dict, info: dict, charts: list[str], quick: bool, command: str, wall_s: float) -> str:
    """RESULTS.md from the outcomes of the parts (``results[name]``)."""
    m = info
    lines = [
        "# Benchmark results",
        "",
        f"Written by `{command}` on {m['date']} in {wall_s / 60:.1f} min. Every figure below comes from this run; "
        "each ratio is against a baseline measured in the same run, side by side, named in the table. "
        "Nothing here is edited by hand: rerun the command to regenerate it (CHOICES.md records how the settings "
        "these runs use were chosen, on other data).",
        "",
    ]
    if quick:
        lines += [
            "**Quick mode**: every part at CI size (tiny models, few items). These numbers check that the "
            "benchmarks run; they say nothing about speed. Run `python -m benchmarks` for the real figures.",
            "",
        ]
    gb = f", {m['memory_gb']:.0f} GiB RAM" if m.get("memory_gb") else ""
    lines += [
        f"- Machine: {m['platform']}; CPU {m['cpu']}, {m['cores']} cores{gb}; CUDA: {m['cuda']}.",
        "- Versions: Python " + m["python"] + ", " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
        f"- Code: commit {m['commit']}.",
        "- Threads: each part pins its ONNX Runtime / torch / BLAS threads (2 unless its command says otherwise); "
        "the parts run one after another, each in a process of its own.",
        "",
        "## Targets",
        "",
        "| measure | baseline (same run) | target | measured | verdict |",
        "|---|---|---|---|---|",
    ]
    shortfalls = []
    for target in TARGETS:
        shown, verdict = judge(target, results)
        lines.append(f"| {target.measure} | {target.baseline} | {target.goal} | {shown} | {verdict} |")
        if verdict == "**short**" and target.short:
            shortfalls.append(f"- **{target.measure}**: {target.short}")
    lines.append("")
    if shortfalls:
        lines += [
            "Where a figure is short, what limits it and what would close the gap (the parts' own profiles "
            "and notes are in their sections below):",
            "",
            *shortfalls,
            "",
        ]
    for chart in charts:
        lines += [f"![{Path(chart).stem}]({chart})", ""]
    for part in PARTS:
        outcome = results.get(part.name)
        if outcome is None:
            continue
        lines += [f"## {part.title} (`{part.name}`)", "", part.about, "", "```bash", outcome["command"], "```", ""]
        if outcome.get("error"):
            lines += [
                f"**Failed** ({outcome['error']}) after {outcome['wall_s']:.0f} s. The end of its output:",
                "",
                "```",
                outcome.get("output_tail", "").strip()[-3000:],
                "```",
                "",
            ]
            continue
        ran = outcome.get("ran")
        if ran:
            lines += [
                f"This part ran on its own{' in quick mode' if ran.get('quick') else ''}: `{ran['command']}` on "
                f"{ran['date']} (code: commit {ran['commit']}); its results were merged into this report's "
                "results.json, whose other parts come from the command at the top.",
                "",
            ]
        lines += [part_tables(part.name, outcome), "", f"Wall time {outcome['wall_s']:.0f} s.", ""]
        for note in notes(outcome["result"], outcome["stdout"]):
            lines.append(f"- {note}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def part_tables(name: str, outcome: dict) -> str:
    """A part's tables in RESULTS.md: rendered here from its results where this module knows how (so that
    ``--from-json`` shows them in today's layout), else what the part printed."""
    if name == "feedback_loop":
        return feedback_loop_tables(outcome["result"])
    if name.startswith("stream_memory"):
        return stream_tables(outcome["result"])
    if name == "hard_negatives":  # its own markdown, blank lines kept
        from benchmarks.hard_negatives import markdown

        return markdown(outcome["result"])
    return tables_only(outcome["stdout"])


def stream_tables(r: dict) -> str:
    """The stream_memory part: what was written, and each variant's reading."""
    lines = [
        f"{r['pairs']} pairs ({r['image_size']} px JPEGs), written as {r['shards']} tar shards of {r['per_shard']} "
        f"({r['disk_mb']['tar']:.0f} MB) and as a CSV + files ({r['disk_mb']['csv']:.0f} MB) in {r['generate_s']:.0f} s; "
        f"counting the pairs from the tar headers alone (no stats files) takes {r['header_scan_s']:.1f} s. Batches of "
        f"{r['batch']}, shuffle buffer {r['shuffle_buffer']}, {r['threads']} torch thread(s).",
        "",
        "| variant | open s | read s | samples | samples/s | RSS after set-up MB | peak MB | peak − set-up MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in r["variants"].items():
        label = "CSV + files, in memory (baseline)" if name == "csv" else "tar shards, streamed"
        lines.append(
            f"| {label} | {v['open_s']:.2f} | {v['read_s']:.1f} | {v['samples']} | {v['samples_per_s']:.0f} | "
            f"{v['rss_setup_mb']:.0f} | {v['peak_mb']:.0f} | {v['growth_mb']:.0f} |"
        )
    lines += [
        "",
        f"Stream ÷ CSV: peak {r['peak_ratio']:.2f}×, memory above set-up {r['growth_ratio']:.2f}×, samples/s "
        f"{r['speed_ratio']:.2f}×. The CSV side's memory grows with the number of pairs (it holds every path and "
        "caption and plans the epoch); the stream's with the shuffle buffer and the size of an encoded image.",
    ]
    return "\n".join(lines)


def _decision(run: Optional[dict]) -> str:
    """A round's run in words: ``start`` (round 0), promoted, refused or failed, with the gate's reason."""
    if run is None:
        return "start"
    if run.get("state") != "done":
        return f"{run.get('state')}: {run.get('reason') or 'no reason given'}"
    word = "**promoted**" if run.get("promoted") else "**refused**"
    return f"{word}: {str(run.get('reason') or '').removeprefix('promoted: ').removeprefix('not promoted: ')}"


def _held_out(run: Optional[dict]) -> str:
    """The gate's held-out numbers of serving → candidate (mean of t2i and i2t R@5, and mean recall), with what they
    were measured on: pairs and images (gallery images included), and the regression set when no query was new."""
    held = (run or {}).get("held_out")
    if not held:
        return "–"

    def mean(side: dict) -> float:
        return (side["t2i_r5"] + side["i2t_r5"]) / 2

    counts = (run or {}).get("feedback") or {}
    if run.get("eval_pairs") is not None:
        size = f", {run['eval_pairs']} pairs among {run['eval_images']} images"
    else:  # results of an earlier revision: the held-out pairs only
        size = f", {counts['pairs_held_out']} pairs" if "pairs_held_out" in counts else ""
    if counts.get("queries_held_out") == 0 and counts.get("queries_regression"):
        size += " (the regression set: no new query)"
    text = f"{_pct(mean(held['serving']))} → {_pct(mean(held['candidate']))}"
    if held["serving"].get("mean_recall") is not None:
        text += f" (mean recall {_pct(held['serving']['mean_recall'])} → {_pct(held['candidate']['mean_recall'])})"
    return text + size


def _audit(run: Optional[dict]) -> str:
    """A run's held-out and regression queries, each with how many of them the serving version was trained on; the
    queries it trained on."""
    audit = (run or {}).get("audit")
    if not audit:
        return "–"
    text = f"{audit['held_out_queries']} ({audit['held_out_trained']})"
    if "regression_queries" in audit:
        text += f" + {audit['regression_queries']} ({audit['regression_trained']})"
    return f"{text} / {audit['trained_queries']}"


def _rounds_table(arm: dict) -> list[str]:
    lines = [
        "| round | searches | clicks so far (wrong) | queries clicked | R@5 never-searched | R@5 searched pool | "
        "version serving | run's held-out + regression queries (of them trained on by serving) / queries trained on "
        "| gate's held-out mean R@5, serving → candidate | run: decision and reason |",
        "|---:|---:|---:|---:|---:|---:|---|---|---|---|",
    ]
    for row in arm["rounds"]:
        run = row.get("run")
        candidate = f"{run['candidate']}: " if run and run.get("candidate") else ""
        lines.append(
            f"| {row['round']} | {row['searches']} | {row['clicks']} ({row['wrong_clicks']}) | {row['queries']} | "
            f"{_pct(row['unseen']['r5'])} | {_pct(row['pool']['r5'])} | {row['serving']} | {_audit(run)} | "
            f"{_held_out(run)} | {candidate}{_decision(run)} |"
        )
    rounds = arm["rounds"]
    needs = []
    for points, n in arm["clicks_for"].items():
        row = next((row for row in rounds if row["clicks"] == n), None) if n is not None else None
        needs.append(
            f"+{points} points: {n} clicks (round {row['round']})"
            if row is not None
            else f"+{points} points: not reached in {rounds[-1]['clicks']} clicks"
        )
    lines += [
        "",
        f"Never-searched R@5 at the start {_pct(arm['start_r5'])}, best "
        f"{_pct(max(row['unseen']['r5'] for row in rounds))}, last {_pct(arm['final_r5'])}. Clicks needed: "
        f"{'; '.join(needs)}. /models at the end: "
        + ", ".join(f"{version} {status}" for version, status in arm["models"].items())
        + f". Wall time of the arm {arm['wall_s']:.0f} s.",
    ]
    lines += _verdict_sentence(rounds) + _audit_sentence(rounds)
    if arm.get("stopped"):
        lines += ["", f"The rounds stopped early: {arm['stopped']}."]
    return lines


def _verdict_sentence(rounds: list[dict]) -> list[str]:
    """How the gate's held-out mean R@5 compared the candidate with the serving version over an arm's runs (none when
    no run was measured)."""
    sides = [row["run"]["held_out"] for row in rounds[1:] if (row.get("run") or {}).get("held_out")]
    if not sides:
        return []

    def mean_r5(side: dict) -> float:
        return (side["t2i_r5"] + side["i2t_r5"]) / 2

    gains = [round(mean_r5(held["candidate"]) - mean_r5(held["serving"]), 9) for held in sides]
    return [
        "",
        f"The gate's held-out mean R@5 put the candidate above the version serving in {sum(g > 0 for g in gains)} "
        f"of the {len(gains)} finished runs, level in {sum(g == 0 for g in gains)}, below in "
        f"{sum(g < 0 for g in gains)}.",
    ]


def _audit_sentence(rounds: list[dict]) -> list[str]:
    """The held-out audit of an arm's runs in one sentence (none when no run was audited)."""
    audits = [row["run"]["audit"] for row in rounds[1:] if (row.get("run") or {}).get("audit")]
    held = sum(audit["held_out_queries"] for audit in audits)
    regression = sum(audit.get("regression_queries", 0) for audit in audits)
    if not held and not regression:
        return []
    seen = sum(audit["held_out_trained"] for audit in audits)
    seen_regression = sum(audit.get("regression_trained", 0) for audit in audits)
    measured = f"the {held} queries its runs held out for the gate"
    if any("regression_queries" in audit for audit in audits):
        measured += f" and the {regression} regression queries of its runs (counted once per run)"
    if seen + seen_regression == 0:
        return [
            "",
            f"Audit: none of {measured} had been trained on by the version serving at the time: the gate compared "
            "two versions that had not seen them.",
        ]
    trained = f"{seen} held-out and {seen_regression} regression" if regression else str(seen)
    return [
        "",
        f"Audit: of {measured}, **{trained}** had been trained on by the version serving at the time: on those the "
        "gate compared a version that had seen them with a candidate that had not.",
    ]


def _gate_words(arm: dict) -> str:
    """How an arm's runs were gated: off, or the gate's options (the service's defaults unless the policy set one)."""
    if not arm["gate"]:
        return "gate off: every finished run is promoted"
    train = arm["auto_train"]["parameters"]
    options = arm.get("gate_options")
    if not options:  # results of an earlier revision
        return f"gate on, gate_metric {train.get('gate_metric', 'mean_r5')}"
    words = ", ".join(f"{name} {options[name]:g}" for name in ("min_gain", "max_regression"))
    own = [name for name in ("gate_metric", "min_gain", "max_regression") if name in train]
    whose = f"set by the policy: {', '.join(own)}" if own else "the service's defaults"
    return f"gate on: gate_metric {options['gate_metric']}, {words} ({whose})"


def feedback_loop_tables(r: dict) -> str:
    """The ``feedback_loop`` part's tables (also what ``benchmarks/feedback_loop.py`` prints): each arm's rounds, the
    clicks each gain took, and the harmful candidate."""
    data, settings = r["data"], r["settings"]
    lines = [
        f"Gallery: {data['gallery_images']} held-out domain images (data seed {data['data_seed']}); users search "
        f"{data['pool_captions']} captions of them (the pool); recall is measured through /search on "
        f"{data['unseen_captions']} other captions of the same images that no user searched "
        f"({data['dropped_captions']} captions left out as duplicates). Start: {settings['base']} base. Clicks: "
        f"{r['click_model']}; {settings['limit']} results shown. {r['threads']} threads.",
    ]
    for arm in r["arms"]:
        policy = arm["auto_train"]
        train = policy["parameters"]
        gate = _gate_words(arm)
        lines += [
            "",
            f"**{ARM_LABELS[arm['name']]}** ({arm['name']}): auto_train after {policy['min_events']} events over at "
            f"least {policy['min_queries']} distinct queries; each run {train['epochs']} epochs, batch "
            f"{train['batch_size']}, lr {train['learning_rate']:g}; {gate}.",
            "",
            *_rounds_table(arm),
        ]
    h = r.get("harmful")
    if h:
        p, run = h["parameters"], h["run"]
        lines += [
            "",
            "| harmful run | trained on | gate measured on | held-out mean R@5, serving → candidate | decision | "
            "serving before → after | R@5 never-searched before → after |",
            "|---|---|---|---|---|---|---|",
            f"| {run.get('candidate') or '–'} | {h['data']['train_pairs']} pairs of {h['data']['train_images']} "
            f"images, captions shuffled across images ({h['data']['still_matching']} left on their image), "
            f"{p['epochs']} epoch(s) | {h['data']['eval_pairs']} clean pairs of {h['data']['eval_images']} other "
            f"images | {_held_out(run)} | {_decision(run)} | {h['serving_before']} → {h['serving_after']} | "
            f"{_pct(h['unseen_before']['r5'])} → {_pct(h['unseen_after']['r5'])} |",
            "",
            f"Serving {'unchanged' if h['unchanged'] else '**changed**'} after the harmful run.",
        ]
    return "\n".join(lines)


def notes(r: dict, printed: str) -> list[str]:
    """A part's own notes (``notes``/``explanation`` in its results) that its printed output does not hold yet."""
    out: list[str] = []
    for key in ("notes", "explanation"):
        value = r.get(key)
        for note in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
            if note and str(note) not in printed:
                out.append(str(note))
    return out


# -- charts ----------------------------------------------------------------------------------------------------
def save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_charts(results: dict, folder: Path) -> list[Path]:
    """PNG charts of what ran; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    # 1. every "× baseline" figure against its target
    rows = []
    for target in TARGETS:
        outcome = results.get(target.part)
        simple = re.fullmatch(r"([≥≤]) ([0-9.]+)×", target.goal)  # charted: a plain "≥ 1.9×" kind of target
        if not outcome or outcome.get("error") or target.meets is None or not simple:
            continue
        try:
            value = target.read(outcome["result"])
        except (KeyError, TypeError):
            value = None
        if value is None:
            continue
        rows.append((target.measure.replace("`", ""), value, float(simple.group(2)), target.meets(outcome["result"])))
    if rows:
        fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.4))
        names = [row[0] for row in rows]
        ys = range(len(rows))
        ax.barh(list(ys), [row[1] for row in rows], color=["#2b8a3e" if row[3] else "#c92a2a" for row in rows])
        for y, row in zip(ys, rows):
            ax.plot([row[2], row[2]], [y - 0.4, y + 0.4], color="black", linewidth=2)
            ax.text(row[1], y, f" {row[1]:.2f}×", va="center", fontsize=8)
        ax.set_yticks(list(ys), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ratio to the baseline measured in the same run (black tick: target)")
        ax.set_title("Speed ratios vs targets (green: met, red: short)")
        paths.append(save(fig, folder / "ratios.png"))

    # 2. search: recall@10 vs queries/s ratio per store
    search = results.get("search", {}).get("result")
    if search:
        fig, ax = plt.subplots(figsize=(6, 4))
        for store, row in search["report"].items():
            ax.scatter(row["qps_ratio"], row["recall_at_10"], s=40)
            ax.annotate(
                store, (row["qps_ratio"], row["recall_at_10"]), fontsize=8, xytext=(4, 4), textcoords="offset points"
            )
        ax.axhline(0.95, color="grey", linestyle="--", linewidth=1)
        ax.axvline(10, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("queries/s ÷ exact search (log)")
        ax.set_ylabel("recall@10")
        ax.set_title(f"Search, {search['n']:,} × {search['dim']} (dashed: targets)")
        paths.append(save(fig, folder / "search.png"))

    # 3. held-out recall: base, tuned fp32, tuned int8
    recall = _get(results.get("precision", {}), "result", "recall")
    if recall:
        keys = ["t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"]
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.27
        for i, (label, key) in enumerate(
            (("base", "before"), ("tuned fp32", "after_fp32"), ("tuned int8", "after_int8"))
        ):
            ax.bar(
                [x + (i - 1) * width for x in range(len(keys))],
                [100 * recall[key][k] for k in keys],
                width,
                label=label,
            )
        ax.set_xticks(range(len(keys)), keys)
        ax.set_ylabel("held-out recall (%)")
        ax.set_title("Fine-tuning on the synthetic domain data: held-out recall")
        ax.legend()
        paths.append(save(fig, folder / "recall.png"))

    # 4. latency: search idle vs during /train, and through the Flow
    load = _get(results.get("train_load", {}), "result")
    flow = _get(results.get("flow_search", {}), "result")
    bars = []
    if load and "idle" in load:
        bars += [("search, idle", load["idle"]), ("search, during /train", load["training"])]
    if flow and "flow_vector" in flow:
        bars += [
            (f"Flow vector query, {flow['n']:,} docs", flow["flow_vector"]),
            (f"Flow text query, {flow['n']:,} docs", flow["flow_text"]),
        ]
    if bars:
        fig, ax = plt.subplots(figsize=(8, 0.6 * len(bars) + 1.4))
        ys = range(len(bars))
        ax.barh([y - 0.2 for y in ys], [b[1]["p50_ms"] for b in bars], 0.4, label="p50")
        ax.barh([y + 0.2 for y in ys], [b[1]["p99_ms"] for b in bars], 0.4, label="p99")
        ax.set_yticks(list(ys), [b[0] for b in bars], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("latency (ms)")
        ax.set_title("/search latency through the gRPC Flow")
        ax.legend()
        paths.append(save(fig, folder / "latency.png"))

    # 5. learning from clicks: never-searched R@5 per round, against the clicks sent
    loop = _get(results.get("feedback_loop", {}), "result")
    if loop and loop.get("arms"):
        paths.append(feedback_loop_chart(loop, folder / "feedback_loop.png"))
    return paths


def feedback_loop_chart(r: dict, path: Path) -> Path:
    """Never-searched R@5 against the clicks sent, one line per arm, each round's gate decision marked; the harmful
    run's outcome as a star."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    marks = {
        "start": ("o", "black", "start"),
        "promoted": ("o", "#2b8a3e", "promoted"),
        "refused": ("x", "#c92a2a", "refused by the gate"),
        "failed": ("s", "#868e96", "run failed"),
    }
    labelled = set()
    for arm, colour in zip(r["arms"], ("#1c7ed6", "#e67700")):
        rounds = arm["rounds"]
        clicks = [row["clicks"] for row in rounds]
        unseen = [100 * row["unseen"]["r5"] for row in rounds]
        ax.plot(clicks, unseen, color=colour, label=f"{ARM_LABELS[arm['name']]}: never-searched captions")
        for row, x, y in zip(rounds, clicks, unseen):
            run = row.get("run")
            kind = "start" if run is None else "failed" if run.get("state") != "done" else None
            kind = kind or ("promoted" if run.get("promoted") else "refused")
            marker, mark_colour, label = marks[kind]
            ax.scatter(
                [x], [y], marker=marker, color=mark_colour, s=50, zorder=3, label=None if kind in labelled else label
            )
            labelled.add(kind)
            if run is None or run.get("promoted"):
                ax.annotate(row["serving"], (x, y), fontsize=7, xytext=(3, 5), textcoords="offset points")
    start = 100 * r["arms"][0]["start_r5"]
    for points in (10, 30):
        ax.axhline(start + points, color="grey", linestyle=":", linewidth=1)
        ax.text(
            0.99,
            start + points,
            f"start +{points} ",
            fontsize=7,
            va="bottom",
            ha="right",
            color="grey",
            transform=ax.get_yaxis_transform(),
        )
    harmful = r.get("harmful")
    gated = _arm(r, "gated")
    if harmful and gated:
        refused = not harmful["run"].get("promoted")
        ax.scatter(
            [gated["rounds"][-1]["clicks"]],
            [100 * harmful["unseen_after"]["r5"]],
            marker="*",
            s=160,
            facecolors="none",
            edgecolors="#c92a2a" if refused else "#e67700",
            zorder=4,
            label=f"after the harmful run ({'refused' if refused else 'promoted'})",
        )
    ax.set_xlabel("clicks sent (/feedback events)")
    ax.set_ylabel("recall@5, text → image (%)")
    ax.set_title("Learning from clicks: R@5 on never-searched captions per auto_train round")
    ax.legend(fontsize=7, loc="upper left")
    return save(fig, path)


# -- main ------------------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="every part at CI size: checks the machinery, not speed")
    p.add_argument("--only", nargs="+", choices=PART_NAMES, default=None, help="run only these parts")
    p.add_argument("--skip", nargs="+", choices=PART_NAMES, default=[], help="leave these parts out")
    p.add_argument(
        "--out",
        default=str(HERE / "RESULTS.md"),
        help="the report; its charts go to a charts/ folder beside it, the raw results to results.json",
    )
    p.add_argument(
        "--timeout", type=float, default=None, help="seconds each part may run (default: 1200, or 600 with --quick)"
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the other parts of the report's results.json: the parts run now replace theirs (each marked with "
        "this run's command and date), the report is written from the merged results",
    )
    p.add_argument(
        "--from-json",
        default=None,
        metavar="RESULTS_JSON",
        help="run nothing: write the report and charts again from the results.json of an earlier run",
    )
    args = p.parse_args(argv)
    if args.from_json:
        return rerender(Path(args.from_json), Path(args.out).resolve())
    names = [n for n in (args.only or PART_NAMES) if n not in args.skip]
    # quick: a part without quick arguments runs only when its full run has none either (flow_encode_tiny's
    # quick run is flow_encode_vit's)
    parts = [part for part in PARTS if part.name in names and (not args.quick or part.quick or part.full == ())]
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    timeout = args.timeout or (600.0 if args.quick else 1200.0)
    command = "python -m benchmarks" + (
        " " + shlex.join(argv if argv is not None else sys.argv[1:])
        if (argv if argv is not None else sys.argv[1:])
        else ""
    )
    info = machine()
    info["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    partial = out.parent / "results.json"
    if args.merge and not partial.is_file():
        p.error(f"--merge keeps the other parts of {partial}, which does not exist: run without --merge first")
    earlier = json.loads(partial.read_text()) if args.merge else None
    started = time.perf_counter()
    results: dict[str, dict] = {}

    def raw(wall_s: float) -> dict:
        """This run's results, or with ``--merge`` the earlier ones with this run's parts in their place."""
        if earlier is None:
            return {"machine": info, "command": command, "quick": args.quick, "wall_s": wall_s, "parts": results}
        ran = {"command": command, "date": info["date"], "commit": info["commit"], "quick": args.quick}
        return {**earlier, "parts": {**earlier["parts"], **{n: {**o, "ran": ran} for n, o in results.items()}}}

    with tempfile.TemporaryDirectory(prefix="cliptuner-benchmarks-") as tmp:
        for part in parts:
            limit = timeout if args.timeout or args.quick or part.timeout_s is None else max(timeout, part.timeout_s)
            results[part.name] = run_part(part, args.quick, Path(tmp), limit)
            # kept if a later step fails: --from-json writes the report
            partial.write_text(json.dumps(raw(time.perf_counter() - started), indent=2, default=str))
    wall = time.perf_counter() - started
    charts = write_report(out, raw(wall))
    failed = [name for name, outcome in results.items() if outcome.get("error")]
    print(
        f"[benchmarks] wrote {out} and {len(charts)} chart(s) in {wall / 60:.1f} min"
        + (f"; failed: {', '.join(failed)}" if failed else ""),
        file=sys.stderr,
    )
    return 1 if failed else 0


def write_report(out: Path, raw: dict) -> list[Path]:
    """RESULTS.md, charts/ and results.json beside it, from one run's raw results (old charts removed)."""
    charts_dir = out.parent / "charts"
    for old in charts_dir.glob("*.png") if charts_dir.exists() else []:
        old.unlink()  # from scratch: a chart of a part that did not run this time must not stay
    charts = draw_charts(raw["parts"], charts_dir)
    out.write_text(
        render(
            raw["parts"],
            raw["machine"],
            [str(c.relative_to(out.parent)) for c in charts],
            raw["quick"],
            raw["command"],
            raw["wall_s"],
        ),
        encoding="utf-8",
    )
    (out.parent / "results.json").write_text(json.dumps(raw, indent=2, default=str))
    return charts


def rerender(source: Path, out: Path) -> int:
    """``--from-json``: the report of an earlier run, written again (after a change to the report's layout)."""
    raw = json.loads(source.read_text())
    charts = write_report(out, raw)
    print(f"[benchmarks] wrote {out} and {len(charts)} chart(s) from {source}", file=sys.stderr)
    return 1 if any(outcome.get("error") for outcome in raw["parts"].values()) else 0
