"""``cliptuner demo``: the whole service, offline, from a pretrained base model to one tuned on a domain.

1. **The base** (:func:`pretrain_base`, also ``cliptuner pretrain-base``): ``cliptuner-tiny`` trained from random
   init on the ``generic`` synthetic distribution (scenes of everyday shapes), the stand-in for a public
   pretrained CLIP. Cached under ``$CLIPTUNER_CACHE`` (default ``~/.cache/cliptuner``), keyed by its settings, so
   only the first demo pays for it.
2. **The domain** (seeded ``domain`` scenes: other shapes, colours and textures): its images are cut into a
   training part, written as a PAIRS file under the workspace's data root, and a held-out gallery that nothing is
   trained on or chosen with.
3. **The service**: ``cliptuner serve`` (the gRPC Flow: tuner → encoder → indexer) starts on 127.0.0.1 with the
   base as its first model version; the gallery is indexed through ``/index``; recall@1/5/10 both ways is
   measured on the gallery's images and captions with embeddings that come back from ``/encode``; a few captions
   are searched through ``/search``.
4. **Tuning**: ``/train`` on the PAIRS file (``wait=False``, its progress followed through ``/status``); the
   encoder and the indexer (which re-embeds the gallery) move to the tuned version; the same measurements again.
5. **The report**: the before/after recall table, each demo query's top-3 before vs after, and plots (training
   curves, recall bars, a grid of top matches) in the work folder.

The client side reads nothing of the service's files: it talks gRPC only (the demo writes the data it sends,
as a user would copy files into the data root).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cliptuner.train.evaluate import format_report, retrieval_metrics

Say = Callable[[str], None]
DEMO_QUERIES = 3  # captions searched and shown before vs after
TOP = 3
GALLERY_DIR = "gallery"
PAIRS_FILE = "domain-train.csv"


@dataclass(frozen=True)
class BaseSettings:
    """How the base model is pretrained on the generic distribution (the settings ``benchmarks/sweep.py``'s
    WiSE-FT part used for its base: general test t2i R@5 2.0 % → 75.5 %, benchmarks/CHOICES.md)."""

    arch: str = "cliptuner-tiny"
    n_images: int = 1000
    captions_per_image: int = 2
    data_seed: int = 1001  # not the domain's seed: the base never sees a domain scene
    epochs: int = 6
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    seed: int = 0

    def key(self) -> str:
        """A short hash of the settings: the cache folder's name."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class DemoSettings:
    """The domain data and the tuning run (the settings ``benchmarks/sweep.py`` chose on validation data of its
    own, other scenes than these)."""

    n_images: int = 600
    captions_per_image: int = 2
    data_seed: int = 0
    held_out_fraction: float = 0.2  # of the images: the gallery, never trained on
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 6e-4
    warmup_steps: int = 20
    seed: int = 0
    gate: bool = True  # the tuned version serves only if it beats the base on the run's held-out split
    base: BaseSettings = field(default_factory=BaseSettings)

    @classmethod
    def quick(cls) -> DemoSettings:
        """A minute-sized run that exercises every step (for tests); its recall says little, so the gate is off:
        two epochs prove the machinery, not a gain."""
        return cls(
            n_images=60,
            epochs=2,
            batch_size=16,
            warmup_steps=2,
            gate=False,
            base=BaseSettings(n_images=80, epochs=1, batch_size=16, warmup_steps=2),
        )


def cache_root() -> Path:
    from cliptuner.settings import ServiceEnvironment

    return ServiceEnvironment.get("cache") or (Path.home() / ".cache" / "cliptuner")


