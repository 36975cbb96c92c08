"""Image–text pair sources and batching for contrastive training.

A :class:`PairSet` holds pairs as *distinct images* plus *captions that point at them*: several captions of one
image (COCO has five) are kept as several pairs of one image, so that

* a held-out split puts all captions of an image on the same side (:meth:`PairSet.split`), and
* a training batch never holds two captions of one image (:class:`UniqueImageBatchSampler`): the contrastive
  loss would otherwise push apart a caption from its own image (a false negative).

Pairs may also carry a *batch group* (:attr:`PairSet.groups`): pairs of one group are trained in one batch, so
that each is a negative for the others. Search feedback uses it for hard negatives: a query paired with the
image chosen, grouped with the results shown above the choice but skipped (each its stored text with its
image), so that the loss pushes the query away from those images (:class:`GroupedBatchSampler`).

Sources: a CSV (``image,caption[,group]``, paths relative to the CSV), a Karpathy-style JSON (Flickr8k/30k, COCO)
or in-memory lists. Loaders check the rows and that image files exist, and raise :class:`DataError` naming the file
and the row; images are decoded only when a batch needs them, with the limits of :mod:`cliptuner.model.images`.

A service reading a PAIRS file a client named gives the loaders ``resolve_image`` (an :data:`ImageResolver`,
e.g. :meth:`cliptuner.serve.access.UriPolicy.local_path`): every image path is passed through it BEFORE the file is
looked at, so a row naming a path outside the allowed folders is refused with the same message whether or not
the file exists, and the resolved path it returns is what gets read. Without it (``cliptuner train``, a local
user reading their own files) image paths are taken as written.

This module imports torch lazily (inside :class:`PairDataset`, :func:`collate_pairs` and :func:`make_loader`),
so that :mod:`cliptuner.train.synthetic` and other torch-free code can build :class:`PairSet` objects. For the same
reason :class:`PairDataset`, :class:`UniqueImageBatchSampler` and :class:`GroupedBatchSampler` implement torch's
map-style dataset and batch sampler protocols (``__getitem__``/``__len__``, ``__iter__``/``__len__``) rather than
subclassing them; ``torch.utils.data.DataLoader`` accepts both.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from cliptuner.model.images import DEFAULT_LIMITS, ImageLimits, ImageSource, decode_image

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)

ImageResolver = Callable[[str, str], "str | os.PathLike"]  # (joined path, label) → path to read; raises ValueError
MAX_REPORTED_ERRORS = 10  # problems listed in one DataError before "… and N more"
NO_GROUP = -1  # PairSet.groups entry of a pair in no batch group
TRAIN_SPLITS = ("train", "restval")  # Karpathy splits that ``split="train"`` selects (COCO custom)


class DataError(ValueError):
    """A pairs file or row cannot be used; the message names the file, the row and the problem."""


def _raise_collected(source: str, problems: list[str]) -> None:
    if not problems:
        return
    shown = problems[:MAX_REPORTED_ERRORS]
    more = f"\n  … and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    raise DataError(f"{source}: {len(problems)} bad row(s):\n  " + "\n  ".join(shown) + more)


def _checked_groups(groups: Sequence[Any], num_pairs: int) -> list[int]:
    """``groups`` as a list of ints, one per pair, each a group id >= 0 or :data:`NO_GROUP`.

    Raises:
        ValueError: the length differs from ``num_pairs``, or an entry is not an int >= -1 (a bool is not an int).
    """
    if len(groups) != num_pairs:
        raise ValueError(f"{len(groups)} groups but {num_pairs} pairs; give one group per pair ({NO_GROUP}: none)")
    checked: list[int] = []
    for pair, group in enumerate(groups):
        if isinstance(group, (bool, np.bool_)) or not isinstance(group, (int, np.integer)) or group < NO_GROUP:
            raise ValueError(f"pair {pair}: group must be an int >= 0, or {NO_GROUP} for no group; got {group!r}")
        checked.append(int(group))
    return checked


@dataclass
class PairSet:
    """Image–caption pairs grouped by distinct image, optionally in batch groups.

    ``groups`` (None: no pair has a group) gives each pair a batch group id, :data:`NO_GROUP` (-1) for none.
    Pairs that share an id >= 0 are trained in one batch (:class:`GroupedBatchSampler`); ids are labels only
    (any ints >= 0, not necessarily contiguous). Within a group, pair order matters: the first pair leads (see
    the sampler).

    Treat a PairSet as immutable: the per-image caption lists are computed once.
    """

    images: list[ImageSource]  # one entry per distinct image: path, encoded bytes, H×W×3 uint8 array or PIL image
    captions: list[str]  # one per pair
    image_index: list[int]  # pair i shows images[image_index[i]]
    image_ids: list[str]  # a name per distinct image (relative filename, id), used in errors and reports
    name: str = ""  # where the pairs came from
    groups: Optional[list[int]] = None  # one per pair: its batch group id >= 0, or NO_GROUP; None: no groups
    gallery: int = 0  # the last this many images have no caption: evaluation ranks every text against them too
    _by_image: list[list[int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.images = list(self.images)
        self.captions = list(self.captions)
        self.image_index = [int(i) for i in self.image_index]
        self.image_ids = [str(i) for i in self.image_ids]
        if len(self.images) != len(self.image_ids):
            raise ValueError(f"{len(self.images)} images but {len(self.image_ids)} image_ids")
        if len(self.captions) != len(self.image_index):
            raise ValueError(f"{len(self.captions)} captions but {len(self.image_index)} image_index entries")
        if self.groups is not None:
            self.groups = _checked_groups(self.groups, len(self.captions))
        by_image: list[list[int]] = [[] for _ in self.images]
        for pair, image in enumerate(self.image_index):
            if not 0 <= image < len(self.images):
                raise ValueError(f"pair {pair}: image_index {image} is outside [0, {len(self.images)})")
            by_image[image].append(pair)
        if (
            isinstance(self.gallery, bool)
            or not isinstance(self.gallery, int)
            or not 0 <= self.gallery <= len(self.images)
        ):
            raise ValueError(f"gallery must be an integer in [0, {len(self.images)}], got {self.gallery!r}")
        captioned = len(self.images) - self.gallery
        lonely = [self.image_ids[i] for i, pairs in enumerate(by_image[:captioned]) if not pairs]
        if lonely:
            raise ValueError(f"{len(lonely)} image(s) without a caption, e.g. {lonely[:3]}")
        described = [self.image_ids[i] for i, pairs in enumerate(by_image[captioned:], captioned) if pairs]
        if described:
            raise ValueError(f"gallery image(s) with a caption, e.g. {described[:3]}: a gallery image has none")
        self._by_image = by_image

    def __len__(self) -> int:
        """Number of pairs (captions)."""
        return len(self.captions)

    @property
    def num_images(self) -> int:
        """Number of distinct images (gallery images included)."""
        return len(self.images)

    @property
    def num_captioned(self) -> int:
        """Number of distinct images with captions (the gallery left out)."""
        return len(self.images) - self.gallery

    def with_gallery(self, images: Sequence[ImageSource], image_ids: Sequence[str]) -> PairSet:
        """These pairs with more gallery images: images without a caption that evaluation ranks every text against
        (a search's other candidates), so that recall@k means what it means in a large index. An image whose id is
        already in the set is left out."""
        known = set(self.image_ids)
        extra = [(image, image_id) for image, image_id in zip(images, image_ids) if image_id not in known]
        return replace(
            self,
            images=self.images + [image for image, _ in extra],
            image_ids=self.image_ids + [image_id for _, image_id in extra],
            gallery=self.gallery + len(extra),
        )

    def captions_of(self, image_i: int) -> list[int]:
        """Pair indices of the captions of distinct image ``image_i``."""
        return list(self._by_image[image_i])

    def captions_per_image(self) -> list[int]:
        """How many captions each distinct image has."""
        return [len(pairs) for pairs in self._by_image]

    def subset_images(self, image_indices: Sequence[int]) -> PairSet:
        """The pairs of some images, re-indexed: image ``image_indices[k]`` becomes image ``k``.

        Pairs keep their original relative order and their groups; a group whose pairs show images on both sides
        keeps the pairs of the chosen images only.

        Raises:
            ValueError: an index is out of range or repeated.
        """
        chosen = [int(old) for old in image_indices]
        for old in chosen:
            if not 0 <= old < self.num_images:
                raise ValueError(f"image index {old} is outside [0, {self.num_images})")
        repeated = sorted({old for old in chosen if chosen.count(old) > 1})
        if repeated:
            raise ValueError(f"image index {repeated[0]} is repeated")
        gallery = [old for old in chosen if old >= self.num_captioned]  # gallery images stay last
        chosen = [old for old in chosen if old < self.num_captioned] + gallery
        new_of_old = {old: k for k, old in enumerate(chosen)}
        pairs = sorted(p for old in new_of_old for p in self._by_image[old])
        return PairSet(
            images=[self.images[old] for old in chosen],
            captions=[self.captions[p] for p in pairs],
            image_index=[new_of_old[self.image_index[p]] for p in pairs],
            image_ids=[self.image_ids[old] for old in chosen],
            name=self.name,
            groups=None if self.groups is None else [self.groups[p] for p in pairs],
            gallery=len(gallery),
        )

    def split(self, eval_fraction: float, seed: int) -> tuple[PairSet, PairSet]:
        """Hold out a seeded share of the *images* (with all their captions).

        Args:
            eval_fraction: share of distinct images held out, in (0, 1); ``round(eval_fraction * num_images)``
                images are held out, at least one.
            seed: the same seed gives the same split.

        Returns:
            ``(train, held_out)``; both keep the original image order and the pairs' groups (a group is split
            with its images: each side keeps its own pairs of it).

        Raises:
            ValueError: the fraction is outside (0, 1), or either side would be empty.
        """
        if not 0 < eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
        n_held = max(1, round(eval_fraction * self.num_captioned))  # the gallery stays out
        if self.num_captioned - n_held < 1:
            raise ValueError(
                f"cannot hold out {n_held} of {self.num_captioned} image(s) (eval_fraction={eval_fraction}) "
                "and keep at least one for training; give more images or eval data"
            )
        order = np.random.default_rng(seed).permutation(self.num_captioned)
        held = sorted(int(i) for i in order[:n_held])
        train = sorted(int(i) for i in order[n_held:])
        return self.subset_images(train), self.subset_images(held)


def _clean(text: Any) -> str:
    return text.strip() if isinstance(text, str) else ""


class _PairsBuilder:
    """Collects pairs read from a file: distinct images by resolved path, captions pointing at them."""

    def __init__(self, resolve_image: Optional[ImageResolver] = None) -> None:
        self.resolve_image = resolve_image
        self.images: list[str] = []
        self.image_ids: list[str] = []
        self.captions: list[str] = []
        self.image_index: list[int] = []
        self.groups: list[int] = []
        self.gallery: dict[str, str] = {}  # resolved path -> image id of the gallery rows (no caption)
        self._index_of: dict[str, int] = {}

    def where(self, resolved: str) -> str:
        """Where a missing file was looked for, for the message: only without a resolver (a local user's files)."""
        return "" if self.resolve_image is not None else f" (looked at {resolved})"

    def allowed(self, joined: str, label: str) -> str:
        """The path to read for ``joined``: through ``resolve_image`` when set.

        Raises:
            ValueError: ``resolve_image`` refuses it (the message names ``label``).
        """
        return joined if self.resolve_image is None else os.fspath(self.resolve_image(joined, label))

    def image(self, resolved: str, image_id: str) -> Optional[int]:
        """The index of the image file ``resolved``, registered on first sight; None when the file is missing."""
        if resolved not in self._index_of:
            if not os.path.isfile(resolved):
                return None
            self._index_of[resolved] = len(self.images)
            self.images.append(resolved)
            self.image_ids.append(image_id)
        return self._index_of[resolved]

    def add(self, image: int, captions: Sequence[str], group: int = NO_GROUP) -> None:
        self.captions.extend(captions)
        self.image_index.extend([image] * len(captions))
        self.groups.extend([group] * len(captions))

    def build(self, name: str, grouped: bool = False) -> PairSet:
        """The pairs read; with ``grouped`` (the file has a group column) their groups too; gallery images last (one
        that also has a caption is a captioned image)."""
        gallery = {path: image_id for path, image_id in self.gallery.items() if path not in self._index_of}
        return PairSet(
            images=self.images + list(gallery),
            captions=self.captions,
            image_index=self.image_index,
            image_ids=self.image_ids + list(gallery.values()),
            name=name,
            groups=self.groups if grouped else None,
            gallery=len(gallery),
        )


def _group_cell(cell: str) -> Optional[int]:
    """The group of a CSV cell: empty → :data:`NO_GROUP`, ASCII digits → that id; None for anything else."""
    cell = cell.strip()
    if not cell:
        return NO_GROUP
    return int(cell) if cell.isascii() and cell.isdigit() else None


def load_csv(path: str | os.PathLike, resolve_image: Optional[ImageResolver] = None) -> PairSet:
    """Read ``image,caption`` rows; image paths are relative to the CSV's folder (absolute paths allowed).

    Rows naming the same image path are captions of one image. An optional ``group`` column gives each row's
    batch group (:attr:`PairSet.groups`): an integer >= 0, or an empty cell for none; without that column the
    set has no groups (``groups`` is None). An optional ``gallery`` column marks with ``1`` a row without a caption
    whose image is a gallery image (:attr:`PairSet.gallery`: evaluation ranks every text against it; training
    never sees it). Other columns are ignored, blank lines skipped. Image files must
    exist; they are decoded later, when a batch needs them.

    Args:
        path: the CSV.
        resolve_image: checks each image path before the file is looked at (see the module docstring).

    Raises:
        DataError: unreadable file, missing ``image``/``caption`` columns, no rows, or bad rows (each named by
            its 1-based line number: empty image, empty caption, a group that is not an integer >= 0, a path
            ``resolve_image`` refuses, missing image file).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{str(path)!r}: no such pairs file")
    root = path.resolve().parent
    pairs = _PairsBuilder(resolve_image)
    problems: list[str] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{str(path)!r}: empty file; expected a header 'image,caption'")
            columns = [c.strip().lower() for c in header]
            missing = [c for c in ("image", "caption") if c not in columns]
            if missing:
                raise DataError(
                    f"{str(path)!r}: missing column(s) {missing}; found {header}; "
                    "expected a header with 'image' and 'caption'"
                )
            image_col, caption_col = columns.index("image"), columns.index("caption")
            group_col = columns.index("group") if "group" in columns else None
            gallery_col = columns.index("gallery") if "gallery" in columns else None
            line = reader.line_num
            for row in reader:
                start, line = line + 1, reader.line_num  # a quoted caption may span several lines
                if not any(cell.strip() for cell in row):
                    continue
                image = _clean(row[image_col]) if image_col < len(row) else ""
                caption = _clean(row[caption_col]) if caption_col < len(row) else ""
                if not image:
                    problems.append(f"line {start}: empty image path")
                    continue
                in_gallery = gallery_col is not None and gallery_col < len(row) and row[gallery_col].strip() == "1"
                if in_gallery and caption:
                    problems.append(f"line {start}: a gallery row (gallery 1) has no caption, got {caption!r}")
                    continue
                if not caption and not in_gallery:
                    problems.append(f"line {start}: empty caption for image {image!r}")
                    continue
                group = NO_GROUP
                if group_col is not None:
                    cell = row[group_col] if group_col < len(row) else ""
                    group = _group_cell(cell)
                    if group is None:
                        problems.append(
                            f"line {start}: group {cell.strip()!r} is not an integer >= 0 (leave it empty for no group)"
                        )
                        continue
                resolved = os.path.normpath(Path(image) if os.path.isabs(image) else root / image)
                try:
                    resolved = pairs.allowed(resolved, f"line {start}: image {image!r}")
                except ValueError as exc:
                    problems.append(str(exc))
                    continue
                if in_gallery:
                    if not os.path.isfile(resolved):
                        problems.append(f"line {start}: image file {image!r} not found{pairs.where(resolved)}")
                    else:
                        pairs.gallery.setdefault(resolved, image)
                    continue
                index = pairs.image(resolved, image)
                if index is None:
                    problems.append(f"line {start}: image file {image!r} not found{pairs.where(resolved)}")
                    continue
                pairs.add(index, [caption], group)
    except UnicodeDecodeError as exc:
        raise DataError(f"{str(path)!r}: not UTF-8 text ({exc})") from exc
    except csv.Error as exc:
        raise DataError(f"{str(path)!r}: line {reader.line_num}: malformed CSV ({exc})") from exc
    _raise_collected(repr(str(path)), problems)
    if not pairs.captions:
        raise DataError(f"{str(path)!r}: no pairs after the header")
    return pairs.build(str(path), grouped=group_col is not None)


def load_karpathy(
    path: str | os.PathLike,
    split: Optional[str] = None,
    image_root: Optional[str | os.PathLike] = None,
    resolve_image: Optional[ImageResolver] = None,
) -> PairSet:
    """Read a Karpathy-style JSON (``dataset_flickr8k.json``, ``dataset_flickr30k.json``, ``dataset_coco.json``).

    Each entry of ``images`` has ``filename``, optionally ``filepath`` (COCO: ``train2014``/``val2014``), a
    ``split`` and ``sentences`` with a ``raw`` caption each. The image file is
    ``image_root / filepath / filename``.

    Args:
        path: the JSON file.
        split: keep entries of this split only; ``"train"`` also keeps ``"restval"``; None keeps all.
        image_root: folder the image paths are relative to (default: the JSON's folder).
        resolve_image: checks each image path before the file is looked at (see the module docstring).

    Raises:
        DataError: unreadable JSON, wrong layout, no entry of ``split`` (the message lists the splits present),
            or bad entries (named by index and filename: no filename, no sentences, empty caption, a path
            ``resolve_image`` refuses, missing file).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{str(path)!r}: no such pairs file")
    try:
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{str(path)!r}: not valid JSON ({exc})") from exc
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise DataError(f"{str(path)!r}: expected a Karpathy-style object with an 'images' list")
    root = Path(image_root) if image_root is not None else path.resolve().parent
    wanted = None if split is None else (set(TRAIN_SPLITS) if split == "train" else {split})

    pairs = _PairsBuilder(resolve_image)
    problems: list[str] = []
    present: set[str] = set()
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.append(f"image {n}: expected an object, got {type(entry).__name__}")
            continue
        entry_split = entry.get("split")
        present.add(str(entry_split))
        if wanted is not None and entry_split not in wanted:
            continue
        filename = _clean(entry.get("filename"))
        if not filename:
            problems.append(f"image {n}: no filename")
            continue
        label = f"image {n} ({filename!r})"
        sentences = entry.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            problems.append(f"{label}: no sentences")
            continue
        raws = [_clean(s.get("raw")) if isinstance(s, dict) else "" for s in sentences]
        empty = [k for k, raw in enumerate(raws) if not raw]
        if empty:
            problems.append(f"{label}: sentence(s) {empty} have no 'raw' caption")
            continue
        relative = os.path.join(_clean(entry.get("filepath")), filename)
        resolved = os.path.normpath(root / relative)
        try:
            resolved = pairs.allowed(resolved, label)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        index = pairs.image(resolved, os.path.normpath(relative))
        if index is None:
            problems.append(f"{label}: image file not found{pairs.where(resolved)}")
            continue
        pairs.add(index, raws)
    _raise_collected(repr(str(path)), problems)
    if not pairs.captions:
        if wanted is not None:
            raise DataError(f"{str(path)!r}: no images in split {split!r}; splits present: {sorted(present)}")
        raise DataError(f"{str(path)!r}: no images")
    return pairs.build(f"{path}:{split}" if split else str(path))


def load_pairs(
    path: str | os.PathLike, split: Optional[str] = None, resolve_image: Optional[ImageResolver] = None
) -> PairSet:
    """Load a PAIRS file by its suffix: ``.csv`` (:func:`load_csv`) or ``.json`` (:func:`load_karpathy`); a stream
    (tar shards, parquet: :mod:`cliptuner.train.streaming`) is read whole into memory, up to its limit.

    Raises:
        DataError: another suffix, or ``split`` given for a CSV or a stream (they have no split).
    """
    from cliptuner.train.streaming import is_stream_spec, load_stream_pairs

    if is_stream_spec(path):
        if split is not None:
            raise DataError(f"{str(path)!r}: a stream has no split; pass split=None (got {split!r})")
        return load_stream_pairs(path, resolve_image)
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        if split is not None:
            raise DataError(f"{str(path)!r}: a CSV has no split; pass split=None (got {split!r})")
        return load_csv(path, resolve_image)
    if suffix == ".json":
        return load_karpathy(path, split=split, resolve_image=resolve_image)
    raise DataError(
        f"{str(path)!r}: unknown pairs format {suffix or '(no suffix)'!r}; "
        "give a .csv (image,caption) or a Karpathy-style .json"
    )


def concat_pairs(sets: Sequence[PairSet], name: str = "") -> PairSet:
    """The pairs of several sets as one: images and pairs in order (every gallery image after the captioned ones),
    batch groups renumbered so that they stay apart.

    An image that two sets share (the same image id) is kept twice: each set's images stay its own.

    Raises:
        ValueError: no sets.
    """
    if not sets:
        raise ValueError("concat_pairs needs at least one PairSet")
    images, captions, image_index, image_ids, groups = [], [], [], [], []
    gallery_images, gallery_ids = [], []  # every part's gallery, after all the captioned images
    grouped = any(s.groups is not None for s in sets)
    next_group = 0
    for part in sets:
        offset = len(images)
        images.extend(part.images[: part.num_captioned])
        image_ids.extend(part.image_ids[: part.num_captioned])
        gallery_images.extend(part.images[part.num_captioned :])
        gallery_ids.extend(part.image_ids[part.num_captioned :])
        captions.extend(part.captions)
        image_index.extend(i + offset for i in part.image_index)
        if grouped:
            own = part.groups if part.groups is not None else [NO_GROUP] * len(part)
            groups.extend(g if g == NO_GROUP else g + next_group for g in own)
            next_group = max([g + 1 for g in groups if g != NO_GROUP], default=next_group)
    return PairSet(
        images=images + gallery_images,
        captions=captions,
        image_index=image_index,
        image_ids=image_ids + gallery_ids,
        name=name or " + ".join(s.name for s in sets),
        groups=groups if grouped else None,
        gallery=len(gallery_images),
    )


def from_memory(
    images: Sequence[ImageSource],
    captions: Sequence[str],
    image_ids: Optional[Sequence[str]] = None,
    name: str = "memory",
    groups: Optional[Sequence[int]] = None,
) -> PairSet:
    """Pairs given one per item; items that share an ``image_id`` are captions of one image.

    For a shared id the first item's image is kept (the others are not compared).

    Args:
        images: one image per pair.
        captions: one caption per pair.
        image_ids: one id per pair (default: every pair its own image, ids ``"0"``, ``"1"``, …).
        name: a name for the set.
        groups: one batch group per pair (:attr:`PairSet.groups`; :data:`NO_GROUP` for none); None: no groups.

    Raises:
        ValueError: lengths differ, a caption or id is empty (named by its index), or a group is not an int >= -1.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if image_ids is None:
        image_ids = [str(i) for i in range(len(images))]
    elif len(image_ids) != len(captions):
        raise ValueError(f"{len(image_ids)} image_ids but {len(captions)} captions")
    if groups is not None and len(groups) != len(captions):
        raise ValueError(f"{len(groups)} groups but {len(captions)} captions")
    distinct: list[ImageSource] = []
    ids: list[str] = []
    index_of: dict[str, int] = {}
    clean: list[str] = []
    image_index: list[int] = []
    for i, (image, caption, image_id) in enumerate(zip(images, captions, image_ids)):
        text = _clean(caption)
        if not text:
            raise ValueError(f"pair {i}: empty caption {caption!r}")
        key = str(image_id)
        if not key:
            raise ValueError(f"pair {i}: empty image id")
        if key not in index_of:
            index_of[key] = len(distinct)
            distinct.append(image)
            ids.append(key)
        clean.append(text)
        image_index.append(index_of[key])
    if not clean:
        raise ValueError("no pairs given")
    return PairSet(
        images=distinct,
        captions=clean,
        image_index=image_index,
        image_ids=ids,
        name=name,
        groups=None if groups is None else list(groups),
    )


class PairDataset:
    """Map-style dataset over the pairs of a :class:`PairSet` (a ``torch.utils.data.Dataset`` by protocol).

    Item ``i`` (a pair index) is ``(image [3, H, W] float tensor, token ids [ctx] long tensor, image index)``.

    Args:
        pairs: the pairs.
        transform: PIL image → tensor ``[3, H, W]`` (``ClipBundle.preprocess_train`` / ``preprocess_val``).
        tokenizer: ``list[str]`` → ``LongTensor [batch, ctx]``.
        limits: image size limits checked before decoding.
        cache_images: keep decoded PIL images in memory (small sets; each DataLoader worker has its own cache).
    """

    def __init__(
        self,
        pairs: PairSet,
        transform: Callable,
        tokenizer: Callable,
        limits: ImageLimits = DEFAULT_LIMITS,
        cache_images: bool = False,
    ) -> None:
        self.pairs = pairs
        self.transform = transform
        self.tokenizer = tokenizer
        self.limits = limits
        self.cache_images = cache_images
        self._cache: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def image(self, image_i: int) -> Image.Image:
        """The decoded RGB image ``image_i``."""
        cached = self._cache.get(image_i)
        if cached is not None:
            return cached
        image = decode_image(self.pairs.images[image_i], self.limits, name=self.pairs.image_ids[image_i])
        if self.cache_images:
            self._cache[image_i] = image
        return image

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image_i = self.pairs.image_index[i]
        pixels = self.transform(self.image(image_i))  # [3, H, W]
        tokens = self.tokenizer([self.pairs.captions[i]])[0]  # [ctx]
        return pixels, tokens, image_i


def collate_pairs(batch: Sequence[tuple[Any, Any, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack items of :class:`PairDataset` into ``(images [B,3,H,W], texts [B,ctx] long, image_index [B] long)``."""
    import torch

    images = torch.stack([item[0] for item in batch])  # [B, 3, H, W]
    texts = torch.stack([torch.as_tensor(item[1]) for item in batch]).long()  # [B, ctx]
    index = torch.tensor([int(item[2]) for item in batch], dtype=torch.long)  # [B]
    return images, texts, index


def _check_sampling(batch_size: int, seed: int, drop_last: bool, num_replicas: int, rank: int) -> None:
    """The argument checks the batch samplers share."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
    if num_replicas > 1 and not drop_last:
        raise ValueError("drop_last=False is not supported with num_replicas > 1: ranks would get uneven batches")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def _check_global_batch(batch_size: int, num_replicas: int, num_images: int) -> int:
    """``batch_size * num_replicas``, which a batch of unique images needs that many distinct images for."""
    global_batch = batch_size * num_replicas
    if global_batch > num_images:
        raise ValueError(
            f"batch_size {batch_size} x {num_replicas} replica(s) = {global_batch} is larger than "
            f"the {num_images} distinct images; no batch can hold unique images"
        )
    return global_batch


class _EpochPlanned:
    """What the batch samplers share: a plan of global batches per epoch, made once, and this rank's slice of each.

    A subclass sets ``batch_size``, ``num_replicas``, ``rank``, ``epoch``, ``_plan_epoch`` (None) and ``_plan`` and
    makes an epoch's plan in ``_make_plan``.
    """

    batch_size: int
    num_replicas: int
    rank: int
    epoch: int
    _plan_epoch: Optional[int]
    _plan: list[list[int]]

    def _make_plan(self, epoch: int) -> list[list[int]]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` (call before iterating, on every rank)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for batch in self._global_batches():
            yield batch[lo:hi] if self.num_replicas > 1 else list(batch)

    @staticmethod
    def _in_order(
        batches: list[list[int]], global_batch: int, drop_last: bool, rng: np.random.Generator
    ) -> list[list[int]]:
        """An epoch's plan from filled batches: each shuffled inside, the full ones in random order, then (unless
        ``drop_last``) the short ones, longest first."""
        for batch in batches:
            rng.shuffle(batch)
        full = [b for b in batches if len(b) == global_batch]
        full = [full[i] for i in rng.permutation(len(full))]
        if drop_last:
            return full
        return full + sorted((b for b in batches if len(b) < global_batch), key=len, reverse=True)

    def _global_batches(self) -> list[list[int]]:
        if self._plan_epoch != self.epoch:
            self._plan = self._make_plan(self.epoch)
            self._plan_epoch = self.epoch
        return self._plan


class UniqueImageBatchSampler(_EpochPlanned):
    """Batches of pair indices in which no two pairs share an image (a ``torch`` batch sampler by protocol).

    Captions of one image in one batch would be false negatives for the contrastive loss. Each epoch (seeded by
    ``seed + epoch``) uses every pair at most once. Every image's pairs go to distinct batches, dealt from
    freshly shuffled batch orders, so images with many captions are spread over the epoch. With
    ``drop_last=True`` the epoch has the largest number of full batches the caption counts allow
    (``B`` with ``sum(min(captions_i, B)) >= B * global_batch``), which uses all pairs or nearly so unless a few
    images hold most captions; the pairs left out are chosen at random each epoch. With ``drop_last=False`` the
    remaining pairs follow in smaller batches (still unique images).

    With ``num_replicas > 1`` each global batch of ``batch_size * num_replicas`` pairs is cut into contiguous
    slices and rank ``r`` yields slice ``r``; all ranks yield the same number of batches (DDP).

    Args:
        image_index: pair → image id (``PairSet.image_index``).
        batch_size: pairs per batch on this rank.
        seed: base seed; call :meth:`set_epoch` each epoch for a new order.
        drop_last: only full batches (required when ``num_replicas > 1``).
        num_replicas: number of DDP ranks.
        rank: this rank.

    Raises:
        ValueError: no pairs, ``batch_size * num_replicas`` larger than the number of distinct images, bad rank,
            or ``drop_last=False`` with several replicas.
    """

    def __init__(
        self,
        image_index: Sequence[int],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        _check_sampling(batch_size, seed, drop_last, num_replicas, rank)
        groups: dict[int, list[int]] = {}
        for pair, image in enumerate(image_index):
            groups.setdefault(int(image), []).append(pair)
        if not groups:
            raise ValueError("no pairs to sample")
        self.global_batch = _check_global_batch(batch_size, num_replicas, len(groups))
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._groups = [np.asarray(pairs, dtype=np.int64) for pairs in groups.values()]
        self._counts = np.array([len(g) for g in self._groups], dtype=np.int64)
        self._full_batches = self._max_full_batches()
        self._plan_epoch: Optional[int] = None
        self._plan: list[list[int]] = []

    def _max_full_batches(self) -> int:
        # f(B) = sum(min(c_i, B)) - B * G is concave with f(0) = 0, so {B : f(B) >= 0} is an interval [0, B*].
        lo, hi = 1, int(self._counts.sum()) // self.global_batch  # f(1) >= 0 since #images >= G
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if int(np.minimum(self._counts, mid).sum()) >= mid * self.global_batch:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def __len__(self) -> int:
        if self.drop_last:
            return self._full_batches
        return len(self._global_batches())

    def _make_plan(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng(self.seed + epoch)
        groups = [rng.permutation(g) for g in self._groups]
        order = rng.permutation(len(groups))
        n_full, size = self._full_batches, self.global_batch
        take = np.minimum(self._counts, n_full)
        excess = int(take.sum()) - n_full * size
        if excess:  # leave out `excess` of the eligible pairs, chosen uniformly
            slots = rng.choice(int(take.sum()), size=excess, replace=False)
            owners = np.searchsorted(np.cumsum(take), slots, side="right")
            take = take - np.bincount(owners, minlength=len(take))
        full = _deal([groups[i][: take[i]] for i in order], n_full, rng)
        for batch in full:
            rng.shuffle(batch)
        full = [full[i] for i in rng.permutation(n_full)]
        if self.drop_last:
            return full
        rest = [groups[i][take[i] :] for i in order if len(groups[i]) > take[i]]
        if not rest:
            return full
        n_rest = max(max(len(r) for r in rest), math.ceil(sum(len(r) for r in rest) / size))
        partial = _deal(rest, n_rest, rng)
        for batch in partial:
            rng.shuffle(batch)
        return full + sorted(partial, key=len, reverse=True)


def _deal(runs: Sequence[np.ndarray], n_batches: int, rng: np.random.Generator) -> list[list[int]]:
    """Deal the pairs of each image (a run, at most ``n_batches`` long) to distinct batches, round-robin.

    Batches are visited in a fresh random order each round, so batch sizes differ by at most one and no two
    images share the same set of batches systematically.
    """
    batches: list[list[int]] = [[] for _ in range(n_batches)]
    cycle = rng.permutation(n_batches).tolist()
    pos = 0
    for run in runs:
        used: list[int] = []
        for pair in run.tolist():
            if pos == n_batches:  # new round: batches this image already used go last, so it cannot meet them
                cycle = rng.permutation(n_batches).tolist()
                if used:
                    taken = set(used)
                    cycle = [b for b in cycle if b not in taken] + [b for b in cycle if b in taken]
                pos = 0
            b = cycle[pos]
            pos += 1
            batches[b].append(pair)
            used.append(b)
    return batches


class GroupedBatchSampler(_EpochPlanned):
    """Batches of pair indices that keep batch groups together and images unique (a ``torch`` batch sampler by
    protocol).

    Why: the contrastive loss makes every other pair of a batch a negative. The pairs of a group must meet (a
    query paired with the image chosen, and the results skipped above the choice, whose images the query must be
    pushed away from), so a group goes into one batch; and two captions of one image in a batch would be false
    negatives, so no batch shows an image twice.

    Units: the pairs of a group (one id >= 0 in ``groups``) are one unit, in pair order; the first one *leads*
    (put the query pair first). A pair without a group is a unit of its own. Pairs that could never be in their
    group's batch are left out of every epoch (logged once): a later pair of an image the group already shows
    (that image is in the group's batch anyway), and the pairs past the first ``batch_size * num_replicas`` of a
    group (a group larger than the batch is cut).

    Each epoch (seeded by ``seed + epoch``) shuffles the units and fills global batches of
    ``batch_size * num_replicas`` pairs one after another. Each batch is offered the units still waiting (those
    that waited longest first) and then the fresh ones, in shuffled order:

    * a unit whose lead's image is already in the batch waits for a later batch;
    * otherwise its pairs whose image is already in the batch are left out for the epoch (that image is a
      negative in the batch anyway), and the others join together if they fit in the room left;
    * a unit too big for the room left waits too, unless ``batch_size * num_replicas`` units were already too
      big for this batch or no unit is left to offer: then it is cut to the room left (its leading pairs join,
      the rest are left out for the epoch).

    So every pair is used at most once per epoch, and the pairs of a group used in an epoch sit in one batch with
    their lead. Full batches come in random order, their pairs shuffled. ``drop_last=True`` yields the full
    batches only; the partial ones (left at the end when the units still waiting clash with each other) are left
    out, and with ``drop_last=False`` they follow, largest first. The number of batches may differ slightly
    between epochs: ``len()`` gives that of the epoch set by :meth:`set_epoch`.

    With ``num_replicas > 1`` each global batch is cut into contiguous slices and rank ``r`` yields slice ``r``;
    all ranks yield the same number of batches, and the loss gathers the features of every rank, so a group's
    pairs meet whichever slices they fall in.

    Args:
        image_index: pair → image id (``PairSet.image_index``).
        groups: pair → batch group id, :data:`NO_GROUP` for none (``PairSet.groups``).
        batch_size: pairs per batch on this rank.
        seed: base seed; call :meth:`set_epoch` each epoch for a new order.
        drop_last: only full batches (required when ``num_replicas > 1``).
        num_replicas: number of DDP ranks.
        rank: this rank.

    Raises:
        ValueError: no pairs, ``groups`` not one int >= -1 per pair, ``batch_size * num_replicas`` larger than the
            number of distinct images, bad rank, or ``drop_last=False`` with several replicas.
    """

    def __init__(
        self,
        image_index: Sequence[int],
        groups: Sequence[int],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        _check_sampling(batch_size, seed, drop_last, num_replicas, rank)
        self._image = [int(i) for i in image_index]
        groups = _checked_groups(groups, len(self._image))
        if not self._image:
            raise ValueError("no pairs to sample")
        self.global_batch = _check_global_batch(batch_size, num_replicas, len(set(self._image)))
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._units = self._make_units(groups)
        self._plan_epoch: Optional[int] = None
        self._plan: list[list[int]] = []

    def _make_units(self, groups: list[int]) -> list[list[int]]:
        """One unit per group (pairs in pair order, distinct images, at most a global batch) or ungrouped pair."""
        members: dict[int, list[int]] = {}
        units: list[list[int]] = []
        for pair, group in enumerate(groups):
            if group == NO_GROUP:
                units.append([pair])
            else:
                members.setdefault(group, []).append(pair)
        repeated = cut = 0
        for pairs in members.values():
            unit: list[int] = []
            shown: set[int] = set()
            for pair in pairs:
                if self._image[pair] not in shown:
                    shown.add(self._image[pair])
                    unit.append(pair)
            repeated += len(pairs) - len(unit)
            cut += max(0, len(unit) - self.global_batch)
            units.append(unit[: self.global_batch])
        if repeated or cut:
            logger.warning(
                "%d grouped pair(s) show an image their group already shows and %d are past the first %d of their "
                "group: they are not trained on (a group meets in one batch of unique images)",
                repeated,
                cut,
                self.global_batch,
            )
        return units

    def __len__(self) -> int:
        return len(self._global_batches())

    def _make_plan(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng(self.seed + epoch)
        order = [self._units[i] for i in rng.permutation(len(self._units))]
        batches = _GroupPacker(order, self._image, self.global_batch).batches()
        return self._in_order(batches, self.global_batch, self.drop_last, rng)


class _GroupPacker:
    """Fills the global batches of one epoch from units in order, by the rule of :class:`GroupedBatchSampler`.

    Units that wait are kept by their lead's image, oldest first, and a batch is offered only the oldest unit of
    each such image: the others could not join once it has (they share its lead's image). Such an offer is
    refused only for a lead's image already in the batch (at most ``size`` images) or for room (at most ``size``
    times before a unit is cut to fit), so a batch makes O(``size``) offers to waiting units however many wait;
    a fresh unit is offered once, then joins or waits.
    """

    def __init__(self, units: Sequence[list[int]], image_of: Sequence[int], size: int) -> None:
        self.fresh = deque(units)
        self.waiting: dict[int, deque[list[int]]] = {}  # lead's image → units waiting, oldest first
        self.image_of = image_of
        self.size = size

    def batches(self) -> list[list[int]]:
        """Batches until every unit has been placed (each batch places at least one: the first unit offered)."""
        batches = []
        while self.fresh or self.waiting:
            batches.append(self._fill())
        return batches

    def _fill(self) -> list[int]:
        batch: list[int] = []
        images: set[int] = set()
        too_big: list[tuple[list[int], Optional[int]]] = []  # units refused for room only, with their waiting key
        emptied: list[int] = []
        for key, queue in self.waiting.items():
            if len(batch) == self.size:
                break
            if self._offer(queue[0], batch, images, too_big, key):
                queue.popleft()
                if not queue:
                    emptied.append(key)
        refused: list[list[int]] = []
        while self.fresh and len(batch) < self.size:
            unit = self.fresh.popleft()
            if not self._offer(unit, batch, images, too_big, None):
                refused.append(unit)
        if len(batch) < self.size:  # nothing left to offer: cut the first unit refused for room that still fits
            for unit, key in too_big:
                if self._join(unit, batch, images, cut=True):
                    if key is None:
                        refused.remove(unit)
                    else:
                        self.waiting[key].popleft()
                        if not self.waiting[key]:
                            emptied.append(key)
                    break
        for key in emptied:
            del self.waiting[key]
        for unit in refused:
            self.waiting.setdefault(self.image_of[unit[0]], deque()).append(unit)
        return batch

    def _offer(
        self,
        unit: list[int],
        batch: list[int],
        images: set[int],
        too_big: list[tuple[list[int], Optional[int]]],
        key: Optional[int],
    ) -> bool:
        """Offer ``unit`` to the batch; True when it joined. A unit refused for room only goes to ``too_big``."""
        if self.image_of[unit[0]] in images:
            return False
        if self._join(unit, batch, images, cut=len(too_big) >= self.size):
            return True
        too_big.append((unit, key))
        return False

    def _join(self, unit: list[int], batch: list[int], images: set[int], cut: bool) -> bool:
        """Add the pairs of ``unit`` whose image the batch lacks, when they fit (or cut to the room, with ``cut``)."""
        if self.image_of[unit[0]] in images:
            return False
        joining = [p for p in unit if self.image_of[p] not in images]
        room = self.size - len(batch)
        if len(joining) > room:
            if not cut:
                return False
            joining = joining[:room]
        batch.extend(joining)
        images.update(self.image_of[p] for p in joining)
        return True


def make_loader(
    pairs: PairSet,
    transform: Callable,
    tokenizer: Callable,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_workers: int = 0,
    drop_last: Optional[bool] = None,
    limits: ImageLimits = DEFAULT_LIMITS,
    num_replicas: int = 1,
    rank: int = 0,
    cache_images: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader of ``(images [B,3,H,W] float, texts [B,ctx] long, image_index [B] long)`` batches.

    Args:
        pairs: the pairs.
        transform: PIL image → tensor ``[3, H, W]``.
        tokenizer: ``list[str]`` → ``LongTensor [batch, ctx]``.
        batch_size: pairs per batch (per rank).
        seed: seed of the batch order (shuffle) and of the loader's worker seeds.
        shuffle: True: training batches of unique images (call ``loader.batch_sampler.set_epoch``), from
            :class:`GroupedBatchSampler` when a pair has a batch group (``pairs.groups`` holds an id >= 0), else
            :class:`UniqueImageBatchSampler`. False: pairs in order (evaluation, encoding); images may repeat
            within a batch and groups are ignored.
        num_workers: DataLoader worker processes.
        drop_last: keep only full batches; default True when shuffling, False otherwise.
        limits: image size limits.
        num_replicas: DDP ranks (shuffle only).
        rank: this rank (shuffle only).
        cache_images: keep decoded images in memory.

    Raises:
        ValueError: see the samplers; ``num_replicas > 1`` without shuffle.
    """
    import torch

    dataset = PairDataset(pairs, transform, tokenizer, limits=limits, cache_images=cache_images)
    generator = torch.Generator().manual_seed(seed)
    if shuffle:
        options = dict(
            seed=seed, drop_last=True if drop_last is None else drop_last, num_replicas=num_replicas, rank=rank
        )
        if pairs.groups is not None and any(group != NO_GROUP for group in pairs.groups):
            sampler = GroupedBatchSampler(pairs.image_index, pairs.groups, batch_size, **options)
        else:
            sampler = UniqueImageBatchSampler(pairs.image_index, batch_size, **options)
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_pairs, generator=generator
        )
    if num_replicas > 1:
        raise ValueError("num_replicas > 1 needs shuffle=True (sequential loading is for evaluation on one rank)")
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        drop_last=bool(drop_last),
        collate_fn=collate_pairs,
        generator=generator,
    )


