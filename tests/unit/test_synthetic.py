"""The synthetic captioned-scenes generator: determinism, vocabulary, pictures that match words, files."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliptuner.model.images import decode_image
from cliptuner.train import synthetic
from cliptuner.train.data import load_csv, load_karpathy


def _words(captions: list[str]) -> set[str]:
    return {w for c in captions for w in re.findall(r"[a-z]+", c)}


def test_same_seed_same_scenes_other_seed_other_scenes():
    a = synthetic.generate(12, "domain", seed=4, captions_per_image=2)
    b = synthetic.generate(12, "domain", seed=4, captions_per_image=2)
    c = synthetic.generate(12, "domain", seed=5, captions_per_image=2)
    assert a.captions == b.captions and a.image_index == b.image_index
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
    assert a.captions != c.captions
    assert sum(np.array_equal(x, y) for x, y in zip(a.images, c.images)) == 0


def test_scene_i_does_not_depend_on_how_many_are_generated():
    short = synthetic.generate(5, "generic", seed=2)
    long = synthetic.generate(9, "generic", seed=2)
    assert long.captions[:5] == short.captions
    assert all(np.array_equal(x, y) for x, y in zip(short.images, long.images[:5]))


@pytest.mark.parametrize("domain", ["generic", "domain"])
def test_generate_layout(domain: str):
    pairs = synthetic.generate(7, domain, seed=0, image_size=48, captions_per_image=3)
    assert pairs.num_images == 7 and len(pairs) == 21
    assert pairs.image_ids[6] == f"{domain}-00006"
    assert pairs.captions_per_image() == [3] * 7
    for image in pairs.images:
        assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    for i in range(7):  # distinct framings of one scene
        assert len({pairs.captions[p] for p in pairs.captions_of(i)}) == 3


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"unknown domain 'medical'; known: \['domain', 'generic'\]"):
        synthetic.generate(3, "medical")
    with pytest.raises(ValueError, match="n_images"):
        synthetic.generate(0)
    with pytest.raises(ValueError, match="max_objects"):
        synthetic.generate(3, max_objects=0)


def test_domain_vocabulary_is_its_own():
    generic = _words(synthetic.generate(300, "generic", seed=0, captions_per_image=2).captions)
    domain = _words(synthetic.generate(300, "domain", seed=0, captions_per_image=2).captions)
    domain_only = synthetic.domain_words("domain")
    generic_only = synthetic.domain_words("generic")
    assert {"teal", "star", "striped", "dotted", "two", "three"} <= domain_only
    assert not generic & domain_only
    assert not domain & generic_only
    vocab = synthetic.DOMAINS["domain"]
    for category in ("colours", "shapes"):
        assert set(vocab[category]) <= domain
    assert {"striped", "dotted", "two", "three"} <= domain
    assert set(synthetic.DOMAINS["generic"]["colours"]) <= generic
    assert set(synthetic.DOMAINS["generic"]["shapes"]) <= generic


def test_captions_identify_their_images():
    pairs = synthetic.generate(200, "generic", seed=3)
    assert len(set(pairs.captions)) >= 190
    positions = synthetic.DOMAINS["generic"]["positions"]
    assert all(any(p in c for p in positions) for c in pairs.captions)


def test_pictures_show_what_the_captions_say():
    """One solid object per scene: its colour, grid cell and size match the caption."""
    pairs = synthetic.generate(40, "generic", seed=1, max_objects=1)
    cells = {words: (col, row) for words, col, row in synthetic.POSITIONS}
    areas = {"small": [], "large": []}
    for image, caption in zip(pairs.images, pairs.captions):
        size, colour = re.search(r"(small|large) (\w+) (circle|square|triangle)", caption).group(1, 2)
        position = max((p for p in cells if p in caption), key=len)
        rgb = np.array(synthetic.RGB[colour], dtype=float)
        mask = np.abs(image.astype(float) - rgb).max(axis=-1) < 12
        assert mask.sum() > 20, caption
        rows, cols = np.nonzero(mask)
        cell = (int(cols.mean() // (64 / 3)), int(rows.mean() // (64 / 3)))
        assert cell == cells[position], caption
        areas[size].append(mask.sum())
    assert areas["small"] and areas["large"]
    assert max(areas["small"]) < min(areas["large"])


def test_domain_textures_and_counts_are_drawn():
    pairs = synthetic.generate(60, "domain", seed=2, max_objects=1)
    seen = set()
    for image, caption in zip(pairs.images, pairs.captions):
        match = re.search(r"(a|two|three) (small|large) (?:(striped|dotted) )?(\w+) (\w+)", caption)
        count, texture, colour = match.group(1), match.group(3), match.group(4)
        rgb = np.array(synthetic.RGB[colour], dtype=float)
        solid = np.abs(image.astype(float) - rgb).max(axis=-1) < 12
        dark = np.abs(image.astype(float) - rgb * 0.35).max(axis=-1) < 12
        if texture:  # the pattern's dark colour is there, and plain objects have none
            assert dark.sum() > 0, caption
        else:
            assert dark.sum() == 0, caption
        assert solid.sum() > 0, caption
        seen.add((count, texture))
    assert {c for c, _ in seen} == {"a", "two", "three"}
    assert {t for _, t in seen} == {None, "striped", "dotted"}


def test_write_csv_round_trips_and_is_byte_identical(tmp_path: Path):
    first = synthetic.write_csv(tmp_path / "one", 6, "domain", seed=8, image_size=32, captions_per_image=2)
    second = synthetic.write_csv(tmp_path / "two", 6, "domain", seed=8, image_size=32, captions_per_image=2)
    assert first.name == "pairs.csv"
    assert first.read_bytes() == second.read_bytes()
    for png in (tmp_path / "one" / "images").iterdir():
        assert png.read_bytes() == (tmp_path / "two" / "images" / png.name).read_bytes()
    loaded = load_csv(first)
    made = synthetic.generate(6, "domain", seed=8, image_size=32, captions_per_image=2)
    assert loaded.captions == made.captions
    assert loaded.image_index == made.image_index
    assert loaded.image_ids[0] == "images/domain-00000.png"
    for path, array in zip(loaded.images, made.images):
        assert np.array_equal(np.asarray(decode_image(path)), array)


def test_write_karpathy_round_trips_with_a_seeded_split(tmp_path: Path):
    path = synthetic.write_karpathy(tmp_path / "k", 10, "generic", seed=1, captions_per_image=2, test_fraction=0.3)
    assert path.name == "dataset.json"
    train = load_karpathy(path, split="train")
    test = load_karpathy(path, split="test")
    assert test.num_images == 3 and train.num_images == 7
    assert len(test) == 6 and len(train) == 14
    made = synthetic.generate(10, "generic", seed=1, captions_per_image=2)
    everything = load_karpathy(path)
    assert everything.captions == made.captions
    assert np.array_equal(np.asarray(Image.open(everything.images[4]).convert("RGB")), made.images[4])
    again = synthetic.write_karpathy(tmp_path / "k2", 10, "generic", seed=1, captions_per_image=2, test_fraction=0.3)
    assert again.read_bytes() == path.read_bytes()
    other = synthetic.write_karpathy(tmp_path / "k3", 10, "generic", seed=2, captions_per_image=2, test_fraction=0.3)
    assert load_karpathy(other).captions != everything.captions


def test_synthetic_does_not_import_torch():
    code = "import sys, cliptuner.train.synthetic; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
