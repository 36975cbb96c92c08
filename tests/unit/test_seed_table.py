"""benchmarks/seed_table.py end to end on Karpathy-format fixtures with the tiny model, and its offline rules.

The fixtures mimic the real files: Flickr entries (``filename`` under the image folder, ``split`` train/val/test,
five ``sentences`` each) and COCO entries (``filepath`` ``train2014``/``val2014``, ``restval`` images, a test
image with six captions, as a few real ones have). Every network connection is refused and recorded, so a row
that tried to download would show up.
"""

import importlib.util
import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cliptuner.config import ModelSpec
from cliptuner.train import synthetic
from cliptuner.train.data import load_karpathy
from cliptuner.train.evaluate import evaluate
from cliptuner.train.models import cached_pretrained_file, load_model, read_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TEST_IMAGES, VAL_IMAGES, TRAIN_IMAGES = 12, 6, 20
FAKE_REPO = "example-org/cliptuner-tiny-seedtest"  # a hub repo that exists only in the fake cache below
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _load_script():
    spec = importlib.util.spec_from_file_location("seed_table_under_test", ROOT / "benchmarks" / "seed_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


seed_table = _load_script()


def _write_jpegs(pairs, folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for pixels, name in zip(pairs.images, names):
        Image.fromarray(np.asarray(pixels), mode="RGB").save(folder / name, format="JPEG", quality=95)


def _sentences(captions: list[str], imgid: int, first_sentid: int) -> list[dict]:
    return [{"tokens": c.split(), "raw": c, "imgid": imgid, "sentid": first_sentid + k} for k, c in enumerate(captions)]


def write_flickr(root: Path, seed: int) -> tuple[Path, Path]:
    """``dataset_flickr8k.json`` + ``Flicker8k_Dataset/`` with train/val/test images, five captions each."""
    n = TRAIN_IMAGES + VAL_IMAGES + TEST_IMAGES
    pairs = synthetic.generate(n, domain="domain", seed=seed, captions_per_image=5)
    names = [f"{1000268201 + i}_{i:04x}.jpg" for i in range(n)]
    images = root / "Flicker8k_Dataset"
    _write_jpegs(pairs, images, names)
    entries = []
    for i, name in enumerate(names):
        split = "train" if i < TRAIN_IMAGES else "val" if i < TRAIN_IMAGES + VAL_IMAGES else "test"
        captions = [pairs.captions[p] for p in pairs.captions_of(i)]
        entries.append(
            {
                "sentids": list(range(5 * i, 5 * i + 5)),
                "imgid": i,
                "split": split,
                "filename": name,
                "sentences": _sentences(captions, i, 5 * i),
            }
        )
    path = root / "dataset_flickr8k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr8k"}))
    return path, images


def write_coco(root: Path, seed: int) -> Path:
    """``dataset_coco.json`` + ``train2014/`` and ``val2014/``: train, restval (from val2014), val and test; the
    first test image has six captions."""
    n = TRAIN_IMAGES + VAL_IMAGES + TEST_IMAGES
    pairs = synthetic.generate(n, domain="domain", seed=seed, captions_per_image=6)
    entries, sentid = [], 0
    n_train = TRAIN_IMAGES * 3 // 5  # the rest of the training images are restval
    for i in range(n):
        if i < n_train:
            split, folder = "train", "train2014"
        elif i < TRAIN_IMAGES:
            split, folder = "restval", "val2014"
        elif i < TRAIN_IMAGES + VAL_IMAGES:
            split, folder = "val", "val2014"
        else:
            split, folder = "test", "val2014"
        name = f"COCO_{folder}_{391895 + i:012d}.jpg"
        _write_jpegs(pairs.subset_images([i]), root / folder, [name])
        keep = 6 if i == TRAIN_IMAGES + VAL_IMAGES else 5
        captions = [pairs.captions[p] for p in pairs.captions_of(i)][:keep]
        entries.append(
            {
                "filepath": folder,
                "filename": name,
                "imgid": i,
                "cocoid": 391895 + i,
                "split": split,
                "sentids": list(range(sentid, sentid + keep)),
                "sentences": _sentences(captions, i, sentid),
            }
        )
        sentid += keep
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path


@pytest.fixture
def no_network(monkeypatch):
    """Refuse (and record) every connection and name lookup."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access refused in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.fixture
def empty_hf_home(tmp_path, monkeypatch):
    """HF_HOME on an empty folder and HF_HUB_OFFLINE=1, also in the already imported huggingface_hub."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


