"""Training from feedback by itself: the tuner's ``auto_train`` policy (off unless configured). Jina-free, torch-free.

:class:`AutoTrainer` looks at the feedback log every ``check_every_s`` seconds. Once ``min_events`` events were
recorded since the last automatic run, over at least ``min_queries`` distinct queries, it starts one run on the
feedback (``/train`` with ``source: feedback`` and the policy's ``parameters``), detached like ``wait=False``: at a
lower CPU priority, one at a time (a run already going, a manual one included, makes it wait for the next look),
and gated like every run, so a failed or refused run changes nothing that serves.

Its state, ``<feedback root>/auto_train.json`` (``{"through_seq", "run_id", "started_at"}``), is written when a run
starts: the events up to ``through_seq`` have had their run, whatever its outcome, so a run that fails or is refused
is not started again on the same events; it takes ``min_events`` new ones. The state survives restarts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional

from cliptuner.model.atomic import write_atomic
from cliptuner.serve.feedback import FeedbackLog
from cliptuner.serve.feedback_pairs import query_key

logger = logging.getLogger(__name__)

STATE_FILE = "auto_train.json"


@dataclasses.dataclass(frozen=True)
class AutoTrainPolicy:
    """When the tuner trains on feedback by itself.

    Raises:
        ValueError: a bad value or an unknown key (named).
    """

    min_events: int = 100  # new feedback events since the last automatic run
    min_queries: int = 20  # distinct queries among those events
    check_every_s: float = 30.0  # how often the log is looked at
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # /train parameters of each run

    def __post_init__(self) -> None:
        for name in ("min_events", "min_queries"):
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                object.__setattr__(self, name, int(value))
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"auto_train.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.check_every_s, bool) or not isinstance(self.check_every_s, (int, float)):
            raise ValueError(f"auto_train.check_every_s must be a number > 0, got {self.check_every_s!r}")
        if not self.check_every_s > 0:
            raise ValueError(f"auto_train.check_every_s must be a number > 0, got {self.check_every_s!r}")
        if not isinstance(self.parameters, Mapping):
            raise ValueError(f"auto_train.parameters must be a mapping of /train parameters, got {self.parameters!r}")
        fixed = sorted({"source", "wait", "request_id"} & set(self.parameters))
        if fixed:
            raise ValueError(
                f"auto_train.parameters may not set {fixed}: an automatic run trains on the feedback, detached"
            )

    @classmethod
    def from_setting(cls, values: Any) -> Optional[AutoTrainPolicy]:
        """The policy of the tuner's ``auto_train`` setting (None or empty: off).

        Raises:
            ValueError: not a mapping, an unknown key (named), or a bad value.
        """
        if not values:
            return None
        if isinstance(values, str):  # CLIPTUNER_AUTO_TRAIN / cliptuner serve --auto-train
            try:
                values = json.loads(values)
            except ValueError as exc:
                raise ValueError(f"auto_train must be a JSON object, got {values!r}: {exc}") from None
        if not isinstance(values, Mapping):
            raise ValueError(
                f"auto_train must be a mapping like {{'min_events': 100, 'min_queries': 20}}, got {values!r}"
            )
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"auto_train: unknown key(s) {unknown}; known: {known}")
        return cls(**values)


StartRun = Callable[[dict, str], Optional[str]]  # (parameters, request id) -> the run id, or None when busy


class AutoTrainer:
    """Starts a gated run on the feedback once enough new feedback came in (see the module's docs).

    Args:
        policy: when to start a run, and its parameters.
        feedback_root: the feedback log's folder (``<workspace>/feedback``).
        start: starts a detached run on the feedback with these ``/train`` parameters and request id; returns its
            run id, or None when a run is already going.
        on_pending: told the count of pending events at each look (a metrics gauge).
        on_started: told of each run started (a metrics counter).
    """

    def __init__(
        self,
        policy: AutoTrainPolicy,
        feedback_root: Path,
        start: StartRun,
        on_pending: Callable[[int], None] = lambda n: None,
        on_started: Callable[[], None] = lambda: None,
    ) -> None:
        self.policy = policy
        self.root = Path(feedback_root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._start = start
        self._on_pending = on_pending
        self._on_started = on_started
        self._lock = threading.Lock()  # one look at a time
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.last_check: dict[str, Any] = {}
        self.last_error: Optional[str] = None

    # -- state -----------------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """``auto_train.json``: ``{"through_seq", "run_id", "started_at"}`` ({"through_seq": 0} before the first run)."""
        try:
            state = json.loads((self.root / STATE_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"through_seq": 0}
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the auto_train state {STATE_FILE!r}: {exc}") from None
        if not isinstance(state, dict) or not isinstance(state.get("through_seq"), int):
            raise ValueError(f"the auto_train state {STATE_FILE!r} is not {{'through_seq': int, ...}}: {state!r}")
        return state

    def pending(self) -> dict[str, int]:
        """Events recorded after the last automatic run, the distinct queries among them, and the last seq."""
        through = self.state()["through_seq"]
        log = FeedbackLog(self.root)
        try:
            events = log.events(after_seq=through)
        finally:
            log.close()
        queries = {query_key(recorded.event) for recorded in events}
        last = events[-1].seq if events else through
        return {"events": len(events), "queries": len(queries), "through_seq": through, "last_seq": last}

    # -- one look --------------------------------------------------------------------------------------------------
    def check(self) -> Optional[str]:
        """Look at the log once; start a run when the policy says so. Returns the run id started, or None."""
        with self._lock:
            pending = self.pending()
            self._on_pending(pending["events"])
            self.last_check = {**pending, "checked_at": time.time()}
            policy = self.policy
            if pending["events"] < policy.min_events or pending["queries"] < policy.min_queries:
                return None
            request_id = f"auto-train-{pending['last_seq']}"
            run_id = self._start(dict(policy.parameters), request_id)
            if run_id is None:  # a run is going: look again later
                return None
            state = {"through_seq": pending["last_seq"], "run_id": run_id, "started_at": time.time()}
            write_atomic(self.root / STATE_FILE, json.dumps(state) + "\n")
            self._on_pending(0)
            self._on_started()
            logger.info(
                "auto_train: %d new feedback events over %d queries (through seq %d): started run %s",
                pending["events"],
                pending["queries"],
                pending["last_seq"],
                run_id,
            )
            return run_id

    # -- the thread ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Look every ``check_every_s`` seconds in a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._loop, name="auto-train", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.policy.check_every_s):
            try:
                self.check()
                self.last_error = None
            except Exception as exc:  # a bad look (a locked database, a run that failed to start) waits for the next
                self.last_error = f"{type(exc).__name__}: {exc}"
                logger.warning("auto_train: %s", self.last_error)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            with contextlib.suppress(RuntimeError):
                self._thread.join(timeout=5)

    def status(self) -> dict[str, Any]:
        """What ``/status`` shows: the policy's thresholds, the last look and the last run it started."""
        try:
            state = self.state()
        except ValueError as exc:
            state = {"error": str(exc)}
        return {
            "min_events": self.policy.min_events,
            "min_queries": self.policy.min_queries,
            "check_every_s": self.policy.check_every_s,
            "pending": {k: self.last_check[k] for k in ("events", "queries")} if self.last_check else None,
            "last_run": state,
            "last_error": self.last_error,
        }


__all__ = ["STATE_FILE", "AutoTrainPolicy", "AutoTrainer"]
