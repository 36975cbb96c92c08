"""Pair sources (CSV, Karpathy JSON, memory), the held-out split, the unique-image sampler and the loader."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cliptuner.model.images import ImageError
from cliptuner.train.data import (
    DataError,
    PairDataset,
    PairSet,
    UniqueImageBatchSampler,
    collate_pairs,
    from_memory,
    load_csv,
    load_karpathy,
    load_pairs,
    make_loader,
)


def _png(path: Path, colour=(200, 30, 30), size=(20, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- CSV


@pytest.fixture
def csv_dir(tmp_path: Path) -> Path:
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png", (0, 200, 0))
    _png(tmp_path / "c.png", (0, 0, 200))
    return tmp_path


def test_load_csv_groups_captions_of_one_image(csv_dir: Path):
    path = _write(
        csv_dir / "pairs.csv",
        "image,caption,extra\n"
        "img/a.png,a red card,x\n"
        "img/b.png,a green card,y\n"
        "\n"
        "./img/a.png,  red again  ,z\n"
        "c.png,a blue card,w\n"
        'img/a.png,"red, with a comma",v\n',
    )
    pairs = load_csv(path)
    assert len(pairs) == 5
    assert pairs.num_images == 3
    assert pairs.image_ids == ["img/a.png", "img/b.png", "c.png"]
    assert pairs.captions == ["a red card", "a green card", "red again", "a blue card", "red, with a comma"]
    assert pairs.image_index == [0, 1, 0, 2, 0]
    assert pairs.captions_of(0) == [0, 2, 4]
    assert pairs.captions_per_image() == [3, 1, 1]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in pairs.images)
    assert pairs.images[0] == str((csv_dir / "img" / "a.png").resolve())


def test_load_csv_accepts_absolute_paths_and_case_of_header(csv_dir: Path, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    path = _write(other / "pairs.csv", f"Caption,IMAGE\nred,{csv_dir / 'img' / 'a.png'}\nblue,{csv_dir / 'c.png'}\n")
    pairs = load_csv(path)
    assert pairs.captions == ["red", "blue"]
    assert pairs.num_images == 2
    assert Path(pairs.images[1]).samefile(csv_dir / "c.png")


def test_load_csv_bad_rows_are_named_by_line(csv_dir: Path):
    path = _write(
        csv_dir / "bad.csv",
        "image,caption\n"
        'img/a.png,"a caption over\ntwo lines"\n'  # lines 2-3, fine
        "img/b.png,   \n"  # line 4: empty caption
        "img/missing.png,a ghost\n"  # line 5: no such file
        ",no image\n"  # line 6
        "c.png,fine\n",
    )
    with pytest.raises(DataError) as info:
        load_csv(path)
    message = str(info.value)
    assert "bad.csv" in message
    assert "3 bad row(s)" in message
    assert "line 4: empty caption" in message
    assert "line 5" in message and "missing.png" in message and "not found" in message
    assert "line 6: empty image" in message
    assert "line 2" not in message and "line 7" not in message


def test_load_csv_missing_columns_named(csv_dir: Path):
    path = _write(csv_dir / "cols.csv", "img,text\nimg/a.png,red\n")
    with pytest.raises(
        DataError, match=r"cols\.csv.*missing column\(s\) \['image', 'caption'\].*found \['img', 'text'\]"
    ):
        load_csv(path)


@pytest.mark.parametrize("text, match", [("", "empty file"), ("image,caption\n\n", "no pairs")])
def test_load_csv_without_rows(csv_dir: Path, text: str, match: str):
    with pytest.raises(DataError, match=match):
        load_csv(_write(csv_dir / "empty.csv", text))


def test_load_csv_missing_file(tmp_path: Path):
    with pytest.raises(DataError, match="nope.csv.*no such pairs file"):
        load_csv(tmp_path / "nope.csv")


def test_load_csv_does_not_decode_images_until_asked(tmp_path: Path):
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    pairs = load_csv(_write(tmp_path / "pairs.csv", "image,caption\nbroken.png,a broken picture\n"))
    assert pairs.image_ids == ["broken.png"]
    dataset = PairDataset(pairs, transform=lambda im: im, tokenizer=lambda texts: texts)
    with pytest.raises(ImageError, match="broken.png.*cannot decode"):
        dataset[0]


# ---------------------------------------------------------------- Karpathy JSON


def _karpathy(root: Path, images: list) -> Path:
    return _write(root / "dataset.json", json.dumps({"images": images, "dataset": "test"}))


@pytest.fixture
def karpathy_file(tmp_path: Path) -> Path:
    for name in ("train2014/t1.jpg", "train2014/t2.jpg", "val2014/v1.jpg", "val2014/v2.jpg", "val2014/v3.jpg"):
        _png(tmp_path / name)
    return _karpathy(
        tmp_path,
        [
            {
                "filepath": "train2014",
                "filename": "t1.jpg",
                "split": "train",
                "sentences": [{"raw": "one "}, {"raw": "two"}],
            },
            {"filepath": "train2014", "filename": "t2.jpg", "split": "train", "sentences": [{"raw": "three"}]},
            {
                "filepath": "val2014",
                "filename": "v1.jpg",
                "split": "restval",
                "sentences": [{"raw": "four"}, {"raw": "five"}, {"raw": "six"}],
            },
            {"filepath": "val2014", "filename": "v2.jpg", "split": "val", "sentences": [{"raw": "seven"}]},
            {
                "filepath": "val2014",
                "filename": "v3.jpg",
                "split": "test",
                "sentences": [{"raw": "eight"}, {"raw": "nine"}],
            },
        ],
    )


def test_load_karpathy_train_includes_restval(karpathy_file: Path):
    train = load_karpathy(karpathy_file, split="train")
    assert train.image_ids == ["train2014/t1.jpg", "train2014/t2.jpg", "val2014/v1.jpg"]
    assert train.captions == ["one", "two", "three", "four", "five", "six"]
    assert train.image_index == [0, 0, 1, 2, 2, 2]
    assert Path(train.images[2]).samefile(karpathy_file.parent / "val2014" / "v1.jpg")


def test_load_karpathy_split_selection(karpathy_file: Path):
    everything = load_karpathy(karpathy_file)
    assert (everything.num_images, len(everything)) == (5, 9)
    test = load_karpathy(karpathy_file, split="test")
    assert test.captions == ["eight", "nine"] and test.image_index == [0, 0]
    val = load_pairs(karpathy_file, split="val")
    assert val.captions == ["seven"]
    with pytest.raises(
        DataError, match=r"no images in split 'dev'; splits present: \['restval', 'test', 'train', 'val'\]"
    ):
        load_karpathy(karpathy_file, split="dev")


def test_load_karpathy_image_root(tmp_path: Path):
    _png(tmp_path / "photos" / "x.jpg")
    meta = tmp_path / "meta"
    meta.mkdir()
    path = _karpathy(meta, [{"filename": "x.jpg", "split": "test", "sentences": [{"raw": "an x"}]}])
    with pytest.raises(DataError, match=r"image 0 \('x.jpg'\): image file not found"):
        load_karpathy(path)
    pairs = load_karpathy(path, image_root=tmp_path / "photos")
    assert pairs.image_ids == ["x.jpg"] and pairs.captions == ["an x"]


def test_load_karpathy_bad_entries_named_by_index_and_filename(tmp_path: Path):
    _png(tmp_path / "ok.jpg")
    _png(tmp_path / "quiet.jpg")
    _png(tmp_path / "blank.jpg")
    path = _karpathy(
        tmp_path,
        [
            {"filename": "ok.jpg", "split": "train", "sentences": [{"raw": "fine"}]},
            {"split": "train", "sentences": [{"raw": "who am I"}]},
            {"filename": "quiet.jpg", "split": "train", "sentences": []},
            {"filename": "blank.jpg", "split": "train", "sentences": [{"raw": "good"}, {"raw": "  "}]},
            {"filename": "gone.jpg", "split": "train", "sentences": [{"raw": "lost"}]},
        ],
    )
    with pytest.raises(DataError) as info:
        load_karpathy(path)
    message = str(info.value)
    assert "dataset.json" in message and "4 bad row(s)" in message
    assert "image 1: no filename" in message
    assert "image 2 ('quiet.jpg'): no sentences" in message
    assert "image 3 ('blank.jpg'): sentence(s) [1] have no 'raw' caption" in message
    assert "image 4 ('gone.jpg'): image file not found" in message
    assert "image 0" not in message


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"images": 3}'])
def test_load_karpathy_wrong_layout(tmp_path: Path, text: str):
    with pytest.raises(DataError, match="dataset.json"):
        load_karpathy(_write(tmp_path / "dataset.json", text))


def test_load_pairs_dispatches_by_suffix(csv_dir: Path, karpathy_file: Path):
    path = _write(csv_dir / "pairs.csv", "image,caption\nc.png,blue\n")
    assert load_pairs(path).captions == ["blue"]
    assert len(load_pairs(karpathy_file)) == 9
    with pytest.raises(DataError, match="a CSV has no split"):
        load_pairs(path, split="train")
    with pytest.raises(DataError, match=r"pairs.tsv.*unknown pairs format '.tsv'"):
        load_pairs(csv_dir / "pairs.tsv")


# ---------------------------------------------------------------- in memory, PairSet


def _array(value: int) -> np.ndarray:
    return np.full((8, 8, 3), value, dtype=np.uint8)


def test_from_memory_groups_by_image_id():
    images = [_array(1), _array(2), _array(1), _array(3)]
    pairs = from_memory(images, ["x", " y ", "z", "w"], image_ids=["a", "b", "a", "c"])
    assert pairs.num_images == 3 and len(pairs) == 4
    assert pairs.image_ids == ["a", "b", "c"]
    assert pairs.image_index == [0, 1, 0, 2]
    assert pairs.captions == ["x", "y", "z", "w"]
    assert pairs.images[2] is images[3]
    alone = from_memory(images, ["x", "y", "z", "w"])
    assert alone.num_images == 4 and alone.image_index == [0, 1, 2, 3]


def test_from_memory_validates():
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        from_memory([_array(1), _array(2)], ["x"])
    with pytest.raises(ValueError, match="1 image_ids but 2 captions"):
        from_memory([_array(1), _array(2)], ["x", "y"], image_ids=["a"])
    with pytest.raises(ValueError, match="pair 1: empty caption"):
        from_memory([_array(1), _array(2)], ["x", "  "])


def test_pairset_validates_indices_and_captionless_images():
    with pytest.raises(ValueError, match="pair 1: image_index 2 is outside"):
        PairSet(images=["a", "b"], captions=["x", "y"], image_index=[0, 2], image_ids=["a", "b"])
    with pytest.raises(ValueError, match="without a caption.*'b'"):
        PairSet(images=["a", "b"], captions=["x", "y"], image_index=[0, 0], image_ids=["a", "b"])


def _grouped(counts: list[int]) -> PairSet:
    """Images 0..n-1 with ``counts[i]`` captions each, pairs interleaved (not sorted by image)."""
    rng = np.random.default_rng(0)
    index = [i for i, c in enumerate(counts) for _ in range(c)]
    index = [index[k] for k in rng.permutation(len(index))]
    return PairSet(
        images=[f"img{i}" for i in range(len(counts))],
        captions=[f"caption {k} of img{i}" for k, i in enumerate(index)],
        image_index=index,
        image_ids=[f"img{i}" for i in range(len(counts))],
    )


def test_subset_images_reindexes_and_keeps_all_captions():
    pairs = _grouped([1, 3, 2, 1])
    sub = pairs.subset_images([2, 1])
    assert sub.image_ids == ["img2", "img1"]
    assert len(sub) == 5
    for caption, image in zip(sub.captions, sub.image_index):
        assert caption.endswith(sub.image_ids[image])
    with pytest.raises(ValueError, match="repeated"):
        pairs.subset_images([1, 1])


@pytest.mark.parametrize("num_images, fraction, held", [(10, 0.2, 2), (7, 0.3, 2), (3, 0.05, 1), (50, 0.5, 25)])
def test_split_by_image_is_sized_disjoint_and_deterministic(num_images: int, fraction: float, held: int):
    pairs = _grouped([1 + i % 4 for i in range(num_images)])
    train, test = pairs.split(fraction, seed=3)
    assert test.num_images == held and train.num_images == num_images - held
    assert not set(train.image_ids) & set(test.image_ids)
    assert len(train) + len(test) == len(pairs)
    for part in (train, test):  # every caption stays with its image
        for caption, image in zip(part.captions, part.image_index):
            assert caption.endswith(part.image_ids[image])
    again_train, again_test = pairs.split(fraction, seed=3)
    assert again_test.image_ids == test.image_ids and again_train.captions == train.captions


def test_split_depends_on_seed_and_refuses_impossible():
    pairs = _grouped([2] * 40)
    held = {tuple(pairs.split(0.25, seed=s)[1].image_ids) for s in range(5)}
    assert len(held) > 1
    with pytest.raises(ValueError, match="cannot hold out 1 of 1 image"):
        _grouped([3]).split(0.5, seed=0)
    with pytest.raises(ValueError, match="eval_fraction must be in"):
        pairs.split(1.0, seed=0)


# ---------------------------------------------------------------- sampler


def _check_epoch(batches: list[list[int]], image_index: list[int]) -> None:
    seen = [p for batch in batches for p in batch]
    assert len(seen) == len(set(seen)), "a pair was used twice in one epoch"
    for batch in batches:
        images = [image_index[p] for p in batch]
        assert len(images) == len(set(images)), f"two captions of one image in batch {batch}"


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("batch_size", [2, 5, 8])
def test_sampler_never_repeats_an_image_in_a_batch(seed: int, batch_size: int):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 6, size=int(rng.integers(45, 70)))  # 1-5 captions per image
    image_index = _grouped(counts.tolist()).image_index
    sampler = UniqueImageBatchSampler(image_index, batch_size, seed=seed)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        _check_epoch(batches, image_index)
        assert len(batches) == len(sampler)
        assert all(len(b) == batch_size for b in batches)
        # with at least 5 batches no image's caption count binds: all but the remainder are used
        assert len(batches) == len(image_index) // batch_size


def test_sampler_orders_differ_by_epoch_and_repeat_by_seed():
    image_index = _grouped([1, 2, 3, 4, 5] * 8).image_index
    a = UniqueImageBatchSampler(image_index, 4, seed=11)
    b = UniqueImageBatchSampler(image_index, 4, seed=11)
    first = list(a)
    assert first == list(b)
    a.set_epoch(1)
    assert list(a) != first
    assert list(UniqueImageBatchSampler(image_index, 4, seed=12)) != first


def test_sampler_spreads_an_image_with_many_captions():
    counts = [30] + [1] * 20  # one image holds most captions
    image_index = _grouped(counts).image_index
    sampler = UniqueImageBatchSampler(image_index, 4, seed=0)
    # B full batches need sum(min(c, B)) >= 4B: 20 + B >= 4B  ->  B = 6
    assert len(sampler) == 6
    batches = list(sampler)
    _check_epoch(batches, image_index)
    big = [sum(image_index[p] == 0 for p in batch) for batch in batches]
    assert max(big) == 1
    assert sum(big) >= 4  # 26 eligible pairs for 24 places: at most 2 of its 6 eligible captions left out


def test_sampler_does_not_repeat_the_same_image_sets():
    """Images with 5 captions each (COCO): batches must not come in groups with identical images."""
    image_index = _grouped([5] * 40).image_index
    sampler = UniqueImageBatchSampler(image_index, 8, seed=0)
    batches = list(sampler)
    assert len(batches) == 25
    image_sets = {frozenset(image_index[p] for p in batch) for batch in batches}
    assert len(image_sets) == len(batches)


@pytest.mark.parametrize("seed", [0, 3])
def test_sampler_keep_last_covers_every_pair_once(seed: int):
    counts = [12, 9] + [1, 2, 3] * 5
    image_index = _grouped(counts).image_index
    sampler = UniqueImageBatchSampler(image_index, 6, seed=seed, drop_last=False)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        _check_epoch(batches, image_index)
        assert sorted(p for b in batches for p in b) == list(range(len(image_index)))
        assert len(batches) == len(sampler)
        assert all(0 < len(b) <= 6 for b in batches)


def test_sampler_ranks_get_disjoint_slices_of_unique_global_batches():
    image_index = _grouped([1, 2, 3, 4, 5] * 10).image_index
    ranks = [UniqueImageBatchSampler(image_index, 4, seed=5, num_replicas=3, rank=r) for r in range(3)]
    for sampler in ranks:
        sampler.set_epoch(2)
    per_rank = [list(s) for s in ranks]
    assert len({len(batches) for batches in per_rank}) == 1
    assert len(per_rank[0]) == len(ranks[0]) > 0
    for step in zip(*per_rank):
        assert all(len(b) == 4 for b in step)
        merged = [p for b in step for p in b]
        assert len({image_index[p] for p in merged}) == 12  # the global batch has unique images
    everything = [p for batches in per_rank for b in batches for p in b]
    assert len(everything) == len(set(everything))


def test_sampler_refuses_impossible_batches():
    with pytest.raises(ValueError, match="larger than the 3 distinct images"):
        UniqueImageBatchSampler([0, 0, 1, 1, 2], batch_size=4)
    with pytest.raises(ValueError, match=r"2 x 2 replica\(s\) = 4 is larger than the 3"):
        UniqueImageBatchSampler([0, 1, 2], batch_size=2, num_replicas=2, rank=1)
    with pytest.raises(ValueError, match="drop_last=False"):
        UniqueImageBatchSampler(list(range(10)), 2, drop_last=False, num_replicas=2)
    with pytest.raises(ValueError, match="rank"):
        UniqueImageBatchSampler(list(range(10)), 2, num_replicas=2, rank=2)


# ---------------------------------------------------------------- dataset and loader


@pytest.fixture
def memory_pairs() -> PairSet:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8) for _ in range(10)]
    ids = [f"im{i // 2}" for i in range(10)]  # five images, two captions each
    return from_memory(images, [f"caption number {i}" for i in range(10)], image_ids=ids)


def test_pair_dataset_item_shapes(tiny_bundle, memory_pairs: PairSet):
    dataset = PairDataset(memory_pairs, tiny_bundle.preprocess_val, tiny_bundle.tokenizer)
    assert len(dataset) == 10
    pixels, tokens, image_i = dataset[3]
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    assert tokens.shape == (32,) and tokens.dtype == torch.long
    assert image_i == 1
    assert torch.equal(tokens, tiny_bundle.tokenizer(["caption number 3"])[0])


def test_pair_dataset_caches_only_when_asked(memory_pairs: PairSet):
    calls = []

    def transform(image):
        calls.append(image)
        return torch.zeros(3, 2, 2)

    plain = PairDataset(memory_pairs, transform, lambda texts: torch.zeros(1, 4, dtype=torch.long))
    plain[0], plain[1]
    assert calls[0] is not calls[1]  # decoded twice
    cached = PairDataset(memory_pairs, transform, lambda texts: torch.zeros(1, 4, dtype=torch.long), cache_images=True)
    cached[0], cached[1]
    assert calls[2] is calls[3]  # one decode for the two captions of image 0


def test_make_loader_shuffled_batches_have_unique_images(tiny_bundle, memory_pairs: PairSet):
    loader = make_loader(memory_pairs, tiny_bundle.preprocess_train, tiny_bundle.tokenizer, batch_size=4, seed=1)
    assert isinstance(loader.batch_sampler, UniqueImageBatchSampler)
    batches = list(loader)
    assert len(batches) == len(loader) == 2
    for images, texts, index in batches:
        assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32
        assert texts.shape == (4, 32) and texts.dtype == torch.long
        assert index.dtype == torch.long and len(set(index.tolist())) == 4


def test_make_loader_sequential_keeps_order_and_last_batch(tiny_bundle, memory_pairs: PairSet):
    loader = make_loader(memory_pairs, tiny_bundle.preprocess_val, tiny_bundle.tokenizer, batch_size=4, shuffle=False)
    batches = list(loader)
    assert [len(b[2]) for b in batches] == [4, 4, 2]
    assert torch.cat([b[2] for b in batches]).tolist() == memory_pairs.image_index
    expected = tiny_bundle.tokenizer(memory_pairs.captions)
    assert torch.equal(torch.cat([b[1] for b in batches]), expected)


def test_make_loader_reads_csv_images(tiny_bundle, csv_dir: Path):
    path = _write(csv_dir / "pairs.csv", "image,caption\nimg/a.png,red\nimg/b.png,green\nc.png,blue\nimg/a.png,red 2\n")
    loader = make_loader(load_csv(path), tiny_bundle.preprocess_val, tiny_bundle.tokenizer, batch_size=3, seed=0)
    ((images, texts, index),) = list(loader)
    assert images.shape == (3, 3, 64, 64)
    assert sorted(index.tolist()) == [0, 1, 2]


def test_collate_pairs_stacks_items():
    items = [(torch.ones(3, 2, 2), torch.arange(5), 4), (torch.zeros(3, 2, 2), torch.arange(5), 7)]
    images, texts, index = collate_pairs(items)
    assert images.shape == (2, 3, 2, 2) and texts.shape == (2, 5)
    assert index.tolist() == [4, 7] and index.dtype == torch.long