# -- the base --------------------------------------------------------------------------------------------------
def pretrain_base(
    settings: BaseSettings = BaseSettings(),
    cache: Optional[Path] = None,
    force: bool = False,
    quiet: bool = False,
    say: Say = print,
) -> Path:
    """The checkpoint of the base model: cached, or trained now on generic synthetic scenes and cached.

    Returns:
        ``<cache>/base/<arch>-<key>/checkpoint.pt``, a local checkpoint for ``--pretrained``.
    """
    from cliptuner.cli.progress import TrainingProgress, print_report
    from cliptuner.config import EvalConfig, ModelSpec, TrainConfig
    from cliptuner.train import synthetic
    from cliptuner.train.job import AUTO_DEVICE, TrainJob, train_and_export

    folder = (cache or cache_root()) / "base" / f"{settings.arch}-{settings.key()}"
    checkpoint = folder / "checkpoint.pt"
    if checkpoint.is_file() and not force:
        say(f"base model: cached at {checkpoint}")
        return checkpoint
    say(
        f"base model: pretraining {settings.arch} from random init on {settings.n_images} generic scenes × "
        f"{settings.captions_per_image} captions, {settings.epochs} epochs (once; cached in {folder})"
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        data = synthetic.write_csv(
            work / "data",
            n_images=settings.n_images,
            domain="generic",
            seed=settings.data_seed,
            image_size=64,
            captions_per_image=settings.captions_per_image,
        )
        job = TrainJob(
            data=str(data),
            out=str(work / "model"),
            model=ModelSpec(arch=settings.arch),
            cfg=TrainConfig(
                epochs=settings.epochs,
                batch_size=settings.batch_size,
                learning_rate=settings.learning_rate,
                warmup_steps=settings.warmup_steps,
                seed=settings.seed,
                device=AUTO_DEVICE,
            ),
            eval_cfg=EvalConfig(split_seed=settings.seed),
            version="base",
            plots=False,
        )
        with contextlib.redirect_stdout(sys.stderr):  # its table is the base's, not the demo's result
            report = train_and_export(job, TrainingProgress(bar=not quiet))
            print_report(report, Path(job.out))
        say(
            f"base model: generic held-out t2i R@5 {100 * report['before']['t2i_r5']:.1f}% → "
            f"{100 * report['after']['t2i_r5']:.1f}%"
        )
        if force and folder.exists():
            shutil.rmtree(folder)
        (work / "model").rename(folder)  # atomic: a half-written base is never found in the cache
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return checkpoint


# -- the domain data -------------------------------------------------------------------------------------------
@dataclass
class DomainData:
    """The tuning pairs (a PAIRS file under the data root) and the held-out gallery (images and captions)."""

    pairs_file: str  # relative to the data root, as /train takes it
    train_images: int
    train_pairs: int
    gallery_ids: list[str]  # one per held-out image
    gallery_uris: list[str]  # relative to the data root
    gallery_images: list[np.ndarray]
    captions: list[str]  # held-out captions
    caption_image: list[int]  # for each caption, its image in the gallery

    def described_by(self, caption: str) -> set[str]:
        """The ids of the gallery images ``caption`` was written for."""
        return {self.gallery_ids[self.caption_image[i]] for i, c in enumerate(self.captions) if c == caption}


def write_domain(data_root: Path, settings: DemoSettings) -> DomainData:
    """Draw the domain scenes, cut them by image, write the training part as a PAIRS file and the gallery."""
    from PIL import Image

    from cliptuner.train import synthetic

    pairs = synthetic.generate(
        settings.n_images,
        "domain",
        seed=settings.data_seed,
        image_size=64,
        captions_per_image=settings.captions_per_image,
    )
    train, held = pairs.split(settings.held_out_fraction, settings.seed)
    (data_root / "train").mkdir(parents=True, exist_ok=True)
    (data_root / GALLERY_DIR).mkdir(parents=True, exist_ok=True)
    with (data_root / PAIRS_FILE).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["image", "caption"])
        names = []
        for i, image in enumerate(train.images):
            names.append(f"train/{i:05d}.png")
            Image.fromarray(np.asarray(image)).save(data_root / names[-1])
        for caption, image_i in zip(train.captions, train.image_index):
            writer.writerow([names[image_i], caption])
    ids, uris = [], []
    for i, image in enumerate(held.images):
        ids.append(f"g{i:04d}")
        uris.append(f"{GALLERY_DIR}/{ids[-1]}.png")
        Image.fromarray(np.asarray(image)).save(data_root / uris[-1])
    return DomainData(
        PAIRS_FILE,
        train.num_images,
        len(train),
        ids,
        uris,
        [np.asarray(a) for a in held.images],
        list(held.captions),
        list(held.image_index),
    )


