"""What a training run shows on the console: its events as lines and a progress bar, then its report as a table.

Used by ``cliptuner train`` and by the demo's base pretraining; it imports nothing else of the CLI.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

EventCallback = Callable[[dict[str, Any]], None]


def _recall_line(label: str, metrics: dict[str, float]) -> str:
    return f"{label}: t2i R@5 {100 * metrics['t2i_r5']:.1f}%  i2t R@5 {100 * metrics['i2t_r5']:.1f}%"


class TrainingProgress:
    """Prints training events to stderr: the split, recall before and after each evaluation, the exported
    precision's recall, the plots drawn, and (when ``bar``) a tqdm bar over optimizer steps.

    Args:
        bar: draw the progress bar.
    """

    def __init__(self, bar: bool) -> None:
        self.enabled = bar
        self.bar: Any = None
        self.after: dict[str, float] = {}  # the trained weights' held-out recall, beside an export's

    def _say(self, line: str) -> None:
        (self.bar.write(line) if self.bar is not None else print(line, file=sys.stderr))

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "loaded" and "train_pairs" in event:
            processes = event.get("world_size", 1)
            self._say(
                f"train: {event['train_pairs']} pairs / {event['train_images']} images;  "
                f"held out: {event['eval_pairs']} pairs / {event['eval_images']} images"
                + (f";  {processes} processes" if processes > 1 else "")
            )
        elif kind == "before":
            self._say(_recall_line("before", event["metrics"]))
        elif kind == "step" and self.enabled:
            self._step(event)
        elif kind == "eval":
            self._say(_recall_line(f"epoch {event['epoch']}", event["metrics"]))
        elif kind == "end" and self.bar is not None:
            self.bar.close()
            self.bar = None
        elif kind == "after":
            self.after = event["metrics"]
        elif kind == "exported" and event.get("measured"):
            self._say(
                f"{event['precision']} export: held-out t2i R@5 {100 * event['after']['t2i_r5']:.1f}% "
                f"(fp32 {100 * self.after.get('t2i_r5', float('nan')):.1f}%)"
            )
        elif kind == "plots":
            for path in event["paths"]:
                self._say(f"plot: {path}")

    def _step(self, event: dict[str, Any]) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=event["total_steps"], unit="step", dynamic_ncols=True, file=sys.stderr)
        self.bar.update(event["step"] - self.bar.n)
        self.bar.set_postfix(
            epoch=f"{event['epoch']}/{event['epochs']}",
            loss=f"{event['loss']:.3f}",
            lr=f"{event['lr']:.1e}",
            sps=f"{event['samples_per_s']:.0f}",
        )


def fan_out(*callbacks: Optional[EventCallback]) -> EventCallback:
    """One event callback that calls each of ``callbacks`` (None entries skipped) in order."""
    active = [callback for callback in callbacks if callback is not None]

    def emit(event: dict[str, Any]) -> None:
        for callback in active:
            callback(event)

    return emit


def print_report(report: dict[str, Any], out: Path) -> None:
    """The report of a finished run on stdout: recall before vs after, the WiSE-FT sweep, the run's numbers."""
    from cliptuner.train.evaluate import format_report

    print(format_report(report["before"], report["after"], report.get("trivial", ())))
    if "wiseft" in report:
        sweep = report["wiseft"]["sweep"]
        print("WiSE-FT (alpha: held-out t2i R@5" + (", general t2i R@5)" if "general" in sweep[0] else ")"))
        for entry in sweep:
            line = f"  {entry['alpha']:.2f}: {100 * entry['held_out']['t2i_r5']:.1f}%"
            if "general" in entry:
                line += f"  {100 * entry['general']['t2i_r5']:.1f}%"
            print(line)
    gate = report.get("gate")
    if gate and gate.get("enabled", True):
        print(f"gate: {gate['reason']}")
    print(
        f"{report['epochs']} epochs, {report['samples_per_s']:.1f} samples/s; "
        f"model version {report['model_version']!r} in {out}"
    )