def load_split(path: str | os.PathLike, split: str, resolve_image: Optional[ImageResolver] = None) -> PairSet:
    """A PAIRS file for one role: a Karpathy JSON gives its ``split`` (``train`` includes ``restval``); a CSV
    is used whole, and so is a stream, read into memory (:func:`cliptuner.train.streaming.load_stream_pairs`).
    ``resolve_image``: see the module docstring."""
    from cliptuner.train.streaming import is_stream_spec, load_stream_pairs

    if is_stream_spec(path):
        return load_stream_pairs(path, resolve_image)
    if Path(path).suffix.lower() == ".json":
        return load_karpathy(path, split=split, resolve_image=resolve_image)
    return load_csv(path, resolve_image)


def train_and_held_out(
    data: PairSet | str | os.PathLike,
    eval_data: str | os.PathLike | None,
    eval_fraction: float,
    seed: int,
    resolve_image: Optional[ImageResolver] = None,
) -> tuple[Any, PairSet]:
    """Training and held-out pairs by the contract of ``cliptuner train`` and ``/train``.

    Args:
        data: the training pairs, in memory or as a PAIRS file, or a stream spec (tar shards, parquet): then the
            training pairs are a :class:`cliptuner.train.streaming.StreamSource`, read while training.
        eval_data: held-out PAIRS (its ``test`` split for a Karpathy JSON); None to hold out part of ``data``.
        eval_fraction: share of images held out when neither ``eval_data`` nor a Karpathy test split applies.
        seed: seed of that split.
        resolve_image: checks each image path of the PAIRS files read (see the module docstring).

    Returns:
        ``(train, held_out)``: a Karpathy JSON without ``eval_data`` gives its train and test splits; otherwise a
        seeded ``eval_fraction`` of the images (all their captions) is held out.

    Raises:
        DataError: see the loaders; a stream without ``eval_data`` (a stream cannot be split).
    """
    if not isinstance(data, PairSet):
        from cliptuner.train.streaming import STREAM_NEEDS_EVAL, StreamError, is_stream_spec, open_stream

        if is_stream_spec(data):
            if eval_data is None:
                raise StreamError(f"{str(data)!r}: {STREAM_NEEDS_EVAL}")
            return open_stream(data, resolve_image=resolve_image), load_split(eval_data, "test", resolve_image)
    if eval_data is not None:
        train = data if isinstance(data, PairSet) else load_split(data, "train", resolve_image)
        return train, load_split(eval_data, "test", resolve_image)
    if not isinstance(data, PairSet) and Path(data).suffix.lower() == ".json":
        return (
            load_karpathy(data, split="train", resolve_image=resolve_image),
            load_karpathy(data, split="test", resolve_image=resolve_image),
        )
    pairs = data if isinstance(data, PairSet) else load_csv(data, resolve_image)
    return pairs.split(eval_fraction, seed)
