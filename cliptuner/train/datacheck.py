"""A check of PAIRS before training: what would make a run fail, leak its held-out numbers, or waste it.

:func:`check_pairs` reads a PAIRS file (CSV or Karpathy-style JSON) with the rules of the loaders in
:mod:`cliptuner.train.data`, but collects every finding instead of stopping at the first bad row, and looks at
what the loaders leave for later (the images' bytes). A :class:`DataReport` lists

*problems* — training would fail, or its held-out recall would not mean what it says:

* the pairs file cannot be read (no such file, not UTF-8, no header or missing columns, not a Karpathy JSON);
* bad rows (an empty image path or caption, a bad group, a path outside the allowed folders) and missing image files;
* unreadable images: not an image, corrupt, empty, or over the size limits of :mod:`cliptuner.model.images`
  (from the header and :meth:`PIL.Image.Image.verify`, without decoding the pixels unless ``decode`` is asked);
* too few images for a training side and a held-out side (one image each at least), and, when ``batch_size`` is
  given, fewer training images than a batch;
* a *leak*: a held-out image whose bytes equal those of a training image (one picture under two paths, or one
  file in both splits of a Karpathy JSON). The sides are those the trainer makes
  (:func:`cliptuner.train.data.train_and_held_out`): the ``eval_data`` file when given, else a Karpathy JSON's
  ``test`` split, else a seeded ``eval_fraction`` of the images (:meth:`PairSet.split`, same fraction and seed);

*warnings* — training runs, but look:

* byte-identical images under several names on one side (in a batch, each is a false negative of the other);
* repeated captions (case and spacing aside), the same text for several pairs;
* captions longer than the model's context length: the tokenizer cuts them (share and examples);
* tiny images and extreme aspect ratios (the centre crop keeps a small part of a long image);

and the spread of image sizes. Images are read one at a time, each hashed (SHA-256 of its bytes; an array or
PIL image in memory: of its shape and pixels) and measured from its header, so that memory holds a digest and a
size per image, never pixels: 100k pairs are fine.

Sources other than a ``.csv`` or ``.json`` file or a :class:`PairSet` (streamed shards, parquet) are not
checked: the report says so in ``skipped``. This module never imports torch; :func:`arch_caption_tokens` imports
open_clip when called.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import statistics
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from cliptuner.model.images import DEFAULT_LIMITS, ImageError, ImageLimits, check_array_image
from cliptuner.train.data import (
    MAX_REPORTED_ERRORS,
    NO_GROUP,
    TRAIN_SPLITS,
    DataError,
    ImageResolver,
    PairSet,
    _clean,
    _group_cell,
    _PairsBuilder,
)

logger = logging.getLogger(__name__)

TRAIN, HELD_OUT = "train", "held out"  # the two sides of a split, as findings name them
CHECKED_SUFFIXES = (".csv", ".json")  # PAIRS files this check reads: a CSV, a Karpathy-style JSON
TINY_SIDE = 32  # an image with a side shorter than this many pixels is "tiny"
MAX_ASPECT = 4.0  # an image whose long side is more than this many times its short side is "extreme"
EXAMPLES = MAX_REPORTED_ERRORS  # examples listed per finding
_CAPTION_SHOWN = 80  # characters of a caption quoted in an example
_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


# -- what a check reports -----------------------------------------------------------------------------------------
@dataclass
class Finding:
    """One kind of defect: how many items have it, and the first few of them."""

    kind: str  # a stable name: missing_images, unreadable_images, leak, truncated_captions, …
    message: str  # one line: what is wrong and how many
    count: int  # how many items (rows, images, captions) have it
    examples: list[str] = field(default_factory=list)  # the first ones, each naming its row or image

    def lines(self) -> list[str]:
        """The message, then one indented line per example (and how many more there are)."""
        more = self.count - len(self.examples)
        return (
            [self.message]
            + [f"    {example}" for example in self.examples]
            + ([f"    … and {more} more"] if more > 0 and self.examples else [])
        )


@dataclass(frozen=True)
class CaptionTokens:
    """How long a caption is for the model being trained: ``count(text)`` tokens, start and end tokens included,
    before any cut; a caption is cut when that is more than ``context_length``."""

    count: Callable[[str], int]  # tokens of one caption, special tokens included, without truncation
    context_length: int  # tokens a text tower reads (77 for OpenAI CLIP)
    name: str = ""  # which tokenizer, for the report


@dataclass
class DataReport:
    """What :func:`check_pairs` found. ``ok`` is False when there is a problem; warnings do not count."""

    source: str  # the PAIRS checked
    held_out_from: str = ""  # how the held-out side is made
    pairs: int = 0  # pairs on both sides
    images: int = 0  # distinct images on both sides (a file in both splits counts twice)
    train_images: int = 0
    held_out_images: int = 0
    problems: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was not checked, and why
    duplicates: dict[str, int] = field(default_factory=dict)  # groups of equal bytes, images in them, leaked
    captions: dict[str, Any] = field(default_factory=dict)  # distinct, repeated, truncated, share, context_length
    image_sizes: dict[str, Any] = field(default_factory=dict)  # the spread of widths, heights and aspect ratios
    skipped: Optional[str] = None  # why nothing was checked (a source this check does not read)
    seconds: float = 0.0  # how long the check took

    @property
    def ok(self) -> bool:
        """True when training can start: no problem (warnings allowed)."""
        return not self.problems

    def count(self, kind: str) -> int:
        """How many items the finding ``kind`` has (0 when absent)."""
        return sum(f.count for f in self.problems + self.warnings if f.kind == kind)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON can hold it (``cliptuner data check --json``)."""
        out = asdict(self)
        out["ok"] = self.ok
        out["missing_images"] = self.count("missing_images")
        out["unreadable_images"] = self.count("unreadable_images")
        out["seconds"] = round(self.seconds, 3)
        return out

    def headline(self) -> str:
        """One line: the source, its pairs and images, and how the held-out side is made."""
        if self.skipped is not None:
            return f"{self.source}: not checked ({self.skipped})"
        return (
            f"{self.source}: {self.pairs} pairs, {self.images} images ({self.train_images} train, "
            f"{self.held_out_images} held out: {self.held_out_from})"
        )

    def summary(self) -> str:
        """A short text for people: the headline, each problem and warning with examples, the image sizes."""
        lines = [self.headline()]
        for title, findings in (("problem", self.problems), ("warning", self.warnings)):
            if findings:
                lines.append(f"{len(findings)} {title}(s):")
                for finding in findings:
                    first, *rest = finding.lines()
                    lines.extend([f"  - {first}", *rest])
        if self.skipped is None and not self.problems and not self.warnings:
            lines.append("no problems, no warnings")
        lines.extend(f"note: {note}" for note in self.notes)
        sizes = _sizes_line(self.image_sizes)
        if sizes:
            lines.append(sizes)
        return "\n".join(lines)


