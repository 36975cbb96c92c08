"""ONNX Runtime encoding vs torch eager encoding of the same weights and inputs, and both against the fp32 FLOP limit.

``--model`` (ViT-B-32 by default) is built with a seeded random init (speed does not depend on the weights) and
exported once with the project's exporter (:func:`cliptuner.train.export.export_model_dir`). Both sides then embed the
same inputs on ``--threads`` threads:

- ``onnx``: the ONNX Runtime sessions of :class:`cliptuner.model.runtime.OnnxClip` (``session.run`` with the feeds);
- ``torch``: the same model's ``encode_image`` / ``encode_text`` (``normalize=True``, as the graphs) in eager mode
  under ``torch.inference_mode()``, with torch's default settings (its fused attention fast path included).

Timed region, ``model`` row (the fair comparison): model only, on pre-made tensors — one batch of ``--batch``
preprocessed pixel arrays (``OnnxClip.image_feeds`` of synthetic scenes) and token ids (``OnnxClip.text_feeds``
of their captions), the same arrays fed to both sides. ``end-to-end`` row (``--end-to-end``): from the scenes
(``H×W×3`` uint8, drawn at twice the model's input size so that resizing does work) and caption strings:
``OnnxClip.encode_images`` / ``encode_text`` (decode, resize, normalise, tokenize, run) vs the bundle's
``preprocess_val`` (PIL) and tokenizer followed by the torch encoders. The two sides alternate (the order swaps
every repeat), ``--repeats`` times; a side's rate is the median of its items/s, the ratio ONNX ÷ torch.

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` counts one batch of each tower (with the attention fast path
off, since the counter cannot see inside the fused kernel); one FLOP is one multiply or one add, so a
multiply-accumulate is 2 FLOPs. Only matrix products and convolutions are counted (norms, softmax and GELU add a
few per cent of real work). Achieved GFLOP/s = GFLOP/item × items/s (the median). The limit is measured in the
same run, in the same moments: after every repeat of a tower, the best of ``--gemm-repeats`` fp32 products of
``--gemm-size`` square matrices on the same thread count by each of ``torch.mm``, numpy (when the script pins
its OpenBLAS threads, i.e. imports numpy first) and a one-node ONNX Runtime ``MatMul``, the highest library
counting; a tower's peak is the median of these over its repeats (so that a busy spell on a shared machine
lowers the rates and the peak alike), and ``matmul_peak_gflops`` the median over both towers. The
``ratio_ceiling`` of a tower is its peak ÷ torch's achieved GFLOP/s: the ONNX/torch ratio that ONNX would reach by
running at the peak itself. Agreement: the least per-row cosine and the largest absolute difference between the
two sides' embeddings.

When a target is missed (ONNX/torch < ``--target-ratio`` or ONNX's fraction of the peak < ``--target-fraction``;
``--profile auto``), both sides are profiled on one batch per tower — ONNX Runtime's own profiler
(``SessionOptions.enable_profiling``, a separate session built like ``OnnxClip``'s) and ``torch.profiler``, three
runs each, an operator's time its least over them — and the top operator types with their share of the time go to
the result (``profile``) and the printout, with a note on what bounds each missed target (``notes``).

    python benchmarks/encode_speed.py                                  # ViT-B-32, batch 32 (a few minutes)
    python benchmarks/encode_speed.py --quick   # = --model cliptuner-tiny --repeats 3 --gemm-size 1024

Returns (and ``--json`` writes) a dict: ``image`` and ``text``, each ``{onnx_per_s, torch_per_s, ratio,
gflop_per_item, onnx_gflops, torch_gflops, peak_gflops, onnx_fraction_of_peak, torch_fraction_of_peak,
ratio_ceiling, min_cosine, max_abs_diff}``; ``end_to_end`` (with ``--end-to-end``) ``{image, text}`` each ``{onnx_per_s,
torch_per_s, ratio}``; ``matmul_peak_gflops`` and ``matmul`` (the best GFLOP/s of ``torch``, ``onnxruntime`` and
``numpy`` when pinned over the whole run, and ``size``); ``profile`` (when profiled) ``{image, text}`` each ``{onnx, torch}``, each ``{ops: [{op,
share}, ...], matmul_share}``; ``notes`` (what bounds each missed target, in words); ``model``, ``batch``,
``repeats``, ``flop_convention``, ``timed_region``, and ``machine``, ``python``, ``torch``, ``onnxruntime``,
``numpy``, ``threads``, ``wall_s``, ``command``.
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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOWERS = ("image", "text")
TOP_OPS = 6  # operator types listed per profile
PROFILE_RUNS = 3  # profiled runs per side and tower; each operator counts its least time over them
# operator names (ONNX op types, aten ops) that do the counted FLOPs: matrix products, convolutions, attention
MATMUL_MARKS = ("MatMul", "Gemm", "Conv", "Attention", "mm", "conv", "scaled_dot_product")
QUICK = {"model": "cliptuner-tiny", "repeats": 3, "gemm_size": 1024}  # what --quick sets


def _rows_agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Least per-row cosine and largest absolute difference of two ``[N, D]`` embedding arrays."""
    import numpy as np

    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min()), float(np.abs(a - b).max())


