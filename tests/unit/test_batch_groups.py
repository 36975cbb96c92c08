"""Batch groups: pairs that must share a batch (hard negatives), their validation, the CSV column, the grouped
sampler and the loader's choice of sampler."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cliptuner.train.data import (
    NO_GROUP,
    DataError,
    GroupedBatchSampler,
    PairSet,
    UniqueImageBatchSampler,
    from_memory,
    load_csv,
    make_loader,
)

torch.set_num_threads(1)


def _epochs(sampler, epochs: int) -> list[list[list[int]]]:
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        out.append(batches)
    return out


def _members(groups: list[int]) -> dict[int, list[int]]:
    members: dict[int, list[int]] = {}
    for pair, group in enumerate(groups):
        if group != NO_GROUP:
            members.setdefault(group, []).append(pair)
    return members


def _check_epoch(batches: list[list[int]], image_index: list[int], groups: list[int]) -> None:
    """The sampler's promises for one epoch, checked from the batches alone."""
    used = [p for batch in batches for p in batch]
    assert len(used) == len(set(used)), "a pair is used twice in one epoch"
    for batch in batches:
        images = [image_index[p] for p in batch]
        assert len(images) == len(set(images)), f"an image repeats in batch {batch}"
    batch_of = {p: b for b, batch in enumerate(batches) for p in batch}
    for group, pairs in _members(groups).items():
        where = {batch_of[p] for p in pairs if p in batch_of}
        assert len(where) <= 1, f"group {group} is spread over batches {where}"
        if where:
            assert pairs[0] in batch_of, f"group {group} is used without its first pair"


def _feedback_like(seed: int, num_groups: int = 40, loose: int = 60, num_images: int = 150):
    """Groups of 1-5 pairs and ungrouped pairs over a small image pool, so images repeat within and across groups."""
    rng = np.random.default_rng(seed)
    image_index, groups = [], []
    for group in range(num_groups):
        for _ in range(int(rng.integers(1, 6))):
            image_index.append(int(rng.integers(0, num_images)))
            groups.append(group)
    for _ in range(loose):
        image_index.append(int(rng.integers(0, num_images)))
        groups.append(NO_GROUP)
    order = rng.permutation(len(groups))  # groups interleaved with other pairs, as rows of a file may be
    return [image_index[i] for i in order], [groups[i] for i in order]


# ---------------------------------------------------------------- the sampler


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("drop_last", [True, False])
def test_groups_meet_in_one_batch_of_unique_images_every_epoch(seed: int, drop_last: bool):
    image_index, groups = _feedback_like(seed)
    sampler = GroupedBatchSampler(image_index, groups, batch_size=8, seed=seed, drop_last=drop_last)
    for batches in _epochs(sampler, 4):
        _check_epoch(batches, image_index, groups)
        sizes = [len(b) for b in batches]
        if drop_last:
            assert sizes and set(sizes) == {8}
        else:
            assert sizes == sorted(sizes, reverse=True) and sizes[0] == 8


@pytest.mark.parametrize("seed", [3, 4, 5, 6])
def test_distinct_images_fill_every_possible_batch_and_keep_groups_whole(seed: int):
    rng = np.random.default_rng(seed)
    groups = [g for g in range(30) for _ in range(int(rng.integers(2, 5)))] + [NO_GROUP] * 60
    groups = [groups[i] for i in rng.permutation(len(groups))]
    image_index = list(range(len(groups)))
    sampler = GroupedBatchSampler(image_index, groups, batch_size=8, seed=seed)
    for batches in _epochs(sampler, 5):
        _check_epoch(batches, image_index, groups)
        assert len(batches) == len(groups) // 8  # as many full batches as the pairs allow
        used = {p for batch in batches for p in batch}
        cut = [g for g, pairs in _members(groups).items() if 0 < sum(p in used for p in pairs) < len(pairs)]
        assert len(cut) <= 2  # only to fill the last batches


