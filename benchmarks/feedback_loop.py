"""The service learning from its users: simulated searches and clicks → ``/feedback`` → ``auto_train`` → the gate,
measured as recall@5 on captions that nobody searched.

**Data** (the demo's, :func:`cliptuner.cli.demo.write_domain`): ``--n-images`` ``domain`` scenes of data seed
``--data-seed`` (the demo's 600 and 0) with ``--captions`` captions each; the demo's held-out share of the images
(0.2) is the **gallery**, indexed through ``/index`` as images (a uri under the data root, no text). Of each
gallery image's captions the last is **never searched**: these captions are the measurement. The others form the
**pool** users search with. A never-searched caption whose text (normalised as the feedback log normalises query
keys) is also in the pool, or that describes two images, is dropped, and so is a pool caption that describes two
images; so recall on the never-searched captions is recall on phrasings of the gallery's images that no search
ever sent.

**Users and clicks** (a position-based click model): a user draws a pool caption (uniformly, with replacement) and
sends it to ``/search`` (``--limit`` 10: the results shown). Rank r is examined with probability r^-``--examination``
(1/r^0.7: rank 1 always, rank 5 one time in three, rank 10 one time in five). The user clicks only when the image
the caption describes is shown and examined; nine clicks in ten land on it, one in ten (``--wrong-rate``) on another
shown result, drawn with the same position bias (a mistake). A search without a click sends nothing; a click sends
one ``/feedback`` event: the query's text, the version that answered, the ids shown, the id chosen. Many users search
at once: ``--batch`` query docs per ``/search`` request.

**Rounds.** The service runs with ``--auto-train '{"min_events": K, "min_queries": M, "check_every_s": 2, "parameters":
{...}}'`` (``--events``, ``--min-queries``; each run ``--epochs``, ``--batch-size``, ``--lr``; the gate's options are
the service's defaults, ``gate_metric`` ``mean_r5``, ``min_gain`` 0, ``max_regression`` 0.01, unless ``--gate-metric``
names another metric). A round sends events until K events over at least M distinct queries have been sent since the
last run, then stops; the tuner starts a run on the whole feedback by itself, and the benchmark waits for its outcome
(``/status``: ``auto_train.last_run``, then ``training``): promoted (it then waits until the encoder and the indexer
serve the new version), refused by the gate (the same version keeps serving), or failed. Then it measures recall
(R@1/5/10, text → image) on the never-searched captions, and on the pool, through ``/search`` (each answer must come
from the version serving). Round 0 is the start version, before any click. ``--rounds`` rounds at most; a round that
cannot gather its events within ``--max-searches`` searches ends the arm (said in ``stopped``).

**Two arms** (``--arms``), each a service of its own on the same data, the same users' seed and the same settings:
``gated`` (the service's gate decides each run) and ``ungated`` (the runs set ``gate: false``: every finished run is
promoted), so the table shows what the clicks teach and what the gate lets through. The gate measures each run on the
feedback queries it held out (only queries first asked since the run before; when none is new, on the queries earlier
runs held out, the regression set), each ranked against every gallery image shown by a search that sent feedback. For
each run the benchmark also reads the feedback log's kept set (``<workspace>/feedback/held_out.json``, the one thing it
reads from the workspace rather than over gRPC) and audits it: of the run's held-out queries (those it added to the kept
set) and of its regression queries (the kept set before it), how many the serving version's weights had been trained on
by an earlier run (``held_out_trained``, ``regression_trained``). The gate compares "serving vs candidate" on them, so
each of these would favour the serving version; both should be 0.

**A harmful candidate** (in the ``gated`` arm, after its rounds): a ``/train`` (``wait=False``, followed through
``/status``) on a PAIRS file of the demo's training images (never in the gallery) whose captions were shuffled across
the images, with a clean held-out PAIRS file (other training images, their own captions) as ``eval_data``,
``--harmful-epochs`` epochs, the service's default gate. The gate must refuse it; the benchmark checks that the same
version serves and that the never-searched recall through ``/search`` is the same as before the run, and lists
``/models``.

Base model: ``--base demo``, the demo's pretrained ``cliptuner-tiny`` (generic scenes; cached by ``cliptuner demo``,
pretrained here first if the cache lacks it, a few minutes once) or ``--base random`` (random init). Threads: the
service runs with ``OMP_NUM_THREADS=--threads`` and its training processes with ``CLIPTUNER_TORCH_THREADS=--threads``
(no search runs while a round's training runs).

    python benchmarks/feedback_loop.py                 # full: the demo's base and data (5-17 minutes, 2 cores)
    python benchmarks/feedback_loop.py --quick         # random init, 40 gallery images, 2 rounds (about 2 minutes)
    python benchmarks/feedback_loop.py --arms gated --rounds 3      # one arm, fewer rounds

Returns (and ``--json`` writes): ``arms`` (per arm: ``name``, ``gate``, ``auto_train`` (the policy), ``gate_options``
(the gate's options in effect), ``rounds`` (per round: ``round``, ``searches``, ``clicks``, ``wrong_clicks``,
``queries`` (distinct queries clicked so far), ``run`` (``run_id``, ``state``, ``candidate``, ``promoted``, ``reason``,
``held_out`` (the gate's recall of serving and candidate), ``held_out_from`` (what the gate measured on, in the
service's words), ``eval_pairs`` and ``eval_images`` (its size, gallery images included), ``feedback`` (the run's split
counts), ``audit`` (``held_out_queries``, ``held_out_trained``, ``regression_queries``, ``regression_trained``,
``trained_queries``), ``wall_s``), ``serving``, ``unseen`` and ``pool`` (recall dicts), ``wall_s``), ``start_r5``,
``final_r5``, ``clicks_for`` ({"10": clicks or None, "30": ...}: the clicks sent before the first measurement at least
that many points of never-searched R@5 above round 0), ``stopped``, ``models`` (version → status), ``wall_s``),
``harmful`` (the run, the gate's decision and numbers, serving and recall before and after, ``unchanged``, the data's
counts; None without the gated arm), ``data``, ``settings``, ``click_model``, and ``machine``, ``python``, ``versions``,
``threads``, ``wall_s``, ``command``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import unicodedata
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL = {
    "base": "demo",
    "n_images": 600,
    "captions": 4,
    "events": 60,
    "min_queries": 30,
    "rounds": 6,
    "epochs": 10,
    "batch_size": 8,
    "max_searches": 6000,
    "harmful_epochs": 1,
}
QUICK = {
    "base": "random",
    "n_images": 200,
    "captions": 3,
    "events": 20,
    "min_queries": 10,
    "rounds": 2,
    "epochs": 2,
    "batch_size": 4,
    "max_searches": 1500,
    "harmful_epochs": 1,
}
ARMS = {"gated": True, "ungated": False}  # arm name -> whether its runs are gated
POINTS = (10, 30)  # the gains (points of never-searched R@5 over the start) whose clicks are reported
HARMFUL_TRAIN = "harmful-shuffled.csv"  # under the data root: training images, captions shuffled across them
HARMFUL_EVAL = "harmful-clean-eval.csv"  # other training images with their own captions: labelled eval pairs
WAIT_S = 1800.0  # the most a round waits for its run


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help=f"quick sizes: {QUICK} (each can still be set by its option)")
    p.add_argument(
        "--arms",
        nargs="+",
        choices=tuple(ARMS),
        default=list(ARMS),
        help="gated: the gate decides each run; ungated: every finished run is promoted",
    )
    p.add_argument(
        "--base",
        choices=("demo", "random"),
        default=None,
        help=f"the first version: the demo's pretrained base, or random init (full: {FULL['base']}; quick: "
        f"{QUICK['base']})",
    )
    p.add_argument("--n-images", type=int, default=None, help="domain scenes drawn; the demo's 0.2 is the gallery")
    p.add_argument("--captions", type=int, default=None, help="captions per scene: the last is never searched")
    p.add_argument("--data-seed", type=int, default=0, help="the scenes' seed (the demo's: 0)")
    p.add_argument("--events", type=int, default=None, help="auto_train min_events: feedback events per round (K)")
    p.add_argument("--min-queries", type=int, default=None, help="auto_train min_queries: distinct queries per round")
    p.add_argument("--rounds", type=int, default=None, help="rounds at most, per arm")
    p.add_argument("--max-searches", type=int, default=None, help="searches a round may take to gather its events")
    p.add_argument("--epochs", type=int, default=None, help="epochs of each automatic run")
    p.add_argument("--batch-size", type=int, default=None, help="batch size of each automatic run")
    p.add_argument("--lr", type=float, default=6e-4, help="learning rate of every run (the demo's)")
    p.add_argument(
        "--gate-metric",
        default=None,
        help="gate_metric of the automatic runs (default: the service's, mean_r5); min_gain and max_regression are "
        "always the service's",
    )
    p.add_argument("--harmful-epochs", type=int, default=None, help="epochs of the run on shuffled captions")
    p.add_argument(
        "--no-labelled-eval",
        dest="labelled_eval",
        action="store_false",
        help="automatic runs without eval_data: the gate measures them on the held-out feedback queries alone, which "
        "lean toward the version serving (default: the clean pairs of other domain images join them)",
    )
    p.add_argument("--limit", type=int, default=10, help="results shown per search")
    p.add_argument("--examination", type=float, default=0.7, help="rank r is examined with probability r^-this")
    p.add_argument("--wrong-rate", type=float, default=0.1, help="share of clicks that land on a wrong result")
    p.add_argument("--batch", type=int, default=32, help="searches per /search request (users searching at once)")
    p.add_argument("--seed", type=int, default=0, help="seed of the users (queries and clicks) and of every run")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the service and its training threads")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.captions < 2:
        p.error(f"--captions must be >= 2 (one never searched, the others searched), got {args.captions}")
    if not 0 <= args.wrong_rate < 1 or args.examination < 0 or args.limit < 2:
        p.error("need 0 <= --wrong-rate < 1, --examination >= 0 and --limit >= 2")
    args.arms = [arm for arm in ARMS if arm in args.arms]  # gated first: the harmful run follows its rounds
    return args


# -- the users ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ClickModel:
    """Which result a user chooses among those shown (a position-based model; see the module's docstring)."""

    examination: float = 0.7  # rank r (1-based) is examined with probability r ** -examination
    wrong_rate: float = 0.1  # share of clicks that land on another shown result than the described one

    def examined(self, rank: int) -> float:
        return float(rank) ** -self.examination

    def choose(self, shown: list[str], described: str, rng: np.random.Generator) -> Optional[str]:
        """The id the user clicks, or None (the described image not shown, or not examined)."""
        if described not in shown or rng.random() >= self.examined(shown.index(described) + 1):
            return None
        others = [rank for rank, doc_id in enumerate(shown, start=1) if doc_id != described]
        if not others or rng.random() >= self.wrong_rate:
            return described
        weights = np.array([self.examined(rank) for rank in others])
        return shown[others[int(rng.choice(len(others), p=weights / weights.sum()))] - 1]

    def describe(self) -> str:
        return (
            f"position-based: rank r examined with probability 1/r^{self.examination:g}; a click only when the "
            f"described image is shown and examined; {100 * self.wrong_rate:g} % of clicks land on another shown "
            "result (drawn with the same position bias)"
        )


def query_key(text: str) -> str:
    """A caption as the feedback log names its query: ``text:`` and the text NFKC-normalised, case-folded, its runs
    of whitespace made one space (:func:`cliptuner.serve.feedback_pairs.query_key`)."""
    return "text:" + " ".join(unicodedata.normalize("NFKC", text).casefold().split())


@dataclasses.dataclass(frozen=True)
class SearchSets:
    """The captions users search with (the pool) and the never-searched ones, each with the gallery id it describes."""

    pool: list[str]
    pool_ids: list[str]
    unseen: list[str]
    unseen_ids: list[str]
    dropped: int  # captions left out: shared by two images, or a never-searched one also in the pool


def search_sets(captions: list[str], caption_image: list[int], gallery_ids: list[str], per_image: int) -> SearchSets:
    """Split the gallery's captions: the last of each image never searched, the others the pool (module docstring)."""
    images_of: dict[str, set[int]] = {}
    by_image: dict[int, list[str]] = {}
    for caption, image in zip(captions, caption_image):
        images_of.setdefault(query_key(caption), set()).add(image)
        by_image.setdefault(image, []).append(caption)
    pool, pool_ids, unseen, unseen_ids, dropped, pool_keys = [], [], [], [], 0, set()
    for searched, part in ((True, slice(None, per_image - 1)), (False, slice(per_image - 1, None))):
        for image, texts in sorted(by_image.items()):
            for caption in texts[part]:
                key = query_key(caption)
                if len(images_of[key]) > 1 or key in pool_keys:
                    dropped += 1
                    continue
                if searched:
                    pool_keys.add(key)
                (pool if searched else unseen).append(caption)
                (pool_ids if searched else unseen_ids).append(gallery_ids[image])
    return SearchSets(pool, pool_ids, unseen, unseen_ids, dropped)


# -- the service, over gRPC --------------------------------------------------------------------------------------
class Service:
    """What the benchmark sends the Flow: the gallery, searches, feedback events, /status, /models and /train."""

    def __init__(self, port: int, batch: int) -> None:
        from docarray import DocList
        from jina import Client

        from executors.schemas import ClipDoc

        self.docs, self.doc = DocList[ClipDoc], ClipDoc
        self.client = Client(host="127.0.0.1", port=port, protocol="grpc")
        self.port = port
        self.batch = batch

    def post(self, on: str, docs=None, **kwargs):
        docs = self.docs([]) if docs is None else docs
        return self.client.post(on, inputs=docs, return_type=self.docs, request_size=max(1, len(docs)), **kwargs)

    def status(self) -> dict[str, dict]:
        from cliptuner.cli.demo import service_status

        return service_status(self.client)

    def models(self) -> dict[str, str]:
        """Each published version's status: ``current``, ``candidate`` or ``published``."""
        return {doc.id: str(doc.tags.get("status")) for doc in self.post("/models")}

    def index(self, ids: list[str], uris: list[str]) -> None:
        for start in range(0, len(ids), 64):
            chunk = range(start, min(start + 64, len(ids)))
            self.post("/index", self.docs([self.doc(id=ids[i], uri=uris[i]) for i in chunk]))

    def search(self, texts: list[str], limit: int) -> list[tuple[str, list[str]]]:
        """``(model version, result ids best first)`` per text, ``self.batch`` texts a request."""
        out = []
        for start in range(0, len(texts), self.batch):
            chunk = texts[start : start + self.batch]
            queries = self.docs([self.doc(id=f"q{start + i}", text=text) for i, text in enumerate(chunk)])
            answer = {doc.id: doc for doc in self.post("/search", queries, parameters={"limit": limit})}
            for i in range(len(chunk)):
                doc = answer[f"q{start + i}"]
                out.append((doc.model_version, [m.id for m in doc.matches]))
        return out

    def feedback(self, events: list[dict]) -> None:
        """One /feedback request of ``events`` (``{"id", "text", "version", "shown", "chosen"}``); each is new."""
        if not events:
            return
        docs = self.docs(
            [
                self.doc(
                    id=e["id"],
                    text=e["text"],
                    model_version=e["version"],
                    tags={"shown": e["shown"], "chosen": [e["chosen"]]},
                )
                for e in events
            ]
        )
        stored = [doc.tags["feedback"]["stored"] for doc in self.post("/feedback", docs)]
        if not all(stored):
            raise RuntimeError(f"/feedback stored {sum(stored)} of {len(stored)} new events")

    def recall(self, texts: list[str], truth: list[str], limit: int, version: str) -> dict[str, float]:
        """R@1/5/10 text → image through /search; every answer must come from ``version``."""
        answers = self.search(texts, max(10, limit))
        versions = {v for v, _ in answers}
        if versions != {version}:
            raise RuntimeError(f"searches were answered by {sorted(versions)}, not by the version serving, {version}")
        ranks = [ids.index(t) + 1 if t in ids else len(ids) + 1 for (_, ids), t in zip(answers, truth)]
        return {f"r{k}": round(float(np.mean([r <= k for r in ranks])), 4) for k in (1, 5, 10)}

    def serving(self) -> str:
        """The version the encoder and the indexer serve (they must agree)."""
        status = self.status()
        encoder, indexer = status["encoder"].get("model_version"), status["indexer"].get("model_version")
        if encoder != indexer:
            raise RuntimeError(f"the encoder serves {encoder} and the indexer {indexer}")
        return str(encoder)


def wait_until(condition, timeout: float, what: str, poll_s: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def measure(service: Service, sets: SearchSets, args: argparse.Namespace, version: str) -> dict:
    return {
        "unseen": service.recall(sets.unseen, sets.unseen_ids, args.limit, version),
        "pool": service.recall(sets.pool, sets.pool_ids, args.limit, version),
    }


# -- one round ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Clicks:
    """The clicks sent so far: the totals, and the events and queries since the last run."""

    searches: int = 0
    events: int = 0
    wrong: int = 0
    queries: set = dataclasses.field(default_factory=set)  # pool indices clicked, all rounds
    round_events: int = 0
    round_queries: set = dataclasses.field(default_factory=set)

    def enough(self, events: int, queries: int) -> bool:
        return self.round_events >= events and len(self.round_queries) >= queries


def click_round(
    service: Service,
    sets: SearchSets,
    model: ClickModel,
    rng: np.random.Generator,
    clicks: Clicks,
    args: argparse.Namespace,
    serving: str,
    round_no: int,
) -> bool:
    """Search and click until the round's K events over M queries are sent (True), or ``--max-searches`` (False).

    The events of each ``/search`` request go in one ``/feedback`` request; the last stops at the thresholds, so the
    tuner's policy sees them met once, by all of the round's events.
    """
    clicks.round_events, clicks.round_queries, searched = 0, set(), 0
    while not clicks.enough(args.events, args.min_queries):
        if searched >= args.max_searches:
            return False
        picks = [int(i) for i in rng.integers(len(sets.pool), size=args.batch)]
        answers = service.search([sets.pool[i] for i in picks], args.limit)
        events = []
        for i, (version, shown) in zip(picks, answers):
            searched += 1
            clicks.searches += 1
            if version != serving:
                raise RuntimeError(f"a search was answered by {version} while {serving} serves")
            chosen = model.choose(shown, sets.pool_ids[i], rng)
            if chosen is None:
                continue
            event_id = f"r{round_no}-e{clicks.events}"
            events.append({"id": event_id, "text": sets.pool[i], "version": version, "shown": shown, "chosen": chosen})
            clicks.events += 1
            clicks.round_events += 1
            clicks.wrong += chosen != sets.pool_ids[i]
            clicks.queries.add(i)
            clicks.round_queries.add(i)
            if clicks.enough(args.events, args.min_queries):
                break
        service.feedback(events)
    return True


def follow_auto_run(service: Service, through_seq: int) -> dict:
    """Wait for the auto_train run on the events up to ``through_seq``, then for its end; the tuner's view of it."""

    def started() -> Optional[dict]:
        tuner = service.status()["tuner"]
        last = (tuner.get("auto_train") or {}).get("last_run") or {}
        return last if last.get("run_id") and int(last.get("through_seq", 0)) >= through_seq else None

    run_id = wait_until(started, 120, f"auto_train to start a run on the events through seq {through_seq}")["run_id"]

    def ended() -> Optional[dict]:
        tuner = service.status()["tuner"]
        training = tuner.get("training") or {}
        if training.get("run_id") == run_id and training.get("state") in ("done", "failed", "cancelled"):
            return {"training": training, "report": tuner.get("last_report") or {}}
        return None

    return {"run_id": run_id, **wait_until(ended, WAIT_S, f"run {run_id} to end")}


def run_summary(outcome: dict) -> dict:
    """A run's outcome as the round table needs it: state, candidate, gate decision and numbers, split counts."""
    training, report = outcome["training"], outcome["report"]
    done = training.get("state") == "done"
    summary: dict[str, Any] = {
        "run_id": outcome.get("run_id", training.get("run_id")),
        "state": training.get("state"),
        "candidate": training.get("model_version") if done else None,
        "promoted": bool(training.get("promoted")) if done else False,
        "reason": training.get("gate") if done else training.get("error"),
        "wall_s": training.get("wall_seconds"),
    }
    if done and report.get("model_version") == training.get("model_version"):
        summary["held_out"] = {
            "serving": {k: report["before"].get(k) for k in ("t2i_r5", "i2t_r5", "mean_recall")},
            "candidate": {k: report["after"].get(k) for k in ("t2i_r5", "i2t_r5", "mean_recall")},
        }
        split = report.get("split") or {}
        summary["feedback"] = split.get("feedback")
        summary["held_out_from"] = split.get("held_out")
        summary["eval_pairs"] = split.get("eval_pairs")  # what the gate measured: pairs, and images (gallery too)
        summary["eval_images"] = split.get("eval_images")
    return summary


class HeldOutAudit:
    """Which of the queries a run was measured on the serving version's weights were trained on (the service holds
    out only queries that no run trained on, so both counts should be 0).

    A run's held-out queries are the ones its run added to the kept set (``held_out.json`` in the feedback log's
    folder); its regression queries are the kept set before it; it trained on every other clicked query. A version's
    weights have seen the queries its own run trained on and those its parent's had seen (a run starts from
    CURRENT's weights).
    """

    def __init__(self, feedback_root: Path, pool: list[str]) -> None:
        self.root = feedback_root
        self.index = {query_key(caption): i for i, caption in enumerate(pool)}
        self.kept: set[int] = set()
        self.seen: dict[str, set[int]] = {}  # version -> pool indices its weights were trained on

    def after_run(self, clicked: set[int], serving: str, candidate: Optional[str]) -> dict:
        from cliptuner.serve.feedback_pairs import read_kept

        kept = {self.index[key] for key in read_kept(self.root) if key in self.index}
        held, regression, seen = kept - self.kept, self.kept, self.seen.get(serving, set())
        trained = clicked - kept if candidate else set()
        if candidate:
            self.seen[candidate] = seen | trained
        self.kept = kept
        return {
            "held_out_queries": len(held),
            "held_out_trained": len(held & seen),
            "regression_queries": len(regression),
            "regression_trained": len(regression & seen),
            "trained_queries": len(trained),
        }


# -- the harmful candidate ---------------------------------------------------------------------------------------
def write_harmful(data_root: Path, pairs_file: str, seed: int) -> dict:
    """From the demo's training PAIRS file: 80 % of its images with the captions shuffled across them
    (``HARMFUL_TRAIN``) and the other 20 % with their own captions (``HARMFUL_EVAL``); their counts."""
    with (data_root / pairs_file).open(newline="", encoding="utf-8") as fh:
        rows = [(row["image"], row["caption"]) for row in csv.DictReader(fh)]
    images = sorted({image for image, _ in rows})
    rng = np.random.default_rng(seed)
    held = {images[int(i)] for i in rng.permutation(len(images))[: max(1, round(0.2 * len(images)))]}
    train = [(image, caption) for image, caption in rows if image not in held]
    clean = [(image, caption) for image, caption in rows if image in held]
    captions = [train[int(i)][1] for i in rng.permutation(len(train))]
    shuffled = [(image, caption) for (image, _), caption in zip(train, captions)]
    for name, pairs in ((HARMFUL_TRAIN, shuffled), (HARMFUL_EVAL, clean)):
        with (data_root / name).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["image", "caption"])
            writer.writerows(pairs)
    return {
        "train_images": len(images) - len(held),
        "train_pairs": len(shuffled),
        "still_matching": sum(a == b for a, b in zip(train, shuffled)),  # captions the shuffle left on their image
        "eval_images": len(held),
        "eval_pairs": len(clean),
    }


def harmful_run(
    service: Service, sets: SearchSets, args: argparse.Namespace, serving: str, before: dict, gallery_size: int
) -> dict:
    """The run on shuffled captions, gated on clean held-out pairs: its decision, and serving before and after."""
    from cliptuner.cli.demo import train_following_progress, wait_until_serving

    parameters = {
        "data": HARMFUL_TRAIN,
        "eval_data": HARMFUL_EVAL,
        "epochs": args.harmful_epochs,
        "batch_size": 32,
        "learning_rate": args.lr,
        "seed": args.seed,
    }
    started = time.perf_counter()
    outcome = train_following_progress(service.port, parameters, lambda line: print(line, file=sys.stderr))
    training, report = outcome["progress"], outcome["report"]
    if training.get("promoted"):  # the gate let it through: measure what serves once the gallery is re-embedded
        wait_until_serving(service.client, training["model_version"], gallery_size, say=lambda line: None)
    after_version = service.serving()
    after = measure(service, sets, args, after_version)
    return {
        "parameters": parameters,
        "run": run_summary({"training": training, "report": report}),
        "serving_before": serving,
        "serving_after": after_version,
        "tuner_current": service.status()["tuner"].get("model_version"),
        "unseen_before": before["unseen"],
        "unseen_after": after["unseen"],
        "unchanged": after_version == serving and after["unseen"] == before["unseen"],
        "wall_s": round(time.perf_counter() - started, 1),
    }


# -- one arm: a service, its rounds ------------------------------------------------------------------------------
def clicks_for(rounds: list[dict], points: int) -> Optional[int]:
    """The clicks sent before the first measurement at least ``points`` points of never-searched R@5 above round 0."""
    start = rounds[0]["unseen"]["r5"]
    for row in rounds:
        if row["unseen"]["r5"] >= start + points / 100 - 1e-9:
            return row["clicks"]
    return None


def auto_train_policy(args: argparse.Namespace, gate: bool) -> dict:
    """The ``--auto-train`` policy of an arm: its thresholds and its runs' parameters (the gate's options are the
    service's defaults, but for ``--gate-metric`` when given; ``gate: false`` in the ungated arm)."""
    parameters = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "warmup_steps": 10,
        "seed": args.seed,
    }
    if args.labelled_eval:  # labelled domain pairs join each run's held-out feedback queries (docs/learning.md)
        parameters["eval_data"] = HARMFUL_EVAL
    if not gate:
        parameters["gate"] = False
    elif args.gate_metric is not None:
        parameters["gate_metric"] = args.gate_metric
    return {"min_events": args.events, "min_queries": args.min_queries, "check_every_s": 2, "parameters": parameters}


