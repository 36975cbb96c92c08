"""Search feedback as training data: the events of the feedback log turned into image–text pairs with hard
negatives, split by time into pairs to train on, held-out pairs and a regression set. Jina-free, torch-free.

Each event of the log (:mod:`cliptuner.serve.feedback`) is one search as the person saw it: the query, the ids shown
(best first), the ids chosen ("good match") and the ids marked wrong ("not this"). The rules:

* **Queries.** A query is named by its key (:func:`query_key`): ``"text:<text>"`` for a text query, the text
  normalised (Unicode NFKC, case-folded, runs of whitespace made one space), so ``"Red  shoe"`` and ``"red shoe"``
  are one query; ``"image:<sha256 of the image bytes>"`` for an image query. A query with both a text and an image
  is a text query: the image is what the text described, and only the text is paired.
* **Positive pairs.** A text query is paired with the stored image of each chosen doc (a chosen doc without an
  image is skipped); an image query with the stored text of each chosen doc (one without text is skipped). Content
  is what the log copied from the index when the event arrived.
* **Hard negatives ("skip-above").** The docs the person passed over: those shown above the first chosen doc and
  not chosen, and the docs marked wrong (anywhere in the list); the wrong ones come first, then the skipped ones,
  each in the order shown. Each becomes a pair of its own (its stored text with its stored image; a doc lacking
  either is passed over) in the batch group of the query's pair, the query's pair first (it leads the group:
  :class:`cliptuner.train.data.GroupedBatchSampler`), so that the loss pushes the query away from those docs.
  One group per event and chosen doc, with at most :data:`MAX_HARD_NEGATIVES` negatives; a pair with no usable
  negative is in no group. A doc chosen for the same query in any event is never that query's negative.
* **Skipped events.** An event with no chosen id (only wrong ones) gives no pair (``skipped_no_choice``); a chosen
  doc without the content its pair needs gives none either (``skipped_no_content``, counted per event and doc).
* **Once per query and doc.** Identical positive pairs (the same query key and the same chosen doc) are kept once,
  with the hard negatives of the first event that gave it (``duplicates`` counts the others), so that a query
  chosen a hundred times does not dominate.
* **Split by time and by query.** A query is placed by the newest event it has. The queries held out by earlier runs
  (the *kept set*, ``<feedback root>/held_out.json``) form the *regression set*: they are never trained on, even when
  they get new events. Of the other queries that give a pair, ordered by their newest event, the newest
  ``ceil(holdout * n)`` are this run's *held-out set* (at least one when there are two or more, none when there is
  only one, never all of them, and none with ``holdout=0``); the rest are trained on. :func:`split_feedback` adds this run's held-out
  queries to the kept set, so later runs check them as their regression set. Held-out and regression pairs are the
  positive pairs only, without groups. Only a query first asked after the last split may be held out: an older one
  was trained on by an earlier run, and the version serving may have learnt it, which would bias the comparison.
* **Gallery.** The held-out and regression sets also hold every stored image of a doc the events showed (the newest
  :data:`GALLERY_MAX`) as gallery images without a caption (:attr:`PairSet.gallery`): each query is ranked against
  the candidates of a real search, not only against the few images chosen for the other held-out queries.
* **Images.** As encoded bytes; image ids ``"doc:<doc id>"`` for a stored doc's image and ``"query:<first 12 hex of
  its SHA-256>"`` for a query image.

``held_out.json`` is ``{"keys": [query key, ...], "through_seq": n}`` (sorted keys; the newest event seq the last
split saw), replaced atomically
(:func:`cliptuner.model.atomic.write_atomic`); a missing file is an empty kept set. Reading it and adding to it is
not one transaction: one :func:`split_feedback` at a time per feedback root (the tuner trains one run at a time).

Example::

    with FeedbackLog(workspace / FEEDBACK_SUBDIR) as log:
        split = split_feedback(log)  # ValueError when nothing is left to train on
    train, held_out, regression = split.train, split.held_out, split.regression
"""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from cliptuner.model.atomic import write_atomic
from cliptuner.serve.feedback import DocContent, FeedbackEvent, FeedbackLog, RecordedEvent
from cliptuner.train.data import NO_GROUP, PairSet, from_memory

