"""Hard-negative batches: mining neighbours in the base model's embedding space, the sampler's promises (unique
images and captions, each pair once, seeded epochs, DDP slices), that confusable pairs meet, and the wiring into
``finetune``."""

import copy
import dataclasses
import logging
import pickle
import types

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from cliptuner.config import TrainConfig
from cliptuner.train import synthetic
from cliptuner.train.data import PairSet, UniqueImageBatchSampler
from cliptuner.train.hard_negatives import (
    NO_NEIGHBOUR,
    SPACES,
    HardNegativeBatchSampler,
    HardNegativeOptions,
    caption_ids,
    hard_negative_loader,
    mine_neighbours,
)
from cliptuner.train.loop import finetune

torch.set_num_threads(1)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _epochs(sampler, epochs: int) -> list[list[list[int]]]:
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        out.append(batches)
    return out


def _check_epoch(batches, image_index, captions=None) -> list[int]:
    """The sampler's promises for one epoch, from the batches alone; the pairs used."""
    used = [p for batch in batches for p in batch]
    assert len(used) == len(set(used)), "a pair is used twice in one epoch"
    for batch in batches:
        images = [image_index[p] for p in batch]
        assert len(images) == len(set(images)), f"an image repeats in batch {batch}"
        if captions is not None:
            texts = [captions[p] for p in batch]
            assert len(texts) == len(set(texts)), f"a caption repeats in batch {batch}"
    return used