def _alternate(
    sides: dict[str, Callable[[], object]], items: int, repeats: int, gemm: Optional[_Gemm] = None
) -> tuple[dict[str, float], list[float]]:
    """Median items/s of each side, the sides run in turn and their order reversed every repeat.

    With ``gemm``, every repeat also measures the matmul peak (``gemm.best()``), so that the peak and the sides see
    the same moments of a shared machine's load; the per-repeat peaks are returned too.
    """
    rates: dict[str, list[float]] = {name: [] for name in sides}
    peaks: list[float] = []
    order = list(sides)
    for _ in range(repeats):
        for name in order:
            started = time.perf_counter()
            sides[name]()
            rates[name].append(items / (time.perf_counter() - started))
        if gemm is not None:
            peaks.append(max(gemm.best().values()))
        order.reverse()
    return {name: statistics.median(r) for name, r in rates.items()}, peaks


class _Gemm:
    """fp32 GEMMs of ``size``×``size`` matrices by torch, numpy (if ``with_numpy``) and ONNX Runtime."""

    def __init__(self, size: int, repeats: int, threads: int, work: Path, with_numpy: bool = True) -> None:
        import numpy as np
        import onnx
        import onnxruntime as ort
        import torch
        from onnx import TensorProto, helper

        rng = np.random.default_rng(0)
        a = rng.standard_normal((size, size), dtype=np.float32)
        b = rng.standard_normal((size, size), dtype=np.float32)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["a", "b"], ["c"])],
            "gemm",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in "ab"],
            [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])],
        )
        path = work / "gemm.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        self.runs = {"torch": lambda: torch.mm(ta, tb), "onnxruntime": lambda: session.run(None, {"a": a, "b": b})}
        if with_numpy:
            self.runs["numpy"] = lambda: a @ b
        self.flop = 2.0 * size**3
        self.repeats = repeats
        self.overall = {name: 0.0 for name in self.runs}  # best GFLOP/s of each library over every call
        for fn in self.runs.values():
            fn()  # warm-up

    def best(self) -> dict[str, float]:
        """Best GFLOP/s of each library over ``repeats`` products each (the libraries take turns)."""
        best = {name: 0.0 for name in self.runs}
        for _ in range(self.repeats):
            for name, fn in self.runs.items():
                started = time.perf_counter()
                fn()
                best[name] = max(best[name], self.flop / (time.perf_counter() - started) / 1e9)
        for name, value in best.items():
            self.overall[name] = max(self.overall[name], value)
        return best