def test_a_pair_whose_image_is_in_the_batch_is_left_out_and_its_group_still_joins():
    # every group: its own query image, then the same popular image X (a result skipped above many choices)
    x = 100
    image_index = [image for g in range(12) for image in (g, x)]
    groups = [g for g in range(12) for _ in range(2)]
    sampler = GroupedBatchSampler(image_index, groups, batch_size=4, seed=0, drop_last=False)
    for batches in _epochs(sampler, 3):
        _check_epoch(batches, image_index, groups)
        used = {p for batch in batches for p in batch}
        assert all(2 * g in used for g in range(12))  # every query pair is trained on
        assert all(sum(image_index[p] == x for p in batch) == 1 for batch in batches)  # X is in every batch


def test_groups_led_by_one_image_wait_for_later_batches():
    # six groups whose first pair shows image 0 (six queries that chose it), plus ungrouped pairs
    image_index = [image for g in range(6) for image in (0, 10 + g)] + list(range(20, 44))
    groups = [g for g in range(6) for _ in range(2)] + [NO_GROUP] * 24
    sampler = GroupedBatchSampler(image_index, groups, batch_size=6, seed=1, drop_last=False)
    for batches in _epochs(sampler, 3):
        _check_epoch(batches, image_index, groups)
        assert sorted(p for batch in batches for p in batch) == list(range(len(groups)))  # nothing left out
        assert all(sum(image_index[p] == 0 for p in batch) <= 1 for batch in batches)


def test_a_group_larger_than_the_batch_or_repeating_an_image_is_cut(caplog):
    # group 0: 12 pairs of distinct images; group 1: images 50, 51, 50 (its third pair can never meet it)
    image_index = list(range(12)) + [50, 51, 50] + list(range(60, 80))
    groups = [0] * 12 + [1] * 3 + [NO_GROUP] * 20
    with caplog.at_level(logging.WARNING, logger="cliptuner.train.data"):
        sampler = GroupedBatchSampler(image_index, groups, batch_size=8, seed=0, drop_last=False)
    assert "1 grouped pair(s) show an image their group already shows and 4 are past the first 8" in caplog.text
    for batches in _epochs(sampler, 3):
        _check_epoch(batches, image_index, groups)
        used = {p for batch in batches for p in batch}
        assert used == set(range(len(groups))) - {8, 9, 10, 11, 14}
        assert sorted(next(b for b in batches if 0 in b)) == list(range(8))


def test_orders_differ_by_epoch_and_repeat_by_seed():
    image_index, groups = _feedback_like(7)
    a = GroupedBatchSampler(image_index, groups, 8, seed=11)
    b = GroupedBatchSampler(image_index, groups, 8, seed=11)
    first = _epochs(a, 3)
    assert first == _epochs(b, 3)
    assert first[0] != first[1] != first[2] != first[0]
    assert _epochs(GroupedBatchSampler(image_index, groups, 8, seed=12), 1)[0] != first[0]
    # not only the batch order: which pairs share a batch changes too
    assert {frozenset(batch) for batch in first[0]} != {frozenset(batch) for batch in first[1]}


def test_ranks_get_slices_of_the_same_global_batches():
    image_index, groups = _feedback_like(8, num_groups=60, loose=100, num_images=300)
    whole = GroupedBatchSampler(image_index, groups, batch_size=8, seed=5)
    ranks = [GroupedBatchSampler(image_index, groups, batch_size=4, seed=5, num_replicas=2, rank=r) for r in range(2)]
    for epoch in range(3):
        for sampler in [whole, *ranks]:
            sampler.set_epoch(epoch)
        assert len(ranks[0]) == len(ranks[1]) == len(whole) > 0
        global_batches = list(whole)
        _check_epoch(global_batches, image_index, groups)
        for batch, first, second in zip(global_batches, ranks[0], ranks[1]):
            assert len(first) == len(second) == 4
            assert first + second == batch


def test_sampler_refuses_bad_arguments():
    with pytest.raises(ValueError, match="3 groups but 2 pairs"):
        GroupedBatchSampler([0, 1], [0, 0, 1], batch_size=1)
    with pytest.raises(ValueError, match=r"pair 1: group must be an int >= 0, or -1 for no group; got -2"):
        GroupedBatchSampler([0, 1], [0, -2], batch_size=1)
    with pytest.raises(ValueError, match="larger than the 2 distinct images"):
        GroupedBatchSampler([0, 1, 1], [0, 0, 0], batch_size=3)
    with pytest.raises(ValueError, match="no pairs"):
        GroupedBatchSampler([], [], batch_size=1)
    with pytest.raises(ValueError, match="drop_last=False is not supported"):
        GroupedBatchSampler(list(range(10)), [0] * 10, 2, drop_last=False, num_replicas=2)
    with pytest.raises(ValueError, match="rank must be in"):
        GroupedBatchSampler(list(range(10)), [0] * 10, 2, num_replicas=2, rank=2)