def _sizes_line(sizes: dict[str, Any]) -> str:
    if not sizes.get("count"):
        return ""
    w, h, a = sizes["width"], sizes["height"], sizes["aspect"]
    common = ", ".join(f"{s['size']} ({s['images']})" for s in sizes["most_common"])
    return (
        f"image sizes: width {w['min']}–{w['max']} (median {w['median']:g}), height {h['min']}–{h['max']} "
        f"(median {h['median']:g}), aspect {a['min']:.2f}–{a['max']:.2f}; {sizes['distinct']} distinct, "
        f"most common {common}"
    )


# -- caption length: the tokenizer of the model being trained ------------------------------------------------------
def caption_tokens_of(tokenizer: Any, name: str = "") -> CaptionTokens:
    """The :class:`CaptionTokens` of a tokenizer object, counted without truncation.

    Understood: CLIP's BPE (:class:`cliptuner.model.tokenizer.ClipTokenizer`, open_clip's ``SimpleTokenizer``:
    ``encode`` gives the ids without start and end tokens), a tokenizer with ``token_count(text)``
    (:class:`cliptuner.model.hf_tokenizer.HfTokenizer`), and open_clip's ``HFTokenizer``/``SigLipTokenizer``
    (``.tokenizer`` a ``transformers`` tokenizer, asked for its ids with special tokens and no truncation, after
    the wrapper's cleaning).

    Raises:
        ValueError: no integer ``context_length`` >= 2, or a tokenizer of another kind.
    """
    context_length = getattr(tokenizer, "context_length", None)
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"tokenizer {type(tokenizer).__name__}: context_length must be an integer >= 2")
    name = name or type(tokenizer).__name__
    token_count = getattr(tokenizer, "token_count", None)
    if callable(token_count):
        return CaptionTokens(token_count, context_length, name)
    if callable(getattr(tokenizer, "encode", None)) and hasattr(tokenizer, "sot_token_id"):
        return CaptionTokens(lambda text: len(tokenizer.encode(text)) + 2, context_length, name)
    inner = getattr(tokenizer, "tokenizer", None)
    if callable(inner):
        clean = getattr(tokenizer, "clean_fn", None)
        if clean is None:  # open_clip's SigLipTokenizer cleans as below, with no attribute for it
            from open_clip.tokenizer import basic_clean, canonicalize_text

            def clean(text: str) -> str:
                return canonicalize_text(basic_clean(text))

        def count(text: str) -> int:
            return len(inner(clean(text), truncation=False, add_special_tokens=True, verbose=False)["input_ids"])

        return CaptionTokens(count, context_length, name)
    raise ValueError(
        f"cannot count caption tokens with a {type(tokenizer).__name__}: expected CLIP's BPE tokenizer, one with "
        "token_count(text), or open_clip's HFTokenizer"
    )


