"""Sharded indexing: what each indexer shard answers, and the ShardMerger that puts the answers together.

In flows/shards.yml the indexer runs as N shards. Jina sends ``/index``, ``/delete``, ``/search``, ``/status``,
``/train`` and ``/models/*`` to every shard (polling ALL) and anything else (``/encode``) to one; the head then
hands the N answers to the ShardMerger (``uses_after``), whose answer goes on to the client.

Each shard answers with its docs and one trailer doc (``id='__shard__'``) saying which shard it is, how many
there are, the model version it serves and the previous one it keeps during a swap, and, if it failed, why.
Jina's head passes a failed shard's request on as if it had succeeded, and drops a shard it could not reach;
the trailer is how the merger knows that every shard answered, and without error:

- ``/index`` and ``/delete``: a shard handles the docs it owns (:func:`cliptuner.index.shards.shard_of`) and answers
  with those, their positions in the request in the trailer; the merger puts them back in request order.
- ``/search``: every shard searches every query, in the version it serves and, while it keeps one, in its
  previous version; each match carries its ``model_version``. The merger picks the version every shard answered
  (:func:`cliptuner.index.shards.choose_version`) and keeps the best ``limit`` matches of that version over all
  shards, so a merged result never mixes versions, even while the shards swap one after another.
- ``/status``: one ``status-indexer`` doc, with the per-shard statuses under ``tags['shards']``.
- ``/train`` and ``/models/promote|rollback``: ``tags['index']`` sums the shards' counts.

A shard that failed makes the merger fail the request with the shard's message; for a ``/delete``, the other
shards may have removed their part (the message says which ids).
"""

from typing import Any, Optional

from docarray import DocList
from jina import Executor, requests

from cliptuner.index.shards import choose_version, merge_hits, shard_of

from .schemas import ClipDoc, MatchDoc

TRAILER_ID = "__shard__"
STATUS_ID = "status-indexer"


def trailer(shard: int, shards: int, version: Optional[str], previous: Optional[str] = None, **extra: Any) -> ClipDoc:
    """The doc a shard appends to its answer (see the module doc)."""
    return ClipDoc(
        id=TRAILER_ID, model_version=version, tags={"shard": shard, "shards": shards, "previous": previous, **extra}
    )


def _answers(docs_matrix: Optional[list]) -> list[tuple[dict, ClipDoc, DocList]]:
    """Per shard, ordered by shard: (trailer tags, trailer, docs without the trailer).

    Raises:
        ValueError: a shard is missing or reported an error (names it).
    """
    got: dict[int, tuple[dict, ClipDoc, DocList]] = {}
    expected: Optional[int] = None
    for answer in docs_matrix or []:
        marks = [d for d in answer if d.id == TRAILER_ID]
        if not marks:
            continue  # a shard whose request failed before the indexer ran: counted as missing below
        mark = marks[-1]
        tags = dict(mark.tags)
        shard, shards = int(tags["shard"]), int(tags["shards"])
        expected = shards if expected is None else expected
        if shards != expected:
            raise ValueError(f"index shards disagree on their number ({shards} and {expected})")
        got[shard] = (tags, mark, DocList[ClipDoc]([d for d in answer if d.id != TRAILER_ID]))
    if expected is None:
        raise ValueError("no index shard answered")
    errors: dict[str, list[int]] = {}  # a bad request fails the same way on every shard: say it once
    for i in sorted(got):
        if got[i][0].get("error"):
            errors.setdefault(str(got[i][0]["error"]), []).append(i)
    if errors:
        raise ValueError(
            "; ".join(
                f"shard{'s' if len(on) > 1 else ''} {', '.join(map(str, on))}: {message}"
                for message, on in errors.items()
            )
        )
    missing = [i for i in range(expected) if i not in got]
    if missing:
        raise ValueError(
            f"index shard(s) {missing} of {expected} did not answer; nothing of theirs is in this "
            "answer (see their logs)"
        )
    return [got[i] for i in range(expected)]


def _in_request_order(answers: list[tuple[dict, ClipDoc, DocList]]) -> DocList[ClipDoc]:
    placed: dict[int, ClipDoc] = {}
    for tags, _, docs in answers:
        for position, doc in zip(tags.get("positions") or [], docs):
            placed[int(position)] = doc
    return DocList[ClipDoc]([placed[i] for i in sorted(placed)])


