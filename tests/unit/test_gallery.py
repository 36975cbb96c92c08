"""Gallery images in a PairSet: images without a caption that evaluation ranks every text against (a search's other
candidates), kept last through subsets, splits, concatenation and the PAIRS CSV, never trained on."""

import numpy as np
import pytest

from cliptuner.train import synthetic
from cliptuner.train.data import DataError, PairSet, concat_pairs, load_csv, make_loader
from cliptuner.train.evaluate import retrieval_metrics
from cliptuner.train.job import write_pairs_csv


@pytest.fixture(scope="module")
def pairs():
    base = synthetic.generate(5, domain="generic", seed=1, image_size=24)
    other = synthetic.generate(4, domain="domain", seed=2, image_size=24)
    return base.with_gallery(other.images, other.image_ids)


def test_with_gallery_appends_uncaptioned_images_once(pairs):
    assert (pairs.num_images, pairs.num_captioned, pairs.gallery, len(pairs)) == (9, 5, 4, 5)
    assert pairs.image_ids[5:] == [f"domain-{i:05d}" for i in range(4)]
    again = pairs.with_gallery(pairs.images[:7], pairs.image_ids[:7])  # ids already there: nothing added
    assert again.num_images == 9 and again.gallery == 4


def test_a_gallery_image_has_no_caption_and_a_captioned_image_is_not_one(pairs):
    with pytest.raises(ValueError, match=r"1 image\(s\) without a caption"):
        PairSet(images=[1, 2], captions=["a"], image_index=[0], image_ids=["x", "y"], gallery=0)
    with pytest.raises(ValueError, match=r"gallery image\(s\) with a caption, e.g. \['x'\]"):
        PairSet(images=[1], captions=["a"], image_index=[0], image_ids=["x"], gallery=1)
    with pytest.raises(ValueError, match=r"gallery must be an integer in \[0, 1\], got 2"):
        PairSet(images=[1], captions=["a"], image_index=[0], image_ids=["x"], gallery=2)


def test_subsets_splits_and_concatenation_keep_the_gallery_last(pairs):
    subset = pairs.subset_images([7, 1, 0])
    assert subset.image_ids == ["generic-00001", "generic-00000", "domain-00002"] and subset.gallery == 1
    train, held = pairs.split(0.4, seed=0)  # the captioned images are split; the gallery goes with neither
    assert train.gallery == held.gallery == 0 and train.num_images + held.num_images == 5
    joined = concat_pairs([pairs, synthetic.generate(3, domain="domain", seed=9, image_size=24)])
    assert joined.gallery == 4 and joined.image_ids[-4:] == pairs.image_ids[5:] and joined.num_captioned == 8
    assert [joined.image_ids[i] for i in joined.image_index[:5]] == [pairs.image_ids[i] for i in pairs.image_index]


def test_the_pairs_csv_carries_the_gallery_and_refuses_a_gallery_row_with_a_caption(pairs, tmp_path):
    back = load_csv(write_pairs_csv(pairs, tmp_path / "set" / "pairs.csv"))
    assert back.captions == pairs.captions and back.gallery == 4 and back.num_images == 9
    bad = tmp_path / "set" / "bad.csv"
    image = back.images[0]
    bad.write_text(f"image,caption,gallery\n{image},a caption,1\n{image},,\n")
    with pytest.raises(
        DataError, match=r"(?s)line 2: a gallery row \(gallery 1\) has no caption.*line 3: empty caption"
    ):
        load_csv(bad)


def test_recall_counts_gallery_images_as_candidates_but_never_as_answers():
    images = np.eye(4, dtype=np.float32)  # images 2 and 3 are the gallery
    texts = np.array([[0.9, 0.0, 0.1, 0.0], [0.0, 0.5, 0.0, 0.8]], dtype=np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    metrics = retrieval_metrics(images, texts, [0, 1], ks=(1, 2))
    assert metrics["t2i_r1"] == 0.5  # the second text prefers a gallery image to its own
    assert metrics["t2i_r2"] == 1.0
    assert metrics["i2t_r1"] == 1.0  # only captioned images ask for their texts


def test_training_never_samples_a_gallery_image(pairs):
    import torch

    to_tensor = lambda image: torch.zeros(3, 2, 2)  # noqa: E731
    tokenize = lambda texts: torch.zeros(len(texts), 4, dtype=torch.long)  # noqa: E731
    loader = make_loader(pairs, to_tensor, tokenize, batch_size=2, seed=0)
    seen = {int(i) for _, _, index in loader for i in index}
    assert seen <= set(range(pairs.num_captioned)) and seen