def arch_caption_tokens(arch: str) -> CaptionTokens:
    """The caption length of an OpenCLIP arch (or a bundled config): ``open_clip.get_tokenizer(arch)``.

    Imports open_clip (and torch); nothing is downloaded for the CLIP BPE archs.

    Raises:
        ValueError: an arch open_clip does not know, or one whose tokenizer it cannot build (not cached).
    """
    import open_clip

    import cliptuner.train.models  # noqa: F401  (registers the bundled configs with open_clip)

    known = set(open_clip.list_models())
    if arch not in known and not arch.startswith(("hf-hub:", "local-dir:")):  # get_tokenizer would fall back
        raise ValueError(f"unknown model {arch!r}; known: {sorted(known)}")
    try:
        tokenizer = open_clip.get_tokenizer(arch)
    except Exception as exc:  # open_clip raises what its sources raise: a missing config, a hub that is not reached
        raise ValueError(f"cannot build the tokenizer of model {arch!r}: {type(exc).__name__}: {exc}") from exc
    return caption_tokens_of(tokenizer, name=arch)


def version_caption_tokens(model_dir: str | os.PathLike) -> CaptionTokens:
    """The caption length of an exported model version, from its ``model.json`` (torch-free).

    Raises:
        ValueError: no readable ``model.json``, or a tokenizer it names that cannot be built.
    """
    from cliptuner.model.manifest import ModelManifest

    manifest = ModelManifest.read(model_dir)
    spec = manifest.tokenizer
    try:
        from cliptuner.model.hf_tokenizer import load_tokenizer
    except ImportError:  # an install whose serving side knows CLIP's BPE only
        from cliptuner.model.tokenizer import ClipTokenizer

        def load_tokenizer(spec: Any, model_dir: str | os.PathLike) -> Any:
            if spec.kind != "clip_bpe":
                raise ValueError(f"tokenizer kind {spec.kind!r} is not supported here") from None
            return ClipTokenizer(Path(model_dir) / spec.vocab, spec.context_length, spec.clean)

    tokenizer = load_tokenizer(spec, model_dir)
    return caption_tokens_of(tokenizer, name=f"{manifest.arch} ({spec.kind})")


# -- reading PAIRS files with the loaders' rules, collecting instead of raising -----------------------------------
@dataclass
class _Read:
    """The usable pairs of one PAIRS file (or one split of it), and what was wrong with the rest."""

    pairs: Optional[PairSet]  # None when the file itself could not be read
    bad_rows: list[str] = field(default_factory=list)  # the loaders' messages, one per row
    missing: dict[str, list[str]] = field(default_factory=dict)  # missing file → the messages of its rows
    file_error: Optional[str] = None
    other_splits: Counter = field(default_factory=Counter)  # Karpathy entries of splits not read, by split


def _missing(read: _Read, resolved: str, message: str) -> None:
    read.missing.setdefault(resolved, []).append(message)


def _read_csv(path: Path, resolve_image: Optional[ImageResolver]) -> _Read:
    """The rows of a PAIRS CSV by the rules of :func:`cliptuner.train.data.load_csv`, every bad row collected."""
    read = _Read(pairs=None)
    root = path.resolve().parent
    pairs = _PairsBuilder(resolve_image)
    reader = None
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                read.file_error = "empty file; expected a header 'image,caption'"
                return read
            columns = [c.strip().lower() for c in header]
            absent = [c for c in ("image", "caption") if c not in columns]
            if absent:
                read.file_error = f"missing column(s) {absent}; found {header}; expected 'image' and 'caption'"
                return read
            image_col, caption_col = columns.index("image"), columns.index("caption")
            group_col = columns.index("group") if "group" in columns else None
            gallery_col = columns.index("gallery") if "gallery" in columns else None
            line = reader.line_num
            for row in reader:
                start, line = line + 1, reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                image = _clean(row[image_col]) if image_col < len(row) else ""
                caption = _clean(row[caption_col]) if caption_col < len(row) else ""
                if not image:
                    read.bad_rows.append(f"line {start}: empty image path")
                    continue
                in_gallery = gallery_col is not None and gallery_col < len(row) and row[gallery_col].strip() == "1"
                if in_gallery and caption:
                    read.bad_rows.append(f"line {start}: a gallery row (gallery 1) has no caption, got {caption!r}")
                    continue
                if not caption and not in_gallery:
                    read.bad_rows.append(f"line {start}: empty caption for image {image!r}")
                    continue
                group = NO_GROUP
                if group_col is not None:
                    cell = row[group_col] if group_col < len(row) else ""
                    group = _group_cell(cell)
                    if group is None:
                        read.bad_rows.append(
                            f"line {start}: group {cell.strip()!r} is not an integer >= 0 (leave it empty for no group)"
                        )
                        continue
                resolved = os.path.normpath(Path(image) if os.path.isabs(image) else root / image)
                try:
                    resolved = pairs.allowed(resolved, f"line {start}: image {image!r}")
                except ValueError as exc:
                    read.bad_rows.append(str(exc))
                    continue
                if in_gallery:
                    if os.path.isfile(resolved):
                        pairs.gallery.setdefault(resolved, image)
                    else:
                        _missing(read, resolved, f"line {start}: image file {image!r} not found{pairs.where(resolved)}")
                    continue
                index = pairs.image(resolved, image)
                if index is None:
                    _missing(read, resolved, f"line {start}: image file {image!r} not found{pairs.where(resolved)}")
                    continue
                pairs.add(index, [caption], group)
    except UnicodeDecodeError as exc:
        read.file_error = f"not UTF-8 text ({exc})"
        return read
    except csv.Error as exc:
        read.file_error = f"line {reader.line_num if reader else '?'}: malformed CSV ({exc})"
        return read
    read.pairs = pairs.build(str(path), grouped=group_col is not None)
    return read


