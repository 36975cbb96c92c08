"""Deterministic captioned scenes: coloured shapes on a plain background, described in words.

A scene holds one to ``max_objects`` objects, each in its own cell of a 3×3 grid and described by its
attributes: ``"a large red circle on the left"``, ``"a picture of a small blue square at the top and a large
yellow triangle in the bottom right corner"``. Captions name every attribute, so they identify their image well
(a gallery of a few hundred scenes has few exact duplicates), and a tiny CLIP trained from scratch on a CPU for a
minute or two learns to match them.

Two distributions share the layout but not the vocabulary (see :data:`DOMAINS`):

* ``"generic"``: basic colours and shapes;
* ``"domain"``: other colours and shapes, textures (striped, dotted) and counts (two, three) — words and looks
  the generic scenes never show, which is what fine-tuning must teach.

Everything is drawn with numpy and PIL (no torch). Scene ``i`` of ``(domain, seed)`` depends only on those three,
so ``generate(100)`` starts with ``generate(50)``; the same arguments give byte-identical files.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cliptuner.train.data import PairSet

RGB = {
    # generic
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 225),
    "yellow": (245, 220, 30),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    # domain
    "teal": (0, 140, 135),
    "magenta": (225, 0, 205),
    "orange": (255, 135, 0),
    "purple": (115, 35, 165),
    "pink": (255, 160, 195),
    "brown": (125, 75, 25),
}

SIZES = ("small", "large")
POSITIONS = (  # (words, column, row) of the 3×3 grid
    ("in the top left corner", 0, 0),
    ("at the top", 1, 0),
    ("in the top right corner", 2, 0),
    ("on the left", 0, 1),
    ("in the centre", 1, 1),
    ("on the right", 2, 1),
    ("in the bottom left corner", 0, 2),
    ("at the bottom", 1, 2),
    ("in the bottom right corner", 2, 2),
)
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
PLURALS = {"cross": "crosses"}

DOMAINS: dict[str, dict[str, tuple]] = {
    "generic": {
        "colours": ("red", "green", "blue", "yellow", "white", "black"),
        "shapes": ("circle", "square", "triangle"),
        "textures": ("solid",),  # "solid" is drawn but never named
        "counts": (1,),
        "sizes": SIZES,
        "positions": tuple(p[0] for p in POSITIONS),
    },
    "domain": {
        "colours": ("teal", "magenta", "orange", "purple", "pink", "brown"),
        "shapes": ("star", "cross", "ring", "hexagon"),
        "textures": ("solid", "striped", "dotted"),
        "counts": (1, 2, 3),  # several copies of one small object in one cell
        "sizes": SIZES,
        "positions": tuple(p[0] for p in POSITIONS),
    },
}
COUNT_PROBS = {1: 0.6, 2: 0.2, 3: 0.2}

# Caption framings; {o} is the object phrase, {p} its position.
SINGLE_TEMPLATES = (
    "{o} {p}",
    "a picture of {o} {p}",
    "{p} there is {o}",
    "an image with {o} {p}",
    "there is {o} {p}",
    "{o} placed {p}",
)
CLAUSE_JOINERS = (" and ", ", ", " with ", " and also ")
MULTI_PREFIXES = ("", "a picture of ", "an image with ", "there is ")


def domain_words(domain: str) -> set[str]:
    """Caption words that only ``domain`` uses (colours, shapes and their plurals, textures, counts)."""
    _check_domain(domain)
    vocab = DOMAINS[domain]
    words = set(vocab["colours"]) | set(vocab["shapes"]) | {_plural(s) for s in vocab["shapes"]}
    words |= {t for t in vocab["textures"] if t != "solid"}
    words |= {COUNT_WORDS[c] for c in vocab["counts"] if c > 1}
    others = set()
    for name, other in DOMAINS.items():
        if name != domain:
            others |= set(other["colours"]) | set(other["shapes"])
    return words - others


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; known: {sorted(DOMAINS)}")


def _plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


@dataclass(frozen=True)
class SceneObject:
    """One described object of a scene (``count`` copies when > 1)."""

    colour: str
    shape: str
    size: str
    texture: str
    count: int
    cell: int  # index into POSITIONS

    def phrase(self) -> str:
        """``"a large striped teal star"`` / ``"three small orange rings"`` (no position)."""
        texture = "" if self.texture == "solid" else self.texture + " "
        shape = self.shape if self.count == 1 else _plural(self.shape)
        return f"{COUNT_WORDS[self.count]} {self.size} {texture}{self.colour} {shape}"

    @property
    def position(self) -> str:
        return POSITIONS[self.cell][0]


def _sample_objects(rng: np.random.Generator, domain: str, max_objects: int) -> list[SceneObject]:
    vocab = DOMAINS[domain]
    weights = np.arange(1, max_objects + 1, dtype=float)  # more objects → more distinct scenes
    n = int(rng.choice(np.arange(1, max_objects + 1), p=weights / weights.sum()))
    cells = rng.choice(len(POSITIONS), size=n, replace=False)
    counts = vocab["counts"]
    count_p = np.array([COUNT_PROBS[c] for c in counts])
    objects = []
    for cell in cells:
        count = int(rng.choice(counts, p=count_p / count_p.sum()))
        objects.append(
            SceneObject(
                colour=str(rng.choice(vocab["colours"])),
                shape=str(rng.choice(vocab["shapes"])),
                size="small" if count > 1 else str(rng.choice(SIZES)),
                texture=str(rng.choice(vocab["textures"])),
                count=count,
                cell=int(cell),
            )
        )
    return objects


def _captions(rng: np.random.Generator, objects: Sequence[SceneObject], k: int) -> list[str]:
    """``k`` captions of one scene, distinct as far as the framings allow."""
    out: list[str] = []
    seen: set[str] = set()
    for attempt in range(20 * k):
        if len(objects) == 1:
            template = SINGLE_TEMPLATES[int(rng.integers(len(SINGLE_TEMPLATES)))]
            caption = template.format(o=objects[0].phrase(), p=objects[0].position)
        else:
            order = rng.permutation(len(objects))
            clauses = [f"{objects[i].phrase()} {objects[i].position}" for i in order]
            joiner = CLAUSE_JOINERS[int(rng.integers(len(CLAUSE_JOINERS)))]
            prefix = MULTI_PREFIXES[int(rng.integers(len(MULTI_PREFIXES)))]
            if len(clauses) == 2:
                body = clauses[0] + joiner + clauses[1]
            else:
                body = ", ".join(clauses[:-1]) + " and " + clauses[-1]
            caption = prefix + body
        caption = caption.replace("there is two ", "there are two ").replace("there is three ", "there are three ")
        if caption not in seen or attempt >= 19 * k:
            seen.add(caption)
            out.append(caption)
            if len(out) == k:
                break
    return out


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean ``[size, size]`` mask of one shape centred at (cx, cy) with radius r."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=255)
    elif shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        draw.polygon([(cx + rad * np.cos(a), cy + rad * np.sin(a)) for a, rad in zip(angles, radii)], fill=255)
    elif shape == "cross":
        w = r * 0.34
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=255)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=255)
    elif shape == "ring":
        draw.ellipse(box, outline=255, width=max(2, int(round(r * 0.4))))
    elif shape == "hexagon":
        draw.regular_polygon((cx, cy, r), 6, fill=255)
    else:  # pragma: no cover - DOMAINS and this function are kept in step
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(mask) > 127


@functools.lru_cache(maxsize=256)
def _texture(texture: str, colour: tuple[int, int, int], size: int) -> np.ndarray:
    """``[size, size, 3]`` fill of one texture in one colour (cached: do not modify)."""
    base = np.array(colour, dtype=np.float32)
    dark = base * 0.35
    fill = np.empty((size, size, 3), dtype=np.float32)
    fill[:] = base
    period = max(2, size // 16)  # 4 px stripes/dots at 64 px
    yy, xx = np.mgrid[0:size, 0:size]
    if texture == "striped":
        fill[((xx + yy) // period) % 2 == 1] = dark
    elif texture == "dotted":
        fill[((yy // period) % 2 == 1) & ((xx // period) % 2 == 1)] = dark
    fill.setflags(write=False)
    return fill


def _render(rng: np.random.Generator, objects: Sequence[SceneObject], size: int) -> np.ndarray:
    grey = rng.uniform(95, 160)
    tint = rng.uniform(-10, 10, size=3)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)[:, None, None] * rng.uniform(-10, 10)
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = grey + tint
    canvas += ramp
    canvas += rng.uniform(-4, 4, size=(size, size, 3))
    cell = size / 3.0
    for obj in objects:
        _, col, row = POSITIONS[obj.cell]
        cx = (col + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        cy = (row + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        if obj.count == 1:
            radius = (0.44 if obj.size == "large" else 0.28) * cell * rng.uniform(0.9, 1.1)
            centres = [(cx, cy)]
        else:
            radius = 0.17 * cell * rng.uniform(0.95, 1.05)
            offsets = [(-0.26, 0.0), (0.26, 0.0)] if obj.count == 2 else [(0.0, -0.22), (-0.26, 0.2), (0.26, 0.2)]
            centres = [(cx + dx * cell, cy + dy * cell) for dx, dy in offsets]
        mask = np.zeros((size, size), dtype=bool)
        for x, y in centres:
            mask |= _shape_mask(obj.shape, size, x, y, radius)
        canvas[mask] = _texture(obj.texture, RGB[obj.colour], size)[mask]
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def _scene(
    domain: str, seed: int, i: int, image_size: int, captions_per_image: int, max_objects: int
) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng([seed, sorted(DOMAINS).index(domain), i])
    objects = _sample_objects(rng, domain, max_objects)
    captions = _captions(rng, objects, captions_per_image)
    return _render(rng, objects, image_size), captions


def _check_args(
    n_images: int, domain: str, seed: int, image_size: int, captions_per_image: int, max_objects: int
) -> None:
    _check_domain(domain)
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if image_size < 24:
        raise ValueError(f"image_size must be >= 24 pixels, got {image_size}")
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    if not 1 <= max_objects <= len(POSITIONS):
        raise ValueError(f"max_objects must be in [1, {len(POSITIONS)}], got {max_objects}")


def generate(
    n_images: int,
    domain: str = "generic",
    seed: int = 0,
    image_size: int = 64,
    captions_per_image: int = 1,
    max_objects: int = 2,
) -> PairSet:
    """Generate ``n_images`` captioned scenes in memory.

    Args:
        n_images: number of distinct images.
        domain: ``"generic"`` or ``"domain"`` (see :data:`DOMAINS`).
        seed: same seed → identical scenes; scene ``i`` does not depend on ``n_images``.
        image_size: side of the square images in pixels.
        captions_per_image: captions per image (distinct framings where possible).
        max_objects: most objects per scene (each in its own grid cell).

    Returns:
        A :class:`~cliptuner.train.data.PairSet` of ``H×W×3`` uint8 arrays, ids ``"<domain>-00042"``.

    Raises:
        ValueError: unknown domain (the message lists the known ones) or a bad count/size.
    """
    _check_args(n_images, domain, seed, image_size, captions_per_image, max_objects)
    images, captions, image_index, ids = [], [], [], []
    for i in range(n_images):
        pixels, texts = _scene(domain, seed, i, image_size, captions_per_image, max_objects)
        images.append(pixels)
        ids.append(f"{domain}-{i:05d}")
        captions.extend(texts)
        image_index.extend([i] * len(texts))
    return PairSet(
        images=images, captions=captions, image_index=image_index, image_ids=ids, name=f"synthetic-{domain}-seed{seed}"
    )


def _write_images(pairs: PairSet, out_dir: Path) -> list[str]:
    """Write each image as ``out_dir/images/<id>.png``; returns the paths relative to ``out_dir``."""
    folder = out_dir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    relative = []
    for pixels, image_id in zip(pairs.images, pairs.image_ids):
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
        (folder / f"{image_id}.png").write_bytes(buffer.getvalue())
        relative.append(f"images/{image_id}.png")
    return relative


def write_csv(
    out_dir: str | os.PathLike,
    n_images: int,
    domain: str = "generic",
    seed: int = 0,
    image_size: int = 64,
    captions_per_image: int = 1,
    max_objects: int = 2,
) -> Path:
    """Write scenes as PNG files under ``out_dir/images/`` and their pairs as ``out_dir/pairs.csv``.

    Returns:
        The path of ``pairs.csv`` (``image,caption`` with paths relative to it), readable by
        :func:`cliptuner.train.data.load_csv`.
    """
    pairs = generate(n_images, domain, seed, image_size, captions_per_image, max_objects)
    out = Path(out_dir)
    relative = _write_images(pairs, out)
    path = out / "pairs.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["image", "caption"])
        for caption, image_i in zip(pairs.captions, pairs.image_index):
            writer.writerow([relative[image_i], caption])
    return path


def write_karpathy(
    out_dir: str | os.PathLike,
    n_images: int,
    domain: str = "generic",
    seed: int = 0,
    image_size: int = 64,
    captions_per_image: int = 1,
    max_objects: int = 2,
    test_fraction: float = 0.2,
) -> Path:
    """Write scenes as PNG files and a Karpathy-style ``out_dir/dataset.json`` with a seeded train/test split.

    Args:
        test_fraction: share of images in the ``"test"`` split (``round(test_fraction * n_images)``), in [0, 1).

    Returns:
        The path of ``dataset.json``, readable by :func:`cliptuner.train.data.load_karpathy`.
    """
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    pairs = generate(n_images, domain, seed, image_size, captions_per_image, max_objects)
    out = Path(out_dir)
    relative = _write_images(pairs, out)
    n_test = round(test_fraction * n_images)
    test = set(np.random.default_rng([seed, 7919]).permutation(n_images)[:n_test].tolist())
    entries = []
    for i, rel in enumerate(relative):
        pair_ids = pairs.captions_of(i)
        entries.append(
            {
                "filepath": os.path.dirname(rel),
                "filename": os.path.basename(rel),
                "imgid": i,
                "split": "test" if i in test else "train",
                "sentids": pair_ids,
                "sentences": [
                    {
                        "raw": pairs.captions[p],
                        "tokens": pairs.captions[p].replace(",", "").split(),
                        "imgid": i,
                        "sentid": p,
                    }
                    for p in pair_ids
                ],
            }
        )
    path = out / "dataset.json"
    path.write_text(
        json.dumps({"images": entries, "dataset": f"synthetic-{domain}"}, indent=1) + "\n", encoding="utf-8"
    )
    return path
