"""Seed table: retrieval recall@5 of public CLIP models before vs after fine-tuning, on Karpathy test splits.

For every ``--models`` entry (``ARCH:PRETRAINED``; default ViT-B-32 ``openai``, ViT-B-16-plus-240
``laion400m_e32`` and ViT-B-32-quickgelu ``laion400m_e32``) and every data set (default Flickr8k, Flickr30k and
MS-COCO, Karpathy splits) the script, in one run and on the same pairs:

1. evaluates the pretrained weights on the Karpathy ``test`` split (the baseline: "before"; CLIP_benchmark's
   protocol, :mod:`cliptuner.train.evaluate`: 1k Flickr test images, 5k COCO test images, the first
   ``--test-captions`` (5) captions of each image; text→image R@k: a caption's own image in the top k;
   image→text R@k: any of the image's captions in the top k);
2. fine-tunes them on ``train`` (+ ``restval`` for COCO) with :func:`cliptuner.train.loop.finetune` (AdamW,
   ``--lr`` 1e-5 — a small rate for an already trained CLIP — ``--warmup-steps`` linear warm-up then cosine,
   ``--epochs``, ``--batch-size`` pairs with no two captions of one image in a batch, weight decay 0.1, AMP on
   CUDA). ``--keep-best``/``--early-stop-patience`` choose the epoch on ``--val-fraction`` of the TRAINING
   images (the project's rule, so that the reported split never chooses; the Karpathy ``val`` split is counted
   but not used);
3. evaluates the tuned weights on the SAME test split ("after").

Next to "before" the table prints the published zero-shot R@5 of the same weights on the same split
(:data:`REFERENCE_R5`, from LAION-AI/CLIP_benchmark), which "before" should come close to (the protocol is the
same; tie-breaking and the image decoder may differ slightly). OpenCLIP 3.x resolves ViT-B-16-plus-240 ``laion400m_e32`` to
the hub file of ``laion400m_e31`` (``timm/vit_base_patch16_plus_clip_240.laion400m_e31``), whose published
Flickr30k and MSCOCO numbers differ from e32's by at most 0.3 points (open_clip's
``docs/openclip_retrieval_results.csv``).

Weights: a pretrained tag is used only when its file is already in the Hugging Face cache (``HF_HOME`` /
``HF_HUB_CACHE``, or ``--cache-dir``), checked with :func:`cliptuner.train.models.cached_pretrained_file`; the model
is then built with the hub in offline mode. ``PRETRAINED`` may also be a local checkpoint path, or empty for a
random init. Data: ``--datasets NAME=KARPATHY_JSON[:IMAGE_ROOT]`` (image paths are
``IMAGE_ROOT/filepath/filename``; IMAGE_ROOT defaults to the JSON's folder), or the defaults under
``--data-root`` in the layout of Karpathy's ``caption_datasets.zip`` unpacked next to the image folders::

    DATA_ROOT/dataset_flickr8k.json   DATA_ROOT/Flicker8k_Dataset/*.jpg
    DATA_ROOT/dataset_flickr30k.json  DATA_ROOT/flickr30k-images/*.jpg
    DATA_ROOT/dataset_coco.json       DATA_ROOT/train2014/*.jpg  DATA_ROOT/val2014/*.jpg   (entries carry filepath)

A row that cannot run (weights not in the cache, unknown tag, data set not found, bad rows in the JSON) is
printed with its reason; nothing is downloaded and the run goes on. A row that fails while running is reported
with the error, and the run goes on.

    # full table (a GPU box with the weights cached and the data on disk; hours on a GPU, far too long on a CPU)
    python -m benchmarks.seed_table --data-root /data/karpathy --device cuda --json seed_table.json
    # quick: one model, one data set, one epoch on 5000 training images (test split whole)
    python -m benchmarks.seed_table --models ViT-B-32:openai \\
        --datasets flickr8k=/data/karpathy/dataset_flickr8k.json:/data/karpathy/Flicker8k_Dataset \\
        --epochs 1 --max-train-images 5000 --json quick.json
    # without the weights in the cache or the data on disk, both only list the rows with their reasons, in seconds

Returned dict (and ``--json``): ``rows`` (one per model × data set: ``model``, ``pretrained``, ``dataset``,
``status`` ``ok``/``skipped``/``error``, ``reasons`` (a list) and ``reason`` (joined, or None), ``test_images``,
``test_texts``, ``train_images``, ``train_pairs``, ``val_images`` (Karpathy ``val``, not used), ``before`` and
``after`` (``t2i_r1 t2i_r5 t2i_r10 i2t_r1 i2t_r5 i2t_r10 mean_recall`` in [0, 1]), ``reference`` (published
``t2i_r5``/``i2t_r5`` and ``source``, or None: not published), ``epochs``, ``epoch_losses``, ``samples_per_s``,
``trained_images``, ``seconds``), ``settings`` (the training and evaluation options, models and data sets),
``reference_source``, and ``machine``, ``python``, ``torch``, ``open_clip``, ``huggingface_hub``, ``threads``,
``device``, ``wall_s``, ``command``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("seed_table")

DEFAULT_MODELS = ("ViT-B-32:openai", "ViT-B-16-plus-240:laion400m_e32", "ViT-B-32-quickgelu:laion400m_e32")
# --data-root layout: data set name -> (Karpathy JSON, image root), both relative to the data root
DATA_LAYOUT = {
    "flickr8k": ("dataset_flickr8k.json", "Flicker8k_Dataset"),
    "flickr30k": ("dataset_flickr30k.json", "flickr30k-images"),
    "coco": ("dataset_coco.json", "."),
}
REFERENCE_SOURCE = (
    "LAION-AI/CLIP_benchmark benchmark/benchmark.csv (last changed in commit 16c2d84, "
    "2022-12-21: 'update flickr8k results'), columns image_retrieval_recall@5 (t2i) and "
    "text_retrieval_recall@5 (i2t) of the zeroshot_retrieval rows on flickr8k, flickr30k and "
    "mscoco_captions (Karpathy test splits); rounded to 4 decimals. mlfoundations/open_clip "
    "docs/openclip_retrieval_results.csv gives the same Flickr30k/MSCOCO numbers to within 0.2 "
    "points."
)
# Published zero-shot recall@5 (t2i, i2t) on the Karpathy test splits: (arch, tag, data set) -> values. Source:
# REFERENCE_SOURCE. Only these 9 rows were looked up; any other combination prints "not published".
REFERENCE_R5: dict[tuple[str, str, str], dict[str, float]] = {
    ("ViT-B-32", "openai", "flickr8k"): {"t2i_r5": 0.8054, "i2t_r5": 0.9140},
    ("ViT-B-32", "openai", "flickr30k"): {"t2i_r5": 0.8338, "i2t_r5": 0.9490},
    ("ViT-B-32", "openai", "coco"): {"t2i_r5": 0.5585, "i2t_r5": 0.7482},
    ("ViT-B-16-plus-240", "laion400m_e32", "flickr8k"): {"t2i_r5": 0.8732, "i2t_r5": 0.9550},
    ("ViT-B-16-plus-240", "laion400m_e32", "flickr30k"): {"t2i_r5": 0.8894, "i2t_r5": 0.9710},
    ("ViT-B-16-plus-240", "laion400m_e32", "coco"): {"t2i_r5": 0.6621, "i2t_r5": 0.8102},
    ("ViT-B-32-quickgelu", "laion400m_e32", "flickr8k"): {"t2i_r5": 0.8304, "i2t_r5": 0.9170},
    ("ViT-B-32-quickgelu", "laion400m_e32", "flickr30k"): {"t2i_r5": 0.8546, "i2t_r5": 0.9410},
    ("ViT-B-32-quickgelu", "laion400m_e32", "coco"): {"t2i_r5": 0.6085, "i2t_r5": 0.7676},
}
METRICS = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "mean_recall")


@dataclass(frozen=True)
class ModelEntry:
    """One ``--models`` entry: an OpenCLIP arch and where its weights come from."""

    arch: str  # OpenCLIP model name or a bundled config
    pretrained: str  # OpenCLIP tag, local checkpoint path, or "" for a random init

    @classmethod
    def parse(cls, text: str) -> ModelEntry:
        """``ARCH:PRETRAINED`` (split at the first colon; ``ARCH:`` is a random init)."""
        arch, sep, pretrained = text.partition(":")
        if not sep or not arch.strip():
            raise argparse.ArgumentTypeError(f"expected ARCH:PRETRAINED (e.g. ViT-B-32:openai), got {text!r}")
        return cls(arch.strip(), pretrained.strip())


@dataclass(frozen=True)
class DatasetEntry:
    """One data set: a Karpathy-style JSON and the folder its image paths are relative to."""

    name: str  # flickr8k, flickr30k, coco (names the published reference) or any other label
    json_path: str  # the Karpathy JSON
    image_root: Optional[str] = None  # None: the JSON's folder

    @classmethod
    def parse(cls, text: str) -> DatasetEntry:
        """``NAME=PATH_TO_KARPATHY_JSON[:IMAGE_ROOT]`` (the image root follows the ``.json:``)."""
        name, sep, rest = text.partition("=")
        if not sep or not name.strip() or not rest.strip():
            raise argparse.ArgumentTypeError(f"expected NAME=KARPATHY_JSON[:IMAGE_ROOT], got {text!r}")
        cut = rest.lower().find(".json:")
        if cut >= 0:
            return cls(name.strip(), rest[: cut + 5], rest[cut + 6 :] or None)
        return cls(name.strip(), rest)


def default_datasets(data_root: str) -> list[DatasetEntry]:
    """The three data sets in the ``--data-root`` layout (:data:`DATA_LAYOUT`)."""
    root = Path(data_root).expanduser()
    return [DatasetEntry(name, str(root / js), str(root / images)) for name, (js, images) in DATA_LAYOUT.items()]


def model_problem(entry: ModelEntry, cache_dir: Optional[str]) -> Optional[str]:
    """Why ``entry`` cannot be built here without a download, or None when it can."""
    import open_clip

    from cliptuner.train.models import cached_pretrained_file, is_local_checkpoint

    if entry.arch not in set(open_clip.list_models()):
        return f"unknown OpenCLIP model {entry.arch!r}"
    if not entry.pretrained:
        return None
    if is_local_checkpoint(entry.pretrained):
        path = Path(entry.pretrained).expanduser()
        return None if path.is_file() else f"checkpoint file not found at {str(path)!r}"
    try:
        found = cached_pretrained_file(entry.arch, entry.pretrained, cache_dir)
    except ValueError as exc:
        return str(exc)
    if found is None:
        cfg = open_clip.get_pretrained_cfg(entry.arch, entry.pretrained)
        where = cfg.get("hf_hub") or cfg.get("url") or "?"
        return (
            f"weights of {entry.arch} {entry.pretrained} ({where}) are not in the Hugging Face cache"
            f"{f' {cache_dir!r}' if cache_dir else ''}; fetch them once where the hub is reachable "
            f"(open_clip.create_model({entry.arch!r}, pretrained={entry.pretrained!r}))"
        )
    return None


def dataset_problem(entry: DatasetEntry) -> Optional[str]:
    """Why ``entry`` cannot be read (JSON or image folder missing), or None."""
    if not Path(entry.json_path).expanduser().is_file():
        return f"data set {entry.name} not found at {entry.json_path!r}"
    if entry.image_root is not None and not Path(entry.image_root).expanduser().is_dir():
        return f"image folder of {entry.name} not found at {entry.image_root!r}"
    return None


def first_captions(pairs: Any, n: int) -> Any:
    """``pairs`` with at most the first ``n`` captions of each image (CLIP_benchmark's 5 per image)."""
    from cliptuner.train.data import PairSet

    keep = sorted(p for i in range(pairs.num_images) for p in pairs.captions_of(i)[:n])
    if len(keep) == len(pairs):
        return pairs
    return PairSet(
        images=pairs.images,
        captions=[pairs.captions[p] for p in keep],
        image_index=[pairs.image_index[p] for p in keep],
        image_ids=pairs.image_ids,
        name=pairs.name,
    )


def load_dataset(entry: DatasetEntry, test_captions: int, max_train_images: int, seed: int) -> dict[str, Any]:
    """The Karpathy ``test`` split (captions capped), ``train`` (+ ``restval``, optionally subsampled) and the
    size of ``val``.

    Raises:
        cliptuner.train.data.DataError: the JSON or its rows are unusable (the message names the row).
    """
    import numpy as np

    from cliptuner.train.data import DataError, load_karpathy

    path = Path(entry.json_path).expanduser()
    root = Path(entry.image_root).expanduser() if entry.image_root is not None else None
    test = first_captions(load_karpathy(path, split="test", image_root=root), test_captions)
    train = load_karpathy(path, split="train", image_root=root)
    if 0 < max_train_images < train.num_images:
        chosen = np.random.default_rng(seed).permutation(train.num_images)[:max_train_images]
        train = train.subset_images(sorted(int(i) for i in chosen))
    try:
        val_images = load_karpathy(path, split="val", image_root=root).num_images
    except DataError:
        val_images = 0  # no val split (or unusable): it is not used anyway
    return {"train": train, "test": test, "val_images": val_images}


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face hub requests refused while inside: a cached file is read, nothing is fetched.

    ``huggingface_hub`` checks ``constants.HF_HUB_OFFLINE`` (what ``HF_HUB_OFFLINE=1`` sets at import) before
    every request, so setting it here holds even when the module was imported earlier.
    """
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def build_model(entry: ModelEntry, cache_dir: Optional[str], seed: int) -> Any:
    """The model of ``entry`` on CPU, from the cache only; QuickGELU forced where the tag was trained with it."""
    import open_clip

    from cliptuner.config import ModelSpec
    from cliptuner.train.models import is_local_checkpoint, load_model, seed_everything

    quick_gelu = False
    if entry.pretrained and not is_local_checkpoint(entry.pretrained):
        quick_gelu = bool(open_clip.get_pretrained_cfg(entry.arch, entry.pretrained).get("quick_gelu"))
    seed_everything(seed)  # the same init for a random-init entry on every data set
    with hub_offline():
        return load_model(
            ModelSpec(entry.arch, pretrained=entry.pretrained or None, cache_dir=cache_dir, force_quick_gelu=quick_gelu)
        )


def run_row(entry: ModelEntry, data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate on test, fine-tune on train, evaluate on the same test split; the row's measured fields."""
    from cliptuner.config import EvalConfig, TrainConfig
    from cliptuner.train.loop import finetune

    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        precision=args.precision,
        device=args.device,
        seed=args.seed,
        num_workers=args.workers,
        keep_best=args.keep_best,
        early_stop_patience=args.early_stop_patience,
        val_fraction=args.val_fraction,
        log_every=args.log_every,
    )
    started = time.perf_counter()
    bundle = build_model(entry, args.cache_dir, args.seed)
    try:
        report = finetune(bundle, data["train"], data["test"], cfg, EvalConfig(batch_size=args.eval_batch_size))
    finally:
        del bundle
        _free_device_memory()
    test = data["test"]
    if report["split"]["eval_images"] != test.num_images or report["split"]["eval_pairs"] != len(test):
        raise RuntimeError(f"evaluated {report['split']} instead of the {test.num_images} test images")
    return {
        "before": report["before"],
        "after": report["after"],
        "epochs": report["epochs"],
        "epoch_losses": report["epoch_losses"],
        "samples_per_s": report["samples_per_s"],
        "trained_images": report["split"]["train_images"],
        "seconds": time.perf_counter() - started,
        **({"best_epoch": report["best_epoch"]} if "best_epoch" in report else {}),
    }