class ShardMerger(Executor):
    """Merges the answers of N indexer shards (the ``uses_after`` of the sharded indexer in flows/shards.yml)."""

    @requests(on=["/index", "/delete"])
    async def by_owner(
        self, docs: DocList[ClipDoc], docs_matrix: Optional[list] = None, **kwargs: Any
    ) -> DocList[ClipDoc]:
        """Each doc as its owning shard answered it, in request order."""
        try:
            return _in_request_order(_answers(docs_matrix))
        except ValueError as exc:
            done = [
                d.id for answer in docs_matrix or [] for d in answer if d.id != TRAILER_ID and d.tags.get("deleted")
            ]
            if done:
                shown = ", ".join(repr(i) for i in done[:10]) + (", ..." if len(done) > 10 else "")
                raise ValueError(f"{exc} (on that shard); the other shards removed their part: {shown}") from None
            raise

    @requests(on="/feedback")
    async def feedback(
        self, docs: DocList[ClipDoc], docs_matrix: Optional[list] = None, **kwargs: Any
    ) -> DocList[ClipDoc]:
        """Each event as the shards answered it: ``stored`` when a shard stored it now (every shard writes the event
        and the content of its own docs)."""
        try:
            answers = _answers(docs_matrix)
        except ValueError as exc:
            raise ValueError(
                f"{exc} (the other shards may have kept the event; its pairs use only stored docs)"
            ) from None
        out = answers[0][2]
        for i, doc in enumerate(out):
            stored = [shard_docs[i].tags.get("feedback", {}).get("stored") for _, _, shard_docs in answers]
            doc.tags["feedback"] = {"event_id": doc.id, "stored": any(stored)}
        return out

    @requests(on="/search")
    async def search(
        self, docs: DocList[ClipDoc], docs_matrix: Optional[list] = None, **kwargs: Any
    ) -> DocList[ClipDoc]:
        """Per query, the best ``limit`` matches over all shards, all of one model version."""
        answers = _answers(docs_matrix)
        version = choose_version([(mark.model_version, tags.get("answered") or []) for tags, mark, _ in answers])
        limit = max(int(tags.get("limit") or 0) for tags, _, _ in answers)
        # the query docs (their embedding and model_version) of a shard that serves the chosen version
        queries = next(
            docs
            for tags, mark, docs in answers
            if mark.model_version == version and version in (tags.get("answered") or [])
        )
        for q, query in enumerate(queries):
            rows, found = [], {}
            for _, _, shard_docs in answers:
                matches = [m for m in (shard_docs[q].matches or []) if m.model_version == version]
                rows.append([(m.id, float(m.score)) for m in matches])
                found.update((m.id, m) for m in matches)
            best = merge_hits(rows, limit)
            query.matches = DocList[MatchDoc]([found[doc_id] for doc_id, _ in best])
            query.scores = [score for _, score in best]
        return queries

    @requests(on="/status")
    async def status(
        self, docs: DocList[ClipDoc], docs_matrix: Optional[list] = None, **kwargs: Any
    ) -> DocList[ClipDoc]:
        """The request's docs, then one status doc for the sharded indexer."""
        answers = _answers(docs_matrix)
        states = [dict(next(d for d in shard_docs if d.id == STATUS_ID).tags) for _, _, shard_docs in answers]
        versions = sorted({s.get("model_version") for s in states}, key=str)
        summary = {
            "executor": "CLIPIndexer",
            "shards": states,
            "count": sum(int(s.get("count") or 0) for s in states),
            "model_version": versions[0] if len(versions) == 1 else versions,
            "rebuilding": any(s.get("rebuilding") for s in states),
            "last_error": "; ".join(
                f"shard {i}: {s['last_error']}" for i, s in enumerate(states) if s.get("last_error")
            )
            or None,
        }
        out = DocList[ClipDoc]([d for d in answers[0][2] if d.id != STATUS_ID])
        out.append(ClipDoc(id=STATUS_ID, model_version=versions[0] if len(versions) == 1 else None, tags=summary))
        return out

    @requests(on=["/train", "/models/promote", "/models/rollback"])
    async def moved(
        self, docs: DocList[ClipDoc], docs_matrix: Optional[list] = None, **kwargs: Any
    ) -> DocList[ClipDoc]:
        """The docs as the first shard answered, ``tags['index']`` summed over the shards."""
        answers = _answers(docs_matrix)
        per_shard = [[dict(d.tags.get("index") or {}) for d in shard_docs] for _, _, shard_docs in answers]
        out = answers[0][2]
        for i, doc in enumerate(out):
            parts = [shard[i] for shard in per_shard if i < len(shard)]
            versions = sorted({p.get("model_version") for p in parts}, key=str)
            seconds = [p["rebuild_seconds"] for p in parts if p.get("rebuild_seconds") is not None]
            doc.tags["index"] = {
                "model_version": versions[0] if len(versions) == 1 else versions,
                "count": sum(int(p.get("count") or 0) for p in parts),
                "rebuild_seconds": max(seconds) if seconds else None,
                "shards": len(parts),
            }
        return out

    @requests
    async def passthrough(
        self, docs: DocList[ClipDoc], docs_matrix: Optional[list] = None, **kwargs: Any
    ) -> DocList[ClipDoc]:
        """Endpoints that reach one shard (``/encode``): its answer as it is."""
        answers = [answer for answer in docs_matrix or [] if len(answer)]
        return answers[0] if answers else docs


__all__ = ["ShardMerger", "TRAILER_ID", "trailer", "shard_of"]