def _karpathy_entries(path: Path) -> tuple[Optional[list], Optional[str]]:
    """The ``images`` list of a Karpathy-style JSON, or why it cannot be read."""
    try:
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"not valid JSON ({exc})"
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return None, "expected a Karpathy-style object with an 'images' list"
    return entries, None


def _read_karpathy(path: Path, entries: list, split: str, resolve_image: Optional[ImageResolver]) -> _Read:
    """The entries of one split (``train`` with ``restval``) by the rules of
    :func:`cliptuner.train.data.load_karpathy`, every bad entry collected."""
    read = _Read(pairs=None)
    wanted = set(TRAIN_SPLITS) if split == "train" else {split}
    root = path.resolve().parent
    pairs = _PairsBuilder(resolve_image)
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            read.bad_rows.append(f"image {n}: expected an object, got {type(entry).__name__}")
            continue
        entry_split = entry.get("split")
        if entry_split not in wanted:
            read.other_splits[str(entry_split)] += 1
            continue
        filename = _clean(entry.get("filename"))
        if not filename:
            read.bad_rows.append(f"image {n}: no filename")
            continue
        label = f"image {n} ({filename!r})"
        sentences = entry.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            read.bad_rows.append(f"{label}: no sentences")
            continue
        raws = [_clean(s.get("raw")) if isinstance(s, dict) else "" for s in sentences]
        empty = [k for k, raw in enumerate(raws) if not raw]
        if empty:
            read.bad_rows.append(f"{label}: sentence(s) {empty} have no 'raw' caption")
            continue
        relative = os.path.join(_clean(entry.get("filepath")), filename)
        resolved = os.path.normpath(root / relative)
        try:
            resolved = pairs.allowed(resolved, label)
        except ValueError as exc:
            read.bad_rows.append(str(exc))
            continue
        index = pairs.image(resolved, os.path.normpath(relative))
        if index is None:
            _missing(read, resolved, f"{label}: image file not found{pairs.where(resolved)}")
            continue
        pairs.add(index, raws)
    read.pairs = pairs.build(f"{path}:{split}")
    return read


def unchecked_reason(source: Any) -> Optional[str]:
    """None when :func:`check_pairs` reads ``source`` (a ``.csv`` or ``.json`` file, a :class:`PairSet`); otherwise
    why not (a folder of shards, another format)."""
    if isinstance(source, PairSet):
        return None
    if not isinstance(source, (str, os.PathLike)):
        return f"a {type(source).__name__} source is not read by the data check"
    path = Path(source)
    if path.is_dir():
        return f"{str(path)!r} is a folder (streamed shards are not read by the data check)"
    if path.suffix.lower() not in CHECKED_SUFFIXES:
        return f"{str(path)!r}: the data check reads {list(CHECKED_SUFFIXES)} files, not {path.suffix or 'no suffix'!r}"
    return None


# -- the images: one read each, a digest and a size ---------------------------------------------------------------
@dataclass
class _Look:
    """What one image is: its digest and size, or why it cannot be used."""

    digest: Optional[bytes] = None
    size: Optional[tuple[int, int]] = None  # (width, height)
    error: Optional[str] = None


def _header_size(data: bytes, limits: ImageLimits, decode: bool = False) -> tuple[int, int]:
    """Width and height from an encoded image's header, its structure verified, its pixels not decoded (with
    ``decode``: decoded too, as training will).

    Raises:
        ImageError: not an image, corrupt, or over ``limits``.
    """
    if not data:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                _check_limits(width, height, limits)
                image.verify()
            if decode:  # verify() leaves the image unusable: open it again
                with Image.open(io.BytesIO(data)) as image:
                    image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"refused as a decompression bomb ({exc})") from exc
    except Exception as exc:  # PIL raises many types for corrupt data
        reason = _BUFFER_REPR.sub("", str(exc)).strip()
        raise ImageError(f"cannot decode ({type(exc).__name__}: {reason})") from exc
    return width, height