@pytest.fixture
def fake_tag(tmp_path, tiny_model_dir, monkeypatch):
    """A pretrained tag ``seedtest`` of ``cliptuner-tiny`` whose hub file (the tiny model's weights) lies in a
    Hugging Face cache folder, laid out as ``huggingface_hub`` writes it."""
    import open_clip

    cache = tmp_path / "hf-cache"
    repo = cache / ("models--" + FAKE_REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    snapshot = repo / "snapshots" / FAKE_COMMIT
    snapshot.mkdir(parents=True)
    weights = snapshot / "open_clip_pytorch_model.bin"
    torch.save(read_checkpoint(tiny_model_dir / "checkpoint.pt")["state_dict"], weights)
    monkeypatch.setitem(
        open_clip.pretrained._PRETRAINED,
        "cliptuner-tiny",
        {"seedtest": {"hf_hub": FAKE_REPO + "/", "quick_gelu": False}},
    )
    return cache, weights


def test_cached_pretrained_file_finds_the_cached_hub_file_and_nothing_else(fake_tag, tmp_path, no_network):
    cache, weights = fake_tag
    assert cached_pretrained_file("cliptuner-tiny", "seedtest", cache_dir=str(cache)) == str(weights)
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    assert cached_pretrained_file("cliptuner-tiny", "seedtest", cache_dir=str(empty)) is None
    assert cached_pretrained_file("ViT-B-32", "openai", cache_dir=str(empty)) is None
    with pytest.raises(ValueError, match="unknown pretrained tag 'nope' for 'ViT-B-32'; known: .*'openai'"):
        cached_pretrained_file("ViT-B-32", "nope", cache_dir=str(empty))
    assert no_network == []


def test_entries_parse_paths_and_image_roots():
    assert seed_table.ModelEntry.parse("ViT-B-32:openai") == seed_table.ModelEntry("ViT-B-32", "openai")
    assert seed_table.ModelEntry.parse("cliptuner-tiny:") == seed_table.ModelEntry("cliptuner-tiny", "")
    assert seed_table.ModelEntry.parse("x:/ckpt/a:b.pt").pretrained == "/ckpt/a:b.pt"
    assert seed_table.DatasetEntry.parse(
        "f8k=/d/dataset_flickr8k.json:/d/Flicker8k_Dataset"
    ) == seed_table.DatasetEntry("f8k", "/d/dataset_flickr8k.json", "/d/Flicker8k_Dataset")
    assert seed_table.DatasetEntry.parse("coco=/d/dataset_coco.json") == seed_table.DatasetEntry(
        "coco", "/d/dataset_coco.json", None
    )
    for bad in ("ViT-B-32", ":openai"):
        with pytest.raises(Exception, match="ARCH:PRETRAINED"):
            seed_table.ModelEntry.parse(bad)
    with pytest.raises(Exception, match="NAME=KARPATHY_JSON"):
        seed_table.DatasetEntry.parse("/d/dataset_coco.json")


def test_seed_table_before_and_after_on_the_test_splits(tmp_path, tiny_model_dir, no_network, capsys):
    flickr_json, flickr_images = write_flickr(tmp_path / "flickr", seed=11)
    coco_json = write_coco(tmp_path / "coco", seed=12)
    checkpoint = tiny_model_dir / "checkpoint.pt"
    missing = tmp_path / "absent" / "dataset_flickr30k.json"
    empty_cache = tmp_path / "empty-hf-cache"
    empty_cache.mkdir()
    out = tmp_path / "seed.json"
    result = seed_table.main(
        [
            "--models",
            f"cliptuner-tiny:{checkpoint}",
            "ViT-B-32:openai",
            "ViT-B-32:nope",
            "--datasets",
            f"flickr8k={flickr_json}:{flickr_images}",
            f"coco={coco_json}",
            f"flickr30k={missing}",
            "--cache-dir",
            str(empty_cache),
            "--epochs",
            "2",
            "--batch-size",
            "10",
            "--lr",
            "1e-3",
            "--warmup-steps",
            "2",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--log-every",
            "1000",
            "--json",
            str(out),
        ]
    )

    assert no_network == []
    rows = {(r["model"], r["pretrained"], r["dataset"]): r for r in result["rows"]}
    assert len(rows) == 3 * 3
    ran = {key: row for key, row in rows.items() if row["status"] == "ok"}
    assert sorted(ran) == [("cliptuner-tiny", str(checkpoint), "coco"), ("cliptuner-tiny", str(checkpoint), "flickr8k")]
    for row in ran.values():
        assert (row["test_images"], row["test_texts"]) == (TEST_IMAGES, 5 * TEST_IMAGES)  # COCO's 6th caption cut
        assert (row["train_images"], row["train_pairs"]) == (TRAIN_IMAGES, 5 * TRAIN_IMAGES)  # + restval for COCO
        assert row["val_images"] == VAL_IMAGES
        assert row["trained_images"] == TRAIN_IMAGES
        for part in ("before", "after"):
            assert set(row[part]) >= set(seed_table.METRICS)
            assert all(0.0 <= row[part][k] <= 1.0 for k in seed_table.METRICS)
        assert row["after"] != row["before"]  # training changed the model (seeded: the same every run)
        assert row["epochs"] == 2 and row["epoch_losses"][-1] < row["epoch_losses"][0]
        assert row["reference"] is None and row["reason"] is None

    # "before" is the checkpoint's recall on the Karpathy test split, measured here independently
    bundle = load_model(ModelSpec("cliptuner-tiny", pretrained=str(checkpoint)))
    expected = evaluate(bundle, load_karpathy(flickr_json, split="test", image_root=flickr_images))
    assert rows[("cliptuner-tiny", str(checkpoint), "flickr8k")]["before"] == pytest.approx(expected)

    for key, row in rows.items():
        if row["status"] == "ok":
            continue
        assert row["status"] == "skipped" and row["before"] is None and row["after"] is None
        if key[1] == "openai":
            assert "are not in the Hugging Face cache" in row["reason"]
        if key[1] == "nope":
            assert "unknown pretrained tag 'nope'" in row["reason"]
        if key[2] == "flickr30k":
            assert f"data set flickr30k not found at {str(missing)!r}" in row["reason"]
    assert (
        rows[("ViT-B-32", "openai", "flickr8k")]["reference"]["t2i_r5"]
        == seed_table.REFERENCE_R5[("ViT-B-32", "openai", "flickr8k")]["t2i_r5"]
    )

    table = capsys.readouterr().out
    assert "| ViT-B-32 | openai | flickr8k | 12 | 80.5 | — | — | 91.4 | — | — | skipped (" in table
    assert "not published" in table and "not in the Hugging Face cache" in table
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    for key in ("machine", "python", "torch", "open_clip", "threads", "wall_s", "command", "settings"):
        assert key in result


def test_a_cached_pretrained_tag_is_loaded_offline(tmp_path, tiny_model_dir, fake_tag, no_network):
    cache, _ = fake_tag
    flickr_json, flickr_images = write_flickr(tmp_path / "flickr", seed=13)
    result = seed_table.main(
        [
            "--models",
            "cliptuner-tiny:seedtest",
            "--datasets",
            f"flickr8k={flickr_json}:{flickr_images}",
            "--cache-dir",
            str(cache),
            "--epochs",
            "1",
            "--batch-size",
            "10",
            "--lr",
            "1e-3",
            "--warmup-steps",
            "2",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--log-every",
            "1000",
        ]
    )

    assert no_network == []
    [row] = result["rows"]
    assert row["status"] == "ok", row["reason"]
    # the weights came from the cached hub file (the tiny model's), not from a random init
    bundle = load_model(ModelSpec("cliptuner-tiny", pretrained=str(tiny_model_dir / "checkpoint.pt")))
    expected = evaluate(bundle, load_karpathy(flickr_json, split="test", image_root=flickr_images))
    assert row["before"] == pytest.approx(expected)
    assert all(0.0 <= row["after"][k] <= 1.0 for k in seed_table.METRICS)


def test_default_models_without_cached_weights_or_data_are_listed_with_reasons(tmp_path, empty_hf_home, no_network):
    result = seed_table.main(["--data-root", str(tmp_path / "no-data"), "--device", "cpu", "--threads", "1"])

    assert no_network == []
    assert [(r["model"], r["pretrained"], r["dataset"]) for r in result["rows"]] == [
        (*m.split(":"), d) for m in seed_table.DEFAULT_MODELS for d in ("flickr8k", "flickr30k", "coco")
    ]
    for row in result["rows"]:
        assert row["status"] == "skipped"
        assert len(row["reasons"]) == 2
        assert "not in the Hugging Face cache" in row["reasons"][0]
        assert row["reasons"][1] == (
            f"data set {row['dataset']} not found at "
            f"{str(tmp_path / 'no-data' / seed_table.DATA_LAYOUT[row['dataset']][0])!r}"
        )
        assert row["reference"] is not None  # the nine published numbers