# -- talking to the service ------------------------------------------------------------------------------------
def _docs(**fields_list):
    from docarray import DocList

    from executors.schemas import ClipDoc

    keys = list(fields_list)
    return DocList[ClipDoc]([ClipDoc(**dict(zip(keys, values))) for values in zip(*fields_list.values())])


def _post(client, on: str, docs=None, **kwargs):
    from docarray import DocList

    from executors.schemas import ClipDoc

    return client.post(on, inputs=docs, return_type=DocList[ClipDoc], **kwargs)


def service_status(client) -> dict[str, dict]:
    """``/status``: each Executor's status tags by name (``tuner``, ``encoder``, ``indexer``)."""
    return {doc.id.removeprefix("status-"): dict(doc.tags) for doc in _post(client, "/status")}


def service_recall(client, data: DomainData, batch: int = 64) -> tuple[dict[str, float], str]:
    """Recall@1/5/10 both ways on the gallery, from the embeddings ``/encode`` returns; and their version."""
    versions: set[str] = set()

    def encode(**fields) -> np.ndarray:
        out = []
        for start in range(0, len(next(iter(fields.values()))), batch):
            chunk = {k: v[start : start + batch] for k, v in fields.items()}
            answer = _post(client, "/encode", _docs(**chunk), request_size=batch)
            by_id = {doc.id: doc for doc in answer}
            for doc_id in chunk["id"]:
                versions.add(by_id[doc_id].model_version)
                out.append(np.asarray(by_id[doc_id].embedding, dtype=np.float32))
        return np.stack(out)

    images = encode(id=data.gallery_ids, uri=data.gallery_uris)
    texts = encode(id=[f"c{i}" for i in range(len(data.captions))], text=data.captions)
    if len(versions) != 1:
        raise RuntimeError(f"the embeddings came from several model versions: {sorted(versions)}")
    return retrieval_metrics(images, texts, data.caption_image, (1, 5, 10)), versions.pop()


def search(client, text: str, limit: int = TOP) -> list[tuple[str, float, str]]:
    """``/search`` one caption: ``[(doc id, score, model version)]``, best first."""
    answer = _post(client, "/search", _docs(id=["q"], text=[text]), parameters={"limit": limit})[0]
    return [
        (match.id, float(score), match.model_version or answer.model_version or "")
        for match, score in zip(answer.matches, answer.scores)
    ]


def train_following_progress(port: int, parameters: dict, say: Say, poll_s: float = 1.0, every_s: float = 10.0) -> dict:
    """``/train`` with ``wait=False`` on the service at ``port``, then ``/status`` until the run ends; says its
    progress at each new phase or epoch, and every ``every_s`` seconds between; returns the finished run's report
    (``last_report``) and its progress dict.

    Raises:
        RuntimeError: the run failed or was cancelled (with its error). A run the evaluation gate kept a candidate
            has ended well: its progress says ``promoted: False`` and why (``gate``).
    """
    from jina import Client

    client = Client(host="127.0.0.1", port=port, protocol="grpc")
    started = _post(client, "/train", parameters={**parameters, "wait": False})[0]
    run_id = started.tags.get("run_id")
    say(f"tuning: run {run_id} started (the service keeps answering meanwhile)")
    last_key, last_said = None, 0.0
    t0 = time.monotonic()
    while True:
        time.sleep(poll_s)
        tuner = service_status(client)["tuner"]
        training = tuner.get("training") or {}
        if training.get("run_id") not in (None, run_id):
            raise RuntimeError(f"/status follows run {training.get('run_id')}, not {run_id}")
        state, phase = training.get("state"), training.get("phase")
        if state in ("done", "failed", "cancelled"):
            if state != "done":
                raise RuntimeError(f"the tuning run {state}: {training.get('error')}")
            say(f"tuning: done in {time.monotonic() - t0:.0f} s: model version {training.get('model_version')}")
            if training.get("gate"):
                say(f"gate: {training['gate']}")
            return {"report": tuner.get("last_report") or {}, "progress": training}
        key = (phase, training.get("epoch"))
        if key == last_key and time.monotonic() - last_said < every_s:
            continue
        line = f"tuning: {phase or 'starting'}"
        if training.get("epoch") is not None:
            line += f", epoch {int(training['epoch'])}/{int(training.get('epochs') or 0)}"
            if training.get("step") is not None:
                line += f", step {int(training['step'])}/{int(training.get('total_steps') or 0)}"
            if training.get("loss") is not None:
                line += f", loss {float(training['loss']):.3f}"
            if training.get("eta_s") is not None:
                line += f", about {float(training['eta_s']):.0f} s left"
        say(line)
        last_key, last_said = key, time.monotonic()