def _check_limits(width: int, height: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise ImageError(f"{width}x{height} = {width * height} pixels is over the limit of {limits.max_pixels}")
    if min(width, height) < limits.min_side:
        raise ImageError(f"{width}x{height} is smaller than {limits.min_side} pixels on a side")


def _look(source: Any, limits: ImageLimits, decode: bool = False) -> _Look:
    """Digest and size of one image source (a path, encoded bytes, an array or a PIL image)."""
    try:
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            size = path.stat().st_size
            if size > limits.max_bytes:
                raise ImageError(f"{size} bytes is over the limit of {limits.max_bytes}")
            data = path.read_bytes()
            return _Look(hashlib.sha256(data).digest(), _header_size(data, limits, decode))
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            if len(data) > limits.max_bytes:
                raise ImageError(f"{len(data)} bytes is over the limit of {limits.max_bytes}")
            return _Look(hashlib.sha256(data).digest(), _header_size(data, limits, decode))
        if isinstance(source, np.ndarray):
            array = check_array_image(source, limits, "array")
            digest = hashlib.sha256(f"{array.shape}{array.dtype}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
            return _Look(digest.digest(), (int(array.shape[1]), int(array.shape[0])))
        if isinstance(source, Image.Image):
            _check_limits(source.width, source.height, limits)
            digest = hashlib.sha256(f"{source.mode}{source.size}".encode())
            digest.update(source.tobytes())
            return _Look(digest.digest(), source.size)
        raise ImageError(f"unsupported image type {type(source).__name__}")
    except ImageError as exc:
        return _Look(error=str(exc))
    except OSError as exc:  # a file that went away or cannot be opened: its name is the row's, not the path
        return _Look(error=f"cannot read ({exc.strerror or type(exc).__name__})")


# -- the check ----------------------------------------------------------------------------------------------------
@dataclass
class _Side:
    """One side of the split: its pairs, and the look of each of its images."""

    name: str  # TRAIN or HELD_OUT
    pairs: PairSet
    looks: list[_Look] = field(default_factory=list)


def _capped(items: Iterable[str]) -> list[str]:
    out = []
    for item in items:
        if len(out) == EXAMPLES:
            break
        out.append(item)
    return out


def _quote(caption: str) -> str:
    return repr(caption if len(caption) <= _CAPTION_SHOWN else caption[: _CAPTION_SHOWN - 1] + "…")


class _Check:
    """The state of one :func:`check_pairs` call: the report it fills, step by step."""

    def __init__(
        self, report: DataReport, resolve_image: Optional[ImageResolver], limits: ImageLimits, decode: bool
    ) -> None:
        self.report = report
        self.resolve_image = resolve_image
        self.limits = limits
        self.decode = decode
        self.bad_rows: list[str] = []
        self.missing: list[list[str]] = []  # per missing file, the messages of its rows
        self.looked: dict[str, _Look] = {}  # path → look, so a file on both sides is read once

    def problem(self, kind: str, message: str, count: int, examples: Iterable[str] = ()) -> None:
        self.report.problems.append(Finding(kind, message, count, _capped(examples)))

    def warning(self, kind: str, message: str, count: int, examples: Iterable[str] = ()) -> None:
        self.report.warnings.append(Finding(kind, message, count, _capped(examples)))

    # reading
    def take(self, read: _Read, label: str, prefix: str) -> Optional[PairSet]:
        """Collect a file's findings (prefixed with its name when two files are read); its usable pairs."""
        if read.file_error is not None:
            self.problem("pairs_file", f"{label}: {read.file_error}", 1)
        self.bad_rows.extend(prefix + row for row in read.bad_rows)
        self.missing.extend([prefix + m for m in messages] for messages in read.missing.values())
        return read.pairs

    def read(self, source: PairSet | str | os.PathLike, role: str, prefix: str = "") -> Optional[PairSet]:
        """The pairs of ``source`` for ``role`` (``train``, ``test`` or ``all``) as the trainer reads them: a CSV
        whole, a Karpathy JSON's split (its ``train`` includes ``restval``)."""
        if isinstance(source, PairSet):
            return source
        path = Path(source)
        label = repr(str(path))
        if not path.is_file():
            self.problem("pairs_file", f"{label}: no such pairs file", 1)
            return None
        if path.suffix.lower() == ".csv":
            return self.take(_read_csv(path, self.resolve_image), label, prefix)
        entries, error = _karpathy_entries(path)
        if entries is None:
            return self.take(_Read(pairs=None, file_error=error), label, prefix)
        read = _read_karpathy(path, entries, role, self.resolve_image)
        return self.take(read, label, prefix)

    def karpathy_both(self, path: Path) -> tuple[Optional[PairSet], Optional[PairSet]]:
        """A Karpathy JSON's train and test splits, the file read once; entries of other splits noted."""
        if not path.is_file():
            self.problem("pairs_file", f"{str(path)!r}: no such pairs file", 1)
            return None, None
        entries, error = _karpathy_entries(path)
        if entries is None:
            return self.take(_Read(pairs=None, file_error=error), repr(str(path)), ""), None
        train = _read_karpathy(path, entries, "train", self.resolve_image)
        test = _read_karpathy(path, entries, "test", self.resolve_image)
        unused = {k: v for k, v in train.other_splits.items() if k != "test"}
        if unused:
            self.report.notes.append(
                f"{sum(unused.values())} entries of split(s) {sorted(unused)} are neither trained on nor held out"
            )
        test.bad_rows = [row for row in test.bad_rows if "expected an object" not in row]  # listed for train
        return self.take(train, repr(str(path)), ""), self.take(test, repr(str(path)), "")

    def rows_found(self) -> None:
        if self.bad_rows:
            self.problem(
                "bad_rows", f"{len(self.bad_rows)} bad row(s) the loader refuses", len(self.bad_rows), self.bad_rows
            )
        if self.missing:
            rows = sum(len(m) for m in self.missing)
            self.problem(
                "missing_images",
                f"{len(self.missing)} image file(s) not found ({rows} row(s))",
                len(self.missing),
                (messages[0] for messages in self.missing),
            )

    # images
    def look(self, side: _Side) -> None:
        for source in side.pairs.images:
            key = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
            if key is not None and key in self.looked:
                side.looks.append(self.looked[key])
                continue
            look = _look(source, self.limits, self.decode)
            if key is not None:
                self.looked[key] = look
            side.looks.append(look)

    def images_found(self, sides: list[_Side], tiny_side: int, max_aspect: float) -> None:
        bad = [
            f"image {side.pairs.image_ids[i]!r} ({side.name}): {look.error}"
            for side in sides
            for i, look in enumerate(side.looks)
            if look.error is not None
        ]
        if bad:
            self.problem("unreadable_images", f"{len(bad)} image(s) cannot be used", len(bad), bad)
        sizes = [look.size for side in sides for look in side.looks if look.size is not None]
        self.report.image_sizes = _size_spread(sizes)
        tiny = [
            f"image {side.pairs.image_ids[i]!r}: {look.size[0]}x{look.size[1]}"
            for side in sides
            for i, look in enumerate(side.looks)
            if look.size is not None and min(look.size) < tiny_side
        ]
        if tiny:
            self.warning("tiny_images", f"{len(tiny)} image(s) under {tiny_side} pixels on a side", len(tiny), tiny)
        extreme = [
            f"image {side.pairs.image_ids[i]!r}: {look.size[0]}x{look.size[1]}"
            for side in sides
            for i, look in enumerate(side.looks)
            if look.size is not None and max(look.size) > max_aspect * min(look.size)
        ]
        if extreme:
            self.warning(
                "extreme_aspect",
                f"{len(extreme)} image(s) more than {max_aspect:g} times as long as wide (the centre crop keeps "
                "little of them)",
                len(extreme),
                extreme,
            )

    def duplicates_found(self, sides: list[_Side]) -> None:
        """Equal bytes under several images: across the split a leak (a problem), on one side a warning."""
        by_digest: dict[bytes, list[tuple[str, str]]] = defaultdict(list)  # digest → (side, image id)
        for side in sides:
            captioned = side.pairs.num_captioned
            for i, look in enumerate(side.looks[:captioned]):
                if look.digest is not None:
                    by_digest[look.digest].append((side.name, side.pairs.image_ids[i]))
        groups = [members for members in by_digest.values() if len(members) > 1]
        leaks, same_side = [], []
        for members in groups:
            train = [image for name, image in members if name == TRAIN]
            held = [image for name, image in members if name == HELD_OUT]
            if train and held:
                leaks.extend(f"{image!r} (held out) has the bytes of {train[0]!r} (train)" for image in held)
            for name, images in ((TRAIN, train), (HELD_OUT, held)):
                if len(images) > 1:
                    same_side.append(f"{name}: " + " = ".join(repr(image) for image in images[:4]))
        self.report.duplicates = {
            "groups": len(groups),
            "images": sum(len(members) for members in groups),
            "held_out_leaked": len(leaks),
        }
        if leaks:
            self.problem(
                "leak",
                f"leak: {len(leaks)} held-out image(s) have the same bytes as a training image (held-out recall "
                "would measure memory); remove the copies or give them one name",
                len(leaks),
                leaks,
            )
        if same_side:
            self.warning(
                "duplicate_images",
                f"{len(same_side)} group(s) of byte-identical images under different names on one side (each is "
                "a false negative of the other in a batch)",
                len(same_side),
                same_side,
            )

    def captions_found(self, sides: list[_Side], tokens: Optional[CaptionTokens]) -> None:
        by_text: dict[str, list[str]] = defaultdict(list)  # normalised → the sides of its pairs
        first: dict[str, str] = {}
        for side in sides:
            for caption in side.pairs.captions:
                key = " ".join(caption.split()).lower()
                by_text[key].append(side.name)
                first.setdefault(key, caption)
        repeated = {key: names for key, names in by_text.items() if len(names) > 1}
        stats: dict[str, Any] = {
            "distinct": len(by_text),
            "repeated": len(repeated),
            "repeated_pairs": sum(len(names) for names in repeated.values()),
            "repeated_across_split": sum(1 for names in repeated.values() if len(set(names)) > 1),
        }
        if repeated:
            ranked = sorted(repeated.items(), key=lambda kv: -len(kv[1]))
            self.warning(
                "repeated_captions",
                f"{len(repeated)} caption(s) used by more than one pair ({stats['repeated_pairs']} pairs, "
                f"{stats['repeated_across_split']} on both sides of the split)",
                len(repeated),
                (f"{_quote(first[key])} x{len(names)}" for key, names in ranked),
            )
        if tokens is None:
            self.report.notes.append("caption lengths not checked: no tokenizer")
        else:
            counted = {key: tokens.count(first[key]) for key in by_text}  # one tokenization per distinct caption
            cut = [key for key, n in counted.items() if n > tokens.context_length]
            cut_pairs = sum(len(by_text[key]) for key in cut)
            total = sum(len(names) for names in by_text.values())
            share = cut_pairs / total if total else 0.0
            longest = max(counted.values(), default=0)
            stats.update(
                tokenizer=tokens.name,
                context_length=tokens.context_length,
                longest_tokens=longest,
                truncated=cut_pairs,
                truncated_share=round(share, 4),
            )
            if cut:
                self.warning(
                    "truncated_captions",
                    f"{cut_pairs} caption(s) ({share:.1%} of the pairs) are longer than the context length of "
                    f"{tokens.context_length} tokens ({tokens.name}) and are cut; longest {longest} tokens",
                    len(cut),
                    (f"{_quote(first[key])} ({counted[key]} tokens)" for key in cut),
                )
        self.report.captions = stats


def _size_spread(sizes: list[tuple[int, int]]) -> dict[str, Any]:
    if not sizes:
        return {"count": 0}
    widths = [w for w, _ in sizes]
    heights = [h for _, h in sizes]
    aspects = [w / h for w, h in sizes]

    def spread(values: list) -> dict[str, Any]:
        return {"min": min(values), "median": statistics.median(values), "max": max(values)}

    aspect = spread(aspects)
    return {
        "count": len(sizes),
        "width": spread(widths),
        "height": spread(heights),
        "aspect": {k: round(v, 4) for k, v in aspect.items()},
        "distinct": len(set(sizes)),
        "most_common": [{"size": f"{w}x{h}", "images": n} for (w, h), n in Counter(sizes).most_common(3)],
    }


def check_pairs(
    data: PairSet | str | os.PathLike,
    eval_data: str | os.PathLike | None = None,
    eval_fraction: float = 0.2,
    split_seed: int = 0,
    tokens: Optional[CaptionTokens] = None,
    resolve_image: Optional[ImageResolver] = None,
    limits: ImageLimits = DEFAULT_LIMITS,
    batch_size: Optional[int] = None,
    tiny_side: int = TINY_SIDE,
    max_aspect: float = MAX_ASPECT,
    decode: bool = False,
) -> DataReport:
    """Check training pairs, and the held-out pairs the trainer would measure them on, in one pass.

    Args:
        data: the training PAIRS (a ``.csv`` or Karpathy ``.json``), or pairs in memory.
        eval_data: held-out PAIRS (its ``test`` split for a Karpathy JSON); None: held out as the trainer does
            (a Karpathy JSON's ``test`` split, else ``eval_fraction`` of the images, seeded by ``split_seed``).
        eval_fraction: share of images held out (``EvalConfig.eval_fraction``).
        split_seed: seed of that split (``EvalConfig.split_seed``: the seed of ``cliptuner train``/``/train``).
        tokens: the caption length of the model being trained; None: caption lengths are not checked (noted).
        resolve_image: checks each image path (see :mod:`cliptuner.train.data`); its refusals are bad rows.
        limits: the image limits training decodes with.
        batch_size: when given, fewer training images than this is a problem.
        tiny_side: images with a shorter side than this are reported as tiny.
        max_aspect: images longer than this times their width (or the reverse) are reported.
        decode: decode every encoded image in full, as training will (slower): finds corrupt pixel data that the
            header and :meth:`PIL.Image.Image.verify` do not show (a PNG's compressed stream, a JPEG's scans).

    Returns:
        A :class:`DataReport`; ``skipped`` is set (and nothing checked) for a source this check does not read.

    Raises:
        ValueError: ``eval_fraction`` outside (0, 1), or a bad ``batch_size``, ``tiny_side`` or ``max_aspect``.
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if tiny_side < 1 or max_aspect < 1:
        raise ValueError(f"tiny_side and max_aspect must be >= 1, got {tiny_side!r} and {max_aspect!r}")
    started = time.perf_counter()
    source = (data.name or "pairs in memory") if isinstance(data, PairSet) else str(data)
    report = DataReport(source=source)
    for part in (data, eval_data):
        reason = None if part is None else unchecked_reason(part)
        if reason is not None:
            report.skipped = reason
            report.seconds = time.perf_counter() - started
            return report
    check = _Check(report, resolve_image, limits, decode)
    train, held, split_error = _split(check, data, eval_data, eval_fraction, split_seed)
    check.rows_found()
    sides = [_Side(name, pairs) for name, pairs in ((TRAIN, train), (HELD_OUT, held)) if pairs is not None]
    for side in sides:
        check.look(side)
    report.pairs = sum(len(side.pairs) for side in sides)
    report.images = sum(side.pairs.num_images for side in sides)
    report.train_images = train.num_captioned if train is not None else 0
    report.held_out_images = held.num_captioned if held is not None else 0
    unreadable_file = any(f.kind == "pairs_file" for f in report.problems)
    if report.pairs == 0 and not unreadable_file:
        check.problem("no_pairs", "no usable pairs: every row was refused or the file holds none", 1)
    elif split_error is not None:
        check.problem("too_few_images", split_error, 1)
    elif not unreadable_file:
        for name, count in ((TRAIN, report.train_images), (HELD_OUT, report.held_out_images)):
            if count == 0:
                check.problem("too_few_images", f"no {name} images: {report.held_out_from} gives none", 1)
    if batch_size is not None and 0 < report.train_images < batch_size:
        check.problem(
            "too_few_images",
            f"{report.train_images} training images is fewer than batch_size {batch_size}: a batch holds each image "
            "once; give more images or a smaller batch_size",
            1,
        )
    check.images_found(sides, tiny_side, max_aspect)
    check.duplicates_found(sides)
    check.captions_found(sides, tokens)
    report.seconds = time.perf_counter() - started
    return report


def _split(
    check: _Check,
    data: PairSet | str | os.PathLike,
    eval_data: str | os.PathLike | None,
    eval_fraction: float,
    split_seed: int,
) -> tuple[Optional[PairSet], Optional[PairSet], Optional[str]]:
    """Training and held-out pairs as :func:`cliptuner.train.data.train_and_held_out` makes them, read with every
    finding collected; and why no split can be made, if so."""
    report = check.report
    if eval_data is not None:
        report.held_out_from = f"the eval data {str(eval_data)!r}"
        prefix = "" if isinstance(data, PairSet) else f"{Path(data).name}: "
        train = check.read(data, "train", prefix)
        held = check.read(eval_data, "test", f"{Path(eval_data).name}: ")
        return train, held, None
    if not isinstance(data, PairSet) and Path(data).suffix.lower() == ".json":
        report.held_out_from = "the JSON's test split"
        train, held = check.karpathy_both(Path(data))
        return train, held, None
    report.held_out_from = f"{eval_fraction:g} of the images, seed {split_seed}"
    pairs = check.read(data, "all")
    if pairs is None:
        return None, None, None
    try:
        train, held = pairs.split(eval_fraction, split_seed)
    except ValueError as exc:
        return pairs, None, str(exc)
    return train, held, None


def check_before_training(
    data: Any,
    eval_data: Any,
    eval_fraction: float,
    split_seed: int,
    model_dir: str | os.PathLike | None = None,
    resolve_image: Optional[ImageResolver] = None,
    batch_size: Optional[int] = None,
) -> DataReport:
    """The check a service runs before a run starts: refuse on problems, log warnings, skip what it cannot read.

    Args:
        data: the training pairs (a PAIRS path or a :class:`PairSet`); another source is skipped (logged).
        eval_data: held-out PAIRS, or None.
        eval_fraction: share of images held out.
        split_seed: seed of the split.
        model_dir: the model version training starts from: its tokenizer measures the captions (a tokenizer that
            cannot be built is logged, and caption lengths are not checked).
        resolve_image: checks each image path (see :mod:`cliptuner.train.data`).
        batch_size: the run's batch size: fewer training images is a problem too (None: not checked).

    Returns:
        The report (no problems in it).

    Raises:
        DataError: the check found problems; the message is the report's summary.
    """
    tokens = None
    if model_dir is not None:
        try:
            tokens = version_caption_tokens(model_dir)
        except (ValueError, OSError) as exc:
            logger.warning("data check: caption lengths not checked, the model's tokenizer is not available: %s", exc)
    report = check_pairs(
        data, eval_data, eval_fraction, split_seed, tokens=tokens, resolve_image=resolve_image, batch_size=batch_size
    )
    if report.skipped is not None:
        logger.info("data check skipped: %s", report.skipped)
        return report
    if not report.ok:
        raise DataError(f"the data check found {len(report.problems)} problem(s):\n{report.summary()}")
    if report.warnings:
        logger.warning("data check (%.1f s): %s", report.seconds, report.summary())
    else:
        logger.info("data check (%.1f s): %s", report.seconds, report.headline())
    return report


__all__ = [
    "CaptionTokens",
    "DataReport",
    "Finding",
    "arch_caption_tokens",
    "caption_tokens_of",
    "check_before_training",
    "check_pairs",
    "unchecked_reason",
    "version_caption_tokens",
]
