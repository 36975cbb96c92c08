"""Sharding rules of the embedded index: which shard owns a doc, and which model version a merged search uses.

A sharded indexer is N processes, each with its own collection (``<workspace>/index/<shard>``). Jina sends
``/index``, ``/delete`` and ``/search`` to all of them (polling ALL); each keeps only the docs it owns
(:func:`shard_of`), and a merger after them (``executors.shards.ShardMerger``) puts the N answers together.

Versions across shards: each shard moves to a new model version on its own (a rebuild per shard), so for a
moment some shards hold the new version and some the old one. A shard that has swapped keeps the old version's
vectors searchable (its *previous* version) until every shard has swapped, and answers a search in both. The
merger then uses one version that every shard answered (:func:`choose_version`), so a merged result never
compares or mixes vectors of two versions.

Torch-free and Jina-free: the standard library only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Optional

from cliptuner.model.atomic import write_atomic

SHARD_FILE_PREFIX = "shard-"  # <index root>/shard-<i>.json: {"version": ...}, the version shard i serves


def check_shards(shard: object, shards: object) -> tuple[int, int]:
    """``(shard, shards)`` as ints with ``0 <= shard < shards``, or a ValueError naming the bad value."""
    for name, value in (("shards", shards), ("shard", shard)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if not 0 <= shard < shards:
        raise ValueError(f"shard must be in [0, {shards}), got {shard}")
    return shard, shards


def shard_of(doc_id: str, shards: int) -> int:
    """The shard that owns ``doc_id``: a stable hash of its UTF-8 bytes modulo ``shards``.

    Stable across processes, machines and Python versions (blake2b, not ``hash()``), so every shard and the
    merger agree, and a restarted service routes an id where it routed it before. Changing ``shards`` moves
    docs: re-index into a fresh workspace to change the shard count.
    """
    if shards == 1:
        return 0
    digest = hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def choose_version(held: Sequence[tuple[Optional[str], Collection[str]]]) -> str:
    """The model version a merged search uses, from each shard's ``(version it serves, versions it answered)``.

    A shard answers in the version it serves and, while it keeps one after a swap, in its previous version. The
    chosen version is one every shard answered and some shard serves (so that shard's query embedding is of it);
    among several, the one most shards serve. While a swap is under way (some shards on the new version with the
    old one kept, the others still on the old one) that is the old version; once every shard has swapped, the
    new one.

    Raises:
        ValueError: no version was answered by every shard (a shard restarted mid-swap and lost its previous
            version, say); the message names what each shard answered.
    """
    if not held:
        raise ValueError("no shard answered")
    common = set.intersection(*(set(answered) for _, answered in held))
    serving = [version for version, answered in held if version in answered]
    candidates = [v for v in common if v in serving]
    if not candidates:
        shown = ", ".join(f"shard {i} serves {v!r} and answered {sorted(a)}" for i, (v, a) in enumerate(held))
        raise ValueError(
            f"the index shards answered in no model version in common ({shown}); a swap is under "
            "way, retry when it has finished"
        )
    return max(candidates, key=lambda v: (serving.count(v), v))


def merge_hits(rows: Iterable[Sequence[tuple[str, float]]], limit: int) -> list[tuple[str, float]]:
    """The best ``limit`` of several shards' ``(id, score)`` lists, best first (ties by id, so repeatable)."""
    merged = [hit for row in rows for hit in row]
    merged.sort(key=lambda hit: (-hit[1], hit[0]))
    return merged[:limit]


def shard_file(index_root: Path, shard: int) -> Path:
    return Path(index_root) / f"{SHARD_FILE_PREFIX}{shard}.json"


def record_version(index_root: Path, shard: int, version: Optional[str]) -> None:
    """Say, for the other shards, which version shard ``shard`` serves (an atomic write)."""
    write_atomic(shard_file(index_root, shard), json.dumps({"version": version}).encode())


def versions_served(index_root: Path, shards: int) -> list[Optional[str]]:
    """What every shard last recorded (None for a shard that has recorded nothing readable yet)."""
    out: list[Optional[str]] = []
    for i in range(shards):
        try:
            out.append(json.loads(shard_file(index_root, i).read_text()).get("version"))
        except (OSError, ValueError, AttributeError):
            out.append(None)
    return out