def _free_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _pct(row: dict[str, Any], part: str, key: str) -> str:
    values = row.get(part)
    return f"{100 * values[key]:.1f}" if values else "—"


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The seed table (recall@5 in %), then each distinct reason a row did not run, numbered."""
    lines = [
        "| model | pretrained | dataset | test images | t2i R@5 published | t2i R@5 before | t2i R@5 after "
        "| i2t R@5 published | i2t R@5 before | i2t R@5 after | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    notes: dict[str, int] = {}
    for row in rows:
        status = row["status"]
        if row["reasons"]:
            numbers = [notes.setdefault(reason, len(notes) + 1) for reason in row["reasons"]]
            status += " (" + ", ".join(str(n) for n in numbers) + ")"
        published = {
            key: _pct(row, "reference", key) if row["reference"] else "not published" for key in ("t2i_r5", "i2t_r5")
        }
        lines.append(
            f"| {row['model']} | {row['pretrained'] or 'random init'} | {row['dataset']} "
            f"| {row.get('test_images') or '—'} | {published['t2i_r5']} "
            f"| {_pct(row, 'before', 't2i_r5')} | {_pct(row, 'after', 't2i_r5')} "
            f"| {published['i2t_r5']} | {_pct(row, 'before', 'i2t_r5')} | {_pct(row, 'after', 'i2t_r5')} "
            f"| {status} |"
        )
    if notes:
        lines += [""] + [f"({n}) {reason}" for reason, n in notes.items()]
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--models",
        nargs="+",
        type=ModelEntry.parse,
        default=None,
        metavar="ARCH:PRETRAINED",
        help="OpenCLIP arch and tag, local checkpoint path, or empty (random init); default: "
        + " ".join(DEFAULT_MODELS),
    )
    p.add_argument(
        "--datasets",
        nargs="+",
        type=DatasetEntry.parse,
        default=None,
        metavar="NAME=JSON[:IMAGE_ROOT]",
        help="Karpathy-style JSON files (default: the three under "
        "--data-root); NAME flickr8k, flickr30k or coco picks the published reference",
    )
    p.add_argument(
        "--data-root",
        default="~/datasets/karpathy",
        help="folder with dataset_{flickr8k,flickr30k,coco}.json and the image folders (see the docstring)",
    )
    p.add_argument("--cache-dir", default=None, help="OpenCLIP/HF cache folder (default: the HF cache of HF_HOME)")
    p.add_argument("--test-captions", type=int, default=5, help="captions per test image evaluated (the first N)")
    p.add_argument(
        "--max-train-images",
        type=int,
        default=0,
        help="train on a seeded subset of this many training images (0: all); the test split stays whole",
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128, help="pairs per step (no image twice in a batch)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument(
        "--precision",
        default="amp",
        choices=("fp32", "amp", "amp_bf16"),
        help="amp: fp16 autocast on CUDA (fp32 on CPU)",
    )
    p.add_argument(
        "--keep-best",
        action="store_true",
        help="restore the epoch with the best t2i R@5 on --val-fraction of the training images",
    )
    p.add_argument("--early-stop-patience", type=int, default=None, help="stop after N epochs without improvement")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="share of training images that choose the epoch (with --keep-best or --early-stop-patience)",
    )
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100, help="progress line every N steps (stderr)")
    p.add_argument("--json", default=None, help="also write the returned dict here")
    args = p.parse_args(argv)
    if args.test_captions < 1:
        p.error(f"--test-captions must be >= 1, got {args.test_captions}")
    args.models = args.models or [ModelEntry.parse(m) for m in DEFAULT_MODELS]
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import huggingface_hub
    import open_clip
    import torch

    from cliptuner.train.data import DataError

    torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    datasets = args.datasets or default_datasets(args.data_root)
    started = time.perf_counter()

    loaded: dict[str, Any] = {}  # data set name -> its splits, or the reason it cannot be used
    for entry in datasets:
        problem = dataset_problem(entry)
        if problem is None:
            try:
                loaded[entry.name] = load_dataset(entry, args.test_captions, args.max_train_images, args.seed)
            except DataError as exc:
                problem = f"data set {entry.name} at {entry.json_path!r} is unusable: {exc}"
        if problem is not None:
            loaded[entry.name] = problem
            logger.warning("%s", problem)

    rows = []
    for model in args.models:
        problem = model_problem(model, args.cache_dir)
        for entry in datasets:
            data = loaded[entry.name]
            row: dict[str, Any] = {
                "model": model.arch,
                "pretrained": model.pretrained,
                "dataset": entry.name,
                "json": entry.json_path,
                "status": "skipped",
                "reason": None,
                "reasons": [],
                "before": None,
                "after": None,
                "reference": (
                    {**REFERENCE_R5[key], "source": "CLIP_benchmark"}
                    if (key := (model.arch, model.pretrained, entry.name)) in REFERENCE_R5
                    else None
                ),
            }
            if isinstance(data, dict):
                row.update(
                    test_images=data["test"].num_images,
                    test_texts=len(data["test"]),
                    train_images=data["train"].num_images,
                    train_pairs=len(data["train"]),
                    val_images=data["val_images"],
                )
            row["reasons"] = [r for r in (problem, data if isinstance(data, str) else None) if r]
            if not row["reasons"]:
                try:
                    row.update(run_row(model, data, args), status="ok")
                except Exception as exc:  # reported in the row; the other rows still run
                    logger.exception("%s %s on %s failed", model.arch, model.pretrained, entry.name)
                    row.update(status="error", reasons=[f"{type(exc).__name__}: {exc}"])
            row["reason"] = "; ".join(row["reasons"]) or None
            rows.append(row)
            logger.info("%s %s × %s: %s", model.arch, model.pretrained, entry.name, row["reason"] or "done")

    result = {
        "rows": rows,
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("models", "datasets", "json")},
            "models": [f"{m.arch}:{m.pretrained}" for m in args.models],
            "datasets": [{"name": d.name, "json": d.json_path, "image_root": d.image_root} for d in datasets],
        },
        "reference_source": REFERENCE_SOURCE,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "threads": args.threads,
        "device": args.device,
        "wall_s": time.perf_counter() - started,
        "command": "python -m benchmarks.seed_table " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(
        f"recall@5 (%) on the Karpathy test splits before and after fine-tuning ({args.epochs} epoch(s), lr "
        f"{args.lr:g}, batch {args.batch_size}, {args.device}); published: zero-shot, LAION-AI/CLIP_benchmark\n"
    )
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    main()