def wait_until_serving(client, version: str, count: int, timeout: float = 600.0, say: Say = print) -> None:
    """Until the encoder serves ``version`` and the indexer holds ``count`` docs re-embedded in it."""
    deadline = time.monotonic() + timeout
    said = False
    while time.monotonic() < deadline:
        status = service_status(client)
        encoder, indexer = status.get("encoder", {}), status.get("indexer", {})
        if (
            encoder.get("model_version") == version
            and indexer.get("model_version") == version
            and int(indexer.get("count") or 0) == count
            and not indexer.get("rebuilding")
        ):
            return
        if not said:
            say(f"index: re-embedding the gallery with {version}")
            said = True
        time.sleep(1.0)
    raise RuntimeError(f"the encoder and the indexer did not move to {version} within {timeout:.0f} s")


# -- the demo --------------------------------------------------------------------------------------------------
def run_demo(
    settings: DemoSettings,
    workdir: Path,
    cache: Optional[Path] = None,
    say: Say = print,
    quiet: bool = False,
    torch_threads: Optional[int] = None,
) -> dict[str, Any]:
    """The whole demo (module docstring); returns what it printed as data (recall, top matches, plots, timings).

    Raises:
        RuntimeError: the service did not start, a run failed, or the service did not move to the tuned version.
    """
    from jina import Client

    from cliptuner.serve.launch import ServeProcess

    t0 = time.monotonic()
    workdir = Path(workdir)
    base = pretrain_base(settings.base, cache=cache, quiet=quiet, say=say)
    workspace = workdir / "workspace"
    data = write_domain(workspace / "data", settings)
    say(
        f"domain data: {data.train_images} images × {settings.captions_per_image} captions to tune on "
        f"({data.pairs_file} under the data root); a held-out gallery of {len(data.gallery_ids)} images and "
        f"{len(data.captions)} captions, never trained on"
    )
    env = {
        "CLIPTUNER_MODEL": settings.base.arch,
        "CLIPTUNER_PRETRAINED": str(base),
        "CLIPTUNER_DEVICE": "cpu",
        "CLIPTUNER_TORCH_THREADS": str(torch_threads or max(1, len(os.sched_getaffinity(0)))),
    }
    queries = [data.captions[data.caption_image.index(i)] for i in range(min(DEMO_QUERIES, len(data.gallery_ids)))]
    say("service: starting cliptuner serve (gRPC Flow: tuner → encoder → indexer) on 127.0.0.1")
    with ServeProcess(workspace, workdir / "service.log", env=env) as service:
        client = Client(host="127.0.0.1", port=service.port, protocol="grpc")
        say(f"service: serving on 127.0.0.1:{service.port} (log: {service.log_path})")
        _post(client, "/index", _docs(id=data.gallery_ids, uri=data.gallery_uris), request_size=64)
        say(f"index: {len(data.gallery_ids)} gallery images indexed through /index")
        before, base_version = service_recall(client, data)
        top_before = [search(client, q) for q in queries]
        say(
            f"before tuning ({base_version}): gallery t2i R@5 {100 * before['t2i_r5']:.1f}%, "
            f"i2t R@5 {100 * before['i2t_r5']:.1f}%"
        )
        tuned = train_following_progress(
            service.port,
            {
                "data": data.pairs_file,
                "epochs": settings.epochs,
                "batch_size": settings.batch_size,
                "learning_rate": settings.learning_rate,
                "warmup_steps": settings.warmup_steps,
                "seed": settings.seed,
                "gate": settings.gate,
            },
            say,
        )
        version = tuned["progress"]["model_version"]
        if tuned["progress"].get("promoted") is False:  # the gate kept it a candidate: what served still serves
            say(
                f"{version} stays a candidate and {base_version} keeps serving (a work directory that an earlier demo "
                "already tuned has little left to gain: start afresh with another --workdir)"
            )
        else:
            wait_until_serving(client, version, len(data.gallery_ids), say=say)
        after, after_version = service_recall(client, data)
        top_after = [search(client, q) for q in queries]
    result = {
        "before": before,
        "after": after,
        "base_version": base_version,
        "tuned_version": after_version,
        "queries": queries,
        "top_before": top_before,
        "top_after": top_after,
        "report": tuned["report"],
        "gallery_images": len(data.gallery_ids),
        "gallery_captions": len(data.captions),
        "train_images": data.train_images,
        "train_pairs": data.train_pairs,
        "workdir": str(workdir),
        "settings": dataclasses.asdict(settings),
        "wall_s": time.monotonic() - t0,
    }
    result["plots"] = [str(p) for p in draw(result, data, workdir / "plots", say)]
    print_summary(result, data)
    (workdir / "demo.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def draw(result: dict, data: DomainData, folder: Path, say: Say) -> list[Path]:
    """The demo's plots; a plot that fails is said, not raised."""
    from cliptuner.train.plots import Match, QueryMatches, match_grid, recall_bars, training_curves

    written: list[Path] = []
    index = {gid: i for i, gid in enumerate(data.gallery_ids)}
    try:
        if result["report"].get("epoch_losses"):
            written.append(
                training_curves(
                    result["report"], folder / "training.png", title="Tuning the base on the domain (/train)"
                )
            )
        written.append(
            recall_bars(
                result["before"],
                result["after"],
                folder / "recall.png",
                title=f"Held-out gallery recall through the service ({result['gallery_images']} images)",
                labels=("pretrained base", "tuned"),
            )
        )
        rows = []
        for q, before, after in zip(result["queries"], result["top_before"], result["top_after"]):
            truth = data.described_by(q)
            rows.append(
                QueryMatches(
                    q,
                    *[
                        [
                            Match(data.gallery_images[index[gid]], score, gid in truth)
                            for gid, score, _ in hits
                            if gid in index
                        ]
                        for hits in (before, after)
                    ],
                )
            )
        written.append(
            match_grid(
                rows,
                folder / "matches.png",
                labels=("pretrained base", "tuned"),
                title="Top matches through /search (green frame: the image the caption describes)",
            )
        )
    except Exception as exc:  # noqa: BLE001 - the plots must not hide the demo's result
        say(f"plots: could not draw them all: {exc}")
    for path in written:
        say(f"plot: {path}")
    return written


def print_summary(result: dict, data: DomainData, out=None) -> None:
    """The before/after table and each demo query's top matches, on stdout."""
    out = out or sys.stdout
    print(
        f"\nHeld-out gallery: {result['gallery_images']} images, {result['gallery_captions']} captions, never "
        f"trained on; embeddings from /encode ({result['base_version']} → {result['tuned_version']})",
        file=out,
    )
    print(format_report(result["before"], result["after"]), file=out)
    for q, before, after in zip(result["queries"], result["top_before"], result["top_after"]):
        truth = data.described_by(q)
        print(f"\nquery: {q!r}", file=out)
        for label, hits in (("pretrained base", before), ("tuned", after)):
            shown = ", ".join(f"{gid}{'*' if gid in truth else ''} {score:.3f}" for gid, score, _ in hits)
            print(f"  {label:16s} {shown}", file=out)
    print("\n(* the image the caption describes)", file=out)
    print(f"{result['wall_s']:.0f} s in all; plots and demo.json in {result['workdir']}", file=out)