# ---------------------------------------------------------------- PairSet and from_memory


def _pairs(groups) -> PairSet:
    return PairSet(
        images=["a", "b", "c"],
        captions=["x", "y", "z", "w"],
        image_index=[0, 1, 2, 0],
        image_ids=["a", "b", "c"],
        groups=groups,
    )


@pytest.mark.parametrize(
    "groups, match",
    [
        ([0, 0, 1], "3 groups but 4 pairs"),
        ([0, 0, -2, 1], "pair 2: group must be an int >= 0, or -1 for no group; got -2"),
        ([0, 1.0, 1, 1], "pair 1: group must be an int .* got 1.0"),
        ([0, 1, True, 1], "pair 2: group must be an int .* got True"),
        ([0, 1, 1, "3"], "pair 3: group must be an int .* got '3'"),
    ],
)
def test_pairset_validates_groups(groups, match: str):
    with pytest.raises(ValueError, match=match):
        _pairs(groups)


def test_pairset_groups_follow_their_pairs_through_subsets_and_splits():
    pairs = _pairs([np.int64(4), NO_GROUP, 4, 7])
    assert pairs.groups == [4, -1, 4, 7] and all(type(g) is int for g in pairs.groups)
    sub = pairs.subset_images([2, 0])
    assert list(zip(sub.captions, sub.groups)) == [("x", 4), ("z", 4), ("w", 7)]
    many = from_memory(
        [np.zeros((2, 2, 3), np.uint8)] * 40, [f"c{i}" for i in range(40)], groups=[i // 3 for i in range(40)]
    )
    train, held = many.split(0.25, seed=0)
    group_of = {caption: group for caption, group in zip(many.captions, many.groups)}
    for side in (train, held):
        assert side.groups == [group_of[c] for c in side.captions]
    assert len(train) + len(held) == 40


def test_pairset_without_groups_stays_without():
    pairs = _pairs(None)
    assert pairs.groups is None
    assert pairs.subset_images([1, 0]).groups is None
    assert all(side.groups is None for side in pairs.split(0.3, seed=0))
    assert from_memory([np.zeros((2, 2, 3), np.uint8)] * 2, ["a", "b"]).groups is None


def test_from_memory_passes_groups_through_and_checks_their_length():
    images = [np.zeros((2, 2, 3), np.uint8)] * 3
    pairs = from_memory(images, ["q", "skipped", "other"], image_ids=["i1", "i2", "i1"], groups=[0, 0, -1])
    assert pairs.groups == [0, 0, -1] and pairs.image_index == [0, 1, 0]
    with pytest.raises(ValueError, match="2 groups but 3 captions"):
        from_memory(images, ["a", "b", "c"], groups=[0, 0])
    with pytest.raises(ValueError, match="pair 0: group must be"):
        from_memory(images, ["a", "b", "c"], groups=[-5, 0, 0])


# ---------------------------------------------------------------- CSV


@pytest.fixture
def csv_dir(tmp_path: Path) -> Path:
    for name, colour in [("a", (200, 0, 0)), ("b", (0, 200, 0)), ("c", (0, 0, 200)), ("d", (9, 9, 9))]:
        Image.new("RGB", (8, 8), colour).save(tmp_path / f"{name}.png")
    return tmp_path


def test_load_csv_reads_the_group_column(csv_dir: Path):
    path = csv_dir / "pairs.csv"
    path.write_text(
        "Image,caption,Group\n"
        "a.png,red query,3\n"
        "b.png,green result skipped above,3\n"
        "c.png,blue unrelated,\n"
        "d.png,grey,  12 \n"
        "a.png,red again\n",  # a short row: no group
        encoding="utf-8",
    )
    pairs = load_csv(path)
    assert pairs.captions == ["red query", "green result skipped above", "blue unrelated", "grey", "red again"]
    assert pairs.groups == [3, 3, NO_GROUP, 12, NO_GROUP]
    assert pairs.image_index == [0, 1, 2, 3, 0]


def test_load_csv_without_a_group_column_has_no_groups(csv_dir: Path):
    path = csv_dir / "pairs.csv"
    path.write_text("image,caption\na.png,red\nb.png,green\n", encoding="utf-8")
    assert load_csv(path).groups is None


def test_load_csv_names_bad_group_cells_by_line(csv_dir: Path):
    path = csv_dir / "bad.csv"
    path.write_text(
        "image,caption,group\n"
        "a.png,fine,0\n"
        "b.png,negative,-1\n"  # line 3
        "c.png,fraction,1.5\n"  # line 4
        "d.png,word,one\n"  # line 5
        "a.png,superscript,²\n"  # line 6
        "b.png,fine too,\n",
        encoding="utf-8",
    )
    with pytest.raises(DataError) as info:
        load_csv(path)
    message = str(info.value)
    assert "4 bad row(s)" in message
    assert "line 3: group '-1' is not an integer >= 0 (leave it empty for no group)" in message
    assert "line 4: group '1.5'" in message and "line 5: group 'one'" in message and "line 6: group '²'" in message
    assert "line 2" not in message and "line 7" not in message


# ---------------------------------------------------------------- the loader


def _transform(image) -> torch.Tensor:
    return torch.zeros(3, 2, 2)


def _tokenizer(texts) -> torch.Tensor:
    return torch.zeros(len(texts), 4, dtype=torch.long)


def test_make_loader_picks_the_sampler_by_groups(csv_dir: Path):
    path = csv_dir / "pairs.csv"
    rows = ["a.png,query,5", "b.png,skipped above,5", "c.png,other,", "d.png,grey,", "a.png,red 2,", "c.png,blue,"]
    path.write_text("image,caption,group\n" + "\n".join(rows) + "\n", encoding="utf-8")
    grouped = load_csv(path)
    loader = make_loader(grouped, _transform, _tokenizer, batch_size=3, seed=0)
    assert isinstance(loader.batch_sampler, GroupedBatchSampler)
    for epoch in range(4):
        loader.batch_sampler.set_epoch(epoch)
        batches = [index.tolist() for _, _, index in loader]
        assert batches and all(len(b) == len(set(b)) == 3 for b in batches)
        assert sum({0, 1} <= set(b) for b in batches) == 1  # the query's image with the skipped one's

    ungrouped = PairSet(
        images=grouped.images,
        captions=grouped.captions,
        image_index=grouped.image_index,
        image_ids=grouped.image_ids,
        groups=[NO_GROUP] * len(grouped),
    )
    for pairs in (ungrouped, load_csv(csv_dir / "pairs.csv").subset_images([2, 3])):
        sampler = make_loader(pairs, _transform, _tokenizer, batch_size=2, seed=0).batch_sampler
        assert type(sampler) is UniqueImageBatchSampler
    sequential = make_loader(grouped, _transform, _tokenizer, batch_size=4, shuffle=False)
    assert [index.tolist() for _, _, index in sequential] == [[0, 1, 2, 3], [0, 2]]


def test_make_loader_without_groups_batches_as_before(csv_dir: Path):
    path = csv_dir / "pairs.csv"
    path.write_text("image,caption\na.png,red\nb.png,green\nc.png,blue\nd.png,grey\na.png,red 2\n", encoding="utf-8")
    pairs = load_csv(path)
    loader = make_loader(pairs, _transform, _tokenizer, batch_size=2, seed=3)
    reference = UniqueImageBatchSampler(pairs.image_index, 2, seed=3)
    for epoch in range(3):
        loader.batch_sampler.set_epoch(epoch)
        reference.set_epoch(epoch)
        assert list(loader.batch_sampler) == list(reference)


def test_a_group_that_fits_is_trained_whole_every_epoch():
    image_index = list(range(8))
    groups = [9, 9, 9] + [NO_GROUP] * 5
    sampler = GroupedBatchSampler(image_index, groups, batch_size=4, seed=0)
    for batches in _epochs(sampler, 5):
        assert len(batches) == 2
        assert sum({0, 1, 2} <= set(batch) for batch in batches) == 1