HELD_OUT_FILE = "held_out.json"  # in the feedback root: the query keys held out so far (the kept set)
DEFAULT_HOLDOUT = 0.2  # share of the new queries (the newest) held out by a run
GALLERY_MAX = 5000  # stored doc images the held-out and regression queries are ranked against (the newest shown)
MAX_HARD_NEGATIVES = 5  # hard negatives per group (per event and chosen doc)
KEY_KINDS = ("text", "image")  # what a query key starts with, before the ':'
_QUERY_ID_HEX = 12  # hex digits of a query image's SHA-256 in its image id
_SPLIT_EPSILON = 1e-9  # so that ceil(0.14 * 50) is 7, not 8 (0.14 * 50 = 7.000000000000001)

__all__ = [
    "DEFAULT_HOLDOUT",
    "HELD_OUT_FILE",
    "MAX_HARD_NEGATIVES",
    "FeedbackSplit",
    "feedback_pairs",
    "held_out_count",
    "query_key",
    "read_kept",
    "split_feedback",
]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _normalised(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def query_key(event: FeedbackEvent) -> str:
    """The key that names an event's query: ``"text:<normalised text>"`` (NFKC, case-folded, whitespace runs made
    one space) when it has text, else ``"image:<sha256 of the image bytes>"``."""
    if event.query_text is not None:
        return f"text:{_normalised(event.query_text)}"
    return f"image:{_sha256(event.query_image)}"


def _text(content: Optional[DocContent]) -> Optional[str]:
    """A doc's stored text, None when it has none or only blanks."""
    if content is None or content.text is None or not content.text.strip():
        return None
    return content.text.strip()


def _image(content: Optional[DocContent]) -> Optional[bytes]:
    return None if content is None else content.image


@dataclass(frozen=True)
class _Pair:
    """One image–caption pair and the name of its image."""

    image: bytes
    caption: str
    image_id: str


@dataclass
class _Positive:
    """A query paired with one chosen doc, and the hard negatives of the first event that gave it."""

    key: str
    pair: _Pair
    negatives: list[_Pair]


@dataclass
class _Collected:
    """What the events give before the split: positives in event order, each query's newest seq, the counts."""

    positives: list[_Positive] = field(default_factory=list)
    newest: dict[str, int] = field(default_factory=dict)  # query key -> its newest event seq
    first: dict[str, int] = field(default_factory=dict)  # query key -> its first event seq
    used_events: dict[str, set[int]] = field(default_factory=dict)  # query key -> seqs of events that gave a pair
    events: int = 0
    skipped_no_choice: int = 0
    skipped_no_content: int = 0
    duplicates: int = 0
    through_seq: int = 0


def _negative_ids(event: FeedbackEvent, never: Collection[str]) -> list[str]:
    """The ids the person passed over, wrong ones first, then the ones skipped above the first choice; each in
    the order shown, each once, none of ``never``."""
    first = min(event.shown.index(doc_id) for doc_id in event.chosen)
    chosen = set(event.chosen)
    wrong = set(event.wrong)
    marked = [doc_id for doc_id in event.shown if doc_id in wrong]
    skipped = [doc_id for doc_id in event.shown[:first] if doc_id not in chosen and doc_id not in wrong]
    return [doc_id for doc_id in marked + skipped if doc_id not in never]


def _hard_negatives(event: FeedbackEvent, contents: Mapping[str, DocContent], never: Collection[str]) -> list[_Pair]:
    """The event's hard negatives that have both text and an image, at most :data:`MAX_HARD_NEGATIVES`."""
    negatives: list[_Pair] = []
    for doc_id in _negative_ids(event, never):
        text, image = _text(contents.get(doc_id)), _image(contents.get(doc_id))
        if text is None or image is None:
            continue
        negatives.append(_Pair(image, text, f"doc:{doc_id}"))
        if len(negatives) == MAX_HARD_NEGATIVES:
            break
    return negatives


def _positive_pair(event: FeedbackEvent, content: Optional[DocContent], doc_id: str) -> Optional[_Pair]:
    """The query paired with a chosen doc: a text query with the doc's image, an image query with the doc's text;
    None when the doc lacks it."""
    if event.query_text is not None:
        image = _image(content)
        return None if image is None else _Pair(image, event.query_text.strip(), f"doc:{doc_id}")
    text = _text(content)
    if text is None:
        return None
    return _Pair(event.query_image, text, f"query:{_sha256(event.query_image)[:_QUERY_ID_HEX]}")


def _collect(events: Iterable[RecordedEvent], contents: Mapping[str, DocContent]) -> _Collected:
    """The positive pairs (with their hard negatives) of the events, in seq order, and the counts."""
    ordered = sorted(events, key=lambda recorded: recorded.seq)
    chosen_for: dict[str, set[str]] = {}  # query key -> every doc chosen for it, in any event
    for recorded in ordered:
        chosen_for.setdefault(query_key(recorded.event), set()).update(recorded.event.chosen)
    collected = _Collected(events=len(ordered), through_seq=max((r.seq for r in ordered), default=0))
    seen: set[tuple[str, str]] = set()
    for recorded in ordered:
        event = recorded.event
        key = query_key(event)
        collected.newest[key] = max(collected.newest.get(key, 0), recorded.seq)
        collected.first.setdefault(key, recorded.seq)
        if not event.chosen:
            collected.skipped_no_choice += 1
            continue
        negatives: Optional[list[_Pair]] = None  # built once per event, when a chosen doc first needs them
        for doc_id in event.chosen:
            pair = _positive_pair(event, contents.get(doc_id), doc_id)
            if pair is None:
                collected.skipped_no_content += 1
                continue
            if (key, doc_id) in seen:
                collected.duplicates += 1
                continue
            seen.add((key, doc_id))
            if negatives is None:
                negatives = _hard_negatives(event, contents, chosen_for[key])
            collected.positives.append(_Positive(key, pair, negatives))
            collected.used_events.setdefault(key, set()).add(recorded.seq)
    return collected


def held_out_count(n: int, holdout: float) -> int:
    """How many of ``n`` new queries a run holds out: ``ceil(holdout * n)``, at least 1 when ``n >= 2`` and
    ``holdout > 0``, at most ``n - 1`` (one is left to train on); none when ``n <= 1``.

    Raises:
        ValueError: ``holdout`` is not a number in [0, 1).
    """
    _check_holdout(holdout)
    if n <= 1 or holdout == 0:
        return 0
    return min(n - 1, max(1, math.ceil(holdout * n - _SPLIT_EPSILON)))


def _check_holdout(holdout: float) -> None:
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
        raise ValueError(f"holdout must be a number in [0, 1) (the share of new queries held out), got {holdout!r}")


def _pair_set(positives: Sequence[_Positive], name: str, grouped: bool) -> Optional[PairSet]:
    """The pairs of ``positives``; with ``grouped`` each followed by its hard negatives, in one group."""
    pairs: list[_Pair] = []
    groups: list[int] = []
    next_group = 0
    for positive in positives:
        pairs.append(positive.pair)
        if grouped and positive.negatives:
            pairs.extend(positive.negatives)
            groups.extend([next_group] * (1 + len(positive.negatives)))
            next_group += 1
        else:
            groups.append(NO_GROUP)
    if not pairs:
        return None
    return from_memory(
        images=[p.image for p in pairs],
        captions=[p.caption for p in pairs],
        image_ids=[p.image_id for p in pairs],
        name=name,
        groups=groups if grouped else None,
    )


@dataclass(frozen=True)
class FeedbackSplit:
    """The feedback's pairs, split by query (see the module doc for the rules)."""

    train: Optional[PairSet]  # pairs to train on, with batch groups (hard negatives); None when none
    held_out: Optional[PairSet]  # positive pairs of this run's held-out queries (the newest share); None when none
    regression: Optional[PairSet]  # positive pairs of the queries earlier runs held out; never trained on
    counts: dict  # events, events_used, queries_*, pairs_*, hard_negatives, skipped_*, duplicates, through_seq
    held_out_keys: tuple[str, ...] = ()  # the query keys of ``held_out``, newest first


def _split(collected: _Collected, held_out_keys: Collection[str], regression_keys: Collection[str]) -> FeedbackSplit:
    """The pairs of ``collected`` in three parts by query key."""
    held_set, regression_set = set(held_out_keys), set(regression_keys)
    both = sorted(held_set & regression_set)
    if both:
        raise ValueError(f"query keys {both[:10]} are both held out and in the regression set; a query is in one")
    parts: dict[str, list[_Positive]] = {"train": [], "held_out": [], "regression": []}
    for positive in collected.positives:
        part = "regression" if positive.key in regression_set else "held_out" if positive.key in held_set else "train"
        parts[part].append(positive)
    train = _pair_set(parts["train"], "feedback", grouped=True)
    held_out = _pair_set(parts["held_out"], "feedback (held out)", grouped=False)
    regression = _pair_set(parts["regression"], "feedback (regression)", grouped=False)
    used = set().union(*collected.used_events.values()) if collected.used_events else set()
    counts = {
        "events": collected.events,
        "events_used": len(used),
        **{f"queries_{part}": len({p.key for p in positives}) for part, positives in parts.items()},
        **{f"pairs_{part}": len(positives) for part, positives in parts.items()},
        "hard_negatives": sum(len(p.negatives) for p in parts["train"]),
        "skipped_no_choice": collected.skipped_no_choice,
        "skipped_no_content": collected.skipped_no_content,
        "duplicates": collected.duplicates,
        "through_seq": collected.through_seq,
    }
    newest_first = sorted({p.key for p in parts["held_out"]}, key=lambda k: -collected.newest[k])
    return FeedbackSplit(train, held_out, regression, counts, tuple(newest_first))


def feedback_pairs(
    events: Iterable[RecordedEvent],
    contents: Mapping[str, DocContent],
    held_out_keys: Collection[str] = (),
    regression_keys: Collection[str] = (),
) -> FeedbackSplit:
    """The pairs of feedback events, split by the query keys given (no files are read or written).

    Args:
        events: recorded events (any order; taken in seq order).
        contents: doc id -> stored content, for the chosen, wrong and skipped docs of the events.
        held_out_keys: query keys whose positive pairs go to ``held_out``.
        regression_keys: query keys whose positive pairs go to ``regression``.

    Returns:
        The split; a part with no pair is None. ``counts`` holds ``events``, ``events_used`` (events that gave a
        pair kept), ``queries_train/held_out/regression`` (queries with a pair in each part),
        ``pairs_train/held_out/regression`` (positive pairs), ``hard_negatives`` (negative pairs in ``train``,
        so ``len(train) == pairs_train + hard_negatives``), ``skipped_no_choice``, ``skipped_no_content``,
        ``duplicates`` and ``through_seq`` (the newest seq among the events, 0 for none).

    Raises:
        ValueError: a key is both in ``held_out_keys`` and in ``regression_keys``.
    """
    events = list(events)
    return _with_gallery(_split(_collect(events, contents), held_out_keys, regression_keys), events, contents)


def _gallery_ids(events: Iterable[RecordedEvent]) -> list[str]:
    """Every doc the events showed, newest first, at most :data:`GALLERY_MAX`."""
    ids: dict[str, None] = {}
    for recorded in sorted(events, key=lambda r: -r.seq):
        ids.update(dict.fromkeys(recorded.event.shown))
    return list(ids)[:GALLERY_MAX]


def _with_gallery(
    split: FeedbackSplit, events: Iterable[RecordedEvent], contents: Mapping[str, DocContent]
) -> FeedbackSplit:
    """The held-out and regression pairs with every stored doc image the events showed as gallery images: a query
    is then measured against the other candidates of a real search, not only against the few images its part holds
    (among five images, recall@5 is 1.0 whatever the model)."""
    gallery = [(contents[i].image, f"doc:{i}") for i in _gallery_ids(events) if i in contents and contents[i].image]
    images, image_ids = [image for image, _ in gallery], [image_id for _, image_id in gallery]
    return replace(
        split,
        held_out=None if split.held_out is None else split.held_out.with_gallery(images, image_ids),
        regression=None if split.regression is None else split.regression.with_gallery(images, image_ids),
    )


def read_kept(root: Path) -> set[str]:
    """The kept set: the query keys held out by earlier runs (``<root>/held_out.json``; none when it is missing).

    Raises:
        ValueError: the file is not ``{"keys": [query key, ...], "through_seq": n}`` (names what is wrong).
    """
    return read_split_state(root)[0]


def read_split_state(root: Path) -> tuple[set[str], int]:
    """The kept set and the newest event seq the last split saw (0 before the first; also for a file without it).

    Raises:
        ValueError: see :func:`read_kept`.
    """
    path = Path(root) / HELD_OUT_FILE
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return set(), 0
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{HELD_OUT_FILE} is not JSON ({exc.msg} at line {exc.lineno})") from None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list):
        raise ValueError(f'{HELD_OUT_FILE} must hold {{"keys": [query key, ...]}}, got {type(data).__name__}')
    bad = [k for k in keys if not isinstance(k, str) or k.partition(":")[0] not in KEY_KINDS or ":" not in k]
    if bad:
        raise ValueError(
            f"{HELD_OUT_FILE}: query keys must start with one of {[k + ':' for k in KEY_KINDS]}, got {bad[0]!r}"
        )
    through = data.get("through_seq", 0)
    if isinstance(through, bool) or not isinstance(through, int) or through < 0:
        raise ValueError(f"{HELD_OUT_FILE}: through_seq must be an integer >= 0, got {through!r}")
    return set(keys), through


def _write_kept(root: Path, keys: Collection[str], through_seq: int) -> None:
    state = {"keys": sorted(keys), "through_seq": through_seq}
    write_atomic(Path(root) / HELD_OUT_FILE, json.dumps(state, ensure_ascii=False, indent=1) + "\n")


def _content_ids(events: Iterable[RecordedEvent]) -> list[str]:
    """The doc ids whose content the pairs of ``events`` may need: chosen, wrong, and shown above a choice."""
    ids: dict[str, None] = {}
    for recorded in events:
        event = recorded.event
        if not event.chosen:
            continue
        first = min(event.shown.index(doc_id) for doc_id in event.chosen)
        ids.update(dict.fromkeys(event.chosen + event.wrong + event.shown[:first]))
    return list(ids)


def split_feedback(log: FeedbackLog, holdout: float = DEFAULT_HOLDOUT, persist: bool = True) -> FeedbackSplit:
    """All the log's feedback as pairs: the kept set (``held_out.json``) as the regression set, the newest
    ``holdout`` share of the other queries held out, the rest to train on (see the module doc).

    Args:
        log: the feedback log; ``held_out.json`` lives in its root.
        holdout: the share of new queries held out, in [0, 1).
        persist: add this run's held-out queries to ``held_out.json``, so later runs use them as their regression
            set (False: a dry run that writes nothing).

    Raises:
        ValueError: ``holdout`` out of range, a bad ``held_out.json``, or no pair left to train on (the message
            names the counts); in every case nothing is written.
    """
    _check_holdout(holdout)
    root = Path(log.root)
    kept, seen_through = read_split_state(root)
    events = log.events()
    contents = log.contents(set(_content_ids(events)) | set(_gallery_ids(events)))
    collected = _collect(events, contents)
    # only queries first asked after the last split may be held out: an older one was trained on by an earlier run,
    # so the version serving may have learnt it, which would bias the comparison against the candidate
    fresh = {p.key for p in collected.positives if p.key not in kept and collected.first[p.key] > seen_through}
    newest_first = sorted(fresh, key=lambda key: -collected.newest[key])
    held = newest_first[: held_out_count(len(newest_first), holdout)]
    split = _split(collected, held, kept)
    if split.train is None:
        counts = split.counts
        raise ValueError(
            "no feedback to train on: "
            f"{counts['events']} event(s), {counts['skipped_no_choice']} without a chosen id, "
            f"{counts['skipped_no_content']} chosen doc(s) without the content a pair needs, "
            f"{counts['queries_regression']} query(ies) in the regression set (held out by earlier runs, never "
            f"trained on), {counts['queries_held_out']} held out now; record feedback on new queries"
        )
    if persist:
        _write_kept(root, kept | set(held), collected.through_seq)
    return _with_gallery(split, events, contents)