def gate_in_effect(policy: dict) -> dict:
    """The gate options an arm's automatic runs are decided by: the service's defaults
    (:class:`cliptuner.config.GateConfig`), overridden by the policy's parameters."""
    from cliptuner.config import GateConfig

    defaults = dataclasses.asdict(GateConfig())
    return {name: policy["parameters"].get(name, value) for name, value in defaults.items()}


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_rounds(
    service: Service, sets: SearchSets, args: argparse.Namespace, audit: HeldOutAudit, gallery_size: int, name: str
) -> tuple[list[dict], Optional[str]]:
    """Round 0, then each round's clicks, run and measurement; ``(rounds, why they stopped early or None)``."""
    from cliptuner.cli.demo import wait_until_serving

    t0 = time.perf_counter()
    serving = wait_until(lambda: service.status()["tuner"].get("model_version"), 300, "a CURRENT version")
    wait_until_serving(service.client, serving, gallery_size, say=lambda line: None)
    rounds = [{"round": 0, "searches": 0, "clicks": 0, "wrong_clicks": 0, "queries": 0, "run": None}]
    rounds[0].update(
        serving=serving, **measure(service, sets, args, serving), wall_s=round(time.perf_counter() - t0, 1)
    )
    say(f"{name} round 0: {serving}, never-searched R@5 {rounds[0]['unseen']['r5']:.3f}")
    model = ClickModel(args.examination, args.wrong_rate)
    rng = np.random.default_rng(args.seed)
    clicks = Clicks()
    for round_no in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        if not click_round(service, sets, model, rng, clicks, args, serving, round_no):
            return rounds, (
                f"round {round_no}: {clicks.round_events} events over {len(clicks.round_queries)} queries after "
                f"{args.max_searches} searches, short of {args.events} over {args.min_queries}"
            )
        search_s = time.perf_counter() - t0
        run = run_summary(follow_auto_run(service, clicks.events))
        run["audit"] = audit.after_run(set(clicks.queries), serving, run["candidate"])
        if run["promoted"]:
            wait_until_serving(service.client, run["candidate"], gallery_size, say=lambda line: None)
        serving = service.serving()
        row = {
            "round": round_no,
            "searches": clicks.searches,
            "clicks": clicks.events,
            "wrong_clicks": clicks.wrong,
            "queries": len(clicks.queries),
            "run": run,
            "serving": serving,
            **measure(service, sets, args, serving),
            "search_s": round(search_s, 1),
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        rounds.append(row)
        decision = "promoted" if run["promoted"] else "refused" if run["state"] == "done" else run["state"]
        say(
            f"{name} round {round_no}: {clicks.events} clicks, run {decision}, {serving} serves, never-searched R@5 "
            f"{row['unseen']['r5']:.3f} ({row['wall_s']:.0f} s)"
        )
    return rounds, None


def run_arm(name: str, args: argparse.Namespace, base: Optional[Path], data_info: dict) -> dict:
    """One arm in a workspace and a service of its own: the rounds, and in the gated arm the harmful run."""
    from cliptuner.cli.demo import BaseSettings, DemoSettings, write_domain
    from cliptuner.serve.feedback import FEEDBACK_SUBDIR
    from cliptuner.serve.launch import ServeProcess

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f"cliptuner-bench-feedback-{name}-"))
    workspace = tmp / "ws"
    settings = dataclasses.replace(
        DemoSettings(), n_images=args.n_images, captions_per_image=args.captions, data_seed=args.data_seed
    )
    data = write_domain(workspace / "data", settings)
    sets = search_sets(data.captions, data.caption_image, data.gallery_ids, args.captions)
    harmful_data = write_harmful(workspace / "data", data.pairs_file, args.seed)  # its clean part: labelled eval
    harmful_data = harmful_data if ARMS[name] else None
    data_info.update(
        gallery_images=len(data.gallery_ids),
        pool_captions=len(sets.pool),
        unseen_captions=len(sets.unseen),
        dropped_captions=sets.dropped,
        train_images=data.train_images,
    )
    policy = auto_train_policy(args, ARMS[name])
    env = {
        "CLIPTUNER_MODEL": BaseSettings().arch,
        "CLIPTUNER_PRETRAINED": str(base) if base else "",
        "CLIPTUNER_DEVICE": "cpu",
        "CLIPTUNER_TORCH_THREADS": str(args.threads),
        "CLIPTUNER_AUTO_TRAIN": json.dumps(policy),
        "OMP_NUM_THREADS": str(args.threads),
    }
    process = ServeProcess(workspace, tmp / "service.log", env=env)
    failed = True
    try:
        process.start()
        service = Service(process.port, args.batch)
        service.index(data.gallery_ids, data.gallery_uris)
        audit = HeldOutAudit(workspace / FEEDBACK_SUBDIR, sets.pool)
        rounds, stopped = run_rounds(service, sets, args, audit, len(data.gallery_ids), name)
        harmful = None
        if harmful_data is not None:
            harmful = harmful_run(service, sets, args, rounds[-1]["serving"], rounds[-1], len(data.gallery_ids))
            harmful["data"] = harmful_data
        models = service.models()
        failed = False
    finally:
        process.stop()
        if not failed:
            shutil.rmtree(tmp, ignore_errors=True)  # kept when the run failed: service.log is there
        else:
            say(f"the {name} arm failed; the service's log: {tmp / 'service.log'}")
    return {
        "name": name,
        "gate": ARMS[name],
        "auto_train": policy,
        "gate_options": gate_in_effect(policy),
        "rounds": rounds,
        "start_r5": rounds[0]["unseen"]["r5"],
        "final_r5": rounds[-1]["unseen"]["r5"],
        "clicks_for": {str(points): clicks_for(rounds, points) for points in POINTS},
        "stopped": stopped,
        "models": models,
        "harmful": harmful,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("JINA_HIDE_SURVEY", "1")
    os.environ.setdefault("JINA_OPTOUT_TELEMETRY", "1")
    from cliptuner.cli.demo import BaseSettings, pretrain_base

    base = pretrain_base(BaseSettings(), say=say) if args.base == "demo" else None
    data_info = {"n_images": args.n_images, "captions_per_image": args.captions, "data_seed": args.data_seed}
    arms = [run_arm(name, args, base, data_info) for name in args.arms]
    result = report(args, argv, arms, data_info, started)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def report(args: argparse.Namespace, argv, arms: list[dict], data_info: dict, started: float) -> dict:
    """The results (module docstring), printed as the harness renders them."""
    import jina
    import onnxruntime
    import torch

    from benchmarks.harness import feedback_loop_tables

    harmful = next((arm.pop("harmful") for arm in arms if arm.get("harmful")), None)
    for arm in arms:
        arm.pop("harmful", None)
    result = {
        "arms": arms,
        "harmful": harmful,
        "data": data_info,
        "settings": {
            "base": args.base,
            "limit": args.limit,
            "batch": args.batch,
            "max_searches": args.max_searches,
            "rounds": args.rounds,
            "seed": args.seed,
            "harmful_epochs": args.harmful_epochs,
        },
        "click_model": ClickModel(args.examination, args.wrong_rate).describe(),
        "threads": args.threads,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "versions": {"jina": jina.__version__, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
        "wall_s": round(time.perf_counter() - started, 1),
        "command": "python benchmarks/feedback_loop.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(feedback_loop_tables(result))
    return result


if __name__ == "__main__":
    main()