def count_gflop(fn: Callable[[], object], items: int) -> float:
    """GFLOP per item of one call of ``fn`` (2 FLOPs per multiply-accumulate; matmuls and convolutions only)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel is opaque to the counter
    try:
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() / items / 1e9


def _shares(times: dict[str, float]) -> dict:
    """The top operator types by time and the share of all matrix-product operators."""
    total = sum(times.values()) or 1.0
    top = sorted(times.items(), key=lambda kv: kv[1], reverse=True)[:TOP_OPS]
    matmul = sum(t for op, t in times.items() if any(mark in op for mark in MATMUL_MARKS))
    return {"ops": [{"op": op, "share": t / total} for op, t in top], "matmul_share": matmul / total}


def profile_onnx(path: Path, feeds: dict[str, np.ndarray], threads: int, work: Path) -> dict:
    """Share of node time per ONNX operator type (a session built like ``OnnxClip``'s).

    Each node's time is its least over ``PROFILE_RUNS`` runs after a warm-up, so that a node that happened to be
    pre-empted on a shared machine does not pass for a slow operator.

    Returns:
        ``{"ops": [{"op", "share"}, ...] (the top ones), "matmul_share": float}``.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(work / f"ort-{path.stem}")
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    for _ in range(1 + PROFILE_RUNS):
        session.run(None, feeds)
    trace = json.loads(Path(session.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run")
    first_timed = starts[1]  # the warm-up run is left out
    least: dict[str, tuple[str, float]] = {}  # node name -> (op type, least duration)
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") and event["ts"] >= first_timed:
            op = event.get("args", {}).get("op_name", "?")
            previous = least.get(event["name"], (op, float("inf")))[1]
            least[event["name"]] = (op, min(previous, float(event["dur"])))
    times: dict[str, float] = {}
    for op, duration in least.values():
        times[op] = times.get(op, 0.0) + duration
    return _shares(times)


def profile_torch(fn: Callable[[], object]) -> dict:
    """Share of self CPU time per aten operator (same form as :func:`profile_onnx`), each operator's time the
    least over ``PROFILE_RUNS`` profiled calls of ``fn`` after a warm-up."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    times: dict[str, float] = {}
    with torch.inference_mode():
        fn()
        for run in range(PROFILE_RUNS):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            for e in prof.key_averages():
                if e.self_cpu_time_total > 0:
                    t = float(e.self_cpu_time_total)
                    times[e.key] = t if run == 0 else min(times.get(e.key, t), t)
    return _shares(times)


class _Towers:
    """The exported model on both sides, and the same inputs for each tower."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        import torch

        from cliptuner.config import ModelSpec
        from cliptuner.model.runtime import OnnxClip
        from cliptuner.train.export import export_model_dir
        from cliptuner.train.models import load_model
        from cliptuner.train.synthetic import generate

        torch.manual_seed(args.seed)
        self.bundle = load_model(ModelSpec(args.model))
        self.model_dir = export_model_dir(self.bundle, work / "model", checkpoint=False)
        self.clip = OnnxClip(self.model_dir, device="cpu", intra_op_threads=args.threads, batch_size=args.batch)
        m = self.clip.manifest
        data = generate(args.batch, "generic", seed=args.seed, image_size=2 * m.image_size)
        self.scenes = data.images  # H×W×3 uint8, twice the model's input size
        self.captions = data.captions
        self.feeds = {
            "image": self.clip.image_feeds(self.scenes),  # {"pixel_values": [batch, 3, H, W]}
            "text": self.clip.text_feeds(self.captions),
        }  # {"input_ids": [batch, context]}
        # OnnxClip runs each tower's session on the feeds; the model row times exactly that call
        self.sessions = {"image": self.clip._visual, "text": self.clip._textual}
        self.graphs = {"image": self.model_dir / m.onnx.visual.file, "text": self.model_dir / m.onnx.textual.file}
        model = self.bundle.model.eval()
        pixels = torch.from_numpy(self.feeds["image"][m.onnx.visual.input])
        ids = torch.from_numpy(self.feeds["text"][m.onnx.textual.input])
        self.torch_calls = {
            "image": lambda: model.encode_image(pixels, normalize=True),  # [batch, embed_dim]
            "text": lambda: model.encode_text(ids, normalize=True),
        }

    def onnx_model(self, tower: str) -> np.ndarray:
        return self.sessions[tower].run(None, self.feeds[tower])[0]

    def torch_model(self, tower: str) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.torch_calls[tower]().numpy()

    def onnx_end_to_end(self, tower: str) -> np.ndarray:
        return self.clip.encode_images(self.scenes) if tower == "image" else self.clip.encode_text(self.captions)

    def torch_end_to_end(self, tower: str) -> np.ndarray:
        import torch
        from PIL import Image

        model = self.bundle.model
        with torch.inference_mode():
            if tower == "image":
                pixels = torch.stack([self.bundle.preprocess_val(Image.fromarray(s)) for s in self.scenes])
                return model.encode_image(pixels, normalize=True).numpy()
            return model.encode_text(self.bundle.tokenizer(self.captions), normalize=True).numpy()


def measure(args: argparse.Namespace, towers: _Towers, gemm: _Gemm) -> dict:
    """Speed, FLOPs, fraction of the peak and agreement per tower (the model row), and the end-to-end row if asked.

    The peak of a tower is the median of the matmul peaks measured between its repeats, so that its fraction sets
    the tower's median rate against the peak at the same moments.
    """
    out: dict = {}
    all_peaks: list[float] = []
    for tower in TOWERS:
        onnx_out, torch_out = towers.onnx_model(tower), towers.torch_model(tower)  # warm-up, and agreement
        min_cosine, max_abs_diff = _rows_agreement(onnx_out, torch_out)
        rates, peaks = _alternate(
            {
                "onnx": lambda tower=tower: towers.onnx_model(tower),
                "torch": lambda tower=tower: towers.torch_model(tower),
            },
            args.batch,
            args.repeats,
            gemm,
        )
        all_peaks += peaks
        peak = statistics.median(peaks)
        gflop = count_gflop(towers.torch_calls[tower], args.batch)
        onnx_gflops, torch_gflops = gflop * rates["onnx"], gflop * rates["torch"]
        out[tower] = {
            "onnx_per_s": rates["onnx"],
            "torch_per_s": rates["torch"],
            "ratio": rates["onnx"] / rates["torch"],
            "gflop_per_item": gflop,
            "onnx_gflops": onnx_gflops,
            "torch_gflops": torch_gflops,
            "peak_gflops": peak,
            "onnx_fraction_of_peak": onnx_gflops / peak,
            "torch_fraction_of_peak": torch_gflops / peak,
            "ratio_ceiling": peak / torch_gflops,
            "min_cosine": min_cosine,
            "max_abs_diff": max_abs_diff,
        }
    out["matmul_peak_gflops"] = statistics.median(all_peaks)
    if args.end_to_end:
        out["end_to_end"] = {}
        for tower in TOWERS:
            towers.onnx_end_to_end(tower), towers.torch_end_to_end(tower)  # warm-up
            rates, _ = _alternate(
                {
                    "onnx": lambda tower=tower: towers.onnx_end_to_end(tower),
                    "torch": lambda tower=tower: towers.torch_end_to_end(tower),
                },
                args.batch,
                args.repeats,
            )
            out["end_to_end"][tower] = {
                "onnx_per_s": rates["onnx"],
                "torch_per_s": rates["torch"],
                "ratio": rates["onnx"] / rates["torch"],
            }
    return out


def diagnose(result: dict, target_ratio: float, target_fraction: float) -> list[str]:
    """What bounds each missed target, in words, from the measured numbers (and the profiles, when taken)."""
    notes = []
    for tower in TOWERS:
        row = result[tower]
        if row["ratio"] < target_ratio and row["ratio_ceiling"] < target_ratio:
            notes.append(
                f"{tower}: ONNX ÷ torch cannot reach {target_ratio:g} on this machine: torch eager already "
                f"runs at {row['torch_fraction_of_peak']:.0%} of the matmul peak, so ONNX at the peak "
                f"itself would be {row['ratio_ceiling']:.2f}× torch"
            )
        elif row["ratio"] < target_ratio:
            notes.append(
                f"{tower}: ONNX ÷ torch {row['ratio']:.2f} while ONNX at the peak would give "
                f"{row['ratio_ceiling']:.2f}: ONNX's own efficiency ({row['onnx_fraction_of_peak']:.0%} of "
                "the peak) is what limits it"
            )
        prof = result.get("profile", {}).get(tower)
        if row["onnx_fraction_of_peak"] < target_fraction and prof:
            others = [o["op"] for o in prof["onnx"]["ops"] if not any(m in o["op"] for m in MATMUL_MARKS)]
            share = prof["onnx"]["matmul_share"]
            notes.append(
                f"{tower}: ONNX at {row['onnx_fraction_of_peak']:.0%} of the peak; matrix products take "
                f"{share:.0%} of its node time (so they run at about "
                f"{row['onnx_fraction_of_peak'] / max(share, 1e-9):.0%} of the peak themselves), the rest "
                f"({', '.join(others)}) adds no counted FLOPs: fusing it (attention, layer norm, bias and "
                "activation into the products) is what could raise the fraction"
            )
    return notes


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="ViT-B-32", help="OpenCLIP arch or bundled config (random init)")
    p.add_argument("--batch", type=int, default=32, help="items per encode call")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per side and tower (alternating)")
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    p.add_argument("--gemm-size", type=int, default=2048, help="side of the square matrices of the peak GEMM")
    p.add_argument("--gemm-repeats", type=int, default=3, help="GEMMs per library after each repeat (the best counts)")
    p.add_argument(
        "--end-to-end",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time from images/strings (preprocessing and tokenizing inside the timed region)",
    )
    p.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="profile both sides per tower: auto = when a target is missed",
    )
    p.add_argument("--target-ratio", type=float, default=1.9, help="ONNX ÷ torch target (for --profile auto)")
    p.add_argument(
        "--target-fraction",
        type=float,
        default=0.8,
        help="target fraction of the matmul peak for ONNX (for --profile auto)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument(
        "--quick",
        action="store_true",
        help="quick sizes: "
        + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in QUICK.items())
        + " (options given explicitly win)",
    )
    args, _ = p.parse_known_args(argv)
    if args.quick:
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.gemm_size < 1 or args.gemm_repeats < 1:
        p.error("--batch, --repeats, --gemm-size and --gemm-repeats must be >= 1")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    # numpy's OpenBLAS fixes its thread count when first imported: its GEMM counts only if that happens here
    numpy_pinned = "numpy" not in sys.modules
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)

    import numpy as np
    import onnxruntime
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cliptuner-encode-speed-") as tmp:
        work = Path(tmp)
        towers = _Towers(args, work)
        gemm = _Gemm(args.gemm_size, args.gemm_repeats, args.threads, work, with_numpy=numpy_pinned)
        result = measure(args, towers, gemm)
        missed = any(
            result[t]["ratio"] < args.target_ratio or result[t]["onnx_fraction_of_peak"] < args.target_fraction
            for t in TOWERS
        )
        if args.profile == "always" or (args.profile == "auto" and missed):
            result["profile"] = {
                t: {
                    "onnx": profile_onnx(towers.graphs[t], towers.feeds[t], args.threads, work),
                    "torch": profile_torch(towers.torch_calls[t]),
                }
                for t in TOWERS
            }
    result["notes"] = diagnose(result, args.target_ratio, args.target_fraction)
    result.update(
        matmul={**gemm.overall, "size": args.gemm_size},
        model=args.model,
        batch=args.batch,
        repeats=args.repeats,
        threads=args.threads,
        flop_convention="2 FLOPs per multiply-accumulate; matmuls and convolutions (FlopCounterMode)",
        timed_region="model: one session.run / encode_* call on pre-made tensors; end_to_end: from "
        "uint8 images and strings, preprocessing and tokenizing included",
        wall_s=time.perf_counter() - started,
        machine=f"{platform.platform()}, {os.cpu_count()} CPUs",
        python=platform.python_version(),
        torch=torch.__version__,
        onnxruntime=onnxruntime.__version__,
        numpy=np.__version__,
        command="python benchmarks/encode_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def _print(result: dict) -> None:
    m = result["matmul"]
    libraries = ", ".join(f"{name} {m[name]:.0f}" for name in ("torch", "numpy", "onnxruntime") if name in m)
    print(
        f"{result['model']}, batches of {result['batch']}, {result['threads']} threads, median of "
        f"{result['repeats']}; fp32 GEMM peak {result['matmul_peak_gflops']:.0f} GFLOP/s (median between repeats; "
        f"best of the run, {m['size']}²: {libraries})"
    )
    print(
        "| tower | timed | ONNX items/s | torch items/s | ONNX ÷ torch | GFLOP/item | ONNX GFLOP/s (of peak) | "
        "torch GFLOP/s (of peak) | ceiling ÷ torch | min cosine |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for tower in TOWERS:
        r = result[tower]
        print(
            f"| {tower} | model | {r['onnx_per_s']:.1f} | {r['torch_per_s']:.1f} | {r['ratio']:.2f} | "
            f"{r['gflop_per_item']:.3f} | {r['onnx_gflops']:.0f} ({100 * r['onnx_fraction_of_peak']:.0f}%) | "
            f"{r['torch_gflops']:.0f} ({100 * r['torch_fraction_of_peak']:.0f}%) | {r['ratio_ceiling']:.2f} | "
            f"{r['min_cosine']:.6f} |"
        )
    for tower, r in result.get("end_to_end", {}).items():
        print(f"| {tower} | end-to-end | {r['onnx_per_s']:.1f} | {r['torch_per_s']:.1f} | {r['ratio']:.2f} | | | | | |")
    for tower, sides in result.get("profile", {}).items():
        for side, prof in sides.items():
            print(
                f"profile {tower} {side} (matrix products {100 * prof['matmul_share']:.0f}%): "
                + ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in prof["ops"])
            )
    for note in result["notes"]:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
