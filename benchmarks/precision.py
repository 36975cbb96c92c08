"""int8 (and fp16) ONNX graphs vs the fp32 export of the same weights, in one run: speed, agreement, recall.

1. Speed and agreement: ``--model`` (ViT-B-32 by default, random init: speed does not depend on the weights) is
   exported once in fp32; a copy is converted to int8 (:func:`cliptuner.train.export.convert_precision`: ONNX Runtime's
   dynamic quantization of the weight matrices and the token embedding, 7-bit per-channel weights, patch Conv left
   in fp32). Both encode the same ``--images`` images (synthetic scenes) and ``--texts`` captions in
   batches of ``--batch`` on ``--threads`` ONNX Runtime threads, alternating, ``--repeats`` times; the ratio is
   int8 items/s ÷ fp32 items/s (medians), and the agreement the least (and the mean) per-row cosine between their
   embeddings. The fp32 baseline is what the project serves: ORT's default (all) graph optimizations, which
   already fuse GELU and skip-LayerNorm, so an offline transformer-optimizer pass would not make it faster.
2. Recall: ``cliptuner-tiny`` is fine-tuned on the synthetic domain data with ``cliptuner demo``'s settings (600
   images, 2 captions each, 10 epochs, batch 32, lr 6e-4, 20 warm-up steps) and exported with
   ``--export-precision int8``; the training report holds the held-out recall of the fp32 weights (``after``)
   and of the int8 graphs (``exported``), on the same held-out images, which chose nothing.

    python benchmarks/precision.py
    python benchmarks/precision.py --model cliptuner-tiny --images 64 --texts 64 --no-recall   # a quick check
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def speed(args: argparse.Namespace, work: Path) -> dict:
    import torch

    from cliptuner.config import ModelSpec
    from cliptuner.model.runtime import OnnxClip
    from cliptuner.train.export import convert_precision, export_model_dir
    from cliptuner.train.models import load_model
    from cliptuner.train.synthetic import generate

    torch.manual_seed(args.seed)  # the int8 error depends on the (random) weights
    fp32_dir = export_model_dir(load_model(ModelSpec(args.model)), work / "fp32", checkpoint=False)
    int8_dir = work / "int8"
    shutil.copytree(fp32_dir, int8_dir)
    for name in ("visual.onnx", "textual.onnx"):
        convert_precision(int8_dir / name, "int8")
    clips = {
        name: OnnxClip(path, device="cpu", intra_op_threads=args.threads, batch_size=args.batch)
        for name, path in (("fp32", fp32_dir), ("int8", int8_dir))
    }
    size = clips["fp32"].manifest.image_size
    data = generate(max(args.images, args.texts), "generic", seed=0, image_size=size)
    images, texts = data.images[: args.images], data.captions[: args.texts]
    out = {}
    for kind, items, encode in (("image", images, "encode_images"), ("text", texts, "encode_text")):
        embeddings = {name: getattr(clip, encode)(items) for name, clip in clips.items()}  # warm-up, and agreement
        cosines = (embeddings["fp32"] * embeddings["int8"]).sum(axis=1)
        rates: dict[str, list[float]] = {name: [] for name in clips}
        for _ in range(args.repeats):
            for name, clip in clips.items():
                started = time.perf_counter()
                getattr(clip, encode)(items)
                rates[name].append(len(items) / (time.perf_counter() - started))
        medians = {name: statistics.median(r) for name, r in rates.items()}
        out[kind] = {
            "fp32_per_s": medians["fp32"],
            "int8_per_s": medians["int8"],
            "ratio": medians["int8"] / medians["fp32"],
            "min_cosine": float(cosines.min()),
            "mean_cosine": float(cosines.mean()),
        }
    out["bytes"] = {
        name: sum((path / f).stat().st_size for f in ("visual.onnx", "textual.onnx"))
        for name, path in (("fp32", fp32_dir), ("int8", int8_dir))
    }
    return out


def recall(args: argparse.Namespace, work: Path) -> dict:
    from cliptuner.cli import main
    from cliptuner.train import synthetic

    data = synthetic.write_csv(
        work / "data", n_images=args.n_images, domain="domain", seed=args.seed, captions_per_image=2
    )
    out = work / "tuned-int8"
    code = main(
        [
            "train",
            "--data",
            str(data),
            "--model",
            "cliptuner-tiny",
            "--epochs",
            str(args.epochs),
            "--batch-size",
            "32",
            "--lr",
            "6e-4",
            "--warmup-steps",
            "20",
            "--seed",
            str(args.seed),
            "--out",
            str(out),
            "--quiet",
            "--device",
            "cpu",
            "--export-precision",
            "int8",
        ]
    )
    if code != 0:
        raise SystemExit(f"cliptuner train exited with {code}")
    report = json.loads((out / "report.json").read_text())
    return {
        "before": report["before"],
        "after_fp32": report["after"],
        "after_int8": report["exported"]["after"],
        "drop": report["exported"]["drop"],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--no-recall", dest="recall", action="store_false", help="skip the fine-tuning part")
    p.add_argument("--n-images", type=int, default=600, help="recall: synthetic domain images (the demo's)")
    p.add_argument("--epochs", type=int, default=10, help="recall: epochs (the demo's)")
    p.add_argument("--seed", type=int, default=0, help="weights of --model, and the recall run")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import onnxruntime
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cliptuner-precision-bench-") as tmp:
        result = {"speed": speed(args, Path(tmp))}
        if args.recall:
            result["recall"] = recall(args, Path(tmp))
    result.update(
        model=args.model,
        batch=args.batch,
        threads=args.threads,
        wall_s=time.perf_counter() - started,
        machine=f"{platform.platform()}, {os.cpu_count()} CPUs",
        python=platform.python_version(),
        onnxruntime=onnxruntime.__version__,
        command="python benchmarks/precision.py " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    print(f"{args.model}, batches of {args.batch}, {args.threads} threads")
    print("| tower | fp32 items/s | int8 items/s | int8 ÷ fp32 | min cosine int8 vs fp32 | mean cosine |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in ("image", "text"):
        row = result["speed"][kind]
        print(
            f"| {kind} | {row['fp32_per_s']:.1f} | {row['int8_per_s']:.1f} | {row['ratio']:.2f} | "
            f"{row['min_cosine']:.4f} | {row['mean_cosine']:.5f} |"
        )
    sizes = result["speed"]["bytes"]
    print(f"graphs: fp32 {sizes['fp32'] / 1e6:.0f} MB, int8 {sizes['int8'] / 1e6:.0f} MB")
    if args.recall:
        r = result["recall"]
        print("| held-out recall | base | tuned fp32 | tuned int8 | fp32 − int8 |")
        print("|---|---:|---:|---:|---:|")
        for key in ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"):
            print(
                f"| {key} | {100 * r['before'][key]:.1f}% | {100 * r['after_fp32'][key]:.1f}% | "
                f"{100 * r['after_int8'][key]:.1f}% | {100 * r['drop'][key]:+.1f} pts |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