def _random_table(num_pairs: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    table = np.stack([rng.permutation(num_pairs)[:k] for _ in range(num_pairs)])
    table[rng.random(table.shape) < 0.2] = NO_NEIGHBOUR  # some rows shorter than k
    return table


def _clusters(per_cluster: int, seed: int, noise: float = 0.3, dim: int = 16):
    """Two tight clusters of pairs (one caption per image): each pair is confusable with its cluster only."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2, dim)) * 3
    cluster = np.repeat([0, 1], per_cluster)
    rng.shuffle(cluster)
    images = _unit(centres[cluster] + noise * rng.normal(size=(len(cluster), dim)))
    texts = _unit(centres[cluster] + noise * rng.normal(size=(len(cluster), dim)))
    return images, texts, cluster


# ---------------------------------------------------------------- mining


def _reference_score(space: str, images, texts, image_index, i: int, j: int) -> float:
    """The score of pair ``j`` for pair ``i`` in ``space``, written out from the definition."""
    image_i, image_j = images[image_index[i]], images[image_index[j]]
    if space == "cross":
        return max(texts[i] @ image_j, image_i @ texts[j])
    if space == "image":
        return image_i @ image_j
    if space == "text":
        return texts[i] @ texts[j]
    return (image_i @ image_j + texts[i] @ texts[j]) / 2


@pytest.mark.parametrize("space", SPACES)
def test_mining_matches_a_brute_force_reference_and_skips_false_negatives(space: str):
    rng = np.random.default_rng(0)
    image_index = [0, 0, 1, 2, 3, 3, 4, 5, 6, 7]  # images 0 and 3 have two captions
    captions = ["a", "b", "c", "d", "e", "f", "c", "g", "h", "i"]  # pairs 2 and 6: one text, two images
    images, texts = _unit(rng.normal(size=(8, 6))), _unit(rng.normal(size=(10, 6)))
    mined = mine_neighbours(images, texts, image_index, k=4, captions=caption_ids(captions), chunk=3, space=space)

    for i in range(10):
        scores = {
            j: _reference_score(space, images, texts, image_index, i, j)
            for j in range(10)
            if image_index[j] != image_index[i] and captions[j] != captions[i]
        }
        best = sorted(scores.values(), reverse=True)[:4]
        np.testing.assert_allclose(mined.scores[i], best, rtol=1e-5)  # the hardest, hardest first
        for j, score in zip(mined.pairs[i], mined.scores[i]):
            assert j in scores and score == pytest.approx(scores[j], rel=1e-5)  # eligible, and scored right
        own = _reference_score(space, images, texts, image_index, i, i)  # the pair against itself
        assert mined.positive[i] == pytest.approx(own, rel=1e-5)
        if space != "cross":
            assert own == pytest.approx(1.0, rel=1e-5)
    assert 1 not in mined.pairs[0] and 0 not in mined.pairs[1]  # a caption of the same image is no negative
    assert 6 not in mined.pairs[2] and 2 not in mined.pairs[6]  # nor is the same caption of another image


@pytest.mark.parametrize(("space", "margin"), [("cross", 0.1), ("image", 0.4), ("text", 0.4), ("both", 0.5)])
def test_relative_margin_rules_out_candidates_near_or_above_the_positive(space: str, margin: float):
    rng = np.random.default_rng(1)
    images, texts = _unit(rng.normal(size=(30, 8))), _unit(rng.normal(size=(30, 8)))
    texts[:10] = _unit(images[:10] + 0.5 * texts[:10])  # some positives clearly above chance
    images[20:25] = _unit(images[10:15] + 0.2 * images[20:25])  # near-duplicate images
    texts[25:30] = _unit(texts[15:20] + 0.2 * texts[25:30])  # near-duplicate captions
    plain = mine_neighbours(images, texts, np.arange(30), k=29, space=space)
    kept_by_margin = mine_neighbours(images, texts, np.arange(30), k=29, relative_margin=margin, space=space)
    assert kept_by_margin.dropped_by_margin > 0
    for i in range(30):
        limit = plain.positive[i] - margin * abs(plain.positive[i])
        kept = kept_by_margin.pairs[i][kept_by_margin.pairs[i] != NO_NEIGHBOUR]
        expected = [j for j, s in zip(plain.pairs[i], plain.scores[i]) if s <= limit]
        assert kept.tolist() == expected
    assert (kept_by_margin.pairs == NO_NEIGHBOUR).sum() == kept_by_margin.dropped_by_margin
    near_duplicates = {"image": (10, 20), "text": (15, 25), "both": None, "cross": None}[space]
    if near_duplicates is not None:  # in its own space a near-duplicate is no negative of the original
        original, duplicate = near_duplicates
        assert duplicate in plain.pairs[original] and duplicate not in kept_by_margin.pairs[original]


def _three_ways(per_cell: int, seed: int, noise: float = 0.05):
    """Pairs with three independent binary labels: images alike by ``look``, captions alike by ``wording``,
    image and caption alike across the modalities by ``match`` (a weaker part both embeddings share).

    Image-image cosines rank ``look`` first, caption-caption cosines ``wording``, cross-modal cosines only see
    ``match``, and the mean of the first two ranks pairs alike in both first.
    """
    rng = np.random.default_rng(seed)
    labels = np.array([(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)] * per_cell)
    labels = labels[rng.permutation(len(labels))]
    look, wording, match = labels.T
    dim = 8
    centre = rng.normal(size=(3, 2, dim))
    zero = np.zeros((len(labels), dim))
    shared = 0.5 * centre[2][match]
    images = _unit(np.hstack([centre[0][look], zero, shared]) + noise * rng.normal(size=(len(labels), 3 * dim)))
    texts = _unit(np.hstack([zero, centre[1][wording], shared]) + noise * rng.normal(size=(len(labels), 3 * dim)))
    return images, texts, look, wording, match


@pytest.mark.parametrize("seed", [0, 1])
def test_each_space_finds_the_pairs_alike_in_it(seed: int):
    images, texts, look, wording, match = _three_ways(per_cell=12, seed=seed)
    image_index = np.arange(len(look))

    def sharing(space: str) -> dict[str, float]:
        """Of all (pair, neighbour) links of the space: the fraction sharing each label."""
        table = mine_neighbours(images, texts, image_index, k=8, space=space).pairs
        assert (table != NO_NEIGHBOUR).all()
        rows = np.repeat(image_index, table.shape[1])
        return {
            name: float((label[rows] == label[table.ravel()]).mean())
            for name, label in (("look", look), ("wording", wording), ("match", match))
        }

    image, text, both, cross = sharing("image"), sharing("text"), sharing("both"), sharing("cross")
    assert image["look"] == 1.0 and image["wording"] < 0.75  # grouped by the images, not by the captions
    assert text["wording"] == 1.0 and text["look"] < 0.75  # by the captions, not by the images
    assert both["look"] == both["wording"] == 1.0  # alike in both
    assert cross["match"] == 1.0 and cross["look"] < 0.75 and cross["wording"] < 0.75  # only what links the two


@pytest.mark.parametrize("space", ["image", "text"])
def test_batches_of_a_space_keep_to_the_pairs_alike_in_it(space: str):
    images, texts, look, wording, _ = _three_ways(per_cell=12, seed=3)
    label = look if space == "image" else wording
    image_index = np.arange(len(label))
    mined = mine_neighbours(images, texts, image_index, k=8, space=space)
    sampler = HardNegativeBatchSampler(image_index, mined.pairs, 8, seed=1)
    for batches in _epochs(sampler, 3):
        _check_epoch(batches, image_index)
        assert len(batches) == 12
        assert all(len(set(label[b])) == 1 for b in batches), f"a batch mixes the pairs {space} space tells apart"


def test_mining_refuses_bad_input():
    images, texts = _unit(np.ones((3, 4))), _unit(np.ones((4, 4)))
    with pytest.raises(ValueError, match="4 caption embeddings but 3 pairs"):
        mine_neighbours(images, texts, [0, 1, 2])
    with pytest.raises(ValueError, match=r"image_index must lie in \[0, 3\)"):
        mine_neighbours(images, texts, [0, 1, 2, 3])
    texts[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        mine_neighbours(images, texts, [0, 1, 2, 2])
    with pytest.raises(ValueError, match="relative_margin must be in"):
        HardNegativeOptions(relative_margin=1.5)
    with pytest.raises(ValueError, match="neighbours must be an integer >= 1"):
        HardNegativeOptions(neighbours=0)
    with pytest.raises(ValueError, match=r"space must be one of \['cross', 'image', 'text', 'both'\], got 'images'"):
        mine_neighbours(_unit(np.eye(3, 4)), _unit(np.eye(3, 4)), [0, 1, 2], space="images")
    with pytest.raises(ValueError, match=r"space must be one of .*, got 'joint'"):
        HardNegativeOptions(space="joint")


# ---------------------------------------------------------------- the sampler


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("drop_last", [True, False])
def test_batches_hold_unique_images_and_captions_and_use_every_pair_once(seed: int, drop_last: bool):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 5, size=60)  # 1-4 captions per image
    image_index = np.repeat(np.arange(60), counts)
    captions = [f"c{i}" for i in range(len(image_index))]
    for p in rng.choice(len(captions), size=15, replace=False):  # some captions repeat across images
        captions[p] = "a caption several images share"
    ids = caption_ids(captions)
    sampler = HardNegativeBatchSampler(
        image_index, _random_table(len(image_index), 6, seed), 8, seed=seed, drop_last=drop_last, caption_ids=ids
    )
    for batches in _epochs(sampler, 3):
        used = _check_epoch(batches, image_index, ids)
        if drop_last:
            assert all(len(b) == 8 for b in batches)
            assert len(used) >= len(image_index) - 8 - 15  # only a tail the duplicates and images crowd out
        else:
            assert sorted(used) == list(range(len(image_index)))


def test_an_image_with_many_captions_is_spread_so_that_every_batch_fills():
    image_index = [0] * 6 + list(range(1, 31))  # 36 pairs; image 0 holds 6; 6 full batches need it in each
    for seed in range(5):
        sampler = HardNegativeBatchSampler(image_index, _random_table(36, 5, seed), 6, seed=seed)
        for batches in _epochs(sampler, 3):
            assert sorted(_check_epoch(batches, image_index)) == list(range(36))
            assert len(batches) == 6
    assert len(UniqueImageBatchSampler(image_index, 6)) == 6  # the most the caption counts allow


def test_no_full_batch_is_lost_to_pairs_that_clash_at_the_end_of_an_epoch():
    image_index = np.repeat(np.arange(60), 2)  # two captions per image: 120 pairs, 10 batches of 12
    for seed in range(20):  # without the completing swaps, some of these epochs end with 9 batches
        sampler = HardNegativeBatchSampler(image_index, _random_table(120, 8, seed), 12, seed=seed)
        for batches in _epochs(sampler, 3):
            assert sorted(_check_epoch(batches, image_index)) == list(range(120))


def test_orders_repeat_by_seed_and_differ_by_epoch():
    image_index = np.repeat(np.arange(50), 2)
    table = _random_table(100, 8, 5)
    first = _epochs(HardNegativeBatchSampler(image_index, table, 8, seed=11), 3)
    assert first == _epochs(HardNegativeBatchSampler(image_index, table, 8, seed=11), 3)
    assert first[0] != first[1] != first[2] != first[0]
    assert {frozenset(b) for b in first[0]} != {frozenset(b) for b in first[1]}  # new company, not only a new order
    assert _epochs(HardNegativeBatchSampler(image_index, table, 8, seed=12), 1)[0] != first[0]


def test_ranks_get_disjoint_slices_of_the_same_global_batches():
    image_index = np.repeat(np.arange(80), 2)
    table = _random_table(160, 8, 6)
    whole = HardNegativeBatchSampler(image_index, table, batch_size=8, seed=5)
    ranks = [HardNegativeBatchSampler(image_index, table, batch_size=4, seed=5, num_replicas=2, rank=r) for r in (0, 1)]
    for epoch in range(3):
        for sampler in [whole, *ranks]:
            sampler.set_epoch(epoch)
        assert len(ranks[0]) == len(ranks[1]) == len(whole) > 0
        global_batches = list(whole)
        _check_epoch(global_batches, image_index)
        for batch, first, second in zip(global_batches, ranks[0], ranks[1]):
            assert len(first) == len(second) == 4
            assert not set(first) & set(second)
            assert first + second == batch


def test_sampler_refuses_bad_arguments():
    with pytest.raises(ValueError, match="no pairs"):
        HardNegativeBatchSampler([], np.zeros((0, 2)), 1)
    with pytest.raises(ValueError, match=r"neighbours must be a \[3, k\] table"):
        HardNegativeBatchSampler([0, 1, 2], np.zeros((2, 2)), 1)
    with pytest.raises(ValueError, match=r"pair indices in \[0, 3\)"):
        HardNegativeBatchSampler([0, 1, 2], np.array([[1], [2], [3]]), 1)
    with pytest.raises(ValueError, match="larger than the 2 distinct images"):
        HardNegativeBatchSampler([0, 1, 1], np.array([[1], [0], [0]]), 3)
    with pytest.raises(ValueError, match="2 caption ids but 3 pairs"):
        HardNegativeBatchSampler([0, 1, 2], np.array([[1], [2], [0]]), 1, caption_ids=[0, 1])
    with pytest.raises(ValueError, match="drop_last=False is not supported"):
        HardNegativeBatchSampler(list(range(10)), np.zeros((10, 1)), 2, drop_last=False, num_replicas=2)


# ---------------------------------------------------------------- confusable pairs meet


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusable_pairs_share_batches(seed: int):
    images, texts, cluster = _clusters(per_cluster=48, seed=seed)
    image_index = np.arange(len(cluster))
    mined = mine_neighbours(images, texts, image_index, k=8)
    hard = HardNegativeBatchSampler(image_index, mined.pairs, 8, seed=seed)
    for batches in _epochs(hard, 3):
        _check_epoch(batches, image_index)
        assert len(batches) == 12
        assert all(len(set(cluster[b])) == 1 for b in batches), "a batch mixes the two clusters"
    # the reference: random batches of unique images mix the clusters nearly always
    random_batches = _epochs(UniqueImageBatchSampler(image_index, 8, seed=seed), 3)
    mixed = sum(len(set(cluster[b])) > 1 for batches in random_batches for b in batches)
    assert mixed >= 30


def _fake_bundle():
    return types.SimpleNamespace(
        device=torch.device("cpu"),
        preprocess_train=lambda image: torch.zeros(3, 4, 4),
        tokenizer=lambda texts: torch.zeros(len(texts), 5, dtype=torch.long),
    )


def _cluster_pairs(seed: int) -> tuple[PairSet, np.ndarray, np.ndarray, np.ndarray]:
    images, texts, cluster = _clusters(per_cluster=32, seed=seed)
    pairs = PairSet(
        images=[np.zeros((4, 4, 3), np.uint8)] * len(cluster),
        captions=[f"caption {i}" for i in range(len(cluster))],
        image_index=list(range(len(cluster))),
        image_ids=[str(i) for i in range(len(cluster))],
    )
    return pairs, images, texts, cluster


def test_loader_batches_come_from_one_cluster_with_an_injected_embedding():
    pairs, images, texts, cluster = _cluster_pairs(seed=3)
    seen = []

    def embed(given):
        seen.append(given)
        return images, texts

    cfg = TrainConfig(batch_size=4, accum_steps=2, seed=9, hard_negatives=True)
    loader = hard_negative_loader(_fake_bundle(), pairs, cfg, options=HardNegativeOptions(neighbours=8), embed=embed)
    assert seen == [pairs]  # embedded once, at construction
    assert isinstance(loader.batch_sampler, HardNegativeBatchSampler)
    assert len(loader) == 8  # 64 pairs, 8 per optimizer step (batch 4 x 2 micro-batches)
    for epoch in range(2):
        loader.batch_sampler.set_epoch(epoch)
        for images_batch, tokens, index in loader:
            assert images_batch.shape == (8, 3, 4, 4) and tokens.shape == (8, 5)
            assert len(set(cluster[index.numpy()])) == 1


@pytest.mark.parametrize("space", ["image", "text"])
def test_loader_mines_in_the_space_its_options_name(space: str):
    images, texts, look, wording, _ = _three_ways(per_cell=12, seed=2)
    label = look if space == "image" else wording
    pairs = PairSet(
        images=[np.zeros((4, 4, 3), np.uint8)] * len(label),
        captions=[f"caption {i}" for i in range(len(label))],
        image_index=list(range(len(label))),
        image_ids=[str(i) for i in range(len(label))],
    )
    cfg = TrainConfig(batch_size=8, seed=4, hard_negatives=True)
    options = HardNegativeOptions(neighbours=8, space=space)
    loader = hard_negative_loader(_fake_bundle(), pairs, cfg, options=options, embed=lambda p: (images, texts))
    for batches in _epochs(loader.batch_sampler, 2):
        assert len(batches) == 12
        assert all(len(set(label[b])) == 1 for b in batches), f"a batch mixes the pairs {space} space tells apart"


def test_loader_refuses_grouped_or_streamed_pairs():
    pairs, images, texts, _ = _cluster_pairs(seed=0)
    grouped = dataclasses.replace(pairs, groups=[0, 0] + [-1] * (len(pairs) - 2))
    cfg = TrainConfig(batch_size=4, hard_negatives=True)
    with pytest.raises(ValueError, match="cannot be combined with batch groups"):
        hard_negative_loader(_fake_bundle(), grouped, cfg, embed=lambda p: (images, texts))
    with pytest.raises(ValueError, match="held in memory"):
        hard_negative_loader(_fake_bundle(), iter([]), cfg, embed=lambda p: (images, texts))
    with pytest.raises(ValueError, match="larger than the 64 distinct images"):
        hard_negative_loader(_fake_bundle(), pairs, dataclasses.replace(cfg, batch_size=65), embed=None)


def _ddp_loader_worker(rank: int, world_size: int, init_file: str, out_path: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        pairs, images, texts, _ = _cluster_pairs(seed=4)

        def embed(given):
            if rank != 0:
                raise AssertionError("only rank 0 embeds")
            return images, texts

        cfg = TrainConfig(batch_size=4, seed=2, hard_negatives=True)
        loader = hard_negative_loader(_fake_bundle(), pairs, cfg, world_size, rank, embed=embed)
        batches = []
        for epoch in range(2):
            loader.batch_sampler.set_epoch(epoch)
            batches.append(list(loader.batch_sampler))
        with open(f"{out_path}.{rank}", "wb") as f:
            pickle.dump(batches, f)
    finally:
        torch.distributed.destroy_process_group()


def test_under_ddp_rank_zero_mines_and_ranks_slice_its_batches(tmp_path):
    mp.spawn(_ddp_loader_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path / "out")), nprocs=2, join=True)
    parts = [pickle.loads((tmp_path / f"out.{r}").read_bytes()) for r in (0, 1)]

    pairs, images, texts, cluster = _cluster_pairs(seed=4)
    cfg = TrainConfig(batch_size=8, seed=2, hard_negatives=True)
    single = hard_negative_loader(_fake_bundle(), pairs, cfg, embed=lambda p: (images, texts)).batch_sampler
    for epoch, whole in enumerate(_epochs(single, 2)):
        assert len(parts[0][epoch]) == len(parts[1][epoch]) == len(whole) == 8
        for batch, first, second in zip(whole, parts[0][epoch], parts[1][epoch]):
            assert first + second == batch
            assert len(set(cluster[batch])) == 1


# ---------------------------------------------------------------- finetune


def test_finetune_trains_with_hard_negative_batches(tiny_bundle, caplog):
    pairs = synthetic.generate(40, domain="domain", seed=7, captions_per_image=2)
    train_pairs, held_out = pairs.split(0.25, seed=0)
    cfg = TrainConfig(epochs=2, batch_size=8, learning_rate=5e-4, warmup_steps=1, seed=3, hard_negatives=True)
    bundle = dataclasses.replace(tiny_bundle, model=copy.deepcopy(tiny_bundle.model))
    with caplog.at_level(logging.INFO, logger="cliptuner.train.hard_negatives"):
        report = finetune(bundle, train_pairs, held_out, cfg)
    assert any("hard negatives:" in r.getMessage() for r in caplog.records)  # the loader mined the base model
    assert report["config"]["hard_negatives"] is True
    assert report["epochs"] == 2 and len(report["epoch_losses"]) == 2
    assert 2 * 6 <= report["steps"] <= 2 * 7  # 60 pairs of 30 images, 8 per batch, full batches only
    assert all(np.isfinite(report["epoch_losses"]))
    assert report["after"] != report["before"]
