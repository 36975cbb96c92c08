"""Pairs read as a stream: webdataset tar shards and parquet files, with bounded memory.

A PAIRS source too big to hold in memory is named by a *stream spec*:

* ``shards/{00000..00099}.tar`` — brace notation (``{a..b}`` ranges, zero-padded when an end is, and ``{x,y,z}``
  lists, nested as a shell does), or one ``.tar`` file, or a folder holding ``*.tar`` files: webdataset tar shards
  as img2dataset writes them. A sample is the members that share a key (the name up to its first dot):
  ``{key}.jpg`` (or ``.jpeg``/``.png``/``.webp``), ``{key}.txt`` (the caption) and an optional ``{key}.json``
  (not read). A sample without an image or a caption is skipped.
* ``pairs.parquet``, ``parts/{0..9}.parquet`` or a folder holding ``*.parquet`` files. Columns are found by name
  (case-insensitive), the first of :data:`IMAGE_COLUMNS` whose type fits: a binary column holds encoded image
  bytes (``jpg``, ``image_bytes``, ``bytes``, …), a struct column with a ``bytes`` field holds them as Hugging Face
  datasets and img2dataset write them (``{"bytes": ..., "path": ...}``; ``path`` is used when ``bytes`` is empty),
  and a string column holds local image paths, relative to the parquet file's folder (``image``, ``image_path``,
  ``path``, ``url``, …; an ``http(s)`` URL is refused: download the images first). The caption is the first of
  :data:`CAPTION_COLUMNS` (``caption``, ``text``, ``txt``). A file with neither is refused with the columns found.

A *shard* is the unit that is dealt to processes and resumed: one tar file, or one row group of a parquet file.

What a stream guarantees, and what it does not:

* **Bounded memory.** Each reader (a DataLoader worker, or the training process without workers) holds at most
  ``TrainConfig.shuffle_buffer`` samples, still encoded, and draws each batch from them at random; an image is
  decoded and transformed only when a batch takes it.
* **Disjoint shards.** Each epoch (seeded by ``seed`` and the epoch) shuffles the shards and deals them round-robin
  to every (DDP rank, DataLoader worker) slot (:func:`shard_plan`): no shard is read twice in an epoch, and all
  are read. A stream needs at least as many shards as slots.
* **Unique images per batch.** A batch never holds two samples whose image is the same (the same bytes, or for a
  path column the same file): their captions would be false negatives for the contrastive loss. This holds for
  each process's batch, drawn from its own buffer; two ranks' slices of one global batch, and two buffers, may
  repeat an image. A full buffer that holds fewer distinct images than a batch drops one repeated sample
  (logged). Samples whose image cannot be decoded are skipped (logged).
* **Same number of steps on every rank.** Ranks read different shards, so before each batch the ranks agree that
  every one of them has a batch (one small all-gather); the epoch ends for all when the first runs out. The
  samples the other ranks had left are not trained on in that epoch (a new shard plan next epoch deals them
  elsewhere). The schedule's step count is planned from the shards' pair counts (:meth:`StreamLoader.total_steps`):
  img2dataset's ``{shard}_stats.json`` ``successes`` when present, else a scan of the tar headers; parquet
  metadata row counts.
* **Resume at shard granularity.** A shard is *done* once every sample read from it has been in a trained batch.
  With a checkpoint folder, :func:`cliptuner.train.loop.fit` writes ``last.pt`` after each shard completes (with the
  names of the shards done in this epoch); a resumed run skips them and reads the epoch's other shards. Samples of
  shards that were only partly trained are read again (at least once, never lost). The epoch's mean loss after a
  resume covers the batches after it.
* **Evaluation.** A stream cannot be split: it needs separate held-out pairs (``--eval-data`` or ``/train``'s
  ``eval_data``), a PAIRS file or a small stream read into memory (at most :data:`MAX_IN_MEMORY_PAIRS`). Choosing an
  epoch (``keep_best``, ``early_stop_patience``) needs a validation part split off the training images, which a
  stream cannot give, and hard-negative batches need every pair embedded: both are refused for a stream.

This module reads and checks streams without torch (the service checks a stream spec with it) and imports pyarrow
only when a parquet file is read; :mod:`cliptuner.train.stream_loader` turns a stream into training batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import numpy as np

from cliptuner.train.data import MAX_REPORTED_ERRORS, DataError, ImageResolver, PairSet, from_memory

logger = logging.getLogger(__name__)

TAR, PARQUET = "tar", "parquet"  # the kinds of stream
SUFFIXES = {".tar": TAR, ".parquet": PARQUET}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the image member of a tar sample, first found wins
CAPTION_EXTENSION = "txt"
STATS_SUFFIX = "_stats.json"  # img2dataset writes {shard}_stats.json beside {shard}.tar, "successes" its samples
# Parquet columns, looked for in this order (case-insensitive); the column's type says what it holds.
IMAGE_COLUMNS = (
    "image",
    "jpg",
    "jpeg",
    "png",
    "webp",
    "image_bytes",
    "bytes",
    "img",
    "image_path",
    "path",
    "filepath",
    "file_path",
    "file_name",
    "filename",
    "url",
)
CAPTION_COLUMNS = ("caption", "text", "txt")
MAX_SHARDS = 100_000  # the most files a brace pattern may expand to
MAX_IN_MEMORY_PAIRS = 50_000  # the most pairs of a stream read into memory (held-out, general pairs)
PARQUET_READ_ROWS = 256  # rows per parquet record batch read
STREAM_NEEDS_EVAL = (
    "a stream (tar shards or parquet) cannot be split into training and held-out pairs: give separate held-out pairs "
    "(--eval-data, or /train's eval_data) as a PAIRS file (CSV, Karpathy JSON) or a small stream"
)
STREAM_CANNOT_CHOOSE = (
    "keep_best and early_stop_patience choose the epoch on val_fraction of the training images, which cannot be split "
    "off a stream; train a fixed number of epochs on a stream (the held-out pairs report every epoch)"
)
STREAM_NO_HARD_NEGATIVES = (
    "hard_negatives builds batches from the embeddings of every training pair, which a stream does not hold; "
    "train on a stream without hard_negatives"
)
_BRACES = re.compile(r"\{[^{}]*(?:\.\.|,)[^{}]*\}")  # a {a..b} or {x,y} group somewhere in a spec
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class StreamError(DataError):
    """A stream spec or shard cannot be used; the message names the spec or shard and the problem."""


# -- naming the shards ---------------------------------------------------------------------------------------------
def _matching_brace(text: str, start: int) -> int:
    """The index of the ``}`` that closes the ``{`` at ``start``, or -1."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _alternatives(body: str) -> Optional[list[str]]:
    """The choices of a brace group's body: a numeric range or a top-level comma list; None when it is neither."""
    match = _RANGE.match(body)
    if match:
        lo, hi = int(match.group(1)), int(match.group(2))
        ends = (match.group(1).lstrip("-"), match.group(2).lstrip("-"))
        width = max(len(e) for e in ends) if any(len(e) > 1 and e.startswith("0") for e in ends) else 0
        step = 1 if hi >= lo else -1
        if abs(hi - lo) + 1 > MAX_SHARDS:
            raise StreamError(f"{{{body}}} expands to {abs(hi - lo) + 1} names, more than {MAX_SHARDS}")
        return [f"{n:0{width}d}" if n >= 0 else f"-{-n:0{width}d}" for n in range(lo, hi + step, step)]
    parts, depth, last = [], 0, 0
    for i, ch in enumerate(body):
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(body[last:i])
            last = i + 1
    if not parts:
        return None
    return parts + [body[last:]]


def expand_braces(pattern: str) -> list[str]:
    """Expand a shell-style brace pattern: ``{00..02}`` → ``00 01 02``, ``{a,b}`` → ``a b``, nested and repeated.

    A brace group that is neither a numeric range nor a comma list is kept as written.

    Raises:
        StreamError: the pattern expands to more than :data:`MAX_SHARDS` names, or a brace is not closed.
    """
    start = pattern.find("{")
    while start != -1:
        end = _matching_brace(pattern, start)
        if end == -1:
            raise StreamError(f"{pattern!r}: a '{{' at position {start} is never closed")
        choices = _alternatives(pattern[start + 1 : end])
        if choices is not None:
            head, tails = pattern[:start], expand_braces(pattern[end + 1 :])
            names: list[str] = []
            for choice in choices:
                for middle in expand_braces(choice):
                    names.extend(head + middle + tail for tail in tails)
                    if len(names) > MAX_SHARDS:
                        raise StreamError(f"{pattern!r} expands to more than {MAX_SHARDS} names")
            return names
        start = pattern.find("{", start + 1)
    return [pattern]


def _kind_of(name: str) -> Optional[str]:
    return SUFFIXES.get(os.path.splitext(name)[1].lower())


def _placed(name: str, base: Optional[Path]) -> Path:
    path = Path(name).expanduser()
    return path if base is None or path.is_absolute() else base / path


def is_stream_spec(spec: Union[str, os.PathLike], base: Optional[Union[str, os.PathLike]] = None) -> bool:
    """Whether ``spec`` names a stream: a brace pattern, a ``.tar`` or ``.parquet`` file, or a folder.

    Args:
        spec: the data source as given.
        base: the folder a relative spec is under (the service's data root); None: the working directory.
    """
    if isinstance(spec, PairSet) or not isinstance(spec, (str, os.PathLike)):
        return False
    text = os.fspath(spec)
    if _BRACES.search(text) or _kind_of(text) is not None:
        return True
    return _placed(text, None if base is None else Path(base)).is_dir()


def expand_shards(
    spec: Union[str, os.PathLike], root: Optional[Union[str, os.PathLike]] = None
) -> tuple[str, list[tuple[str, Path]]]:
    """The files a stream spec names, checked: ``(kind, [(name as written, resolved path), ...])``.

    Args:
        spec: a brace pattern, a ``.tar``/``.parquet`` file or a folder holding such files (not both kinds).
        root: when given, ``spec`` is relative to it and every file it names must resolve (symlinks and ``..``
            followed) inside it; the messages then name files as the spec does, never by their place on disk.

    Raises:
        StreamError: nothing named, a file missing or outside ``root``, an unknown suffix, or both kinds mixed.
    """
    text = os.fspath(spec)
    base = None if root is None else Path(root).resolve()
    folder = _placed(text, base)
    if not _BRACES.search(text) and folder.is_dir():
        if base is not None and not folder.resolve().is_relative_to(base):
            raise StreamError(f"{text!r} is outside the data root")
        entries = sorted(p.name for p in folder.iterdir() if _kind_of(p.name) and p.is_file())
        kinds = {_kind_of(n) for n in entries}
        if not entries:
            raise StreamError(f"{text!r}: the folder holds no .tar or .parquet file")
        if len(kinds) > 1:
            raise StreamError(f"{text!r}: the folder holds both .tar and .parquet files; name one kind with a pattern")
        names = [os.path.join(text, n) for n in entries]
    else:
        names = expand_braces(text)
    problems: list[str] = []
    files: list[tuple[str, Path]] = []
    kinds: set[str] = set()
    for name in names:
        kind = _kind_of(name)
        if kind is None:
            problems.append(f"{name!r}: not a .tar or .parquet file")
            continue
        kinds.add(kind)
        try:
            resolved = _placed(name, base).resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
            problems.append(f"{name!r}: cannot be resolved")
            continue
        if base is not None and not resolved.is_relative_to(base):
            problems.append(f"{name!r} is outside the data root")
        elif not resolved.is_file():
            problems.append(f"{name!r}: no such file" + ("" if base is not None else f" (looked at {resolved})"))
        else:
            files.append((os.path.normpath(name), resolved))
    if len(kinds) > 1:
        problems.insert(0, f"it names both .tar and .parquet files ({sorted(kinds)}); a stream is of one kind")
    if problems:
        shown = problems[:MAX_REPORTED_ERRORS]
        more = f"\n  … and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise StreamError(f"stream {text!r}: {len(problems)} problem(s):\n  " + "\n  ".join(shown) + more)
    return kinds.pop(), files


# -- counting and describing the shards ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """One unit of a stream: a tar file, or one row group of a parquet file."""

    name: str  # how checkpoints and messages name it: the file as the spec names it (+ "#<row group>" for parquet)
    path: str  # the file read
    count: int  # its pairs, counted cheaply (stats file, tar headers, parquet metadata): skipped samples not known
    row_group: Optional[int] = None  # parquet only
    columns: Optional[tuple[str, str, str]] = None  # parquet only: (image column, "path"|"bytes"|"struct", caption)


@dataclass(frozen=True)
class StreamSource:
    """A stream of pairs: its shards in order, counted. Build it with :func:`open_stream`."""

    spec: str  # the spec given (absolute when opened under a root), which a worker process opens again
    kind: str  # TAR or PARQUET
    shards: tuple[Shard, ...]

    def __len__(self) -> int:
        """Pairs counted over all shards (samples later found without an image or caption are not known here)."""
        return sum(s.count for s in self.shards)

    @property
    def num_images(self) -> int:
        """Images in the stream as counted: one per sample (an image repeated in several samples counts each time)."""
        return len(self)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def name(self) -> str:
        return self.spec

    def names(self) -> list[str]:
        return [s.name for s in self.shards]


def _tar_key(member: str) -> tuple[str, str]:
    """webdataset's split of a member name: ``(key, extension)``; the key is the path up to the basename's first dot."""
    folder, base = os.path.split(member)
    stem, dot, ext = base.partition(".")
    return os.path.join(folder, stem), ext.lower() if dot else ""


def count_tar(path: Union[str, os.PathLike], use_stats: bool = True) -> int:
    """The samples of a tar shard with an image and a caption: img2dataset's ``{shard}_stats.json`` ``successes``
    when that file is beside it (and ``use_stats``), else counted from the member headers (the image data is not
    read).

    Raises:
        StreamError: the file is not a readable tar.
    """
    path = Path(path)
    stats = path.with_name(path.name[: -len(".tar")] + STATS_SUFFIX) if path.name.lower().endswith(".tar") else None
    if use_stats and stats is not None and stats.is_file():
        try:
            successes = json.loads(stats.read_text(encoding="utf-8")).get("successes")
        except (OSError, ValueError, AttributeError):
            successes = None
        if isinstance(successes, int) and not isinstance(successes, bool) and successes >= 0:
            return successes
    images: set[str] = set()
    captions: set[str] = set()
    try:
        with tarfile.open(path, mode="r:*") as archive:
            for member in archive:
                if member.isfile():
                    key, ext = _tar_key(member.name)
                    if ext in IMAGE_EXTENSIONS:
                        images.add(key)
                    elif ext == CAPTION_EXTENSION:
                        captions.add(key)
                archive.members.clear()  # the archive would keep every header: memory grows with the shard
    except (tarfile.TarError, OSError) as exc:
        raise StreamError(f"shard {str(path)!r}: not a readable tar file ({exc})") from exc
    return len(images & captions)


def _require_pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is in the train extra
        raise ImportError(
            'reading parquet needs pyarrow: pip install "cliptuner[train]" (or pip install pyarrow)'
        ) from exc
    return pq


def _parquet_columns(schema: Any, name: str) -> tuple[str, str, str]:
    """``(image column, what it holds, caption column)`` of a parquet schema, by :data:`IMAGE_COLUMNS` and
    :data:`CAPTION_COLUMNS`.

    Raises:
        StreamError: no usable image or caption column (the message lists the columns found).
    """
    import pyarrow as pa

    by_name = {field.name.lower(): field for field in schema}

    def holds(field: Any) -> Optional[str]:
        kind = field.type
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            return "bytes"
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            return "path"
        if pa.types.is_struct(kind) and any(kind.field(i).name == "bytes" for i in range(kind.num_fields)):
            return "struct"
        return None

    image = next(
        ((by_name[c].name, holds(by_name[c])) for c in IMAGE_COLUMNS if c in by_name and holds(by_name[c])), None
    )
    caption = next(
        (by_name[c].name for c in CAPTION_COLUMNS if c in by_name and holds(by_name[c]) == "path"),
        None,
    )
    if image is None or caption is None:
        found = [f"{field.name} ({field.type})" for field in schema]
        missing = []
        if image is None:
            missing.append(
                f"an image column (image bytes, a struct with 'bytes', or local paths) named one of {list(IMAGE_COLUMNS)}"
            )
        if caption is None:
            missing.append(f"a text caption column named one of {list(CAPTION_COLUMNS)}")
        raise StreamError(f"{name!r}: no " + " and no ".join(missing) + f"; columns found: {found}")
    return image[0], image[1], caption


def _parquet_shards(name: str, path: Path) -> list[Shard]:
    pq = _require_pyarrow()
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, … for a file that is not parquet
        raise StreamError(f"{name!r}: not a readable parquet file ({type(exc).__name__}: {exc})") from exc
    columns = _parquet_columns(parquet.schema_arrow, name)
    if columns[1] == "path":
        _refuse_urls(parquet, columns[0], name)
    shards = []
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if rows:
            shards.append(Shard(f"{name}#{group}", str(path), rows, group, columns))
    return shards


def _refuse_urls(parquet: Any, column: str, name: str) -> None:
    """Refuse a path column whose first values are URLs: a stream reads local images only."""
    for batch in parquet.iter_batches(batch_size=64, columns=[column]):
        for value in batch.column(0).to_pylist():
            if isinstance(value, str) and _URL.match(value):
                raise StreamError(
                    f"{name!r}: column {column!r} holds URLs ({value[:80]!r}); a stream reads local images only: "
                    "download them first (img2dataset writes tar shards) or give a column of local paths or image bytes"
                )
        return


def open_stream(
    spec: Union[str, os.PathLike],
    root: Optional[Union[str, os.PathLike]] = None,
    resolve_image: Optional[ImageResolver] = None,
) -> StreamSource:
    """The shards of a stream spec, counted (see the module docstring for the formats).

    Args:
        spec: a brace pattern, a ``.tar``/``.parquet`` file, or a folder of them.
        root: the folder every shard must lie in (the service's data root); None: paths as written.
        resolve_image: checks every image path of a parquet path column before training starts (the service's
            image policy); the column is read a record batch at a time.

    Raises:
        StreamError: see :func:`expand_shards`; an unreadable shard, missing parquet columns, no pairs, or image
            paths ``resolve_image`` refuses (each named by shard and row).
    """
    kind, files = expand_shards(spec, root)
    if kind == TAR:
        shards = [Shard(name, str(path), count_tar(path)) for name, path in files]
    else:
        shards = [shard for name, path in files for shard in _parquet_shards(name, path)]
    text = os.fspath(spec)
    if root is not None and not os.path.isabs(text):
        text = os.path.join(os.fspath(Path(root).resolve()), text)
    source = StreamSource(spec=text, kind=kind, shards=tuple(shards))
    if not len(source):
        raise StreamError(f"stream {os.fspath(spec)!r}: its {len(files)} file(s) hold no pairs")
    if resolve_image is not None and kind == PARQUET:
        _check_image_paths(source, resolve_image)
    return source


def _check_image_paths(source: StreamSource, resolve_image: ImageResolver) -> None:
    problems: list[str] = []
    for index, shard in enumerate(source.shards):
        if shard.columns is None or shard.columns[1] == "bytes":
            continue
        for sample in _read_parquet(shard, index, check=False):
            if isinstance(sample.image, str):
                try:
                    resolve_image(sample.image, f"{sample.key}: image {sample.image!r}")
                except ValueError as exc:
                    problems.append(str(exc))
                    if len(problems) > MAX_REPORTED_ERRORS:
                        break
    if problems:
        shown = problems[:MAX_REPORTED_ERRORS]
        raise StreamError(f"stream {source.spec!r}: image path(s) refused:\n  " + "\n  ".join(shown))


# -- reading samples -----------------------------------------------------------------------------------------------
class Sample(NamedTuple):
    """One pair as read, its image still encoded (bytes) or a path."""

    shard: int  # index of its shard in the source
    key: str  # ``<shard name>:<key>`` (tar) or ``<shard name>:<row>`` (parquet), for messages
    image: Union[bytes, str]
    caption: str
    digest: bytes  # the image's identity: a hash of its bytes, or of its resolved path


class ShardEnd(NamedTuple):
    """Marks that shard ``shard`` has been read to its end."""

    shard: int


def _digest(image: Union[bytes, str]) -> bytes:
    if isinstance(image, str):
        return hashlib.blake2b(
            b"path:" + os.path.abspath(image).encode("utf-8", "surrogateescape"), digest_size=8
        ).digest()
    return hashlib.blake2b(image, digest_size=8).digest()


def _read_tar(shard: Shard, index: int) -> Iterator[Sample]:
    def sample(key: str, parts: dict[str, bytes]) -> Optional[Sample]:
        image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
        caption = parts.get(CAPTION_EXTENSION, b"").decode("utf-8", errors="replace").strip()
        if image is None or not caption:
            return None
        return Sample(index, f"{shard.name}:{key}", image, caption, _digest(image))

    key, parts = None, {}
    try:
        with tarfile.open(shard.path, mode="r|*") as archive:  # a stream: one pass, no seeking
            for member in archive:
                if not member.isfile():
                    continue
                member_key, ext = _tar_key(member.name)
                if member_key != key:
                    if key is not None and (done := sample(key, parts)) is not None:
                        yield done
                    key, parts = member_key, {}
                if ext in IMAGE_EXTENSIONS or ext == CAPTION_EXTENSION:
                    handle = archive.extractfile(member)
                    if handle is not None:
                        parts[ext] = handle.read()
                archive.members.clear()  # tarfile keeps every header read; a shard's would pile up
            if key is not None and (done := sample(key, parts)) is not None:
                yield done
    except (tarfile.TarError, OSError) as exc:
        raise StreamError(f"shard {shard.name!r}: not a readable tar file ({exc})") from exc


def _read_parquet(shard: Shard, index: int, check: bool = True) -> Iterator[Sample]:
    pq = _require_pyarrow()
    assert shard.columns is not None and shard.row_group is not None
    image_column, holds, caption_column = shard.columns
    folder = os.path.dirname(shard.path)
    parquet = pq.ParquetFile(shard.path)
    row = 0
    for batch in parquet.iter_batches(
        batch_size=PARQUET_READ_ROWS, row_groups=[shard.row_group], columns=[image_column, caption_column]
    ):
        images = batch.column(image_column).to_pylist()
        captions = batch.column(caption_column).to_pylist()
        for value, caption in zip(images, captions):
            key = f"{shard.name}:{row}"
            row += 1
            if holds == "struct" and isinstance(value, dict):
                value = value.get("bytes") or value.get("path")
            caption = caption.strip() if isinstance(caption, str) else ""
            if not caption or not value:
                continue
            if isinstance(value, str):
                if _URL.match(value):
                    if check:
                        logger.warning("%s: %r is a URL, not a local image: skipped", key, value[:80])
                    continue
                value = os.path.normpath(os.path.join(folder, value))
            image = value if isinstance(value, str) else bytes(value)
            yield Sample(index, key, image, caption, _digest(image))


def read_samples(source: StreamSource, shards: Iterable[int]) -> Iterator[Union[Sample, ShardEnd]]:
    """The samples of the given shards of ``source``, in order, each shard followed by its :class:`ShardEnd`."""
    reader = _read_tar if source.kind == TAR else _read_parquet
    for index in shards:
        yield from reader(source.shards[index], index)
        yield ShardEnd(index)


def load_stream_pairs(
    spec: Union[str, os.PathLike],
    resolve_image: Optional[ImageResolver] = None,
    root: Optional[Union[str, os.PathLike]] = None,
    max_pairs: int = MAX_IN_MEMORY_PAIRS,
) -> PairSet:
    """A (small) stream read whole into memory as a :class:`PairSet`: held-out or general pairs.

    Samples that show the same image (same bytes, or the same file) become captions of one image.

    Raises:
        StreamError: see :func:`open_stream`; more than ``max_pairs`` pairs; an image file of a path column missing.
    """
    source = open_stream(spec, root, resolve_image)
    if len(source) > max_pairs:
        raise StreamError(
            f"stream {os.fspath(spec)!r}: {len(source)} pairs is more than the {max_pairs} held in memory for "
            "evaluation; give a smaller held-out set"
        )
    images: list[Union[bytes, str]] = []
    captions: list[str] = []
    ids: list[str] = []
    first_key: dict[bytes, str] = {}
    problems: list[str] = []
    for sample in read_samples(source, range(source.num_shards)):
        if isinstance(sample, ShardEnd):
            continue
        if isinstance(sample.image, str) and not os.path.isfile(sample.image):
            problems.append(f"{sample.key}: image file not found")
            continue
        images.append(sample.image)
        captions.append(sample.caption)
        ids.append(first_key.setdefault(sample.digest, sample.key))
    if problems:
        shown = problems[:MAX_REPORTED_ERRORS]
        raise StreamError(f"stream {os.fspath(spec)!r}: {len(problems)} bad sample(s):\n  " + "\n  ".join(shown))
    if not images:
        raise StreamError(f"stream {os.fspath(spec)!r}: no sample has both an image and a caption")
    return from_memory(images, captions, image_ids=ids, name=source.spec)


def check_stream_training(
    data: Any, eval_data: Any, keep_best: bool, early_stop_patience: Optional[int], hard_negatives: bool
) -> None:
    """Refuse what a training run on a stream cannot do (see the module docstring); nothing for other data.

    Raises:
        StreamError: a stream without held-out pairs, with keep_best/early stopping, or with hard negatives.
    """
    stream = isinstance(data, StreamSource) or is_stream_spec(data)
    if not stream:
        return
    name = data.spec if isinstance(data, StreamSource) else os.fspath(data)
    if eval_data is None:
        raise StreamError(f"{name!r}: {STREAM_NEEDS_EVAL}")
    if keep_best or early_stop_patience is not None:
        raise StreamError(f"{name!r}: {STREAM_CANNOT_CHOOSE}")
    if hard_negatives:
        raise StreamError(f"{name!r}: {STREAM_NO_HARD_NEGATIVES}")


def source_files(path: Union[str, os.PathLike]) -> list[Path]:
    """The files a data source reads: itself, or a stream's shard files (for a digest of what a request names)."""
    if is_stream_spec(path):
        return [resolved for _, resolved in expand_shards(path)[1]]
    return [Path(path)]


# -- writing tar shards ----------------------------------------------------------------------------------------------
def write_tar_shards(
    samples: Iterable[tuple[str, bytes, str, str]],
    folder: Union[str, os.PathLike],
    per_shard: int,
    stats: bool = False,
    digits: int = 5,
) -> list[Path]:
    """Write ``(key, image bytes, image extension, caption)`` samples as img2dataset-style tar shards.

    Shard ``k`` is ``folder/{k:0<digits>d}.tar`` holding ``{key}.{ext}``, ``{key}.txt`` and ``{key}.json``
    (``{"key", "caption"}``); with ``stats``, ``{k}_stats.json`` beside it holds ``{"successes": n}``.

    Returns:
        The shard paths, in order (read them back with ``folder/{00000..NNNNN}.tar``).
    """
    import io

    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    archive: Optional[tarfile.TarFile] = None
    written = 0

    def add(name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        assert archive is not None
        archive.addfile(info, io.BytesIO(data))

    def close() -> None:
        if archive is not None:
            archive.close()
            if stats:
                stem = paths[-1].name[: -len(".tar")]
                (out / f"{stem}{STATS_SUFFIX}").write_text(json.dumps({"successes": written}), encoding="utf-8")

    for key, image, ext, caption in samples:
        if archive is None or written == per_shard:
            close()
            paths.append(out / f"{len(paths):0{digits}d}.tar")
            archive, written = tarfile.open(paths[-1], mode="w"), 0
        add(f"{key}.{ext}", image)
        add(f"{key}.txt", caption.encode("utf-8"))
        add(f"{key}.json", json.dumps({"key": key, "caption": caption}).encode("utf-8"))
        written += 1
    close()
    return paths


# -- the shard plan of an epoch --------------------------------------------------------------------------------------
def shard_plan(
    num_shards: int, seed: int, epoch: int, num_replicas: int = 1, num_workers: int = 1
) -> list[list[list[int]]]:
    """The shards each (rank, worker) reads in ``epoch``: ``plan[rank][worker]`` lists shard indices.

    The shards are shuffled with ``(seed, epoch)`` and dealt round-robin to the ``num_replicas * num_workers``
    slots, so that the slots' shards are disjoint and together all of them; every rank computes the same plan.
    """
    order = np.random.default_rng([abs(int(seed)), int(seed < 0), int(epoch)]).permutation(num_shards)
    plan: list[list[list[int]]] = [[[] for _ in range(num_workers)] for _ in range(num_replicas)]
    for position, shard in enumerate(order.tolist()):
        slot = position % (num_replicas * num_workers)
        plan[slot % num_replicas][slot // num_replicas].append(int(shard))
    return plan


# -- the shuffle buffer ------------------------------------------------------------------------------------------------
class ShuffleBuffer:
    """Draws batches of unique images at random from at most ``capacity`` samples held (see the module docstring).

    Samples come in one at a time; once ``capacity`` are held a batch is drawn before the next is taken in, and at
    the end of the input the rest is drawn until no full batch of distinct images is left (the remainder is
    dropped). ``prepare`` turns a chosen sample into what the batch holds (decoded, transformed), or None when
    it cannot be used (the sample is then dropped).

    Each batch comes with the shards that are *done* once it has been trained: read to the end, with none of their
    samples held any more.

    Counters (for tests and logs): ``peak`` (most samples held at once), ``taken`` (samples taken in),
    ``dropped_repeats``, ``dropped_bad``, ``dropped_at_end``.
    """

    def __init__(
        self,
        batch_size: int,
        capacity: int,
        rng: np.random.Generator,
        prepare: Callable[[Sample], Any],
    ) -> None:
        if batch_size < 1 or capacity < batch_size:
            raise ValueError(f"the shuffle buffer ({capacity}) must hold at least one batch ({batch_size})")
        self.batch_size = batch_size
        self.capacity = capacity
        self.rng = rng
        self.prepare = prepare
        self.samples: list[Sample] = []
        self.peak = self.taken = 0
        self.dropped_repeats = self.dropped_bad = self.dropped_at_end = 0
        self._held: Counter[int] = Counter()  # shard → samples held
        self._ended: set[int] = set()  # shards read to the end
        self._done: list[int] = []  # shards done, not yet handed out with a batch

    def batches(self, stream: Iterable[Union[Sample, ShardEnd]]) -> Iterator[tuple[list[Any], list[Sample], list[int]]]:
        """``(prepared items, their samples, shards done)`` per batch of ``batch_size``."""
        for entry in stream:
            if isinstance(entry, ShardEnd):
                self._ended.add(entry.shard)
                if not self._held[entry.shard]:
                    self._done.append(entry.shard)
                continue
            self.samples.append(entry)
            self._held[entry.shard] += 1
            self.taken += 1
            self.peak = max(self.peak, len(self.samples))
            while len(self.samples) >= self.capacity:
                batch = self._draw()
                if batch is not None:
                    yield batch
                elif len(self.samples) >= self.capacity:  # too few distinct images held: make room
                    self._drop_repeat()
        while len(self.samples) >= self.batch_size:
            batch = self._draw()
            if batch is None:  # the samples left show fewer distinct usable images than a batch
                break
            yield batch
        self.dropped_at_end += len(self.samples)
        if self.samples:
            logger.debug(
                "%d sample(s) left at the end of a stream reader: fewer than a batch of distinct images",
                len(self.samples),
            )
        self._remove(set(range(len(self.samples))))

    def _draw(self) -> Optional[tuple[list[Any], list[Sample], list[int]]]:
        """A full batch of distinct images from the held samples, or None (the unusable ones are dropped)."""
        chosen: list[int] = []
        items: list[Any] = []
        digests: set[bytes] = set()
        bad: set[int] = set()
        for position in self.rng.permutation(len(self.samples)).tolist():
            sample = self.samples[position]
            if sample.digest in digests:
                continue
            item = self.prepare(sample)
            if item is None:
                bad.add(position)
                continue
            chosen.append(position)
            items.append(item)
            digests.add(sample.digest)
            if len(items) == self.batch_size:
                break
        self.dropped_bad += len(bad)
        if len(items) < self.batch_size:
            self._remove(bad)
            return None
        samples = [self.samples[p] for p in chosen]
        self._remove(bad | set(chosen))
        done, self._done = self._done, []
        return items, samples, done

    def _drop_repeat(self) -> None:
        """Drop one sample whose image another held sample shows too (chosen at random)."""
        seen = Counter(sample.digest for sample in self.samples)
        repeats = [p for p, sample in enumerate(self.samples) if seen[sample.digest] > 1]
        repeats = repeats or list(range(len(self.samples)))  # (not reached: distinct usable images fill a batch)
        self.dropped_repeats += 1
        if self.dropped_repeats == 1:
            logger.warning(
                "the shuffle buffer (%d) holds fewer distinct images than a batch (%d): samples that repeat an image "
                "are dropped; raise shuffle_buffer or interleave the repeated images' captions with others",
                self.capacity,
                self.batch_size,
            )
        self._remove({repeats[int(self.rng.integers(len(repeats)))]})

    def _remove(self, positions: set[int]) -> None:
        if not positions:
            return
        kept = []
        for position, sample in enumerate(self.samples):
            if position not in positions:
                kept.append(sample)
                continue
            self._held[sample.shard] -= 1
            if not self._held[sample.shard] and sample.shard in self._ended:
                self._done.append(sample.shard)
        self.samples = kept


__all__ = [
    "CAPTION_COLUMNS",
    "IMAGE_COLUMNS",
    "MAX_IN_MEMORY_PAIRS",
    "STREAM_CANNOT_CHOOSE",
    "STREAM_NEEDS_EVAL",
    "STREAM_NO_HARD_NEGATIVES",
    "Sample",
    "Shard",
    "ShardEnd",
    "ShuffleBuffer",
    "StreamError",
    "StreamSource",
    "check_stream_training",
    "count_tar",
    "expand_braces",
    "expand_shards",
    "is_stream_spec",
    "load_stream_pairs",
    "open_stream",
    "read_samples",
    "shard_plan",
    "source_files",
    "write_tar_shards",
]
